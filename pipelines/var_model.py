"""VAR (Tian et al., NeurIPS 2024, "Visual Autoregressive Modeling: Scalable Image Generation via
Next-Scale Prediction", github.com/FoundationVision/VAR) as diffusers models, with Distilled Decoding
over scales (Liu et al., ICLR 2025; github.com/microsoft/distilled_decoding ``VAR/models/dd.py``).

Self-contained on purpose: this file imports only torch, numpy, PIL and diffusers.  Exports write it
beside the weights (the folder root and each component folder) and plain diffusers loads the folder
(``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``).

Written from the official formulas (``models/vqvae.py``, ``basic_vae.py``, ``quant.py``, ``var.py``,
``basic_var.py``, ``helpers.py``); parameter names are the official ones so that converted
checkpoints (``stepdistill.teachers.convert_var``) map one to one, except the phi convolutions
(``quantize.phi.<k>``, one list whatever the official sharing mode).  Tested against an independent
re-implementation of the official forward in ``tests/test_var.py``.

Multi-scale VQVAE (:class:`VARVQVAE`)
    The VQGAN-style encoder / decoder (``ch``, ``ch_mult``, ``num_res_blocks``, self-attention at the
    lowest resolution and in the mid blocks, GroupNorm(32, eps 1e-6), swish), ``quant_conv`` /
    ``post_quant_conv`` (3x3), and the residual quantiser over scales ``v_patch_nums`` (VAR: 1, 2, 3,
    4, 5, 6, 8, 10, 13, 16): ``f_rest = f``; for each scale ``k`` the area-downsampled residual is
    snapped to the nearest of ``vocab_size`` codes (dimension ``Cvae = z_channels``), their embeddings
    are bicubic-upsampled to the last scale (not at the last scale itself), passed through a phi
    convolution ``phi(h) = (1 - r) h + r conv3x3(h)`` (``r = quant_resi``, 0.5) and accumulated:
    ``f_hat += phi(h)``, ``f_rest -= phi(h)``.  ``share_quant_resi = K`` phi convs are shared over the
    scales by the tick rule (scale ``k`` of ``S`` uses the conv whose tick is nearest ``k / (S - 1)``;
    ticks ``linspace(1/(3K), 1 - 1/(3K), K)`` for K = 4, else ``linspace(1/(2K), 1 - 1/(2K), K)``).
    Decoding = ``decoder(post_quant_conv(f_hat))``.

VAR transformer (:class:`VARTransformer`)
    Tokens of all scales in one sequence (``L = sum n_k^2``, raster order per scale); the input of
    scale ``k > 0`` is ``word_embed`` of the area-downsampled running ``f_hat`` (official
    ``idxBl_to_var_input`` / ``get_next_autoregressive_input``); scale 0's input is the class
    embedding + ``pos_start``; every position adds ``lvl_embed[scale] + pos_1LC``.  Blocks: adaLN
    (``ada_lin``: SiLU + Linear(D -> 6C) -> gamma1, gamma2, scale1, scale2, shift1, shift2; or the
    shared variant ``ada_gss + shared_ada_lin(c)``), LayerNorm without affine (eps 1e-6), attention
    with ``q_bias`` / zero k bias / ``v_bias``, optional L2-normalised q, k with a learnt per-head
    scale (``exp(min(scale_mul_1H11, log 100))``, softmax scale 1; else ``0.25 / sqrt(head_dim)``),
    FFN ``fc2(gelu_tanh(fc1 x))``; block-causal mask (a token sees its own and all earlier scales);
    ``AdaLNBeforeHead`` + ``head`` -> logits over the codebook.

Sampling (:func:`var_generate`, official ``autoregressive_infer_cfg``): KV-cached scale by scale;
classifier-free guidance as a doubled batch (null class = ``num_classes``) with the ratio ramped over
the scales, ``logits = (1 + t) cond - t uncond`` with ``t = cfg * k / (S - 1)``; then top-k (drop
logits below the k-th largest), then top-p (drop the ascending-sorted prefix whose cumulative mass is
``<= 1 - top_p``; the most likely code always stays).  ``choose(k, logits (B, n_k^2, V)) -> tokens
(B, n_k^2)`` picks the tokens of scale ``k`` (a random draw for sampling; Distilled Decoding's
per-token flow map for its pairs).  Deviations, at edges the presets do not use: an optional
``temperature`` (VAR has none; 1.0 = VAR) divides the logits before top-k; draws are inverse-CDF
from per-image generators instead of ``torch.multinomial`` (same distribution); no "more_smooth"
gumbel option.

Distilled Decoding over scales (:class:`VARDDStudent`, :func:`var_dd_generate`; DD's ``DD_Model``)
    A copy of the teacher with one extra leading 1x1 "scale": the sequence is ``[sos, x_1..x_L]``
    where ``x_i`` (dimension ``Cvae``, read by the teacher's ``word_embed``) is token ``i``'s noise or,
    for the data scales, its codebook vector (flow space: codebook x ``codebook_scale``); the output
    at ``x_i`` gives token ``i``'s logits.  Attention: a position of scale ``k`` sees the sos, every
    position of the scales before ``k`` and itself (not the other noise of its own scale).  A
    noise/data indicator embedding (``n_d_embed``, 1 = data, the sos counts as data) is added to the
    input, and a per-layer projection of it (``layerwise_n_d_embed[i]``) after each block's attention
    and before the head (``layerwise_n_d_embed[depth]``).  Split points are scale indices ``t``: the
    first ``t`` scales hold data, the rest noise.  Step 1 (``t = 0``): all noise -> argmax tokens of
    every scale in one pass; step 2 (``t = t_2``): the step-1 tokens of the scales ``< t_2`` as data,
    the *same* noise after, the predictions from scale ``t_2`` on replace step 1's.  Tokens are
    decoded through ``f_hat`` like the teacher's.  Continuous head (DD's ``final_layer_conti``, on with
    config ``split_t``, a scale index like DD's ``loss_split_t``): a PixArt-style final layer on the
    last block's output plus the last indicator projection -- ``LayerNorm`` without affine, then
    ``h * (1 + scale) + shift`` with ``(shift, scale) = scale_shift_table + class embedding``, then
    ``Linear(C -> Cvae)`` (zero at init) -- predicting each token's flow-space vector.  Predicted
    scales ``< split_t`` take the argmax code, scales ``>= split_t`` the head's vectors; the image is
    decoded from the vectors (divided back by ``codebook_scale``, not snapped to the codebook;
    ``output_type="tokens"`` reports the nearest codes there).
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from PIL import Image
from torch import nn

__all__ = [
    "COMPONENT_MODULE",
    "VARVQVAE",
    "VARTransformer",
    "VARDDStudent",
    "VARKVCache",
    "VARPipeline",
    "VARDDPipeline",
    "scale_layout",
    "phi_ticks",
    "var_filter_logits",
    "var_sample_tokens",
    "var_draw_uniforms",
    "var_generate",
    "var_dd_generate",
    "var_dd_inputs",
    "var_dd_predict",
    "var_nearest_codes",
]

#: the file name (without ``.py``) this module is written to beside exported weights
COMPONENT_MODULE = "var_model"

VAR_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def scale_layout(patch_nums) -> list[tuple[int, int, int]]:
    """``[(begin, end, n_k), ...]``: the flat token range of each scale (n_k x n_k, raster order)."""
    out, cur = [], 0
    for pn in patch_nums:
        out.append((cur, cur + int(pn) ** 2, int(pn)))
        cur += int(pn) ** 2
    return out


def phi_ticks(k: int) -> np.ndarray:
    """VAR's ticks of ``k`` shared phi convolutions over the scale position ``si / (S - 1)``."""
    return np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)


