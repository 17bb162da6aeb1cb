"""The registry of published/: one policy for malformed lines, the champion, paging, finding one run."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import pytest

from alexnet_tasks.config import PipelineConfig
from alexnet_tasks.layout import INDEX, INDEX_TABLE, published_path
from alexnet_tasks.release.gate import champion_of
from alexnet_tasks.release.publish import publish
from alexnet_tasks.release.registry import INDEX_FIELDS, Registry, index_line, load_runs, read_index
from alexnet_tasks.release.retention import prune_runs
from builders import index_entry, s3_registry


def registry_with(tmp_path: Path, entries: list[dict]) -> Registry:
    registry = Registry(tmp_path / "published")
    for line in entries:
        assert registry.record(line)
    return registry


def test_an_index_line_holds_every_field_and_reads_back_the_same(tmp_path):
    line = index_entry("a")
    assert set(line) == set(INDEX_FIELDS)
    registry = registry_with(tmp_path, [line])
    assert registry.find("a") == {**line, "latest": False}
    assert read_index(tmp_path / "published") == [line]


def test_a_malformed_line_is_skipped_with_a_warning_by_every_reader(tmp_path, caplog):
    registry = registry_with(tmp_path, [index_entry("a")])
    with open(tmp_path / "published" / INDEX, "a") as index:
        index.write("not json\n")
        index.write("[1, 2]\n")
        index.write(json.dumps({"run_id": 7, "path": "runs/x"}) + "\n")
    registry.record(index_entry("b"))
    with caplog.at_level(logging.WARNING):
        assert [line["run_id"] for line in registry.entries()] == ["a", "b"]
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any(f"{INDEX}:2: not valid JSON" in text for text in warnings), warnings
    assert sum(f"{INDEX}:3: not an index line" in text or f"{INDEX}:4: not an index line" in text
               for text in warnings) == 2
    # Retention reads the same entries: the malformed lines stop nothing.
    (tmp_path / "runs").mkdir()
    assert prune_runs(tmp_path / "published", tmp_path / "runs") == []


def test_a_partial_last_line_is_not_read_and_the_next_append_cuts_it(tmp_path):
    registry = registry_with(tmp_path, [index_entry("a")])
    index = tmp_path / "published" / INDEX
    with open(index, "a") as handle:
        handle.write(json.dumps(index_entry("half"))[:40])  # a writer killed mid-line
    assert [line["run_id"] for line in registry.entries()] == ["a"]
    registry.record(index_entry("b"))
    assert [line["run_id"] for line in registry.entries()] == ["a", "b"]
    assert all(json.loads(text) for text in index.read_text().splitlines())


def test_a_runs_last_line_is_its_entry(tmp_path):
    registry = registry_with(tmp_path, [index_entry("a", 0.4), index_entry("b", 0.5), index_entry("a", 0.6, fingerprint="f" * 64)])
    assert [(line["run_id"], line["test_accuracy"]) for line in registry.entries()] == [("b", 0.5), ("a", 0.6)]
    assert registry.record(index_entry("a", 0.6, fingerprint="f" * 64)) is False, "the same training: no new line"
    assert len((tmp_path / "published" / INDEX).read_text().splitlines()) == 3


def test_old_lines_with_blessed_reason_and_train_settings_read_under_the_new_names(tmp_path):
    published = tmp_path / "published"
    published.mkdir()
    old = {"run_id": "old", "published_at": "2026-11-01T00:00:00+00:00", "test_accuracy": 0.4, "test_loss": 1.5,
           "path": "runs/old", "blessed": False, "blessed_reason": "test accuracy 0.4000 is below the floor 0.5",
           "train_settings": {"recipe": "fast", "epochs": 3}}
    (published / INDEX).write_text(json.dumps(old) + "\n")
    [line] = read_index(published)
    assert line["reasons"] == ["test accuracy 0.4000 is below the floor 0.5"] and "blessed_reason" not in line
    assert line["hyperparameters"] == {"recipe": "fast", "epochs": 3} and "train_settings" not in line
    [entry] = Registry(published).page().runs  # the lookup table reads the old names too
    assert entry["hyperparameters"] == {"recipe": "fast", "epochs": 3} and "train_settings" not in entry
    assert set(line) == set(INDEX_FIELDS)


def test_find_one_run_and_page_newest_first_with_filters(tmp_path):
    lines = [index_entry(f"run-{number:02d}", blessed=number % 3 != 0, recipe="reference" if number % 2 else "fast")
             for number in range(25)]
    registry = registry_with(tmp_path, lines)
    assert registry.find("run-07")["test_accuracy"] == 0.5 and registry.find("run-99") is None

    first = registry.page(size=10)
    assert [line["run_id"] for line in first.runs] == [f"run-{number:02d}" for number in range(24, 14, -1)]
    assert first.total == 25 and not first.has_newer and first.has_older
    last = registry.page(offset=20, size=10)
    assert [line["run_id"] for line in last.runs] == [f"run-{number:02d}" for number in range(4, -1, -1)]
    assert last.has_newer and not last.has_older

    blessed = registry.page(size=100, blessed=True)
    assert [line["run_id"] for line in blessed.runs] == [line["run_id"] for line in reversed(lines) if line["blessed"]]
    reference = registry.page(size=100, recipe="reference", blessed=True)
    assert all(line["config"]["recipe"] == "reference" and line["blessed"] for line in reference.runs)
    assert reference.total == sum(1 for number in range(25) if number % 2 and number % 3)
    assert registry.values("recipe") == ["fast", "reference"]
    for bad, message in (({"size": 0}, "page size 0"), ({"offset": -1}, "page offset -1"),
                         ({"colour": "x"}, "no filter 'colour'")):
        with pytest.raises(ValueError, match=message):
            registry.page(**bad)


def test_the_runs_of_one_sweep_are_a_filter(tmp_path):
    metrics = {"test_accuracy": 0.5, "test_loss": 1.0}
    lines = [index_line(f"sweep-{sweep}__trial{trial:02d}", metrics, "2026-11-29T02:00:00+00:00", PipelineConfig(),
                        sweep={"sweep": f"sweep-{sweep}", "trial": f"learning_rate={trial}"})
             for sweep in (1, 2) for trial in (0, 1)] + [index_entry("plain")]
    registry = registry_with(tmp_path, lines)
    found = registry.page(sweep="sweep-2")
    assert [line["run_id"] for line in found.runs] == ["sweep-2__trial01", "sweep-2__trial00"]
    assert [line["trial"] for line in found.runs] == ["learning_rate=1", "learning_rate=0"]
    assert registry.values("sweep") == ["sweep-1", "sweep-2"]
    assert registry.find("plain")["sweep"] is None and registry.page(sweep=None).total == 5


def test_the_lookup_table_follows_appends_and_is_rebuilt_when_deleted_or_damaged(tmp_path):
    registry = registry_with(tmp_path, [index_entry("a"), index_entry("b")])
    table = tmp_path / "published" / INDEX_TABLE
    assert table.is_file()
    Registry(tmp_path / "published").record(index_entry("c"))  # another writer appends
    assert registry.find("c") is not None and registry.page().total == 3
    table.unlink()
    assert [line["run_id"] for line in registry.entries()] == ["a", "b", "c"]
    table.write_bytes(b"not a database" * 100)
    assert registry.find("b") is not None
    # index.jsonl rewritten in place (same file, other lines): the table starts over from it.
    index = tmp_path / "published" / INDEX
    lines = [json.dumps(index_entry(run_id), sort_keys=True) + "\n" for run_id in ("x", "y", "w", "v")]
    with open(index, "r+") as handle:
        handle.write("".join(lines))
    assert [line["run_id"] for line in registry.entries()] == ["x", "y", "w", "v"]
    # index.jsonl replaced by another file: the same.
    index.unlink()
    registry_with(tmp_path, [index_entry("z")])
    assert [line["run_id"] for line in registry.entries()] == ["z"]


def test_where_the_table_cannot_be_written_it_is_built_for_the_read(tmp_path):
    from alexnet_tasks.release.registry import LocalStore

    registry_with(tmp_path, [index_entry("a"), index_entry("b")])

    class Elsewhere(LocalStore):
        def table_path(self):
            return tmp_path / "no-such-folder" / INDEX_TABLE

    registry = Registry(tmp_path / "published", Elsewhere(tmp_path / "published"))
    assert registry.find("b")["run_id"] == "b" and registry.page().total == 2
    assert not (tmp_path / "no-such-folder").exists()


def test_the_champion_is_the_entry_latest_points_to(tmp_path):
    published = tmp_path / "published"
    registry = registry_with(tmp_path, [index_entry("a"), index_entry("b", blessed=False)])
    assert registry.champion() is None and champion_of(published) is None
    registry.promote(published_path("a"))
    (published / published_path("a")).mkdir(parents=True)
    (published / published_path("a") / "metrics.json").write_text(json.dumps({"test_accuracy": 0.5}))
    champion = registry.champion()
    assert champion["run_id"] == "a" and champion["path"] == published_path("a")
    assert champion["metrics"] == {"test_accuracy": 0.5} and champion["entry"]["run_id"] == "a"
    assert champion_of(published)["run_id"] == "a"
    assert [row["latest"] for row in load_runs(published)] == [False, True]
    assert registry.find("a")["latest"] and not registry.find("b")["latest"]
    with pytest.raises(ValueError, match="champion path"):
        registry.promote("../elsewhere")


def test_publish_and_gate_agree_on_the_champion_through_the_registry(tmp_path):
    published = tmp_path / "published"
    for run_id, accuracy in (("first", 0.5), ("second", 0.6)):
        run = tmp_path / "runs" / run_id
        run.mkdir(parents=True)
        (run / "model.keras").write_bytes(b"model")
        (run / "metrics.json").write_text(json.dumps({"test_accuracy": accuracy, "test_loss": 1.0}))
        publish(run, published, run_id=run_id)
    registry = Registry(published)
    assert registry.champion()["run_id"] == "second" == champion_of(published)["run_id"]
    assert os.readlink(published / "latest") == registry.find("second")["path"]


# --------------------------------------------------------------------------- the promotion history
def test_every_change_of_champion_is_appended_to_the_history_newest_first(tmp_path):
    published = tmp_path / "published"
    registry = registry_with(tmp_path, [index_entry("a", fingerprint="fa"), index_entry("b", fingerprint="fb")])
    assert registry.history() == []
    first = registry.promote(published_path("a"))
    assert first["run_id"] == "a" and first["previous_run_id"] is None and first["reason"] == "gate"
    assert registry.promote(published_path("a")) is None, "latest already on a, same training: no change"
    registry.promote(published_path("b"), "approved", user="alice", comment="looks good",
                     dag_id="alexnet_cifar10", dag_run_id="manual__b")
    registry.promote(published_path("a"), "by_hand", user="bob", comment="rollback",
                     dag_id="alexnet_cifar10_promote", dag_run_id="manual__rollback")
    history = registry.history()
    assert [(line["run_id"], line["previous_run_id"], line["reason"], line["user"]) for line in history] == [
        ("a", "b", "by_hand", "bob"), ("b", "a", "approved", "alice"), ("a", None, "gate", None)]
    assert history[0]["comment"] == "rollback" and history[0]["dag_run_id"] == "manual__rollback"
    assert history[1]["fingerprint"] == "fb" and history[1]["previous_path"] == published_path("a")
    assert registry.champion()["run_id"] == "a"
    # Appended only: the earlier lines are the same bytes, in the same order.
    lines = (published / "promotions.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["run_id"] == "a" and json.loads(lines[1])["run_id"] == "b"


def test_a_promotion_by_a_person_needs_their_name_and_a_known_reason(tmp_path):
    registry = registry_with(tmp_path, [index_entry("a")])
    with pytest.raises(ValueError, match="needs the name of the user"):
        registry.promote(published_path("a"), "by_hand")
    with pytest.raises(ValueError, match="promotion reason 'whim'"):
        registry.promote(published_path("a"), "whim", user="bob")
    assert registry.champion() is None and registry.history() == []


def test_a_malformed_history_line_is_skipped_with_a_warning_as_in_the_index(tmp_path, caplog):
    published = tmp_path / "published"
    registry = registry_with(tmp_path, [index_entry("a"), index_entry("b")])
    registry.promote(published_path("a"))
    with open(published / "promotions.jsonl", "a") as handle:
        handle.write("not json\n[1, 2]\n")
    registry.promote(published_path("b"), "by_hand", user="bob", comment="why not")
    with open(published / "promotions.jsonl", "a") as handle:
        handle.write('{"run_id": "half')  # a writer killed mid-line
    with caplog.at_level(logging.WARNING):
        history = registry.history()
    assert [line["run_id"] for line in history] == ["b", "a"]
    warnings = [record.getMessage() for record in caplog.records]
    assert any("promotions.jsonl:2: not valid JSON" in text for text in warnings)
    assert any("promotions.jsonl:3: not a promotion line" in text for text in warnings)
    registry.promote(published_path("a"), "by_hand", user="carol", comment="back")
    assert [line["run_id"] for line in registry.history()] == ["a", "b", "a"]
    assert '"half' not in (published / "promotions.jsonl").read_text(), "the partial line was cut before appending"


# --------------------------------------------------------------------------- published/ on S3
def test_the_registry_on_s3_finds_pages_and_follows_the_champion_like_the_local_one(s3_bucket, tmp_path):
    lines = [index_entry(f"run-{number:02d}", blessed=number % 3 != 0) for number in range(12)]
    local = registry_with(tmp_path / "local", lines)
    remote = s3_registry(s3_bucket, tmp_path / "cache")
    assert not remote.store.exists() and remote.champion() is None and remote.entries() == []
    for line in lines:
        assert remote.record(line)
    again = index_entry("run-11", fingerprint="f" * 16)
    assert remote.record(again) and local.record(again)
    assert not remote.record(dict(again))  # the same publish again: nothing appended
    assert remote.entries() == local.entries()
    assert remote.page(size=5, blessed=True).runs == local.page(size=5, blessed=True).runs
    assert remote.find("run-07") == local.find("run-07")
    remote.promote(published_path("run-04"))
    remote.promote(published_path("run-05"))
    assert remote.champion()["run_id"] == "run-05" and remote.champion()["entry"] == remote.find("run-05")
    # Another host, another cache, the same store: the same runs; the table there is built from the store.
    other = s3_registry(s3_bucket, tmp_path / "other-cache")
    assert other.entries() == remote.entries() and other.champion()["path"] == published_path("run-05")
    assert other.record(index_entry("run-12"))
    assert remote.find("run-12") is not None and remote.page(size=1).runs[0]["run_id"] == "run-12"


_PUBLISHER = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[5])
from builders import index_entry, s3_registry
from alexnet_tasks.layout import published_path
bucket, name, cache, start = sys.argv[1], sys.argv[2], Path(sys.argv[3]), float(sys.argv[4])
registry = s3_registry(bucket, cache)
while time.time() < start:
    time.sleep(0.001)
for number in range(10):
    run_id = f"{name}-{number}"
    registry.record(index_entry(run_id))
    registry.promote(published_path(run_id))
"""


