"""Top-k multiple-instance (MIL) pooling over time: ``topk_mil_pool`` and ``mil_k``."""

import math

import numpy as np
import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import _backend, _checks, _loader


def topk_mil_pool(scores, k, lengths=None, *, largest=True, backend=None):
    """Mean of the k largest (or smallest) snippet scores of each video and class.

    The pooling of W-TALC, BaS-Net, CO2-Net and MMSD's attention loss, for a
    whole padded batch in one call.

    Args:
        scores: [B, T, C] float32, float16 or bfloat16 snippet scores, any strides
            (float64 too, e.g. for gradcheck).
        k: int, or integer tensor [B] (int64, or a narrower integer dtype, widened): how many
            snippets to pool per video; 1 <= k[b] <= lengths[b]. A 0-d tensor is one k for every
            video (as ``mil_k`` gives for a 0-d length; on the CPU it is copied to the device
            of ``scores``, as a list is). An int may be worked out from
            a traced size (``max(1, scores.shape[1] // 8)`` or ``mil_k(scores.shape[1])`` under
            torch.export or torch.compile with dynamic shapes).
        lengths: optional integer tensor [B] (as k) of valid lengths in [1, T]; snippets
            ``t >= lengths[b]`` are padding and never selected. Default: T for all.
            A list, tuple or numpy array of integers, for k or lengths, is taken as the
            int64 tensor of its values on the device of ``scores`` (on a GPU: a copy the
            host waits for, which a CUDA graph cannot capture; give device tensors there).
        largest: pool the k largest values (True) or the k smallest (False).
        backend: "reference", "cpu", "cuda", "triton", "auto" or None (a block's or the process's,
            else auto); see ``mmsd_ext.use_backend``.

    Returns:
        [B, C] tensor in the dtype of ``scores``:
        ``out[b, c] == torch.topk(scores[b, :lengths[b], c], k[b], largest=largest).values.mean()``,
        accumulated in float32 (float64 scores: in float64). NaN counts as larger than every number, as in ``torch.topk``.

    Gradient: ``grad_out[b, c] / k[b]`` flows to each selected element, zero
    elsewhere (padding included). Where equal values straddle the k-th place,
    the lower time indices are the selected ones, so the gradient is bitwise
    deterministic. First order only: on every backend but "reference", a double
    backward (differentiating the gradient again) raises an error.

    Raises:
        TypeError / ValueError naming the argument: wrong rank or dtype, k < 1,
        k > lengths[b], lengths outside [1, T], tensors on different devices,
        more time steps than the compiled backends' 32-bit time indices hold
        (T at most 2**31 - 2 on cpu, 2**31 - 257 on cuda, 2**31 - 4097 on
        triton); on cuda, B * C of 2**31 or more (a block per column) and, in
        the backward, B * T over 2**34 - 8; on triton, more programs than a grid
        holds (2**31 - 1; at most four columns a program, and in the backward
        also a program per time tile).
        The values of k and lengths tensors are checked on CPU tensors only
        (and, inside torch.compile, by the cpu backend only): on CUDA that would
        need a host sync, so there, and in compiled code on the other backends,
        a video whose k or length is out of range gets NaN and a zero gradient
        instead.

    Example::

        >>> scores = torch.randn(2, 750, 21, requires_grad=True)
        >>> lengths = torch.tensor([750, 400])
        >>> k = mmsd_ext.mil_k(lengths)                 # max(1, L // 8)
        >>> video_scores = mmsd_ext.topk_mil_pool(scores, k, lengths)   # [2, 21]
    """
    k, lengths = _sequence_as_tensor("k", k, scores), _sequence_as_tensor("lengths", lengths, scores)
    k, lengths = _checks.widen_int("k", k), _checks.widen_int("lengths", lengths)
    if isinstance(k, torch.Tensor) and k.dim() == 0 and isinstance(scores, torch.Tensor) and scores.dim() == 3:
        # One k for every video (``mil_k`` of a 0-d length gives one); on the CPU, a scalar like a list.
        k = k.to(scores.device) if k.device.type == "cpu" else k
        k = k.expand(scores.shape[0])
    scores, k, lengths, largest = _check_topk_args(scores, k, lengths, largest)
    name = _backend.resolve(
        "topk_mil_pool", backend, scores.device, supported=_IMPLS_SUPPORTED, gpu_order=_GPU_ORDER
    )
    # Value checks need the values on the host: done for CPU tensors only, so that
    # CUDA calls never synchronise (but for k or lengths given as a list or an array,
    # which the copy above brings to the GPU). On CUDA the kernels write NaN for a video whose
    # k or length is out of range instead (documented in the README). The cpu
    # kernel checks them itself (csrc/cpu/topk_mil_pool_kernel.cpp, the same
    # ValueErrors); under torch.compile they would break the graph.
    if scores.device.type == "cpu" and name != "cpu" and not torch.compiler.is_compiling():
        _check_topk_values(k, lengths, scores.shape[1])
    return _IMPLS[name](scores, k, lengths, largest)


