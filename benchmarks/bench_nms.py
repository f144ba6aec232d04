"""temporal_nms and soft_temporal_nms (forward only: NMS has no gradient).

Workloads (benchmarks/workloads.py):
- ``M=N``: N segments in one group, on a timeline N snippets long (density
  constant, so about a quarter is kept at IoU 0.4).
- ``thumos``: a THUMOS14-sized evaluation, 212 videos x 20 classes x ~60
  proposals (about 254k segments in 4240 groups); hard NMS at IoU 0.4.
- ``thumos-mmsd``: the same proposals under MMSD's own NMS (overlap over the
  candidate's length, inclusive ends: ``overlap="other", offset=1``).
- ``activitynet`` (the full preset only): an ActivityNet-like evaluation that
  scores every class, 500 videos (a tenth of ActivityNet 1.3's 4926
  validation videos, so the loop anchors stay within seconds) x 200 classes
  x ~8 proposals (about 800k segments in 100k groups): many small groups.

Hard NMS anchors: ``torchvision`` (``ops.nms`` for one group,
``ops.batched_nms`` with the group ids for a batch, on boxes
(start, 0, end, 1), on the benchmark's device; for a batch this large
batched_nms loops over the groups itself); ``numpy_loop``: the
per-(video, class) loop of MMSD-style code (its ``NonMaximumSuppression``:
argsort, then ``np.delete`` of what the top segment suppresses), over groups
already split into lists as such code holds them. Box building and group
splitting are not timed, in the anchors' favour. For a large batch on the
CPU, batched_nms scans all M segments once per group (``idxs == group``),
O(groups x M): 1.8 s for the THUMOS batch, minutes for the ActivityNet-like
one, so it is left out above ``TORCHVISION_CPU_MAX_WORK`` and the numpy loop
is the eager anchor there. Not an anchor: one
``ops.nms`` call on boxes shifted apart per group (the coordinate trick) is
both slower on the CPU (its kernel compares every later box) and wrong at
this size in float32 (shifts of 4240 * 2600 leave no fractional bits).

Soft-NMS anchors: mmsd_ext's reference (a Python loop) on the CPU, for one
group; ``numpy_loop``: the per-(video, class) numpy soft-NMS loop of WTAL
code (CO2-Net's and DELU's ``soft_nms``: argmax, decay the rest by
``exp(-iou^2 / sigma)``, drop what falls under the threshold, repeat), with
the API's semantics (lower index first on ties, segments under ``min_score``
dropped from the start, lengths without the +1), over groups already split
into lists. On a 2-core machine it takes 2.6 s for the THUMOS batch, about
30 s for the ActivityNet-like one (per-group overhead: 100k groups) and 0.5 s
for 10k segments in one group, growing quadratically with a group's size, so
it is left out above
``SOFT_LOOP_MAX_GROUP`` segments in a group (M=100k in one group would take
about a minute). On a GPU both run on the CPU.

On a GPU, one more provider: ``cpu(host copies)``, the cpu backend called on
CUDA tensors the way a user could (copy the inputs to the host, run the C++
kernel, copy the result back; all of it timed). No goal is set against it: it
says whether the GPU kernel beats simply not using the GPU. For soft-NMS in one
group it may well not (a selection is a step of the whole group: the GPU kernel
runs one group in one block, one selection after the other).

The tiny preset adds ``thumos-tiny``: THUMOS-shaped groups of 3 videos (a
batch small enough for tests).

The reference backend is a Python loop, O(M * kept) for hard NMS and O(M^2)
over all groups for soft-NMS: it is left out above ``REFERENCE_MAX_M``
segments (a preset's own limit) and for batches.

Least traffic (bytes): read segments (8 per segment in float32), scores (4),
groups (8, when given); write the kept indices (8 each) and, for soft-NMS,
their scores (4 each).
"""

import numpy as np
import torch

from . import workloads
from .harness import Case, Provider

