"""Glue between configuration and the library: build teachers, train teachers, run distillation.

Everything the CLI does goes through these functions, so Python users get the same behaviour:

    from stepdistill.config import load_config
    from stepdistill.run import run_distillation
    result = run_distillation(load_config("digits/dmd2", ["train.max_steps=200"]))

There is one dispatch point per question: :data:`TEACHER_BUILDERS` (``teacher.kind`` -> teacher),
:data:`TEACHER_TRAINERS` (``teacher.kind`` -> teacher training) and the algorithm registry
(``algorithm.name`` -> :class:`~stepdistill.algorithms.base.Distiller`).  Everything else a run
needs -- its batch source, sample grid, which groups an export loads and which pipeline it writes --
the algorithm answers itself, so nothing here branches on the algorithm or the teacher kind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .config import ConfigError, RunConfig, TeacherConfig, from_dict, load_config, save_config, to_dict
from .utils import DTYPES, cache_dir  # noqa: E402,F401  (one definition for the package; re-exported)

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
    if t.get("mixed_precision") is None:  # the launcher's choice; in-process that is "no" (same cache key)
        t["mixed_precision"] = "no"
    return t


def ensure_embedded_teacher(preset: str = "digits/teacher", overrides: list[str] | None = None, quiet=False) -> Path:
    """Return the cached embedded teacher pipeline folder (any ``teacher.kind`` with a trainer),
    training it first if missing."""
    out = embedded_teacher_dir(preset, overrides)
    if (out / "pipeline" / "model_index.json").exists():
        return out / "pipeline"
    cfg = load_config(preset, overrides or [])
    if not quiet:
        print(f"[stepdistill] embedded {cfg.teacher.kind} teacher not cached; training it once into {out} ...",
              flush=True)
    train_teacher(cfg, out)
    return out / "pipeline"


def ensure_embedded_ar_teacher(preset: str = "digits-ar/teacher", overrides: list[str] | None = None,
                               quiet: bool = False) -> Path:
    """:func:`ensure_embedded_teacher` with the AR digits preset as default."""
    return ensure_embedded_teacher(preset, overrides, quiet)


def _dtype(tcfg: TeacherConfig) -> torch.dtype:
    if tcfg.dtype not in DTYPES:
        raise ConfigError(f"teacher.dtype must be one of {', '.join(DTYPES)}, got {tcfg.dtype!r}")
    return DTYPES[tcfg.dtype]


def _analytic_teacher(tcfg: TeacherConfig):
    from .teachers.analytic import GaussianMixtureTeacher

    params = dict(tcfg.params)
    params.setdefault("guidance_scale", tcfg.guidance_scale)
    return GaussianMixtureTeacher.from_params(params)


#: ``teacher.params`` keys of the diffusers-folder kinds (``diffusers``, ``digits``): how the folder is
#: loaded, not what it is (``preset``: the embedded digits teacher's preset)
DIFFUSERS_TEACHER_PARAMS = ("preset", "offload_frozen", "sample_shape", "resolution", "guidance_embeds")


def _diffusers_teacher(tcfg: TeacherConfig):
    """``teacher.kind: diffusers`` (``teacher.path``) or ``digits`` (the embedded teacher, trained and
    cached on first use unless ``teacher.path`` names a folder).

    ``teacher.params``: ``sample_shape: [C, H, W]`` (the denoised latent / pixel shape; default: the
    denoiser config's) or ``resolution`` (pixels, square; the latent shape from the folder's VAE
    config), and ``offload_frozen: true`` (:meth:`DiffusersTeacher.offload_frozen_parts`: the frozen
    text encoder(s) and VAE stay in host memory while the denoisers sit on the accelerator), and
    ``guidance_embeds: true | false`` (FLUX: the checkpoint must / must not be guidance-distilled)."""
    from .teachers.diffusion import DiffusersTeacher

    params = dict(tcfg.params or {})
    unknown = [k for k in params if k not in DIFFUSERS_TEACHER_PARAMS]
    if unknown and tcfg.kind == "diffusers":
        raise ConfigError(
            f"unknown key(s) {', '.join('teacher.params.' + k for k in unknown)} for teacher.kind=diffusers; "
            f"allowed: {', '.join(k for k in DIFFUSERS_TEACHER_PARAMS if k != 'preset')}"
        )
    if tcfg.kind == "digits":
        path = tcfg.path or str(ensure_embedded_teacher(params.get("preset", "digits/teacher")))
    else:
        if not tcfg.path:
            raise ConfigError("teacher.path is required for teacher.kind=diffusers (a pipeline folder or hub id)")
        path = tcfg.path
    offload = params.get("offload_frozen", False)
    if not isinstance(offload, bool):
        raise ConfigError(f"teacher.params.offload_frozen must be true or false, got {offload!r}")
    dtype = _dtype(tcfg)
    teacher = DiffusersTeacher.from_pretrained(path, prediction_type=tcfg.prediction_type,
                                               guidance_scale=tcfg.guidance_scale, dtype=dtype,
                                               sample_shape=_sample_shape(params, path))
    _check_guidance_embeds(params.get("guidance_embeds"), teacher, path)
    return teacher.offload_frozen_parts() if offload else teacher


def _check_guidance_embeds(want, teacher, path: str) -> None:
    """``teacher.params.guidance_embeds``: a FLUX preset's expectation of the checkpoint.  ``true``
    (FLUX.1-dev presets): the guidance is a network input; a checkpoint without the embedding
    (FLUX.1-schnell) would otherwise load and run true CFG at the preset's scale.  ``false``: the
    opposite.  A one-line :class:`TeacherLoadError` names what was expected."""
    if want is None:
        return
    if not isinstance(want, bool):
        raise ConfigError(f"teacher.params.guidance_embeds must be true or false, got {want!r}")
    from .teachers.diffusion import TeacherLoadError
    from .teachers.flow_transformers import FLUX_GUIDANCE_PREFIX, FluxTeacher

    has = bool(getattr(teacher, "embedded_guidance", False)) if isinstance(teacher, FluxTeacher) else None
    if has is None:
        raise ConfigError(f"teacher.params.guidance_embeds applies to FLUX teachers; {path} holds a "
                          f"{type(teacher.model).__name__}")
    if has != want:
        expected = ("a guidance-distilled FLUX checkpoint (FLUX.1-dev style: transformer/config.json "
                    f"guidance_embeds=true and {FLUX_GUIDANCE_PREFIX}* weights)" if want else
                    "a FLUX checkpoint without a guidance embedding (FLUX.1-schnell style)")
        found = "has a guidance embedding" if has else "has no guidance embedding"
        raise TeacherLoadError(f"{path}: teacher.params.guidance_embeds={str(want).lower()} expects {expected}, "
                               f"but this one {found}; point teacher.path at the matching checkpoint")


def _sample_shape(params: dict, path: str) -> tuple[int, ...] | None:
    """``teacher.params.sample_shape`` ([C, H, W]) or the latent shape of ``teacher.params.resolution``
    pixels (read from the local folder's ``vae/config.json``: ``latent_channels`` and a downsampling of
    ``2 ** (len(block_out_channels) - 1)``; a pixel-space folder: the denoiser's ``in_channels``, no
    downsampling); None when neither is set (the denoiser config's own size)."""
    shape, res = params.get("sample_shape"), params.get("resolution")
    if shape is not None and res is not None:
        raise ConfigError("give teacher.params.sample_shape or teacher.params.resolution, not both")
    if shape is not None:
        if (not isinstance(shape, (list, tuple)) or len(shape) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape)):
            raise ConfigError(f"teacher.params.sample_shape must be [C, H, W] (whole numbers >= 1), got {shape!r}")
        return tuple(shape)
    if res is None:
        return None
    if not isinstance(res, int) or isinstance(res, bool) or res < 1:
        raise ConfigError(f"teacher.params.resolution must be a whole number of pixels >= 1, got {res!r}")
    root = Path(path)
    if not (root / "model_index.json").exists():
        raise ConfigError(f"teacher.params.resolution needs a local pipeline folder (teacher.path={path!r}); "
                          "give teacher.params.sample_shape [C, H, W] instead")
    vae_cfg = root / "vae" / "config.json"
    if vae_cfg.exists():
        vae = json.loads(vae_cfg.read_text())
        channels, factor = int(vae["latent_channels"]), 2 ** (len(vae["block_out_channels"]) - 1)
    else:
        net = next((root / n / "config.json" for n in ("unet", "transformer") if (root / n / "config.json").exists()),
                   None)
        if net is None:
            raise ConfigError(f"{path}: no vae/, unet/ or transformer/ config to derive the latent shape of "
                              "teacher.params.resolution from; give teacher.params.sample_shape [C, H, W]")
        channels, factor = int(json.loads(net.read_text())["in_channels"]), 1
    if res % factor:
        raise ConfigError(f"teacher.params.resolution={res} is not a multiple of the VAE's downsampling "
                          f"factor {factor}")
    return (channels, res // factor, res // factor)


AR_TEACHER_PARAMS = ("preset", "temperature", "top_k", "top_p")


def build_ar_teacher(tcfg: TeacherConfig, device: torch.device | str = "cpu"):
    """``teacher.kind: ar``: an ``ARImagePipeline`` folder or a VAR ``VARPipeline`` folder (``teacher.path``; a
    :class:`~stepdistill.teachers.var.VARTeacher`), or the embedded digits
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
    dtype = _dtype(tcfg)
    path = tcfg.path or str(ensure_embedded_teacher(params.get("preset", "digits-ar/teacher")))
    from .teachers.var import VARTeacher, is_var_folder

    if is_var_folder(path):  # a VAR (next-scale) teacher folder (python -m stepdistill.teachers.convert_var)
        return VARTeacher.from_pretrained(path, dtype=dtype, guidance_scale=tcfg.guidance_scale,
                                          temperature=params.get("temperature"), top_k=params.get("top_k"),
                                          top_p=params.get("top_p")).to(device)
    teacher = ARTeacher.from_pretrained(path, dtype=dtype, guidance_scale=tcfg.guidance_scale,
                                        temperature=params.get("temperature"), top_k=params.get("top_k"),
                                        top_p=params.get("top_p"))
    return teacher.to(device)


#: ``teacher.kind`` -> ``builder(TeacherConfig) -> teacher`` (the one place teacher kinds are told apart)
TEACHER_BUILDERS: dict[str, Callable] = {
    "analytic": _analytic_teacher,
    "diffusers": _diffusers_teacher,
    "digits": _diffusers_teacher,
    "ar": build_ar_teacher,
    "t2i": lambda tcfg: _t2i_teacher(tcfg),
}


def _t2i_teacher(tcfg):
    """``teacher.kind: t2i``: the embedded text-to-image teacher (trained and cached on first use)."""
    from .t2i_teacher import build_t2i_teacher

    return build_t2i_teacher(tcfg)


def build_teacher(tcfg: TeacherConfig, device: torch.device | str = "cpu"):
    """The teacher ``teacher.kind`` names (see :data:`TEACHER_BUILDERS`)."""
    builder = TEACHER_BUILDERS.get(tcfg.kind)
    if builder is None:
        raise ConfigError(f"teacher.kind must be {' | '.join(TEACHER_BUILDERS)}, got {tcfg.kind!r}")
    return builder(tcfg).to(device)


# ---------------------------------------------------------------------------------------------
# teacher training


def _main_only(result: dict, fn: Callable, what: str):
    """Run ``fn`` on the main process of the run's accelerator (files are written once)."""
    from .training.distributed import on_main

    return on_main(result["accelerator"], fn, what)


def run_teacher_training(cfg: RunConfig, output: str | Path, progress: bool | None = None) -> Path:
    """Train the embedded class-conditional UNet teacher; write a pipeline folder to output/pipeline."""
    from .data.sources import build_source
    from .teachers.training import UNetSpec
    from .training import train
    from .training.tasks import DenoiserTraining

    output = Path(output)
    spec = from_dict(UNetSpec, cfg.teacher.params.get("unet", {}), prefix="teacher.params.unet.")
    task = DenoiserTraining(spec)
    cfg.train.output_dir = str(output / "train")
    if progress is not None:
        cfg.train.progress = progress
    if cfg.train.dataset is None:
        raise ConfigError("teacher training needs train.dataset (e.g. digits, an image folder or hf:<path>)")
    source = build_source(cfg.train, None, needs_data=True)
    n = cfg.train.num_sample_images
    result = train(task, source, cfg.train, run_config=to_dict(cfg),
                   sample_fn=lambda step: task.sample_images(n, torch.Generator().manual_seed(0)))
    pipe_dir = output / "pipeline"

    def write() -> None:
        task.export(pipe_dir, ema_state=result.get("ema"), overwrite=True)
        save_config(cfg, output / "config.yaml")

    _main_only(result, write, "exporting the teacher")
    return pipe_dir


def _tokenise(vqvae, images: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Token indices of a uint8 / [-1, 1] image set and the VQ reconstruction MSE."""
    from .teachers.autoregressive import quantize_indices

    with torch.no_grad():
        toks, sq = [], 0.0
        for i in range(0, images.shape[0], 512):
            x = images[i : i + 512]
            x = x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.float()
            toks.append(quantize_indices(vqvae, x))
            rec = vqvae.decode(vqvae.encode(x).latents, return_dict=False)[0].clamp(-1, 1)
            sq += float((rec - x).pow(2).sum())
    return torch.cat(toks), sq / images.numel()


def run_ar_teacher_training(cfg: RunConfig, output: str | Path, progress: bool | None = None) -> Path:
    """Train the embedded AR teacher (``teacher.kind: ar``): the VQ tokenizer
    (``teacher.params.vq_train``), then the causal LM on the tokenised data set (the ``train``
    section), both under the generic trainer (checkpoints in ``output/train-vq``, ``output/train-lm``;
    ``train.resume=latest`` continues either stage); writes ``output/pipeline`` (``ARImagePipeline``)
    and ``output/teacher_training.json`` (stage times, codebook usage, reconstruction error)."""
    from .data.sources import TensorSource, build_source
    from .export import export_ar_teacher_pipeline
    from .teachers.autoregressive import ARTeacher, ARTeacherSpec, build_transformer, grid_of
    from .training import train
    from .training.tasks import ARLMTraining, VQTraining

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
    vq_task = VQTraining(spec.vq, spec.vq_train)
    t0 = time.perf_counter()
    train(vq_task, source, vq_cfg, run_config=to_dict(cfg))
    vq_seconds = time.perf_counter() - t0
    vqvae = vq_task.vqvae.eval().requires_grad_(False)
    t0 = time.perf_counter()
    tokens, recon_mse = _tokenise(vqvae, source.images)
    h, w = grid_of(vqvae)

    # stage 2: the causal LM
    codebook_size = spec.vq.num_vq_embeddings
    transformer = build_transformer(spec.lm, codebook_size, spec.num_classes, h * w)

    def make_teacher() -> ARTeacher:
        return ARTeacher(vqvae, transformer, spec.num_classes, (h, w), cfg.teacher.guidance_scale,
                         spec.temperature, spec.top_k, spec.top_p)

    lm_task = ARLMTraining(spec.lm, transformer, codebook_size, spec.num_classes, make_teacher=make_teacher)
    lm_source = TensorSource(tokens, source.labels, seed=cfg.train.seed)
    lm_cfg = dataclasses.replace(cfg.train, output_dir=str(output / "train-lm"))
    n = cfg.train.num_sample_images
    result = train(lm_task, lm_source, lm_cfg, run_config=to_dict(cfg),
                   sample_fn=lambda step: lm_task.sample_images(n, torch.Generator().manual_seed(0)))
    lm_seconds = time.perf_counter() - t0
    if result.get("ema") is not None:
        transformer.load_state_dict(result["ema"])
    transformer.eval().requires_grad_(False)
    info = {
        "vq_seconds": round(vq_seconds, 1),
        "lm_seconds": round(lm_seconds, 1),
        "codes_used": int(torch.unique(tokens).numel()),
        "codebook_size": codebook_size,
        "recon_mse": recon_mse,
        "num_tokens": h * w,
        "lm_parameters": sum(p.numel() for p in transformer.parameters()),
        "vq_parameters": sum(p.numel() for p in vqvae.parameters()),
        "final_ce": (result.get("logs") or {}).get("transformer/ce"),
    }
    pipe_dir = output / "pipeline"

    def write() -> None:
        export_ar_teacher_pipeline(make_teacher(), pipe_dir, overwrite=True, metrics={"recon_mse": recon_mse},
                                   extra={"training": info, "config": to_dict(cfg)})
        (output / "teacher_training.json").write_text(json.dumps(info, indent=2) + "\n")
        save_config(cfg, output / "config.yaml")

    _main_only(result, write, "exporting the AR teacher")
    return pipe_dir


#: ``teacher.kind`` -> ``trainer(cfg, output) -> pipeline folder`` (``stepdistill teacher train``)
TEACHER_TRAINERS: dict[str, Callable] = {
    "digits": run_teacher_training,
    "diffusers": run_teacher_training,
    "ar": run_ar_teacher_training,
}


def train_teacher(cfg: RunConfig, output: str | Path, progress: bool | None = None) -> Path:
    """Train the teacher a preset describes (see :data:`TEACHER_TRAINERS`)."""
    trainer = TEACHER_TRAINERS.get(cfg.teacher.kind)
    if trainer is None:
        raise ConfigError(f"no teacher training for teacher.kind={cfg.teacher.kind!r}; "
                          f"trainable kinds: {', '.join(TEACHER_TRAINERS)}")
    return trainer(cfg, output, progress=progress)


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
    steps are seeded separately by the trainer, with the same helper."""
    from .data.sources import derive_seed
    from .training.loop import seed_all

    seed_all(derive_seed("build", cfg.train.seed))


def build_run(cfg: RunConfig):
    """``(teacher, distiller)`` of a run config, the distiller built under :func:`seed_build`."""
    from .algorithms import build

    validate_algorithm(cfg)  # fail on a typo before loading (or training) a teacher
    teacher = build_teacher(cfg.teacher)
    seed_build(cfg)
    return teacher, build(cfg.algorithm.name, teacher, cfg.algorithm.params)


def run_distillation(cfg: RunConfig, export: bool = True, eval_fn=None, eval_every_steps: int | None = None,
                     step_callback: Callable[[int, dict], None] | None = None) -> dict:
    """Build teacher + algorithm from ``cfg``, train under the generic trainer, export the student
    (on the main process) to ``train.output_dir/pipeline``.

    ``eval_fn(step, distiller) -> dict`` (optional) runs every ``eval_every_steps`` steps with the EMA
    weights swapped in; its scalars are logged (e.g. FID during training).  ``step_callback(steps_done,
    logs)`` is the trainer's per-step hook (benchmarks time steps with it).
    """
    from .training import train
    from .training.distributed import launch_state

    teacher, distiller = build_run(cfg)
    state = launch_state()  # the launch's rank and world size (1 process without a launcher)
    source = distiller.build_source(cfg.train, rank=state.process_index, world=state.num_processes)
    n, seed = cfg.train.num_sample_images, cfg.train.seed
    result = train(distiller, source, cfg.train, run_config=to_dict(cfg),
                   sample_fn=lambda step: distiller.sample_images(n, torch.Generator().manual_seed(seed)),
                   eval_fn=(lambda step: eval_fn(step, distiller)) if eval_fn is not None else None,
                   eval_every_steps=eval_every_steps, step_callback=step_callback)
    result = {**result, **distiller.run_info()}
    if export and distiller.exportable():
        out = Path(cfg.train.output_dir) / "pipeline"
        _main_only(result, lambda: distiller.export(out, ema_state=result.get("ema"), extra={"config": to_dict(cfg)},
                                                    overwrite=True), "exporting the pipeline")
        result["pipeline"] = str(out)
    result["distiller"] = distiller
    return result


#: the one entry for every teacher kind (kept for callers of the former AR-specific function)
run_ar_distillation = run_distillation


# ---------------------------------------------------------------------------------------------
# export of a finished or interrupted run


def load_run(run_dir: str | Path, checkpoint: str = "latest"):
    """``(cfg, checkpoint folder, teacher, distiller)`` of a training run folder."""
    from .algorithms import build
    from .errors import InputNotFoundError
    from .training.checkpoint import select_checkpoint

    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.exists():
        raise InputNotFoundError(f"{run_dir} has no config.yaml; is it a folder written by `stepdistill train`?")
    cfg = load_config(str(cfg_file))
    ckpt = select_checkpoint(run_dir, checkpoint)  # a damaged newest checkpoint falls back with a warning
    teacher = build_teacher(cfg.teacher)
    return cfg, ckpt, teacher, build(cfg.algorithm.name, teacher, cfg.algorithm.params)


def export_run(run_dir: str | Path, output: str | Path, checkpoint: str = "latest", use_ema: bool = True,
               overwrite: bool = False, lora: str = "auto") -> Path:
    """Export a training run (its ``config.yaml`` + a checkpoint) as the pipeline its algorithm
    writes: the groups ``distiller.export_groups()`` names are loaded (EMA weights for the EMA group
    when saved and ``use_ema``), then ``distiller.export(output, lora=lora)`` (``lora``: ``auto`` |
    ``both`` | ``adapter`` | ``fused``, see ``docs/lora.md``)."""
    import inspect

    from .export.common import ExportModeError, check_lora_mode, check_output_dir, protected_folders
    from .training import load_checkpoint_weights

    check_lora_mode(lora)  # an unknown mode fails before the (slow) teacher load
    run_dir = Path(run_dir)
    teacher_dir = _teacher_folder(run_dir)
    guard = ((run_dir, False, "the run folder"), (teacher_dir, True, "the teacher folder"))
    with protected_folders(*guard):
        check_output_dir(output, overwrite=overwrite)  # refuse before the (slow) teacher load
    cfg, ckpt, teacher, distiller = load_run(run_dir, checkpoint)
    groups = distiller.trainable()
    ema_group = distiller.resolve_ema_group(groups)
    for group in distiller.export_groups():
        ema = use_ema and group == ema_group and (ckpt / f"{group}_ema.safetensors").exists()
        groups[group].load_state_dict(load_checkpoint_weights(ckpt, group, ema=ema))
    kw = {}
    if lora != "auto":
        if "lora" not in inspect.signature(distiller.export).parameters:
            raise ExportModeError(f"lora={lora!r}: a {cfg.algorithm.name} run's export has no LoRA form; leave --lora out")
        kw["lora"] = lora
    with protected_folders(*guard):
        out = distiller.export(Path(output), extra={"config": to_dict(cfg), "checkpoint": str(ckpt)},
                               overwrite=overwrite, **kw)
    if out is None:
        raise ConfigError(f"the run {run_dir} has nothing to export (teacher.kind={cfg.teacher.kind} has no "
                          "pipeline form)")
    return out


def _teacher_folder(run_dir: Path) -> str | None:
    """The teacher folder a run's config names (``teacher.path``), if any; an export never writes there."""
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.exists():
        return None
    return load_config(str(cfg_file)).teacher.path or None


#: kept for callers of the former AR-specific function
export_ar_run = export_run
