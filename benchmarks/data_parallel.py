"""Data-parallel training over MPI on one machine: tokens/s of the default GPT on 1 and 2 processes, the time
per step spent in the gradient all-reduce, and the bytes sent per step against the parameter count.

    python benchmarks/data_parallel.py [--steps 20] [--repeats 3] [--warmup 3]

Runs, interleaved (one of each per repeat, so that every configuration sees the same background load):
    N=1, 1 thread      one process, OMP/NUMBA/OPENBLAS_NUM_THREADS=1: the per-core baseline
    N=1, 2 threads     one process using both cores through threads
    N=2, 1 thread each `mpiexec -n 2`, batch 32 per rank (global batch 64: weak scaling)
    N=2, B=16 per rank `mpiexec -n 2`, global batch 32 (strong scaling: the same work as N=1)
Each run (`--worker`, under mpiexec or not) times train_step.train_step of the default GPT (4 layers, d_model 128,
4 heads, context 64, vocab 2048, float32, batch 32) on random token ids after a warm-up, and reports the
median step time, the time inside World.average_gradients per step (waiting for the slower rank included),
the all-reduce alone (after a barrier, on the same buffer: the transfer and the summation) and the bytes
this rank sent per step. Scaling efficiency = tokens/s at N=2 / (2 x tokens/s at N=1 with one thread).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import harness  # first: puts the checkout and tests/ on sys.path

RUNS = [("N=1, 1 thread", 1, 1, 32), ("N=1, 2 threads", 1, 2, 32), ("N=2, 1 thread each", 2, 1, 32),
        ("N=2, B=16 per rank", 2, 1, 16)]


def worker(steps, warmup, batch):
    import numpy as np

    from minillm import distributed, models, optim, train, train_step
    from minillm.tree import flatten

    world = distributed.world()
    config = models.build_config("gpt")
    model = models.get_model("gpt")
    params = model.init(config, np.random.default_rng(0))
    ids = np.random.default_rng(1).integers(0, config["vocab_size"], 400_000).astype(np.int32)
    opts = train.TrainOptions(steps=warmup + steps, batch_size=batch, warmup=1, progress=False)
    rngs = train_step.batch_rngs(opts, world)
    state = optim.adamw_init(params)
    mask = optim.decay_mask(flatten(params), no_decay=model.NO_DECAY)
    for s in range(warmup):
        train_step.train_step(model, params, config, ids, opts, rngs, state, s, mask, world=world)
    world.barrier()
    comm0, bytes0 = world.comm_seconds, world.bytes_sent
    times = []
    for s in range(warmup, warmup + steps):
        t = time.perf_counter()
        train_step.train_step(model, params, config, ids, opts, rngs, state, s, mask, world=world)
        times.append(time.perf_counter() - t)
    comm = (world.comm_seconds - comm0) / steps
    sent = (world.bytes_sent - bytes0) / steps
    alone = []
    if world.size > 1:   # the all-reduce by itself: every rank enters it at once
        grads = {n: np.ones_like(p) for n, p in flatten(params).items()}
        for _ in range(10):
            world.barrier()
            t = time.perf_counter()
            world.average_gradients(grads)
            alone.append(time.perf_counter() - t)
    n_params = sum(p.size for p in flatten(params).values())
    every = world.gather({"step": statistics.median(times), "comm": comm, "alone": statistics.median(alone or [0.0]),
                          "sent": sent})
    if world.rank == 0:
        tokens = batch * config["context"] * world.size
        print("RESULT " + json.dumps({"ranks": every, "tokens_per_step": tokens, "params": n_params,
                                      "step": max(r["step"] for r in every)}))


def launch(ranks, threads, batch, steps, warmup):
    env = {**os.environ, **{v: str(threads) for v in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS",
                                                      "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}
    env["PYTHONPATH"] = os.pathsep.join([harness.ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    args = [sys.executable, os.path.abspath(__file__), "--worker", "--steps", str(steps), "--warmup", str(warmup),
            "--batch", str(batch)]
    if ranks > 1:
        import mpirun   # tests/mpirun.py: the mpiexec next to python, with the flags its flavour needs

        if mpirun.mpiexec() is None:
            raise SystemExit("needs mpi4py and mpiexec: pip install -e \".[mpi]\"")
        args = mpirun.mpiexec() + ["-n", str(ranks)] + args
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise SystemExit(f"{' '.join(args)} failed:\n{out.stderr}")
    return json.loads(lines[-1][len("RESULT "):])


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    a = parser.parse_args()
    if a.worker:
        return worker(a.steps, a.warmup, a.batch)
    load_before = os.getloadavg()
    results = {name: [] for name, *_ in RUNS}
    for _ in range(a.repeats):
        for name, ranks, threads, batch in RUNS:
            results[name].append(launch(ranks, threads, batch, a.steps, a.warmup))
    load_after = os.getloadavg()

    def med(name, key):
        return statistics.median(key(r) for r in results[name])

    base = med("N=1, 1 thread", lambda r: r["tokens_per_step"] / r["step"])
    rows = []
    for name, ranks, threads, batch in RUNS:
        tps = med(name, lambda r: r["tokens_per_step"] / r["step"])
        step = med(name, lambda r: r["step"])
        comm = med(name, lambda r: max(x["comm"] for x in r["ranks"]))
        alone = med(name, lambda r: max(x["alone"] for x in r["ranks"]))
        sent = med(name, lambda r: r["ranks"][0]["sent"])
        params = results[name][0]["params"]
        rows.append([name, batch * ranks, f"{tps:,.0f}", f"{1e3 * step:.1f}", f"{1e3 * comm:.2f}",
                     f"{100 * comm / step:.1f}%", f"{1e3 * alone:.2f}", f"{sent / 1e6:.2f}",
                     f"{sent / (4 * params):.2f}" if ranks > 1 else "-", f"{tps / base:.2f}x",
                     f"{tps / (ranks * base):.0%}" if ranks > 1 else "-"])
    print(f"{cpu_model()}, {os.cpu_count()} cores; load average {load_before[0]:.1f} before, "
          f"{load_after[0]:.1f} after; default GPT ({results['N=1, 1 thread'][0]['params']:,} parameters, "
          f"float32), medians of {a.repeats} runs x {a.steps} steps")
    harness.table(["", "global batch", "tokens/s", "step ms", "reduce ms/step", "of step", "all-reduce alone ms",
                   "MB sent/step/rank", "x 4 bytes/param", "vs N=1 1 thread", "scaling efficiency"], rows)


if __name__ == "__main__":
    main()
