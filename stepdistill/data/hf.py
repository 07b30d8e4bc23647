"""Hugging Face ``datasets`` image datasets loaded into memory as tensors (like ``folder.py``).

``name_or_path`` may be

* a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (``load_from_disk``),
* a folder of images (``load_dataset("imagefolder", data_dir=...)``; class sub-folders -> ``label``),
* a hub name (``load_dataset(name, split=...)``; needs the network or a populated HF cache).

Columns: ``image_column`` (default: ``image``/``img`` or the first ``Image``-typed column) and
``label_column`` (``"auto"``: a ``ClassLabel`` column or one named label/labels/class; ``None``:
no labels; integer columns become a LongTensor, string columns a list of captions).
The ``datasets`` package is an optional dependency (``pip install stepdistill[datasets]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from .folder import ImageData, pil_to_array, stack_images

__all__ = ["load_hf_images", "load_hf_dataset"]

_AUTO = "auto"


def _import_datasets():
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "loading hf:<dataset> needs the 'datasets' package: pip install 'stepdistill[datasets]'"
        ) from e
    return datasets


def load_hf_dataset(name_or_path: str, split: str = "train", cache_dir: str | None = None):
    """The ``datasets.Dataset`` for ``name_or_path`` / ``split`` (see module docstring)."""
    datasets = _import_datasets()
    if not name_or_path:
        raise DataError("hf: dataset name or path is empty (use hf:<local folder> or hf:<hub name>)")
    path = Path(name_or_path).expanduser()
    try:
        if path.exists():
            if not path.is_dir():
                raise DataError(f"Hugging Face dataset path {path} is a file, expected a folder")
            if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
                ds = datasets.load_from_disk(str(path))
            else:
                ds = datasets.load_dataset(
                    "imagefolder", data_dir=str(path), split=split, cache_dir=cache_dir
                )
        else:
            ds = datasets.load_dataset(name_or_path, split=split, cache_dir=cache_dir)
    except (FileNotFoundError, ValueError, OSError, ConnectionError) as e:
        where = "local folder" if path.exists() else "name (not a local path; the hub may be unreachable)"
        raise DataError(f"cannot load Hugging Face dataset {name_or_path!r} ({where}): {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(
                f"Hugging Face dataset {name_or_path!r} has no split {split!r}; splits: {', '.join(ds)}"
            )
        ds = ds[split]
    return ds


def _pick_image_column(ds, image_column: str | None, name: str) -> str:
    datasets = _import_datasets()
    cols = list(ds.column_names)
    if image_column is not None:
        if image_column not in cols:
            raise DataError(
                f"dataset {name!r} has no image column {image_column!r}; columns: {', '.join(cols)}"
            )
        return image_column
    for c in ("image", "img"):
        if c in cols:
            return c
    for c in cols:
        if isinstance(ds.features.get(c), datasets.Image):
            return c
    raise DataError(
        f"dataset {name!r} has no image column (looked for 'image', 'img' or an Image feature); "
        f"columns: {', '.join(cols)}; set train.dataset_params.image_column"
    )


def _pick_label_column(ds, label_column: str | None, name: str) -> str | None:
    datasets = _import_datasets()
    cols = list(ds.column_names)
    if label_column is None:
        return None
    if label_column != _AUTO:
        if label_column not in cols:
            raise DataError(
                f"dataset {name!r} has no label column {label_column!r}; columns: {', '.join(cols)}"
            )
        return label_column
    for c in cols:
        if isinstance(ds.features.get(c), datasets.ClassLabel):
            return c
    for c in ("label", "labels", "class"):
        if c in cols:
            return c
    return None


def _to_pil(value: Any, index: int, name: str):
    from PIL import Image

    try:
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, dict):  # undecoded Image feature: {"bytes": ..., "path": ...}
            if value.get("bytes") is not None:
                import io

                img = Image.open(io.BytesIO(value["bytes"]))
                img.load()
                return img
            if value.get("path"):
                img = Image.open(value["path"])
                img.load()
                return img
        arr = np.asarray(value)
        if arr.dtype != np.uint8:
            raise DataError(f"array images must be uint8, got {arr.dtype}")
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            arr = arr.transpose(1, 2, 0)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        return Image.fromarray(arr)
    except Exception as e:  # noqa: BLE001 - re-raised with the row named
        raise DataError(f"cannot read image of row {index} of dataset {name!r}: {e}") from e


def load_hf_images(
    name_or_path: str,
    split: str = "train",
    image_column: str | None = None,
    label_column: str | None = _AUTO,
    resolution: int | None = None,
    channels: int = 3,
    as_uint8: bool = False,
    cache_dir: str | None = None,
) -> ImageData:
    """Images (and labels or captions) of a Hugging Face dataset as tensors, like ``load_image_folder``."""
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}")
    datasets = _import_datasets()
    ds = load_hf_dataset(name_or_path, split=split, cache_dir=cache_dir)
    if len(ds) == 0:
        raise DataError(f"Hugging Face dataset {name_or_path!r} (split {split!r}) is empty")
    img_col = _pick_image_column(ds, image_column, name_or_path)
    lab_col = _pick_label_column(ds, label_column, name_or_path)
    arrays, names = [], []
    for i, row in enumerate(ds.select_columns([img_col])):
        value = row[img_col]
        try:
            arrays.append(pil_to_array(_to_pil(value, i, name_or_path), resolution, channels))
        except OSError as e:
            raise DataError(f"cannot read image of row {i} of dataset {name_or_path!r}: {e}") from e
        names.append(f"row {i}")
    images = stack_images(arrays, names, as_uint8)
    labels: torch.Tensor | list[str] | None = None
    classes: list[str] = []
    if lab_col is not None:
        feat = ds.features.get(lab_col)
        values = ds[lab_col]
        if isinstance(feat, datasets.ClassLabel):
            classes = list(feat.names)
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
            labels = torch.tensor([int(v) for v in values], dtype=torch.long)
        elif all(isinstance(v, str) for v in values):
            labels = list(values)
        else:
            kinds = sorted({type(v).__name__ for v in values})
            raise DataError(
                f"label column {lab_col!r} of dataset {name_or_path!r} must hold ints (class ids) or "
                f"strings (captions); found {', '.join(kinds)}"
            )
    return ImageData(images, labels, classes)
