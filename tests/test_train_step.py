"""train_step.py: one optimizer step over --grad-accum micro-batches, and the batch streams of the ranks."""

import numpy as np
import pytest

from minillm import data, distributed, models, optim, train, train_step
from minillm.models import gpt
from minillm.nn import ops
from minillm.tree import flatten


def test_grad_accum_steps_on_the_mean_of_the_micro_batch_gradients():
    """--grad-accum 2: micro-batch k draws from stream k (stream 0 = default_rng(seed), the one-process
    stream), and the step applies clipping + AdamW to (g_0 + g_1) / 2, the same bits as by hand."""
    config = models.build_config("gpt", vocab_size=40, context=8, n_layer=1, n_head=2, d_model=16, dtype="float64")
    ids = np.random.default_rng(1).integers(0, 40, 500)
    opts = train.TrainOptions(steps=4, batch_size=3, warmup=1, grad_clip=0.1, grad_accum=2, progress=False)
    a, b = gpt.init(config, np.random.default_rng(0)), gpt.init(config, np.random.default_rng(0))
    mask = optim.decay_mask(flatten(a), no_decay=gpt.NO_DECAY)
    state_a, state_b = optim.adamw_init(a), optim.adamw_init(b)
    rngs = train_step.batch_rngs(opts, distributed.World())
    result = train_step.train_step(gpt, a, config, ids, opts, rngs, state_a, 0, mask)
    loss, norm, lr = result.loss, result.grad_norm, result.lr
    assert result.stop is False
    x0, _ = data.get_batch(ids, 3, 8, np.random.default_rng(opts.seed))
    fresh = data.batch_rngs(opts.seed, [0, 1])
    grads, losses = [], []
    for rng in fresh:
        x, y = data.get_batch(ids, 3, 8, rng)
        logits, cache = gpt.forward(b, x, config)
        value, loss_cache = ops.cross_entropy_forward(logits, y)
        grads.append(flatten(gpt.backward(ops.cross_entropy_backward(1.0, loss_cache), cache)))
        losses.append(value)
        if len(grads) == 1:
            np.testing.assert_array_equal(x, x0)          # stream 0 is the one-process stream
    mean = {n: (grads[0][n] + grads[1][n]) / 2 for n in grads[0]}
    assert optim.clip_grad_norm(mean, opts.grad_clip) == norm > opts.grad_clip
    optim.adamw_step(b, mean, state_b, lr, weight_decay=opts.weight_decay, mask=mask)
    assert loss == sum(losses) / 2
    for name, p in flatten(a).items():
        np.testing.assert_array_equal(p, flatten(b)[name], err_msg=name)


def test_batch_streams_of_ranks_and_micro_batches_are_disjoint_slices_of_one_numbering():
    """Rank r of N with K micro-batches takes streams r*K .. r*K+K-1: two ranks x 2 = one process x 4."""
    class Rank:
        def __init__(self, rank, size):
            self.rank, self.size = rank, size

    opts = train.TrainOptions(grad_accum=2, seed=7)
    ranks = [train_step.batch_rngs(opts, Rank(r, 2)) for r in range(2)]
    single = train_step.batch_rngs(train.TrainOptions(grad_accum=4, seed=7), Rank(0, 1))
    draws = [g.integers(0, 10**9, 4).tolist() for g in ranks[0] + ranks[1]]
    assert draws == [g.integers(0, 10**9, 4).tolist() for g in single]
    assert len({tuple(d) for d in draws}) == 4


def test_resume_with_another_world_size_or_grad_accum_is_one_clear_error():
    class Rank:
        rank, size = 0, 1

    state = {"rng_state": object(), "world_size": 2, "grad_accum": 1}
    with pytest.raises(distributed.AllRanksError, match="trained on 2 MPI process.*mpiexec -n 2"):
        train_step.batch_rngs(train.TrainOptions(out="o"), Rank(), state)
    state = {"rng_state": object(), "world_size": 1, "grad_accum": 3}
    with pytest.raises(distributed.AllRanksError, match="--grad-accum 3"):
        train_step.batch_rngs(train.TrainOptions(out="o"), Rank(), state)
    with pytest.raises(ValueError, match="--grad-accum must be a positive integer"):
        train_step.batch_rngs(train.TrainOptions(grad_accum=0), Rank())


class _TwinRanks(distributed.World):
    """Rank 0 of two ranks whose other rank computed the same step: sums double, means stay; the other rank's
    stop request is `other_stops` (what its share of the loss reduction would add)."""

    def __init__(self, other_stops):
        super().__init__()
        self.size, self.other_stops, self.reductions = 2, other_stops, 0

    def sum_floats(self, values):
        self.reductions += 1
        values = np.asarray(values, dtype=np.float64)
        other = values.copy()
        other[2] = float(self.other_stops)                  # [loss, aux, stop request, stats...]
        return values + other

    def average_gradients(self, grads, count=1):
        return {n: g / count for n, g in grads.items()}


@pytest.mark.parametrize("mine, other", [(False, False), (True, False), (False, True), (True, True)])
def test_a_stop_request_rides_in_the_loss_reduction(mine, other):
    """Under MPI every rank learns whether any rank asked to stop from the step's one loss reduction (no
    collective of its own); in one process the request is read after the update."""
    config = models.build_config("gpt", vocab_size=40, context=8, n_layer=1, n_head=2, d_model=16, dtype="float64")
    ids = np.random.default_rng(1).integers(0, 40, 500)
    opts = train.TrainOptions(steps=4, batch_size=3, warmup=1, progress=False)
    params = gpt.init(config, np.random.default_rng(0))
    mask = optim.decay_mask(flatten(params), no_decay=gpt.NO_DECAY)
    world = _TwinRanks(other)
    rngs = train_step.batch_rngs(opts, distributed.World())
    result = train_step.train_step(gpt, params, config, ids, opts, rngs, optim.adamw_init(params), 0, mask,
                                   world=world, stop_requested=lambda: mine)
    assert result.stop is (mine or other) and world.reductions == 1
    alone = train_step.train_step(gpt, params, config, ids, opts, rngs, optim.adamw_init(params), 1, mask,
                                  stop_requested=lambda: mine)
    assert alone.stop is mine
