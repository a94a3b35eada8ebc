"""Run under mpiexec by tests/test_distributed_mpi.py (and in-process by it, as one process): train a tiny
model of each architecture with train.fit, gradient clipping active, and write this rank's parameters to
OUT/<arch>-rank<R>-run<I>.npz for each of --repeat runs (rank 0 also writes OUT/<arch>-metrics.jsonl, of the
last run). Then, for gpt, the same 3 steps as 2 + a resumed 1 (the trainer state broadcast from rank 0, as
train.train does): OUT/gpt-rank<R>-resumed.npz.

    mpiexec -n 2 python tests/mpi_fit.py OUT [--grad-accum K] [--dtype float64] [--arch a,b] [--repeat 2]
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minillm import distributed, models, optim, train  # noqa: E402
from minillm.tree import flatten  # noqa: E402

ARCHS = ("gpt", "moe", "mamba", "rwkv")


def fit(arch, out, steps=3, grad_accum=1, dtype="float64", resume_at=None):
    """-> (params, val_loss) after `steps` steps of a tiny `arch` on fixed random ids (seed 0); resume_at:
    stop there, keep the saved trainer state (JSON round trip) and resume from it."""
    config = models.build_config(arch, vocab_size=64, context=8, n_layer=1, n_head=2, d_model=16, dtype=dtype)
    model = models.get_model(arch)
    params = model.init(config, np.random.default_rng(0))
    ids = np.random.default_rng(1).integers(0, 64, 3000).astype(np.int32)
    world = distributed.world()
    opt_state, start, state, saved = optim.adamw_init(params), 0, None, {}
    # warmup 1: steps 0 and 1 get the peak lr whether the run has 2 or 3 steps, so 2 + 1 = 3 steps exactly
    for stop in ([resume_at] if resume_at else []) + [steps]:
        opts = train.TrainOptions(steps=stop, batch_size=2, lr=1e-2, warmup=1, grad_clip=0.05, eval_every=2,
                                  eval_batches=3, grad_accum=grad_accum, out=out, progress=False)
        val_loss = train.fit(model, params, config, ids[:2500], ids[2500:], opts, log=lambda m: None,
                             opt_state=opt_state, start_step=start, trainer_state=state,
                             save=lambda p, o, s: saved.update(state=json.loads(json.dumps(s))),
                             metrics_path=os.path.join(out, f"{arch}-metrics.jsonl"))
        start, state = stop, world.broadcast(saved.get("state"))
    return params, val_loss


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--dtype", default="float64")
    parser.add_argument("--arch", default=",".join(ARCHS))
    parser.add_argument("--repeat", type=int, default=1)
    a = parser.parse_args()
    rank = distributed.world().rank
    for arch in a.arch.split(","):
        for run in range(a.repeat):
            params, val_loss = fit(arch, a.out, 3, a.grad_accum, a.dtype)
            np.savez(os.path.join(a.out, f"{arch}-rank{rank}-run{run}.npz"), val_loss=val_loss, **flatten(params))
    params, val_loss = fit("gpt", a.out, 3, a.grad_accum, a.dtype, resume_at=2)
    np.savez(os.path.join(a.out, f"gpt-rank{rank}-resumed.npz"), val_loss=val_loss, **flatten(params))


if __name__ == "__main__":
    main()
