"""A 2-process CPU run (gloo) of the training loop under ``accelerate launch``.

Gradients are averaged by hand (no DDP), so: both ranks must end with identical weights, and the
2-process run must equal a 1-process run with 2 micro-batches (the loop maps micro-batch m of rank
r to virtual rank r * accum + m, so both see the same data and seeds).

Note: accelerate 1.15's ``launch --cpu --num_processes 2`` starts ONE process (the multi-CPU path
needs mpirun); ``--multi_gpu`` with ``ACCELERATE_USE_CPU=1`` runs torch.distributed.run with gloo
on CPU, which is what we want.  The script asserts the world size so a silent 1-process run fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from stepdistill.data.sources import ConditionSource
from stepdistill.training import train

SCRIPT = r"""
import importlib.util, json, sys
import torch
from safetensors.torch import save_file

spec = importlib.util.spec_from_file_location("toy_training", sys.argv[1])
toy = importlib.util.module_from_spec(spec)
spec.loader.exec_module(toy)
from stepdistill.data.sources import ConditionSource
from stepdistill.training import train

torch.set_num_threads(1)
out, accum = sys.argv[2], int(sys.argv[3])
d = toy.ToyDistiller()
cfg = toy.make_cfg(out, max_steps=4, batch_size=8, grad_accum_steps=accum, ema_decay=0.8, checkpoint_every_steps=2)
res = train(d, ConditionSource(d.gmm, seed=0), cfg)
acc = res["accelerator"]
r = acc.process_index
state = {f"generator.{k}": v for k, v in d.generator.state_dict().items()}
state.update({f"critic.{k}": v for k, v in d.critic.state_dict().items()})
state.update({f"ema.{k}": v for k, v in res["ema"].items()})
save_file({k: v.contiguous() for k, v in state.items()}, f"{out}/rank{r}.safetensors")
with open(f"{out}/rank{r}.json", "w") as f:
    json.dump({"world": acc.num_processes, "rank": r, "step": res["step"], "calls": d.generator_calls}, f)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not on PATH")
def test_two_process_run_averages_gradients(tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "train_toy.py"
    script.write_text(SCRIPT)
    test_file = Path(__file__).with_name("test_training.py")
    out2 = tmp_path / "two"
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf"))
    cmd = [
        "accelerate", "launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        str(script), str(test_file), str(out2), "1",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    infos = [json.loads((out2 / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["world"] for i in infos] == [2, 2] and [i["step"] for i in infos] == [4, 4]
    w0, w1 = load_file(str(out2 / "rank0.safetensors")), load_file(str(out2 / "rank1.safetensors"))
    for k in w0:
        assert torch.equal(w0[k], w1[k]), f"{k} differs between ranks: gradients were not averaged"
    # only the main process wrote checkpoints, atomically, with the limit respected
    assert sorted(p.name for p in (out2 / "checkpoints").iterdir()) == [
        "checkpoint-0000002",
        "checkpoint-0000004",
    ]
    state = json.loads((out2 / "checkpoints" / "checkpoint-0000004" / "trainer_state.json").read_text())
    assert state["world_size"] == 2

    # 1 process x 2 micro-batches == 2 processes x 1 micro-batch (same data, same seeds, mean gradient)
    spec = importlib.util.spec_from_file_location("toy_training_ref", test_file)
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    out1 = tmp_path / "one"
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        d = toy.ToyDistiller()
        cfg = toy.make_cfg(
            out1, max_steps=4, batch_size=8, grad_accum_steps=2, ema_decay=0.8, checkpoint_every_steps=2
        )
        res = train(d, ConditionSource(d.gmm, seed=0), cfg)
    finally:
        torch.set_num_threads(n_threads)
    ref = {f"generator.{k}": v for k, v in d.generator.state_dict().items()}
    ref.update({f"critic.{k}": v for k, v in d.critic.state_dict().items()})
    ref.update({f"ema.{k}": v for k, v in res["ema"].items()})
    assert ref.keys() == w0.keys()
    for k in ref:
        torch.testing.assert_close(
            w0[k], ref[k], rtol=1e-5, atol=1e-6, msg=f"{k}: 2-process != 1-process x 2"
        )
    # gradient norms (logged after averaging) agree step by step: a SUM without the division would
    # double them (Adam alone would hide that in the weights)
    log2 = [json.loads(x) for x in (out2 / "log.jsonl").read_text().splitlines()]
    log1 = [json.loads(x) for x in (out1 / "log.jsonl").read_text().splitlines()]
    assert len(log1) == len(log2) == 4
    for a, b in zip(log2, log1):
        for key in ("grad_norm/critic", "loss/critic"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), (key, a, b)
        if "grad_norm/generator" in b:
            assert a["grad_norm/generator"] == pytest.approx(b["grad_norm/generator"], rel=1e-4)
