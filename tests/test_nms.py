"""temporal_nms and soft_temporal_nms: every backend against the plain reference,
the IoU mode against torchvision, the properties that define NMS, edge cases,
bad inputs, opcheck and torch.compile.

The kernels compute overlaps in float64 in the reference's operation order, so
hard NMS must agree exactly (indices and order), also with thresholds that integer
coordinates hit exactly. Soft-NMS indices must agree exactly and its scores
within the tolerance of the table below, with one exception. exp may differ by an
ulp between libm, CUDA and numpy under the Triton interpreter, so on the gaussian
decay a decayed score within one rounding of min_score or of another score may be
dropped or ordered differently on cuda and triton (soft_temporal_nms's docstring
says so). Integer coordinates and tied scores land that close: in a simulation of
such draws with 40 to 200 segments, an exp one ulp off changed the selections of
about 1 run in 150. There a result that differs from the reference's is replayed
on the host and must be its arithmetic up to rounding, and is reported as a
warning. Tests that compare exactly on the GPU keep their coordinates continuous.
"""

import functools
import itertools
import math
import re
import warnings

import pytest
import torch
from conftest import HAS_GPU, backend_device
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import mmsd_ext
from mmsd_ext import nms as nms_module
from mmsd_ext.nms import ON_HOST

torchvision = pytest.importorskip("torchvision")

# Soft-NMS scores at selection vs the float64 reference: a few ulps of the output
# dtype (the decays are products of float64 factors, rounded once at the end).
SOFT_SCORE_TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-300),
    torch.float32: dict(rtol=3e-7, atol=1e-38),
    torch.float16: dict(rtol=1e-3, atol=6e-8),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-38),
}

# The backend fixture is a plain name: sharing it across generated examples is safe.
_with_backend = settings(suppress_health_check=list(settings.default.suppress_health_check) + [HealthCheck.function_scoped_fixture])

# Segments per generated example, up to 200: four 64-wide tiles of the CUDA and Triton
# suppression masks (and rank words of the cpu kernel).
MAX_M = 200
# Interpreted Triton (no GPU) is slow: hard NMS launches ceil(M / 64)^2 programs of ~3 ms
# each (128: two tiles a side, ~20 ms a call); soft-NMS, one program per 64 sorted
# positions, takes ~6 ms a selection (96: two programs, ~6 s for its 20 examples).
MAX_M_INTERPRETED = 128
MAX_M_INTERPRETED_SOFT = 96
# Every dtype scores may have; the reference is the oracle for each.
SCORE_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _max_m(backend, soft=False):
    if backend == "triton" and not HAS_GPU:
        return MAX_M_INTERPRETED_SOFT if soft else MAX_M_INTERPRETED
    return MAX_M


def _segments(draw, M, integer, dtype):
    if integer:
        start = draw(st.lists(st.integers(0, 30), min_size=M, max_size=M))
        length = draw(st.lists(st.integers(0, 12), min_size=M, max_size=M))
    else:
        start = draw(st.lists(st.floats(-50, 50, allow_nan=False, width=32), min_size=M, max_size=M))
        length = draw(st.lists(st.floats(0, 30, allow_nan=False, width=32), min_size=M, max_size=M))
    seg = torch.tensor([[s, s + l] for s, l in zip(start, length)], dtype=dtype).reshape(M, 2)
    return seg


@st.composite
def nms_inputs(draw, max_m=MAX_M, allow_nan_scores=True, score_kinds=("ties", "spread", "distinct")):
    M = draw(st.integers(0, max_m))
    integer = draw(st.booleans())
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seg = _segments(draw, M, integer, dtype)
    kind = draw(st.sampled_from(score_kinds))
    if kind == "ties":
        scores = torch.tensor(draw(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0]), min_size=M, max_size=M)), dtype=torch.float64)
    elif kind == "spread":  # (hypothesis draws repeats among these too)
        scores = torch.tensor(draw(st.lists(st.floats(-2, 2, allow_nan=False), min_size=M, max_size=M)), dtype=torch.float64)
    else:
        # No tie at all, so the visit order is the scores' alone: distinct multiples of 1/64
        # within +-100/64, exact in every score dtype (bfloat16 holds integers up to 256).
        scores = (torch.tensor(draw(st.permutations(range(M))), dtype=torch.float64) - M // 2) / 64
    if allow_nan_scores and M and kind != "distinct" and draw(st.booleans()):
        special = draw(st.lists(st.sampled_from([math.nan, math.inf, -math.inf]), min_size=M, max_size=M))
        where = draw(st.lists(st.booleans(), min_size=M, max_size=M))
        scores = torch.where(torch.tensor(where), torch.tensor(special, dtype=torch.float64), scores)
    scores = scores.to(draw(st.sampled_from(SCORE_DTYPES)))
    groups = None
    if draw(st.booleans()):
        groups = torch.tensor(draw(st.lists(st.integers(-2, 3), min_size=M, max_size=M)), dtype=torch.int64).reshape(M)
    return seg, scores, groups


def _to(device, *tensors):
    return [t.to(device) if t is not None else None for t in tensors]


def _thresholds():
    # Exact fractions that integer coordinates hit (1/3, 1/2, 2/3), and others.
    return st.sampled_from([0.0, 0.1, 1 / 3, 0.5, 2 / 3, 0.7, 1.0, 1.5])


# ----------------------------------------------------------------------------
# hard NMS: backends against the reference


@_with_backend
@given(data=st.data(), threshold=_thresholds(), overlap=st.sampled_from(["iou", "other"]), offset=st.sampled_from([0.0, 1.0, 0.5]))
def test_temporal_nms_matches_reference(backend, data, threshold, overlap, offset):
    seg, scores, groups = data.draw(nms_inputs(max_m=_max_m(backend)), label="inputs")
    expected = mmsd_ext.temporal_nms(seg, scores, threshold, groups=groups, overlap=overlap, offset=offset, backend="reference")
    dev = backend_device(backend)
    seg_d, scores_d, groups_d = _to(dev, seg, scores, groups)
    got = mmsd_ext.temporal_nms(seg_d, scores_d, threshold, groups=groups_d, overlap=overlap, offset=offset, backend=backend)
    assert got.dtype == torch.int64 and got.device.type == dev.type
    assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("threshold", [1.0, 1.5])
@pytest.mark.parametrize("overlap, offset", [("iou", 0.0), ("other", 0.0), ("iou", 1.0), ("other", 0.5)])
def test_temporal_nms_keeps_everything_from_threshold_one(any_backend, threshold, overlap, offset):
    """No overlap exceeds 1, in float64 rounding too (the cpu kernel skips its search there):
    identical, nested, zero-length and huge or tiny segments all stay, in visit order."""
    gen = torch.Generator().manual_seed(11)
    f64 = dict(dtype=torch.float64)
    start = torch.cat([torch.zeros(40, **f64), torch.rand(40, generator=gen, **f64) * 1e-300,
                       torch.full((20,), 1e300, **f64), torch.randint(0, 5, (60,), generator=gen, **f64)])
    length = torch.cat([torch.ones(40, **f64), torch.rand(40, generator=gen, **f64) * 1e-300,
                        torch.full((20,), 1e290, **f64), torch.randint(0, 3, (60,), generator=gen, **f64)])
    seg = torch.stack([start, start + length], 1)
    scores = torch.randint(0, 3, (160,), generator=gen).double()
    scores[::7] = math.nan
    groups = torch.randint(0, 2, (160,), generator=gen)
    for grp in (None, groups):
        want = mmsd_ext.temporal_nms(seg, scores, threshold, groups=grp, overlap=overlap, offset=offset, backend="reference")
        assert want.numel() == 160
        dev = backend_device(any_backend)
        args = _to(dev, seg, scores, grp)
        got = mmsd_ext.temporal_nms(args[0], args[1], threshold, groups=args[2], overlap=overlap, offset=offset,
                                    backend=any_backend)
        assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.7])
@pytest.mark.parametrize("overlap", ["iou", "other"])
def test_temporal_nms_zero_length_segments(any_backend, threshold, overlap):
    """Points (start == end, offset 0) overlap nothing, so every one is kept, wherever it
    lies: on another point, inside a longer segment or at its ends (the cpu kernel skips
    its search for them)."""
    gen = torch.Generator().manual_seed(5)
    f64 = dict(dtype=torch.float64)
    points = torch.randint(0, 6, (120,), generator=gen).to(**f64)
    start = torch.randint(0, 5, (40,), generator=gen).to(**f64)
    longer = torch.stack([start, start + torch.randint(1, 4, (40,), generator=gen).to(**f64)], 1)
    seg = torch.cat([points[:, None].expand(-1, 2), longer])
    perm = torch.randperm(160, generator=gen)
    seg = seg[perm].contiguous()
    scores = torch.randint(0, 4, (160,), generator=gen).double()
    is_point = perm < 120
    for grp in (None, torch.randint(0, 2, (160,), generator=gen)):
        want = mmsd_ext.temporal_nms(seg, scores, threshold, groups=grp, overlap=overlap, backend="reference")
        assert is_point.nonzero().flatten().tolist() == sorted(i for i in want.tolist() if is_point[i])
        assert want.numel() < 160  # the longer segments do suppress each other
        args = _to(backend_device(any_backend), seg, scores, grp)
        got = mmsd_ext.temporal_nms(args[0], args[1], threshold, groups=args[2], overlap=overlap, backend=any_backend)
        assert torch.equal(got.cpu(), want)


def test_triton_float_params_are_filled_not_copied():
    """The Triton NMS ops pass their float parameters in a float64 tensor. params[i] = v
    is a copy_ from a CPU scalar tensor (on a GPU: a pageable copy that waits for the
    stream, two or four extra host waits per call); fill_ takes the value as an argument."""
    pytest.importorskip("triton")
    from torch.utils._python_dispatch import TorchDispatchMode

    from mmsd_ext.kernels import temporal_nms as nms_kernels

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Ops() as ops:
        params = nms_kernels._float64_params(torch.empty(0, device=backend_device("triton")), 0.5, 1.0, -math.inf)
    assert params.dtype == torch.float64 and params.device == backend_device("triton")
    assert params.tolist() == [0.5, 1.0, -math.inf]
    assert "copy_" not in ops.seen and "lift_fresh" not in ops.seen, ops.seen
    assert ops.seen.count("fill_") == 3, ops.seen


