"""Memory and compute levers of DMD2 on CPU: step time and peak memory, as ratios in one run.

Teacher: a small Stable-Diffusion-shaped model of random weights built in memory (the package's tiny
text encoder / tokenizer / VAE, a ``UNet2DConditionModel`` with 3 levels of 32-64-64 channels and
cross-attention at every level, 16x16 latents), so nothing is downloaded.  DMD2 runs with the GAN
term on (``gan_weight_g`` > 0, real latents drawn at random), TTUR 1:1 (every step updates the
generator, then the critic), by hand: loss, backward, AdamW, zero the gradients of every group
(as the trainer does).  Each configuration runs in its own fresh subprocess:

* ``old``: ``no_grad_outside_phase=False, gan_stop_at_bottleneck=False`` -- the behaviour before
  the levers (the generator phase materialises critic weight gradients, the GAN forwards run the
  critic's up-blocks);
* ``new``: the new defaults (``no_grad_outside_phase`` and ``gan_stop_at_bottleneck`` on);
* ``new+checkpointing``: also ``gradient_checkpointing: [generator, critic]``;
* ``new+lora_critic``: also ``critic_lora: {rank: 8}`` (the fake score shares the teacher's weights);
* ``new+bf16_teacher``: the frozen teacher in bfloat16;
* ``new+offload``: ``offload_frozen_parts()`` (on a CPU-only machine the parts are already in host
  memory: expected ratio ~1; the lever pays off on an accelerator).

Measured per configuration: ``step_cpu_seconds`` (median CPU time of the process per step over the
timed steps, after one warm-up step; with one torch thread this is the step's compute, and less
sensitive than wall time to other processes on a shared machine; ``step_seconds`` is the wall-time
median) and ``peak_rss_bytes``: the peak resident memory of the process over building the algorithm and
training (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` once the teacher is built),
minus the resident memory at that point.  Why RSS and not ``torch.profiler``'s memory profile or
``tracemalloc``: tracemalloc sees only Python allocations (torch's CPU tensors are invisible to
it); the profiler attributes tensor allocations to ops but its peak must be rebuilt from the event
timeline and it slows the steps it measures; the process's peak RSS in a fresh subprocess is what
a user runs out of, includes the allocator's caching, and costs nothing while measured.  Ratios
are configuration / ``old`` (``step_time_ratio`` from CPU time).

Rows go to ``benchmarks/results/levers_cpu.json`` (DESIGN.md section 8).  Reproduce with::

    OMP_NUM_THREADS=1 python benchmarks/levers_cpu.py --steps 4
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
RESULTS = ROOT / "benchmarks" / "results" / "levers_cpu.json"
BENCHMARK = "levers_cpu"
OLD = {"no_grad_outside_phase": False, "gan_stop_at_bottleneck": False}
CONFIGS = {
    "old": ({**OLD}, {}),
    "new": ({}, {}),
    "new+checkpointing": ({"gradient_checkpointing": ["generator", "critic"]}, {}),
    "new+lora_critic": ({"critic_lora": {"rank": 8}}, {}),
    "new+bf16_teacher": ({}, {"dtype": "bfloat16"}),
    "new+offload": ({}, {"offload": True}),
}
BASE = {"generator_timesteps": [899], "update_ratio": 1, "real_guidance_scale": 3.0, "gan_weight_g": 0.01,
        "gan_weight_d": 0.01}
PROMPTS = ["a red cat", "a blue dog on grass", "a green bird", "a cat on a mat", "two dogs", "a yellow boat",
           "a small house", "a tree at night"]


def make_teacher(tmp: Path, dtype: str = "float32", offload: bool = False):
    import torch
    from diffusers import UNet2DConditionModel

    from stepdistill.teachers.diffusion import DiffusersTeacher
    from stepdistill.testing import SD_SCHEDULER_CONFIG, tiny_sd_components

    parts = tiny_sd_components(tmp)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    if dtype != "float32":
        unet = unet.to(getattr(torch, dtype))
    t = DiffusersTeacher(unet, dict(SD_SCHEDULER_CONFIG), text_encoder=parts["text_encoder"],
                         tokenizer=parts["tokenizer"], vae=parts["vae"], guidance_scale=3.0, sample_shape=(4, 16, 16))
    return t.offload_frozen_parts() if offload else t








def child(name: str, steps: int, batch: int) -> dict:
    import statistics

    import torch

    from stepdistill.algorithms import build

    params, tkw = CONFIGS[name]
    with tempfile.TemporaryDirectory() as tmp:
        teacher = make_teacher(Path(tmp), **tkw)
        if not reset_peak_rss():
            raise SystemExit("levers_cpu needs /proc/self/clear_refs to reset the peak RSS (Linux)")
        base = proc_status_bytes("VmRSS")
        torch.manual_seed(0)
        d = build("dmd2", teacher, {**BASE, **params})
        groups = d.trainable()
        opts = {g: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
                for g, m in groups.items()}
        g = torch.Generator().manual_seed(0)
        times, cpu = [], []
        for step in range(steps + 1):
            cache: dict = {}
            b = {"raw_cond": [PROMPTS[(step * batch + i) % len(PROMPTS)] for i in range(batch)],
                 "real": torch.rand(batch, 3, 32, 32, generator=g, device="cpu") * 2 - 1, "batch_size": batch}
            t0, c0 = time.perf_counter(), time.process_time()
            for group in d.phase(step):
                out = d.loss(b, step, group, cache)
                out.loss.backward()
                opts[group].step()
                d.zero_grad(set_to_none=True)
            if step > 0:
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
        peak = proc_status_bytes("VmHWM") - base
        trainable = sum(p.numel() for m in groups.values() for p in m.parameters() if p.requires_grad)
    return {"config": name, "params": {**BASE, **params}, "teacher": tkw, "steps_timed": steps, "batch": batch,
            "step_seconds": round(statistics.median(times), 4),
            "step_cpu_seconds": round(statistics.median(cpu), 4), "peak_rss_bytes": int(peak),
            "trainable_params": int(trainable), "torch_threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="timed steps per configuration (after one warm-up)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--only", nargs="*", default=None, help="configurations to run (default: all)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch)))
        return
    names = args.only or list(CONFIGS)
    if "old" not in names:
        names = ["old", *names]
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for name in names:
        cmd = [sys.executable, __file__, "--child", name, "--steps", str(args.steps), "--batch", str(args.batch)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if res.returncode != 0:
            raise SystemExit(f"{name} failed:\n{res.stderr[-3000:]}")
        row = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{name:>20}: step {row['step_cpu_seconds']:.3f} s CPU ({row['step_seconds']:.3f} s wall)  "
              f"peak RSS +{row['peak_rss_bytes'] / 2**20:.1f} MiB", flush=True)
    old = rows[0]
    command = "OMP_NUM_THREADS=1 python benchmarks/levers_cpu.py " + " ".join(
        shlex.quote(a) for a in sys.argv[1:])
    meta = {"benchmark": BENCHMARK, "command": command.strip(), "commit": git_commit(dirty_paths=("stepdistill",)),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = []
    for r in rows:
        out.append({**meta, **r, "step_time_ratio": round(r["step_cpu_seconds"] / old["step_cpu_seconds"], 3),
                    "peak_rss_ratio": round(r["peak_rss_bytes"] / max(old["peak_rss_bytes"], 1), 3)})
        print(f"{r['config']:>20}: step time x{out[-1]['step_time_ratio']:.3f}, peak RSS x{out[-1]['peak_rss_ratio']:.3f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    os.replace(tmp, RESULTS)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
