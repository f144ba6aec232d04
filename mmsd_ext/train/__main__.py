"""``python -m mmsd_ext.train`` / ``mmsd-train``: train and evaluate MMSD.

With no arguments it trains on the embedded synthetic dataset, evaluates, and prints the
mAP table. See ``--help`` for every flag; the defaults are MMSD's (THUMOS14) except where
the synthetic preset says otherwise. Runs under ``torchrun --nproc_per_node=N`` too.
"""

import argparse
import math
import os
import sys

from mmsd_ext._backend import ENV_VAR

from .data import FEATURE_RATES, DataError
from .engine import (
    EVAL_ONLY_CHANGEABLE,
    MAX_EMBED_DIM,
    MAX_EPOCHS,
    MAX_RATE,
    MAX_SEED,
    MAX_THREADS,
    MAX_TIOUS,
    SYNTHETIC_PRESET,
    Config,
    UsageError,
    load_checkpoint,
    resume_problem,
    run,
    tiou_problem,
)

S = argparse.SUPPRESS


def _reads_as(kind):
    """Name a flag's type function after the kind of value it reads: argparse's message for a
    value that does not parse names the function ("invalid int value: 'x'")."""

    def name(check):
        check.__name__ = kind
        return check

    return name


def _int_in(low, high):
    def check(text):
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text}")
        if value > high:
            raise argparse.ArgumentTypeError(f"expected an integer <= {high}, got {text}")
        return value

    return _reads_as("int")(check)


@_reads_as("int")
def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


@_reads_as("int")
def _non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


@_reads_as("float")
def _positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    if not value <= MAX_RATE:
        raise argparse.ArgumentTypeError(f"expected a number > 0 and <= {MAX_RATE:g}, got {text}")
    return value


@_reads_as("float")
def _non_negative_float(text):
    value = float(text)
    if not (math.isfinite(value) and 0 <= value <= MAX_RATE):
        raise argparse.ArgumentTypeError(f"expected a finite number in [0, {MAX_RATE:g}], got {text}")
    return value


@_reads_as("float")
def _fraction(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


@_reads_as("float")
def _dropout(text):
    value = float(text)
    if not 0 <= value < 1:  # 1 drops every unit: the loss never changes
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text}")
    return value


def _dataset_name(text):
    if not text:  # the dataset folder would be the data root itself
        raise argparse.ArgumentTypeError("expected a folder name under --data-root, got an empty one")
    if text in (".", "..") or any(sep and sep in text for sep in (os.sep, os.altsep)):
        # The files inside are named after it (NAME-I3D-JOINTFeatures.npy), and a path would leave --data-root.
        raise argparse.ArgumentTypeError(
            f"expected a folder name under --data-root, which also names its files (NAME-I3D-JOINTFeatures.npy), got {text!r}"
        )
    return text


