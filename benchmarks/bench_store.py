#!/usr/bin/env python3
"""What an object-store artifacts root costs: one pipeline run on a local folder against the same run on S3.

In one process, on the benchmark archive (the real CIFAR-10 from
``../shared/cifar10`` when present), ``image_size`` 67, ``--epochs`` epochs
(default 1), the fast recipe, every step through the DAG's own step functions
(``alexnet_tasks.dag_tasks``: the code a task runs, without Airflow):

* ``local``: a fresh local artifacts folder;
* ``store, first host``: a fresh bucket and cache: the data steps build and
  put everything on the store, training commits each epoch there;
* ``store, second host``: the same bucket, a new empty cache and a new run
  id: the data is fetched, not built (what every run on a host that did not
  build the data pays).

The S3 server is the tests' (moto, tests/s3_server.py) on 127.0.0.1, so the
figures are the pipeline's own transfers and checks on a local network, not a
cloud's latency; a WSGI wrapper counts the bytes each request uploads and
each response downloads. Per step: seconds in each variant and the store's
overhead against local (seconds, percent of the local run), bytes up and
down. Results go to ``benchmarks/results/store.json``; name the CPU with the
figures (``lscpu``), as every benchmark here does.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import REPO, machine, real_or_synthetic_archive, save, table

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

STEPS = ("download", "split", "build_shards", "train", "evaluate", "gate", "publish")


class Counter:
    """Bytes uploaded (request bodies) and bytes the server wrote back to its clients, and requests.

    Downloads are counted where the server writes to the socket, not where
    the application yields them: a client that reads only a response's
    headers and closes the connection (s3fs opens a GET to learn an
    object's size, then fetches ranges) is not charged the whole body.
    """

    def __init__(self, application):
        self.application, self.lock = application, threading.Lock()
        self.up = self.down = self.requests = 0

    def __call__(self, environ, start_response):
        with self.lock:
            self.up += int(environ.get("CONTENT_LENGTH") or 0)
            self.requests += 1
        return self.application(environ, start_response)

    def wrote(self, count: int) -> None:
        with self.lock:
            self.down += count

    def snapshot(self) -> tuple[int, int, int]:
        with self.lock:
            return self.up, self.down, self.requests


def start_server() -> tuple[str, Counter, object]:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    counter = Counter(DomainDispatcherApplication(create_backend_app))

    class CountingWriter:
        def __init__(self, stream):
            self.stream = stream

        def write(self, data):
            written = self.stream.write(data)
            counter.wrote(len(data) if written is None else written)
            return written

        def __getattr__(self, name):
            return getattr(self.stream, name)

    class CountingHandler(MotoRequestHandler):
        def setup(self):
            super().setup()
            self.wfile = CountingWriter(self.wfile)

    server = make_server("127.0.0.1", 0, counter, threaded=False, request_handler=CountingHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", counter, server


def run_pipeline(config, layout, run_id: str, counter: Counter | None) -> dict:
    """Every step of one run through dag_tasks' step functions; per step: seconds, bytes up and down."""
    from alexnet_tasks import dag_tasks

    class Events(dict):
        def __getitem__(self, key):
            return self.setdefault(key, type("Event", (), {"extra": None})())

    steps = {
        "download": lambda: dag_tasks.download_step(config, layout),
        "split": lambda: dag_tasks.split_step(config, layout),
        "build_shards": lambda: dag_tasks.build_shards_step(config, layout),
        "train": lambda: dag_tasks.train_step(config, layout, run_id),
        "evaluate": lambda: dag_tasks.evaluate_step(config, layout, run_id),
        "gate": lambda: dag_tasks.gate_step(config, layout, run_id),
        "publish": lambda: dag_tasks.publish_step(config, layout, run_id, Events(), "model"),
    }
    figures = {}
    for name in STEPS:
        before = counter.snapshot() if counter else (0, 0, 0)
        started = time.perf_counter()
        steps[name]()
        seconds = time.perf_counter() - started
        after = counter.snapshot() if counter else (0, 0, 0)
        figures[name] = {"seconds": round(seconds, 2), "bytes_up": after[0] - before[0],
                         "bytes_down": after[1] - before[1], "requests": after[2] - before[2]}
        print(f"  {name:<13} {seconds:8.1f} s  up {figures[name]['bytes_up'] / 1e6:9.1f} MB  "
              f"down {figures[name]['bytes_down'] / 1e6:9.1f} MB", flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-limit", type=int, default=None, help="train on this many images (default all)")
    arguments = parser.parse_args()

    import boto3

    from alexnet_tasks.config import PipelineConfig
    from alexnet_tasks.layout import Layout
    from alexnet_tasks.store import ObjectStore, parse_location, store_cache

    archive, md5, kind = real_or_synthetic_archive()
    config = PipelineConfig.from_dict({
        "source_url": archive.as_uri(), "source_md5": md5, "image_size": 67, "epochs": arguments.epochs,
        "train_limit": arguments.train_limit, "publish_mode": "always"})
    endpoint, counter, server = start_server()
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")
    boto3.client("s3").create_bucket(Bucket="bench")
    location = parse_location("s3://bench/artifacts")
    work = Path(tempfile.mkdtemp(prefix="alexnet-bench-store-"))
    results = {}
    try:
        print(f"local ({kind} archive)", flush=True)
        results["local"] = run_pipeline(config, Layout(work / "local"), "bench__local", None)
        for variant, cache in (("store, first host", "cache-one"), ("store, second host", "cache-two")):
            print(variant, flush=True)
            os.environ["ALEXNET_CACHE"] = str(work / cache)
            layout = Layout(store_cache(location), ObjectStore(location))
            results[variant] = run_pipeline(config, layout, f"bench__{cache}", counter)
    finally:
        server.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    local_total = sum(step["seconds"] for step in results["local"].values())
    rows, summary = [], {}
    for variant in ("store, first host", "store, second host"):
        total = sum(step["seconds"] for step in results[variant].values())
        up = sum(step["bytes_up"] for step in results[variant].values())
        down = sum(step["bytes_down"] for step in results[variant].values())
        summary[variant] = {"seconds": round(total, 2), "overhead_seconds": round(total - local_total, 2),
                            "overhead_percent": round(100 * (total - local_total) / local_total, 1),
                            "bytes_up": up, "bytes_down": down}
        for name in STEPS:
            step, base = results[variant][name], results["local"][name]
            rows.append([variant, name, base["seconds"], step["seconds"], round(step["seconds"] - base["seconds"], 2),
                         round(step["bytes_up"] / 1e6, 1), round(step["bytes_down"] / 1e6, 1)])
        rows.append([variant, "total", round(local_total, 2), round(total, 2), round(total - local_total, 2),
                     round(up / 1e6, 1), round(down / 1e6, 1)])
    print(table(f"One run, image_size 67, {arguments.epochs} epoch(s), {kind} archive: local folder against S3 "
                f"(moto on 127.0.0.1)", ["variant", "step", "local s", "store s", "overhead s", "up MB", "down MB"],
                rows))
    for variant, figures in summary.items():
        print(f"{variant}: {figures['overhead_seconds']:+.1f} s ({figures['overhead_percent']:+.1f} % of the local "
              f"run's {local_total:.1f} s), {figures['bytes_up'] / 1e6:.1f} MB up, {figures['bytes_down'] / 1e6:.1f} MB down")
    save("store", {"archive": kind, "epochs": arguments.epochs, "train_limit": arguments.train_limit,
                   "machine": machine(), "steps": results,
                   "summary": summary, "local_seconds": round(local_total, 2)})


if __name__ == "__main__":
    main()
