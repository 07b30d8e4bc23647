"""LlamaGen teacher at paper fidelity: tiny random checkpoints written in the *official* key layout
(FoundationVision/LlamaGen ``gpt.py`` / ``vq_model.py``) -> converter -> our modules, checked against
an independent, minimal re-implementation of the official forward written here (functional, from the
official formulas: 2-D RoPE with interleaved pairs and a zero class row, RMSNorm, SwiGLU, explicit
softmax attention; the VQ's ResnetBlock / AttnBlock / pad-and-stride Downsample / nearest Upsample and
L2-normalised lookup); LlamaGen's sampling loop (CFG, ``/ max(T, 1e-5)``, ``top_k_top_p_filtering``);
KV-cached == uncached; class dropout; converter errors; Distilled Decoding on a tiny LlamaGen teacher
and its export loaded by plain diffusers in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stepdistill.pipelines.llamagen_gpt import LlamaGenGPT, apply_rope, rope_2d_table
from stepdistill.teachers.autoregressive import ARTeacher
from stepdistill.teachers.convert_llamagen import (
    ConversionError,
    convert_gpt,
    convert_llamagen,
    convert_vq,
    load_checkpoint,
)
from stepdistill.teachers.llamagen import build_llamagen_teacher, l2_quantize_indices

V, C, D, LAYERS, HEADS, KV_HEADS, FFN, GRID = 64, 10, 64, 2, 4, 2, 96, 4
PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


# ---------------------------------------------------------------------------------------------
# the official computation, re-implemented minimally (functional; reads the official state dict)


def ref_freqs_cis_2d(grid: int, n_elem: int, base: float = 10000, cls_token_num: int = 1) -> torch.Tensor:
    half_dim = n_elem // 2
    freqs = 1.0 / (base ** (torch.arange(0, half_dim, 2)[: (half_dim // 2)].float() / half_dim))
    t = torch.arange(grid)
    freqs = torch.outer(t, freqs)
    freqs_grid = torch.concat([freqs[:, None, :].expand(-1, grid, -1), freqs[None, :, :].expand(grid, -1, -1)], -1)
    cache = torch.stack([torch.cos(freqs_grid), torch.sin(freqs_grid)], -1).flatten(0, 1)
    return torch.cat([torch.zeros(cls_token_num, n_elem // 2, 2), cache])


def ref_rotary(x, freqs_cis):
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    fc = freqs_cis.view(1, xs.size(1), 1, xs.size(3), 2)
    out = torch.stack([xs[..., 0] * fc[..., 0] - xs[..., 1] * fc[..., 1],
                       xs[..., 1] * fc[..., 0] + xs[..., 0] * fc[..., 1]], -1)
    return out.flatten(3).type_as(x)


def ref_rmsnorm(x, w, eps=1e-5):
    xf = x.float()
    return (xf * torch.rsqrt(torch.mean(xf * xf, -1, keepdim=True) + eps)).type_as(x) * w


def ref_gpt_logits(sd, cond_idx, idx, n_head=HEADS, grid=GRID):
    """LlamaGen ``Transformer.forward`` (c2i, teacher-forced): logits (B, 1 + L, V) of
    ``[class, idx]`` -- position i predicts token i."""
    h = torch.cat([sd["cls_embedding.embedding_table.weight"][cond_idx][:, None], sd["tok_embeddings.weight"][idx]], 1)
    b, length, dim = h.shape
    head_dim = dim // n_head
    freqs = ref_freqs_cis_2d(grid, head_dim)[:length]
    causal = torch.ones(length, length).tril().bool()
    n_layer = len({k.split(".")[1] for k in sd if k.startswith("layers.")})
    for i in range(n_layer):
        p = f"layers.{i}."
        x = ref_rmsnorm(h, sd[p + "attention_norm.weight"])
        qkv = x @ sd[p + "attention.wqkv.weight"].T
        kv = (qkv.shape[-1] - dim) // 2
        n_kv = kv // head_dim
        q, k, v = qkv.split([dim, kv, kv], -1)
        q = ref_rotary(q.view(b, length, n_head, head_dim), freqs).transpose(1, 2)
        k = ref_rotary(k.view(b, length, n_kv, head_dim), freqs).transpose(1, 2)
        v = v.view(b, length, n_kv, head_dim).transpose(1, 2)
        k, v = k.repeat_interleave(n_head // n_kv, 1), v.repeat_interleave(n_head // n_kv, 1)
        att = (q @ k.transpose(-1, -2)) / head_dim**0.5
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        out = (att @ v).transpose(1, 2).reshape(b, length, dim)
        h = h + out @ sd[p + "attention.wo.weight"].T
        x = ref_rmsnorm(h, sd[p + "ffn_norm.weight"])
        ff = (F.silu(x @ sd[p + "feed_forward.w1.weight"].T) * (x @ sd[p + "feed_forward.w3.weight"].T))
        h = h + ff @ sd[p + "feed_forward.w2.weight"].T
    return (ref_rmsnorm(h, sd["norm.weight"]) @ sd["output.weight"].T).float()


def ref_top_k_top_p_filtering(logits, top_k=0, top_p=1.0, filter_value=-float("Inf")):
    logits = logits.clone()
    if top_k > 0:
        top_k = min(top_k, logits.size(-1))
        logits[logits < torch.topk(logits, top_k)[0][..., -1, None]] = filter_value
    if top_p < 1.0:
        sorted_logits, sorted_indices = torch.sort(logits, descending=True)
        cumulative = torch.cumsum(F.softmax(sorted_logits, -1), -1)
        remove = cumulative > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = 0
        logits[remove.scatter(1, sorted_indices, remove)] = filter_value
    return logits


def ref_probs(sd, labels, prefix, cfg_scale, temperature=1.0, top_k=0, top_p=1.0):
    """LlamaGen's next-token distribution after ``prefix``: CFG on logits (cond first, null
    ``num_classes`` second), ``/ max(T, 1e-5)``, ``top_k_top_p_filtering``, softmax."""
    both = ref_gpt_logits(sd, torch.cat([labels, torch.full_like(labels, C)]), torch.cat([prefix, prefix]))[:, -1]
    cond, uncond = both.split(len(labels))
    logits = uncond + (cond - uncond) * cfg_scale if cfg_scale > 1.0 else cond
    logits = logits / max(temperature, 1e-5)
    if top_k > 0 or top_p < 1.0:
        logits = ref_top_k_top_p_filtering(logits, top_k, top_p)
    return F.softmax(logits, -1)


def _gn(x, sd, p):
    return F.group_norm(x, 32, sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)


def _conv(x, sd, p, **kw):
    return F.conv2d(x, sd[p + ".weight"], sd[p + ".bias"], **kw)


def ref_res(x, sd, p):
    h = _conv(F.silu(_gn(x, sd, p + ".norm1")), sd, p + ".conv1", padding=1)
    h = _conv(F.silu(_gn(h, sd, p + ".norm2")), sd, p + ".conv2", padding=1)
    if p + ".nin_shortcut.weight" in sd:
        x = _conv(x, sd, p + ".nin_shortcut")
    return x + h


def ref_attn(x, sd, p):
    h_ = _gn(x, sd, p + ".norm")
    q, k, v = (_conv(h_, sd, f"{p}.{n}") for n in "qkv")
    b, c, hh, ww = q.shape
    w_ = torch.bmm(q.reshape(b, c, hh * ww).permute(0, 2, 1), k.reshape(b, c, hh * ww)) * (int(c) ** (-0.5))
    w_ = F.softmax(w_, 2)
    h_ = torch.bmm(v.reshape(b, c, hh * ww), w_.permute(0, 2, 1)).reshape(b, c, hh, ww)
    return x + _conv(h_, sd, p + ".proj_out")


def ref_vq_encode(sd, x, levels, res):
    h = _conv(x, sd, "encoder.conv_in", padding=1)
    for i in range(levels):
        for j in range(res):
            h = ref_res(h, sd, f"encoder.conv_blocks.{i}.res.{j}")
            if i == levels - 1:
                h = ref_attn(h, sd, f"encoder.conv_blocks.{i}.attn.{j}")
        if i != levels - 1:
            h = _conv(F.pad(h, (0, 1, 0, 1)), sd, f"encoder.conv_blocks.{i}.downsample.conv", stride=2)
    h = ref_attn(ref_res(h, sd, "encoder.mid.0"), sd, "encoder.mid.1")
    h = ref_res(h, sd, "encoder.mid.2")
    h = _conv(F.silu(_gn(h, sd, "encoder.norm_out")), sd, "encoder.conv_out", padding=1)
    return _conv(h, sd, "quant_conv")


def ref_vq_indices(sd, x, levels, res):
    z = ref_vq_encode(sd, x, levels, res).permute(0, 2, 3, 1)
    zf = F.normalize(z.reshape(-1, z.shape[-1]), dim=-1)
    emb = F.normalize(sd["quantize.embedding.weight"], dim=-1)
    d = zf.pow(2).sum(1, keepdim=True) + emb.pow(2).sum(1) - 2 * zf @ emb.T
    return d.argmin(1).reshape(z.shape[0], -1)


def ref_vq_decode_code(sd, codes, grid, levels, res):
    emb = F.normalize(sd["quantize.embedding.weight"], dim=-1)
    z = emb[codes].reshape(codes.shape[0], grid, grid, -1).permute(0, 3, 1, 2)
    h = _conv(_conv(z, sd, "post_quant_conv"), sd, "decoder.conv_in", padding=1)
    h = ref_attn(ref_res(h, sd, "decoder.mid.0"), sd, "decoder.mid.1")
    h = ref_res(h, sd, "decoder.mid.2")
    for i in range(levels):
        for j in range(res + 1):
            h = ref_res(h, sd, f"decoder.conv_blocks.{i}.res.{j}")
            if i == 0:
                h = ref_attn(h, sd, f"decoder.conv_blocks.{i}.attn.{j}")
        if i != levels - 1:
            h = _conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), sd, f"decoder.conv_blocks.{i}.upsample.conv",
                      padding=1)
    return _conv(F.silu(_gn(h, sd, "decoder.norm_out")), sd, "decoder.conv_out", padding=1)


# ---------------------------------------------------------------------------------------------
# tiny random checkpoints in the official key layout


def official_gpt_state(seed=0, std=0.3, with_buffers=True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=std):
        return torch.randn(*shape, generator=g) * s

    head_dim = D // HEADS
    sd = {"tok_embeddings.weight": r(V, D, s=1.0), "cls_embedding.embedding_table.weight": r(C + 1, D, s=1.0),
          "norm.weight": 1 + r(D, s=0.1), "output.weight": r(V, D, s=0.1)}  # logits O(1)
    for i in range(LAYERS):
        p = f"layers.{i}."
        sd[p + "attention.wqkv.weight"] = r((HEADS + 2 * KV_HEADS) * head_dim, D)
        sd[p + "attention.wo.weight"] = r(D, D)
        sd[p + "feed_forward.w1.weight"] = r(FFN, D)
        sd[p + "feed_forward.w3.weight"] = r(FFN, D)
        sd[p + "feed_forward.w2.weight"] = r(D, FFN)
        sd[p + "attention_norm.weight"] = 1 + r(D, s=0.1)
        sd[p + "ffn_norm.weight"] = 1 + r(D, s=0.1)
        if with_buffers:  # saved after setup_caches: dropped by the converter
            sd[p + "attention.kv_cache.k_cache"] = torch.zeros(2, HEADS, 24, head_dim)
            sd[p + "attention.kv_cache.v_cache"] = torch.zeros(2, HEADS, 24, head_dim)
    if with_buffers:
        sd["freqs_cis"] = ref_freqs_cis_2d(GRID, head_dim)
    return sd


VQ_CH, VQ_MULT, VQ_RES, VQ_Z, VQ_D, VQ_IMAGE = 32, (1, 2, 2), 1, 32, 4, 16  # 16 px -> 4x4 tokens


def official_vq_state(seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def conv(p, cin, cout, k=3):
        sd[p + ".weight"] = torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5
        sd[p + ".bias"] = torch.randn(cout, generator=g) * 0.05

    def norm(p, c):
        sd[p + ".weight"] = 1 + torch.randn(c, generator=g) * 0.1
        sd[p + ".bias"] = torch.randn(c, generator=g) * 0.1

    def res(p, cin, cout):
        norm(p + ".norm1", cin)
        conv(p + ".conv1", cin, cout)
        norm(p + ".norm2", cout)
        conv(p + ".conv2", cout, cout)
        if cin != cout:
            conv(p + ".nin_shortcut", cin, cout, 1)

    def attn(p, c):
        norm(p + ".norm", c)
        for n in ("q", "k", "v", "proj_out"):
            conv(f"{p}.{n}", c, c, 1)

    levels = len(VQ_MULT)
    conv("encoder.conv_in", 3, VQ_CH)
    block_in = VQ_CH
    for i, m in enumerate(VQ_MULT):
        for j in range(VQ_RES):
            res(f"encoder.conv_blocks.{i}.res.{j}", block_in, VQ_CH * m)
            block_in = VQ_CH * m
            if i == levels - 1:
                attn(f"encoder.conv_blocks.{i}.attn.{j}", block_in)
        if i != levels - 1:
            conv(f"encoder.conv_blocks.{i}.downsample.conv", block_in, block_in)
    res("encoder.mid.0", block_in, block_in)
    attn("encoder.mid.1", block_in)
    res("encoder.mid.2", block_in, block_in)
    norm("encoder.norm_out", block_in)
    conv("encoder.conv_out", block_in, VQ_Z)
    conv("quant_conv", VQ_Z, VQ_D, 1)
    conv("post_quant_conv", VQ_D, VQ_Z, 1)
    sd["quantize.embedding.weight"] = torch.randn(V, VQ_D, generator=g) * 0.3  # not unit: the converter normalises
    sd["quantize.codebook_used"] = torch.zeros(65536)
    block_in = VQ_CH * VQ_MULT[-1]
    conv("decoder.conv_in", VQ_Z, block_in)
    res("decoder.mid.0", block_in, block_in)
    attn("decoder.mid.1", block_in)
    res("decoder.mid.2", block_in, block_in)
    for i, m in enumerate(reversed(VQ_MULT)):
        for j in range(VQ_RES + 1):
            res(f"decoder.conv_blocks.{i}.res.{j}", block_in, VQ_CH * m)
            block_in = VQ_CH * m
            if i == 0:
                attn(f"decoder.conv_blocks.{i}.attn.{j}", block_in)
        if i != levels - 1:
            conv(f"decoder.conv_blocks.{i}.upsample.conv", block_in, block_in)
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", block_in, 3)
    return sd


@pytest.fixture(scope="module")
def gpt_state():
    return official_gpt_state()


@pytest.fixture(scope="module")
def vq_state():
    return official_vq_state()


@pytest.fixture(scope="module")
def teacher(gpt_state, vq_state):
    vq = convert_vq(vq_state, image_size=VQ_IMAGE)
    gpt = convert_gpt(gpt_state, num_heads=HEADS)
    return build_llamagen_teacher(vq, gpt, guidance_scale=2.0, top_k=20, top_p=0.95)


# ---------------------------------------------------------------------------------------------
# the GPT


def test_rope_table_is_llamagens_2d_layout():
    head_dim = 16
    ours = rope_2d_table([GRID, GRID], head_dim)
    assert torch.equal(ours, ref_freqs_cis_2d(GRID, head_dim))
    assert ours.shape == (1 + GRID * GRID, head_dim // 2, 2) and not ours[0].any()  # zero class row
    # grid cell (r, c): the first head_dim/4 pairs turn by r * f_k, the last head_dim/4 by c * f_k
    r, c = 2, 3
    angles = torch.atan2(ours[1 + r * GRID + c, :, 1], ours[1 + r * GRID + c, :, 0])
    f = 1.0 / 10000 ** (torch.arange(0, head_dim // 2, 2).float() / (head_dim // 2))
    assert torch.allclose(angles, torch.cat([r * f, c * f]), atol=1e-5)
    # interleaved pairs: (x0, x1) rotate together; the class position's q / k become zero
    x = torch.randn(1, 2, 1, head_dim)
    out = apply_rope(x, ours[[0, 1 + r * GRID + c]])
    assert not out[0, 0].any()
    a = angles[0]
    assert torch.allclose(out[0, 1, 0, :2], torch.stack([x[0, 1, 0, 0] * a.cos() - x[0, 1, 0, 1] * a.sin(),
                                                         x[0, 1, 0, 1] * a.cos() + x[0, 1, 0, 0] * a.sin()]), atol=1e-6)


def test_converted_gpt_equals_the_official_forward(gpt_state, teacher):
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 3, 9, 10])  # 10 = the null class
    idx = torch.randint(0, V, (4, GRID * GRID), generator=g)
    expected = ref_gpt_logits(gpt_state, labels, idx)
    assert expected.std() > 0.5  # a non-trivial model
    gpt = teacher.transformer
    ids = torch.cat([labels[:, None] + V, idx], 1)
    got = gpt(input_ids=ids).logits
    assert got.shape == (4, 1 + GRID * GRID, V) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(teacher.forward_logits(idx, labels), expected, atol=1e-5, rtol=1e-5)
    # the same weights with 1-D RoPE (a stock Llama layout) would not match: the 2-D layout matters
    grid_as_line = ref_freqs_cis_2d(GRID, D // HEADS)
    assert not torch.allclose(grid_as_line[2], grid_as_line[1 + GRID])  # (0, 1) and (1, 0) differ
    # an extra table row (a DD student's resized vocabulary) does not change the computation
    student = LlamaGenGPT.from_config(gpt.config)
    student.load_state_dict(gpt.state_dict())
    student.resize_token_embeddings(V + C + 1 + 6)
    assert student.config.vocab_size == V + C + 7
    torch.testing.assert_close(student(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_kv_cached_sampling_equals_uncached_and_llamagens_loop(gpt_state, teacher):
    """teacher.sample (KV cache, CFG as a doubled batch, filters) draws the tokens LlamaGen's
    loop -- re-run here from scratch at every step, uncached -- gives the same uniforms."""
    labels = torch.tensor([1, 5, 7])
    gens = [torch.Generator().manual_seed(10 + i) for i in range(3)]
    tokens = teacher.sample(class_labels=labels, generator=gens)
    gens = [torch.Generator().manual_seed(10 + i) for i in range(3)]
    prefix = torch.zeros(3, 0, dtype=torch.long)
    for i in range(GRID * GRID):
        p = ref_probs(gpt_state, labels, prefix, 2.0, top_k=20, top_p=0.95)
        ours = teacher.probs(prefix, labels)  # uncached: the whole prefix again
        torch.testing.assert_close(ours, p, atol=1e-5, rtol=1e-5)
        assert ((p > 0).sum(-1) <= 20).all()
        u = torch.cat([torch.rand(1, generator=gg, dtype=torch.float64) for gg in gens])
        cdf = torch.cumsum(p.double(), -1)
        nxt = torch.searchsorted(cdf / cdf[:, -1:], u[:, None], right=True).squeeze(-1).clamp_max(V - 1)
        assert torch.equal(nxt, tokens[:, i]), i
        prefix = torch.cat([prefix, nxt[:, None]], 1)
    # every step's cached logits equal the uncached ones (deterministic choice: argmax)
    seen = []

    def choose(i, logits):
        seen.append(logits)
        return logits.argmax(-1)

    greedy = teacher.generate(labels, choose)
    for i in range(GRID * GRID):
        uncached = teacher.logits(greedy[:, :i], labels)
        torch.testing.assert_close(seen[i], uncached, atol=1e-5, rtol=1e-5)


def test_kv_cache_chunks_equal_one_pass(teacher):
    gpt = teacher.transformer
    ids = torch.randint(0, V, (2, GRID * GRID), generator=torch.Generator().manual_seed(5))
    ids = torch.cat([torch.tensor([[V + 2], [V + C]]), ids], 1)
    full = gpt(input_ids=ids).logits
    out = gpt(input_ids=ids[:, :5], use_cache=True)
    cache = out.past_key_values
    parts = [out.logits]
    for a, b in [(5, 6), (6, 11), (11, 1 + GRID * GRID)]:  # one token, then chunks (a causal mask inside)
        out = gpt(input_ids=ids[:, a:b], past_key_values=cache, use_cache=True)
        assert out.past_key_values is cache and cache.get_seq_length() == b  # filled in place
        parts.append(out.logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="exceed"):
        gpt(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)


def test_cfg_and_top_k_behaviour(gpt_state, teacher):
    labels = torch.tensor([2, 4])
    prefix = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(3))
    for scale, k, p in [(1.0, 0, 1.0), (2.0, 0, 1.0), (4.0, 8, 1.0), (2.0, 0, 0.5), (1.5, 12, 0.9)]:
        ours = teacher.probs(prefix, labels, guidance_scale=scale, top_k=k, top_p=p)
        torch.testing.assert_close(ours, ref_probs(gpt_state, labels, prefix, scale, top_k=k, top_p=p),
                                   atol=1e-5, rtol=1e-5)
        if k and p == 1.0:
            assert ((ours > 0).sum(-1) == k).all()
        if p < 1.0 and not k:  # nucleus: the smallest set of most likely codes whose mass reaches p
            full = teacher.probs(prefix, labels, guidance_scale=scale, top_k=0, top_p=1.0)
            cum = torch.sort(full, -1, descending=True).values.cumsum(-1)
            assert torch.equal((ours > 0).sum(-1), (cum < p).sum(-1) + 1)
    cond = torch.softmax(teacher.forward_logits(prefix, labels)[:, -1], -1)
    torch.testing.assert_close(teacher.probs(prefix, labels, guidance_scale=1.0, top_k=0, top_p=1.0), cond)
    assert not torch.allclose(teacher.probs(prefix, labels, guidance_scale=3.0, top_k=0, top_p=1.0), cond, atol=1e-3)


def test_class_dropout_only_when_asked(teacher):
    gpt = LlamaGenGPT.from_config({**teacher.transformer.config, "class_dropout_prob": 1.0})
    gpt.load_state_dict(teacher.transformer.state_dict())
    gpt.train()
    ids = torch.cat([torch.tensor([[V + 3]] * 2), torch.randint(0, V, (2, 4))], 1)
    null = ids.clone()
    null[:, 0] = V + C
    dropped = gpt(input_ids=ids, class_dropout=True).logits
    torch.testing.assert_close(dropped, gpt(input_ids=null).logits)
    assert not torch.allclose(gpt(input_ids=ids).logits, dropped)  # a plain training-mode forward keeps it
    half = LlamaGenGPT.from_config({**teacher.transformer.config, "class_dropout_prob": 0.5})
    out = half.drop_classes(torch.full((4000,), V + 1), generator=torch.Generator().manual_seed(0))
    assert 0.45 < (out == V + C).float().mean() < 0.55 and set(out.tolist()) == {V + 1, V + C}


# ---------------------------------------------------------------------------------------------
# the VQ tokenizer


def test_converted_vq_equals_the_official_tokenizer(vq_state, teacher):
    levels = len(VQ_MULT)
    x = torch.rand(3, 3, VQ_IMAGE, VQ_IMAGE, generator=torch.Generator().manual_seed(2)) * 2 - 1
    vq = teacher.vqvae
    with torch.no_grad():
        torch.testing.assert_close(vq.encode(x).latents, ref_vq_encode(vq_state, x, levels, VQ_RES), atol=1e-5, rtol=1e-5)
        codes = ref_vq_indices(vq_state, x, levels, VQ_RES)
        assert len(set(codes.flatten().tolist())) > 4
        assert torch.equal(teacher.encode(x), codes) and torch.equal(l2_quantize_indices(vq, x), codes)
        from stepdistill.pipelines.ar_image import decode_tokens

        expected = ref_vq_decode_code(vq_state, codes, GRID, levels, VQ_RES)
        torch.testing.assert_close(decode_tokens(vq, codes, (GRID, GRID)), expected, atol=1e-5, rtol=1e-5)
    norms = teacher.codebook.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))  # stored L2-normalised
    assert teacher.grid_size == (GRID, GRID) and teacher.image_shape == (3, VQ_IMAGE, VQ_IMAGE)


# ---------------------------------------------------------------------------------------------
# the converter: errors, files, folders


def test_gpt_converter_errors_name_the_keys(gpt_state):
    def fails(state, match, **kw):
        with pytest.raises(ConversionError, match=match):
            convert_gpt(state, **{"num_heads": HEADS, **kw})

    bad = dict(gpt_state)
    del bad["layers.1.feed_forward.w3.weight"]
    fails(bad, r"missing: \['layers\.1\.feed_forward\.w3\.weight'\]")
    fails({**gpt_state, "layers.0.attention.bias": torch.zeros(3)}, r"unexpected key\(s\): \['layers\.0\.attention\.bias'\]")
    fails({**gpt_state, "norm.weight": torch.ones(D + 1)}, r"norm\.weight has shape \(65,\), expected \(64,\)")
    fails({**gpt_state, "freqs_cis": ref_freqs_cis_2d(GRID, D // HEADS, base=500)}, "freqs_cis")
    fails(gpt_state, "gpt_model", num_heads=None)
    fails(gpt_state, "GPT-L has 24", gpt_model="GPT-L", num_heads=None)
    fails({k: v for k, v in gpt_state.items() if k != "tok_embeddings.weight"}, "tok_embeddings")
    fails({**gpt_state, "cls_embedding.embedding_table.weight": torch.zeros(C, D)}, "null-class row", num_classes=C)
    fails({**gpt_state, "cls_embedding.cap_proj.fc1.weight": torch.zeros(2, 2)}, "text-conditional")
    model = convert_gpt({f"module.{k}": v for k, v in official_gpt_state(with_buffers=False).items()}, num_heads=HEADS)
    assert model.config.num_kv_heads == KV_HEADS and model.config.grid_size == [16, 16]  # no freqs_cis: the default


def test_vq_converter_errors_name_the_keys(vq_state):
    bad = {k: v for k, v in vq_state.items() if k != "decoder.conv_blocks.0.attn.1.q.weight"}
    with pytest.raises(ConversionError, match=r"decoder\.conv_blocks\.0\.attn\.1\.q\.weight"):
        convert_vq(bad, image_size=VQ_IMAGE)
    with pytest.raises(ConversionError, match=r"unexpected key\(s\): \['encoder\.conv_blocks\.0\.attn\.0\.q\.weight'\]"):
        convert_vq({**vq_state, "encoder.conv_blocks.0.attn.0.q.weight": torch.zeros(32, 32, 1, 1)}, image_size=VQ_IMAGE)
    with pytest.raises(ConversionError, match="quantize.embedding"):
        convert_vq({k: v for k, v in vq_state.items() if not k.startswith("quantize.embedding")})


def test_checkpoint_files_and_teacher_folder(gpt_state, vq_state, teacher, tmp_path):
    from safetensors.torch import save_file

    torch.save({"model": gpt_state, "steps": torch.tensor(7)}, tmp_path / "gpt.pt")
    save_file({k: v.contiguous() for k, v in vq_state.items()}, str(tmp_path / "vq.safetensors"))
    assert load_checkpoint(tmp_path / "gpt.pt").keys() == gpt_state.keys()

    import argparse

    torch.save({"model": argparse.Namespace(x=1)}, tmp_path / "evil.pt")  # weights_only refuses to unpickle it
    with pytest.raises(ConversionError, match="weights_only"):
        load_checkpoint(tmp_path / "evil.pt")
    out = tmp_path / "llamagen-ar"
    converted = convert_llamagen(tmp_path / "gpt.pt", tmp_path / "vq.safetensors", out, gpt_model=None,
                                 num_heads=HEADS, image_size=VQ_IMAGE, guidance_scale=2.0, top_k=20, top_p=0.95)
    index = json.loads((out / "model_index.json").read_text())
    assert index["transformer"] == ["llamagen_gpt", "LlamaGenGPT"] and index["vqvae"] == ["diffusers", "VQModel"]
    assert (out / "transformer" / "llamagen_gpt.py").read_bytes() == (PIPELINES / "llamagen_gpt.py").read_bytes()
    loaded = ARTeacher.from_pretrained(out)
    assert type(loaded.transformer) is LlamaGenGPT and loaded.settings() == teacher.settings()
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
    expected = teacher.sample(class_labels=[3, 4], generator=gens())
    assert torch.equal(loaded.sample(class_labels=[3, 4], generator=gens()), expected)
    assert torch.equal(converted.sample(class_labels=[3, 4], generator=gens()), expected)
    assert loaded.digest() == teacher.digest()


def test_converter_command_line(gpt_state, vq_state, tmp_path, capsys):
    from stepdistill.teachers.convert_llamagen import main

    torch.save({"model": gpt_state}, tmp_path / "gpt.pt")
    torch.save({"model": vq_state}, tmp_path / "vq.pt")
    argv = ["--gpt", str(tmp_path / "gpt.pt"), "--vq", str(tmp_path / "vq.pt"), "--image-size", str(VQ_IMAGE)]
    assert main([*argv, "--output", str(tmp_path / "bad")]) == 2  # GPT-L by default: the tiny model is not GPT-L
    assert "GPT-L has 24 of 1024" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main([*argv, "--output", str(tmp_path / "ok"), "--num-heads", str(HEADS), "--top-k", "20"]) == 0
    loaded = ARTeacher.from_pretrained(tmp_path / "ok")
    assert loaded.settings() == {"guidance_scale": 2.0, "temperature": 1.0, "top_k": 20, "top_p": 1.0}


# ---------------------------------------------------------------------------------------------
# Distilled Decoding on a tiny LlamaGen teacher -> export -> plain diffusers


def test_dd_trains_on_a_llamagen_teacher_and_exports_for_plain_diffusers(teacher, tmp_path):
    from stepdistill.algorithms.distilled_decoding import DDConfig, DistilledDecoding
    from stepdistill.config import TrainConfig
    from stepdistill.eval.generate import folder_code_is_ours
    from stepdistill.export import export_ar_teacher_pipeline, export_dd_pipeline
    from stepdistill.pipelines.distilled_decoding import DistilledDecodingPipeline
    from stepdistill.teachers.llamagen import load_pipeline
    from stepdistill.training import train

    d = DistilledDecoding(teacher, DDConfig(num_pairs=16, shard_size=16, pairs_dir=str(tmp_path / "pairs"),
                                            flow_steps=4, flow_dtype="float32", codebook_scale=1.0,
                                            split_points=[0, 8]))
    assert type(d.student.transformer) is LlamaGenGPT
    before = {k: v.clone() for k, v in d.student.state_dict().items()}
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=2, batch_size=8, default_lr=1e-3,
                      checkpoint_every_steps=0, sample_every_steps=0, report_to=None, progress=False, resume=None)
    result = train(d, d.make_source(seed=0), cfg)
    assert result["step"] == 2
    assert any(not torch.equal(before[k], v) for k, v in d.student.state_dict().items())
    assert all(not p.requires_grad for p in teacher.parameters())
    folder = export_dd_pipeline(d.student, teacher, tmp_path / "dd", paper=d.paper, num_inference_steps=2)
    ar_folder = export_ar_teacher_pipeline(teacher, tmp_path / "ar")
    assert "`LlamaGenGPT`" in (ar_folder / "README.md").read_text()  # the card names the LM it holds
    for f in (folder, ar_folder):
        assert json.loads((f / "model_index.json").read_text())["transformer"] == ["llamagen_gpt", "LlamaGenGPT"]
        assert folder_code_is_ours(f) == (True, [])  # stepdistill's eval runs it without an opt-in
    noise = torch.randn(3, GRID * GRID, VQ_D, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([0, 5, 9])
    with torch.no_grad():
        expected = {k: d.student(noise, labels, num_steps=k).tolist() for k in (1, 2)}
    direct = load_pipeline(DistilledDecodingPipeline, folder)  # in-process, the installed classes
    assert direct(class_labels=labels, noise=noise, output_type="tokens").images.tolist() == expected[2]
    ar_expected = teacher.sample(class_labels=[1, 2], generator=[torch.Generator().manual_seed(i) for i in range(2)])
    torch.save({"noise": noise, "labels": labels}, tmp_path / "inputs.pt")
    code = textwrap.dedent(
        f"""
        import json, sys, torch
        from diffusers import DiffusionPipeline
        inp = torch.load({str(tmp_path / "inputs.pt")!r}, weights_only=True)
        pipe = DiffusionPipeline.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(pipe).__name__ == "DistilledDecodingPipeline" and type(pipe.transformer).__name__ == "LlamaGenGPT"
        out = {{k: pipe(class_labels=inp["labels"], noise=inp["noise"], num_inference_steps=k,
                        output_type="tokens").images.tolist() for k in (1, 2)}}
        img = pipe(class_labels=[0, 1], generator=torch.Generator().manual_seed(0), output_type="np").images
        ar = DiffusionPipeline.from_pretrained({str(ar_folder)!r}, trust_remote_code=True)
        ar_tok = ar(class_labels=[1, 2], generator=[torch.Generator().manual_seed(i) for i in range(2)],
                    output_type="tokens").images
        assert "stepdistill" not in sys.modules
        print(json.dumps({{"dd": out, "shape": list(img.shape), "ar": ar_tok.tolist()}}))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DIFFUSERS_VERBOSITY": "error"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["dd"]["1"] == expected[1] and got["dd"]["2"] == expected[2]
    assert got["shape"] == [2, VQ_IMAGE, VQ_IMAGE, 3] and got["ar"] == ar_expected.tolist()


def test_llamagen_preset_names_the_converter_and_the_published_numbers():
    from stepdistill.config import load_config

    cfg = load_config("llamagen/dd")
    text = (Path(__file__).resolve().parents[1] / "configs" / "llamagen" / "dd.yaml").read_text()
    assert "stepdistill.teachers.convert_llamagen" in text
    for number in ("4.11", "11.35", "7.58"):
        assert number in cfg.description
    assert cfg.teacher.kind == "ar" and cfg.teacher.guidance_scale == 2.0 and cfg.teacher.params["top_k"] == 8000
