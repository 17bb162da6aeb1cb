#!/usr/bin/env python3
"""Training throughput: the project's train step versus Keras fit over the reference pipeline.

Same AlexNet, same batch (32), same optimizer (SGD lr 0.001), at image_size 227
and 67. Reference: the model takes 227x227 (or 67x67) inputs prepared by the
host pipeline of bench_input.py (standardize + resize per image, shuffle,
batch), compiled as the tutorial (no XLA). Project: 32x32 standardized batches
from the shard, resized inside the model, train step compiled with XLA.
Also the ``fast`` recipe's step (batch 256, augmentation on the device).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys


from common import REPO, prepared_shards, save, table, timed

sys.path.insert(0, str(REPO))


def reference_model(image_size: int):
    """The tutorial's model: AlexNet on host-resized inputs (no Resizing layer)."""
    import keras

    from alexnet_tasks.model import build_alexnet

    full = build_alexnet(image_size)
    layers = [layer for layer in full.layers if layer.name != "resize"]
    return keras.Sequential([keras.Input((image_size, image_size, 3)), *layers], name="reference_alexnet")


def reference_dataset(images, labels, image_size: int):
    import tensorflow as tf

    def preprocess(image, label):
        image = tf.image.per_image_standardization(tf.cast(image, tf.float32))
        return tf.image.resize(image, (image_size, image_size)), label

    return (tf.data.Dataset.from_tensor_slices((images, labels)).map(preprocess)
            .shuffle(2000, seed=0).batch(32).repeat())


def measure(model, data, steps: int, batch: int) -> float:
    model.fit(data, epochs=1, steps_per_epoch=2, verbose=0)  # compile and warm up
    with timed() as clock:
        model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0)
    return steps * batch / clock["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps-227", type=int, default=8)
    parser.add_argument("--steps-67", type=int, default=30)
    args = parser.parse_args()
    import keras

    from alexnet_tasks.config import PipelineConfig
    from alexnet_tasks.download import load_cifar10
    from alexnet_tasks.model import build_alexnet
    from alexnet_tasks.shards import load_split
    from alexnet_tasks.train import ShuffledBatches, compile_model, resolve_settings

    config, layout, shards_dir, kind = prepared_shards()
    raw = load_cifar10(layout.batches(config.source_md5))
    images, labels = load_split(shards_dir / "train.h5", config.source_md5)
    rows, results = [], {}
    for size in (227, 67):
        steps = args.steps_227 if size == 227 else args.steps_67
        keras.utils.set_random_seed(0)
        ref = reference_model(size)
        ref.compile(optimizer=keras.optimizers.SGD(0.001), loss="sparse_categorical_crossentropy",
                    metrics=["accuracy"], jit_compile=False)
        reference = measure(ref, reference_dataset(raw.train_images[:45000], raw.train_labels[:45000], size), steps, 32)
        # The reference recipe's settings (batch 32, SGD 0.001) with the step XLA-compiled, as the row says.
        settings = dataclasses.replace(resolve_settings(PipelineConfig(recipe="reference", image_size=size)),
                                       jit_compile=True)
        ours_model = build_alexnet(size)
        compile_model(ours_model, settings, steps_per_epoch=len(labels) // 32)
        ours = measure(ours_model, ShuffledBatches(images, labels, 32, seed=0), steps, 32)
        fast = resolve_settings(PipelineConfig(recipe="fast", image_size=size))
        fast_model = build_alexnet(size, augment=True, seed=0)
        compile_model(fast_model, fast, steps_per_epoch=len(labels) // fast.batch_size)
        fast_rate = measure(fast_model, ShuffledBatches(images, labels, fast.batch_size, seed=0),
                            max(steps // 4, 3), fast.batch_size)
        results[size] = {"reference_images_per_second": reference, "project_images_per_second": ours,
                         "ratio": ours / reference, "fast_recipe_images_per_second": fast_rate,
                         "fast_batch": fast.batch_size, "steps": steps}
        rows += [[size, "reference: host pipeline + fit, batch 32", reference, "1.00"],
                 [size, "project: shard + resize in model + XLA, batch 32", ours, f"{ours / reference:.2f}"],
                 [size, f"project, fast recipe (batch {fast.batch_size}, augmentation)", fast_rate,
                  f"{fast_rate / reference:.2f}"]]
    print(table(f"Training throughput on this machine ({kind})", ["image_size", "train step", "images/s", "x reference"], rows))
    save("train", {"archive": kind, "sizes": results})


if __name__ == "__main__":
    main()
