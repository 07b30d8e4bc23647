"""CLIP score, in-house (torchmetrics 1.9 ``CLIPScore`` is broken with transformers 5).

For each (image, text) pair: cosine similarity of CLIP's projected image and text embeddings.
Reported both ways, with the model, scale and prefix recorded next to the numbers:

* ``clip_score``: mean of ``max(100 * cos, 0)`` (torchmetrics convention, 0-100 scale);
* ``clip_cosine``: mean raw cosine (GigaGAN / DMD2 convention, e.g. 0.30-0.33, usually with the text
  prefix ``"A photo depicts "``).

Text is truncated to the model's context length (77 for CLIP).  Images are uint8 (grey is repeated
to RGB) and go through the model's own ``CLIPImageProcessor`` (resize + centre crop + normalise).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from .detectors import as_uint8_nchw
from .errors import EvalInputError

__all__ = ["load_clip", "clip_score", "evaluate_clip_score"]


def load_clip(model: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """``(CLIPModel, processor)`` from a local folder or hub id (the processor may be a
    ``CLIPProcessor`` or a ``(tokenizer, image_processor)`` pair when no processor config exists)."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    m = os.fspath(model)
    local = os.path.isdir(os.path.expanduser(m))
    if not local and (m.startswith((".", "/", "~")) or os.sep in m and m.count("/") > 1):
        raise EvalInputError(f"{m}: CLIP model folder not found")
    path = os.path.expanduser(m) if local else m
    try:
        net = CLIPModel.from_pretrained(path).eval().to(device)
    except Exception as e:  # noqa: BLE001
        raise EvalInputError(
            f"{m}: cannot load a CLIP model ({type(e).__name__}: {e}); pass a local folder saved with "
            "CLIPModel.save_pretrained (offline, hub ids only work when cached)"
        ) from e
    try:
        proc: Any = CLIPProcessor.from_pretrained(path)
    except Exception:  # noqa: BLE001 - fall back to the two halves
        try:
            proc = (CLIPTokenizer.from_pretrained(path), CLIPImageProcessor.from_pretrained(path))
        except Exception as e:  # noqa: BLE001
            raise EvalInputError(
                f"{m}: no CLIP tokenizer / image processor next to the model ({e}); save a CLIPProcessor there"
            ) from e
    return net, proc


def _split_processor(proc: Any) -> tuple[Any, Any]:
    if isinstance(proc, tuple):
        return proc
    return proc.tokenizer, proc.image_processor


def clip_score(
    images: Any,
    prompts: list[str],
    model: str | os.PathLike | tuple[Any, Any],
    prefix: str = "",
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """CLIP score of uint8 NCHW ``images`` against ``prompts`` (one per image, same order).

    ``model``: a local folder / hub id, or an already loaded ``(CLIPModel, processor)`` pair.
    Returns ``{"clip_score", "clip_cosine", "clip_cosine_std", "n", "clip_model", "clip_scale",
    "clip_prefix"}``.
    """
    x = as_uint8_nchw(images, what="CLIP images")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise EvalInputError(f"CLIP images must be grey or RGB, got {x.shape[1]} channels")
    prompts = [str(p) for p in prompts]
    if len(prompts) != x.shape[0]:
        raise EvalInputError(
            f"{x.shape[0]} images but {len(prompts)} prompts; CLIP score needs one prompt per image (same order)"
        )
    if x.shape[0] == 0:
        raise EvalInputError("CLIP score of zero images")
    if isinstance(model, tuple):
        net, proc = model
        model_id = getattr(getattr(net, "config", None), "_name_or_path", "") or type(net).__name__
    else:
        net, proc = load_clip(model, device)
        model_id = os.fspath(model)
    tok, improc = _split_processor(proc)
    max_len = int(getattr(net.config.text_config, "max_position_embeddings", 77))
    dev = next(net.parameters()).device
    cos: list[torch.Tensor] = []
    with torch.inference_mode():
        for i in range(0, x.shape[0], batch_size):
            imgs = [np.ascontiguousarray(a) for a in x[i : i + batch_size].permute(0, 2, 3, 1).numpy()]
            texts = [prefix + p for p in prompts[i : i + batch_size]]
            t = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            pv = improc(images=imgs, return_tensors="pt")["pixel_values"]
            out = net(input_ids=t["input_ids"].to(dev), attention_mask=t["attention_mask"].to(dev),
                      pixel_values=pv.to(dev))
            ie = torch.nn.functional.normalize(out.image_embeds.double(), dim=-1)
            te = torch.nn.functional.normalize(out.text_embeds.double(), dim=-1)
            cos.append((ie * te).sum(-1).cpu())
    c = torch.cat(cos)
    return {
        "clip_score": float((100 * c).clamp(min=0).mean()),
        "clip_cosine": float(c.mean()),
        "clip_cosine_std": float(c.std()) if c.numel() > 1 else 0.0,
        "n": int(c.numel()),
        "clip_model": model_id,
        "clip_scale": "clip_score = mean(max(100 * cos, 0)) (torchmetrics); clip_cosine = mean(cos)",
        "clip_prefix": prefix,
    }


def evaluate_clip_score(
    source: Any,
    prompts: Any,
    model: str | os.PathLike | tuple[Any, Any],
    num_images: int | None = None,
    *,
    prefix: str = "",
    seed: int = 0,
    batch_size: int = 16,
    num_inference_steps: int | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
    **call_kwargs: Any,
) -> dict[str, Any]:
    """CLIP score of a text-to-image pipeline (folder or object; image ``i`` gets prompt ``i % len``,
    ``num_images`` defaults to the number of prompts) or of an image folder / ``.npz`` whose sorted
    images pair one-to-one with the prompts."""
    from .generate import iter_sample_pipeline, load_prompts
    from .inputs import classify_source, load_image_folder, load_npz
    from .metrics import is_pipeline

    plist = load_prompts(prompts)
    if plist is None:
        raise EvalInputError("CLIP score needs prompts (--prompts FILE, one per line)")
    is_pipe = is_pipeline(source) or (isinstance(source, (str, os.PathLike))
                                       and classify_source(source).kind == "pipeline")
    if is_pipe:
        n = num_images or len(plist)
        xs, ps = [], []
        for x, _, pr in iter_sample_pipeline(source, n, seed=seed, batch_size=batch_size, prompts=plist,
                                             num_inference_steps=num_inference_steps, progress=progress,
                                             device=device, **call_kwargs):
            xs.append(x)
            ps.extend(pr)
        images, used = torch.cat(xs), ps
    elif isinstance(source, (str, os.PathLike)):
        kind = classify_source(source).kind
        if kind == "folder":
            images, _, _ = load_image_folder(source, num_images, progress=progress)
        elif kind == "images-npz":
            images, _ = load_npz(source)
            images = images[:num_images] if num_images else images
        else:
            raise EvalInputError(f"{source}: CLIP score needs images or a text-to-image pipeline, not a {kind}")
        if len(plist) != images.shape[0]:
            raise EvalInputError(
                f"{source}: {images.shape[0]} images but {len(plist)} prompts; the prompts file must have one "
                "line per image, in the images' sorted order"
            )
        used = plist
    else:
        images, used = source, plist
    out = clip_score(images, used, model, prefix=prefix, batch_size=32, device=device)
    out["seed"] = seed
    return out
