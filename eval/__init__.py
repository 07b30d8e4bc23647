"""stepdistill.eval: FID / CLIP score / class-accuracy harness (installed from the top-level ``eval/``).

Quick use::

    from stepdistill.eval import get_detector, compute_fid, evaluate_class_accuracy
    det = get_detector("digits")                       # trained on first use, cached
    res = compute_fid(generate_fn, "digits", det, num_images=1000, num_classes=10)
    print(res.metric, res.fid)                         # FID-digits-N1000 ...
"""

from .detectors import (
    CleanFIDDetector,
    Detector,
    DigitsDetector,
    InceptionDetector,
    get_detector,
    train_digits_detector,
)
from .errors import EvalInputError
from .fid import FeatureStats, frechet_distance
from .generate import generate_images, quantize, sample_pipeline, save_images, uniform_labels
from .metrics import (
    FIDResult,
    class_accuracy,
    compute_fid,
    compute_stats,
    evaluate_class_accuracy,
    evaluate_generator,
)
from .reference import reference_stats

__all__ = [
    "CleanFIDDetector",
    "Detector",
    "DigitsDetector",
    "EvalInputError",
    "FIDResult",
    "FeatureStats",
    "InceptionDetector",
    "class_accuracy",
    "compute_fid",
    "compute_stats",
    "evaluate_class_accuracy",
    "evaluate_generator",
    "frechet_distance",
    "generate_images",
    "get_detector",
    "quantize",
    "reference_stats",
    "sample_pipeline",
    "save_images",
    "train_digits_detector",
    "uniform_labels",
]
