"""FSDP2 on 2 CPU processes (gloo) vs 1 replicated process: bytes per rank, step time, equal weights.

Tasks: VSD (full critic), DMD2 (TTUR 2, real-score CFG 3) and BOOT, each with an EMA of the
generator, on a tiny Stable-Diffusion-shaped teacher of random weights
(``stepdistill.testing.tiny_sd_pipeline_folder``: ``UNet2DConditionModel``, CLIP text encoder, VAE;
nothing downloaded), through the package's trainer; and ``toy``, the task of ``tests/test_fsdp.py``
(block-structured MLP generator and critic on the analytic ring teacher, width 256):

* ``sharded``: ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2`` with
  ``train.sharding: fsdp2`` (``training/sharded.py``: each trainable group -- generator, critic --
  ``fully_shard``-ed over the 2 processes; the frozen teacher replicated), per-process batch ``B``;
* ``replicated``: one process, ``train.grad_accum_steps: 2`` with batch ``B`` -- the same global
  batch and, by the trainer's per-(step, micro-batch, virtual rank) seeding, the same samples.

Measured: per-rank bytes of the trainable groups' parameters (local shards) and AdamW states
(``local_param_bytes`` / ``local_optimizer_bytes``, read after the first step that updated both groups),
their ratio to the replicated run (target <= 0.55x), the median wall time per step after the first
(``step_seconds``; both processes share the same 2 cores, so this is a correctness-scale timing, not a
speed-up measurement), the peak RSS of each process, and whether the final generator, critic and
generator-EMA weights equal the replicated run's (``torch.allclose`` rtol 1e-5, atol 1e-6; the max
absolute difference is recorded).  A run that fails is a row with ``ok: false`` and the first
exception a rank printed.  (Before ``training.sharded.group_roots`` VSD, DMD2 and BOOT failed here:
the group was the FSDP2 root, but it is called through ``denoise`` / ``denoise_at``, not
``forward``, so FSDP2's pre-forward all-gather of the root's parameters never ran; DMD2's critic
group is a ``ModuleDict``, which ``fully_shard`` refuses.  The roots are now the networks inside
each group; ``all_groups_sharded`` and the byte ratio show that every group is sharded.)

Rows go to ``benchmarks/results/fsdp_cpu.json`` (DESIGN.md section 8).  Reproduce with::

    python benchmarks/fsdp_cpu.py --steps 6
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import git_commit, proc_status_bytes  # noqa: E402  (benchmarks/common.py)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "fsdp_cpu.json"
BENCHMARK = "fsdp_cpu"
PROMPTS = ["a red cat", "a blue dog on grass", "a green bird", "a cat on a mat", "two dogs", "a yellow boat",
           "a small house", "a tree at night"]
#: algorithm -> params (full critics: a LoRA critic shares the teacher's frozen base and stays replicated)
ALGOS = {
    "vsd": {"critic": "full", "generator_timesteps": [899], "update_ratio": 2, "guidance_scale": 3.0},
    "dmd2": {"generator_timesteps": [899], "update_ratio": 2, "real_guidance_scale": 3.0},
    "boot": {"guidance_scale": 3.0},
    # the task of tests/test_fsdp.py (block-structured MLP generator and critic, analytic ring teacher)
    "toy": {"width": 256},
}




def child(algo: str, mode: str, teacher_dir: str, out: str, steps: int, batch: int) -> None:
    """One run (``mode`` sharded: this is one of the launched processes); writes rank<r>.json and
    rank<r>.safetensors (final full weights) to ``out``."""
    import torch
    from safetensors.torch import save_file

    from stepdistill.config import load_config
    from stepdistill.run import build_run
    from stepdistill.training.distributed import launch_state
    from stepdistill.training.loop import Trainer
    from stepdistill.training.sharded import (
        ShardedTrainer,
        is_sharded,
        local_optimizer_bytes,
        local_param_bytes,
    )

    torch.set_num_threads(1)
    prompts = Path(out) / "prompts.txt"
    prompts.parent.mkdir(parents=True, exist_ok=True)
    prompts.write_text("\n".join(PROMPTS) + "\n")
    train = {"output_dir": str(Path(out) / "run"), "max_steps": steps, "batch_size": batch,
             "grad_accum_steps": 1 if mode == "sharded" else 2, "sharding": "fsdp2" if mode == "sharded" else None,
             "mixed_precision": "no", "ema_decay": 0.9, "checkpoint_every_steps": 10**6, "sample_every_steps": 0,
             "num_sample_images": 2, "report_to": None, "progress": False, "log_every_steps": 1, "seed": 0,
             "resume": None, "dataset": f"prompts:{prompts}"}
    if algo == "toy":  # tests/fsdp_toy.py: its groups are called through forward()
        import importlib.util

        from stepdistill.config import TrainConfig
        from stepdistill.data.sources import ConditionSource

        spec = importlib.util.spec_from_file_location("fsdp_toy", ROOT / "tests" / "fsdp_toy.py")
        toy = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(toy)
        d = toy.FSDPToy(width=ALGOS["toy"]["width"])
        source = ConditionSource(d.gmm, seed=0)
        train_cfg = TrainConfig(**{k: v for k, v in train.items() if k != "dataset"})
    else:
        cfg = load_config({"teacher": {"kind": "diffusers", "path": teacher_dir, "guidance_scale": 3.0},
                           "algorithm": {"name": algo, "params": ALGOS[algo]}, "train": train})
        _, d = build_run(cfg)
        state = launch_state()
        source = d.build_source(cfg.train, rank=state.process_index, world=state.num_processes)
        train_cfg = cfg.train
    holder: dict = {}
    times: list[float] = []
    groups = d.trainable()

    def cb(done: int, logs: dict) -> None:
        if "bytes" not in holder and all(len(o.state) for o in t.optimizers.values()):
            holder["sharded"] = all(is_sharded(m) for m in groups.values())
            holder["after_step"] = done
            holder["bytes"] = {"params": local_param_bytes(list(groups.values())),
                               "optimizer": local_optimizer_bytes(list(t.optimizers.values()))}

    cls = ShardedTrainer if mode == "sharded" else Trainer
    t = cls(d, source, train_cfg, step_callback=cb)
    orig = t.train_step

    def timed(*a, **k):
        t0 = time.perf_counter()
        r = orig(*a, **k)
        times.append(time.perf_counter() - t0)
        return r

    t.train_step = timed
    res = t.run()
    rank = res["accelerator"].process_index
    groups = d.trainable()  # the sharded trainer gathers the groups back into new plain modules
    weights = {f"{g}.{k}": v.detach().clone() for g, m in groups.items() for k, v in m.state_dict().items()}
    weights.update({f"ema.{k}": v for k, v in (res["ema"] or {}).items()})
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(Path(out) / f"rank{rank}.safetensors"))
    info = {"rank": rank, "world": res["accelerator"].num_processes, "step": res["step"],
            "sharding": res.get("sharding"), "step_seconds": statistics.median(times[1:]) if len(times) > 1 else None,
            "first_step_seconds": times[0] if times else None, "peak_rss_bytes": proc_status_bytes("VmHWM"),
            "full_param_bytes": sum(p.numel() * p.element_size() for m in groups.values() for p in m.parameters()),
            **holder}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(info))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunFailed(Exception):
    pass


def _run(cmd: list[str], env: dict) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        lines = proc.stderr.splitlines() or ["no output"]
        # the first exception line a rank printed (the launcher's own ChildFailedError comes last)
        pat = re.compile(r"^(\[rank\d+\]: )?[\w.]*(Error|Exception)\b.*:")
        at = next((i for i, ln in enumerate(lines) if pat.match(ln) and "ChildFailedError" not in ln), len(lines) - 1)
        raise RunFailed(lines[at].strip()[:1000], lines[max(0, at - 24):at + 4])


def compare(algo: str, tmp: Path, walls: dict) -> dict:
    """The measured fields of one algorithm from its runs' rank files."""
    import torch
    from safetensors.torch import load_file

    ranks = [json.loads((tmp / "sharded" / f"rank{r}.json").read_text()) for r in (0, 1)]
    rep = json.loads((tmp / "replicated" / "rank0.json").read_text())
    w = [load_file(str(tmp / "sharded" / f"rank{r}.safetensors")) for r in (0, 1)]
    ref = load_file(str(tmp / "replicated" / "rank0.safetensors"))
    diffs = {k: float((w[0][k].float() - ref[k].float()).abs().max()) for k in ref if k in w[0]}
    close = w[0].keys() == ref.keys() and all(torch.allclose(w[0][k], ref[k], rtol=1e-5, atol=1e-6) for k in ref)
    rep_total = rep["bytes"]["params"] + rep["bytes"]["optimizer"]
    per_rank = []
    for r in ranks:
        b = r["bytes"]
        per_rank.append({"rank": r["rank"], "param_bytes": b["params"], "optimizer_bytes": b["optimizer"],
                         "param_ratio": round(b["params"] / rep["bytes"]["params"], 4),
                         "optimizer_ratio": round(b["optimizer"] / rep["bytes"]["optimizer"], 4),
                         "param_plus_optimizer_ratio": round((b["params"] + b["optimizer"]) / rep_total, 4),
                         "step_seconds": round(r["step_seconds"], 4), "peak_rss_bytes": r["peak_rss_bytes"]})
    worst = max(p["param_plus_optimizer_ratio"] for p in per_rank)
    return {
        "ok": True, "error": None, "sharding": ranks[0]["sharding"], "bytes_read_after_step": ranks[0]["after_step"],
        "all_groups_sharded": all(r["sharded"] for r in ranks),
        "replicated": {"param_bytes": rep["bytes"]["params"], "optimizer_bytes": rep["bytes"]["optimizer"],
                       "step_seconds": round(rep["step_seconds"], 4), "peak_rss_bytes": rep["peak_rss_bytes"],
                       "wall_seconds": walls["replicated"]},
        "sharded": {"per_rank": per_rank, "wall_seconds": walls["sharded"]},
        "param_plus_optimizer_ratio": worst, "target_ratio": 0.55, "meets_target": worst <= 0.55,
        "step_time_ratio": round(max(r["step_seconds"] for r in ranks) / rep["step_seconds"], 3),
        "weights_equal": bool(close), "weights_rtol": 1e-5, "weights_atol": 1e-6,
        "max_abs_weight_diff": max(diffs.values()) if diffs else None,
        "ranks_hold_equal_weights": all(torch.equal(w[0][k], w[1][k]) for k in w[0]), "tensors_compared": len(diffs),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=2, help="per-process batch (the replicated run: 2 micro-batches)")
    ap.add_argument("--output", default=str(RESULTS))
    ap.add_argument("--only", nargs="*", default=list(ALGOS), choices=list(ALGOS), help="algorithms (default: all)")
    ap.add_argument("--child", nargs=4, default=None, metavar=("ALGO", "MODE", "TEACHER", "OUT"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child, steps=args.steps, batch=args.batch)
        return 0
    if shutil.which("accelerate") is None:
        raise SystemExit("the accelerate CLI is not on PATH (pip install accelerate)")
    import torch

    from stepdistill.testing import tiny_sd_pipeline_folder

    command = "python benchmarks/fsdp_cpu.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    meta = {"benchmark": BENCHMARK, "command": command.strip(), "commit": git_commit(dirty_paths=("stepdistill",)),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "teacher": "tiny-sd (random)",
            "steps": args.steps, "batch_per_process": args.batch, "processes": 2, "backend": "gloo",
            "torch": torch.__version__}
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        root = Path(tmp_name)
        teacher = tiny_sd_pipeline_folder(root)
        env["HF_HOME"], env["STEPDISTILL_CACHE"] = str(root / "hf"), str(root / "cache")
        common = ["--steps", str(args.steps), "--batch", str(args.batch)]
        for algo in args.only:
            tmp = root / algo
            row = {**meta, "method": algo, "params": ALGOS[algo]}
            walls = {}
            try:
                t0 = time.perf_counter()
                _run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                      "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
                      __file__, *common, "--child", algo, "sharded", str(teacher), str(tmp / "sharded")], env)
                walls["sharded"] = round(time.perf_counter() - t0, 1)
                t0 = time.perf_counter()
                _run([sys.executable, __file__, *common, "--child", algo, "replicated", str(teacher),
                      str(tmp / "replicated")], env)
                walls["replicated"] = round(time.perf_counter() - t0, 1)
                row.update(compare(algo, tmp, walls))
                print(f"{algo}: per-rank params+optimizer {row['param_plus_optimizer_ratio']:.3f}x of replicated "
                      f"(target <= 0.55), step time {row['step_time_ratio']:.2f}x, weights equal: "
                      f"{row['weights_equal']} (max |diff| {row['max_abs_weight_diff']:.2e})", flush=True)
            except RunFailed as e:
                row.update(ok=False, error=e.args[0], traceback_lines=e.args[1])  # a list: not a table column
                print(f"{algo}: FAILED {e.args[0]}", flush=True)
            rows.append(row)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_suffix(".json.tmp")
    part.write_text(json.dumps(rows, indent=2) + "\n")
    os.replace(part, out)
    print(f"wrote {out}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
