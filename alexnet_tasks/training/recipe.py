"""What a run trains with: the resolved hyperparameters, the learning-rate schedule, the loss and the precision.

Everything here is a pure function of the pipeline config (and the device's
compute capability), so a run's hyperparameters can be saved, compared and
fingerprinted before any training starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import keras

from alexnet_tasks.config import PipelineConfig
from alexnet_tasks.recipes import RECIPE_DEFAULTS

FLOAT32 = "float32"
MIXED_BFLOAT16 = "mixed_bfloat16"
MIXED_FLOAT16 = "mixed_float16"


@dataclass(frozen=True)
class Hyperparameters:
    """The resolved training recipe; saved as ``config.json`` beside the results."""

    recipe: str  # "reference" or "fast"
    epochs: int  # passes over the train split (a time budget may plan fewer)
    batch_size: int  # global batch, split evenly over the replicas
    learning_rate: float  # peak learning rate (after warm-up), used as given whatever the replica count
    image_size: int  # side the model resizes its 32x32 input to
    seed: int  # weight init, dropout, augmentation and shuffle order
    momentum: float = 0.0  # SGD momentum (0 = plain SGD)
    nesterov: bool = False  # Nesterov momentum
    weight_decay: float | None = None  # decoupled weight decay per step, scaled by the lr
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    weight_decay_norm_and_bias: bool = True  # False: no weight decay on BatchNorm's scale and offset or on biases
    warmup_epochs: float = 0.0  # linear warm-up from 10% of the peak rate (at most 20% of the epochs)
    decay: str = "constant"  # after warm-up: constant, or to 0 at the plan's end along a half cosine or a line
    augment: bool = False  # random flip + translation, on the device
    max_shift: int = 4  # largest translation of the augmentation, in pixels of the 32x32 image
    dropout: float = 0.5  # rate of both dropout layers
    batchnorm_momentum: float = 0.99  # BatchNorm's moving-statistics momentum (Keras' default 0.99)
    kernel_initializer: str = "glorot_uniform"  # of every convolution and dense kernel (he_normal: He et al.)
    ema_momentum: float | None = None  # exponential moving average of the weights per step; BatchNorm
    # statistics are recomputed for the averaged weights after training (None: no averaging)
    test_time_augmentation: str = "none"  # evaluate's views (PipelineConfig.resolved_test_time_augmentation)
    precision: str = FLOAT32  # Keras dtype policy: float32, mixed_bfloat16 (GPU, CPU where it pays) or mixed_float16
    jit_compile: bool = False  # XLA-compile the train step (where it pays: see xla_pays)
    max_train_minutes: float | None = None  # time budget: the first epoch's time sizes the planned epochs


def precision_policy(compute_capability: tuple[int, int] | None, cpu_bfloat16: bool = False) -> str:
    """The Keras dtype policy for a GPU of this compute capability (None: the CPU).

    bfloat16 needs Ampere (8.0) or newer; Volta and Turing (7.x) have float16
    tensor cores, used with loss scaling (Keras wraps the optimizer in a
    LossScaleOptimizer under ``mixed_float16``); older GPUs stay in float32.
    On the CPU, bfloat16 where it pays (``cpu_bfloat16``, see
    ``cpu_bfloat16_pays``), else float32.
    """
    if compute_capability is None:
        return MIXED_BFLOAT16 if cpu_bfloat16 else FLOAT32
    if tuple(compute_capability) >= (8, 0):
        return MIXED_BFLOAT16
    if tuple(compute_capability) >= (7, 0):
        return MIXED_FLOAT16
    return FLOAT32


def _cpuinfo_field(name: str, cpuinfo: str) -> str:
    """The first value of field ``name`` in ``cpuinfo`` (Linux's /proc/cpuinfo format); empty where there is none."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        if line.startswith(name):
            return line.partition(":")[2].strip()
    return ""


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags as Linux lists them (empty where there is no such file)."""
    return set(_cpuinfo_field("flags", cpuinfo).split())


def cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's ``vendor_id`` as Linux lists it (``AuthenticAMD``, ``GenuineIntel``; empty where unknown)."""
    return _cpuinfo_field("vendor_id", cpuinfo)


def cpu_bfloat16_pays(onednn: bool, flags: set[str] | None = None, vendor: str | None = None) -> bool:
    """Whether the CPU trains faster in bfloat16 under oneDNN: with AMX, or with AMD's AVX512-BF16.

    With AMX's bfloat16 tiles (Intel Sapphire Rapids and later)
    docs/performance.md measures the step 1.7x faster than in float32; with
    AVX512-BF16 on an AMD EPYC Zen 4 an epoch 1.4x faster. Intel's
    AVX512-BF16 kernels without AMX (Cooper Lake) run the step at 0.45x, so
    float32 stays there, and on every CPU without native bfloat16.
    """
    flags = cpu_flags() if flags is None else flags
    vendor = cpu_vendor() if vendor is None else vendor
    return onednn and ("amx_bf16" in flags or ("avx512_bf16" in flags and vendor == "AuthenticAMD"))


def onednn_enabled() -> bool:
    """Whether this process's TensorFlow runs its CPU kernels on oneDNN.

    TensorFlow turns oneDNN on by default only on CPUs with AVX512-VNNI,
    AVX512-BF16, AVX-VNNI or AMX; ``TF_ENABLE_ONEDNN_OPTS`` (read when
    TensorFlow is imported) forces it either way. False when TensorFlow
    cannot tell.
    """
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:
        return False
    return bool(_pywrap_util_port.IsMklEnabled())


def xla_pays(
    wanted: bool, replicas: int, compute_capability: tuple[int, int] | None, onednn: bool = True
) -> bool:
    """Whether to XLA-compile the train step: only if the recipe ``wanted`` it, on a single device.

    On a GPU, yes. On the CPU only without oneDNN: with oneDNN TensorFlow's
    own kernels run the ``fast`` step faster than XLA's CPU code, without it
    XLA is several times faster (docs/performance.md measures both).
    Across several replicas XLA fails. ``compute_capability`` is None on
    the CPU.
    """
    if not wanted or replicas != 1:
        return False
    return compute_capability is not None or not onednn


def resolve_hyperparameters(
    config: PipelineConfig,
    replicas: int = 1,
    compute_capability: tuple[int, int] | None = None,
    onednn: bool = True,
    cpu_bfloat16: bool = False,
) -> Hyperparameters:
    """The recipe's defaults, overridden by whatever the config sets explicitly.

    ``compute_capability``: the (lowest) GPU's, or None on the CPU; the fast
    recipe trains in the mixed precision that GPU supports (on the CPU in
    bfloat16 where ``cpu_bfloat16`` says it pays), XLA-compiled on a single
    GPU, and on the CPU only where TensorFlow runs without oneDNN
    (``onednn``; see ``xla_pays``). ``recipe_options`` (a ``precision``
    among them) override all of these.
    """
    values = dict(RECIPE_DEFAULTS[config.recipe])
    for name in ("epochs", "batch_size", "learning_rate"):
        if getattr(config, name) is not None:
            values[name] = getattr(config, name)
    if config.recipe == "fast":
        values["precision"] = precision_policy(compute_capability, cpu_bfloat16)
    values.update(config.recipe_options or {})
    values["test_time_augmentation"] = config.resolved_test_time_augmentation()
    values["jit_compile"] = xla_pays(values.get("jit_compile", False), replicas, compute_capability, onednn)
    return Hyperparameters(
        recipe=config.recipe, image_size=config.image_size, seed=config.seed,
        max_train_minutes=config.max_train_minutes, **values,
    )


def per_replica_batch(hyperparameters: Hyperparameters, replicas: int) -> int:
    """The global batch split over the replicas; a ValueError when it does not split evenly."""
    if hyperparameters.batch_size % replicas:
        raise ValueError(
            f"batch_size={hyperparameters.batch_size} does not split evenly over {replicas} replicas: "
            f"use a multiple of {replicas}"
        )
    return hyperparameters.batch_size // replicas


# --------------------------------------------------------------------------- schedule
def warmup_steps(hyperparameters: Hyperparameters, steps_per_epoch: int) -> int:
    """Warm-up length: ``warmup_epochs``, but never more than a fifth of the recipe's epochs."""
    return int(min(hyperparameters.warmup_epochs, 0.2 * hyperparameters.epochs) * steps_per_epoch)


def learning_rate_at(hyperparameters: Hyperparameters, step: int, steps_per_epoch: int, epochs_planned: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) in a run planned for ``epochs_planned``.

    Linear warm-up from 10% of the peak, then (``decay``) a half cosine or a
    line that reaches 0 at the end of the last planned epoch, or the peak
    rate throughout (``constant``). The warm-up does not depend on the plan, so a plan
    made after the first epoch (a time budget) leaves the steps already run
    unchanged.
    """
    peak = hyperparameters.learning_rate
    warmup = warmup_steps(hyperparameters, steps_per_epoch)
    if step < warmup:
        return peak * (0.1 + 0.9 * step / warmup)
    if hyperparameters.decay == "constant":
        return peak
    decay_steps = max(epochs_planned * steps_per_epoch - warmup, 1)
    progress = min((step - warmup) / decay_steps, 1.0)
    if hyperparameters.decay == "linear":
        return peak * (1.0 - progress)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------- loss and optimizer
@keras.saving.register_keras_serializable(package="alexnet_cifar10")
class SparseCrossentropyWithSmoothing(keras.losses.Loss):
    """Sparse categorical cross-entropy with label smoothing (Keras' sparse loss has none)."""

    def __init__(self, label_smoothing: float = 0.0, name: str = "smoothed_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = label_smoothing

    def call(self, y_true, y_pred):
        classes = keras.ops.shape(y_pred)[-1]
        one_hot = keras.ops.one_hot(keras.ops.cast(keras.ops.reshape(y_true, [-1]), "int32"), classes)
        return keras.losses.categorical_crossentropy(one_hot, y_pred, label_smoothing=self.label_smoothing)

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


# Variables weight decay leaves alone when ``weight_decay_norm_and_bias`` is off (matched in their names).
NORM_AND_BIAS = ("bias", "gamma", "beta")


def compile_model(model, hyperparameters: Hyperparameters, steps_per_epoch: int | None = None) -> None:
    """SGD at the schedule's first rate; the schedule callback sets the rate of every step.

    Under the ``mixed_float16`` policy Keras wraps the optimizer in a
    LossScaleOptimizer. With ``ema_momentum`` the optimizer keeps a moving
    average of the weights, which ``fit`` copies into the model when it ends.
    ``steps_per_epoch`` is accepted for callers that passed it before the
    schedule moved into a callback.
    """
    optimizer = keras.optimizers.SGD(
        learning_rate=learning_rate_at(hyperparameters, 0, max(steps_per_epoch or 1, 1), hyperparameters.epochs),
        momentum=hyperparameters.momentum,
        nesterov=hyperparameters.nesterov,
        weight_decay=hyperparameters.weight_decay,
        use_ema=hyperparameters.ema_momentum is not None,
        ema_momentum=hyperparameters.ema_momentum or 0.99,
    )
    if hyperparameters.weight_decay and not hyperparameters.weight_decay_norm_and_bias:
        optimizer.exclude_from_weight_decay(var_names=list(NORM_AND_BIAS))
    model.compile(
        optimizer=optimizer,
        loss=SparseCrossentropyWithSmoothing(hyperparameters.label_smoothing)
        if hyperparameters.label_smoothing
        else "sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=hyperparameters.jit_compile,
    )
