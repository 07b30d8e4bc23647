"""``accelerate launch -m stepdistill.train <preset-or-yaml> [key=value ...] [--no-export]``

The distributed entry point: every process runs this module; the trainer averages gradients
across processes and only the main process writes checkpoints, logs and the export.  Launch forms
that work:

    accelerate launch --multi_gpu --num_processes 2 -m stepdistill.train digits/dmd2
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m stepdistill.train analytic/dmd2

(the second runs 2 CPU processes with gloo; ``--cpu --num_processes 2`` starts only one process).
An FSDP launch (or ``train.sharding=fsdp2``) shards each trainable group with FSDP2; DeepSpeed
launches are refused.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from .cli import main as cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    return cli_main(["train", *argv])


if __name__ == "__main__":
    sys.exit(main())
