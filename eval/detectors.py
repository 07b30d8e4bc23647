"""Feature extractors ("detectors") for FID and class accuracy.

Every detector takes **uint8 NCHW** images (torch tensor or numpy array) and returns ``(N, d)``
float64 features.  A detector has a ``name`` (what the numbers are reported under), a
``weights_sha256`` and a ``preprocessing`` description: together they form the cache key of
reference statistics, so changing the weights or the resize invalidates cached statistics.

Detectors:

* :class:`DigitsDetector` (``"digits-classifier"``): a small CNN trained by this package on
  scikit-learn's 8x8 digits.  Its FID is reported as ``FID-digits-N<n>``; it is *not* Inception FID.
* :class:`InceptionDetector` (``"inception-v3-compat"``): torchmetrics' ``FrechetInceptionDistance``
  network (torch-fidelity's ``FeatureExtractorInceptionV3``), from a local weights file or, when
  online, torchmetrics' default download.  Needs ``pip install stepdistill[fid]``.
* :class:`CleanFIDDetector` (``"clean-fid-<mode>"``): clean-fid's TorchScript Inception with its
  ``clean`` (PIL bicubic on float) or ``legacy_tensorflow`` (resize inside the network) modes.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from stepdistill.utils import cache_dir

from .errors import EvalInputError

__all__ = [
    "Detector",
    "DigitsNet",
    "DigitsDetector",
    "InceptionDetector",
    "CleanFIDDetector",
    "train_digits_detector",
    "get_detector",
    "cache_root",
    "default_digits_detector_dir",
    "as_uint8_nchw",
    "DIGITS_DETECTOR_VERSION",
]

DIGITS_DETECTOR_VERSION = "digits-v1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "detector.json"


# --------------------------------------------------------------------------------------------- utils
def cache_root() -> Path:
    """``$STEPDISTILL_CACHE`` or ``~/.cache/stepdistill`` (:func:`stepdistill.utils.cache_dir`)."""
    return cache_dir()


def default_digits_detector_dir() -> Path:
    return cache_root() / "detectors" / DIGITS_DETECTOR_VERSION


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op threads (tiny 8x8 convolutions are faster and bitwise
    reproducible single-threaded; several threads on a busy 2-core machine are many times slower)."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def as_uint8_nchw(images: Any, *, what: str = "images") -> torch.Tensor:
    """Check and convert images to a uint8 NCHW CPU tensor (no copy when already one)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise EvalInputError(f"{what}: expected a uint8 NCHW tensor or array, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise EvalInputError(
            f"{what}: expected uint8 images, got {images.dtype}; quantise with "
            "stepdistill.eval.generate.quantize (rounding) first"
        )
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4:
        raise EvalInputError(f"{what}: expected NCHW images, got shape {tuple(images.shape)}")
    return images.cpu()


