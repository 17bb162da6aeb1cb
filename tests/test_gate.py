"""The gate on real files: metrics, predictions and a real test shard; McNemar against known values."""

import json
import math
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from alexnet_tasks.config import PipelineConfig
from alexnet_tasks.release.gate import DECISION, gate, mcnemar_p, paired_counts
from alexnet_tasks.release.publish import publish, read_index

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# Ten test images, their true classes, and the shard's recorded image digest.
LABELS = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
IMAGES_SHA = "a" * 64


# --------------------------------------------------------------------------- McNemar
@pytest.mark.parametrize(
    "only_first, only_second, expected",
    [
        (0, 0, 1.0),  # no discordant images: no evidence either way
        (1, 0, 1.0),
        (0, 5, 0.0625),  # 2 * 0.5**5
        (0, 10, 0.001953125),  # 2 * 0.5**10
        (2, 8, 0.109375),  # 2 * (1 + 10 + 45) / 1024
        (8, 2, 0.109375),  # symmetric
        (3, 3, 1.0),
        (10, 20, 0.09873714670538902),  # R: binom.test(10, 30)$p.value
        (59, 41, 0.08862608011406758),  # R: binom.test(41, 100)$p.value
    ],
)
def test_mcnemar_exact_p_values(only_first, only_second, expected):
    assert mcnemar_p(only_first, only_second) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_is_exact_for_a_whole_test_set():
    # 10,000 test images with thousands of discordant ones: no overflow, a probability.
    assert mcnemar_p(5000, 5100) == pytest.approx(0.3245815463313939, rel=1e-9)
    assert 0 < mcnemar_p(400, 600) < 1e-9


@pytest.mark.parametrize("bad", [-1, 1.5, True, None])
def test_mcnemar_refuses_what_is_not_a_count(bad):
    with pytest.raises(ValueError, match="must be a count"):
        mcnemar_p(bad, 3)


def test_paired_counts_image_by_image():
    labels = np.array([0, 1, 2, 3, 4, 5])
    challenger = np.array([0, 1, 2, 9, 9, 5])  # right on 0, 1, 2, 5
    champion = np.array([0, 9, 9, 3, 9, 5])  # right on 0, 3, 5
    assert paired_counts(challenger, champion, labels) == {
        "images": 6, "both_right": 2, "both_wrong": 1, "only_challenger_right": 2, "only_champion_right": 1,
        "mcnemar_p": 1.0,
    }
    with pytest.raises(ValueError, match="same images"):
        paired_counts(challenger[:5], champion, labels)


# --------------------------------------------------------------------------- the gate on run folders
@pytest.fixture
def shards(tmp_path) -> Path:
    """A test shard as build_shards writes it (labels, class names, image digest)."""
    folder = tmp_path / "shards"
    folder.mkdir()
    with h5py.File(folder / "test.h5", "w") as handle:
        handle.create_dataset("images", data=np.zeros((len(LABELS), 2, 2, 3), dtype=np.float32))
        handle.create_dataset("labels", data=LABELS.astype(np.uint8))
        handle.attrs["images_sha256"] = IMAGES_SHA
        handle.attrs["class_names"] = CLASSES
    return folder


def evaluated_run(root: Path, name: str, predictions, *, loss=1.2, truncated=False, fingerprint=None,
                  classes=CLASSES, images_sha=IMAGES_SHA, nonfinite=(), plain=None, views="flip") -> Path:
    """A run folder as evaluate leaves it: metrics.json and predictions.npy (and a stand-in model).

    ``plain``: the run used test-time augmentation ``views``; these are its plain predictions.
    """
    run = root / "runs" / name
    run.mkdir(parents=True)
    predictions = np.asarray(predictions, dtype=np.uint8)
    np.save(run / "predictions.npy", predictions, allow_pickle=False)
    (run / "model.keras").write_bytes(b"model-" + name.encode())
    metrics = {
        "test_accuracy": float((predictions == LABELS).mean()), "test_loss": loss, "test_images": len(LABELS),
        "class_names": list(classes), "test_images_sha256": images_sha, "truncated": truncated,
        "fingerprint": fingerprint or (name.encode().hex() * 64)[:64],
        "finite": not nonfinite, "nonfinite": list(nonfinite),
    }
    if plain is not None:
        plain = np.asarray(plain, dtype=np.uint8)
        np.save(run / "predictions_plain.npy", plain, allow_pickle=False)
        metrics.update(test_time_augmentation=views, test_accuracy_augmented=metrics["test_accuracy"],
                       test_accuracy_plain=float((plain == LABELS).mean()))
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def right(count: int) -> list[int]:
    """Predictions right on the first ``count`` images, wrong (class 0 for 9, else 9) on the rest."""
    return [int(label) if index < count else (0 if label == 9 else 9) for index, label in enumerate(LABELS)]


