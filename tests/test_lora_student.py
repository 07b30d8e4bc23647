"""LoRA students (``algorithm.params.generator_lora``): peft adapters on the teacher's UNet /
transformer, for every score-distillation algorithm; exported as diffusers LoRA weights that
``pipe.load_lora_weights(folder)`` puts onto the stock teacher pipeline (and as a fused full
pipeline), both equal to the training-time generator in a fresh diffusers-only process; LoRA files
whose keys do not match a pipeline are refused in one line naming what was expected."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import (
    DDPMScheduler,
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from safetensors.torch import load_file, save_file
from test_teachers_sd3_flux import flux_parts, sd3_parts  # noqa: I001
from test_teachers_sdxl import PROMPTS, sdxl_parts

from stepdistill.algorithms import build
from stepdistill.config import ConfigError
from stepdistill.export import (
    ExportError,
    check_lora_keys,
    export_generator,
    fuse_lora_into_pipeline,
    load_lora,
)
from stepdistill.teachers.diffusion import DiffusersTeacher
from stepdistill.testing import tiny_sd_pipeline_folder, tiny_unet2d

LORA = {"rank": 4, "alpha": 8}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return tiny_sd_pipeline_folder(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def sd_teacher(sd_dir):
    return DiffusersTeacher.from_pretrained(sd_dir)


def _generator_groups(algo):
    return {g: m for g, m in algo.trainable().items() if g.split(".")[-1] == "generator"}


@pytest.mark.parametrize("name, params", [
    ("dmd2", {"generator_timesteps": [899], "real_guidance_scale": 3.0}),  # CFG: real != fake at the start
    ("vsd", {"generator_timesteps": [899], "critic": "full", "guidance_scale": 3.0, "critic_guidance_scale": 1.0}),
    ("boot", {}),
    ("disback", {"base": "dmd2", "base_params": {"generator_timesteps": [899]}, "recording_steps": 2, "num_nodes": 1}),
])
def test_every_algorithm_trains_only_the_adapter(name, params, sd_teacher, tmp_path):
    params = json.loads(json.dumps(params))
    target = params["base_params"] if name == "disback" else params
    target["generator_lora"] = dict(LORA)
    if name == "disback":
        params["nodes_dir"] = str(tmp_path / "nodes")
    algo = build(name, sd_teacher, params)
    (gen_group,) = _generator_groups(algo).values()
    trainable = [n for n, p in gen_group.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    net = (algo.base if name == "disback" else algo).generator.denoiser.model
    # the frozen base weights are the teacher's own tensors: the student costs only its adapter
    assert net.conv_in.weight is sd_teacher.model.conv_in.weight
    assert not any(p.requires_grad for p in sd_teacher.model.parameters())
    if name in ("dmd2", "vsd", "boot"):
        batch = {"raw_cond": PROMPTS}
        out = algo.loss(batch, 0, "generator", {})
        out.loss.backward()
        grads = {n: p.grad for n, p in gen_group.named_parameters() if p.grad is not None}
        assert grads and all("lora_" in n for n in grads) and any(float(g.abs().sum()) > 0 for g in grads.values())


def test_msd_students_are_loras_too(tmp_path):
    teacher = DiffusersTeacher(tiny_unet2d(num_classes=10), DDPMScheduler(beta_schedule="squaredcos_cap_v2").config,
                               num_classes=10, prediction_type="v_prediction")
    lora = {"rank": 2, "target_modules": ["conv1", "conv2"]}
    algo = build("msd", teacher, {"num_students": 2, "base_params": {"generator_lora": lora}})
    groups = _generator_groups(algo)
    assert sorted(groups) == ["s0.generator", "s1.generator"]
    for m in groups.values():
        names = [n for n, p in m.named_parameters() if p.requires_grad]
        assert names and all("lora_" in n for n in names)


def test_bad_lora_options_are_named(sd_teacher):
    with pytest.raises(ConfigError, match=r"generator_lora\.rnk.*did you mean.*rank"):
        build("dmd2", sd_teacher, {"generator_timesteps": [899], "generator_lora": {"rnk": 4}})
    with pytest.raises(ValueError, match=r"target_modules \['nope'\] match no layer of UNet2DConditionModel.*to_q"):
        build("dmd2", sd_teacher, {"generator_timesteps": [899], "generator_lora": {"target_modules": ["nope"]}})


def _train(teacher, ts, steps=2, lr=1e-2, lora=LORA, name="dmd2"):
    algo = build(name, teacher, {"generator_timesteps": ts, "update_ratio": 1, "generator_lora": dict(lora)})
    opts = {g: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr)
            for g, m in algo.trainable().items()}
    for step in range(steps):
        cache = {}
        for group in algo.phase(step):
            out = algo.loss({"raw_cond": PROMPTS}, step, group, cache)
            out.loss.backward()
            opts[group].step()
            opts[group].zero_grad()
    return algo


@pytest.fixture(scope="module")
def exported(sd_dir, sd_teacher, tmp_path_factory):
    """LoRA students of SD (1 step), SDXL (4 steps), SD3 (2 steps) and FLUX-dev (2 steps), exported by
    Distiller.export."""
    tmp = tmp_path_factory.mktemp("lora")
    StableDiffusionXLPipeline(**sdxl_parts(tmp)).save_pretrained(tmp / "sdxl")
    FluxPipeline(**flux_parts(tmp, True)).save_pretrained(tmp / "flux")
    StableDiffusion3Pipeline(**sd3_parts(tmp)).save_pretrained(tmp / "sd3")
    plans = {
        "sd": (sd_dir, sd_teacher, [899], "StableDiffusionPipeline", "LCMScheduler"),
        "sdxl": (tmp / "sdxl", DiffusersTeacher.from_pretrained(tmp / "sdxl", guidance_scale=5.0),
                 [999, 749, 499, 249], "StableDiffusionXLPipeline", "LCMScheduler"),
        "sd3": (tmp / "sd3", DiffusersTeacher.from_pretrained(tmp / "sd3"), [999, 499], "StableDiffusion3Pipeline",
                "FlowMatchEulerDiscreteScheduler"),
        "flux": (tmp / "flux", DiffusersTeacher.from_pretrained(tmp / "flux", sample_shape=(4, 8, 8)),
                 [999, 499], "FluxPipeline", "FlowMatchEulerDiscreteScheduler"),
    }
    out = {}
    for fam, (teacher_dir, teacher, ts, pipe_cls, sched_cls) in plans.items():
        algo = _train(teacher, ts)
        gen = algo.generator_for_export().eval()
        folder = algo.export(tmp / f"{fam}-student")
        meta = json.loads((folder / "stepdistill.json").read_text())
        cond = teacher.encode_conditions(PROMPTS)
        with torch.no_grad():
            if fam in ("sd3", "flux"):  # latents and re-noising from the global RNG (the stock pipelines' draw)
                torch.manual_seed(11)
                z = torch.randn((2, *teacher.sample_shape))
                ref = gen(z, cond)
            else:
                z = torch.randn((2, *teacher.sample_shape), generator=torch.Generator().manual_seed(7))
                ref = gen(z, cond, generator=torch.Generator().manual_seed(5))
        out[fam] = dict(teacher_dir=str(teacher_dir), teacher=teacher, folder=folder, meta=meta, z=z, ref=ref,
                        pipe=pipe_cls, sched=sched_cls, algo=algo)
    return out


def test_lora_folder_layout_and_card(exported):
    for fam, case in exported.items():
        folder, meta = case["folder"], case["meta"]
        assert (folder / "pytorch_lora_weights.safetensors").exists() and (folder / "model_index.json").exists()
        state = load_file(folder / "pytorch_lora_weights.safetensors")
        prefix = "unet." if fam in ("sd", "sdxl") else "transformer."
        assert state and all(k.startswith(prefix) and "lora" in k for k in state)
        assert meta["lora"]["r"] == 4 and meta["lora"]["lora_alpha"] == 8.0
        assert meta["export_kind"] == "pipeline+lora"
        card = (folder / "README.md").read_text()
        assert f'pipe = {case["pipe"]}.from_pretrained("{case["teacher_dir"]}")' in card
        assert f'pipe.scheduler = {case["sched"]}.from_pretrained("{folder}", subfolder="scheduler")' in card
        assert f'pipe.load_lora_weights("{folder}")' in card
        assert f'pipe = {case["pipe"]}.from_pretrained("{folder}")' in card  # the fused full pipeline


FRESH = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import torch
    import diffusers

    torch.set_num_threads(1)
    cases = json.loads(open(sys.argv[1]).read())
    prompts = cases.pop("_prompts")
    for name, case in cases.items():
        pipe_cls, sched_cls = getattr(diffusers, case["pipe"]), getattr(diffusers, case["sched"])
        for how in ("lora", "fused"):
            if how == "lora":
                pipe = pipe_cls.from_pretrained(case["teacher_dir"])
                pipe.scheduler = sched_cls.from_pretrained(case["folder"], subfolder="scheduler")
                pipe.load_lora_weights(case["folder"])
            else:
                pipe = pipe_cls.from_pretrained(case["folder"])
            pipe.set_progress_bar_config(disable=True)
            if name in ("sd3", "flux"):
                torch.manual_seed(11)
                out = pipe(prompts, output_type="latent", **case["call"]).images
            else:
                z = torch.from_numpy(np.load(case["z"]))
                out = pipe(prompts, latents=z, generator=torch.Generator().manual_seed(5), output_type="latent",
                           **case["call"]).images
            np.save(case["out"] + f".{how}.npy", out.float().numpy())
    print("RESULT" + json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "stepdistill")))
    """
)


