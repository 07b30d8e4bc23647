"""Typed configuration: dataclasses per layer, YAML presets, dotted overrides.

A run is described by one :class:`RunConfig` with four sections (``teacher``, ``algorithm``,
``train``, ``eval``).  YAML files and ``key.sub=value`` overrides are merged into it; every key is
checked against the dataclass fields and every value against the field's type, so a typo fails
with a message that names the key and lists what is allowed instead of being silently ignored.

The ``algorithm`` section is free-form at this level (``name`` plus ``params``): the algorithm's
own ``Config`` dataclass validates ``params`` once the algorithm is known (see
``stepdistill.algorithms.build``).

Time is counted in optimizer steps everywhere; field names end in ``_steps``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from .errors import InputError

__all__ = [
    "ConfigError",
    "TeacherConfig",
    "AlgorithmConfig",
    "TrainConfig",
    "EvalConfig",
    "RunConfig",
    "from_dict",
    "to_dict",
    "load_config",
    "apply_overrides",
    "preset_path",
    "list_presets",
]


class ConfigError(InputError):
    """A configuration problem; the message names the offending key and the fix."""


# ---------------------------------------------------------------------------------------------
# Sections


@dataclass
class TeacherConfig:
    kind: str = "diffusers"  # diffusers | analytic | digits (embedded; trained and cached on demand)
    path: str | None = None  # local folder or hub id of a diffusers pipeline (kind=diffusers)
    prediction_type: str | None = None  # override the scheduler config's (epsilon|v_prediction|sample|flow)
    guidance_scale: float = 1.0  # classifier-free guidance applied to the teacher ("real") score
    dtype: str = "float32"  # float32 | bfloat16 | float16, for the frozen teacher
    params: dict = field(default_factory=dict)  # kind-specific extras (e.g. analytic mixture spec)


@dataclass
class AlgorithmConfig:
    name: str = "dmd2"
    params: dict = field(default_factory=dict)  # validated by the algorithm's own Config dataclass


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    max_steps: int = 1000
    batch_size: int = 32  # per process
    grad_accum_steps: int = 1
    seed: int = 0
    lr: dict = field(default_factory=dict)  # per trainable group, e.g. {generator: 1e-5, critic: 1e-4}
    default_lr: float = 1e-4
    adam_betas: list = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float | None = 10.0
    mixed_precision: str | None = None  # no | bf16 | fp16; null = the launcher's choice (else "no")
    sharding: str | None = None  # null (replicated) | fsdp2 (trainable groups sharded; also an FSDP launch)
    ema_decay: float | None = None  # EMA of the generator; None disables
    checkpoint_every_steps: int = 500
    checkpoints_total_limit: int | None = 2
    resume: str | None = "latest"  # "latest", a checkpoint folder, or null to start fresh
    log_every_steps: int = 10
    sample_every_steps: int = 500  # sample grid PNG; 0 disables
    num_sample_images: int = 16
    report_to: str | None = "tensorboard"
    progress: bool = True
    dataset: str | None = None  # digits | a folder | hf:<name or local path>; None = no data (data-free)
    dataset_params: dict = field(default_factory=dict)
    num_workers: int = 0


@dataclass
class EvalConfig:
    num_images: int = 1000
    batch_size: int = 250
    detector: str = "digits"  # digits | inception | clip
    reference: str | None = "digits"
    seed: int = 0
    every_steps: int = 0  # FID during training; 0 disables


@dataclass
class RunConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    description: str = ""  # what the preset is for, expected metric and budget (edm2-style)


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass with checking


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; allow the obvious lossless coercions."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:  # try the next member of the union
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected float, got bool {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected float, got {value!r} ({type(value).__name__})")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected int, got {value!r} ({type(value).__name__})")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r} ({type(value).__name__})")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r} ({type(value).__name__})")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is list or origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if args and args[0] is not Ellipsis:
            return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        return list(value)
    return value


def from_dict(cls: type, data: dict | None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        import difflib

        hints_txt = []
        for k in unknown:
            close = difflib.get_close_matches(k, names, n=1)
            hints_txt.append(f"'{prefix}{k}'" + (f" (did you mean '{prefix}{close[0]}'?)" if close else ""))
        raise ConfigError(
            f"unknown config key {', '.join(hints_txt)}; allowed keys under "
            f"'{prefix.rstrip('.') or '<top>'}': {', '.join(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# YAML, presets and overrides


def _configs_root() -> Path:
    from stepdistill import configs as _configs_pkg  # installed from the top-level configs/ folder

    return Path(_configs_pkg.__file__).parent


def list_presets() -> list[str]:
    root = _configs_root()
    # configs/accelerate/ holds `accelerate launch --config_file` files, not run presets
    return sorted(
        str(p.relative_to(root).with_suffix(""))
        for p in root.rglob("*.yaml")
        if p.relative_to(root).parts[0] != "accelerate"
    )


def preset_path(name: str) -> Path:
    """Resolve a preset name (``digits/dmd2``, ``digits``) or a path to a YAML file."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    root = _configs_root()
    for cand in (root / f"{name}.yaml", root / name / "teacher.yaml"):
        if cand.exists():
            return cand
    raise ConfigError(
        f"no preset or YAML file named '{name}'. Available presets: {', '.join(list_presets())}"
    )


