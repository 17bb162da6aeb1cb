"""Worker identity for Airflow's ``[core] hostname_callable``.

Several Celery workers on one host (the native cluster) would all record the
same host name on the task instances they run. Each worker sets
``ALEXNET_WORKER_NAME``; task instances then record which worker ran them.
Without it, this is the machine's fully qualified name, as Airflow's default.
"""

from __future__ import annotations

import os
import socket


def hostname() -> str:
    return os.environ.get("ALEXNET_WORKER_NAME") or socket.getfqdn()
