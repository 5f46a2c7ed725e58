#!/usr/bin/env bash
# dev/ab_moe_builds.sh - one device call: build options or run-time
# switches of the expert kernels against the default, H100-sized (q2:20 at 2k):
# per build the graph decode figure and the eager per-kernel table
# (DS4_CUDA_KPROF=1, --profile) whose moe rows separate the prefill kernel
# (k_moe_mm) from the decode pair (k_moe1_gate_up / k_moe1_down).
# usage (device): bash dev/ab_moe_builds.sh "NVDEFS=..." | env:VAR=VALUE ...
set -uo pipefail
OUT=${OUT:-/tmp/ds4-out}
B="--synthetic q2:20 --ctx-start 2048 --ctx-max 2048 --prefill-chunk 2048"
steps=(bench $B --gen-tokens 32 -- env DS4_CUDA_KPROF=1 bench $B --gen-tokens 8 --profile -- clearenv)
for v in "$@"; do
    case $v in
    env:*) steps+=(env "${v#env:}") ;;  # env:VAR=VALUE: a run-time switch on the current build
    *) steps+=(rebuild "$v") ;;
    esac
    steps+=(bench $B --gen-tokens 32 -- env DS4_CUDA_KPROF=1 bench $B --gen-tokens 8 --profile -- clearenv)
done
steps+=(rebuild NVDEFS= bench $B --gen-tokens 32 --)
BENCH_TAIL=0 bash dev/device_run.sh "${steps[@]}" | grep -E "^==|exit [1-9]|build:"
for f in $(ls "$OUT"/bench-*.log | sort -t- -k2 -n); do
    echo "## $f"
    grep -E "^ +[0-9]+ +[0-9]" "$f" | cut -c1-110
    grep -A14 "^cuda kernel profile" "$f" | tail -14 | cut -c1-80
done
rm -f "$OUT"/bench-*.csv
