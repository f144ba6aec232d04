"""topk_mil_pool and mil_k: every backend against the plain reference.

The oracle is the reference on float64 scores (a stable sort per video, then the
mean); the gradient's oracle is built here from the stable-sort selection.
fp32 and fp64 results are judged against the fp64 oracle by a bound on the
rounding of a mean of k terms; fp16 and bf16 ones relative to the error of eager
PyTorch at that precision (the reference run in that dtype), with the tolerances
of one table.
"""

import re

import numpy as np
import pytest
import torch
from conftest import HAS_GPU, backend_device
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mmsd_ext
from mmsd_ext import mil
from mmsd_ext.mil import topk_mil_pool_reference

# The Triton interpreter computes with numpy, which warns where inf - inf makes
# the NaN that the op must return.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

# Hypothesis with the `backend` fixture: the fixture only names the backend, so
# sharing it between examples is safe.
_WITH_FIXTURE = settings(
    suppress_health_check=list(settings.default.suppress_health_check) + [HealthCheck.function_scoped_fixture]
)

# fp32/fp64: |out - oracle| <= SUM_ROUNDINGS * eps * sum(|selected|), elementwise. A mean of
# k terms added in any order is off by at most about eps * sum(|selected|) (k - 1 additions,
# the k-th value times its count, the division: each at most half an ulp of that sum), and
# the fp64 oracle by as much again. A bound relative to |out| alone would be k times looser
# (a relative bias of 5e-6 passed rtol=1e-5); the kernels use under a fifth of this one.
SUM_ROUNDINGS = 2.0
# fp16/bf16: |out - oracle| <= multiple * |eager - oracle| + atol + rtol * |oracle|. The
# output is rounded once from an fp32 accumulator, so one ulp of the dtype (rtol) covers it.
TOLERANCE = {
    torch.float16: dict(multiple=2.0, atol=1e-6, rtol=2.0**-10),
    torch.bfloat16: dict(multiple=2.0, atol=1e-6, rtol=2.0**-7),
}

# Sizes the hypothesis tests draw from. The Triton interpreter runs every program
# instance (one per video and 4 classes) in Python, about 50 ms each: small grids
# there, still with two videos and a partial block of classes.
SIZES = {"default": dict(B=8, T=300, C=50), "interpreted": dict(B=2, T=40, C=5)}


def _interpreted(backend, device):
    return backend == "triton" and device.type == "cpu"


def _sizes(backend, device):
    return SIZES["interpreted" if _interpreted(backend, device) else "default"]


# A parametrisation of the property tests, not a draw: each dtype gets every example.
# Drawn, the split was uneven and by chance (float16 got 1 example in 20 on cpu, float64
# 1 on triton; fp32 once got 3, none with NaN or with ties across the k-th place).
DTYPES = pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=lambda d: str(d).split(".")[1]
)


# ---------------------------------------------------------------------------
# Input generation


def _values(gen, shape, kind, dtype):
    if kind == "normal":
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    elif kind == "ties":  # integer-valued: many ties across the k-th place
        x = torch.randint(-3, 4, shape, generator=gen).to(torch.float64)
    else:  # "special": ties plus +-inf, NaN and -0.0 sprinkled in
        x = torch.randint(-2, 3, shape, generator=gen).to(torch.float64)
        u = torch.rand(shape, generator=gen)
        x[u < 0.05] = float("inf")
        x[(u >= 0.05) & (u < 0.1)] = -float("inf")
        x[(u >= 0.1) & (u < 0.13)] = float("nan")
        x[(u >= 0.13) & (u < 0.2)] = -0.0
    return x.to(dtype)


def _layout(x, layout):
    """The same values as x [B, T, C], laid out contiguously, transposed or sliced."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "transposed":  # C-major storage: stride(1) == 1
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    # "sliced": every other element of a larger tensor, along T and C
    B, T, C = x.shape
    big = torch.zeros(B, 2 * T, 2 * C + 1, dtype=x.dtype, device=x.device)
    big[:, ::2, 1::2] = x
    return big[:, ::2, 1::2]


@st.composite
def _cases(draw, sizes, dtype):
    B = draw(st.integers(1, sizes["B"]))
    T = draw(st.integers(1, sizes["T"]))
    C = draw(st.integers(1, sizes["C"]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["normal", "ties", "special"]))
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
    largest = draw(st.booleans())
    if draw(st.booleans()):
        lengths = torch.randint(1, T + 1, (B,), generator=gen)
        lengths[draw(st.integers(0, B - 1))] = T  # one full-length video
    else:
        lengths = None
    full = lengths if lengths is not None else torch.full((B,), T)
    if draw(st.booleans()):
        k = int(torch.randint(1, int(full.min()) + 1, (1,), generator=gen))
    else:
        k = (torch.rand(B, generator=gen) * full).long() + 1  # 1 <= k[b] <= lengths[b]
    return dict(B=B, T=T, C=C, gen=gen, kind=kind, dtype=dtype, layout=layout, largest=largest, lengths=lengths, k=k)


def _build(case, device):
    x = _values(case["gen"], (case["B"], case["T"], case["C"]), case["kind"], case["dtype"])
    scores = _layout(x.to(device), case["layout"])
    lengths = case["lengths"].to(device) if case["lengths"] is not None else None
    k = case["k"].to(device) if isinstance(case["k"], torch.Tensor) else case["k"]
    return scores, k, lengths


def _k_lengths(scores, k, lengths):
    B, T, _ = scores.shape
    lengths = torch.full((B,), T) if lengths is None else lengths.cpu()
    k = torch.full((B,), k) if isinstance(k, int) else k.cpu()
    return k, lengths


def _assert_matches_oracle(out, scores, k, lengths, largest):
    """out (any backend) against the fp64 oracle, relative to eager at scores' dtype."""
    dtype = scores.dtype
    k_cpu, lengths_cpu = _k_lengths(scores, k, lengths)
    cpu = scores.detach().cpu()
    oracle = topk_mil_pool_reference(cpu.double(), k_cpu, lengths_cpu, largest)
    eager = topk_mil_pool_reference(cpu, k_cpu, lengths_cpu, largest).double()
    got = out.detach().cpu()
    assert got.dtype == dtype and got.shape == oracle.shape
    got = got.double()
    nan = oracle.isnan()
    assert torch.equal(got.isnan(), nan), "NaN where the oracle has none, or the reverse"
    inf = oracle.isinf()
    assert torch.equal(got[inf], oracle[inf]), "infinities differ"
    finite = ~(nan | inf)
    assert got[finite].isfinite().all()
    err = (got - oracle)[finite].abs()
    if dtype in TOLERANCE:
        tol = TOLERANCE[dtype]
        bound = tol["multiple"] * (eager - oracle)[finite].abs() + tol["atol"] + tol["rtol"] * oracle[finite].abs()
    else:
        magnitude = _selected_abs_sum(cpu.double(), k_cpu, lengths_cpu, largest)[finite]
        bound = SUM_ROUNDINGS * torch.finfo(dtype).eps * magnitude
    worst = (err - bound).argmax() if err.numel() else None
    assert (err <= bound).all(), f"error {err[worst]} > bound {bound[worst]} ({dtype})"


def _selected_abs_sum(x, k, lengths, largest):
    """sum(|x|) over each column's selection, the stable sort's first k[b] of the valid steps."""
    sums = []
    for b in range(x.shape[0]):
        ordered = torch.sort(x[b, : int(lengths[b])], dim=0, descending=largest, stable=True).values
        sums.append(ordered[: int(k[b])].abs().sum(0))
    return torch.stack(sums)


