"""LoRA students as diffusers LoRA weights, and checked LoRA loading.

A LoRA student (``algorithm.params.generator_lora``) is a peft adapter named ``default`` on a copy
of the teacher's UNet or transformer.  It is exported the way diffusers' own LoRA training scripts
save adapters: ``get_peft_model_state_dict`` -> ``convert_state_dict_to_diffusers`` ->
``<Pipeline>.save_lora_weights`` (``pytorch_lora_weights.safetensors``, keys prefixed with the
component, ``unet.`` or ``transformer.``), with the adapter's rank / alpha / target modules as the
file's LoRA metadata so that ``pipe.load_lora_weights(folder)`` rebuilds the same ``LoraConfig``
(without metadata diffusers assumes alpha = rank).

:func:`check_lora_keys` / :func:`load_lora` check a LoRA file against a pipeline before diffusers
loads it (diffusers only warns, or silently loads nothing, when the keys name modules the pipeline
does not have); :func:`fuse_lora_into_pipeline` writes a teacher with a user's LoRA fused in, the
first step of distilling such a teacher (``docs/lora.md``).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from .common import ExportError, atomic_output_dir, unwrap

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: the pipeline component a LoRA of each denoiser class is saved under
COMPONENT = {
    "UNet2DConditionModel": "unet",
    "SD3Transformer2DModel": "transformer",
    "FluxTransformer2DModel": "transformer",
}


def adapter_config(net: nn.Module):
    """The ``LoraConfig`` of the student's ``default`` adapter (ExportError when there is none)."""
    net = unwrap(net)
    cfg = getattr(net, "peft_config", None) or {}
    if "default" not in cfg:
        raise ExportError(
            f"this {type(net).__name__} student carries no peft adapter named 'default'; LoRA export needs a "
            "student built with algorithm.params.generator_lora"
        )
    return cfg["default"]


def lora_metadata(net: nn.Module) -> dict:
    """The adapter's ``LoraConfig`` fields diffusers needs to rebuild it (JSON-safe)."""
    cfg = adapter_config(net)
    targets = cfg.target_modules
    targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
    return {
        "r": int(cfg.r),
        "lora_alpha": float(cfg.lora_alpha),
        "target_modules": targets,
        "lora_dropout": float(cfg.lora_dropout),
        "init_lora_weights": True,
        "use_dora": bool(getattr(cfg, "use_dora", False)),
        "rank_pattern": dict(getattr(cfg, "rank_pattern", {}) or {}),
        "alpha_pattern": dict(getattr(cfg, "alpha_pattern", {}) or {}),
    }