# ----------------------------------------------------------------------------------------- base class
class Detector(abc.ABC):
    """Feature extractor used for FID.  Subclasses implement :meth:`_forward`."""

    #: short name reported next to every number (e.g. ``"digits-classifier"``)
    name: str = "detector"
    #: metric name prefix; the full name is ``f"{fid_name}-N{n}"``
    fid_name: str = "FID"
    #: number of channels the network consumes
    channels: int = 3
    #: whether 3-channel input may be averaged to grey for a 1-channel network
    rgb_to_grey_ok: bool = False
    feature_dim: int = 0
    weights_sha256: str = ""
    default_batch_size: int = 64
    #: which activations are the features (part of the cache key: changing it invalidates stats)
    feature_spec: str = ""

    @property
    def id(self) -> str:
        return f"{self.name}@{self.weights_sha256[:12]}"

    def preprocessing(self) -> dict[str, Any]:
        """JSON description of the input pipeline (part of the reference-statistics cache key)."""
        return {}

    def cache_key(self) -> dict[str, Any]:
        return {
            "detector": self.name,
            "weights_sha256": self.weights_sha256,
            "feature_dim": self.feature_dim,
            "feature_spec": self.feature_spec,
            "preprocessing": self.preprocessing(),
        }

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "id": self.id, **self.cache_key()}

    def convert_channels(self, images: torch.Tensor, what: str = "images") -> torch.Tensor:
        """Grey -> RGB by repetition (always safe); RGB -> grey only for detectors that allow it."""
        c = images.shape[1]
        if c == self.channels:
            return images
        if c == 1 and self.channels == 3:
            return images.expand(-1, 3, -1, -1)
        if c == 3 and self.channels == 1 and self.rgb_to_grey_ok:
            return images  # averaged in float by the subclass
        raise EvalInputError(
            f"{what}: {c}-channel images cannot be fed to the {self.name} detector, which takes "
            f"{self.channels} channel(s); convert them to {'grey (L)' if self.channels == 1 else 'RGB'} first"
        )

    @abc.abstractmethod
    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW batch (channels already converted) -> (B, d) features."""

    def iter_features(self, images: Any, batch_size: int | None = None, what: str = "images"):
        x = as_uint8_nchw(images, what=what)
        x = self.convert_channels(x, what=what)
        bs = batch_size or self.default_batch_size
        with torch.inference_mode():
            for i in range(0, x.shape[0], bs):
                yield self._forward(x[i : i + bs]).double().cpu().numpy()

    def features(self, images: Any, batch_size: int | None = None, what: str = "images") -> np.ndarray:
        """``(N, d)`` float64 features of uint8 NCHW ``images``."""
        parts = list(self.iter_features(images, batch_size, what=what))
        if not parts:
            return np.zeros((0, self.feature_dim), np.float64)
        return np.concatenate(parts, axis=0)


# ------------------------------------------------------------------------------------ digits detector
class DigitsNet(nn.Module):
    """Small CNN for 1x8x8 digits: 3 convs -> fc 128 -> fc ``feature_dim`` (FID features, taken
    before the ReLU) -> 10 logits."""

    def __init__(self, width: int = 16, hidden: int = 128, feature_dim: int = 64, num_classes: int = 10,
                 dropout: float = 0.2):
        super().__init__()
        self.c1 = nn.Conv2d(1, width, 3, padding=1)
        self.c2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.c3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width * 4, hidden)
        self.fc2 = nn.Linear(hidden, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)
        self.drop = nn.Dropout(dropout)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate layer *before* its ReLU: full-rank features (post-ReLU units can be dead,
        which makes the FID covariance singular)."""
        x = F.relu(self.c1(x))
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        x = F.max_pool2d(F.relu(self.c3(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(self.drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(F.relu(self.features(x))))


DEFAULT_ARCH = {"width": 16, "hidden": 128, "feature_dim": 64, "num_classes": 10, "dropout": 0.2}


def _state_dict_sha256(module: nn.Module) -> str:
    from safetensors.torch import save

    sd = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    return hashlib.sha256(save(sd)).hexdigest()


class DigitsDetector(Detector):
    """The package's digits classifier as an FID detector (penultimate features) and classifier.

    Input: uint8 NCHW, 1 channel (3 channels are averaged), any size (resized to 8x8 with
    antialiased bilinear).  Pixel ``u`` maps to ``u / 127.5 - 1`` (the range of
    :func:`stepdistill.data.digits.load_digits`).
    """

    name = "digits-classifier"  # the value of ``fid_detector`` in benchmark rows
    fid_name = "FID-digits"
    channels = 1
    rgb_to_grey_ok = True
    default_batch_size = 512
    feature_spec = "digits-v1 fc2 pre-relu"

    def __init__(self, net: DigitsNet, weights_sha256: str | None = None, config: dict | None = None,
                 path: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
        self.net = net.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)
        self.feature_dim = int(net.fc2.out_features)
        self.num_classes = int(net.head.out_features)
        self.weights_sha256 = weights_sha256 or _state_dict_sha256(net)
        self.config = dict(config or {})
        self.path = Path(path) if path is not None else None

    # ---- loading
    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu", verify: bool = True) -> DigitsDetector:
        """Load from a folder written by :func:`train_digits_detector` (or its ``model.safetensors``)."""
        from safetensors.torch import load_file

        p = Path(path)
        folder = p if p.is_dir() else p.parent
        wfile = p if p.is_file() else folder / WEIGHTS_FILE
        cfile = folder / CONFIG_FILE
        if not wfile.is_file() or not cfile.is_file():
            raise EvalInputError(
                f"{folder}: no digits detector here (needs {WEIGHTS_FILE} and {CONFIG_FILE}); create one with "
                "`stepdistill eval train-detector --dataset digits --output DIR`"
            )
        try:
            cfg = json.loads(cfile.read_text())
        except (OSError, ValueError) as e:
            raise EvalInputError(f"{cfile}: unreadable detector config ({e}); retrain the detector") from e
        sha = sha256_file(wfile)
        if verify and cfg.get("sha256") and cfg["sha256"] != sha:
            raise EvalInputError(
                f"{wfile}: sha256 {sha[:12]} does not match {cfile.name} ({cfg['sha256'][:12]}); the files are "
                "from different trainings or corrupted: retrain the detector"
            )
        net = DigitsNet(**{**DEFAULT_ARCH, **cfg.get("architecture", {})})
        try:
            net.load_state_dict(load_file(str(wfile)))
        except Exception as e:  # noqa: BLE001 - report any loading failure as bad input
            raise EvalInputError(f"{wfile}: cannot load digits detector weights ({e}); retrain the detector") from e
        return cls(net, weights_sha256=sha, config=cfg, path=folder, device=device)

    @classmethod
    def default(cls, train_if_missing: bool = True, device: str | torch.device = "cpu",
                progress: bool = False) -> DigitsDetector:
        """The digits detector shipped with the package (``eval/weights/digits-v1``, so FID-digits
        numbers are comparable across machines), else the one in the cache
        (``$STEPDISTILL_CACHE/detectors/digits-v1``), trained on first use."""
        packaged = Path(__file__).parent / "weights" / DIGITS_DETECTOR_VERSION
        if (packaged / CONFIG_FILE).is_file() and not os.environ.get("STEPDISTILL_IGNORE_PACKAGED_DETECTOR"):
            return cls.load(packaged, device=device)
        folder = default_digits_detector_dir()
        if (folder / CONFIG_FILE).is_file():
            try:
                return cls.load(folder, device=device)
            except EvalInputError:
                if not train_if_missing:
                    raise
                shutil.rmtree(folder, ignore_errors=True)  # corrupted cache entry: retrain
        elif not train_if_missing:
            raise EvalInputError(
                f"{folder}: no cached digits detector; run `stepdistill eval train-detector --dataset digits`"
            )
        train_digits_detector(folder, progress=progress)
        return cls.load(folder, device=device)

    # ---- inference
    def preprocessing(self) -> dict[str, Any]:
        return {"input": "uint8 -> u/127.5-1", "rgb": "channel mean", "resize": "bilinear antialias to 8x8"}

    def _prepare(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(self.device, torch.float32) / 127.5 - 1.0
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        if x.shape[-2:] != (8, 8):
            x = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False, antialias=True)
        return x

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        with num_threads(1):
            return self.net.features(self._prepare(batch))

    def logits(self, images: Any, batch_size: int | None = None) -> torch.Tensor:
        x = self.convert_channels(as_uint8_nchw(images))
        bs = batch_size or self.default_batch_size
        out = []
        with torch.inference_mode(), num_threads(1):
            for i in range(0, x.shape[0], bs):
                out.append(self.net(self._prepare(x[i : i + bs])).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.num_classes)

    def predict(self, images: Any, batch_size: int | None = None) -> torch.Tensor:
        return self.logits(images, batch_size).argmax(dim=1)


def _shift_augment(x: torch.Tensor, g: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random translations by up to ``max_shift`` pixels (background value -1)."""
    n, _, h, w = x.shape
    k = 2 * max_shift + 1
    xp = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, k, (n,), generator=g)
    dx = torch.randint(0, k, (n,), generator=g)
    rows = dy[:, None] + torch.arange(h)[None, :]
    cols = dx[:, None] + torch.arange(w)[None, :]
    return xp[torch.arange(n)[:, None, None], 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


def _accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    with torch.inference_mode():
        return float((net(x).argmax(1) == y).float().mean())



def fit(params, loss_of, *, n: int, steps: int, batch_size: int, lr: float, weight_decay: float,
        generator: torch.Generator, progress: bool = False, desc: str = "train", pct_start: float = 0.3) -> None:
    """The judges' and detectors' training loop: AdamW with a one-cycle schedule; each of ``steps``
    steps draws ``batch_size`` indices in ``[0, n)`` from ``generator`` and minimises
    ``loss_of(indices)`` (which may draw augmentations from the same generator, after the indices)."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=pct_start)
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=desc, leave=False)
    for _ in it:
        loss = loss_of(torch.randint(0, n, (batch_size,), generator=generator))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()

def train_digits_detector(
    out_path: str | os.PathLike,
    steps: int = 600,
    seed: int = 0,
    split: str = "train",
    eval_split: str | None = None,
    batch_size: int = 128,
    lr: float = 3e-3,
    label_smoothing: float = 0.1,
    progress: bool = False,
) -> dict[str, Any]:
    """Train the digits classifier and write ``out_path/model.safetensors`` + ``out_path/detector.json``.

    The folder is built in a temporary sibling and moved into place with one ``os.rename`` (if another
    process finished first, its result is kept).  Single-threaded and seeded, so the weights (and their
    sha256) are reproducible on one machine.  Train on split ``"a"`` with ``eval_split="b"`` to
    measure held-out accuracy; the default (shipped) detector trains on all 1 797 images.

    Returns the JSON written to ``detector.json`` (``sha256``, ``train``, ``eval`` accuracy, ...).
    """
    from safetensors.torch import save_file

    from stepdistill.data.digits import load_digits, to_uint8

    out = Path(out_path)
    t0 = time.perf_counter()
    with num_threads(1):
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        x, y = load_digits(split)
        x = to_uint8(x).float() / 127.5 - 1.0  # exactly what the detector sees at inference
        net = DigitsNet(**DEFAULT_ARCH)
        net.train()
        fit(net.parameters(),
            lambda idx: F.cross_entropy(net(_shift_augment(x[idx], g)), y[idx], label_smoothing=label_smoothing),
            n=x.shape[0], steps=steps, batch_size=batch_size, lr=lr, weight_decay=1e-4, generator=g,
            progress=progress, desc="train digits detector")
        net.eval()
        train_acc = _accuracy(net, x, y)
        eval_info = None
        if eval_split is not None:
            xe, ye = load_digits(eval_split)
            eval_info = {"split": eval_split, "accuracy": _accuracy(net, to_uint8(xe).float() / 127.5 - 1.0, ye),
                         "n": int(xe.shape[0])}
    seconds = time.perf_counter() - t0

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        sd = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
        save_file(sd, str(tmp / WEIGHTS_FILE))
        info = {
            "name": DIGITS_DETECTOR_VERSION,
            "detector": DigitsDetector.name,
            "architecture": dict(DEFAULT_ARCH),
            "train": {"split": split, "steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr,
                      "label_smoothing": label_smoothing, "augment": "random shift <= 1 px",
                      "seconds": round(seconds, 2), "train_accuracy": train_acc, "n": int(x.shape[0])},
            "eval": eval_info,
            "sha256": sha256_file(tmp / WEIGHTS_FILE),
            "torch": torch.__version__,
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if out.exists():
            # replace an existing detector: move it aside first so the swap is one rename
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "d")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / CONFIG_FILE).is_file():
                raise
            # another process won the race: keep its detector
            shutil.rmtree(tmp, ignore_errors=True)
            info = json.loads((out / CONFIG_FILE).read_text())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info["path"] = str(out)
    return info


# --------------------------------------------------------------------------------- Inception (torchmetrics)
_FID_EXTRA_HINT = "pip install 'stepdistill[fid]'  (or: pip install torch-fidelity)"


def _require_torch_fidelity() -> None:
    try:
        import torch_fidelity  # noqa: F401
    except ImportError as e:
        raise EvalInputError(
            f"the inception detector needs torch-fidelity, which is not installed: {_FID_EXTRA_HINT}"
        ) from e


def _check_state_dict_file(path: Path) -> Path:
    """Validate a local Inception weights file without unpickling code; return a .pth path usable by
    torch-fidelity (a .safetensors file is converted to a temporary .pth)."""
    if not path.is_file():
        raise EvalInputError(f"{path}: Inception weights file not found; pass an existing --inception-weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
        fd, tmp = tempfile.mkstemp(suffix=".pth")
        os.close(fd)
        torch.save(sd, tmp)
        return Path(tmp)
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise EvalInputError(
            f"{path}: not a plain state dict loadable with torch.load(weights_only=True) ({e}); "
            "use torch-fidelity's weights-inception-2015-12-05-6726825d.pth"
        ) from e
    if not isinstance(sd, dict) or "Conv2d_1a_3x3.conv.weight" not in sd:
        raise EvalInputError(
            f"{path}: not torch-fidelity Inception weights (no 'Conv2d_1a_3x3.conv.weight'); use "
            "weights-inception-2015-12-05-6726825d.pth"
        )
    return path


def _inception_compat_class():
    """torch-fidelity's ``FeatureExtractorInceptionV3`` with torchmetrics' ``antialias`` switch.

    Same computation as torchmetrics' ``NoTrainInceptionV3`` (torchmetrics >= 1.8) without importing
    torchmetrics (whose import takes many seconds): ``antialias=False`` is torch-fidelity's own
    TF1-compatible bilinear resize, ``antialias=True`` is ``F.interpolate(bilinear, antialias=True)``.
    """
    from torch.nn.functional import adaptive_avg_pool2d
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    class InceptionV3Compat(FeatureExtractorInceptionV3):
        def __init__(self, feature: str, weights_path: str | None, antialias: bool):
            super().__init__("inception-v3-compat", [feature], feature_extractor_weights_path=weights_path)
            self.feature = feature
            self.use_antialias = antialias

        def train(self, mode: bool = True):  # never leaves eval mode
            return super().train(False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
                raise EvalInputError(f"Inception expects uint8 Bx3xHxW, got {x.dtype} {tuple(x.shape)}")
            size = (self.INPUT_IMAGE_SIZE, self.INPUT_IMAGE_SIZE)
            x = x.to(self.feature_extractor_internal_dtype)
            if self.use_antialias:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
            else:
                x = interpolate_bilinear_2d_like_tensorflow1x(x, size=size, align_corners=False)
            x = (x - 128) / 128
            x = self.MaxPool_1(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))))
            if self.feature == "64":
                return adaptive_avg_pool2d(x, output_size=(1, 1)).flatten(1)
            x = self.MaxPool_2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
            if self.feature == "192":
                return adaptive_avg_pool2d(x, output_size=(1, 1)).flatten(1)
            for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                         "Mixed_6e"):
                x = getattr(self, name)(x)
            if self.feature == "768":
                return adaptive_avg_pool2d(x, output_size=(1, 1)).flatten(1)
            x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
            return torch.flatten(self.AvgPool(x), 1)

    return InceptionV3Compat


