"""What every exporter shares: atomic folders, network preparation (unwrap, EMA weights, adapter
folding, fp32), the LCM scheduler of distilled students, provenance metadata and the model card."""

from __future__ import annotations

import copy
import datetime as _dt
import inspect
import json
import os
import shutil
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import OutputError

SCHEDULER_TIMESTEPS_KEY = "_stepdistill_timesteps"
SCHEDULER_SIGMAS_KEY = "_stepdistill_sigmas"  # flow-matching students: the stock call's sigmas=
SCHEDULER_CALL_KEY = "_stepdistill_pipeline_call"  # stock pipelines: the __call__ kwargs that run the student
SCHEDULER_NUM_CLASSES_KEY = "_stepdistill_num_classes"  # stock class-conditional folders (no pipeline config)
METADATA_FILE = "stepdistill.json"
TEXT_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline")
LCM_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
EMA_PREFIXES = ("denoiser.model.", "model.", "module.", "generator.denoiser.model.")
SUPPORTED = (
    "export supports (a) text-to-image students as stock pipelines: UNet2DConditionModel of Stable-Diffusion-layout "
    "teachers -> StableDiffusionPipeline, SDXL UNets -> StableDiffusionXLPipeline (both + LCMScheduler), "
    "SD3Transformer2DModel -> StableDiffusion3Pipeline, FluxTransformer2DModel -> FluxPipeline (both + "
    "FlowMatchEulerDiscreteScheduler), LoRA students also as LoRA weights for the stock teacher pipeline; "
    "(b) UNet2DModel students (pixel space, or latent space with the teacher's vae) -> stock "
    "ConsistencyModelPipeline + LCMScheduler where it reproduces the student, else OneStepPipeline; "
    "(c) class-conditional DiT students with the teacher's vae -> stock DiTPipeline + LCMScheduler where LCM's "
    "default schedule is the student's; prediction types epsilon / v_prediction / sample (flow: SD3 / FLUX only)"
)


class ExportError(OutputError):
    """The student or the output folder cannot be exported as asked; the message says why."""


class UnsupportedStudentError(ExportError, NotImplementedError):
    """The student has no export form (its network family or parametrisation); the message names
    what is supported.  A ``NotImplementedError`` too, for callers that catch that."""


class ExportModeError(ExportError, ValueError):
    """The export kind asked for (``lora=``) does not exist for this student or value; the message
    names the kinds that do.  A ``ValueError`` too, for callers that catch that."""


#: ``lora=`` of every export: ``auto`` (a LoRA student: pipeline + adapter; others: the pipeline),
#: ``both``, ``adapter`` (LoRA weights only), ``fused`` (the full pipeline only)
LORA_MODES = ("auto", "both", "adapter", "fused")


def check_lora_mode(lora, has_lora_loader: bool = True, what: str = "this student") -> str:
    """``lora`` if it is one of :data:`LORA_MODES` and possible here; :class:`ExportModeError` naming
    the choices otherwise.  ``has_lora_loader=False``: the pipeline written has no LoRA loader
    (``UNet2DModel`` / DiT / multi-student pipelines), so only ``auto`` / ``fused`` exist (an
    adapter is folded into the weights)."""
    if lora not in LORA_MODES:
        raise ExportModeError(f"lora must be one of {', '.join(LORA_MODES)}, got {lora!r}")
    if not has_lora_loader and lora in ("adapter", "both"):
        raise ExportModeError(
            f"lora={lora!r}: {what} is written as a pipeline with no LoRA loader, so there is no LoRA-weights "
            "form; use lora='auto' or 'fused' (a LoRA adapter is folded into the weights)"
        )
    return lora


class OutputExistsError(ExportError, FileExistsError):
    """The output folder exists and may not be replaced (not empty without ``overwrite``, not a
    folder an export wrote, or a protected run / teacher folder); nothing was changed."""


#: written into every folder :func:`atomic_output_dir` produces: ``overwrite`` replaces only a
#: folder holding it (or an older export's ``stepdistill.json``)
EXPORT_MARKER = ".stepdistill-export"
_PROTECTED: ContextVar[tuple[tuple[Path, bool, str], ...]] = ContextVar("stepdistill_protected", default=())