# =============================================================================================
# the multi-scale VQVAE


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class _ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2 = _norm(cout, groups)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1, 1, 0) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class _AttnBlock(nn.Module):
    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = _norm(c, groups)
        self.qkv = nn.Conv2d(c, 3 * c, 1, 1, 0)
        self.proj_out = nn.Conv2d(c, c, 1, 1, 0)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)  # (B, C, HW) each
        attn = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * c ** (-0.5), dim=-1)
        out = torch.einsum("bij,bcj->bci", attn, v).reshape(b, c, h, w)
        return x + self.proj_out(out)


class _Down(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class _Up(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Level(nn.Module):
    """One resolution: ``block`` (res blocks), ``attn`` (attention after each, lowest level only)."""

    def __init__(self):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class _Mid(nn.Module):
    def __init__(self, c: int, groups: int, attn: bool, dropout: float):
        super().__init__()
        self.block_1 = _ResnetBlock(c, c, groups, dropout)
        self.attn_1 = _AttnBlock(c, groups) if attn else nn.Identity()
        self.block_2 = _ResnetBlock(c, c, groups, dropout)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class _Encoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, in_channels, z_channels, using_sa, using_mid_sa, groups, dropout):
        super().__init__()
        n = len(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        in_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for i in range(n):
            level = _Level()
            block_in, block_out = ch * in_mult[i], ch * ch_mult[i]
            for _ in range(num_res_blocks):
                level.block.append(_ResnetBlock(block_in, block_out, groups, dropout))
                block_in = block_out
                if i == n - 1 and using_sa:
                    level.attn.append(_AttnBlock(block_in, groups))
            if i != n - 1:
                level.downsample = _Down(block_in)
            self.down.append(level)
        self.mid = _Mid(block_in, groups, using_mid_sa, dropout)
        self.norm_out = _norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != len(self.down) - 1:
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class _Decoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, in_channels, z_channels, using_sa, using_mid_sa, groups, dropout):
        super().__init__()
        n = len(ch_mult)
        block_in = ch * ch_mult[n - 1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = _Mid(block_in, groups, using_mid_sa, dropout)
        levels = []
        for i in reversed(range(n)):
            level = _Level()
            block_out = ch * ch_mult[i]
            for _ in range(num_res_blocks + 1):
                level.block.append(_ResnetBlock(block_in, block_out, groups, dropout))
                block_in = block_out
                if i == n - 1 and using_sa:
                    level.attn.append(_AttnBlock(block_in, groups))
            if i != 0:
                level.upsample = _Up(block_in)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, in_channels, 3, 1, 1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class _Phi(nn.Conv2d):
    def __init__(self, c: int, ratio: float):
        super().__init__(c, c, 3, 1, 1)
        self.ratio = abs(float(ratio))

    def forward(self, h):
        return h * (1 - self.ratio) + super().forward(h) * self.ratio


class MultiScaleQuantizer(nn.Module):
    """VAR's ``VectorQuantizer2`` at inference: codebook ``embedding`` (V, Cvae) and the phi list."""

    def __init__(self, vocab_size, cvae, v_patch_nums, quant_resi, num_phi, using_znorm):
        super().__init__()
        self.vocab_size, self.Cvae = int(vocab_size), int(cvae)
        self.v_patch_nums = tuple(int(p) for p in v_patch_nums)
        self.using_znorm = bool(using_znorm)
        self.embedding = nn.Embedding(self.vocab_size, self.Cvae)
        self.identity_phi = abs(float(quant_resi)) <= 1e-6
        self.phi = nn.ModuleList([] if self.identity_phi else [_Phi(cvae, quant_resi) for _ in range(int(num_phi))])
        self.ticks = phi_ticks(int(num_phi))

    def phi_at(self, si: int):
        """The phi convolution of scale ``si`` (VAR's ``quant_resi[si / (S - 1)]``)."""
        if self.identity_phi:
            return nn.Identity()
        at = si / (len(self.v_patch_nums) - 1)
        return self.phi[int(np.argmin(np.abs(self.ticks - at)))]

    def nearest(self, z_nc: torch.Tensor) -> torch.Tensor:
        w = self.embedding.weight
        if self.using_znorm:
            return torch.argmax(F.normalize(z_nc, dim=-1) @ F.normalize(w.T, dim=0), dim=1)
        d = z_nc.square().sum(1, keepdim=True) + w.square().sum(1) - 2 * z_nc @ w.T
        return torch.argmin(d, dim=1)

    def f_to_idxBl_or_fhat(self, f: torch.Tensor, to_fhat: bool) -> list[torch.Tensor]:
        """Residual quantisation of ``f`` (B, Cvae, H, W): per scale the tokens (B, n_k^2) or the
        running ``f_hat`` (B, Cvae, H, W)."""
        b, c, h, w = f.shape
        if (self.v_patch_nums[-1],) * 2 != (h, w):
            raise ValueError(f"the last scale {self.v_patch_nums[-1]} must equal the feature size {(h, w)}")
        f_rest = f.detach().clone()
        f_hat = torch.zeros_like(f_rest)
        out = []
        last = len(self.v_patch_nums) - 1
        for si, pn in enumerate(self.v_patch_nums):
            z = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != last else f_rest
            idx = self.nearest(z.permute(0, 2, 3, 1).reshape(-1, c))
            emb = self.embedding(idx.view(b, pn, pn)).permute(0, 3, 1, 2)
            hh = F.interpolate(emb, size=(h, w), mode="bicubic") if si != last else emb
            hh = self.phi_at(si)(hh.contiguous())
            f_hat = f_hat + hh
            f_rest = f_rest - hh
            out.append(f_hat.clone() if to_fhat else idx.reshape(b, pn * pn))
        return out

    def embed_to_fhat(self, ms_h: list[torch.Tensor]) -> torch.Tensor:
        """``f_hat`` (B, Cvae, H, W) of the per-scale code embeddings ``ms_h`` [(B, Cvae, n_k, n_k)]."""
        hw = self.v_patch_nums[-1]
        f_hat = ms_h[0].new_zeros(ms_h[0].shape[0], self.Cvae, hw, hw, dtype=torch.float32)
        for si in range(len(self.v_patch_nums)):
            f_hat, _ = self.next_autoregressive_input(si, f_hat, ms_h[si])
        return f_hat

    def next_autoregressive_input(self, si: int, f_hat: torch.Tensor, h: torch.Tensor):
        """VAR's ``get_next_autoregressive_input``: add scale ``si``'s embeddings ``h`` (B, Cvae, n, n)
        to ``f_hat``; return ``(f_hat, the next scale's input map)`` (area-downsampled ``f_hat``)."""
        hw = self.v_patch_nums[-1]
        last = len(self.v_patch_nums) - 1
        if si != last:
            f_hat = f_hat + self.phi_at(si)(F.interpolate(h.to(f_hat.dtype), size=(hw, hw), mode="bicubic"))
            pn = self.v_patch_nums[si + 1]
            return f_hat, F.interpolate(f_hat, size=(pn, pn), mode="area")
        f_hat = f_hat + self.phi_at(si)(h.to(f_hat.dtype))
        return f_hat, f_hat

    def idxBl_to_var_input(self, ms_idx: list[torch.Tensor]) -> torch.Tensor | None:
        """Teacher-forcing input (B, L - n_0^2, Cvae): the area-downsampled running ``f_hat`` at each
        scale after the first (VAR's ``idxBl_to_var_input``)."""
        b = ms_idx[0].shape[0]
        hw = self.v_patch_nums[-1]
        f_hat = ms_idx[0].new_zeros(b, self.Cvae, hw, hw, dtype=torch.float32)
        nxt = []
        for si in range(len(self.v_patch_nums) - 1):
            pn = self.v_patch_nums[si]
            h = self.embedding(ms_idx[si]).transpose(1, 2).reshape(b, self.Cvae, pn, pn)
            f_hat, m = self.next_autoregressive_input(si, f_hat, h)
            nxt.append(m.reshape(b, self.Cvae, -1).transpose(1, 2))
        return torch.cat(nxt, 1) if nxt else None


class VARVQVAE(ModelMixin, ConfigMixin):
    r"""VAR's multi-scale VQVAE (``vae_ch160v4096z32``: ``ch=160``, V=4096, Cvae=32, 16x16 last scale
    at 256 px).  See the module docstring; keys are the official ones (``quantize.phi.<k>`` for
    ``quantize.quant_resi``)."""

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 4096,
        z_channels: int = 32,
        ch: int = 160,
        ch_mult: list[int] | None = None,
        num_res_blocks: int = 2,
        in_channels: int = 3,
        dropout: float = 0.0,
        using_sa: bool = True,
        using_mid_sa: bool = True,
        using_znorm: bool = False,
        quant_conv_ks: int = 3,
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
        default_qresi_counts: int = 0,
        v_patch_nums: list[int] | None = None,
        norm_num_groups: int = 32,
        sample_size: int | None = None,
    ):
        super().__init__()
        self.__module__ = COMPONENT_MODULE
        mult = [1, 1, 2, 2, 4] if ch_mult is None else [int(m) for m in ch_mult]
        pns = list(VAR_PATCH_NUMS) if v_patch_nums is None else [int(p) for p in v_patch_nums]
        if len(pns) < 2:
            raise ValueError(f"VAR needs at least 2 scales, got v_patch_nums={pns}")
        size = pns[-1] * 2 ** (len(mult) - 1)
        self.register_to_config(ch_mult=mult, v_patch_nums=pns, sample_size=int(sample_size or size))
        if int(sample_size or size) != size:
            raise ValueError(f"sample_size {sample_size} must be the last scale {pns[-1]} x 2^{len(mult) - 1} = {size}")
        if int(share_quant_resi) == 0:
            num_phi = int(default_qresi_counts) or len(pns)
        else:
            num_phi = int(share_quant_resi)
        args = (int(ch), mult, int(num_res_blocks), int(in_channels), int(z_channels), bool(using_sa),
                bool(using_mid_sa), int(norm_num_groups), float(dropout))
        self.encoder = _Encoder(*args)
        self.decoder = _Decoder(*args)
        self.quantize = MultiScaleQuantizer(vocab_size, z_channels, pns, quant_resi, num_phi, using_znorm)
        ks = int(quant_conv_ks)
        self.quant_conv = nn.Conv2d(z_channels, z_channels, ks, 1, ks // 2)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, ks, 1, ks // 2)

    @property
    def patch_nums(self) -> list[int]:
        return list(self.config.v_patch_nums)

    @property
    def num_tokens(self) -> int:
        return sum(p * p for p in self.patch_nums)

    def img_to_f(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def img_to_idxBl(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.quantize.f_to_idxBl_or_fhat(self.img_to_f(x), to_fhat=False)

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(f_hat.to(self.post_quant_conv.weight.dtype))).clamp(-1, 1)

    def split_tokens(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Flat tokens (B, L) -> per-scale (B, n_k^2)."""
        if tokens.shape[-1] != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} tokens (scales {self.patch_nums}), got {tokens.shape[-1]}")
        return [tokens[:, a:e].long() for a, e, _ in scale_layout(self.patch_nums)]

    def tokens_to_fhat(self, tokens: torch.Tensor) -> torch.Tensor:
        b = tokens.shape[0]
        ms_h = [self.quantize.embedding(t).transpose(1, 2).reshape(b, self.config.z_channels, pn, pn)
                for t, pn in zip(self.split_tokens(tokens), self.patch_nums)]
        return self.quantize.embed_to_fhat(ms_h)

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Flat multi-scale tokens (B, L) -> images (B, C, H, W) in [-1, 1] (via ``f_hat``)."""
        return self.fhat_to_img(self.tokens_to_fhat(tokens))

    def vectors_to_fhat(self, vectors: torch.Tensor) -> torch.Tensor:
        """``f_hat`` of per-token vectors (B, L, Cvae) in codebook space (not snapped to the codebook)."""
        b, n, c = vectors.shape
        if n != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} token vectors (scales {self.patch_nums}), got {n}")
        ms_h = [vectors[:, a:e].float().transpose(1, 2).reshape(b, c, pn, pn)
                for (a, e, pn) in scale_layout(self.patch_nums)]
        return self.quantize.embed_to_fhat(ms_h)

    def decode_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """Per-token vectors (B, L, Cvae) -> images in [-1, 1] (via ``f_hat``)."""
        return self.fhat_to_img(self.vectors_to_fhat(vectors))

    def encode_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> flat multi-scale tokens (B, L)."""
        return torch.cat(self.img_to_idxBl(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the multi-scale quantiser (inference; no losses)."""
        return self.fhat_to_img(self.quantize.f_to_idxBl_or_fhat(self.img_to_f(x), to_fhat=True)[-1])

    def save_pretrained(self, save_directory, *args, **kwargs):
        out = super().save_pretrained(save_directory, *args, **kwargs)
        _copy_this_file(save_directory)
        return out


def _copy_this_file(save_directory) -> None:
    target = os.path.join(save_directory, f"{COMPONENT_MODULE}.py")
    source = os.path.abspath(__file__)
    if os.path.isdir(save_directory) and os.path.abspath(target) != source:
        shutil.copyfile(source, target)


# =============================================================================================
# the VAR transformer


class _SelfAttention(nn.Module):
    def __init__(self, c: int, num_heads: int, attn_l2_norm: bool):
        super().__init__()
        if c % num_heads:
            raise ValueError(f"embed_dim {c} is not divisible by {num_heads} heads")
        self.num_heads, self.head_dim = int(num_heads), c // num_heads
        self.attn_l2_norm = bool(attn_l2_norm)
        if self.attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, self.num_heads, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(c, 3 * c, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(c))
        self.v_bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("zero_k_bias", torch.zeros(c), persistent=False)
        self.proj = nn.Linear(c, c)

    def forward(self, x, attn_mask=None, cache=None, layer: int = 0):
        b, length, c = x.shape
        bias = torch.cat([self.q_bias, self.zero_k_bias.to(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(b, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, L, hd)
        if self.attn_l2_norm:
            mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q = F.normalize(q, dim=-1) * mul
            k = F.normalize(k, dim=-1)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        mask = None if attn_mask is None else attn_mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, length, c))


class _FFN(nn.Module):
    def __init__(self, c: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(c, hidden)
        self.fc2 = nn.Linear(hidden, c)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class _DropPath(nn.Module):
    """Stochastic depth on a residual branch (per sample, rescaled by ``1 / keep``; identity in eval
    or at ``p == 0``).  No parameters: the official key layout is unchanged."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x):
        if self.p <= 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """VAR's per-block stochastic-depth rates: linear from 0 to ``rate`` over the blocks."""
    depth = int(depth)  # plain floats (no tensor: this also runs under torch.device("meta"))
    return [float(rate) * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]


class _AdaLNSelfAttn(nn.Module):
    def __init__(self, c: int, d: int, num_heads: int, mlp_ratio: float, eps: float, shared_aln: bool,
                 attn_l2_norm: bool, drop_path: float = 0.0):
        super().__init__()
        self.drop_path = _DropPath(drop_path)
        self.C = int(c)
        self.attn = _SelfAttention(c, num_heads, attn_l2_norm)
        self.ffn = _FFN(c, round(c * mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(c, eps=eps, elementwise_affine=False)
        self.shared_aln = bool(shared_aln)
        if self.shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, c) / c**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * c))

    def forward(self, x, cond, attn_mask=None, cache=None, layer: int = 0, n_d_emb=None):
        if self.shared_aln:
            g1, g2, s1, s2, b1, b2 = (self.ada_gss + cond).unbind(2)
        else:
            g1, g2, s1, s2, b1, b2 = self.ada_lin(cond).view(-1, 1, 6, self.C).unbind(2)
        x = x + self.drop_path(self.attn(self.ln_wo_grad(x) * (s1 + 1) + b1, attn_mask, cache, layer) * g1)
        if n_d_emb is not None:  # Distilled Decoding's per-layer indicator (DD's basic_var.py)
            x = x + n_d_emb
        return x + self.drop_path(self.ffn(self.ln_wo_grad(x) * (s2 + 1) + b2) * g2)


class _AdaLNBeforeHead(nn.Module):
    def __init__(self, c: int, d: int, eps: float):
        super().__init__()
        self.C = int(c)
        self.ln_wo_grad = nn.LayerNorm(c, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * c))

    def forward(self, x, cond):
        """In float32 (VAR: ``head_nm(h.float(), cond)``), whatever the weights' dtype."""
        lin = self.ada_lin[1]
        scale, shift = self.ada_lin(cond.to(lin.weight.dtype)).float().view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x.float()) * (scale + 1) + shift


class _SharedAdaLin(nn.Linear):
    def forward(self, cond):
        return super().forward(cond).view(-1, 1, 6, self.weight.shape[0] // 6)


class VARKVCache:
    """Per-layer keys / values (B, H, L_so_far, hd), concatenated scale by scale (VAR's cache)."""

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def update(self, layer: int, k, v):
        if layer == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], 2)
            self.values[layer] = torch.cat([self.values[layer], v], 2)
        return self.keys[layer], self.values[layer]

    def get_seq_length(self) -> int:
        return 0 if not self.keys else int(self.keys[0].shape[2])


def block_causal_mask(scale_ids: torch.Tensor, diagonal_only: bool = False) -> torch.Tensor:
    """Additive (1, 1, L, L) mask: 0 where query scale >= key scale (VAR); with ``diagonal_only``,
    0 where query scale > key scale or query == key (DD)."""
    d = scale_ids.view(-1, 1)
    dt = scale_ids.view(1, -1)
    allowed = (d > dt) if diagonal_only else (d >= dt)
    if diagonal_only:
        allowed = allowed | torch.eye(len(scale_ids), dtype=torch.bool, device=scale_ids.device)
    return torch.where(allowed, 0.0, float("-inf")).reshape(1, 1, len(scale_ids), len(scale_ids))


@dataclass
class VAROutput(BaseOutput):
    logits: torch.Tensor


class VARTransformer(ModelMixin, ConfigMixin):
    r"""VAR's class-conditional next-scale transformer (VAR-d16: depth 16, width 1024, 16 heads,
    ``attn_l2_norm``, no shared adaLN).  Keys are the official ones; the buffers ``lvl_1L`` and
    ``attn_bias_for_masking`` are recomputed (not stored)."""

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 4096,
        z_channels: int = 32,
        num_classes: int = 1000,
        depth: int = 16,
        embed_dim: int = 1024,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-6,
        shared_aln: bool = False,
        attn_l2_norm: bool = True,
        cond_drop_rate: float = 0.1,
        patch_nums: list[int] | None = None,
    ):
        super().__init__()
        self.__module__ = COMPONENT_MODULE
        pns = list(VAR_PATCH_NUMS) if patch_nums is None else [int(p) for p in patch_nums]
        self.register_to_config(patch_nums=pns)
        c = int(embed_dim)
        self.C = self.D = c
        self.V, self.Cvae = int(vocab_size), int(z_channels)
        self.num_classes = int(num_classes)
        self.patch_nums = pns
        self.L = sum(p * p for p in pns)
        self.first_l = pns[0] ** 2
        init_std = math.sqrt(1 / c / 3)
        self.word_embed = nn.Linear(self.Cvae, c)
        self.class_emb = nn.Embedding(self.num_classes + 1, c)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, c))
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, c))
        self.lvl_embed = nn.Embedding(len(pns), c)
        for t in (self.class_emb.weight, self.pos_start, self.pos_1LC, self.lvl_embed.weight):
            nn.init.trunc_normal_(t.data, std=init_std)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), _SharedAdaLin(c, 6 * c)) if shared_aln else nn.Identity()
        self.blocks = nn.ModuleList(
            _AdaLNSelfAttn(c, c, num_heads, mlp_ratio, norm_eps, shared_aln, attn_l2_norm) for _ in range(depth)
        )
        self.head_nm = _AdaLNBeforeHead(c, c, norm_eps)
        self.head = nn.Linear(c, self.V)
        ids = torch.cat([torch.full((p * p,), i) for i, p in enumerate(pns)])
        self.register_buffer("lvl_1L", ids.view(1, -1), persistent=False)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def attn_bias(self) -> torch.Tensor:
        return block_causal_mask(self.lvl_1L[0])

    def lvl_pos(self) -> torch.Tensor:
        """(1, L, C): ``lvl_embed[scale] + pos_1LC``."""
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def ada_cond(self, cond_bd: torch.Tensor) -> torch.Tensor:
        return self.shared_ada_lin(cond_bd)

    def get_logits(self, h: torch.Tensor, cond_bd: torch.Tensor) -> torch.Tensor:
        x = self.head_nm(h.float(), cond_bd)
        return self.head(x.to(self.head.weight.dtype)).float()

    def drop_classes(self, labels: torch.Tensor, generator=None) -> torch.Tensor:
        gdev = generator.device if generator is not None else labels.device
        drop = torch.rand(labels.shape, generator=generator, device=gdev).to(labels.device) < self.config.cond_drop_rate
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor | None, class_dropout: bool = False,
                return_dict: bool = True):
        """Teacher-forced logits (B, L, V): ``x_BLCv_wo_first_l`` (B, L - n_0^2, Cvae) is
        ``idxBl_to_var_input`` of the ground-truth tokens.  Class dropout (VAR's ``cond_drop_rate``)
        only with ``class_dropout=True`` in training mode."""
        labels = labels.long()
        if class_dropout and self.training:
            labels = self.drop_classes(labels)
        b = labels.shape[0]
        sos = cond = self.class_emb(labels)
        h = sos.unsqueeze(1).expand(b, self.first_l, -1) + self.pos_start.expand(b, -1, -1)
        if x_BLCv_wo_first_l is not None and x_BLCv_wo_first_l.shape[1]:
            h = torch.cat([h, self.word_embed(x_BLCv_wo_first_l.to(self.word_embed.weight.dtype))], 1)
        length = h.shape[1]
        h = h + self.lvl_pos()[:, :length]
        mask = self.attn_bias()[:, :, :length, :length]
        ada = self.ada_cond(cond)
        for blk in self.blocks:
            h = blk(h, ada, mask)
        logits = self.get_logits(h, cond)
        return VAROutput(logits=logits) if return_dict else (logits,)

    def save_pretrained(self, save_directory, *args, **kwargs):
        out = super().save_pretrained(save_directory, *args, **kwargs)
        _copy_this_file(save_directory)
        return out


