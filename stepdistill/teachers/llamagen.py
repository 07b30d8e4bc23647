"""LlamaGen as an autoregressive teacher (Sun et al. 2024, github.com/FoundationVision/LlamaGen): the
teacher Distilled Decoding reports on (LlamaGen-L, 256 KV-cached steps, FID 4.11 -> DD 1 step 11.35).

A LlamaGen teacher *is* an :class:`~stepdistill.teachers.autoregressive.ARTeacher` -- same contract,
same pipeline folder (``ARImagePipeline``), same sampling code -- with two LlamaGen components:

* ``transformer``: :class:`~stepdistill.pipelines.llamagen_gpt.LlamaGenGPT`, LlamaGen's GPT (class
  prefix token with CFG null row, 2-D RoPE with interleaved pairs and a zero-rotated class
  position, RMSNorm, SwiGLU, KV cache).  Its input vocabulary is the ARTeacher layout (codes,
  ``V + c`` classes, ``V + num_classes`` null), so ``ar_generate`` (CFG as a doubled batch, then
  temperature, top-k, top-p -- LlamaGen's order) and Distilled Decoding's student use it unchanged;
* ``vqvae``: LlamaGen's VQ tokenizer (VQ-16: ``ch=128``, ``ch_mult=[1, 1, 2, 2, 4]``, 2 res blocks
  per level (3 in the decoder), attention blocks at the lowest resolution (2 in the encoder, 3 in
  the decoder) and in both mid blocks, ``z_channels=256``, 16384 x 8 codebook) expressed exactly as a
  stock diffusers ``VQModel`` (``AttnDownEncoderBlock2D`` / ``AttnUpDecoderBlock2D`` for that level;
  the blocks compute the same functions as LlamaGen's ``ResnetBlock`` / ``AttnBlock`` /
  ``Downsample`` (pad right/bottom, stride-2 conv) / ``Upsample`` (nearest, conv)).  The codebook is
  stored **L2-normalised**, which is what LlamaGen's decoder consumes; with unit codes the plain
  nearest-code lookup (``ARTeacher.encode``) equals LlamaGen's normalised lookup, since
  ``argmin ||z - c||`` over unit ``c`` is ``argmax <z, c>`` = ``argmin ||z / |z| - c||``.

Deviations from LlamaGen's ``generate`` (all at edges the presets do not use): CFG is applied for any
``guidance_scale != 1`` (LlamaGen only for ``> 1``); top-p keeps a token when the mass of the strictly
better tokens is ``< top_p`` (LlamaGen: ``<= top_p``; differs only at exact ties); ``cfg_interval``
is not supported (LlamaGen's default -1 = off); draws are inverse-CDF from per-image generators, not
``torch.multinomial`` (same distribution).

Official checkpoints convert with :mod:`stepdistill.teachers.convert_llamagen`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..pipelines.llamagen_gpt import COMPONENT_MODULE, LlamaGenGPT

__all__ = [
    "GPT_CONFIGS",
    "LlamaGenVQSpec",
    "LlamaGenGPTSpec",
    "llamagen_ffn_size",
    "build_vq",
    "build_gpt",
    "build_llamagen_teacher",
    "package_components",
    "load_pipeline",
    "l2_quantize_indices",
]

#: LlamaGen's class-conditional GPT sizes (``autoregressive/models/gpt.py``): layers, heads, width
GPT_CONFIGS: dict[str, dict[str, int]] = {
    "GPT-B": {"num_layers": 12, "num_heads": 12, "hidden_size": 768},
    "GPT-L": {"num_layers": 24, "num_heads": 16, "hidden_size": 1024},
    "GPT-XL": {"num_layers": 36, "num_heads": 20, "hidden_size": 1280},
    "GPT-XXL": {"num_layers": 48, "num_heads": 24, "hidden_size": 1536},
    "GPT-XXXL": {"num_layers": 48, "num_heads": 40, "hidden_size": 2560},
}


def llamagen_ffn_size(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """LlamaGen's SwiGLU width: ``int(2 * 4 * dim / 3)`` (times the multiplier), rounded up to
    ``multiple_of`` (GPT-L: 2816)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return hidden if hidden % multiple_of == 0 else hidden + multiple_of - hidden % multiple_of


@dataclass
class LlamaGenVQSpec:
    """LlamaGen's VQ tokenizer (defaults: VQ-16 at 256 px -> a 16x16 token grid)."""

    image_size: int = 256
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: list = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2  # per encoder level; the decoder has one more
    z_channels: int = 256
    codebook_size: int = 16384
    codebook_embed_dim: int = 8

    @property
    def grid_size(self) -> tuple[int, int]:
        s = self.image_size // 2 ** (len(self.ch_mult) - 1)
        return (s, s)


@dataclass
class LlamaGenGPTSpec:
    """LlamaGen's GPT (defaults: GPT-L over VQ-16 tokens of ImageNet-256)."""

    num_classes: int = 1000
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    num_kv_heads: int | None = None
    intermediate_size: int | None = None  # default llamagen_ffn_size(hidden_size)
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    class_dropout_prob: float = 0.1


