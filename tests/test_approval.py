"""publish_mode approval on the native CeleryExecutor cluster: Approve, Reject and no answer, through the REST API.

Three real runs of alexnet_cifar10 (tiny data, one epoch) one after the
other: the gate blesses each, ``approve`` waits in Required actions, and the
test answers the first with Approve and the second with Reject through the
REST API (as the admin user), and lets the third run out its tiny
``approval_timeout``. Only the approved run becomes the champion; who decided,
when and why is in each run's ``approval.json``, its index line and, for the
promotion, ``published/promotions.jsonl``.
"""

from __future__ import annotations

import json
import time
from urllib.parse import quote

import pytest

from conftest import native_cluster, wait_for_runs

pytestmark = pytest.mark.cluster

HITL = "/api/v2/dags/alexnet_cifar10/dagRuns/{run}/taskInstances/approve/-1/hitlDetails"


def wait_for_question(api, run_id: str, timeout: float = 900) -> dict:
    """The approve task's request, once it waits for an answer (the run must not end first)."""
    deadline = time.monotonic() + timeout
    while True:
        state = api.get(f"/api/v2/dags/alexnet_cifar10/dagRuns/{quote(run_id)}/taskInstances/approve")["state"]
        if state == "awaiting_input":
            return api.get(HITL.format(run=quote(run_id)))
        run = api.get(f"/api/v2/dags/alexnet_cifar10/dagRuns/{quote(run_id)}")
        assert run["state"] not in ("success", "failed"), f"{run_id} ended ({run['state']}) before asking: {state}"
        assert time.monotonic() < deadline, f"approve of {run_id} never asked: {state}"
        time.sleep(2)


def test_approve_reject_and_no_answer_through_the_rest_api(served_archive, monkeypatch):
    from alexnet_tasks.release.registry import Registry

    url, md5, artifacts = served_archive
    monkeypatch.setenv("AIRFLOW__SCHEDULER__TRIGGER_TIMEOUT_CHECK_INTERVAL", "2")  # the HITL timeout sweep
    conf = {"source_url": url, "source_md5": md5, "image_size": 67, "epochs": 1, "validation_size": 50,
            "batch_size": 16, "recipe": "reference", "publish_mode": "approval",
            # tiny data: every sane run is blessed, so that each one asks
            "accuracy_floor": 0.0, "gate_tolerance": 1.0}
    registry = Registry(artifacts / "published")
    with native_cluster(artifacts.parent / "cluster", "approval", redis_db=10) as (_, api):
        def trigger(**extra) -> str:
            return api.post("/api/v2/dags/alexnet_cifar10/dagRuns",
                            {"logical_date": None, "conf": {**conf, **extra}})["dag_run_id"]

        approved = trigger()
        question = wait_for_question(api, approved)
        body = question["body"]
        assert question["options"] == ["Approve", "Reject"] and question["defaults"] == ["Reject"]
        assert f"/alexnet/runs/{quote(approved, safe='')}" in body and "There is no champion yet" in body
        api.patch(HITL.format(run=quote(approved)), {"chosen_options": ["Approve"], "params_input": {"comment": "fine"}})
        [run] = wait_for_runs(api, [approved], 600)
        assert run["state"] == "success", run
        assert registry.champion()["run_id"] == approved

        rejected = trigger()
        question = wait_for_question(api, rejected)
        body = question["body"]
        # The gate's figures against the champion, and relative links to the run and to the comparison.
        assert f"Champion **{approved}**" in body and "McNemar p = " in body and "right only by this run" in body
        assert f"/alexnet/compare?a={quote(rejected, safe='')}&b={quote(approved, safe='')}" in body
        api.patch(HITL.format(run=quote(rejected)),
                  {"chosen_options": ["Reject"], "params_input": {"comment": "not on a Friday"}})
        [run] = wait_for_runs(api, [rejected], 600)
        assert run["state"] == "success", run

        timed_out = trigger(approval_timeout=0.001)  # 3.6 s
        [run] = wait_for_runs(api, [timed_out], 900)
        assert run["state"] == "success", run

        states = {run_id: {ti["task_id"]: ti["state"] for ti in api.get(
            f"/api/v2/dags/alexnet_cifar10/dagRuns/{quote(run_id)}/taskInstances")["task_instances"]}
            for run_id in (approved, rejected, timed_out)}

    # Only the approved run became the champion; the other two are recorded, without their model.
    assert registry.champion()["run_id"] == approved
    for run_id in (approved, rejected, timed_out):
        assert states[run_id]["approve"] == "success", states[run_id]
    assert states[approved]["publish"] == "success"
    assert states[rejected]["publish"] == states[timed_out]["publish"] == "skipped"

    entries = {run_id: registry.find(run_id) for run_id in (approved, rejected, timed_out)}
    first = entries[approved]["approval"]
    assert (first["outcome"], first["user"], first["comment"], first["approved"]) == ("approved", "admin", "fine", True)
    assert entries[approved]["blessed"] is True and "approved by admin" in entries[approved]["reasons"][-1]
    second = entries[rejected]["approval"]
    assert (second["outcome"], second["user"], second["comment"]) == ("rejected", "admin", "not on a Friday")
    assert entries[rejected]["blessed"] is False
    assert entries[rejected]["reasons"][0].startswith("blessed by the gate but rejected by admin")
    third = entries[timed_out]["approval"]
    assert (third["outcome"], third["user"], third["approved"]) == ("timed_out", None, False)
    assert entries[timed_out]["blessed"] is False and "no answer within 0.001 h" in entries[timed_out]["reasons"][0]
    for run_id in (approved, rejected, timed_out):
        folder = registry.store.folder(entries[run_id]["path"])
        assert json.loads((folder / "approval.json").read_text()) == entries[run_id]["approval"]
        assert (folder / "model.keras").is_file() == (run_id == approved)
        assert entries[run_id]["approval"]["decided_at"]

    [promotion] = registry.history()
    assert (promotion["run_id"], promotion["reason"], promotion["user"], promotion["comment"]) == (
        approved, "approved", "admin", "fine")
    assert (promotion["dag_id"], promotion["dag_run_id"]) == ("alexnet_cifar10", approved)
