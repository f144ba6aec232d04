"""From class activation sequences to scored segments: ``mmsd_proposals`` (MMSD's ``getActLoc``).

No Python loop over videos, classes, thresholds or runs: the sequences of every
selected (video, class) pair are laid end to end, the maximal runs above every
threshold are found and scored (on the CPU by a C++ sweep,
csrc/cpu/threshold_runs_kernel.cpp; elsewhere by the vectorised PyTorch code
here, which gives the same numbers), and one batched ``temporal_nms`` call
suppresses within each (video, class)."""

import functools
import math

import numpy as np
import torch

from . import _backend, _checks, _loader
from .nms import temporal_nms

#: MMSD's activation thresholds, ``numpy.arange(0.0003, 0.01, 0.0005)`` (20 values,
#: the float64 numbers numpy produces, so comparisons match its evaluation bit for bit).
MMSD_THRESHOLDS = tuple(np.arange(0.0003, 0.01, 0.0005).tolist())

_CAS_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Backends of mmsd_proposals: "cpu" has its own run kernel; on a GPU the run finding
# is the vectorised PyTorch code and the backend names the temporal_nms kernel.
_SUPPORTED = ("reference", "cpu", "cuda", "triton")


def mmsd_proposals(
    cas,
    video_scores,
    lengths=None,
    *,
    thresholds=None,
    class_threshold=0.2,
    min_len=2,
    outer_ratio=0.25,
    nms_threshold=0.4,
    backend=None,
):
    """Scored temporal proposals from class activation sequences, as MMSD's ``getActLoc`` makes them.

    The same windows and scores; the NMS breaks ties by a fixed rule where MMSD's order depends
    on numpy (see "Ties" below), and the means are float64.

    For every (video v, class c) with ``video_scores[v, c] >= class_threshold``
    and for every threshold, each maximal run ``[s, e)`` of
    ``cas[v, :lengths[v], c] > threshold`` with ``e - s >= min_len`` is a
    proposal. With ``T = lengths[v]``, ``L = e - s`` and ``r = outer_ratio``:

    - inner = mean of ``cas[s : e + 1]`` (MMSD's slice: one snippet past the
      run, unless the run touches the end of the video);
    - outer = mean over ``[max(0, int(s - r*L)), s)`` and
      ``[e + 1, min(T - 1, int(e + r*L + 1)))`` (``int`` truncates toward
      zero; 0 when both ranges are empty; snippet ``e`` belongs to neither and
      snippet ``T - 1`` never to the outer range, as in MMSD);
    - score = inner - outer, stored segment ``(s, e + 1)``.

    The proposals of all thresholds of one (video, class) then go through
    greedy NMS: by descending score, ties by lower (threshold, start) order,
    a proposal is dropped when a kept one covers strictly more than
    ``nms_threshold`` of its own length, lengths and intersections counted
    inclusively (``temporal_nms(..., overlap="other", offset=1)``).

    Ties, and how they differ from MMSD's code: MMSD's NMS visits equal scores
    in the reverse of ``numpy.argsort``'s order, which numpy leaves unspecified
    (with numpy 2.4 on a CPU with AVX-512, a quarter of 5-element inputs with
    ties come out of input order), and it compares float32 means. So its tie
    decisions depend on the machine and can differ from the rule above. One
    case is systematic, not rare: the inner slice is clipped at the end of the
    video, so the run ``[s, T)`` of a threshold and the run ``[s, T - 1)`` of a
    higher one (when ``cas[T - 1]`` lies between them) average the same
    snippets and usually share their outer window. Their scores are equal; this
    function keeps ``(s, T + 1)``, from the threshold listed first (the lower
    one in ``MMSD_THRESHOLDS``, which ascend), where MMSD, when
    argsort keeps input order, keeps ``(s, T)``.

    Arithmetic is float64 whatever the dtype of ``cas``: thresholds are compared
    with float64 values (as numpy >= 2 compares a float32 array with a float64
    scalar), and every mean is its window's sum, added left to right from 0 as a
    plain loop adds, divided by the count. So every backend gives the same
    scores bit for bit, and runs over equal values get exactly equal scores.
    (MMSD's float32 ``np.mean`` differs by about 1e-7 relative.)

    Args:
        cas: [V, T, C] float16/bfloat16/float32/float64 class activation sequences,
            padded along T; entries at ``t >= lengths[v]`` are never read.
            MMSD passes the fused ``softmax(cas_logits) * attention`` without the
            background column. Values inside the lengths must be finite.
        video_scores: [V, C] floating video-level class scores (finite), same device.
        lengths: optional integer tensor (int64, or a narrower integer dtype, widened)
            or sequence [V] of valid lengths in ``[0, T]``
            (default: T for every video). A video of length 0 gives no proposals.
        thresholds: 1-d sequence, array or tensor of activation thresholds
            (default ``MMSD_THRESHOLDS``). An empty one gives no proposals.
        class_threshold: minimum video score for a class to be localised (compared in
            the dtype of ``video_scores``, as numpy >= 2 compares MMSD's float32
            scores with a Python float).
        min_len: minimum run length in snippets (int >= 1).
        outer_ratio: r above (finite, >= 0).
        nms_threshold: overlap strictly above which a proposal is suppressed (>= 0).
        backend: None (a block's or the process's, else auto), "auto", "reference", "cpu", "cuda"
            or "triton". "cpu" finds and
            scores the runs in one C++ pass (the default for CPU tensors when the
            extension is built) and suppresses with the ``cpu`` NMS kernel;
            "reference" does both with the vectorised PyTorch code below;
            "cuda" / "triton" run that PyTorch code on the GPU and suppress with
            that ``temporal_nms`` backend. With None, the NMS picks its own backend
            as ``temporal_nms(backend=None)`` does (on CUDA tensors in a build without
            CUDA kernels: the cpu kernel on host copies, not triton, whose gather
            needs them). Every backend gives the same rows,
            bit for bit (the scores as above; NMS decisions are exact).

    Returns:
        float64 tensor [P, 5] on the device of ``cas``, rows
        ``(video, class, start, end, score)`` with integral video, class, start and
        end. Row order: by video, then class, then NMS order (descending score,
        ties by the threshold's position in ``thresholds``, then lower start) -- for one class, exactly the
        order in which MMSD accumulates its per-class list. ``P == 0`` gives shape [0, 5].

    Not an op: it reads values on the host (which classes pass, how many runs there
    are), so ``torch.compile(fullgraph=True)`` cannot trace it. Without ``fullgraph`` it
    runs with graph breaks and gives the eager rows; evaluation usually calls it
    outside the compiled region.

    Raises:
        TypeError / ValueError naming the argument: wrong rank, dtype or shape,
        non-finite ``cas`` or ``video_scores``, lengths outside ``[0, T]``, bad
        thresholds or options, tensors on different devices.

    Example::

        >>> cas = torch.rand(4, 300, 20) * 0.02            # [V, T, C]
        >>> video_scores = torch.rand(4, 20)
        >>> rows = mmsd_ext.mmsd_proposals(cas, video_scores, torch.tensor([300, 250, 120, 300]))
        >>> video, cls, start, end, score = rows.unbind(1)
    """
    cas, video_scores, lengths, thresholds = _check_proposal_args(cas, video_scores, lengths, thresholds)
    class_threshold = _finite_number("class_threshold", class_threshold)
    if isinstance(min_len, (bool, np.bool_)) or not isinstance(min_len, (int, np.integer)) or min_len < 1:
        raise ValueError(f"min_len: expected an int >= 1, got {min_len!r}")
    min_len = int(min_len)
    outer_ratio = _finite_number("outer_ratio", outer_ratio)
    if outer_ratio < 0:
        raise ValueError(f"outer_ratio: expected a number >= 0, got {outer_ratio}")
    nms_threshold = _finite_number("nms_threshold", nms_threshold)
    if nms_threshold < 0:
        raise ValueError(f"nms_threshold: expected a number >= 0, got {nms_threshold}")

    device = cas.device
    # The run finding's backend; the NMS resolves the call's own argument (auto there
    # skips what cannot run on these tensors, e.g. triton without its gather kernel).
    name = _backend.resolve("mmsd_proposals", backend, device, supported=_SUPPORTED)
    V, T, C = cas.shape
    empty = torch.zeros(0, 5, dtype=torch.float64, device=device)

    # Selected (video, class) pairs, by video then class ("sequence" n below).
    video, cls = (video_scores >= class_threshold).nonzero(as_tuple=True)
    length = lengths[video]
    if video.numel() == 0 or thresholds.numel() == 0 or int(length.max()) < min_len:
        return empty
    # Ragged layout: the valid snippets of every selected sequence end to end
    # (no padding, so long videos cost nothing to short ones).
    offset = torch.cumsum(length, 0) - length  # [N] first flat position of each sequence
    seq_of = torch.repeat_interleave(length)  # [S]
    t_of = torch.arange(seq_of.numel(), device=device) - _take(offset, seq_of)
    flat = cas[_take(video, seq_of), t_of, _take(cls, seq_of)].to(torch.float64)
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("cas: expected finite values within the lengths of the selected (video, class) pairs, got NaN or inf")
    # The same run often appears at several thresholds. Every copy has the same
    # score and covers the first one entirely (overlap 1 > nms_threshold), so
    # it is suppressed by it, or by whatever suppresses it: when nms_threshold
    # < 1, keeping only the first copy changes nothing and shrinks the work
    # after this point several-fold.
    if name == "cpu":
        seq, start, end, score = torch.ops.mmsd_ext._threshold_runs(
            flat, offset, length, thresholds, min_len, outer_ratio, nms_threshold < 1
        )
        if seq.numel() == 0:
            return empty
    else:
        runs = _threshold_runs(flat, seq_of, t_of, length, thresholds, min_len, first_copies_only=nms_threshold < 1)
        if runs is None:
            return empty
        seq, start, end = runs  # end is exclusive: the run is [start, end)
        score = _run_scores(flat, offset, length, seq, start, end, outer_ratio)

    groups = _take(video, seq) * C + _take(cls, seq)
    segments = torch.stack([start, end + 1], dim=1).to(torch.float64)
    kept = temporal_nms(segments, score, nms_threshold, groups=groups, overlap="other", offset=1, backend=backend)
    # NMS returns kept indices in global score order; a stable sort by group
    # (monotone in the sequence index) gives video, class, then NMS order.
    kept = _take(kept, torch.sort(_take(groups, kept), stable=True).indices)
    seq = _take(seq, kept)
    rows = torch.stack(
        [
            _take(video, seq).to(torch.float64),
            _take(cls, seq).to(torch.float64),
            _take(start, kept).to(torch.float64),
            (_take(end, kept) + 1).to(torch.float64),
            _take(score, kept),
        ],
        dim=1,
    )
    return rows