IOU_THRESHOLD = 0.4  # MMSD's NMS threshold, used for both overlap modes
SOFT = dict(method="gaussian", sigma=0.5, iou_threshold=0.3, min_score=1e-3)  # the API's defaults
# Above this many segments the Python-loop reference takes tens of seconds to
# minutes on a 2-core machine (hard M=10k: about 4 s, soft M=10k: about 30 s);
# quick runs stop earlier. The soft-NMS anchor of a GPU run (the reference on the
# CPU) always runs up to 10k: the GPU goal is set against it there.
REFERENCE_MAX_M = {"tiny": 10_000, "quick": 2_000, "full": 10_000}
SOFT_CPU_ANCHOR_MAX_M = 10_000
# groups x M above which torchvision's batched_nms is left out on the CPU
# (THUMOS: 4240 x 254k = 1.1e9, 1.8 s; ActivityNet-like: 100k x 800k = 8e10).
TORCHVISION_CPU_MAX_WORK = 5e9
# The numpy soft-NMS loop is quadratic within a group: 0.5 s at 10k segments
# in one group on a 2-core machine, so 20k stays within a few seconds.
SOFT_LOOP_MAX_GROUP = 20_000
# In a quick GPU run the hard-NMS numpy loop (a host anchor; the GPU goal is set
# against torchvision) is left out of one-group cases above this M: at 100k it took
# one 13 s cold call there.
NUMPY_LOOP_GPU_RUN_MAX_M = 10_000

PRESETS = {
    "temporal_nms": {
        "tiny": [("one", 64), ("thumos-tiny", "iou")],
        "quick": {"cpu": [("one", 1_000), ("one", 10_000), ("thumos", "iou")],
                  # The THUMOS-like batch before M = 100k: a spent time share then drops the
                  # largest size, not the batch.
                  "cuda": [("one", 100), ("one", 1_000), ("one", 10_000), ("thumos", "iou"), ("one", 100_000)]},
        "full": [("one", 100), ("one", 1_000), ("one", 10_000), ("one", 100_000), ("thumos", "iou"), ("thumos", "other"),
                 ("activitynet", "iou")],
    },
    "soft_temporal_nms": {
        "tiny": [("one", 64), ("thumos-tiny", "iou")],
        # On a GPU the goal size (M=10k, against the CPU reference) first: it is
        # the costly case (the reference takes tens of seconds), and a spent
        # time share then drops the others rather than it.
        "quick": {"cpu": [("one", 1_000), ("thumos", "iou")], "cuda": [("one", 10_000), ("one", 1_000), ("thumos", "iou")]},
        "full": [("one", 100), ("one", 1_000), ("one", 10_000), ("one", 100_000), ("thumos", "iou"), ("activitynet", "iou")],
    },
}


def parse(token):
    t = token.lower()
    if t in ("thumos", "thumos-iou"):
        return ("thumos", "iou")
    if t == "thumos-mmsd":
        return ("thumos", "other")
    if t in ("activitynet", "anet"):
        return ("activitynet", "iou")
    if t.startswith("m="):
        t = t[2:]
    try:
        m = int(float(t)) if "x" not in t else 0
    except (ValueError, OverflowError):  # not a number, inf
        return None
    return ("one", m) if m >= 1 else None


def cases(op, ctx):
    if op not in PRESETS:
        raise ValueError(f"op: expected one of {', '.join(PRESETS)}, got {op!r}")
    out = []
    for spec in ctx.sizes(PRESETS[op], parse):
        if op == "soft_temporal_nms" and spec == ("thumos", "other"):
            continue  # soft-NMS has IoU only
        out.append(_hard_case(ctx, spec) if op == "temporal_nms" else _soft_case(ctx, spec))
    return out


# The tiny preset's batch: THUMOS-shaped groups, few videos (a test-sized run).
_TINY_VIDEOS = 3


def _workload(ctx, spec):
    rng = np.random.RandomState(ctx.seed)
    if spec[0] == "one":
        segments, scores = workloads.one_group_segments(rng, spec[1])
        return segments, scores, None, f"M={spec[1]}"
    if spec[0] == "activitynet":
        videos, classes = workloads.ACTIVITYNET_VIDEOS, workloads.ACTIVITYNET_CLASSES
        segments, scores, groups = workloads.activitynet_segments(rng, videos, classes)
        return segments, scores, groups, f"activitynet {videos}x{classes} M={len(scores)}"
    videos = _TINY_VIDEOS if spec[0] == "thumos-tiny" else workloads.THUMOS_VIDEOS
    segments, scores, groups = workloads.thumos_segments(rng, videos=videos)
    name = "thumos" if spec[1] == "iou" else "thumos-mmsd"
    return segments, scores, groups, f"{name} {videos}x{workloads.THUMOS_CLASSES} M={len(scores)}"


def _least_bytes(m, grouped, per_kept):
    def count(expected):
        kept = len(expected[0]) if isinstance(expected, tuple) else len(expected)
        return {"fwd": m * (8 + 4 + (8 if grouped else 0)) + kept * per_kept}

    return count


