"""Memory and compute levers, one config switch each (docs/training.md "Memory and compute levers"):

* ``no_grad_outside_phase`` -- DMD2's generator phase computes no critic weight gradients (the GAN
  term still reaches the generator through the critic); the same generator gradient;
* ``gan_stop_at_bottleneck`` -- the GAN forwards stop at the layer the head reads (no up-blocks),
  the same features and losses; the head reads ``teacher.bottleneck()``, so it works on SD3/FLUX;
* ``gradient_checkpointing`` -- per group, the same losses and gradients;
* ``critic_lora`` -- DMD2's fake score as a LoRA adapter on the teacher's own (shared) base weights;
* the frozen teacher in bfloat16 with float32 trainable copies.
"""

from __future__ import annotations

import pytest
import torch
from test_teachers_sd3_flux import _flux, flux_dirs, sd3  # noqa: F401  (fixtures)
from test_teachers_sdxl import PROMPTS

from stepdistill.algorithms import build
from stepdistill.teachers.diffusion import DiffusersTeacher
from stepdistill.testing import SD_SCHEDULER_CONFIG, tiny_sd_components, tiny_unet2d


def _class_teacher(dtype=torch.float32):
    return DiffusersTeacher(tiny_unet2d(num_classes=10, channels=3).to(dtype), dict(SD_SCHEDULER_CONFIG),
                            num_classes=10, guidance_scale=2.0)


def _sd_teacher(tmp_path, dtype=torch.float32):
    p = tiny_sd_components(tmp_path)
    return DiffusersTeacher(p["unet"].to(dtype), dict(SD_SCHEDULER_CONFIG), text_encoder=p["text_encoder"],
                            tokenizer=p["tokenizer"], vae=p["vae"], guidance_scale=3.0)


def _batch(n=4):
    g = torch.Generator().manual_seed(1)
    return {"raw_cond": torch.arange(n, device="cpu") % 10, "real": torch.rand(n, 3, 8, 8, generator=g) * 2 - 1,
            "batch_size": n}


GAN = {"gan_weight_g": 0.5, "gan_weight_d": 0.5, "generator_timesteps": [899], "update_ratio": 1}


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _generator_step(params, seed=0):
    teacher = _class_teacher()
    torch.manual_seed(seed)
    d = build("dmd2", teacher, params)
    flags = {n: p.requires_grad for n, p in d.named_parameters()}
    torch.manual_seed(seed + 1)
    out = d.loss(_batch(), 0, "generator", {})
    out.loss.backward()
    assert {n: p.requires_grad for n, p in d.named_parameters()} == flags  # restored
    return out, _grads(d.generator), _grads(d.critic_group)


def test_no_gradients_for_the_critic_in_the_generator_phase():
    out_on, gen_on, critic_on = _generator_step({**GAN, "no_grad_outside_phase": True})
    out_off, gen_off, critic_off = _generator_step({**GAN, "no_grad_outside_phase": False})
    assert critic_on == {} and critic_off  # the old behaviour materialised critic weight gradients
    assert "gan_g" in out_on.logs and torch.equal(out_on.loss, out_off.loss)
    assert gen_on.keys() == gen_off.keys()
    for k in gen_on:
        torch.testing.assert_close(gen_on[k], gen_off[k])


def test_freezing_restores_exactly_the_trainable_flags_of_a_lora_critic(tmp_path):
    teacher = _sd_teacher(tmp_path)
    torch.manual_seed(0)
    d = build("dmd2", teacher, {**GAN, "critic_lora": {"rank": 2}})
    before = {n: p.requires_grad for n, p in d.critic.named_parameters()}
    assert any(before.values()) and not all(before.values())
    d.loss({"raw_cond": PROMPTS[:2], "batch_size": 2}, 0, "generator", {}).loss.backward()
    assert {n: p.requires_grad for n, p in d.critic.named_parameters()} == before
    assert all(p.grad is None for p in d.critic_group.parameters())


def _count_calls(module):
    calls = []
    module.register_forward_hook(lambda m, a, o: calls.append(1))
    return calls


