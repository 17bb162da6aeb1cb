#!/usr/bin/env python3
"""Print the params for a local `make run`: CONF as given, or a CPU preset when no GPU is visible.

    scripts/local_conf.py '{"epochs": 1}'     # prints {"epochs": 1}
    scripts/local_conf.py ''                  # no GPU: prints the CPU preset, and a note on stderr

Only an empty CONF asks TensorFlow for GPUs (a few seconds); the note goes to stderr.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alexnet_tasks.config import local_run_conf  # noqa: E402


def visible_gpus() -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


def main() -> int:
    text = sys.argv[1] if len(sys.argv) > 1 else ""
    try:
        explicit, _ = local_run_conf(text, gpus=1)  # validates the text without asking for GPUs
        params, note = (explicit, None) if explicit else local_run_conf(text, visible_gpus())
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if note:
        print(note, file=sys.stderr)
    print(json.dumps(params, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
