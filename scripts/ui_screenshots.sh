#!/usr/bin/env bash
# Regenerate docs/images/ui-runs.png (the list), ui-run.png (a run's page), ui-compare.png (the
# compare page) and ui-history.png (the champion history) from a short real run.
#
# Builds the real CIFAR-10 archive from ../shared/cifar10 (once, under /tmp), then runs the
# browser test (tests/test_ui_browser.py: the pipeline through `airflow dags test`, an
# api-server with the plugin, headless Chromium) on it with a short gated run at image_size 67,
# and copies its screenshots into docs/images/. The test publishes one run, so the compare page
# shows that run against itself (every delta zero) and the history its one change of champion.
# Needs Debian's chromium and chromium-driver. Holds /tmp/alexnet-heavy.lock while it trains.
# Settings: ARCHIVE, EPOCHS, TRAIN_LIMIT.
set -euo pipefail
cd "$(dirname "$0")/.."
ARCHIVE=${ARCHIVE:-/tmp/cifar/cifar-10-python.tar.gz}
MD5=18c6e7d1617e846e1cbee435086bc6c8
EPOCHS=${EPOCHS:-4}
TRAIN_LIMIT=${TRAIN_LIMIT:-10000}
PYTHON=${PYTHON:-.venv/bin/python}
if [ ! -f "$ARCHIVE" ]; then
    mkdir -p "$(dirname "$ARCHIVE")"
    "$PYTHON" ../shared/cifar10/make_archive.py "$ARCHIVE"
fi
[ "$(md5sum < "$ARCHIVE" | cut -d' ' -f1)" = "$MD5" ] || { echo "$ARCHIVE: md5 is not $MD5" >&2; exit 1; }
export ALEXNET_UI_ARCHIVE="$ARCHIVE" ALEXNET_UI_ARCHIVE_MD5="$MD5" ALEXNET_UI_SCREENSHOTS="$PWD/docs/images"
export ALEXNET_UI_CONF="{\"image_size\": 67, \"epochs\": $EPOCHS, \"train_limit\": $TRAIN_LIMIT, \"validation_size\": 5000, \"batch_size\": null, \"recipe\": \"fast\", \"publish_mode\": \"gated\"}"
flock /tmp/alexnet-heavy.lock "$PYTHON" -m pytest tests/test_ui_browser.py -q -s -p no:cacheprovider
rm -f docs/images/ui-results-tab.png docs/images/ui-promote.png  # saved by the test, not shown in the docs
