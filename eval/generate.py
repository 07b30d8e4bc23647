"""Image generation for evaluation, separate from scoring.

**One seed per image**: image ``i`` is drawn with ``torch.Generator().manual_seed(seed + i)`` and
(for class-conditional models) class ``i % num_classes``, so the images do not depend on the batch
size or on how the work is split across processes.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import EvalInputError

__all__ = [
    "quantize",
    "uniform_labels",
    "resolve_labels",
    "make_generators",
    "iter_generate",
    "generate_images",
    "load_prompts",
    "load_pipeline",
    "pipeline_num_classes",
    "iter_sample_pipeline",
    "sample_pipeline",
    "save_images",
]

GenerateFn = Callable[[list[torch.Generator], "torch.Tensor | None"], torch.Tensor]


def quantize(x: Any) -> torch.Tensor:
    """Float images in [0, 1] -> uint8 with **rounding** (as diffusers' ``numpy_to_pil`` does; not the
    truncating ``(x * 255).byte()``).  Layout is kept."""
    t = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    if t.dtype == torch.uint8:
        return t
    t = t.detach().cpu()
    t = t if t.is_floating_point() else t.float()
    return (t * 255).round().clamp(0, 255).to(torch.uint8)


def uniform_labels(n: int, num_classes: int, start: int = 0) -> torch.Tensor:
    """Balanced labels derived from the image index: label of image ``i`` is ``i % num_classes``."""
    return torch.arange(start, start + n, dtype=torch.long) % num_classes


def resolve_labels(n: int, labels: Any = None, num_classes: int | None = None) -> torch.Tensor | None:
    """``None`` (unconditional, or uniform when ``num_classes`` is given), ``"uniform"``, or a sequence
    (image ``i`` gets ``labels[i % len(labels)]``) -> LongTensor of length ``n`` or ``None``."""
    if labels is None:
        return None if num_classes is None else uniform_labels(n, num_classes)
    if isinstance(labels, str):
        if labels != "uniform":
            raise EvalInputError(f"class_labels must be None, 'uniform' or a list of ints, got {labels!r}")
        if num_classes is None:
            raise EvalInputError("class_labels='uniform' needs num_classes (could not infer it from the model)")
        return uniform_labels(n, num_classes)
    lab = torch.as_tensor(labels, dtype=torch.long).flatten()
    if lab.numel() == 0:
        raise EvalInputError("class_labels is an empty list")
    bad = [int(v) for v in lab.tolist() if v < 0 or (num_classes is not None and v >= num_classes)]
    if bad:
        top = f"{num_classes - 1}" if num_classes is not None else "the number of classes - 1"
        raise EvalInputError(f"class label {bad[0]} is out of range; class labels must lie in [0, {top}]")
    return lab[torch.arange(n) % lab.numel()]


def make_generators(seed: int, start: int, count: int, device: str | torch.device = "cpu") -> list[torch.Generator]:
    """Generators for images ``start .. start+count-1``: image ``i`` uses seed ``seed + i``."""
    return [torch.Generator(device=device).manual_seed(seed + i) for i in range(start, start + count)]


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, unit="img")


def iter_generate(
    fn: GenerateFn,
    n: int,
    seed: int = 0,
    batch_size: int = 64,
    labels: Any = None,
    num_classes: int | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield ``(uint8 NCHW batch, labels batch or None)`` from ``fn(generators, labels)``."""
    if n <= 0:
        raise EvalInputError(f"number of images must be positive, got {n}")
    if batch_size <= 0:
        raise EvalInputError(f"batch size must be positive, got {batch_size}")
    all_labels = resolve_labels(n, labels, num_classes)
    with _progress(n, "generate", progress) as bar:
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            gens = make_generators(seed, start, b, device)
            lab = None if all_labels is None else all_labels[start : start + b]
            out = fn(gens, lab)
            out = quantize(out) if isinstance(out, torch.Tensor) and out.dtype != torch.uint8 else out
            if not isinstance(out, torch.Tensor) or out.dtype != torch.uint8 or out.ndim != 4 or out.shape[0] != b:
                raise EvalInputError(
                    f"generate fn must return a uint8 NCHW tensor with {b} images, got "
                    f"{getattr(out, 'dtype', type(out).__name__)} {tuple(getattr(out, 'shape', ()))}"
                )
            bar.update(b)
            yield out.cpu(), lab


