#!/usr/bin/env python3
"""The results pages with many published runs: today's plugin against the one before the registry.

Builds ``published/`` with ``--runs`` runs (default 20,000): their index lines
made by the pipeline's own ``registry.index_line`` from one run's metrics and
settings, each run's folder, and one run's files for its page. Then, in one
process and through each plugin's real FastAPI app (Airflow's login check
left out: it costs the same for both), times the list page (the first page,
and a filtered page) and a run page:

* ``registry``: this checkout's ``plugins/alexnet_results.py``, with
  ``published/index.sqlite`` up to date as publish leaves it (its build from
  the whole ``index.jsonl``, what a first read after deleting it costs, is
  timed on its own); ``first`` is the app's first request, then the median of
  ``--repeats`` requests;
* ``before``: the plugin as it was before the registry (``git show
  REF:plugins/alexnet_results.py``, default ``0aef3ec``), which reads and
  renders the whole index on every request.

Results go to ``benchmarks/results/registry.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, machine, save, table

sys.path.insert(0, str(REPO))


def build_published(root: Path, runs: int) -> str:
    """``runs`` index lines and folders under ``root/published``; returns the run id whose page is timed."""
    from alexnet_tasks.config import PipelineConfig
    from alexnet_tasks.layout import CONFIG, HISTORY, INDEX, METRICS, published_path
    from alexnet_tasks.release.registry import index_line

    published = root / "published"
    published.mkdir(parents=True)
    recipes = ("fast", "reference")
    lines, measured = [], None
    for number in range(runs):
        run_id = f"scheduled__2026-11-29T02:00:00+00:00-{number:05d}"  # one id per run, Airflow's characters
        config = PipelineConfig(recipe=recipes[number % 2], image_size=67, epochs=15)
        metrics = {"test_accuracy": 0.5 + (number % 300) / 1000, "test_loss": 1.2, "fingerprint": f"{number:064x}",
                   "truncated": False, "epochs_run": 15, "epochs_planned": 15, "devices": "CPU", "seconds": 840.0,
                   "validation_accuracy": 0.79, "test_time_augmentation": "flip", "test_accuracy_plain": 0.78}
        blessed = number % 4 != 0
        decision = {"blessed": blessed, "reasons": ["sanity checks hold", "test accuracy 0.8000 is at least the "
                                                    "champion's 0.7900"] if blessed else
                    ["test accuracy 0.7000 is not at least the champion's 0.8000"]}
        line = index_line(run_id, metrics, f"2026-01-01T00:00:{number % 60:02d}+00:00", config,
                          {"package": "0.1"}, decision, {"batch_size": 256, "learning_rate": 0.04})
        lines.append(json.dumps(line, sort_keys=True) + "\n")  # as Registry.record appends it
        folder = published / published_path(run_id)
        folder.mkdir(parents=True)
        if number == runs // 2:
            measured = run_id
            (folder / METRICS).write_text(json.dumps({**metrics, "class_names": [], "per_class_accuracy": {}}))
            (folder / HISTORY).write_text(json.dumps([{"epoch": epoch, "loss": 1.0, "accuracy": 0.5, "val_loss": 1.1,
                                                       "val_accuracy": 0.5} for epoch in range(1, 16)]))
            (folder / CONFIG).write_text(json.dumps({"pipeline": config.to_dict(), "train": line["hyperparameters"]}))
    (published / INDEX).write_text("".join(lines))
    os.symlink(published_path(measured), published / "latest")
    return measured


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def client_of(module):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    module.app.dependency_overrides[module.require_run_reader] = lambda: None
    parent = FastAPI()
    parent.mount(module.URL_PREFIX, module.app)
    return TestClient(parent, base_url="http://airflow.test")


def timed(client, url: str, repeats: int) -> dict:
    times, size = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        response = client.get(url)
        times.append(time.perf_counter() - start)
        assert response.status_code == 200, (url, response.status_code, response.text[:300])
        size = len(response.content)
    return {"first_s": round(times[0], 4), "median_s": round(statistics.median(times), 4), "bytes": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--before", default="0aef3ec", help="git ref of the plugin before the registry")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="alexnet-bench-registry-"))
    try:
        start = time.perf_counter()
        run_id = build_published(work, args.runs)
        built = time.perf_counter() - start
        os.environ["ALEXNET_ARTIFACTS"] = str(work)
        from alexnet_tasks.release.registry import Registry

        start = time.perf_counter()
        Registry(work / "published").page()  # what each publish's Registry.record does, here for every line
        table_seconds = time.perf_counter() - start
        from urllib.parse import quote

        run_url = f"/alexnet/runs/{quote(run_id, safe='')}"
        results = {}
        current = client_of(load(REPO / "plugins" / "alexnet_results.py", "alexnet_results"))
        results["registry"] = {
            "list page": timed(current, "/alexnet/runs", args.repeats + 1),
            "list page, blessed fast runs": timed(current, "/alexnet/runs?blessed=true&recipe=fast", args.repeats),
            "run page": timed(current, run_url, args.repeats),
        }
        old_source = subprocess.run(["git", "-C", str(REPO), "show", f"{args.before}:plugins/alexnet_results.py"],
                                    capture_output=True, text=True, check=True).stdout
        old_dir = work / "before"
        old_dir.mkdir()
        (old_dir / "alexnet_results_before.py").write_text(old_source)
        subprocess.run(f"git -C {REPO} archive {args.before} plugins/templates | tar -x -C {old_dir} --strip-components=1",
                       shell=True, check=True)
        before = client_of(load(old_dir / "alexnet_results_before.py", "alexnet_results_before"))
        old_repeats = max(1, min(args.repeats, 2))
        results["before"] = {
            "list page": timed(before, "/alexnet/runs", old_repeats),
            "run page": timed(before, run_url, old_repeats),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = [[code, page, figures["first_s"], figures["median_s"], figures["bytes"]]
            for code, pages in results.items() for page, figures in pages.items()]
    cpu = machine()["cpu"]
    print(table(f"Results pages with {args.runs} published runs ({cpu})",
                ["plugin", "page", "first request (s)", "median (s)", "bytes"], rows))
    print(f"(published/ built in {built:.1f} s; index.sqlite built from all {args.runs} lines in "
          f"{table_seconds:.2f} s)")
    if not args.no_save:
        path = save("registry", {"runs": args.runs, "cpu": cpu, "repeats": args.repeats,
                                 "before": args.before, "table_build_s": round(table_seconds, 3),
                                 "results": results})
        print(f"saved {path}")


if __name__ == "__main__":
    main()
