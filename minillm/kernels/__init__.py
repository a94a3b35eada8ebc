"""Hot loops: a NumPy/Python reference, a Numba CPU kernel and (where useful) a numba.cuda kernel each."""
