"""Glue between configuration and the library: build teachers, train teachers, run distillation.

Everything the CLI does goes through these functions, so Python users get the same behaviour:

    from stepdistill.config import load_config
    from stepdistill.run import run_distillation
    result = run_distillation(load_config("digits/dmd2", ["train.max_steps=200"]))
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from .config import ConfigError, RunConfig, TeacherConfig, from_dict, load_config, save_config, to_dict
from .teachers.base import DiffusionTeacher

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("STEPDISTILL_CACHE", Path.home() / ".cache" / "stepdistill"))


# ---------------------------------------------------------------------------------------------
# teachers


def embedded_teacher_dir(preset: str = "digits/teacher", overrides: list[str] | None = None) -> Path:
    """Cache folder of an embedded teacher, keyed by the resolved preset (any change retrains)."""
    cfg = load_config(preset, overrides or [])
    key = json.dumps({"teacher": to_dict(cfg.teacher), "train": _teacher_train_key(cfg)}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir() / "teachers" / f"{Path(preset).parent.name or preset}-{digest}"


def _teacher_train_key(cfg: RunConfig) -> dict:
    t = to_dict(cfg.train)
    for k in ("output_dir", "progress", "report_to", "log_every_steps", "sample_every_steps", "resume"):
        t.pop(k, None)
    return t


def ensure_embedded_teacher(preset: str = "digits/teacher", overrides: list[str] | None = None, quiet=False) -> Path:
    """Return the cached embedded teacher pipeline folder, training it first if missing."""
    out = embedded_teacher_dir(preset, overrides)
    if (out / "pipeline" / "model_index.json").exists():
        return out / "pipeline"
    if not quiet:
        print(f"[stepdistill] embedded teacher not cached; training it once into {out} ...", flush=True)
    run_teacher_training(load_config(preset, overrides or []), out)
    return out / "pipeline"


def build_teacher(tcfg: TeacherConfig, device: torch.device | str = "cpu") -> DiffusionTeacher:
    kind = tcfg.kind
    if kind == "analytic":
        from .teachers.analytic import GaussianMixtureTeacher

        params = dict(tcfg.params)
        params.setdefault("guidance_scale", tcfg.guidance_scale)
        teacher = GaussianMixtureTeacher.from_params(params)
    elif kind in ("diffusers", "digits"):
        from .teachers.diffusion import DiffusersTeacher

        if kind == "digits":
            path = tcfg.path or str(ensure_embedded_teacher(tcfg.params.get("preset", "digits/teacher")))
        else:
            if not tcfg.path:
                raise ConfigError("teacher.path is required for teacher.kind=diffusers (a pipeline folder or hub id)")
            path = tcfg.path
        if tcfg.dtype not in DTYPES:
            raise ConfigError(f"teacher.dtype must be one of {', '.join(DTYPES)}, got {tcfg.dtype!r}")
        teacher = DiffusersTeacher.from_pretrained(
            path,
            prediction_type=tcfg.prediction_type,
            guidance_scale=tcfg.guidance_scale,
            dtype=DTYPES[tcfg.dtype],
        )
    elif kind == "ar":
        return build_ar_teacher(tcfg, device)
    else:
        raise ConfigError(f"teacher.kind must be analytic | diffusers | digits | ar, got {kind!r}")
    return teacher.to(device)


# ---------------------------------------------------------------------------------------------
# teacher training


def run_teacher_training(cfg: RunConfig, output: str | Path, progress: bool | None = None) -> Path:
    """Train the embedded class-conditional UNet teacher; write a pipeline folder to output/pipeline."""
    from .data.sources import build_source
    from .export import export_teacher_pipeline
    from .teachers.diffusion import DiffusersTeacher
    from .teachers.training import DenoiserTraining, UNetSpec
    from .training import train

    output = Path(output)
    spec = from_dict(UNetSpec, cfg.teacher.params.get("unet", {}), prefix="teacher.params.unet.")
    algo = DenoiserTraining(spec)
    cfg.train.output_dir = str(output / "train")
    if progress is not None:
        cfg.train.progress = progress
    if cfg.train.dataset is None:
        raise ConfigError("teacher training needs train.dataset (e.g. digits, an image folder or hf:<path>)")
    source = build_source(cfg.train, None, needs_data=True)

    def sample_fn(step: int):
        net = algo.unet
        teacher = DiffusersTeacher(net, dict(algo.scheduler.config), num_classes=spec.num_classes)
        n = cfg.train.num_sample_images
        labels = torch.arange(n) % spec.num_classes
        was = net.training
        net.eval()
        x = teacher.sample(n, teacher.encode_conditions(labels), num_steps=10, sampler="ddim",
                           generator=torch.Generator().manual_seed(0))
        net.train(was)
        return x.clamp(-1, 1)

    result = train(algo, source, cfg.train, sample_fn=sample_fn, run_config=to_dict(cfg))
    unet = algo.unet
    ema = result.get("ema") if isinstance(result, dict) else None
    if ema is not None:
        unet.load_state_dict(ema)
    pipe_dir = output / "pipeline"
    if pipe_dir.exists():
        shutil.rmtree(pipe_dir)
    export_teacher_pipeline(unet, algo.scheduler, spec.num_classes, pipe_dir)
    save_config(cfg, output / "config.yaml")
    return pipe_dir


# ---------------------------------------------------------------------------------------------
# distillation


def validate_algorithm(cfg: RunConfig) -> None:
    """Check ``algorithm.name`` and ``algorithm.params`` against the algorithm's Config dataclass."""
    from .algorithms import REGISTRY

    name = cfg.algorithm.name
    if name not in REGISTRY:
        raise ConfigError(f"unknown algorithm '{name}'; available: {', '.join(sorted(REGISTRY))}")
    from_dict(REGISTRY[name].Config, cfg.algorithm.params, prefix="algorithm.params.")


