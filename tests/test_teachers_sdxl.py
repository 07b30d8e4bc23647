"""SDXL teacher: conditions, null condition, CFG and copies against the stock StableDiffusionXLPipeline.

Tiny random components built here the way diffusers' own SDXL tests build them (two CLIP text
encoders, the second with a projection; a UNet with ``addition_embed_type="text_time"``); nothing
is downloaded.  The stock pipeline's UNet calls are captured with a forward hook and compared with
what the teacher feeds the same UNet.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from stepdistill.teachers.diffusion import DiffusersTeacher, TeacherLoadError
from stepdistill.teachers.sdxl import SDXLTeacher

MAX_LEN = 16
PROMPTS = ["a cat", "dog on a hill"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def clip_tokenizer(tmp_path, max_len=MAX_LEN):
    vocab = {}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        vocab=str(tmp_path / "vocab.json"), merges=str(tmp_path / "merges.txt"), model_max_length=max_len
    )


def clip_config(hidden=32, projection=32, max_len=MAX_LEN):
    return CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=3,
        vocab_size=60,
        max_position_embeddings=max_len,
        bos_token_id=52,
        eos_token_id=53,
        pad_token_id=53,
        projection_dim=projection,
    )


def tiny_vae(latent_channels=4, seed=0, **kw):
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=16,
        **kw,
    ).eval()


def sdxl_parts(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 24,  # 6 time ids x 8 + pooled (text_encoder_2)
        cross_attention_dim=32 + 40,  # the two encoders' hidden sizes
    ).eval()
    torch.manual_seed(1)
    te = CLIPTextModel(clip_config(hidden=32)).eval()
    torch.manual_seed(2)
    te2 = CLIPTextModelWithProjection(clip_config(hidden=40, projection=24)).eval()
    return dict(
        unet=unet,
        text_encoder=te,
        text_encoder_2=te2,
        tokenizer=clip_tokenizer(tmp_path / "tok1"),
        tokenizer_2=clip_tokenizer(tmp_path / "tok2"),
        vae=tiny_vae(),
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading",
            steps_offset=1,
        ),
    )


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sdxl")
    pipe = StableDiffusionXLPipeline(**sdxl_parts(tmp))
    pipe.save_pretrained(tmp / "pipe")
    return tmp / "pipe"


@pytest.fixture(scope="module")
def loaded(sdxl_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    teacher = DiffusersTeacher.from_pretrained(sdxl_dir, guidance_scale=5.0)
    return pipe, teacher


def _capture_unet(pipe, **call):
    seen = []

    def hook(module, args, kwargs, output):
        seen.append((args, kwargs, output[0] if isinstance(output, tuple) else output.sample))

    h = pipe.unet.register_forward_hook(hook, with_kwargs=True)
    try:
        pipe(**call)
    finally:
        h.remove()
    return seen


def test_from_pretrained_builds_an_sdxl_teacher(loaded):
    _, teacher = loaded
    assert isinstance(teacher, SDXLTeacher)
    assert teacher.null_prompt == "zeros" and teacher.guidance_scale == 5.0
    assert teacher.sample_shape == (4, 8, 8) and teacher.vae_scale_factor == 2
    assert teacher.time_ids_list() == [16, 16, 0, 0, 16, 16]
    assert all(not p.requires_grad for p in teacher.parameters())


def test_conditions_and_null_equal_the_pipeline(loaded):
    """encode_conditions / null_condition_like give exactly the tensors the stock pipeline passes."""
    pipe, teacher = loaded
    cond = teacher.encode_conditions(PROMPTS)
    pe, npe, pooled, npooled = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
    assert torch.equal(cond["encoder_hidden_states"], pe)
    assert torch.equal(cond["added_cond_kwargs"]["text_embeds"], pooled)
    null = teacher.null_condition_like(cond, 2)
    assert torch.equal(null["encoder_hidden_states"], npe) and not npe.any()
    assert torch.equal(null["added_cond_kwargs"]["text_embeds"], npooled) and not npooled.any()
    tid = pipe._get_add_time_ids(
        (16, 16), (0, 0), (16, 16), dtype=torch.float32, text_encoder_projection_dim=24
    )
    assert torch.equal(cond["added_cond_kwargs"]["time_ids"], tid.expand(2, -1))
    # custom time ids survive into the unconditional branch; the null keys are the cond keys
    cond["added_cond_kwargs"]["time_ids"] = torch.tensor([[32.0, 32, 4, 4, 16, 16]] * 2)
    null = teacher.null_condition_like(cond, 2)
    assert torch.equal(null["added_cond_kwargs"]["time_ids"], cond["added_cond_kwargs"]["time_ids"])
    assert set(null) == set(cond) and set(null["added_cond_kwargs"]) == set(cond["added_cond_kwargs"])
    plain = teacher.null_condition(3)
    assert plain["added_cond_kwargs"]["time_ids"].shape == (3, 6)
    assert plain["encoder_hidden_states"].shape == (3, MAX_LEN, 72)


@pytest.mark.parametrize("w", [1.0, 5.0])
def test_denoise_equals_the_stock_pipeline_step(loaded, w):
    pipe, teacher = loaded
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    seen = _capture_unet(
        pipe, prompt=PROMPTS, num_inference_steps=1, timesteps=[999], guidance_scale=w, latents=latents,
        output_type="latent",
    )
    assert len(seen) == 1
    args, kwargs, out = seen[0]
    x_native = args[0]
    t = args[1]
    eps = out.chunk(2)[0] + w * (out.chunk(2)[1] - out.chunk(2)[0]) if w > 1 else out
    cond = teacher.encode_conditions(PROMPTS)
    with torch.no_grad():
        mine = teacher.native_output(x_native[:2] if w > 1 else x_native, t, cond, w)
    assert torch.allclose(mine, eps, atol=1e-5, rtol=0)
    # the same step in sigma language: Euler's sample is the VE point x = x0 + sigma eps
    sigma = pipe.scheduler.sigmas[0]
    assert torch.allclose(sigma, teacher.sigmas[999], rtol=1e-5)
    x = latents * pipe.scheduler.init_noise_sigma
    with torch.no_grad():
        x0 = teacher.denoise(x, teacher.sigmas[999], cond, w)
    assert torch.allclose(x0, x - sigma * eps, atol=1e-5 * float(sigma), rtol=1e-5)


def test_denoise_without_condition_is_the_null_input(loaded):
    _, teacher = loaded
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        a = teacher.denoise(x, 3.0, None)
        b = teacher.denoise(x, 3.0, teacher.null_condition(2), guidance_scale=1.0)
    assert torch.equal(a, b)


def test_trainable_copy(loaded):
    _, teacher = loaded
    student = teacher.trainable_copy()
    assert isinstance(student, SDXLTeacher) and student.model.training
    assert sum(p.numel() for p in student.parameters()) == sum(p.numel() for p in teacher.model.parameters())
    assert student.text_encoder is None and student.text_encoder_2 is None and student.vae is None
    assert student.time_ids_list() == teacher.time_ids_list()
    cond = student.encode_conditions(PROMPTS)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.allclose(student.denoise(x, 2.0, cond, 5.0), teacher.denoise(x, 2.0, cond, 5.0), atol=1e-6)
    loss = student.denoise(x, 2.0, cond).pow(2).mean()
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in student.parameters())


def test_empty_prompt_null_when_the_folder_says_so(sdxl_dir, tmp_path):
    import shutil

    d = tmp_path / "p"
    shutil.copytree(sdxl_dir, d)
    index = json.loads((d / "model_index.json").read_text())
    index["force_zeros_for_empty_prompt"] = False
    (d / "model_index.json").write_text(json.dumps(index))
    teacher = DiffusersTeacher.from_pretrained(d)
    assert teacher.null_prompt == "empty"
    null = teacher.null_condition(1)
    empty = teacher.encode_conditions([""])
    assert torch.equal(null["encoder_hidden_states"], empty["encoder_hidden_states"])
    assert null["encoder_hidden_states"].abs().sum() > 0


def test_refiner_and_mismatched_folders_are_refused(sdxl_dir, tmp_path):
    import shutil

    d = tmp_path / "refiner"
    shutil.copytree(sdxl_dir, d)
    index = json.loads((d / "model_index.json").read_text())
    index["text_encoder"] = [None, None]
    index["tokenizer"] = [None, None]
    (d / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(TeacherLoadError, match="refiner.*supported: .*FluxTransformer2DModel") as e:
        DiffusersTeacher.from_pretrained(d)
    assert "\n" not in str(e.value)

    d = tmp_path / "mismatch"
    shutil.copytree(sdxl_dir, d)
    cfg = json.loads((d / "unet" / "config.json").read_text())
    cfg["projection_class_embeddings_input_dim"] = 5 * 8 + 24
    (d / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TeacherLoadError):
        DiffusersTeacher.from_pretrained(d)


@pytest.mark.parametrize(
    "algo,params",
    [
        ("dmd2", {"real_guidance_scale": 5.0, "gan_weight_g": 0.005, "gan_weight_d": 0.01}),
        ("dmd2", {"generator_timesteps": [999, 749, 499, 249], "backward_simulation": True}),
        ("vsd", {"critic": "full", "cond_dropout": 0.5, "guidance_scale": 3.0}),
    ],
)
def test_distillation_losses_run_on_the_sdxl_cond_layout(loaded, algo, params):
    """One generator and one critic loss with CFG on the nested SDXL condition (GAN head included)."""
    from stepdistill.algorithms import build

    _, teacher = loaded
    torch.manual_seed(0)
    d = build(algo, teacher, params)
    batch = {"raw_cond": PROMPTS, "real": torch.rand(2, 3, 16, 16) * 2 - 1}
    cache: dict = {}
    for group in ("generator", "critic"):
        out = d.loss(batch, 0, group, cache)
        assert torch.isfinite(out.loss)
        out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_a_delegating_teacher_guides_with_the_full_null(loaded):
    """DisBack's node target / MSD's proxy use the generic DiffusionTeacher.denoise: its CFG batch
    must carry added_cond_kwargs for both halves (null_condition holds every key)."""
    from stepdistill.teachers.base import DelegatingTeacher

    _, teacher = loaded
    proxy = DelegatingTeacher(teacher)
    cond = teacher.encode_conditions(PROMPTS)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.allclose(proxy.denoise(x, 2.0, cond, 5.0), teacher.denoise(x, 2.0, cond, 5.0), atol=1e-6)


@pytest.mark.parametrize("preset", ["sdxl/dmd2_4step", "sdxl/dmd2_1step", "sdxl/disback_dmd2"])
def test_sdxl_presets_build_on_a_tiny_sdxl_folder(sdxl_dir, preset):
    """The paper-scale presets' teacher and algorithm sections work with the SDXL loader (the hub
    path swapped for a tiny local folder; the regression pair count shrunk)."""
    from stepdistill.algorithms import build
    from stepdistill.config import load_config
    from stepdistill.run import build_teacher

    cfg = load_config(preset)
    cfg.teacher.path = str(sdxl_dir)
    cfg.teacher.dtype = "float32"
    teacher = build_teacher(cfg.teacher)
    assert isinstance(teacher, SDXLTeacher) and teacher.guidance_scale == 8.0
    params = dict(cfg.algorithm.params)
    if "regression_pairs" in params:
        params.update(regression_pairs=2, regression_sampler_steps=2)
    if cfg.algorithm.name == "disback":
        assert params["base_params"]["generator_timesteps"] == [399]
        return  # DisBack wraps the DMD2 built below; its recording writes node files on the first step
    d = build(cfg.algorithm.name, teacher, params)
    assert list(d.generator.timesteps) == list(params["generator_timesteps"])
    assert isinstance(d.generator.denoiser, SDXLTeacher)


def test_bfloat16_sdxl_teacher(sdxl_dir, loaded):
    _, ref = loaded
    half = DiffusersTeacher.from_pretrained(sdxl_dir, dtype=torch.bfloat16, guidance_scale=5.0)
    assert next(half.model.parameters()).dtype == torch.bfloat16
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        got = half.denoise(x, 2.0, half.encode_conditions(PROMPTS))
        want = ref.denoise(x, 2.0, ref.encode_conditions(PROMPTS))
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert (got - want).abs().mean() < 0.1 * want.abs().mean()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_sdxl_teacher_on_cuda(loaded):
    _, teacher = loaded
    teacher = teacher.to("cuda")
    try:
        cond = teacher.encode_conditions(PROMPTS)
        assert cond["added_cond_kwargs"]["time_ids"].device.type == "cuda"
        x = torch.randn(2, 4, 8, 8, device="cuda")
        assert teacher.denoise(x, 2.0, cond, 5.0).device.type == "cuda"
        student = teacher.trainable_copy()
        assert next(student.parameters()).device.type == "cuda"
        assert student.null_condition(2)["encoder_hidden_states"].device.type == "cuda"
    finally:
        teacher.to("cpu")


def test_bottleneck_is_the_mid_block(loaded):
    _, teacher = loaded
    module, to_map = teacher.bottleneck()
    assert module is teacher.model.mid_block
    seen = []
    h = module.register_forward_hook(lambda m, a, o: seen.append(to_map(o)))
    with torch.no_grad():
        teacher.denoise_raw(torch.randn(2, 4, 8, 8), torch.full((2,), 1.0), teacher.encode_conditions(PROMPTS))
    h.remove()
    assert seen[0].shape == (2, 16, 4, 4)
