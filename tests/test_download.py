import io
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from alexnet_tasks.layout import Layout
from alexnet_tasks.data.download import ArchiveError, RestrictedUnpickler, download, load_cifar10
from builders import tar_member
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


@pytest.mark.parametrize(
    "member, message",
    [
        (tar_member("cifar-10-batches-py/../../escaped.txt"), "escapes the folder"),
        (tar_member("/tmp/absolute-alexnet-test.txt"), "absolute path"),
        (tar_member("cifar-10-batches-py/link", tarfile.SYMTYPE, "/etc/passwd"), "link member"),
        (tar_member("cifar-10-batches-py/hard", tarfile.LNKTYPE, "cifar-10-batches-py/test_batch"), "link member"),
        (tar_member("cifar-10-batches-py/dev", tarfile.CHRTYPE), "special member"),
        (tar_member("cifar-10-batches-py/fifo", tarfile.FIFOTYPE), "special member"),
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


# --------------------------------------------------------------------------- pickles as Python 3 and numpy write them
def _batches_at(protocol: int) -> dict[str, bytes]:
    """The small archive's members, every pickle written again by this Python and numpy at ``protocol``."""
    members = {}
    for name, data in archive_members().items():
        if name.endswith("readme.html"):
            members[name] = data
            continue
        payload = RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
        members[name] = pickle.dumps(payload, protocol=protocol)
    return members


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_batches_pickled_at_every_protocol_are_read(protocol, tmp_path, artifacts):
    path = write_tar(tmp_path / f"p{protocol}.tar.gz", _batches_at(protocol))
    result = download(str(path), md5_of(path), artifacts)
    reference = write_tar(tmp_path / "py2.tar.gz", archive_members())
    expected = load_cifar10(Path(download(str(reference), md5_of(reference), artifacts)["batch_dir"]))
    loaded = load_cifar10(Path(result["batch_dir"]))
    np.testing.assert_array_equal(loaded.train_images, expected.train_images)
    np.testing.assert_array_equal(loaded.test_labels, expected.test_labels)
    assert loaded.class_names == expected.class_names


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_plain_arrays_bytes_and_containers_are_read_at_every_protocol(protocol):
    from collections import OrderedDict

    values = {
        "uint8": np.arange(12, dtype=np.uint8).reshape(3, 4),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3)),
        "read_only": np.frombuffer(b"abcdef", dtype=np.uint8),
        "structured": np.zeros(2, dtype=[("a", "u1"), ("b", "<f4")]),
        "scalar": np.float32(1.5),
        "bytes": b"\x00\xff\\\n",
        "bytearray": bytearray(b"\x00\x80"),
        "set": {1, 2},
        "frozenset": frozenset({"a"}),
        "complex": 1 + 2j,
        "ordered": OrderedDict([("x", 1)]),
        "nested": [(1, 2.5, None, True, "s", 2**70)],
    }
    loaded = RestrictedUnpickler(io.BytesIO(pickle.dumps(values, protocol=protocol))).load()
    assert loaded.keys() == values.keys()
    for key, value in values.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(loaded[key], value)
            assert loaded[key].dtype == value.dtype
        else:
            assert loaded[key] == value and type(loaded[key]) is type(value)


class _Runs:
    """An object whose pickle calls ``function(*arguments)`` when loaded."""

    def __init__(self, function, *arguments):
        self.function, self.arguments = function, arguments

    def __reduce__(self):
        return self.function, self.arguments


def _code_runners(marker: Path) -> dict[str, _Runs]:
    import builtins
    import os
    import subprocess

    command = f"touch {marker}"
    return {
        "os.system": _Runs(os.system, command),
        "subprocess.check_call": _Runs(subprocess.check_call, ["touch", str(marker)]),
        "builtins.eval": _Runs(builtins.eval, f"open({str(marker)!r}, 'w')"),
        "builtins.exec": _Runs(builtins.exec, f"open({str(marker)!r}, 'w')"),
        "builtins.__import__": _Runs(__import__, "os"),
    }


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("kind", ["os.system", "subprocess.check_call", "builtins.eval", "builtins.exec", "builtins.__import__"])
def test_globals_that_run_code_are_refused_at_every_protocol(kind, protocol, tmp_path):
    marker = tmp_path / "executed"
    data = pickle.dumps({b"data": _code_runners(marker)[kind]}, protocol=protocol)
    with pytest.raises(pickle.UnpicklingError, match="forbidden global .*could run code"):
        RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    assert not marker.exists()


def test_an_object_that_is_not_plain_data_names_the_protocol_and_how_to_resave(tmp_path, artifacts):
    from decimal import Decimal

    members = archive_members()
    rows = np.zeros((2, 3072), dtype=np.uint8)
    members["cifar-10-batches-py/data_batch_4"] = pickle.dumps(
        {**batch_payload("b4", rows, [0, 1]), b"scale": Decimal("1.5")}, protocol=2)
    path = write_tar(tmp_path / "a.tar.gz", members)
    with pytest.raises(ArchiveError, match=r"data_batch_4: .*protocol 2 stores a decimal\.Decimal object.*"
                                           r"re-save the batch .*protocol=4") as raised:
        download(str(path), md5_of(path), artifacts)
    assert "forbidden" not in str(raised.value)
    _nothing_left(artifacts, md5_of(path))


