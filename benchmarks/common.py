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


def proc_status_bytes(key: str) -> int:
    """A memory line of this process's ``/proc/self/status`` in bytes (``VmRSS``: resident now,
    ``VmHWM``: peak resident since start or the last :func:`reset_peak_rss`); 0 where there is none."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> bool:
    """Set ``VmHWM`` to the current RSS (``/proc/self/clear_refs`` = 5); False where the kernel
    refuses (the peak then counts from process start: say so in the row)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
