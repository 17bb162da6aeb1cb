"""The UI plugin on an object-store artifacts root: ``ALEXNET_ARTIFACTS=s3://bucket/prefix``.

The runs are evaluated, gated and published onto the tests' S3 server
(moto's S3 REST protocol; tests/s3_server.py) by the pipeline's own steps,
with the store's registry, as the store's publish step does. The plugin then
reads them as Airflow's API server does: its app mounted at its prefix
(FastAPI's TestClient), the store reached only through the Airflow connection
``$ALEXNET_ARTIFACTS_CONN_ID`` (no ``AWS_*`` variable is set while it reads),
and its own cache folder, empty at first: a host that never published.
"""

from __future__ import annotations

import html
import json
import os
import re
from dataclasses import replace
from urllib.parse import urljoin

import pytest

from alexnet_tasks.layout import data_key, run_folder_name
from builders import assert_refused, evaluate_gate_publish, fake_run, links, plugin_client, quoted, s3_registry

pytestmark = pytest.mark.slow
OLD_RUN = "manual__2026-11-28T10:00:00+00:00"
NEW_RUN = "scheduled__2026-11-29T02:00:00+00:00"
SWEEP_RUN = "manual__2026-11-30T08:00:00+00:00"
BUCKET = "test-plugin-store"
AWS = {"AWS_DEFAULT_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def published_key(run_id: str, name: str = "") -> str:
    """The object key of a run's published folder (or of one file in it) under ``s3://<BUCKET>/artifacts``."""
    return f"artifacts/published/runs/{run_folder_name(run_id)}" + (f"/{name}" if name else "")


def s3_client(endpoint: str):
    """A boto3 client of the tests' S3 server with its key pair given, whatever the environment holds."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name=AWS["AWS_DEFAULT_REGION"],
                        aws_access_key_id=AWS["AWS_ACCESS_KEY_ID"], aws_secret_access_key=AWS["AWS_SECRET_ACCESS_KEY"])


def stored_bytes(endpoint: str, key: str, bucket: str = BUCKET) -> bytes:
    return s3_client(endpoint).get_object(Bucket=bucket, Key=key)["Body"].read()


def record_sweep(publisher, registry, trial_accuracies: list[float]) -> None:
    """A sweep's record as its select task writes it (``select_trial``), from trial runs as their training leaves
    them, put under ``published/sweeps/`` on the store."""
    from alexnet_tasks.jsonio import save_json
    from alexnet_tasks.layout import Layout
    from alexnet_tasks.release.sweeps import select_trial
    from alexnet_tasks.sweeps import plan_trials, trial_run_id

    layout = Layout(publisher)
    trials = plan_trials({"trials": {"learning_rate": [0.01, 0.05]}})
    for trial, accuracy in zip(trials, trial_accuracies):
        run_id = trial_run_id(SWEEP_RUN, trial["index"])
        run_dir = fake_run(publisher, run_folder_name(run_id), accuracy, fingerprint=f"{trial['index'] + 1:064x}")
        save_json(run_dir / "history.json", [{"epoch": 1, "val_accuracy": accuracy, "val_loss": 1.0 - accuracy}])
    select_trial(trials, layout, sweep_run_id=SWEEP_RUN)
    name = f"sweeps/{run_folder_name(SWEEP_RUN)}.json"
    registry.store.write_bytes(name, layout.sweep_record(SWEEP_RUN).read_bytes())


@pytest.fixture(scope="module")
def store(s3_server, trained_run, tmp_path_factory) -> str:
    """``s3://<BUCKET>/artifacts`` with two runs published by the pipeline (as tests/test_plugin.py's ``published``:
    an older champion, a newer run the gate refused), their shards as build_shards puts them, and a sweep's
    record. Yields the S3 server's endpoint."""
    from alexnet_tasks.store import ObjectStore, parse_location

    config, shards_dir, trained_dir, _ = trained_run
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {"AWS_ENDPOINT_URL": s3_server, **AWS}.items():
            patch.setenv(name, value)
        s3_client(s3_server).create_bucket(Bucket=BUCKET)
        publisher = tmp_path_factory.mktemp("publisher-cache")  # the cache of the host that published
        registry = s3_registry(BUCKET, publisher)
        evaluate_gate_publish(trained_dir, shards_dir, publisher, OLD_RUN, replace(config, accuracy_floor=0.0),
                              registry=registry)
        evaluate_gate_publish(trained_dir, shards_dir, publisher, NEW_RUN, replace(config, accuracy_floor=1.0),
                              test_time_augmentation="flip", registry=registry)
        ObjectStore(parse_location(f"s3://{BUCKET}/artifacts")).put_folder(shards_dir, f"data/{data_key(config)}")
        record_sweep(publisher, registry, [0.3, 0.4])
        yield s3_server