def test_gan_forward_stops_at_the_bottleneck():
    feats, losses, grads, ups = {}, {}, {}, {}
    for stop in (True, False):
        teacher = _class_teacher()
        torch.manual_seed(0)
        d = build("dmd2", teacher, {**GAN, "gan_stop_at_bottleneck": stop})
        ups[stop] = _count_calls(d.critic.model.up_blocks[0])
        x = torch.randn(2, 3, 8, 8)
        sigma = teacher.sigmas[torch.tensor([100, 500])]
        before = len(ups[stop])
        feats[stop] = d.features(d.critic, x, sigma, teacher.encode_conditions([1, 2]))
        ups[stop] = len(ups[stop]) - before
        torch.manual_seed(3)
        cache: dict = {}
        d.loss(_batch(), 0, "generator", cache)
        out = d.loss(_batch(), 0, "critic", cache)
        out.loss.backward()
        losses[stop], grads[stop] = out.loss.detach(), _grads(d.critic_group)
    assert ups == {True: 0, False: 1}
    torch.testing.assert_close(feats[True], feats[False])
    torch.testing.assert_close(losses[True], losses[False])
    for k in grads[False]:
        if k in grads[True]:
            torch.testing.assert_close(grads[True][k], grads[False][k])
        else:  # layers after the bottleneck: no gradient from the GAN term, and none from the DSM term
            assert k.startswith("score.")
    # the denoising loss still runs the whole network (the hook acts only for GAN features)
    assert d.critic.denoise_raw(x, sigma, teacher.encode_conditions([1, 2])).shape == x.shape


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_gan_head_runs_on_transformer_teachers(sd3, flux_dirs, family):  # noqa: F811
    """The GAN head reads ``teacher.bottleneck()`` (the image stream on the patch grid): on SD3 it
    failed with 'bottleneck hook did not fire', on FLUX it read the token layout."""
    teacher = sd3[2] if family == "sd3" else _flux(flux_dirs, True, guidance_scale=3.5)[1]
    torch.manual_seed(0)
    d = build("dmd2", teacher, {"gan_weight_g": 0.01, "real_guidance_scale": 3.0})
    image = teacher.decode(torch.zeros(1, *teacher.sample_shape))
    batch = {"raw_cond": PROMPTS[:2], "real": torch.rand(2, *image.shape[1:]) * 2 - 1, "batch_size": 2}
    cache: dict = {}
    for group in ("generator", "critic"):
        out = d.loss(batch, 0, group, cache)
        assert torch.isfinite(out.loss) and ("gan_g" in out.logs or "gan_d" in out.logs)
        out.loss.backward()
    assert any(p.grad is not None for p in d.critic_group["gan_head"].parameters())


def test_gradient_checkpointing_per_group(tmp_path):
    results = {}
    for groups in ([], ["generator", "critic"]):
        teacher = _sd_teacher(tmp_path)
        torch.manual_seed(0)
        d = build("dmd2", teacher, {"generator_timesteps": [899], "update_ratio": 1, "gradient_checkpointing": groups})
        assert d.critic.model.is_gradient_checkpointing == bool(groups)
        assert d.generator.denoiser.model.is_gradient_checkpointing == bool(groups)
        assert not teacher.model.is_gradient_checkpointing
        d.train()
        torch.manual_seed(1)
        cache: dict = {}
        out = []
        for group in ("generator", "critic"):
            o = d.loss({"raw_cond": PROMPTS[:2], "batch_size": 2}, 0, group, cache)
            o.loss.backward()
            out.append(o.loss.detach())
        results[bool(groups)] = (out, _grads(d.generator), _grads(d.critic))
    (l0, g0, c0), (l1, g1, c1) = results[False], results[True]
    for a, b in zip(l0, l1):
        torch.testing.assert_close(a, b)
    for ref, got in ((g0, g1), (c0, c1)):
        assert ref.keys() == got.keys()
        for k in ref:
            torch.testing.assert_close(ref[k], got[k], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="groups"):
        build("dmd2", _sd_teacher(tmp_path), {"gradient_checkpointing": ["fake"]})
    # with the GAN term, whose generator-phase forward runs with the critic frozen: same gradients
    gan = {}
    for groups in ([], ["generator", "critic"]):
        out, gen, critic = _generator_step({**GAN, "gradient_checkpointing": groups})
        gan[bool(groups)] = (out.loss.detach(), gen, critic)
    torch.testing.assert_close(gan[True][0], gan[False][0])
    assert gan[True][2] == {} and gan[True][1].keys() == gan[False][1].keys()
    for k in gan[False][1]:
        torch.testing.assert_close(gan[True][1][k], gan[False][1][k], rtol=1e-4, atol=1e-6)
    for algo in ("vsd", "boot"):
        d = build(algo, _class_teacher(), {"gradient_checkpointing": ["generator"]})
        assert d.generator.denoiser.model.is_gradient_checkpointing


