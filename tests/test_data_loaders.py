"""Image-folder and Hugging Face dataset loaders (stepdistill.data.folder / .hf), offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from stepdistill.data.folder import load_image_folder


def _png(path, color, size=(16, 12), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[:] = color
    img = Image.fromarray(arr)
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path)
    return path


def _class_folder(root):
    _png(root / "cat" / "a.png", (255, 0, 0))
    _png(root / "cat" / "nested" / "deeper" / "b.jpg", (250, 0, 0))
    _png(root / "dog" / "c.bmp", (0, 0, 255))
    _png(root / "dog" / "d.webp", (0, 0, 250))
    (root / "dog" / ".DS_Store").write_bytes(b"\0junk")  # hidden: skipped
    return root


def test_image_folder_classes_resize_and_range(tmp_path):
    data = load_image_folder(_class_folder(tmp_path / "d"), resolution=8, channels=3)
    assert data.classes == ["cat", "dog"]
    assert data.labels.tolist() == [0, 0, 1, 1]
    assert data.images.shape == (4, 3, 8, 8) and data.images.dtype == torch.float32
    assert data.images.min() >= -1 and data.images.max() <= 1
    red = data.images[0, :, 4, 4]
    assert red[0] == pytest.approx(1.0) and red[2] == pytest.approx(-1.0)
    grey = load_image_folder(tmp_path / "d", resolution=6, channels=1, as_uint8=True)
    assert grey.images.shape == (4, 1, 6, 6) and grey.images.dtype == torch.uint8
    flat = load_image_folder(tmp_path / "d", resolution=6, labels=False)
    assert flat.labels is None and flat.classes == [] and flat.images.shape[0] == 4


def test_image_folder_center_crop(tmp_path):
    arr = np.zeros((10, 30, 3), np.uint8)
    arr[:, 10:20] = 255  # white centre third of a wide image
    Image.fromarray(arr).save(tmp_path / "wide.png")
    Image.fromarray(np.zeros((4, 4, 4), np.uint8)).save(tmp_path / "transparent.png")  # RGBA, alpha 0
    data = load_image_folder(tmp_path, resolution=10)  # files sorted: transparent.png, wide.png
    assert data.labels is None and data.images.shape == (2, 3, 10, 10)
    assert torch.allclose(data.images[0], torch.ones(3, 10, 10))  # alpha composited onto white
    assert torch.allclose(data.images[1], torch.ones(3, 10, 10))  # centre crop keeps only the white middle
    squashed = load_image_folder(tmp_path, resolution=5).images[1]  # downscale, then crop the middle
    assert squashed[:, :, 1:4].min() > 0.9


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="contains no images"):
        load_image_folder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="missing"):
        load_image_folder(tmp_path / "missing")

    bad = _class_folder(tmp_path / "txt")
    (bad / "dog" / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.txt is not an image"):
        load_image_folder(bad, resolution=8)

    corrupt = _class_folder(tmp_path / "corrupt")
    (corrupt / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        load_image_folder(corrupt, resolution=8)

    mixed = _class_folder(tmp_path / "mixed")
    _png(mixed / "loose.png", (0, 255, 0))
    with pytest.raises(ValueError, match="mixes files"):
        load_image_folder(mixed, resolution=8)

    sizes = tmp_path / "sizes"
    _png(sizes / "a.png", (0, 0, 0), size=(8, 8))
    _png(sizes / "b.png", (0, 0, 0), size=(9, 8))
    with pytest.raises(ValueError, match=r"b\.png.*resolution"):
        load_image_folder(sizes)
    assert load_image_folder(sizes, resolution=8).images.shape == (2, 3, 8, 8)

    (tmp_path / "emptyclass" / "a").mkdir(parents=True)
    _png(tmp_path / "emptyclass" / "b" / "x.png", (0, 0, 0))
    with pytest.raises(ValueError, match="class folder .*a contains no images"):
        load_image_folder(tmp_path / "emptyclass")


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets (local only)

datasets = pytest.importorskip("datasets")


def _hf_dataset(n=6, caption=False):
    imgs = [Image.fromarray(np.full((10, 10, 3), 40 * i, np.uint8)) for i in range(n)]
    cols = {"image": imgs, "label": [i % 3 for i in range(n)]}
    feats = {"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y", "z"])}
    if caption:
        cols["text"] = [f"caption {i}" for i in range(n)]
        feats["text"] = datasets.Value("string")
    return datasets.Dataset.from_dict(cols, features=datasets.Features(feats))


def test_hf_load_from_disk(tmp_path):
    from stepdistill.data.hf import load_hf_images

    _hf_dataset(caption=True).save_to_disk(str(tmp_path / "ds"))
    data = load_hf_images(str(tmp_path / "ds"), resolution=8, channels=1)
    assert data.images.shape == (6, 1, 8, 8) and data.labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert data.classes == ["x", "y", "z"]
    grey = data.images[:, 0, 4, 4]
    assert torch.allclose(grey, torch.tensor([40.0 * i for i in range(6)]) / 127.5 - 1, atol=1e-6)
    caps = load_hf_images(str(tmp_path / "ds"), label_column="text", as_uint8=True)
    assert caps.labels == [f"caption {i}" for i in range(6)] and caps.images.dtype == torch.uint8
    assert load_hf_images(str(tmp_path / "ds"), label_column=None).labels is None
    with pytest.raises(ValueError, match="no label column 'klass'.*image, label, text"):
        load_hf_images(str(tmp_path / "ds"), label_column="klass")
    with pytest.raises(ValueError, match="no image column 'pixels'"):
        load_hf_images(str(tmp_path / "ds"), image_column="pixels")


def test_hf_dataset_dict_splits_and_build_source(tmp_path):
    from stepdistill.config import TrainConfig
    from stepdistill.data.hf import load_hf_images
    from stepdistill.data.sources import TensorSource, build_source

    datasets.DatasetDict({"train": _hf_dataset(6), "test": _hf_dataset(3)}).save_to_disk(str(tmp_path / "dd"))
    assert load_hf_images(str(tmp_path / "dd"), split="test").images.shape == (3, 3, 10, 10)
    with pytest.raises(ValueError, match="no split 'validation'; splits: train, test"):
        load_hf_images(str(tmp_path / "dd"), split="validation")
    cfg = TrainConfig(dataset=f"hf:{tmp_path / 'dd'}", dataset_params={"resolution": 4, "channels": 1})
    src = build_source(cfg, None, needs_data=True)
    assert isinstance(src, TensorSource) and src.images.shape == (6, 1, 4, 4)
    b = src.batch(0, 0, 1, 6)
    assert sorted(b["raw_cond"].tolist()) == [0, 0, 1, 1, 2, 2]


def test_hf_errors(tmp_path):
    from stepdistill.data.hf import load_hf_images

    no_img = datasets.Dataset.from_dict({"x": [1, 2]})
    no_img.save_to_disk(str(tmp_path / "noimg"))
    with pytest.raises(ValueError, match="no image column"):
        load_hf_images(str(tmp_path / "noimg"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        load_hf_images(str(tmp_path / "file.txt"))
    with pytest.raises(ValueError, match="empty"):
        load_hf_images("")


def test_hf_imagefolder(tmp_path):
    from stepdistill.data.hf import load_hf_images

    for name, color in (("cat/a.png", 255), ("cat/b.png", 250), ("dog/c.png", 0), ("dog/d.png", 5)):
        _png(tmp_path / "imgs" / name, (color, 0, 0))  # datasets infers labels from same-depth folders
    data = load_hf_images(str(tmp_path / "imgs"), resolution=8, cache_dir=str(tmp_path / "cache"))
    assert data.images.shape == (4, 3, 8, 8)
    assert sorted(data.labels.tolist()) == [0, 0, 1, 1] and data.classes == ["cat", "dog"]