def seed_build(cfg: RunConfig) -> None:
    """Seed the global RNGs from ``train.seed`` before the distiller is built, so its random inits
    (GAN head, LoRA, smaller students) depend on the config alone, not on what the process did
    before (a benchmark running several configs, the demo training its teacher first).  Training
    steps are seeded separately by the loop."""
    import random

    import numpy as np

    from .data.sources import derive_seed

    seed = derive_seed("build", cfg.train.seed)
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def run_distillation(cfg: RunConfig, export: bool = True, eval_fn=None, eval_every_steps: int | None = None) -> dict:
    """Build teacher + algorithm from ``cfg``, train under the generic loop, export the student.

    ``eval_fn(step, distiller) -> dict`` (optional) runs every ``eval_every_steps`` steps with the EMA
    weights swapped in; its scalars are logged (e.g. FID during training).
    """
    from .algorithms import build
    from .data.sources import build_source
    from .training import train

    if cfg.teacher.kind == "ar":  # Distilled Decoding: token pairs, AR exports
        return run_ar_distillation(cfg, export=export, eval_fn=eval_fn, eval_every_steps=eval_every_steps)
    validate_algorithm(cfg)  # fail on a typo before loading (or training) a teacher
    teacher = build_teacher(cfg.teacher)
    seed_build(cfg)
    distiller = build(cfg.algorithm.name, teacher, cfg.algorithm.params)
    source = build_source(cfg.train, teacher, needs_data=distiller.needs_data)
    gen = distiller.generator_for_export()
    n = cfg.train.num_sample_images
    sample_gen = gen[0] if isinstance(gen, list) else gen  # MSD: grids of the first student

    def sample_fn(step: int):
        g = torch.Generator().manual_seed(cfg.train.seed)
        raw = teacher.random_raw_conditions(n, g)
        if raw is not None and getattr(teacher, "num_classes", None):
            raw = torch.arange(n) % teacher.num_classes
        cond = teacher.encode_conditions(raw) if raw is not None else None
        if isinstance(gen, list) and raw is not None:  # route each class to its student
            z = torch.randn((n, *sample_gen.sample_shape), generator=g)
            x0 = torch.zeros_like(z)
            with torch.no_grad():
                for k, student in enumerate(gen):
                    idx = torch.tensor([i for i in range(n) if distiller.route[int(raw[i])] == k], dtype=torch.long)
                    if len(idx):
                        x0[idx] = student(z[idx], teacher.encode_conditions(raw[idx]))
                img = teacher.decode(x0)
            return img.clamp(-1, 1)
        z = torch.randn((n, *sample_gen.sample_shape), generator=g)
        was = sample_gen.training
        sample_gen.eval()
        with torch.no_grad():
            x0 = sample_gen(z, cond, generator=g)
            img = teacher.decode(x0)
        sample_gen.train(was)
        return img.clamp(-1, 1) if img.ndim == 4 else img  # 2-D toys: scatter plot

    result = train(distiller, source, cfg.train, sample_fn=sample_fn, run_config=to_dict(cfg),
                   eval_fn=(lambda step: eval_fn(step, distiller)) if eval_fn is not None else None,
                   eval_every_steps=eval_every_steps)
    result = dict(result) if isinstance(result, dict) else {"result": result}
    if export and hasattr(teacher, "model") and isinstance(gen, list):  # MSD: one pipeline, K students
        from .export import export_multi_student

        out = Path(cfg.train.output_dir) / "pipeline"
        export_multi_student(gen, teacher, distiller.route, out, algorithm=distiller.name, paper=distiller.paper,
                             extra={"config": to_dict(cfg)}, overwrite=True)
        result["pipeline"] = str(out)
    elif export and hasattr(teacher, "model"):
        from .export import export_generator

        out = Path(cfg.train.output_dir) / "pipeline"
        export_generator(
            gen,
            teacher,
            out,
            algorithm=distiller.name,
            paper=distiller.paper,
            extra={"config": to_dict(cfg)},
            use_ema_state=result.get("ema"),
            overwrite=True,
        )
        result["pipeline"] = str(out)
    result["distiller"] = distiller
    return result


