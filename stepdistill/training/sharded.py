"""FSDP2 sharding of the trainable groups (``train.sharding: fsdp2`` or an ``accelerate launch`` FSDP
launch) and sharded checkpoints with ``torch.distributed.checkpoint`` (DCP).

Why ``fully_shard`` directly and not accelerate's ``fsdp_version: 2`` plugin: the trainer does not
``accelerator.prepare`` its models (several groups, each with its own optimizer, generator losses
back-propagating through critics, ``requires_grad`` toggled per phase); ``fully_shard`` is a
per-module call that fits that loop, while the plugin wants one prepared model/optimizer pair.  An
FSDP launch (``ACCELERATE_USE_FSDP``) is therefore read as "shard with FSDP2", said at start, and
accelerate's FSDP plugin options are not used.

What is sharded, and how (:func:`shard_group`):

* each trainable group separately, on a 1-D mesh over all processes, through its FSDP2 roots
  (:func:`group_roots`): the networks inside the group's wrappers -- the diffusers ``ModelMixin``
  (or transformers ``PreTrainedModel``) inside a ``Generator`` / ``DiffusersTeacher`` critic, a GAN
  head next to it in DMD2's ``ModuleDict`` critic group; the group itself when it is a plain module
  called through ``forward`` -- because FSDP2 all-gathers in ``forward`` hooks and the algorithms
  call their groups through ``denoise`` / ``denoise_at``.  Each root is sharded unit by unit
  (:func:`fsdp_units`) -- every block of a ``ModuleList`` stack holding at least 1/16 of the root
  (each transformer block of SD3 / FLUX, UNet down / up blocks), and other submodules holding at
  least 1/16 (a UNet's mid block) -- then the root itself (the remaining parameters);
* groups whose module holds frozen parameters of the teacher (LoRA generator / critic sharing the
  teacher's base weights) stay replicated (they are small) and are reported;
* the frozen teacher, text encoders and VAE are not sharded: they stay replicated (in bf16/fp16
  where ``teacher.dtype`` says so);
* no ``MixedPrecisionPolicy``: parameters stay float32 and compute precision comes from
  ``accelerator.autocast()`` as in the replicated path.  (NeMo reported that toggling
  ``requires_grad`` per phase corrupts FSDP2 mixed-precision state; with the policy off, toggling
  the critic's ``requires_grad`` in the generator phase is tested here on CPU: same weights as the
  replicated run.)

Gradient reduction is FSDP2's reduce-scatter (mean over ranks) in each backward; while group ``g``
runs its micro-batches every *other* sharded group has ``set_requires_gradient_sync(False)`` on each
of its roots (the
generator loss back-propagating through a critic that still requires grad then leaves only local
gradients there, which are zeroed, never communicated).  Gradient clipping works on the DTensor
gradients (``clip_grad_norm_`` computes the global norm).  The EMA shadow holds DTensors (the
local shards), so it is sharded too.

Checkpoints keep the usual folder (:mod:`.checkpoint`) with, in addition, ``sharded/`` -- a DCP
checkpoint of every group's sharded weights, optimizer states and EMA shadow, written by all ranks
-- from which a sharded run resumes exactly.  The ``<group>.safetensors`` / ``<group>_ema.safetensors``
files hold the *full* weights gathered on rank 0, so ``stepdistill export`` and
``load_checkpoint_weights`` read a sharded run's checkpoint like any other; ``optimizer-<group>.pt``
is a small marker pointing at ``sharded/``.  At the end of a sharded run the groups are gathered
back into plain modules (full weights on every rank), so exporting a diffusers folder, sampling and
evaluation after ``train()`` see ordinary ``nn.Module`` s; every other reference the task holds to
a group's modules (DMD2's ``critic`` next to ``critic_group["score"]``, ``BottleneckFeatures``'
hooked module) is pointed at the plain copy (:func:`_rebind`).
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import ConfigError
from .checkpoint import (
    CheckpointError,
    checkpoint_path,
    checkpoints_dir,
    load_pt,
    read_trainer_state,
    rotate_checkpoints,
    save_checkpoint,
    write_files,
)
from .distributed import SHARDING_KINDS, broadcast_modules, on_main, sharding_request
from .ema import EMA
from .loop import Trainer

logger = logging.getLogger("stepdistill.training")

SHARDED_DIR = "sharded"

__all__ = ["SHARDING_KINDS", "ShardedTrainer", "sharding_request", "fsdp_units", "shard_group", "group_roots",
           "shard_trainable_group", "fsdp_roots", "local_param_bytes", "full_state_dict", "is_sharded"]


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` or one of its submodules is an FSDP2 module."""
    return bool(fsdp_roots(module))


