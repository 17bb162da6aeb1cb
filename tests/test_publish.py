import json
import os
import threading
import time
from pathlib import Path

import pytest

from alexnet_tasks.config import PipelineConfig
from alexnet_tasks.layout import TRAIN_SUMMARY
from alexnet_tasks.atomic import exchange
from alexnet_tasks.release.publish import INDEX_FIELDS, load_runs, publish, read_index
from builders import fake_run, folder, write_decision, write_train_summary

def test_publish_copies_indexes_then_points_latest(tmp_path):
    published = tmp_path / "published"
    run = fake_run(tmp_path, "run_a", 0.5)
    (run / "predictions.npy").write_bytes(b"predictions-run_a")
    result = publish(run, published, run_id="manual__a:1")
    target = published / "runs" / folder("manual__a:1")
    assert Path(result["published"]) == target
    assert (target / "model.keras").read_bytes() == b"model-run_a"
    assert (target / "predictions.npy").read_bytes() == b"predictions-run_a"
    assert (target / "tensorboard" / "train" / "events.out.tfevents.1").is_file()
    assert os.readlink(published / "latest") == f"runs/{folder('manual__a:1')}"
    assert json.loads((published / "latest" / "metrics.json").read_text())["test_accuracy"] == 0.5
    [line] = read_index(published)
    assert line["run_id"] == "manual__a:1" and line["test_accuracy"] == 0.5
    assert line["path"] == f"runs/{folder('manual__a:1')}"

    publish(fake_run(tmp_path, "run_b", 0.7), published, run_id="manual__b")
    assert os.readlink(published / "latest") == f"runs/{folder('manual__b')}"
    assert [line["run_id"] for line in read_index(published)] == ["manual__a:1", "manual__b"]


def test_publishing_the_same_run_twice_adds_no_duplicate_line(tmp_path):
    published = tmp_path / "published"
    run = fake_run(tmp_path, "run_a", 0.5)
    publish(run, published, run_id="run_a")
    publish(run, published, run_id="run_a")
    assert [line["run_id"] for line in read_index(published)] == ["run_a"]
    # An unknown fingerprint is never the same training: the copy was replaced and its line appended again.
    assert len((published / "index.jsonl").read_text().splitlines()) == 2


def test_incomplete_run_is_refused_and_latest_stays(tmp_path):
    published = tmp_path / "published"
    publish(fake_run(tmp_path, "good", 0.6), published, run_id="good")
    broken = fake_run(tmp_path, "broken", 0.9)
    (broken / "model.keras").unlink()
    with pytest.raises(FileNotFoundError, match="model.keras: missing"):
        publish(broken, published, run_id="broken")
    assert os.readlink(published / "latest") == f"runs/{folder('good')}"
    assert not (published / "runs" / folder("broken")).exists()
    assert [line["run_id"] for line in read_index(published)] == ["good"]
    assert not [p for p in (published / "runs").iterdir() if ".tmp-" in p.name]


def test_run_ids_that_differ_only_in_punctuation_publish_apart(tmp_path):
    published = tmp_path / "published"
    publish(fake_run(tmp_path, "colon", 0.5, "a" * 64), published, run_id="a:b")
    publish(fake_run(tmp_path, "underscore", 0.6, "b" * 64), published, run_id="a_b")
    lines = {line["run_id"]: line for line in read_index(published)}
    assert set(lines) == {"a:b", "a_b"} and lines["a:b"]["path"] != lines["a_b"]["path"]
    assert (published / lines["a:b"]["path"] / "model.keras").read_bytes() == b"model-colon"
    assert (published / lines["a_b"]["path"] / "model.keras").read_bytes() == b"model-underscore"


def test_index_line_carries_fingerprint_schedule_devices_and_settings(tmp_path):
    published = tmp_path / "published"
    config = PipelineConfig(image_size=67, epochs=3, max_train_minutes=1.5)
    publish(fake_run(tmp_path, "run_a", 0.5, "c" * 64, truncated=True), published, config, run_id="run_a")
    [line] = read_index(published)
    assert line["fingerprint"] == "c" * 64
    assert line["truncated"] is True and line["epochs_run"] == 2 and line["epochs_planned"] == 3
    assert line["devices"] == "CPU" and line["seconds"] == 12.5
    assert line["config"] == config.to_dict()
    assert (published / line["path"] / TRAIN_SUMMARY).is_file()


