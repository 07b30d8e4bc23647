"""Evaluation inputs: image folders, ``.npz`` files (images or statistics), dataset names and
diffusers pipeline folders.  All images come out as **uint8 NCHW** torch tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import EvalInputError

__all__ = [
    "IMAGE_EXTENSIONS",
    "DATASETS",
    "SourceInfo",
    "classify_source",
    "list_image_files",
    "folder_fingerprint",
    "load_image_folder",
    "iter_image_folder",
    "scan_image_folder",
    "FolderScan",
    "load_npz",
    "load_dataset_images",
    "images_from_array",
    "label_from_filename",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
#: dataset name -> split of :func:`stepdistill.data.digits.load_digits`
DATASETS = {"digits": "train", "digits-a": "a", "digits-b": "b"}


@dataclass
class SourceInfo:
    """What a source string refers to.  ``kind`` is one of ``dataset``, ``folder``, ``pipeline``,
    ``images-npz``, ``stats-npz``."""

    kind: str
    value: str

    def describe(self) -> dict[str, Any]:
        return {"type": self.kind, "value": self.value}


def classify_source(src: str | os.PathLike) -> SourceInfo:
    """Tell what ``src`` is: dataset name, pipeline folder (has ``model_index.json``), image folder,
    or ``.npz`` (images under ``"images"``, or statistics ``mu``/``sigma``)."""
    s = os.fspath(src)
    if s in DATASETS:
        return SourceInfo("dataset", s)
    p = Path(s).expanduser()
    if p.is_dir():
        if (p / "model_index.json").is_file():
            return SourceInfo("pipeline", str(p))
        return SourceInfo("folder", str(p))
    if p.is_file():
        if p.suffix.lower() != ".npz":
            raise EvalInputError(
                f"{p}: unsupported file type; pass an image folder, a .npz (images or mu/sigma), a pipeline "
                f"folder or a dataset name ({', '.join(DATASETS)})"
            )
        try:
            with np.load(p, allow_pickle=False) as z:
                keys = set(z.files)
        except (OSError, ValueError) as e:
            raise EvalInputError(f"{p}: cannot read .npz ({e})") from e
        if "images" in keys:
            return SourceInfo("images-npz", str(p))
        if {"mu", "sigma"} <= keys:
            return SourceInfo("stats-npz", str(p))
        raise EvalInputError(
            f"{p}: .npz has keys {sorted(keys)}; expected 'images' (uint8 NHWC/NCHW) or 'mu' and 'sigma'"
        )
    raise EvalInputError(
        f"{s}: no such file, folder or dataset; pass an image folder, a .npz, a diffusers pipeline folder "
        f"(with model_index.json) or one of the dataset names {', '.join(DATASETS)}"
    )


# ---------------------------------------------------------------------------------------------- folders
def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted by relative path."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise EvalInputError(f"{root}: not a folder")
    files = [
        p for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith(".")
    ]
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    return files


def folder_fingerprint(folder: str | os.PathLike, files: list[Path] | None = None) -> str:
    """sha256 over (relative path, size, mtime_ns) of the folder's image files."""
    root = Path(folder).expanduser()
    files = list_image_files(root) if files is None else files
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(json.dumps([p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns]).encode())
        h.update(b"\n")
    return h.hexdigest()


_LABEL_RE = re.compile(r"(?:^|[_\-.])(?:class|label)[_\-]?(\d+)$")


def label_from_filename(path: Path, root: Path | None = None) -> int | None:
    """Class label encoded in a file name: ``*_class<k>.png`` / ``*_label<k>.png`` (as written by
    :func:`stepdistill.eval.generate.save_images`), or an integer parent folder (``<k>/x.png``)."""
    m = _LABEL_RE.search(path.stem)
    if m:
        return int(m.group(1))
    parent = path.parent
    if (root is None or parent != root) and parent.name.isdigit():
        return int(parent.name)
    return None


