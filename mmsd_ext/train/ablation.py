"""The ablation table on the synthetic set: ``python -m mmsd_ext.train.ablation``.

Trains each variant (full MMSD, the same with MMSD's THUMOS pseudo-label threshold, no
distillation, no self-voting, no fused stream, single stream) with several seeds on the
embedded synthetic dataset and writes a markdown table of mAP (%) at tIoU 0.1..0.7, their
average and cmAP, mean +- standard deviation over the seeds.
Every run uses ``mmsd_ext.train.engine.run`` with the synthetic preset, exactly as
``python -m mmsd_ext.train`` with the variant's flags would.
"""

import argparse
import json
import sys
import time

import numpy as np

from .engine import SYNTHETIC_PRESET, TIOUS, Config, run

VARIANTS = {
    "full MMSD": {},
    "full MMSD with --pseudo-threshold 0.55 (MMSD's THUMOS value)": {"pseudo_threshold": 0.55},
    "no distillation (--no-distill)": {"distill": False},
    "no self-voting (--no-voting)": {"voting": False},
    "no fused stream (--no-fused-stream)": {"streams": ("rgb", "flow")},
    "single stream (--single-stream)": {"streams": ("fused",)},
}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mmsd_ext.train.ablation", description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="training seeds (default 1 2 3)")
    p.add_argument("--synthetic-seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=SYNTHETIC_PRESET["epochs"])
    p.add_argument(
        "--variants",
        nargs="+",
        choices=list(range(len(VARIANTS))),
        type=int,
        default=list(range(len(VARIANTS))),
        help="indices into the variant list (default all)",
    )
    p.add_argument("--backend", default="auto")
    p.add_argument("--output", default=None, help="also write the markdown table (and a .json of the runs) here")
    args = p.parse_args(argv)

    names = [list(VARIANTS)[i] for i in args.variants]
    rows = {}
    runs = []
    for name in names:
        results = []
        for seed in args.seeds:
            values = Config().to_dict()
            values.update(SYNTHETIC_PRESET)
            values.update(VARIANTS[name])
            values.update(
                {"seed": seed, "epochs": args.epochs, "synthetic_seed": args.synthetic_seed, "backend": args.backend, "device": "cpu"}
            )
            config = Config.from_dict(values)
            start = time.perf_counter()
            result = run(config, save=False, progress=False, quiet=True)
            elapsed = time.perf_counter() - start
            results.append(result)
            runs.append(
                {
                    "variant": name,
                    "seed": seed,
                    "time_s": round(elapsed, 1),
                    "map": result["map"],
                    "average_map": result["average_map"],
                    "cmap": result["cmap"],
                }
            )
            print(
                f"{name:<38} seed {seed}: avg mAP {result['average_map']:5.1f}  cmAP {result['cmap']:5.1f}  ({elapsed:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
        rows[name] = results

    table = format_markdown(rows, args)
    print(table)
    if args.output:
        with open(args.output, "w") as f:
            f.write(table + "\n")
        with open(args.output + ".json", "w") as f:
            json.dump({"args": vars(args), "runs": runs}, f, indent=2)
    return 0


def format_markdown(rows, args):
    heads = [f"{t:.1f}" for t in TIOUS] + ["AVG", "cmAP"]
    lines = [
        f"mAP (%) on the synthetic set (seed {args.synthetic_seed}), {args.epochs} epochs, "
        f"mean +- std over training seeds {' '.join(map(str, args.seeds))}",
        "",
        "| variant | " + " | ".join(heads) + " |",
        "|---|" + "---:|" * len(heads),
    ]
    for name, results in rows.items():
        cells = []
        for t in TIOUS:
            v = np.array([r["map"][f"{t:.1f}"] for r in results])
            cells.append(f"{v.mean():.1f}")
        for key in ("average_map", "cmap"):
            v = np.array([r[key] for r in results])
            cells.append(f"{v.mean():.1f} +- {v.std():.1f}" if len(v) > 1 else f"{v.mean():.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
