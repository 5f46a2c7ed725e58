#!/usr/bin/env bash
# dev/device_prebuilt.sh - the CUDA objects, compiled here, for the next device
# call to carry (build/cuda-prebuilt, git-ignored, ~14 MB): on a fresh GPU
# machine dev/device_run.sh copies them into build/cuda when
# dev/cuda_srchash.sh gives there the hash stored here, which saves the
# ~60-130 s nvcc takes there (the longest translation units, matvec.cu and
# mm_f.cu, take ~60 s each). Run it after the last change to src/ before a
# call, and carry build/cuda-prebuilt with the other folders.
# usage: bash dev/device_prebuilt.sh
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvcc >/dev/null || { echo "device_prebuilt: nvcc not found"; exit 1; }
make -j2 cuda > /dev/null
rm -rf build/cuda-prebuilt
mkdir -p build/cuda-prebuilt
cp build/cuda/src/cuda/*.o build/cuda-prebuilt/
bash dev/cuda_srchash.sh > build/cuda-prebuilt/SRCHASH
du -sh build/cuda-prebuilt
