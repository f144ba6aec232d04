"""Training and evaluation of MMSD: the loop, pseudo labels, checkpoints, DDP, results.

``run(config)`` does what ``python -m mmsd_ext.train`` does. Batching: an optimizer step
takes ``batch_size`` videos (MMSD: 10, accumulated one video at a time); here they go
through the model as one padded batch (split across processes under DDP), and the loss is
the sum of the videos' losses, as MMSD's accumulated gradient is.
"""

import contextlib
import dataclasses
import io
import json
import math
import os
import re
import sys
import tempfile
import time
import warnings
import zipfile

import numpy as np
import torch
import torch.distributed as dist

import mmsd_ext

from . import data as data_mod
from .losses import PSEUDO_THRESHOLD, mmsd_loss, refresh_pseudo_labels
from .model import MMSD, STREAMS, fuse

# tIoU thresholds of the evaluation: MMSD's (THUMOS14) by default; --tiou sets others (ActivityNet's
# usual 0.5:0.95:0.05, say). At most MAX_TIOUS: the matching keeps a [proposals, thresholds] table.
TIOUS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
MAX_TIOUS = 100
# The stream sets the flags make: all three, --no-fused-stream, --single-stream. The losses
# have no distillation for another set with two streams, (rgb, fused) say.
STREAM_SETS = (STREAMS, ("rgb", "flow"), ("fused",))
# Bounds of the settings, on the flags (argparse would otherwise pass them on to code that fails
# with a traceback) and on a checkpoint's saved settings (one edited by hand):
# - seeds: torch, numpy and the per-epoch seeds take 32-bit unsigned seeds at most;
# - threads: torch.set_num_threads overflows on huge counts, and more threads than any machine
#   has cores only slows a run down;
# - epochs: the schedules divide epoch counts as floats (above about 1e308 they overflow), and a
#   million epochs is far beyond any WTAL run;
# - lr, lr decay, weight decay: Adam passes them to float32 kernels, which refuse values above
#   3.4e38 with a RuntimeError; above 1000 every run diverges anyway (Adam moves each weight by
#   about lr per step), and divergence is stopped with a message (engine: "diverged");
# - embedding size: the model's layers grow with it (and Adam keeps two more copies); 8192 is 8x
#   MMSD's 1024, and much larger sizes can run out of memory part-way, in a traceback;
# - pseudo-label refreshes (no flag; MMSD: 6): a run refreshes at most once per epoch, so more
#   than MAX_EPOCHS change nothing, and the schedule takes time linear in the count (1e12 hung).
MAX_SEED = 2**32 - 1
MAX_EMBED_DIM = 8192
MAX_THREADS = 4096
MAX_EPOCHS = 10**6
MAX_RATE = 1e3
# Each bounded setting's (low, high), both included; lr and lr_decay must also be > 0, and the
# dropout flag also refuses 1 (_config_problem).
LIMITS = {
    "seed": (0, MAX_SEED),
    "synthetic_seed": (0, MAX_SEED),
    "threads": (0, MAX_THREADS),
    "epochs": (1, MAX_EPOCHS),
    "schedule_epochs": (0, MAX_EPOCHS),
    "embed_dim": (1, MAX_EMBED_DIM),
    "pseudo_refreshes": (0, MAX_EPOCHS),
    "lr": (0, MAX_RATE),
    "lr_decay": (0, MAX_RATE),
    "weight_decay": (0, MAX_RATE),
    "lr_decay_at": (0, 1),
    "pseudo_threshold": (0, 1),
    "dropout": (0, 1),
}
CHECKPOINT = "checkpoint.pt"
RESULTS = "results.json"
LOG = "train.log"
CHECKPOINT_FORMAT = "mmsd_ext.train/1"


@dataclasses.dataclass
class Config:
    """Every setting of a run. Defaults are MMSD's for THUMOS14 (LeonHLJ/MMSD train_options.py);
    ``SYNTHETIC_PRESET`` replaces some of them when no --data-root is given."""

    data_root: str = None
    dataset: str = "Thumos14reduced"
    feature_type: str = "I3D"  # the features file <dataset>-<type>-JOINTFeatures.npy and its snippets per second
    synthetic_seed: int = 0
    epochs: int = 240
    # The epochs the lr decay and the pseudo-label refreshes are placed in; 0: ``epochs``. A run
    # resumed with another --epochs keeps its first length here, so that a longer (or shorter)
    # run does not move, after the fact, a decay or a refresh the run has already passed.
    schedule_epochs: int = 0
    batch_size: int = 10  # videos per optimizer step (MMSD accumulates 10 videos)
    lr: float = 5e-5
    lr_decay: float = 0.2  # lr x 0.2 ...
    lr_decay_at: float = 70 / 240  # ... from this fraction of training on (MMSD: epoch 70 of 240)
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 1e-3
    embed_dim: int = 1024
    dropout: float = 0.6
    scale: float = 20.0
    seed: int = 1
    streams: tuple = STREAMS
    distill: bool = True
    voting: bool = True
    pseudo_refreshes: int = 6  # MMSD: every 40 of 240 epochs
    pseudo_threshold: float = PSEUDO_THRESHOLD  # MMSD's theta: attention above it is a foreground label
    eval_every: int = 0  # 0: evaluate once, after training
    eval_batch_size: int = 16
    class_threshold: float = 0.2
    tious: tuple = TIOUS  # tIoU thresholds of the detection mAP
    device: str = "auto"
    backend: str = "auto"
    threads: int = 0  # CPU threads per process; 0: torch's default

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["streams"] = list(self.streams)
        d["tious"] = list(self.tious)
        return d

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        for key in ("streams", "tious"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


# The embedded synthetic set (256-d RGB + 256-d flow, 8 classes, 160 training videos) trains in
# a minute or two on 2 cores with these, measured on the shared 2-core machine:
# - batch_size 2 and lr 1e-3: steps, not epochs, are what it needs (10 epochs of 10-video steps
#   at lr 1e-3: 18.8 avg mAP without voting; of 2-video steps: 37.3; MMSD's 5e-5 learns
#   nothing in a few minutes);
# - embed_dim 256 (features are 256-d per modality; dropout 0.6 on 64-d ones lost the signal);
# - threads 1: its matrices are too small to gain from two, and on a shared machine two OpenMP
#   threads wait on each other (1 thread: 3.7-4.1 s per epoch, 2 threads: 14-38 s);
# - pseudo_threshold 0.05 instead of MMSD's 0.55: here the RGB and flow streams' attention is
#   still below 0.55 on 98-99.5% of foreground snippets at the first refresh, so every pseudo
#   label is background, voting drives the attention to zero everywhere and the run ends at
#   avg mAP 18.6; with 0.05 the first refresh labels 13-19% foreground (about 35% is) and the
#   run reaches 85 (the ablation table has both rows).
SYNTHETIC_PRESET = {"epochs": 10, "batch_size": 2, "lr": 1e-3, "embed_dim": 256, "threads": 1, "pseudo_threshold": 0.05}

# Settings a resumed run must keep (the model, the data and the objective). --data-root may
# change (the data moved, or a relative path from another folder): the checkpoint's classes and
# training videos are checked against the data found there.
FROZEN_ON_RESUME = (
    "dataset",
    "feature_type",
    "synthetic_seed",
    "batch_size",
    "lr",
    "lr_decay",
    "lr_decay_at",
    "beta1",
    "beta2",
    "weight_decay",
    "embed_dim",
    "dropout",
    "scale",
    "seed",
    "streams",
    "distill",
    "voting",
    "pseudo_refreshes",
    "pseudo_threshold",
)

# Flags an evaluation of a checkpoint (--eval-only) may give: where the data is, and how this
# machine runs it; the command refuses the others. run(eval_only=True) refuses a Config whose
# EVAL_ONLY_KEPT settings (the model and how it is evaluated) differ from the checkpoint's; the
# training settings it holds change nothing there.
EVAL_ONLY_CHANGEABLE = ("data_root", "dataset", "synthetic_seed", "device", "backend", "threads", "tious")
EVAL_ONLY_KEPT = ("feature_type", "embed_dim", "scale", "streams", "class_threshold")


class UsageError(ValueError):
    """A bad combination of settings or paths (reported without a traceback)."""


def resume_problem(values, saved, done):
    """Why settings ``values`` (a dict of some or all Config fields) cannot continue a run saved
    with Config ``saved`` after ``done`` epochs (a message naming the flags), or None. The
    command checks the flags it was given, ``run(resume=...)`` its whole Config."""
    epochs = values.get("epochs")
    if epochs is not None and epochs < done:
        return (
            f"--epochs {epochs}: the resumed run has already trained {done} epochs; give --epochs >= {done} "
            "(or evaluate it with --eval-only --checkpoint)"
        )
    changed = [key for key in FROZEN_ON_RESUME if key in values and _normalised(values[key]) != _normalised(getattr(saved, key))]
    if not changed:
        return None
    used = "; ".join(f"{_flag_of(key)}: the resumed run used {_setting_shown(key, getattr(saved, key))}" for key in changed)
    return (
        f"{used}; a resumed run keeps its settings "
        "(only --epochs, --data-root, --device, --backend, --eval-every, --tiou, --threads change)"
    )


def _normalised(value):
    return tuple(value) if isinstance(value, list) else value


def _setting_shown(key, value):
    # A switch's flag names the off state (--no-voting): "True" alone would read as that flag's.
    return f"{key} = {value!r}" if isinstance(value, bool) else repr(value)


def _flag_of(key):
    """The flag that sets Config field ``key`` (the field itself where no flag does)."""
    if key in ("beta1", "beta2", "scale"):
        return f"the setting {key}"
    return {"streams": "--no-fused-stream/--single-stream", "distill": "--no-distill", "voting": "--no-voting"}.get(
        key, "--" + key.replace("_", "-")
    )


def tiou_problem(tious):
    """What is wrong with a sequence of tIoU thresholds (as a phrase), or None: it must hold 1 to
    MAX_TIOUS distinct numbers in (0, 1] (results.json keys the mAP by threshold)."""
    if not isinstance(tious, (list, tuple)) or not tious:
        return "expected at least one threshold"
    if not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in tious):
        return f"expected numbers, got {list(tious)!r}"
    if len(tious) > MAX_TIOUS:
        return f"expected at most {MAX_TIOUS} thresholds, got {len(tious)}"
    bad = [t for t in tious if not 0 < t <= 1]
    if bad:
        return f"expected thresholds in (0, 1], got {bad[0]!r}"
    keys = [tiou_key(t) for t in tious]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        return f"threshold {repeated[0]} given twice"
    return None


