"""The embedded text-to-image teacher: a small Stable-Diffusion-layout model made of stock classes.

Parts (all stock diffusers / transformers classes, so ``StableDiffusionPipeline.from_pretrained``
loads the folder and any stock scheduler samples it):

* ``vae`` -- :class:`diffusers.AutoencoderKL`, 3x32x32 images <-> 4x8x8 latents, with SD's
  ``scaling_factor`` set from the training latents' standard deviation (1 / std, as SD's 0.18215);
* ``tokenizer`` -- a :class:`transformers.CLIPTokenizer` written as ordinary ``vocab.json`` +
  ``merges.txt``: every byte is a token (so any text tokenizes, like CLIP) and BPE merges are
  chosen so that every caption word is exactly one token (a word-level vocabulary inside CLIP's BPE);
* ``text_encoder`` -- :class:`transformers.CLIPTextModel` (trained contrastively against an image
  tower, then frozen, as SD freezes CLIP);
* ``unet`` -- :class:`diffusers.UNet2DConditionModel` with cross-attention in every block, trained
  like SD 1.5 (epsilon prediction, scaled-linear betas 0.00085-0.012, 1,000 steps, caption dropout);
* ``scheduler`` -- :class:`diffusers.DDIMScheduler` configured as SD 1.5's (``steps_offset=1``,
  ``set_alpha_to_one=False``, ``clip_sample=False``, leading spacing).

This module holds the architecture specs and the builders; the cache (:func:`stepdistill.t2i_teacher.ensure_t2i_teacher`) and
the training procedures live in :mod:`stepdistill.t2i_teacher` (teachers do not import the
training stack).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: SD 1.5's noise schedule (``scheduler/scheduler_config.json`` of runwayml/stable-diffusion-v1-5)
SD15_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

#: bump when the meaning of a spec changes without its fields changing (invalidates caches)
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# specs (architecture + recipe of each part; every field enters the cache key)


@dataclass
class VAESpec:
    block_out_channels: list = field(default_factory=lambda: [16, 32, 32])  # 3 blocks: 32x32 -> 8x8
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 8
    kl_weight: float = 1e-4  # loss = MSE + kl_weight * KL (per element means)
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.05  # cosine decay to lr * min_lr_ratio
    warmup_steps: int = 50


@dataclass
class TextSpec:
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 512
    max_length: int = 16  # tokens including <|startoftext|> and <|endoftext|>
    projection_dim: int = 128  # contrastive head (training only; not part of the pipeline)
    image_channels: list = field(default_factory=lambda: [16, 32, 64])  # image tower (training only)
    steps: int = 300
    batch_size: int = 128
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 50
    attribute_heads: bool = True  # image tower also predicts (digit, fg, bg): a training-time monitor


@dataclass
class UNetSpec:
    block_out_channels: list = field(default_factory=lambda: [64, 128])
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 32
    cond_dropout: float = 0.1  # captions replaced by "" (SD's unconditional prompt) for CFG
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    max_grad_norm: float = 1.0
    eval_every_steps: int = 500  # monitor accuracy (DDIM 8 steps, CFG 4.5) on eval_images prompts; 0 disables
    eval_images: int = 200


@dataclass
class DataSpec:
    variants: int = 8  # colour variants per training digit (4,500 x variants images)
    seed: int = 0


@dataclass
class T2ITeacherSpec:
    data: DataSpec = field(default_factory=DataSpec)
    vae: VAESpec = field(default_factory=VAESpec)
    text: TextSpec = field(default_factory=TextSpec)
    unet: UNetSpec = field(default_factory=UNetSpec)
    seed: int = 0
    checkpoint_every_steps: int = 250


def spec_from_params(params: dict | None, seed: int = 0) -> T2ITeacherSpec:
    """``teacher.params`` of a ``teacher.kind: t2i`` config -> spec (unknown keys are errors)."""
    from ..config import from_dict

    params = dict(params or {})
    params.setdefault("seed", seed)
    return from_dict(T2ITeacherSpec, params, prefix="teacher.params.")


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def part_keys(spec: T2ITeacherSpec) -> dict[str, str]:
    """Cache keys of the parts: each covers the part's spec, the data, the seed and what it builds on,
    so a changed UNet recipe reuses the trained VAE and text encoder."""
    base = {"format": FORMAT_VERSION, "data": asdict(spec.data), "seed": spec.seed}
    vae = _digest({**base, "vae": asdict(spec.vae)})
    text = _digest({**base, "text": asdict(spec.text)})
    unet = _digest({**base, "unet": asdict(spec.unet), "vae": vae, "text": text})
    return {"vae": vae, "text": text, "unet": unet}


# ---------------------------------------------------------------------------------------------
# tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode character table (CLIP's byte-level alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one (byte-mapped, lower-case) word: lowest-ranked adjacent pair first."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
        cands = [(ranks[p], p) for p in zip(symbols, symbols[1:]) if p in ranks]
        if not cands:
            break
        pair = min(cands)[1]
        out, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                out.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                out.append(symbols[i])
                i += 1
        symbols = out
    return symbols


def word_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """BPE merges under which every word is one token.

    Each word is tokenized with the merges so far; while it is more than one token, the merge of its
    first two pieces is appended (lowest priority).  An appended merge never changes a word that is
    already one token (its BPE never reaches a state where only the new merge applies), so the
    result holds for all words at once.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for w in dict.fromkeys(words):
        while True:
            pieces = _bpe(w, ranks)
            if len(pieces) == 1:
                break
            ranks[(pieces[0], pieces[1])] = len(merges)
            merges.append((pieces[0], pieces[1]))
    return merges


