import os

# Triton kernels run in its CPU interpreter when no GPU exists; the variable must be set before triton is imported.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests never reach a hub: everything is built locally or shipped in a wheel.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
