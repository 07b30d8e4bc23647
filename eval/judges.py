"""Judges for the coloured-MNIST text-to-image teacher that are *not* the teacher.

* :class:`AttributeDetector` (``"t2i-attributes"``): a CNN with three heads (digit, foreground colour,
  background colour).  Its penultimate features (taken before the ReLU: no dead dimensions) give
  ``FID-attr``; its heads give prompt accuracy (all three attributes of the prompt right, GenEval
  style) and per-attribute accuracy.
* a small CLIP (``transformers.CLIPModel``: ViT image tower + text tower, word-level
  ``CLIPTokenizer``), trained contrastively, for the CLIP score; loadable by
  :func:`stepdistill.eval.clip_score.load_clip` like any CLIP folder.

Both train on the ``"judge"`` split of :mod:`stepdistill.data.colored_mnist` (the teacher's digits
re-coloured by an independent colour stream, augmented: shifts, colour jitter, blur) under their own
seeds, single-threaded and deterministic, in a few minutes on one CPU core, and are validated on the
``"heldout"`` digits, which nobody trains on.  The shipped weights live in ``eval/weights/t2i-attr-v1``
and ``eval/weights/t2i-clip-v1``; they were made by::

    python -m stepdistill.eval train-t2i-judges --output eval/weights
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .detectors import CONFIG_FILE, WEIGHTS_FILE, Detector, as_uint8_nchw, fit, num_threads, sha256_file
from .errors import EvalInputError

__all__ = [
    "ATTR_JUDGE_VERSION",
    "CLIP_JUDGE_VERSION",
    "AttributeNet",
    "AttributeDetector",
    "attribute_accuracy",
    "shipped_judges_dir",
    "default_attribute_detector",
    "default_clip_judge_dir",
    "train_attribute_judge",
    "train_clip_judge",
    "word_level_clip_tokenizer",
]

ATTR_JUDGE_VERSION = "t2i-attr-v1"
CLIP_JUDGE_VERSION = "t2i-clip-v1"
JUDGE_INFO = "judge.json"
ATTR_NAMES = ("digit", "fg", "bg")


def shipped_judges_dir() -> Path:
    return Path(__file__).with_name("weights")


# ------------------------------------------------------------------------------------- augmentation
def _augment(x: torch.Tensor, g: torch.Generator, max_shift: int = 2, jitter: float = 0.15,
             blur_p: float = 0.5) -> torch.Tensor:
    """Random shifts (edge-replicated), per-image colour jitter and random Gaussian blur (sigma
    0.3-1.2, as a VAE blurs) of (N, 3, 32, 32) images in [-1, 1]."""
    n, c, h, w = x.shape
    k = 2 * max_shift + 1
    xp = F.pad(x, (max_shift,) * 4, mode="replicate")
    dy = torch.randint(0, k, (n,), generator=g)
    dx = torch.randint(0, k, (n,), generator=g)
    x = _shift(xp, dy, dx, h, w)
    if jitter > 0:
        scale = 1 + jitter * (2 * torch.rand(n, c, 1, 1, generator=g) - 1)
        offset = jitter * (2 * torch.rand(n, c, 1, 1, generator=g) - 1)
        x = ((x + 1) / 2 * scale + offset).clamp(0, 1) * 2 - 1
    if blur_p > 0:
        sig = 0.3 + 0.9 * torch.rand(n, generator=g)
        use = torch.rand(n, generator=g) < blur_p
        r = torch.arange(-2, 3, dtype=torch.float32)
        ker = torch.exp(-(r[None, :] ** 2) / (2 * sig[:, None] ** 2))
        ker = ker / ker.sum(1, keepdim=True)
        ker = torch.where(use[:, None], ker, F.one_hot(torch.tensor(2), 5).float()[None].expand(n, 5))
        x = _sep_blur(x, ker)
    return x


def _shift(xp: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, h: int, w: int) -> torch.Tensor:
    n = xp.shape[0]
    rows = dy[:, None] + torch.arange(h)[None, :]
    cols = dx[:, None] + torch.arange(w)[None, :]
    idx_n = torch.arange(n)[:, None, None]
    return xp[idx_n, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def _sep_blur(x: torch.Tensor, ker: torch.Tensor) -> torch.Tensor:
    """Per-image separable blur with (N, 5) kernels (replicate padding)."""
    n, c, h, w = x.shape
    xp = F.pad(x, (2, 2, 2, 2), mode="replicate")
    y = sum(ker[:, i, None, None, None] * xp[:, :, :, i : i + w] for i in range(5))
    return sum(ker[:, i, None, None, None] * y[:, :, i : i + h, :] for i in range(5))


def _to_net_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> float in [-1, 1] (what the judges see at inference)."""
    return images.float() / 127.5 - 1.0


