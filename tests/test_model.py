import numpy as np
import pytest

from alexnet_tasks.training.model import RandomShiftFlip, build_alexnet


def _count(weights) -> int:
    return int(sum(np.prod(weight.shape) for weight in weights))


def test_reference_parameter_count_at_227():
    model = build_alexnet(227)
    assert model.count_params() == 56_361_738
    assert _count(model.trainable_weights) == 56_358_986
    assert _count(model.non_trainable_weights) == 2_752
    assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, 10)


@pytest.mark.parametrize("size", [67, 68, 100, 160])
def test_every_size_from_67_up_builds_and_predicts(size):
    model = build_alexnet(size)
    probabilities = np.asarray(model(np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")))
    assert probabilities.shape == (2, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("size", [66, 0, 2.5, True])
def test_too_small_or_non_integer_sizes_are_refused(size):
    with pytest.raises(ValueError, match="image_size must be an integer >= 67"):
        build_alexnet(size)


def test_resize_inside_the_model_is_tf_image_resize_bilinear():
    import tensorflow as tf

    images = np.random.default_rng(1).normal(size=(3, 32, 32, 3)).astype("float32")
    resize = build_alexnet(227).get_layer("resize")
    np.testing.assert_allclose(resize(images), tf.image.resize(images, (227, 227), method="bilinear"), atol=1e-5)


def _shifted(image: np.ndarray, dy: int, dx: int, flip: bool) -> np.ndarray:
    source = image[:, ::-1] if flip else image
    out = np.zeros_like(source)
    height, width = image.shape[:2]
    out[max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = source[
        max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0)
    ]
    return out


def test_augmentation_makes_shifted_or_flipped_copies_in_training_only():
    layer = RandomShiftFlip(4, seed=0)
    images = np.random.default_rng(2).normal(size=(16, 32, 32, 3)).astype("float32")
    np.testing.assert_array_equal(np.asarray(layer(images, training=False)), images)
    out = np.asarray(layer(images, training=True))
    seen_flip = seen_shift = False
    for image, result in zip(images, out):
        matches = [
            (dy, dx, flip)
            for flip in (False, True)
            for dy in range(-4, 5)
            for dx in range(-4, 5)
            if np.array_equal(_shifted(image, dy, dx, flip), result)
        ]
        assert matches, "augmented image is not a shifted/flipped copy"
        seen_flip |= any(flip for _, _, flip in matches)
        seen_shift |= any(dy or dx for dy, dx, _ in matches)
    assert seen_flip and seen_shift


def test_augmented_model_round_trips_through_keras_saving(tmp_path):
    import keras

    model = build_alexnet(67, augment=True, seed=1)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    images = np.random.default_rng(3).normal(size=(2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(loaded(images)), np.asarray(model(images)), atol=1e-6)


def test_each_random_layer_draws_from_its_own_stream():
    model = build_alexnet(67, augment=True, seed=5)
    ones = np.ones((4, 4096), np.float32)
    masks = [np.asarray(model.get_layer(name)(ones, training=True)) != 0 for name in ("drop6", "drop7")]
    assert 0.3 < masks[0].mean() < 0.7 and 0.3 < masks[1].mean() < 0.7
    assert (masks[0] != masks[1]).mean() > 0.2, "drop6 and drop7 drew the same dropout mask"
    seeds = [model.get_layer(name).seed for name in ("augmentation", "drop6", "drop7")]
    assert len(set(seeds)) == 3 and seeds == [build_alexnet(67, augment=True, seed=5).get_layer(name).seed
                                              for name in ("augmentation", "drop6", "drop7")]