def _tious(text):
    """--tiou: START:STOP:STEP (STOP included, as MMSD's 0.1:0.7:0.1) or T1,T2,...; sorted."""
    form = f"expected START:STOP:STEP or T1,T2,... with thresholds in (0, 1], got {text!r}"
    try:
        if ":" in text:
            parts = [float(p) for p in text.split(":")]
            if len(parts) != 3:
                raise ValueError
            start, stop, step = parts
            if not (0 < start <= stop <= 1 and 0 < step < math.inf):
                raise argparse.ArgumentTypeError(f"expected 0 < START <= STOP <= 1 and STEP > 0, got {text!r}")
            steps = (stop - start) / step + 1e-9  # the 1e-9: 0.5 + 9 * 0.05 reaches 0.95
            if not steps < MAX_TIOUS:  # also a step so small that the quotient is inf
                raise argparse.ArgumentTypeError(f"expected at most {MAX_TIOUS} thresholds, {text!r} makes more")
            # STOP included; a last value the 1e-9 let past STOP is STOP.
            values = [min(round(start + i * step, 10), stop) for i in range(math.floor(steps) + 1)]
        else:
            values = [float(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(form) from None
    problem = tiou_problem(values)
    if problem:
        raise argparse.ArgumentTypeError(f"{problem} (in {text!r})")
    return tuple(sorted(values))


def build_parser():
    d = Config()
    p = argparse.ArgumentParser(
        prog="mmsd-train",
        description="Train and evaluate MMSD (multi-modality self-distillation for weakly-supervised temporal action "
        "localization). Without --data-root: the embedded synthetic dataset.",
        argument_default=S,
    )
    g = p.add_argument_group("data")
    g.add_argument("--data-root", metavar="DIR", help="folder holding <dataset>/ in the W-TALC layout (default: synthetic data)")
    g.add_argument("--dataset", type=_dataset_name, help=f"dataset folder name (default {d.dataset})")
    g.add_argument(
        "--feature-type",
        choices=tuple(FEATURE_RATES),
        help="the features: file <dataset>-<TYPE>-JOINTFeatures.npy, ground truth seconds converted at 25/16 "
        f"snippets per second for I3D, 10/4 for UNT, as MMSD does (default {d.feature_type})",
    )
    g.add_argument(
        "--synthetic-seed", type=_int_in(0, MAX_SEED), metavar="N", help=f"seed of the synthetic dataset (default {d.synthetic_seed})"
    )

    g = p.add_argument_group(
        "training (defaults: MMSD's; synthetic preset: " + ", ".join(f"{k} {v}" for k, v in SYNTHETIC_PRESET.items()) + ")"
    )
    g.add_argument(
        "--epochs",
        type=_int_in(1, MAX_EPOCHS),
        help=f"(default {d.epochs}); with --resume, where the run now ends: its lr decay and pseudo-label "
        "refreshes stay at the epochs its first length gave them",
    )
    g.add_argument(
        "--batch-size", type=_positive_int, help=f"videos per optimizer step, split across processes (default {d.batch_size})"
    )
    g.add_argument("--lr", type=_positive_float, help=f"Adam learning rate (default {d.lr})")
    g.add_argument("--lr-decay", type=_positive_float, help=f"lr factor after --lr-decay-at (default {d.lr_decay})")
    g.add_argument("--lr-decay-at", type=_fraction, help="fraction of training after which lr decays (rounded to whole epochs, at least one; default 70/240)")
    g.add_argument("--weight-decay", type=_non_negative_float, help=f"Adam weight decay (default {d.weight_decay})")
    g.add_argument("--embed-dim", type=_int_in(1, MAX_EMBED_DIM), help=f"embedding size (default {d.embed_dim})")
    g.add_argument("--dropout", type=_dropout, help=f"in [0, 1) (default {d.dropout})")
    g.add_argument("--seed", type=_int_in(0, MAX_SEED), help=f"(default {d.seed})")
    g.add_argument(
        "--pseudo-threshold",
        type=_fraction,
        metavar="THETA",
        help=f"attention above it makes a foreground pseudo label (MMSD's theta, default {d.pseudo_threshold})",
    )
    g.add_argument(
        "--eval-every", type=_non_negative_int, metavar="N", help="also evaluate every N epochs (default 0: only at the end)"
    )
    g.add_argument(
        "--stop-after",
        type=_positive_int,
        metavar="N",
        help="stop after N epochs of this invocation (checkpoint kept; continue with --resume)",
    )

    g = p.add_argument_group("evaluation")
    g.add_argument(
        "--tiou",
        dest="tious",
        type=_tious,
        metavar="THRESHOLDS",
        help="tIoU thresholds of the detection mAP: START:STOP:STEP or T1,T2,... (default 0.1:0.7:0.1, MMSD's "
        "THUMOS14 protocol; ActivityNet's: 0.5:0.95:0.05)",
    )

    g = p.add_argument_group("ablations")
    g.add_argument("--no-distill", action="store_true", help="no multi-modality knowledge distillation")
    g.add_argument("--no-voting", action="store_true", help="no self-voting pseudo-label loss")
    g.add_argument(
        "--no-fused-stream",
        action="store_true",
        help="only the RGB and flow streams (distillation RGB<->flow, voting between the two)",
    )
    g.add_argument(
        "--single-stream", action="store_true", help="only the fused stream (so no distillation and no voting): the baseline"
    )

    g = p.add_argument_group("execution")
    g.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available; under torchrun cuda:LOCAL_RANK)")
    g.add_argument(
        "--threads", type=_int_in(0, MAX_THREADS), metavar="N", help="CPU threads per process, 0 for torch's default (default 0; synthetic preset: 1)"
    )
    g.add_argument(
        "--backend",
        choices=("auto", "reference", "cpu", "cuda", "triton"),
        help=f"mmsd_ext op backend (default: {ENV_VAR} where it is set, else auto)",
    )
    g.add_argument("--output-dir", metavar="DIR", help="checkpoint.pt, train.log, results.json (default: runs/mmsd-<data>-<time>/)")
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the files of an earlier run in --output-dir (each only when this run writes its own)",
    )
    g.add_argument(
        "--resume", metavar="CKPT", help="continue the run of this checkpoint (its folder is the output folder by default)"
    )
    g.add_argument(
        "--eval-only",
        action="store_true",
        help="evaluate --checkpoint without training (writes results.json only, and only to --output-dir)",
    )
    g.add_argument("--checkpoint", metavar="CKPT", help="the checkpoint for --eval-only")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument(
        "--quiet",
        action="store_true",
        help="print nothing but errors (results.json is still written, so with --eval-only it needs --output-dir)",
    )
    return p