def _take(values, index):
    """values[index] for 1-d tensors; index_select is several times faster than advanced indexing on CPU."""
    return values.index_select(0, index)


def pad_cas(sequences, dtype=None):
    """Pad per-video class activation sequences ([T_i, C] arrays or tensors) into one batch.

    Returns:
        (cas [V, max T_i, C] tensor, lengths int64 [V]); zero padding. The dtype is
        ``dtype`` or that of the first sequence (numpy arrays become tensors).

    Raises:
        TypeError / ValueError naming ``sequences`` (and the video at fault): not a
        sequence, no video, a sequence that is not a 2-d array, a column count
        unlike the first video's.

    Example::

        >>> cas, lengths = mmsd_ext.localize.pad_cas([np.ones((3, 2)), np.zeros((5, 2))])
        >>> cas.shape, lengths
        (torch.Size([2, 5, 2]), tensor([3, 5]))
    """
    return _pad(sequences, dtype, "sequences")


def _pad(sequences, dtype, name):
    """pad_cas, its errors naming the caller's argument ``name``."""
    if isinstance(sequences, torch.Tensor) or not hasattr(sequences, "__len__"):
        raise TypeError(f"{name}: expected a sequence of [T_i, C] arrays or tensors, got {type(sequences).__name__}")
    if len(sequences) == 0:
        raise ValueError(f"{name}: expected at least one video, got none")
    tensors = []
    for i, seq in enumerate(sequences):
        try:
            tensors.append(torch.as_tensor(seq))
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name}[{i}]: expected a [T_i, C] array or tensor, got {type(seq).__name__}") from None
    C = None
    for i, t in enumerate(tensors):
        if t.dim() != 2:
            raise ValueError(f"{name}[{i}]: expected a 2-d [T_i, C] array, got shape {tuple(t.shape)}")
        if C is None:
            C = t.shape[1]
        elif t.shape[1] != C:
            raise ValueError(f"{name}[{i}]: expected C = {C} columns like {name}[0], got {t.shape[1]}")
    dtype = dtype or tensors[0].dtype
    lengths = torch.tensor([t.shape[0] for t in tensors], dtype=torch.int64)
    # The longest from the sizes, not read back from lengths (which torch.export refuses).
    T = functools.reduce(torch.sym_max, (t.shape[0] for t in tensors))
    out = torch.zeros(len(tensors), T, C, dtype=dtype, device=tensors[0].device)
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]] = t.to(device=out.device, dtype=dtype)
    return out, lengths.to(out.device)


