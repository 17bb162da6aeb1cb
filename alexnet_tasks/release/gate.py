"""Decide whether a finished run may replace the published model: sanity checks, then the champion.

``gate()`` runs between evaluate and publish and writes ``decision.json`` in
the run folder (and one log line); publish follows it.

Sanity, on the run's ``metrics.json``:

* the test loss (and accuracy) are finite numbers: a diverged run's NaN loss
  is written as null by evaluate and fails here;
* the test accuracy is at least ``accuracy_floor`` (default 0.25, two and a
  half times chance);
* training was not truncated (a time budget cut its schedule short);
* the class names are the champion's.

Not worse than the champion, the run ``published/latest`` points to: both
runs were scored on the same official test images (``test_images_sha256``),
so they are compared image by image from their ``predictions.npy`` and the
test shard's labels: how many images only the new run gets right, how many
only the champion gets right, and the exact two-sided McNemar p-value of
that split (a binomial test on the discordant images, so no SciPy). The run
is blessed when the sanity checks hold and its accuracy is at least the
champion's minus ``gate_tolerance``; with no champion, sanity alone decides.
The p-value is recorded for whoever reads the decision; it does not decide.
Accuracies of the same kind are compared: when both runs used the same
test-time augmentation their headline figures, otherwise both runs' plain
figures (``test_accuracy_plain`` and ``predictions_plain.npy``; a run without
augmentation has only plain ones); ``compared_as`` in the decision says which.

``publish_mode="always"`` blesses the run whatever the checks say, and still
records what they found ``publish_mode="approval"`` decides as ``gated``;
a blessed run then waits for a person's approval before publish
(``alexnet_tasks.release.approval``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from alexnet_tasks.config import PipelineConfig
from alexnet_tasks.errors import MissingInputError
from alexnet_tasks.jsonio import load_json_object, save_json
from alexnet_tasks.layout import DECISION, LATEST, METRICS, PLAIN_PREDICTIONS, PREDICTIONS
from alexnet_tasks.progress import report
from alexnet_tasks.release.registry import Registry

log = logging.getLogger(__name__)
# Accuracies are shares of the same images; a difference below this is rounding, not a worse model.
_EPSILON = 1e-9


# --------------------------------------------------------------------------- statistics
def mcnemar_p(only_first: int, only_second: int) -> float:
    """Exact two-sided McNemar p-value for ``only_first`` and ``only_second`` discordant pairs.

    Under the null hypothesis (both models equally good) each discordant
    image is equally likely to favour either model, so the smaller count is
    Binomial(n, 1/2); the p-value doubles its lower tail, at most 1. Exact
    for any n (integer arithmetic); 1.0 when there are no discordant pairs.
    """
    for name, value in (("only_first", only_first), ("only_second", only_second)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a count (an integer >= 0), got {value!r}")
    n = only_first + only_second
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_first, only_second) + 1))
    return min(1.0, 2 * tail / 2**n)


def paired_counts(challenger, champion, labels) -> dict:
    """Image-by-image comparison of two models' predicted classes against the true labels.

    Returns the number of images, those both get right, both get wrong, only
    the challenger gets right, only the champion gets right, and the McNemar
    p-value of the last two.
    """
    import numpy as np

    challenger, champion, labels = (np.asarray(a).astype(np.int64) for a in (challenger, champion, labels))
    if not challenger.shape == champion.shape == labels.shape or labels.ndim != 1:
        raise ValueError(
            f"predictions and labels must be one class per image for the same images, got shapes "
            f"{challenger.shape} (challenger), {champion.shape} (champion) and {labels.shape} (labels)"
        )
    new_right, old_right = challenger == labels, champion == labels
    only_challenger = int(np.sum(new_right & ~old_right))
    only_champion = int(np.sum(old_right & ~new_right))
    return {
        "images": int(len(labels)),
        "both_right": int(np.sum(new_right & old_right)),
        "both_wrong": int(np.sum(~new_right & ~old_right)),
        "only_challenger_right": only_challenger,
        "only_champion_right": only_champion,
        "mcnemar_p": mcnemar_p(only_challenger, only_champion),
    }


# --------------------------------------------------------------------------- reading
def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise MissingInputError(f"{path}: missing; {what}")
    return load_json_object(path)


def _read_predictions(path: Path):
    import numpy as np

    try:
        predictions = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable predictions file ({error})") from None
    if predictions.ndim != 1:
        raise ValueError(f"{path}: expected one predicted class per image, got shape {predictions.shape}")
    return predictions


def _test_labels(shards_dir: Path, test_images_sha256: str | None):
    """The test shard's labels, checked to belong to the images the run was scored on."""
    import h5py

    from alexnet_tasks.data.shards import read_attrs, shard_path

    path = shard_path(Path(shards_dir), "test")
    recorded = read_attrs(path).get("images_sha256")  # ShardError names a missing or unreadable shard
    if test_images_sha256 is not None and recorded != test_images_sha256:
        raise ValueError(
            f"{path}: holds other test images (sha256 {recorded}) than the run was scored on "
            f"({test_images_sha256}); evaluate again on this shard set"
        )
    with h5py.File(path, "r") as handle:
        return handle["labels"][...]


