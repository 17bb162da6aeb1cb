"""Promotions by hand and rollbacks: the alexnet_cifar10_promote DAG, the promotion history, the plugin's pages.

The published runs are written by the pipeline's own evaluate, gate and
publish from one tiny real training; the promote DAG runs through
``airflow dags test`` on SQLite.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from builders import evaluate_gate_publish, links, load_plugin_module, plugin_client, quoted
from conftest import airflow_bin, airflow_env

FIRST = "manual__2026-11-20T10:00:00+00:00"
SECOND = "manual__2026-11-21T10:00:00+00:00"
REFUSED = "manual__2026-11-22T10:00:00+00:00"



def test_the_promote_dag_takes_a_run_id_and_a_reason_and_never_retries():
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk.definitions.param import ParamValidationError

    from conftest import ROOT

    bag = DagBag(str(ROOT / "dags" / "alexnet_cifar10_promote.py"))
    assert not bag.import_errors, bag.import_errors
    dag = bag.dags["alexnet_cifar10_promote"]
    assert type(dag.timetable).__name__ == "NullTimetable" and [task.task_id for task in dag.tasks] == ["promote"]
    task = dag.get_task("promote")
    assert task.retries == 0 and [outlet.name for outlet in task.outlets] == ["alexnet_cifar10_model"]
    import copy

    def checked(conf: dict) -> dict:
        params = copy.deepcopy(dag.params)
        params.update(conf)
        return params.validate()

    assert checked({"run_id": "manual__x", "reason": "rollback"}) == {"run_id": "manual__x", "reason": "rollback"}
    for bad in ({"run_id": "", "reason": "rollback"}, {"run_id": "manual__x", "reason": " "}, {"run_id": "manual__x"}):
        with pytest.raises(ParamValidationError):
            checked(bad)


@pytest.fixture(scope="module")
def published(trained_run, tmp_path_factory) -> Path:
    """Artifacts where FIRST was blessed, then SECOND (the champion), and REFUSED was recorded without its model."""
    config, shards_dir, trained_dir, _ = trained_run
    root = tmp_path_factory.mktemp("promote") / "artifacts"
    for run_id in (FIRST, SECOND, REFUSED):
        gated = replace(config, accuracy_floor=1.0 if run_id == REFUSED else 0.0)
        evaluate_gate_publish(trained_dir, shards_dir, root, run_id, gated, dag_id="alexnet_cifar10")
    return root


def copy_of(published: Path, tmp_path: Path) -> Path:
    root = tmp_path / "artifacts"
    shutil.copytree(published, root, symlinks=True)
    return root


def promote_dag(root: Path, home: Path, conf: dict) -> subprocess.CompletedProcess:
    env = airflow_env(home, root)
    subprocess.run([airflow_bin(), "db", "migrate"], env=env, check=True, capture_output=True)
    return subprocess.run([airflow_bin(), "dags", "test", "alexnet_cifar10_promote", "-c", json.dumps(conf)],
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_publish_records_each_blessed_run_in_the_history(published):
    from alexnet_tasks.release.registry import Registry

    registry = Registry(published / "published")
    history = registry.history()
    assert [(line["run_id"], line["previous_run_id"], line["reason"]) for line in history] == [
        (SECOND, FIRST, "gate"), (FIRST, None, "gate")]
    assert all(line["dag_id"] == "alexnet_cifar10" and line["user"] is None for line in history)
    assert history[0]["dag_run_id"] == SECOND and registry.champion()["run_id"] == SECOND


@pytest.mark.slow
def test_a_rollback_through_the_promote_dag_moves_the_champion_back_and_appends_to_the_history(published, tmp_path):
    from alexnet_tasks.release.registry import Registry

    root = copy_of(published, tmp_path)
    registry = Registry(root / "published")
    before = (root / "published" / "promotions.jsonl").read_bytes()
    run = promote_dag(root, tmp_path / "home", {"run_id": FIRST, "reason": "second misbehaves in production"})
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert registry.champion()["run_id"] == FIRST
    after = (root / "published" / "promotions.jsonl").read_bytes()
    assert after.startswith(before) and after.count(b"\n") == before.count(b"\n") + 1, "appended, not rewritten"
    newest = registry.history()[0]
    assert (newest["run_id"], newest["previous_run_id"], newest["reason"]) == (FIRST, SECOND, "by_hand")
    assert newest["comment"] == "second misbehaves in production" and newest["user"]
    assert newest["dag_id"] == "alexnet_cifar10_promote" and newest["dag_run_id"].startswith("manual__")
    # The model asset's event, with the extra the main DAG's publish gives it.
    with sqlite3.connect(tmp_path / "home" / "airflow.db") as database:
        rows = database.execute("SELECT a.name, e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id").fetchall()
    assert [name for name, _ in rows] == ["alexnet_cifar10_model"]
    extra = json.loads(rows[0][1])
    assert extra["run_id"] == FIRST and extra["published"].endswith(registry.find(FIRST)["path"])
    assert set(extra) >= {"run_id", "test_accuracy", "published", "fingerprint"}


@pytest.mark.slow
def test_an_unknown_run_fails_at_once_naming_it(published, tmp_path):
    root = copy_of(published, tmp_path)
    run = promote_dag(root, tmp_path / "home", {"run_id": "manual__no-such-run", "reason": "typo"})
    assert run.returncode != 0
    output = run.stdout + run.stderr
    assert "run 'manual__no-such-run' is not in" in output and "index.jsonl" in output, output[-4000:]
    assert (root / "published" / "promotions.jsonl").read_bytes() == \
        (published / "published" / "promotions.jsonl").read_bytes()


@pytest.mark.slow
def test_a_run_recorded_without_its_model_cannot_become_the_champion(published, tmp_path):
    from alexnet_tasks.errors import PermanentError
    from alexnet_tasks.release.promote import promote_run
    from alexnet_tasks.release.registry import Registry

    root = copy_of(published, tmp_path)
    with pytest.raises(PermanentError, match=re.escape(f"run '{REFUSED}' has no model in ")):
        promote_run(root / "published", run_id=REFUSED, comment="override the gate", user="alice")
    with pytest.raises(ValueError, match="comment must be a non-empty string"):
        promote_run(root / "published", run_id=FIRST, comment="  ", user="alice")
    assert Registry(root / "published").champion()["run_id"] == SECOND


@pytest.mark.slow
def test_the_history_page_and_the_make_champion_link(published, tmp_path, tokens, monkeypatch):  # noqa: F811
    from alexnet_tasks.release.promote import promote_run

    root = copy_of(published, tmp_path)
    promote_run(root / "published", run_id=FIRST, comment="rollback <after> an incident", user="alice",
                dag_id="alexnet_cifar10_promote", dag_run_id="manual__rollback")
    monkeypatch.setenv("ALEXNET_ARTIFACTS", str(root))
    with plugin_client(tokens["viewer"]) as client:
        page = client.get("/alexnet/history")
        assert page.status_code == 200
        rows = page.text.split('<tr class="change"')[1:]
        assert [row.split('data-run-id="')[1].split('"')[0] for row in rows] == [FIRST, SECOND, FIRST]
        assert 'data-reason="by_hand"' in rows[0] and "rollback &lt;after&gt; an incident" in rows[0]
        assert ">alice<" in rows[0] and f"runs/{quoted(SECOND)}" in rows[0]
        assert "../dags/alexnet_cifar10_promote/runs/manual__rollback" in rows[0]
        assert "blessed by the gate" in rows[1]
        assert "history" in links(client.get("/alexnet/runs").text)

        second = client.get(f"/alexnet/runs/{quoted(SECOND)}").text  # not the champion, has its model
        assert 'id="make-champion"' in second and f"../promote?run={quoted(SECOND)}" in links(second)
        assert 'id="make-champion"' not in client.get(f"/alexnet/runs/{quoted(FIRST)}").text  # the champion
        assert 'id="make-champion"' not in client.get(f"/alexnet/runs/{quoted(REFUSED)}").text  # no model


@pytest.mark.slow
def test_the_promote_page_fills_in_the_run_and_posts_only_to_airflows_api(published, tmp_path, tokens,  # noqa: F811
                                                                           monkeypatch):
    from alexnet_tasks.release.registry import Registry

    root = copy_of(published, tmp_path)
    monkeypatch.setenv("ALEXNET_ARTIFACTS", str(root))
    with plugin_client(tokens["viewer"]) as client:
        page = client.get(f"/alexnet/promote?run={quoted(FIRST)}")
        assert page.status_code == 200, page.text
        form = page.text.split('<form id="promote-form"')[1].split("</form>")[0]
        assert re.search(rf'<input id="promote-run-id" name="run_id" value="{re.escape(FIRST)}" readonly', form)
        assert re.search(r'<input id="promote-reason" name="reason" required', form)
        assert 'data-trigger-url="../api/v2/dags/alexnet_cifar10_promote/dagRuns"' in form
        assert 'data-airflow-root="../"' in form and ">Trigger alexnet_cifar10_promote</button>" in form
        assert 'method=' not in form and 'action=' not in form, "the form posts nowhere itself: its script calls the API"
        assert "logical_date: null" in page.text and "conf: {run_id: form.elements.run_id.value" in page.text
        assert 'credentials: "same-origin"' in page.text
        entries = {run_id: Registry(root / "published").find(run_id) for run_id in (FIRST, SECOND)}
        assert f"{entries[FIRST]['test_accuracy']:.2%}" in page.text.split('id="promote-accuracy">')[1].split("<")[0]
        champion = page.text.split('<td id="champion">')[1].split("</td>")[0]
        assert f"runs/{quoted(SECOND)}" in champion and f"{entries[SECOND]['test_accuracy']:.2%}" in champion
        assert 'id="promote-already"' not in page.text and 'id="promote-no-model"' not in page.text

        assert 'id="promote-already"' in client.get(f"/alexnet/promote?run={quoted(SECOND)}").text
        refused = client.get(f"/alexnet/promote?run={quoted(REFUSED)}").text
        assert 'id="promote-no-model"' in refused and re.search(r'id="promote-button" type="submit" disabled', refused)

        unknown = client.get("/alexnet/promote?run=manual__no-such-run")
        assert unknown.status_code == 404 and "manual__no-such-run" in unknown.text
        assert client.get("/alexnet/promote").status_code == 400
        # The plugin has no POST route: the trigger goes to Airflow's own API.
        assert client.post("/alexnet/promote", json={"run_id": FIRST, "reason": "x"}).status_code == 405
        assert {method for route in load_plugin_module().app.routes for method in getattr(route, "methods", ())} <= {"GET", "HEAD"}
        # Without a login the page is refused like every other.
        client.cookies.clear()
        assert client.get(f"/alexnet/promote?run={quoted(FIRST)}").status_code == 401
