"""Every diffusion algorithm on the embedded text-to-image teacher (issue #14's rows), through
``stepdistill compare``: one step budget, the same 500 evaluation prompts and seeds 0, 1, 2, FID-attr
against the held-out digits and against the teacher's own DDIM-50 samples (``fid_teacher``, the
teacher-relative FID that ranks in ``benchmarks/results/t2i_yardstick.json``),
CLIP score, prompt accuracy, images/s; FID-vs-step curves every 250 steps (1 seed).

The run folder (checkpoints, exported pipelines) lives outside the repository (``--work``) and is
resumable: re-running skips finished methods and resumes an interrupted one from its checkpoint.
The small artefacts are copied to ``benchmarks/results/t2i_methods/`` (``compare.json`` rows,
``compare.md``, the plots and the sample sheet) after every method::

    python benchmarks/t2i_methods.py                                  # all presets (hours on 2 CPU cores)
    python benchmarks/t2i_methods.py --presets t2i/dmd2_1step t2i/vsd  # a subset
    python benchmarks/t2i_methods.py --work /tmp/t2i-methods --num-images 300
    python benchmarks/t2i_methods.py --presets t2i/msd_k4 --results benchmarks/results/t2i_methods_2

The teacher rows at the same N, seeds and prompts come from ``benchmarks/t2i_yardstick.py``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "t2i_methods"
PRESETS = ("t2i/dmd2_1step", "t2i/vsd", "t2i/boot", "t2i/dmd2_1step_lora", "t2i/dmd2_4step",
           "t2i/disback_dmd2", "t2i/msd_k4", "t2i/disback_vsd")
TEACHER_REF = ROOT / "benchmarks" / "results" / "t2i_teacher_ddim50_cfg2_seed9_stats.npz"
ARTEFACTS = ("compare.json", "compare.md", "fid_vs_step.png", "fid_vs_clip.png", "samples.png", "samples.json")


def copy_artefacts(work: Path, dest: Path) -> list[str]:
    dest.mkdir(parents=True, exist_ok=True)
    done = []
    for name in ARTEFACTS:
        if (work / name).is_file():
            shutil.copy2(work / name, dest / name)
            done.append(name)
    for curve in sorted((work / "runs").glob("*/curve.jsonl")):
        shutil.copy2(curve, dest / f"curve_{curve.parent.name}.jsonl")
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=list(PRESETS))
    p.add_argument("--work", default=str(Path.home() / "stepdistill-runs" / "t2i-methods"),
                   help="compare output folder (runs, checkpoints; outside the repository)")
    p.add_argument("--num-images", type=int, default=500)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--curve-every", type=int, default=250)
    p.add_argument("--steps", type=int, default=None, help="equal budget (default: the first preset's)")
    p.add_argument("--teacher-reference", default=str(TEACHER_REF),
                   help="teacher-relative FID reference (default: the teacher's DDIM-50 CFG 2 statistics)")
    p.add_argument("--teacher-steps", type=int, default=8,
                   help="also score the teacher (DDIM, the presets' CFG 4.5) at this many steps; 0 = no row")
    p.add_argument("--one-at-a-time", action="store_true",
                   help="run compare once per preset so artefacts are copied after each method")
    p.add_argument("--results", default=str(RESULTS),
                   help="where the small artefacts are copied (default: benchmarks/results/t2i_methods)")
    args = p.parse_args(argv)

    from stepdistill.compare import compare

    work = Path(args.work)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    command = "python benchmarks/t2i_methods.py " + " ".join(argv if argv is not None else sys.argv[1:])
    batches = [args.presets[: i + 1] for i in range(len(args.presets))] if args.one_at_a_time else [args.presets]
    for presets in batches:  # compare skips the finished ones, so each call adds one method
        compare("t2i", presets, work, steps=args.steps, num_images=args.num_images, seeds=seeds,
                curve_every=args.curve_every, command=command, teacher_reference=args.teacher_reference,
                teacher_steps=args.teacher_steps or None)
        print("copied", copy_artefacts(work, Path(args.results)), "to", args.results, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
