"""Presets that transfer (issue #14 part 3): the default digits DMD2 preset on digits teachers of
every parametrisation and schedule, each retrained by the package at one reduced budget.

    OMP_NUM_THREADS=1 python benchmarks/digits_transfer.py --work ~/.cache/stepdistill-transfer

Teachers (class-conditional UNet2DModel of configs/digits/teacher.yaml, ``train.max_steps`` reduced
from 2500 to --teacher-steps for every one): v-prediction + cosine (the embedded teacher's), epsilon +
linear, epsilon + scaled-linear, sample + cosine, and flow matching (rectified flow, x_t = (1-t) x0 + t
eps, velocity target, FlowMatchEulerDiscreteScheduler shift 1) -- the package's teacher trainer has
no flow loss, so this script adds one (:class:`FlowDenoiserTraining`).  Each teacher is scored at
DDIM 10 and DPM-Solver++ 10 steps (flow: FlowMatch Euler and flow DPM-Solver++; TEACHER_SAMPLERS), its
best mean is "the teacher's best".  Then ``digits/dmd2`` -- unchanged except for one reduced, equal budget
(--student-steps, regression / critic warm-up scaled by the same factor) -- distils each, and the
one-step student's FID-digits over --seeds evaluation seeds is divided by its own teacher's best.
Target: max/min of that ratio across teachers <= 1.5.

Teachers, pair sets and student runs live under --work (outside the repo; resumable: finished
pieces are skipped).  Writes benchmarks/results/digits_transfer.json (DESIGN.md section 8 rows).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from common import git_commit  # noqa: E402  (benchmarks/common.py)

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
NAME = "digits_transfer"

#: name -> (prediction_type, beta_schedule); flow has no beta schedule
TEACHERS = {
    "v_cosine": ("v_prediction", "squaredcos_cap_v2"),
    "eps_linear": ("epsilon", "linear"),
    "eps_scaled_linear": ("epsilon", "scaled_linear"),
    "sample_cosine": ("sample", "squaredcos_cap_v2"),
    "flow": ("flow", None),
}
#: the teacher is scored with these (sampler, steps); its best mean FID is the ratio's denominator.
#: DDIM-50 was dropped: 3 seeds x N=1000 take ~15 min per teacher on the shared 2-core machine
TEACHER_SAMPLERS = [("ddim", 10), ("dpmsolver++", 10)]


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def noise_from(gens, shape) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g) for g in gens])


def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s


# ---------------------------------------------------------------------------------------------
# teachers


def teacher_overrides(name: str, steps: int) -> list[str]:
    pt, schedule = TEACHERS[name]
    over = [f"train.max_steps={steps}", "train.progress=false"]
    if pt != "flow":
        over = [f"teacher.params.unet.prediction_type={pt}", f"teacher.params.unet.beta_schedule={schedule}", *over]
    return over


def make_flow_task():
    """DenoiserTraining with a rectified-flow loss (the package's trainer trains VP models only)."""
    import torch.nn.functional as F
    from diffusers import FlowMatchEulerDiscreteScheduler

    from stepdistill.training.task import LossOutput
    from stepdistill.training.tasks import DenoiserTraining

    class FlowDenoiserTraining(DenoiserTraining):
        name = "teacher-flow"
        paper = "Liu et al. 2022 (rectified flow); Lipman et al. 2022 (flow matching)"

        def __init__(self, spec):
            super().__init__(spec)
            self.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=spec.num_train_timesteps, shift=1.0)

        def loss(self, batch, step, group, cache):
            x0 = batch["real"]
            spec = self.config
            b, n = x0.shape[0], spec.num_train_timesteps
            # t on the adapter's training grid (i + 1) / N, i ~ U{0..N-1}; the network sees N t
            t = (torch.randint(0, n, (b,), device=x0.device) + 1).float() / n
            noise = torch.randn_like(x0)
            tt = t.view(-1, 1, 1, 1)
            xt = (1 - tt) * x0 + tt * noise
            labels = torch.as_tensor(batch["raw_cond"], device=x0.device).long()
            drop = torch.rand(b, device=x0.device) < spec.cond_dropout
            labels = torch.where(drop, torch.full_like(labels, spec.num_classes), labels)
            pred = self.unet(xt, t * n, class_labels=labels, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), (noise - x0).float())
            return LossOutput(loss, {"fm": loss.detach()})

        def as_teacher(self):
            from stepdistill.teachers.diffusion import DiffusersTeacher

            cfg = dict(self.scheduler.config)
            cfg["_class_name"] = "FlowMatchEulerDiscreteScheduler"
            return DiffusersTeacher(self.unet, cfg, num_classes=self.config.num_classes)

    return FlowDenoiserTraining


