"""The embedded text-to-image teacher (stepdistill.teachers.text_to_image, stepdistill.t2i_teacher) at
tiny sizes: stock classes only, a trained folder that plain diffusers loads in a fresh process and
samples with two stock schedulers, the package's DiffusersTeacher loads it, the tokenizer (word-level
inside CLIP's BPE: round trip, unseen words, over-long prompts), cache keying and exact resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from stepdistill import t2i_teacher as trainer
from stepdistill.config import load_config
from stepdistill.data.colored_mnist import caption, vocabulary
from stepdistill.teachers import text_to_image as t2i

TINY = [
    "teacher.params.data.variants=1",
    "teacher.params.vae.steps=6",
    "teacher.params.vae.block_out_channels=[8,8,8]",
    "teacher.params.vae.norm_num_groups=4",
    "teacher.params.text.steps=6",
    "teacher.params.text.batch_size=32",
    "teacher.params.text.hidden_size=32",
    "teacher.params.text.intermediate_size=64",
    "teacher.params.text.image_channels=[8,8,8]",
    "teacher.params.text.projection_dim=16",
    "teacher.params.unet.steps=6",
    "teacher.params.unet.batch_size=16",
    "teacher.params.unet.block_out_channels=[16,32]",
    "teacher.params.unet.norm_num_groups=8",
    "teacher.params.unet.eval_every_steps=0",
    "teacher.params.checkpoint_every_steps=3",
    "train.progress=false",
]
PROMPT = caption(7, 0, 2)  # "a red seven on a blue background"


@pytest.fixture(scope="module")
def tiny_teacher():
    return trainer.ensure_t2i_teacher("t2i", TINY, quiet=True, progress=False)


def test_builders_make_stock_classes(tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    spec = t2i.spec_from_params(load_config("t2i", TINY).teacher.params)
    tok = t2i.build_tokenizer(vocabulary(), tmp_path / "tok", max_length=spec.text.max_length)
    vae = t2i.build_vae(spec.vae)
    te = t2i.build_text_encoder(spec.text, tok)
    unet = t2i.build_unet(spec.unet, cross_attention_dim=spec.text.hidden_size)
    sched = t2i.build_scheduler()
    assert type(vae) is AutoencoderKL and type(te) is CLIPTextModel and type(unet) is UNet2DConditionModel
    assert type(tok) is CLIPTokenizer and type(sched) is DDIMScheduler
    # SD 1.5's schedule and settings
    c = sched.config
    assert (c.beta_start, c.beta_end, c.beta_schedule, c.num_train_timesteps) == (0.00085, 0.012, "scaled_linear", 1000)
    assert c.prediction_type == "epsilon" and c.steps_offset == 1 and c.set_alpha_to_one is False
    # 32x32 images -> 4x8x8 latents; cross-attention in every block
    z = vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean
    assert z.shape == (1, 4, 8, 8)
    assert all("CrossAttn" in b for b in unet.config.down_block_types + unet.config.up_block_types)


def test_tokenizer_one_token_per_word_and_round_trip(tmp_path):
    tok = t2i.build_tokenizer(vocabulary(), tmp_path / "tok", max_length=16)
    for w in vocabulary():
        assert len(tok(w, add_special_tokens=False)["input_ids"]) == 1, w
    ids = tok(PROMPT)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == 7 + 2
    assert tok.decode(ids, skip_special_tokens=True).strip() == PROMPT
    assert t2i.known_words(tok) >= {w for w in vocabulary() if len(w) > 1}
    # reloading the saved folder with the stock class gives the same ids
    from transformers import CLIPTokenizer

    again = CLIPTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert again(PROMPT)["input_ids"] == ids and again.model_max_length == 16


def test_word_merges_never_break_earlier_words():
    # "three" contains "re", the first pair of "red"; "seven" contains "ve" of a word starting with "ve"
    words = ["red", "three", "ve", "seven", "even", "eve", "a", "aa"]
    merges = t2i.word_merges(words)
    ranks = {m: i for i, m in enumerate(merges)}
    for w in words:
        assert t2i._bpe(w, ranks) == [w + "</w>"], w


def test_unknown_words_and_long_prompts_warn_not_fail(tmp_path):
    tok = t2i.build_tokenizer(vocabulary(), tmp_path / "tok", max_length=16)
    msgs = t2i.check_prompts(tok, [PROMPT], warn=False)
    assert msgs == []
    with pytest.warns(UserWarning, match="purple"):
        msgs = t2i.check_prompts(tok, ["a purple seven on a blue background"])
    assert len(msgs) == 1 and "not in the teacher's vocabulary" in msgs[0]
    # unseen words still tokenize (byte pieces), never as an error
    assert len(tok("a purple seven")["input_ids"]) > 5
    long = PROMPT + " a" * 20
    with pytest.warns(UserWarning, match="truncated"):
        msgs = t2i.check_prompts(tok, [long])
    assert any("longer than the tokenizer's limit of 16" in m for m in msgs)
    assert len(tok(long, truncation=True, max_length=16)["input_ids"]) == 16


def test_tiny_teacher_folder_is_a_stock_sd_pipeline(tiny_teacher):
    index = json.loads((tiny_teacher / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert not list(tiny_teacher.glob("*.py"))  # no custom code
    info = json.loads((tiny_teacher / "training.json").read_text())
    vae_cfg = json.loads((tiny_teacher / "vae" / "config.json").read_text())
    assert vae_cfg["scaling_factor"] == pytest.approx(info["vae"]["scaling_factor"])
    assert vae_cfg["scaling_factor"] != 0.18215  # set from the latents, not copied
    assert (tiny_teacher / "README.md").read_text().startswith("---")
    for part in ("vae", "text", "unet"):
        assert info[part]["train_wall_s"] >= 0 and info[part]["train_cpu_s"] >= 0


def test_plain_diffusers_loads_and_samples_in_fresh_process(tiny_teacher):
    code = textwrap.dedent(f"""
        import sys, torch
        from diffusers import StableDiffusionPipeline, DDIMScheduler, DPMSolverMultistepScheduler
        pipe = StableDiffusionPipeline.from_pretrained({str(tiny_teacher)!r})
        pipe.set_progress_bar_config(disable=True)
        for cls in (DDIMScheduler, DPMSolverMultistepScheduler):
            pipe.scheduler = cls.from_config(pipe.scheduler.config)
            img = pipe([{PROMPT!r}, "a purple seven"], num_inference_steps=3, guidance_scale=4.5,
                       output_type="np", generator=torch.Generator().manual_seed(0)).images
            assert img.shape == (2, 32, 32, 3) and (img >= 0).all() and (img <= 1).all(), img.shape
        assert not any(m.startswith("stepdistill") for m in sys.modules), "stepdistill was imported"
        print("OK", type(pipe.tokenizer).__name__)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                       cwd=str(tiny_teacher.parent))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "OK CLIPTokenizer" in r.stdout