def augmentation_kind(metrics: dict) -> str:
    """The test-time augmentation a run's headline figures used (``none`` for runs that recorded none)."""
    return metrics.get("test_time_augmentation") or "none"


def figures_of_kind(metrics: dict, folder: Path, kind: str) -> tuple[float | None, Path]:
    """A run's test accuracy and predictions file of ``kind``: its headline ones, or its plain ones for ``none``."""
    if augmentation_kind(metrics) == kind:
        return _number(metrics.get("test_accuracy")), Path(folder) / PREDICTIONS
    if kind != "none":
        raise ValueError(f"a run evaluated with {augmentation_kind(metrics)!r} has no {kind!r} figures")
    return _number(metrics.get("test_accuracy_plain")), Path(folder) / PLAIN_PREDICTIONS


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def champion_of(published_root: Path, registry: Registry | None = None) -> dict | None:
    """The champion (the run ``published/latest`` points to): run id, path, folder, metrics, predictions.

    None without one. The run id comes from the registry's entry of that
    folder (the folder's name where none names it). Raises FileNotFoundError
    when ``latest`` points to a folder without metrics, ValueError when they
    are unreadable. ``registry`` reads ``published/`` on another store (default: the folder ``published_root``).
    """
    champion = (registry or Registry(published_root)).champion()
    if champion is None:
        return None
    folder = champion["folder"]
    metrics = _read_json(folder / METRICS, f"{Path(published_root) / LATEST} points to a run without metrics; "
                         "publish a run again")
    return {**champion, "folder": folder, "metrics": metrics, "predictions": folder / PREDICTIONS}


# --------------------------------------------------------------------------- the checks
def sanity_checks(metrics: dict, accuracy_floor: float, champion_metrics: dict | None) -> dict:
    """``{check: {"passed": bool, "detail": str}}`` for the four sanity rules, in order."""
    loss, accuracy = _number(metrics.get("test_loss")), _number(metrics.get("test_accuracy"))
    nonfinite = metrics.get("nonfinite") or []
    finite = loss is not None and math.isfinite(loss) and accuracy is not None and math.isfinite(accuracy)
    checks = {
        "finite_loss": {
            "passed": finite,
            "detail": f"test loss {loss:.4f}" if finite else
            "test loss is not finite (the model diverged)" + (f": {', '.join(nonfinite)} not finite" if nonfinite else ""),
        },
        "accuracy_floor": {
            "passed": accuracy is not None and accuracy + _EPSILON >= accuracy_floor,
            "detail": (f"test accuracy {accuracy:.4f}" if accuracy is not None else "test accuracy unknown")
            + (" is at or above" if accuracy is not None and accuracy + _EPSILON >= accuracy_floor else " is below")
            + f" the floor {accuracy_floor:g}",
        },
    }
    truncated = metrics.get("truncated")
    checks["not_truncated"] = {
        "passed": truncated is not True,
        "detail": "training was truncated before its schedule ended" if truncated is True else
        "training ran its whole schedule" if truncated is False else "unknown whether truncated (no train summary)",
    }
    names = metrics.get("class_names")
    champion_names = None if champion_metrics is None else champion_metrics.get("class_names")
    if champion_names is None:
        checks["class_names"] = {"passed": True, "detail": "no champion class names to compare with"}
    else:
        same = list(names or []) == list(champion_names)
        checks["class_names"] = {
            "passed": same,
            "detail": "the champion's class names" if same else
            f"class names {names} differ from the champion's {champion_names}",
        }
    return checks


