"""FSDP2 runs of the real algorithms (DMD2 with its GAN head, VSD with a full critic, BOOT) on the
tiny Stable-Diffusion teacher of :mod:`stepdistill.testing`, for tests/test_fsdp.py.

``python fsdp_sd.py ALGO TEACHER ROOT`` under ``accelerate launch --num_processes 2`` runs, with
``train.sharding: fsdp2``: A) ``STEPS`` steps into ``ROOT/a`` (a checkpoint every 2 steps), then B)
a copy of A's checkpoint 2 resumed to ``STEPS`` in ``ROOT/b``.  :func:`run` with ``sharded=False``
is the replicated reference: one process, 2 micro-batches (the same global batch and samples).
Each run writes ``rank<r>.json`` (bytes per rank, post-training checks) and ``rank<r>.safetensors``
(final full weights of every group and the EMA) into its folder.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

PROMPTS = ["a red cat", "a blue dog on grass", "a green bird", "a cat on a mat", "two dogs", "a yellow boat",
           "a small house", "a tree at night"]
#: algorithm -> params.  DMD2: TTUR 2, the GAN head (its critic group is a ModuleDict {score, gan_head},
#: the head reads the critic's bottleneck through a forward hook); VSD: a full (not LoRA) critic, called
#: through ``denoise``; BOOT: the generator called through ``denoise_at``.
#: ``dmd2-gan``'s GAN head is input-independent at initialisation on this teacher (d_real = d_fake to 1e-7):
#: its gradients are 1e-7 .. 1e-13 (the first conv's bias feeds a GroupNorm: exactly zero in exact
#: arithmetic), so Adam turns the last-ulp differences of any other summation order into lr-sized
#: steps -- the critic is compared to a looser tolerance there (tests/test_fsdp.py).
ALGOS = {
    "dmd2": {"generator_timesteps": [899], "update_ratio": 2, "real_guidance_scale": 3.0},
    "dmd2-gan": {"generator_timesteps": [899], "update_ratio": 2, "real_guidance_scale": 3.0,
                 "gan_weight_g": 0.5, "gan_weight_d": 0.5},
    "vsd": {"critic": "full", "generator_timesteps": [899], "update_ratio": 2, "guidance_scale": 3.0},
    "boot": {"guidance_scale": 3.0},
}
STEPS = 4
BATCH = 2  # per process; the replicated run: 2 micro-batches of BATCH


class RealImages:
    """The run's prompt source plus seeded random "real" images (3x16x16 in [-1, 1], the tiny VAE's
    input) drawn from ``(step, rank, world)`` only, so that 2 processes and 1 process x 2 micro-batches
    see the same batches (DMD2's GAN term needs real data; a prompt file has none)."""

    def __init__(self, inner):
        self.inner = inner
        self.prompts = getattr(inner, "prompts", None)

    def batch(self, step: int, rank: int, world: int, batch_size: int) -> dict:
        out = dict(self.inner.batch(step, rank, world, batch_size))
        g = torch.Generator().manual_seed(10_000 * step + 100 * world + rank)
        out["real"] = torch.rand(batch_size, 3, 16, 16, generator=g) * 2 - 1
        return out

    def __getattr__(self, name):
        return getattr(self.inner, name)


def run_config(algo: str, teacher: str, out: str | Path, steps: int, sharded: bool):
    from stepdistill.config import load_config

    prompts = Path(teacher).parent / "prompts.txt"  # one file for every run (it is hashed into checkpoints)
    if not prompts.exists():
        prompts.write_text("\n".join(PROMPTS) + "\n")
    train = {"output_dir": str(out), "max_steps": steps, "batch_size": BATCH,
             "grad_accum_steps": 1 if sharded else 2, "sharding": "fsdp2" if sharded else None,
             "mixed_precision": "no", "ema_decay": 0.8, "max_grad_norm": 1.0, "checkpoint_every_steps": 2,
             "checkpoints_total_limit": None, "sample_every_steps": 0, "num_sample_images": 2, "report_to": None,
             "progress": False, "log_every_steps": 1, "seed": 0, "resume": "latest", "dataset": f"prompts:{prompts}"}
    return load_config({"teacher": {"kind": "diffusers", "path": str(teacher), "guidance_scale": 3.0},
                        "algorithm": {"name": algo.split("-")[0], "params": ALGOS[algo]}, "train": train})


def run(algo: str, teacher: str, out: str | Path, steps: int = STEPS, sharded: bool = True) -> dict:
    """One training run through the package's trainer; writes ``rank<r>.json`` / ``.safetensors``."""
    from safetensors.torch import save_file

    from stepdistill.config import to_dict
    from stepdistill.run import build_run
    from stepdistill.training.distributed import launch_state
    from stepdistill.training.loop import Trainer
    from stepdistill.training.sharded import (
        ShardedTrainer,
        is_sharded,
        local_optimizer_bytes,
        local_param_bytes,
    )

    out = Path(out)
    cfg = run_config(algo, teacher, out, steps, sharded)
    _, d = build_run(cfg)
    state = launch_state()
    source = RealImages(d.build_source(cfg.train, rank=state.process_index, world=state.num_processes))
    holder: dict = {}

    def cb(done: int, logs: dict) -> None:
        if "bytes" not in holder and all(len(o.state) for o in t.optimizers.values()):
            groups = d.trainable()
            holder["sharded_during"] = all(is_sharded(m) for m in groups.values())
            holder["bytes"] = {"params": local_param_bytes(list(groups.values())),
                               "optimizer": local_optimizer_bytes(list(t.optimizers.values()))}

    t = (ShardedTrainer if sharded else Trainer)(d, source, cfg.train, run_config=to_dict(cfg), step_callback=cb)
    res = t.run()
    rank = res["accelerator"].process_index
    groups = d.trainable()
    weights = {f"{g}.{k}": v for g, m in groups.items() for k, v in m.state_dict().items()}
    weights.update({f"ema.{k}": v for k, v in (res["ema"] or {}).items()})
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(out / f"rank{rank}.safetensors"))
    plain = not any(is_sharded(m) for m in d.modules())
    info = {"world": res["accelerator"].num_processes, "step": res["step"], "sharding": res.get("sharding"),
            "plain_after": plain, "full_param_bytes": sum(p.numel() * p.element_size() for m in groups.values()
                                                          for p in m.parameters()), **holder}
    if algo.startswith("dmd2"):  # the critic the algorithm calls is the group's (gathered) critic
        info["critic_is_group_score"] = d.critic is d.critic_group["score"]
    # the trained modules still work after the run: one critic loss (DMD2: through the GAN head's
    # bottleneck hook) on a fixed batch, the same on every rank (plain modules, no collective)
    if plain:
        phase = "critic" if "critic" in groups else "generator"
        batch = source.batch(0, 0, 1, BATCH)
        torch.manual_seed(123)
        with torch.no_grad():
            info["post_loss"] = float(d.loss(batch, 3, phase, {}).loss)
    (out / f"rank{rank}.json").write_text(json.dumps(info))
    return info


def main(algo: str, teacher: str, root: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    root_p = Path(root)
    run(algo, teacher, root_p / "a")
    # B: resume A's checkpoint at step 2 in a fresh folder
    if dist.get_rank() == 0:
        src = root_p / "a" / "checkpoints" / "checkpoint-0000002"
        shutil.copytree(src, root_p / "b" / "checkpoints" / src.name)
    dist.barrier()
    run(algo, teacher, root_p / "b")


if __name__ == "__main__":
    main(*sys.argv[1:4])
