"""``benchmarks/gpu_smoke.py`` on the CPU: one step of two cases (a text-to-image UNet teacher and the
AR teacher) through the real trainer, and the rows it writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_smoke.py"


def _run(tmp_path, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


def test_cpu_run_writes_one_row_per_case(tmp_path):
    out = tmp_path / "rows.json"
    res = _run(tmp_path, "--steps", "1", "--case", "dmd2-sd", "--case", "distilled_decoding-ar", "--no-export",
               "--no-isolate", "--output", str(out))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["case"] for r in rows] == ["dmd2-sd", "distilled_decoding-ar"]
    assert [r["algorithm"] for r in rows] == ["dmd2", "dd"]
    for r in rows:
        assert r["ok"] and r["error"] is None, r
        assert r["benchmark"] == "gpu_smoke" and r["device"] == "cpu" and r["steps_run"] == 1
        assert r["mixed_precision"] == "no" and r["teacher_dtype"] == "float32"
        assert r["memory_kind"] == "peak_rss_above_start" and r["peak_memory_bytes"] >= 0
        assert r["first_step_seconds"] > 0 and r["step_seconds"] is None  # one step: no steady-state median
        assert r["trainable_params"] > 0 and not r["exported"]
        assert r["command"].startswith("python benchmarks/gpu_smoke.py --device cpu")
        assert r["commit"] and not r["isolated"]
    assert "2/2 ok" in res.stdout


@pytest.mark.slow  # two more interpreter starts (~15-30 s on 2 shared cores)
def test_cpu_default_runs_each_case_in_its_own_process(tmp_path):
    out = tmp_path / "rows.json"
    res = _run(tmp_path, "--steps", "1", "--only", "distilled_decoding", "--no-export", "--output", str(out))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    assert row["ok"] and row["isolated"] and row["case"] == "distilled_decoding-ar"
    assert row["peak_memory_bytes"] > 0  # a fresh process: the case's own allocations show


def test_unknown_algorithm_is_refused(tmp_path):
    res = _run(tmp_path, "--only", "nosuch", "--output", str(tmp_path / "x.json"))
    assert res.returncode != 0 and "no case for --only nosuch" in res.stderr
    assert not (tmp_path / "x.json").exists()
