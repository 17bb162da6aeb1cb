"""The predict step (alexnet_tasks/serving/predict.py) on real images with a champion the pipeline published."""

from __future__ import annotations

import csv
import time
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def champion(trained_run, tmp_path_factory) -> tuple[Path, Path, object]:
    """``(published root, shards folder, config)``: the tiny trained run evaluated, gated and published."""
    from alexnet_tasks.evaluate import evaluate
    from alexnet_tasks.layout import Layout
    from alexnet_tasks.release.gate import gate
    from alexnet_tasks.release.publish import publish

    config, shards_dir, trained_dir, _ = trained_run
    layout = Layout(tmp_path_factory.mktemp("predict") / "artifacts")
    run_id = "manual__2026-11-30T10:00:00+00:00"
    run_dir = layout.run(run_id)
    shutil.copytree(trained_dir, run_dir)
    evaluate(run_dir / "model.keras", shards_dir, run_dir, replace(config, test_time_augmentation="none"))
    # The floor at 0: three epochs on tiny data need not reach the default 25%, and this run must be the champion.
    gated = replace(config, accuracy_floor=0.0)
    gate(shards_dir, layout.published, run_dir, gated, run_id=run_id)
    publish(run_dir, layout.published, gated, run_id=run_id)
    return layout.published, shards_dir, config


