"""DisBack: Distribution Backtracking (Zhang et al., ICLR 2025, arXiv 2408.15991), as a composition
over a score-distillation algorithm (DMD2 or VSD).  Spec: shared/docs/research/algos_dmd2_vsd_disback.md
§5.2 (the algorithm), not the released SDXL code (§5.3 lists why).

Stage 1, degradation recording: with the initial generator frozen, the base method's *critic* is
trained on the generator's samples by the base method's own critic loss (the same code path); its
score-network weights are snapshotted every ``recording_steps / num_nodes`` steps (the paper's fixed
interval) or, with ``node_spacing: geometric``, after ``R^(i/N)`` steps.  The path is
``[teacher, s_1, ..., s_N]`` (s_N fitted to the initial generator).  ``nodes.json`` records how far
each node's weights moved from where recording started, as a fraction of the last node's distance;
a warning says when the first node is already most of the way (the path then has no intermediate
targets: measured on digits, where the critic fits the initial generator within ~50 updates).

Stage 2, distribution backtracking: the base method trains the generator with the "real" score
replaced by the path nodes in reverse order, ``s_{N-1}, ..., s_1, teacher`` (the critic starts at
s_N, where it already is), switching every ``switch_every_steps`` generator-stage steps, or
earlier when the optional convergence criterion fires.  After the last switch the target is the
real teacher, so the end of training is the base method unchanged.

Nodes are stored as safetensors files in ``nodes_dir`` holding only the critic's *trainable*
tensors: the whole score network for a full critic (DMD2, VSD ``critic: full``), the LoRA deltas
for a LoRA critic (VSD ``critic: lora``).  The target network is a twin of the critic whose frozen
weights are shared with it, so a LoRA path costs one adapter of memory per target, not a UNet.
``nodes.json`` beside them lists each node's step, tensor count and size in bytes; the sizes are
also logged.  Nodes are re-read on resume, so an interrupted recording or backtracking stage
continues.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..teachers.base import DelegatingTeacher, DiffusionTeacher
from . import REGISTRY, register
from .base import Distiller, LossOutput

logger = logging.getLogger("stepdistill.disback")


@dataclass
class DisBackConfig:
    base: str = "dmd2"  # the score-distillation method being wrapped: dmd2 | vsd
    base_params: dict = field(default_factory=dict)  # its own Config fields
    recording_steps: int = 400  # stage 1 length (critic-only updates, generator frozen)
    num_nodes: int = 4  # degradation checkpoints recorded (N); the path has N + 1 entries with the teacher
    node_spacing: str = "uniform"  # uniform: every recording_steps/N steps (the paper); geometric: at R^(i/N)
    recording_lr_scale: float = 1.0  # critic lr during recording = base critic lr x this (slower = longer path)
    switch_every_steps: int = 200  # stage 2: steps per target node (fixed schedule)
    switch_on_convergence: bool = False  # also switch when the generator gradient has settled
    convergence_window: int = 50  # steps per window of the convergence criterion
    convergence_tol: float = 0.05  # switch when |mean(window) / mean(previous window) - 1| < tol
    nodes_dir: str | None = None  # where node weights go; None = <train.output_dir>/disback_nodes


class NodeTarget(DelegatingTeacher):
    """The teacher with its denoiser swapped for a path node (everything else delegates)."""

    def __init__(self, teacher: DiffusionTeacher, node_net: nn.Module):
        super().__init__(teacher)
        self.node_net = node_net
        self.use_teacher = True

    @property
    def teacher(self) -> DiffusionTeacher:
        return self.inner

    def denoise_raw(self, x, sigma, cond):
        if self.use_teacher:
            return self.inner.denoise_raw(x, sigma, cond)
        return self.node_net.denoise_raw(x, sigma, cond)


@register
class DisBack(Distiller):
    name = "disback"
    paper = "Zhang et al., Distribution Backtracking Builds a Faster Convergence Trajectory for Diffusion Distillation, ICLR 2025"
    Config = DisBackConfig

    def __init__(self, teacher: DiffusionTeacher, config: DisBackConfig):
        super().__init__(teacher, config)
        c = config
        if c.base not in ("dmd2", "vsd"):
            raise ValueError(f"algorithm.params.base must be dmd2 or vsd, got {c.base!r}")
        if c.num_nodes < 1 or c.recording_steps < c.num_nodes:
            raise ValueError("need num_nodes >= 1 and recording_steps >= num_nodes")
        if c.node_spacing not in ("uniform", "geometric"):
            raise ValueError(f"algorithm.params.node_spacing must be uniform or geometric, got {c.node_spacing!r}")
        if c.recording_lr_scale <= 0:
            raise ValueError(f"algorithm.params.recording_lr_scale must be > 0, got {c.recording_lr_scale}")
        if c.switch_every_steps < 1:
            raise ValueError("algorithm.params.switch_every_steps must be >= 1")
        from ..config import from_dict

        base_cls = REGISTRY[c.base]
        self.base = base_cls(teacher, from_dict(base_cls.Config, c.base_params, prefix="algorithm.params.base_params."))
        self.name = f"disback-{c.base}"
        self.target = NodeTarget(teacher, _frozen_twin(self.base.critic))
        self.base.teacher = self.target  # composition: the base method sees the node as its "real" score
        self.node_steps = node_schedule(c.recording_steps, c.num_nodes, c.node_spacing)
        self.regression_steps = int(getattr(self.base.config, "regression_steps", 0))
        self.nodes_dir = Path(c.nodes_dir) if c.nodes_dir else None
        self.node_files: list[str] = []  # recorded nodes, oldest (closest to the teacher) first
        self.current = -1  # index into targets(); -1 = not started
        self.switch_log: list[int] = []  # steps at which the target switched
        self.node_info: list[dict] = []  # manifest rows: file, step, tensors, bytes
        self._window: list[float] = []
        self._prev_window: float | None = None
        self._node_step0 = 0
        self._recording_step = 0
        self._start: dict | None = None  # critic's trainable tensors when recording began (in memory)
        self._is_main = True  # set by on_step_begin: only the main process writes node files

    # -- bookkeeping ----------------------------------------------------------------------------
    def set_output_dir(self, output_dir: str | Path) -> None:
        if self.nodes_dir is None:
            self.nodes_dir = Path(output_dir) / "disback_nodes"

    def _score_net(self) -> nn.Module:
        return self.base.critic

    def targets(self) -> list[str | None]:
        """Backtracking targets in order: nodes N-1 .. 1, then the teacher (None)."""
        return list(reversed(self.node_files[:-1])) + [None]

    def path(self) -> list[str | None]:
        """The recorded path reversed: [s_N (fitted degraded model), ..., s_1, teacher (None)]."""
        return list(reversed(self.node_files)) + [None]

    def stage(self, step: int) -> str:
        if step < self.regression_steps:
            return "regression"
        if step < self.regression_steps + self.config.recording_steps:
            return "recording"
        return "backtracking"

    def trainable(self) -> dict[str, nn.Module]:
        return self.base.trainable()

    def lr_defaults(self) -> dict[str, float]:
        return self.base.lr_defaults()

    def lr_scale(self, step: int, group: str) -> float:
        fn = getattr(self.base, "lr_scale", None)
        scale = fn(self._base_step(step), group) if fn else 1.0
        if self.stage(step) == "recording":
            scale *= self.config.recording_lr_scale
        return scale

    def _base_step(self, step: int) -> int:
        return step - self.config.recording_steps if self.stage(step) == "backtracking" else step

    def generator_steps(self, step: int) -> int:
        """Generator-stage steps completed before ``step`` (recording steps do not count): the
        x-axis on which DisBack and its base method are compared at equal generator budget."""
        if step <= self.regression_steps:
            return step
        return max(self.regression_steps, step - self.config.recording_steps)

    def generator_for_export(self):
        return self.base.generator_for_export()

    # -- nodes on disk ----------------------------------------------------------------------------
    def _save_node(self, index: int) -> None:
        from safetensors.torch import save_file

        if self.nodes_dir is None:
            raise ValueError("DisBack needs a nodes_dir (set algorithm.params.nodes_dir or train.output_dir)")
        name = f"node-{index:03d}.safetensors"
        keys = _trainable_keys(self._score_net())
        state = {k: v.detach().cpu().contiguous().clone() for k, v in self._score_net().state_dict().items() if k in keys}
        if self._is_main:  # the other ranks read it from the shared run folder when it becomes a target
            self.nodes_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.nodes_dir / f".{name}.tmp-{os.getpid()}"
            save_file(state, str(tmp))
            os.replace(tmp, self.nodes_dir / name)
        if name not in self.node_files:
            self.node_files.append(name)
        size = sum(v.numel() * v.element_size() for v in state.values())  # tensor bytes (file: + header)
        if self._is_main:
            size = (self.nodes_dir / name).stat().st_size
        moved = None
        if self._start is not None:  # how far the critic has moved from where recording started
            moved = float(sum((state[k].double() - v.double()).pow(2).sum() for k, v in self._start.items()) ** 0.5)
        self.node_info = [r for r in self.node_info if r["file"] != name]
        self.node_info.append({"file": name, "recording_step": self._recording_step, "tensors": len(state),
                               "bytes": size, "distance_from_start": moved})
        final = self.node_info[-1]["distance_from_start"] if len(self.node_info) == self.config.num_nodes else None
        if final:
            for r in self.node_info:  # 0 = the teacher end of the path, 1 = the degraded end
                d = r["distance_from_start"]
                r["fraction_of_path"] = round(d / final, 4) if d is not None else None
            first = self.node_info[0].get("fraction_of_path")
            if first is not None and first > 0.8 and self.config.num_nodes > 1:
                logger.warning(
                    "DisBack: the first node is already %.0f%% of the way to the degraded end, so the path has "
                    "few intermediate targets; lower algorithm.params.recording_lr_scale, or use "
                    "node_spacing: geometric", 100 * first)
        if self._is_main:
            _write_json_atomic(self.nodes_dir / "nodes.json", {"kind": self._node_kind(), "nodes": self.node_info})
        logger.info("DisBack node %s: %d tensors, %.2f MB (%s)", name, len(state), size / 2**20, self._node_kind())

    def _node_kind(self) -> str:
        names = _trainable_keys(self._score_net())
        return "lora" if names and all("lora_" in k for k in names) else "full"

    def node_size_bytes(self) -> int:
        return sum((self.nodes_dir / f).stat().st_size for f in self.node_files) if self.nodes_dir else 0

    def _load_target(self, name: str | None) -> None:
        from safetensors.torch import load_file

        if name is None:
            self.target.use_teacher = True
            return
        path = self.nodes_dir / name
        if not path.exists():
            raise FileNotFoundError(f"DisBack node {path} is missing; the recording stage must be re-run")
        state = load_file(str(path))
        result = self.target.node_net.load_state_dict(state, strict=False)
        unset = sorted(set(result.missing_keys) & _trainable_keys(self._score_net()))
        if result.unexpected_keys or unset:
            raise ValueError(
                f"DisBack node {path} does not match this critic (unexpected {result.unexpected_keys[:3]}, "
                f"missing {unset[:3]}); it was recorded with another critic setup — delete {self.nodes_dir} "
                "to re-record, or restore the algorithm.params it was recorded with"
            )
        self.target.use_teacher = False

    def _advance_to(self, index: int, step: int) -> None:
        targets = self.targets()
        index = min(index, len(targets) - 1)
        if index != self.current:
            self._load_target(targets[index])
            self.current = index
            self._node_step0 = step
            self._window, self._prev_window = [], None
            self.switch_log.append(step)

    # -- the schedule -----------------------------------------------------------------------------
    def on_step_begin(self, step: int, is_main: bool) -> None:
        """Record nodes (the file on the main process only; every rank keeps the manifest) and switch
        the target network, before the losses of ``step``."""
        self._is_main = is_main
        stage = self.stage(step)
        if stage == "regression":
            self.target.use_teacher = True
            return
        if stage == "recording":
            self.target.use_teacher = True
            r = step - self.regression_steps  # critic updates done so far in this stage
            self._recording_step = r
            if r == 0 and self._start is None:  # reference point for the node-distance diagnostic
                self._start = _trainable_state(self._score_net())
            k = len(self.node_files)
            if k < self.config.num_nodes - 1 and r >= self.node_steps[k]:
                self._save_node(k + 1)
            return
        if len(self.node_files) < self.config.num_nodes:  # final node: critic after the whole stage
            self._recording_step = self.config.recording_steps
            self._save_node(len(self.node_files) + 1)
        if self.current < 0:
            self._advance_to(0, step)
        elif step - self._node_step0 >= self.config.switch_every_steps:
            self._advance_to(self.current + 1, step)

    def phase(self, step: int) -> list[str]:
        """Groups for ``step`` (pure): the base method's, except critic-only while recording."""
        stage = self.stage(step)
        if stage == "regression":
            return self.base.phase(step)
        if stage == "recording":
            return ["critic"]
        return self.base.phase(self._base_step(step))

    def loss(self, batch: dict, step: int, group: str, cache: dict) -> LossOutput:
        stage = self.stage(step)
        out = self.base.loss(batch, self._base_step(step), group, cache)
        out.logs["disback_target"] = float(self.current if stage == "backtracking" else -1)
        if stage == "backtracking" and group == "generator" and self.config.switch_on_convergence:
            key = "dm_grad_norm" if "dm_grad_norm" in out.logs else "vsd_grad_norm"
            self._convergence_check(out.logs.get(key), step)
        return out

    def _convergence_check(self, value, step):
        if value is None:
            return
        c = self.config
        self._window.append(float(value))
        if len(self._window) >= c.convergence_window:
            mean = sum(self._window) / len(self._window)
            if self._prev_window is not None and abs(mean / max(self._prev_window, 1e-12) - 1) < c.convergence_tol:
                self._advance_to(self.current + 1, step + 1)
            else:
                self._prev_window = mean
            self._window = []

    # -- resume -----------------------------------------------------------------------------------
    def state_dict_extra(self) -> dict:
        return {
            "node_files": self.node_files,
            "current": self.current,
            "node_step0": self._node_step0,
            "switch_log": self.switch_log,
            "nodes_dir": str(self.nodes_dir) if self.nodes_dir else None,
            "node_info": self.node_info,
        }

    def load_state_dict_extra(self, state: dict) -> None:
        self.node_files = list(state.get("node_files", []))
        if state.get("nodes_dir") and self.nodes_dir is None:
            self.nodes_dir = Path(state["nodes_dir"])
        self._node_step0 = int(state.get("node_step0", 0))
        self.switch_log = list(state.get("switch_log", []))
        self.node_info = list(state.get("node_info", []))
        cur = int(state.get("current", -1))
        self.current = -1
        if cur >= 0:
            self._load_target(self.targets()[cur])
            self.current = cur

    def describe(self) -> str:
        return json.dumps(self.state_dict_extra())


