#!/usr/bin/env bash
# The one prepared check for a lent GPU machine (H100 / H200, torch + triton +
# nvcc installed, nothing downloadable). Run from the repository root:
#
#     OUT=/some/folder bash benchmarks/device_check.sh
#
# Where the tree travels without its .git, set BENCH_COMMIT=<hash> so that the
# CSV rows name the commit measured.
#
# Stages, each under its own `timeout`, all inside DEVICE_CHECK_SECONDS (default
# 450 s, so the whole check ends well under 8 minutes); a failed stage does not
# stop the next one:
#   1. env:   nvidia-smi, versions of python, torch, triton, torchvision, nvcc
#   2. build: the extension with its CUDA kernels for sm_90, editable, offline
#             (pip --no-index --no-build-isolation; falls back to
#             `setup.py build_ext --inplace` with the kernels/ package linked)
#   3. tests: the tests that need the GPU (cuda and triton backends, CUDA-only cases)
#   4. bench: python -m benchmarks --device cuda --quick, CSV appended per case
#   5. plot:  PNG of the benchmark CSV
#   6. train: the main job on the GPU (synthetic set) and the training
#             throughput per op backend at THUMOS14 sizes, in what time is left
#   7. the CPU-only tests (stage 3 runs those that need the GPU), in what time is left
# Files under $OUT (9, flat): env.log build.log tests.log bench.log bench.csv
# bench.png train.log train_results.json summary.txt. The summary is printed last.

set -u

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1
OUT=${OUT:-$REPO/out/device}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
TOTAL=${DEVICE_CHECK_SECONDS:-450}
START=$(date +%s)
export PYTHONUNBUFFERED=1
export REPO OUT PY

SUMMARY=()

now() { date +%s; }
elapsed() { echo $(( $(now) - START )); }

# budget MAX RESERVE: seconds for the next stage, at most MAX, leaving RESERVE
# seconds for the stages after it (at least 20).
budget() {
    local left=$(( START + TOTAL - $(now) - $2 ))
    (( left > $1 )) && left=$1
    (( left < 20 )) && left=20
    echo "$left"
}

# stage NAME SECONDS LOG COMMAND: run the bash COMMAND (a string; may call the
# exported functions below) under timeout, log to LOG, record the outcome.
stage() {
    local name=$1 secs=$2 log=$3 cmd=$4
    local t0 rc what
    t0=$(now)
    echo "[$(elapsed) s] $name: start (limit $secs s, log $(basename "$log"))"
    timeout -k 10 "$secs" bash -c "$cmd" >>"$log" 2>&1
    rc=$?
    case $rc in
        0) what="ok" ;;
        124|137) what="TIMED OUT" ;;
        *) what="FAILED" ;;
    esac
    echo "[$(elapsed) s] $name: $what (rc $rc, $(( $(now) - t0 )) s)"
    SUMMARY+=("$name: $what (rc $rc, $(( $(now) - t0 )) s of $secs s)")
    return $rc
}

# ------------------------------------------------------------------ 1. env
{
    echo "== date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  repo commit: ${BENCH_COMMIT:-$(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
    echo "== nvidia-smi"
    nvidia-smi 2>&1 || echo "nvidia-smi failed"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv 2>&1
    echo "== nvcc"
    nvcc --version 2>&1 || ls -d /usr/local/cuda* 2>&1
    echo "== python"
    $PY - <<'EOF' 2>&1
import platform, sys
print("python", sys.version.split()[0], sys.executable, platform.platform())
for name in ("torch", "triton", "torchvision", "numpy", "pytest", "xdist", "hypothesis", "tqdm", "matplotlib", "setuptools", "ninja", "pybind11"):
    try:
        m = __import__(name)
        print(f"{name:12s} {getattr(m, '__version__', '?')}")
    except Exception as exc:
        print(f"{name:12s} MISSING ({exc})")
import torch
print("torch.version.cuda", torch.version.cuda, "cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(0), f"{p.total_memory / 2**30:.0f} GiB", p.multi_processor_count, "SMs", f"sm_{p.major}{p.minor}")
EOF
    echo "== cpu: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
} >"$OUT/env.log" 2>&1
SUMMARY+=("env: $(grep -m1 '^device' "$OUT/env.log" || echo 'no CUDA device seen by torch')")
echo "[$(elapsed) s] env: done ($(grep -m1 '^device' "$OUT/env.log" || echo 'no GPU seen by torch'))"

# ------------------------------------------------------------------ 2. build
build_pip() {
    TORCH_CUDA_ARCH_LIST=9.0 FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
        $PY -m pip install -v --no-build-isolation --no-deps --no-index -e "$REPO"
}
build_inplace() {
    # Without pip: build in place, make `import mmsd_ext.kernels` work from the
    # source tree (setup.py maps kernels/ to mmsd_ext.kernels), put the tree on the path.
    TORCH_CUDA_ARCH_LIST=9.0 FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} $PY setup.py build_ext --inplace &&
        { [ -e mmsd_ext/kernels ] || ln -s ../kernels mmsd_ext/kernels; }
}
export -f build_pip build_inplace
: >"$OUT/build.log"
if ! stage build "$(budget 240 220)" "$OUT/build.log" build_pip; then
    echo "== pip install failed; trying setup.py build_ext --inplace" >>"$OUT/build.log"
    if stage build-inplace "$(budget 200 200)" "$OUT/build.log" build_inplace; then
        export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
