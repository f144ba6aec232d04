"""The measuring machinery every op's benchmark shares.

A benchmark is a list of :class:`Case` (one op at one size and dtype). A case
holds its :class:`Provider` s: every mmsd_ext backend usable on the device and
the anchors it is judged against (eager PyTorch, torch.compile, torchvision,
the loops WTAL code writes), all measured in the same run on the same inputs.

Method, per (case, provider, pass):

- Correctness check first: each provider computes the case once before any
  timing and its result is compared with the eager anchor's (the ``check``
  column says ``ok`` or how it differs). That call is cold: it pays for
  Triton JIT, torch.compile, lazy imports, autograd's first backward and
  allocator growth.
- Warm-up: every pass then makes at least one more, warm, call before or as
  its first sample; the cold check call is never a sample, with one
  exception: for a provider that compiles nothing, a check call that did the
  pass's work and took longer than ``slow_budget_s`` and a few seconds (a
  Python loop of minutes) is used as the only sample rather than run again
  (``reps`` 1, the table says "1 run, cold").
- Timing on the CPU: ``torch.utils.benchmark.Timer`` with torch's thread count,
  blocks of >= 20 ms, at least 5 blocks and ``min_run_time`` seconds; the
  median of the blocks. On a GPU: CUDA events around each call, the L2 cache
  cleared and the GPU idle before each (``_measure_cuda``), the median of all
  runs; up to commit 449e3b6, ``triton.testing.do_bench``, which does not wait
  for the GPU before a call, so calls bound by host time read short by up to
  the cache clear's time.
- Slow functions (two warm calls in a row over ``slow_s``, or one over
  ``slow_budget_s``, e.g. Python loops at large sizes) get at most 5 timed
  calls within ``slow_budget_s`` instead (at least one; ``reps`` says how
  many). A single slow warm call of a fast function (a one-off cost, a stall
  of a loaded machine) does not decide.
- Peak memory (GPU): ``torch.cuda.max_memory_allocated`` during one call, above
  what was allocated before it (inputs excluded).
- GB/s: the op's least traffic (each module documents its byte count: every
  input read once, every output written once) over the median time, and the
  same as a percentage of the copy bandwidth measured at the start of the run
  (a large ``dst.copy_(src)``, bytes read + written): the physical limit.
- Time budget (``Runner(time_budget=S)``): no case starts later than S
  seconds after ``run`` began (the copy measurement before it is not counted), and
  each op gets an equal share of the time left when its first case starts
  (what an op leaves unused goes to the ops after it), so one slow op cannot
  starve the others. A case that has started runs to its end, except its
  ``optional`` providers (anchors no goal is set against on this device, such
  as torch.compile on a GPU), which run last and are left out once the op's
  share is spent.

Each finished case is appended to the CSV at once, so a run cut short keeps
what it measured.
"""

import csv
import datetime as _dt
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

# Long-format CSV columns, one row per (op, shape, dtype, provider, pass):
# kind "mmsd_ext" (a backend) or "anchor"; device where the provider ran (a
# GPU run's CPU anchors say cpu); median/p20/p80 in ms over ``reps`` timed
# calls; bytes = the op's least traffic for that pass; gbps and pct_of_copy
# against copy_gbps (measured at the start of the run); peak_mem_mb on GPUs;
# speedup_vs_<role> = time of that anchor / this time, the eager anchor named
# in eager_anchor; check = "ok" or how the result differs from the eager
# anchor's; device_name, machine, threads and load_avg describe the machine;
# torch, triton, mmsd_ext and commit the software; run_id groups one run.
COLUMNS = [
    "op",
    "provider",
    "kind",
    "shape",
    "dtype",
    "device",
    "pass",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "reps",
    "bytes",
    "gbps",
    "copy_gbps",
    "pct_of_copy",
    "peak_mem_mb",
    "speedup_vs_eager",
    "eager_anchor",
    "speedup_vs_compile",
    "speedup_vs_loop",
    "speedup_vs_reference",
    "check",
    "device_name",
    "machine",
    "threads",
    "load_avg",
    "torch",
    "triton",
    "mmsd_ext",
    "commit",
    "timestamp",
    "run_id",
]