@dataclass
class _Gate:
    """What the gate's phases pass on: the run, the champion and what was found so far."""

    run_dir: Path
    metrics: dict
    predictions: object  # one predicted class per test image
    champion: dict | None  # champion_of(), None without one
    checks: dict  # check name -> {"passed": bool, "detail": str}
    compared_as: str = "none"
    accuracy: float | None = None
    champion_accuracy: float | None = None
    paired: dict | None = None

    @property
    def champion_metrics(self) -> dict | None:
        return None if self.champion is None else self.champion["metrics"]


def _read(run_dir: Path, published_root: Path, registry: Registry | None = None) -> _Gate:
    """Read phase: the run's metrics and predictions, and the champion."""
    metrics = _read_json(run_dir / METRICS, "evaluate must finish before the gate")
    if not (run_dir / PREDICTIONS).is_file():
        raise FileNotFoundError(f"{run_dir / PREDICTIONS}: missing; evaluate must finish before the gate")
    return _Gate(run_dir, metrics, _read_predictions(run_dir / PREDICTIONS), champion_of(published_root, registry), {})


def _check(run: _Gate, config: PipelineConfig) -> None:
    """Check phase: the sanity checks."""
    run.checks.update(sanity_checks(run.metrics, config.accuracy_floor, run.champion_metrics))


def _compare(run: _Gate, config: PipelineConfig, shards_dir: Path) -> None:
    """Compare phase: the run against the champion, image by image where both have predictions."""
    metrics, champion, run_dir = run.metrics, run.champion, run.run_dir
    run.compared_as = augmentation_kind(metrics)
    if champion is not None and augmentation_kind(run.champion_metrics) != run.compared_as:
        run.compared_as = "none"  # different views: compare what both have, the plain prediction
    run.accuracy, predictions_path = figures_of_kind(metrics, run_dir, run.compared_as)
    if champion is None:
        run.checks["not_worse_than_champion"] = {"passed": True, "detail": "no champion yet: the sanity checks decide"}
        return
    run.champion_accuracy, champion_predictions = figures_of_kind(run.champion_metrics, champion["folder"],
                                                                  run.compared_as)
    if run.champion_accuracy is None:
        run.checks["not_worse_than_champion"] = {
            "passed": True, "detail": f"the champion {champion['run_id']} has no test accuracy to compare with: "
            "the sanity checks decide"}
        return
    ours, theirs = metrics.get("test_images_sha256"), run.champion_metrics.get("test_images_sha256")
    if ours is not None and theirs is not None and ours != theirs:
        run.checks["not_worse_than_champion"] = {"passed": False, "detail": (
            f"scored on other test images (sha256 {ours[:12]}) than the champion {champion['run_id']} "
            f"({theirs[:12]}); their accuracies are not comparable")}
        return
    if champion_predictions.is_file() and ours is not None and theirs is not None:
        predictions = run.predictions
        if predictions_path != run_dir / PREDICTIONS:
            if not predictions_path.is_file():
                raise FileNotFoundError(f"{predictions_path}: missing; evaluate again to write it")
            predictions = _read_predictions(predictions_path)
        labels = _test_labels(shards_dir, ours)
        if len(predictions) != len(labels):
            raise ValueError(f"{predictions_path}: {len(predictions)} predictions for the {len(labels)} test images")
        run.paired = paired_counts(predictions, _read_predictions(champion_predictions), labels)
    tolerance = config.gate_tolerance
    not_worse = (run.accuracy is not None
                 and run.accuracy + tolerance + _EPSILON >= run.champion_accuracy)
    kind = "" if run.compared_as == augmentation_kind(metrics) else "plain "
    detail = (f"{kind}test accuracy {_fmt(run.accuracy)} {'is' if not_worse else 'is not'} at least the "
              f"champion {champion['run_id']}'s {_fmt(run.champion_accuracy)}"
              + (f" minus the tolerance {tolerance:g}" if tolerance else ""))
    paired = run.paired
    if paired is not None:
        detail += (f" (on {paired['images']} images: {paired['only_challenger_right']} right only here, "
                   f"{paired['only_champion_right']} only by the champion, McNemar p={paired['mcnemar_p']:.3g})")
    else:
        detail += " (the champion has no per-image predictions: compared by accuracy alone)"
    run.checks["not_worse_than_champion"] = {"passed": not_worse, "detail": detail}


