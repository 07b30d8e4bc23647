"""Deterministic batch sources for the training loop.

A source is anything with ``batch(step, rank, world, batch_size) -> dict`` returning
``{"real": Tensor | None, "raw_cond": LongTensor | list[str] | None}``.  The result is a *pure
function* of the arguments and the source's seed: no iterator state, no worker processes.  That is
what makes resume exact (a resumed run asks for the same batches the uninterrupted run would have
seen) and makes the data independent of how the global batch is split.

The loop asks for micro-batch ``m`` of process ``r`` as *virtual rank* ``r * accum + m`` of
``world * accum``, so 2 processes x 1 micro-batch and 1 process x 2 micro-batches see the same data.

Sources:

* :class:`TensorSource` -- real data held in memory (images + optional labels/captions).  Indices
  follow one seeded permutation per epoch of the global sample stream (sampling *without*
  replacement: every image is seen once per epoch).  Position ``(step * world + rank) * batch_size
  + i`` of the stream is the ``i``-th element of the batch.
* :class:`ConditionSource` -- data-free: ``teacher.random_raw_conditions`` drawn with a
  ``torch.Generator`` seeded from ``(seed, step, rank)``; ``raw_cond=None`` for unconditional teachers.
* :class:`PromptSource` -- random prompts (list or text file, one per line), epoch permutations.

:func:`build_source` maps ``TrainConfig.dataset`` / ``dataset_params`` to a source.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import ConfigError
from ..errors import DataError, DataNotFoundError

__all__ = [
    "derive_seed",
    "BatchSource",
    "TensorSource",
    "ConditionSource",
    "PromptSource",
    "build_source",
]


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any tuple of ints/strings, stable across processes and Python runs.

    (``hash()`` is salted per process; sha256 of the ``repr`` is not.)
    """
    digest = hashlib.sha256(repr(tuple(parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _check_batch_args(step: int, rank: int, world: int, batch_size: int) -> None:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


class BatchSource:
    """Base class (a protocol, really): subclasses implement :meth:`batch`."""

    seed: int = 0

    def batch(self, step: int, rank: int, world: int, batch_size: int) -> dict:  # pragma: no cover
        raise NotImplementedError

    def __len__(self) -> int:  # number of distinct items (0 = unbounded / data-free)
        return 0


class EpochPermutation:
    """Index of global stream position ``p``: ``perm_{p // n}[p % n]`` with a seeded permutation per epoch."""

    def __init__(self, n: int, seed: int, salt: str):
        self.n = n
        self.seed = seed
        self.salt = salt
        self._cache: OrderedDict[int, Tensor] = OrderedDict()

    def _perm(self, epoch: int) -> Tensor:
        perm = self._cache.get(epoch)
        if perm is None:
            g = torch.Generator().manual_seed(derive_seed(self.salt, self.seed, "epoch", epoch))
            perm = torch.randperm(self.n, generator=g, device="cpu")  # host indices
            self._cache[epoch] = perm
            while len(self._cache) > 2:
                self._cache.popitem(last=False)
        return perm

    def indices(self, step: int, rank: int, world: int, batch_size: int) -> Tensor:
        _check_batch_args(step, rank, world, batch_size)
        start = (step * world + rank) * batch_size
        pos = torch.arange(start, start + batch_size, dtype=torch.long, device="cpu")
        epoch = pos // self.n
        offset = pos % self.n
        out = torch.empty(batch_size, dtype=torch.long, device="cpu")
        for e in torch.unique(epoch).tolist():
            mask = epoch == e
            out[mask] = self._perm(int(e))[offset[mask]]
        return out


class TensorSource(BatchSource):
    """Real data in memory: ``images`` (N, ...) and optional ``labels`` (N,) ints or N captions.

    ``images`` may be float (already in the teacher's sample space) or uint8 in [0, 255]
    (converted to [-1, 1] float per batch, which keeps big image sets 4x smaller in memory).
    """

    def __init__(self, images: Tensor, labels: Tensor | Sequence[str] | None = None, seed: int = 0):
        if not isinstance(images, Tensor) or images.ndim < 2 or images.shape[0] == 0:
            raise ValueError("TensorSource needs a non-empty tensor of shape (N, ...)")
        n = images.shape[0]
        if labels is not None:
            if isinstance(labels, Tensor):
                if labels.shape[:1] != (n,):
                    raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
                labels = labels.long()
            else:
                labels = [str(s) for s in labels]
                if len(labels) != n:
                    raise ValueError(f"got {n} images but {len(labels)} labels/captions")
        self.images = images
        self.labels = labels
        self.seed = int(seed)
        self._plan = EpochPermutation(n, self.seed, "tensor-source")

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, step: int, rank: int, world: int, batch_size: int) -> dict:
        idx = self._plan.indices(step, rank, world, batch_size)
        x = self.images[idx]
        if x.dtype == torch.uint8:
            x = x.float() / 127.5 - 1.0
        raw = None
        if isinstance(self.labels, Tensor):
            raw = self.labels[idx]
        elif self.labels is not None:
            raw = [self.labels[i] for i in idx.tolist()]
        return {"real": x, "raw_cond": raw, "batch_size": batch_size}


class ConditionSource(BatchSource):
    """Data-free source: raw conditions from ``teacher.random_raw_conditions`` (None if unconditional)."""

    def __init__(self, teacher: Any, seed: int = 0):
        self.teacher = teacher
        self.seed = int(seed)

    def batch(self, step: int, rank: int, world: int, batch_size: int) -> dict:
        _check_batch_args(step, rank, world, batch_size)
        raw = None
        fn = getattr(self.teacher, "random_raw_conditions", None)
        if fn is not None:
            g = torch.Generator().manual_seed(derive_seed("condition-source", self.seed, step, rank))
            raw = fn(batch_size, generator=g)
        return {"real": None, "raw_cond": raw, "batch_size": batch_size}


class PromptSource(BatchSource):
    """Prompts drawn from a list or a UTF-8 text file (one prompt per line; blank lines skipped)."""

    def __init__(self, prompts: Sequence[str] | str | Path, seed: int = 0):
        if isinstance(prompts, (str, Path)):
            path = Path(prompts)
            if not path.is_file() and len(path.parts) == 1:  # a bare name: a prompt file shipped with the package
                from .colored_mnist import PROMPT_DIR

                if (PROMPT_DIR / path).is_file():
                    path = PROMPT_DIR / path
            if not path.is_file():
                raise DataNotFoundError(f"prompt file {path} does not exist (expected a UTF-8 text file, one prompt per line)")
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise DataError(f"cannot read prompt file {path}: {e}; save it as UTF-8 text, one prompt per line") from e
            items = [line.strip() for line in text.splitlines() if line.strip()]
            if not items:
                raise DataError(f"prompt file {path} holds no prompts (it is empty or only blank lines)")
        else:
            items = [str(p) for p in prompts]
            if not items:
                raise DataError("PromptSource needs at least one prompt")
        self.prompts = items
        self.seed = int(seed)
        self._plan = EpochPermutation(len(items), self.seed, "prompt-source")

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, step: int, rank: int, world: int, batch_size: int) -> dict:
        idx = self._plan.indices(step, rank, world, batch_size)
        return {"real": None, "raw_cond": [self.prompts[i] for i in idx.tolist()], "batch_size": batch_size}


# ---------------------------------------------------------------------------------------------
# from the config

_FOLDER_KEYS = ("resolution", "channels", "labels")
_HF_KEYS = ("split", "image_column", "label_column", "resolution", "channels", "cache_dir")


def _image_defaults(teacher: Any) -> dict:
    """resolution/channels of a pixel-space teacher ((1|3, H, H) sample shape), else {}."""
    shape = tuple(getattr(teacher, "sample_shape", ()) or ())
    if len(shape) == 3 and shape[0] in (1, 3) and shape[1] == shape[2]:
        return {"channels": int(shape[0]), "resolution": int(shape[1])}
    return {}


def _check_shape(images: Any, defaults: dict, dataset: str) -> None:
    """Loaded images must have the pixel teacher's (channels, resolution, resolution)."""
    if not defaults:
        return
    want = (defaults["channels"], defaults["resolution"], defaults["resolution"])
    have = tuple(int(s) for s in images.shape[1:])
    if have != want:
        raise DataError(
            f"train.dataset={dataset} gives images of shape {have} (channels, height, width) but the teacher "
            f"samples {want}; leave train.dataset_params.resolution / channels out (the teacher's are the default)"
        )


def _check_keys(params: dict, allowed: tuple[str, ...], what: str) -> None:
    unknown = [k for k in params if k not in allowed]
    if unknown:
        raise ConfigError(
            f"unknown train.dataset_params key(s) {', '.join(map(repr, unknown))} for {what}; "
            f"allowed: {', '.join(allowed) or '(none)'}"
        )


def build_source(cfg: Any, teacher: Any, needs_data: bool) -> BatchSource:
    """The batch source a run config asks for.

    ``cfg.dataset``:

    * ``None`` -- data-free: :class:`ConditionSource` over the teacher, or a :class:`PromptSource`
      when ``dataset_params.prompts`` names a prompt file / list (text teachers);
    * ``"digits"`` -- scikit-learn digits (1x8x8, labels 0..9);
    * ``"prompts:<file>"`` -- a prompt file (data-free text conditioning);
    * ``"hf:<local path or name>"`` -- a Hugging Face dataset (``dataset_params``: split,
      image_column, label_column, resolution, channels, cache_dir);
    * any other string -- an image folder (``dataset_params``: resolution, channels, labels).

    Resolution and channels default to the teacher's sample shape when it is a (1|3, H, H) pixel
    space.  Images are held in memory as uint8.
    """
    seed = int(cfg.seed)
    dataset = cfg.dataset
    params = dict(cfg.dataset_params or {})
    if dataset is None:
        if needs_data:
            raise ConfigError(
                "this algorithm needs real data (needs_data=True) but train.dataset is not set; "
                "use train.dataset=digits, an image folder, or hf:<local dataset path>"
            )
        prompts = params.pop("prompts", None)
        _check_keys(params, (), "a data-free run (only 'prompts' is allowed)")
        if prompts is not None:
            return PromptSource(prompts, seed=seed)
        return ConditionSource(teacher, seed=seed)
    if not isinstance(dataset, str) or not dataset.strip():
        raise ConfigError(
            f"train.dataset must be digits, a folder, hf:<path> or prompts:<file>; got {dataset!r}"
        )
    if dataset.startswith("prompts:"):
        if needs_data:
            raise ConfigError(
                "this algorithm needs real images; a prompt file (train.dataset=prompts:...) has none"
            )
        _check_keys(params, (), "train.dataset=prompts:<file>")
        return PromptSource(dataset[len("prompts:") :], seed=seed)
    if dataset == "digits":
        from .digits import load_digits

        _check_keys(params, (), "train.dataset=digits")
        images, labels = load_digits("train")
        return TensorSource(images, labels, seed=seed)
    defaults = _image_defaults(teacher)
    if dataset.startswith("hf:"):
        from .hf import load_hf_images

        _check_keys(params, _HF_KEYS, "train.dataset=hf:<path>")
        kw = {**defaults, **params}
        data = load_hf_images(dataset[3:], as_uint8=True, **kw)
        _check_shape(data.images, defaults, dataset)
        return TensorSource(data.images, data.labels, seed=seed)
    path = Path(dataset).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"train.dataset={dataset!r} is not 'digits', 'hf:<path>', 'prompts:<file>' nor an existing folder"
        )
    from .folder import load_image_folder

    _check_keys(params, _FOLDER_KEYS, "an image folder")
    kw = {**defaults, **params}
    data = load_image_folder(path, as_uint8=True, **kw)
    _check_shape(data.images, defaults, dataset)
    return TensorSource(data.images, data.labels, seed=seed)
