"""Temporal (1-D) non-maximum suppression: ``temporal_nms`` and ``soft_temporal_nms``.

Backends: ``reference`` (plain Python loops, the oracle), ``cpu`` (C++,
csrc/cpu/*nms*_kernel.cpp), ``cuda`` (csrc/cuda/*nms*_kernel.cu) and ``triton``
(kernels/temporal_nms.py). Overlaps are computed in float64 on every backend, in
the operation order of ``_overlap_reference``, so all of them take the same
keep/suppress decisions, also for overlaps exactly at the threshold.
"""

import math
import struct
from typing import Optional

import torch

from . import _backend, _checks, _loader

OVERLAPS = ("iou", "other")
SOFT_METHODS = ("gaussian", "linear")


def temporal_nms(segments, scores, iou_threshold, *, groups=None, overlap="iou", offset=0.0, backend=None):
    """Greedy hard NMS over 1-D segments, batched over groups.

    Segments are visited by descending score (ties: lower index first); one is
    kept unless an already kept segment of its group overlaps it by strictly
    more than ``iou_threshold``.

    Args:
        segments: [M, 2] float32/float64 (start, end), finite, with end >= start.
        scores: [M] floating scores. NaN scores rank below every number (they
            are visited last, among themselves by index); +-inf rank as usual.
        iou_threshold: overlap above which a segment is suppressed (>= 0).
        groups: optional integer tensor [M] (int64, or a narrower integer dtype, widened);
            segments only suppress others of their group
            (e.g. ``video * num_classes + class``). Default: one group.
        overlap: "iou" (intersection over union) or "other" (intersection over
            the length of the lower-scored candidate, MMSD's NMS).
        offset: lengths are ``end - start + offset`` and the intersection
            ``max(0, min(ends) - max(starts) + offset)``; 1 is the inclusive
            snippet convention of MMSD and BaS-Net. A zero length gives overlap 0.
        backend: "reference", "cpu", "cuda", "triton", "auto" or None (a block's or the process's, else auto). "triton"
            computes the suppression tiles in Triton and gathers them with the
            compiled op ``mmsd_ext::_temporal_nms_gather``, so it needs the compiled
            extension too, built with its CUDA kernels for CUDA tensors; auto does
            not pick it where that op cannot run. Where auto finds no GPU backend
            for GPU tensors (a build without CUDA kernels), the cpu kernel runs on
            host copies and the result comes back to the inputs' device (the
            reference's Python loop would run op by op on the GPU); without the
            compiled extension, the reference runs.

    Returns:
        int64 tensor of kept indices, in descending score order (ties: lower index first).
        With overlap="iou", offset=0, float64 coordinates and no NaN score it equals
        ``torchvision.ops.batched_nms`` on CPU boxes (start, 0, end, 1), except that
        with M > 1000 torchvision may list kept segments of equal score in another
        order (it then sorts its result without the index tie-break; the kept set
        is the same). NaN scores rank first in torchvision's sort, last here. Elsewhere
        they agree except where an IoU lies within float32 rounding of the
        threshold, since torchvision computes the IoU of float32 boxes in float32
        (and its CUDA kernel rounds the threshold to float32), this op always in
        float64: float32 segments [0, 2], [1, 3] (IoU 1/3) at threshold 1/3 are
        both kept here, only the first by torchvision. Not differentiable.

    Raises:
        TypeError / ValueError naming the argument: wrong dtype or shape, tensors on
        different devices, negative ``iou_threshold`` or ``offset``, an unknown
        ``overlap``, and segments with end < start or non-finite coordinates (on
        CUDA tensors this check rides on the op's read of its result size).
        RuntimeError for a backend that cannot run here.

    Cost: cpu, O(M log M) plus, per candidate, a test of each kept segment that
    its position and length allow to overlap it by more than the threshold (found
    by max-trees over the kept segments, csrc/cpu/temporal_nms_kernel.cpp):
    quadratic at worst, as greedy NMS is (40k nested segments [0, i] at threshold
    0.99999999: 0.95 s); from ``iou_threshold`` 1 on nothing is tested (no overlap
    exceeds 1). cuda with n <= 256: one kernel launch of one block, no mask (ranks
    and greedy pass in shared memory, groups compared directly). cuda with larger n, and
    triton: a suppression mask of n * W * 8 bytes for n segments, W =
    ceil(n / 64) without groups or with n <= 8192 (n^2 / 8 bytes: 1.25 GB at
    n = 1e5, 8 MiB at most with groups), else W = ceil(Gmax / 64) + 1 for the
    largest group Gmax. A mask would take more than 4 GiB (one group of about
    185k segments; M = 1e6 in one group would need 116 GiB), or more than the GPU
    can allocate at the time (torch's out-of-memory error): the cpu kernel runs on
    host copies instead and the result is copied back (the crossover in time is
    not measured). Host synchronisations (each waits for the queued GPU work):
    cuda, one (the read of the result size); with groups and n > 8192, one more
    (the read of Gmax). triton, two: the gather op's read of its input checks and
    the read of the result size; with groups and n > 8192, one more (Gmax).

    Example::

        >>> segments = torch.tensor([[0.0, 10.0], [1.0, 11.0], [20.0, 30.0]])
        >>> scores = torch.tensor([0.9, 0.8, 0.7])
        >>> mmsd_ext.temporal_nms(segments, scores, 0.5)
        tensor([0, 2])
    """
    groups = _checks.widen_int("groups", groups)
    segments, scores, groups, iou_threshold, offset = _checked_hard("temporal_nms", segments, scores, groups, iou_threshold, overlap, offset)
    name = _resolve_hard(backend, segments.device)
    return _HARD_IMPLS[name](segments, scores, iou_threshold, groups, overlap, offset)


