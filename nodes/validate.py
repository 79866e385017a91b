"""Every node checks its own inputs where they are entered: one validator driven by each node's own schema.

The host (ComfyUI 0.3.75) turns literal INT/FLOAT widget values into numbers at ``/prompt`` but lets NaN and Inf
through, and it does not check a V3 node's dropdown (Combo) values against their options at all. ``validated``
gives a node class

* a ``validate_inputs`` the host calls at ``/prompt``: a bad value is an HTTP 400 whose node error names the node,
  the input, the value and what is allowed, before anything runs;
* an ``execute`` that checks the values it is called with first (values that arrive through links are not known
  at ``/prompt``), so no downstream node is the first to notice.

Each value is checked against its schema entry: Combo -> one of its options; Float -> a finite number within
min/max; Int -> an integer within min/max; String -> text of at most ``MAX_TEXT`` characters; Boolean -> a bool.
A node may add checks of single inputs (``validated(filename_prefix=check_prefix)``); checks that need several
inputs or the model stay in the node. User-supplied text is cut in every message (``cut``).

Note: a node with ``validate_inputs(**kwargs)`` takes over the host's own min/max checks for that node (the host
skips them), which is why the range check lives here too.
"""
from __future__ import annotations

import functools
import inspect
import math
import numbers
import os
from collections.abc import Callable

from comfy_api.v0_0_2 import io

MAX_TEXT = 16384  # longest text input accepted (the longest sensible value, 1000 timesteps, is ~5,000 characters)
MAX_MESSAGE = 2000  # characters of a node error (a message quoting a huge key name or value is cut)
CUT = 60  # characters of a user-supplied value shown in a message
MAX_OPTIONS_TEXT = 1200  # characters of allowed values listed in a message
COUNTER_SUFFIX = len("_00001_.safetensors")  # what a save node appends to the file name of a prefix
MAX_NAME_BYTES = 255  # longest file name on common file systems

InputCheck = Callable[[object], None]  # raises ValueError (its message without the node name)


def cut(text: object, n: int = CUT) -> str:
    """``text`` (``str()`` of it), cut to ``n`` characters with the full length noted."""
    s = text if isinstance(text, str) else str(text)
    return s if len(s) <= n else f"{s[:n]}... ({len(s)} characters)"


def show(value: object) -> str:
    """A value as a message quotes it: ``repr``, cut."""
    if isinstance(value, str) and len(value) > CUT:
        return f"{value[:CUT]!r}... ({len(value)} characters)"
    return cut(repr(value))


def _options_text(options: list) -> str:
    """All options when they fit in ``MAX_OPTIONS_TEXT`` characters (a preset list), else the first ones and the
    count (a folder of thousands of files)."""
    shown = [show(o) for o in options]
    if len(", ".join(shown)) <= MAX_OPTIONS_TEXT:
        return "one of " + ", ".join(shown)
    head: list[str] = []
    while len(", ".join(head + shown[len(head):len(head) + 1])) <= MAX_OPTIONS_TEXT - 100:
        head.append(shown[len(head)])
    return f"one of its {len(options)} options ({', '.join(head)}, ...)"


