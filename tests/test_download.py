import io
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from alexnet_tasks.layout import Layout
from alexnet_tasks.data.download import ArchiveError, RestrictedUnpickler, download, load_cifar10
from cifar_archive import archive_members, batch_payload, md5_of, py2_dumps, write_tar


def _nothing_left(root: Path, md5: str) -> None:
    """No complete source folder and no temporary leftovers for this checksum (its lock file may stay)."""
    data = root / "data" / md5
    assert not (data / "source").exists()
    assert not data.exists() or [path.name for path in data.iterdir()] in ([], [".source.lock"])


def test_download_over_http_verifies_extracts_and_loads(small_archive, http_server, artifacts):
    path, md5 = small_archive
    folder, base = http_server
    shutil.copy(path, folder / path.name)
    result = download(f"{base}/{path.name}", md5, artifacts)
    assert result["reused"] is False
    assert result["train_images"] == 200 and result["test_images"] == 60
    source = Layout(artifacts).source(md5)
    assert md5_of(source / "cifar-10-python.tar.gz") == md5
    data = load_cifar10(Path(result["batch_dir"]))
    assert data.train_images.shape == (200, 32, 32, 3) and data.train_images.dtype == np.uint8
    assert data.class_names[0] == "airplane" and data.class_names[-1] == "truck"


def test_rows_are_planes_converted_to_nhwc(tmp_path, artifacts):
    members = archive_members(train_per_batch=10, test_count=10)
    rows = np.zeros((10, 3072), dtype=np.uint8)
    rows[0, :1024] = 200  # red plane of the first image
    rows[0, 1024 + 5] = 17  # green value at row 0, column 5
    members["cifar-10-batches-py/data_batch_1"] = py2_dumps(batch_payload("b1", rows, list(range(10))))
    path = write_tar(tmp_path / "a.tar.gz", members)
    result = download(str(path), md5_of(path), artifacts)
    image = load_cifar10(Path(result["batch_dir"])).train_images[0]
    assert image[:, :, 0].min() == 200 and image[0, 5, 1] == 17 and image[0, 6, 1] == 0


def test_file_url_and_plain_path_and_reuse(small_archive, tmp_path, artifacts):
    path, md5 = small_archive
    first = download(path.as_uri(), md5, artifacts)
    assert first["reused"] is False
    # The verified copy is reused: the source may even be gone now.
    second = download(str(tmp_path / "gone.tar.gz"), md5, artifacts)
    assert second["reused"] is True and second["batch_dir"] == first["batch_dir"]


def test_corrupted_cache_is_fetched_again(small_archive, artifacts):
    path, md5 = small_archive
    download(str(path), md5, artifacts)
    cached = Layout(artifacts).source(md5) / "cifar-10-python.tar.gz"
    cached.write_bytes(b"garbage")
    assert download(str(path), md5, artifacts)["reused"] is False
    assert md5_of(cached) == md5


def test_md5_mismatch_is_refused_and_leaves_nothing(small_archive, artifacts):
    path, md5 = small_archive
    wrong = "0" * 32
    with pytest.raises(ArchiveError, match=f"MD5 mismatch, expected {wrong}, got {md5}"):
        download(str(path), wrong, artifacts)
    _nothing_left(artifacts, wrong)


def test_html_error_page_is_named(http_server, artifacts):
    folder, base = http_server
    (folder / "cifar.tar.gz").write_text("<!DOCTYPE html><html><body>Service unavailable</body></html>")
    with pytest.raises(ArchiveError, match="HTML/XML page"):
        download(f"{base}/cifar.tar.gz", "1" * 32, artifacts)
    _nothing_left(artifacts, "1" * 32)


def test_http_404_is_named(http_server, artifacts):
    _, base = http_server
    with pytest.raises(ArchiveError, match="HTTP 404"):
        download(f"{base}/missing.tar.gz", "2" * 32, artifacts)


def test_not_gzip(tmp_path, artifacts):
    path = tmp_path / "x.tar.gz"
    path.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(ArchiveError, match="not a gzip file"):
        download(str(path), "3" * 32, artifacts)


