"""LlamaGen's class-conditional GPT (Sun et al. 2024, "Autoregressive Model Beats Diffusion: Llama for
Scalable Image Generation", github.com/FoundationVision/LlamaGen) as a diffusers model.

Self-contained on purpose: this file imports only torch and diffusers, so that exports write it into
the ``transformer/`` folder beside the weights and plain diffusers loads it as a custom component
(``model_index.json``: ``"transformer": ["llamagen_gpt", "LlamaGenGPT"]``)::

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)

The computation (written here from LlamaGen's ``autoregressive/models/gpt.py``; converted official
checkpoints give the official logits, tested to 1e-5 in ``tests/test_llamagen.py``):

* sequence ``[class, q_1, ..., q_n]`` -- the class embedding is the first (prefix) token; the
  output at position ``i`` gives the logits of ``q_{i+1}`` over the ``codebook_size`` codes;
* pre-norm blocks: ``h = x + Attn(RMSNorm(x))``, ``out = h + FFN(RMSNorm(h))``; RMSNorm computed in
  float32 (``x * rsqrt(mean(x^2) + eps)``, then cast back and scaled); SwiGLU FFN
  ``w2(silu(w1 x) * w3 x)``; fused ``qkv`` projection split as ``[q | k | v]`` (grouped-query
  attention when ``num_kv_heads < num_heads``, keys/values repeated with ``repeat_interleave``);
  bias-free linears; final RMSNorm and a bias-free head, logits in float32;
* **2-D RoPE** with LlamaGen's layout: per head, the ``head_dim / 2`` rotary pairs are *interleaved*
  (``(x_0, x_1), (x_2, x_3), ...``); the first ``head_dim / 4`` pairs rotate by the token's grid
  *row*, the last ``head_dim / 4`` by its *column*, with frequencies
  ``base^(-2k / (head_dim / 2))``, ``k < head_dim / 4``; the class (prefix) position has
  ``cos = sin = 0``, i.e. its query and key are **zero** (it is attended to with score 0 and only
  its value is used).  The table is recomputed in float32 on the fly (never a weight, never cast
  with the model, as LlamaGen keeps it a plain float32 attribute);
* KV cache: :class:`LlamaGenKVCache`, per-layer key / value buffers pre-allocated for the whole
  sequence and filled in place (LlamaGen's static ``KVCache``; no per-step re-allocation), passed
  back as ``past_key_values``; a call continues the sequence at the cache's ``length``.  Like
  transformers' ``DynamicCache`` it is updated in place: a cache continues one sequence.

Vocabulary (one input table, so that the model reads like a transformers causal LM to
``stepdistill.pipelines.ar_image.ar_generate`` and to Distilled Decoding's student)::

    [0, V)              image tokens (LlamaGen ``tok_embeddings``), V = codebook_size
    V + c               class c (LlamaGen ``cls_embedding.embedding_table`` row c)
    V + num_classes     null class (the CFG row LlamaGen adds when class_dropout_prob > 0)
    V + num_classes + 1 ...  extra rows (``resize_token_embeddings``; Distilled Decoding's input layer)

Class dropout for classifier-free guidance (LlamaGen's ``LabelEmbedder.token_drop``: each class
token becomes the null class with probability ``class_dropout_prob``) is applied only when asked
for (``forward(..., class_dropout=True)`` in training mode), not in every training-mode forward: a
trainable copy of the teacher (a distilled student) must not silently drop its conditions.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

__all__ = ["LlamaGenGPT", "LlamaGenGPTOutput", "LlamaGenKVCache", "rope_2d_table", "apply_rope", "COMPONENT_MODULE"]

#: the file name (without ``.py``) this module is written to beside exported weights; what diffusers
#: records as the component's "library" in ``model_index.json``
COMPONENT_MODULE = "llamagen_gpt"


def rope_2d_table(grid_size, head_dim: int, base: float = 10000.0, cls_token_num: int = 1, device=None):
    """(cls_token_num + h * w, head_dim // 2, 2) float32 table of (cos, sin): LlamaGen's 2-D RoPE.

    Rows ``< cls_token_num`` (the class prefix) are zero; row ``cls_token_num + r * w + c`` holds the
    angles ``r * f_k`` for the first ``head_dim // 4`` pairs and ``c * f_k`` for the last, with
    ``f_k = base^(-2k / (head_dim // 2))``."""
    h, w = (int(grid_size), int(grid_size)) if isinstance(grid_size, int) else (int(grid_size[0]), int(grid_size[1]))
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
    half = head_dim // 2
    exponents = torch.arange(0, half, 2, device=device)[: half // 2].float() / half
    freqs = 1.0 / (base**exponents)  # (head_dim // 4,)
    rows = torch.outer(torch.arange(h, device=device).float(), freqs)  # (h, head_dim // 4)
    cols = torch.outer(torch.arange(w, device=device).float(), freqs)  # (w, head_dim // 4)
    angles = torch.cat([rows[:, None, :].expand(h, w, -1), cols[None, :, :].expand(h, w, -1)], -1)
    table = torch.stack([angles.cos(), angles.sin()], -1).reshape(h * w, half, 2)
    prefix = torch.zeros(int(cls_token_num), half, 2, device=device)
    return torch.cat([prefix, table])


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` (B, L, H, head_dim) by ``table`` (L, head_dim // 2, 2), in
    float32; the result has ``x``'s dtype."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    cos = table[None, :, None, :, 0]
    sin = table[None, :, None, :, 1]
    out = torch.stack([a * cos - b * sin, b * cos + a * sin], -1)
    return out.flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)  # LlamaGen w1
        self.up_proj = nn.Linear(dim, hidden, bias=False)  # LlamaGen w3
        self.down_proj = nn.Linear(hidden, dim, bias=False)  # LlamaGen w2
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, attn_dropout: float, resid_dropout: float):
        super().__init__()
        if dim % num_heads or num_heads % num_kv_heads:
            raise ValueError(f"hidden size {dim}, {num_heads} heads, {num_kv_heads} kv heads do not divide")
        self.num_heads, self.num_kv_heads = int(num_heads), int(num_kv_heads)
        self.head_dim = dim // num_heads
        self.qkv_proj = nn.Linear(dim, (num_heads + 2 * num_kv_heads) * self.head_dim, bias=False)  # wqkv
        self.o_proj = nn.Linear(dim, dim, bias=False)  # wo
        self.attn_dropout = float(attn_dropout)
        self.resid_dropout = nn.Dropout(resid_dropout)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache=None, layer: int = 0):
        b, length, dim = x.shape
        kv = self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([dim, kv, kv], dim=-1)
        q = apply_rope(q.view(b, length, self.num_heads, self.head_dim), rope).transpose(1, 2)
        k = apply_rope(k.view(b, length, self.num_kv_heads, self.head_dim), rope).transpose(1, 2)
        v = v.view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        rep = self.num_heads // self.num_kv_heads
        keys, values = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        total = keys.shape[2]
        mask, causal = None, False
        if length == total:
            causal = length > 1
        elif length > 1:  # a chunk after a cached prefix: causal within the chunk
            mask = torch.ones(length, total, dtype=torch.bool, device=x.device).tril(total - length)
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, is_causal=causal,
            dropout_p=self.attn_dropout if self.training else 0.0,
        )
        out = out.transpose(1, 2).reshape(b, length, dim)
        return self.resid_dropout(self.o_proj(out))


class Block(nn.Module):
    def __init__(self, dim, num_heads, num_kv_heads, hidden, eps, attn_dropout, resid_dropout, ffn_dropout):
        super().__init__()
        self.input_layernorm = RMSNorm(dim, eps)  # LlamaGen attention_norm
        self.self_attn = Attention(dim, num_heads, num_kv_heads, attn_dropout, resid_dropout)
        self.post_attention_layernorm = RMSNorm(dim, eps)  # LlamaGen ffn_norm
        self.mlp = SwiGLU(dim, hidden, ffn_dropout)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache=None, layer: int = 0):
        h = x + self.self_attn(self.input_layernorm(x), rope, cache, layer)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaGenKVCache:
    """Per-layer key / value buffers (B, kv_heads, max_positions, head_dim), allocated at the first
    write and filled in place; ``length`` = positions held (set by :class:`LlamaGenGPT` after all
    layers have written a chunk)."""

    def __init__(self, max_positions: int):
        self.max_positions = int(max_positions)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.length = 0

    def get_seq_length(self) -> int:
        return self.length

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write the chunk ``k``, ``v`` (B, kv_heads, L, head_dim) at ``length``; return the keys and
        values of all positions so far (views of the buffers)."""
        if layer == len(self.keys):
            shape = (k.shape[0], k.shape[1], self.max_positions, k.shape[3])
            self.keys.append(k.new_zeros(shape))
            self.values.append(v.new_zeros(shape))
        buf_k, buf_v = self.keys[layer], self.values[layer]
        if buf_k.shape[0] != k.shape[0]:
            raise ValueError(f"the cache holds a batch of {buf_k.shape[0]}, got {k.shape[0]}")
        end = self.length + k.shape[2]
        buf_k[:, :, self.length : end] = k
        buf_v[:, :, self.length : end] = v
        return buf_k[:, :, :end], buf_v[:, :, :end]


@dataclass
class LlamaGenGPTOutput(BaseOutput):
    """``logits`` (B, L, codebook_size) float32; ``past_key_values`` (with ``use_cache``)."""

    logits: torch.Tensor
    past_key_values: LlamaGenKVCache | None = None


class LlamaGenGPT(ModelMixin, ConfigMixin):
    r"""LlamaGen's class-conditional GPT (see the module docstring for the computation and layout).

    Args:
        codebook_size: V, the VQ codebook size (LlamaGen ``vocab_size``).
        num_classes: classes (``num_classes`` itself is the null class).
        hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size: the transformer
            (LlamaGen-L: 1024, 24, 16, 16, 2816).
        grid_size: token grid ``[h, w]`` (LlamaGen ``block_size = h * w``; 16x16 at 256 px with VQ-16).
        rope_base, norm_eps: RoPE base and RMSNorm epsilon.
        cls_token_num: prefix length (1 for class-conditional models).
        vocab_size: rows of the input table (default ``V + num_classes + 1``).
        class_dropout_prob: CFG class dropout (LlamaGen 0.1), applied with ``class_dropout=True``.
        token_dropout_p, attn_dropout_p, resid_dropout_p, ffn_dropout_p: training dropouts
            (LlamaGen trains with 0.1 / 0 / 0.1 / 0.1; 0 here by default: converted teachers are frozen).
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        codebook_size: int = 16384,
        num_classes: int = 1000,
        hidden_size: int = 1024,
        num_layers: int = 24,
        num_heads: int = 16,
        num_kv_heads: int | None = None,
        intermediate_size: int = 2816,
        grid_size: list[int] | None = None,
        rope_base: float = 10000.0,
        norm_eps: float = 1e-5,
        cls_token_num: int = 1,
        vocab_size: int | None = None,
        class_dropout_prob: float = 0.1,
        token_dropout_p: float = 0.0,
        attn_dropout_p: float = 0.0,
        resid_dropout_p: float = 0.0,
        ffn_dropout_p: float = 0.0,
        initializer_range: float = 0.02,
    ):
        super().__init__()
        # what diffusers records in model_index.json: the file this class is written to beside the
        # weights (not the package path), so that plain diffusers finds transformer/llamagen_gpt.py
        self.__module__ = COMPONENT_MODULE
        if int(cls_token_num) != 1:
            raise ValueError(f"only class-conditional LlamaGen (cls_token_num=1) is supported, got {cls_token_num}")
        grid = [16, 16] if grid_size is None else [int(g) for g in grid_size]
        if len(grid) != 2:
            raise ValueError(f"grid_size must be [h, w], got {grid_size}")
        base_vocab = int(codebook_size) + int(num_classes) + 1
        vocab = base_vocab if vocab_size is None else int(vocab_size)
        if vocab < base_vocab:
            raise ValueError(f"vocab_size {vocab} must hold codebook ({codebook_size}) + classes ({num_classes}) + null")
        self.register_to_config(grid_size=grid, vocab_size=vocab,
                                num_kv_heads=int(num_kv_heads or num_heads))
        kv_heads = int(num_kv_heads or num_heads)
        self.embed_tokens = nn.Embedding(vocab, hidden_size)
        self.token_dropout = nn.Dropout(token_dropout_p)
        self.layers = nn.ModuleList(
            Block(hidden_size, num_heads, kv_heads, intermediate_size, norm_eps,
                  attn_dropout_p, resid_dropout_p, ffn_dropout_p)
            for _ in range(num_layers)
        )
        self.norm = RMSNorm(hidden_size, norm_eps)
        self.lm_head = nn.Linear(hidden_size, codebook_size, bias=False)  # LlamaGen output
        self._rope_cache: dict = {}
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = float(self.config.initializer_range)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, std)

    # -- layout -------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return int(self.config.hidden_size) // int(self.config.num_heads)

    @property
    def max_positions(self) -> int:
        h, w = self.config.grid_size
        return int(self.config.cls_token_num) + int(h) * int(w)

    @property
    def null_class_id(self) -> int:
        return int(self.config.codebook_size) + int(self.config.num_classes)

    def rope_table(self, device) -> torch.Tensor:
        key = str(device)
        table = self._rope_cache.get(key)
        if table is None:
            table = rope_2d_table(self.config.grid_size, self.head_dim, float(self.config.rope_base),
                                  int(self.config.cls_token_num), device=device)
            self._rope_cache[key] = table
        return table

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def resize_token_embeddings(self, new_num_tokens: int, mean_resizing: bool = False) -> nn.Embedding:
        """Grow (or shrink down to ``V + num_classes + 1``) the input table; new rows are drawn from
        N(0, initializer_range^2) (``mean_resizing`` is accepted for transformers compatibility)."""
        n = int(new_num_tokens)
        base_vocab = int(self.config.codebook_size) + int(self.config.num_classes) + 1
        if n < base_vocab:
            raise ValueError(f"cannot shrink the input table below codebook + classes + null ({base_vocab}), got {n}")
        old = self.embed_tokens
        new = nn.Embedding(n, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            new.weight.normal_(0.0, float(self.config.initializer_range))
            keep = min(n, old.num_embeddings)
            new.weight[:keep] = old.weight[:keep]
        new.weight.requires_grad_(old.weight.requires_grad)
        self.embed_tokens = new
        self.register_to_config(vocab_size=n)
        return new

    def drop_classes(self, class_ids: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """LlamaGen's ``token_drop``: each class id becomes the null class with probability
        ``class_dropout_prob`` (ids outside the class range are left alone)."""
        p = float(self.config.class_dropout_prob)
        v = int(self.config.codebook_size)
        is_class = (class_ids >= v) & (class_ids < self.null_class_id)
        gdev = generator.device if generator is not None else class_ids.device
        drop = torch.rand(class_ids.shape, generator=generator, device=gdev).to(class_ids.device) < p
        return torch.where(is_class & drop, torch.full_like(class_ids, self.null_class_id), class_ids)

    # -- forward ------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: LlamaGenKVCache | None = None,
        use_cache: bool | None = None,
        class_dropout: bool = False,
        return_dict: bool = True,
    ):
        """Logits (B, L, codebook_size) for the sequence continuing ``past_key_values`` (or from the
        class prefix at position 0): ``input_ids`` (B, L) in the vocabulary above, or
        ``inputs_embeds`` (B, L, D)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        cache = past_key_values
        if cache is not None and not isinstance(cache, LlamaGenKVCache):
            raise TypeError(f"past_key_values must be the LlamaGenKVCache a previous call returned, got {type(cache).__name__}")
        if cache is None and use_cache:
            cache = LlamaGenKVCache(self.max_positions)
        start = 0 if cache is None else cache.length
        if input_ids is not None:
            if class_dropout and self.training and start == 0:
                input_ids = torch.cat([self.drop_classes(input_ids[:, :1]), input_ids[:, 1:]], 1)
            inputs_embeds = self.embed_tokens(input_ids)
        length = inputs_embeds.shape[1]
        if start + length > self.max_positions:
            raise ValueError(
                f"positions {start}..{start + length - 1} exceed the model's {self.max_positions} "
                f"(class prefix + {self.config.grid_size[0]}x{self.config.grid_size[1]} grid)"
            )
        rope = self.rope_table(inputs_embeds.device)[start : start + length]
        h = self.token_dropout(inputs_embeds)
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, cache, i)
        if cache is not None:
            cache.length = start + length
        logits = self.lm_head(self.norm(h)).float()
        cache = cache if use_cache or past_key_values is not None else None
        if not return_dict:
            return (logits, cache)
        return LlamaGenGPTOutput(logits=logits, past_key_values=cache)

    # -- io -----------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory, *args, **kwargs):
        """``ModelMixin.save_pretrained`` plus this file as ``llamagen_gpt.py`` in the same folder, so
        that plain diffusers (``trust_remote_code=True``) loads the component."""
        out = super().save_pretrained(save_directory, *args, **kwargs)
        target = os.path.join(save_directory, f"{COMPONENT_MODULE}.py")
        source = os.path.abspath(__file__)
        if os.path.isdir(save_directory) and os.path.abspath(target) != source:
            shutil.copyfile(source, target)
        return out