def _unique_bytes(module):
    seen, total = set(), 0
    for p in module.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_critic_shares_the_teachers_base_weights(tmp_path, dtype):
    teacher = _sd_teacher(tmp_path, dtype)
    ref_out = teacher.denoise_raw(torch.ones(1, 4, 8, 8), torch.tensor([1.0]), teacher.encode_conditions(PROMPTS[:1]))
    torch.manual_seed(0)
    full = build("dmd2", teacher, {"generator_timesteps": [899]})
    torch.manual_seed(0)
    d = build("dmd2", teacher, {"generator_timesteps": [899], "critic_lora": {"rank": 4}})
    base = {p.data_ptr() for p in teacher.model.parameters()}
    crit = [(n, p) for n, p in d.critic.model.named_parameters()]
    assert all(p.data_ptr() in base for n, p in crit if "lora_" not in n)  # one copy of the base
    assert all(p.requires_grad == ("lora_" in n) for n, p in crit)
    assert all(p.dtype == torch.float32 for n, p in crit if "lora_" in n)
    # one base copy fewer than a full critic (teacher + generator + adapter vs teacher + generator + critic)
    unet = _unique_bytes(teacher.model)
    assert _unique_bytes(full) - _unique_bytes(d) > 0.9 * unet * (4 if dtype == torch.float32 else 2) / 4
    # the adapter starts at zero: the critic equals the teacher; training it leaves the teacher alone
    cache: dict = {}
    out = d.loss({"raw_cond": PROMPTS[:2], "batch_size": 2}, 0, "critic", cache)
    out.loss.backward()
    grads = [n for n, p in d.critic.model.named_parameters() if p.grad is not None]
    assert grads and all("lora_" in n for n in grads)
    with torch.no_grad():
        for n, p in d.critic.model.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)
    after = teacher.denoise_raw(torch.ones(1, 4, 8, 8), torch.tensor([1.0]), teacher.encode_conditions(PROMPTS[:1]))
    torch.testing.assert_close(after, ref_out)
    gen = d.loss({"raw_cond": PROMPTS[:2], "batch_size": 2}, 0, "generator", {})
    assert torch.isfinite(gen.loss)
    with pytest.raises(ValueError, match="diffusers teacher"):
        from stepdistill.teachers.analytic import GaussianMixtureTeacher

        build("dmd2", GaussianMixtureTeacher.ring(4), {"critic_lora": {"rank": 2}})


def test_bfloat16_teacher_with_float32_trainable_copies(tmp_path):
    teacher = _sd_teacher(tmp_path, torch.bfloat16)
    torch.manual_seed(0)
    d = build("dmd2", teacher, {"generator_timesteps": [899], "update_ratio": 1})
    assert next(teacher.model.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in d.generator.parameters())
    assert all(p.dtype == torch.float32 for p in d.critic.parameters())
    cache: dict = {}
    for group in ("generator", "critic"):
        out = d.loss({"raw_cond": PROMPTS[:2], "batch_size": 2}, 0, group, cache)
        assert torch.isfinite(out.loss) and out.loss.dtype == torch.float32
        out.loss.backward()