@pytest.mark.gpu
def test_temporal_nms_small_example_every_backend():
    # Written out by hand: 0 is kept; 1 overlaps 0 by IoU 9/11 > 0.5; 2 is disjoint; 3
    # (score NaN, visited last) overlaps 2 by 5/10 = 0.5, not more: kept.
    seg = torch.tensor([[0.0, 10.0], [1.0, 11.0], [20.0, 30.0], [25.0, 30.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, math.nan])
    for backend in mmsd_ext.available_backends():
        args = _to(backend_device(backend), seg, scores)
        got = mmsd_ext.temporal_nms(*args, 0.5, backend=backend)
        assert got.tolist() == [0, 2, 3], backend
        # "other": 3 lies inside 2, overlap 5/5 = 1 > 0.5: suppressed.
        got = mmsd_ext.temporal_nms(*args, 0.5, overlap="other", backend=backend)
        assert got.tolist() == [0, 2], backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_temporal_nms_matches_torchvision_distinct_scores(any_backend, dtype):
    # On every backend, the reference included: torchvision is an oracle independent of it.
    backend = any_backend
    gen = torch.Generator().manual_seed(1)
    dev = backend_device(backend)
    M = 150 if backend == "triton" and not HAS_GPU else 2000
    start = torch.rand(M, generator=gen, dtype=torch.float64) * 200
    seg = torch.stack([start, start + torch.rand(M, generator=gen, dtype=torch.float64) * 30], 1).to(dtype)
    scores = (torch.randperm(M, generator=gen).to(dtype) + 1) / M  # distinct
    groups = torch.randint(0, 7, (M,), generator=gen)
    boxes = torch.stack([seg[:, 0], torch.zeros(M, dtype=dtype), seg[:, 1], torch.ones(M, dtype=dtype)], 1)
    for threshold in (0.3, 0.5, 0.7):
        expected = torchvision.ops.batched_nms(boxes, scores, groups, threshold)
        got = mmsd_ext.temporal_nms(*_to(dev, seg, scores), threshold, groups=groups.to(dev), backend=backend)
        # float64: the same IoU in the same operation order as torchvision's CPU
        # kernel. float32: torchvision rounds the IoU to float32 (this op does not,
        # see the docstring and the next test); with these random coordinates no IoU
        # lies within float32 rounding of a threshold.
        assert torch.equal(got.cpu(), expected)
        expected = torchvision.ops.nms(boxes, scores, threshold)
        assert torch.equal(mmsd_ext.temporal_nms(*_to(dev, seg, scores), threshold, backend=backend).cpu(), expected)


def test_temporal_nms_float32_iou_at_the_threshold_unlike_torchvision(any_backend):
    # The docstring's example: [0, 2] and [1, 3] overlap by IoU 1/3 exactly. torchvision
    # computes it in float32 for float32 boxes (0.33333334 > 1/3, so it suppresses the
    # second); this op computes it in float64 (1/3, not above 1/3: both kept). With
    # float64 boxes the two agree.
    dev = backend_device(any_backend)
    for dtype, torchvision_keeps in ((torch.float32, [0]), (torch.float64, [0, 1])):
        seg = torch.tensor([[0.0, 2.0], [1.0, 3.0]], dtype=dtype)
        scores = torch.tensor([0.9, 0.8], dtype=dtype)
        boxes = torch.stack([seg[:, 0], torch.zeros(2, dtype=dtype), seg[:, 1], torch.ones(2, dtype=dtype)], 1)
        assert torchvision.ops.batched_nms(boxes, scores, torch.zeros(2, dtype=torch.int64), 1 / 3).tolist() == torchvision_keeps
        got = mmsd_ext.temporal_nms(seg.to(dev), scores.to(dev), 1 / 3, backend=any_backend)
        assert got.tolist() == [0, 1]


def test_temporal_nms_matches_torchvision_with_ties(any_backend):
    # torchvision's CPU sort is stable, so its tie order (lower index first) is ours:
    # exact for nms, and for batched_nms up to 1000 boxes (beyond, it re-sorts the
    # kept boxes of all groups with an unstable sort).
    backend = any_backend
    gen = torch.Generator().manual_seed(2)
    dev = backend_device(backend)
    M = 120 if backend == "triton" and not HAS_GPU else 1000
    start = torch.randint(0, 60, (M,), generator=gen).double()
    seg = torch.stack([start, start + torch.randint(0, 12, (M,), generator=gen).double()], 1)
    scores = torch.randint(0, 3, (M,), generator=gen).double()
    groups = torch.randint(0, 4, (M,), generator=gen)
    boxes = torch.stack([seg[:, 0], torch.zeros(M, dtype=torch.float64), seg[:, 1], torch.ones(M, dtype=torch.float64)], 1)
    for threshold in (0.0, 0.25, 0.5):
        got = mmsd_ext.temporal_nms(*_to(dev, seg, scores), threshold, groups=groups.to(dev), backend=backend)
        assert torch.equal(got.cpu(), torchvision.ops.batched_nms(boxes, scores, groups, threshold))
        got = mmsd_ext.temporal_nms(*_to(dev, seg, scores), threshold, backend=backend)
        assert torch.equal(got.cpu(), torchvision.ops.nms(boxes, scores, threshold))


@pytest.mark.gpu
@given(
    a=st.tuples(st.floats(-100, 100), st.floats(0, 50)),
    b=st.tuples(st.floats(-100, 100), st.floats(0, 50)),
    overlap=st.sampled_from(["iou", "other"]),
    offset=st.sampled_from([0.0, 1.0, 0.25]),
)
def test_temporal_nms_threshold_at_the_overlap(a, b, overlap, offset):
    # A threshold equal to the (rounded) overlap keeps the second segment; the next
    # double below suppresses it. The kernels decide without dividing away from the
    # threshold, so this probes their exact band.
    seg = torch.tensor([[a[0], a[0] + a[1]], [b[0], b[0] + b[1]]], dtype=torch.float64)
    scores = torch.tensor([1.0, 0.5])
    ov = nms_module._overlap_reference(seg[0].tolist(), seg[1].tolist(), overlap, offset)
    for threshold, expected in ((ov, [0, 1]), (math.nextafter(ov, -1.0), [0] if ov > 0 else [0, 1])):
        if threshold < 0:
            continue
        for backend in mmsd_ext.available_backends():
            dev = backend_device(backend)
            got = mmsd_ext.temporal_nms(seg.to(dev), scores.to(dev), threshold, overlap=overlap, offset=offset, backend=backend)
            assert got.tolist() == expected, (backend, threshold)


# ----------------------------------------------------------------------------
# hard NMS: properties


def _pair_overlap(segs, kept, cand, overlap, offset):
    return nms_module._overlap_reference(segs[kept], segs[cand], overlap, offset)


@_with_backend
@given(data=st.data(), threshold=st.sampled_from([0.0, 0.1, 1 / 3, 0.5, 2 / 3, 0.7]),
       overlap=st.sampled_from(["iou", "other"]), offset=st.sampled_from([0.0, 1.0]))
def test_temporal_nms_properties(any_backend, data, threshold, overlap, offset):
    # On every backend, the reference included: the definition of NMS is an oracle of
    # its own, where the comparisons with the reference are not. Thresholds below 1 (at
    # 1 or more nothing is suppressed, and the second property would go unchecked;
    # test_temporal_nms_keeps_everything_from_threshold_one covers those).
    seg, scores, groups = data.draw(nms_inputs(max_m=_max_m(any_backend)), label="inputs")
    dev = backend_device(any_backend)
    seg_d, scores_d, groups_d = _to(dev, seg, scores, groups)
    kept = mmsd_ext.temporal_nms(seg_d, scores_d, threshold, groups=groups_d, overlap=overlap, offset=offset, backend=any_backend)
    kept = kept.cpu().tolist()
    M = seg.shape[0]
    segs = seg.double().tolist()
    grp = [0] * M if groups is None else groups.tolist()
    rank = {i: r for r, i in enumerate(nms_module._visit_order(scores))}
    # Kept indices are distinct, in visit order.
    assert len(set(kept)) == len(kept)
    assert [rank[i] for i in kept] == sorted(rank[i] for i in kept)
    kept_set = set(kept)
    # No kept segment overlaps a kept one of its group ranked above it by more than the threshold.
    for x in kept:
        for y in kept:
            if grp[x] == grp[y] and rank[x] < rank[y]:
                assert _pair_overlap(segs, x, y, overlap, offset) <= threshold
    # Every suppressed segment overlaps a kept one of its group ranked above it.
    for i in range(M):
        if i not in kept_set:
            assert any(
                grp[k] == grp[i] and rank[k] < rank[i] and _pair_overlap(segs, k, i, overlap, offset) > threshold for k in kept
            )


@_with_backend
@given(data=st.data(), seed=st.integers(0, 2**16), threshold=_thresholds(), overlap=st.sampled_from(["iou", "other"]),
       offset=st.sampled_from([0.0, 0.5, 1.0]))
def test_temporal_nms_permutation_invariance(any_backend, data, seed, threshold, overlap, offset):
    # Distinct scores (in each score dtype): the visit order is unique, so relabelling the
    # segments only relabels the result.
    inputs = nms_inputs(max_m=_max_m(any_backend), allow_nan_scores=False, score_kinds=("distinct",))
    seg, scores, groups = data.draw(inputs, label="inputs")
    M = seg.shape[0]
    perm = torch.randperm(M, generator=torch.Generator().manual_seed(seed))
    g_perm = None if groups is None else groups[perm]
    dev = backend_device(any_backend)
    seg_d, scores_d, groups_d, seg_p, scores_p, groups_p = _to(dev, seg, scores, groups, seg[perm], scores[perm], g_perm)
    kw = dict(overlap=overlap, offset=offset, backend=any_backend)
    kept = mmsd_ext.temporal_nms(seg_d, scores_d, threshold, groups=groups_d, **kw)
    kept_perm = mmsd_ext.temporal_nms(seg_p, scores_p, threshold, groups=groups_p, **kw)
    assert torch.equal(perm[kept_perm.cpu()], kept.cpu())


# ----------------------------------------------------------------------------
# hard NMS: edge cases


def test_sparse_group_ids_keep_the_lower_index_on_ties(backend):
    """Group ids spread far wider than the number of segments (here up to 10**12): the CPU
    groups them with a comparison sort instead of counting, which must keep the input order
    within a group so that equal scores still go to the lower index."""
    dev = backend_device(backend)
    M = 64
    seg = torch.tensor([[0.0, 1.0]] * M, dtype=torch.float64)
    scores = torch.ones(M, dtype=torch.float64)
    idx = torch.arange(M)
    groups = (idx % 2) * 10**12 + (idx % 4 // 2) * 7 - 5
    keep = mmsd_ext.temporal_nms(*_to(dev, seg, scores), 0.5, groups=groups.to(dev), backend=backend)
    assert keep.cpu().tolist() == [0, 1, 2, 3]
    expected = mmsd_ext.soft_temporal_nms(seg, scores, groups=groups, method="linear", backend="reference")
    got = mmsd_ext.soft_temporal_nms(*_to(dev, seg, scores), groups=groups.to(dev), method="linear", backend=backend)
    assert expected[0][:4].tolist() == [0, 1, 2, 3]
    assert torch.equal(got[0].cpu(), expected[0]) and torch.equal(got[1].cpu(), expected[1])


@pytest.mark.parametrize("offset", [math.inf, math.nan])
def test_a_non_finite_offset_is_refused_by_name(any_backend, offset):
    # Every overlap would be NaN (inf / inf): nothing suppressed, without a word.
    dev = backend_device(any_backend)
    seg = torch.tensor([[0.0, 1.0], [0.0, 1.0]], device=dev)
    scores = torch.tensor([0.5, 0.4], device=dev)
    with pytest.raises(ValueError, match="^offset: "):
        mmsd_ext.temporal_nms(seg, scores, 0.5, offset=offset, backend=any_backend)
    with pytest.raises(ValueError, match="^offset: "):
        mmsd_ext.soft_temporal_nms(seg, scores, offset=offset, backend=any_backend)


@pytest.mark.parametrize("two_groups", [False, True])
def test_soft_nms_a_negative_score_decayed_to_a_tie_at_a_lower_index_comes_second(any_backend, two_groups):
    """A linear decay raises a negative score: segment 0 ([0, 4], -1.0) under segment 1
    ([0, 2], -0.5; IoU 0.5) becomes exactly -0.5, the score just selected, at a lower index.
    Segment 1 was selected first, so 0 comes second, whatever the index order of ties."""
    dev = backend_device(any_backend)
    seg = torch.tensor([[0.0, 4.0], [0.0, 2.0]], dtype=torch.float64)
    scores = torch.tensor([-1.0, -0.5], dtype=torch.float64)
    groups = None
    if two_groups:  # a second group whose segment ties with both
        seg = torch.cat([seg, torch.tensor([[50.0, 51.0]], dtype=torch.float64)])
        scores = torch.cat([scores, torch.tensor([-0.5], dtype=torch.float64)])
        groups = torch.tensor([0, 0, 1])
    expected = [1, 0] if not two_groups else [1, 0, 2]
    idx, val = mmsd_ext.soft_temporal_nms(seg.to(dev), scores.to(dev), method="linear", iou_threshold=0.3,
                                          min_score=-math.inf, groups=None if groups is None else groups.to(dev),
                                          backend=any_backend)
    assert idx.cpu().tolist() == expected and val.cpu().tolist() == [-0.5] * len(expected)


def test_temporal_nms_empty_and_single(any_backend):
    dev = backend_device(any_backend)
    for dtype in (torch.float32, torch.float64):
        empty = mmsd_ext.temporal_nms(torch.zeros(0, 2, dtype=dtype, device=dev), torch.zeros(0, device=dev), 0.5, backend=any_backend)
        assert empty.shape == (0,) and empty.dtype == torch.int64
        groups = torch.zeros(0, dtype=torch.int64, device=dev)
        empty = mmsd_ext.temporal_nms(torch.zeros(0, 2, dtype=dtype, device=dev), torch.zeros(0, device=dev), 0.5, groups=groups, backend=any_backend)
        assert empty.shape == (0,)
        one = mmsd_ext.temporal_nms(torch.tensor([[1.0, 2.0]], dtype=dtype, device=dev), torch.tensor([math.nan], device=dev), 0.0, backend=any_backend)
        assert one.tolist() == [0]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("overlap", ["iou", "other"])  # (the warnings: numpy under the Triton interpreter)
def test_temporal_nms_lengths_past_the_float64_range(any_backend, overlap):
    """Segments whose length overflows float64 (end - start > 1.8e308): their overlap is
    inf / inf = NaN, which is not "more than" the threshold, so it suppresses nothing on any
    backend (before 2026-11-27 the reference suppressed with overlap="other"); a finite
    segment inside one is still suppressed by it."""
    dev = backend_device(any_backend)
    segments = torch.tensor([[-1e308, 1e308], [-1e308, 1e308], [0.0, 1.0]], dtype=torch.float64, device=dev)
    scores = torch.tensor([1.0, 0.5, 0.4], device=dev)
    kept = mmsd_ext.temporal_nms(segments, scores, 0.5, overlap=overlap, backend=any_backend)
    assert kept.tolist() == ([0, 1] if overlap == "other" else [0, 1, 2])


def test_temporal_nms_many_groups(backend):
    gen = torch.Generator().manual_seed(3)
    dev = backend_device(backend)
    G, per = (12, 6) if backend == "triton" and not HAS_GPU else (600, 9)
    M = G * per
    groups = torch.randperm(M, generator=gen) % G  # interleaved, not sorted
    start = torch.randint(0, 20, (M,), generator=gen).float()
    seg = torch.stack([start, start + torch.randint(1, 8, (M,), generator=gen).float()], 1)
    scores = torch.rand(M, generator=gen)
    for overlap, offset in (("iou", 0.0), ("other", 1.0)):
        expected = mmsd_ext.temporal_nms(seg, scores, 0.4, groups=groups, overlap=overlap, offset=offset, backend="reference")
        got = mmsd_ext.temporal_nms(seg.to(dev), scores.to(dev), 0.4, groups=groups.to(dev), overlap=overlap, offset=offset, backend=backend)
        assert torch.equal(got.cpu(), expected)


def _strided_inputs(dev):
    """(segments, scores, groups) on dev, none of them contiguous, for every score dtype:
    transposed or row-and-column strided segments, scores and groups of every other element.
    A kernel that read them as if contiguous would see other values."""
    gen = torch.Generator().manual_seed(4)
    M = 30
    base = torch.rand(2, M, generator=gen, dtype=torch.float64) * 20
    seg_t = torch.stack([base[0], base[0] + base[1]]).to(dev)  # [2, M]
    padded = torch.zeros(2 * M, 4, dtype=torch.float64, device=dev)
    padded[::2, ::2] = seg_t.t()
    wide = torch.rand(2 * M, generator=gen).to(dev)
    groups = (torch.arange(2 * M, device=dev) % 3)[::2]
    for seg, dtype in itertools.product((seg_t.t(), padded[::2, ::2]), SCORE_DTYPES):
        scores = wide.to(dtype)[::2]
        assert not (seg.is_contiguous() or scores.is_contiguous() or groups.is_contiguous())
        yield seg, scores, groups


def _contiguous_on_host(*tensors):
    return [t.cpu().contiguous() for t in tensors]


def test_temporal_nms_score_dtypes_and_noncontiguous(any_backend):
    for seg, scores, groups in _strided_inputs(backend_device(any_backend)):
        contiguous = _contiguous_on_host(seg, scores, groups)
        expected = mmsd_ext.temporal_nms(*contiguous[:2], 0.3, groups=contiguous[2], backend="reference")
        got = mmsd_ext.temporal_nms(seg, scores, 0.3, groups=groups, backend=any_backend)
        assert torch.equal(got.cpu(), expected), (seg.stride(), scores.dtype)


def test_soft_temporal_nms_score_dtypes_and_noncontiguous(any_backend):
    for seg, scores, groups in _strided_inputs(backend_device(any_backend)):
        contiguous = _contiguous_on_host(seg, scores, groups)
        idx_ref, val_ref = mmsd_ext.soft_temporal_nms(*contiguous[:2], groups=contiguous[2], backend="reference")
        idx, val = mmsd_ext.soft_temporal_nms(seg, scores, groups=groups, backend=any_backend)
        assert torch.equal(idx.cpu(), idx_ref), (seg.stride(), scores.dtype)
        torch.testing.assert_close(val.cpu(), val_ref, **SOFT_SCORE_TOL[scores.dtype])


def test_temporal_nms_does_not_modify_inputs(backend):
    dev = backend_device(backend)
    seg = torch.tensor([[3.0, 5.0], [0.0, 4.0], [1.0, 4.0]], device=dev)
    scores = torch.tensor([0.1, 0.9, 0.5], device=dev)
    groups = torch.tensor([2, 1, 1], device=dev)
    copies = [t.clone() for t in (seg, scores, groups)]
    mmsd_ext.temporal_nms(seg, scores, 0.2, groups=groups, backend=backend)
    mmsd_ext.soft_temporal_nms(seg, scores, groups=groups, backend=backend)
    for t, c in zip((seg, scores, groups), copies):
        assert torch.equal(t, c)


def test_temporal_nms_triton_band_mask(monkeypatch):
    # Past _DENSE_MASK_MAX_SEGMENTS the triton backend sizes the mask band from the
    # largest group; force that path on a small input.
    if "triton" not in mmsd_ext.available_backends():
        pytest.skip("triton backend not available")
    monkeypatch.setattr(nms_module, "_DENSE_MASK_MAX_SEGMENTS", 0)
    gen = torch.Generator().manual_seed(5)
    dev = backend_device("triton")
    M = 200
    groups = torch.sort(torch.randint(0, 6, (M,), generator=gen)).values
    start = torch.rand(M, generator=gen) * 40
    seg = torch.stack([start, start + torch.rand(M, generator=gen) * 10], 1)
    scores = torch.rand(M, generator=gen)
    expected = mmsd_ext.temporal_nms(seg, scores, 0.3, groups=groups, backend="reference")
    got = mmsd_ext.temporal_nms(seg.to(dev), scores.to(dev), 0.3, groups=groups.to(dev), backend="triton")
    assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("method", ["gaussian", "linear"])
def test_soft_temporal_nms_triton_groups_over_several_chunks(monkeypatch, method):
    # Groups larger than SOFT_BLOCK take the chunked loops (argmax merged across
    # chunks, decay chunk by chunk); shrink the chunk so a small input reaches them.
    if "triton" not in mmsd_ext.available_backends():
        pytest.skip("triton backend not available")
    from mmsd_ext.kernels import temporal_nms as soft_kernels

    monkeypatch.setattr(soft_kernels, "SOFT_BLOCK", 16)
    gen = torch.Generator().manual_seed(6)
    dev = backend_device("triton")
    M = 90
    groups = torch.randint(0, 2, (M,), generator=gen)  # two groups of about 45: 3 chunks each
    # Continuous coordinates: after decays, scores tie only where their histories are
    # equal (exp(0) = 1 exactly), so a GPU's exp cannot reorder near-ties.
    start = torch.rand(M, generator=gen, dtype=torch.float64) * 30
    seg = torch.stack([start, start + 1 + torch.rand(M, generator=gen, dtype=torch.float64) * 9], 1)
    scores = torch.rand(M, generator=gen, dtype=torch.float64)
    scores[::7] = 1.0  # tied at the top, across chunks: lower index first
    kw = dict(method=method, sigma=0.5, iou_threshold=0.2, min_score=0.05, groups=groups, offset=1.0)
    ref_index, ref_score = mmsd_ext.soft_temporal_nms(seg, scores, backend="reference", **kw)
    index, score = mmsd_ext.soft_temporal_nms(seg.to(dev), scores.to(dev), backend="triton", **dict(kw, groups=groups.to(dev)))
    assert ref_index.numel() > 6
    assert torch.equal(index.cpu(), ref_index)
    assert torch.allclose(score.cpu(), ref_score, rtol=1e-12, atol=0)


def test_temporal_nms_cpu_million_segments():
    # M = 1e6 on the CPU: 2000 disjoint windows of 500 segments. One group and
    # groups = window id must agree (no segment reaches across windows), and
    # the kept segments of each window must not overlap above the threshold.
    if "cpu" not in mmsd_ext.available_backends():
        pytest.skip("cpu backend not available")
    gen = torch.Generator().manual_seed(6)
    M, W = 1_000_000, 2000
    window = torch.arange(M) % W
    start = window * 100.0 + torch.rand(M, generator=gen, dtype=torch.float64) * 40
    seg = torch.stack([start, start + torch.rand(M, generator=gen, dtype=torch.float64) * 40], 1)
    scores = torch.rand(M, generator=gen, dtype=torch.float64)
    kept = mmsd_ext.temporal_nms(seg, scores, 0.5, backend="cpu")
    assert torch.equal(kept, mmsd_ext.temporal_nms(seg, scores, 0.5, groups=window, backend="cpu"))
    assert 0 < kept.numel() < M
    # Check one window against the reference.
    idx = (window == 7).nonzero().squeeze(1)
    sub = mmsd_ext.temporal_nms(seg[idx], scores[idx], 0.5, backend="reference")
    assert torch.equal(kept[window[kept] == 7], idx[sub])


def _short_segments_with_long_ones(M, gen):
    """M segments: short ones (lengths 0..6) spread over [0, 3M], plus, at the top
    score, one covering the whole timeline (a whole-video proposal), one at the lowest
    score covering it too, one far after everything, and a few of medium length."""
    start = torch.rand(M, generator=gen, dtype=torch.float64) * 3 * M
    seg = torch.stack([start, start + torch.randint(0, 7, (M,), generator=gen).double()], 1)
    scores = torch.rand(M, generator=gen, dtype=torch.float64)
    seg[0], scores[0] = torch.tensor([0.0, 3.0 * M]), 2.0
    seg[1], scores[1] = torch.tensor([-1.0, 3.0 * M + 6]), -1.0
    seg[2], scores[2] = torch.tensor([5.0 * M, 9.0 * M]), 1.5
    for k in range(3, 8):
        seg[k, 1] = seg[k, 0] + M / 4 * k
    return seg, scores


@pytest.mark.parametrize("overlap", ["iou", "other"])
def test_temporal_nms_long_segments_among_short_ones(backend, overlap):
    # A long kept segment once widened every candidate's search window on the CPU;
    # the results must not depend on how the kernel finds the kept segments to test.
    gen = torch.Generator().manual_seed(12)
    dev = backend_device(backend)
    M = 100 if backend == "triton" and not HAS_GPU else 400
    seg, scores = _short_segments_with_long_ones(M, gen)
    groups = torch.randint(0, 2, (M,), generator=gen)
    for threshold, offset, g in ((0.0, 0.0, None), (0.3, 1.0, None), (0.6, 0.0, groups), (1 / 3, 0.0, None)):
        expected = mmsd_ext.temporal_nms(seg, scores, threshold, groups=g, overlap=overlap, offset=offset, backend="reference")
        got = mmsd_ext.temporal_nms(
            seg.to(dev), scores.to(dev), threshold, groups=None if g is None else g.to(dev), overlap=overlap, offset=offset, backend=backend
        )
        assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("method", ["gaussian", "linear"])
def test_soft_temporal_nms_long_segments_among_short_ones(backend, method):
    gen = torch.Generator().manual_seed(13)
    M = 64 if backend == "triton" and not HAS_GPU else 300
    seg, scores = _short_segments_with_long_ones(M, gen)
    for offset in (0.0, 1.0):
        params = dict(method=method, sigma=0.5, iou_threshold=0.1, min_score=1e-3, offset=offset)
        _check_soft(backend, seg, scores, None, params)


def _windows_and_one_long(M, long_kind, gen):
    """M short segments (lengths below 1) in M / 100 disjoint windows of 100 (window w
    spans [100 w, 100 w + 81]), sparse enough that NMS keeps most of them, then one
    long segment, scored above all: "cover" spans every window, "far" lies after them
    all. Returns segments, scores, window ids."""
    window = torch.arange(M) % (M // 100)
    start = window * 100.0 + torch.rand(M, generator=gen, dtype=torch.float64) * 80
    seg = torch.stack([start, start + torch.rand(M, generator=gen, dtype=torch.float64)], 1)
    scores = torch.rand(M, generator=gen, dtype=torch.float64)
    span = 100.0 * (M // 100)
    long = [0.0, span] if long_kind == "cover" else [2 * span, 3 * span]
    return torch.cat([seg, torch.tensor([long], dtype=torch.float64)]), torch.cat([scores, torch.tensor([2.0], dtype=torch.float64)]), window


@pytest.mark.parametrize("overlap,long_kind", [("iou", "cover"), ("other", "far")])
def test_temporal_nms_cpu_long_segment_at_scale(overlap, long_kind):
    # 200k short segments and one long one scored first that suppresses none of them
    # (IoU below 5e-6 with the cover; the far one touches nothing): the kept
    # segments are the long one, then those of the short ones alone. The CPU kernel
    # once let the long segment widen every candidate's search window to the whole
    # timeline, O(M x kept): about 20 s at this size on a 2-core machine (measured
    # 0.19 s at M = 2e4, growing with M^2); now tens of milliseconds.
    if "cpu" not in mmsd_ext.available_backends():
        pytest.skip("cpu backend not available")
    gen = torch.Generator().manual_seed(14)
    M = 200_000
    seg, scores, window = _windows_and_one_long(M, long_kind, gen)
    kept = mmsd_ext.temporal_nms(seg, scores, 0.4, overlap=overlap, backend="cpu")
    short = mmsd_ext.temporal_nms(seg[:M], scores[:M], 0.4, overlap=overlap, backend="cpu")
    assert kept[0] == M and torch.equal(kept[1:], short)
    assert 0 < short.numel() < M
    # One window against the reference.
    idx = (window == 3).nonzero().squeeze(1)
    sub = mmsd_ext.temporal_nms(seg[idx], scores[idx], 0.4, overlap=overlap, backend="reference")
    assert torch.equal(short[window[short] == 3], idx[sub])


@pytest.mark.parametrize("method,long_kind", [("linear", "cover"), ("gaussian", "far")])
def test_soft_temporal_nms_cpu_long_segment_at_scale(method, long_kind):
    # As above for soft-NMS (once about 25 s at this size, now tens of milliseconds):
    # the long segment is selected first and decays nothing (linear: IoU below the
    # threshold; far: no intersection), so the selections are the long one, then
    # those of the short segments alone.
    if "cpu" not in mmsd_ext.available_backends():
        pytest.skip("cpu backend not available")
    gen = torch.Generator().manual_seed(15)
    M = 200_000
    seg, scores, window = _windows_and_one_long(M, long_kind, gen)
    params = dict(method=method, sigma=0.5, iou_threshold=0.3, min_score=1e-3)
    idx, val = mmsd_ext.soft_temporal_nms(seg, scores, backend="cpu", **params)
    short_idx, short_val = mmsd_ext.soft_temporal_nms(seg[:M], scores[:M], backend="cpu", **params)
    assert idx[0] == M and val[0] == 2.0
    assert torch.equal(idx[1:], short_idx) and torch.equal(val[1:], short_val)
    # One window against the reference: its selections, in their order, are its own.
    members = (window == 3).nonzero().squeeze(1)
    ref_idx, ref_val = mmsd_ext.soft_temporal_nms(seg[members], scores[members], backend="reference", **params)
    mine = window[short_idx] == 3
    assert torch.equal(short_idx[mine], members[ref_idx])
    torch.testing.assert_close(short_val[mine], ref_val, **SOFT_SCORE_TOL[torch.float64])


# ----------------------------------------------------------------------------
# soft-NMS


@st.composite
def soft_params(draw):
    method = draw(st.sampled_from(["gaussian", "linear"]))
    sigma = draw(st.sampled_from([0.1, 0.5, 2.0]))
    threshold = draw(st.sampled_from([0.0, 0.3, 0.5]))
    min_score = draw(st.sampled_from([1e-3, 0.0, 0.3, -1.0, -math.inf]))
    offset = draw(st.sampled_from([0.0, 1.0]))
    return dict(method=method, sigma=sigma, iou_threshold=threshold, min_score=min_score, offset=offset)


def _check_soft(backend, seg, scores, groups, params):
    idx_ref, val_ref = mmsd_ext.soft_temporal_nms(seg, scores, groups=groups, backend="reference", **params)
    dev = backend_device(backend)
    seg_d, scores_d, groups_d = _to(dev, seg, scores, groups)
    idx, val = mmsd_ext.soft_temporal_nms(seg_d, scores_d, groups=groups_d, backend=backend, **params)
    assert idx.dtype == torch.int64 and val.dtype == scores.dtype and val.device.type == dev.type
    idx, val = idx.cpu(), val.cpu()
    if torch.equal(idx, idx_ref):
        torch.testing.assert_close(val, val_ref, **SOFT_SCORE_TOL[scores.dtype])
        return
    # Only the gaussian factor's exp may differ from the C library's, and only on cuda
    # and triton (the docstring's rule): there a score within one rounding of another,
    # or of min_score, may be ordered or dropped otherwise. Such a result must be the
    # reference's own arithmetic up to rounding, and is reported.
    assert backend in ("cuda", "triton") and params["method"] == "gaussian", f"{idx.tolist()} != {idx_ref.tolist()}"
    replayed, latitude = _soft_replay_within_rounding(seg, scores, groups, params, idx)
    torch.testing.assert_close(val, torch.tensor(replayed, dtype=torch.float64).to(scores.dtype), **SOFT_SCORE_TOL[scores.dtype])
    warnings.warn(f"soft_temporal_nms on {backend}: selections differ from the reference within rounding at {latitude}")


# Two float64 scores "within rounding" of each other: a few ulps a decay of any run here
# (up to 300 decays of a score), and anything below 1e-300, where subnormals lose bits.
WITHIN_ROUNDING = dict(rel_tol=1e-12, abs_tol=1e-300)


def _soft_replay_within_rounding(seg, scores, groups, params, idx):
    """Replays gaussian soft-NMS in float64 on the host along the selection order idx
    and checks it is the reference's up to what an exp's last bit can decide. A score
    is exact when no exp can change it: not decayed by a factor other than exp(0) = 1,
    or 0, or infinite. Each selection must be live, and every live segment the
    reference would select before it (a higher score, or an equal one at a lower
    index) within rounding of it, the two not both exact and not decayed alike (the
    same initial score and factors give equal values under any exp). A score within
    rounding of min_score (nonzero: decays keep a score's sign) may be kept or
    dropped unless exact. No other live segment may be left unselected. Returns the
    scores at selection and where rounding decided. Not modelled: an exp that
    underflows to 0 on one device only (an infinite score would be NaN there): that
    takes sigma below about 1.3e-3, which no caller uses."""
    segs = seg.to(torch.float64).tolist()
    grp = [0] * len(segs) if groups is None else groups.tolist()
    current = scores.to(torch.float64).tolist()
    history = [(c, ()) for c in current]  # initial score, exp arguments other than 0
    floor = params["min_score"]

    def exact(j):
        return not history[j][1] or current[j] == 0 or math.isinf(current[j])

    def state(j):
        x = current[j]
        if math.isnan(x):
            return None
        if math.isfinite(floor) and floor != 0 and not exact(j) and math.isclose(x, floor, **WITHIN_ROUNDING):
            return "edge"  # kept or dropped, as rounding has it
        return "live" if x >= floor else None

    alive = {j: state(j) for j in range(len(current))}
    alive = {j: s for j, s in alive.items() if s}
    replayed, latitude = [], []
    for p, i in enumerate(idx.tolist()):
        assert i in alive, f"selection {p}: segment {i} is not live (dropped, or selected before)"
        for j in alive:
            if alive[j] != "live" or not (current[j] > current[i] or (current[j] == current[i] and j < i)):
                continue
            assert math.isclose(current[j], current[i], **WITHIN_ROUNDING), f"selection {p}: segment {i} at {current[i]!r}, below {j} at {current[j]!r}"
            assert not (exact(i) and exact(j)), f"selection {p}: segment {i} before {j}, their scores exact ({current[i]!r}, {current[j]!r})"
            assert history[i] != history[j], f"selection {p}: segment {i} before {j}, an equal score with the same decays"
            latitude.append(f"{p}: {i} before {j}")
        if alive[i] == "edge":
            latitude.append(f"{p}: {i} at min_score")
        replayed.append(current[i])
        del alive[i]
        for j in list(alive):
            if grp[j] == grp[i]:
                iou = nms_module._overlap_reference(segs[i], segs[j], "iou", params["offset"])
                arg = -(iou * iou) / params["sigma"]
                current[j] *= math.exp(arg)
                if arg != 0:
                    history[j] = (history[j][0], history[j][1] + (arg,))
                now = state(j)
                if now:
                    alive[j] = now
                else:
                    del alive[j]
    left = [j for j, s in alive.items() if s == "live"]
    assert not left, f"segments {left} left live after the last selection"
    latitude += [f"{j} at min_score dropped" for j in sorted(alive)]
    return replayed, latitude


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf * 0 under the interpreter
@_with_backend
@given(data=st.data(), params=soft_params())
def test_soft_temporal_nms_matches_reference(backend, data, params):
    seg, scores, groups = data.draw(nms_inputs(max_m=_max_m(backend, soft=True)), label="inputs")
    _check_soft(backend, seg, scores, groups, params)


def _distinct_scores_and_permutation(M, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(M, generator=gen, dtype=torch.float64) + 0.01, torch.randperm(M, generator=gen)


def _check_soft_permutation(backend, seg, groups, seed, params):
    # Distinct continuous scores: no ties in the input, and (but for a coincidence of
    # measure zero) none after decays among normal numbers, so the selections and their
    # scores (the same products in the same order) only follow the relabelling. Below
    # float64's smallest normal number they need not: a linear decay by IoU 1 (identical
    # segments) gives exactly 0, and repeated Gaussian decays by IoU 1 take scores into
    # the subnormals, where distinct ones round to the same few bits. Equal scores are
    # selected by index, so that tail (selected last: scores only decay) is compared as a
    # set.
    M = seg.shape[0]
    scores, perm = _distinct_scores_and_permutation(M, seed)
    g_perm = None if groups is None else groups[perm]
    dev = backend_device(backend)
    seg_d, scores_d, groups_d, seg_p, scores_p, groups_p = _to(dev, seg, scores, groups, seg[perm], scores[perm], g_perm)
    idx, val = mmsd_ext.soft_temporal_nms(seg_d, scores_d, groups=groups_d, backend=backend, **params)
    idx_perm, val_perm = mmsd_ext.soft_temporal_nms(seg_p, scores_p, groups=groups_p, backend=backend, **params)
    idx, val, idx_perm, val_perm = idx.cpu(), val.cpu(), idx_perm.cpu(), val_perm.cpu()
    normal = int((val >= torch.finfo(torch.float64).tiny).sum())
    assert bool((val[normal:] < torch.finfo(torch.float64).tiny).all()) and val_perm.shape == val.shape
    assert torch.equal(val_perm[:normal], val[:normal])
    assert torch.equal(perm[idx_perm[:normal]], idx[:normal])
    assert torch.equal(perm[idx_perm[normal:]].sort().values, idx[normal:].sort().values)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # as above, under the interpreter
@_with_backend
@given(data=st.data(), seed=st.integers(0, 2**16), params=soft_params())
def test_soft_temporal_nms_permutation_invariance(any_backend, data, seed, params):
    seg, _, groups = data.draw(nms_inputs(max_m=_max_m(any_backend, soft=True), allow_nan_scores=False), label="inputs")
    _check_soft_permutation(any_backend, seg, groups, seed, params)


def test_soft_temporal_nms_permutation_invariance_of_identical_segments(any_backend):
    # Linear decays by IoU 1 reach exactly 0: a tie at the end, selected by index.
    params = dict(method="linear", sigma=0.1, iou_threshold=0.0, min_score=0.0, offset=1.0)
    for seed in range(3):
        _check_soft_permutation(any_backend, torch.zeros(4, 2, dtype=torch.float64), None, seed, params)
    # Gaussian decays by IoU 1, exp(-20) a selection: after about 36 the scores left are
    # subnormal, distinct ones can round to one value, and the tie is selected by index
    # (found by a dev-profile run, 100 segments at sigma 0.1). With this seed the
    # permuted run's selection order differs among the subnormal scores.
    params = dict(params, method="gaussian", sigma=0.05)
    seg = torch.zeros(40, 2, dtype=torch.float64)
    _check_soft_permutation(any_backend, seg, None, 3, params)
    scores, perm = _distinct_scores_and_permutation(40, 3)
    idx, val = mmsd_ext.soft_temporal_nms(seg, scores, backend="reference", **params)
    idx_perm = mmsd_ext.soft_temporal_nms(seg, scores[perm], backend="reference", **params)[0]
    positive = int((val > 0).sum())
    assert not torch.equal(perm[idx_perm[:positive]], idx[:positive])


def _two_mirrored_groups(sigma):
    """Two groups of three: a target segment decayed by two others, in one order in
    group 0 and in the other order in group 1. With score 0.7 and sigma 0.5 the
    targets' float64 products differ in the last bit (group 1's is one ulp higher);
    with sigma 2 they are equal."""
    seg = torch.tensor([[5, 15], [17, 30], [10, 20], [17, 30], [5, 15], [10, 20]], dtype=torch.float64)
    scores = torch.tensor([1.0, 0.9, 0.7] * 2, dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    params = dict(method="gaussian", sigma=sigma, iou_threshold=0.3, min_score=1e-3, offset=0.0)
    return seg, scores, groups, params


def test_soft_replay_takes_rounding_and_nothing_else():
    # The replay that lets a GPU's exp order near ties otherwise (_check_soft): it
    # takes the reference's order, a near tie or min_score decided the other way, and
    # refuses every other order.
    seg, scores, groups, params = _two_mirrored_groups(0.5)
    idx, val = mmsd_ext.soft_temporal_nms(seg, scores, groups=groups, backend="reference", **params)
    assert idx.tolist() == [0, 3, 1, 4, 5, 2] and val[4] > val[5] and math.isclose(val[4], val[5], **WITHIN_ROUNDING)
    replay = functools.partial(_soft_replay_within_rounding, seg, scores, groups)
    replayed, latitude = replay(params, idx)
    assert replayed == val.tolist() and latitude == []
    assert replay(params, torch.tensor([0, 3, 1, 4, 2, 5]))[1] == ["4: 2 before 5"]
    with pytest.raises(AssertionError, match="selection 1: segment 1 at 0.9, below 3 at 1.0"):
        replay(params, torch.tensor([0, 1, 3, 4, 5, 2]))
    # 1 and 4 tie at 0.9, neither decayed (IoU 0 with 0 and 3: a factor exp(0) = 1).
    with pytest.raises(AssertionError, match=re.escape("selection 2: segment 4 before 1, their scores exact (0.9, 0.9)")):
        replay(params, torch.tensor([0, 3, 4, 1, 5, 2]))
    with pytest.raises(AssertionError, match=re.escape("segments [2] left live")):
        replay(params, torch.tensor([0, 3, 1, 4, 5]))
    with pytest.raises(AssertionError, match="selection 4: segment 0 is not live"):
        replay(params, torch.tensor([0, 3, 1, 4, 0]))
    # Equal targets by other decay orders: an exp one ulp off could order them either way.
    _, _, _, tied = _two_mirrored_groups(2.0)
    idx, val = mmsd_ext.soft_temporal_nms(seg, scores, groups=groups, backend="reference", **tied)
    assert idx.tolist() == [0, 3, 1, 4, 2, 5] and val[4] == val[5]
    assert replay(tied, idx)[1] == []
    assert replay(tied, torch.tensor([0, 3, 1, 4, 5, 2]))[1] == ["4: 5 before 2"]
    # Ties of equal decays, and of infinite scores, go by index under any exp.
    seg3 = torch.tensor([[0.0, 10.0], [1.0, 11.0], [1.0, 11.0], [1.0, 11.0]], dtype=torch.float64)
    for top, equal in ((1.0, 0.5), (math.inf, math.inf)):
        scores3 = torch.tensor([top, equal, equal, equal], dtype=torch.float64)
        assert _soft_replay_within_rounding(seg3, scores3, None, params, torch.tensor([0, 1, 2, 3]))[1] == []
        with pytest.raises(AssertionError, match="selection 1: segment 2 before 1"):
            _soft_replay_within_rounding(seg3, scores3, None, params, torch.tensor([0, 2, 1, 3]))
    # min_score at the higher target, one ulp above the other: the reference keeps the
    # one and drops the other; rounding could keep both, or neither.
    at_edge = dict(params, min_score=replayed[4])
    assert replayed[4] == math.nextafter(replayed[5], math.inf)
    idx = mmsd_ext.soft_temporal_nms(seg, scores, groups=groups, backend="reference", **at_edge)[0]
    assert idx.tolist() == [0, 3, 1, 4, 5]
    assert replay(at_edge, idx)[1] == ["4: 5 at min_score", "2 at min_score dropped"]
    assert replay(at_edge, torch.tensor([0, 3, 1, 4]))[1] == ["2 at min_score dropped", "5 at min_score dropped"]
    assert replay(at_edge, torch.tensor([0, 3, 1, 4, 5, 2]))[1] == ["4: 5 at min_score", "5: 2 at min_score"]
    far = dict(params, min_score=0.6)  # far above both: no latitude
    with pytest.raises(AssertionError, match="selection 4: segment 2 is not live"):
        replay(far, torch.tensor([0, 3, 1, 4, 2]))
    # Undecayed scores at min_score are exact: one at -1 is kept at min_score -1, one an
    # ulp below is dropped, also where a decay would raise it past -1 later.
    seg2 = torch.tensor([[0.0, 10.0], [5.0, 15.0]], dtype=torch.float64)
    for low, expected in ((-1.0, [0, 1]), (math.nextafter(-1.0, -2.0), [0])):
        scores2 = torch.tensor([1.0, low], dtype=torch.float64)
        low_floor = dict(params, min_score=-1.0)
        assert mmsd_ext.soft_temporal_nms(seg2, scores2, backend="reference", **low_floor)[0].tolist() == expected
        assert _soft_replay_within_rounding(seg2, scores2, None, low_floor, torch.tensor(expected))[1] == []
    with pytest.raises(AssertionError, match=re.escape("segments [1] left live")):
        _soft_replay_within_rounding(seg2, torch.tensor([1.0, -1.0], dtype=torch.float64), None, low_floor, torch.tensor([0]))


@pytest.mark.gpu
def test_soft_temporal_nms_small_example_every_backend():
    # Gaussian, sigma 0.5: 0 is selected (0.9); 1 overlaps it by IoU 9/11 and decays
    # to 0.8 exp(-(9/11)^2 / 0.5) = 0.2104...; 2 is untouched (0.7) and comes before it.
    seg = torch.tensor([[0.0, 10.0], [1.0, 11.0], [20.0, 30.0]], dtype=torch.float64)
    scores = torch.tensor([0.9, 0.8, 0.7], dtype=torch.float64)
    for backend in mmsd_ext.available_backends():
        dev = backend_device(backend)
        idx, val = mmsd_ext.soft_temporal_nms(*_to(dev, seg, scores), backend=backend)
        assert idx.tolist() == [0, 2, 1], backend
        expected = torch.tensor([0.9, 0.7, 0.8 * math.exp(-((9 / 11) ** 2) / 0.5)], dtype=torch.float64)
        torch.testing.assert_close(val.cpu(), expected)
        idx, val = mmsd_ext.soft_temporal_nms(*_to(dev, seg, scores), method="linear", iou_threshold=0.3, backend=backend)
        torch.testing.assert_close(val.cpu(), torch.tensor([0.9, 0.7, 0.8 * (1 - 9 / 11)], dtype=torch.float64))


def test_soft_temporal_nms_groups_and_dtypes(backend):
    gen = torch.Generator().manual_seed(7)
    small = backend == "triton" and not HAS_GPU
    G, per = (4, 8) if small else (60, 10)
    M = G * per
    groups = torch.randperm(M, generator=gen) % G
    start = torch.rand(M, generator=gen) * 30
    seg = torch.stack([start, start + torch.rand(M, generator=gen) * 15], 1)
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        scores = torch.rand(M, generator=gen).to(dtype)
        for method in ("gaussian", "linear"):
            _check_soft(backend, seg, scores, groups, dict(method=method, sigma=0.5, iou_threshold=0.3, min_score=1e-3, offset=0.0))


def test_soft_temporal_nms_negative_scores_merge_order(backend):
    # Negative scores rise under decay, so a group's selections are not monotone;
    # the global order must still be the reference's best-head merge.
    gen = torch.Generator().manual_seed(8)
    M = 40
    start = torch.randint(0, 10, (M,), generator=gen).double()
    seg = torch.stack([start, start + torch.randint(1, 6, (M,), generator=gen).double()], 1)
    scores = torch.rand(M, generator=gen, dtype=torch.float64) * 2 - 1.5
    groups = torch.randint(0, 3, (M,), generator=gen)
    for method in ("gaussian", "linear"):
        _check_soft(backend, seg, scores, groups, dict(method=method, sigma=0.5, iou_threshold=0.2, min_score=-math.inf, offset=1.0))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf * 0 under the interpreter
def test_soft_temporal_nms_nan_and_inf_scores(any_backend):
    dev = backend_device(any_backend)
    seg = torch.tensor([[0.0, 10.0], [0.0, 10.0], [2.0, 8.0], [20.0, 30.0]], device=dev, dtype=torch.float64)
    scores = torch.tensor([math.inf, math.inf, math.nan, 0.5], device=dev, dtype=torch.float64)
    # Linear decay of the second inf by (1 - IoU) = 0 makes a NaN: dropped; the NaN score
    # is dropped from the start.
    idx, val = mmsd_ext.soft_temporal_nms(seg, scores, method="linear", iou_threshold=0.3, backend=any_backend)
    assert idx.tolist() == [0, 3]
    assert val.tolist() == [math.inf, 0.5]


def test_soft_temporal_nms_returns_each_selections_own_signed_zero(any_backend):
    # -0.0 and +0.0 tie (lower index first); the score returned is the segment's own,
    # sign included, not the equal maximum of its chunk.
    dev = backend_device(any_backend)
    seg = torch.tensor([[0.0, 10.0], [1.0, 11.0], [20.0, 30.0], [40.0, 50.0]], device=dev)
    for zeros in ([-0.0, 0.0, -0.0, 0.0], [0.0, -0.0, 0.0, -0.0]):
        idx, val = mmsd_ext.soft_temporal_nms(seg, torch.tensor(zeros, device=dev), min_score=-1.0, backend=any_backend)
        assert idx.tolist() == [0, 1, 2, 3]
        assert torch.signbit(val.cpu()).tolist() == [math.copysign(1.0, z) < 0 for z in zeros]


def test_soft_temporal_nms_empty_and_single(any_backend):
    dev = backend_device(any_backend)
    idx, val = mmsd_ext.soft_temporal_nms(torch.zeros(0, 2, device=dev), torch.zeros(0, device=dev, dtype=torch.float16), backend=any_backend)
    assert idx.shape == (0,) and val.shape == (0,) and val.dtype == torch.float16
    idx, val = mmsd_ext.soft_temporal_nms(torch.tensor([[0.0, 1.0]], device=dev), torch.tensor([0.5], device=dev), backend=any_backend)
    assert idx.tolist() == [0] and val.tolist() == [0.5]
    idx, val = mmsd_ext.soft_temporal_nms(torch.tensor([[0.0, 1.0]], device=dev), torch.tensor([1e-4], device=dev), backend=any_backend)
    assert idx.shape == (0,)


# ----------------------------------------------------------------------------
# bad inputs


def _bad_calls():
    seg = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    sc = torch.tensor([0.5, 0.4])
    hard = lambda **kw: ("hard", dict(dict(segments=seg, scores=sc, iou_threshold=0.5), **kw))  # noqa: E731
    soft = lambda **kw: ("soft", dict(dict(segments=seg, scores=sc), **kw))  # noqa: E731
    return [
        (hard(segments=torch.tensor([[0.0, 1.0], [3.0, 2.0]])), ValueError, "segments"),
        (hard(segments=torch.tensor([[0.0, 1.0], [math.nan, 2.0]])), ValueError, "segments"),
        (hard(segments=torch.tensor([[0.0, math.inf], [1.0, 2.0]])), ValueError, "segments"),
        (hard(segments=torch.zeros(2, 3)), ValueError, "segments"),
        (hard(segments=torch.zeros(2, 2, dtype=torch.int64)), TypeError, "segments"),
        (hard(scores=torch.zeros(3)), ValueError, "scores"),
        (hard(scores=torch.zeros(2, dtype=torch.int64)), TypeError, "scores"),
        (hard(iou_threshold=-0.1), ValueError, "iou_threshold"),
        (hard(iou_threshold=math.nan), ValueError, "iou_threshold"),
        (hard(groups=torch.zeros(2, dtype=torch.bool)), TypeError, "groups"),
        (soft(groups=torch.zeros(2, dtype=torch.uint64)), TypeError, "groups"),
        (hard(groups=torch.zeros(3, dtype=torch.int64)), ValueError, "groups"),
        (hard(overlap="giou"), ValueError, "overlap"),
        (hard(offset=-1.0), ValueError, "offset"),
        (soft(segments=torch.tensor([[0.0, 1.0], [3.0, 2.0]])), ValueError, "segments"),
        (soft(segments=torch.tensor([[0.0, 1.0], [math.nan, 2.0]])), ValueError, "segments"),
        (soft(sigma=0.0), ValueError, "sigma"),
        (soft(sigma=-1.0), ValueError, "sigma"),
        (soft(iou_threshold=-1.0), ValueError, "iou_threshold"),
        (soft(min_score=math.nan), ValueError, "min_score"),
        (soft(method="hard"), ValueError, "method"),
        (soft(groups=torch.zeros(2)), TypeError, "groups"),
        (hard(segments=torch.zeros(4)), ValueError, "segments"),
        (hard(segments=torch.zeros(2, 2, dtype=torch.float16)), TypeError, "segments"),
        (hard(scores=torch.zeros(2, 1)), ValueError, "scores"),
        (soft(segments=torch.zeros(2, 3)), ValueError, "segments"),
        (soft(segments=torch.zeros(4)), ValueError, "segments"),
        (soft(segments=torch.zeros(2, 2, dtype=torch.int64)), TypeError, "segments"),
        (soft(segments=torch.zeros(2, 2, dtype=torch.float16)), TypeError, "segments"),
        (soft(scores=torch.zeros(3)), ValueError, "scores"),
        (soft(scores=torch.zeros(2, dtype=torch.int64)), TypeError, "scores"),
        (soft(groups=torch.zeros(3, dtype=torch.int64)), ValueError, "groups"),
        (soft(groups=torch.zeros(2, dtype=torch.bool)), TypeError, "groups"),
        (soft(offset=-1.0), ValueError, "offset"),
        (soft(iou_threshold=math.nan), ValueError, "iou_threshold"),
        (soft(sigma=math.nan), ValueError, "sigma"),
    ]


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_narrower_integer_groups_are_widened(any_backend, dtype):
    # ActionFormer's class ids are int32: they group as int64 ids do (the raw ops take int64).
    seg, scores, groups = (t.to(backend_device(any_backend)) for t in _opcheck_inputs(torch.device("cpu")))
    keep = mmsd_ext.temporal_nms(seg, scores, 0.3, groups=groups, backend=any_backend)
    picked, decayed = mmsd_ext.soft_temporal_nms(seg, scores, groups=groups, backend=any_backend)
    assert torch.equal(mmsd_ext.temporal_nms(seg, scores, 0.3, groups=groups.to(dtype), backend=any_backend), keep)
    got = mmsd_ext.soft_temporal_nms(seg, scores, groups=groups.to(dtype), backend=any_backend)
    assert torch.equal(got[0], picked) and torch.equal(got[1], decayed)
    assert not torch.equal(keep, mmsd_ext.temporal_nms(seg, scores, 0.3, backend=any_backend))  # the groups matter here
    # Other dtypes are refused with the ones taken listed (not "expected an int64 tensor").
    taken = re.escape("groups: expected an int64 tensor (or int32, int16, int8, uint8, uint16, uint32), got float32")
    with pytest.raises(TypeError, match=f"^{taken}$"):
        mmsd_ext.temporal_nms(seg, scores, 0.3, groups=groups.float(), backend=any_backend)
    with pytest.raises(TypeError, match=f"^{taken}$"):
        mmsd_ext.soft_temporal_nms(seg, scores, groups=groups.float(), backend=any_backend)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf under the interpreter
@pytest.mark.parametrize("call,error,name", _bad_calls())
def test_bad_inputs_name_the_argument(any_backend, call, error, name):
    kind, kwargs = call
    dev = backend_device(any_backend)
    kwargs = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    fn = mmsd_ext.temporal_nms if kind == "hard" else mmsd_ext.soft_temporal_nms
    # The argument at fault opens the message: other arguments may be named after it.
    with pytest.raises(error, match=rf"^{name}: "):
        fn(backend=any_backend, **kwargs)


@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("name", ["scores", "groups"])
def test_tensors_on_another_device_are_named(any_backend, kind, name):
    # A meta tensor stands in for a tensor on another device (no GPU needed); on a GPU
    # the segments are CUDA tensors and the other one is on meta, also another device.
    dev = backend_device(any_backend)
    args = dict(segments=torch.tensor([[0.0, 1.0], [2.0, 3.0]], device=dev), scores=torch.tensor([0.5, 0.4], device=dev),
                groups=torch.zeros(2, dtype=torch.int64, device=dev))
    args[name] = args[name].to("meta")
    with pytest.raises(ValueError, match=rf"^{name}: expected a tensor on {dev.type}.* like segments, got meta"):
        if kind == "hard":
            mmsd_ext.temporal_nms(args["segments"], args["scores"], 0.5, groups=args["groups"], backend=any_backend)
        else:
            mmsd_ext.soft_temporal_nms(args["segments"], args["scores"], groups=args["groups"], backend=any_backend)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf under the interpreter
def test_the_first_bad_segment_is_named(any_backend):
    """Every backend names the first segment that is bad in either way (a non-finite
    coordinate or end < start), hard and soft: the reference checked all coordinates
    for finiteness first and named a later segment than the kernels."""
    dev = backend_device(any_backend)
    reversed_first = torch.tensor([[0.0, 1.0], [3.0, 2.0], [math.nan, 2.0], [1.0, math.inf]], device=dev)
    infinite_first = torch.tensor([[0.0, 1.0], [0.0, 2.0], [1.0, math.inf], [3.0, 2.0]], device=dev)
    scores = torch.ones(4, device=dev)
    for fn in (lambda s: mmsd_ext.temporal_nms(s, scores, 0.5, backend=any_backend),
               lambda s: mmsd_ext.soft_temporal_nms(s, scores, backend=any_backend)):
        # One wording on every backend (the GPU paths had said "finite coordinates with end >=
        # start" for both, and the reference printed 3.0 where the kernels print 3).
        with pytest.raises(ValueError, match="^" + re.escape("segments: expected end >= start, got segment 1 = (3, 2)") + "$"):
            fn(reversed_first)
        with pytest.raises(ValueError, match="^" + re.escape("segments: expected finite coordinates, got segment 2 = (1, inf)") + "$"):
            fn(infinite_first)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_bad_segment_prints_as_written_in_its_dtype(any_backend, dtype):
    """The numbers of a bad segment print as the shortest text that reads back in the segments'
    dtype: a float32 6.4 as 6.4, not as its double 6.400000095367432, on every backend."""
    dev = backend_device(any_backend)
    scores = torch.ones(3, device=dev)
    for pair, text in (([6.4, 5.1], "(6.4, 5.1)"), ([0.1, math.nan], "(0.1, nan)"), ([3.4028234663852886e38, 1e-45], None)):
        seg = torch.tensor([[0.0, 1.0], [0.0, 2.0], pair], dtype=dtype, device=dev)
        if text is None:  # the float32 extremes: largest finite, smallest subnormal
            text = "(3.4028235e+38, 1e-45)" if dtype == torch.float32 else f"({seg[2, 0].item()!r}, {seg[2, 1].item()!r})"
        what = "end >= start" if math.isfinite(pair[1]) else "finite coordinates"
        message = f"segments: expected {what}, got segment 2 = {text}"
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            mmsd_ext.temporal_nms(seg, scores, 0.5, backend=any_backend)
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            mmsd_ext.soft_temporal_nms(seg, scores, backend=any_backend)
    if dtype == torch.float64:  # 16 digits, as %g writes them (Python's repr would add ".0")
        seg = torch.tensor([[0.0, 1.0], [0.0, 2.0], [1234567890123456.0, 0.0]], dtype=dtype, device=dev)
        message = "segments: expected end >= start, got segment 2 = (1234567890123456, 0)"
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            mmsd_ext.temporal_nms(seg, scores, 0.5, backend=any_backend)


def test_compiled_ops_check_their_arguments():
    # Direct calls of the dispatcher ops (no Python wrapper) fail cleanly too.
    if "cpu" not in mmsd_ext.available_backends():
        pytest.skip("cpu backend not available")
    seg = torch.tensor([[0.0, 1.0], [2.0, 1.0]])
    sc = torch.tensor([0.5, 0.4])
    with pytest.raises(ValueError, match="segments"):
        torch.ops.mmsd_ext.temporal_nms(seg, sc, None, 0.5, "iou", 0.0)
    with pytest.raises(ValueError, match="overlap"):
        torch.ops.mmsd_ext.temporal_nms(seg.sort(1).values, sc, None, 0.5, "x", 0.0)
    with pytest.raises(ValueError, match="sigma"):
        torch.ops.mmsd_ext.soft_temporal_nms(seg.sort(1).values, sc, None, "gaussian", 0.0, 0.3, 0.0, 0.0)
    # NaN passes a test written as "not below" (every comparison with NaN is false): each
    # number is refused by the ops themselves, not only by their Python wrappers.
    nan = math.nan
    with pytest.raises(ValueError, match="^iou_threshold: expected a number >= 0, got nan"):
        torch.ops.mmsd_ext.temporal_nms(seg.sort(1).values, sc, None, nan, "iou", 0.0)
    with pytest.raises(ValueError, match="^iou_threshold: expected a number >= 0, got nan"):
        torch.ops.mmsd_ext.soft_temporal_nms(seg.sort(1).values, sc, None, "gaussian", 0.5, nan, 0.0, 0.0)
    with pytest.raises(ValueError, match="^min_score: expected a number, got nan"):
        torch.ops.mmsd_ext.soft_temporal_nms(seg.sort(1).values, sc, None, "gaussian", 0.5, 0.3, nan, 0.0)
    with pytest.raises(ValueError, match="^sigma: expected a number > 0, got nan"):
        torch.ops.mmsd_ext.soft_temporal_nms(seg.sort(1).values, sc, None, "gaussian", nan, 0.3, 0.0, 0.0)
    with pytest.raises(ValueError, match="^offset: expected a finite number >= 0, got nan"):
        torch.ops.mmsd_ext.temporal_nms(seg.sort(1).values, sc, None, 0.5, "iou", nan)
    with pytest.raises(TypeError, match="groups"):
        torch.ops.mmsd_ext.temporal_nms(seg.sort(1).values, sc, torch.zeros(2), 0.5, "iou", 0.0)
    with pytest.raises(ValueError, match="mask"):
        torch.ops.mmsd_ext._temporal_nms_gather(torch.zeros(100, 1, dtype=torch.int64), None)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_compiled_op_messages_give_the_numbers(device):
    # The kernels' own messages carry the offending sizes, dtypes and values, and
    # raise (not crash) when called without the Python wrapper.
    if device not in mmsd_ext.available_backends():
        pytest.skip(f"{device} backend not available")
    ops = torch.ops.mmsd_ext
    seg = torch.tensor([[0.0, 1.0], [2.0, 3.0]], device=device)
    sc = torch.tensor([0.5, 0.4], device=device)
    hard = [
        ((seg.half(), sc, None, 0.5, "iou", 0.0), TypeError, "segments: expected dtype float32 or float64, got float16"),
        ((seg[:, :1], sc, None, 0.5, "iou", 0.0), ValueError, "segments: expected shape [M, 2], got [2, 1]"),
        ((seg, sc[:1], None, 0.5, "iou", 0.0), ValueError, "scores: expected shape [M] = [2], got [1]"),
        ((seg, sc, torch.zeros(2, device=device), 0.5, "iou", 0.0), TypeError,
         "groups: expected an int64 tensor, got float32"),
        ((seg, sc, torch.zeros(3, dtype=torch.long, device=device), 0.5, "iou", 0.0), ValueError,
         "groups: expected shape [M] = [2], got [3]"),
        ((seg, sc, None, -0.5, "iou", 0.0), ValueError, "iou_threshold: expected a number >= 0, got -0.5"),
        ((seg, sc, None, 0.5, "iou", -0.25), ValueError, "offset: expected a finite number >= 0, got -0.25"),
        ((seg, sc.to(torch.float8_e4m3fn), None, 0.5, "iou", 0.0), TypeError,
         "scores: expected dtype float32, float64, float16 or bfloat16, got float8_e4m3fn"),
    ]
    for args, error, message in hard:
        with pytest.raises(error, match="^" + re.escape(message)):
            ops.temporal_nms(*args)
    with pytest.raises(ValueError, match="^" + re.escape("sigma: expected a number > 0, got -1.5")):
        ops.soft_temporal_nms(seg, sc, None, "gaussian", -1.5, 0.3, 0.0, 0.0)
    bad = torch.tensor([[0.0, 1.0], [2.5, 1.25]], device=device)
    expected = "segments: expected end >= start, got segment 1 = (2.5, 1.25)"
    with pytest.raises(ValueError, match="^" + re.escape(expected)):
        ops.temporal_nms(bad, sc, None, 0.5, "iou", 0.0)
    with pytest.raises(ValueError, match="^" + re.escape("mask: expected shape [n, W], got [100]")):
        ops._temporal_nms_gather(torch.zeros(100, dtype=torch.int64, device=device), None)
    with pytest.raises(ValueError, match="^" + re.escape("sorted_groups: expected shape [10], got [9]")):
        ops._temporal_nms_gather(torch.zeros(10, 1, dtype=torch.int64, device=device),
                                 torch.zeros(9, dtype=torch.long, device=device))
    if device == "cuda":  # a CPU mask with CUDA group ids reaches the CUDA kernel
        with pytest.raises(ValueError, match="^" + re.escape("mask: expected a CUDA tensor like sorted_groups, got cpu")):
            ops._temporal_nms_gather(torch.zeros(10, 1, dtype=torch.int64), torch.zeros(10, dtype=torch.long, device=device))
    # A mask narrower than a group's tiles, or unsorted group ids, is an error (not a wrong answer).
    message = "mask: expected at least 2 tiles per row for a group of 100 segments, got 1"
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        ops._temporal_nms_gather(torch.zeros(100, 1, dtype=torch.int64, device=device), None)
    groups = torch.tensor([0] * 10 + [1] * 70 + [2] * 20, device=device)  # group 1 spans tiles 0 and 1
    message = "mask: expected at least 2 tiles per row for a group of 70 segments, got 1"
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        ops._temporal_nms_gather(torch.zeros(100, 1, dtype=torch.int64, device=device), groups)
    assert ops._temporal_nms_gather(torch.zeros(100, 2, dtype=torch.int64, device=device), groups).all()
    with pytest.raises(ValueError, match="^" + re.escape("sorted_groups: expected non-decreasing group ids")):
        ops._temporal_nms_gather(torch.zeros(3, 1, dtype=torch.int64, device=device),
                                 torch.tensor([0, 1, 0], device=device))


# ----------------------------------------------------------------------------
# backend choice


@pytest.mark.parametrize("extension,cuda_kernels", [(True, True), (True, False), (False, False)])
def test_backend_choice_on_cuda_tensors(monkeypatch, extension, cuda_kernels):
    # The triton backend of hard NMS gathers with the compiled op
    # _temporal_nms_gather, whose CUDA kernel exists only in a build with the CUDA
    # kernels: without it, auto must not pick "triton" for CUDA tensors (the cpu
    # kernel runs on host copies instead, or without the extension the reference)
    # and asking for it must say why. Soft-NMS's triton backend needs no compiled
    # op. Resolution takes a device, so no GPU is needed.
    from mmsd_ext import _backend, _loader

    monkeypatch.setattr(_loader, "compiled_available", lambda: extension)
    monkeypatch.setattr(_loader, "cuda_compiled", lambda: cuda_kernels)
    monkeypatch.setattr(_loader, "LOAD_ERROR", None if extension else "mmsd_ext: the compiled extension is not built")
    monkeypatch.setattr(_backend, "triton_importable", lambda: True)
    cuda = torch.device("cuda")
    auto = "cuda" if cuda_kernels else ON_HOST if extension else "reference"
    assert nms_module._resolve_hard(None, cuda) == auto
    assert nms_module._resolve_soft(None, cuda) == ("cuda" if cuda_kernels else "triton")
    # Asked for by name, the reference runs where it is.
    assert nms_module._resolve_hard("reference", cuda) == "reference"
    with mmsd_ext.use_backend("reference"):
        assert nms_module._resolve_hard(None, cuda) == "reference"
        assert nms_module._resolve_hard("auto", cuda) == auto  # a call's "auto" is the automatic choice
    # Without triton either, soft-NMS on CUDA tensors also runs on host copies.
    monkeypatch.setattr(_backend, "triton_importable", lambda: False)
    assert nms_module._resolve_soft(None, cuda) == ("cuda" if cuda_kernels else ON_HOST if extension else "reference")
    monkeypatch.setattr(_backend, "triton_importable", lambda: True)
    assert nms_module._resolve_soft("triton", cuda) == "triton"
    if cuda_kernels:
        assert nms_module._resolve_hard("triton", cuda) == "triton"
    else:
        why = "no CUDA kernels" if extension else "not built"
        with pytest.raises(RuntimeError, match=f"_temporal_nms_gather.*{why}"):
            nms_module._resolve_hard("triton", cuda)
        with mmsd_ext.use_backend("triton"), pytest.raises(RuntimeError, match="_temporal_nms_gather"):
            nms_module._resolve_hard(None, cuda)
    # CPU tensors: the extension's CPU kernels decide.
    assert nms_module._resolve_hard(None, torch.device("cpu")) == ("cpu" if extension else "reference")


@pytest.mark.skipif("cpu" not in mmsd_ext.available_backends(), reason="cpu backend not available")
def test_host_copies_give_the_cpu_results_on_the_inputs_device():
    # auto's choice for GPU tensors where no GPU backend can run: the cpu kernel on
    # host copies. Called here on CPU tensors, where the copies are the identity.
    gen = torch.Generator().manual_seed(5)
    start = torch.rand(300, generator=gen, dtype=torch.float64) * 50
    segments = torch.stack([start, start + torch.rand(300, generator=gen, dtype=torch.float64) * 10], 1)
    scores = torch.rand(300, generator=gen)
    groups = torch.randint(0, 4, (300,), generator=gen)
    for grp in (None, groups):
        hard = nms_module._HARD_IMPLS[ON_HOST](segments, scores, 0.4, grp, "other", 1.0)
        assert hard.equal(mmsd_ext.temporal_nms(segments, scores, 0.4, groups=grp, overlap="other", offset=1.0,
                                                backend="cpu"))
        assert hard.device == segments.device and hard.dtype == torch.int64
        idx, val = nms_module._SOFT_IMPLS[ON_HOST](segments, scores, "linear", 0.5, 0.2, 1e-3, grp, 0.0)
        ref_idx, ref_val = mmsd_ext.soft_temporal_nms(segments, scores, method="linear", iou_threshold=0.2, groups=grp,
                                                      backend="cpu")
        assert idx.equal(ref_idx) and val.equal(ref_val) and val.dtype == scores.dtype


def test_triton_hard_nms_without_the_extension_raises(monkeypatch):
    # Under the interpreter, CPU tensors gather with the C++ kernel; without the
    # extension both the public function and the custom op say so, before any work.
    if "triton" not in mmsd_ext.available_backends():
        pytest.skip("triton backend not available")
    from mmsd_ext import _loader

    seg, scores, groups = _opcheck_inputs(backend_device("triton"))
    monkeypatch.setattr(_loader, "compiled_available", lambda: False)
    monkeypatch.setattr(_loader, "cuda_compiled", lambda: False)
    monkeypatch.setattr(_loader, "LOAD_ERROR", "mmsd_ext: the compiled extension is not built")
    with pytest.raises(RuntimeError, match="_temporal_nms_gather.*not built"):
        mmsd_ext.temporal_nms(seg, scores, 0.5, groups=groups, backend="triton")
    # With no segments too (no gather would run): a setup that cannot work is said at once.
    with pytest.raises(RuntimeError, match="_temporal_nms_gather.*not built"):
        mmsd_ext.temporal_nms(seg[:0], scores[:0], 0.5, backend="triton")
    with pytest.raises(RuntimeError, match="_temporal_nms_gather.*not built"):
        torch.ops.mmsd_ext.temporal_nms_triton(seg, scores, groups, 0.5, "iou", 0.0)
    idx, _ = mmsd_ext.soft_temporal_nms(seg, scores, groups=groups, backend="triton")
    assert torch.equal(idx.cpu(), mmsd_ext.soft_temporal_nms(seg.cpu(), scores.cpu(), groups=groups.cpu(), backend="reference")[0])


def test_triton_hard_nms_runs_the_cpu_kernel_past_the_mask_limit_or_the_gpus_room(monkeypatch):
    # A mask over _MAX_MASK_BYTES (4 GiB) is not built: the cpu kernel runs on host
    # copies. Here the limit is lowered to just under the mask of 100 segments (100 rows
    # of 2 tiles of 8 bytes, with or without groups: n <= 8192 takes the full width).
    if "triton" not in mmsd_ext.available_backends() or "cpu" not in mmsd_ext.available_backends():
        pytest.skip("triton or cpu backend not available")
    device = backend_device("triton")
    gen = torch.Generator().manual_seed(12)
    M = 100
    start = torch.randint(0, 60, (M,), generator=gen).double()
    seg = torch.stack([start, start + torch.randint(0, 9, (M,), generator=gen).double()], 1)
    scores = torch.rand(M, generator=gen)
    groups = torch.randint(0, 3, (M,), generator=gen)
    # MMSD's overlap with the inclusive offset, too: the fallback passes both on.
    modes = [{}, dict(overlap="other", offset=1.0)]
    assert not torch.equal(mmsd_ext.temporal_nms(seg, scores, 0.4, backend="reference"),
                           mmsd_ext.temporal_nms(seg, scores, 0.4, backend="reference", **modes[1]))
    monkeypatch.setattr(nms_module, "_MAX_MASK_BYTES", M * 2 * 8 - 1)
    for g, mode in itertools.product((None, groups), modes):
        expected = mmsd_ext.temporal_nms(seg, scores, 0.4, groups=g, backend="reference", **mode)
        with torch.profiler.profile() as prof:
            got = mmsd_ext.temporal_nms(
                seg.to(device), scores.to(device), 0.4, groups=None if g is None else g.to(device), backend="triton",
                **mode
            )
        ran = {e.name for e in prof.events()}
        assert "mmsd_ext::temporal_nms" in ran and "mmsd_ext::_temporal_nms_gather" not in ran
        assert got.device == seg.to(device).device and torch.equal(got.cpu(), expected)
    # A mask of exactly the limit is built (the CUDA kernel's kMaxMaskBytes test is the same `>`).
    monkeypatch.setattr(nms_module, "_MAX_MASK_BYTES", M * 2 * 8)
    with torch.profiler.profile() as prof:
        got = mmsd_ext.temporal_nms(seg.to(device), scores.to(device), 0.4, groups=groups.to(device), backend="triton")
    assert "mmsd_ext::_temporal_nms_gather" in {e.name for e in prof.events()}
    assert torch.equal(got.cpu(), mmsd_ext.temporal_nms(seg, scores, 0.4, groups=groups, backend="reference"))

    # Under the limit, but the GPU has no room for the mask now (a shared or busy card): the
    # same way. The CUDA backend does the same in C++ (not run here: no GPU).
    monkeypatch.setattr(nms_module, "_MAX_MASK_BYTES", 4 << 30)
    from mmsd_ext.kernels import temporal_nms as triton_kernels

    def no_room(*args, **kwargs):
        raise torch.OutOfMemoryError("out of memory (a stand-in for a busy GPU)")

    monkeypatch.setattr(triton_kernels, "temporal_nms_mask", no_room)
    for g, mode in itertools.product((None, groups), modes):
        expected = mmsd_ext.temporal_nms(seg, scores, 0.4, groups=g, backend="reference", **mode)
        got = mmsd_ext.temporal_nms(seg.to(device), scores.to(device), 0.4, groups=None if g is None else g.to(device),
                                    backend="triton", **mode)
        assert got.device == seg.to(device).device and torch.equal(got.cpu(), expected)


# ----------------------------------------------------------------------------
# opcheck and torch.compile


def _opcheck_inputs(dev):
    gen = torch.Generator().manual_seed(9)
    M = 20
    start = torch.rand(M, generator=gen) * 10
    seg = torch.stack([start, start + torch.rand(M, generator=gen) * 5], 1).to(dev)
    scores = torch.rand(M, generator=gen).to(dev)
    groups = torch.randint(0, 3, (M,), generator=gen).to(dev)
    return seg, scores, groups


def test_opcheck(any_backend):
    backend = any_backend
    dev = backend_device(backend)
    seg, scores, groups = _opcheck_inputs(dev)
    if backend in ("triton", "reference"):
        ops = torch.ops.mmsd_ext
        hard, soft = getattr(ops, f"temporal_nms_{backend}").default, getattr(ops, f"soft_temporal_nms_{backend}").default
    else:
        hard, soft = torch.ops.mmsd_ext.temporal_nms.default, torch.ops.mmsd_ext.soft_temporal_nms.default
        torch.library.opcheck(torch.ops.mmsd_ext._temporal_nms_gather.default, (torch.zeros(20, 1, dtype=torch.int64, device=dev), None))
    torch.library.opcheck(hard, (seg, scores, groups, 0.5, "iou", 0.0))
    torch.library.opcheck(hard, (seg.double(), scores, None, 0.3, "other", 1.0))
    torch.library.opcheck(soft, (seg, scores, groups, "gaussian", 0.5, 0.3, 1e-3, 0.0))
    torch.library.opcheck(soft, (seg, scores.double(), None, "linear", 0.5, 0.3, 1e-3, 1.0))


def test_raw_soft_ops_refuse_a_backward(any_backend):
    """The ops behind soft_temporal_nms (which detaches its inputs) have no gradient: a
    backward through their scores raises on every backend (the compiled op only warned and
    left the gradient None), and opcheck's autograd registration check holds with inputs
    that need a gradient."""
    backend = any_backend
    dev = backend_device(backend)
    seg, scores, groups = _opcheck_inputs(dev)
    scores.requires_grad_(True)
    op = getattr(torch.ops.mmsd_ext, "soft_temporal_nms" if backend in ("cpu", "cuda") else f"soft_temporal_nms_{backend}").default
    _, kept_scores = op(seg, scores, groups, "gaussian", 0.5, 0.3, 1e-3, 0.0)
    with pytest.raises(RuntimeError, match="not implemented|no autograd formula was registered"):
        kept_scores.sum().backward()
    assert scores.grad is None
    torch.library.opcheck(op, (seg, scores, groups, "gaussian", 0.5, 0.3, 1e-3, 0.0), test_utils="test_autograd_registration")
    # The public function gives scores without a gradient, as documented.
    assert not mmsd_ext.soft_temporal_nms(seg, scores, groups=groups, backend=backend)[1].requires_grad


@pytest.mark.parametrize("compiled_backend", ["reference", "cpu", "cuda", "triton"])
def test_torch_compile_fullgraph(compiled_backend):
    # The result size depends on the data: with capture_dynamic_output_shape_ops the
    # op's fake kernel (a new unbacked size) lets the whole function compile as one
    # graph; without it dynamo would have to break the graph at the op. "cpu" and
    # "cuda": the compiled ops, whose fakes serve both devices (cuda on CUDA tensors,
    # skipped without a GPU). "triton":
    # the custom ops temporal_nms_triton and soft_temporal_nms_triton (under the
    # interpreter without a GPU: 20 segments, one program per kernel). "reference":
    # its loops run inside the ops temporal_nms_reference and soft_temporal_nms_reference
    # (traced, their data-dependent loops would refuse fullgraph).
    if compiled_backend not in mmsd_ext.available_backends():
        pytest.skip(f"{compiled_backend} backend not available")
    import torch._dynamo

    def pipeline(seg, scores, groups):
        keep = mmsd_ext.temporal_nms(seg, scores, 0.5, groups=groups, backend=compiled_backend)
        idx, val = mmsd_ext.soft_temporal_nms(seg, scores, groups=groups, backend=compiled_backend)
        return seg[keep].sum() + val.sum(), keep, idx

    seg, scores, groups = _opcheck_inputs(backend_device(compiled_backend))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        compiled = torch.compile(pipeline, fullgraph=True, backend="inductor")
        got = compiled(seg, scores, groups)
    expected = pipeline(seg, scores, groups)
    torch.testing.assert_close(got[0], expected[0])
    assert torch.equal(got[1], expected[1]) and torch.equal(got[2], expected[2])


@pytest.mark.skipif("cpu" not in mmsd_ext.available_backends(), reason="cpu backend not available")
def test_torch_compile_dynamic_with_the_numbers_as_inputs():
    # dynamic=True hands float arguments to the ops as SymFloats (offset 0.0 among them,
    # which math.isfinite could not take inside a graph before).
    import torch._dynamo

    def pipeline(seg, scores, threshold, offset, sigma, min_score):
        keep = mmsd_ext.temporal_nms(seg, scores, threshold, offset=offset, backend="cpu")
        idx, val = mmsd_ext.soft_temporal_nms(seg, scores, sigma=sigma, min_score=min_score, offset=offset, backend="cpu")
        return keep, idx, val

    seg, scores, _ = _opcheck_inputs(torch.device("cpu"))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        compiled = torch.compile(pipeline, fullgraph=True, dynamic=True)
        for args in ((0.5, 0.0, 0.5, 1e-3), (0.3, 1.0, 0.2, 0.1)):
            got, expected = compiled(seg, scores, *args), pipeline(seg, scores, *args)
            assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
            torch.testing.assert_close(got[2], expected[2])
        # Under fullgraph a bad value surfaces as dynamo's error around ours, with our message.
        with pytest.raises(Exception, match="offset: expected a finite number >= 0"):
            compiled(seg, scores, 0.5, float("nan"), 0.5, 1e-3)
        with pytest.raises(Exception, match="min_score: expected a number"):
            compiled(seg, scores, 0.5, 0.0, 0.5, float("nan"))


# ----------------------------------------------------------------------------
# CUDA-only: sizes the interpreter cannot run (skipped without a GPU)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("gpu_backend", ["cuda", "triton"])
def test_gpu_one_group_past_the_mask_limit_runs_on_the_cpu(gpu_backend):
    # M = 200k in one group would need a 5 GB mask (n^2 / 8 bytes), over the 4 GiB
    # limit: the cpu kernel runs on host copies, and no mask is allocated.
    if gpu_backend not in mmsd_ext.available_backends() or "cpu" not in mmsd_ext.available_backends():
        pytest.skip(f"{gpu_backend} or cpu backend not available")
    gen = torch.Generator().manual_seed(13)
    M = 200_000
    start = torch.rand(M, generator=gen, dtype=torch.float64) * 1e6
    seg = torch.stack([start, start + torch.rand(M, generator=gen, dtype=torch.float64) * 50], 1)
    scores = torch.rand(M, generator=gen)
    expected = mmsd_ext.temporal_nms(seg, scores, 0.5, backend="cpu")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    got = mmsd_ext.temporal_nms(seg.cuda(), scores.cuda(), 0.5, backend=gpu_backend)
    assert got.is_cuda and torch.equal(got.cpu(), expected)
    assert torch.cuda.max_memory_allocated() - before < 1 << 30


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("gpu_backend", ["cuda", "triton"])
def test_gpu_large_against_cpu(gpu_backend):
    if gpu_backend not in mmsd_ext.available_backends() or "cpu" not in mmsd_ext.available_backends():
        pytest.skip(f"{gpu_backend} or cpu backend not available")
    gen = torch.Generator().manual_seed(10)
    # One group of 5000 (dense mask), and 20000 in groups (band mask past the dense limit).
    for M, G in ((5000, 1), (20000, 300), (3000, 3000)):
        start = torch.rand(M, generator=gen, dtype=torch.float64) * 1000
        seg = torch.stack([start, start + torch.rand(M, generator=gen, dtype=torch.float64) * 80], 1)
        scores = torch.rand(M, generator=gen).float()
        groups = None if G == 1 else torch.randint(0, G, (M,), generator=gen)
        for overlap, offset in (("iou", 0.0), ("other", 1.0)):
            expected = mmsd_ext.temporal_nms(seg, scores, 0.5, groups=groups, overlap=overlap, offset=offset, backend="cpu")
            got = mmsd_ext.temporal_nms(
                seg.cuda(), scores.cuda(), 0.5, groups=None if groups is None else groups.cuda(), overlap=overlap, offset=offset, backend=gpu_backend
            )
            assert torch.equal(got.cpu(), expected)
        idx_cpu, val_cpu = mmsd_ext.soft_temporal_nms(seg, scores, groups=groups, backend="cpu")
        idx, val = mmsd_ext.soft_temporal_nms(seg.cuda(), scores.cuda(), groups=None if groups is None else groups.cuda(), backend=gpu_backend)
        assert torch.equal(idx.cpu(), idx_cpu)
        torch.testing.assert_close(val.cpu(), val_cpu, **SOFT_SCORE_TOL[torch.float32])


def _special_scores(M, gen):
    """Scores of M segments with ties, +-0.0, +-inf and NaNs of both signs (a NaN's sign
    bit changes where a radix sort puts it)."""
    scores = torch.randint(0, 50, (M,), generator=gen).double() / 7 - 3
    pick = torch.randint(0, 12, (M,), generator=gen)
    for value, which in ((math.nan, 0), (-math.nan, 1), (0.0, 2), (-0.0, 3), (math.inf, 4), (-math.inf, 5)):
        scores[pick == which] = value
    scores[M // 3], scores[M // 2] = math.nan, -math.nan
    return scores


@pytest.mark.gpu
@pytest.mark.parametrize("M", [10, 300, 5000])
def test_descending_order_puts_every_nan_last(M):
    # 300 and 5000 reach the CUDA sort's block and device radix paths.
    gen = torch.Generator().manual_seed(M)
    scores = _special_scores(M, gen)
    assert torch.signbit(scores[scores.isnan()]).any() and not torch.signbit(scores[scores.isnan()]).all()
    expected = nms_module._visit_order(scores)
    for dev in ["cpu"] + (["cuda"] if HAS_GPU else []):
        assert nms_module._descending_order(scores.to(dev)).cpu().tolist() == expected, dev


@pytest.mark.parametrize("M", [300, 5000])
def test_temporal_nms_nan_scores_visit_last(backend, M):
    # NaN scores (of either sign) are visited last, on every backend and past the
    # sizes where CUDA's sort changes algorithm.
    if backend == "triton" and not HAS_GPU and M > 300:
        pytest.skip("interpreted Triton: the small size only")
    gen = torch.Generator().manual_seed(11 + M)
    dev = backend_device(backend)
    start = torch.rand(M, generator=gen, dtype=torch.float64) * M / 4
    seg = torch.stack([start, start + torch.rand(M, generator=gen, dtype=torch.float64) * 20], 1)
    scores = _special_scores(M, gen)
    groups = torch.randint(0, 3, (M,), generator=gen)
    for g in (None, groups):
        expected = mmsd_ext.temporal_nms(seg, scores, 0.3, groups=g, backend="reference")
        got = mmsd_ext.temporal_nms(seg.to(dev), scores.to(dev), 0.3, groups=None if g is None else g.to(dev), backend=backend)
        assert torch.equal(got.cpu(), expected)
        if g is None:
            assert scores[expected].isnan().any()  # NaN-scored segments are kept, after all others
            first_nan = int(scores[expected].isnan().nonzero()[0])
            assert scores[expected][first_nan:].isnan().all()


def _band_mask(sup, width):
    """Suppression tiles [n, width] of a dense bool matrix sup [n, n] (bit b of
    mask[i, k]: sup[i, 64 * (i // 64 + k) + b]), as the mask kernels write them."""
    n = sup.shape[0]
    weights = torch.tensor([1 << b for b in range(63)] + [-(1 << 63)], dtype=torch.int64)
    mask = torch.zeros(n, width, dtype=torch.int64)
    for i in range(n):
        for k in range(width):
            col0 = 64 * (i // 64 + k)
            bits = torch.zeros(64, dtype=torch.int64)
            cols = sup[i, col0 : col0 + 64]
            bits[: cols.numel()] = cols.long()
            mask[i, k] = (bits * weights).sum()
    return mask


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_gpu_gather_matches_cpu():
    # The CUDA keep-gather on its own, against the CPU one, for valid band masks
    # (bits only towards later segments of the same group): groups that share
    # tiles, a group spanning several tiles, a narrow band and the full width.
    if "cuda" not in mmsd_ext.available_backends() or "cpu" not in mmsd_ext.available_backends():
        pytest.skip("cuda or cpu backend not available")
    gen = torch.Generator().manual_seed(11)
    n = 300
    sizes = [1, 5, 60, 70, 2, 130, 32]
    groups = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    same = groups[:, None] == groups[None, :]
    later = torch.arange(n)[None, :] > torch.arange(n)[:, None]
    for density in (0.02, 0.3):
        sup = same & later & (torch.rand(n, n, generator=gen) < density)
        for width, g in ((5, groups), (4, groups), (5, None)):
            s = sup if g is not None else later & (torch.rand(n, n, generator=gen) < density)
            mask = _band_mask(s, width)
            expected = torch.ops.mmsd_ext._temporal_nms_gather(mask, g)
            got = torch.ops.mmsd_ext._temporal_nms_gather(mask.cuda(), None if g is None else g.cuda())
            assert torch.equal(got.cpu(), expected)
    # Any mask, also one with bits towards other groups or earlier segments: the
    # gather reads only the bits of a row's own group, as the CPU one does.
    def random_words():
        return torch.randint(0, 256, (n, 4, 8), generator=gen, dtype=torch.uint8).view(torch.int64).squeeze(2)

    for mask in (random_words(), random_words() & random_words() & random_words() & random_words()):
        expected = torch.ops.mmsd_ext._temporal_nms_gather(mask, groups)
        got = torch.ops.mmsd_ext._temporal_nms_gather(mask.cuda(), groups.cuda())
        assert torch.equal(got.cpu(), expected)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_gpu_bad_segments_raise_after_the_op():
    if "cuda" not in mmsd_ext.available_backends():
        pytest.skip("cuda backend not available")
    seg = torch.tensor([[0.0, 1.0], [3.0, 2.0]], device="cuda")
    with pytest.raises(ValueError, match="segments"):
        mmsd_ext.temporal_nms(seg, torch.tensor([0.5, 0.4], device="cuda"), 0.5, backend="cuda")
    with pytest.raises(ValueError, match="segments"):
        mmsd_ext.soft_temporal_nms(seg, torch.tensor([0.5, 0.4], device="cuda"), backend="cuda")
    # The device is still usable afterwards.
    assert torch.ones(1, device="cuda").item() == 1.0


@st.composite
def large_nms_inputs(draw):
    """nms_inputs' kinds of input (integer or float coordinates, tied or spread scores,
    NaN and +-inf among them, groups or none) at 257 to 400 segments: the values come
    from a drawn seed (hypothesis cannot draw lists this long element by element)."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    M = draw(st.integers(257, 400))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    if draw(st.booleans()):  # integer coordinates: overlaps exactly at 1/3, 1/2, 2/3
        start = torch.randint(0, M // 4, (M,), generator=gen).double()
        seg = torch.stack([start, start + torch.randint(0, 13, (M,), generator=gen).double()], 1)
    else:
        start = torch.rand(M, generator=gen, dtype=torch.float64) * 400 - 200
        seg = torch.stack([start, start + torch.rand(M, generator=gen, dtype=torch.float64) * 30], 1)
    if draw(st.booleans()):
        scores = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)[torch.randint(0, 4, (M,), generator=gen)]
    else:
        scores = torch.rand(M, generator=gen, dtype=torch.float64) * 4 - 2
    if draw(st.booleans()):
        special = torch.tensor([math.nan, math.inf, -math.inf], dtype=torch.float64)[torch.randint(0, 3, (M,), generator=gen)]
        scores = torch.where(torch.rand(M, generator=gen) < 0.2, special, scores)
    groups = torch.randint(-2, 4, (M,), generator=gen) if draw(st.booleans()) else None
    return seg.to(dtype), scores.to(draw(st.sampled_from([torch.float32, torch.float64]))), groups


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("gpu_backend", ["cuda", "triton"])
@settings(max_examples=max(25, settings.default.max_examples), deadline=None)
@given(data=large_nms_inputs(), threshold=_thresholds(), overlap=st.sampled_from(["iou", "other"]),
       offset=st.sampled_from([0.0, 1.0, 0.5]))
def test_gpu_mask_path_matches_reference(gpu_backend, data, threshold, overlap, offset):
    """Above 256 segments the CUDA op leaves its one-block path for the sort-and-mask
    one, which test_temporal_nms_matches_reference's sizes no longer reach (and the
    compiled Triton mask kernel meets more than one tile)."""
    if gpu_backend not in mmsd_ext.available_backends():
        pytest.skip(f"{gpu_backend} backend not available")
    seg, scores, groups = data
    expected = mmsd_ext.temporal_nms(seg, scores, threshold, groups=groups, overlap=overlap, offset=offset, backend="reference")
    seg_d, scores_d, groups_d = _to(torch.device("cuda"), seg, scores, groups)
    got = mmsd_ext.temporal_nms(seg_d, scores_d, threshold, groups=groups_d, overlap=overlap, offset=offset, backend=gpu_backend)
    assert got.dtype == torch.int64 and got.is_cuda
    assert torch.equal(got.cpu(), expected)


# Sizes around kSmallNmsMaxSegments (256, csrc/cuda/temporal_nms_kernel.cu): up to it
# the CUDA op runs in one block (segments ranked by counting, greedy pass in shared
# memory, group ids compared directly), above it the sort-and-mask path.
SMALL_PATH_SIZES = [1, 2, 31, 255, 256, 257, 300]


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("M", SMALL_PATH_SIZES)
def test_gpu_small_and_large_paths_match_reference(M):
    if "cuda" not in mmsd_ext.available_backends():
        pytest.skip("cuda backend not available")
    gen = torch.Generator().manual_seed(20 + M)
    # Integer coordinates (overlaps exactly at 1/3, 1/2), scores with ties, +-0.0, +-inf
    # and NaNs of both signs, or tied everywhere (the visit order is then the index order).
    start = torch.randint(0, max(M // 4, 2), (M,), generator=gen).double()
    seg = torch.stack([start, start + torch.randint(0, 8, (M,), generator=gen).double()], 1)
    special = _special_scores(M, gen)
    assert special.isnan().any()
    tied = torch.full((M,), 0.5, dtype=torch.float64)
    tied[::3], tied[1::5] = 0.0, -0.0
    unsorted = torch.randint(-2, 3, (M,), generator=gen) * (1 << 40) + 7  # large ids, interleaved
    dtypes = ((torch.float64, torch.float64), (torch.float32, torch.float32), (torch.float32, torch.float16))
    for scores, groups, (seg_dtype, score_dtype) in itertools.product((special, tied), (None, unsorted), dtypes):
        s, sc = seg.to(seg_dtype), scores.to(score_dtype)
        g = None if groups is None else groups.cuda()
        for overlap, offset, threshold in itertools.product(("iou", "other"), (0.0, 1.0), (0.0, 1 / 3, 0.5)):
            expected = mmsd_ext.temporal_nms(s, sc, threshold, groups=groups, overlap=overlap, offset=offset, backend="reference")
            got = mmsd_ext.temporal_nms(s.cuda(), sc.cuda(), threshold, groups=g, overlap=overlap, offset=offset, backend="cuda")
            assert got.dtype == torch.int64 and got.is_cuda
            assert torch.equal(got.cpu(), expected), (groups is not None, seg_dtype, score_dtype, overlap, offset, threshold)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("M", [2, 200, 256, 257])
def test_gpu_bad_segment_message_on_both_paths(M):
    # The first invalid segment is named, with the message of the large path, also
    # when later segments are invalid too (in the same or another check).
    if "cuda" not in mmsd_ext.available_backends():
        pytest.skip("cuda backend not available")
    start = torch.arange(M, dtype=torch.float32)
    seg = torch.stack([start, start + 1], 1)
    first = M // 2
    seg[first] = torch.tensor([2.5, 1.25])
    if M - 1 != first:
        seg[M - 1] = torch.tensor([math.nan, 1.0])
    scores = torch.linspace(1, 0, M)
    message = f"segments: expected end >= start, got segment {first} = (2.5, 1.25)"
    for groups in (None, torch.arange(M) % 3):
        with pytest.raises(ValueError, match="^" + re.escape(message)):
            torch.ops.mmsd_ext.temporal_nms(seg.cuda(), scores.cuda(), None if groups is None else groups.cuda(), 0.5, "iou", 0.0)
    # The device is still usable afterwards.
    assert torch.ones(1, device="cuda").item() == 1.0


@pytest.mark.skipif("cpu" not in mmsd_ext.available_backends(), reason="the compiled extension is not built")
def test_soft_nms_cpu_and_reference_agree_on_a_decay_that_lands_on_min_score():
    """cpu and reference decay with the same C library exp: a gaussian decay that lands exactly on
    min_score keeps the segment on both, one ulp above it drops it on both."""
    seg = torch.tensor([[0.0, 10.0], [3.0, 11.0], [100.0, 101.0]], dtype=torch.float64)
    decayed = 0.9 * math.exp(-((7 / 11) ** 2) / 0.5)  # IoU 7/11 with the first
    for min_score, kept in ((decayed, [0, 1, 2]), (math.nextafter(decayed, 1.0), [0, 2])):
        # Segment 2 (far from the others) scores min_score: in the first case it ties with 1's
        # decayed score, and the lower index goes first.
        scores = torch.tensor([1.0, 0.9, min_score], dtype=torch.float64)
        for backend in ("reference", "cpu"):
            index, value = mmsd_ext.soft_temporal_nms(seg, scores, min_score=min_score, backend=backend)
            assert index.tolist() == kept, (backend, min_score)
            assert value.tolist() == [[1.0, decayed, min_score][i] for i in kept]


@pytest.mark.parametrize("shift", [0.0, -1000.0, -1e6])
def test_temporal_nms_negative_coordinates_across_rank_words(backend, shift):
    """The cpu kernel skips 64-rank words whose longest kept segment cannot overlap enough.
    With negative coordinates a segment's end is below its length. Rank 0: c = [s - 1, s + 101]
    (0.9); ranks 1..70: short fillers inside (s - 1, s) (0.1); rank 71, the next word: r =
    [s, s + 100] (1.0), kept first, IoU(c, r) = 100 / 102 > 0.5: c is suppressed."""
    dev = backend_device(backend)
    n = 70
    starts = [shift - 1.0] + [shift - 1.0 + (i + 1) / (n + 2) for i in range(n)] + [shift]
    ends = [shift + 101.0] + [s + 1e-3 for s in starts[1 : n + 1]] + [shift + 100.0]
    seg = torch.tensor([starts, ends], dtype=torch.float64).T.contiguous()
    scores = torch.tensor([0.9] + [0.1] * n + [1.0], dtype=torch.float64)
    expected = mmsd_ext.temporal_nms(seg, scores, 0.5, backend="reference")
    assert 0 not in expected.tolist()
    got = mmsd_ext.temporal_nms(*_to(dev, seg, scores), 0.5, backend=backend)
    assert got.cpu().tolist() == expected.tolist()