def fsdp_roots(module: nn.Module) -> list[nn.Module]:
    """The outermost FSDP2 modules in ``module`` (``[module]`` when it is one)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module, FSDPModule):
        return [module]
    return [r for c in module.children() for r in fsdp_roots(c)]


def _network_classes() -> tuple[type, ...]:
    """Library networks: always run through ``forward`` (``__call__``)."""
    from diffusers import ModelMixin

    classes: list[type] = [ModelMixin]
    try:
        from transformers import PreTrainedModel

        classes.append(PreTrainedModel)
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    return tuple(classes)


def _adapter_classes() -> tuple[type, ...]:
    """The package's wrappers that algorithms call through other methods than ``forward``
    (``denoise``, ``denoise_raw``, ``denoise_at``, ``denoise_step``) -- never FSDP2 roots."""
    from ..students import Generator
    from ..teachers.base import DiffusionTeacher

    return (DiffusionTeacher, Generator, nn.ModuleList, nn.ModuleDict)


def group_roots(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules of a trainable group that :class:`ShardedTrainer` makes FSDP2 roots, as ``(name, module)``.

    FSDP2 all-gathers a module's parameters in its ``forward`` pre-hook, so a root must be a module
    whose ``forward`` runs whenever its parameters are used.  The algorithms call their groups
    through other methods (``DiffusersTeacher.denoise``, ``Generator.denoise_at``, DMD2's
    ``BottleneckFeatures`` -> ``denoise_raw``, Distilled Decoding's ``DDStudent.logits``), and DMD2's
    critic group is an ``nn.ModuleDict`` (which ``fully_shard`` refuses).  Top-down from the group:

    * a library network (diffusers ``ModelMixin``, transformers ``PreTrainedModel``) is a root -- every
      wrapper ends up calling it, and only through ``forward``;
    * containers (``ModuleList`` / ``ModuleDict``), the package's adapters (``DiffusionTeacher``,
      ``students.Generator``) and any module holding a library network below it are descended into;
    * any other module holding parameters (a GAN head, an analytic ``MLPDenoiser``'s layers, a plain
      ``nn.Module`` group called through ``forward`` such as the tests' toy) is a root.

    A module that is descended into must hold no parameters of its own (they would belong to no
    root and never be gathered): that is refused with :class:`ConfigError`.  Each root is then
    sharded unit by unit (:func:`shard_group`).  (``register_fsdp_forward_method`` on the wrapper
    methods was not used: the list of entry points is open-ended -- every algorithm adds its own --,
    they nest (``denoise`` -> ``denoise_raw``: the inner post-forward would reshard under the outer
    call), and it cannot make a ``ModuleDict`` a root.)
    """
    nets, adapters = _network_classes(), _adapter_classes()
    roots: list[tuple[str, nn.Module]] = []

    def holds_network(m: nn.Module) -> bool:
        return any(isinstance(x, nets) for x in m.modules())

    def visit(name: str, m: nn.Module) -> None:
        if isinstance(m, nets) or not (isinstance(m, adapters) or holds_network(m)):
            roots.append((name, m))
            return
        own = [n for n, _ in m.named_parameters(recurse=False)]
        if own:
            raise ConfigError(f"train.sharding: fsdp2: {type(m).__name__} {name or '(the group)'!r} holds parameters "
                              f"of its own ({', '.join(own[:4])}) outside the networks it calls; they would never be "
                              "all-gathered. Move them into a submodule called through forward()")
        for child_name, child in m.named_children():
            if any(True for _ in child.parameters()):
                visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", module)
    return roots


def _own_numel(module: nn.Module, covered: set[int]) -> int:
    return sum(p.numel() for p in module.parameters() if id(p) not in covered)


