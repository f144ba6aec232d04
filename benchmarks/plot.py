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
import sys

_NUMERIC = ("median_ms", "p20_ms", "p80_ms", "gbps", "pct_of_copy", "peak_mem_mb", "speedup_vs_eager", "copy_gbps")
_MAIN_PASS = ("fwd+bwd", "pipeline", "mmsd_protocol", "fwd")
_PASSES = ("fwd", "bwd", "fwd+bwd", "proposals", "map", "pipeline", "mmsd_protocol")
# The columns a plot reads (the CSV has more).
_NEEDED = ("run_id", "op", "provider", "kind", "shape", "dtype", "pass", "device", "device_name", "median_ms", "speedup_vs_eager")
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
}


def read_csv(path):
    """The rows of a CSV of ``python -m benchmarks --csv``; ValueError naming the line if it is not one."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in _NEEDED if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"no column {', '.join(missing)}")
        rows = list(reader)
    for line, r in enumerate(rows, start=2):
        try:
            for k in _NUMERIC:
                v = r.get(k, "")
                r[k] = float(v) if v not in ("", None) else None
            r["reps"] = int(r["reps"]) if r.get("reps") else 0
        except (TypeError, ValueError):
            raise ValueError(f"line {line}: a number column holds something else") from None
    return rows


def select(rows, run="latest", device=None):
    if device:
        rows = [r for r in rows if r.get("device") == device or (device == "cuda" and r.get("device") == "cpu" and r.get("kind") == "anchor")]
    if run == "latest" and rows:
        latest = max(r["run_id"] for r in rows)
        rows = [r for r in rows if r["run_id"] == latest]
    elif run not in ("all", "latest"):
        rows = [r for r in rows if r["run_id"] == run]
    return rows


def _main_pass(op_rows, wanted=None):
    passes = {r["pass"] for r in op_rows}
    if wanted and wanted in passes:
        return wanted
    for p in _MAIN_PASS:
        if p in passes:
            return p
    return sorted(passes)[0]


def plot_rows(rows, path, title=None, pass_name=None):
    """Write a PNG of ``rows`` (dicts as the harness or read_csv give them) to ``path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plotting needs matplotlib: pip install matplotlib (or pip install -e .[plot])") from None

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
        eager = next((r["eager_anchor"] for r in op_rows if r.get("eager_anchor")), "eager")
        for j, (metric, ylabel) in enumerate((("median_ms", "median time, ms (log)"), ("speedup_vs_eager", f"speedup vs {eager}"))):
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
            ax.set_xticklabels(shapes, fontsize=7, rotation=10)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.set_title(f"{op} ({p})", fontsize=9)
            ax.grid(axis="y", which="both", alpha=0.3)
            if j == 0:
                ax.legend(fontsize=7, ncol=2, title="hatched = anchor", title_fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.splitlines()[0])
    p.add_argument("csv", help="a CSV written by python -m benchmarks --csv")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--run", default="latest", help="latest (default), all, or a run_id")
    p.add_argument("--device", choices=("cpu", "cuda"), help="only this device's rows (and the CPU anchors of a GPU run)")
    p.add_argument(
        "--pass", dest="pass_name", choices=_PASSES, help="plot this pass where an op has it, instead of the main one"
    )
    args = p.parse_args(argv)
    try:
        rows = read_csv(args.csv)
    except OSError as exc:
        p.error(f"{args.csv}: cannot read it ({exc.strerror or exc})")
    except (UnicodeDecodeError, csv.Error, ValueError) as exc:
        p.error(f"{args.csv}: not a CSV written by python -m benchmarks --csv ({exc})")
    rows = select(rows, args.run, args.device)
    if not rows:
        raise SystemExit(f"{args.csv}: no rows for run {args.run!r}" + (f" on {args.device}" if args.device else ""))
    names = sorted({r["device_name"] for r in rows})
    try:
        plot_rows(rows, args.out, title=f"mmsd_ext benchmarks, {'; '.join(names)}", pass_name=args.pass_name)
    except OSError as exc:
        p.error(f"--out {args.out}: cannot write it ({exc.strerror or exc})")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