def soft_temporal_nms(
    segments, scores, *, method="gaussian", sigma=0.5, iou_threshold=0.3, min_score=1e-3, groups=None, offset=0.0, backend=None
):
    """Soft-NMS (Bodla et al., ICCV 2017) over 1-D segments, batched over groups.

    Repeatedly selects the live segment with the highest current score (ties:
    lower index), then decays every other live segment of its group:
    "gaussian": ``s <- s * exp(-iou**2 / sigma)``; "linear": ``s <- s * (1 - iou)``
    where ``iou > iou_threshold``. A segment whose score is below ``min_score``
    (initially or after a decay) is dropped. IoU as in ``temporal_nms``, with ``offset``.
    Scores are carried in float64.

    NaN scores are dropped (a NaN is not >= min_score), also a NaN made by a decay
    (an infinite score times a zero factor).

    Backends: cpu and reference give the same indices and scores, bit for bit. The
    gaussian factor's exp is the GPU's own on cuda and triton (numpy's under the
    Triton interpreter) and may differ from the C library's in the last bit: a
    decayed score within one rounding of ``min_score``, or of another live score,
    may then be dropped or ordered differently there. The linear decay has no exp.

    Cost: cpu, O(M log M) plus, per selection, the live segments of its group that
    intersect it (found by a max-tree of the live ends). cuda and triton: one block
    (program) per group, a pass over the group's live segments per selection, the
    groups in parallel: they pay off for many groups (a THUMOS-sized batch: 2.4 ms
    on an H200 against 80 ms for cpu on a 2-core VM), not for one large group
    (M = 10k: 334 ms on an H200 against 7.6 ms for cpu on a 2-core VM; there,
    ``soft_temporal_nms(segments.cpu(), scores.cpu())`` is the fast way). Host
    synchronisations: cuda and triton, one (the read of the result size).

    Args:
        segments, scores, groups, offset, backend: as in ``temporal_nms`` (auto on
            GPU tensors with neither cuda nor triton: the cpu kernel on host copies).
        method: "gaussian" or "linear".
        sigma: gaussian width (> 0).
        iou_threshold: linear decay applies where IoU > iou_threshold (>= 0).
        min_score: drop threshold (a number, -inf keeps everything but NaN).

    Returns:
        (indices, scores): int64 indices in selection order and their scores at
        selection (in the dtype of ``scores``). Not differentiable.

    Example::

        >>> segments = torch.tensor([[0.0, 10.0], [1.0, 11.0], [20.0, 30.0]])
        >>> idx, val = mmsd_ext.soft_temporal_nms(segments, torch.tensor([0.9, 0.8, 0.7]))
        >>> idx
        tensor([0, 2, 1])
    """
    groups = _checks.widen_int("groups", groups)
    segments, scores, groups, sigma, iou_threshold, min_score, offset = _checked_soft(
        "soft_temporal_nms", segments, scores, groups, method, sigma, iou_threshold, min_score, offset
    )
    name = _resolve_soft(backend, segments.device)
    return _SOFT_IMPLS[name](segments, scores, method, sigma, iou_threshold, min_score, groups, offset)