class InceptionDetector(Detector):
    """torchmetrics-compatible Inception-v3 (torch-fidelity ``FeatureExtractorInceptionV3``).

    Features equal those of torchmetrics' ``FrechetInceptionDistance(feature=feature_dim,
    antialias=antialias)``.  ``antialias`` selects the resize to 299x299 and is recorded in every
    report: ``False`` (default) = torch-fidelity's TF1-compatible bilinear (torch-fidelity,
    torchmetrics <= 1.7, TTUR-family numbers); ``True`` = torch bilinear with antialias (the
    torchmetrics >= 1.8 default).
    """

    fid_name = "FID"
    channels = 3
    default_batch_size = 32
    feature_spec = "torch-fidelity inception-v3 pool3 / mixed features"

    def __init__(self, weights_path: str | os.PathLike | None = None, feature_dim: int = 2048,
                 antialias: bool = False, device: str | torch.device = "cpu"):
        _require_torch_fidelity()
        if feature_dim not in (64, 192, 768, 2048):
            raise EvalInputError(f"inception feature_dim must be one of 64, 192, 768, 2048, got {feature_dim}")
        self.feature_dim = int(feature_dim)
        self.antialias = bool(antialias)
        self.device = torch.device(device)
        self.name = "inception-v3-compat"
        if weights_path is not None:
            src = Path(weights_path).expanduser()
            usable = _check_state_dict_file(src)
            self.weights_sha256 = sha256_file(src)
            self.weights_source = str(src)
        else:
            usable = None
            self.weights_sha256 = ""
            self.weights_source = "torch-fidelity download (weights-inception-2015-12-05-6726825d.pth)"
        try:
            self.net = _inception_compat_class()(
                str(self.feature_dim), None if usable is None else str(usable), self.antialias
            ).to(self.device)
        except OSError as e:
            raise EvalInputError(
                f"cannot get the Inception weights ({e}); offline, pass a local file with --inception-weights "
                "(torch-fidelity's weights-inception-2015-12-05-6726825d.pth)"
            ) from e
        finally:
            if usable is not None and weights_path is not None and usable != Path(weights_path).expanduser():
                os.unlink(usable)
        if not self.weights_sha256:
            from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

            cached = Path(torch.hub.get_dir()) / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[-1]
            self.weights_sha256 = sha256_file(cached) if cached.is_file() else "torch-fidelity-6726825d"

    def preprocessing(self) -> dict[str, Any]:
        return {
            "implementation": "torch-fidelity FeatureExtractorInceptionV3 (= torchmetrics FrechetInceptionDistance)",
            "resize": "torch bilinear antialias=True" if self.antialias else "tf1-compatible bilinear (antialias=False)",
            "antialias": self.antialias,
            "size": 299,
            "grey": "repeated to RGB",
        }

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.net(batch.contiguous().to(self.device))


