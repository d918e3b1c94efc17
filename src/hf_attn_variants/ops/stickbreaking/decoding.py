"""Split-K stick-breaking attention for a few new queries over a long KV cache (inference only).

Same math as ``parallel.py``: A_ij = beta_ij * prod_{j<l<i, l visible} (1 - beta_il), o_i = sum_j A_ij v_j,
rem_i = prod_j (1 - beta_ij). Query i sits at key position K - Q + i.

With Q <= ~16 the parallel kernel would launch one program per head and walk the whole cache serially. Here the
cache is cut into C chunks processed in parallel. Chunk c yields, for every query row, the partial output
acc_c = sum_{j in c} beta_ij prod_{j<l, l in c} (1 - beta_il) v_j and its log-remainder
lr_c = sum_{j in c} log(1 - beta_ij).
Because the stick is broken nearest-first, chunk c only has to be scaled by the stick left by the chunks nearer to
the query::

    o = sum_c exp(sum_{c' nearer than c} lr_c') * acc_c,       log rem = sum_c lr_c

Fused in ``_sb_decode_kernel``: q@k^T, softplus, in-chunk fp32 reverse cumsum, exp2 and p@v. One program owns a
(chunk, kv head) and packs all HQ/H query heads of the GQA group and all Q queries into its rows, so K/V are read
once per kv head. The combine over chunks is a few fp32 torch ops (C is small).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import (
    IS_INTERPRET, LOG2E, _check_inputs, _launch_meta, _log2_stick_block, _mask_args, _pow2, _resolve_scale,
)


@triton.jit
def _sb_decode_kernel(
    q, k, v, acc_out, lr_out, mask,
    scale2,
    sq_b, sq_h, sq_t, sq_d,
    sk_b, sk_h, sk_t, sk_d,
    sv_b, sv_h, sv_t, sv_d,
    sm_b, sm_h, sm_q, sm_k,
    Q, K, H, CHUNK, NSPLIT,
    G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ATTEND_CURRENT: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    i_c = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_r = tl.program_id(2)
    i_b = i_bh // H
    i_h = i_bh % H

    # row r packs (query head of the group, query): r = g * Q + i
    r = i_r * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < G * Q
    i_q = r % Q
    i_hq = i_h * G + r // Q
    lim = K - Q + i_q + (1 if ATTEND_CURRENT else 0)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)

    bq = tl.load(q + i_b * sq_b + i_hq[:, None] * sq_h + i_q[:, None] * sq_t + offs_d[None, :] * sq_d,
                 mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    if UPCAST:
        bq = bq.to(tl.float32)
    k_base = k + i_b * sk_b + i_h * sk_h
    v_base = v + i_b * sv_b + i_h * sv_h

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    log_rem = tl.zeros([BLOCK_M], dtype=tl.float32)
    c_lo = i_c * CHUNK
    # the last query sees keys up to K - 1 (+1 with ATTEND_CURRENT)
    c_hi = tl.minimum(c_lo + CHUNK, K - 1 + (1 if ATTEND_CURRENT else 0))
    n_blocks = tl.cdiv(tl.maximum(c_hi - c_lo, 0), BLOCK_N)
    for it in range(0, n_blocks):
        cols = c_lo + (n_blocks - 1 - it) * BLOCK_N + offs_n  # nearest block of the chunk first
        col_ok = cols < c_hi
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
            bm = tl.load(mask + i_b * sm_b + i_hq[:, None] * sm_h + i_q[:, None] * sm_q + cols[None, :] * sm_k,
                         mask=row_ok[:, None] & col_ok[None, :], other=0)
            vis = vis & (bm != 0)
        log_p, _, lomb = _log2_stick_block(z2, vis, log_rem)
        p = tl.where(vis, tl.exp2(log_p), 0.0)
        acc += tl.dot(p.to(bv.dtype), bv, input_precision=DOT_PRECISION)
        log_rem += tl.sum(lomb, axis=1)

    # partials laid out (B, HQ, Q, NSPLIT, .); every chunk writes, empty ones write acc = 0, lr = 0
    row_off = ((i_b * H * G + i_hq).to(tl.int64) * Q + i_q) * NSPLIT + i_c
    tl.store(acc_out + row_off[:, None] * DV + offs_dv[None, :], acc,
             mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(lr_out + row_off, log_rem, mask=row_ok)


def _pick_decode_blocks(rows: int, K: int, d: int, B: int, H: int, num_splits: Optional[int]):
    block_m = min(_pow2(rows), 64)
    if IS_INTERPRET:
        block_n = min(_pow2(K), 128)
        target = 1
    else:
        # no register spills on sm_90 per ptxas (16-row tiles; not timed): 64-key tiles only for narrow heads
        block_n = 64 if d <= 64 else 32
        target = 264  # ~2 waves of programs on a 132-SM GPU (unverified heuristic)
    if num_splits is None:
        num_splits = max(1, min(triton.cdiv(target, B * H * triton.cdiv(rows, block_m)), triton.cdiv(K, 256)))
    per_split = triton.cdiv(K, num_splits)
    block_n = min(block_n, _pow2(per_split))
    chunk = triton.cdiv(per_split, block_n) * block_n  # chunks are whole key blocks
    return block_m, block_n, chunk, triton.cdiv(K, chunk)


def decode_stickbreaking_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: Optional[float] = None,
    attend_current: bool = False,
    attention_mask: Optional[torch.Tensor] = None,
    num_splits: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Stick-breaking attention of a few queries over a KV cache, split over the keys (forward only).

    Args:
        q (torch.Tensor): new queries `[B, HQ, Q, D]`, Q small (e.g. 1 for token-by-token decoding); any strides.
        k (torch.Tensor): cached keys `[B, H, K, D]` including the new tokens, K >= Q >= 1; `HQ % H == 0`.
        v (torch.Tensor): cached values `[B, H, K, Dv]`.
        scale (Optional[float]): logit scale, a finite number. Default: `D ** -0.5`.
        attend_current (bool): whether query i sees the key at its own position K - Q + i. Default: `False`.
        attention_mask (Optional[torch.Tensor]): bool, broadcastable to `[B, HQ, Q, K]`, True = visible.
            Default: `None`.
        num_splits (Optional[int]): number of key chunks processed in parallel. Default: chosen from the grid size.

    Returns:
        o (torch.Tensor): `[B, HQ, Q, Dv]` in q.dtype; rem (torch.Tensor): `[B, HQ, Q]` in q.dtype.
    """
    _check_inputs(q, k, v, attention_mask)
    B, _, Qn, _ = q.shape
    Kn = k.shape[2]
    if B < 1 or Qn < 1 or Kn < 1:
        raise ValueError(
            f"`decode_stickbreaking_attn` needs at least one batch row, one query and one cached key (the cache "
            f"includes the new tokens), got B={B}, Q={Qn}, K={Kn}; use `parallel_stickbreaking_attn` for empty inputs."
        )
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"`num_splits` must be an int >= 1 or None, got {num_splits!r}.")
    scale = _resolve_scale(scale, q.shape[-1])
    return torch.ops.hf_attn_variants.sb_decode(q, k, v, attention_mask, scale, bool(attend_current),
                                                0 if num_splits is None else int(num_splits))


