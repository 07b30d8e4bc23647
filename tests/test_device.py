"""Device hygiene of a training step, checked on a CPU-only machine.

Two checks, for every registered algorithm (one step per phase, the pair sets and the sample grid):

* :class:`StrictDevices` -- a ``TorchFunctionMode`` that records every tensor *factory* call
  (``randn``, ``zeros``, ``arange``, ``tensor``, ...) made from a ``stepdistill`` source file without
  an explicit ``device=``.  On CPU such a tensor happens to land where the models are; on a GPU it
  lands on the CPU and the next op fails (the sample grid's noise, the regression pairs) -- so
  step-time code must name the device of every tensor it creates (``device="cpu"`` where host
  memory is meant, e.g. a seeded CPU generator whose draw is then moved).
* :func:`stray_tensors` -- after ``task.to("meta")`` every tensor reachable from a module's plain
  attributes (not a parameter or buffer) is reported if it stayed behind: state that ``.to(device)``
  does not move (``DelegatingTeacher.sigmas`` as a plain attribute).

Construction (``__init__``) runs outside the mode: the models are built on the CPU and moved by the
trainer, so creating tensors there on the CPU is right -- but a constructor must not *run* the
teacher (pair sets are made on first use, on the teacher's device).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

import stepdistill
from stepdistill.algorithms import REGISTRY, build

_PKG = os.path.dirname(os.path.abspath(stepdistill.__file__))
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))

FACTORIES = {
    torch.randn, torch.rand, torch.randint, torch.randperm, torch.normal, torch.zeros, torch.ones,
    torch.full, torch.empty, torch.arange, torch.linspace, torch.logspace, torch.eye, torch.tensor,
    torch.as_tensor,
}


class StrictDevices(TorchFunctionMode):
    """Record factory calls without ``device=`` made from stepdistill's own files."""

    def __init__(self):
        super().__init__()
        self.sites: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            keeps = func is torch.as_tensor and args and isinstance(args[0], Tensor)  # keeps its device
            normal_like = func is torch.normal and args and isinstance(args[0], Tensor)
            if not (keeps or normal_like):
                f = sys._getframe(1)
                while f is not None and f.f_code.co_filename.startswith(_TORCH):
                    f = f.f_back
                if f is not None and os.path.abspath(f.f_code.co_filename).startswith(_PKG):
                    rel = os.path.relpath(f.f_code.co_filename, os.path.dirname(_PKG))
                    self.sites.append(f"{rel}:{f.f_lineno} torch.{func.__name__} ({f.f_code.co_name})")
        return func(*args, **kwargs)


def stray_tensors(task: nn.Module, allowed=("_null_cache",)) -> list[str]:
    """Move ``task`` to the meta device and list the tensors held in plain attributes that stayed."""
    task.to("meta")
    out = []
    seen: set[int] = set()

    def visit(obj, where, depth=0):
        if depth > 3 or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, Tensor):
            if obj.device.type != "meta":
                out.append(f"{where} ({obj.device})")
        elif isinstance(obj, dict):
            for k, v in obj.items():
                visit(v, f"{where}[{k!r}]", depth + 1)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                visit(v, f"{where}[{i}]", depth + 1)

    for name, mod in task.named_modules():
        for key, val in vars(mod).items():
            if key in ("_parameters", "_buffers", "_modules") or key in allowed:
                continue
            visit(val, f"{name or type(task).__name__}.{key}")
    return out


# ---------------------------------------------------------------------------------------------
# cases


@pytest.fixture(autouse=True)
def _fresh_cache(tmp_path, monkeypatch):
    """Pair sets are generated fresh in each test (not reused from the session cache)."""
    monkeypatch.setenv("STEPDISTILL_CACHE", str(tmp_path / "cache"))


def _sd_teacher(tmp_path):
    from stepdistill.teachers.diffusion import DiffusersTeacher
    from stepdistill.testing import SD_SCHEDULER_CONFIG, tiny_sd_components

    p = tiny_sd_components(tmp_path)
    return DiffusersTeacher(p["unet"], dict(SD_SCHEDULER_CONFIG), text_encoder=p["text_encoder"],
                            tokenizer=p["tokenizer"], vae=p["vae"], guidance_scale=3.0)


def _class_teacher():
    from stepdistill.teachers.diffusion import DiffusersTeacher
    from stepdistill.testing import SD_SCHEDULER_CONFIG, tiny_unet2d

    return DiffusersTeacher(tiny_unet2d(num_classes=10, channels=3), dict(SD_SCHEDULER_CONFIG), num_classes=10,
                            guidance_scale=2.0)


PROMPTS = ["a red cat", "a blue dog", "a green bird", "a cat on a mat"]

# algorithm -> (teacher kind, params): one step of every phase it has, with its stages switched on
CASES = {
    "dmd2": ("sd", {"update_ratio": 1, "gan_weight_g": 1e-3, "regression_steps": 1, "regression_pairs": 4,
                    "regression_sampler_steps": 2, "generator_timesteps": [899], "regression_prompts": PROMPTS}),
    "dmd2-multistep": ("class", {"update_ratio": 1, "generator_timesteps": [899, 499], "regression_steps": 1,
                                 "regression_pairs": 4, "regression_sampler_steps": 2}),
    "vsd": ("sd", {"critic": "lora", "lora_rank": 2, "generator_timesteps": [899], "cond_dropout": 0.5}),
    "boot": ("class", {}),
    "disback": ("class", {"base_params": {"update_ratio": 1, "generator_timesteps": [899]}, "recording_steps": 1,
                          "num_nodes": 1}),
    "disback-loracritic": ("class", {"base_params": {"update_ratio": 1, "generator_timesteps": [899],
                                                     "gan_weight_g": 0.01,
                                                     "critic_lora": {"rank": 2, "target_modules": ["to_q", "to_v"]}},
                                     "recording_steps": 1, "num_nodes": 1}),
    "msd": ("class", {"num_students": 2, "base_params": {"update_ratio": 1, "generator_timesteps": [899],
                                                         "regression_steps": 1, "regression_pairs": 4,
                                                         "regression_sampler_steps": 2}}),
    "dd": ("ar", {"num_pairs": 8, "shard_size": 4, "flow_steps": 4, "split_points": [0, 8]}),
}


