"""torch.export of every op on every backend: one exported program, run on new inputs.

torch.export traces without running the kernels (the fake kernels give the shapes,
an unbacked size for NMS's data-dependent result) and refuses any value read on the
host. The programs are exported with dynamic batch and time sizes, then run on inputs
of other sizes and compared with eager calls of the same backend.
"""

import io

import pytest
import torch
from torch.export import Dim

import mmsd_ext
from conftest import backend_device


class _Call(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _export_and_compare(fn, example, dynamic_shapes, others):
    program = torch.export.export(_Call(fn), example, dynamic_shapes={"args": dynamic_shapes})
    for args in (example, *others):
        got = torch.utils._pytree.tree_leaves(program.module()(*args))
        want = torch.utils._pytree.tree_leaves(fn(*args))
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape
            torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


# The Triton interpreter evaluates the kernels with numpy, which warns about the intended
# log(0) = -inf of masked rows (as in test_distill.py).
@pytest.mark.filterwarnings("ignore:(divide by zero|invalid value) encountered:RuntimeWarning")
def test_export_distillation(any_backend):
    device = backend_device(any_backend)
    gen = torch.Generator().manual_seed(41)

    def inputs(B, T, C=21):
        xs = [torch.randn(B, T, C, generator=gen).to(device) for _ in range(3)]
        mask = (torch.rand(B, T, generator=gen) > 0.3).to(device)
        return (*xs, mask)

    def losses(r, f, u, mask):
        rows = mmsd_ext.snippet_distill_loss(r, f, 0.5, mask=mask, reduction="none", backend=any_backend)
        mean = mmsd_ext.snippet_distill_loss(r, f, 2.0, backend=any_backend)
        return rows, mean, mmsd_ext.mmsd_distill_loss(r, f, u, 0.2, mask=mask, backend=any_backend)

    B, T = Dim("B", min=1, max=64), Dim("T", min=2, max=4096)
    three = {0: B, 1: T}
    _export_and_compare(losses, inputs(2, 5), (three, three, three, {0: B, 1: T}), [inputs(3, 9), inputs(1, 2)])


def test_export_topk_mil_pool(any_backend):
    device = backend_device(any_backend)
    gen = torch.Generator().manual_seed(43)

    def inputs(B, T, C=4):
        scores = torch.randn(B, T, C, generator=gen).round(decimals=1)  # ties
        lengths = torch.randint(1, T + 1, (B,), generator=gen)
        return scores.to(device), lengths.to(device)

    def pooled(scores, lengths):
        top = mmsd_ext.topk_mil_pool(scores, mmsd_ext.mil_k(lengths, 3.0), lengths, backend=any_backend)
        bottom = mmsd_ext.topk_mil_pool(scores, 2, largest=False, backend=any_backend)
        return top, bottom

    B, T = Dim("B", min=1, max=64), Dim("T", min=2, max=4096)
    _export_and_compare(pooled, inputs(3, 8), ({0: B, 1: T}, {0: B}), [inputs(2, 13), inputs(5, 2)])


def test_k_worked_out_from_the_traced_time_size(any_backend):
    # k = max(1, T // 4) or mil_k(T) of a dynamic T: a traced int (SymInt, or an int under
    # dynamo) that topk_mil_pool takes without a guard the trace cannot prove (k <= T),
    # under export (strict or not) and torch.compile with dynamic shapes.
    device = backend_device(any_backend)
    gen = torch.Generator().manual_seed(47)

    def pooled(scores):
        T = scores.shape[1]
        return (
            mmsd_ext.topk_mil_pool(scores, max(1, T // 4), backend=any_backend),
            mmsd_ext.topk_mil_pool(scores, mmsd_ext.mil_k(T, 3.0, rule="ceil"), largest=False, backend=any_backend),
        )

    def inputs(B, T):
        return (torch.randn(B, T, 3, generator=gen).to(device),)

    examples = [inputs(2, 13), inputs(3, 2), inputs(1, 40), inputs(2, 24)]
    for strict in (False, True):
        program = torch.export.export(
            _Call(pooled), inputs(2, 9), dynamic_shapes={"args": ({0: Dim("B"), 1: Dim("T", min=2, max=4096)},)},
            strict=strict,
        )
        # Saved and loaded too: the traced k holds no call torch.export.save cannot write.
        saved = io.BytesIO()
        torch.export.save(program, saved)
        saved.seek(0)
        for exported in (program, torch.export.load(saved)):
            for args in examples:
                for got, want in zip(exported.module()(*args), pooled(*args)):
                    torch.testing.assert_close(got, want, rtol=0, atol=0)
    compiled = torch.compile(pooled, fullgraph=True, dynamic=True)
    # (inductor generates the reference's mean itself, summing in another order)
    tol = dict(rtol=1e-6, atol=1e-6) if any_backend == "reference" else dict(rtol=0, atol=0)
    for args in examples:
        for got, want in zip(compiled(*args), pooled(*args)):
            torch.testing.assert_close(got, want, **tol)
    # Out of range for every size the trace allows: refused while tracing, naming k.
    with pytest.raises(ValueError, match="k: expected k <= T"):
        torch.export.export(
            _Call(lambda s: mmsd_ext.topk_mil_pool(s, s.shape[1] + 1, backend=any_backend)), inputs(2, 9),
            dynamic_shapes={"args": ({1: Dim("T", min=2, max=4096)},)},
        )


def test_export_pad_cas_with_videos_of_dynamic_lengths():
    # The padded length is the largest size, not a value read back from a tensor (which
    # non-strict export refused before 2026-11-29).
    def padded(a, b):
        return mmsd_ext.localize.pad_cas([a, b])

    gen = torch.Generator().manual_seed(53)
    dims = ({0: Dim("A", min=2, max=100)}, {0: Dim("Z", min=2, max=100)})
    for strict in (False, True):
        program = torch.export.export(_Call(padded), (torch.randn(5, 3), torch.randn(7, 3)), dynamic_shapes={"args": dims},
                                      strict=strict)
        for n, m in [(5, 7), (9, 3), (4, 4)]:
            args = (torch.randn(n, 3, generator=gen), torch.randn(m, 3, generator=gen))
            for got, want in zip(program.module()(*args), padded(*args)):
                assert torch.equal(got, want)


def test_export_temporal_nms(any_backend):
    device = backend_device(any_backend)
    gen = torch.Generator().manual_seed(47)

    def inputs(M):
        start = torch.rand(M, generator=gen, dtype=torch.float64) * 50
        seg = torch.stack([start, start + torch.rand(M, generator=gen, dtype=torch.float64) * 10], dim=1)
        scores = torch.rand(M, generator=gen).round(decimals=1)  # ties
        groups = torch.randint(0, 3, (M,), generator=gen)
        return seg.to(device), scores.to(device), groups.to(device)

    def suppress(seg, scores, groups):
        keep = mmsd_ext.temporal_nms(seg, scores, 0.4, groups=groups, overlap="other", offset=1.0, backend=any_backend)
        idx, val = mmsd_ext.soft_temporal_nms(seg, scores, groups=groups, backend=any_backend)
        return keep, idx, val

    M = Dim("M", min=2, max=10**6)
    _export_and_compare(suppress, inputs(12), ({0: M}, {0: M}, {0: M}), [inputs(20), inputs(3)])