def mil_k(lengths, ratio=8.0, *, rule="floor", min_k=1):
    """Per-video k for top-k MIL pooling.

    Args:
        lengths: int, or integer tensor [B] of video lengths (>= 1); int64, or a narrower
            integer dtype (int32, ...), widened. A list, tuple or numpy array of integers is
            taken as the int64 tensor of its values.
        ratio: k is about ``L / ratio``; > 0.
        rule: "floor": ``max(min_k, floor(L / ratio))`` (MMSD, CO2-Net, ACM-Net);
            "ceil": ``max(min_k, ceil(L / ratio))`` (W-TALC). ``L / ratio`` is the rounded
            float64 quotient, so for a ratio that is not an integer the floor can differ
            from Python's ``L // ratio`` (11 / 2.2 gives k = 5 here, 11 // 2.2 is 4.0).
        min_k: lower bound on k (>= 1). k never exceeds L, so the result is always
            a valid ``k`` for ``topk_mil_pool``.

    The lengths of a CPU tensor are checked (>= 1), except inside torch.compile,
    where that check would break the graph (as ``topk_mil_pool``'s).

    Returns:
        int64 tensor of the shape of ``lengths`` (an int if ``lengths`` is an int; of a size
        traced by torch.export or torch.compile, a traced int, with no tensor made).

    Example::

        >>> mmsd_ext.mil_k(torch.tensor([750, 400, 5]))
        tensor([93, 50,  1])
        >>> mmsd_ext.mil_k(torch.tensor([750, 400, 5]), rule="ceil")
        tensor([94, 50,  1])
    """
    ratio = _checks.positive_number("ratio", ratio)
    if rule not in ("floor", "ceil"):
        raise ValueError(f"rule: expected 'floor' or 'ceil', got {rule!r}")
    if isinstance(min_k, np.integer):
        min_k = int(min_k)
    if isinstance(min_k, bool) or not isinstance(min_k, int):
        raise TypeError(f"min_k: expected an int >= 1, got {type(min_k).__name__}")
    if min_k < 1:
        raise ValueError(f"min_k: expected an int >= 1, got {min_k!r}")
    if isinstance(lengths, np.integer):
        lengths = int(lengths)
    lengths = _checks.widen_int("lengths", _sequence_as_tensor("lengths", lengths))
    if isinstance(lengths, (int, torch.SymInt)) and not isinstance(lengths, bool):
        # (a traced size too: refused only where out of range for every size, as topk_mil_pool's k)
        if statically_known_true(lengths < 1) or statically_known_true(lengths >= 2**63):
            raise ValueError(f"lengths: expected an int in [1, 2**63), got {lengths}")
        return _mil_k_of_int(lengths, ratio, rule, min_k)
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"lengths: expected an int or an int64 tensor, got {type(lengths).__name__}")
    _checks.int64("lengths", lengths)
    if lengths.device.type == "cpu" and not torch.compiler.is_compiling() and lengths.numel() and int(lengths.min()) < 1:
        raise ValueError(f"lengths: expected every length >= 1, got minimum {int(lengths.min())}")
    # float64 division is exact enough for any realistic length (< 2**52). Where L / ratio
    # reaches L (ratio <= 1) k is L, decided in float64: the int64 cast of a quotient past
    # 2**63 (a tiny ratio) would wrap around.
    as_float = lengths.to(torch.float64)
    q = as_float / ratio
    q = torch.floor(q) if rule == "floor" else torch.ceil(q)
    k = torch.where(q >= as_float, lengths, q.to(torch.int64)).clamp(min=min_k)
    return torch.minimum(k, lengths)


