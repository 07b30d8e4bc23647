"""A finished multi-process run destroys its process group before the interpreter exits.

Without it gloo's worker threads are torn down during interpreter finalisation and a rank can
abort with ``terminate called without an active exception`` (SIGABRT) after all its work is done
-- seen once in CI on the 2-process ``accelerate launch`` test."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_close_process_group_destroys_an_initialised_group(tmp_path):
    code = textwrap.dedent(f"""
        import torch.distributed as dist
        from stepdistill.training.distributed import close_process_group
        assert close_process_group() is False          # nothing to close
        dist.init_process_group("gloo", init_method="file://{tmp_path}/store", rank=0, world_size=1)
        assert dist.is_initialized()
        assert close_process_group() is True
        assert not dist.is_initialized()
        print("closed")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "closed" in proc.stdout


def test_cli_train_closes_the_process_group_after_success(tmp_path, monkeypatch):
    import stepdistill.training.distributed as distributed
    from stepdistill.cli import main

    calls = []
    monkeypatch.setattr(distributed, "close_process_group", lambda: calls.append("closed") or False)
    out = tmp_path / "run"
    assert main(["train", "analytic/dmd2", f"train.output_dir={out}", "train.max_steps=2", "train.batch_size=8",
                 "train.progress=false", "--no-export"]) == 0
    assert calls == ["closed"]


def test_cli_train_does_not_wait_for_other_ranks_after_a_failure(tmp_path, monkeypatch):
    import pytest

    import stepdistill.run as run
    import stepdistill.training.distributed as distributed
    from stepdistill.cli import main

    calls = []
    monkeypatch.setattr(distributed, "close_process_group", lambda: calls.append("closed") or False)

    def boom(*a, **k):
        raise RuntimeError("training failed")

    monkeypatch.setattr(run, "run_distillation", boom)
    with pytest.raises(RuntimeError, match="training failed"):
        main(["train", "analytic/dmd2", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2"])
    assert calls == []  # a barrier here would hang a rank that failed alone
