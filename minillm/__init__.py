"""minillm: the building blocks of modern language models in NumPy/Numba, with hand-written backprop."""

__version__ = "0.1.0"
