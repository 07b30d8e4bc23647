"""Suite-wide settings: one torch thread (tiny models on a shared 2-core machine run ~20x faster
than with oversubscribed threads), an isolated cache, and no hub access."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    prev = os.environ.get("STEPDISTILL_CACHE")
    if prev is None:
        os.environ["STEPDISTILL_CACHE"] = str(tmp_path_factory.mktemp("stepdistill-cache"))
    yield
    if prev is None:
        os.environ.pop("STEPDISTILL_CACHE", None)
