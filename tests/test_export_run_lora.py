"""``stepdistill export RUN --lora adapter|fused|both`` (``run.export_run(..., lora=)``) and
``teacher.params.guidance_embeds`` (a FLUX preset's expectation of its checkpoint)."""

from __future__ import annotations

import json
import shutil

import pytest
from diffusers import FluxPipeline
from test_teachers_sd3_flux import flux_parts  # noqa: I001

from stepdistill.cli import main
from stepdistill.config import ConfigError, load_config
from stepdistill.run import build_teacher
from stepdistill.teachers.diffusion import TeacherLoadError
from stepdistill.testing import tiny_sd_pipeline_folder


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def _train(sd, run, *extra):
    argv = ["train", "sd15/dmd2", "--no-export", f"teacher.path={sd}", "teacher.dtype=float32",
            f"train.output_dir={run}", "train.max_steps=1", "train.batch_size=2", "train.progress=false",
            "train.report_to=null", "train.sample_every_steps=0", "train.mixed_precision=null",
            "train.warmup_steps=0", "train.dataset=prompts:train_300.txt", "algorithm.params.update_ratio=1", *extra]
    assert main(argv) == 0
    return run


def test_export_run_lora_modes(tmp_path, capsys):
    sd = tiny_sd_pipeline_folder(tmp_path / "sd")
    lora_run = _train(sd, tmp_path / "lora-run", "algorithm.params.generator_lora.rank=4")
    assert main(["export", str(lora_run), "--output", str(tmp_path / "adapter"), "--lora", "adapter"]) == 0
    assert "pytorch_lora_weights.safetensors" in _names(tmp_path / "adapter")
    assert "unet" not in _names(tmp_path / "adapter")
    assert main(["export", str(lora_run), "--output", str(tmp_path / "fused"), "--lora", "fused"]) == 0
    assert "unet" in _names(tmp_path / "fused")
    assert "pytorch_lora_weights.safetensors" not in _names(tmp_path / "fused")
    for argv in (["--lora", "both"], []):
        out = tmp_path / f"both{len(argv)}"
        assert main(["export", str(lora_run), "--output", str(out), *argv]) == 0
        assert {"unet", "pytorch_lora_weights.safetensors"} <= set(_names(out))
    with pytest.raises(SystemExit):
        main(["export", str(lora_run), "--output", str(tmp_path / "x"), "--lora", "lora"])
    # a full student has no LoRA weights: one error line, exit code 4 (output family), nothing written
    full_run = _train(sd, tmp_path / "full-run")
    capsys.readouterr()
    assert main(["export", str(full_run), "--output", str(tmp_path / "none"), "--lora", "adapter"]) == 4
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert "lora='adapter' needs a LoRA student" in line
    assert not (tmp_path / "none").exists() and not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def flux_folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flux")
    out = {}
    for g in (True, False):
        FluxPipeline(**flux_parts(tmp, guidance_embeds=g)).save_pretrained(tmp / f"flux{int(g)}")
        out[g] = tmp / f"flux{int(g)}"
    return out


def test_flux_preset_refuses_a_checkpoint_without_the_guidance_embedding(flux_folders, tmp_path):
    cfg = load_config("flux/dmd2_lora")
    assert cfg.teacher.params["guidance_embeds"] is True
    cfg.teacher.dtype = "float32"
    cfg.teacher.path = str(flux_folders[True])
    assert build_teacher(cfg.teacher).embedded_guidance
    cfg.teacher.path = str(flux_folders[False])  # FLUX.1-schnell style: loads, but would run true CFG
    with pytest.raises(TeacherLoadError) as e:
        build_teacher(cfg.teacher)
    msg = str(e.value)
    assert "\n" not in msg and str(flux_folders[False]) in msg
    assert "guidance_embeds=true expects a guidance-distilled FLUX checkpoint" in msg
    assert "time_text_embed.guidance_embedder" in msg and "has no guidance embedding" in msg
    cfg.teacher.params["guidance_embeds"] = False
    cfg.teacher.path = str(flux_folders[True])
    with pytest.raises(TeacherLoadError, match="without a guidance embedding.*has a guidance embedding"):
        build_teacher(cfg.teacher)
    cfg.teacher.params["guidance_embeds"] = "yes"
    with pytest.raises(ConfigError, match="must be true or false"):
        build_teacher(cfg.teacher)
    sd = tiny_sd_pipeline_folder(tmp_path / "sd")
    cfg.teacher.path, cfg.teacher.params["guidance_embeds"] = str(sd), True
    with pytest.raises(ConfigError, match="applies to FLUX teachers.*UNet2DConditionModel"):
        build_teacher(cfg.teacher)
    shutil.rmtree(sd)
    assert json.loads((flux_folders[True] / "transformer" / "config.json").read_text())["guidance_embeds"]