@pytest.fixture
def client(store, tokens, tmp_path, monkeypatch):
    """The viewer's browser on the plugin, which reads ``s3://<BUCKET>/artifacts`` through an Airflow connection."""
    for name in ("AWS_ENDPOINT_URL", *AWS):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ALEXNET_ARTIFACTS", f"s3://{BUCKET}/artifacts")
    monkeypatch.setenv("ALEXNET_CACHE", str(tmp_path / "api-server-cache"))
    monkeypatch.setenv("ALEXNET_ARTIFACTS_CONN_ID", "alexnet_store")
    monkeypatch.setenv("AIRFLOW_CONN_ALEXNET_STORE", json.dumps({
        "conn_type": "aws", "login": AWS["AWS_ACCESS_KEY_ID"], "password": AWS["AWS_SECRET_ACCESS_KEY"],
        "extra": {"endpoint_url": store, "region_name": AWS["AWS_DEFAULT_REGION"]}}))
    with plugin_client(tokens["viewer"]) as test_client:
        yield test_client


def test_the_list_page_lists_the_runs_published_on_the_store(client, store):
    assert not {"AWS_ENDPOINT_URL", *AWS} & set(os.environ), "the Airflow connection alone reaches the store"
    response = client.get("/alexnet/runs")
    assert response.status_code == 200, response.text[-2000:]
    page = response.text
    rows = dict(re.findall(r'<tr class="run" data-run-id="([^"]+)">(.*?)</tr>', page, re.S))
    assert list(rows) == [NEW_RUN, OLD_RUN], "newest first"
    assert "champion (latest)" in rows[OLD_RUN] and "not blessed" in rows[NEW_RUN]
    assert "files missing" not in page
    metrics = json.loads(stored_bytes(store, published_key(OLD_RUN, "metrics.json")))
    assert f"{metrics['test_accuracy']:.2%}" in rows[OLD_RUN]
    # Paged and filtered as on a local root.
    assert re.findall(r'data-run-id="([^"]+)"', client.get("/alexnet/runs?blessed=true").text) == [OLD_RUN]
    first = client.get("/alexnet/runs?size=1").text
    assert re.findall(r'data-run-id="([^"]+)"', first) == [NEW_RUN] and "page 1 of 2" in first
    older = html.unescape(re.search(r'id="older" href="([^"]+)"', first).group(1))
    second = client.get(urljoin("http://airflow.test/alexnet/runs", older)).text
    assert re.findall(r'data-run-id="([^"]+)"', second) == [OLD_RUN]


def test_a_run_page_renders_and_its_artifacts_stream_from_the_store(client, store):
    url = f"http://airflow.test/alexnet/runs/{quoted(NEW_RUN)}"
    response = client.get(url)
    assert response.status_code == 200, response.text[-2000:]
    page = response.text
    metrics = json.loads(stored_bytes(store, published_key(NEW_RUN, "metrics.json")))
    decision = json.loads(stored_bytes(store, published_key(NEW_RUN, "decision.json")))
    assert f"{metrics['test_accuracy']:.2%}" in page and metrics["fingerprint"] in page
    assert "Not blessed" in page and f"<code>{decision['champion']}</code>" in page
    assert page.count('<polyline class="series"') == 4, "the history, read from the store"
    assert 'id="compare-with-champion"' in page
    files = re.search(r'<ul id="files">(.*?)</ul>', page, re.S).group(1)
    assert set(re.findall(r">([a-z_.]+)</a>", files)) == {
        "confusion_matrix.png", "test_samples.png", "metrics.json", "config.json", "history.json", "decision.json"}
    for name, media_type in (("confusion_matrix.png", "image/png"), ("metrics.json", "application/json")):
        served = client.get(urljoin(url, f"{quoted(NEW_RUN)}/files/{name}"))
        assert served.status_code == 200 and served.headers["content-type"].startswith(media_type), name
        assert served.content == stored_bytes(store, published_key(NEW_RUN, name)), name
        assert int(served.headers["content-length"]) == len(served.content)
    src = re.search(r'id="test-samples"[^>]*src="([^"]+)"', page).group(1)
    assert client.get(urljoin(url, src)).content == stored_bytes(store, published_key(NEW_RUN, "test_samples.png"))
    model = client.get(f"/alexnet/runs/{quoted(OLD_RUN)}/files/model.keras")
    assert model.status_code == 200 and model.headers["content-disposition"] == 'attachment; filename="model.keras"'
    assert model.content == stored_bytes(store, published_key(OLD_RUN, "model.keras"))
    # The refused run was recorded without its model: nothing to serve, no link to it.
    assert client.get(f"/alexnet/runs/{quoted(NEW_RUN)}/files/model.keras").status_code == 404
    tab = client.get(f"/alexnet/dags/alexnet_cifar10/runs/{quoted(OLD_RUN)}")
    assert tab.status_code == 200 and 'id="confusion-matrix"' in tab.text and "champion (latest)" in tab.text


