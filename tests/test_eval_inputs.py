"""Evaluation inputs: folders, .npz files, dataset names, and their error messages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from stepdistill.eval.errors import EvalInputError
from stepdistill.eval.fid import FeatureStats
from stepdistill.eval.generate import save_images
from stepdistill.eval.inputs import (
    classify_source,
    images_from_array,
    list_image_files,
    load_dataset_images,
    load_image_folder,
    load_npz,
)


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_folder_recursive_sorted_and_labels(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 1, 8, 8), dtype=np.uint8)
    save_images(tmp_path / "gen", imgs, labels=[3, 1, 4, 1, 5])
    _png(tmp_path / "gen" / "sub" / "zzz_class9.png", np.full((8, 8), 7, np.uint8))
    (tmp_path / "gen" / "notes.txt").write_text("ignored")
    x, y, files = load_image_folder(tmp_path / "gen")
    assert x.dtype == torch.uint8 and x.shape == (6, 1, 8, 8)
    assert [f.name for f in files][:2] == ["000000_class3.png", "000001_class1.png"]
    assert files[-1].name == "zzz_class9.png"
    np.testing.assert_array_equal(x[:5].numpy(), imgs)  # PNG is lossless
    assert y.tolist() == [3, 1, 4, 1, 5, 9]
    x2, _, _ = load_image_folder(tmp_path / "gen", num_images=2)
    assert x2.shape[0] == 2
    with pytest.raises(EvalInputError, match="only 6"):
        load_image_folder(tmp_path / "gen", num_images=7)


def test_integer_class_folders(tmp_path):
    for c in (0, 2):
        _png(tmp_path / str(c) / "a.png", np.zeros((4, 4, 3), np.uint8))
    x, y, _ = load_image_folder(tmp_path)
    assert x.shape == (2, 3, 4, 4) and y.tolist() == [0, 2]


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(EvalInputError, match=r"empty: folder contains no images"):
        load_image_folder(tmp_path / "empty")


def test_unreadable_file_named(tmp_path):
    _png(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "b.png").write_bytes(b"not a png at all")
    with pytest.raises(EvalInputError, match=r"b\.png: unreadable image file") as e:
        load_image_folder(tmp_path)
    assert "re-save" in str(e.value)


def test_mixed_sizes_names_both_files(tmp_path):
    _png(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    _png(tmp_path / "b.png", np.zeros((8, 8), np.uint8))
    _png(tmp_path / "c.png", np.zeros((10, 12), np.uint8))
    with pytest.raises(EvalInputError) as e:
        load_image_folder(tmp_path)
    msg = str(e.value)
    assert "a.png is 8x8" in msg and "c.png is 12x10" in msg and "different sizes" in msg


def test_mixed_grey_and_rgb_become_rgb(tmp_path):
    _png(tmp_path / "a.png", np.full((4, 4), 10, np.uint8))
    _png(tmp_path / "b.png", np.full((4, 4, 3), 20, np.uint8))
    x, _, _ = load_image_folder(tmp_path)
    assert x.shape == (2, 3, 4, 4) and x[0].unique().tolist() == [10]


def test_rgba_opaque_ok_transparent_error(tmp_path):
    a = np.full((4, 4, 4), 255, np.uint8)
    a[..., 0] = 5
    _png(tmp_path / "ok" / "a.png", a)
    x, _, _ = load_image_folder(tmp_path / "ok")
    assert x.shape == (1, 3, 4, 4)
    a[0, 0, 3] = 0
    _png(tmp_path / "bad" / "t.png", a)
    with pytest.raises(EvalInputError, match=r"t\.png: image has transparency"):
        load_image_folder(tmp_path / "bad")


def test_jpg_bmp_webp_are_found(tmp_path):
    for ext in ("jpg", "jpeg", "bmp", "webp", "PNG"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / f"x.{ext}", format={
            "jpg": "JPEG", "jpeg": "JPEG", "bmp": "BMP", "webp": "WEBP", "PNG": "PNG"}[ext])
    assert len(list_image_files(tmp_path)) == 5


def test_npz_images_layouts(tmp_path):
    rng = np.random.default_rng(1)
    nchw = rng.integers(0, 256, (4, 3, 6, 6), dtype=np.uint8)
    np.savez(tmp_path / "nhwc.npz", images=nchw.transpose(0, 2, 3, 1), labels=np.arange(4))
    np.savez(tmp_path / "nchw.npz", images=nchw)
    x1, y1 = load_npz(tmp_path / "nhwc.npz")
    x2, y2 = load_npz(tmp_path / "nchw.npz")
    np.testing.assert_array_equal(x1.numpy(), nchw)
    np.testing.assert_array_equal(x2.numpy(), nchw)
    assert y1.tolist() == [0, 1, 2, 3] and y2 is None
    assert images_from_array(np.zeros((2, 5, 5), np.uint8)).shape == (2, 1, 5, 5)
    np.savez(tmp_path / "float.npz", images=np.zeros((2, 8, 8, 1), np.float32))
    with pytest.raises(EvalInputError, match=r"must be uint8.*round"):
        load_npz(tmp_path / "float.npz")


def test_npz_stats_and_classification(tmp_path):
    st = FeatureStats.from_features(np.random.default_rng(0).standard_normal((10, 3)))
    st.save(tmp_path / "s.npz")
    assert isinstance(load_npz(tmp_path / "s.npz"), FeatureStats)
    assert classify_source(tmp_path / "s.npz").kind == "stats-npz"
    assert classify_source("digits-a").kind == "dataset"
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    assert classify_source(tmp_path / "pipe").kind == "pipeline"
    assert classify_source(tmp_path).kind == "folder"
    np.savez(tmp_path / "other.npz", foo=np.zeros(3))
    with pytest.raises(EvalInputError, match="expected 'images'"):
        classify_source(tmp_path / "other.npz")
    with pytest.raises(EvalInputError, match="no such file, folder or dataset"):
        classify_source(tmp_path / "missing")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(EvalInputError, match="unsupported file type"):
        classify_source(tmp_path / "x.txt")


def test_datasets():
    x, y = load_dataset_images("digits-a")
    xb, _ = load_dataset_images("digits-b")
    xt, _ = load_dataset_images("digits")
    assert x.dtype == torch.uint8 and x.shape[1:] == (1, 8, 8)
    assert xt.shape[0] == 1797 and 880 <= x.shape[0] <= 900 and x.shape[0] == xb.shape[0]
    assert set(x.unique().tolist()) <= {round((v / 16) * 255) for v in range(17)}
    assert torch.bincount(y).min() >= 85
    with pytest.raises(EvalInputError, match="unknown dataset"):
        load_dataset_images("mnist")
    with pytest.raises(EvalInputError, match="lower --num-images"):
        load_dataset_images("digits-a", 5000)


def test_truncated_file_named_and_chunked_reading(tmp_path):
    from stepdistill.eval.inputs import iter_image_folder

    rng = np.random.default_rng(2)
    imgs = rng.integers(0, 256, (7, 3, 16, 16), dtype=np.uint8)
    save_images(tmp_path / "ok", imgs)
    chunks = list(iter_image_folder(tmp_path / "ok", chunk=3))
    assert [c[0].shape[0] for c in chunks] == [3, 3, 1]
    np.testing.assert_array_equal(torch.cat([c[0] for c in chunks]).numpy(), imgs)
    data = (tmp_path / "ok" / "000003.png").read_bytes()
    (tmp_path / "ok" / "000003.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(EvalInputError, match=r"000003\.png: unreadable image file"):
        load_image_folder(tmp_path / "ok")
