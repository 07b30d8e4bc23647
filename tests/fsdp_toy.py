"""A small two-group task for the FSDP2 tests and benchmarks/fsdp_cpu.py: a block-structured
generator (like a UNet's down/mid/up blocks; ``net="stack"``: a transformer-like stack of many small
blocks) and critic on the analytic ring teacher; the generator phase back-propagates through the
critic with its ``requires_grad`` off (DMD2's ``no_grad_outside_phase``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stepdistill.algorithms.base import Distiller, LossOutput
from stepdistill.config import TrainConfig
from stepdistill.teachers.analytic import GaussianMixtureTeacher, MLPDenoiser


class Blocks(nn.Module):
    def __init__(self, out: int, width: int = 64, depth: int = 3):
        super().__init__()
        self.conv_in = nn.Linear(2, width)
        self.down_blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.SiLU()) for _ in range(depth))
        self.mid_block = nn.Sequential(nn.Linear(width, width), nn.SiLU())
        self.up_blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.SiLU()) for _ in range(depth))
        self.conv_out = nn.Linear(width, out)

    def forward(self, x):
        h = self.conv_in(x)
        for b in self.down_blocks:
            h = h + b(h)
        h = self.mid_block(h)
        for b in self.up_blocks:
            h = h + b(h)
        return self.conv_out(h)


class Stack(nn.Module):
    """A transformer-like stack: an input projection, ``depth`` small repeated blocks in one
    ``ModuleList`` (each below 1/16 of the parameters, as each of FLUX's 57 and SD3's 24 transformer
    blocks is), a norm and an output head."""

    def __init__(self, out: int = 2, width: int = 32, depth: int = 24):
        super().__init__()
        self.proj_in = nn.Linear(2, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.SiLU()) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, out)

    def forward(self, x):
        h = self.proj_in(x)
        for b in self.blocks:
            h = h + b(h)
        return self.proj_out(self.norm(h))


class FSDPToy(Distiller):
    name = "fsdp_toy"
    paper = "-"
    Config = dict

    def __init__(self, width: int = 64, net: str = "blocks"):
        torch.manual_seed(0)
        gmm = GaussianMixtureTeacher.ring()
        super().__init__(MLPDenoiser(gmm, hidden=16), {})
        self.gmm = gmm
        cls = {"blocks": Blocks, "stack": Stack}[net]  # stack: many small blocks in a ModuleList
        self.generator = cls(2, width)
        self.critic = cls(1, width)
        self.generator_calls = 0

    def trainable(self):
        return {"generator": self.generator, "critic": self.critic}

    def phase(self, step):
        return ["generator", "critic"] if step % 2 == 0 else ["critic"]

    def lr_defaults(self):
        return {"generator": 1e-3, "critic": 2e-3}

    def loss(self, batch, step, group, cache):
        raw = batch["raw_cond"]
        n = raw.shape[0]
        cond = self.teacher.encode_conditions(raw)
        if group == "generator":
            self.generator_calls += 1
            x = self.generator(torch.randn(n, 2))
            cache["fake"] = x.detach()
            den = self.teacher.denoise(x + 0.5 * torch.randn_like(x), torch.full((n,), 0.5), cond)
            self.critic.requires_grad_(False)  # no critic weight gradients in the generator phase
            try:
                loss = F.softplus(-self.critic(x)).mean() + 0.1 * ((x - den) ** 2).mean()
            finally:
                self.critic.requires_grad_(True)
        else:
            fake = cache.get("fake")
            if fake is None:
                with torch.no_grad():
                    fake = self.generator(torch.randn(n, 2))
            real = self.gmm.sample_data(n, cond=cond)
            loss = F.softplus(self.critic(fake)).mean() + F.softplus(-self.critic(real)).mean()
        return LossOutput(loss, {})

    def generator_for_export(self):
        return self.generator

    def state_dict_extra(self):
        return {"generator_calls": self.generator_calls}

    def load_state_dict_extra(self, d):
        self.generator_calls = int(d["generator_calls"])


def make_cfg(out, **kw) -> TrainConfig:
    base = dict(output_dir=str(out), max_steps=4, batch_size=8, checkpoint_every_steps=2,
                checkpoints_total_limit=None, report_to=None, progress=False, log_every_steps=1,
                sample_every_steps=0, resume="latest", seed=0, ema_decay=0.8, max_grad_norm=0.5)
    base.update(kw)
    return TrainConfig(**base)
