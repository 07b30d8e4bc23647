"""MSD over DiT teachers (issue #16): class-routed DiT students train, export as one
``MultiStudentPipeline`` folder, load in a fresh process with plain diffusers (``trust_remote_code``
and ``custom_pipeline=``) and equal the training-time students to 1e-5 for the same noise; the
trainable copies (full-width and smaller students, their critics) never drop class labels.

The pipeline must call a DiT with ``timestep=`` / ``class_labels=`` keywords: ``Transformer2DModel``'s
second positional argument is ``encoder_hidden_states``, not the timestep.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel, Transformer2DModel
from test_teachers_sdxl import tiny_vae

from stepdistill.algorithms import build
from stepdistill.teachers.diffusion import DiffusersTeacher

LABELS = [7, 3, 9, 0, 5, 2, 2, 8, 6, 1]  # shuffled: both students, repeated classes


def _dit(cls, seed=0, heads=2):
    torch.manual_seed(seed)
    return cls(
        norm_type="ada_norm_zero", num_embeds_ada_norm=10, patch_size=2, sample_size=8, in_channels=4,
        out_channels=8, num_layers=1, attention_head_dim=8, num_attention_heads=heads,
    ).eval()


def _teacher(cls, vae=True):
    return DiffusersTeacher(_dit(cls), dict(DDPMScheduler().config), num_classes=10,
                            vae=tiny_vae() if vae else None, guidance_scale=1.0)


def _label_embedders(net):
    return [m for m in net.modules() if type(m).__name__ == "LabelEmbedding"]


def _train(msd, steps=2, n=8):
    """A few steps in the trainer's order (per-step hook, then each phase group's loss/backward/AdamW)."""
    opts = {g: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
            for g, m in msd.trainable().items()}
    for step in range(steps):
        msd.on_step_begin(step, True)
        cache: dict = {}
        batch = {"raw_cond": torch.arange(n) % 10, "batch_size": n}
        for group in msd.phase(step):
            out = msd.loss(batch, step, group, cache)
            assert torch.isfinite(out.loss), group
            out.loss.backward()
            opts[group].step()
            opts[group].zero_grad(set_to_none=True)
    return msd


PLANS = {
    # Transformer2DModel (the class DiT-XL/2 folders name) in latent space, 2 steps (fresh noise between)
    "latent-2step": (Transformer2DModel, True, [749, 499], 1.0),
    # DiTTransformer2DModel in pixel space, 1 step, half-width students (epsilon DiT: 749, not 999)
    "pixel-half": (DiTTransformer2DModel, False, [749], 0.5),
}


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("msd-dit")
    out = {}
    for name, (cls, vae, timesteps, width) in PLANS.items():
        teacher = _teacher(cls, vae)
        torch.manual_seed(0)
        msd = build("msd", teacher, {
            "num_students": 2, "width_multiplier": width,
            "base_params": {"generator_timesteps": timesteps, "update_ratio": 1, "real_guidance_scale": 2.0},
        })
        _train(msd)
        gens = [g.eval() for g in msd.generator_for_export()]
        folder = msd.export(tmp / name)
        refs = []
        with torch.no_grad():
            for i, y in enumerate(LABELS):
                g = torch.Generator().manual_seed(100 + i)
                z = torch.randn((1, *teacher.sample_shape), generator=g)
                refs.append(gens[msd.route[y]](z, teacher.encode_conditions(torch.tensor([y])), generator=g))
        out[name] = dict(folder=str(folder), msd=msd, teacher=teacher, ref=torch.cat(refs).numpy())
    return out


FRESH = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    torch.set_num_threads(1)
    work, labels, folders = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    result = {}
    for name, folder in folders.items():
        gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(len(labels))]
        pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        np.save(f"{work}/{name}-remote.npy", pipe(class_labels=labels, generator=gens(), output_type="latent").images.numpy())
        img = pipe(class_labels=labels[:2], generator=gens()[:2], output_type="np").images
        custom = DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder + "/multi_student.py",
                                                   trust_remote_code=True)
        custom.set_progress_bar_config(disable=True)
        np.save(f"{work}/{name}-custom.npy", custom(class_labels=labels, generator=gens(), output_type="latent").images.numpy())
        result[name] = {"class": type(pipe).__name__, "bank": type(pipe.students).__name__,
                        "nets": [type(s).__name__ for s in pipe.students.students], "image_shape": list(img.shape)}
    result["stepdistill_imported"] = sorted(m for m in sys.modules if m.split(".")[0] == "stepdistill")
    print("RESULT" + json.dumps(result))
    """
)