def _resolve_hard(backend, device):
    """The backend of temporal_nms for tensors on ``device``.

    The triton backend gathers its mask with the compiled op _temporal_nms_gather,
    which has a kernel for CUDA tensors only in a build with the CUDA kernels (and
    for CPU tensors, under the Triton interpreter, in any build of the extension).
    Where it has none, auto skips "triton" (so a CPU-only build on a GPU machine
    gets the cpu kernel on host copies, see _on_host_instead), and asking for it
    raises with the reason.
    """
    gpu_order = _GPU_ORDER if _gather_compiled(device) else tuple(n for n in _GPU_ORDER if n != "triton")
    name = _backend.resolve("temporal_nms", backend, device, supported=_HARD_SUPPORTED, gpu_order=gpu_order)
    if name == "triton":
        _check_gather(device)
    return _on_host_instead(name, backend, device)


def _resolve_soft(backend, device):
    """The backend of soft_temporal_nms for tensors on ``device`` (its triton
    backend is Triton and PyTorch only, with no compiled op)."""
    name = _backend.resolve("soft_temporal_nms", backend, device, supported=_SOFT_SUPPORTED, gpu_order=_GPU_ORDER)
    return _on_host_instead(name, backend, device)


# Where auto would run the reference on GPU tensors (no GPU backend can run in this
# build), the cpu kernel runs on host copies instead and the result is copied back:
# the reference's Python loop, op by op on the GPU, took 1.4 ms at M = 100 and 91 ms
# at M = 1000 on an H200, the cpu kernel 0.05 ms at M = 1000 on the 2-core VM, plus
# the copies (benchmarks/RESULTS.md). Asked for by name, "reference" still runs.
# The triton backend takes the same way for a mask past _MAX_MASK_BYTES.
ON_HOST = "cpu(host copies)"


def _on_host_instead(name, backend, device):
    if (name == "reference" and torch.device(device).type != "cpu" and _backend.requested(backend) is None
            and _loader.compiled_available()):
        return ON_HOST
    return name


def _checked_hard(op, segments, scores, groups, iou_threshold, overlap, offset):
    """temporal_nms's arguments checked (also where its ops are called directly): no value read."""
    segments, scores, groups, offset = _check_nms_args(op, segments, scores, groups, offset)
    iou_threshold = _non_negative("iou_threshold", iou_threshold)
    if overlap not in OVERLAPS:
        raise ValueError(f"overlap: expected one of {', '.join(OVERLAPS)}, got {overlap!r}")
    return segments, scores, groups, iou_threshold, offset


def _checked_soft(op, segments, scores, groups, method, sigma, iou_threshold, min_score, offset):
    """soft_temporal_nms's arguments checked (also where its ops are called directly): no value read."""
    segments, scores, groups, offset = _check_nms_args(op, segments, scores, groups, offset)
    if method not in SOFT_METHODS:
        raise ValueError(f"method: expected one of {', '.join(SOFT_METHODS)}, got {method!r}")
    sigma = _checks.positive_number("sigma", sigma)
    iou_threshold = _non_negative("iou_threshold", iou_threshold)
    min_score = _checks.number("min_score", min_score)
    if min_score != min_score:  # NaN
        raise ValueError(f"min_score: expected a number, got {min_score!r}")  # as csrc/nms_checks.h
    return segments, scores, groups, sigma, iou_threshold, min_score, offset


