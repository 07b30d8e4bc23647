"""stepdistill: distil slow multi-step image generators into one-step diffusers pipelines."""

__version__ = "0.1.0"