def _threshold_runs(flat, seq_of, t_of, length, thresholds, min_len, first_copies_only):
    """Maximal runs above each threshold of every selected sequence.

    Returns (seq, start, end) int64 tensors, one entry per run of length >=
    min_len, ordered by sequence, then threshold, then start (the order in which
    MMSD appends them, which the NMS tie-break relies on); None if there is none.
    With ``first_copies_only``, a run equal (same sequence, start, end) to an
    earlier one in that order is left out.

    No [thresholds x snippets] mask is built. With the thresholds sorted,
    ``level(x)`` = how many thresholds lie strictly below x, and ``x > thr_k``
    iff ``k < level(x)``; so a run of threshold k starts at t exactly for
    ``level(x[t-1]) <= k < level(x[t])`` and ends after t exactly for
    ``level(x[t+1]) <= k < level(x[t])`` (level 0 outside the sequence). Work is
    proportional to the snippets plus the runs.
    """
    device = flat.device
    K = thresholds.numel()
    sorted_thr, thr_order = torch.sort(thresholds, stable=True)
    level = torch.searchsorted(sorted_thr, flat, side="left")  # [S]
    zero = torch.zeros((), dtype=level.dtype, device=device)
    before = torch.where(t_of == 0, zero, torch.roll(level, 1))
    after = torch.where(t_of == _take(length, seq_of) - 1, zero, torch.roll(level, -1))

    def expand(low):
        """(position, sorted threshold index) of every k in [low, level) at each position."""
        count = (level - low).clamp(min=0)
        position = torch.repeat_interleave(count)
        k = torch.arange(position.numel(), device=device) - _take(torch.cumsum(count, 0) - count - low, position)
        # Position order is (sequence, time); a stable sort by (sequence, threshold)
        # gives (sequence, threshold, time), where starts and ends pair up one to one.
        order = torch.sort(_take(seq_of, position) * K + k, stable=True).indices
        return _take(position, order), _take(k, order)

    p_start, k = expand(before)
    p_last, _ = expand(after)
    start = _take(t_of, p_start)
    end = _take(t_of, p_last) + 1
    keep = (end - start) >= min_len
    in_order = bool((thr_order[1:] > thr_order[:-1]).all())
    if first_copies_only and in_order:
        # The run [s, e) is maximal for exactly the thresholds k with
        # max(level(x[s-1]), level(x[e])) <= k < level(min x[s:e]); its first
        # copy is at the lowest of them.
        keep &= k == torch.maximum(_take(before, p_start), _take(after, p_last))
    keep = keep.nonzero().squeeze(1)
    if keep.numel() == 0:
        return None
    seq = _take(seq_of, _take(p_start, keep))
    start, end = _take(start, keep), _take(end, keep)
    if not in_order:
        # Thresholds given out of order: restore the caller's threshold order.
        order = torch.sort(seq * K + _take(thr_order, _take(k, keep)), stable=True).indices
        seq, start, end = _take(seq, order), _take(start, order), _take(end, order)
        if first_copies_only:
            first = _first_occurrences(seq, start, end, int(length.max()))
            seq, start, end = seq[first], start[first], end[first]
    return seq, start, end


