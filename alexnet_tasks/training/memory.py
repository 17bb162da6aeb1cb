"""The memory a training run needs, estimated from its settings before anything is built.

AlexNet's size grows with the square of ``image_size`` (the first dense
layer reads the last pooled map): 21.0 million parameters at 67, 56.4 million
at 227, 962 million at 1024. ``estimate_memory`` adds up, in bytes:

* ``weights``: every parameter in float32 (mixed precision keeps float32
  master weights, plus a 16-bit copy of each for the forward pass);
* ``gradients``: one float32 value per trainable parameter;
* ``optimizer``: SGD's momentum (one float32 slot per trainable parameter
  when momentum is on), and the EMA copy of the weights when there is one;
* ``temporaries``: ``TEMPORARY_COPIES`` float32 copies of the parameters
  that initialisation and the update step allocate besides;
* ``activations``: the output of every layer for each image of the
  per-device batch, in the compute dtype, times ``ACTIVATION_FACTOR`` (the
  backward pass keeps the forward outputs and adds their gradients and
  TensorFlow's workspaces);
* on the host only: ``data`` (the float32 training and validation images,
  32x32x3, that ``train`` loads) and ``runtime`` (TensorFlow, Keras and the
  compiled train step, ``RUNTIME_BYTES``).

Where the factors come from: the peak RSS (``VmHWM``) of real one-epoch
Keras fits of this model, compiled as ``train`` compiles it (fast recipe,
float32, SGD with momentum), on the CPU, measured with
``scripts/measure_train_memory.py`` on an AMD EPYC (2 cores, TensorFlow
2.21): image_size:batch 67:32 peaked at 1,099.7 MB, 67:256 at 1,403.7 MB,
131:16 at 1,286.7 MB, 227:16 at 1,948.6 MB, each with 557 MB resident once
TensorFlow had run its first op. Fitted to those, the memory above that
runtime is 4.30 float32 copies of the parameters, 2.54 times the sum of
the layer outputs per image of the batch (float32), and 161 MB that depend
on neither; the estimate rounds each up (4.5 copies, factor 2.6, 1,050 MB
with the runtime). Those four peaks were read as ``ru_maxrss``; the 67:32
fit measured again as ``VmHWM`` (the script's reading now) peaked at
1,160.1 MB, and 1,223.5 MB in a later run of the whole suite; on an Intel
Xeon with AMX (2 cores) at 1,248.0 MB alone and 1,367.6 MB while the rest of
the suite ran beside it; the estimate (1,448.2 MB) covers all four.
Mixed precision (16-bit activations, a 16-bit copy of the weights) and GPU
memory follow the same parts, unmeasured.

``check_memory`` compares the estimate with what the device has (host RAM:
the smaller of ``/proc/meminfo``'s MemTotal and the cgroup limit; a GPU: the
memory TensorFlow may allocate on it) and raises ``InsufficientMemoryError``,
a ``PermanentError``, when the run cannot fit, naming the estimate, the
device's memory, and the largest per-device batch and ``image_size`` that fit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from alexnet_tasks.config import IMAGE_SHAPE, MIN_IMAGE_SIZE, NUM_CLASSES
from alexnet_tasks.errors import PermanentError

log = logging.getLogger(__name__)

FLOAT32_BYTES = 4
IMAGE_BYTES = IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * IMAGE_SHAPE[2] * FLOAT32_BYTES  # 12,288 per 32x32x3 float32 image
# Resident memory of a training process besides the model and the data: 557 MB once TensorFlow and
# Keras run, plus 161 MB of compiled step and Keras state (measured, see the module docstring), plus
# room for the highest peak of the 67:32 fit measured since (1,367.6 MB, beside the rest of the suite).
RUNTIME_BYTES = 1050 * 10**6
# Peak activation memory per image over the sum of every layer's output (measured 2.54).
ACTIVATION_FACTOR = 2.6
# Float32 copies of the parameters besides the weights, gradients and momentum (measured 1.30 in all 4.30).
TEMPORARY_COPIES = 1.5
MAX_IMAGE_SIZE = 1024  # the form's bound (config.py)


class InsufficientMemoryError(PermanentError, ValueError):
    """The run's estimated memory exceeds what its device has; the message names both and what fits."""


