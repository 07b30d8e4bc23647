"""Generation for evaluation: one seed per image, batch-size invariance, pipelines, class accuracy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from stepdistill.eval import generate as G
from stepdistill.eval.detectors import DigitsDetector
from stepdistill.eval.errors import EvalInputError
from stepdistill.eval.generate import generate_images, quantize, sample_pipeline, save_images, uniform_labels
from stepdistill.eval.inputs import load_dataset_images, load_image_folder
from stepdistill.eval.metrics import class_accuracy, compute_fid, evaluate_class_accuracy
from stepdistill.eval.testing import tiny_digits_detector_dir


@pytest.fixture(scope="module")
def det():
    return DigitsDetector.load(tiny_digits_detector_dir())


def noisy_fn(gens, labels):
    """Toy generator: per-image noise from its own generator, shifted by the label."""
    x = torch.stack([torch.randn(1, 8, 8, generator=g) for g in gens])
    if labels is not None:
        x = x + labels.view(-1, 1, 1, 1).float() * 0.2
    return ((x.clamp(-3, 3) + 3) / 6 * 255).round().to(torch.uint8)


_DIGITS_X, _DIGITS_Y = load_dataset_images("digits")


def digit_fn(gens, labels):
    """'Perfect' class-conditional generator: a random real digit of the requested class."""
    out = []
    for g, c in zip(gens, labels.tolist()):
        idx = torch.nonzero(_DIGITS_Y == c).flatten()
        out.append(_DIGITS_X[idx[torch.randint(0, idx.numel(), (1,), generator=g)]][0])
    return torch.stack(out)


def test_one_seed_per_image_and_batch_invariance():
    a = generate_images(noisy_fn, 23, seed=5, batch_size=1, num_classes=10, progress=False)
    b = generate_images(noisy_fn, 23, seed=5, batch_size=7, num_classes=10, progress=False)
    c = generate_images(noisy_fn, 23, seed=5, batch_size=64, num_classes=10, progress=False)
    assert a.dtype == torch.uint8 and a.shape == (23, 1, 8, 8)
    assert torch.equal(a, b) and torch.equal(a, c)
    # image i depends only on seed + i (and label i % 10)
    single = generate_images(noisy_fn, 1, seed=5 + 10, batch_size=1, labels=[0], progress=False)
    assert torch.equal(single[0], a[10])
    assert not torch.equal(generate_images(noisy_fn, 23, seed=6, num_classes=10, progress=False), a)


def test_fid_is_invariant_to_batch_size(det, tmp_path):
    kw = dict(detector=det, num_images=300, num_classes=10, cache_dir=tmp_path, progress=False)
    f1 = compute_fid(noisy_fn, "digits-b", batch_size=13, **kw)
    f2 = compute_fid(noisy_fn, "digits-b", batch_size=300, **kw)
    assert f1.fid == f2.fid  # bit-identical
    assert f1.metric == "FID-digits-N300" and f1.fid_detector == "digits-classifier"
    real = compute_fid(digit_fn, "digits-b", batch_size=50, **kw)
    assert real.fid < f1.fid / 5  # real digits are much closer to the data than noise


def test_labels_and_quantize():
    assert uniform_labels(12, 5).tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    assert G.resolve_labels(5, [7, 8]).tolist() == [7, 8, 7, 8, 7]
    assert G.resolve_labels(4, None) is None
    with pytest.raises(EvalInputError, match="needs num_classes"):
        G.resolve_labels(4, "uniform")
    # rounding, not truncation
    q = quantize(np.array([0.0, 2.6 / 255, 254.6 / 255, 1.2, -0.1]))
    assert q.tolist() == [0, 3, 255, 255, 0]
    with pytest.raises(EvalInputError, match="uint8 NCHW tensor with 4 images"):
        generate_images(lambda g, lab: torch.zeros(3, 1, 8, 8, dtype=torch.uint8), 4, progress=False)


def test_save_images_roundtrip(tmp_path):
    x = generate_images(noisy_fn, 12, num_classes=10, progress=False)
    paths = save_images(tmp_path / "out", x, labels=uniform_labels(12, 10))
    assert paths[0].name == "000000_class0.png" and paths[11].name == "000011_class1.png"
    back, lab, _ = load_image_folder(tmp_path / "out")
    assert torch.equal(back, x) and lab.tolist() == uniform_labels(12, 10).tolist()


# ----------------------------------------------------------------------------------------- pipelines
class FakeClassPipeline(DiffusionPipeline):
    """Class-conditional pipeline with the stepdistill calling convention (real digits per class)."""

    def __init__(self, num_classes: int = 10, wrong: bool = False):
        super().__init__()
        self.register_to_config(num_classes=num_classes)
        self.wrong = wrong
        self.calls: list[dict] = []

    def __call__(self, class_labels, generator=None, num_inference_steps=1, output_type="pil", return_dict=True):
        labels = torch.as_tensor(class_labels, dtype=torch.long)
        gens = generator if isinstance(generator, list) else [generator] * len(labels)
        assert len(gens) == len(labels)
        self.calls.append({"n": len(labels), "labels": labels.tolist(), "steps": num_inference_steps})
        if self.wrong:
            labels = (labels + 1) % 10
        x = digit_fn(gens, labels).float() / 255.0  # NCHW in [0, 1]
        images = x.permute(0, 2, 3, 1).numpy()  # output_type="np": NHWC float
        return ImagePipelineOutput(images=images) if return_dict else (images,)


class FakeTextPipeline(DiffusionPipeline):
    def __init__(self):
        super().__init__()
        self.prompts: list[str] = []

    def __call__(self, prompt, generator=None, num_inference_steps=4, output_type="pil", guidance_scale=1.0):
        prompt = [prompt] if isinstance(prompt, str) else prompt
        self.prompts.extend(prompt)
        x = torch.stack([torch.rand(4, 4, 3, generator=g) for g in generator]) * (len(prompt[0]) % 7) / 7
        return ImagePipelineOutput(images=x.numpy())


class FakeUncondPipeline(DiffusionPipeline):
    def __call__(self, batch_size=1, generator=None, output_type="pil"):
        assert len(generator) == batch_size
        return ImagePipelineOutput(images=np.stack([torch.rand(5, 5, 1, generator=g).numpy() for g in generator]))


def test_sample_class_pipeline_batch_invariant():
    pipe = FakeClassPipeline()
    a = sample_pipeline(pipe, 12, seed=3, batch_size=5, progress=False, num_inference_steps=2)
    b = sample_pipeline(pipe, 12, seed=3, batch_size=12, progress=False, num_inference_steps=2)
    assert a.dtype == torch.uint8 and a.shape == (12, 1, 8, 8) and torch.equal(a, b)
    assert pipe.calls[0] == {"n": 5, "labels": [0, 1, 2, 3, 4], "steps": 2}
    assert pipe.calls[2]["labels"] == [0, 1]  # image 10, 11 -> classes 0, 1
    # the quantised output equals the real digits chosen (rounding recovers the uint8 exactly)
    expected = digit_fn([torch.Generator().manual_seed(3 + i) for i in range(12)], uniform_labels(12, 10))
    assert torch.equal(a, expected)
    c = sample_pipeline(pipe, 4, class_labels=[7], progress=False)
    assert pipe.calls[-1]["labels"] == [7, 7, 7, 7] and c.shape[0] == 4


def test_text_and_unconditional_pipelines(tmp_path):
    pf = tmp_path / "prompts.txt"
    pf.write_text("a cat\n\nthe dog\nx\n")
    pipe = FakeTextPipeline()
    x = sample_pipeline(pipe, 5, prompts=pf, batch_size=2, progress=False, guidance_scale=2.0)
    assert x.shape == (5, 3, 4, 4) and pipe.prompts == ["a cat", "the dog", "x", "a cat", "the dog"]
    y = sample_pipeline(FakeUncondPipeline(), 3, batch_size=2, progress=False)
    z = sample_pipeline(FakeUncondPipeline(), 3, batch_size=3, progress=False)
    assert y.shape == (3, 1, 5, 5) and torch.equal(y, z)
    with pytest.raises(EvalInputError, match="prompts file not found"):
        sample_pipeline(pipe, 2, prompts=tmp_path / "nope.txt", progress=False)


def test_pipeline_folder_loaded_with_trust_remote_code(tmp_path, monkeypatch):
    folder = tmp_path / "pipe"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FakeClassPipeline"}))
    seen = {}

    def fake_from_pretrained(path, **kw):
        seen.update(kw, path=path)
        return FakeClassPipeline()

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", staticmethod(fake_from_pretrained))
    x = sample_pipeline(str(folder), 3, progress=False)
    assert seen["trust_remote_code"] is True and seen["path"] == str(folder) and x.shape == (3, 1, 8, 8)
    with pytest.raises(EvalInputError, match="no model_index.json"):
        G.load_pipeline(tmp_path)


def test_folder_code_runs_only_when_it_is_ours_or_opted_in(tmp_path, monkeypatch):
    """Default policy: a folder's .py files run only when byte-identical to a pipeline file shipped
    with stepdistill; other code needs STEPDISTILL_TRUST_REMOTE_CODE=1 or trust_remote_code=True."""
    import shutil

    import stepdistill.pipelines.one_step as one_step

    folder = tmp_path / "pipe"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": ["one_step", "OneStepPipeline"]}))
    shutil.copyfile(one_step.__file__, folder / "one_step.py")
    seen = {}

    def fake_from_pretrained(path, **kw):
        seen.clear()
        seen.update(kw)
        return FakeClassPipeline()

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", staticmethod(fake_from_pretrained))
    monkeypatch.delenv(G.TRUST_ENV, raising=False)
    G.load_pipeline(folder)
    assert seen["trust_remote_code"] is True  # our own file: runs
    (folder / "one_step.py").write_text((folder / "one_step.py").read_text() + "\nimport os  # edited\n")
    with pytest.raises(EvalInputError, match="one_step.py.*STEPDISTILL_TRUST_REMOTE_CODE"):
        G.load_pipeline(folder)
    G.load_pipeline(folder, trust_remote_code=False)
    assert seen["trust_remote_code"] is False
    monkeypatch.setenv(G.TRUST_ENV, "1")
    G.load_pipeline(folder)
    assert seen["trust_remote_code"] is True


def test_class_accuracy_real_values(det):
    good = evaluate_class_accuracy(FakeClassPipeline(), 200, det, batch_size=64, progress=False)
    bad = evaluate_class_accuracy(FakeClassPipeline(wrong=True), 200, det, batch_size=64, progress=False)
    assert good["class_accuracy"] > 0.85 and bad["class_accuracy"] < 0.2
    assert good["n"] == 200 and set(good["per_class_accuracy"]) == set(range(10))
    fn = evaluate_class_accuracy(digit_fn, 100, det, progress=False)
    assert fn["class_accuracy"] > 0.85
    x, y = load_dataset_images("digits-b")
    assert class_accuracy(x, y, det)["class_accuracy"] > 0.85
    with pytest.raises(EvalInputError, match="labels for"):
        class_accuracy(x[:3], y[:2], det)


def test_evaluate_generator_one_pass(det, tmp_path):
    from stepdistill.eval.metrics import evaluate_generator

    res = evaluate_generator(digit_fn, "digits", det, num_images=200, batch_size=32, cache_dir=tmp_path,
                             progress=False)
    assert res["metric"] == "FID-digits-N200" and res["class_accuracy"] > 0.85 and res["n_reference"] == 1797
    same = compute_fid(digit_fn, "digits", det, num_images=200, num_classes=10, cache_dir=tmp_path, progress=False)
    assert res["fid"] == pytest.approx(same.fid, rel=1e-12)