# Roles an anchor can play; each gets a speedup column (speedup_vs_<role>).
ROLES = ("eager", "compile", "loop", "reference")

# Blocks of at least this long keep timer overhead out of CPU timings.
_BLOCK_S = 0.02
# A CPU timing has at least this many blocks, whatever min_run_time says.
_MIN_BLOCKS = 5
# A cold check call is reused as the only sample only above this many seconds
# (and above the slow budget): first calls carry one-off costs (torch.topk's
# first fwd+bwd took 0.4 to 0.6 s against 0.1 ms warm on a loaded 2-core
# machine, more than the tiny preset's whole slow budget of 0.2 s).
_COLD_REUSE_MIN_S = 2.0


@dataclass
class Settings:
    """How hard to measure (``quick`` trades repetitions for time)."""

    device: str = "cpu"
    min_run_time: float = 0.5  # seconds of timed runs per (provider, pass)
    slow_s: float = 0.5  # a call slower than this is "slow" (few timed calls)
    slow_budget_s: float = 6.0  # seconds allowed for the timed calls of a slow function
    warmup_ms: float = 25.0  # GPU warm-up
    progress: bool = True


@dataclass
class Provider:
    """One way of computing a case: an mmsd_ext backend or an anchor.

    ``build()`` returns a dict with ``passes`` ({pass name: fn, (prepare, fn) or
    (prepare, fn, cleanup)}: ``prepare`` runs untimed before the timing of
    ``fn``), ``result`` (a function returning something ``Case.compare``
    understands; it is called once before any timing, which warms every pass
    up and tells whether this provider can run the case at all), optionally
    ``result_pass`` (the pass whose work ``result`` does: for a provider that
    does not compile, a result call over the slow budget and a few seconds
    is that pass's only sample, so a Python loop of minutes is not run twice;
    see ``measure``) and ``release``.
    """

    name: str
    kind: str  # "mmsd_ext" or "anchor"
    build: object
    device: str = "cpu"
    jit: bool = False  # compiles on its first call (Triton, torch.compile): that call is never a sample
    skip: str = None  # a reason not to run it at this size (e.g. quadratic Python loop)
    optional: bool = False  # no goal is set against it on this device: runs last, left out when the op's time share is spent


@dataclass
class Case:
    op: str
    shape: str
    dtype: str
    passes: tuple
    least_bytes: object  # {pass: bytes}, or a function of the eager result giving it (outputs of data-dependent size)
    providers: list
    roles: dict  # role -> provider name ("eager" is required when an anchor exists)
    compare: object = None  # (expected, got) -> "ok" or a description of the difference
    note: str = ""
    main_passes: tuple = None  # the passes --quick keeps (None: fwd+bwd where the case has it, else every pass)


def autograd_passes(forward, leaves, grad_out=None):
    """fwd, bwd and fwd+bwd of ``forward()`` (which returns the output tensor).

    ``leaves``: the inputs that receive gradients; their ``.grad`` is reset
    before each run so that no accumulation is timed. bwd reruns backward on one
    retained graph (``retain_graph=True``).
    """
    state = {}

    def clear():
        for x in leaves:
            x.grad = None

    def fwd():
        return forward()

    def prepare_bwd():
        state["out"] = forward()

    def bwd():
        clear()
        state["out"].backward(grad_out, retain_graph=True)

    def after_bwd():
        state.clear()
        clear()

    def fwd_bwd():
        clear()
        forward().backward(grad_out)

    def result():
        clear()
        out = forward()
        out.backward(grad_out)
        grads = [None if x.grad is None else x.grad.detach().clone() for x in leaves]
        clear()
        return out.detach(), grads

    def release():
        state.clear()
        clear()

    return {"fwd": fwd, "bwd": (prepare_bwd, bwd, after_bwd), "fwd+bwd": fwd_bwd}, result, release


