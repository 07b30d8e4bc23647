"""``stepdistill plan CONFIG --gpus N --gpu-memory 80GB``: a preflight memory plan, no weights loaded.

What it counts, per GPU, for the run a config describes:

* **the frozen teacher** -- its denoiser at ``teacher.dtype``, text encoder(s) at ``teacher.dtype``
  and the VAE in float32 (as ``DiffusersTeacher.from_pretrained`` loads them; an AR teacher's VQ
  tokenizer and LM at ``teacher.dtype``); with ``teacher.params.offload_frozen`` the text encoders
  and VAE live in host memory (reported, not counted on the GPU).  Always replicated.
* **each trainable group** as the algorithm's ``trainable()`` defines it (DMD2: ``generator``,
  ``critic`` = fake score + GAN head; VSD: ``generator``, ``critic``; BOOT / DD: ``generator``;
  DisBack: its base's groups; MSD: ``s{k}.<group>`` for every student): float32 trainable weights,
  float32 gradients, AdamW's two float32 moments, frozen weights the group owns (VSD's LoRA critic's
  fp32 base; a LoRA student's base is the teacher's tensors, at any dtype), and the EMA shadow
  (``train.ema_decay``, float32, of the EMA group).  With ``train.sharding: fsdp2`` over N GPUs the
  weights, gradients, moments and EMA of each group are divided by N, except groups that hold the
  teacher's own tensors (LoRA adapters on shared base weights), which FSDP2 leaves replicated
  (``training/sharded.py``); the FSDP2 all-gather of the unit being computed is added back.
* **activations**: the tensors autograd saves in the forwards that build each phase's graph,
  measured by running the group's network on the ``meta`` device (shapes only, no memory, no
  arithmetic) under ``torch.autograd.graph.saved_tensors_hooks`` at the run's batch size and latent
  shape, with the run's ``requires_grad`` pattern (a frozen critic in DMD2's generator-phase GAN
  forward saves less than a trainable one), the GAN forwards stopped at the bottleneck when
  ``gan_stop_at_bottleneck`` is on, attention counted as a fused (flash / memory-efficient) kernel
  saves it (q, k, v, output, log-sum-exp), and with gradient checkpointing the checkpointed blocks'
  inputs plus the largest block's recomputation.  ``train.mixed_precision`` bf16/fp16 runs the
  measurement under an autocast emulation (matmuls and convolutions in the low dtype, norms and
  softmax in float32, the low-precision weight copies autocast keeps).

The peak is ``static + max over phases (gradients of the phase's groups + the phase's
activations + FSDP2 gathers)``: the trainer zeroes every gradient after each group's update, so
only one phase's gradients live at a time.  Not counted: no-grad forwards' transient working memory
(teacher CFG passes, VAE encodes), the CUDA context, cuBLAS workspaces and allocator
fragmentation -- the ``margin`` (default 10% of the GPU) is kept free for those.

Teachers are sized from configs: a local pipeline folder's ``model_index.json`` and component
``config.json`` files, or, for a hub id that is not on this machine, the configs recorded in
:mod:`stepdistill.architectures` (the paper-scale presets' teachers; anything else is refused with
a message).  ``analytic`` teachers and embedded teachers that are not trained yet (except the
digits UNet, whose architecture is the preset) are refused: there is nothing to size.

Checked against measured peak memory of tiny CPU runs: ``benchmarks/plan_check.py``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError, RunConfig, from_dict, load_config
from .errors import InputError

__all__ = ["parse_memory", "format_bytes", "plan_config", "Plan", "teacher_arch", "format_plan", "LEVERS"]

# ---------------------------------------------------------------------------------------------
# units

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str | int | float, what: str = "--gpu-memory") -> int:
    """``80GB`` (10^9), ``24GiB`` (2^30), ``512MiB``, ``1.5TB`` -> bytes; anything else raises
    :class:`~stepdistill.errors.InputError` naming ``what``."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text > 0:
            return int(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)\s*", str(text), flags=re.IGNORECASE)
        if m:
            value = float(m.group(1)) * _UNITS[m.group(2).lower()]
            if value >= 1:
                return int(value)
    raise InputError(f"{what} must be a positive size with a unit such as 80GB, 24GiB or 512MiB, got {text!r}")


def format_bytes(n: float) -> str:
    """Bytes in GB (10^9), the unit GPU vendors use: ``80GB`` parses back to the same number."""
    if abs(n) >= 1e9:
        return f"{n / 1e9:.2f} GB"
    if abs(n) >= 1e6:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e3:.1f} kB"


_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# ---------------------------------------------------------------------------------------------
# the teacher, from configs, on the meta device


@dataclass
class TeacherArch:
    """A teacher's networks built on the ``meta`` device from its configs (no weights)."""

    source: str  # "folder <path>" | "recorded architecture <name>" | "preset <name>"
    kind: str  # "diffusion" | "ar"
    denoiser: nn.Module  # the network that is copied / trained (UNet, transformer, causal LM), float32, meta
    denoiser_name: str
    frozen: dict[str, nn.Module] = field(default_factory=dict)  # text encoders, VAE, VQ tokenizer (meta)
    sample_shape: tuple[int, ...] = ()
    text_seq_len: int | None = None  # prompt tokens the denoiser attends to (text teachers)
    num_classes: int | None = None
    extra: dict = field(default_factory=dict)  # AR: grid_size, codebook_size


def _numel(module: nn.Module, trainable_only: bool = False) -> int:
    seen: set[int] = set()
    n = 0
    for p in module.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        n += p.numel()
    return n


def _instantiate(lib: str, cls_name: str, config: dict, where: str) -> nn.Module:
    import diffusers
    import transformers

    if lib == "var_model":  # the self-contained VAR classes (stepdistill.pipelines.var_model)
        from .pipelines import var_model as module
    else:
        module = transformers if lib == "transformers" else diffusers
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise ConfigError(f"{where}: component class {lib}.{cls_name} is not installed")
    config = {k: v for k, v in config.items() if not k.startswith("_") or k == "_class_name"}
    try:
        with torch.device("meta"):
            if lib == "transformers":
                cfg = cls.config_class(**{k: v for k, v in config.items() if k != "_class_name"})
                return cls(cfg)
            return cls.from_config(config)
    except Exception as e:  # a config the class does not accept
        raise ConfigError(f"{where}: cannot build {cls_name} from its config ({type(e).__name__}: {e})") from e


_FROZEN_NAMES = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae", "vqvae")


