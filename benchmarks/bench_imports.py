#!/usr/bin/env python3
"""DAG parse time and the import time of each step's module, each in a fresh interpreter.

Baseline, same run: ``import airflow.sdk`` (what every DAG file pays) for the
parse, and ``import tensorflow`` for the steps that need it.
"""

from __future__ import annotations

import statistics
import subprocess
import sys

from common import REPO, save, table

REPEATS = 3
PARSE = (
    "import time, importlib.util\n"
    "import airflow.sdk\nfrom airflow.sdk import dag, task, Param, get_current_context\n"
    f"spec = importlib.util.spec_from_file_location('d', {str(REPO / 'dags' / 'alexnet_cifar10.py')!r})\n"
    "module = importlib.util.module_from_spec(spec)\n"
    "t = time.perf_counter(); spec.loader.exec_module(module); print(time.perf_counter() - t)\n"
)


def seconds(code: str) -> float:
    runs = []
    for _ in range(REPEATS):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin",
                                  "AIRFLOW_HOME": "/tmp/alexnet-bench/airflow"})
        runs.append(float(out.stdout.strip().splitlines()[-1]))
    return statistics.median(runs)


def import_time(module: str) -> float:
    return seconds(f"import time\nt = time.perf_counter()\nimport {module}\nprint(time.perf_counter() - t)\n")


def main() -> None:
    rows = [["DAG file parse (after airflow.sdk)", seconds(PARSE)], ["baseline: import airflow.sdk", import_time("airflow.sdk")]]
    for module in ("config", "data.download", "data.split", "data.shards", "training.model", "training.train", "evaluate",
                   "release.publish"):
        rows.append([f"import alexnet_tasks.{module}", import_time(f"alexnet_tasks.{module}")])
    rows.append(["baseline: import tensorflow", import_time("tensorflow")])
    print(table(f"Parse and import times (median of {REPEATS}, fresh interpreter each)", ["what", "seconds"], rows))
    save("imports", {name: value for name, value in rows})


if __name__ == "__main__":
    main()
