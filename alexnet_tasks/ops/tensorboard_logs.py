"""TensorBoard's logs wherever the artifacts live: the published runs' ``tensorboard/`` folders, served.

TensorBoard reads a local folder. With a local artifacts root that is
``<root>/published/runs`` itself; with an object-store root the published
runs' logs (``published/runs/<run>/tensorboard/...``) are mirrored into a
local folder first, and again every ``--every`` seconds while TensorBoard
runs, each file fetched only when its object changed::

    python -m alexnet_tasks.ops.tensorboard_logs /tmp/alexnet-logs                 # mirror once, print the folder
    python -m alexnet_tasks.ops.tensorboard_logs /tmp/alexnet-logs --serve -- --port 6006   # mirror and serve

``--airflow`` opens the store with the Airflow connection
``$ALEXNET_ARTIFACTS_CONN_ID`` (the compose TensorBoard service); without it
the library's usual credentials (``AWS_*``). Each run is one TensorBoard run
named by its folder.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from pathlib import Path

from alexnet_tasks.layout import PUBLISHED, RUNS, TENSORBOARD, Layout, artifacts_layout

log = logging.getLogger(__name__)


def mirror(layout: Layout, folder: Path) -> int:
    """Fetch every published run's TensorBoard files from the layout's store into ``folder``; returns the files fetched.

    ``folder/<run>/tensorboard/...`` mirrors ``published/runs/<run>/tensorboard/...``.
    """
    store, prefix = layout.store, f"{PUBLISHED}/{RUNS}"
    names = [name for name in store.list_files(prefix) if f"/{TENSORBOARD}/" in f"/{name}"]
    return len(store.fetch_files(prefix, Path(folder), names))


def log_folder(layout: Layout, folder: Path | None) -> Path:
    """The folder TensorBoard reads: ``<root>/published/runs`` for a local root, else ``folder`` after a mirror."""
    if layout.store is None:
        return layout.root / PUBLISHED / RUNS
    if folder is None:
        raise ValueError(f"{layout.store.location.value}: an object-store root; give the local folder to mirror "
                         "its TensorBoard logs into")
    fetched = mirror(layout, folder)
    log.info("mirrored %d TensorBoard file(s) from %s into %s", fetched, layout.store.url(f"{PUBLISHED}/{RUNS}"), folder)
    return Path(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="-- then TensorBoard's own arguments")
    parser.add_argument("folder", nargs="?", type=Path, help="local folder for the mirrored logs (object-store root)")
    parser.add_argument("--serve", action="store_true", help="run TensorBoard on the logs (arguments after --)")
    parser.add_argument("--every", type=float, default=60.0, help="seconds between mirrors while serving")
    parser.add_argument("--airflow", action="store_true", help="the store's credentials from the Airflow connection")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []  # TensorBoard's own arguments
    arguments = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    layout = artifacts_layout(airflow=arguments.airflow)
    folder = log_folder(layout, arguments.folder)
    if not arguments.serve:
        print(folder)
        return 0
    import signal

    # Stopped (docker stop, a supervisor): TensorBoard is stopped with it, never left running alone.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(folder), *extra])
    try:
        while server.poll() is None:
            time.sleep(arguments.every)
            if layout.store is not None and server.poll() is None:
                try:
                    mirror(layout, folder)
                except OSError as error:  # the store is unreachable for a while: keep serving what is here
                    log.warning("mirror failed (%s); serving what was mirrored", error)
    finally:
        if server.poll() is None:
            server.terminate()
        server.wait()
    return server.returncode


if __name__ == "__main__":
    sys.exit(main())