def tiou_key(t):
    """The key of a threshold in results.json and the header of the table: 0.1 -> "0.1" (ten
    significant digits, so 0.1 + 0.2 -> "0.3" as well)."""
    return f"{float(t):.10g}"


# -- schedules ---------------------------------------------------------------------------------


def refresh_epochs(epochs, refreshes):
    """Epoch counts after which the pseudo labels are regenerated: MMSD's 40, 80, ..., 200 of 240,
    scaled to ``epochs``. (MMSD also refreshes after the last epoch, which changes nothing.)"""
    marks = {max(1, round(epochs * j / refreshes)) for j in range(1, refreshes + 1)}
    return sorted(m for m in marks if m < epochs)


def schedule_length(config):
    """The epochs the lr decay and the refreshes are placed in (``schedule_epochs``, else ``epochs``)."""
    return config.schedule_epochs or config.epochs


def run_refresh_epochs(config):
    """The refreshes of ``config``'s run: those of its schedule that come before its last epoch."""
    return [m for m in refresh_epochs(schedule_length(config), config.pseudo_refreshes) if m < config.epochs]


def learning_rate(config, epoch):
    """MMSD's step decay: lr until ``lr_decay_at`` of training (epoch 70 of 240), then x0.2.
    The decay epoch is rounded, and at least 1: the first epoch trains at ``lr`` (a run of one
    or two epochs had taken all of them at the decayed lr, its ``lr`` never used)."""
    decay_epoch = max(1, round(schedule_length(config) * config.lr_decay_at))
    return config.lr * (config.lr_decay if epoch >= decay_epoch else 1.0)


def _derived_seed(*parts):
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


# -- distributed -------------------------------------------------------------------------------


class Dist:
    """The process group, or a single process."""

    def __init__(self, device_kind):
        # Under torchrun (which sets RANK), even with one process, so that the launch path is
        # the same whatever the number of processes.
        self.active = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        self.world, self.rank, self.local_rank = _process_environment()
        self.owns_group = False
        self.nccl = self.active and device_kind == "cuda"
        if self.active and not dist.is_initialized():
            if self.nccl:
                # Each process drives its own GPU; NCCL's communicator must know which.
                visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
                if visible == 0:
                    raise UsageError("--device: no CUDA device is visible to torch; give --device cpu")
                if self.local_rank >= visible:
                    raise UsageError(
                        f"--device: process {self.local_rank} of this node has no GPU of its own ({visible} CUDA "
                        f"device(s) visible); start at most {visible} processes per node, or give --device cpu"
                    )
                torch.cuda.set_device(self.local_rank)
            _check_rendezvous_environment()
            dist.init_process_group("nccl" if self.nccl else "gloo")
            self.owns_group = True

    @property
    def main(self):
        return self.rank == 0

    def all_reduce(self, tensor):
        if self.active:
            dist.all_reduce(tensor)
        return tensor

    def agree(self, error):
        """Raise on every process if rank 0 met ``error`` (an exception or None), so that no
        process waits in a collective the failed one never reaches. Also a barrier."""
        if self.active:
            device = torch.device("cuda", self.local_rank) if self.nccl else torch.device("cpu")
            flag = torch.tensor([1 if error is not None else 0], device=device)
            dist.broadcast(flag, src=0)
            if int(flag) and error is None:
                error = UsageError("rank 0 stopped with an error (see its message)")
        if error is not None:
            raise error

    def close(self):
        if self.owns_group:
            dist.destroy_process_group()
            # A gloo worker thread releases each collective's work after the caller's wait has
            # returned, and a tensor made in Python needs the GIL to be released. The main thread
            # keeps the GIL to the end, so that thread could still be waiting for it when the
            # interpreter shuts down, and it then aborts the process ("terminate called without
            # an active exception"; gdb: ~AsyncBroadcastWork -> decref_pyobject -> take_gil
            # during Py_FinalizeEx; 4 in 30 runs here, and destroy_process_group leaves gloo's
            # threads running). Giving up the GIL for a moment lets it finish first.
            time.sleep(0.05)


# What torchrun sets for each process, and env:// (init_process_group's default) reads.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _process_environment():
    """(world size, rank, local rank) from torchrun's environment variables, or (1, 0, 0) for a
    single process; a UsageError naming a variable that is missing or malformed, where int()
    raised a traceback."""
    env = os.environ
    present = [name for name in ("RANK", "WORLD_SIZE") if name in env]
    if len(present) == 1:
        missing = "WORLD_SIZE" if present[0] == "RANK" else "RANK"
        raise UsageError(
            f"environment variable {missing} is not set, but {present[0]} is ({env[present[0]]!r}): a distributed run "
            f"needs both (torchrun sets them); set {missing} too, or unset {present[0]} to run one process"
        )
    if not present:
        return 1, 0, 0

    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0, world - 1)
    # Set by torchrun; a script per rank may leave it out.
    local_rank = _env_int("LOCAL_RANK", 0) if "LOCAL_RANK" in env else 0
    return world, rank, local_rank


def _check_rendezvous_environment():
    """What init_process_group's env:// rendezvous reads besides the ranks, checked first: it
    raises a traceback for a missing MASTER_ADDR or a malformed MASTER_PORT."""
    if not os.environ.get("MASTER_ADDR"):
        raise UsageError(
            "environment variable MASTER_ADDR is not set; a distributed run (RANK and WORLD_SIZE are set) needs "
            "MASTER_ADDR and MASTER_PORT (torchrun sets them), or unset RANK and WORLD_SIZE to run one process"
        )
    if "MASTER_PORT" not in os.environ:
        raise UsageError("environment variable MASTER_PORT is not set; a distributed run (RANK and WORLD_SIZE are set) needs it")
    _env_int("MASTER_PORT", 1, 65535)


def _env_int(name, low, high=None):
    """The integer in environment variable ``name`` (set), in [low, high], or a UsageError."""
    text = os.environ[name]
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        bound = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise UsageError(f"environment variable {name}: expected {bound}, got {text!r}")
    return value


