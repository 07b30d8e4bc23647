"""Export round trips: exported folders load with plain diffusers and reproduce the training-time
generator (DESIGN.md §3 "Export")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from safetensors import safe_open
from torch import nn

import stepdistill.pipelines.one_step as one_step_module
from stepdistill.export import ExportError, export_generator, export_teacher_pipeline
from stepdistill.export import class_conditional as class_conditional_export
from stepdistill.export.common import EXPORT_MARKER, student_network
from stepdistill.pipelines.class_conditional import ClassConditionalPipeline
from stepdistill.pipelines.one_step import OneStepPipeline
from stepdistill.students import Generator
from stepdistill.teachers.analytic import GaussianMixtureTeacher
from stepdistill.teachers.diffusion import DiffusersTeacher
from stepdistill.testing import tiny_sd_pipeline_folder, tiny_unet2d

TIMESTEPS = [999, 749, 499, 249]
LABELS = [0, 3, 7, 9]


def _cfg():
    return DDPMScheduler(beta_schedule="squaredcos_cap_v2").config


def _perturb(module: nn.Module, seed: int = 0, scale: float = 0.02) -> None:
    """Make the student differ from the teacher (as after training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def assert_close_rel(out, ref, tol=1e-5):
    out, ref = torch.as_tensor(out), torch.as_tensor(ref)
    scale = ref.abs().max().clamp(min=1.0)
    err = (out - ref).abs().max()
    assert err <= tol * scale, f"max abs err {float(err):.3g} > {tol:g} * scale {float(scale):.3g}"


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """Tiny models: intra-op threads only add synchronisation cost on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def teacher():
    return DiffusersTeacher(tiny_unet2d(num_classes=10), _cfg(), num_classes=10)


@pytest.fixture(scope="module")
def student(teacher):
    gen = Generator(teacher.trainable_copy(), TIMESTEPS)
    _perturb(gen.denoiser.model)
    return gen


@pytest.fixture(scope="module")
def exported(student, teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "student"
    path = export_generator(
        student,
        teacher,
        out,
        algorithm="dmd2",
        paper="Yin et al., Improved Distribution Matching Distillation (2024)",
        metrics={"fid_digits": 12.3456, "class_accuracy": 0.97},
        extra={"train_steps": 300},
        teacher_name="embedded:digits-unet",
        stock_pipeline=False,  # [999, 749, 499, 249] would be a stock ConsistencyModelPipeline (test_export_stock.py)
    )
    assert path == out.absolute()
    return path


def test_one_step_folder_layout(exported):
    names = {p.name for p in exported.iterdir()}
    assert {"model_index.json", "one_step.py", "README.md", "stepdistill.json", "unet", "scheduler"} <= names
    assert not list(exported.parent.glob("student.tmp-*")) and not list(exported.parent.glob("student.old-*"))
    index = json.loads((exported / "model_index.json").read_text())
    assert index["_class_name"] == ["one_step", "OneStepPipeline"]
    assert index["timesteps"] == TIMESTEPS and index["num_classes"] == 10
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"] == [
        "diffusers",
        "LCMScheduler",
    ]
    sched = json.loads((exported / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "LCMScheduler"
    assert sched["_stepdistill_timesteps"] == TIMESTEPS
    assert sched["clip_sample"] is False and sched["thresholding"] is False
    assert sched["beta_schedule"] == "squaredcos_cap_v2" and sched["prediction_type"] == "epsilon"
    assert "variance_type" not in sched  # DDPM-only keys would warn on every load
    weights = exported / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.exists() and not list(exported.rglob("*.bin"))
    with safe_open(str(weights), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    assert (exported / "one_step.py").read_text() == Path(one_step_module.__file__).read_text()
    meta = json.loads((exported / "stepdistill.json").read_text())
    assert (
        meta["algorithm"] == "dmd2"
        and meta["timesteps"] == TIMESTEPS
        and meta["pipeline"] == "OneStepPipeline"
    )
    assert meta["metrics"] == {"fid_digits": 12.3456, "class_accuracy": 0.97} and meta["extra"] == {
        "train_steps": 300
    }
    assert meta["teacher"] == "embedded:digits-unet" and meta["num_classes"] == 10


def test_model_card(exported):
    card = (exported / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers\n")
    for needle in (
        "dmd2",
        "Yin et al., Improved Distribution Matching Distillation (2024)",
        "`embedded:digits-unet`",
        "`[999, 749, 499, 249]`",
        "| metric | value |",
        "| fid_digits | 12.35 |",
        "| class_accuracy | 0.97 |",
        f'pipe = DiffusionPipeline.from_pretrained("{exported}", trust_remote_code=True)',
        "images = pipe(class_labels=[0, 1, 2, 3], generator=torch.Generator().manual_seed(0)).images",
        '"train_steps": 300',
    ):
        assert needle in card, needle


def test_loaded_pipeline_equals_generator_in_process(exported, student, tmp_path):
    pipe = OneStepPipeline.from_pretrained(exported)  # the installed class; no remote code needed
    assert type(pipe) is OneStepPipeline
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 1, 8, 8, generator=g)
    with torch.no_grad():
        ref = student(z, {"class_labels": torch.tensor(LABELS)}, generator=g)
    out = pipe(class_labels=LABELS, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert_close_rel(out, ref)
    # re-saving keeps the folder self-contained (pipeline file + list-form class name)
    pipe.save_pretrained(tmp_path / "resaved")
    index = json.loads((tmp_path / "resaved" / "model_index.json").read_text())
    assert index["_class_name"] == ["one_step", "OneStepPipeline"] and index["timesteps"] == TIMESTEPS
    assert (tmp_path / "resaved" / "one_step.py").read_text() == (exported / "one_step.py").read_text()
    again = OneStepPipeline.from_pretrained(tmp_path / "resaved")
    again.set_progress_bar_config(disable=True)
    assert torch.equal(
        again(class_labels=LABELS, generator=torch.Generator().manual_seed(1), output_type="latent").images,
        pipe(class_labels=LABELS, generator=torch.Generator().manual_seed(1), output_type="latent").images,
    )


FRESH_PROCESS_SCRIPT = textwrap.dedent(
    """
    import io, json, logging, sys
    import numpy as np
    import torch
    import diffusers
    from diffusers import DiffusionPipeline

    torch.set_num_threads(1)
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    logging.getLogger("diffusers").addHandler(handler)
    student, teacher, work = sys.argv[1:4]
    result = {}

    try:  # list-form _class_name: custom code needs trust_remote_code
        DiffusionPipeline.from_pretrained(student)
        result["refused_without_trust"] = False
    except ValueError as e:
        result["refused_without_trust"] = "trust_remote_code" in str(e)

    z = torch.from_numpy(np.load(work + "/z.npy"))
    labels = [0, 3, 7, 9]
    pipe = DiffusionPipeline.from_pretrained(student, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    result["class"] = type(pipe).__name__
    result["module"] = type(pipe).__module__
    out = pipe(class_labels=labels, latents=z, generator=torch.Generator().manual_seed(5), output_type="latent").images
    np.save(work + "/remote.npy", out.numpy())
    out = pipe(class_labels=labels, generator=torch.Generator().manual_seed(0), output_type="latent").images
    np.save(work + "/remote_seeded.npy", out.numpy())

    pipe = DiffusionPipeline.from_pretrained(student, custom_pipeline=student + "/one_step.py", trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    result["custom_class"] = type(pipe).__name__
    out = pipe(class_labels=labels, latents=z, generator=torch.Generator().manual_seed(5), output_type="latent").images
    np.save(work + "/custom.npy", out.numpy())

    tpipe = DiffusionPipeline.from_pretrained(teacher, trust_remote_code=True)
    tpipe.set_progress_bar_config(disable=True)
    result["teacher_class"] = type(tpipe).__name__
    result["teacher_num_classes"] = tpipe.config.num_classes
    out = tpipe(class_labels=labels, latents=z, num_inference_steps=5, guidance_scale=2.0, output_type="latent").images
    np.save(work + "/teacher.npy", out.numpy())

    result["stepdistill_imported"] = sorted(m for m in sys.modules if m.split(".")[0] == "stepdistill")
    result["log"] = log.getvalue()
    print("RESULT" + json.dumps(result))
    """
)


def test_fresh_process_loads_with_plain_diffusers(exported, student, teacher, tmp_path):
    """A new interpreter that imports only torch/diffusers loads both folders (trust_remote_code and
    custom_pipeline=) and reproduces the generator / teacher sampler."""
    teacher_dir = export_teacher_pipeline(
        teacher.model, teacher.make_scheduler("ddim"), 10, tmp_path / "teacher"
    )
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    np.save(tmp_path / "z.npy", z.numpy())
    labels = torch.tensor(LABELS)
    with torch.no_grad():
        expected = student(z, {"class_labels": labels}, generator=torch.Generator().manual_seed(5))
        g = torch.Generator().manual_seed(0)
        z0 = torch.randn(4, 1, 8, 8, generator=g)
        expected_seeded = student(z0, {"class_labels": labels}, generator=g)
    expected_teacher = teacher.sample(
        cond={"class_labels": labels}, noise=z, num_steps=5, sampler="ddim", guidance_scale=2.0
    )

    env = dict(
        os.environ, HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"
    )
    env.pop("DIFFUSERS_DISABLE_REMOTE_CODE", None)
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS_SCRIPT, str(exported), str(teacher_dir), str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    result = json.loads(line[len("RESULT") :])
    assert result["stepdistill_imported"] == []
    assert result["refused_without_trust"] is True
    assert result["class"] == "OneStepPipeline" and result["module"].startswith("diffusers_modules")
    assert result["custom_class"] == "OneStepPipeline"
    assert result["teacher_class"] == "ClassConditionalPipeline" and result["teacher_num_classes"] == 10
    assert "not expected" not in result["log"], result["log"]  # configs load without warnings
    assert_close_rel(np.load(tmp_path / "remote.npy"), expected)
    assert_close_rel(np.load(tmp_path / "remote_seeded.npy"), expected_seeded)
    assert_close_rel(np.load(tmp_path / "custom.npy"), expected)
    assert_close_rel(np.load(tmp_path / "teacher.npy"), expected_teacher)


def test_teacher_pipeline_folder(teacher, tmp_path):
    out = export_teacher_pipeline(teacher.model, teacher.make_scheduler("ddpm"), 10, tmp_path / "teacher")
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == ["class_conditional", "ClassConditionalPipeline"]
    assert index["num_classes"] == 10
    assert (out / "class_conditional.py").exists() and (out / "README.md").exists()
    loaded = DiffusersTeacher.from_pretrained(out)  # the package's own teacher loader reads it
    assert loaded.num_classes == 10 and loaded.prediction_type == "epsilon"
    assert torch.equal(loaded.sigmas, teacher.sigmas)
    for (name, a), (_, b) in zip(teacher.model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), name
    pipe = ClassConditionalPipeline.from_pretrained(out)  # the installed class, no remote code
    assert type(pipe) is ClassConditionalPipeline and pipe.config.num_classes == 10
    assert type(pipe.scheduler).__name__ == "DDPMScheduler"
    pipe.set_progress_bar_config(disable=True)
    cond = {"class_labels": torch.tensor(LABELS)}
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = loaded.sample(
        cond=cond,
        noise=z,
        num_steps=4,
        sampler="ddpm",
        guidance_scale=1.5,
        generator=torch.Generator().manual_seed(1),
    )
    got = pipe(
        class_labels=LABELS,
        latents=z,
        num_inference_steps=4,
        guidance_scale=1.5,
        generator=torch.Generator().manual_seed(1),
        output_type="latent",
    )
    assert_close_rel(got.images, ref)
    with pytest.raises(ExportError, match="num_class_embeds"):
        export_teacher_pipeline(teacher.model, teacher.make_scheduler("ddpm"), 9, tmp_path / "bad")


@pytest.mark.parametrize("timesteps", [[899], [999, 749, 499, 249]])
def test_stable_diffusion_student_exports_as_stock_pipeline(tmp_path, timesteps):
    sd_dir = tiny_sd_pipeline_folder(tmp_path)
    teacher = DiffusersTeacher.from_pretrained(sd_dir)
    gen = Generator(teacher.trainable_copy(), timesteps)
    _perturb(gen.denoiser.model, seed=1)
    out = export_generator(gen, teacher, tmp_path / "sd-student", algorithm="dmd2", paper="DMD2")

    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["_stepdistill_timesteps"] == timesteps
    assert not (out / "one_step.py").exists()
    card = (out / "README.md").read_text()
    t_list = ", ".join(map(str, timesteps))
    assert f'pipe = StableDiffusionPipeline.from_pretrained("{out}")' in card
    assert f"num_inference_steps={len(timesteps)}, timesteps=[{t_list}], guidance_scale=0.0" in card

    pipe = StableDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    assert pipe.scheduler.config["_stepdistill_timesteps"] == timesteps
    prompts = ["a photo of a cat", "the lower dog"]
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = gen(z, teacher.encode_conditions(prompts), generator=torch.Generator().manual_seed(5))
    lat = pipe(
        prompts,
        num_inference_steps=len(timesteps),
        timesteps=timesteps,
        guidance_scale=0.0,
        latents=z,
        generator=torch.Generator().manual_seed(5),
        output_type="latent",
    ).images
    assert_close_rel(lat, ref)
    # the exported UNet is the student, not the teacher
    with torch.no_grad():
        teacher_x0 = Generator(teacher, timesteps)(
            z, teacher.encode_conditions(prompts), generator=torch.Generator().manual_seed(5)
        )
    assert (lat - teacher_x0).abs().max() > 1e-3
    images = pipe(
        prompts[0], num_inference_steps=1, timesteps=timesteps[:1], guidance_scale=0.0, output_type="np"
    ).images
    assert images.shape == (1, 16, 16, 3)


def test_latent_unet2d_student_with_vae(tmp_path):
    """A UNet2DModel student of a latent teacher: OneStepPipeline carries the teacher's VAE."""
    from stepdistill.testing import tiny_sd_components

    vae = tiny_sd_components(tmp_path)["vae"]
    teacher = DiffusersTeacher(tiny_unet2d(num_classes=None, channels=4), _cfg(), vae=vae)
    gen = Generator(teacher.trainable_copy(), [899])
    out = export_generator(gen, teacher, tmp_path / "latent", algorithm="dmd2")
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").exists()
    pipe = OneStepPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x0 = gen(z, None)
        ref = (teacher.decode(x0) / 2 + 0.5).clamp(0, 1)
    assert_close_rel(pipe(batch_size=2, latents=z, output_type="latent").images, x0)
    pt = pipe(batch_size=2, latents=z, output_type="pt").images
    assert pt.shape == (2, 3, 16, 16)
    assert torch.allclose(pt, ref, atol=1e-5)


def test_atomic_write_and_overwrite(student, teacher, tmp_path):
    out = tmp_path / "folder"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_generator(student, teacher, out, algorithm="dmd2")
    assert (out / "keep.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == [
        "folder"
    ]
    # overwrite=True replaces only a folder an export wrote (issue 17): this one is not
    with pytest.raises(FileExistsError, match="not a folder written by a stepdistill export"):
        export_generator(student, teacher, out, algorithm="dmd2", overwrite=True)
    assert (out / "keep.txt").read_text() == "old"
    (out / EXPORT_MARKER).write_text("{}")  # from here on: an earlier export

    # a failure while building leaves the existing folder untouched and no scratch folder behind
    def boom(*a, **k):
        raise RuntimeError("disk full")

    orig = class_conditional_export.write_metadata
    class_conditional_export.write_metadata = boom
    try:
        with pytest.raises(RuntimeError, match="disk full"):
            export_generator(student, teacher, out, algorithm="dmd2", overwrite=True)
    finally:
        class_conditional_export.write_metadata = orig
    assert (out / "keep.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == [
        "folder"
    ]

    export_generator(student, teacher, out, algorithm="dmd2", overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model_index.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]
    # an existing empty folder is fine without overwrite
    empty = tmp_path / "empty"
    empty.mkdir()
    export_generator(student, teacher, empty, algorithm="dmd2")
    assert (empty / "model_index.json").exists()


def test_ema_state_is_exported(student, teacher, tmp_path):
    # the training loop hands over the generator group's state dict (denoiser buffers included)
    ema = {k: v.clone() for k, v in student.state_dict().items()}
    assert "denoiser.sigmas" in ema
    ema["denoiser.model.conv_out.bias"] += 1.0
    out = export_generator(student, teacher, tmp_path / "ema", algorithm="dmd2", use_ema_state=ema,
                           stock_pipeline=False)
    loaded = OneStepPipeline.from_pretrained(out).unet
    assert torch.equal(loaded.conv_out.bias, ema["denoiser.model.conv_out.bias"])
    # a plain network state dict works too
    plain = {k: v.clone() for k, v in student.denoiser.model.state_dict().items()}
    plain["conv_in.bias"] += 2.0
    out2 = export_generator(student, teacher, tmp_path / "ema2", algorithm="dmd2", use_ema_state=plain,
                            stock_pipeline=False)
    assert torch.equal(OneStepPipeline.from_pretrained(out2).unet.conv_in.bias, plain["conv_in.bias"])
    assert not torch.equal(
        student.denoiser.model.conv_out.bias, ema["denoiser.model.conv_out.bias"]
    )  # live weights untouched
    assert json.loads((out / "stepdistill.json").read_text())["ema"] is True
    with pytest.raises(ExportError, match="missing keys"):
        export_generator(
            student, teacher, tmp_path / "bad", algorithm="dmd2", use_ema_state={"nope": torch.zeros(1)}
        )
    assert not (tmp_path / "bad").exists()


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)

    def forward(self, x, timestep=None, return_dict=False, **kw):
        return (self.conv(x),)


def test_unsupported_students_raise_clear_errors(tmp_path):
    gmm = GaussianMixtureTeacher.ring(4)
    with pytest.raises(NotImplementedError, match="UNet2DModel"):
        export_generator(Generator(gmm, [10], boundary="none"), gmm, tmp_path / "a", algorithm="dmd2")
    flow = DiffusersTeacher(tiny_unet2d(), {"_class_name": "FlowMatchEulerDiscreteScheduler"}, num_classes=10)
    assert flow.prediction_type == "flow"
    with pytest.raises(NotImplementedError, match="flow"):
        export_generator(Generator(flow, [500]), flow, tmp_path / "b", algorithm="dmd2")
    other = DiffusersTeacher(_Net(), _cfg(), sample_shape=(1, 8, 8))
    with pytest.raises(NotImplementedError, match="cannot export a _Net student.*UNet2DConditionModel"):
        export_generator(Generator(other, [899]), other, tmp_path / "c", algorithm="dmd2")
    assert not any(tmp_path.iterdir())


def test_lora_student_and_linear_schedule(tmp_path):
    """LoRA adapters are merged into a stock UNet; an in-memory linear DDPM config (whose
    `_use_default_values` would make LCMScheduler fall back to *its* beta defaults) keeps the
    teacher's betas."""
    peft = pytest.importorskip("peft")
    teacher = DiffusersTeacher(
        tiny_unet2d(num_classes=10), DDPMScheduler(beta_schedule="linear").config, num_classes=10
    )
    gen = Generator(teacher.trainable_copy(), [899])
    lora = peft.LoraConfig(r=4, target_modules=["conv1", "conv2"], init_lora_weights=False)
    gen.denoiser.model = peft.inject_adapter_in_model(lora, gen.denoiser.model)
    assert any("lora" in k for k in gen.denoiser.model.state_dict())
    out = export_generator(gen, teacher, tmp_path / "lora", algorithm="dmd2")
    assert any("lora" in k for k in gen.denoiser.model.state_dict())  # the live student keeps its adapters
    pipe = OneStepPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert not any("lora" in k for k in pipe.unet.state_dict())
    assert torch.equal(pipe.scheduler.alphas_cumprod, teacher.alphas_cumprod)
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = gen(z, {"class_labels": torch.tensor([1, 2])})
    assert_close_rel(pipe(class_labels=[1, 2], latents=z, output_type="latent").images, ref)

    # diffusers' add_adapter on a UNet2DConditionModel is merged the same way
    from stepdistill.testing import tiny_sd_components

    unet = tiny_sd_components(tmp_path)["unet"]
    unet.add_adapter(peft.LoraConfig(r=2, target_modules=["to_q", "to_k"], init_lora_weights=False))
    fake = Generator(DiffusersTeacher(unet, DDPMScheduler().config, sample_shape=(4, 8, 8)), [899])
    merged = student_network(fake, None)
    assert merged is not unet and not any("lora" in k for k in merged.state_dict())
    x, hidden = torch.randn(1, 4, 8, 8), torch.randn(1, 16, 32)
    with torch.no_grad():
        assert torch.allclose(merged(x, 10, hidden).sample, unet(x, 10, hidden).sample, atol=1e-5)


def test_eval_samples_an_exported_student_with_its_recorded_call(tmp_path, monkeypatch):
    """`stepdistill eval` / `sample` on a stock SD student folder run the recorded call (timesteps,
    guidance 0), not StableDiffusionPipeline's defaults (CFG 7.5, 50 steps); an explicit value wins."""
    import functools

    from stepdistill.eval.generate import iter_sample_pipeline

    sd_dir = tiny_sd_pipeline_folder(tmp_path)
    teacher = DiffusersTeacher.from_pretrained(sd_dir)
    gen = Generator(teacher.trainable_copy(), [899])
    out = export_generator(gen, teacher, tmp_path / "sd-student", algorithm="dmd2", paper="DMD2")
    pipe = StableDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    real = type(pipe).__call__

    @functools.wraps(real)  # keeps the signature the sampler inspects
    def spy(self, *args, **kwargs):
        seen.append({k: v for k, v in kwargs.items() if k not in ("generator", "prompt")})
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", spy)
    list(iter_sample_pipeline(pipe, 2, batch_size=2, prompts=["a cat", "a dog"], progress=False))
    assert seen[-1]["guidance_scale"] == 0.0 and seen[-1]["timesteps"] == [899]
    assert "num_inference_steps" not in seen[-1]
    list(iter_sample_pipeline(pipe, 2, batch_size=2, prompts=["a cat", "a dog"], progress=False,
                              guidance_scale=2.0, num_inference_steps=2))
    assert seen[-1]["guidance_scale"] == 2.0 and seen[-1]["num_inference_steps"] == 2 and "timesteps" not in seen[-1]


def _user_lora(pipe, folder):
    """A user's LoRA as diffusers' training scripts save it: UNet and text-encoder adapters (peft
    injected into copies, so ``pipe`` stays plain)."""
    import copy

    import peft
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    layers = {}
    for part, targets in (("unet", ["to_k", "to_v"]), ("text_encoder", ["q_proj", "v_proj"])):
        net = peft.inject_adapter_in_model(
            peft.LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=targets),
            copy.deepcopy(getattr(pipe, part)))
        layers[f"{part}_lora_layers"] = get_peft_model_state_dict(net)
    StableDiffusionPipeline.save_lora_weights(folder, safe_serialization=True, **layers)
    return Path(folder) / "pytorch_lora_weights.safetensors"


def test_lora_keys_check_text_encoder_layers_and_widths(tmp_path):
    """A user's LoRA that also adapts the text encoder is accepted (its text_encoder.* keys are checked
    against the text encoder, not refused for lacking the unet. prefix); a LoRA with the right layer
    names but other widths (an SD 1.x LoRA on SD 2.x: cross-attention 768 vs 1024) is refused in one
    line naming the layer and both widths, before diffusers fails on a size mismatch."""
    from safetensors.torch import load_file, save_file

    from stepdistill.export import check_lora_keys, load_lora

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_pipeline_folder(tmp_path / "sd"))
    file = _user_lora(pipe, tmp_path / "user")
    state = load_file(file)
    assert any(k.startswith("text_encoder.") for k in state) and any(k.startswith("unet.") for k in state)
    adapted = check_lora_keys(pipe, tmp_path / "user")
    assert adapted and all(m.endswith(("to_k", "to_v")) for m in adapted)  # the denoiser's layers
    load_lora(pipe, tmp_path / "user")  # and diffusers loads it
    pipe.unload_lora_weights()

    key = next(k for k in state if "attn2.to_k.lora_A" in k)  # cross-attention: reads the text width (32)
    wide = dict(state, **{key: torch.zeros(state[key].shape[0], 768)})
    (tmp_path / "wide").mkdir()
    save_file(wide, str(tmp_path / "wide" / "pytorch_lora_weights.safetensors"))
    with pytest.raises(ExportError) as err:
        check_lora_keys(pipe, tmp_path / "wide")
    msg = str(err.value)
    assert "\n" not in msg and key in msg and "reads 768 features but the layer takes 32" in msg
    assert "another model size" in msg
    up = next(k for k in state if "lora_B" in k and k.startswith("text_encoder."))
    (tmp_path / "up").mkdir()
    save_file(dict(state, **{up: torch.zeros(7, state[up].shape[1])}), str(tmp_path / "up" / "pytorch_lora_weights.safetensors"))
    with pytest.raises(ExportError, match="up matrix writes 7 features"):
        check_lora_keys(pipe, tmp_path / "up")
    bogus = dict(state, **{"vae.decoder.conv_in.lora_A.weight": torch.zeros(2, 4)})
    (tmp_path / "vae").mkdir()
    save_file(bogus, str(tmp_path / "vae" / "pytorch_lora_weights.safetensors"))
    with pytest.raises(ExportError, match="lack the 'unet.' prefix"):
        check_lora_keys(pipe, tmp_path / "vae")