def fsdp_units(module: nn.Module, min_params: int | None = None) -> list[tuple[str, nn.Module]]:
    """The submodules :func:`shard_group` makes FSDP2 units, top-down, as ``(name, module)``.

    * **Stacks of repeated blocks**: every parameter-holding child of an ``nn.ModuleList`` that holds
      at least ``min_params`` parameters (default ``total // 16``) is a unit, whatever its own size --
      transformer blocks (FLUX's 19 + 38, each ~1/80 of the transformer; SD3's 24, ~1/25), UNet
      down / up blocks.  The network runs them one after another, so one block's parameters are
      gathered at a time (what torchtitan and accelerate's transformer-based wrap policy do).
    * **Other submodules** with at least ``min_params`` parameters (a UNet's ``mid_block``, an
      embedding or head that large).
    * A candidate holding more than half of the group is split: its children are tried instead.
    * Containers without a forward (``ModuleList`` / ``ModuleDict``) are never units themselves (FSDP2
      gathers in forward hooks), only their children; a ``ModuleDict``'s children follow the size rule
      (they are named parts, not repeated blocks).

    What no unit holds (``conv_in``, time / text embeddings, norms, output head) stays with the root.
    """
    total = sum(p.numel() for p in module.parameters())
    threshold = max(total // 16, 1) if min_params is None else int(min_params)
    chosen: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, m: nn.Module, stack: bool) -> None:
        for child_name, child in m.named_children():
            name = f"{prefix}{child_name}"
            n = sum(p.numel() for p in child.parameters())
            if n == 0 or (n < threshold and not stack):
                continue
            if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
                visit(f"{name}.", child, stack=isinstance(child, nn.ModuleList))
            elif n > total // 2 and any(True for _ in child.children()):
                visit(f"{name}.", child, stack=False)
            else:
                chosen.append((name, child))

    visit("", module, stack=False)
    return chosen


