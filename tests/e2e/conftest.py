"""Fixtures of the real-server tier shared by its modules (the SD ``server`` is in tests/conftest.py)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def flow_server(tmp_path_factory):
    """One real server for every flow-family module: the flow stand-ins (tools/standins) and the test-only
    text-encoder node FewStepTestConditioning (tests/custom_nodes), loaded for this server only."""
    from tools import hostenv, standins
    root = standins.ensure(tuple(standins.FLOW_FAMILIES))
    srv = hostenv.Server(output_dir=tmp_path_factory.mktemp("flow-out"), standin_dir=root, test_nodes=True)
    srv.start()
    yield srv
    srv.stop()
