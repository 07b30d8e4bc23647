"""DisBack vs its base method on the embedded digits teacher: FID against generator iterations and
against wall time with the recording stage included (issue #7).

    # 1. train the four students (same seeds, same generator-stage budget; two processes, one core each)
    OMP_NUM_THREADS=1 python benchmarks/digits_onestep.py --skip-teacher --methods dmd2 vsd \\
        --work-dir runs/bench-disback --curve-images 1000 &
    OMP_NUM_THREADS=1 python benchmarks/digits_onestep.py --skip-teacher --methods disback_dmd2 disback_vsd \\
        --work-dir runs/bench-disback --curve-images 1000
    # 2. compare (reads their rows from benchmarks/results/digits_onestep.json; re-scores each run's
    #    final generator with 3 more sampling seeds to show the evaluation noise)
    python benchmarks/digits_disback.py --work-dir runs/bench-disback --eval-seeds 3

Curves are FID-digits at N = 1000 (the curve's own N; never mixed with another N) evaluated every
200 training steps.  The x-axis of the first figure counts *generator-stage* steps: DisBack's
recording steps (critic-only, generator frozen) are not counted there, so both methods get the same
generator budget.  The second figure puts the same points against training seconds (evaluation
time excluded), which *includes* DisBack's recording stage.

Variants (rows named ``disback-<base>-*``, e.g. ``disback-vsd-geometric`` from the preset
digits/disback_vsd_geometric) are compared with the same base and drawn in the same panel.

Targets: DisBack reaches the base method's final curve FID in <= 0.5x the base's generator steps,
and its final FID (the row's FID) is not worse.  Writes digits_disback.json, digits_disback.png
(iterations) and digits_disback_walltime.png (seconds) in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
NAME = "digits_disback"
BASES = ("dmd2", "vsd")


def first_reaching(curve: list, target: float, axis: int) -> float | None:
    """Axis value (0 = generator steps, 2 = seconds) of the first curve point with FID <= target."""
    for point in curve:
        if point[1] <= target:
            return point[axis]
    return None


def compare(rows: dict[str, dict], base: str, variant: str) -> dict:
    b, d = rows[base], rows[variant]
    if len(b["curve"][0]) < 3 or len(d["curve"][0]) < 3:
        raise SystemExit(f"rows for {base} have no per-point seconds: re-run step 1 of this script's docstring")
    target = b["curve"][-1][1]  # the base's final curve FID (same N as every curve point)
    base_steps = b["curve"][-1][0]
    steps = first_reaching(d["curve"], target, 0)
    secs = first_reaching(d["curve"], target, 2)
    base_secs = first_reaching(b["curve"], target, 2)
    out = {
        "benchmark": NAME, "teacher": "digits", "method": f"{variant} vs {base}", "curve_metric": b.get("curve_metric"), "base_final_curve_fid": target,
        "base_generator_steps": base_steps, "base_seconds_to_final": base_secs,
        "disback_steps_to_base_final": steps,
        "steps_ratio": round(steps / base_steps, 3) if steps is not None else None,
        "disback_seconds_to_base_final": secs,
        "seconds_ratio": round(secs / base_secs, 3) if secs is not None and base_secs else None,
        "base_fid": b["fid"], "disback_fid": d["fid"], "fid_metric": b["metric"],
        "base_train_seconds": b["train_seconds"], "disback_train_seconds": d["train_seconds"],
    }
    out["target_steps_met"] = out["steps_ratio"] is not None and out["steps_ratio"] <= 0.5
    out["target_final_met"] = d["fid"] <= b["fid"]
    out["commit"] = ", ".join(sorted({b.get("commit", "")[:10], d.get("commit", "")[:10]}))
    out["notes"] = "students trained by the two digits_onestep.py commands in the docstring of benchmarks/digits_disback.py"
    return out


def eval_spread(work_dir: Path, method: str, seeds: int) -> dict:
    """FID of the run's final generator under ``seeds`` different sampling seeds (N1000 each): the
    evaluation noise, not the training-seed noise (that would need re-training)."""
    import statistics

    import torch

    from stepdistill.eval import evaluate_generator
    from stepdistill.run import load_run
    from stepdistill.training import load_checkpoint_weights

    sys.path.insert(0, str(ROOT))
    from digits_onestep import noise_from, student_forward, to_uint8

    _, ckpt, _, distiller = load_run(work_dir / method.replace("-", "_"))
    distiller.generator_for_export().load_state_dict(load_checkpoint_weights(ckpt, "generator"))

    def gen_fn(gens, labels):
        z = noise_from(gens, (1, 8, 8))
        with torch.no_grad():
            return to_uint8(student_forward(distiller, z, labels))

    fids = [evaluate_generator(gen_fn, "digits", "digits", num_images=1000, num_classes=10, seed=1000 + k,
                               progress=False)["fid"] for k in range(seeds)]
    return {"checkpoint": ckpt.name, "fids": [round(f, 3) for f in fids], "mean": round(statistics.mean(fids), 3),
            "std": round(statistics.stdev(fids), 3) if len(fids) > 1 else None}


def node_path_fractions(run: Path, n: int = 256, seed: int = 0) -> list[float] | None:
    """Where each recorded node sits between the teacher (0) and the last node (1), measured in
    function space: mean |D_node - D_teacher| on noised samples of the *initial* generator (the
    distribution recording fitted), divided by the same gap for the last node.  None for runs with a
    regression warm-start (their initial generator is not kept)."""
    import torch
    from safetensors.torch import load_file

    from stepdistill.algorithms import build
    from stepdistill.config import load_config
    from stepdistill.run import build_teacher

    cfg = load_config(str(run / "config.yaml"))
    teacher = build_teacher(cfg.teacher)
    d = build(cfg.algorithm.name, teacher, cfg.algorithm.params)  # a fresh generator = the initial one
    if d.regression_steps:  # recording fitted the *regressed* generator, which no checkpoint keeps
        return None
    files = json.loads((run / "disback_nodes" / "nodes.json").read_text())["nodes"]
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    cond = teacher.encode_conditions(labels)
    gen = d.generator_for_export()
    with torch.no_grad():
        x0 = gen(torch.randn((n, *gen.sample_shape), generator=g), cond)
        idx = torch.randint(20, 981, (n,), generator=g)
        sigma = teacher.sigmas[idx]
        xt = teacher.add_noise(x0, sigma, torch.randn(x0.shape, generator=g))
        ref = teacher.denoise(xt, sigma, cond, 1.0)
        gaps = []
        for f in files:
            d.target.node_net.load_state_dict(load_file(str(run / "disback_nodes" / f["file"])), strict=False)
            gaps.append(float((d.target.node_net.denoise(xt, sigma, cond, 1.0) - ref).abs().mean()))
    return [round(x / gaps[-1], 3) for x in gaps]


def plot(rows: dict[str, dict], axis: int, xlabel: str, path: Path, teacher_best: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(BASES), figsize=(6 * len(BASES), 4.2))
    for ax, base in zip(axes, BASES):
        methods = [base] + sorted(m for m in rows if m.startswith(f"disback-{base}"))
        for method, color in zip(methods, ("C0", "C1", "C2", "C3")):
            curve = rows[method]["curve"]
            ax.plot([p[axis] for p in curve], [p[1] for p in curve], marker="o", color=color, label=method)
        if teacher_best is not None:
            ax.axhline(teacher_best, color="k", ls="--", lw=1, label="teacher best (multi-step, N1000)")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("FID-digits (N1000)")
        ax.set_title(f"DisBack over {base}, digits")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=str(RESULTS / "digits_onestep.json"), help="digits_onestep rows to read")
    p.add_argument("--work-dir", default="runs/bench-disback", help="run folders of step 1 (for --eval-seeds)")
    p.add_argument("--eval-seeds", type=int, default=0, help="re-score final generators with this many seeds")
    args = p.parse_args(argv)
    all_rows = json.loads(Path(args.rows).read_text())
    rows = {r["method"]: r for r in all_rows}
    missing = [m for b in BASES for m in (b, f"disback-{b}") if m not in rows]
    if missing:
        raise SystemExit(f"no rows for {missing} in {args.rows}: run step 1 of this script's docstring first")
    table = [compare(rows, b, v) for b in BASES for v in sorted(m for m in rows if m.startswith(f"disback-{b}"))]
    for t in table:
        run = Path(args.work_dir) / t["method"].split(" vs ")[0].replace("-", "_")
        if (run / "disback_nodes" / "nodes.json").exists():
            fr = node_path_fractions(run)
            t["node_path_fractions"] = " / ".join(f"{x:.2f}" for x in fr) if fr else None
            print(f"{t['method']}: nodes at {t['node_path_fractions']} of the way from the teacher to the last node")
    if args.eval_seeds:
        spreads: dict[str, dict] = {}
        for t in table:
            for key, method in (("base", t["method"].split(" vs ")[1]), ("disback", t["method"].split(" vs ")[0])):
                if method not in spreads:
                    spreads[method] = eval_spread(Path(args.work_dir), method, args.eval_seeds)
                spread = spreads[method]
                t[f"{key}_fid_seed_mean"], t[f"{key}_fid_seed_std"] = spread["mean"], spread["std"]
                t[f"{key}_fid_seeds"] = spread["fids"]
    command = "python benchmarks/digits_disback.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for t in table:
        t["command"] = command
        print(json.dumps(t), flush=True)
    teacher = [r["fid"] for r in all_rows if r["method"].startswith("teacher")]
    best = min(teacher) if teacher else None
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(json.dumps(table, indent=1))
    plot(rows, 0, "generator-stage steps (recording not counted)", RESULTS / f"{NAME}.png", best)
    plot(rows, 2, "training seconds (recording included)", RESULTS / f"{NAME}_walltime.png", best)
    import subprocess

    subprocess.run([sys.executable, str(ROOT / "make_tables.py")], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
