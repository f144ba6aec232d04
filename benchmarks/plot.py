"""Plot benchmark results from the CSV: time and speedup per provider and shape, one row of panels per op.

    python -m benchmarks.plot results.csv --out results.png [--run latest|all|RUN_ID] [--device cuda]

Left panel: median time (log scale) of each provider at each size; right panel:
speedup against the op's eager anchor (time of the anchor / time), 1 marked.
The pass shown per op is fwd+bwd where the op has a backward, pipeline for
localization (proposals + NMS + mAP, the pass every workload has), fwd
otherwise (``--pass`` picks another).
matplotlib is an optional extra (``pip install matplotlib``).
"""

import argparse
import csv
import math
import os
import sys

_NUMERIC = ("median_ms", "p20_ms", "p80_ms", "gbps", "pct_of_copy", "peak_mem_mb", "speedup_vs_eager", "copy_gbps")
_MAIN_PASS = ("fwd+bwd", "pipeline", "mmsd_protocol", "fwd")
_PASSES = ("fwd", "bwd", "fwd+bwd", "proposals", "map", "pipeline", "mmsd_protocol")
# The columns a plot reads (the CSV has more).
_NEEDED = ("run_id", "op", "provider", "kind", "shape", "dtype", "pass", "device", "device_name", "median_ms", "speedup_vs_eager")
# Formats a plot is written in, picked by the file's extension. matplotlib knows more, but some
# need more than matplotlib (.pgf runs LaTeX, .jpg Pillow) and some are not images (.raw, .rgba);
# and with no extension savefig adds ".png", a file other than the one named.
FORMATS = ("png", "pdf", "svg")
# One colour per provider in every panel: mmsd_ext's backends in strong
# colours, anchors in muted ones (and hatched).
_COLOURS = {
    "cpu": "#d62728",
    "cuda": "#2ca02c",
    "triton": "#9467bd",
    "reference": "#ff7f0e",
    "mmsd_ext": "#d62728",
    "torch.topk": "#1f77b4",
    "eager": "#1f77b4",
    "torchvision": "#1f77b4",
    "reference(cpu)": "#1f77b4",
    "python_loops": "#1f77b4",
    "torch.compile": "#17becf",
    "torchvision.nms+offsets": "#17becf",
    "loop": "#7f7f7f",
    "numpy_loop": "#7f7f7f",
    "cpu(host copies)": "#8c564b",
}


def read_csv(path):
    """The rows of a CSV of ``python -m benchmarks --csv``; ValueError naming the line if it is not one."""
    rows = []
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None) or []
        missing = [c for c in _NEEDED if c not in header]
        if missing:
            raise ValueError(f"no column {', '.join(missing)}")
        for fields in reader:
            if not fields:
                continue  # a blank line holds no row
            # reader.line_num: the file's line where this row ends (a quoted field may span lines).
            if len(fields) != len(header):
                raise ValueError(f"line {reader.line_num}: {len(fields)} fields, the header has {len(header)}")
            rows.append(_parse_row(dict(zip(header, fields)), reader.line_num))
    return rows


def _parse_row(r, line):
    try:
        for k in _NUMERIC:
            v = r.get(k, "")
            r[k] = float(v) if v not in ("", None) else None
        r["reps"] = int(r["reps"]) if r.get("reps") else 0
    except (TypeError, ValueError):
        raise ValueError(f"line {line}: a number column holds something else") from None
    # The harness writes only measured rows, with a time > 0 and a speedup (where there is an
    # anchor) of two such times: anything else was edited or damaged, and a log-scale bar of it
    # would be left out of the plot without a word.
    median = r["median_ms"]
    if median is None or not 0 < median < math.inf:
        shown = "empty" if median is None else format(median, "g")
        raise ValueError(f"line {line}: median_ms is {shown}, expected a time > 0")
    speedup = r["speedup_vs_eager"]
    if speedup is not None and not 0 < speedup < math.inf:
        raise ValueError(f"line {line}: speedup_vs_eager is {speedup:g}, expected a ratio > 0 (or empty)")
    return r


def select(rows, run="latest", device=None):
    """(rows to plot, how many rows of repeated cases were left out). With ``run="all"``, a case
    (op, provider, shape, dtype, pass, device) measured in several runs is plotted from the
    latest of them (a plot has one bar per case); otherwise nothing is left out that way."""
    repeated = 0
    if device:
        rows = [r for r in rows if r.get("device") == device or (device == "cuda" and r.get("device") == "cpu" and r.get("kind") == "anchor")]
    if run == "latest" and rows:
        latest = max(r["run_id"] for r in rows)
        rows = [r for r in rows if r["run_id"] == latest]
    elif run == "all":
        def case(r):
            return (r["op"], r["provider"], r["shape"], r["dtype"], r["pass"], r["device"])

        newest = {}
        for r in rows:
            if case(r) not in newest or r["run_id"] > newest[case(r)]:
                newest[case(r)] = r["run_id"]
        kept = [r for r in rows if r["run_id"] == newest[case(r)]]
        repeated = len(rows) - len(kept)
        rows = kept
    else:
        rows = [r for r in rows if r["run_id"] == run]
    return rows, repeated


def _main_pass(op_rows, wanted=None):
    passes = {r["pass"] for r in op_rows}
    if wanted and wanted in passes:
        return wanted
    for p in _MAIN_PASS:
        if p in passes:
            return p
    return sorted(passes)[0]


