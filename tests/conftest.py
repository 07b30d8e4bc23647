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


@pytest.fixture(autouse=True)
def _sigint_handler_restored(request):
    """A test that leaves its own SIGINT handler behind would make the trainer's Ctrl-C handling
    (installed only over Python's default handler) silently inactive in every later test: restore
    the handler each test found and name the test that changed it."""
    import signal
    import warnings

    before = signal.getsignal(signal.SIGINT)
    yield
    after = signal.getsignal(signal.SIGINT)
    if after is not before:
        signal.signal(signal.SIGINT, before)
        warnings.warn(f"{request.node.nodeid} left SIGINT handler {after!r}; restored", stacklevel=1)
