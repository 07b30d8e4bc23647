"""SDXL, SD3, FLUX.1 and DiT students -> stock diffusers pipelines that reproduce them.

For each family: tiny random components (built as in the teacher tests, nothing downloaded) ->
a few DMD2 steps with CFG on the real score through ``stepdistill.algorithms.build`` ->
``Distiller.export`` -> the stock pipeline is loaded in a fresh process that imports only
diffusers -> its output equals the training-time generator to 1e-5 for the same noise.

Noise: VP pipelines (SDXL) get the generator's ``z`` as ``latents`` and the generator's
``torch.Generator`` for LCM's re-noising; SD3 / FLUX / DiT call ``scheduler.step`` without a
generator, so the fresh process seeds torch's global RNG and the pipeline draws everything
(latents first, then each step's noise) -- the generator draws the same sequence.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers import (
    DDPMScheduler,
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
    Transformer2DModel,
)
from test_teachers_sd3_flux import flux_parts, sd3_parts  # noqa: I001
from test_teachers_sdxl import PROMPTS, sdxl_parts, tiny_vae

from stepdistill.algorithms import build
from stepdistill.export.class_conditional import dit_pipeline_problem
from stepdistill.export.common import lcm_original_steps, lcm_scheduler
from stepdistill.students import Generator
from stepdistill.teachers.diffusion import DiffusersTeacher

LABELS = [0, 3, 7, 9]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _train(teacher, params, batch, steps=2):
    """A few DMD2 steps by hand (loss, backward, AdamW per group), as the trainer runs them."""
    algo = build("dmd2", teacher, {"update_ratio": 1, **params})
    opts = {g: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
            for g, m in algo.trainable().items()}
    for step in range(steps):
        cache = {}
        for group in algo.phase(step):
            out = algo.loss(batch, step, group, cache)
            assert torch.isfinite(out.loss)
            out.loss.backward()
            opts[group].step()
            opts[group].zero_grad()
    return algo


def _dit(seed=0):
    torch.manual_seed(seed)
    return Transformer2DModel(
        norm_type="ada_norm_zero", num_embeds_ada_norm=10, patch_size=2, sample_size=8, in_channels=4,
        out_channels=8, num_layers=1, attention_head_dim=8, num_attention_heads=2,
    ).eval()


def _dit_teacher():
    return DiffusersTeacher(_dit(), dict(DDPMScheduler().config), num_classes=10, vae=tiny_vae(), guidance_scale=1.0)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """name -> (folder, pipeline class name, reference output, how the fresh process calls it)."""
    tmp = tmp_path_factory.mktemp("families")
    StableDiffusionXLPipeline(**sdxl_parts(tmp)).save_pretrained(tmp / "sdxl")
    StableDiffusion3Pipeline(**sd3_parts(tmp)).save_pretrained(tmp / "sd3")
    FluxPipeline(**flux_parts(tmp, True)).save_pretrained(tmp / "flux")
    teachers = {
        "sdxl": DiffusersTeacher.from_pretrained(tmp / "sdxl", guidance_scale=5.0),
        "sd3": DiffusersTeacher.from_pretrained(tmp / "sd3", guidance_scale=4.0),
        "flux": DiffusersTeacher.from_pretrained(tmp / "flux", sample_shape=(4, 8, 8), guidance_scale=3.5),
        "dit": _dit_teacher(),
    }
    plans = {
        "sdxl": ([399], [999, 749, 499, 249]),
        "sd3": ([999], [999, 749, 499, 249]),
        "flux": ([999], [999, 749, 499, 249]),
        "dit": ([749], [749, 499, 249]),
    }
    out = {}
    for family, plans_ in plans.items():
        teacher = teachers[family]
        for ts in plans_:
            name = f"{family}-{len(ts)}"
            if family == "dit":
                batch = {"raw_cond": torch.tensor(LABELS)}
                params = {"real_guidance_scale": 2.0}
            else:
                batch = {"raw_cond": PROMPTS}
                params = {} if family == "flux" else {"real_guidance_scale": 3.0}  # FLUX-dev: teacher's embedded 3.5
            algo = _train(teacher, {"generator_timesteps": ts, **params}, batch)
            gen = algo.generator_for_export().eval()
            folder = algo.export(tmp / name)
            meta = json.loads((folder / "stepdistill.json").read_text())
            cond = teacher.encode_conditions(batch["raw_cond"])
            n = len(batch["raw_cond"])
            with torch.no_grad():
                if family == "sdxl":  # latents given, LCM re-noises with the pipeline's generator
                    z = torch.randn((n, *teacher.sample_shape), generator=torch.Generator().manual_seed(7))
                    ref = gen(z, cond, generator=torch.Generator().manual_seed(5))
                else:  # the pipeline draws latents, then each step's noise, from the global RNG
                    torch.manual_seed(11)
                    z = torch.randn((n, *teacher.sample_shape))
                    ref = gen(z, cond)
                if family == "dit":  # DiTPipeline always decodes
                    ref = (teacher.decode(ref) / 2 + 0.5).clamp(0, 1)
            out[name] = dict(folder=str(folder), meta=meta, ref=ref, z=z, family=family)
    return out


def test_folders_are_stock_and_cards_carry_the_call(cases):
    expected = {"sdxl": ("StableDiffusionXLPipeline", "LCMScheduler"),
                "sd3": ("StableDiffusion3Pipeline", "FlowMatchEulerDiscreteScheduler"),
                "flux": ("FluxPipeline", "FlowMatchEulerDiscreteScheduler"),
                "dit": ("DiTPipeline", "LCMScheduler")}
    for name, case in cases.items():
        folder = case["folder"]
        index = json.loads(open(f"{folder}/model_index.json").read())
        pipe_cls, sched_cls = expected[case["family"]]
        assert index["_class_name"] == pipe_cls and index["scheduler"] == ["diffusers", sched_cls], name
        sched = json.loads(open(f"{folder}/scheduler/scheduler_config.json").read())
        meta = case["meta"]
        assert sched["_stepdistill_timesteps"] == meta["timesteps"]
        assert sched["_stepdistill_pipeline_call"] == meta["pipeline_call"]
        card = open(f"{folder}/README.md").read()
        assert f'{pipe_cls}.from_pretrained("{folder}")' in card
        if case["family"] in ("sd3", "flux"):
            assert sched["shift"] == 1.0 and sched["use_dynamic_shifting"] is False and sched["stochastic_sampling"]
            sigmas = meta["pipeline_call"]["sigmas"]
            assert sched["_stepdistill_sigmas"] == sigmas and f"sigmas={sigmas!r}" in card
            assert sigmas[0] == pytest.approx(0.9999, abs=1e-6)  # 1-step: from pure noise, the grid's clamped end
        if case["family"] == "sdxl":
            assert f"timesteps={meta['timesteps']!r}, guidance_scale=0.0" in card
    assert cases["flux-1"]["meta"]["pipeline_call"]["guidance_scale"] == 1.0
    assert cases["flux-1"]["meta"]["guidance_embeds"] is True
    assert "guidance-embedding input the student was trained with" in open(cases["flux-1"]["folder"] + "/README.md").read()
    # SDXL 4-step: LCM's standard schedule, so a plain num_inference_steps=4 call reproduces it
    assert "`num_inference_steps=4` alone" in open(cases["sdxl-4"]["folder"] + "/README.md").read()
    assert "harmless warning" in open(cases["sdxl-1"]["folder"] + "/README.md").read()
    assert "guidance_scale=1.0" in open(cases["dit-1"]["folder"] + "/README.md").read()


FRESH = textwrap.dedent(
    """
    import io, json, logging, sys
    import numpy as np
    import torch
    import diffusers

    torch.set_num_threads(1)
    log = io.StringIO()
    logging.getLogger("diffusers").addHandler(logging.StreamHandler(log))
    cases = json.loads(open(sys.argv[1]).read())
    prompts, labels = cases.pop("_prompts"), cases.pop("_labels")
    result = {}
    for name, case in cases.items():
        folder, family, call = case["folder"], case["family"], dict(case["call"])
        index = json.loads(open(folder + "/model_index.json").read())
        pipe = getattr(diffusers, index["_class_name"]).from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        if family == "sdxl":
            z = torch.from_numpy(np.load(case["z"]))
            out = pipe(prompts, latents=z, generator=torch.Generator().manual_seed(5), output_type="latent", **call).images
            plain = dict(call)
            plain.pop("timesteps")
            if case["plain"]:
                again = pipe(prompts, latents=z, generator=torch.Generator().manual_seed(5), output_type="latent",
                             **plain).images
                np.save(case["out"] + ".plain.npy", again.numpy())
        elif family == "dit":
            torch.manual_seed(11)
            out = pipe(class_labels=labels, output_type="pt", **call).images
        else:
            torch.manual_seed(11)
            out = pipe(prompts, output_type="latent", **call).images
        np.save(case["out"], out.float().numpy())
        result[name] = type(pipe).__module__
    result["stepdistill_imported"] = sorted(m for m in sys.modules if m.split(".")[0] == "stepdistill")
    result["log"] = log.getvalue()
    print("RESULT" + json.dumps(result))
    """
)


def _close(out, ref, tol=1e-5):
    out, ref = torch.as_tensor(out), torch.as_tensor(ref)
    assert out.shape == ref.shape
    err = float((out - ref).abs().max())
    assert err <= tol * max(1.0, float(ref.abs().max())), f"max abs err {err:.3g}"


def test_fresh_process_stock_pipelines_equal_the_generators(cases, tmp_path):
    import numpy as np

    spec = {"_prompts": PROMPTS, "_labels": LABELS}
    for name, case in cases.items():
        np.save(tmp_path / f"{name}.z.npy", case["z"].numpy())
        spec[name] = dict(folder=case["folder"], family=case["family"], call=case["meta"]["pipeline_call"],
                          z=str(tmp_path / f"{name}.z.npy"), out=str(tmp_path / f"{name}.npy"),
                          plain=name == "sdxl-4")
    (tmp_path / "cases.json").write_text(json.dumps(spec))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", DIFFUSERS_DISABLE_REMOTE_CODE="1")
    proc = subprocess.run([sys.executable, "-c", FRESH, str(tmp_path / "cases.json")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))[len("RESULT"):])
    assert result["stepdistill_imported"] == [] and "not expected" not in result["log"], result["log"]
    for name, case in cases.items():
        assert result[name].startswith("diffusers.pipelines"), name
        out = torch.from_numpy(np.load(tmp_path / f"{name}.npy"))
        if case["family"] == "flux":
            from stepdistill.teachers.flow_transformers import FluxTeacher

            out = FluxTeacher.unpack(out, 8, 8)  # FluxPipeline's latent output is packed
        _close(out, case["ref"])
    _close(np.load(tmp_path / "sdxl-4.npy.plain.npy"), cases["sdxl-4"]["ref"])  # plain num_inference_steps=4


def test_the_exported_network_is_the_student(cases):
    """The references differ from what the untrained teacher copy gives: export wrote the student."""
    teacher = DiffusersTeacher.from_pretrained(cases["sdxl-1"]["folder"].replace("sdxl-1", "sdxl"), guidance_scale=5.0)
    z = cases["sdxl-1"]["z"]
    with torch.no_grad():
        plain = Generator(teacher, [399])(z, teacher.encode_conditions(PROMPTS))
    assert (plain - cases["sdxl-1"]["ref"]).abs().max() > 1e-3


def test_lcm_schedules_a_plain_call_can_reach():
    sched = lcm_scheduler(dict(DDPMScheduler().config), "epsilon", [999])
    assert lcm_original_steps(sched, [999, 749, 499, 249]) == 1000
    assert lcm_original_steps(sched, [899]) == 900
    assert lcm_original_steps(sched, [749, 499, 249]) == 750
    assert lcm_original_steps(sched, [399]) is None  # below T/2: no LCM default schedule starts there
    assert lcm_scheduler(dict(DDPMScheduler().config), "epsilon", [899], search_default=True).config[
        "original_inference_steps"] == 900


def test_dit_students_the_stock_pipeline_cannot_run_are_refused_by_name(tmp_path):
    teacher = _dit_teacher()
    gen = Generator(teacher.trainable_copy(), [399])
    assert "no LCMScheduler original_inference_steps" in dit_pipeline_problem(gen, teacher)
    from stepdistill.export import export_generator

    with pytest.raises(NotImplementedError, match="cannot export this DiT student"):
        export_generator(gen, teacher, tmp_path / "x", algorithm="dmd2")
    pixel = DiffusersTeacher(_dit(), dict(DDPMScheduler().config), num_classes=10)
    assert "VAE" in dit_pipeline_problem(Generator(pixel.trainable_copy(), [749]), pixel)
    assert not (tmp_path / "x").exists()
