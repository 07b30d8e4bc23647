"""SD3 and FLUX.1 teachers against the stock StableDiffusion3Pipeline / FluxPipeline.

Tiny random components (CLIP, T5, transformers) built here; nothing is downloaded.  The stock
pipelines' transformer calls are captured with a forward hook and compared with what the teacher
computes for the same latents, timestep and prompts.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from test_teachers_sdxl import PROMPTS, clip_config, clip_tokenizer, tiny_vae  # noqa: I001
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from stepdistill.teachers.diffusion import DiffusersTeacher, TeacherLoadError
from stepdistill.teachers.flow_transformers import FluxTeacher, SD3Teacher, calculate_shift


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def t5_tokenizer():
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [(c, -2.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tk = Tokenizer(models.Unigram(vocab, unk_id=2))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)


def t5_encoder(d_model, seed=3):
    torch.manual_seed(seed)
    return T5EncoderModel(
        T5Config(vocab_size=40, d_model=d_model, d_ff=37, d_kv=8, num_layers=2, num_heads=4, decoder_start_token_id=0)
    ).eval()


def _capture(module, run):
    seen = []

    def hook(mod, args, kwargs, output):
        seen.append((kwargs, output[0]))

    h = module.register_forward_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        h.remove()
    return seen


# ---------------------------------------------------------------------------------------------
# SD3


def sd3_parts(tmp_path):
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=80, pooled_projection_dim=32 + 24, out_channels=4,
    ).eval()
    torch.manual_seed(1)
    te = CLIPTextModelWithProjection(clip_config(hidden=32, projection=32)).eval()
    torch.manual_seed(2)
    te2 = CLIPTextModelWithProjection(clip_config(hidden=40, projection=24)).eval()
    return dict(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(shift_factor=0.1, scaling_factor=1.5),
        text_encoder=te,
        tokenizer=clip_tokenizer(tmp_path / "t1"),
        text_encoder_2=te2,
        tokenizer_2=clip_tokenizer(tmp_path / "t2"),
        text_encoder_3=t5_encoder(80),
        tokenizer_3=t5_tokenizer(),
    )


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd3")
    StableDiffusion3Pipeline(**sd3_parts(tmp)).save_pretrained(tmp / "pipe")
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp / "pipe")
    pipe.set_progress_bar_config(disable=True)
    return tmp / "pipe", pipe, DiffusersTeacher.from_pretrained(tmp / "pipe")


def test_sd3_loads_with_the_shifted_flow_grid(sd3):
    _, pipe, teacher = sd3
    assert isinstance(teacher, SD3Teacher) and teacher.prediction_type == "flow"
    assert teacher.flow_shift == 3.0 and teacher.sample_shape == (4, 8, 8)
    # the teacher's training grid is the scheduler's (shifted) sigma grid, ascending
    want = pipe.scheduler.sigmas[:-1].flip(0) if pipe.scheduler.sigmas[-1] == 0 else pipe.scheduler.sigmas.flip(0)
    assert torch.allclose(teacher.flow_t_exact, want.float(), atol=1e-6)
    assert all(not p.requires_grad for p in teacher.parameters())


def test_sd3_conditions_equal_the_pipeline(sd3):
    _, pipe, teacher = sd3
    cond = teacher.encode_conditions(PROMPTS)
    with torch.no_grad():  # (T5 with autograd on differs in the last float bits)
        pe, npe, pooled, npooled = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, device="cpu")
    assert torch.equal(cond["encoder_hidden_states"], pe) and pe.shape == (2, 16 + 256, 80)
    assert torch.equal(cond["pooled_projections"], pooled)
    null = teacher.null_condition_like(cond, 2)  # one encoded row, expanded: equal up to batch-size rounding
    assert torch.allclose(null["encoder_hidden_states"], npe, atol=1e-5, rtol=0)
    assert torch.allclose(null["pooled_projections"], npooled, atol=1e-5, rtol=0)


@pytest.mark.parametrize("w", [1.0, 4.0])
def test_sd3_denoise_equals_the_stock_transformer_call(sd3, w):
    _, pipe, teacher = sd3
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = _capture(
        pipe.transformer,
        lambda: pipe(PROMPTS, num_inference_steps=3, guidance_scale=w, latents=latents, output_type="latent"),
    )
    assert len(seen) == 3
    cond = teacher.encode_conditions(PROMPTS)
    kw, out = seen[1]  # the second step: t < 1, finite sigma
    x_t, t = kw["hidden_states"][:2], kw["timestep"][:2]
    v = out.chunk(2)[0] + w * (out.chunk(2)[1] - out.chunk(2)[0]) if w > 1 else out
    with torch.no_grad():
        mine = teacher.native_output(x_t, t, cond, w)
    assert torch.allclose(mine, v, atol=1e-5, rtol=0)
    tf = float(t[0]) / 1000
    sigma = tf / (1 - tf)
    with torch.no_grad():
        x0 = teacher.denoise(x_t * (1 + sigma), torch.tensor(sigma), cond, w)
    assert torch.allclose(x0, x_t - tf * v, atol=1e-5)


def test_sd3_without_t5_uses_zeros_and_copies(sd3):
    path, _, teacher = sd3
    parts = {k: getattr(teacher, k) for k in ("tokenizer", "tokenizer_2")}
    no_t5 = SD3Teacher(
        teacher.model, teacher.scheduler_config, text_encoder=teacher.text_encoder, text_encoder_2=teacher.text_encoder_2,
        max_sequence_length=8, **parts,
    )
    cond = no_t5.encode_conditions(PROMPTS)
    assert cond["encoder_hidden_states"].shape == (2, 16 + 8, 80)
    assert not cond["encoder_hidden_states"][:, 16:].any()
    student = teacher.trainable_copy()
    assert isinstance(student, SD3Teacher) and student.model.training and student.text_encoder_3 is None
    assert student.flow_shift == teacher.flow_shift
    cond = teacher.encode_conditions(PROMPTS)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.allclose(student.denoise(x, 1.3, cond, 3.0), teacher.denoise(x, 1.3, cond, 3.0), atol=1e-6)
    assert torch.allclose(student.encode_conditions(PROMPTS)["encoder_hidden_states"], cond["encoder_hidden_states"])


# ---------------------------------------------------------------------------------------------
# FLUX.1


def flux_parts(tmp_path, guidance_embeds=True):
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds,
    ).eval()
    torch.manual_seed(1)
    te = CLIPTextModel(clip_config(hidden=32)).eval()
    return dict(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096,
            base_shift=0.5, max_shift=1.15,
        ),
        vae=tiny_vae(shift_factor=0.1, scaling_factor=1.5),
        text_encoder=te,
        tokenizer=clip_tokenizer(tmp_path / "t1"),
        text_encoder_2=t5_encoder(32),
        tokenizer_2=t5_tokenizer(),
    )


def _flux_dir(tmp, guidance_embeds):
    d = tmp / f"flux{int(guidance_embeds)}"
    FluxPipeline(**flux_parts(tmp, guidance_embeds)).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def flux_dirs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flux")
    return {g: _flux_dir(tmp, g) for g in (True, False)}


def _flux(flux_dirs, guidance_embeds, **kw):
    d = flux_dirs[guidance_embeds]
    pipe = FluxPipeline.from_pretrained(d)
    pipe.set_progress_bar_config(disable=True)
    return pipe, DiffusersTeacher.from_pretrained(d, sample_shape=(4, 8, 8), **kw)


def test_flux_loads_packed_with_the_dynamic_shift(flux_dirs):
    pipe, teacher = _flux(flux_dirs, True, guidance_scale=3.5)
    assert isinstance(teacher, FluxTeacher) and teacher.embedded_guidance
    assert teacher.sample_shape == (4, 8, 8)
    # 8x8 latents -> 16 image tokens -> mu; exponential time shift == static shift exp(mu)
    assert math.isclose(teacher.flow_shift, math.exp(calculate_shift(16)), rel_tol=1e-9)
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(FluxTeacher.unpack(FluxTeacher.pack(x), 8, 8), x)
    assert torch.equal(FluxTeacher.pack(x), pipe._pack_latents(x, 2, 4, 8, 8))
    assert torch.equal(FluxTeacher.image_ids(8, 8, "cpu", torch.float32), pipe._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32))
    # the stock pipeline's second-step sigma is the teacher's shift applied to the unshifted 1/2
    pipe.scheduler.set_timesteps(sigmas=[1.0, 0.5], mu=calculate_shift(16))
    s = teacher.flow_shift
    assert math.isclose(float(pipe.scheduler.sigmas[1]), s * 0.5 / (1 + (s - 1) * 0.5), rel_tol=1e-5)


def test_flux_conditions_equal_the_pipeline(flux_dirs):
    pipe, teacher = _flux(flux_dirs, True)
    cond = teacher.encode_conditions(PROMPTS)
    with torch.no_grad():
        pe, pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS, device="cpu")
    assert torch.equal(cond["encoder_hidden_states"], pe) and pe.shape == (2, 512, 32)
    assert torch.equal(cond["pooled_projections"], pooled)


def test_flux_dev_guidance_goes_to_the_embedding(flux_dirs):
    pipe, teacher = _flux(flux_dirs, True)
    assert teacher.guidance_scale == 1.0  # from_pretrained's explicit default wins over FluxPipeline's 3.5
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    packed = FluxTeacher.pack(latents)
    seen = _capture(
        pipe.transformer,
        lambda: pipe(PROMPTS, height=16, width=16, num_inference_steps=2, guidance_scale=3.5, latents=packed,
                     output_type="latent"),
    )
    assert len(seen) == 2  # one call per step: no unconditional branch
    kw, out = seen[1]
    assert torch.allclose(kw["guidance"], torch.full((2,), 3.5))
    cond = teacher.encode_conditions(PROMPTS)
    x_t = FluxTeacher.unpack(kw["hidden_states"], 8, 8)
    v = FluxTeacher.unpack(out, 8, 8)
    with torch.no_grad():
        mine = teacher.native_output(x_t, kw["timestep"] * 1000, cond, 3.5)
    assert torch.allclose(mine, v, atol=1e-5, rtol=0)
    tf = float(kw["timestep"][0])
    sigma = tf / (1 - tf)
    calls = []
    h = teacher.model.register_forward_hook(lambda m, a, o: calls.append(1))
    with torch.no_grad():
        x0 = teacher.denoise(x_t * (1 + sigma), torch.tensor(sigma), cond, 3.5)
        other = teacher.denoise(x_t * (1 + sigma), torch.tensor(sigma), cond, 1.0)
    h.remove()
    assert len(calls) == 2  # CFG off: one network call per denoise
    assert torch.allclose(x0, x_t - tf * v, atol=1e-5)
    assert not torch.allclose(x0, other, atol=1e-4)  # the guidance value reaches the embedding


def test_flux_without_guidance_embedding_uses_true_cfg(flux_dirs):
    pipe, teacher = _flux(flux_dirs, False)
    assert not teacher.embedded_guidance
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = _capture(
        pipe.transformer,
        lambda: pipe(PROMPTS, negative_prompt=["", ""], true_cfg_scale=2.0, height=16, width=16,
                     num_inference_steps=2, latents=FluxTeacher.pack(latents), output_type="latent"),
    )
    assert len(seen) == 4 and seen[2][0]["guidance"] is None
    (kw, pos), (_, neg) = seen[2], seen[3]
    cond = teacher.encode_conditions(PROMPTS)
    with torch.no_grad():
        mine = teacher.native_output(FluxTeacher.unpack(kw["hidden_states"], 8, 8), kw["timestep"] * 1000, cond, 2.0)
    assert torch.allclose(mine, FluxTeacher.unpack(neg + 2.0 * (pos - neg), 8, 8), atol=1e-5, rtol=0)


def test_flux_trainable_copy(flux_dirs):
    _, teacher = _flux(flux_dirs, True, guidance_scale=3.5)
    student = teacher.trainable_copy()
    assert isinstance(student, FluxTeacher) and student.embedded_guidance and student.guidance_scale == 3.5
    assert student.text_encoder is None and student.text_encoder_2 is None
    cond = teacher.encode_conditions(PROMPTS)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.allclose(student.denoise(x, 0.7, cond, 2.0), teacher.denoise(x, 0.7, cond, 2.0), atol=1e-6)
    assert torch.isfinite(teacher.sample(2, cond, num_steps=2, sampler="flow_euler")).all()


def test_flux_guidance_embedding_mismatch_is_named(flux_dirs, tmp_path):
    for has, flag in ((False, True), (True, False)):
        d = tmp_path / f"bad{int(has)}"
        shutil.copytree(flux_dirs[has], d)
        cfg_file = d / "transformer" / "config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg["guidance_embeds"] = flag
        cfg_file.write_text(json.dumps(cfg))
        with pytest.raises(TeacherLoadError, match="guidance_embeds") as e:
            DiffusersTeacher.from_pretrained(d)
        msg = str(e.value)
        assert "\n" not in msg and str(d) in msg and "time_text_embed.guidance_embedder" in msg


# ---------------------------------------------------------------------------------------------
# distillation on the new condition layouts


@pytest.mark.parametrize(
    "algo,params",
    [
        ("dmd2", {"real_guidance_scale": 4.0}),
        ("dmd2", {"generator_timesteps": [999, 749, 499, 249], "backward_simulation": True}),
        ("vsd", {"critic": "full", "cond_dropout": 0.5, "guidance_scale": 3.0}),
    ],
)
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_distillation_losses_run(sd3, flux_dirs, family, algo, params):
    """One generator and one critic loss on the SD3 / FLUX teachers.  (DMD2's GAN head is not
    covered: its bottleneck hook takes the joint blocks' text stream; see the teachers' report.)"""
    from stepdistill.algorithms import build

    teacher = sd3[2] if family == "sd3" else _flux(flux_dirs, True, guidance_scale=3.5)[1]
    torch.manual_seed(0)
    d = build(algo, teacher, params)
    cache: dict = {}
    for group in ("generator", "critic"):
        out = d.loss({"raw_cond": PROMPTS}, 0, group, cache)
        assert torch.isfinite(out.loss)
        out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_sd3_preset_builds_on_a_tiny_sd3_folder(sd3):
    from stepdistill.algorithms import build
    from stepdistill.config import load_config
    from stepdistill.run import build_teacher

    cfg = load_config("sd3/dmd2")
    cfg.teacher.path = str(sd3[0])
    cfg.teacher.dtype = "float32"
    teacher = build_teacher(cfg.teacher)
    assert isinstance(teacher, SD3Teacher) and teacher.guidance_scale == 7.0 and teacher.flow_shift == 3.0
    d = build(cfg.algorithm.name, teacher, dict(cfg.algorithm.params))
    assert list(d.generator.timesteps) == [999, 749, 499, 249]


def test_flux_image_conditioned_variants_are_refused():
    torch.manual_seed(0)
    fill = FluxTransformer2DModel(
        patch_size=1, in_channels=32, out_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    )
    with pytest.raises(TeacherLoadError, match="Fill / Control"):
        FluxTeacher(fill, dict(FlowMatchEulerDiscreteScheduler().config), tokenizer=object(), tokenizer_2=object())


def test_bfloat16_teachers_run_in_their_dtype(sd3, flux_dirs):
    """Frozen teachers loaded in bf16 (as the presets do): conditions, CFG and the embedded guidance
    run; outputs are float32 and close to the float32 teacher's."""
    for path, ref in ((sd3[0], sd3[2]), (flux_dirs[True], _flux(flux_dirs, True)[1])):
        kw = {"sample_shape": (4, 8, 8)} if isinstance(ref, FluxTeacher) else {}
        half = DiffusersTeacher.from_pretrained(path, dtype=torch.bfloat16, **kw)
        assert next(half.model.parameters()).dtype == torch.bfloat16
        cond = half.encode_conditions(PROMPTS)
        x = torch.randn(2, 4, 8, 8)
        with torch.no_grad():
            got = half.denoise(x, 0.8, cond, 3.0)
            want = ref.denoise(x, 0.8, ref.encode_conditions(PROMPTS), 3.0)
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        assert (got - want).abs().mean() < 0.1 * want.abs().mean()
        assert next(half.trainable_copy().parameters()).dtype == torch.float32


