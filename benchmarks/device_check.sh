#!/usr/bin/env bash
# The one prepared check for a lent GPU machine (H100 / H200, torch + triton +
# nvcc installed, nothing downloadable). Run from the repository root:
#
#     OUT=/some/folder BENCH_COMMIT=<hash> bash benchmarks/device_check.sh
#
# BENCH_COMMIT names the commit measured in the CSV rows where the tree travels
# without its .git. Exit status: 0 when every stage that ran passed, 1 when a
# stage failed or ran out of time (except the best-effort CPU-only tests, see
# below) or the build has no cuda backend; all logs and the summary are
# written first.
#
# Time plan: everything inside DEVICE_CHECK_SECONDS (default 460 s). Each stage
# runs under its own `timeout` with a limit taken from the time actually left,
# so that the stages after it keep a reserve; a failed stage does not stop the
# next. A stage can overrun its limit by the 10 s grace of `timeout -k` and 3 s
# of clean-up; later limits absorb that, so only the last stage's overrun
# (13 s) and the summary's nvidia-smi (up to 25 s) pass 460 s: the check ends
# within 500 s, 8 min 20 s. In order of importance,
# which is also the order they run in:
#
#   stage       limit                          taken on an H200 (2026-11-27, run 1 of an older plan)
#   env         20 s / 60 s per command        11 s     versions, nvidia-smi (top of build.log)
#   build       <= 210 s, keeps 240 s          55 s     CUDA kernels for sm_90, editable,
#                                                       offline; fallback: build_ext --inplace
#                                                       (<= 180 s, keeps 150 s)
#   bench       <= 190 s, keeps 190 s          186 s of 200 s, some goal sizes left out:
#                                                       python -m benchmarks --device cuda --quick,
#                                                       goal passes only (fwd+bwd, fwd, pipeline),
#                                                       --time-budget = limit - 60 s: first the
#                                                       distillation and top-k ops (no
#                                                       torch.compile anchors; their GPU goals
#                                                       are against eager and the copy
#                                                       bandwidth), at most 45 s; the two ways
#                                                       of mmsd_distill_loss's autograd
#                                                       (benchmarks/distill_upstream.py, ~15 s,
#                                                       at most 30 s) and fwd+bwd replayed from
#                                                       CUDA graphs (benchmarks/graph_replay.py,
#                                                       ~15 s, at most 25 s), both never yet run
#                                                       on a GPU; then hard NMS, localization and
#                                                       soft-NMS, whose CPU anchors are slow (each
#                                                       op gets its share of the time; soft-NMS
#                                                       last, as its first case alone can take a
#                                                       minute); then host time per call
#                                                       (benchmarks/host_overhead.py, at most
#                                                       20 s) in what is left; each cut at the
#                                                       stage's limit
#   plot        <= 30 s, keeps 90 s            4 s
#   tests       <= 200 s, keeps 0 s            93 s     the tests that need the GPU (after the
#                                              (251     benchmark, whose Triton kernels they reuse
#                                              tests,   from the on-disk cache), xdist; 596 tests
#                                              8 proc.) at 8799871, about 220 s at that rate in
#                                                       8 processes, so now 14 (a process per core
#                                                       but two)
#   train       <= 100 s, if 60 s are left     23 s     the main job on the GPU (synthetic set)
#   throughput  <= 60 s, if 30 s are left      17 s     training throughput per op backend
#   tests-cpu   what is left, if >= 40 s       the CPU-only tests (CI runs them anyway);
#                                              best effort: running out of time is not a
#                                              failure, a failed test is
#
# Every process a stage starts carries DEVICE_CHECK_TAG=<stage>.<this run> in
# its environment (unique to this run, so a check run inside a test of another
# never ends the other's processes); when the stage ends (done, failed or out of time), whatever still
# runs with its tag is ended, wherever it went (GNU timeout and ninja put their
# children in process groups of their own, out of reach of the stage's
# `timeout`). So nothing of the check keeps running, on the GPU or elsewhere,
# after it ends; the summary lists the GPU's compute processes at the end.
#
# Files under $OUT (8, flat; the device tool returns at most 8):
#   build.log           environment, then the build
#   tests.log           both test stages, each after a "#### tests: ..." line
#   bench.log           the benchmark's output and table, then the plot's
#   bench.csv bench.png the benchmark's rows and their plot
#   train.log           the main job, then the throughput run
#   train_results.json  the main job's results
#   summary.txt         every stage's outcome and the benchmark table (printed last)

