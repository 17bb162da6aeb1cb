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
