"""Evaluation of text-to-image pipelines on the coloured-MNIST prompts: FID, CLIP score, prompt accuracy.

Any ``StableDiffusionPipeline``-compatible folder (or pipeline object) is sampled over a prompt file,
one seed per image (:func:`stepdistill.eval.generate.iter_sample_pipeline`): under evaluation seed
``s`` image ``i`` uses ``torch.Generator().manual_seed(SEED_STRIDE * s + i)`` and prompt ``i %
len(prompts)``.  Every number is reported as the mean over the evaluation seeds with the sample
standard deviation (``*_std``) beside it, plus the per-seed values.

* ``FID-attr-N<n>``: Fréchet distance in the attribute judge's 64-d pre-ReLU features
  (:class:`stepdistill.eval.judges.AttributeDetector`) against a reference set -- by default the
  held-out coloured digits (``colored_mnist.load_split("heldout", variants=2)``, 1,000 images, which
  nobody trains on); ``reference="vae"``: the same digits through the pipeline's own VAE
  (``FID-attr-vae``: the decoder blur every latent model of that VAE shares is in the reference too,
  so the distance measures the latent model; see ``benchmarks/t2i_yardstick.py``); or any statistics
  ``.npz`` / image array (e.g. decoded teacher samples, for a teacher-relative FID).
  ``extra_references={"vae": "vae"}`` adds ``fid_vae`` beside ``fid`` from the same images.
* ``clip_score``: 100 * cosine (torchmetrics scale, clipped at 0) under the separately trained CLIP
  judge (``eval/weights/t2i-clip-v1``) or any CLIP folder.
* ``prompt_accuracy``: fraction of images whose digit, foreground and background colour (the judge's
  three heads) all match the prompt (GenEval-style); ``digit_accuracy`` / ``fg_accuracy`` /
  ``bg_accuracy`` per attribute.

Prompt files: UTF-8 text, one prompt per line (blank lines skipped), the format of
``train.dataset=prompts:<file>``; prompt accuracy needs every line to be a coloured-MNIST caption.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import EvalInputError

__all__ = [
    "SEED_STRIDE",
    "SCHEDULERS",
    "read_prompts",
    "check_prompts_for_tokenizer",
    "set_scheduler",
    "reference_features",
    "score_images",
    "evaluate_t2i",
    "summarize",
]

SEED_STRIDE = 1_000_000
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "lcm": "LCMScheduler",
}


# ---------------------------------------------------------------------------------------------- prompts
def read_prompts(path: str | os.PathLike, *, need_attributes: bool = True) -> tuple[list[str], torch.Tensor | None]:
    """``(prompts, attrs)`` of a prompt file; ``attrs`` (N, 3) digit/fg/bg when every line is a
    coloured-MNIST caption, else ``None`` (or an error when ``need_attributes``).

    Errors (``EvalInputError``, one message naming the file and line): missing file, a folder, an
    empty file, a line that is not UTF-8, and -- with ``need_attributes`` -- a line that is not a
    caption (its unknown words are named).
    """
    from stepdistill.data.colored_mnist import parse_caption, vocabulary

    p = Path(path).expanduser()
    if not p.exists():
        raise EvalInputError(f"{p}: prompt file not found (expected a UTF-8 text file, one prompt per line)")
    if not p.is_file():
        raise EvalInputError(f"{p}: is not a file (expected a UTF-8 text file, one prompt per line)")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise EvalInputError(f"{p}: cannot read the prompt file ({e})") from e
    prompts: list[str] = []
    bad: list[int] = []
    for no, line in enumerate(raw.splitlines(), 1):
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError:
            bad.append(no)
            continue
        if text:
            prompts.append(text)
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else "")
        raise EvalInputError(f"{p}: {len(bad)} line(s) are not UTF-8 text (line {shown}); save the file as UTF-8")
    if not prompts:
        raise EvalInputError(f"{p}: the prompt file is empty (no non-blank lines)")
    attrs = []
    vocab = set(vocabulary())
    for no, text in enumerate(prompts, 1):
        a = parse_caption(text)
        if a is None:
            if not need_attributes:
                return prompts, None
            unknown = sorted({w for w in text.lower().rstrip(".").split() if w not in vocab})
            why = (f"unknown word(s) {', '.join(map(repr, unknown))}" if unknown
                   else "not of the form 'a <colour> <digit> on a <colour> background' with two different colours")
            raise EvalInputError(
                f"{p}: prompt {no} {text[:80]!r} is not a coloured-MNIST caption ({why}); prompt accuracy needs "
                "captions like 'a red seven on a blue background' (see stepdistill/data/t2i_prompts/eval_1000.txt)"
            )
        attrs.append([a["digit"], a["fg"], a["bg"]])
    return prompts, torch.tensor(attrs, dtype=torch.long)


def check_prompts_for_tokenizer(prompts: list[str], tokenizer: Any) -> dict[str, Any]:
    """Check prompts against a pipeline's tokenizer: words it maps to its unknown token are an error
    (one message naming them); prompts longer than ``model_max_length`` are truncated by the
    pipeline, which is reported as a warning and counted.  Returns ``{"truncated_prompts": k,
    "max_tokens": m}``."""
    if tokenizer is None:
        return {"truncated_prompts": 0, "max_tokens": None}
    limit = int(getattr(tokenizer, "model_max_length", 77) or 77)
    unk = getattr(tokenizer, "unk_token_id", None)
    specials = {getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    unknown: set[str] = set()
    if unk is not None:
        words = sorted({w for p in prompts for w in p.split()})
        for w in words:
            ids = tokenizer(w, add_special_tokens=False)["input_ids"]
            if unk in ids and not (unk in specials and w in (tokenizer.unk_token, tokenizer.eos_token)):
                unknown.add(w)
    if unknown:
        shown = ", ".join(map(repr, sorted(unknown)[:10])) + (" ..." if len(unknown) > 10 else "")
        raise EvalInputError(
            f"{len(unknown)} prompt word(s) are unknown to the pipeline's tokenizer: {shown}; "
            "use words of its vocabulary (for the coloured-MNIST teacher: stepdistill.data.colored_mnist.vocabulary())"
        )
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    long = [i for i, n in enumerate(lengths) if n > limit]
    if long:
        warnings.warn(
            f"{len(long)} prompt(s) are longer than the tokenizer's limit of {limit} tokens (longest "
            f"{max(lengths)}; first: prompt {long[0] + 1}); the pipeline truncates them to {limit} tokens",
            UserWarning, stacklevel=2)
    return {"truncated_prompts": len(long), "max_tokens": max(lengths)}


# ----------------------------------------------------------------------------------------- scheduler
def set_scheduler(pipe: Any, name: str | None, **overrides: Any) -> str:
    """Swap the pipeline's scheduler for a stock one built from its config (``ddim``, ``dpm++``,
    ``euler``, ...; ``None`` keeps it).  Returns the class name in use."""
    if name is None:
        return type(pipe.scheduler).__name__
    key = str(name).lower()
    if key not in SCHEDULERS:
        raise EvalInputError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[key])
    kw = dict(overrides)
    if key in ("dpm++", "dpmsolver++"):
        kw.setdefault("algorithm_type", "dpmsolver++")
        kw.setdefault("solver_order", 2)
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **kw)
    return cls.__name__


# ------------------------------------------------------------------------------------------ reference
def reference_features(detector: Any, reference: Any = None, vae: Any = None) -> tuple[Any, dict[str, Any]]:
    """Reference ``FeatureStats`` for FID and a description: ``None`` = held-out coloured digits
    (1,000 images); ``"vae"`` = the same digits after a round trip through ``vae`` (the evaluated
    pipeline's own VAE: the reference every latent model of that VAE can reach, so the FID measures
    the latent model rather than the shared decoder blur); a ``FeatureStats`` / statistics ``.npz``;
    or uint8 images (tensor / array)."""
    from .fid import FeatureStats

    if reference is None or (isinstance(reference, str) and reference == "vae"):
        from stepdistill.data.colored_mnist import load_split

        from .judges import as_uint8

        ref = load_split("heldout", variants=2, seed=0)
        if reference is None:
            x = as_uint8(ref.images)
            desc = "colored_mnist heldout, variants=2, seed=0"
        else:
            if vae is None:
                raise EvalInputError("reference 'vae' needs a pipeline with a VAE (pipe.vae)")
            x = vae_reconstruct(vae, ref.images.to(next(vae.parameters()).dtype))
            desc = "colored_mnist heldout, variants=2, seed=0, through the pipeline's VAE"
        st = FeatureStats.from_features(detector.features(x), source="colored-mnist-heldout")
        return st, {"reference": desc, "reference_n": int(x.shape[0])}
    if isinstance(reference, FeatureStats):
        return reference, {"reference": "statistics", "reference_n": reference.n}
    if isinstance(reference, (str, os.PathLike)):
        st = FeatureStats.load(reference)
        return st, {"reference": os.fspath(reference), "reference_n": st.n}
    from .inputs import images_from_array

    x = images_from_array(reference)
    return FeatureStats.from_features(detector.features(x), source="images"), {
        "reference": "images", "reference_n": int(x.shape[0])}


def score_images(images: torch.Tensor, prompts: list[str], attrs: torch.Tensor | None, *, detector: Any,
                 ref_stats: Any, clip: Any, extra_stats: dict[str, Any] | None = None) -> dict[str, Any]:
    """FID / CLIP / accuracy of one set of uint8 images generated for ``prompts``; ``extra_stats``
    (name -> reference ``FeatureStats``) adds ``fid_<name>`` against each further reference."""
    from .clip_score import clip_score
    from .fid import FeatureStats, frechet_distance
    from .judges import attribute_accuracy

    feats = detector.features(images)
    st = FeatureStats.from_features(feats)
    out: dict[str, Any] = {"fid": frechet_distance(st.mu, st.sigma, ref_stats.mu, ref_stats.sigma)}
    for name, ref in (extra_stats or {}).items():
        out[f"fid_{name}"] = frechet_distance(st.mu, st.sigma, ref.mu, ref.sigma)
    if clip is not None:
        c = clip_score(images, prompts, clip, batch_size=250)
        out["clip_score"] = c["clip_score"]
        out["clip_cosine"] = c["clip_cosine"]
    if attrs is not None:
        out.update(attribute_accuracy(detector.predict(images), attrs))
    return out


def summarize(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample std (ddof=1; 0 for one seed) of every numeric key over the seeds."""
    out: dict[str, Any] = {}
    keys = [k for k in per_seed[0] if isinstance(per_seed[0][k], (int, float)) and k != "seed"]
    for k in keys:
        v = np.array([float(r[k]) for r in per_seed], np.float64)
        out[k] = float(v.mean())
        out[f"{k}_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return out


# ------------------------------------------------------------------------------------------- evaluate
def _load_clip_judge(clip_model: Any, device: Any):
    from .clip_score import load_clip
    from .judges import default_clip_judge_dir

    if clip_model is False:
        return None, None
    if clip_model is None:
        clip_model = default_clip_judge_dir()
    if isinstance(clip_model, tuple):
        return clip_model, "object"
    return load_clip(clip_model, device), os.fspath(clip_model)


def check_seeds(seeds) -> list[int]:
    """Evaluation seeds as ints: at least one, all distinct."""
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise EvalInputError("at least one evaluation seed is needed (e.g. --seeds 0,1,2)")
    if len(set(seeds)) != len(seeds):
        raise EvalInputError(f"evaluation seeds must differ, got {seeds}")
    return seeds


def prepare_pipeline(pipeline: Any, prompts: list[str], scheduler: str | None, scheduler_kwargs: dict | None,
                     device) -> tuple[Any, dict, str | None]:
    """``(pipe, tokenizer report, scheduler name)``: the pipeline loaded (a folder) or taken as is,
    its progress bar off, the prompts checked against its tokenizer, the sampler swapped in."""
    from .generate import load_pipeline

    pipe = load_pipeline(pipeline, device=device) if isinstance(pipeline, (str, os.PathLike)) else pipeline
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    tok_info = check_prompts_for_tokenizer(sorted(set(prompts)), getattr(pipe, "tokenizer", None))
    return pipe, tok_info, set_scheduler(pipe, scheduler, **(scheduler_kwargs or {}))


def score_per_seed(pipe: Any, prompts: list[str], seeds: list[int], score, *, batch_size: int,
                   guidance_scale: float | None, num_inference_steps: int | None, progress: bool, device) -> list[dict]:
    """For each evaluation seed ``s``: image ``i`` from prompt ``i`` with seed ``SEED_STRIDE * s + i``,
    then ``{"seed": s, **score(s, images), "images_per_s": ...}`` (generation time only)."""
    from .generate import iter_sample_pipeline

    kw: dict[str, Any] = {} if guidance_scale is None else {"guidance_scale": float(guidance_scale)}
    n, rows = len(prompts), []
    for s in seeds:
        t0 = time.perf_counter()
        xs = [x for x, _, _ in iter_sample_pipeline(pipe, n, seed=SEED_STRIDE * s, batch_size=batch_size,
                                                   prompts=prompts, num_inference_steps=num_inference_steps,
                                                   progress=progress, device=device, **kw)]
        gen_s = time.perf_counter() - t0
        rows.append({"seed": s, **score(s, torch.cat(xs)), "images_per_s": n / gen_s if gen_s > 0 else math.inf})
    return rows


def evaluate_t2i(
    pipeline: Any,
    prompts: str | os.PathLike | None = None,
    *,
    num_images: int | None = None,
    seeds: tuple[int, ...] | list[int] = (0, 1, 2),
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    scheduler: str | None = None,
    scheduler_kwargs: dict | None = None,
    reference: Any = None,
    extra_references: dict[str, Any] | None = None,
    attr_judge: Any = None,
    clip_model: Any = None,
    batch_size: int = 100,
    device: str | torch.device = "cpu",
    progress: bool = False,
    keep_images: bool = False,
    require_captions: bool = True,
) -> dict[str, Any]:
    """FID, CLIP score and prompt accuracy of a text-to-image pipeline (see the module doc).

    ``prompts``: a prompt file (default: the shipped 1,000 evaluation prompts); ``num_images``
    defaults to the number of prompts.  ``attr_judge``: an ``AttributeDetector`` or its folder
    (default: shipped); ``clip_model``: a CLIP folder / ``(model, processor)`` (default: the shipped
    CLIP judge; ``False`` skips the CLIP score).  ``require_captions=False`` accepts prompts that
    are not coloured-MNIST captions (prompt accuracy is then skipped).  Returns a JSON-able dict.
    """
    from stepdistill.data.colored_mnist import EVAL_PROMPTS_FILE

    from .judges import AttributeDetector, default_attribute_detector

    seeds = check_seeds(seeds)
    prompt_path = Path(prompts) if prompts is not None else EVAL_PROMPTS_FILE
    plist, attrs = read_prompts(prompt_path, need_attributes=require_captions)
    n = len(plist) if num_images is None else int(num_images)
    if n <= 0:
        raise EvalInputError(f"--num-images must be positive, got {n}")
    used = [plist[i % len(plist)] for i in range(n)]
    used_attrs = None if attrs is None else attrs[torch.arange(n) % len(plist)]

    pipe, tok_info, sched_name = prepare_pipeline(pipeline, used, scheduler, scheduler_kwargs, device)

    if attr_judge is None:
        det = default_attribute_detector(device=device)
    elif isinstance(attr_judge, AttributeDetector):
        det = attr_judge
    else:
        det = AttributeDetector.load(attr_judge, device=device)
    vae = getattr(pipe, "vae", None)
    ref_stats, ref_info = reference_features(det, reference, vae=vae)
    extra_stats = {name: reference_features(det, r, vae=vae)[0] for name, r in (extra_references or {}).items()}
    clip, clip_id = _load_clip_judge(clip_model, device)

    images_by_seed = {}

    def score(seed: int, x: torch.Tensor) -> dict:
        if x.shape[1] != 3:
            raise EvalInputError(f"the pipeline returned {x.shape[1]}-channel images; the judges need RGB")
        if keep_images:
            images_by_seed[seed] = x
        return score_images(x, used, used_attrs, detector=det, ref_stats=ref_stats, clip=clip,
                            extra_stats=extra_stats)

    per_seed = score_per_seed(pipe, used, seeds, score, batch_size=batch_size, guidance_scale=guidance_scale,
                              num_inference_steps=num_inference_steps, progress=progress, device=device)
    res: dict[str, Any] = {
        "metric": f"{det.fid_name}{'-vae' if isinstance(reference, str) and reference == 'vae' else ''}-N{n}",
        **summarize(per_seed),
        "n": n,
        "seeds": seeds,
        "seed_rule": f"image i of evaluation seed s: torch.Generator().manual_seed({SEED_STRIDE} * s + i)",
        "per_seed": per_seed,
        "prompts": os.fspath(prompt_path),
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "scheduler": sched_name,
        "timestep_spacing": dict(getattr(pipe.scheduler, "config", {}) or {}).get("timestep_spacing"),
        "fid_detector": det.name,
        "fid_detector_id": det.id,
        "clip_model": clip_id,
        **ref_info,
        **({"extra_references": {k: (v if isinstance(v, str) else type(v).__name__)
                                 for k, v in extra_references.items()}} if extra_references else {}),
        **tok_info,
    }
    if attrs is None:
        res["prompt_accuracy"] = None
        res["note"] = "prompt accuracy skipped: the prompt file holds lines that are not coloured-MNIST captions"
    if keep_images:
        res["_images"] = images_by_seed
    return res


# --------------------------------------------------------------------------------------------- floors
def load_vae(folder: str | os.PathLike, device: str | torch.device = "cpu"):
    """``AutoencoderKL`` from a pipeline folder (its ``vae/``) or a VAE folder."""
    from diffusers import AutoencoderKL

    p = Path(folder).expanduser()
    sub = p / "vae" if (p / "vae" / "config.json").is_file() else p
    if not (sub / "config.json").is_file():
        raise EvalInputError(f"{p}: no VAE here (expected a pipeline folder with vae/ or an AutoencoderKL folder)")
    try:
        return AutoencoderKL.from_pretrained(str(sub)).eval().requires_grad_(False).to(device)
    except Exception as e:  # noqa: BLE001
        raise EvalInputError(f"{sub}: cannot load the VAE ({type(e).__name__}: {e})") from e


def vae_reconstruct(vae: Any, images: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """Encode (posterior mode) and decode float images in [-1, 1]; returns uint8."""
    from .judges import as_uint8

    out = []
    dev = next(vae.parameters()).device
    with torch.inference_mode():
        for i in range(0, images.shape[0], batch_size):
            z = vae.encode(images[i : i + batch_size].to(dev)).latent_dist.mode()
            out.append(as_uint8(vae.decode(z).sample.cpu()))
    return torch.cat(out)


def t2i_floors(vae: str | os.PathLike | Any = None, *, seeds: tuple[int, ...] | list[int] = (0, 1, 2),
               num_images: int = 1000, attr_judge: Any = None, device: str | torch.device = "cpu") -> dict[str, Any]:
    """FID floors at N=``num_images`` against the default reference (held-out digits, 1,000 images):

    * ``heldout_recoloured``: the same held-out digits under another colour seed (same shapes);
    * ``train_images``: ``num_images`` training-split images drawn by the seed (other digits: the
      floor a perfect model of the training data would sit at);
    * with ``vae``: ``vae_train_images`` (their VAE reconstructions) and ``vae_reference`` (the
      reference's own reconstructions) -- the floor any latent model with this VAE sits at.
    """
    from stepdistill.data.colored_mnist import load_split

    from .fid import FeatureStats, frechet_distance
    from .judges import AttributeDetector, as_uint8, default_attribute_detector

    det = (default_attribute_detector(device=device) if attr_judge is None else
           attr_judge if isinstance(attr_judge, AttributeDetector) else AttributeDetector.load(attr_judge, device=device))
    ref_stats, ref_info = reference_features(det, None)
    vae_model = load_vae(vae, device) if isinstance(vae, (str, os.PathLike)) else vae

    def fid(x: torch.Tensor) -> float:
        st = FeatureStats.from_features(det.features(x))
        return frechet_distance(st.mu, st.sigma, ref_stats.mu, ref_stats.sigma)

    train = load_split("train", variants=1, seed=0)
    per: dict[str, list[float]] = {}
    for s in seeds:
        k = int(num_images)
        g = torch.Generator().manual_seed(5000 + s)
        ho = load_split("heldout", variants=max(2, math.ceil(k / 500)), seed=1000 + s)
        pick = torch.randperm(len(ho), generator=g)[:k]  # rows are sorted by digit: draw, never take a prefix
        per.setdefault("heldout_recoloured", []).append(fid(as_uint8(ho.images[pick])))
        tr_v = load_split("train", variants=1, seed=100 + s) if s else train
        idx = torch.randperm(len(tr_v), generator=g)[:k]
        xt = tr_v.images[idx]
        per.setdefault("train_images", []).append(fid(as_uint8(xt)))
        if vae_model is not None:
            per.setdefault("vae_train_images", []).append(fid(vae_reconstruct(vae_model, xt)))
    out: dict[str, Any] = {"n": int(num_images), "seeds": [int(s) for s in seeds], "fid_detector_id": det.id, **ref_info}
    if vae_model is not None:
        ref = load_split("heldout", variants=2, seed=0)
        out["vae_reference"] = fid(vae_reconstruct(vae_model, ref.images))
        rec = vae_reconstruct(vae_model, ref.images[:500])
        mse = float(((rec.float() / 127.5 - 1 - ref.images[:500]) ** 2).mean())
        out["vae_psnr_db"] = float(10 * math.log10(4.0 / mse)) if mse > 0 else math.inf
        out["vae_judge_prompt_accuracy"] = float((det.predict(rec) == ref.attrs[:500]).all(1).float().mean())
    for k, v in per.items():
        arr = np.array(v)
        out[k] = float(arr.mean())
        out[f"{k}_std"] = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return out
