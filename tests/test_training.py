"""The generic training loop (stepdistill.training) on a toy two-group distiller.

The toy distiller trains a "generator" MLP and a "critic" MLP on the 2-D ring of Gaussians with a
TTUR phase (generator every 2nd step, critic every step); the generator loss back-propagates
through the critic and through a frozen MLP "teacher", so stray gradients and teacher updates
would show.  Also imported by tests/test_training_distributed.py (the 2-process script).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stepdistill.algorithms.base import Distiller, LossOutput
from stepdistill.config import ConfigError, TrainConfig
from stepdistill.data.sources import ConditionSource
from stepdistill.teachers.analytic import GaussianMixtureTeacher, MLPDenoiser
from stepdistill.training import (
    CheckpointError,
    TrainingTask,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint_weights,
    save_image_grid,
    train,
)
from stepdistill.training import checkpoint as ckpt_mod


class ToyDistiller(Distiller):
    name = "toy"
    paper = "-"
    Config = dict

    def __init__(self, seed: int = 0):
        torch.manual_seed(0)  # the teacher is the same for every seed (it is not checkpointed)
        gmm = GaussianMixtureTeacher.ring()
        super().__init__(MLPDenoiser(gmm, hidden=16), {})  # frozen network teacher (has parameters)
        self.gmm = gmm
        torch.manual_seed(seed)
        self.generator = nn.Sequential(nn.Linear(2, 32), nn.SiLU(), nn.Linear(32, 2))
        self.critic = nn.Sequential(nn.Linear(2, 32), nn.SiLU(), nn.Linear(32, 1))
        self.generator_calls = 0  # non-parameter state (state_dict_extra)
        self._last_call = None

    def trainable(self):
        return {"generator": self.generator, "critic": self.critic}

    def phase(self, step):
        return ["generator", "critic"] if step % 2 == 0 else ["critic"]

    def lr_defaults(self):
        return {"generator": 1e-3, "critic": 2e-3}

    def _check_no_stray_grads(self, step, group):
        """Each group's first micro-batch must start from zero gradients everywhere (later
        micro-batches accumulate, and the generator loss legitimately reaches the critic)."""
        first = self._last_call != (step, group)
        self._last_call = (step, group)
        for name, module in self.trainable().items():
            if first:
                assert all(p.grad is None for p in module.parameters()), (
                    f"step {step}, group {group}: stray gradients on {name}"
                )

    def loss(self, batch, step, group, cache):
        self._check_no_stray_grads(step, group)
        raw = batch["raw_cond"]
        n = raw.shape[0]
        cond = self.teacher.encode_conditions(raw)
        if group == "generator":
            self.generator_calls += 1
            x = self.generator(torch.randn(n, 2))
            cache["fake"] = x.detach()
            sigma = torch.full((n,), 0.5)
            den = self.teacher.denoise(x + 0.5 * torch.randn_like(x), sigma, cond)
            loss = F.softplus(-self.critic(x)).mean() + 0.1 * ((x - den) ** 2).mean()
        else:
            fake = cache.get("fake")
            if fake is None:
                with torch.no_grad():
                    fake = self.generator(torch.randn(n, 2))
            real = self.gmm.sample_data(n, cond=cond)
            loss = F.softplus(self.critic(fake)).mean() + F.softplus(-self.critic(real)).mean()
        return LossOutput(loss, {"fake_norm": float(cache["fake"].norm()) if "fake" in cache else 0.0})

    def generator_for_export(self):
        return self.generator

    def state_dict_extra(self):
        return {"generator_calls": self.generator_calls}

    def load_state_dict_extra(self, d):
        self.generator_calls = int(d["generator_calls"])


def make_cfg(out, **kw) -> TrainConfig:
    base = dict(
        output_dir=str(out),
        max_steps=6,
        batch_size=8,
        checkpoint_every_steps=3,
        checkpoints_total_limit=None,
        report_to=None,
        progress=False,
        log_every_steps=1,
        sample_every_steps=0,
        resume="latest",
        seed=0,
    )
    base.update(kw)
    return TrainConfig(**base)


def run(out, distiller=None, **kw):
    d = distiller if distiller is not None else ToyDistiller()
    cfg_kw = {k: v for k, v in kw.items() if k in TrainConfig.__dataclass_fields__}
    train_kw = {k: v for k, v in kw.items() if k not in cfg_kw}
    return train(d, ConditionSource(d.gmm, seed=0), make_cfg(out, **cfg_kw), **train_kw), d


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only add contention (and timing noise) on a busy 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _snap(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _load_any(path: Path):
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix == ".pt":
        return torch.load(path, weights_only=True)
    data = json.loads(path.read_text())
    if isinstance(data, dict):
        data.pop("time", None)
    return data


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _checkpoint_contents(path: Path) -> dict:
    return {p.name: _load_any(p) for p in sorted(path.iterdir())}


# ---------------------------------------------------------------------------------------------
# (a) phases: only the phase's groups change; the teacher never does


def test_only_phase_groups_change_and_teacher_is_frozen(tmp_path):
    d = ToyDistiller()
    teacher0 = _snap(d.teacher)
    snaps = [{"generator": _snap(d.generator), "critic": _snap(d.critic)}]

    def cb(done, logs):
        snaps.append({"generator": _snap(d.generator), "critic": _snap(d.critic)})
        assert all(p.grad is None for p in d.parameters()), "gradients must be zeroed after every group"

    result, _ = run(tmp_path / "run", distiller=d, max_steps=6, step_callback=cb)
    assert result["step"] == 6 and len(snaps) == 7
    for s in range(6):
        expected = set(d.phase(s))
        for group in ("generator", "critic"):
            changed = not _same(snaps[s][group], snaps[s + 1][group])
            assert changed == (group in expected), (
                f"step {s}: group {group} changed={changed}, phase={expected}"
            )
    assert _same(teacher0, _snap(d.teacher))
    assert all(not p.requires_grad and p.grad is None for p in d.teacher.parameters())
    assert d.generator_calls == 3
    # per-group logs, lr and grad norms reach log.jsonl
    lines = [json.loads(line) for line in Path(result["log_file"]).read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6]
    assert "loss/generator" in lines[0] and "loss/generator" not in lines[1]
    assert lines[0]["lr/generator"] == pytest.approx(1e-3) and lines[0]["lr/critic"] == pytest.approx(2e-3)
    assert lines[0]["grad_norm/critic"] > 0


def test_teacher_parameter_in_a_group_is_rejected(tmp_path):
    d = ToyDistiller()
    d.teacher.requires_grad_(True)
    d.trainable = lambda: {"generator": d.generator, "critic": nn.ModuleList([d.critic, d.teacher])}
    with pytest.raises(ValueError, match="teacher"):
        run(tmp_path / "run", distiller=d, max_steps=1)


# ---------------------------------------------------------------------------------------------
# (b) exact resume


def test_resume_is_bit_identical(tmp_path):
    straight, d_straight = run(tmp_path / "a", ema_decay=0.8, max_steps=6)
    first, _ = run(tmp_path / "b", ema_decay=0.8, max_steps=3)  # "killed" after the step-3 checkpoint
    assert first["checkpoint"].endswith("checkpoint-0000003")
    d_resumed = ToyDistiller(seed=123)  # different init: everything must come from the checkpoint
    resumed, _ = run(tmp_path / "b", distiller=d_resumed, ema_decay=0.8, max_steps=6)
    assert resumed["resumed_from"].endswith("checkpoint-0000003")
    assert _same(_snap(d_straight.generator), _snap(d_resumed.generator))
    assert _same(_snap(d_straight.critic), _snap(d_resumed.critic))
    assert d_resumed.generator_calls == d_straight.generator_calls == 3
    a = _checkpoint_contents(Path(straight["checkpoint"]))
    b = _checkpoint_contents(Path(resumed["checkpoint"]))
    assert sorted(a) == sorted(b)
    for name in a:
        assert _equal(a[name], b[name]), f"{name} differs between straight and resumed runs"
    # the resumed log repeats nothing and matches the straight run's losses
    la = [json.loads(x) for x in Path(straight["log_file"]).read_text().splitlines()]
    lb = [json.loads(x) for x in Path(resumed["log_file"]).read_text().splitlines()]
    assert [x["step"] for x in lb] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(la, lb):
        assert {k: v for k, v in x.items() if not k.startswith("time/")} == {
            k: v for k, v in y.items() if not k.startswith("time/")
        }


def test_resume_path_errors(tmp_path):
    with pytest.raises(CheckpointError, match="nope"):
        run(tmp_path / "run", resume=str(tmp_path / "nope"), max_steps=1)
    result, _ = run(tmp_path / "run", max_steps=3)
    ck = Path(result["checkpoint"])
    broken = tmp_path / "broken" / "checkpoints" / "checkpoint-0000003"
    broken.parent.mkdir(parents=True)
    import shutil

    shutil.copytree(ck, broken)
    (broken / "critic.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="checkpoint-0000003.*critic.safetensors"):
        run(tmp_path / "other", resume=str(broken), max_steps=4)
    (broken / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        run(tmp_path / "other2", resume=str(broken), max_steps=4)
    # a fresh start (resume: null) into a folder that already has checkpoints is refused
    with pytest.raises(CheckpointError, match="resume"):
        run(tmp_path / "run", resume=None, max_steps=4)
    # resume beyond max_steps: nothing to do, nothing rewritten
    again, _ = run(tmp_path / "run", max_steps=3)
    assert again["step"] == 3 and again["resumed_from"] == str(ck)


# ---------------------------------------------------------------------------------------------
# (c) atomic checkpoints, stale tmp folders, total limit


def test_checkpoint_failure_never_leaves_incomplete_folder(tmp_path, monkeypatch):
    out = tmp_path / "run"
    stale = out / "checkpoints" / "checkpoint-0000009.tmp-2147480000"  # from a killed run (dead pid)
    stale.mkdir(parents=True)
    (stale / "generator.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(out) is None

    real_save = ckpt_mod.save_file

    def failing_save(tensors, filename, *a, **k):
        if "checkpoint-0000006" in str(filename) and filename.endswith("critic.safetensors"):
            raise OSError("disk full (simulated)")
        return real_save(tensors, filename, *a, **k)

    monkeypatch.setattr(ckpt_mod, "save_file", failing_save)
    with pytest.raises(OSError, match="simulated"):
        run(out, max_steps=6)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["checkpoint-0000003"], names  # stale tmp cleaned, failed step-6 save rolled back
    assert (out / "checkpoints" / "checkpoint-0000003" / "trainer_state.json").is_file()
    assert latest_checkpoint(out).name == "checkpoint-0000003"

    monkeypatch.setattr(ckpt_mod, "save_file", real_save)
    result, _ = run(out, max_steps=6)
    assert result["resumed_from"].endswith("checkpoint-0000003") and result["step"] == 6
    assert [s for s, _ in list_checkpoints(out)] == [3, 6]


def test_killed_mid_write_leaves_only_tmp(tmp_path, monkeypatch):
    """A kill during the write (no exception handling runs) leaves only a .tmp- folder."""
    out = tmp_path / "run"

    class Killed(BaseException):
        pass

    real_write = ckpt_mod.write_files

    def write_then_die(folder, **kw):
        real_write(folder, **kw)
        if "checkpoint-0000004" in str(folder):
            monkeypatch.setattr(ckpt_mod.shutil, "rmtree", lambda *a, **k: None)  # a kill cleans nothing up
            raise Killed()

    monkeypatch.setattr(ckpt_mod, "write_files", write_then_die)
    with pytest.raises(Killed):
        run(out, max_steps=6, checkpoint_every_steps=2)
    monkeypatch.undo()
    entries = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert entries[0] == "checkpoint-0000002" and entries[1].startswith("checkpoint-0000004.tmp-")
    assert latest_checkpoint(out).name == "checkpoint-0000002"
    result, _ = run(out, max_steps=4, checkpoint_every_steps=2)  # resumes from 2, cleans the leftover
    assert result["resumed_from"].endswith("checkpoint-0000002")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "checkpoint-0000002",
        "checkpoint-0000004",
    ]


def test_checkpoints_total_limit(tmp_path):
    result, _ = run(tmp_path / "run", max_steps=5, checkpoint_every_steps=1, checkpoints_total_limit=2)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["checkpoint-0000004", "checkpoint-0000005"]
    assert result["checkpoints"] == [str(tmp_path / "run" / "checkpoints" / n) for n in names]


# ---------------------------------------------------------------------------------------------
# (e) EMA


def test_ema_is_updated_and_saved(tmp_path):
    d = ToyDistiller()
    decay = 0.8
    shadow = {k: v.clone() for k, v in d.generator.named_parameters()}
    n_updates = 0

    def cb(done, logs):
        nonlocal n_updates
        if "generator" in d.phase(done - 1):
            dn = min(decay, (1 + n_updates) / (10 + n_updates))
            for k, p in d.generator.named_parameters():
                shadow[k] = dn * shadow[k] + (1 - dn) * p.detach()
            n_updates += 1

    result, _ = run(tmp_path / "run", distiller=d, max_steps=6, ema_decay=decay, step_callback=cb)
    ema = result["ema"]
    assert result["ema_group"] == "generator" and n_updates == 3
    for k, v in shadow.items():
        torch.testing.assert_close(ema[k], v, rtol=0, atol=1e-6)
        assert not torch.equal(ema[k], d.generator.state_dict()[k])
    saved = load_checkpoint_weights(result["checkpoint"], "generator_ema")
    assert _same(saved, ema)
    assert _same(load_checkpoint_weights(result["checkpoint"], "generator", ema=True), ema)
    with pytest.raises(CheckpointError, match="critic_ema.*EMA was off"):
        load_checkpoint_weights(result["checkpoint"], "critic", ema=True)
    assert _same(load_checkpoint_weights(result["checkpoint"], "generator"), _snap(d.generator))
    # loadable as-is into a fresh generator (what export does)
    fresh = ToyDistiller(seed=5).generator
    fresh.load_state_dict(saved)
    with pytest.raises(CheckpointError, match="has no weights for 'nope'"):
        load_checkpoint_weights(result["checkpoint"], "nope")


def test_ema_swapped_in_for_sampling_and_eval(tmp_path):
    d = ToyDistiller()
    seen = {}

    def eval_fn(step):
        seen[step] = _snap(d.generator)
        return {"dist": d.gmm.distance(d.generator(torch.randn(64, 2)))["mode_dist"]}

    result, _ = run(
        tmp_path / "run", distiller=d, max_steps=4, ema_decay=0.5, eval_fn=eval_fn, eval_every_steps=2
    )
    assert sorted(seen) == [2, 4]
    assert _same(seen[4], result["ema"])  # eval saw the EMA weights ...
    assert not _same(_snap(d.generator), result["ema"])  # ... and training weights were restored
    assert "eval/dist" in result["logs"]
    lines = [json.loads(x) for x in Path(result["log_file"]).read_text().splitlines()]
    assert any("eval/dist" in x for x in lines)


def test_ema_group_fallback_and_error(tmp_path):
    d = ToyDistiller()
    d.trainable = lambda: {"critic": d.critic, "student": d.generator}
    d.phase = lambda step: ["student", "critic"]
    d.loss_orig = d.loss
    d.loss = lambda batch, step, group, cache: d.loss_orig(
        batch, step, "generator" if group == "student" else group, cache
    )
    with pytest.raises(ConfigError, match="EMA group"):
        run(tmp_path / "a", distiller=d, max_steps=1, ema_decay=0.9)
    d.ema_group = "student"
    result, _ = run(tmp_path / "b", distiller=d, max_steps=1, ema_decay=0.9, lr={"student": 1e-3})
    assert result["ema_group"] == "student"
    assert (Path(result["checkpoint"]) / "student_ema.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# (f) sample grids, tensorboard, config file


def test_sample_grid_and_tensorboard(tmp_path):
    calls = []

    def sample_fn(step):
        calls.append(step)
        g = torch.Generator().manual_seed(step)
        return torch.rand((10, 1, 8, 8), generator=g) * 2 - 1

    run_config = {"train": {"max_steps": 4}, "algorithm": {"name": "toy", "params": {"a": [1, 2]}}}
    result, _ = run(
        tmp_path / "run",
        max_steps=4,
        sample_every_steps=3,
        report_to="tensorboard",
        sample_fn=sample_fn,
        run_config=run_config,
    )
    assert calls == [3, 4]
    from PIL import Image

    png = tmp_path / "run" / "samples" / "step-0000004.png"
    assert result["samples"][-1] == str(png)
    img = Image.open(png)
    # 10 images of 8x8 -> upscaled x8 to 64 px, 4 per row, 3 rows, 2 px padding
    assert img.size == (4 * 64 + 5 * 2, 3 * 64 + 4 * 2)
    assert list((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents*"))
    import yaml

    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text()) == run_config


def test_scatter_samples_for_2d_points(tmp_path):
    d = ToyDistiller()
    result, _ = run(
        tmp_path / "run",
        distiller=d,
        max_steps=2,
        sample_every_steps=2,
        sample_fn=lambda step: d.generator(torch.randn(128, 2)),
    )
    assert Path(result["samples"][0]).stat().st_size > 1000


def test_save_image_grid(tmp_path):
    x = torch.zeros(3, 3, 100, 80)
    x[0, 0] = 1.0  # red
    path = save_image_grid(x, tmp_path / "g.png", nrow=3, upscale_to=64)
    from PIL import Image

    arr = torch.from_numpy(__import__("numpy").array(Image.open(path)))
    assert arr.shape == (100 + 4, 3 * 80 + 8, 3)  # no upscaling when larger than 64 px
    assert arr[2, 2].tolist() == [255, 128, 128]  # [-1,1] -> uint8 with rounding: 0 -> 128
    with pytest.raises(ValueError, match="shape"):
        save_image_grid(torch.zeros(2, 4, 8, 8), tmp_path / "bad.png")


# ---------------------------------------------------------------------------------------------
# configuration errors and precision


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"max_steps": -1}, "max_steps"),
        ({"grad_accum_steps": 0}, "grad_accum_steps"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"ema_decay": 1.5}, "ema_decay"),
        ({"checkpoints_total_limit": 0}, "checkpoints_total_limit"),
        ({"lr": {"critic": -1.0}}, "train.lr.critic"),
        ({"lr": {"discriminator": 1e-4}}, r"unknown group.*'discriminator'.*generator, critic"),
    ],
)
def test_config_errors(tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        run(tmp_path / "run", **kw)


def test_output_dir_not_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="not a writable folder"):
        run(blocker / "run", max_steps=1)


def test_lr_resolution_and_warmup(tmp_path):
    result, _ = run(tmp_path / "run", max_steps=4, lr={"critic": 5e-3}, warmup_steps=4, log_every_steps=1)
    lines = [json.loads(x) for x in Path(result["log_file"]).read_text().splitlines()]
    # lr logged is the one used by that step's update: warm-up counts each group's own updates
    assert [x["lr/critic"] for x in lines] == pytest.approx([5e-3 * k / 4 for k in (1, 2, 3, 4)])
    assert [x["lr/generator"] for x in lines if "lr/generator" in x] == pytest.approx([1e-3 / 4, 2e-3 / 4])


def test_grad_accumulation_and_bf16(tmp_path):
    d = ToyDistiller()
    result, _ = run(tmp_path / "a", distiller=d, max_steps=2, grad_accum_steps=2, mixed_precision="bf16")
    assert result["step"] == 2 and all(torch.isfinite(p).all() for p in d.parameters())
    assert d.generator_calls == 2  # one generator phase x 2 micro-batches
    # back to fp32 in the same process (accelerate's state singleton is reset when single-process)
    result, _ = run(tmp_path / "b", max_steps=1)
    assert result["accelerator"].mixed_precision == "no"


def test_nan_loss_is_reported(tmp_path):
    d = ToyDistiller()
    orig = d.loss

    def bad(batch, step, group, cache):
        out = orig(batch, step, group, cache)
        return LossOutput(out.loss * float("nan"), out.logs) if step == 1 else out

    d.loss = bad
    with pytest.raises(FloatingPointError, match="step 1"):
        run(tmp_path / "run", distiller=d, max_steps=3)


def test_unknown_phase_group(tmp_path):
    d = ToyDistiller()
    d.phase = lambda step: ["discriminator"]
    with pytest.raises(ValueError, match="unknown group"):
        run(tmp_path / "run", distiller=d, max_steps=1)


def test_seeding_makes_runs_reproducible(tmp_path):
    a, da = run(tmp_path / "a", max_steps=3)
    b, db = run(tmp_path / "b", max_steps=3)
    c, dc = run(tmp_path / "c", max_steps=3, seed=1)
    assert _same(_snap(da.generator), _snap(db.generator))
    assert not _same(_snap(da.generator), _snap(dc.generator))


def test_fp16_grad_scaler_path_and_resume(tmp_path):
    """fp16 on CUDA uses one GradScaler per group; on CPU accelerate has no scaler, so force the path."""
    from accelerate import Accelerator

    def scaled_run(out, max_steps, distiller=None):
        acc = Accelerator()
        acc.scaler = "fp16"  # any non-None value selects the per-group scalers
        return run(out, distiller=distiller, max_steps=max_steps, accelerator=acc)

    straight, d1 = scaled_run(tmp_path / "a", 4)
    assert (Path(straight["checkpoint"]) / "scaler-generator.pt").is_file()
    scaled_run(tmp_path / "b", 2)
    resumed, d2 = scaled_run(tmp_path / "b", 4, distiller=ToyDistiller(seed=9))
    assert resumed["resumed_from"].endswith("checkpoint-0000002")
    assert _same(_snap(d1.generator), _snap(d2.generator)) and _same(_snap(d1.critic), _snap(d2.critic))
    a = _checkpoint_contents(Path(straight["checkpoint"]))
    b = _checkpoint_contents(Path(resumed["checkpoint"]))
    assert all(_equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def test_distiller_build_is_seeded_by_the_config_not_by_process_history(tmp_path, monkeypatch):
    """run_distillation seeds the RNG from train.seed before building the distiller: the same config
    gives the same initial weights (the GAN head's random init included) whatever the process drew
    before."""
    import stepdistill.training as training_pkg
    from stepdistill.config import load_config
    from stepdistill.run import run_distillation

    built = []

    def fake_train(distiller, *a, **k):  # stop right after the build
        built.append({f"{g}.{n}": v.clone() for g, m in distiller.trainable().items() for n, v in m.state_dict().items()})
        return {"step": 0}

    monkeypatch.setattr(training_pkg, "train", fake_train)
    for drawn, seed in ((0, 0), (1000, 0), (0, 1)):
        torch.rand(drawn)  # a different process history
        cfg = load_config("analytic/dmd2", [f"train.output_dir={tmp_path / str(len(built))}", f"train.seed={seed}",
                                            "algorithm.params.gan_weight_g=0.003", "algorithm.params.gan_weight_d=0.01"])
        run_distillation(cfg, export=False)
    a, b, c = built
    assert any("gan_head" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    assert any(not torch.equal(a[k], c[k]) for k in a if "gan_head" in k)  # another train.seed, another init


# ---------------------------------------------------------------------------------------------
# (g) the task contract: declared hooks, once-per-step side effects, pure phases, launch checks


class MinimalTask(TrainingTask):
    """Only the two required hooks; every other one is the contract's default (no hasattr probing)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(2, 2)
        self.begun: list[tuple[int, bool]] = []

    def trainable(self):
        return {"net": self.net}

    def on_step_begin(self, step, is_main):
        self.begun.append((step, is_main))

    def loss(self, batch, step, group, cache):
        y = self.net(batch["raw_cond"].float()[:, None].expand(-1, 2))
        loss = (y**2).mean()
        return LossOutput(loss, {"mean_sq": loss.detach(), "as_float": 1.5, "vector": y.detach()[:, 0]})


def _minimal_run(out, task, **kw):
    return train(task, ConditionSource(GaussianMixtureTeacher.ring(), seed=0), make_cfg(out, **kw))


def test_minimal_task_uses_the_contract_defaults_and_tensor_logs(tmp_path):
    task = MinimalTask()
    result = _minimal_run(tmp_path / "run", task, max_steps=4, grad_accum_steps=2, ema_decay=0.5)
    assert result["step"] == 4 and result["ema_group"] == "net"  # the only group is the EMA group
    lines = [json.loads(x) for x in Path(result["log_file"]).read_text().splitlines()]
    assert all(isinstance(x["net/mean_sq"], float) and x["net/as_float"] == 1.5 for x in lines)
    assert all("net/vector" not in x for x in lines)  # non-scalar tensors are not logged
    assert all(x["net/mean_sq"] == pytest.approx(x["loss/net"]) for x in lines)
    with pytest.raises(TypeError, match="TrainingTask"):
        train(nn.Linear(2, 2), ConditionSource(GaussianMixtureTeacher.ring(), seed=0), make_cfg(tmp_path / "x"))


def test_on_step_begin_runs_once_per_step_also_after_resume(tmp_path):
    straight = MinimalTask()
    _minimal_run(tmp_path / "a", straight, max_steps=6)
    assert straight.begun == [(s, True) for s in range(6)]
    first, second = MinimalTask(), MinimalTask()
    _minimal_run(tmp_path / "b", first, max_steps=3)
    _minimal_run(tmp_path / "b", second, max_steps=6)
    assert first.begun + second.begun == straight.begun
    assert _same(_snap(second.net), _snap(straight.net))


def test_fsdp_and_deepspeed_launches_are_refused(tmp_path, monkeypatch):
    # an FSDP launch is a sharded run (tests/test_fsdp.py); with one process it says it cannot shard
    for var, msg in (("ACCELERATE_USE_FSDP", "fsdp2 needs a multi-process launch"),
                     ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed launches are not supported")):
        monkeypatch.setenv(var, "true")
        with pytest.raises(ConfigError, match=msg):
            run(tmp_path / var, max_steps=1)
        monkeypatch.delenv(var)


def test_mixed_precision_null_leaves_the_choice_to_the_launcher(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    result, _ = run(tmp_path / "a", max_steps=1, mixed_precision=None)
    assert result["accelerator"].mixed_precision == "bf16"
    result, _ = run(tmp_path / "b", max_steps=1, mixed_precision="no")  # the config's choice wins
    assert result["accelerator"].mixed_precision == "no"


_RING: list = []


def _ring() -> GaussianMixtureTeacher:
    """One shared ring teacher: its MLP copy (the students' initialisation) is fitted once."""
    if not _RING:
        _RING.append(GaussianMixtureTeacher.ring())
    return _RING[0]


def _analytic_distiller(name, tmp_path):
    from stepdistill.algorithms import build

    teacher = _ring()
    fast = {"regression_steps": 2, "regression_pairs": 16, "critic_warmup_steps": 1}
    params = {
        "dmd2": dict(fast),
        "vsd": {"critic": "full"},
        "boot": {},
        "disback": {"base_params": dict(fast), "recording_steps": 4, "num_nodes": 2, "switch_every_steps": 2,
                    "nodes_dir": str(tmp_path / "nodes")},
        "msd": {"num_students": 2, "base_params": dict(fast)},
    }[name]
    return build(name, teacher, params)


def _task_state(d) -> dict:
    return {
        "weights": {k: v.clone() for k, v in d.state_dict().items()},
        "extra": json.dumps(d.state_dict_extra(), sort_keys=True, default=str),
        "use_teacher": getattr(getattr(d, "target", None), "use_teacher", None),
    }


@pytest.mark.parametrize("name", ["dmd2", "vsd", "boot", "disback", "msd"])
def test_phase_is_pure(name, tmp_path):
    """phase(step) may be called repeatedly and out of order: same answer, no state change, no files."""
    d = _analytic_distiller(name, tmp_path)
    steps = [9, 0, 3, 7, 1, 12, 5, 2, 9, 0]
    before = _task_state(d)
    first = [d.phase(s) for s in steps]
    assert [d.phase(s) for s in reversed(steps)] == list(reversed(first))
    after = _task_state(d)
    assert after["extra"] == before["extra"] and after["use_teacher"] == before["use_teacher"]
    assert _same(after["weights"], before["weights"])
    assert not (tmp_path / "nodes").exists()


def test_disback_side_effects_happen_in_on_step_begin_and_files_on_main_only(tmp_path):
    d = _analytic_distiller("disback", tmp_path)
    for step in range(2, 6):  # regression 0..1, recording 2..5: node 1 after 2 critic updates
        d.on_step_begin(step, is_main=False)
    assert d.node_files == ["node-001.safetensors"] and not (tmp_path / "nodes").exists()
    d2 = _analytic_distiller("disback", tmp_path)
    for step in range(2, 7):  # step 6 starts backtracking: final node, target = node 1
        d2.on_step_begin(step, is_main=True)
    assert sorted(p.name for p in (tmp_path / "nodes").glob("node-*")) == ["node-001.safetensors",
                                                                           "node-002.safetensors"]
    assert d2.current == 0 and not d2.target.use_teacher and d2.phase(6) == d2.phase(6)


def test_msd_loads_the_tsm_critic_in_on_step_begin_not_in_phase(tmp_path):
    from stepdistill.algorithms import build

    d = build("msd", _ring(), {"num_students": 2, "width_multiplier": 0.5, "tsm_steps": 1,
                            "base_params": {"regression_steps": 0}})
    s0 = d.students[0]
    with torch.no_grad():
        for p in s0.generator.parameters():
            p.add_(1.0)
    before = _snap(s0.critic)
    d.phase(5)  # after TSM: pure, the critic is untouched
    assert _same(_snap(s0.critic), before) and not all(d._tsm_done)
    d.on_step_begin(5, True)
    assert all(d._tsm_done)
    assert _same(_snap(s0.critic), _snap(s0.generator.denoiser))
