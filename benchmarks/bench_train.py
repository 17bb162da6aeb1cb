#!/usr/bin/env python3
"""Training throughput on the CPU: the ``fast`` recipe's step under each setting, and the batch-32 comparison.

Every measurement runs ``fit`` on the model of ``alexnet_tasks/training/model.py``,
compiled by ``alexnet_tasks/training/recipe.py``, fed by the ``ShuffledBatches``
PyDataset of ``alexnet_tasks/training/feeding.py`` through Keras' adapter: the path a
training run takes. Each variant runs in a fresh interpreter, because
``TF_ENABLE_ONEDNN_OPTS`` and the thread-pool sizes (``TF_NUM_INTRAOP_THREADS``,
``TF_NUM_INTEROP_THREADS``) only act when set before TensorFlow is imported.
The variants run in rounds, interleaved, so a slow spell on the machine
touches every variant alike.

1. ``fast`` recipe at ``--image-size`` (67), batch 256: XLA on/off x oneDNN
   on/off, and thread hyperparameters. A warm-up of ``--warmup`` steps (including
   the compile) precedes ``--steps`` timed steps.
2. The input path alone: batches/s that Keras' adapter draws from the
   PyDataset (no model).
3. Batch 32, SGD lr 0.001 (the reference recipe's hyperparameters): the reference
   (host pipeline: standardize + resize per image in ``tf.data``, no XLA)
   against the project (32x32 batches, resize inside the model) without and
   with XLA, so the gain of each is separate.
4. The ceiling: the model's FLOPs per training image and a large float32
   matmul's GFLOP/s, a practical peak of this CPU; the same matmul in
   bfloat16 beside it (what the CPU's bfloat16 instructions give a matmul).

The data are random arrays of the train shard's shape and dtype (45,000
standardized 32x32x3 float32 images; uint8 for the reference's host
pipeline): throughput does not depend on pixel values.

    flock /tmp/alexnet-heavy.lock .venv/bin/python benchmarks/bench_train.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common import REPO, RESULTS, machine, save, table

sys.path.insert(0, str(REPO))
TRAIN_IMAGES = 45_000
MARK = "RESULT "

# name -> (XLA, environment). TensorFlow 2.21 turns oneDNN on by default only on CPUs with
# AVX512-VNNI, AVX512-BF16, AVX-VNNI or AMX; "1"/"0" force it either way.
FAST_VARIANTS = {
    "xla, oneDNN default, threads default": (True, {}),
    "xla, oneDNN off": (True, {"TF_ENABLE_ONEDNN_OPTS": "0"}),
    "no xla, oneDNN off": (False, {"TF_ENABLE_ONEDNN_OPTS": "0"}),
    "no xla, oneDNN on": (False, {"TF_ENABLE_ONEDNN_OPTS": "1"}),
    "no xla, oneDNN on, intra 2 / inter 1": (
        False, {"TF_ENABLE_ONEDNN_OPTS": "1", "TF_NUM_INTRAOP_THREADS": "2", "TF_NUM_INTEROP_THREADS": "1"}),
    "no xla, oneDNN on, intra 2 / inter 2": (
        False, {"TF_ENABLE_ONEDNN_OPTS": "1", "TF_NUM_INTRAOP_THREADS": "2", "TF_NUM_INTEROP_THREADS": "2"}),
    # bfloat16 matmuls and convolutions: fast where oneDNN has AMX (recipe.cpu_bfloat16_pays).
    "no xla, oneDNN on, mixed_bfloat16": (False, {"TF_ENABLE_ONEDNN_OPTS": "1"}, "mixed_bfloat16"),
    # oneDNN held to AVX512-BF16 kernels (ONEDNN_MAX_CPU_ISA): on a CPU with AMX, the kernels a CPU with
    # AVX512-BF16 but no AMX (AMD EPYC Zen 4) runs, in float32 and in bfloat16.
    "no xla, oneDNN on, AVX512-BF16 ISA": (False, {"TF_ENABLE_ONEDNN_OPTS": "1", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}),
    "no xla, oneDNN on, AVX512-BF16 ISA, mixed_bfloat16": (
        False, {"TF_ENABLE_ONEDNN_OPTS": "1", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, "mixed_bfloat16"),
}
BASELINE = "xla, oneDNN default, threads default"


# --------------------------------------------------------------------------- FLOPs
def forward_flops(model) -> int:
    """Multiply-adds of the model's convolutions and dense layers, x2: the forward FLOPs per image.

    BatchNorm, ReLU, pooling, the resize and the softmax add well under 1% and
    are left out.
    """
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, height, width, channels_out = layer.output.shape
            kernel_h, kernel_w, channels_in, _ = layer.kernel.shape
            total += height * width * channels_out * kernel_h * kernel_w * channels_in
        elif isinstance(layer, keras.layers.Dense):
            total += layer.kernel.shape[0] * layer.kernel.shape[1]
    return 2 * int(total)


# --------------------------------------------------------------------------- child side
def synthetic_split(count: int = TRAIN_IMAGES):
    import numpy as np

    rng = np.random.default_rng(0)
    images = rng.standard_normal((count, 32, 32, 3), dtype=np.float32)
    labels = rng.integers(0, 10, count).astype(np.int64)
    return images, labels


def timed_fit(model, data, warmup: int, steps: int, batch: int) -> dict:
    """Warm up (the first call compiles), then time ``steps`` steps of one ``fit``."""
    start = time.perf_counter()
    model.fit(data, epochs=1, steps_per_epoch=warmup, verbose=0)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0)
    seconds = time.perf_counter() - start
    return {"images_per_second": steps * batch / seconds, "seconds": seconds, "steps": steps,
            "warmup_seconds": warm, "warmup_steps": warmup, "batch": batch}


def tf_facts() -> dict:
    import tensorflow as tf
    from tensorflow.python.util import _pywrap_util_port

    return {"onednn_enabled": bool(_pywrap_util_port.IsMklEnabled()), "tensorflow": tf.__version__,
            "env": {key: os.environ.get(key) for key in
                    ("TF_ENABLE_ONEDNN_OPTS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")}}


def child_fast(job: dict) -> dict:
    import dataclasses

    import keras

    from alexnet_tasks.config import PipelineConfig
    from alexnet_tasks.training.feeding import ShuffledBatches
    from alexnet_tasks.training.model import build_alexnet
    from alexnet_tasks.training.recipe import compile_model, resolve_hyperparameters

    images, labels = synthetic_split()
    hyperparameters = dataclasses.replace(resolve_hyperparameters(PipelineConfig(recipe="fast", image_size=job["image_size"])),
                                   jit_compile=job["xla"], precision=job.get("precision", "float32"))
    keras.mixed_precision.set_global_policy(hyperparameters.precision)
    keras.utils.set_random_seed(0)
    model = build_alexnet(hyperparameters.image_size, augment=hyperparameters.augment, seed=0)
    compile_model(model, hyperparameters)
    data = ShuffledBatches(images, labels, hyperparameters.batch_size, seed=0)
    result = timed_fit(model, data, job["warmup"], job["steps"], hyperparameters.batch_size)
    return {**result, "forward_flops": forward_flops(model), **tf_facts()}


def child_input(job: dict) -> dict:
    """Batches/s that fit's iterator draws from the PyDataset, with no model behind it."""
    import tensorflow as tf
    from keras.src.backend.tensorflow.trainer import TFEpochIterator

    from alexnet_tasks.training.feeding import ShuffledBatches

    images, labels = synthetic_split()
    data = ShuffledBatches(images, labels, job["batch"], seed=0)
    iterator = TFEpochIterator(x=data, shuffle=False, distribute_strategy=tf.distribute.get_strategy())
    rates = []
    for _ in range(job["epochs"]):
        count = 0
        start = time.perf_counter()
        for _, _, batches in iterator:  # fit hands this iterator to its train function
            with iterator.catch_stop_iteration():
                next(batches)
                count += 1
        seconds = time.perf_counter() - start
        rates.append(count / seconds)
    return {"batch": job["batch"], "batches_per_epoch": len(data), "batches_per_second": rates,
            "images_per_second": [rate * job["batch"] for rate in rates], **tf_facts()}