def _assert_close_rel(out, ref, tol=1e-5):
    out, ref = np.asarray(out), np.asarray(ref)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(out - ref).max())
    assert err <= tol * scale, f"max abs err {err:.3g} > {tol:g} * {scale:.3g}"


def test_msd_dit_export_equals_the_students_in_a_fresh_process(cases, tmp_path):
    folders = {name: c["folder"] for name, c in cases.items()}
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("DIFFUSERS_DISABLE_REMOTE_CODE", None)
    proc = subprocess.run([sys.executable, "-c", FRESH, str(tmp_path), json.dumps(LABELS), json.dumps(folders)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))[len("RESULT"):])
    assert result.pop("stepdistill_imported") == []
    for name, (_, vae, _, _) in PLANS.items():
        r = result[name]
        assert r["class"] == "MultiStudentPipeline" and r["bank"] == "StudentBank"
        # diffusers maps a Transformer2DModel config with ada_norm_zero onto DiTTransformer2DModel
        assert r["nets"] == ["DiTTransformer2DModel"] * 2
        assert r["image_shape"] == ([2, 16, 16, 3] if vae else [2, 8, 8, 4])
        _assert_close_rel(np.load(tmp_path / f"{name}-remote.npy"), cases[name]["ref"])
        _assert_close_rel(np.load(tmp_path / f"{name}-custom.npy"), cases[name]["ref"])


def test_msd_dit_export_records_the_students(cases):
    for name, (cls, _, timesteps, width) in PLANS.items():
        folder, msd, teacher = cases[name]["folder"], cases[name]["msd"], cases[name]["teacher"]
        meta = json.loads(open(f"{folder}/stepdistill.json").read())
        assert meta["student_class"] == cls.__name__ and meta["route"] == msd.route
        assert meta["timestep_indices"] == timesteps
        full = sum(p.numel() for p in teacher.model.parameters())
        for s in meta["students"]:
            assert (s["parameters"] < full) == (width < 1)
            assert s["num_attention_heads"] == int(2 * width)
        index = json.loads(open(f"{folder}/model_index.json").read())
        assert index["students"] == ["multi_student", "StudentBank"]
        assert (index.get("vae", [None])[0] is not None) == (name == "latent-2step")


@pytest.mark.parametrize("width", [1.0, 0.5])
@pytest.mark.parametrize("cls", [Transformer2DModel, DiTTransformer2DModel])
def test_dit_msd_trainable_copies_keep_every_label(cls, width):
    """Students and critics (full-width copies, freshly built smaller students) are in train mode
    with diffusers' 10% label dropout off: a train-mode forward equals the eval-mode one."""
    teacher = _teacher(cls, vae=False)
    msd = build("msd", teacher, {"num_students": 2, "width_multiplier": width,
                                 "base_params": {"generator_timesteps": [749], "update_ratio": 1}})
    x = torch.randn(64, 4, 8, 8)
    cond = {"class_labels": torch.arange(64) % 10}
    for s in msd.students:
        for den in (s.generator.denoiser, s.critic):
            emb = _label_embedders(den.model)
            assert emb and all(m.dropout_prob == 0 for m in emb)
            assert den.model.training
            assert den.model.config.num_attention_heads == int(2 * width)
            with torch.no_grad():
                torch.manual_seed(0)
                train = den.denoise(x, 2.0, cond)
                den.model.eval()
                ref = den.denoise(x, 2.0, cond)
                den.model.train()
            assert torch.allclose(train, ref, atol=1e-6)


def test_imagenet_msd_dit_preset_builds_on_a_tiny_dit_folder(tmp_path):
    """configs/imagenet/msd_dit.yaml with its hub path swapped for a tiny DiTPipeline folder: the
    teacher loads, the generator timestep is one an epsilon DiT accepts (999 is refused: alpha_bar
    4e-5), and the four students build."""
    from diffusers import DiTPipeline

    from stepdistill.config import load_config
    from stepdistill.run import build_teacher

    DiTPipeline(transformer=_dit(Transformer2DModel), vae=tiny_vae(), scheduler=DDPMScheduler()).save_pretrained(
        tmp_path / "dit")
    cfg = load_config("imagenet/msd_dit")
    cfg.teacher.path, cfg.teacher.dtype = str(tmp_path / "dit"), "float32"
    teacher = build_teacher(cfg.teacher)
    assert teacher.num_classes == 10 and teacher.prediction_type == "epsilon"
    msd = build(cfg.algorithm.name, teacher, dict(cfg.algorithm.params))
    assert len(msd.students) == 4 and sorted(set(msd.route)) == [0, 1, 2, 3]
    assert all(list(g.timesteps) == cfg.algorithm.params["base_params"]["generator_timesteps"]
               for g in msd.generator_for_export())
