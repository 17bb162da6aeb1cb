import json
from pathlib import Path

import numpy as np
import pytest

from alexnet_tasks.config import PipelineConfig
from alexnet_tasks.layout import Layout
from alexnet_tasks.data.download import download, load_cifar10
from alexnet_tasks.data.split import split, stratified_take
from cifar_archive import archive_members, batch_payload, md5_of, py2_dumps, write_tar


@pytest.fixture
def source(small_archive, artifacts):
    path, md5 = small_archive
    result = download(str(path), md5, artifacts)
    return Path(result["batch_dir"]), md5


def test_manifest_holds_exact_disjoint_stratified_indices(source, artifacts):
    batch_dir, md5 = source
    config = PipelineConfig(source_md5=md5, validation_size=50, split_seed=3)
    result = split(batch_dir, artifacts, config)
    assert (result["train"], result["validation"], result["test"]) == (150, 50, 60)
    manifest = json.loads(Path(result["manifest"]).read_text())
    parts = manifest["splits"]
    train, validation = set(parts["train"]["indices"]), set(parts["validation"]["indices"])
    assert not train & validation and len(train | validation) == 200
    data = load_cifar10(batch_dir)
    # Stratified: every class keeps its share of the 200 training images (20 each -> 5 in validation).
    assert parts["validation"]["class_counts"] == [5] * 10
    assert parts["validation"]["class_counts"] == np.bincount(
        data.train_labels[sorted(validation)], minlength=10
    ).tolist()
    assert parts["test"]["indices"] == list(range(60))
    assert Path(result["manifest"]).parent == Layout(artifacts).split(config)


def test_same_split_seed_same_split_other_split_seed_other_split(source, artifacts):
    batch_dir, md5 = source
    first = json.loads(Path(split(batch_dir, artifacts, PipelineConfig(source_md5=md5, validation_size=50, split_seed=1))["manifest"]).read_text())
    again = split(batch_dir, artifacts, PipelineConfig(source_md5=md5, validation_size=50, split_seed=1))
    assert again["reused"] is True
    other = json.loads(Path(split(batch_dir, artifacts, PipelineConfig(source_md5=md5, validation_size=50, split_seed=2))["manifest"]).read_text())
    assert first["splits"]["validation"]["indices"] != other["splits"]["validation"]["indices"]


def test_train_limit_caps_training_images_stratified(source, artifacts):
    batch_dir, md5 = source
    result = split(batch_dir, artifacts, PipelineConfig(source_md5=md5, validation_size=50, train_limit=30))
    manifest = json.loads(Path(result["manifest"]).read_text())
    assert result["train"] == 30 and manifest["splits"]["train"]["class_counts"] == [3] * 10


def test_validation_larger_than_the_training_set_fails_clearly(source, artifacts):
    batch_dir, md5 = source
    with pytest.raises(ValueError, match="validation_size=500 leaves no training images: the archive has 200"):
        split(batch_dir, artifacts, PipelineConfig(source_md5=md5, validation_size=500))


def test_identical_image_in_two_splits_fails_with_the_count(tmp_path, artifacts):
    members = archive_members()
    # Copy two training images of batch 1 into the test batch.
    from alexnet_tasks.data.download import load_pickle

    write_tar(tmp_path / "base.tar.gz", members)
    base = download(str(tmp_path / "base.tar.gz"), md5_of(tmp_path / "base.tar.gz"), artifacts / "base")
    batch = load_pickle(Path(base["batch_dir"]) / "data_batch_1")
    test = load_pickle(Path(base["batch_dir"]) / "test_batch")
    rows = test[b"data"].copy()
    rows[:2] = batch[b"data"][:2]
    members["cifar-10-batches-py/test_batch"] = py2_dumps(batch_payload("t", rows, test[b"labels"]))
    path = write_tar(tmp_path / "leaky.tar.gz", members)
    md5 = md5_of(path)
    batch_dir = Path(download(str(path), md5, artifacts)["batch_dir"])
    config = PipelineConfig(source_md5=md5, validation_size=50)
    with pytest.raises(ValueError, match="2 identical image"):
        split(batch_dir, artifacts, config)
    assert not Layout(artifacts).split(config).exists()


def test_stratified_take_rounds_to_the_exact_count():
    labels = np.repeat(np.arange(3), [5, 3, 2])
    picked = stratified_take(labels, 7, np.random.default_rng(0))
    assert len(picked) == 7 and len(set(picked)) == 7
    assert np.bincount(labels[picked], minlength=3).tolist() == [4, 2, 1]
