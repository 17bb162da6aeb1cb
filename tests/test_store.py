"""The artifacts location: a local folder or an object-store URL, and the S3 server the store tests use."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from alexnet_tasks.errors import PermanentError
from alexnet_tasks.layout import Layout, artifacts_root


@pytest.mark.parametrize("url, expected", [
    ("nosuchfs://bucket/prefix", "no filesystem for the scheme 'nosuchfs'"),
    ("gs://bucket/prefix", r"\(gcsfs\) is not installed"),
])
def test_an_url_no_installed_filesystem_serves_is_refused_and_nothing_is_written(url, expected, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALEXNET_ARTIFACTS", url)
    with pytest.raises(PermanentError, match=f"ALEXNET_ARTIFACTS={url}: .*{expected}"):
        Layout()
    with pytest.raises(ValueError, match=expected):  # a ValueError as well: a setting that cannot work
        artifacts_root()
    assert list(tmp_path.iterdir()) == []


def test_an_object_store_url_is_never_taken_for_a_local_folder(monkeypatch, tmp_path):
    from alexnet_tasks.data.download import download

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALEXNET_ARTIFACTS", "s3://bucket/prefix")
    with pytest.raises(PermanentError, match="ALEXNET_ARTIFACTS=s3://bucket/prefix: an object-store URL"):
        download("http://127.0.0.1:9/cifar-10-python.tar.gz", "0" * 32)
    assert list(tmp_path.iterdir()) == []  # no folder named "s3:" in the working directory


def test_local_paths_and_file_urls_are_the_same_folder(monkeypatch, tmp_path):
    for value in (str(tmp_path / "a"), f"file://{tmp_path}/a", f"file://{tmp_path}/a/"):
        monkeypatch.setenv("ALEXNET_ARTIFACTS", value)
        assert artifacts_root() == tmp_path / "a"
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("ALEXNET_ARTIFACTS", "~/b")
    assert artifacts_root() == tmp_path / "b"


# --------------------------------------------------------------------------- the test S3 server
def test_the_s3_server_creates_a_key_only_once_with_if_none_match(s3_bucket):
    """fsspec's exclusive mode "x" on s3fs sends ``If-None-Match: *``: the second create of a key fails."""
    import s3fs

    filesystem = s3fs.S3FileSystem(skip_instance_cache=True)
    key = f"{s3_bucket}/data/manifest.json"
    with filesystem.open(key, "xb") as file:
        file.write(b"first")
    with pytest.raises(FileExistsError):
        with filesystem.open(key, "xb") as file:
            file.write(b"second")
    assert filesystem.cat_file(key) == b"first"


def test_the_s3_server_replaces_a_key_only_while_its_etag_matches(s3_bucket):
    """boto3's ``put_object(IfMatch=etag)`` succeeds on the current ETag and fails with 412 on a stale one."""
    import boto3
    from botocore.exceptions import ClientError

    client = boto3.client("s3")
    first = client.put_object(Bucket=s3_bucket, Key="published/champion.json", Body=b"a", IfNoneMatch="*")["ETag"]
    second = client.put_object(Bucket=s3_bucket, Key="published/champion.json", Body=b"b", IfMatch=first)["ETag"]
    assert second != first
    for stale in (first, '"0123456789abcdef0123456789abcdef"'):
        with pytest.raises(ClientError) as refused:
            client.put_object(Bucket=s3_bucket, Key="published/champion.json", Body=b"c", IfMatch=stale)
        assert refused.value.response["Error"]["Code"] == "PreconditionFailed"
        assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    with pytest.raises(ClientError) as refused:
        client.put_object(Bucket=s3_bucket, Key="published/champion.json", Body=b"c", IfNoneMatch="*")
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert client.get_object(Bucket=s3_bucket, Key="published/champion.json")["Body"].read() == b"b"


