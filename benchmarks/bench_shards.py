#!/usr/bin/env python3
"""Shards for all 60,000 images: seconds, peak memory, MB on disk.

Baseline, same run: what the reference input pipeline spends to preprocess the
same images for ONE epoch (per-image standardization and resize to 227x227 with
TensorFlow, batch 32), which it pays again every epoch, while the shards are
built once. Budget: at most 800 MB, 60 s and 1.5 GB peak memory.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from common import CACHE, REPO, prepared_shards, save, table, timed

CHILD = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from alexnet_tasks.config import PipelineConfig
from alexnet_tasks.data.shards import build_shards
from common import peak_rss_mb
config = PipelineConfig(**json.loads({config!r}))
before = peak_rss_mb()
start = time.perf_counter()
result = build_shards(Path({batch_dir!r}), Path({manifest!r}), Path({root!r}), config)
print(json.dumps({{"seconds": time.perf_counter() - start, "bytes": result["bytes"],
                  "peak_rss_mb": peak_rss_mb(), "rss_before_mb": before}}))
"""


def reference_preprocessing(images, sample: int = 9600) -> dict:
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices(images[:sample]).batch(32)
    step = lambda batch: tf.image.resize(tf.image.per_image_standardization(tf.cast(batch, tf.float32)), (227, 227))
    for batch in dataset.take(2):
        step(batch)
    with timed() as clock:
        for batch in dataset:
            step(batch).numpy()
    rate = sample / clock["seconds"]
    return {"images": sample, "seconds": clock["seconds"], "images_per_second": rate, "seconds_for_60000": 60000 / rate}


def main() -> None:
    config, layout, shards_dir, kind = prepared_shards()
    root = CACHE / "shards-bench"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    # A fresh root with only the verified source and the split: build_shards starts from scratch.
    shutil.copytree(layout.data(config.source_md5) / "source", root / "data" / config.source_md5 / "source")
    shutil.copytree(layout.split(config), root / "data" / config.source_md5 / layout.split(config).name)
    from alexnet_tasks.layout import Layout

    child = CHILD.format(repo=str(REPO), config=json.dumps(config.to_dict()), root=str(root),
                         batch_dir=str(Layout(root).batches(config.source_md5)),
                         manifest=str(Layout(root).split(config) / "manifest.json"))
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent).stdout
    ours = json.loads(out.strip().splitlines()[-1])
    shutil.rmtree(root)

    from alexnet_tasks.data.download import load_cifar10

    data = load_cifar10(layout.batches(config.source_md5))
    import numpy as np

    baseline = reference_preprocessing(np.concatenate([data.train_images, data.test_images]))
    payload = {
        "archive": kind,
        "images": 60000,
        "shards": {"seconds": ours["seconds"], "mb_on_disk": ours["bytes"] / 1e6, "peak_rss_mb": ours["peak_rss_mb"]},
        "reference_preprocessing_one_epoch": baseline,
        "budget": {"mb_on_disk": 800, "seconds": 60, "peak_rss_mb": 1536},
    }
    payload["ratio_reference_epoch_over_shards"] = baseline["seconds_for_60000"] / ours["seconds"]
    print(table(
        f"Shards for 60,000 images ({kind})",
        ["what", "seconds", "MB on disk", "peak RSS MB"],
        [["build_shards (once)", ours["seconds"], ours["bytes"] / 1e6, ours["peak_rss_mb"]],
         ["budget", 60, 800, 1536],
         ["reference: standardize + resize to 227, one epoch", baseline["seconds_for_60000"], "-", "-"]],
    ))
    print(f"reference preprocessing measured on {baseline['images']} images at {baseline['images_per_second']:.0f} img/s, "
          f"scaled to 60,000; it is paid every epoch, the shards once "
          f"({payload['ratio_reference_epoch_over_shards']:.1f}x the shard build per epoch)")
    save("shards", payload)


if __name__ == "__main__":
    main()