def test_out_of_band_protocol_5_buffers_name_the_format_and_how_to_resave(tmp_path, artifacts):
    members = archive_members()
    rows = np.zeros((2, 3072), dtype=np.uint8)
    members["cifar-10-batches-py/test_batch"] = pickle.dumps(
        batch_payload("t", rows, [0, 1]), protocol=5, buffer_callback=lambda buffer: False)
    path = write_tar(tmp_path / "a.tar.gz", members)
    with pytest.raises(ArchiveError, match=r"test_batch: a pickle protocol 5 file whose arrays were written "
                                           r"out-of-band.*protocol=4"):
        download(str(path), md5_of(path), artifacts)


def test_an_uncompressed_tar_is_named_as_not_gzip_compressed(tmp_path, artifacts):
    path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w") as tar:
        for name, data in archive_members().items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    md5 = md5_of(path)
    with pytest.raises(ArchiveError, match=r"intact tar archive but not gzip-compressed.*gzip -n") as raised:
        download(str(path), md5, artifacts)
    assert "truncated" not in str(raised.value)
    _nothing_left(artifacts, md5)


# --------------------------------------------------------------------------- archives that expand past CIFAR-10
def test_only_the_members_the_pipeline_reads_are_extracted(tmp_path, artifacts):
    members = archive_members()
    members["cifar-10-batches-py/._data_batch_1"] = b"\x00\x05\x16\x07 AppleDouble"
    members["cifar-10-batches-py/notes/extra.txt"] = b"not CIFAR-10"
    path = write_tar(tmp_path / "a.tar.gz", members)
    result = download(str(path), md5_of(path), artifacts)
    written = sorted(item.name for item in Path(result["batch_dir"]).rglob("*"))
    assert written == sorted(["batches.meta", "test_batch", *(f"data_batch_{i}" for i in range(1, 6))])


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs: a member written in full before a check would fill it; skipped where mount is not allowed."""
    import subprocess

    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"needs the privilege to mount a tmpfs: {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


class _Zeros(io.RawIOBase):
    """``size`` zero bytes, streamed (the archive is written without holding them in memory)."""

    def __init__(self, size: int):
        self.left = size

    def readable(self):
        return True

    def readinto(self, buffer):
        count = min(len(buffer), self.left)
        buffer[:count] = bytes(count)
        self.left -= count
        return count


def _bomb(path: Path, name: str, size: int) -> Path:
    """The small archive plus (or with, in place of a batch) a member of ``size`` zero bytes."""
    members = archive_members()
    members.pop(name, None)
    import gzip

    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=1) as zipped, \
            tarfile.open(fileobj=zipped, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = size
        tar.addfile(info, io.BufferedReader(_Zeros(size), buffer_size=1 << 20))
        for member_name, data in members.items():
            info = tarfile.TarInfo(member_name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("name", ["cifar-10-batches-py/data_batch_1", "cifar-10-batches-py/batches.meta",
                                  "cifar-10-batches-py/filler.bin"])
def test_a_member_larger_than_any_real_one_is_refused_before_it_is_written(name, tmp_path, small_disk):
    from alexnet_tasks.data.download import BATCH_MEMBER_LIMIT, MEMBER_LIMITS
    from alexnet_tasks.errors import is_permanent

    size = MEMBER_LIMITS.get(name, BATCH_MEMBER_LIMIT) + 1
    path = _bomb(tmp_path / "bomb.tar.gz", name, size)
    assert path.stat().st_size < 2 << 20  # under 2 MiB: a small archive, its member's zeros compressed
    root = small_disk / "artifacts"
    with pytest.raises(ArchiveError, match=rf"refusing member {name!r}: it declares {size} bytes") as raised:
        download(str(path), md5_of(path), root)
    assert is_permanent(raised.value)
    _nothing_left(root, md5_of(path))


def test_extraction_counts_the_bytes_it_really_reads():
    from alexnet_tasks.data.download import _copy_bounded

    out = io.BytesIO()
    with pytest.raises(ArchiveError, match=r"refusing member 'cifar-10-batches-py/test_batch': it holds more than 10 bytes"):
        _copy_bounded(io.BytesIO(b"x" * 100), out, "cifar-10-batches-py/test_batch", 10)
    assert len(out.getvalue()) <= 10


def test_an_array_shape_larger_than_memory_is_a_bad_archive(tmp_path, artifacts):
    reconstruct = np.ndarray.__reduce__(np.zeros(0))[0]
    members = archive_members()
    members["cifar-10-batches-py/data_batch_5"] = pickle.dumps(
        {b"data": _Runs(reconstruct, np.ndarray, (10**13,), b"b")}, protocol=2)
    path = write_tar(tmp_path / "a.tar.gz", members)
    with pytest.raises(ArchiveError, match=r"data_batch_5: not a valid CIFAR-10 pickle, it asks for an impossible array"):
        download(str(path), md5_of(path), artifacts)
    _nothing_left(artifacts, md5_of(path))