# Stage commands are single-quoted on purpose: the stage's own bash expands them.
# shellcheck disable=SC2016

set -u

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1
OUT=${OUT:-$REPO/out/device}
mkdir -p "$OUT"
# A check run before in the same $OUT leaves its files: the benchmark appends to
# bench.csv (old rows would join this run's table and plot), and a stage that does
# not run this time would leave the last run's results looking like this run's.
rm -f "$OUT"/{build.log,tests.log,bench.log,bench.csv,bench.png,train.log,train_results.json,summary.txt}
PY=${PYTHON:-python3}
TOTAL=${DEVICE_CHECK_SECONDS:-460}
START=$(date +%s)
export PYTHONUNBUFFERED=1
export REPO OUT PY

SUMMARY=()
BAD=()          # stages that failed or ran out of time
RUN_ID="$$.$START"
CURRENT_TAG=""  # the tag of the stage running now (for the exit trap)

now() { date +%s; }
elapsed() { echo $(( $(now) - START )); }
left() { echo $(( START + TOTAL - $(now) )); }

# budget MAX RESERVE: seconds for the next stage, at most MAX, leaving RESERVE
# seconds for the stages after it; at least 20 (or what is left, if less).
budget() {
    local n=$(( $(left) - $2 )) floor=20
    (( $(left) < floor )) && floor=$(left)
    (( floor < 1 )) && floor=1
    (( n > $1 )) && n=$1
    (( n < floor )) && n=$floor
    echo "$n"
}

# The pids of the processes started with DEVICE_CHECK_TAG=$1 (they and all
# their descendants have it in /proc/PID/environ).
tagged_pids() {
    local f pid
    grep -lzxF -- "DEVICE_CHECK_TAG=$1" /proc/[0-9]*/environ 2>/dev/null | while read -r f; do
        pid=${f#/proc/}
        echo "${pid%/environ}"
    done
}

# end_tagged TAG: end whatever still runs with that tag (TERM, then KILL).
end_tagged() {
    local pids
    pids=$(tagged_pids "$1")
    [ -z "$pids" ] && return 0
    echo "[$(elapsed) s] ${1%%.*}: ending what it left running: $(echo "$pids" | tr '\n' ' ')"
    # shellcheck disable=SC2086 # one pid a word
    kill -TERM $pids 2>/dev/null
    sleep 3
    pids=$(tagged_pids "$1")
    # shellcheck disable=SC2086
    [ -n "$pids" ] && kill -KILL $pids 2>/dev/null
    return 0
}

# stage NAME SECONDS LOG COMMAND [best-effort]: run the bash COMMAND (a string;
# may call the exported functions below) under timeout, log to LOG, record the
# outcome. A failure or a time-out makes the check fail, except a time-out of a
# best-effort stage (one given only the time that happens to be left).
stage() {
    local name=$1 secs=$2 log=$3 cmd=$4 best_effort=${5:-}
    local t0 rc what
    t0=$(now)
    echo "[$(elapsed) s] $name: start (limit $secs s, log $(basename "$log"))"
    CURRENT_TAG=$name.$RUN_ID
    # In the background and waited for, so that a signal to this script runs
    # its trap at once (it ends the stage's processes, then writes the summary).
    DEVICE_CHECK_TAG=$CURRENT_TAG timeout -k 10 "$secs" bash -c "$cmd" >>"$log" 2>&1 &
    wait $!
    rc=$?
    end_tagged "$CURRENT_TAG" >>"$log" 2>&1
    CURRENT_TAG=""
    case $rc in
        0) what="ok" ;;
        124|137) what="TIMED OUT" ;;
        *) what="FAILED" ;;
    esac
    if [ -n "$best_effort" ] && [ "$what" = "TIMED OUT" ]; then
        what="TIMED OUT (best effort: the time left ran out)"
    elif (( rc != 0 )); then
        BAD+=("$name")
    fi
    echo "[$(elapsed) s] $name: $what (rc $rc, $(( $(now) - t0 )) s)"
    SUMMARY+=("$name: $what (rc $rc, $(( $(now) - t0 )) s of $secs s)")
    return $rc
}

