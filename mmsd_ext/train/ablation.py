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
import os
import sys
import time

import numpy as np
import torch

from mmsd_ext._backend import ENV_VAR

from .__main__ import MAX_EPOCHS, MAX_SEED, _int_in
from .data import DataError
from .engine import (
    SYNTHETIC_PRESET,
    TIOUS,
    Config,
    UsageError,
    _probe_writable,
    _remove_stale,
    _write_atomic,
    check_backend,
    run,
    tiou_key,
)

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
    seed = _int_in(0, MAX_SEED)
    p.add_argument("--seeds", type=seed, nargs="+", default=[1, 2, 3], help="training seeds, all different (default 1 2 3)")
    p.add_argument("--synthetic-seed", type=seed, default=0, help="seed of the synthetic dataset (default 0)")
    p.add_argument(
        "--epochs", type=_int_in(1, MAX_EPOCHS), default=SYNTHETIC_PRESET["epochs"], help=f"(default {SYNTHETIC_PRESET['epochs']})"
    )
    p.add_argument(
        "--variants",
        nargs="+",
        choices=list(range(len(VARIANTS))),
        type=int,
        default=list(range(len(VARIANTS))),
        help="indices into the variant list (default all)",
    )
    p.add_argument(
        "--backend",
        choices=("auto", "reference", "cpu", "triton"),
        help=f"mmsd_ext op backend (default: {ENV_VAR} where it is set, else auto)",
    )
    p.add_argument(
        "--output",
        default=None,
        help="also write the markdown table here, and the runs to OUTPUT.json (as each one finishes, so an interrupted "
        "ablation keeps them)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier --output table and its .json (the earlier table goes when this ablation's first run "
        "replaces the .json it belonged to)",
    )
    args = p.parse_args(argv)
    if args.output == "":
        p.error("--output: expected a file path, got an empty one")  # it wrote nothing, without a word
    repeated = sorted({s for s in args.seeds if args.seeds.count(s) > 1})
    if repeated:
        p.error(f"--seeds: {repeated[0]} is given twice; the spread over seeds needs different seeds")
    try:
        # Everything that can fail before the first run fails here, not after an hour of runs.
        flag = "--backend"
        if args.backend is None and os.environ.get(ENV_VAR):  # the ops' backend for the process
            args.backend, flag = os.environ[ENV_VAR], f"--backend (from {ENV_VAR})"
        args.backend = args.backend or "auto"
        check_backend(args.backend, torch.device("cpu"), device_flag=False, flag=flag)
        if args.output:
            _check_output(args.output, args.overwrite)
    except UsageError as exc:
        p.error(str(exc))
    try:
        rows, runs = _run_all(args)
    except (UsageError, DataError) as exc:
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kept = f"; the finished runs are in {args.output}.json" if args.output else ""
        print(f"{p.prog}: interrupted{kept}", file=sys.stderr)
        return 130

    table = format_markdown(rows, args)
    print(table)
    if args.output:
        _write_runs(args, runs)
        try:
            _write_atomic(args.output, lambda f: f.write(table + "\n"))
        except OSError as exc:
            print(f"{p.prog}: error: {args.output}: cannot write the table ({exc.strerror or exc}); it is printed above", file=sys.stderr)
            return 2
    return 0


def _check_output(path, overwrite):
    if os.path.isdir(path):
        raise UsageError(f"--output {path}: is a directory; name the markdown file to write")
    if os.path.isdir(path + ".json"):  # --overwrite would find it only when the first run's results are written
        raise UsageError(f"--output {path}: {path}.json is a directory, where the ablation writes its runs; name another file")
    clashes = [f for f in (path, path + ".json") if os.path.exists(f)]
    if clashes and not overwrite:
        verb, them = ("exist", "them") if len(clashes) > 1 else ("exists", "it")
        raise UsageError(f"--output {path}: {' and '.join(clashes)} already {verb}; pass --overwrite to replace {them}")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        _probe_writable(folder)
    except OSError as exc:
        raise UsageError(f"--output {path}: cannot write in {folder} ({exc.strerror or exc})") from None


def _write_runs(args, runs):
    try:
        _write_atomic(args.output + ".json", lambda f: json.dump({"args": vars(args), "runs": runs}, f, indent=2))
    except OSError as exc:
        raise UsageError(f"{args.output}.json: cannot write the runs ({exc.strerror or exc})") from None


def _run_all(args):
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
            if args.output:
                _write_runs(args, runs)
                if len(runs) == 1:
                    # An earlier table (--overwrite) summed the runs of the .json just replaced: it
                    # goes, so that an interrupted ablation never leaves it beside runs it does not describe.
                    _remove_stale(args.output, "the earlier table")
        rows[name] = results
    return rows, runs


def format_markdown(rows, args):
    heads = [tiou_key(t) for t in TIOUS] + ["AVG", "cmAP"]
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
            v = np.array([r["map"][tiou_key(t)] for r in results])
            cells.append(f"{v.mean():.1f}")
        for key in ("average_map", "cmap"):
            v = np.array([r[key] for r in results])
            cells.append(f"{v.mean():.1f} +- {v.std():.1f}" if len(v) > 1 else f"{v.mean():.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
