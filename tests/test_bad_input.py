"""Bad input through the command line (issue 17): each kind gets a non-zero exit code of its family,
exactly one ``error:`` line naming the problem, no traceback, and every file that existed before
is unchanged (its hash).  Also: Ctrl-C stops at a safe point, damaged checkpoints are skipped with
a warning, an export never replaces its run or teacher folder, resume names what it resumed from
and which config keys differ.

One tiny teacher and one 2-step DMD2 run are made per module; every case that changes a run works
on a copy of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from stepdistill.cli import main
from stepdistill.errors import EXIT_INTERRUPTED

CONFIG, CHECKPOINT, OUTPUT, TRAINING = 2, 3, 4, 5  # the exit codes of docs/errors.md

QUIET = ["train.progress=false", "train.report_to=null", "train.sample_every_steps=0"]
TINY_TEACHER = ["train.max_steps=2", *QUIET, "teacher.params.unet.block_out_channels=[16,32]"]
SMALL = ["train.batch_size=4", "algorithm.params.regression_steps=1", "algorithm.params.regression_pairs=8",
         "algorithm.params.critic_warmup_steps=1"]


# ---------------------------------------------------------------------------------------------
# helpers


def digest(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (hidden ones included), keyed by path."""
    out = {}
    for root in roots:
        root = Path(root)
        if root.is_file():
            out[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
            continue
        for dirpath, _, files in os.walk(root):
            for f in files:
                p = Path(dirpath) / f
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_one_error(rc: int, err: str, code: int, *needles: str) -> str:
    assert rc == code, f"exit {rc}, expected {code}; stderr:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------------------------------------
# fixtures: one tiny teacher and one finished 2-step run per module


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    assert main(["teacher", "train", "--preset", "digits", "--output", str(out), *TINY_TEACHER]) == 0
    return out / "pipeline"


def train_args(teacher: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "digits/dmd2", f"teacher.path={teacher}", f"train.output_dir={out}", "train.max_steps=1",
            *QUIET, *SMALL, *extra]


@pytest.fixture(scope="module")
def run(teacher, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(train_args(teacher, out, "train.max_steps=2", "train.checkpoint_every_steps=1")) == 0
    assert (out / "checkpoints" / "checkpoint-0000001").is_dir()
    assert (out / "checkpoints" / "checkpoint-0000002").is_dir()
    assert (out / "pipeline" / "model_index.json").is_file()
    return out


@pytest.fixture
def run_copy(run, tmp_path) -> Path:
    dst = tmp_path / "run-copy"
    shutil.copytree(run, dst)
    return dst


def _png(path: Path, size: int, value: int = 128) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (size, size), value).save(path)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


LATEST = Path("checkpoints") / "checkpoint-0000002"
FIRST = Path("checkpoints") / "checkpoint-0000001"


# ---------------------------------------------------------------------------------------------
# the table: (id, argv builder, exit code, words the error line must contain)
# a builder gets (tmp, teacher, run_copy) and may create input files in tmp before the hashes


def _yaml(tmp, text):
    f = tmp / "bad.yaml"
    f.write_text(text)
    return f


def _folder(tmp, name, files=()):
    d = tmp / name
    d.mkdir()
    for rel, content in files:
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, int):
            _png(p, content)
        else:
            p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return d


def _teacher_copy(tmp, teacher, edit):
    d = tmp / "teacher-copy"
    shutil.copytree(teacher, d)
    edit(d)
    return d


def _damage(run_copy, rel, how):
    p = run_copy / rel
    if how == "truncate":
        _truncate(p)
    elif how == "delete":
        p.unlink()
    elif how == "json":
        p.write_text("{not json")
    return run_copy


