"""CLI smoke runs: teacher training, distillation, export, sampling, evaluation, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stepdistill.cli import main

TINY_TEACHER = ["train.max_steps=20", "train.progress=false", "train.report_to=null", "train.sample_every_steps=0",
                "train.checkpoint_every_steps=100", "teacher.params.unet.block_out_channels=[16,32]"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    assert main(["teacher", "train", "--preset", "digits", "--output", str(out), *TINY_TEACHER]) == 0
    pipe = out / "pipeline"
    assert (pipe / "model_index.json").exists()
    index = json.loads((pipe / "model_index.json").read_text())
    assert index["num_classes"] == 10
    return pipe


def _dmd2_overrides(teacher_dir, out):
    return [f"teacher.path={teacher_dir}", f"train.output_dir={out}", "train.max_steps=4", "train.progress=false",
            "train.report_to=null", "train.sample_every_steps=2", "train.checkpoint_every_steps=2",
            "train.batch_size=8", "algorithm.params.regression_steps=1", "algorithm.params.regression_pairs=16",
            "algorithm.params.critic_warmup_steps=1"]


def test_help_lists_commands_and_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("demo", "teacher", "train", "sample", "export", "eval", "examples:"):
        assert word in out


def test_presets_listed(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out.split()
    assert "digits/dmd2" in out and "digits/teacher" in out and "sd15/dmd2" in out


def test_train_export_sample_eval(teacher_dir, tmp_path, capsys):
    run = tmp_path / "dmd2"
    assert main(["train", "digits/dmd2", *_dmd2_overrides(teacher_dir, run)]) == 0
    pipe = run / "pipeline"
    assert (pipe / "model_index.json").exists() and (pipe / "README.md").exists()
    assert (run / "config.yaml").exists()
    assert list((run / "samples").glob("*.png"))
    # re-export from the run folder (latest checkpoint)
    again = tmp_path / "again"
    assert main(["export", str(run), "--output", str(again)]) == 0
    assert (again / "model_index.json").exists()
    # sample grid
    grid = tmp_path / "grid.png"
    assert main(["sample", str(pipe), "--num-images", "8", "--output", str(grid)]) == 0
    assert grid.exists() and grid.stat().st_size > 0
    capsys.readouterr()
    # FID with the digits detector, JSON on the last line
    assert main(["eval", "fid", str(pipe), "digits", "--num-images", "64", "--json"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    report = json.loads(last)
    assert report["fid"] > 0 and "digits" in json.dumps(report).lower()


def test_resume_continues_a_killed_run(teacher_dir, tmp_path):
    run = tmp_path / "r"
    base = _dmd2_overrides(teacher_dir, run)
    assert main(["train", "digits/dmd2", *base, "train.max_steps=2", "--no-export"]) == 0
    assert (run / "checkpoints" / "checkpoint-0000002").exists()
    assert main(["train", "digits/dmd2", *base]) == 0  # resumes from step 2 (train.resume=latest)
    assert (run / "checkpoints" / "checkpoint-0000004").exists()
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert max(x["step"] for x in lines) >= 3


def test_dry_run_prints_resolved_config(capsys):
    assert main(["train", "digits/vsd", "train.max_steps=3", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 3" in out and "name: vsd" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "digits/dmd2", "train.max_stepz=3"], "did you mean 'train.max_steps'"),
        (["train", "digits/dmd2", "train.max_steps=abc"], "expected int"),
        (["train", "no/such/preset"], "no preset or YAML file"),
        (["train", "digits/dmd2", "algorithm.params.update_ration=2", "teacher.path=/nonexistent"], "update_ration"),
        (["train", "digits/dmd2", "teacher.path=/nonexistent/folder"], "neither a local folder"),
    ],
)
def test_bad_input_names_the_problem(argv, message, capsys, tmp_path):
    argv = [*argv, f"train.output_dir={tmp_path}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_teacher_folder_without_model_index(tmp_path, capsys):
    bad = tmp_path / "not-a-pipeline"
    bad.mkdir()
    (bad / "junk.txt").write_text("x")
    assert main(["train", "digits/dmd2", f"teacher.path={bad}", f"train.output_dir={tmp_path / 'o'}"]) == 2
    assert "model_index.json" in capsys.readouterr().err


def test_corrupt_config_file(tmp_path, capsys):
    f = tmp_path / "bad.yaml"
    f.write_text("train: {max_steps: [1, 2\n")
    assert main(["train", str(f)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_module_entry_point_for_accelerate(capsys):
    from stepdistill.train import main as train_main

    assert train_main(["digits/dmd2", "train.max_steps=1", "--dry-run"]) == 0
    assert "max_steps: 1" in capsys.readouterr().out


def test_export_of_missing_run(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), "--output", str(tmp_path / "x")]) == 2
    assert "config.yaml" in capsys.readouterr().err


def test_sample_of_non_pipeline(tmp_path, capsys):
    assert main(["sample", str(tmp_path), "--output", str(tmp_path / "g.png")]) == 2
    assert "model_index.json" in capsys.readouterr().err


def test_pipeline_dir_is_path(teacher_dir):
    assert isinstance(teacher_dir, Path)


def test_two_process_accelerate_launch_of_the_module(tmp_path):
    """`accelerate launch -m stepdistill.train` with 2 CPU processes (gloo) on the analytic preset.

    accelerate 1.15's `--cpu --num_processes 2` starts a single process; `--multi_gpu` with
    ACCELERATE_USE_CPU=1 runs torch.distributed with gloo on the CPU (documented in the README)."""
    import os
    import shutil
    import subprocess

    if shutil.which("accelerate") is None:
        pytest.skip("accelerate CLI not on PATH")
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf"))
    out = tmp_path / "run"
    import socket

    with socket.socket() as sock:  # a free port: the default 29500 may be held by another run on the machine
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", str(port),
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "stepdistill.train", "analytic/dmd2",
           f"train.output_dir={out}", "train.max_steps=4", "train.batch_size=16", "train.progress=false",
           "train.checkpoint_every_steps=2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((out / "checkpoints" / "checkpoint-0000004" / "trainer_state.json").read_text())
    assert state.get("world_size", state.get("num_processes")) == 2, state


@pytest.mark.parametrize(
    "preset,extra",
    [
        ("digits/msd_k2", ["algorithm.params.base_params.regression_steps=1",
                           "algorithm.params.base_params.regression_pairs=16",
                           "algorithm.params.base_params.critic_warmup_steps=0"]),
        ("digits/disback_dmd2", ["algorithm.params.base_params.regression_steps=1",
                                 "algorithm.params.base_params.regression_pairs=16",
                                 "algorithm.params.recording_steps=2", "algorithm.params.num_nodes=2",
                                 "algorithm.params.switch_every_steps=1"]),
        ("digits/boot", []),
        ("digits/vsd", []),
    ],
)
def test_other_algorithms_train_and_export(teacher_dir, tmp_path, preset, extra):
    from diffusers import DiffusionPipeline

    run = tmp_path / "run"
    argv = ["train", preset, f"teacher.path={teacher_dir}", f"train.output_dir={run}", "train.max_steps=4",
            "train.progress=false", "train.report_to=null", "train.sample_every_steps=0",
            "train.checkpoint_every_steps=100", "train.batch_size=8", *extra]
    assert main(argv) == 0
    pipe = DiffusionPipeline.from_pretrained(str(run / "pipeline"), trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=3, class_labels=[0, 3, 9], output_type="np").images  # stock ConsistencyModelPipeline needs batch_size
    assert images.shape[0] == 3
    if "disback" in preset:
        assert len(list((run / "disback_nodes").glob("node-*.safetensors"))) == 2
    # `stepdistill export RUN`: the algorithm names the groups to load and the pipeline to write
    # (MSD has no "generator" group: it exports its multi-student pipeline)
    again = tmp_path / "again"
    assert main(["export", str(run), "--output", str(again)]) == 0
    assert json.loads((again / "model_index.json").read_text()) == json.loads(
        (run / "pipeline" / "model_index.json").read_text())


#: where `stepdistill export RUN` (run.export_run) is tested for each registered algorithm
EXPORT_RUN_TESTS = {
    "dmd2": "test_train_export_sample_eval",
    "msd": "test_other_algorithms_train_and_export[digits/msd_k2]",
    "disback": "test_other_algorithms_train_and_export[digits/disback_dmd2]",
    "boot": "test_other_algorithms_train_and_export[digits/boot]",
    "vsd": "test_other_algorithms_train_and_export[digits/vsd]",
    "dd": "tests/test_distilled_decoding.py::test_run_ar_distillation_smoke",
}


def test_export_run_is_tested_for_every_registered_algorithm():
    from stepdistill.algorithms import REGISTRY

    assert set(REGISTRY) <= set(EXPORT_RUN_TESTS), f"add an export test for {set(REGISTRY) - set(EXPORT_RUN_TESTS)}"


def test_options_and_overrides_in_any_order(capsys):
    argv = ["train", "digits/dmd2", "--dry-run", "train.max_steps=5", "--no-export", "train.batch_size=3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "max_steps: 5" in out and "batch_size: 3" in out
    with pytest.raises(SystemExit):
        main(["train", "digits/dmd2", "--dry-run", "--bogus"])  # other unknown arguments still fail
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_no_export_before_overrides_trains_without_a_pipeline(teacher_dir, tmp_path):
    run = tmp_path / "run"
    overrides = [o for o in _dmd2_overrides(teacher_dir, run) if not o.startswith("train.max_steps")]
    assert main(["train", "digits/dmd2", "--no-export", "train.max_steps=1", *overrides]) == 0
    assert (run / "checkpoints" / "checkpoint-0000001").is_dir() and not (run / "pipeline").exists()


def test_help_shows_only_launch_forms_that_work(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    launches = [line for line in out.splitlines() if "accelerate launch" in line]
    assert launches and all("--multi_gpu" in line and "--cpu" not in line for line in launches)
    from stepdistill.train import main as train_main

    assert train_main(["--help"]) == 0
    doc = capsys.readouterr().out
    assert "--multi_gpu" in doc and "DeepSpeed" in doc and "launches are refused" in doc and "FSDP2" in doc


def test_demo_end_to_end_small(teacher_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--output", str(out), "--teacher", str(teacher_dir), "--num-images", "50",
            *_dmd2_overrides(teacher_dir, out / "dmd2")[1:]]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["student"]["nfe"] == 1 and report["student"]["fid"] > 0 and report["teacher"]["fid"] > 0
    assert (out / "samples.png").exists()
    assert "FID-digits-N50" in capsys.readouterr().out


def test_demo_teacher_baseline_is_ddim_on_the_teachers_schedule(teacher_dir):
    """The report says "teacher DDIM-10": the saved scheduler (DDPM, ancestral) must be swapped."""
    from stepdistill.demo import teacher_ddim_pipeline
    from stepdistill.eval.generate import load_pipeline

    saved = load_pipeline(teacher_dir).scheduler
    pipe = teacher_ddim_pipeline(teacher_dir)
    assert type(saved).__name__ == "DDPMScheduler" and type(pipe.scheduler).__name__ == "DDIMScheduler"
    for key in ("beta_schedule", "num_train_timesteps", "prediction_type"):
        assert pipe.scheduler.config[key] == saved.config[key]
