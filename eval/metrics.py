"""High-level metrics: FID between any two sources, class accuracy, KID.

A *source* is any of:

* a :class:`~stepdistill.eval.fid.FeatureStats` (precomputed),
* uint8 images (torch tensor / numpy array, NCHW or NHWC),
* a generate function ``fn(generators: list[torch.Generator], labels: LongTensor | None) -> uint8 NCHW``
  (see :func:`~stepdistill.eval.generate.generate_images`),
* a ``diffusers.DiffusionPipeline`` object,
* a string: dataset name (``digits``, ``digits-a``, ``digits-b``), image folder, ``.npz`` (images or
  ``mu``/``sigma``), or a pipeline folder (with ``model_index.json``).

Dataset and folder statistics are cached (:mod:`stepdistill.eval.reference`).
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from .detectors import Detector, DigitsDetector, get_detector
from .errors import EvalInputError
from .fid import FeatureStats, frechet_distance, stats_from_batches
from .generate import iter_generate, iter_sample_pipeline
from .inputs import (
    classify_source,
    images_from_array,
    iter_image_folder,
    load_dataset_images,
    load_image_folder,
    load_npz,
)
from .reference import reference_stats

__all__ = [
    "FIDResult",
    "resolve_detector",
    "stats_from_batches",
    "compute_stats",
    "compute_fid",
    "fid_metric_name",
    "class_accuracy",
    "evaluate_class_accuracy",
    "load_images_and_labels",
    "kid",
    "evaluate_generator",
]


def resolve_detector(detector: Detector | str | None = None, **kwargs: Any) -> Detector:
    """``None`` -> the cached digits detector; a name -> :func:`get_detector`; a Detector -> itself."""
    if detector is None:
        return get_detector("digits", **kwargs)
    if isinstance(detector, str):
        return get_detector(detector, **kwargs)
    if not isinstance(detector, Detector):
        raise EvalInputError(f"detector must be a Detector or a name, got {type(detector).__name__}")
    return detector


def is_pipeline(obj: Any) -> bool:
    """True for a diffusers pipeline object (without importing diffusers when it is not loaded)."""
    if "diffusers" not in sys.modules:  # no pipeline object can exist; avoid the slow import
        return False
    from diffusers import DiffusionPipeline

    return isinstance(obj, DiffusionPipeline)


def _check_stats_detector(st: FeatureStats, detector: Detector, where: str) -> None:
    meta_det = st.metadata.get("detector")
    if isinstance(meta_det, dict) and meta_det.get("weights_sha256") is not None:
        mine = detector.cache_key()
        if meta_det != mine:
            raise EvalInputError(
                f"{where}: statistics were computed with detector {meta_det.get('detector')} "
                f"(weights {str(meta_det.get('weights_sha256'))[:12]}, preprocessing "
                f"{meta_det.get('preprocessing')}) but this evaluation uses {detector.name} (weights "
                f"{detector.weights_sha256[:12]}); recompute them with `stepdistill eval stats`"
            )
    elif st.dim != detector.feature_dim:
        raise EvalInputError(
            f"{where}: statistics have {st.dim}-d features but detector {detector.name} gives "
            f"{detector.feature_dim}-d; they come from another detector"
        )
    else:
        warnings.warn(f"{where}: statistics carry no detector metadata; assuming they match {detector.name}",
                      stacklevel=3)


def compute_stats(
    source: Any,
    detector: Detector | str | None = None,
    num_images: int | None = None,
    *,
    seed: int = 0,
    batch_size: int = 64,
    labels: Any = None,
    num_classes: int | None = None,
    prompts: Any = None,
    num_inference_steps: int | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    **call_kwargs: Any,
) -> FeatureStats:
    """Feature statistics of any source (see module docstring).

    ``num_images``: required for generated sources; for data sources, the first ``num_images``
    (``None`` = all).  ``batch_size`` is the *generation* batch size (results do not depend on it).
    """
    det = resolve_detector(detector)
    meta: dict[str, Any] = {"detector": det.cache_key()}
    if isinstance(source, FeatureStats):
        _check_stats_detector(source, det, "statistics")
        return source
    if isinstance(source, (torch.Tensor, np.ndarray)):
        x = images_from_array(source)  # uint8 NCHW / NHWC / NHW
        if num_images is not None:
            if num_images > x.shape[0]:
                raise EvalInputError(f"images: {num_images} requested but only {x.shape[0]} given")
            x = x[:num_images]
        meta["source"] = {"type": "array", "n": int(x.shape[0])}
        return stats_from_batches([x], det, "images", meta)
    if is_pipeline(source) or (isinstance(source, (str, os.PathLike)) and classify_source(source).kind == "pipeline"):
        if num_images is None:
            raise EvalInputError("sampling a pipeline needs a number of images (--num-images)")
        gen = iter_sample_pipeline(source, num_images, seed=seed, batch_size=batch_size, class_labels=labels,
                                   prompts=prompts, num_inference_steps=num_inference_steps,
                                   num_classes=num_classes, progress=progress, **call_kwargs)
        meta["source"] = {"type": "pipeline", "path": str(source) if isinstance(source, (str, os.PathLike))
                          else type(source).__name__, "seed": seed, "n": num_images,
                          "num_inference_steps": num_inference_steps}
        return stats_from_batches((x for x, _, _ in gen), det, "pipeline samples", meta)
    if callable(source):
        if num_images is None:
            raise EvalInputError("a generate function needs a number of images (num_images)")
        gen = iter_generate(source, num_images, seed=seed, batch_size=batch_size, labels=labels,
                            num_classes=num_classes, progress=progress)
        meta["source"] = {"type": "generate-fn", "name": getattr(source, "__name__", type(source).__name__),
                          "seed": seed, "n": num_images}
        return stats_from_batches((x for x, _ in gen), det, "generated images", meta)
    if isinstance(source, (str, os.PathLike)):
        s = os.fspath(source)
        kind = classify_source(s).kind
        if kind in ("dataset", "folder"):
            if cache:
                return reference_stats(s, det, num_images, cache_dir=cache_dir, progress=progress)
            meta["source"] = {"type": kind, "value": s}
            if kind == "dataset":
                x, _ = load_dataset_images(s, num_images)
                return stats_from_batches([x], det, s, meta)
            batches = (x for x, _ in iter_image_folder(s, num_images, progress=progress))
            return stats_from_batches(batches, det, s, meta)
        loaded = load_npz(s)
        if isinstance(loaded, FeatureStats):
            _check_stats_detector(loaded, det, s)
            if num_images is not None and loaded.n is not None and loaded.n != num_images:
                warnings.warn(f"{s}: statistics were computed from {loaded.n} images, not {num_images}",
                              stacklevel=2)
            return loaded
        x, _ = loaded
        if num_images is not None:
            if num_images > x.shape[0]:
                raise EvalInputError(f"{s}: {num_images} images requested but the file has {x.shape[0]}")
            x = x[:num_images]
        meta["source"] = {"type": "images-npz", "path": s, "n": int(x.shape[0])}
        return stats_from_batches([x], det, s, meta)
    raise EvalInputError(f"unsupported FID source of type {type(source).__name__}")


def fid_metric_name(detector: Detector, n: int | None) -> str:
    """``FID-digits-N1000`` for the digits classifier, ``FID-N50000`` for Inception, ..."""
    return f"{detector.fid_name}-N{n}" if n is not None else detector.fid_name


@dataclass
class FIDResult:
    fid: float
    metric: str
    fid_detector: str
    detector: dict[str, Any]
    n_a: int | None
    n_b: int | None
    source_a: Any = None
    source_b: Any = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d

    def __float__(self) -> float:
        return float(self.fid)


def _describe_source(src: Any) -> Any:
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    if isinstance(src, FeatureStats):
        return {"type": "stats", **({"source": src.metadata.get("source")} if src.metadata.get("source") else {})}
    return type(src).__name__ if not callable(src) or is_pipeline(src) else getattr(src, "__name__", "fn")


def compute_fid(
    a: Any,
    b: Any,
    detector: Detector | str | None = None,
    num_images: int | None = None,
    num_images_b: int | None = None,
    *,
    seed: int = 0,
    seed_b: int | None = None,
    batch_size: int = 64,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    **gen_kwargs: Any,
) -> FIDResult:
    """FID between sources ``a`` (usually generated) and ``b`` (usually the reference).

    ``num_images`` applies to ``a``; ``num_images_b`` to ``b`` (default: all images of a data source,
    or ``num_images`` for a generated one).  ``gen_kwargs`` (``labels``, ``num_classes``, ``prompts``,
    ``num_inference_steps``, pipeline call kwargs) go to generated sources.  The metric is named
    ``f"{detector.fid_name}-N{n_a}"``, e.g. ``FID-digits-N1000``.
    """
    det = resolve_detector(detector)
    t0 = time.perf_counter()
    st_a = compute_stats(a, det, num_images, seed=seed, batch_size=batch_size, cache=cache,
                         cache_dir=cache_dir, progress=progress, **gen_kwargs)
    nb = num_images_b
    if nb is None and (callable(b) or is_pipeline(b)
                       or (isinstance(b, (str, os.PathLike)) and classify_source(b).kind == "pipeline")):
        nb = num_images
    st_b = compute_stats(b, det, nb, seed=seed if seed_b is None else seed_b, batch_size=batch_size,
                         cache=cache, cache_dir=cache_dir, progress=progress, **gen_kwargs)
    value = frechet_distance(st_a.mu, st_a.sigma, st_b.mu, st_b.sigma)
    return FIDResult(
        fid=value,
        metric=fid_metric_name(det, st_a.n),
        fid_detector=det.name,
        detector=det.describe(),
        n_a=st_a.n,
        n_b=st_b.n,
        source_a=_describe_source(a),
        source_b=_describe_source(b),
        seconds=round(time.perf_counter() - t0, 3),
    )


# ------------------------------------------------------------------------------------ class accuracy
def _classifier(detector: Detector | str | None) -> Detector:
    det = resolve_detector(detector)
    if not hasattr(det, "predict"):
        raise EvalInputError(f"detector {det.name} is not a classifier; class accuracy needs --detector digits")
    return det


def class_accuracy(images: Any, labels: Any, detector: Detector | str | None = None) -> dict[str, Any]:
    """Fraction of ``images`` (uint8 NCHW) whose predicted class equals ``labels``, plus per-class
    accuracy.  Default detector: the digits classifier."""
    det = _classifier(detector)
    x = images_from_array(images)
    y = torch.as_tensor(labels, dtype=torch.long).flatten()
    if y.shape[0] != x.shape[0]:
        raise EvalInputError(f"{y.shape[0]} labels for {x.shape[0]} images")
    if y.numel() == 0:
        raise EvalInputError("class accuracy of zero images")
    nc = getattr(det, "num_classes", int(y.max()) + 1)
    if int(y.min()) < 0 or int(y.max()) >= nc:
        raise EvalInputError(f"labels must be in 0..{nc - 1} for detector {det.name}, got {int(y.min())}..{int(y.max())}")
    pred = det.predict(x)
    ok = (pred == y).float()
    per = {int(c): float(ok[y == c].mean()) for c in torch.unique(y).tolist()}
    return {"class_accuracy": float(ok.mean()), "n": int(y.numel()), "per_class_accuracy": per,
            "accuracy_detector": det.name, "accuracy_detector_id": det.id}


def load_images_and_labels(
    source: Any, num_images: int | None = None, *, seed: int = 0, batch_size: int = 64,
    labels: Any = "uniform", num_classes: int | None = 10, progress: bool = True, **call_kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and the labels they were generated with (or carry), from any labelled source."""
    if is_pipeline(source) or (isinstance(source, (str, os.PathLike)) and classify_source(source).kind == "pipeline"):
        if num_images is None:
            raise EvalInputError("sampling a pipeline needs a number of images (--num-images)")
        xs, ys = [], []
        for x, y, _ in iter_sample_pipeline(source, num_images, seed=seed, batch_size=batch_size,
                                            class_labels=labels, num_classes=num_classes,
                                            progress=progress, **call_kwargs):
            if y is None:
                raise EvalInputError("the pipeline is not class-conditional (its __call__ has no class_labels)")
            xs.append(x)
            ys.append(y)
        return torch.cat(xs), torch.cat(ys)
    if callable(source):
        if num_images is None:
            raise EvalInputError("a generate function needs a number of images (num_images)")
        xs, ys = [], []
        for x, y in iter_generate(source, num_images, seed=seed, batch_size=batch_size, labels=labels,
                                  num_classes=num_classes, progress=progress):
            xs.append(x)
            ys.append(y)
        if ys[0] is None:
            raise EvalInputError("class accuracy needs labels: pass labels='uniform' and num_classes")
        return torch.cat(xs), torch.cat(ys)
    if isinstance(source, (str, os.PathLike)):
        s = os.fspath(source)
        kind = classify_source(s).kind
        if kind == "dataset":
            return load_dataset_images(s, num_images)
        if kind == "folder":
            x, y, files = load_image_folder(s, num_images, progress=progress)
            if y is None:
                raise EvalInputError(
                    f"{s}: file names carry no class labels; name files like 000001_class3.png (as save_images "
                    "does) or put them in integer class folders (3/xxx.png)"
                )
            return x, y
        if kind == "images-npz":
            x, y = load_npz(s)
            if y is None:
                raise EvalInputError(f"{s}: no 'labels' array next to 'images'; add one for class accuracy")
            if num_images is not None:
                x, y = x[:num_images], y[:num_images]
            return x, y
        raise EvalInputError(f"{s}: class accuracy needs images with labels, not a {kind}")
    if isinstance(source, tuple) and len(source) == 2:
        return source[0], torch.as_tensor(source[1])
    raise EvalInputError(f"unsupported class-accuracy source of type {type(source).__name__}")


