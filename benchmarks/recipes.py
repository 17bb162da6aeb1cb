#!/usr/bin/env python3
"""The recipes' accuracy through the pipeline itself (``airflow dags test``) on a real archive.

Three studies, each a sequence of whole pipeline runs (scripts/run_local.sh)
whose figures land in one JSON file that also records the code version
(commit, and whether the tree had uncommitted changes) and the machine:

* ``headline``: ``fast`` and ``reference``, each with the same training-time
  budget (``--minutes``, default 15) at ``--image-size`` (default 67);
* ``ablation``: ``fast`` for ``--epochs`` (default 3) epochs in float32, same
  seed: the baseline (also with a second seed, for the noise), each lever
  alone (a ``recipe_options`` change or a batch size), then every lever that
  beat the baseline by more than the seed noise, all together in one run
  (when there are two or more);
  test-time augmentation is measured on the baseline's model by evaluating
  it again with each kind (no retraining);
* ``epochs``: ``fast`` for ``--epochs`` epochs (with ``--options``, a JSON
  object of ``recipe_options``), one run.

Every run is published with ``publish_mode`` ``always`` in the study's own
artifacts root, and its figures are written to the JSON as soon as it ends;
``--resume`` keeps the runs a file already holds for the same code version.

    benchmarks/recipes.py ablation --source file:///tmp/cifar/cifar-10-python.tar.gz \\
        --md5 18c6e7d1617e846e1cbee435086bc6c8
    benchmarks/recipes.py headline --source ... --md5 ... --minutes 15
    benchmarks/recipes.py epochs --source ... --md5 ... --epochs 10
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import machine

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

# Each lever alone, as a change to the fast recipe (docs/performance.md's ablation table).
LEVERS: dict[str, dict] = {
    "dropout 0.3": {"recipe_options": {"dropout": 0.3}},
    "shift 2 px": {"recipe_options": {"max_shift": 2}},
    "no label smoothing": {"recipe_options": {"label_smoothing": 0.0}},
    "no decay on BN/bias": {"recipe_options": {"weight_decay_norm_and_bias": False}},
    "BN momentum 0.9": {"recipe_options": {"batchnorm_momentum": 0.9}},
    "He init": {"recipe_options": {"kernel_initializer": "he_normal"}},
    "batch 128, lr 0.02": {"batch_size": 128, "learning_rate": 0.02},
    "warm-up 0.2 epoch": {"recipe_options": {"warmup_epochs": 0.2}},
    "linear decay": {"recipe_options": {"decay": "linear"}},
    "EMA 0.99": {"recipe_options": {"ema_momentum": 0.99}},
    "bfloat16": {"recipe_options": {"precision": "mixed_bfloat16"}},  # fast only where oneDNN has AMX
}
NOISE_SEED = 1  # the baseline again with this training seed: the gap is the noise a lever must beat


def code_version() -> dict:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def merge(conf: dict, change: dict) -> dict:
    """``conf`` with ``change`` applied; ``recipe_options`` are merged key by key."""
    merged = {**conf, **{key: value for key, value in change.items() if key != "recipe_options"}}
    options = {**conf.get("recipe_options", {}), **change.get("recipe_options", {})}
    if options:
        merged["recipe_options"] = options
    return merged


class Study:
    """One JSON file of runs; each run is a whole pipeline run in ``work``'s artifacts root."""

    def __init__(self, name: str, output: Path, work: Path, resume: bool):
        self.output, self.work = output, work
        self.version = code_version()
        kept = json.loads(output.read_text()) if resume and output.is_file() else {}
        same_code = kept.get("code_version") == self.version
        self.payload = {"study": name, "code_version": self.version, "machine": machine(),
                        "runs": kept.get("runs", {}) if same_code else {}}

    def run(self, name: str, conf: dict) -> dict:
        done = self.payload["runs"].get(name)
        if done and done["conf"] == conf:
            print(f"{name}: kept from {self.output}", flush=True)
            return done
        print(f"{name}: running {json.dumps(conf)}", flush=True)
        result = run_pipeline({**conf, "publish_mode": "always"}, self.work / "artifacts", self.work / "airflow")
        result["conf"] = conf
        self.payload["runs"][name] = result
        self.save()
        print(f"{name}: test {result['test_accuracy']:.4f} (plain {result['test_accuracy_plain']:.4f}) "
              f"after {len(result['epochs'])} epochs, {result['train_seconds'] / 60:.1f} min training", flush=True)
        return result

    def save(self) -> None:
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.output.write_text(json.dumps(self.payload, indent=2) + "\n")


