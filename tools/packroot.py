"""The one import root of the pack outside the host: this checkout, imported as the package ``fewstep``.

Tests, benchmarks and tools import the pack's code only as ``fewstep.<package>`` (``fewstep.samplers``,
``fewstep.lora``, ...), never as a top-level ``samplers``: two names for one file would load it twice, with two sets
of module globals (registries, caches, warn-once sets) that silently disagree.

``import_pack()`` registers the checkout under that name from its own path, whatever the checkout's folder is called
and whether or not the ComfyUI host is set up, so the math tier runs without the host. The host's own loader
(``nodes.load_custom_node``) names a custom-node package after its path instead, so in-process code never calls
that loader on the pack; the server tier is where the host loads it its own way, in its own process.

Tests and tools run with the checkout on ``sys.path`` (for ``tools.*`` and ``tests.*``), which would make the pack's
folders importable as top-level names too, shadowing unrelated distributions of the same name (transformers and
diffusers probe for Hugging Face's ``kernels`` package by importing ``kernels``; the host imports its own ``nodes``).
``import_pack()`` therefore also installs a path hook whose finder for this checkout's folder does not see those
top-level names: ``import kernels`` gets the real distribution if one is installed, otherwise ModuleNotFoundError, as
on a user's machine.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent
NAME = "fewstep"
#: The pack's runtime packages (what the host loads); tools/, bench/ and tests/ are development-only.
PACKAGES = ("samplers", "lora", "kernels", "nodes")


class _CheckoutFinder(importlib.machinery.FileFinder):
    """The finder of this checkout's folder on ``sys.path``: it finds ``tools``, ``tests``, ``bench`` as usual but
    not the pack's own packages as top-level names (those are ``fewstep.<package>`` only)."""

    def find_spec(self, fullname, target=None):
        return None if fullname in PACKAGES else super().find_spec(fullname, target)


_LOADERS = ((importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES),
            (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES),
            (importlib.machinery.SourcelessFileLoader, importlib.machinery.BYTECODE_SUFFIXES))


def _checkout_path_hook(entry: str):
    if Path(os.path.realpath(entry or os.getcwd())) != REPO:
        raise ImportError("not this checkout")  # the next path hook takes the entry
    return _CheckoutFinder(entry, *_LOADERS)


def _guard_top_level_names() -> None:
    if _checkout_path_hook not in sys.path_hooks:
        sys.path_hooks.insert(0, _checkout_path_hook)
        for entry in list(sys.path_importer_cache):  # finders made before the hook are made again through it
            if isinstance(entry, str) and Path(os.path.realpath(entry or os.getcwd())) == REPO:
                del sys.path_importer_cache[entry]


def import_pack() -> ModuleType:
    """``sys.modules['fewstep']`` for this checkout (idempotent). Refuses a ``fewstep`` from somewhere else."""
    _guard_top_level_names()
    mod = sys.modules.get(NAME)
    if mod is not None:
        where = Path(getattr(mod, "__file__", "") or "").resolve().parent
        if where != REPO:
            raise ImportError(f"a different '{NAME}' is already imported (from {where}), not this checkout ({REPO}); "
                              f"uninstall it or run from one checkout")
        return mod
    spec = importlib.util.spec_from_file_location(NAME, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[NAME] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(NAME, None)
        raise
    return mod


_IN_CHECKOUT: dict[str, Path | None] = {}  # module file as loaded -> the checkout file it is, or None (cached)


def _checkout_file(path: str) -> Path | None:
    if path not in _IN_CHECKOUT:
        real = Path(os.path.realpath(path))
        inside = REPO in real.parents and ".cache" not in real.relative_to(REPO).parts
        _IN_CHECKOUT[path] = real if inside else None
    return _IN_CHECKOUT[path]


def checkout_files_loaded() -> dict[Path, dict[str, ModuleType]]:
    """Every file of this checkout that is loaded as a module now: {file: {module name: module}}."""
    out: dict[Path, dict[str, ModuleType]] = {}
    for name, mod in list(sys.modules.items()):
        path = getattr(mod, "__file__", None)
        real = _checkout_file(path) if isinstance(path, str) else None
        if real is not None:
            out.setdefault(real, {})[name] = mod
    return out


def import_root_problems() -> list[str]:
    """Files of the checkout loaded as two different module objects, and pack files loaded outside ``fewstep.*``.

    One module object under two names (an alias) shares its globals and is not a problem."""
    problems = []
    for path, mods in sorted(checkout_files_loaded().items()):
        rel = path.relative_to(REPO)
        objects = {id(m) for m in mods.values()}
        if len(objects) > 1:
            problems.append(f"{rel} is loaded twice, as {sorted(mods)}")
        elif rel.parts[0] in PACKAGES or rel == Path("__init__.py"):
            if not any(n == NAME or n.startswith(NAME + ".") for n in mods):
                parts = [p for p in rel.with_suffix("").parts if p != "__init__"]
                problems.append(f"{rel} is loaded as {sorted(mods)}; import it as {'.'.join([NAME, *parts])!r}")
    return problems