def test_only_named_artifacts_of_indexed_runs_are_served_from_the_store(client, store, monkeypatch):
    """A copy of the store's artifacts with an unnamed file in a published folder, a published folder the index
    does not name and index lines whose paths leave ``published/runs``."""
    from alexnet_tasks.release.registry import Registry, S3Store
    from alexnet_tasks.store import parse_location

    s3 = s3_client(store)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="artifacts/")
    for key in [item["Key"] for page in pages for item in page.get("Contents", [])]:
        s3.copy_object(Bucket=BUCKET, Key="elsewhere/" + key.removeprefix("artifacts/"),
                       CopySource={"Bucket": BUCKET, "Key": key})
    old = "elsewhere/published/runs/" + run_folder_name(OLD_RUN)
    s3.put_object(Bucket=BUCKET, Key=f"{old}/state.json", Body=b'{"secret": true}')
    s3.put_object(Bucket=BUCKET, Key="elsewhere/published/runs/unindexed/metrics.json", Body=b'{"secret": true}')
    s3.put_object(Bucket=BUCKET, Key="elsewhere/published/secret/metrics.json", Body=b'{"secret": true}')
    s3.put_object(Bucket=BUCKET, Key="elsewhere/runs/x/metrics.json", Body=b'{"secret": true}')
    registry = Registry(store=S3Store(parse_location(f"s3://{BUCKET}/elsewhere"), s3))
    registry.store.append_index("".join(json.dumps({"run_id": run_id, "path": path, "test_accuracy": 0.99}) + "\n"
                                        for run_id, path in (("dotdot", "../runs/x"), ("deep", "runs/x/../../secret"),
                                                             ("absolute", "/published/secret"),
                                                             ("outside", "secret"))).encode())
    monkeypatch.setenv("ALEXNET_ARTIFACTS", f"s3://{BUCKET}/elsewhere")

    good = f"/alexnet/runs/{quoted(OLD_RUN)}/files"
    assert client.get(f"{good}/metrics.json").status_code == 200
    refused = [
        f"{good}/state.json", f"{good}/tensorboard", f"{good}/..%2Fmetrics.json", f"{good}/..%2F..%2Findex.jsonl",
        "/alexnet/runs/unindexed/files/metrics.json", "/alexnet/runs/unindexed",
        f"/alexnet/runs/runs%2F{run_folder_name(OLD_RUN)}/files/metrics.json",
        *(f"/alexnet/runs/{run_id}/files/metrics.json" for run_id in ("dotdot", "deep", "absolute", "outside")),
    ]
    assert_refused(client, refused)
    listing = client.get("/alexnet/runs").text
    assert listing.count("files missing") == 4, "runs whose path is not runs/<run> are listed without files"


def test_the_compare_page_pairs_the_runs_with_the_test_shard_from_the_store(client, store):
    url = f"http://airflow.test/alexnet/compare?a={quoted(NEW_RUN)}&b={quoted(OLD_RUN)}"
    response = client.get(url)
    assert response.status_code == 200, response.text[-2000:]
    page = response.text
    paired = json.loads(stored_bytes(store, published_key(NEW_RUN, "decision.json")))["paired"]
    shown = {name: int(re.search(rf'id="{name}">(\d+)<', page).group(1))
             for name in ("both-right", "only-a", "only-b", "both-wrong")}
    assert shown == {"both-right": paired["both_right"], "only-a": paired["only_challenger_right"],
                     "only-b": paired["only_champion_right"], "both-wrong": paired["both_wrong"]}
    for label, run_id in (("a", NEW_RUN), ("b", OLD_RUN)):
        src = re.search(rf'id="confusion-matrix-{label}"[^>]*src="([^"]+)"', page).group(1)
        assert client.get(urljoin(url, src)).content == stored_bytes(store, published_key(run_id,
                                                                                          "confusion_matrix.png"))
    for href in map(html.unescape, links(page) + links(page, "src")):
        assert client.get(urljoin(url, href)).status_code == 200, href


def test_the_history_promote_and_sweep_pages_read_the_store(client):
    history = client.get("/alexnet/history")
    assert history.status_code == 200
    rows = history.text.split('<tr class="change"')[1:]
    assert [row.split('data-run-id="')[1].split('"')[0] for row in rows] == [OLD_RUN]
    assert "blessed by the gate" in rows[0]

    promote = client.get(f"/alexnet/promote?run={quoted(NEW_RUN)}")
    assert promote.status_code == 200 and 'id="promote-no-model"' in promote.text
    champion = promote.text.split('<td id="champion">')[1].split("</td>")[0]
    assert f"runs/{quoted(OLD_RUN)}" in champion
    assert 'id="promote-already"' in client.get(f"/alexnet/promote?run={quoted(OLD_RUN)}").text

    sweep = client.get(f"/alexnet/dags/alexnet_cifar10_sweep/runs/{quoted(SWEEP_RUN)}")
    assert sweep.status_code == 200, sweep.text[-2000:]
    assert sweep.text.count('<tr class="trial') == 2 and sweep.text.count('<tr class="trial chosen"') == 1
    assert 'data-trial="2"' in sweep.text.split('<tr class="trial chosen"')[1].split(">")[0]
    assert client.get("/alexnet/sweeps/manual__never").status_code == 404