_GREY_MODES = ("1", "L", "LA")
_HIGH_DEPTH = ("I;16", "I;16B", "I;16L", "I", "F")


def _unreadable(path: Path, e: Exception) -> EvalInputError:
    return EvalInputError(f"{path}: unreadable image file ({e}); delete or re-save it")


def _scan(path: Path) -> tuple[tuple[int, int], int]:
    """(size (w, h), channels 1|3) from the header only (no decoding)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            size, mode = im.size, im.mode
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise _unreadable(path, e) from e
    if mode in _HIGH_DEPTH:
        raise EvalInputError(f"{path}: {mode} (high bit depth) images are not supported; save 8-bit grey or RGB")
    return size, 1 if mode in _GREY_MODES else 3


def _read_image(path: Path, channels: int) -> np.ndarray:
    """Decode to uint8 HxW (channels=1) or HxWx3; transparent pixels are an error."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if "A" in im.getbands() or (im.mode == "P" and "transparency" in im.info):
                alpha = np.asarray(im.convert("RGBA"))[..., 3] if im.mode != "LA" else np.asarray(im)[..., 1]
                if (alpha != 255).any():
                    raise EvalInputError(
                        f"{path}: image has transparency (mode {im.mode}); FID needs opaque images: "
                        "flatten them onto a background first"
                    )
            arr = np.asarray(im.convert("L" if channels == 1 else "RGB"))
    except EvalInputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise _unreadable(path, e) from e
    return arr


@dataclass
class FolderScan:
    """Result of scanning a folder's headers: files (sorted), common size (w, h), channels (3 when any
    file is colour: grey files are repeated to RGB, which is lossless)."""

    root: Path
    files: list[Path]
    size: tuple[int, int]
    channels: int


def scan_image_folder(folder: str | os.PathLike, num_images: int | None = None) -> FolderScan:
    """Check a folder before decoding it: not empty, enough images, readable headers, one size."""
    root = Path(folder).expanduser()
    files = list_image_files(root)
    if not files:
        raise EvalInputError(
            f"{root}: folder contains no images ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}, searched recursively)"
        )
    if num_images is not None:
        if num_images > len(files):
            raise EvalInputError(
                f"{root}: {num_images} images requested but the folder has only {len(files)}; lower --num-images"
            )
        files = files[:num_images]
    first: tuple[Path, tuple[int, int]] | None = None
    channels = 1
    for p in files:
        size, c = _scan(p)
        channels = max(channels, c)
        if first is None:
            first = (p, size)
        elif size != first[1]:
            raise EvalInputError(
                f"{root}: images have different sizes: {first[0]} is {first[1][0]}x{first[1][1]} "
                f"but {p} is {size[0]}x{size[1]}; resize them to one size first"
            )
    assert first is not None
    return FolderScan(root, files, first[1], channels)


def iter_image_folder(
    folder: str | os.PathLike, num_images: int | None = None, chunk: int = 256, progress: bool = False,
    scan: FolderScan | None = None,
):
    """Yield ``(uint8 NCHW chunk, labels chunk or None)`` without holding the whole folder in memory."""
    sc = scan or scan_image_folder(folder, num_images)
    labels = [label_from_filename(p, sc.root) for p in sc.files]
    labelled = all(v is not None for v in labels)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(sc.files), desc=f"read {sc.root.name}", leave=False, unit="img")
    try:
        for i in range(0, len(sc.files), chunk):
            arrs = [_read_image(p, sc.channels) for p in sc.files[i : i + chunk]]
            x = np.stack(arrs)
            x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
            lab = torch.tensor(labels[i : i + chunk], dtype=torch.long) if labelled else None
            if bar is not None:
                bar.update(len(arrs))
            yield torch.from_numpy(np.ascontiguousarray(x)), lab
    finally:
        if bar is not None:
            bar.close()


