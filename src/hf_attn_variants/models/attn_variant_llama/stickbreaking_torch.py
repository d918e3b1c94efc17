"""Stick-breaking attention in plain PyTorch, and its transformers attention-interface glue.

Stick-breaking attention (Tan et al., arXiv 2410.17980, §2): with logits z_ij = s * q_i·k_j and break points
beta_ij = sigmoid(z_ij), the nearest visible key takes its share of the stick first and farther keys get what is left:

    A_ij  = beta_ij * prod_{j<l<i, l visible} (1 - beta_il)        o_i = sum_j A_ij v_j
    rem_i = prod_{j visible} (1 - beta_ij) = 1 - sum_j A_ij

In log space, with log(1 - beta) = -softplus(z), log A_ij = z_ij - sum_{l>=j, l visible} softplus(z_il): one inclusive
reverse cumulative sum along the key axis. Masked keys do not break the stick (they add nothing to that sum).

Layout (what transformers hands attention functions): q (B, HQ, Q, D), k (B, H, K, D), v (B, H, K, Dv) with
HQ % H == 0 (GQA: query head h reads kv head h // (HQ // H)). Query i sits at key position K - Q + i, so decoding and
chunked prefill over a KV cache are just Q < K. Key j is visible to query i iff j < K - Q + i (or j <= K - Q + i with
`attend_current=True`) and `attention_mask` allows it.

Three implementations share that contract:
- `naive_stickbreaking_attn`: the reference, written from the formula with T x T tensors and plain autograd.
- `blockwise_stickbreaking_attn`: exact, O(T * block) extra memory; blocks of keys are visited nearest-first so the
  reverse cumulative sum becomes a running sum, and the backward recomputes blocks instead of storing weights.
- `hf_attn_variants.ops.stickbreaking.parallel_stickbreaking_attn` (Triton, separate package, imported lazily).

Continuous batching (`generate_batch`) packs many requests into one row over a paged cache: the `paged_*` functions
run each request over its own past + new keys (the same contract per request), or one Triton varlen call for a batch
of fresh prefills on CUDA.

On CPU the blockwise forward, its backward and the decode path run as the package's C++ kernels
(`hf_attn_variants.ops.stickbreaking_cpu`: the same algorithm and numerics, threads over query blocks, fused
elementwise work) when the package is installed and the kernels build, called as its torch.library custom ops
(`torch.ops.hf_attn_variants.sb_cpu_forward` / `sb_cpu_backward` / `sb_cpu_decode`), so `torch.compile(fullgraph=True)` traces
them; float16/bfloat16 inputs run them in float32. `stickbreaking_backend="torch"` (or a checkpoint run as remote code
without the package) keeps pure PyTorch, whose data-dependent early exits (`.item()`) break a torch.compile graph.

Numerics of the blockwise op (fp32 compute for fp16/bf16/fp32 inputs, fp64 for fp64):
- |z| is clamped at -log(tiny) - 1 (86 in fp32, 707 in fp64), which keeps CPU exp/sigmoid off their slow underflow
  path; past that bound beta is 0 or 1 to working precision, so weights and remainder move by < 1e-37 (fp32). The
  forward skips the clamp for a query block where s * max|q| * max|k| is at most half that bound (it would change
  nothing there).
- The forward works in product space: beta = sigmoid(z) and 1 - beta = sigmoid(-z) come from two sigmoids (beta is
  never formed as 1 - sigmoid(-z), which would cancel for small beta) and the stick is a running product (in-block
  `cumprod_`, carried across key blocks), so no log or exp. Products that underflow only lose weights below tiny.
- The backward recomputes weights in log space: log(1 - beta) = log(sigmoid(-z)), log-weights floored at -86 (fp32),
  again moving any weight by < 1e-37.
- A query block stops visiting keys once every row's stick is below e^-86 (exact to the same size).
- The backward gets each key's "farther keys" gradient sum as (row total - nearer sum), with the row total
  do·o - drem·(1 - rem) from saved outputs; the absolute error is ~eps * |sum_j g_ij| per key.

This file ships as HF remote code: it may import only torch, transformers and the standard library.
"""

import functools
import math
import os

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask


__all__ = [
    "naive_stickbreaking_attn",
    "blockwise_stickbreaking_attn",
    "stickbreaking_attention_forward",
    "eager_stickbreaking_attention_forward",
    "paged_stickbreaking_attention_forward",
    "eager_paged_stickbreaking_attention_forward",
    "register_stickbreaking_attention",
    "STICKBREAKING_ATTENTION_NAME",
]

STICKBREAKING_ATTENTION_NAME = "stickbreaking"
REMAINDER_MODES = ("none", "value", "bias")
BACKENDS = ("auto", "torch", "triton")
BACKEND_ENV_VAR = "HF_ATTN_VARIANTS_SB_BACKEND"
# 128 x 128 score blocks measured fastest on a 2-core AVX2 CPU (256 was ~10% slower, cache misses) and keep a
# block's few temporaries (B * HQ * 128 * 128 fp32 each) small next to o.
DEFAULT_BLOCK_SIZE = 128
# The C++ forward's and backward's blocks: their scores live per thread, so larger blocks (faster GEMMs) cost no
# memory of note.
CPU_KERNEL_BLOCK_SIZE = 256
# Up to this many queries without gradients (decoding, speculative verification) take one fused pass over all keys.
DECODE_MAX_QUERIES = 16
DECODE_KERNEL_BLOCK_SIZE = 128  # keys per block of the C++ decode (the early exit is checked between blocks)
DECODE_FIRST_CHUNK = 256  # keys of the decode path's first (nearest) chunk; later chunks are 4x larger each

# ----------------------------------------------------------------------------------------------------------------------
# Input checks and shared helpers
# ----------------------------------------------------------------------------------------------------------------------


def _check_attention_inputs(q, k, v, attention_mask):
    """Validate the public-op inputs; return (B, H, G, Q, K, D, Dv) with G = HQ // H query heads per kv head."""
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"`{name}` must be a torch.Tensor, got {type(tensor).__name__}.")
        if tensor.ndim != 4:
            raise ValueError(
                f"`{name}` must have 4 dimensions (batch, heads, length, head_dim), got shape {tuple(tensor.shape)}."
            )
        if not tensor.is_floating_point():
            raise ValueError(
                f"`{name}` must be a floating-point tensor (float16/bfloat16/float32/float64), got {tensor.dtype}."
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"`q`, `k` and `v` must share one dtype, got {q.dtype}, {k.dtype} and {v.dtype}.")
    B, HQ, Q, D = q.shape
    Bk, H, K, Dk = k.shape
    Bv, Hv, Kv, Dv = v.shape
    if not (B == Bk == Bv):
        raise ValueError(f"`q`, `k` and `v` must share the batch size, got {B}, {Bk} and {Bv}.")
    if Hv != H or Kv != K:
        raise ValueError(
            f"`v` must have the same heads and length as `k` {(H, K)}, got {(Hv, Kv)} (v shape {tuple(v.shape)})."
        )
    if Dk != D:
        raise ValueError(f"`k` head_dim must equal `q` head_dim {D}, got {Dk}.")
    if H == 0 or HQ % H != 0:
        raise ValueError(f"`q` heads ({HQ}) must be a multiple of `k`/`v` heads ({H}) for grouped-query attention.")
    if Q > K:
        raise ValueError(
            f"`q` length ({Q}) must not exceed `k` length ({K}): query i sits at key position K - Q + i."
        )
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dtype != torch.bool:
            got = attention_mask.dtype if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
            raise ValueError(f"`attention_mask` must be a bool tensor (True = may attend), got {got}.")
        if attention_mask.ndim > 4:
            raise ValueError(
                f"`attention_mask` must have at most 4 dimensions, got shape {tuple(attention_mask.shape)}."
            )
        try:
            torch.broadcast_shapes(attention_mask.shape, (B, HQ, Q, K))
        except RuntimeError:
            raise ValueError(
                f"`attention_mask` of shape {tuple(attention_mask.shape)} does not broadcast to (B, HQ, Q, K) = "
                f"{(B, HQ, Q, K)}."
            ) from None
    return B, H, HQ // H, Q, K, D, Dv


