#!/usr/bin/env bash
# dev/device_run.sh - what one call of the device tool runs on the GPU machine:
# unpack the build dependencies carried in build/device-deps (fetched here
# with ../shared/tools/device-deps.sh), build with CUDA, run `make test-cuda`,
# then the steps named on the command line (bench, ...). Logs go to $OUT.
# The carried folders (build/device-deps, build/shared-tools, build/pydeps)
# are made here by dev/device_prep.sh; build/cuda-prebuilt (optional, the
# CUDA objects) by dev/device_prebuilt.sh.
# The device tool brings back at most 8 files from $OUT (each bench step
# writes 2): plan a call's steps so that the logs that matter fit.
# usage: bash dev/device_run.sh [tests] [stages] [mvbench] [idxbench] [attbench] [moebench] [synthfile] [fullshape] [pytest ARGS --] [env VAR=VALUE] [clearenv] [rebuild VAR=VALUE] [bench ARGS -- ] [ablogits VAR=VALUE.. --] [ncu ARGS --] [ncus REGEX SKIP COUNT ARGS --]
set -uo pipefail
OUT=${OUT:-/tmp/ds4-out}
mkdir -p "$OUT"
p=/opt/ds4-deps
mkdir -p $p
for f in build/device-deps/*.deb; do dpkg -x "$f" $p; done
inc=$p/usr/include:$p/usr/include/x86_64-linux-gnu
lib=$p/usr/lib/x86_64-linux-gnu:$p/lib/x86_64-linux-gnu
export C_INCLUDE_PATH=$inc CPLUS_INCLUDE_PATH=$inc LIBRARY_PATH=$lib
export LD_LIBRARY_PATH=$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
command -v cc >/dev/null || export CC=gcc
mkdir -p build && touch build/.deps-ok
# test-side Python packages the device cannot fetch (gguf-py), carried unpacked
[ -d build/pydeps ] && export PYTHONPATH=$PWD/build/pydeps${PYTHONPATH:+:$PYTHONPATH}
# NCCL for --gpus (loaded at run time): the system's, else the nvidia-nccl wheel's
if ! ldconfig -p 2>/dev/null | grep -q 'libnccl.so.2 '; then
    L=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib", "libnccl.so.2"))' 2>/dev/null)
    [ -n "$L" ] && [ -f "$L" ] && export DS4_NCCL_LIB=$L && echo "NCCL: $L"
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv,noheader
t0=$(date +%s)
# NOBUILD=1: only the microbenchmark steps (idxbench, moebench, mvbench) follow, which build themselves
if [ -z "${NOBUILD:-}" ]; then
    # a fresh machine: the CUDA objects compiled here by dev/device_prebuilt.sh, when
    # they were made from these very sources with this nvcc (dev/cuda_srchash.sh)
    if [ ! -f build/cuda/nvflags.stamp ] && [ -f build/cuda-prebuilt/SRCHASH ]; then
        if [ "$(cat build/cuda-prebuilt/SRCHASH)" = "$(bash dev/cuda_srchash.sh)" ]; then
            mkdir -p build/cuda/src/cuda
            make -s BUILD=build/cuda WITH_CUDA=1 build/cuda/nvflags.stamp
            cp build/cuda-prebuilt/*.o build/cuda/src/cuda/
            touch build/cuda/src/cuda/*.o
            echo "build: the carried CUDA objects (build/cuda-prebuilt: same sources and nvcc)"
        else
            echo "build: build/cuda-prebuilt is stale (other sources or nvcc): compiling"
        fi
    fi
    if ! make -j16 cuda > "$OUT/build.log" 2>&1; then tail -40 "$OUT/build.log"; exit 1; fi
    make -j16 build/demo.gguf build/cuda/test_stages >> "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
    echo "build: $(( $(date +%s) - t0 )) s"
fi
while [ $# -gt 0 ]; do
    step=$1; shift
    case $step in
    tests)
        t0=$(date +%s)
        PYTHONUNBUFFERED=1 timeout ${TESTS_TIMEOUT:-480} make test-cuda > "$OUT/test-cuda.log" 2>&1
        echo "test-cuda: exit $?, $(( $(date +%s) - t0 )) s"
        grep -E "^(FAIL|== )|passed|failed|Error|error" "$OUT/test-cuda.log" | tail -60 ;;
    pytest)
        # pytest ARGS --: a part of the CUDA tests
        args=()
        while [ $# -gt 0 ] && [ "$1" != "--" ]; do args+=("$1"); shift; done
        [ $# -gt 0 ] && shift
        # several workers where pytest-xdist is carried (dev/device_prep.sh); PYTEST_JOBS=1: one process
        par=()
        [ "${PYTEST_JOBS:-4}" -gt 1 ] && python3 -c "import xdist" 2>/dev/null && par=(-n "${PYTEST_JOBS:-4}")
        timeout ${TESTS_TIMEOUT:-480} python3 -m pytest -q -rfEs -p no:cacheprovider "${par[@]}" "${args[@]}" > "$OUT/pytest.log" 2>&1
        echo "pytest: exit $?"; tail -25 "$OUT/pytest.log" ;;
    clearenv)
        # clearenv: unset every DS4_CUDA_* switch an earlier env step set (back to the defaults)
        for v in $(env | grep -o '^DS4_CUDA_[A-Z0-9_]*'); do unset "$v"; done
        echo "clearenv: DS4_CUDA_* unset" ;;
    rebuild)
        # rebuild VAR=VALUE: make cuda again with a make variable (e.g. NVDEFS=-DCU_IQ2_SIGNS=0, a build-time
        # kernel variant) for the steps after it; the Makefile rebuilds what the flags changed
        t0=$(date +%s)
        make -j16 cuda "$1" >> "$OUT/build.log" 2>&1 || tail -20 "$OUT/build.log"
        echo "== rebuild $1: $(( $(date +%s) - t0 )) s"; shift ;;
    env)
        # env VAR=VALUE: set a variable for the steps after it (e.g. an A/B switch)
        export "$1"; echo "== env $1"; shift ;;
    mvbench)
        # decode matvec variants (dev/mv_bench.cu)
        nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a dev/mv_bench.cu -o build/mv_bench > "$OUT/mvb-build.log" 2>&1 || tail "$OUT/mvb-build.log"
        timeout 120 build/mv_bench > "$OUT/mv_bench.log" 2>&1; echo "mv_bench: exit $?"; cat "$OUT/mv_bench.log" ;;
    idxbench)
        # k_idx_scores_t against k_idx_scores, bits and time at 1M (dev/idx_bench.cu)
        sed -n "/^#define IDX_ROWS 64/,/^\/\* ---- the host launchers/p" src/cuda/ops_compress.cu | sed '$d' > build/k.inc
        nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a -Ibuild -Isrc dev/idx_bench.cu -o build/idx_bench > "$OUT/idxb-build.log" 2>&1 || tail "$OUT/idxb-build.log"
        timeout 120 build/idx_bench > "$OUT/idx_bench.log" 2>&1; echo "idx_bench: exit $?"; cat "$OUT/idx_bench.log" ;;
    attbench)
        # the CUDA-core attention kernels alone at Flash shapes, variants bit for bit and timed (dev/att_bench.cu)
        sed -n "/^struct attn_p {/,/^int cu_attn_splits/p" src/cuda/ops_attn.cu | sed '$d' > build/k_att.inc
        nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a -Ibuild -Isrc dev/att_bench.cu -o build/att_bench > "$OUT/attb-build.log" 2>&1 || tail "$OUT/attb-build.log"
        timeout 180 build/att_bench > "$OUT/att_bench.log" 2>&1; echo "att_bench: exit $?"; cut -c1-400 "$OUT/att_bench.log" ;;
    moebench)
        # decode routed-expert kernel variants (dev/moe_bench.cu)
        nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a -Isrc dev/moe_bench.cu -o build/moe_bench > "$OUT/moeb-build.log" 2>&1 || tail "$OUT/moeb-build.log"
        timeout 120 build/moe_bench > "$OUT/moe_bench.log" 2>&1; echo "moe_bench: exit $?"; cat "$OUT/moe_bench.log" ;;
    stages)
        mkdir -p "${DS4_STAGE_MODELS:-/tmp/ds4-stages}"; timeout ${STAGES_TIMEOUT:-420} build/cuda/test_stages "${DS4_STAGE_MODELS:-/tmp/ds4-stages}" > "$OUT/stages.log" 2>&1; echo "stages: exit $?"
        grep -E "^FAIL|passed|==|failed" "$OUT/stages.log" | tail -60 ;;
    ablogits)
        # ablogits VAR=VALUE... --: dev/ab_logits.sh on build/demo.gguf (the switch's logits vs the default's, bit for bit)
        args=()
        while [ $# -gt 0 ] && [ "$1" != "--" ]; do args+=("$1"); shift; done
        [ $# -gt 0 ] && shift
        bash dev/ab_logits.sh build/demo.gguf "${args[@]}" ;;
    synthfile)
        # the published q2 tensor table at full size, experts as file holes
        t0=$(date +%s)
        python3 build/shared-tools/synth_gguf.py /tmp/synth-q2.gguf q2 tests/data/deepseek-v3-tokenizer.json > "$OUT/synth.log" 2>&1
        cat /tmp/synth-q2.gguf > /dev/null
        echo "synth file: exit $?, $(( $(date +%s) - t0 )) s"; ls -la /tmp/synth-q2.gguf ;;
    fullshape)
        t0=$(date +%s)
        DS4_SYNTH_GGUF=/tmp/synth-q2.gguf DS4_PROMPTS_DIR=build/shared-tools/prompts PYTHONUNBUFFERED=1 \
            timeout ${FULL_TIMEOUT:-240} python3 -m pytest -q -s -rfEs -p no:cacheprovider ${FULL_K:+-k "$FULL_K"} \
            tests/cuda/test_full_shape.py > "$OUT/fullshape.log" 2>&1
        echo "full shape: exit $?, $(( $(date +%s) - t0 )) s"
        grep -E "layers|cpu|gpu|passed|failed|Error" "$OUT/fullshape.log" | tail -30 ;;
    ncu)
        # kernel durations of a few eager decode steps (Nsight Compute, one
        # metric, so one replay pass per kernel); ARGS go to ds4-bench
        args=()
        while [ $# -gt 0 ] && [ "$1" != "--" ]; do args+=("$1"); shift; done
        [ $# -gt 0 ] && shift
        nn=$(( ${nn:-0} + 1 ))
        timeout "${NCU_TIMEOUT:-180}" ncu --csv ${NCU_FLAGS:-} --metrics "${NCU_METRICS:-gpu__time_duration.sum}" --launch-skip "${NCU_SKIP:-3000}" \
            --launch-count "${NCU_COUNT:-1200}" ./ds4-bench "${args[@]}" > "$OUT/ncu-$nn.csv" 2> "$OUT/ncu-$nn.err"
        echo "ncu: exit $?"; tail -3 "$OUT/ncu-$nn.err"
        python3 dev/ncu_sum.py "$OUT/ncu-$nn.csv" 2>/dev/null | head -50 ;;
    ncus)
        # ncus REGEX SKIP COUNT ARGS --: Nsight Compute sections (speed of light, occupancy, launch,
        # warp states, compute and memory workload) of COUNT launches of the kernels matching REGEX after
        # SKIP of them, in a run of ds4-bench ARGS (NCUS_PROG: another program, e.g. build/moe_bench after a
        # moebench step); the report goes to $OUT/ncus-N.txt, key lines to stdout. NCUS_EXTRA adds ncu
        # options, e.g. "--section SourceCounters --section WarpStateStats" for the stall reasons by source
        # line (the objects carry -lineinfo); its top lines are in the report file
        rx=$1 sk=$2 ct=$3; shift 3
        args=()
        while [ $# -gt 0 ] && [ "$1" != "--" ]; do args+=("$1"); shift; done
        [ $# -gt 0 ] && shift
        ns=$(( ${ns:-0} + 1 ))
        timeout "${NCU_TIMEOUT:-180}" ncu --clock-control none --section SpeedOfLight --section Occupancy \
            --section LaunchStats --section WarpStateStats --section ComputeWorkloadAnalysis \
            --section MemoryWorkloadAnalysis ${NCUS_EXTRA:-} -k "regex:$rx" --launch-skip "$sk" --launch-count "$ct" \
            "${NCUS_PROG:-./ds4-bench}" "${args[@]}" > "$OUT/ncus-$ns.txt" 2>&1
        echo "ncus $rx: exit $?"
        grep -E "^  k_|Duration|Registers Per|Achieved Occupancy|Theoretical Occupancy|Compute \(SM\) Th|Memory Throughput|DRAM Throughput|Grid Size|Block Size|Dynamic Shared|Warp Cycles Per Issued|Issued Ipc|L1/TEX Hit|L2 Hit" \
            "$OUT/ncus-$ns.txt" | cut -c1-110 | head -${NCUS_LINES:-60} ;;
    bench)
        args=()
        while [ $# -gt 0 ] && [ "$1" != "--" ]; do args+=("$1"); shift; done
        [ $# -gt 0 ] && shift
        nb=$(( ${nb:-0} + 1 ))
        echo "== ds4-bench ${args[*]}"
        rm -f ds4-gtrace.txt
        timeout "${BENCH_TIMEOUT:-240}" ./ds4-bench "${args[@]}" --csv "$OUT/bench-$nb.csv" > "$OUT/bench-$nb.log" 2>&1
        echo "bench: exit $?"
        # DS4_CUDA_GTRACE=N in a CU_GTRACE build writes the timeline to ds4-gtrace.txt: kept in $OUT
        [ -f ds4-gtrace.txt ] && mv ds4-gtrace.txt "$OUT/gtrace-$nb.txt"
        cut -c1-160 "$OUT/bench-$nb.log" | tail -"${BENCH_TAIL:-40}" ;;
    esac
done
