"""batch_parts.py: a micro-batch computed as equal parts side by side, and train_step's use of it."""

import threading

import numpy as np
import pytest

from minillm import batch_parts, data, distributed, models, optim, train, train_step
from minillm.models import gpt
from minillm.nn import blas, ops
from minillm.tree import flatten


@pytest.fixture
def side_by_side(monkeypatch):
    """Make `run` take its threaded path whatever this machine's thread count."""
    monkeypatch.setattr(batch_parts, "_threads", lambda: 2)
    assert batch_parts.side_by_side(2), "Numba's threading layer here is not omp or tbb"


HOST = np.empty(0)


class _GpuArray:
    """What kernels.on_gpu takes for a GPU array (CuPy and numba device arrays have this attribute)."""
    __cuda_array_interface__ = {}


def test_count_cuts_only_where_the_parts_are_equal_and_the_step_a_sum_over_sequences():
    gpt_config = {"arch": "gpt"}
    assert batch_parts.count(2, 32, gpt_config, HOST) == 2
    assert batch_parts.count(2, 33, gpt_config, HOST) == 1           # unequal parts would weigh rows unequally
    assert batch_parts.count(1, 32, gpt_config, HOST) == 1
    assert batch_parts.count(4, 32, gpt_config, HOST) == 4
    assert batch_parts.count(2, 32, gpt_config, _GpuArray()) == 1  # a GPU's arrays
    assert batch_parts.count(2, 32, {"arch": "gpt", "n_experts": 4}, HOST) == 1
    dropout = {"r": 4, "dropout": 0.1, "dropout_rng": np.random.default_rng(0)}
    assert batch_parts.count(2, 32, {"arch": "llama", "lora": dropout}, HOST) == 1
    assert batch_parts.count(2, 32, {"arch": "llama", "lora": {**dropout, "dropout": 0.0}}, HOST) == 2
    assert batch_parts.count(2, 32, {"arch": "llama", "lora": {"r": 4, "dropout": 0.1}}, HOST) == 2  # no rng: off
    assert batch_parts.independent(2, {"arch": "gpt"}, HOST) == 2
    with pytest.raises(ValueError, match="batch_parts must be at least 1"):
        batch_parts.count(0, 32, gpt_config, HOST)


def test_run_side_by_side_returns_in_job_order_on_other_threads(side_by_side):
    main = threading.get_ident()

    def job(i):
        assert threading.get_ident() != main
        a = np.random.default_rng(i).standard_normal((6, 3, 5, 4))
        b = np.random.default_rng(i + 10).standard_normal((6, 3, 4, 2))
        return i, blas.bmm(a, b), np.matmul(a, b)

    for i, (j, product, expected) in enumerate(batch_parts.run(job, [(0,), (1,)])):
        assert i == j
        np.testing.assert_array_equal(product, expected)   # a part's bmm is one plain matmul


def test_run_finishes_every_job_before_raising_the_first_error(side_by_side):
    finished = []

    def job(i):
        if i == 0:
            raise ValueError("part 0 failed")
        finished.append(i)
        return i

    with pytest.raises(ValueError, match="part 0 failed"):
        batch_parts.run(job, [(0,), (1,)])
    assert finished == [1]


SMALL = dict(vocab_size=40, context=8, n_layer=2, n_head=2, d_model=16)


def _one_step(batch_parts_wanted, dtype="float64", batch_size=4, sizes=SMALL):
    config = models.build_config("gpt", **sizes, dtype=dtype)
    ids = np.random.default_rng(1).integers(0, sizes["vocab_size"], 5000)
    opts = train.TrainOptions(steps=4, batch_size=batch_size, warmup=1, grad_clip=0.1, progress=False,
                              batch_parts=batch_parts_wanted)
    params = gpt.init(config, np.random.default_rng(0))
    mask = optim.decay_mask(flatten(params), no_decay=gpt.NO_DECAY)
    state = optim.adamw_init(params)
    rngs = train_step.batch_rngs(opts, distributed.World())
    result = train_step.train_step(gpt, params, config, ids, opts, rngs, state, 0, mask)
    return params, result, (config, ids, opts, mask)