def _resolve_device(name, ddp=None):
    """The torch.device of --device ``name`` for this process (``ddp``: its Dist; None for a single process)."""
    active, nccl, local_rank = (ddp.active, ddp.nccl, ddp.local_rank) if ddp is not None else (False, False, 0)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's message lists some twenty device types this program cannot run on
        raise UsageError(f"--device: expected cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA device is visible to torch")
        if nccl and device.index not in (None, local_rank):
            raise UsageError(
                f"--device {name}: under torchrun each process uses the GPU of its local rank (here cuda:"
                f"{local_rank}); give --device cuda"
            )
        if device.index is None:
            device = torch.device("cuda", local_rank if active else torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu" or device.index not in (None, 0):  # torch reads cpu:1 as the CPU
        raise UsageError(f"--device: expected cpu, cuda or cuda:N, got {name!r}")
    return device


def check_backend(backend, device, device_flag=True, flag="--backend"):
    """Fail early, with the op's own explanation, if the ops cannot run on ``backend`` here
    (``device_flag``: the program has a --device flag to suggest; ``flag``: the flag that gave it)."""
    # ("auto" asks the ops for the automatic choice, as the run's use_backend("auto") block does.)
    scores = torch.rand(1, 8, 3, device=device)
    try:
        mmsd_ext.topk_mil_pool(scores, 1, backend=backend)
        mmsd_ext.mmsd_distill_loss(scores, scores, scores, backend=backend)
        mmsd_ext.snippet_distill_loss(scores, scores, backend=backend)
        mmsd_ext.temporal_nms(torch.tensor([[0.0, 1.0]], device=device), torch.ones(1, device=device), 0.5, backend=backend)
    except (ValueError, RuntimeError) as exc:
        gpu_only = device.type == "cpu" and backend in ("cuda", "triton")
        hint = "; give --device cuda to run on a GPU" if gpu_only and device_flag else ""
        raise UsageError(f"{flag} {backend}: {exc}{hint}") from None


# -- data --------------------------------------------------------------------------------------


def load_data(config, feature_type_kept=False):
    """The data of ``config`` (``feature_type_kept``: its feature type is a checkpoint's)."""
    if config.data_root is None:
        from .synthetic import synthetic_dataset

        if config.feature_type != "I3D":
            raise UsageError(
                f"--feature-type {config.feature_type}: the synthetic dataset's features stand for I3D ones; "
                "give --data-root for features of another type"
            )
        return synthetic_dataset(config.synthetic_seed)
    return data_mod.load_wtalc(config.data_root, config.dataset, config.feature_type, feature_type_kept=feature_type_kept)


def build_model(config, data):
    torch.manual_seed(config.seed)
    return MMSD(
        data.num_classes,
        modality_dim=data.feature_dim // 2,
        embed_dim=config.embed_dim,
        dropout=config.dropout,
        scale=config.scale,
        streams=config.streams,
    )


def _length_batches(data, positions, indices, batch_size):
    """Position batches of similar lengths (less padding), for inference."""
    order = sorted(positions, key=lambda p: data.features[indices[p]].shape[0])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


# -- the run -----------------------------------------------------------------------------------


class Trainer:
    """State of one run: model, optimizer, pseudo labels, progress."""

    def __init__(self, config, data, device, ddp, *, output_dir=None, progress=True, log_file=None, training=True):
        """``training=False``: for evaluation only, which needs no training split (a data folder
        may hold the test split alone) and no pseudo labels."""
        self.config = config
        self.data = data
        self.device = device
        self.ddp = ddp
        self.output_dir = output_dir
        self.progress = progress and ddp.main
        self.log_file = log_file
        # True: this run replaces an earlier run's train.log (--overwrite). That log goes with
        # the earlier checkpoint: this run's lines wait in pending_log until its first checkpoint
        # has replaced that one, so a run that stops before (diverged, interrupted, out of
        # memory: said on stderr) leaves the earlier run's three files as they were.
        self.replace_log = False
        self.pending_log = []
        # Whether the first checkpoint written has removed an earlier results.json.
        self.results_cleared = False
        # Where the run is, for an error message: "in epoch N", "in the evaluation".
        self.stage = "before training"
        self.echo = True
        self.train_idx = data.indices("train") if training else []
        self.test_idx = data.indices("test")
        try:
            self.model = build_model(config, data).to(device)
        except (RuntimeError, ValueError, MemoryError) as exc:  # e.g. an --embed-dim too large for memory
            raise UsageError(
                f"--embed-dim {config.embed_dim}: cannot build the model for {data.feature_dim}-d features and "
                f"{data.num_classes} classes ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]})"
            ) from None
        self.net = self.model
        if ddp.active:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        try:
            self.optimizer = torch.optim.Adam(
                self.model.parameters(), lr=config.lr, betas=(config.beta1, config.beta2), weight_decay=config.weight_decay
            )
        except ValueError as exc:
            raise UsageError(f"--lr {config.lr}, --weight-decay {config.weight_decay}: Adam refuses them ({exc})") from None
        S = len(self.model.streams)
        t_max = max((data.features[i].shape[0] for i in self.train_idx), default=0)
        self.pseudo_labels = torch.zeros(S, len(self.train_idx), t_max, device=device)
        self.pseudo_conf = torch.zeros(S, len(self.train_idx), t_max, device=device)
        self.refreshes_done = 0
        self.epoch = 0  # epochs completed
        self.history = []

    @property
    def voting_active(self):
        return self.config.voting and len(self.model.streams) > 1 and self.refreshes_done > 0

    def log(self, message, echo=True):
        if not self.ddp.main:
            return
        if self.echo and echo:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stdout)
        if self.log_file:
            if self.replace_log:
                self.pending_log.append(message)
                return
            try:
                with open(self.log_file, "a") as f:
                    f.write(message + "\n")
            except OSError as exc:
                raise UsageError(f"{self.log_file}: cannot write the log ({exc.strerror or exc})") from None

    # -- training --------------------------------------------------------------------------

    def train(self, stop_after=None):
        from tqdm import tqdm

        config = self.config
        refresh_at = set(run_refresh_epochs(config))
        first = self.epoch
        last = config.epochs if stop_after is None else min(config.epochs, first + stop_after)
        bar = tqdm(
            range(first, last), desc="train", unit="epoch", disable=not self.progress, initial=0, total=last - first, file=sys.stderr
        )
        for epoch in bar:
            self.stage = f"in epoch {epoch + 1}"
            start = time.perf_counter()
            parts = self.train_epoch(epoch)
            self.check_finite(epoch, parts)
            refreshed = None
            if config.voting and len(self.model.streams) > 1 and epoch + 1 in refresh_at:
                refreshed = self.refresh_pseudo_labels()
            self.epoch = epoch + 1
            record = {"epoch": self.epoch, "lr": learning_rate(config, epoch), "time_s": round(time.perf_counter() - start, 3)}
            record.update({k: round(v, 6) for k, v in parts.items()})
            record["pseudo_refreshes"] = self.refreshes_done
            if config.eval_every and self.epoch % config.eval_every == 0 and self.epoch < config.epochs:
                result = self.evaluate(desc=f"eval@{self.epoch}")
                if result is not None:
                    record["average_map"] = round(result["average_map"], 4)
                    record["cmap"] = round(result["cmap"], 4)
            self.history.append(record)
            bar.set_postfix(loss=f"{parts['total']:.3f}", lr=f"{record['lr']:.1e}")
            with self.together():
                # The epoch's lines, then its checkpoint (lines written after the checkpoint would
                # be lost to an interrupt between the two). A checkpoint that cannot be written
                # (a full disk) is said right under them: a --resume trains that epoch again and
                # logs it a second time, after its "loaded ... (epoch N)" line.
                if refreshed is not None:
                    self.log(refreshed)
                self.log("epoch " + json.dumps(record))
                try:
                    self.save_checkpoint()
                except UsageError as exc:
                    with contextlib.suppress(UsageError):  # the log may be on the same full disk
                        self.log(f"stopped: {exc} (epoch {self.epoch} above is not in the checkpoint; "
                                 "--resume trains it again)", echo=False)
                    raise
        bar.close()

    @contextlib.contextmanager
    def together(self):
        """Work only rank 0 does and can fail (writing files, evaluating): every rank leaves it
        together, and where rank 0 raised, every rank raises (the others a UsageError saying so).
        Otherwise the other ranks go on to their next collective: torchrun ends them; without
        it (srun, a script per rank) gloo fails there with "Connection closed by peer", and
        NCCL may wait for its timeout."""
        error = None
        try:
            yield
        except Exception as exc:  # raised again by agree, on every rank
            error = exc
        self.ddp.agree(error)

    def check_finite(self, epoch, parts):
        """Stop a diverged run before its NaN weights reach the checkpoint or train.log."""
        params = [p.detach() for p in self.model.parameters()]
        finite = all(math.isfinite(v) for v in parts.values()) and bool(
            torch.stack([torch.isfinite(p).all() for p in params]).all()
        )
        if finite and not getattr(self, "overflowed", False):
            return
        kept = ""
        if self.output_dir:
            path = os.path.join(self.output_dir, CHECKPOINT)
            kept = f"; {path} was not replaced" if os.path.exists(path) else "; no checkpoint was written"
        if finite:
            # Finite but dead: every cosine 0, the same scores everywhere, nothing to learn.
            message = (
                f"the model's embeddings overflowed float32 in epoch {epoch + 1} "
                f"({_overflow_cause(self.data, self.train_idx)}){kept}; scale the features down, or if they are of ordinary size, try a smaller --lr"
            )
            self.log("stopped: " + message, echo=False)
            raise UsageError(message)
        bad = [f"{k} {v}" for k, v in sorted(parts.items()) if not math.isfinite(v)]
        what = f"loss {parts['total']}" if not math.isfinite(parts["total"]) else ", ".join(bad) or "weights hold NaN or inf"
        message = (
            f"training diverged in epoch {epoch + 1} ({what} at lr {learning_rate(self.config, epoch):g}){kept}; "
            "try a smaller --lr"
        )
        self.log("stopped: " + message, echo=False)
        raise UsageError(message)

    def train_epoch(self, epoch):
        config = self.config
        lr = learning_rate(config, epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # Stateless per-epoch seeds: the shuffle is the same on every rank, dropout differs per
        # rank, and a resumed run draws exactly what the uninterrupted run drew.
        torch.manual_seed(_derived_seed(config.seed, epoch, self.ddp.rank, 1))
        order = torch.randperm(
            len(self.train_idx), generator=torch.Generator().manual_seed(_derived_seed(config.seed, epoch, 0))
        ).tolist()
        steps = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
        totals = self.train_steps(steps)
        # Whether a step's embeddings overflowed (summed over steps and processes; see check_finite).
        self.overflowed = totals.pop("norm_overflow", 0.0) > 0
        # Per video, as MMSD prints its losses.
        return {k: v / len(order) for k, v in totals.items()}

    def train_steps(self, steps):
        """One optimizer step per list of training positions; returns the summed losses."""
        ddp = self.ddp
        self.net.train()
        totals = {}
        for chunk in steps:
            mine = chunk[ddp.rank :: ddp.world]
            weight = 1.0
            if not mine:  # a short last step: keep this rank in the collective with a null loss
                mine, weight = chunk[:1], 0.0
            batch = data_mod.collate(self.data, [self.train_idx[p] for p in mine], self.device)
            T = batch["features"].shape[1]
            # This process's share of the step's distillation mean (see mmsd_loss).
            snippets = {p: self.data.features[self.train_idx[p]].shape[0] for p in chunk}
            distill_scale = len(chunk) * sum(snippets[p] for p in mine) / sum(snippets.values())
            outputs = self.net(batch["features"], batch["lengths"])
            stored = self.pseudo_labels[:, torch.tensor(mine, device=self.device), :T] if self.voting_active else None
            loss, parts = mmsd_loss(
                outputs,
                batch["labels"],
                batch["lengths"],
                self.model.streams,
                stored_labels=stored,
                distill=self.config.distill,
                distill_scale=distill_scale,
            )
            # DDP averages gradients over ranks; scaling by the world size makes the step's
            # gradient the sum over all of its videos, as in MMSD.
            (loss * (weight * ddp.world)).backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            # Summed on the device: no host synchronisation per step. "attention" (the mean
            # class-agnostic attention over the streams) shows whether it sinks below the
            # pseudo-label threshold.
            attention = outputs["attention"].detach().sum((0, 2)).sum() / (len(self.model.streams) * batch["lengths"].sum())
            # "norm_overflow": steps whose embeddings overflowed (see check_finite).
            for name, value in [("total", loss.detach()), ("attention", attention * len(mine)),
                                ("norm_overflow", outputs["norm_overflow"])] + list(parts.items()):
                totals[name] = totals.get(name, 0.0) + value.double() * weight
        names = sorted(totals)
        packed = ddp.all_reduce(torch.stack([totals[n] for n in names]))
        return dict(zip(names, packed.tolist()))

    @torch.no_grad()
    def refresh_pseudo_labels(self):
        """Every training video through the model in eval mode; the rank's share, then summed.
        Returns the log line that says how much is foreground (for rank 0 to log)."""
        self.model.eval()
        ddp = self.ddp
        positions = list(range(len(self.train_idx)))[ddp.rank :: ddp.world]
        new_labels = torch.zeros_like(self.pseudo_labels)
        new_conf = torch.zeros_like(self.pseudo_conf)
        for chunk in _length_batches(self.data, positions, self.train_idx, self.config.eval_batch_size):
            batch = data_mod.collate(self.data, [self.train_idx[p] for p in chunk], self.device)
            T = batch["features"].shape[1]
            rows = torch.tensor(chunk, device=self.device)
            outputs = self.model(batch["features"], batch["lengths"])
            labels, conf = refresh_pseudo_labels(
                outputs,
                batch["labels"],
                self.pseudo_labels[:, rows, :T],
                self.pseudo_conf[:, rows, :T],
                threshold=self.config.pseudo_threshold,
            )
            new_labels[:, rows, :T] = labels
            new_conf[:, rows, :T] = conf
        if ddp.active:
            ddp.all_reduce(new_labels)
            ddp.all_reduce(new_conf)
        self.pseudo_labels, self.pseudo_conf = new_labels, new_conf
        self.refreshes_done += 1
        self.model.train()
        # The share of foreground pseudo labels per stream: near 0 means the attention has
        # sunk below the 0.55 threshold everywhere and voting only pushes it further down.
        lengths = torch.tensor([self.data.features[i].shape[0] for i in self.train_idx], device=self.device)
        valid = torch.arange(new_labels.shape[2], device=self.device)[None, :] < lengths[:, None]
        share = (new_labels * valid).sum((1, 2)) / valid.sum()
        foreground = dict(zip(self.model.streams, [round(x, 4) for x in share.tolist()]))
        return "pseudo labels " + json.dumps({"refresh": self.refreshes_done, "foreground": foreground})

    # -- evaluation ------------------------------------------------------------------------

    def evaluate(self, desc="eval"):
        """Rank 0 evaluates on the test split; other ranks wait. Returns the results dict (rank 0)."""
        result = None
        self.stage = f"in the evaluation after epoch {self.epoch}"
        with self.together():
            if self.ddp.main:
                result = evaluate(self.model, self.data, self.test_idx, self.device, self.config, progress=self.progress, desc=desc)
        return result

    # -- checkpoints -----------------------------------------------------------------------

    def state(self):
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "pseudo_labels": self.pseudo_labels.cpu(),
            "pseudo_conf": self.pseudo_conf.cpu(),
            "refreshes_done": self.refreshes_done,
            "history": self.history,
            # What the model and the pseudo labels belong to, checked when the run is loaded.
            "classes": list(self.data.classes),
            "train_videos": [self.data.videos[i] for i in self.train_idx],
            # Which subsets were trained and tested on: a folder holding ActivityNet's test
            # split ("validation") alone cannot say so itself (--eval-only).
            "splits": list(self.data.split_names()),
            "torch": str(torch.__version__),
            "mmsd_ext": mmsd_ext.__version__,
        }

    def save_checkpoint(self):
        if not (self.ddp.main and self.output_dir):
            return
        path = os.path.join(self.output_dir, CHECKPOINT)
        # Serialised in memory first, then written by _write_atomic: a failed write (a full disk,
        # a folder made read-only) is then an OSError that says why, not torch's RuntimeError.
        buffer = io.BytesIO()
        torch.save(self.state(), buffer)
        try:
            # Atomic: an interrupted save never leaves a broken checkpoint.
            _write_atomic(path, lambda f: f.write(buffer.getbuffer()), binary=True)
        except OSError as exc:
            kept = "; the previous one is kept" if os.path.exists(path) else ""
            raise UsageError(f"{path}: cannot write the checkpoint ({exc.strerror or exc}){kept}") from None
        if not self.results_cleared:
            # An earlier run's results.json (left by --overwrite) describes a checkpoint that is
            # gone now; this run writes its own when it finishes.
            _remove_stale(os.path.join(self.output_dir, RESULTS), "the earlier run's results")
            self.results_cleared = True
        self.flush_log()

    def flush_log(self):
        """Write the lines held back under --overwrite as this run's train.log (once this run's
        checkpoint or results replace the earlier run's)."""
        if self.replace_log and self.log_file and self.ddp.main:
            lines = "".join(line + "\n" for line in self.pending_log)
            try:
                _write_atomic(self.log_file, lambda f: f.write(lines))
            except OSError as exc:
                raise UsageError(f"{self.log_file}: cannot write the log ({exc.strerror or exc})") from None
        self.replace_log = False
        self.pending_log = []

    def load_state(self, state, training=True):
        """The checkpoint's model (and, to continue training, its optimizer and pseudo labels)."""
        built_for = _model_size(state["model"])
        if built_for is not None and built_for != (self.data.num_classes, self.data.feature_dim):
            saved = state["config"]
            trained_on = os.path.join(saved["data_root"], saved.get("dataset", Config.dataset)) if saved.get("data_root") else "the synthetic dataset"
            raise UsageError(
                f"the checkpoint's model was trained for {built_for[0]} classes and {built_for[1]}-d features (on "
                f"{trained_on}); {self.data.source or self.data.name} has {self.data.num_classes} classes and "
                f"{self.data.feature_dim}-d features"
            )
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exc:
            # torch's first line only says "Error(s) in loading state_dict"; the next names what.
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            raise UsageError(
                f"the checkpoint's model does not fit {self.data.name} ({self.data.num_classes} classes, "
                f"{self.data.feature_dim}-d features): {' '.join(lines[1:3] or lines[:1])[:400]}"
            ) from None
        where = self.data.source or self.data.name
        # Checkpoints written before 2026-11-27 hold no names: only the shapes are checked then.
        classes = state.get("classes")
        if classes is not None and list(classes) != list(self.data.classes):
            first = next((i for i, (a, b) in enumerate(zip(classes, self.data.classes)) if a != b), None)
            what = f"class {first} is {classes[first]!r} there, {self.data.classes[first]!r} here" if first is not None else "another class list"
            raise UsageError(f"the checkpoint was trained on other classes than those of {where}: {what}")
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        if not training:
            return  # evaluation needs the model only; the training split may differ
        videos = state.get("train_videos")
        now_videos = [self.data.videos[i] for i in self.train_idx]
        if videos is not None and list(videos) != now_videos:
            first = next((i for i, (a, b) in enumerate(zip(videos, now_videos)) if a != b), min(len(videos), len(now_videos)))
            raise UsageError(
                f"the checkpoint was trained on other training videos than those of {where} ({len(videos)} there, "
                f"{len(now_videos)} here; they differ from position {first} on): the data changed since it was written, "
                "and its pseudo labels belong to those videos"
            )
        # The pseudo labels are per training video and snippet: data that changed shape since
        # the checkpoint would fail (or index the wrong videos) in the first voting step.
        saved, now = tuple(state["pseudo_labels"].shape), tuple(self.pseudo_labels.shape)
        if saved != now:
            raise UsageError(
                f"the checkpoint was trained on {saved[1]} training videos of up to {saved[2]} snippets, but "
                f"{self.data.source or self.data.name} has {now[1]} of up to {now[2]}: the data changed since it was written"
            )
        self._load_optimizer(state["optimizer"])
        self.pseudo_labels = state["pseudo_labels"].to(self.device)
        self.pseudo_conf = state["pseudo_conf"].to(self.device)
        self.refreshes_done = int(state["refreshes_done"])


    def _load_optimizer(self, saved):
        """Adam's moments and step counts from the checkpoint; its settings (betas, eps, weight
        decay, ...) from the run's config, which the checkpoint saves too. Torch checks only the
        group and parameter counts: a state of other shapes failed in the first step instead."""
        try:
            self.optimizer.load_state_dict(saved)
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UsageError(f"the checkpoint's optimizer state does not fit the model ({first[:200]})") from None
        defaults = {k: v for k, v in self.optimizer.defaults.items() if k != "lr"}  # lr: set each epoch
        for group in self.optimizer.param_groups:
            group.update(defaults)
        names = {p: n for n, p in self.model.named_parameters()}
        for param, entries in self.optimizer.state.items():
            missing = [key for key in ("step", "exp_avg", "exp_avg_sq") if entries and key not in entries]
            if missing:
                raise UsageError(
                    f"the checkpoint's optimizer state does not fit the model: {names.get(param, 'a parameter')} "
                    f"has no {missing[0]!r}"
                )
            for key, value in entries.items():
                want = () if key == "step" else tuple(param.shape)
                if not isinstance(value, torch.Tensor) or tuple(value.shape) != want or not value.is_floating_point():
                    got = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
                    raise UsageError(
                        f"the checkpoint's optimizer state does not fit the model: {key!r} of {names.get(param, 'a parameter')} "
                        f"is {got}, expected a float tensor of shape {want}"
                    )


