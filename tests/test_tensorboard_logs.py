"""The TensorBoard entry point (alexnet_tasks.ops.tensorboard_logs) as the compose service and the README call it."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request

from builders import SUBPROCESS_ENV


def test_the_compose_command_serves_the_published_runs_of_a_local_root(tmp_path):
    """``--airflow --serve -- <TensorBoard's arguments>`` after the folder: TensorBoard answers on its port."""
    (tmp_path / "artifacts" / "published" / "runs").mkdir(parents=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "alexnet_tasks.ops.tensorboard_logs", str(tmp_path / "logs"), "--airflow", "--serve",
         "--", "--host", "127.0.0.1", "--port", str(port)],
        env={**SUBPROCESS_ENV, "ALEXNET_ARTIFACTS": str(tmp_path / "artifacts")},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, answer = time.monotonic() + 120, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/logdir", timeout=5) as response:
                    answer = response.read().decode()
                break
            except OSError:
                time.sleep(0.5)
        assert server.poll() is None, server.stdout.read()[-3000:]
        assert answer is not None and str(tmp_path / "artifacts" / "published" / "runs") in answer
    finally:
        server.terminate()
        server.wait(timeout=30)
    # Stopping the entry point stops TensorBoard too: nothing is left serving the folder.
    left = subprocess.run(["pgrep", "-f", "--", str(tmp_path / "artifacts")], capture_output=True, text=True).stdout.split()
    assert left == [], f"TensorBoard left running: {left}"
