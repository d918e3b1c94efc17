"""Helpers shared by the parallel and the decoding stick-breaking kernels: the per-block log-space math (Triton),
launch metadata and input validation (host). Both kernel modules import from here, never from each other's helpers.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Optional

import torch
import triton
import triton.language as tl

IS_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------------------------------------------
# Kernel math (base 2: x = z * log2(e), so beta = 1 / (1 + 2^-x))
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _log2_stick_block(x, vis, log_near):
    """(log2 A, log2 beta, log2(1 - beta)) of a (rows, keys) block of base-2 logits x; log2(1 - beta) is 0 where
    not visible (those keys do not break the stick); log_near is the log-stick left by the nearer blocks.

    softplus2(x) = max(x, 0) + log2(1 + 2^-|x|) is accurate and overflow-free at every x (a cutoff at x > 15 cost up
    to 4e-5 per saturated log). log2 beta is formed directly, not as x - softplus2(x), which cancels when beta ~ 1
    and loses the 1 - beta the backward needs. log2 A still cancels ~x for a saturated key (an error of eps * |x| in
    that weight); avoiding it takes a second in-block cumsum, which doubles the shuffles and spills in the backward.
    """
    corr = tl.log2(1.0 + tl.exp2(-tl.abs(x)))
    lomb = tl.where(vis, -tl.maximum(x, 0.0) - corr, 0.0)
    log_a = x + tl.cumsum(lomb, axis=1, reverse=True) + log_near[:, None]
    return log_a, tl.minimum(x, 0.0) - corr, lomb


# ---------------------------------------------------------------------------------------------------------------
# Launch helpers
# ---------------------------------------------------------------------------------------------------------------


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(x)))


def _launch_meta(q: torch.Tensor, d: int, dv: int, block_m: int) -> dict:
    return dict(
        BLOCK_D=_pow2(d), BLOCK_DV=_pow2(dv),
        UPCAST=IS_INTERPRET or q.dtype == torch.float32,
        # fp32 inputs are the accuracy reference: do not let TF32 round them on GPU
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=8 if block_m >= 64 else 4,
        num_stages=1 if IS_INTERPRET else 2,
    )


def _mask_args(mask: Optional[torch.Tensor], shape: tuple[int, int, int, int], device):
    if mask is None:
        return torch.empty(1, dtype=torch.uint8, device=device), (0, 0, 0, 0)
    # broadcast without copying (stride 0), then read the bools as bytes
    m = mask.expand(shape).view(torch.uint8)
    return m, tuple(m.stride())


# ---------------------------------------------------------------------------------------------------------------
# Input validation (runs before any kernel launch; messages name the argument, what came and what is allowed)
# ---------------------------------------------------------------------------------------------------------------


def _check_inputs(q, k, v, attention_mask=None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}.")
        if t.ndim != 4:
            raise ValueError(f"`{name}` must be a 4-D tensor (B, H, T, D), got shape {tuple(t.shape)}.")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"`{name}` must be float16, bfloat16 or float32, got {t.dtype}.")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"`q`, `k`, `v` must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}.")
    if not (q.device == k.device == v.device):
        raise ValueError(f"`q`, `k`, `v` must be on one device, got {q.device}, {k.device}, {v.device}.")
    B, HQ, Qn, D = q.shape
    Bk, H, Kn, Dk = k.shape
    if Bk != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: `q` {B}, `k` {Bk}, `v` {v.shape[0]}.")
    if tuple(v.shape[1:3]) != (H, Kn):
        raise ValueError(f"`v` must have shape (B, {H}, {Kn}, Dv) like `k`, got {tuple(v.shape)}.")
    if Dk != D:
        raise ValueError(f"`k` head dim must equal `q` head dim {D}, got {Dk}.")
    # empty batches and lengths are fine (empty outputs, no program launched); zero heads or head dims are not
    if HQ < 1 or H < 1:
        raise ValueError(f"`q` and `k` must have at least one head, got {HQ} query heads and {H} kv heads.")
    if not (1 <= D <= MAX_HEAD_DIM and 1 <= v.shape[-1] <= MAX_HEAD_DIM):
        raise ValueError(f"head dims from 1 up to {MAX_HEAD_DIM} are supported, got D={D}, Dv={v.shape[-1]}.")
    if HQ % H != 0:
        raise ValueError(f"`q` heads ({HQ}) must be a multiple of `k` heads ({H}) for GQA.")
    if Qn > Kn:
        raise ValueError(
            f"`q` length must not exceed `k` length (query i sits at key position K - Q + i): got Q={Qn} > K={Kn}."
        )
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dtype != torch.bool:
            got = attention_mask.dtype if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
            raise ValueError(f"`attention_mask` must be a bool tensor (True = visible), got {got}.")
        try:
            torch.broadcast_shapes(attention_mask.shape, (B, HQ, Qn, Kn))
            ok = attention_mask.ndim <= 4
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"`attention_mask` must broadcast to (B, HQ, Q, K) = {(B, HQ, Qn, Kn)}, "
                f"got {tuple(attention_mask.shape)}."
            )
        if attention_mask.device != q.device:
            raise ValueError(
                f"`attention_mask` must be on the device of `q` ({q.device}), got {attention_mask.device}."
            )


def _resolve_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"`scale` must be a finite number or None, got {scale!r}.")
    return float(scale)
