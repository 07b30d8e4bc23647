"""Reference statistics, computed once and cached.

The cache key is the JSON of: detector name + weights sha256 + feature dim + preprocessing, the
source (dataset name, or folder path + sha256 of its selected files' names/sizes/mtimes) and the
number of images.  Identical requests reuse ``<cache_dir>/<name>-<detector>-N<n>-<hash>.npz`` (with a
``.json`` sidecar holding the same metadata); any change gives a new key, so the stats are
recomputed.  Files are written atomically (temporary file + ``os.replace``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from .detectors import Detector, cache_root
from .errors import EvalInputError
from .fid import FeatureStats, stats_from_batches
from .inputs import (
    DATASETS,
    classify_source,
    folder_fingerprint,
    iter_image_folder,
    list_image_files,
    load_dataset_images,
)

__all__ = ["reference_stats", "reference_key", "reference_cache_dir", "KEY_FORMAT"]

KEY_FORMAT = "stepdistill-reference-stats-v1"


def reference_cache_dir() -> Path:
    return cache_root() / "reference"


def _source_key(source: str, num_images: int | None) -> tuple[dict[str, Any], int, str]:
    """-> (source description for the key, resolved number of images, short name)."""
    info = classify_source(source)
    if info.kind == "dataset":
        from stepdistill.data.digits import load_digits

        total = int(load_digits(DATASETS[source])[1].shape[0])
        n = total if num_images is None else num_images
        if n > total:
            raise EvalInputError(f"dataset {source} has {total} images but {n} were requested; lower --num-images")
        return {"type": "dataset", "name": source, "split": DATASETS[source]}, n, source
    if info.kind == "folder":
        root = Path(info.value).resolve()
        files = list_image_files(root)
        if not files:
            raise EvalInputError(f"{root}: folder contains no images")
        n = len(files) if num_images is None else num_images
        if n > len(files):
            raise EvalInputError(f"{root}: {n} images requested but the folder has only {len(files)}")
        return {"type": "folder", "path": str(root), "files_sha256": folder_fingerprint(root, files[:n])}, n, root.name
    raise EvalInputError(
        f"{source}: reference statistics are cached for dataset names and image folders only (got a {info.kind})"
    )


def _key_and_name(source: str, detector: Detector, num_images: int | None) -> tuple[dict[str, Any], str]:
    src, n, short = _source_key(source, num_images)
    return {"format": KEY_FORMAT, "detector": detector.cache_key(), "source": src, "num_images": n}, short


def reference_key(source: str, detector: Detector, num_images: int | None = None) -> dict[str, Any]:
    """The cache key (JSON-serialisable dict) of ``source`` under ``detector``."""
    return _key_and_name(source, detector, num_images)[0]


def _compute_stats(source: str, detector: Detector, num_images: int, progress: bool = True) -> FeatureStats:
    """Uncached computation (tests count calls to this function)."""
    info = classify_source(source)
    if info.kind == "dataset":
        images, _ = load_dataset_images(source, num_images)
        return stats_from_batches([images], detector, source=str(source))
    batches = (x for x, _ in iter_image_folder(source, num_images, progress=progress))
    return stats_from_batches(batches, detector, source=str(source))


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def reference_stats(
    source: str,
    detector: Detector,
    num_images: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    recompute: bool = False,
    progress: bool = True,
) -> FeatureStats:
    """Feature statistics of a dataset name (``digits``, ``digits-a``, ``digits-b``) or image folder,
    cached under ``cache_dir`` (default ``$STEPDISTILL_CACHE/reference``).

    ``num_images=None`` uses every image.  ``recompute=True`` ignores and overwrites the cache entry.
    The returned stats carry ``metadata["key"]`` (the cache key) and ``metadata["cache_file"]``.
    """
    key, short = _key_and_name(source, detector, num_images)
    n = key["num_images"]
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    short = re.sub(r"[^A-Za-z0-9_.-]+", "_", short)[:40] or "source"
    folder = Path(cache_dir).expanduser() if cache_dir is not None else reference_cache_dir()
    path = folder / f"{short}-{detector.name}-N{n}-{h}.npz"
    if use_cache and not recompute and path.is_file():
        try:
            st = FeatureStats.load(path)
            if st.metadata.get("key") == key and st.n == n:
                st.metadata["cache_file"] = str(path)
                st.metadata["cache_hit"] = True
                return st
        except EvalInputError:
            pass  # unreadable / foreign file: recompute and overwrite
    t0 = time.perf_counter()
    st = _compute_stats(source, detector, n, progress=progress)
    st.metadata = {"key": key, "seconds": round(time.perf_counter() - t0, 3), "created": time.time(),
                   "source": key["source"], "detector": detector.cache_key()}
    if use_cache:
        folder.mkdir(parents=True, exist_ok=True)
        st.save(path)
        _atomic_write_text(path.with_suffix(".json"), json.dumps(st.metadata, indent=2, sort_keys=True) + "\n")
        st.metadata["cache_file"] = str(path)
    st.metadata["cache_hit"] = False
    return st
