#!/usr/bin/env bash
# What `make test` needs beyond the virtualenv, set up on a fresh Debian/Ubuntu machine:
# - Debian's chromium and chromium-driver for the browser test (tests/test_ui_browser.py), installed
#   with apt-get (through sudo when not root);
# - PostgreSQL (127.0.0.1:5432) and Redis (127.0.0.1:6379) for the deployment test, started when
#   they are installed but not running.
# Where it cannot install something it stops with one line saying what to install.
set -euo pipefail

sudo=""
[ "$(id -u)" = 0 ] || sudo=sudo

if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if command -v apt-get >/dev/null && { [ -z "$sudo" ] || command -v sudo >/dev/null; }; then
    echo "installing chromium and chromium-driver for the browser test (apt-get)"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "make test needs Chromium and its driver at /usr/bin/chromium and /usr/bin/chromedriver:" \
         "install Debian's chromium and chromium-driver (apt-get install chromium chromium-driver), then rerun" >&2
    exit 1
  fi
fi

if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null && command -v pg_ctlcluster >/dev/null; then
  $sudo pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && command -v redis-server >/dev/null; then
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no || true
fi
