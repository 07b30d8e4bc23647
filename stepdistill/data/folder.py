"""Image folders (torchvision ``ImageFolder`` layout) loaded into memory as tensors.

Layout: either all images directly in ``root`` (no labels), or one sub-folder per class
(``root/<class>/**/<image>``; classes sorted by name -> labels 0..K-1).  Sub-folders are searched
recursively.  Extensions: png, jpg, jpeg, bmp, webp (case-insensitive).  Hidden files and folders
(names starting with ".") are skipped; any other file that is not a readable image is an error
naming the file -- nothing is skipped silently.

Each image is converted to ``channels`` (1 = grey, 3 = RGB; transparency is composited onto white),
resized so that its shorter side is ``resolution`` (bicubic, antialiased) and centre-cropped to a
square.  Without ``resolution`` all images must already have the same size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError, DataNotFoundError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageData",
    "load_image_folder",
    "list_image_files",
    "pil_to_array",
    "stack_images",
]


class ImageData(NamedTuple):
    images: Tensor  # (N, C, H, W): float32 in [-1, 1], or uint8 in [0, 255] with as_uint8=True
    labels: Tensor | list[str] | None  # (N,) int64 class ids, N captions, or None
    classes: list[str]  # class names of label ids ([] without labels)


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _walk_files(folder: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        for f in sorted(filenames):
            if not _hidden(f):
                out.append(Path(dirpath) / f)
    return out


def _check_extension(path: Path) -> None:
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise DataError(
            f"{path} is not an image file (allowed extensions: {', '.join(IMAGE_EXTENSIONS)}); "
            "remove it from the dataset folder"
        )


def list_image_files(root: str | Path, labels: bool = True) -> tuple[list[Path], list[int] | None, list[str]]:
    """Files, their class ids (None without class folders) and the class names."""
    root = Path(root)
    if not root.is_dir():
        raise DataNotFoundError(f"image folder {root} does not exist or is not a folder")
    entries = sorted(p for p in root.iterdir() if not _hidden(p.name))
    subdirs = [p for p in entries if p.is_dir()]
    top_files = [p for p in entries if not p.is_dir()]
    if not labels or not subdirs:
        files = _walk_files(root)
        for f in files:
            _check_extension(f)
        if not files:
            raise DataError(f"image folder {root} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
        return files, None, []
    if top_files:
        raise DataError(
            f"image folder {root} mixes files ({top_files[0].name}, ...) with class sub-folders "
            f"({subdirs[0].name}, ...); put every image in a class folder, or none"
        )
    files, ids, classes = [], [], []
    for k, d in enumerate(subdirs):
        found = _walk_files(d)
        for f in found:
            _check_extension(f)
        if not found:
            raise DataError(f"class folder {d} contains no images")
        classes.append(d.name)
        files.extend(found)
        ids.extend([k] * len(found))
    return files, ids, classes


def pil_to_array(img, resolution: int | None, channels: int) -> np.ndarray:
    """PIL image -> uint8 array (H, W, C) with the module's conversion, resize and centre crop."""
    from PIL import Image

    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    img = img.convert("L" if channels == 1 else "RGB")
    if resolution is not None:
        if resolution < 1:
            raise DataError(f"resolution must be >= 1, got {resolution}")
        w, h = img.size
        if (w, h) != (resolution, resolution):
            scale = resolution / min(w, h)
            nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
            img = img.resize((nw, nh), Image.Resampling.BICUBIC)
            left, top = (nw - resolution) // 2, (nh - resolution) // 2
            img = img.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


def _open_image(path: Path, resolution: int | None, channels: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return pil_to_array(img, resolution, channels)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read image {path}: {e}") from e


def stack_images(arrays: list[np.ndarray], names: list, as_uint8: bool) -> Tensor:
    """(H, W, C) uint8 arrays -> (N, C, H, W) tensor; a size mismatch names the offending image."""
    if not arrays:
        raise DataError("no images to stack")
    shape = arrays[0].shape
    for a, name in zip(arrays, names):
        if a.shape != shape:
            raise DataError(
                f"image {name} has size {a.shape[1]}x{a.shape[0]} but {names[0]} has {shape[1]}x{shape[0]}; "
                "pass a resolution (train.dataset_params.resolution) to resize and centre-crop them"
            )
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    if as_uint8:
        return x
    return x.float() / 127.5 - 1.0


def load_image_folder(
    root: str | Path,
    resolution: int | None = None,
    channels: int = 3,
    labels: bool = True,
    as_uint8: bool = False,
) -> ImageData:
    """Load every image under ``root`` (see module docstring) into one tensor.

    Args:
        resolution: square output size (shorter side resized, centre crop); None keeps sizes,
            which must then all agree.
        channels: 1 (grey) or 3 (RGB).
        labels: use class sub-folders as labels (ImageFolder); False ignores the folder structure.
        as_uint8: return uint8 in [0, 255] instead of float32 in [-1, 1].
    """
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}")
    files, ids, classes = list_image_files(root, labels=labels)
    arrays = [_open_image(f, resolution, channels) for f in files]
    images = stack_images(arrays, files, as_uint8)
    label_tensor = torch.tensor(ids, dtype=torch.long) if ids is not None else None
    return ImageData(images, label_tensor, classes)