def as_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# ------------------------------------------------------------------------------ attribute classifier
class AttributeNet(nn.Module):
    """3x32x32 -> convs 16/32/64 (each + 2x2 max-pool) -> fc ``hidden`` -> fc ``feature_dim``
    (the FID features, before their ReLU) -> three heads: digit (10), fg (6), bg (6)."""

    def __init__(self, width: int = 16, hidden: int = 128, feature_dim: int = 64, num_digits: int = 10,
                 num_colours: int = 6, dropout: float = 0.1):
        super().__init__()
        self.c1 = nn.Conv2d(3, width, 3, padding=1)
        self.c2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.c3 = nn.Conv2d(2 * width, 4 * width, 3, padding=1)
        self.fc1 = nn.Linear(4 * width * 16, hidden)
        self.fc2 = nn.Linear(hidden, feature_dim)
        self.head_digit = nn.Linear(feature_dim, num_digits)
        self.head_fg = nn.Linear(feature_dim, num_colours)
        self.head_bg = nn.Linear(feature_dim, num_colours)
        self.drop = nn.Dropout(dropout)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        x = F.max_pool2d(F.relu(self.c3(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(self.drop(x))

    def heads(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.drop(F.relu(f))
        return self.head_digit(h), self.head_fg(h), self.head_bg(h)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.heads(self.features(x))


ATTR_ARCH = {"width": 16, "hidden": 128, "feature_dim": 64, "num_digits": 10, "num_colours": 6, "dropout": 0.1}


class AttributeDetector(Detector):
    """The attribute judge as FID detector (``FID-attr``: 64-d pre-ReLU penultimate features) and as
    a three-head classifier (:meth:`predict` -> (N, 3) digit, fg, bg).  Input: uint8 NCHW RGB; any
    size is resized to 32x32 (antialiased bilinear)."""

    name = "t2i-attributes"
    fid_name = "FID-attr"
    channels = 3
    default_batch_size = 500
    feature_spec = "t2i-attr-v1 fc2 pre-relu"

    def __init__(self, net: AttributeNet, weights_sha256: str, config: dict | None = None,
                 path: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
        self.net = net.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)
        self.feature_dim = int(net.fc2.out_features)
        self.weights_sha256 = weights_sha256
        self.config = dict(config or {})
        self.path = Path(path) if path is not None else None

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> AttributeDetector:
        from safetensors.torch import load_file

        folder = Path(path).expanduser()
        wfile, cfile = folder / WEIGHTS_FILE, folder / CONFIG_FILE
        if not wfile.is_file() or not cfile.is_file():
            raise EvalInputError(
                f"{folder}: no attribute judge here (needs {WEIGHTS_FILE} and {CONFIG_FILE}); train one with "
                "`python -m stepdistill.eval train-t2i-judges --output DIR`"
            )
        try:
            cfg = json.loads(cfile.read_text())
        except (OSError, ValueError) as e:
            raise EvalInputError(f"{cfile}: unreadable judge config ({e})") from e
        sha = sha256_file(wfile)
        if cfg.get("sha256") and cfg["sha256"] != sha:
            raise EvalInputError(f"{wfile}: sha256 {sha[:12]} does not match {cfile.name}; retrain the judge")
        net = AttributeNet(**{**ATTR_ARCH, **cfg.get("architecture", {})})
        try:
            net.load_state_dict(load_file(str(wfile)))
        except Exception as e:  # noqa: BLE001
            raise EvalInputError(f"{wfile}: cannot load attribute judge weights ({e})") from e
        return cls(net, weights_sha256=sha, config=cfg, path=folder, device=device)

    def preprocessing(self) -> dict[str, Any]:
        return {"range": "u / 127.5 - 1", "resize": "bilinear antialias to 32x32 when not 32x32", "channels": "RGB"}

    def _prep(self, batch: torch.Tensor) -> torch.Tensor:
        x = _to_net_input(batch.to(self.device))
        if x.shape[-2:] != (32, 32):
            x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        return x

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        with num_threads(1):
            return self.net.features(self._prep(batch))

    def predict(self, images: Any, batch_size: int | None = None) -> torch.Tensor:
        """(N, 3) predicted (digit, fg, bg) of uint8 NCHW RGB images."""
        x = self.convert_channels(as_uint8_nchw(images, what="judge images"))
        bs = batch_size or self.default_batch_size
        out = []
        with torch.inference_mode(), num_threads(1):
            for i in range(0, x.shape[0], bs):
                d, f, b = self.net(self._prep(x[i : i + bs]))
                out.append(torch.stack([d.argmax(1), f.argmax(1), b.argmax(1)], 1).cpu())
        return torch.cat(out) if out else torch.zeros((0, 3), dtype=torch.long)


def attribute_accuracy(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """``prompt_accuracy`` (all three attributes right) and per-attribute accuracies."""
    pred, target = torch.as_tensor(pred).long(), torch.as_tensor(target).long()
    if pred.shape != target.shape or pred.ndim != 2 or pred.shape[1] != 3:
        raise EvalInputError(f"attribute accuracy needs two (N, 3) tensors, got {tuple(pred.shape)} / {tuple(target.shape)}")
    ok = pred == target
    out = {"prompt_accuracy": float(ok.all(1).float().mean())}
    for j, name in enumerate(ATTR_NAMES):
        out[f"{name}_accuracy"] = float(ok[:, j].float().mean())
    return out


def default_attribute_detector(device: str | torch.device = "cpu") -> AttributeDetector:
    return AttributeDetector.load(shipped_judges_dir() / ATTR_JUDGE_VERSION, device=device)


def default_clip_judge_dir() -> Path:
    return shipped_judges_dir() / CLIP_JUDGE_VERSION


def _atomic_folder(out: Path, write) -> None:
    """Build a folder in a temporary sibling with ``write(tmp)`` and move it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; these are shareable package files
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "d")
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _judge_data(variants: int, seed: int):
    from stepdistill.data.colored_mnist import load_split

    tr = load_split("judge", variants=variants, seed=seed)
    ho = load_split("heldout", variants=2, seed=seed + 1)
    # exactly what the judges see at inference: uint8-quantised images
    return (_to_net_input(as_uint8(tr.images)), tr.attrs, tr.captions,
            _to_net_input(as_uint8(ho.images)), ho.attrs, ho.captions)


def train_attribute_judge(out_path: str | os.PathLike, steps: int = 1500, seed: int = 1, batch_size: int = 128,
                          lr: float = 3e-3, variants: int = 4, progress: bool = False) -> dict[str, Any]:
    """Train the attribute judge on the ``"judge"`` split; write ``model.safetensors`` + ``detector.json``."""
    from safetensors.torch import save_file

    out = Path(out_path)
    t0 = time.perf_counter()
    with num_threads(1):
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        x, y, _, xh, yh, _ = _judge_data(variants, seed)
        net = AttributeNet(**ATTR_ARCH)
        net.train()

        def loss_of(idx):
            d, f, b = net(_augment(x[idx], g))
            return (F.cross_entropy(d, y[idx, 0], label_smoothing=0.05) + F.cross_entropy(f, y[idx, 1])
                    + F.cross_entropy(b, y[idx, 2]))

        fit(net.parameters(), loss_of, n=x.shape[0], steps=steps, batch_size=batch_size, lr=lr, weight_decay=1e-4,
            generator=g, progress=progress, desc="train attribute judge")
        net.eval()
        with torch.inference_mode():
            ph = torch.cat([torch.stack([h.argmax(1) for h in net(xh[i : i + 500])], 1) for i in range(0, len(xh), 500)])
        acc = attribute_accuracy(ph, yh)
    seconds = time.perf_counter() - t0

    def write(tmp: Path) -> None:
        save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(tmp / WEIGHTS_FILE))
        info.update(sha256=sha256_file(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(info, indent=2) + "\n")

    info: dict[str, Any] = {
        "name": ATTR_JUDGE_VERSION, "detector": AttributeDetector.name, "architecture": dict(ATTR_ARCH),
        "params": sum(p.numel() for p in net.parameters()),
        "train": {"data": f"colored_mnist judge split, variants={variants}, seed={seed}", "n": int(x.shape[0]),
                  "steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr,
                  "augment": "shift <= 2 px, colour jitter 0.15, blur sigma 0.3-1.2 (p=0.5)",
                  "seconds": round(seconds, 1)},
        "eval": {"data": "colored_mnist heldout, variants=2", "n": int(xh.shape[0]), **acc},
        "command": "python -m stepdistill.eval train-t2i-judges --output eval/weights",
        "torch": torch.__version__,
    }
    _atomic_folder(out, write)
    return {**info, "path": str(out)}


# ---------------------------------------------------------------------------------------- CLIP judge
def word_level_clip_tokenizer(folder: str | os.PathLike, words: list[str], model_max_length: int = 16):
    """A ``CLIPTokenizer`` whose tokens are whole words: every word of ``words`` is one token
    (``word</w>``; BPE merges learned on the word list build it, their pieces are in the vocabulary as the BPE
    needs), characters outside the words are ``<|endoftext|>`` (unk)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # learn BPE merges on the word list until every word is one symbol: encoding applies the merges in
    # the order they were learned, so it reproduces the learning and maps every word to itself
    segs = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in segs):
        counts: dict[tuple[str, str], int] = {}
        for s in segs:
            for pair in zip(s, s[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for k, s in enumerate(segs):
            i, new = 0, []
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    new.append(s[i] + s[i + 1])
                    i += 2
                else:
                    new.append(s[i])
                    i += 1
            segs[k] = new
    pieces = [p for w in words for p in (list(w[:-1]) + [w[-1] + "</w>"])] + ["".join(m) for m in merges]
    tokens = ["<|startoftext|>", "<|endoftext|>"] + [w + "</w>" for w in words] + pieces
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer.from_pretrained(str(folder), model_max_length=model_max_length, pad_token="<|endoftext|>")
    for w in words:
        ids = tok(w, add_special_tokens=False)["input_ids"]
        if ids != [vocab[w + "</w>"]]:
            raise RuntimeError(f"word-level tokenizer does not map {w!r} to one token (got {ids})")
    return tok


def _clip_config(vocab_size: int, max_len: int, bos: int, eos: int, pad: int):
    from transformers import CLIPConfig

    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=max_len, bos_token_id=bos, eos_token_id=eos,
                pad_token_id=pad, projection_dim=64)
    vision = dict(image_size=32, patch_size=4, num_channels=3, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, projection_dim=64)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)


def _image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(do_resize=True, size={"shortest_edge": 32}, do_center_crop=True,
                              crop_size={"height": 32, "width": 32}, do_rescale=True, rescale_factor=1 / 255,
                              do_normalize=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
                              do_convert_rgb=True)


def _img_emb(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected image embeddings, as ``CLIPModel.forward`` computes ``image_embeds``."""
    return model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output)


def _txt_emb(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    return model.text_projection(model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output)


def train_clip_judge(out_path: str | os.PathLike, steps: int = 2000, seed: int = 2, batch_size: int = 128,
                     lr: float = 2e-3, variants: int = 4, progress: bool = False) -> dict[str, Any]:
    """Train the small CLIP contrastively on the ``"judge"`` split (captions that are equal count as
    positives of each other); save a ``CLIPModel`` + ``CLIPProcessor`` folder (+ ``judge.json``)."""
    from transformers import CLIPModel, CLIPProcessor

    from stepdistill.data.colored_mnist import vocabulary

    out = Path(out_path)
    t0 = time.perf_counter()
    tok_dir = Path(tempfile.mkdtemp(prefix="t2i-clip-tok-"))
    try:
        tok = word_level_clip_tokenizer(tok_dir, vocabulary(), model_max_length=16)
    finally:
        shutil.rmtree(tok_dir, ignore_errors=True)
    with num_threads(1):
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        x, _, caps, xh, _, caps_h = _judge_data(variants, seed)
        uniq = sorted(set(caps) | set(caps_h))
        cap_id = {c: i for i, c in enumerate(uniq)}
        enc = tok(uniq, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
        cid = torch.tensor([cap_id[c] for c in caps])
        cfg = _clip_config(len(tok), 16, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
        model = CLIPModel(cfg)
        model.train()

        def loss_of(idx):
            c = cid[idx]
            ie = F.normalize(_img_emb(model, _augment(x[idx], g)), dim=-1)
            te = F.normalize(_txt_emb(model, enc["input_ids"][c], enc["attention_mask"][c]), dim=-1)
            logits = model.logit_scale.exp().clamp(max=100) * ie @ te.T
            same = (c[:, None] == c[None, :]).float()
            target = same / same.sum(1, keepdim=True)
            return 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean()
                          - (target * logits.T.log_softmax(1)).sum(1).mean())

        fit(model.parameters(), loss_of, n=x.shape[0], steps=steps, batch_size=batch_size, lr=lr, weight_decay=0.05,
            generator=g, progress=progress, desc="train CLIP judge", pct_start=0.1)
        model.eval()
        # held-out retrieval: each image against the 300 captions
        with torch.inference_mode():
            te = F.normalize(_txt_emb(model, enc["input_ids"], enc["attention_mask"]), dim=-1)
            ie = torch.cat([F.normalize(_img_emb(model, xh[i : i + 250]), dim=-1)
                            for i in range(0, len(xh), 250)])
            sims = ie @ te.T
            truth = torch.tensor([cap_id[c] for c in caps_h])
            top1 = float((sims.argmax(1) == truth).float().mean())
            cos_true = float(sims[torch.arange(len(truth)), truth].mean())
            cos_shuf = float(sims[torch.arange(len(truth)), truth[torch.randperm(len(truth), generator=g)]].mean())
    seconds = time.perf_counter() - t0

    info: dict[str, Any] = {
        "name": CLIP_JUDGE_VERSION, "params": sum(p.numel() for p in model.parameters()),
        "train": {"data": f"colored_mnist judge split, variants={variants}, seed={seed}", "n": int(x.shape[0]),
                  "steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr,
                  "loss": "symmetric InfoNCE, equal captions are positives",
                  "augment": "shift <= 2 px, colour jitter 0.15, blur sigma 0.3-1.2 (p=0.5)",
                  "seconds": round(seconds, 1)},
        "eval": {"data": "colored_mnist heldout, variants=2", "n": int(xh.shape[0]),
                 "retrieval_top1_of_300_captions": top1, "cosine_true_caption": cos_true,
                 "cosine_shuffled_caption": cos_shuf},
        "command": "python -m stepdistill.eval train-t2i-judges --output eval/weights",
        "torch": torch.__version__,
    }

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        CLIPProcessor(image_processor=_image_processor(), tokenizer=tok).save_pretrained(tmp)
        info["sha256"] = sha256_file(tmp / "model.safetensors")
        (tmp / JUDGE_INFO).write_text(json.dumps(info, indent=2) + "\n")

    _atomic_folder(out, write)
    return {**info, "path": str(out)}


def train_judges(out_dir: str | os.PathLike, attr_steps: int = 1500, clip_steps: int = 2000,
                 progress: bool = False) -> dict[str, Any]:
    out = Path(out_dir)
    a = train_attribute_judge(out / ATTR_JUDGE_VERSION, steps=attr_steps, progress=progress)
    c = train_clip_judge(out / CLIP_JUDGE_VERSION, steps=clip_steps, progress=progress)
    return {"attributes": a, "clip": c}


def judge_fingerprint(folder: str | os.PathLike) -> set[str]:
    """sha256 of every tensor of every safetensors file under ``folder`` (to compare weight sets)."""
    from safetensors.torch import load_file

    out = set()
    for f in sorted(Path(folder).rglob("*.safetensors")):
        for t in load_file(str(f)).values():
            out.add(hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest())
    return out

