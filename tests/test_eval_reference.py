"""Reference statistics cache: reuse, invalidation, and FID sanity on real data."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from stepdistill.eval import reference as R
from stepdistill.eval.detectors import DigitsDetector, train_digits_detector
from stepdistill.eval.errors import EvalInputError
from stepdistill.eval.inputs import load_dataset_images
from stepdistill.eval.metrics import compute_fid, compute_stats
from stepdistill.eval.testing import tiny_digits_detector_dir


@pytest.fixture(scope="module")
def det():
    return DigitsDetector.load(tiny_digits_detector_dir())


@pytest.fixture
def counter(monkeypatch):
    calls = []
    real = R._compute_stats

    def counted(source, detector, n, progress=True):
        calls.append((source, detector.weights_sha256, n))
        return real(source, detector, n, progress=progress)

    monkeypatch.setattr(R, "_compute_stats", counted)
    return calls


def test_cache_reuse_and_invalidation(tmp_path, det, counter):
    a = R.reference_stats("digits-a", det, cache_dir=tmp_path, progress=False)
    b = R.reference_stats("digits-a", det, cache_dir=tmp_path, progress=False)
    assert len(counter) == 1 and b.metadata["cache_hit"] is True and a.metadata["cache_hit"] is False
    np.testing.assert_array_equal(a.mu, b.mu)
    np.testing.assert_array_equal(a.sigma, b.sigma)
    assert a.n == b.n == load_dataset_images("digits-a")[0].shape[0]
    # the sidecar JSON holds the key
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".npz")
    meta = json.loads((tmp_path / files[0]).read_text())
    assert meta["key"]["detector"]["weights_sha256"] == det.weights_sha256
    assert meta["key"]["source"] == {"type": "dataset", "name": "digits-a", "split": "a"}
    # explicit N equal to "all" shares the entry; another N recomputes
    R.reference_stats("digits-a", det, num_images=a.n, cache_dir=tmp_path, progress=False)
    assert len(counter) == 1
    c = R.reference_stats("digits-a", det, num_images=500, cache_dir=tmp_path, progress=False)
    assert len(counter) == 2 and c.n == 500
    # other dataset -> recompute
    R.reference_stats("digits-b", det, cache_dir=tmp_path, progress=False)
    assert len(counter) == 3
    # other detector weights -> recompute
    other = DigitsDetector.load(train_digits_detector(tmp_path / "det2", steps=3, seed=7)["path"])
    assert other.weights_sha256 != det.weights_sha256
    d = R.reference_stats("digits-a", other, cache_dir=tmp_path, progress=False)
    assert len(counter) == 4 and not np.allclose(d.mu, a.mu)
    R.reference_stats("digits-a", other, cache_dir=tmp_path, progress=False)
    assert len(counter) == 4
    # recompute=True and use_cache=False bypass the cache
    R.reference_stats("digits-a", det, cache_dir=tmp_path, recompute=True, progress=False)
    R.reference_stats("digits-a", det, cache_dir=tmp_path, use_cache=False, progress=False)
    assert len(counter) == 6


def test_preprocessing_change_invalidates(tmp_path, det, counter):
    class Other(DigitsDetector):
        def preprocessing(self):
            return {**super().preprocessing(), "resize": "nearest"}

    R.reference_stats("digits-b", det, cache_dir=tmp_path, progress=False)
    R.reference_stats("digits-b", Other(det.net, det.weights_sha256), cache_dir=tmp_path, progress=False)
    assert len(counter) == 2


def test_corrupted_cache_file_is_recomputed(tmp_path, det, counter):
    R.reference_stats("digits-b", det, cache_dir=tmp_path, progress=False)
    npz = next(tmp_path.glob("*.npz"))
    npz.write_bytes(b"broken")
    st = R.reference_stats("digits-b", det, cache_dir=tmp_path, progress=False)
    assert len(counter) == 2 and st.n > 800


def test_folder_reference_invalidated_when_files_change(tmp_path, det, counter):
    x, _ = load_dataset_images("digits-a", 80)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(x.numpy()):
        Image.fromarray(im[0]).save(folder / f"{i:03d}.png")
    cache = tmp_path / "cache"
    s1 = R.reference_stats(str(folder), det, cache_dir=cache, progress=False)
    R.reference_stats(str(folder), det, cache_dir=cache, progress=False)
    assert len(counter) == 1
    # same images from a folder and from the tensor give the same statistics
    s_arr = compute_stats(x, det)
    np.testing.assert_allclose(s1.mu, s_arr.mu, atol=1e-12)
    # a changed file -> new fingerprint -> recompute
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "005.png")
    os.utime(folder / "005.png", ns=(1, 1))
    s2 = R.reference_stats(str(folder), det, cache_dir=cache, progress=False)
    assert len(counter) == 2 and not np.allclose(s2.mu, s1.mu)
    with pytest.raises(EvalInputError, match="only 80"):
        R.reference_stats(str(folder), det, num_images=81, cache_dir=cache, progress=False)


def test_fid_sanity_on_digits(tmp_path, det):
    same = compute_fid("digits-a", "digits-a", det, cache_dir=tmp_path, progress=False)
    floor = compute_fid("digits-a", "digits-b", det, cache_dir=tmp_path, progress=False)
    x, _ = load_dataset_images("digits-a")
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, x.shape, dtype=torch.uint8, generator=g)
    far = compute_fid(noise, "digits-b", det, cache_dir=tmp_path, progress=False)
    assert abs(same.fid) < 1e-6
    assert 0 < floor.fid < far.fid / 20, (floor.fid, far.fid)
    assert floor.metric == f"FID-digits-N{x.shape[0]}" and floor.n_b == load_dataset_images("digits-b")[0].shape[0]
    # FID(x, x) for arrays too, and the stats file path
    assert abs(compute_fid(x, x, det).fid) < 1e-6
    st = compute_stats("digits-b", det, cache_dir=tmp_path)
    p = tmp_path / "b.npz"
    st.save(p)
    assert compute_fid("digits-a", str(p), det, cache_dir=tmp_path, progress=False).fid == pytest.approx(floor.fid)


def test_stats_from_another_detector_rejected(tmp_path, det):
    other = DigitsDetector.load(train_digits_detector(tmp_path / "o", steps=2, seed=3)["path"])
    st = compute_stats("digits-b", other, cache_dir=tmp_path)
    st.save(tmp_path / "o.npz")
    with pytest.raises(EvalInputError, match="recompute them"):
        compute_fid("digits-a", str(tmp_path / "o.npz"), det, cache_dir=tmp_path, progress=False)
    # foreign stats (no metadata) with the wrong dimension
    np.savez(tmp_path / "f.npz", mu=np.zeros(5), sigma=np.eye(5))
    with pytest.raises(EvalInputError, match="5-d features"):
        compute_fid("digits-a", str(tmp_path / "f.npz"), det, cache_dir=tmp_path, progress=False)


def test_too_few_images_for_fid(det):
    x, _ = load_dataset_images("digits-a", 1)
    with pytest.raises(EvalInputError, match="too few to estimate a covariance"):
        compute_fid(x, "digits-a", det, cache=False)