CASES = [
    # -- configs and overrides
    ("unknown preset", lambda t, te, r: ["train", "no/such/preset"], CONFIG, ["no preset or YAML file"]),
    ("invalid yaml", lambda t, te, r: ["train", _yaml(t, "train: {max_steps: [1, 2\n")], CONFIG, ["not valid YAML"]),
    ("yaml not a mapping", lambda t, te, r: ["train", _yaml(t, "- 1\n- 2\n")], CONFIG, ["mapping"]),
    ("unknown base", lambda t, te, r: ["train", _yaml(t, "base: nope/nope\n")], CONFIG, ["nope/nope"]),
    ("override without =", lambda t, te, r: train_args(te, t / "o", "train.max_steps"), CONFIG,
     ["train.max_steps"]),
    ("override key typo", lambda t, te, r: train_args(te, t / "o", "train.max_stepz=3"), CONFIG,
     ["train.max_stepz", "did you mean"]),
    ("override wrong type", lambda t, te, r: train_args(te, t / "o", "train.max_steps=abc"), CONFIG,
     ["train.max_steps", "expected int"]),
    ("override into a value", lambda t, te, r: train_args(te, t / "o", "train.max_steps.x=1"), CONFIG,
     ["max_steps"]),
    ("zero max_steps", lambda t, te, r: train_args(te, t / "o", "train.max_steps=0"), CONFIG,
     ["train.max_steps=0", "untrained"]),
    ("negative guidance", lambda t, te, r: train_args(te, t / "o", "teacher.guidance_scale=-1"), CONFIG,
     ["teacher.guidance_scale"]),
    ("negative real guidance", lambda t, te, r: train_args(te, t / "o", "algorithm.params.real_guidance_scale=-2"),
     CONFIG, ["algorithm.params.real_guidance_scale"]),
    ("unknown algorithm", lambda t, te, r: train_args(te, t / "o", "algorithm.name=nope"), CONFIG,
     ["unknown algorithm", "nope"]),
    ("unknown algorithm param", lambda t, te, r: train_args(te, t / "o", "algorithm.params.update_ration=2"), CONFIG,
     ["update_ration"]),
    ("batch size 0", lambda t, te, r: train_args(te, t / "o", "train.batch_size=0"), CONFIG, ["train.batch_size"]),
    ("lr of unknown group", lambda t, te, r: train_args(te, t / "o", "train.lr.nonsense=0.001"), CONFIG,
     ["train.lr", "nonsense"]),
    ("bad mixed precision", lambda t, te, r: train_args(te, t / "o", "train.mixed_precision=fp8"), CONFIG,
     ["train.mixed_precision"]),
    ("ema decay > 1", lambda t, te, r: train_args(te, t / "o", "train.ema_decay=1.5"), CONFIG, ["train.ema_decay"]),
    ("bad teacher dtype", lambda t, te, r: train_args(te, t / "o", "teacher.dtype=float8"), CONFIG, ["teacher.dtype"]),
    ("bad teacher kind", lambda t, te, r: train_args(te, t / "o", "teacher.kind=bogus"), CONFIG, ["teacher.kind"]),
    ("timestep beyond the schedule", lambda t, te, r: train_args(te, t / "o",
                                                                 "algorithm.params.generator_timesteps=[1000]"),
     CONFIG, ["generator_timesteps"]),
    ("timesteps ascending", lambda t, te, r: train_args(te, t / "o", "algorithm.params.generator_timesteps=[499,999]"),
     CONFIG, ["generator_timesteps", "descending"]),
    ("empty timesteps", lambda t, te, r: train_args(te, t / "o", "algorithm.params.generator_timesteps=[]"),
     CONFIG, ["generator_timesteps"]),
    ("bad dataset resolution", lambda t, te, r: train_args(te, t / "o", "train.dataset_params.resolution=-8"),
     CONFIG, ["resolution"]),
    ("output_dir is a file", lambda t, te, r: train_args(te, _yaml(t, "x: 1\n")), CONFIG, ["train.output_dir"]),
    # -- teacher folders
    ("missing teacher", lambda t, te, r: train_args(t / "nope", t / "o"), CONFIG, ["neither a local folder"]),
    ("teacher without model_index", lambda t, te, r: train_args(_folder(t, "junk", [("a.txt", "x")]), t / "o"),
     CONFIG, ["model_index.json"]),
    ("teacher with corrupt model_index",
     lambda t, te, r: train_args(_teacher_copy(t, te, lambda d: (d / "model_index.json").write_text("{oops")), t / "o"),
     CONFIG, ["model_index.json"]),
    ("teacher with truncated weights",
     lambda t, te, r: train_args(_teacher_copy(t, te, lambda d: [_truncate(p) for p in (d / "unet").glob("*.safetensors")]),
                                 t / "o"),
     CONFIG, ["unet"]),
    # -- data folders
    ("missing data folder", lambda t, te, r: train_args(te, t / "o", f"train.dataset={t / 'nodata'}"), CONFIG,
     ["nodata"]),
    ("empty data folder", lambda t, te, r: train_args(te, t / "o", f"train.dataset={_folder(t, 'empty')}"), CONFIG,
     ["contains no images"]),
    ("non-image in data folder", lambda t, te, r: train_args(
        te, t / "o", f"train.dataset={_folder(t, 'd', [('a.png', 16), ('notes.txt', 'x')])}"), CONFIG,
     ["notes.txt", "not an image file"]),
    ("mixed-size images", lambda t, te, r: train_args(
        te, t / "o", f"train.dataset={_folder(t, 'd', [('a.png', 16), ('b.png', 8)])}",
        "train.dataset_params.resolution=null"), CONFIG, ["has size"]),
    ("images of another size than the teacher's", lambda t, te, r: train_args(
        te, t / "o", f"train.dataset={_folder(t, 'd', [('a.png', 16), ('b.png', 16)])}",
        "train.dataset_params.resolution=16"), CONFIG, ["shape", "train.dataset_params.resolution"]),
    ("corrupt image", lambda t, te, r: train_args(
        te, t / "o", f"train.dataset={_folder(t, 'd', [('a.png', 16), ('b.png', b'not a png')])}"), CONFIG,
     ["cannot read image", "b.png"]),
    ("files next to class folders", lambda t, te, r: train_args(
        te, t / "o", f"train.dataset={_folder(t, 'd', [('a.png', 16), ('cls/b.png', 16)])}"), CONFIG,
     ["class sub-folders"]),
    ("missing hf dataset", lambda t, te, r: train_args(te, t / "o", f"train.dataset=hf:{t / 'nohf'}"), CONFIG,
     ["nohf"]),
    # -- checkpoints and runs
    ("resume from a missing checkpoint", lambda t, te, r: train_args(te, t / "o", f"train.resume={t / 'nock'}"),
     CHECKPOINT, ["train.resume", "nock"]),
    ("resume from a truncated checkpoint",
     lambda t, te, r: train_args(te, t / "o", f"train.resume={_damage(r, LATEST / 'generator.safetensors', 'truncate') / LATEST}"),
     CHECKPOINT, ["train.resume", "generator.safetensors", "checkpoint-0000001"]),
    ("fresh start over checkpoints", lambda t, te, r: train_args(te, r, "train.resume=null"), CHECKPOINT,
     ["train.resume=latest"]),
    ("export a folder that is no run", lambda t, te, r: ["export", _folder(t, "norun"), "--output", t / "x"], CONFIG,
     ["config.yaml"]),
    ("export a run with a corrupt config",
     lambda t, te, r: ["export", _damage(r, "config.yaml", "json"), "--output", t / "x"], CONFIG, ["config"]),
    ("export a missing checkpoint", lambda t, te, r: ["export", r, "--output", t / "x", "--checkpoint", t / "nock"],
     CHECKPOINT, ["--checkpoint", "nock"]),
    ("export a truncated checkpoint",
     lambda t, te, r: ["export", _damage(r, LATEST / "generator.safetensors", "truncate"), "--output", t / "x",
                       "--checkpoint", r / LATEST],
     CHECKPOINT, ["generator.safetensors", f"--checkpoint {{run}}/{FIRST}"]),
    ("export a checkpoint with bad trainer state",
     lambda t, te, r: ["export", _damage(r, LATEST / "trainer_state.json", "json"), "--output", t / "x",
                       "--checkpoint", r / LATEST],
     CHECKPOINT, ["trainer_state.json"]),
    ("export a checkpoint missing its optimizer",
     lambda t, te, r: ["export", _damage(r, LATEST / "optimizer-generator.pt", "delete"), "--output", t / "x",
                       "--checkpoint", r / LATEST],
     CHECKPOINT, ["optimizer-generator.pt"]),
    ("export when every checkpoint is damaged",
     lambda t, te, r: ["export", _damage(_damage(r, LATEST / "generator.safetensors", "truncate"),
                                         FIRST / "generator.safetensors", "truncate"), "--output", t / "x"],
     CHECKPOINT, ["no intact checkpoint"]),
    # -- export outputs: nothing is lost
    ("export over its own run", lambda t, te, r: ["export", r, "--output", r, "--overwrite"], OUTPUT,
     ["run folder"]),
    ("export above its own run", lambda t, te, r: ["export", r, "--output", r.parent, "--overwrite"], OUTPUT,
     ["lies above", "run folder"]),
    ("export over the teacher", lambda t, te, r: ["export", r, "--output", te, "--overwrite"], OUTPUT,
     ["teacher folder"]),
    ("export inside the teacher", lambda t, te, r: ["export", r, "--output", te / "student"], OUTPUT,
     ["inside", "teacher folder"]),
    ("export into a non-empty folder", lambda t, te, r: ["export", r, "--output", _folder(t, "full", [("a", "1")])],
     OUTPUT, ["--overwrite"]),
    ("overwrite a folder no export wrote",
     lambda t, te, r: ["export", r, "--output", _folder(t, "mine", [("a", "1")]), "--overwrite"], OUTPUT,
     ["not a folder written by a stepdistill export"]),
    ("export onto a file", lambda t, te, r: ["export", r, "--output", _yaml(t, "x: 1\n")], OUTPUT, ["not a folder"]),
    # -- sampling a pipeline folder
    ("sample --steps 0", lambda t, te, r: ["sample", r / "pipeline", "--steps", "0", "--output", t / "g.png"], CONFIG,
     ["--steps"]),
    ("sample --num-images -3", lambda t, te, r: ["sample", r / "pipeline", "--num-images", "-3", "--output",
                                                 t / "g.png"], CONFIG, ["--num-images"]),
    ("sample class labels not ints", lambda t, te, r: ["sample", r / "pipeline", "--class-labels", "a,b", "--output",
                                                       t / "g.png"], CONFIG, ["--class-labels"]),
    ("sample negative class label", lambda t, te, r: ["sample", r / "pipeline", "--class-labels", "-1", "--output",
                                                      t / "g.png"], CONFIG, ["--class-labels"]),
    ("sample class label out of range", lambda t, te, r: ["sample", r / "pipeline", "--class-labels", "12",
                                                          "--output", t / "g.png"], CONFIG, ["12", "[0, 9]"]),
    ("sample a folder that is no pipeline", lambda t, te, r: ["sample", _folder(t, "np", [("a", "1")]), "--output",
                                                              t / "g.png"], CONFIG, ["model_index.json"]),
    ("sample a pipeline with corrupt model_index",
     lambda t, te, r: ["sample", _teacher_copy(t, r / "pipeline", lambda d: (d / "model_index.json").write_text("{")),
                       "--output", t / "g.png"], CONFIG, ["model_index.json"]),
    # -- prompt files and evaluation inputs
    ("missing prompts file", lambda t, te, r: ["eval", "sample", r / "pipeline", "-n", "2", "--prompts",
                                               t / "nope.txt", "--output", t / "s"], CONFIG, ["nope.txt"]),
    ("empty prompts file", lambda t, te, r: ["eval", "sample", r / "pipeline", "-n", "2", "--prompts",
                                             _yaml(t, "\n\n"), "--output", t / "s"], CONFIG, ["empty"]),
    ("prompts file not utf-8", lambda t, te, r: ["eval", "sample", r / "pipeline", "-n", "2", "--prompts",
                                                 _folder(t, "p", [("p.txt", b"\xff\xfe\xfa")]) / "p.txt", "--output",
                                                 t / "s"], CONFIG, ["p.txt"]),
    ("eval fid of a missing folder", lambda t, te, r: ["eval", "fid", t / "missing", "digits-b"], CONFIG,
     ["missing"]),
    ("eval sample --num-inference-steps 0", lambda t, te, r: ["eval", "sample", r / "pipeline", "-n", "2",
                                                              "--num-inference-steps", "0", "--output", t / "s"],
     CONFIG, ["num_inference_steps"]),
]


