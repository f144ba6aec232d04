"""Triton kernels of temporal_nms and soft_temporal_nms.

Hard NMS: ``_temporal_nms_mask_kernel`` computes the 64-bit suppression tiles of
segments sorted by (group, visit order), in the layout of the CUDA kernel
(csrc/cuda/temporal_nms_kernel.cu): ``mask[i, k]`` holds the columns of tile
``i // 64 + k``. The sequential keep-gather is the compiled op
``mmsd_ext::_temporal_nms_gather`` (CUDA, or C++ for CPU tensors under the
interpreter), shared with the CUDA backend.

Soft-NMS: ``_soft_temporal_nms_kernel`` runs the whole selection-and-decay loop,
one program per 64 sorted positions, each handling the groups that start there
(the algorithm of csrc/cuda/soft_temporal_nms_kernel.cu, in chunks of BLOCK).

All overlap arithmetic is float64, in the operation order of the Python reference,
so decisions at the threshold agree bit for bit with it. Float scalars travel in a
float64 tensor: Triton passes Python floats as float32.
"""

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.runtime.jit import JITFunction

from ._device import device_guard

# Rows and columns of one suppression tile: the bits of one int64 word.
TILE = 64
# Warps per 64 x 64 suppression tile of float64 overlaps: 16 a thread. From ptxas's
# register counts for sm_90 (tests/triton_aot.py), not timed on a GPU: with 4 warps
# the IoU tile needs 255 registers a thread and spills 280 bytes, with 8 at most 148.
MASK_NUM_WARPS = 8
# Segments per chunk of the soft-NMS loops (a power of two) and warps per program:
# 4 float64 values a thread and per array. Not yet timed on a GPU; chosen from
# ptxas's register counts for sm_90 (tests/triton_aot.py): 1024 lanes over 8 warps
# spill with triton 3.6, 512 over 4 spill with neither 3.6 nor 3.8. Groups of up to
# 512 segments are one chunk; larger ones loop.
SOFT_BLOCK = 512
SOFT_NUM_WARPS = 4


@triton.jit
def _segment_overlap(a_start, a_end, b_start, b_end, offset, KIND: tl.constexpr):
    # Overlap of candidate b with kept segment a; KIND 0: IoU, 1: over b's length.
    lo = tl.maximum(a_start, b_start)
    hi = tl.minimum(a_end, b_end)
    inter = hi - lo + offset
    inter = tl.where(inter > 0.0, inter, 0.0)
    len_b = b_end - b_start + offset
    if KIND == 1:
        den = len_b
    else:
        den = (a_end - a_start + offset) + len_b - inter
    safe = tl.where(den > 0.0, den, 1.0)
    return tl.where(den > 0.0, inter / safe, 0.0)


@triton.jit
def _temporal_nms_mask_kernel(
    seg_ptr,  # float64 [n, 2] segments sorted by (group, visit order), contiguous
    grp_ptr,  # int64 [n] their non-decreasing group ids (unused without HAS_GROUPS)
    params_ptr,  # float64 [2]: iou_threshold, offset
    mask_ptr,  # int64 [n, W] out: suppression tiles (tiles no row needs are left unwritten)
    n,  # number of segments
    W,  # tiles per mask row (the band width)
    KIND: tl.constexpr,  # 0: "iou", 1: "other"
    HAS_GROUPS: tl.constexpr,  # whether grp_ptr holds groups (else one group)
    TILE: tl.constexpr,  # 64: rows and columns of a tile
):
    r = tl.program_id(0)  # row tile
    k = tl.program_id(1)  # column tile r + k
    row0 = r * TILE
    col0 = (r + k) * TILE
    needed = col0 < n
    if HAS_GROUPS:
        last_row = tl.minimum(row0 + TILE, n) - 1
        first_col = tl.minimum(col0, n - 1)
        needed = needed & (tl.load(grp_ptr + last_row) >= tl.load(grp_ptr + first_col))
    if needed:
        threshold = tl.load(params_ptr)
        offset = tl.load(params_ptr + 1)
        rows = row0 + tl.arange(0, TILE)
        cols = col0 + tl.arange(0, TILE)
        row_ok = rows < n
        col_ok = cols < n
        rs = tl.load(seg_ptr + 2 * rows, mask=row_ok, other=0.0)
        re = tl.load(seg_ptr + 2 * rows + 1, mask=row_ok, other=0.0)
        cs = tl.load(seg_ptr + 2 * cols, mask=col_ok, other=0.0)
        ce = tl.load(seg_ptr + 2 * cols + 1, mask=col_ok, other=0.0)
        ov = _segment_overlap(rs[:, None], re[:, None], cs[None, :], ce[None, :], offset, KIND)
        hit = (ov > threshold) & (cols[None, :] > rows[:, None]) & col_ok[None, :]
        if HAS_GROUPS:
            rg = tl.load(grp_ptr + rows, mask=row_ok, other=-1)
            cg = tl.load(grp_ptr + cols, mask=col_ok, other=-2)
            hit = hit & (rg[:, None] == cg[None, :])
        # Distinct powers of two: their int64 sum is their OR (bit 63 wraps to the sign).
        one = tl.full([TILE], 1, tl.int64)
        bit = one << tl.arange(0, TILE).to(tl.int64)
        words = tl.sum(tl.where(hit, bit[None, :], 0), axis=1)
        tl.store(mask_ptr + rows.to(tl.int64) * W + k, words, mask=row_ok)


