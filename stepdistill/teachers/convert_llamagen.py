"""Convert official LlamaGen checkpoints (github.com/FoundationVision/LlamaGen: ``c2i_L_256.pt``,
``vq_ds16_c2i.pt``) into a stepdistill AR teacher folder (an ``ARImagePipeline``: the diffusers
``VQModel`` tokenizer + :class:`~stepdistill.pipelines.llamagen_gpt.LlamaGenGPT`)::

    python -m stepdistill.teachers.convert_llamagen --gpt c2i_L_256.pt --vq vq_ds16_c2i.pt \\
        --gpt-model GPT-L --image-size 256 --output checkpoints/llamagen-l-ar

then ``teacher.path: checkpoints/llamagen-l-ar`` (``configs/llamagen/dd.yaml``).

Checkpoints are read with ``safetensors`` or ``torch.load(weights_only=True)`` only (no pickled
code runs); the weights are taken from ``model`` (LlamaGen's DDP checkpoints), ``module``
(DeepSpeed), ``state_dict``, or the file itself (FSDP), in that order, or from ``--key`` (e.g.
``ema``).  ``module.`` / ``_orig_mod.`` prefixes are stripped.

GPT keys (official -> ours): ``tok_embeddings`` and ``cls_embedding.embedding_table`` (1001 rows,
the last = null class) -> ``embed_tokens`` rows ``[0, V)`` and ``[V, V + 1001)``;
``layers.N.attention.wqkv`` / ``wo`` -> ``layers.N.self_attn.qkv_proj`` / ``o_proj``;
``layers.N.feed_forward.w1 / w3 / w2`` -> ``layers.N.mlp.gate_proj / up_proj / down_proj``;
``layers.N.attention_norm`` / ``ffn_norm`` -> ``layers.N.input_layernorm`` /
``post_attention_layernorm``; ``norm`` -> ``norm``; ``output`` -> ``lm_head``.  A ``freqs_cis`` entry
(LlamaGen keeps the table as a plain attribute; forks that register it as a buffer save it) is
checked against our 2-D RoPE table and dropped; KV-cache buffers and ``causal_mask`` are dropped.
The number of heads is not in the weights: give ``gpt_model`` (``GPT-B`` .. ``GPT-XXXL``) or
``num_heads``.

VQ keys (official -> diffusers ``VQModel``): ``encoder.conv_blocks.i.res.j`` ->
``encoder.down_blocks.i.resnets.j`` (``nin_shortcut`` -> ``conv_shortcut``), ``.attn.j`` ->
``.attentions.j`` (``norm, q, k, v, proj_out`` -> ``group_norm, to_q, to_k, to_v, to_out.0``, 1x1
convs -> linears), ``.downsample.conv`` -> ``.downsamplers.0.conv``; ``encoder.mid.0 / 1 / 2`` ->
``mid_block.resnets.0 / attentions.0 / resnets.1``; ``norm_out`` -> ``conv_norm_out``; the decoder
likewise with ``up_blocks`` / ``upsamplers`` (LlamaGen's decoder ``conv_blocks.0`` is the lowest
resolution, as diffusers' ``up_blocks.0``); ``quantize.embedding`` -> ``quantize.embedding``,
**L2-normalised**; ``quantize.codebook_used`` (a usage counter) is dropped.

Every mismatch is an error naming the expected official keys (missing ones) or the ones it does not
know (unexpected ones), and shape mismatches name both shapes.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
from torch import Tensor

from ..pipelines.llamagen_gpt import LlamaGenGPT, rope_2d_table
from .llamagen import GPT_CONFIGS, LlamaGenVQSpec, build_llamagen_teacher, build_vq

__all__ = [
    "ConversionError",
    "load_checkpoint",
    "gpt_official_key",
    "vq_official_key",
    "convert_gpt",
    "convert_vq",
    "convert_llamagen",
    "main",
]


class ConversionError(ValueError):
    """An official checkpoint does not match the expected LlamaGen layout (the message says how)."""


# ---------------------------------------------------------------------------------------------
# reading


def load_checkpoint(path: str | Path, key: str | None = None) -> dict[str, Tensor]:
    """The state dict in a LlamaGen checkpoint (``.safetensors`` or ``.pt`` / ``.pth`` read with
    ``weights_only=True``), unwrapped from ``key`` / ``model`` / ``module`` / ``state_dict``."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj = load_file(str(path))
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - the unpickler's refusals come in several types
            raise ConversionError(f"{path}: cannot be read with torch.load(weights_only=True) ({e})") from e
    return unwrap_state_dict(obj, key, str(path))


