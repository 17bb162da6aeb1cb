"""AlexNet for CIFAR-10, as in the reference notebook, with the resize on the device.

The model takes standardized 32x32x3 images and resizes them (bilinear, as
``tf.image.resize``) to ``image_size`` inside the graph, so the host pipeline
moves 12 KB per image instead of 618 KB at 227x227. At 227 it has 56,361,738
parameters (56,358,986 trainable, 2,752 in BatchNorm statistics); every
``image_size`` from 67 up works (67 is the smallest for which the three
max-pools leave a 1x1 map).

Random layers (the augmentation and both dropouts) each draw from a stream of
their own: its seed is derived from the training seed and the layer's name,
and ``reseed_random_layers`` restarts every stream from (that seed, epoch) so
an epoch's draws do not depend on what ran before it (a resumed run repeats
them exactly).
"""

from __future__ import annotations

import zlib

import keras
import numpy as np
from keras import layers

from alexnet_tasks.config import IMAGE_SHAPE, MIN_IMAGE_SIZE, NUM_CLASSES


def stream_seed(*parts: int | str) -> int:
    """A 31-bit seed derived from ``parts`` (integers and names); different parts, independent streams."""
    entropy = [zlib.crc32(part.encode()) if isinstance(part, str) else int(part) for part in parts]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0] & 0x7FFFFFFF)


def random_streams(model: keras.Model) -> list[tuple[keras.layers.Layer, keras.random.SeedGenerator]]:
    """Every (layer, seed generator) pair of the model's own layers."""
    return [
        (layer, value)
        for layer in model.layers
        for value in vars(layer).values()
        if isinstance(value, keras.random.SeedGenerator)
    ]


def reseed_random_layers(model: keras.Model, epoch: int) -> None:
    """Restart each random layer's stream at (its seed, ``epoch``)."""
    for layer, generator in random_streams(model):
        if layer.seed is None:
            raise ValueError(f"layer {layer.name!r} has no seed; build the model with a seed to reseed it")
        state = np.array([stream_seed(layer.seed, epoch), 0], dtype=generator.state.dtype)
        generator.state.assign(state)


@keras.saving.register_keras_serializable(package="alexnet_cifar10")
class RandomShiftFlip(layers.Layer):
    """Random horizontal flip and a shift of up to ``max_shift`` pixels, zero-filled.

    Active in training only. Each image's shift and flip are applied as two
    one-hot matrix products, so the layer is plain tensor algebra: it runs on
    the accelerator, compiles with XLA and works on every Keras backend.
    Zero is the mean of a standardized image, so the fill adds no bias.
    """

    def __init__(self, max_shift: int = 4, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.max_shift = max_shift
        self.seed = seed
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=None):
        if not training:
            return images
        ops = keras.ops
        batch = ops.shape(images)[0]
        height, width = images.shape[1], images.shape[2]
        shifts = keras.random.randint((batch, 2), -self.max_shift, self.max_shift + 1, seed=self.generator)
        flips = keras.random.uniform((batch, 1), seed=self.generator) < 0.5
        rows = ops.arange(height)
        cols = ops.arange(width)
        # Output row r reads input row r - dy; output column c reads c - dx (mirrored if flipped).
        source_rows = rows[None, :] - shifts[:, :1]
        source_cols = cols[None, :] - shifts[:, 1:]
        source_cols = ops.where(flips, width - 1 - source_cols, source_cols)
        row_map = ops.cast(source_rows[:, :, None] == rows[None, None, :], images.dtype)
        col_map = ops.cast(source_cols[:, :, None] == cols[None, None, :], images.dtype)
        shifted = ops.einsum("brh,bhwc->brwc", row_map, images)
        return ops.einsum("bsw,brwc->brsc", col_map, shifted)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "max_shift": self.max_shift, "seed": self.seed}


def build_alexnet(
    image_size: int = 227,
    num_classes: int = NUM_CLASSES,
    augment: bool = False,
    seed: int | None = None,
    max_shift: int = 4,
    dropout: float = 0.5,
    batchnorm_momentum: float = 0.99,
    kernel_initializer: str = "glorot_uniform",
) -> keras.Model:
    """The reference AlexNet: 5 convolutions with BatchNorm, 3 max-pools, 2 x dense 4096.

    ``seed`` (the training seed) gives each random layer its own seed,
    derived from ``seed`` and the layer's name; None leaves them unseeded.
    The other arguments change no layer, only its settings: the
    augmentation's largest shift (pixels), both dropout rates, BatchNorm's
    momentum and the kernels' initializer (Keras' glorot_uniform, or
    he_normal for the ReLU layers).
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be an integer >= {MIN_IMAGE_SIZE}, got {image_size!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")

    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")

    def seed_of(name: str) -> int | None:
        return None if seed is None else stream_seed(seed, name)

    def conv(filters: int, size: int, name: str, **options) -> layers.Conv2D:
        return layers.Conv2D(filters, size, activation="relu", kernel_initializer=kernel_initializer, name=name,
                             **options)

    def norm(name: str) -> layers.BatchNormalization:
        return layers.BatchNormalization(momentum=batchnorm_momentum, name=name)

    stack = [keras.Input(shape=IMAGE_SHAPE, name="image")]
    if augment:
        stack.append(RandomShiftFlip(max_shift, seed=seed_of("augmentation"), name="augmentation"))
    stack += [
        layers.Resizing(image_size, image_size, interpolation="bilinear", name="resize"),
        conv(96, 11, "conv1", strides=4),
        norm("bn1"),
        layers.MaxPooling2D(3, strides=2, name="pool1"),
        conv(256, 5, "conv2", padding="same"),
        norm("bn2"),
        layers.MaxPooling2D(3, strides=2, name="pool2"),
        conv(384, 3, "conv3", padding="same"),
        norm("bn3"),
        conv(384, 1, "conv4"),
        norm("bn4"),
        conv(256, 1, "conv5"),
        norm("bn5"),
        layers.MaxPooling2D(3, strides=2, name="pool5"),
        layers.Flatten(name="flatten"),
        layers.Dense(4096, activation="relu", kernel_initializer=kernel_initializer, name="fc6"),
        layers.Dropout(dropout, seed=seed_of("drop6"), name="drop6"),
        layers.Dense(4096, activation="relu", kernel_initializer=kernel_initializer, name="fc7"),
        layers.Dropout(dropout, seed=seed_of("drop7"), name="drop7"),
        # float32 output keeps the softmax and the loss exact under mixed precision.
        layers.Dense(num_classes, activation="softmax", dtype="float32", name="predictions"),
    ]
    return keras.Sequential(stack, name=f"alexnet_{image_size}")
