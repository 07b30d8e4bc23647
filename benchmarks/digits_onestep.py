"""Digits one-step benchmark: the embedded teacher at 1/2/4/10/50 steps (DDIM, DPM-Solver++)
beside one-step students (DMD2, VSD, BOOT, ...): FID-digits, class accuracy, images/s, training time,
and FID-vs-iteration curves.

    python benchmarks/digits_onestep.py                         # teacher rows + dmd2 vsd boot
    python benchmarks/digits_onestep.py --methods dmd2 --num-images 1000
    python benchmarks/digits_onestep.py --teacher-only

Writes benchmarks/results/digits_onestep.json (rows as DESIGN.md §8) and digits_onestep.png (FID vs
generator iteration), then regenerates BENCHMARKS.md.  Existing rows of methods not re-run are kept.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import git_commit  # noqa: E402  (benchmarks/common.py)

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
NAME = "digits_onestep"


def images_per_second(fn, n: int = 500, batch: int = 250) -> float:
    """Throughput of ``fn(z, labels) -> images`` on this machine (after one warm-up batch)."""
    labels = torch.arange(batch) % 10
    z = torch.randn(batch, 1, 8, 8)
    fn(z, labels)
    t0 = time.perf_counter()
    for _ in range(n // batch):
        fn(z, labels)
    return n / (time.perf_counter() - t0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def noise_from(gens, shape) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g) for g in gens])


def student_forward(distiller, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One-step generation; MSD routes each class to its student (one network evaluation per image)."""
    gen = distiller.generator_for_export()
    teacher = distiller.teacher
    if not isinstance(gen, list):
        return gen(z, teacher.encode_conditions(labels))
    out = torch.empty_like(z)
    route = torch.tensor(distiller.route)[labels]
    for k, g in enumerate(gen):
        idx = (route == k).nonzero().flatten()
        if len(idx):
            out[idx] = g(z[idx], teacher.encode_conditions(labels[idx]))
    return out


def teacher_rows(teacher, args, command, commit) -> list[dict]:
    from stepdistill.eval import evaluate_generator

    rows = []
    shape = teacher.sample_shape
    for sampler in ("ddim", "dpmsolver"):
        for steps in args.steps:
            def fn(gens, labels, sampler=sampler, steps=steps):
                z = noise_from(gens, shape)
                x = teacher.sample(cond=teacher.encode_conditions(labels), num_steps=steps, sampler=sampler, noise=z)
                return to_uint8(x)

            ev = evaluate_generator(fn, "digits", "digits", num_images=args.num_images, num_classes=10,
                                    progress=False)
            ips = images_per_second(lambda z, y, s=sampler, k=steps: teacher.sample(
                cond=teacher.encode_conditions(y), num_steps=k, sampler=s, noise=z))
            row = {"benchmark": NAME, "teacher": "digits", "method": f"teacher-{sampler}", "nfe": steps,
                   "fid": round(ev["fid"], 3), "fid_detector": "digits-classifier", "metric": ev["metric"],
                   "n_samples": args.num_images, "class_accuracy": round(ev["class_accuracy"], 4),
                   "images_per_s": round(ips, 1), "commit": commit, "command": command}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def student_row(method, args, command, commit) -> dict:
    from stepdistill.config import load_config
    from stepdistill.eval import compute_fid, evaluate_generator, get_detector
    from stepdistill.run import run_distillation

    out = Path(args.work_dir) / method
    overrides = [f"train.output_dir={out}", "train.resume=null", *args.override]
    if out.exists():
        import shutil

        shutil.rmtree(out)
    cfg = load_config(f"digits/{method}", overrides)
    det = get_detector("digits")
    holder: dict = {}
    curve: list[list[float]] = []

    def gen_fn(gens, labels):
        z = noise_from(gens, (1, 8, 8))
        with torch.no_grad():
            return to_uint8(student_forward(holder["distiller"], z, labels))

    eval_seconds = [0.0]

    def eval_fn(step: int, distiller) -> dict:
        # curve point: [generator-stage steps (DisBack's recording steps do not count), FID at
        # N = --curve-images, training seconds so far with recording included, evaluation excluded]
        t_eval = time.perf_counter()
        holder["distiller"] = distiller
        res = compute_fid(gen_fn, "digits", det, num_images=args.curve_images, num_classes=10, progress=False)
        gen_steps = getattr(distiller, "generator_steps", lambda s: s)(step)
        curve.append([gen_steps, round(res.fid, 3), round(t_eval - t0 - eval_seconds[0], 1)])
        print(f"  [{method}] step {step} (generator steps {gen_steps}): {res.metric} = {res.fid:.3f}", flush=True)
        eval_seconds[0] += time.perf_counter() - t_eval
        return {"fid": res.fid}

    t0 = time.perf_counter()
    result = run_distillation(cfg, eval_fn=eval_fn, eval_every_steps=args.curve_every)
    train_seconds = time.perf_counter() - t0 - eval_seconds[0]
    holder["distiller"] = result["distiller"]
    ev = evaluate_generator(gen_fn, "digits", det, num_images=args.num_images, num_classes=10, progress=False)
    gen = result["distiller"].generator_for_export()
    gen = gen[0] if isinstance(gen, list) else gen
    with torch.no_grad():
        ips = images_per_second(lambda z, y: student_forward(result["distiller"], z, y))
    row = {"benchmark": NAME, "teacher": "digits", "method": method.replace("_", "-"), "nfe": gen.num_steps,
           "fid": round(ev["fid"], 3), "fid_detector": "digits-classifier", "metric": ev["metric"],
           "n_samples": args.num_images, "class_accuracy": round(ev["class_accuracy"], 4), "images_per_s": round(ips, 1),
           "train_steps": cfg.train.max_steps, "train_seconds": round(train_seconds, 1),
           "curve_metric": f"FID-digits-N{args.curve_images}", "curve": curve, "commit": commit, "command": command}
    print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
    return row


