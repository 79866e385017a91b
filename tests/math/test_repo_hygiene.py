"""The repository stands alone and speaks with one voice: no file cites documents outside it or internal
work-tracking numbers, and every module logs through the one pack logger, ``logging.getLogger("fewstep")``."""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOGGER = "fewstep"

# Built from pieces so this file does not match itself.
OUTSIDE = [
    ("a document outside the repository", r"\.\./" + r"shared\b"),
    ("a path of the machine it was developed on", r"/" + r"work/(wt|main|shared)\b"),
    ("an internal work-tracking number", r"\b(session|issue|wave|stop)[ -]#?\d+\b"),
    ("an internal work-tracking name", r"\bhelper [A-Z]\b"),
]


def repo_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, text=True, timeout=60, check=True).stdout.split("\n")
        files = [REPO / f for f in out if f]
    except (OSError, subprocess.CalledProcessError):  # a copy without git: walk it, skipping ignored caches
        files = [p for p in REPO.rglob("*") if not {".cache", ".git", "out", "__pycache__"} & set(p.parts)]
    return [p for p in files if p.is_file()]


def text_of(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data[:4096]:
        return None
    return data.decode("utf-8", errors="replace")


def test_no_file_cites_outside_documents_or_tracking_numbers():
    hits = []
    files = repo_files()
    assert any(p.name == "README.md" for p in files)
    for path in files:
        text = text_of(path)
        if text is None:
            continue
        for what, pattern in OUTSIDE:
            for m in re.finditer(pattern, text, re.I):
                line = text.count("\n", 0, m.start()) + 1
                hits.append(f"{path.relative_to(REPO)}:{line}: {what}: {m.group(0)!r}")
    assert not hits, "cite public papers and repositories instead:\n" + "\n".join(hits)


def test_the_scan_finds_what_it_looks_for():
    sample = "see ../" + "shared/reference/speed.md, fixed in Iss" + "ue 3 (sess" + "ion-2), hel" + "per B's wa" + "ve 4"
    found = [what for what, pattern in OUTSIDE if re.search(pattern, sample, re.I)]
    assert found == ["a document outside the repository", "an internal work-tracking number",
                     "an internal work-tracking name"]


def logger_names(path: Path) -> list[tuple[int, str]]:
    """(line, first argument as source) of every getLogger(...) call."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "getLogger":
            arg = ast.unparse(node.args[0]) if node.args else "<root>"
            out.append((node.lineno, arg))
    return out


def test_one_logger_name_across_the_pack_and_its_tools():
    calls = {str(p.relative_to(REPO)): logger_names(p) for p in repo_files() if p.suffix == ".py"}
    assert sum(len(c) for c in calls.values()) >= 10, "the scan found no loggers"
    # getLogger() with no name is the root logger, which the host logs to: tools may quieten it around a host call
    bad = {f: [c for c in cs if c[1] not in (repr(LOGGER), "<root>")] for f, cs in calls.items()}
    bad = {f: cs for f, cs in bad.items() if cs}
    assert not bad, f'use logging.getLogger("{LOGGER}") everywhere (one name, one switch for users): {bad}'
