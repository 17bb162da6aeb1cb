#!/usr/bin/env python3
"""The `make run` side of the project: its params, its message for a source it cannot reach, its closing lines.

    scripts/local_conf.py '{"epochs": 1}'       # prints {"epochs": 1}
    scripts/local_conf.py ''                    # no GPU: prints the CPU preset, and a note on stderr
    scripts/local_conf.py unreachable URL CONF  # what to do when the source URL cannot be reached
    scripts/local_conf.py closing ARTIFACTS SINCE  # the run's results and where to see them

Only an empty CONF asks TensorFlow for GPUs (a few seconds); notes go to stderr.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import urllib.parse
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from alexnet_tasks.config import OFFICIAL_MD5, OFFICIAL_URL  # noqa: E402
from alexnet_tasks.sweeps import TRIAL_SEPARATOR  # noqa: E402

SWEEP_DAG_ID = "alexnet_cifar10_sweep"
# `make run` without CONF on a machine where TensorFlow sees no GPU: a run that fits a laptop.
CPU_PRESET = {"image_size": 67, "max_train_minutes": 15}
# Where the README builds a local archive, and the MD5 of the one `make_archive.py` writes.
LOCAL_ARCHIVE = "/tmp/cifar/cifar-10-python.tar.gz"
MAKE_ARCHIVE_MD5 = "18c6e7d1617e846e1cbee435086bc6c8"


def local_run_conf(conf_text: str, gpus: int) -> tuple[dict[str, Any], str | None]:
    """The params of a local ``make run``: ``(params, note)``.

    Explicit params (any non-empty JSON object) are used as given. Without
    them, a machine with a GPU takes the defaults (227x227, the recipe's
    epochs) and one without takes ``CPU_PRESET``; ``note`` then says so and
    how to ask for more. Raises ValueError naming the text when it is not a
    JSON object.
    """
    text = (conf_text or "").strip() or "{}"
    try:
        params = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"CONF must be a JSON object, got {text!r} ({error})") from None
    if not isinstance(params, dict):
        raise ValueError(f"CONF must be a JSON object, got {text!r}")
    if params or gpus > 0:
        return params, None
    note = (
        "TensorFlow sees no GPU here: using the CPU preset "
        f"{json.dumps(CPU_PRESET, sort_keys=True)} (AlexNet at 67x67, training sized to 15 minutes). "
        "For the full run pass params explicitly, e.g. "
        "make run CONF='{\"image_size\": 227}' (days on a CPU), or CONF='{\"image_size\": 67, \"max_train_minutes\": 60}' for a longer budget."
    )
    return dict(CPU_PRESET), note


def make_run_command(params: dict[str, Any]) -> str:
    """The one-line ``make run CONF='...'`` that runs ``params``: CONF is one shell word holding JSON."""
    return f"make run CONF={shlex.quote(json.dumps(params))}"


def unreachable_source_message(params: dict[str, Any], error: str) -> str:
    """What a local run says when its source cannot be reached: the URL, the error, and the way round it.

    ``params`` are the run's; the suggested command keeps them and points
    ``source_url`` and ``source_md5`` at a local archive.
    """
    url = params.get("source_url") or OFFICIAL_URL
    error = error.removeprefix(f"{url}: ")
    local = {**params, "source_url": LOCAL_ARCHIVE, "source_md5": MAKE_ARCHIVE_MD5}
    official = {**params, "source_url": LOCAL_ARCHIVE, "source_md5": OFFICIAL_MD5}
    return "\n".join([
        f"download: cannot reach {url}: {error}",
        "This run does not retry it. Use a local copy of the archive instead (a path or a file:// URL, with its MD5):",
        f"  {make_run_command(local)}",
        "built from the project's offline copy of CIFAR-10 (../shared/cifar10/ beside the checkout, where you have it):",
        f"  .venv/bin/python ../shared/cifar10/make_archive.py {LOCAL_ARCHIVE}   # MD5 {MAKE_ARCHIVE_MD5}",
        "or with the official archive fetched on a machine that reaches it and copied here:",
        f"  {make_run_command(official)}",
    ])


def closing_lines(artifacts: Path, since: float, airflow_home: Path) -> list[str]:
    """The last lines of ``make run``: test accuracy, the run's folder, how to open it in the UI and TensorBoard.

    The run is the newest folder under ``artifacts/runs/`` whose
    ``metrics.json`` was written at or after ``since`` (seconds since the
    epoch); no lines when there is none (the run failed before ``evaluate``).
    """
    finished = [path for path in (artifacts / "runs").glob("*/metrics.json") if path.stat().st_mtime >= since]
    if not finished:
        return []
    metrics_path = max(finished, key=lambda path: path.stat().st_mtime)
    run_dir = metrics_path.parent
    metrics = json.loads(metrics_path.read_text())
    accuracy = metrics.get("test_accuracy")
    plain = metrics.get("test_accuracy_plain", accuracy)
    augmentation = metrics.get("test_time_augmentation") or "none"
    lines = [f"test accuracy {_percent(plain)} (plain)"
             + ("" if augmentation == "none" else f", {_percent(accuracy)} with test-time augmentation {augmentation}")]
    decision_path = run_dir / "decision.json"
    dag_id = os.environ.get("ALEXNET_DAG") or "alexnet_cifar10"  # `make sweep`: alexnet_cifar10_sweep
    run_page = f"http://127.0.0.1:8080/dags/{dag_id}/runs"
    if decision_path.is_file():
        decision = json.loads(decision_path.read_text())
        lines.append("gate: " + ("blessed, published as latest" if decision.get("blessed") else
                                 f"not blessed, recorded only ({'; '.join(decision.get('reasons') or [])})"))
        if decision.get("run_id"):
            run_id = decision["run_id"]
            if dag_id == SWEEP_DAG_ID:  # the chosen trial's run id: the sweep's run id plus the trial
                run_id = run_id.rsplit(TRIAL_SEPARATOR, 1)[0]
            run_page += "/" + urllib.parse.quote(run_id, safe="") + "/plugin/alexnet-results"
    lines += [
        f"run folder: {run_dir}",
        f"UI: scripts/airflow.sh standalone, then open {run_page} "
        f"(user admin; standalone prints the password and keeps it in "
        f"{airflow_home / 'simple_auth_manager_passwords.json.generated'})",
        f"TensorBoard: .venv/bin/tensorboard --logdir {run_dir / 'tensorboard'}   (http://127.0.0.1:6006)",
    ]
    return lines


def _percent(value: Any) -> str:
    return "unknown" if value is None else f"{100 * value:.2f}%"


def visible_gpus() -> int:
    """The GPUs TensorFlow sees; 0 at once, without importing TensorFlow, where no NVIDIA device exists."""
    if not any(Path("/dev").glob("nvidia[0-9]*")):
        return 0
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


def main(argv: list[str]) -> int:
    if argv[:1] == ["unreachable"] and len(argv) == 3:
        print(unreachable_source_message(json.loads(argv[2] or "{}"), argv[1]))
        return 0
    if argv[:1] == ["closing"] and len(argv) == 4:
        print("\n".join(closing_lines(Path(argv[1]), float(argv[2]), Path(argv[3]))))
        return 0
    text = argv[0] if argv else ""
    try:
        explicit, _ = local_run_conf(text, gpus=1)  # validates the text without asking for GPUs
        params, note = (explicit, None) if explicit else local_run_conf(text, visible_gpus())
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if note:
        print(note, file=sys.stderr)
    print(json.dumps(params, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
