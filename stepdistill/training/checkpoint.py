"""Checkpoints: plain files, written atomically, read back without unpickling code.

Layout of ``<output_dir>/checkpoints/checkpoint-<step:07d>/`` (``step`` = optimizer steps done):

* ``<group>.safetensors``      -- ``module.state_dict()`` of each trainable group (tied tensors cloned)
* ``<group>_ema.safetensors``  -- the EMA group's state dict with averaged parameters (if EMA is on)
* ``optimizer-<group>.pt``, ``scheduler-<group>.pt`` (and ``scaler-<group>.pt`` with fp16) --
  ``torch.save`` of state dicts, read with ``torch.load(weights_only=True)``
* ``extra.json``               -- ``distiller.state_dict_extra()`` (non-parameter algorithm state)
* ``trainer_state.json``       -- step, config hash, groups, world size, EMA counters; written last

The folder is written as ``checkpoint-<step>.tmp-<pid>`` and renamed with ``os.replace``, so a
folder named ``checkpoint-<step>`` is always complete; a killed run leaves at most a ``.tmp-``
folder, which :func:`latest_checkpoint` ignores and :func:`clean_stale_tmp` removes.

A checkpoint can still be damaged afterwards (a full disk, a copy cut short, a file deleted by
hand).  :func:`check_checkpoint` finds that without loading tensors (every file the trainer state
lists is present; safetensors headers and sizes agree; ``.pt`` zip archives and JSON files are
readable), and :func:`resolve_resume` / :func:`select_checkpoint` skip a damaged newest
checkpoint with a warning naming it, falling back to the newest intact one; an explicitly named
damaged checkpoint is refused with the exact option to pass instead.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import StepdistillError

__all__ = [
    "CheckpointError",
    "check_checkpoint",
    "newest_intact_checkpoint",
    "select_checkpoint",
    "CHECKPOINT_FORMAT",
    "checkpoints_dir",
    "checkpoint_path",
    "list_checkpoints",
    "latest_checkpoint",
    "resolve_resume",
    "clean_stale_tmp",
    "save_checkpoint",
    "load_checkpoint",
    "load_checkpoint_weights",
    "read_trainer_state",
    "rotate_checkpoints",
]

CHECKPOINT_FORMAT = 1
_NAME = re.compile(r"^checkpoint-(\d+)$")
_TMP = re.compile(r"^checkpoint-\d+\.tmp-(\d+)$")
STATE_FILE = "trainer_state.json"


logger = logging.getLogger("stepdistill.training")


class CheckpointError(StepdistillError, RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the run; the message names the path."""

    exit_code = 3


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(output_dir) / f"checkpoint-{step:07d}"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints ``(step, path)``, oldest first (``.tmp-`` folders are ignored)."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run folder, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def read_trainer_state(path: str | Path) -> dict:
    path = Path(path)
    f = path / STATE_FILE
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a folder)")
    if not f.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: it has no {STATE_FILE}")
    try:
        state = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: cannot read {STATE_FILE}: {e}") from e
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"checkpoint {path} is corrupt: {STATE_FILE} has no integer 'step'")
    return state


# ---------------------------------------------------------------------------------------------
# integrity