def _sb_decode_impl(q, k, v, attention_mask, scale, attend_current, num_splits):
    B, HQ, Qn, D = q.shape
    H, Kn, DV = k.shape[1], k.shape[2], v.shape[-1]
    G = HQ // H
    block_m, block_n, chunk, nsplit = _pick_decode_blocks(G * Qn, Kn, max(D, DV), B, H, num_splits or None)
    acc = torch.empty(B, HQ, Qn, nsplit, DV, dtype=torch.float32, device=q.device)
    lr = torch.empty(B, HQ, Qn, nsplit, dtype=torch.float32, device=q.device)
    m, sm = _mask_args(attention_mask, (B, HQ, Qn, Kn), q.device)
    grid = (nsplit, B * H, triton.cdiv(G * Qn, block_m))
    _sb_decode_kernel[grid](
        q, k, v, acc, lr, m,
        scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *sm,
        Qn, Kn, H, chunk, nsplit,
        G=G, D=D, DV=DV, BLOCK_M=block_m, BLOCK_N=block_n,
        ATTEND_CURRENT=attend_current, HAS_MASK=attention_mask is not None,
        **_launch_meta(q, D, DV, block_m),
    )
    # combine nearest-first: chunk c is scaled by the stick left by the chunks after it (c' > c);
    # suffix sums built by cumsum, never by subtracting from the total
    suffix = lr.flip(-1).cumsum(-1).flip(-1)  # inclusive: sum_{c' >= c}
    nearer = torch.cat([suffix[..., 1:], torch.zeros_like(suffix[..., :1])], dim=-1)
    o = (torch.exp2(nearer).unsqueeze(-1) * acc).sum(-2)
    return o.to(q.dtype), torch.exp2(suffix[..., 0]).to(q.dtype)


@torch.library.custom_op("hf_attn_variants::sb_decode", mutates_args=())
def sb_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: Optional[torch.Tensor], scale: float,
    attend_current: bool, num_splits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _sb_decode_impl(q, k, v, attention_mask, scale, attend_current, num_splits)


@sb_decode.register_fake
def _(q, k, v, attention_mask, scale, attend_current, num_splits):
    B, HQ, Qn, _ = q.shape
    return q.new_empty(B, HQ, Qn, v.shape[-1]), q.new_empty(B, HQ, Qn)
