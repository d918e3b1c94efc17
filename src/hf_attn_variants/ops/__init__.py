"""Fast ops for hf_attn_variants.

Importing this package is cheap: the Triton kernels (and triton itself) load on first use of an entry point, so
`import hf_attn_variants.ops` works on machines without triton; calling a kernel there raises ImportError.
"""

import importlib

__all__ = ["parallel_stickbreaking_attn", "decode_stickbreaking_attn"]

_LAZY = {
    "parallel_stickbreaking_attn": "hf_attn_variants.ops.stickbreaking",
    "decode_stickbreaking_attn": "hf_attn_variants.ops.stickbreaking",
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(_LAZY[name])
    except ImportError as e:
        raise ImportError(
            f"`{name}` needs triton (pip install triton; on CPU set TRITON_INTERPRET=1 before importing triton): {e}"
        ) from e
    return getattr(module, name)