def _sequence_as_tensor(name, value, scores=None):
    """A list, tuple or numpy array of k or lengths as an int64 tensor, on the device of
    ``scores`` where that is a tensor (else on the CPU); anything else as it is."""
    if isinstance(value, (list, tuple, np.ndarray)):
        array = _checks.int_array(name, value)
        return array.to(scores.device) if isinstance(scores, torch.Tensor) else array
    return value


def _mil_k_of_int(length, ratio, rule, min_k):
    """``mil_k`` of one length, in Python arithmetic (the tensor rule's float64 quotient): no
    tensor, so nothing is read back from one inside torch.compile, and a traced size (a
    SymInt, e.g. ``x.shape[1]`` in torch.export) gives a traced k."""
    if type(length) is int and not torch.compiler.is_compiling():  # (dynamo shows a traced size as an int)
        q = length / ratio
        if q >= float(length):  # the tensor rule's test (ratio <= 1, or a quotient rounded up to L)
            return length
        return min(max(math.floor(q) if rule == "floor" else math.ceil(q), min_k), length)
    if ratio <= 1.0:  # then L / ratio >= L
        return length
    q = length / ratio  # finite, and below L for any L < 2**53: the same k as the test above
    # sym_int truncates: the floor of q >= 0. (math.floor and math.ceil of a traced float
    # would leave calls that torch.export.save cannot write.)
    k = torch.sym_int(q)
    if rule == "ceil":
        k = torch.sym_ite(q > k, k + 1, k)
    return torch.sym_min(torch.sym_max(k, min_k), length)


def _check_topk_args(scores, k, lengths, largest):
    _checks.floating("scores", scores, _checks.FLOAT_DTYPES + (torch.float64,))
    _checks.rank("scores", scores, 3, "[B, T, C]")
    B, T, _ = scores.shape
    if isinstance(largest, np.bool_):
        largest = bool(largest)
    if not isinstance(largest, bool):
        raise TypeError(f"largest: expected a bool, got {type(largest).__name__}")
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.int64, device=scores.device)
    else:
        _checks.int64("lengths", lengths)
        if lengths.shape != (B,):
            raise ValueError(f"lengths: expected shape [B] = [{B}], got {tuple(lengths.shape)}")
        _checks.same_device("scores", scores, lengths=lengths)
    if isinstance(k, (bool, np.bool_)):
        raise TypeError("k: expected an int or an int64 tensor, got bool")
    if isinstance(k, np.integer):
        k = int(k)
    if isinstance(k, (int, torch.SymInt)):
        # An int may be worked out from a traced size (torch.export, or torch.compile with
        # dynamic shapes; dynamo shows such a size as an int), e.g. max(1, T // 8): refused
        # where it is out of range for every size the trace allows, otherwise checked as a
        # k tensor is. (A guard on it, which the trace often cannot prove, e.g.
        # max(1, T // 8) <= T, would fail the export.) Plain ints are checked as they are.
        if statically_known_true(k < 1):
            raise ValueError(f"k: expected k >= 1, got {k}")
        if statically_known_true(k > T):
            raise ValueError(f"k: expected k <= T = {T}, got {k}")
        k = torch.full((B,), k, dtype=torch.int64, device=scores.device)
    else:
        if not isinstance(k, torch.Tensor):
            raise TypeError(f"k: expected an int or an int64 tensor, got {type(k).__name__}")
        _checks.int64("k", k)
        if k.shape != (B,):
            raise ValueError(f"k: expected an int or shape [B] = [{B}], got {tuple(k.shape)}")
        _checks.same_device("scores", scores, k=k)
    _checks.has_values("topk_mil_pool", scores=scores, k=k, lengths=lengths)
    return scores, k, lengths, largest


