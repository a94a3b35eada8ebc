"""minillm.heap: freed arrays stay in the process, so the next step's arrays do not fault their pages in again.

Counted in page faults (getrusage), not time: each check runs in a fresh interpreter, since mallopt is
process-wide and the other tests' allocations would move glibc's adaptive thresholds."""

import subprocess
import sys

import pytest

from minillm import heap

FAULTS = """
import resource, sys
import numpy as np
if sys.argv[1] == "kept":
    from minillm import heap
    assert heap.keep_freed_memory()
for _ in range(3):                                   # settle: the first arrays fault in whatever happens
    np.ones((4096, 512), np.float32)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):                                  # 8 MiB each, freed at once: a training step's pattern
    a = np.ones((4096, 512), np.float32); b = a + 1.0; del a, b
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

glibc = pytest.mark.skipif(not heap.keep_freed_memory(), reason="no glibc here: keep_freed_memory is a no-op")


def _faults(mode):
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True)
    return int(out.stdout)


@glibc
def test_freed_arrays_are_reused_without_faulting_their_pages_again():
    default, kept = _faults("default"), _faults("kept")
    pages = 2 * 20 * 4096 * 512 * 4 // 4096          # what faulting every array in would cost (4 KiB pages)
    assert kept < pages // 20, (kept, pages)
    assert default > kept * 10, (default, kept)       # the check can fail: glibc's defaults do fault them in


def test_is_idempotent_and_says_whether_it_applied():
    first = heap.keep_freed_memory()
    assert isinstance(first, bool) and heap.keep_freed_memory() is first


def test_fit_keeps_freed_memory(monkeypatch):
    from minillm import train

    calls = []
    monkeypatch.setattr(heap, "keep_freed_memory", lambda: calls.append(1) or True)
    with pytest.raises(AttributeError):
        train.fit(None, None, None, None, None, None)      # fails after the call, on opts=None
    assert calls
