"""Fréchet distance and feature statistics.

The distance between two Gaussians ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` is

    ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))

computed in float64 as pytorch-fid does (``scipy.linalg.sqrtm`` of the product, ``eps * I`` added to
both covariances when the square root is not finite, tiny imaginary parts dropped).  When the
imaginary part is *not* tiny (near-singular covariances, common with few images), we do not raise
like pytorch-fid: we fall back to the symmetric form ``Tr((sqrt(s1) s2 sqrt(s1))^(1/2))`` computed with
``eigh`` (mathematically equal for PSD matrices, numerically stable) and warn.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import linalg

from .errors import EvalInputError

__all__ = [
    "FeatureStats",
    "StatsAccumulator",
    "frechet_distance",
    "stats_from_batches",
    "trace_sqrt_product_eigh",
]


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``Tr((sigma1 sigma2)^(1/2))`` via the symmetric form ``Tr((s1^(1/2) s2 s1^(1/2))^(1/2))``."""
    s1h = _psd_sqrt(np.asarray(sigma1, np.float64))
    m = s1h @ np.asarray(sigma2, np.float64) @ s1h
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0, None)).sum())


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    eps: float = 1e-6,
) -> float:
    """Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` (float64)."""
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape:
        raise EvalInputError(
            f"feature means have different shapes {mu1.shape} and {mu2.shape}: the two sides were "
            "computed with different detectors; use the same --detector for both"
        )
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise EvalInputError(
            f"covariances have shapes {sigma1.shape} and {sigma2.shape}, expected "
            f"{(mu1.shape[0], mu1.shape[0])}: the statistics do not match"
        )
    diff = mu1 - mu2
    try:
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        finite = np.isfinite(covmean).all()
    except (linalg.LinAlgError, ValueError):
        finite = False
    if not finite:
        warnings.warn(
            f"fid: sqrtm of the covariance product is singular; adding {eps} to the diagonal",
            RuntimeWarning,
            stacklevel=2,
        )
        offset = np.eye(sigma1.shape[0]) * eps
        try:
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
        except (linalg.LinAlgError, ValueError):
            covmean = None
    tr_covmean: float
    if covmean is None or not np.isfinite(covmean).all():
        tr_covmean = trace_sqrt_product_eigh(sigma1, sigma2)
    elif np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            m = float(np.max(np.abs(covmean.imag)))
            warnings.warn(
                f"fid: sqrtm has a large imaginary component ({m:.3g}); using the eigh-based trace "
                "(covariances are probably near-singular: use more images)",
                RuntimeWarning,
                stacklevel=2,
            )
            tr_covmean = trace_sqrt_product_eigh(sigma1, sigma2)
        else:
            tr_covmean = float(np.trace(covmean.real))
    else:
        tr_covmean = float(np.trace(covmean))
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