def train_flow_teacher(cfg, output: Path) -> Path:
    """run.run_teacher_training with the flow task."""
    from stepdistill.config import from_dict, save_config, to_dict
    from stepdistill.data.sources import build_source
    from stepdistill.teachers.training import UNetSpec
    from stepdistill.training import train

    spec = from_dict(UNetSpec, cfg.teacher.params.get("unet", {}), prefix="teacher.params.unet.")
    task = make_flow_task()(spec)
    cfg.train.output_dir = str(output / "train")
    source = build_source(cfg.train, None, needs_data=True)
    n = cfg.train.num_sample_images
    result = train(task, source, cfg.train, run_config=to_dict(cfg),
                   sample_fn=lambda step: task.sample_images(n, torch.Generator().manual_seed(0)))
    task.export(output / "pipeline", ema_state=result.get("ema"), overwrite=True)
    save_config(cfg, output / "config.yaml")
    return output / "pipeline"


def ensure_teacher(name: str, args) -> tuple[Path, dict]:
    """The teacher's pipeline folder under --work (trained when missing) and its training info."""
    from stepdistill.config import load_config
    from stepdistill.run import train_teacher

    out = Path(args.work) / "teachers" / name
    pipe, info_file = out / "pipeline", out / "train_info.json"
    over = teacher_overrides(name, args.teacher_steps)
    if not (pipe / "model_index.json").exists():
        print(f"[{name}] training the teacher ({' '.join(over)})", flush=True)
        t0 = time.perf_counter()
        cfg = load_config("digits/teacher", over)
        if TEACHERS[name][0] == "flow":
            train_flow_teacher(cfg, out)
        else:
            train_teacher(cfg, out)
        info_file.write_text(json.dumps({"train_seconds": round(time.perf_counter() - t0, 1)}))
    if info_file.exists():
        info = json.loads(info_file.read_text())
    else:  # trained by `stepdistill teacher train --output <out> <overrides>` (same config): file times
        cfg_file = out / "train" / "config.yaml"
        secs = (pipe / "model_index.json").stat().st_mtime - cfg_file.stat().st_mtime if cfg_file.exists() else None
        info = {"train_seconds": round(secs, 1) if secs else None, "note": "timed from file times"}
    info["overrides"] = over
    return pipe, info


def teacher_rows(name: str, pipe: Path, info: dict, args, base: dict) -> list[dict]:
    from stepdistill.eval import evaluate_generator
    from stepdistill.teachers.diffusion import DiffusersTeacher

    teacher = None
    rows = []
    for sampler, steps in TEACHER_SAMPLERS:
        cache = pipe.parent / f"row-{sampler}-{steps}-n{args.num_images}-s{'_'.join(map(str, args.seeds))}.json"
        if cache.exists():
            rows.append({**json.loads(cache.read_text()), "commit": base["commit"], "command": base["command"]})
            continue
        teacher = teacher or DiffusersTeacher.from_pretrained(pipe)
        fids, accs = [], []
        t0 = time.perf_counter()
        for seed in args.seeds:
            def fn(gens, labels, sampler=sampler, steps=steps, teacher=teacher):
                z = noise_from(gens, teacher.sample_shape)
                x = teacher.sample(cond=teacher.encode_conditions(labels), num_steps=steps, sampler=sampler, noise=z)
                return to_uint8(x)

            ev = evaluate_generator(fn, "digits", "digits", num_images=args.num_images, num_classes=10, seed=seed,
                                    batch_size=250, progress=False)
            fids.append(ev["fid"])
            accs.append(ev["class_accuracy"])
        m, s = mean_std(fids)
        row = {**base, "teacher": name, "prediction_type": teacher.prediction_type,
               "beta_schedule": TEACHERS[name][1], "method": f"teacher-{sampler}", "nfe": steps,
               "fid": round(m, 4), "fid_std": round(s, 4), "fids": [round(f, 4) for f in fids],
               "class_accuracy": round(sum(accs) / len(accs), 4), "teacher_train_steps": args.teacher_steps,
               "teacher_train_seconds": info.get("train_seconds"), "teacher_overrides": info["overrides"],
               "eval_seconds": round(time.perf_counter() - t0, 1)}
        print(json.dumps(row), flush=True)
        cache.write_text(json.dumps(row))
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# students


