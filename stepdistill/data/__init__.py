"""Datasets: embedded (digits, 2-D toy mixtures), image folders, Hugging Face ``datasets``."""

from .digits import load_digits

__all__ = ["load_digits"]