def _read_yaml(path: Path) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def _deep_merge(base: dict, other: dict) -> dict:
    out = dict(base)
    for k, v in other.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):  # ``params`` mappings merge too
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value (e.g. train.max_steps=200)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    value = yaml.safe_load(raw) if raw.strip() else None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = dict(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
            node[part] = dict(nxt)
            node = node[part]
        node[path[-1]] = value
    return data


def load_config(source: str | Path | dict | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a :class:`RunConfig` from a preset name, YAML path or dict, then apply overrides.

    YAML files may name a ``base:`` preset/file which is loaded first and merged under them.
    """
    if source is None:
        data: dict = {}
    elif isinstance(source, dict):
        data = dict(source)
    else:
        data = _read_yaml(preset_path(str(source)))
    seen = set()
    while "base" in data:
        base_name = data.pop("base")
        if base_name in seen:
            raise ConfigError(f"config 'base' chain loops at '{base_name}'")
        seen.add(base_name)
        base = _read_yaml(preset_path(base_name))
        # a child that names another algorithm starts from that algorithm's defaults, not the base's params
        b_alg, c_alg = base.get("algorithm") or {}, data.get("algorithm") or {}
        if "name" in c_alg and c_alg["name"] != b_alg.get("name") and "params" in b_alg:
            base = dict(base, algorithm={k: v for k, v in b_alg.items() if k != "params"})
        data = _deep_merge(base, data)
    data = apply_overrides(data, overrides or [])
    cfg = from_dict(RunConfig, data)
    check_values(cfg)
    return cfg


def _walk(data: Any, prefix: str):
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _walk(v, f"{prefix}.{k}")
    else:
        yield prefix, data


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_values(cfg: RunConfig) -> None:
    """Range checks of values whose type :func:`from_dict` already checked: guidance scales >= 0
    (``teacher.guidance_scale`` and every ``*guidance_scale*`` key under ``teacher.params`` /
    ``algorithm.params``), resolutions >= 1, ``train.max_steps >= 1`` (0 would export the
    untrained student), ``eval.num_images >= 1``; each error names the key."""
    import math

    def bad(key: str, value: Any, need: str) -> ConfigError:
        return ConfigError(f"{key}={value!r} is out of range: {need}")

    g = cfg.teacher.guidance_scale
    if not math.isfinite(g) or g < 0:
        raise bad("teacher.guidance_scale", g, "guidance scales must be finite and >= 0 (1 = no guidance)")
    for key, value in [*_walk(cfg.teacher.params, "teacher.params"), *_walk(cfg.algorithm.params, "algorithm.params"),
                       *_walk(cfg.train.dataset_params, "train.dataset_params")]:
        name = key.rsplit(".", 1)[-1]
        values = value if isinstance(value, (list, tuple)) else [value]
        if "guidance_scale" in name:
            for v in values:
                if v is not None and (not _number(v) or not math.isfinite(v) or v < 0):
                    raise bad(key, value, "guidance scales must be finite numbers >= 0 (1 = no guidance)")
        if name in ("resolution", "image_size", "sample_size"):
            for v in values:
                if v is not None and (not _number(v) or int(v) != v or v < 1):
                    raise bad(key, value, "a resolution is a whole number of pixels >= 1")
    if cfg.train.max_steps == 0:
        raise ConfigError(
            "train.max_steps=0 trains nothing (the export would be the untrained student); pass "
            "train.max_steps=N with N >= 1, or export an existing run with `stepdistill export RUN --output DIR`"
        )
    if cfg.eval.num_images < 1:
        raise bad("eval.num_images", cfg.eval.num_images, "must be >= 1")


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
