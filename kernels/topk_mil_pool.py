"""Triton kernels of top-k MIL pooling: ``mmsd_ext.topk_mil_pool(..., backend="triton")``.

The same selection as the C++ kernels (csrc/cpu, csrc/cuda), shaped for Triton:
one program per (video b, block of BLOCK_C columns) holds tiles of the columns
and finds each column's k-th largest order key by a radix select of DIGIT_BITS
bits per pass, counting with one vectorised compare per digit value (Triton has
no histogram scatter). Then

    out = (sum(x[key > kth]) + (k - count(key > kth)) * value(kth)) / k

and ``cut`` is the time index of the (k - count(key > kth))-th element equal to
kth (a cumulative sum over time), so that ties go to lower time indices. The
backward recomputes each key and selects ``key > kth or (key == kth and t <= cut)``.

Keys here are *signed* integers of the width of the accumulator (int32 for
fp16/bf16/fp32 scores, int64 for fp64), ordered as torch orders the values:
``bits ^ ((bits >> 31) & 0x7FFFFFFF)`` (negative floats flip their magnitude
bits), -0.0 taken as +0.0, every NaN the largest key, complemented for
largest=False. The saved ``kth_key`` holds such a signed key (the C++ kernels
save unsigned keys; each backend's backward reads only its own forward's).
"""

import torch
import triton
import triton.language as tl

from ._device import device_guard

# Scores per tile, at most. 4096 fp32 keys and values over 4 warps are 32 + 32
# registers a thread: larger tiles spill.
MAX_TILE_ELEMENTS = 4096
# Forward: DIGIT_BITS, the radix digit width (32 / DIGIT_BITS passes over each
# column, each comparing every key with 2**DIGIT_BITS bins);
# FORWARD_COMPARE_ELEMENTS, the budget of that [tile, 2**DIGIT_BITS] comparison,
# which bounds the forward's tile; MAX_BLOCK_C, columns per program (fewer
# columns, more programs in flight). Measured on an H200 (triton 3.6), forward
# at (32, 2304, 201), k = 288, with at most 2 / 4 columns: DIGIT_BITS 1:
# 2.35 / 1.83 ms, 2: 1.82 / 1.28 ms, 4: 1.22 / 1.08 ms (torch.topk: 0.83 ms).
# At (10, 750, 21) 1 bit and 2 columns was best (27 us against 43 us), but
# there every variant is bound by the launch; the large shape decides.
DIGIT_BITS = 4
FORWARD_COMPARE_ELEMENTS = 16384
MAX_BLOCK_C = 4
NUM_WARPS = 4
# The kernels hold time indices and valid lengths in int32, as the CUDA kernels do;
# a tile past the last step must not wrap.
MAX_T = 2**31 - 1 - MAX_TILE_ELEMENTS


@triton.jit
def _order_key(x, LARGEST: tl.constexpr, IS_FP64: tl.constexpr):
    """Signed order key of x (fp32, or fp64 when IS_FP64)."""
    if IS_FP64:
        i = x.to(tl.int64, bitcast=True)
        key = i ^ ((i >> 63) & 0x7FFFFFFFFFFFFFFF)
        # -0.0 (and only -0.0) maps to -1: give it the key of +0.0.
        key = tl.where(key == -1, 0, key)
        key = tl.where(x != x, 0x7FFFFFFFFFFFFFFF, key)
    else:
        i = x.to(tl.int32, bitcast=True)
        key = i ^ ((i >> 31) & 0x7FFFFFFF)
        key = tl.where(key == -1, 0, key)
        key = tl.where(x != x, 0x7FFFFFFF, key)
    if not LARGEST:
        key = ~key
    return key


@triton.jit
def _value_of_key(key, LARGEST: tl.constexpr, IS_FP64: tl.constexpr):
    """The value whose order key is `key` (the map is its own inverse on the bits)."""
    if not LARGEST:
        key = ~key
    if IS_FP64:
        i = key ^ ((key >> 63) & 0x7FFFFFFFFFFFFFFF)
        return i.to(tl.float64, bitcast=True)
    else:
        i = key ^ ((key >> 31) & 0x7FFFFFFF)
        return i.to(tl.float32, bitcast=True)


