#!/usr/bin/env bash
# Run the whole DAG in process on an embedded SQLite metadata database (`airflow dags test`).
#   CONF='{"image_size": 67, "epochs": 1}' scripts/run_local.sh
#   scripts/run_local.sh    # no CONF: the defaults on a GPU, the CPU preset (67, 15 minutes) without one
# AIRFLOW_HOME defaults to ./airflow_home, ALEXNET_ARTIFACTS to ~/alexnet-artifacts.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
# Without CONF (or with `{}`), a machine where TensorFlow sees no GPU takes the CPU preset.
conf=$("$here/.venv/bin/python" "$here/scripts/local_conf.py" "${CONF:-}")
artifacts=${ALEXNET_ARTIFACTS:-$HOME/alexnet-artifacts}
echo "artifacts: $artifacts   conf: $conf"
"$here/scripts/airflow.sh" dags test alexnet_cifar10 -c "$conf"
latest=$artifacts/published/latest
if [ -f "$latest/metrics.json" ]; then
  echo "published: $(readlink -f "$latest")"
  "$here/.venv/bin/python" - "$latest/metrics.json" <<'PY'
import json, sys
metrics = json.load(open(sys.argv[1]))
print(f"test accuracy {metrics['test_accuracy']:.4f}  loss {metrics['test_loss']:.4f}")
PY
  echo "in the UI: scripts/airflow.sh api-server --port 8080, then Browse -> AlexNet runs (plugins/)"
fi
