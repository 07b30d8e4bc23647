"""Errors raised by the evaluation harness."""

from __future__ import annotations

from stepdistill.errors import InputError


class EvalInputError(InputError):
    """Bad evaluation input (a file, folder, dataset name or setting).

    The message names the offending file or value and says how to fix it.  The CLI prints it as
    ``error: <message>`` on stderr and exits with status 2.
    """