def _run_scores(flat, offset, length, seq, start, end, outer_ratio):
    """MMSD's inner - outer contrast of each run [start, end) of sequence ``seq``, float64.

    ``flat``: the float64 values of the sequences laid end to end. The C++ kernel
    (csrc/cpu/threshold_runs_kernel.cpp) repeats these operations in this order,
    so both give the same numbers.
    """
    base = _take(offset, seq)
    T = _take(length, seq)
    inner_end = torch.minimum(end + 1, T)
    run_len = (end - start).to(torch.float64)
    reach = outer_ratio * run_len
    # int(x) truncates toward zero, like MMSD's int(); the order of the
    # additions follows its expressions so the float64 results are identical. Clamped
    # in float64 before the int64 casts, which a huge reach would overflow.
    left = torch.clamp(torch.trunc(start.to(torch.float64) - reach), min=0).to(torch.int64)
    right = torch.minimum((T - 1).to(torch.float64), torch.trunc((end.to(torch.float64) + reach) + 1)).to(torch.int64)
    n_left = start - left
    n_right = torch.clamp(right - (end + 1), min=0)
    right_from = torch.minimum(end + 1, right).clamp(min=0)
    right_to = torch.maximum(right, right_from)
    # The inner and left windows in one pass; the right window continues the
    # left one's sum, as MMSD's mean over the concatenated index list adds them.
    first = torch.cat([base + start, base + left])
    stop = torch.cat([base + inner_end, base + start])
    inner_sum, left_sum = _window_sums(flat, first, stop, torch.zeros(first.shape, dtype=flat.dtype, device=flat.device)).chunk(2)
    total = _window_sums(flat, base + right_from, base + right_to, left_sum)
    inner = inner_sum / (inner_end - start).to(torch.float64)
    count = n_left + n_right
    outer = torch.where(count > 0, total / count.clamp(min=1).to(torch.float64), torch.zeros_like(total))
    return inner - outer


