"""Export trained students (and the embedded teacher) as diffusers pipeline folders.

What gets written (see DESIGN.md §3 "Export"):

* A ``UNet2DConditionModel`` student of a Stable-Diffusion-layout teacher (text encoder + tokenizer
  + VAE) becomes a **stock** ``StableDiffusionPipeline`` whose scheduler is an ``LCMScheduler``
  built from the teacher's noise schedule; no custom code is involved::

      pipe = StableDiffusionPipeline.from_pretrained(folder)
      pipe(prompt, num_inference_steps=1, timesteps=[899], guidance_scale=0.0)

* A ``UNet2DModel`` student (pixel space, or latent space with the teacher's VAE) becomes the
  package's ``OneStepPipeline``; ``one_step.py`` is copied into the folder and ``model_index.json``
  names the class in list form ``["one_step", "OneStepPipeline"]``, so that
  ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` works with only diffusers
  installed (and ``custom_pipeline=folder/one_step.py`` / ``OneStepPipeline.from_pretrained``).

* ``export_teacher_pipeline`` writes a class-conditional teacher UNet as a ``ClassConditionalPipeline``
  folder the same self-contained way, with ``num_classes`` a top-level key of ``model_index.json``.

Where the training-time timesteps are recorded:

* ``OneStepPipeline`` folders: ``model_index.json`` ``"timesteps"`` (a pipeline ``__init__``
  argument, the default sampling schedule) and ``"num_classes"``;
* every student folder: ``scheduler/scheduler_config.json`` ``"_stepdistill_timesteps"``.  The
  leading underscore matters: diffusers (0.42.1) silently keeps unknown ``_``-keys in a loaded
  scheduler's config (also through ``from_config`` into other scheduler classes), whereas a plain
  unknown key triggers "The config attributes ... are not expected and will be ignored" on every
  load.  Stock ``StableDiffusionPipeline`` folders also get ``"_stepdistill_timesteps"`` in
  ``model_index.json`` (likewise ignored silently by the loader);
* ``stepdistill.json`` (full metadata) and the model card ``README.md`` (exact call).

Scheduler settings: ``clip_sample=False`` and ``thresholding=False`` (the training-time generator
neither clips nor thresholds x0), and ``original_inference_steps = num_train_timesteps`` so every
integer timestep lies on LCM's "training schedule" (no warning for e.g. 749) and LCM's default
``num_inference_steps=k`` schedule is evenly spaced from ``T-1`` (4 steps: 999, 749, 499, 249).

Every folder is written atomically: it is built in ``<output_dir>.tmp-<pid>`` and moved into place
with ``os.replace``; an existing non-empty ``output_dir`` is refused unless ``overwrite=True``.
"""

from __future__ import annotations

import copy
import datetime as _dt
import inspect
import json
import operator
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

SCHEDULER_TIMESTEPS_KEY = "_stepdistill_timesteps"
METADATA_FILE = "stepdistill.json"
LCM_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SUPPORTED = (
    "export supports (a) UNet2DConditionModel students of Stable-Diffusion-layout teachers "
    "(text_encoder + tokenizer + vae) -> stock StableDiffusionPipeline + LCMScheduler, and "
    "(b) UNet2DModel students (pixel space, or latent space with the teacher's vae) -> OneStepPipeline; "
    "prediction types epsilon / v_prediction / sample"
)


class ExportError(ValueError):
    """The student or the output folder cannot be exported as asked; the message says why."""