# =============================================================================================
# sampling


def var_filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0, temperature: float = 1.0):
    """VAR's ``sample_with_top_k_top_p_`` filters (out of place), on (..., V) logits: top-k keeps
    logits ``>=`` the k-th largest, then top-p (``0 < top_p``) drops the ascending-sorted codes
    whose cumulative probability is ``<= 1 - top_p`` (the most likely code stays).  ``temperature``
    (not in VAR; 1.0 = VAR) divides the logits first."""
    logits = logits.float()
    if temperature is not None and float(temperature) != 1.0:
        logits = logits / max(float(temperature), 1e-5)
    v = logits.shape[-1]
    if top_k and 0 < int(top_k) < v:
        kth = logits.topk(int(top_k), dim=-1, largest=True, sorted=False)[0].amin(dim=-1, keepdim=True)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and float(top_p) > 0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - float(top_p))
        remove[..., -1:] = False
        logits = logits.masked_fill(remove.scatter(-1, sorted_idx, remove), float("-inf"))
    return logits


def var_draw_uniforms(generator, batch: int, n: int, device) -> torch.Tensor:
    """(B, n) uniforms in [0, 1): ``n`` from each generator of a list, or (B, n) from one."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for {batch} images; pass one per image")
        u = torch.stack([torch.rand(n, generator=g, device=g.device, dtype=torch.float64) for g in generator])
    else:
        gdev = generator.device if generator is not None else device
        u = torch.rand(batch, n, generator=generator, device=gdev, dtype=torch.float64)
    return u.to(device)


def var_sample_tokens(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws from ``softmax(logits)`` (B, n, V), one uniform per token (B, n)."""
    probs = torch.softmax(logits.double(), dim=-1)
    cdf = probs.cumsum(-1)
    cdf = cdf / cdf[..., -1:]
    idx = torch.searchsorted(cdf, uniforms.double().unsqueeze(-1).to(cdf.device), right=True)
    idx = idx.clamp_max(probs.shape[-1] - 1).squeeze(-1)
    bad = probs.gather(-1, idx.unsqueeze(-1)).squeeze(-1) <= 0  # never a filtered code at a plateau
    return torch.where(bad, probs.argmax(-1), idx)


