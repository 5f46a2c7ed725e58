#!/usr/bin/env bash
# dev/device_prep.sh - what a device call carries, made here once per checkout
# (all under build/, git-ignored; carry the three folders:
#   ["build/device-deps", "build/shared-tools", "build/pydeps"]):
#   build/device-deps   the Debian -dev packages the GPU machine lacks (../shared/tools/device-deps.sh)
#   build/shared-tools  ../shared/tools (synth_gguf.py for the full-shape file)
#   build/pydeps        test-side Python packages the GPU machine cannot fetch, unpacked: gguf (gguf-py),
#                       pytest-xdist + execnet (make test-cuda runs pytest on several workers)
# usage: bash dev/device_prep.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p build
[ -n "$(ls build/device-deps/*.deb 2>/dev/null)" ] || bash ../shared/tools/device-deps.sh fetch build/device-deps
mkdir -p build/shared-tools && cp -r ../shared/tools/. build/shared-tools/
if [ ! -d build/pydeps/xdist ] || [ ! -d build/pydeps/gguf ]; then
    tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps -d "$tmp" gguf pytest-xdist execnet
    python3 -m pip install -q --no-deps --target build/pydeps "$tmp"/*.whl
    rm -rf "$tmp"
fi
du -sh build/device-deps build/shared-tools build/pydeps