def settings(**values) -> PipelineConfig:
    return PipelineConfig.from_dict(values)


def crown(tmp_path, shards, count=6, name="champion") -> dict:
    """Gate and publish a run right on ``count`` images: it becomes the champion."""
    run = evaluated_run(tmp_path, name, right(count))
    decision = gate(shards, tmp_path / "published", run, settings(), run_id=name)
    assert decision["blessed"] is True
    publish(run, tmp_path / "published", run_id=name)
    return decision


def test_without_a_champion_sanity_alone_decides(tmp_path, shards):
    run = evaluated_run(tmp_path, "first", right(3))  # 0.3, above the 0.25 floor
    decision = gate(shards, tmp_path / "published", run, settings(), run_id="first")
    assert decision["blessed"] is True and decision["champion"] is None and decision["paired"] is None
    assert decision["reasons"] == ["sanity checks hold", "no champion yet: the sanity checks decide"]
    assert json.loads((run / DECISION).read_text()) == decision
    assert not [path for path in run.iterdir() if ".tmp-" in path.name]


def test_a_better_run_is_blessed_with_the_paired_comparison(tmp_path, shards):
    crown(tmp_path, shards, 6)
    # Right on images 0-7 except 5; the champion was right on 0-5: two only here, one only there.
    predictions = right(8)
    predictions[5] = 9
    run = evaluated_run(tmp_path, "better", predictions)
    decision = gate(shards, tmp_path / "published", run, settings(), run_id="better")
    assert decision["blessed"] is True and decision["champion"] == "champion"
    assert decision["test_accuracy"] == 0.7 and decision["champion_accuracy"] == 0.6
    assert decision["paired"] == {"images": 10, "both_right": 5, "both_wrong": 2, "only_challenger_right": 2,
                                  "only_champion_right": 1, "mcnemar_p": 1.0}
    assert decision["champion_path"] == os.readlink(tmp_path / "published" / "latest")


def test_a_worse_run_is_refused_unless_within_the_tolerance(tmp_path, shards):
    crown(tmp_path, shards, 6)
    run = evaluated_run(tmp_path, "worse", right(5))
    refused = gate(shards, tmp_path / "published", run, settings(), run_id="worse")
    assert refused["blessed"] is False and refused["sanity_passed"] is True
    assert refused["checks"]["not_worse_than_champion"]["passed"] is False
    assert "0.5000 is not at least the champion champion's 0.6000" in "; ".join(refused["reasons"])
    assert refused["paired"]["only_champion_right"] == 1 and refused["paired"]["only_challenger_right"] == 0
    # One image in ten is within a tolerance of 0.1 (not below 0.05).
    assert gate(shards, tmp_path / "published", run, settings(gate_tolerance=0.1), run_id="worse")["blessed"] is True
    assert gate(shards, tmp_path / "published", run, settings(gate_tolerance=0.05), run_id="worse")["blessed"] is False
    # An equal accuracy is not worse.
    same = evaluated_run(tmp_path, "same", right(6))
    assert gate(shards, tmp_path / "published", same, settings(), run_id="same")["blessed"] is True


def test_a_diverged_run_fails_the_finite_loss_check(tmp_path, shards):
    run = evaluated_run(tmp_path, "diverged", [0] * 10, loss=None, nonfinite=["test_loss"])
    decision = gate(shards, tmp_path / "published", run, settings(accuracy_floor=0.0), run_id="diverged")
    assert decision["blessed"] is False and decision["checks"]["finite_loss"]["passed"] is False
    assert "; ".join(decision["reasons"]) == "test loss is not finite (the model diverged): test_loss not finite"
    assert decision["test_loss"] is None


def test_the_accuracy_floor(tmp_path, shards):
    run = evaluated_run(tmp_path, "weak", right(2))  # 0.2
    decision = gate(shards, tmp_path / "published", run, settings(), run_id="weak")
    assert decision["blessed"] is False and "; ".join(decision["reasons"]) == "test accuracy 0.2000 is below the floor 0.25"
    assert gate(shards, tmp_path / "published", run, settings(accuracy_floor=0.2), run_id="weak")["blessed"] is True


def test_a_truncated_run_is_refused(tmp_path, shards):
    run = evaluated_run(tmp_path, "cut", right(9), truncated=True)
    decision = gate(shards, tmp_path / "published", run, settings(), run_id="cut")
    assert decision["blessed"] is False
    assert "; ".join(decision["reasons"]) == "training was truncated before its schedule ended"


