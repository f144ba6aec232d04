"""Training throughput at THUMOS14 sizes, per op backend: ``python -m mmsd_ext.train.throughput``.

A THUMOS14-like training set (200 videos, lengths log-normal with mean about 340 snippets,
clipped to 30..2600; 2048-d features; 20 classes; one or two labels per video), MMSD's model
(1024-d embeddings, dropout 0.6) and batches of 10 videos, with every loss term on (the
voting term from stored pseudo labels, as after the first refresh). For each backend it times
``--steps`` optimizer steps and reports the epoch time (20 steps), and separately the loss ops
alone (attention loss with ``topk_mil_pool`` and ``mmsd_distill_loss``, forward + backward)
on the same batches. Feature values are random: the work does not depend on them.

The timed steps run after an untimed pass over the same batches. Triton compiles a kernel
once for each new specialisation it meets (block sizes from the batch's length, and whether
lengths and strides are multiples of 16), and batches of other lengths meet new ones. Of the
four default batches, the first three met 6, 2 and 4 new ones (block sizes, and integer
arguments by multiple of 16 and equal to 1, counted per launch under the interpreter); the
timed pass after them met none. Over 240 epochs compiling is a one-off cost; timed, it would
pass for a step's time.
"""

import argparse
import statistics
import sys
import time

import numpy as np
import torch

import mmsd_ext

from .__main__ import MAX_THREADS
from .data import WTALCData
from .engine import Config, Dist, Trainer, UsageError, _process_environment, _resolve_device, check_backend
from .losses import attention_loss, distill_loss

TRAIN_VIDEOS = 200
MEAN_LENGTH = 340
NUM_CLASSES = 20
# --steps at most one epoch of the THUMOS14-like training set. Every step's 10 videos are made
# up front and held at once (2048-d float32 features, about 28 MB a step), so a step count in
# the thousands allocates tens of GB before anything is timed; 20 steps is already an epoch's
# worth of batch lengths for the median.
MAX_STEPS = TRAIN_VIDEOS // 10


def thumos_like(num_videos, seed=0, feature_dim=2048):
    rng = np.random.default_rng(seed)
    sigma = 0.8
    mu = np.log(MEAN_LENGTH) - sigma**2 / 2
    lengths = np.clip(rng.lognormal(mu, sigma, num_videos), 30, 2600).astype(int)
    classes = [f"c{i}" for i in range(NUM_CLASSES)]
    features = np.empty(num_videos, dtype=object)
    labels = np.empty(num_videos, dtype=object)
    segments = np.empty(num_videos, dtype=object)
    segment_labels = np.empty(num_videos, dtype=object)
    for i, T in enumerate(lengths):
        features[i] = rng.random((T, feature_dim), dtype=np.float32)
        names = [classes[c] for c in rng.choice(NUM_CLASSES, size=1 + int(rng.random() < 0.2), replace=False)]
        labels[i] = names
        segments[i] = [[1.0, 2.0] for _ in names]
        segment_labels[i] = names
    arrays = {
        "features": features,
        "labels_all": labels,
        "segments": segments,
        "labels": segment_labels,
        "classlist": np.asarray([c.encode() for c in classes]),
        "videoname": np.asarray([f"v{i}".encode() for i in range(num_videos)]),
        "subset": np.asarray([b"validation"] * (num_videos - 1) + [b"test"]),
        "duration": lengths / 1.5625,
    }
    return WTALCData.from_arrays(arrays, "ThumosLike"), lengths