def student_overrides(args, pipe: Path, out: Path) -> list[str]:
    """digits/dmd2 at --student-steps: the preset's warm-up stages scaled by the same factor."""
    from stepdistill.config import load_config

    preset = load_config("digits/dmd2", [])
    p, k = preset.algorithm.params, args.student_steps / preset.train.max_steps
    return [f"teacher.path={pipe}", f"train.output_dir={out}", "train.resume=null", "train.progress=false",
            f"train.max_steps={args.student_steps}",
            f"algorithm.params.regression_steps={round(p['regression_steps'] * k)}",
            f"algorithm.params.critic_warmup_steps={round(p['critic_warmup_steps'] * k)}",
            f"algorithm.params.regression_pairs={max(100, round(p['regression_pairs'] * k / 100) * 100)}",
            f"algorithm.params.pairs_dir={Path(args.work) / 'pairs'}",
            f"train.checkpoint_every_steps={args.student_steps}", f"train.sample_every_steps={args.student_steps}"]


def student_row(name: str, pipe: Path, args, base: dict) -> dict:
    from stepdistill.config import load_config
    from stepdistill.eval import evaluate_generator
    from stepdistill.run import run_distillation

    out = Path(args.work) / "students" / (name + (f"-{args.tag}" if args.tag else ""))
    done = out / "row.json"
    if done.exists():
        return json.loads(done.read_text())
    if out.exists():
        import shutil

        shutil.rmtree(out)
    over = student_overrides(args, pipe, out) + list(args.student_override)
    cfg = load_config("digits/dmd2", over)
    t0 = time.perf_counter()
    result = run_distillation(cfg, export=False)
    train_seconds = time.perf_counter() - t0
    distiller = result["distiller"]
    gen, teacher = distiller.generator_for_export(), distiller.teacher
    fids, accs, finite = [], [], True
    for seed in args.seeds:
        def fn(gens, labels):
            z = noise_from(gens, (1, 8, 8))
            with torch.no_grad():
                x = gen(z, teacher.encode_conditions(labels))
            nonlocal finite
            finite = finite and bool(torch.isfinite(x).all())
            return to_uint8(torch.nan_to_num(x))

        ev = evaluate_generator(fn, "digits", "digits", num_images=args.num_images, num_classes=10, seed=seed,
                                batch_size=250, progress=False)
        fids.append(ev["fid"])
        accs.append(ev["class_accuracy"])
    m, s = mean_std(fids)
    row = {**base, "teacher": name, "prediction_type": teacher.prediction_type, "beta_schedule": TEACHERS[name][1],
           "method": "dmd2", "preset": "digits/dmd2", "nfe": gen.num_steps, "generator_timesteps": gen.timesteps,
           "fid": round(m, 4), "fid_std": round(s, 4), "fids": [round(f, 4) for f in fids],
           "class_accuracy": round(sum(accs) / len(accs), 4), "finite": finite, "train_steps": args.student_steps,
           "train_seconds": round(train_seconds, 1), "student_overrides": [o for o in over if "path=" not in o
                                                                           and "output_dir" not in o
                                                                           and "pairs_dir" not in o]}
    done.write_text(json.dumps(row))
    print(json.dumps(row), flush=True)
    return row


#: student runs under --work/students/<teacher>-<tag> (made with --tag / --student-override, or kept
#: from an earlier rule) reported beside the main rows, never in the spread
PROBE_NOTES = {
    "gain31": "the first rule of this issue (ill-posed timesteps lowered only to gain <= 31.6, alpha_bar >= 1e-3): "
              "generator at 824; student run at commit bb307c0 with the then working tree",
    "g14": "probe: generator_timesteps=[726] (gain 14.6, SD1.5's gain at 999)",
    "g2": "probe: generator_timesteps=[395] (gain 2; the rule adopted)",
    "sigma2": "probe: generator at the noisiest timestep with sigma <= 2 for a non-epsilon teacher "
              "(not adopted: v / sample / flow keep 999)",
    "wv": "probe: algorithm.params.critic_weighting=v_prediction (sample: what the new default does; flow: "
          "v weighting instead of the flow loss's ((1+sigma)/sigma)^2)",
    "s1600": "--student-steps 1600: the preset's full budget (regression 600, critic warm-up 100, 4000 pairs), "
             "every teacher; its own spread row",
    "s1600w1": "probe: --student-steps 1600 with the former sample critic weighting (weight 1)",
    "w1": "the former critic weighting default (sample: weight 1, its native x0 MSE; flow: weight 1, which was "
          "not the flow loss); student run before commit of the weighting change",
}