@triton.jit
def _load_tile(base, t, offs_c, mask_c, L, stride_t, stride_c, LARGEST: tl.constexpr, IS_FP64: tl.constexpr):
    """Keys, values (accumulator dtype) and validity of the [BLOCK_T, BLOCK_C] tile at times t."""
    m = (t[:, None] < L) & mask_c[None, :]
    ptrs = base + t[:, None].to(tl.int64) * stride_t + offs_c[None, :].to(tl.int64) * stride_c
    x = tl.load(ptrs, mask=m, other=0.0)
    if IS_FP64:
        x = x.to(tl.float64)
    else:
        x = x.to(tl.float32)
    return _order_key(x, LARGEST, IS_FP64), x, m


@triton.jit
def _video_and_columns(pid, C, BLOCK_C: tl.constexpr):
    """The video and columns of program `pid` of a grid over (video, column block) pairs,
    column blocks fastest. Every launch here has a 1-d grid: axes 1 and 2 are limited to
    65535 programs, axis 0 is not."""
    blocks_c = tl.cdiv(C, BLOCK_C)
    return pid // blocks_c, (pid % blocks_c) * BLOCK_C + tl.arange(0, BLOCK_C)


@triton.jit
def _topk_mil_pool_forward_kernel(
    scores_ptr,  # [B, T, C] scores, any strides
    k_ptr,  # [B] int64: how many scores each video pools
    lengths_ptr,  # [B] int64: valid length of each video
    out_ptr,  # [B, C] out, contiguous, fp32 (fp64 for fp64 scores): the means
    kth_ptr,  # [B, C] int64, contiguous: signed key of each column's k-th selected value
    cut_ptr,  # [B, C] int64, contiguous: last selected time index among the elements equal to it
    T,  # time steps of scores
    C,  # columns (classes) of scores
    stride_b,  # strides of scores, in elements
    stride_t,
    stride_c,
    LARGEST: tl.constexpr,  # pool the largest (True) or the smallest (False)
    IS_FP64: tl.constexpr,  # fp64 scores: 64-bit keys and accumulation
    BLOCK_T: tl.constexpr,  # time steps per tile
    BLOCK_C: tl.constexpr,  # columns per program
    ONE_TILE: tl.constexpr,  # T <= BLOCK_T: the tile is loaded once and stays in registers
    DIGIT_BITS: tl.constexpr,  # radix digit width: KEY_BITS / DIGIT_BITS passes over the column
):
    b, offs_c = _video_and_columns(tl.program_id(0), C, BLOCK_C)
    mask_c = offs_c < C
    length = tl.load(lengths_ptr + b)
    k = tl.load(k_ptr + b)
    # Out-of-range k or length cannot raise on the GPU without a host sync: such a
    # video gets NaN and selects nothing. Its loops run over the clamped length.
    valid = (length >= 1) & (length <= T) & (k >= 1) & (k <= length)
    L = tl.minimum(tl.maximum(length, 0), T).to(tl.int32)
    base = scores_ptr + b.to(tl.int64) * stride_b
    t_tile = tl.arange(0, BLOCK_T)
    if IS_FP64:
        key_max = tl.full([BLOCK_C], 0x7FFFFFFFFFFFFFFF, tl.int64)
        acc_dtype: tl.constexpr = tl.float64
        KEY_BITS: tl.constexpr = 64
    else:
        key_max = tl.full([BLOCK_C], 0x7FFFFFFF, tl.int32)
        acc_dtype: tl.constexpr = tl.float32
        KEY_BITS: tl.constexpr = 32
    zero = key_max - key_max
    if ONE_TILE:
        keys, x, m = _load_tile(base, t_tile, offs_c, mask_c, L, stride_t, stride_c, LARGEST, IS_FP64)

    # Radix select of kth, the k-th largest key, DIGIT_BITS bits per pass from the
    # top, on u = key ^ key_min (the key's bits in unsigned order, so digits are
    # plain bit fields). A pass counts, for each digit value d, the keys that
    # share the digits found so far and have a digit >= d (one compare per bin:
    # Triton has no scatter histogram); the k-th largest has the largest d whose
    # count still reaches `need`.
    key_min = ~key_max
    bins = tl.arange(0, 1 << DIGIT_BITS)
    prefix = zero  # digits found so far, in u
    high = zero  # the bits they occupy
    need = zero.to(tl.int64) + k  # rank of the k-th largest among the keys sharing prefix
    digit_mask = zero + ((1 << DIGIT_BITS) - 1)
    for p in range(KEY_BITS // DIGIT_BITS):
        shift = KEY_BITS - DIGIT_BITS * (p + 1)
        if ONE_TILE:
            u = keys ^ key_min[None, :]
            live = m & ((u & high[None, :]) == prefix[None, :])
            digit = (u >> shift) & digit_mask[None, :]
            ge = (digit[:, :, None] >= bins[None, None, :]) & live[:, :, None]
            counts = tl.sum(ge.to(tl.int32), axis=0)  # [BLOCK_C, bins]
        else:
            counts = tl.zeros([BLOCK_C, 1 << DIGIT_BITS], tl.int32)
            for t0 in range(0, L, BLOCK_T):
                keys, x, m = _load_tile(base, t0 + t_tile, offs_c, mask_c, L, stride_t, stride_c, LARGEST, IS_FP64)
                u = keys ^ key_min[None, :]
                live = m & ((u & high[None, :]) == prefix[None, :])
                digit = (u >> shift) & digit_mask[None, :]
                ge = (digit[:, :, None] >= bins[None, None, :]) & live[:, :, None]
                counts += tl.sum(ge.to(tl.int32), axis=0)
        # counts falls with d and counts[:, 0] >= need: the digit is the last d that reaches need,
        # and what has a larger digit (the largest count below need) ranks above.
        reach = counts >= need[:, None]
        d = tl.sum(reach.to(tl.int32), axis=1) - 1
        need -= tl.max(tl.where(reach, 0, counts), axis=1)
        prefix = prefix | (d.to(prefix.dtype) << shift)
        high = high | (digit_mask << shift)
    kth = prefix ^ key_min

    # Sum and count what lies above kth.
    if ONE_TILE:
        above = (keys > kth[None, :]) & m
        total = tl.sum(tl.where(above, x, 0.0), axis=0)
        n_above = tl.sum(above.to(tl.int32), axis=0)
    else:
        total = tl.zeros([BLOCK_C], acc_dtype)
        n_above = tl.zeros([BLOCK_C], tl.int32)
        for t0 in range(0, L, BLOCK_T):
            keys, x, m = _load_tile(base, t0 + t_tile, offs_c, mask_c, L, stride_t, stride_c, LARGEST, IS_FP64)
            above = (keys > kth[None, :]) & m
            total += tl.sum(tl.where(above, x, 0.0), axis=0)
            n_above += tl.sum(above.to(tl.int32), axis=0)
    need = k - n_above  # how many of the elements equal to kth are selected (>= 1)

    # cut: the time index of the need-th element equal to kth, in time order.
    if ONE_TILE:
        eq = ((keys == kth[None, :]) & m).to(tl.int32)
        rank = tl.cumsum(eq, axis=0)
        hit = (eq == 1) & (rank == need[None, :])
        cut = tl.max(tl.where(hit, t_tile[:, None], -1), axis=0)
    else:
        cut = tl.full([BLOCK_C], -1, tl.int32)
        seen = tl.zeros([BLOCK_C], tl.int32)
        for t0 in range(0, L, BLOCK_T):
            keys, x, m = _load_tile(base, t0 + t_tile, offs_c, mask_c, L, stride_t, stride_c, LARGEST, IS_FP64)
            eq = ((keys == kth[None, :]) & m).to(tl.int32)
            rank = tl.cumsum(eq, axis=0) + seen[None, :]
            hit = (eq == 1) & (rank == need[None, :])
            cut = tl.maximum(cut, tl.max(tl.where(hit, t0 + t_tile[:, None], -1), axis=0))
            seen += tl.sum(eq, axis=0)

    kth_value = _value_of_key(kth, LARGEST, IS_FP64)
    total = total + need.to(acc_dtype) * kth_value
    if IS_FP64:
        mean = total / k.to(tl.float64)
    else:
        mean = tl.math.div_rn(total, k.to(tl.float32))  # IEEE division, as torch's mean
    mean = tl.where(valid, mean, float("nan"))
    kth = tl.where(valid, kth, key_max)
    cut = tl.where(valid, cut, -1)
    o = b.to(tl.int64) * C + offs_c
    tl.store(out_ptr + o, mean, mask=mask_c)
    tl.store(kth_ptr + o, kth.to(tl.int64), mask=mask_c)
    tl.store(cut_ptr + o, cut.to(tl.int64), mask=mask_c)


@triton.jit
def _topk_mil_pool_backward_kernel(
    g_ptr,  # [B, C] contiguous, dtype of scores: grad_out / k, the gradient of each selected score
    scores_ptr,  # [B, T, C] scores, any strides
    k_ptr,  # [B] int64
    lengths_ptr,  # [B] int64
    kth_ptr,  # [B, C] int64, contiguous: the forward's kth keys
    cut_ptr,  # [B, C] int64, contiguous: the forward's cuts
    grad_ptr,  # [B, T, C] gradient of scores, contiguous, dtype of scores
    T,  # time steps
    C,  # columns
    stride_b,  # strides of scores, in elements
    stride_t,
    stride_c,
    LARGEST: tl.constexpr,  # as in the forward
    IS_FP64: tl.constexpr,  # fp64 scores
    BLOCK_T: tl.constexpr,  # time steps per program
    BLOCK_C: tl.constexpr,  # columns per program
):
    # Programs run over (video, column block, time block), time blocks fastest.
    blocks_t = tl.cdiv(T, BLOCK_T)
    pid = tl.program_id(0)
    b, offs_c = _video_and_columns(pid // blocks_t, C, BLOCK_C)
    t = (pid % blocks_t) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_c = offs_c < C
    length = tl.load(lengths_ptr + b)
    k = tl.load(k_ptr + b)
    valid = (length >= 1) & (length <= T) & (k >= 1) & (k <= length)
    L = tl.minimum(tl.maximum(length, 0), T).to(tl.int32)
    base = scores_ptr + b.to(tl.int64) * stride_b
    keys, x, m = _load_tile(base, t, offs_c, mask_c, L, stride_t, stride_c, LARGEST, IS_FP64)
    o = b.to(tl.int64) * C + offs_c
    kth = tl.load(kth_ptr + o, mask=mask_c, other=0)
    if not IS_FP64:
        kth = kth.to(tl.int32)
    cut = tl.load(cut_ptr + o, mask=mask_c, other=-1).to(tl.int32)
    g = tl.load(g_ptr + o, mask=mask_c, other=0.0)
    chosen = (keys > kth[None, :]) | ((keys == kth[None, :]) & (t[:, None] <= cut[None, :]))
    chosen = chosen & m & valid
    grad = tl.where(chosen, g[None, :], 0.0).to(grad_ptr.dtype.element_ty)
    out_mask = (t[:, None] < T) & mask_c[None, :]
    tl.store(grad_ptr + (b.to(tl.int64) * T + t[:, None]) * C + offs_c[None, :], grad, mask=out_mask)


def _tiles(T, C, elements):
    """(BLOCK_T, BLOCK_C) for tiles of at most `elements` scores (at least 16 time steps)."""
    block_c = min(MAX_BLOCK_C, triton.next_power_of_2(max(C, 1)))
    block_t = max(16, min(triton.next_power_of_2(max(T, 1)), elements // block_c))
    return block_t, block_c


def _check_time_steps(T):
    if T > MAX_T:
        raise ValueError(f"scores: expected at most {MAX_T:,} time steps on triton (32-bit time indices), got T = {T:,}")


# Programs in a launch's one grid axis (CUDA's limit on axis 0).
MAX_PROGRAMS = 2**31 - 1


def _check_programs(programs, scores):
    """Refuses, naming scores, a launch of more programs than its 1-d grid holds (at C = 1,
    B of 2**31 or more; the backward also has a program per time tile)."""
    if programs > MAX_PROGRAMS:
        raise ValueError(
            f"scores: shape {tuple(scores.shape)} needs {programs:,} programs on triton, more than a grid holds "
            f"({MAX_PROGRAMS:,})"
        )


def topk_mil_pool_forward(scores, k, lengths, largest):
    """Launches the forward: (out [B, C], kth_key [B, C] int64, cut [B, C] int64)."""
    B, T, C = scores.shape
    _check_time_steps(T)
    # float64 keys take two registers each: half the tile, and twice the warps, keep the
    # forward from spilling (ptxas on sm_90, tests/triton_aot.py; not timed on a GPU).
    fp64 = scores.dtype == torch.float64
    tile = min(MAX_TILE_ELEMENTS, FORWARD_COMPARE_ELEMENTS >> DIGIT_BITS) >> fp64
    block_t, block_c = _tiles(T, C, tile)
    grid = (B * triton.cdiv(C, block_c),)
    _check_programs(grid[0], scores)
    acc = torch.float64 if scores.dtype == torch.float64 else torch.float32
    out = torch.empty((B, C), dtype=acc, device=scores.device)
    kth = torch.empty((B, C), dtype=torch.int64, device=scores.device)
    cut = torch.empty((B, C), dtype=torch.int64, device=scores.device)
    if B * C == 0:
        return out.to(scores.dtype), kth, cut
    with device_guard(scores):
        _topk_mil_pool_forward_kernel[grid](
            scores,
            k.contiguous(),
            lengths.contiguous(),
            out,
            kth,
            cut,
            T,
            C,
            scores.stride(0),
            scores.stride(1),
            scores.stride(2),
            LARGEST=largest,
            IS_FP64=scores.dtype == torch.float64,
            BLOCK_T=block_t,
            BLOCK_C=block_c,
            ONE_TILE=T <= block_t,
            DIGIT_BITS=DIGIT_BITS,
            num_warps=NUM_WARPS * (2 if fp64 else 1),
        )
    # Rounded to the dtype of scores here, by torch: round-to-nearest-even on every
    # device (Triton's interpreter truncates when it narrows to bf16).
    return out.to(scores.dtype), kth, cut


def topk_mil_pool_backward(grad_out, scores, k, lengths, kth_key, cut, largest):
    """Launches the backward: the gradient of scores, [B, T, C] contiguous."""
    B, T, C = scores.shape
    _check_time_steps(T)
    block_t, block_c = _tiles(T, C, MAX_TILE_ELEMENTS)
    grid = (B * triton.cdiv(C, block_c) * triton.cdiv(T, block_t),)
    _check_programs(grid[0], scores)
    grad = torch.empty((B, T, C), dtype=scores.dtype, device=scores.device)
    if grad.numel() == 0:
        return grad
    # What each selected score receives, rounded as autograd rounds the mean's
    # backward (grad / k in the accumulator type, then the dtype of scores): one
    # tiny [B, C] op, and the kernel is a pure select.
    acc = torch.float64 if scores.dtype == torch.float64 else torch.float32
    g = (grad_out.to(acc) / k.to(acc)[:, None]).to(scores.dtype).contiguous()
    with device_guard(scores):
        _topk_mil_pool_backward_kernel[grid](
            g,
            scores,
            k.contiguous(),
            lengths.contiguous(),
            kth_key.contiguous(),
            cut.contiguous(),
            grad,
            T,
            C,
            scores.stride(0),
            scores.stride(1),
            scores.stride(2),
            LARGEST=largest,
            IS_FP64=scores.dtype == torch.float64,
            BLOCK_T=block_t,
            BLOCK_C=block_c,
            num_warps=NUM_WARPS,
        )
    return grad
