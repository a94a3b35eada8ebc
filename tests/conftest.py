"""Test-session set-up: without a real GPU, numba.cuda kernels run in Numba's CUDA simulator."""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)  # so test modules can `import gradcheck`

if not (os.path.exists("/dev/nvidia0") or os.environ.get("MINILLM_REAL_GPU")):
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
