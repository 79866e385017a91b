"""Shared fixtures for the three tiers: tests/math (no host), tests/host (host in-process), tests/e2e (real server)."""
from __future__ import annotations

import os
from collections import Counter

import pytest

_TIER_COUNTS: Counter = Counter()


@pytest.fixture(scope="session")
def standin_dir():
    """Cache folder with the stand-in SD1.5 checkpoint and LoRA files (built on first use)."""
    from tools import standins
    return standins.ensure(("sd15",))


@pytest.fixture(scope="session")
def host():
    """The real ComfyUI host imported in-process (tier b)."""
    from tools import hostenv
    hostenv.import_host()
    import comfy.model_management  # noqa: F401  (initialises device state)
    return hostenv.host_dir()


@pytest.fixture(scope="session")
def server(standin_dir, tmp_path_factory):
    """A real ComfyUI server on a free 127.0.0.1 port with the pack installed (tier c)."""
    from tools import hostenv
    srv = hostenv.Server(output_dir=tmp_path_factory.mktemp("comfy-out"), standin_dir=standin_dir)
    srv.start()
    yield srv
    srv.stop()


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and report.skipped):
        tier = report.nodeid.split("/")[1] if report.nodeid.startswith("tests/") else "?"
        _TIER_COUNTS[(tier, report.outcome)] += 1


def pytest_terminal_summary(terminalreporter):
    tiers = sorted({t for t, _ in _TIER_COUNTS})
    if not tiers:
        return
    terminalreporter.section("fewstep tiers")
    names = {"math": "pure math (no host)", "host": "in-process ComfyUI host", "e2e": "real ComfyUI server end-to-end",
             "browser": "real frontend in a browser"}
    for t in tiers:
        parts = ", ".join(f"{_TIER_COUNTS[(t, o)]} {o}" for o in ("passed", "failed", "skipped") if _TIER_COUNTS[(t, o)])
        terminalreporter.write_line(f"{t:8s} {names.get(t, t)}: {parts}")