def test_package_diffusers_teacher_loads_it(tiny_teacher):
    from stepdistill.config import TeacherConfig
    from stepdistill.run import build_teacher

    teacher = build_teacher(TeacherConfig(kind="diffusers", path=str(tiny_teacher), guidance_scale=4.5))
    assert teacher.sample_shape == (4, 8, 8) and teacher.prediction_type == "epsilon"
    cond = teacher.encode_conditions([PROMPT, PROMPT])
    x = teacher.sample(2, cond, num_steps=2, sampler="ddim", generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 4, 8, 8) and torch.isfinite(x).all()
    img = teacher.decode(x)
    assert img.shape == (2, 3, 32, 32)


def test_cache_is_keyed_by_the_recipe(tiny_teacher, monkeypatch):
    # found again without training
    import stepdistill.t2i_teacher as trainer

    def boom(*a, **k):
        raise AssertionError("retrained a cached teacher")

    monkeypatch.setattr(trainer, "run_t2i_teacher_training", boom)
    assert trainer.ensure_t2i_teacher("t2i", TINY, quiet=True) == tiny_teacher
    # any recipe change moves the folder; a UNet change keeps the VAE and text keys
    base = t2i.spec_from_params(load_config("t2i", TINY).teacher.params)
    other = t2i.spec_from_params(load_config("t2i", TINY + ["teacher.params.unet.lr=0.0005"]).teacher.params)
    k0, k1 = t2i.part_keys(base), t2i.part_keys(other)
    assert k0["vae"] == k1["vae"] and k0["text"] == k1["text"] and k0["unet"] != k1["unet"]
    assert trainer.t2i_teacher_dir("t2i", TINY + ["teacher.params.unet.lr=0.0005"]) != tiny_teacher.parent
    vae_changed = t2i.part_keys(t2i.spec_from_params(
        load_config("t2i", TINY + ["teacher.params.vae.kl_weight=0.001"]).teacher.params))
    assert vae_changed["vae"] != k0["vae"] and vae_changed["unet"] != k0["unet"]  # the UNet builds on the VAE
    assert trainer.t2i_teacher_dir("t2i", TINY + ["train.progress=true"]) == tiny_teacher.parent  # not part of the recipe


