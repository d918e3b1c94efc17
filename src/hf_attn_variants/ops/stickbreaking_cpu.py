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
"""

from __future__ import annotations

import logging
import os
import threading

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
    """`forward(q5, k, v, scale, attend_current, mask, block_size, max_key_norm) -> [o, rem]` or None."""
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

        logger.info("building the stick-breaking CPU kernel (once; %s=0 skips it)", ENV_VAR)
        module = load(
            name="hf_attn_variants_stickbreaking_cpu",
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