def child_batch32(job: dict) -> dict:
    import dataclasses

    import keras
    import numpy as np
    import tensorflow as tf

    from alexnet_tasks.config import PipelineConfig
    from alexnet_tasks.training.feeding import ShuffledBatches
    from alexnet_tasks.training.model import build_alexnet
    from alexnet_tasks.training.recipe import compile_model, resolve_hyperparameters

    size, steps, warmup = job["image_size"], job["steps"], job["warmup"]
    images, labels = synthetic_split()
    raw = np.random.default_rng(1).integers(0, 256, (TRAIN_IMAGES, 32, 32, 3), dtype=np.uint8)

    def preprocess(image, label):
        image = tf.image.per_image_standardization(tf.cast(image, tf.float32))
        return tf.image.resize(image, (size, size)), label

    host = (tf.data.Dataset.from_tensor_slices((raw, labels)).map(preprocess)
            .shuffle(2000, seed=0).batch(32).repeat())
    keras.utils.set_random_seed(0)
    full = build_alexnet(size)
    reference = keras.Sequential([keras.Input((size, size, 3)), *[l for l in full.layers if l.name != "resize"]])
    reference.compile(optimizer=keras.optimizers.SGD(0.001), loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"], jit_compile=False)
    out = {"reference": timed_fit(reference, host, warmup, steps, 32)}
    hyperparameters = resolve_hyperparameters(PipelineConfig(recipe="reference", image_size=size))
    for name, xla in (("project_no_xla", False), ("project_xla", True)):
        model = build_alexnet(size)
        compile_model(model, dataclasses.replace(hyperparameters, jit_compile=xla))
        out[name] = timed_fit(model, ShuffledBatches(images, labels, 32, seed=0), warmup, steps, 32)
    return {**out, **tf_facts()}


def child_matmul(job: dict) -> dict:
    """GFLOP/s of a large matmul in ``job["dtype"]``: in float32, a practical peak for this CPU."""
    import tensorflow as tf

    n = job["n"]
    a = tf.cast(tf.random.normal((n, n), seed=1), job["dtype"])
    b = tf.cast(tf.random.normal((n, n), seed=2), job["dtype"])
    tf.matmul(a, b).numpy()
    rates = []
    for _ in range(job["repeats"]):
        start = time.perf_counter()
        tf.matmul(a, b).numpy()
        rates.append(2 * n**3 / (time.perf_counter() - start) / 1e9)
    return {"n": n, "dtype": job["dtype"], "gflops": rates, **tf_facts()}


CHILDREN = {"fast": child_fast, "input": child_input, "batch32": child_batch32, "matmul": child_matmul}


# --------------------------------------------------------------------------- parent side
def run_child(job: dict, env: dict, name: str = "") -> dict:
    environment = {**{k: v for k, v in os.environ.items() if not k.startswith(("TF_ENABLE_ONEDNN", "TF_NUM_"))},
                   "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO), **env}
    start = time.monotonic()
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], env=environment,
                          capture_output=True, text=True, cwd=REPO / "benchmarks")
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode or not lines:
        raise RuntimeError(f"child {job} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1][len(MARK):])
    result["process_seconds"] = time.monotonic() - start
    label = name or (f"{job.get('dtype', '')} {env or ''}".strip())
    print(f"  {job['what']} {label}: {summary(result)} ({result['process_seconds']:.0f} s)", flush=True)
    return result


def summary(result: dict) -> str:
    if "images_per_second" in result and isinstance(result["images_per_second"], float):
        return f"{result['images_per_second']:.1f} img/s"
    if "gflops" in result:
        return f"{max(result['gflops']):.0f} GFLOP/s"
    if "batches_per_second" in result:
        return f"{max(result['batches_per_second']):.1f} batches/s"
    return ", ".join(f"{k} {v['images_per_second']:.1f} img/s" for k, v in result.items() if isinstance(v, dict)
                     and "images_per_second" in v)


def git_commit() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", "alexnet_tasks",
                                                                  "benchmarks/bench_train.py"))}


