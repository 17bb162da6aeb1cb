#!/usr/bin/env python3
"""Model-ready batches per second: the project's shard pipeline versus the reference's.

Reference, re-implemented faithfully: ``from_tensor_slices`` over the uint8
images -> ``map`` (per-image standardization, resize to 227x227) -> ``shuffle``
-> ``batch(32)``. Its 45,000-image shuffle buffer of 227x227 floats needs
27.8 GB; here it gets 2,000 images (1.2 GB), what this machine affords.

Project: the standardized 32x32 train shard, read once into memory, shuffled
per epoch and cut into batches; the resize to 227 happens inside the model on
the accelerator (its cost is in bench_train.py).
"""

from __future__ import annotations

import sys

import numpy as np

from common import REPO, prepared_shards, save, table, timed

sys.path.insert(0, str(REPO))
BATCH = 32
SHUFFLE_BUFFER = 2000
# The reference reported ~40 s per epoch of 45,000 images on one GPU: ~1,125 img/s.
REFERENCE_GPU_RATE = 45000 / 40


def reference_rate(images: np.ndarray, labels: np.ndarray, batches: int = 150) -> dict:
    import tensorflow as tf

    def preprocess(image, label):
        image = tf.image.per_image_standardization(tf.cast(image, tf.float32))
        return tf.image.resize(image, (227, 227)), label

    dataset = (tf.data.Dataset.from_tensor_slices((images, labels)).map(preprocess)
               .shuffle(SHUFFLE_BUFFER, seed=0).batch(BATCH))
    iterator = iter(dataset)
    with timed() as fill:
        next(iterator)  # fills the shuffle buffer
    with timed() as clock:
        for _ in range(batches):
            next(iterator)
    return {"images_per_second": batches * BATCH / clock["seconds"], "buffer_fill_seconds": fill["seconds"],
            "batches_measured": batches}


def project_rate(shard_path, expected_md5) -> dict:
    from alexnet_tasks.data.shards import load_split
    from alexnet_tasks.training.train import ShuffledBatches

    with timed() as load:
        images, labels = load_split(shard_path, expected_md5)
    batches = ShuffledBatches(images, labels, BATCH, seed=0)
    with timed() as clock:
        for index in range(len(batches)):
            batches[index]
    return {"images_per_second": len(labels) / clock["seconds"], "load_seconds": load["seconds"],
            "images": int(len(labels))}


def main() -> None:
    config, layout, shards_dir, kind = prepared_shards()
    from alexnet_tasks.data.download import load_cifar10

    data = load_cifar10(layout.batches(config.source_md5))
    ours = project_rate(shards_dir / "train.h5", config.source_md5)
    reference = reference_rate(data.train_images[:45000], data.train_labels[:45000])
    ratio = ours["images_per_second"] / reference["images_per_second"]
    payload = {"archive": kind, "batch": BATCH, "shuffle_buffer_reference": SHUFFLE_BUFFER,
               "project": ours, "reference": reference, "ratio": ratio, "target_ratio": 20,
               "reference_gpu_rate": REFERENCE_GPU_RATE}
    print(table(f"Input pipeline, batch {BATCH} ({kind})", ["pipeline", "images/s", "note"], [
        ["reference (map standardize+resize 227, shuffle 2000, batch)", reference["images_per_second"],
         f"buffer fill {reference['buffer_fill_seconds']:.1f} s"],
        ["project (32x32 shard in memory, shuffled batches)", ours["images_per_second"],
         f"shard load {ours['load_seconds']:.1f} s once"],
    ]))
    print(f"ratio {ratio:.0f}x (target 20x). The reference trained at ~{REFERENCE_GPU_RATE:.0f} img/s on its GPU; "
          f"the project's pipeline feeds {ours['images_per_second'] / REFERENCE_GPU_RATE:.0f}x that.")
    save("input", payload)


if __name__ == "__main__":
    main()
