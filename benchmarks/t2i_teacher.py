"""Teacher rows for the coloured-MNIST text-to-image teacher: samplers x steps x CFG.

FID-attr (attribute judge features vs the held-out coloured digits), CLIP score (the separately
trained CLIP judge), prompt accuracy (all three attributes right) and images/s, for DDIM, DPM-Solver++
and Euler at 1/2/4/8/25/50 steps and CFG 1 / 2 / 4.5 / 7.5, plus the rows the issue's targets need
with several evaluation seeds, the data and VAE floors at the same N, and an FID-vs-CLIP plot::

    python benchmarks/t2i_teacher.py                       # everything (cached teacher; ~25 min on 2 cores)
    python benchmarks/t2i_teacher.py --parts grid --grid-n 100
    python benchmarks/t2i_teacher.py --parts targets floors --target-n 1000 --target-seeds 0,1,2
    python benchmarks/t2i_teacher.py --pipeline PIPE_FOLDER --parts grid --grid-n 8   # any SD folder

Rows (DESIGN.md section 8) are merged into ``benchmarks/results/t2i_teacher.json`` (a row replaces
the row with the same part / sampler / steps / CFG / N); the plot is
``benchmarks/results/t2i_teacher.png``.  The teacher is never trained here: without ``--pipeline``
the cached one (``stepdistill.t2i_teacher.ensure_t2i_teacher``) must exist.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from common import git_commit  # noqa: E402  (benchmarks/common.py)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "t2i_teacher.json"
PLOT = ROOT / "benchmarks" / "results" / "t2i_teacher.png"
BENCHMARK = "t2i_teacher"
SAMPLERS = ("ddim", "dpm++", "euler")
STEPS = (1, 2, 4, 8, 25, 50)
CFGS = (1.0, 2.0, 4.5, 7.5)


def _floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v.strip()]


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def teacher_folder(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    from stepdistill.t2i_teacher import t2i_teacher_dir

    folder = t2i_teacher_dir() / "pipeline"
    if not (folder / "model_index.json").is_file():
        raise SystemExit(f"the text-to-image teacher is not cached ({folder}); train it first with "
                         "python -c 'from stepdistill.t2i_teacher import ensure_t2i_teacher as e; e()'")
    return folder


def _round(v):
    return round(v, 6) if isinstance(v, float) else v


def row_from(res: dict, part: str, sampler: str, steps: int, cfg: float, command: str, commit: str,
             extra: dict | None = None) -> dict:
    keep = ("fid", "fid_std", "clip_score", "clip_score_std", "clip_cosine", "clip_cosine_std", "prompt_accuracy",
            "prompt_accuracy_std", "digit_accuracy", "digit_accuracy_std", "fg_accuracy", "bg_accuracy",
            "images_per_s", "images_per_s_std")
    row = {"benchmark": BENCHMARK, "teacher": "t2i-colored-mnist", "method": f"teacher-{sampler}", "part": part,
           "sampler": sampler, "nfe": steps * (1 if cfg == 1.0 else 2), "steps": steps, "cfg": cfg,
           **{k: _round(res[k]) for k in keep if k in res},
           "fid_detector": res["fid_detector"], "fid_detector_id": res["fid_detector_id"], "metric": res["metric"],
           "n_samples": res["n"], "eval_seeds": res["seeds"], "scheduler": res["scheduler"],
           "timestep_spacing": res.get("timestep_spacing"),
           "fid_per_seed": [_round(r["fid"]) for r in res["per_seed"]],
           "reference": res.get("reference"), "commit": commit, "command": command}
    row.update(extra or {})
    return row


def merge_rows(path: Path, rows: list[dict]) -> None:
    def key(r):
        return (r.get("part"), r.get("sampler"), r.get("steps"), r.get("cfg"), r.get("n_samples"),
                r.get("timestep_spacing"))

    old = json.loads(path.read_text()) if path.is_file() else []
    new_keys = {key(r) for r in rows}
    kept = [r for r in old if key(r) not in new_keys]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(kept + rows, indent=2) + "\n")
    os.replace(tmp, path)


def plot(path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in json.loads(path.read_text()) if r.get("part") == "grid"]
    if not rows:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, ykey, ylabel in ((axes[0], "clip_score", "CLIP score (judge)"), (axes[1], "prompt_accuracy",
                                                                              "prompt accuracy")):
        for sampler in SAMPLERS:
            for steps in sorted({r["steps"] for r in rows}):
                pts = sorted((r["cfg"], r["fid"], r.get(ykey)) for r in rows
                             if r["sampler"] == sampler and r["steps"] == steps and r.get(ykey) is not None)
                if len(pts) < 2 or steps not in (4, 8, 50):
                    continue
                ax.plot([p[2] for p in pts], [p[1] for p in pts], marker="o",
                        label=f"{sampler} {steps} steps", linestyle={"ddim": "-", "dpm++": "--", "euler": ":"}[sampler])
                for c, f, y in pts:
                    ax.annotate(f"{c:g}", (y, f), fontsize=6, alpha=0.7)
        ax.set_xlabel(ylabel)
        ax.set_ylabel("FID-attr (lower is better)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, ncol=1)
    n = rows[0]["n_samples"]
    fig.suptitle(f"coloured-MNIST teacher: FID vs CLIP / accuracy over CFG (labels), N={n} per point")
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", default=None, help="StableDiffusionPipeline folder (default: the cached teacher)")
    ap.add_argument("--parts", nargs="+", default=["grid", "targets", "floors", "plot"],
                    choices=["grid", "targets", "floors", "plot"])
    ap.add_argument("--samplers", default=",".join(SAMPLERS))
    ap.add_argument("--steps", default=",".join(map(str, STEPS)))
    ap.add_argument("--cfgs", default=",".join(f"{c:g}" for c in CFGS))
    ap.add_argument("--grid-n", type=int, default=200, help="images per grid point (one seed)")
    ap.add_argument("--grid-seeds", default="0")
    ap.add_argument("--target-n", type=int, default=1000, help="images per seed for the target rows")
    ap.add_argument("--target-seeds", default="0,1,2")
    ap.add_argument("--target-sampler", default="ddim")
    ap.add_argument("--target-steps", default="4,8,50")
    ap.add_argument("--target-cfg", type=float, default=None,
                    help="CFG of the target rows (default: the grid's best prompt accuracy at 8 steps, else 4.5)")
    ap.add_argument("--timestep-spacing", default=None, choices=["leading", "trailing", "linspace"],
                    help="override the folder's timestep spacing (SD 1.5: leading, whose 1-step DDIM starts at t=1)")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (small convolutions: 1 is often fastest)")
    ap.add_argument("--output", default=str(RESULTS))
    args = ap.parse_args(argv)

    import torch

    from stepdistill.eval.t2i import evaluate_t2i, t2i_floors

    torch.set_num_threads(args.threads)
    out = Path(args.output)
    command = "python benchmarks/t2i_teacher.py" + (" " + shlex.join(argv if argv is not None else sys.argv[1:])
                                                    if (argv or sys.argv[1:]) else "")
    commit = git_commit()
    folder = teacher_folder(args.pipeline)
    from stepdistill.eval.generate import load_pipeline

    pipe = load_pipeline(folder)
    base_sched = pipe.scheduler  # each run builds its stock scheduler from this one's config
    samplers = [s for s in args.samplers.split(",") if s]
    sched_kw = {"timestep_spacing": args.timestep_spacing} if args.timestep_spacing else {}

    def run(sampler, steps, cfg, n, seeds, **kw):
        pipe.scheduler = base_sched
        t = time.perf_counter()
        res = evaluate_t2i(pipe, None, num_images=n, seeds=seeds, num_inference_steps=steps, guidance_scale=cfg,
                           scheduler=sampler, batch_size=args.batch_size, scheduler_kwargs=sched_kw, **kw)
        print(f"{sampler:6s} steps {steps:2d} cfg {cfg:3g} N {n} x{len(seeds)}: FID {res['fid']:.2f}+-{res['fid_std']:.2f} "
              f"CLIP {res.get('clip_score', float('nan')):.2f} acc {res['prompt_accuracy']:.3f} "
              f"{res['images_per_s']:.1f} img/s ({time.perf_counter() - t:.0f}s)", file=sys.stderr, flush=True)
        return res

    if "grid" in args.parts:
        for steps in _ints(args.steps):  # cheap step counts of every sampler first: a cut-short run is still useful
            for sampler in samplers:
                rows = []
                for cfg in _floats(args.cfgs):
                    res = run(sampler, steps, cfg, args.grid_n, _ints(args.grid_seeds))
                    rows.append(row_from(res, "grid", sampler, steps, cfg, command, commit))
                merge_rows(out, rows)
    target_cfg = args.target_cfg
    if target_cfg is None and out.is_file():
        cands = [r for r in json.loads(out.read_text()) if r.get("part") == "grid" and r.get("steps") == 8
                 and r.get("sampler") == args.target_sampler and r.get("prompt_accuracy") is not None]
        target_cfg = max(cands, key=lambda r: (r["prompt_accuracy"], -r["fid"]))["cfg"] if cands else 4.5
    target_cfg = 4.5 if target_cfg is None else target_cfg
    seeds = _ints(args.target_seeds)
    if "targets" in args.parts:
        # the rows the targets need, several evaluation seeds; their images also give the
        # teacher-relative FID: each step count's seed-s images against the 50-step images of the next
        # seed (same prompts, other noise; 50 vs 50 is that FID's floor)
        from stepdistill.eval.fid import FeatureStats, frechet_distance
        from stepdistill.eval.judges import default_attribute_detector

        det = default_attribute_detector()
        steps_list = _ints(args.target_steps)
        ref_steps = max(steps_list)
        rows, feats = [], {}
        for steps in steps_list:
            res = run(args.target_sampler, steps, target_cfg, args.target_n, seeds, keep_images=True)
            feats[steps] = {s: det.features(x) for s, x in res.pop("_images").items()}
            rows.append(row_from(res, "targets", args.target_sampler, steps, target_cfg, command, commit))
        if len(seeds) > 1:
            for row, steps in zip(rows, steps_list):
                vals = []
                for i, s in enumerate(seeds):
                    a = FeatureStats.from_features(feats[steps][s])
                    r = FeatureStats.from_features(feats[ref_steps][seeds[(i + 1) % len(seeds)]])
                    vals.append(frechet_distance(a.mu, a.sigma, r.mu, r.sigma))
                row["fid_teacher_relative"] = _round(float(sum(vals) / len(vals)))
                row["fid_teacher_relative_std"] = _round(float(np.std(vals, ddof=1)))
                row["fid_teacher_relative_reference"] = (f"{args.target_sampler}-{ref_steps} cfg {target_cfg:g} "
                                                         "images of the next evaluation seed")
        res = run(args.target_sampler, 8, 1.0, args.target_n, seeds)
        rows.append(row_from(res, "targets", args.target_sampler, 8, 1.0, command, commit))
        merge_rows(out, rows)
    if "floors" in args.parts:
        t = time.perf_counter()
        fl = t2i_floors(folder, seeds=seeds, num_images=args.target_n)
        row = {"benchmark": BENCHMARK, "teacher": "t2i-colored-mnist", "method": "data", "part": "floors",
               "nfe": 0, "n_samples": fl["n"], "eval_seeds": fl["seeds"], "fid_detector": "t2i-attributes",
               "fid_detector_id": fl["fid_detector_id"], "reference": fl["reference"],
               **{k: _round(v) for k, v in fl.items() if k not in ("n", "seeds", "fid_detector_id", "reference",
                                                                   "reference_n")},
               "fid": _round(fl["train_images"]), "fid_std": _round(fl["train_images_std"]),
               "notes": "fid = training-split images vs reference; vae_* = through the teacher's VAE",
               "commit": commit, "command": command}
        print(f"floors ({time.perf_counter() - t:.0f}s): {json.dumps(row)}", file=sys.stderr)
        merge_rows(out, [row])
    if "plot" in args.parts and out.is_file():
        plot(out, PLOT if out == RESULTS else out.with_suffix(".png"))
    print(json.dumps({"output": str(out), "target_cfg": target_cfg}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