def _check_safetensors(f: Path) -> None:
    """Header parses and the file is exactly as long as its header says (catches truncation)."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{f.name} is truncated ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"{f.name} is truncated (header of {n} bytes, file of {size})")
        header = json.loads(fh.read(n))
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if size != 8 + n + end:
        raise ValueError(f"{f.name} is truncated or padded ({size} bytes, its header needs {8 + n + end})")


def _check_pt(f: Path) -> None:
    with zipfile.ZipFile(f) as z:  # torch.save writes a zip archive; a cut-off file has no directory
        if not z.namelist():
            raise ValueError(f"{f.name} is an empty archive")


def check_checkpoint(path: str | Path) -> str | None:
    """``None`` if the checkpoint folder looks intact, else one sentence naming the damaged file.

    Reads headers only: the trainer state, every group's ``.safetensors`` (header vs file size),
    optimizer / scheduler ``.pt`` archives, the EMA file the state announces and ``extra.json``."""
    path = Path(path)
    try:
        state = read_trainer_state(path)
    except CheckpointError as e:
        return str(e)
    groups = state.get("groups") or [p.stem for p in path.glob("*.safetensors") if not p.stem.endswith("_ema")]
    need: list[Path] = []
    for g in groups:
        need += [path / f"{g}.safetensors", path / f"optimizer-{g}.pt", path / f"scheduler-{g}.pt"]
    ema = state.get("ema")
    if isinstance(ema, dict) and ema.get("group"):
        need.append(path / f"{ema['group']}_ema.safetensors")
    for f in need:
        if not f.is_file():
            return f"checkpoint {path} is incomplete: {f.name} is missing"
    for f in sorted(path.iterdir()):
        try:
            if f.suffix == ".safetensors":
                _check_safetensors(f)
            elif f.suffix == ".pt":
                _check_pt(f)
            elif f.suffix == ".json":
                json.loads(f.read_text())
        except (OSError, ValueError, KeyError, TypeError, IndexError, zipfile.BadZipFile) as e:
            return f"checkpoint {path} is corrupt: cannot read {f.name}: {e}"
    return None


def newest_intact_checkpoint(output_dir: str | Path, warn=None) -> Path | None:
    """The newest checkpoint of a run folder that :func:`check_checkpoint` passes (None if none);
    each damaged newer one is reported through ``warn`` (default: a logging warning)."""
    warn = logger.warning if warn is None else warn
    found = list_checkpoints(output_dir)
    for _step, p in reversed(found):
        problem = check_checkpoint(p)
        if problem is None:
            return p
        warn(f"skipping damaged checkpoint {p}: {problem}")
    return None


def _damaged_run(output_dir: Path, option: str, problems: list[str]) -> CheckpointError:
    return CheckpointError(
        f"no intact checkpoint in {checkpoints_dir(output_dir)} ({'; '.join(problems) or 'none complete'}); "
        f"start fresh with {option}=null in another folder, or repair the files"
    )


def _pick(path: Path, option: str, what: str) -> Path:
    """An explicitly named checkpoint (folder) or run folder (its newest intact checkpoint)."""
    if not path.exists():
        raise CheckpointError(f"{option}: {what} {path} does not exist")
    if (path / STATE_FILE).exists() or _NAME.match(path.name):
        problem = check_checkpoint(path)
        if problem is not None:
            run = path.parent.parent
            alt = [p for _, p in list_checkpoints(run) if p != path and check_checkpoint(p) is None]
            fix = (f"pass {option} {alt[-1]}" if option.startswith("--") else f"pass {option}={alt[-1]}") \
                if alt else "no other intact checkpoint is left in that run"
            raise CheckpointError(f"{option}: {problem}; {fix}")
        return path
    if checkpoints_dir(path).is_dir():
        problems: list[str] = []
        found = newest_intact_checkpoint(path, warn=problems.append)
        for msg in problems:
            logger.warning("%s", msg)
        if found is None:
            raise _damaged_run(path, option, problems)
        return found
    raise CheckpointError(f"{option}: {path} is neither a checkpoint folder nor a run folder with checkpoints/")


def resolve_resume(resume: str | None, output_dir: str | Path, warn=None) -> Path | None:
    """``None`` -> fresh start; ``"latest"`` -> newest intact checkpoint or fresh; else that path.

    A path may name a checkpoint folder, or a run folder (its newest intact checkpoint is taken).
    With ``"latest"`` a damaged newer checkpoint is skipped with a warning (``warn``); if every
    checkpoint is damaged the resume is refused (a fresh start would silently lose them)."""
    if resume is None or resume == "" or str(resume).lower() in ("none", "null", "false"):
        return None
    if resume == "latest":
        if not list_checkpoints(output_dir):
            return None
        problems: list[str] = []
        found = newest_intact_checkpoint(output_dir, warn=problems.append)
        for msg in problems:
            (warn or logger.warning)(f"{msg}; resuming from the newest intact checkpoint instead")
        if found is None:
            raise CheckpointError(
                f"train.resume=latest: every checkpoint in {checkpoints_dir(output_dir)} is damaged "
                f"({'; '.join(problems)}); repair or remove them, or use another train.output_dir"
            )
        return found
    return _pick(Path(resume).expanduser(), "train.resume", "checkpoint")


def select_checkpoint(run_dir: str | Path, checkpoint: str | Path = "latest", option: str = "--checkpoint",
                      warn=None) -> Path:
    """The checkpoint an export (or anything reading a finished run) should use.

    ``"latest"``: the newest intact checkpoint of ``run_dir`` (a damaged newer one is skipped with
    a warning naming it); a path: that checkpoint, refused when damaged with the ``--checkpoint``
    to pass instead."""
    run_dir = Path(run_dir)
    if str(checkpoint) == "latest":
        problems: list[str] = []
        found = newest_intact_checkpoint(run_dir, warn=problems.append)
        for msg in problems:
            (warn or logger.warning)(f"{msg}; using {found} instead" if found else msg)
        if found is None:
            if not problems:
                raise CheckpointError(
                    f"{run_dir} has no complete checkpoint under checkpoints/; train first "
                    "(stepdistill train ... train.output_dir=RUN)"
                )
            raise CheckpointError(
                f"{run_dir} has no intact checkpoint ({'; '.join(problems)}); nothing to export"
            )
        return found
    return _pick(Path(checkpoint).expanduser(), option, "checkpoint")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def clean_stale_tmp(output_dir: str | Path) -> list[Path]:
    """Remove ``checkpoint-*.tmp-<pid>`` folders left by killed runs.

    Called before a run writes anything, so folders carrying this process's own pid are stale too
    (containers often reuse pids across restarts); those of other live processes are left alone.
    """
    root = checkpoints_dir(output_dir)
    removed = []
    if not root.is_dir():
        return removed
    for p in root.iterdir():
        m = _TMP.match(p.name)
        if m and (int(m.group(1)) == os.getpid() or not _pid_alive(int(m.group(1)))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


# ---------------------------------------------------------------------------------------------
# tensors


def module_state_for_save(state: dict[str, Any]) -> dict[str, Tensor]:
    """A safetensors-ready copy of a state dict: tensors only, contiguous, no shared storage."""
    out: dict[str, Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for k, v in state.items():
        if not isinstance(v, Tensor):
            raise CheckpointError(
                f"state dict entry {k!r} is a {type(v).__name__}, not a tensor; safetensors checkpoints hold "
                "tensors only (keep non-tensor state in distiller.state_dict_extra())"
            )
        v = v.detach()
        key = (v.untyped_storage().data_ptr(), v.device.index or 0) if v.numel() else None
        if key is not None and key in seen:
            v = v.clone()
        elif key is not None:
            seen.add(key)
        out[k] = v.contiguous()
    return out


def fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def write_files(
    folder: Path,
    *,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    schedulers: dict[str, Any],
    scalers: dict[str, Any],
    ema: tuple[str, Any] | None,
    extra: dict | None,
    trainer_state: dict,
    module_states: dict[str, dict] | None = None,
    optimizer_states: dict[str, Any] | None = None,
    ema_state: dict | None = None,
) -> None:
    """Write one checkpoint's files into ``folder``, ``trainer_state.json`` last (it marks the
    folder complete).  ``module_states`` / ``optimizer_states`` / ``ema_state`` replace what the
    objects would give (the sharded trainer passes gathered full weights and sharded-optimizer
    markers)."""
    for name, module in modules.items():
        state = module_states[name] if module_states is not None else module.state_dict()
        save_file(module_state_for_save(state), str(folder / f"{name}.safetensors"))
    for name, opt in optimizers.items():
        state = optimizer_states[name] if optimizer_states is not None else opt.state_dict()
        torch.save(state, folder / f"optimizer-{name}.pt")
    for name, sched in schedulers.items():
        torch.save(sched.state_dict(), folder / f"scheduler-{name}.pt")
    for name, scaler in scalers.items():
        torch.save(scaler.state_dict(), folder / f"scaler-{name}.pt")
    if ema is not None:
        group, ema_obj = ema
        state = ema_state if ema_state is not None else ema_obj.state_dict_for(modules[group])
        save_file(module_state_for_save(state), str(folder / f"{group}_ema.safetensors"))
    if extra is not None:
        write_json(folder / "extra.json", extra)
    for f in folder.iterdir():
        if f.is_file():
            fsync_path(f)
    write_json(folder / STATE_FILE, trainer_state)  # last: marks the folder complete
    fsync_path(folder / STATE_FILE)


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    schedulers: dict[str, Any],
    scalers: dict[str, Any] | None = None,
    ema: tuple[str, Any] | None = None,
    extra: dict | None = None,
    trainer_state: dict | None = None,
    writer: Callable[..., None] | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically (main process only) and return its path."""
    final = checkpoint_path(output_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": int(step),
        "groups": list(modules),
        "time": time.time(),
        **(trainer_state or {}),
    }
    if ema is not None:
        state["ema"] = {
            "group": ema[0],
            "decay": ema[1].decay,
            "warmup": ema[1].warmup,
            "num_updates": ema[1].num_updates,
        }
    try:
        (writer or write_files)(
            tmp,
            modules=modules,
            optimizers=optimizers,
            schedulers=schedulers,
            scalers=scalers or {},
            ema=ema,
            extra=extra,
            trainer_state=state,
        )
        if final.exists():  # e.g. a re-run over the same step: swap, then delete the old one
            old = final.with_name(f"{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_path(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def rotate_checkpoints(output_dir: str | Path, total_limit: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond ``total_limit``; returns what was removed."""
    if total_limit is None:
        return []
    found = list_checkpoints(output_dir)
    removed = []
    for _, p in found[: max(0, len(found) - total_limit)]:
        # rename first so that a crash mid-delete never leaves a half-deleted "checkpoint-N"
        trash = p.with_name(f"{p.name}.tmp-{os.getpid()}")
        try:
            os.replace(p, trash)
        except OSError:
            trash = p
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(p)
    return removed


# ---------------------------------------------------------------------------------------------
# loading


def _load_tensors(path: Path, device: torch.device | str = "cpu") -> dict[str, Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path.parent} is incomplete: {path.name} is missing")
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types
        raise CheckpointError(f"checkpoint {path.parent} is corrupt: cannot read {path.name}: {e}") from e


def load_pt(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path.parent} is incomplete: {path.name} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {path.parent} is corrupt: cannot read {path.name}: {e}") from e


def load_checkpoint_weights(path: str | Path, group: str, ema: bool = False) -> dict[str, Tensor]:
    """The CPU state dict of one group's module (``"generator"``), or of its EMA with ``ema=True``.

    ``group="generator_ema"`` is the same as ``group="generator", ema=True``.
    """
    path = Path(path)
    read_trainer_state(path)
    name = f"{group}_ema" if ema else group
    f = path / f"{name}.safetensors"
    if not f.is_file():
        have = sorted(p.stem for p in path.glob("*.safetensors"))
        hint = " (EMA was off for this run: train.ema_decay)" if ema else ""
        raise CheckpointError(
            f"checkpoint {path} has no weights for {name!r}{hint}; it has: {', '.join(have)}"
        )
    return _load_tensors(f)


def load_checkpoint(
    path: str | Path,
    *,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    schedulers: dict[str, Any],
    scalers: dict[str, Any] | None = None,
    ema: tuple[str, Any] | None = None,
) -> tuple[dict, dict | None]:
    """Restore everything written by :func:`save_checkpoint`; returns (trainer_state, extra)."""
    path = Path(path)
    state = read_trainer_state(path)
    saved_groups = state.get("groups")
    if saved_groups is not None and sorted(saved_groups) != sorted(modules):
        raise CheckpointError(
            f"checkpoint {path} holds groups {sorted(saved_groups)} but the distiller trains {sorted(modules)}"
        )
    for name, module in modules.items():
        device = next(iter(module.state_dict().values())).device if module.state_dict() else "cpu"
        tensors = _load_tensors(path / f"{name}.safetensors", device)
        try:
            module.load_state_dict(tensors, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint {path}: weights of {name!r} do not fit the model: {e}") from e
    for name, opt in optimizers.items():
        try:
            opt.load_state_dict(load_pt(path / f"optimizer-{name}.pt"))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {path}: optimizer state of {name!r} does not fit: {e}") from e
    for name, sched in schedulers.items():
        sched.load_state_dict(load_pt(path / f"scheduler-{name}.pt"))
    for name, scaler in (scalers or {}).items():
        f = path / f"scaler-{name}.pt"
        if f.is_file():
            scaler.load_state_dict(load_pt(f))
    if ema is not None:
        group, ema_obj = ema
        f = path / f"{group}_ema.safetensors"
        meta = state.get("ema") or {}
        if f.is_file():
            try:
                ema_obj.load_shadow(_load_tensors(f), int(meta.get("num_updates", 0)))
            except KeyError as e:
                raise CheckpointError(f"checkpoint {path}: EMA weights do not fit {group!r}: {e}") from e
        # else: EMA newly enabled on resume -> it starts from the resumed weights (already the case)
    extra = None
    f = path / "extra.json"
    if f.is_file():
        try:
            extra = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"checkpoint {path} is corrupt: cannot read extra.json: {e}") from e
    return state, extra