def generate_images(
    fn: GenerateFn,
    n: int,
    seed: int = 0,
    batch_size: int = 64,
    labels: Any = None,
    num_classes: int | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Call ``fn(generators: list[torch.Generator], labels: LongTensor | None) -> uint8 NCHW`` in batches.

    ``fn`` must draw image ``j`` of the batch from ``generators[j]`` only (e.g.
    ``torch.stack([torch.randn(shape, generator=g) for g in generators])``); then the result does not
    depend on ``batch_size``.  ``labels``: ``None`` (uniform ``i % num_classes`` if ``num_classes``
    is given, else ``None`` is passed), ``"uniform"`` or a list.  Returns uint8 NCHW (N images).
    Float outputs in [0, 1] are accepted and quantised with rounding.
    """
    return torch.cat([x for x, _ in iter_generate(fn, n, seed, batch_size, labels, num_classes, progress, device)])


# -------------------------------------------------------------------------------------------- pipelines
def load_prompts(prompts: Any) -> list[str] | None:
    """``None``, a list of strings, or a text file path (one prompt per line, blank lines skipped)."""
    if prompts is None:
        return None
    if isinstance(prompts, (str, os.PathLike)):
        p = Path(prompts).expanduser()
        if not p.is_file():
            raise EvalInputError(f"{p}: prompts file not found (expected a text file with one prompt per line)")
        try:
            lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as e:
            raise EvalInputError(f"{p}: cannot read prompts ({e}); save it as UTF-8 text") from e
        out = [ln for ln in lines if ln]
        if not out:
            raise EvalInputError(f"{p}: prompts file is empty")
        return out
    out = [str(s) for s in prompts]
    if not out:
        raise EvalInputError("prompts list is empty")
    return out


TRUST_ENV = "STEPDISTILL_TRUST_REMOTE_CODE"


def _shipped_pipeline_files() -> dict[str, bytes]:
    import stepdistill.pipelines as shipped

    return {f.name: f.read_bytes() for f in Path(shipped.__file__).parent.glob("*.py") if f.name != "__init__.py"}


def folder_code_is_ours(folder: str | os.PathLike) -> tuple[bool, list[str]]:
    """``(every .py file in folder is byte-identical to a pipeline file of this stepdistill install,
    the .py files that are not)``.  A folder without code is ours trivially."""
    shipped = _shipped_pipeline_files()
    foreign = [str(f.relative_to(folder)) for f in sorted(Path(folder).rglob("*.py"))
               if shipped.get(f.name) != f.read_bytes()]
    return not foreign, foreign


def load_pipeline(folder: str | os.PathLike, device: str | torch.device = "cpu",
                  trust_remote_code: bool | None = None, **kwargs):
    """``DiffusionPipeline.from_pretrained(folder)`` moved to ``device``, with an explicit policy for
    the code a folder carries.

    stepdistill's class-conditional, multi-student and AR exports are self-contained: their pipeline
    ``.py`` files are written next to the weights so that plain diffusers can load them, and diffusers
    runs such files only with ``trust_remote_code=True``.  ``trust_remote_code``:

    * ``None`` (default): trusted only when every ``.py`` file in the folder is byte-identical to a
      pipeline file shipped with this stepdistill install (i.e. the code that runs is our own);
      a folder with any other code is refused with an error naming the files, unless the
      environment variable ``STEPDISTILL_TRUST_REMOTE_CODE=1`` opts in (also reachable from the CLI);
    * ``True``: run the folder's code (only for folders you trust);
    * ``False``: never run folder code (stock pipelines such as ``StableDiffusionPipeline`` need none).
    """
    from diffusers import DiffusionPipeline

    p = Path(folder).expanduser()
    if not (p / "model_index.json").is_file():
        raise EvalInputError(f"{p}: not a diffusers pipeline folder (no model_index.json)")
    if trust_remote_code is None:
        ours, foreign = folder_code_is_ours(p)
        trust_remote_code = ours or os.environ.get(TRUST_ENV, "") == "1"
        if not trust_remote_code:
            raise EvalInputError(
                f"{p}: holds code that is not a pipeline file of this stepdistill install ({', '.join(foreign)}); "
                f"it is not run by default. If you trust it, set {TRUST_ENV}=1 (or pass trust_remote_code=True). "
                "A folder exported by another stepdistill version can be re-exported with `stepdistill export`."
            )
    try:
        pipe = DiffusionPipeline.from_pretrained(str(p), trust_remote_code=trust_remote_code, **kwargs)
    except EvalInputError:
        raise
    except Exception as e:  # noqa: BLE001
        raise EvalInputError(f"{p}: cannot load the pipeline ({type(e).__name__}: {e})") from e
    if hasattr(pipe, "to"):
        pipe = pipe.to(device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe


_NUM_CLASS_KEYS = ("num_classes", "num_class_embeds", "num_embeds_ada_norm")


def _recorded(pipe: Any, key: str) -> Any:
    """What a stepdistill export recorded in its scheduler config as ``_stepdistill_<key>`` (diffusers
    keeps such private keys silently), for stock pipelines that have no config of their own for it."""
    cfg = getattr(getattr(pipe, "scheduler", None), "config", None)
    return cfg.get(f"_stepdistill_{key}") if cfg is not None and hasattr(cfg, "get") else None


def recorded_call(pipe: Any, num_inference_steps: int | None = None, given: dict | None = None) -> dict:
    """The ``__call__`` keywords a stepdistill export recorded for its stock pipeline (scheduler config
    ``_stepdistill_pipeline_call``: the student's timesteps or sigmas, ``guidance_scale`` 0 or 1 --
    guidance is distilled in --, sizes), as defaults under what the caller ``given``: a stock
    ``StableDiffusionPipeline`` would otherwise run a student at its own CFG 7.5 and 50-step
    schedule.  With ``num_inference_steps`` set, the recorded schedule is dropped (the caller asks
    for another).  Older exports recorded only ``_stepdistill_timesteps``.  Keywords the pipeline
    does not take, and timesteps of pipelines that keep them in their own config, are left out."""
    given = given or {}
    call = dict(_recorded(pipe, "pipeline_call") or {})
    if not call and _recorded(pipe, "timesteps"):
        call = {"timesteps": list(_recorded(pipe, "timesteps"))}
    if num_inference_steps is not None or "timesteps" in given or "sigmas" in given:
        for key in ("timesteps", "sigmas", "num_inference_steps"):
            call.pop(key, None)
    if "timesteps" in call or "sigmas" in call:
        call.pop("num_inference_steps", None)  # the schedule fixes the count (diffusers warns on both)
    cfg = getattr(pipe, "config", None) or {}
    if isinstance(cfg, dict) and "timesteps" in cfg:
        call.pop("timesteps", None)
    return {k: v for k, v in call.items() if k not in given and _has_param(pipe.__call__, k)}


def pipeline_num_classes(pipe: Any) -> int | None:
    """Number of classes of a class-conditional pipeline: ``pipe.num_classes``, ``pipe.config``, or
    a component config (``num_classes`` / ``num_class_embeds`` / DiT's ``num_embeds_ada_norm``)."""
    v = getattr(pipe, "num_classes", None)
    if isinstance(v, int):
        return v
    cfg = getattr(pipe, "config", None) or {}
    if isinstance(cfg, dict) and isinstance(cfg.get("num_classes"), int):
        return cfg["num_classes"]
    if isinstance(_recorded(pipe, "num_classes"), int):  # stock ConsistencyModelPipeline exports
        return _recorded(pipe, "num_classes")
    try:
        comps = getattr(pipe, "components", None) or {}
    except ValueError:  # a pipeline whose config does not match its __init__ signature
        comps = {}
    for key in _NUM_CLASS_KEYS:
        for comp in comps.values():
            c = getattr(comp, "config", None)
            val = c.get(key) if isinstance(c, dict) else getattr(c, key, None)
            if isinstance(val, int) and val > 0:
                return val
    return None


def _has_param(fn: Any, name: str) -> bool:
    """Whether ``fn`` names parameter ``name`` explicitly (``**kwargs`` does not count)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _to_uint8_nchw(images: Any) -> torch.Tensor:
    if isinstance(images, (list, tuple)) and images and not isinstance(images[0], (np.ndarray, torch.Tensor)):
        images = np.stack([np.asarray(im) for im in images])  # PIL images
    if isinstance(images, torch.Tensor):  # output_type="pt": NCHW float in [0, 1]
        t = images.detach().cpu()
        return quantize(t) if t.dtype != torch.uint8 else t
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4:
        raise EvalInputError(f"pipeline returned images of shape {arr.shape}; expected NHWC")
    t = torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))
    return quantize(t)


def iter_sample_pipeline(
    folder_or_pipe: Any,
    n: int,
    seed: int = 0,
    batch_size: int = 16,
    class_labels: Any = None,
    prompts: Any = None,
    num_inference_steps: int | None = None,
    num_classes: int | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
    **call_kwargs: Any,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, list[str] | None]]:
    """Streaming :func:`sample_pipeline`: yields ``(uint8 NCHW, labels or None, prompts or None)``."""
    pipe = load_pipeline(folder_or_pipe, device=device) if isinstance(folder_or_pipe, (str, os.PathLike)) \
        else folder_or_pipe
    prompt_list = load_prompts(prompts)
    if prompt_list is not None and class_labels is not None:
        raise EvalInputError("pass either prompts or class_labels, not both")
    labels = None
    if prompt_list is None:
        conditional = _has_param(pipe.__call__, "class_labels")
        if class_labels is None and conditional:
            class_labels = "uniform"
        if class_labels is not None:
            k = num_classes or pipeline_num_classes(pipe)
            labels = resolve_labels(n, class_labels, k)
    if n <= 0 or batch_size <= 0:
        raise EvalInputError(f"number of images ({n}) and batch size ({batch_size}) must be positive")
    if num_inference_steps is not None and (isinstance(num_inference_steps, bool) or int(num_inference_steps) < 1):
        raise EvalInputError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    call_kwargs = {**recorded_call(pipe, num_inference_steps, call_kwargs), **call_kwargs}
    takes_batch_size = _has_param(pipe.__call__, "batch_size")
    with _progress(n, "sample", progress) as bar:
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            kw: dict[str, Any] = dict(call_kwargs)
            # CPU generators on every device: same noise on CPU and GPU (diffusers' randn_tensor moves it)
            kw["generator"] = make_generators(seed, start, b, "cpu")
            kw["output_type"] = "np"
            if num_inference_steps is not None:
                kw["num_inference_steps"] = num_inference_steps
            lab = None
            pr = None
            if prompt_list is not None:
                pr = [prompt_list[i % len(prompt_list)] for i in range(start, start + b)]
                kw["prompt"] = pr
            elif labels is not None:
                lab = labels[start : start + b]
                kw["class_labels"] = lab.tolist()
                if takes_batch_size:  # ConsistencyModelPipeline sizes its noise by batch_size alone
                    kw["batch_size"] = b
            else:
                kw["batch_size"] = b
            out = pipe(**kw)
            images = getattr(out, "images", None)
            if images is None:
                images = out[0] if isinstance(out, (tuple, list)) else out
            x = _to_uint8_nchw(images)
            if x.shape[0] != b:
                raise EvalInputError(
                    f"pipeline returned {x.shape[0]} images for a batch of {b}; does it accept one generator "
                    "per image (generator=list)?"
                )
            bar.update(b)
            yield x, lab, pr


def sample_pipeline(
    folder_or_pipe: Any,
    n: int,
    seed: int = 0,
    batch_size: int = 16,
    class_labels: Any = None,
    prompts: Sequence[str] | str | os.PathLike | None = None,
    num_inference_steps: int | None = None,
    num_classes: int | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
    **call_kwargs: Any,
) -> torch.Tensor:
    """Sample ``n`` images from a diffusers pipeline (folder or object) -> uint8 NCHW.

    Image ``i`` uses ``torch.Generator().manual_seed(seed + i)`` (a list of generators, one per image,
    is passed as ``generator=``) and, for class-conditional pipelines (``__call__`` takes
    ``class_labels``), class ``i % num_classes`` by default (``class_labels="uniform"``), or
    ``class_labels[i % len]`` for a list.  Text pipelines get ``prompt=`` (prompt ``i % len`` of the
    list or file).  Unconditional pipelines get ``batch_size=``.  The call uses ``output_type="np"``
    and the images are quantised with rounding.  Results do not depend on ``batch_size``.
    """
    return torch.cat([
        x for x, _, _ in iter_sample_pipeline(
            folder_or_pipe, n, seed, batch_size, class_labels, prompts, num_inference_steps, num_classes,
            progress, device, **call_kwargs)
    ])


def save_images(folder: str | os.PathLike, images: Any, labels: Any = None, start_index: int = 0) -> list[Path]:
    """Write uint8 NCHW images as PNGs ``{i:06d}.png`` (``{i:06d}_class{k}.png`` with labels).

    PNG (lossless) on purpose: JPEG shifts FID.  Returns the written paths.
    """
    from PIL import Image

    from .detectors import as_uint8_nchw

    x = as_uint8_nchw(images).numpy()
    if x.shape[1] not in (1, 3):
        raise EvalInputError(f"save_images: expected 1 or 3 channels, got {x.shape[1]}")
    lab = None if labels is None else torch.as_tensor(labels).flatten().tolist()
    if lab is not None and len(lab) != x.shape[0]:
        raise EvalInputError(f"save_images: {len(lab)} labels for {x.shape[0]} images")
    out = Path(folder).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for j, img in enumerate(x):
        i = start_index + j
        name = f"{i:06d}.png" if lab is None else f"{i:06d}_class{int(lab[j])}.png"
        arr = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        p = out / name
        Image.fromarray(np.ascontiguousarray(arr)).save(p)
        paths.append(p)
    return paths