def _tensors(segments, scores, groups, device):
    return (
        torch.from_numpy(segments).to(device),
        torch.from_numpy(scores).to(device),
        None if groups is None else torch.from_numpy(groups).to(device),
    )


def _host_copies_provider(run, tensors, device, optional=True):
    """``run(seg, sc, grp)`` with the cpu backend on host copies of the GPU tensors,
    the copies and the result's way back to ``device`` timed with it. ``optional``:
    as Provider's (soft-NMS passes False: its host copies are the alternative the
    docstring of soft_temporal_nms offers on a GPU, and would otherwise queue behind
    a reference of about a minute and be left out)."""

    def build():
        seg, sc, grp = tensors()

        def fn():
            out = run(seg.cpu(), sc.cpu(), None if grp is None else grp.cpu())
            if isinstance(out, tuple):
                return tuple(t.to(device) for t in out)
            return out.to(device)

        return {"passes": {"fwd": fn}, "result": fn, "result_pass": "fwd"}

    return Provider("cpu(host copies)", "anchor", build, device=device, optional=optional)


def _compiled_cpu_available():
    import mmsd_ext

    return "cpu" in mmsd_ext.available_backends()


def _hard_case(ctx, spec):
    segments, scores, groups, label = _workload(ctx, spec)
    overlap = spec[1] if groups is not None else "iou"
    offset = 1.0 if overlap == "other" else 0.0
    m = len(scores)
    device = ctx.device
    shared = {}

    def tensors():
        if not shared:
            shared["t"] = _tensors(segments, scores, groups, device)
        return shared["t"]

    def fwd_provider(name, kind, make, dev=device, skip=None):
        def build():
            fn = make()
            return {"passes": {"fwd": fn}, "result": fn, "result_pass": "fwd"}

        return Provider(name, kind, build, device=dev, jit=name == "triton", skip=skip)

    providers = []
    limit = REFERENCE_MAX_M[ctx.preset]
    for backend in ctx.mmsd_backends():
        skip = None
        if backend == "reference" and (m > limit or groups is not None):
            skip = f"Python loop, O(M * kept): left out above M={limit} ({ctx.preset} sizes) and for batches"

        def make(backend=backend):
            import mmsd_ext

            seg, sc, grp = tensors()
            return lambda: mmsd_ext.temporal_nms(seg, sc, IOU_THRESHOLD, groups=grp, overlap=overlap, offset=offset, backend=backend)

        providers.append(fwd_provider(backend, "mmsd_ext", make, skip=skip))
    if device != "cpu" and _compiled_cpu_available():
        import mmsd_ext

        providers.append(_host_copies_provider(
            lambda seg, sc, grp: mmsd_ext.temporal_nms(seg, sc, IOU_THRESHOLD, groups=grp, overlap=overlap, offset=offset, backend="cpu"),
            tensors, device,
        ))

    roles = {"loop": "numpy_loop", "reference": "reference", "eager": "numpy_loop"}
    work = m * (0 if groups is None else len(np.unique(groups)))
    if overlap == "iou" and device == "cpu" and work > TORCHVISION_CPU_MAX_WORK:
        why = f"batched_nms scans all segments once per group on the CPU, groups x M = {work:.1g}: minutes a call"
        providers.append(fwd_provider("torchvision", "anchor", lambda: None, skip=why))
    elif overlap == "iou":
        def build_torchvision():
            seg, sc, grp = tensors()
            # Timed on the float32 boxes; the check is against float64 boxes. torchvision computes
            # float32 boxes' IoU in float32, mmsd_ext and the numpy loop in float64: at M = 100k
            # in one group 13 of 25941 kept segments differ, on float64 boxes none (RESULTS.md).
            return {"passes": {"fwd": _torchvision((seg, sc, grp))}, "result": _torchvision((seg.double(), sc.double(), grp))}

        providers.append(Provider("torchvision", "anchor", build_torchvision, device=device))
        roles["eager"] = "torchvision"
    make_loop = lambda: _numpy_loop(segments, scores, groups, overlap, offset)  # noqa: E731
    if device != "cpu" and ctx.preset == "quick" and groups is None and m > NUMPY_LOOP_GPU_RUN_MAX_M:
        why = "runs on the host whatever the device (13 s a call at M=100k in one group on an H200's host); the CPU runs time it"
        providers.append(fwd_provider("numpy_loop", "anchor", make_loop, skip=why, dev="cpu"))
    else:
        providers.append(fwd_provider("numpy_loop", "anchor", make_loop, dev="cpu"))
    return Case(
        op="temporal_nms",
        shape=label,
        dtype="float32",
        passes=("fwd",),
        least_bytes=_least_bytes(m, groups is not None, 8),
        providers=providers,
        roles=roles,
        compare=_compare_kept,
        note=f"overlap={overlap}, offset={offset}, threshold={IOU_THRESHOLD}",
    )