def test_other_class_names_than_the_champions_are_refused(tmp_path, shards):
    crown(tmp_path, shards, 6)
    run = evaluated_run(tmp_path, "renamed", right(9), classes=[*CLASSES[:9], "lorry"])
    decision = gate(shards, tmp_path / "published", run, settings(), run_id="renamed")
    assert decision["blessed"] is False and decision["checks"]["class_names"]["passed"] is False
    assert "differ from the champion's" in "; ".join(decision["reasons"])


def test_runs_scored_on_other_test_images_are_not_compared(tmp_path, shards):
    crown(tmp_path, shards, 6)
    run = evaluated_run(tmp_path, "elsewhere", right(9), images_sha="b" * 64)
    decision = gate(shards, tmp_path / "published", run, settings(), run_id="elsewhere")
    assert decision["blessed"] is False and decision["paired"] is None
    assert "scored on other test images" in "; ".join(decision["reasons"])


def test_labels_from_a_shard_of_other_images_are_refused(tmp_path, shards):
    crown(tmp_path, shards, 6)
    with h5py.File(shards / "test.h5", "a") as handle:
        handle.attrs["images_sha256"] = "c" * 64
    run = evaluated_run(tmp_path, "next", right(7))
    with pytest.raises(ValueError, match="test.h5: holds other test images"):
        gate(shards, tmp_path / "published", run, settings(), run_id="next")
    assert not (run / DECISION).exists()


def test_a_champion_without_predictions_is_compared_by_accuracy(tmp_path, shards):
    crown(tmp_path, shards, 6)
    (tmp_path / "published" / "latest" / "predictions.npy").unlink()  # published before they existed
    decision = gate(shards, tmp_path / "published", evaluated_run(tmp_path, "next", right(7)), settings(), run_id="next")
    assert decision["blessed"] is True and decision["paired"] is None
    assert "compared by accuracy alone" in "; ".join(decision["reasons"])


def test_publish_mode_always_blesses_and_records_what_the_checks_found(tmp_path, shards):
    crown(tmp_path, shards, 6)
    run = evaluated_run(tmp_path, "forced", right(1), truncated=True)
    decision = gate(shards, tmp_path / "published", run, settings(publish_mode="always"), run_id="forced")
    assert decision["blessed"] is True and decision["publish_mode"] == "always"
    assert decision["sanity_passed"] is False and decision["checks_passed"] is False
    assert "; ".join(decision["reasons"]).startswith("publish_mode always: published although test accuracy 0.1000 is below")
    assert "truncated" in "; ".join(decision["reasons"]) and decision["paired"]["only_champion_right"] == 5


def test_gate_needs_evaluate_first(tmp_path, shards):
    run = tmp_path / "runs" / "bare"
    run.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="metrics.json: missing; evaluate must finish"):
        gate(shards, tmp_path / "published", run, settings(), run_id="bare")
    (run / "metrics.json").write_text(json.dumps({"test_accuracy": 0.5, "test_loss": 1.0}))
    with pytest.raises(FileNotFoundError, match="predictions.npy: missing"):
        gate(shards, tmp_path / "published", run, settings(), run_id="bare")


def test_a_champion_without_a_test_accuracy_leaves_the_decision_to_sanity(tmp_path, shards):
    crown(tmp_path, shards, 6)
    metrics_path = tmp_path / "published" / "latest" / "metrics.json"
    metrics_path.write_text(json.dumps({**json.loads(metrics_path.read_text()), "test_accuracy": None}))
    decision = gate(shards, tmp_path / "published", evaluated_run(tmp_path, "next", right(3)), settings(), run_id="next")
    assert decision["blessed"] is True and decision["champion_accuracy"] is None
    assert "has no test accuracy to compare with" in "; ".join(decision["reasons"])


def test_a_broken_latest_is_named(tmp_path, shards):
    published = tmp_path / "published"
    published.mkdir()
    (published / "latest").symlink_to("runs/gone")
    with pytest.raises(FileNotFoundError, match="latest points to a run without metrics"):
        gate(shards, published, evaluated_run(tmp_path, "next", right(7)), settings(), run_id="next")