def _float64_params(like, *values):
    """The float parameters as a float64 tensor on like's device (Triton passes Python
    floats as float32). Filled element by element with fill_, a kernel taking the value
    as an argument. new_tensor([...]) and params[i] = value (a copy_ from a CPU scalar
    tensor) would copy from pageable host memory and wait for the stream."""
    params = like.new_empty(len(values), dtype=torch.float64)
    for i, value in enumerate(values):
        params[i].fill_(value)
    return params


def temporal_nms_mask(seg_sorted, groups_sorted, iou_threshold, kind, offset, width):
    """Suppression tiles [n, width] (int64) of float64 segments sorted by (group, visit order)."""
    n = seg_sorted.shape[0]
    mask = seg_sorted.new_empty((n, width), dtype=torch.int64)
    params = _float64_params(seg_sorted, iou_threshold, offset)
    grid = (triton.cdiv(n, TILE), width)
    with device_guard(seg_sorted):
        _temporal_nms_mask_kernel[grid](
            seg_sorted,
            groups_sorted if groups_sorted is not None else mask,
            params,
            mask,
            n,
            width,
            KIND=kind,
            HAS_GROUPS=groups_sorted is not None,
            TILE=TILE,
            num_warps=MASK_NUM_WARPS,
        )
    return mask