# skip NAME WHY: a stage not run for lack of time.
skip() {
    echo "[$(elapsed) s] $1: skipped ($2)"
    SUMMARY+=("$1: skipped ($2)")
}

# Files come back from the device only up to 16 MiB each: keep the head and
# the tail of any larger one.
fit() {
    local f tmp
    for f in "$OUT"/*; do
        [ -f "$f" ] || continue
        if (( $(stat -c %s "$f") > 15 * 1024 * 1024 )); then
            tmp="$f.fit"
            { head -c $(( 2 * 1024 * 1024 )) "$f"; printf '\n[... cut to fit the 16 MiB limit ...]\n'; tail -c $(( 12 * 1024 * 1024 )) "$f"; } >"$tmp" && mv "$tmp" "$f"
        fi
    done
}

# The last pytest summary line after MARKER in LOG (before the next marker).
pytest_line() {
    local line
    line=$(awk -v m="$2" 'index($0, m) == 1 { on = 1; next } /^#### / { on = 0 } on' "$1" |
        grep -E '^=+ .*(passed|failed|error|skipped|deselected).* =+$' | tail -n 1)
    echo "${line:-(no pytest summary line)}"
}

finish() {
    local gpu
    [ -n "$CURRENT_TAG" ] && end_tagged "$CURRENT_TAG"
    if command -v nvidia-smi >/dev/null; then
        gpu=$(timeout -k 5 20 nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader 2>&1 | head -n 5 | tr '\n' ';')
    else
        gpu="(no nvidia-smi)"
    fi
    {
        echo "device check, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(elapsed) s in all (limit $TOTAL s), commit ${BENCH_COMMIT:-$(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
        for line in "${SUMMARY[@]}"; do echo "  $line"; done
        echo "  GPU compute processes at the end: ${gpu:-none}"
        if (( ${#BAD[@]} )); then echo "  NOT OK: ${BAD[*]}"; else echo "  every stage that ran passed"; fi
        echo
        echo "benchmark table (bench.log):"
        sed -n '/^device: /,$p' "$OUT/bench.log" 2>/dev/null
    } >"$OUT/summary.txt"
    fit
    cat "$OUT/summary.txt"
}
trap 'echo "[$(elapsed) s] interrupted"; BAD+=("interrupted"); finish; exit 1' INT TERM

# ------------------------------------------------------------------ env
: >"$OUT/build.log"
{
    echo "== date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  repo commit: ${BENCH_COMMIT:-$(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
    echo "== nvidia-smi"
    timeout -k 5 20 nvidia-smi 2>&1 || echo "nvidia-smi failed"
    timeout -k 5 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv 2>&1
    echo "== nvcc"
    timeout -k 5 20 nvcc --version 2>&1 || ls -d /usr/local/cuda* 2>&1
    echo "== python"
    timeout -k 5 60 "$PY" - <<'EOF' 2>&1
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
    echo
} >>"$OUT/build.log" 2>&1
DEVICE=$(grep -m1 '^device' "$OUT/build.log" || echo 'no CUDA device seen by torch')
SUMMARY+=("env: $DEVICE")
echo "[$(elapsed) s] env: done ($DEVICE)"

# ------------------------------------------------------------------ build
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
echo "== build" >>"$OUT/build.log"
if ! stage build "$(budget 210 240)" "$OUT/build.log" build_pip; then
    echo "== pip install failed; trying setup.py build_ext --inplace" >>"$OUT/build.log"
    # Less reserve than the pip build keeps: without a build nothing after it can run, and
    # the objects pip compiled before it failed are reused.
    if stage build-inplace "$(budget 180 150)" "$OUT/build.log" build_inplace; then
        # mmsd_ext alone on the path (a folder holding a link to it): with the tree
        # itself there, kernels/ would import as a top-level package too, which a test
        # refuses.
        PKG_PATH=$(mktemp -d) && ln -s "$REPO/mmsd_ext" "$PKG_PATH/mmsd_ext"
        export PYTHONPATH="$PKG_PATH${PYTHONPATH:+:$PYTHONPATH}"
        BAD=()  # the in-place build stands in for the failed pip build
    fi
fi
BUILD_INFO=$(cd /tmp && timeout -k 5 60 "$PY" -c "import mmsd_ext, mmsd_ext.kernels; i = mmsd_ext.build_info(); print(i); print('cuda backend:', 'cuda' in i['backends'])" 2>&1 | tail -n 4 | tr '\n' ' ')
echo "build_info: $BUILD_INFO" | tee -a "$OUT/build.log"
SUMMARY+=("build_info: $BUILD_INFO")
case $BUILD_INFO in
    *"cuda backend: True"*) ;;
    *) BAD+=("build_info") ;;
esac

# ------------------------------------------------------------------ bench
BENCH_LIMIT=$(budget 190 190)
# Start-up (imports, workloads, copy bandwidth, twice) and the last case started
# take the other 60 s.
BENCH_BUDGET=$(( BENCH_LIMIT - 60 ))
(( BENCH_BUDGET < 30 )) && BENCH_BUDGET=30
export BENCH_LIMIT BENCH_BUDGET
# side CAP COMMAND...: a tool beside the two benchmark runs, under a timeout of its
# own: at most CAP seconds and never past the bench stage's limit (5 s kept), so
# that it cannot take the later runs' time or time the stage out. Running out of
# that time is said, not a failure; a failure is.
side() {
    local cap=$1 room rc
    shift
    room=$(( BENCH_LIMIT - ($(date +%s) - BENCH_T0) - 5 ))
    (( room < cap )) && cap=$room
    if (( cap < 8 )); then
        echo "== not run, $cap s left in the bench stage: $*"
        return 0
    fi
    timeout -k 3 "$cap" "$@"
    rc=$?
    if (( rc == 124 || rc == 137 )); then
        echo "== stopped after its $cap s: $*"
        return 0
    fi
    return $rc
}
run_bench() {
    # Two runs into one CSV. The first, at most 45 s, times the ops whose anchors
    # are fast (26 s for two sizes on an H200). Then three tools, each under its own
    # timeout (side): the two that give goal figures of mmsd_distill_loss (% of copy
    # at 64x4608x201, and at CUDA-graph replay), never yet run on a GPU. The second
    # run has the rest for the ops with slow CPU anchors, each op with its share
    # (benchmarks/harness.py): hard NMS (its GPU goal is against torchvision at every
    # size), localization, and soft-NMS last (its CPU reference at M = 10k alone took
    # 53 s there; its goal was met at 96dc9297d649), so that its overrun costs no other
    # op its share. Host time per call, a diagnostic, only in what is left after that.
    local rc=0 rest
    BENCH_T0=$(date +%s)
    cd "$REPO" || return 1
    $PY -m benchmarks --device cuda --quick --no-compile --csv "$OUT/bench.csv" --time-budget 45 --no-progress \
        --ops mmsd_distill_loss topk_mil_pool snippet_distill_loss || rc=1
    # The two ways through mmsd_distill_loss's autograd (upstream 1, 0.5, recompute), about 15 s.
    side 30 $PY -m benchmarks.distill_upstream --device cuda --shapes 10x750x21 32x2304x201 64x4608x201 \
        --min-run-time 0.5 || rc=1
    # Kernel time without the host: fwd+bwd replayed from a CUDA graph, % of copy
    # bandwidth at replay (about 15 s).
    side 25 $PY -m benchmarks.graph_replay --ops mmsd_distill_loss topk_mil_pool --min-run-time 0.2 || rc=1
    # 10 s of the budget kept for the start-up of this run.
    rest=$(( BENCH_BUDGET - ($(date +%s) - BENCH_T0) - 10 ))
    (( rest < 15 )) && rest=15
    # Under side too: a case once started runs to its end (soft-NMS's first, about a minute),
    # so this run may reach the stage's limit; stopped there it is said, not a failure, and
    # the rows of the cases it finished are in the CSV.
    side 600 $PY -m benchmarks --device cuda --quick --csv "$OUT/bench.csv" --time-budget "$rest" --no-progress \
        --ops temporal_nms localization soft_temporal_nms || rc=1
    # Host time against whole-call time per op and backend, with the base costs of a
    # torch op, a custom op and a Triton launch (about 15 s), if the stage has room.
    side 20 $PY -m benchmarks.host_overhead --device cuda --backends cuda triton || rc=1
    return $rc
}
export -f side run_bench
: >"$OUT/bench.log"
stage bench "$BENCH_LIMIT" "$OUT/bench.log" run_bench

# ------------------------------------------------------------------ plot
if [ -s "$OUT/bench.csv" ]; then
    echo "== plot" >>"$OUT/bench.log"
    stage plot "$(budget 30 90)" "$OUT/bench.log" 'cd "$REPO" && $PY -m benchmarks.plot "$OUT/bench.csv" --out "$OUT/bench.png" --run all'
else
    SUMMARY+=("plot: no CSV to plot")
fi

# ------------------------------------------------------------------ tests
# From outside the tree, so the installed package is what is tested. The tests that
# need the GPU (cuda and triton backends, CUDA-only cases) run here; the CPU-only rest,
# which CI runs anyway, runs last in whatever time is left.
GPU_TESTS="(cuda or triton or gpu or GPU) and not test_triton_compile"
export GPU_TESTS
# With pytest-xdist (in the GPU image), tests run in a process per core but two, at most
# 14: the Triton tests are bound by kernel compiles, one core each. Inductor compiles in
# each worker's own process (TORCHINDUCTOR_COMPILE_THREADS=1), not in a pool of
# min(32, cores) subprocesses per worker.
XDIST=""
if $PY -c "import xdist" 2>/dev/null; then
    WORKERS=$(( $(nproc) - 2 ))
    (( WORKERS > 14 )) && WORKERS=14
    (( WORKERS >= 2 )) && XDIST="-n $WORKERS"
fi
export XDIST
run_tests() {
    # shellcheck disable=SC2086 # XDIST is empty or two words
    cd /tmp && MMSD_EXT_REQUIRE_CUDA_BUILD=1 TORCHINDUCTOR_COMPILE_THREADS=1 $PY -m pytest -v -rfEs --maxfail=25 \
        --durations=15 $XDIST -p no:cacheprovider -k "$1" "$REPO/tests"
}
export -f run_tests
GPU_MARK="#### tests: those that need the GPU"
CPU_MARK="#### tests: the CPU-only ones"
echo "$GPU_MARK" >"$OUT/tests.log"
if (( $(left) >= 20 )); then
    stage tests "$(budget 200 0)" "$OUT/tests.log" 'run_tests "$GPU_TESTS"'
    SUMMARY+=("tests (GPU): $(pytest_line "$OUT/tests.log" "$GPU_MARK")")
else
    skip tests "$(left) s left"
    BAD+=("tests (no time)")
fi

# ------------------------------------------------------------------ train
TRAIN_DIR=$(mktemp -d)
export TRAIN_DIR
: >"$OUT/train.log"
if (( $(left) >= 60 )); then
    # Checkpoints stay out of $OUT (tens of MB); the results and the log come back.
    stage train "$(budget 100 0)" "$OUT/train.log" \
        'cd /tmp && MMSD_EXT_NO_PROGRESS=1 $PY -m mmsd_ext.train --device cuda --output-dir "$TRAIN_DIR/run" --no-progress'
    cp "$TRAIN_DIR/run/results.json" "$OUT/train_results.json" 2>/dev/null || SUMMARY+=("train: no results.json")
else
    skip train "$(left) s left, under 60 s"
fi
rm -rf "$TRAIN_DIR"
if (( $(left) >= 30 )); then
    echo "== training throughput" >>"$OUT/train.log"
    stage throughput "$(budget 60 0)" "$OUT/train.log" \
        'cd /tmp && $PY -m mmsd_ext.train.throughput --device cuda --steps 4 --backends auto reference cuda triton'
else
    skip throughput "$(left) s left, under 30 s"
fi

# ------------------------------------------------------------------ the other tests
if (( $(left) >= 40 )); then
    echo "$CPU_MARK" >>"$OUT/tests.log"
    stage tests-cpu "$(budget 170 0)" "$OUT/tests.log" 'run_tests "not ($GPU_TESTS)"' best-effort
    SUMMARY+=("tests (CPU-only): $(pytest_line "$OUT/tests.log" "$CPU_MARK")")
    # Cut short or not, a test that failed fails the check.
    if awk -v m="$CPU_MARK" 'index($0, m) == 1 { on = 1; next } on' "$OUT/tests.log" | grep -qE '(FAILED|ERROR)( |$)'; then
        [[ " ${BAD[*]} " == *" tests-cpu "* ]] || BAD+=("tests-cpu")
    fi
else
    skip tests-cpu "$(left) s left, under 40 s; CI runs them"
fi

# ------------------------------------------------------------------ summary
trap - INT TERM
finish
(( ${#BAD[@]} == 0 ))