def rescore_row(method, args, command, commit) -> dict:
    """Row for a finished run folder (``--rescore``): latest checkpoint, curve from its log.jsonl,
    training time from file times (config written at start -> last checkpoint)."""
    from stepdistill.eval import evaluate_generator
    from stepdistill.run import load_run
    from stepdistill.training import load_checkpoint_weights

    run = Path(args.work_dir) / method
    _, ckpt, _, distiller = load_run(run)
    for group, module in distiller.trainable().items():
        if group.endswith("generator"):
            module.load_state_dict(load_checkpoint_weights(ckpt, group))
    step = int(ckpt.name.split("-")[-1])

    def gen_fn(gens, labels):
        z = noise_from(gens, (1, 8, 8))
        with torch.no_grad():
            return to_uint8(student_forward(distiller, z, labels))

    ev = evaluate_generator(gen_fn, "digits", "digits", num_images=args.num_images, num_classes=10, progress=False)
    gen = distiller.generator_for_export()
    gen = gen[0] if isinstance(gen, list) else gen
    with torch.no_grad():
        ips = images_per_second(lambda z, y: student_forward(distiller, z, y))
    curve = [[r["step"], round(r["eval/fid"], 3)] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
             if "eval/fid" in r]
    curve.append([step, round(ev["fid"], 3)])
    seconds = ckpt.stat().st_mtime - (run / "config.yaml").stat().st_mtime
    return {"benchmark": NAME, "teacher": "digits", "method": method.replace("_", "-"), "nfe": gen.num_steps,
            "fid": round(ev["fid"], 3), "fid_detector": "digits-classifier", "metric": ev["metric"],
            "n_samples": args.num_images, "class_accuracy": round(ev["class_accuracy"], 4),
            "images_per_s": round(ips, 1), "train_steps": step, "train_seconds": round(seconds, 1), "curve": curve,
            "commit": commit, "command": command,
            "notes": "rescored from its run folder (the benchmark process was stopped after training)"}


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r.get("curve"):
            xs, ys = [p[0] for p in r["curve"]], [p[1] for p in r["curve"]]
            ax.plot(xs, ys, marker="o", label=r["method"])
    best = [r["fid"] for r in rows if r["method"].startswith("teacher")]
    if best:
        ax.axhline(min(best), color="k", ls="--", lw=1, label="teacher best (multi-step)")
    ax.set_xlabel("training step")
    ax.set_ylabel("FID-digits")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("digits: one-step students, FID vs iteration")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{NAME}.png", dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="*", default=["dmd2", "vsd", "boot"])
    p.add_argument("--teacher-only", action="store_true")
    p.add_argument("--skip-teacher", action="store_true", help="keep the existing teacher rows")
    p.add_argument("--steps", nargs="*", type=int, default=[1, 2, 4, 10, 50])
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--curve-images", type=int, default=500)
    p.add_argument("--curve-every", type=int, default=200)
    p.add_argument("--work-dir", default="runs/bench-digits")
    p.add_argument("--override", action="append", default=[], help="config override for every student run")
    p.add_argument("--rescore", nargs="*", default=[], help="score finished run folders WORK_DIR/METHOD instead of training")
    args = p.parse_args(argv)
    command = "python benchmarks/digits_onestep.py " + " ".join(argv if argv is not None else sys.argv[1:])
    commit = git_commit()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{NAME}.json"

    from stepdistill.run import ensure_embedded_teacher
    from stepdistill.teachers.diffusion import DiffusersTeacher

    teacher = DiffusersTeacher.from_pretrained(ensure_embedded_teacher())
    fresh_teacher = [] if args.skip_teacher else teacher_rows(teacher, args, command, commit)
    methods = [] if args.teacher_only or args.rescore else args.methods
    new: list[dict] = []
    rows = _merge(path, fresh_teacher, new)
    for m in args.rescore:
        new.append(rescore_row(m, args, command, commit))
        rows = _merge(path, fresh_teacher, new)
        _finish(path, rows)
    for m in methods:  # write after every method, so a long run keeps what it has measured
        new.append(student_row(m, args, command, commit))
        rows = _merge(path, fresh_teacher, new)
        _finish(path, rows)
    _finish(path, rows)
    return 0


def _merge(path: Path, fresh_teacher: list[dict], new: list[dict]) -> list[dict]:
    """Merge with the file as it is *now* (other benchmark processes may have written meanwhile)."""
    old = json.loads(path.read_text()) if path.exists() else []
    done = {r["method"] for r in new}
    keep = [r for r in old if not (r["method"].startswith("teacher") and fresh_teacher) and r["method"] not in done]
    return fresh_teacher + keep + new


def _finish(path: Path, rows: list[dict]) -> None:
    rows.sort(key=lambda r: (not r["method"].startswith("teacher"), r["method"], r["nfe"]))
    teacher_best = min(r["fid"] for r in rows if r["method"].startswith("teacher"))
    t50 = [r for r in rows if r["method"] == "teacher-ddim" and r["nfe"] == 50]
    for r in rows:
        r["fid_ratio_to_teacher_best"] = round(r["fid"] / teacher_best, 3)
        if t50 and r.get("images_per_s"):
            r["speedup_vs_50"] = round(r["images_per_s"] / t50[0]["images_per_s"], 1)
    path.write_text(json.dumps(rows, indent=1))
    plot(rows)
    subprocess.run([sys.executable, str(ROOT / "make_tables.py")], check=False)
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