def _non_negative(name, value):
    value = _checks.number(name, value)
    if not value >= 0:
        raise ValueError(f"{name}: expected a number >= 0, got {value}")
    return float(value)


def _check_nms_args(op, segments, scores, groups, offset):
    """Dtype, shape and device checks (no look at the values, so no sync and no graph break)."""
    _checks.floating("segments", segments, (torch.float32, torch.float64))
    _checks.rank("segments", segments, 2, "[M, 2]")
    if segments.shape[1] != 2:
        raise ValueError(f"segments: expected shape [M, 2], got {tuple(segments.shape)}")
    M = segments.shape[0]
    _checks.floating("scores", scores, (torch.float32, torch.float64, torch.float16, torch.bfloat16))
    if scores.shape != (M,):
        raise ValueError(f"scores: expected shape [M] = [{M}], got {tuple(scores.shape)}")
    if groups is not None:
        _checks.int64("groups", groups)
        if groups.shape != (M,):
            raise ValueError(f"groups: expected shape [M] = [{M}], got {tuple(groups.shape)}")
        groups = groups.detach()
    _checks.same_device("segments", segments, scores=scores, groups=groups)
    # Which segments are kept, and so the result's size, depends on the values.
    _checks.has_values(op, segments=segments, scores=scores, groups=groups)
    offset = _checks.number("offset", offset)
    if not _checks.finite(offset) or offset < 0:
        raise ValueError(f"offset: expected a finite number >= 0, got {offset!r}")
    return segments.detach(), scores.detach(), groups, offset


def _check_segment_values(segments):
    """Finite coordinates with end >= start; the reference's check (the kernels check in C++).
    Names the first bad segment, as the kernels do."""
    if segments.shape[0] == 0:
        return
    finite = torch.isfinite(segments).all(dim=1)
    bad = ~finite | (segments[:, 1] < segments[:, 0])
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        _raise_bad_segment(i, segments)


def _raise_bad_segment(i, segments):
    """Every backend's error for bad segment ``i`` of ``segments``: the C++ kernels' words and
    numbers (csrc/nms_checks.h, csrc/format.h's real: the shortest text that reads back, 3 not
    3.0, and for float32 segments as a float32, 6.4 not 6.400000095367432)."""
    start, end = segments[i].tolist()
    as_float = segments.dtype == torch.float32

    def real(x):
        if math.isnan(x) or math.isinf(x):
            return str(x)
        for digits in range(1, 18):
            text = f"{x:.{digits}g}"
            if (struct.unpack("f", struct.pack("f", float(text)))[0] == x) if as_float else float(text) == x:
                return text
        return repr(x)

    what = "finite coordinates" if not (math.isfinite(start) and math.isfinite(end)) else "end >= start"
    raise ValueError(f"segments: expected {what}, got segment {i} = ({real(start)}, {real(end)})")


# ----------------------------------------------------------------------------
# reference


def _descending_order(values):
    """Stable order by descending value (ties to the lower index), NaN last, -0.0 == +0.0.

    The device-side counterpart of ``_visit_order``. Not a sort of ``-values``: CUDA's
    radix sort orders NaNs by their sign bit (which negation flips) and keeps -0.0
    apart from +0.0. Integer keys instead: a double's bits read as int64 order the
    non-negative values, flipping the magnitude bits orders the negative ones, ``+ 0.0``
    folds -0.0 into +0.0, and NaN takes the lowest key.
    """
    v = values.to(torch.float64) + 0.0
    bits = v.view(torch.int64)
    key = torch.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits).masked_fill_(v.isnan(), torch.iinfo(torch.int64).min)
    return torch.sort(key, stable=True, descending=True).indices