@contextmanager
def protected_folders(*folders: tuple[str | Path | None, bool, str]) -> Iterator[None]:
    """While active, :func:`atomic_output_dir` refuses an output that is, or lies above, one of
    ``folders`` -- ``(path, inside_too, what)``; with ``inside_too`` also any output inside it
    (e.g. ``(run_dir, False, "the run folder")``, ``(teacher_dir, True, "the teacher folder")``).
    ``None`` paths are skipped."""
    add = tuple((Path(p).expanduser().resolve(), bool(inside), str(what)) for p, inside, what in folders
                if p is not None and str(p) != "")
    token = _PROTECTED.set(_PROTECTED.get() + add)
    try:
        yield
    finally:
        _PROTECTED.reset(token)


def is_export_folder(folder: str | Path) -> bool:
    """Whether ``folder`` was written by a stepdistill export (it holds the marker or metadata)."""
    folder = Path(folder)
    return (folder / EXPORT_MARKER).is_file() or (folder / METADATA_FILE).is_file()


def check_output_dir(output_dir: str | Path, overwrite: bool = False) -> Path:
    """The absolute output folder, after refusing (:class:`OutputExistsError`) what an export may
    not write: a protected folder or anything above it, a file, a non-empty folder without
    ``overwrite``, and with ``overwrite`` a non-empty folder no export wrote."""
    out = Path(output_dir).expanduser().absolute()
    real = out.resolve()
    for path, inside, what in _PROTECTED.get():
        if real == path or real in path.parents:
            where = "is" if real == path else "lies above"
            raise OutputExistsError(
                f"--output {out} {where} {what} {path}; writing there would replace it; choose an --output "
                "outside it (e.g. RUN/pipeline-export)"
            )
        if inside and path in real.parents:
            raise OutputExistsError(
                f"--output {out} lies inside {what} {path}; choose an --output outside it"
            )
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise OutputExistsError(f"--output {out} exists and is not a folder; choose another --output")
        if any(out.iterdir()):
            if not overwrite:
                raise OutputExistsError(
                    f"--output {out} exists and is not empty; pass --overwrite to replace an earlier export "
                    "(overwrite=True from Python), or choose another --output"
                )
            if not is_export_folder(out):
                raise OutputExistsError(
                    f"--output {out} is not a folder written by a stepdistill export (no {EXPORT_MARKER} or "
                    f"{METADATA_FILE}); --overwrite replaces only an earlier export; choose another --output or "
                    "empty it yourself"
                )
    return out


