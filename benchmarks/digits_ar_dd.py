"""Digits AR benchmark: the embedded AR teacher (VQ + LlamaForCausalLM, 16 tokens, one LM pass per
token) against Distilled Decoding students sampling all tokens in one or two passes.

    python benchmarks/digits_ar_dd.py                          # teacher rows + DD (1 and 2 steps)
    python benchmarks/digits_ar_dd.py --teacher-only
    python benchmarks/digits_ar_dd.py --reuse                  # re-score the last run (no training)
    python benchmarks/digits_ar_dd.py --override train.max_steps=1000 --num-images 500
    python benchmarks/digits_ar_dd.py --work-dir runs/bench-digits-ar-dd-head \
        --override algorithm.params.split_t=8              # with DD's continuous head (rows "dd-head")

Rows (DESIGN.md §8) go to benchmarks/results/digits_ar_dd.json; BENCHMARKS.md is regenerated.

* ``teacher-ar``: ordinary AR sampling (CFG, filters), ``nfe`` = number of tokens;
* ``teacher-ar-flowmap``: the teacher driven by DD's deterministic noise -> token map (the pair
  generator), to show the map reproduces the teacher's distribution;
* ``dd`` with ``nfe`` 1 and 2: the student (one model; two-step = second pass from split point 8),
  scored through the exported ``DistilledDecodingPipeline`` folder's weights; ``dd-head`` the same
  with DD's continuous head (``algorithm.params.split_t`` set: positions ``>= split_t`` regressed
  and decoded from the head's unsnapped vectors);
* ``dd-teacher`` / ``dd-head-teacher`` with ``nfe = 2 + k``: teacher-involved sampling
  (``--teacher-steps``, default 2, 4 and 8: the teacher's flow map regenerates the ``k`` tokens before
  split point 8, then the student's second pass); ``*-teacher-random`` the same with ordinary random
  teacher draws (DD1's ``eval_combine_sample.py``; ``--teacher-sampler``).

Speed is measured on one CPU thread by default (``--threads``), end to end (noise/draws, LM passes,
VQ decoding), with the methods *interleaved* (so load from other processes hits them alike): per-image
latency at batch 1 (the paper's "time per image"; ``speedup`` = teacher latency / student latency)
and throughput at each ``--throughput-batch`` (default 64 and 250: ``images_per_s_by_batch``,
``speedup_throughput_by_batch``; ``images_per_s`` / ``speedup_throughput`` are the largest batch's).  At large batch on a CPU the
teacher's KV-cached steps are compute-bound, so the throughput speed-up is far below the token count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import git_commit  # noqa: E402  (benchmarks/common.py)

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
NAME = "digits_ar_dd"
BENCH = "digits-ar-dd"


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def gens_for(batch: int, offset: int = 1000) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(offset + i) for i in range(batch)]


def interleaved_times(fns: dict, batch: int, reps: dict, spread: bool = False) -> dict:
    """Median seconds per call of each ``fn(labels, generators)`` at ``batch``; the methods take
    turns (one call each per round) after one warm-up call each.  ``spread``: ``(median, [q1, q3])``."""
    labels = torch.arange(batch) % 10
    times: dict = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn(labels, gens_for(batch))
        for r in range(max(reps.values())):
            for k, fn in fns.items():
                if r >= reps[k]:
                    continue
                g = gens_for(batch)
                t0 = time.perf_counter()
                fn(labels, g)
                times[k].append(time.perf_counter() - t0)
    if spread:
        return {k: (statistics.median(v), _quartiles(v)) for k, v in times.items()}
    return {k: statistics.median(v) for k, v in times.items()}


def _quartiles(v: list) -> list:
    if len(v) < 4:
        return [min(v), max(v)]
    q = statistics.quantiles(v, n=4)
    return [q[0], q[2]]


def quality(fn, n: int, seed: int = 0) -> dict:
    from stepdistill.eval import class_accuracy, compute_fid, generate_images

    def gen(gens, labels):
        with torch.no_grad():
            return to_uint8(fn(labels, gens))

    res = compute_fid(
        gen, "digits", "digits", num_images=n, num_classes=10, progress=False, batch_size=250, seed=seed
    )
    imgs = generate_images(gen, n, num_classes=10, progress=False, batch_size=250, seed=seed)
    acc = class_accuracy(imgs, torch.arange(n) % 10)["class_accuracy"]
    return {"fid": round(res.fid, 4), "metric": res.metric, "class_accuracy": round(acc, 4)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--work-dir", default="runs/bench-digits-ar-dd")
    p.add_argument(
        "--override", action="append", default=[], help="config override for the DD run (repeatable)"
    )
    p.add_argument("--teacher-only", action="store_true")
    p.add_argument("--reuse", action="store_true", help="score the existing run's pipeline (no training)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--latency-reps", type=int, default=30)
    p.add_argument("--throughput-batch", default="64,250", help="comma-separated batch sizes")
    p.add_argument("--teacher-sampler", default="flow,random",
                   help="teacher-involved sampling: the teacher's flow map of the noise and/or random draws (DD1)")
    p.add_argument("--teacher-steps", default="2,4,8", help="teacher-involved sampling: comma-separated k (empty: none)")
    p.add_argument("--throughput-reps", type=int, default=3)
    p.add_argument("--curve-every", type=int, default=1000)
    p.add_argument("--curve-images", type=int, default=500)
    p.add_argument("--results-name", default=NAME, help="rows go to benchmarks/results/<name>.json")
    args = p.parse_args(argv)
    thr_batches = [int(b) for b in str(args.throughput_batch).split(",") if b.strip()]
    teacher_ks = [int(k) for k in str(args.teacher_steps).split(",") if k.strip()]
    samplers = [x.strip() for x in str(args.teacher_sampler).split(",") if x.strip()]
    torch.set_num_threads(args.threads)
    command = "python benchmarks/digits_ar_dd.py " + " ".join(argv if argv is not None else sys.argv[1:])
    commit = git_commit()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_path = RESULTS / f"{args.results_name}.json"

    from stepdistill.algorithms.distilled_decoding import DDStudent, DistilledDecoding, teacher_token_map
    from stepdistill.config import load_config
    from stepdistill.pipelines.distilled_decoding import DistilledDecodingPipeline
    from stepdistill.run import build_ar_teacher, run_ar_distillation

    work = Path(args.work_dir)
    cfg = load_config(
        "digits-ar/dd", [f"train.output_dir={work / 'dd'}", "train.resume=null", *args.override]
    )
    teacher = build_ar_teacher(cfg.teacher)
    info_file = Path(teacher.path).parent / "teacher_training.json"
    tinfo = json.loads(info_file.read_text()) if info_file.exists() else {}
    n_tok, d_emb = teacher.num_tokens, teacher.embed_dim
    base = {
        "benchmark": BENCH,
        "teacher": "digits-ar",
        "fid_detector": "digits-classifier",
        "n_samples": args.num_images,
        "threads": args.threads,
        "commit": commit,
        "command": command,
    }

    def teacher_fn(labels, gens):
        return teacher.sample(class_labels=labels, generator=gens, decode=True)

    teacher_row = {
        **base,
        "method": "teacher-ar",
        "nfe": n_tok,
        **quality(teacher_fn, args.num_images),
        "train_steps": None,
        "train_seconds": round(tinfo.get("vq_seconds", 0) + tinfo.get("lm_seconds", 0), 1) or None,
        "teacher_training": tinfo,
        "sampling": teacher.settings(),
    }
    print(json.dumps(teacher_row), flush=True)
    if args.teacher_only:
        t = interleaved_times({"t": teacher_fn}, 1, {"t": args.latency_reps})["t"]
        ips = {b: round(b / interleaved_times({"t": teacher_fn}, b, {"t": args.throughput_reps})["t"], 1)
               for b in thr_batches}
        teacher_row.update(latency_ms=round(1000 * t, 3), images_per_s=ips[max(ips)],
                           images_per_s_by_batch={str(b): v for b, v in ips.items()})
        _write(out_path, [teacher_row])
        return 0

    # -- DD: train (pairs timed separately) or reuse the last run -----------------------------------
    def student_fn(s, k, teacher_steps=0, sampler="flow"):
        def fn(labels, gens):
            noise = torch.stack([torch.randn(n_tok, d_emb, generator=g) for g in gens])
            tok, vec = s.generate(noise, labels, num_steps=k, teacher=teacher if teacher_steps else None,
                                  teacher_steps=teacher_steps, flow=flow_kwargs, teacher_sampler=sampler,
                                  generator=list(gens))
            return s.decode(teacher.vqvae, tok, vec)

        return fn

    head_on = cfg.algorithm.params.get("split_t") is not None
    dd_method = "dd-head" if head_on else "dd"

    pipe_dir = work / "dd" / "pipeline"
    old_rows = (
        {(r["method"], r["nfe"]): r for r in json.loads(out_path.read_text())} if out_path.exists() else {}
    )
    timer: dict = {}
    curve: dict[int, list] = {1: [], 2: []}
    if args.reuse:
        if not (pipe_dir / "model_index.json").exists():
            raise SystemExit(f"--reuse: no pipeline at {pipe_dir}; run without --reuse first")
        prev = old_rows.get((dd_method, 1), {})
        for k in ("pair_seconds", "pairs_cached", "train_seconds"):
            timer[k] = prev.get(k)
        for k in (1, 2):
            curve[k] = old_rows.get((dd_method, k), {}).get("curve", [])
        d = DistilledDecoding(teacher, _dd_config(cfg))
        flow_kwargs = d.flow_kwargs
    else:
        orig = DistilledDecoding.ensure_pairs

        def timed_ensure(self, *a, **k):
            if self._pairs is not None:
                return self._pairs
            cached = self.pair_set().is_complete(self.config.num_pairs)
            t = time.perf_counter()
            out = orig(self, *a, **k)
            timer.setdefault("pair_seconds", round(time.perf_counter() - t, 1))
            timer.setdefault("pairs_cached", cached)
            return out

        DistilledDecoding.ensure_pairs = timed_ensure
        flow_kwargs = DistilledDecoding(teacher, _dd_config(cfg)).flow_kwargs

        def eval_fn(step, distiller):
            out = {}
            for k in range(1, distiller.student.num_steps + 1):
                fid = quality(student_fn(distiller.student, k), args.curve_images)["fid"]
                curve[k].append([step, fid])
                out[f"fid_{k}step"] = fid
            print(f"  [dd] step {step}: {out}", flush=True)
            return out

        t0 = time.perf_counter()
        result = run_ar_distillation(cfg, eval_fn=eval_fn, eval_every_steps=args.curve_every)
        timer["train_seconds"] = round(time.perf_counter() - t0 - timer.get("pair_seconds", 0), 1)
        DistilledDecoding.ensure_pairs = orig
        d = result["distiller"]
        pipe_dir = Path(result["pipeline"])

    # the student scored = the exported pipeline's weights (EMA), in the training-time wrapper
    pipe = DistilledDecodingPipeline.from_pretrained(str(pipe_dir))
    student = DDStudent(
        pipe.transformer.eval(),
        d.student.codes,
        teacher.num_classes,
        teacher.grid_size,
        list(pipe.config.split_points),
        pipe.config.codebook_scale,
        pipe.config.get("rbf_tau"),
        pipe.continuous_head,
        pipe.config.get("split_t"),
    ).eval()
    z = torch.randn(32, n_tok, d_emb, generator=torch.Generator().manual_seed(5))
    lab = torch.arange(32) % 10
    with torch.no_grad():
        same = all(
            torch.equal(
                pipe(class_labels=lab, noise=z, num_inference_steps=k, output_type="tokens").images,
                student(z, lab, num_steps=k),
            )
            for k in range(1, student.num_steps + 1)
        )

    codes = d.student.codes

    def flowmap_fn(labels, gens):
        noise = torch.stack([torch.randn(n_tok, d_emb, generator=g) for g in gens])
        return teacher.decode(teacher_token_map(teacher, noise, labels, codes, d.flow_kwargs))

    fm_row = {
        **base,
        "method": "teacher-ar-flowmap",
        "nfe": n_tok,
        **quality(flowmap_fn, args.num_images),
        "train_steps": None,
        "train_seconds": None,
        "sampling": teacher.settings(),
        "flow": {k: str(v) for k, v in d.flow_kwargs.items()},
    }
    print(json.dumps(fm_row), flush=True)

    # agreement with the teacher's map on held-out noise
    zh = torch.randn(1000, n_tok, d_emb, generator=torch.Generator().manual_seed(123))
    lh = torch.arange(1000) % 10
    with torch.no_grad():
        ref = torch.cat([d.teacher_tokens(zh[i : i + 250], lh[i : i + 250]) for i in range(0, 1000, 250)])
    dd_rows = []
    variants = [(k, 0, "flow") for k in range(1, student.num_steps + 1)]
    if student.num_steps >= 2:
        variants += [(2, t, sm) for sm in samplers for t in teacher_ks if 0 < t <= student.split_points[1]]
    for k, ts, sm in variants:
        gh = [torch.Generator().manual_seed(5000 + i) for i in range(zh.shape[0])]
        with torch.no_grad():
            tok = student.generate(zh, lh, num_steps=k, teacher=teacher if ts else None, teacher_steps=ts,
                                   flow=d.flow_kwargs, teacher_sampler=sm, generator=gh)[0]
        dd_rows.append(
            {
                **base,
                "method": dd_method + ("-teacher" + ("-random" if sm == "random" else "") if ts else ""),
                "nfe": k + ts,
                "teacher_steps": ts,
                "teacher_sampler": sm if ts else None,
                "split_t": student.split_t,
                "regression_weight": d.config.regression_weight if head_on else None,
                **quality(student_fn(student, k, ts, sm), args.num_images),
                "train_steps": cfg.train.max_steps,
                "train_seconds": timer.get("train_seconds"),
                "pair_seconds": timer.get("pair_seconds"),
                "pairs_cached": timer.get("pairs_cached"),
                "num_pairs": d.config.num_pairs,
                "split_points": student.split_points,
                "rbf_tau": student.rbf_tau,
                "token_agreement_with_teacher_map": round(float((tok == ref).float().mean()), 4),
                "sequence_agreement_with_teacher_map": round(float((tok == ref).all(-1).float().mean()), 4),
                "pipeline_equals_student": bool(same),
                "curve": curve.get(k, []) if not ts else [],
            }
        )

    # -- speed, interleaved ----------------------------------------------------------------------------
    def key_of(r):
        return f"dd{r['nfe']}t{r['teacher_steps']}{r['teacher_sampler']}"

    fns = {"teacher": teacher_fn, "flowmap": flowmap_fn}
    fns.update({key_of(r): student_fn(student, r["nfe"] - r["teacher_steps"], r["teacher_steps"],
                                      r["teacher_sampler"] or "flow") for r in dd_rows})
    lat_reps = {k: (max(3, args.latency_reps // 6) if k == "flowmap" else args.latency_reps) for k in fns}
    thr_reps = {k: (1 if k == "flowmap" else args.throughput_reps) for k in fns}
    # tokens only (no VQ decoding): the LM part the distillation actually removes
    fns["teacher_tokens"] = lambda labels, gens: teacher.sample(class_labels=labels, generator=gens)
    fns["dd1_tokens"] = lambda labels, gens: student(
        torch.stack([torch.randn(n_tok, d_emb, generator=g) for g in gens]), labels, num_steps=1
    )
    lat_reps.update(teacher_tokens=args.latency_reps, dd1_tokens=args.latency_reps)
    lat_runs = interleaved_times(fns, 1, lat_reps, spread=True)
    lat = {k: v[0] for k, v in lat_runs.items()}
    del fns["teacher_tokens"], fns["dd1_tokens"]
    thr = {b: interleaved_times(fns, b, thr_reps) for b in thr_batches}
    big = max(thr_batches)
    for row, key in [(teacher_row, "teacher"), (fm_row, "flowmap")] + [(r, key_of(r)) for r in dd_rows]:
        row["latency_ms"] = round(1000 * lat[key], 3)
        row["latency_ms_iqr"] = [round(1000 * q, 3) for q in lat_runs[key][1]]
        row["images_per_s_by_batch"] = {str(b): round(b / thr[b][key], 1) for b in thr_batches}
        row["images_per_s"] = row["images_per_s_by_batch"][str(big)]
        row["throughput_batch"] = big
    teacher_row["latency_tokens_only_ms"] = round(1000 * lat["teacher_tokens"], 3)
    for r in dd_rows:
        r["teacher_latency_ms"] = teacher_row["latency_ms"]  # measured in this invocation, interleaved
        r["teacher_images_per_s_by_batch"] = teacher_row["images_per_s_by_batch"]
        r["speedup"] = round(teacher_row["latency_ms"] / r["latency_ms"], 2)
        r["speedup_throughput"] = round(r["images_per_s"] / teacher_row["images_per_s"], 2)
        r["speedup_throughput_by_batch"] = {
            b: round(v / teacher_row["images_per_s_by_batch"][b], 2) for b, v in r["images_per_s_by_batch"].items()
        }
        r["speedup_target"] = round(0.8 * n_tok, 1) if (r["nfe"], r["teacher_steps"]) == (1, 0) else None
        if (r["nfe"], r["teacher_steps"]) == (1, 0):
            r["latency_tokens_only_ms"] = round(1000 * lat["dd1_tokens"], 3)
            r["speedup_tokens_only"] = round(lat["teacher_tokens"] / lat["dd1_tokens"], 2)
        r["fid_ratio_to_teacher"] = round(r["fid"] / teacher_row["fid"], 3)
        print(json.dumps({k: v for k, v in r.items() if k != "curve"}), flush=True)
    print(
        json.dumps(
            {
                "teacher_latency_ms": teacher_row["latency_ms"],
                "teacher_images_per_s": teacher_row["images_per_s"],
            }
        )
    )
    _write(out_path, [teacher_row, fm_row, *dd_rows])
    return 0


def _dd_config(cfg):
    from stepdistill.algorithms.distilled_decoding import DDConfig
    from stepdistill.config import from_dict

    return from_dict(DDConfig, cfg.algorithm.params, prefix="algorithm.params.")


def _write(path: Path, rows: list[dict]) -> None:
    import fcntl

    with open(str(path) + ".lock", "w") as lock:  # two runs (with / without the head) may end together
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = json.loads(path.read_text()) if path.exists() else []
        methods = {(r["method"], r["nfe"]) for r in rows}
        keep = [r for r in old if (r["method"], r["nfe"]) not in methods]
        allrows = sorted(keep + rows, key=lambda r: (r["method"] != "teacher-ar", r["method"], r["nfe"]))
        path.write_text(json.dumps(allrows, indent=1) + "\n")
    subprocess.run([sys.executable, str(ROOT / "make_tables.py")], check=False)
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
