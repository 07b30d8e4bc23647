"""Students that a stock diffusers pipeline reproduces are exported to it: a class-conditional pixel
``UNet2DModel`` student at LCM's default timesteps becomes ``ConsistencyModelPipeline`` +
``LCMScheduler``, loads with ``DiffusionPipeline.from_pretrained(folder)`` (no remote code) and
samples exactly the training-time generator; the evaluation harness samples it like the
self-contained ``OneStepPipeline`` folder of the same weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import ConsistencyModelPipeline, DDPMScheduler
from torch import nn

from stepdistill.export import export_generator
from stepdistill.export.class_conditional import stock_pipeline_reproduces
from stepdistill.students import Generator
from stepdistill.teachers.diffusion import DiffusersTeacher
from stepdistill.testing import tiny_unet2d

LABELS = [0, 3, 7, 9]


def _perturb(module: nn.Module, seed: int = 0, scale: float = 0.02) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _close(out, ref, tol=1e-5):
    out, ref = torch.as_tensor(out), torch.as_tensor(ref)
    err = float((out - ref).abs().max())
    assert err <= tol * max(1.0, float(ref.abs().max())), f"max abs err {err:.3g}"


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def teacher():
    cfg = DDPMScheduler(beta_schedule="squaredcos_cap_v2").config
    return DiffusersTeacher(tiny_unet2d(num_classes=10), cfg, num_classes=10, prediction_type="v_prediction")


def _student(teacher, timesteps, seed=0):
    gen = Generator(teacher.trainable_copy(), timesteps)
    _perturb(gen.denoiser.model, seed)
    return gen.eval()


@pytest.fixture(scope="module")
def folders(teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("stock")
    one, four = _student(teacher, [999]), _student(teacher, [999, 749, 499, 249], seed=1)
    return {
        "one": (one, export_generator(one, teacher, root / "one", algorithm="dmd2", metrics={"fid": 1.5})),
        "four": (four, export_generator(four, teacher, root / "four", algorithm="dmd2")),
        "four_own": (four, export_generator(four, teacher, root / "four_own", algorithm="dmd2", stock_pipeline=False)),
    }


def test_stock_folder_layout_and_card(folders):
    for name, timesteps in (("one", [999]), ("four", [999, 749, 499, 249])):
        folder = folders[name][1]
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == "ConsistencyModelPipeline"
        assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"] == ["diffusers", "LCMScheduler"]
        assert not list(folder.rglob("*.py"))  # no code to trust
        sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        assert sched["_stepdistill_timesteps"] == timesteps and sched["_stepdistill_num_classes"] == 10
        assert sched["prediction_type"] == "v_prediction" and sched["clip_sample"] is False
        meta = json.loads((folder / "stepdistill.json").read_text())
        assert meta["pipeline"] == "ConsistencyModelPipeline" and meta["timesteps"] == timesteps
        assert meta["num_classes"] == 10
        card = (folder / "README.md").read_text()
        assert f'pipe = DiffusionPipeline.from_pretrained("{folder}")\n' in card and "trust_remote_code" not in card
        assert f"num_inference_steps={len(timesteps)}" in card and "batch_size=4, class_labels=[0, 1, 2, 3]" in card
    assert "| fid | 1.5 |" in (folders["one"][1] / "README.md").read_text()
    assert json.loads((folders["four_own"][1] / "model_index.json").read_text())["_class_name"] == [
        "one_step", "OneStepPipeline"]


def test_which_students_keep_the_self_contained_pipeline(teacher, tmp_path):
    assert stock_pipeline_reproduces(_student(teacher, [999, 499]), teacher)
    assert not stock_pipeline_reproduces(_student(teacher, [899]), teacher)  # not LCM's 1-step schedule
    assert not stock_pipeline_reproduces(_student(teacher, [999, 500]), teacher)
    uncond = DiffusersTeacher(tiny_unet2d(num_classes=None), DDPMScheduler().config)
    assert not stock_pipeline_reproduces(_student(uncond, [999]), uncond)
    out = export_generator(_student(teacher, [899]), teacher, tmp_path / "t899", algorithm="dmd2")
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == ["one_step", "OneStepPipeline"]


FRESH = textwrap.dedent(
    """
    import io, json, logging, sys
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    torch.set_num_threads(1)
    log = io.StringIO()
    logging.getLogger("diffusers").addHandler(logging.StreamHandler(log))
    one, four, work = sys.argv[1:4]
    labels = [0, 3, 7, 9]
    result = {}
    pipe = DiffusionPipeline.from_pretrained(one)  # no trust_remote_code
    pipe.set_progress_bar_config(disable=True)
    result["class"], result["module"] = type(pipe).__name__, type(pipe).__module__
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    np.save(work + "/one.npy", pipe(batch_size=4, class_labels=labels, generator=gens, output_type="pt").images.numpy())
    pipe = DiffusionPipeline.from_pretrained(four)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=4, class_labels=labels, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
               output_type="pt").images
    np.save(work + "/four.npy", out.numpy())
    result["stepdistill_imported"] = sorted(m for m in sys.modules if m.split(".")[0] == "stepdistill")
    result["log"] = log.getvalue()
    print("RESULT" + json.dumps(result))
    """
)


def test_fresh_process_loads_without_remote_code_and_equals_generator(folders, tmp_path):
    (one, one_dir), (four, four_dir) = folders["one"], folders["four"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", DIFFUSERS_DISABLE_REMOTE_CODE="1")
    proc = subprocess.run([sys.executable, "-c", FRESH, str(one_dir), str(four_dir), str(tmp_path)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))[len("RESULT"):])
    assert result["class"] == "ConsistencyModelPipeline" and result["module"].startswith("diffusers.pipelines")
    assert result["stepdistill_imported"] == [] and "not expected" not in result["log"], result["log"]

    labels = {"class_labels": torch.tensor(LABELS)}
    z = torch.cat([torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)])
    g = torch.Generator().manual_seed(0)
    z4 = torch.randn(4, 1, 8, 8, generator=g)
    with torch.no_grad():
        ref_one = (one(z, labels) / 2 + 0.5).clamp(0, 1)
        ref_four = (four(z4, labels, generator=g) / 2 + 0.5).clamp(0, 1)
    _close(np.load(tmp_path / "one.npy"), ref_one)
    _close(np.load(tmp_path / "four.npy"), ref_four)


def test_eval_samples_stock_folder_like_the_own_pipeline(folders):
    """``stepdistill.eval`` / ``stepdistill sample``: labels i % 10 (not the null class), one generator
    per image, the training-time timesteps: the same images as the OneStepPipeline folder."""
    from stepdistill.eval.generate import load_pipeline, pipeline_num_classes, sample_pipeline

    stock = load_pipeline(folders["four"][1])
    assert type(stock).__name__ == "ConsistencyModelPipeline" and pipeline_num_classes(stock) == 10
    a = sample_pipeline(stock, 12, seed=3, batch_size=5, progress=False)
    b = sample_pipeline(folders["four_own"][1], 12, seed=3, batch_size=12, progress=False)
    assert a.shape == (12, 1, 8, 8) and a.dtype == torch.uint8
    assert torch.equal(a, b)


def test_stock_export_uses_the_ema_weights(teacher, tmp_path):
    gen = _student(teacher, [999])
    ema = {k: v.clone() for k, v in gen.state_dict().items()}
    ema["denoiser.model.conv_out.bias"] += 1.0
    out = export_generator(gen, teacher, tmp_path / "ema", algorithm="dmd2", use_ema_state=ema)
    unet = ConsistencyModelPipeline.from_pretrained(out).unet
    assert torch.equal(unet.conv_out.bias, ema["denoiser.model.conv_out.bias"])