# --------------------------------------------------------------------------- publish follows the decision
def test_an_unblessed_run_is_recorded_without_its_model_and_latest_stays(tmp_path, shards):
    published = tmp_path / "published"
    crown(tmp_path, shards, 6)
    champion_target = os.readlink(published / "latest")
    run = evaluated_run(tmp_path, "worse", right(4))
    gate(shards, published, run, settings(), run_id="worse")
    result = publish(run, published, settings(), run_id="worse")
    assert result["blessed"] is False and result["action"] == "recorded"
    assert os.readlink(published / "latest") == champion_target
    champion, worse = read_index(published)
    assert champion["run_id"] == "champion" and worse["run_id"] == "worse"
    assert worse["blessed"] is False and "is not at least the champion" in "; ".join(worse["reasons"])
    record = published / worse["path"]
    assert (record / "metrics.json").is_file() and (record / DECISION).is_file()
    assert (record / "predictions.npy").is_file() and not (record / "model.keras").exists()
    assert (run / "model.keras").is_file()  # the run folder keeps its model

    # Published anyway later (publish_mode always): the same training, now with its model, becomes latest.
    gate(shards, published, run, settings(publish_mode="always"), run_id="worse")
    again = publish(run, published, settings(publish_mode="always"), run_id="worse")
    assert again["blessed"] is True and again["action"] == "published"
    assert (record / "model.keras").read_bytes() == b"model-worse"
    assert os.readlink(published / "latest") == worse["path"]
    [_, line] = read_index(published)
    assert line["blessed"] is True and line["reasons"][0].startswith("publish_mode always")
    assert json.loads((record / DECISION).read_text())["publish_mode"] == "always"


def test_a_decision_for_another_training_is_refused(tmp_path, shards):
    run = evaluated_run(tmp_path, "run", right(5), fingerprint="1" * 64)
    gate(shards, tmp_path / "published", run, settings(), run_id="run")
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**metrics, "fingerprint": "2" * 64}))  # retrained, re-evaluated
    with pytest.raises(ValueError, match="decision.json: made for another training.*run the gate again"):
        publish(run, tmp_path / "published", run_id="run")
    assert read_index(tmp_path / "published") == []


def test_an_unblessed_retraining_of_the_champions_run_id_keeps_the_champion(tmp_path, shards):
    published = tmp_path / "published"
    crown(tmp_path, shards, 6, name="nightly")
    before = read_index(published)
    rerun = tmp_path / "rerun"
    run = evaluated_run(rerun, "nightly", right(2), fingerprint="3" * 64)
    gate(shards, published, run, settings(), run_id="nightly")
    assert publish(run, published, run_id="nightly")["action"] == "kept"
    assert read_index(published) == before
    assert (published / "latest" / "model.keras").read_bytes() == b"model-nightly"
    assert math.isclose(json.loads((published / "latest" / "metrics.json").read_text())["test_accuracy"], 0.6)


def test_runs_with_the_same_test_time_augmentation_compare_their_augmented_figures(tmp_path, shards):
    champion = evaluated_run(tmp_path, "champion", right(6), plain=right(5))
    assert gate(shards, tmp_path / "published", champion, settings(), run_id="champion")["blessed"]
    publish(champion, tmp_path / "published", run_id="champion")
    run = evaluated_run(tmp_path, "new", right(7), plain=right(4))
    decision = gate(shards, tmp_path / "published", run, settings(), run_id="new")
    assert decision["compared_as"] == "flip" and decision["blessed"] is True
    assert (decision["compared_accuracy"], decision["champion_accuracy"]) == (0.7, 0.6)
    assert decision["paired"]["only_challenger_right"] == 1


def test_runs_with_other_test_time_augmentations_compare_their_plain_figures(tmp_path, shards):
    # The champion predicted plainly; the new run's augmented 0.7 would beat its 0.6, its plain 0.5 does not.
    crown(tmp_path, shards, 6)
    run = evaluated_run(tmp_path, "flipped", right(7), plain=right(5))
    decision = gate(shards, tmp_path / "published", run, settings(), run_id="flipped")
    assert decision["compared_as"] == "none" and decision["blessed"] is False
    assert decision["test_accuracy"] == 0.7 and decision["compared_accuracy"] == 0.5
    assert decision["champion_accuracy"] == 0.6 and decision["paired"]["only_champion_right"] == 1
    assert "plain test accuracy 0.5000 is not at least" in "; ".join(decision["reasons"])
    # The other way round: an augmented champion (published with its plain predictions) and a plain run.
    other = tmp_path / "other"
    champion = evaluated_run(other, "champion", right(9), plain=right(5), views="flip_shift")
    assert gate(shards, other / "published", champion, settings(), run_id="champion")["blessed"]
    publish(champion, other / "published", run_id="champion")
    assert (other / "published" / "latest" / "predictions_plain.npy").is_file()
    run = evaluated_run(other, "plain", right(6))
    decision = gate(shards, other / "published", run, settings(), run_id="plain")
    assert decision["compared_as"] == "none" and decision["blessed"] is True
    assert (decision["compared_accuracy"], decision["champion_accuracy"]) == (0.6, 0.5)
    assert decision["paired"] is not None