# ---------------------------------------------------------------------------------------------
# export of a finished or interrupted run


def load_run(run_dir: str | Path, checkpoint: str = "latest"):
    """``(cfg, checkpoint folder, teacher, distiller)`` of a training run folder."""
    from .algorithms import build
    from .training import latest_checkpoint

    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{run_dir} has no config.yaml; is it a folder written by `stepdistill train`?")
    cfg = load_config(str(cfg_file))
    ckpt = latest_checkpoint(run_dir) if checkpoint == "latest" else Path(checkpoint)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint under checkpoints/")
    if cfg.teacher.kind == "ar":
        from .algorithms import distilled_decoding  # noqa: F401  (registers "dd")
    teacher = build_teacher(cfg.teacher)
    return cfg, ckpt, teacher, build(cfg.algorithm.name, teacher, cfg.algorithm.params)


def export_run(run_dir: str | Path, output: str | Path, checkpoint: str = "latest", use_ema: bool = True,
               overwrite: bool = False) -> Path:
    """Export the generator of a training run (its ``config.yaml`` + a checkpoint) as a pipeline;
    Distilled Decoding runs (``teacher.kind: ar``) go to :func:`export_ar_run`."""
    from .export import export_generator
    from .training import load_checkpoint_weights

    cfg, ckpt, teacher, distiller = load_run(run_dir, checkpoint)
    if cfg.teacher.kind == "ar":
        return _export_ar(cfg, ckpt, teacher, distiller, output, use_ema, overwrite)
    groups = distiller.trainable()
    ema_group = getattr(distiller, "ema_group", "generator")
    state = None
    if use_ema and (ckpt / f"{ema_group}_ema.safetensors").exists():
        state = load_checkpoint_weights(ckpt, ema_group, ema=True)
    else:
        state = load_checkpoint_weights(ckpt, ema_group)
    groups[ema_group].load_state_dict(state)
    return export_generator(
        distiller.generator_for_export(),
        teacher,
        Path(output),
        algorithm=distiller.name,
        paper=distiller.paper,
        extra={"config": to_dict(cfg), "checkpoint": str(ckpt)},
        overwrite=overwrite,
    )


