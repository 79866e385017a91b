"""Shared fixtures for the tiers: tests/math (no host), tests/host (host in-process), tests/e2e (real server),
tests/browser (real frontend).

Every test imports the pack one way: as ``fewstep.<package>`` (``from fewstep.samplers import schedules``), never as a
top-level ``samplers``. ``tools.packroot.import_pack()`` below registers this checkout as ``fewstep`` before any test
module is collected, with or without the host set up. After each test, the import-root check fails the test that
loaded a file of the checkout under a second name.
"""
from __future__ import annotations

import sys
from collections import Counter

import pytest

from tools import packroot

_PACK = packroot.import_pack()
# The checkout's root holds the pack's __init__.py, so pytest collects the root folder as a package and imports that
# file under the folder's name (as `<folder>`, e.g. `fewstep` for a clone named so). The alias makes that import return
# the same module object instead of a second copy.
sys.modules.setdefault(packroot.REPO.name, _PACK)
if not packroot.REPO.name.isidentifier():  # a folder name pytest cannot import (e.g. "my-clone"): it uses "__init__"
    sys.modules.setdefault("__init__", _PACK)
_TIER_COUNTS: Counter = Counter()
_IMPORT_PROBLEMS_SEEN: set[str] = set()
_LAST_MODULE_NAMES: set[str] = set()


@pytest.fixture(scope="session")
def standin_dir():
    """Cache folder with the stand-in SD1.5 checkpoint and LoRA files (built on first use)."""
    from tools import standins
    return standins.ensure(("sd15",))


@pytest.fixture(scope="session")
def host():
    """The real ComfyUI host imported in-process (tests/host)."""
    from tools import hostenv
    hostenv.import_host()
    import comfy.model_management  # noqa: F401  (initialises device state)
    return hostenv.host_dir()


@pytest.fixture(scope="session")
def server(standin_dir, tmp_path_factory):
    """A real ComfyUI server on a free 127.0.0.1 port with the pack installed (tests/e2e)."""
    from tools import hostenv
    srv = hostenv.Server(output_dir=tmp_path_factory.mktemp("comfy-out"), standin_dir=standin_dir)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _one_import_root():
    """Fails the test after which a checkout file is loaded under a second module name (or a pack file outside
    ``fewstep.*``); each problem is reported once, by the first test that caused it."""
    yield
    names = set(sys.modules)
    if names == _LAST_MODULE_NAMES:  # nothing new imported: no new second name either
        return
    _LAST_MODULE_NAMES.clear()
    _LAST_MODULE_NAMES.update(names)
    new = [p for p in packroot.import_root_problems() if p not in _IMPORT_PROBLEMS_SEEN]
    _IMPORT_PROBLEMS_SEEN.update(new)
    if new:
        pytest.fail("the pack was imported under a second root during this test:\n  " + "\n  ".join(new), pytrace=False)


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