def unwrap_state_dict(obj, key: str | None = None, what: str = "checkpoint") -> dict[str, Tensor]:
    if not isinstance(obj, dict):
        raise ConversionError(f"{what}: expected a dict of tensors, got {type(obj).__name__}")
    if key is not None:
        if key not in obj:
            raise ConversionError(f"{what}: no {key!r} entry (top-level keys: {sorted(obj)[:10]})")
        obj = obj[key]
    else:
        for k in ("model", "module", "state_dict"):
            if isinstance(obj.get(k), dict):
                obj = obj[k]
                break
    out = {}
    for k, v in obj.items():
        if not isinstance(v, Tensor):
            raise ConversionError(f"{what}: entry {k!r} is a {type(v).__name__}, not a tensor (pass key=...?)")
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def _check_keys(given: dict, expected: set[str], what: str, ignorable=lambda k: False) -> None:
    missing = sorted(expected - set(given))
    unexpected = sorted(k for k in set(given) - expected if not ignorable(k))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} expected key(s) missing: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        raise ConversionError(f"{what} does not have the official LlamaGen layout: " + "; ".join(parts))


def _check_shape(name: str, t: Tensor, shape: tuple, what: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ConversionError(f"{what}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


# ---------------------------------------------------------------------------------------------
# GPT

_GPT_RULES = [
    (r"layers\.(\d+)\.self_attn\.qkv_proj\.", r"layers.\1.attention.wqkv."),
    (r"layers\.(\d+)\.self_attn\.o_proj\.", r"layers.\1.attention.wo."),
    (r"layers\.(\d+)\.mlp\.gate_proj\.", r"layers.\1.feed_forward.w1."),
    (r"layers\.(\d+)\.mlp\.up_proj\.", r"layers.\1.feed_forward.w3."),
    (r"layers\.(\d+)\.mlp\.down_proj\.", r"layers.\1.feed_forward.w2."),
    (r"layers\.(\d+)\.input_layernorm\.", r"layers.\1.attention_norm."),
    (r"layers\.(\d+)\.post_attention_layernorm\.", r"layers.\1.ffn_norm."),
    (r"^lm_head\.", "output."),
]


def gpt_official_key(ours: str) -> str:
    """The official LlamaGen key of one of our GPT keys (``embed_tokens`` has two sources)."""
    for pattern, repl in _GPT_RULES:
        if re.search(pattern, ours):
            return re.sub(pattern, repl, ours)
    return ours


def _gpt_ignorable(k: str) -> bool:
    return k in ("freqs_cis", "causal_mask") or bool(re.fullmatch(r"layers\.\d+\.attention\.kv_cache\.[kv]_cache", k))


def convert_gpt(
    state: dict[str, Tensor],
    *,
    gpt_model: str | None = None,
    num_heads: int | None = None,
    grid_size: tuple[int, int] | int | None = None,
    num_classes: int | None = None,
    rope_base: float = 10000.0,
    norm_eps: float = 1e-5,
    class_dropout_prob: float = 0.1,
) -> LlamaGenGPT:
    """Our :class:`LlamaGenGPT` holding an official class-conditional GPT state dict."""
    what = "the GPT checkpoint"
    state = unwrap_state_dict(state, None, what)
    if any(k.startswith("cls_embedding.cap_proj") for k in state):
        raise ConversionError(f"{what} is a text-conditional (t2i) LlamaGen model; only c2i models are supported")
    for k in ("tok_embeddings.weight", "cls_embedding.embedding_table.weight"):
        if k not in state:
            raise ConversionError(f"{what} has no {k!r} (is it a LlamaGen GPT state dict? keys: {sorted(state)[:6]} ...)")
    tok, cls = state["tok_embeddings.weight"], state["cls_embedding.embedding_table.weight"]
    v, dim = tok.shape
    layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.", k))})
    n_layers = len(layers)
    if layers != list(range(n_layers)):
        raise ConversionError(f"{what}: layer indices {layers} are not 0..{n_layers - 1}")
    if gpt_model is not None:
        if gpt_model not in GPT_CONFIGS:
            raise ConversionError(f"unknown gpt_model {gpt_model!r}; one of {', '.join(GPT_CONFIGS)}")
        ref = GPT_CONFIGS[gpt_model]
        if (ref["num_layers"], ref["hidden_size"]) != (n_layers, dim):
            raise ConversionError(
                f"{what} has {n_layers} layers of width {dim}; {gpt_model} has {ref['num_layers']} of {ref['hidden_size']}"
            )
        if num_heads is not None and num_heads != ref["num_heads"]:
            raise ConversionError(f"num_heads={num_heads} contradicts {gpt_model} ({ref['num_heads']} heads)")
        num_heads = ref["num_heads"]
    if num_heads is None:
        raise ConversionError(
            f"the number of attention heads is not stored in the weights: pass gpt_model (one of "
            f"{', '.join(GPT_CONFIGS)}) or num_heads"
        )
    if dim % num_heads:
        raise ConversionError(f"width {dim} is not divisible by num_heads={num_heads}")
    head_dim = dim // num_heads
    n_cls_rows = cls.shape[0]
    if num_classes is None:
        num_classes = n_cls_rows - 1
    if n_cls_rows == num_classes:
        raise ConversionError(
            f"{what}: cls_embedding.embedding_table has {n_cls_rows} rows = num_classes, i.e. no null-class row "
            "(the model was trained with class_dropout_prob=0): classifier-free guidance is impossible"
        )
    if n_cls_rows != num_classes + 1:
        raise ConversionError(
            f"{what}: cls_embedding.embedding_table has {n_cls_rows} rows, expected num_classes + 1 = {num_classes + 1}"
        )
    qkv_rows = state.get("layers.0.attention.wqkv.weight", torch.empty(dim + 2 * dim, dim)).shape[0]
    kv_dim = (qkv_rows - dim) // 2
    if kv_dim <= 0 or kv_dim % head_dim or (qkv_rows - dim) % 2:
        raise ConversionError(f"{what}: attention.wqkv has {qkv_rows} rows, not width + 2 * kv_heads * head_dim")
    hidden = state.get("layers.0.feed_forward.w1.weight", torch.empty(0, dim)).shape[0]
    grid = _gpt_grid(state.get("freqs_cis"), grid_size, what)
    model = LlamaGenGPT(
        codebook_size=int(v), num_classes=int(num_classes), hidden_size=int(dim), num_layers=n_layers,
        num_heads=int(num_heads), num_kv_heads=int(kv_dim // head_dim), intermediate_size=int(hidden),
        grid_size=list(grid), rope_base=float(rope_base), norm_eps=float(norm_eps),
        class_dropout_prob=float(class_dropout_prob),
    )
    target = model.state_dict()
    expected = {gpt_official_key(k) for k in target if k != "embed_tokens.weight"}
    expected |= {"tok_embeddings.weight", "cls_embedding.embedding_table.weight"}
    _check_keys(state, expected, what, _gpt_ignorable)
    if "freqs_cis" in state:
        ours = rope_2d_table(grid, head_dim, float(rope_base), 1)
        theirs = state["freqs_cis"].float()
        if theirs.shape != ours.shape or not torch.allclose(theirs, ours, atol=1e-5):
            raise ConversionError(
                f"{what}: freqs_cis {tuple(theirs.shape)} is not LlamaGen's 2-D RoPE table for a {grid[0]}x{grid[1]} grid, "
                f"head_dim {head_dim}, base {rope_base} (zero class row) {tuple(ours.shape)}: check grid_size / rope_base"
            )
    converted = {}
    for k, t in target.items():
        if k == "embed_tokens.weight":
            converted[k] = torch.cat([tok, cls]).to(t.dtype)
            continue
        src = gpt_official_key(k)
        _check_shape(src, state[src], t.shape, what)
        converted[k] = state[src].to(t.dtype)
    model.load_state_dict(converted, strict=True)
    return model.eval()


def _gpt_grid(freqs: Tensor | None, grid_size, what: str) -> tuple[int, int]:
    if grid_size is not None:
        g = (int(grid_size), int(grid_size)) if isinstance(grid_size, int) else tuple(int(x) for x in grid_size)
        return g
    if freqs is None:
        return (16, 16)  # LlamaGen at 256 px with VQ-16
    n = int(freqs.shape[0]) - 1
    s = int(round(n**0.5))
    if s * s != n:
        raise ConversionError(f"{what}: freqs_cis has {n + 1} rows, not 1 + a square grid; pass grid_size")
    return (s, s)


# ---------------------------------------------------------------------------------------------
# VQ tokenizer

_VQ_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VQ_RES = {"conv_shortcut": "nin_shortcut"}


def vq_official_key(ours: str) -> str:
    """The official LlamaGen VQ key of a diffusers ``VQModel`` key (see the module docstring)."""
    k = ours
    for part in ("encoder", "decoder"):
        k = re.sub(rf"^{part}\.mid_block\.resnets\.0\.", f"{part}.mid.0.", k)
        k = re.sub(rf"^{part}\.mid_block\.attentions\.0\.", f"{part}.mid.1.", k)
        k = re.sub(rf"^{part}\.mid_block\.resnets\.1\.", f"{part}.mid.2.", k)
        k = re.sub(rf"^{part}\.conv_norm_out\.", f"{part}.norm_out.", k)
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.conv_blocks.\1.res.", k)
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.attentions\.", r"encoder.conv_blocks.\1.attn.", k)
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.conv_blocks.\1.downsample.", k)
    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", r"decoder.conv_blocks.\1.res.", k)
    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.attentions\.", r"decoder.conv_blocks.\1.attn.", k)
    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", r"decoder.conv_blocks.\1.upsample.", k)
    if re.search(r"\.(mid\.1|attn\.\d+)\.", k):
        for ours_name, theirs in _VQ_ATTN.items():
            k = k.replace(f".{ours_name}.", f".{theirs}.")
    for ours_name, theirs in _VQ_RES.items():
        k = k.replace(f".{ours_name}.", f".{theirs}.")
    return k


def _vq_spec(state: dict[str, Tensor], image_size: int, what: str) -> LlamaGenVQSpec:
    for k in ("encoder.conv_in.weight", "encoder.conv_out.weight", "quant_conv.weight", "quantize.embedding.weight",
              "decoder.conv_out.weight"):
        if k not in state:
            raise ConversionError(f"{what} has no {k!r} (is it a LlamaGen VQ state dict? keys: {sorted(state)[:6]} ...)")
    ch, in_channels = state["encoder.conv_in.weight"].shape[:2]
    levels = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.conv_blocks\.(\d+)\.", k))})
    if not levels or levels != list(range(len(levels))):
        raise ConversionError(f"{what}: encoder.conv_blocks indices {levels} are not 0..n-1")
    mult = []
    for i in levels:
        key = f"encoder.conv_blocks.{i}.res.0.conv1.weight"
        if key not in state:
            raise ConversionError(f"{what} has no {key!r}")
        out = int(state[key].shape[0])
        if out % ch:
            raise ConversionError(f"{what}: {key} has {out} output channels, not a multiple of ch={ch}")
        mult.append(out // ch)
    dec_mult = []
    for i in levels:
        key = f"decoder.conv_blocks.{i}.res.0.conv1.weight"
        if key not in state:
            raise ConversionError(f"{what} has no {key!r}")
        dec_mult.append(int(state[key].shape[0]) // ch)
    if dec_mult != mult[::-1]:
        raise ConversionError(
            f"{what}: decoder channel multipliers {dec_mult[::-1]} differ from the encoder's {mult}; "
            "a diffusers VQModel shares them"
        )
    res = len({m.group(1) for k in state if (m := re.match(r"encoder\.conv_blocks\.0\.res\.(\d+)\.", k))})
    return LlamaGenVQSpec(
        image_size=int(image_size), in_channels=int(in_channels), out_channels=int(state["decoder.conv_out.weight"].shape[0]),
        ch=int(ch), ch_mult=mult, num_res_blocks=res, z_channels=int(state["encoder.conv_out.weight"].shape[0]),
        codebook_size=int(state["quantize.embedding.weight"].shape[0]),
        codebook_embed_dim=int(state["quantize.embedding.weight"].shape[1]),
    )


def convert_vq(state: dict[str, Tensor], *, image_size: int = 256, l2_norm: bool = True):
    """A diffusers ``VQModel`` holding an official LlamaGen VQ state dict; the codebook is stored
    L2-normalised when ``l2_norm`` (LlamaGen's ``codebook_l2_norm``, on for every released tokenizer)."""
    what = "the VQ checkpoint"
    state = unwrap_state_dict(state, None, what)
    spec = _vq_spec(state, image_size, what)
    try:
        model = build_vq(spec)
    except ValueError as e:
        raise ConversionError(f"{what}: {e}") from e
    target = model.state_dict()
    names = {k: vq_official_key(k) for k in target}
    _check_keys(state, set(names.values()), what, lambda k: k == "quantize.codebook_used")
    converted = {}
    for k, t in target.items():
        src = state[names[k]]
        if src.dim() == 4 and t.dim() == 2:  # attention 1x1 conv -> linear
            if src.shape[2:] != (1, 1):
                raise ConversionError(f"{what}: {names[k]} is a {tuple(src.shape)} conv, expected 1x1")
            src = src[:, :, 0, 0]
        _check_shape(names[k], src, t.shape, what)
        converted[k] = src.to(t.dtype)
    if l2_norm:
        converted["quantize.embedding.weight"] = torch.nn.functional.normalize(
            converted["quantize.embedding.weight"].float(), dim=-1
        ).to(target["quantize.embedding.weight"].dtype)
    model.load_state_dict(converted, strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# both


def convert_llamagen(
    gpt_checkpoint: str | Path | dict,
    vq_checkpoint: str | Path | dict,
    output: str | Path | None = None,
    *,
    gpt_model: str | None = "GPT-L",
    num_heads: int | None = None,
    image_size: int = 256,
    num_classes: int | None = None,
    key: str | None = None,
    guidance_scale: float = 2.0,
    temperature: float = 1.0,
    top_k: int = 8000,
    top_p: float = 1.0,
):
    """Official GPT + VQ checkpoints (paths or state dicts) -> an ``ARTeacher``; with ``output``,
    also written there as an ``ARImagePipeline`` folder (``teacher.path`` of a preset).  The default
    sampling settings are DD1's for LlamaGen (CFG 2.0, top-k 8000, top-p 1, temperature 1)."""
    gpt_state = gpt_checkpoint if isinstance(gpt_checkpoint, dict) else load_checkpoint(gpt_checkpoint, key)
    vq_state = vq_checkpoint if isinstance(vq_checkpoint, dict) else load_checkpoint(vq_checkpoint)
    vq = convert_vq(vq_state, image_size=image_size)
    grid = (image_size // 2 ** (len(vq.config.block_out_channels) - 1),) * 2
    gpt = convert_gpt(gpt_state, gpt_model=gpt_model, num_heads=num_heads, grid_size=grid, num_classes=num_classes)
    teacher = build_llamagen_teacher(vq, gpt, guidance_scale=guidance_scale, temperature=temperature,
                                     top_k=top_k, top_p=top_p)
    if output is not None:
        teacher.save_pretrained(output)
        teacher.path = str(output)
    return teacher


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stepdistill.teachers.convert_llamagen", description=__doc__.split("\n\n")[0])
    p.add_argument("--gpt", required=True, help="official GPT checkpoint (.pt / .pth / .safetensors)")
    p.add_argument("--vq", required=True, help="official VQ checkpoint (e.g. vq_ds16_c2i.pt)")
    p.add_argument("--output", required=True, help="folder to write (an ARImagePipeline)")
    p.add_argument("--gpt-model", default="GPT-L", choices=list(GPT_CONFIGS))
    p.add_argument("--num-heads", type=int, default=None, help="attention heads of a GPT of another size (instead of --gpt-model)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--key", default=None, help="checkpoint entry holding the GPT weights (default: model/module/state_dict)")
    p.add_argument("--guidance-scale", type=float, default=2.0)
    p.add_argument("--top-k", type=int, default=8000)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=1.0)
    args = p.parse_args(argv)
    try:
        gpt_model = None if args.num_heads else args.gpt_model
        convert_llamagen(args.gpt, args.vq, args.output, gpt_model=gpt_model, num_heads=args.num_heads,
                         image_size=args.image_size,
                         key=args.key, guidance_scale=args.guidance_scale, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"LlamaGen teacher written to {args.output}")
    return 0

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
