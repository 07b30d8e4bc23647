"""``stepdistill plan`` estimates vs measured peak memory of tiny CPU runs.

Teacher: a small Stable-Diffusion-shaped pipeline folder of random weights written by this script
(the package's tiny CLIP text encoder / tokenizer and VAE, a ``UNet2DConditionModel`` with 3
levels of 64-128-128 channels and cross-attention at every level, 32x32 latents, 16 prompt
tokens), so nothing is downloaded.  ``plan_config`` sizes each configuration from the folder's
config files (meta device); a fresh subprocess then loads the teacher, builds the algorithm and
runs training steps as the trainer does them (per group of ``phase(step)``: loss, backward, AdamW
step, then every gradient zeroed with ``set_to_none``; the EMA of the generator when configured).

Measured: the peak resident memory of the child process (Linux ``VmHWM``, reset through
``/proc/self/clear_refs`` once the teacher is loaded) minus its resident memory at that moment.
The baseline therefore contains the interpreter, torch and the loaded (frozen) teacher, and the
estimate compared with it is the plan's total **minus its frozen-teacher rows**: both sides count
what the run adds on top of a loaded teacher (trainable copies, gradients, AdamW moments, EMA,
activations).  One torch thread; ``gpus=1``, no sharding; fp32 (mixed precision off on CPU).
Each child runs twice: with glibc's default malloc (``peak_rss_bytes``: its heap keeps freed blocks
below a dynamic mmap threshold, so the high-water mark also holds memory no tensor uses any more)
and with ``MALLOC_MMAP_THRESHOLD_=65536`` (``peak_rss_fixed_mmap_bytes``: large blocks go back to the
OS when freed, closer to the *allocated* peak a GPU caching allocator reports).  ``ratio`` /
``within_25pct`` compare with the fixed-threshold run, ``ratio_default_malloc`` /
``within_25pct_default_malloc`` with the default one; both are recorded.  What the plan does not
model (no-grad forwards' and backward's working memory, autograd bookkeeping) shows up as the miss;
the target is within +-25% of the measured peak.  Misses are reported as they are, never tuned away.

Rows go to ``benchmarks/results/plan_check.json`` (DESIGN.md section 8).  Reproduce with::

    OMP_NUM_THREADS=1 python benchmarks/plan_check.py --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import git_commit, proc_status_bytes, reset_peak_rss  # noqa: E402  (benchmarks/common.py)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "plan_check.json"
BENCHMARK = "plan_check"
PROMPTS = ["a red cat", "a blue dog on grass", "a green bird", "a cat on a mat", "two dogs", "a yellow boat",
           "a small house", "a tree at night"]
DMD2 = {"generator_timesteps": [899], "update_ratio": 1, "real_guidance_scale": 3.0}
#: name -> (algorithm, params, train overrides)
CONFIGS = {
    "dmd2": ("dmd2", {**DMD2}, {}),
    "dmd2+gan": ("dmd2", {**DMD2, "gan_weight_g": 0.01, "gan_weight_d": 0.01}, {}),
    "dmd2+gan_old": ("dmd2", {**DMD2, "gan_weight_g": 0.01, "gan_weight_d": 0.01, "no_grad_outside_phase": False,
                              "gan_stop_at_bottleneck": False}, {}),
    "dmd2+checkpointing": ("dmd2", {**DMD2, "gradient_checkpointing": ["generator", "critic"]}, {}),
    "dmd2+critic_lora": ("dmd2", {**DMD2, "critic_lora": {"rank": 8}}, {}),
    "dmd2+generator_lora": ("dmd2", {**DMD2, "generator_lora": {"rank": 8}}, {}),
    "dmd2+ema": ("dmd2", {**DMD2}, {"ema_decay": 0.99}),
    "dmd2+batch16": ("dmd2", {**DMD2}, {"batch_size": 16}),
    "vsd": ("vsd", {"generator_timesteps": [899], "lora_rank": 8}, {}),
    "boot": ("boot", {}, {}),
}
BATCH = 8


def write_teacher(folder: Path) -> Path:
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from stepdistill.testing import tiny_sd_components

    parts = tiny_sd_components(folder)
    torch.manual_seed(0)
    parts["unet"] = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(64, 128, 128), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    out = folder / "teacher"
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def run_config(name: str, folder: Path) -> dict:
    algo, params, train = CONFIGS[name]
    return {"teacher": {"kind": "diffusers", "path": str(folder), "guidance_scale": 3.0},
            "algorithm": {"name": algo, "params": params},
            "train": {"batch_size": BATCH, "mixed_precision": "no", **train}}




def child(name: str, folder: Path, steps: int) -> dict:
    import torch

    from stepdistill.algorithms import build
    from stepdistill.config import load_config
    from stepdistill.teachers.diffusion import DiffusersTeacher
    from stepdistill.training.ema import EMA

    cfg = load_config(run_config(name, folder))
    teacher = DiffusersTeacher.from_pretrained(str(folder), guidance_scale=3.0)
    if not reset_peak_rss():
        raise SystemExit("plan_check needs /proc/self/clear_refs to reset the peak RSS (Linux)")
    base = proc_status_bytes("VmRSS")
    torch.manual_seed(0)
    d = build(cfg.algorithm.name, teacher, cfg.algorithm.params)
    groups = d.trainable()
    opts = {g: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5) for g, m in groups.items()}
    ema = EMA(groups["generator"], cfg.train.ema_decay) if cfg.train.ema_decay is not None else None
    d.train()
    bs = cfg.train.batch_size
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for step in range(steps):
        cache: dict = {}
        b = {"raw_cond": [PROMPTS[(step * bs + i) % len(PROMPTS)] for i in range(bs)],
             "real": torch.rand(bs, 3, 64, 64, generator=g, device="cpu") * 2 - 1, "batch_size": bs}
        for group in d.phase(step):
            out = d.loss(b, step, group, cache)
            out.loss.backward()
            opts[group].step()
            if ema is not None and group == "generator":
                ema.update(groups["generator"])
            d.zero_grad(set_to_none=True)
    peak = proc_status_bytes("VmHWM") - base
    return {"config": name, "peak_rss_bytes": int(peak), "baseline_rss_bytes": int(base),
            "seconds": round(time.perf_counter() - t0, 2), "steps": steps,
            "trainable_params": {k: int(sum(p.numel() for p in m.parameters() if p.requires_grad))
                                 for k, m in groups.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="training steps per configuration")
    ap.add_argument("--only", nargs="*", default=None, help="configurations to run (default: all)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.folder), args.steps)))
        return
    from stepdistill.plan import plan_config

    names = args.only or list(CONFIGS)
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    command = "OMP_NUM_THREADS=1 python benchmarks/plan_check.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    meta = {"benchmark": BENCHMARK, "command": command.strip(),
            "commit": git_commit(dirty_paths=("stepdistill/plan.py", "stepdistill/algorithms", "stepdistill/training",
                                                "benchmarks/plan_check.py")),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_teacher(Path(tmp))
        for name in names:
            plan = plan_config(run_config(name, folder), gpus=1, gpu_memory="1TB", suggest=False)
            frozen = sum(r.total for r in plan.rows if r.name.startswith("teacher "))
            estimate = plan.total - frozen
            cmd = [sys.executable, __file__, "--child", name, "--folder", str(folder), "--steps", str(args.steps)]
            runs = []
            for extra in ({}, {"MALLOC_MMAP_THRESHOLD_": "65536"}):
                res = subprocess.run(cmd, capture_output=True, text=True, env={**env, **extra}, cwd=ROOT)
                if res.returncode != 0:
                    raise SystemExit(f"{name} failed:\n{res.stderr[-3000:]}")
                runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
            m = runs[0]
            m["peak_rss_fixed_mmap_bytes"] = runs[1]["peak_rss_bytes"]
            ratio = estimate / max(m["peak_rss_fixed_mmap_bytes"], 1)
            ratio_default = estimate / max(m["peak_rss_bytes"], 1)
            row = {**meta, **m, "algorithm": CONFIGS[name][0], "params": CONFIGS[name][1], "train": CONFIGS[name][2],
                   "batch": plan_batch(name), "estimate_bytes": int(estimate),
                   "estimate_breakdown": {r.name: int(r.total) for r in plan.rows if not r.name.startswith("teacher ")},
                   "plan_peak_phase": plan.peak_phase, "ratio": round(ratio, 3),
                   "within_25pct": bool(0.75 <= ratio <= 1.25), "ratio_default_malloc": round(ratio_default, 3),
                   "within_25pct_default_malloc": bool(0.75 <= ratio_default <= 1.25)}
            rows.append(row)
            print(f"{name:>22}: estimate {estimate / 2**20:7.1f} MiB  measured {m['peak_rss_fixed_mmap_bytes'] / 2**20:7.1f}"
                  f" MiB (default malloc {m['peak_rss_bytes'] / 2**20:7.1f})  ratio {ratio:.2f}"
                  f"{'' if row['within_25pct'] else ' (miss)'} / {ratio_default:.2f}"
                  f"{'' if row['within_25pct_default_malloc'] else ' (miss)'}", flush=True)
            _write(rows)  # after every row: a long run keeps what it measured
    print(f"wrote {RESULTS}")


def _write(rows: list) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmpf = RESULTS.with_suffix(".json.tmp")
    tmpf.write_text(json.dumps(rows, indent=2) + "\n")
    os.replace(tmpf, RESULTS)


def plan_batch(name: str) -> int:
    return int(CONFIGS[name][2].get("batch_size", BATCH))


if __name__ == "__main__":
    main()
