"""Text-to-image students: a ``UNet2DConditionModel`` student of a Stable-Diffusion-layout teacher
becomes a **stock** ``StableDiffusionPipeline`` with an ``LCMScheduler`` (no custom code)."""

from __future__ import annotations

from pathlib import Path

from .common import (
    SCHEDULER_TIMESTEPS_KEY,
    SUPPORTED,
    atomic_output_dir,
    fp32,
    frozen_part,
    lcm_scheduler,
    student_card,
    student_meta,
    student_network,
    training_timesteps,
    unwrap,
    update_model_index,
    write_metadata,
)


def _sd_parts(generator, teacher) -> dict:
    parts = {name: frozen_part(teacher, generator, name) for name in ("text_encoder", "tokenizer", "vae")}
    missing = [name for name, part in parts.items() if part is None]
    if missing:
        raise NotImplementedError(
            f"a UNet2DConditionModel student is exported as a StableDiffusionPipeline, which needs the "
            f"teacher's text_encoder, tokenizer and vae; missing: {missing}. {SUPPORTED}"
        )
    net = unwrap(generator.denoiser.model)
    if net.config.get("addition_embed_type") is not None:
        raise NotImplementedError(
            f"UNet2DConditionModel students with addition_embed_type={net.config.addition_embed_type!r} "
            f"(SDXL-style) are not exportable yet; {SUPPORTED}"
        )
    return parts


def export_sd_student(generator, teacher, out: Path, *, algorithm: str, paper: str = "", metrics=None,
                      extra=None, use_ema_state=None, overwrite: bool = False, teacher_name=None) -> Path:
    """Write a ``UNet2DConditionModel`` student as a stock ``StableDiffusionPipeline`` folder (see
    :func:`stepdistill.export.export_generator`)."""
    from diffusers import StableDiffusionPipeline

    parts = _sd_parts(generator, teacher)
    timesteps = training_timesteps(generator)
    t_list = ", ".join(str(t) for t in timesteps)
    snippet = (
        "from diffusers import StableDiffusionPipeline\n\n"
        f'pipe = StableDiffusionPipeline.from_pretrained("{out}")\n'
        f'image = pipe("a photo of a cat", num_inference_steps={len(timesteps)}, timesteps=[{t_list}], '
        "guidance_scale=0.0).images[0]"
    )
    note = (
        "This is a stock `StableDiffusionPipeline` with an `LCMScheduler`; keep `guidance_scale=0.0` "
        "(the student runs without classifier-free guidance) and pass the training-time `timesteps`. "
        "LCMScheduler logs a harmless warning when the first timestep is not 999."
    )
    meta = student_meta(generator, teacher, algorithm=algorithm, paper=paper, pipeline="StableDiffusionPipeline",
                        name=teacher_name, extra=extra, metrics=metrics, snippet=snippet,
                        ema=use_ema_state is not None)
    card = student_card(meta, snippet, [note])
    denoiser = generator.denoiser
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        pipe = StableDiffusionPipeline(
            vae=fp32(parts["vae"]),
            text_encoder=fp32(parts["text_encoder"]),
            tokenizer=parts["tokenizer"],
            unet=student_network(generator, use_ema_state),
            scheduler=lcm_scheduler(denoiser.scheduler_config, denoiser.prediction_type, timesteps),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(tmp, safe_serialization=True)
        update_model_index(tmp, {SCHEDULER_TIMESTEPS_KEY: timesteps})
        write_metadata(tmp, meta, card)
    return out
