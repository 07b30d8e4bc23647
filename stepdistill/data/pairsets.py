"""Teacher-generated pair sets on disk: sharded, keyed, resumable, split over ranks, streamed.

A :class:`PairStore` is a folder ``<root>/<key>/``:

* ``index.json`` -- the format, the key, every setting the pairs depend on (teacher weights digest,
  sampler, steps, guidance, seed, prompt source, ...), ``num_rows`` and ``shard_size``;
* ``pairs-<i:05d>.safetensors`` -- rows ``[i * S, min((i + 1) * S, N))``, tensors of equal first
  dimension; string columns (prompts) travel in the file's metadata as JSON.

``key`` is a sha256 of the settings, so another teacher or config never reuses a set, and the
same config always does.  Shard ``i`` must be a pure function of ``i`` (its noise comes from a
generator seeded by ``(seed, i)``), so the set does not depend on how generation was split or
interrupted: :meth:`PairStore.ensure` lets process ``rank`` of ``world`` make the shards
``i = rank (mod world)`` first (on its own device), waits for the others, then fills any shard still
missing; every write is atomic (temporary file + ``os.replace``), so a killed generation resumes
with the shards it already wrote.

Reading is streamed: :meth:`PairStore.rows` reads only the requested rows, through safetensors'
memory-mapped slices (a handful of files kept open), so no process holds the whole set in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["PairStore", "weight_digest", "dist_rank_world"]


def weight_digest(module: nn.Module, sample: int = 512) -> str:
    """A cheap fingerprint of a network's weights: names, shapes, dtypes and the first and last
    ``sample`` values of every parameter and buffer (not a full hash: a 2.6B-parameter UNet is
    fingerprinted without reading all of it; two checkpoints that differ only in the middle of
    every tensor would collide, which fine-tunes and other models do not)."""
    h = hashlib.sha256()
    for name, t in list(module.state_dict().items()):
        if not isinstance(t, Tensor):
            continue
        flat = t.detach().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        part = torch.cat([flat[:sample], flat[-sample:]]) if flat.numel() > 2 * sample else flat
        h.update(part.float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def dist_rank_world() -> tuple[int, int]:
    """``(rank, world)`` of the initialised default process group, else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