def test_every_registered_algorithm_has_a_case():
    assert set(REGISTRY) <= {k.split("-")[0] for k in CASES}


def _ar_teacher():
    from stepdistill.teachers.autoregressive import ARTeacher, LMSpec, VQSpec, build_transformer, build_vqvae

    vq_spec = VQSpec(block_out_channels=[8, 8], latent_channels=4, vq_embed_dim=2, num_vq_embeddings=8,
                     norm_num_groups=4)
    torch.manual_seed(0)
    vq = build_vqvae(vq_spec)
    lm = build_transformer(LMSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
                           vq_spec.num_vq_embeddings, 10, 16)
    return ARTeacher(vq, lm, num_classes=10, guidance_scale=1.5, top_k=6).eval().requires_grad_(False)


def _build(case, tmp_path):
    kind, params = CASES[case]
    name = case.split("-")[0]
    params = dict(params)
    if name == "disback":
        params["nodes_dir"] = str(tmp_path / "nodes")
    if name == "dd":
        params["pairs_dir"] = str(tmp_path / "pairs")
    teacher = {"sd": lambda: _sd_teacher(tmp_path), "class": _class_teacher, "ar": _ar_teacher}[kind]()
    torch.manual_seed(0)
    return teacher, build(name, teacher, params)


def _batch(teacher, kind, n=2):
    if kind == "sd":
        return {"raw_cond": PROMPTS[:n], "real": torch.rand(n, 3, 16, 16) * 2 - 1, "batch_size": n}
    if kind == "ar":
        return {"raw_cond": torch.arange(n, device="cpu") % 10, "real": None, "batch_size": n}
    return {"raw_cond": torch.arange(n, device="cpu") % 10, "real": torch.rand(n, 3, 8, 8) * 2 - 1, "batch_size": n}


def _grid(d):
    """The training-time sample grid, as the trainer asks for it (seeded CPU generator)."""
    fn = getattr(d, "sample_images", None)  # (older trees drew the grid in run.py)
    with torch.no_grad():
        return fn(2, torch.Generator().manual_seed(0)) if fn is not None else None


def _run_steps(d, teacher, kind, steps):
    for step in range(steps):
        hook = getattr(d, "on_step_begin", None)  # (a trainer hook; older trees have none)
        if hook is not None:
            hook(step, True)
        cache: dict = {}
        for group in d.phase(step):
            out = d.loss(_batch(teacher, kind), step, group, cache)
            out.loss.backward()
            d.zero_grad(set_to_none=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_step_names_every_device(case, tmp_path):
    """One step of each phase (and its stages: regression pairs, recording, ...) plus the sample
    grid, under :class:`StrictDevices`: no tensor created by stepdistill without a device."""
    teacher, d = _build(case, tmp_path)
    kind = CASES[case][0]
    mode = StrictDevices()
    with mode:
        _run_steps(d, teacher, kind, steps=3)
        _grid(d)
    assert not mode.sites, "tensors created without a device:\n" + "\n".join(sorted(set(mode.sites)))


@pytest.mark.parametrize("case", sorted(CASES))
def test_no_tensor_state_outside_parameters_and_buffers(case, tmp_path):
    """``.to(device)`` (what the trainer does to a built task) moves everything a step reads: no
    tensor in a plain attribute stays behind.  (State made later, during steps, is made on the
    device and covered by the strict-factory test.)"""
    teacher, d = _build(case, tmp_path)
    assert stray_tensors(d) == []


@pytest.mark.parametrize("case", ["dmd2", "dmd2-multistep", "msd"])
def test_constructor_does_not_run_the_teacher(case, tmp_path, monkeypatch):
    """Pair sets are made on first use (after the trainer moved the task to its device), not
    while the distiller is built on the CPU."""
    calls = []
    from stepdistill.teachers.diffusion import DiffusersTeacher

    orig = DiffusersTeacher.sample

    def spy(self, *a, **k):
        calls.append(1)
        return orig(self, *a, **k)

    monkeypatch.setattr(DiffusersTeacher, "sample", spy)
    teacher, d = _build(case, tmp_path)
    assert calls == []
    _run_steps(d, teacher, CASES[case][0], steps=1)
    assert calls, "the regression stage never generated its pairs"


def test_sample_grid_is_drawn_on_the_students_device(tmp_path):
    """The grid's seeded CPU noise is moved to the student's device (same numbers)."""
    teacher, d = _build("boot", tmp_path)
    seen = []
    gen = d.generator_for_export()
    orig = gen.forward

    def spy(z, *a, **k):
        seen.append(z.device)
        return orig(z, *a, **k)

    gen.forward = spy
    with StrictDevices() as mode:
        d.sample_images(2, torch.Generator().manual_seed(0))
    assert not mode.sites and seen and all(s == teacher.sigmas.device for s in seen)