def compiled_anchor(fn):
    """``torch.compile`` of an eager formulation, as the compile anchors use it.

    Default mode, static shapes, a fresh dynamo state (each shape compiles
    afresh, within dynamo's recompile limit). The compile happens in the
    provider's first (check) call, so it is never timed.
    """
    import torch._dynamo
    import torch._functorch.config as functorch_config

    # The bwd pass reruns backward on a retained graph; AOTAutograd's donated
    # buffers forbid that (it raises). Turning them off changes memory reuse in
    # the compiled backward, not its kernels.
    functorch_config.donated_buffer = False
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


# What ``result`` of autograd_passes does besides a fwd+bwd (clone the
# gradients) is small next to it: a slow result call stands for a fwd+bwd sample.
AUTOGRAD_RESULT_PASS = "fwd+bwd"


def compare_tensors(expected, got, rtol, atol):
    """"ok", or the largest error relative to the tolerance, for nested tuples/lists of tensors.

    ``atol`` shrinks with a tensor whose largest finite magnitude is below 1 (atol times
    that magnitude): the gradients of a mean over millions of rows are of the order of
    1e-5, float32's atol, which would pass them half wrong. Elsewhere it is as given."""
    worst = 0.0
    pairs = list(_flatten_pairs(expected, got))
    for e, g in pairs:
        if e is None and g is None:
            continue
        if e is None or g is None:
            return "differs: a gradient is missing"
        if tuple(e.shape) != tuple(g.shape):
            return f"differs: shape {tuple(g.shape)} != {tuple(e.shape)}"
        # On the anchor's device: at (64, 4608, 201) copying three gradients of 59M
        # elements to the host and comparing them there in float64 would spend seconds
        # of a GPU run's time.
        e64 = e.detach().to(torch.float64)
        g64 = g.detach().to(e64.device, torch.float64)
        both_nan = torch.isnan(e64) & torch.isnan(g64)
        if bool((torch.isnan(e64) ^ torch.isnan(g64)).any()):
            return "differs: NaN where the anchor has none (or the reverse)"
        diff = (e64 - g64).abs().masked_fill(both_nan, 0.0)
        finite = e64[torch.isfinite(e64)].abs()
        scale = float(finite.max()) if finite.numel() else 0.0
        bound = atol * (min(scale, 1.0) if scale > 0 else 1.0) + rtol * e64.abs().masked_fill(both_nan, 0.0)
        ratio = float((diff / bound).max()) if diff.numel() else 0.0
        worst = max(worst, ratio)
    if worst <= 1.0:
        return "ok"
    return f"differs: error {worst:.1f}x the tolerance"


