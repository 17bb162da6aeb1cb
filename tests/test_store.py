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
