#!/usr/bin/env python3
"""Both recipes side by side through the pipeline itself, under one training-time budget.

Runs the DAG with ``airflow dags test`` (scripts/run_local.sh) on a real archive:
first the ``fast`` recipe for ``--fast-epochs`` epochs, then the ``reference``
recipe with ``max_train_minutes`` set to the training time the fast run took,
so both get the same wall time. Prints and writes (JSON) the validation
accuracy after each epoch, the test accuracy and the training time of each.

    benchmarks/recipes.py --source file:///tmp/cifar/cifar-10-python.tar.gz \\
        --md5 18c6e7d1617e846e1cbee435086bc6c8 --image-size 67 --fast-epochs 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_pipeline(conf: dict, artifacts: Path, home: Path) -> dict:
    env = {**os.environ, "ALEXNET_ARTIFACTS": str(artifacts), "AIRFLOW_HOME": str(home), "CONF": json.dumps(conf)}
    started = time.monotonic()
    log = subprocess.run([str(REPO / "scripts" / "run_local.sh")], env=env, capture_output=True, text=True)
    wall = time.monotonic() - started
    if log.returncode:
        raise SystemExit(f"pipeline failed:\n{log.stdout[-3000:]}\n{log.stderr[-3000:]}")
    return collect((artifacts / "published" / "latest").resolve(), conf, wall)


def published_run(artifacts: Path, conf: dict) -> Path | None:
    """An already published run of exactly these settings, if there is one."""
    for run_dir in sorted((artifacts / "published" / "runs").glob("*")):
        saved = json.loads((run_dir / "config.json").read_text())["pipeline"]
        if all(saved.get(key) == value for key, value in conf.items()):
            return run_dir
    return None


def collect(run_dir: Path, conf: dict, wall: float | None) -> dict:
    history = json.loads((run_dir / "history.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    settings = json.loads((run_dir / "config.json").read_text())["train"]
    return {
        "conf": conf,
        "settings": settings,
        "run": run_dir.name,
        "pipeline_wall_seconds": None if wall is None else round(wall, 1),
        "train_seconds": round(sum(entry["epoch_seconds"] for entry in history), 1),
        "epochs": [
            {"epoch": entry["epoch"], "val_accuracy": round(entry["val_accuracy"], 4),
             "loss": round(entry["loss"], 4), "seconds": round(entry["epoch_seconds"], 1),
             "elapsed_minutes": round(sum(e["epoch_seconds"] for e in history[: i + 1]) / 60, 2)}
            for i, entry in enumerate(history)
        ],
        "test_accuracy": round(metrics["test_accuracy"], 4),
        "test_loss": round(metrics["test_loss"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True)
    parser.add_argument("--md5", required=True)
    parser.add_argument("--image-size", type=int, default=67)
    parser.add_argument("--fast-epochs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/alexnet-recipes"))
    parser.add_argument("--reuse", action="store_true", help="take a fast run already published in --work")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "recipes.json")
    args = parser.parse_args()
    common = {"source_url": args.source, "source_md5": args.md5, "image_size": args.image_size}
    artifacts, home = args.work / "artifacts", args.work / "airflow"
    fast_conf = {**common, "recipe": "fast", "epochs": args.fast_epochs}
    done = published_run(artifacts, fast_conf) if args.reuse else None
    results = {"fast": collect(done, fast_conf, None) if done else run_pipeline(fast_conf, artifacts, home)}
    budget = results["fast"]["train_seconds"] / 60
    results["reference"] = run_pipeline({**common, "recipe": "reference", "max_train_minutes": round(budget, 2)}, artifacts, home)
    results["budget_minutes"] = round(budget, 2)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"training budget: {budget:.1f} min at image_size {args.image_size}")
    print(f"{'recipe':<10} {'epoch':>5} {'minutes':>8} {'val acc':>8}")
    for name in ("fast", "reference"):
        for entry in results[name]["epochs"]:
            print(f"{name:<10} {entry['epoch']:>5} {entry['elapsed_minutes']:>8.2f} {entry['val_accuracy']:>8.4f}")
        print(f"{name:<10} {'test':>5} {results[name]['train_seconds'] / 60:>8.2f} {results[name]['test_accuracy']:>8.4f}")


if __name__ == "__main__":
    main()