def build_vq(spec: LlamaGenVQSpec):
    """A diffusers ``VQModel`` with LlamaGen's VQ architecture (see the module docstring)."""
    from diffusers import VQModel

    if int(spec.ch_mult[0]) != 1:
        raise ValueError(f"LlamaGen's conv_in outputs ch channels; ch_mult must start with 1, got {spec.ch_mult}")
    n = len(spec.ch_mult)
    channels = tuple(int(spec.ch) * int(m) for m in spec.ch_mult)
    if any(c % 32 for c in channels + (int(spec.z_channels),)):
        raise ValueError(f"LlamaGen's GroupNorm has 32 groups; channels {channels} must be multiples of 32")
    return VQModel(
        in_channels=spec.in_channels,
        out_channels=spec.out_channels,
        down_block_types=("DownEncoderBlock2D",) * (n - 1) + ("AttnDownEncoderBlock2D",),
        up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * (n - 1),
        block_out_channels=channels,
        layers_per_block=int(spec.num_res_blocks),
        act_fn="silu",
        latent_channels=int(spec.z_channels),
        sample_size=int(spec.image_size),
        num_vq_embeddings=int(spec.codebook_size),
        norm_num_groups=32,
        vq_embed_dim=int(spec.codebook_embed_dim),
        scaling_factor=1.0,
        mid_block_add_attention=True,
    )


def build_gpt(spec: LlamaGenGPTSpec, codebook_size: int, grid_size: tuple[int, int]) -> LlamaGenGPT:
    return LlamaGenGPT(
        codebook_size=int(codebook_size),
        num_classes=int(spec.num_classes),
        hidden_size=int(spec.hidden_size),
        num_layers=int(spec.num_layers),
        num_heads=int(spec.num_heads),
        num_kv_heads=spec.num_kv_heads,
        intermediate_size=int(spec.intermediate_size or llamagen_ffn_size(spec.hidden_size)),
        grid_size=[int(g) for g in grid_size],
        rope_base=float(spec.rope_base),
        norm_eps=float(spec.norm_eps),
        class_dropout_prob=float(spec.class_dropout_prob),
    )


def build_llamagen_teacher(vqvae, transformer: LlamaGenGPT, guidance_scale: float = 2.0, temperature: float = 1.0,
                           top_k: int = 8000, top_p: float = 1.0):
    """An :class:`ARTeacher` over a LlamaGen VQ + GPT (defaults: DD1's LlamaGen sampling, CFG 2.0,
    top-k 8000); frozen, in eval mode."""
    from .autoregressive import ARTeacher

    cfg = transformer.config
    if int(vqvae.quantize.embedding.weight.shape[0]) != int(cfg.codebook_size):
        raise ValueError(
            f"the GPT predicts {cfg.codebook_size} codes but the tokenizer has "
            f"{vqvae.quantize.embedding.weight.shape[0]}"
        )
    teacher = ARTeacher(vqvae, transformer, num_classes=int(cfg.num_classes), grid_size=tuple(cfg.grid_size),
                        guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p)
    return teacher.eval().requires_grad_(False)


def package_components(folder: str | Path) -> dict[str, str]:
    """``{component: class name}`` of a pipeline folder's components that are this package's own
    model classes written beside the weights (``{"transformer": "LlamaGenGPT"}`` for LlamaGen)."""
    index_file = Path(folder) / "model_index.json"
    if not index_file.is_file():
        return {}
    index = json.loads(index_file.read_text(encoding="utf-8"))
    return {name: entry[1] for name, entry in index.items()
            if isinstance(entry, list) and list(entry) == [COMPONENT_MODULE, LlamaGenGPT.__name__]}


def load_pipeline(pipeline_cls, folder: str | Path, **kwargs):
    """``pipeline_cls.from_pretrained(folder)``, also for folders with a LlamaGen GPT component.

    Exports write ``llamagen_gpt.py`` beside the GPT's weights so that plain diffusers loads the folder
    with ``trust_remote_code=True``.  Inside stepdistill no folder code runs: the GPT is loaded with
    the installed :class:`LlamaGenGPT`, the other components with their diffusers / transformers
    classes, and the pipeline is built from the folder's ``model_index.json``."""
    import importlib
    import inspect

    folder = Path(folder)
    ours = package_components(folder)
    if not ours:
        return pipeline_cls.from_pretrained(str(folder), **kwargs)
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    components = {}
    for name, entry in index.items():
        is_component = isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)
        if name.startswith("_") or not is_component or not (folder / name).is_dir():
            continue
        if name in ours:
            components[name] = LlamaGenGPT.from_pretrained(str(folder / name))
        elif entry[0] in ("diffusers", "transformers"):
            cls = getattr(importlib.import_module(entry[0]), entry[1])
            components[name] = cls.from_pretrained(str(folder / name))
        else:
            raise ValueError(f"{folder}: component {name!r} is {entry}; only diffusers / transformers / LlamaGen load here")
    params = inspect.signature(pipeline_cls.__init__).parameters
    config = {k: v for k, v in index.items() if k in params and k not in components}
    pipe = pipeline_cls(**components, **config, **kwargs)
    pipe.register_to_config(_name_or_path=str(folder))  # where a DD continuous head is read from
    return pipe


@torch.no_grad()
def l2_quantize_indices(vqvae, x: Tensor) -> Tensor:
    """LlamaGen's lookup: nearest L2-normalised code to the L2-normalised encoder output, (B, h*w)."""
    z = vqvae.encode(x).latents
    b, d, h, w = z.shape
    flat = torch.nn.functional.normalize(z.permute(0, 2, 3, 1).reshape(-1, d), dim=-1)
    codes = torch.nn.functional.normalize(vqvae.quantize.embedding.weight, dim=-1)
    return torch.cdist(flat, codes).argmin(-1).reshape(b, h * w)
