"""``UNet2DModel`` students (pixel space, or latent space with the teacher's VAE) and class-conditional
``UNet2DModel`` teachers, as self-contained pipeline folders.

* class-conditional pixel students (no VAE) whose timesteps are ``LCMScheduler``'s default schedule
  for their number of steps (``[999]``, ``[999, 499]``, ``[999, 749, 499, 249]``, ... for 1000
  training timesteps) -> the **stock** ``ConsistencyModelPipeline`` with an ``LCMScheduler``: it runs
  exactly the training-time generator (``LCMScheduler.step``) and loads with
  ``DiffusionPipeline.from_pretrained(folder)``, no custom code;
* all other ``UNet2DModel`` students (latent students with the teacher's VAE, other timesteps,
  unconditional or learned-variance networks, or ``stock_pipeline=False``) -> ``OneStepPipeline``
  (``one_step.py`` written next to the weights by the pipeline's ``save_pretrained``, list-form
  ``_class_name``);
* teachers -> ``ClassConditionalPipeline`` (``class_conditional.py``, ``num_classes`` top-level in
  ``model_index.json``).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .common import (
    SCHEDULER_CALL_KEY,
    SCHEDULER_NUM_CLASSES_KEY,
    ExportError,
    UnsupportedStudentError,
    atomic_output_dir,
    fp32,
    frozen_part,
    lcm_scheduler,
    model_card,
    provenance,
    remote_code_snippet,
    student_card,
    student_meta,
    student_network,
    training_timesteps,
    unwrap,
    write_metadata,
)

ONE_STEP_NOTE = (
    "`one_step.py` (in this folder) holds the pipeline class; it needs only diffusers. "
    "Equivalent loaders: `DiffusionPipeline.from_pretrained(folder, "
    'custom_pipeline=folder + "/one_step.py", trust_remote_code=True)` and, with stepdistill '
    "installed, `from stepdistill.pipelines.one_step import OneStepPipeline; "
    "OneStepPipeline.from_pretrained(folder)`. By default the pipeline runs the training-time "
    "timesteps; `num_inference_steps=k` runs the first k of them."
)


def lcm_default_timesteps(scheduler, num_steps: int) -> list[int]:
    """The timesteps ``scheduler.set_timesteps(num_steps)`` chooses (LCM's default schedule)."""
    probe = type(scheduler).from_config(scheduler.config)
    probe.set_timesteps(num_steps)
    return [int(t) for t in probe.timesteps]


def stock_pipeline_reproduces(generator, teacher) -> bool:
    """Whether the stock ``ConsistencyModelPipeline`` + ``LCMScheduler`` runs exactly the training-time
    generator: a class-conditional pixel ``UNet2DModel`` (no VAE, square samples, no learned variance)
    whose timesteps are LCM's default schedule for its number of steps."""
    denoiser = generator.denoiser
    net = unwrap(denoiser.model)
    cfg = net.config
    if type(net).__name__ != "UNet2DModel" or getattr(denoiser, "num_classes", None) is None:
        return False
    if frozen_part(teacher, generator, "vae") is not None or not cfg.get("num_class_embeds"):
        return False
    if not isinstance(cfg.sample_size, int) or cfg.out_channels != cfg.in_channels:
        return False
    timesteps = training_timesteps(generator)
    scheduler = lcm_scheduler(denoiser.scheduler_config, denoiser.prediction_type, timesteps)
    return lcm_default_timesteps(scheduler, len(timesteps)) == timesteps


def export_consistency_student(generator, teacher, out: Path, *, algorithm: str, paper: str = "", metrics=None,
                               extra=None, use_ema_state=None, overwrite: bool = False, teacher_name=None) -> Path:
    """Write a student for which :func:`stock_pipeline_reproduces` holds as a stock
    ``ConsistencyModelPipeline`` + ``LCMScheduler`` folder (no pipeline code in the folder)."""
    from diffusers import ConsistencyModelPipeline

    denoiser = generator.denoiser
    num_classes = int(denoiser.num_classes)
    timesteps = training_timesteps(generator)
    labels = list(range(min(num_classes, 4)))
    snippet = (
        "import torch\n"
        "from diffusers import DiffusionPipeline\n\n"
        f'pipe = DiffusionPipeline.from_pretrained("{out}")\n'
        f"images = pipe(batch_size={len(labels)}, class_labels={labels}, num_inference_steps={len(timesteps)}, "
        "generator=torch.Generator().manual_seed(0)).images"
    )
    note = (
        "This is a stock `ConsistencyModelPipeline` with an `LCMScheduler` (no custom code): it runs the "
        f"training-time generator exactly, because the training-time timesteps `{timesteps}` are LCM's default "
        f"schedule for `num_inference_steps={len(timesteps)}`. Pass `batch_size` equal to the number of class "
        f"labels, and labels in 0..{num_classes - 1} (without `class_labels` the pipeline draws random labels, "
        f"which may hit the null class {num_classes}); `num_inference_steps=k` with k < {len(timesteps)} runs "
        "LCM's k-step schedule."
    )
    meta = student_meta(generator, teacher, algorithm=algorithm, paper=paper, pipeline="ConsistencyModelPipeline",
                        name=teacher_name, extra=extra, metrics=metrics, snippet=snippet,
                        ema=use_ema_state is not None)
    card = student_card(meta, snippet, [note])
    scheduler = lcm_scheduler(denoiser.scheduler_config, denoiser.prediction_type, timesteps)
    scheduler.register_to_config(**{SCHEDULER_NUM_CLASSES_KEY: num_classes})
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        pipe = ConsistencyModelPipeline(unet=student_network(generator, use_ema_state), scheduler=scheduler)
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_metadata(tmp, meta, card)
    return out


def export_one_step_student(generator, teacher, out: Path, *, algorithm: str, paper: str = "", metrics=None,
                            extra=None, use_ema_state=None, overwrite: bool = False, teacher_name=None) -> Path:
    """Write a ``UNet2DModel`` student as a self-contained ``OneStepPipeline`` folder (see
    :func:`stepdistill.export.export_generator`)."""
    from stepdistill.pipelines.one_step import OneStepPipeline

    denoiser = generator.denoiser
    num_classes = getattr(denoiser, "num_classes", None)
    if num_classes is not None:
        labels = list(range(min(int(num_classes), 4)))
        call = f"pipe(class_labels={labels}, generator=torch.Generator().manual_seed(0)).images"
    else:
        call = "pipe(batch_size=4, generator=torch.Generator().manual_seed(0)).images"
    snippet = remote_code_snippet(out, f"images = {call}")
    meta = student_meta(generator, teacher, algorithm=algorithm, paper=paper, pipeline="OneStepPipeline",
                        name=teacher_name, extra=extra, metrics=metrics, snippet=snippet,
                        ema=use_ema_state is not None)
    card = student_card(meta, snippet, [ONE_STEP_NOTE])
    timesteps = training_timesteps(generator)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        pipe = OneStepPipeline(
            unet=student_network(generator, use_ema_state),
            scheduler=lcm_scheduler(denoiser.scheduler_config, denoiser.prediction_type, timesteps),
            vae=fp32(frozen_part(teacher, generator, "vae")),
            timesteps=timesteps,
            num_classes=num_classes,
        )
        pipe.save_pretrained(tmp, safe_serialization=True)  # also writes one_step.py + list-form _class_name
        write_metadata(tmp, meta, card)
    return out


DIT_KINDS = ("Transformer2DModel", "DiTTransformer2DModel")


def dit_pipeline_problem(generator, teacher) -> str | None:
    """Why the stock ``DiTPipeline`` + ``LCMScheduler`` would not run exactly the training-time
    generator of a DiT student, or None when it does.  ``DiTPipeline`` draws its latents itself
    (unit noise: the generator's ``z``), splits a learned-sigma output, runs without CFG at
    ``guidance_scale <= 1`` (with CFG it would use the hard-coded null class 1000), always decodes
    with its VAE and calls ``scheduler.set_timesteps(num_inference_steps)`` only, so LCM's default
    schedule must be the student's (:func:`~stepdistill.export.common.lcm_original_steps`)."""
    from .common import lcm_default_reproduces

    den = generator.denoiser
    net = unwrap(den.model)
    cfg = net.config
    if getattr(den, "num_classes", None) is None:
        return "DiTPipeline is class-conditional; this DiT student has no classes"
    if frozen_part(teacher, generator, "vae") is None:
        return "DiTPipeline always decodes with a VAE; the teacher has none (a pixel-space DiT)"
    size = cfg.get("sample_size")
    if not isinstance(size, int) or tuple(den.sample_shape) != (cfg.in_channels, size, size):
        return f"DiTPipeline samples (in_channels, sample_size, sample_size) latents; the student's are {den.sample_shape}"
    if cfg.get("out_channels") not in (cfg.in_channels, 2 * cfg.in_channels):
        return f"DiTPipeline needs out_channels = in_channels or 2 x in_channels, got {cfg.get('out_channels')}"
    timesteps = training_timesteps(generator)
    scheduler = lcm_scheduler(den.scheduler_config, den.prediction_type, timesteps, search_default=True)
    if not lcm_default_reproduces(scheduler, timesteps):
        return (
            f"DiTPipeline passes only num_inference_steps to the scheduler, and no LCMScheduler "
            f"original_inference_steps gives the student's timesteps {timesteps} as its default "
            f"{len(timesteps)}-step schedule (reachable: first timestep orig * (T // orig) - 1 >= T/2, "
            "e.g. [999], [899], [999, 749, 499, 249])"
        )
    return None


def export_dit_student(generator, teacher, out: Path, *, algorithm: str, paper: str = "", metrics=None,
                       extra=None, use_ema_state=None, overwrite: bool = False, teacher_name=None) -> Path:
    """Write a class-conditional DiT student as a stock ``DiTPipeline`` + ``LCMScheduler`` folder
    (no custom code); ``NotImplementedError`` naming the reason where the stock pipeline would not
    reproduce it (:func:`dit_pipeline_problem`)."""
    from diffusers import DiTPipeline

    problem = dit_pipeline_problem(generator, teacher)
    if problem is not None:
        raise UnsupportedStudentError(f"cannot export this DiT student: {problem}")
    den = generator.denoiser
    num_classes = int(den.num_classes)
    timesteps = training_timesteps(generator)
    labels = list(range(min(num_classes, 4)))
    snippet = (
        "import torch\n"
        "from diffusers import DiTPipeline\n\n"
        f'pipe = DiTPipeline.from_pretrained("{out}")\n'
        "torch.manual_seed(0)  # multi-step: LCMScheduler.step re-noises from the global RNG\n"
        f"images = pipe(class_labels={labels}, guidance_scale=1.0, num_inference_steps={len(timesteps)}, "
        "generator=torch.Generator().manual_seed(0)).images"
    )
    scheduler = lcm_scheduler(den.scheduler_config, den.prediction_type, timesteps, search_default=True)
    scheduler.register_to_config(**{SCHEDULER_NUM_CLASSES_KEY: num_classes})
    note = (
        "This is a stock `DiTPipeline` with an `LCMScheduler` whose default "
        f"{len(timesteps)}-step schedule is the training-time timesteps `{timesteps}` "
        f"(`original_inference_steps={scheduler.config.original_inference_steps}`). Pass `guidance_scale=1.0`: the "
        "student runs without guidance, and DiTPipeline's guidance (its default 4.0) would use the hard-coded null "
        f"class 1000, not this model's {num_classes}. Labels lie in 0..{num_classes - 1}. DiTPipeline draws the "
        "latents from `generator` but calls `scheduler.step` without it, so multi-step samples need "
        "`torch.manual_seed` as well."
    )
    meta = student_meta(generator, teacher, algorithm=algorithm, paper=paper, pipeline="DiTPipeline",
                        name=teacher_name, extra=extra, metrics=metrics, snippet=snippet,
                        ema=use_ema_state is not None)
    meta["pipeline_call"] = {"guidance_scale": 1.0, "num_inference_steps": len(timesteps)}
    scheduler.register_to_config(**{SCHEDULER_CALL_KEY: meta["pipeline_call"]})
    card = student_card(meta, snippet, [note])
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        pipe = DiTPipeline(transformer=student_network(generator, use_ema_state),
                           vae=fp32(frozen_part(teacher, generator, "vae")), scheduler=scheduler)
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_metadata(tmp, meta, card)
    return out


def _teacher_scheduler(scheduler):
    import diffusers

    if not isinstance(scheduler, dict):
        return scheduler
    cls_name = scheduler.get("_class_name", "DDPMScheduler")
    sched_cls = getattr(diffusers, cls_name, None)
    if sched_cls is None:
        raise ExportError(f"unknown scheduler class {cls_name!r} in the scheduler config")
    return sched_cls.from_config(scheduler)


def export_teacher_pipeline(
    teacher_unet: nn.Module,
    scheduler,
    num_classes: int | None,
    output_dir: str | Path,
    *,
    overwrite: bool = False,
    metrics: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write a (class-conditional) ``UNet2DModel`` teacher as a self-contained
    ``ClassConditionalPipeline`` folder (``class_conditional.py`` written in, list-form
    ``_class_name``, ``num_classes`` top-level in ``model_index.json``).

    ``scheduler`` is a diffusers scheduler (its config is the teacher's noise schedule) or a
    scheduler config dict with ``_class_name``.  ``DiffusersTeacher.from_pretrained`` reads the folder.
    """
    from stepdistill.pipelines.class_conditional import ClassConditionalPipeline

    scheduler = _teacher_scheduler(scheduler)
    unet = unwrap(teacher_unet)
    if type(unet).__name__ != "UNet2DModel":
        raise UnsupportedStudentError(
            f"export_teacher_pipeline writes ClassConditionalPipeline folders for UNet2DModel teachers, got {type(unet).__name__}"
        )
    embeds = unet.config.get("num_class_embeds")
    if num_classes is not None and embeds != num_classes + 1:
        raise ExportError(
            f"a class-conditional teacher needs num_class_embeds = num_classes + 1 (null class last); "
            f"got num_class_embeds={embeds}, num_classes={num_classes}"
        )
    out = Path(output_dir).expanduser().absolute()
    if num_classes is not None:
        call = ("images = pipe(class_labels=[0, 1, 2, 3], num_inference_steps=50, guidance_scale=1.0,\n"
                "              generator=torch.Generator().manual_seed(0)).images")
    else:
        call = "images = pipe(batch_size=4, num_inference_steps=50, generator=torch.Generator().manual_seed(0)).images"
    snippet = remote_code_snippet(out, call)
    meta = {
        "format": 1,
        "kind": "teacher",
        "pipeline": "ClassConditionalPipeline",
        "num_classes": num_classes,
        "scheduler": type(scheduler).__name__,
        **provenance(metrics, extra, snippet),
    }
    intro = [
        f"A `UNet2DModel` diffusion model ({num_classes if num_classes is not None else 'no'} classes; the class "
        f"index {num_classes} is the null class for classifier-free guidance) with its "
        f"`{type(scheduler).__name__}` noise schedule."
    ]
    note = "`class_conditional.py` (in this folder) holds the pipeline class; it needs only diffusers."
    card = model_card("Class-conditional diffusion teacher", intro, snippet, metrics=metrics, notes=[note])
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        pipe = ClassConditionalPipeline(unet=fp32(unet), scheduler=scheduler, num_classes=num_classes)
        pipe.save_pretrained(tmp, safe_serialization=True)  # also writes class_conditional.py
        write_metadata(tmp, meta, card)
    return out
