"""Coloured MNIST (stepdistill.data.colored_mnist): determinism, splits, captions, ranges."""

import numpy as np
import pytest
import torch

from stepdistill.data import colored_mnist as cm
from stepdistill.data.sources import PromptSource


def test_splits_are_deterministic_disjoint_and_stratified():
    idx = cm._split_indices()
    assert len(idx["train"]) == 4500 and len(idx["heldout"]) == 500
    assert not set(idx["train"].tolist()) & set(idx["heldout"].tolist())
    _, y = cm._raw()
    assert np.bincount(y[idx["heldout"]], minlength=10).tolist() == [50] * 10
    a = cm.load_split("heldout", variants=2)
    b = cm.load_split("heldout", variants=2)
    assert torch.equal(a.images, b.images) and a.captions == b.captions and torch.equal(a.attrs, b.attrs)
    c = cm.load_split("heldout", variants=2, seed=1)
    assert not torch.equal(a.attrs, c.attrs)
    assert torch.equal(a.attrs[:, 0], c.attrs[:, 0])  # same digits, other colours


def test_judge_split_has_other_colours_than_train():
    tr, ju = cm.load_split("train"), cm.load_split("judge")
    assert torch.equal(tr.attrs[:, 0], ju.attrs[:, 0])
    assert (tr.attrs[:, 1:] != ju.attrs[:, 1:]).any(dim=1).float().mean() > 0.9


def test_values_shapes_and_balance():
    d = cm.load_split("heldout", variants=3)
    assert d.images.shape == (1500, 3, 32, 32) and d.images.dtype == torch.float32
    assert d.images.min() >= -1 and d.images.max() <= 1
    assert d.attrs.dtype == torch.long and d.attrs.shape == (1500, 3)
    assert (d.attrs[:, 1] != d.attrs[:, 2]).all()
    assert d.attrs[:, 1:].min() >= 0 and d.attrs[:, 1:].max() < len(cm.COLOURS)
    pairs = d.attrs[:500, 1] * 6 + d.attrs[:500, 2]
    counts = torch.bincount(pairs, minlength=36)
    counts = counts[counts > 0]
    assert len(counts) == 30 and counts.max() - counts.min() <= 1
    # a background pixel is exactly the background colour; ink is the foreground colour
    i = 0
    bg = torch.tensor(cm.RGB[d.attrs[i, 2]]) * 2 - 1
    assert torch.allclose(d.images[i, :, 0, 0], bg)
    mask = torch.from_numpy(np.pad(cm._raw()[0][cm._split_indices()["heldout"][i]], 2))
    r, c = divmod(int(mask.argmax()), 32)
    assert mask[r, c] == 1.0
    assert torch.allclose(d.images[i, :, r, c], torch.tensor(cm.RGB[d.attrs[i, 1]]) * 2 - 1)


def test_caption_round_trip_and_rejections():
    for digit in range(10):
        for fg, bg in cm.PAIRS:
            text = cm.caption(digit, fg, bg)
            assert cm.parse_caption(text) == {"digit": digit, "fg": fg, "bg": bg}
            assert set(text.split()) <= set(cm.vocabulary())
    assert cm.caption(7, 0, 2) == "a red seven on a blue background"
    assert cm.parse_caption("  A Red SEVEN on a blue background. ") == {"digit": 7, "fg": 0, "bg": 2}
    for bad in ["", "a red seven", "a red seven on a red background", "a pink seven on a blue background",
                "a red seven on the blue background", "a red seven on a blue background please"]:
        assert cm.parse_caption(bad) is None
    with pytest.raises(ValueError):
        cm.caption(10, 0, 1)
    d = cm.load_split("heldout")
    for text, row in zip(d.captions[:50], d.attrs[:50].tolist()):
        p = cm.parse_caption(text)
        assert [p["digit"], p["fg"], p["bg"]] == row
    assert len(cm.vocabulary()) == len(set(cm.vocabulary())) == 19


def test_eval_prompts_balanced_and_shipped_file_matches():
    p = cm.eval_prompts(1000, seed=0)
    assert len(p) == 1000 and p == cm.eval_prompts(1000, seed=0) and p != cm.eval_prompts(1000, seed=1)
    combos = {(q["digit"], q["fg"], q["bg"]) for q in p}
    assert len(combos) == 300
    for q in p[:20]:
        assert cm.parse_caption(q["prompt"]) == {k: q[k] for k in ("digit", "fg", "bg")}
    shipped = cm.read_prompt_file(cm.EVAL_PROMPTS_FILE)
    assert shipped == p
    src = PromptSource(str(cm.EVAL_PROMPTS_FILE))
    assert src.prompts == [q["prompt"] for q in p]


def test_read_prompt_file_names_the_bad_line(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a red one on a blue background\n\nhello world\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"p.txt:3"):
        cm.read_prompt_file(f)


def test_bad_split_and_variants():
    with pytest.raises(ValueError, match="split"):
        cm.load_split("test")
    with pytest.raises(ValueError, match="variants"):
        cm.load_split("train", variants=0)
