"""Convert official VAR checkpoints (github.com/FoundationVision/VAR: ``vae_ch160v4096z32.pth`` and
``var_d16.pth`` .. ``var_d30.pth``) into a stepdistill VAR teacher folder (a self-contained
``VARPipeline``: :class:`~stepdistill.pipelines.var_model.VARVQVAE` +
:class:`~stepdistill.pipelines.var_model.VARTransformer`)::

    python -m stepdistill.teachers.convert_var --vae vae_ch160v4096z32.pth --var var_d16.pth \\
        --output checkpoints/var-d16

then ``teacher.path: checkpoints/var-d16`` (``configs/var/dd.yaml``).

Checkpoints are read with ``safetensors`` or ``torch.load(weights_only=True)`` only (no pickled code
runs); VAR's files are plain state dicts (``model`` / ``module`` / ``state_dict`` wrappers and
``module.`` / ``_orig_mod.`` prefixes are also accepted, or ``--key``).

Key layout.  Our modules use the official parameter names, so most keys map to themselves; what the
converter changes:

* VQVAE: ``quantize.quant_resi.qresi_ls.<k>`` (``PhiPartiallyShared``, VAR's ``share_quant_resi=4``),
  ``quantize.quant_resi.qresi`` (``PhiShared``, ``share_quant_resi=1``) or ``quantize.quant_resi.<k>``
  (``PhiNonShared``, ``share_quant_resi=0``) -> ``quantize.phi.<k>``; the sharing mode is read from
  the key names.  ``quantize.ema_vocab_hit_SV`` (a usage counter, one row per scale) is dropped after
  checking that it has one row per scale of ``v_patch_nums``.
* Transformer: the buffers ``lvl_1L``, ``attn_bias_for_masking`` and ``blocks.<i>.attn.zero_k_bias``
  are checked (the scale ids, the block-causal mask, zeros) and dropped (ours are recomputed).

Read from the weights: V, Cvae, ``ch``, ``ch_mult``, ``num_res_blocks``, attention on/off, the
quant-conv kernel, the number of phi convs; depth, width, classes, shared adaLN, ``attn_l2_norm``,
the MLP ratio and, with ``attn_l2_norm``, the number of heads (``scale_mul_1H11``).  Not in the
weights, so given (VAR's values by default): ``v_patch_nums`` (1, 2, 3, 4, 5, 6, 8, 10, 13, 16; checked
against ``pos_1LC`` / ``lvl_embed`` / ``ema_vocab_hit_SV``), ``quant_resi`` 0.5, the heads of a
model without ``attn_l2_norm`` (VAR: heads = depth), ``norm_eps`` 1e-6.  Every mismatch is an error
naming the keys or both shapes.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
from torch import Tensor

from ..pipelines.var_model import VAR_PATCH_NUMS, VARTransformer, VARVQVAE, block_causal_mask
from .convert_llamagen import ConversionError, load_checkpoint
from .var import VARTeacher

__all__ = ["ConversionError", "convert_vqvae", "convert_transformer", "convert_var", "main"]


def _check_keys(given: set[str], expected: set[str], what: str) -> None:
    missing = sorted(expected - given)
    unexpected = sorted(given - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} expected key(s) missing: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        raise ConversionError(f"{what} does not have the official VAR layout: " + "; ".join(parts))


def _need(sd: dict, key: str, what: str) -> Tensor:
    if key not in sd:
        raise ConversionError(f"{what} does not have the official VAR layout: expected key {key!r} is missing")
    return sd[key]


def _load_into(model, sd: dict[str, Tensor], what: str) -> None:
    own = model.state_dict()
    _check_keys(set(sd), set(own), what)
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ConversionError(f"{what}: {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)


# ---------------------------------------------------------------------------------------------
# VQVAE


def convert_vqvae(state: dict[str, Tensor], v_patch_nums=VAR_PATCH_NUMS, quant_resi: float = 0.5,
                  using_znorm: bool = False) -> VARVQVAE:
    """Official ``VQVAE`` state dict -> :class:`VARVQVAE` (architecture read from the weights)."""
    what = "the VQVAE checkpoint"
    sd = dict(state)
    emb = _need(sd, "quantize.embedding.weight", what)
    vocab, cvae = emb.shape
    ch, in_ch = _need(sd, "encoder.conv_in.weight", what).shape[:2]
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    if not levels:
        raise ConversionError(f"{what} does not have the official VAR layout: no encoder.down.<i> keys")
    ch_mult = [int(_need(sd, f"encoder.down.{i}.block.0.conv1.weight", what).shape[0]) // int(ch) for i in levels]
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
    using_sa = f"encoder.down.{levels[-1]}.attn.0.qkv.weight" in sd
    using_mid_sa = "encoder.mid.attn_1.qkv.weight" in sd
    ks = int(_need(sd, "quant_conv.weight", what).shape[-1])
    hits = sd.pop("quantize.ema_vocab_hit_SV", None)
    pns = [int(p) for p in v_patch_nums]
    if hits is not None and tuple(hits.shape) != (len(pns), vocab):
        raise ConversionError(f"{what}: quantize.ema_vocab_hit_SV has shape {tuple(hits.shape)}, expected "
                              f"({len(pns)}, {vocab}) for v_patch_nums={pns} (give the checkpoint's scales)")
    # phi convolutions: the three official sharing modes -> quantize.phi.<k>
    phi: dict[int, dict[str, Tensor]] = {}
    mode = None
    for k in list(sd):
        for pattern, m_name in ((r"quantize\.quant_resi\.qresi_ls\.(\d+)\.(weight|bias)$", "partial"),
                                (r"quantize\.quant_resi\.qresi\.(weight|bias)$", "shared"),
                                (r"quantize\.quant_resi\.(\d+)\.(weight|bias)$", "non-shared")):
            m = re.match(pattern, k)
            if m:
                if mode not in (None, m_name):
                    raise ConversionError(f"{what}: phi keys of two sharing modes ({mode}, {m_name})")
                mode = m_name
                idx, param = (0, m.group(1)) if m_name == "shared" else (int(m.group(1)), m.group(2))
                phi.setdefault(idx, {})[param] = sd.pop(k)
                break
    if mode is None:
        share, counts, ratio = 4, 0, 0.0  # quant_resi = 0: identity phi, no weights
    elif mode == "partial":
        share, counts, ratio = len(phi), 0, quant_resi
    elif mode == "shared":
        share, counts, ratio = 1, 0, quant_resi
    else:
        share, counts, ratio = 0, len(phi), quant_resi
    for i, params in sorted(phi.items()):
        for p, t in params.items():
            sd[f"quantize.phi.{i}.{p}"] = t
    try:
        model = VARVQVAE(vocab_size=int(vocab), z_channels=int(cvae), ch=int(ch), ch_mult=ch_mult,
                         num_res_blocks=len(blocks), in_channels=int(in_ch), using_sa=using_sa,
                         using_mid_sa=using_mid_sa, using_znorm=using_znorm, quant_conv_ks=ks,
                         quant_resi=ratio, share_quant_resi=share, default_qresi_counts=counts, v_patch_nums=pns)
    except ValueError as e:
        raise ConversionError(f"{what}: {e}") from e
    _load_into(model, sd, what)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# transformer


def convert_transformer(state: dict[str, Tensor], patch_nums=VAR_PATCH_NUMS, num_heads: int | None = None,
                        norm_eps: float = 1e-6) -> VARTransformer:
    """Official ``VAR`` state dict -> :class:`VARTransformer` (architecture read from the weights)."""
    what = "the VAR checkpoint"
    sd = dict(state)
    c, cvae = _need(sd, "word_embed.weight", what).shape
    vocab = _need(sd, "head.weight", what).shape[0]
    num_classes = _need(sd, "class_emb.weight", what).shape[0] - 1
    depth = len({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    if depth == 0:
        raise ConversionError(f"{what} does not have the official VAR layout: no blocks.<i> keys")
    shared_aln = "blocks.0.ada_gss" in sd
    l2 = "blocks.0.attn.scale_mul_1H11" in sd
    heads = int(sd["blocks.0.attn.scale_mul_1H11"].shape[1]) if l2 else int(num_heads or depth)
    if l2 and num_heads is not None and int(num_heads) != heads:
        raise ConversionError(f"{what}: scale_mul_1H11 has {heads} heads, not num_heads={num_heads}")
    mlp_ratio = float(_need(sd, "blocks.0.ffn.fc1.weight", what).shape[0]) / float(c)
    pns = [int(p) for p in patch_nums]
    length = sum(p * p for p in pns)
    pos = _need(sd, "pos_1LC", what)
    if tuple(pos.shape) != (1, length, c) or _need(sd, "lvl_embed.weight", what).shape[0] != len(pns):
        raise ConversionError(f"{what}: pos_1LC {tuple(pos.shape)} / lvl_embed {tuple(sd['lvl_embed.weight'].shape)} "
                              f"do not fit patch_nums={pns} (L={length}, {len(pns)} scales); give the checkpoint's scales")
    model = VARTransformer(vocab_size=int(vocab), z_channels=int(cvae), num_classes=int(num_classes), depth=depth,
                           embed_dim=int(c), num_heads=heads, mlp_ratio=mlp_ratio, norm_eps=norm_eps,
                           shared_aln=shared_aln, attn_l2_norm=l2, patch_nums=pns)
    lvl = sd.pop("lvl_1L", None)
    if lvl is not None and not torch.equal(lvl.long().reshape(-1), model.lvl_1L.reshape(-1).cpu()):
        raise ConversionError(f"{what}: lvl_1L does not match the scale ids of patch_nums={pns}")
    mask = sd.pop("attn_bias_for_masking", None)
    if mask is not None and not torch.equal(mask.float().reshape(length, length),
                                            block_causal_mask(model.lvl_1L[0]).reshape(length, length)):
        raise ConversionError(f"{what}: attn_bias_for_masking is not VAR's block-causal mask for patch_nums={pns}")
    for i in range(depth):
        z = sd.pop(f"blocks.{i}.attn.zero_k_bias", None)
        if z is not None and bool(z.abs().max() > 0):
            raise ConversionError(f"{what}: blocks.{i}.attn.zero_k_bias is not zero")
    _load_into(model, sd, what)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# both


def convert_var(vae_checkpoint, var_checkpoint, output: str | Path | None = None, *, patch_nums=VAR_PATCH_NUMS,
                num_heads: int | None = None, quant_resi: float = 0.5, key: str | None = None,
                guidance_scale: float = 2.0, top_k: int = 900, top_p: float = 0.95,
                temperature: float = 1.0) -> VARTeacher:
    """Official VQVAE + VAR checkpoints (paths or state dicts) -> a :class:`VARTeacher`; with
    ``output`` also written there as a ``VARPipeline`` folder.  Default sampling: DD's VAR setting
    (cfg 2.0, top-k 900, top-p 0.95)."""
    vae_state = vae_checkpoint if isinstance(vae_checkpoint, dict) else load_checkpoint(vae_checkpoint)
    var_state = var_checkpoint if isinstance(var_checkpoint, dict) else load_checkpoint(var_checkpoint, key)
    vqvae = convert_vqvae(vae_state, v_patch_nums=patch_nums, quant_resi=quant_resi)
    transformer = convert_transformer(var_state, patch_nums=patch_nums, num_heads=num_heads)
    try:
        teacher = VARTeacher(vqvae, transformer, guidance_scale=guidance_scale, top_k=top_k, top_p=top_p,
                             temperature=temperature)
    except ValueError as e:
        raise ConversionError(str(e)) from e
    teacher = teacher.eval().requires_grad_(False)
    if output is not None:
        teacher.save_pretrained(output)
        teacher.path = str(output)
    return teacher


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stepdistill.teachers.convert_var", description=__doc__.split("\n\n")[0])
    p.add_argument("--vae", required=True, help="official VQVAE checkpoint (vae_ch160v4096z32.pth)")
    p.add_argument("--var", required=True, help="official VAR checkpoint (var_d16.pth, ...)")
    p.add_argument("--output", required=True, help="folder to write (a VARPipeline)")
    p.add_argument("--patch-nums", default=",".join(str(x) for x in VAR_PATCH_NUMS),
                   help="scales, comma-separated (VAR's 256 px default)")
    p.add_argument("--num-heads", type=int, default=None, help="heads of a model without attn_l2_norm (default: depth)")
    p.add_argument("--key", default=None, help="checkpoint entry holding the VAR weights")
    p.add_argument("--guidance-scale", type=float, default=2.0)
    p.add_argument("--top-k", type=int, default=900)
    p.add_argument("--top-p", type=float, default=0.95)
    args = p.parse_args(argv)
    try:
        pns = [int(x) for x in args.patch_nums.split(",") if x.strip()]
        convert_var(args.vae, args.var, args.output, patch_nums=pns, num_heads=args.num_heads, key=args.key,
                    guidance_scale=args.guidance_scale, top_k=args.top_k, top_p=args.top_p)
    except (ConversionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"VAR teacher written to {args.output}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
