"""Which failures a retry can cure.

A ``PermanentError`` fails the same way on every try: a wrong MD5, an unsafe
or corrupt archive, a forbidden pickle, shards whose content is bad. Settings
that cannot fit the data raise a plain ``ValueError`` (naming the setting),
which counts as permanent too, and so does a run that cannot fit its
device's memory (``training.memory.InsufficientMemoryError``). Everything else may pass on a second try and
is left to the scheduler's retries: a source that cannot be reached or stops
mid-transfer (``SourceUnavailableError``), a failed read of a file that may be
intact (``shards.ShardReadError``), a full disk, a killed worker.

Nothing here imports a scheduler: the DAG's ``retry_policy`` (Airflow's
``ExceptionRetryPolicy``) is built from ``PERMANENT``, ``RETRYABLE`` and
``SETTINGS`` in the order ``is_permanent`` reads them, and fails those errors
without retries.
"""

from __future__ import annotations


class PermanentError(Exception):
    """A failure that repeats on every try with the same inputs; retrying cannot help."""


class MissingInputError(PermanentError, FileNotFoundError):
    """A step's input is not there: the step that makes it has not run with the same params."""


# The params that key each data folder: a step finds another's output only when they agree.
SOURCE_PARAMS = "source_url and source_md5"
SPLIT_PARAMS = "source_url, source_md5, validation_size, split_seed and train_limit"
RUN_PARAMS = "logical date and training params (a run folder of `tasks test` is keyed by both)"


def require_input(path, made_by: str, params: str):
    """``path`` if it exists, else raise ``MissingInputError`` naming it, the step that makes it and the params.

    ``made_by`` is the step's task id (``split``); ``params`` the params that
    must match between the two steps (``SPLIT_PARAMS``...).
    """
    from pathlib import Path

    path = Path(path)
    if not path.exists():
        raise MissingInputError(
            f"{path}: missing; the {made_by} step makes it: run {made_by} first (or the whole DAG) "
            f"with the same {params}"
        )
    return path


class SourceUnavailableError(ConnectionError):
    """The source could not be reached or stopped mid-transfer; a later try may succeed."""


# Read in this order, the first match deciding: permanent, else retryable, else settings (permanent).
PERMANENT = (PermanentError,)  # bad input, bad data
RETRYABLE = (OSError,)  # I/O and network errors, whatever else they also are
SETTINGS = (ValueError,)  # settings that cannot fit the data: permanent unless also an OSError


def is_permanent(error: BaseException) -> bool:
    """True for errors that fail the same way on every try (bad input, bad settings, bad data)."""
    if isinstance(error, PERMANENT):
        return True
    return isinstance(error, SETTINGS) and not isinstance(error, RETRYABLE)
