"""python -m benchmarks: time every mmsd_ext backend against its anchors.

Examples (from the repository root)::

    python -m benchmarks --quick --csv out/bench.csv --plot out/bench.png   # CPU, a few minutes
    python -m benchmarks --device cuda --csv out/gpu.csv                    # every op, every size
    python -m benchmarks --ops topk_mil_pool mmsd_distill_loss --sizes 32x2304x201
    python -m benchmarks --list                                             # what would run

See benchmarks/harness.py for the method and each benchmarks/bench_*.py for
the anchors, inputs and byte counts of an op.
"""

import argparse
import functools
import importlib.util
import os
import sys
import time

# Quiet the loader's one-line warning about a missing extension: the run says
# which backends it found itself.
os.environ.setdefault("MMSD_EXT_QUIET", "1")

import torch  # noqa: E402

from . import bench_distill, bench_localization, bench_nms, bench_topk_mil_pool  # noqa: E402
from .harness import Context, Runner, Settings, _check_csv_header, format_left_out, format_table, parse_btc  # noqa: E402
from .plot import FORMATS, out_problem, plot_rows  # noqa: E402  (plot.py imports matplotlib only to draw)

OPS = {
    "topk_mil_pool": bench_topk_mil_pool.cases,
    "snippet_distill_loss": functools.partial(bench_distill.cases, "snippet_distill_loss"),
    "mmsd_distill_loss": functools.partial(bench_distill.cases, "mmsd_distill_loss"),
    "temporal_nms": functools.partial(bench_nms.cases, "temporal_nms"),
    "soft_temporal_nms": functools.partial(bench_nms.cases, "soft_temporal_nms"),
    "localization": bench_localization.cases,
}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
PASSES = ("fwd", "bwd", "fwd+bwd", "proposals", "map", "pipeline", "mmsd_protocol")

# Measuring effort per preset: (min_run_time s, slow_s, slow_budget_s).
EFFORT = {"tiny": (0.02, 0.05, 0.2), "quick": (0.3, 0.5, 4.0), "full": (1.0, 1.0, 10.0)}

# --seed feeds torch.Generator.manual_seed (topk, distillation inputs) and numpy's RandomState
# (NMS and localization inputs). numpy takes only 0 <= seed < 2**32; torch takes more, but a
# seed numpy refuses would leave those ops "not measured", so the narrower range is the rule.
SEED_LIMIT = 2**32