def load_image_folder(
    folder: str | os.PathLike, num_images: int | None = None, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, list[Path]]:
    """Read the (first ``num_images``, in sorted order) images of ``folder``.

    Returns ``(images uint8 NCHW, labels or None, files)``.  Grey images are converted to RGB when the
    folder mixes grey and RGB.  Labels are parsed from file names (see :func:`label_from_filename`);
    they are ``None`` unless every file carries one.
    """
    sc = scan_image_folder(folder, num_images)
    parts = list(iter_image_folder(folder, num_images, progress=progress, scan=sc))
    x = torch.cat([p[0] for p in parts])
    lab = None if parts[0][1] is None else torch.cat([p[1] for p in parts])
    return x, lab, sc.files


# -------------------------------------------------------------------------------------------------- npz
def images_from_array(arr: Any, what: str = "images") -> torch.Tensor:
    """uint8 array NHWC / NCHW / NHW -> uint8 NCHW tensor (layout inferred from the channel axis)."""
    if isinstance(arr, torch.Tensor):
        arr = arr.cpu().numpy()
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        raise EvalInputError(
            f"{what}: images must be uint8 (0..255), got {arr.dtype}; quantise with rounding, e.g. "
            "(x * 255).round().clip(0, 255).astype(np.uint8)"
        )
    if arr.ndim == 3:
        return torch.from_numpy(np.ascontiguousarray(arr[:, None]))
    if arr.ndim != 4:
        raise EvalInputError(f"{what}: expected images of shape NHWC or NCHW, got {arr.shape}")
    ch = (1, 3, 4)
    first, last = arr.shape[1] in ch, arr.shape[-1] in ch
    if first and last:  # e.g. 3x3 images; use the square spatial axes to decide
        first = arr.shape[2] == arr.shape[3]
        last = not first and arr.shape[1] == arr.shape[2]
    if last and not first:
        arr = arr.transpose(0, 3, 1, 2)
    elif not first:
        raise EvalInputError(
            f"{what}: cannot tell the channel axis of shape {arr.shape}; store NHWC or NCHW with 1 or 3 channels"
        )
    if arr.shape[1] == 4:
        if (arr[:, 3] != 255).any():
            raise EvalInputError(f"{what}: RGBA images with transparency; store opaque RGB images")
        arr = arr[:, :3]
    return torch.from_numpy(np.ascontiguousarray(arr))


def load_npz(path: str | os.PathLike):
    """``.npz`` with ``images`` (and optionally ``labels``) -> ``(images, labels|None)``;
    with ``mu``/``sigma`` -> :class:`~stepdistill.eval.fid.FeatureStats`."""
    from .fid import FeatureStats

    p = Path(path).expanduser()
    info = classify_source(p)
    if info.kind == "stats-npz":
        return FeatureStats.load(p)
    if info.kind != "images-npz":
        raise EvalInputError(f"{p}: not an .npz file")
    with np.load(p, allow_pickle=False) as z:
        images = images_from_array(z["images"], what=str(p))
        labels = torch.from_numpy(z["labels"].astype(np.int64)) if "labels" in z.files else None
    if labels is not None and labels.shape[0] != images.shape[0]:
        raise EvalInputError(f"{p}: {labels.shape[0]} labels for {images.shape[0]} images")
    return images, labels


# ---------------------------------------------------------------------------------------------- datasets
def load_dataset_images(name: str, num_images: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dataset name (``digits``, ``digits-a``, ``digits-b``) -> ``(uint8 NCHW images, labels)``;
    the first ``num_images`` images in dataset order."""
    if name not in DATASETS:
        raise EvalInputError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    from stepdistill.data.digits import load_digits, to_uint8

    x, y = load_digits(DATASETS[name])
    if num_images is not None:
        if num_images > x.shape[0]:
            raise EvalInputError(
                f"dataset {name} has {x.shape[0]} images but {num_images} were requested; lower --num-images"
            )
        x, y = x[:num_images], y[:num_images]
    return to_uint8(x), y