# =============================================================================================
# Autoregressive teachers (VQ + causal LM) and Distilled Decoding.  The lead dispatches to these
# on ``cfg.teacher.kind == "ar"`` (teacher training, build_teacher, run_distillation).

AR_TEACHER_PARAMS = ("preset", "temperature", "top_k", "top_p")


def ensure_embedded_ar_teacher(preset: str = "digits-ar/teacher", overrides: list[str] | None = None,
                               quiet: bool = False) -> Path:
    """Return the cached embedded AR teacher pipeline folder, training it first if missing."""
    out = embedded_teacher_dir(preset, overrides)
    if (out / "pipeline" / "model_index.json").exists():
        return out / "pipeline"
    if not quiet:
        print(f"[stepdistill] embedded AR teacher not cached; training it once into {out} ...", flush=True)
    run_ar_teacher_training(load_config(preset, overrides or []), out)
    return out / "pipeline"


def build_ar_teacher(tcfg: TeacherConfig, device: torch.device | str = "cpu"):
    """``teacher.kind: ar``: an ``ARImagePipeline`` folder (``teacher.path``) or the embedded digits
    AR teacher (``teacher.params.preset``, default ``digits-ar/teacher``, trained and cached on first
    use).  ``teacher.guidance_scale`` and ``teacher.params.{temperature, top_k, top_p}`` set the
    sampling distribution the teacher represents (and Distilled Decoding distils)."""
    from .teachers.autoregressive import ARTeacher

    params = dict(tcfg.params or {})
    unknown = [k for k in params if k not in AR_TEACHER_PARAMS]
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join('teacher.params.' + k for k in unknown)} for teacher.kind=ar; "
            f"allowed: {', '.join(AR_TEACHER_PARAMS)}"
        )
    if tcfg.dtype not in DTYPES:
        raise ConfigError(f"teacher.dtype must be one of {', '.join(DTYPES)}, got {tcfg.dtype!r}")
    path = tcfg.path or str(ensure_embedded_ar_teacher(params.get("preset", "digits-ar/teacher")))
    teacher = ARTeacher.from_pretrained(
        path,
        dtype=DTYPES[tcfg.dtype],
        guidance_scale=tcfg.guidance_scale,
        temperature=params.get("temperature"),
        top_k=params.get("top_k"),
        top_p=params.get("top_p"),
    )
    return teacher.to(device)


