"""Teacher adapters: every teacher speaks the contract of ``teachers/base.py``."""

from .analytic import GaussianMixtureTeacher, MLPDenoiser
from .base import Cond, DiffusionTeacher

__all__ = ["Cond", "DiffusionTeacher", "GaussianMixtureTeacher", "MLPDenoiser"]