def measure(backend, data, steps, threads, device):
    # main() has checked the backend on this device.
    config = Config(data_root="<memory>", epochs=240, device=str(device), backend=backend, threads=threads, seed=0)
    if threads:
        torch.set_num_threads(threads)
    trainer = Trainer(config, data, device, Dist(device.type), progress=False)
    trainer.echo = False
    # As after the first pseudo-label refresh: the voting term runs too.
    trainer.pseudo_labels = (torch.rand_like(trainer.pseudo_labels) > 0.7).float()
    trainer.refreshes_done = 1
    name = None if backend == "auto" else backend
    order = list(range(len(trainer.train_idx)))
    step_times, op_times = [], []
    batches = [order[step * 10 : (step + 1) * 10] for step in range(steps)]
    with mmsd_ext.use_backend(name or "auto"):
        # Untimed: allocator, caches and every kernel specialisation these batches need.
        for videos in batches:
            trainer.train_steps([videos])
        for videos in batches:
            _sync(device)
            start = time.perf_counter()
            trainer.train_steps([videos])
            _sync(device)
            step_times.append(time.perf_counter() - start)
            op_times.append(time_loss_ops(trainer, videos, device))
    return statistics.median(step_times), statistics.median(op_times)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loss_ops(trainer, videos, device):
    from .data import collate

    batch = collate(trainer.data, [trainer.train_idx[p] for p in videos], device)
    with torch.no_grad():
        outputs = trainer.model(batch["features"], batch["lengths"])
    cas = outputs["cas_logits"].detach().requires_grad_(True)
    _sync(device)
    start = time.perf_counter()
    loss = attention_loss(cas, batch["labels"], batch["lengths"], outputs["mask"]).sum()
    loss = loss + distill_loss(cas, trainer.model.streams, outputs["mask"])
    loss.backward()
    _sync(device)
    return time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mmsd_ext.train.throughput", description=__doc__.splitlines()[0])
    p.add_argument("--backends", nargs="+", default=["auto", "reference"], help="op backends to compare (default: auto reference)")
    p.add_argument("--steps", type=int, default=4, help=f"timed optimizer steps of 10 videos per backend, 1 to {MAX_STEPS} (default 4)")
    p.add_argument("--threads", type=int, default=0, help=f"CPU threads, up to {MAX_THREADS} (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    args = p.parse_args(argv)
    if not 1 <= args.steps <= MAX_STEPS:
        p.error(f"--steps: expected at least 1 and at most {MAX_STEPS} (one epoch), got {args.steps}")
    if not 0 <= args.threads <= MAX_THREADS:
        p.error(f"--threads: expected 0 (torch's) to {MAX_THREADS}, got {args.threads}")
    try:
        device = _resolve_device(args.device)
        for backend in args.backends:
            check_backend(backend, device, flag="--backends")
        _process_environment()  # torchrun's variables, before any video is made
    except UsageError as exc:
        p.error(str(exc))

    if args.threads:
        # Before the header, which reports the count the steps run with.
        torch.set_num_threads(args.threads)
    data, lengths = thumos_like(args.steps * 10 + 1)
    steps_per_epoch = TRAIN_VIDEOS // 10
    print(
        f"THUMOS14-like batches: {len(lengths) - 1} videos, lengths mean {lengths[:-1].mean():.0f}, max {lengths[:-1].max()}; "
        f"torch {torch.__version__}, device {_device_name(device)}; "
        f"auto resolves to: topk_mil_pool -> {_resolved('topk_mil_pool', device)}, "
        f"mmsd_distill_loss -> {_resolved('mmsd_distill_loss', device)}",
        file=sys.stderr,
    )
    rows = []
    for backend in args.backends:
        step, ops = measure(backend, data, args.steps, args.threads, device)
        rows.append((backend, step, ops))
        print(f"{backend}: {step * 1000:.0f} ms per step, loss ops {ops * 1000:.1f} ms", file=sys.stderr)
    base = dict((b, s) for b, s, _ in rows).get("reference")
    base_ops = dict((b, o) for b, _, o in rows).get("reference")
    print(
        "| backend | step (10 videos) | epoch (200 videos) | loss ops fwd+bwd per step | epoch speedup vs reference | loss-op speedup |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for backend, step, ops in rows:
        speed = f"{base / step:.2f}x" if base else "-"
        op_speed = f"{base_ops / ops:.2f}x" if base_ops else "-"
        print(f"| {backend} | {step * 1000:.0f} ms | {step * steps_per_epoch:.1f} s | {ops * 1000:.1f} ms | {speed} | {op_speed} |")
    return 0


def _device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu, {torch.get_num_threads()} threads"


def _resolved(op, device):
    """Which backend "auto" picks for ``op`` on ``device`` (from the op module's table)."""
    from mmsd_ext import _backend

    module, table = {"topk_mil_pool": (mmsd_ext.mil, "_IMPLS_SUPPORTED"), "mmsd_distill_loss": (mmsd_ext.distill, "_MMSD_SUPPORTED")}[
        op
    ]
    try:
        return _backend.resolve(op, "auto", device, supported=getattr(module, table))
    except (AttributeError, ValueError, RuntimeError):
        return "?"


if __name__ == "__main__":
    sys.exit(main())
