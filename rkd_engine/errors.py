"""The exception type of user errors: bad configuration, bad data, bad arguments, an unusable run.

The ``rkd`` command line reports a ``UserError`` in one line (exit status ``exit_status``: 2 for a
bad option or input, 1 for a run or checkpoint that cannot be used) and lets every other exception,
which would be a bug in rkd, show its traceback with a hint where to report it. Each subclass also
derives from the built-in type the Python API has always raised for it (``ValueError``,
``RuntimeError``, ``FileNotFoundError``), so ``except ValueError`` in user code keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with what the user gave rkd; its message names the option or file and what was expected."""

    exit_status = 2


class DataError(UserError, ValueError):
    """A data source that cannot be used: a missing, truncated or malformed file, labels out of range."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A data file or folder that does not exist."""


class TrainingDiverged(UserError, RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""

    exit_status = 1
