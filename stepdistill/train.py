"""``accelerate launch -m stepdistill.train <preset-or-yaml> [key=value ...]``

The distributed entry point: every process runs this module; the training loop averages
gradients across processes and only the main process writes checkpoints, logs and the export.
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
