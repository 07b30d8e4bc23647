"""Autoregressive teachers (:class:`~stepdistill.teachers.autoregressive.ARTeacher`) and Distilled
Decoding students (:mod:`stepdistill.algorithms.distilled_decoding`) as self-contained pipeline
folders: ``ar_image.py`` / ``distilled_decoding.py`` are written next to the weights by the
pipelines' ``save_pretrained``."""

from __future__ import annotations

from pathlib import Path

from .common import (
    ExportError,
    atomic_output_dir,
    fp32,
    model_card,
    prepare_network,
    provenance,
    remote_code_snippet,
    write_metadata,
)

_TAGS = ["autoregressive"]


def export_ar_teacher_pipeline(
    teacher,
    output_dir: str | Path,
    *,
    overwrite: bool = False,
    metrics: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write an :class:`~stepdistill.teachers.autoregressive.ARTeacher` as a self-contained
    ``ARImagePipeline`` folder (``ar_image.py`` written in, list-form ``_class_name``); loads with
    ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` and
    ``ARTeacher.from_pretrained(folder)``."""
    out = Path(output_dir).expanduser().absolute()
    snippet = remote_code_snippet(
        out,
        f"images = pipe(class_labels=[0, 1, 2, 3], guidance_scale={teacher.guidance_scale}, "
        "generator=torch.Generator().manual_seed(0)).images",
    )
    meta = {
        "format": 1,
        "kind": "teacher",
        "pipeline": "ARImagePipeline",
        "num_classes": teacher.num_classes,
        "codebook_size": teacher.codebook_size,
        "embed_dim": teacher.embed_dim,
        "grid_size": list(teacher.grid_size),
        "token_order": teacher.token_order,
        "sampling": teacher.settings(),
        **provenance(metrics, extra, snippet),
    }
    h, w = teacher.grid_size
    lm = type(teacher.transformer).__name__  # LlamaForCausalLM, or LlamaGenGPT (transformer/llamagen_gpt.py)
    intro = [
        f"A class-conditional autoregressive image model: a diffusers `VQModel` tokenizer ({teacher.codebook_size} "
        f"codes of dimension {teacher.embed_dim}, a {h}x{w} token grid in raster order) and a causal LM "
        f"`{lm}` over {teacher.codebook_size} codes + {teacher.num_classes} class tokens + a null "
        "class token (classifier-free guidance).",
        "",
        f"Default sampling: {teacher.settings()}. `ar_image.py` (in this folder) holds the pipeline class.",
    ]
    card = model_card("Autoregressive (VQ + causal LM) teacher", intro, snippet, metrics=metrics, extra=extra,
                      tags=_TAGS)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        teacher.to_pipeline().save_pretrained(str(tmp), safe_serialization=True)
        write_metadata(tmp, meta, card)
    return out


def _dd_meta(student, teacher, algorithm, paper, ema: bool, metrics, extra, snippet) -> dict:
    return {
        "format": 1,
        "algorithm": algorithm,
        "paper": paper,
        "teacher": getattr(teacher, "path", None) or type(teacher).__name__,
        "pipeline": "DistilledDecodingPipeline",
        "num_classes": student.num_classes,
        "grid_size": list(student.grid_size),
        "split_points": list(student.split_points),
        "codebook_scale": student.codebook_scale,
        "rbf_tau": getattr(student, "rbf_tau", None),
        "teacher_sampling": teacher.settings() if hasattr(teacher, "settings") else None,
        "ema": ema,
        **provenance(metrics, extra, snippet),
    }


def export_dd_pipeline(
    student,
    teacher,
    output_dir: str | Path,
    *,
    algorithm: str = "dd",
    paper: str = "",
    metrics: dict | None = None,
    extra: dict | None = None,
    use_ema_state: dict | None = None,
    overwrite: bool = False,
    num_inference_steps: int = 1,
) -> Path:
    """Write a Distilled Decoding student (:class:`~stepdistill.algorithms.distilled_decoding.DDStudent`)
    with its teacher's tokenizer as a self-contained ``DistilledDecodingPipeline`` folder.

    ``use_ema_state``: the student's EMA ``state_dict()`` (``transformer.``-prefixed keys), exported
    instead of the live weights.  The pipeline reproduces ``student(noise, labels, num_steps)``."""
    from stepdistill.pipelines.distilled_decoding import DistilledDecodingPipeline

    steps = int(num_inference_steps)
    if not 1 <= steps <= len(student.split_points):
        raise ExportError(f"num_inference_steps must be in 1..{len(student.split_points)}, got {steps}")
    use_ema_state, head = DistilledDecodingPipeline.split_student_state(student, use_ema_state)  # DD continuous head
    net = prepare_network(student.transformer, use_ema_state, "the DD student", prefixes=("transformer.",),
                          optional=("rotary_emb.inv_freq",))
    out = Path(output_dir).expanduser().absolute()
    snippet = remote_code_snippet(
        out,
        f"images = pipe(class_labels=[0, 1, 2, 3], num_inference_steps={steps}, "
        "generator=torch.Generator().manual_seed(0)).images",
    )
    meta = _dd_meta(student, teacher, algorithm, paper, use_ema_state is not None, metrics, extra, snippet)
    intro = [
        f"A Distilled Decoding student ({paper or algorithm}) of an autoregressive VQ + causal-LM teacher: "
        f"the {student.num_tokens} image tokens come from one forward pass "
        f"(or {len(student.split_points)} with split points {list(student.split_points)}) over per-token "
        "Gaussian noise in codebook space, instead of one pass per token.",
        "",
        f"Teacher sampling distilled: {meta['teacher_sampling']}. `distilled_decoding.py` (in this folder) "
        "holds the pipeline class; pass `noise=` (B, n, d) to reproduce a given trajectory.",
    ]
    card = model_card(f"{algorithm} student (Distilled Decoding)", intro, snippet, metrics=metrics, extra=extra,
                      tags=_TAGS)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        pipe = DistilledDecodingPipeline(
            vqvae=fp32(teacher.vqvae),
            transformer=net,
            num_classes=student.num_classes,
            codebook_size=teacher.codebook_size,
            embed_dim=int(student.codes.shape[1]),
            grid_size=list(student.grid_size),
            codebook_scale=student.codebook_scale,
            split_points=list(student.split_points),
            num_inference_steps=steps,
            rbf_tau=getattr(student, "rbf_tau", None),
        )
        pipe.set_continuous_head(head, getattr(student, "split_t", None))
        pipe.save_pretrained(str(tmp), safe_serialization=True)  # also writes distilled_decoding.py
        write_metadata(tmp, meta, card)
    return out
