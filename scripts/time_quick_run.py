#!/usr/bin/env python3
"""Time the README's quick run (`make run` on a local archive, 67x67, one epoch) and print its table.

    .venv/bin/python scripts/time_quick_run.py             # runs it, writes benchmarks/results/quick_run.json
    .venv/bin/python scripts/time_quick_run.py --table     # the table and sentence of the last measurement

The run goes through scripts/run_local.sh (`airflow dags test`) in a throwaway
AIRFLOW_HOME and ALEXNET_ARTIFACTS, so nothing is reused from an earlier run;
each step's wall time is its task instance's, read from the run's metadata
database. The JSON names the CPU, the cores and the load average when the run
started (other work on the machine slows it down).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "quick_run.json"
STEPS = ("download", "split", "build_shards", "train", "evaluate", "gate", "publish")


def cpu_model() -> str:
    """The CPU's model name, as /proc/cpuinfo (or lscpu) gives it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def measure(archive: str, md5: str) -> dict:
    """Run the quick run once; returns its timings, accuracies and the machine it ran on."""
    conf = {"source_url": archive, "source_md5": md5, "image_size": 67, "epochs": 1}
    with tempfile.TemporaryDirectory(prefix="alexnet-quick-run-") as scratch:
        env = {**os.environ, "AIRFLOW_HOME": f"{scratch}/airflow_home", "ALEXNET_ARTIFACTS": f"{scratch}/artifacts",
               "CONF": json.dumps(conf)}
        env.pop("ALEXNET_PROGRESS_FILE", None)
        load = os.getloadavg()[0]
        started = time.monotonic()
        run = subprocess.run([str(ROOT / "scripts" / "run_local.sh")], env=env, capture_output=True, text=True)
        seconds = time.monotonic() - started
        if run.returncode != 0:
            sys.stderr.write(run.stdout[-4000:] + run.stderr[-4000:])
            raise SystemExit(f"the quick run failed (exit {run.returncode})")
        with sqlite3.connect(f"{scratch}/airflow_home/airflow.db") as connection:
            rows = connection.execute("SELECT task_id, julianday(end_date) - julianday(start_date) FROM task_instance")
            steps = {task: round(days * 86400, 1) for task, days in rows}
        [metrics_path] = Path(f"{scratch}/artifacts/runs").glob("*/metrics.json")
        metrics = json.loads(metrics_path.read_text())
    return {
        "conf": conf,
        "command_seconds": round(seconds, 1),
        "step_seconds": {step: steps[step] for step in STEPS},
        "test_accuracy": metrics["test_accuracy"],
        "test_accuracy_plain": metrics["test_accuracy_plain"],
        "test_time_augmentation": metrics["test_time_augmentation"],
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load_average_at_start": round(load, 2),
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def sentence(result: dict) -> str:
    """The README's one line on the quick run."""
    return (f"The quick run took {result['command_seconds']:.0f} s for the whole command "
            f"(train {result['step_seconds']['train']:.0f} s) on {result['cores']} cores of an "
            f"{result['cpu']} (load average {result['load_average_at_start']} at the start) and scored {100 * result['test_accuracy_plain']:.1f}% "
            f"({100 * result['test_accuracy']:.1f}% with test-time augmentation)")


def table(result: dict) -> str:
    """Markdown: one row per step, then the whole command, with the machine in the caption line."""
    lines = [f"Measured by `scripts/time_quick_run.py` on {result['measured_at'][:10]}: {result['cores']} cores of "
             f"an {result['cpu']} (load average {result['load_average_at_start']} at the start), "
             f"`make run CONF='{json.dumps(result['conf'])}'`:",
             "",
             "| step | wall time |",
             "|---|---|"]
    lines += [f"| {step} | {seconds:.1f} s |" for step, seconds in result["step_seconds"].items()]
    lines.append(f"| the whole command (Airflow's start included) | {result['command_seconds']:.1f} s |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", default="/tmp/cifar/cifar-10-python.tar.gz")
    parser.add_argument("--md5", default="18c6e7d1617e846e1cbee435086bc6c8")
    parser.add_argument("--table", action="store_true", help="print the last measurement's table, run nothing")
    args = parser.parse_args()
    if args.table:
        result = json.loads(RESULT.read_text())
    else:
        result = measure(args.archive, args.md5)
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print()
    print(sentence(result) + ".")
    return 0


if __name__ == "__main__":
    sys.exit(main())
