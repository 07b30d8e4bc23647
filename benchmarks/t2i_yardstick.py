"""Can the text-to-image yardstick rank?  Teacher DDIM samples at 4 / 8 / 50 steps scored by several
FID variants, each beside its own floor at the same N, with the spread over evaluation seeds.

Issue #13's target: teacher FID at 4, 8 and 50 steps (best CFG) separated by more than 3
evaluation-seed standard deviations, and the teacher's best FID more than 3 std above the floor at
the same N ("if this fails, change the metric (features, N), not the teacher").  The first
measurement (FID-attr against the held-out digits, N=200) missed: 8 vs 50 steps 1.4 std apart, and
the best FID at the VAE-reconstruction floor.  This script measures the candidates on the *same*
images (generated once, cached as uint8 arrays outside the repository):

* ``attr``: FID-attr (attribute judge, 64-d pre-ReLU) against the held-out coloured digits (the
  default of ``stepdistill eval t2i``); floor: the held-out digits re-coloured.
* ``attr-vae``: the same features against the held-out digits *after a round trip through the
  teacher's VAE* (``reference="vae"`` of ``stepdistill eval t2i``).  Every latent model of this VAE,
  teacher and students alike, decodes through the same blur; this reference removes that shared
  offset so the FID measures the latent model.  Floor: re-coloured held-out digits through the VAE.
* ``teacher-rel`` (with ``--teacher-ref-seed``): against the teacher's own DDIM-50 samples at another
  evaluation seed (distillation fidelity); its floor is DDIM-50 itself.

::

    python benchmarks/t2i_yardstick.py                         # N=500, seeds 0,1,2, DDIM 4/8/50, CFG 2 and 4.5
    python benchmarks/t2i_yardstick.py --n 1000 --cfgs 2.0     # larger N, one guidance scale
    python benchmarks/t2i_yardstick.py --teacher-ref-seed 9    # add the teacher-relative variant

Rows go to ``benchmarks/results/t2i_yardstick.json`` (replaced per variant / steps / CFG / N).
Images are cached in ``~/.cache/stepdistill/yardstick`` (``--cache``) so a re-run only scores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from common import git_commit  # noqa: E402  (benchmarks/common.py)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "t2i_yardstick.json"
BENCHMARK = "t2i_yardstick"


def _list(s: str, cast):
    return [cast(v) for v in s.split(",") if v.strip()]


def cached_samples(pipe, steps: int, cfg: float, seed: int, n: int, cache: Path, batch_size: int):
    """uint8 (n, 3, 32, 32) DDIM samples of the teacher for evaluation seed ``seed`` (the eval
    harness's seed rule and prompt order), generated once and cached; plus generation images/s."""
    import torch

    from stepdistill.data.colored_mnist import EVAL_PROMPTS_FILE
    from stepdistill.eval.generate import iter_sample_pipeline
    from stepdistill.eval.t2i import SEED_STRIDE, read_prompts

    path = cache / f"ddim{steps}_cfg{cfg:g}_seed{seed}_n{n}.npz"
    if path.is_file():
        with np.load(path) as z:
            return torch.from_numpy(z["images"]), float(z["images_per_s"])
    prompts, _ = read_prompts(EVAL_PROMPTS_FILE)
    used = [prompts[i % len(prompts)] for i in range(n)]
    t0 = time.perf_counter()
    xs = [x for x, _, _ in iter_sample_pipeline(pipe, n, seed=SEED_STRIDE * seed, batch_size=batch_size,
                                               prompts=used, num_inference_steps=steps, guidance_scale=cfg,
                                               progress=False)]
    ips = n / (time.perf_counter() - t0)
    x = torch.cat(xs)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, images=x.numpy(), images_per_s=ips)
    os.replace(tmp, path)
    return x, ips


def eval_attrs(n: int):
    import torch

    from stepdistill.data.colored_mnist import EVAL_PROMPTS_FILE
    from stepdistill.eval.t2i import read_prompts

    prompts, attrs = read_prompts(EVAL_PROMPTS_FILE)
    return attrs[torch.arange(n) % len(prompts)]


def stats(det, x):
    from stepdistill.eval.fid import FeatureStats

    return FeatureStats.from_features(det.features(x))


