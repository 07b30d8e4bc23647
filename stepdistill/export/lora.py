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


def check_lora_keys(pipe, source) -> list[str]:
    """Check that every key of the LoRA file ``source`` (a folder or a ``.safetensors`` file) names a
    layer of ``pipe``'s UNet / transformer; returns the adapted module names.  A mismatch raises
    :class:`ExportError` in one line naming what the pipeline expected."""
    from safetensors import safe_open

    path = _lora_file(source)
    with safe_open(str(path), framework="pt") as fh:
        keys = list(fh.keys())
    name = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    net = getattr(pipe, name, None)
    if net is None:
        raise ExportError(f"{type(pipe).__name__} has neither a unet nor a transformer to load a LoRA into")
    modules = {n for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    prefix = f"{name}."
    expected = f"'{prefix}<layer>.lora_A.weight' / '.lora_B.weight' keys naming Linear/Conv2d layers of its {type(net).__name__}"
    wrong_prefix = [k for k in keys if not k.startswith(prefix)]
    if wrong_prefix:
        raise ExportError(
            f"{path.name} does not match {type(pipe).__name__}: {len(wrong_prefix)} of {len(keys)} keys lack the "
            f"'{prefix}' prefix (e.g. {wrong_prefix[0]!r}); expected {expected} (e.g. {prefix}{min(modules)}.lora_A.weight)"
        )
    adapted = sorted({_module_of_key(k[len(prefix):]) for k in keys})
    unknown = [m for m in adapted if m not in modules]
    if unknown:
        raise ExportError(
            f"{path.name} does not match {type(pipe).__name__}: {len(unknown)} of {len(adapted)} adapted layers do not "
            f"exist in its {type(net).__name__} (e.g. {unknown[0]!r}); expected {expected} "
            f"(e.g. {prefix}{min(modules)}.lora_A.weight) - a LoRA for another model family or size?"
        )
    return adapted


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
