"""Distillation algorithms: one file each, registered in ``REGISTRY`` (an explicit dict)."""

from __future__ import annotations

from .base import Distiller, LossOutput

REGISTRY: dict[str, type[Distiller]] = {}


def register(cls: type[Distiller]) -> type[Distiller]:
    REGISTRY[cls.name] = cls
    return cls


def build(name: str, teacher, params: dict | None = None) -> Distiller:
    """Instantiate algorithm ``name`` with its typed Config built from ``params``."""
    from ..config import ConfigError, from_dict

    if name not in REGISTRY:
        raise ConfigError(f"unknown algorithm '{name}'; available: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[name]
    cfg = from_dict(cls.Config, params or {}, prefix="algorithm.params.")
    return cls(teacher, cfg)


__all__ = ["REGISTRY", "Distiller", "LossOutput", "build", "register"]

# explicit registry: importing the algorithm modules registers them
from . import boot, disback, distilled_decoding, dmd2, msd, vsd  # noqa: E402,F401