def _soft_case(ctx, spec):
    segments, scores, groups, label = _workload(ctx, spec)
    m = len(scores)
    device = ctx.device
    shared = {}

    def tensors(dev):
        if dev not in shared:
            shared[dev] = _tensors(segments, scores, groups, dev)
        return shared[dev]

    def provider(name, kind, backend, dev, limit):
        def build():
            import mmsd_ext

            seg, sc, grp = tensors(dev)
            fn = lambda: mmsd_ext.soft_temporal_nms(seg, sc, groups=grp, backend=backend, **SOFT)  # noqa: E731
            return {"passes": {"fwd": fn}, "result": fn, "result_pass": "fwd"}

        skip = None
        if backend == "reference" and (m > limit or groups is not None):
            skip = f"Python loop, O(M^2) over all groups: left out above M={limit} and for batches"
        return Provider(name, kind, build, device=dev, jit=backend == "triton", skip=skip)

    def loop_provider():
        def build():
            fn = _soft_numpy_loop(segments, scores, groups)
            return {"passes": {"fwd": fn}, "result": fn, "result_pass": "fwd"}

        largest = m if groups is None else int(np.bincount(groups).max(initial=0))
        skip = None
        if largest > SOFT_LOOP_MAX_GROUP:
            skip = f"numpy loop, quadratic within a group: left out above {SOFT_LOOP_MAX_GROUP} segments in a group"
        return Provider("numpy_loop", "anchor", build, device="cpu", skip=skip)

    limit = REFERENCE_MAX_M[ctx.preset]

    providers = [provider(b, "mmsd_ext", b, device, limit) for b in ctx.mmsd_backends()]
    if device != "cpu":
        providers.append(provider("reference(cpu)", "anchor", "reference", "cpu", SOFT_CPU_ANCHOR_MAX_M))
        if _compiled_cpu_available():
            import mmsd_ext

            providers.append(_host_copies_provider(
                lambda seg, sc, grp: mmsd_ext.soft_temporal_nms(seg, sc, groups=grp, backend="cpu", **SOFT),
                lambda: tensors(device), device, optional=False,
            ))
    providers.append(loop_provider())
    # The eager anchor: the reference on the CPU for one group (the soft-NMS
    # goals are set against it), the per-group loop for a batch (the
    # reference leaves batches out).
    if groups is not None:
        eager = "numpy_loop"
    else:
        eager = "reference(cpu)" if device != "cpu" else "reference"
    return Case(
        op="soft_temporal_nms",
        shape=label,
        dtype="float32",
        passes=("fwd",),
        least_bytes=_least_bytes(m, groups is not None, 8 + 4),
        providers=providers,
        roles={"eager": eager, "loop": "numpy_loop", "reference": "reference"},
        compare=lambda expected, got: _compare_soft(expected, got, groups),
        note=", ".join(f"{k}={v}" for k, v in SOFT.items()),
    )


# ---------------------------------------------------------------- anchors


def _torchvision(tensors):
    import torchvision

    seg, sc, grp = tensors
    zeros = torch.zeros_like(seg[:, 0])
    boxes = torch.stack([seg[:, 0], zeros, seg[:, 1], zeros + 1], dim=1)
    if grp is None:
        return lambda: torchvision.ops.nms(boxes, sc, IOU_THRESHOLD)
    return lambda: torchvision.ops.batched_nms(boxes, sc, grp, IOU_THRESHOLD)


def _numpy_loop(segments, scores, groups, overlap, offset):
    seg = segments.astype(np.float64)
    sc = scores.astype(np.float64)
    index_lists = [np.arange(len(sc))] if groups is None else workloads.split_groups(groups)
    # What MMSD-style code holds: one array of (start, end, score) per (video, class).
    per_group = [(idx, seg[idx, 0], seg[idx, 1], sc[idx]) for idx in index_lists]

    def run():
        kept = []
        for idx, s, e, score in per_group:
            pick = _nms_numpy(s, e, score, IOU_THRESHOLD, overlap, offset)
            kept.append(idx[pick])
        return np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)

    return run