def _model_size(weights):
    """(classes, feature dim) an MMSD state dict was built for, or None where its weights do not
    say (load_state_dict then names what does not fit)."""
    centres, rgb = weights.get("centres"), weights.get("rgb_mid.0.weight")
    if centres is None or rgb is None or centres.dim() != 3 or rgb.dim() != 2:
        return None
    return centres.shape[1] - 1, 2 * rgb.shape[1]  # centres: a background centre after the classes


def load_checkpoint(path):
    if os.path.isdir(path):
        inside = os.path.join(path, CHECKPOINT)
        hint = f"; its run's checkpoint is {inside}" if os.path.isfile(inside) else f" (and holds no {CHECKPOINT})"
        raise UsageError(f"{path}: a directory, not a checkpoint{hint}")
    if not os.path.isfile(path):
        raise UsageError(f"{path}: checkpoint not found")
    try:
        with warnings.catch_warnings():
            # torch warns of a plain pickle's protocol before failing on it; the error says it.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means an unusable file
        raise UsageError(f"{path}: not a readable checkpoint ({_load_failure(path, exc)})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{path}: not an mmsd_ext.train checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    problem = _checkpoint_problem(state)
    if problem:
        raise UsageError(f"{path}: an mmsd_ext.train checkpoint, but {problem}")
    return state


# The first bytes of what torch.save writes: a zip archive (since torch 1.6), or a pickle.
TORCH_FILE_STARTS = (b"PK\x03\x04", b"\x80")


def _load_failure(path, exc):
    """Why torch.load could not read ``path``, in a few words. torch's own message runs to many
    lines and, for weights-only loading, advises weights_only=False: the wrong advice for a
    file that is no checkpoint, or a damaged one, and loading that runs the file's code."""
    try:
        with open(path, "rb") as f:
            start = f.read(4)
    except OSError as error:
        return f"cannot be read: {error.strerror or error}"
    if not start:
        return "an empty file"
    if not start.startswith(TORCH_FILE_STARTS):
        return "not a torch checkpoint file"
    if start.startswith(TORCH_FILE_STARTS[0]) and not zipfile.is_zipfile(path):
        # torch says "failed finding central directory" or, cut elsewhere, "[Errno 22] Invalid argument".
        return "truncated or damaged: its zip archive has no end"
    text = str(exc)
    if start.startswith(TORCH_FILE_STARTS[1]) and len(start) > 1 and (start[1] > 2 or "Invalid magic number" in text):
        # torch.save writes a zip archive, or (its old format) a magic number pickled with
        # protocol 2 first: this is a pickle.dump of something. torch's words for it are
        # "Unsupported operand 149" or "Invalid magic number; corrupt file?".
        return f"a plain pickle (protocol {start[1]}), not a file torch.save writes"
    unsupported = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if unsupported:
        return f"it holds a {unsupported.group(1)} object; checkpoints are loaded without running code from them"
    if isinstance(exc, EOFError):
        return "it ends early: truncated"
    if "WeightsUnpickler error:" in text:  # a pickle weights-only loading cannot read: damaged
        text = text.split("WeightsUnpickler error:", 1)[1]
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    first = first.split(". ", 1)[0].rstrip(".")  # torch's first sentence says what; the rest is advice
    return f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__


def _checkpoint_problem(state):
    """What makes a checkpoint of the right format unusable (a missing or mistyped entry), or None."""

    def count(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    def tensor(dims):
        return lambda v: isinstance(v, torch.Tensor) and v.dim() == dims and v.is_floating_point()

    entries = {
        "config": (lambda v: isinstance(v, dict), "a dict of settings"),
        "epoch": (count, "an int >= 0"),
        "model": (lambda v: isinstance(v, dict) and all(isinstance(t, torch.Tensor) for t in v.values()), "a dict of tensors"),
        "optimizer": (lambda v: isinstance(v, dict) and isinstance(v.get("param_groups"), list) and isinstance(v.get("state"), dict),
                      "an optimizer state (state, param_groups)"),
        "pseudo_labels": (tensor(3), "a 3-d float tensor"),
        "pseudo_conf": (tensor(3), "a 3-d float tensor"),
        "refreshes_done": (count, "an int >= 0"),
        "history": (lambda v: isinstance(v, list), "a list"),
    }
    for key, (ok, what) in entries.items():
        if key not in state:
            return f"it has no {key!r}"
        if not ok(state[key]):
            return f"its {key!r} is not {what} (got {_shown(state[key])})"
    problem = _config_problem(state["config"])
    if problem:
        return f"its {problem}"
    # A run saves its epochs setting with each checkpoint (a resumed run its new --epochs).
    epochs = state["config"].get("epochs", Config.epochs)
    if state["epoch"] > epochs:
        return f"its 'epoch' is {state['epoch']}, past its setting epochs = {epochs}"
    # Weights our runs never save (a diverged run stops first): loaded, they trained into
    # "training diverged ... try a smaller --lr", or evaluated into NaN predictions.
    for name, value in state["model"].items():
        if not bool(torch.isfinite(value).all()):
            return f"its weights hold NaN or inf (first in {name!r})"
    for key in ("pseudo_labels", "pseudo_conf"):
        if not bool(torch.isfinite(state[key]).all()):
            return f"its {key!r} hold NaN or inf"
    # One confidence per pseudo label: another shape failed with an IndexError at the next refresh.
    labels_shape, conf_shape = tuple(state["pseudo_labels"].shape), tuple(state["pseudo_conf"].shape)
    if conf_shape != labels_shape:
        return f"its 'pseudo_conf' has shape {conf_shape}, its 'pseudo_labels' {labels_shape}: expected the same"
    for key in ("train_videos", "classes"):  # absent from checkpoints written before 2026-11-27
        value = state.get(key)
        if value is not None and not (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)):
            return f"its {key!r} is not a list of names (got {_shown(value)})"
    splits = state.get("splits")  # absent from checkpoints written before 2026-11-29
    if splits is not None and not (
        isinstance(splits, (list, tuple)) and len(splits) == 2 and all(isinstance(v, str) and v for v in splits)
        and splits[0] != splits[1]
    ):
        return f"its 'splits' is not two different subset names, train then test (got {_shown(splits)})"
    for index, entries in state["optimizer"]["state"].items():
        for key, value in entries.items() if isinstance(entries, dict) else ():
            if isinstance(value, torch.Tensor) and not bool(torch.isfinite(value).all()):
                return f"its optimizer state holds NaN or inf (first in parameter {index}'s {key!r})"
    return None


def _shown(value):
    """A checkpoint entry of the wrong kind, for an error: a plain value as itself (epoch -3),
    anything else by its kind."""
    if value is None or isinstance(value, (bool, int, float, str)):
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."
    if isinstance(value, torch.Tensor):
        return f"a {value.dim()}-d {str(value.dtype).replace('torch.', '')} tensor"
    return type(value).__name__


def _python_numbers(config):
    """``config`` with numpy values (np.int64(3), np.float32(1e-3), np.True_, an array of tIoUs)
    as Python's: checked as those, and written to the checkpoint as those (numpy objects in a
    checkpoint made it unreadable, since checkpoints are loaded without running their code)."""

    def plain(value):
        if isinstance(value, (np.ndarray, np.generic)):
            return value.tolist()
        if isinstance(value, (list, tuple)):
            return type(value)(plain(v) for v in value)
        return value

    return dataclasses.replace(config, **{f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)})