def _close(out, ref, tol=1e-5):
    out, ref = torch.as_tensor(out), torch.as_tensor(ref)
    assert out.shape == ref.shape
    err = float((out - ref).abs().max())
    assert err <= tol * max(1.0, float(ref.abs().max())), f"max abs err {err:.3g}"


def test_lora_on_the_stock_teacher_pipeline_equals_the_student(exported, tmp_path):
    spec = {"_prompts": PROMPTS}
    for fam, case in exported.items():
        np.save(tmp_path / f"{fam}.z.npy", case["z"].numpy())
        spec[fam] = dict(pipe=case["pipe"], sched=case["sched"], teacher_dir=case["teacher_dir"],
                         folder=str(case["folder"]), call=case["meta"]["pipeline_call"],
                         z=str(tmp_path / f"{fam}.z.npy"), out=str(tmp_path / fam))
    (tmp_path / "cases.json").write_text(json.dumps(spec))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", DIFFUSERS_DISABLE_REMOTE_CODE="1")
    proc = subprocess.run([sys.executable, "-c", FRESH, str(tmp_path / "cases.json")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    assert json.loads(line[len("RESULT"):]) == []
    for fam, case in exported.items():
        for how in ("lora", "fused"):
            out = torch.from_numpy(np.load(tmp_path / f"{fam}.{how}.npy"))
            if fam == "flux":
                out = case["teacher"].unpack(out, 8, 8)
            _close(out, case["ref"])
        # the adapter moved the student away from the teacher: a plain teacher would not pass
        with torch.no_grad():
            net = case["algo"].generator.denoiser.model
            net.disable_adapters()
            try:
                kw = {} if fam in ("sd3", "flux") else {"generator": torch.Generator().manual_seed(5)}
                if fam in ("sd3", "flux"):
                    torch.manual_seed(11)
                    torch.randn((2, *case["teacher"].sample_shape))
                plain = case["algo"].generator(case["z"], case["teacher"].encode_conditions(PROMPTS), **kw)
            finally:
                net.enable_adapters()
        assert (plain - case["ref"]).abs().max() > 1e-4, fam


def test_adapter_only_export_and_ema(exported, tmp_path):
    case = exported["sd"]
    gen = case["algo"].generator_for_export()
    ema = {k: v.clone() for k, v in gen.state_dict().items()}
    key = next(k for k in ema if "lora_B" in k)
    ema[key] += 0.5
    out = export_generator(gen, case["teacher"], tmp_path / "adapter", algorithm="dmd2", lora="adapter",
                           use_ema_state=ema)
    assert sorted(p.name for p in out.iterdir()) == [".stepdistill-export", "README.md",
                                                     "pytorch_lora_weights.safetensors", "scheduler", "stepdistill.json"]
    state = load_file(out / "pytorch_lora_weights.safetensors")
    module = key.split("denoiser.model.")[1].split(".lora_B")[0]
    (up,) = [v for k, v in state.items() if module in k and ("lora_B" in k or "lora.up" in k)]
    assert torch.allclose(up, ema[key])
    card = (out / "README.md").read_text()
    assert "from_pretrained(\"" + str(out) + "\")\n" not in card and "load_lora_weights" in card
    fused = export_generator(gen, case["teacher"], tmp_path / "fused", algorithm="dmd2", lora="fused")
    assert not (fused / "pytorch_lora_weights.safetensors").exists() and (fused / "model_index.json").exists()
    # a full student has no adapter to write
    full = build("dmd2", case["teacher"], {"generator_timesteps": [899]})
    with pytest.raises(ValueError, match="needs a LoRA student"):
        export_generator(full.generator, case["teacher"], tmp_path / "none", algorithm="dmd2", lora="adapter")


def test_mismatched_lora_keys_give_one_line_naming_what_was_expected(exported, sd_dir, tmp_path):
    sd = exported["sd"]["folder"]
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir)
    assert check_lora_keys(pipe, sd)  # its own LoRA matches
    state = load_file(sd / "pytorch_lora_weights.safetensors")
    renamed = {k.replace("attn1", "attn9"): v for k, v in state.items()}
    (tmp_path / "bad").mkdir()
    save_file(renamed, str(tmp_path / "bad" / "pytorch_lora_weights.safetensors"))
    with pytest.raises(ExportError) as err:
        load_lora(pipe, tmp_path / "bad")
    msg = str(err.value)
    assert "\n" not in msg and "do not exist in its UNet2DConditionModel" in msg and "attn9" in msg
    assert "expected 'unet.<layer>.lora_A.weight'" in msg
    # an SD LoRA on a FLUX pipeline: wrong component prefix
    flux = FluxPipeline.from_pretrained(exported["flux"]["teacher_dir"])
    with pytest.raises(ExportError, match=r"lack the 'transformer\.' prefix.*expected 'transformer\.<layer>"):
        check_lora_keys(flux, sd)
    with pytest.raises(ExportError, match="no LoRA weights file"):
        check_lora_keys(pipe, tmp_path)


def test_a_teacher_with_a_users_lora_is_fused_then_distilled(sd_dir, tmp_path):
    """docs/lora.md: fuse the user's LoRA into the teacher, then distil that folder."""
    import peft
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(sd_dir)
    torch.manual_seed(3)
    pipe.unet.add_adapter(peft.LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "user", unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                              safe_serialization=True)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    hidden = torch.randn(1, 16, 32)
    with torch.no_grad():
        with_lora = pipe.unet(x, t, hidden).sample
    fused_dir = fuse_lora_into_pipeline(sd_dir, tmp_path / "user", tmp_path / "fused-teacher")
    teacher = DiffusersTeacher.from_pretrained(fused_dir)
    assert not any("lora" in k for k in teacher.model.state_dict())
    with torch.no_grad():
        assert torch.allclose(teacher.model(x, t, hidden).sample, with_lora, atol=1e-5)
    algo = _train(teacher, [899], steps=1)
    out = algo.export(tmp_path / "few-step-lora")
    assert (out / "pytorch_lora_weights.safetensors").exists()
    assert f'from_pretrained("{fused_dir}")' in (out / "README.md").read_text()


def test_dit_lora_students_are_exported_fused(tmp_path):
    """DiTPipeline has no LoRA loader: the adapter is folded into a stock DiTPipeline folder."""
    from diffusers import DiTPipeline
    from test_export_sdxl_flow import LABELS, _dit_teacher

    teacher = _dit_teacher()
    algo = build("dmd2", teacher, {"generator_timesteps": [749], "real_guidance_scale": 2.0, "update_ratio": 1,
                                   "generator_lora": {"rank": 2}})
    labels = torch.tensor(LABELS)
    opt = torch.optim.AdamW([p for p in algo.generator.parameters() if p.requires_grad], lr=1e-2)
    algo.loss({"raw_cond": labels}, 0, "generator", {}).loss.backward()
    opt.step()
    with pytest.raises(ValueError, match="no LoRA loader"):
        export_generator(algo.generator, teacher, tmp_path / "a", algorithm="dmd2", lora="adapter")
    out = algo.export(tmp_path / "dit")
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    pipe = DiTPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert not any("lora" in k for k in pipe.transformer.state_dict())
    torch.manual_seed(11)
    z = torch.randn((4, *teacher.sample_shape))
    with torch.no_grad():
        ref = (teacher.decode(algo.generator(z, teacher.encode_conditions(labels))) / 2 + 0.5).clamp(0, 1)
        torch.manual_seed(11)
        _close(pipe(class_labels=LABELS, guidance_scale=1.0, num_inference_steps=1, output_type="pt").images, ref)


def test_trainer_checkpoints_resumes_and_exports_a_lora_student(sd_teacher, tmp_path):
    """train() with EMA and checkpoints: the shared base weights save and load like any group."""
    from stepdistill.config import TrainConfig
    from stepdistill.training.loop import train

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red seven\na blue two\n")  # a text teacher trains on prompts (no prompts is refused)

    def run(steps):
        algo = build("dmd2", sd_teacher, {"generator_timesteps": [899], "real_guidance_scale": 3.0,
                                          "update_ratio": 1, "generator_lora": dict(LORA)})
        cfg = TrainConfig(output_dir=str(tmp_path / "run"), dataset=f"prompts:{prompts}", max_steps=steps,
                          batch_size=2, checkpoint_every_steps=2,
                          ema_decay=0.9, report_to=None, progress=False, sample_every_steps=0, log_every_steps=1)
        return algo, train(algo, algo.build_source(cfg), cfg)

    run(2)
    algo, result = run(4)
    assert result["resumed_from"] and result["step"] == 4
    net = algo.generator.denoiser.model
    assert net.conv_in.weight is sd_teacher.model.conv_in.weight  # still shared after the resume
    ema = result["ema"]
    assert any("lora_B" in k for k in ema)
    out = algo.export(tmp_path / "pipe", ema_state=ema)
    state = load_file(out / "pytorch_lora_weights.safetensors")
    assert state and json.loads((out / "stepdistill.json").read_text())["ema"] is True


def test_presets_take_generator_lora_as_overrides():
    """The keys docs/lora.md uses, through the preset loader and each algorithm's Config."""
    from stepdistill.algorithms import REGISTRY
    from stepdistill.config import from_dict, load_config

    cfg = load_config("sdxl/dmd2_4step", ["algorithm.params.generator_lora.rank=64",
                                          "algorithm.params.generator_lora.alpha=32"])
    assert cfg.algorithm.params["generator_lora"] == {"rank": 64, "alpha": 32}
    c = from_dict(REGISTRY["dmd2"].Config, cfg.algorithm.params, prefix="algorithm.params.")
    assert c.generator_lora == {"rank": 64, "alpha": 32}
    cfg = load_config("sdxl/disback_dmd2", ["algorithm.params.base_params.generator_lora.rank=8"])
    assert cfg.algorithm.params["base_params"]["generator_lora"] == {"rank": 8}
