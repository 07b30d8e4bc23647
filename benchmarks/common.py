"""Helpers shared by the benchmark scripts (run as ``python benchmarks/<name>.py``, so this module
is imported as ``common`` from the scripts' own folder)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def git_commit(path: Path = ROOT, dirty_paths: tuple[str, ...] = ()) -> str:
    """``HEAD``'s sha of the checkout at ``path``, with ``-dirty`` when tracked files differ from
    it (only under ``dirty_paths`` when given), or ``"unknown"`` outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True,
                             check=True).stdout.strip()
        status = ["git", "status", "--porcelain", "--untracked-files=no"]
        if dirty_paths:
            status += ["--", *dirty_paths]
        dirty = subprocess.run(status, cwd=path, capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