def test_truncated_archive_with_matching_md5(small_archive, tmp_path, artifacts):
    path, _ = small_archive
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    md5 = md5_of(truncated)
    with pytest.raises(ArchiveError, match="truncated or corrupt"):
        download(str(truncated), md5, artifacts)
    _nothing_left(artifacts, md5)


def test_missing_member(tmp_path, artifacts):
    members = archive_members()
    del members["cifar-10-batches-py/test_batch"]
    path = write_tar(tmp_path / "a.tar.gz", members)
    with pytest.raises(ArchiveError, match="missing member test_batch"):
        download(str(path), md5_of(path), artifacts)
    _nothing_left(artifacts, md5_of(path))


def test_wrong_shape(tmp_path, artifacts):
    members = archive_members()
    rows = np.zeros((10, 3000), dtype=np.uint8)
    members["cifar-10-batches-py/data_batch_3"] = py2_dumps(batch_payload("b3", rows, [0] * 10))
    path = write_tar(tmp_path / "a.tar.gz", members)
    with pytest.raises(ArchiveError, match=r"data_batch_3: b'data' must be uint8 rows of 3072 values, got shape \(10, 3000\)"):
        download(str(path), md5_of(path), artifacts)


def test_labels_out_of_range(tmp_path, artifacts):
    members = archive_members()
    rows = np.zeros((2, 3072), dtype=np.uint8)
    members["cifar-10-batches-py/test_batch"] = py2_dumps(batch_payload("t", rows, [0, 10]))
    path = write_tar(tmp_path / "a.tar.gz", members)
    with pytest.raises(ArchiveError, match="labels must lie in 0..9"):
        download(str(path), md5_of(path), artifacts)


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = 1 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize(
    "member, message",
    [
        (_member("cifar-10-batches-py/../../escaped.txt"), "escapes the folder"),
        (_member("/tmp/absolute-alexnet-test.txt"), "absolute path"),
        (_member("cifar-10-batches-py/link", tarfile.SYMTYPE, "/etc/passwd"), "link member"),
        (_member("cifar-10-batches-py/hard", tarfile.LNKTYPE, "cifar-10-batches-py/test_batch"), "link member"),
        (_member("cifar-10-batches-py/dev", tarfile.CHRTYPE), "special member"),
        (_member("cifar-10-batches-py/fifo", tarfile.FIFOTYPE), "special member"),
    ],
)
def test_unsafe_members_refuse_the_whole_archive(tmp_path, artifacts, member, message):
    path = write_tar(tmp_path / "evil.tar.gz", archive_members(), extra=[member])
    with pytest.raises(ArchiveError, match=message):
        download(str(path), md5_of(path), artifacts)
    _nothing_left(artifacts, md5_of(path))
    assert not (tmp_path / "escaped.txt").exists() and not (artifacts.parent / "escaped.txt").exists()
    assert not Path("/tmp/absolute-alexnet-test.txt").exists()


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_forbidden_global_is_refused_and_never_executed(tmp_path, artifacts):
    marker = tmp_path / "executed"
    members = archive_members()
    members["cifar-10-batches-py/data_batch_2"] = pickle.dumps({"data": _Exploit(marker)}, protocol=2)
    path = write_tar(tmp_path / "evil.tar.gz", members)
    with pytest.raises(ArchiveError, match=r"evil.tar.gz!cifar-10-batches-py/data_batch_2: .*forbidden global (posix|os)\.system"):
        download(str(path), md5_of(path), artifacts)
    assert not marker.exists()
    _nothing_left(artifacts, md5_of(path))


def test_restricted_unpickler_still_reads_numpy_arrays():
    array = np.arange(6, dtype=np.uint8).reshape(2, 3)
    loaded = RestrictedUnpickler(io.BytesIO(py2_dumps({b"a": array})), encoding="bytes").load()
    np.testing.assert_array_equal(loaded[b"a"], array)