def evaluate_class_accuracy(
    source: Any, num_images: int | None = None, detector: Detector | str | None = None, *,
    seed: int = 0, batch_size: int = 64, labels: Any = "uniform", num_classes: int | None = 10,
    progress: bool = True, **call_kwargs: Any,
) -> dict[str, Any]:
    """Class accuracy of a generated / labelled source under the digits classifier.  For generators
    the labels are those used to generate (``i % num_classes`` by default)."""
    det = _classifier(detector)
    if isinstance(det, DigitsDetector) and num_classes is not None and num_classes != det.num_classes:
        raise EvalInputError(f"num_classes={num_classes} but the digits detector has {det.num_classes} classes")
    x, y = load_images_and_labels(source, num_images, seed=seed, batch_size=batch_size, labels=labels,
                                  num_classes=num_classes, progress=progress, **call_kwargs)
    out = class_accuracy(x, y, det)
    out["seed"] = seed
    return out


# ------------------------------------------------------------------------------------------------- KID
def kid(feats_a: np.ndarray, feats_b: np.ndarray, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (unbiased MMD^2 with the cubic polynomial kernel, averaged over
    random subsets, as in torchmetrics / torch-fidelity).  Returns ``(mean, std)``."""
    a = np.asarray(feats_a, np.float64)
    b = np.asarray(feats_b, np.float64)
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise EvalInputError("KID needs at least 2 images on each side")
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(num_subsets):
        x = a[rng.choice(a.shape[0], m, replace=False)]
        y = b[rng.choice(b.shape[0], m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
        vals.append(mmd)
    v = np.array(vals)
    return float(v.mean()), float(v.std())


# ------------------------------------------------------------------------------------------ one pass
def evaluate_generator(
    fn: Any,
    reference: Any = "digits",
    detector: Detector | str | None = None,
    num_images: int = 1000,
    *,
    num_classes: int | None = 10,
    labels: Any = None,
    seed: int = 0,
    batch_size: int = 64,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate once with ``fn(generators, labels) -> uint8 NCHW`` and report FID against
    ``reference`` and (when labels are used and the detector is a classifier) class accuracy.

    Returns ``{"metric", "fid", "fid_detector", "n_samples", "class_accuracy", ...}``.
    """
    from .generate import generate_images, resolve_labels

    det = resolve_detector(detector)
    t0 = time.perf_counter()
    images = generate_images(fn, num_images, seed=seed, batch_size=batch_size, labels=labels,
                             num_classes=num_classes, progress=progress)
    gen_seconds = time.perf_counter() - t0
    res = compute_fid(images, reference, det, cache=cache, cache_dir=cache_dir, progress=progress)
    out: dict[str, Any] = {"metric": res.metric, "fid": res.fid, "fid_detector": res.fid_detector,
                           "n_samples": num_images, "n_reference": res.n_b, "detector_id": det.id,
                           "seed": seed, "generate_seconds": round(gen_seconds, 3)}
    y = resolve_labels(num_images, labels, num_classes)
    if y is not None and hasattr(det, "predict"):
        out["class_accuracy"] = class_accuracy(images, y, det)["class_accuracy"]
    return out
