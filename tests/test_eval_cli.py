"""CLI smoke tests: `python -m stepdistill.eval ...` and the sub-parsers the main CLI mounts."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from stepdistill.eval.cli import add_eval_subparsers, main
from stepdistill.eval.generate import save_images, uniform_labels
from stepdistill.eval.inputs import load_dataset_images
from stepdistill.eval.testing import tiny_digits_detector_dir


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """$STEPDISTILL_CACHE with the (quickly trained) digits detector already in place."""
    root = tmp_path / "cache"
    shutil.copytree(tiny_digits_detector_dir(), root / "detectors" / "digits-v1")
    monkeypatch.setenv("STEPDISTILL_CACHE", str(root))
    return root


def _last_json(capsys):
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def test_fid_json_last_line(cache, capsys):
    rc = main(["fid", "digits-a", "digits-b", "--json", "--no-progress"])
    assert rc == 0
    res = _last_json(capsys)
    n = load_dataset_images("digits-a")[0].shape[0]
    assert res["metric"] == f"FID-digits-N{n}" and res["fid_detector"] == "digits-classifier"
    assert isinstance(res["fid"], float) and 0 < res["fid"] < 5
    assert res["n_a"] == n and res["detector"]["name"] == "digits-classifier"
    assert "Inception" not in json.dumps(res) and "inception" not in res["metric"].lower()
    # the reference stats landed in the cache; a second run gives the same number
    assert list((cache / "reference").glob("*.npz"))
    main(["fid", "digits-a", "digits-b", "--json", "--no-progress"])
    assert _last_json(capsys)["fid"] == res["fid"]
    # readable table otherwise
    assert main(["fid", "digits-a", "digits-b", "--no-progress", "--num-images", "300"]) == 0
    table = capsys.readouterr().out
    assert "FID-digits-N300" in table and "digits-classifier" in table


def test_stats_then_fid_against_file(cache, tmp_path, capsys):
    out = tmp_path / "ref.npz"
    assert main(["stats", "digits-b", "--output", str(out), "--json", "--no-progress"]) == 0
    st = _last_json(capsys)
    assert st["feature_dim"] == 64 and out.is_file()
    assert main(["fid", "digits-a", str(out), "--json", "--no-progress"]) == 0
    via_file = _last_json(capsys)["fid"]
    main(["fid", "digits-a", "digits-b", "--json", "--no-progress"])
    assert via_file == pytest.approx(_last_json(capsys)["fid"], rel=1e-12)


def test_accuracy_on_labelled_folder(cache, tmp_path, capsys):
    x, y = load_dataset_images("digits-b", 200)
    save_images(tmp_path / "imgs", x, labels=y)
    assert main(["accuracy", str(tmp_path / "imgs"), "--json", "--no-progress"]) == 0
    res = _last_json(capsys)
    assert res["metric"] == "class_accuracy" and res["n"] == 200 and res["class_accuracy"] > 0.85
    # wrong labels -> low accuracy (the number is real)
    save_images(tmp_path / "wrong", x, labels=(y + 1) % 10)
    main(["accuracy", str(tmp_path / "wrong"), "--json", "--no-progress"])
    assert _last_json(capsys)["class_accuracy"] < 0.2
    # unlabelled folder -> input error
    save_images(tmp_path / "nolabels", x[:5])
    assert main(["accuracy", str(tmp_path / "nolabels")]) == 2
    assert "carry no class labels" in capsys.readouterr().err


def test_train_detector(tmp_path, capsys):
    rc = main(["train-detector", "--dataset", "digits", "--output", str(tmp_path / "d"), "--steps", "5",
               "--train-split", "a", "--eval-split", "b", "--json", "--no-progress"])
    assert rc == 0
    res = _last_json(capsys)
    assert len(res["sha256"]) == 64 and 0 <= res["eval_accuracy"] <= 1 and res["eval_split"] == "b"
    assert (tmp_path / "d" / "model.safetensors").is_file()
    assert main(["train-detector", "--dataset", "mnist", "--output", str(tmp_path / "e")]) == 2


def test_bad_inputs_exit_2(cache, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["fid", str(tmp_path / "empty"), "digits-b"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "empty: folder contains no images" in err
    assert main(["fid", str(tmp_path / "missing"), "digits-b"]) == 2
    assert "no such file, folder or dataset" in capsys.readouterr().err
    mixed = tmp_path / "mixed"
    save_images(mixed, np.zeros((2, 1, 8, 8), np.uint8))
    save_images(mixed, np.zeros((1, 1, 9, 9), np.uint8), start_index=2)
    assert main(["fid", str(mixed), "digits-b"]) == 2
    err = capsys.readouterr().err
    assert "000000.png is 8x8" in err and "000002.png is 9x9" in err
    assert main(["fid", "digits-a", "digits-b", "--detector", "inception",
                 "--inception-weights", str(tmp_path / "nope.pth")]) == 2
    err = capsys.readouterr().err
    assert "nope.pth" in err or "pip install" in err
    one = tmp_path / "one"
    save_images(one, np.zeros((1, 1, 8, 8), np.uint8))
    assert main(["fid", str(one), "digits-b", "--no-cache"]) == 2
    assert "too few" in capsys.readouterr().err


def test_mounted_under_host_cli(cache, capsys):
    parser = argparse.ArgumentParser(prog="stepdistill")
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_subparsers(sub)
    args = parser.parse_args(["eval", "fid", "digits-a", "digits-b", "--json", "--no-progress",
                              "--num-images", "200", "--batch-size", "17"])
    assert args.command == "eval" and args.eval_command == "fid"
    assert args.func(args) == 0
    assert _last_json(capsys)["metric"] == "FID-digits-N200"


def test_python_dash_m(cache, tmp_path):
    x, _ = load_dataset_images("digits-a", 100)
    save_images(tmp_path / "a", x, labels=uniform_labels(100, 10))
    env = {**os.environ, "STEPDISTILL_CACHE": str(cache)}
    p = subprocess.run([sys.executable, "-m", "stepdistill.eval", "fid", str(tmp_path / "a"), "digits-a",
                        "--json", "--no-progress"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["metric"] == "FID-digits-N100" and res["fid"] > 0