def _expected_grad(scores, k, lengths, largest, grad_out):
    """The gradient from the stable-sort selection: grad_out / k (rounded as autograd does) on each pick."""
    k_cpu, lengths_cpu = _k_lengths(scores, k, lengths)
    cpu = scores.detach().cpu()
    acc = torch.float64 if cpu.dtype == torch.float64 else torch.float32
    share = (grad_out.detach().cpu().to(acc) / k_cpu.to(acc)[:, None]).to(cpu.dtype)
    expected = torch.zeros_like(cpu, memory_format=torch.contiguous_format)
    for b in range(cpu.shape[0]):
        L, kb = int(lengths_cpu[b]), int(k_cpu[b])
        order = torch.sort(cpu[b, :L], dim=0, descending=largest, stable=True).indices[:kb]  # [kb, C]
        expected[b].scatter_(0, order, share[b].expand(kb, -1))
    return expected


# ---------------------------------------------------------------------------
# Forward and backward against the oracles


@DTYPES
@_WITH_FIXTURE
@given(data=st.data())
def test_forward_matches_reference(backend, dtype, data):
    device = backend_device(backend)
    case = data.draw(_cases(_sizes(backend, device), dtype))
    scores, k, lengths = _build(case, device)
    before = scores.clone()
    out = mmsd_ext.topk_mil_pool(scores, k, lengths, largest=case["largest"], backend=backend)
    assert out.device == scores.device
    _assert_matches_oracle(out, scores, k, lengths, case["largest"])
    assert torch.equal(scores.isnan(), before.isnan()) and torch.equal(scores.nan_to_num(), before.nan_to_num())


@DTYPES
@_WITH_FIXTURE
@given(data=st.data())
def test_backward_matches_stable_selection(backend, dtype, data):
    device = backend_device(backend)
    case = data.draw(_cases(_sizes(backend, device), dtype))
    scores, k, lengths = _build(case, device)
    scores.requires_grad_(True)
    grad_out = _values(case["gen"], (case["B"], case["C"]), "normal", scores.dtype).to(device)
    out = mmsd_ext.topk_mil_pool(scores, k, lengths, largest=case["largest"], backend=backend)
    (grad,) = torch.autograd.grad(out, scores, grad_out)
    expected = _expected_grad(scores, k, lengths, case["largest"], grad_out)
    assert torch.equal(grad.cpu(), expected), "gradient differs from the stable-sort selection"
    if _interpreted(backend, device):
        return  # the interpreter runs the programs one after another: nothing to race
    # Bitwise deterministic: a second run gives the same bits.
    (again,) = torch.autograd.grad(
        mmsd_ext.topk_mil_pool(scores, k, lengths, largest=case["largest"], backend=backend), scores, grad_out
    )
    assert torch.equal(grad, again)


def test_reference_gradient_is_the_stable_selection():
    # The oracle of the gradient tests, checked once against the reference's own autograd.
    gen = torch.Generator().manual_seed(0)
    for kind in ("ties", "special"):
        scores = _values(gen, (3, 17, 5), kind, torch.float32).requires_grad_(True)
        k, lengths = torch.tensor([4, 1, 9]), torch.tensor([17, 3, 12])
        for largest in (True, False):
            g = torch.randn(3, 5, generator=gen)
            (grad,) = torch.autograd.grad(topk_mil_pool_reference(scores, k, lengths, largest), scores, g)
            assert torch.equal(grad, _expected_grad(scores, k, lengths, largest, g))


@pytest.mark.parametrize("largest", [True, False])
def test_equals_torch_topk_mean(any_backend, largest):
    # The definition in the docstring, NaN ordering included, on a padded batch; for the
    # reference too, the oracle of every other test.
    backend = any_backend
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(1)
    scores = _values(gen, (3, 23, 6), "special", torch.float32).to(device)
    lengths = torch.tensor([23, 10, 4], device=device)
    k = torch.tensor([5, 10, 2], device=device)
    out = mmsd_ext.topk_mil_pool(scores, k, lengths, largest=largest, backend=backend)
    for b in range(3):
        L = int(lengths[b])
        want = torch.topk(scores[b, :L], int(k[b]), dim=0, largest=largest).values.mean(0)
        torch.testing.assert_close(out[b], want, equal_nan=True, rtol=1e-6, atol=1e-6)


def test_retain_graph_second_backward_and_grad_output(backend):
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(2)
    scores = _values(gen, (2, 19, 5), "ties", torch.float32).to(device).requires_grad_(True)
    k = torch.tensor([3, 7], device=device)
    out = mmsd_ext.topk_mil_pool(scores, k, backend=backend)
    g = torch.randn(2, 5, generator=gen).to(device)
    out.backward(g, retain_graph=True)
    first = scores.grad.clone()
    out.backward(g)
    assert torch.equal(scores.grad, 2 * first)
    assert torch.equal(first.cpu(), _expected_grad(scores, k, None, True, g))
    # A non-leaf input and a loss through the output.
    base = scores.detach().clone().requires_grad_(True)
    loss = (mmsd_ext.topk_mil_pool(base * 2, k, backend=backend) ** 2).sum()
    loss.backward()
    ref_base = base.detach().cpu().clone().requires_grad_(True)
    (topk_mil_pool_reference(ref_base * 2, k.cpu(), torch.tensor([19, 19]), True) ** 2).sum().backward()
    torch.testing.assert_close(base.grad.cpu(), ref_base.grad)


def test_create_graph_works_and_double_backward_raises(backend):
    # The backward is not differentiable again. A double backward must raise, never
    # hand back a missing or zero second-order gradient.
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(2, 11, 4, generator=gen).to(device).requires_grad_(True)
    k = torch.tensor([2, 5], device=device)
    loss = mmsd_ext.topk_mil_pool(scores, k, backend=backend).sum()
    # Only the double backward may raise, with the op's own message: a RuntimeError from the
    # forward or the first gradient is a failure, not the refusal this test is about.
    (grad,) = torch.autograd.grad(loss, scores, create_graph=True)
    assert torch.equal(grad.cpu(), _expected_grad(scores, k, None, True, torch.ones(2, 4)))
    with pytest.raises(RuntimeError, match=r"derivative for mmsd_ext::_topk_mil_pool_backward is not implemented"
                                           r"|backward through mmsd_ext\._topk_mil_pool_triton_backward.* no autograd formula"):
        (grad**2).sum().backward()


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # the fallback's, as documented
def test_torch_func_vmap_of_the_forward_works_and_gradient_transforms_raise(backend):
    # As the README says (and as for the distillation losses).
    device = backend_device(backend)
    scores = torch.randn(3, 2, 9, 4, generator=torch.Generator().manual_seed(29)).to(device)
    fn = lambda a: mmsd_ext.topk_mil_pool(a, 3, backend=backend)  # noqa: E731
    torch.testing.assert_close(torch.func.vmap(fn)(scores), torch.stack([fn(a) for a in scores]), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="functorch transforms"):
        torch.func.grad(lambda a: fn(a).sum())(scores[0])


def test_no_grad_needed_for_scores(backend):
    device = backend_device(backend)
    scores = torch.randn(2, 9, 3, device=device)
    out = mmsd_ext.topk_mil_pool(scores, 2, backend=backend)
    assert not out.requires_grad