def build_tokenizer(words: Iterable[str], folder: str | Path, max_length: int = 16):
    """Write a ``CLIPTokenizer`` (vocab.json + merges.txt) to ``folder`` and load it back.

    Vocabulary: CLIP's special tokens, every byte alone and word-final (so any text tokenizes, as
    in CLIP: unseen words become several byte tokens rather than an error) and one token per word of
    ``words`` (lower-case ASCII letters).  Padding is ``<|endoftext|>`` as in SD 1.x.
    """
    from transformers import CLIPTokenizer

    words = [str(w).lower() for w in words]
    bad = [w for w in words if not w.isascii() or not w.isalpha()]
    if bad:
        raise ValueError(f"tokenizer words must be ASCII letters, got {bad}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    merges = word_merges(words)
    tokens = [BOS, EOS] + chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer.from_pretrained(str(folder), model_max_length=int(max_length))
    for w in words:  # the construction's guarantee, checked against the real tokenizer
        ids = tok(w, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise RuntimeError(f"tokenizer construction failed: {w!r} -> {tok.convert_ids_to_tokens(ids)}")
    tok.save_pretrained(str(folder))
    return tok


def known_words(tokenizer) -> set[str]:
    """Words that are a single whole-word token of ``tokenizer`` (the trained vocabulary)."""
    out = set()
    for tok in tokenizer.get_vocab():
        if tok.endswith("</w>") and len(tok) > 5 and tok[:-4].isalpha():
            out.add(tok[:-4])
    return out


def check_prompts(tokenizer, prompts: Iterable[str], *, warn: bool = True) -> list[str]:
    """Problems with ``prompts`` for this tokenizer, as messages (also issued as warnings): words the
    teacher never saw (they still tokenize, as byte pieces, but mean nothing to it) and prompts longer
    than ``model_max_length`` (the pipeline truncates them, as SD does)."""
    vocab = known_words(tokenizer)
    limit = int(tokenizer.model_max_length)
    problems = []
    for p in prompts:
        words = str(p).lower().replace(".", " ").replace(",", " ").split()
        unknown = sorted({w for w in words if len(w) > 1 and w not in vocab})
        if unknown:
            problems.append(f"prompt {p!r}: word(s) {', '.join(unknown)} are not in the teacher's vocabulary "
                            f"({len(vocab)} words); they tokenize as byte pieces the model never trained on")
        n = len(tokenizer(str(p))["input_ids"])
        if n > limit:
            problems.append(f"prompt {p!r} is {n} tokens, longer than the tokenizer's limit of {limit}; "
                            "it is truncated")
    if warn:
        for m in problems:
            warnings.warn(m, stacklevel=2)
    return problems


# ---------------------------------------------------------------------------------------------
# models


def build_vae(spec: VAESpec, sample_size: int = 32):
    from diffusers import AutoencoderKL

    n = len(spec.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(spec.block_out_channels),
        layers_per_block=spec.layers_per_block,
        latent_channels=spec.latent_channels,
        norm_num_groups=spec.norm_num_groups,
        sample_size=sample_size,
    )


def build_text_encoder(spec: TextSpec, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_attention_heads=spec.num_heads,
        num_hidden_layers=spec.num_layers,
        max_position_embeddings=int(tokenizer.model_max_length),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=spec.projection_dim,
        hidden_act="quick_gelu",
    )
    return CLIPTextModel(config)


def build_unet(spec: UNetSpec, cross_attention_dim: int, latent_channels: int = 4, sample_size: int = 8):
    from diffusers import UNet2DConditionModel

    n = len(spec.block_out_channels)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=tuple(spec.block_out_channels),
        layers_per_block=spec.layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=spec.attention_head_dim,
        norm_num_groups=spec.norm_num_groups,
    )


def build_scheduler():
    """SD 1.5's schedule as a DDIMScheduler (steps_offset=1, set_alpha_to_one=False)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SD15_SCHEDULE)


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "SD15_SCHEDULE",
    "DataSpec",
    "T2ITeacherSpec",
    "TextSpec",
    "UNetSpec",
    "VAESpec",
    "build_scheduler",
    "build_text_encoder",
    "build_tokenizer",
    "build_unet",
    "build_vae",
    "check_prompts",
    "known_words",
    "part_keys",
    "spec_from_params",
    "word_merges",
]