def lora_layers(net: nn.Module) -> dict:
    """The adapter's tensors in diffusers' LoRA format (no component prefix), fp32 clones."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    net = unwrap(net)
    adapter_config(net)
    state = get_peft_model_state_dict(net, adapter_name="default")
    if not state:
        raise ExportError(f"the {type(net).__name__} student's adapter has no tensors")
    return {k: v.detach().float().cpu().clone() for k, v in convert_state_dict_to_diffusers(state).items()}


def save_lora_weights(pipeline_cls, net: nn.Module, folder: Path) -> dict:
    """Write ``net``'s adapter as ``folder/pytorch_lora_weights.safetensors`` through
    ``pipeline_cls.save_lora_weights``; returns the metadata written."""
    kind = type(unwrap(net)).__name__
    component = COMPONENT.get(kind)
    if component is None:
        raise ExportError(f"LoRA export supports {sorted(COMPONENT)} students, got {kind}")
    meta = lora_metadata(net)
    pipeline_cls.save_lora_weights(
        folder,
        **{f"{component}_lora_layers": lora_layers(net), f"{component}_lora_adapter_metadata": meta},
        weight_name=LORA_WEIGHT_NAME,
        safe_serialization=True,
    )
    return meta


# -- checked loading --------------------------------------------------------------------------------
def _lora_file(source) -> Path:
    path = Path(source)
    if path.is_dir():
        path = path / LORA_WEIGHT_NAME
    if not path.is_file():
        raise ExportError(f"{path}: no LoRA weights file (expected {LORA_WEIGHT_NAME} in the folder)")
    return path


def _module_of_key(key: str) -> str:
    for marker in (".lora_A.", ".lora_B.", ".lora.down.", ".lora.up.", ".lora_down.", ".lora_up.", ".alpha"):
        if marker in key:
            return key.split(marker)[0]
    return key.rsplit(".", 2)[0]


#: pipeline components a diffusers LoRA file may adapt (``<component>.<layer>.lora_A.weight``)
LORA_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def _layer_dims(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Conv2d):
        return module.in_channels, module.out_channels
    return module.in_features, module.out_features


def _shape_problem(key: str, shape: list[int], module: nn.Module) -> str | None:
    """Why a LoRA tensor of ``shape`` cannot adapt ``module`` (its down matrix reads the layer's
    input width, its up matrix writes the output width), or None."""
    d_in, d_out = _layer_dims(module)
    down = any(m in key for m in (".lora_A.", ".lora.down.", ".lora_down."))
    up = any(m in key for m in (".lora_B.", ".lora.up.", ".lora_up."))
    if down and len(shape) >= 2 and shape[1] != d_in:
        return f"its down matrix reads {shape[1]} features but the layer takes {d_in}"
    if up and len(shape) >= 1 and shape[0] != d_out:
        return f"its up matrix writes {shape[0]} features but the layer gives {d_out}"
    return None


def check_lora_keys(pipe, source) -> list[str]:
    """Check that every key of the LoRA file ``source`` (a folder or a ``.safetensors`` file) names a
    Linear / Conv2d layer of ``pipe``'s UNet / transformer (or of its text encoders, which users'
    LoRAs may adapt too) with matching widths; returns the adapted denoiser module names.  A
    mismatch raises :class:`ExportError` in one line naming what the pipeline expected."""
    from safetensors import safe_open

    path = _lora_file(source)
    with safe_open(str(path), framework="pt") as fh:
        shapes = {k: list(fh.get_slice(k).get_shape()) for k in fh.keys()}
    keys = list(shapes)
    name = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    net = getattr(pipe, name, None)
    if net is None:
        raise ExportError(f"{type(pipe).__name__} has neither a unet nor a transformer to load a LoRA into")
    layers = {c: {n: m for n, m in getattr(pipe, c).named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
              for c in LORA_COMPONENTS if isinstance(getattr(pipe, c, None), nn.Module)}
    modules = layers[name]
    prefix = f"{name}."
    expected = f"'{prefix}<layer>.lora_A.weight' / '.lora_B.weight' keys naming Linear/Conv2d layers of its {type(net).__name__}"
    example = f"(e.g. {prefix}{min(modules)}.lora_A.weight)"
    wrong_prefix = [k for k in keys if k.split(".", 1)[0] not in layers]
    if wrong_prefix:
        raise ExportError(
            f"{path.name} does not match {type(pipe).__name__}: {len(wrong_prefix)} of {len(keys)} keys lack the "
            f"'{prefix}' prefix (e.g. {wrong_prefix[0]!r}); expected {expected} {example}"
        )
    adapted: dict[str, set[str]] = {}
    for k in keys:
        component, rest = k.split(".", 1)
        adapted.setdefault(component, set()).add(_module_of_key(rest))
    for component, mods in adapted.items():
        have = layers[component]
        unknown = sorted(m for m in mods if m not in have)
        if unknown:
            what = type(getattr(pipe, component)).__name__
            raise ExportError(
                f"{path.name} does not match {type(pipe).__name__}: {len(unknown)} of {len(mods)} adapted layers do not "
                f"exist in its {what} (e.g. {unknown[0]!r}); expected {expected} {example} - a LoRA for another "
                "model family or size?"
            )
    for k, shape in shapes.items():
        component, rest = k.split(".", 1)
        layer = _module_of_key(rest)
        problem = _shape_problem(k, shape, layers[component][layer])
        if problem:
            d_in, d_out = _layer_dims(layers[component][layer])
            raise ExportError(
                f"{path.name} does not match {type(pipe).__name__}: {k} has shape {shape}, {problem} "
                f"({component}.{layer} is {d_in} -> {d_out}); a LoRA for another model size (e.g. SD 1.x on SD 2.x)?"
            )
    return sorted(adapted.get(name, set()))


def load_lora(pipe, source, adapter_name: str | None = None):
    """:func:`check_lora_keys`, then ``pipe.load_lora_weights(source)``; returns ``pipe``."""
    check_lora_keys(pipe, source)
    path = _lora_file(source)
    kw = {"adapter_name": adapter_name} if adapter_name else {}
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, **kw)
    return pipe


def fuse_lora_into_pipeline(teacher_dir, lora, output_dir, *, lora_scale: float = 1.0, overwrite: bool = False) -> Path:
    """Write the pipeline folder ``teacher_dir`` with the LoRA ``lora`` (a folder or file, checked with
    :func:`check_lora_keys`) fused into its UNet / transformer: a plain pipeline folder that
    ``teacher.path`` can point at, so that a teacher with a user's LoRA can be distilled."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(teacher_dir))
    load_lora(pipe, lora)
    pipe.fuse_lora(lora_scale=lora_scale)
    pipe.unload_lora_weights()
    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "stepdistill_fused_lora.json").write_text(
            json.dumps({"teacher": str(teacher_dir), "lora": str(lora), "lora_scale": lora_scale}, indent=2) + "\n"
        )
    return Path(output_dir).expanduser().absolute()


__all__ = [
    "LORA_WEIGHT_NAME",
    "adapter_config",
    "check_lora_keys",
    "fuse_lora_into_pipeline",
    "load_lora",
    "lora_layers",
    "lora_metadata",
    "save_lora_weights",
]