@pytest.mark.parametrize("shape", [(0, 5, 3), (2, 5, 0)])
def test_empty_batch_or_classes(any_backend, shape):
    device = backend_device(any_backend)
    scores = torch.randn(shape, device=device, requires_grad=True)
    out = mmsd_ext.topk_mil_pool(scores, 2, backend=any_backend)
    assert out.shape == (shape[0], shape[2])
    out.sum().backward()
    assert scores.grad.shape == scores.shape and not scores.grad.any()


def test_gradcheck_float64_cpu():
    if "cpu" not in mmsd_ext.available_backends():
        pytest.skip("cpu backend not built")
    gen = torch.Generator().manual_seed(3)
    # Distinct values, far apart compared with gradcheck's perturbation.
    scores = (torch.randperm(2 * 7 * 3, generator=gen).double() / 4).reshape(2, 7, 3).requires_grad_(True)
    k, lengths = torch.tensor([2, 3]), torch.tensor([7, 5])
    for largest in (True, False):
        assert torch.autograd.gradcheck(
            lambda s: mmsd_ext.topk_mil_pool(s, k, lengths, largest=largest, backend="cpu"), (scores,)
        )


def test_gradcheck_float64_triton():
    # The kernels take float64 (64-bit keys), under the interpreter too, where a fast-mode
    # gradcheck (one random direction) is affordable: 1 s, against 30 s for the full one,
    # which test_gradcheck_float64_cuda runs on a GPU.
    if "triton" not in mmsd_ext.available_backends():
        pytest.skip("triton backend not available")
    device = backend_device("triton")
    gen = torch.Generator().manual_seed(3)
    # Distinct values, far apart compared with gradcheck's perturbation.
    scores = (torch.randperm(2 * 7 * 3, generator=gen).double() / 4).reshape(2, 7, 3).to(device).requires_grad_(True)
    k, lengths = torch.tensor([2, 3], device=device), torch.tensor([7, 5], device=device)
    for largest in (True, False):
        assert torch.autograd.gradcheck(
            lambda s: mmsd_ext.topk_mil_pool(s, k, lengths, largest=largest, backend="triton"),
            (scores,),
            fast_mode=True,
        )


@pytest.mark.parametrize("digit_bits", [1, 4])
def test_triton_chunked_tiles(monkeypatch, digit_bits):
    # Columns longer than one register tile take the looping path of the kernel;
    # every radix digit width gives the same selection.
    if "triton" not in mmsd_ext.available_backends():
        pytest.skip("triton backend not available")
    from mmsd_ext.kernels import topk_mil_pool as kernels

    monkeypatch.setattr(kernels, "MAX_TILE_ELEMENTS", 64)
    monkeypatch.setattr(kernels, "DIGIT_BITS", digit_bits)
    device = backend_device("triton")
    gen = torch.Generator().manual_seed(4)
    for kind, dtype, largest in [("special", torch.float32, True), ("ties", torch.float64, False)]:
        scores = _values(gen, (2, 37, 5), kind, dtype).to(device).requires_grad_(True)
        k, lengths = torch.tensor([5, 30], device=device), torch.tensor([37, 30], device=device)
        out = mmsd_ext.topk_mil_pool(scores, k, lengths, largest=largest, backend="triton")
        _assert_matches_oracle(out, scores, k, lengths, largest)
        g = torch.randn(2, 5, generator=gen, dtype=dtype).to(device)
        (grad,) = torch.autograd.grad(out, scores, g)
        assert torch.equal(grad.cpu(), _expected_grad(scores, k, lengths, largest, g))


# ---------------------------------------------------------------------------
# Bad inputs: a clear error naming the argument, on every backend


def _bad_calls(device):
    """(args, kwargs, exception, argument named, checked only for CPU tensors)."""
    x = torch.randn(2, 5, 3, device=device)
    lengths = torch.tensor([5, 3], device=device)
    return [
        ((x, 0), {}, ValueError, "k: expected k >= 1, got 0", False),
        # An int k is checked against T before any tensor exists: on CUDA, too.
        ((x, 6), {}, ValueError, "k: expected k <= T = 5, got 6", False),
        ((x, True), {}, TypeError, "k", False),
        ((x, 2.0), {}, TypeError, "k: expected an int or an int64 tensor, got float", False),  # a float k
        ((x, [1.0, 2.0]), {}, TypeError, "k: expected integers, got float64", False),
        ((x, [1, 2, 3]), {}, ValueError, "k", False),  # shape [B] expected
        ((x, 2, [5, 3, 1]), {}, ValueError, "lengths", False),
        ((x, 2, [[5], [3, 1]]), {}, ValueError, "lengths: expected a 1-d sequence of integers", False),
        ((x, 2, [6, 3]), {}, ValueError, "lengths", True),
        ((x, torch.tensor([1, 2, 3], device=device)), {}, ValueError, "k", False),  # shape [B] expected
        ((x, torch.tensor([1.0, 2.0], device=device)), {}, TypeError, "k", False),
        ((x, torch.tensor([1, 4], device=device), lengths), {}, ValueError, "k", True),  # k[1] > lengths[1]
        ((x, torch.tensor([0, 1], device=device)), {}, ValueError, "k", True),
        ((x, 2, torch.tensor([5], device=device)), {}, ValueError, "lengths", False),
        ((x, 2, torch.tensor([True, True], device=device)), {}, TypeError, "lengths", False),
        ((x, 2, torch.tensor([5, 3], dtype=torch.uint64, device=device)), {}, TypeError, "lengths", False),
        ((x, torch.tensor([True, True], device=device)), {}, TypeError, "k", False),
        ((x, 2, torch.tensor([0, 3], device=device)), {}, ValueError, "lengths", True),
        ((x, 2, torch.tensor([6, 3], device=device)), {}, ValueError, "lengths", True),
        ((x[0], 2), {}, ValueError, "scores", False),
        ((torch.ones(2, 5, 3, dtype=torch.int64, device=device), 2), {}, TypeError, "scores", False),
        ((x.tolist(), 2), {}, TypeError, "scores", False),
        ((x, 2), {"largest": 1}, TypeError, "largest", False),
    ]


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_narrower_integer_k_and_lengths_are_widened(any_backend, dtype):
    # W-TALC keeps its lengths as int32: they give what int64 gives (the raw ops take int64).
    device = backend_device(any_backend)
    gen = torch.Generator().manual_seed(17)
    scores = torch.randn(3, 12, 4, generator=gen).to(device).requires_grad_(True)
    lengths = torch.tensor([12, 7, 3], device=device)
    k = mmsd_ext.mil_k(lengths, 3.0)
    assert torch.equal(mmsd_ext.mil_k(lengths.to(dtype), 3.0), k) and mmsd_ext.mil_k(lengths.to(dtype), 3.0).dtype == torch.int64
    want = mmsd_ext.topk_mil_pool(scores, k, lengths, backend=any_backend)
    (want_grad,) = torch.autograd.grad(want.sum(), scores)
    got = mmsd_ext.topk_mil_pool(scores, k.to(dtype), lengths.to(dtype), backend=any_backend)
    (grad,) = torch.autograd.grad(got.sum(), scores)
    assert torch.equal(got, want) and torch.equal(grad, want_grad)
    # The ops' own check (their fake kernels' too) still takes int64 only.
    with pytest.raises(TypeError, match="^k: expected an int64 tensor, got int32$"):
        mmsd_ext.mil._check_topk_args(scores, k.int(), lengths, True)
    # The public functions' errors list the dtypes they take (they had said "expected an
    # int64 tensor", though they take these too).
    taken = re.escape("expected an int64 tensor (or int32, int16, int8, uint8, uint16, uint32), got ")
    for bad in (torch.float32, torch.bool, torch.uint64):
        with pytest.raises(TypeError, match=f"^k: {taken}{str(bad)[6:]}$"):
            mmsd_ext.topk_mil_pool(scores, k.to(bad), lengths, backend=any_backend)
        with pytest.raises(TypeError, match=f"^lengths: {taken}{str(bad)[6:]}$"):
            mmsd_ext.topk_mil_pool(scores, k, lengths.to(bad), backend=any_backend)
        with pytest.raises(TypeError, match=f"^lengths: {taken}{str(bad)[6:]}$"):
            mmsd_ext.mil_k(lengths.to(bad))


