"""The contract every registered algorithm keeps, parametrised over ``REGISTRY``: a new algorithm is
enrolled automatically (its cheap settings go in ``conftest.FAST``).

Checked per algorithm: the registry entry declares its interface; each phase's loss is finite, its
logs are scalars, and its gradient reaches the phase's group through parameters no other group
shares while the teacher gets none; no trainable group holds a teacher parameter; the loss is
deterministic under a seed; and the trainable state plus ``state_dict_extra`` round-trip into a
fresh build (same phases, same losses).
"""

from __future__ import annotations

import json

import pytest
import torch
from support import begin_step, make_case

from stepdistill.algorithms import REGISTRY
from stepdistill.algorithms.base import Distiller

ALL = sorted(REGISTRY)


def _is_scalar_log(v) -> bool:
    if isinstance(v, torch.Tensor):
        return v.numel() == 1 and not v.requires_grad
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@pytest.mark.parametrize("name", ALL)
def test_registry_entries_declare_interface(name):
    cls = REGISTRY[name]
    assert issubclass(cls, Distiller)
    assert cls.name == name and cls.paper and cls.Config is not None


@pytest.mark.parametrize("name", ALL)
def test_phase_updates_exactly_its_group(name, request, tmp_path):
    torch.manual_seed(0)
    case = make_case(name, request, tmp_path)
    d, teacher = case.distiller, case.teacher
    groups = d.trainable()
    teacher_params = list(teacher.parameters())
    for step in range(3):
        cache: dict = {}
        for group in begin_step(d, step):
            for m in groups.values():
                m.zero_grad(set_to_none=True)
            out = d.loss(case.batch(step, n=32), step, group, cache)
            assert out.loss.ndim == 0 and torch.isfinite(out.loss), (name, group, out.loss)
            assert out.logs and all(_is_scalar_log(v) for v in out.logs.values()), out.logs
            out.loss.backward()
            own = [p for p in groups[group].parameters() if p.requires_grad]
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in own), f"{group} got no gradient"
            others = [p for g, m in groups.items() if g != group for p in m.parameters()]
            # other groups may receive gradients through the graph (e.g. the GAN loss through the
            # critic), but never through parameters shared with this group
            assert not set(map(id, own)) & set(map(id, others))
            assert all(p.grad is None for p in teacher_params)


@pytest.mark.parametrize("name", ALL)
def test_trainable_groups_exclude_teacher(name, request, tmp_path):
    case = make_case(name, request, tmp_path)
    d = case.distiller
    teacher_ids = {id(p) for p in case.teacher.parameters()}
    for m in d.trainable().values():
        assert not teacher_ids & {id(p) for p in m.parameters()}
    assert all(not p.requires_grad for p in d.teacher.parameters())


@pytest.mark.parametrize("name", ALL)
def test_loss_is_deterministic_under_seed(name, request, tmp_path):
    case = make_case(name, request, tmp_path)
    d = case.distiller
    group = begin_step(d, 0)[0]
    vals = []
    for _ in range(2):
        torch.manual_seed(123)
        out = d.loss(case.batch(0, n=32), 0, group, {})
        vals.append(float(out.loss.detach()))
    assert vals[0] == vals[1]


@pytest.mark.parametrize("name", ALL)
def test_state_round_trips_into_a_fresh_build(name, request, tmp_path):
    """What a checkpoint holds (each group's ``state_dict`` and ``state_dict_extra``) restores the
    algorithm: a fresh build loaded with it computes the same losses at the same seed."""
    torch.manual_seed(0)
    case = make_case(name, request, tmp_path)
    d = case.distiller
    opts = {k: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-2) for k, m in d.trainable().items()}
    steps = 3
    for step in range(steps):
        cache: dict = {}
        for group in begin_step(d, step):
            d.loss(case.batch(step), step, group, cache).loss.backward()
            opts[group].step()
            for o in opts.values():
                o.zero_grad(set_to_none=True)
    state = {g: {k: v.clone() for k, v in m.state_dict().items()} for g, m in d.trainable().items()}
    extra_fn = getattr(d, "state_dict_extra", None)
    extra = extra_fn() if extra_fn is not None else None

    torch.manual_seed(1)  # a different init: everything must come from the saved state
    fresh = case.build()
    for g, m in fresh.trainable().items():
        m.load_state_dict(state[g])
    if extra is not None:
        fresh.load_state_dict_extra(extra)
        assert json.dumps(fresh.state_dict_extra(), sort_keys=True) == json.dumps(extra, sort_keys=True)
    phases = begin_step(d, steps), begin_step(fresh, steps)
    assert phases[0] == phases[1]
    for group in phases[0]:
        losses = []
        for model in (d, fresh):
            torch.manual_seed(7)
            losses.append(float(model.loss(case.batch(steps), steps, group, {}).loss.detach()))
        assert losses[0] == losses[1], (name, group, losses)
