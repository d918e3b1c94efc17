"""Stick-breaking attention: Triton forward and deterministic backward (Tan et al., 2024, arXiv 2410.17980).

Math (query i, key j, scale s, natural log unless stated)::

    z_ij   = s * q_i . k_j,     beta_ij = sigmoid(z_ij)
    A_ij   = beta_ij * prod_{j < l < i, l visible} (1 - beta_il)      (nearest key breaks the stick first)
    o_i    = sum_j A_ij v_j,    rem_i = prod_{j visible} (1 - beta_ij)
    log A_ij = z_ij + sum_{l >= j, l visible} -softplus(z_il)           (one inclusive reverse cumsum)

Backward (g is dL/dlog A; the -drem term comes from rem = 1 - sum_j A_ij)::

    g_ij  = A_ij * (do_i . v_j - drem_i)
    dz_ij = g_ij - beta_ij * sum_{l <= j} g_il                          (inclusive cumsum over FARTHER keys)
    dq = s * dz @ k,   dk = s * dz^T @ q,   dv = A^T @ do

Visibility: query i sits at key position K - Q + i (decode / chunked prefill over a cache); key j is visible iff
j < K - Q + i (or <= with ``attend_current``) and ``attention_mask`` allows it. Masked keys do not break the stick
(their -softplus term is 0). A row without visible keys gets o = 0, rem = 1.

Kernels (all arithmetic in fp32, logs in base 2 so the hardware exp2/log2 are used; ``scale2 = s * log2(e)``; the
per-block log math, softplus without cutoff included, is ``common._log2_stick_block``, shared with ``decoding.py``):

* ``_sb_fwd_kernel``: one program per (query block, head). Visits key blocks nearest-first, fusing
  q@k^T, softplus, the in-block reverse cumsum (``tl.cumsum`` in fp32, not the official bf16 triangular matmul,
  which loses ~10% of a weight at saturated logits), exp2 and p@v. It stores o, rem and, per (row, key block),
  the fp32 log-stick left by the nearer blocks (``snap``): the backward reads it instead of re-deriving it by
  subtracting from a total, which would cancel catastrophically.
* ``_sb_bwd_dq_kernel``: same grid, visits key blocks farthest-first so the running sum of g over farther keys
  is built without subtraction; accumulates dq in registers and stores that running sum per key block (``gsnap``).
* ``_sb_bwd_dkv_kernel``: one program per (key block, kv head) loops over the query blocks (and the HQ/H query
  heads of its GQA group) that see it, using ``snap``/``gsnap``. No atomics and no locks, so it is deterministic.

The host side picks blocks, wraps the kernels in ``torch.library`` custom ops (``hf_attn_variants::sb_parallel_fwd``,
``hf_attn_variants::sb_parallel_bwd``) and ties them together with ``ParallelStickbreakingAttnFunction``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import decoding
from .common import (
    IS_INTERPRET, LOG2E, _check_inputs, _launch_meta, _log2_stick_block, _mask_args, _pow2, _resolve_scale,
)

# Tests set this to (BLOCK_M, BLOCK_N) to force several blocks on tiny inputs; None = automatic choice.
_FORCE_BLOCKS: Optional[tuple[int, int]] = None
# `parallel_stickbreaking_attn` routes to the split-K decode kernel for at most this many queries ...
_DECODE_MAX_QUERIES = 16
# ... over at least this many keys, when no gradient is needed.
_DECODE_MIN_KEYS = 512


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _sequence_bounds(cu_seqlens, i_n, Q, K, IS_VARLEN: tl.constexpr):
    """(batch index, first token, query length, key length) of sequence i_n: a packed varlen segment or a batch row."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        # i_n * 0 rather than 0: a tensor, so .to(tl.int64) works even when HQ is specialised to 1
        return i_n * 0, bos, eos - bos, eos - bos
    else:
        return i_n, 0, Q, K


