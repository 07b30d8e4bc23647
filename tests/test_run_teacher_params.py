"""``teacher.params`` of diffusers-folder teachers reach the loader (``stepdistill/run.py``).

* ``offload_frozen: true`` calls :meth:`DiffusersTeacher.offload_frozen_parts`: the frozen text encoder
  and VAE stay in host memory while the trainer moves the task (teacher, generator, critic) to its
  device.  Simulated on a CPU-only machine as ``tests/test_device.py`` does: the built task is moved
  to the ``meta`` device, and the frozen parts must still be on the CPU.
* ``sample_shape: [C, H, W]`` / ``resolution`` (pixels) set the teacher's latent shape.
"""

from __future__ import annotations

import pytest
import torch

from stepdistill.config import ConfigError, load_config
from stepdistill.run import build_run, build_teacher
from stepdistill.testing import tiny_sd_pipeline_folder


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return tiny_sd_pipeline_folder(tmp_path_factory.mktemp("sd"))


def _cfg(sd_dir, **params):
    return load_config({"teacher": {"kind": "diffusers", "path": str(sd_dir), "guidance_scale": 3.0, "params": params},
                        "algorithm": {"name": "dmd2", "params": {"generator_timesteps": [899]}}})


def _devices(module):
    return {p.device.type for p in module.parameters()}


def test_offload_frozen_keeps_encoder_and_vae_on_the_host(sd_dir):
    teacher, d = build_run(_cfg(sd_dir, offload_frozen=True))
    assert getattr(teacher, "offloaded", False)
    d.to("meta")  # what the trainer's .to(accelerator.device) does, on a device that is not the CPU
    assert _devices(teacher.model) == {"meta"}
    for group, net in d.trainable().items():
        assert _devices(net) == {"meta"}, group
    assert _devices(teacher.text_encoder) == {"cpu"}
    assert _devices(teacher.vae) == {"cpu"}


def test_without_offload_the_frozen_parts_follow_the_task(sd_dir):
    teacher, d = build_run(_cfg(sd_dir))
    d.to("meta")
    assert _devices(teacher.text_encoder) == {"meta"} and _devices(teacher.vae) == {"meta"}


def test_offloaded_teacher_still_encodes_and_decodes(sd_dir):
    teacher = build_teacher(_cfg(sd_dir, offload_frozen=True).teacher)
    ref = build_teacher(_cfg(sd_dir).teacher)
    with torch.no_grad():
        got, want = teacher.encode_conditions(["a cat"]), ref.encode_conditions(["a cat"])
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        z = torch.randn(1, *ref.sample_shape, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(teacher.decode(z), ref.decode(z))


def test_sample_shape_reaches_the_teacher(sd_dir):
    assert build_teacher(_cfg(sd_dir).teacher).sample_shape == (4, 8, 8)  # the UNet config's sample_size
    assert build_teacher(_cfg(sd_dir, sample_shape=[4, 16, 12]).teacher).sample_shape == (4, 16, 12)


def test_resolution_gives_the_latent_shape_through_the_vae(sd_dir):
    # the tiny VAE has two levels (downsampling 2) and 4 latent channels
    assert build_teacher(_cfg(sd_dir, resolution=32).teacher).sample_shape == (4, 16, 16)


@pytest.mark.parametrize("params,match", [
    ({"resolution": 33}, "multiple of"),
    ({"resolution": 32, "sample_shape": [4, 16, 16]}, "not both"),
    ({"sample_shape": [4, 16]}, r"\[C, H, W\]"),
    ({"offload_frozen": "yes"}, "true or false"),
    ({"ofload_frozen": True}, "teacher.params.ofload_frozen"),
])
def test_bad_teacher_params_are_named(sd_dir, params, match):
    with pytest.raises(ConfigError, match=match):
        build_teacher(_cfg(sd_dir, **params).teacher)
