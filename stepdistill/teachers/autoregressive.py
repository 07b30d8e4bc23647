"""Autoregressive image teacher: VQ tokenizer (diffusers ``VQModel``) + causal LM (transformers
``LlamaForCausalLM``), LlamaGen-style class-conditional, raster token order.

The AR teacher contract (DESIGN.md §3; research spec §2.8) -- what Distilled Decoding needs:

* ``codebook`` -- the (V, d) embedding table exactly as the decoder consumes it
  (``vqvae.quantize.embedding.weight``); ``decode(tokens) -> image in [-1, 1]``;
  ``encode(images) -> tokens``;
* ``logits(tokens_so_far, cond, guidance_scale, temperature, top_k, top_p) -> (B, V)`` next-token
  logits over the codebook with classifier-free guidance and the sampling filters applied
  (``softmax`` of them is the distribution the teacher samples from; filtered codes are ``-inf``);
* ``generate(labels, choose)`` -- KV-cached raster decoding where ``choose(i, logits)`` picks each
  token (a random draw for ``sample``; the closed-form flow map for Distilled Decoding's pairs);
* ``token_order = "raster"`` over ``grid_size = (h, w)``; ``num_tokens = h * w``; the valid DD
  split points are ``0 .. num_tokens - 1``;
* weight access for student initialisation: ``transformer`` (the LM), its vocabulary layout
  (``class_token(c) = V + c``, ``null_token = V + num_classes``);
* ``sample(n, class_labels, generator, ...)``, ``from_pretrained(folder)`` (an ``ARImagePipeline``
  folder), ``save_pretrained(folder)``.

The sampling maths (CFG on logits, then temperature, top-k, top-p; inverse-CDF draws from
per-image generators; KV-cached decoding) is *imported from* ``stepdistill.pipelines.ar_image``,
the self-contained pipeline file, so the training-time teacher and the exported pipeline are the
same code.

Training (``run_ar_teacher_training`` in ``stepdistill/run.py``) is two single-group training tasks
under the generic trainer, defined in :mod:`stepdistill.training.tasks` (this module only defines
the models): ``VQTraining`` (VQ-VAE loss: reconstruction + codebook/commitment, dead-code restarts)
and then ``ARLMTraining`` (next-token cross-entropy over the codebook on the tokenised data, class
prefix dropped to the null class with probability ``cond_dropout``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..pipelines.ar_image import (
    ar_generate,
    cfg_logits,
    decode_tokens,
    draw_uniforms,
    filter_logits,
    sample_tokens,
)

__all__ = [
    "VQSpec",
    "LMSpec",
    "VQTrainSpec",
    "ARTeacherSpec",
    "build_vqvae",
    "build_transformer",
    "ARTeacher",
]


# ---------------------------------------------------------------------------------------------
# architecture specs (teacher.params of configs/digits-ar/teacher.yaml)


@dataclass
class VQSpec:
    """A tiny diffusers ``VQModel``: ``len(block_out_channels) - 1`` down-samplings by 2."""

    sample_size: int = 8
    in_channels: int = 1
    block_out_channels: list = field(default_factory=lambda: [32, 64])  # 8x8 -> 4x4 token grid
    layers_per_block: int = 1
    latent_channels: int = 16
    vq_embed_dim: int = 4  # d: the codebook-embedding space Distilled Decoding's flow lives in
    num_vq_embeddings: int = 32  # V
    norm_num_groups: int = 8
    mid_block_attention: bool = False


@dataclass
class LMSpec:
    """A tiny ``LlamaForCausalLM`` over ``V + num_classes + 1`` tokens."""

    hidden_size: int = 96
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int = 256
    rope_theta: float = 10000.0
    cond_dropout: float = 0.1  # class prefix -> null class, for classifier-free guidance


@dataclass
class VQTrainSpec:
    """Tokenizer stage of teacher training (the LM stage uses the run's ``train`` section)."""

    max_steps: int = 1500
    batch_size: int = 64
    lr: float = 0.002
    commitment_weight: float = 1.0
    restart_every_steps: int = 25  # dead-code restart period (0 disables)
    restart_until_steps: int = 1000  # no restarts after this step (lets the codebook settle)


@dataclass
class ARTeacherSpec:
    num_classes: int = 10
    vq: VQSpec = field(default_factory=VQSpec)
    lm: LMSpec = field(default_factory=LMSpec)
    vq_train: VQTrainSpec = field(default_factory=VQTrainSpec)
    # default sampling settings written into the exported pipeline (CFG: teacher.guidance_scale)
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


def build_vqvae(spec: VQSpec):
    from diffusers import VQModel

    n = len(spec.block_out_channels)
    return VQModel(
        in_channels=spec.in_channels,
        out_channels=spec.in_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(spec.block_out_channels),
        layers_per_block=spec.layers_per_block,
        latent_channels=spec.latent_channels,
        sample_size=spec.sample_size,
        num_vq_embeddings=spec.num_vq_embeddings,
        norm_num_groups=spec.norm_num_groups,
        vq_embed_dim=spec.vq_embed_dim,
        scaling_factor=1.0,
        mid_block_add_attention=spec.mid_block_attention,
    )


def build_transformer(spec: LMSpec, codebook_size: int, num_classes: int, num_tokens: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=codebook_size + num_classes + 1,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=max(64, num_tokens + 1),
        rope_theta=spec.rope_theta,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config)


def grid_of(vqvae) -> tuple[int, int]:
    down = 2 ** (len(vqvae.config.block_out_channels) - 1)
    s = vqvae.config.sample_size
    h, w = (s, s) if isinstance(s, int) else tuple(s)
    return int(h) // down, int(w) // down


def module_digest(*modules: nn.Module) -> str:
    """sha256 over every parameter and buffer (names, shapes, dtypes, bytes) of ``modules``."""
    h = hashlib.sha256()
    for m in modules:
        for name, t in sorted(m.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# the teacher


class ARTeacher(nn.Module):
    """Frozen AR image teacher (see the module docstring for the contract).

    Args:
        vqvae: diffusers ``VQModel``; its codebook is ``quantize.embedding.weight``.
        transformer: ``LlamaForCausalLM`` over ``V + num_classes + 1`` tokens.
        num_classes: real classes; ``num_classes`` itself is the null class.
        grid_size: token grid (h, w); default from the VQ's down-sampling.
        guidance_scale, temperature, top_k, top_p: default sampling settings (the distribution the
            teacher -- and Distilled Decoding's pair set -- represents).
    """

    kind: ClassVar[str] = "ar"
    token_order: ClassVar[str] = "raster"

    def __init__(
        self,
        vqvae: nn.Module,
        transformer: nn.Module,
        num_classes: int = 10,
        grid_size: tuple[int, int] | None = None,
        guidance_scale: float = 1.0,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
    ):
        super().__init__()
        self.vqvae = vqvae
        self.transformer = transformer
        self.num_classes = int(num_classes)
        self.grid_size = tuple(int(g) for g in (grid_size or grid_of(vqvae)))
        self.guidance_scale = float(guidance_scale)
        self.temperature = float(temperature)
        self.top_k = int(top_k or 0)
        self.top_p = float(top_p if top_p is not None else 1.0)
        vocab = transformer.config.vocab_size
        if vocab < self.codebook_size + self.num_classes + 1:
            raise ValueError(
                f"the LM vocabulary ({vocab}) must hold codebook ({self.codebook_size}) + classes "
                f"({self.num_classes}) + null class"
            )

    # -- layout ---------------------------------------------------------------------------------
    @property
    def codebook(self) -> Tensor:
        """(V, d) codebook embeddings, exactly as the decoder consumes them."""
        return self.vqvae.quantize.embedding.weight

    @property
    def codebook_size(self) -> int:
        return int(self.vqvae.quantize.embedding.weight.shape[0])

    @property
    def embed_dim(self) -> int:
        return int(self.vqvae.quantize.embedding.weight.shape[1])

    @property
    def num_tokens(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def null_token(self) -> int:
        return self.codebook_size + self.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        s = self.vqvae.config.sample_size
        h, w = (s, s) if isinstance(s, int) else tuple(s)
        return (int(self.vqvae.config.in_channels), int(h), int(w))

    @property
    def device(self) -> torch.device:
        return self.codebook.device

    def class_token(self, labels: Tensor) -> Tensor:
        """LM prefix token of each class id (``num_classes`` -> the null token)."""
        return labels.long().to(self.device) + self.codebook_size

    def settings(self, **overrides: Any) -> dict:
        """Sampling settings: the teacher's defaults with the non-``None`` ``overrides`` applied."""
        out = {
            "guidance_scale": self.guidance_scale,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
        }
        out.update({k: v for k, v in overrides.items() if v is not None})
        return out

    # -- conditions (same names as the diffusion teachers) ----------------------------------------
    def encode_conditions(self, raw) -> Tensor:
        labels = torch.as_tensor(raw, dtype=torch.long).reshape(-1)
        if labels.numel() and (labels.min() < 0 or labels.max() > self.num_classes):
            raise ValueError(f"class ids must lie in [0, {self.num_classes}], got {labels.tolist()}")
        return labels.to(self.device)

    def random_raw_conditions(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.randint(0, self.num_classes, (n,), generator=generator, device="cpu")  # host data

    # -- logits -----------------------------------------------------------------------------------
    def forward_logits(self, tokens: Tensor, labels: Tensor) -> Tensor:
        """Teacher-forced raw codebook logits: (B, L + 1, V) for the sequence ``[class, tokens]``;
        position ``i`` holds the (unguided, unfiltered) logits of token ``i``."""
        ids = torch.cat([self.class_token(labels).reshape(-1, 1), tokens.long().to(self.device)], 1)
        out = self.transformer(input_ids=ids, use_cache=False)
        return out.logits[..., : self.codebook_size]

    def logits(
        self,
        tokens_so_far: Tensor,
        cond: Tensor,
        guidance_scale: float | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
    ) -> Tensor:
        """Next-token logits (B, V) after ``tokens_so_far`` (B, i), with CFG and filtering applied
        (``softmax`` = sampling distribution; filtered codes are ``-inf``).  Recomputes the whole
        prefix (no cache); :meth:`generate` is the cached path."""
        s = self.settings(guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p)
        labels = self.encode_conditions(cond)
        b = labels.shape[0]
        tokens_so_far = tokens_so_far.reshape(b, -1)
        if s["guidance_scale"] != 1.0:
            both = self.forward_logits(
                torch.cat([tokens_so_far, tokens_so_far], 0),
                torch.cat([labels, torch.full_like(labels, self.num_classes)], 0),
            )[:, -1].float()
            logits = cfg_logits(both[:b], both[b:], s["guidance_scale"])
        else:
            logits = self.forward_logits(tokens_so_far, labels)[:, -1].float()
        return filter_logits(logits, s["temperature"], s["top_k"], s["top_p"])

    def probs(self, tokens_so_far: Tensor, cond: Tensor, **settings: Any) -> Tensor:
        return torch.softmax(self.logits(tokens_so_far, cond, **settings), -1)

    # -- sampling -----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, labels: Tensor, choose, **settings: Any) -> Tensor:
        """KV-cached raster decoding; ``choose(i, logits (B, V)) -> tokens (B,)``."""
        s = self.settings(**settings)
        labels = self.encode_conditions(labels)
        return ar_generate(
            self.transformer,
            self.class_token(labels),
            self.num_tokens,
            self.codebook_size,
            choose,
            null_token=self.null_token,
            guidance_scale=s["guidance_scale"],
            temperature=s["temperature"],
            top_k=s["top_k"],
            top_p=s["top_p"],
        )

    @torch.no_grad()
    def sample(
        self,
        n: int | None = None,
        class_labels: Tensor | list[int] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        decode: bool = False,
        **settings: Any,
    ) -> Tensor:
        """Ordinary AR sampling: tokens (B, n_tokens), or images in [-1, 1] with ``decode=True``.

        ``class_labels`` default: ``0, 1, 2, ...`` (``n`` of them).  ``generator`` may be a list (one
        per image, batch-independent draws), as in ``ARImagePipeline``."""
        if class_labels is None:
            if n is None:
                raise ValueError("give n or class_labels")
            class_labels = torch.arange(n) % self.num_classes
        labels = self.encode_conditions(class_labels)
        b = labels.shape[0]

        def choose(i, logits):
            return sample_tokens(logits, draw_uniforms(generator, b, logits.device))

        tokens = self.generate(labels, choose, **settings)
        return self.decode(tokens) if decode else tokens

    # -- tokenizer ----------------------------------------------------------------------------------
    def decode(self, tokens: Tensor) -> Tensor:
        """Token indices (B, n) in raster order -> images (B, C, H, W) clamped to [-1, 1]."""
        return decode_tokens(self.vqvae, tokens.to(self.device), self.grid_size).clamp(-1, 1)

    def decode_embeddings(self, codes: Tensor) -> Tensor:
        """Codebook vectors (B, n, d) -> images in [-1, 1] (no re-quantisation)."""
        h, w = self.grid_size
        quant = codes.reshape(codes.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()
        return self.vqvae.decode(quant, force_not_quantize=True, return_dict=False)[0].clamp(-1, 1)

    @torch.no_grad()
    def encode(self, images: Tensor, batch_size: int = 512) -> Tensor:
        """Images in [-1, 1] (B, C, H, W) -> token indices (B, n) in raster order."""
        out = []
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size].to(self.device)
            out.append(quantize_indices(self.vqvae, x))
        return torch.cat(out)

    # -- io -----------------------------------------------------------------------------------------
    def digest(self) -> str:
        """sha256 of the tokenizer and LM weights (keys Distilled Decoding's pair sets)."""
        return module_digest(self.vqvae, self.transformer)

    def to_pipeline(self):
        from ..pipelines.ar_image import ARImagePipeline

        return ARImagePipeline(
            vqvae=self.vqvae,
            transformer=self.transformer,
            num_classes=self.num_classes,
            codebook_size=self.codebook_size,
            grid_size=list(self.grid_size),
            guidance_scale=self.guidance_scale,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
        )

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write an ``ARImagePipeline`` folder (self-contained, ``trust_remote_code`` loadable)."""
        self.to_pipeline().save_pretrained(str(folder), safe_serialization=True)
        return Path(folder)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, dtype: torch.dtype = torch.float32, **settings: Any
    ) -> ARTeacher:
        """Load an ``ARImagePipeline`` folder; ``settings`` override its sampling defaults
        (``guidance_scale``, ``temperature``, ``top_k``, ``top_p``)."""
        from ..pipelines.ar_image import ARImagePipeline
        from .llamagen import load_pipeline

        # = ARImagePipeline.from_pretrained(folder); a LlamaGen GPT loads with the installed class
        pipe = load_pipeline(ARImagePipeline, folder)
        cfg = pipe.config
        defaults = {
            "guidance_scale": cfg.guidance_scale,
            "temperature": cfg.temperature,
            "top_k": cfg.top_k,
            "top_p": cfg.top_p,
        }
        defaults.update({k: v for k, v in settings.items() if v is not None})
        vqvae, transformer = pipe.vqvae, pipe.transformer
        if dtype != torch.float32:
            vqvae, transformer = vqvae.to(dtype), transformer.to(dtype)
        teacher = cls(
            vqvae,
            transformer,
            num_classes=cfg.num_classes,
            grid_size=tuple(cfg.grid_size),
            **defaults,
        )
        teacher.path = str(folder)
        return teacher.eval().requires_grad_(False)


def quantize_indices(vqvae, x: Tensor) -> Tensor:
    """Nearest-code indices (B, h*w) of the encoder output of images ``x``."""
    z = vqvae.encode(x).latents  # (B, d, h, w), after quant_conv
    b, d, h, w = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, d)
    idx = torch.cdist(flat, vqvae.quantize.embedding.weight).argmin(-1)
    return idx.reshape(b, h * w)