@pytest.mark.parametrize("name,build,code,needles", CASES, ids=[c[0] for c in CASES])
def test_bad_input_one_line_nothing_changed(name, build, code, needles, teacher, run, run_copy, tmp_path, capsys):
    argv = build(tmp_path, teacher, run_copy)
    before = digest(teacher, run, tmp_path)
    rc, _, err = cli(argv, capsys)
    needles = [n.replace("{run}", str(run_copy)) for n in needles]
    assert_one_error(rc, err, code, *needles)
    after = digest(teacher, run, tmp_path)
    assert after == before, sorted(set(after.items()) ^ set(before.items()))[:5]


def test_at_least_forty_kinds():
    assert len(CASES) >= 40


# ---------------------------------------------------------------------------------------------
# interrupts, training failures


def test_ctrl_c_stops_at_a_safe_point_and_resume_continues(teacher, tmp_path, capsys, monkeypatch):
    from stepdistill.training.loop import Trainer

    orig = Trainer.train_step
    seen = {}

    def step_then_ctrl_c(self, step):
        phase = orig(self, step)
        if step == 0:
            seen["handler"] = signal.getsignal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)  # in this thread, now (os.kill may be delivered to another thread later)
        return phase

    # the trainer installs its handler only over Python's default one (a user's own handler wins):
    # start from the default whatever an earlier fixture left behind (the fresh-venv full run failed
    # this test twice with exit 0 and no message under load; it passes alone and in file order)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        monkeypatch.setattr(Trainer, "train_step", step_then_ctrl_c)
        out = tmp_path / "o"
        argv = train_args(teacher, out, "train.max_steps=3", "train.checkpoint_every_steps=100")
        rc, _, err = cli(argv, capsys)
        after_run = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert "handler" in seen, "the patched Trainer.train_step never ran"
    assert getattr(seen["handler"], "__qualname__", "").endswith("on_sigint"), seen["handler"]
    assert rc == EXIT_INTERRUPTED, err[-3000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("interrupted:")]
    assert len(lines) == 1 and "resume" in lines[0] and "checkpoint-0000001" in lines[0], err
    assert (out / "checkpoints" / "checkpoint-0000001" / "trainer_state.json").is_file()
    assert not (out / "pipeline").exists()  # no export of a half-trained run
    assert after_run is signal.default_int_handler  # the trainer restored the handler it replaced
    monkeypatch.setattr(Trainer, "train_step", orig)
    rc, stdout, err = cli(argv, capsys)
    assert rc == 0, err[-3000:]
    assert "resuming from" in stdout and "checkpoint-0000001 (step 1 of 3)" in stdout