def _split(values):
    out = []
    for v in values or []:
        out.extend(x for x in v.replace(",", " ").split() if x)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark mmsd_ext's backends against eager PyTorch, torch.compile, torchvision and "
        "the loops WTAL code writes, all measured in the same run.",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if a GPU is visible, else cpu")
    p.add_argument("--ops", nargs="+", metavar="OP", help=f"subset of: {', '.join(OPS)} (default: all)")
    p.add_argument("--quick", action="store_true", help="the sizes each op issue's goals name, fewer repetitions (a few minutes on 2 CPU cores)")
    p.add_argument(
        "--sizes",
        nargs="+",
        metavar="SIZE",
        help="a preset (tiny, quick, full) or sizes: BxTxC for topk/distillation (e.g. 32x2304x201), "
        "M=N for NMS in one group, thumos / thumos-mmsd / activitynet for the NMS batches, "
        "thumos, videos=N or activitynet for localization; each op takes the sizes it understands",
    )
    p.add_argument("--dtypes", nargs="+", default=["float32"], help=f"for topk and distillation: {', '.join(DTYPES)} (default float32)")
    p.add_argument(
        "--passes",
        nargs="+",
        metavar="PASS",
        help=f"only these passes ({', '.join(PASSES)}); default: all, except --quick, which times the passes "
        "the goals name: fwd+bwd for ops with a backward, fwd for NMS, proposals / pipeline / mmsd_protocol for localization",
    )
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile anchors (a cold compile takes seconds to a minute per shape)")
    p.add_argument("--csv", metavar="PATH", help="append the results to this CSV (long format, one row per op/provider/shape/pass)")
    p.add_argument(
        "--plot", metavar="PATH", help=f"plot this run's results to PATH, a {'/'.join(FORMATS)} file by its extension (needs matplotlib)"
    )
    p.add_argument(
        "--time-budget",
        type=float,
        metavar="S",
        help="start no new case after S seconds (what ran is kept); each op gets an equal share of the time left when "
        "it starts (an op's unused time goes to the ops after it), and optional anchors (torch.compile where no goal "
        "is set against it) are left out once their op's share is spent",
    )
    p.add_argument("--min-run-time", type=float, metavar="S", help="seconds of timed runs per measurement (default by preset)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's, all cores)")
    p.add_argument("--seed", type=int, default=0, help=f"seed of the random inputs, 0 to {SEED_LIMIT - 1} (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true", help="list the cases and providers, run nothing")
    args = p.parse_args(argv)

    if args.ops is not None and not _split(args.ops):
        p.error("--ops: expected one or more of " + ", ".join(OPS) + ", got none")
    args.ops = _split(args.ops) or list(OPS)
    unknown = [o for o in args.ops if o not in OPS]
    if unknown:
        p.error(f"--ops: unknown {', '.join(unknown)}; choose from {', '.join(OPS)}")
    sizes = _split(args.sizes)
    presets = [s for s in sizes if s in EFFORT]
    if len(presets) > 1 or (presets and len(sizes) > 1):
        p.error("--sizes: give one preset (tiny, quick, full) or a list of sizes, not both")
    args.preset = presets[0] if presets else ("quick" if args.quick else "full")
    args.tokens = None if presets or not sizes else sizes
    for token in args.tokens or []:
        if all(parse(token) is None for parse in (parse_btc, bench_nms.parse, bench_localization.parse)):
            p.error(
                f"--sizes {token}: not a size; expected BxTxC (e.g. 32x2304x201), M=N (N >= 1), thumos, thumos-mmsd, "
                "activitynet, videos=N or a preset (tiny, quick, full)"
            )
    dtypes = _split(args.dtypes)
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        p.error(f"--dtypes: unknown {', '.join(bad)}; choose from {', '.join(DTYPES)}")
    args.dtype_list = tuple(DTYPES[d] for d in dtypes)
    args.passes = _split(args.passes) or None
    bad = [x for x in args.passes or [] if x not in PASSES]
    if bad:
        p.error(f"--passes: unknown {', '.join(bad)}; choose from {', '.join(PASSES)}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch")
    for flag, value in (("--time-budget", args.time_budget), ("--min-run-time", args.min_run_time)):
        if value is not None and not 0 < value < float("inf"):
            p.error(f"{flag}: expected a number of seconds > 0, got {value:g}")
    if args.threads is not None and not 1 <= args.threads <= 4096:
        p.error(f"--threads: expected 1 to 4096, got {args.threads}")
    if not 0 <= args.seed < SEED_LIMIT:
        p.error(f"--seed: expected 0 to {SEED_LIMIT - 1}, got {args.seed}")
    for flag, path in (("--csv", args.csv), ("--plot", args.plot)):
        if path == "":
            p.error(f"{flag}: expected a file path, got an empty one")
    if args.plot and not args.list:
        if importlib.util.find_spec("matplotlib") is None:
            p.error('--plot: matplotlib is not installed (pip install matplotlib, or pip install --no-build-isolation -e ".[plot]"); run without --plot')
        problem = out_problem(args.plot)
        if problem:
            p.error(f"--plot {args.plot}: {problem}")
    if args.csv and args.plot and os.path.realpath(args.csv) == os.path.realpath(args.plot):
        p.error(f"--csv and --plot name the same file, {args.plot}: the plot would replace the CSV's rows")
    if not args.list:
        # Before the run, not after minutes of measurements.
        for flag, path in (("--csv", args.csv), ("--plot", args.plot)):
            problem = path and _unwritable(path)
            if problem:
                p.error(f"{flag} {path}: {problem}")
        if args.csv:
            try:  # a file to append to must have this version's columns: said here, before any input is made
                _check_csv_header(args.csv)
            except SystemExit as exc:
                p.error(str(exc))
    return args


def _unwritable(path):
    """Why ``path`` cannot be written (None if it can), making its folder as the run would; the
    folders and the file this makes are removed again (the run makes them when it writes)."""
    if os.path.isdir(path):
        return "is a directory"
    folder = os.path.dirname(os.path.abspath(path))
    made = []  # the missing folders, outermost first
    parent = folder
    while not os.path.exists(parent):
        made.insert(0, parent)
        parent = os.path.dirname(parent)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        _remove_folders(made)
        return f"cannot make the folder {folder} ({exc.strerror or exc})"
    try:
        return _unwritable_file(path)
    finally:
        _remove_folders(made)


def _remove_folders(made):
    for folder in reversed(made):
        if not os.path.isdir(folder) or os.path.islink(folder):
            continue  # not made (makedirs failed before it)
        try:
            os.rmdir(folder)  # only if still empty
        except OSError:
            return


def _unwritable_file(path):
    # Opened as the run will (os.access says yes to root everywhere, /proc included); a file
    # this makes is removed again. Appending nothing leaves an existing file as it was.
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as exc:
        return f"not writable ({exc.strerror or exc})"
    if not existed:
        try:
            os.remove(path)
        except OSError:
            pass
    return None


def _select_passes(cases, passes, main_only):
    """Keep the asked passes; a quick run keeps each case's main passes (what the goals name)."""
    kept = []
    for case in cases:
        if passes:
            case.passes = tuple(x for x in case.passes if x in passes)
        elif main_only:
            if case.main_passes is not None:
                case.passes = tuple(x for x in case.passes if x in case.main_passes)
            elif "fwd+bwd" in case.passes:
                case.passes = ("fwd+bwd",)
        if case.passes:
            kept.append(case)
    return kept


