from pathlib import Path

import pytest

from alexnet_tasks.config import Layout, PipelineConfig, artifacts_root, safe_run_id


def test_defaults_are_valid_and_official():
    config = PipelineConfig.from_dict({})
    assert config.source_md5 == "c58f30108f718f92721af3b95e74349a"
    assert config.source_url.endswith("cifar-10-python.tar.gz")
    assert config.image_size == 227 and config.validation_size == 5000


def test_unknown_keys_are_rejected_by_name():
    with pytest.raises(ValueError, match="unknown setting.*'epoch'"):
        PipelineConfig.from_dict({"epoch": 3})


@pytest.mark.parametrize(
    "values, message",
    [
        ({"image_size": 66}, "image_size must be between 67"),
        ({"epochs": 0}, "epochs must be between 1"),
        ({"epochs": 2.5}, "epochs must be an integer"),
        ({"batch_size": True}, "batch_size must be an integer"),
        ({"learning_rate": 0}, r"learning_rate must be in \(0, 10\]"),
        ({"learning_rate": "fast"}, "learning_rate must be a number"),
        ({"source_md5": "ABC"}, "source_md5 must be 32 lowercase hex"),
        ({"recipe": "turbo"}, "recipe must be one of"),
        ({"validation_size": 5}, "validation_size must be between 10"),
        ({"train_limit": 3}, "train_limit must be between 10"),
        ({"source_url": " "}, "source_url must be a non-empty"),
    ],
)
def test_bad_values_name_the_setting(values, message):
    with pytest.raises(ValueError, match=message):
        PipelineConfig.from_dict(values)


def test_split_settings_checked_against_the_archive():
    PipelineConfig(validation_size=100, train_limit=50).check_against_source(200)
    with pytest.raises(ValueError, match="validation_size=200 leaves no training images.*200"):
        PipelineConfig(validation_size=200).check_against_source(200)
    with pytest.raises(ValueError, match="train_limit=150 exceeds the 100 training images"):
        PipelineConfig(validation_size=100, train_limit=150).check_against_source(200)


def test_data_folders_are_keyed_by_source_and_shaping_settings(tmp_path):
    layout = Layout(tmp_path)
    a = PipelineConfig(source_md5="a" * 32, validation_size=100, seed=1)
    b = PipelineConfig(source_md5="a" * 32, validation_size=100, seed=2)
    c = PipelineConfig(source_md5="a" * 32, validation_size=100, seed=1, epochs=3, image_size=99)
    assert layout.shards(a) != layout.shards(b)
    assert layout.shards(a) == layout.shards(c)  # training settings do not reshape the data
    assert layout.shards(a).parent == tmp_path / "data" / ("a" * 32)


def test_run_ids_become_safe_folder_names(tmp_path):
    assert safe_run_id("manual__2026-11-28T13:32:49+00:00") == "manual__2026-11-28T13_32_49_00_00"
    assert Layout(tmp_path).run("a/../b").parent == tmp_path / "runs"
    with pytest.raises(ValueError):
        safe_run_id("..")


def test_artifacts_root_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ALEXNET_ARTIFACTS", str(tmp_path / "x"))
    assert artifacts_root() == tmp_path / "x"
    monkeypatch.delenv("ALEXNET_ARTIFACTS")
    assert artifacts_root() == Path("~/alexnet-artifacts").expanduser().resolve()