@torch.no_grad()
def var_generate(transformer: VARTransformer, vqvae: VARVQVAE, labels: torch.Tensor, choose,
                 guidance_scale: float = 1.5, top_k: int = 0, top_p: float = 0.0, temperature: float = 1.0,
                 return_fhat: bool = False, num_scales: int | None = None):
    """VAR's KV-cached scale-wise decoding (``autoregressive_infer_cfg``): returns the flat tokens
    (B, L) (and ``f_hat`` with ``return_fhat``).  ``choose(k, logits (B, n_k^2, V)) -> (B, n_k^2)``
    gets the guided, filtered logits of scale ``k`` (it may return given tokens instead: a forced
    prefix).  CFG: doubled batch with the null class, ``(1 + t) cond - t uncond``,
    ``t = guidance_scale * k / (S - 1)`` (skipped when ``guidance_scale == 0``).  ``num_scales``:
    stop after that many scales (the tokens of those scales only; ``f_hat`` then is partial)."""
    tr, quant = transformer, vqvae.quantize
    pns = list(tr.patch_nums)
    if list(quant.v_patch_nums) != pns:
        raise ValueError(f"the transformer's scales {pns} differ from the VQVAE's {list(quant.v_patch_nums)}")
    labels = labels.long().to(tr.class_emb.weight.device)
    b = labels.shape[0]
    cfg = float(guidance_scale)
    use_cfg = cfg != 0.0
    both = torch.cat([labels, torch.full_like(labels, tr.null_class)]) if use_cfg else labels
    sos = cond = tr.class_emb(both)
    ada = tr.ada_cond(cond)
    lvl_pos = tr.lvl_pos()
    h = sos.unsqueeze(1).expand(-1, tr.first_l, -1) + tr.pos_start.expand(both.shape[0], -1, -1) + lvl_pos[:, : tr.first_l]
    hw = pns[-1]
    f_hat = sos.new_zeros(b, tr.Cvae, hw, hw, dtype=torch.float32)
    cache = VARKVCache()
    out, cur = [], 0
    s = len(pns)
    stop = s if num_scales is None else int(num_scales)
    if not 1 <= stop <= s:
        raise ValueError(f"num_scales must be in 1..{s}, got {num_scales}")
    for si, pn in enumerate(pns[:stop]):
        cur += pn * pn
        x = h
        for i, blk in enumerate(tr.blocks):
            x = blk(x, ada, None, cache, i)
        logits = tr.get_logits(x, cond)
        if use_cfg:
            t = cfg * si / (s - 1)
            logits = (1 + t) * logits[:b] - t * logits[b:]
        logits = var_filter_logits(logits, top_k, top_p, temperature)
        idx = choose(si, logits).long().reshape(b, pn * pn)
        out.append(idx)
        emb = quant.embedding(idx).transpose(1, 2).reshape(b, tr.Cvae, pn, pn)
        f_hat, nxt = quant.next_autoregressive_input(si, f_hat, emb)
        if si != stop - 1:
            nxt = nxt.reshape(b, tr.Cvae, -1).transpose(1, 2)
            h = tr.word_embed(nxt.to(tr.word_embed.weight.dtype)) + lvl_pos[:, cur : cur + pns[si + 1] ** 2]
            if use_cfg:
                h = h.repeat(2, 1, 1)
    tokens = torch.cat(out, 1)
    return (tokens, f_hat) if return_fhat else tokens


