"""Distilled Decoding 1 (Liu, Ning, Wang, Lin; ICLR 2025, arXiv 2412.17153): one-/two-step sampling
of an autoregressive image model through a deterministic noise -> token map built by flow matching.

The pieces (research notes ``algos_boot_dd_msd.md`` §2):

1. **Per-token closed-form flow** (§2.2).  The teacher's next-token distribution ``p`` (after CFG,
   temperature, top-k/top-p) is a mixture of point masses on the codebook vectors ``c_1..c_V``
   (flow space = VQ codebook x ``codebook_scale``).  With the rectified-flow convention
   ``x_t = (1 - t) x_0 + t eps`` the posterior weights are
   ``w_j(x, t) ∝ p_j exp(-||x - (1 - t) c_j||^2 / (2 t^2))``, the denoised mean
   ``m = sum_j w_j c_j`` and the velocity ``v = (x - m) / t``.  :func:`flow_map` integrates
   ``dx/dt = v`` from ``t = 1`` (``x = eps``) to ``t_min`` (Heun, EDM-style ``rho`` time grid,
   float64) and returns the code the trajectory lands on (argmax of the posterior weights at
   ``t_min``, so filtered codes are never chosen).  Because the ODE transports ``N(0, I)`` onto the
   mixture, the token distribution over random ``eps`` is ``p`` (tested with a chi-square test).
2. **Noise -> tokens map by running the teacher** (§2.3): :func:`teacher_token_map` decodes in raster
   order with the teacher's KV cache; token ``i`` is ``flow_map(eps_i | p(. | class, q_<i))``.
3. **Pair set on disk** (§4): :class:`PairSet` -- safetensors shards of ``(noise, tokens, labels)``,
   keyed by a hash of the teacher weights + every setting that changes the pairs; shard ``i`` is a
   pure function of ``(seed, i)``, written atomically, so an interrupted generation resumes at the
   first missing shard and a larger ``num_pairs`` extends the same set.
4. **Student** (§2.4): :class:`DDStudent`, a copy of the teacher's ``LlamaForCausalLM`` whose
   embedding table gains ``d`` basis rows (the ``Linear(d -> D)`` input layer of DD, stored as
   embedding rows so the student stays a stock transformers model) and 2 indicator rows (noise /
   data).  Input ``[class, x_1..x_n]`` causal; the output at ``x_i`` gives the logits of token ``i``.
   The computation is ``stepdistill.pipelines.distilled_decoding.dd_generate`` -- the exported
   pipeline's own code.
5. **Continuous head** (§2.4, DD1 ``final_layer_conti``; on with ``split_t``): a PixArt-style final
   layer (``LayerNorm`` without affine, ``h * (1 + scale) + shift`` with ``(shift, scale) =
   scale_shift_table + class embedding``, ``Linear(D -> d)``) on the LM's last hidden state,
   predicting the token's flow-space codebook vector.  Output assembly: data positions copied,
   predicted positions ``< split_t`` from the logits' argmax (its codebook vector), ``>= split_t``
   from the head; images are decoded from these vectors, the head's ones unsnapped
   (``pipelines/distilled_decoding.py``, whose folder holds the head as
   ``continuous_head.safetensors``).  ``split_t: None`` = no head (every position from the logits).
   VAR teachers: ``split_t`` is a scale index (DD's ``loss_split_t``); the head sits on the last
   block's output inside ``VARDDStudent`` (``pipelines/var_model.py``) and is saved with it.
6. **Training** (§2.5): for each pair pick a split point ``t`` from ``split_points`` (``[0]`` =
   one-step student; ``[0, t_2]`` = the two-step variant, which also samples in one step); the
   input holds the pair's codebook vectors before ``t`` and its noise from ``t`` on; the loss on the
   predicted positions ``>= t`` is cross-entropy to the pair's tokens before ``split_t`` and
   ``regression_weight`` x the L2 error of the head to the pair's flow-space code vector from
   ``split_t`` on (all positions CE without the head).
7. **Teacher-involved sampling** (§2.6, DD1 ``eval_combine_sample.py``):
   :meth:`DDStudent.generate` / the pipeline with ``teacher_steps = k`` -- a student pass, the
   teacher regenerates tokens ``t_2 - k .. t_2 - 1`` after the student's prefix
   (:func:`teacher_span_fn`: the teacher's KV-cached decoding with its flow map of the *same*
   noise), then the student's pass at ``t_2``; ``2 + k`` LM passes.

Choices where the spec is silent or unverified, documented here:

* Loss normalisation: CE and regression terms are summed over the predicted positions and divided
  by their number (per-position weights 1 and ``regression_weight``); the regression is the mean
  squared error over the ``d`` flow-space coordinates (DD1's code defaults to LPIPS on decoded
  images, ``--loss_norm lpips``; L2 in code space here, no LPIPS network).  The head reads the
  hidden state *after* the LM's final norm (the ``lm_head``'s input); ``linear`` starts at zero.
  ``output_type="tokens"`` / ``DDStudent.forward`` report the nearest code at head positions.
* Teacher-involved sampling: DD1 lets the teacher regenerate the span with ordinary random
  sampling; here the teacher's closed-form flow map of the same noise is used (the same
  distribution, since the span's noise is independent of the prefix, and deterministic in the noise).
* ODE solver: Heun, 32 steps, ``rho = 3`` time grid, ``t_min = 1e-3`` (DD1's solver is unverified;
  first-order Euler needs > 128 steps for the same token-distribution accuracy).
* Flow space scale: the codebook is scaled to unit RMS per coordinate (``codebook_scale: rms``),
  so the unit noise and the codes live on the same scale whatever the tokenizer's codebook norm;
  LlamaGen's L2-normalised VQ-16 codebook can use ``codebook_scale: 1.0``.
* Input-layer initialisation: basis rows = least-squares fit from flow-space codes to the teacher's
  token embeddings (``[c_j, 1] @ [W; b] ≈ E_j``), both indicator rows = ``b``, so a data position
  starts out embedded like the teacher's token.
* Noise is stored in ``storage_dtype`` and the map is computed from the *stored* (rounded) noise,
  so the pairs on disk are exactly consistent.
* Optional codebook-RBF input feature (``rbf_tau``, off by default = DD's plain ``Linear(d -> D)``
  input): ``embed(x) += softmax_j(-||x - c_j||^2 / (2 tau^2)) @ E[codes]``.  A data position then
  reads ~the teacher's own token embedding and a noise position a soft mix of the embeddings of the
  codes near it -- a nonlinear feature of the noise that the tiny digits student otherwise has to
  learn (first-token accuracy 26% -> 94% at 2000 steps; FID-digits 2.1 -> 0.5).  Still a stock
  ``LlamaForCausalLM`` (the feature reuses the teacher's embedding rows); the width lives in the
  pipeline config.  The digits preset uses ``rbf_tau: 1.0``; the LlamaGen preset keeps DD's input.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.sources import BatchSource, EpochPermutation, derive_seed
from ..pipelines.distilled_decoding import (
    DDContinuousHead,
    dd_forward,
    dd_generate,
    dd_layout,
    dd_logits,
    decode_vectors,
)
from ..utils import DTYPES, cache_dir
from . import register
from .base import Distiller, LossOutput

__all__ = [
    "DDConfig",
    "DistilledDecoding",
    "DDStudent",
    "PairSet",
    "PairSource",
    "flow_time_grid",
    "flow_posterior_logits",
    "flow_velocity",
    "flow_map",
    "teacher_token_map",
    "codebook_scale_of",
    "teacher_span_fn",
]

# ---------------------------------------------------------------------------------------------
# 1. the closed-form per-token flow


def flow_time_grid(num_steps: int, t_min: float = 1e-3, rho: float = 3.0, dtype=torch.float64) -> Tensor:
    """Descending times ``1 = t_0 > ... > t_N = t_min`` (EDM-style ``rho`` spacing, dense near 0)."""
    if num_steps < 1:
        raise ValueError(f"flow num_steps must be >= 1, got {num_steps}")
    k = torch.arange(num_steps + 1, dtype=dtype, device="cpu") / num_steps  # a host table of times
    return (1.0 + k * (t_min ** (1.0 / rho) - 1.0)) ** rho


def flow_posterior_logits(x: Tensor, t: float, codes: Tensor, log_p: Tensor) -> Tensor:
    """Unnormalised log posterior weights (B, V): ``log p_j - ||x - (1 - t) c_j||^2 / (2 t^2)``."""
    d2 = (x.unsqueeze(-2) - (1.0 - t) * codes).pow(2).sum(-1)
    return log_p - d2 / (2.0 * t * t)


def flow_denoise(x: Tensor, t: float, codes: Tensor, log_p: Tensor) -> Tensor:
    """Posterior mean ``E[x_0 | x_t = x]`` of the point-mass mixture."""
    w = torch.softmax(flow_posterior_logits(x, t, codes, log_p), -1)
    return w @ codes


def flow_velocity(x: Tensor, t: float, codes: Tensor, log_p: Tensor) -> Tensor:
    """Rectified-flow velocity ``E[eps - x_0 | x_t = x] = (x - m(x, t)) / t``."""
    return (x - flow_denoise(x, t, codes, log_p)) / t


def flow_map(
    noise: Tensor,
    codes: Tensor,
    logits: Tensor,
    num_steps: int = 32,
    solver: str = "heun",
    t_min: float = 1e-3,
    rho: float = 3.0,
    dtype: torch.dtype = torch.float64,
    return_x: bool = False,
):
    """Deterministic map ``noise (B, d) -> token (B,)`` that pushes ``N(0, I)`` onto ``softmax(logits)``.

    ``codes`` (V, d) are the mixture's atoms; ``logits`` (B, V) may hold ``-inf`` (filtered codes).
    Integrates the closed-form flow ODE from ``t = 1`` to ``t_min`` and returns the argmax of the
    posterior weights there (``return_x=True`` also returns the end point).
    """
    if solver not in ("heun", "euler"):
        raise ValueError(f"flow solver must be 'heun' or 'euler', got {solver!r}")
    x = noise.to(dtype)
    codes = codes.to(device=x.device, dtype=dtype)
    log_p = torch.log_softmax(logits.to(device=x.device, dtype=dtype), -1)
    ts = flow_time_grid(num_steps, t_min, rho).tolist()
    for i in range(num_steps):
        t, t_next = ts[i], ts[i + 1]
        v = flow_velocity(x, t, codes, log_p)
        x_euler = x + (t_next - t) * v
        if solver == "heun" and i + 1 < num_steps:
            v2 = flow_velocity(x_euler, t_next, codes, log_p)
            x = x + (t_next - t) * 0.5 * (v + v2)
        else:
            x = x_euler
    tokens = flow_posterior_logits(x, ts[-1], codes, log_p).argmax(-1)
    return (tokens, x) if return_x else tokens


def codebook_scale_of(codebook: Tensor, setting: str | float) -> float:
    """``"rms"`` -> ``1 / sqrt(mean(c^2))`` (unit RMS per coordinate); a number -> that number."""
    if isinstance(setting, str):
        if setting != "rms":
            raise ValueError(f"codebook_scale must be 'rms' or a number, got {setting!r}")
        rms = float(codebook.detach().double().pow(2).mean().sqrt())
        return 1.0 / max(rms, 1e-12)
    return float(setting)


@torch.no_grad()
def teacher_token_map(
    teacher,
    noise: Tensor,
    labels: Tensor,
    codes: Tensor,
    flow: dict | None = None,
    **settings: Any,
) -> Tensor:
    """DD's noise -> tokens map: run the teacher in raster order; token ``i`` is
    ``flow_map(noise[:, i] | teacher's p(. | class, q_<i))`` (KV-cached, with CFG and filters).

    ``noise`` (B, n, d) and ``codes`` (V, d) are in flow space; ``flow`` holds ``flow_map``'s
    keyword arguments (``num_steps``, ``solver``, ``t_min``, ``rho``, ``dtype``)."""
    flow = dict(flow or {})
    noise = noise.to(teacher.device)
    if hasattr(teacher, "token_map"):  # next-scale teachers (VAR): the map applied per scale
        return teacher.token_map(noise, labels, lambda z, lg: flow_map(z, codes, lg, **flow), **settings)

    def choose(i: int, logits: Tensor) -> Tensor:
        return flow_map(noise[:, i], codes, logits, **flow)

    return teacher.generate(labels, choose, **settings)


# ---------------------------------------------------------------------------------------------
# 2. the pair set on disk


class PairSet:
    """A sharded, resumable, reusable set of Distilled Decoding pairs.

    Folder ``<root>/<key>/``: ``meta.json`` (every setting, the key) and
    ``pairs-<i:05d>.safetensors`` with ``noise`` (S, n, d) in ``storage_dtype``, ``tokens`` (S, n)
    and ``labels`` (S,).  ``key`` = sha256 of the teacher's weight digest and the settings; shard
    ``i`` uses noise from ``torch.Generator().manual_seed(derive_seed("dd-pairs", seed, i))`` and
    labels ``(i * S + j) % num_classes``, so it is the same whether generated in one go, resumed, or
    by another process.
    """

    FORMAT = 1

    def __init__(self, root: str | Path, settings: dict):
        import hashlib

        self.settings = dict(settings)
        text = json.dumps({"format": self.FORMAT, **self.settings}, sort_keys=True, default=str)
        self.key = hashlib.sha256(text.encode()).hexdigest()[:16]
        self.folder = Path(root) / self.key
        self.shard_size = int(self.settings["shard_size"])
        self._handles: dict = {}  # open shard files of rows()

    # -- files --------------------------------------------------------------------------------------
    def shard_path(self, i: int) -> Path:
        return self.folder / f"pairs-{i:05d}.safetensors"

    def num_shards_for(self, num_pairs: int) -> int:
        return max(1, math.ceil(int(num_pairs) / self.shard_size))

    def complete_shards(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        out = []
        for p in self.folder.glob("pairs-*.safetensors"):
            try:
                out.append(int(p.stem.split("-")[1]))
            except (IndexError, ValueError):
                continue
        return sorted(out)

    def _write_meta(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self.folder / "meta.json"
        if not meta.exists():
            tmp = self.folder / f".meta.json.tmp-{os.getpid()}"
            tmp.write_text(
                json.dumps({"format": self.FORMAT, "key": self.key, **self.settings}, indent=2, default=str)
            )
            os.replace(tmp, meta)

    # -- generation -----------------------------------------------------------------------------------
    def shard_inputs(
        self, i: int, num_tokens: int, embed_dim: int, num_classes: int
    ) -> tuple[Tensor, Tensor]:
        """The noise (rounded to the storage dtype, returned as float32) and labels of shard ``i``."""
        g = torch.Generator().manual_seed(derive_seed("dd-pairs", int(self.settings["seed"]), i))
        noise = torch.randn(self.shard_size, num_tokens, embed_dim, generator=g, device="cpu")  # stored on disk
        noise = noise.to(DTYPES[self.settings["storage_dtype"]]).float()
        labels = torch.arange(i * self.shard_size, (i + 1) * self.shard_size, device="cpu") % num_classes
        return noise, labels

    def generate(
        self,
        teacher,
        num_pairs: int,
        codes: Tensor,
        flow: dict,
        batch_size: int | None = None,
        rank: int = 0,
        world: int = 1,
        max_new_shards: int | None = None,
        progress: bool = False,
        log: Callable[[str], None] | None = None,
    ) -> int:
        """Write the missing shards of the first ``num_pairs`` pairs; returns how many were written.

        Process ``rank`` of ``world`` starts with the shards ``rank, rank + world, ...``, meets the
        others at a barrier (when a process group is initialised) and then fills in any still
        missing (writes are atomic; a duplicate write is identical).  The teacher runs on its own
        device (the caller moves it there first).
        ``max_new_shards`` stops early (to test resumption)."""
        from safetensors.torch import save_file

        self._write_meta()
        total = self.num_shards_for(num_pairs)
        order = list(range(rank, total, world)) + [i for i in range(total) if i % world != rank]
        n, d, c = teacher.num_tokens, codes.shape[1], teacher.num_classes
        bs = int(batch_size or self.shard_size)
        written = 0
        settings = {k: self.settings[k] for k in ("guidance_scale", "temperature", "top_k", "top_p")}
        own = len(range(rank, total, world))
        iterator = order
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(order, desc="dd pairs", leave=False)
        for pos, i in enumerate(iterator):
            if pos == own and world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.barrier()  # the others' shards are theirs to make first
            if self.shard_path(i).exists():
                continue
            if max_new_shards is not None and written >= max_new_shards:
                break
            noise, labels = self.shard_inputs(i, n, d, c)
            tokens = torch.cat(
                [
                    teacher_token_map(
                        teacher, noise[s : s + bs], labels[s : s + bs], codes, flow, **settings
                    ).cpu()
                    for s in range(0, self.shard_size, bs)
                ]
            )
            tok_dtype = torch.int16 if teacher.codebook_size <= 32767 else torch.int32
            tensors = {
                "noise": noise.to(DTYPES[self.settings["storage_dtype"]]).contiguous(),
                "tokens": tokens.to(tok_dtype).contiguous(),
                "labels": labels.to(torch.int16 if c < 32767 else torch.int32).contiguous(),
            }
            tmp = self.folder / f".pairs-{i:05d}.tmp-{os.getpid()}.safetensors"
            save_file(tensors, str(tmp), metadata={"key": self.key, "shard": str(i)})
            os.replace(tmp, self.shard_path(i))
            written += 1
            if log is not None:
                log(f"dd pairs: wrote shard {i + 1}/{total} ({self.folder})")
        return written

    def is_complete(self, num_pairs: int) -> bool:
        have = set(self.complete_shards())
        return all(i in have for i in range(self.num_shards_for(num_pairs)))

    def load(self, num_pairs: int) -> dict[str, Tensor]:
        """The first ``num_pairs`` pairs: ``noise`` float32 (N, n, d), ``tokens`` / ``labels`` int64."""
        from safetensors.torch import load_file

        if not self.is_complete(num_pairs):
            missing = sorted(set(range(self.num_shards_for(num_pairs))) - set(self.complete_shards()))
            raise FileNotFoundError(
                f"pair set {self.folder} is missing shards {missing[:5]}{' ...' if len(missing) > 5 else ''}"
            )
        parts: dict[str, list[Tensor]] = {"noise": [], "tokens": [], "labels": []}
        for i in range(self.num_shards_for(num_pairs)):
            data = load_file(str(self.shard_path(i)))
            for k in parts:
                parts[k].append(data[k])
        out = {k: torch.cat(v)[:num_pairs] for k, v in parts.items()}
        out["noise"] = out["noise"].float()
        out["tokens"] = out["tokens"].long()
        out["labels"] = out["labels"].long()
        return out


    #: shard files :meth:`rows` keeps open (least recently used first out)
    max_open_shards: int = 16

    def _shard_handle(self, s: int):
        from safetensors import safe_open

        handles = self._handles
        f = handles.pop(s, None)
        if f is None:
            if not self.shard_path(s).exists():
                raise FileNotFoundError(f"pair set {self.folder} is missing shard {s}")
            while len(handles) >= max(1, int(self.max_open_shards)):
                handles.pop(next(iter(handles)))  # the least recently used
            f = safe_open(str(self.shard_path(s)), framework="pt", device="cpu")
        handles[s] = f  # (re)inserted last = most recently used
        return f

    def rows(self, index: Tensor | list[int], num_pairs: int) -> dict[str, Tensor]:
        """Rows ``index`` of the first ``num_pairs`` pairs, read from their shards alone (memory-mapped
        row slices; at most ``max_open_shards`` files kept open, least recently used closed first), in
        the order given: ``noise`` float32, ``tokens`` / ``labels`` int64.  Memory: the rows asked
        for, never a whole shard or set."""
        idx = [int(i) for i in (index.tolist() if isinstance(index, Tensor) else index)]
        if any(not 0 <= i < num_pairs for i in idx):
            raise IndexError(f"pair rows must lie in [0, {num_pairs})")
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for pos, r in enumerate(idx):
            s, j = divmod(r, self.shard_size)
            by_shard.setdefault(s, []).append((pos, j))
        parts: dict[str, list] = {"noise": [None] * len(idx), "tokens": [None] * len(idx), "labels": [None] * len(idx)}
        for s, items in by_shard.items():
            f = self._shard_handle(s)
            for k in parts:
                sl = f.get_slice(k)
                for pos, j in items:
                    parts[k][pos] = sl[j : j + 1]
        return {"noise": torch.cat(parts["noise"]).float(), "tokens": torch.cat(parts["tokens"]).long(),
                "labels": torch.cat(parts["labels"]).long()}


class PairSource(BatchSource):
    """Batches of pairs for the generic loop: epoch permutations over the pair set (exact resume).

    ``batch(...)`` -> ``{"real": None, "raw_cond": labels, "noise": (B, n, d), "tokens": (B, n)}``,
    the rows read from their shards only (a rank never loads the whole set).  ``prepare`` (called
    once, at the first batch -- inside the trainer, after it moved the teacher to its device)
    generates the missing shards.
    """

    def __init__(self, pair_set: PairSet, num_pairs: int, seed: int = 0, prepare: Callable[[], Any] | None = None):
        self.pair_set, self.num_pairs = pair_set, int(num_pairs)
        self.seed = int(seed)
        self._prepare = prepare
        self._plan = EpochPermutation(self.num_pairs, self.seed, "dd-pair-source")

    def __len__(self) -> int:
        return self.num_pairs

    def batch(self, step: int, rank: int, world: int, batch_size: int) -> dict:
        if self._prepare is not None:
            self._prepare()
            self._prepare = None
        idx = self._plan.indices(step, rank, world, batch_size)
        rows = self.pair_set.rows(idx, self.num_pairs)
        return {
            "real": None,
            "raw_cond": rows["labels"],
            "noise": rows["noise"],
            "tokens": rows["tokens"],
            "batch_size": batch_size,
        }


# ---------------------------------------------------------------------------------------------
# 3. the student


class DDStudent(nn.Module):
    """The Distilled Decoding generator: ``student(noise (B, n, d), labels) -> tokens (B, n)``.

    Holds ``transformer`` (a ``LlamaForCausalLM`` with the extended vocabulary, see
    ``pipelines/distilled_decoding.py``) and the flow-space codebook as a buffer.  ``split_points``
    are the training-time split points; ``num_steps`` passes use the first ``num_steps`` of them.
    """

    def __init__(
        self,
        transformer: nn.Module,
        codes: Tensor,
        num_classes: int,
        grid_size: tuple[int, int],
        split_points: list[int],
        codebook_scale: float,
        rbf_tau: float | None = None,
        head: nn.Module | None = None,
        split_t: int | None = None,
    ):
        super().__init__()
        if (head is None) != (split_t is None):
            raise ValueError("the continuous head and split_t go together (both set or both None)")
        self.transformer = transformer
        self.head = head
        self.split_t = None if split_t is None else int(split_t)
        self.register_buffer("codes", codes.detach().clone().float(), persistent=False)
        self.num_classes = int(num_classes)
        self.grid_size = tuple(int(g) for g in grid_size)
        self.split_points = [int(s) for s in split_points]
        self.codebook_scale = float(codebook_scale)
        self.rbf_tau = None if rbf_tau is None else float(rbf_tau)
        self.layout = dd_layout(codes.shape[0], num_classes, codes.shape[1], self.rbf_tau)

    @classmethod
    def from_teacher(
        cls,
        teacher,
        codes: Tensor,
        split_points: list[int],
        codebook_scale: float,
        rbf_tau: float | None = None,
        split_t: int | None = None,
    ) -> DDStudent:
        """Copy the teacher's LM, add ``d`` basis rows and 2 indicator rows (least-squares init);
        with ``split_t``, a new continuous head (:class:`DDContinuousHead`, zero output at init)."""
        lm = copy.deepcopy(teacher.transformer).float()
        lm.requires_grad_(True)
        layout = dd_layout(teacher.codebook_size, teacher.num_classes, codes.shape[1])
        old = lm.get_input_embeddings().weight.detach().clone()
        lm.resize_token_embeddings(layout["vocab_size"], mean_resizing=False)
        with torch.no_grad():
            emb = lm.get_input_embeddings().weight
            emb[: old.shape[0]] = old
            v, d = teacher.codebook_size, codes.shape[1]
            a = torch.cat([codes.double().cpu(), torch.ones(v, 1, dtype=torch.float64)], 1)  # (V, d + 1)
            sol = torch.linalg.lstsq(a, old[:v].double().cpu(), driver="gelsd").solution  # (d + 1, D)
            if rbf_tau is None:
                emb[layout["basis_offset"] : layout["basis_offset"] + d] = sol[:d].to(emb)
                emb[layout["indicator_offset"] : layout["indicator_offset"] + 2] = (
                    sol[d:].to(emb).expand(2, -1)
                )
            else:  # the RBF feature already reads ~E[q] at a data position: start the rest at zero
                emb[layout["basis_offset"] : layout["indicator_offset"] + 2] = 0.0
        lm.config.use_cache = False
        head = None
        if split_t is not None:
            head = DDContinuousHead(lm.get_input_embeddings().weight.shape[1], codes.shape[1])
        return cls(lm, codes, teacher.num_classes, teacher.grid_size, split_points, codebook_scale, rbf_tau,
                   head, split_t)

    @property
    def num_tokens(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def sample_shape(self) -> tuple[int, int]:
        """Shape of one image's noise: (n tokens, d)."""
        return (self.num_tokens, int(self.codes.shape[1]))

    @property
    def num_steps(self) -> int:
        return len(self.split_points)

    def logits(self, x: Tensor, labels: Tensor, is_data: Tensor) -> Tensor:
        return dd_logits(self.transformer, x, labels, is_data, self.layout, self.codes)

    def predict(self, x: Tensor, labels: Tensor, is_data: Tensor) -> tuple[Tensor, Tensor | None]:
        """One pass: logits (B, n, V) and the continuous head's flow-space vectors (None without it)."""
        return dd_forward(self.transformer, x, labels, is_data, self.layout, self.codes, self.head)

    def generate(
        self,
        noise: Tensor,
        cond: Tensor,
        num_steps: int | None = None,
        teacher=None,
        teacher_steps: int = 0,
        flow: dict | None = None,
        teacher_sampler: str = "flow",
        generator=None,
    ) -> tuple[Tensor, Tensor]:
        """``(tokens (B, n), flow-space vectors (B, n, d))`` -- the pipeline's ``dd_generate``; with an
        AR ``teacher`` and ``teacher_steps`` the teacher-involved sampler (``flow``: the teacher map's
        ``flow_map`` settings; ``teacher_sampler`` / ``generator``: see :func:`teacher_span_fn`)."""
        fn = None
        if teacher_steps:
            if teacher is None:
                raise ValueError("teacher_steps > 0 needs the AR teacher (teacher=...)")
            fn = teacher_span_fn(teacher, self.codes, flow, teacher_sampler, generator)
            if num_steps is None:
                num_steps = self.num_steps
        return dd_generate(
            self.transformer,
            self.codes,
            noise.float(),
            cond.long(),
            self.split_points,
            self.layout,
            num_steps=num_steps,
            head=self.head,
            split_t=self.split_t,
            return_vectors=True,
            teacher_fn=fn,
            teacher_steps=teacher_steps,
        )

    def forward(self, noise: Tensor, cond: Tensor, num_steps: int | None = None, generator=None) -> Tensor:
        """Tokens (B, n) for noise (B, n, d) and class ids ``cond`` -- exactly the pipeline's
        ``dd_generate`` (``generator`` is accepted for interface compatibility and unused; with the
        continuous head, its positions report the nearest code: :meth:`generate` gives the vectors)."""
        return self.generate(noise, cond, num_steps)[0]

    def decode(self, vqvae, tokens: Tensor, vectors: Tensor) -> Tensor:
        """Images in [-1, 1]: from the vectors when the head is on (not snapped), else the tokens."""
        if self.head is None:
            from ..pipelines.ar_image import decode_tokens

            return decode_tokens(vqvae, tokens, self.grid_size).clamp(-1, 1)
        return decode_vectors(vqvae, vectors, self.grid_size, self.codebook_scale).clamp(-1, 1)


def teacher_span_fn(teacher, codes: Tensor, flow: dict | None = None, sampler: str = "flow", generator=None):
    """``teacher_fn`` for teacher-involved sampling: ``fn(labels, prefix (B, s), noise (B, n, d),
    stop) -> tokens (B, stop)`` -- the teacher reads ``[class, prefix]`` in one KV-cached pass
    (prefill), then decodes tokens ``s .. stop - 1`` one at a time: ``stop - s`` single-token steps.

    ``sampler="flow"`` (default): each token is the teacher's closed-form flow map of the *same*
    noise (the teacher's conditional distribution given the prefix, deterministic in the noise;
    costs the flow ODE per token).  ``sampler="random"``: an ordinary inverse-CDF draw (DD1's
    ``eval_combine_sample.py``), uniforms from ``generator`` (one ``torch.Generator``, or one per image).

    A VAR teacher (``token_order == "scales"``): prefix and ``stop`` are whole scales
    (:meth:`~stepdistill.teachers.var.VARTeacher.span_fn`), each scale one KV-cached teacher step."""
    from ..pipelines.ar_image import cfg_logits, draw_uniforms, filter_logits, sample_tokens

    if sampler not in ("flow", "random"):
        raise ValueError(f"teacher sampler must be 'flow' or 'random', got {sampler!r}")
    flow = dict(flow or {})
    if getattr(teacher, "token_order", None) == "scales":
        from ..pipelines.var_model import var_draw_uniforms, var_sample_tokens

        c = codes.to(teacher.device).float()

        def scale_fn(z: Tensor, logits: Tensor) -> Tensor:
            b, n, v = logits.shape
            if sampler == "random":
                return var_sample_tokens(logits, var_draw_uniforms(generator, b, n, logits.device))
            zz, lg, rows = z.reshape(b * n, -1).float(), logits.reshape(b * n, v), 4096
            return torch.cat([flow_map(zz[i : i + rows], c, lg[i : i + rows], **flow)
                              for i in range(0, b * n, rows)]).long().reshape(b, n)

        return teacher.span_fn(scale_fn)

    @torch.no_grad()
    def fn(labels: Tensor, prefix: Tensor, noise: Tensor, stop: int) -> Tensor:
        dev = teacher.device
        z, c = noise.to(dev), codes.to(dev)
        pre = prefix.to(dev).long()
        b, start = pre.shape
        st = teacher.settings()
        cls = teacher.class_token(teacher.encode_conditions(labels.to(dev))).reshape(b, 1).long()
        use_cfg = st["guidance_scale"] != 1.0 and teacher.null_token is not None
        ids = torch.cat([cls, pre], 1)
        if use_cfg:
            ids = torch.cat([ids, torch.cat([torch.full_like(cls, int(teacher.null_token)), pre], 1)], 0)
        v = teacher.codebook_size
        out = teacher.transformer(input_ids=ids, use_cache=True)
        cache, last = out.past_key_values, out.logits[:, -1, :v].float()
        tokens = [pre]
        for i in range(start, int(stop)):
            logits = cfg_logits(last[:b], last[b:], st["guidance_scale"]) if use_cfg else last
            logits = filter_logits(logits, st["temperature"], st["top_k"], st["top_p"])
            if sampler == "flow":
                tok = flow_map(z[:, i].float(), c, logits, **flow).long().to(dev)
            else:
                tok = sample_tokens(logits, draw_uniforms(generator, b, dev)).long().to(dev)
            tokens.append(tok[:, None])
            if i + 1 == int(stop):
                break
            step = tok.reshape(b, 1)
            out = teacher.transformer(input_ids=torch.cat([step, step], 0) if use_cfg else step,
                                      past_key_values=cache, use_cache=True)
            cache, last = out.past_key_values, out.logits[:, -1, :v].float()
        return torch.cat(tokens, 1)

    return fn


# ---------------------------------------------------------------------------------------------
# 4. the distiller


@dataclass
class DDConfig:
    # pair set (generated once, cached on disk, keyed by teacher weights + these settings)
    num_pairs: int = 20000
    shard_size: int = 1000
    pair_seed: int = 0
    pairs_dir: str | None = None  # default: $STEPDISTILL_CACHE/dd-pairs
    storage_dtype: str = "float32"  # of the stored noise; float16 halves the disk for big sets
    generation_batch_size: int | None = None  # teacher batch during generation (default: shard_size)
    # the per-token flow
    codebook_scale: Any = "rms"  # "rms" or a number
    flow_steps: int = 32
    flow_solver: str = "heun"
    flow_t_min: float = 1e-3
    flow_rho: float = 3.0
    flow_dtype: str = "float64"
    # the student
    split_points: list = field(default_factory=lambda: [0])  # [0] one-step; [0, t2] two-step variant
    rbf_tau: float | None = (
        None  # codebook-RBF input feature width (flow-space units); None = DD's linear input
    )
    split_t: int | None = None  # continuous head from this position (VAR: scale) on (None = no head, CE everywhere)
    regression_weight: float = 1.0  # weight of the head's L2 loss (per position, vs CE per position)
    drop_path_rate: float = 0.0  # VAR students: stochastic depth in training (linear over the blocks)
    generator_lr: float = 5e-4
    label_smoothing: float = 0.0


@register
class DistilledDecoding(Distiller):
    """Distilled Decoding 1 for AR image teachers (see the module docstring)."""

    name = "dd"
    paper = "Liu, Ning, Wang, Lin. Distilled Decoding 1: One-step Sampling of Image Auto-regressive Models with Flow Matching. ICLR 2025 (arXiv 2412.17153)"
    Config = DDConfig
    needs_data = False
    #: needs an autoregressive teacher (``stepdistill.teachers.autoregressive.ARTeacher``), not a
    #: diffusion one; registry-wide diffusion-teacher tests should skip it
    teacher_kind: ClassVar[str] = "ar"

    def __init__(self, teacher, config: DDConfig):
        for attr in ("codebook", "generate", "transformer", "num_tokens", "decode"):
            if not hasattr(teacher, attr):
                raise TypeError(
                    f"Distilled Decoding needs an autoregressive teacher (ARTeacher: VQ + causal LM); "
                    f"{type(teacher).__name__} has no {attr!r}. Use teacher.kind=ar."
                )
        super().__init__(teacher, config)
        c = config
        scales = getattr(teacher, "token_order", "raster") == "scales"
        n = teacher.num_scales if scales else teacher.num_tokens
        sp = [int(s) for s in c.split_points]
        if not sp or sp[0] != 0 or any(a >= b for a, b in zip(sp, sp[1:])) or sp[-1] >= n:
            raise ValueError(
                f"algorithm.params.split_points must start at 0 and increase below {n}, got {sp}"
            )
        if c.flow_dtype not in DTYPES:
            raise ValueError(
                f"algorithm.params.flow_dtype must be one of {', '.join(DTYPES)}, got {c.flow_dtype!r}"
            )
        if c.storage_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(
                f"algorithm.params.storage_dtype must be float32|float16|bfloat16, got {c.storage_dtype!r}"
            )
        if c.split_t is not None and not 0 <= int(c.split_t) < n:
            raise ValueError(f"algorithm.params.split_t must be None or in 0..{n - 1}, got {c.split_t}")
        if not 0.0 <= float(c.drop_path_rate) < 1.0:
            raise ValueError(f"algorithm.params.drop_path_rate must be in [0, 1), got {c.drop_path_rate}")
        if float(c.drop_path_rate) > 0 and not scales:
            raise ValueError("algorithm.params.drop_path_rate applies to VAR students only (the LM student has none)")
        if float(c.regression_weight) < 0:
            raise ValueError(f"algorithm.params.regression_weight must be >= 0, got {c.regression_weight}")
        self.scale = codebook_scale_of(teacher.codebook, c.codebook_scale)
        codes = (teacher.codebook.detach().float() * self.scale).cpu()
        if scales:
            from ..teachers.var import VARDDGenerator

            if c.rbf_tau is not None:
                raise ValueError("a VAR student reads the noise / codes through word_embed (no RBF input): unset rbf_tau")
            self.student = VARDDGenerator.from_teacher(teacher, sp, self.scale, split_t=c.split_t,
                                                       drop_path_rate=c.drop_path_rate)
        else:
            self.student = DDStudent.from_teacher(teacher, codes, sp, self.scale, c.rbf_tau, c.split_t)
        self._pairs: dict[str, Tensor] | None = None  # the whole set, only when a tool asks (ensure_pairs)
        self._pair_set: PairSet | None = None
        self._pairs_ready = False

    # -- pairs ----------------------------------------------------------------------------------------
    @property
    def flow_kwargs(self) -> dict:
        c = self.config
        return {
            "num_steps": c.flow_steps,
            "solver": c.flow_solver,
            "t_min": c.flow_t_min,
            "rho": c.flow_rho,
            "dtype": DTYPES[c.flow_dtype],
        }

    def pair_set(self) -> PairSet:
        if self._pair_set is None:
            c = self.config
            t = self.teacher
            root = Path(c.pairs_dir) if c.pairs_dir else cache_dir() / "dd-pairs"
            settings = {
                "teacher": t.digest(),
                **t.settings(),
                "codebook_scale": self.scale,
                "flow": {
                    k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in self.flow_kwargs.items()
                },
                "seed": c.pair_seed,
                "shard_size": c.shard_size,
                "storage_dtype": c.storage_dtype,
                "num_tokens": t.num_tokens,
                "labels": "index % num_classes",
            }
            self._pair_set = PairSet(root, settings)
        return self._pair_set

    def ensure_pairs(
        self, rank: int = 0, world: int = 1, progress: bool = False, log=None, load: bool = True
    ) -> dict[str, Tensor] | None:
        """Generate the missing shards (resumable; on the teacher's current device) and, with
        ``load``, load the whole pair set into memory (tools and tests; training streams rows)."""
        if not load:
            if not self._pairs_ready:
                ps = self.pair_set()
                if not ps.is_complete(self.config.num_pairs):
                    codes = self.student.codes.to(self.teacher.device)
                    ps.generate(self.teacher, self.config.num_pairs, codes, self.flow_kwargs,
                                batch_size=self.config.generation_batch_size, rank=rank, world=world,
                                progress=progress, log=log)
                self._pairs_ready = True
            return None
        if self._pairs is None:
            ps = self.pair_set()
            if not ps.is_complete(self.config.num_pairs):
                codes = self.student.codes.to(self.teacher.device)
                ps.generate(
                    self.teacher,
                    self.config.num_pairs,
                    codes,
                    self.flow_kwargs,
                    batch_size=self.config.generation_batch_size,
                    rank=rank,
                    world=world,
                    progress=progress,
                    log=log,
                )
            self._pairs = ps.load(self.config.num_pairs)
            self._pairs_ready = True
        return self._pairs

    def make_source(self, seed: int = 0, **kwargs: Any) -> PairSource:
        """The pair source: shards are generated at its first batch (lazily, on the teacher's device
        once the trainer has moved it; ``kwargs`` go to :meth:`ensure_pairs`) and streamed."""
        return PairSource(self.pair_set(), self.config.num_pairs, seed=seed,
                          prepare=lambda: self.ensure_pairs(**kwargs, load=False))

    # -- Distiller interface -------------------------------------------------------------------------
    def trainable(self) -> dict[str, nn.Module]:
        return {"generator": self.student}

    def lr_defaults(self) -> dict[str, float]:
        return {"generator": self.config.generator_lr}

    def _batch_pairs(self, batch: dict, device) -> tuple[Tensor, Tensor, Tensor]:
        if batch.get("tokens") is not None and batch.get("noise") is not None:
            labels = torch.as_tensor(batch["raw_cond"], device=device).long()
            return batch["noise"].float().to(device), batch["tokens"].long().to(device), labels.to(device)
        # a plain (condition) source: draw pairs from the set (the loop seeds torch per step)
        self.ensure_pairs(load=False)
        b = int(batch.get("batch_size") or len(batch.get("raw_cond") or []) or 32)
        idx = torch.randint(0, self.config.num_pairs, (b,), device="cpu")  # host indices into the shards
        rows = self.pair_set().rows(idx, self.config.num_pairs)
        return rows["noise"].to(device), rows["tokens"].to(device), rows["labels"].to(device)

    def loss(self, batch: dict, step: int, group: str, cache: dict) -> LossOutput:
        device = self.student.codes.device
        noise, tokens, labels = self._batch_pairs(batch, device)
        b, n = tokens.shape
        sp = torch.tensor(self.student.split_points, device=device)
        split = sp[torch.randint(0, sp.numel(), (b,), device=device)]
        if hasattr(self.student, "data_prefix"):  # VAR: split points are scales
            split = self.student.data_prefix(split)
        pos = torch.arange(n, device=device)
        is_data = pos[None, :] < split[:, None]  # (B, n)
        x = torch.where(is_data[..., None], self.student.codes[tokens], noise)
        logits, cont = self.student.predict(x, labels, is_data)
        logits = logits.float()
        ce = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            tokens.reshape(-1),
            reduction="none",
            label_smoothing=self.config.label_smoothing,
        ).reshape(b, n)
        target = ~is_data  # the predicted positions (>= the split point)
        count = target.float().sum().clamp_min(1.0)
        st = self.student.split_t
        if cont is None:
            ce_mask, reg_mask = target, None
        else:
            ce_mask = target & (pos[None, :] < st)
            reg_mask = target & (pos[None, :] >= st)
        ce_sum = (ce * ce_mask.float()).sum()
        loss = ce_sum / count
        logs = {}
        with torch.no_grad():
            hit = (logits.argmax(-1) == tokens).float()
            logs["token_acc"] = (hit * ce_mask.float()).sum() / ce_mask.float().sum().clamp_min(1.0)
        if reg_mask is not None:
            # L2 in flow space per position (mean over the d coordinates), averaged with the CE terms
            reg = (cont.float() - self.student.codes[tokens]).pow(2).mean(-1)
            reg_sum = (reg * reg_mask.float()).sum()
            loss = (ce_sum + float(self.config.regression_weight) * reg_sum) / count
            logs["reg"] = (reg_sum / reg_mask.float().sum().clamp_min(1.0)).detach()
            logs["ce"] = (ce_sum / ce_mask.float().sum().clamp_min(1.0)).detach()
        else:
            logs["ce"] = loss.detach()
        return LossOutput(loss, logs)

    def generator_for_export(self) -> DDStudent:
        return self.student

    # -- glue: source, grid, export (what run.py asks every algorithm) ----------------------------------
    def build_source(self, train_cfg: Any, rank: int = 0, world: int = 1) -> PairSource:
        """The teacher's (noise, tokens) pair set, generated (split over ranks) or reused."""
        if train_cfg.dataset is not None:
            from ..config import ConfigError

            raise ConfigError("Distilled Decoding is data-free (its pairs come from the teacher); unset train.dataset")
        return self.make_source(seed=train_cfg.seed, rank=rank, world=world, progress=train_cfg.progress)

    def sample_images(self, n: int, generator=None) -> Tensor:
        device = self.student.codes.device
        labels = torch.arange(n, device=device) % self.teacher.num_classes
        z = torch.randn((n, *self.student.sample_shape), generator=generator, device="cpu")  # seeded on the host
        was = self.student.training
        self.student.eval()
        with torch.no_grad():
            tokens, vectors = self.student.generate(z.to(device), labels.to(device))
            img = self.student.decode(self.teacher.vqvae, tokens, vectors)
        self.student.train(was)
        return img

    def exportable(self) -> bool:
        return True

    def export(self, output_dir, *, ema_state=None, extra=None, overwrite=False):
        """A ``DistilledDecodingPipeline`` folder (the teacher's VQ decoder + the student)."""
        from ..export import export_dd_pipeline

        extra = {**(extra or {}), "pair_set": self.pair_set().key}
        if hasattr(self.student, "data_prefix"):
            from ..teachers.var import export_var_dd

            return export_var_dd(self.student, self.teacher, Path(output_dir), use_ema_state=ema_state,
                                 overwrite=overwrite)
        return export_dd_pipeline(self.student, self.teacher, Path(output_dir), algorithm=self.name,
                                  paper=self.paper, extra=extra, use_ema_state=ema_state, overwrite=overwrite)

    def run_info(self) -> dict:
        return {"pair_set": str(self.pair_set().folder)}

    def state_dict_extra(self) -> dict:
        return {"pair_set": self.pair_set().key, "codebook_scale": self.scale}

    def load_state_dict_extra(self, extra: dict) -> None:
        key = (extra or {}).get("pair_set")
        if key is not None and key != self.pair_set().key:
            import logging

            logging.getLogger("stepdistill.dd").warning(
                "resuming with another pair set (%s, checkpoint used %s)", self.pair_set().key, key
            )

    # -- helpers for evaluation and benchmarks --------------------------------------------------------
    def teacher_tokens(self, noise: Tensor, labels: Tensor) -> Tensor:
        """The teacher's deterministic map for flow-space ``noise`` (B, n, d) (what the student learns)."""
        codes = self.student.codes.to(self.teacher.device)
        return teacher_token_map(self.teacher, noise, labels, codes, self.flow_kwargs)
