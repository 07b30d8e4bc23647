"""Text-conditioned correctness of the distillation algorithms (issue #14, point 1).

* a text teacher with no prompt source is refused by every score-distillation algorithm with a
  message naming ``train.dataset=prompts:<file>`` (it trained unconditionally, CFG skipped);
* MSD partitions prompts (balanced k-means over pooled text embeddings, deterministic) instead of
  refusing text teachers, trains each student on its prompts only, and exports a prompt-routing
  pipeline that a fresh process loads with plain diffusers + trust_remote_code;
* the condition survives every wrapper (DisBack's node target, a DelegatingTeacher, LoRA critics,
  MSD students) for every text-encoder layout (SD: one encoder; SDXL: added_cond_kwargs; SD3: dict
  conditions with pooled projections).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from stepdistill.algorithms import build
from stepdistill.config import ConfigError, TrainConfig

PROMPTS = ["a red cat", "a blue dog", "a green bird", "a cat on a mat", "a dog on a mat", "a red bird",
           "a blue cat", "a green dog"]


@pytest.fixture(autouse=True)
def _fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STEPDISTILL_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def sd_teacher(tmp_path_factory):
    from stepdistill.teachers.diffusion import DiffusersTeacher
    from stepdistill.testing import SD_SCHEDULER_CONFIG, tiny_sd_components

    p = tiny_sd_components(tmp_path_factory.mktemp("sd"))
    return DiffusersTeacher(p["unet"], dict(SD_SCHEDULER_CONFIG), text_encoder=p["text_encoder"],
                            tokenizer=p["tokenizer"], vae=p["vae"], guidance_scale=3.0)


@pytest.fixture()
def prompt_file(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(PROMPTS) + "\n")
    return f


CASES = {
    "dmd2": {"update_ratio": 1, "generator_timesteps": [899]},
    "vsd": {"critic": "lora", "lora_rank": 2, "generator_timesteps": [899]},
    "boot": {},
    "disback": {"base_params": {"update_ratio": 1, "generator_timesteps": [899]}, "recording_steps": 1,
                "num_nodes": 1},
    "msd": {"num_students": 2, "base_params": {"update_ratio": 1, "generator_timesteps": [899]}},
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_text_teacher_without_prompts_is_refused(name, sd_teacher):
    d = build(name, sd_teacher, CASES[name])
    with pytest.raises(ConfigError, match=r"train\.dataset=prompts:<file>"):
        d.build_source(TrainConfig(dataset=None))


@pytest.mark.parametrize("name", sorted(CASES))
def test_text_teacher_with_prompts_trains_conditionally(name, sd_teacher, prompt_file, monkeypatch, tmp_path):
    """With a prompt source every loss sees the prompts' encodings (never cond=None)."""
    params = dict(CASES[name], **({"nodes_dir": str(tmp_path / "nodes")} if name == "disback" else {}))
    d = build(name, sd_teacher, params)
    source = d.build_source(TrainConfig(dataset=f"prompts:{prompt_file}"))
    seen = []
    real = type(sd_teacher).denoise_raw

    def spy(self, x, sigma, cond):
        seen.append(cond is not None and cond.get("encoder_hidden_states") is not None)
        return real(self, x, sigma, cond)

    monkeypatch.setattr(type(sd_teacher), "denoise_raw", spy)
    for step in range(2):
        d.on_step_begin(step, True)
        cache = {}
        for g in d.phase(step):
            out = d.loss(source.batch(step, 0, 1, 2), step, g, cache)
            assert torch.isfinite(out.loss)
    assert seen and all(seen)


def test_shipped_prompt_file_by_name():
    from stepdistill.data.sources import PromptSource

    src = PromptSource("train_300.txt")
    assert len(src) == 300 and len(set(src.prompts)) == 300


# ---------------------------------------------------------------------------------------------
# MSD on prompts


def _msd(teacher, **extra):
    params = {"num_students": 2, "base_params": {"update_ratio": 1, "generator_timesteps": [899]}, **extra}
    return build("msd", teacher, params)