def config_from_args(args, parser):
    """The run's Config: checkpoint settings (resume / eval-only), else preset and defaults, then flags."""
    given = dict(vars(args))
    flags = {
        k: given.pop(k)
        for k in list(given)
        if k in ("output_dir", "overwrite", "resume", "eval_only", "checkpoint", "stop_after", "no_progress", "quiet")
    }
    if given.pop("no_distill", False):
        given["distill"] = False
    if given.pop("no_voting", False):
        given["voting"] = False
    no_fused = given.pop("no_fused_stream", False)
    single = given.pop("single_stream", False)
    if no_fused and single:
        parser.error("--no-fused-stream and --single-stream contradict each other")
    if no_fused:
        given["streams"] = ("rgb", "flow")
    if single:
        given["streams"] = ("fused",)
    if given.get("data_root"):
        # Absolute in the saved settings, so that a run resumed from another folder finds its data.
        given["data_root"] = os.path.abspath(given["data_root"])

    # MMSD_EXT_BACKEND sets the ops' backend for a process: for this run it stands for --backend
    # where that is not given (recorded with the run's settings; an error says where it came from).
    if "backend" not in given and os.environ.get(ENV_VAR):
        given["backend"] = flags["backend_from_env"] = os.environ[ENV_VAR]

    if flags.get("resume") and flags.get("eval_only"):  # (first: the next check would ask for --checkpoint)
        parser.error("--resume and --eval-only exclude each other; to evaluate a checkpoint: --eval-only --checkpoint CKPT")
    if flags.get("eval_only") and not flags.get("checkpoint"):
        parser.error("--eval-only needs --checkpoint CKPT")
    if flags.get("checkpoint") and not flags.get("eval_only"):
        parser.error("--checkpoint is for --eval-only; to continue training use --resume CKPT")
    if flags.get("stop_after") and flags.get("eval_only"):
        parser.error("--stop-after has no meaning with --eval-only")
    if flags.get("quiet") and flags.get("eval_only") and not flags.get("output_dir"):
        # Eval-only writes results.json only to --output-dir: quiet, the result would be lost.
        parser.error(
            "--eval-only --quiet without --output-dir would print nothing and write nothing; drop --quiet or give --output-dir"
        )

    source = flags.get("resume") or flags.get("checkpoint")
    if source:
        state = load_checkpoint(source)
        saved = Config.from_dict(state["config"])
        base = saved.to_dict()
        if flags.get("resume"):
            # run() checks the same (and keeps the run's lr decay and refreshes where its first
            # length put them); here the error comes with the usage line.
            problem = resume_problem(given, saved, state.get("epoch", 0))
            if problem:
                parser.error(problem)
        else:
            # Evaluation: the model must match the checkpoint, the data may have moved, and how
            # it runs (device, backend, threads) is this machine's.
            for key in list(given):
                if key not in EVAL_ONLY_CHANGEABLE and given[key] != getattr(saved, key):
                    parser.error(f"--{key.replace('_', '-')}: --eval-only takes the model settings from the checkpoint")
        base.update(given)
        # Settings of the machine the checkpoint was made on, kept where not given again:
        # an error about them says where they came from (main).
        flags["inherited"] = {k: base[k] for k in ("device", "backend", "data_root") if k not in given}
        _check_data_flags(given, base["data_root"], parser, "the checkpoint's run")
        config = Config.from_dict(base)
    else:
        values = Config().to_dict()
        _check_data_flags(given, given.get("data_root"), parser)
        if given.get("data_root") is None:
            values.update(SYNTHETIC_PRESET)
        values.update(given)
        config = Config.from_dict(values)
    return config, flags