def _load_warning():
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cores = os.cpu_count() or 1
    if load > 0.75 * cores:
        return (
            f"warning: load average {load:.1f} on {cores} cores: other processes compete for the CPU, so CPU timings "
            "(multi-threaded ones most, as their threads wait for each other) come out slower and noisier than on a quiet machine"
        )
    return None


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import mmsd_ext

    min_run, slow_s, slow_budget = EFFORT[args.preset]
    if args.quick and args.preset == "full":
        min_run, slow_s, slow_budget = EFFORT["quick"]
    if args.min_run_time is not None:
        min_run = args.min_run_time
    settings = Settings(device=args.device, min_run_time=min_run, slow_s=slow_s, slow_budget_s=slow_budget, progress=not args.no_progress)
    ctx = Context(
        device=args.device, dtypes=args.dtype_list, preset=args.preset, tokens=args.tokens, seed=args.seed, compile_anchors=not args.no_compile
    )

    info = mmsd_ext.build_info()
    print(f"mmsd_ext {info['version']}: backends here {info['backends']}, on {args.device}: {ctx.mmsd_backends()}", flush=True)
    if info.get("load_error"):
        print(f"  ({info['load_error']})", flush=True)
    if info.get("sanitize"):
        print("  (a sanitized build, MMSD_EXT_SANITIZE=1: its cpu figures time the sanitizers, not the kernels)", flush=True)
    if info.get("sources_changed"):
        print("  (the extension was built from other C++/CUDA sources than csrc/ holds now: it times the kernels of its build)", flush=True)

    notes = []
    cases = []
    for op in args.ops:
        try:
            if op == "localization":
                cases.extend(OPS[op](ctx, notes=notes))
            else:
                cases.extend(OPS[op](ctx))
        except MemoryError:
            # The inputs are made on the host before anything runs: a size too large for this
            # machine ends here, not in a numpy traceback.
            print(
                f"python -m benchmarks: error: --sizes: the {op} inputs for these sizes do not fit in this machine's memory; "
                "give smaller sizes",
                file=sys.stderr,
            )
            return 2
    for n in notes:
        print(n, flush=True)
    cases = _select_passes(cases, args.passes, main_only=args.passes is None and (args.quick or args.preset == "quick"))
    if args.list:
        for c in cases:
            print(f"{c.op:22s} {c.shape:34s} {c.dtype:9s} {'/'.join(c.passes):22s} " + ", ".join(p.name + (" (skip)" if p.skip else "") for p in c.providers))
        return 0
    if not cases:
        print("python -m benchmarks: error: nothing to run: no case of --ops for these --sizes and --passes", file=sys.stderr)
        return 2

    warning = _load_warning()
    if warning:
        print(warning, flush=True)
    runner = Runner(settings, csv_path=args.csv, time_budget=args.time_budget)
    started = time.monotonic()
    copy = runner.measure_copy()
    print(f"{runner.device_name}: copy bandwidth {copy:.1f} GB/s (read + write); torch {torch.__version__}, {torch.get_num_threads()} threads, commit {runner.versions['commit']}", flush=True)
    rows = runner.run(cases)
    elapsed = time.monotonic() - started

    print()
    print(format_table(rows, runner.copy_gbps, runner.device_name, runner.machine))
    end_warning = _load_warning()
    if end_warning:
        print(end_warning)
    left_out = format_left_out(runner)
    if left_out:
        print("\n" + left_out)
    if not rows:
        # Every case failed or was left out: nothing went to the CSV, and there is nothing to plot.
        print(f"\nnothing measured in {elapsed:.0f} s" + (f"; nothing appended to {args.csv}" if args.csv else ""))
        print("python -m benchmarks: error: no case was measured (see why above)", file=sys.stderr)
        return 1
    print(f"\n{len(rows)} measurements in {elapsed:.0f} s" + (f", appended to {args.csv}" if args.csv else ""))
    if args.plot:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
            plot_rows(rows, args.plot, title=f"mmsd_ext benchmarks, {runner.device_name}, torch {torch.__version__}")
        except OSError as exc:
            print(f"python -m benchmarks: error: --plot {args.plot}: cannot write it ({exc.strerror or exc})", file=sys.stderr)
            return 1
        print(f"plot: {args.plot}")
    # A provider that computes something else is a failed run, whatever its speed (the
    # rows stay in the CSV and the table, which say how each differs).
    wrong = [r for r in rows if str(r.get("check") or "").startswith("differs")]
    if wrong:
        names = sorted({f"{r['op']} {r['provider']} {r['shape']} {r['dtype']}" for r in wrong})
        print(f"python -m benchmarks: error: {len(names)} result(s) differ from the anchor: " + "; ".join(names), file=sys.stderr)
        return 1
    return 0


def _run_main():
    try:
        return main()
    except KeyboardInterrupt:
        print("\npython -m benchmarks: interrupted (with --csv, the rows of the cases that finished are in the file)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(_run_main())