def _config_problem(values):
    """A configuration's first mistyped or impossible setting, or None: a checkpoint's saved one
    (missing settings take their defaults: checkpoints of earlier versions lack the newer ones),
    or the Config given to ``run``."""
    defaults = Config()
    for field in dataclasses.fields(Config):
        if field.name not in values:
            continue
        value, default = values[field.name], getattr(defaults, field.name)
        if field.name == "streams":
            ok = isinstance(value, (list, tuple)) and tuple(value) in STREAM_SETS
        elif field.name == "tious":
            ok = tiou_problem(value) is None
        elif field.name == "feature_type":
            ok = isinstance(value, str) and value in data_mod.FEATURE_RATES
        elif field.name == "data_root":
            ok = value is None or isinstance(value, str)
        elif isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
        else:
            ok = isinstance(value, type(default))
        if ok and field.name in ("batch_size", "eval_batch_size"):
            ok = value >= 1
        if ok and field.name == "scale":
            ok = 0 < value <= MAX_RATE  # the cosine scale (MMSD: 20): 0 makes every score equal
        if ok and field.name == "class_threshold":
            ok = value <= 1  # a fraction of the top video score (MMSD: 0.2): above 1 keeps no class
        if ok and field.name == "dataset":
            ok = value != ""  # as the flag: the folder would be the data root itself
        if ok and field.name in ("beta1", "beta2"):
            ok = value < 1  # Adam refuses 1
        if ok and field.name in ("lr", "lr_decay"):
            ok = value > 0  # as the flags
        if ok and field.name in LIMITS:
            # dropout 1 trained nothing, but versions before 2026-11-27 took it
            low, high = LIMITS[field.name]
            ok = low <= value <= high
        if not ok:
            return f"setting {field.name} = {value!r} is not possible"
    return None