def probe_rows(args, main: dict) -> list[dict]:
    rows = []
    for f in sorted((Path(args.work) / "students").glob("*-*/row.json")):
        name, tag = f.parent.name.rsplit("-", 1)
        if name not in main or tag not in PROBE_NOTES:
            continue
        r = json.loads(f.read_text())
        best = main[name]
        ratio = r["fid"] / best["teacher_best_fid"]
        rows.append({**r, "method": f"dmd2-probe-{tag}", "probe": tag, "notes": PROBE_NOTES[tag],
                     "teacher_best_fid": best["teacher_best_fid"], "fid_ratio_to_teacher_best": round(ratio, 3),
                     "fid_ratio_std": round(ratio * math.hypot(r["fid_std"] / r["fid"], best["teacher_best_fid_std"]
                                                               / best["teacher_best_fid"]), 3)})
        print(f"[{name} probe {tag}] {r['fid']:.3f}+-{r['fid_std']:.3f} ratio {ratio:.2f}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "stepdistill-transfer"))
    ap.add_argument("--teachers", nargs="+", default=list(TEACHERS), choices=list(TEACHERS))
    ap.add_argument("--teacher-steps", type=int, default=800, help="teacher train.max_steps (preset: 2500)")
    ap.add_argument("--student-steps", type=int, default=400, help="DMD2 train.max_steps (preset: 1600)")
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    ap.add_argument("--num-images", type=int, default=1000)
    ap.add_argument("--target", type=float, default=1.5)
    ap.add_argument("--student-override", nargs="*", default=[], help="extra digits/dmd2 overrides (probes)")
    ap.add_argument("--tag", default="", help="student run folder suffix (probes)")
    ap.add_argument("--output", default=str(RESULTS / f"{NAME}.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # a shared 2-core machine: one thread per process avoids OpenMP spin-waits
    command = "OMP_NUM_THREADS=1 python benchmarks/digits_transfer.py " + " ".join(argv if argv is not None
                                                                                   else sys.argv[1:])
    base = {"benchmark": "digits-transfer", "fid_detector": "digits-classifier", "n_samples": args.num_images,
            "eval_seeds": args.seeds, "commit": git_commit(), "command": command}
    rows, ratios = [], {}
    for name in args.teachers:
        pipe, info = ensure_teacher(name, args)
        trows = teacher_rows(name, pipe, info, args, base)
        best = min(trows, key=lambda r: r["fid"])
        srow = student_row(name, pipe, args, base)
        # the commit stays the one the student was trained at (row.json); this run only assembles
        srow = {**srow, "assembled_at_commit": base["commit"]}
        ratio = srow["fid"] / best["fid"]
        # ratio spread: relative seed stds added in quadrature
        ratio_std = ratio * math.hypot(srow["fid_std"] / srow["fid"], best["fid_std"] / best["fid"])
        srow.update({"teacher_best": f"{best['method']}-{best['nfe']}", "teacher_best_fid": best["fid"],
                     "teacher_best_fid_std": best["fid_std"], "fid_ratio_to_teacher_best": round(ratio, 3),
                     "fid_ratio_std": round(ratio_std, 3)})
        ratios[name] = (ratio, ratio_std)
        rows += [*trows, srow]
        print(f"[{name}] student {srow['fid']:.3f}+-{srow['fid_std']:.3f} / teacher best {best['fid']:.3f} "
              f"({srow['teacher_best']}) = {ratio:.2f}+-{ratio_std:.2f}", flush=True)
    rows += probe_rows(args, {r["teacher"]: r for r in rows if r.get("teacher_best_fid")})
    full = {r["teacher"]: (r["fid_ratio_to_teacher_best"], r["fid_ratio_std"]) for r in rows if r.get("probe") == "s1600"}
    if len(full) == len(ratios) > 1:
        rows.append(spread_row(full, {**base, "method": "dmd2-transfer-spread-1600-steps"}, args, 1600))
    if len(ratios) > 1:
        rows.append(spread_row(ratios, {**base, "method": "dmd2-transfer-spread"}, args, args.student_steps))
    Path(args.output).parent.mkdir(exist_ok=True, parents=True)
    Path(args.output).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


def spread_row(ratios: dict, base: dict, args, student_steps: int) -> dict:
    """max/min of the students' FID ratios to their teachers' best, against --target."""
    hi, lo = max(ratios, key=lambda k: ratios[k][0]), min(ratios, key=lambda k: ratios[k][0])
    spread = ratios[hi][0] / ratios[lo][0]
    spread_std = spread * math.hypot(ratios[hi][1] / ratios[hi][0], ratios[lo][1] / ratios[lo][0])
    summary = {**base, "teacher": "all",
               "ratios": {k: round(v[0], 3) for k, v in ratios.items()},
               "max_over_min_ratio": round(spread, 3), "max_over_min_ratio_std": round(spread_std, 3),
               "worst": hi, "best": lo, "target": args.target, "met": spread <= args.target,
               "margin": round(args.target - spread, 3), "teacher_train_steps": args.teacher_steps,
               "student_train_steps": student_steps}
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    sys.exit(main())