# ------------------------------------------------------------------------------------ clean-fid backend
CLEANFID_FILE = "inception-2015-12-05.pt"


class CleanFIDDetector(Detector):
    """clean-fid's TorchScript Inception (``inception-2015-12-05.pt``) in mode ``"clean"`` or
    ``"legacy_tensorflow"``.  Needs ``pip install 'stepdistill[fid]'``; never downloads: pass the
    TorchScript file (default: clean-fid's own location ``/tmp/inception-2015-12-05.pt``)."""

    channels = 3
    default_batch_size = 32

    def __init__(self, mode: str = "clean", weights_path: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu"):
        if mode not in ("clean", "legacy_tensorflow"):
            raise EvalInputError(f"clean-fid mode must be 'clean' or 'legacy_tensorflow', got {mode!r}")
        try:
            from cleanfid.resize import build_resizer
        except ImportError as e:
            raise EvalInputError(f"the clean-fid detector needs clean-fid, which is not installed: "
                                 f"{_FID_EXTRA_HINT.replace('torch-fidelity', 'clean-fid')}") from e
        path = Path(weights_path).expanduser() if weights_path else Path("/tmp") / CLEANFID_FILE
        if path.is_dir():
            path = path / CLEANFID_FILE
        if not path.is_file():
            raise EvalInputError(
                f"{path}: clean-fid Inception weights not found; download {CLEANFID_FILE} (StyleGAN2-ADA "
                "metrics) once and pass its path with --inception-weights"
            )
        self.mode = mode
        self.feature_spec = "clean-fid torchscript inception pool3"
        self.name = f"clean-fid-{mode}"
        self.fid_name = "FID-clean" if mode == "clean" else "FID-legacy-tf"
        self.device = torch.device(device)
        self.base = torch.jit.load(str(path), map_location=self.device).eval()
        self.weights_sha256 = sha256_file(path)
        self.feature_dim = 2048
        self._resize = build_resizer(mode)

    def preprocessing(self) -> dict[str, Any]:
        return {"implementation": "clean-fid", "mode": self.mode,
                "resize": "PIL bicubic on float, 299" if self.mode == "clean" else "inside the network (TF)"}

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        bs = batch.shape[0]
        if self.mode == "legacy_tensorflow":
            x = batch.to(self.device, torch.float32)
            return self.base(x, return_features=True).view(bs, -1)
        arr = batch.permute(0, 2, 3, 1).numpy()
        x = np.stack([self._resize(a).transpose(2, 0, 1) for a in arr]).astype(np.float32)
        x = (torch.from_numpy(x).to(self.device) - 128) / 128
        return self.base.layers.forward(x).view(bs, -1)


# ----------------------------------------------------------------------------------------------- factory
DETECTOR_NAMES = ("digits", "inception", "clean", "legacy_tensorflow", "t2i")


def get_detector(
    name: str = "digits",
    *,
    weights: str | os.PathLike | None = None,
    antialias: bool = False,
    feature_dim: int = 2048,
    device: str | torch.device = "cpu",
) -> Detector:
    """Build a detector by name.

    * ``"digits"``: ``weights`` = a folder from :func:`train_digits_detector`; default: the cached
      detector, trained on first use (about 10-30 s on 2 CPU cores).
    * ``"inception"``: ``weights`` = a local torch-fidelity Inception ``.pth`` (or ``.safetensors``);
      ``None`` lets torch-fidelity download it (online only).  ``antialias`` as in torchmetrics.
    * ``"clean"`` / ``"legacy_tensorflow"``: clean-fid with a local ``inception-2015-12-05.pt``.
    * ``"t2i"``: the coloured-MNIST attribute judge (``FID-attr``); ``weights`` = its folder
      (default: the shipped ``eval/weights/t2i-attr-v1``).
    """
    if name in ("digits", "digits-classifier"):
        return DigitsDetector.load(weights, device=device) if weights else DigitsDetector.default(device=device)
    if name in ("inception", "inception-v3-compat"):
        return InceptionDetector(weights, feature_dim=feature_dim, antialias=antialias, device=device)
    if name in ("t2i", "t2i-attributes"):
        from .judges import AttributeDetector, default_attribute_detector

        return AttributeDetector.load(weights, device=device) if weights else default_attribute_detector(device=device)
    if name in ("clean", "legacy_tensorflow", "clean-fid"):
        return CleanFIDDetector("clean" if name == "clean-fid" else name, weights, device=device)
    raise EvalInputError(f"unknown detector {name!r}; choose one of {', '.join(DETECTOR_NAMES)}")
