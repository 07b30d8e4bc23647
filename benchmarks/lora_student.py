"""LoRA student vs full student on a small Stable-Diffusion-shaped teacher: trainable parameters and
peak training memory, as ratios measured in one run.

The teacher is a ``StableDiffusionPipeline`` folder of random weights (the package's tiny text
encoder / tokenizer / VAE with a larger ``UNet2DConditionModel``: 3 levels, 64-128-128 channels,
cross-attention at every level, 16x16 latents), so nothing is downloaded.  Each student kind runs
DMD2 (CFG 3 on the real score, TTUR 1:1) for ``--steps`` optimizer steps by hand (loss, backward,
AdamW) in its own subprocess:

* ``trainable_params``: parameters with ``requires_grad`` in the generator group;
* ``generator_state_bytes``: what the generator adds to the process: its parameters that are not
  the teacher's own tensors, their gradients and AdamW's two moments (counted from the live tensors
  after training, each storage once);
* ``peak_rss_bytes``: the process's peak resident memory over building the algorithm and training
  (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` after the teacher is loaded), minus the
  resident memory at that point -- the critic (a full fake-score copy in both kinds) is included.

Rows go to ``benchmarks/results/lora_student.json`` (DESIGN.md section 8): one per kind and one
``ratio`` row (LoRA / full).  Reproduce with::

    OMP_NUM_THREADS=1 python benchmarks/lora_student.py --steps 4
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
RESULTS = ROOT / "benchmarks" / "results" / "lora_student.json"
BENCHMARK = "lora_student"
LORA = {"rank": 8, "alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}


def make_teacher_folder(root: Path) -> Path:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from stepdistill.testing import tiny_sd_components

    parts = tiny_sd_components(root)
    import torch

    torch.manual_seed(0)
    parts["unet"] = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(64, 128, 128), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "teacher")
    return root / "teacher"


# -- worker ---------------------------------------------------------------------------------------




def worker(kind: str, folder: str, steps: int, batch: int) -> dict:
    import torch

    from stepdistill.algorithms import build
    from stepdistill.teachers.diffusion import DiffusersTeacher

    torch.manual_seed(0)
    teacher = DiffusersTeacher.from_pretrained(folder)
    prompts = ["a red seven", "a blue two on green", "the lower dog", "a cat"] * (batch // 4 + 1)
    batch_data = {"raw_cond": prompts[:batch]}
    teacher.encode_conditions(batch_data["raw_cond"])  # tokenizer / encoder warm, outside the measurement
    import gc

    gc.collect()
    reset = reset_peak_rss()
    base_rss = proc_status_bytes("VmRSS")
    params = {"generator_timesteps": [899], "real_guidance_scale": 3.0, "update_ratio": 1}
    if kind == "lora":
        params["generator_lora"] = dict(LORA)
    algo = build("dmd2", teacher, params)
    opts = {g: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
            for g, m in algo.trainable().items()}
    t0 = time.perf_counter()
    for step in range(steps):
        cache = {}
        for group in algo.phase(step):
            out = algo.loss(batch_data, step, group, cache)
            out.loss.backward()
            opts[group].step()
            opts[group].zero_grad(set_to_none=False)
    seconds = time.perf_counter() - t0
    peak = proc_status_bytes("VmHWM")
    gen = algo.trainable()["generator"]
    teacher_ptrs = {p.untyped_storage().data_ptr() for p in teacher.parameters()}
    seen, state = set(), 0

    def add(t):
        nonlocal state
        if t is None or not isinstance(t, torch.Tensor):
            return
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or ptr in teacher_ptrs:
            return
        seen.add(ptr)
        state += t.untyped_storage().nbytes()

    for p in gen.parameters():
        add(p)
        add(p.grad)
        for v in opts["generator"].state.get(p, {}).values():
            add(v)
    return {
        "kind": kind,
        "trainable_params": sum(p.numel() for p in gen.parameters() if p.requires_grad),
        "generator_params": sum(p.numel() for p in gen.parameters()),
        "teacher_unet_params": sum(p.numel() for p in teacher.model.parameters()),
        "generator_state_bytes": state,
        "peak_rss_bytes": peak - base_rss if reset else None,
        "peak_rss_reset": reset,
        "seconds_per_step": seconds / steps,
        "train_steps": steps,
        "batch_size": batch,
    }


# -- driver ---------------------------------------------------------------------------------------
def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print("ROW" + json.dumps(worker(args.worker[0], args.worker[1], args.steps, args.batch)))
        return []
    command = "OMP_NUM_THREADS=1 python benchmarks/lora_student.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_teacher_folder(Path(tmp))
        for kind in ("full", "lora"):
            proc = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--batch", str(args.batch),
                                   "--worker", kind, str(folder)], capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            row = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("ROW"))[3:])
            rows.append(row)
    full, lora = rows
    ratio = {
        "kind": "ratio",
        "trainable_params_ratio": lora["trainable_params"] / full["trainable_params"],
        "generator_state_bytes_ratio": lora["generator_state_bytes"] / full["generator_state_bytes"],
        "peak_rss_ratio": (lora["peak_rss_bytes"] / full["peak_rss_bytes"]
                           if full["peak_rss_bytes"] and lora["peak_rss_bytes"] else None),
        "seconds_per_step_ratio": lora["seconds_per_step"] / full["seconds_per_step"],
    }
    common = {"benchmark": BENCHMARK, "teacher": "small-sd-random (UNet 64-128-128, 16x16 latents)", "method": "dmd2",
              "nfe": 1, "lora": LORA, "commit": git_commit(dirty_paths=("stepdistill",)), "command": command,
              "load_average": os.getloadavg()[0]}
    out = [{**common, **r} for r in (*rows, ratio)]
    for r in out:
        print(json.dumps({k: r[k] for k in r if k not in ("command", "lora", "teacher")}))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(out, indent=2) + "\n")
    os.replace(tmp_out, args.out)
    return out


if __name__ == "__main__":
    main()
