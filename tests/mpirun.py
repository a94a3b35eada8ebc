"""Run minillm under `mpiexec -n N` on localhost for the tests, or skip them when MPI is missing.

The mpiexec is the one next to sys.executable (the `mpich` wheel installs it into the virtualenv, beside
the python whose mpi4py loads that MPI), else the first on PATH. Hydra (MPICH) gets `-launcher fork`, so
that it never tries ssh for localhost; Open MPI gets `--oversubscribe` (more ranks than cores) and
`--allow-run-as-root` (CI containers). Every rank runs with one BLAS / OpenMP / Numba thread, and the
checkout comes first on PYTHONPATH.
"""

import functools
import importlib.util
import os
import shutil
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_THREAD = {"OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "MKL_NUM_THREADS": "1"}


@functools.lru_cache(maxsize=None)
def mpiexec():
    """[mpiexec, flavour flags...], or None without mpi4py or an mpiexec."""
    if importlib.util.find_spec("mpi4py") is None:
        return None
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    path = here if os.access(here, os.X_OK) else shutil.which("mpiexec")
    if path is None:
        return None
    try:
        version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    if "HYDRA" in version:
        return [path, "-launcher", "fork"]
    if "Open MPI" in version or "OpenRTE" in version:
        return [path, "--oversubscribe", "--allow-run-as-root"]
    return [path]


needs_mpi = pytest.mark.skipif(mpiexec() is None, reason="needs mpi4py and mpiexec: pip install -e \".[mpi]\"")


def run_mpi(n, args, cwd=None, env=None, timeout=60):
    """`mpiexec -n n python ARGS...` -> subprocess.CompletedProcess (text output); a hang fails the test."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "MINILLM_TEST_"))}
    full_env.update(ONE_THREAD)
    full_env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [full_env.get("PYTHONPATH")] if p])
    full_env.update(env or {})
    command = mpiexec() + ["-n", str(n), sys.executable] + [str(a) for a in args]
    # its own process group, so that a hang kills mpiexec and every rank it started
    proc = subprocess.Popen(command, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(command)} hung for {timeout} s:\n{err}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def minillm(n, *args, **kw):
    """`mpiexec -n n python -m minillm ARGS...`."""
    return run_mpi(n, ["-m", "minillm", *args], **kw)