def _window_sums(values, first, stop, initial):
    """``initial[i] + values[first[i]] + ... + values[stop[i] - 1]``, added left to right as a plain loop adds.

    Not a difference of prefix sums: that rounds differently at each position, so
    runs over equal values would get scores a few ulps apart and NMS would no
    longer see them as tied. Windows are visited longest first; step j adds the
    j-th value of every window longer than j, so the work is the total window
    length and the loop runs once per position of the longest window.
    """
    count = stop - first
    if count.numel() == 0:
        return initial.clone()
    count, order = torch.sort(count, descending=True, stable=True)
    first = _take(first, order)
    running = _take(initial, order)
    # active[j]: how many windows are longer than j (a prefix of the sorted ones).
    steps = torch.arange(int(count[0]), device=count.device)
    active = (count.numel() - torch.searchsorted(count.flip(0), steps, right=True)).tolist()
    for j, n in enumerate(active):
        running[:n] += _take(values, first[:n] + j)
    total = torch.empty_like(running)
    total[order] = running
    return total


def _first_occurrences(seq, start, end, max_len):
    """Indices (ascending) of the first run of each distinct (seq, start, end)."""
    width = max_len + 2
    if (int(seq.max()) + 1) * width * width < 2**62:
        key = (seq * width + start) * width + end
        order = torch.sort(key, stable=True).indices
        same = (key[order][1:] == key[order][:-1])
    else:  # a key would overflow int64: sort by each column in turn
        order = torch.sort(end, stable=True).indices
        order = order[torch.sort(start[order], stable=True).indices]
        order = order[torch.sort(seq[order], stable=True).indices]
        same = (seq[order][1:] == seq[order][:-1]) & (start[order][1:] == start[order][:-1]) & (end[order][1:] == end[order][:-1])
    is_first = torch.ones(order.numel(), dtype=torch.bool, device=order.device)
    is_first[1:] = ~same
    return torch.sort(order[is_first]).values


