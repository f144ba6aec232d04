"""Triton kernels of snippet_distill_loss and mmsd_distill_loss.

The maths (shared with the C++ and CUDA kernels) is written out in
csrc/distill_math.h. Per row of C classes and each softmax x / tau:

    shift = max_c x_c (0 for an all -inf row),  a_c = (x_c - shift) / tau,  S = sum_c exp(a_c)
    loss(student s <- teacher t) = log S_s + D / S_t,  D = sum_c exp(b_c) * (-a_c)  (0 where exp(b_c) == 0)

The forward reads each input once and writes the row losses and, per softmax,
(shift, log S) to ``row_stats``. The backward reads the inputs again and writes
the gradients, recomputing the probabilities from ``row_stats``:

    d loss / d s_c = w * (exp(a_c) / S_s - exp(b_c) / S_t) / tau

exp(a_c) exactly as the forward summed it into S (the same expression), and 1 / S
from log S in float64, rounded once (as inverse_sum of the C++ kernels; computed
by the launcher, a [R, 2] or [R, 4] tensor): the error of a dominant class's exp
then cancels in its probability, which exp(a_c - log S) would not give. Compiled,
tl.exp is ex2.approx, a few ulps off, and the tests hold the gradients to 8 ulps
of w / tau. (The float64 exp inside the backward kernels, by libdevice, took the
three-way backward from 128 to 240 registers a thread on sm_90.)

with w the upstream weight of the row (grad, or grad / count for "mean").
A teacher whose saved log S is -inf (all -inf, or a masked-out row) gives no
gradient. MMSD's three terms share one pass: rgb's gradient is w (p_rgb - p_flow)
/ tau, flow's its negative, fused's w (p_fused - p_avg) / tau, avg = (rgb + flow) / 2
(its exponent (avg - shift) / tau formed in float64; csrc/distill_math.h says why).

Rows of up to MAX_TILE_C classes are one tile, several rows per program; wider
rows loop over tiles of MAX_TILE_C classes (a first loop for the maxima, a
second for the sums, re-reading the row from cache), accumulating elementwise and
reducing once after each loop. A one-pass online softmax
would have to rescale the cross term D along with S whenever either maximum
moves; two passes keep the arithmetic identical to the one-tile path.
"""

import torch
import triton
import triton.language as tl

from ._device import device_guard

# Classes held in one tile. 1024 float32 x 3 inputs per row stay in registers with
# 4 warps; WTAL's C (21, 101, 201) is one tile, wider rows loop.
MAX_TILE_C = 1024
# Elements per program in the one-tile forward (rows * padded C; 8 per thread with
# 4 warps) and in the backward (a 2-D grid of tiles, no reduction; 4 per thread with
# 8 warps, _BACKWARD_OPTIONS). Chosen from the registers ptxas gives each sm_90
# kernel (tests/triton_aot.py), not yet timed on a GPU: with 2048 the three-way
# forward at C = 21 needs 255 registers a thread, and with 4096 its backward spilled
# (at 4 warps); with 1024 none spills. The most a forward takes is 176 registers (triton
# 3.8: the masked three-way forward in float32 at C = 33, 16 rows of 64 classes; 90 at
# C = 21): less occupancy, not a spill (tests/triton_aot.py holds that case).
TILE_ELEMENTS = 1024
BACKWARD_TILE_ELEMENTS = 1024
# The backward's grid holds a class tile on axis 1, which CUDA limits to 65535
# programs. (A loop over class tiles inside the backward kernels would lift the
# limit, but took the three-way backward at C = 21 from 64 to 108 registers a
# thread, and made it spill at float64 C > 1024.)
MAX_C = 65535 * MAX_TILE_C
NUM_WARPS = 4  # Triton's default; not yet tuned on a GPU
# The backward kernels: 8 warps, 4 elements a thread. With 4 warps the three-way
# backward at float16 and C > 512 spilled 60 bytes a thread, and at C = 2 needed
# up to 152 registers; with 8, ptxas gives every backward from C = 2 to 3000, in
# every dtype, at most 78 registers (bfloat16 three-way at C = 9) and no spills
# (sm_90, triton 3.8; not timed on a GPU). They round each product, as the CPU and
# CUDA kernels and the interpreter do: by default Triton contracts p_s - p_t,
# p_s = exp(a) * (1 / S), into one fma, and equal logits then give a product's
# rounding error instead of a zero gradient.
_BACKWARD_OPTIONS = dict(num_warps=8, enable_fp_fusion=False)