def _flatten_pairs(expected, got):
    if isinstance(expected, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(expected):
            yield expected, None
            return
        for e, g in zip(expected, got):
            yield from _flatten_pairs(e, g)
    else:
        yield expected, got


# Tolerances of the correctness check per dtype (not a test: a guard against
# timing something that computes another function).
TOLERANCES = {
    torch.float32: (1e-4, 1e-5),
    torch.float64: (1e-9, 1e-12),
    torch.float16: (2e-2, 2e-3),
    torch.bfloat16: (5e-2, 1e-2),
}


# ---------------------------------------------------------------- timing


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _timed_call(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


@dataclass
class Timing:
    times_ms: list
    reps: int
    cold: bool = False  # the one sample is the cold correctness-check call (see measure)

    @property
    def median(self):
        return _quantile(self.times_ms, 0.5)

    @property
    def p20(self):
        return _quantile(self.times_ms, 0.2)

    @property
    def p80(self):
        return _quantile(self.times_ms, 0.8)


def _quantile(values, q):
    values = sorted(values)
    if not values:
        return float("nan")
    pos = q * (len(values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def measure(fn, device, settings, first_s=None):
    """Median-based timing of ``fn`` on ``device`` (see the module docstring).

    ``first_s``: how long the provider's correctness-check call took, when that
    call did this pass's work and compiled nothing. It was cold, so it is a
    sample only when it is over ``slow_budget_s`` and over ``_COLD_REUSE_MIN_S``
    (then the only one: a loop that long is not run twice). Otherwise a warm
    call is timed first; the faster of the two decides between the slow and
    the normal method.
    """
    if first_s is not None and first_s > max(settings.slow_budget_s, _COLD_REUSE_MIN_S):
        return Timing([first_s * 1e3], 1, cold=True)
    warm = _timed_call(fn, device)
    estimate = warm if first_s is None else min(first_s, warm)
    if estimate > settings.slow_s and warm <= settings.slow_budget_s:
        # One slow warm call does not yet make a slow function: it can carry a
        # one-off cost (a first backward) or a stall of a loaded machine. A second
        # call decides, and is a sample if the function is slow.
        again = _timed_call(fn, device)
        if again <= settings.slow_s:
            estimate = again
        else:
            times = [warm, again]
            spent = warm + again
            estimate = min(estimate, again)
            while len(times) < 5 and spent + estimate <= settings.slow_budget_s:
                t = _timed_call(fn, device)
                times.append(t)
                spent += t
            return Timing([t * 1e3 for t in times], len(times))
    if estimate > settings.slow_s:  # the warm call alone was over the slow budget: the one sample
        return Timing([warm * 1e3], 1)
    if device == "cuda":
        return _measure_cuda(fn, settings, estimate)
    return _measure_cpu(fn, settings, estimate)


def timer_class():
    """``torch.utils.benchmark.Timer``. Its first import loads ``torch.utils.cpp_extension``, which
    on a machine with a CUDA toolkit and no GPU (a CPU run here) logs "No CUDA runtime is found,
    using CUDA_HOME=...", a guess for building extensions, which a benchmark never does: that
    import runs with that logger quiet."""
    import logging

    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils.benchmark import Timer
    finally:
        log.setLevel(level)
    return Timer


def _measure_cpu(fn, settings, estimate_s):
    Timer = timer_class()
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    number = max(1, int(_BLOCK_S / max(estimate_s, 1e-7)))
    blocks = max(_MIN_BLOCKS, int(settings.min_run_time / max(number * estimate_s, 1e-7)))
    blocks = min(blocks, 200)
    times = []
    for _ in range(blocks):
        times.append(timer.timeit(number).mean * 1e3)
    return Timing(times, blocks * number)


def _measure_cuda(fn, settings, estimate_s):
    """CUDA events around each call, each started from an idle GPU: the L2 cache is
    cleared (a 256 MiB zero_), then the host waits for the GPU, then the start event is
    recorded. Without that wait (triton.testing.do_bench's loop, used before) the host
    issues the call while the GPU still clears the cache, the start event fires late,
    and a call bound by its launches reads short by up to the clear's time (a 256 MiB
    write: tens of microseconds on an H200)."""
    est_ms = max(estimate_s * 1e3, 1e-3)
    # Warm-up for warmup_ms of GPU time: without the waits, a call the host issues faster
    # than the GPU runs it would queue hundreds, paid for at the first wait below.
    warm_until = time.perf_counter() + settings.warmup_ms / 1e3
    fn()
    torch.cuda.synchronize()
    while time.perf_counter() < warm_until:
        fn()
        torch.cuda.synchronize()
    n = min(max(5, int(settings.min_run_time * 1e3 / est_ms)), _MAX_CUDA_SAMPLES)
    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        flush.zero_()
        torch.cuda.synchronize()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return Timing([s.elapsed_time(e) for s, e in zip(starts, ends)], n)


# Samples of one GPU pass at most: each costs a cache clear and a wait besides the call.
_MAX_CUDA_SAMPLES = 5000


def peak_memory_mb(fn, device):
    """Extra GPU memory (MiB) one call of ``fn`` needs above what is already allocated."""
    if device != "cuda":
        return None
    try:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return max(0, torch.cuda.max_memory_allocated() - before) / 2**20
    except RuntimeError:
        return None  # an allocator without statistics: the column stays empty


def _first_backward(device):
    """Pays the process's one-off autograd start-up before any provider's cold
    check call is timed: the engine starts its device threads at the first
    backward, which on a machine with a GPU initialises CUDA (3.3 s on an H200
    machine, where it made torch.topk's CPU check call look like a slow loop)."""
    x = torch.ones(2, device=device, requires_grad=True)
    (x * 2).sum().backward()


def copy_bandwidth(device, settings, nbytes=None):
    """GB/s of ``dst.copy_(src)`` for a tensor far larger than the caches (bytes read + written)."""
    if nbytes is None:
        nbytes = (1 << 30) if device == "cuda" else (256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: first touch of dst's pages
    timing = measure(lambda: dst.copy_(src), device, settings)
    return 2 * nbytes / (timing.median * 1e-3) / 1e9


# ---------------------------------------------------------------- environment


def machine_info(device):
    """(device_name, machine description) for the CSV."""
    cpu = _cpu_model()
    mem = _mem_gib()
    desc = f"{platform.machine()} {os.cpu_count()} cores ({cpu}), {mem} GiB RAM, {platform.system()} {platform.release()}"
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        name = torch.cuda.get_device_name(0)
        gpu = f"{name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs"
        return name, f"{gpu}; host {desc}"
    return cpu, desc


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _mem_gib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20)
    except OSError:
        pass
    return "?"


def load_average():
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return ""


def versions():
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    try:
        import mmsd_ext

        mmsd_version = mmsd_ext.__version__
    except ImportError:
        mmsd_version = ""
    return {"torch": torch.__version__, "triton": triton_version, "mmsd_ext": mmsd_version, "commit": git_commit()}


def git_commit():
    """The commit measured: $BENCH_COMMIT if set (a tree copied without .git), else git's HEAD (+ "-dirty")."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ---------------------------------------------------------------- running


class Runner:
    """Runs cases, appends rows to a CSV, collects them for the final table."""

    def __init__(self, settings, csv_path=None, time_budget=None):
        self.settings = settings
        self.csv_path = csv_path
        self.time_budget = time_budget
        self.deadline = None  # set when run() starts
        self.rows = []
        self.skipped = []  # (op, shape, provider, reason)
        self.not_run = []  # cases left out by the time budget
        self.device = settings.device
        self.device_name, self.machine = machine_info(self.device)
        self.versions = versions()
        self.run_id = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.copy_gbps = None
        if csv_path:
            _check_csv_header(csv_path)

    def measure_copy(self):
        self.copy_gbps = copy_bandwidth(self.device, self.settings)
        return self.copy_gbps

    def run(self, cases):
        tasks = sum(len(c.providers) * len(c.passes) for c in cases)
        if not tasks:
            return self.rows
        _first_backward(self.device)
        if self.time_budget is not None and self.deadline is None:
            self.deadline = time.monotonic() + self.time_budget
        bar = _progress(tasks, self.settings.progress)
        ops = list(dict.fromkeys(c.op for c in cases))
        current, op_deadline = None, None
        try:
            for case in cases:
                now = time.monotonic()
                if case.op != current:
                    current = case.op
                    if self.deadline is not None:
                        # An equal share of what is left for each op not started yet.
                        ops_left = len(ops) - ops.index(case.op)
                        op_deadline = now + max(0.0, self.deadline - now) / ops_left
                if op_deadline is not None and now >= op_deadline:
                    self.not_run.append(case)
                    bar.update(len(case.providers) * len(case.passes))
                    continue
                rows = self._run_case(case, bar, op_deadline)
                case.providers.clear()  # their inputs (closures) go now, not at the end of the run
                self._fill_speedups(case, rows)
                self.rows.extend(rows)
                if self.csv_path:
                    try:
                        _append_csv(self.csv_path, rows)
                    except OSError as exc:
                        kept = len(self.rows) - len(rows)
                        raise SystemExit(
                            f"--csv {self.csv_path}: cannot append the rows of {case.op} {case.shape} {case.dtype} "
                            f"({exc.strerror or exc}); the {kept} rows this run measured before are in it"
                        ) from None
        finally:
            bar.close()
        return self.rows

    def _note(self, bar, text):
        if self.settings.progress and hasattr(bar, "write"):
            bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def _run_case(self, case, bar, deadline=None):
        rows = []
        expected, expected_from, least = None, None, {}
        eager = case.roles.get("eager")
        # The eager anchor first: its result is what the others are checked
        # against. Optional providers last: they are the ones a spent time share drops.
        ordered = sorted(case.providers, key=lambda p: (p.name != eager, p.optional))
        for prov in ordered:
            label = f"{case.op} {case.shape} {case.dtype} {prov.name}"
            if hasattr(bar, "set_postfix_str"):
                bar.set_postfix_str(label[-60:], refresh=False)
            skip = prov.skip
            if not skip and prov.optional and deadline is not None and time.monotonic() >= deadline:
                skip = "left out: this op's share of the time budget was spent (no goal is set against this anchor here)"
            if skip:
                self.skipped.append((case.op, f"{case.shape} {case.dtype}", prov.name, skip))
                bar.update(len(case.passes))
                continue
            try:
                built = prov.build()
                t0 = time.perf_counter()
                result = built["result"]()
                _sync(prov.device)
                result_s = time.perf_counter() - t0
            except Exception as exc:  # noqa: BLE001 - a backend that cannot run this case is reported, not fatal
                reason = _first_line(exc)
                self.skipped.append((case.op, f"{case.shape} {case.dtype}", prov.name, reason))
                self._note(bar, f"skip {label}: {reason}")
                bar.update(len(case.passes))
                continue
            if expected is None:
                # The eager anchor's result when it ran (it goes first), else the
                # first provider's: the others are checked against it.
                expected, expected_from = result, prov.name
                check = ""
                least = case.least_bytes(result) if callable(case.least_bytes) else case.least_bytes
            elif case.compare is not None:
                check = case.compare(expected, result)
                if expected_from != eager:
                    check += f" (vs {expected_from})"
            else:
                check = ""
            for pass_name in case.passes:
                entry = built["passes"].get(pass_name)
                if entry is None:
                    bar.update(1)
                    continue
                prepare, fn, cleanup = _pass_parts(entry)
                try:
                    if prepare is not None:
                        prepare()
                    reuse = result_s if pass_name == built.get("result_pass") and not prov.jit else None
                    timing = measure(fn, prov.device, self.settings, first_s=reuse)
                    peak = peak_memory_mb(fn, prov.device)
                except Exception as exc:  # noqa: BLE001
                    reason = _first_line(exc)
                    self.skipped.append((case.op, f"{case.shape} {case.dtype}", f"{prov.name} {pass_name}", reason))
                    self._note(bar, f"failed {label} {pass_name}: {reason}")
                    bar.update(1)
                    continue
                finally:
                    if cleanup is not None:
                        cleanup()
                rows.append(self._row(case, prov, pass_name, timing, peak, check, least))
                bar.update(1)
            release = built.get("release")
            if release is not None:
                release()
            del built
        return rows

    def _row(self, case, prov, pass_name, timing, peak, check, least):
        median = timing.median
        nbytes = least.get(pass_name)
        gbps = nbytes / (median * 1e-3) / 1e9 if nbytes and median > 0 else None
        pct = 100.0 * gbps / self.copy_gbps if gbps is not None and self.copy_gbps else None
        return {
            "op": case.op,
            "provider": prov.name,
            "kind": prov.kind,
            "shape": case.shape,
            "dtype": case.dtype,
            "device": prov.device,
            "pass": pass_name,
            "median_ms": median,
            "p20_ms": timing.p20,
            "p80_ms": timing.p80,
            "reps": timing.reps,
            "cold": timing.cold,
            "bytes": nbytes,
            "gbps": gbps,
            "copy_gbps": self.copy_gbps,
            "pct_of_copy": pct,
            "peak_mem_mb": peak,
            "eager_anchor": case.roles.get("eager", ""),
            "check": check,
            "device_name": self.device_name,
            "machine": self.machine,
            "threads": torch.get_num_threads(),
            "load_avg": load_average(),
            "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "run_id": self.run_id,
            **self.versions,
        }

    @staticmethod
    def _fill_speedups(case, rows):
        for role in ROLES:
            anchor = case.roles.get(role)
            base = {r["pass"]: r["median_ms"] for r in rows if anchor and r["provider"] == anchor}
            for r in rows:
                t = base.get(r["pass"])
                r[f"speedup_vs_{role}"] = t / r["median_ms"] if t and r["median_ms"] > 0 else None


def _pass_parts(entry):
    """A pass is fn, (prepare, fn) or (prepare, fn, cleanup)."""
    if not isinstance(entry, tuple):
        return None, entry, None
    if len(entry) == 2:
        return entry[0], entry[1], None
    return entry


def _first_line(exc):
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def _progress(total, enabled):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    # On a terminal a live bar; in a log file a line every 30 s at most.
    interactive = sys.stderr.isatty()
    return tqdm(total=total, desc="benchmarks", unit="run", file=sys.stderr, mininterval=0.2 if interactive else 30.0, dynamic_ncols=True)


# ---------------------------------------------------------------- CSV


def _check_csv_header(path):
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    try:
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), None)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise SystemExit(
            f"--csv {path}: not a CSV file this tool can append to ({_first_line(exc)}); "
            "append to a new file (or move the old one away)"
        ) from None
    except OSError as exc:
        raise SystemExit(f"--csv {path}: cannot read it ({exc.strerror or exc})") from None
    if header != COLUMNS:
        raise SystemExit(
            f"--csv {path}: the file has other columns than this version of the benchmarks writes; "
            "append to a new file (or move the old one away)"
        )


def _ends_without_newline(path):
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) not in (b"\n", b"\r")


def _append_csv(path, rows):
    if not rows:
        return
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # A file whose last line lost its line end (edited by hand) would glue our first row onto it.
    glue = not new and _ends_without_newline(path)
    with open(path, "a", newline="", encoding="utf-8") as f:
        if glue:
            f.write("\r\n")
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow({k: _csv_value(r.get(k)) for k in COLUMNS})


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.6g}"
    return v


# ---------------------------------------------------------------- table


def _fmt(v, spec):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def format_table(rows, copy_gbps=None, device_name="", machine=""):
    """The readable summary: one block per op, rows grouped by shape, dtype and pass."""
    out = []
    if rows:
        out.append(f"device: {device_name}  |  machine: {machine}")
    if copy_gbps:
        out.append(f"copy bandwidth (dst.copy_(src), read + write): {copy_gbps:.1f} GB/s")
    ops = []
    for r in rows:
        if r["op"] not in ops:
            ops.append(r["op"])
    for op in ops:
        op_rows = [r for r in rows if r["op"] == op]
        roles = [role for role in ROLES if any(r.get(f"speedup_vs_{role}") is not None for r in op_rows)]
        gpu = any(r.get("peak_mem_mb") is not None for r in op_rows)
        eager_names = sorted({r["eager_anchor"] for r in op_rows if r.get("eager_anchor")})
        header = ["shape", "dtype", "pass", "provider", "median ms", "p20-p80 ms", "GB/s", "% copy"]
        if gpu:
            header.append("peak MiB")
        header += [f"x {role}" for role in roles]
        header.append("check")
        table = []
        for r in op_rows:
            line = [
                r["shape"],
                r["dtype"],
                r["pass"],
                r["provider"] + ("" if r["kind"] == "mmsd_ext" else " *"),
                _fmt(r["median_ms"], ".3f"),
                _spread(r),
                _fmt(r["gbps"], ".3g"),
                _fmt(r["pct_of_copy"], ".1f"),
            ]
            if gpu:
                line.append(_fmt(r.get("peak_mem_mb"), ".1f"))
            line += [_fmt(r.get(f"speedup_vs_{role}"), ".2f") for role in roles]
            line.append(r.get("check") or "")
            table.append(line)
        out.append("")
        title = f"== {op}  (* = anchor; x eager = time of {', '.join(eager_names) or 'the eager anchor'} / time)"
        out.append(title)
        out.extend(_align([header] + table))
    return "\n".join(out)


def _spread(r):
    if r["reps"] <= 1:
        return "(1 run, cold)" if r.get("cold") else "(1 run)"
    text = f"{_fmt(r['p20_ms'], '.4g')}-{_fmt(r['p80_ms'], '.4g')}"
    return text + (f" ({r['reps']} runs)" if r["reps"] < 5 else "")


def format_left_out(runner):
    """What a run did not measure, and why (empty when it measured everything asked)."""
    out = []
    if runner.skipped:
        out.append("not measured:")
        out.extend(f"  {op} {shape} {prov}: {why}" for op, shape, prov, why in runner.skipped)
    if runner.not_run:
        out.append(f"left out by --time-budget {runner.time_budget:g} s: " + "; ".join(f"{c.op} {c.shape}" for c in runner.not_run))
    return "\n".join(out)


def _align(table):
    widths = [max(len(str(row[i])) for row in table) for i in range(len(table[0]))]
    lines = []
    for n, row in enumerate(table):
        last = len(row) - 1
        cells = [str(v).ljust(w) if i < 4 or i == last else str(v).rjust(w) for i, (v, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


# ---------------------------------------------------------------- what to run


@dataclass
class Context:
    """What the command line asked for, handed to each op's ``cases``."""

    device: str = "cpu"
    dtypes: tuple = (torch.float32,)
    preset: str = "full"  # "tiny", "quick" or "full"
    tokens: list = None  # explicit sizes from --sizes, or None for the preset
    seed: int = 0
    passes: tuple = None  # only these passes (None: every pass of each op)
    compile_anchors: bool = True  # torch.compile anchors (--no-compile leaves them out)

    def mmsd_backends(self):
        """mmsd_ext backends that run on this device, discovered now (never a fixed list).

        Triton counts on a GPU only: on the CPU it would run under its interpreter,
        which is a testing tool, not something to time.
        """
        import mmsd_ext

        fits = {"reference": True, "cpu": self.device == "cpu", "cuda": self.device == "cuda", "triton": self.device == "cuda"}
        return [name for name in mmsd_ext.available_backends() if fits.get(name, False)]

    def sizes(self, presets, parse):
        """The preset's sizes for this device, or the --sizes tokens this op understands."""
        if self.tokens:
            parsed = [parse(t) for t in self.tokens]
            return [p for p in parsed if p is not None]
        chosen = presets[self.preset]
        if isinstance(chosen, dict):
            chosen = chosen.get(self.device, chosen.get("cpu"))
        return list(chosen)


def parse_btc(token):
    """'10x750x21' -> (10, 750, 21); anything else (zero sizes too) -> None (not a size for this op)."""
    parts = token.lower().split("x")
    if len(parts) == 3 and all(p.isdigit() and int(p) > 0 for p in parts):
        return tuple(int(p) for p in parts)
    return None


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")
