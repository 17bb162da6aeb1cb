"""The memory estimate against the built model and a measured fit; runs that cannot fit refused before training."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import prepare_shards, train_script

from alexnet_tasks.config import MIN_IMAGE_SIZE
from alexnet_tasks.errors import is_permanent
from alexnet_tasks.training.memory import (
    InsufficientMemoryError,
    alexnet_layers,
    check_memory,
    estimate_memory,
    host_memory,
    parameter_count,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("image_size", [MIN_IMAGE_SIZE, 99, 227])
def test_layers_and_parameters_are_the_built_models(image_size):
    import numpy as np

    from alexnet_tasks.training.model import build_alexnet

    model = build_alexnet(image_size)
    assert parameter_count(image_size) == model.count_params()
    built = {layer.name: int(np.prod(layer.output.shape[1:])) for layer in model.layers if layer.name != "flatten"}
    assert {layer.name: layer.outputs for layer in alexnet_layers(image_size)} == built


def test_the_named_largest_batch_and_image_size_fit_and_one_more_does_not():
    options = {"data_images": 45_000}
    available = estimate_memory(227, 64, **options).host - 1
    with pytest.raises(InsufficientMemoryError) as raised:
        check_memory(227, 64, available, "a test host", on_host=True, **options)
    message = str(raised.value)
    assert "a test host has" in message and "needs about" in message
    batch = int(re.search(r"largest batch per device that fits at image_size 227 is (\d+)", message)[1])
    size = int(re.search(r"largest image_size that fits with 64 images per device is (\d+)", message)[1])
    assert estimate_memory(227, batch, **options).host <= available < estimate_memory(227, batch + 1, **options).host
    assert estimate_memory(size, 64, **options).host <= available < estimate_memory(size + 1, 64, **options).host
    assert is_permanent(raised.value)


def test_a_gpu_holds_one_replica_without_the_hosts_images_and_runtime():
    estimate = estimate_memory(227, 128, data_images=45_000)
    assert check_memory(227, 128, estimate.device, "GPU:0", on_host=False, data_images=45_000) == estimate
    with pytest.raises(InsufficientMemoryError, match=r"but GPU:0 has"):
        check_memory(227, 128, estimate.device - 1, "GPU:0", on_host=False, data_images=45_000)


@pytest.mark.slow
def test_the_estimate_covers_a_measured_fit_and_stays_close_to_it():
    """Peak RSS of a real one-epoch fit at 67 with batch 32 (scripts/measure_train_memory.py)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from measure_train_memory import measure

    measured = measure(MIN_IMAGE_SIZE, 32, 256)
    estimate = estimate_memory(MIN_IMAGE_SIZE, 32, momentum=measured["momentum"] > 0, ema=measured["ema"],
                               precision=measured["precision"], data_images=256)
    # The same fit peaked at 1,160 to 1,368 MB across machines and load (training/memory.py's docstring):
    # the estimate covers it, and is not more than 30% above it.
    assert measured["peak"] <= estimate.host <= 1.3 * measured["peak"], (measured, estimate)


def _too_big_for_this_host(data_images: int) -> int:
    """A batch at image_size 1024 whose float32 estimate exceeds this host's memory."""
    available = host_memory()[0]
    for batch in range(1, data_images + 1):
        if estimate_memory(1024, batch, data_images=data_images, precision="float32").host > available:
            return batch
    pytest.skip(f"this host's {available} bytes hold image_size 1024 with every batch up to {data_images}")


@pytest.mark.slow
def test_a_run_that_cannot_fit_the_host_is_refused_before_training(small_archive, tmp_path):
    from alexnet_tasks.training.train import train

    # float32 pinned: on a CPU with AMX the fast recipe trains in bfloat16, whose smaller estimate may fit
    # the batch found for float32, and the run would start training at 1024.
    config, shards_dir = prepare_shards(small_archive, tmp_path, image_size=MIN_IMAGE_SIZE, recipe="fast",
                                        recipe_options={"precision": "float32"})
    batch = _too_big_for_this_host(200)  # the 150 train and 50 validation images train holds
    config = type(config)(**{**config.to_dict(), "image_size": 1024, "batch_size": batch})
    run_dir = tmp_path / "runs" / "huge"
    started = time.monotonic()
    with pytest.raises(InsufficientMemoryError) as raised:
        train(shards_dir, run_dir, config)
    assert time.monotonic() - started < 60
    message = str(raised.value)
    assert f"image_size=1024 with {batch} images per device needs about" in message
    assert "the host (MemTotal in /proc/meminfo" in message or "the host (the cgroup limit" in message
    assert "largest image_size that fits" in message
    assert is_permanent(raised.value)
    assert not (run_dir / "model.keras").exists() and not (run_dir / "checkpoints").exists()


def _own_memory_cgroup() -> Path | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            folder = Path("/sys/fs/cgroup/memory") / path.strip("/")
            return folder if (folder / "memory.limit_in_bytes").is_file() else None
    return None


@pytest.mark.slow
def test_a_run_in_a_cgroup_smaller_than_it_needs_is_refused_naming_the_limit(small_archive, tmp_path):
    parent = _own_memory_cgroup()
    if parent is None or not os.access(parent, os.W_OK):
        pytest.skip("needs a writable cgroup v1 memory controller")
    limit = 1_600_000_000  # above what TensorFlow needs to start, below what 227 with 16 needs
    config, shards_dir = prepare_shards(small_archive, tmp_path, image_size=227, batch_size=16, epochs=1,
                                        recipe="fast", recipe_options={"precision": "float32"})
    assert estimate_memory(227, 16, data_images=200).host > limit
    group = parent / f"alexnet-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        script = train_script(shards_dir, tmp_path / "runs" / "limited", config)
        done = subprocess.run(
            ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$0" -c "$1"', sys.executable, script],
            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    assert "InsufficientMemoryError: image_size=227 with 16 images per device" in done.stderr
    assert f"the host (the cgroup limit in {group}" in done.stderr
    assert "the largest image_size that fits with 16 images per device is" in done.stderr


def test_the_image_size_description_states_the_estimates_bound():
    import dataclasses

    from alexnet_tasks.config import PipelineConfig

    field = next(item for item in dataclasses.fields(PipelineConfig) if item.name == "image_size")
    description = field.metadata["description"]
    found = re.search(r"batch of (\d+) per device, 227 needs about ([\d.]+) GB and 1024 about (\d+) GB; "
                      r"a (\d+) GB CPU worker holds up to about (\d+)", description)
    batch, small, large, host, largest = int(found[1]), float(found[2]), int(found[3]), int(found[4]), int(found[5])
    full = {"data_images": 50_000}
    assert f"{estimate_memory(227, batch, **full).host / 1e9:.1f}" == f"{small:.1f}"
    assert round(estimate_memory(1024, batch, **full).host / 1e9, -1) == large
    available = host * 10**9
    assert estimate_memory(largest, batch, **full).host <= available < estimate_memory(largest + 1, batch, **full).host