def test_unknown_recipe_key_is_an_error():
    from stepdistill.config import ConfigError

    with pytest.raises(ConfigError, match="unet"):
        t2i.spec_from_params(load_config("t2i", TINY + ["teacher.params.unet.no_such_key=1"]).teacher.params)


def test_vae_stage_resumes_exactly(tmp_path, monkeypatch):
    import stepdistill.t2i_teacher as trainer

    spec = t2i.spec_from_params(load_config("t2i", TINY + ["teacher.params.vae.steps=4",
                                                           "teacher.params.checkpoint_every_steps=2"]).teacher.params)
    data, _, _ = trainer.load_training_data(spec)
    data.images, data.captions, data.attrs = data.images[:256], data.captions[:256], data.attrs[:256]
    ref = trainer.train_vae(spec, trainer._Stage(tmp_path / "a", "vae", "k"), data, progress=False)

    real_save = trainer._atomic_torch_save
    calls = {"n": 0}

    def save_then_die(obj, path):
        real_save(obj, path)
        if path.name == "ckpt.pt":
            calls["n"] += 1
            raise KeyboardInterrupt  # killed right after the step-2 checkpoint

    monkeypatch.setattr(trainer, "_atomic_torch_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        trainer.train_vae(spec, trainer._Stage(tmp_path / "b", "vae", "k"), data, progress=False)
    monkeypatch.setattr(trainer, "_atomic_torch_save", real_save)
    assert calls["n"] == 1 and (tmp_path / "b" / "vae-k" / "ckpt.pt").exists()
    resumed = trainer.train_vae(spec, trainer._Stage(tmp_path / "b", "vae", "k"), data, progress=False)
    assert not (tmp_path / "b" / "vae-k" / "ckpt.pt").exists()
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "a" / "vae-k" / "vae" / "diffusion_pytorch_model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "vae-k" / "vae" / "diffusion_pytorch_model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)
    assert resumed["scaling_factor"] == pytest.approx(ref["scaling_factor"])


def test_two_workers_train_the_same_teacher(tiny_teacher, tmp_path, monkeypatch):
    """Data-parallel training (2 gloo processes) draws the same batches and makes the same updates."""
    from safetensors.torch import load_file

    monkeypatch.setenv("STEPDISTILL_CACHE", str(tmp_path / "cache"))
    folder = trainer.ensure_t2i_teacher("t2i", TINY, quiet=True, progress=False, workers=2)
    assert folder != tiny_teacher
    for part in ("vae", "unet"):
        a = load_file(str(tiny_teacher / part / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(folder / part / "diffusion_pytorch_model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)
    assert json.loads((folder / "training.json").read_text())["workers"] == 2


def test_teacher_kind_t2i_builder_finds_the_cached_teacher(tiny_teacher, monkeypatch):
    import stepdistill.t2i_teacher as trainer
    from stepdistill.config import TeacherConfig

    monkeypatch.setattr(trainer, "run_t2i_teacher_training",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    tcfg = load_config("t2i", TINY).teacher  # the preset's own teacher section (the recipe)
    teacher = trainer.build_t2i_teacher(tcfg)
    assert teacher.sample_shape == (4, 8, 8) and teacher.text_encoder is not None and teacher.vae is not None
    by_path = trainer.build_t2i_teacher(TeacherConfig(kind="t2i", path=str(tiny_teacher), guidance_scale=2.0))
    assert by_path.guidance_scale == 2.0


def test_quick_prompt_accuracy_runs_on_a_folder(tiny_teacher):
    import stepdistill.t2i_teacher as trainer

    rows = trainer.quick_prompt_accuracy(tiny_teacher, n=3, settings=((2, 4.5),))
    assert len(rows) == 1 and rows[0]["n"] == 3 and 0.0 <= rows[0]["prompt_accuracy"] <= 1.0


def test_run_build_teacher_dispatches_kind_t2i(tiny_teacher):
    """`teacher.kind: t2i` (the t2i/<method> presets) is a registered kind of run.build_teacher."""
    from stepdistill.config import TeacherConfig
    from stepdistill.run import build_teacher

    teacher = build_teacher(TeacherConfig(kind="t2i", path=str(tiny_teacher), guidance_scale=3.0))
    assert teacher.guidance_scale == 3.0 and teacher.text_encoder is not None
