"""minillm: the building blocks of modern language models in NumPy/Numba, with hand-written backprop."""

import os

# Numba's OpenMP workers otherwise spin after each parallel kernel and steal the cores from the BLAS calls
# that follow (measured 3x slower steps on 2 cores). Set before Numba loads; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# A CuPy array names its stream (CUDA array interface v3), and Numba by default waits on the host for that
# stream at every kernel launch that takes such an array. minillm's CuPy work and numba.cuda kernels all run
# on the one default stream, which keeps their order anyway: the wait would only stop the CPU from queueing
# work ahead of the GPU. Set before Numba loads; an explicit setting wins.
os.environ.setdefault("NUMBA_CUDA_ARRAY_INTERFACE_SYNC", "0")

__version__ = "0.1.0"