_REDUCTION_NONE, _REDUCTION_MEAN, _REDUCTION_SUM = 0, 1, 2  # as at::Reduction
_PAIR_STATS, _MMSD_STATS = 4, 8


@triton.jit
def _row_shift(row_max):
    return tl.where(row_max == float("-inf"), 0.0, row_max)


@triton.jit
def _avg_exponent(r, f, shift_a, inv_tau):
    # ((r + f) / 2 - shift_a) / tau with the sum and the difference in float64, rounded
    # once to float32 (avg_exponent in csrc/distill_math.h: why).
    d = (r.to(tl.float64) + f.to(tl.float64)) * 0.5 - shift_a.to(tl.float64)
    return d.to(tl.float32) * inv_tau


@triton.jit
def _cross(e_t, a_s):
    return tl.where(e_t == 0.0, 0.0, -e_t * a_s)


@triton.jit
def _row_loss(sum_s, sum_t, cross):
    # Compiled, / is div.full.f32 (within 2 ulp, where the CPU and CUDA kernels round once),
    # less than the loss's other roundings; div_rn took the three-way forward at C = 21 from
    # 90 to 158 registers (tests/triton_aot.py).
    return tl.where(sum_t == 0.0, 0.0, tl.log(sum_s) + cross / sum_t)


@triton.jit
def _load_tile(ptr, offs, m):
    return tl.load(ptr + offs, mask=m, other=float("-inf")).to(tl.float32)


@triton.jit
def _row_block(mask_ptr, R, HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr):
    # This program's rows; those in range; those in range and not masked out.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # R may pass 2**31
    row_ok = rows < R
    valid = row_ok
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0)
    return rows, row_ok, valid


@triton.jit
def _store_stats(ptr, shift, total, valid, row_ok):
    # One softmax's (shift, log S); log S = -inf at a masked-out row (all its loads
    # are -inf, so S = 0 there anyway) tells the backward the row has no gradient.
    tl.store(ptr, shift, mask=row_ok)
    tl.store(ptr + 1, tl.where(valid, tl.log(total), float("-inf")), mask=row_ok)


