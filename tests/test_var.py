"""VAR teacher at paper fidelity and Distilled Decoding over scales.

Tiny random checkpoints are written here in the *official* key layout (FoundationVision/VAR
``vqvae.py`` / ``basic_vae.py`` / ``quant.py`` / ``var.py`` / ``basic_var.py``, built key by key from
the official module structure, including its buffers), converted with ``convert_var``, and checked
against an independent functional re-implementation of the official computation written below
(explicit softmax attention, the official ``bmm`` attention block, residual quantisation with the
official phi ticks, ``idxBl_to_var_input``, ``embed_to_fhat``, ``autoregressive_infer_cfg``'s CFG ramp
and ``sample_with_top_k_top_p_``'s filters).  Then: KV-cached == uncached, DD's per-scale flow map,
the DD student's mask and two-step reuse, a few training steps whose loss falls, and the exported
folder loaded by plain diffusers in a fresh process.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stepdistill.pipelines.var_model import (
    VARDDStudent,
    var_dd_generate,
    var_filter_logits,
    var_generate,
)
from stepdistill.teachers.convert_var import ConversionError, convert_transformer, convert_var, convert_vqvae
from stepdistill.teachers.var import (
    VARDDGenerator,
    VARTeacher,
    export_var_dd,
    train_var_dd,
    var_dd_loss,
    var_token_map,
)

PNS = (1, 2, 4)
V, CVAE, CH, CH_MULT, NRB = 16, 8, 32, (1, 2, 2), 1
IMG = PNS[-1] * 2 ** (len(CH_MULT) - 1)  # 16
NC, DEPTH, C, HEADS = 5, 2, 32, 2
L = sum(p * p for p in PNS)


# ---------------------------------------------------------------------------------------------
# tiny checkpoints in the official key layout


def _rand(g, *shape, std=0.1):
    return torch.randn(*shape, generator=g) * std


def official_vae_state(seed=0, share_quant_resi=4, using_sa=True, using_mid_sa=True) -> dict:
    """``VQVAE(vocab_size=V, z_channels=CVAE, ch=CH, ...).state_dict()`` key by key (official structure)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def conv(name, cin, cout, k):
        sd[name + ".weight"] = _rand(g, cout, cin, k, k, std=1.0 / math.sqrt(cin * k * k))
        sd[name + ".bias"] = _rand(g, cout, std=0.02)

    def gn(name, c):
        sd[name + ".weight"] = 1 + _rand(g, c)
        sd[name + ".bias"] = _rand(g, c)

    def res(name, cin, cout):
        gn(name + ".norm1", cin)
        conv(name + ".conv1", cin, cout, 3)
        gn(name + ".norm2", cout)
        conv(name + ".conv2", cout, cout, 3)
        if cin != cout:
            conv(name + ".nin_shortcut", cin, cout, 1)

    def attn(name, c):
        gn(name + ".norm", c)
        conv(name + ".qkv", c, 3 * c, 1)
        conv(name + ".proj_out", c, c, 1)

    n = len(CH_MULT)
    in_mult = (1,) + CH_MULT
    conv("encoder.conv_in", 3, CH, 3)
    for i in range(n):
        bi, bo = CH * in_mult[i], CH * CH_MULT[i]
        for j in range(NRB):
            res(f"encoder.down.{i}.block.{j}", bi, bo)
            bi = bo
            if i == n - 1 and using_sa:
                attn(f"encoder.down.{i}.attn.{j}", bi)
        if i != n - 1:
            conv(f"encoder.down.{i}.downsample.conv", bi, bi, 3)
    res("encoder.mid.block_1", bi, bi)
    if using_mid_sa:
        attn("encoder.mid.attn_1", bi)
    res("encoder.mid.block_2", bi, bi)
    gn("encoder.norm_out", bi)
    conv("encoder.conv_out", bi, CVAE, 3)
    bi = CH * CH_MULT[-1]
    conv("decoder.conv_in", CVAE, bi, 3)
    res("decoder.mid.block_1", bi, bi)
    if using_mid_sa:
        attn("decoder.mid.attn_1", bi)
    res("decoder.mid.block_2", bi, bi)
    for i in reversed(range(n)):
        bo = CH * CH_MULT[i]
        for j in range(NRB + 1):
            res(f"decoder.up.{i}.block.{j}", bi, bo)
            bi = bo
            if i == n - 1 and using_sa:
                attn(f"decoder.up.{i}.attn.{j}", bi)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", bi, bi, 3)
    gn("decoder.norm_out", bi)
    conv("decoder.conv_out", bi, 3, 3)
    sd["quantize.embedding.weight"] = torch.randn(V, CVAE, generator=g)
    sd["quantize.ema_vocab_hit_SV"] = torch.rand(len(PNS), V, generator=g)
    if share_quant_resi == 0:
        for k in range(len(PNS)):
            conv(f"quantize.quant_resi.{k}", CVAE, CVAE, 3)
    elif share_quant_resi == 1:
        conv("quantize.quant_resi.qresi", CVAE, CVAE, 3)
    else:
        for k in range(share_quant_resi):
            conv(f"quantize.quant_resi.qresi_ls.{k}", CVAE, CVAE, 3)
    conv("quant_conv", CVAE, CVAE, 3)
    conv("post_quant_conv", CVAE, CVAE, 3)
    return sd


def official_var_state(seed=1, shared_aln=False, attn_l2_norm=True) -> dict:
    """``VAR(...).state_dict()`` key by key (official structure, buffers included)."""
    g = torch.Generator().manual_seed(seed)
    sd = {"word_embed.weight": _rand(g, C, CVAE, std=0.3), "word_embed.bias": _rand(g, C),
          "class_emb.weight": _rand(g, NC + 1, C, std=0.5), "pos_start": _rand(g, 1, PNS[0] ** 2, C, std=0.3),
          "pos_1LC": _rand(g, 1, L, C, std=0.3), "lvl_embed.weight": _rand(g, len(PNS), C, std=0.3)}
    if shared_aln:
        sd["shared_ada_lin.1.weight"] = _rand(g, 6 * C, C, std=0.2)
        sd["shared_ada_lin.1.bias"] = _rand(g, 6 * C)
    for i in range(DEPTH):
        p = f"blocks.{i}."
        if attn_l2_norm:
            sd[p + "attn.scale_mul_1H11"] = torch.full((1, HEADS, 1, 1), 4.0).log() + _rand(g, 1, HEADS, 1, 1)
        sd[p + "attn.q_bias"] = _rand(g, C)
        sd[p + "attn.v_bias"] = _rand(g, C)
        sd[p + "attn.zero_k_bias"] = torch.zeros(C)
        sd[p + "attn.mat_qkv.weight"] = _rand(g, 3 * C, C, std=0.3)
        sd[p + "attn.proj.weight"] = _rand(g, C, C, std=0.3)
        sd[p + "attn.proj.bias"] = _rand(g, C)
        sd[p + "ffn.fc1.weight"] = _rand(g, 4 * C, C, std=0.3)
        sd[p + "ffn.fc1.bias"] = _rand(g, 4 * C)
        sd[p + "ffn.fc2.weight"] = _rand(g, C, 4 * C, std=0.2)
        sd[p + "ffn.fc2.bias"] = _rand(g, C)
        if shared_aln:
            sd[p + "ada_gss"] = _rand(g, 1, 1, 6, C, std=0.3)
        else:
            sd[p + "ada_lin.1.weight"] = _rand(g, 6 * C, C, std=0.2)
            sd[p + "ada_lin.1.bias"] = _rand(g, 6 * C)
    sd["head_nm.ada_lin.1.weight"] = _rand(g, 2 * C, C, std=0.2)
    sd["head_nm.ada_lin.1.bias"] = _rand(g, 2 * C)
    sd["head.weight"] = _rand(g, V, C, std=1.0)
    sd["head.bias"] = _rand(g, V)
    d = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(PNS)]).view(1, L, 1)
    dt = d.transpose(1, 2)
    sd["lvl_1L"] = dt[:, 0].contiguous()
    sd["attn_bias_for_masking"] = torch.where(d >= dt, 0.0, -torch.inf).reshape(1, 1, L, L)
    return sd