@dataclass(frozen=True)
class Layer:
    """One layer of the model: its output values per image, its parameters (trainable and not)."""

    name: str
    outputs: int
    trainable: int
    non_trainable: int = 0


def _conv(size: int, kernel: int, stride: int = 1, same: bool = False) -> int:
    return -(-size // stride) if same else (size - kernel) // stride + 1


def alexnet_layers(image_size: int, num_classes: int = NUM_CLASSES) -> list[Layer]:
    """The layers ``model.build_alexnet`` builds, computed without building them (no TensorFlow).

    Raises ValueError for an ``image_size`` below ``MIN_IMAGE_SIZE``.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be an integer >= {MIN_IMAGE_SIZE}, got {image_size!r}")
    layers = [Layer("resize", image_size * image_size * 3, 0)]
    side, channels = image_size, 3

    def conv(name: str, filters: int, kernel: int, stride: int = 1, same: bool = False) -> None:
        nonlocal side, channels
        side = _conv(side, kernel, stride, same)
        layers.append(Layer(name, side * side * filters, kernel * kernel * channels * filters + filters))
        channels = filters
        layers.append(Layer(f"bn{name[-1]}", side * side * filters, 2 * filters, 2 * filters))

    def pool(name: str) -> None:
        nonlocal side
        side = _conv(side, 3, 2)
        layers.append(Layer(name, side * side * channels, 0))

    conv("conv1", 96, 11, stride=4)
    pool("pool1")
    conv("conv2", 256, 5, same=True)
    pool("pool2")
    conv("conv3", 384, 3, same=True)
    conv("conv4", 384, 1)
    conv("conv5", 256, 1)
    pool("pool5")
    width = side * side * channels
    for name, units in (("fc6", 4096), ("fc7", 4096)):
        layers.append(Layer(name, units, width * units + units))
        layers.append(Layer(f"drop{name[-1]}", units, 0))
        width = units
    layers.append(Layer("predictions", num_classes, width * num_classes + num_classes))
    return layers


def parameter_count(image_size: int, num_classes: int = NUM_CLASSES) -> int:
    """Every parameter of the model at ``image_size`` (56,361,738 at 227), trainable or not."""
    return sum(layer.trainable + layer.non_trainable for layer in alexnet_layers(image_size, num_classes))


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a run needs, by part; ``device`` is what one device holds, ``host`` what the host holds."""

    weights: int
    gradients: int
    optimizer: int
    temporaries: int
    activations: int
    data: int
    runtime: int

    @property
    def device(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.temporaries + self.activations

    @property
    def host(self) -> int:
        return self.device + self.data + self.runtime

    def describe(self, on_host: bool) -> str:
        parts = [("weights", self.weights), ("gradients", self.gradients), ("optimizer state", self.optimizer),
                 ("temporaries", self.temporaries), ("activations", self.activations)]
        if on_host:
            parts += [("images", self.data), ("TensorFlow", self.runtime)]
        return ", ".join(f"{name} {gigabytes(value)}" for name, value in parts)


def gigabytes(value: float) -> str:
    return f"{value / 1e9:.2f} GB"


def estimate_memory(image_size: int, per_device_batch: int, *, momentum: bool = True, ema: bool = False,
                    precision: str = "float32", data_images: int = 0, replicas: int = 1) -> MemoryEstimate:
    """Estimate the bytes of a run (see the module docstring for each part).

    ``per_device_batch``: images per replica and step; ``data_images``: the
    training and validation images loaded on the host; ``replicas``: how many
    model copies the host holds (CPU replicas; 1 for GPUs, whose copies are
    on the GPUs). Returns a ``MemoryEstimate`` whose ``device`` is one
    replica's and whose ``host`` counts every CPU replica, the data and the
    runtime. Raises ValueError for a bad ``image_size`` or batch.
    """
    if isinstance(per_device_batch, bool) or not isinstance(per_device_batch, int) or per_device_batch < 1:
        raise ValueError(f"per_device_batch must be a positive integer, got {per_device_batch!r}")
    layers = alexnet_layers(image_size)
    trainable = sum(layer.trainable for layer in layers)
    parameters = trainable + sum(layer.non_trainable for layer in layers)
    mixed = precision.startswith("mixed")
    compute_bytes = 2 if mixed else FLOAT32_BYTES
    weights = parameters * FLOAT32_BYTES + (parameters * compute_bytes if mixed else 0)
    gradients = trainable * FLOAT32_BYTES
    optimizer = (trainable * FLOAT32_BYTES if momentum else 0) + (parameters * FLOAT32_BYTES if ema else 0)
    temporaries = int(parameters * FLOAT32_BYTES * TEMPORARY_COPIES)
    outputs = sum(layer.outputs for layer in layers)
    activations = int(outputs * per_device_batch * compute_bytes * ACTIVATION_FACTOR)
    return MemoryEstimate(weights * replicas, gradients * replicas, optimizer * replicas, temporaries * replicas,
                          activations * replicas, data_images * IMAGE_BYTES, RUNTIME_BYTES)


# --------------------------------------------------------------------------- what the device has
def _cgroup_limits(own: Path, root: Path) -> list[tuple[int, Path]]:
    """Memory limits of this process's cgroup and its ancestors: v2 ``memory.max``, v1 the hierarchical limit."""
    limits = []
    for line in own.read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        relative = path.strip("/")
        if controllers == "":  # cgroup v2
            for mount in (root, root / "unified"):
                if not (mount / "cgroup.controllers").is_file():
                    continue
                folder = mount / relative
                while True:
                    text = _read(folder / "memory.max")
                    if text and text.isdigit():
                        limits.append((int(text), folder / "memory.max"))
                    if folder == mount or mount not in folder.parents:
                        break
                    folder = folder.parent
        elif "memory" in controllers.split(","):  # cgroup v1; inside a cgroup namespace the mount is the group
            for folder in (root / "memory" / relative, root / "memory"):
                stat = _read(folder / "memory.stat")
                if stat is None:
                    continue
                for entry in stat.splitlines():
                    if entry.startswith("hierarchical_memory_limit "):
                        limits.append((int(entry.split()[1]), folder / "memory.stat"))
                text = _read(folder / "memory.limit_in_bytes")
                if text and text.isdigit():
                    limits.append((int(text), folder / "memory.limit_in_bytes"))
                break
    return limits


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def host_memory(meminfo: Path = Path("/proc/meminfo"), own_cgroup: Path = Path("/proc/self/cgroup"),
                cgroup_root: Path = Path("/sys/fs/cgroup")) -> tuple[int, str]:
    """Host RAM this process may use, in bytes, and where the figure comes from.

    The smaller of MemTotal (``/proc/meminfo``) and the memory limit of the
    process's cgroup or any cgroup above it (v2 ``memory.max``, v1
    ``hierarchical_memory_limit`` / ``memory.limit_in_bytes``). Raises
    ValueError when ``meminfo`` has no MemTotal line.
    """
    total, source = None, str(meminfo)
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            total = int(line.split()[1]) * 1024
            source = f"MemTotal in {meminfo}"
    if total is None:
        raise ValueError(f"{meminfo}: no MemTotal line")
    if own_cgroup.is_file():
        for limit, path in _cgroup_limits(own_cgroup, cgroup_root):
            if limit < total:
                total, source = limit, f"the cgroup limit in {path}"
    return total, source


def gpu_memory() -> tuple[int, str] | None:
    """Memory TensorFlow may allocate on the smallest visible GPU, in bytes, and its name; None without one."""
    from tensorflow.python.client import device_lib  # TensorFlow's device details, memory_limit included

    gpus = [device for device in device_lib.list_local_devices() if device.device_type == "GPU"]
    if not gpus:
        return None
    smallest = min(gpus, key=lambda device: device.memory_limit)
    description = smallest.physical_device_desc.split(",")[1].split(":")[-1].strip() \
        if "name:" in smallest.physical_device_desc else smallest.name
    return int(smallest.memory_limit), f"{description} ({smallest.name})"


# --------------------------------------------------------------------------- the check
def _largest(fits, low: int, high: int) -> int | None:
    """The largest value in [low, high] for which ``fits`` holds (it holds for all smaller ones); None if none."""
    if not fits(low):
        return None
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


def check_memory(image_size: int, per_device_batch: int, available: int, device: str, *, on_host: bool,
                 replicas: int = 1, **options) -> MemoryEstimate:
    """Refuse a run whose estimate exceeds ``available`` bytes on ``device``; return the estimate when it fits.

    ``on_host``: the replicas train on the CPU, so the host holds every
    replica, the images and the runtime; otherwise ``available`` is one GPU's
    memory and one replica's part is compared. ``options`` go to
    ``estimate_memory``. Raises ``InsufficientMemoryError`` naming the
    estimate and its parts, ``available``, the largest per-device batch that
    fits at ``image_size`` and the largest ``image_size`` that fits with
    ``per_device_batch``.
    """
    host_replicas = replicas if on_host else 1

    def needed(size: int, batch: int) -> int:
        estimate = estimate_memory(size, batch, replicas=host_replicas, **options)
        return estimate.host if on_host else estimate.device

    estimate = estimate_memory(image_size, per_device_batch, replicas=host_replicas, **options)
    total = estimate.host if on_host else estimate.device
    if total <= available:
        return estimate
    largest_batch = _largest(lambda batch: needed(image_size, batch) <= available, 1, per_device_batch)
    largest_size = _largest(lambda size: needed(size, per_device_batch) <= available, MIN_IMAGE_SIZE, image_size)
    batch_text = (f"the largest batch per device that fits at image_size {image_size} is {largest_batch}"
                  if largest_batch else f"no batch fits at image_size {image_size}")
    size_text = (f"the largest image_size that fits with {per_device_batch} images per device is {largest_size}"
                 if largest_size else f"no image_size fits with {per_device_batch} images per device")
    raise InsufficientMemoryError(
        f"image_size={image_size} with {per_device_batch} images per device needs about {gigabytes(total)} "
        f"({estimate.describe(on_host)}), but {device} has {gigabytes(available)}: {batch_text}; {size_text}"
    )


def check_training_memory(image_size: int, per_device_batch: int, *, gpu: bool, replicas: int = 1,
                          data_images: int = 0, momentum: bool = True, ema: bool = False,
                          precision: str = "float32") -> MemoryEstimate | None:
    """``check_memory`` against the device the run landed on: one GPU's memory, else the host's RAM.

    Returns the estimate (None when TensorFlow reports no GPU memory); raises
    ``InsufficientMemoryError`` when the run cannot fit. Logs the estimate.
    """
    options = {"momentum": momentum, "ema": ema, "precision": precision}
    if gpu:
        found = gpu_memory()
        if found is None:
            log.warning("memory check skipped: TensorFlow reports no GPU memory")
            return None
        available, device = found
        estimate = check_memory(image_size, per_device_batch, available, device, on_host=False, **options)
        needed = estimate.device
    else:
        available, source = host_memory()
        device = f"the host ({source})"
        estimate = check_memory(image_size, per_device_batch, available, device, on_host=True, replicas=replicas,
                                data_images=data_images, **options)
        needed = estimate.host
    log.info("memory: image_size %d with %d images per device needs about %s of the %s that %s has",
             image_size, per_device_batch, gigabytes(needed), gigabytes(available), device)
    return estimate
