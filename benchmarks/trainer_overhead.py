"""Trainer overhead: the same DMD2 step on a digits teacher through ``stepdistill.training.train``
and through a minimal hand-written loop (same forward / backward / clip / optimizer calls).

The teacher is the digits architecture (UNet2DModel, 0.7 M parameters, v-prediction) randomly
initialised in-process, so nothing is trained or cached first.  Each code version runs in its own
subprocess with ``PYTHONPATH`` pointing at its checkout, so the same script measures the trainer
before and after a restructure::

    git worktree add /tmp/before f0ed997 && git worktree add /tmp/after HEAD
    python benchmarks/trainer_overhead.py --before /tmp/before --after /tmp/after

Rows (``benchmarks/results/trainer_overhead.json``, DESIGN.md section 8): one per code version with
seconds per step through the trainer and through the hand loop and their ratio (target <= 1.10), in
wall time and in this process's CPU time (``overhead_cpu``, the steadier one on a shared machine),
and one ``bit_identical`` row: a short seeded DMD2 run (regression warm-start, TTUR, GAN head)
through ``train`` by each version, comparing every trained tensor.  The load average is recorded
with each row: timings on a shared machine are noisy, so the versions alternate over ``--rounds``,
trainer and hand loop alternate inside each run, and the fastest of each is kept.
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

from common import git_commit  # noqa: E402  (benchmarks/common.py)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "trainer_overhead.json"
BENCHMARK = "trainer_overhead"

TIMING = ["algorithm.params.regression_steps=0", "algorithm.params.critic_warmup_steps=0", "train.ema_decay=null"]
IDENTITY = ["algorithm.params.regression_steps=4", "algorithm.params.regression_pairs=32",
            "algorithm.params.critic_warmup_steps=2", "train.batch_size=16", "train.ema_decay=0.9"]


def _build(overrides: list[str]):
    import torch

    from stepdistill.algorithms import build
    from stepdistill.config import load_config
    from stepdistill.data.sources import build_source
    from stepdistill.teachers.diffusion import DiffusersTeacher
    from stepdistill.teachers.training import UNetSpec, build_scheduler, build_unet

    cfg = load_config("digits/dmd2", ["train.progress=false", "train.report_to=null", "train.sample_every_steps=0",
                                      "train.checkpoint_every_steps=0", "train.resume=null", *overrides])
    torch.manual_seed(0)
    spec = UNetSpec()
    teacher = DiffusersTeacher(build_unet(spec), dict(build_scheduler(spec).config), num_classes=spec.num_classes)
    torch.manual_seed(1)
    distiller = build("dmd2", teacher, cfg.algorithm.params)
    return cfg, distiller, build_source(cfg.train, teacher, needs_data=distiller.needs_data)


def _clock() -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds): CPU time is much less sensitive to other load."""
    return time.perf_counter(), time.process_time()


def _per_step(a: tuple[float, float], b: tuple[float, float], n: int) -> tuple[float, float]:
    return (b[0] - a[0]) / n, (b[1] - a[1]) / n


def _through_trainer(steps: int, warmup: int, out: str) -> tuple[float, float]:
    from stepdistill.training import train

    cfg, d, source = _build([*TIMING, f"train.max_steps={steps}", f"train.output_dir={out}"])
    stamps: dict[int, tuple[float, float]] = {}
    train(d, source, cfg.train, step_callback=lambda done, logs: stamps.__setitem__(done, _clock()))
    return _per_step(stamps[warmup], stamps[steps], steps - warmup)


def _by_hand(steps: int, warmup: int) -> tuple[float, float]:
    import torch

    cfg, d, source = _build([*TIMING, f"train.max_steps={steps}"])
    t = cfg.train
    lrs = d.lr_defaults()
    groups = d.trainable()
    params = {g: [p for p in m.parameters() if p.requires_grad] for g, m in groups.items()}
    opts = {g: torch.optim.AdamW(params[g], lr=lrs.get(g, t.default_lr), betas=tuple(t.adam_betas),
                                 weight_decay=t.weight_decay) for g in groups}
    begin = getattr(d, "on_step_begin", None)  # absent before the task contract
    t0 = None
    for step in range(steps):
        if step == warmup:
            t0 = _clock()
        if begin is not None:
            begin(step, True)
        batch = source.batch(step, 0, 1, t.batch_size)
        cache: dict = {}
        for group in d.phase(step):
            out = d.loss(batch, step, group, cache)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params[group], t.max_grad_norm)
            opts[group].step()
            d.zero_grad(set_to_none=True)
    return _per_step(t0, _clock(), steps - warmup)


def _identity(steps: int, out: str, weights: str) -> None:
    from safetensors.torch import save_file

    from stepdistill.training import train

    cfg, d, source = _build([*IDENTITY, f"train.max_steps={steps}", f"train.output_dir={out}"])
    result = train(d, source, cfg.train)
    state = {f"{g}.{k}": v.detach().contiguous().clone() for g, m in d.trainable().items()
             for k, v in m.state_dict().items()}
    state.update({f"ema.{k}": v.contiguous().clone() for k, v in (result["ema"] or {}).items()})
    save_file(state, weights)