def cifar_test_images(shards_dir: Path, count: int):
    """The first ``count`` official test images as uint8 (the archive's own pixels) and as the test shard holds them."""
    import h5py

    from alexnet_tasks.data.download import load_cifar10

    batch_dir = next(Path(shards_dir).parent.glob("source/extracted/cifar-10-batches-py"))
    raw = load_cifar10(batch_dir).test_images[:count]
    with h5py.File(Path(shards_dir) / "test.h5", "r") as handle:
        return raw, handle["images"][:count]


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_scores_every_readable_image_as_training_saw_it_and_skips_the_unreadable(champion, tmp_path):
    import keras
    import numpy as np
    from PIL import Image

    from alexnet_tasks.serving.predict import predict

    published, shards_dir, _ = champion
    images = tmp_path / "inbox"
    (images / "more").mkdir(parents=True)
    raw, standardized = cifar_test_images(shards_dir, 3)
    for index, pixels in enumerate(raw):  # CIFAR's own 32x32 images, as PNG
        Image.fromarray(pixels).save(images / f"cifar_{index}.png")
    big = Image.fromarray(np.kron(raw[0], np.ones((9, 7, 1), dtype=np.uint8)))  # 288x224, another size
    big.save(images / "more" / "large.JPG", quality=95)
    big.convert("L").save(images / "grey.png")
    big.convert("RGBA").save(images / "transparent.png")
    big.convert("P").save(images / "palette.png")
    big.convert("CMYK").save(images / "print.jpeg")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    truncated = (images / "more" / "large.JPG").read_bytes()
    (images / "cut.jpg").write_bytes(truncated[: len(truncated) // 3])
    (images / "empty.jpeg").write_bytes(b"")
    (images / "notes.txt").write_text("not an image, not listed")

    output = tmp_path / "out"
    summary = predict(str(images), published, output)

    rows = read_rows(output / "predictions.csv")
    class_names = summary["class_names"]
    assert list(rows[0]) == ["file", "predicted_class"] + [f"probability_{name}" for name in class_names]
    scored = {Path(row["file"]).name for row in rows}
    assert scored == {"cifar_0.png", "cifar_1.png", "cifar_2.png", "large.JPG", "grey.png", "transparent.png",
                      "palette.png", "print.jpeg"}
    assert sorted(Path(item["file"]).name for item in summary["skipped"]) == ["broken.png", "cut.jpg", "empty.jpeg"]
    assert all(Path(item["file"]).name in item["error"] for item in summary["skipped"]), "each named in its reason"
    assert summary["images"] == 11 and summary["scored"] == 8 and sum(summary["per_class"].values()) == 8
    for row in rows:
        probabilities = [float(row[f"probability_{name}"]) for name in class_names]
        assert abs(sum(probabilities) - 1) < 1e-4
        assert row["predicted_class"] == class_names[int(np.argmax(probabilities))]
    # A CIFAR image scores exactly as the test shard's copy of it does: same pixels, same standardization.
    model = keras.models.load_model(published / "latest" / "model.keras")
    expected = model.predict(standardized, verbose=0)
    by_name = {Path(row["file"]).name: row for row in rows}
    for index in range(3):
        got = [float(by_name[f"cifar_{index}.png"][f"probability_{name}"]) for name in class_names]
        assert np.allclose(got, expected[index], atol=2e-6), index
    saved = json.loads((output / "summary.json").read_text())
    assert saved["champion"] == "manual__2026-11-30T10:00:00+00:00" and saved["scored"] == 8


def test_without_a_champion_or_a_folder_it_fails_naming_what_is_missing(tmp_path):
    from alexnet_tasks.errors import MissingInputError, PermanentError
    from alexnet_tasks.serving.predict import list_images, predict

    (tmp_path / "inbox").mkdir()
    with pytest.raises(PermanentError, match="no champion"):
        predict(str(tmp_path / "inbox"), tmp_path / "published", tmp_path / "out")
    assert not (tmp_path / "out").exists(), "nothing written"
    with pytest.raises(MissingInputError, match="nowhere"):
        list_images(str(tmp_path / "nowhere"))


@pytest.mark.cluster
def test_on_the_cluster_a_late_run_is_mailed_a_blessed_publish_triggers_predict_and_a_refused_one_does_not(
        served_archive, smtp, monkeypatch):
    """The native cluster with a 3-second run deadline: every run is late and mailed; the blessed one triggers
    alexnet_cifar10_predict on the model asset, which scores the inbox; the refused one triggers nothing."""
    import numpy as np
    from PIL import Image

    from conftest import native_cluster, wait_for_runs

    url, md5, artifacts = served_archive
    inbox = artifacts / "inbox"
    inbox.mkdir(parents=True)
    Image.fromarray(np.full((40, 50, 3), 200, dtype=np.uint8)).save(inbox / "plain.png")
    (inbox / "broken.jpg").write_bytes(b"not a jpeg")
    monkeypatch.setenv("ALEXNET_RUN_DEADLINE_MINUTES", "0.05")
    monkeypatch.setenv("AIRFLOW_CONN_ALEXNET_TEST_SMTP", json.dumps(
        {"conn_type": "smtp", "host": "127.0.0.1", "port": smtp.port,
         "extra": {"disable_ssl": True, "disable_tls": True, "timeout": 10, "retry_limit": 0}}))
    monkeypatch.setenv("ALEXNET_ALERT_SMTP_CONN", "alexnet_test_smtp")
    monkeypatch.setenv("ALEXNET_ALERT_EMAIL", "oncall@example.com")
    conf = {"source_url": url, "source_md5": md5, "image_size": 67, "epochs": 1, "validation_size": 50,
            "batch_size": 16, "recipe": "reference", "accuracy_floor": 0.0}
    with native_cluster(artifacts.parent / "cluster", "predict", redis_db=7) as (state, api):
        api.patch("/api/v2/dags/alexnet_cifar10_predict", {"is_paused": False})
        blessed = api.post("/api/v2/dags/alexnet_cifar10/dagRuns", {"logical_date": None, "conf": conf})["dag_run_id"]
        [run] = wait_for_runs(api, [blessed], 900)
        assert run["state"] == "success", run
        deadline = time.monotonic() + 300
        while True:
            predicted = api.get("/api/v2/dags/alexnet_cifar10_predict/dagRuns")["dag_runs"]
            if predicted and predicted[0]["state"] in ("success", "failed"):
                break
            assert time.monotonic() < deadline, f"no finished predict run: {predicted}"
            time.sleep(2)
        assert [item["state"] for item in predicted] == ["success"] and predicted[0]["run_type"] == "asset_triggered"
        [folder] = (artifacts / "scored").iterdir()
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["scored"] == 1 and [Path(item["file"]).name for item in summary["skipped"]] == ["broken.jpg"]
        assert summary["champion"] == blessed
        def subjects() -> list[str]:
            return [" ".join(str(received.message["Subject"]).split()) for received in smtp.messages]

        deadline = time.monotonic() + 120  # the scheduler finds the missed deadline, the triggerer mails it
        while not any(blessed in subject for subject in subjects()) and time.monotonic() < deadline:
            time.sleep(2)
        late = [subject for subject in subjects() if blessed in subject]
        assert late and "has not finished by its deadline" in late[0], subjects()

        refused = api.post("/api/v2/dags/alexnet_cifar10/dagRuns",
                           {"logical_date": None, "conf": {**conf, "accuracy_floor": 1.0}})["dag_run_id"]
        [run] = wait_for_runs(api, [refused], 900)
        assert run["state"] == "success", run
        time.sleep(20)  # what an asset event would have queued by now
        assert len(api.get("/api/v2/dags/alexnet_cifar10_predict/dagRuns")["dag_runs"]) == 1, "nothing triggered"
