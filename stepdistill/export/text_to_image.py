"""Text-to-image students as **stock** diffusers pipelines (no custom code):

====================  =============================  ===================================================
student network       pipeline                       scheduler
====================  =============================  ===================================================
UNet2DConditionModel  StableDiffusionPipeline        LCMScheduler (the teacher's VP schedule)
SDXL UNet (text_time) StableDiffusionXLPipeline      LCMScheduler
SD3Transformer2DModel StableDiffusion3Pipeline       FlowMatchEulerDiscreteScheduler (shift 1, stochastic)
FluxTransformer2DModel FluxPipeline                  FlowMatchEulerDiscreteScheduler (shift 1, stochastic)
====================  =============================  ===================================================

VP students (SD, SDXL).  ``LCMScheduler`` runs exactly the training-time generator
(:mod:`stepdistill.students`): the first step's network input is the pipeline's initial latents
(``init_noise_sigma = 1``: unit noise, "pure-noise input" also at SDXL-DMD2's 399), the boundary
scalings ``c_skip, c_out`` at the current timestep (``c_skip(399) ~ 1.6e-8``) are the generator's,
and multi-step students re-noise with fresh noise from the pipeline's ``generator``.  The call
passes ``timesteps=[...]``; when some ``original_inference_steps`` makes LCM's default schedule the
student's (``[999, 749, 499, 249]``: the standard one; ``[899]``: 900), the scheduler config gets
it, so a plain ``num_inference_steps=k`` call reproduces the student too.

Flow students (SD3, FLUX.1).  The call passes ``sigmas=[t_1, ..., t_k]``, the student's flow times
(``t = sigma / (1 + sigma)`` as the generator computes them; a 1-step student from pure noise runs
at t = 0.9999, the end of the teacher's clamped grid), through a scheduler with ``shift=1.0`` and
no dynamic shifting (so the sigmas are used as given: they are already the shifted training times)
and ``stochastic_sampling=True`` (fresh-noise re-noising, as the generator does).  The stock SD3 and
FLUX pipelines call ``scheduler.step`` without the ``generator``: multi-step samples are seeded by
``torch.manual_seed``.  Guidance-distilled FLUX (``guidance_embeds``): the student was trained with
guidance-embedding input 1.0 (``denoise_raw``), which the call passes as ``guidance_scale``.

LoRA students (peft adapters, ``algorithm.params.generator_lora``) are written, by default, both as
the full stock pipeline (adapter fused) and as LoRA weights for the stock teacher pipeline in the
same folder (``pipe.load_lora_weights(folder)`` + the folder's scheduler); ``lora="adapter"`` writes
only the LoRA weights, scheduler and card, ``lora="fused"`` only the full pipeline.
"""

from __future__ import annotations

from pathlib import Path

from .common import (
    LORA_MODES,  # noqa: F401  (re-exported: text_to_image.LORA_MODES)
    SCHEDULER_CALL_KEY,
    SCHEDULER_TIMESTEPS_KEY,
    SUPPORTED,
    ExportModeError,
    UnsupportedStudentError,
    atomic_output_dir,
    check_lora_mode,
    flow_scheduler,
    flow_sigmas,
    fp32,
    frozen_part,
    has_adapters,
    lcm_default_reproduces,
    lcm_scheduler,
    student_card,
    student_meta,
    student_network,
    teacher_name,
    training_timesteps,
    unwrap,
    update_model_index,
    write_metadata,
)

#: family -> (pipeline class, denoiser component, required parts, optional parts)
FAMILIES = {
    "sd": ("StableDiffusionPipeline", "unet", ("text_encoder", "tokenizer", "vae"), ()),
    "sdxl": ("StableDiffusionXLPipeline", "unet",
             ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "vae"), ()),
    "sd3": ("StableDiffusion3Pipeline", "transformer",
            ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "vae"), ("text_encoder_3", "tokenizer_3")),
    "flux": ("FluxPipeline", "transformer", ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "vae"), ()),
}
PROMPT = "a photo of a cat"


def text_family(net) -> str | None:
    """sd | sdxl | sd3 | flux for a text-to-image student network, None for other networks."""
    net = unwrap(net)
    kind = type(net).__name__
    if kind == "UNet2DConditionModel":
        added = net.config.get("addition_embed_type")
        if added is None:
            return "sd"
        if added == "text_time":
            return "sdxl"
        raise UnsupportedStudentError(
            f"UNet2DConditionModel students with addition_embed_type={added!r} are not exportable; {SUPPORTED}"
        )
    return {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}.get(kind)


def _parts(generator, teacher, family: str) -> dict:
    pipeline, _, required, optional = FAMILIES[family]
    parts = {name: frozen_part(teacher, generator, name) for name in (*required, *optional)}
    missing = [name for name in required if parts[name] is None]
    if missing:
        raise UnsupportedStudentError(
            f"a {family.upper()} student is exported as a {pipeline}, which needs the teacher's {', '.join(required)}; "
            f"missing: {missing}. {SUPPORTED}"
        )
    return parts


