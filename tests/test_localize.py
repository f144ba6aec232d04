"""mmsd_proposals against the Python-loop reference of MMSD's getActLoc (tests/localization_reference.py)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from conftest import AVAILABLE, backend_device
from localization_reference import mmsd_proposals_loops

from mmsd_ext.localize import MMSD_THRESHOLDS, mmsd_proposals, pad_cas

def assert_same_rows(got, want):
    # Every score is a window sum added left to right, as the loops add it: the
    # rows must be equal bit for bit, scores included.
    got = got.cpu().numpy()
    want = np.asarray(want, dtype=np.float64).reshape(-1, 5)
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_array_equal(got, want)


@st.composite
def proposal_inputs(draw):
    """cas whose values straddle MMSD's thresholds.

    Three kinds: continuous values (no ties); dyadic values k / 2048 (many exact
    score ties, with sums that round nowhere); and a few non-dyadic values
    repeated in a short pattern, so equal windows at different positions must
    get exactly equal scores although their sums round.
    """
    V = draw(st.integers(1, 4))
    T = draw(st.integers(1, 40))
    C = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["continuous", "dyadic", "pattern"]))
    rng = np.random.default_rng(seed)
    if kind == "dyadic":
        cas = rng.integers(0, 25, size=(V, T, C)) / 2048.0
    elif kind == "pattern":
        pattern = rng.choice([0.0001, 0.0043, 0.0071, 0.0097, 0.0113], size=(1, rng.integers(2, 6), C))
        cas = np.tile(pattern, (V, T // pattern.shape[1] + 1, 1))[:, :T]
    else:
        cas = rng.uniform(0.0, 0.012, size=(V, T, C))
    scores = rng.uniform(0.0, 1.0, size=(V, C))
    lengths = rng.integers(0, T + 1, size=V)
    if draw(st.booleans()):
        lengths[0] = T
    return torch.tensor(cas), torch.tensor(scores), torch.tensor(lengths)


# The backends of mmsd_proposals: "cpu" finds and scores the runs in C++
# (csrc/cpu/threshold_runs_kernel.cpp), the others with the vectorised PyTorch code;
# each suppresses with its own temporal_nms kernel. Inputs go to the backend's device.
BACKENDS = [
    pytest.param(name, id=name, marks=pytest.mark.skipif(name not in AVAILABLE, reason=f"backend {name!r} is not available"))
    for name in ("reference", "cpu", "cuda", "triton")
]
needs_cpu_backend = pytest.mark.skipif("cpu" not in AVAILABLE, reason="the cpu backend is not built")


def on(backend, *tensors):
    dev = backend_device(backend)
    return [t.to(dev) for t in tensors]


@pytest.mark.parametrize("backend", BACKENDS)
@given(inputs=proposal_inputs())
def test_matches_loops_default_options(inputs, backend):
    cas, scores, lengths = inputs
    got = mmsd_proposals(*on(backend, cas, scores, lengths), backend=backend)
    assert_same_rows(got, mmsd_proposals_loops(cas, scores, lengths))


@pytest.mark.parametrize("backend", BACKENDS)
@given(
    inputs=proposal_inputs(),
    # The last set holds dyadic values that the dyadic inputs take: activations
    # equal to a threshold, where "> threshold" must be strict.
    thresholds=st.sampled_from([None, (0.001, 0.004), (0.002, 0.002, 0.005), (0.006, 0.002, 0.004, 0.002), (), (4 / 2048, 1 / 2048, 9 / 2048)]),
    class_threshold=st.sampled_from([0.0, 0.2, 0.9]),
    min_len=st.integers(1, 4),
    outer_ratio=st.sampled_from([0.0, 0.25, 0.5, 1.7]),
    nms_threshold=st.sampled_from([0.0, 0.4, 0.7, 1.0, 1.5]),
)
def test_matches_loops_any_options(inputs, thresholds, class_threshold, min_len, outer_ratio, nms_threshold, backend):
    cas, scores, lengths = inputs
    options = dict(
        thresholds=thresholds, class_threshold=class_threshold, min_len=min_len, outer_ratio=outer_ratio, nms_threshold=nms_threshold
    )
    got = mmsd_proposals(*on(backend, cas, scores, lengths), backend=backend, **options)
    assert_same_rows(got, mmsd_proposals_loops(cas, scores, lengths, **options))


@needs_cpu_backend
@given(
    inputs=proposal_inputs(),
    thresholds=st.lists(st.sampled_from([k / 2048.0 for k in range(0, 26, 2)]), min_size=0, max_size=8),
    min_len=st.integers(1, 5),
    outer_ratio=st.sampled_from([0.0, 0.25, 0.5, 3.0]),
    nms_threshold=st.sampled_from([0.0, 0.4, 1.0]),
)
def test_cpu_kernel_gives_the_reference_rows_bit_for_bit(inputs, thresholds, min_len, outer_ratio, nms_threshold):
    # Thresholds in any order, repeated, and equal to activation values (the
    # dyadic inputs), so that runs repeat across thresholds and comparisons tie.
    cas, scores, lengths = inputs
    options = dict(thresholds=thresholds, min_len=min_len, outer_ratio=outer_ratio, nms_threshold=nms_threshold, class_threshold=0.0)
    cpu = mmsd_proposals(cas, scores, lengths, backend="cpu", **options)
    reference = mmsd_proposals(cas, scores, lengths, backend="reference", **options)
    assert torch.equal(cpu, reference)


@needs_cpu_backend
@pytest.mark.parametrize("nms_threshold", [0.4, 1.0])
def test_cpu_kernel_on_long_videos(nms_threshold):
    # The kernel counts threshold levels in blocks of 512 snippets: runs across
    # block edges, videos longer than several blocks, and one of exactly 512.
    rng = np.random.default_rng(11)
    V, T, C = 4, 1600, 3
    smooth = np.cumsum(rng.normal(size=(V, T, C)), axis=1) * 0.15
    cas = torch.tensor(np.exp(-6.0 + smooth - smooth.mean(axis=1, keepdims=True)))
    lengths = torch.tensor([1600, 512, 1025, 3])
    scores = torch.ones(V, C)
    options = dict(nms_threshold=nms_threshold)
    cpu = mmsd_proposals(cas, scores, lengths, backend="cpu", **options)
    assert len(cpu) > 100
    assert torch.equal(cpu, mmsd_proposals(cas, scores, lengths, backend="reference", **options))
    assert_same_rows(cpu, mmsd_proposals_loops(cas, scores, lengths, **options))


@needs_cpu_backend
@pytest.mark.parametrize("first_copies_only", [True, False])
def test_threshold_runs_op_in_caller_threshold_order(first_copies_only):
    # values of one sequence [0.5, 0.9, 0.9, 0.2, 0.9]; thresholds (caller order) 0.6, 0.1, 0.3.
    values = torch.tensor([0.5, 0.9, 0.9, 0.2, 0.9], dtype=torch.float64)
    seq, start, end, score = torch.ops.mmsd_ext._threshold_runs(
        values, torch.tensor([0]), torch.tensor([5]), torch.tensor([0.6, 0.1, 0.3], dtype=torch.float64), 1, 0.0, first_copies_only
    )
    runs = list(zip(start.tolist(), end.tolist()))
    # 0.6: [1, 3) and [4, 5); 0.1: [0, 5); 0.3: [0, 3) and [4, 5), where [4, 5) repeats the run of 0.6.
    want = [(1, 3), (4, 5), (0, 5), (0, 3)] + ([] if first_copies_only else [(4, 5)])
    assert runs == want and seq.tolist() == [0] * len(want)
    # outer_ratio 0: inner only, the mean of values[s : min(e + 1, T)].
    inner = []
    for s, e in want:
        window = values[s : min(e + 1, 5)].tolist()
        total = 0.0
        for value in window:
            total += value
        inner.append(total / len(window))
    assert score.tolist() == inner


@needs_cpu_backend
@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(values=torch.zeros(5)), TypeError, "values: expected dtype float64"),
        (dict(offsets=torch.tensor([3])), ValueError, r"offsets, lengths: sequence 0 \(offset 3, length 5\) lies outside"),
        (dict(lengths=torch.tensor([-3])), ValueError, r"offsets, lengths: sequence 0 \(offset 0, length -3\) lies outside"),
        (dict(offsets=torch.tensor([-1]), lengths=torch.tensor([1])), ValueError,
         r"offsets, lengths: sequence 0 \(offset -1, length 1\) lies outside"),
        (dict(lengths=torch.tensor([5, 1])), ValueError, r"lengths: expected shape \[N\] = \[1\]"),
        (dict(thresholds=torch.tensor([float("nan")], dtype=torch.float64)), ValueError, "thresholds: expected finite values, got nan at 0"),
        (dict(min_len=0), ValueError, "min_len: expected an int >= 1, got 0"),
        (dict(outer_ratio=-1.0), ValueError, "outer_ratio: expected a finite number >= 0, got -1"),
        (dict(values=torch.zeros(5, 1, dtype=torch.float64)), ValueError, r"values: expected a 1-d tensor, got shape \[5, 1\]"),
    ],
)
def test_threshold_runs_op_bad_inputs(change, error, match):
    args = dict(
        values=torch.zeros(5, dtype=torch.float64),
        offsets=torch.tensor([0]),
        lengths=torch.tensor([5]),
        thresholds=torch.tensor([0.5], dtype=torch.float64),
        min_len=1,
        outer_ratio=0.25,
        first_copies_only=True,
    )
    args.update(change)
    with pytest.raises(error, match=match):
        torch.ops.mmsd_ext._threshold_runs(*args.values())


@needs_cpu_backend
def test_threshold_runs_opcheck():
    values = torch.tensor([0.5, 0.9, 0.9, 0.2, 0.9, 0.0, 0.7], dtype=torch.float64)
    args = (values, torch.tensor([0, 5]), torch.tensor([5, 2]), torch.tensor([0.6, 0.1], dtype=torch.float64), 1, 0.25, True)
    # Every check, the fake kernel's (data-dependent run count) included; mmsd_proposals
    # as a whole reads values on the host, so it is not traceable.
    torch.library.opcheck(torch.ops.mmsd_ext._threshold_runs.default, args)


@needs_cpu_backend
@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(values=torch.zeros(5)), TypeError, "values: expected dtype float64"),
        (dict(lengths=torch.tensor([5, 1])), ValueError, r"lengths: expected shape \[N\] = \[1\]"),
        (dict(min_len=0), ValueError, "min_len: expected an int >= 1, got 0"),
        (dict(outer_ratio=math.inf), ValueError, "outer_ratio: expected a finite number >= 0"),
        (dict(thresholds=torch.zeros(1, 1, dtype=torch.float64)), ValueError, "thresholds: expected a 1-d tensor"),
    ],
)
def test_threshold_runs_fake_refuses_what_the_kernel_refuses(change, error, match):
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = dict(values=torch.zeros(5, dtype=torch.float64), offsets=torch.tensor([0]), lengths=torch.tensor([5]),
                thresholds=torch.tensor([0.5], dtype=torch.float64), min_len=1, outer_ratio=0.25, first_copies_only=True)
    args.update(change)
    with pytest.raises(error, match=match):  # the real kernel
        torch.ops.mmsd_ext._threshold_runs(*args.values())
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, pytest.raises(error, match=match):
        torch.ops.mmsd_ext._threshold_runs(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args.values()])


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_without_fullgraph_gives_the_eager_rows(backend):
    # As the docstring says: not traceable whole (values read on the host), but a compiled
    # caller with graph breaks gets the eager rows.
    torch._dynamo.reset()
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(13)
    cas, vs = torch.rand(2, 30, 3, generator=gen).to(device), torch.rand(2, 3, generator=gen).to(device)
    lengths = torch.tensor([30, 20], device=device)
    eager = mmsd_proposals(cas, vs, lengths, backend=backend)
    assert eager.shape[0] > 0
    got = torch.compile(mmsd_proposals, backend="aot_eager")(cas, vs, lengths, backend=backend)
    assert torch.equal(got, eager)


@given(proposal_inputs())
def test_row_order_is_video_class_then_descending_score(inputs):
    rows = mmsd_proposals(*inputs).numpy()
    assume(len(rows) > 1)
    key = rows[:, 0] * 1000 + rows[:, 1]
    assert (np.diff(key) >= 0).all()
    same_group = np.diff(key) == 0
    assert (np.diff(rows[:, 4])[same_group] <= 0).all()
    assert (rows[:, 3] - rows[:, 2] >= 3).all()  # min_len 2 plus MMSD's stored end e + 1


def test_min_len_takes_a_numpy_integer():
    # np.int64(2) was refused as "expected an int >= 1", while lengths took numpy integers.
    cas = torch.zeros(1, 12, 1, dtype=torch.float64)
    cas[0, 2:5, 0] = 0.5
    cas[0, 7:11, 0] = 0.5
    for min_len in (3, 4):
        rows = mmsd_proposals(cas, torch.ones(1, 1), thresholds=[0.1], min_len=np.int64(min_len))
        assert rows.tolist() == mmsd_proposals(cas, torch.ones(1, 1), thresholds=[0.1], min_len=min_len).tolist()
        assert len(rows) == (2 if min_len == 3 else 1)
    with pytest.raises(ValueError, match="^min_len: expected an int >= 1, got (np.)?True_?$"):
        mmsd_proposals(cas, torch.ones(1, 1), min_len=np.bool_(True))


def test_hand_worked_example():
    # One video, one class, one threshold 0.1: the run is [1, 4), L = 3.
    # inner = mean(cas[1:5]) = (3 * 0.5 + 0.0625) / 4 (MMSD's slice takes snippet 4 too);
    # outer: left range [max(0, int(1 - 0.75)), 1) = [0, 1) -> 0.0625; right range
    # [5, min(T - 1, int(4 + 0.75 + 1))) = [5, 5) is empty; so outer = 0.0625.
    # Stored segment (1, 5).
    cas = torch.tensor([0.0625, 0.5, 0.5, 0.5, 0.0625, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    rows = mmsd_proposals(cas[None, :, None], torch.ones(1, 1), thresholds=[0.1])
    assert rows.tolist() == [[0.0, 0.0, 1.0, 5.0, (3 * 0.5 + 0.0625) / 4 - 0.0625]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_outer_window_of_a_huge_outer_ratio_is_the_whole_video(backend):
    # The run [2, 5) of a 12-snippet video: with r * L past 2**63 the window bounds
    # overflowed the int64 casts (outer mean 0) before 2026-11-27. Any r large enough
    # gives the outer range [0, 2) + [6, 11): (0 + 0 + 5 * 0.2) / 7.
    cas = torch.tensor([0.0, 0.0, 0.5, 0.5, 0.5, 0.0, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2], dtype=torch.float64)
    expected = (0.5 * 3 + 0.0) / 4 - 1.0 / 7
    for ratio in (10.0, 1e19, 1e300):
        rows = mmsd_proposals(*on(backend, cas[None, :, None], torch.ones(1, 1, dtype=torch.float64)),
                              thresholds=[0.3], class_threshold=0.5, min_len=2, outer_ratio=ratio, backend=backend)
        assert rows[:, 4].tolist() == pytest.approx([expected], rel=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_class_scoring_exactly_the_class_threshold_is_selected(backend):
    cas = torch.tensor([0.0, 0.5, 0.5, 0.5, 0.0, 0.0], dtype=torch.float64)[None, :, None]
    for score, selected in ((0.5, True), (0.4999, False)):
        rows = mmsd_proposals(*on(backend, cas, torch.tensor([[score]], dtype=torch.float64)),
                              thresholds=[0.3], class_threshold=0.5, min_len=2, backend=backend)
        assert (len(rows) == 1) == selected, (score, rows)
        if selected:
            assert rows[0, :4].tolist() == [0.0, 0.0, 1.0, 5.0]  # the run [1, 4), stored as (s, e + 1)


def test_runs_touching_both_ends_and_single_snippets():
    T = 6
    cas = torch.zeros(4, T, 1, dtype=torch.float64)
    cas[0] = 0.5  # one run covering the whole video
    cas[1, :1] = 0.5  # a single-snippet video
    cas[2, [0, 2, 4]] = 0.5  # only runs of length 1: below min_len
    cas[3, 3:] = 0.5  # a run touching the end
    lengths = torch.tensor([T, 1, T, T])
    rows = mmsd_proposals(cas, torch.ones(4, 1), lengths, thresholds=[0.1, 0.2])
    assert_same_rows(rows, mmsd_proposals_loops(cas, torch.ones(4, 1), lengths, thresholds=[0.1, 0.2]))
    # The whole-video run: inner slice stops at the end, no outer snippet -> score 0.5.
    assert rows[rows[:, 0] == 0].tolist() == [[0.0, 0.0, 0.0, T + 1.0, 0.5]]
    assert set(rows[:, 0].tolist()) == {0.0, 3.0}
    rows = mmsd_proposals(cas, torch.ones(4, 1), lengths, thresholds=[0.1], min_len=1)
    assert_same_rows(rows, mmsd_proposals_loops(cas, torch.ones(4, 1), lengths, thresholds=[0.1], min_len=1))
    assert (rows[:, 0] == 1).sum() == 1 and (rows[:, 0] == 2).sum() == 3


def test_equal_scores_keep_the_lower_threshold_then_start():
    # Two separate runs with identical values and contexts: equal scores. With
    # MMSD's overlap they do not suppress each other; rows keep (threshold, start) order.
    cas = torch.zeros(1, 12, 1, dtype=torch.float64)
    cas[0, 1:3, 0] = 0.5
    cas[0, 7:9, 0] = 0.5
    rows = mmsd_proposals(cas, torch.ones(1, 1), thresholds=[0.1])
    assert rows[:, 2].tolist() == [1.0, 7.0]
    assert rows[0, 4] == rows[1, 4]
    assert_same_rows(rows, mmsd_proposals_loops(cas, torch.ones(1, 1), thresholds=[0.1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_equal_windows_at_other_positions_tie_exactly(backend):
    # The same non-dyadic bump at three places, after noise of many magnitudes:
    # the window sums round, yet the three runs must score exactly alike and keep
    # start order. (A difference of one running prefix sum, which this code once
    # used, scores them a few ulps apart here and orders them 21, 35, 28.)
    rng = np.random.default_rng(0)
    noise = rng.uniform(0.0, 0.09, size=20) * np.exp(rng.uniform(-20.0, 0.0, size=20))
    bump = [0.01, 0.31, 0.71, 0.31, 0.01, 0.0, 0.0]
    cas = torch.tensor(list(noise) + bump * 3, dtype=torch.float32)[None, :, None]
    got = mmsd_proposals(*on(backend, cas, torch.ones(1, 1)), thresholds=[0.15], backend=backend)
    assert got[:, 2].tolist() == [21.0, 28.0, 35.0]
    assert got[0, 4] == got[1, 4] == got[2, 4]
    assert_same_rows(got, mmsd_proposals_loops(cas, torch.ones(1, 1), thresholds=[0.15]))


def test_end_of_video_tie_keeps_the_lower_threshold():
    # The documented systematic tie: [1, 5) at 0.1 and [1, 4) at 0.4 average the
    # same snippets (the inner slice is clipped at T = 5) and share the outer
    # window [0, 1): equal scores 0.45, and the lower threshold's run is kept.
    cas = torch.tensor([0.0, 0.5, 0.5, 0.5, 0.3], dtype=torch.float64)[None, :, None]
    rows = mmsd_proposals(cas, torch.ones(1, 1), thresholds=[0.1, 0.4])
    assert rows.tolist() == [[0.0, 0.0, 1.0, 6.0, (0.5 + 0.5 + 0.5 + 0.3) / 4]]
    assert_same_rows(rows, mmsd_proposals_loops(cas, torch.ones(1, 1), thresholds=[0.1, 0.4]))


def test_no_selected_class_empty_thresholds_and_zero_lengths_give_empty_rows():
    cas = torch.rand(2, 10, 3) * 0.01
    for rows in (
        mmsd_proposals(cas, torch.zeros(2, 3)),
        mmsd_proposals(cas, torch.ones(2, 3), thresholds=[]),
        mmsd_proposals(cas, torch.ones(2, 3), torch.tensor([0, 0])),
        mmsd_proposals(cas[:, :0], torch.ones(2, 3)),
        mmsd_proposals(cas[:0], torch.ones(0, 3)),
        mmsd_proposals(cas[:0], torch.ones(0, 3), []),  # numpy reads [] as float64: it was refused
    ):
        assert rows.shape == (0, 5) and rows.dtype == torch.float64


def test_default_thresholds_are_mmsds():
    assert len(MMSD_THRESHOLDS) == 20
    np.testing.assert_array_equal(np.array(MMSD_THRESHOLDS), np.arange(0.0003, 0.01, 0.0005))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_cas_is_read_exactly(backend, dtype):
    rng = np.random.default_rng(3)
    cas = torch.tensor(rng.uniform(0, 0.012, size=(3, 30, 2))).to(dtype)
    scores = torch.tensor(rng.uniform(0, 1, size=(3, 2))).to(dtype)
    want = mmsd_proposals_loops(cas.double(), scores.double())
    device = backend_device(backend)
    assert_same_rows(mmsd_proposals(cas.to(device), scores.to(device), backend=backend).cpu(), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    rng = np.random.default_rng(4)
    base = torch.tensor(rng.uniform(0, 0.012, size=(3, 2, 40))).to(backend_device(backend))
    cas = base.transpose(1, 2)  # [3, 40, 2], not contiguous
    scores = torch.tensor(rng.uniform(0, 1, size=(2, 3))).to(backend_device(backend)).t()
    assert not cas.is_contiguous() and not scores.is_contiguous()
    got = mmsd_proposals(cas, scores, backend=backend).cpu()
    assert_same_rows(got, mmsd_proposals_loops(cas.contiguous().cpu(), scores.contiguous().cpu()))


def test_lengths_as_list_and_inputs_untouched():
    rng = np.random.default_rng(5)
    cas = torch.tensor(rng.uniform(0, 0.012, size=(2, 30, 2)))
    scores = torch.tensor(rng.uniform(0, 1, size=(2, 2)))
    before = cas.clone(), scores.clone()
    a = mmsd_proposals(cas, scores, [30, 17])
    b = mmsd_proposals(cas, scores, torch.tensor([30, 17], dtype=torch.int32))
    assert torch.equal(a, b)
    # Every integer dtype the other ops take (uint16 and uint32 were refused).
    for dtype in (torch.int16, torch.int8, torch.uint8, torch.uint16, torch.uint32):
        assert torch.equal(mmsd_proposals(cas, scores, torch.tensor([30, 17], dtype=dtype)), a), dtype
    assert torch.equal(cas, before[0]) and torch.equal(scores, before[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_is_never_read(backend):
    rng = np.random.default_rng(6)
    device = backend_device(backend)
    cas = torch.tensor(rng.uniform(0, 0.012, size=(2, 30, 2))).to(device)
    lengths, ones = torch.tensor([30, 12], device=device), torch.ones(2, 2, device=device)
    garbage = cas.clone()
    garbage[1, 12:] = float("nan")
    expected = mmsd_proposals(cas, ones, lengths, backend=backend)
    assert expected.shape[0] > 0 and torch.equal(mmsd_proposals(garbage, ones, lengths, backend=backend), expected)


def test_explicit_reference_backend():
    rng = np.random.default_rng(7)
    cas = torch.tensor(rng.uniform(0, 0.012, size=(2, 30, 2)))
    assert torch.equal(mmsd_proposals(cas, torch.ones(2, 2)), mmsd_proposals(cas, torch.ones(2, 2), backend="reference"))


@pytest.mark.parametrize("backend", [None, "reference"])
def test_the_nms_resolves_the_callers_backend(monkeypatch, backend):
    # mmsd_proposals resolves a backend for its run finding, but hands the NMS the
    # caller's own argument: with auto, temporal_nms makes its own choice for the
    # device (on CUDA tensors in a build without CUDA kernels that is not triton,
    # which mmsd_proposals' auto picks and whose gather cannot run there).
    from mmsd_ext import localize

    seen = []
    real = localize.temporal_nms

    def spy(*args, **kwargs):
        seen.append(kwargs["backend"])
        return real(*args, **kwargs)

    monkeypatch.setattr(localize, "temporal_nms", spy)
    rng = np.random.default_rng(7)
    cas = torch.tensor(rng.uniform(0, 0.012, size=(2, 30, 2)))
    rows = mmsd_proposals(cas, torch.ones(2, 2), backend=backend)
    assert seen == [backend] and rows.shape[0] > 0


def test_pad_cas():
    a, b = np.ones((5, 3), np.float32), torch.full((2, 3), 2.0)
    cas, lengths = pad_cas([a, b])
    assert cas.shape == (2, 5, 3) and cas.dtype == torch.float32 and lengths.tolist() == [5, 2]
    assert cas[1, :2].eq(2).all() and cas[1, 2:].eq(0).all()
    with pytest.raises(ValueError, match="sequences\\[1\\]"):
        pad_cas([a, np.ones((2, 4))])
    with pytest.raises(ValueError, match="sequences"):
        pad_cas([])


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(cas=torch.zeros(4, 3)), ValueError, "cas"),
        (dict(cas=torch.zeros(2, 4, 3, dtype=torch.int64)), TypeError, "cas"),
        (dict(cas=np.zeros((2, 4, 3))), TypeError, "cas"),
        (dict(video_scores=torch.zeros(2, 4)), ValueError, "video_scores"),
        (dict(video_scores=torch.full((2, 3), float("nan"))), ValueError, "video_scores"),
        (dict(lengths=torch.tensor([4, -1])), ValueError, "lengths"),
        (dict(lengths=torch.tensor([4, 5])), ValueError, "lengths"),
        (dict(lengths=torch.tensor([4])), ValueError, "lengths"),
        (dict(lengths=torch.tensor([4.0, 2.0])), TypeError, "lengths"),
        (dict(lengths=torch.tensor([4, 2], dtype=torch.uint64)), TypeError, r"^lengths: expected an int64 tensor \(or .*uint32\), got uint64$"),
        (dict(lengths=torch.tensor([True, True])), TypeError, "^lengths: .* got bool$"),
        (dict(thresholds=[[0.1]]), ValueError, "thresholds"),
        (dict(thresholds=["a"]), ValueError, "^thresholds: expected a 1-d sequence of numbers"),
        (dict(thresholds=[[0.1, 0.2], [0.3]]), ValueError, "^thresholds: expected a 1-d sequence of numbers"),
        (dict(lengths=np.array([2**63 + 5, 4], dtype=np.uint64)), ValueError, r"^lengths: .* got max 9223372036854775813"),
        (dict(lengths=[[4], [4, 4]]), ValueError, "^lengths: expected a 1-d sequence of integers"),
        (dict(thresholds=[float("nan")]), ValueError, "thresholds"),
        (dict(min_len=0), ValueError, "min_len"),
        (dict(min_len=2.0), ValueError, "min_len"),
        (dict(outer_ratio=-0.5), ValueError, "outer_ratio"),
        (dict(nms_threshold=-0.1), ValueError, "nms_threshold"),
        (dict(class_threshold="high"), TypeError, "class_threshold"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_name_the_argument(change, error, match, backend):
    change = dict(change)  # the parametrized dict is shared by every backend's case
    device = backend_device(backend)
    args = dict(cas=torch.rand(2, 4, 3) * 0.01, video_scores=torch.ones(2, 3), lengths=None)
    options = {k: change.pop(k) for k in list(change) if k not in args}
    args.update(change)
    args = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    with pytest.raises(error, match=match):
        mmsd_proposals(args["cas"], args["video_scores"], args["lengths"], backend=backend, **options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_cas_inside_lengths_is_an_error(backend):
    cas = torch.rand(2, 4, 3) * 0.01
    cas[1, 2, 0] = float("inf")
    with pytest.raises(ValueError, match="cas"):
        mmsd_proposals(cas.to(backend_device(backend)), torch.ones(2, 3, device=backend_device(backend)), backend=backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(8)
    cas = torch.tensor(rng.uniform(0, 0.012, size=(5, 200, 4)), dtype=torch.float32)
    scores = torch.tensor(rng.uniform(0, 1, size=(5, 4)), dtype=torch.float32)
    lengths = torch.tensor([200, 150, 3, 0, 90])
    cpu = mmsd_proposals(cas, scores, lengths)
    cuda = mmsd_proposals(cas.cuda(), scores.cuda(), lengths.cuda())
    assert cuda.device.type == "cuda"
    assert torch.equal(cuda.cpu(), cpu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_devices_are_an_error():
    with pytest.raises(ValueError, match="video_scores"):
        mmsd_proposals(torch.rand(2, 4, 3).cuda(), torch.ones(2, 3))
    # A lengths tensor on another device is refused too (a list is the caller's numbers, taken as given).
    with pytest.raises(ValueError, match="^lengths"):
        mmsd_proposals(torch.rand(2, 4, 3).cuda(), torch.ones(2, 3).cuda(), torch.tensor([4, 4]))


def test_lengths_of_bools_are_refused():
    # [True, True] would read as lengths of 1.
    with pytest.raises(TypeError, match="^lengths"):
        mmsd_proposals(torch.zeros(2, 5, 3), torch.ones(2, 3), [True, True])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_threshold_tensors_of_any_float_dtype(backend, dtype):
    gen = torch.Generator().manual_seed(1)
    cas, scores = torch.rand(2, 40, 3, generator=gen), torch.ones(2, 3)
    thresholds = torch.tensor([0.25, 0.5, 0.75], dtype=dtype)
    expected = mmsd_proposals(cas, scores, thresholds=thresholds.double().tolist(), backend="reference")
    assert len(expected) > 0
    got = mmsd_proposals(*on(backend, cas, scores), thresholds=thresholds, backend=backend)
    assert torch.equal(got.cpu(), expected)


def test_pad_cas_keeps_the_first_sequences_dtype_and_refuses_a_tensor():
    cas, _ = pad_cas([np.zeros((3, 2)), np.zeros((2, 2), np.float32)])
    assert cas.dtype == torch.float64
    cas, _ = pad_cas([torch.zeros(3, 2, dtype=torch.float16)])
    assert cas.dtype == torch.float16
    with pytest.raises(TypeError, match="sequences"):
        pad_cas(torch.zeros(2, 3, 2))  # a [V, T, C] tensor is not a sequence of videos


@pytest.mark.parametrize("change, match", [
    (dict(min_len=True), "^min_len"),
    (dict(class_threshold=float("nan")), "^class_threshold"),
    (dict(class_threshold=float("-inf")), "^class_threshold"),
    (dict(outer_ratio=float("inf")), "^outer_ratio"),
])
def test_bool_and_non_finite_options_are_refused(change, match):
    cas = torch.zeros(1, 30, 2, dtype=torch.float64)
    cas[0, 10:20, 1] = 1.0
    with pytest.raises(ValueError, match=match):
        mmsd_proposals(cas, torch.tensor([[0.0, 0.9]], dtype=torch.float64), **change)