# -- evaluation --------------------------------------------------------------------------------


@torch.no_grad()
def predict(model, data, indices, device, batch_size=16, progress=False, desc="eval"):
    """Fused CAS [V, T, C] (padded, float32), video scores [V, C] and lengths [V] for the videos
    ``indices``, in that order (MMSD's 0.2 / 0.4 / 0.4 fusion), on ``device``: the proposals
    then run there too, with the backend chosen for that device. Raises a ``UsageError`` where an
    embedding's norm overflowed (see ``MMSD.heads``)."""
    from tqdm import tqdm

    model.eval()
    V = len(indices)
    lengths = torch.tensor([data.features[i].shape[0] for i in indices], dtype=torch.int64, device=device)
    cas = torch.zeros(V, int(lengths.max()), data.num_classes, device=device)
    scores = torch.zeros(V, data.num_classes, device=device)
    weights = model.fusion_weights()
    overflow = torch.zeros((), dtype=torch.bool, device=device)
    batches = _length_batches(data, list(range(V)), indices, batch_size)
    for chunk in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False, file=sys.stderr):
        batch = data_mod.collate(data, [indices[p] for p in chunk], device)
        outputs = model(batch["features"], batch["lengths"])
        overflow |= outputs["norm_overflow"]
        c, s = fuse(outputs, weights)
        rows = torch.tensor(chunk, device=device)
        cas[rows, : c.shape[1]] = c.float()
        scores[rows] = s.float()
    if bool(overflow):
        # Finite, but every cosine 0 and every score alike: an mAP of 0 that says nothing.
        raise UsageError(
            f"the model's embeddings overflowed float32 on {data.source or data.name} "
            f"({_overflow_cause(data, indices)}); scale the features down"
        )
    return cas, scores, lengths


def _overflow_cause(data, indices):
    """Why a model's embeddings overflow on the videos ``indices`` of ``data``, for an error."""
    largest, video = max((float(np.abs(data.features[i]).max()), i) for i in indices)
    return (
        f"features reach {largest:.3g} in magnitude, in {data.videos[video]}; an embedding whose norm passes about 1.8e19, the square "
        "root of float32's largest number, has a norm of inf there and a cosine of 0 with every class, "
        "so every snippet scores alike"
    )