def _from_components(components: dict[str, tuple[str, str, dict]], index: dict, source: str,
                     sample_shape=None) -> TeacherArch:
    if "transformer" in components and components["transformer"][1] == "VARTransformer":
        tr = _instantiate(*components["transformer"], where=source)
        vq = _instantiate(*components["vqvae"], where=source) if "vqvae" in components else None
        return TeacherArch(source, "ar", tr, "transformer", {"vqvae": vq} if vq is not None else {},
                           sample_shape=(int(tr.L),), num_classes=int(tr.num_classes),
                           extra={"var": True, "patch_nums": list(tr.patch_nums), "codebook_size": int(tr.V)})
    if "transformer" in components and components["transformer"][1] == "LlamaForCausalLM":
        lm = _instantiate(*components["transformer"], where=source)
        vq = _instantiate(*components["vqvae"], where=source) if "vqvae" in components else None
        grid = tuple(index.get("grid_size") or (16, 16))
        return TeacherArch(source, "ar", lm, "transformer", {"vqvae": vq} if vq is not None else {},
                           sample_shape=(grid[0] * grid[1],), num_classes=int(index.get("num_classes") or 0),
                           extra={"grid_size": grid, "codebook_size": int(index.get("codebook_size") or 0)})
    name = next((n for n in ("unet", "transformer") if n in components), None)
    if name is None:
        raise ConfigError(f"{source}: model_index.json names no 'unet' or 'transformer' component")
    den = _instantiate(*components[name], where=source)
    frozen = {n: _instantiate(*components[n], where=source) for n in _FROZEN_NAMES if n in components}
    cfg = dict(den.config)
    if sample_shape is None:
        if index.get("sample_shape"):
            sample_shape = tuple(index["sample_shape"])
        elif components[name][1] == "FluxTransformer2DModel":
            sample_shape = (int(cfg["in_channels"]) // 4, 128, 128)
        else:
            size = cfg.get("sample_size") or 64
            size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
            sample_shape = (int(cfg.get("in_channels") or 4), int(size[0]), int(size[1]))
    num_classes = index.get("num_classes")
    if num_classes is None and cfg.get("num_class_embeds"):
        num_classes = int(cfg["num_class_embeds"]) - 1
    if num_classes is None and cfg.get("norm_type") == "ada_norm_zero" and cfg.get("num_embeds_ada_norm"):
        num_classes = int(cfg["num_embeds_ada_norm"])
    seq = index.get("text_seq_len")
    if seq is None and "text_encoder" in frozen:
        te = frozen["text_encoder"].config
        seq = int(getattr(te, "max_position_embeddings", 77))
    return TeacherArch(source, "diffusion", den, name, frozen, tuple(int(s) for s in sample_shape), seq,
                       int(num_classes) if num_classes is not None else None)


def _folder_arch(path: Path, sample_shape=None) -> TeacherArch:
    index_file = path / "model_index.json"
    if not index_file.exists():
        raise ConfigError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    index = json.loads(index_file.read_text())
    components = {}
    for name, entry in index.items():
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] in ("diffusers", "transformers", "var_model")):
            continue
        cfg_file = path / name / "config.json"
        if cfg_file.exists():
            components[name] = (entry[0], entry[1], json.loads(cfg_file.read_text()))
    seq = None
    tok = path / "tokenizer" / "tokenizer_config.json"
    if tok.exists():
        n = json.loads(tok.read_text()).get("model_max_length")
        if isinstance(n, int) and n < 100_000:
            seq = n
    if seq is not None and "text_encoder_3" not in components and "text_seq_len" not in index:
        index = {**index, "text_seq_len": seq}
    return _from_components(components, index, f"folder {path}", sample_shape)


def _digits_preset_arch(params: dict) -> TeacherArch:
    from .teachers.training import UNetSpec, build_unet

    spec = from_dict(UNetSpec, (params or {}).get("unet", {}), prefix="teacher.params.unet.")
    with torch.device("meta"):
        unet = build_unet(spec)
    return TeacherArch("preset architecture (teacher.params.unet)", "diffusion", unet, "unet", {},
                       (spec.in_channels, spec.sample_size, spec.sample_size), None, spec.num_classes)


def _sample_shape_param(tcfg) -> tuple[int, ...] | None:
    shape = (tcfg.params or {}).get("sample_shape")
    return tuple(int(s) for s in shape) if shape else None


