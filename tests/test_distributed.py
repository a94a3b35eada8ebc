"""distributed.py without MPI: the one-process world, the pickle-free packing, the launcher checks."""

import sys

import numpy as np
import pytest

from minillm import distributed


def test_one_process_world_is_a_no_op():
    w = distributed.World()
    assert (w.rank, w.size, w.local_rank) == (0, 1, 0)
    grads = {"a": np.arange(4.0), "b": np.ones((2, 3), np.float32)}
    assert w.average_gradients(grads) is grads                      # K = 1: untouched, the same arrays
    halved = w.average_gradients(grads, 2)
    np.testing.assert_array_equal(halved["a"], np.arange(4.0) / 2)
    assert halved["b"].dtype == np.float32
    assert w.on_root(lambda: {"x": 1}) == {"x": 1} and w.broadcast([1, "a"]) == [1, "a"]
    assert w.gather({"s": 2}) == [{"s": 2}] and w.every_rank(lambda: 3) == 3
    np.testing.assert_array_equal(w.sum_floats([1.5, 2]), [1.5, 2.0])
    with pytest.raises(KeyError):                                   # errors pass through unchanged
        w.on_root(lambda: {}["missing"])
    assert w.bytes_sent == 0 and w.comm_seconds == 0.0


def test_packing_round_trips_without_pickle():
    tree = {"config": {"arch": "gpt", "sizes": [1, 2], "lr": 1e-3, "none": None, "flag": True},
            "params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "empty": np.zeros((0, 4)),
                       "ids": np.array([3, 1, 2], np.int32), "scalar": np.float64(2.5)},
            "list": [np.ones(2, np.int64), "text"]}
    header, blob = distributed._pack(tree)
    assert b"pickle" not in header and isinstance(blob, bytes)
    back = distributed._unpack(header, blob)
    assert back["config"] == tree["config"] and back["params"]["scalar"] == 2.5
    for name in ("w", "empty", "ids"):
        a, b = tree["params"][name], back["params"][name]
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b) and b.flags.writeable
    assert np.array_equal(back["list"][0], np.ones(2, np.int64)) and back["list"][1] == "text"


def _clear_launcher(monkeypatch):
    for var in distributed.SIZE_VARS + distributed.RANK_VARS + ("MINILLM_MPI",):
        monkeypatch.delenv(var, raising=False)


def test_without_a_launcher_no_mpi_is_started(monkeypatch):
    _clear_launcher(monkeypatch)
    had_mpi = "mpi4py.MPI" in sys.modules
    w = distributed._connect()
    assert w.comm is None and w.size == 1
    assert had_mpi or "mpi4py.MPI" not in sys.modules
    assert distributed.launched_size() == 1 and distributed.launched_rank() == 0
    monkeypatch.setenv("PMI_SIZE", "4")
    monkeypatch.setenv("PMI_RANK", "3")
    assert distributed.launched_size() == 4 and distributed.launched_rank() == 3
    monkeypatch.setenv("MINILLM_MPI", "0")                           # MPI switched off: one process
    assert distributed._connect().size == 1


def test_mpiexec_without_mpi4py_is_one_clear_error(monkeypatch):
    _clear_launcher(monkeypatch)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)                # import mpi4py -> ImportError
    with pytest.raises(ValueError, match=r"one of 2 processes, but mpi4py is not installed.*minillm\[mpi\]"):
        distributed._connect()


def test_exit_on_error_one_process(monkeypatch, capsys):
    monkeypatch.setattr(distributed, "_WORLD", distributed.World())
    with pytest.raises(SystemExit) as e:
        distributed.exit_on_error(ValueError("bad"), "error: bad", 1)
    assert e.value.code == 1 and capsys.readouterr().err == "error: bad\n"


class FakeComm:
    """Just enough of a communicator for exit_on_error: rank, size, and an Abort that exits."""

    def __init__(self, rank, size):
        self.rank, self.size = rank, size

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def Abort(self, code):
        raise SystemExit(("MPI_Abort", code))


@pytest.mark.parametrize("rank", [0, 1])
def test_exit_on_error_under_mpi(monkeypatch, capsys, rank):
    monkeypatch.setattr(distributed, "_WORLD", distributed.World(FakeComm(rank, 2)))
    monkeypatch.setattr(distributed, "ABORT_GRACE_S", 0.0)
    with pytest.raises(SystemExit) as e:              # a bug on one rank: its line first, then the traceback
        try:
            raise RuntimeError("boom")
        except RuntimeError as bug:
            distributed.exit_on_error(bug, "error: RuntimeError: boom", 1, expected=False)
    err = capsys.readouterr().err
    assert e.value.code == ("MPI_Abort", 1) and err.startswith(f"error: rank {rank}: RuntimeError: boom\nTraceback")
    with pytest.raises(SystemExit) as e:              # one rank's error: named, and the whole job aborted
        distributed.exit_on_error(OSError("disk full"), "error: disk full")
    assert e.value.code == ("MPI_Abort", 1) and capsys.readouterr().err == f"error: rank {rank}: disk full\n"
    with pytest.raises(SystemExit) as e:              # every rank's error: rank 0 prints, all exit normally
        distributed.exit_on_error(distributed.AllRanksError("bad flag"), "error: bad flag")
    assert e.value.code == 1 and capsys.readouterr().err == ("error: bad flag\n" if rank == 0 else "")
    with pytest.raises(SystemExit) as e:              # Ctrl-C reaches every rank: said once, job ended
        distributed.exit_on_error(KeyboardInterrupt(), "interrupted", 130)
    assert e.value.code == ("MPI_Abort", 130) and capsys.readouterr().err == ("interrupted\n" if rank == 0 else "")