# =============================================================================================
# Distilled Decoding over scales


class _ContinuousHead(nn.Module):
    """DD's continuous head (PixArt's final layer, conditioned on the class embedding): ``Linear(C ->
    Cvae)(LayerNorm(h) * (1 + scale) + shift)``, ``(shift, scale) = scale_shift_table + cond``; the
    projection starts at zero."""

    def __init__(self, c: int, cvae: int):
        super().__init__()
        self.norm = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.randn(2, c) / c**0.5)
        self.linear = nn.Linear(c, cvae)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        mod = self.scale_shift_table[None].float() + cond[:, None, :].float()
        shift, scale = mod[:, 0:1], mod[:, 1:2]
        x = self.norm(h.float()) * (1 + scale) + shift
        return self.linear(x.to(self.linear.weight.dtype)).float()


class VARDDStudent(ModelMixin, ConfigMixin):
    r"""DD's ``DD_Model`` over VAR (see the module docstring): noise (B, L, Cvae) + labels -> logits of
    every token in one pass.  ``split_points`` are scale indices (``[0]`` one step, ``[0, t_2]`` two);
    ``codebook_scale`` maps the VQ codebook into flow space (the student's data inputs)."""

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 4096,
        z_channels: int = 32,
        num_classes: int = 1000,
        depth: int = 16,
        embed_dim: int = 1024,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-6,
        shared_aln: bool = False,
        attn_l2_norm: bool = True,
        patch_nums: list[int] | None = None,
        split_points: list[int] | None = None,
        codebook_scale: float = 1.0,
        use_layerwise_n_d_embed: bool = True,
        split_t: int | None = None,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.__module__ = COMPONENT_MODULE
        pns = list(VAR_PATCH_NUMS) if patch_nums is None else [int(p) for p in patch_nums]
        sp = [0] if split_points is None else [int(t) for t in split_points]
        if not sp or sp[0] != 0 or any(a >= b for a, b in zip(sp, sp[1:])) or sp[-1] >= len(pns):
            raise ValueError(f"split_points must start at 0 and increase below {len(pns)} scales, got {sp}")
        if split_t is not None and not 0 <= int(split_t) < len(pns):
            raise ValueError(f"split_t must be None or a scale index in 0..{len(pns) - 1}, got {split_t}")
        self.register_to_config(patch_nums=pns, split_points=sp)
        c = int(embed_dim)
        self.C = c
        self.V, self.Cvae, self.num_classes = int(vocab_size), int(z_channels), int(num_classes)
        self.patch_nums = pns
        self.L = sum(p * p for p in pns)  # image tokens (the sequence has one more: the sos)
        init_std = math.sqrt(1 / c / 3)
        self.word_embed = nn.Linear(self.Cvae, c)
        self.class_emb = nn.Embedding(self.num_classes + 1, c)
        self.pos_start = nn.Parameter(torch.empty(1, 1, c))
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L + 1, c))
        self.lvl_embed = nn.Embedding(len(pns) + 1, c)
        self.n_d_embed = nn.Embedding(2, c)
        for t in (self.class_emb.weight, self.pos_start, self.pos_1LC, self.lvl_embed.weight, self.n_d_embed.weight):
            nn.init.trunc_normal_(t.data, std=init_std)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), _SharedAdaLin(c, 6 * c)) if shared_aln else nn.Identity()
        self.blocks = nn.ModuleList(
            _AdaLNSelfAttn(c, c, num_heads, mlp_ratio, norm_eps, shared_aln, attn_l2_norm, dp)
            for dp in drop_path_rates(drop_path_rate, depth)
        )
        if use_layerwise_n_d_embed:
            self.layerwise_n_d_embed = nn.ModuleList(nn.Linear(c, c) for _ in range(depth + 1))
            for lin in self.layerwise_n_d_embed:
                nn.init.trunc_normal_(lin.weight.data, std=init_std)
                nn.init.zeros_(lin.bias.data)
        else:
            self.layerwise_n_d_embed = None
        self.head_nm = _AdaLNBeforeHead(c, c, norm_eps)
        self.head = nn.Linear(c, self.V)
        self.final_layer_conti = _ContinuousHead(c, self.Cvae) if split_t is not None else None
        ids = torch.cat([torch.zeros(1, dtype=torch.long)] + [torch.full((p * p,), i + 1) for i, p in enumerate(pns)])
        self.register_buffer("lvl_1L", ids.view(1, -1), persistent=False)

    @property
    def layout(self) -> list[tuple[int, int, int]]:
        return scale_layout(self.patch_nums)

    @property
    def split_points(self) -> list[int]:
        return list(self.config.split_points)

    def data_tokens(self, t: int) -> int:
        """Number of image tokens in the first ``t`` scales (the data prefix of split point ``t``)."""
        return sum(p * p for p in self.patch_nums[: int(t)])

    @property
    def split_t_token(self) -> int | None:
        """First token position the continuous head predicts (``None`` without the head)."""
        st = self.config.get("split_t")
        return None if st is None else self.data_tokens(int(st))

    @classmethod
    def from_teacher(cls, transformer: VARTransformer, split_points, codebook_scale: float = 1.0,
                     layerwise_n_d_embed: bool = True, generator: torch.Generator | None = None,
                     split_t: int | None = None, drop_path_rate: float = 0.0) -> VARDDStudent:
        """DD's ``init_with_teacher``: copy ``word_embed``, ``class_emb``, ``pos_start``, the blocks,
        ``shared_ada_lin``, ``head_nm`` and ``head``; ``lvl_embed`` / ``pos_1LC`` gain the new leading
        1x1 scale (teacher rows 0 -> 0, k >= 1 -> k + 1; the new row 1 random).  The indicator
        embedding and its projections keep their random init.  (The official code re-initialises
        ``class_emb`` row 1 where it means ``lvl_embed`` row 1; this copy leaves class 1 alone.)"""
        cfg = transformer.config
        student = cls(
            vocab_size=cfg.vocab_size, z_channels=cfg.z_channels, num_classes=cfg.num_classes, depth=cfg.depth,
            embed_dim=cfg.embed_dim, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, norm_eps=cfg.norm_eps,
            shared_aln=cfg.shared_aln, attn_l2_norm=cfg.attn_l2_norm, patch_nums=list(cfg.patch_nums),
            split_points=list(split_points), codebook_scale=float(codebook_scale),
            use_layerwise_n_d_embed=layerwise_n_d_embed, split_t=split_t, drop_path_rate=drop_path_rate,
        )
        src = {k: v.detach().float() for k, v in transformer.state_dict().items()}
        with torch.no_grad():
            own = student.state_dict()
            for k, v in src.items():
                if k in ("lvl_embed.weight", "pos_1LC"):
                    continue
                own[k].copy_(v)
            lvl, pos = src["lvl_embed.weight"], src["pos_1LC"]
            own["lvl_embed.weight"][0].copy_(lvl[0])
            own["lvl_embed.weight"][2:].copy_(lvl[1:])
            own["pos_1LC"][:, 0].copy_(pos[:, 0])
            own["pos_1LC"][:, 2:].copy_(pos[:, 1:])
        return student

    def attn_bias(self) -> torch.Tensor:
        return block_causal_mask(self.lvl_1L[0], diagonal_only=True)

    def logits(self, x: torch.Tensor, labels: torch.Tensor, is_data: torch.Tensor) -> torch.Tensor:
        """Logits (B, L, V) of every token: ``x`` (B, L, Cvae) noise / flow-space codes, ``is_data``
        (B, L) bool (the sos counts as data)."""
        return self.predict(x, labels, is_data, need_vectors=False)[0]

    def predict(self, x: torch.Tensor, labels: torch.Tensor, is_data: torch.Tensor, need_vectors: bool = True):
        """``(logits (B, L, V), continuous-head vectors (B, L, Cvae) or None)`` of one pass."""
        b = x.shape[0]
        labels = labels.long().to(x.device)
        sos = cond = self.class_emb(labels)
        h = torch.cat([sos.unsqueeze(1) + self.pos_start.expand(b, -1, -1),
                       self.word_embed(x.to(self.word_embed.weight.dtype))], 1)
        h = h + self.lvl_embed(self.lvl_1L) + self.pos_1LC
        ind = torch.cat([torch.ones(b, 1, dtype=torch.long, device=x.device), is_data.long()], 1)
        nd = self.n_d_embed(ind)
        h = h + nd
        mask = self.attn_bias()
        ada = self.shared_ada_lin(cond)
        for i, blk in enumerate(self.blocks):
            extra = self.layerwise_n_d_embed[i](nd) if self.layerwise_n_d_embed is not None else nd
            h = blk(h, ada, mask, n_d_emb=extra)
        nd_out = self.layerwise_n_d_embed[-1](nd) if self.layerwise_n_d_embed is not None else nd
        h = h.float() + nd_out.float()
        logits = self.head(self.head_nm(h, cond).to(self.head.weight.dtype)).float()[:, 1:]
        cont = None
        if need_vectors and self.final_layer_conti is not None:
            cont = self.final_layer_conti(h, cond)[:, 1:]
        return logits, cont

    def forward(self, noise: torch.Tensor, labels: torch.Tensor, codes: torch.Tensor, num_steps: int | None = None):
        """Tokens (B, L) for noise (B, L, Cvae) and class ids; ``codes`` (V, Cvae) in flow space."""
        return var_dd_generate(self, codes, noise, labels, num_steps)

    def save_pretrained(self, save_directory, *args, **kwargs):
        out = super().save_pretrained(save_directory, *args, **kwargs)
        _copy_this_file(save_directory)
        return out