def _resolution_shape(arch: TeacherArch, tcfg) -> TeacherArch:
    res = (tcfg.params or {}).get("resolution")
    vae = arch.frozen.get("vae")
    if res and vae is not None:
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        arch.sample_shape = (arch.sample_shape[0], int(res) // factor, int(res) // factor)
    return arch


def teacher_arch(tcfg, arch: str | None = None) -> TeacherArch:
    """The teacher of ``teacher`` config section ``tcfg`` on the meta device (see the module doc).

    ``arch`` names an entry of :data:`stepdistill.architectures.ARCHITECTURES` to use whatever
    ``teacher.path`` says."""
    from .architectures import ARCHITECTURES

    shape = _sample_shape_param(tcfg)
    if arch is not None:
        if arch not in ARCHITECTURES:
            raise ConfigError(f"--arch {arch!r} is not a recorded architecture; known: {', '.join(sorted(ARCHITECTURES))}")
        return _resolution_shape(_recorded(arch, shape), tcfg)
    kind, path = tcfg.kind, tcfg.path
    if kind == "analytic":
        raise ConfigError("teacher.kind=analytic is a closed-form CPU toy (a few kB of parameters); there is "
                          "nothing to plan")
    if path and Path(path).is_dir():
        return _resolution_shape(_folder_arch(Path(path), shape), tcfg)
    if path and path in ARCHITECTURES:
        return _resolution_shape(_recorded(path, shape), tcfg)
    if path:
        raise ConfigError(
            f"teacher.path {path!r} is neither a local folder nor a recorded architecture; plan reads configs only "
            f"and downloads nothing: point teacher.path at a local copy (huggingface-cli download ... --local-dir) or "
            f"pass --arch NAME (recorded: {', '.join(sorted(ARCHITECTURES))})")
    if kind == "digits":
        from .run import embedded_teacher_dir

        folder = embedded_teacher_dir((tcfg.params or {}).get("preset", "digits/teacher")) / "pipeline"
        if folder.is_dir():
            return _folder_arch(folder, shape)
        return _digits_preset_arch(load_config((tcfg.params or {}).get("preset", "digits/teacher")).teacher.params)
    if kind == "t2i":
        from .t2i_teacher import t2i_teacher_dir
        from .utils import cache_dir  # noqa: F401  (t2i_teacher_dir reads the cache root)

        cfg = load_config((tcfg.params or {}).get("preset", "t2i"))
        folder = t2i_teacher_dir(config=cfg) / "pipeline"
        if folder.is_dir():
            return _folder_arch(folder, shape)
        raise ConfigError("the embedded t2i teacher is not trained yet (nothing to read its configs from); run "
                          "`python -m stepdistill.t2i_teacher` or set teacher.path to its pipeline folder")
    if kind == "ar":
        from .run import embedded_teacher_dir

        folder = embedded_teacher_dir((tcfg.params or {}).get("preset", "digits-ar/teacher")) / "pipeline"
        if folder.is_dir():
            return _folder_arch(folder, shape)
        raise ConfigError("the embedded AR teacher is not trained yet; train it (stepdistill teacher train --preset "
                          "digits-ar) or set teacher.path to an ARImagePipeline folder")
    raise ConfigError(f"teacher.kind={kind!r} needs teacher.path (a local folder) to plan")


def _recorded(name: str, shape=None) -> TeacherArch:
    from .architectures import ARCHITECTURES

    entry = ARCHITECTURES[name]
    components = {k: v for k, v in entry.items() if isinstance(v, tuple)}
    index = {k: v for k, v in entry.items() if not isinstance(v, tuple)}
    return _from_components(components, index, f"recorded architecture {name}", shape)


# ---------------------------------------------------------------------------------------------
# activations: saved tensors of a meta forward


class _StopForward(Exception):
    pass


class _Autocast(torch.overrides.TorchFunctionMode):
    """What ``torch.autocast`` does to dtypes, for meta tensors (autocast has no meta backend):
    matmuls / convolutions in ``low``, norms / softmax / losses in float32."""

    def __init__(self, low: torch.dtype):
        super().__init__()
        self.low = low
        self.low_ops = {F.linear, F.conv1d, F.conv2d, F.conv3d, torch.matmul, torch.bmm, torch.baddbmm,
                        torch.addmm, torch.mm, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.einsum}
        self.f32_ops = {F.group_norm, F.layer_norm, F.softmax, torch.softmax, F.log_softmax, F.cross_entropy,
                        F.mse_loss, torch.Tensor.softmax}

    def _cast(self, args, kwargs, dtype):
        def c(v):
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != dtype:
                return v.to(dtype)
            if isinstance(v, (list, tuple)) and any(isinstance(x, torch.Tensor) for x in v):
                return type(v)(c(x) for x in v)
            return v
        return tuple(c(a) for a in args), {k: c(v) for k, v in kwargs.items()}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.low_ops:
            args, kwargs = self._cast(args, kwargs, self.low)
        elif func in self.f32_ops:
            args, kwargs = self._cast(args, kwargs, torch.float32)
        return func(*args, **kwargs)


def _meta_inputs(arch: TeacherArch, net: nn.Module, batch: int, dtype: torch.dtype, input_grad: bool):
    """``(args, kwargs)`` of one forward of ``net`` (the teacher's denoiser class) at ``batch``."""
    meta = {"device": "meta", "dtype": dtype}
    cfg = getattr(net, "config", None)
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})
    cls = type(net).__name__
    if cls == "VARTransformer":  # teacher-forced next-scale logits: labels + the scales' inputs
        x = torch.zeros(batch, net.L - net.first_l, net.Cvae, **meta).requires_grad_(input_grad)
        return (torch.zeros(batch, dtype=torch.long, device="meta"), x), {}
    if cls == "_VARDDLogits":  # the DD student over scales: noise / codes (B, L, Cvae) + indicator
        st = net.student
        x = torch.zeros(batch, st.L, st.Cvae, **meta).requires_grad_(input_grad)
        return (x, torch.zeros(batch, dtype=torch.long, device="meta"),
                torch.zeros(batch, st.L, dtype=torch.bool, device="meta")), {}
    if arch.kind == "ar":
        n = arch.sample_shape[0] + 1
        x = torch.zeros(batch, n, net.config.hidden_size, **meta).requires_grad_(input_grad)
        return (), {"inputs_embeds": x, "use_cache": False}
    x = torch.zeros(batch, *arch.sample_shape, **meta).requires_grad_(input_grad)
    t = torch.zeros(batch, device="meta")
    labels = torch.zeros(batch, dtype=torch.long, device="meta") if arch.num_classes else None
    seq = arch.text_seq_len or 77
    if cls == "UNet2DModel":
        return (x, t), {"class_labels": labels}
    if cls == "UNet2DConditionModel":
        kw: dict[str, Any] = {"encoder_hidden_states": torch.zeros(batch, seq, cfg["cross_attention_dim"], **meta)}
        if cfg.get("addition_embed_type") == "text_time":
            pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
            kw["added_cond_kwargs"] = {"text_embeds": torch.zeros(batch, pooled, **meta),
                                       "time_ids": torch.zeros(batch, 6, **meta)}
        if cfg.get("num_class_embeds"):
            kw["class_labels"] = labels
        return (x, t), kw
    if cls in ("Transformer2DModel", "DiTTransformer2DModel"):
        return (x,), {"timestep": t, "class_labels": labels}
    if cls == "SD3Transformer2DModel":
        return (), {"hidden_states": x, "timestep": t,
                    "encoder_hidden_states": torch.zeros(batch, seq, cfg["joint_attention_dim"], **meta),
                    "pooled_projections": torch.zeros(batch, cfg["pooled_projection_dim"], **meta)}
    if cls == "FluxTransformer2DModel":
        c, h, w = arch.sample_shape
        n = (h // 2) * (w // 2)
        tokens = torch.zeros(batch, n, c * 4, **meta).requires_grad_(input_grad)
        kw = {"hidden_states": tokens, "timestep": t,
              "encoder_hidden_states": torch.zeros(batch, seq, cfg["joint_attention_dim"], **meta),
              "pooled_projections": torch.zeros(batch, cfg["pooled_projection_dim"], **meta),
              "img_ids": torch.zeros(n, 3, device="meta"), "txt_ids": torch.zeros(seq, 3, device="meta")}
        if cfg.get("guidance_embeds"):
            kw["guidance"] = torch.zeros(batch, device="meta")
        return (), kw
    raise ConfigError(f"plan cannot size activations of a {cls} denoiser yet")


def _bottleneck(net: nn.Module) -> nn.Module:
    if getattr(net, "mid_block", None) is not None:
        return net.mid_block
    for attr in ("single_transformer_blocks", "transformer_blocks"):
        blocks = getattr(net, attr, None)
        if blocks is not None and len(blocks):
            return blocks[-1]
    raise ConfigError(f"cannot find the bottleneck of {type(net).__name__} for the GAN head")


@dataclass
class Activation:
    saved: int  # bytes autograd keeps until backward
    recompute: int  # checkpointing: the largest block's saved tensors while it is recomputed
    output_shape: tuple = ()
    bottleneck_shape: tuple = ()


def measure_activations(arch: TeacherArch, net: nn.Module, batch: int, *, input_grad: bool = False,
                        stop_at_bottleneck: bool = False, checkpointing: bool = False,
                        mixed_precision: str | None = None) -> Activation:
    """Bytes of the tensors autograd saves in one forward of ``net`` (meta device) at ``batch``.

    ``net``'s ``requires_grad`` flags are used as they are (trainable copy, frozen critic, LoRA
    adapter).  Parameters (and low-precision copies of frozen low-precision weights) are not
    counted: they are weights.  Attention is counted as a fused kernel saves it."""
    params = {id(p) for p in net.parameters()}
    stack: list[dict] = [{}]
    keep: list = []  # every counted tensor stays referenced, so no id() is reused within a measurement
    state = {"recompute": 0, "bottleneck": ()}

    def key(t):
        return id(t._base if t._base is not None else t)

    def pack(t):
        keep.append(t)
        if key(t) not in params and id(t) not in params:
            base = t._base if t._base is not None else t
            stack[-1][key(t)] = base.numel() * base.element_size()
        return t

    def sdpa(q=None, k=None, v=None, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        q = kw.pop("query", q)
        k = kw.pop("key", k)
        v = kw.pop("value", v)
        out = q.narrow(-1, 0, 1).mul(0).expand(*q.shape[:-1], v.shape[-1])
        keep.extend((q, k, v, out))
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            d = stack[-1]
            for x in (q, k, v):
                d[key(x)] = x.numel() * x.element_size()
            d[("out", id(out))] = out.numel() * q.element_size()
            d[("lse", id(out))] = q.numel() // q.shape[-1] * 4
        return out

    def checkpointed(fn, *args, **kwargs):
        for a in args:
            if isinstance(a, torch.Tensor):
                keep.append(a)
                stack[-1][key(a)] = a.numel() * a.element_size()
        stack.append({})
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = fn(*args, **kwargs)
        finally:
            inner = stack.pop()
        state["recompute"] = max(state["recompute"], sum(inner.values()))
        return out

    gc_modules = [m for m in net.modules() if hasattr(m, "gradient_checkpointing")]
    before = [(m, m.gradient_checkpointing, m.__dict__.get("_gradient_checkpointing_func")) for m in gc_modules]
    for m in gc_modules:
        m.gradient_checkpointing = bool(checkpointing)
        if checkpointing:
            m._gradient_checkpointing_func = checkpointed
    hook = None
    if stop_at_bottleneck:
        def stop(module, args, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            state["bottleneck"] = tuple(out.shape)
            raise _StopForward
        hook = _bottleneck(net).register_forward_hook(stop)
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision or "no")
    dtype = next(net.parameters()).dtype if low is None else low
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        dtype = torch.float32
    args, kwargs = _meta_inputs(arch, net, batch, torch.float32 if low is not None else dtype, input_grad)
    orig = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = sdpa
    # transformers' causal-mask helpers inspect values (.item()), which meta tensors do not have; the
    # mask changes no saved-tensor size (the fused kernel is causal by itself)
    import sys

    lm_module = sys.modules.get(type(net).__module__)
    mask_fn = getattr(lm_module, "create_causal_mask", None) if arch.kind == "ar" else None
    if mask_fn is not None:
        lm_module.create_causal_mask = lambda *a, **k: None
    out_shape: tuple = ()
    try:
        with contextlib.ExitStack() as es:
            es.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore")  # dtype-mismatch notes of kernels that never run on meta
            es.enter_context(torch.enable_grad())
            es.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
            if low is not None:
                es.enter_context(_Autocast(low))
            try:
                out = net(*args, **kwargs)
                out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", getattr(out, "logits", out))
                out_shape = tuple(out.shape)
                # the loss keeps a tensor of the output's size (MSE difference, log-softmax of logits)
                stack[0][("output", 0)] = out.numel() * 4
            except _StopForward:
                pass
    finally:
        F.scaled_dot_product_attention = orig
        if mask_fn is not None:
            lm_module.create_causal_mask = mask_fn
        if hook is not None:
            hook.remove()
        for m, flag, func in before:
            m.gradient_checkpointing = flag
            if func is not None:
                m._gradient_checkpointing_func = func
            else:
                m.__dict__.pop("_gradient_checkpointing_func", None)
    return Activation(sum(stack[0].values()), state["recompute"], out_shape, state["bottleneck"])


# ---------------------------------------------------------------------------------------------
# trainable groups and phases of each algorithm


@dataclass
class Group:
    name: str
    trainable: int  # trainable parameters (float32)
    frozen_bytes: int = 0  # frozen weights the group owns (not the teacher's tensors)
    shares_teacher: bool = False  # holds the teacher's own tensors: FSDP2 leaves it replicated
    units: list = field(default_factory=list)  # FSDP2 unit sizes (parameters), root remainder last
    parts: dict = field(default_factory=dict)


@dataclass
class Forward:
    group: str  # whose network runs (activations are measured on it)
    net: nn.Module
    batch_mult: int = 1
    input_grad: bool = False
    stop_at_bottleneck: bool = False
    checkpointing: bool = False
    label: str = ""


@dataclass
class Phase:
    name: str
    grads: list  # groups whose gradients exist during this phase's backward
    forwards: list


@dataclass
class Recipe:
    groups: list
    phases: list
    ema_group: str | None = "generator"
    static_extra: dict = field(default_factory=dict)  # name -> bytes on every GPU (frozen twins)
    notes: list = field(default_factory=list)


def _fsdp_units(module: nn.Module) -> list[int]:
    """Parameter counts of the units ``training.sharded.shard_group`` makes (its own policy,
    ``training.sharded.fsdp_units``: every block of a ModuleList stack, other submodules >= 1/16),
    the root remainder last."""
    from .training.sharded import fsdp_units

    units = [_numel(m) for _, m in fsdp_units(module)]
    return units + [max(_numel(module) - sum(units), 0)]


def _lora(net: nn.Module, spec: dict | None, default_targets, prefix: str) -> nn.Module:
    """``net`` with a peft LoRA adapter as the package attaches it (only ``lora_`` tensors train)."""
    from peft import LoraConfig, inject_adapter_in_model

    from .algorithms.common import GeneratorLoRA

    lora = from_dict(GeneratorLoRA, spec or {}, prefix=prefix)
    targets = list(lora.target_modules or default_targets)
    cfg = LoraConfig(r=lora.rank, lora_alpha=float(lora.alpha if lora.alpha is not None else lora.rank),
                     target_modules=targets, lora_dropout=lora.dropout, init_lora_weights=True)
    net.requires_grad_(False)
    with torch.device("meta"):
        try:
            inject_adapter_in_model(cfg, net, adapter_name="default")
        except ValueError as e:
            raise ConfigError(f"{prefix.rstrip('.')}.target_modules {targets} match no layer of "
                              f"{type(net).__name__} ({e})") from e
    for name, p in net.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_" in name:
            p.data = p.data.float()
    return net


class _Ctx:
    """What the recipes need: the teacher arch, the config and the levers in force."""

    def __init__(self, arch: TeacherArch, cfg: RunConfig):
        self.arch, self.cfg = arch, cfg
        self.teacher_dtype = cfg.teacher.dtype

    def copy_net(self, dtype=torch.float32) -> nn.Module:
        net = copy.deepcopy(self.arch.denoiser).to(dtype)
        net.requires_grad_(True)
        net.train()
        return net

    def generator(self, params: dict, name: str = "generator") -> tuple[Group, nn.Module]:
        from .algorithms.common import DEFAULT_LORA_TARGETS

        spec = params.get("generator_lora")
        # a LoRA student's base is cast to the teacher's dtype and *is* the teacher's tensors (make_generator)
        net = self.copy_net() if spec is None else self.copy_net(_TORCH_DTYPES[self.teacher_dtype])
        if spec is None:
            n = _numel(net)
            return Group(name, n, units=_fsdp_units(net), parts={"network": n}), net
        base = _numel(net)
        net = _lora(net, spec, DEFAULT_LORA_TARGETS, "algorithm.params.generator_lora.")
        lora = _numel(net, trainable_only=True)
        g = Group(name, lora, 0, shares_teacher=True, units=_fsdp_units(net),
                  parts={"lora adapter": lora, "base (teacher's tensors)": base})
        return g, net


def _checkpointed(params: dict, group: str) -> bool:
    return group in (params.get("gradient_checkpointing") or [])


def _dmd2_recipe(ctx: _Ctx, params: dict, prefix: str = "") -> Recipe:
    from .algorithms.common import DEFAULT_LORA_TARGETS, GANHead
    from .algorithms.dmd2 import DMD2Config

    c = from_dict(DMD2Config, params, prefix="algorithm.params.")
    gen, gen_net = ctx.generator(params, prefix + "generator")
    if c.critic_lora is None:
        critic_net = ctx.copy_net()
        n = _numel(critic_net)
        critic = Group(prefix + "critic", n, units=_fsdp_units(critic_net), parts={"fake score": n})
    else:
        spec = dict(c.critic_lora)
        spec.setdefault("target_modules", list(DEFAULT_LORA_TARGETS))
        critic_net = _lora(ctx.copy_net(_TORCH_DTYPES[ctx.teacher_dtype]), spec, DEFAULT_LORA_TARGETS,
                           "algorithm.params.critic_lora.")
        n = _numel(critic_net, trainable_only=True)
        critic = Group(prefix + "critic", n, 0, shares_teacher=True, units=[n],
                       parts={"fake score LoRA": n, "base (teacher's tensors)": _numel(critic_net) - n})
    use_gan = c.gan_weight_g > 0
    if use_gan:
        act = measure_activations(ctx.arch, critic_net, 1, stop_at_bottleneck=True)
        shape = act.bottleneck_shape[1:]
        if len(shape) == 2:  # transformer tokens (N, D) on the patch grid
            side = int(round(math.sqrt(shape[0])))
            shape = (shape[1], side, max(shape[0] // max(side, 1), 1))
        with torch.device("meta"):
            head = GANHead(tuple(shape))
        h = _numel(head)
        critic.trainable += h
        critic.parts["GAN head"] = h
        critic.units = critic.units[:-1] + [critic.units[-1] + h]
    gck, cck = _checkpointed(params, "generator"), _checkpointed(params, "critic")
    gan_stop = c.gan_stop_at_bottleneck
    gen_fwd = [Forward(gen.name, gen_net, checkpointing=gck, label="generator")]
    gen_grads = [gen.name]
    if use_gan:
        frozen = c.no_grad_outside_phase
        gan_net = critic_net
        if frozen:
            gan_net = copy.deepcopy(critic_net).requires_grad_(False)
        else:
            gen_grads.append(critic.name)
        # a frozen GAN forward of a checkpointed critic runs unchecked (dmd2.py checkpointing_off)
        gen_fwd.append(Forward(critic.name, gan_net, input_grad=True, stop_at_bottleneck=gan_stop,
                               checkpointing=cck and not frozen, label="critic GAN (generator phase)"))
    crit_fwd = [Forward(critic.name, critic_net, checkpointing=cck, label="fake score denoising")]
    if use_gan:
        crit_fwd.append(Forward(critic.name, critic_net, batch_mult=2, stop_at_bottleneck=gan_stop,
                                checkpointing=cck, label="GAN fake + real"))
    phases = [Phase("generator", gen_grads, gen_fwd), Phase("critic", [critic.name], crit_fwd)]
    if c.regression_steps > 0:
        phases.append(Phase("regression", [gen.name], [Forward(gen.name, gen_net, checkpointing=gck,
                                                               label="generator")]))
    return Recipe([gen, critic], phases)


def _vsd_recipe(ctx: _Ctx, params: dict, prefix: str = "") -> Recipe:
    from .algorithms.vsd import VSDConfig

    c = from_dict(VSDConfig, params, prefix="algorithm.params.")
    gen, gen_net = ctx.generator(params, prefix + "generator")
    critic_net = ctx.copy_net()
    if c.critic == "lora":
        critic_net = _lora(critic_net, {"rank": c.lora_rank, "alpha": c.lora_alpha, "target_modules": c.lora_targets},
                           c.lora_targets, "algorithm.params.")
        n = _numel(critic_net, trainable_only=True)
        # vsd.add_lora adapts a float32 trainable copy: its frozen base is a float32 copy of its own
        critic = Group(prefix + "critic", n, (_numel(critic_net) - n) * 4, units=_fsdp_units(critic_net),
                       parts={"LoRA": n, "frozen fp32 base": _numel(critic_net) - n})
    else:
        n = _numel(critic_net)
        critic = Group(prefix + "critic", n, units=_fsdp_units(critic_net), parts={"score": n})
    phases = [Phase("generator", [gen.name], [Forward(gen.name, gen_net, checkpointing=_checkpointed(params, "generator"),
                                                      label="generator")]),
              Phase("critic", [critic.name], [Forward(critic.name, critic_net, checkpointing=_checkpointed(params, "critic"),
                                                      label="critic denoising")])]
    return Recipe([gen, critic], phases)


def _boot_recipe(ctx: _Ctx, params: dict, prefix: str = "") -> Recipe:
    from .algorithms.boot import BOOTConfig

    c = from_dict(BOOTConfig, params, prefix="algorithm.params.")
    gen, net = ctx.generator(params, prefix + "generator")
    ck = _checkpointed(params, "generator")
    fwd = [Forward(gen.name, net, checkpointing=ck, label="student y_s")]
    if c.boundary_weight > 0:
        fwd.append(Forward(gen.name, net, checkpointing=ck, label="student y_T (boundary)"))
    return Recipe([gen], [Phase("generator", [gen.name], fwd)])


def _base_recipe(ctx: _Ctx, base: str, params: dict, prefix: str = "") -> Recipe:
    recipes = {"dmd2": _dmd2_recipe, "vsd": _vsd_recipe, "boot": _boot_recipe}
    if base not in recipes:
        raise ConfigError(f"plan has no recipe for base algorithm {base!r}")
    return recipes[base](ctx, params, prefix)


def _disback_recipe(ctx: _Ctx, params: dict) -> Recipe:
    from .algorithms.disback import DisBackConfig

    c = from_dict(DisBackConfig, params, prefix="algorithm.params.")
    r = _base_recipe(ctx, c.base, c.base_params)
    critic = next(g for g in r.groups if g.name.endswith("critic"))
    score = critic.trainable - critic.parts.get("GAN head", 0)
    r.static_extra["path node (frozen twin of the fake score's trainable tensors, fp32)"] = score * 4
    r.notes.append(f"DisBack writes {c.num_nodes} node copies of the fake score to disk "
                   f"(~{format_bytes(score * 4)} each)")
    return r


def _msd_recipe(ctx: _Ctx, params: dict) -> Recipe:
    from .algorithms.msd import MSDConfig

    c = from_dict(MSDConfig, params, prefix="algorithm.params.")
    base = _base_recipe(ctx, c.base, c.base_params, prefix="s0.")
    groups = list(base.groups)
    scale = 1.0
    if c.width_multiplier != 1.0:
        scale = c.width_multiplier ** 2
        for g in groups:
            g.trainable = int(g.trainable * scale)
            g.units = [int(u * scale) for u in g.units]
        base.notes.append(f"width_multiplier={c.width_multiplier}: student sizes approximated as width^2 "
                          "times the teacher's (activations as the full-width network's)")
    for k in range(1, c.num_students):
        groups += [dataclasses.replace(g, name=f"s{k}." + g.name.split(".", 1)[1]) for g in base.groups]
    base.groups = groups
    base.ema_group = "s0.generator"  # one EMA per student? the trainer keeps one EMA group
    return base


def _dd_recipe(ctx: _Ctx, params: dict) -> Recipe:
    from .algorithms.distilled_decoding import DDConfig
    from .pipelines.distilled_decoding import dd_layout

    from_dict(DDConfig, params, prefix="algorithm.params.")
    arch = ctx.arch
    if arch.kind != "ar":
        raise ConfigError("Distilled Decoding needs an autoregressive teacher (teacher.kind=ar)")
    if arch.extra.get("var"):
        return _var_dd_recipe(arch, params)
    vq = arch.frozen.get("vqvae")
    d = int(vq.config.vq_embed_dim or vq.config.latent_channels) if vq is not None else 8
    layout = dd_layout(arch.extra["codebook_size"], arch.num_classes, d)
    net = copy.deepcopy(arch.denoiser).float().requires_grad_(True)
    with torch.device("meta"):
        net.resize_token_embeddings(layout["vocab_size"], mean_resizing=False)
    net.requires_grad_(True)
    n = _numel(net)
    g = Group("generator", n, units=_fsdp_units(net), parts={"LM with extended vocabulary": n})
    return Recipe([g], [Phase("generator", ["generator"], [Forward("generator", net, label="student LM")])])


class _VARDDLogits(nn.Module):
    """The training forward of a VAR DD student (``VARDDStudent.logits``) as a module call."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward(self, x, labels, is_data):  # the head's saved tensors count too (it runs in training)
        return self.student.predict(x, labels, is_data)[0]


def _var_dd_recipe(arch: TeacherArch, params: dict) -> Recipe:
    """DD over VAR scales: the student is the teacher's ``DD_Model`` layout (one extra leading scale,
    the indicator embedding and its per-layer projections), every scale trained in one pass."""
    from .pipelines.var_model import VARDDStudent

    cfg = dict(arch.denoiser.config)
    keep = ("vocab_size", "z_channels", "num_classes", "depth", "embed_dim", "num_heads", "mlp_ratio", "norm_eps",
            "shared_aln", "attn_l2_norm", "patch_nums")
    split_points = params.get("split_points") or [0]
    try:
        with torch.device("meta"):
            st = VARDDStudent(**{k: cfg[k] for k in keep if k in cfg}, split_points=list(split_points),
                              use_layerwise_n_d_embed=bool(params.get("layerwise_n_d_embed", True)),
                              split_t=params.get("split_t"))
    except ValueError as e:  # split points that do not fit the teacher's scales
        raise ConfigError(f"algorithm.params.split_points: {e}") from e
    st.requires_grad_(True)
    n = _numel(st)
    net = _VARDDLogits(st)
    g = Group("generator", n, units=_fsdp_units(st),
              parts={"VAR DD student (teacher + 1x1 scale + indicator projections)": n})
    return Recipe([g], [Phase("generator", ["generator"], [Forward("generator", net, label="VAR DD student")])],
                  notes=["pair generation (no grad) is not in the peak: the per-token flow map's (rows, V, d) "
                         "tensors are transient, bounded by the chunk of 4096 rows"])


RECIPES = {"dmd2": _dmd2_recipe, "vsd": _vsd_recipe, "boot": _boot_recipe, "disback": _disback_recipe,
           "msd": _msd_recipe, "dd": _dd_recipe}

# ---------------------------------------------------------------------------------------------
# the plan


@dataclass
class Row:
    name: str
    params: int  # parameters (trainable for groups, all for frozen parts)
    weights: float
    grads: float
    optimizer: float
    ema: float
    activations: float = 0.0
    sharded: bool = False
    note: str = ""

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.ema + self.activations


@dataclass
class Plan:
    config: str
    algorithm: str
    teacher: str
    gpus: int
    gpu_memory: int
    margin: float
    sharding: str
    rows: list
    peak_phase: str
    phase_peaks: dict
    total: float
    host_bytes: float
    fits: bool
    levers: list = field(default_factory=list)  # [{lever, override, saving, total_after, fits}]
    path_to_fit: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @property
    def budget(self) -> float:
        return self.gpu_memory * (1 - self.margin)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["rows"] = [{**dataclasses.asdict(r), "total": r.total} for r in self.rows]
        d["budget"] = self.budget
        return d


def _frozen_rows(arch: TeacherArch, cfg: RunConfig) -> tuple[list[Row], float]:
    tdt = cfg.teacher.dtype
    if tdt not in _DTYPE_BYTES:
        raise ConfigError(f"teacher.dtype must be one of {', '.join(_DTYPE_BYTES)}, got {tdt!r}")
    b = _DTYPE_BYTES[tdt]
    offload = bool((cfg.teacher.params or {}).get("offload_frozen", False)) and arch.kind == "diffusion"
    n = _numel(arch.denoiser)
    rows = [Row(f"teacher {arch.denoiser_name} (frozen, {tdt})", n, n * b, 0, 0, 0)]
    host = 0.0
    for name, m in arch.frozen.items():
        k = _numel(m)
        fp32 = name == "vae" or (name == "vqvae" and arch.extra.get("var"))  # VAR's f-hat sums stay float32
        nb = k * (4 if fp32 else b)
        dt = "float32" if fp32 else tdt
        if offload and name != "vqvae":
            host += nb
            rows.append(Row(f"teacher {name} (offloaded to host, {dt})", k, 0, 0, 0, 0, note=f"{format_bytes(nb)} in host memory"))
        else:
            rows.append(Row(f"teacher {name} (frozen, {dt})", k, nb, 0, 0, 0))
    return rows, host


def _estimate(cfg: RunConfig, arch: TeacherArch, gpus: int, gpu_memory: int, margin: float,
              sharding: str | None, name: str) -> Plan:
    algo = cfg.algorithm.name
    if algo not in RECIPES:
        raise ConfigError(f"plan has no recipe for algorithm {algo!r}; known: {', '.join(RECIPES)}")
    sharding = sharding if sharding is not None else (cfg.train.sharding or "none")
    if sharding not in ("none", "fsdp2"):
        raise ConfigError(f"sharding must be none or fsdp2, got {sharding!r}")
    recipe = RECIPES[algo](_Ctx(arch, cfg), dict(cfg.algorithm.params))
    tc = cfg.train
    mp = tc.mixed_precision if tc.mixed_precision in ("bf16", "fp16") else None
    shard = sharding == "fsdp2" and gpus > 1
    rows, host = _frozen_rows(arch, cfg)
    for k, v in recipe.static_extra.items():
        rows.append(Row(k, v // 4, v, 0, 0, 0))
    groups = {g.name: g for g in recipe.groups}
    div = {g.name: (gpus if shard and not g.shares_teacher else 1) for g in recipe.groups}
    ema_group = recipe.ema_group if tc.ema_decay is not None else None
    if ema_group is not None and ema_group not in groups:
        ema_group = None
    for g in recipe.groups:
        n = div[g.name]
        parts = ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in g.parts.items())
        rows.append(Row(f"{g.name} (trainable, fp32)", g.trainable, (g.trainable * 4 + g.frozen_bytes) / n,
                        0, g.trainable * 8 / n, (g.trainable * 4 / n) if g.name == ema_group else 0,
                        sharded=n > 1, note=parts))
    static = sum(r.total for r in rows)
    # per phase: gradients + activations + FSDP2 gathers
    cache: dict = {}
    phase_peaks: dict[str, dict] = {}
    for ph in recipe.phases:
        grads = sum(groups[g].trainable * 4 / div[g] for g in ph.grads)
        act = 0.0
        recompute = 0.0
        detail = []
        for f in ph.forwards:
            key = (id(f.net), f.input_grad, f.stop_at_bottleneck, f.checkpointing)
            if key not in cache:
                cache[key] = measure_activations(arch, f.net, tc.batch_size, input_grad=f.input_grad,
                                                 stop_at_bottleneck=f.stop_at_bottleneck,
                                                 checkpointing=f.checkpointing, mixed_precision=mp)
            a = cache[key]
            act += a.saved * f.batch_mult
            recompute = max(recompute, a.recompute * f.batch_mult)
            detail.append({"forward": f.label, "group": f.group, "saved": a.saved * f.batch_mult,
                           "checkpointing": f.checkpointing})
        gather = 0.0
        if shard:
            for gname in {f.group for f in ph.forwards}:
                g = groups[gname]
                if div[gname] > 1 and g.units:
                    body = sorted(g.units[:-1], reverse=True)
                    gather += (g.units[-1] + 2 * (body[0] if body else 0)) * 4 * (1 - 1 / gpus)
                    if gname in ph.grads:
                        gather += (body[0] if body else 0) * 4  # the unit's unsharded gradient before reduce-scatter
        peak = grads + act + recompute + gather
        phase_peaks[ph.name] = {"gradients": grads, "activations": act + recompute, "fsdp_gather": gather,
                                "total": peak, "forwards": detail}
    peak_phase = max(phase_peaks, key=lambda p: phase_peaks[p]["total"])
    pk = phase_peaks[peak_phase]
    rows.append(Row(f"gradients ({peak_phase} phase)", 0, 0, pk["gradients"], 0, 0,
                    note="one phase's groups at a time (the trainer zeroes every gradient after each update)"))
    rows.append(Row(f"activations ({peak_phase} phase, batch {tc.batch_size}"
                    f"{', ' + mp if mp else ''})", 0, 0, 0, 0, 0, activations=pk["activations"]))
    if pk["fsdp_gather"]:
        rows.append(Row("FSDP2 all-gathered units (transient)", 0, pk["fsdp_gather"], 0, 0, 0))
    total = static + pk["gradients"] + pk["activations"] + pk["fsdp_gather"]
    budget = gpu_memory * (1 - margin)
    notes = list(recipe.notes)
    if sharding == "fsdp2" and gpus == 1:
        notes.append("train.sharding=fsdp2 with 1 GPU shards nothing (and a 1-process FSDP2 launch is refused)")
    return Plan(name, algo, arch.source, gpus, gpu_memory, margin, sharding if shard else "none", rows, peak_phase,
                phase_peaks, total, host, total <= budget, notes=notes)


#: levers ``plan`` may suggest: (label, function(cfg, plan) -> list of overrides or None when n/a)
def _lever_candidates(cfg: RunConfig, gpus: int, sharding: str | None, arch: TeacherArch) -> list[tuple[str, list, str | None]]:
    out: list[tuple[str, list, str | None]] = []
    p = dict(cfg.algorithm.params)
    algo = cfg.algorithm.name
    base_key = "algorithm.params."
    if algo in ("disback", "msd"):
        p = dict(p.get("base_params") or {})
        base_key = "algorithm.params.base_params."
        base = (cfg.algorithm.params or {}).get("base", "dmd2")
    else:
        base = algo
    current = sharding if sharding is not None else (cfg.train.sharding or "none")
    if gpus > 1 and current != "fsdp2":
        out.append(("FSDP2 sharding of the trainable groups", ["train.sharding=fsdp2"], "fsdp2"))
    if base in ("dmd2", "vsd", "boot") and arch.kind == "diffusion":
        groups = ["generator"] + ([] if base == "boot" else ["critic"])
        have = list(p.get("gradient_checkpointing") or [])
        missing = [g for g in groups if g not in have]
        if missing:
            out.append((f"gradient checkpointing ({', '.join(missing)})",
                        [f"{base_key}gradient_checkpointing=[{', '.join(have + missing)}]"], None))
    if base == "dmd2" and arch.kind == "diffusion":
        if p.get("critic_lora") is None:
            out.append(("LoRA fake score sharing the teacher's weights (critic_lora rank 64)",
                        [f"{base_key}critic_lora={{rank: 64}}"], None))
        if p.get("no_grad_outside_phase") is False:
            out.append(("no critic gradients in the generator phase", [f"{base_key}no_grad_outside_phase=true"], None))
        if p.get("gan_stop_at_bottleneck") is False:
            out.append(("GAN forwards stop at the bottleneck", [f"{base_key}gan_stop_at_bottleneck=true"], None))
    if cfg.teacher.dtype == "float32":
        out.append(("frozen teacher in bfloat16", ["teacher.dtype=bfloat16"], None))
    if arch.kind == "diffusion" and arch.frozen and not (cfg.teacher.params or {}).get("offload_frozen") \
            and any(k != "vqvae" for k in arch.frozen):
        out.append(("text encoder(s) and VAE offloaded to host memory", ["teacher.params.offload_frozen=true"], None))
    if cfg.train.mixed_precision not in ("bf16", "fp16"):
        out.append(("bf16 mixed precision (activations)", ["train.mixed_precision=bf16"], None))
    if base in ("dmd2", "vsd", "boot") and arch.kind == "diffusion" and p.get("generator_lora") is None:
        out.append(("LoRA student (generator_lora rank 64; changes what is trained)",
                    [f"{base_key}generator_lora={{rank: 64}}"], None))
    if cfg.train.batch_size > 1:
        half = max(1, cfg.train.batch_size // 2)
        out.append((f"halve the per-GPU batch ({cfg.train.batch_size} -> {half}; raise grad_accum_steps to keep the "
                    "global batch)", [f"train.batch_size={half}", f"train.grad_accum_steps={cfg.train.grad_accum_steps * 2}"],
                    None))
    return out


LEVERS = ("train.sharding", "algorithm.params.gradient_checkpointing", "algorithm.params.critic_lora",
          "algorithm.params.no_grad_outside_phase", "algorithm.params.gan_stop_at_bottleneck", "teacher.dtype",
          "teacher.params.offload_frozen", "train.mixed_precision", "algorithm.params.generator_lora",
          "train.batch_size")


def _apply(cfg_source, overrides: list[str]) -> RunConfig:
    return load_config(cfg_source, overrides)


def plan_config(source: str | Path | dict | RunConfig, gpus: int = 1, gpu_memory: int | str = "80GB",
                overrides: list[str] | None = None, *, margin: float = 0.10, sharding: str | None = None,
                arch: str | None = None, suggest: bool = True) -> Plan:
    """The memory plan of a run config (preset name, YAML file, dict or :class:`RunConfig`) on
    ``gpus`` GPUs of ``gpu_memory`` each (bytes or ``"80GB"``); see the module docstring.

    ``sharding`` overrides ``train.sharding`` (``"none"`` | ``"fsdp2"``; an accelerate FSDP
    launch shards as ``fsdp2`` does).  ``arch`` forces a recorded architecture for the teacher.
    With ``suggest``, every applicable lever is tried alone (its saving) and, when the plan does
    not fit, the largest savings are applied one after another until it does (``path_to_fit``)."""
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise InputError(f"--gpus must be a whole number >= 1, got {gpus!r}")
    if not 0 <= margin < 1:
        raise InputError(f"--margin must be in [0, 1), got {margin!r}")
    mem = parse_memory(gpu_memory)
    overrides = list(overrides or [])
    if isinstance(source, RunConfig):
        from .config import to_dict

        source = to_dict(source)
    name = source if isinstance(source, str) else str(source) if isinstance(source, Path) else "<config>"
    cfg = _apply(source, overrides)
    from .run import validate_algorithm

    validate_algorithm(cfg)
    with _quiet():
        return _plan(source, cfg, overrides, gpus, mem, margin, sharding, arch, suggest, name)


@contextlib.contextmanager
def _quiet():
    """diffusers' casting notes ('modules that should be kept in float32') are noise on meta copies."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def _plan(source, cfg, overrides, gpus, mem, margin, sharding, arch, suggest, name) -> Plan:
    tarch = teacher_arch(cfg.teacher, arch)
    plan = _estimate(cfg, tarch, gpus, mem, margin, sharding, name)
    if not suggest:
        return plan
    cands = _lever_candidates(cfg, gpus, sharding, tarch)
    results = []
    for label, ovr, shard in cands:
        try:
            c2 = _apply(source, overrides + ovr)
            p2 = _estimate(c2, tarch, gpus, mem, margin, shard or sharding, name)
        except (ConfigError, InputError) as e:
            results.append({"lever": label, "overrides": ovr, "error": str(e)})
            continue
        results.append({"lever": label, "overrides": ovr, "saving": plan.total - p2.total, "total_after": p2.total,
                        "fits_after": p2.fits, "_shard": shard})
    ok = [r for r in results if "saving" in r and r["saving"] > 0]
    ok.sort(key=lambda r: -r["saving"])
    plan.levers = [{k: v for k, v in r.items() if not k.startswith("_")} for r in ok]
    if not plan.fits and ok:
        applied: list[str] = []
        shard = sharding
        current = plan
        for r in ok:
            if current.fits:
                break
            trial = applied + r["overrides"]
            c2 = _apply(source, overrides + trial)
            s2 = r["_shard"] or shard
            p2 = _estimate(c2, tarch, gpus, mem, margin, s2, name)
            if p2.total < current.total:
                applied, shard, current = trial, s2, p2
                plan.path_to_fit.append({"lever": r["lever"], "overrides": r["overrides"], "total_after": p2.total,
                                         "fits_after": p2.fits})
    return plan


# ---------------------------------------------------------------------------------------------
# output


def format_plan(plan: Plan) -> str:
    w = max(len(r.name) for r in plan.rows) + 2
    head = f"{'':<{w}}{'params':>10}{'weights':>12}{'grads':>12}{'AdamW':>12}{'EMA':>12}{'activ.':>12}{'total':>12}"
    lines = [f"plan: {plan.config} ({plan.algorithm}); teacher from {plan.teacher}",
             f"per GPU, {plan.gpus} GPU(s) x {format_bytes(plan.gpu_memory)}, sharding={plan.sharding}; "
             f"peak in the {plan.peak_phase} phase", "", head]

    def cell(v):
        return f"{format_bytes(v) if v else '-':>12}"
    for r in plan.rows:
        pn = f"{r.params / 1e6:.1f}M" if r.params else "-"
        lines.append(f"{r.name:<{w}}{pn:>10}{cell(r.weights)}{cell(r.grads)}{cell(r.optimizer)}{cell(r.ema)}"
                     f"{cell(r.activations)}{cell(r.total)}" + (f"   {r.note}" if r.note else ""))
    lines.append(f"{'total per GPU':<{w}}{'':>70}{format_bytes(plan.total):>12}")
    verdict = "fits" if plan.fits else "does NOT fit"
    lines += ["", f"{verdict}: {format_bytes(plan.total)} of {format_bytes(plan.budget)} usable "
              f"({format_bytes(plan.gpu_memory)} less a {plan.margin:.0%} margin for the CUDA context, "
              "workspaces and fragmentation)"]
    if plan.host_bytes:
        lines.append(f"host memory for offloaded frozen parts: {format_bytes(plan.host_bytes)}")
    for n in plan.notes:
        lines.append(f"note: {n}")
    if plan.path_to_fit:
        lines += ["", "to fit, turn on (in this order, largest saving first):"]
        for i, s in enumerate(plan.path_to_fit, 1):
            lines.append(f"  {i}. {s['lever']}: {' '.join(s['overrides'])} -> {format_bytes(s['total_after'])}"
                         f"{' (fits)' if s['fits_after'] else ''}")
        if not plan.path_to_fit[-1]["fits_after"]:
            lines.append("  still does not fit with every lever: more GPUs (with FSDP2) or larger GPUs")
    elif not plan.fits:
        lines.append("no lever helps: more GPUs (with train.sharding=fsdp2) or larger GPUs")
    if plan.levers:
        lines += ["", "levers (each alone, by saving):"]
        for lv in plan.levers:
            lines.append(f"  -{format_bytes(lv['saving'])}: {lv['lever']}  ({' '.join(lv['overrides'])})")
    return "\n".join(lines)


def add_parser(sub) -> None:
    """Register ``stepdistill plan`` on an argparse subparsers object."""
    import argparse

    p = sub.add_parser("plan", help="preflight memory plan of a run per GPU (no weights loaded): fits? which lever next?",
                       epilog="example: stepdistill plan sdxl/dmd2_4step --gpus 64 --gpu-memory 80GB",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="preset name (e.g. sd15/dmd2) or YAML file")
    p.add_argument("--gpus", type=int, default=1, help="GPUs (processes) of the launch (default: 1)")
    p.add_argument("--gpu-memory", default="80GB", help="memory per GPU, e.g. 80GB, 24GiB (default: 80GB)")
    p.add_argument("--margin", type=float, default=0.10, help="fraction kept free (default: 0.10)")
    p.add_argument("--sharding", choices=["none", "fsdp2"], default=None,
                   help="override train.sharding (an accelerate FSDP launch counts as fsdp2)")
    p.add_argument("--arch", default=None, help="size the teacher from this recorded architecture (hub id)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")


def run_from_args(args) -> int:
    """``stepdistill plan``: prints the table (or JSON); exit 0 whether or not it fits."""
    plan = plan_config(args.config, gpus=args.gpus, gpu_memory=args.gpu_memory, overrides=args.overrides,
                       margin=args.margin, sharding=args.sharding, arch=args.arch)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2, default=str))
    else:
        print(format_plan(plan))
    return 0