def test_two_publishes_racing_on_s3_keep_every_index_line_and_one_consistent_champion(s3_bucket, tmp_path):
    import subprocess
    import sys
    import time

    tests = Path(__file__).resolve().parent
    start = time.time() + 5
    env = {**os.environ, "PYTHONPATH": str(tests.parent)}
    publishers = [subprocess.Popen([sys.executable, "-c", _PUBLISHER, s3_bucket, name, str(tmp_path / name),
                                    str(start), str(tests)], env=env, stderr=subprocess.PIPE, text=True)
                  for name in ("first", "second")]
    for publisher in publishers:
        assert publisher.wait(timeout=300) == 0, publisher.stderr.read()
    registry = s3_registry(s3_bucket, tmp_path / "reader")
    run_ids = [line["run_id"] for line in registry.entries()]
    assert sorted(run_ids) == sorted(f"{name}-{number}" for name in ("first", "second") for number in range(10))
    for name in ("first", "second"):  # each publisher's lines in its own order
        assert [run_id for run_id in run_ids if run_id.startswith(name)] == [f"{name}-{number}" for number in range(10)]
    champion = registry.champion()
    assert champion["path"] in {published_path("first-9"), published_path("second-9")}
    assert champion["entry"]["run_id"] in {"first-9", "second-9"}


def test_a_lookup_table_built_before_the_sweep_filter_is_rebuilt_with_it(tmp_path):
    import sqlite3

    registry = registry_with(tmp_path, [index_entry("a"), index_entry("b")])
    table = tmp_path / "published" / "index.sqlite"
    with contextlib.closing(sqlite3.connect(table)) as db:  # the table as the version before sweeps built it
        db.executescript("DROP INDEX runs_sweep; ALTER TABLE runs DROP COLUMN sweep;"
                         "UPDATE source SET value = '2' WHERE name = 'schema';")
    assert [line["run_id"] for line in registry.page(sweep=None).runs] == ["b", "a"]
    assert registry.page(sweep="s").total == 0