@triton.jit
def _sb_fwd_kernel(
    q, k, v, o, rem, snap, mask, cu_seqlens,
    scale2,
    sq_b, sq_h, sq_t, sq_d,
    sk_b, sk_h, sk_t, sk_d,
    sv_b, sv_h, sv_t, sv_d,
    sm_b, sm_h, sm_q, sm_k,
    Q, K, HQ, NKB,
    G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ATTEND_CURRENT: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_nh = tl.program_id(1)
    i_n = i_nh // HQ
    i_hq = i_nh % HQ
    i_h = i_hq // G
    i_b, bos, Qn, Kn = _sequence_bounds(cu_seqlens, i_n, Q, K, IS_VARLEN)
    if i_m * BLOCK_M >= Qn:
        return

    rows = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Qn
    # exclusive upper bound of the visible keys of each row (query i sits at key position Kn - Qn + i)
    lim = Kn - Qn + rows + (1 if ATTEND_CURRENT else 0)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)

    q_base = q + i_b * sq_b + i_hq * sq_h + bos * sq_t
    k_base = k + i_b * sk_b + i_h * sk_h + bos * sk_t
    v_base = v + i_b * sv_b + i_h * sv_h + bos * sv_t
    bq = tl.load(q_base + rows[:, None] * sq_t + offs_d[None, :] * sq_d,
                 mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    if UPCAST:  # the interpreter cannot do bf16 arithmetic; fp32 inputs make this a no-op
        bq = bq.to(tl.float32)

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    log_rem = tl.zeros([BLOCK_M], dtype=tl.float32)  # log2 of the stick left by the nearer keys (<= 0)
    snap_row = (i_b * HQ + i_hq).to(tl.int64) * Q * NKB + (bos + rows) * NKB

    # keys needed by this block: up to the largest lim among its valid rows
    hi = tl.minimum(Kn, Kn - Qn + tl.minimum((i_m + 1) * BLOCK_M, Qn) - 1 + (1 if ATTEND_CURRENT else 0))
    n_blocks = tl.cdiv(hi, BLOCK_N)
    for it in range(0, n_blocks):
        i_kb = n_blocks - 1 - it  # nearest block first: the stick is broken from the query backwards
        cols = i_kb * BLOCK_N + offs_n
        col_ok = cols < Kn
        bkt = tl.load(k_base + cols[None, :] * sk_t + offs_d[:, None] * sk_d,
                      mask=col_ok[None, :] & (offs_d[:, None] < D), other=0.0)
        bv = tl.load(v_base + cols[:, None] * sv_t + offs_dv[None, :] * sv_d,
                     mask=col_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        if UPCAST:
            bkt = bkt.to(tl.float32)
            bv = bv.to(tl.float32)
        z2 = tl.dot(bq, bkt, input_precision=DOT_PRECISION) * scale2
        vis = (cols[None, :] < lim[:, None]) & col_ok[None, :] & row_ok[:, None]
        if HAS_MASK:
            bm = tl.load(mask + i_b * sm_b + i_hq * sm_h + rows[:, None] * sm_q + cols[None, :] * sm_k,
                         mask=row_ok[:, None] & col_ok[None, :], other=0)
            vis = vis & (bm != 0)
        # lomb = log2(1 - beta), 0 for masked keys: they do not break the stick
        log_p, _, lomb = _log2_stick_block(z2, vis, log_rem)
        tl.store(snap + snap_row + i_kb, log_rem, mask=row_ok)
        p = tl.where(vis, tl.exp2(log_p), 0.0)  # log_p <= 0: no running max needed, unlike softmax
        acc += tl.dot(p.to(bv.dtype), bv, input_precision=DOT_PRECISION)
        log_rem += tl.sum(lomb, axis=1)

    o_ptrs = o + (i_b * HQ + i_hq).to(tl.int64) * Q * DV + (bos + rows)[:, None] * DV + offs_dv[None, :]
    tl.store(o_ptrs, acc.to(o.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    r_ptrs = rem + (i_b * HQ + i_hq).to(tl.int64) * Q + bos + rows
    tl.store(r_ptrs, tl.exp2(log_rem).to(rem.dtype.element_ty), mask=row_ok)


@triton.jit
def _sb_bwd_dq_kernel(
    q, k, v, do, drem, snap, gsnap, dq, mask, cu_seqlens,
    scale, scale2,
    sq_b, sq_h, sq_t, sq_d,
    sk_b, sk_h, sk_t, sk_d,
    sv_b, sv_h, sv_t, sv_d,
    sm_b, sm_h, sm_q, sm_k,
    Q, K, HQ, NKB,
    G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ATTEND_CURRENT: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_nh = tl.program_id(1)
    i_n = i_nh // HQ
    i_hq = i_nh % HQ
    i_h = i_hq // G
    i_b, bos, Qn, Kn = _sequence_bounds(cu_seqlens, i_n, Q, K, IS_VARLEN)
    if i_m * BLOCK_M >= Qn:
        return

    rows = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Qn
    lim = Kn - Qn + rows + (1 if ATTEND_CURRENT else 0)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)

    q_base = q + i_b * sq_b + i_hq * sq_h + bos * sq_t
    k_base = k + i_b * sk_b + i_h * sk_h + bos * sk_t
    v_base = v + i_b * sv_b + i_h * sv_h + bos * sv_t
    bh = (i_b * HQ + i_hq).to(tl.int64)
    bq = tl.load(q_base + rows[:, None] * sq_t + offs_d[None, :] * sq_d,
                 mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    # do / dq / drem are contiguous (B, HQ, Q, .) buffers made by the launcher
    bdo = tl.load(do + bh * Q * DV + (bos + rows)[:, None] * DV + offs_dv[None, :],
                  mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    bdrem = tl.load(drem + bh * Q + bos + rows, mask=row_ok, other=0.0).to(tl.float32)
    if UPCAST:
        bq = bq.to(tl.float32)
        bdo = bdo.to(tl.float32)

    acc_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    g_far = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum of g over the keys farther than the current block
    snap_row = bh * Q * NKB + (bos + rows) * NKB

    hi = tl.minimum(Kn, Kn - Qn + tl.minimum((i_m + 1) * BLOCK_M, Qn) - 1 + (1 if ATTEND_CURRENT else 0))
    n_blocks = tl.cdiv(hi, BLOCK_N)
    for i_kb in range(0, n_blocks):  # farthest block first, so g_far is a plain running sum
        cols = i_kb * BLOCK_N + offs_n
        col_ok = cols < Kn
        bk = tl.load(k_base + cols[:, None] * sk_t + offs_d[None, :] * sk_d,
                     mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        bvt = tl.load(v_base + cols[None, :] * sv_t + offs_dv[:, None] * sv_d,
                      mask=col_ok[None, :] & (offs_dv[:, None] < DV), other=0.0)
        if UPCAST:
            bk = bk.to(tl.float32)
            bvt = bvt.to(tl.float32)
        z2 = tl.dot(bq, tl.trans(bk), input_precision=DOT_PRECISION) * scale2
        vis = (cols[None, :] < lim[:, None]) & col_ok[None, :] & row_ok[:, None]
        if HAS_MASK:
            bm = tl.load(mask + i_b * sm_b + i_hq * sm_h + rows[:, None] * sm_q + cols[None, :] * sm_k,
                         mask=row_ok[:, None] & col_ok[None, :], other=0)
            vis = vis & (bm != 0)
        log_near = tl.load(snap + snap_row + i_kb, mask=row_ok, other=0.0)
        log_a, log_beta, _ = _log2_stick_block(z2, vis, log_near)
        a = tl.where(vis, tl.exp2(log_a), 0.0)
        beta = tl.where(vis, tl.exp2(log_beta), 0.0)
        dp = tl.dot(bdo, bvt, input_precision=DOT_PRECISION)
        g = a * (dp - bdrem[:, None])
        tl.store(gsnap + snap_row + i_kb, g_far, mask=row_ok)
        # where(), not a product: rows that see nothing may carry garbage snapshots
        dz = tl.where(vis, g - beta * (g_far[:, None] + tl.cumsum(g, axis=1)), 0.0)
        acc_dq += tl.dot(dz.to(bk.dtype), bk, input_precision=DOT_PRECISION)
        g_far += tl.sum(g, axis=1)

    acc_dq = acc_dq * scale
    tl.store(dq + bh * Q * D + (bos + rows)[:, None] * D + offs_d[None, :], acc_dq.to(dq.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _sb_bwd_dkv_kernel(
    q, k, v, do, drem, snap, gsnap, dk, dv, mask, cu_seqlens,
    scale, scale2,
    sq_b, sq_h, sq_t, sq_d,
    sk_b, sk_h, sk_t, sk_d,
    sv_b, sv_h, sv_t, sv_d,
    sm_b, sm_h, sm_q, sm_k,
    Q, K, H, NKB,
    G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ATTEND_CURRENT: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    i_kb = tl.program_id(0)
    i_nh = tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    HQ = H * G
    i_b, bos, Qn, Kn = _sequence_bounds(cu_seqlens, i_n, Q, K, IS_VARLEN)
    if i_kb * BLOCK_N >= Kn:
        return

    cols = i_kb * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < Kn
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_m = tl.arange(0, BLOCK_M)

    bk = tl.load(k + i_b * sk_b + i_h * sk_h + (bos + cols)[:, None] * sk_t + offs_d[None, :] * sk_d,
                 mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    bv = tl.load(v + i_b * sv_b + i_h * sv_h + (bos + cols)[:, None] * sv_t + offs_dv[None, :] * sv_d,
                 mask=col_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    if UPCAST:
        bk = bk.to(tl.float32)
        bv = bv.to(tl.float32)
    acc_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    acc_dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    # first query that sees key i_kb*BLOCK_N: Kn - Qn + i + ATTEND_CURRENT > i_kb*BLOCK_N
    q_lo = tl.maximum(i_kb * BLOCK_N - Kn + Qn + 1 - (1 if ATTEND_CURRENT else 0), 0)
    m_lo = q_lo // BLOCK_M
    m_hi = tl.cdiv(Qn, BLOCK_M)
    for i_g in range(0, G):  # the query heads of this GQA group accumulate into one dk/dv: no atomics needed
        i_hq = i_h * G + i_g
        bh = (i_b * HQ + i_hq).to(tl.int64)
        q_base = q + i_b * sq_b + i_hq * sq_h + bos * sq_t
        for i_m in range(m_lo, m_hi):
            rows = i_m * BLOCK_M + offs_m
            row_ok = rows < Qn
            lim = Kn - Qn + rows + (1 if ATTEND_CURRENT else 0)
            bq = tl.load(q_base + rows[:, None] * sq_t + offs_d[None, :] * sq_d,
                         mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
            bdo = tl.load(do + bh * Q * DV + (bos + rows)[:, None] * DV + offs_dv[None, :],
                          mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
            bdrem = tl.load(drem + bh * Q + bos + rows, mask=row_ok, other=0.0).to(tl.float32)
            if UPCAST:
                bq = bq.to(tl.float32)
                bdo = bdo.to(tl.float32)
            snap_row = bh * Q * NKB + (bos + rows) * NKB + i_kb
            log_near = tl.load(snap + snap_row, mask=row_ok, other=0.0)
            g_far = tl.load(gsnap + snap_row, mask=row_ok, other=0.0)

            z2 = tl.dot(bq, tl.trans(bk), input_precision=DOT_PRECISION) * scale2
            vis = (cols[None, :] < lim[:, None]) & col_ok[None, :] & row_ok[:, None]
            if HAS_MASK:
                bm = tl.load(mask + i_b * sm_b + i_hq * sm_h + rows[:, None] * sm_q + cols[None, :] * sm_k,
                             mask=row_ok[:, None] & col_ok[None, :], other=0)
                vis = vis & (bm != 0)
            log_a, log_beta, _ = _log2_stick_block(z2, vis, log_near)
            a = tl.where(vis, tl.exp2(log_a), 0.0)
            beta = tl.where(vis, tl.exp2(log_beta), 0.0)
            dp = tl.dot(bdo, tl.trans(bv), input_precision=DOT_PRECISION)
            g = a * (dp - bdrem[:, None])
            dz = tl.where(vis, g - beta * (g_far[:, None] + tl.cumsum(g, axis=1)), 0.0)
            acc_dv += tl.dot(tl.trans(a).to(bdo.dtype), bdo, input_precision=DOT_PRECISION)
            acc_dk += tl.dot(tl.trans(dz).to(bq.dtype), bq, input_precision=DOT_PRECISION)

    acc_dk = acc_dk * scale
    kv_bh = (i_b * H + i_h).to(tl.int64)
    tl.store(dk + kv_bh * K * D + (bos + cols)[:, None] * D + offs_d[None, :], acc_dk.to(dk.dtype.element_ty),
             mask=col_ok[:, None] & (offs_d[None, :] < D))
    tl.store(dv + kv_bh * K * DV + (bos + cols)[:, None] * DV + offs_dv[None, :], acc_dv.to(dv.dtype.element_ty),
             mask=col_ok[:, None] & (offs_dv[None, :] < DV))


# ---------------------------------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------------------------------


def _pick_blocks(max_q: int, max_k: int, d: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) shared by forward and backward (the snapshots are indexed by key block)."""
    if _FORCE_BLOCKS is not None:
        return _FORCE_BLOCKS
    if IS_INTERPRET:
        # the interpreter costs ~0.5 ms per tl op per program: one big block is fastest
        return min(_pow2(max_q), 128), min(_pow2(max_k), 128)
    # GPU: chosen from ptxas register/spill reports for sm_90 (compiled here without a GPU; never timed).
    # 64x32 tiles with 8 warps compile without spills for D <= 128 in all three kernels; 64x64 spills in the
    # backward (the fp32 score tile, its cumsum and the masks are all live at once). D = 256 spills least at 32x32.
    return (64, 32) if d <= 128 else (32, 32)


def _seq_meta(q, k, cu_seqlens, max_seqlen):
    B, HQ, Qtot, _ = q.shape
    Ktot = k.shape[2]
    if cu_seqlens is None:
        return B, Qtot, Ktot
    return cu_seqlens.numel() - 1, max_seqlen, max_seqlen


def sb_parallel_fwd_impl(q, k, v, attention_mask, cu_seqlens, scale, attend_current, max_seqlen, block_m, block_n):
    B, HQ, Qtot, D = q.shape
    H, Ktot, DV = k.shape[1], k.shape[2], v.shape[-1]
    n_seq, max_q, max_k = _seq_meta(q, k, cu_seqlens, max_seqlen)
    nkb = triton.cdiv(max_k, block_n)
    o = torch.empty(B, HQ, Qtot, DV, dtype=q.dtype, device=q.device)
    rem = torch.empty(B, HQ, Qtot, dtype=q.dtype, device=q.device)
    snap = torch.empty(B, HQ, Qtot, nkb, dtype=torch.float32, device=q.device)
    m, sm = _mask_args(attention_mask, (B, HQ, Qtot, Ktot), q.device)
    cu = cu_seqlens if cu_seqlens is not None else torch.empty(1, dtype=torch.int32, device=q.device)
    grid = (triton.cdiv(max_q, block_m), n_seq * HQ)
    _sb_fwd_kernel[grid](
        q, k, v, o, rem, snap, m, cu,
        scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *sm,
        Qtot, Ktot, HQ, nkb,
        G=HQ // H, D=D, DV=DV, BLOCK_M=block_m, BLOCK_N=block_n,
        ATTEND_CURRENT=attend_current, IS_VARLEN=cu_seqlens is not None, HAS_MASK=attention_mask is not None,
        **_launch_meta(q, D, DV, block_m),
    )
    return o, rem, snap


def sb_parallel_bwd_impl(do, drem, q, k, v, snap, attention_mask, cu_seqlens, scale, attend_current, max_seqlen,
                         block_m, block_n):
    B, HQ, Qtot, D = q.shape
    H, Ktot, DV = k.shape[1], k.shape[2], v.shape[-1]
    n_seq, max_q, max_k = _seq_meta(q, k, cu_seqlens, max_seqlen)
    nkb = snap.shape[-1]
    do = do.contiguous()
    drem = drem.contiguous()
    gsnap = torch.empty_like(snap)
    dq = torch.empty(B, HQ, Qtot, D, dtype=q.dtype, device=q.device)
    dk = torch.empty(B, H, Ktot, D, dtype=k.dtype, device=k.device)
    dv = torch.empty(B, H, Ktot, DV, dtype=v.dtype, device=v.device)
    m, sm = _mask_args(attention_mask, (B, HQ, Qtot, Ktot), q.device)
    cu = cu_seqlens if cu_seqlens is not None else torch.empty(1, dtype=torch.int32, device=q.device)
    common = dict(
        G=HQ // H, D=D, DV=DV, BLOCK_M=block_m, BLOCK_N=block_n,
        ATTEND_CURRENT=attend_current, IS_VARLEN=cu_seqlens is not None, HAS_MASK=attention_mask is not None,
        **_launch_meta(q, D, DV, block_m),
    )
    strides = (*q.stride(), *k.stride(), *v.stride(), *sm)
    # dq first: it writes gsnap, which the dk/dv kernel reads
    _sb_bwd_dq_kernel[(triton.cdiv(max_q, block_m), n_seq * HQ)](
        q, k, v, do, drem, snap, gsnap, dq, m, cu, scale, scale * LOG2E, *strides, Qtot, Ktot, HQ, nkb, **common
    )
    _sb_bwd_dkv_kernel[(triton.cdiv(max_k, block_n), n_seq * H)](
        q, k, v, do, drem, snap, gsnap, dk, dv, m, cu, scale, scale * LOG2E, *strides, Qtot, Ktot, H, nkb, **common
    )
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------------------
# torch.library custom ops
# ---------------------------------------------------------------------------------------------------------------
# torch.library.custom_op rather than triton_op: the ops are opaque to torch.compile, so the host code (block
# choice from the interpreter flag, cu_seqlens metadata) never has to be traced, and the same registration works
# under TRITON_INTERPRET on CPU and on GPU. Autograd is wired by ParallelStickbreakingAttnFunction below, which
# torch.compile traces, calling these two ops.


@torch.library.custom_op("hf_attn_variants::sb_parallel_fwd", mutates_args=())
def sb_parallel_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor], scale: float, attend_current: bool, max_seqlen: int, block_m: int,
    block_n: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return sb_parallel_fwd_impl(q, k, v, attention_mask, cu_seqlens, scale, attend_current, max_seqlen,
                                block_m, block_n)


@sb_parallel_fwd.register_fake
def _(q, k, v, attention_mask, cu_seqlens, scale, attend_current, max_seqlen, block_m, block_n):
    B, HQ, Qtot, _ = q.shape
    max_k = k.shape[2] if cu_seqlens is None else max_seqlen
    return (q.new_empty(B, HQ, Qtot, v.shape[-1]), q.new_empty(B, HQ, Qtot),
            q.new_empty(B, HQ, Qtot, triton.cdiv(max_k, block_n), dtype=torch.float32))


@torch.library.custom_op("hf_attn_variants::sb_parallel_bwd", mutates_args=())
def sb_parallel_bwd(
    do: torch.Tensor, drem: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, snap: torch.Tensor,
    attention_mask: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], scale: float, attend_current: bool,
    max_seqlen: int, block_m: int, block_n: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return sb_parallel_bwd_impl(do, drem, q, k, v, snap, attention_mask, cu_seqlens, scale, attend_current,
                                max_seqlen, block_m, block_n)


@sb_parallel_bwd.register_fake
def _(do, drem, q, k, v, snap, attention_mask, cu_seqlens, scale, attend_current, max_seqlen, block_m, block_n):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


class ParallelStickbreakingAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, attention_mask, cu_seqlens, scale, attend_current, max_seqlen, block_m, block_n):
        o, rem, snap = torch.ops.hf_attn_variants.sb_parallel_fwd(
            q, k, v, attention_mask, cu_seqlens, scale, attend_current, max_seqlen, block_m, block_n
        )
        # snap (fp32 log-stick per row and key block) plays the role of softmax's lse
        ctx.save_for_backward(q, k, v, snap, attention_mask, cu_seqlens)
        ctx.args = (scale, attend_current, max_seqlen, block_m, block_n)
        return o, rem

    @staticmethod
    def backward(ctx, do, drem):
        q, k, v, snap, attention_mask, cu_seqlens = ctx.saved_tensors
        scale, attend_current, max_seqlen, block_m, block_n = ctx.args
        B, HQ, Qtot, _ = q.shape
        if do is None:
            do = q.new_zeros(B, HQ, Qtot, v.shape[-1])
        if drem is None:
            drem = q.new_zeros(B, HQ, Qtot)
        dq, dk, dv = torch.ops.hf_attn_variants.sb_parallel_bwd(
            do, drem, q, k, v, snap, attention_mask, cu_seqlens, scale, attend_current, max_seqlen, block_m, block_n
        )
        return dq, dk, dv, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------


def _preview(values: list, n: int = 8) -> str:
    return str(values) if len(values) <= 2 * n else f"[{str(values[:n])[1:-1]}, ..., {str(values[-n:])[1:-1]}]"


def _check_cu_seqlens(cu_seqlens, q, k, attention_mask) -> int:
    """Validate packed-sequence boundaries (the kernels would read and write out of bounds on bad ones); return the
    longest sequence length. Copies `cu_seqlens` to the host once, which the block choice needs anyway."""
    B, _, Qn, _ = q.shape
    Kn = k.shape[2]
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"`cu_seqlens` must be a torch.Tensor or None, got {type(cu_seqlens).__name__}.")
    if cu_seqlens.ndim != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.numel() < 2:
        raise ValueError(
            f"`cu_seqlens` must be a 1-D int32 or int64 tensor [0, l1, l1+l2, ..., T] with at least 2 entries, "
            f"got {cu_seqlens.dtype} with shape {tuple(cu_seqlens.shape)}."
        )
    if cu_seqlens.device != q.device:
        raise ValueError(f"`cu_seqlens` must be on the device of `q` ({q.device}), got {cu_seqlens.device}.")
    if B != 1:
        raise ValueError(f"`cu_seqlens` requires batch size 1 (sequences packed along T), got B={B}.")
    if Qn != Kn:
        raise ValueError(f"with `cu_seqlens`, `q` and `k` must have the same length, got {Qn} and {Kn}.")
    if attention_mask is not None:
        raise ValueError("`attention_mask` is not supported together with `cu_seqlens`; pass one or the other.")
    cu = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    if cu[0] != 0:
        raise ValueError(f"`cu_seqlens` must start at 0, got cu_seqlens[0] = {cu[0]} in {_preview(cu)}.")
    if min(lengths) < 0:
        i = next(i for i, n in enumerate(lengths) if n < 0)
        raise ValueError(
            f"`cu_seqlens` must be non-decreasing, got cu_seqlens[{i}] = {cu[i]} > cu_seqlens[{i + 1}] = {cu[i + 1]} "
            f"in {_preview(cu)}."
        )
    if cu[-1] != Qn:
        raise ValueError(
            f"`cu_seqlens` must end at the packed length T = {Qn} (q.shape[2]), got cu_seqlens[-1] = {cu[-1]} "
            f"in {_preview(cu)}."
        )
    return max(lengths)


def parallel_stickbreaking_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: Optional[float] = None,
    attend_current: bool = False,
    attention_mask: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Stick-breaking attention with Triton kernels (forward and deterministic backward).

    Args:
        q (torch.Tensor): queries of shape `[B, HQ, Q, D]` (any strides, e.g. a transposed `[B, Q, HQ, D]` view).
        k (torch.Tensor): keys of shape `[B, H, K, D]`; `HQ % H == 0` (GQA: query head h reads kv head h // (HQ//H)).
        v (torch.Tensor): values of shape `[B, H, K, Dv]`.
        scale (Optional[float]): logit scale s in z = s q.k, a finite number. Default: `D ** -0.5`.
        attend_current (bool): whether query i sees the key at its own position. Default: `False`.
        attention_mask (Optional[torch.Tensor]): bool, broadcastable to `[B, HQ, Q, K]`, True = visible (e.g. a
            padding mask). Masked keys do not break the stick. Default: `None`.
        cu_seqlens (Optional[torch.Tensor]): int32 or int64 `[N+1]` cumulative lengths `[0, l1, l1+l2, ..., T]` of
            N packed sequences (non-decreasing, ending at the packed length T); then B must be 1 and Q == K.
            Default: `None`.

    Query i sits at key position K - Q + i (decode / chunked prefill over a cache). Without gradients, Q <= 16 and
    K >= 512 this routes to the split-K kernel `decode_stickbreaking_attn`.

    Memory: besides o and rem, the forward keeps an fp32 snapshot of the log-stick per (row, key block of
    BLOCK_N keys), B * HQ * Q * ceil(K / BLOCK_N) floats, and the backward a second one of the same size. With
    `cu_seqlens` it is validated and its longest sequence found on the host (one device-to-host copy, a sync and a
    graph break under torch.compile). Empty batches or lengths (B, Q or K = 0) give empty outputs.

    Returns:
        o (torch.Tensor): `[B, HQ, Q, Dv]` in q.dtype.
        rem (torch.Tensor): `[B, HQ, Q]` in q.dtype, the stick left over, prod_j (1 - beta_ij).
    """
    _check_inputs(q, k, v, attention_mask)
    max_seqlen = None if cu_seqlens is None else _check_cu_seqlens(cu_seqlens, q, k, attention_mask)
    scale = _resolve_scale(scale, q.shape[-1])
    attend_current = bool(attend_current)
    B, _, Qn, _ = q.shape
    Kn = k.shape[2]
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if (cu_seqlens is None and not needs_grad and B > 0 and 0 < Qn <= _DECODE_MAX_QUERIES
            and Kn >= _DECODE_MIN_KEYS):
        # looked up on the module so tests can spy on it
        return decoding.decode_stickbreaking_attn(q, k, v, scale=scale, attend_current=attend_current,
                                                  attention_mask=attention_mask)
    if cu_seqlens is None:
        max_seqlen = Kn
    block_m, block_n = _pick_blocks(Qn if cu_seqlens is None else max_seqlen, max_seqlen, q.shape[-1])
    return ParallelStickbreakingAttnFunction.apply(
        q, k, v, attention_mask, cu_seqlens, scale, attend_current, max_seqlen, block_m, block_n
    )
