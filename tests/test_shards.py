from pathlib import Path

import h5py
import numpy as np
import pytest

from alexnet_tasks.config import PREPROCESSING_VERSION, PipelineConfig
from alexnet_tasks.layout import Layout
from alexnet_tasks.data.download import download, load_cifar10
from alexnet_tasks.data.shards import ShardError, build_shards, load_split, standardize, verify_shards
from alexnet_tasks.data.split import split
from builders import flip_one_image_byte


@pytest.fixture
def built(small_archive, artifacts):
    path, md5 = small_archive
    batch_dir = Path(download(str(path), md5, artifacts)["batch_dir"])
    config = PipelineConfig(source_md5=md5, validation_size=50)
    manifest = split(batch_dir, artifacts, config)["manifest"]
    return batch_dir, manifest, config, build_shards(batch_dir, manifest, artifacts, config)


def test_standardize_matches_tensorflow():
    import tensorflow as tf

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 32, 32, 3)).astype(np.uint8)
    images[1] = 7  # constant image: the std floor 1/sqrt(3072) applies
    expected = tf.image.per_image_standardization(images.astype(np.float32)).numpy()
    np.testing.assert_allclose(standardize(images), expected, atol=2e-5, rtol=1e-5)
    assert np.all(standardize(images[1:2]) == 0)
    # Nearly constant image: TensorFlow's float32 E[x^2]-E[x]^2 loses ~1e-3 to cancellation;
    # ours is computed in float64 and has mean 0 and std 1 to float32 precision.
    flat = rng.integers(100, 103, size=(1, 32, 32, 3)).astype(np.uint8)
    ours = standardize(flat)
    np.testing.assert_allclose(ours, tf.image.per_image_standardization(flat.astype(np.float32)).numpy(), atol=2e-3)
    assert abs(float(ours.mean())) < 1e-6 and abs(float(ours.std()) - 1) < 1e-5


def test_shards_hold_standardized_native_images_with_labels_and_attributes(built, small_archive):
    batch_dir, manifest, config, result = built
    data = load_cifar10(batch_dir)
    import json

    indices = json.loads(Path(manifest).read_text())["splits"]["train"]["indices"]
    with h5py.File(result["train"], "r") as handle:
        images = handle["images"]
        assert images.shape == (150, 32, 32, 3) and images.dtype == np.float32
        assert images.fletcher32 and handle["labels"].fletcher32
        assert images.chunks[1:] == (32, 32, 3) and images.chunks[0] > 1
        np.testing.assert_array_equal(handle["labels"][...], data.train_labels[indices])
        np.testing.assert_allclose(images[...], standardize(data.train_images[indices]))
        assert handle.attrs["source_md5"] == small_archive[1]
        assert handle.attrs["preprocessing_version"] == PREPROCESSING_VERSION
        assert list(handle.attrs["class_names"])[:2] == ["airplane", "automobile"]
    counts = verify_shards(result["shards_dir"], small_archive[1])
    assert counts == {"train": 150, "validation": 50, "test": 60}
    assert Path(result["shards_dir"]) == Layout(Path(result["shards_dir"]).parents[2]).shards(config)


def test_rebuild_reuses_intact_shards(built, artifacts):
    batch_dir, manifest, config, first = built
    again = build_shards(batch_dir, manifest, artifacts, config)
    assert again["reused"] is True and again["train"] == first["train"]


def test_corrupted_shard_fails_loudly_naming_the_file_and_is_rebuilt(built, artifacts):
    batch_dir, manifest, config, result = built
    before = load_split(result["train"])[0]
    flip_one_image_byte(Path(result["train"]))
    with pytest.raises(ShardError, match=f"{result['train']}: shard data is corrupt"):
        load_split(result["train"])
    rebuilt = build_shards(batch_dir, manifest, artifacts, config)
    assert rebuilt["reused"] is False
    np.testing.assert_array_equal(load_split(rebuilt["train"])[0], before)


def test_wrong_source_is_refused(built):
    result = built[3]
    with pytest.raises(ShardError, match="expected " + "f" * 32):
        load_split(result["test"], "f" * 32)


def test_missing_shard_is_named(tmp_path):
    with pytest.raises(ShardError, match="test.h5: shard is missing"):
        load_split(tmp_path / "test.h5")


def test_training_seeds_share_one_shard_set_a_split_seed_gets_its_own(small_archive, artifacts):
    path, md5 = small_archive
    batch_dir = Path(download(str(path), md5, artifacts)["batch_dir"])

    def data_steps(**seeds) -> tuple[dict, dict]:
        config = PipelineConfig(source_md5=md5, validation_size=50, **seeds)
        manifest = split(batch_dir, artifacts, config)
        return manifest, build_shards(batch_dir, manifest["manifest"], artifacts, config)

    first_split, first = data_steps(seed=1, split_seed=42)
    other_split, other_training_seed = data_steps(seed=2, split_seed=42)
    assert other_split["reused"] is True and other_training_seed["reused"] is True
    assert other_training_seed["shards_dir"] == first["shards_dir"]
    new_split, new_shards = data_steps(seed=1, split_seed=43)
    assert new_split["reused"] is False and new_shards["reused"] is False
    assert new_shards["shards_dir"] != first["shards_dir"]
    import json

    drawn = [json.loads(Path(result["manifest"]).read_text()) for result in (first_split, new_split)]
    assert [manifest["split_seed"] for manifest in drawn] == [42, 43]
    assert drawn[0]["splits"]["validation"]["indices"] != drawn[1]["splits"]["validation"]["indices"]
    # The split seed alone draws the split: the training seed plays no part in it.
    assert drawn[0]["splits"] == json.loads(Path(other_split["manifest"]).read_text())["splits"]
    shard_dirs = sorted(p.name for p in Layout(artifacts).data(md5).iterdir() if p.name.startswith("shards-"))
    assert len(shard_dirs) == 2