def _bound(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _range_text(inp) -> str:
    lo, hi = getattr(inp, "min", None), getattr(inp, "max", None)
    if lo is not None and hi is not None:
        return f" in [{_bound(lo)}, {_bound(hi)}]"
    if lo is not None:
        return f" >= {_bound(lo)}"
    return f" <= {_bound(hi)}" if hi is not None else ""


def _in_range(inp, value) -> bool:
    lo, hi = getattr(inp, "min", None), getattr(inp, "max", None)
    return (lo is None or value >= lo) and (hi is None or value <= hi)


def input_problem(inp, value) -> str | None:
    """What is wrong with ``value`` for schema input ``inp`` ("" parts name the input), or None when it is fine.

    ``None`` values are links not evaluated yet (at ``/prompt``) or optional inputs left empty: not checked."""
    if value is None:
        return None
    if isinstance(inp, io.MultiCombo.Input):
        return None  # not used by the pack; its value is a list
    if isinstance(inp, io.Combo.Input):
        options = list(inp.options or [])
        if options and value not in options:
            return f"{inp.id} is {show(value)}; it must be {_options_text(options)}"
        return None
    if isinstance(inp, io.Float.Input):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return f"{inp.id} must be a number, got {type(value).__name__} {show(value)}"
        if not math.isfinite(value) or not _in_range(inp, value):
            return f"{inp.id} is {show(value)}; it must be a finite number{_range_text(inp)}"
        return None
    if isinstance(inp, io.Int.Input):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            return f"{inp.id} must be an integer, got {type(value).__name__} {show(value)}"
        if not _in_range(inp, value):
            return f"{inp.id} is {show(value)}; it must be an integer{_range_text(inp)}"
        return None
    if isinstance(inp, io.String.Input):
        if not isinstance(value, str):
            return f"{inp.id} must be text, got {type(value).__name__} {show(value)}"
        if len(value) > MAX_TEXT:
            return f"{inp.id} is {len(value)} characters long (starting {value[:CUT]!r}); at most {MAX_TEXT} are accepted"
        return None
    if isinstance(inp, io.Boolean.Input) and not isinstance(value, bool):
        return f"{inp.id} must be true or false, got {type(value).__name__} {show(value)}"
    return None


def check_inputs(node_cls, values: dict, checks: dict[str, InputCheck] | None = None) -> None:
    """ValueError naming the node (its display name), the input, the value and what is allowed, for the first
    value in ``values`` (input id -> value) that its schema entry or ``checks`` refuses."""
    schema = node_cls.define_schema()
    node = schema.display_name or schema.node_id
    for inp in schema.inputs:
        if inp.id not in values:
            continue
        value = values[inp.id]
        problem = input_problem(inp, value)
        if problem is None and checks and inp.id in checks and value is not None:
            try:
                checks[inp.id](value)
            except ValueError as e:
                problem = str(e)
        if problem is not None:
            raise ValueError(cut(f"{node}: {problem}", MAX_MESSAGE))


def validated(node_cls=None, /, **checks: InputCheck):
    """Class decorator: the node checks its inputs at ``/prompt`` (``validate_inputs``) and at the start of
    ``execute``. Keyword arguments add checks of single inputs by id: ``@validated(filename_prefix=check_prefix)``."""
    def apply(cls):
        run = cls.__dict__["execute"].__func__
        names = list(inspect.signature(run).parameters)[1:]

        @functools.wraps(run)
        def execute(klass, *args, **kwargs):
            check_inputs(klass, {**dict(zip(names, args)), **kwargs}, checks)
            return run(klass, *args, **kwargs)

        def validate_inputs(klass, **values):
            check_inputs(klass, values, checks)
            return True

        cls.execute = classmethod(execute)
        cls.validate_inputs = classmethod(validate_inputs)
        cls.fewstep_validated = True
        return cls
    return apply(node_cls) if node_cls is not None else apply


# ---------------------------------------------------------------- save / export file names

def check_prefix(prefix: object, output_dir: str | None = None) -> None:
    """ValueError unless ``prefix`` (a save node's ``filename_prefix``) names a visible file inside the output folder:
    not empty, no hidden (dot) file or folder, no absolute path or ``..`` escape, no NUL, a file name short enough
    for the counter and extension. ``output_dir`` defaults to the host's output folder."""
    example = "e.g. 'fewstep/my_file'"
    if not isinstance(prefix, str) or not prefix.strip():
        raise ValueError(f"filename_prefix is empty; give a file name under the output folder, {example}")
    if "\0" in prefix:
        raise ValueError(f"filename_prefix {show(prefix)} contains a NUL character")
    parts = prefix.replace("\\", "/").split("/")
    name = parts[-1].strip()
    if name in ("", "."):
        raise ValueError(f"filename_prefix {show(prefix)} ends in a folder separator; add a file name, {example}")
    if os.path.isabs(prefix) or prefix.startswith(("/", "\\")) or any(p == ".." for p in parts):
        raise ValueError(f"filename_prefix {show(prefix)} leaves the output folder; give a path relative to it, "
                         f"{example}")
    hidden = next((p for p in parts if p.startswith(".") and p != "."), None)
    if hidden is not None:
        raise ValueError(f"filename_prefix {show(prefix)} would write a hidden file or folder ({show(hidden)}); "
                         f"use a name that does not start with '.', {example}")
    if len(name.encode("utf-8", "surrogatepass")) + COUNTER_SUFFIX > MAX_NAME_BYTES:
        raise ValueError(f"filename_prefix's file name {show(name)} is too long (at most "
                         f"{MAX_NAME_BYTES - COUNTER_SUFFIX} bytes before the counter and extension)")
    if output_dir is None:
        import folder_paths
        output_dir = folder_paths.get_output_directory()
    out = os.path.abspath(output_dir)
    target = os.path.abspath(os.path.join(out, os.path.normpath(prefix)))
    if os.path.commonpath((out, target)) != out or target == out:
        raise ValueError(f"filename_prefix {show(prefix)} leaves the output folder; give a path relative to it, "
                         f"{example}")


def saved_text(path: str, output_dir: str | None = None) -> str:
    """What a save node wrote, for its UI: the path relative to the output folder and the file's size."""
    import folder_paths
    out = os.path.abspath(output_dir or folder_paths.get_output_directory())
    size = os.path.getsize(path)
    inside = os.path.commonpath((out, os.path.abspath(path))) == out
    where = f"{os.path.relpath(path, out)} in the output folder" if inside else path
    return f"{where} ({size / 2 ** 20:.1f} MiB, {size} bytes)"
