import json
import os
from pathlib import Path

import pytest

from alexnet_tasks.publish import publish, read_index


def fake_run(root: Path, name: str, accuracy: float) -> Path:
    """A run folder as train and evaluate leave it (small stand-in files, real layout)."""
    run = root / "runs" / name
    (run / "tensorboard" / "train").mkdir(parents=True)
    (run / "tensorboard" / "train" / "events.out.tfevents.1").write_bytes(b"events")
    (run / "model.keras").write_bytes(b"model-" + name.encode())
    (run / "metrics.json").write_text(json.dumps({"test_accuracy": accuracy, "test_loss": 1.0}))
    (run / "config.json").write_text("{}")
    return run


def test_publish_copies_indexes_then_points_latest(tmp_path):
    published = tmp_path / "published"
    result = publish(fake_run(tmp_path, "run_a", 0.5), "manual__a:1", published)
    target = published / "runs" / "manual__a_1"
    assert Path(result["published"]) == target
    assert (target / "model.keras").read_bytes() == b"model-run_a"
    assert (target / "tensorboard" / "train" / "events.out.tfevents.1").is_file()
    assert os.readlink(published / "latest") == "runs/manual__a_1"
    assert json.loads((published / "latest" / "metrics.json").read_text())["test_accuracy"] == 0.5
    [line] = read_index(published)
    assert line["run_id"] == "manual__a:1" and line["test_accuracy"] == 0.5

    publish(fake_run(tmp_path, "run_b", 0.7), "manual__b", published)
    assert os.readlink(published / "latest") == "runs/manual__b"
    assert [line["run_id"] for line in read_index(published)] == ["manual__a:1", "manual__b"]


def test_publishing_the_same_run_twice_adds_no_duplicate_line(tmp_path):
    published = tmp_path / "published"
    run = fake_run(tmp_path, "run_a", 0.5)
    publish(run, "run_a", published)
    publish(run, "run_a", published)
    assert [line["run_id"] for line in read_index(published)] == ["run_a"]
    assert len((published / "index.jsonl").read_text().splitlines()) == 1


def test_incomplete_run_is_refused_and_latest_stays(tmp_path):
    published = tmp_path / "published"
    publish(fake_run(tmp_path, "good", 0.6), "good", published)
    broken = fake_run(tmp_path, "broken", 0.9)
    (broken / "model.keras").unlink()
    with pytest.raises(FileNotFoundError, match="model.keras: missing"):
        publish(broken, "broken", published)
    assert os.readlink(published / "latest") == "runs/good"
    assert not (published / "runs" / "broken").exists()
    assert [line["run_id"] for line in read_index(published)] == ["good"]
    assert not [p for p in (published / "runs").iterdir() if ".tmp-" in p.name]
