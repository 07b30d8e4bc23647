"""In-house CLIP score with a tiny, randomly initialised CLIP saved locally (no download)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stepdistill.eval.clip_score import clip_score, evaluate_clip_score, load_clip
from stepdistill.eval.errors import EvalInputError
from stepdistill.eval.generate import save_images

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPTokenizer,
        CLIPVisionConfig,
    )

    root = tmp_path_factory.mktemp("tiny-clip")
    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for ch in chars:
            vocab[ch + suffix] = len(vocab)
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"))
    ip = CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    text = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                          num_hidden_layers=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                              image_size=30, patch_size=10)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16))
    out = root / "clip"
    model.save_pretrained(out)
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(out)
    return out


def _images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 12, 12), dtype=torch.uint8, generator=g)


def _reference_cosines(path, images, texts):
    """Independent computation: the model's own forward on processor outputs, cosine in numpy."""
    from transformers import CLIPModel, CLIPProcessor

    m = CLIPModel.from_pretrained(path).eval()
    p = CLIPProcessor.from_pretrained(path)
    inp = p(text=texts, images=list(images.permute(0, 2, 3, 1).numpy()), return_tensors="pt", padding=True)
    with torch.no_grad():
        o = m(**inp)
    a, b = o.image_embeds.double().numpy(), o.text_embeds.double().numpy()
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_clip_score_matches_independent_computation(tiny_clip):
    x = _images(6)
    prompts = ["a red cat", "a dog", "two birds", "hello", "a photo of a car", "the sea"]
    res = clip_score(x, prompts, tiny_clip, batch_size=4)
    cos = _reference_cosines(tiny_clip, x, prompts)
    assert res["n"] == 6
    assert res["clip_cosine"] == pytest.approx(cos.mean(), abs=1e-5)
    assert res["clip_score"] == pytest.approx(np.maximum(100 * cos, 0).mean(), abs=1e-3)
    assert res["clip_model"] == str(tiny_clip) and res["clip_prefix"] == ""
    assert "100" in res["clip_scale"]
    # the prefix is recorded and changes the text
    pre = clip_score(x, prompts, tiny_clip, prefix="A photo depicts ")
    assert pre["clip_prefix"] == "A photo depicts " and pre["clip_cosine"] != res["clip_cosine"]
    assert pre["clip_cosine"] == pytest.approx(
        _reference_cosines(tiny_clip, x, ["A photo depicts " + p for p in prompts]).mean(), abs=1e-5)
    # grey images are repeated to RGB; a preloaded (model, processor) pair works
    pair = load_clip(tiny_clip)
    g = clip_score(x[:, :1], prompts, pair)
    assert g["clip_cosine"] == pytest.approx(clip_score(x[:, :1].repeat(1, 3, 1, 1), prompts, pair)["clip_cosine"])


def test_long_prompts_truncated(tiny_clip):
    res = clip_score(_images(2), ["word " * 200, "x"], tiny_clip)
    assert np.isfinite(res["clip_cosine"])


def test_clip_errors(tiny_clip, tmp_path):
    with pytest.raises(EvalInputError, match="one prompt per image"):
        clip_score(_images(3), ["a", "b"], tiny_clip)
    with pytest.raises(EvalInputError, match="CLIP model folder not found"):
        clip_score(_images(1), ["a"], str(tmp_path / "missing"))


def test_clip_on_folder_and_prompts_file(tiny_clip, tmp_path):
    x = _images(4, seed=1)
    save_images(tmp_path / "imgs", x)
    pf = tmp_path / "p.txt"
    pf.write_text("a cat\na dog\na bird\na car\n")
    res = evaluate_clip_score(str(tmp_path / "imgs"), pf, tiny_clip, progress=False)
    direct = clip_score(x, ["a cat", "a dog", "a bird", "a car"], tiny_clip)
    assert res["clip_cosine"] == pytest.approx(direct["clip_cosine"], abs=1e-9)
    pf.write_text("a cat\n")
    with pytest.raises(EvalInputError, match="4 images but 1 prompts"):
        evaluate_clip_score(str(tmp_path / "imgs"), pf, tiny_clip, progress=False)


def test_clip_cli(tiny_clip, tmp_path, capsys):
    from stepdistill.eval.cli import main

    save_images(tmp_path / "imgs", _images(2))
    pf = tmp_path / "p.txt"
    pf.write_text("one\ntwo\n")
    rc = main(["clip", str(tmp_path / "imgs"), "--prompts", str(pf), "--clip-model", str(tiny_clip), "--json",
               "--prefix", "A photo depicts "])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    res = json.loads(out[-1])
    assert res["metric"] == "clip_score" and res["n"] == 2 and res["clip_prefix"] == "A photo depicts "
    assert res["clip_model"] == str(tiny_clip)
