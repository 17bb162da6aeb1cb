"""Which failures a retry can cure.

A ``PermanentError`` fails the same way on every try: a wrong MD5, an unsafe
or corrupt archive, a forbidden pickle, shards whose content is bad. Settings
that cannot fit the data raise a plain ``ValueError`` (naming the setting),
which counts as permanent too, and so does a run that cannot fit its
device's memory (``training.memory.InsufficientMemoryError``). Everything else may pass on a second try and
is left to the scheduler's retries: a source that cannot be reached or stops
mid-transfer (``SourceUnavailableError``), a failed read of a file that may be
intact (``shards.ShardReadError``), a full disk, a killed worker.

Nothing here imports a scheduler: the DAG turns ``is_permanent`` errors into
failures without retries.
"""

from __future__ import annotations


class PermanentError(Exception):
    """A failure that repeats on every try with the same inputs; retrying cannot help."""


class SourceUnavailableError(ConnectionError):
    """The source could not be reached or stopped mid-transfer; a later try may succeed."""


RETRYABLE = (OSError,)  # I/O and network errors, whatever else they also are


def is_permanent(error: BaseException) -> bool:
    """True for errors that fail the same way on every try (bad input, bad settings, bad data)."""
    if isinstance(error, PermanentError):
        return True
    return isinstance(error, ValueError) and not isinstance(error, RETRYABLE)