@triton.jit
def _snippet_distill_forward_kernel(
    s_ptr,  # student logits [R, C], contiguous, any float dtype
    t_ptr,  # teacher logits [R, C], same dtype
    mask_ptr,  # bool [R], True = valid row (unused unless HAS_MASK)
    loss_ptr,  # out float32 [R]: row losses, 0 at masked rows
    stats_ptr,  # out float32 [R, 4]: shift_s, log S_s, shift_t, log S_t (-inf at masked rows)
    R,  # rows
    C,  # classes
    inv_tau,  # 1 / temperature
    HAS_MASK: tl.constexpr,  # whether mask_ptr is read
    SINGLE_TILE: tl.constexpr,  # C <= BLOCK_C: the row is one tile
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_C: tl.constexpr,  # classes per tile (a power of 2)
):
    rows, row_ok, valid = _row_block(mask_ptr, R, HAS_MASK, BLOCK_R)
    base = rows[:, None] * C
    cols = tl.arange(0, BLOCK_C)
    if SINGLE_TILE:
        m = valid[:, None] & (cols[None, :] < C)
        s = _load_tile(s_ptr, base + cols[None, :], m)
        t = _load_tile(t_ptr, base + cols[None, :], m)
        shift_s = _row_shift(tl.max(s, axis=1))
        shift_t = _row_shift(tl.max(t, axis=1))
        a = (s - shift_s[:, None]) * inv_tau
        b = (t - shift_t[:, None]) * inv_tau
        ea = tl.exp(a)
        eb = tl.exp(b)
        sum_s = tl.sum(ea, axis=1)
        sum_t = tl.sum(eb, axis=1)
        cross = tl.sum(_cross(eb, a), axis=1)
    else:
        # Tiles accumulate elementwise and are reduced once after each loop (cheaper
        # than a reduction per tile; a reduction carried by the loop also trips an
        # assertion in Triton's thread-locality pass).
        max_s = tl.full([BLOCK_R, BLOCK_C], float("-inf"), tl.float32)
        max_t = tl.full([BLOCK_R, BLOCK_C], float("-inf"), tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + cols
            m = valid[:, None] & (c[None, :] < C)
            max_s = tl.maximum(max_s, _load_tile(s_ptr, base + c[None, :], m))
            max_t = tl.maximum(max_t, _load_tile(t_ptr, base + c[None, :], m))
        shift_s = _row_shift(tl.max(max_s, axis=1))
        shift_t = _row_shift(tl.max(max_t, axis=1))
        acc_s = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        acc_t = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        acc_cross = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + cols
            m = valid[:, None] & (c[None, :] < C)
            a = (_load_tile(s_ptr, base + c[None, :], m) - shift_s[:, None]) * inv_tau
            b = (_load_tile(t_ptr, base + c[None, :], m) - shift_t[:, None]) * inv_tau
            eb = tl.exp(b)
            acc_s += tl.exp(a)
            acc_t += eb
            acc_cross += _cross(eb, a)
        sum_s = tl.sum(acc_s, axis=1)
        sum_t = tl.sum(acc_t, axis=1)
        cross = tl.sum(acc_cross, axis=1)
    loss = tl.where(valid, _row_loss(sum_s, sum_t, cross), 0.0)
    tl.store(loss_ptr + rows, loss, mask=row_ok)
    st = stats_ptr + rows * 4
    _store_stats(st, shift_s, sum_s, valid, row_ok)
    _store_stats(st + 2, shift_t, sum_t, valid, row_ok)


@triton.jit
def _snippet_distill_backward_kernel(
    grad_ptr,  # float32: d loss, [R] for "none", a scalar otherwise
    count_ptr,  # float32 scalar: valid rows (for "mean")
    s_ptr,  # student logits [R, C], contiguous
    t_ptr,  # teacher logits [R, C]
    stats_ptr,  # float32 [R, 4] from the forward
    inv_ptr,  # float32 [R, 2]: 1 / S_s, 1 / S_t (_inverse_sums)
    out_ptr,  # out: d loss / d student [R, C], the student's dtype
    R,  # rows
    C,  # classes
    inv_tau,  # 1 / temperature
    REDUCTION: tl.constexpr,  # 0 none, 1 mean, 2 sum
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_C: tl.constexpr,  # classes per program
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # R may pass 2**31
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < R
    if REDUCTION == 0:
        w = tl.load(grad_ptr + rows, mask=row_ok, other=0.0)
    elif REDUCTION == 1:
        # IEEE division, as the CPU and CUDA kernels (a plain / compiles to div.full.f32, 2 ulp);
        # it costs this kernel no registers (tests/triton_aot.py).
        w = tl.math.div_rn(tl.load(grad_ptr), tl.maximum(tl.load(count_ptr), 1.0)) + tl.zeros([BLOCK_R], tl.float32)
    else:
        w = tl.load(grad_ptr) + tl.zeros([BLOCK_R], tl.float32)
    st = stats_ptr + rows * 4
    shift_s = tl.load(st + 0, mask=row_ok, other=0.0)
    shift_t = tl.load(st + 2, mask=row_ok, other=0.0)
    log_t = tl.load(st + 3, mask=row_ok, other=float("-inf"))
    offs = rows[:, None] * C + cols[None, :]
    m = row_ok[:, None] & (cols[None, :] < C)
    s = tl.load(s_ptr + offs, mask=m, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + offs, mask=m, other=0.0).to(tl.float32)
    inv_s = tl.load(inv_ptr + rows * 2, mask=row_ok, other=0.0)
    inv_t = tl.load(inv_ptr + rows * 2 + 1, mask=row_ok, other=0.0)
    p_s = tl.exp((s - shift_s[:, None]) * inv_tau) * inv_s[:, None]
    p_t = tl.exp((t - shift_t[:, None]) * inv_tau) * inv_t[:, None]
    g = (w * inv_tau)[:, None] * (p_s - p_t)
    g = tl.where((log_t != float("-inf"))[:, None], g, 0.0)
    tl.store(out_ptr + offs, g.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _mmsd_distill_forward_kernel(
    r_ptr,  # rgb logits [R, C], contiguous, any float dtype
    f_ptr,  # flow logits [R, C], same dtype
    u_ptr,  # fused logits [R, C], same dtype
    mask_ptr,  # bool [R], True = valid row (unused unless HAS_MASK)
    loss_ptr,  # out float32 [R]: sum of the three terms per row, 0 at masked rows
    stats_ptr,  # out float32 [R, 8]: (shift, log S) of rgb, flow, fused, avg; log S = -inf at masked rows
    R,  # rows
    C,  # classes
    inv_tau,  # 1 / temperature
    HAS_MASK: tl.constexpr,  # whether mask_ptr is read
    SINGLE_TILE: tl.constexpr,  # C <= BLOCK_C: the row is one tile
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_C: tl.constexpr,  # classes per tile (a power of 2)
):
    rows, row_ok, valid = _row_block(mask_ptr, R, HAS_MASK, BLOCK_R)
    base = rows[:, None] * C
    cols = tl.arange(0, BLOCK_C)
    if SINGLE_TILE:
        m = valid[:, None] & (cols[None, :] < C)
        r = _load_tile(r_ptr, base + cols[None, :], m)
        f = _load_tile(f_ptr, base + cols[None, :], m)
        u = _load_tile(u_ptr, base + cols[None, :], m)
        avg = (r + f) * 0.5
        shift_r = _row_shift(tl.max(r, axis=1))
        shift_f = _row_shift(tl.max(f, axis=1))
        shift_u = _row_shift(tl.max(u, axis=1))
        shift_a = _row_shift(tl.max(avg, axis=1))
        ar = (r - shift_r[:, None]) * inv_tau
        af = (f - shift_f[:, None]) * inv_tau
        au = (u - shift_u[:, None]) * inv_tau
        er = tl.exp(ar)
        ef = tl.exp(af)
        ea = tl.exp(_avg_exponent(r, f, shift_a[:, None], inv_tau))
        sum_r = tl.sum(er, axis=1)
        sum_f = tl.sum(ef, axis=1)
        sum_u = tl.sum(tl.exp(au), axis=1)
        sum_a = tl.sum(ea, axis=1)
        cross1 = tl.sum(_cross(ef, ar), axis=1)
        cross2 = tl.sum(_cross(er, af), axis=1)
        cross3 = tl.sum(_cross(ea, au), axis=1)
    else:
        # Elementwise accumulators, reduced after each loop (see the single-pair kernel).
        max_r = tl.full([BLOCK_R, BLOCK_C], float("-inf"), tl.float32)
        max_f = tl.full([BLOCK_R, BLOCK_C], float("-inf"), tl.float32)
        max_u = tl.full([BLOCK_R, BLOCK_C], float("-inf"), tl.float32)
        max_a = tl.full([BLOCK_R, BLOCK_C], float("-inf"), tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + cols
            m = valid[:, None] & (c[None, :] < C)
            r = _load_tile(r_ptr, base + c[None, :], m)
            f = _load_tile(f_ptr, base + c[None, :], m)
            max_r = tl.maximum(max_r, r)
            max_f = tl.maximum(max_f, f)
            max_a = tl.maximum(max_a, (r + f) * 0.5)
            max_u = tl.maximum(max_u, _load_tile(u_ptr, base + c[None, :], m))
        shift_r = _row_shift(tl.max(max_r, axis=1))
        shift_f = _row_shift(tl.max(max_f, axis=1))
        shift_u = _row_shift(tl.max(max_u, axis=1))
        shift_a = _row_shift(tl.max(max_a, axis=1))
        acc_r = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        acc_f = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        acc_u = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        acc_a = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        acc_1 = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        acc_2 = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        acc_3 = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + cols
            m = valid[:, None] & (c[None, :] < C)
            r = _load_tile(r_ptr, base + c[None, :], m)
            f = _load_tile(f_ptr, base + c[None, :], m)
            ar = (r - shift_r[:, None]) * inv_tau
            af = (f - shift_f[:, None]) * inv_tau
            au = (_load_tile(u_ptr, base + c[None, :], m) - shift_u[:, None]) * inv_tau
            er = tl.exp(ar)
            ef = tl.exp(af)
            ea = tl.exp(_avg_exponent(r, f, shift_a[:, None], inv_tau))
            acc_r += er
            acc_f += ef
            acc_u += tl.exp(au)
            acc_a += ea
            acc_1 += _cross(ef, ar)
            acc_2 += _cross(er, af)
            acc_3 += _cross(ea, au)
        sum_r = tl.sum(acc_r, axis=1)
        sum_f = tl.sum(acc_f, axis=1)
        sum_u = tl.sum(acc_u, axis=1)
        sum_a = tl.sum(acc_a, axis=1)
        cross1 = tl.sum(acc_1, axis=1)
        cross2 = tl.sum(acc_2, axis=1)
        cross3 = tl.sum(acc_3, axis=1)
    loss = _row_loss(sum_r, sum_f, cross1) + _row_loss(sum_f, sum_r, cross2) + _row_loss(sum_u, sum_a, cross3)
    tl.store(loss_ptr + rows, tl.where(valid, loss, 0.0), mask=row_ok)
    st = stats_ptr + rows * 8
    _store_stats(st, shift_r, sum_r, valid, row_ok)
    _store_stats(st + 2, shift_f, sum_f, valid, row_ok)
    _store_stats(st + 4, shift_u, sum_u, valid, row_ok)
    _store_stats(st + 6, shift_a, sum_a, valid, row_ok)


@triton.jit
def _mmsd_distill_backward_kernel(
    grad_ptr,  # float32 scalar: d loss (the loss is a mean over valid rows)
    count_ptr,  # float32 scalar: valid rows
    r_ptr,  # rgb logits [R, C], contiguous
    f_ptr,  # flow logits [R, C]
    u_ptr,  # fused logits [R, C]
    stats_ptr,  # float32 [R, 8] from the forward
    inv_ptr,  # float32 [R, 4]: 1 / S of rgb, flow, fused, avg (_inverse_sums)
    gr_ptr,  # out: d loss / d rgb [R, C], the inputs' dtype
    gf_ptr,  # out: d loss / d flow
    gu_ptr,  # out: d loss / d fused
    R,  # rows
    C,  # classes
    inv_tau,  # 1 / temperature
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_C: tl.constexpr,  # classes per program
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # R may pass 2**31
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < R
    # IEEE division, as the CPU and CUDA kernels and the pair backward.
    k = tl.math.div_rn(tl.load(grad_ptr), tl.maximum(tl.load(count_ptr), 1.0)) * inv_tau
    st = stats_ptr + rows * 8
    shift_r = tl.load(st + 0, mask=row_ok, other=0.0)[:, None]
    log_r = tl.load(st + 1, mask=row_ok, other=float("-inf"))[:, None]
    shift_f = tl.load(st + 2, mask=row_ok, other=0.0)[:, None]
    log_f = tl.load(st + 3, mask=row_ok, other=float("-inf"))[:, None]
    shift_u = tl.load(st + 4, mask=row_ok, other=0.0)[:, None]
    shift_a = tl.load(st + 6, mask=row_ok, other=0.0)[:, None]
    log_a = tl.load(st + 7, mask=row_ok, other=float("-inf"))[:, None]
    offs = rows[:, None] * C + cols[None, :]
    m = row_ok[:, None] & (cols[None, :] < C)
    r = tl.load(r_ptr + offs, mask=m, other=0.0).to(tl.float32)
    f = tl.load(f_ptr + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)
    inv = inv_ptr + rows * 4
    p_r = tl.exp((r - shift_r) * inv_tau) * tl.load(inv + 0, mask=row_ok, other=0.0)[:, None]
    p_f = tl.exp((f - shift_f) * inv_tau) * tl.load(inv + 1, mask=row_ok, other=0.0)[:, None]
    p_u = tl.exp((u - shift_u) * inv_tau) * tl.load(inv + 2, mask=row_ok, other=0.0)[:, None]
    p_a = tl.exp(_avg_exponent(r, f, shift_a, inv_tau)) * tl.load(inv + 3, mask=row_ok, other=0.0)[:, None]
    g1 = k * (p_r - p_f)
    # Selects, not products with 0: a term without a teacher may hold NaN probabilities.
    gr = tl.where(log_f != float("-inf"), g1, 0.0)
    gf = tl.where(log_r != float("-inf"), -g1, 0.0)
    gu = tl.where(log_a != float("-inf"), k * (p_u - p_a), 0.0)
    tl.store(gr_ptr + offs, gr.to(gr_ptr.dtype.element_ty), mask=m)
    tl.store(gf_ptr + offs, gf.to(gf_ptr.dtype.element_ty), mask=m)
    tl.store(gu_ptr + offs, gu.to(gu_ptr.dtype.element_ty), mask=m)


# ------------------------------------------------------------------ launchers
def _check_logits(**tensors):
    (name0, t0), *others = tensors.items()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise TypeError(f"{name}: expected dtype float32, float16, bfloat16 or float64, got {t.dtype}")
        if t.dim() < 1 or t.shape[-1] < 1:
            raise ValueError(f"{name}: expected shape [..., C] with C >= 1, got {tuple(t.shape)}")
        if t.shape[-1] > MAX_C:
            raise ValueError(f"{name}: expected at most {MAX_C:,} classes on triton, got C = {t.shape[-1]:,}")
    for name, t in others:
        if t.shape != t0.shape:
            raise ValueError(f"{name}: expected the shape of {name0} {tuple(t0.shape)}, got {tuple(t.shape)}")
        if t.dtype != t0.dtype:
            raise TypeError(f"{name}: expected dtype {t0.dtype} like {name0}, got {t.dtype}")
        if t.device != t0.device:
            raise ValueError(f"{name}: expected a tensor on {t0.device} like {name0}, got {t.device}")


def _check_temperature(temperature):
    # The bounds of csrc/distill_checks.h: 1 / temperature stays a normal float32.
    if not (1e-30 <= temperature <= 1e30):
        raise ValueError(f"temperature: expected a finite number > 0 within [1e-30, 1e30], got {temperature}")


def _check_backward(grad, logits, row_stats, count, temperature, reduction, stats):
    """The backward ops' saved tensors and upstream gradient, as the C++ ops check them
    (csrc/distill_checks.h): a wrong shape would have the kernels read out of bounds."""
    _check_temperature(temperature)
    if reduction not in (_REDUCTION_NONE, _REDUCTION_MEAN, _REDUCTION_SUM):
        raise ValueError(f"reduction: expected 0 (none), 1 (mean) or 2 (sum), got {reduction}")
    leading = tuple(logits.shape[:-1])
    if (row_stats.dtype != torch.float32 or tuple(row_stats.shape) != (*leading, stats)
            or row_stats.device != logits.device):
        raise ValueError(f"row_stats: expected the float32 tensor of shape {(*leading, stats)} that the forward "
                         f"returned, got {row_stats.dtype} {tuple(row_stats.shape)}")
    if count.dtype != torch.float32 or count.numel() != 1 or count.device != logits.device:
        raise ValueError(f"count: expected the float32 scalar that the forward returned, got {count.dtype} {tuple(count.shape)}")
    if not grad.dtype.is_floating_point or grad.device != logits.device:
        raise TypeError(f"grad: expected a floating tensor on {logits.device}, got {grad.dtype} on {grad.device}")
    if reduction == _REDUCTION_NONE and tuple(grad.shape) != leading:
        raise ValueError(f"grad: expected shape {leading}, got {tuple(grad.shape)}")
    if reduction != _REDUCTION_NONE and grad.numel() != 1:
        raise ValueError(f"grad: expected a scalar, got shape {tuple(grad.shape)}")


def _prepare_mask(mask, logits, name):
    if mask is None:
        return None
    if mask.shape != logits.shape[:-1]:
        raise ValueError(f"mask: expected the leading shape {tuple(logits.shape[:-1])} of {name}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise TypeError(f"mask: expected a bool or 0/1 float tensor, got {mask.dtype}")
    if mask.device != logits.device:
        raise ValueError(f"mask: expected a tensor on {logits.device} like {name}, got {mask.device}")
    return (mask if mask.dtype == torch.bool else mask != 0).contiguous().view(-1)


def _as_rows(x):
    """[..., C] as a contiguous [R, C] (a copy only for non-contiguous inputs)."""
    return x.contiguous().view(-1, x.shape[-1])


def _forward_tiles(C):
    if C <= MAX_TILE_C:
        block_c = triton.next_power_of_2(C)
        return True, max(1, TILE_ELEMENTS // block_c), block_c
    return False, 1, MAX_TILE_C


def _backward_tiles(C):
    block_c = min(triton.next_power_of_2(C), MAX_TILE_C)
    return max(1, BACKWARD_TILE_ELEMENTS // block_c), block_c


def _count(mask, R, like):
    """Valid rows, an int64 scalar on the device (a float32 count is inexact past 2**24 rows)."""
    if mask is None:
        return torch.full((), R, dtype=torch.int64, device=like.device)
    return mask.sum(dtype=torch.int64)


def _reduce(row_losses, count, reduction):
    """The loss as the C++ kernels give it: row losses summed in float64, the mean over
    the integer count, one rounding to float32 at the end; no host synchronisation."""
    total = row_losses.sum(dtype=torch.float64)
    if reduction == _REDUCTION_MEAN:
        total = total / count.clamp(min=1)
    return total.to(torch.float32)


def snippet_distill_forward(student, teacher, temperature, mask, reduction):
    """(loss, row_stats [..., 4], count): see mmsd_ext::snippet_distill_loss."""
    _check_logits(student=student, teacher=teacher)
    _check_temperature(temperature)
    if reduction not in (_REDUCTION_NONE, _REDUCTION_MEAN, _REDUCTION_SUM):
        raise ValueError(f"reduction: expected 0 (none), 1 (mean) or 2 (sum), got {reduction}")
    mask = _prepare_mask(mask, student, "student")
    s, t = _as_rows(student), _as_rows(teacher)
    R, C = s.shape
    row_losses = torch.empty(R, dtype=torch.float32, device=s.device)
    stats = torch.empty(R, _PAIR_STATS, dtype=torch.float32, device=s.device)
    if R > 0:
        single, block_r, block_c = _forward_tiles(C)
        with device_guard(s):
            _snippet_distill_forward_kernel[(triton.cdiv(R, block_r),)](
                s, t, mask if mask is not None else s, row_losses, stats, R, C, 1.0 / temperature,
                HAS_MASK=mask is not None, SINGLE_TILE=single, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=NUM_WARPS,
            )
    count = _count(mask, R, s)
    leading = student.shape[:-1]
    loss = row_losses.view(leading) if reduction == _REDUCTION_NONE else _reduce(row_losses, count, reduction)
    # count is a float32 output, as the C++ ops' (the backward divides by it in float32).
    return loss, stats.view(*leading, _PAIR_STATS), count.to(torch.float32)


def _inverse_sums(row_stats, softmaxes):
    """1 / S of each softmax, float32 [R, softmaxes]: exp(-log S) in float64, rounded once."""
    log_sums = row_stats.reshape(-1, 2 * softmaxes)[:, 1::2]
    return torch.exp(-log_sums.to(torch.float64)).to(torch.float32).contiguous()


def snippet_distill_backward(grad, student, teacher, row_stats, count, temperature, reduction):
    """d loss / d student: see mmsd_ext::_snippet_distill_loss_backward."""
    _check_logits(student=student, teacher=teacher)
    _check_backward(grad, student, row_stats, count, temperature, reduction, _PAIR_STATS)
    s, t = _as_rows(student), _as_rows(teacher)
    R, C = s.shape
    out = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    if R > 0:
        block_r, block_c = _backward_tiles(C)
        with device_guard(s):
            _snippet_distill_backward_kernel[(triton.cdiv(R, block_r), triton.cdiv(C, block_c))](
                grad.to(torch.float32).contiguous(), count, s, t, row_stats.contiguous(), _inverse_sums(row_stats, 2),
                out, R, C, 1.0 / temperature, REDUCTION=reduction, BLOCK_R=block_r, BLOCK_C=block_c, **_BACKWARD_OPTIONS,
            )
    return out


def mmsd_distill_forward(rgb, flow, fused, temperature, mask):
    """(loss, row_stats [..., 8], count): see mmsd_ext::mmsd_distill_loss."""
    _check_logits(rgb=rgb, flow=flow, fused=fused)
    _check_temperature(temperature)
    mask = _prepare_mask(mask, rgb, "rgb")
    r, f, u = _as_rows(rgb), _as_rows(flow), _as_rows(fused)
    R, C = r.shape
    row_losses = torch.empty(R, dtype=torch.float32, device=r.device)
    stats = torch.empty(R, _MMSD_STATS, dtype=torch.float32, device=r.device)
    if R > 0:
        single, block_r, block_c = _forward_tiles(C)
        with device_guard(r):
            _mmsd_distill_forward_kernel[(triton.cdiv(R, block_r),)](
                r, f, u, mask if mask is not None else r, row_losses, stats, R, C, 1.0 / temperature,
                HAS_MASK=mask is not None, SINGLE_TILE=single, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=NUM_WARPS,
            )
    count = _count(mask, R, r)
    loss = _reduce(row_losses, count, _REDUCTION_MEAN)
    return loss, stats.view(*rgb.shape[:-1], _MMSD_STATS), count.to(torch.float32)


def mmsd_distill_backward(grad, rgb, flow, fused, row_stats, count, temperature):
    """(d rgb, d flow, d fused): see mmsd_ext::_mmsd_distill_loss_backward."""
    _check_logits(rgb=rgb, flow=flow, fused=fused)
    _check_backward(grad, rgb, row_stats, count, temperature, _REDUCTION_MEAN, _MMSD_STATS)
    r, f, u = _as_rows(rgb), _as_rows(flow), _as_rows(fused)
    R, C = r.shape
    grads = [torch.empty(rgb.shape, dtype=rgb.dtype, device=rgb.device) for _ in range(3)]
    if R > 0:
        block_r, block_c = _backward_tiles(C)
        with device_guard(r):
            _mmsd_distill_backward_kernel[(triton.cdiv(R, block_r), triton.cdiv(C, block_c))](
                grad.to(torch.float32).contiguous(), count, r, f, u, row_stats.contiguous(), _inverse_sums(row_stats, 4),
                *grads, R, C,
                1.0 / temperature, BLOCK_R=block_r, BLOCK_C=block_c, **_BACKWARD_OPTIONS,
            )
    return tuple(grads)