def test_msd_partitions_prompts_balanced_and_deterministic(sd_teacher, prompt_file):
    a, b = _msd(sd_teacher), _msd(sd_teacher, partition_prompts=str(prompt_file))
    a.build_source(TrainConfig(dataset=f"prompts:{prompt_file}"))
    assert a.text_route["assign"] == b.text_route["assign"]  # same prompts -> same partition
    sizes = [a.text_route["assign"].count(k) for k in range(2)]
    assert sizes == [4, 4]
    # every training prompt routes to its partition group (table); the centroid of its group is
    # also nearest for most of them (the balance may move a few)
    assert a.route_prompts(a.text_route["prompts"]) == a.text_route["assign"]
    # student k trains on its own prompts only
    for k in range(2):
        sb = a._slice_batch({"raw_cond": PROMPTS[:4], "real": None, "batch_size": 6}, k, 6)
        assert set(sb["raw_cond"]) <= set(a.prompt_groups[k])
    with pytest.raises(ValueError, match="kmeans"):
        _msd(sd_teacher, partition="contiguous")


FRESH = r"""
import json, sys
import numpy as np, torch
from diffusers import DiffusionPipeline
folder, prompts = sys.argv[1], json.loads(sys.argv[2])
pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
z = torch.from_numpy(np.load(sys.argv[3]))
img = pipe(prompts, latents=z, output_type="pt").images
np.save(sys.argv[4], img.numpy())
print("RESULT" + json.dumps({"class": type(pipe).__name__,
      "route": pipe.student_for_prompts(prompts + ["a yellow cow on a mat"]),
      "stepdistill": sorted(m for m in sys.modules if m.startswith("stepdistill"))}))
"""


def test_msd_text_export_routes_prompts_in_a_fresh_process(sd_teacher, prompt_file, tmp_path):
    import numpy as np

    d = _msd(sd_teacher)
    d.build_source(TrainConfig(dataset=f"prompts:{prompt_file}"))
    with torch.no_grad():  # make the students differ so that routing matters
        for k, s in enumerate(d.students):
            for p in s.generator.parameters():
                p.add_(0.05 * (k + 1) * torch.randn_like(p))
    out = d.export(tmp_path / "msd")
    asked = PROMPTS[:5]
    z = torch.randn(len(asked), *sd_teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "z.npy", z.numpy())
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", FRESH, str(out), json.dumps(asked), str(tmp_path / "z.npy"),
                           str(tmp_path / "img.npy")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))[6:])
    assert res["class"] == "TextMultiStudentPipeline" and res["stepdistill"] == []
    route = d.route_prompts(asked)
    assert res["route"][:5] == route and len(set(route)) == 2
    # the training-time students on the same noise
    gens = d.generator_for_export()
    want = torch.zeros(len(asked), *sd_teacher.sample_shape)
    with torch.no_grad():
        for i, p in enumerate(asked):
            g = gens[route[i]].eval()
            want[i] = g(z[i : i + 1], sd_teacher.encode_conditions([p]))[0]
        want = (sd_teacher.decode(want) / 2 + 0.5).clamp(0, 1)
    got = torch.from_numpy(np.load(tmp_path / "img.npy"))
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


# ---------------------------------------------------------------------------------------------
# conditioning through the wrappers, per text-encoder layout


def _wrappers(teacher):
    """(name, wrapped denoiser that must equal the teacher on its own weights)."""
    from stepdistill.algorithms.disback import NodeTarget
    from stepdistill.algorithms.dmd2 import DMD2
    from stepdistill.algorithms.vsd import add_lora
    from stepdistill.teachers.base import DelegatingTeacher

    out = [("delegating", DelegatingTeacher(teacher))]
    node = NodeTarget(teacher, teacher.trainable_copy())
    node.use_teacher = False  # the node network (a copy of the teacher's weights)
    out.append(("disback-node", node))
    out.append(("lora-critic-dmd2", DMD2._make_critic(teacher, {"rank": 2, "target_modules": ["to_q", "to_v"]})))
    out.append(("lora-critic-vsd", add_lora(teacher.trainable_copy(), 2, 2.0, ["to_q", "to_v"])))
    return out


def _layouts(tmp_path_factory):
    return ["sd", "sdxl", "sd3"]


@pytest.fixture(scope="module", params=["sd", "sdxl", "sd3"])
def layout_teacher(request, tmp_path_factory, sd_teacher):
    if request.param == "sd":
        return sd_teacher
    from stepdistill.teachers.diffusion import DiffusersTeacher

    tmp = tmp_path_factory.mktemp(request.param)
    if request.param == "sdxl":
        from diffusers import StableDiffusionXLPipeline
        from test_teachers_sdxl import sdxl_parts

        StableDiffusionXLPipeline(**sdxl_parts(tmp)).save_pretrained(tmp / "pipe")
    else:
        from diffusers import StableDiffusion3Pipeline
        from test_teachers_sd3_flux import sd3_parts

        StableDiffusion3Pipeline(**sd3_parts(tmp)).save_pretrained(tmp / "pipe")
    return DiffusersTeacher.from_pretrained(tmp / "pipe", guidance_scale=3.0)


