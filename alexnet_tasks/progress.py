"""The pipeline's progress lines: steps, download bytes, one line per epoch.

``report`` logs each line (it stays in the task log) and, when the
environment names a file in ``ALEXNET_PROGRESS_FILE``, appends it there too,
one line per call, so that a local run (``make run``) can show the progress
on the terminal and keep TensorFlow's and Airflow's own output in its log
file. Appends of one short line are atomic on a local filesystem, so tasks in
several processes may report at once. Nothing here imports more than the
standard library.
"""

from __future__ import annotations

import logging
import os
import time

PROGRESS_FILE_VARIABLE = "ALEXNET_PROGRESS_FILE"

log = logging.getLogger(__name__)


def report(message: str, *args) -> None:
    """Log ``message % args`` at INFO and append it, stamped ``HH:MM:SS``, to ``$ALEXNET_PROGRESS_FILE``.

    Never raises for the progress file: a line that cannot be written is
    logged as a warning and the step goes on.
    """
    text = message % args if args else message
    log.info("%s", text)
    path = os.environ.get(PROGRESS_FILE_VARIABLE)
    if not path:
        return
    try:
        with open(path, "a", encoding="utf-8") as out:
            out.write(f"{time.strftime('%H:%M:%S')}  {text}\n")
    except OSError as error:
        log.warning("could not write the progress line to %s: %s", path, error)
