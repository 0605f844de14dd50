"""bench/gpu_check.sh and bench/gpu_check.py, the prepared GPU check, up to the GPU.

Without a GPU both say so and stop (exit 2); ``gpu_check.py --dry-run`` runs every other
step for real: a bench model compiled for CUDA (nvcc checks its kernels), the runners in
their own processes with this CPU standing in for the GPU, their outputs checked against
ONNX Runtime, interleaved timing, edgec's profile, the table and the JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import gpu_available

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(gpu_available(), reason="this machine has a GPU: the real check runs instead")
def test_without_a_gpu_both_stop_with_a_reason():
    script = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True, timeout=120, check=False)
    assert script.returncode == 2, script.stdout + script.stderr
    assert "no NVIDIA GPU here" in script.stdout and "--dry-run" in script.stdout
    bench = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py")], capture_output=True, text=True, timeout=300, check=False)
    assert bench.returncode == 2, bench.stderr
    assert "edgec: no CUDA device: " in bench.stderr
    assert "nothing was compiled or timed" in bench.stderr


@pytest.mark.slow
def test_dry_run_builds_times_checks_and_profiles(tmp_path):
    raw = tmp_path / "raw.json"
    table = tmp_path / "table.md"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--models", "resnet18", "--dtypes", "float32",
         "--rounds", "2", "--repeat", "2", "--json", str(raw), "-o", str(table)],
        capture_output=True, text=True, timeout=1200, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert done.stdout.startswith("DRY RUN: the CPU stands in for the GPU")
    rows = [line for line in done.stdout.splitlines() if line.startswith("| resnet18 |")]
    assert [row.split("|")[2].strip() for row in rows] == ["edgec float32", "ONNX Runtime (CPU)", "PyTorch (CPU)"]
    assert all("| ok (max abs err" in row for row in rows)
    assert table.read_text().strip() == done.stdout.strip()
    data = json.loads(raw.read_text())["resnet18"]
    build = data["builds"]["float32"]
    assert "kernels.cu" in build["files"]  # the CUDA build was made (and nvcc-checked where nvcc is)
    assert build["verification"]["status"] in ("skipped", "passed")
    for name in ("edgec float32", "ONNX Runtime (CPU)", "PyTorch (CPU)"):
        runner = data["runners"][name]
        assert len(runner["samples"]) == 4 and min(runner["samples"]) > 0  # 2 rounds x 2 runs, every one timed
    profile = data["runners"]["edgec float32"]["profile"]
    assert len(profile["top"]) == 5 and profile["end_to_end_ms"] > 0
