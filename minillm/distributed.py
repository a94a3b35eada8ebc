"""Data parallelism over MPI (mpi4py): rank, world size, a fixed-order gradient all-reduce, broadcasts.

`world()` is this process's `World`. Started by `mpiexec -n N` (N > 1) it wraps MPI.COMM_WORLD; otherwise
(a plain `minillm train`, or `mpiexec -n 1`) it is a no-op world of one rank that never imports mpi4py, so
minillm needs no MPI without the `mpi` extra. Every rank runs the same program; train.fit calls

    world.average_gradients(grads, k)   once per optimizer step: the mean over every rank's k micro-batches
    world.sum_floats(values)            the step's loss (and MoE statistics), the validation loss
    world.on_root(fn)                   set-up and checkpoint saves: rank 0 alone runs fn, all get its result
    world.gather(obj)                   the RNG state of every rank, for trainer_state.json

**The reduction.** The gradients of a step are copied into one contiguous buffer (one message per step, not
one per tensor; through host memory when they live on a GPU), cut into N equal shards; an Alltoall sends
shard j of every rank to rank j, which adds the N copies in rank order 0, 1, ..., N-1 (a left fold),
divides by the number of micro-batches in all, and an Allgather hands every rank the whole result. Each
element is summed in the same fixed order whatever the timing, so a run is bit-identical when repeated with
the same N, and every rank applies the same update. Per step each rank sends 2 (N - 1) / N of the gradient
bytes (Alltoall + Allgather, as in a ring all-reduce) and rank 0 is no bottleneck.

**Errors.** MPI has no timeouts on collectives: a rank that stops calling them leaves the others waiting
forever. So set-up errors are made collective (`on_root`, `every_rank` raise the same `AllRanksError` on
every rank at the same point: rank 0 alone prints it and every rank exits normally), and any other
exception ends the whole job: `exit_on_error` prints `error: rank R: ...` and calls MPI_Abort.
Nothing is pickled between ranks: objects travel as JSON, arrays as raw bytes described in that JSON.
"""

import json
import os
import sys
import time
import traceback

import numpy as np

from minillm.arrays import array_module, to_host

# Set by the launchers for every process: MPICH/Intel MPI/MVAPICH (Hydra, PMI), Open MPI, MVAPICH2.
SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
FAULT_VAR = "MINILLM_TEST_FAULT"   # tests only: "RANK:CALL[:kill]" fails the CALL-th gradient reduction
_WORLD = None
ABORT_GRACE_S = 0.5   # between the last output of a failing rank and MPI_Abort (see exit_on_error)


class AllRanksError(ValueError):
    """An error that every rank raises at the same point: rank 0 reports it, no rank is left waiting."""
    all_ranks = True


def _env_int(names):
    for name in names:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def launched_size():
    """How many processes the launcher (mpiexec, mpirun, srun with PMI) started: 1 without one."""
    return _env_int(SIZE_VARS) or 1


def launched_rank():
    """This process's rank as the launcher's environment says (0 without one); readable before MPI starts."""
    return _env_int(RANK_VARS) or 0


def world():
    """This process's World (created on the first call). MINILLM_MPI=1 forces MPI when the launcher is not
    recognised; MINILLM_MPI=0 never starts it."""
    global _WORLD
    if _WORLD is None:
        _WORLD = _connect()
    return _WORLD


def active():
    """True when a World of more than one rank exists (without starting MPI)."""
    return _WORLD is not None and _WORLD.size > 1


def _connect():
    forced, size = os.environ.get("MINILLM_MPI", ""), launched_size()
    if forced == "0" or (size == 1 and forced != "1"):
        return World()
    try:
        from mpi4py import MPI
    except ImportError:
        raise ValueError(f"started by mpiexec as one of {size} processes, but mpi4py is not installed: "
                         'pip install "minillm[mpi]"') from None
    comm = MPI.COMM_WORLD
    if forced != "1" and comm.Get_size() != size:
        raise ValueError(f"the launcher started {size} processes but MPI sees {comm.Get_size()}: mpi4py uses "
                         "another MPI than this mpiexec (run the mpiexec of the MPI that mpi4py loads, e.g. the "
                         "one the `mpich` wheel installs next to python)")
    return World(comm) if comm.Get_size() > 1 else World()


