#!/usr/bin/env bash
# dev/cuda_srchash.sh - one hash of everything the CUDA objects are compiled
# from: src/cuda/*, the headers they reach (src/*.h, src/util/*.h), the nvcc
# release, NVDEFS and CUDA_ARCH. dev/device_prebuilt.sh stores it next to the
# objects it builds here; dev/device_run.sh uses those objects on a fresh GPU
# machine only when its own hash is the same (else it compiles as always).
set -euo pipefail
cd "$(dirname "$0")/.."
{
    for f in $(ls src/cuda/*.cu src/cuda/*.cuh src/*.h src/util/*.h | LC_ALL=C sort); do
        echo "== $f"
        cat "$f"
    done
    nvcc --version | grep -i release
    echo "NVDEFS=${NVDEFS:-} CUDA_ARCH=${CUDA_ARCH:-sm_90a}"
} | sha256sum | cut -d' ' -f1
