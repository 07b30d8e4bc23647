"""Exponential moving average of a module's trainable parameters.

``shadow <- d * shadow + (1 - d) * param`` after each optimizer step of the tracked group, with
the warm-up ``d_n = min(decay, (1 + n) / (10 + n))`` where ``n`` counts previous updates (so early
on the average follows the model closely).  From the second update on this is the warm-up
diffusers' ``EMAModel`` uses by default; the first update differs: here ``d_0 = 0.1``, while
diffusers' first ``step()`` uses decay 0 (a plain copy).
Buffers are not averaged; :meth:`EMA.state_dict_for` takes them from the live module.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["EMA"]


class EMA:
    def __init__(self, module: nn.Module, decay: float, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = warmup
        self.num_updates = 0
        # low-precision weights are averaged in fp32 (a 0.999 decay is below bf16 resolution)
        self.shadow: dict[str, Tensor] = {
            n: p.detach().clone().to(torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype)
            for n, p in module.named_parameters()
            if p.requires_grad
        }

    def current_decay(self) -> float:
        """The decay the next :meth:`update` uses."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    def _params(self, module: nn.Module) -> list[tuple[Tensor, Tensor]]:
        named = dict(module.named_parameters())
        missing = [n for n in self.shadow if n not in named]
        if missing:
            raise KeyError(f"EMA tracks parameters the module does not have: {', '.join(missing[:5])}")
        return [(self.shadow[n], named[n]) for n in self.shadow]

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        d = self.current_decay()
        pairs = self._params(module)
        if pairs:
            shadows = [s for s, _ in pairs]
            params = [p.detach().to(s.dtype) for s, p in pairs]
            torch._foreach_lerp_(shadows, params, 1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Overwrite the module's tracked parameters with the averages."""
        for s, p in self._params(module):
            p.copy_(s)

    @contextmanager
    def swapped(self, module: nn.Module) -> Iterator[nn.Module]:
        """Temporarily put the averages into ``module`` (restored on exit)."""
        backup = {n: p.detach().clone() for n, p in module.named_parameters() if n in self.shadow}
        self.copy_to(module)
        try:
            yield module
        finally:
            with torch.no_grad():
                for n, p in module.named_parameters():
                    if n in backup:
                        p.copy_(backup[n])

    def state_dict_for(self, module: nn.Module) -> dict[str, Tensor]:
        """``module.state_dict()`` with the averaged parameters (tied keys included), detached clones."""
        with self.swapped(module):
            return {k: v.detach().clone() for k, v in module.state_dict().items()}

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shadow": self.shadow,
        }

    @torch.no_grad()
    def load_shadow(self, tensors: dict[str, Tensor], num_updates: int) -> None:
        missing = [n for n in self.shadow if n not in tensors]
        if missing:
            raise KeyError(f"EMA state lacks parameters: {', '.join(missing[:5])}")
        for n, s in self.shadow.items():
            s.copy_(tensors[n].to(s.device, s.dtype))
        self.num_updates = int(num_updates)

    def load_state_dict(self, state: dict) -> None:
        self.load_shadow(state["shadow"], state["num_updates"])
