"""Helpers shared by the benchmarks: the real archive (or a full-size synthetic one), tables, JSON."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SHARED = REPO.parent / "shared" / "cifar10"
CACHE = Path("/tmp/alexnet-bench")


def machine() -> dict:
    """The machine a figure was measured on: the CPU's name, family and model, its bfloat16 flags, cores, OS."""
    fields, flags = {}, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model") and key not in fields:
                fields[key] = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"cpu": fields.get("model name") or platform.processor() or platform.machine(),
            "cpu_family": fields.get("cpu family"), "cpu_model": fields.get("model"),
            "bfloat16": sorted(flags & {"avx512_bf16", "amx_bf16"}), "cpus": os.cpu_count(),
            "platform": platform.platform()}


def real_or_synthetic_archive() -> tuple[Path, str, str]:
    """(archive, md5, kind): the real CIFAR-10 built from ../shared/cifar10 when present,
    else a synthetic archive of the full size (50,000 + 10,000 images) in the official format."""
    CACHE.mkdir(parents=True, exist_ok=True)
    if (SHARED / "make_archive.py").is_file():
        archive, kind = CACHE / "cifar-10-python.tar.gz", "real (shared/cifar10)"
        if not archive.is_file():
            subprocess.run([sys.executable, str(SHARED / "make_archive.py"), str(archive)], check=True,
                           stdout=subprocess.DEVNULL)
    else:
        archive, kind = CACHE / "synthetic-cifar-10-python.tar.gz", "synthetic, full size"
        if not archive.is_file():
            sys.path.insert(0, str(REPO / "tests"))
            from cifar_archive import write_archive

            write_archive(archive, train_per_batch=10_000, test_count=10_000)
    return archive, hashlib.md5(archive.read_bytes()).hexdigest(), kind


def prepared_shards(image_size: int = 67):
    """Download, split and shard the benchmark archive once (cached under /tmp)."""
    sys.path.insert(0, str(REPO))
    from alexnet_tasks.config import PipelineConfig
    from alexnet_tasks.layout import Layout
    from alexnet_tasks.data.download import download
    from alexnet_tasks.data.shards import build_shards
    from alexnet_tasks.data.split import split

    archive, md5, kind = real_or_synthetic_archive()
    root = CACHE / "artifacts"
    config = PipelineConfig(source_url=str(archive), source_md5=md5, image_size=image_size)
    batch_dir = Path(download(str(archive), md5, root)["batch_dir"])
    manifest = split(batch_dir, root, config)["manifest"]
    shards = build_shards(batch_dir, Path(manifest), root, config)
    return config, Layout(root), Path(shards["shards_dir"]), kind


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def timed():
    box = {}
    start = time.perf_counter()
    yield box
    box["seconds"] = time.perf_counter() - start


def table(title: str, header: list[str], rows: list[list]) -> str:
    cells = [header] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells[1:]]
    return "\n".join(lines)


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