def _visit_order(scores):
    """Indices by descending score, ties by lower index, NaN last."""
    values = scores.detach().to(torch.float64).cpu().tolist()
    return sorted(range(len(values)), key=lambda i: (math.isnan(values[i]), -values[i] if not math.isnan(values[i]) else 0.0, i))


def _overlap_reference(a, b, mode, offset):
    """Overlap of candidate b with kept segment a (b is the lower-scored one)."""
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]) + offset)
    len_a = a[1] - a[0] + offset
    len_b = b[1] - b[0] + offset
    if mode == "other":
        return inter / len_b if len_b > 0 else 0.0
    union = len_a + len_b - inter
    return inter / union if union > 0 else 0.0


def temporal_nms_reference(segments, scores, iou_threshold, groups, overlap, offset):
    """Plain Python loops over the visit order."""
    _check_segment_values(segments)
    segs = segments.detach().to(torch.float64).cpu().tolist()
    grp = [0] * len(segs) if groups is None else groups.cpu().tolist()
    kept = []
    for i in _visit_order(scores):
        # "not >": an overlap that is NaN (inf / inf, from lengths past the float64 range) does
        # not suppress, as in the kernels.
        if all(grp[j] != grp[i] or not _overlap_reference(segs[j], segs[i], overlap, offset) > iou_threshold for j in kept):
            kept.append(i)
    return torch.tensor(kept, dtype=torch.int64, device=segments.device)


def soft_temporal_nms_reference(segments, scores, method, sigma, iou_threshold, min_score, groups, offset):
    """Plain Python loops: select the best live segment, decay its group, repeat."""
    _check_segment_values(segments)
    segs = segments.detach().to(torch.float64).cpu().tolist()
    grp = [0] * len(segs) if groups is None else groups.cpu().tolist()
    current = scores.detach().to(torch.float64).cpu().tolist()
    live = [i for i in range(len(segs)) if current[i] >= min_score]  # NaN is dropped
    chosen, chosen_scores = [], []
    while live:
        best = min(live, key=lambda i: (-current[i], i))
        chosen.append(best)
        chosen_scores.append(current[best])
        live.remove(best)
        survivors = []
        for i in live:
            if grp[i] == grp[best]:
                iou = _overlap_reference(segs[best], segs[i], "iou", offset)
                if method == "gaussian":
                    current[i] *= math.exp(-(iou * iou) / sigma)
                elif iou > iou_threshold:
                    current[i] *= 1.0 - iou
            if current[i] >= min_score:
                survivors.append(i)
        live = survivors
    return (
        torch.tensor(chosen, dtype=torch.int64, device=segments.device),
        torch.tensor(chosen_scores, dtype=torch.float64, device=segments.device).to(scores.dtype),
    )


# The references as ops, opaque to torch.compile like the other backends (dynamo cannot
# trace their loops, whose trip counts are the data's): the fakes below give the result's
# data-dependent size.
@torch.library.custom_op("mmsd_ext::temporal_nms_reference", mutates_args=())
def _temporal_nms_reference_op(
    segments: torch.Tensor, scores: torch.Tensor, groups: Optional[torch.Tensor], iou_threshold: float, overlap: str, offset: float
) -> torch.Tensor:
    _checked_hard("temporal_nms_reference", segments, scores, groups, iou_threshold, overlap, offset)
    return temporal_nms_reference(segments, scores, iou_threshold, groups, overlap, offset)