def run_ar_teacher_training(cfg: RunConfig, output: str | Path, progress: bool | None = None) -> Path:
    """Train the embedded AR teacher (``teacher.kind: ar``): the VQ tokenizer
    (``teacher.params.vq_train``), then the causal LM on the tokenised data set (the ``train``
    section), both under the generic loop (checkpoints in ``output/train-vq``, ``output/train-lm``;
    ``train.resume=latest`` continues either stage); writes ``output/pipeline`` (``ARImagePipeline``)
    and ``output/teacher_training.json`` (stage times, codebook usage, reconstruction error)."""
    import dataclasses
    import time

    from .data.sources import TensorSource, build_source
    from .export import export_ar_teacher_pipeline
    from .teachers.autoregressive import (
        ARLMTraining,
        ARTeacher,
        ARTeacherSpec,
        VQTraining,
        build_transformer,
        grid_of,
        quantize_indices,
    )
    from .training import train

    output = Path(output)
    spec = from_dict(ARTeacherSpec, cfg.teacher.params, prefix="teacher.params.")
    if cfg.train.dataset is None:
        raise ConfigError("AR teacher training needs train.dataset (e.g. digits, an image folder or hf:<path>)")
    if progress is not None:
        cfg.train.progress = progress
    source = build_source(cfg.train, None, needs_data=True)
    if not isinstance(source, TensorSource) or source.labels is None or not isinstance(source.labels, torch.Tensor):
        raise ConfigError("AR teacher training needs a labelled image data set (class ids), e.g. train.dataset=digits")

    # stage 1: the tokenizer
    vq_cfg = dataclasses.replace(
        cfg.train, output_dir=str(output / "train-vq"), max_steps=spec.vq_train.max_steps,
        batch_size=spec.vq_train.batch_size, lr={}, default_lr=spec.vq_train.lr, ema_decay=None,
        sample_every_steps=0, warmup_steps=0,
    )
    vq_algo = VQTraining(spec.vq, spec.vq_train)
    t0 = time.perf_counter()
    train(vq_algo, source, vq_cfg, run_config=to_dict(cfg))
    vq_seconds = time.perf_counter() - t0
    vqvae = vq_algo.vqvae.eval().requires_grad_(False)

    # tokenise the data set
    images = source.images
    t0 = time.perf_counter()
    with torch.no_grad():
        toks, sq = [], 0.0
        for i in range(0, images.shape[0], 512):
            x = images[i : i + 512]
            x = x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.float()
            toks.append(quantize_indices(vqvae, x))
            rec = vqvae.decode(vqvae.encode(x).latents, return_dict=False)[0].clamp(-1, 1)
            sq += float((rec - x).pow(2).sum())
        tokens = torch.cat(toks)
    recon_mse = sq / images.numel()
    codebook_size = spec.vq.num_vq_embeddings
    codes_used = int(torch.unique(tokens).numel())
    h, w = grid_of(vqvae)

    # stage 2: the causal LM
    transformer = build_transformer(spec.lm, codebook_size, spec.num_classes, h * w)
    lm_algo = ARLMTraining(spec.lm, transformer, codebook_size, spec.num_classes)
    lm_source = TensorSource(tokens, source.labels, seed=cfg.train.seed)
    lm_cfg = dataclasses.replace(cfg.train, output_dir=str(output / "train-lm"))

    def make_teacher() -> ARTeacher:
        return ARTeacher(vqvae, lm_algo.transformer, spec.num_classes, (h, w), cfg.teacher.guidance_scale,
                         spec.temperature, spec.top_k, spec.top_p)

    def sample_fn(step: int):
        teacher = make_teacher()
        was = teacher.transformer.training
        teacher.transformer.eval()
        n = cfg.train.num_sample_images
        x = teacher.sample(class_labels=torch.arange(n) % spec.num_classes, generator=torch.Generator().manual_seed(0),
                           decode=True)
        teacher.transformer.train(was)
        return x

    result = train(lm_algo, lm_source, lm_cfg, sample_fn=sample_fn, run_config=to_dict(cfg))
    lm_seconds = time.perf_counter() - t0
    if isinstance(result, dict) and result.get("ema") is not None:
        lm_algo.transformer.load_state_dict(result["ema"])
    lm_algo.transformer.eval().requires_grad_(False)
    teacher = make_teacher()
    info = {
        "vq_seconds": round(vq_seconds, 1),
        "lm_seconds": round(lm_seconds, 1),
        "codes_used": codes_used,
        "codebook_size": codebook_size,
        "recon_mse": recon_mse,
        "num_tokens": h * w,
        "lm_parameters": sum(p.numel() for p in transformer.parameters()),
        "vq_parameters": sum(p.numel() for p in vqvae.parameters()),
        "final_ce": (result.get("logs") or {}).get("transformer/ce") if isinstance(result, dict) else None,
    }
    pipe_dir = output / "pipeline"
    export_ar_teacher_pipeline(teacher, pipe_dir, overwrite=True, metrics={"recon_mse": recon_mse},
                               extra={"training": info, "config": to_dict(cfg)})
    (output / "teacher_training.json").write_text(json.dumps(info, indent=2) + "\n")
    save_config(cfg, output / "config.yaml")
    return pipe_dir


