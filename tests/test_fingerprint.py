import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

from alexnet_tasks.training.checkpoints import resumable_state
from alexnet_tasks.training.fingerprint import code_version, run_fingerprint
from alexnet_tasks.training.recipe import resolve_hyperparameters
from conftest import ROOT, prepare_shards


@pytest.fixture(scope="module")
def shards(small_archive, tmp_path_factory):
    """Two shard sets of the same archive: split seeds 42 and 7 (other images in each split)."""
    root = tmp_path_factory.mktemp("fingerprint")
    first = prepare_shards(small_archive, root, image_size=67, recipe="fast")
    other = prepare_shards(small_archive, root, image_size=67, recipe="fast", split_seed=7)
    return first, other


def test_code_version_names_the_package_and_the_git_commit():
    version = code_version()
    assert version["package"] == "0.1.0"
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert version["git_commit"] == head.stdout.strip() and len(version["git_commit"]) == 40
    assert isinstance(version["git_dirty"], bool)


def test_code_version_outside_a_git_checkout_has_no_commit(tmp_path):
    copy = tmp_path / "installed"
    shutil.copytree(ROOT / "alexnet_tasks", copy / "alexnet_tasks")
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    code = "import json; from alexnet_tasks.training.fingerprint import code_version; print(json.dumps(code_version()))"
    env = {**os.environ, "PYTHONPATH": str(copy), "GIT_CEILING_DIRECTORIES": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path, check=True)
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {"package": "0.1.0", "git_commit": None, "git_dirty": None}


def test_fingerprint_covers_settings_data_and_code(shards):
    (config, shards_dir), (other_config, other_dir) = shards
    hyperparameters = resolve_hyperparameters(config)
    first = run_fingerprint(config, hyperparameters, shards_dir)
    assert first == run_fingerprint(config, hyperparameters, shards_dir)  # stable
    assert len(first["fingerprint"]) == 64 and int(first["fingerprint"], 16) >= 0
    parts = first["parts"]
    assert set(parts) == {"settings", "data_key", "shards_sha256", "code_version"}
    assert parts["settings"]["learning_rate"] == 0.04 and parts["code_version"] == code_version()
    assert parts["data_key"] == {"source_md5": config.source_md5, "shards_key": config.shards_key()}
    # Other hyperparameters, other data, the same hyperparameters on other shard content: all other fingerprints.
    other_rate = run_fingerprint(config, resolve_hyperparameters(config.__class__(**{**config.to_dict(), "learning_rate": 0.02})), shards_dir)
    other_data = run_fingerprint(other_config, resolve_hyperparameters(other_config), other_dir)
    same_key_other_content = run_fingerprint(config, hyperparameters, other_dir)
    assert len({first["fingerprint"], other_rate["fingerprint"], other_data["fingerprint"],
                same_key_other_content["fingerprint"]}) == 4
    assert same_key_other_content["parts"]["shards_sha256"] != parts["shards_sha256"]


def test_a_state_of_another_fingerprint_is_not_resumed_and_the_log_says_why(shards, tmp_path, caplog):
    (config, shards_dir), _ = shards
    saved = run_fingerprint(config, resolve_hyperparameters(config), shards_dir)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "epoch-0001.keras").write_bytes(b"checkpoint")
    state = {"epochs_done": 1, "checkpoint": "epoch-0001.keras", "fingerprint": saved["fingerprint"],
             "fingerprint_parts": saved["parts"], "history": [{"epoch": 1}]}
    (run_dir / "state.json").write_text(json.dumps(state))
    assert resumable_state(run_dir, saved) == state
    changed = run_fingerprint(config.__class__(**{**config.to_dict(), "epochs": 9}), resolve_hyperparameters(
        config.__class__(**{**config.to_dict(), "epochs": 9})), shards_dir)
    with caplog.at_level(logging.WARNING):
        assert resumable_state(run_dir, changed) is None
    assert "belongs to another run fingerprint (settings.epochs differ); starting over" in caplog.text


@pytest.mark.slow
def test_training_again_with_other_settings_starts_over(small_archive, tmp_path, caplog):
    from alexnet_tasks.training.train import train

    config, shards_dir = prepare_shards(small_archive, tmp_path, image_size=67, epochs=1, batch_size=16, recipe="reference")
    run_dir = tmp_path / "runs" / "same-run-id"
    first = train(shards_dir, run_dir, config)
    for name in ("config.json", "state.json", "train_summary.json"):
        assert json.loads((run_dir / name).read_text())["fingerprint"] == first["fingerprint"], name
    again = config.__class__(**{**config.to_dict(), "epochs": 2})
    with caplog.at_level(logging.WARNING):
        second = train(shards_dir, run_dir, again)
    assert "(settings.epochs differ); starting over" in caplog.text
    assert second["resumed_from"] == 0 and second["epochs"] == 2 and second["fingerprint"] != first["fingerprint"]
    assert json.loads((run_dir / "state.json").read_text())["fingerprint"] == second["fingerprint"]