def test_old_index_lines_without_the_new_fields_still_load(tmp_path):
    published = tmp_path / "published"
    published.mkdir()
    old = {"run_id": "old", "published_at": "2026-11-01T00:00:00+00:00", "test_accuracy": 0.4,
           "test_loss": 1.5, "path": "runs/old"}
    (published / "index.jsonl").write_text(json.dumps(old) + "\n")
    [line] = read_index(published)
    assert line["run_id"] == "old" and line["test_accuracy"] == 0.4
    assert line["fingerprint"] is None and line["truncated"] is None and line["config"] is None
    assert set(line) == set(INDEX_FIELDS)
    for key in ("data_key", "code_version", "validation_accuracy", "blessed", "reasons", "hyperparameters"):
        assert line[key] is None, key
    publish(fake_run(tmp_path, "new", 0.6, "d" * 64), published, run_id="new")
    assert [line["run_id"] for line in read_index(published)] == ["old", "new"]


def test_index_line_carries_the_runs_lineage(tmp_path):
    published = tmp_path / "published"
    config = PipelineConfig(source_md5="a" * 32, image_size=67, epochs=3, split_seed=7, seed=11)
    run = fake_run(tmp_path, "run_a", 0.61, "c" * 64, validation_accuracy=0.58)
    write_decision(run, comparison="no champion yet")
    publish(run, published, config, run_id="scheduled__2026-11-29")
    [line] = read_index(published)
    assert set(line) == set(INDEX_FIELDS)
    assert line["fingerprint"] == "c" * 64 and line["config"] == config.to_dict()
    assert line["data_key"] == f"{'a' * 32}/shards-{config.shards_key()}"
    assert line["code_version"] == "0.1.0+test"  # train_summary.json's fingerprint_parts
    assert line["hyperparameters"] == {"recipe": "fast"}  # the resolved recipe, from the same parts
    assert (line["epochs_run"], line["epochs_planned"], line["truncated"]) == (3, 3, False)
    assert line["validation_accuracy"] == 0.58 and line["test_accuracy"] == 0.61
    assert line["seconds"] == 12.5 and line["devices"] == "CPU"
    assert line["blessed"] is True and line["reasons"] == ["sanity checks hold", "no champion yet"]
    assert (published / line["path"] / "decision.json").is_file()


def test_lineage_fields_without_summary_or_decision_are_null(tmp_path):
    published = tmp_path / "published"
    publish(fake_run(tmp_path, "bare", 0.5), published, run_id="bare")
    [line] = read_index(published)
    for key in ("data_key", "code_version", "validation_accuracy", "blessed", "reasons", "fingerprint",
                "hyperparameters"):
        assert line[key] is None, key


def test_an_unblessed_decision_is_recorded_with_its_reasons(tmp_path):
    published = tmp_path / "published"
    run = fake_run(tmp_path, "diverged", 0.1, "5" * 64)
    write_decision(run, failed=["test loss is not finite", "test accuracy 0.1000 is below the floor 0.25"])
    publish(run, published, run_id="diverged")
    [line] = read_index(published)
    assert line["blessed"] is False
    assert line["reasons"] == ["test loss is not finite", "test accuracy 0.1000 is below the floor 0.25"]


@pytest.mark.parametrize(
    "content, message",
    [("{oops", "not valid JSON"), ('{"blessed": "yes", "reasons": []}', "blessed must be true or false"),
     ('{"blessed": true, "reasons": "fine"}', "reasons must be a list of strings"),
     ("[true]", "expected a JSON object")],
)
def test_a_broken_decision_is_refused_by_name_and_nothing_is_published(tmp_path, content, message):
    published = tmp_path / "published"
    run = fake_run(tmp_path, "run_a", 0.5, "6" * 64)
    (run / "decision.json").write_text(content)
    with pytest.raises(ValueError, match=f"decision.json.*{message}"):
        publish(run, published, run_id="run_a")
    assert read_index(published) == [] and not (published / "runs" / folder("run_a")).exists()


