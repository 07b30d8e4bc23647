"""``stepdistill eval ...`` / ``python -m stepdistill.eval ...``: FID, CLIP score, class accuracy,
reference statistics and the digits detector; text-to-image evaluation (``t2i``, ``t2i-floors``,
``train-t2i-judges``, ``coco``).

With ``--json`` the LAST line of stdout is one JSON object (``eval fid`` has a top-level ``fid``
and a ``metric`` such as ``FID-digits-N1000``); otherwise a readable table.  Bad input exits with
status 2 and ``error: <message>`` on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import EvalInputError

__all__ = ["add_eval_subparsers", "build_parser", "main", "run_command"]


def _common(p: argparse.ArgumentParser, generation: bool = True, detector: bool = True) -> None:
    g = p.add_argument_group("common")
    if generation:
        g.add_argument("--num-images", "-n", type=int, default=None,
                       help="images to generate / use (required for pipelines; data: first N, default all)")
        g.add_argument("--batch-size", type=int, default=64, help="generation batch size (results do not depend on it)")
        g.add_argument("--seed", type=int, default=0, help="image i uses seed SEED+i")
        g.add_argument("--num-inference-steps", type=int, default=None, help="passed to the pipeline")
        g.add_argument("--class-labels", default=None,
                       help="'uniform' (label i %% num_classes, the default for class-conditional pipelines) or "
                            "a comma-separated list of ints")
        g.add_argument("--num-classes", type=int, default=None, help="classes of a class-conditional pipeline")
    if detector:
        g.add_argument("--detector", default="digits", choices=["digits", "inception", "clean", "legacy_tensorflow", "t2i"],
                       help="feature extractor (digits = the package's digits classifier, NOT Inception)")
        g.add_argument("--detector-weights", default=None,
                       help="digits detector folder (default: the cache, trained on first use)")
        g.add_argument("--inception-weights", default=None,
                       help="local Inception weights: torch-fidelity .pth for 'inception', "
                            "inception-2015-12-05.pt for clean-fid modes")
        g.add_argument("--antialias", action=argparse.BooleanOptionalAction, default=False,
                       help="inception resize: --antialias = torchmetrics>=1.8 default; --no-antialias "
                            "(default) = torch-fidelity TF1-compatible bilinear")
        g.add_argument("--cache-dir", default=None, help="reference statistics cache (default $STEPDISTILL_CACHE/reference)")
        g.add_argument("--no-cache", action="store_true", help="do not read or write cached reference statistics")
    g.add_argument("--device", default="cpu")
    g.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _detector(args: argparse.Namespace):
    from .detectors import get_detector

    weights = args.detector_weights if args.detector in ("digits", "t2i") else args.inception_weights
    return get_detector(args.detector, weights=weights, antialias=args.antialias, device=args.device)


def _labels(args: argparse.Namespace) -> Any:
    v = getattr(args, "class_labels", None)
    if v is None or v == "uniform":
        return v
    try:
        return [int(s) for s in v.split(",") if s.strip()]
    except ValueError as e:
        raise EvalInputError(f"--class-labels must be 'uniform' or comma-separated ints, got {v!r}") from e


def _gen_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if args.num_inference_steps is not None:
        kw["num_inference_steps"] = args.num_inference_steps
    if args.class_labels is not None:
        kw["labels"] = _labels(args)
    if args.num_classes is not None:
        kw["num_classes"] = args.num_classes
    if getattr(args, "prompts", None):
        kw["prompts"] = args.prompts
    return kw


# ------------------------------------------------------------------------------------------ commands
def _cmd_fid(args: argparse.Namespace) -> dict[str, Any]:
    from .metrics import compute_fid

    det = _detector(args)
    res = compute_fid(args.a, args.b, det, args.num_images, args.num_images_b, seed=args.seed,
                      batch_size=args.batch_size, cache=not args.no_cache, cache_dir=args.cache_dir,
                      progress=not args.no_progress, **_gen_kwargs(args))
    out = res.to_dict()
    out = {"metric": out.pop("metric"), "fid": out.pop("fid"), **out}
    return out


def _cmd_stats(args: argparse.Namespace) -> dict[str, Any]:
    from .metrics import compute_stats

    det = _detector(args)
    st = compute_stats(args.source, det, args.num_images, seed=args.seed, batch_size=args.batch_size,
                       cache=not args.no_cache, cache_dir=args.cache_dir, progress=not args.no_progress,
                       **_gen_kwargs(args))
    meta = {k: v for k, v in st.metadata.items() if k not in ("cache_file", "cache_hit")}
    meta.setdefault("detector", det.cache_key())
    meta.setdefault("source", str(args.source))
    st.metadata = meta
    st.save(args.output)
    return {"output": str(args.output), "n": st.n, "feature_dim": st.dim, "detector": det.name,
            "detector_id": det.id, "source": str(args.source)}


def _cmd_accuracy(args: argparse.Namespace) -> dict[str, Any]:
    from .metrics import evaluate_class_accuracy

    if args.detector != "digits":
        raise EvalInputError("class accuracy needs --detector digits (a classifier)")
    det = _detector(args)
    kw = _gen_kwargs(args)
    labels = kw.pop("labels", "uniform")
    nc = kw.pop("num_classes", det.num_classes)
    res = evaluate_class_accuracy(args.source, args.num_images, det, seed=args.seed, batch_size=args.batch_size,
                                  labels=labels, num_classes=nc, progress=not args.no_progress, **kw)
    return {"metric": "class_accuracy", **res}


def _cmd_clip(args: argparse.Namespace) -> dict[str, Any]:
    from .clip_score import evaluate_clip_score

    kw = {}
    if args.num_inference_steps is not None:
        kw["num_inference_steps"] = args.num_inference_steps
    return {"metric": "clip_score", **evaluate_clip_score(
        args.source, args.prompts, args.clip_model, args.num_images, prefix=args.prefix, seed=args.seed,
        batch_size=args.batch_size, progress=not args.no_progress, device=args.device, **kw)}


def _cmd_train_detector(args: argparse.Namespace) -> dict[str, Any]:
    from .detectors import default_digits_detector_dir, train_digits_detector

    if args.dataset != "digits":
        raise EvalInputError(f"--dataset must be 'digits' (the only embedded dataset), got {args.dataset!r}")
    out = Path(args.output) if args.output else default_digits_detector_dir()
    info = train_digits_detector(out, steps=args.steps, seed=args.seed, split=args.train_split,
                                 eval_split=args.eval_split, progress=not args.no_progress)
    res = {"output": str(out), "sha256": info["sha256"], "train_split": args.train_split,
           "steps": args.steps, "train_seconds": info["train"]["seconds"],
           "train_accuracy": info["train"]["train_accuracy"]}
    if info.get("eval"):
        res["eval_split"] = info["eval"]["split"]
        res["eval_accuracy"] = info["eval"]["accuracy"]
    return res


def _cmd_sample(args: argparse.Namespace) -> dict[str, Any]:
    from .generate import iter_sample_pipeline, save_images

    if args.num_images is None:
        raise EvalInputError("eval sample needs --num-images")
    kw = _gen_kwargs(args)
    i = 0
    for x, lab, _ in iter_sample_pipeline(args.source, args.num_images, seed=args.seed, batch_size=args.batch_size,
                                          class_labels=kw.pop("labels", None), prompts=kw.pop("prompts", None),
                                          num_classes=kw.pop("num_classes", None), progress=not args.no_progress,
                                          device=args.device, **kw):
        save_images(args.output, x, lab, start_index=i)
        i += x.shape[0]
    return {"output": str(args.output), "n": i, "seed": args.seed}


def _seeds(text: str) -> list[int]:
    try:
        out = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError as e:
        raise EvalInputError(f"--seeds must be comma-separated ints such as 0,1,2, got {text!r}") from e
    if not out:
        raise EvalInputError("--seeds is empty; pass e.g. --seeds 0,1,2")
    return out


def _clip_arg(v: str | None) -> Any:
    if v is None:
        return None
    return False if v.lower() == "none" else v


def _cmd_t2i(args: argparse.Namespace) -> dict[str, Any]:
    from .t2i import evaluate_t2i

    res = evaluate_t2i(args.source, args.prompts, num_images=args.num_images, seeds=_seeds(args.seeds),
                       num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                       scheduler=args.scheduler, reference=args.reference, attr_judge=args.attr_judge,
                       clip_model=_clip_arg(args.clip_model), batch_size=args.batch_size, device=args.device,
                       progress=not args.no_progress, require_captions=not args.free_prompts)
    return res


def _cmd_t2i_floors(args: argparse.Namespace) -> dict[str, Any]:
    from .t2i import t2i_floors

    return {"metric": f"FID-attr-N{args.num_images} floors",
            **t2i_floors(args.vae, seeds=_seeds(args.seeds), num_images=args.num_images, attr_judge=args.attr_judge,
                         device=args.device)}


def _cmd_train_t2i_judges(args: argparse.Namespace) -> dict[str, Any]:
    from .judges import train_judges

    r = train_judges(args.output, attr_steps=args.attr_steps, clip_steps=args.clip_steps,
                     progress=not args.no_progress)
    return {"output": str(args.output),
            "attributes": {"sha256": r["attributes"]["sha256"], "seconds": r["attributes"]["train"]["seconds"],
                           **{k: v for k, v in r["attributes"]["eval"].items() if k.endswith("accuracy")}},
            "clip": {"sha256": r["clip"]["sha256"], "seconds": r["clip"]["train"]["seconds"],
                     **{k: v for k, v in r["clip"]["eval"].items() if k not in ("data", "n")}}}


def _cmd_coco(args: argparse.Namespace) -> dict[str, Any]:
    from .coco import evaluate_coco

    return evaluate_coco(args.source, root=args.coco_root, prompts=args.prompts, reference=args.reference,
                         inception_weights=args.inception_weights, clip_model=args.clip_model,
                         num_images=args.num_images, seeds=_seeds(args.seeds),
                         num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                         scheduler=args.scheduler, batch_size=args.batch_size, device=args.device,
                         progress=not args.no_progress, clip_prefix=args.clip_prefix,
                         feature_dim=args.feature_dim)


def _add_commands(sub: argparse._SubParsersAction) -> None:
    _add_image_commands(sub)
    _add_t2i_commands(sub)


def _add_image_commands(sub: argparse._SubParsersAction) -> None:
    """fid, clip, train-detector, stats, accuracy, sample."""
    p = sub.add_parser("fid", help="FID between two sources",
                       description="FID between A (usually generated) and B (usually the reference). A source is a "
                                   "dataset name (digits, digits-a, digits-b), an image folder, an .npz (images or "
                                   "mu/sigma), or a diffusers pipeline folder.")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--num-images-b", type=int, default=None, help="images of B (default: all data / --num-images)")
    p.add_argument("--prompts", default=None, help="prompts file for text-to-image pipelines")
    _common(p)
    p.set_defaults(_eval_handler=_cmd_fid)

    p = sub.add_parser("clip", help="CLIP score of a text-to-image pipeline or image folder")
    p.add_argument("source", metavar="PIPE_OR_FOLDER")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--clip-model", required=True, help="local CLIP folder (or hub id when cached)")
    p.add_argument("--prefix", default="", help="text prefix, e.g. 'A photo depicts ' (GigaGAN protocol)")
    _common(p, detector=False)
    p.set_defaults(_eval_handler=_cmd_clip)

    p = sub.add_parser("train-detector", help="train the digits classifier used as FID detector")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--output", default=None, help="folder (default: the cache, $STEPDISTILL_CACHE/detectors/digits-v1)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-split", default="train", choices=["train", "a", "b"])
    p.add_argument("--eval-split", default=None, choices=["train", "a", "b"],
                   help="report accuracy on this split (use --train-split a --eval-split b for held-out accuracy)")
    _common(p, generation=False, detector=False)
    p.set_defaults(_eval_handler=_cmd_train_detector)

    p = sub.add_parser("stats", help="compute and save feature statistics (.npz with mu, sigma, n, metadata)")
    p.add_argument("source", metavar="SRC")
    p.add_argument("--output", "-o", required=True, help="output .npz")
    p.add_argument("--prompts", default=None, help="prompts file for text-to-image pipelines")
    _common(p)
    p.set_defaults(_eval_handler=_cmd_stats)

    p = sub.add_parser("accuracy", help="class accuracy of generated images under the digits classifier")
    p.add_argument("source", metavar="PIPE_OR_FOLDER")
    _common(p)
    p.set_defaults(_eval_handler=_cmd_accuracy)

    p = sub.add_parser("sample", help="sample a pipeline into a PNG folder (generation separate from scoring)")
    p.add_argument("source", metavar="PIPE")
    p.add_argument("--output", "-o", required=True, help="output folder")
    p.add_argument("--prompts", default=None, help="prompts file for text-to-image pipelines")
    _common(p, detector=False)
    p.set_defaults(_eval_handler=_cmd_sample)

    # ---- text-to-image


def _add_t2i_commands(sub: argparse._SubParsersAction) -> None:
    """t2i, t2i-floors, train-t2i-judges, coco."""
    def _t2i_gen(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("text-to-image generation")
        g.add_argument("--num-images", "-n", type=int, default=None, help="images per seed (default: one per prompt)")
        g.add_argument("--seeds", default="0,1,2", help="evaluation seeds (mean and std over them); image i of seed s "
                                                        "uses torch seed 1000000*s+i")
        g.add_argument("--num-inference-steps", type=int, default=None)
        g.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (pipeline default)")
        g.add_argument("--scheduler", default=None,
                       help="stock scheduler from the pipeline's config: ddim, dpm++, euler, euler-a, ddpm, pndm, lcm")
        g.add_argument("--batch-size", type=int, default=100, help="generation batch size (results do not depend on it)")
        g.add_argument("--device", default="cpu")
        g.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
        g.add_argument("--no-progress", action="store_true", help="hide progress bars")

    p = sub.add_parser("t2i", help="FID-attr, CLIP score and prompt accuracy of a text-to-image pipeline "
                                   "(coloured-MNIST judges)",
                       description="Sample a StableDiffusionPipeline-compatible folder over a prompt file (default: "
                                   "the shipped 1,000 coloured-MNIST evaluation prompts) under several evaluation "
                                   "seeds; report FID in the attribute judge's features, the CLIP judge's score and "
                                   "prompt accuracy, each with its std over the seeds.")
    p.add_argument("source", metavar="PIPE")
    p.add_argument("--prompts", default=None, help="prompt file, one per line (default: eval_1000.txt)")
    p.add_argument("--reference", default=None, help="reference statistics .npz in the judge's features, or "
                                                     "'vae': the held-out digits through the pipeline's own VAE "
                                                     "(default: held-out coloured digits)")
    p.add_argument("--attr-judge", default=None, help="attribute judge folder (default: eval/weights/t2i-attr-v1)")
    p.add_argument("--clip-model", default=None, help="CLIP folder (default: eval/weights/t2i-clip-v1); 'none' skips")
    p.add_argument("--free-prompts", action="store_true",
                   help="accept prompts that are not coloured-MNIST captions (prompt accuracy is skipped)")
    _t2i_gen(p)
    p.set_defaults(_eval_handler=_cmd_t2i)

    p = sub.add_parser("t2i-floors", help="data-vs-data and VAE-reconstruction FID-attr floors")
    p.add_argument("--vae", default=None, help="pipeline folder (its vae/) or AutoencoderKL folder")
    p.add_argument("--num-images", "-n", type=int, default=1000)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--attr-judge", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(_eval_handler=_cmd_t2i_floors)

    p = sub.add_parser("train-t2i-judges", help="train the coloured-MNIST judges (attribute CNN + small CLIP)")
    p.add_argument("--output", required=True, help="folder; the judges go to OUTPUT/t2i-attr-v1 and OUTPUT/t2i-clip-v1 "
                                                   "(the shipped ones: eval/weights)")
    p.add_argument("--attr-steps", type=int, default=1500)
    p.add_argument("--clip-steps", type=int, default=2000)
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(_eval_handler=_cmd_train_t2i_judges)

    p = sub.add_parser("coco", help="COCO-2014 protocol from local files: Inception FID + CLIP score",
                       description="Zero-shot COCO-2014 evaluation from local files only (see docs/text_to_image.md "
                                   "for the layout): --coco-root DIR with prompts_30k.txt, reference/ or "
                                   "reference_stats.npz, inception/ and clip/; each can be given explicitly.")
    p.add_argument("source", metavar="PIPE")
    p.add_argument("--coco-root", default=None, help="folder in the documented layout")
    p.add_argument("--prompts", default=None, help="captions file, one per line (default ROOT/prompts_30k.txt)")
    p.add_argument("--reference", default=None, help="reference image folder or Inception statistics .npz")
    p.add_argument("--inception-weights", default=None, help="torch-fidelity weights-inception-2015-12-05-6726825d.pth file")
    p.add_argument("--clip-model", default=None, help="local CLIP folder (CLIPModel.save_pretrained)")
    p.add_argument("--clip-prefix", default="", help="text prefix for the CLIP score, e.g. 'A photo depicts '")
    p.add_argument("--feature-dim", type=int, default=2048, help="Inception feature (2048 = pool3, the standard)")
    _t2i_gen(p)
    p.set_defaults(_eval_handler=_cmd_coco)


# ----------------------------------------------------------------------------------------------- output


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if math.isfinite(v) else str(v)
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    return str(v)


def _print_table(res: dict[str, Any], file=None) -> None:
    file = file or sys.stdout
    keys = [k for k in res if not isinstance(res[k], dict) or k in ("per_class_accuracy",)]
    w = max((len(k) for k in keys), default=0)
    for k in keys:
        print(f"{k:<{w}}  {_fmt(res[k])}", file=file)
    det = res.get("detector")
    if isinstance(det, dict):
        print(f"{'detector_id':<{w}}  {det.get('id', '')}", file=file)


def _jsonable(o: Any) -> Any:
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if hasattr(o, "item") and callable(o.item):
        try:
            return o.item()
        except (ValueError, RuntimeError):
            return str(o)
    if isinstance(o, (str, int, float, bool)) or o is None:
        return o
    return str(o)


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed ``eval`` command; returns the exit status (0 ok, 2 bad input)."""
    handler: Callable[[argparse.Namespace], dict[str, Any]] = args._eval_handler
    try:
        res = handler(args)
    except EvalInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        sys.stdout.flush()
        print(json.dumps(_jsonable(res), sort_keys=False))
    else:
        _print_table(res)
    sys.stdout.flush()
    return 0


def add_eval_subparsers(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``eval`` (with sub-commands fid, clip, train-detector, stats, accuracy, sample) on an
    argparse sub-parsers object.  Parsed namespaces get ``func`` = :func:`run_command`, so the host CLI
    does ``args = parser.parse_args(); sys.exit(args.func(args))``."""
    p = subparsers.add_parser("eval", help="evaluation: FID, CLIP score, class accuracy",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="eval_command", metavar="COMMAND", required=True)
    _add_commands(sub)
    p.set_defaults(func=run_command)
    return p


def build_parser(prog: str = "python -m stepdistill.eval") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="eval_command", metavar="COMMAND", required=True)
    _add_commands(sub)
    parser.set_defaults(func=run_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..errors import run_reporting  # one error line and its exit code, as `stepdistill` prints them

    args = build_parser().parse_args(argv)
    return run_reporting(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
