"""One import root: tests, benchmarks and tools import the pack as ``fewstep.<package>`` only, so no pack module is
loaded twice with two sets of globals. The static scan reads every non-pack Python file; the runtime check
(``tools.packroot.import_root_problems``, also run after every test by tests/conftest.py) must see a double load."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tools import packroot

REPO = packroot.REPO
PACK_SUBMODULES = {p.stem for p in (REPO / "nodes").glob("*.py")} - {"__init__"}


def stays_outside_pack(path: Path, level: int) -> bool:
    """A relative import inside a package of tools/, tests/, bench/ or dev/ (e.g. ``tools/standins``) that does not
    climb to the checkout's root names that package's own modules, never the pack's."""
    try:
        depth = len(path.resolve().parent.relative_to(REPO).parts)
    except ValueError:
        return False
    return (path.parent / "__init__.py").is_file() and depth - (level - 1) >= 1


def wrong_imports(path: Path) -> list[str]:
    """Imports in `path` that reach the pack's code without the `fewstep.` root."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level:
            if not stays_outside_pack(path, node.level):
                bad.append(f"line {node.lineno}: relative import (tests, tools and bench are not part of the pack)")
            continue
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        for name in names:
            top, _, rest = name.partition(".")
            if top in ("samplers", "lora", "kernels"):
                bad.append(f"line {node.lineno}: {name}")
            elif top == "nodes" and (rest or isinstance(node, ast.ImportFrom)
                                     and any(a.name in PACK_SUBMODULES for a in node.names)):
                # a bare `import nodes` is the host's nodes.py; `nodes.<x>` / `from nodes import engine` is the pack's
                bad.append(f"line {node.lineno}: {name}")
    return bad


def non_pack_files() -> list[Path]:
    return sorted(p for d in ("tests", "tools", "bench", "dev") if (REPO / d).is_dir() for p in (REPO / d).rglob("*.py"))


def test_tests_tools_and_bench_import_the_pack_as_fewstep_only():
    files = non_pack_files()
    assert any(p.name == "test_schedules.py" for p in files), "the scan found no test files"
    bad = {str(p.relative_to(REPO)): b for p in files if (b := wrong_imports(p))}
    assert not bad, f"import the pack as `fewstep.<package>` (tools/packroot.py explains why): {bad}"


def test_the_scan_sees_a_second_root(tmp_path):
    f = tmp_path / "test_x.py"
    f.write_text("import torch\nimport nodes\nfrom nodes import NODE_CLASS_MAPPINGS\nfrom fewstep.samplers import "
                 "schedules\nfrom samplers import schedules\nimport kernels.loop as L\nfrom nodes import engine\n"
                 "from .x import y\n")
    assert [b.split(":")[0] for b in wrong_imports(f)] == ["line 5", "line 6", "line 7", "line 8"]


def test_no_pack_module_is_loaded_twice_in_this_run():
    from fewstep.samplers import consistency, schedules  # noqa: F401
    from fewstep.lora import formats  # noqa: F401
    from fewstep.kernels import loop  # noqa: F401
    assert packroot.import_root_problems() == []
    assert sys.modules["fewstep.samplers.schedules"].__file__ == str(REPO / "samplers" / "schedules.py")


def test_a_second_root_is_reported():
    """Loading samplers/schedules.py as `samplers.schedules` beside `fewstep.samplers.schedules` is a double load."""
    code = ("import sys; sys.path.insert(0, %r); import samplers.schedules; from tools import packroot; "
            "packroot.import_pack(); import fewstep.samplers.schedules; "
            "print('\\n'.join(packroot.import_root_problems()))" % str(REPO))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "samplers/schedules.py is loaded twice, as ['fewstep.samplers.schedules', 'samplers.schedules']" in out.stdout
    assert "samplers/__init__.py is loaded twice" in out.stdout


def test_import_pack_refuses_another_fewstep(tmp_path):
    other = tmp_path / "fewstep"
    other.mkdir()
    (other / "__init__.py").write_text("")
    code = ("import sys; sys.path.insert(0, %r); import fewstep; sys.path.insert(0, %r); from tools import packroot\n"
            "try:\n    packroot.import_pack()\nexcept ImportError as e:\n    print(e)" % (str(tmp_path), str(REPO)))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert f"a different 'fewstep' is already imported (from {other})" in out.stdout, out.stdout + out.stderr


def test_after_import_pack_the_pack_folders_are_not_top_level_names():
    """transformers and diffusers probe for Hugging Face's `kernels` package by importing `kernels`; with the checkout
    on sys.path that would load fewstep's kernels/ a second time. After import_pack() the checkout's folder does not
    offer the pack's packages as top-level names (tools/ and tests/ it still does)."""
    code = ("import sys, importlib.util; sys.path.insert(0, %r); from tools import packroot; packroot.import_pack()\n"
            "print([importlib.util.find_spec(n) is None for n in ('kernels', 'samplers', 'lora')])\n"
            "import tools.workflows, fewstep.kernels.loop\n"
            "try:\n    import samplers\nexcept ModuleNotFoundError as e:\n    print(e)" % str(REPO))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[True, True, True]", "No module named 'samplers'"], out.stdout
