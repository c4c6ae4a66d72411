"""The one-shot GPU benchmark runs end to end on the CPU (``--cpu-dry-run``) before it meets a GPU.

A GPU machine is lent rarely and briefly; a script that breaks there wastes the loan. The dry run
takes every step the GPU run takes (bandwidth, merge core, merge-in-place, streamed merge from
host memory, save + reload + first score) on tiny shapes, and its own equality checks must hold.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_benchmark_dry_run_measures_every_step(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu" / "run.sh"), "--cpu-dry-run", "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "cpu-dry-run.json").read_text())
    assert result["bandwidth"]["device_copy_GBps"] > 0
    assert set(result["merge_core"]["methods"]) >= {"task_arithmetic", "ties", "regmean"}
    row = result["models"]["tiny"]
    assert "error" not in row, row
    assert row["streamed_equals_resident"] is True
    assert row["reload_equals_in_place"] is True
    assert row["merge_in_place_s"] > 0 and row["reload_per_candidate_s"] > 0
    # The memory plan's figure sits beside the measured one: model + base + N task vectors + workspace.
    assert row["plan_GB"] is not None and row["plan_GB"] >= row["resident_GB"] > 0
