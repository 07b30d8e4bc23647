"""``Distiller.export(output, lora=...)`` (what ``stepdistill export RUN --lora adapter|fused|both``
calls): the mode reaches the exporter for every algorithm, and a mode the student or its pipeline
cannot have is refused with an ``ExportModeError`` (one line, naming the choices) before anything is
written."""

from __future__ import annotations

import pytest
from diffusers import DDPMScheduler

from stepdistill.algorithms import build
from stepdistill.export import ExportModeError
from stepdistill.teachers.diffusion import DiffusersTeacher
from stepdistill.testing import tiny_sd_pipeline_folder, tiny_unet2d

LORA = {"rank": 4, "alpha": 8}


@pytest.fixture(scope="module")
def sd_teacher(tmp_path_factory):
    return DiffusersTeacher.from_pretrained(tiny_sd_pipeline_folder(tmp_path_factory.mktemp("sd")))


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("name, params", [
    ("dmd2", {"generator_timesteps": [899], "generator_lora": LORA}),
    ("disback", {"base": "dmd2", "base_params": {"generator_timesteps": [899], "generator_lora": LORA},
                 "recording_steps": 2, "num_nodes": 1}),
])
def test_distiller_export_forwards_lora(name, params, sd_teacher, tmp_path):
    if name == "disback":
        params = {**params, "nodes_dir": str(tmp_path / "nodes")}
    algo = build(name, sd_teacher, params)
    adapter = algo.export(tmp_path / "adapter", lora="adapter")
    assert "pytorch_lora_weights.safetensors" in _names(adapter) and "unet" not in _names(adapter)
    fused = algo.export(tmp_path / "fused", lora="fused")
    assert "unet" in _names(fused) and "pytorch_lora_weights.safetensors" not in _names(fused)
    for mode in ("both", "auto"):
        both = algo.export(tmp_path / mode, lora=mode)
        assert {"unet", "pytorch_lora_weights.safetensors"} <= set(_names(both))
    assert algo.export(tmp_path / "default").name == "default"  # lora defaults to "auto"
    assert {"unet", "pytorch_lora_weights.safetensors"} <= set(_names(tmp_path / "default"))


def test_modes_a_student_cannot_have_are_refused_before_writing(sd_teacher, tmp_path):
    full = build("dmd2", sd_teacher, {"generator_timesteps": [899]})
    for mode in ("adapter", "both"):
        with pytest.raises(ExportModeError, match=f"lora='{mode}' needs a LoRA student"):
            full.export(tmp_path / mode, lora=mode)
    with pytest.raises(ExportModeError, match="lora must be one of auto, both, adapter, fused, got 'lora'"):
        full.export(tmp_path / "bad", lora="lora")
    assert "unet" in _names(full.export(tmp_path / "fused", lora="fused"))  # a full student: the pipeline
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused"]


def test_pipelines_without_a_lora_loader_take_only_auto_or_fused(tmp_path):
    teacher = DiffusersTeacher(tiny_unet2d(num_classes=10),
                               DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction").config,
                               num_classes=10)
    one = build("dmd2", teacher, {"generator_timesteps": [999]})
    msd = build("msd", teacher, {"num_students": 2, "base_params": {"generator_timesteps": [999]}})
    for algo, what in ((one, "a UNet2DModel student"), (msd, "an MSD run")):
        for mode in ("adapter", "both"):
            with pytest.raises(ExportModeError, match=f"lora='{mode}': {what}.*no LoRA loader"):
                algo.export(tmp_path / "x", lora=mode)
            with pytest.raises(ValueError):  # an ExportModeError is a ValueError too
                algo.export(tmp_path / "x", lora=mode)
        assert (algo.export(tmp_path / f"{algo.name}-fused", lora="fused") / "model_index.json").exists()
    assert not (tmp_path / "x").exists()