def shard_group(module: nn.Module, mesh: Any, min_params: int | None = None) -> list[str]:
    """``fully_shard`` the units of ``module`` (:func:`fsdp_units`), then the root; returns the unit names."""
    from torch.distributed.fsdp import fully_shard

    chosen = fsdp_units(module, min_params)
    for _, m in chosen:
        fully_shard(m, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return [n for n, _ in chosen]


def shard_trainable_group(module: nn.Module, mesh: Any) -> dict[str, list[str]]:
    """:func:`shard_group` on each of the group's :func:`group_roots`; returns ``{root name: unit names}``."""
    return {name: shard_group(root, mesh) for name, root in group_roots(module)}


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if _is_dtensor(t) else t


def local_param_bytes(modules: list[nn.Module]) -> int:
    """Bytes of parameters this rank holds (local shards of DTensors)."""
    n = 0
    for m in modules:
        for p in m.parameters():
            t = p.to_local() if _is_dtensor(p) else p
            n += t.numel() * t.element_size()
    return n


def local_optimizer_bytes(optimizers: list[torch.optim.Optimizer]) -> int:
    n = 0
    for opt in optimizers:
        for st in opt.state.values():
            for v in st.values():
                if isinstance(v, Tensor) and v.dim() > 0:
                    t = v.to_local() if _is_dtensor(v) else v
                    n += t.numel() * t.element_size()
    return n


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The full (gathered) state dict on every rank; collective for a sharded module."""
    return {k: _full(v).detach().clone() for k, v in module.state_dict().items()}


_MODULE_INTERNALS = frozenset(vars(nn.Module()))  # _parameters, _modules, hook dicts, training, ...


def _meta_skeleton(module: nn.Module, task: nn.Module | None = None) -> tuple[nn.Module, dict[int, nn.Module]]:
    """A deep copy of ``module`` whose parameters and buffers are on the meta device (no memory),
    and ``{id(original submodule): its copy}``.  Modules and tensors of ``task`` outside ``module``
    (e.g. a teacher it refers to) are shared, and so are the plain objects the task's other modules
    hold as attributes: a hook the algorithm registered on a module of the group (DMD2's
    ``BottleneckFeatures`` on the critic's mid block) stays bound to the algorithm's own object."""
    memo: dict[int, Any] = {}
    if task is not None:
        inside = {id(m) for m in module.modules()}
        for m in task.modules():
            if id(m) in inside:
                continue
            memo[id(m)] = m
            for k, v in vars(m).items():
                if k not in _MODULE_INTERNALS and not isinstance(v, (nn.Module, Tensor)):
                    memo[id(v)] = v
        for t in list(task.parameters()) + list(task.buffers()):
            memo[id(t)] = t
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    skeleton = copy.deepcopy(module, memo)
    return skeleton, {id(m): memo[id(m)] for m in module.modules()}


def _rebind(task: nn.Module, mapping: dict[int, nn.Module]) -> int:
    """Point every reference the task holds to an old (sharded) module of a group at its plain
    copy: submodule entries (DMD2's ``critic`` is both ``critic_group["score"]`` and an attribute),
    modules kept as plain attributes, and module attributes of plain objects the task's modules hold
    (``BottleneckFeatures.module``).  Returns the number of references changed."""
    changed = 0
    seen: set[int] = set()
    for m in list(task.modules()):
        for k, c in list(m._modules.items()):
            if c is not None and id(c) in mapping:
                m._modules[k] = mapping[id(c)]
                changed += 1
        for k, v in list(vars(m).items()):
            if k in _MODULE_INTERNALS:
                continue
            if isinstance(v, nn.Module):
                if id(v) in mapping:
                    object.__setattr__(m, k, mapping[id(v)])
                    changed += 1
            elif hasattr(v, "__dict__") and not isinstance(v, (Tensor, type)) and id(v) not in seen:
                seen.add(id(v))
                for a, x in list(vars(v).items()):
                    if isinstance(x, nn.Module) and id(x) in mapping:
                        setattr(v, a, mapping[id(x)])
                        changed += 1
    return changed


def _find_path(root: nn.Module, target: nn.Module) -> str | None:
    for name, m in root.named_modules():
        if m is target:
            return name
    return None


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, attr, new)


class ShardedTrainer(Trainer):
    """:class:`~stepdistill.training.loop.Trainer` with FSDP2-sharded trainable groups (module doc)."""

    sharding_why = "train.sharding"

    # -- set-up -------------------------------------------------------------------------------
    def prepare_groups(self, groups: dict[str, nn.Module]) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        self.sharding_why = sharding_request(self.cfg, self.acc)[1] or self.sharding_why

        if self.world > 1:
            broadcast_modules(list(groups.values()))  # every rank shards rank 0's weights
        frozen = {id(p) for m in self.task.frozen_modules() for p in m.parameters()}
        mesh = init_device_mesh(self.device.type, (self.world,)) if self.world > 1 else None
        if mesh is None:
            import torch.distributed as dist

            if not dist.is_initialized():  # a 1-process sharded run: a world of one (for tests, plan checks)
                raise ConfigError("train.sharding: fsdp2 needs a multi-process launch (accelerate launch "
                                  "--num_processes N); with one process leave train.sharding null")
            mesh = init_device_mesh(self.device.type, (1,))
        self.sharded_groups: list[str] = []
        self.replicated_groups: list[str] = []
        self.skeletons: dict[str, tuple[str, nn.Module, dict[int, nn.Module]]] = {}
        self.roots: dict[str, list[nn.Module]] = {}
        for name, module in groups.items():
            if any(id(p) in frozen for p in module.parameters()):
                self.replicated_groups.append(name)
                continue
            path = _find_path(self.task, module)
            if path is None or path == "":
                raise ConfigError(f"train.sharding: trainable group {name!r} is not a submodule of the task; "
                                  "it cannot be sharded (register it as an attribute of the distiller)")
            self.skeletons[name] = (path, *_meta_skeleton(module, self.task))
            units = shard_trainable_group(module, mesh)
            self.roots[name] = fsdp_roots(module)
            self.sharded_groups.append(name)
            logger.info("FSDP2: group %r sharded over %d processes: roots %s (%d units in all)", name, self.world,
                        ", ".join(r or "(the group)" for r in units), sum(len(u) for u in units.values()))
        if self.acc.is_main_process and self.cfg.progress:
            extra = (f"; replicated (share frozen teacher weights, LoRA): {', '.join(self.replicated_groups)}"
                     if self.replicated_groups else "")
            print(f"[stepdistill] sharding=fsdp2 ({self.sharding_why}): groups {', '.join(self.sharded_groups) or '-'} "
                  f"sharded over {self.world} processes{extra}; frozen teacher replicated", flush=True)

    def _sharded_modules(self) -> dict[str, nn.Module]:
        return {g: self.groups[g] for g in self.sharded_groups}

    # -- step ---------------------------------------------------------------------------------
    def _restore_requires_grad(self) -> None:
        """Put ``requires_grad=True`` back on the *sharded* parameters of every sharded group.

        An algorithm that freezes a critic for the generator phase (``requires_grad_(False)`` before
        its forward, ``(True)`` after) reaches the sharded parameters with the first call but, after
        the forward, the root's *unsharded* ones (FSDP2 keeps the root unsharded until backward
        ends), so the root's sharded parameters would stay frozen for good (found by
        tests/test_fsdp.py: the critic stopped training).  FSDP2 copies the sharded flag onto the
        unsharded parameter at every all-gather, so restoring it here, between groups, is enough."""
        for g in self.sharded_groups:
            for p in self.params[g]:
                if not p.requires_grad:
                    p.requires_grad_(True)

    def _gradient_sync(self, on: Any) -> None:
        """``set_requires_gradient_sync`` on every FSDP2 root of every sharded group (a group may have
        several roots: DMD2's critic network and GAN head); ``on(group) -> bool``."""
        for g in self.sharded_groups:
            for root in self.roots[g]:
                root.set_requires_gradient_sync(on(g))

    def run_group(self, step: int, pos: int, group: str, batches: list, caches: list[dict]) -> None:
        self._gradient_sync(lambda g: g == group)
        self._restore_requires_grad()
        try:
            super().run_group(step, pos, group, batches, caches)
        finally:
            self._gradient_sync(lambda g: True)
            self._restore_requires_grad()

    def reduce_grads(self, group: str, params: list[nn.Parameter]) -> None:
        if group in self.sharded_groups:
            return  # FSDP2 reduce-scattered (mean over ranks) in backward
        super().reduce_grads(group, params)

    def _log(self, key: str, value: Any) -> None:
        if _is_dtensor(value):
            value = value.full_tensor()
        super()._log(key, value)

    def sample(self, step: int) -> None:
        """Sharded forward passes are collective: every rank runs ``sample_fn``, the main one saves."""
        from .images import save_samples

        self.sampled_at = step
        with torch.no_grad():
            x = self._with_ema(lambda: self.sample_fn(step))

        def save() -> None:
            if x is not None:
                path = save_samples(x, self.out_dir / "samples" / f"step-{step:07d}.png", title=f"step {step}")
                self.samples.append(str(path))

        on_main(self.acc, save, f"saving the sample grid at step {step}")

    # -- checkpoints --------------------------------------------------------------------------
    def _dcp_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        state: dict[str, Any] = {}
        for g in self.sharded_groups:
            m, opt = self.groups[g], self.optimizers[g]
            state[f"model.{g}"] = get_model_state_dict(m)
            state[f"optim.{g}"] = get_optimizer_state_dict(m, opt)
        if self.ema is not None and self.ema_group in self.sharded_groups:
            state["ema"] = dict(self.ema.shadow)
        return state

    def checkpoint(self, step: int) -> None:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        extra = self.task.state_dict_extra()
        root = checkpoints_dir(self.out_dir)
        if self.acc.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
        staging = root / f".sharded-{step:07d}.tmp-run"
        if self.acc.is_main_process and staging.exists():
            shutil.rmtree(staging)
        dist.barrier()
        dcp.save(self._dcp_state(), checkpoint_id=str(staging))  # every rank writes its shards
        # full weights (and EMA) gathered for export / load_checkpoint_weights, kept on the main process
        full = {g: full_state_dict(m) for g, m in self.groups.items()}
        ema_full = None
        if self.ema is not None:
            ema_full = {k: _full(v).detach().clone() for k, v in self.ema.state_dict_for(self.groups[self.ema_group]).items()}
        dist.barrier()
        trainer = self

        def writer(folder: Path, **files) -> None:
            os.replace(staging, folder / SHARDED_DIR)
            markers = {name: ({"sharded": SHARDED_DIR, "key": f"optim.{name}"} if name in trainer.sharded_groups
                              else opt.state_dict()) for name, opt in files["optimizers"].items()}
            write_files(folder, **files, module_states=full, optimizer_states=markers, ema_state=ema_full)

        def write() -> Path:
            path = save_checkpoint(
                self.out_dir, step, modules=self.groups, optimizers=self.optimizers, schedulers=self.schedulers,
                scalers=self.scalers, ema=self._ema_pair(), extra=extra, writer=writer,
                trainer_state={"config_hash": self.chash, "world_size": self.world, "grad_accum_steps": self.accum,
                               "config": self._config_data(),
                               "sharding": {"kind": "fsdp2", "groups": self.sharded_groups, "dir": SHARDED_DIR}},
            )
            rotate_checkpoints(self.out_dir, self.cfg.checkpoints_total_limit)
            return path

        on_main(self.acc, write, f"writing checkpoint {step}")
        self.last_ckpt = checkpoint_path(self.out_dir, step)
        self.saved_at = step

    def load_state(self, ckpt: Path) -> tuple[dict, dict | None]:
        import json

        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        ckpt = Path(ckpt)
        state = read_trainer_state(ckpt)
        info = state.get("sharding") or {}
        if info.get("kind") != "fsdp2" or sorted(info.get("groups") or []) != sorted(self.sharded_groups):
            raise CheckpointError(
                f"checkpoint {ckpt} was not written by a sharded run with groups {sorted(self.sharded_groups)} "
                f"(it has sharding={info or None}); resume it with the launch that wrote it, or start a new "
                "output_dir (the weights can be exported with `stepdistill export`)")
        target = self._dcp_state()
        try:
            dcp.load(target, checkpoint_id=str(ckpt / info.get("dir", SHARDED_DIR)))
        except Exception as e:  # noqa: BLE001 - DCP raises several types (CheckpointException, ...)
            raise CheckpointError(f"checkpoint {ckpt}: cannot read the sharded state: {e}") from e
        for g in self.sharded_groups:
            set_model_state_dict(self.groups[g], target[f"model.{g}"])
            set_optimizer_state_dict(self.groups[g], self.optimizers[g], target[f"optim.{g}"])
        for g in self.replicated_groups:
            from safetensors.torch import load_file

            self.groups[g].load_state_dict(load_file(str(ckpt / f"{g}.safetensors"), device=str(self.device)))
            self.optimizers[g].load_state_dict(load_pt(ckpt / f"optimizer-{g}.pt"))
        for g, sched in self.schedulers.items():
            sched.load_state_dict(load_pt(ckpt / f"scheduler-{g}.pt"))
        for g, scaler in self.scalers.items():
            f = ckpt / f"scaler-{g}.pt"
            if f.is_file():
                scaler.load_state_dict(load_pt(f))
        meta = state.get("ema") or {}
        if self.ema is not None and meta:
            if "ema" in target:
                with torch.no_grad():
                    for k, v in target["ema"].items():
                        self.ema.shadow[k].copy_(v)
                self.ema.num_updates = int(meta.get("num_updates", 0))
            else:
                from safetensors.torch import load_file

                self.ema.load_shadow(load_file(str(ckpt / f"{self.ema_group}_ema.safetensors")),
                                     int(meta.get("num_updates", 0)))
        extra = None
        f = ckpt / "extra.json"
        if f.is_file():
            extra = json.loads(f.read_text())
        return state, extra

    # -- the end: plain modules again ---------------------------------------------------------
    def _gather_back(self) -> None:
        """Replace every sharded group by a plain module holding the full weights (every rank)."""
        if getattr(self, "gathered", False):
            return
        ema_full = None
        if self.ema is not None:
            ema_full = {k: _full(v).detach().clone() for k, v in self.ema.shadow.items()}
        mapping: dict[int, nn.Module] = {}
        for g in self.sharded_groups:
            path, skeleton, copies = self.skeletons[g]
            full = full_state_dict(self.groups[g])
            plain = skeleton.to_empty(device=self.device)
            plain.load_state_dict(full, strict=True)
            for old in self.groups[g].modules():  # train / eval flags as they were, module by module
                copies[id(old)].train(old.training)
            _set_submodule(self.task, path, plain)
            mapping.update(copies)
            self.groups[g] = plain
        # other references to the old modules (DMD2.critic is critic_group["score"]; hooks' owners)
        _rebind(self.task, mapping)
        if self.ema is not None:
            ema = EMA.__new__(EMA)
            ema.decay, ema.warmup, ema.num_updates = self.ema.decay, self.ema.warmup, self.ema.num_updates
            ema.shadow = ema_full
            self.ema = ema
        self.gathered = True

    def result(self) -> dict:
        self._gather_back()
        res = super().result()
        res["sharding"] = {"kind": "fsdp2", "groups": list(self.sharded_groups),
                           "replicated": list(self.replicated_groups), "why": self.sharding_why}
        return res
