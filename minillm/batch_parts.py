"""A micro-batch computed as a few equal parts, each on its own core: data parallelism inside one process.

    P = batch_parts.count(wanted, batch_size, config, like)   how many parts a micro-batch is cut into (1: none)
    n = batch_parts.independent(wanted, config, like)          how many computations may run side by side
    (like: an array of the computation; its kernels decide, as kernels.pick does)
    results = batch_parts.run(fn, jobs)                     [fn(*job) for job in jobs], the jobs side by side
    with batch_parts.as_one_part(): ...                      this thread computes as a part does (profiling)
    groups = batch_parts.balanced(items, weights, n)       items in n consecutive groups of about equal weight

Why: at the default size (B 32, T 64, d 128) a step is some 500 calls of a few hundred microseconds each,
and every one of them splits over the cores on its own (OpenBLAS, Numba's parallel loops), with a fork and
a join per call, while the other library's threads may still be spinning. Instead each part runs the whole
forward and backward on one thread, with single-threaded BLAS and Numba kernels (the kernels release the
GIL, as NumPy's matrix products do), and the parts meet once, when train_step sums their gradients. On a
2-core AMD EPYC the default step went from 222-256 ms to 166-187 ms (medians of 60 steps, three runs each).

Part p always holds rows p*B/P .. (p+1)*B/P of the micro-batch, and train_step adds the parts' gradients
in part order, as it adds micro-batches'. With more threads allowed than parts (or just one), `run` computes
the parts one after the other, each with every thread; side by side only where that is all of them. Either
way the result is the same on every run of one machine (which way is a function of its thread budget), but
not bitwise the same between the two ways: OpenBLAS's products round differently on one thread than on
several.
"""

import contextlib
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from minillm import kernels
from minillm.nn import blas

_POOL = {}
_LOCK = threading.Lock()


def count(wanted, batch_size, config, like):
    """The parts to cut a micro-batch of batch_size sequences into: `wanted` where it divides the batch and
    `independent` allows it, else 1."""
    wanted = independent(wanted, config, like)
    return wanted if batch_size % wanted == 0 else 1


def independent(wanted, config, like):
    """How many computations of this model on arrays like `like` may run side by side: `wanted`, but 1 where
    the CUDA kernels would run (a GPU's arrays, the CUDA simulator's, or kernels.forced("cuda"): a GPU runs
    one, the simulator one kernel at a time) and for two kinds of model whose
    step is not a sum over sequences: a Mixture-of-Experts layer (its load-balancing loss is a product of
    batch-wide fractions) and LoRA dropout with a generator (the parts would draw from it in a racing order)."""
    wanted = int(wanted)
    if wanted < 1:
        raise ValueError(f"batch_parts must be at least 1, got {wanted}")
    moe = int(config.get("n_experts", 0) or 0) > 0
    lora = config.get("lora") or {}
    lora_dropout = float(lora.get("dropout", 0.0) or 0.0) > 0.0 and lora.get("dropout_rng") is not None
    return 1 if kernels.implementation_for(like) == "cuda" or moe or lora_dropout else wanted


def balanced(items, weights, n):
    """items in at most n consecutive, non-empty groups whose summed weights are about equal (a new group
    starts at the item whose middle lies past the next k/n of the total weight)."""
    total, groups, running = sum(weights), [[]], 0
    for item, weight in zip(items, weights):
        if groups[-1] and len(groups) < n and running + weight / 2 > total * len(groups) / n:
            groups.append([])
        groups[-1].append(item)
        running += weight
    return [g for g in groups if g]


def _cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:           # not Linux
        return os.cpu_count() or 1


def _threads():
    """The threads this process may use: its cores, no more than Numba and OpenBLAS were given (e.g. 1 each
    under OMP_NUM_THREADS=1, as benchmarks/data_parallel.py runs its ranks)."""
    import numba

    blas_threads = blas.threads()
    return min(_cores(), numba.config.NUMBA_NUM_THREADS, blas_threads or _cores())


def side_by_side(parts):
    """Whether `run` computes `parts` jobs on threads of their own: when this process may use at least two
    threads and at most `parts`, and Numba's threading layer may be entered from several threads at once
    (omp or tbb; its fallback, workqueue, aborts the process on a concurrent parallel loop)."""
    return 2 <= _threads() <= parts and _threadsafe_numba()


@functools.cache
def _threadsafe_numba():
    import numba

    from minillm.kernels import gelu    # any parallel kernel: Numba picks its layer at the first one

    gelu.forward(np.zeros((1, 1), np.float32))
    return numba.threading_layer() in ("omp", "tbb")


def _worker_init():
    import numba

    numba.set_num_threads(1)         # thread-local: this thread's parallel kernels run on it alone


def _as_part(fn, job):
    with blas.serial_thread():
        return fn(*job)


@contextlib.contextmanager
def as_one_part():
    """Within the block this thread computes as `run`'s threads do: OpenBLAS and its Numba kernels on one
    thread, bmm one plain matmul (for benchmarks/train_gpt.py --profile: where a part's time goes)."""
    import numba

    saved = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        with blas.single_threaded_blas(), blas.serial_thread():
            yield
    finally:
        numba.set_num_threads(saved)


def _pool(workers):
    with _LOCK:
        if workers not in _POOL:
            _POOL[workers] = ThreadPoolExecutor(workers, thread_name_prefix="minillm-part",
                                                initializer=_worker_init)
        return _POOL[workers]


if hasattr(os, "register_at_fork"):       # a forked child has none of the pools' threads
    os.register_at_fork(after_in_child=_POOL.clear)


def run(fn, jobs):
    """[fn(*job) for job in jobs], side by side when `side_by_side(len(jobs))`, with OpenBLAS held at one
    thread meanwhile. Every job finishes before the first exception, if any, is raised."""
    jobs = list(jobs)
    if not side_by_side(len(jobs)):
        return [fn(*job) for job in jobs]
    pool = _pool(len(jobs))
    with blas.single_threaded_blas():
        futures = [pool.submit(_as_part, fn, job) for job in jobs]
        errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error
    return [f.result() for f in futures]
