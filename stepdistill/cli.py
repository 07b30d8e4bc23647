"""The ``stepdistill`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

EPILOG = textwrap.dedent(
    """\
    examples:
      stepdistill demo                                   # embedded end-to-end job (digits)
      stepdistill teacher train --preset digits --output runs/teacher train.max_steps=30
      stepdistill train digits/dmd2 train.max_steps=200 train.output_dir=runs/dmd2
      accelerate launch --multi_gpu --num_processes 2 -m stepdistill.train digits/dmd2
      ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m stepdistill.train analytic/dmd2
      stepdistill sample runs/dmd2/pipeline --num-images 16 --output grid.png
      stepdistill export runs/dmd2 --output my-pipeline
      stepdistill eval fid runs/dmd2/pipeline digits --json
      stepdistill plan sdxl/dmd2_4step --gpus 64 --gpu-memory 80GB  # memory per GPU, fits?, which lever
      stepdistill presets

    Overrides are dotted key=value pairs applied to the preset (YAML values), before or after options:
      train.max_steps=200  algorithm.params.gan_weight=0.003  teacher.guidance_scale=1.75
    The second launch form runs 2 CPU processes (gloo); an FSDP launch or train.sharding=fsdp2 shards the
    trainable groups with FSDP2; DeepSpeed launches are refused.
    """
)


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. train.max_steps=200")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stepdistill",
        description="Distil multi-step image generators into one-step diffusers pipelines.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="embedded end-to-end job: teacher -> DMD2 -> export -> FID report + grid",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="runs/demo", help="run folder (default: runs/demo)")
    p.add_argument("--preset", default="digits/dmd2", help="distillation preset (default: digits/dmd2)")
    p.add_argument("--num-images", type=int, default=1000, help="images for the FID report (default: 1000)")
    p.add_argument("--teacher", default=None, help="teacher pipeline folder (default: the cached embedded teacher)")
    _add_overrides(p)

    p = sub.add_parser("teacher", help="teacher utilities")
    tsub = p.add_subparsers(dest="teacher_command", metavar="SUBCOMMAND")
    pt = tsub.add_parser("train", help="train an embedded teacher from a preset and save a diffusers pipeline",
                         epilog="example: stepdistill teacher train --preset digits --output runs/teacher train.max_steps=30",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    pt.add_argument("--preset", default="digits", help="teacher preset name or YAML file (default: digits)")
    pt.add_argument("--output", required=True, help="output folder; the pipeline lands in OUTPUT/pipeline")
    _add_overrides(pt)

    p = sub.add_parser("train", help="distil a teacher with an algorithm preset (also: accelerate launch -m stepdistill.train)",
                       epilog="example: stepdistill train digits/dmd2 train.max_steps=200 train.output_dir=runs/x",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="preset name (e.g. digits/dmd2) or YAML file")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-export", action="store_true", help="skip exporting the pipeline at the end")
    _add_overrides(p)

    p = sub.add_parser("sample", help="sample images from a pipeline folder into a PNG grid or a folder")
    p.add_argument("pipeline", help="diffusers pipeline folder")
    p.add_argument("--num-images", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the pipeline's)")
    p.add_argument("--class-labels", default=None, help="comma-separated class ids (default: 0,1,2,... cycling)")
    p.add_argument("--prompt", default=None, help="prompt for text-to-image pipelines")
    p.add_argument("--output", default="samples.png", help="a .png grid path or a folder for one PNG per image")

    p = sub.add_parser("export", help="export a training run (latest checkpoint) as a diffusers pipeline")
    p.add_argument("run", help="run folder written by `stepdistill train`")
    p.add_argument("--output", required=True, help="pipeline output folder")
    p.add_argument("--checkpoint", default="latest", help="checkpoint folder or 'latest'")
    p.add_argument("--no-ema", action="store_true", help="export raw weights even if an EMA exists")
    p.add_argument("--lora", choices=["adapter", "fused", "both"], default="auto",
                   help="LoRA students: only the LoRA weights (adapter), only the fused pipeline (fused), or both "
                        "(the default for a LoRA student)")
    p.add_argument("--overwrite", action="store_true")

    sub.add_parser("presets", help="list the bundled YAML presets")

    from .compare import add_parser as add_compare_parser

    add_compare_parser(sub)  # stepdistill compare TEACHER PRESET... --output DIR

    from .plan import add_parser as add_plan_parser

    add_plan_parser(sub)  # stepdistill plan CONFIG --gpus N --gpu-memory 80GB [--json]

    try:
        from .eval.cli import add_eval_subparsers
    except ImportError:  # pragma: no cover - eval is part of the package
        add_eval_subparsers = None
    if add_eval_subparsers is not None:
        add_eval_subparsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError

    parser = build_parser()
    args = _parse(parser, argv)
    if args.command is None:
        parser.print_help()
        return 0
    from .errors import InputNotFoundError, report, run_reporting

    def dispatch() -> int:
        try:
            return _dispatch(parser, args)
        except (FileNotFoundError, NotADirectoryError) as e:  # a path the user typed (stdlib error)
            if isinstance(e, ConfigError):
                raise
            raise InputNotFoundError(str(e)) from e

    try:
        return run_reporting(dispatch)
    except ValueError as e:  # a library's own ValueError subclass (e.g. a diffusers config error)
        if type(e) is not ValueError and type(e).__name__.endswith("Error"):
            return report(e)
        raise


def _class_labels(text: str | None) -> list[int] | None:
    """``--class-labels 0,3,9`` as ints; anything else is refused naming the option."""
    if not text:
        return None
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        from .errors import InputError

        raise InputError(f"--class-labels must be comma-separated class ids such as 0,3,9, got {text!r}") from None


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse with options and ``key=value`` overrides in any order (argparse alone stops filling
    the overrides positional at the first option)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if isinstance(getattr(args, "overrides", None), list) and all(_is_override(a) for a in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _close_process_group() -> None:
    from .training.distributed import close_process_group

    close_process_group()


def _is_override(arg: str) -> bool:
    return "=" in arg and not arg.startswith("-")


def _dispatch(parser, args) -> int:
    from .config import list_presets, load_config, save_config, to_dict

    if args.command == "compare":
        from .compare import run_from_args

        return run_from_args(args)
    if args.command == "plan":
        from .plan import run_from_args as run_plan

        return run_plan(args)
    if args.command == "presets":
        for name in list_presets():
            print(name)
        return 0
    if args.command == "teacher":
        if args.teacher_command != "train":
            parser.parse_args(["teacher", "--help"])
            return 2
        from .run import train_teacher

        cfg = load_config(_teacher_preset(args.preset), args.overrides)
        out = train_teacher(cfg, args.output)
        print(f"teacher pipeline written to {out}")
        _close_process_group()
        return 0
    if args.command == "train":
        from .run import validate_algorithm

        cfg = load_config(args.config, args.overrides)
        validate_algorithm(cfg)
        if args.dry_run:
            import yaml

            print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            return 0
        from .run import run_distillation

        result = run_distillation(cfg, export=not args.no_export)
        if result["accelerator"].is_main_process:
            save_config(cfg, Path(cfg.train.output_dir) / "config.yaml")
            if "pipeline" in result:
                print(f"pipeline written to {result['pipeline']}")
        _close_process_group()
        return 0
    if args.command == "sample":
        from .sampling import sample_to_path

        labels = _class_labels(args.class_labels)
        path = sample_to_path(args.pipeline, args.output, num_images=args.num_images, seed=args.seed,
                              steps=args.steps, class_labels=labels, prompt=args.prompt)
        print(f"wrote {path}")
        return 0
    if args.command == "export":
        from .run import export_run

        out = export_run(args.run, args.output, checkpoint=args.checkpoint, use_ema=not args.no_ema,
                         overwrite=args.overwrite, lora=args.lora)
        print(f"pipeline written to {out}")
        return 0
    if args.command == "demo":
        from .demo import run_demo

        report = run_demo(args.output, preset=args.preset, overrides=args.overrides, num_images=args.num_images,
                          teacher=args.teacher)
        print(json.dumps(report))
        return 0
    if args.command == "eval":
        return args.func(args)
    parser.print_help()
    return 2


def _teacher_preset(name: str) -> str:
    """`digits` means the teacher preset of the digits family (configs/digits/teacher.yaml)."""
    if "/" not in name and not name.endswith((".yaml", ".yml")):
        return f"{name}/teacher"
    return name


if __name__ == "__main__":
    sys.exit(main())
