"""Run a snippet in a child interpreter with NUMBA_BOUNDSCHECK=1: an out-of-bounds read or write in a Numba
kernel raises there instead of reading or corrupting memory. The child gets its own Numba cache (the
kernels cached elsewhere were compiled without the checks) and this checkout on its path."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def boundscheck_env(cache_dir):
    """The environment of such a child: bounds checks on, Numba's cache in cache_dir, the checkout first."""
    return {**os.environ, "NUMBA_BOUNDSCHECK": "1", "NUMBA_CACHE_DIR": str(cache_dir),
            "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}


def assert_runs_with_boundscheck(code, cache_dir, done="bounds ok", timeout=600):
    """Run `code` (which prints `done` at its end) in a bounds-checked child; fail with its stderr otherwise."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=boundscheck_env(cache_dir),
                       cwd=ROOT, timeout=timeout, stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and done in r.stdout, r.stderr[-3000:]