def _finite_number(name, value):
    value = _checks.number(name, value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    return value


def _check_proposal_args(cas, video_scores, lengths, thresholds):
    _checks.floating("cas", cas, _CAS_DTYPES)
    _checks.rank("cas", cas, 3, "[V, T, C]")
    V, T, C = cas.shape
    _checks.floating("video_scores", video_scores, _CAS_DTYPES)
    if tuple(video_scores.shape) != (V, C):
        raise ValueError(f"video_scores: expected shape [V, C] = [{V}, {C}], got {tuple(video_scores.shape)}")
    _checks.same_device("cas", cas, video_scores=video_scores)
    _checks.has_values("mmsd_proposals", cas=cas, video_scores=video_scores, lengths=lengths, thresholds=thresholds)
    cas = cas.detach()
    video_scores = video_scores.detach()
    if not bool(torch.isfinite(video_scores).all()):
        raise ValueError("video_scores: expected finite values, got NaN or inf")

    if lengths is None:
        lengths = torch.full((V,), T, dtype=torch.int64, device=cas.device)
    else:
        if isinstance(lengths, torch.Tensor):
            # As the other ops: int64 or a narrower integer dtype (uint64 could wrap in int64).
            _checks.widen_int("lengths", lengths)
            _checks.same_device("cas", cas, lengths=lengths)
        else:
            lengths = _checks.int_array("lengths", lengths)
        lengths = lengths.to(device=cas.device, dtype=torch.int64)
        if tuple(lengths.shape) != (V,):
            raise ValueError(f"lengths: expected shape [V] = [{V}], got {tuple(lengths.shape)}")
        if V and (int(lengths.min()) < 0 or int(lengths.max()) > T):
            raise ValueError(f"lengths: expected values in [0, T] = [0, {T}], got min {int(lengths.min())}, max {int(lengths.max())}")

    if thresholds is None:
        thresholds = MMSD_THRESHOLDS
    if isinstance(thresholds, torch.Tensor):
        thresholds = thresholds.detach().to(device=cas.device, dtype=torch.float64)
    else:
        try:
            array = np.asarray(thresholds, dtype=np.float64)
        except (TypeError, ValueError):  # strings, None, ragged nested sequences
            raise ValueError(f"thresholds: expected a 1-d sequence of numbers, got {thresholds!r:.80}") from None
        thresholds = torch.as_tensor(array, device=cas.device)
    if thresholds.dim() != 1:
        raise ValueError(f"thresholds: expected a 1-d sequence, got shape {tuple(thresholds.shape)}")
    if not bool(torch.isfinite(thresholds).all()):
        raise ValueError("thresholds: expected finite values")
    return cas, video_scores, lengths, thresholds


# Fake kernel of the compiled run finder (only where the extension is loaded): the
# run count depends on the values. The checks are the kernel's that need no values.
if _loader.compiled_available():

    @torch.library.register_fake("mmsd_ext::_threshold_runs")
    def _(values, offsets, lengths, thresholds, min_len, outer_ratio, first_copies_only):
        for name, t, dtype, doc in (("values", values, torch.float64, "[S]"), ("offsets", offsets, torch.int64, "[N]"),
                                    ("lengths", lengths, torch.int64, "[N]"), ("thresholds", thresholds, torch.float64, "[K]")):
            if t.dtype != dtype:
                raise TypeError(f"{name}: expected dtype {str(dtype).removeprefix('torch.')}, got {t.dtype}")
            _checks.rank(name, t, 1, doc)
        if lengths.shape != offsets.shape:
            raise ValueError(f"lengths: expected shape [N] = [{offsets.shape[0]}] like offsets, got {list(lengths.shape)}")
        _checks.same_device("values", values, offsets=offsets, lengths=lengths, thresholds=thresholds)
        if min_len < 1:
            raise ValueError(f"min_len: expected an int >= 1, got {min_len}")
        if not (math.isfinite(outer_ratio) and outer_ratio >= 0):
            raise ValueError(f"outer_ratio: expected a finite number >= 0, got {outer_ratio}")
        r = torch.library.get_ctx().new_dynamic_size()
        return (values.new_empty((r,), dtype=torch.int64), values.new_empty((r,), dtype=torch.int64),
                values.new_empty((r,), dtype=torch.int64), values.new_empty((r,)))
