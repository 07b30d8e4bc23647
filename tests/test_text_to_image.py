"""Code paths of big text-to-image teachers, with a tiny random-weight Stable-Diffusion-like pipeline
(UNet2DConditionModel + CLIPTextModel + tokenizer + VAE) built locally: a few training steps with
classifier-free guidance, export to a stock ``StableDiffusionPipeline``, plain diffusers loads it
and samples in one step, matching the training-time generator."""

from __future__ import annotations

import pytest
import torch

from stepdistill.config import load_config
from stepdistill.run import run_distillation
from stepdistill.testing import tiny_sd_pipeline_folder

PROMPTS = ["a red circle", "a blue square", "a green triangle", "two yellow dots"]


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-sd")
    folder = tiny_sd_pipeline_folder(root)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return folder, prompts


def _cfg(folder, prompts, out, algorithm, params, steps=3):
    return load_config({
        "description": "tiny SD test",
        "teacher": {"kind": "diffusers", "path": str(folder), "guidance_scale": 1.75},
        "algorithm": {"name": algorithm, "params": params},
        "train": {"output_dir": str(out), "dataset": f"prompts:{prompts}", "max_steps": steps, "batch_size": 2,
                  "progress": False, "report_to": None, "sample_every_steps": 0, "checkpoint_every_steps": 100},
    })


@pytest.mark.parametrize(
    "algorithm,params",
    [
        ("dmd2", {"generator_timesteps": [999], "real_guidance_scale": 1.75, "update_ratio": 2}),
        ("vsd", {"generator_timesteps": [999], "guidance_scale": 1.75, "critic": "lora", "lora_rank": 4,
                 "lora_alpha": 4.0, "lora_targets": ["to_q", "to_v"]}),
        ("boot", {"guidance_scale": 1.75, "step_size": 100}),
        ("dmd2", {"generator_timesteps": [999, 749, 499, 249], "real_guidance_scale": 1.75, "update_ratio": 2}),
    ],
)
def test_distil_tiny_sd_and_load_stock_pipeline(tiny_sd, tmp_path, algorithm, params):
    from diffusers import StableDiffusionPipeline

    folder, prompts = tiny_sd
    cfg = _cfg(folder, prompts, tmp_path / algorithm, algorithm, params)
    result = run_distillation(cfg)
    distiller = result["distiller"]
    gen = distiller.generator_for_export()
    # the critic saw guidance: the teacher's real score used CFG (uncond = empty prompt)
    assert distiller.teacher.guidance_scale == 1.75
    pipe = StableDiffusionPipeline.from_pretrained(result["pipeline"])
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn((2, *gen.sample_shape), generator=torch.Generator().manual_seed(0))
    out = pipe(PROMPTS[:2], timesteps=gen.timesteps, guidance_scale=0.0, latents=latents.clone(),
               output_type="latent", generator=torch.Generator().manual_seed(1)).images
    with torch.no_grad():
        cond = distiller.teacher.encode_conditions(PROMPTS[:2])
        expected = gen(latents.clone(), cond, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    images = pipe(PROMPTS[:1], timesteps=gen.timesteps, guidance_scale=0.0, output_type="np").images
    assert images.shape[0] == 1 and images.min() >= 0 and images.max() <= 1
