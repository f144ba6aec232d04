"""Temporal (1-D) non-maximum suppression: ``temporal_nms`` and ``soft_temporal_nms``."""

import math

import torch

from . import _backend, _checks

OVERLAPS = ("iou", "other")
SOFT_METHODS = ("gaussian", "linear")


def temporal_nms(segments, scores, iou_threshold, *, groups=None, overlap="iou", offset=0.0, backend=None):
    """Greedy hard NMS over 1-D segments, batched over groups.

    Segments are visited by descending score (ties: lower index first); one is
    kept unless an already kept segment of its group overlaps it by strictly
    more than ``iou_threshold``.

    Args:
        segments: [M, 2] float32/float64 (start, end) with end >= start.
        scores: [M] floating scores. NaN scores rank below every number (they
            are visited last, among themselves by index).
        iou_threshold: overlap above which a segment is suppressed (>= 0).
        groups: optional int64 [M]; segments only suppress others of their group
            (e.g. ``video * num_classes + class``). Default: one group.
        overlap: "iou" (intersection over union) or "other" (intersection over
            the length of the lower-scored candidate, MMSD's NMS).
        offset: lengths are ``end - start + offset`` and the intersection
            ``max(0, min(ends) - max(starts) + offset)``; 1 is the inclusive
            snippet convention of MMSD and BaS-Net.
        backend: "reference", "cpu", "cuda", "triton" or None (auto).

    Returns:
        int64 tensor of kept indices, in descending score order (ties: lower index first).
        With overlap="iou", offset=0 it equals ``torchvision.ops.batched_nms`` on
        boxes (start, 0, end, 1).
    """
    segments, scores, groups = _check_nms_args(segments, scores, groups, offset)
    iou_threshold = _non_negative("iou_threshold", iou_threshold)
    if overlap not in OVERLAPS:
        raise ValueError(f"overlap: expected one of {', '.join(OVERLAPS)}, got {overlap!r}")
    name = _backend.resolve("temporal_nms", backend, segments.device, supported=_HARD_SUPPORTED)
    return _HARD_IMPLS[name](segments, scores, iou_threshold, groups, overlap, float(offset))


def soft_temporal_nms(
    segments, scores, *, method="gaussian", sigma=0.5, iou_threshold=0.3, min_score=1e-3, groups=None, offset=0.0, backend=None
):
    """Soft-NMS (Bodla et al., ICCV 2017) over 1-D segments, batched over groups.

    Repeatedly selects the live segment with the highest current score (ties:
    lower index), then decays every other live segment of its group:
    "gaussian": ``s <- s * exp(-iou**2 / sigma)``; "linear": ``s <- s * (1 - iou)``
    where ``iou > iou_threshold``. A segment whose score is below ``min_score``
    (initially or after a decay) is dropped. IoU as in ``temporal_nms``, with ``offset``.

    Returns:
        (indices, scores): int64 indices in selection order and their scores at selection.
    """
    segments, scores, groups = _check_nms_args(segments, scores, groups, offset)
    if method not in SOFT_METHODS:
        raise ValueError(f"method: expected one of {', '.join(SOFT_METHODS)}, got {method!r}")
    sigma = _checks.positive_number("sigma", sigma)
    iou_threshold = _non_negative("iou_threshold", iou_threshold)
    if isinstance(min_score, bool) or not isinstance(min_score, (int, float)) or math.isnan(min_score):
        raise TypeError(f"min_score: expected a number, got {min_score!r}")
    name = _backend.resolve("soft_temporal_nms", backend, segments.device, supported=_SOFT_SUPPORTED)
    return _SOFT_IMPLS[name](segments, scores, method, sigma, iou_threshold, float(min_score), groups, float(offset))


def _non_negative(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    if not value >= 0:
        raise ValueError(f"{name}: expected a number >= 0, got {value}")
    return float(value)


def _check_nms_args(segments, scores, groups, offset):
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
    _checks.same_device("segments", segments, scores=scores, groups=groups)
    if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset) or offset < 0:
        raise ValueError(f"offset: expected a finite number >= 0, got {offset!r}")
    if segments.device.type == "cpu" and M > 0:
        if bool(torch.isnan(segments).any()):
            raise ValueError("segments: NaN coordinates")
        bad = segments[:, 1] < segments[:, 0]
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"segments: expected end >= start, got segment {i} = ({float(segments[i, 0])}, {float(segments[i, 1])})")
    return segments, scores, groups


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
    segs = segments.detach().to(torch.float64).cpu().tolist()
    grp = [0] * len(segs) if groups is None else groups.cpu().tolist()
    kept = []
    for i in _visit_order(scores):
        if all(grp[j] != grp[i] or _overlap_reference(segs[j], segs[i], overlap, offset) <= iou_threshold for j in kept):
            kept.append(i)
    return torch.tensor(kept, dtype=torch.int64, device=segments.device)


def soft_temporal_nms_reference(segments, scores, method, sigma, iou_threshold, min_score, groups, offset):
    """Plain Python loops: select the best live segment, decay its group, repeat."""
    segs = segments.detach().to(torch.float64).cpu().tolist()
    grp = [0] * len(segs) if groups is None else groups.cpu().tolist()
    current = scores.detach().to(torch.float64).cpu().tolist()
    live = [i for i in range(len(segs)) if not (current[i] < min_score) and not math.isnan(current[i])]
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
            if not current[i] < min_score:
                survivors.append(i)
        live = survivors
    return (
        torch.tensor(chosen, dtype=torch.int64, device=segments.device),
        torch.tensor(chosen_scores, dtype=scores.dtype, device=segments.device),
    )


_HARD_IMPLS = {"reference": temporal_nms_reference}
_HARD_SUPPORTED = ("reference",)
_SOFT_IMPLS = {"reference": soft_temporal_nms_reference}
_SOFT_SUPPORTED = ("reference",)
