"""``stepdistill compare TEACHER PRESET... --output DIR``: several distillation methods on one teacher,
side by side.

Every listed preset is trained on the same teacher with the same step budget (``--steps``; default the
first preset's ``train.max_steps``), exported (the algorithm's own export: a stock pipeline for SD
students, the routing pipeline for MSD), and scored on the same prompts and evaluation seeds:
``eval/t2i.py`` (FID-attr, CLIP score, prompt accuracy) for text teachers, the digits FID and class
accuracy for class-conditional digits teachers.  Optionally the teacher itself is scored at
``--teacher-steps`` for reference.

Resumable: each method's run lives in ``DIR/runs/<name>/``; a method whose ``row.json`` exists is
skipped, an interrupted one resumes from its latest checkpoint (the trainer's ``train.resume=latest``)
and keeps the FID-vs-step points already written to ``curve.jsonl``.

Outputs in ``DIR``:

* ``compare.json`` -- one row per method (DESIGN.md section 8: benchmark, teacher, method, nfe, fid,
  fid_detector, n_samples, images_per_s, train_steps, train_seconds, commit, command; plus the
  evaluation-seed std of every metric and the preset);
* ``compare.md`` -- the Markdown table;
* ``fid_vs_step.png`` (from the curve points every ``--curve-every`` steps and the final score) and
  ``fid_vs_clip.png`` (text teachers; class accuracy for digits);
* ``samples.png`` -- one row per method, one column per (prompt, seed), the same in every row, with
  ``samples.json`` naming the rows and columns.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["CompareTeacher", "compare", "resolve_teacher"]


@dataclass
class CompareTeacher:
    name: str  # as given on the command line
    kind: str  # teacher.kind of the runs (diffusers | digits)
    path: str  # the pipeline folder
    text: bool  # text-conditional (tokenizer in the folder)


def resolve_teacher(teacher: str) -> CompareTeacher:
    """``t2i`` (the embedded text-to-image teacher, trained and cached on first use), ``digits`` (the
    embedded digits teacher) or a diffusers pipeline folder."""
    if teacher == "t2i":
        from .t2i_teacher import ensure_t2i_teacher

        path, kind = str(ensure_t2i_teacher()), "diffusers"
    elif teacher == "digits":
        from .run import ensure_embedded_teacher

        path, kind = str(ensure_embedded_teacher()), "digits"
    else:
        p = Path(teacher).expanduser()
        if not (p / "model_index.json").is_file():
            from .config import ConfigError

            raise ConfigError(f"compare: TEACHER must be t2i, digits or a diffusers pipeline folder; {teacher!r} is none")
        path, kind = str(p.absolute()), "diffusers"
    text = (Path(path) / "tokenizer").is_dir()
    return CompareTeacher(teacher, kind, path, text)


def _method_name(preset: str) -> str:
    """``t2i/dmd2_1step`` -> ``t2i_dmd2_1step``; a YAML file -> its stem."""
    return Path(preset).stem if preset.endswith((".yaml", ".yml")) else preset.replace("/", "_")


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def record_curve_point(path: Path, point: dict) -> list[dict]:
    """Add a FID-vs-step point to ``path`` (JSON lines, sorted by step), replacing a point of the
    same step: a run killed after a curve point and resumed from an earlier checkpoint scores that
    step again.  Written atomically; returns the points."""
    pts = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
    pts = sorted([q for q in pts if int(q["step"]) != int(point["step"])] + [point], key=lambda q: int(q["step"]))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(q) + "\n" for q in pts))
    os.replace(tmp, path)
    return pts


# ---------------------------------------------------------------------------------------------
# scoring an exported folder


@dataclass
class Scorer:
    text: bool
    num_images: int
    seeds: list[int]
    prompts: str | None  # prompt file of text evaluation (None = the shipped eval prompts)
    require_captions: bool = True
    #: further FID references (name -> statistics .npz, or "vae"): ``fid_<name>`` beside ``fid``
    extra_references: dict | None = None
    batch_size: int = 100

    def __call__(self, folder: str | Path, seeds: list[int] | None = None, num_images: int | None = None,
                 **call_kw) -> dict:
        seeds = list(self.seeds if seeds is None else seeds)
        n = int(self.num_images if num_images is None else num_images)
        if self.text:
            from .eval.t2i import evaluate_t2i

            res = evaluate_t2i(str(folder), self.prompts, num_images=n, seeds=seeds, batch_size=self.batch_size,
                               require_captions=self.require_captions, extra_references=self.extra_references,
                               **call_kw)
            return {k: v for k, v in res.items() if not k.startswith("_")}
        return _score_digits(folder, n, seeds, self.batch_size, **call_kw)


def _score_digits(folder, n: int, seeds: list[int], batch_size: int, **call_kw) -> dict:
    import numpy as np

    from .eval.generate import load_pipeline, resolve_labels, sample_pipeline
    from .eval.metrics import class_accuracy, compute_fid

    pipe = load_pipeline(str(folder))
    per_seed = []
    for s in seeds:
        t0 = time.perf_counter()
        x = sample_pipeline(pipe, n, seed=100_000 * s, batch_size=batch_size, progress=False, **call_kw)
        dt = time.perf_counter() - t0
        res = compute_fid(x, "digits", "digits", progress=False)
        row = {"seed": s, "fid": float(res.fid), "images_per_s": n / dt if dt > 0 else float("inf")}
        labels = resolve_labels(n, "uniform", 10)
        row["class_accuracy"] = class_accuracy(x, labels, "digits")["class_accuracy"]
        per_seed.append(row)
    out: dict[str, Any] = {"metric": res.metric, "fid_detector": res.fid_detector, "n": n, "seeds": seeds,
                           "per_seed": per_seed}
    for k in ("fid", "class_accuracy", "images_per_s"):
        v = np.array([r[k] for r in per_seed], np.float64)
        out[k], out[f"{k}_std"] = float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return out


# ---------------------------------------------------------------------------------------------
# one method


def _run_method(preset: str, name: str, teacher: CompareTeacher, out: Path, steps: int, overrides: list[str],
                scorer: Scorer, curve_every: int, curve_images: int, command: str, log) -> dict:
    from .config import load_config
    from .run import run_distillation

    run_dir = out / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    row_file = run_dir / "row.json"
    if row_file.exists():
        log(f"[compare] {name}: finished earlier, skipped ({row_file})")
        return json.loads(row_file.read_text())
    base = load_config(preset)
    ckpt_every = min(int(base.train.checkpoint_every_steps), max(1, steps // 4))
    cfg = load_config(preset, [f"train.output_dir={run_dir}", f"train.max_steps={steps}",
                               f"train.checkpoint_every_steps={ckpt_every}", "train.resume=latest", *overrides])
    cfg.teacher.kind, cfg.teacher.path = teacher.kind, teacher.path
    cfg.teacher.params = {}
    curve_file = run_dir / "curve.jsonl"

    def eval_fn(step: int, distiller) -> dict:
        folder = distiller.export(run_dir / "curve_pipeline", overwrite=True)
        if folder is None:
            return {}
        res = scorer(folder, seeds=[scorer.seeds[0]], num_images=curve_images)
        point = {"step": int(step), "fid": res["fid"], "fid_teacher": res.get("fid_teacher"), "clip_score": res.get("clip_score"),
                 "prompt_accuracy": res.get("prompt_accuracy"), "class_accuracy": res.get("class_accuracy")}
        record_curve_point(curve_file, point)
        return {"curve_fid": float(res["fid"])}

    log(f"[compare] {name}: training {preset} for {steps} steps in {run_dir}")
    t0 = time.perf_counter()
    result = run_distillation(cfg, export=True, eval_fn=eval_fn if curve_every > 0 else None,
                              eval_every_steps=curve_every if curve_every > 0 else None)
    wall = time.perf_counter() - t0
    pipeline = result.get("pipeline")
    if pipeline is None:
        raise RuntimeError(f"compare: {preset} exported no pipeline (teacher kind {teacher.kind})")
    log(f"[compare] {name}: scoring {pipeline}")
    score = scorer(pipeline)
    distiller = result["distiller"]
    gen = distiller.generator_for_export()
    nfe = int(getattr(gen[0] if isinstance(gen, list) else gen, "num_steps", 1))
    row = {
        "benchmark": "compare", "teacher": teacher.name, "teacher_path": teacher.path, "method": name,
        "preset": preset, "algorithm": cfg.algorithm.name, "nfe": nfe,
        "fid": score["fid"], "fid_std": score.get("fid_std"), "fid_detector": score.get("fid_detector"),
        "fid_teacher": score.get("fid_teacher"), "fid_teacher_std": score.get("fid_teacher_std"),
        "metric": score.get("metric"), "n_samples": score.get("n"), "seeds": score.get("seeds"),
        "clip_score": score.get("clip_score"), "clip_score_std": score.get("clip_score_std"),
        "prompt_accuracy": score.get("prompt_accuracy"), "prompt_accuracy_std": score.get("prompt_accuracy_std"),
        "class_accuracy": score.get("class_accuracy"), "class_accuracy_std": score.get("class_accuracy_std"),
        "images_per_s": score.get("images_per_s"), "train_steps": int(result.get("step", steps)),
        "train_seconds": round(float(result.get("train_seconds") or wall), 1), "wall_seconds": round(wall, 1),
        "resumed_from": result.get("resumed_from"), "pipeline": str(pipeline), "per_seed": score.get("per_seed"),
        "commit": _commit(), "command": command,
    }
    _write_json(row_file, row)
    return row


def _teacher_row(teacher: CompareTeacher, out: Path, steps: int, guidance: float | None, scorer: Scorer,
                 command: str, log) -> dict:
    row_file = out / "runs" / f"teacher-{steps}" / "row.json"
    if row_file.exists():
        return json.loads(row_file.read_text())
    row_file.parent.mkdir(parents=True, exist_ok=True)
    log(f"[compare] teacher: scoring {steps} steps")
    kw: dict[str, Any] = {"num_inference_steps": steps}
    if teacher.text and guidance is not None:
        kw["guidance_scale"] = guidance
    if teacher.text:
        kw["scheduler"] = "ddim"
    score = scorer(teacher.path, **kw)
    row = {"benchmark": "compare", "teacher": teacher.name, "teacher_path": teacher.path,
           "method": f"teacher-{steps}", "preset": None, "algorithm": "teacher", "nfe": steps * (2 if guidance and guidance != 1 else 1),
           "fid": score["fid"], "fid_std": score.get("fid_std"), "fid_detector": score.get("fid_detector"),
           "fid_teacher": score.get("fid_teacher"), "fid_teacher_std": score.get("fid_teacher_std"),
           "metric": score.get("metric"), "n_samples": score.get("n"), "seeds": score.get("seeds"),
           "clip_score": score.get("clip_score"), "clip_score_std": score.get("clip_score_std"),
           "prompt_accuracy": score.get("prompt_accuracy"), "class_accuracy": score.get("class_accuracy"),
           "images_per_s": score.get("images_per_s"), "train_steps": 0, "train_seconds": 0.0,
           "pipeline": teacher.path, "guidance_scale": guidance, "commit": _commit(), "command": command}
    _write_json(row_file, row)
    return row


# ---------------------------------------------------------------------------------------------
# outputs


def _fmt(v, std=None, digits=3) -> str:
    if v is None:
        return "-"
    s = f"{v:.{digits}f}"
    return s + (f" ± {std:.{digits}f}" if std else "")


def write_table(rows: list[dict], path: Path) -> str:
    rel = any(r.get("fid_teacher") is not None for r in rows)
    head = ("| method | NFE | FID | " + ("FID vs teacher | " if rel else "")
            + "CLIP | prompt acc. | class acc. | images/s | train steps | train s |")
    lines = [head, "|---" * (9 + rel) + "|"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['nfe']} | {_fmt(r['fid'], r.get('fid_std'), 2)} | "
            + (f"{_fmt(r.get('fid_teacher'), r.get('fid_teacher_std'), 2)} | " if rel else "") +
            f"{_fmt(r.get('clip_score'), r.get('clip_score_std'))} | {_fmt(r.get('prompt_accuracy'), r.get('prompt_accuracy_std'))} | "
            f"{_fmt(r.get('class_accuracy'), r.get('class_accuracy_std'))} | {_fmt(r.get('images_per_s'), None, 1)} | "
            f"{r['train_steps']} | {r['train_seconds']} |")
    first = rows[0] if rows else {}
    text = "\n".join([
        f"Teacher `{first.get('teacher')}`; metric {first.get('metric')} over evaluation seeds {first.get('seeds')} "
        "(mean ± sample std).", "", *lines, ""])
    path.write_text(text)
    return text


def write_plots(rows: list[dict], out: Path, text: bool) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r["algorithm"] == "teacher":
            ax.axhline(r["fid"], ls="--", lw=1, color="grey", label=r["method"])
            continue
        pts = []
        curve = out / "runs" / r["method"] / "curve.jsonl"
        if curve.exists():
            pts = [json.loads(ln) for ln in curve.read_text().splitlines() if ln.strip()]
        by_step = {p["step"]: p["fid"] for p in pts}
        by_step[r["train_steps"]] = r["fid"]
        xs = sorted(by_step)
        ax.plot(xs, [by_step[x] for x in xs], marker="o", ms=3, label=r["method"])
    ax.set_xlabel("training step")
    ax.set_ylabel(rows[0].get("metric") or "FID" if rows else "FID")
    ax.set_title("FID vs training step (curve: 1 seed; last point: all seeds)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    p = out / "fid_vs_step.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)

    key, label = ("clip_score", "CLIP score") if text else ("class_accuracy", "class accuracy")
    fig, ax = plt.subplots(figsize=(5, 4))
    for r in rows:
        if r.get(key) is None:
            continue
        ax.errorbar(r[key], r["fid"], xerr=r.get(f"{key}_std") or 0, yerr=r.get("fid_std") or 0, fmt="o",
                    label=r["method"], capsize=2)
    ax.set_xlabel(label)
    ax.set_ylabel("FID")
    ax.set_title(f"FID vs {label} (lower-right is better)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    p = out / ("fid_vs_clip.png" if text else "fid_vs_accuracy.png")
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)
    return paths


def write_sample_sheet(rows: list[dict], out: Path, text: bool, prompts: list[str] | None, columns: int = 8,
                       seed: int = 0) -> Path:
    """One row per method, column j: prompt j (class j for digits) with image seed ``seed + j``."""
    from torchvision.utils import make_grid, save_image

    from .eval.generate import iter_sample_pipeline

    cols = prompts[:columns] if text else None
    tiles, names = [], []
    for r in rows:
        kw: dict[str, Any] = {}
        if r["algorithm"] == "teacher":
            kw["num_inference_steps"] = int(r["method"].split("-")[-1])
            if text and r.get("guidance_scale") is not None:
                kw["guidance_scale"] = r["guidance_scale"]
        n = len(cols) if text else columns
        xs = [x for x, _, _ in iter_sample_pipeline(r["pipeline"], n, seed=seed, batch_size=n, prompts=cols,
                                                    class_labels=None if text else list(range(n)), progress=False,
                                                    **kw)]
        tiles.append(torch.cat(xs).float() / 255)
        names.append(r["method"])
    grid = make_grid(torch.cat(tiles), nrow=len(tiles[0]), padding=1, pad_value=1.0)
    p = out / "samples.png"
    save_image(grid, p)
    _write_json(out / "samples.json", {"rows": names, "columns": cols if text else list(range(columns)),
                                       "seed_rule": f"column j: image seed {seed} + j (eval.generate.make_generators)"})
    return p


# ---------------------------------------------------------------------------------------------
# the command


def compare(teacher: str, presets: list[str], output: str | Path, *, steps: int | None = None,
            overrides: list[str] | None = None, num_images: int = 300, seeds: list[int] | tuple = (0, 1, 2),
            prompts: str | None = None, curve_every: int = 0, curve_images: int | None = None,
            teacher_steps: int | None = None, sheet_columns: int = 8, command: str | None = None,
            teacher_reference: str | None = None, quiet: bool = False) -> list[dict]:
    """Train, export and score every preset on ``teacher``; write the comparison outputs into ``output``.
    ``teacher_reference`` (text teachers): FID statistics of the teacher's own many-step samples
    (e.g. ``benchmarks/results/t2i_teacher_ddim50_cfg2_seed9_stats.npz``): every row also gets the
    teacher-relative ``fid_teacher`` (distillation fidelity; the FID variant that ranks the
    teacher's 4 against 8 steps by 7 seed stds in ``benchmarks/results/t2i_yardstick.json``).
    Returns the rows (one per method, the teacher's first when ``teacher_steps`` is given)."""
    from .config import ConfigError, load_config

    if not presets:
        raise ConfigError("compare needs at least one preset")
    names = [_method_name(p) for p in presets]
    if len(set(names)) != len(names):
        raise ConfigError(f"compare: presets must differ, got {presets}")
    for p in presets:  # fail on a typo before any training
        from .run import validate_algorithm

        validate_algorithm(load_config(p))
    log = (lambda *a: None) if quiet else (lambda msg: print(msg, flush=True))
    out = Path(output).expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)
    t = resolve_teacher(teacher)
    steps = int(steps if steps is not None else load_config(presets[0]).train.max_steps)
    overrides = list(overrides or [])
    command = command or "stepdistill compare " + " ".join([teacher, *presets, "--output", str(output)])
    require = True
    if t.text and prompts is not None:
        from .eval.t2i import read_prompts

        try:
            read_prompts(prompts)
        except Exception:  # noqa: BLE001  (not coloured-MNIST captions: no prompt accuracy)
            require = False
    scorer = Scorer(text=t.text, num_images=num_images, seeds=[int(s) for s in seeds], prompts=prompts,
                    require_captions=require, batch_size=min(100, num_images),
                    extra_references={"teacher": str(teacher_reference)} if teacher_reference and t.text else None)
    _write_json(out / "compare_config.json", {"teacher": teacher, "teacher_path": t.path, "presets": presets,
                                              "steps": steps, "overrides": overrides, "num_images": num_images,
                                              "seeds": list(seeds), "prompts": prompts, "command": command})
    rows = []
    if teacher_steps:
        guidance = load_config(presets[0]).teacher.guidance_scale if t.text else None
        rows.append(_teacher_row(t, out, int(teacher_steps), guidance, scorer, command, log))
    for preset, name in zip(presets, names):
        rows.append(_run_method(preset, name, t, out, steps, overrides, scorer, curve_every,
                                curve_images or max(1, num_images // 2), command, log))
    _write_json(out / "compare.json", rows)
    write_table(rows, out / "compare.md")
    write_plots(rows, out, t.text)
    sheet_prompts = None
    if t.text:
        from .data.colored_mnist import EVAL_PROMPTS_FILE
        from .data.sources import PromptSource

        sheet_prompts = PromptSource(prompts or EVAL_PROMPTS_FILE).prompts
    write_sample_sheet(rows, out, t.text, sheet_prompts, columns=sheet_columns)
    log(f"[compare] wrote {out / 'compare.json'}, compare.md, plots and samples.png")
    return rows


def add_parser(sub) -> None:
    """Register ``stepdistill compare`` on an argparse subparsers object."""
    p = sub.add_parser("compare", help="train, export and score several presets on one teacher, side by side")
    p.add_argument("teacher", help="t2i | digits | a diffusers pipeline folder")
    p.add_argument("presets", nargs="+", help="presets (e.g. t2i/dmd2_1step t2i/vsd) or YAML files")
    p.add_argument("--output", required=True, help="output folder (re-run to resume / skip finished methods)")
    p.add_argument("--steps", type=int, default=None, help="equal training budget (default: first preset's)")
    p.add_argument("--num-images", type=int, default=300)
    p.add_argument("--seeds", default="0,1,2", help="evaluation seeds, comma-separated")
    p.add_argument("--prompts", default=None, help="evaluation prompt file (text teachers; default: shipped)")
    p.add_argument("--curve-every", type=int, default=0, help="FID every N steps for the FID-vs-step plot")
    p.add_argument("--teacher-steps", type=int, default=None, help="also score the teacher at this many steps")
    p.add_argument("--teacher-reference", default=None, metavar="STATS.npz",
                   help="text teachers: FID statistics of the teacher's own samples; adds the teacher-relative "
                        "fid_teacher to every row")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every preset (repeatable), e.g. --set train.batch_size=16")


def run_from_args(args) -> int:
    compare(args.teacher, args.presets, args.output, steps=args.steps, overrides=args.overrides,
            num_images=args.num_images, seeds=[int(s) for s in str(args.seeds).split(",") if s.strip()],
            prompts=args.prompts, curve_every=args.curve_every, teacher_steps=args.teacher_steps,
            teacher_reference=args.teacher_reference,
            command="stepdistill compare " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else None)
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m stepdistill.compare")
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_parser(sub)
    args = ap.parse_args(["compare", *(sys.argv[1:] if argv is None else argv)])
    return run_from_args(args)


if __name__ == "__main__":
    raise SystemExit(main())
