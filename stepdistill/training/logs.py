"""Logging helpers of the trainer: device-side running means, flat tracker configs, log files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


class Meter:
    """Running means of scalars; tensors stay on device until :meth:`flush` (one sync per log)."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def add(self, key: str, value: Any) -> None:
        if isinstance(value, Tensor):
            value = value.detach().float().reshape(())
        self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.counts[key] = self.counts.get(key, 0) + 1

    def flush(self) -> dict[str, float]:
        """Means since the last flush, as floats: one device-to-host copy for all tensor values."""
        keys = [k for k, v in self.sums.items() if isinstance(v, Tensor)]
        values = dict(zip(keys, torch.stack([self.sums[k].to(self.sums[keys[0]].device) for k in keys]).tolist())
                      if keys else [])
        out = {k: float(values.get(k, v)) / self.counts[k] for k, v in self.sums.items()}
        self.sums.clear()
        self.counts.clear()
        return out


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop log lines of steps a resumed run will redo."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line).get("step", 0)) <= max_step:
                keep.append(line)
        except (ValueError, AttributeError):
            continue
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
