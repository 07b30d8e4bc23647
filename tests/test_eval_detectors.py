"""Detectors: the package's digits classifier, the torchmetrics-compatible Inception, clean-fid."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from stepdistill.eval import detectors as D
from stepdistill.eval.detectors import DigitsDetector, get_detector, sha256_file, train_digits_detector
from stepdistill.eval.errors import EvalInputError
from stepdistill.eval.inputs import load_dataset_images
from stepdistill.eval.testing import tiny_digits_detector_dir


@pytest.fixture(scope="module")
def det_dir():
    return tiny_digits_detector_dir()


@pytest.fixture(scope="module")
def det(det_dir):
    return DigitsDetector.load(det_dir)


def test_training_writes_safetensors_json_atomically(det_dir):
    files = sorted(p.name for p in det_dir.iterdir())
    assert files == ["detector.json", "model.safetensors"]
    assert not [p for p in det_dir.parent.iterdir() if ".tmp-" in p.name]
    info = json.loads((det_dir / "detector.json").read_text())
    assert info["sha256"] == sha256_file(det_dir / "model.safetensors")
    assert info["architecture"]["feature_dim"] == 64
    assert info["train"]["split"] == "train" and info["train"]["steps"] == 120
    # safetensors only: the weights file is a safetensors header + raw tensors
    from safetensors.torch import load_file

    sd = load_file(str(det_dir / "model.safetensors"))
    assert "fc2.weight" in sd and sd["fc2.weight"].shape == (64, 128)


def test_detector_identity_and_features(det):
    assert det.name == "digits-classifier" and det.fid_name == "FID-digits"
    assert det.id.startswith("digits-classifier@") and det.weights_sha256 in det.cache_key()["weights_sha256"]
    x, _ = load_dataset_images("digits-b", 300)
    f = det.features(x)
    assert f.shape == (300, 64) and f.dtype == np.float64 and np.isfinite(f).all()
    # features do not depend on the detector batch size
    np.testing.assert_allclose(det.features(x, batch_size=7), f, rtol=0, atol=1e-5)
    # full-rank covariance (pre-ReLU features: no dead units)
    assert np.linalg.matrix_rank(np.cov(det.features(load_dataset_images("digits")[0]).T)) == 64


def test_channels_and_sizes(det):
    x, _ = load_dataset_images("digits-a", 20)
    f1 = det.features(x)
    rgb = x.repeat(1, 3, 1, 1)
    np.testing.assert_allclose(det.features(rgb), f1, atol=1e-5)  # RGB is averaged to grey
    big = torch.nn.functional.interpolate(x.float(), scale_factor=4, mode="nearest").round().to(torch.uint8)
    fb = det.features(big)  # any size: antialiased resize to 8x8
    assert fb.shape == (20, 64)
    assert np.corrcoef(fb.ravel(), f1.ravel())[0, 1] > 0.9
    with pytest.raises(EvalInputError, match="2-channel images cannot be fed"):
        det.features(torch.zeros(2, 2, 8, 8, dtype=torch.uint8))
    with pytest.raises(EvalInputError, match="expected uint8"):
        det.features(torch.zeros(2, 1, 8, 8))
    # numpy input and NHW input are accepted
    assert det.features(x.numpy()[:, 0]).shape == (20, 64)


def test_classifier_is_trained(det):
    x, y = load_dataset_images("digits-b")
    acc = float((det.predict(x) == y).float().mean())
    assert acc > 0.85, acc  # 120 training steps; the full detector is tested in the slow test


def test_sha_mismatch_and_missing(tmp_path, det_dir):
    import shutil

    d = tmp_path / "det"
    shutil.copytree(det_dir, d)
    info = json.loads((d / "detector.json").read_text())
    info["sha256"] = "0" * 64
    (d / "detector.json").write_text(json.dumps(info))
    with pytest.raises(EvalInputError, match="does not match"):
        DigitsDetector.load(d)
    with pytest.raises(EvalInputError, match="no digits detector here"):
        DigitsDetector.load(tmp_path / "nothing")


def test_packaged_detector_is_the_default():
    det = get_detector("digits")
    assert "weights" in str(det.config.get("_path", "")) or det.weights_sha256.startswith("6a7a5372")


def test_default_detector_trains_on_first_use_then_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("STEPDISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("STEPDISTILL_IGNORE_PACKAGED_DETECTOR", "1")
    calls = []
    real = D.train_digits_detector

    def fast_train(out, **kw):
        calls.append(out)
        return real(out, steps=5, **kw)

    monkeypatch.setattr(D, "train_digits_detector", fast_train)
    d1 = get_detector("digits")
    assert len(calls) == 1 and calls[0] == tmp_path / "cache" / "detectors" / "digits-v1"
    d2 = get_detector("digits")
    assert len(calls) == 1 and d2.weights_sha256 == d1.weights_sha256
    # corrupted cache entry -> retrained
    (calls[0] / "model.safetensors").write_bytes(b"garbage")
    get_detector("digits")
    assert len(calls) == 2


def test_training_is_reproducible(tmp_path):
    a = train_digits_detector(tmp_path / "a", steps=3, seed=1)
    b = train_digits_detector(tmp_path / "b", steps=3, seed=1)
    c = train_digits_detector(tmp_path / "c", steps=3, seed=2)
    assert a["sha256"] == b["sha256"] != c["sha256"]
    # retraining into an existing folder replaces it
    d = train_digits_detector(tmp_path / "a", steps=3, seed=2)
    assert DigitsDetector.load(tmp_path / "a").weights_sha256 == d["sha256"] == c["sha256"]


@pytest.mark.slow
def test_full_detector_heldout_accuracy_and_time(tmp_path):
    t0 = time.perf_counter()
    info = train_digits_detector(tmp_path / "d", split="a", eval_split="b")
    seconds = time.perf_counter() - t0
    assert info["eval"]["accuracy"] > 0.97, info["eval"]
    assert seconds < 60, seconds


def test_unknown_detector():
    with pytest.raises(EvalInputError, match="unknown detector"):
        get_detector("vgg")


# --------------------------------------------------------------------------------------------- Inception
def _random_inception_weights(path, monkeypatch):
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    with monkeypatch.context() as m:
        m.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), path)


def test_inception_detector_local_random_weights(tmp_path, monkeypatch):
    pytest.importorskip("torch_fidelity", reason="torch-fidelity not installed (pip install 'stepdistill[fid]')")
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    w = tmp_path / "inception.pth"
    _random_inception_weights(w, monkeypatch)
    det = get_detector("inception", weights=w, feature_dim=64, antialias=False)
    assert det.name == "inception-v3-compat" and det.fid_name == "FID"
    assert det.weights_sha256 == sha256_file(w)
    assert det.preprocessing()["antialias"] is False
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=g)
    f = det.features(x)
    assert f.shape == (4, 64) and np.isfinite(f).all() and f.std() > 0
    # antialias=False is exactly torch-fidelity's own forward
    (ref,) = FeatureExtractorInceptionV3.forward(det.net, x)
    np.testing.assert_allclose(f, ref.double().numpy(), rtol=1e-5, atol=1e-6)
    # grey input is repeated to RGB
    np.testing.assert_allclose(det.features(x[:, :1]), det.features(x[:, :1].repeat(1, 3, 1, 1)), atol=1e-6)
    # antialias changes the resize, hence the features and the cache key
    det_aa = get_detector("inception", weights=w, feature_dim=64, antialias=True)
    assert det_aa.cache_key() != det.cache_key()
    assert not np.allclose(det_aa.features(x), f)
    # end to end through compute_fid: FID(x, x) = 0, FID(x, y) > 0 (few images: singular covariances)
    from stepdistill.eval.metrics import compute_fid

    y = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=g)
    with pytest.warns(RuntimeWarning, match="only 4 images"):
        same = compute_fid(x, x, det)
        diff = compute_fid(x, y, det)
    assert abs(same.fid) < 1e-6 and diff.fid > 1e-6
    assert same.metric == "FID-N4" and same.fid_detector == "inception-v3-compat"


@pytest.mark.slow
def test_inception_matches_torchmetrics_fid_network(tmp_path, monkeypatch):
    """Same features as torchmetrics' FrechetInceptionDistance (slow: importing torchmetrics and
    running the full network on CPU take a while)."""
    pytest.importorskip("torch_fidelity", reason="torch-fidelity not installed")
    from torchmetrics.image.fid import FrechetInceptionDistance

    w = tmp_path / "inception.pth"
    _random_inception_weights(w, monkeypatch)
    x = torch.randint(0, 256, (2, 3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    for antialias in (False, True):
        for dim in (64, 2048):
            ours = get_detector("inception", weights=w, feature_dim=dim, antialias=antialias).features(x)
            tm = FrechetInceptionDistance(feature=dim, feature_extractor_weights_path=str(w), antialias=antialias)
            np.testing.assert_allclose(ours, tm.inception(x).double().numpy(), rtol=1e-4, atol=1e-5)


def test_inception_bad_weights_file(tmp_path):
    pytest.importorskip("torch_fidelity", reason="torch-fidelity not installed")
    with pytest.raises(EvalInputError, match="not found"):
        get_detector("inception", weights=tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"foo": torch.zeros(1)}, bad)
    with pytest.raises(EvalInputError, match="not torch-fidelity Inception weights"):
        get_detector("inception", weights=bad)


def test_inception_without_torch_fidelity(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name.startswith("torch_fidelity"):
            raise ImportError("no torch_fidelity")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(EvalInputError, match=r"pip install 'stepdistill\[fid\]'"):
        get_detector("inception")


# ------------------------------------------------------------------------------------------- clean-fid
class _FakeLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 16, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-1] == 299
        return self.proj(torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))


class _FakeCleanFIDInception(torch.nn.Module):
    """Same TorchScript interface as clean-fid's inception-2015-12-05.pt (``layers`` and
    ``forward(x, return_features)`` resizing inside), tiny."""

    def __init__(self):
        super().__init__()
        self.layers = _FakeLayers()

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.layers((x - 128) / 128)


def test_cleanfid_detector_with_scripted_stand_in(tmp_path):
    pytest.importorskip("cleanfid", reason="clean-fid not installed (pip install 'stepdistill[fid]')")
    torch.manual_seed(0)
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(_FakeCleanFIDInception()).save(str(path))
    x = torch.randint(0, 256, (3, 3, 12, 12), dtype=torch.uint8)
    clean = get_detector("clean", weights=path)
    legacy = get_detector("legacy_tensorflow", weights=tmp_path)  # a folder holding the file works too
    fc, fl = clean.features(x), legacy.features(x)
    assert fc.shape == fl.shape == (3, 2048) and np.isfinite(fc).all()
    assert clean.name == "clean-fid-clean" and legacy.name == "clean-fid-legacy_tensorflow"
    assert not np.allclose(fc, fl)  # PIL bicubic outside vs bilinear inside the network
    with pytest.raises(EvalInputError, match="weights not found"):
        get_detector("clean", weights=tmp_path / "nope.pt")
