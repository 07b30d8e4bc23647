"""MultiStudentPipeline (MSD export): routing, per-image equality with the training-time students,
batch-split invariance of the noise, and the export round trip through plain diffusers."""

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
from diffusers import DDPMScheduler
from safetensors import safe_open
from torch import nn

from stepdistill.algorithms import build
from stepdistill.algorithms.msd import smaller_copy
from stepdistill.export import ExportError, export_multi_student
from stepdistill.export.common import lcm_scheduler
from stepdistill.pipelines.multi_student import MultiStudentPipeline, StudentBank
from stepdistill.students import Generator
from stepdistill.teachers.diffusion import DiffusersTeacher
from stepdistill.testing import tiny_unet2d

TIMESTEPS = [999, 499]  # two steps: exercises the fresh noise between steps
ROUTE = [0, 2, 1, 1, 0, 2, 1, 0, 2, 1]  # interleaved on purpose (not contiguous ranges)
MIXED = [7, 3, 9, 0, 5, 2, 2, 8, 6, 1, 4, 3]  # shuffled, every student, repeated classes
SOURCE = Path(__file__).resolve().parents[1] / "pipelines" / "multi_student.py"


def _cfg():
    return DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction").config


def _perturb(module: nn.Module, seed: int, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def assert_close_rel(out, ref, tol=1e-5):
    out, ref = torch.as_tensor(out), torch.as_tensor(ref)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    scale = ref.abs().max().clamp(min=1.0)
    err = (out - ref).abs().max()
    assert err <= tol * scale, f"max abs err {float(err):.3g} > {tol:g} * scale {float(scale):.3g}"


def _differs(a, b, tol=1e-3) -> bool:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return bool((a - b).abs().max() > tol * b.abs().max().clamp(min=1.0))


@pytest.fixture(scope="module")
def teacher():
    return DiffusersTeacher(tiny_unet2d(num_classes=10), _cfg(), num_classes=10)


@pytest.fixture(scope="module")
def students(teacher):
    """Three distinguishable students; student 1 is half width (a freshly initialised smaller UNet)."""
    gens = []
    for k in range(3):
        den = smaller_copy(teacher, 0.5) if k == 1 else teacher.trainable_copy()
        gen = Generator(den, TIMESTEPS)
        _perturb(gen.denoiser.model, seed=10 + k)
        gen.requires_grad_(False)
        gens.append(gen)
    assert list(gens[1].denoiser.model.config.block_out_channels) == [8, 16]
    return gens


def _pipe(pipe: MultiStudentPipeline) -> MultiStudentPipeline:
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def exported(students, teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("msd") / "msd-student"
    path = export_multi_student(
        students,
        teacher,
        ROUTE,
        out,
        paper="Song et al., Multi-Student Diffusion Distillation (ICML 2025)",
        metrics={"fid_digits": 9.87},
        extra={"train_steps": 40},
    )
    assert path == out.absolute()
    return path


@pytest.fixture(scope="module")
def pipe(exported, fresh_process):
    p = MultiStudentPipeline.from_pretrained(exported)  # the installed class, no remote code needed
    assert type(p) is MultiStudentPipeline and type(p.students) is StudentBank
    return _pipe(p)


def _reference(students, labels, seeds, route=ROUTE, num_steps=None):
    """Each image through ITS student's training-time Generator, with its own seeded generator."""
    outs = []
    with torch.no_grad():
        for y, s in zip(labels, seeds):
            g = torch.Generator().manual_seed(s)
            z = torch.randn(1, 1, 8, 8, generator=g)
            gen = students[route[y]]
            outs.append(gen(z, {"class_labels": torch.tensor([y])}, num_steps=num_steps, generator=g))
    return torch.cat(outs)


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_every_class_reaches_exactly_its_student(pipe, students):
    calls = []
    hooks = [
        net.register_forward_pre_hook(
            lambda mod, args, kwargs, k=k: calls.append(
                (k, kwargs["class_labels"].tolist(), args[0].shape[0])
            ),
            with_kwargs=True,
        )
        for k, net in enumerate(pipe.students.students)
    ]
    try:
        labels = list(range(10))[::-1]
        out = pipe(class_labels=labels, generator=_gens(range(10)), output_type="latent").images
    finally:
        for h in hooks:
            h.remove()
    # per step: each student runs ONCE, on exactly the images of its classes (in caller order)
    expected = [(k, [y for y in labels if ROUTE[y] == k], ROUTE.count(k)) for k in range(3)]
    assert calls == expected * len(TIMESTEPS)
    assert pipe.route == ROUTE and pipe.classes == [[0, 4, 7], [2, 3, 6, 9], [1, 5, 8]]
    assert [pipe.student_for(y) for y in range(10)] == ROUTE
    # the students are distinguishable: every image matches its own student and no other
    for i, y in enumerate(labels):
        for k in range(3):
            ref = _reference(students, [y], [i], route=[k] * 10)
            if k == ROUTE[y]:
                assert_close_rel(out[i : i + 1], ref)
            else:
                assert _differs(out[i : i + 1], ref), (y, k)


def test_shuffled_mixed_batch_equals_each_images_student(pipe, students):
    seeds = [100 + i for i in range(len(MIXED))]
    out = pipe(class_labels=MIXED, generator=_gens(seeds), output_type="latent").images
    assert_close_rel(out, _reference(students, MIXED, seeds))
    # one step (the first training timestep) with explicit latents
    z = torch.randn(len(MIXED), 1, 8, 8, generator=torch.Generator().manual_seed(0))
    one = pipe(class_labels=MIXED, latents=z, num_inference_steps=1, output_type="latent").images
    with torch.no_grad():
        ref = torch.cat(
            [
                students[ROUTE[y]](z[i : i + 1], {"class_labels": torch.tensor([y])}, num_steps=1)
                for i, y in enumerate(MIXED)
            ]
        )
    assert_close_rel(one, ref)


def test_noise_does_not_depend_on_the_batch_split(pipe):
    seeds = [7 * i + 1 for i in range(len(MIXED))]
    full = pipe(class_labels=MIXED, generator=_gens(seeds), output_type="latent").images
    alone = torch.cat(
        [
            pipe(class_labels=[y], generator=_gens([s]), output_type="latent").images
            for y, s in zip(MIXED, seeds)
        ]
    )
    assert_close_rel(full, alone)
    perm = torch.randperm(len(MIXED), generator=torch.Generator().manual_seed(3)).tolist()
    permuted = pipe(
        class_labels=[MIXED[i] for i in perm], generator=_gens([seeds[i] for i in perm]), output_type="latent"
    ).images
    assert_close_rel(permuted, full[perm])
    # a single generator is deterministic too (draws as OneStepPipeline does for the same batch)
    a = pipe(class_labels=MIXED, generator=torch.Generator().manual_seed(0), output_type="latent").images
    b = pipe(class_labels=MIXED, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert torch.equal(a, b)


def test_output_types_and_call_errors(pipe):
    labels = [1, 0, 2]
    pt = pipe(class_labels=labels, generator=_gens([0, 1, 2]), output_type="pt").images
    assert pt.shape == (3, 1, 8, 8) and float(pt.min()) >= 0 and float(pt.max()) <= 1
    arr = pipe(class_labels=labels, generator=_gens([0, 1, 2]), output_type="np").images
    assert arr.shape == (3, 8, 8, 1) and np.allclose(arr, pt.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    pil = pipe(class_labels=labels, generator=_gens([0, 1, 2])).images
    assert len(pil) == 3 and pil[0].size == (8, 8) and pil[0].mode == "L"
    (images,) = pipe(batch_size=4, return_dict=False, output_type="latent")  # classes 0, 1, 2, 3
    assert images.shape == (4, 1, 8, 8)
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 9\]"):
        pipe(class_labels=[10])  # no null class: every label needs a student
    with pytest.raises(ValueError, match="one per image"):
        pipe(class_labels=[0, 1], generator=_gens([0]))
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe(class_labels=[0, 1], latents=torch.zeros(3, 1, 8, 8))


def test_export_folder_layout_and_card(exported, students):
    index = json.loads((exported / "model_index.json").read_text())
    assert index["_class_name"] == ["multi_student", "MultiStudentPipeline"]
    assert index["students"] == ["multi_student", "StudentBank"]
    assert index["scheduler"] == ["diffusers", "LCMScheduler"]
    assert index["route"] == ROUTE and index["num_classes"] == 10 and index["timesteps"] == TIMESTEPS
    assert (exported / "multi_student.py").read_text() == SOURCE.read_text()
    assert (exported / "students" / "multi_student.py").read_text() == SOURCE.read_text()
    bank_cfg = json.loads((exported / "students" / "config.json").read_text())
    assert [c["block_out_channels"] for c in bank_cfg["student_configs"]] == [[16, 32], [8, 16], [16, 32]]
    sched = json.loads((exported / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_stepdistill_timesteps"] == TIMESTEPS and sched["prediction_type"] == "v_prediction"
    weights = exported / "students" / "diffusion_pytorch_model.safetensors"
    with safe_open(str(weights), "pt") as f:
        keys = set(f.keys())
        for k, gen in enumerate(students):
            for name, value in gen.denoiser.model.state_dict().items():
                assert torch.equal(f.get_tensor(f"students.{k}.{name}"), value), (k, name)
    assert len(keys) == sum(len(g.denoiser.model.state_dict()) for g in students)
    meta = json.loads((exported / "stepdistill.json").read_text())
    assert meta["pipeline"] == "MultiStudentPipeline" and meta["algorithm"] == "msd"
    assert meta["route"] == ROUTE and meta["classes"] == [[0, 4, 7], [2, 3, 6, 9], [1, 5, 8]]
    assert meta["num_students"] == 3 and meta["timesteps"] == TIMESTEPS and meta["ema"] == [False] * 3
    card = (exported / "README.md").read_text()
    for needle in (
        "msd",
        "Song et al., Multi-Student Diffusion Distillation (ICML 2025)",
        "| student | classes | block_out_channels | parameters |",
        "| 1 | 2-3, 6, 9 | [8, 16] |",
        f"`route = {ROUTE}`",
        f'pipe = DiffusionPipeline.from_pretrained("{exported}", trust_remote_code=True)',
        "| fid_digits | 9.87 |",
        '"train_steps": 40',
    ):
        assert needle in card, needle


def test_resave_keeps_folder_self_contained(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "resaved")
    index = json.loads((tmp_path / "resaved" / "model_index.json").read_text())
    assert index["_class_name"] == ["multi_student", "MultiStudentPipeline"]
    assert index["students"] == ["multi_student", "StudentBank"] and index["route"] == ROUTE
    again = _pipe(MultiStudentPipeline.from_pretrained(tmp_path / "resaved"))
    kw = dict(class_labels=MIXED[:5], output_type="latent")
    assert torch.equal(
        again(generator=_gens(range(5)), **kw).images, pipe(generator=_gens(range(5)), **kw).images
    )


FRESH_PROCESS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    torch.set_num_threads(1)
    folder, work = sys.argv[1:3]
    labels = json.loads(sys.argv[3])
    result = {}
    try:
        DiffusionPipeline.from_pretrained(folder)
        result["refused_without_trust"] = False
    except ValueError as e:
        result["refused_without_trust"] = "trust_remote_code" in str(e)

    def gens():
        return [torch.Generator().manual_seed(100 + i) for i in range(len(labels))]

    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    result["class"] = type(pipe).__name__
    result["module"] = type(pipe).__module__
    result["bank"] = type(pipe.students).__name__
    result["route"] = list(pipe.config.route)
    result["num_classes"] = pipe.config.num_classes
    result["timesteps"] = list(pipe.config.timesteps)
    np.save(work + "/remote.npy", pipe(class_labels=labels, generator=gens(), output_type="latent").images.numpy())
    pipe = DiffusionPipeline.from_pretrained(
        folder, custom_pipeline=folder + "/multi_student.py", trust_remote_code=True
    )
    pipe.set_progress_bar_config(disable=True)
    result["custom_class"] = type(pipe).__name__
    np.save(work + "/custom.npy", pipe(class_labels=labels, generator=gens(), output_type="latent").images.numpy())
    result["stepdistill_imported"] = sorted(m for m in sys.modules if m.split(".")[0] == "stepdistill")
    print("RESULT" + json.dumps(result))
    """
)


@pytest.fixture(scope="module")
def fresh_process(exported, tmp_path_factory):
    """Starts the fresh interpreter as soon as the folder exists (``pipe`` depends on this fixture),
    so that its torch + diffusers import (the bulk of its run time) overlaps the in-process tests."""
    work = tmp_path_factory.mktemp("fresh")
    env = dict(os.environ, HF_MODULES_CACHE=str(work / "hf_modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("DIFFUSERS_DISABLE_REMOTE_CODE", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", FRESH_PROCESS_SCRIPT, str(exported), str(work), json.dumps(MIXED)],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    yield proc, work
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_fresh_process_round_trip_with_plain_diffusers(fresh_process, students):
    """A new interpreter that imports only torch + diffusers loads the folder (trust_remote_code and
    custom_pipeline=), reads the route from model_index.json and reproduces every image's student."""
    proc, tmp_path = fresh_process
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    line = next(ln for ln in stdout.splitlines() if ln.startswith("RESULT"))
    result = json.loads(line[len("RESULT") :])
    assert result["stepdistill_imported"] == []
    assert result["refused_without_trust"] is True
    assert result["class"] == "MultiStudentPipeline" and result["module"].startswith("diffusers_modules")
    assert result["bank"] == "StudentBank" and result["custom_class"] == "MultiStudentPipeline"
    assert result["route"] == ROUTE and result["num_classes"] == 10 and result["timesteps"] == TIMESTEPS
    expected = _reference(students, MIXED, [100 + i for i in range(len(MIXED))])
    assert_close_rel(np.load(tmp_path / "remote.npy"), expected)
    assert_close_rel(np.load(tmp_path / "custom.npy"), expected)


def test_msd_distiller_half_width_students_export(teacher, tmp_path):
    msd = build(
        "msd", teacher, {"num_students": 2, "width_multiplier": 0.5, "base_params": {"update_ratio": 2}}
    )
    gens = msd.generator_for_export()
    assert len(gens) == 2 and msd.route == [0] * 5 + [1] * 5
    for k, gen in enumerate(gens):
        assert list(gen.denoiser.model.config.block_out_channels) == [8, 16]
        _perturb(gen.denoiser.model, seed=k)
    out = export_multi_student(gens, teacher, msd.route, tmp_path / "msd2", paper=msd.paper)
    pipe = _pipe(MultiStudentPipeline.from_pretrained(out))
    assert pipe.route == msd.route and pipe.classes == msd.classes
    labels = [9, 0, 4, 5, 2, 7]
    seeds = list(range(len(labels)))
    got = pipe(class_labels=labels, generator=_gens(seeds), output_type="latent").images
    assert_close_rel(got, _reference(gens, labels, seeds, route=msd.route))
    meta = json.loads((out / "stepdistill.json").read_text())
    assert [s["block_out_channels"] for s in meta["students"]] == [[8, 16], [8, 16]]
    full = sum(p.numel() for p in teacher.model.parameters())
    assert all(s["parameters"] < full / 2 for s in meta["students"])


def test_export_with_ema_states(students, teacher, tmp_path):
    net = students[2].denoiser.model
    ema = {f"denoiser.model.{k}": v + 1.0 for k, v in net.state_dict().items()}
    out = export_multi_student(students, teacher, ROUTE, tmp_path / "ema", use_ema_states=[None, None, ema])
    with safe_open(str(out / "students" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        name = next(iter(net.state_dict()))
        assert torch.equal(f.get_tensor(f"students.2.{name}"), net.state_dict()[name] + 1.0)
        assert torch.equal(f.get_tensor(f"students.0.{name}"), students[0].denoiser.model.state_dict()[name])
    assert json.loads((out / "stepdistill.json").read_text())["ema"] == [False, False, True]
    with pytest.raises(ExportError, match="use_ema_states has 1 entries for 3 students"):
        export_multi_student(students, teacher, ROUTE, tmp_path / "ema2", use_ema_states=[ema])


@pytest.mark.parametrize(
    "route,match",
    [
        (ROUTE[:9], "route has 9 entries but the teacher has 10 classes"),
        (ROUTE + [0], "route has 11 entries but the teacher has 10 classes"),
        ([0, 1, 2, 3, 0, 1, 2, 0, 1, 2], r"classes \[3\] have no student"),
        ([0, 1, 2, -1, 0, 1, 2, 0, 1, 2], r"classes \[3\] have no student"),
        ([0, 0, 1, 1, 0, 0, 1, 0, 1, 1], r"students \[2\] serve no class"),
        ([0, 1, 2, 0.5, 0, 1, 2, 0, 1, 2], r"route\[3\] = 0.5 is not a student index"),
        (None, "route must be a list"),
    ],
)
def test_bad_route_is_refused_at_export(students, teacher, tmp_path, route, match):
    out = tmp_path / "bad"
    with pytest.raises(ExportError, match=match):
        export_multi_student(students, teacher, route, out)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_mismatched_students_are_refused(students, teacher, tmp_path):
    one_step = Generator(students[0].denoiser, [999])
    with pytest.raises(ExportError, match="timesteps"):
        export_multi_student([students[0], one_step, students[2]], teacher, ROUTE, tmp_path / "a")
    eps_teacher = DiffusersTeacher(
        tiny_unet2d(num_classes=10), _cfg(), num_classes=10, prediction_type="epsilon"
    )
    with pytest.raises(ExportError, match="prediction type"):
        export_multi_student(
            [students[0], Generator(eps_teacher.trainable_copy(), TIMESTEPS), students[2]],
            teacher,
            ROUTE,
            tmp_path / "b",
        )
    with pytest.raises(ExportError, match="at least one student"):
        export_multi_student([], teacher, ROUTE, tmp_path / "c")
    assert not list(tmp_path.iterdir())


def test_pipeline_rejects_bad_route_directly(students):
    bank = StudentBank.from_unets([g.denoiser.model for g in students])
    sched = lcm_scheduler(_cfg(), "v_prediction", TIMESTEPS)
    with pytest.raises(ValueError, match="only 3 students"):
        MultiStudentPipeline(bank, sched, route=[0, 1, 3])
    with pytest.raises(ValueError, match="num_classes=4 but route has 3 entries"):
        MultiStudentPipeline(bank, sched, route=[0, 1, 2], num_classes=4)
    with pytest.raises(ValueError, match="needs route"):
        MultiStudentPipeline(bank, sched)
    pipe = MultiStudentPipeline(bank, sched, route=[2, 1, 0])
    assert pipe.config.timesteps == TIMESTEPS  # from the scheduler's _stepdistill_timesteps
    assert bank.students[0] is students[0].denoiser.model  # wrapped, not copied


def test_pipeline_file_is_self_contained():
    """multi_student.py is copied next to the weights: it may import only torch/diffusers/numpy/PIL."""
    import ast

    allowed = {
        "__future__",
        "inspect",
        "json",
        "logging",
        "os",
        "shutil",
        "numpy",
        "torch",
        "diffusers",
        "PIL",
    }
    for node in ast.walk(ast.parse(SOURCE.read_text())):
        if isinstance(node, ast.Import):
            roots = {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            roots = {node.module.split(".")[0]}
        else:
            continue
        assert roots <= allowed, roots