def _nms_numpy(s, e, scores, threshold, overlap, offset):
    """MMSD's NonMaximumSuppression loop, with IoU as the other overlap choice."""
    length = e - s + offset
    idxs = np.argsort(scores)
    pick = []
    while len(idxs) > 0:
        last = len(idxs) - 1
        i = idxs[last]
        pick.append(i)
        rest = idxs[:last]
        inter = np.maximum(0.0, np.minimum(e[i], e[rest]) - np.maximum(s[i], s[rest]) + offset)
        if overlap == "other":
            ratio = inter / length[rest]
        else:
            ratio = inter / (length[i] + length[rest] - inter)
        idxs = np.delete(idxs, np.concatenate(([last], np.where(ratio > threshold)[0])))
    return np.asarray(pick, dtype=np.int64)


def _soft_numpy_loop(segments, scores, groups):
    seg = segments.astype(np.float64)
    sc = scores.astype(np.float64)
    index_lists = [np.arange(len(sc))] if groups is None else workloads.split_groups(groups)
    per_group = [(idx, seg[idx, 0], seg[idx, 1], sc[idx]) for idx in index_lists]

    def run():
        picked, picked_scores = [], []
        for idx, s, e, score in per_group:
            p, v = _soft_nms_numpy(idx, s, e, score, **SOFT)
            picked.append(p)
            picked_scores.append(v)
        if not picked:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        return np.concatenate(picked), np.concatenate(picked_scores)

    return run


def _soft_nms_numpy(idx, s, e, scores, method, sigma, iou_threshold, min_score):
    """One group's soft-NMS as WTAL code's numpy ``soft_nms`` does it; (indices, scores) in selection order."""
    live = scores >= min_score
    idx, s, e, scores = idx[live], s[live], e[live], scores[live].copy()
    length = e - s
    picked, picked_scores = [], []
    while len(idx) > 0:
        best = int(np.argmax(scores))  # the first maximum: the lower index on ties
        picked.append(idx[best])
        picked_scores.append(scores[best])
        inter = np.maximum(0.0, np.minimum(e[best], e) - np.maximum(s[best], s))
        union = length[best] + length - inter
        iou = inter / np.where(union > 0, union, 1.0) * (union > 0)
        if method == "gaussian":
            scores = scores * np.exp(-(iou * iou) / sigma)
        else:
            scores = np.where(iou > iou_threshold, scores * (1.0 - iou), scores)
        keep = scores >= min_score
        keep[best] = False
        idx, s, e, scores, length = idx[keep], s[keep], e[keep], scores[keep], length[keep]
    return np.asarray(picked, dtype=np.int64), np.asarray(picked_scores)


# ---------------------------------------------------------------- checks


def _as_index_array(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy().astype(np.int64)
    return np.asarray(x, dtype=np.int64)


def _compare_kept(expected, got):
    """Same set of kept segments (orders differ between per-group loops and one sorted call)."""
    e, g = np.sort(_as_index_array(expected)), np.sort(_as_index_array(got))
    if len(e) == len(g) and np.array_equal(e, g):
        return "ok"
    sym = len(np.setxor1d(e, g))
    return f"differs: {sym} segments kept by one only (of {len(e)})"


def _compare_soft(expected, got, groups):
    """Same selections with the same scores (1e-5), in the same order within each group.

    Per-group loops list group after group; one batched call interleaves the
    groups in the order of selection. A stable sort by group makes both the
    per-group selection orders, which must agree.
    """
    ei, es = expected
    gi, gs = got
    ei, gi = _as_index_array(ei), _as_index_array(gi)
    es, gs = _as_float_array(es), _as_float_array(gs)
    if groups is not None:
        eo = np.argsort(groups[ei], kind="stable")
        go = np.argsort(groups[gi], kind="stable")
        ei, es, gi, gs = ei[eo], es[eo], gi[go], gs[go]
    if len(ei) != len(gi) or not np.array_equal(ei, gi):
        n = min(len(ei), len(gi))
        same = int(np.sum(ei[:n] == gi[:n]))
        return f"differs: {len(gi)} selected, expected {len(ei)}; selection order agrees on {same}"
    err = float(np.abs(es - gs).max()) if len(es) else 0.0
    return "ok" if err <= 1e-5 else f"differs: scores by up to {err:.2g}"


def _as_float_array(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)