def node_schedule(recording_steps: int, num_nodes: int, spacing: str = "uniform") -> list[int]:
    """Critic-update counts after which nodes 1..N are snapshotted (the last is ``recording_steps``).

    ``uniform``: every ``R/N`` updates (the paper's fixed interval).  ``geometric``: at ``R^(i/N)``
    (rounded, strictly increasing), so that a critic which moves fast early still leaves nodes
    between the teacher and the degraded end.
    """
    r, n = recording_steps, num_nodes
    if spacing == "uniform":
        return [r * i // n for i in range(1, n)] + [r]
    steps: list[int] = []
    for i in range(1, n + 1):
        s = max(1, round(r ** (i / n)))
        steps.append(max(s, steps[-1] + 1) if steps else s)
    if steps[-1] != r or len(set(steps)) != n:
        raise ValueError(f"cannot place {n} geometric nodes in {r} recording steps; use more recording_steps")
    return steps


def _trainable_state(net: nn.Module) -> dict:
    keys = _trainable_keys(net)
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items() if k in keys}


def _trainable_keys(net: nn.Module) -> set[str]:
    return {n for n, p in net.named_parameters() if p.requires_grad}


def _frozen_twin(critic: nn.Module) -> nn.Module:
    """A frozen copy of ``critic`` that shares its frozen tensors (a LoRA critic's base weights,
    buffers) and the encoders/tokenizer it borrows from the teacher, owns copies of the trainable
    tensors, and has none of the critic's forward hooks (DMD2's GAN feature hook belongs to the
    critic, not to a path node)."""
    from collections import OrderedDict

    memo: dict = {id(t): t for t in critic.parameters() if not t.requires_grad}
    memo.update({id(b): b for b in critic.buffers()})
    for name in ("_shared", "tokenizer", "text_encoder", "vae"):  # borrowed, frozen: never copied
        v = critic.__dict__.get(name)
        if v is not None:
            memo[id(v)] = v
    for m in critic.modules():
        memo[id(m._forward_hooks)] = OrderedDict()
        memo[id(m._forward_pre_hooks)] = OrderedDict()
    twin = copy.deepcopy(critic, memo)
    twin.requires_grad_(False)
    twin.eval()
    return twin


def _write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