def test_a_step_in_two_parts_steps_on_the_mean_of_the_halves_gradients(side_by_side):
    """The same bits as by hand: the two halves of the batch forward + backward, (g0 + g1) / 2, clip, AdamW."""
    params, result, (config, ids, opts, mask) = _one_step(2)
    by_hand = gpt.init(config, np.random.default_rng(0))
    x, y = data.get_batch(ids, 4, 8, np.random.default_rng(opts.seed))
    grads, losses = [], []
    for rows in (slice(0, 2), slice(2, 4)):
        logits, cache = gpt.forward(by_hand, x[rows], config)
        value, loss_cache = ops.cross_entropy_forward(logits, y[rows])
        grads.append(flatten(gpt.backward(ops.cross_entropy_backward(1.0, loss_cache), cache)))
        losses.append(value)
    mean = {n: (grads[0][n] + grads[1][n]) / 2 for n in grads[0]}
    assert optim.clip_grad_norm(mean, opts.grad_clip) == result.grad_norm > opts.grad_clip
    optim.adamw_step(by_hand, mean, optim.adamw_init(by_hand), result.lr, weight_decay=opts.weight_decay,
                     mask=mask)
    assert result.loss == (losses[0] + losses[1]) / 2
    for name, p in flatten(params).items():
        np.testing.assert_array_equal(p, flatten(by_hand)[name], err_msg=name)


def test_parts_change_only_the_rounding_and_repeat_bit_for_bit(side_by_side):
    """float64: one part or two give the same step to rounding (1e-12 relative: the sums of 4 rows' terms
    are only regrouped); two parts side by side, twice, give the same bits."""
    whole, r1, _ = _one_step(1)
    halves, r2, _ = _one_step(2)
    again, r3, _ = _one_step(2)
    assert r1.loss == pytest.approx(r2.loss, rel=1e-12) and r2.loss == r3.loss
    for name, p in flatten(whole).items():
        np.testing.assert_allclose(flatten(halves)[name], p, rtol=1e-12, atol=1e-14, err_msg=name)
        np.testing.assert_array_equal(flatten(again)[name], flatten(halves)[name], err_msg=name)


def test_side_by_side_or_one_after_the_other_the_parts_give_the_same_gradients(monkeypatch):
    """float32 at sizes where BLAS and the Numba kernels split their work over threads when they may (parts
    of 256 rows x 128 columns): side by side (a thread per part, single-threaded BLAS) or one after the
    other (every core per part) agree to float32 rounding (OpenBLAS's sums depend on its thread count, so
    not bitwise); side by side twice gives the same bits, and so does a whole step."""
    sizes = dict(vocab_size=256, context=64, n_layer=1, n_head=4, d_model=128)
    config = models.build_config("gpt", **sizes, dtype="float32")
    params = gpt.init(config, np.random.default_rng(0))
    x, y = data.get_batch(np.random.default_rng(1).integers(0, 256, 5000), 8, 64, np.random.default_rng(2))
    monkeypatch.setattr(batch_parts, "_threads", lambda: 2)
    threaded = [train_step.micro_batch(gpt, params, config, x, y, 2) for _ in range(2)]
    step_a, step_b = (_one_step(2, "float32", batch_size=8, sizes=sizes)[0] for _ in range(2))
    monkeypatch.setattr(batch_parts, "_threads", lambda: 64)
    assert not batch_parts.side_by_side(2)
    sequential = train_step.micro_batch(gpt, params, config, x, y, 2)
    assert threaded[0][0] == threaded[1][0] == pytest.approx(sequential[0], rel=1e-6)
    for name, g in threaded[0][3].items():
        np.testing.assert_array_equal(threaded[1][3][name], g, err_msg=name)
        scale = float(np.abs(g).max())
        np.testing.assert_allclose(sequential[3][name], g, rtol=1e-4, atol=1e-5 * scale, err_msg=name)
    for name, p in flatten(step_a).items():
        np.testing.assert_array_equal(flatten(step_b)[name], p, err_msg=name)