def test_ctrl_c_during_export_leaves_nothing(run, tmp_path, capsys, monkeypatch):
    from stepdistill.export import class_conditional

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(class_conditional, "write_metadata", interrupted)
    before = digest(run)
    rc, _, err = cli(["export", run, "--output", tmp_path / "x"], capsys)
    assert rc == EXIT_INTERRUPTED and "Traceback" not in err
    assert len([x for x in err.splitlines() if x.startswith("interrupted:")]) == 1
    assert not any(tmp_path.iterdir()) and digest(run) == before


def test_non_finite_loss_is_one_line(teacher, tmp_path, capsys, monkeypatch):
    import torch

    from stepdistill.training.loop import Trainer

    orig = Trainer.run_group

    def nan_loss(self, *a, **k):
        orig(self, *a, **k)
        self.step_losses.append(torch.tensor(float("nan")))

    monkeypatch.setattr(Trainer, "run_group", nan_loss)
    rc, _, err = cli(train_args(teacher, tmp_path / "o"), capsys)
    assert_one_error(rc, err, TRAINING, "non-finite loss", "train.max_grad_norm")


def test_unexpected_errors_keep_their_traceback(monkeypatch, tmp_path):
    import stepdistill.config as config

    def bug(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(config, "load_config", bug)
    with pytest.raises(ZeroDivisionError):
        main(["train", "digits/dmd2", "--dry-run"])


# ---------------------------------------------------------------------------------------------
# damaged checkpoints: fall back with a warning


def _warnings(err: str, caplog) -> str:
    return err + "\n" + caplog.text


def test_export_skips_a_damaged_latest_checkpoint(run_copy, tmp_path, capsys, caplog):
    _truncate(run_copy / LATEST / "generator.safetensors")
    rc, _, err = cli(["export", run_copy, "--output", tmp_path / "x"], capsys)
    assert rc == 0, err[-3000:]
    text = _warnings(err, caplog)
    assert "skipping damaged checkpoint" in text and str(run_copy / LATEST) in text
    meta = json.loads((tmp_path / "x" / "stepdistill.json").read_text())
    assert meta["extra"]["checkpoint"].endswith("checkpoint-0000001") if "extra" in meta else \
        "checkpoint-0000001" in json.dumps(meta)


def test_resume_skips_a_damaged_latest_checkpoint(teacher, run_copy, capsys, caplog):
    (run_copy / LATEST / "extra.json").write_text("{")
    rc, out, err = cli(train_args(teacher, run_copy, "train.max_steps=3", "--no-export"), capsys)
    assert rc == 0, err[-3000:]
    assert "extra.json" in _warnings(err, caplog)
    assert f"resuming from {run_copy / FIRST} (step 1 of 3)" in out
    assert (run_copy / "checkpoints" / "checkpoint-0000003").is_dir()


def test_resume_names_the_changed_keys(teacher, run_copy, capsys, caplog):
    rc, out, err = cli(train_args(teacher, run_copy, "train.max_steps=3", "--no-export",
                                  "algorithm.params.critic_lr=0.0003"), capsys)
    assert rc == 0, err[-3000:]
    assert f"resuming from {run_copy / LATEST} (step 2 of 3)" in out
    text = _warnings(err, caplog)
    assert "algorithm.params.critic_lr: 0.0001 -> 0.0003" in text, text[-2000:]


def test_overwrite_replaces_an_earlier_export_only(run, tmp_path, capsys):
    out = tmp_path / "x"
    assert cli(["export", run, "--output", out], capsys)[0] == 0
    assert (out / ".stepdistill-export").is_file()
    rc, _, err = cli(["export", run, "--output", out, "--overwrite"], capsys)
    assert rc == 0, err[-3000:]
    assert (out / "model_index.json").is_file()


# ---------------------------------------------------------------------------------------------
# the same through real processes (entry points, exit codes)


def _proc(args, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_subprocess_export_over_run_is_refused(run, tmp_path):
    before = digest(run)
    p = _proc(["-m", "stepdistill.cli", "export", str(run), "--output", str(run), "--overwrite"], tmp_path)
    assert_one_error(p.returncode, p.stderr, OUTPUT, "run folder")
    assert digest(run) == before


def test_subprocess_accelerate_entry_point_refuses_zero_steps(tmp_path):
    p = _proc(["-m", "stepdistill.train", "digits/dmd2", "train.max_steps=0", f"train.output_dir={tmp_path / 'o'}"],
              tmp_path)
    assert_one_error(p.returncode, p.stderr, CONFIG, "train.max_steps=0")
    assert not (tmp_path / "o").exists()