BUILD_INFO=$(cd /tmp && timeout 60 $PY -c "import mmsd_ext, mmsd_ext.kernels; print(mmsd_ext.build_info())" 2>&1 | tail -n 3)
echo "build_info: $BUILD_INFO" | tee -a "$OUT/build.log"
SUMMARY+=("build_info: $BUILD_INFO")

# ------------------------------------------------------------------ 3. tests
# From outside the tree, so the installed package is what is tested. The tests that
# need the GPU (cuda and triton backends, CUDA-only cases) run here; the CPU-only rest,
# which CI runs anyway, runs last (stage 7) in whatever time is left.
GPU_TESTS="(cuda or triton or gpu or GPU) and not test_triton_compile"
export GPU_TESTS
# With pytest-xdist (in the GPU image), tests run in up to 8 processes: the Triton
# tests are bound by kernel compiles, which then use the machine's cores.
XDIST=""
if $PY -c "import xdist" 2>/dev/null; then
    WORKERS=$(( $(nproc) / 2 ))
    (( WORKERS > 8 )) && WORKERS=8
    (( WORKERS >= 2 )) && XDIST="-n $WORKERS"
fi
export XDIST
run_tests() {
    cd /tmp && MMSD_EXT_REQUIRE_CUDA_BUILD=1 $PY -m pytest -v -rfEs --maxfail=25 --durations=15 $XDIST \
        -p no:cacheprovider -k "$1" "$REPO/tests"
}
export -f run_tests
pytest_line() {
    grep -E '(passed|failed|error)' "$1" | grep -E '^=+ .* =+$' | tail -n 1
}
: >"$OUT/tests.log"
stage tests "$(budget 170 140)" "$OUT/tests.log" 'run_tests "$GPU_TESTS"'
SUMMARY+=("tests (GPU): $(pytest_line "$OUT/tests.log" || true)")

# ------------------------------------------------------------------ 4. bench
BENCH_LIMIT=$(budget 260 70)
BENCH_BUDGET=$(( BENCH_LIMIT - 45 ))
(( BENCH_BUDGET < 15 )) && BENCH_BUDGET=15
export BENCH_BUDGET
run_bench() {
    # Ops with GPU goals first, so a cut-short run still has them.
    cd "$REPO" && $PY -m benchmarks --device cuda --quick --csv "$OUT/bench.csv" --time-budget "$BENCH_BUDGET" \
        --ops topk_mil_pool mmsd_distill_loss temporal_nms soft_temporal_nms localization snippet_distill_loss
}
export -f run_bench
: >"$OUT/bench.log"
stage bench "$BENCH_LIMIT" "$OUT/bench.log" run_bench

# ------------------------------------------------------------------ 5. plot
if [ -s "$OUT/bench.csv" ]; then
    stage plot "$(budget 30 0)" "$OUT/bench.log" 'cd "$REPO" && $PY -m benchmarks.plot "$OUT/bench.csv" --out "$OUT/bench.png"'
else
    SUMMARY+=("plot: no CSV to plot")
fi

# ------------------------------------------------------------------ 6. train
run_train() {
    # Checkpoints stay out of $OUT (tens of MB); the results and the log come back.
    local dir
    dir=$(mktemp -d)
    cd /tmp && MMSD_EXT_NO_PROGRESS=1 timeout 100 $PY -m mmsd_ext.train --device cuda --output-dir "$dir/run" --no-progress
    local rc=$?
    cp "$dir/run/results.json" "$OUT/train_results.json" 2>/dev/null
    rm -rf "$dir"
    cd /tmp && timeout 60 $PY -m mmsd_ext.train.throughput --device cuda --steps 4 --backends auto reference cuda triton
    return $(( rc || $? ))
}
export -f run_train
: >"$OUT/train.log"
if (( START + TOTAL - $(now) >= 30 )); then
    stage train "$(budget 170 5)" "$OUT/train.log" run_train
else
    SUMMARY+=("train: skipped (under 30 s of the budget left)")
fi

# ------------------------------------------------------------------ 7. the other tests
if (( START + TOTAL - $(now) >= 30 )); then
    echo "== the CPU-only tests" >>"$OUT/tests.log"
    stage tests-cpu "$(budget 120 0)" "$OUT/tests.log" 'run_tests "not ($GPU_TESTS)"'
    SUMMARY+=("tests (CPU-only): $(pytest_line "$OUT/tests.log" || true)")
else
    SUMMARY+=("tests (CPU-only): skipped (under 30 s of the budget left; CI runs them)")
fi

# ------------------------------------------------------------------ summary
{
    echo "device check, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(elapsed) s in all (limit $TOTAL s)"
    for line in "${SUMMARY[@]}"; do echo "  $line"; done
    echo
    echo "benchmark table (bench.log):"
    sed -n '/^device: /,$p' "$OUT/bench.log"
} >"$OUT/summary.txt"
cat "$OUT/summary.txt"
