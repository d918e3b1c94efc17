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


if "torch" in globals():
    import pytest

    @pytest.fixture(autouse=True, scope="module")
    def restore_torch_threads():
        """CLIs and scripts set torch's thread count for the process (as they should): every module gets it back."""
        threads = torch.get_num_threads()
        yield
        torch.set_num_threads(threads)

    @pytest.fixture(scope="module")
    def one_torch_thread():
        """Tiny models: one thread is faster, and OpenMP threads spinning against each other on a busy machine are
        slow. A module opts in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(threads)