def median(values):
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image-size", type=int, default=67)
    parser.add_argument("--steps", type=int, default=20, help="timed steps of the fast recipe (batch 256)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds over the variants")
    parser.add_argument("--steps-32", type=int, default=40, help="timed steps of the batch-32 comparison")
    parser.add_argument("--variants", nargs="*", default=list(FAST_VARIANTS), help="names of FAST_VARIANTS")
    parser.add_argument("--name", default="train", help="results file: benchmarks/results/<name>.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        job = json.loads(args.child)
        print(MARK + json.dumps(CHILDREN[job["what"]](job)), flush=True)
        return

    started = time.monotonic()
    payload = {"code": git_commit(), "argv": sys.argv[1:], "machine": machine(),
               "image_size": args.image_size, "data": "random arrays of the train shard's shape and dtype"}
    print("matmul peak and input path", flush=True)
    # bfloat16 beside float32: what the CPU's bfloat16 instructions (AMX tiles, AVX512-BF16) give a matmul.
    payload["matmul"] = {name: run_child({"what": "matmul", "n": 4096, "repeats": 5, "dtype": dtype}, env)
                         for name, env, dtype in (("oneDNN on", {"TF_ENABLE_ONEDNN_OPTS": "1"}, "float32"),
                                                  ("oneDNN off", {"TF_ENABLE_ONEDNN_OPTS": "0"}, "float32"),
                                                  ("oneDNN on, bfloat16", {"TF_ENABLE_ONEDNN_OPTS": "1"}, "bfloat16"))}
    payload["input"] = run_child({"what": "input", "batch": 256, "epochs": 2}, {})

    print(f"fast recipe at {args.image_size}, batch 256: {args.warmup} warm-up + {args.steps} timed steps", flush=True)
    runs = {name: [] for name in args.variants}
    for _ in range(args.repeats):
        for name in args.variants:
            xla, env, *precision = FAST_VARIANTS[name]
            runs[name].append(run_child({"what": "fast", "xla": xla, "precision": (precision or ["float32"])[0],
                                         "image_size": args.image_size,
                                         "steps": args.steps, "warmup": args.warmup}, env, name))
    base = median([r["images_per_second"] for r in runs[BASELINE]]) if BASELINE in runs else None
    fast_rows, fast = [], {}
    for name, results in runs.items():
        rates = [r["images_per_second"] for r in results]
        fast[name] = {"xla": FAST_VARIANTS[name][0], "env": FAST_VARIANTS[name][1], "images_per_second": rates,
                      "median": median(rates), "onednn_enabled": results[0]["onednn_enabled"], "runs": results}
        fast_rows.append([name, ", ".join(f"{r:.1f}" for r in rates), median(rates),
                          f"{median(rates) / base:.2f}" if base else "-"])
    payload["fast"] = fast

    print(f"batch 32 at {args.image_size}: reference vs project without and with XLA", flush=True)
    payload["batch32"] = run_child({"what": "batch32", "image_size": args.image_size, "steps": args.steps_32,
                                    "warmup": args.warmup}, {})

    flops = next(iter(runs.values()))[0]["forward_flops"]
    best_name = max(fast, key=lambda name: fast[name]["median"])
    peak = max(max(m["gflops"]) for m in payload["matmul"].values() if m["dtype"] == "float32")
    train_flops = 3 * flops
    payload["ceiling"] = {
        "forward_flops_per_image": flops, "train_flops_per_image": train_flops,
        "best_variant": best_name, "best_images_per_second": fast[best_name]["median"],
        "achieved_gflops": train_flops * fast[best_name]["median"] / 1e9, "matmul_peak_gflops": peak,
    }
    payload["ceiling"]["fraction_of_matmul_peak"] = payload["ceiling"]["achieved_gflops"] / peak
    payload["seconds"] = time.monotonic() - started

    print(table(f"fast recipe, image_size {args.image_size}, batch 256",
                ["variant", "img/s per round", "median", "x baseline"], fast_rows))
    b32 = payload["batch32"]
    ref = b32["reference"]["images_per_second"]
    print(table(f"batch 32, image_size {args.image_size}", ["train step", "img/s", "x reference"], [
        [name, b32[name]["images_per_second"], f"{b32[name]['images_per_second'] / ref:.2f}"]
        for name in ("reference", "project_no_xla", "project_xla")]))
    print(json.dumps({"input": summary(payload["input"]), "ceiling": payload["ceiling"]}, indent=2))
    save(args.name, payload)
    print(f"written {RESULTS / (args.name + '.json')} in {payload['seconds']:.0f} s")


if __name__ == "__main__":
    main()