def _resolve_scale(scale, head_dim):
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"`scale` must be a finite number or None, got {scale!r}.")
    return float(scale)


def _compute_dtype(dtype):
    # Low-precision inputs accumulate in fp32; float64 stays float64 so gradcheck and references are exact.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped_mask(attention_mask, H, G):
    """View a bool mask broadcastable to (B, HQ, Q, K) as one broadcastable to (B, H, G, Q, K), without copying."""
    if attention_mask is None:
        return None
    mask = attention_mask.reshape((1,) * (4 - attention_mask.ndim) + tuple(attention_mask.shape))
    if mask.shape[1] == 1:
        return mask.unsqueeze(2)
    return mask.unflatten(1, (H, G))


# ----------------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------------


def naive_stickbreaking_attn(q, k, v, scale=None, attend_current=False, attention_mask=None, return_weights=False):
    r"""
    Reference stick-breaking attention, written from the log-space formula with full (Q, K) tensors.

    Args:
        q (torch.Tensor):
            queries of shape `[B, HQ, Q, D]`.
        k (torch.Tensor):
            keys of shape `[B, H, K, D]`, `HQ % H == 0` (GQA), `Q <= K`; query i sits at key position `K - Q + i`.
        v (torch.Tensor):
            values of shape `[B, H, K, Dv]`.
        scale (Optional[float]):
            logit scale s in z = s * q·k. Default: `1 / sqrt(D)`.
        attend_current (bool):
            whether query i may attend to the key at its own position. Default: `False` (the official default).
        attention_mask (Optional[torch.Tensor]):
            bool tensor broadcastable to `[B, HQ, Q, K]`, True = may attend. Default: `None` (causal only).
        return_weights (bool):
            also return the weights A `[B, HQ, Q, K]` (in the compute dtype: fp32, or fp64 for fp64 inputs).

    Returns:
        o (torch.Tensor): `[B, HQ, Q, Dv]` in the dtype of `q`.
        rem (torch.Tensor): `[B, HQ, Q]`, the unused stick `1 - sum_j A_ij`, in the dtype of `q`.
        weights (torch.Tensor): only with `return_weights=True`.
    """
    B, H, G, Q, K, D, Dv = _check_attention_inputs(q, k, v, attention_mask)
    scale = _resolve_scale(scale, D)
    dtype = _compute_dtype(q.dtype)
    q5 = q.to(dtype).unflatten(1, (H, G))
    k5 = k.to(dtype).unsqueeze(2)
    v5 = v.to(dtype).unsqueeze(2)

    query_pos = torch.arange(K - Q, K, device=q.device)[:, None]
    key_pos = torch.arange(K, device=q.device)[None, :]
    visible = key_pos <= query_pos if attend_current else key_pos < query_pos
    if attention_mask is not None:
        visible = visible & _grouped_mask(attention_mask, H, G)

    # Hidden logits are zeroed (not -inf) so no inf ever reaches autograd; `visible` removes them explicitly.
    z = torch.where(visible, scale * q5 @ k5.transpose(-1, -2), 0.0)
    # log beta = logsigmoid(z) and log(1 - beta) = logsigmoid(-z) are accurate at every z (F.softplus switches to
    # the identity above 20, an error of e^-20 ~ 2e-9 in float64; z - softplus(z) would also cancel for beta ~ 1).
    log_one_minus_beta = torch.where(visible, F.logsigmoid(-z), 0.0)
    # Reverse cumulative sum over the keys nearer than j: sum_{j < l} log(1 - beta_il) (hidden keys add 0).
    log_stick_before_j = log_one_minus_beta.flip(-1).cumsum(-1).flip(-1)[..., 1:]
    log_stick_before_j = torch.cat([log_stick_before_j, torch.zeros_like(z[..., :1])], dim=-1)
    # Flattened before the value product, so returned weights are the tensor `o` was computed from (their gradient
    # is then the gradient of the output, as transformers' `retain_grad` contract expects).
    weights = torch.where(visible, torch.exp(F.logsigmoid(z) + log_stick_before_j), 0.0).flatten(1, 2)
    o = (weights.unflatten(1, (H, G)) @ v5).flatten(1, 2)
    rem = torch.exp(log_one_minus_beta.sum(-1))
    if return_weights:
        return o.to(q.dtype), rem.flatten(1, 2).to(q.dtype), weights
    return o.to(q.dtype), rem.flatten(1, 2).to(q.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Blockwise (exact, O(T * block) memory)
# ----------------------------------------------------------------------------------------------------------------------
#
# Keys are handled in "distance order": r = K - 1 - j, so r = 0 is the newest key. Query i sees r >= Q - i - c, with
# c = 1 if attend_current else 0. A query block [i0, i1) therefore needs keys r in [Q - i1 + 1 - c, K) (key blocks
# above the causal band are never visited), and only its first key block straddles the band when key blocks are at
# least as large as query blocks. Each key block of k and v is flipped as it is used (a block x D copy: flipping the
# whole of k and v once would cost two K x D copies, more peak memory than SDPA needs in all), so the within-block
# reverse scan of the paper is a forward `cumprod_` (forward) or `cumsum_`
# (backward, in log space); the stick left over from nearer blocks is a per-row running product (forward) or log
# (backward) carried in the compute dtype.


def _key_blocks(Q, K, i0, i1, attend_current, block_size):
    """Yield (r0, r1, j0, j1): key blocks of one query block, nearest first, in distance and in key coordinates."""
    first_visible = max(0, Q - i1 + 1 - int(attend_current))
    for r0 in range(first_visible, K, block_size):
        r1 = min(K, r0 + block_size)
        yield r0, r1, K - r1, K - r0


def _hidden_in_block(Q, i0, i1, r0, r1, attend_current, grouped_mask, j0, j1, device):
    """Bool tensor broadcastable to (B, H, G, i1-i0, r1-r0), True where a key is hidden; None when all are visible."""
    hidden = None
    # Query i0 + a sees key r0 + b iff a + b >= Q - c - i0 - r0 (see the distance-order comment above).
    band_threshold = Q - int(attend_current) - i0 - r0
    if band_threshold > 0:
        rows = torch.arange(i1 - i0, device=device)[:, None]
        cols = torch.arange(r1 - r0, device=device)[None, :]
        hidden = rows + cols < band_threshold
    if grouped_mask is not None:
        mask = grouped_mask
        if mask.shape[-2] != 1:
            mask = mask[..., i0:i1, :]
        if mask.shape[-1] != 1:
            mask = mask[..., j0:j1].flip(-1)
        hidden = ~mask if hidden is None else hidden | ~mask
    return hidden


def _log_negligible(dtype):
    """-log(tiny) - 1 (86 in fp32): past this |logit| beta is 0 or 1, and below this log-weight a weight is nothing."""
    return -math.log(torch.finfo(dtype).tiny) - 1.0


def _stick_exhausted(log_stick):
    """True when every row's remaining stick is below ~1e-37 (fp32): farther keys then get weights below that too.

    Stopping there is exact to that size and also keeps the backward from summing rounding noise over far keys whose
    true gradient is ~0 (it computes their farther-key sums as row total minus nearer sum).
    """
    return log_stick.numel() > 0 and log_stick.max().item() <= -_log_negligible(log_stick.dtype)


def _hide_keys(neg_logits, hidden):
    """Set -z = +inf where `hidden` (bool, broadcastable) is True: sigmoid(+inf) = 1, so those keys break nothing."""
    if hidden is None:
        return
    if hidden.numel() < neg_logits.numel():
        # masked_fill_ with a mask broadcast over heads is ~8x slower on CPU than adding a 0/+inf float mask; the add is
        # exact because the logits are finite here (clamped, or bounded by s |q| |k|).
        neg_logits.add_(torch.zeros(hidden.shape, dtype=neg_logits.dtype, device=neg_logits.device).masked_fill_(
            hidden, math.inf))
    else:
        neg_logits.masked_fill_(hidden, math.inf)


def _block_weights(neg_q_block, k_block, log_stick, hidden):
    """
    Stick-breaking weights of one (query block, key block) pair.

    neg_q_block (B, H, G*m, D) holds -s * q; k_block (B, H, n, D) keys nearest first; log_stick (B, H, G, m) log of
    the stick left by nearer key blocks. Returns (negated logits, weights, log_stick after this block), the first two
    (B, H, G, m, n). Hidden keys get -z = +inf: log(1 - beta) = log(sigmoid(+inf)) = 0, so they break nothing.
    """
    neg_logits = (neg_q_block @ k_block.transpose(-1, -2)).unflatten(2, log_stick.shape[2:])
    # log(1 - beta) = log(sigmoid(-z)) is accurate for every z and costs less than softplus on CPU. Clamping |z| at
    # -log(tiny) - 1 (86 in fp32) keeps sigmoid on CPU's fast path (it slows down 10x where exp underflows) and its
    # output normal; beyond that bound beta is 0 or 1 to working precision, so weights and remainder move by < 1e-37.
    max_abs_logit = _log_negligible(neg_logits.dtype)
    neg_logits.clamp_(-max_abs_logit, max_abs_logit)
    _hide_keys(neg_logits, hidden)
    log_stick_after = torch.sigmoid(neg_logits).log_()
    log_stick_after[..., 0] += log_stick
    log_stick_after.cumsum_(-1)  # log of the stick left after each key, nearer blocks and keys included
    new_log_stick = log_stick_after[..., -1].clone()
    # log A_r = z_r + log(stick after r) = log beta_r + log(stick before r).
    log_weights = log_stick_after.sub_(neg_logits)
    # CPU `exp` takes a slow path (10-30x) for inputs that underflow to subnormals or zero, and far keys live there.
    # Flooring log A at -max_abs_logit changes each weight by less than ~1e-37 (fp32).
    weights = log_weights.clamp_min_(-max_abs_logit).exp_()
    if hidden is not None:
        weights.masked_fill_(hidden, 0.0)
    return neg_logits, weights, new_log_stick


def _forward_block_weights(neg_q_block, k_block, stick, hidden, clamp_logits):
    """
    Forward-only stick-breaking weights of one (query block, key block) pair, computed in product space.

    Same contract as `_block_weights` except that the stick left by nearer key blocks is carried as a product:
    stick (B, H, G, m) in, weights (B, H, G, m, n) and the stick after this block out. No log or exp (CPU `log_` and
    `exp_` cost ~2x a `sigmoid` here): two sigmoids give beta = sigmoid(z) and 1 - beta = sigmoid(-z) (beta is never
    formed as 1 - sigmoid(-z), which cancels for small beta), and one in-place `cumprod_` gives the stick after each
    key. `clamp_logits=False` is for callers that know |z| is far below the clamp bound.
    """
    neg_logits = (neg_q_block @ k_block.transpose(-1, -2)).unflatten(2, stick.shape[2:])
    if clamp_logits:  # see _blockwise_forward: skipped only where it would change nothing
        # Clamping |z| at -log(tiny) - 1 keeps both sigmoids off CPU's slow underflow path and their outputs normal.
        max_abs_logit = _log_negligible(neg_logits.dtype)
        neg_logits.clamp_(-max_abs_logit, max_abs_logit)
    _hide_keys(neg_logits, hidden)
    stick_after = torch.sigmoid(neg_logits)  # 1 - beta, exactly 1 for hidden keys
    weights = neg_logits.neg_().sigmoid_()  # beta, exactly 0 for hidden keys
    stick_after[..., 0].mul_(stick)
    stick_after.cumprod_(-1)  # stick left after each key, nearer blocks included
    # A_r = beta_r * (stick before r). Products that underflow only lose weights below tiny (1e-38 in fp32); on the
    # 2-core AMD EPYC (AVX2) this was tuned on, cumprod_/mul_ with subnormal products measured no slower than normal.
    weights[..., 1:].mul_(stick_after[..., :-1])
    weights[..., 0].mul_(stick)
    return weights, stick_after[..., -1].clone()


_CPU_KERNEL = {}
# Input dtypes the C++ forward/backward take on CPU; float16/bfloat16 are converted to float32 around them (as the
# PyTorch path computes them): 0.60x the PyTorch path's forward+backward time at T=2048 (long stick, bf16, 1 thread).
# The decode keeps PyTorch for them: converting the whole cache to float32 each step cost 3-4x PyTorch's decode,
# which converts only the chunks it reads.
_CPU_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_CPU_DECODE_DTYPES = (torch.float32, torch.float64)


def _cpu_kernel(x, name):
    """The package's C++ kernel `name` ("forward", "backward" or "decode") for `x`'s device and dtype, or None (not
    CPU, no package, no build): the custom op `torch.ops.hf_attn_variants.sb_cpu_<name>`, which torch.compile traces."""
    if x.device.type != "cpu" or x.dtype not in (_CPU_DECODE_DTYPES if name == "decode" else _CPU_KERNEL_DTYPES):
        return None
    kernel = _CPU_KERNEL.get(name, _CPU_KERNEL)  # the dict itself marks "not looked up yet"
    if kernel is _CPU_KERNEL:
        kernel = _load_cpu_kernel(name)
    return kernel


@torch.compiler.assume_constant_result  # under torch.compile: looked up once while tracing, a constant in the graph
def _load_cpu_kernel(name):
    try:
        from hf_attn_variants.ops import stickbreaking_cpu
    except ImportError:  # remote code without the package: pure PyTorch
        kernel = None
    else:
        kernel = getattr(stickbreaking_cpu, f"{name}_op")()
    _CPU_KERNEL[name] = kernel
    return kernel


def _query_block_rows(x5, i0, i1, factor=None):
    """Rows [i0, i1) of a (B, H, G, Q, X) tensor as a contiguous (B, H, G*m, X) block, optionally multiplied."""
    rows = x5[:, :, :, i0:i1]
    rows = rows * factor if factor is not None else rows.contiguous()
    return rows.flatten(2, 3)


def _blockwise_forward(q5, k, v, scale, attend_current, grouped_mask, block_size):
    """q5 (B, H, G, Q, D), k (B, H, K, D), v (B, H, K, Dv) in compute dtype -> o (B, H, G, Q, Dv), rem (B, H, G, Q)."""
    B, H, G, Q, _ = q5.shape
    K, Dv = v.shape[-2:]
    exhausted = math.exp(-_log_negligible(q5.dtype))
    # |z| <= s |q| |k| (Cauchy-Schwarz). Where that bound is at most half the clamp bound (the half covers rounding of
    # the matmul), clamping would change nothing, so that pass over the scores is skipped; NaN/inf norms keep it.
    max_key_norm = k.norm(dim=-1).amax().item() if k.numel() else 0.0
    query_norms = q5.norm(dim=-1)
    half_clamp = 0.5 * _log_negligible(q5.dtype)
    o = q5.new_empty(B, H, G, Q, Dv)
    rem = q5.new_empty(B, H, G, Q)
    for i0 in range(0, Q, block_size):
        i1 = min(Q, i0 + block_size)
        neg_q_block = _query_block_rows(q5, i0, i1, -scale)
        block_query_norms = query_norms[:, :, :, i0:i1]
        max_query_norm = block_query_norms.amax().item() if block_query_norms.numel() else 0.0
        logit_bound = abs(scale) * max_query_norm * max_key_norm
        clamp_logits = not logit_bound <= half_clamp
        o_block = o.new_zeros(B, H, G * (i1 - i0), Dv)  # contiguous, so its flattened view below accumulates in place
        stick = o.new_ones(B, H, G, i1 - i0)
        for r0, r1, j0, j1 in _key_blocks(Q, K, i0, i1, attend_current, block_size):
            if stick.numel() > 0 and stick.max().item() <= exhausted:  # as _stick_exhausted, in product space
                break
            hidden = _hidden_in_block(Q, i0, i1, r0, r1, attend_current, grouped_mask, j0, j1, q5.device)
            weights, stick = _forward_block_weights(neg_q_block, k[:, :, j0:j1].flip(-2), stick, hidden, clamp_logits)
            # (B*H)-batched accumulate in place: no (G*m, Dv) temporary per key block.
            o_block.flatten(0, 1).baddbmm_(weights.flatten(0, 1).flatten(1, 2), v[:, :, j0:j1].flip(-2).flatten(0, 1))
            del weights  # free this block's scores before the next block allocates its own
        o[:, :, :, i0:i1] = o_block.unflatten(2, (G, i1 - i0))
        rem[:, :, :, i0:i1] = stick
    return o, rem


def _row_grad_totals(do5, drem5, o5, rem5, dtype=None):
    """sum_j g_ij over all keys of row i: do_i . o_i - drem_i (1 - rem_i) (see `_blockwise_backward`), summed in
    `dtype` (the C++ backward takes float64; no float64 copy of do or o is made)."""
    return (do5 * o5).sum(-1, dtype=dtype) - drem5.to(dtype or drem5.dtype) * (1.0 - rem5.to(dtype or rem5.dtype))


def _row_grad_bounds(do5, drem5, v):
    """|g_ij| <= A_ij * bound_i with bound_i = |do_i| max_j |v_j| + |drem_i|, rounded up so a clamp to it never cuts
    a true value; (B, H, G, Q)."""
    max_value_norm = v.norm(dim=-1).amax(-1) if v.shape[-2] else v.new_zeros(v.shape[:2])
    return (do5.norm(dim=-1) * max_value_norm[:, :, None, None] + drem5.abs()) * (1 + 64 * torch.finfo(v.dtype).eps)


def _blockwise_backward(do5, drem5, q5, k, v, o5, rem5, scale, attend_current, grouped_mask, block_size):
    """
    Gradients of the blockwise forward; everything is in the compute dtype and in the (B, H, G, Q, X) layout.

    With g_ij = A_ij (do_i·v_j - drem_i) the gradient w.r.t. log A_ij, the logit gradient is
    dz_ij = g_ij - beta_ij * sum_{l farther than or equal to j} g_il: z_ij enters log A_ij directly, and through
    log(1 - beta_ij) = -softplus(z_ij) (derivative -beta_ij) it enters log A_il of j itself and of every farther key l.
    Keys are visited nearest first again. Splitting the farther-or-equal sum into g_ij, the farther keys of the same
    block (a reverse cumulative sum) and far_i, the sum over all farther blocks, gives
    dz_ij = (1 - beta_ij) g_ij - beta_ij (in-block farther sum + far_i), which never subtracts g_ij from itself. far_i
    is the row total, known up front (sum_j g_ij = do_i·o_i - drem_i (1 - rem_i)), minus every g so far; once the
    stick is spent that difference is rounding noise (~eps |total|) around a true value near 0, so it is clamped to the
    bound the true value obeys: |far_i| <= (stick left after the block) * (|do_i| max_j |v_j| + |drem_i|).
    """
    B, H, G, Q, D = q5.shape
    K = k.shape[-2]
    dq = torch.zeros_like(q5)
    dk = k.new_zeros(k.shape)
    dv = v.new_zeros(v.shape)
    row_total = _row_grad_totals(do5, drem5, o5, rem5)
    g_bound = _row_grad_bounds(do5, drem5, v)
    for i0 in range(0, Q, block_size):
        i1 = min(Q, i0 + block_size)
        m = i1 - i0
        neg_q_block = _query_block_rows(q5, i0, i1, -scale)
        do_block = _query_block_rows(do5, i0, i1)
        drem_block = drem5[:, :, :, i0:i1, None]
        row_total_block = row_total[:, :, :, i0:i1]
        g_bound_block = g_bound[:, :, :, i0:i1]
        dq_block = neg_q_block.new_zeros(neg_q_block.shape)  # contiguous, so its flattened view accumulates in place
        log_stick = torch.zeros_like(row_total_block)
        nearer_grad = torch.zeros_like(row_total_block)  # sum of g over keys in nearer blocks
        for r0, r1, j0, j1 in _key_blocks(Q, K, i0, i1, attend_current, block_size):
            if _stick_exhausted(log_stick):
                break
            hidden = _hidden_in_block(Q, i0, i1, r0, r1, attend_current, grouped_mask, j0, j1, q5.device)
            k_block = k[:, :, j0:j1].flip(-2)
            v_block = v[:, :, j0:j1].flip(-2)
            neg_logits, weights, log_stick = _block_weights(neg_q_block, k_block, log_stick, hidden)
            g = (do_block @ v_block.transpose(-1, -2)).unflatten(2, (G, m))
            g.sub_(drem_block).mul_(weights)
            nearer_grad += g.sum(-1)
            limit = log_stick.exp().mul_(g_bound_block)
            far = torch.minimum(torch.maximum(row_total_block - nearer_grad, -limit), limit)
            # Columns run nearest first: the farther keys of column c are the columns after it (a shifted reverse
            # cumulative sum, so no column subtracts its own g).
            farther = F.pad(g.flip(-1).cumsum(-1).flip(-1)[..., 1:], (0, 1)).add_(far[..., None])
            grad_logits = g.mul_(torch.sigmoid(neg_logits)).sub_(neg_logits.neg_().sigmoid_().mul_(farther))
            grad_logits = grad_logits.flatten(2, 3)  # (1 - beta) g - beta (farther), farther as above
            dq_block.flatten(0, 1).baddbmm_(grad_logits.flatten(0, 1), k_block.flatten(0, 1))
            # neg_q_block is -s * q, so this subtracts -s * dz^T q, summed over the G query heads of each kv head.
            # Block products come out nearest-first and are flipped back into key order (torch has no negative strides).
            dk[:, :, j0:j1] -= (grad_logits.transpose(-1, -2) @ neg_q_block).flip(-2)
            dv[:, :, j0:j1] += (weights.flatten(2, 3).transpose(-1, -2) @ do_block).flip(-2)
            del neg_logits, weights, g, farther, grad_logits
        dq[:, :, :, i0:i1] = dq_block.unflatten(2, (G, m))
    dq *= scale
    return dq, dk, dv


class BlockwiseStickBreakingFunction(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, o (compute dtype) and rem, nothing of size T x T; the backward recomputes."""

    @staticmethod
    def forward(ctx, q, k, v, scale, attend_current, attention_mask, block_size):
        B, HQ, Q, D = q.shape
        H = k.shape[1]
        G = HQ // H
        dtype = _compute_dtype(q.dtype)
        grouped_mask = _grouped_mask(attention_mask, H, G)
        q5 = q.to(dtype).unflatten(1, (H, G))
        k_c, v_c = k.to(dtype), v.to(dtype)
        o5, rem5 = _blockwise_forward(q5, k_c, v_c, scale, attend_current, grouped_mask, block_size)
        ctx.save_for_backward(q, k, v, o5, rem5, attention_mask)
        ctx.scale, ctx.attend_current, ctx.block_size = scale, attend_current, block_size
        return o5.flatten(1, 2).to(q.dtype), rem5.flatten(1, 2).to(q.dtype)

    @staticmethod
    def backward(ctx, do, drem):
        q, k, v, o5, rem5, attention_mask = ctx.saved_tensors
        H, G = k.shape[1], q.shape[1] // k.shape[1]
        dtype = o5.dtype
        do5 = torch.zeros_like(o5) if do is None else do.to(dtype).unflatten(1, (H, G))
        drem5 = torch.zeros_like(rem5) if drem is None else drem.to(dtype).unflatten(1, (H, G))
        q5, k_c, v_c = q.to(dtype).unflatten(1, (H, G)), k.to(dtype), v.to(dtype)
        grouped_mask = _grouped_mask(attention_mask, H, G)
        dq5, dk, dv = _blockwise_backward(do5, drem5, q5, k_c, v_c, o5, rem5, ctx.scale, ctx.attend_current,
                                          grouped_mask, ctx.block_size)
        return dq5.flatten(1, 2).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def blockwise_stickbreaking_attn(q, k, v, scale=None, attend_current=False, attention_mask=None, block_size=None,
                                 cpu_kernel=True):
    r"""
    Exact stick-breaking attention in blocks: O(T * block_size) extra memory, deterministic, fp32 accumulation.

    Key blocks are visited nearest first and blocks above the causal band are skipped; the backward recomputes the
    weights block by block from q, k, v, o and rem. See the module docstring for the numerics.

    Args:
        q (torch.Tensor):
            queries of shape `[B, HQ, Q, D]` (float16, bfloat16, float32 or float64).
        k (torch.Tensor):
            keys of shape `[B, H, K, D]`, `HQ % H == 0` (GQA, K/V never repeated), `Q <= K`; query i sits at key
            position `K - Q + i`.
        v (torch.Tensor):
            values of shape `[B, H, K, Dv]`.
        scale (Optional[float]):
            logit scale s in z = s * q·k. Default: `1 / sqrt(D)`.
        attend_current (bool):
            whether query i may attend to the key at its own position. Default: `False`.
        attention_mask (Optional[torch.Tensor]):
            bool tensor broadcastable to `[B, HQ, Q, K]`, True = may attend. Default: `None` (causal only).
        block_size (Optional[int]):
            query rows and keys per block (square blocks: 256-key blocks were ~15% faster with 2 threads but needed
            1.44x SDPA's peak memory at T=8192 against 1.17x). Default: `128`, and `256` for the C++ kernels.
        cpu_kernel (bool):
            on CPU in float32/float64, let the forward, the backward and the decode path run as the package's C++
            kernels when they are available (same algorithm and numerics, faster). Default: `True`.

    Returns:
        o (torch.Tensor): `[B, HQ, Q, Dv]` in the dtype of `q`.
        rem (torch.Tensor): `[B, HQ, Q]`, the unused stick `1 - sum_j A_ij`, in the dtype of `q`.
    """
    _, _, _, _, _, D, _ = _check_attention_inputs(q, k, v, attention_mask)
    scale = _resolve_scale(scale, D)
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"`block_size` must be a positive int or None, got {block_size!r}.")
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if q.shape[2] <= DECODE_MAX_QUERIES and not needs_grad:
        return _decode_stickbreaking_attn(q, k, v, scale, bool(attend_current), attention_mask, cpu_kernel)
    kernel = _cpu_kernel(q, "forward") if cpu_kernel else None
    if kernel is not None:
        # The package's C++ forward as a custom op (its registered autograd runs the C++ backward with the same
        # blocks). The kernels keep their scores per thread, so by default they take larger (faster) blocks.
        return _cpu_kernel_stickbreaking_attn(kernel, q, k, v, scale, bool(attend_current), attention_mask,
                                              block_size or CPU_KERNEL_BLOCK_SIZE)
    return BlockwiseStickBreakingFunction.apply(q, k, v, scale, bool(attend_current), attention_mask,
                                                block_size or DEFAULT_BLOCK_SIZE)


def _cpu_kernel_stickbreaking_attn(kernel, q, k, v, scale, attend_current, attention_mask, block_size):
    """`blockwise_stickbreaking_attn` through the package's C++ forward op `kernel` (compute dtype in and out; bf16/fp16
    inputs are converted around it, and autograd converts their gradients back)."""
    B, HQ, Q, D = q.shape
    H = k.shape[1]
    G = HQ // H
    dtype = _compute_dtype(q.dtype)
    o5, rem5 = kernel(q.to(dtype).unflatten(1, (H, G)), k.to(dtype), v.to(dtype), scale, attend_current,
                      _grouped_mask(attention_mask, H, G), block_size)
    return o5.flatten(1, 2).to(q.dtype), rem5.flatten(1, 2).to(q.dtype)


def _decode_stickbreaking_attn(q, k, v, scale, attend_current, attention_mask, cpu_kernel=True):
    """Few queries over many keys (decoding), forward only, in a few large nearest-first chunks of keys.

    The blockwise loop pays ~0.4 ms of per-block overhead that decoding cannot amortise. Here the score matrix of a
    chunk is only (G*Q, n) per kv head, and the chunks grow geometrically (256, 1024, 4096, ... keys), so a short
    stick costs one chunk (the op stops once every query's stick is below e^-86, exactly as the blockwise op does)
    and a stick that reaches the whole cache only a few. Log space as in the reference: log A_ij = z_ij +
    sum_{l >= j visible} log(1 - beta_il), an inclusive reverse cumulative sum per chunk (flip, cumsum, flip: exact)
    plus the log-stick left by nearer chunks. Same clamps as the blockwise op, so weights move by < 1e-37 (fp32).

    With `cpu_kernel`, CPU fp32/fp64 inputs run as the package's C++ `decode` where it is available: the same
    nearest-first early exit in product space, like the C++ forward, in one call per layer with no per-chunk ops.
    """
    B, HQ, Q, D = q.shape
    H, K, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = HQ // H
    dtype = _compute_dtype(q.dtype)
    kernel = _cpu_kernel(q, "decode") if cpu_kernel else None
    if kernel is not None:
        o, rem = kernel(q.to(dtype).view(B, H, G, Q, D), k.to(dtype), v.to(dtype), scale, attend_current,
                        _grouped_mask(attention_mask, H, G), DECODE_KERNEL_BLOCK_SIZE)
        return o.view(B, HQ, Q, Dv).to(q.dtype), rem.view(B, HQ, Q).to(q.dtype)
    bound = _log_negligible(dtype)
    neg_query = q.to(dtype).reshape(B, H, G * Q, D) * -scale  # query head h*G + g reads kv head h
    grouped_mask = _grouped_mask(attention_mask, H, G)
    # Key j is visible to query i iff j < K - Q + i + c (c = attend_current): keys before K - Q + c are visible to every
    # query, and for one query the rest (its own position unless c) is simply left out.
    first_band_key = K - Q + int(attend_current)
    end = first_band_key if Q == 1 else K
    o = neg_query.new_zeros(B, H, G * Q, Dv)
    log_stick = None  # log of the stick left by nearer chunks (None: the whole stick)
    size = DECODE_FIRST_CHUNK
    while end > 0:
        start = max(0, end - size)
        neg_logits = torch.matmul(neg_query, k[:, :, start:end].to(dtype).transpose(-1, -2))
        neg_logits = neg_logits.clamp_(-bound, bound).view(B, H, G, Q, end - start)
        hidden = None
        if end > first_band_key:  # the causal band: only in the nearest chunk, only for Q > 1
            hidden = torch.arange(start, end, device=q.device) >= torch.arange(first_band_key, K + 1, device=q.device)[
                :Q, None
            ]
        if grouped_mask is not None:
            chunk_mask = grouped_mask[..., start:end] if grouped_mask.shape[-1] != 1 else grouped_mask
            hidden = ~chunk_mask if hidden is None else hidden | ~chunk_mask
        if hidden is not None:
            neg_logits.masked_fill_(hidden, math.inf)  # 1 - beta = sigmoid(-z) = 1: hidden keys break nothing
        # Log of the stick left after key j (nearest first): sum_{l >= j} log(1 - beta_l), nearer chunks included.
        log_stick_after = F.logsigmoid(neg_logits).flip(-1).cumsum_(-1).flip(-1)
        if log_stick is not None:
            log_stick_after.add_(log_stick[..., None])
        log_stick = log_stick_after[..., 0].clone()
        # log A_j = log beta_j + log(stick before j) = z_j + log(stick after j).
        weights = log_stick_after.sub_(neg_logits).clamp_min_(-bound).exp_()
        if hidden is not None:
            weights.masked_fill_(hidden, 0.0)
        o.flatten(0, 1).baddbmm_(weights.view(B * H, G * Q, end - start), v[:, :, start:end].to(dtype).flatten(0, 1))
        end, size = start, size * 4
        if end > 0 and log_stick.max().item() <= -bound:  # every stick is exhausted: farther keys get < 1e-37
            break
    if log_stick is None:  # no visible key at all
        log_stick = neg_query.new_zeros(B, H, G, Q)
    return o.view(B, HQ, Q, Dv).to(q.dtype), log_stick.exp().reshape(B, HQ, Q).to(q.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# transformers glue
# ----------------------------------------------------------------------------------------------------------------------


def _bool_attention_mask(attention_mask):
    """transformers hands either None, a bool mask (True = attend) or an additive float mask (0 = attend)."""
    if attention_mask is None or attention_mask.dtype == torch.bool:
        return attention_mask
    if not attention_mask.is_floating_point():
        raise ValueError(f"`attention_mask` must be None, bool or floating point, got {attention_mask.dtype}.")
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2


def _select_attention_op(backend, device):
    if backend not in BACKENDS:
        raise ValueError(
            f"`stickbreaking_backend` (or ${BACKEND_ENV_VAR}) must be one of {BACKENDS}, got {backend!r}."
        )
    if backend == "torch":  # pure PyTorch, also on CPU (no compiled kernel)
        return functools.partial(blockwise_stickbreaking_attn, cpu_kernel=False)
    if backend == "auto" and device.type != "cuda":
        return blockwise_stickbreaking_attn
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"`stickbreaking_backend='triton'` needs CUDA tensors (got device {device}) or TRITON_INTERPRET=1; "
            "use 'auto' or 'torch' on CPU."
        )
    try:
        from hf_attn_variants.ops.stickbreaking import parallel_stickbreaking_attn
    except ImportError as error:
        if backend == "triton":
            raise ImportError(
                "`stickbreaking_backend='triton'` needs the `hf_attn_variants` package with Triton installed "
                "(from its repository: pip install './hf-attn-variants[triton]')."
            ) from error
        return blockwise_stickbreaking_attn
    return parallel_stickbreaking_attn


def _trim_unfilled_keys(key, value, attention_mask, query_length):
    """Drop the key positions of a static cache that hold no token yet.

    A static cache hands the whole preallocated buffer (K = max_cache_len), while the op places query i at key position
    K - Q + i. Following transformers' masks: with a mask, its unfilled tail is masked for every query and the newest
    query always sees its own position, so the keys are cut after the last visible one (exact: masked keys never break
    the stick; one host sync); without a mask and K > Q > 1 the call is a prefill into an empty static cache (the only
    case in which transformers skips the mask there), whose queries are the first Q positions.
    """
    K = key.shape[2]
    if K == query_length:
        return key, value, attention_mask
    if attention_mask is None:
        if query_length > 1:
            return key[:, :, :query_length], value[:, :, :query_length], None
        return key, value, None
    seen = attention_mask.reshape(-1, attention_mask.shape[-1]).any(dim=0)  # (K,), or (1,) when broadcast
    if seen.shape[0] != K:
        return key, value, attention_mask
    if torch.compiler.is_compiling():
        return _rotate_unfilled_keys_first(key, value, attention_mask, seen, query_length)
    last_seen = int(torch.nonzero(seen).max()) + 1 if bool(seen.any()) else query_length
    kv_length = max(last_seen, query_length)
    if kv_length == K:
        return key, value, attention_mask
    return key[:, :, :kv_length], value[:, :, :kv_length], attention_mask[..., :kv_length]


def cpu_kernels_compile_fullgraph():
    """True where the package's C++ kernels (custom ops) are available on CPU: then a stick-breaking model's forward,
    its decode steps (dynamic and static cache) and a training step compile with `torch.compile(fullgraph=True)`. The
    pure-PyTorch path (remote code without the package, `stickbreaking_backend="torch"`, a failed build) ends its
    block loops on data (`.item()`), a graph break."""
    return _cpu_kernel(torch.empty(0), "forward") is not None and _cpu_kernel(torch.empty(0), "decode") is not None


def _rotate_unfilled_keys_first(key, value, attention_mask, seen, query_length):
    """`_trim_unfilled_keys` under torch.compile: the cut's length is data (it would break the graph), so the keys are
    rotated instead, the unfilled tail to the front, where the mask hides it from every query (masked keys never break
    the stick, so the result is the same); the real keys then end at K and query i at K - Q + i is where it belongs.
    Costs one gather of k and v per call (the cut was free), and the kernels still visit the masked keys."""
    K = key.shape[2]
    positions = torch.arange(K, device=key.device)
    last_seen = torch.where(seen, positions + 1, 0).amax()
    kv_length = torch.clamp(last_seen, min=query_length)
    order = (positions + kv_length) % K  # new position p holds old key (p + kv_length) mod K
    return key.index_select(2, order), value.index_select(2, order), attention_mask.index_select(-1, order)


def _stickbreaking_options(module, query, scaling, dropout):
    """(attend_current, remainder, scale, backend) from `module.config`, with the defaults of the official model."""
    if dropout:
        raise ValueError(f"`dropout` is not supported by stick-breaking attention, got {dropout!r}; set it to 0.")
    config = getattr(module, "config", None)
    attend_current = bool(getattr(config, "stickbreaking_attend_current", False))
    remainder = getattr(config, "stickbreaking_remainder", "none")
    if remainder not in REMAINDER_MODES:
        raise ValueError(f"`stickbreaking_remainder` must be one of {REMAINDER_MODES}, got {remainder!r}.")
    backend = os.environ.get(BACKEND_ENV_VAR) or getattr(config, "stickbreaking_backend", "auto")
    scale = getattr(config, "stickbreaking_scale", None)
    if scale is None:
        scale = scaling
    return attend_current, remainder, _resolve_scale(scale, query.shape[-1]), backend


def _add_remainder(module, o, rem, value, remainder, H, G, Q, K, Dv):
    """Give the unused stick rem_i to v_i (`"value"`) or to a learned per-head vector (`"bias"`); `o` is [B, HQ, Q, Dv]."""
    if remainder == "value":
        # The leftover stick goes to the value at the query's own key position (K - Q + i), shared within a GQA group.
        own_value = value[:, :, K - Q :].unsqueeze(2)
        return (o.unflatten(1, (H, G)) + rem.unflatten(1, (H, G)).unsqueeze(-1) * own_value.to(o.dtype)).flatten(1, 2)
    if remainder == "bias":
        bias = getattr(module, "stickbreaking_remainder_bias", None)
        if bias is None or tuple(bias.shape) != (H * G, Dv):
            got = None if bias is None else tuple(bias.shape)
            raise ValueError(
                f"`stickbreaking_remainder='bias'` needs `module.stickbreaking_remainder_bias` of shape {(H * G, Dv)}, "
                f"got {got}."
            )
        return o + rem.unsqueeze(-1) * bias.to(o.dtype)[None, :, None, :]
    return o


def stickbreaking_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    r"""
    transformers `AttentionInterface` function for stick-breaking attention (registered as `"stickbreaking"`).

    Options come from `module.config` with defaults, so stock `LlamaAttention` works unchanged:
    `stickbreaking_attend_current` (False), `stickbreaking_remainder` ("none" | "value" | "bias"),
    `stickbreaking_scale` (None -> `scaling` -> 1/sqrt(D)) and `stickbreaking_backend` ("auto" | "torch" | "triton";
    the environment variable `HF_ATTN_VARIANTS_SB_BACKEND` overrides it). Rotary embeddings applied by the caller are
    left as they are (the paper's models use none).

    Args:
        module (torch.nn.Module):
            the attention module; for remainder "bias" it owns `stickbreaking_remainder_bias` of shape `[HQ, Dv]`.
        query (torch.Tensor): `[B, HQ, Q, D]`.
        key (torch.Tensor): `[B, H, K, D]`, the whole cache when decoding (query i sits at key position K - Q + i;
            a static cache's unfilled tail, masked for every query, is dropped first).
        value (torch.Tensor): `[B, H, K, Dv]`.
        attention_mask (Optional[torch.Tensor]):
            None (causal), a bool mask broadcastable to `[B, HQ, Q, K]` (True = attend), or an additive float mask.
        dropout (float): must be 0; attention dropout is not supported.
        scaling (Optional[float]): the module's softmax scale, used when the config sets no `stickbreaking_scale`.

    Returns:
        attn_output (torch.Tensor): `[B, Q, HQ, Dv]`, contiguous.
        attn_weights (None): the fast paths never materialise the weights; `eager_stickbreaking_attention_forward`
            (the family's `attn_implementation="eager"`) returns them.
    """
    mask = _bool_attention_mask(attention_mask)
    key, value, mask = _trim_unfilled_keys(key, value, mask, query.shape[2])
    return _stickbreaking_attention(module, query, key, value, mask, dropout, scaling)


def _stickbreaking_attention(module, query, key, value, mask, dropout, scaling):
    """`stickbreaking_attention_forward` on keys that are all real (no static-cache tail) and a bool mask or None."""
    attend_current, remainder, scale, backend = _stickbreaking_options(module, query, scaling, dropout)
    B, H, G, Q, K, D, Dv = _check_attention_inputs(query, key, value, None)
    attention_op = _select_attention_op(backend, query.device)
    o, rem = attention_op(query, key, value, scale=scale, attend_current=attend_current, attention_mask=mask)
    o = _add_remainder(module, o, rem, value, remainder, H, G, Q, K, Dv)
    return o.transpose(1, 2).contiguous(), None


def eager_stickbreaking_attention_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs
):
    """`stickbreaking_attention_forward` through the plain reference (`naive_stickbreaking_attn`, O(T^2) memory) that
    also returns the weights A `[B, HQ, Q, K]` (for `output_attentions` and attention maps). The family runs it for
    `attn_implementation="eager"` on a stick-breaking model."""
    mask = _bool_attention_mask(attention_mask)
    key, value, mask = _trim_unfilled_keys(key, value, mask, query.shape[2])
    return _eager_stickbreaking_attention(module, query, key, value, mask, dropout, scaling)


def _eager_stickbreaking_attention(module, query, key, value, mask, dropout, scaling):
    """`eager_stickbreaking_attention_forward` on keys that are all real and a bool mask or None."""
    attend_current, remainder, scale, _ = _stickbreaking_options(module, query, scaling, dropout)
    B, H, G, Q, K, D, Dv = _check_attention_inputs(query, key, value, mask)
    o, rem, weights = naive_stickbreaking_attn(
        query, key, value, scale=scale, attend_current=attend_current, attention_mask=mask, return_weights=True
    )
    o = _add_remainder(module, o, rem, value, remainder, H, G, Q, K, Dv)
    return o.transpose(1, 2).contiguous(), weights.to(query.dtype)


def _packed_request_bounds(query, key, cu_seq_lens_q, cu_seq_lens_k):
    """[(q0, q1, k0, k1)] of each packed request (empty ones, e.g. padding, left out), validated on the host."""
    if cu_seq_lens_q is None or cu_seq_lens_k is None:
        raise ValueError(
            "Paged stick-breaking attention needs `cu_seq_lens_q` and `cu_seq_lens_k` (continuous batching passes "
            "them)."
        )
    if query.shape[0] != 1 or key.shape[0] != 1:
        raise ValueError(f"Paged attention takes one packed row (batch 1), got query {tuple(query.shape)}.")
    bounds_q, bounds_k = cu_seq_lens_q.tolist(), cu_seq_lens_k.tolist()
    if len(bounds_q) != len(bounds_k) or bounds_q[0] != 0 or bounds_k[0] != 0:
        raise ValueError(f"`cu_seq_lens_q` {bounds_q} and `cu_seq_lens_k` {bounds_k} must both start at 0 and match.")
    requests = []
    for q0, q1, k0, k1 in zip(bounds_q, bounds_q[1:], bounds_k, bounds_k[1:]):
        if not (0 <= q1 - q0 <= k1 - k0) or q1 > query.shape[2] or k1 > key.shape[2]:
            raise ValueError(
                f"A packed request has queries [{q0}, {q1}) and keys [{k0}, {k1}): its queries must be the last of its "
                f"keys, within the packed lengths ({query.shape[2]} queries, {key.shape[2]} keys)."
            )
        if q1 > q0:
            requests.append((q0, q1, k0, k1))
    return requests


def _paged_attention(attention, module, query, key, value, dropout, scaling, cu_seq_lens_q, cu_seq_lens_k):
    """Continuous batching: query `[1, HQ, total_q, D]` packs the new tokens of many requests and key/value
    `[1, H, total_k, D]` each request's past + new keys (what the paged cache's `update` returns). Each request runs
    `attention` over its own keys alone, its queries at their end (query i of request r at key position
    past_r + i), so every request has its own stick and early exit. Rows of no request (padding) are zero.
    `attention` is `_stickbreaking_attention` or `_eager_stickbreaking_attention`."""
    requests = _packed_request_bounds(query, key, cu_seq_lens_q, cu_seq_lens_k)
    output = query.new_zeros(1, query.shape[2], query.shape[1], value.shape[-1])
    weights = None
    for q0, q1, k0, k1 in requests:
        # Not the public forwards: they would read K > Q > 1 without a mask as a prefill into a static cache.
        o, w = attention(module, query[:, :, q0:q1], key[:, :, k0:k1], value[:, :, k0:k1], None, dropout, scaling)
        output[:, q0:q1] = o
        if w is not None:  # the reference's weights, block-diagonal over the packed keys (as paged eager returns)
            if weights is None:
                weights = w.new_zeros(1, query.shape[1], query.shape[2], key.shape[2])
            weights[:, :, q0:q1, k0:k1] = w
    return output, weights


def _packed_prefill_op(query, key, cu_seq_lens_q, cu_seq_lens_k, backend):
    """The Triton op (CUDA, or `TRITON_INTERPRET=1`) when one varlen call can take the whole batch: every request a
    prefill without past keys (`cu_seq_lens_q == cu_seq_lens_k`, no padding rows); else None."""
    if cu_seq_lens_q is None or cu_seq_lens_k is None or query.shape[2] != key.shape[2]:
        return None
    if not torch.equal(cu_seq_lens_q, cu_seq_lens_k) or int(cu_seq_lens_q[-1]) != query.shape[2]:
        return None
    attention_op = _select_attention_op(backend, query.device)
    blockwise = attention_op is blockwise_stickbreaking_attn or isinstance(attention_op, functools.partial)
    return None if blockwise else attention_op  # the blockwise op has no varlen form


@torch.compiler.disable  # one host sync per call to split the packed requests
def paged_stickbreaking_attention_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, cu_seq_lens_q=None, cu_seq_lens_k=None,
    **kwargs,
):
    """`stickbreaking_attention_forward` for continuous batching's packed paged K/V (see `_paged_attention`); the
    attention mask (softmax's block-diagonal one) is not needed: `cu_seq_lens_q/k` say which keys each request sees.
    On CUDA a batch of prefills without past keys is one call of the Triton varlen kernel."""
    attend_current, remainder, scale, backend = _stickbreaking_options(module, query, scaling, dropout)
    varlen_op = _packed_prefill_op(query, key, cu_seq_lens_q, cu_seq_lens_k, backend)
    if varlen_op is not None:
        _, H, G, Q, K, _, Dv = _check_attention_inputs(query, key, value, None)
        o, rem = varlen_op(query, key, value, scale=scale, attend_current=attend_current, cu_seqlens=cu_seq_lens_q)
        # Q == K: each query's own key is at its own packed index, as `_add_remainder` takes it.
        o = _add_remainder(module, o, rem, value, remainder, H, G, Q, K, Dv)
        return o.transpose(1, 2).contiguous(), None
    return _paged_attention(
        _stickbreaking_attention, module, query, key, value, dropout, scaling, cu_seq_lens_q, cu_seq_lens_k
    )


@torch.compiler.disable
def eager_paged_stickbreaking_attention_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, cu_seq_lens_q=None, cu_seq_lens_k=None,
    **kwargs,
):
    """`eager_stickbreaking_attention_forward` (the reference, with weights) per packed request: what a stick-breaking
    model runs under continuous batching's `"paged|eager"`."""
    return _paged_attention(
        _eager_stickbreaking_attention, module, query, key, value, dropout, scaling, cu_seq_lens_q, cu_seq_lens_k
    )


def register_stickbreaking_attention():
    """Register `"stickbreaking"` with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(STICKBREAKING_ATTENTION_NAME, stickbreaking_attention_forward)
    # Without a mask function transformers builds no mask at all and padding would be silently ignored.
    AttentionMaskInterface.register(STICKBREAKING_ATTENTION_NAME, sdpa_mask)


register_stickbreaking_attention()