class World:
    """The ranks of one job. comm: an mpi4py communicator, or None for a single process (every method is
    then a no-op or runs its function directly). Counters for the benchmarks: comm_seconds (time inside the
    gradient reduction, waiting for slower ranks included), bytes_sent (gradient payload this rank sent)."""

    def __init__(self, comm=None):
        self.comm = comm
        self.rank = comm.Get_rank() if comm is not None else 0
        self.size = comm.Get_size() if comm is not None else 1
        self.comm_seconds, self.bytes_sent, self.reductions = 0.0, 0, 0
        self._local_rank = None
        self._buffer_key = self._buffer_pair = None

    @property
    def local_rank(self):
        """The rank among the processes on this machine (picks the GPU of a rank)."""
        if self._local_rank is None:
            if self.comm is None:
                self._local_rank = 0
            else:
                from mpi4py import MPI

                self._local_rank = self.comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
        return self._local_rank

    # --- the gradient all-reduce ------------------------------------------------------------------------
    def average_gradients(self, grads, count=1):
        """grads: {name: array} summed over this rank's `count` micro-batches -> {name: mean over the
        micro-batches of every rank}, the same bits on every rank. Under MPI on the CPU the results are views
        into one buffer that the next call overwrites (train_step is done with them by then)."""
        _maybe_fault(self)
        if self.size == 1:
            return grads if count == 1 else {n: g / count for n, g in grads.items()}
        started = time.perf_counter()
        names = list(grads)
        first = grads[names[0]]
        xp = array_module(first)
        dtype = np.result_type(*(g.dtype for g in grads.values()))
        sizes = [grads[n].size for n in names]
        total = sum(sizes)
        chunk = -(-total // self.size)
        send, recv, result = self._buffers(chunk * self.size, dtype)   # padded to N equal shards
        if xp is np:
            np.concatenate([grads[n].reshape(-1) for n in names], out=send[:total])
        else:                                           # one device -> host copy
            send[:total] = to_host(xp.concatenate([grads[n].reshape(-1).astype(dtype) for n in names]))
        self.comm.Alltoall(send, recv)                  # shard j of every rank -> rank j
        parts = recv.reshape(self.size, chunk)
        shard = parts[0].copy()
        for j in range(1, self.size):                   # rank order: a fixed left fold
            shard += parts[j]
        shard /= self.size * count
        self.comm.Allgather(shard, result)
        self.bytes_sent += 2 * (self.size - 1) * chunk * send.itemsize
        self.reductions += 1
        if xp is not np:
            result = xp.asarray(result[:total])         # one host -> device copy
        out, offset = {}, 0
        for n, size in zip(names, sizes):
            g = grads[n]
            piece = result[offset:offset + size].reshape(g.shape)
            out[n] = piece if piece.dtype == g.dtype else piece.astype(g.dtype)
            offset += size
        self.comm_seconds += time.perf_counter() - started
        return out

    def _buffers(self, n, dtype):
        """The all-reduce's send, receive and result buffers, kept from step to step (fresh ones cost page faults
        every step: a third of the reduction's time for the default GPT)."""
        key = (n, np.dtype(dtype).str)
        if self._buffer_key != key:
            self._buffer_key = key
            self._buffer_pair = (np.zeros(n, dtype), np.empty(n, dtype), np.empty(n, dtype))
        return self._buffer_pair

    def sum_floats(self, values):
        """A few numbers -> their sum over the ranks in rank order (float64, identical on every rank)."""
        mine = np.asarray(values, dtype=np.float64).reshape(-1)
        if self.size == 1:
            return mine.copy()
        every = np.empty((self.size, mine.size), np.float64)
        self.comm.Allgather(mine, every)
        total = every[0].copy()
        for j in range(1, self.size):
            total += every[j]
        return total

    # --- objects: JSON with raw array bytes, never pickles ----------------------------------------------
    def broadcast(self, obj=None):
        """Rank 0's obj (dicts, lists, str, numbers, None, numpy arrays) -> every rank."""
        if self.size == 1:
            return obj
        header, blob = _pack(obj) if self.rank == 0 else (b"", b"")
        lengths = np.array([len(header), len(blob)], np.int64)
        self.comm.Bcast(lengths, root=0)
        header = np.frombuffer(header, np.uint8).copy() if self.rank == 0 else np.empty(lengths[0], np.uint8)
        blob = np.frombuffer(blob, np.uint8).copy() if self.rank == 0 else np.empty(lengths[1], np.uint8)
        self.comm.Bcast(header, root=0)
        self.comm.Bcast(blob, root=0)
        return obj if self.rank == 0 else _unpack(header.tobytes(), blob.tobytes())

    def gather(self, obj):
        """Every rank's JSON-able obj -> [obj of rank 0, obj of rank 1, ...] on rank 0, None elsewhere."""
        if self.size == 1:
            return [obj]
        got = self._allgather_bytes(json.dumps(obj).encode())
        return [json.loads(b) for b in got] if self.rank == 0 else None

    def _allgather_bytes(self, data):
        """Every rank's bytes -> the list of all of them, in rank order, on every rank."""
        lengths = np.empty(self.size, np.int64)
        self.comm.Allgather(np.array([len(data)], np.int64), lengths)
        every = np.empty(int(lengths.sum()), np.uint8)
        self.comm.Allgatherv(np.frombuffer(data, np.uint8).copy(), [every, lengths])
        cuts = np.cumsum(lengths)[:-1]
        return [part.tobytes() for part in np.split(every, cuts)]

    def on_root(self, fn):
        """Run fn() on rank 0 alone and return its result (see `broadcast`) on every rank. When fn raises on
        rank 0, rank 0 re-raises it and every other rank raises AllRanksError with the same message."""
        if self.size == 1:
            return fn()
        if self.rank == 0:
            try:
                result = fn()
            except Exception as e:
                e.all_ranks = True
                self.broadcast({"error": str(e) or type(e).__name__})
                raise
            return self.broadcast({"result": result})["result"]
        reply = self.broadcast()
        if "error" in reply:
            raise AllRanksError(reply["error"])
        return reply["result"]

    def every_rank(self, fn):
        """Run fn() on every rank; when it fails on any, every rank raises AllRanksError with the message of
        the lowest failing rank ("rank R: ..." when not every rank failed). Validates before collectives."""
        try:
            result, message = fn(), None
        except Exception as e:
            if self.size == 1:
                raise
            result, message = None, str(e) or type(e).__name__
        if self.size == 1:
            return result
        failed = [json.loads(b) for b in self._allgather_bytes(json.dumps(message).encode())]
        bad = [(r, m) for r, m in enumerate(failed) if m is not None]
        if bad:
            rank, text = bad[0]
            raise AllRanksError(text if len(bad) == self.size else f"rank {rank}: {text}")
        return result

    def barrier(self):
        if self.size > 1:
            self.comm.Barrier()

    def abort(self, code=1):
        """End every process of the job now (MPI_Abort); a single process just exits."""
        sys.stdout.flush()
        sys.stderr.flush()
        if self.comm is None:
            sys.exit(code)
        self.comm.Abort(code)


def _pack(obj):
    arrays = []

    def enc(x):
        if isinstance(x, dict):
            return {str(k): enc(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [enc(v) for v in x]
        if isinstance(x, np.generic):
            return x.item()
        if hasattr(x, "dtype") and hasattr(x, "shape"):
            a = np.ascontiguousarray(to_host(x))
            arrays.append(a)
            return {"__array__": [len(arrays) - 1, a.dtype.str, list(a.shape)]}
        return x

    header = json.dumps(enc(obj)).encode()
    return header, b"".join(a.tobytes() for a in arrays)


def _unpack(header, blob):
    offset = 0

    def dec(x):
        nonlocal offset
        if isinstance(x, dict):
            if set(x) == {"__array__"}:
                _, dtype, shape = x["__array__"]
                dtype = np.dtype(dtype)
                count = int(np.prod(shape))
                a = (np.frombuffer(blob, dtype, count=count, offset=offset).reshape(shape).copy() if count
                     else np.empty(shape, dtype))
                offset += count * dtype.itemsize
                return a
            return {k: dec(v) for k, v in x.items()}
        if isinstance(x, list):
            return [dec(v) for v in x]
        return x

    return dec(json.loads(header))


def _maybe_fault(w):
    """Tests only: MINILLM_TEST_FAULT="R:C" raises on rank R in its C-th gradient reduction (1-based);
    "R:C:kill" kills that rank instead (SIGKILL, as the out-of-memory killer would)."""
    spec = os.environ.get(FAULT_VAR)
    if not spec:
        return
    rank, call, *how = spec.split(":")
    w._fault_calls = getattr(w, "_fault_calls", 0) + 1
    if int(rank) == w.rank and int(call) == w._fault_calls:
        if how == ["kill"]:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected failure ({FAULT_VAR}={spec})")


def is_root():
    """Rank 0 (or a single process); before MPI starts, as the launcher's environment says."""
    return _WORLD.rank == 0 if _WORLD is not None else launched_rank() == 0


def exit_on_error(exc, line, code=1, expected=True):
    """End this process after `exc`, reported as `line` ("error: ..."); expected=False (a bug) prints the
    traceback first. One process: print, exit(code). Several ranks: an exception every rank has (AllRanksError,
    or rank 0's own in `on_root`) is printed by rank 0 alone and each rank exits normally; Ctrl-C (which
    mpiexec passes to every rank) is printed by rank 0 and ends the job; any other is printed as
    "error: rank R: ..." and MPI_Abort ends the whole job at once, so no rank waits for this one."""
    w = _WORLD
    shared = getattr(exc, "all_ranks", False) or isinstance(exc, KeyboardInterrupt)
    if w is None or w.size == 1 or shared:
        if (w is not None and w.size == 1) or is_root():   # before MPI: every rank has the same error
            if not expected:
                traceback.print_exception(exc)
            print(line, file=sys.stderr)
        if w is not None and w.size > 1 and isinstance(exc, KeyboardInterrupt):
            w.abort(code)
        sys.exit(code)
    head, sep, rest = line.partition("error: ")
    # the line first, then the traceback: mpiexec may stop forwarding output once MPI_Abort kills the job,
    # so what must be seen goes out first, and the output gets a moment to be forwarded
    print(f"error: rank {w.rank}: {rest}" if sep and not head else f"rank {w.rank}: {line}", file=sys.stderr,
          flush=True)
    if not expected:
        traceback.print_exception(exc)
    sys.stderr.flush()
    time.sleep(ABORT_GRACE_S)
    w.abort(code)
