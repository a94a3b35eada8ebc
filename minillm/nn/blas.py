"""BLAS threading for the many small matrix products of attention: `bmm` and `single_threaded_blas`.

    bmm(a, b, out=None) -> a @ b      a: (..., M, K), b: (..., K, N), leading axes equal; split over threads
    with single_threaded_blas(): ...  OpenBLAS on one thread inside the block (the decoding step)
    with serial_thread(): ...         this thread's bmm calls run as one plain matmul (batch_parts' threads)
    threads() -> int or None          the threads bmm splits over (None without OpenBLAS)

Used by nn/attention.py (GPT-2) and nn/gqa.py (grouped-query attention); the models' `step` functions
take `single_threaded_blas` from there.
"""

import contextlib
import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from minillm.arrays import array_module

# --- BLAS threading ---------------------------------------------------------------------------------
# NumPy gives a stacked matmul to BLAS one small (T, hd) x (hd, T) product at a time, and OpenBLAS
# splits each of them over its threads: a synchronisation per product, which collapses (10x and worse,
# measured) as soon as another process holds a core; the one-token matrix-vector products of the
# decoding step suffer the same (and, being memory-bound, gain little from a second thread). Instead,
# like torch's bmm, `bmm` splits the stack over a few Python threads (matmul releases the GIL) while
# OpenBLAS runs single-threaded, and `single_threaded_blas` serves the decoding step. OpenBLAS's thread
# count is process-wide (its "thread-local" setter is not, in pthread builds), so it is lowered for the
# call and restored. Without OpenBLAS (MKL, cupy, ...) both fall back to plain matmul.

_BLAS = {}
_BLAS_LOCK = threading.RLock()
_THIS_THREAD = threading.local()


@contextlib.contextmanager
def serial_thread():
    """Within the block this thread's `bmm` is one plain matmul: for the threads of minillm.batch_parts,
    which run beside each other while OpenBLAS is held at one thread (by the thread that started them)."""
    saved = getattr(_THIS_THREAD, "serial", False)
    _THIS_THREAD.serial = True
    try:
        yield
    finally:
        _THIS_THREAD.serial = saved


def _find_openblas():
    with open("/proc/self/maps") as maps:
        paths = sorted({ln.split()[-1] for ln in maps if "openblas" in ln and ".so" in ln})
    for path in paths:
        lib = ctypes.CDLL(path)
        names = ("scipy_openblas_{}_num_threads64_", "openblas_{}_num_threads64_", "openblas_{}_num_threads")
        get = next((getattr(lib, n.format("get")) for n in names if hasattr(lib, n.format("get"))), None)
        put = next((getattr(lib, n.format("set")) for n in names if hasattr(lib, n.format("set"))), None)
        if get is not None and put is not None:
            get.restype, put.argtypes = ctypes.c_int, [ctypes.c_int]
            return get, put
    return None


def _openblas():
    """-> (get_num_threads, set_num_threads, ThreadPoolExecutor or None, workers) or None."""
    with _BLAS_LOCK:
        if "api" not in _BLAS:
            try:
                found = _find_openblas()
            except (OSError, AttributeError, ValueError):
                found = None
            if found is None:
                _BLAS["api"] = None
            else:
                workers = max(1, min(int(found[0]()), os.cpu_count() or 1, 8))
                pool = ThreadPoolExecutor(workers, thread_name_prefix="minillm-bmm") if workers > 1 else None
                _BLAS["api"] = (*found, pool, workers)
        return _BLAS["api"]


if hasattr(os, "register_at_fork"):       # a forked child has none of the pool's threads
    os.register_at_fork(after_in_child=_BLAS.clear)


def threads():
    """The threads `bmm` splits a stack over: OpenBLAS's thread count when first asked, at most the cores and
    8 (so not lowered inside `single_threaded_blas`); None without OpenBLAS."""
    api = _openblas()
    return None if api is None else api[3]


@contextlib.contextmanager
def single_threaded_blas():
    """Run the block with OpenBLAS on one thread (no-op without OpenBLAS)."""
    api = _openblas()
    if api is None:
        yield
        return
    with _BLAS_LOCK:
        saved = api[0]()
        api[1](1)
        try:
            yield
        finally:
            api[1](saved)


def bmm(a, b, out=None):
    """a: (B, H, ..., M, K) @ b: (B, H, ..., K, N) -> (B, H, ..., M, N), into out when given (any strides);
    the stack is split over the first axis (over the second when B = 1)."""
    xp = array_module(a)
    if out is None:
        out = xp.empty(a.shape[:-1] + b.shape[-1:], dtype=a.dtype)
    api = _openblas() if xp is np and not getattr(_THIS_THREAD, "serial", False) else None
    if api is None or api[2] is None or a.shape[0] * a.shape[1] < 2:
        return xp.matmul(a, b, out=out)
    pool, workers = api[2], api[3]
    sa, sb, so = (a[0], b[0], out[0]) if a.shape[0] == 1 else (a, b, out)   # B = 1: split heads
    edges = np.linspace(0, sa.shape[0], min(sa.shape[0], 2 * workers) + 1).astype(int)
    with single_threaded_blas():
        jobs = [pool.submit(np.matmul, sa[i:j], sb[i:j], out=so[i:j]) for i, j in zip(edges, edges[1:])]
        for job in jobs:
            job.result()
    return out