def test_evaluate_scores_batches_side_by_side_and_weighs_them_by_tokens(side_by_side):
    """Three batches (a pair side by side, then one alone) of unequal sizes: the token-weighted mean of the
    batches' losses, each scored alone on this thread."""
    config = models.build_config("gpt", **SMALL, dtype="float64")
    params = gpt.init(config, np.random.default_rng(0))
    rng = np.random.default_rng(3)
    batches = [(rng.integers(0, 40, (b, 8)), rng.integers(0, 40, (b, 8))) for b in (3, 2, 5)]
    alone = [ops.cross_entropy_forward(gpt.forward(params, x, config)[0], y)[0] for x, y in batches]
    expected = sum(loss * y.size for loss, (_, y) in zip(alone, batches)) / sum(y.size for _, y in batches)
    assert train.evaluate(gpt, params, config, iter(batches)) == pytest.approx(expected, rel=1e-12)


def test_balanced_groups_are_consecutive_and_about_equal():
    assert batch_parts.balanced("abcdef", [1] * 6, 2) == [list("abc"), list("def")]
    assert batch_parts.balanced("abcd", [1, 1, 1, 10], 2) == [list("abc"), ["d"]]
    assert batch_parts.balanced("abc", [10, 1, 1], 2) == [["a"], ["b", "c"]]
    assert batch_parts.balanced("ab", [1, 1], 5) == [["a"], ["b"]]
    assert batch_parts.balanced("", [], 2) == []


def test_adamw_in_groups_side_by_side_gives_the_same_bits(side_by_side, monkeypatch):
    """optim.adamw_step updates its tensors in PARALLEL_GROUPS groups on batch_parts' threads: elementwise
    updates, so the same bits as one group on this thread."""
    config = models.build_config("gpt", vocab_size=256, context=64, n_layer=1, n_head=4, d_model=128)
    results = []
    for groups in (1, 2):
        monkeypatch.setattr(optim, "PARALLEL_GROUPS", groups)
        params = gpt.init(config, np.random.default_rng(0))
        grads = {n: np.random.default_rng(1).standard_normal(a.shape).astype(a.dtype)
                 for n, a in flatten(params).items()}
        state = optim.adamw_init(params)
        for _ in range(2):
            optim.adamw_step(params, grads, state, 1e-3, mask=optim.decay_mask(flatten(params)))
        results.append((flatten(params), state))
    (p1, s1), (p2, s2) = results
    for name in p1:
        np.testing.assert_array_equal(p1[name], p2[name], err_msg=name)
        np.testing.assert_array_equal(s1["m"][name], s2["m"][name], err_msg=name)
        np.testing.assert_array_equal(s1["v"][name], s2["v"][name], err_msg=name)


def test_no_parts_where_the_cuda_kernels_run():
    """Under kernels.forced("cuda") (the CUDA simulator on host arrays, which runs one kernel at a time)."""
    from minillm import kernels

    with kernels.forced("cuda"):
        assert batch_parts.count(2, 32, {"arch": "gpt"}, HOST) == 1
    with kernels.forced("reference"):
        assert batch_parts.count(2, 32, {"arch": "gpt"}, HOST) == 2


def test_side_by_side_only_with_two_threads_to_at_most_one_per_part(monkeypatch):
    """One thread allowed (OMP_NUM_THREADS=1, or one core): one after the other; more threads than parts:
    one after the other, each with all of them."""
    import numba

    monkeypatch.setattr(batch_parts, "_cores", lambda: 2)
    assert batch_parts._threads() == min(2, numba.config.NUMBA_NUM_THREADS, blas.threads() or 2)
    for threads, expected in ((1, False), (2, True), (3, False)):
        monkeypatch.setattr(batch_parts, "_threads", lambda t=threads: t)
        assert batch_parts.side_by_side(2) is expected, threads
