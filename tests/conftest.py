"""Test-session set-up: without a real GPU, numba.cuda kernels run in Numba's CUDA simulator; the token
cache (MINILLM_CACHE) is a temporary directory, never the user's real cache; `corpus` is a small training
text (the first 300 headlines) for the tests that train through the CLI."""

import os
import sys

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
HEADLINES = os.path.join(_HERE, "..", "data", "headlines.txt")
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


@pytest.fixture(scope="session", autouse=True)
def token_cache_in_tmp(tmp_path_factory):
    """Every test (and every module-scoped fixture, which session fixtures precede) caches tokens under a
    temporary MINILLM_CACHE; a test that needs its own empty cache sets MINILLM_CACHE again."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINILLM_CACHE", str(tmp_path_factory.mktemp("minillm-cache")))
        yield


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Path of a text file holding the first 300 lines of data/headlines.txt (one per test module)."""
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    with open(HEADLINES, encoding="utf-8") as f:
        path.write_text("".join(f.readlines()[:300]), encoding="utf-8")
    return str(path)
