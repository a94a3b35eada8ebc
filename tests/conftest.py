"""Test-session set-up: without a real GPU, numba.cuda kernels run in Numba's CUDA simulator."""

import os
import sys

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)  # so test modules can `import gradcheck`

if not (os.path.exists("/dev/nvidia0") or os.environ.get("MINILLM_REAL_GPU")):
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")


@pytest.fixture
def fast_simulator_threads():
    """A short GIL switch interval while a test runs: the CUDA simulator runs every GPU thread as a Python
    thread and polls them at each barrier, which this makes ~8x faster."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(old)