def out_problem(path):
    """Why a plot cannot be written to ``path`` (None if it can, as far as its name tells)."""
    if not path:
        return "expected a file path, got an empty one"
    if os.path.isdir(path):
        return "is a directory"
    ext = os.path.splitext(path)[1][1:]
    if ext.lower() not in FORMATS:
        given = f"a .{ext} file" if ext else "no file extension"
        return f"{given}: expected a file ending in {', '.join('.' + f for f in FORMATS)}"
    return None


def plot_rows(rows, path, title=None, pass_name=None):
    """Write a plot of ``rows`` (dicts as the harness or read_csv give them) to ``path``, in the
    format its extension names (one of FORMATS; ``out_problem`` says why a path is not one)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit('plotting needs matplotlib: pip install matplotlib (or pip install --no-build-isolation -e ".[plot]")') from None

    ops = []
    for r in rows:
        if r["op"] not in ops:
            ops.append(r["op"])
    if not ops:
        raise SystemExit("nothing to plot: no rows")
    fig, axes = plt.subplots(len(ops), 2, figsize=(15, 3.6 * len(ops)), squeeze=False)
    for i, op in enumerate(ops):
        op_rows = [r for r in rows if r["op"] == op]
        p = _main_pass(op_rows, pass_name)
        op_rows = [r for r in op_rows if r["pass"] == p]
        shapes = []
        for r in op_rows:
            label = f"{r['shape']} {r['dtype']}" if len({x["dtype"] for x in op_rows}) > 1 else r["shape"]
            r["_label"] = label
            if label not in shapes:
                shapes.append(label)
        providers = []
        for r in op_rows:
            if r["provider"] not in providers:
                providers.append(r["provider"])
        anchors = {r["_label"]: r["eager_anchor"] for r in op_rows if r.get("eager_anchor")}
        # One anchor names the axis; where sizes have different ones (soft-NMS: the reference in one
        # group, MMSD's numpy loop on a batch), each size's tick names its own.
        names = set(anchors.values())
        eager = (names.pop() if names else "eager") if len(names) <= 1 else None  # (older CSVs name none)
        speedup_label = f"speedup vs {eager}" if eager else "speedup vs the size's eager anchor"
        for j, (metric, ylabel) in enumerate((("median_ms", "median time, ms (log)"), ("speedup_vs_eager", speedup_label))):
            ax = axes[i][j]
            width = 0.8 / max(1, len(providers))
            for k, prov in enumerate(providers):
                xs, ys = [], []
                for s, shape in enumerate(shapes):
                    v = next((r[metric] for r in op_rows if r["provider"] == prov and r["_label"] == shape), None)
                    if v is not None and v > 0 and math.isfinite(v):
                        xs.append(s + (k - (len(providers) - 1) / 2) * width)
                        ys.append(v)
                hatch = "//" if any(r["provider"] == prov and r["kind"] == "anchor" for r in op_rows) else None
                ax.bar(xs, ys, width=width, label=prov, hatch=hatch, color=_COLOURS.get(prov), edgecolor="black", linewidth=0.4)
            ax.set_yscale("log")
            if metric == "speedup_vs_eager":
                ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xticks(range(len(shapes)))
            ticks = shapes if j == 0 or eager else [f"{s}\nvs {anchors[s]}" if s in anchors else s for s in shapes]
            ax.set_xticklabels(ticks, fontsize=7, rotation=10)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.set_title(f"{op} ({p})", fontsize=9)
            ax.grid(axis="y", which="both", alpha=0.3)
            if j == 0:
                ax.legend(fontsize=7, ncol=2, title="hatched = anchor", title_fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # (as --csv's folder is made)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.splitlines()[0])
    p.add_argument("csv", help="a CSV written by python -m benchmarks --csv")
    p.add_argument("--out", required=True, help=f"the plot to write: a file ending in {', '.join('.' + f for f in FORMATS)}")
    p.add_argument("--run", default="latest", help="latest (default), all, or a run_id")
    p.add_argument("--device", choices=("cpu", "cuda"), help="only this device's rows (and the CPU anchors of a GPU run)")
    p.add_argument(
        "--pass", dest="pass_name", choices=_PASSES, help="plot this pass where an op has it, instead of the main one"
    )
    args = p.parse_args(argv)
    problem = out_problem(args.out)
    if problem:
        p.error(f"--out {args.out}: {problem}" if args.out else f"--out: {problem}")
    try:
        rows = read_csv(args.csv)
    except OSError as exc:
        p.error(f"{args.csv}: cannot read it ({exc.strerror or exc})")
    except (UnicodeDecodeError, csv.Error, ValueError) as exc:
        p.error(f"{args.csv}: not a CSV written by python -m benchmarks --csv ({exc})")
    rows, repeated = select(rows, args.run, args.device)
    if not rows:
        p.error(f"{args.csv}: no rows for --run {args.run}" + (f" on --device {args.device}" if args.device else ""))
    if repeated:
        print(f"{p.prog}: {repeated} rows of earlier runs repeat cases of later ones; each case is plotted from "
              "its latest run (--run RUN_ID plots one run)", file=sys.stderr)
    names = sorted({r["device_name"] for r in rows})
    try:
        plot_rows(rows, args.out, title=f"mmsd_ext benchmarks, {'; '.join(names)}", pass_name=args.pass_name)
    except OSError as exc:
        p.error(f"--out {args.out}: cannot write it ({exc.strerror or exc})")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
