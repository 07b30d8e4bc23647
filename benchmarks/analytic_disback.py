"""DisBack vs its base method on the analytic Gaussian-mixture teacher (exact distance to the target).

    python benchmarks/analytic_disback.py [--steps 800] [--seeds 0 1 2] [--score exact|learned]
                                          [--node-spacing uniform geometric]

Same seeds and the same number of *generator-stage* steps for base and DisBack (DisBack's recording
stage comes on top and is counted separately, in steps and seconds).  Rows go to
benchmarks/results/analytic_disback.json; the curves (exact mode distance vs step) to
analytic_disback.png.  "steps_to_base_final" is the first evaluated generator-stage step at which
the run is at least as close as the base method's final distance.

``--score exact`` (default): the teacher's score is the closed-form mixture score, correct
everywhere, so there is no score mismatch for DisBack to remove.  ``--score learned``: the teacher's
score is a network fitted on noised data only (accurate near the data, extrapolated elsewhere, like a
trained diffusion model), which is the situation DisBack's argument is about; distances are still
measured against the exact mixture.  Results go to analytic_disback[_learned].json/.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
NAME = "analytic_disback"


def run(method: str, base: str, steps: int, seed: int, every: int, work: Path, recording: int,
        score: str = "exact", spacing: str = "uniform") -> dict:
    from stepdistill.config import load_config
    from stepdistill.run import build_teacher, run_distillation

    out = work / f"{method}-s{seed}"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    cfg = load_config(f"analytic/{base}", [f"train.output_dir={out}", f"train.seed={seed}", "train.progress=false",
                                           "train.checkpoint_every_steps=100000", f"teacher.params.score={score}"])
    offset = 0
    if method.startswith("disback"):
        base_params = dict(cfg.algorithm.params)
        cfg.algorithm.name = "disback"
        cfg.algorithm.params = {"base": base, "base_params": base_params, "recording_steps": recording,
                                "num_nodes": 4, "switch_every_steps": max(1, steps // 8), "node_spacing": spacing}
        offset = recording
    cfg.train.max_steps = steps + offset
    teacher = build_teacher(cfg.teacher)  # for `distance` (exact in both modes)
    curve = []

    def eval_fn(step, distiller):
        if step < offset:
            return {}
        gen = distiller.generator_for_export()
        g = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            x = gen(torch.randn((2000, *gen.sample_shape), generator=g), None)
        d = teacher.distance(x)
        curve.append([step - offset, round(d["mode_dist"], 4), round(d["nll"], 4)])
        return {"mode_dist": d["mode_dist"]}

    torch.manual_seed(seed)  # build-time inits (critic head, LoRA) independent of earlier runs in this process
    t0 = time.perf_counter()
    result = run_distillation(cfg, export=False, eval_fn=eval_fn, eval_every_steps=every)
    seconds = time.perf_counter() - t0
    eval_fn(cfg.train.max_steps, result["distiller"])
    final = curve[-1]
    return {"benchmark": NAME + ("" if score == "exact" else f"_{score}"),
            "teacher": "analytic-ring8" + ("" if score == "exact" else f", {score} score"), "method": method, "nfe": 1, "seed": seed,
            "mode_dist": final[1], "nll": final[2], "train_steps": steps, "recording_steps": offset,
            "train_seconds": round(seconds, 1), "curve": curve}


def summarize(rows: list[dict], args) -> list[dict]:
    """One row per DisBack variant: paired-by-seed comparison with its base over all seeds."""
    out = []
    per = [r for r in rows if "seed" in r]
    for base in ("dmd2", "vsd"):
        b = {r["seed"]: r for r in per if r["method"] == base}
        for method in sorted({r["method"] for r in per if r["method"].startswith(f"disback-{base}")}):
            d = {r["seed"]: r for r in per if r["method"] == method}
            seeds = sorted(set(b) & set(d))
            reached = [d[s]["steps_to_base_final"] / args.steps for s in seeds if d[s]["steps_to_base_final"] is not None]
            out.append({
                "benchmark": f"{NAME}_summary" + ("" if args.score == "exact" else f"_{args.score}"),
                "teacher": "analytic-ring8" + ("" if args.score == "exact" else f", {args.score} score"),
                "method": f"{method} vs {base}", "seeds": len(seeds),
                "base_mode_dist_mean": round(sum(b[s]["mode_dist"] for s in seeds) / len(seeds), 3),
                "disback_mode_dist_mean": round(sum(d[s]["mode_dist"] for s in seeds) / len(seeds), 3),
                "disback_better_final": sum(d[s]["mode_dist"] < b[s]["mode_dist"] for s in seeds),
                "reached_base_final": len(reached),
                "reached_within_half_steps": sum(x <= 0.5 for x in reached),
                "commit": rows[0].get("commit"), "command": rows[0].get("command"),
            })
    for r in out:
        print(json.dumps(r), flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--recording", type=int, default=200)
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--work-dir", default="runs/bench-analytic-disback")
    p.add_argument("--node-spacing", nargs="+", choices=["uniform", "geometric"], default=["uniform"],
                   help="DisBack node spacing(s) to run; geometric rows are named disback-<base>-geometric")
    p.add_argument("--score", choices=["exact", "learned"], default="exact",
                   help="teacher score: closed form, or a network fitted on noised data only")
    p.add_argument("--summarize-only", action="store_true", help="recompute the summary rows of the saved JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    name = NAME + ("" if args.score == "exact" else f"_{args.score}")
    if args.summarize_only:
        rows = [r for r in json.loads((RESULTS / f"{name}.json").read_text()) if "seed" in r]
        args.steps = rows[0]["train_steps"]
        (RESULTS / f"{name}.json").write_text(json.dumps(rows + summarize(rows, args), indent=1))
        subprocess.run([sys.executable, str(ROOT / "make_tables.py")], check=False)
        return 0
    command = "python benchmarks/analytic_disback.py " + " ".join(argv if argv is not None else sys.argv[1:])
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    rows = []
    for base in ("dmd2", "vsd"):
        for seed in args.seeds:
            b = run(base, base, args.steps, seed, args.every, Path(args.work_dir), 0, args.score)
            ds = [run(f"disback-{base}" + ("" if sp == "uniform" else f"-{sp}"), base, args.steps, seed, args.every,
                      Path(args.work_dir), args.recording, args.score, sp) for sp in args.node_spacing]
            target = b["mode_dist"]
            for r in (b, *ds):
                hit = [s for s, md, _ in r["curve"] if md <= target]
                r["steps_to_base_final"] = hit[0] if hit else None
                r["fid"] = None
                r["commit"], r["command"] = commit, command
                print(json.dumps({k: v for k, v in r.items() if k != "curve"}), flush=True)
            rows += [b, *ds]
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows += summarize(rows, args)
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, base in zip(axes, ("dmd2", "vsd")):
        colors = {base: "C0", f"disback-{base}": "C1", f"disback-{base}-geometric": "C2"}
        for r in rows:
            if r["method"] in colors:
                xs, ys, _ = zip(*r["curve"])
                ax.plot(xs, ys, color=colors[r["method"]], alpha=0.7, label=f"{r['method']} seed {r['seed']}")
        ax.set_yscale("log")
        ax.set_xlabel("generator-stage step")
        ax.set_ylabel("exact mean distance to nearest mode (in mode stds)")
        ax.set_title(f"DisBack-{base} vs {base} (analytic ring, {args.score} score)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=110)
    subprocess.run([sys.executable, str(ROOT / "make_tables.py")], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