def run_ar_distillation(cfg: RunConfig, export: bool = True, eval_fn=None, eval_every_steps: int | None = None) -> dict:
    """``run_distillation`` for autoregressive teachers (Distilled Decoding): build the AR teacher,
    generate (or reuse) the pair set, train on it under the generic loop, export a
    ``DistilledDecodingPipeline`` to ``train.output_dir/pipeline``.  Same arguments and result keys
    as :func:`run_distillation` (plus ``pair_set``)."""
    from . import algorithms
    from .algorithms import distilled_decoding  # noqa: F401  (registers "dd")
    from .training import train

    validate_algorithm(cfg)
    if cfg.train.dataset is not None:
        raise ConfigError(
            "Distilled Decoding is data-free (its pairs come from the teacher); unset train.dataset"
        )
    teacher = build_teacher(cfg.teacher)
    seed_build(cfg)
    distiller = algorithms.build(cfg.algorithm.name, teacher, cfg.algorithm.params)
    from accelerate import PartialState

    state = PartialState()  # the launch's rank and world size (1 process without a launcher)
    rank, world = state.process_index, state.num_processes
    source = distiller.make_source(seed=cfg.train.seed, rank=rank, world=world, progress=cfg.train.progress)
    student = distiller.generator_for_export()
    n = cfg.train.num_sample_images

    def sample_fn(step: int):
        g = torch.Generator().manual_seed(cfg.train.seed)
        labels = torch.arange(n) % teacher.num_classes
        z = torch.randn((n, *student.sample_shape), generator=g)
        was = student.training
        student.eval()
        with torch.no_grad():
            img = teacher.decode(student(z.to(student.codes.device), labels.to(student.codes.device)))
        student.train(was)
        return img

    result = train(distiller, source, cfg.train, sample_fn=sample_fn, run_config=to_dict(cfg),
                   eval_fn=(lambda step: eval_fn(step, distiller)) if eval_fn is not None else None,
                   eval_every_steps=eval_every_steps)
    result = dict(result) if isinstance(result, dict) else {"result": result}
    result["pair_set"] = str(distiller.pair_set().folder)
    if export:
        from .export import export_dd_pipeline

        out = Path(cfg.train.output_dir) / "pipeline"
        export_dd_pipeline(student, teacher, out, algorithm=distiller.name, paper=distiller.paper,
                           extra={"config": to_dict(cfg), "pair_set": distiller.pair_set().key},
                           use_ema_state=result.get("ema"), overwrite=True)
        result["pipeline"] = str(out)
    result["distiller"] = distiller
    return result


def export_ar_run(run_dir: str | Path, output: str | Path, checkpoint: str = "latest", use_ema: bool = True,
                  overwrite: bool = False) -> Path:
    """``export_run`` for Distilled Decoding runs (``teacher.kind: ar``): the student of a checkpoint
    (EMA weights if saved) as a ``DistilledDecodingPipeline`` folder."""
    cfg, ckpt, teacher, distiller = load_run(run_dir, checkpoint)
    return _export_ar(cfg, ckpt, teacher, distiller, output, use_ema, overwrite)


def _export_ar(cfg, ckpt, teacher, distiller, output, use_ema: bool, overwrite: bool) -> Path:
    from .export import export_dd_pipeline
    from .training import load_checkpoint_weights

    ema = use_ema and (ckpt / "generator_ema.safetensors").exists()
    state = load_checkpoint_weights(ckpt, "generator", ema=ema)
    distiller.student.load_state_dict(state)
    return export_dd_pipeline(distiller.generator_for_export(), teacher, Path(output), algorithm=distiller.name,
                              paper=distiller.paper, extra={"config": to_dict(cfg), "checkpoint": str(ckpt)},
                              overwrite=overwrite)