def _check_topk_values(k, lengths, T):
    """The values of CPU k and lengths tensors, with the cpu kernel's messages."""
    bad = (lengths < 1) | (lengths > T)
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        raise ValueError(f"lengths: expected values in [1, T] = [1, {T}], got lengths[{b}] = {int(lengths[b])}")
    bad = (k < 1) | (k > lengths)
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        raise ValueError(f"k: expected 1 <= k[b] <= lengths[b], got k[{b}] = {int(k[b])} with lengths[{b}] = {int(lengths[b])}")


def topk_mil_pool_reference(scores, k, lengths, largest):
    """Plain PyTorch: a stable sort per video (lower index first among equals), then the mean.

    Every video in one pass, with no value read on the host (so torch.compile and
    torch.export capture it as one graph): the stable sort of each column by value, then a
    stable sort that moves the steps past the video's length behind its own steps; the mean
    of the first k[b].
    """
    B, T, _ = scores.shape
    acc = torch.float64 if scores.dtype == torch.float64 else torch.float32
    ordered, index = torch.sort(scores, dim=1, descending=largest, stable=True)
    padding = index >= lengths[:, None, None]
    _, own_first = torch.sort(padding.to(torch.uint8), dim=1, stable=True)
    ordered = ordered.gather(1, own_first)
    steps = torch.arange(T, device=scores.device)
    taken = steps[None, :, None] < torch.minimum(k, lengths)[:, None, None]
    total = torch.where(taken, ordered.to(acc), 0).sum(dim=1)
    # Where the values were not checked (CUDA tensors, compiled code), a video whose k
    # or length is out of range gets NaN and a zero gradient, as from the kernels.
    ok = (lengths >= 1) & (lengths <= T) & (k >= 1) & (k <= lengths)
    mean = total / torch.where(ok, k, 1)[:, None].to(acc)
    return torch.where(ok[:, None], mean, float("nan")).to(scores.dtype)


# ---------------------------------------------------------------------------
# cpu and cuda: one dispatcher op, mmsd_ext::topk_mil_pool (csrc/topk_mil_pool.cpp);
# the device of the tensors picks the kernel.


def _topk_compiled(scores, k, lengths, largest):
    return torch.ops.mmsd_ext.topk_mil_pool(scores, k, lengths, largest)[0]


def _fake_forward(scores, k, lengths, largest):
    # The argument checks need no values: here too (a meta tensor among real ones, or a call
    # under FakeTensorMode), a bad argument is an error, never an output made up.
    _check_topk_args(scores, k, lengths, largest)
    B, _, C = scores.shape
    return (
        scores.new_empty((B, C)),
        scores.new_empty((B, C), dtype=torch.int64),
        scores.new_empty((B, C), dtype=torch.int64),
    )


def _fake_backward(grad_out, scores, k, lengths, kth_key, cut, largest):
    _checks.same_device("scores", scores, grad_out=grad_out, k=k, lengths=lengths, kth_key=kth_key, cut=cut)
    return scores.new_empty(scores.shape)


def _setup_context(ctx, inputs, output):
    scores, k, lengths, largest = inputs
    _, kth_key, cut = output
    # As the C++ autograd: only the first output is differentiable, and the others'
    # (absent) gradients are not materialised as zeros (two fills per backward).
    ctx.mark_non_differentiable(kth_key, cut)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(scores, k, lengths, kth_key, cut)
    ctx.largest = largest