def evaluate(model, data, indices, device, config, progress=False, desc="eval"):
    """MMSD's evaluation of the videos ``indices``: proposals on the fused CAS
    (``mmsd_ext.localize.mmsd_proposals``), detection mAP at ``config.tious`` by MMSD's THUMOS14
    protocol (``mmsd_ext.evaluate.thumos14_detection_map``: ground truth seconds converted to
    snippets at the rate of ``config.feature_type``, videos without ground truth left out,
    ambiguous segments filtered), and cmAP over all of them. Percentages."""
    from mmsd_ext.evaluate import classification_map, thumos14_detection_map
    from mmsd_ext.localize import mmsd_proposals

    start = time.perf_counter()
    cas, scores, lengths = predict(model, data, indices, device, config.eval_batch_size, progress, desc)
    if not (torch.isfinite(scores).all() and torch.isfinite(cas).all()):
        raise UsageError(
            f"the model's predictions on {data.source or data.name} hold NaN or inf (diverged weights, or "
            "features far outside the range it was trained on)"
        )
    cmap = 100.0 * float(classification_map(scores.cpu(), torch.from_numpy(data.labels[list(indices)])))
    proposals = mmsd_proposals(cas, scores, lengths, class_threshold=config.class_threshold).cpu()
    tious = sorted(config.tious)  # the flag sorts them; a checkpoint edited by hand may not
    result = thumos14_detection_map(
        proposals,
        [data.videos[i] for i in indices],
        [data.segments[i] for i in indices],
        [[data.classes[c] for c in data.segment_classes[i]] for i in indices],
        data.classes,
        ambiguous=data.ambiguous,
        tiou_thresholds=tious,
        factor=data_mod.FEATURE_RATES[config.feature_type],
    )
    maps = [100.0 * float(m) for m in result.map]  # AP in [0, 1] -> percent
    return {
        "map": {tiou_key(t): m for t, m in zip(tious, maps)},
        "average_map": float(np.mean(maps)),
        "cmap": cmap,
        "num_test_videos": len(indices),
        "num_evaluated_videos": sum(1 for i in indices if len(data.segments[i])),
        "num_proposals": int(proposals.shape[0]),
        "eval_time_s": round(time.perf_counter() - start, 3),
    }


def format_table(result):
    heads = list(result["map"]) + ["AVG"]
    values = [f"{v:.1f}" for v in result["map"].values()] + [f"{result['average_map']:.1f}"]
    width = max(5, max(len(v) for v in values) + 1)
    lines = [
        "tIoU " + "".join(h.rjust(width) for h in heads),
        "mAP  " + "".join(v.rjust(width) for v in values),
        f"cmAP {result['cmap']:.1f}",
    ]
    return "\n".join(lines)


# -- entry point -------------------------------------------------------------------------------


def _prepare_output_dir(path, overwrite, allow_existing=False, files=(CHECKPOINT, RESULTS, LOG)):
    """Make ``path`` a folder this run can write ``files`` to, or raise a UsageError naming it.

    Deletes nothing: with ``overwrite`` each of an earlier run's files is replaced (atomically)
    only when this run writes its own version, so a run that fails keeps the earlier files.
    """
    if not path:
        raise UsageError("--output-dir: empty path")
    if os.path.islink(path) and not os.path.exists(path):
        raise UsageError(f"--output-dir {path}: a symbolic link to {os.readlink(path)}, which does not exist")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--output-dir {path}: exists and is not a directory")
    for name in files:
        # Found now, not when the first epoch's log line or the results are written (by then an
        # --overwrite run has replaced the earlier run's checkpoint).
        if os.path.isdir(os.path.join(path, name)):
            raise UsageError(f"--output-dir {path}: its {name} is a directory, where this run writes a file")
    if os.path.isdir(path) and not (overwrite or allow_existing):
        clashes = [name for name in files if os.path.exists(os.path.join(path, name))]
        if clashes and tuple(files) == (RESULTS,):  # eval-only: an earlier evaluation's results
            raise UsageError(f"--output-dir {path}: already holds {RESULTS}; pass --overwrite to replace it, or choose another folder")
        if clashes and not os.path.exists(os.path.join(path, CHECKPOINT)):
            # A run that stopped in its first epoch leaves its log (which says why) and no checkpoint.
            raise UsageError(
                f"--output-dir {path}: already holds {', '.join(clashes)} from another run, which has no "
                f"{CHECKPOINT} to resume; pass --overwrite to replace {'them' if len(clashes) > 1 else 'it'}, "
                "or choose another folder"
            )
        if clashes:
            raise UsageError(
                f"--output-dir {path}: already holds {', '.join(clashes)} from another run; "
                "pass --overwrite to replace them, --resume to continue that run, or choose another folder"
            )
    try:
        os.makedirs(path, exist_ok=True)
        # A folder we cannot write to fails now, not after the first epoch.
        _probe_writable(path)
    except OSError as exc:
        raise UsageError(f"--output-dir {path}: cannot write there ({exc.strerror or exc})") from None
    return path


def _holds_run_files(path):
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, name)) for name in (CHECKPOINT, RESULTS, LOG))


def _check_not_another_runs_folder(path, checkpoint):
    """Eval-only's results.json goes beside a run's checkpoint and log only if that checkpoint
    is the one evaluated: the three files of a folder belong together (a resumed run removes
    its folder's results.json as stale, whoever wrote it)."""
    if not os.path.isdir(path):
        return
    present = [name for name in (CHECKPOINT, LOG) if os.path.exists(os.path.join(path, name))]
    own = os.path.join(path, CHECKPOINT)
    if present and not (os.path.exists(own) and _same_path(own, checkpoint)):
        raise UsageError(
            f"--output-dir {path}: holds {' and '.join(present)} of another run, and its results.json would "
            f"then not be that run's; write the evaluation of {checkpoint} to another folder (or to its own)"
        )


def _remove_stale(path, what):
    """Remove ``path`` (``what``: for the error) if it is there: an earlier run's file whose
    companion this run has just replaced."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise UsageError(f"{path}: cannot remove {what} ({exc.strerror or exc})") from None


def _same_path(a, b):
    """Whether two paths name one folder (or file), whatever links or spellings lead there."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist (yet)
        return os.path.realpath(a) == os.path.realpath(b)


def _probe_writable(folder):
    """OSError unless a file can be made in ``folder`` (made and removed again)."""
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".mmsd-write-test-")
    os.close(fd)
    os.remove(probe)