def test_conditioning_survives_every_wrapper(layout_teacher):
    t = layout_teacher
    torch.manual_seed(0)
    x = torch.randn(2, *t.sample_shape)
    sigma = t.sigmas[torch.tensor([400, 700])]
    cond = t.encode_conditions(PROMPTS[:2])
    other = t.encode_conditions(PROMPTS[2:4])
    with torch.no_grad():
        want = t.denoise(x, sigma, cond, 3.0)
        assert not torch.allclose(want, t.denoise(x, sigma, other, 3.0), atol=1e-6)  # prompts matter
        for name, w in _wrappers(t):
            got = w.denoise(x, sigma, cond, 3.0)
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), name
            assert torch.allclose(w.denoise_raw(x, sigma, cond), t.denoise_raw(x, sigma, cond), atol=1e-5,
                                  rtol=1e-4), name


def test_vsd_condition_dropout_keeps_every_condition_piece(layout_teacher):
    """VSD's critic dropout replaces whole conditions by the full null (SDXL's added_cond_kwargs,
    SD3's pooled projections included) and keeps the rest."""
    from stepdistill.algorithms.vsd import _where_cond

    t = layout_teacher
    cond = t.encode_conditions(PROMPTS[:2])
    null = t.null_condition_like(cond, 2) if hasattr(t, "null_condition_like") else t.null_condition(2)
    mixed = _where_cond(torch.tensor([True, False]), null, cond)

    def flat(c, pre=""):
        for k, v in c.items():
            if isinstance(v, dict):
                yield from flat(v, pre + k + ".")
            elif isinstance(v, torch.Tensor):
                yield pre + k, v

    got, n, c = dict(flat(mixed)), dict(flat(null)), dict(flat(cond))
    assert set(got) == set(c)
    for k, v in got.items():
        assert torch.equal(v[1], c[k][1]) and torch.allclose(v[0], n[k][0]), k


def test_msd_students_see_their_prompts(layout_teacher, tmp_path):
    """MSD on each text layout: partition, one step of each phase, conditions non-null."""
    f = tmp_path / "p.txt"
    f.write_text("\n".join(PROMPTS))
    d = _msd(layout_teacher)
    src = d.build_source(TrainConfig(dataset=f"prompts:{f}"))
    assert sorted(len(g) for g in d.prompt_groups) == [4, 4]
    cache = {}
    for g in d.phase(0):
        out = d.loss(src.batch(0, 0, 1, 2), 0, g, cache)
        assert torch.isfinite(out.loss)
    assert cache["msd_cache0"]["cond"] is not None


def test_sample_grid_of_a_text_teacher_uses_the_run_prompts(sd_teacher, prompt_file):
    """The training-time grid of a text teacher shows the run's prompts (it drew null-prompt samples)."""
    d = build("dmd2", sd_teacher, CASES["dmd2"])
    d.build_source(TrainConfig(dataset=f"prompts:{prompt_file}"))
    assert d.grid_conditions(10) == [PROMPTS[i % len(PROMPTS)] for i in range(10)]
    img = d.sample_images(2, torch.Generator().manual_seed(0))
    assert img.shape[0] == 2 and torch.isfinite(img).all()


def test_msd_text_students_share_one_prompted_regression_set(sd_teacher, prompt_file):
    d = _msd(sd_teacher, base_params={"update_ratio": 1, "generator_timesteps": [899], "regression_steps": 1,
                                      "regression_pairs": 4, "regression_sampler_steps": 2})
    d.build_source(TrainConfig(dataset=f"prompts:{prompt_file}"))
    pairs = {id(s._regression) for s in d.students}
    assert len(pairs) == 1 and d.students[0]._regression.prompt_source is not None
    d.on_step_begin(0, True)
    cache = {}
    for g in d.phase(0):
        assert torch.isfinite(d.loss({"raw_cond": PROMPTS[:2], "real": None, "batch_size": 2}, 0, g, cache).loss)
    rows = d.students[0]._regression.rows(torch.arange(4), "cpu")
    assert set(rows[2]) <= set(PROMPTS)  # prompted pairs