def test_k_and_lengths_as_lists_and_numpy_arrays(any_backend):
    # W-TALC and CO2-Net keep the lengths of a batch in a numpy array: a list, tuple or
    # array of integers is taken as the int64 tensor of its values, on the device of scores.
    device = backend_device(any_backend)
    gen = torch.Generator().manual_seed(19)
    scores = torch.randn(3, 12, 4, generator=gen).to(device)
    lengths = [12, 7, 3]
    k = mmsd_ext.mil_k(torch.tensor(lengths), 3.0)
    want = mmsd_ext.topk_mil_pool(scores, k.to(device), torch.tensor(lengths, device=device), backend=any_backend)
    for as_given in (list, tuple, lambda v: np.array(v, dtype=np.int32), lambda v: np.array(v, dtype=np.uint16)):
        assert torch.equal(mmsd_ext.mil_k(as_given(lengths), 3.0), k)
        got = mmsd_ext.topk_mil_pool(scores, as_given(k.tolist()), as_given(lengths), backend=any_backend)
        assert torch.equal(got, want)


def test_a_0d_k_is_one_k_for_every_video(any_backend):
    # mil_k of one length tensor gives a 0-d k, which was refused ("expected ... shape [B]").
    device = backend_device(any_backend)
    gen = torch.Generator().manual_seed(23)
    scores = torch.randn(3, 12, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    lengths = torch.tensor([12, 7, 5], device=device)
    k = mmsd_ext.mil_k(torch.tensor(12, device=device), 3.0)
    assert k.shape == () and int(k) == 4
    want = mmsd_ext.topk_mil_pool(scores, torch.full((3,), 4, device=device), lengths, backend=any_backend)
    (want_grad,) = torch.autograd.grad(want.sum(), scores)
    got = mmsd_ext.topk_mil_pool(scores, k.int(), lengths, backend=any_backend)
    (grad,) = torch.autograd.grad(got.sum(), scores)
    assert torch.equal(got, want) and torch.equal(grad, want_grad)
    # A CPU scalar goes to the device of scores, as a list does (a [B] tensor must be there);
    # without a GPU, seen with meta scores: the error is then about their values, not k's device.
    assert torch.equal(mmsd_ext.topk_mil_pool(scores, torch.tensor(4), lengths, backend=any_backend), want)
    meta = torch.empty(3, 12, 4, device="meta")
    with pytest.raises(ValueError, match="^scores: a meta tensor holds no values"):
        mmsd_ext.topk_mil_pool(meta, torch.tensor(4), backend=any_backend)
    with pytest.raises(ValueError, match="^k: expected a tensor on meta like scores, got cpu$"):
        mmsd_ext.topk_mil_pool(meta, torch.tensor([4, 4, 4]), backend=any_backend)
    if device.type == "cpu":  # values are checked on the host only
        with pytest.raises(ValueError, match=r"^k: expected 1 <= k\[b\] <= lengths\[b\], got k\[2\] = 6 with lengths\[2\] = 5$"):
            mmsd_ext.topk_mil_pool(scores, torch.tensor(6), lengths, backend=any_backend)
    # The ops themselves still take [B] only.
    with pytest.raises(ValueError, match=r"^k: expected an int or shape \[B\] = \[3\], got \(\)$"):
        mmsd_ext.mil._check_topk_args(scores, k, lengths, True)


def test_bad_inputs_name_the_argument(any_backend):
    device = backend_device(any_backend)
    for args, kwargs, exc, name, host_only in _bad_calls(device):
        if host_only and device.type == "cuda":
            continue  # would need a host sync on CUDA: see test_cuda_out_of_range
        with pytest.raises(exc, match=rf"^{name}:" if ":" not in name else "^" + re.escape(name)):
            mmsd_ext.topk_mil_pool(*args, backend=any_backend, **kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_tensors_on_different_devices():
    x = torch.randn(2, 5, 3, device="cuda")
    with pytest.raises(ValueError, match="^k:"):
        mmsd_ext.topk_mil_pool(x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="^lengths:"):
        mmsd_ext.topk_mil_pool(x, 2, torch.tensor([5, 3]))


# (k, lengths) out of range for scores [2, 5, 3], and the message every CPU backend gives.
VALUE_ERRORS = [
    ((torch.tensor([1, 2]), torch.tensor([5, 9])), "lengths: expected values in [1, T] = [1, 5], got lengths[1] = 9"),
    ((torch.tensor([1, 2]), torch.tensor([0, 3])), "lengths: expected values in [1, T] = [1, 5], got lengths[0] = 0"),
    ((torch.tensor([1, 4]), torch.tensor([5, 3])), "k: expected 1 <= k[b] <= lengths[b], got k[1] = 4 with lengths[1] = 3"),
    ((torch.tensor([0, 1]), torch.tensor([5, 3])), "k: expected 1 <= k[b] <= lengths[b], got k[0] = 0 with lengths[0] = 5"),
]


def test_value_errors_are_the_same_on_every_cpu_backend(any_backend):
    # The cpu kernel checks the values itself; the wrapper checks them for the other
    # backends on CPU tensors, with the same messages.
    if backend_device(any_backend).type != "cpu":
        pytest.skip("values are checked on CPU tensors only")
    x = torch.randn(2, 5, 3)
    for (k, lengths), message in VALUE_ERRORS:
        with pytest.raises(ValueError, match="^" + re.escape(message)):
            mmsd_ext.topk_mil_pool(x, k, lengths, backend=any_backend)


def test_compiled_op_checks_its_arguments():
    if "cpu" not in mmsd_ext.available_backends():
        pytest.skip("cpu backend not built")
    op = torch.ops.mmsd_ext.topk_mil_pool
    x = torch.randn(2, 5, 3)
    k, lengths = torch.tensor([1, 2]), torch.tensor([5, 3])
    cases = [
        ((x[0], k, lengths, True), "scores"),
        ((x.long(), k, lengths, True), "scores"),
        ((x, k.int(), lengths, True), "k"),
        ((x, k[:1], lengths, True), "k"),
        ((x, k[:, None], lengths, True), "k"),  # B values, but not of shape [B]
        ((x, k, lengths[:, None], True), "lengths"),
    ]
    for args, name in cases:
        with pytest.raises(RuntimeError, match=rf"{name}: expected"):
            op(*args)
    for (bad_k, bad_lengths), message in VALUE_ERRORS:  # values: ValueError
        with pytest.raises(ValueError, match="^" + re.escape(message)):
            op(x, bad_k, bad_lengths, True)
    out, kth, cut = op(x, k, lengths, True)
    backward = torch.ops.mmsd_ext._topk_mil_pool_backward
    with pytest.raises(RuntimeError, match="grad_out: expected"):
        backward(torch.ones(2, 4), x, k, lengths, kth, cut, True)
    with pytest.raises(RuntimeError, match="cut: expected"):
        backward(torch.ones(2, 3), x, k, lengths, kth, cut[:, :2], True)
    with pytest.raises(ValueError, match="cut: expected"):  # a cut is a row index: below T = 5
        backward(torch.ones(2, 3), x, k, lengths, kth, torch.full_like(cut, 5), True)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_compiled_op_messages_give_the_numbers(device):
    # The kernels' own messages carry the offending sizes, dtypes and values, and
    # raise (not crash) when called without the Python wrapper.
    if device not in mmsd_ext.available_backends():
        pytest.skip(f"{device} backend not available")
    op = torch.ops.mmsd_ext.topk_mil_pool
    x = torch.randn(2, 5, 3, device=device)
    k, lengths = torch.tensor([1, 2], device=device), torch.tensor([5, 3], device=device)
    cases = [
        ((x[0], k, lengths, True), "scores: expected a 3-d tensor [B, T, C], got shape [5, 3]"),
        ((x.long(), k, lengths, True), "scores: expected dtype float32, float16, bfloat16 or float64, got int64"),
        ((x, k.int(), lengths, True), "k: expected an int64 tensor, got int32"),
        ((x, k[:1], lengths, True), "k: expected shape [B] = [2], got [1]"),
        ((x, k, torch.tensor([[5, 3]], device=device), True), "lengths: expected shape [B] = [2], got [1, 2]"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match="^" + re.escape(message)):
            op(*args)
    if device == "cpu":  # values are checked on the host only on the CPU
        for args, message in VALUE_ERRORS:
            with pytest.raises(ValueError, match="^" + re.escape(message)):
                op(x, *args, True)
    _, kth, cut = op(x, k, lengths, True)
    backward = torch.ops.mmsd_ext._topk_mil_pool_backward
    with pytest.raises(RuntimeError, match="^" + re.escape("grad_out: expected shape [B, C] = [2, 3], got [2, 4]")):
        backward(torch.ones(2, 4, device=device), x, k, lengths, kth, cut, True)
    with pytest.raises(RuntimeError, match="^" + re.escape("kth_key: expected an int64 tensor, got int32")):
        backward(torch.ones(2, 3, device=device), x, k, lengths, kth.int(), cut, True)
    with pytest.raises(RuntimeError, match="^" + re.escape("grad_out: expected a floating-point tensor, got int64")):
        backward(torch.ones(2, 3, dtype=torch.long, device=device), x, k, lengths, kth, cut, True)
    with pytest.raises(RuntimeError, match="^" + re.escape("cut: expected an int64 tensor, got int32")):
        backward(torch.ones(2, 3, device=device), x, k, lengths, kth, cut.int(), True)


def _invalid_k_lengths(device):
    # Video 0 is fine; video 1 has k > length, video 2 a length > T, video 3 k = 0.
    scores = torch.randn(4, 6, 3, device=device, requires_grad=True)
    k = torch.tensor([2, 5, 1, 0], device=device)
    lengths = torch.tensor([6, 3, 7, 6], device=device)
    return scores, k, lengths


def test_triton_kernel_marks_out_of_range_videos():
    # Called directly (the public function raises first on CPU tensors): the
    # kernel's own guard, which is what CUDA tensors rely on.
    if "triton" not in mmsd_ext.available_backends():
        pytest.skip("triton backend not available")
    scores, k, lengths = _invalid_k_lengths(backend_device("triton"))
    out = torch.ops.mmsd_ext.topk_mil_pool_triton(scores, k, lengths, True)[0]
    _assert_out_of_range_marked(out, scores, k, lengths)


def test_triton_refuses_more_time_steps_than_its_int32_indices_hold(monkeypatch):
    # Without the check a valid length of 2**31 or more wrapped negative in the kernel: NaN.
    if "triton" not in mmsd_ext.available_backends():
        pytest.skip("triton backend not available")
    from mmsd_ext.kernels import topk_mil_pool as triton_topk

    device = backend_device("triton")
    T = 3_000_000_000
    scores = torch.full((1, 1, 1), 0.5, dtype=torch.float16, device=device).expand(1, T, 1)  # nothing allocated
    lengths = torch.tensor([T], device=device)
    with pytest.raises(ValueError, match=f"^scores: expected at most {triton_topk.MAX_T:,} time steps on triton"):
        mmsd_ext.topk_mil_pool(scores, 1, lengths, backend="triton")
    # The limit itself is taken (a check of ">=" would refuse it); the docstring gives it.
    assert triton_topk.MAX_T == 2**31 - 4097
    triton_topk._check_time_steps(triton_topk.MAX_T)
    # The backward's own check, at a small limit: without it the backward would run (under
    # the interpreter, past the real limit, for many minutes).
    monkeypatch.setattr(triton_topk, "MAX_T", 16)
    one, key = torch.ones(1, dtype=torch.int64, device=device), torch.zeros(1, 1, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="^scores: expected at most 16 time steps on triton"):
        triton_topk.topk_mil_pool_backward(torch.ones(1, 1, device=device), torch.zeros(1, 17, 1, device=device), one,
                                           torch.tensor([17], device=device), key, key, True)


def test_triton_refuses_more_programs_than_its_grid_holds(monkeypatch):
    # One grid axis holds 2**31 - 1 programs (B * C of 2**31 at C = 1 in the forward): past
    # it, a ValueError naming scores, not a failed launch. At a lowered limit: the forward of
    # (5, 3, 2) needs 5 programs (a program takes up to four columns, here both), its
    # backward 5 too (one time tile).
    if "triton" not in mmsd_ext.available_backends():
        pytest.skip("triton backend not available")
    from mmsd_ext.kernels import topk_mil_pool as triton_topk

    assert triton_topk.MAX_PROGRAMS == 2**31 - 1
    device = backend_device("triton")
    scores = torch.randn(5, 3, 2, device=device, requires_grad=True)
    k, lengths = torch.ones(5, dtype=torch.int64, device=device), torch.full((5,), 3, device=device)
    monkeypatch.setattr(triton_topk, "MAX_PROGRAMS", 5)  # the limit itself is taken
    out = mmsd_ext.topk_mil_pool(scores, k, lengths, backend="triton")
    out.sum().backward()
    assert torch.equal(scores.grad.cpu(), _expected_grad(scores.detach(), k, lengths, True, torch.ones(5, 2)))
    monkeypatch.setattr(triton_topk, "MAX_PROGRAMS", 4)
    message = "^" + re.escape("scores: shape (5, 3, 2) needs 5 programs on triton, more than a grid holds (4)")
    with pytest.raises(ValueError, match=message):
        mmsd_ext.topk_mil_pool(scores, k, lengths, backend="triton")
    key = torch.zeros(5, 2, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match=message):
        triton_topk.topk_mil_pool_backward(torch.ones(5, 2, device=device), scores.detach(), k, lengths, key, key, True)


def test_cpu_refuses_more_time_steps_than_its_int32_indices_hold():
    # The C++ kernels count and index time steps in 32 bits. Refused before any work: the
    # expanded input has one element, and its contiguous copy would take 8 GiB.
    if "cpu" not in mmsd_ext.available_backends():
        pytest.skip("cpu backend not built")
    T = 2**31 - 1
    scores = torch.zeros(1, 1, 1).expand(1, T, 1)
    message = "^" + re.escape(f"scores: expected T < 2**31 - 1 (32-bit time indices), got T = {T}")
    with pytest.raises(ValueError, match=message):
        mmsd_ext.topk_mil_pool(scores, 1, torch.tensor([T]), backend="cpu")
    with pytest.raises(ValueError, match=message):
        torch.ops.mmsd_ext.topk_mil_pool(scores, torch.tensor([1]), torch.tensor([T]), True)


def _assert_out_of_range_marked(out, scores, k, lengths):
    assert out[1:].isnan().all()
    torch.testing.assert_close(out[0], scores[0].topk(2, dim=0).values.mean(0))
    (grad,) = torch.autograd.grad(out, scores, torch.ones_like(out))
    assert not grad[1:].any()
    assert torch.equal(grad[0].cpu(), _expected_grad(scores[:1], k[:1], lengths[:1], True, torch.ones(1, 3))[0])


def test_reference_marks_out_of_range_videos():
    # Called directly (the public function raises first on CPU tensors): what the
    # reference gives where nobody checked the values (CUDA tensors, compiled code),
    # the kernels' NaN and zero gradient, not the mean of a clipped slice.
    scores, k, lengths = _invalid_k_lengths(torch.device("cpu"))
    out = topk_mil_pool_reference(scores, k, lengths, True)
    _assert_out_of_range_marked(out, scores, k, lengths)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compiled_out_of_range_videos_get_nan(backend):
    # Inside torch.compile only the cpu kernel checks the values (in C++); the other
    # backends mark the videos as on CUDA (before 2026-11-27 the reference returned
    # the mean of what its slices held).
    if backend not in mmsd_ext.available_backends():
        pytest.skip(f"{backend} backend not available")
    torch._dynamo.reset()
    scores, k, lengths = _invalid_k_lengths(backend_device(backend))
    compiled = torch.compile(lambda x, kk, ll: mmsd_ext.topk_mil_pool(x, kk, ll, backend=backend), fullgraph=True)
    out = compiled(scores, k, lengths)
    _assert_out_of_range_marked(out, scores, k, lengths)


# ---------------------------------------------------------------------------
# Dispatcher registration, torch.compile


def test_opcheck_compiled_op():
    if "cpu" not in mmsd_ext.available_backends():
        pytest.skip("cpu backend not built")
    gen = torch.Generator().manual_seed(5)
    for dtype, largest in [(torch.float32, True), (torch.float16, False), (torch.float64, True)]:
        scores = _values(gen, (3, 11, 4), "ties", dtype).requires_grad_(True)
        args = (scores, torch.tensor([1, 4, 11]), torch.tensor([5, 8, 11]), largest)
        torch.library.opcheck(torch.ops.mmsd_ext.topk_mil_pool.default, args)
        _, kth, cut = torch.ops.mmsd_ext.topk_mil_pool(*args)
        assert not kth.requires_grad and not cut.requires_grad  # only the pooled scores are differentiable
        grad_out = torch.randn(3, 4, generator=gen).to(dtype)
        bargs = (grad_out, scores.detach(), args[1], args[2], kth, cut, largest)
        torch.library.opcheck(torch.ops.mmsd_ext._topk_mil_pool_backward.default, bargs)
        _opcheck_strided(torch.ops.mmsd_ext.topk_mil_pool.default, torch.ops.mmsd_ext._topk_mil_pool_backward.default, bargs)
        # Saved tensors that no forward returned: a time index past T, a key wider than the
        # scores' (they were cut down to another selection, without a word).
        with pytest.raises(ValueError, match="^cut: expected the time indices in"):
            torch.ops.mmsd_ext._topk_mil_pool_backward(grad_out, scores.detach(), args[1], args[2], kth, cut + 11, largest)
        if dtype != torch.float64:
            with pytest.raises(ValueError, match="^kth_key: expected the keys the forward returned"):
                torch.ops.mmsd_ext._topk_mil_pool_backward(grad_out, scores.detach(), args[1], args[2], kth + 2**32, cut, largest)


def test_opcheck_triton_op():
    if "triton" not in mmsd_ext.available_backends():
        pytest.skip("triton backend not available")
    device = backend_device("triton")
    gen = torch.Generator().manual_seed(6)
    scores = _values(gen, (2, 9, 3), "ties", torch.float32).to(device).requires_grad_(True)
    args = (scores, torch.tensor([2, 5], device=device), torch.tensor([9, 6], device=device), False)
    torch.library.opcheck(torch.ops.mmsd_ext.topk_mil_pool_triton.default, args)
    _, kth, cut = torch.ops.mmsd_ext.topk_mil_pool_triton(*args)
    assert not kth.requires_grad and not cut.requires_grad  # as the compiled op's
    grad_out = torch.randn(2, 3, generator=gen).to(device)
    bargs = (grad_out, scores.detach(), args[1], args[2], kth, cut, False)
    torch.library.opcheck(torch.ops.mmsd_ext._topk_mil_pool_triton_backward.default, bargs)
    _opcheck_strided(torch.ops.mmsd_ext.topk_mil_pool_triton.default, torch.ops.mmsd_ext._topk_mil_pool_triton_backward.default, bargs)


def _opcheck_strided(forward, backward, bargs):
    # The same calls on class-major and sliced scores and a transposed grad_out: the fake
    # kernels must give the strides the kernels do (contiguous results), which opcheck
    # compares. (An empty_like(scores) gradient in the backward's fake passed every other test.)
    grad_out, scores, k, lengths, kth, cut, largest = bargs
    grad_t = grad_out.t().contiguous().t()
    for layout in ("transposed", "sliced"):
        strided = _layout(scores, layout).requires_grad_(True)
        torch.library.opcheck(forward, (strided, k, lengths, largest))
        torch.library.opcheck(backward, (grad_t, strided.detach(), k, lengths, kth, cut, largest))


def test_torch_compile_fullgraph_matches_eager(any_backend):
    # One graph, forward and backward, on every backend, the same as eager. Class-major
    # scores (a model's [B, C, T] logits, transposed), whose gradient the kernels return
    # contiguous.
    backend = any_backend
    device = backend_device(backend)
    torch._dynamo.reset()

    def pooled_loss(scores, k, lengths):
        top = mmsd_ext.topk_mil_pool(scores, k, lengths, backend=backend)
        bottom = mmsd_ext.topk_mil_pool(scores, mmsd_ext.mil_k(lengths, 4.0), lengths, largest=False, backend=backend)
        return (bottom - top).square().sum()

    # The reference is plain PyTorch: what can break there is the capture (a graph break,
    # its autograd), which aot_eager checks without inductor's C++ builds of its sorts (~20 s).
    compiled = torch.compile(pooled_loss, fullgraph=True, backend="aot_eager" if backend == "reference" else "inductor")
    gen = torch.Generator().manual_seed(7)
    scores = _layout(_values(gen, (3, 20, 4), "ties", torch.float32).to(device), "transposed").requires_grad_(True)
    k, lengths = torch.tensor([2, 3, 1], device=device), torch.tensor([20, 12, 5], device=device)
    loss = compiled(scores, k, lengths)
    (grad,) = torch.autograd.grad(loss, scores)
    ref = scores.detach().clone().requires_grad_(True)
    ref_loss = pooled_loss(ref, k, lengths)
    (ref_grad,) = torch.autograd.grad(ref_loss, ref)
    torch.testing.assert_close(loss, ref_loss)
    assert torch.equal(grad, ref_grad)
    want_k = torch.tensor([5, 3, 1], device=device)
    assert torch.equal(torch.compile(mmsd_ext.mil_k, fullgraph=True)(lengths, 4.0), want_k)


# ---------------------------------------------------------------------------
# CUDA only (run on a GPU machine; skipped elsewhere)

cuda_only = pytest.mark.skipif(
    "cuda" not in mmsd_ext.available_backends(), reason="needs a CUDA device and the CUDA kernels"
)


@cuda_only
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_out_of_range(backend):
    # No host sync to check k and lengths: such a video gets NaN and no gradient.
    scores, k, lengths = _invalid_k_lengths(torch.device("cuda"))
    out = mmsd_ext.topk_mil_pool(scores, k, lengths, backend=backend)
    _assert_out_of_range_marked(out, scores, k, lengths)


@cuda_only
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_no_host_sync(backend):
    scores = torch.randn(4, 300, 21, device="cuda", requires_grad=True)
    k = torch.tensor([30, 10, 1, 300], device="cuda")
    lengths = torch.tensor([300, 80, 7, 300], device="cuda")
    mmsd_ext.topk_mil_pool(scores, k, lengths, backend=backend)  # warm-up (Triton compiles)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = mmsd_ext.topk_mil_pool(scores, k, lengths, backend=backend)
        out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _assert_matches_oracle(out, scores, k, lengths, True)


@cuda_only
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("T", [2304, 12000])
def test_cuda_long_videos(backend, T):
    # 12000 fp32 keys do not fit the CUDA kernel's shared-memory cache; both paths.
    gen = torch.Generator().manual_seed(8)
    for kind in ("normal", "ties"):
        scores = _values(gen, (2, T, 5), kind, torch.float32).cuda().requires_grad_(True)
        k = torch.tensor([T // 8, 3], device="cuda")
        lengths = torch.tensor([T, T - 5], device="cuda")
        out = mmsd_ext.topk_mil_pool(scores, k, lengths, backend=backend)
        _assert_matches_oracle(out, scores, k, lengths, True)
        g = torch.randn(2, 5, generator=gen).cuda()
        (grad,) = torch.autograd.grad(out, scores, g)
        assert torch.equal(grad.cpu(), _expected_grad(scores, k, lengths, True, g))


@cuda_only
def test_cuda_refuses_sizes_past_its_32_bit_loops():
    # The CUDA kernel's own limits (its time loops step an int by the block; one block per
    # column; the backward's grid), ValueErrors naming scores before anything is allocated:
    # each input is one expanded element. The limits themselves are taken.
    one = torch.zeros(1, 1, 1, device="cuda")
    ones = lambda b: torch.ones(b, dtype=torch.int64, device="cuda")  # noqa: E731
    for T in (2**31 - 256, 2**31 - 2):  # the second is within the cpu kernel's limit
        message = "^" + re.escape(f"scores: expected T <= 2**31 - 257 on CUDA (32-bit time loops), got T = {T}")
        with pytest.raises(ValueError, match=message):
            mmsd_ext.topk_mil_pool(one.expand(1, T, 1), 1, ones(1), backend="cuda")
    out = torch.ops.mmsd_ext.topk_mil_pool(one.expand(1, 2**31 - 257, 1), ones(1), ones(1), True)[0]
    assert torch.equal(out.cpu(), torch.zeros(1, 1))
    scores = one.expand(2**16, 1, 2**15)
    message = "^" + re.escape(f"scores: expected B * C < 2**31 on CUDA (one block per column), got B * C = {2**31}")
    with pytest.raises(ValueError, match=message):
        torch.ops.mmsd_ext.topk_mil_pool(scores, ones(2**16), ones(2**16), True)
    B, T = 16, 2**30
    key = torch.zeros(B, 1, dtype=torch.int64, device="cuda")
    message = "^" + re.escape(f"scores: expected B * T <= 2**34 - 8 on CUDA (the backward's grid), got B * T = {B * T}")
    with pytest.raises(ValueError, match=message):
        torch.ops.mmsd_ext._topk_mil_pool_backward(torch.ones(B, 1, device="cuda"), one.expand(B, T, 1), ones(B),
                                                   ones(B), key, key, True)


@cuda_only
def test_gradcheck_float64_cuda():
    gen = torch.Generator().manual_seed(9)
    scores = (torch.randperm(2 * 7 * 3, generator=gen).double() / 4).reshape(2, 7, 3).cuda().requires_grad_(True)
    k, lengths = torch.tensor([2, 3], device="cuda"), torch.tensor([7, 5], device="cuda")
    for backend in ("cuda", "triton"):
        assert torch.autograd.gradcheck(
            lambda s: mmsd_ext.topk_mil_pool(s, k, lengths, backend=backend), (scores,)
        )


@cuda_only
def test_opcheck_cuda():
    gen = torch.Generator().manual_seed(10)
    scores = _values(gen, (3, 11, 4), "ties", torch.float32).cuda().requires_grad_(True)
    args = (scores, torch.tensor([1, 4, 11], device="cuda"), torch.tensor([5, 8, 11], device="cuda"), True)
    grad_out = torch.randn(3, 4, generator=gen).cuda()
    # Each backward op with what its own forward saved (the two store their keys differently).
    for forward, backward in [
        (torch.ops.mmsd_ext.topk_mil_pool, torch.ops.mmsd_ext._topk_mil_pool_backward),
        (torch.ops.mmsd_ext.topk_mil_pool_triton, torch.ops.mmsd_ext._topk_mil_pool_triton_backward),
    ]:
        torch.library.opcheck(forward.default, args)
        _, kth, cut = forward(*args)
        torch.library.opcheck(backward.default, (grad_out, scores.detach(), args[1], args[2], kth, cut, True))


# ---------------------------------------------------------------------------
# mil_k


@given(
    lengths=st.lists(st.integers(1, 5000), min_size=0, max_size=10),
    ratio=st.sampled_from([1.0, 3.0, 8.0, 8.5, 16.0]),
    min_k=st.integers(1, 5),
)
def test_mil_k_rules(lengths, ratio, min_k):
    t = torch.tensor(lengths, dtype=torch.int64)
    floor = mmsd_ext.mil_k(t, ratio, rule="floor", min_k=min_k)
    ceil = mmsd_ext.mil_k(t, ratio, rule="ceil", min_k=min_k)
    assert floor.dtype == torch.int64 and floor.shape == t.shape
    for L, f, c in zip(lengths, floor.tolist(), ceil.tolist()):
        assert f == min(L, max(min_k, int(L // ratio)))
        assert c == min(L, max(min_k, -int(-L // ratio)))
        assert 1 <= f <= c <= L
    if lengths:
        assert mmsd_ext.mil_k(lengths[0], ratio, rule="floor", min_k=min_k) == floor.tolist()[0]


@given(
    length=st.one_of(st.integers(1, 10**6), st.integers(1, 2**63 - 1)),
    ratio=st.one_of(
        st.sampled_from([1.0, 1.0 + 2**-52, 2.2, 8.0, 1e-300]), st.floats(1e-3, 1e4, allow_nan=False, allow_infinity=False)
    ),
    rule=st.sampled_from(["floor", "ceil"]),
    min_k=st.integers(1, 5),
)
def test_mil_k_of_an_int_is_the_tensor_rule(length, ratio, rule, min_k):
    # An int length is worked out in Python arithmetic (no tensor: nothing to read back
    # inside torch.compile), by the same float64 rule as a tensor of lengths.
    got = mmsd_ext.mil_k(length, ratio, rule=rule, min_k=min_k)
    assert type(got) is int
    assert got == int(mmsd_ext.mil_k(torch.tensor([length]), ratio, rule=rule, min_k=min_k)[0])


def test_mil_k_mmsd_default_and_a_valid_k():
    lengths = torch.tensor([750, 400, 7, 1])
    k = mmsd_ext.mil_k(lengths)
    assert k.tolist() == [93, 50, 1, 1]
    assert mmsd_ext.mil_k(lengths, rule="ceil").tolist() == [94, 50, 1, 1]
    scores = torch.randn(4, 750, 3)
    mmsd_ext.topk_mil_pool(scores, k, lengths)  # always accepted


def test_mil_k_is_at_most_the_length_for_tiny_ratios_and_huge_lengths():
    # L / ratio past 2**63 wrapped around in the int64 cast (k = min_k) before 2026-11-27.
    big = 2**63 - 1
    for ratio in (1.0, 1e-3, 1e-17, 1e-300):
        assert mmsd_ext.mil_k(750, ratio) == 750
        assert mmsd_ext.mil_k(torch.tensor([750, 3]), ratio, rule="ceil").tolist() == [750, 3]
    assert mmsd_ext.mil_k(torch.tensor([big, 2**62]), 1.0).tolist() == [big, 2**62]


@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        (dict(lengths=torch.tensor([5]), ratio=0), ValueError, "ratio"),
        (dict(lengths=torch.tensor([5]), ratio="8"), TypeError, "ratio"),
        (dict(lengths=torch.tensor([5]), rule="round"), ValueError, "rule"),
        (dict(lengths=torch.tensor([5]), min_k=0), ValueError, "min_k"),
        (dict(lengths=torch.tensor([5, 0])), ValueError, "lengths"),
        (dict(lengths=0), ValueError, "lengths"),
        (dict(lengths=2**63 + 5), ValueError, "lengths"),
        (dict(lengths=torch.tensor([5.0])), TypeError, "lengths"),
        (dict(lengths=10.0), TypeError, "lengths: expected an int or an int64 tensor, got float"),
        (dict(lengths=[750.0, 400.0]), TypeError, "lengths: expected integers, got float64"),
        (dict(lengths=[[750], [400, 2]]), ValueError, "lengths: expected a 1-d sequence of integers"),
        (dict(lengths=np.array([2**63 + 5], dtype=np.uint64)), ValueError, r"lengths: expected values below 2\*\*63, got max"),
        (dict(lengths=[750, 0]), ValueError, "lengths: expected every length >= 1"),
    ],
)
def test_mil_k_bad_inputs(kwargs, exc, name):
    with pytest.raises(exc, match=rf"^{name}"):
        mmsd_ext.mil_k(**kwargs)


def test_mil_k_never_exceeds_the_length():
    # An int and a tensor of lengths give the same k at the edges: a ratio so small that L / ratio
    # overflows, and a min_k above L (k <= L always holds).
    for kwargs, rule in ((dict(ratio=1e-310), lambda L: L), (dict(min_k=5), lambda L: min(L, 5)),
                         (dict(ratio=0.5, min_k=2), lambda L: L)):
        for length in (1, 3, 10):
            k = mmsd_ext.mil_k(length, **kwargs)
            assert k == rule(length) and isinstance(k, int), (kwargs, length, k)
            assert mmsd_ext.mil_k(torch.tensor([length]), **kwargs).tolist() == [rule(length)], (kwargs, length)


def test_every_backend_is_registered():
    assert set(mil._IMPLS_SUPPORTED) == set(mmsd_ext.BACKENDS) == set(mil._IMPLS)
    assert sorted(mil._GPU_ORDER) == ["cuda", "triton"]


def test_bf16_backward_divides_by_a_k_bf16_cannot_hold(backend):
    """k = 257 is 256 in bfloat16: the gradient 1 / k must be formed in float and rounded
    once, to bfloat16(1 / 257), not from k rounded to the dtype."""
    device = backend_device(backend)
    B, T, C = 1, 300, 2
    x = torch.randn(B, T, C, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).to(device).requires_grad_()
    k, lengths = torch.tensor([257], device=device), torch.tensor([T], device=device)
    mmsd_ext.topk_mil_pool(x, k, lengths, backend=backend).sum().backward()
    g = x.grad[x.grad != 0].cpu()
    assert g.numel() == 257 * C
    assert torch.all(g == torch.tensor(1.0 / 257).to(torch.bfloat16))
    assert torch.tensor(1.0 / 257).to(torch.bfloat16) != torch.tensor(1.0 / 256).to(torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward_mean_is_rounded_once(backend, dtype):
    """out = (float32 sum of the k selected) / k, rounded once to the dtype. The scores are
    multiples of 1/64 in [-4, 4): exact in fp16 and bf16, and so is every float32 sum of up
    to 300 of them, whatever the order. k = 257 is 256 in bfloat16."""
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(7)
    B, T, C = 3, 300, 6
    scores = (torch.randint(-256, 256, (B, T, C), generator=gen).float() / 64).to(dtype)
    k, lengths = torch.tensor([257, 7, 100]), torch.tensor([300, 20, 250])
    for largest in (True, False):
        out = mmsd_ext.topk_mil_pool(scores.to(device), k.to(device), lengths.to(device), largest=largest, backend=backend)
        for b in range(B):
            top = torch.topk(scores[b, : lengths[b]].float(), int(k[b]), dim=0, largest=largest).values
            assert torch.equal(out[b].cpu(), (top.sum(0) / int(k[b])).to(dtype)), (largest, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scores_a_few_ulps_apart(backend, dtype):
    """Scores 1, 2, ... ulps above 1.0 share every digit of the radix select but the last:
    the selection must still resolve it, in the forward and in the backward."""
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(3)
    T, C = 40, 5
    steps = torch.stack([torch.randperm(T, generator=gen) for _ in range(C)], dim=1)  # distinct per column
    one = torch.ones((), dtype=dtype)
    scores = torch.ones(T, C, dtype=dtype)
    for _ in range(T):  # scores[t, c] = 1 + steps[t, c] ulps
        scores = torch.where(steps > 0, torch.nextafter(scores, 2 * one), scores)
        steps = steps - 1
    scores = scores[None]
    lengths = torch.tensor([T])
    for largest in (True, False):
        for kk in (1, 7):
            k = torch.tensor([kk])
            x = scores.clone().to(device).requires_grad_()
            out = mmsd_ext.topk_mil_pool(x, k.to(device), lengths.to(device), largest=largest, backend=backend)
            ref_in = scores.clone().requires_grad_()
            ref = topk_mil_pool_reference(ref_in, k, lengths, largest)
            if kk == 1:  # one score, no sum to round
                assert torch.equal(out.detach().cpu(), ref.detach())
            else:
                torch.testing.assert_close(out.detach().cpu(), ref.detach(), rtol=4 * torch.finfo(dtype).eps, atol=0)
            out.sum().backward()
            ref.sum().backward()
            assert torch.equal(x.grad.cpu(), ref_in.grad), (largest, kk)


def test_strided_k_and_lengths(backend):
    # 1-d tensors that are every other element of longer ones.
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(2)
    scores = torch.randn(3, 8, 5, generator=gen).to(device).requires_grad_()
    k = torch.tensor([2, 7, 3, 7, 1, 7], device=device)[::2]
    lengths = torch.tensor([5, 1, 8, 1, 6, 1], device=device)[::2]
    assert not k.is_contiguous() and not lengths.is_contiguous()
    out = mmsd_ext.topk_mil_pool(scores, k, lengths, backend=backend)
    out.sum().backward()
    ref_scores = scores.detach().cpu().requires_grad_()
    ref = topk_mil_pool_reference(ref_scores, k.cpu().contiguous(), lengths.cpu().contiguous(), True)
    ref.sum().backward()
    torch.testing.assert_close(out.detach().cpu(), ref.detach())
    torch.testing.assert_close(scores.grad.cpu(), ref_scores.grad)
