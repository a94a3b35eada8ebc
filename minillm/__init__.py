"""minillm: the building blocks of modern language models in NumPy/Numba, with hand-written backprop."""

import os

# Numba's OpenMP workers otherwise spin after each parallel kernel and steal the cores from the BLAS calls
# that follow (measured 3x slower steps on 2 cores). Set before Numba loads; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
