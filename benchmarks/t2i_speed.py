"""One-step student vs the teacher's 50-step sampler on the embedded text-to-image teacher: images/s
at the same batch size, through the stock diffusers pipelines a user loads (issue #14's target:
one-step images/s >= 45x the teacher's 50-step images/s).

Speed does not depend on how well the student is trained, only on its architecture and its recorded
sampler (``_stepdistill_pipeline_call`` in the exported scheduler config), so any exported
``t2i/dmd2_1step`` folder serves.  The two pipelines are timed in alternation (student, teacher,
student, ...) so that both see the same machine load; each timed call is preceded by one untimed
warm-up call per pipeline.  Prompt encoding, the UNet, the VAE decode and the
postprocessing are all inside the timing (``output_type="pt"``)::

    python benchmarks/t2i_speed.py --student ~/stepdistill-runs/t2i-methods/runs/t2i_dmd2_1step/pipeline
    python benchmarks/t2i_speed.py --student DIR --batch-size 50 --repeats 3 --teacher-steps 50 --guidance-scale 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, git_commit  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "t2i_speed.json"


def _prompts(n: int) -> list[str]:
    from stepdistill.data.colored_mnist import eval_prompts

    return [p["prompt"] for p in eval_prompts(n)]


def _timed(pipe, prompts, seed: int, **call) -> float:
    import torch

    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = pipe(prompts, generator=g, output_type="pt", **call).images
    dt = time.perf_counter() - t0
    assert out.shape[0] == len(prompts)
    return dt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", required=True, help="exported one-step student pipeline folder")
    p.add_argument("--teacher", default=None, help="teacher pipeline folder (default: the cached embedded t2i teacher)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--teacher-steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=2.0, help="the teacher's CFG (2 = its best FID)")
    p.add_argument("--output", default=str(RESULTS))
    args = p.parse_args(argv)

    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from stepdistill.export.common import SCHEDULER_CALL_KEY

    teacher_dir = args.teacher
    if teacher_dir is None:
        from stepdistill.t2i_teacher import ensure_t2i_teacher

        teacher_dir = str(ensure_t2i_teacher())
    student = StableDiffusionPipeline.from_pretrained(args.student, safety_checker=None)
    teacher = StableDiffusionPipeline.from_pretrained(teacher_dir, safety_checker=None)
    teacher.scheduler = DDIMScheduler.from_config(teacher.scheduler.config)
    for pipe in (student, teacher):
        pipe.set_progress_bar_config(disable=True)
    s_call = dict(student.scheduler.config.get(SCHEDULER_CALL_KEY) or {})
    if not s_call:
        raise SystemExit(f"{args.student}: the scheduler config records no student sampler "
                         f"({SCHEDULER_CALL_KEY}); pass a folder exported by stepdistill")
    t_call = {"num_inference_steps": args.teacher_steps, "guidance_scale": args.guidance_scale}
    prompts = _prompts(args.batch_size)

    _timed(student, prompts[:2], 0, **s_call)  # warm-up (allocations, kernels)
    _timed(teacher, prompts[:2], 0, **dict(t_call, num_inference_steps=2))
    s_t, t_t = [], []
    for r in range(args.repeats):
        s_t.append(_timed(student, prompts, 1 + r, **s_call))
        t_t.append(_timed(teacher, prompts, 1 + r, **t_call))
        print(f"repeat {r}: student {args.batch_size / s_t[-1]:.1f} img/s, teacher "
              f"{args.batch_size / t_t[-1]:.2f} img/s", flush=True)
    s_ips = [args.batch_size / t for t in s_t]
    t_ips = [args.batch_size / t for t in t_t]
    ratios = [a / b for a, b in zip(s_ips, t_ips)]  # paired: the same repeat, adjacent in time
    sd = (lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0)
    row = {
        "benchmark": "t2i_speed",
        "student": args.student,
        "teacher": "t2i-colored-mnist",
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "student_call": s_call,
        "teacher_call": dict(t_call, scheduler="DDIMScheduler"),
        "student_images_per_s": statistics.mean(s_ips), "student_images_per_s_std": sd(s_ips),
        "teacher_images_per_s": statistics.mean(t_ips), "teacher_images_per_s_std": sd(t_ips),
        "speedup": statistics.mean(ratios), "speedup_std": sd(ratios), "speedup_per_repeat": ratios,
        "target": 45.0, "met": statistics.mean(ratios) - 2 * sd(ratios) >= 45.0,
        "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
        "commit": git_commit(), "command": "python benchmarks/t2i_speed.py " + " ".join(argv or sys.argv[1:]),
    }
    print(json.dumps(row, indent=1))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps([row], indent=1) + "\n")
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
