"""Helpers shared by the per-algorithm tests: a registry-wide builder (:func:`make_case`), cheap
settings, batches and a tiny manual training loop in the generic trainer's order.

A new algorithm is enrolled in ``test_contract.py`` automatically through :func:`make_case`; give it
cheap settings in :data:`FAST` when its defaults are slow on the analytic teacher.
"""

from __future__ import annotations

from pathlib import Path

import torch

from stepdistill.algorithms import REGISTRY, build

# cheap settings so every algorithm builds in a second on the analytic teacher
FAST = {
    "dmd2": {"update_ratio": 2},
    "vsd": {"critic": "full"},
    # a short recording, so that three steps reach backtracking (one node: the target is the teacher,
    # so the generator gets a gradient without any optimizer step having moved the critic)
    "disback": {"base_params": {"update_ratio": 2}, "recording_steps": 2, "num_nodes": 1},
}
# per-case settings that need a folder of their own (filled in by make_case)
_DIRS = {"disback": "nodes_dir", "dd": "pairs_dir"}
# the AR-teacher algorithm (Distilled Decoding) on the tiny VQ + LM teacher
AR_FAST = {"dd": {"num_pairs": 48, "shard_size": 16, "flow_steps": 8, "split_points": [0, 8]}}


def teacher_kind(name: str) -> str:
    return getattr(REGISTRY[name], "teacher_kind", "diffusion")


def fast_build(name, teacher, **extra):
    """``build(name, teacher, FAST[name] + extra)``."""
    params = dict(FAST.get(name, {}))
    params.update(extra)
    return build(name, teacher, params)


def make_batch(teacher, n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"raw_cond": teacher.random_raw_conditions(n, g), "real": teacher.sample_data(n, g), "batch_size": n}


class Case:
    """One algorithm ready for the contract suite: the distiller, its teacher and a batch maker."""

    def __init__(self, name, teacher, folder: Path):
        self.name, self.teacher, self.folder = name, teacher, folder
        self.kind = teacher_kind(name)
        self.distiller = self.build()
        self.source = self.distiller.make_source(seed=0) if self.kind == "ar" else None

    def build(self):
        params = dict((AR_FAST if self.kind == "ar" else FAST).get(self.name, {}))
        if self.name in _DIRS:
            params[_DIRS[self.name]] = str(self.folder / self.name)
        return build(self.name, self.teacher, params)

    def batch(self, step: int, n: int = 16):
        if self.source is not None:
            return self.source.batch(step, 0, 1, n)
        return make_batch(self.teacher, n=n, seed=step)


def make_case(name, request, tmp_path) -> Case:
    kind = teacher_kind(name)
    if kind not in ("diffusion", "ar"):
        raise NotImplementedError(f"no contract fixture for teacher kind {kind!r}: add one in tests/algorithms/conftest.py")
    teacher = request.getfixturevalue("ar_teacher" if kind == "ar" else "teacher")
    return Case(name, teacher, tmp_path)


def begin_step(d, step: int) -> list[str]:
    """The groups of ``step`` as the trainer sees them: the per-step hook (``on_step_begin``, where
    the task contract has one) first, then ``phase``."""
    hook = getattr(d, "on_step_begin", None)
    if hook is not None:
        hook(step, True)
    return d.phase(step)


def run_steps(d, teacher, steps, start=0, batch_fn=None):
    """Train ``d`` for ``steps`` steps with Adam(1e-3) per group, as the generic loop orders it."""
    batch_fn = batch_fn or (lambda step: make_batch(teacher, n=16, seed=step))
    opts = {k: torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-3)
            for k, m in d.trainable().items()}
    for step in range(start, start + steps):
        cache: dict = {}
        for group in begin_step(d, step):
            out = d.loss(batch_fn(step), step, group, cache)
            out.loss.backward()
            opts[group].step()
            for o in opts.values():
                o.zero_grad(set_to_none=True)


class Exact(torch.nn.Module):
    """A 'critic' that is exactly the teacher."""

    def __init__(self, teacher):
        super().__init__()
        self.t = teacher

    def denoise(self, *a, **k):
        return self.t.denoise(*a, **k)