@triton.jit
def _soft_temporal_nms_kernel(
    seg_ptr,  # float64 [n, 2] segments sorted by group, contiguous
    orig_ptr,  # int64 [n] original index of each sorted position
    cur_ptr,  # float64 [n] in: scores; scratch: current scores
    alive_ptr,  # int8 [n] in: score >= min_score; scratch: live flags
    is_start_ptr,  # int8 [n] 1 where a group starts
    end_ptr,  # int64 [n] end of the group that starts here
    params_ptr,  # float64 [4]: sigma, iou_threshold, min_score, offset
    out_index_ptr,  # int64 [n] out, slot gs + step: selected original index
    out_score_ptr,  # float64 [n] out: its score at selection
    out_run_score_ptr,  # float64 [n] out: score of its run's start
    out_run_index_ptr,  # int64 [n] out: index of its run's start
    count_ptr,  # int64 [n] out, at gs: number of selections of the group
    n,  # number of segments
    GAUSSIAN: tl.constexpr,  # gaussian decay (else linear)
    LIBDEVICE_EXP: tl.constexpr,  # float64 exp via libdevice when compiled; tl.exp under the interpreter
    TILE: tl.constexpr,  # sorted positions per program
    BLOCK: tl.constexpr,  # segments per chunk
):
    pid = tl.program_id(0)
    sigma = tl.load(params_ptr)
    threshold = tl.load(params_ptr + 1)
    min_score = tl.load(params_ptr + 2)
    offset = tl.load(params_ptr + 3)
    big = 9223372036854775807
    lanes = tl.arange(0, BLOCK)
    for t in range(TILE):
        gs = pid.to(tl.int64) * TILE + t
        starts_here = tl.load(is_start_ptr + gs, mask=gs < n, other=0) != 0
        if starts_here:
            ge = tl.load(end_ptr + gs)
            # First argmax over the live segments of the group.
            best_s = tl.full([], 0.0, tl.float64)
            best_i = tl.full([], big, tl.int64)
            best_p = gs
            for c in range(gs, ge, BLOCK):
                q = c + lanes
                ok = q < ge
                live = ok & (tl.load(alive_ptr + q, mask=ok, other=0) != 0)
                s = tl.load(cur_ptr + q, mask=live, other=0.0)
                oi = tl.load(orig_ptr + q, mask=live, other=big)
                best_s, best_i, best_p = _merge_best(s, oi, q, live, best_s, best_i, best_p, big)
            step = 0
            run_s = tl.full([], 0.0, tl.float64)
            run_i = tl.full([], big, tl.int64)
            while best_i != big:
                new_run = (run_i == big) | (best_s < run_s) | ((best_s == run_s) & (best_i > run_i))
                run_s = tl.where(new_run, best_s, run_s)
                run_i = tl.where(new_run, best_i, run_i)
                tl.store(out_index_ptr + gs + step, best_i)
                # The selected segment's own score, not the chunk maximum it equals, which
                # may be the other zero (tl.max of -0.0 and +0.0).
                tl.store(out_score_ptr + gs + step, tl.load(cur_ptr + best_p))
                tl.store(out_run_score_ptr + gs + step, run_s)
                tl.store(out_run_index_ptr + gs + step, run_i)
                step += 1
                bs = tl.load(seg_ptr + 2 * best_p)
                be = tl.load(seg_ptr + 2 * best_p + 1)
                sel_p = best_p
                # The decay pass below stores cur[sel_p] from the lane that owns it: every
                # warp must have read the selected score above first.
                tl.debug_barrier()
                # Decay, and in the same pass the next argmax.
                best_s = tl.full([], 0.0, tl.float64)
                best_i = tl.full([], big, tl.int64)
                best_p = gs
                for c in range(gs, ge, BLOCK):
                    q = c + lanes
                    ok = q < ge
                    live = ok & (tl.load(alive_ptr + q, mask=ok, other=0) != 0)
                    s = tl.load(cur_ptr + q, mask=live, other=0.0)
                    qs = tl.load(seg_ptr + 2 * q, mask=live, other=0.0)
                    qe = tl.load(seg_ptr + 2 * q + 1, mask=live, other=0.0)
                    iou = _segment_overlap(bs, be, qs, qe, offset, 0)
                    if GAUSSIAN:
                        if LIBDEVICE_EXP:
                            s = s * libdevice.exp(-(iou * iou) / sigma)
                        else:
                            s = s * tl.exp(-(iou * iou) / sigma)
                    else:
                        s = tl.where(iou > threshold, s * (1.0 - iou), s)
                    survive = live & (s >= min_score) & (q != sel_p)
                    tl.store(cur_ptr + q, s, mask=live)
                    tl.store(alive_ptr + q, survive.to(tl.int8), mask=live)
                    oi = tl.load(orig_ptr + q, mask=survive, other=big)
                    best_s, best_i, best_p = _merge_best(s, oi, q, survive, best_s, best_i, best_p, big)
                # Each element is loaded and stored by the lane that owns it, and the
                # barrier orders this pass's stores before the next pass's loads.
                tl.debug_barrier()
            tl.store(count_ptr + gs, step)


@triton.jit
def _merge_best(s, oi, q, valid, best_s, best_i, best_p, big):
    # Best of a chunk by (score desc, original index asc), merged into the running best.
    chunk_max = tl.max(tl.where(valid, s, -float("inf")), axis=0)
    cand = valid & (s == chunk_max)
    chunk_i = tl.min(tl.where(cand, oi, big), axis=0)
    chunk_p = tl.min(tl.where(cand & (oi == chunk_i), q, big), axis=0)
    take = (chunk_i != big) & ((best_i == big) | (chunk_max > best_s) | ((chunk_max == best_s) & (chunk_i < best_i)))
    return (
        tl.where(take, chunk_max, best_s),
        tl.where(take, chunk_i, best_i),
        tl.where(take, chunk_p, best_p),
    )


def soft_temporal_nms_select(seg_sorted, orig, cur, alive, is_start, end_of, gaussian, sigma, iou_threshold, min_score, offset):
    """Runs the per-group selection; returns (index, score, run_score, run_index, count) slot arrays."""
    n = seg_sorted.shape[0]
    out_index = orig.new_zeros(n)
    out_score = cur.new_zeros(n)
    out_run_score = cur.new_zeros(n)
    out_run_index = orig.new_zeros(n)
    count = orig.new_zeros(n)
    params = _float64_params(cur, sigma, iou_threshold, min_score, offset)
    with device_guard(seg_sorted):
        _soft_temporal_nms_kernel[(triton.cdiv(n, TILE),)](
            seg_sorted,
            orig,
            cur,
            alive,
            is_start,
            end_of,
            params,
            out_index,
            out_score,
            out_run_score,
            out_run_index,
            count,
            n,
            GAUSSIAN=gaussian,
            LIBDEVICE_EXP=isinstance(_soft_temporal_nms_kernel, JITFunction),
            TILE=TILE,
            BLOCK=SOFT_BLOCK,
            num_warps=SOFT_NUM_WARPS,
        )
    return out_index, out_score, out_run_score, out_run_index, count