class PairStore:
    """A keyed, sharded pair set (see the module docstring)."""

    FORMAT = 1

    def __init__(self, root: str | Path, settings: dict, num_rows: int, shard_size: int = 256,
                 max_open: int = 16):
        if num_rows < 1 or shard_size < 1:
            raise ValueError(f"a pair set needs num_rows >= 1 and shard_size >= 1, got {num_rows}, {shard_size}")
        self.settings = dict(settings)
        self.num_rows, self.shard_size = int(num_rows), int(shard_size)
        text = json.dumps({"format": self.FORMAT, "settings": self.settings, "num_rows": self.num_rows,
                           "shard_size": self.shard_size}, sort_keys=True, default=str)
        self.key = hashlib.sha256(text.encode()).hexdigest()[:16]
        self.folder = Path(root) / self.key
        self.max_open = int(max_open)
        self._open: OrderedDict[int, Any] = OrderedDict()
        self._meta: dict[int, dict] = {}

    # -- files ------------------------------------------------------------------------------------
    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_rows / self.shard_size)

    def shard_rows(self, i: int) -> range:
        return range(i * self.shard_size, min((i + 1) * self.shard_size, self.num_rows))

    def shard_path(self, i: int) -> Path:
        return self.folder / f"pairs-{i:05d}.safetensors"

    def missing(self) -> list[int]:
        return [i for i in range(self.num_shards) if not self.shard_path(i).exists()]

    def is_complete(self) -> bool:
        return not self.missing()

    def _write_index(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        index = self.folder / "index.json"
        if index.exists():
            return
        tmp = self.folder / f".index.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps({"format": self.FORMAT, "key": self.key, "num_rows": self.num_rows,
                                   "shard_size": self.shard_size, "settings": self.settings},
                                  indent=2, sort_keys=True, default=str))
        os.replace(tmp, index)

    def write_shard(self, i: int, tensors: dict[str, Tensor], strings: dict[str, list[str]] | None = None) -> None:
        """Atomically write shard ``i`` (tensors moved to the CPU; ``strings`` in the metadata)."""
        from safetensors.torch import save_file

        n = len(self.shard_rows(i))
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        for k, v in tensors.items():
            if v.shape[0] != n:
                raise ValueError(f"shard {i} column {k!r} has {v.shape[0]} rows, expected {n}")
        meta = {"key": self.key, "shard": str(i)}
        for k, v in (strings or {}).items():
            if len(v) != n:
                raise ValueError(f"shard {i} column {k!r} has {len(v)} rows, expected {n}")
            meta[f"strings:{k}"] = json.dumps(list(v))
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".pairs-{i:05d}.tmp-{os.getpid()}.safetensors"
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, self.shard_path(i))

    # -- generation -------------------------------------------------------------------------------
    def ensure(self, make_shard: Callable[[int, range], tuple[dict[str, Tensor], dict[str, list[str]] | None]],
               rank: int | None = None, world: int | None = None, max_new_shards: int | None = None,
               log: Callable[[str], None] | None = None, fill_missing: bool = True) -> int:
        """Write the missing shards; returns how many this process wrote.

        ``make_shard(i, rows) -> (tensors, strings)`` builds shard ``i``.  Process ``rank`` of
        ``world`` (default: the initialised process group) writes the shards ``i = rank (mod
        world)``, all processes then meet at a barrier, and any shard still missing (a process
        stopped early) is made by whoever finds it missing (unless ``fill_missing=False``).
        ``max_new_shards`` stops early (tests of resumption)."""
        if rank is None or world is None:
            rank, world = dist_rank_world()
        self._write_index()
        written = 0

        def run(order):
            nonlocal written
            for i in order:
                if self.shard_path(i).exists():
                    continue
                if max_new_shards is not None and written >= max_new_shards:
                    return False
                tensors, strings = make_shard(i, self.shard_rows(i))
                self.write_shard(i, tensors, strings)
                written += 1
                if log is not None:
                    log(f"pair set {self.folder.name}: wrote shard {i + 1}/{self.num_shards}")
            return True

        if not run(range(rank, self.num_shards, world)):
            return written
        if world > 1:
            _barrier()
        if fill_missing:
            run(self.missing())
        return written

    # -- streamed reading ---------------------------------------------------------------------------
    def _handle(self, i: int):
        from safetensors import safe_open

        f = self._open.get(i)
        if f is None:
            path = self.shard_path(i)
            if not path.exists():
                raise FileNotFoundError(f"pair set {self.folder} has no shard {i}; generate it first (ensure())")
            f = safe_open(str(path), framework="pt", device="cpu")
            meta = f.metadata() or {}
            if meta.get("key") != self.key:
                raise ValueError(f"{path} belongs to pair set {meta.get('key')}, not {self.key}")
            self._meta[i] = {k[len("strings:"):]: json.loads(v) for k, v in meta.items() if k.startswith("strings:")}
            self._open[i] = f
            while len(self._open) > self.max_open:
                old, _ = self._open.popitem(last=False)
                self._meta.pop(old, None)
        else:
            self._open.move_to_end(i)
        return f

    def rows(self, index: Tensor | list[int]) -> dict[str, Any]:
        """The requested rows (in order) of every column: CPU tensors, string columns as lists.
        Only the shards holding them are opened, and only those rows are read."""
        idx = [int(i) for i in (index.tolist() if isinstance(index, Tensor) else index)]
        if any(not 0 <= i < self.num_rows for i in idx):
            raise IndexError(f"pair set rows must lie in [0, {self.num_rows})")
        parts: dict[str, list] = {}
        for r in idx:
            s, j = divmod(r, self.shard_size)
            f = self._handle(s)
            for k in f.keys():
                parts.setdefault(k, []).append(f.get_slice(k)[j : j + 1])
            for k, v in self._meta[s].items():
                parts.setdefault(k, []).append(v[j])
        return {k: (torch.cat(v) if v and isinstance(v[0], Tensor) else v) for k, v in parts.items()}

    def close(self) -> None:
        self._open.clear()
        self._meta.clear()
