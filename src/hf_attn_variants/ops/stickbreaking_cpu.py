"""The C++ CPU kernels of the blockwise stick-breaking op (built on first use with torch's extension tools).

`csrc/stickbreaking_cpu.cpp` runs `stickbreaking_torch._blockwise_forward`'s algorithm with torch's threads over
(batch, kv head, query block) and the elementwise work of each block fused into one sweep per row (one exp per score,
the stick as a running product); its `decode` is the same algorithm for a few queries over a long cache, with
hand-vectorised scores and accumulation in place of per-block GEMM calls, and its `backward` recomputes the weights
the same way, block by block, with the PyTorch backward's split of the farther-key sums (in-block sums direct,
farther blocks from the row total). Same numerics: beta = 1 / (1 + e^{-z}) and 1 - beta = e^{-z} beta never cancel,
|z| is clamped where the PyTorch path clamps it, masked keys get exactly 0, the same exact early exit; float32 uses
ATen's exp_u20 (the exp of its flash attention), float64 SLEEF's 1-ulp exp.

The first call compiles the kernels with the machine's C++ compiler (about a minute, once; cached by torch in
`TORCH_EXTENSIONS_DIR`, default `~/.cache/torch_extensions`). Without a working compiler, or with
`HF_ATTN_VARIANTS_CPU_KERNEL=0`, `forward_kernel()`, `backward_kernel()` and `decode_kernel()` return None and the
model keeps the pure PyTorch path, which is also what a checkpoint loaded as remote code without this package runs.

The kernels are registered as torch.library custom ops, so `torch.compile(fullgraph=True)` traces through them
(importing this module registers them; the C++ build still happens on the first real call):
`hf_attn_variants::sb_cpu_forward` (with `register_autograd`: its backward is `sb_cpu_backward`), `sb_cpu_backward` and
`sb_cpu_decode`, each with a fake (meta) implementation for tracing. `forward_op()`, `backward_op()` and `decode_op()`
return them, or None where the kernels are unavailable.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Optional

import torch

logger = logging.getLogger(__name__)

ENV_VAR = "HF_ATTN_VARIANTS_CPU_KERNEL"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "stickbreaking_cpu.cpp")
_lock = threading.Lock()
_state: dict = {}


def enabled() -> bool:
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def _module():
    """The built extension, or None (disabled, or the build failed: logged once, with the reason)."""
    if not enabled():
        return None
    with _lock:
        if "module" not in _state:
            _state["module"] = _build()
    return _state["module"]


def forward_kernel():
    """`forward(q5, k, v, scale, attend_current, mask, block_size) -> [o, rem]` or None (the raw extension function;
    the model calls the custom ops below)."""
    module = _module()
    return None if module is None else module.forward


def backward_kernel():
    """`backward(q5, k, v, do5, drem5, row_totals, row_bounds, scale, attend_current, mask, block_size)
    -> [dq5, dk, dv]` or None."""
    module = _module()
    return None if module is None else module.backward


def decode_kernel():
    """`decode(q5, k, v, scale, attend_current, mask, block_size) -> [o, rem]` (few queries, any k/v strides with a
    contiguous last dimension) or None."""
    module = _module()
    return None if module is None else module.decode


def _build():
    try:
        import shutil
        import sysconfig

        from torch.utils.cpp_extension import load

        scripts = sysconfig.get_path("scripts")  # pip's `ninja` lands here, off PATH when the venv is not activated
        if shutil.which("ninja") is None and shutil.which("ninja", path=scripts):
            os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")

        import hashlib

        # The source's hash in the name: processes running different versions of the source (an editable install
        # being edited, two checkouts) never share, rebuild under each other or load the wrong build.
        with open(SOURCE, "rb") as source:
            digest = hashlib.sha1(source.read()).hexdigest()[:12]
        logger.info("building the stick-breaking CPU kernel (once; %s=0 skips it)", ENV_VAR)
        module = load(
            name=f"hf_attn_variants_stickbreaking_cpu_{digest}",
            sources=[SOURCE],
            # -fopenmp: at::parallel_for is a header template whose threads are OpenMP pragmas.
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
        return module
    except Exception as error:  # no compiler, no ninja, unsupported flags: the PyTorch path still works
        logger.warning("stick-breaking CPU kernel unavailable (%s: %s); using the PyTorch path",
                       type(error).__name__, str(error).splitlines()[0] if str(error) else "")
        return None


# ----------------------------------------------------------------------------------------------------------------------
# torch.library custom ops (what the model calls: traceable by torch.compile, autograd through register_autograd)
# ----------------------------------------------------------------------------------------------------------------------
# Shapes: q5 (B, H, G, Q, D), k (B, H, K, D), v (B, H, K, Dv); mask None or bool with 5 dims broadcastable to
# (B, H, G, Q, K), True = may attend. Query i sits at key position K - Q + i.


def _require_module():
    module = _module()
    if module is None:
        raise RuntimeError(f"the stick-breaking CPU kernels are unavailable (build failed, or {ENV_VAR}=0)")
    return module


@torch.library.custom_op("hf_attn_variants::sb_cpu_forward", mutates_args=(), device_types="cpu")
def sb_forward(q5: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, attend_current: bool,
               mask: Optional[torch.Tensor], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise stick-breaking forward -> (o (B, H, G, Q, Dv), rem (B, H, G, Q)), fp32 or fp64."""
    o, rem = _require_module().forward(q5, k, v, scale, attend_current, mask, block_size)
    return o, rem