@dataclass
class FeatureStats:
    """Mean and covariance of detector features, with provenance.

    ``n`` is the number of images (``None`` when unknown, e.g. stats imported from another tool).
    ``metadata`` is JSON-serialisable (detector id, weights hash, source, preprocessing, ...).
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int | None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    @classmethod
    def from_features(
        cls, features: np.ndarray, metadata: dict[str, Any] | None = None, *, source: str = "features"
    ) -> FeatureStats:
        acc = StatsAccumulator()
        acc.update(features)
        return acc.finalize(metadata, source=source)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``mu``, ``sigma``, ``n`` and ``metadata`` (a JSON string) to ``path`` atomically."""
        path = os.fspath(path)
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=d)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(
                    f,
                    mu=np.asarray(self.mu, np.float64),
                    sigma=np.asarray(self.sigma, np.float64),
                    n=np.int64(-1 if self.n is None else self.n),
                    metadata=np.array(json.dumps(self.metadata, sort_keys=True)),
                )
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        """Load stats written by :meth:`save`, or any ``.npz`` with ``mu`` and ``sigma`` arrays
        (pytorch-fid / EDM / clean-fid reference files)."""
        path = os.fspath(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                keys = set(z.files)
                if not {"mu", "sigma"} <= keys:
                    raise EvalInputError(
                        f"{path}: not a statistics file (keys {sorted(keys)}; expected 'mu' and 'sigma')"
                    )
                mu = np.asarray(z["mu"], np.float64)
                sigma = np.asarray(z["sigma"], np.float64)
                n = int(z["n"]) if "n" in keys else -1
                meta = json.loads(str(z["metadata"])) if "metadata" in keys else {}
        except EvalInputError:
            raise
        except (OSError, ValueError) as e:
            raise EvalInputError(f"{path}: cannot read statistics ({e}); recompute them") from e
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise EvalInputError(f"{path}: mu has shape {mu.shape} and sigma {sigma.shape}; they do not match")
        return cls(mu=mu, sigma=sigma, n=None if n < 0 else n, metadata=meta)


class StatsAccumulator:
    """Streaming mean / covariance in float64 (Chan et al. pairwise merge of batch statistics).

    Feed ``(B, d)`` feature batches to :meth:`update`; :meth:`finalize` gives :class:`FeatureStats`
    with the unbiased covariance (``ddof=1``, like ``np.cov``).
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None

    def update(self, features: np.ndarray) -> None:
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2:
            raise ValueError(f"features must be (N, d), got shape {f.shape}")
        nb = f.shape[0]
        if nb == 0:
            return
        if not np.isfinite(f).all():
            raise EvalInputError(
                "the detector returned non-finite features (NaN/inf): check the images and the detector weights"
            )
        mb = f.mean(axis=0)
        c = f - mb
        m2b = c.T @ c
        if self.mean is None:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return
        if mb.shape != self.mean.shape:
            raise ValueError(f"feature dim changed from {self.mean.shape[0]} to {mb.shape[0]}")
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2b + np.outer(delta, delta) * (self.n * nb / n)
        self.n = n

    def finalize(self, metadata: dict[str, Any] | None = None, *, source: str = "images") -> FeatureStats:
        if self.n < 2 or self.mean is None:
            raise EvalInputError(
                f"{source}: {self.n} image(s) is too few to estimate a covariance; FID needs at least 2 "
                "(and preferably more images than feature dimensions): pass more images / a larger --num-images"
            )
        d = self.mean.shape[0]
        if self.n < d:
            warnings.warn(
                f"{source}: only {self.n} images for {d}-dimensional features: the covariance is singular "
                "and the FID is strongly biased; use at least as many images as feature dimensions",
                RuntimeWarning,
                stacklevel=2,
            )
        sigma = self.m2 / (self.n - 1)
        return FeatureStats(mu=self.mean.copy(), sigma=sigma, n=self.n, metadata=dict(metadata or {}))


def stats_from_batches(batches: Iterable[torch.Tensor], detector: Any, source: str = "images",
                       metadata: dict[str, Any] | None = None) -> FeatureStats:
    """Stream uint8 NCHW batches through ``detector`` into :class:`FeatureStats`."""
    acc = StatsAccumulator()
    chunk = detector.default_batch_size
    buf: list[torch.Tensor] = []
    buffered = 0

    def flush(x: torch.Tensor) -> None:
        for f in detector.iter_features(x, batch_size=chunk, what=source):
            acc.update(f)

    # re-chunk to the detector's batch size so that features and the accumulation order (hence the
    # result, bit for bit) do not depend on how the images were batched when generated
    for b in batches:
        buf.append(b)
        buffered += b.shape[0]
        if buffered >= chunk:
            x = torch.cat(buf)
            full = (x.shape[0] // chunk) * chunk
            flush(x[:full])
            buf, buffered = ([x[full:]], x.shape[0] - full) if full < x.shape[0] else ([], 0)
    if buffered:
        flush(torch.cat(buf))
    return acc.finalize(metadata, source=source)
