"""The memory plan of every paper-scale preset on the hardware its description states.

``stepdistill plan`` (``stepdistill.plan.plan_config``) for each preset below, teachers sized from the
architectures recorded in ``stepdistill/architectures.py`` (the hub ids are not on this machine;
nothing is downloaded or loaded).  The stated hardware is transcribed from each preset's description
(``HARDWARE``); every preset carries a header comment with the summary this script prints, and
``tests/test_plan.py`` checks that the headers and ``benchmarks/results/preset_plans.json`` agree.

Reproduce with::

    OMP_NUM_THREADS=1 python benchmarks/preset_plans.py [--fast]   # --fast: no lever search
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from common import git_commit  # noqa: E402  (benchmarks/common.py)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "preset_plans.json"

#: preset -> (GPUs, memory per GPU, hardware as the description states it)
HARDWARE = {
    "sd15/dmd2": (64, "80GB", "64x A100-80GB"),
    "sd21/vsd": (8, "80GB", "8x A100-80GB"),
    "sdxl/dmd2_1step": (64, "80GB", "64x A100-80GB"),
    "sdxl/dmd2_4step": (64, "80GB", "64x A100-80GB"),
    "sdxl/disback_dmd2": (64, "80GB", "64x A100-80GB"),
    "sd3/dmd2": (8, "80GB", "8-16x A100/H100-80GB (planned at 8)"),
    "imagenet/msd_dit": (32, "80GB", "4x8 A100-80GB"),
    "llamagen/dd": (8, "80GB", "8x A800-80GB"),
    "var/dd": (8, "80GB", "8x A800-80GB"),
    "flux/dmd2_lora": (8, "80GB", "8x H100-80GB"),
}


def summary(row: dict) -> str:
    """The one-line plan summary each preset's header carries."""
    verdict = "fits" if row["fits"] else "does NOT fit"
    return (f"plan: {row['total_per_gpu_gb']:.1f} GB per GPU (of {row['usable_gb']:.1f} GB usable) on "
            f"{row['hardware']}, sharding={row['sharding']}: {verdict}")


def main() -> None:
    args_fast = "--fast" in sys.argv  # no lever search (one estimate per preset)
    from stepdistill.config import list_presets
    from stepdistill.plan import plan_config

    meta = {"benchmark": "preset_plans", "command": "OMP_NUM_THREADS=1 python benchmarks/preset_plans.py" + (" --fast" if args_fast else ""),
            "commit": git_commit(dirty_paths=("stepdistill/plan.py", "stepdistill/architectures.py", "configs")),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    rows = []
    available = set(list_presets())
    for preset, (gpus, mem, hw) in HARDWARE.items():
        if preset not in available:
            print(f"{preset}: not bundled, skipped", file=sys.stderr)
            continue
        p = plan_config(preset, gpus=gpus, gpu_memory=mem, suggest=not args_fast)
        row = {**meta, "preset": preset, "hardware": hw, "gpus": gpus, "gpu_memory": mem, "sharding": p.sharding,
               "teacher": p.teacher, "total_per_gpu_gb": round(p.total / 1e9, 2), "usable_gb": round(p.budget / 1e9, 2),
               "fits": p.fits, "peak_phase": p.peak_phase,
               "rows": {r.name: round(r.total / 1e9, 3) for r in p.rows},
               "levers": [{"lever": lv["lever"], "saving_gb": round(lv["saving"] / 1e9, 2)} for lv in p.levers],
               "path_to_fit": [{"lever": s["lever"], "total_after_gb": round(s["total_after"] / 1e9, 2)}
                               for s in p.path_to_fit],
               "notes": p.notes}
        row["summary"] = summary(row)
        rows.append(row)
        print(f"{preset}: {row['summary']}", flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rows, indent=2) + "\n")
    os.replace(tmp, RESULTS)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