# -- atomic folders -----------------------------------------------------------------------------
@contextmanager
def atomic_output_dir(output_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a scratch folder ``<output_dir>.tmp-<pid>``; on success it replaces ``output_dir``.

    Refuses (``FileExistsError``, before any work) a non-empty existing ``output_dir`` unless
    ``overwrite``; on error the scratch folder is removed and ``output_dir`` is left untouched.
    """
    out = Path(output_dir).expanduser().absolute()
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a folder")
        if any(out.iterdir()) and not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
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


# -- helpers ------------------------------------------------------------------------------------
def _pipeline_source(module_name: str) -> Path:
    import importlib

    module = importlib.import_module(f"stepdistill.pipelines.{module_name}")
    return Path(module.__file__)


def _make_self_contained(
    folder: Path, module_name: str, class_name: str, extra_index: dict | None = None
) -> None:
    """Copy ``pipelines/<module_name>.py`` into ``folder`` and name it in ``model_index.json``."""
    shutil.copyfile(_pipeline_source(module_name), folder / f"{module_name}.py")
    _update_model_index(folder, {"_class_name": [module_name, class_name], **(extra_index or {})})


def _update_model_index(folder: Path, updates: dict) -> None:
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    index.update(updates)
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _unwrap(net: nn.Module) -> nn.Module:
    """Strip DDP / torch.compile wrappers."""
    while True:
        if hasattr(net, "_orig_mod"):
            net = net._orig_mod
        elif isinstance(net, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            net = net.module
        else:
            return net


def _strip_prefix(state: dict, target_keys: set) -> dict:
    if set(state) & target_keys:
        return state
    for prefix in ("denoiser.model.", "model.", "module.", "generator.denoiser.model."):
        stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if stripped and set(stripped) & target_keys:
            return stripped
    return state


def _apply_ema(net: nn.Module, state: dict) -> None:
    """Load EMA weights: a state dict of the network (optionally prefixed ``denoiser.model.``) or a
    diffusers ``EMAModel.state_dict()`` (``shadow_params`` in parameter order)."""
    if "shadow_params" in state:
        params = [p for p in net.parameters()]
        shadow = state["shadow_params"]
        if len(shadow) != len(params):
            raise ExportError(
                f"EMA state has {len(shadow)} shadow params, the student network has {len(params)}"
            )
        with torch.no_grad():
            for p, s in zip(params, shadow):
                p.copy_(s.to(p.device, p.dtype))
        return
    target = net.state_dict()
    state = _strip_prefix(dict(state), set(target))
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    if missing or unexpected:
        raise ExportError(
            f"use_ema_state does not match the student network: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )
    net.load_state_dict(state)


def _student_network(generator, use_ema_state: dict | None) -> nn.Module:
    """The student's diffusers network ready to save: fp32, EMA weights, LoRA fused."""
    net = _unwrap(generator.denoiser.model)
    needs_copy = (
        use_ema_state is not None
        or _has_adapters(net)
        or any(p.dtype != torch.float32 for p in net.parameters())
    )
    if not needs_copy:
        return net
    net = copy.deepcopy(net)
    if use_ema_state is not None:
        _apply_ema(net, use_ema_state)
    _merge_adapters(net)
    return net.float()


def _has_adapters(net: nn.Module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # peft not installed: nothing can be adapted
        return False
    return any(isinstance(m, BaseTunerLayer) for m in net.modules())


def _merge_adapters(net: nn.Module) -> None:
    """Fold PEFT adapters (LoRA, ...) into the base weights and put the plain layers back, so that
    the saved network is a stock diffusers model (works for ``add_adapter`` and
    ``peft.inject_adapter_in_model``)."""
    if not _has_adapters(net):
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(net.named_modules()):
        if not name or not isinstance(module, BaseTunerLayer):
            continue
        module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        setattr(parent, child, module.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in net.__dict__:
            delattr(net, attr)


def _frozen_part(teacher, generator, name: str):
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


def _fp32(module):
    if isinstance(module, nn.Module) and any(p.dtype != torch.float32 for p in module.parameters()):
        return copy.deepcopy(module).float()
    return module


def _teacher_name(teacher, generator, teacher_name: str | None, extra: dict | None) -> str:
    if teacher_name:
        return str(teacher_name)
    if extra and extra.get("teacher"):
        return str(extra["teacher"])
    for owner in (teacher, generator.denoiser):
        model = getattr(owner, "model", None)
        cfg = getattr(model, "config", None)
        name = cfg.get("_name_or_path") if cfg is not None else None
        if name:
            return str(name)
    return type(teacher).__name__ if teacher is not None else "unknown"


def _lcm_scheduler(scheduler_config: dict, prediction_type: str, timesteps: list[int]):
    from diffusers import LCMScheduler

    # keep only LCMScheduler's own arguments: keys of other scheduler classes (DDPM's variance_type,
    # ...) would be saved and then reported as "not expected" on every load
    accepted = set(inspect.signature(LCMScheduler.__init__).parameters) - {"self"}
    cfg = {k: v for k, v in dict(scheduler_config).items() if k in accepted}
    n = int(cfg.get("num_train_timesteps", 1000))
    sched = LCMScheduler.from_config(
        cfg,
        prediction_type=prediction_type,
        clip_sample=False,
        thresholding=False,
        original_inference_steps=n,
    )
    sched.register_to_config(**{SCHEDULER_TIMESTEPS_KEY: list(timesteps)})
    return sched


def _provenance(metrics, extra, snippet: str) -> dict:
    """The metadata every export records: metrics, caller extras, how to load, versions, time."""
    import diffusers

    import stepdistill

    return {
        "metrics": _jsonable(metrics or {}),
        "extra": _jsonable(extra or {}),
        "loading_snippet": snippet,
        "stepdistill_version": getattr(stepdistill, "__version__", None),
        "diffusers_version": diffusers.__version__,
        "torch_version": torch.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
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
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _model_card(meta: dict, snippet: str, alt_snippet: str | None = None) -> str:
    tags = ["diffusers", "stepdistill", "distillation", f"stepdistill-{meta['algorithm']}"]
    pipeline_tag = (
        "text-to-image" if meta["pipeline"] == "StableDiffusionPipeline" else "unconditional-image-generation"
    )
    lines = ["---", "library_name: diffusers", f"pipeline_tag: {pipeline_tag}", "tags:"]
    lines += [f"- {t}" for t in tags]
    lines += ["---", "", f"# {meta['algorithm']} student of {meta['teacher']}", ""]
    steps = len(meta["timesteps"])
    lines += [
        f"A {steps}-step generator distilled with **{meta['algorithm']}** by "
        f"stepdistill from the teacher `{meta['teacher']}`.",
        "",
        "| | |",
        "|---|---|",
        f"| algorithm | {meta['algorithm']} |",
        f"| paper | {meta['paper'] or '-'} |",
        f"| teacher | `{meta['teacher']}` |",
        f"| pipeline | `{meta['pipeline']}` |",
        f"| training-time timesteps | `{meta['timesteps']}` |",
        f"| prediction type | {meta['prediction_type']} |",
    ]
    if meta.get("num_classes") is not None:
        lines.append(f"| classes | {meta['num_classes']} |")
    lines += ["", "## Usage", "", "```python", snippet, "```", ""]
    if alt_snippet:
        lines += [alt_snippet, ""]
    lines += [
        "The training-time timesteps are also recorded in `scheduler/scheduler_config.json` "
        f"(`{SCHEDULER_TIMESTEPS_KEY}`) and, with all other metadata, in `{METADATA_FILE}`.",
        "",
        "## Metrics",
        "",
    ]
    metrics = meta.get("metrics") or {}
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
    else:
        lines.append("No metrics were recorded at export time.")
    if meta.get("extra"):
        lines += [
            "",
            "## Training details",
            "",
            "```json",
            json.dumps(meta["extra"], indent=2, default=str),
            "```",
        ]
    lines.append("")
    return "\n".join(lines)


def _write_metadata(folder: Path, meta: dict, card: str) -> None:
    (folder / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    (folder / "README.md").write_text(card)


# -- public API ---------------------------------------------------------------------------------
def export_generator(
    generator,
    teacher,
    output_dir: str | Path,
    *,
    algorithm: str,
    paper: str = "",
    metrics: dict | None = None,
    extra: dict | None = None,
    use_ema_state: dict | None = None,
    overwrite: bool = False,
    teacher_name: str | None = None,
) -> Path:
    """Write ``generator`` (a :class:`stepdistill.students.Generator`) as a diffusers folder.

    Args:
        generator: the trained student; its network is ``generator.denoiser.model``, its
            training-time timesteps ``generator.timesteps`` and its parametrisation
            ``generator.denoiser.prediction_type``.
        teacher: the teacher it was distilled from (gives text encoder / tokenizer / VAE and the
            name in the model card).
        output_dir: destination folder (written atomically).
        algorithm, paper, metrics, extra: recorded in the model card and ``stepdistill.json``.
        use_ema_state: EMA weights to export instead of the live ones: a state dict of the network
            (keys may carry a ``denoiser.model.`` prefix) or a diffusers ``EMAModel.state_dict()``.
        overwrite: replace a non-empty existing ``output_dir``.
        teacher_name: how to name the teacher in the card (default: its ``_name_or_path``).

    Returns the folder.  Raises ``NotImplementedError`` for students that cannot be exported
    (flow-matching students, networks other than UNet2DModel / UNet2DConditionModel, SDXL).
    """
    denoiser = getattr(generator, "denoiser", None)
    if (
        denoiser is None
        or not isinstance(getattr(denoiser, "model", None), nn.Module)
        or not hasattr(denoiser, "scheduler_config")
    ):
        raise NotImplementedError(
            f"cannot export a generator whose denoiser is {type(denoiser).__name__}: it is not a diffusers "
            f"network wrapped by stepdistill.teachers.diffusion.DiffusersTeacher; {SUPPORTED}"
        )
    prediction_type = denoiser.prediction_type
    if prediction_type == "flow":
        raise NotImplementedError(
            "flow-matching students cannot be exported yet: LCMScheduler (which reproduces the training-time "
            f"generator) supports only {LCM_PREDICTION_TYPES}; {SUPPORTED}"
        )
    if prediction_type not in LCM_PREDICTION_TYPES:
        raise NotImplementedError(f"prediction_type {prediction_type!r} is not exportable; {SUPPORTED}")
    if getattr(generator, "boundary", "lcm") != "lcm":
        warnings.warn(
            f"generator.boundary={generator.boundary!r}: the exported LCMScheduler applies the LCM boundary "
            "scalings, so the pipeline differs slightly from the training-time generator",
            stacklevel=2,
        )
    net = _unwrap(denoiser.model)
    kind = type(net).__name__
    if kind not in ("UNet2DConditionModel", "UNet2DModel"):
        raise NotImplementedError(f"cannot export a {kind} student; {SUPPORTED}")

    timesteps = [int(round(denoiser.timestep_value(t))) for t in generator.timesteps]
    scheduler = _lcm_scheduler(denoiser.scheduler_config, prediction_type, timesteps)
    text_encoder = _frozen_part(teacher, generator, "text_encoder")
    tokenizer = _frozen_part(teacher, generator, "tokenizer")
    vae = _frozen_part(teacher, generator, "vae")
    num_classes = getattr(denoiser, "num_classes", None)
    out = Path(output_dir).expanduser().absolute()

    if kind == "UNet2DConditionModel":
        missing = [
            n
            for n, p in (("text_encoder", text_encoder), ("tokenizer", tokenizer), ("vae", vae))
            if p is None
        ]
        if missing:
            raise NotImplementedError(
                f"a UNet2DConditionModel student is exported as a StableDiffusionPipeline, which needs the "
                f"teacher's text_encoder, tokenizer and vae; missing: {missing}. {SUPPORTED}"
            )
        if net.config.get("addition_embed_type") is not None:
            raise NotImplementedError(
                f"UNet2DConditionModel students with addition_embed_type={net.config.addition_embed_type!r} "
                f"(SDXL-style) are not exportable yet; {SUPPORTED}"
            )
        pipeline_name = "StableDiffusionPipeline"
        t_list = ", ".join(str(t) for t in timesteps)
        snippet = (
            "from diffusers import StableDiffusionPipeline\n\n"
            f'pipe = StableDiffusionPipeline.from_pretrained("{out}")\n'
            f'image = pipe("a photo of a cat", num_inference_steps={len(timesteps)}, timesteps=[{t_list}], '
            "guidance_scale=0.0).images[0]"
        )
        alt = (
            "This is a stock `StableDiffusionPipeline` with an `LCMScheduler`; keep `guidance_scale=0.0` "
            "(the student runs without classifier-free guidance) and pass the training-time `timesteps`. "
            "LCMScheduler logs a harmless warning when the first timestep is not 999."
        )
    else:
        pipeline_name = "OneStepPipeline"
        if num_classes is not None:
            labels = list(range(min(int(num_classes), 4)))
            call = f"pipe(class_labels={labels}, generator=torch.Generator().manual_seed(0)).images"
        else:
            call = "pipe(batch_size=4, generator=torch.Generator().manual_seed(0)).images"
        snippet = (
            "import torch\n"
            "from diffusers import DiffusionPipeline\n\n"
            f'pipe = DiffusionPipeline.from_pretrained("{out}", trust_remote_code=True)\n'
            f"images = {call}"
        )
        alt = (
            "`one_step.py` (in this folder) holds the pipeline class; it needs only diffusers. "
            "Equivalent loaders: `DiffusionPipeline.from_pretrained(folder, "
            'custom_pipeline=folder + "/one_step.py", trust_remote_code=True)` and, with stepdistill '
            "installed, `from stepdistill.pipelines.one_step import OneStepPipeline; "
            "OneStepPipeline.from_pretrained(folder)`. By default the pipeline runs the training-time "
            "timesteps; `num_inference_steps=k` runs the first k of them."
        )



    meta = {
        "format": 1,
        "algorithm": algorithm,
        "paper": paper,
        "teacher": _teacher_name(teacher, generator, teacher_name, extra),
        "pipeline": pipeline_name,
        "student_class": kind,
        "timesteps": timesteps,
        "timestep_indices": [int(t) for t in generator.timesteps],
        "prediction_type": prediction_type,
        "num_classes": num_classes,
        "sample_shape": list(getattr(generator, "sample_shape", ()) or ()),
        "ema": use_ema_state is not None,
        "scheduler": "LCMScheduler",
        "teacher_scheduler_config": _jsonable(dict(denoiser.scheduler_config)),
        **_provenance(metrics, extra, snippet),
    }
    card = _model_card(meta, snippet, alt)

    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        student = _student_network(generator, use_ema_state)
        if pipeline_name == "StableDiffusionPipeline":
            from diffusers import StableDiffusionPipeline

            pipe = StableDiffusionPipeline(
                vae=_fp32(vae),
                text_encoder=_fp32(text_encoder),
                tokenizer=tokenizer,
                unet=student,
                scheduler=scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
            pipe.save_pretrained(tmp, safe_serialization=True)
            _update_model_index(tmp, {SCHEDULER_TIMESTEPS_KEY: timesteps})
        else:
            from stepdistill.pipelines.one_step import OneStepPipeline

            pipe = OneStepPipeline(
                unet=student,
                scheduler=scheduler,
                vae=_fp32(vae),
                timesteps=timesteps,
                num_classes=num_classes,
            )
            pipe.save_pretrained(tmp, safe_serialization=True)
            _make_self_contained(tmp, "one_step", "OneStepPipeline")
        _write_metadata(tmp, meta, card)
    return out


def export_teacher_pipeline(
    teacher_unet: nn.Module,
    scheduler,
    num_classes: int | None,
    output_dir: str | Path,
    *,
    overwrite: bool = False,
    metrics: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write a (class-conditional) ``UNet2DModel`` teacher as a self-contained
    ``ClassConditionalPipeline`` folder (``class_conditional.py`` copied in, list-form
    ``_class_name``, ``num_classes`` top-level in ``model_index.json``).

    ``scheduler`` is a diffusers scheduler (its config is the teacher's noise schedule) or a
    scheduler config dict with ``_class_name``.  ``DiffusersTeacher.from_pretrained`` reads the folder.
    """
    import diffusers

    from stepdistill.pipelines.class_conditional import ClassConditionalPipeline

    if isinstance(scheduler, dict):
        cls_name = scheduler.get("_class_name", "DDPMScheduler")
        sched_cls = getattr(diffusers, cls_name, None)
        if sched_cls is None:
            raise ExportError(f"unknown scheduler class {cls_name!r} in the scheduler config")
        scheduler = sched_cls.from_config(scheduler)
    unet = _unwrap(teacher_unet)
    if type(unet).__name__ != "UNet2DModel":
        raise NotImplementedError(
            f"export_teacher_pipeline writes ClassConditionalPipeline folders for UNet2DModel teachers, got {type(unet).__name__}"
        )
    embeds = unet.config.get("num_class_embeds")
    if num_classes is not None and embeds != num_classes + 1:
        raise ExportError(
            f"a class-conditional teacher needs num_class_embeds = num_classes + 1 (null class last); "
            f"got num_class_embeds={embeds}, num_classes={num_classes}"
        )
    out = Path(output_dir).expanduser().absolute()
    snippet = (
        "import torch\n"
        "from diffusers import DiffusionPipeline\n\n"
        f'pipe = DiffusionPipeline.from_pretrained("{out}", trust_remote_code=True)\n'
        + (
            "images = pipe(class_labels=[0, 1, 2, 3], num_inference_steps=50, guidance_scale=1.0,\n"
            "              generator=torch.Generator().manual_seed(0)).images"
            if num_classes is not None
            else "images = pipe(batch_size=4, num_inference_steps=50, generator=torch.Generator().manual_seed(0)).images"
        )
    )
    meta = {
        "format": 1,
        "kind": "teacher",
        "pipeline": "ClassConditionalPipeline",
        "num_classes": num_classes,
        "scheduler": type(scheduler).__name__,
        **_provenance(metrics, extra, snippet),
    }
    card_lines = [
        "---",
        "library_name: diffusers",
        "pipeline_tag: unconditional-image-generation",
        "tags:",
        "- diffusers",
        "- stepdistill",
        "---",
        "",
        "# Class-conditional diffusion teacher",
        "",
        f"A `UNet2DModel` diffusion model ({num_classes if num_classes is not None else 'no'} classes; the class "
        f"index {num_classes} is the null class for classifier-free guidance) with its "
        f"`{type(scheduler).__name__}` noise schedule.",
        "",
        "```python",
        snippet,
        "```",
        "",
        "`class_conditional.py` (in this folder) holds the pipeline class; it needs only diffusers.",
        "",
    ]
    if metrics:
        card_lines += (
            ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()] + [""]
        )
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        pipe = ClassConditionalPipeline(unet=_fp32(unet), scheduler=scheduler, num_classes=num_classes)
        pipe.save_pretrained(tmp, safe_serialization=True)
        _make_self_contained(
            tmp, "class_conditional", "ClassConditionalPipeline", {"num_classes": num_classes}
        )
        _write_metadata(tmp, meta, "\n".join(card_lines))
    return out


def _check_exportable_unet2d(generator, k: int):
    """The checks of ``export_generator`` for one student of a multi-student export."""
    denoiser = getattr(generator, "denoiser", None)
    if (
        denoiser is None
        or not isinstance(getattr(denoiser, "model", None), nn.Module)
        or not hasattr(denoiser, "scheduler_config")
    ):
        raise NotImplementedError(
            f"student {k}: cannot export a generator whose denoiser is {type(denoiser).__name__}: it is not a "
            "diffusers network wrapped by stepdistill.teachers.diffusion.DiffusersTeacher"
        )
    prediction_type = denoiser.prediction_type
    if prediction_type not in LCM_PREDICTION_TYPES:
        raise NotImplementedError(
            f"student {k}: prediction_type {prediction_type!r} is not exportable (LCMScheduler, which reproduces "
            f"the training-time generator, supports {LCM_PREDICTION_TYPES})"
        )
    kind = type(_unwrap(denoiser.model)).__name__
    if kind != "UNet2DModel":
        raise NotImplementedError(
            f"student {k} is a {kind}: MultiStudentPipeline routes class labels to UNet2DModel students "
            "(text-conditional multi-student export is not supported)"
        )
    return denoiser


def export_multi_student(
    generators: list,
    teacher,
    route: list[int],
    output_dir: str | Path,
    *,
    algorithm: str = "msd",
    paper: str = "",
    metrics: dict | None = None,
    extra: dict | None = None,
    use_ema_states: list | None = None,
    overwrite: bool = False,
    teacher_name: str | None = None,
) -> Path:
    """Write K class-routed students (MSD) as one self-contained ``MultiStudentPipeline`` folder.

    Args:
        generators: the K trained students (:class:`stepdistill.students.Generator`, e.g.
            ``MSD.generator_for_export()``); ``UNet2DModel`` networks of any width, sharing the
            teacher's noise schedule, parametrisation, training-time timesteps and sample shape.
        teacher: the teacher (gives the VAE of latent students and the name in the model card).
        route: ``route[c]`` = index of the student that generates class ``c`` (``MSD.route``); one
            entry per class of the teacher, every entry in ``0..K-1``, every student used.
        output_dir: destination folder (written atomically).
        algorithm, paper, metrics, extra: recorded in the model card and ``stepdistill.json``.
        use_ema_states: ``None`` or a list of K entries, each ``None`` (live weights) or an EMA state
            as accepted by :func:`export_generator`'s ``use_ema_state``.
        overwrite: replace a non-empty existing ``output_dir``.
        teacher_name: how to name the teacher in the card (default: its ``_name_or_path``).

    The folder holds ``model_index.json`` (list-form ``_class_name``, ``route``, ``num_classes``,
    ``timesteps``), ``multi_student.py`` (also in ``students/``), ``students/`` (one ``StudentBank``
    model with all K networks), ``scheduler/`` (``LCMScheduler`` with ``_stepdistill_timesteps``),
    optionally ``vae/``, ``stepdistill.json`` and ``README.md``.  Raises :class:`ExportError` for an
    invalid route or mismatched students, ``NotImplementedError`` for non-exportable students.
    """
    if isinstance(generators, nn.Module) and not isinstance(generators, nn.ModuleList):
        generators = [generators]
    generators = list(generators)
    if not generators:
        raise ExportError("export_multi_student needs at least one student generator")
    num_students = len(generators)
    denoisers = [_check_exportable_unet2d(g, k) for k, g in enumerate(generators)]
    first = denoisers[0]

    # -- everything the students must share -------------------------------------------------------
    prediction_type = first.prediction_type
    timesteps = [int(round(first.timestep_value(t))) for t in generators[0].timesteps]
    schedule = _jsonable(dict(first.scheduler_config))
    for k, (g, d) in enumerate(zip(generators, denoisers)):
        if d.prediction_type != prediction_type:
            raise ExportError(
                f"student {k} predicts {d.prediction_type!r}, student 0 {prediction_type!r}: the students share "
                "one scheduler, so they need the same prediction type"
            )
        ts = [int(round(d.timestep_value(t))) for t in g.timesteps]
        if ts != timesteps:
            raise ExportError(
                f"student {k} was trained at timesteps {ts}, student 0 at {timesteps}: the students share one "
                "sampling schedule"
            )
        if _jsonable(dict(d.scheduler_config)) != schedule:
            raise ExportError(f"student {k} has a different noise schedule (scheduler_config) than student 0")
        if getattr(g, "boundary", "lcm") != "lcm":
            warnings.warn(
                f"student {k}: generator.boundary={g.boundary!r}: the exported LCMScheduler applies the LCM "
                "boundary scalings, so the pipeline differs slightly from the training-time generator",
                stacklevel=2,
            )

    num_classes = getattr(teacher, "num_classes", None) if teacher is not None else None
    if num_classes is None:
        num_classes = getattr(first, "num_classes", None)
    if num_classes is None:
        raise ExportError(
            "MultiStudentPipeline routes by class label: the teacher / students must be class-conditional "
            "(num_classes is None)"
        )
    num_classes = int(num_classes)

    # -- the route ----------------------------------------------------------------------------------
    if isinstance(route, torch.Tensor):
        route = route.tolist()
    if route is None or isinstance(route, (str, bytes, dict)) or not hasattr(route, "__len__"):
        raise ExportError(f"route must be a list with one student index per class, got {route!r}")
    route = list(route)
    if len(route) != num_classes:
        raise ExportError(
            f"route has {len(route)} entries but the teacher has {num_classes} classes: route[c] must name the "
            f"student for every class c in 0..{num_classes - 1}"
        )
    clean = []
    for c, k in enumerate(route):
        try:
            if isinstance(k, bool):
                raise TypeError
            clean.append(operator.index(k))  # int, numpy / torch integers; not floats or bools
        except TypeError:
            raise ExportError(f"route[{c}] = {k!r} is not a student index (an integer)") from None
    route = clean
    homeless = [c for c, k in enumerate(route) if not 0 <= k < num_students]
    if homeless:
        raise ExportError(
            f"classes {homeless} have no student: route sends them to {[route[c] for c in homeless]}, but there "
            f"are {num_students} students (indices 0..{num_students - 1})"
        )
    idle = [k for k in range(num_students) if k not in route]
    if idle:
        raise ExportError(f"students {idle} serve no class in route {route}: drop them or fix the route")
    classes = [[c for c in range(num_classes) if route[c] == k] for k in range(num_students)]

    # -- per-student networks ---------------------------------------------------------------------
    if use_ema_states is None:
        use_ema_states = [None] * num_students
    use_ema_states = list(use_ema_states)
    if len(use_ema_states) != num_students:
        raise ExportError(f"use_ema_states has {len(use_ema_states)} entries for {num_students} students")
    shape = None
    for k, d in enumerate(denoisers):
        cfg = _unwrap(d.model).config
        embeds = cfg.get("num_class_embeds")
        if not embeds or int(embeds) < num_classes:
            raise ExportError(
                f"student {k} has num_class_embeds={embeds}: it cannot embed the {num_classes} class labels"
            )
        this = (cfg.in_channels, cfg.sample_size)
        if shape is not None and this != shape:
            raise ExportError(
                f"student {k} generates (in_channels, sample_size) = {this}, student 0 {shape}: all students "
                "must generate the same sample shape"
            )
        shape = this

    vae = _frozen_part(teacher, generators[0], "vae")
    out = Path(output_dir).expanduser().absolute()
    labels = list(range(min(num_classes, 4)))
    snippet = (
        "import torch\n"
        "from diffusers import DiffusionPipeline\n\n"
        f'pipe = DiffusionPipeline.from_pretrained("{out}", trust_remote_code=True)\n'
        f"images = pipe(class_labels={labels}, generator=torch.Generator().manual_seed(0)).images"
    )
    route_rows = ["| student | classes | block_out_channels | parameters |", "|---|---|---|---|"]
    sizes = []
    for k, d in enumerate(denoisers):
        net = _unwrap(d.model)
        n_params = sum(p.numel() for p in net.parameters())
        sizes.append({"block_out_channels": list(net.config.block_out_channels), "parameters": int(n_params)})
        route_rows.append(
            f"| {k} | {_compact_ranges(classes[k])} | {list(net.config.block_out_channels)} | {n_params:,} |"
        )
    alt = "\n".join(
        [
            f"**Routing.** Each class is generated by exactly one of the {num_students} students "
            "(one network evaluation per image per step); `route[c]` in `model_index.json` is the student "
            "for class `c`:",
            "",
            *route_rows,
            "",
            f"`route = {route}`",
            "",
            "`multi_student.py` (in this folder and in `students/`) holds the pipeline and the `StudentBank` "
            "container of the students; it needs only diffusers. With stepdistill installed, "
            "`from stepdistill.pipelines.multi_student import MultiStudentPipeline; "
            "MultiStudentPipeline.from_pretrained(folder)` loads it without remote code. By default the "
            "pipeline runs the training-time timesteps; pass a list of generators (one per image) to make "
            "each image's noise independent of the batch composition.",
        ]
    )



    meta = {
        "format": 1,
        "algorithm": algorithm,
        "paper": paper,
        "teacher": _teacher_name(teacher, generators[0], teacher_name, extra),
        "pipeline": "MultiStudentPipeline",
        "student_class": "UNet2DModel",
        "num_students": num_students,
        "route": route,
        "classes": classes,
        "students": sizes,
        "timesteps": timesteps,
        "timestep_indices": [int(t) for t in generators[0].timesteps],
        "prediction_type": prediction_type,
        "num_classes": num_classes,
        "sample_shape": list(getattr(generators[0], "sample_shape", ()) or ()),
        "ema": [s is not None for s in use_ema_states],
        "scheduler": "LCMScheduler",
        "teacher_scheduler_config": schedule,
        **_provenance(metrics, extra, snippet),
    }
    card = _model_card(meta, snippet, alt)

    from stepdistill.pipelines.multi_student import MultiStudentPipeline, StudentBank

    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        nets, seen = [], set()
        for g, state in zip(generators, use_ema_states):
            net = _student_network(g, state)
            if id(net) in seen:  # the same network twice: safetensors refuses shared tensors
                net = copy.deepcopy(net)
            seen.add(id(net))
            nets.append(net)
        scheduler = _lcm_scheduler(first.scheduler_config, prediction_type, timesteps)
        pipe = MultiStudentPipeline(
            students=StudentBank.from_unets(nets),
            scheduler=scheduler,
            vae=_fp32(vae),
            route=route,
            timesteps=timesteps,
            num_classes=num_classes,
        )
        pipe.save_pretrained(tmp, safe_serialization=True)
        _make_self_contained(tmp, "multi_student", "MultiStudentPipeline")
        _write_metadata(tmp, meta, card)
    return out


def _compact_ranges(values: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    parts, start, prev = [], None, None
    for v in values:
        if start is None:
            start = prev = v
        elif v == prev + 1:
            prev = v
        else:
            parts.append(f"{start}-{prev}" if prev > start else f"{start}")
            start = prev = v
    if start is not None:
        parts.append(f"{start}-{prev}" if prev > start else f"{start}")
    return ", ".join(parts)


# =============================================================================================
# Autoregressive teachers and Distilled Decoding students (stepdistill.teachers.autoregressive,
# stepdistill.algorithms.distilled_decoding).  Self-contained pipelines: pipelines/ar_image.py and
# pipelines/distilled_decoding.py are copied into the folder by their save_pretrained.


def _ar_card(title: str, lines: list[str], snippet: str, metrics: dict | None, extra: dict | None) -> str:
    card = [
        "---",
        "library_name: diffusers",
        "pipeline_tag: unconditional-image-generation",
        "tags:",
        "- diffusers",
        "- stepdistill",
        "- autoregressive",
        "---",
        "",
        f"# {title}",
        "",
        *lines,
        "",
        "## Usage",
        "",
        "```python",
        snippet,
        "```",
        "",
        "## Metrics",
        "",
    ]
    if metrics:
        card += ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
    else:
        card.append("No metrics were recorded at export time.")
    if extra:
        card += ["", "## Training details", "", "```json", json.dumps(_jsonable(extra), indent=2, default=str), "```"]
    card.append("")
    return "\n".join(card)


def export_ar_teacher_pipeline(
    teacher,
    output_dir: str | Path,
    *,
    overwrite: bool = False,
    metrics: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write an :class:`~stepdistill.teachers.autoregressive.ARTeacher` as a self-contained
    ``ARImagePipeline`` folder (``ar_image.py`` copied in, list-form ``_class_name``); loads with
    ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` and
    ``ARTeacher.from_pretrained(folder)``."""

    out = Path(output_dir).expanduser().absolute()
    snippet = (
        "import torch\n"
        "from diffusers import DiffusionPipeline\n\n"
        f'pipe = DiffusionPipeline.from_pretrained("{out}", trust_remote_code=True)\n'
        f"images = pipe(class_labels=[0, 1, 2, 3], guidance_scale={teacher.guidance_scale}, "
        "generator=torch.Generator().manual_seed(0)).images"
    )
    meta = {
        "format": 1,
        "kind": "teacher",
        "pipeline": "ARImagePipeline",
        "num_classes": teacher.num_classes,
        "codebook_size": teacher.codebook_size,
        "embed_dim": teacher.embed_dim,
        "grid_size": list(teacher.grid_size),
        "token_order": teacher.token_order,
        "sampling": teacher.settings(),
        **_provenance(metrics, extra, snippet),
    }
    h, w = teacher.grid_size
    lines = [
        f"A class-conditional autoregressive image model: a diffusers `VQModel` tokenizer ({teacher.codebook_size} "
        f"codes of dimension {teacher.embed_dim}, a {h}x{w} token grid in raster order) and a transformers "
        f"`LlamaForCausalLM` over {teacher.codebook_size} codes + {teacher.num_classes} class tokens + a null "
        "class token (classifier-free guidance).",
        "",
        f"Default sampling: {teacher.settings()}. `ar_image.py` (in this folder) holds the pipeline class.",
    ]
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        teacher.to_pipeline().save_pretrained(str(tmp), safe_serialization=True)
        _write_metadata(tmp, meta, _ar_card("Autoregressive (VQ + causal LM) teacher", lines, snippet, metrics, extra))
    return out


def export_dd_pipeline(
    student,
    teacher,
    output_dir: str | Path,
    *,
    algorithm: str = "dd",
    paper: str = "",
    metrics: dict | None = None,
    extra: dict | None = None,
    use_ema_state: dict | None = None,
    overwrite: bool = False,
    num_inference_steps: int = 1,
) -> Path:
    """Write a Distilled Decoding student (:class:`~stepdistill.algorithms.distilled_decoding.DDStudent`)
    with its teacher's tokenizer as a self-contained ``DistilledDecodingPipeline`` folder.

    ``use_ema_state``: the student's EMA ``state_dict()`` (``transformer.``-prefixed keys), exported
    instead of the live weights.  The pipeline reproduces ``student(noise, labels, num_steps)``."""

    from stepdistill.pipelines.distilled_decoding import DistilledDecodingPipeline

    net = _unwrap(student.transformer)
    if use_ema_state is not None:
        net = copy.deepcopy(net)
        state = {k[len("transformer."):]: v for k, v in use_ema_state.items() if k.startswith("transformer.")}
        if not state:
            state = dict(use_ema_state)
        missing, unexpected = net.load_state_dict(state, strict=False)
        real_missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
        if real_missing or unexpected:
            raise ExportError(
                f"use_ema_state does not match the DD student: missing {real_missing[:3]}, unexpected {unexpected[:3]}"
            )
    net = _fp32(net)
    out = Path(output_dir).expanduser().absolute()
    steps = int(num_inference_steps)
    if not 1 <= steps <= len(student.split_points):
        raise ExportError(f"num_inference_steps must be in 1..{len(student.split_points)}, got {steps}")
    snippet = (
        "import torch\n"
        "from diffusers import DiffusionPipeline\n\n"
        f'pipe = DiffusionPipeline.from_pretrained("{out}", trust_remote_code=True)\n'
        f"images = pipe(class_labels=[0, 1, 2, 3], num_inference_steps={steps}, "
        "generator=torch.Generator().manual_seed(0)).images"
    )
    meta = {
        "format": 1,
        "algorithm": algorithm,
        "paper": paper,
        "teacher": getattr(teacher, "path", None) or type(teacher).__name__,
        "pipeline": "DistilledDecodingPipeline",
        "num_classes": student.num_classes,
        "grid_size": list(student.grid_size),
        "split_points": list(student.split_points),
        "codebook_scale": student.codebook_scale,
        "rbf_tau": getattr(student, "rbf_tau", None),
        "teacher_sampling": teacher.settings() if hasattr(teacher, "settings") else None,
        "ema": use_ema_state is not None,
        **_provenance(metrics, extra, snippet),
    }
    lines = [
        f"A Distilled Decoding student ({paper or algorithm}) of an autoregressive VQ + causal-LM teacher: "
        f"the {student.num_tokens} image tokens come from one forward pass "
        f"(or {len(student.split_points)} with split points {list(student.split_points)}) over per-token "
        "Gaussian noise in codebook space, instead of one pass per token.",
        "",
        f"Teacher sampling distilled: {meta['teacher_sampling']}. `distilled_decoding.py` (in this folder) "
        "holds the pipeline class; pass `noise=` (B, n, d) to reproduce a given trajectory.",
    ]
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        pipe = DistilledDecodingPipeline(
            vqvae=_fp32(teacher.vqvae),
            transformer=net,
            num_classes=student.num_classes,
            codebook_size=teacher.codebook_size,
            embed_dim=int(student.codes.shape[1]),
            grid_size=list(student.grid_size),
            codebook_scale=student.codebook_scale,
            split_points=list(student.split_points),
            num_inference_steps=steps,
            rbf_tau=getattr(student, "rbf_tau", None),
        )
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        _write_metadata(tmp, meta, _ar_card(f"{algorithm} student (Distilled Decoding)", lines, snippet, metrics, extra))
    return out
