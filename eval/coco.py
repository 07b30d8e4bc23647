"""Zero-shot COCO-2014 protocol (FID-30k + CLIP score) from local files only.

The paper-scale presets report "FID on 30k COCO-2014 validation captions" and a CLIP score.  This
module runs that protocol without any download; the layout (``--coco-root ROOT``) is::

    ROOT/
      prompts_30k.txt          30,000 captions, one per line (UTF-8); image i is generated from line i
      reference_stats.npz      Inception pool3 statistics of the reference images (mu, sigma[, n]) ...
      reference/               ... or the reference images themselves (PNG/JPEG, already resized and
                               centre-cropped to the evaluation resolution); stats are then cached
      inception/weights-inception-2015-12-05-6726825d.pth
                               torch-fidelity's Inception weights (a plain state dict)
      clip/                    a CLIP folder saved with CLIPModel/CLIPProcessor.save_pretrained
                               (e.g. openai/clip-vit-large-patch14 or ViT-g/14 converted)

Every path can also be given on its own (``prompts=``, ``reference=``, ``inception_weights=``,
``clip_model=``); explicit paths win over the root.  FID uses
:class:`stepdistill.eval.detectors.InceptionDetector` (torch-fidelity / torchmetrics features, TF1
resize); numbers are reported as ``FID-N<n>`` with the mean and std over the evaluation seeds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .errors import EvalInputError

__all__ = ["COCO_LAYOUT", "resolve_coco_files", "evaluate_coco"]

COCO_LAYOUT = {
    "prompts": "prompts_30k.txt",
    "reference_stats": "reference_stats.npz",
    "reference_images": "reference",
    "inception": "inception",
    "clip": "clip",
}
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


def _find_inception(folder: Path) -> Path:
    if folder.is_file():
        return folder
    exact = folder / INCEPTION_FILE
    if exact.is_file():
        return exact
    cands = sorted(folder.glob("*inception*.pth")) + sorted(folder.glob("*.pth")) + sorted(folder.glob("*.safetensors"))
    if not cands:
        raise EvalInputError(f"{folder}: no Inception weights (expected {INCEPTION_FILE}, torch-fidelity's file)")
    return cands[0]


def resolve_coco_files(root: str | os.PathLike | None = None, *, prompts: Any = None, reference: Any = None,
                       inception_weights: Any = None, clip_model: Any = None) -> dict[str, Path | None]:
    """Paths of the protocol's files (explicit arguments first, then ``root``'s layout); one clear
    error naming what is missing and where it was looked for."""
    r = Path(root).expanduser() if root is not None else None
    if r is not None and not r.is_dir():
        raise EvalInputError(f"{r}: --coco-root is not a folder (see docs/text_to_image.md for the layout)")
    out: dict[str, Path | None] = {}
    missing: list[str] = []

    def pick(explicit: Any, *names: str) -> Path | None:
        if explicit is not None:
            return Path(explicit).expanduser()
        if r is None:
            return None
        for n in names:
            if (r / n).exists():
                return r / n
        return None

    out["prompts"] = pick(prompts, COCO_LAYOUT["prompts"])
    out["reference"] = pick(reference, COCO_LAYOUT["reference_stats"], COCO_LAYOUT["reference_images"])
    out["inception"] = pick(inception_weights, COCO_LAYOUT["inception"])
    out["clip"] = pick(clip_model, COCO_LAYOUT["clip"])
    where = f" in {r}" if r is not None else ""
    if out["prompts"] is None or not out["prompts"].is_file():
        missing.append(f"prompts ({out['prompts'] or COCO_LAYOUT['prompts'] + where})")
    if out["reference"] is None or not out["reference"].exists():
        missing.append(f"reference ({out['reference'] or COCO_LAYOUT['reference_stats'] + ' or ' + COCO_LAYOUT['reference_images'] + '/' + where})")
    if out["inception"] is None or not out["inception"].exists():
        missing.append(f"Inception weights ({out['inception'] or COCO_LAYOUT['inception'] + '/' + INCEPTION_FILE + where})")
    else:
        out["inception"] = _find_inception(out["inception"])
    if out["clip"] is not None and not out["clip"].is_dir():
        missing.append(f"CLIP folder ({out['clip']})")
    if missing:
        raise EvalInputError("COCO protocol: missing " + "; ".join(missing)
                             + ". Pass --coco-root with the layout of docs/text_to_image.md or the paths themselves")
    return out


def evaluate_coco(
    pipeline: Any,
    *,
    root: str | os.PathLike | None = None,
    prompts: Any = None,
    reference: Any = None,
    inception_weights: Any = None,
    clip_model: Any = None,
    num_images: int | None = None,
    seeds: tuple[int, ...] | list[int] = (0, 1, 2),
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    scheduler: str | None = None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    progress: bool = False,
    clip_prefix: str = "",
    feature_dim: int = 2048,
    antialias: bool = False,
) -> dict[str, Any]:
    """Inception FID against the reference and (with a CLIP folder) CLIP score of ``pipeline`` over the
    COCO prompts: ``num_images`` (default: all prompts) per evaluation seed, image ``i`` from prompt
    ``i`` with seed ``1000000 * s + i``."""
    from .clip_score import clip_score, load_clip
    from .detectors import InceptionDetector
    from .fid import FeatureStats, frechet_distance
    from .generate import load_prompts
    from .metrics import compute_stats
    from .t2i import check_seeds, prepare_pipeline, score_per_seed, summarize

    files = resolve_coco_files(root, prompts=prompts, reference=reference, inception_weights=inception_weights,
                               clip_model=clip_model)
    seeds = check_seeds(seeds)
    plist = load_prompts(files["prompts"])
    n = len(plist) if num_images is None else int(num_images)
    if n <= 0:
        raise EvalInputError(f"--num-images must be positive, got {n}")
    if n > len(plist):
        raise EvalInputError(f"{files['prompts']}: {n} images requested but the file has {len(plist)} prompts")
    used = plist[:n]
    det = InceptionDetector(files["inception"], feature_dim=feature_dim, antialias=antialias, device=device)
    ref_path = files["reference"]
    if ref_path.is_file():
        ref = FeatureStats.load(ref_path)
        if ref.dim != det.feature_dim:
            raise EvalInputError(f"{ref_path}: statistics have {ref.dim} features but the Inception detector gives "
                                 f"{det.feature_dim}; recompute them with `stepdistill eval stats`")
    else:
        ref = compute_stats(os.fspath(ref_path), det, None, progress=progress)
    clip = load_clip(files["clip"], device) if files["clip"] is not None else None

    pipe, tok_info, sched = prepare_pipeline(pipeline, used, scheduler, None, device)

    def score(seed: int, x: torch.Tensor) -> dict:
        st = FeatureStats.from_features(det.features(x))
        row: dict[str, Any] = {"fid": frechet_distance(st.mu, st.sigma, ref.mu, ref.sigma)}
        if clip is not None:
            c = clip_score(x, used, clip, prefix=clip_prefix)
            row["clip_score"], row["clip_cosine"] = c["clip_score"], c["clip_cosine"]
        return row

    per_seed = score_per_seed(pipe, used, seeds, score, batch_size=batch_size, guidance_scale=guidance_scale,
                              num_inference_steps=num_inference_steps, progress=progress, device=device)
    return {
        "metric": f"{det.fid_name}-N{n}",
        **summarize(per_seed),
        "n": n,
        "seeds": seeds,
        "per_seed": per_seed,
        "protocol": "COCO-2014 zero-shot (local files)",
        "prompts": os.fspath(files["prompts"]),
        "reference": os.fspath(ref_path),
        "reference_n": ref.n,
        "fid_detector": det.name,
        "fid_detector_id": det.id,
        "inception_weights": os.fspath(files["inception"]),
        "clip_model": None if files["clip"] is None else os.fspath(files["clip"]),
        "clip_prefix": clip_prefix,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "scheduler": sched,
        **tok_info,
    }
