"""Peak RSS of a real one-epoch Keras fit of the pipeline's model on the CPU, against ``estimate_memory``.

Each case runs in a fresh process: TensorFlow and Keras are imported and run
one op (the runtime), then ``images`` random 32x32x3 float32 images are made
(as ``train`` loads the shards), the model is built and compiled as ``train``
does (``resolve_hyperparameters``, ``build_alexnet``, ``compile_model``) and fitted
for one epoch at ``batch``. The process reports its resident memory after
the runtime started and its peak (``VmHWM``: the high-water mark of this process image, which, unlike
``ru_maxrss``, does not carry over the resident memory of the parent that forked it)::

    PYTHONPATH=. .venv/bin/python scripts/measure_train_memory.py 67:32 67:128 99:32

prints one line per ``image_size:batch`` with the measured runtime and peak
and the estimate's parts (``alexnet_tasks/training/memory.py``).
"""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = r"""
import json, sys
import numpy as np
import keras, tensorflow as tf

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

image_size, batch, images = (int(value) for value in sys.argv[1:4])
tf.constant(1.0) + 1.0
runtime = rss()
from alexnet_tasks.config import PipelineConfig
from alexnet_tasks.training.model import build_alexnet
from alexnet_tasks.training.recipe import compile_model, resolve_hyperparameters

hyperparameters = resolve_hyperparameters(PipelineConfig(image_size=image_size, batch_size=batch,
                                           recipe_options={"precision": "float32"}))
rng = np.random.default_rng(0)
x = rng.standard_normal((images, 32, 32, 3), dtype=np.float32)
y = rng.integers(0, 10, images).astype(np.uint8)
keras.mixed_precision.set_global_policy(hyperparameters.precision)
model = build_alexnet(image_size, augment=hyperparameters.augment, seed=1, dropout=hyperparameters.dropout)
compile_model(model, hyperparameters)
model.fit(x, y, batch_size=batch, epochs=1, verbose=0)
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("RESULT", json.dumps({"runtime": runtime, "peak": peak, "precision": hyperparameters.precision,
                            "momentum": hyperparameters.momentum, "ema": hyperparameters.ema_momentum is not None}))
"""


def measure(image_size: int, batch: int, images: int) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(image_size), str(batch), str(images)],
                          capture_output=True, text=True, check=True)
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main(cases: list[str]) -> None:
    from alexnet_tasks.training.memory import estimate_memory

    for case in cases:
        image_size, batch = (int(value) for value in case.split(":"))
        images = 8 * batch
        measured = measure(image_size, batch, images)
        estimate = estimate_memory(image_size, batch, momentum=measured["momentum"] > 0, ema=measured["ema"],
                                   precision=measured["precision"], data_images=images)
        print(json.dumps({
            "image_size": image_size, "batch": batch, "images": images, "precision": measured["precision"],
            "measured_runtime_mb": round(measured["runtime"] / 1e6, 1),
            "measured_peak_mb": round(measured["peak"] / 1e6, 1),
            "measured_above_runtime_mb": round((measured["peak"] - measured["runtime"]) / 1e6, 1),
            "estimate_host_mb": round(estimate.host / 1e6, 1),
            "estimate_above_runtime_mb": round((estimate.host - estimate.runtime) / 1e6, 1),
            "estimate_activations_mb": round(estimate.activations / 1e6, 1),
        }), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["67:32", "67:128"])