def test_offloaded_frozen_parts_stay_in_cpu_memory(tmp_path):
    """``offload_frozen_parts``: the text encoder and VAE leave the module tree (``.to(device)``
    moves only the denoiser) and run on their input's device for one call, then return; results
    equal the resident teacher's."""
    ref = _sd_teacher(tmp_path)
    teacher = _sd_teacher(tmp_path).offload_frozen_parts()
    names = {n.split(".")[0] for n, _ in teacher.named_parameters()}
    assert "text_encoder" not in names and "vae" not in names and "model" in names
    torch.manual_seed(0)
    d = build("dmd2", teacher, {"generator_timesteps": [899], "gan_weight_g": 0.01})
    d.to("meta")  # what the trainer's .to(device) moves
    assert all(p.device.type == "meta" for p in teacher.model.parameters())
    assert all(p.device.type == "cpu" for p in teacher.text_encoder.parameters())
    assert all(p.device.type == "cpu" for p in teacher.vae.parameters())
    teacher = _sd_teacher(tmp_path).offload_frozen_parts()
    seen = []
    teacher.text_encoder.register_forward_hook(lambda m, a, o: seen.append(next(m.parameters()).device))
    c0, c1 = ref.encode_conditions(PROMPTS[:2]), teacher.encode_conditions(PROMPTS[:2])
    torch.testing.assert_close(c0["encoder_hidden_states"], c1["encoder_hidden_states"])
    assert seen and next(teacher.text_encoder.parameters()).device.type == "cpu"
    z = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(ref.decode(z), teacher.decode(z))
    img = torch.rand(2, 3, 16, 16) * 2 - 1
    g0, g1 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    torch.testing.assert_close(ref.encode(img, g0), teacher.encode(img, g1))
    copy = teacher.trainable_copy()  # copies share the offloaded parts
    torch.testing.assert_close(copy.decode(z), ref.decode(z))


def test_levers_under_the_trainer(tmp_path):
    """The generic trainer with every DMD2 lever on (GAN term, frozen critic in the generator
    phase, GAN stopped at the bottleneck, checkpointing, LoRA critic): a regression stage whose
    pairs are made on first use, then DMD steps; both groups move, the teacher does not, the LoRA
    critic's base stays the teacher's, and the sample grid comes out."""
    from stepdistill.config import TrainConfig
    from stepdistill.data.sources import TensorSource
    from stepdistill.training import train

    teacher = DiffusersTeacher(tiny_unet2d(num_classes=10, channels=3, block_out_channels=(16, 32)),
                               dict(SD_SCHEDULER_CONFIG), num_classes=10, guidance_scale=2.0)
    torch.manual_seed(0)
    d = build("dmd2", teacher, {**GAN, "gradient_checkpointing": ["generator", "critic"],
                                "critic_lora": {"rank": 2, "target_modules": ["to_q", "to_v"]},
                                "regression_steps": 1, "regression_pairs": 8, "regression_sampler_steps": 2,
                                "pairs_dir": str(tmp_path / "pairs")})
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    gen0 = [p.detach().clone() for p in d.generator.parameters()]
    lora0 = [p.detach().clone() for n, p in d.critic.model.named_parameters() if "lora_" in n]
    g = torch.Generator().manual_seed(0)
    source = TensorSource(torch.rand(16, 3, 8, 8, generator=g) * 2 - 1, torch.arange(16) % 10)
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=3, batch_size=4, checkpoint_every_steps=0,
                      sample_every_steps=3, num_sample_images=4, report_to=None, progress=False, resume=None)
    result = train(d, source, cfg, sample_fn=lambda step: d.sample_images(4, torch.Generator().manual_seed(0)))
    assert result["step"] == 3 and d.regression_pairs().store.is_complete()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(a, b) for a, b in zip(gen0, d.generator.parameters()))
    lora1 = [p for n, p in d.critic.model.named_parameters() if "lora_" in n]
    assert any(not torch.equal(a, b) for a, b in zip(lora0, lora1))
    base = {p.data_ptr() for p in teacher.model.parameters()}
    assert all(p.data_ptr() in base for n, p in d.critic.model.named_parameters() if "lora_" not in n)
    assert list((tmp_path / "run" / "samples").glob("*.png"))