def _check_data_flags(given, data_root, parser, whose=None):
    """Refuse a data flag the run would ignore: --dataset (a folder under --data-root) for the
    synthetic dataset, --synthetic-seed for data read from --data-root. ``data_root``: the run's,
    ``whose``: where it came from, when not from the flags (a checkpoint)."""
    if data_root is None and "dataset" in given:
        if whose and "data_root" not in given:
            parser.error(
                f"--dataset names a folder under --data-root, and {whose} used the synthetic dataset (no --data-root); "
                "give --data-root too"
            )
        parser.error("--dataset names a folder under --data-root; without --data-root the synthetic dataset runs")
    if data_root is not None and "synthetic_seed" in given:
        source = f"{whose} read its data from {data_root}" if whose and "data_root" not in given else f"the data is read from {data_root}"
        parser.error(f"--synthetic-seed seeds the synthetic dataset, but {source}; drop --synthetic-seed")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    flags = {}
    try:
        config, flags = config_from_args(args, parser)
        result = run(
            config,
            output_dir=flags.get("output_dir"),
            overwrite=flags.get("overwrite", False),
            resume=flags.get("resume"),
            eval_only=flags.get("eval_only", False),
            checkpoint=flags.get("checkpoint"),
            stop_after=flags.get("stop_after"),
            progress=not flags.get("no_progress", False) and not os.environ.get("MMSD_EXT_NO_PROGRESS"),
            quiet=flags.get("quiet", False),
        )
    except (UsageError, DataError) as exc:
        message = str(exc)
        for key, value in (flags.get("inherited") or {}).items():
            flag = "--" + key.replace("_", "-")
            if message.startswith((f"{flag} ", f"{flag}:")):
                message += f" ({flag} {value} is the checkpoint's setting; give {flag} to run with another here)"
        if flags.get("backend_from_env") and message.startswith(("--backend ", "--backend:")):
            message += f" (--backend {flags['backend_from_env']} came from {ENV_VAR}; give --backend to run with another)"
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"{parser.prog}: interrupted; the output folder keeps the checkpoint of the last completed epoch "
            "(before the first, an earlier run's files stay as they were)",
            file=sys.stderr,
        )
        return 130
    del result  # rank 0 printed it and wrote results.json; other ranks have none
    return 0


if __name__ == "__main__":
    sys.exit(main())