def _decide(run: _Gate, config: PipelineConfig, run_id: str | None) -> dict:
    """Decide phase: blessed or not, why, and every figure it was decided on."""
    checks, champion, metrics = run.checks, run.champion, run.metrics
    comparison = checks["not_worse_than_champion"]
    sanity = all(check["passed"] for name, check in checks.items() if name != "not_worse_than_champion")
    passed = sanity and comparison["passed"]
    failed = [check["detail"] for check in checks.values() if not check["passed"]]
    mode = config.publish_mode
    blessed = passed or mode == "always"
    if passed:
        reasons = ["sanity checks hold", comparison["detail"]]
    elif blessed:
        reasons = [f"publish_mode always: published although {'; '.join(failed)}"]
    else:
        reasons = failed
    return {
        "blessed": blessed,
        "reasons": reasons,
        "run_id": run_id,
        "fingerprint": metrics.get("fingerprint"),
        "publish_mode": mode,
        "sanity_passed": sanity,
        "checks_passed": passed,
        "checks": checks,
        "accuracy_floor": config.accuracy_floor,
        "gate_tolerance": config.gate_tolerance,
        "approval_timeout": config.approval_timeout if mode == "approval" else None,
        "test_accuracy": _number(metrics.get("test_accuracy")),
        "test_time_augmentation": augmentation_kind(metrics),
        "compared_as": run.compared_as,
        "compared_accuracy": run.accuracy,
        "test_loss": _number(metrics.get("test_loss")),
        "champion": None if champion is None else champion["run_id"],
        "champion_path": None if champion is None else champion["path"],
        "champion_accuracy": run.champion_accuracy,
        "champion_fingerprint": None if champion is None else run.champion_metrics.get("fingerprint"),
        "paired": run.paired,
        "test_images_sha256": metrics.get("test_images_sha256"),
        "decided_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _write(run: _Gate, decision: dict) -> None:
    """Write phase: ``decision.json`` and one log line."""
    save_json(run.run_dir / DECISION, decision)
    paired = run.paired
    report("gate: %s %s (test accuracy %s, champion %s at %s%s): %s",
           "blessed" if decision["blessed"] else "NOT blessed", decision["run_id"] or run.run_dir.name,
           _fmt(run.accuracy), decision["champion"] or "none", _fmt(run.champion_accuracy),
             "" if paired is None else f", only here {paired['only_challenger_right']} / only champion "
             f"{paired['only_champion_right']}, McNemar p={paired['mcnemar_p']:.3g}",
             "; ".join(decision["reasons"]))


def gate(shards_dir: Path, published_root: Path, run_dir: Path, config: PipelineConfig, *,
         run_id: str | None = None, registry: Registry | None = None) -> dict:
    """Decide whether ``run_dir`` (evaluated) is blessed; write ``decision.json`` there and return the decision.

    Reads ``shards_dir``'s test labels, ``published_root``'s champion and
    ``run_dir``'s metrics and predictions; ``config`` gives
    ``accuracy_floor``, ``gate_tolerance`` and ``publish_mode``; ``run_id``
    goes into the decision (None: the folder's name in the log line). The decision holds
    ``blessed``, ``reasons`` (a list of strings: why), every check, both
    accuracies, the champion's run id and path, and the paired counts with
    their McNemar p-value (null where the champion has no per-image
    predictions). ``registry``: ``published/`` on an object store
    (``Registry(store=S3Store(...))``; default the folder ``published_root``).
    Raises FileNotFoundError when evaluate has not finished,
    ValueError for unreadable metrics or predictions.

    Phases, in order: read, check (sanity), compare (with the champion),
    decide, write.
    """
    run = _read(Path(run_dir), Path(published_root), registry)
    _check(run, config)
    _compare(run, config, shards_dir)
    decision = _decide(run, config, run_id)
    _write(run, decision)
    return decision


def _fmt(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.4f}"
