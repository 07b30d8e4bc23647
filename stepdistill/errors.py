"""The errors stepdistill raises on purpose, and how the command line reports them.

Every error the package raises deliberately derives from :class:`StepdistillError`.  The
command line (``stepdistill``, ``stepdistill eval``, ``python -m stepdistill.train``) prints such
an error as ONE line on stderr, ``error: <problem>; <fix>``, and exits with the code of its
family; any other exception is a bug and keeps its Python traceback (exit code 1).

====  ===========================  ==========================================================
code  family (base class)          raised for
====  ===========================  ==========================================================
1     (any other exception)        a bug: the traceback is printed
2     :class:`InputError`          bad configuration, override, option value, or input file /
                                   folder / data set / teacher / pipeline / prompt file
3     ``CheckpointError``          a checkpoint is missing, incomplete, corrupt or does not fit
4     :class:`OutputError`         an export / output folder is refused (exists, protected)
5     :class:`TrainingError`       training itself failed (e.g. a non-finite loss)
130   :class:`Interrupted`         Ctrl-C (the run stopped at a safe point; resume hint printed)
====  ===========================  ==========================================================

The classes keep the builtin base they had before (``ValueError``, ``RuntimeError``,
``FileNotFoundError`` ...), so ``except ValueError`` in user code still catches them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

__all__ = [
    "EXIT_BUG",
    "EXIT_INTERRUPTED",
    "StepdistillError",
    "InputError",
    "InputNotFoundError",
    "DataError",
    "DataNotFoundError",
    "OutputError",
    "TrainingError",
    "NonFiniteLossError",
    "Interrupted",
    "one_line",
    "report",
    "run_reporting",
]

EXIT_BUG = 1
EXIT_INTERRUPTED = 130


class StepdistillError(Exception):
    """Base of every error stepdistill raises on purpose; ``exit_code`` is its family's code."""

    exit_code = 1


class InputError(StepdistillError, ValueError):
    """Bad configuration, option value or input (file, folder, data set, teacher, pipeline)."""

    exit_code = 2


class InputNotFoundError(InputError, FileNotFoundError):
    """An input file or folder that does not exist."""


class DataError(InputError):
    """A training / evaluation data set or prompt file that cannot be used as given."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A data folder or prompt file that does not exist."""


class OutputError(StepdistillError, ValueError):
    """An output (export) folder that cannot be written as asked; nothing was changed."""

    exit_code = 4


class TrainingError(StepdistillError, RuntimeError):
    """Training failed for a reason that is not a bug (the message says what to change)."""

    exit_code = 5


class NonFiniteLossError(TrainingError, FloatingPointError):
    """A loss became NaN or infinite."""


class Interrupted(StepdistillError, KeyboardInterrupt):
    """Ctrl-C, after the run stopped at a safe point; the message says how to resume."""

    exit_code = EXIT_INTERRUPTED


def one_line(text: object) -> str:
    """``text`` with its line breaks folded into ``; `` so an error stays one line."""
    parts = [p.strip() for p in str(text).splitlines() if p.strip()]
    return "; ".join(parts) if parts else "(no message)"


def report(e: BaseException, file=None) -> int:
    """Print ``e`` as ``error: <message>`` (or ``interrupted: ...``) and return its exit code."""
    file = sys.stderr if file is None else file
    if isinstance(e, Interrupted):
        print(f"interrupted: {one_line(e)}", file=file, flush=True)
        return EXIT_INTERRUPTED
    if isinstance(e, KeyboardInterrupt):
        print("interrupted: stopped by Ctrl-C before anything was written; run the command again", file=file,
              flush=True)
        return EXIT_INTERRUPTED
    print(f"error: {one_line(e)}", file=file, flush=True)
    return int(getattr(e, "exit_code", EXIT_BUG))


def run_reporting(fn: Callable[[], int]) -> int:
    """Run ``fn()``; a :class:`StepdistillError` or Ctrl-C becomes one printed line and its exit
    code, anything else propagates with its traceback."""
    try:
        return fn()
    except (StepdistillError, KeyboardInterrupt) as e:
        return report(e)