def _vae_scale(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def pipeline_call(generator, teacher, family: str, parts: dict, scheduler) -> dict:
    """Keyword arguments of the stock pipeline's ``__call__`` (besides the prompt) that run the
    training-time generator."""
    den = generator.denoiser
    timesteps = training_timesteps(generator)
    call: dict = {"num_inference_steps": len(timesteps)}
    _, h, w = den.sample_shape
    scale = _vae_scale(parts["vae"])
    if family in ("sd", "sdxl"):
        call["timesteps"] = timesteps
        call["guidance_scale"] = 0.0
        net = unwrap(den.model)
        size = net.config.sample_size
        default = (size, size) if isinstance(size, int) else tuple(size)
        if (h, w) != default:
            call.update(height=h * scale, width=w * scale)
        if family == "sdxl":
            pixels = (h * scale, w * scale)
            for key, default_value in (("original_size", pixels), ("crops_coords_top_left", (0, 0)),
                                       ("target_size", pixels)):
                value = tuple(getattr(den, key, default_value))
                if value != tuple(default_value):
                    call[key] = list(value)
        return call
    call["sigmas"] = flow_sigmas(generator)
    call["height"], call["width"] = h * scale, w * scale
    if family == "sd3":
        call["guidance_scale"] = 0.0
    else:  # FLUX: guidance-distilled students were trained with guidance input 1 (denoise_raw)
        call["guidance_scale"] = 1.0
    call["max_sequence_length"] = int(getattr(den, "max_sequence_length", 256 if family == "sd3" else 512))
    return call


def _fmt_call(call: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in call.items())


def _scheduler(generator, family: str):
    den = generator.denoiser
    timesteps = training_timesteps(generator)
    if family in ("sd3", "flux"):
        return flow_scheduler(den.scheduler_config, timesteps, flow_sigmas(generator))
    return lcm_scheduler(den.scheduler_config, den.prediction_type, timesteps, search_default=True)


def _notes(family: str, scheduler, timesteps, call, embedded_guidance: bool) -> list[str]:
    sched = type(scheduler).__name__
    if family in ("sd", "sdxl"):
        notes = [
            f"`{sched}` runs the training-time generator: keep `guidance_scale=0.0` (the student runs without "
            "classifier-free guidance) and pass the training-time `timesteps`."
        ]
        if lcm_default_reproduces(scheduler, timesteps):
            notes.append(f"`num_inference_steps={len(timesteps)}` alone chooses the same timesteps "
                         f"(`original_inference_steps={scheduler.config.original_inference_steps}` in the scheduler config).")
        elif timesteps[0] != scheduler.config.num_train_timesteps - 1:
            notes.append("LCMScheduler logs a harmless warning when the first timestep is not the last training "
                         "timestep; no `original_inference_steps` makes its default schedule start there, so "
                         "`timesteps=` is needed.")
        return notes
    notes = [
        f"`{sched}` with `shift=1.0`, no dynamic shifting and `stochastic_sampling=True`: the `sigmas` are the "
        "student's flow times (already shifted) and pass through unchanged; between steps the sample is re-noised "
        "with fresh noise, as at training time.",
    ]
    if len(timesteps) > 1:
        notes.append("The stock pipeline draws the re-noising noise from torch's global RNG (its `scheduler.step` "
                     "gets no `generator`): call `torch.manual_seed(...)` first for reproducible multi-step samples.")
    if family == "flux":
        notes.append("`guidance_scale=1.0` is the guidance-embedding input the student was trained with."
                     if embedded_guidance else
                     "This FLUX student has no guidance embedding (`guidance_scale` is unused; keep `true_cfg_scale=1`).")
    return notes


def _snippets(out, pipeline_name: str, sched_name: str, family: str, timesteps, call: dict, notes: list[str],
              write_pipeline: bool, write_lora: bool, adapter: bool, teacher_id: str | None) -> list[str]:
    """The model card's loading snippets (full pipeline and / or LoRA on the stock teacher); adds the
    LoRA notes to ``notes``."""
    component = FAMILIES[family][1]
    seed = "torch.manual_seed(0)  # the re-noising noise comes from the global RNG\n" if (
        family in ("sd3", "flux") and len(timesteps) > 1) else ""
    run = f'image = pipe("{PROMPT}", {_fmt_call(call)}).images[0]'
    snippets = []
    if write_pipeline:
        snippets.append(
            "import torch\n"
            f"from diffusers import {pipeline_name}\n\n"
            f'pipe = {pipeline_name}.from_pretrained("{out}")\n'
            f"{seed}{run}"
        )
    if write_lora:
        snippets.append(
            ("# or: the LoRA weights on the stock teacher pipeline\n" if write_pipeline else "import torch\n")
            + f"from diffusers import {pipeline_name}, {sched_name}\n\n"
            f'pipe = {pipeline_name}.from_pretrained("{teacher_id}")  # the stock teacher pipeline\n'
            f'pipe.scheduler = {sched_name}.from_pretrained("{out}", subfolder="scheduler")\n'
            f'pipe.load_lora_weights("{out}")\n'
            f"{seed}{run}"
        )
        notes.insert(0,
            f"`pytorch_lora_weights.safetensors` holds the student as LoRA weights for the teacher's {component} "
            "(rank / alpha / target modules in the file's metadata): load them onto the stock teacher pipeline and "
            "swap in this folder's scheduler. `pipe.fuse_lora()` folds them into the weights; "
            "`stepdistill.export.lora.load_lora(pipe, folder)` checks the keys first and names what the pipeline "
            "expects when they do not match."
            + (" The full pipeline in this folder has the adapter fused in." if write_pipeline else "")
        )
    elif adapter:
        notes.insert(0, "The student's LoRA adapter is fused into the weights of this full pipeline.")
    return snippets


def export_text_student(generator, teacher, out: Path, *, algorithm: str, paper: str = "", metrics=None,
                        extra=None, use_ema_state=None, overwrite: bool = False, teacher_name_: str | None = None,
                        lora: str = "auto") -> Path:
    """Write a text-to-image student (SD, SDXL, SD3, FLUX.1) as a stock pipeline folder.

    LoRA students (``lora``): ``"both"`` (what ``"auto"`` means for them) writes the full stock pipeline
    with the adapter fused in *and* the adapter as ``pytorch_lora_weights.safetensors`` in the same
    folder, so ``<Pipeline>.from_pretrained(folder)`` and, on the stock teacher pipeline,
    ``pipe.load_lora_weights(folder)`` + the folder's ``scheduler`` both run the student;
    ``"adapter"`` writes only the LoRA weights, the scheduler and the card (no copy of the teacher's
    encoders / VAE); ``"fused"`` only the full pipeline."""
    import diffusers

    check_lora_mode(lora)
    den = generator.denoiser
    family = text_family(den.model)
    pipeline_name, component, _, _ = FAMILIES[family]
    pipeline_cls = getattr(diffusers, pipeline_name)
    parts = _parts(generator, teacher, family)
    timesteps = training_timesteps(generator)
    scheduler = _scheduler(generator, family)
    call = pipeline_call(generator, teacher, family, parts, scheduler)
    scheduler.register_to_config(**{SCHEDULER_CALL_KEY: call})  # for tools that sample the folder (eval)
    embedded = bool(getattr(den, "embedded_guidance", False))
    adapter = has_adapters(unwrap(den.model))
    if lora in ("adapter", "both") and not adapter:
        raise ExportModeError(f"lora={lora!r} needs a LoRA student (algorithm.params.generator_lora); this one has no "
                              "adapter, so there are no LoRA weights to write (use lora='auto' or 'fused')")
    mode = ("both" if lora == "auto" else lora) if adapter else "fused"
    write_lora, write_pipeline = mode in ("both", "adapter"), mode in ("both", "fused")
    notes = _notes(family, scheduler, timesteps, call, embedded)
    sched_name = type(scheduler).__name__
    snippets = _snippets(out, pipeline_name, sched_name, family, timesteps, call, notes, write_pipeline, write_lora,
                         adapter, teacher_name(teacher, generator, teacher_name_, extra) if write_lora else None)
    snippet = "\n\n".join(snippets)
    meta = student_meta(generator, teacher, algorithm=algorithm, paper=paper, pipeline=pipeline_name,
                        name=teacher_name_, extra=extra, metrics=metrics, snippet=snippet,
                        ema=use_ema_state is not None)
    meta.update(scheduler=sched_name, family=family, export_kind={"both": "pipeline+lora", "adapter": "lora",
                                                                  "fused": "pipeline"}[mode], pipeline_call=call)
    if family == "flux":
        meta["guidance_embeds"] = embedded
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        if write_pipeline:
            kwargs = {name: (part if name.startswith("tokenizer") else fp32(part)) for name, part in parts.items()}
            kwargs[component] = student_network(generator, use_ema_state)
            kwargs["scheduler"] = scheduler
            if family == "sd":
                kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            elif family == "sdxl":
                kwargs["force_zeros_for_empty_prompt"] = getattr(den, "null_prompt", "zeros") == "zeros"
            pipe = pipeline_cls(**kwargs)
            pipe.save_pretrained(tmp, safe_serialization=True)
            update_model_index(tmp, {SCHEDULER_TIMESTEPS_KEY: timesteps})
        else:
            scheduler.save_pretrained(tmp / "scheduler")
        if write_lora:
            from .lora import save_lora_weights

            meta["lora"] = save_lora_weights(pipeline_cls, student_network_with_adapter(generator, use_ema_state), tmp)
        write_metadata(tmp, meta, student_card(meta, snippet, notes))
    return out


def student_network_with_adapter(generator, use_ema_state):
    """The student network with its adapter kept (EMA weights loaded into a copy when given)."""
    import copy

    from .common import load_ema_state

    net = unwrap(generator.denoiser.model)
    if use_ema_state is None:
        return net
    net = copy.deepcopy(net)
    load_ema_state(net, use_ema_state)
    return net


def export_sd_student(generator, teacher, out: Path, *, teacher_name=None, **kwargs) -> Path:
    """Back-compatible name: :func:`export_text_student`."""
    return export_text_student(generator, teacher, out, teacher_name_=teacher_name, **kwargs)