@sb_forward.register_fake
def _(q5, k, v, scale, attend_current, mask, block_size):
    return q5.new_empty((*q5.shape[:-1], v.shape[-1])), q5.new_empty(q5.shape[:-1])


@torch.library.custom_op("hf_attn_variants::sb_cpu_backward", mutates_args=(), device_types="cpu")
def sb_backward(q5: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do5: torch.Tensor, drem5: torch.Tensor,
                row_totals: torch.Tensor, row_bounds: torch.Tensor, scale: float, attend_current: bool,
                mask: Optional[torch.Tensor], block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `sb_forward` -> (dq5, dk, dv). row_totals (B, H, G, Q) float64: do_i . o_i - drem_i (1 - rem_i);
    row_bounds (B, H, G, Q): |do_i| max_j |v_j| + |drem_i|, rounded up (see the C++ `rows_block_grads`)."""
    dq5, dk, dv = _require_module().backward(q5, k, v, do5, drem5, row_totals, row_bounds, scale, attend_current, mask,
                                             block_size)
    return dq5, dk, dv


@sb_backward.register_fake
def _(q5, k, v, do5, drem5, row_totals, row_bounds, scale, attend_current, mask, block_size):
    return torch.empty_like(q5, memory_format=torch.contiguous_format), torch.empty_like(
        k, memory_format=torch.contiguous_format), torch.empty_like(v, memory_format=torch.contiguous_format)


@torch.library.custom_op("hf_attn_variants::sb_cpu_decode", mutates_args=(), device_types="cpu")
def sb_decode(q5: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, attend_current: bool,
              mask: Optional[torch.Tensor], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Few queries over a long cache, forward only (k, v read in place: any strides, contiguous last dimension)."""
    o, rem = _require_module().decode(q5, k, v, scale, attend_current, mask, block_size)
    return o, rem


@sb_decode.register_fake
def _(q5, k, v, scale, attend_current, mask, block_size):
    return q5.new_empty((*q5.shape[:-1], v.shape[-1])), q5.new_empty(q5.shape[:-1])


def row_grad_totals(do5, drem5, o5, rem5):
    """sum_j g_ij over all keys of row i, in float64: do_i . o_i - drem_i (1 - rem_i) (no float64 copy of do or o)."""
    return (do5 * o5).sum(-1, dtype=torch.float64) - drem5.double() * (1.0 - rem5.double())


def row_grad_bounds(do5, drem5, v):
    """|g_ij| <= A_ij * bound_i with bound_i = |do_i| max_j |v_j| + |drem_i|, rounded up; (B, H, G, Q)."""
    max_value_norm = v.norm(dim=-1).amax(-1) if v.shape[-2] else v.new_zeros(v.shape[:2])
    return (do5.norm(dim=-1) * max_value_norm[:, :, None, None] + drem5.abs()) * (1 + 64 * torch.finfo(v.dtype).eps)


def _forward_setup_context(ctx, inputs, output):
    q5, k, v, scale, attend_current, mask, block_size = inputs
    o5, rem5 = output
    ctx.save_for_backward(q5, k, v, o5, rem5, mask)
    ctx.scale, ctx.attend_current, ctx.block_size = scale, attend_current, block_size


def _forward_backward(ctx, do5, drem5):
    q5, k, v, o5, rem5, mask = ctx.saved_tensors
    do5 = torch.zeros_like(o5) if do5 is None else do5
    drem5 = torch.zeros_like(rem5) if drem5 is None else drem5
    dq5, dk, dv = sb_backward(q5, k, v, do5, drem5, row_grad_totals(do5, drem5, o5, rem5),
                              row_grad_bounds(do5, drem5, v), ctx.scale, ctx.attend_current, mask, ctx.block_size)
    return dq5, dk, dv, None, None, None, None


sb_forward.register_autograd(_forward_backward, setup_context=_forward_setup_context)


def _available_op(op):
    return op if _module() is not None else None


def forward_op():
    """`torch.ops.hf_attn_variants.sb_cpu_forward` (differentiable) where the kernels are available, else None."""
    return _available_op(torch.ops.hf_attn_variants.sb_cpu_forward)


def backward_op():
    """`torch.ops.hf_attn_variants.sb_cpu_backward` where the kernels are available, else None."""
    return _available_op(torch.ops.hf_attn_variants.sb_cpu_backward)


def decode_op():
    """`torch.ops.hf_attn_variants.sb_cpu_decode` where the kernels are available, else None."""
    return _available_op(torch.ops.hf_attn_variants.sb_cpu_decode)