def test_the_s3_server_lets_one_of_several_racing_conditional_writes_win(s3_bucket):
    """Eight clients at once: one create with ``If-None-Match: *``, and one swap on the same ETag, succeed."""
    import threading

    import boto3
    from botocore.exceptions import ClientError

    clients = [boto3.client("s3") for _ in range(8)]
    for round_ in range(10):
        key = f"race/{round_}"
        for condition in ({"IfNoneMatch": "*"}, None):
            if condition is None:  # the swap: everyone read the same ETag
                condition = {"IfMatch": clients[0].head_object(Bucket=s3_bucket, Key=key)["ETag"]}
            winners, refused, barrier = [], [], threading.Barrier(len(clients))

            def write(number, condition=condition):
                body = f"{condition} {number}".encode()  # a new body, hence a new ETag, for every write
                barrier.wait()
                try:
                    clients[number].put_object(Bucket=s3_bucket, Key=key, Body=body, **condition)
                    winners.append(number)
                except ClientError as error:
                    refused.append(error.response["Error"]["Code"])

            threads = [threading.Thread(target=write, args=(number,)) for number in range(len(clients))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert len(winners) == 1 and refused == ["PreconditionFailed"] * (len(clients) - 1), (condition, winners, refused)
            assert clients[0].get_object(Bucket=s3_bucket, Key=key)["Body"].read() == f"{condition} {winners[0]}".encode()


# --------------------------------------------------------------------------- data folders on the store
KEY = "data/0123456789abcdef0123456789abcdef/shards-abc"


def _store(bucket):
    from alexnet_tasks.store import ObjectStore, parse_location

    return ObjectStore(parse_location(f"s3://{bucket}/artifacts"))


def _folder(path: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


def test_a_data_folder_round_trips_through_the_store_and_is_listed_by_its_manifest(s3_bucket, tmp_path):
    import hashlib

    files = {"train.h5": os.urandom(3000), "nested/test.h5": b"t" * 10}
    store = _store(s3_bucket)
    assert store.contents(KEY) is None
    result = store.put_folder(_folder(tmp_path / "built", files), KEY)
    assert result["adopted"] is False
    assert store.contents(KEY) == result["contents"]
    assert result["contents"]["files"] == {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                                           for name, data in files.items()}
    local = store.fetch_folder(KEY, tmp_path / "cache")
    assert local == tmp_path / "cache" / KEY
    assert {path.relative_to(local).as_posix(): path.read_bytes() for path in local.rglob("*") if path.is_file()} == files


def test_the_cache_is_used_only_while_it_matches_the_manifest_and_may_be_deleted(s3_bucket, tmp_path):
    import shutil

    files = {"train.h5": b"a" * 100, "test.h5": b"b" * 100}
    store = _store(s3_bucket)
    store.put_folder(_folder(tmp_path / "built", files), KEY)
    local = store.fetch_folder(KEY, tmp_path / "cache")
    (local / "train.h5").write_bytes(b"A" * 100)  # same size, other content
    (local / "test.h5").write_bytes(b"b" * 99)  # truncated
    store.fetch_folder(KEY, tmp_path / "cache")
    assert (local / "train.h5").read_bytes() == files["train.h5"] and (local / "test.h5").read_bytes() == files["test.h5"]
    shutil.rmtree(tmp_path / "cache")
    assert (store.fetch_folder(KEY, tmp_path / "cache") / "train.h5").read_bytes() == files["train.h5"]
    assert sorted(path.name for path in local.iterdir()) == ["test.h5", "train.h5"]  # no temporary left


def test_a_stored_object_that_contradicts_its_manifest_is_refused_and_not_cached(s3_bucket, tmp_path):
    from alexnet_tasks.errors import MissingInputError
    from alexnet_tasks.store import StoreContentError

    store = _store(s3_bucket)
    with pytest.raises(MissingInputError, match=f"s3://{s3_bucket}/artifacts/{KEY}: no contents.json"):
        store.fetch_folder(KEY, tmp_path / "cache")
    contents = store.put_folder(_folder(tmp_path / "built", {"train.h5": b"good"}), KEY)["contents"]
    blob = store.path(f"{KEY}/objects/{contents['files']['train.h5']['sha256']}")
    store.filesystem.pipe_file(blob, b"evil")
    with pytest.raises(StoreContentError, match=r"\(train.h5\): 4 bytes with SHA-256 [0-9a-f]{64}, expected 4 bytes"):
        store.fetch_folder(KEY, tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.h5*"))
    store.filesystem.pipe_file(store.path(f"{KEY}/contents.json"), b'{"format": 1, "key": "x"}')
    with pytest.raises(StoreContentError, match=r"contents.json: not a data folder's manifest \('files' is a required"):
        store.contents(KEY)


_BUILDER = """
import json, os, sys, time
from pathlib import Path
from alexnet_tasks.store import ObjectStore, parse_location
bucket, key, folder, start = sys.argv[1], sys.argv[2], Path(sys.argv[3]), float(sys.argv[4])
folder.mkdir(parents=True)
(folder / "train.h5").write_bytes(f"built by process {os.getpid()}".encode() * 1000)  # as HDF5's timestamps differ
(folder / "labels.txt").write_bytes(b"the same in every build")
while time.time() < start:
    time.sleep(0.001)
result = ObjectStore(parse_location(f"s3://{bucket}/artifacts")).put_folder(folder, key)
print(json.dumps(result))
"""


def test_two_processes_building_one_key_at_once_both_succeed_and_agree(s3_bucket, tmp_path):
    import json
    import subprocess
    import sys
    import time

    start = time.time() + 5  # both processes import and build, then put at the same moment
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    builders = [subprocess.Popen([sys.executable, "-c", _BUILDER, s3_bucket, KEY, str(tmp_path / f"build{number}"),
                                  str(start)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                for number in (1, 2)]
    results = []
    for builder in builders:
        out, err = builder.communicate(timeout=120)
        assert builder.returncode == 0, err
        results.append(json.loads(out))
    assert sorted(result["adopted"] for result in results) == [False, True]
    assert results[0]["contents"] == results[1]["contents"]
    store = _store(s3_bucket)
    assert store.contents(KEY) == results[0]["contents"]
    winner = next(number for number, result in zip((1, 2), results) if not result["adopted"])
    fetched = store.fetch_folder(KEY, tmp_path / "cache")
    assert (fetched / "train.h5").read_bytes() == (tmp_path / f"build{winner}" / "train.h5").read_bytes()
    # Only the winner's objects are left: the loser removed the one only it had uploaded.
    objects = {path.rsplit("/", 1)[1] for path in store.filesystem.ls(store.path(f"{KEY}/objects"), detail=False)}
    assert objects == {entry["sha256"] for entry in results[0]["contents"]["files"].values()}


def test_the_data_steps_build_once_through_the_store_and_another_host_fetches_the_same_shards(
        s3_bucket, small_archive, http_server, tmp_path):
    """Host one builds source, split and shards into its cache and puts them on the store; host two only fetches."""
    import shutil

    from alexnet_tasks.config import PipelineConfig
    from alexnet_tasks.data.download import download
    from alexnet_tasks.data.shards import build_shards
    from alexnet_tasks.data.split import split
    from alexnet_tasks.data.stored import stored_folder

    www, base_url = http_server
    shutil.copy(small_archive[0], www / "cifar-10-python.tar.gz")
    config = PipelineConfig(source_url=f"{base_url}/cifar-10-python.tar.gz", source_md5=small_archive[1],
                            validation_size=50)
    store = _store(s3_bucket)

    def prepare(cache: Path, allow_build: bool) -> dict:
        def step(function):
            def build(root):
                assert allow_build, f"{function.__name__} ran, though the store holds its output"
                return function(root)
            return build

        layout = Layout(cache)
        key = lambda path: path.relative_to(cache).as_posix()  # noqa: E731
        return {
            "source": stored_folder(store, key(layout.source(config.source_md5)), step(
                lambda root: download(config.source_url, config.source_md5, root)), cache),
            "split": stored_folder(store, key(layout.split(config)), step(
                lambda root: split(layout.batches(config.source_md5), root, config)), cache),
            "shards": stored_folder(store, key(layout.shards(config)), step(
                lambda root: build_shards(layout.batches(config.source_md5), layout.manifest(config), root, config)),
                cache),
        }

    first = prepare(tmp_path / "host-one-cache", allow_build=True)
    assert all(folder["built"] and not folder["adopted"] for folder in first.values())
    second = prepare(tmp_path / "host-two-cache", allow_build=False)
    assert not any(folder["built"] for folder in second.values())
    for name in first:
        mine, theirs = first[name]["folder"], second[name]["folder"]
        files = sorted(path.relative_to(mine) for path in mine.rglob("*") if path.is_file())
        assert files == sorted(path.relative_to(theirs) for path in theirs.rglob("*") if path.is_file())
        assert all((mine / path).read_bytes() == (theirs / path).read_bytes() for path in files), name
    assert {path.name for path in second["shards"]["folder"].iterdir()} >= {"test.h5", "train.h5", "validation.h5"}


def test_under_airflow_the_store_takes_its_credentials_from_a_connection(s3_bucket, s3_server, monkeypatch, tmp_path):
    """With no AWS_* variable at all, ObjectStore and S3Store reach the store through an Airflow connection."""
    import json

    from alexnet_tasks.layout import published_path
    from alexnet_tasks.release.registry import Registry, S3Store
    from alexnet_tasks.store import ObjectStore, airflow_filesystem, parse_location

    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws either
    monkeypatch.setenv("ALEXNET_ARTIFACTS_CONN_ID", "artifacts_store")
    monkeypatch.setenv("AIRFLOW_CONN_ARTIFACTS_STORE", json.dumps({
        "conn_type": "aws", "login": "testing", "password": "testing",
        "extra": {"endpoint_url": s3_server, "region_name": "us-east-1"}}))
    location = parse_location(f"s3://{s3_bucket}/artifacts")
    store = ObjectStore(location, airflow_filesystem(location))
    store.put_folder(_folder(tmp_path / "built", {"train.h5": b"through the connection"}), KEY)
    assert (store.fetch_folder(KEY, tmp_path / "cache") / "train.h5").read_bytes() == b"through the connection"
    registry = Registry(store=S3Store.from_connection(location, cache=tmp_path / "cache"))
    registry.promote(published_path("run-1"))
    assert registry.store.champion_path() == published_path("run-1")
    from botocore.exceptions import NoCredentialsError

    monkeypatch.setenv("ALEXNET_ARTIFACTS_CONN_ID", "no_such_connection")  # the hook then has no credentials
    with pytest.raises(NoCredentialsError):
        S3Store.from_connection(location).champion_path()