def _bottleneck_map(teacher, x, sigma, cond):
    module, to_map = teacher.bottleneck()
    seen = []
    h = module.register_forward_hook(lambda m, a, o: seen.append(to_map(o)))
    try:
        teacher.denoise_raw(x, sigma, cond)
    finally:
        h.remove()
    return seen[-1]


def test_bottleneck_is_the_image_stream_on_the_patch_grid(sd3, flux_dirs):
    """bottleneck() gives a (B, C, h, w) map a conv GAN head reads (the generic hook on the last
    transformer block would see the text stream, or None after SD3's last block)."""
    from stepdistill.algorithms.common import GANHead

    for teacher, grid, width in ((sd3[2], (8, 8), 32), (_flux(flux_dirs, True)[1], (4, 4), 32)):
        student = teacher.trainable_copy()
        x = torch.randn(2, 4, 8, 8, requires_grad=True)
        feat = _bottleneck_map(student, x, torch.full((2,), 1.5), teacher.encode_conditions(PROMPTS))
        assert feat.shape == (2, width, *grid)
        assert GANHead(tuple(feat.shape[1:]))(feat).shape[0] == 2
        feat.pow(2).sum().backward()  # the image stream depends on the input
        assert x.grad is not None and x.grad.abs().sum() > 0


def test_flux_raw_evaluation_is_guidance_one(flux_dirs):
    """denoise_raw (critic losses, students) is the unguided call: guidance input 1, the value a
    DMD2/VSD critic is queried with (guidance_scale=1), whatever the teacher's default scale."""
    _, teacher = _flux(flux_dirs, True, guidance_scale=3.5)
    x = torch.randn(2, 4, 8, 8)
    cond = teacher.encode_conditions(PROMPTS)
    with torch.no_grad():
        raw = teacher.denoise_raw(x, torch.full((2,), 0.9), cond)
        assert torch.allclose(raw, teacher.denoise(x, 0.9, cond, 1.0), atol=1e-6)
        assert not torch.allclose(raw, teacher.denoise(x, 0.9, cond), atol=1e-4)  # default 3.5
