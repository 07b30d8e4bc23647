"""The paper-scale FLUX preset (configs/flux/dmd2_lora.yaml) on a tiny FLUX.1-dev-shaped folder:
the teacher, guidance through the embedding, the LoRA student with the preset's target modules and
the levers all build from the preset's own sections (only the hub path and dtype swapped)."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline
from test_teachers_sd3_flux import flux_parts  # noqa: I001
from test_teachers_sdxl import PROMPTS


@pytest.fixture(scope="module")
def flux_dev_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flux-dev")
    FluxPipeline(**flux_parts(tmp, guidance_embeds=True)).save_pretrained(tmp / "pipe")
    return tmp / "pipe"


def test_flux_preset_states_the_plan():
    from stepdistill.config import load_config

    cfg = load_config("flux/dmd2_lora")
    assert cfg.teacher.path == "black-forest-labs/FLUX.1-dev" and cfg.teacher.dtype == "bfloat16"
    assert cfg.teacher.guidance_scale == 3.5 and cfg.algorithm.params["real_guidance_scale"] == 3.5
    assert cfg.train.sharding == "fsdp2" and cfg.train.mixed_precision == "bf16"
    assert cfg.algorithm.params["generator_lora"]["rank"] == 64
    for words in ("H200", "H100", "Memory plan", "FID-10k", "guidance embedding"):
        assert words in cfg.description


def test_flux_preset_builds_on_a_tiny_flux_dev_folder(flux_dev_dir):
    from stepdistill.algorithms import build
    from stepdistill.config import load_config
    from stepdistill.run import build_teacher
    from stepdistill.teachers.flow_transformers import FluxTeacher

    cfg = load_config("flux/dmd2_lora")
    cfg.teacher.path = str(flux_dev_dir)
    cfg.teacher.dtype = "float32"
    teacher = build_teacher(cfg.teacher)
    assert isinstance(teacher, FluxTeacher) and teacher.embedded_guidance and teacher.guidance_scale == 3.5
    teacher.sample_shape = (4, 8, 8)  # the tiny folder's latents (the preset's teacher is 1024 px)
    torch.manual_seed(0)
    d = build(cfg.algorithm.name, teacher, dict(cfg.algorithm.params))
    assert list(d.generator.timesteps) == [999, 749, 499, 249]
    net = d.generator.denoiser.model
    lora = {n for n, p in net.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    for target in ("to_q", "add_q_proj", "to_add_out"):  # the joint blocks' text-stream projections too
        assert any(f".{target}.lora_A" in n for n in lora), target
    assert net.x_embedder.weight is teacher.model.x_embedder.weight  # the base is the teacher's tensor
    assert all(m.gradient_checkpointing for m in (net, d.critic.model))
    cache: dict = {}
    for group in ("generator", "critic"):
        out = d.loss({"raw_cond": PROMPTS}, 0, group, cache)
        assert torch.isfinite(out.loss)
        out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
