#!/usr/bin/env python3
"""Run every benchmark, each in its own process; tables on stdout, JSON in benchmarks/results/.

    .venv/bin/python benchmarks/run_all.py          # or: make bench
The recipe comparison (benchmarks/recipes.py) trains for half an hour and runs separately.
"""

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

for name in ("bench_imports", "bench_shards", "bench_input", "bench_train", "bench_registry"):
    start = time.monotonic()
    print(f"\n== {name}", flush=True)
    subprocess.run([sys.executable, str(HERE / f"{name}.py")], check=True, cwd=HERE)
    print(f"({time.monotonic() - start:.0f} s)", flush=True)
