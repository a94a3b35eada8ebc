"""Run under mpiexec by tests/test_distributed.py (and in-process by it, as one process): train a tiny model
of each architecture with train.fit, gradient clipping active, and write this rank's parameters to
OUT/<arch>-rank<R>-run<I>.npz for each of --repeat runs (rank 0 also writes OUT/<arch>-metrics.jsonl, of the last run).

    mpiexec -n 2 python tests/mpi_fit.py OUT [--grad-accum K] [--dtype float64] [--steps S] [--arch a,b]
                                             [--repeat 2]
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minillm import distributed, models, train  # noqa: E402
from minillm.tree import flatten  # noqa: E402

ARCHS = ("gpt", "moe", "mamba", "rwkv")


def fit(arch, out, steps=3, grad_accum=1, dtype="float64", lora=False):
    """-> (params, val_loss) after `steps` steps of a tiny `arch` on fixed random ids (seed 0)."""
    config = models.build_config(arch, vocab_size=64, context=8, n_layer=1, n_head=2, d_model=16, dtype=dtype)
    model = models.get_model(arch)
    params = model.init(config, np.random.default_rng(0))
    ids = np.random.default_rng(1).integers(0, 64, 3000).astype(np.int32)
    opts = train.TrainOptions(steps=steps, batch_size=2, lr=1e-2, warmup=1, grad_clip=0.05, eval_every=2,
                              eval_batches=3, grad_accum=grad_accum, out=out, progress=False)
    val_loss = train.fit(model, params, config, ids[:2500], ids[2500:], opts, log=lambda m: None,
                         metrics_path=os.path.join(out, f"{arch}-metrics.jsonl"))
    return params, val_loss


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--dtype", default="float64")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--arch", default=",".join(ARCHS))
    parser.add_argument("--repeat", type=int, default=1)
    a = parser.parse_args()
    rank = distributed.world().rank
    for arch in a.arch.split(","):
        for run in range(a.repeat):
            params, val_loss = fit(arch, a.out, a.steps, a.grad_accum, a.dtype)
            np.savez(os.path.join(a.out, f"{arch}-rank{rank}-run{run}.npz"), val_loss=val_loss, **flatten(params))


if __name__ == "__main__":
    main()
