#!/usr/bin/env bash
# Prepares what the tests need beyond the build: a project-local virtualenv
# (.venv) with the test-side Python packages of tests/requirements.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
req=tests/requirements.txt
stamp=.venv/.req-stamp
if [ -f "$stamp" ] && cmp -s "$req" "$stamp"; then exit 0; fi
if ! python3 -m venv --help >/dev/null 2>&1; then
    SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -r "$req"
cp "$req" "$stamp"