def _make_backward(backward_op):
    # The saved (kth_key, cut) pin the selection down, ties included, so the
    # backward is one elementwise pass over scores.
    def backward(ctx, grad_out, _grad_kth, _grad_cut):
        scores, k, lengths, kth_key, cut = ctx.saved_tensors
        grad = None
        if grad_out is not None and ctx.needs_input_grad[0]:
            grad = backward_op(grad_out, scores, k, lengths, kth_key, cut, ctx.largest)
        return grad, None, None, None

    return backward


# The compiled op's autograd is C++ (csrc/autograd.cpp: the same saved tensors and
# backward as _make_backward, without the Python overhead per call).
if _loader.compiled_available():
    torch.library.register_fake("mmsd_ext::topk_mil_pool")(_fake_forward)
    torch.library.register_fake("mmsd_ext::_topk_mil_pool_backward")(_fake_backward)


# ---------------------------------------------------------------------------
# triton: its own op, mmsd_ext::topk_mil_pool_triton (kernels/topk_mil_pool.py).
# Triton is imported on the first call, so that a machine without it still
# imports mmsd_ext.


@torch.library.custom_op("mmsd_ext::topk_mil_pool_triton", mutates_args=())
def _topk_triton_op(
    scores: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, largest: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .kernels import topk_mil_pool as kernels

    _check_topk_args(scores, k, lengths, largest)  # as the compiled op checks (called directly too)
    return kernels.topk_mil_pool_forward(scores, k, lengths, largest)


@torch.library.custom_op("mmsd_ext::_topk_mil_pool_triton_backward", mutates_args=())
def _topk_triton_backward_op(
    grad_out: torch.Tensor,
    scores: torch.Tensor,
    k: torch.Tensor,
    lengths: torch.Tensor,
    kth_key: torch.Tensor,
    cut: torch.Tensor,
    largest: bool,
) -> torch.Tensor:
    from .kernels import topk_mil_pool as kernels

    _check_topk_args(scores, k, lengths, largest)
    B, _, C = scores.shape
    for name, t in (("grad_out", grad_out), ("kth_key", kth_key), ("cut", cut)):
        _checks.tensor(name, t)
        if tuple(t.shape) != (B, C) or t.device != scores.device:
            raise ValueError(f"{name}: expected shape [B, C] = [{B}, {C}] on {scores.device}, got {tuple(t.shape)} on {t.device}")
    if not grad_out.dtype.is_floating_point:
        raise TypeError(f"grad_out: expected a floating tensor, got {grad_out.dtype}")
    if cut.dtype != torch.int64 or kth_key.dtype != torch.int64:
        raise TypeError(f"kth_key, cut: expected the int64 tensors the forward returned, got {kth_key.dtype}, {cut.dtype}")
    return kernels.topk_mil_pool_backward(grad_out, scores, k, lengths, kth_key, cut, largest)


_topk_triton_op.register_fake(_fake_forward)
_topk_triton_backward_op.register_fake(_fake_backward)
_topk_triton_op.register_autograd(_make_backward(_topk_triton_backward_op), setup_context=_setup_context)


def _topk_triton(scores, k, lengths, largest):
    return _topk_triton_op(scores, k, lengths, largest)[0]


_IMPLS = {
    "reference": topk_mil_pool_reference,
    "cpu": _topk_compiled,
    "cuda": _topk_compiled,
    "triton": _topk_triton,
}
_IMPLS_SUPPORTED = ("reference", "cpu", "cuda", "triton")
# Measured on an H200, fwd+bwd at (32, 2304, 201), k = 288: cuda 0.24 ms,
# triton 1.32 ms, eager torch.topk 0.98 ms. cuda first.
_GPU_ORDER = ("cuda", "triton")