def _write_atomic(path, write, binary=False):
    """Replace ``path`` with what ``write(file)`` writes (atomically: readers see the old file or
    the new one; a failed write leaves the old file and no temporary behind)."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C in the write too
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def _default_output_dir(config):
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = os.path.join("runs", f"mmsd-{config.dataset if config.data_root else 'synthetic'}-{stamp}")
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    return path


def run(
    config,
    *,
    output_dir=None,
    overwrite=False,
    resume=None,
    eval_only=False,
    checkpoint=None,
    stop_after=None,
    progress=True,
    quiet=False,
    save=True,
):
    """Train (or resume, or only evaluate) and evaluate; returns the results dict on rank 0 (None elsewhere).

    ``save=False`` writes nothing (no output folder); otherwise training writes checkpoint.pt,
    train.log and results.json to ``output_dir`` (default: a new runs/mmsd-<data>-<time>/).
    ``resume``: a checkpoint to continue, with ``config`` holding its settings but those that may
    change (see ``resume_problem``: a UsageError names the others that differ); its lr decay and
    refreshes stay where its first length put them (``schedule_epochs``).
    ``eval_only`` with ``checkpoint``: ``config``'s ``EVAL_ONLY_KEPT`` settings (the model
    and how it is evaluated) must be the checkpoint's (``load_checkpoint(path)["config"]``);
    a UsageError names any that differs.
    """
    config = _python_numbers(config)
    problem = _config_problem(config.to_dict())
    if problem:
        raise ValueError(f"config: the {problem}")
    device_kind = "cuda" if (config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())) else "cpu"
    ddp = Dist(device_kind)
    # Process-wide settings this run changes, restored afterwards (run() may be called in-process).
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        return _run(config, ddp, output_dir, overwrite, resume, eval_only, checkpoint, stop_after, progress, quiet, save)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        ddp.close()


def _is_out_of_memory(exc):
    # CUDA: torch.OutOfMemoryError; CPU: a RuntimeError from the allocator; numpy: MemoryError.
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    )


@contextlib.contextmanager
def _out_of_memory_as_usage_error(trainer, output_dir, eval_only):
    """Running out of memory in training or evaluation: an error that says where, what is kept and
    what to change, instead of a traceback. An interrupt (Ctrl-C) is logged and passed on."""
    try:
        yield
    except KeyboardInterrupt:
        # Said on stderr by the command; the log says it too, like the other ways a run stops.
        trainer.log(f"stopped: interrupted {trainer.stage}", echo=False)
        raise
    except (RuntimeError, MemoryError) as exc:
        if not _is_out_of_memory(exc):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if trainer.stage.startswith("in the evaluation"):
            advice = "free memory on the device or evaluate on another (--device)"
        else:
            advice = "try a smaller --batch-size or --embed-dim"
        kept = ""
        if output_dir and not eval_only:
            path = os.path.join(output_dir, CHECKPOINT)
            kept = f"; {path} (epoch {trainer.epoch}) is kept" if trainer.epoch and os.path.exists(path) else ""
        message = f"out of memory {trainer.stage} ({first[:200]}){kept}; {advice}"
        trainer.log("stopped: " + message, echo=False)
        raise UsageError(message) from None


def _run(config, ddp, output_dir, overwrite, resume, eval_only, checkpoint, stop_after, progress, quiet, save):
    device = _resolve_device(config.device, ddp)
    if config.threads:
        torch.set_num_threads(config.threads)
    if device.type == "cpu":
        # Same seed, same numbers: deterministic kernels only (CPU; CUDA would need cuBLAS settings).
        torch.use_deterministic_algorithms(True)
    check_backend(config.backend, device)
    backend = None if config.backend == "auto" else config.backend

    state = None
    if resume or eval_only:
        state = load_checkpoint(resume or checkpoint)
    if resume:
        # As the command checks its flags: a Config of other settings than the run's would
        # continue a run that is neither the one saved nor one started with them.
        saved = Config.from_dict(state["config"])
        problem = resume_problem(config.to_dict(), saved, state["epoch"])
        if not problem and config.schedule_epochs not in (0, schedule_length(saved)):
            problem = (
                f"schedule_epochs {config.schedule_epochs}: the resumed run places its lr decay and refreshes in "
                f"{schedule_length(saved)} epochs, and keeps them there"
            )
        if problem:
            raise UsageError(problem)
        # Another --epochs moves where the run ends, not its lr decay and refreshes.
        config = dataclasses.replace(config, schedule_epochs=schedule_length(saved))
    if eval_only:
        # As the command: the checkpoint's model, evaluated as it was configured (scale,
        # class threshold, ...); a Config that differs elsewhere would evaluate another one.
        saved = Config.from_dict(state["config"])
        changed = [key for key in EVAL_ONLY_KEPT if _normalised(getattr(config, key)) != _normalised(getattr(saved, key))]
        if changed:
            shown = "; ".join(f"{key}: the checkpoint's {getattr(saved, key)!r}, given {getattr(config, key)!r}" for key in changed)
            raise UsageError(
                f"config: an evaluation of a checkpoint takes its settings ({shown}); {', '.join(EVAL_ONLY_KEPT)} "
                "must be the checkpoint's"
            )
    # Everything that can fail on the data, the settings or the checkpoint fails here, before
    # any folder is made or touched: an error leaves no new folder and an earlier run intact.
    # The checkpoint's feature type (the command keeps it): no error advises another one.
    kept = state is not None and config.feature_type == state["config"].get("feature_type", Config.feature_type)
    data = load_data(config, feature_type_kept=kept)
    if eval_only and state.get("splits") is not None:
        data.known_splits = tuple(state["splits"])
    data.check_test_split()
    if not eval_only:
        data.check_train_split()
    trainer = Trainer(config, data, device, ddp, progress=progress and not quiet, training=not eval_only)
    if state is not None:
        trainer.load_state(state, training=not eval_only)

    if not save:
        output_dir = None
    elif output_dir is None and not eval_only:
        output_dir = os.path.dirname(os.path.abspath(resume)) if resume else _default_output_dir(config)
        if resume:
            overwrite = False
    error = None
    # Continued in place: the folder's own checkpoint.pt resumed. A resumed copy (a backup beside
    # it, say) writes to its folder only where that holds no other run's files, like a new run.
    same_as_resume = bool(resume) and output_dir is not None and _same_path(os.path.join(output_dir, CHECKPOINT), resume)
    if output_dir is not None and ddp.main:
        try:
            if eval_only:
                _check_not_another_runs_folder(output_dir, checkpoint)
            if resume and not same_as_resume and not overwrite and _holds_run_files(output_dir):
                raise UsageError(
                    f"--resume {resume}: {output_dir} holds the files of another run (its own {CHECKPOINT}), "
                    "which continuing this checkpoint there would replace; give --output-dir for another folder, "
                    f"or resume {os.path.join(output_dir, CHECKPOINT)} itself"
                )
            if same_as_resume and not overwrite and trainer.epoch >= config.epochs and os.path.exists(os.path.join(output_dir, RESULTS)):
                # Nothing to train: evaluating again would replace the run's results (other --tiou, data).
                raise UsageError(
                    f"--resume {resume}: the run has trained all {config.epochs} epochs and "
                    f"{os.path.join(output_dir, RESULTS)} holds its evaluation; give a larger --epochs to train on, "
                    f"or evaluate again with --eval-only --checkpoint {resume} (and --overwrite, or another --output-dir)"
                )
            # Eval-only writes results.json and nothing else.
            _prepare_output_dir(
                output_dir, overwrite, allow_existing=same_as_resume, files=(RESULTS,) if eval_only else (CHECKPOINT, RESULTS, LOG)
            )
        except UsageError as exc:
            error = exc
        if not eval_only:
            trainer.output_dir = output_dir
            trainer.log_file = os.path.join(output_dir, LOG)
            # A resumed run appends to its own log; a fresh one replaces an earlier run's.
            trainer.replace_log = overwrite and not same_as_resume
    ddp.agree(error)

    trainer.echo = not quiet
    with trainer.together():
        trainer.log(
            f"mmsd_ext {mmsd_ext.__version__}, torch {torch.__version__}, device {device}, processes {ddp.world}, "
            f"backend {config.backend}"
        )
        trainer.log(data.describe())
        trainer.log("config " + json.dumps(config.to_dict()))
        if state is not None:
            trainer.log(f"loaded {resume or checkpoint} (epoch {trainer.epoch})")
        if resume and output_dir is not None and not same_as_resume:
            # Continued in another folder: the run's checkpoint goes there first, so that the
            # folder's checkpoint, log and results are this run's from now on (even with no
            # epoch left to train).
            trainer.save_checkpoint()

    with mmsd_ext.use_backend(backend or "auto"), _out_of_memory_as_usage_error(trainer, output_dir, eval_only):
        train_time = 0.0
        if not eval_only:
            start = time.perf_counter()
            trainer.train(stop_after=stop_after)
            train_time = time.perf_counter() - start
            if trainer.epoch < config.epochs:
                where = f"; continue with --resume {os.path.join(output_dir, CHECKPOINT)}" if output_dir else ""
                trainer.log(f"stopped after epoch {trainer.epoch} of {config.epochs}{where}")
                return None
        result = trainer.evaluate()
    if not ddp.main:
        return None
    result.update(
        {
            "epoch": trainer.epoch,
            "train_time_s": round(train_time, 3),
            "processes": ddp.world,
            "device": str(device),
            "dataset": data.name,
            "config": config.to_dict(),
        }
    )
    if output_dir is not None:
        path = os.path.join(output_dir, RESULTS)
        trainer.flush_log()  # a run that wrote no checkpoint holds none back (see Trainer.log)
        try:
            _write_atomic(path, lambda f: json.dump(result, f, indent=2))
        except OSError as exc:
            raise UsageError(f"{path}: cannot write the results ({exc.strerror or exc})") from None
        result["results_file"] = path
    if not quiet:
        trainer.log(format_table(result))
        if output_dir is not None:
            trainer.log(f"results in {os.path.join(output_dir, RESULTS)}")
    return result
