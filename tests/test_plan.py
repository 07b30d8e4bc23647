"""``stepdistill plan``: counts, levers, verdicts, the CLI and the paper presets' plans (no weights loaded)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from stepdistill.plan import format_plan, measure_activations, parse_memory, plan_config, teacher_arch

DMD2 = {"generator_timesteps": [899], "update_ratio": 1}


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    from stepdistill.testing import tiny_sd_pipeline_folder

    return tiny_sd_pipeline_folder(tmp_path_factory.mktemp("plan"))


def _cfg(folder, algo="dmd2", params=None, train=None, teacher=None):
    return {"teacher": {"kind": "diffusers", "path": str(folder), "guidance_scale": 3.0, **(teacher or {})},
            "algorithm": {"name": algo, "params": dict(DMD2 if algo == "dmd2" else {}, **(params or {}))},
            "train": {"batch_size": 4, **(train or {})}}


def _real_saved_bytes(model, forward) -> int:
    """Bytes autograd saves in ``forward()`` (a real CPU pass of ``model``, parameters excluded),
    plus the loss's output-sized float32 tensor the plan also counts."""
    params = {p.data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        b = t._base if t._base is not None else t
        if b.data_ptr() not in params:
            saved[b.data_ptr()] = b.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return sum(saved.values()) + out.numel() * 4


def _row(plan, prefix):
    return next(r for r in plan.rows if r.name.startswith(prefix))


def _trainable(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# -- units ------------------------------------------------------------------------------------


def test_memory_units():
    assert parse_memory("80GB") == 80 * 10**9
    assert parse_memory("24GiB") == 24 * 2**30
    assert parse_memory("512 MiB") == 512 * 2**20
    assert parse_memory("1.5TB") == 1.5e12
    from stepdistill.errors import InputError

    for bad in ("80", "80XB", "-1GB", "abc", "0GB", ""):
        with pytest.raises(InputError, match="--gpu-memory"):
            parse_memory(bad)


# -- counts are the real modules' ---------------------------------------------------------------


@pytest.mark.parametrize("algo,params", [
    ("dmd2", {}),
    ("dmd2", {"gan_weight_g": 0.01, "critic_lora": {"rank": 4}}),
    ("dmd2", {"generator_lora": {"rank": 4}}),
    ("vsd", {"generator_timesteps": [899], "lora_rank": 4}),
    ("boot", {}),
])
def test_group_counts_equal_the_built_distiller(sd_folder, algo, params):
    from stepdistill.algorithms import build
    from stepdistill.teachers.diffusion import DiffusersTeacher

    cfg = _cfg(sd_folder, algo, params)
    plan = plan_config(cfg, gpu_memory="1TB", suggest=False)
    teacher = DiffusersTeacher.from_pretrained(str(sd_folder), guidance_scale=3.0)
    d = build(algo, teacher, cfg["algorithm"]["params"])
    for name, module in d.trainable().items():
        assert _row(plan, f"{name} (trainable").params == _trainable(module), name
    assert _row(plan, "teacher unet").params == sum(p.numel() for p in teacher.model.parameters())
    assert _row(plan, "teacher text_encoder").params == sum(p.numel() for p in teacher.text_encoder.parameters())
    assert _row(plan, "teacher vae").params == sum(p.numel() for p in teacher.vae.parameters())
    g = _row(plan, "generator (trainable")
    n = g.params
    assert g.optimizer == 8 * n  # AdamW: two float32 moments
    if algo == "dmd2" and "generator_lora" in params:  # float32 teacher: the adapter's base is the teacher's
        assert g.weights == 4 * n


def test_recorded_architectures_have_the_published_sizes():
    from stepdistill.architectures import PARAMETER_COUNTS
    from stepdistill.config import TeacherConfig

    for name, count in PARAMETER_COUNTS.items():
        arch = teacher_arch(TeacherConfig(path=name))
        assert sum(p.numel() for p in arch.denoiser.parameters()) == count, name
        assert all(p.device.type == "meta" for p in arch.denoiser.parameters())


def test_activation_estimate_matches_the_saved_tensors_of_a_real_forward(sd_folder):
    """The meta-device count equals what autograd saves in a real CPU forward of the same network."""
    from stepdistill.config import TeacherConfig
    from stepdistill.teachers.diffusion import DiffusersTeacher

    arch = teacher_arch(TeacherConfig(path=str(sd_folder)))
    est = measure_activations(arch, copy.deepcopy(arch.denoiser).requires_grad_(True), 4).saved
    model = DiffusersTeacher.from_pretrained(str(sd_folder)).model
    model = copy.deepcopy(model).requires_grad_(True)
    seq = arch.text_seq_len
    real = _real_saved_bytes(model, lambda: model(torch.randn(4, *arch.sample_shape), torch.full((4,), 500.0),
                             encoder_hidden_states=torch.randn(4, seq, model.config.cross_attention_dim)).sample)
    assert abs(est - real) / real < 0.05, (est, real)


# -- levers move the estimate the right way -----------------------------------------------------


def test_levers_reduce_the_estimate(sd_folder):
    base = plan_config(_cfg(sd_folder, params={"gan_weight_g": 0.01}), gpu_memory="1TB", suggest=False)

    def act(plan):
        return max(p["activations"] for p in plan.phase_peaks.values())

    ck = plan_config(_cfg(sd_folder, params={"gan_weight_g": 0.01, "gradient_checkpointing": ["generator", "critic"]}),
                     gpu_memory="1TB", suggest=False)
    assert act(ck) < act(base)
    lora = plan_config(_cfg(sd_folder, params={"gan_weight_g": 0.01, "critic_lora": {"rank": 4}}), gpu_memory="1TB",
                       suggest=False)
    assert _row(lora, "critic (trainable").total < _row(base, "critic (trainable").total
    bf16 = plan_config(_cfg(sd_folder, params={"gan_weight_g": 0.01}, teacher={"dtype": "bfloat16"}),
                       gpu_memory="1TB", suggest=False)
    assert _row(bf16, "teacher unet").weights == _row(base, "teacher unet").weights / 2
    off = plan_config(_cfg(sd_folder, params={"gan_weight_g": 0.01}, teacher={"params": {"offload_frozen": True}}),
                      gpu_memory="1TB", suggest=False)
    assert off.host_bytes > 0 and off.total < base.total
    old = plan_config(_cfg(sd_folder, params={"gan_weight_g": 0.01, "no_grad_outside_phase": False,
                                              "gan_stop_at_bottleneck": False}), gpu_memory="1TB", suggest=False)
    assert old.phase_peaks["generator"]["gradients"] > base.phase_peaks["generator"]["gradients"]
    assert old.phase_peaks["generator"]["activations"] > base.phase_peaks["generator"]["activations"]
    # FSDP2 over 2 GPUs: each full group's weights and moments are halved; the teacher stays replicated
    fsdp = plan_config(_cfg(sd_folder, params={"gan_weight_g": 0.01}, train={"sharding": "fsdp2"}), gpus=2,
                       gpu_memory="1TB", suggest=False)
    for g in ("generator", "critic"):
        assert _row(fsdp, f"{g} (trainable").weights == _row(base, f"{g} (trainable").weights / 2
        assert _row(fsdp, f"{g} (trainable").optimizer == _row(base, f"{g} (trainable").optimizer / 2
    assert _row(fsdp, "teacher unet").weights == _row(base, "teacher unet").weights
    # a LoRA critic holds the teacher's tensors: FSDP2 leaves it replicated
    lf = plan_config(_cfg(sd_folder, params={"critic_lora": {"rank": 4}}, train={"sharding": "fsdp2"}), gpus=2,
                     gpu_memory="1TB", suggest=False)
    assert not _row(lf, "critic (trainable").sharded and _row(lf, "generator (trainable").sharded
    ema = plan_config(_cfg(sd_folder, train={"ema_decay": 0.99}), gpu_memory="1TB", suggest=False)
    assert _row(ema, "generator (trainable").ema == 4 * _row(ema, "generator (trainable").params


def test_verdict_and_the_next_lever(sd_folder):
    roomy = plan_config(_cfg(sd_folder, params={"gan_weight_g": 0.01}), gpu_memory="1TB")
    assert roomy.fits and not roomy.path_to_fit
    savings = [lv["saving"] for lv in roomy.levers]
    assert savings == sorted(savings, reverse=True) and savings
    need = roomy.total
    tight = plan_config(_cfg(sd_folder, params={"gan_weight_g": 0.01}), gpu_memory=int(need * 0.95 / 0.9))
    assert not tight.fits
    assert tight.path_to_fit and tight.path_to_fit[-1]["fits_after"]
    assert tight.path_to_fit[0]["lever"] == tight.levers[0]["lever"]  # the largest saving first
    text = format_plan(tight)
    assert "does NOT fit" in text and "to fit, turn on" in text


# -- command line -------------------------------------------------------------------------------


def test_cli(sd_folder, tmp_path, capsys):
    import yaml

    from stepdistill.cli import main

    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump(_cfg(sd_folder)))
    assert main(["plan", str(f), "--gpus", "2", "--gpu-memory", "24GiB", "train.batch_size=2"]) == 0
    out = capsys.readouterr().out
    assert "total per GPU" in out and "fits" in out
    assert main(["plan", str(f), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] is True and data["gpus"] == 1 and data["rows"]
    assert main(["plan", str(f), "--gpu-memory", "lots"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --gpu-memory")
    assert main(["plan", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    assert main(["plan", str(f), "teacher.path=org/not-recorded"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "downloads nothing" in err[0]


# -- paper presets plan from configs alone ------------------------------------------------------

PAPER_PRESETS = ["sd15/dmd2", "sd21/vsd", "sdxl/dmd2_1step", "sdxl/dmd2_4step", "sdxl/disback_dmd2", "sd3/dmd2",
                 "imagenet/msd_dit", "llamagen/dd", "var/dd", "flux/dmd2_lora"]


@pytest.fixture
def no_weights(monkeypatch):
    """Any weight load fails the test."""
    import safetensors.torch
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    def refuse(*a, **k):
        raise AssertionError("plan loaded weights")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(ModelMixin, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_paper_presets_plan_without_weights(preset, no_weights):
    from stepdistill.config import list_presets

    if preset not in list_presets():
        pytest.skip(f"{preset} is not bundled")
    plan = plan_config(preset, gpus=8, gpu_memory="80GB", suggest=False)
    assert plan.total > 1e9 and plan.teacher.startswith("recorded architecture")


def test_paper_preset_headers_carry_their_recorded_plan():
    """Each paper preset's header comment holds the summary benchmarks/preset_plans.py recorded."""
    from pathlib import Path

    from stepdistill.config import preset_path

    results = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "preset_plans.json"
    rows = json.loads(results.read_text())
    assert rows
    for row in rows:
        text = preset_path(row["preset"]).read_text()
        assert f"# {row['summary']}" in text, row["preset"]
        assert row["fits"], f"{row['preset']} does not fit its stated hardware: {row['summary']}"
        from stepdistill.config import load_config

        load_config(row["preset"])  # still loads


# -- VAR teachers (self-contained var_model classes) ----------------------------------------------


def test_var_folder_plans_dd_and_the_estimate_matches_a_real_forward(tmp_path):
    """A converted VAR folder is read from its configs; the DD student's size equals the real
    ``VARDDStudent.from_teacher``'s, the VQVAE is counted in float32 (f-hat sums) and the activation
    estimate is within 5% of what autograd saves in a real CPU forward of the student."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_var import PNS, official_vae_state, official_var_state

    from stepdistill.config import TeacherConfig, load_config
    from stepdistill.plan import _var_dd_recipe
    from stepdistill.teachers.convert_var import convert_var
    from stepdistill.teachers.var import VARDDGenerator

    teacher = convert_var(official_vae_state(), official_var_state(), patch_nums=PNS)
    folder = teacher.save_pretrained(tmp_path / "var")
    arch = teacher_arch(TeacherConfig(kind="ar", path=str(folder)))
    assert arch.kind == "ar" and arch.extra["var"] and arch.sample_shape == (teacher.num_tokens,)
    assert all(p.device.type == "meta" for p in arch.denoiser.parameters())
    recipe = _var_dd_recipe(arch, {"split_points": [0, 2], "split_t": 1})
    student = VARDDGenerator.from_teacher(teacher, [0, 2], split_t=1).transformer.requires_grad_(True)
    assert recipe.groups[0].trainable == sum(p.numel() for p in student.parameters())
    est = measure_activations(arch, recipe.phases[0].forwards[0].net, 4).saved
    n = student.L
    real = _real_saved_bytes(student, lambda: student.predict(torch.randn(4, n, student.Cvae),
                             torch.zeros(4, dtype=torch.long), torch.zeros(4, n, dtype=torch.bool))[0])
    assert abs(est - real) / real < 0.05, (est, real)
    from stepdistill.config import ConfigError

    over = [f"teacher.path={folder}", "teacher.dtype=bfloat16", "train.batch_size=4"]
    with pytest.raises(ConfigError, match="split_points"):  # the preset's [0, 5] on a 3-scale teacher
        plan_config(load_config("var/dd", over), gpus=1, gpu_memory="1TB", suggest=False)
    cfg = load_config("var/dd", [*over, "algorithm.params.split_points=[0,2]", "algorithm.params.split_t=1"])
    plan = plan_config(cfg, gpus=1, gpu_memory="1TB", suggest=False)
    vq = _row(plan, "teacher vqvae")
    assert "float32" in vq.name and vq.weights == 4 * sum(p.numel() for p in teacher.vqvae.parameters())