def fid(a, b) -> float:
    from stepdistill.eval.fid import frechet_distance

    return float(frechet_distance(a.mu, a.sigma, b.mu, b.sigma))


def mean_std(v: list[float]) -> tuple[float, float]:
    a = np.asarray(v, np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def floors(det, vae, seeds: list[int], n: int) -> dict[str, list[float]]:
    """Per-seed floors at N=n: re-coloured held-out digits (raw and through the VAE) against the
    references of ``attr`` / ``attr-vae``."""
    import torch

    from stepdistill.data.colored_mnist import load_split
    from stepdistill.eval.judges import as_uint8
    from stepdistill.eval.t2i import vae_reconstruct

    out: dict[str, list[float]] = {"attr": [], "attr-vae": []}
    for s in seeds:
        g = torch.Generator().manual_seed(5000 + s)
        ho = load_split("heldout", variants=max(2, math.ceil(n / 500)), seed=1000 + s)
        pick = torch.randperm(len(ho), generator=g)[:n]
        x = ho.images[pick]
        out["attr"].append(fid(stats(det, as_uint8(x)), REFS["attr"]))
        out["attr-vae"].append(fid(stats(det, vae_reconstruct(vae, x)), REFS["attr-vae"]))
    return out


REFS: dict = {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", default=None, help="teacher folder (default: the cached t2i teacher)")
    p.add_argument("--n", type=int, default=500, help="images per evaluation seed")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", default="4,8,50")
    p.add_argument("--cfgs", default="2.0,4.5")
    p.add_argument("--teacher-ref-seed", type=int, default=None,
                   help="add the teacher-relative variant: the reference is DDIM-50 at this evaluation seed")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--cache", default=None, help="image cache folder (default ~/.cache/stepdistill/yardstick)")
    p.add_argument("--output", default=str(RESULTS))
    args = p.parse_args(argv)

    import torch

    from stepdistill.data.colored_mnist import load_split
    from stepdistill.eval.generate import load_pipeline
    from stepdistill.eval.judges import as_uint8, attribute_accuracy, default_attribute_detector
    from stepdistill.eval.t2i import set_scheduler, vae_reconstruct
    from stepdistill.utils import cache_dir

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from t2i_teacher import teacher_folder

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    folder = teacher_folder(args.pipeline)
    cache = Path(args.cache) if args.cache else cache_dir() / "yardstick"
    seeds, steps_list, cfgs = _list(args.seeds, int), _list(args.steps, int), _list(args.cfgs, float)
    pipe = load_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    set_scheduler(pipe, "ddim")
    det = default_attribute_detector()
    ref = load_split("heldout", variants=2, seed=0)
    with torch.no_grad():
        REFS["attr"] = stats(det, as_uint8(ref.images))
        REFS["attr-vae"] = stats(det, vae_reconstruct(pipe.vae, ref.images))
    attrs = eval_attrs(args.n)
    if args.teacher_ref_seed is not None:
        if args.teacher_ref_seed in seeds:
            raise SystemExit("--teacher-ref-seed must differ from the evaluation seeds")
        best_cfg = cfgs[0]
        xr, _ = cached_samples(pipe, 50, best_cfg, args.teacher_ref_seed, args.n, cache, args.batch_size)
        REFS["teacher-rel"] = stats(det, xr)

    commit = git_commit(ROOT)
    command = "python benchmarks/t2i_yardstick.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    rows, per, per_seed = [], {}, {}
    for steps in steps_list:
        for cfg in cfgs:
            vals: dict[str, list[float]] = {v: [] for v in REFS}
            acc, ips = [], []
            for s in seeds:
                x, r = cached_samples(pipe, steps, cfg, s, args.n, cache, args.batch_size)
                st = stats(det, x)
                for v, ref_st in REFS.items():
                    vals[v].append(fid(st, ref_st))
                acc.append(attribute_accuracy(det.predict(x), attrs)["prompt_accuracy"])
                ips.append(r)
                print(f"DDIM-{steps} CFG {cfg:g} seed {s}: " + "  ".join(f"{v} {vals[v][-1]:.2f}" for v in vals),
                      flush=True)
            for v, fs in vals.items():
                m, sd = mean_std(fs)
                per[(v, steps, cfg)] = (m, sd)
                per_seed[(v, steps, cfg)] = fs
                rows.append({"benchmark": BENCHMARK, "teacher": "t2i-colored-mnist", "method": "teacher-ddim",
                             "part": "teacher", "variant": v, "steps": steps, "cfg": cfg, "n": args.n,
                             "eval_seeds": seeds, "fid": round(m, 4), "fid_std": round(sd, 4),
                             "fid_per_seed": [round(f, 4) for f in fs],
                             "prompt_accuracy": round(mean_std(acc)[0], 4), "prompt_accuracy_std": round(mean_std(acc)[1], 4),
                             "images_per_s": round(float(np.mean(ips)), 3),
                             "metric": f"FID-{v}-N{args.n}", "fid_detector_id": det.id,
                             "command": command, "commit": commit})
    with torch.no_grad():
        fl = floors(det, pipe.vae, seeds, args.n)
    for v, fs in fl.items():
        m, sd = mean_std(fs)
        per[(v, "floor", None)] = (m, sd)
        rows.append({"benchmark": BENCHMARK, "part": "floor", "variant": v, "n": args.n, "eval_seeds": seeds,
                     "fid": round(m, 4), "fid_std": round(sd, 4), "fid_per_seed": [round(f, 4) for f in fs],
                     "metric": f"FID-{v}-N{args.n}", "command": command, "commit": commit})
    rows.extend(verdicts(per, per_seed, list(REFS), steps_list, cfgs, args.n, command, commit))
    for r in rows:
        if r["part"] == "verdict":
            print(json.dumps(r))
    merge(Path(args.output), rows)
    print(f"wrote {args.output}")
    return 0


def verdicts(per, per_seed, variants, steps_list, cfgs, n, command, commit) -> list[dict]:
    """Per variant: the best CFG per step count, the separations between step counts and from the
    floor in units of the larger of the two evaluation-seed stds (the issue's 3-std test), and the
    paired separation: every step count is sampled with the same evaluation seeds (same noise, same
    prompts), so the per-seed difference has its own seed std (common random numbers), which
    removes the part of the seed spread that all step counts share."""
    out = []
    for v in variants:
        best = {s: min(((per[(v, s, c)], c) for c in cfgs), key=lambda t: t[0][0]) for s in steps_list}
        seps, paired = {}, {}
        ordered = sorted(steps_list)
        for a, b in zip(ordered, ordered[1:]):
            (ma, sa), ca = best[a]
            (mb, sb), cb = best[b]
            seps[f"{a}_vs_{b}"] = round(abs(ma - mb) / max(sa, sb, 1e-12), 2)
            d = np.asarray(per_seed[(v, a, ca)]) - np.asarray(per_seed[(v, b, cb)])
            if len(d) > 1:
                paired[f"{a}_vs_{b}"] = {"mean_diff": round(float(d.mean()), 3),
                                         "std_diff": round(float(d.std(ddof=1)), 3),
                                         "separation_std": round(abs(float(d.mean())) / max(float(d.std(ddof=1)), 1e-12), 2)}
        top = min(best.values(), key=lambda t: t[0][0])
        floor = per.get((v, "floor", None))
        row = {"benchmark": BENCHMARK, "part": "verdict", "variant": v, "n": n,
               "best": {str(s): {"fid": round(best[s][0][0], 3), "std": round(best[s][0][1], 3), "cfg": best[s][1]}
                        for s in steps_list},
               "separation_std": seps, "ranks": all(x > 3 for x in seps.values()),
               "paired": paired, "ranks_paired": bool(paired) and all(x["separation_std"] > 3 for x in paired.values()),
               "command": command, "commit": commit}
        if floor is not None:
            (mt, st), _ = top
            row["floor"] = {"fid": round(floor[0], 3), "std": round(floor[1], 3)}
            row["best_above_floor_std"] = round((mt - floor[0]) / max(st, floor[1], 1e-12), 2)
            row["above_floor"] = row["best_above_floor_std"] > 3
        out.append(row)
    return out


def merge(path: Path, rows: list[dict]) -> None:
    def key(r):
        return (r.get("part"), r.get("variant"), r.get("steps"), r.get("cfg"), r.get("n"))

    old = json.loads(path.read_text()) if path.is_file() else []
    new_keys = {key(r) for r in rows}
    merged = [r for r in old if key(r) not in new_keys] + rows
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(merged, indent=1) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    raise SystemExit(main())