def var_dd_inputs(student: VARDDStudent, noise: torch.Tensor, codes: torch.Tensor, tokens: torch.Tensor | None,
                  t: int, vectors: torch.Tensor | None = None):
    """``(x, is_data)`` of split point ``t`` (scales): the first ``t`` scales hold data -- ``vectors``
    (B, L, Cvae) in flow space when given, else the flow-space codes of ``tokens`` -- the noise after
    (DD's ``perturb_data``)."""
    n = student.data_tokens(t)
    is_data = torch.zeros(noise.shape[:2], dtype=torch.bool, device=noise.device)
    if n == 0 or (tokens is None and vectors is None):
        return noise, is_data
    x = noise.clone()
    x[:, :n] = (vectors[:, :n] if vectors is not None else codes[tokens[:, :n].long()]).to(noise.dtype)
    is_data[:, :n] = True
    return x, is_data


def var_nearest_codes(vectors: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code (B, n) of flow-space ``vectors`` (B, n, d)."""
    c = codes.to(vectors.dtype)
    return (c.pow(2).sum(-1) - 2 * vectors @ c.T).argmin(-1)


def var_dd_predict(student: VARDDStudent, logits: torch.Tensor, cont, codes: torch.Tensor):
    """Output assembly of one pass: ``(tokens (B, L), flow-space vectors (B, L, d))`` -- the argmax
    code, or from the head's first position on (``split_t``) its vectors and their nearest codes."""
    tokens = logits.argmax(-1)
    vectors = codes[tokens]
    st = student.split_t_token
    if cont is not None and st is not None and st < tokens.shape[1]:
        vectors = torch.cat([vectors[:, :st], cont[:, st:].to(vectors.dtype)], 1)
        tokens = torch.cat([tokens[:, :st], var_nearest_codes(cont[:, st:].to(codes.dtype), codes)], 1)
    return tokens, vectors


def var_dd_generate(student: VARDDStudent, codes: torch.Tensor, noise: torch.Tensor, labels: torch.Tensor,
                    num_steps: int | None = None, teacher_fn=None, teacher_steps: int = 0,
                    return_vectors: bool = False):
    """Tokens (B, L) of every scale in ``num_steps`` passes (default: all split points); with
    ``return_vectors`` also the flow-space vectors (B, L, d) the image is decoded from (the head's at
    scales ``>= split_t``, else the codes of the tokens).

    Teacher-involved sampling (DD1's combined sampler, counted in *scales*): ``teacher_steps = k > 0``
    with a second split point ``t_2`` and ``teacher_fn(labels, prefix (B, n), noise (B, L, d),
    stop_scale) -> tokens (B, data_tokens(stop_scale))`` -- one student pass from the noise, its
    tokens of the scales before ``t_2 - k`` kept, the teacher's scales ``t_2 - k .. t_2 - 1`` after
    that prefix, then the student's pass at ``t_2`` for the rest.  Cost: ``2`` student passes + ``t_2``
    KV-cached teacher scale steps (the kept prefix is re-read scale by scale)."""
    sp = student.split_points
    k = len(sp) if num_steps is None else int(num_steps)
    if not 1 <= k <= len(sp):
        raise ValueError(f"num_inference_steps must be in 1..{len(sp)} (split points {sp}), got {k}")
    expected = (student.L, student.Cvae)
    if tuple(noise.shape[1:]) != expected:
        raise ValueError(f"noise must have shape (B, {expected[0]}, {expected[1]}), got {tuple(noise.shape)}")
    teacher_steps = int(teacher_steps or 0)
    if teacher_steps:
        if len(sp) < 2 or k < 2:
            raise ValueError("teacher-involved sampling needs a second split point and 2 student passes "
                             f"(split points {sp}, num_inference_steps {k})")
        if teacher_fn is None:
            raise ValueError("teacher_steps > 0 needs teacher_fn (the teacher's scales after a prefix)")
        if not 0 < teacher_steps <= sp[1]:
            raise ValueError(f"teacher_steps must be in 0..{sp[1]} scales (the second split point), got {teacher_steps}")
    codes = codes.to(device=noise.device, dtype=torch.float32)
    tokens = vectors = None
    for step in range(k):
        t = sp[step]
        if step == 1 and teacher_steps:
            keep = student.data_tokens(t - teacher_steps)
            prefix = teacher_fn(labels, tokens[:, :keep], noise, t).long().to(tokens.device)
            n_t = student.data_tokens(t)
            if tuple(prefix.shape) != (tokens.shape[0], n_t):
                raise ValueError(f"teacher_fn returned shape {tuple(prefix.shape)}; expected ({tokens.shape[0]}, {n_t})")
            tokens = torch.cat([prefix, tokens[:, n_t:]], 1)
            vectors = torch.cat([codes[prefix].to(vectors.dtype), vectors[:, n_t:]], 1)
        x, is_data = var_dd_inputs(student, noise.float(), codes, tokens, t, vectors)
        logits, cont = student.predict(x, labels, is_data)
        pred, pvec = var_dd_predict(student, logits, cont, codes)
        n = student.data_tokens(t)
        if tokens is None:
            tokens, vectors = pred, pvec
        else:
            tokens = torch.cat([tokens[:, :n], pred[:, n:]], 1)
            vectors = torch.cat([vectors[:, :n], pvec[:, n:]], 1)
    return (tokens, vectors) if return_vectors else tokens


# =============================================================================================
# pipelines


def _class_labels(class_labels, batch_size: int, num_images_per_prompt: int, num_classes: int, device):
    if class_labels is None:
        labels = torch.arange(batch_size) % num_classes
    else:
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
    if labels.numel() == 0:
        raise ValueError("class_labels is empty")
    if labels.min() < 0 or labels.max() > num_classes:
        raise ValueError(f"class labels must lie in [0, {num_classes}] ({num_classes} = null), got {labels.tolist()}")
    return labels.repeat_interleave(num_images_per_prompt).to(device)


def _to_images(x: torch.Tensor, output_type: str):
    image = (x.float() / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return image
    array = image.detach().cpu().permute(0, 2, 3, 1).numpy()
    if output_type == "np":
        return array
    if output_type != "pil":
        raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'tokens', got {output_type!r}")
    uint8 = (array * 255).round().astype(np.uint8)
    if uint8.shape[-1] == 1:
        return [Image.fromarray(a[..., 0]) for a in uint8]
    return [Image.fromarray(a) for a in uint8]


class _SelfContainedPipeline(DiffusionPipeline):
    _module_class: str = ""

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``DiffusionPipeline.save_pretrained`` plus this file at the folder root and the list-form
        ``_class_name``, so the folder loads with ``trust_remote_code=True``."""
        import json

        out = super().save_pretrained(save_directory, *args, **kwargs)
        _copy_this_file(save_directory)
        index_file = os.path.join(save_directory, "model_index.json")
        with open(index_file, encoding="utf-8") as f:
            index = json.load(f)
        index["_class_name"] = [COMPONENT_MODULE, type(self).__name__]
        with open(index_file, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")
        return out

    @classmethod
    def load_config(cls, *args, **kwargs):
        out = super().load_config(*args, **kwargs)
        config = out[0] if isinstance(out, tuple) else out
        if cls is not DiffusionPipeline and isinstance(config.get("_class_name"), (list, tuple)):
            config["_class_name"] = cls.__name__
        return out


class VARPipeline(_SelfContainedPipeline):
    r"""VAR teacher sampling: ``pipe(class_labels=[...], generator=...)``; components ``vqvae``
    (:class:`VARVQVAE`) and ``transformer`` (:class:`VARTransformer`); config: default
    ``guidance_scale`` (VAR's ``cfg``), ``top_k``, ``top_p``, ``temperature``."""

    model_cpu_offload_seq = "transformer->vqvae"

    def __init__(self, vqvae, transformer, guidance_scale: float = 1.5, top_k: int = 900, top_p: float = 0.95,
                 temperature: float = 1.0):
        super().__init__()
        self.register_modules(vqvae=vqvae, transformer=transformer)
        self.register_to_config(guidance_scale=float(guidance_scale), top_k=int(top_k or 0),
                                top_p=float(top_p or 0.0), temperature=float(temperature))

    @torch.no_grad()
    def __call__(self, class_labels=None, batch_size: int = 1, guidance_scale: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, temperature: float | None = None,
                 generator=None, output_type: str = "pil", return_dict: bool = True, num_images_per_prompt: int = 1):
        c = self.config
        device = self._execution_device
        labels = _class_labels(class_labels, batch_size, num_images_per_prompt, self.transformer.num_classes, device)
        b = labels.shape[0]

        def choose(si, logits):
            return var_sample_tokens(logits, var_draw_uniforms(generator, b, logits.shape[1], logits.device))

        tokens, f_hat = var_generate(
            self.transformer, self.vqvae, labels, choose,
            guidance_scale=c.guidance_scale if guidance_scale is None else guidance_scale,
            top_k=c.top_k if top_k is None else top_k, top_p=c.top_p if top_p is None else top_p,
            temperature=c.temperature if temperature is None else temperature, return_fhat=True,
        )
        image = tokens if output_type == "tokens" else _to_images(self.vqvae.fhat_to_img(f_hat), output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=image) if return_dict else (image,)


class VARDDPipeline(_SelfContainedPipeline):
    r"""One- or two-step sampling with a Distilled Decoding student of VAR: components ``vqvae``
    (:class:`VARVQVAE`, the teacher's) and ``transformer`` (:class:`VARDDStudent`); config:
    ``num_inference_steps`` (default passes).  Noise: one ``Cvae``-dim unit Gaussian per token of
    every scale, (B, L, Cvae)."""

    model_cpu_offload_seq = "transformer->vqvae"

    def __init__(self, vqvae, transformer, num_inference_steps: int = 1):
        super().__init__()
        self.register_modules(vqvae=vqvae, transformer=transformer)
        self.register_to_config(num_inference_steps=int(num_inference_steps))

    def flow_codebook(self) -> torch.Tensor:
        return self.vqvae.quantize.embedding.weight.float() * float(self.transformer.config.codebook_scale)

    @torch.no_grad()
    def __call__(self, class_labels=None, batch_size: int = 1, num_inference_steps: int | None = None,
                 generator=None, noise: torch.Tensor | None = None, output_type: str = "pil",
                 return_dict: bool = True, num_images_per_prompt: int = 1, teacher_fn=None,
                 teacher_steps: int = 0):
        """``teacher_fn`` / ``teacher_steps``: teacher-involved sampling (:func:`var_dd_generate`;
        stepdistill's ``teacher_span_fn(VARTeacher, ...)`` builds ``teacher_fn``); ``num_inference_steps``
        then defaults to 2."""
        st = self.transformer
        device = self._execution_device
        labels = _class_labels(class_labels, batch_size, num_images_per_prompt, st.num_classes, device)
        b = labels.shape[0]
        if noise is None:
            if isinstance(generator, (list, tuple)):
                if len(generator) != b:
                    raise ValueError(f"got {len(generator)} generators for {b} images; pass one per image")
                noise = torch.stack([torch.randn(st.L, st.Cvae, generator=g, device=g.device) for g in generator])
            else:
                gdev = generator.device if generator is not None else device
                noise = torch.randn(b, st.L, st.Cvae, generator=generator, device=gdev)
        noise = noise.to(device=device, dtype=torch.float32)
        steps = self.config.num_inference_steps if num_inference_steps is None else int(num_inference_steps)
        if teacher_steps and num_inference_steps is None:
            steps = len(st.split_points)
        tokens, vectors = var_dd_generate(st, self.flow_codebook().to(device), noise, labels, steps,
                                          teacher_fn=teacher_fn, teacher_steps=teacher_steps, return_vectors=True)
        if output_type == "tokens":
            image = tokens
        elif st.final_layer_conti is not None:  # the head's vectors, not snapped to the codebook
            image = _to_images(self.vqvae.decode_vectors(vectors / float(st.config.codebook_scale)), output_type)
        else:
            image = _to_images(self.vqvae.decode_tokens(tokens), output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=image) if return_dict else (image,)
