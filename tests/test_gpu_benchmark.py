"""benchmarks/gpu.py is prepared for a GPU that CI does not have; its --dry-run runs the same
code (model folder, data, sftlab's run in a child process, FLOPs and the report) on a tiny model
on the CPU, so the script cannot rot unnoticed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu.py")


@pytest.mark.slow
def test_gpu_benchmark_dry_run(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            SCRIPT,
            "--dry-run",
            "--sides",
            "sftlab",
            "--workdir",
            str(tmp_path),
            "--json",
            str(tmp_path / "r.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (row,) = [line.split() for line in done.stdout.splitlines() if line.startswith("tiny ")]
    assert row[:3] == ["tiny", "sftlab", "sdpa"] and float(row[3]) > 0 and float(row[5]) > 0  # tokens/s, s/step
    import json

    (run,) = json.loads((tmp_path / "r.json").read_text())["runs"]
    assert run["model_tflops_per_s"] > 0 and len(run["step_seconds"]) == 3
