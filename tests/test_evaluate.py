import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from alexnet_tasks.evaluate import confusion_matrix, evaluate, summarize
from alexnet_tasks.training.run_summary import TRAINING_FIELDS
from builders import scalar_tags, write_train_summary

NAMES = ["a", "b", "c"]


def test_summary_figures_from_known_predictions():
    probabilities = np.array(
        [[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]]
    )
    labels = np.array([0, 1, 1, 2])
    metrics = summarize(probabilities, labels, NAMES)
    assert metrics["test_accuracy"] == pytest.approx(0.75)
    assert metrics["test_loss"] == pytest.approx(-np.mean(np.log([0.8, 0.8, 0.3, 0.6])))
    assert metrics["per_class_accuracy"] == {"a": 1.0, "b": 0.5, "c": 1.0}
    assert metrics["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]


def test_confusion_matrix_rows_are_true_classes():
    matrix = confusion_matrix(np.array([0, 0, 2]), np.array([1, 0, 2]), 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 0, 0], [0, 0, 1]]


def test_wrong_prediction_shape_is_refused():
    with pytest.raises(ValueError, match=r"expected predictions of shape \(2, 3\)"):
        summarize(np.ones((2, 4)) / 4, np.array([0, 1]), NAMES)


@pytest.mark.slow
def test_evaluate_writes_metrics_picture_and_tensorboard(trained_run):
    config, shards_dir, run_dir, _ = trained_run
    result = evaluate(run_dir / "model.keras", shards_dir, run_dir, replace(config, test_time_augmentation="none"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test_images"] == 60 and metrics["test_accuracy"] == result["test_accuracy"]
    matrix = np.array(metrics["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == 60
    assert metrics["test_accuracy"] == pytest.approx(np.trace(matrix) / 60)
    assert set(metrics["per_class_accuracy"]) == set(metrics["class_names"])
    # What train recorded about the run comes along; unknown (null) when train wrote no summary.
    summary_path = run_dir / "train_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    for key in TRAINING_FIELDS:
        assert metrics[key] == summary.get(key), key
    for picture in ("confusion_matrix.png", "test_samples.png"):
        assert (run_dir / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tags = scalar_tags(run_dir / "tensorboard" / "test")
    assert {"test/test_accuracy", "test/test_loss", "test/confusion_matrix"} <= tags
    # Evaluating again replaces the test logs instead of duplicating them.
    evaluate(run_dir / "model.keras", shards_dir, run_dir, replace(config, test_time_augmentation="none"))
    assert len(list((run_dir / "tensorboard" / "test").glob("events.out.tfevents.*"))) == 1


def test_evaluate_without_a_model_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no trained model; run the train step first"):
        evaluate(tmp_path / "model.keras", tmp_path, tmp_path)


@pytest.mark.slow
def test_metrics_carry_the_training_fingerprint_and_schedule(trained_run, tmp_path):
    config, shards_dir, trained_dir, _ = trained_run
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(trained_dir / "model.keras", run_dir / "model.keras")
    summary = write_train_summary(run_dir, "f" * 64, truncated=True, epochs_run=2, epochs_planned=3,
                                  seconds=41.0, devices="CPU")
    evaluate(run_dir / "model.keras", shards_dir, run_dir, replace(config, test_time_augmentation="none"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {key: metrics[key] for key in TRAINING_FIELDS} == {key: summary[key] for key in TRAINING_FIELDS}
    assert metrics["fingerprint"] == "f" * 64 and metrics["truncated"] is True


@pytest.mark.parametrize(
    "content, message",
    [("{not json", "not valid JSON"), ('{"fingerprint": "abc"}', "fingerprint must be 64 lowercase hex"),
     ("[1, 2]", "expected a JSON object")],
)
def test_a_broken_train_summary_is_refused_by_name(tmp_path, content, message):
    (tmp_path / "model.keras").write_bytes(b"stand-in")
    (tmp_path / "train_summary.json").write_text(content)
    with pytest.raises(ValueError, match=f"train_summary.json.*{message}"):
        evaluate(tmp_path / "model.keras", tmp_path, tmp_path)
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.slow
def test_evaluate_stores_per_image_predictions_and_the_data_it_scored(trained_run, tmp_path):
    import keras

    from alexnet_tasks.release.publish import publish
    from alexnet_tasks.data.shards import load_split, read_attrs, shard_path

    config, shards_dir, trained_dir, _ = trained_run
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("model.keras", "history.json"):
        shutil.copy(trained_dir / name, run_dir / name)
    evaluate(run_dir / "model.keras", shards_dir, run_dir, replace(config, test_time_augmentation="none"))
    predictions = np.load(run_dir / "predictions.npy", allow_pickle=False)
    assert predictions.dtype == np.uint8 and predictions.shape == (60,)
    # One predicted class per test image, in the test shard's order.
    images, labels = load_split(shard_path(shards_dir, "test"))
    expected = keras.models.load_model(run_dir / "model.keras").predict(images, verbose=0).argmax(axis=1)
    np.testing.assert_array_equal(predictions, expected)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test_accuracy"] == pytest.approx(float((predictions == labels).mean()))
    assert metrics["test_images_sha256"] == read_attrs(shard_path(shards_dir, "test"))["images_sha256"]
    history = json.loads((run_dir / "history.json").read_text())
    assert metrics["validation_accuracy"] == history[-1]["val_accuracy"]
    assert not [path for path in run_dir.iterdir() if ".tmp-" in path.name]
    # The published copy carries the predictions too.
    published = publish(run_dir, tmp_path / "published", run_id="run-with-predictions")
    assert (Path(published["published"]) / "predictions.npy").read_bytes() == (run_dir / "predictions.npy").read_bytes()
    # Without a history (a run trained elsewhere), the validation accuracy is unknown.
    (run_dir / "history.json").unlink()
    evaluate(run_dir / "model.keras", shards_dir, run_dir, replace(config, test_time_augmentation="none"))
    assert json.loads((run_dir / "metrics.json").read_text())["validation_accuracy"] is None


def test_predictions_file_holds_one_uint8_class_per_image():
    import io

    from alexnet_tasks.evaluate import predictions_bytes

    stored = np.load(io.BytesIO(predictions_bytes(np.array([0, 9, 3]), 10)), allow_pickle=False)
    assert stored.dtype == np.uint8 and stored.tolist() == [0, 9, 3]
    with pytest.raises(ValueError, match="one class index below 10"):
        predictions_bytes(np.array([0, 10]), 10)
    with pytest.raises(ValueError, match="one class index below 10"):
        predictions_bytes(np.zeros((2, 2)), 10)


def test_validation_accuracy_is_the_last_epochs(tmp_path):
    from alexnet_tasks.evaluate import last_validation_accuracy

    assert last_validation_accuracy(tmp_path) is None
    (tmp_path / "history.json").write_text(json.dumps([{"epoch": 1, "val_accuracy": 0.3}, {"epoch": 2, "val_accuracy": 0.4}]))
    assert last_validation_accuracy(tmp_path) == 0.4
    (tmp_path / "history.json").write_text("[]")
    assert last_validation_accuracy(tmp_path) is None
    (tmp_path / "history.json").write_text("{")
    with pytest.raises(ValueError, match="history.json: not valid JSON"):
        last_validation_accuracy(tmp_path)


def test_non_finite_metrics_are_null_and_flagged():
    from alexnet_tasks.evaluate import finite_metrics

    metrics = finite_metrics({"test_loss": float("nan"), "test_accuracy": 0.1,
                              "per_class_accuracy": {"a": float("inf"), "b": 0.5}, "history": [1.0, float("-inf")]})
    assert metrics == {"test_loss": None, "test_accuracy": 0.1, "per_class_accuracy": {"a": None, "b": 0.5},
                       "history": [1.0, None], "finite": False,
                       "nonfinite": ["test_loss", "per_class_accuracy.a", "history.1"]}
    assert finite_metrics({"test_loss": 0.7})["finite"] is True and finite_metrics({"test_loss": 0.7})["nonfinite"] == []
    json.dumps(metrics, allow_nan=False)


def test_save_json_writes_strict_json(tmp_path):
    from alexnet_tasks.jsonio import save_json

    save_json(tmp_path / "history.json", [{"epoch": 1, "loss": float("nan"), "val_loss": float("inf")}])
    text = (tmp_path / "history.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == [{"epoch": 1, "loss": None, "val_loss": None}]


@pytest.mark.slow
def test_a_diverged_model_is_evaluated_into_valid_json(small_archive, tmp_path):
    """A model whose weights are NaN (as a diverged run leaves them) is scored, not crashed on."""
    import keras

    from conftest import prepare_shards

    config, shards_dir = prepare_shards(small_archive, tmp_path / "artifacts")
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(10, activation="softmax")])
    model.set_weights([np.full(weight.shape, np.nan, dtype=np.float32) for weight in model.get_weights()])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    model.save(run_dir / "model.keras")
    result = evaluate(run_dir / "model.keras", shards_dir, run_dir, replace(config, test_time_augmentation="none"))
    text = (run_dir / "metrics.json").read_text()
    metrics = json.loads(text)
    assert "NaN" not in text
    assert metrics["test_loss"] is None and result["test_loss"] is None
    assert metrics["finite"] is False and metrics["nonfinite"] == ["test_loss"]
    assert metrics["test_accuracy"] == pytest.approx(0.1)  # every image called class 0: chance on 60 balanced images
    json.dumps(result, allow_nan=False)  # what goes to XCom
    assert np.load(run_dir / "predictions.npy").tolist() == [0] * 60


def test_test_time_views_are_the_image_its_mirror_and_their_one_pixel_shifts():
    from alexnet_tasks.evaluate import shifted, test_time_views

    images = np.arange(2 * 4 * 5 * 3, dtype=np.float32).reshape(2, 4, 5, 3) + 1
    assert [view.shape for view in test_time_views(images, "none")] == [images.shape]
    plain, mirrored = test_time_views(images, "flip")
    np.testing.assert_array_equal(plain, images)
    np.testing.assert_array_equal(mirrored[:, :, 0], images[:, :, 4])
    views = list(test_time_views(images, "flip_shift"))
    assert len(views) == 10 and len({view.tobytes() for view in views}) == 10
    down = shifted(images, 1, 0)
    np.testing.assert_array_equal(down[:, 1:], images[:, :-1])
    assert not down[:, 0].any()  # zero-filled: a standardized image's mean
    left = shifted(images, 0, -1)
    np.testing.assert_array_equal(left[:, :, :-1], images[:, :, 1:])
    assert not left[:, :, -1].any()
    with pytest.raises(ValueError, match="test_time_augmentation must be one of"):
        list(test_time_views(images, "rotate"))


@pytest.mark.slow
def test_flip_averaging_keeps_the_plain_figures_beside_the_augmented(trained_run, tmp_path):
    import keras

    from alexnet_tasks.data.shards import load_split, shard_path

    config, shards_dir, trained_dir, _ = trained_run
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(trained_dir / "model.keras", run_dir / "model.keras")
    result = evaluate(run_dir / "model.keras", shards_dir, run_dir, replace(config, test_time_augmentation="flip"))
    images, labels = load_split(shard_path(shards_dir, "test"))
    model = keras.models.load_model(run_dir / "model.keras")
    plain = model.predict(images, verbose=0).astype(np.float64)
    both = (plain + model.predict(np.ascontiguousarray(images[:, :, ::-1]), verbose=0)) / 2
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test_time_augmentation"] == result["test_time_augmentation"] == "flip"
    assert metrics["test_accuracy"] == metrics["test_accuracy_augmented"] == \
        pytest.approx(float((both.argmax(axis=1) == labels).mean()))
    assert metrics["test_accuracy_plain"] == result["test_accuracy_plain"] == \
        pytest.approx(float((plain.argmax(axis=1) == labels).mean()))
    picked = np.clip(both[np.arange(60), labels], 1e-7, 1.0)  # as summarize clips
    assert metrics["test_loss"] == pytest.approx(float(-np.log(picked).mean()), rel=1e-4)
    np.testing.assert_array_equal(np.load(run_dir / "predictions.npy"), both.argmax(axis=1))
    np.testing.assert_array_equal(np.load(run_dir / "predictions_plain.npy"), plain.argmax(axis=1))
    assert "test/test_accuracy_plain" in scalar_tags(run_dir / "tensorboard" / "test")
    # Evaluated again without augmentation: plain figures only, and no stale plain file beside them.
    evaluate(run_dir / "model.keras", shards_dir, run_dir, replace(config, test_time_augmentation="none"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test_time_augmentation"] == "none" and metrics["test_accuracy_augmented"] is None
    assert metrics["test_accuracy"] == metrics["test_accuracy_plain"]
    assert not (run_dir / "predictions_plain.npy").exists()