def test_load_runs_gives_the_table_of_runs_newest_first(tmp_path):
    published = tmp_path / "published"
    assert load_runs(published) == []
    published.mkdir()
    old = {"run_id": "old", "published_at": "2026-11-01T00:00:00+00:00", "test_accuracy": 0.4,
           "test_loss": 1.5, "path": "runs/old"}
    (published / "index.jsonl").write_text(json.dumps(old) + "\n")
    publish(fake_run(tmp_path, "first", 0.5, "1" * 64), published, run_id="first")
    second = fake_run(tmp_path, "second", 0.6, "2" * 64, validation_accuracy=0.55)
    write_decision(second)
    publish(second, published, run_id="second")
    table = load_runs(published)
    assert [row["run_id"] for row in table] == ["second", "first", "old"]
    assert [row["latest"] for row in table] == [True, False, False]
    assert table[0]["validation_accuracy"] == 0.55 and table[0]["blessed"] is True
    assert table[2]["fingerprint"] is None and table[2]["blessed"] is None
    assert all(set(row) == set(INDEX_FIELDS) | {"latest"} for row in table)


def test_republishing_the_same_fingerprint_changes_nothing(tmp_path):
    published = tmp_path / "published"
    run = fake_run(tmp_path, "run_a", 0.5, "e" * 64)
    publish(run, published, run_id="run_a")
    index_before = (published / "index.jsonl").read_bytes()
    model = published / "runs" / folder("run_a") / "model.keras"
    inode_before = model.stat().st_ino
    time.sleep(1.1)  # a rewritten line would carry a later publish time
    publish(run, published, run_id="run_a")
    assert (published / "index.jsonl").read_bytes() == index_before
    assert model.stat().st_ino == inode_before  # not copied again


def test_a_different_fingerprint_replaces_the_published_run_whole(tmp_path):
    published = tmp_path / "published"
    publish(fake_run(tmp_path, "first", 0.5, "1" * 64), published, run_id="same-id")
    publish(fake_run(tmp_path, "other", 0.9, "9" * 64), published, run_id="other")
    publish(fake_run(tmp_path, "second", 0.7, "2" * 64), published, run_id="same-id")
    target = published / "runs" / folder("same-id")
    assert (target / "model.keras").read_bytes() == b"model-second"
    assert json.loads((target / "metrics.json").read_text())["fingerprint"] == "2" * 64
    lines = read_index(published)
    assert [line["run_id"] for line in lines] == ["other", "same-id"]
    assert lines[-1]["fingerprint"] == "2" * 64 and lines[-1]["test_accuracy"] == 0.7
    assert os.readlink(published / "latest") == f"runs/{folder('same-id')}"
    assert sorted(path.name for path in (published / "runs").iterdir() if not path.name.startswith(".")) == sorted(
        [folder("same-id"), folder("other")]
    )


def test_unknown_fingerprints_are_never_taken_for_the_same_run(tmp_path):
    published = tmp_path / "published"
    publish(fake_run(tmp_path, "first", 0.5), published, run_id="same-id")
    publish(fake_run(tmp_path, "second", 0.7), published, run_id="same-id")
    target = published / "runs" / folder("same-id")
    assert (target / "model.keras").read_bytes() == b"model-second"
    [line] = read_index(published)
    assert line["fingerprint"] is None and line["test_accuracy"] == 0.7


def test_metrics_from_another_training_are_refused(tmp_path):
    published = tmp_path / "published"
    run = fake_run(tmp_path, "run_a", 0.5, "3" * 64)
    write_train_summary(run, "4" * 64)  # trained again after evaluate
    with pytest.raises(ValueError, match="metrics.json.*another training.*evaluate again"):
        publish(run, published, run_id="run_a")
    assert not (published / "runs" / folder("run_a")).exists()
    assert read_index(published) == []


def test_readers_never_miss_a_run_while_it_is_replaced(tmp_path):
    (tmp_path / "probe-a").mkdir()
    (tmp_path / "probe-b").mkdir()
    if not exchange(tmp_path / "probe-a", tmp_path / "probe-b"):
        pytest.skip("this system cannot exchange two folders atomically; publish falls back to two renames")
    published = tmp_path / "published"
    runs = [fake_run(tmp_path, f"version{n}", 0.5, f"{n}" * 64) for n in range(1, 9)]
    publish(runs[0], published, run_id="same-id")
    misses, stop = [], threading.Event()

    def read_latest():
        while not stop.is_set():
            try:
                (published / "latest" / "model.keras").read_bytes()
            except FileNotFoundError as error:
                misses.append(error)

    reader = threading.Thread(target=read_latest)
    reader.start()
    try:
        for run in runs[1:]:
            publish(run, published, run_id="same-id")
    finally:
        stop.set()
        reader.join()
    assert misses == []
    assert (published / "latest" / "model.keras").read_bytes() == b"model-version8"