def worker(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    times: dict[str, list[float]] = {"trainer": [], "hand": [], "trainer_cpu": [], "hand_cpu": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):  # interleaved, so a load spike hits both sides
            for key, (wall, cpu) in (("trainer", _through_trainer(args.steps, args.warmup, f"{tmp}/run{rep}")),
                                     ("hand", _by_hand(args.steps, args.warmup))):
                times[key].append(wall)
                times[f"{key}_cpu"].append(cpu)
        if args.identity_weights:
            _identity(args.identity_steps, f"{tmp}/identity", args.identity_weights)
    print(json.dumps(times))
    return 0


# ---------------------------------------------------------------------------------------------
# driver


def _run_version(code: Path, args, weights: Path | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--steps", str(args.steps), "--warmup",
           str(args.warmup), "--reps", str(args.reps), "--threads", str(args.threads), "--identity-steps",
           str(args.identity_steps)] + (["--identity-weights", str(weights)] if weights is not None else [])
    proc = subprocess.run(cmd, env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker for {code} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _compare(a: Path, b: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    sa, sb = load_file(str(a)), load_file(str(b))
    same_keys = sa.keys() == sb.keys()
    diffs = [float((sa[k].double() - sb[k].double()).abs().max()) for k in sa if k in sb]
    return {"identical": same_keys and all(torch.equal(sa[k], sb[k]) for k in sa),
            "tensors": len(sa), "max_abs_diff": max(diffs) if diffs else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default=None, help="checkout of the code before (e.g. a git worktree)")
    ap.add_argument("--after", default=None,
                    help="checkout of the code after (default: this working tree; a clean worktree of a commit "
                         "keeps uncommitted edits out)")
    ap.add_argument("--steps", type=int, default=40, help="DMD2 steps per timed run (batch 64, TTUR 5)")
    ap.add_argument("--warmup", type=int, default=5, help="first steps not timed")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions (the fastest is kept)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--rounds", type=int, default=2, help="times each version runs (alternating)")
    ap.add_argument("--identity-steps", type=int, default=20)
    ap.add_argument("--note", default=None, help="a remark stored in every row")
    ap.add_argument("--output", default=str(RESULTS))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--identity-weights", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)

    command = "python benchmarks/trainer_overhead.py" + (" " + shlex.join(argv if argv is not None else sys.argv[1:])
                                                         if (argv or sys.argv[1:]) else "")
    after = Path(args.after) if args.after else ROOT
    versions = [("after", after)] + ([("before", Path(args.before))] if args.before else [])
    rows, weights = [], {}
    times = {label: {"trainer": [], "hand": [], "trainer_cpu": [], "hand_cpu": []} for label, _ in versions}
    loads = {label: [] for label, _ in versions}
    seconds = {label: 0.0 for label, _ in versions}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):  # versions alternate, so a load change hits both
            for label, code in versions:
                loads[label].append(os.getloadavg()[0])
                weights[label] = Path(tmp) / f"{label}.safetensors"
                t0 = time.perf_counter()
                got = _run_version(code, args, weights[label] if rnd == 0 else None)
                seconds[label] += time.perf_counter() - t0
                for k in times[label]:
                    times[label][k] += got[k]
        for label, code in versions:
            t = times[label]
            trainer, hand = min(t["trainer"]), min(t["hand"])
            trainer_cpu, hand_cpu = min(t["trainer_cpu"]), min(t["hand_cpu"])
            ratios = [a / b for a, b in zip(t["trainer"], t["hand"])]
            rows.append({
                "benchmark": BENCHMARK, "teacher": "digits (random init)", "method": "dmd2", "code": label,
                "commit": git_commit(code), "trainer_step_s": round(trainer, 5), "hand_loop_step_s": round(hand, 5),
                "overhead": round(trainer / hand, 4), "target_overhead": 1.10,
                "trainer_cpu_step_s": round(trainer_cpu, 5), "hand_loop_cpu_step_s": round(hand_cpu, 5),
                "overhead_cpu": round(trainer_cpu / hand_cpu, 4),
                "overhead_median_of_pairs": round(sorted(ratios)[len(ratios) // 2], 4),
                "trainer_step_s_all": [round(x, 5) for x in t["trainer"]],
                "hand_loop_step_s_all": [round(x, 5) for x in t["hand"]],
                "trainer_cpu_step_s_all": [round(x, 5) for x in t["trainer_cpu"]],
                "hand_loop_cpu_step_s_all": [round(x, 5) for x in t["hand_cpu"]],
                "train_steps": args.steps, "timed_steps": args.steps - args.warmup, "batch_size": 64,
                "threads": args.threads, "loadavg_1min_at_start": [round(x, 2) for x in loads[label]],
                "seconds": round(seconds[label], 1), "command": command,
            })
            print(f"{label}: trainer {trainer * 1e3:.1f} ms/step, hand loop {hand * 1e3:.1f} ms/step, "
                  f"overhead {trainer / hand:.3f}x wall, {trainer_cpu / hand_cpu:.3f}x CPU time "
                  f"(median of wall pairs {rows[-1]['overhead_median_of_pairs']:.3f}, "
                  f"load {loads[label]})", file=sys.stderr)
        if args.before:
            cmp = _compare(weights["before"], weights["after"])
            rows.append({"benchmark": BENCHMARK, "check": "bit_identical", "method": "dmd2",
                         "teacher": "digits (random init)", "train_steps": args.identity_steps,
                         "compare": "every trained tensor and the EMA after a seeded run, before vs after",
                         **cmp, "commit_before": git_commit(Path(args.before)), "commit_after": git_commit(after),
                         "command": command})
            print(f"bit-identical weights before vs after: {cmp['identical']} ({cmp['tensors']} tensors, "
                  f"max |diff| {cmp['max_abs_diff']})", file=sys.stderr)
    if args.note:
        for r in rows:
            r["notes"] = args.note
    out = Path(args.output)
    old = json.loads(out.read_text()) if out.is_file() else []
    kept = [r for r in old if r.get("benchmark") != BENCHMARK]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(kept + rows, indent=2) + "\n")
    os.replace(tmp_out, out)
    print(json.dumps({"rows": len(rows), "output": str(out)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