# ---------------------------------------------------------------------------------------------
# the official computation, re-implemented minimally (functional; reads the official state dict)


def r_conv(sd, name, x, stride=1, pad=None):
    w = sd[name + ".weight"]
    return F.conv2d(x, w, sd[name + ".bias"], stride=stride, padding=w.shape[-1] // 2 if pad is None else pad)


def r_gn(sd, name, x):
    return F.group_norm(x, 32, sd[name + ".weight"], sd[name + ".bias"], eps=1e-6)


def r_res(sd, p, x):
    h = r_conv(sd, p + ".conv1", F.silu(r_gn(sd, p + ".norm1", x)))
    h = r_conv(sd, p + ".conv2", F.silu(r_gn(sd, p + ".norm2", h)))
    sc = r_conv(sd, p + ".nin_shortcut", x) if p + ".nin_shortcut.weight" in sd else x
    return sc + h


def r_attn(sd, p, x):
    qkv = r_conv(sd, p + ".qkv", r_gn(sd, p + ".norm", x))
    b, _, h, w = qkv.shape
    c = x.shape[1]
    q, k, v = qkv.reshape(b, 3, c, h, w).unbind(1)
    q = q.reshape(b, c, h * w).permute(0, 2, 1)
    k = k.reshape(b, c, h * w)
    wts = F.softmax(torch.bmm(q, k) * c ** (-0.5), dim=2)
    out = torch.bmm(v.reshape(b, c, h * w), wts.permute(0, 2, 1)).reshape(b, c, h, w)
    return x + r_conv(sd, p + ".proj_out", out)


def r_encoder(sd, x):
    n = len(CH_MULT)
    h = r_conv(sd, "encoder.conv_in", x)
    for i in range(n):
        for j in range(NRB):
            h = r_res(sd, f"encoder.down.{i}.block.{j}", h)
            if f"encoder.down.{i}.attn.{j}.qkv.weight" in sd:
                h = r_attn(sd, f"encoder.down.{i}.attn.{j}", h)
        if i != n - 1:
            h = r_conv(sd, f"encoder.down.{i}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2, pad=0)
    h = r_res(sd, "encoder.mid.block_1", h)
    if "encoder.mid.attn_1.qkv.weight" in sd:
        h = r_attn(sd, "encoder.mid.attn_1", h)
    h = r_res(sd, "encoder.mid.block_2", h)
    return r_conv(sd, "encoder.conv_out", F.silu(r_gn(sd, "encoder.norm_out", h)))


def r_decoder(sd, z):
    n = len(CH_MULT)
    h = r_res(sd, "decoder.mid.block_1", r_conv(sd, "decoder.conv_in", z))
    if "decoder.mid.attn_1.qkv.weight" in sd:
        h = r_attn(sd, "decoder.mid.attn_1", h)
    h = r_res(sd, "decoder.mid.block_2", h)
    for i in reversed(range(n)):
        for j in range(NRB + 1):
            h = r_res(sd, f"decoder.up.{i}.block.{j}", h)
            if f"decoder.up.{i}.attn.{j}.qkv.weight" in sd:
                h = r_attn(sd, f"decoder.up.{i}.attn.{j}", h)
        if i != 0:
            h = r_conv(sd, f"decoder.up.{i}.upsample.conv", F.interpolate(h, scale_factor=2, mode="nearest"))
    return r_conv(sd, "decoder.conv_out", F.silu(r_gn(sd, "decoder.norm_out", h)))


def r_phi(sd, si, h, ratio=0.5):
    """``quant_resi[si / (SN - 1)]`` with the official Phi{Partially,Non}Shared / PhiShared rules."""
    at = si / (len(PNS) - 1)
    if "quantize.quant_resi.qresi.weight" in sd:
        name = "quantize.quant_resi.qresi"
    else:
        ks = sorted({int(k.split(".")[-2]) for k in sd if k.startswith("quantize.quant_resi.")})
        kk = len(ks)
        ticks = np.linspace(1 / 3 / kk, 1 - 1 / 3 / kk, kk) if kk == 4 else np.linspace(1 / 2 / kk, 1 - 1 / 2 / kk, kk)
        i = np.argmin(np.abs(ticks - at)).item()
        name = f"quantize.quant_resi.qresi_ls.{i}" if "quantize.quant_resi.qresi_ls.0.weight" in sd else f"quantize.quant_resi.{i}"
    return h * (1 - ratio) + r_conv(sd, name, h) * ratio


def r_f_to_idx_and_fhat(sd, f):
    """Official ``f_to_idxBl_or_fhat`` (both outputs)."""
    b, c, h, w = f.shape
    emb = sd["quantize.embedding.weight"]
    f_rest, f_hat = f.clone(), torch.zeros_like(f)
    idx_out, fhat_out = [], []
    sn = len(PNS)
    for si, pn in enumerate(PNS):
        z = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != sn - 1 else f_rest
        z = z.permute(0, 2, 3, 1).reshape(-1, c)
        d = torch.sum(z.square(), dim=1, keepdim=True) + torch.sum(emb.square(), dim=1, keepdim=False)
        d.addmm_(z, emb.T, alpha=-2, beta=1)
        idx = torch.argmin(d, dim=1)
        hh = emb[idx.view(b, pn, pn)].permute(0, 3, 1, 2)
        hh = F.interpolate(hh, size=(h, w), mode="bicubic") if si != sn - 1 else hh
        hh = r_phi(sd, si, hh)
        f_hat = f_hat + hh
        f_rest = f_rest - hh
        idx_out.append(idx.reshape(b, pn * pn))
        fhat_out.append(f_hat.clone())
    return idx_out, fhat_out


def r_embed_to_fhat(sd, ms_idx):
    b = ms_idx[0].shape[0]
    emb = sd["quantize.embedding.weight"]
    hw = PNS[-1]
    f_hat = torch.zeros(b, CVAE, hw, hw)
    for si, pn in enumerate(PNS):
        h = emb[ms_idx[si]].transpose(1, 2).reshape(b, CVAE, pn, pn)
        if si < len(PNS) - 1:
            h = F.interpolate(h, size=(hw, hw), mode="bicubic")
        f_hat = f_hat + r_phi(sd, si, h)
    return f_hat


def r_idxbl_to_var_input(sd, ms_idx):
    b = ms_idx[0].shape[0]
    emb = sd["quantize.embedding.weight"]
    hw = PNS[-1]
    f_hat = torch.zeros(b, CVAE, hw, hw)
    nxt = []
    for si in range(len(PNS) - 1):
        pn = PNS[si]
        h = F.interpolate(emb[ms_idx[si]].transpose(1, 2).reshape(b, CVAE, pn, pn), size=(hw, hw), mode="bicubic")
        f_hat = f_hat + r_phi(sd, si, h)
        pn_next = PNS[si + 1]
        nxt.append(F.interpolate(f_hat, size=(pn_next, pn_next), mode="area").reshape(b, CVAE, -1).transpose(1, 2))
    return torch.cat(nxt, 1)


def r_lin(sd, name, x):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def r_var_logits(sd, labels, x_wo_first):
    """Official ``VAR.forward`` (no class dropout): logits (B, L', V)."""
    b = labels.shape[0]
    cond = sd["class_emb.weight"][labels]
    h = cond[:, None, :] + sd["pos_start"]
    if x_wo_first is not None:
        h = torch.cat([h, r_lin(sd, "word_embed", x_wo_first)], 1)
    n = h.shape[1]
    h = h + sd["lvl_embed.weight"][sd["lvl_1L"][0, :n]][None] + sd["pos_1LC"][:, :n]
    bias = sd["attn_bias_for_masking"][:, :, :n, :n]
    shared = "shared_ada_lin.1.weight" in sd
    gss = r_lin(sd, "shared_ada_lin.1", F.silu(cond)).view(-1, 1, 6, C) if shared else None
    hd = C // HEADS
    for i in range(DEPTH):
        p = f"blocks.{i}."
        if shared:
            g1, g2, s1, s2, b1, b2 = (sd[p + "ada_gss"] + gss).unbind(2)
        else:
            g1, g2, s1, s2, b1, b2 = r_lin(sd, p + "ada_lin.1", F.silu(cond)).view(-1, 1, 6, C).unbind(2)
        x = F.layer_norm(h, (C,), eps=1e-6) * (s1 + 1) + b1
        qkv = x @ sd[p + "attn.mat_qkv.weight"].T + torch.cat([sd[p + "attn.q_bias"], torch.zeros(C), sd[p + "attn.v_bias"]])
        q, k, v = qkv.view(b, n, 3, HEADS, hd).permute(2, 0, 3, 1, 4).unbind(0)
        if p + "attn.scale_mul_1H11" in sd:
            q = F.normalize(q, dim=-1) * sd[p + "attn.scale_mul_1H11"].clamp_max(math.log(100)).exp()
            k = F.normalize(k, dim=-1)
            scale = 1.0
        else:
            scale = 0.25 / math.sqrt(hd)
        a = torch.softmax(q * scale @ k.transpose(-2, -1) + bias, -1) @ v
        h = h + r_lin(sd, p + "attn.proj", a.transpose(1, 2).reshape(b, n, C)) * g1
        x = F.layer_norm(h, (C,), eps=1e-6) * (s2 + 1) + b2
        h = h + r_lin(sd, p + "ffn.fc2", F.gelu(r_lin(sd, p + "ffn.fc1", x), approximate="tanh")) * g2
    scale, shift = r_lin(sd, "head_nm.ada_lin.1", F.silu(cond)).view(-1, 1, 2, C).unbind(2)
    return r_lin(sd, "head", F.layer_norm(h, (C,), eps=1e-6) * (scale + 1) + shift)


def r_top_k_top_p(logits, top_k, top_p):
    """The filtering half of the official ``sample_with_top_k_top_p_`` (in place on a copy)."""
    logits = logits.clone()
    if top_k > 0:
        remove = logits < logits.topk(top_k, largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits.masked_fill_(remove, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        logits.masked_fill_(remove.scatter(sorted_idx.ndim - 1, sorted_idx, remove), -torch.inf)
    return logits


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def vae_state():
    return official_vae_state()


@pytest.fixture(scope="module")
def var_state():
    return official_var_state()


@pytest.fixture(scope="module")
def teacher(vae_state, var_state):
    return convert_var(vae_state, var_state, patch_nums=PNS, guidance_scale=2.0, top_k=10, top_p=0.95)


def images(n=2, seed=3):
    return torch.rand(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------------------------------------
# 1. the teacher against the official computation


@pytest.mark.parametrize("share", [4, 1, 0])
def test_converted_vqvae_quantise_fhat_decode_equal_the_official(share):
    sd = official_vae_state(seed=share, share_quant_resi=share)
    vq = convert_vqvae(sd, v_patch_nums=PNS)
    assert len(vq.quantize.phi) == {4: 4, 1: 1, 0: len(PNS)}[share]
    x = images()
    with torch.no_grad():
        f_ref = r_conv(sd, "quant_conv", r_encoder(sd, x))
        idx_ref, fhat_ref = r_f_to_idx_and_fhat(sd, f_ref)
        f = vq.img_to_f(x)
        torch.testing.assert_close(f, f_ref, rtol=1e-5, atol=1e-5)
        idx = vq.quantize.f_to_idxBl_or_fhat(f_ref, to_fhat=False)
        assert [t.tolist() for t in idx] == [t.tolist() for t in idx_ref]
        tokens = torch.cat(idx_ref, 1)
        # decode via f_hat = the official embed_to_fhat; = the last f_hat of the quantiser
        fhat = vq.tokens_to_fhat(tokens)
        torch.testing.assert_close(fhat, r_embed_to_fhat(sd, idx_ref), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fhat, fhat_ref[-1], rtol=1e-4, atol=1e-4)
        img_ref = r_decoder(sd, r_conv(sd, "post_quant_conv", fhat_ref[-1])).clamp(-1, 1)
        torch.testing.assert_close(vq.decode_tokens(tokens), img_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(vq.quantize.idxBl_to_var_input(idx_ref), r_idxbl_to_var_input(sd, idx_ref),
                                   rtol=1e-5, atol=1e-5)
        assert vq.encode_tokens(x).shape == (2, L)


@pytest.mark.parametrize("shared_aln,l2", [(False, True), (True, False)])
def test_converted_transformer_equals_the_official_forward(vae_state, shared_aln, l2):
    sd = official_var_state(seed=7, shared_aln=shared_aln, attn_l2_norm=l2)
    tr = convert_transformer(sd, patch_nums=PNS, num_heads=HEADS)
    assert tr.config.shared_aln == shared_aln and tr.config.attn_l2_norm == l2 and tr.config.num_heads == HEADS
    vq = convert_vqvae(vae_state, v_patch_nums=PNS)
    labels = torch.tensor([0, 4, NC])  # NC = the null class
    g = torch.Generator().manual_seed(0)
    ms = [torch.randint(0, V, (3, p * p), generator=g) for p in PNS]
    with torch.no_grad():
        x = vq.quantize.idxBl_to_var_input(ms)
        got = tr(labels, x).logits
        ref = r_var_logits(sd, labels, r_idxbl_to_var_input(vae_state, ms))
    assert got.shape == (3, L, V)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_kv_cached_sampling_equals_uncached_official_cfg_and_filters(teacher, vae_state, var_state):
    """Each scale's logits seen by ``choose`` in the cached loop = the official uncached forward on the
    tokens drawn so far, CFG-ramped ``(1 + t) cond - t uncond`` with ``t = cfg * k / (S - 1)``, then
    top-k, then top-p."""
    labels = torch.tensor([1, 3])
    seen = {}

    def choose(si, logits):
        seen[si] = logits.clone()
        u = torch.rand(logits.shape[:2], generator=torch.Generator().manual_seed(10 + si), dtype=torch.float64)
        from stepdistill.pipelines.var_model import var_sample_tokens

        return var_sample_tokens(logits, u)

    tokens = teacher.generate(labels, choose)
    assert tokens.shape == (2, L) and set(seen) == set(range(len(PNS)))
    ms = teacher.vqvae.split_tokens(tokens)
    with torch.no_grad():
        x = r_idxbl_to_var_input(vae_state, ms)
        both = r_var_logits(var_state, torch.cat([labels, torch.full_like(labels, NC)]), torch.cat([x, x]))
    for si, (a, e, _) in enumerate(teacher.scale_layout):
        t = 2.0 * si / (len(PNS) - 1)
        ref = (1 + t) * both[:2, a:e] - t * both[2:, a:e]
        ref = r_top_k_top_p(ref, 10, 0.95)
        assert torch.equal(torch.isinf(seen[si]), torch.isinf(ref)), si
        fin = torch.isfinite(ref)
        torch.testing.assert_close(seen[si][fin], ref[fin], rtol=1e-4, atol=1e-4)
        # the uncached teacher path gives the same logits
        un = teacher.logits(tokens[:, :a], labels)
        torch.testing.assert_close(un[fin], ref[fin], rtol=1e-4, atol=1e-4)
    # the drawn tokens were never filtered codes
    for si, (a, e, _) in enumerate(teacher.scale_layout):
        assert torch.isfinite(seen[si].gather(-1, tokens[:, a:e, None])).all()


def test_filters_in_vars_order():
    p = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()[None]  # (1, 1, 4)
    # top-k 2 -> {0.4, 0.3} renormalised (0.57, 0.43); top-p 0.5 then keeps only code 0 (reversed
    # order would keep {0, 1})
    out = var_filter_logits(p, top_k=2, top_p=0.5)
    assert torch.isfinite(out).tolist() == [[[True, False, False, False]]]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 50, generator=g) * 3
    for k, tp in ((0, 0.0), (7, 0.0), (0, 0.8), (12, 0.9), (900, 0.95)):
        ref = r_top_k_top_p(logits, k if k < 50 else 0, tp)  # VAR's topk fails for k > V; we skip it
        got = var_filter_logits(logits, top_k=k, top_p=tp)
        assert torch.equal(torch.isinf(got), torch.isinf(ref)), (k, tp)
    # the most likely code survives any top-p
    assert torch.isfinite(var_filter_logits(logits, top_p=1e-6).gather(-1, logits.argmax(-1, keepdim=True))).all()


def test_cfg_zero_and_class_dropout(teacher):
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        a = teacher.logits(torch.zeros(2, 0, dtype=torch.long), labels, guidance_scale=0.0, top_k=0, top_p=0.0)
        # scale 0: t = 0 whatever the cfg, so guided = conditional
        b = teacher.logits(torch.zeros(2, 0, dtype=torch.long), labels, guidance_scale=5.0, top_k=0, top_p=0.0)
    torch.testing.assert_close(a, b)
    tr = teacher.transformer
    torch.manual_seed(0)
    x = torch.zeros(2, L - 1, CVAE)
    tr.train()
    try:
        with torch.no_grad():
            assert torch.equal(tr(labels, x).logits, tr(labels, x).logits)  # no silent dropout
    finally:
        tr.eval()


def test_converter_errors_name_the_keys(vae_state, var_state):
    bad = dict(var_state)
    bad.pop("blocks.1.ffn.fc2.weight")
    with pytest.raises(ConversionError, match=r"blocks\.1\.ffn\.fc2\.weight"):
        convert_transformer(bad, patch_nums=PNS)
    with pytest.raises(ConversionError, match="patch_nums"):
        convert_transformer(var_state, patch_nums=(1, 2, 3))
    bad = dict(vae_state)
    bad["quantize.extra.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError, match=r"quantize\.extra\.weight"):
        convert_vqvae(bad, v_patch_nums=PNS)
    with pytest.raises(ConversionError, match="ema_vocab_hit_SV"):
        convert_vqvae(vae_state, v_patch_nums=(1, 2, 3, 4))
    mask = dict(var_state)
    mask["attn_bias_for_masking"] = torch.zeros(1, 1, L, L)
    with pytest.raises(ConversionError, match="block-causal"):
        convert_transformer(mask, patch_nums=PNS)


def test_converter_command_line_and_teacher_folder(vae_state, var_state, teacher, tmp_path):
    from stepdistill.teachers.convert_var import main

    torch.save(vae_state, tmp_path / "vae.pth")
    torch.save(var_state, tmp_path / "var.pth")
    rc = main(["--vae", str(tmp_path / "vae.pth"), "--var", str(tmp_path / "var.pth"), "--output",
               str(tmp_path / "t"), "--patch-nums", "1,2,4", "--top-k", "10"])
    assert rc == 0
    loaded = VARTeacher.from_pretrained(tmp_path / "t")
    assert loaded.settings() == {"guidance_scale": 2.0, "temperature": 1.0, "top_k": 10, "top_p": 0.95}
    assert loaded.digest() == teacher.digest()
    assert main(["--vae", str(tmp_path / "vae.pth"), "--var", str(tmp_path / "var.pth"), "--output",
                 str(tmp_path / "u")]) == 2  # VAR's default 10 scales do not fit these weights


# ---------------------------------------------------------------------------------------------
# 2. the interface Distilled Decoding needs


def test_flow_map_broadcasts_over_the_token_axis():
    from stepdistill.algorithms.distilled_decoding import flow_map

    g = torch.Generator().manual_seed(0)
    codes = torch.randn(V, CVAE, generator=g)
    noise = torch.randn(2, 5, CVAE, generator=g)
    logits = torch.randn(2, 5, V, generator=g)
    logits[..., :3] = -torch.inf
    kw = {"num_steps": 6, "dtype": torch.float64}
    a = flow_map(noise, codes, logits, **kw)
    b = flow_map(noise.reshape(10, CVAE), codes, logits.reshape(10, V), **kw).reshape(2, 5)
    assert a.shape == (2, 5) and torch.equal(a, b) and bool((a >= 3).all())


def test_teacher_layout_and_token_map(teacher):
    from stepdistill.algorithms.distilled_decoding import flow_map

    assert teacher.num_tokens == L and teacher.codebook.shape == (V, CVAE) and teacher.token_order == "scales"
    assert teacher.scale_layout == [(0, 1, 1), (1, 5, 2), (5, 21, 4)]
    assert teacher.split_positions([0, 1, 2]) == [0, 1, 5]
    noise = torch.randn(3, L, CVAE, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 4])
    codes = teacher.codebook.detach().float()
    flow = {"num_steps": 6, "dtype": torch.float64}

    def fmap(z, lg):
        return flow_map(z, codes, lg, **flow)

    tokens = var_token_map(teacher, noise, labels, fmap, max_rows=7)  # chunking across rows
    assert torch.equal(tokens, teacher.token_map(noise, labels, fmap))
    for si, (a, e, _) in enumerate(teacher.scale_layout):  # each scale: flow map of the uncached p
        p = teacher.logits(tokens[:, :a], labels)
        assert torch.equal(tokens[:, a:e], flow_map(noise[:, a:e], codes, p, **flow))
    img = teacher.decode(tokens)
    assert img.shape == (3, 3, IMG, IMG) and img.abs().max() <= 1


# ---------------------------------------------------------------------------------------------
# 3. Distilled Decoding over scales


def test_dd_student_init_mask_and_two_step_reuse(teacher):
    gen = VARDDGenerator.from_teacher(teacher, split_points=[0, 2], codebook_scale=1.0)
    st = gen.transformer
    tsd = teacher.transformer.state_dict()
    ssd = st.state_dict()
    for k in ("word_embed.weight", "class_emb.weight", "pos_start", "blocks.0.attn.mat_qkv.weight", "head.weight",
              "head_nm.ada_lin.1.weight", "blocks.1.ada_lin.1.bias"):
        assert torch.equal(ssd[k], tsd[k]), k
    assert torch.equal(ssd["pos_1LC"][:, 0], tsd["pos_1LC"][:, 0]) and torch.equal(ssd["pos_1LC"][:, 2:], tsd["pos_1LC"][:, 1:])
    assert torch.equal(ssd["lvl_embed.weight"][2:], tsd["lvl_embed.weight"][1:])
    assert len(st.layerwise_n_d_embed) == DEPTH + 1 and ssd["n_d_embed.weight"].shape == (2, C)
    # mask: token j of scale k sees the earlier scales and itself, not its own scale's other noise
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, L, CVAE, generator=g)
    labels = torch.tensor([0, 3])
    is_data = torch.zeros(2, L, dtype=torch.bool)
    with torch.no_grad():
        base = st.logits(x, labels, is_data)
        x2 = x.clone()
        x2[:, 7] += 1.0  # a token of scale 2 (positions 5..20)
        moved = (st.logits(x2, labels, is_data) - base).abs().amax(-1) > 1e-6
    assert moved[:, 7].all() and not moved[:, :7].any() and not moved[:, 8:].any()
    with torch.no_grad():
        x3 = x.clone()
        x3[:, 2] += 1.0  # a token of scale 1 changes scale 2 and itself, not scale 1's others
        moved = (st.logits(x3, labels, is_data) - base).abs().amax(-1) > 1e-6
    assert moved[:, 2].all() and moved[:, 5:].all() and not moved[:, [0, 1, 3, 4]].any()
    # two steps: scales < t2 = the step-1 tokens, the rest from a second pass on the same noise
    with torch.no_grad():
        one = gen(x, labels, num_steps=1)
        two = gen(x, labels, num_steps=2)
        n = st.data_tokens(2)
        xin = x.clone()
        xin[:, :n] = gen.codes[one[:, :n]]
        manual = st.logits(xin, labels, torch.arange(L)[None].expand(2, -1) < n).argmax(-1)
    assert torch.equal(two[:, :n], one[:, :n]) and torch.equal(two[:, n:], manual[:, n:])
    tok, vec = gen.generate(x, labels, num_steps=2)  # DDStudent's generate / predict / decode shapes
    assert torch.equal(tok, two) and torch.equal(vec, gen.codes[two])
    assert gen.predict(x, labels, is_data)[1] is None
    assert torch.equal(gen.decode(teacher.vqvae, tok, vec), teacher.decode(tok))
    with pytest.raises(ValueError, match="num_inference_steps"):
        gen(x, labels, num_steps=3)
    with pytest.raises(ValueError, match="split_points"):
        VARDDStudent.from_teacher(teacher.transformer, [0, 3])


def test_var_generate_stops_after_num_scales_and_takes_a_forced_prefix(teacher):
    labels = torch.tensor([0, 3])
    g = torch.Generator().manual_seed(2)
    full = teacher.sample(class_labels=labels, generator=g)
    forced = teacher.generate(labels, lambda si, lg: full[:, teacher.scale_layout[si][0]:teacher.scale_layout[si][1]])
    assert torch.equal(forced, full)  # a choose that returns given tokens reproduces them
    two = teacher.generate(labels, lambda si, lg: full[:, teacher.scale_layout[si][0]:teacher.scale_layout[si][1]],
                           num_scales=2)
    assert torch.equal(two, full[:, :5])
    with pytest.raises(ValueError, match="num_scales"):
        teacher.generate(labels, lambda si, lg: lg.argmax(-1), num_scales=4)


@pytest.mark.parametrize("sampler", ["flow", "random"])
def test_teacher_involved_sampling_over_scales(teacher, sampler):
    """DD1's combined sampler over scales: student pass 1, keep scales < t2 - k, the teacher's scales
    t2 - k .. t2 - 1 after that prefix, the student's pass at t2 -- checked against the pieces."""
    from stepdistill.algorithms.distilled_decoding import flow_map, teacher_span_fn
    from stepdistill.pipelines.var_model import VARDDPipeline

    gen = VARDDGenerator.from_teacher(teacher, split_points=[0, 2], codebook_scale=1.0).eval()
    st = gen.transformer
    z = torch.randn(3, L, CVAE, generator=torch.Generator().manual_seed(8))
    labels = torch.tensor([0, 2, 4])
    flow = {"num_steps": 6, "dtype": torch.float64}
    gens = lambda: [torch.Generator().manual_seed(10 + i) for i in range(3)]  # noqa: E731
    with torch.no_grad():
        one = gen(z, labels, num_steps=1)
        n2 = st.data_tokens(2)
        for k in (1, 2):
            tok, vec = gen.generate(z, labels, teacher_fn=teacher_span_fn(teacher, gen.codes, flow, sampler, gens()),
                                    teacher_steps=k)
            keep = st.data_tokens(2 - k)
            assert torch.equal(tok[:, :keep], one[:, :keep])  # the student's kept scales
            # the teacher's scales after that prefix, drawn as a plain teacher call would
            fn = teacher_span_fn(teacher, gen.codes, flow, sampler, gens())
            pre = fn(labels, one[:, :keep], z, 2)
            assert pre.shape == (3, n2) and torch.equal(tok[:, :n2], pre)
            if sampler == "flow":  # the teacher's per-scale flow map of the same noise
                for si in range(2 - k, 2):
                    a, e, _ = teacher.scale_layout[si]
                    p = teacher.logits(tok[:, :a], labels)
                    assert torch.equal(tok[:, a:e], flow_map(z[:, a:e], gen.codes, p, **flow))
            xin = z.clone()
            xin[:, :n2] = gen.codes[tok[:, :n2]]
            last = st.logits(xin, labels, torch.arange(L)[None].expand(3, -1) < n2).argmax(-1)
            assert torch.equal(tok[:, n2:], last[:, n2:]) and torch.equal(vec, gen.codes[tok])
        if sampler == "flow":  # k = t2: the whole prefix is the teacher's flow map = its token map's scales
            tok, _ = gen.generate(z, labels, teacher_fn=teacher_span_fn(teacher, gen.codes, flow, sampler),
                                  teacher_steps=2)
            full = var_token_map(teacher, z, labels, lambda zz, lg: flow_map(zz, gen.codes, lg, **flow))
            assert torch.equal(tok[:, :n2], full[:, :n2])
        # the exported pipeline class takes the same teacher_fn
        pipe = VARDDPipeline(vqvae=teacher.vqvae, transformer=st, num_inference_steps=1)
        fn = teacher_span_fn(teacher, gen.codes, flow, sampler, gens())
        out = pipe(class_labels=labels, noise=z, teacher_fn=fn, teacher_steps=1, output_type="tokens").images
        ref, _ = gen.generate(z, labels, teacher_fn=teacher_span_fn(teacher, gen.codes, flow, sampler, gens()),
                              teacher_steps=1)
        assert torch.equal(out, ref)
    fn = teacher_span_fn(teacher, gen.codes, flow, sampler, gens())
    with pytest.raises(ValueError, match="needs teacher_fn"):
        gen.generate(z, labels, teacher_steps=1)
    with pytest.raises(ValueError, match="teacher_steps must be in 0..2"):
        gen.generate(z, labels, teacher_fn=fn, teacher_steps=3)
    with pytest.raises(ValueError, match="second split point"):
        VARDDGenerator.from_teacher(teacher, split_points=[0]).generate(z, labels, teacher_fn=fn, teacher_steps=1)


def test_dd_trains_on_teacher_pairs_loss_falls_and_exports_for_plain_diffusers(teacher, tmp_path):
    torch.manual_seed(0)
    gen = VARDDGenerator.from_teacher(teacher, split_points=[0, 2], codebook_scale=1.0)
    n = 24
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(n, L, CVAE, generator=g)
    labels = torch.arange(n) % NC
    from stepdistill.algorithms.distilled_decoding import flow_map

    tokens = var_token_map(teacher, noise, labels, lambda z, lg: flow_map(z, gen.codes, lg, num_steps=6,
                                                                           dtype=torch.float32))
    pairs = {"noise": noise, "tokens": tokens, "labels": labels}

    def eval_loss():
        with torch.no_grad():
            return var_dd_loss(gen, noise, tokens, labels, torch.Generator().manual_seed(0))[0].item()

    before = eval_loss()
    losses = train_var_dd(gen, pairs, steps=25, batch_size=12, lr=3e-3, seed=0)
    after = eval_loss()
    assert all(math.isfinite(x) for x in losses)
    assert after < 0.8 * before, (before, after)
    assert all(not p.requires_grad for p in teacher.parameters())
    gen.eval()
    folder = export_var_dd(gen, teacher, tmp_path / "dd", num_inference_steps=2)
    with pytest.raises(FileExistsError):
        export_var_dd(gen, teacher, folder)
    ema = {k: v + 1.0 if k == "transformer.head.bias" else v for k, v in gen.state_dict().items()}
    ema_folder = export_var_dd(gen, teacher, tmp_path / "ema", use_ema_state=ema)
    assert torch.equal(VARDDStudent.from_pretrained(str(ema_folder / "transformer")).head.bias, gen.transformer.head.bias + 1)
    teacher_folder = teacher.save_pretrained(tmp_path / "teacher")
    for f in (folder, teacher_folder):
        index = json.loads((f / "model_index.json").read_text())
        assert index["_class_name"][0] == "var_model" and (f / "var_model.py").is_file()
        assert (f / "transformer" / "var_model.py").is_file() and (f / "vqvae" / "var_model.py").is_file()
    z = torch.randn(3, L, CVAE, generator=torch.Generator().manual_seed(4))
    lab = torch.tensor([0, 2, 4])
    with torch.no_grad():
        expected = {k: gen(z, lab, num_steps=k).tolist() for k in (1, 2)}
    t_expected = teacher.sample(class_labels=[1, 2], generator=[torch.Generator().manual_seed(i) for i in range(2)])
    from stepdistill.teachers.var import load_var_pipeline

    direct = load_var_pipeline(folder)
    assert direct(class_labels=lab, noise=z, output_type="tokens").images.tolist() == expected[2]
    torch.save({"noise": z, "labels": lab}, tmp_path / "inputs.pt")
    code = textwrap.dedent(
        f"""
        import json, sys, torch
        from diffusers import DiffusionPipeline
        inp = torch.load({str(tmp_path / "inputs.pt")!r}, weights_only=True)
        pipe = DiffusionPipeline.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(pipe).__name__ == "VARDDPipeline" and type(pipe.transformer).__name__ == "VARDDStudent"
        out = {{k: pipe(class_labels=inp["labels"], noise=inp["noise"], num_inference_steps=k,
                        output_type="tokens").images.tolist() for k in (1, 2)}}
        img = pipe(class_labels=[0, 1], generator=torch.Generator().manual_seed(0), output_type="np").images
        tp = DiffusionPipeline.from_pretrained({str(teacher_folder)!r}, trust_remote_code=True)
        t_tok = tp(class_labels=[1, 2], generator=[torch.Generator().manual_seed(i) for i in range(2)],
                   output_type="tokens").images
        t_img = tp(class_labels=[1], generator=torch.Generator().manual_seed(0), output_type="np").images
        assert "stepdistill" not in sys.modules
        print(json.dumps({{"dd": out, "shape": list(img.shape), "teacher": t_tok.tolist(),
                           "t_shape": list(t_img.shape)}}))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DIFFUSERS_VERBOSITY": "error"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["dd"]["1"] == expected[1] and got["dd"]["2"] == expected[2]
    assert got["shape"] == [2, IMG, IMG, 3] and got["t_shape"] == [1, IMG, IMG, 3]
    assert got["teacher"] == t_expected.tolist()


# ---------------------------------------------------------------------------------------------
# 4. the preset


def test_var_preset_loads_dry_runs_and_states_the_published_numbers(capsys):
    from stepdistill.cli import main
    from stepdistill.config import load_config

    cfg = load_config("var/dd")
    text = (Path(__file__).resolve().parents[1] / "configs" / "var" / "dd.yaml").read_text()
    assert "stepdistill.teachers.convert_var" in text
    for number in ("4.19", "9.94", "7.82"):
        assert number in cfg.description
    assert cfg.teacher.guidance_scale == 2.0
    assert cfg.teacher.params["top_k"] == 900 and cfg.teacher.params["top_p"] == 0.95
    assert cfg.algorithm.name == "dd" and cfg.algorithm.params["split_points"] == [0, 5]
    assert "Memory plan" in text
    assert main(["train", "var/dd", "--dry-run"]) == 0
    assert "split_points" in capsys.readouterr().out


def test_run_builds_a_var_teacher_from_its_folder(teacher, tmp_path):
    from stepdistill.config import TeacherConfig
    from stepdistill.run import build_teacher

    folder = teacher.save_pretrained(tmp_path / "t")
    built = build_teacher(TeacherConfig(kind="ar", path=str(folder), guidance_scale=1.5,
                                        params={"top_k": 7, "top_p": 0.9}))
    assert isinstance(built, VARTeacher) and built.digest() == teacher.digest()
    assert built.settings() == {"guidance_scale": 1.5, "temperature": 1.0, "top_k": 7, "top_p": 0.9}


def test_bfloat16_teacher_samples(vae_state, var_state):
    t = convert_var(vae_state, var_state, patch_nums=PNS, top_k=10)
    t.transformer.to(torch.bfloat16)
    tokens = t.sample(class_labels=[0, 1], generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (2, L) and int(tokens.max()) < V
    gen = VARDDGenerator.from_teacher(t, [0, 1])
    gen.transformer.to(torch.bfloat16)
    with torch.no_grad():
        assert gen(torch.randn(2, L, CVAE), torch.tensor([0, 1]), num_steps=2).shape == (2, L)


# ---------------------------------------------------------------------------------------------
# 5. the DistilledDecoding distiller routes a VAR teacher (config -> pairs -> train -> export)


def test_distilled_decoding_trains_and_exports_a_var_student_from_the_preset(teacher, tmp_path):
    from stepdistill.algorithms.distilled_decoding import DDConfig, DistilledDecoding, flow_map
    from stepdistill.config import load_config
    from stepdistill.run import run_distillation
    from stepdistill.teachers.var import load_var_pipeline

    folder = teacher.save_pretrained(tmp_path / "teacher")
    with pytest.raises(ValueError, match="scale indices|split"):  # split points count scales (3 here)
        DistilledDecoding(teacher, DDConfig(split_points=[0, 3], pairs_dir=str(tmp_path / "p0")))
    with pytest.raises(ValueError, match="split_t"):
        DistilledDecoding(teacher, DDConfig(split_points=[0, 2], split_t=4, pairs_dir=str(tmp_path / "p0")))
    overrides = [
        f"teacher.path={folder}", "teacher.dtype=float32", "algorithm.params.num_pairs=16",
        "algorithm.params.shard_size=8", "algorithm.params.generation_batch_size=8",
        "algorithm.params.flow_steps=4", "algorithm.params.storage_dtype=float32",
        f"algorithm.params.pairs_dir={tmp_path / 'pairs'}", "algorithm.params.split_points=[0, 2]",
        "algorithm.params.split_t=1",  # the preset's head (scale 5 of 10) on the tiny 3-scale teacher
        f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.batch_size=4",
        "train.warmup_steps=0", "train.mixed_precision=null", "train.ema_decay=null",
        "train.report_to=null", "train.progress=false", "train.sample_every_steps=0",
        "train.checkpoint_every_steps=1",
    ]
    result = run_distillation(load_config("var/dd", overrides))
    assert result["step"] == 2
    # the stored pairs are the teacher's per-scale noise -> token map
    from safetensors.torch import load_file

    (key,) = [d for d in (tmp_path / "pairs").iterdir() if d.is_dir()]
    rows = load_file(str(key / "pairs-00000.safetensors"))
    codes = teacher.codebook.detach().float()  # codebook_scale 1.0 in the preset
    again = var_token_map(teacher, rows["noise"].float(), rows["labels"],
                          lambda z, lg: flow_map(z, codes, lg, num_steps=4, dtype=torch.float32),
                          **teacher.settings(top_k=900))  # the preset's settings (the fixture has top_k 10)
    assert torch.equal(again, rows["tokens"].long())
    unguided = var_token_map(teacher, rows["noise"].float(), rows["labels"],
                             lambda z, lg: flow_map(z, codes, lg, num_steps=4, dtype=torch.float32),
                             **teacher.settings(top_k=900, guidance_scale=0.0))
    assert not torch.equal(unguided, rows["tokens"].long())  # the comparison can tell settings apart
    pipe = load_var_pipeline(result["pipeline"])
    assert type(pipe).__name__ == "VARDDPipeline"
    z = torch.randn(2, L, CVAE, generator=torch.Generator().manual_seed(0))
    toks = pipe(class_labels=[0, 3], noise=z, num_inference_steps=2, output_type="tokens").images
    assert toks.shape == (2, L) and int(toks.max()) < V
    assert pipe.transformer.final_layer_conti is not None and pipe.transformer.config.split_t == 1


# ---------------------------------------------------------------------------------------------
# 5. the continuous head over scales (DD's final_layer_conti, split_t = loss_split_t in scales)


def test_var_continuous_head_assembly_loss_and_plain_diffusers_export(teacher, tmp_path):
    from stepdistill.pipelines.var_model import var_nearest_codes

    torch.manual_seed(0)
    gen = VARDDGenerator.from_teacher(teacher, split_points=[0, 2], codebook_scale=1.0, split_t=1)
    st = gen.transformer
    assert st.config.split_t == 1 and gen.split_t == 1 and gen.head is st.final_layer_conti
    with pytest.raises(ValueError, match="split_t"):
        VARDDGenerator.from_teacher(teacher, split_points=[0], split_t=3)  # 3 scales: 0..2
    z = torch.randn(3, L, CVAE, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 4])
    is_data = torch.zeros(3, L, dtype=torch.bool)
    with torch.no_grad():
        logits, cont = gen.predict(z, labels, is_data)
        assert cont.shape == (3, L, CVAE) and cont.abs().max() == 0  # the projection starts at zero
        torch.testing.assert_close(logits, gen.logits(z, labels, is_data))
        # the head reads the last block's output: a trained head moves its vectors, not the logits
        for prm in gen.head.linear.parameters():
            prm.normal_(0, 0.5)
        logits2, cont = gen.predict(z, labels, is_data)
        assert torch.equal(logits2, logits) and cont.abs().max() > 0
        tok, vec = gen.generate(z, labels, num_steps=1)
        s = gen.split_t  # scale 0 from the logits, scales >= 1 from the head (vectors unsnapped)
        assert torch.equal(tok[:, :s], logits.argmax(-1)[:, :s]) and torch.equal(vec[:, :s], gen.codes[tok[:, :s]])
        assert torch.equal(vec[:, s:], cont[:, s:]) and torch.equal(tok[:, s:], var_nearest_codes(cont[:, s:], gen.codes))
        # two steps: the data scales of step 2 are step 1's *vectors* (DD's final_predict_conti)
        tok2, vec2 = gen.generate(z, labels, num_steps=2)
        n = st.data_tokens(2)
        xin = z.clone()
        xin[:, :n] = vec[:, :n]
        _, c2 = gen.predict(xin, labels, torch.arange(L)[None].expand(3, -1) < n)
        assert torch.equal(vec2[:, :n], vec[:, :n]) and torch.equal(vec2[:, n:], c2[:, n:])
        img = gen.decode(teacher.vqvae, tok2, vec2)
        torch.testing.assert_close(img, teacher.vqvae.decode_vectors(vec2))
        assert not torch.equal(img, teacher.decode(tok2))  # not snapped to the codebook
        # codes in, codes out: decode_vectors of the codebook vectors is decode_tokens
        torch.testing.assert_close(teacher.vqvae.decode_vectors(teacher.codebook[tok2]), teacher.decode(tok2))
    # loss: CE before the head's first token, L2 from it on; both fall in a few steps
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(24, L, CVAE, generator=g)
    lab = torch.arange(24) % NC
    from stepdistill.algorithms.distilled_decoding import flow_map

    tokens = var_token_map(teacher, noise, lab, lambda zz, lg: flow_map(zz, gen.codes, lg, num_steps=6,
                                                                          dtype=torch.float32))
    gen2 = VARDDGenerator.from_teacher(teacher, split_points=[0, 2], codebook_scale=1.0, split_t=1)

    def losses():
        with torch.no_grad():
            return var_dd_loss(gen2, noise, tokens, lab, torch.Generator().manual_seed(0))[1]

    before = losses()
    assert set(before) == {"ce", "token_acc", "reg"}
    torch.testing.assert_close(torch.tensor(before["reg"]), gen2.codes[tokens[:, 1:]].pow(2).mean(-1).mean(),
                               rtol=0.2, atol=0.0)  # zero head at init: reg = mean square of the codes (draws vary t)
    train_var_dd(gen2, {"noise": noise, "tokens": tokens, "labels": lab}, steps=25, batch_size=12, lr=3e-3)
    after = losses()
    assert after["reg"] < 0.8 * before["reg"] and after["ce"] < before["ce"], (before, after)
    # export: the head is part of the student's weights; plain diffusers decodes from its vectors
    gen.eval()
    folder = export_var_dd(gen, teacher, tmp_path / "dd_head", num_inference_steps=2)
    with torch.no_grad():
        tok, vec = gen.generate(z, labels, num_steps=2)
        expected_img = ((gen.decode(teacher.vqvae, tok, vec) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
    torch.save({"noise": z, "labels": labels}, tmp_path / "inputs.pt")
    code = textwrap.dedent(
        f"""
        import json, sys, torch
        from diffusers import DiffusionPipeline
        inp = torch.load({str(tmp_path / "inputs.pt")!r}, weights_only=True)
        pipe = DiffusionPipeline.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert pipe.transformer.final_layer_conti is not None
        tok = pipe(class_labels=inp["labels"], noise=inp["noise"], output_type="tokens").images
        img = pipe(class_labels=inp["labels"], noise=inp["noise"], output_type="np").images
        assert "stepdistill" not in sys.modules
        print(json.dumps({{"tokens": tok.tolist(), "img": img.tolist()}}))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DIFFUSERS_VERBOSITY": "error"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["tokens"] == tok.tolist()
    np.testing.assert_allclose(np.array(got["img"]), expected_img.numpy(), atol=1e-5)


def test_distilled_decoding_routes_split_t_to_a_var_student(teacher, tmp_path):
    from stepdistill.algorithms.distilled_decoding import DDConfig, DistilledDecoding

    dd = DistilledDecoding(teacher, DDConfig(split_points=[0, 2], split_t=2, pairs_dir=str(tmp_path / "p")))
    assert dd.student.head is not None and dd.student.split_t == teacher.scale_layout[2][0]
    g = torch.Generator().manual_seed(0)
    batch = {"noise": torch.randn(6, L, CVAE, generator=g), "tokens": torch.randint(0, V, (6, L), generator=g),
             "raw_cond": torch.arange(6) % NC}
    out = dd.loss(batch, 0, "generator", {})
    assert {"ce", "reg", "token_acc"} <= set(out.logs) and out.loss.requires_grad
    out.loss.backward()
    assert dd.student.head.linear.weight.grad.abs().sum() > 0  # the regression reaches the head
    with pytest.raises(ValueError, match="rbf_tau"):
        DistilledDecoding(teacher, DDConfig(split_points=[0, 2], rbf_tau=0.5, pairs_dir=str(tmp_path / "p")))


def test_var_student_drop_path_trains_stochastically_and_leaves_eval_and_keys_alone(teacher):
    from stepdistill.algorithms.distilled_decoding import DDConfig, DistilledDecoding
    from stepdistill.pipelines.var_model import drop_path_rates

    assert drop_path_rates(0.1, 3) == pytest.approx([0.0, 0.05, 0.1])
    plain = VARDDGenerator.from_teacher(teacher, [0, 2])
    gen = VARDDGenerator.from_teacher(teacher, [0, 2], drop_path_rate=0.5)
    assert gen.transformer.config.drop_path_rate == 0.5
    assert [b.drop_path.p for b in gen.transformer.blocks] == pytest.approx([0.0, 0.5])
    assert set(gen.state_dict()) == set(plain.state_dict())  # no new keys: loads official-layout weights
    gen.load_state_dict(plain.state_dict())  # the same random init of the new parts
    z = torch.randn(8, L, CVAE, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(8) % NC
    is_data = torch.zeros(8, L, dtype=torch.bool)
    with torch.no_grad():
        gen.eval()
        plain.eval()
        torch.testing.assert_close(gen.logits(z, labels, is_data), plain.logits(z, labels, is_data))
        gen.train()
        torch.manual_seed(1)
        a = gen.logits(z, labels, is_data)
        torch.manual_seed(2)
        b = gen.logits(z, labels, is_data)
    assert not torch.allclose(a, b)  # a branch of the second block dropped for some samples
    with pytest.raises(ValueError, match="drop_path_rate"):
        DistilledDecoding(teacher, DDConfig(split_points=[0, 2], drop_path_rate=1.0))