@torch.library.custom_op("mmsd_ext::soft_temporal_nms_reference", mutates_args=())
def _soft_temporal_nms_reference_op(
    segments: torch.Tensor,
    scores: torch.Tensor,
    groups: Optional[torch.Tensor],
    method: str,
    sigma: float,
    iou_threshold: float,
    min_score: float,
    offset: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    _checked_soft("soft_temporal_nms_reference", segments, scores, groups, method, sigma, iou_threshold, min_score, offset)
    return soft_temporal_nms_reference(segments, scores, method, sigma, iou_threshold, min_score, groups, offset)


def _temporal_nms_reference(segments, scores, iou_threshold, groups, overlap, offset):
    return _temporal_nms_reference_op(segments, scores, groups, iou_threshold, overlap, offset)


def _soft_temporal_nms_reference(segments, scores, method, sigma, iou_threshold, min_score, groups, offset):
    return _soft_temporal_nms_reference_op(segments, scores, groups, method, sigma, iou_threshold, min_score, offset)


# ----------------------------------------------------------------------------
# cpu and cuda: the compiled ops (the device picks the kernel)


def _temporal_nms_compiled(segments, scores, iou_threshold, groups, overlap, offset):
    return torch.ops.mmsd_ext.temporal_nms(segments, scores, groups, iou_threshold, overlap, offset)


def _soft_temporal_nms_compiled(segments, scores, method, sigma, iou_threshold, min_score, groups, offset):
    return torch.ops.mmsd_ext.soft_temporal_nms(segments, scores, groups, method, sigma, iou_threshold, min_score, offset)


# ----------------------------------------------------------------------------
# triton: the same algorithm as the CUDA kernels, with the host steps in PyTorch.

# Up to this many segments the mask band is the full triangle, so the largest group
# need not be read to the host (8 MiB of mask); same constant as the CUDA kernel.
_DENSE_MASK_MAX_SEGMENTS = 8192
_TILE = 64
# The largest mask built (4 GiB, a group of about 185k segments); past it the cpu
# kernel runs on host copies. Same limit and reason as kMaxMaskBytes of the CUDA kernel.
_MAX_MASK_BYTES = 4 << 30


def _group_bounds(sorted_groups, n, device):
    """(is_start, end_of) of non-decreasing group ids: see csrc/cuda/nms_cuda_common.cuh."""
    pos = torch.arange(n, device=device)
    if sorted_groups is None:
        is_start = pos == 0
    else:
        is_start = torch.ones(n, dtype=torch.bool, device=device)
        is_start[1:] = sorted_groups[1:] != sorted_groups[:-1]
    start_pos = torch.where(is_start, pos, n)
    shifted = torch.full((n,), n, dtype=torch.int64, device=device)
    shifted[:-1] = start_pos[1:]
    end_of = torch.cummin(shifted.flip(0), 0).values.flip(0).contiguous()
    return is_start, end_of


def _first_bad_segment(seg):
    ok = torch.isfinite(seg).all(dim=1) & (seg[:, 1] >= seg[:, 0])
    pos = torch.arange(seg.shape[0], device=seg.device)
    return torch.where(ok, seg.shape[0], pos).min()


def _read_count_and_check(count, first_bad, segments):
    """The read of the result size to the host, with whether a segment was invalid
    (``segments``: the caller's, whose dtype the error's numbers are printed in)."""
    count, bad = torch.stack([count.to(torch.int64), first_bad]).tolist()
    if bad < segments.shape[0]:
        _raise_bad_segment(bad, segments)
    return count


def _gather_compiled(device):
    """Whether mmsd_ext::_temporal_nms_gather has a kernel for tensors on ``device``."""
    if torch.device(device).type == "cuda":
        return _loader.cuda_compiled()
    return _loader.compiled_available()


def _check_gather(device):
    if _gather_compiled(device):
        return
    why = _loader.LOAD_ERROR if not _loader.compiled_available() else (
        "this build of the extension has no CUDA kernels; rebuild it on a machine with the CUDA toolkit: "
        "`FORCE_CUDA=1 pip install --no-build-isolation -e .`"
    )
    raise RuntimeError(
        "backend='triton': temporal_nms computes its suppression mask in Triton but gathers it with the "
        f"compiled op mmsd_ext::_temporal_nms_gather, which cannot run on {torch.device(device)} tensors here: {why} "
        "(backend='reference' always runs)"
    )


@torch.library.custom_op("mmsd_ext::temporal_nms_triton", mutates_args=())
def _temporal_nms_triton_op(
    segments: torch.Tensor, scores: torch.Tensor, groups: Optional[torch.Tensor], iou_threshold: float, overlap: str, offset: float
) -> torch.Tensor:
    from .kernels import temporal_nms as kernels

    _checked_hard("temporal_nms_triton", segments, scores, groups, iou_threshold, overlap, offset)
    n = segments.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=segments.device)
    _check_gather(segments.device)
    seg = segments.to(torch.float64).contiguous()
    first_bad = _first_bad_segment(seg)
    perm = _descending_order(scores)
    gperm, sorted_groups = perm, None  # gperm: sorted position -> original index
    if groups is not None:
        sorted_groups, by_group = torch.sort(groups[perm], stable=True)  # by_group: sorted -> visit position
        gperm = perm[by_group]
    tiles = -(-n // _TILE)
    width = tiles
    if sorted_groups is not None and n > _DENSE_MASK_MAX_SEGMENTS:
        is_start, end_of = _group_bounds(sorted_groups, n, seg.device)
        largest = int(torch.where(is_start, end_of - torch.arange(n, device=seg.device), 0).max())
        width = min(tiles, -(-largest // _TILE) + 1)
    if n * width * 8 > _MAX_MASK_BYTES:
        return _temporal_nms_on_host(segments, scores, iou_threshold, groups, overlap, offset)
    try:
        mask = kernels.temporal_nms_mask(seg[gperm].contiguous(), sorted_groups, iou_threshold, OVERLAPS.index(overlap), offset, width)
    except torch.OutOfMemoryError:
        # Under the limit but past what the GPU can give now (a shared or busy card).
        return _temporal_nms_on_host(segments, scores, iou_threshold, groups, overlap, offset)
    keep_sorted = torch.ops.mmsd_ext._temporal_nms_gather(mask, sorted_groups)
    keep_visit = keep_sorted
    if groups is not None:
        keep_visit = torch.zeros_like(keep_sorted).index_copy_(0, by_group, keep_sorted)
    count = _read_count_and_check(keep_visit.sum(), first_bad, segments)
    return perm[torch.nonzero_static(keep_visit, size=count).squeeze(1)]


@torch.library.custom_op("mmsd_ext::soft_temporal_nms_triton", mutates_args=())
def _soft_temporal_nms_triton_op(
    segments: torch.Tensor,
    scores: torch.Tensor,
    groups: Optional[torch.Tensor],
    method: str,
    sigma: float,
    iou_threshold: float,
    min_score: float,
    offset: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    from .kernels import temporal_nms as kernels

    _checked_soft("soft_temporal_nms_triton", segments, scores, groups, method, sigma, iou_threshold, min_score, offset)
    n = segments.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=segments.device), torch.empty(0, dtype=scores.dtype, device=scores.device)
    seg = segments.to(torch.float64).contiguous()
    first_bad = _first_bad_segment(seg)
    order, sorted_groups = torch.arange(n, device=seg.device), None
    if groups is not None:
        sorted_groups, order = torch.sort(groups, stable=True)
    is_start, end_of = _group_bounds(sorted_groups, n, seg.device)
    cur = scores.to(torch.float64)[order].contiguous()
    alive = (cur >= min_score).to(torch.int8)
    out_index, out_score, run_score, run_index, count = kernels.soft_temporal_nms_select(
        seg[order].contiguous(), order, cur, alive, is_start.to(torch.int8), end_of, method == "gaussian", sigma, iou_threshold, min_score, offset
    )
    # Slot p holds a selection iff p - gs < count[gs] for its group start gs; then
    # stable sorts, least significant key first: run index asc, run score desc, empty slots last.
    pos = torch.arange(n, device=seg.device)
    start_of = torch.cummax(torch.where(is_start, pos, 0), 0).values
    valid = (pos - start_of) < count[start_of]
    perm = torch.sort(run_index, stable=True).indices
    perm = perm[_descending_order(run_score[perm])]
    perm = perm[torch.sort((~valid[perm]).to(torch.uint8), stable=True).indices]
    total = _read_count_and_check(valid.sum(), first_bad, segments)
    chosen = perm[:total]
    return out_index[chosen], out_score[chosen].to(scores.dtype)


@_temporal_nms_triton_op.register_fake
@_temporal_nms_reference_op.register_fake
def _hard_fake(segments, scores, groups, iou_threshold, overlap, offset):
    # As the other ops' fakes: a meta tensor among real ones is an error, not an output made up.
    _checks.same_device("segments", segments, scores=scores, groups=groups)
    k = torch.library.get_ctx().new_dynamic_size()
    return segments.new_empty((k,), dtype=torch.int64)


@_soft_temporal_nms_triton_op.register_fake
@_soft_temporal_nms_reference_op.register_fake
def _soft_fake(segments, scores, groups, method, sigma, iou_threshold, min_score, offset):
    _checks.same_device("segments", segments, scores=scores, groups=groups)
    k = torch.library.get_ctx().new_dynamic_size()
    return segments.new_empty((k,), dtype=torch.int64), scores.new_empty((k,))


def _host(groups):
    return None if groups is None else groups.cpu()


def _temporal_nms_on_host(segments, scores, iou_threshold, groups, overlap, offset):
    kept = _temporal_nms_compiled(segments.cpu(), scores.cpu(), iou_threshold, _host(groups), overlap, offset)
    return kept.to(segments.device)


def _soft_temporal_nms_on_host(segments, scores, method, sigma, iou_threshold, min_score, groups, offset):
    keep, kept_scores = _soft_temporal_nms_compiled(
        segments.cpu(), scores.cpu(), method, sigma, iou_threshold, min_score, _host(groups), offset
    )
    return keep.to(segments.device), kept_scores.to(scores.device)


def _temporal_nms_triton(segments, scores, iou_threshold, groups, overlap, offset):
    return _temporal_nms_triton_op(segments, scores, groups, iou_threshold, overlap, offset)


def _soft_temporal_nms_triton(segments, scores, method, sigma, iou_threshold, min_score, groups, offset):
    return _soft_temporal_nms_triton_op(segments, scores, groups, method, sigma, iou_threshold, min_score, offset)


# Fake kernels of the compiled ops, registered only when they exist (so that a
# missing extension never breaks the import). The result size depends on the data.
if _loader.compiled_available():

    torch.library.register_fake("mmsd_ext::temporal_nms")(_hard_fake)
    torch.library.register_fake("mmsd_ext::soft_temporal_nms")(_soft_fake)

    @torch.library.register_fake("mmsd_ext::_temporal_nms_gather")
    def _(mask, sorted_groups):
        _checks.same_device("mask", mask, sorted_groups=sorted_groups)
        return mask.new_empty((mask.shape[0],), dtype=torch.bool)


_HARD_IMPLS = {
    "reference": _temporal_nms_reference,
    "cpu": _temporal_nms_compiled,
    "cuda": _temporal_nms_compiled,
    "triton": _temporal_nms_triton,
    ON_HOST: _temporal_nms_on_host,
}
_HARD_SUPPORTED = ("reference", "cpu", "cuda", "triton")
_SOFT_IMPLS = {
    "reference": _soft_temporal_nms_reference,
    "cpu": _soft_temporal_nms_compiled,
    "cuda": _soft_temporal_nms_compiled,
    "triton": _soft_temporal_nms_triton,
    ON_HOST: _soft_temporal_nms_on_host,
}
_SOFT_SUPPORTED = ("reference", "cpu", "cuda", "triton")
# Fastest GPU backend first. Measured on an H200 (benchmarks/RESULTS.md), one group:
# hard NMS cuda 0.17 / 0.20 / 1.25 / 41 ms at M = 100 / 1000 / 10k / 100k, triton
# 1.1 / 1.2 / 2.5 / 97 ms; soft-NMS at M = 10k cuda 334 ms, triton 549 ms. cuda first.
_GPU_ORDER = ("cuda", "triton")