# -- atomic folders -----------------------------------------------------------------------------
@contextmanager
def atomic_output_dir(output_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a scratch folder ``<output_dir>.tmp-<pid>``; on success it replaces ``output_dir``.

    Refuses (:class:`OutputExistsError`, before any work) what :func:`check_output_dir` refuses: a
    non-empty existing ``output_dir`` unless ``overwrite``, with ``overwrite`` a folder no export
    wrote, and a folder protected by :func:`protected_folders` (or above it).  On error the scratch
    folder is removed and ``output_dir`` is left untouched.  The finished folder holds
    :data:`EXPORT_MARKER`.
    """
    out = check_output_dir(output_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        (tmp / EXPORT_MARKER).write_text(json.dumps({"written_by": "stepdistill export"}) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.is_dir():
        if any(out.iterdir()):
            old = out.with_name(f"{out.name}.old-{os.getpid()}")
            if old.exists():
                shutil.rmtree(old)
            os.replace(out, old)
        else:
            out.rmdir()
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def update_model_index(folder: Path, updates: dict) -> None:
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    index.update(updates)
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


# -- networks: unwrap, EMA, adapters, fp32 ------------------------------------------------------
def unwrap(net: nn.Module) -> nn.Module:
    """Strip DDP / torch.compile wrappers."""
    while True:
        if hasattr(net, "_orig_mod"):
            net = net._orig_mod
        elif isinstance(net, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            net = net.module
        else:
            return net


def _strip_prefix(state: dict, target_keys: set, prefixes: Iterable[str]) -> dict:
    if set(state) & target_keys:
        return state
    for prefix in prefixes:
        stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if stripped and set(stripped) & target_keys:
            return stripped
    return state


def load_ema_state(net: nn.Module, state: dict, what: str = "the student network",
                   prefixes: Iterable[str] = EMA_PREFIXES, optional: tuple[str, ...] = ()) -> None:
    """Load EMA weights into ``net``: a state dict of the network (keys optionally carrying one of
    ``prefixes``, e.g. the generator group's ``denoiser.model.``) or a diffusers
    ``EMAModel.state_dict()`` (``shadow_params`` in parameter order).  Network keys ending in one of
    ``optional`` may be missing from the state (recomputed buffers)."""
    if "shadow_params" in state:
        params, shadow = list(net.parameters()), state["shadow_params"]
        if len(shadow) != len(params):
            raise ExportError(f"EMA state has {len(shadow)} shadow params, {what} has {len(params)}")
        with torch.no_grad():
            for p, s in zip(params, shadow):
                p.copy_(s.to(p.device, p.dtype))
        return
    target = net.state_dict()
    state = _strip_prefix(dict(state), set(target), prefixes)
    missing = sorted(k for k in set(target) - set(state) if not (optional and k.endswith(optional)))
    unexpected = sorted(set(state) - set(target))
    if missing or unexpected:
        raise ExportError(
            f"use_ema_state does not match {what}: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )
    net.load_state_dict(state, strict=not optional)


def has_adapters(net: nn.Module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # peft not installed: nothing can be adapted
        return False
    return any(isinstance(m, BaseTunerLayer) for m in net.modules())


def fold_adapters(net: nn.Module) -> None:
    """Fold PEFT adapters (LoRA, ...) into the base weights and put the plain layers back, so that
    the saved network is a stock model.  diffusers models with the PEFT mixin (``add_adapter``) use
    their ``fuse_lora()`` + ``unload_lora()``; other networks (``UNet2DModel`` adapted with
    ``peft.inject_adapter_in_model``) the same two library steps: PEFT's per-layer ``merge()``, then
    diffusers' ``recurse_remove_peft_layers``."""
    if not has_adapters(net):
        return
    if hasattr(net, "fuse_lora") and hasattr(net, "unload_lora"):
        net.fuse_lora()
        net.unload_lora()
        return
    from diffusers.utils import recurse_remove_peft_layers
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in net.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    recurse_remove_peft_layers(net)
    net.__dict__.pop("peft_config", None)


def fp32(module):
    """``module`` itself when it is fp32 (or not a module), else an fp32 copy."""
    if isinstance(module, nn.Module) and any(p.dtype != torch.float32 for p in module.parameters()):
        return copy.deepcopy(module).float()
    return module


def prepare_network(net: nn.Module, use_ema_state: dict | None = None, what: str = "the student network",
                    prefixes: Iterable[str] = EMA_PREFIXES, optional: tuple[str, ...] = ()) -> nn.Module:
    """The network ready to save: unwrapped, EMA weights loaded, adapters folded, fp32.  The live
    network is never changed (a copy is made whenever something has to change)."""
    net = unwrap(net)
    needs_copy = (
        use_ema_state is not None
        or has_adapters(net)
        or any(p.dtype != torch.float32 for p in net.parameters())
    )
    if not needs_copy:
        return net
    # float32 before folding: a LoRA student's frozen base is the teacher's bf16 tensors, and folding
    # the fp32 adapter into bf16 weights would round the student's delta away
    net = copy.deepcopy(net).float()
    if use_ema_state is not None:
        load_ema_state(net, use_ema_state, what, prefixes, optional)
    fold_adapters(net)
    return net


def student_network(generator, use_ema_state: dict | None) -> nn.Module:
    """The student's diffusers network ready to save: fp32, EMA weights, LoRA fused."""
    return prepare_network(generator.denoiser.model, use_ema_state)


# -- students -----------------------------------------------------------------------------------
STUDENT_KINDS = ("UNet2DConditionModel", "UNet2DModel", "SD3Transformer2DModel", "FluxTransformer2DModel",
                 "Transformer2DModel", "DiTTransformer2DModel")
FLOW_KINDS = ("SD3Transformer2DModel", "FluxTransformer2DModel")


def check_student(generator, kinds=STUDENT_KINDS, who: str = "", why: str = SUPPORTED):
    """The denoiser of an exportable student (a diffusers network wrapped by ``DiffusersTeacher``
    with an LCM-compatible parametrisation); :class:`UnsupportedStudentError` otherwise.  ``who``: a prefix
    for the messages (``"student 2: "``)."""
    denoiser = getattr(generator, "denoiser", None)
    if (
        denoiser is None
        or not isinstance(getattr(denoiser, "model", None), nn.Module)
        or not hasattr(denoiser, "scheduler_config")
    ):
        raise UnsupportedStudentError(
            f"{who}cannot export a generator whose denoiser is {type(denoiser).__name__}: it is not a diffusers "
            f"network wrapped by stepdistill.teachers.diffusion.DiffusersTeacher; {SUPPORTED}"
        )
    prediction_type = denoiser.prediction_type
    kind = type(unwrap(denoiser.model)).__name__
    if prediction_type == "flow" and kind in FLOW_KINDS and kind in kinds:
        return denoiser
    if prediction_type == "flow":
        raise UnsupportedStudentError(
            f"{who}flow-matching {kind} students cannot be exported: only SD3 / FLUX transformers have a stock "
            f"flow-matching pipeline, and LCMScheduler supports only {LCM_PREDICTION_TYPES}; {SUPPORTED}"
        )
    if prediction_type not in LCM_PREDICTION_TYPES:
        raise UnsupportedStudentError(f"{who}prediction_type {prediction_type!r} is not exportable; {SUPPORTED}")
    if kind not in kinds:
        raise UnsupportedStudentError(f"{who}cannot export a {kind} student; {why}")
    if getattr(generator, "boundary", "lcm") != "lcm":
        warnings.warn(
            f"{who}generator.boundary={generator.boundary!r}: the exported LCMScheduler applies the LCM boundary "
            "scalings, so the pipeline differs slightly from the training-time generator",
            stacklevel=3,
        )
    return denoiser


def training_timesteps(generator) -> list[int]:
    """The generator's training-time timesteps as scheduler timestep values."""
    return [int(round(generator.denoiser.timestep_value(t))) for t in generator.timesteps]


def frozen_part(teacher, generator, name: str):
    """text_encoder / vae / tokenizer from the teacher, else shared with the student's denoiser."""
    for owner in (teacher, generator.denoiser):
        if owner is None:
            continue
        part = getattr(owner, name, None)
        if part is None:
            part = getattr(owner, "_shared", {}).get(name)
        if part is not None:
            return part
    return None


def teacher_name(teacher, generator, name: str | None, extra: dict | None) -> str:
    if name:
        return str(name)
    if extra and extra.get("teacher"):
        return str(extra["teacher"])
    for owner in (teacher, generator.denoiser):
        model = getattr(owner, "model", None)
        cfg = getattr(model, "config", None)
        found = cfg.get("_name_or_path") if cfg is not None else None
        if found:
            return str(found)
    return type(teacher).__name__ if teacher is not None else "unknown"


def lcm_original_steps(scheduler, timesteps: list[int]) -> int | None:
    """The ``original_inference_steps`` (searched from ``num_train_timesteps`` down) for which
    ``scheduler.set_timesteps(len(timesteps))`` -- what a pipeline does with a plain
    ``num_inference_steps=k`` -- chooses exactly ``timesteps``; None when no value does (e.g. a first
    timestep below T/2 such as SDXL-DMD2's 399: LCM's schedules start at ``orig * (T // orig) - 1``)."""
    n = int(scheduler.config.num_train_timesteps)
    probe = type(scheduler).from_config(scheduler.config)
    for orig in range(n, len(timesteps) - 1, -1):
        if orig * (n // orig) - 1 != timesteps[0]:
            continue
        try:
            probe.set_timesteps(len(timesteps), original_inference_steps=orig)
        except ValueError:
            continue
        if [int(t) for t in probe.timesteps] == list(timesteps):
            return orig
    return None


def lcm_scheduler(scheduler_config: dict, prediction_type: str, timesteps: list[int], search_default: bool = False):
    """An ``LCMScheduler`` on the teacher's noise schedule that reproduces the training-time
    generator: no clipping / thresholding, every integer timestep on its training grid, and the
    training-time timesteps recorded as ``_stepdistill_timesteps``.

    ``search_default``: set ``original_inference_steps`` to a value for which LCM's default schedule
    for ``len(timesteps)`` steps *is* the training-time schedule (:func:`lcm_original_steps`), so a
    pipeline call with only ``num_inference_steps`` reproduces the student; where none exists (or
    without the search) it is ``num_train_timesteps`` and the call passes ``timesteps=``."""
    from diffusers import LCMScheduler

    # keep only LCMScheduler's own arguments: keys of other scheduler classes (DDPM's variance_type,
    # ...) would be saved and then reported as "not expected" on every load
    accepted = set(inspect.signature(LCMScheduler.__init__).parameters) - {"self"}
    cfg = {k: v for k, v in dict(scheduler_config).items() if k in accepted}
    n = int(cfg.get("num_train_timesteps", 1000))
    sched = LCMScheduler.from_config(
        cfg, prediction_type=prediction_type, clip_sample=False, thresholding=False, original_inference_steps=n
    )
    if search_default:
        orig = lcm_original_steps(sched, list(timesteps))
        if orig is not None and orig != n:
            sched.register_to_config(original_inference_steps=orig)
    sched.register_to_config(**{SCHEDULER_TIMESTEPS_KEY: list(timesteps)})
    return sched


def lcm_default_reproduces(scheduler, timesteps: list[int]) -> bool:
    """Whether ``scheduler.set_timesteps(len(timesteps))`` (a plain ``num_inference_steps`` call)
    chooses exactly ``timesteps``."""
    probe = type(scheduler).from_config(scheduler.config)
    try:
        probe.set_timesteps(len(timesteps))
    except ValueError:
        return False
    return [int(t) for t in probe.timesteps] == list(timesteps)




def flow_sigmas(generator) -> list[float]:
    """The flow-matching times ``t = sigma / (1 + sigma)`` of the generator's steps, computed in
    float32 exactly as the training-time generator computes them (``t`` is both the network's
    timestep / 1000 and the x0 conversion's factor; index T-1 is clamped at 1 - 1e-4 by the
    teacher's grid, so a 1-step student runs at t = 0.9999 from pure noise)."""
    den = generator.denoiser
    out = []
    for i in generator.timesteps:
        s = den.sigmas[int(i)].detach().float().cpu()
        out.append(float(s / (1 + s)))
    return out


def flow_scheduler(scheduler_config: dict, timesteps: list[float], sigmas: list[float]):
    """A ``FlowMatchEulerDiscreteScheduler`` that runs the student's steps when the pipeline is called
    with ``sigmas=<the student's t values>``: ``shift=1`` and no dynamic shifting (the given sigmas are
    the student's already-shifted times and must pass through unchanged; FluxPipeline still computes
    ``mu``, which a non-dynamic scheduler ignores), no Karras / exponential / beta conversion or
    terminal stretch, and ``stochastic_sampling=True``: between steps ``x = (1 - t') x0 + t' eps``
    with fresh noise, the training-time generator's re-noising (instead of Euler's reuse of the
    predicted noise).  The student's times are recorded as ``_stepdistill_sigmas``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    accepted = set(inspect.signature(FlowMatchEulerDiscreteScheduler.__init__).parameters) - {"self"}
    cfg = {k: v for k, v in dict(scheduler_config).items() if k in accepted}
    cfg.update(shift=1.0, use_dynamic_shifting=False, stochastic_sampling=True, use_karras_sigmas=False,
               use_exponential_sigmas=False, use_beta_sigmas=False, shift_terminal=None, invert_sigmas=False)
    sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    sched.register_to_config(**{SCHEDULER_TIMESTEPS_KEY: list(timesteps), SCHEDULER_SIGMAS_KEY: list(sigmas)})
    return sched


# -- metadata and the model card ----------------------------------------------------------------
def provenance(metrics, extra, snippet: str) -> dict:
    """The metadata every export records: metrics, caller extras, how to load, versions, time."""
    import diffusers

    import stepdistill

    return {
        "metrics": jsonable(metrics or {}),
        "extra": jsonable(extra or {}),
        "loading_snippet": snippet,
        "stepdistill_version": getattr(stepdistill, "__version__", None),
        "diffusers_version": diffusers.__version__,
        "torch_version": torch.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def remote_code_snippet(folder: Path, call: str) -> str:
    """How to load a self-contained folder with plain diffusers and call it."""
    return (
        "import torch\n"
        "from diffusers import DiffusionPipeline\n\n"
        "# trust_remote_code=True is your explicit opt-in to run the pipeline file this folder carries\n"
        f'pipe = DiffusionPipeline.from_pretrained("{folder}", trust_remote_code=True)\n'
        f"{call}"
    )


def model_card(
    title: str,
    intro: list[str],
    snippet: str,
    *,
    metrics: dict | None = None,
    extra: dict | None = None,
    facts: list[tuple[str, Any]] | None = None,
    notes: list[str] = (),
    tags: list[str] = (),
    pipeline_tag: str = "unconditional-image-generation",
) -> str:
    """The ``README.md`` of every export: front matter, title, intro, a facts table, usage, notes,
    metrics and the training details (``extra`` as JSON)."""
    lines = ["---", "library_name: diffusers", f"pipeline_tag: {pipeline_tag}", "tags:"]
    lines += [f"- {t}" for t in ("diffusers", "stepdistill", *tags)]
    lines += ["---", "", f"# {title}", "", *intro, ""]
    if facts:
        lines += ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in facts), ""]
    lines += ["## Usage", "", "```python", snippet, "```", ""]
    for note in notes:
        lines += [note, ""]
    lines += ["## Metrics", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|", *(f"| {k} | {_fmt(v)} |" for k, v in metrics.items())]
    else:
        lines.append("No metrics were recorded at export time.")
    if extra:
        lines += ["", "## Training details", "", "```json", json.dumps(jsonable(extra), indent=2, default=str), "```"]
    lines.append("")
    return "\n".join(lines)


def student_card(meta: dict, snippet: str, notes: list[str] = ()) -> str:
    """The model card of a distilled diffusion student (``meta``: its ``stepdistill.json``)."""
    facts = [
        ("algorithm", meta["algorithm"]),
        ("paper", meta["paper"] or "-"),
        ("teacher", f"`{meta['teacher']}`"),
        ("pipeline", f"`{meta['pipeline']}`"),
        ("training-time timesteps", f"`{meta['timesteps']}`"),
        ("prediction type", meta["prediction_type"]),
    ]
    if meta.get("num_classes") is not None:
        facts.append(("classes", meta["num_classes"]))
    recorded = (
        "The training-time timesteps are also recorded in `scheduler/scheduler_config.json` "
        f"(`{SCHEDULER_TIMESTEPS_KEY}`) and, with all other metadata, in `{METADATA_FILE}`."
    )
    return model_card(
        f"{meta['algorithm']} student of {meta['teacher']}",
        [f"A {len(meta['timesteps'])}-step generator distilled with **{meta['algorithm']}** by "
         f"stepdistill from the teacher `{meta['teacher']}`."],
        snippet,
        metrics=meta.get("metrics"),
        extra=meta.get("extra"),
        facts=facts,
        notes=[*notes, recorded],
        tags=["distillation", f"stepdistill-{meta['algorithm']}"],
        pipeline_tag="text-to-image" if meta["pipeline"] in TEXT_PIPELINES else "unconditional-image-generation",
    )


def student_meta(generator, teacher, *, algorithm, paper, pipeline, name, extra, metrics, snippet,
                 ema: bool) -> dict:
    """``stepdistill.json`` of a one-network diffusion student."""
    denoiser = generator.denoiser
    return {
        "format": 1,
        "algorithm": algorithm,
        "paper": paper,
        "teacher": teacher_name(teacher, generator, name, extra),
        "pipeline": pipeline,
        "student_class": type(unwrap(denoiser.model)).__name__,
        "timesteps": training_timesteps(generator),
        "timestep_indices": [int(t) for t in generator.timesteps],
        "prediction_type": denoiser.prediction_type,
        "num_classes": getattr(denoiser, "num_classes", None),
        "sample_shape": list(getattr(generator, "sample_shape", ()) or ()),
        "ema": ema,
        "scheduler": "LCMScheduler",
        "teacher_scheduler_config": jsonable(dict(denoiser.scheduler_config)),
        **provenance(metrics, extra, snippet),
    }


def write_metadata(folder: Path, meta: dict, card: str) -> None:
    (folder / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    (folder / "README.md").write_text(card)
