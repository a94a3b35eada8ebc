"""Keep freed array memory in the process between training steps: `keep_freed_memory()`.

    keep_freed_memory() -> bool      True where the C library took the settings (glibc), else a no-op

A training step allocates the same few dozen activation and gradient arrays, megabytes each, frees them,
and allocates them again on the next step. glibc serves a block above its mmap threshold (128 KiB at
first, adapting up to 32 MiB) with a fresh mmap and returns it to the kernel with munmap when freed, and
trims the top of its heap back to the kernel too; so every step faults its arrays back in page by page,
each page zeroed by the kernel. Measured on the small GPT (B32 T64 d128, 2-core AMD EPYC): a `x @ w + b`
into a new (2048, 512) float32 array took 6.0 ms against 2.2 ms with the settings below, and a whole
forward + backward 262 ms against 159 ms (benchmarks/train_gpt.py prints the figures of a run).

The settings raise both thresholds to 1 GiB, so blocks up to that size come from the heap and freed ones
stay there for the next step. The cost is that the process keeps its high-water mark of freed memory
(the next step needs it again); peak memory is unchanged. mallopt is process-wide, so it is set by the
entry points that run a loop of steps (train.fit, the CLI, the benchmarks), never on import.
"""

import ctypes
import ctypes.util
import functools
import sys

M_TRIM_THRESHOLD = -1          # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30

@functools.cache
def keep_freed_memory():
    """Raise glibc's mmap and trim thresholds to KEEP_BYTES (once per process); False where there is no glibc."""
    ok = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            gnu = libc.gnu_get_libc_version          # glibc only: musl's mallopt does nothing
            gnu.restype = ctypes.c_char_p
            gnu()
            ok = libc.mallopt(M_MMAP_THRESHOLD, KEEP_BYTES) == 1 and libc.mallopt(M_TRIM_THRESHOLD, KEEP_BYTES) == 1
        except (OSError, AttributeError):
            ok = False
    return ok