def run_pipeline(conf: dict, artifacts: Path, home: Path) -> dict:
    # PYTHONPATH: the runs import this checkout's package, the one code_version() records, whichever
    # checkout the virtualenv's editable install points at.
    env = {**os.environ, "ALEXNET_ARTIFACTS": str(artifacts), "AIRFLOW_HOME": str(home), "CONF": json.dumps(conf),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    started = time.monotonic()
    log = subprocess.run([str(REPO / "scripts" / "run_local.sh")], env=env, capture_output=True, text=True)
    wall = time.monotonic() - started
    if log.returncode:
        raise SystemExit(f"pipeline failed:\n{log.stdout[-3000:]}\n{log.stderr[-3000:]}")
    return collect((artifacts / "published" / "latest").resolve(), wall)


def collect(run_dir: Path, wall: float | None) -> dict:
    history = json.loads((run_dir / "history.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    settings = json.loads((run_dir / "config.json").read_text())["train"]
    return {
        "settings": settings,
        "run": run_dir.name,
        "run_dir": str(run_dir),
        "pipeline_wall_seconds": None if wall is None else round(wall, 1),
        "train_seconds": round(sum(entry["epoch_seconds"] for entry in history), 1),
        "epochs": [
            {"epoch": entry["epoch"], "val_accuracy": round(entry["val_accuracy"], 4),
             "loss": round(entry["loss"], 4), "seconds": round(entry["epoch_seconds"], 1),
             "elapsed_minutes": round(sum(e["epoch_seconds"] for e in history[: i + 1]) / 60, 2)}
            for i, entry in enumerate(history)
        ],
        "truncated": metrics.get("truncated"),
        "test_time_augmentation": metrics.get("test_time_augmentation", "none"),
        "test_accuracy": round(metrics["test_accuracy"], 4),
        "test_accuracy_plain": round(metrics.get("test_accuracy_plain", metrics["test_accuracy"]), 4),
        "test_loss": round(metrics["test_loss"], 4),
    }


def test_time_augmentation_study(run_dir: Path, work: Path) -> dict:
    """The baseline's model evaluated with each kind of test-time augmentation (no retraining)."""
    sys.path.insert(0, str(REPO))
    from alexnet_tasks.config import TEST_TIME_AUGMENTATIONS, PipelineConfig
    from alexnet_tasks.layout import Layout
    from alexnet_tasks.evaluate import evaluate

    saved = json.loads((run_dir / "config.json").read_text())["pipeline"]
    config = PipelineConfig.from_dict(saved)
    shards = Layout(work / "artifacts").shards(config)
    results = {}
    for kind in TEST_TIME_AUGMENTATIONS:
        scratch = work / "tta" / kind
        scratch.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        result = evaluate(run_dir / "model.keras", shards, scratch, dataclasses.replace(config, test_time_augmentation=kind))
        results[kind] = {"test_accuracy": round(result["test_accuracy"], 4),
                         "evaluate_seconds": round(time.monotonic() - started, 1)}
        print(f"test-time augmentation {kind}: {results[kind]['test_accuracy']:.4f}", flush=True)
    return results


def ablation(args, common: dict) -> None:
    study = Study("ablation", args.output or RESULTS / "recipes-ablation.json", args.work, args.resume)
    # float32 pinned: on a CPU with AMX the recipe would pick bfloat16, which is a lever of its own here.
    base_conf = {**common, "recipe": "fast", "epochs": args.epochs, "recipe_options": {"precision": "float32"}}
    baseline = study.run("baseline", base_conf)
    noise = abs(study.run(f"baseline, seed {NOISE_SEED}", {**base_conf, "seed": NOISE_SEED})["test_accuracy"]
                - baseline["test_accuracy"])
    study.payload["seed_noise"] = round(noise, 4)
    study.payload["test_time_augmentation"] = test_time_augmentation_study(Path(baseline["run_dir"]), args.work)
    study.save()
    gains = {}
    for name, change in LEVERS.items():
        gains[name] = study.run(name, merge(base_conf, change))["test_accuracy"] - baseline["test_accuracy"]
    helpful = sorted((name for name, gain in gains.items() if gain > noise), key=lambda name: -gains[name])
    conf = base_conf
    for name in helpful:
        conf = merge(conf, LEVERS[name])
    study.payload["together"] = helpful
    if len(helpful) > 1:  # a single helpful lever together is its own run
        study.run("together: " + " + ".join(helpful), conf)
    study.save()
    print(ablation_table(study.payload))


def ablation_table(payload: dict) -> str:
    runs = payload["runs"]
    base = runs["baseline"]
    lines = ["| change (3 epochs, seed 42) | test accuracy (flip) | plain | vs baseline | training min |",
             "|---|---|---|---|---|"]
    for name, run in runs.items():
        delta = run["test_accuracy"] - base["test_accuracy"]
        lines.append(f"| {name} | {run['test_accuracy']:.2%} | {run['test_accuracy_plain']:.2%} | "
                     f"{delta * 100:+.2f} | {run['train_seconds'] / 60:.1f} |")
    return "\n".join(lines)


def headline(args, common: dict) -> None:
    study = Study("headline", args.output or RESULTS / "recipes-headline.json", args.work, args.resume)
    for recipe in args.recipes:
        study.run(recipe, {**common, "recipe": recipe, "max_train_minutes": args.minutes})
    study.payload["budget_minutes"] = args.minutes
    study.save()
    print_epochs(study.payload)


def epochs(args, common: dict) -> None:
    study = Study("epochs", args.output or RESULTS / f"recipes-{args.epochs}-epochs.json", args.work, args.resume)
    conf = {**common, "recipe": "fast", "epochs": args.epochs}
    if args.options:
        conf["recipe_options"] = json.loads(args.options)
    study.run(f"fast, {args.epochs} epochs", conf)
    print_epochs(study.payload)


def print_epochs(payload: dict) -> None:
    print(f"{'run':<16} {'epoch':>5} {'minutes':>8} {'val acc':>8}")
    for name, run in payload["runs"].items():
        for entry in run["epochs"]:
            print(f"{name:<16} {entry['epoch']:>5} {entry['elapsed_minutes']:>8.2f} {entry['val_accuracy']:>8.4f}")
        print(f"{name:<16} {'test':>5} {run['train_seconds'] / 60:>8.2f} {run['test_accuracy']:>8.4f}"
              f"  (plain {run['test_accuracy_plain']:.4f}{', truncated' if run['truncated'] else ''})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", choices=("headline", "ablation", "epochs"))
    parser.add_argument("--source", required=True, help="the archive's URL (file:// or http://)")
    parser.add_argument("--md5", required=True)
    parser.add_argument("--image-size", type=int, default=67)
    parser.add_argument("--epochs", type=int, default=3, help="ablation and epochs: epochs per run")
    parser.add_argument("--minutes", type=float, default=15, help="headline: each recipe's training budget")
    parser.add_argument("--work", type=Path, default=Path("/tmp/alexnet-recipes"), help="artifacts and Airflow home")
    parser.add_argument("--output", type=Path, help="the JSON file (default: benchmarks/results/recipes-<study>.json)")
    parser.add_argument("--resume", action="store_true", help="keep the runs the JSON already holds")
    parser.add_argument("--recipes", nargs="+", choices=("fast", "reference"), default=["fast", "reference"],
                        help="headline: which recipes to run")
    parser.add_argument("--options", help='epochs: recipe_options as JSON, e.g. \'{"dropout": 0.3}\'')
    args = parser.parse_args()
    common = {"source_url": args.source, "source_md5": args.md5, "image_size": args.image_size}
    {"headline": headline, "ablation": ablation, "epochs": epochs}[args.study](args, common)


if __name__ == "__main__":
    main()
