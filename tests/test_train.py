"""The training loop end to end on a small slice of the headlines: determinism, resume, errors."""

import json
import os

import numpy as np
import pytest

from minillm import checkpoint, train
from minillm.tree import flatten

HERE = os.path.dirname(os.path.abspath(__file__))
HEADLINES = os.path.join(HERE, "..", "data", "headlines.txt")
SMALL = dict(arch="gpt", vocab_size=300, context=16, n_layer=2, n_head=2, d_model=32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    with open(HEADLINES, encoding="utf-8") as f:
        path.write_text("".join(f.readlines()[:600]), encoding="utf-8")
    return str(path)


def run(corpus, out, steps=6, resume=False, **overrides):
    opts = train.TrainOptions(steps=steps, batch_size=4, lr=1e-3, warmup=2, eval_every=3, eval_batches=2,
                              out=str(out), resume=resume, progress=False)
    return train.train(corpus, opts, {**SMALL, **overrides}, log=lambda m: None)


def model_bytes(out):
    with open(os.path.join(out, "model.safetensors"), "rb") as f:
        return f.read()


def test_same_seed_gives_bit_identical_checkpoints(corpus, tmp_path):
    summary = run(corpus, tmp_path / "a")
    run(corpus, tmp_path / "b")
    assert model_bytes(tmp_path / "a") == model_bytes(tmp_path / "b")
    assert np.isfinite(summary["val_loss"]) and summary["bits_per_byte"] > 0 and summary["xz_bits_per_byte"] > 0
    for name in ("config.json", "tokenizer.json", "optimizer.safetensors", "trainer_state.json"):
        assert (tmp_path / "a" / name).exists()
    assert json.loads((tmp_path / "a" / "trainer_state.json").read_text())["step"] == 6


def test_training_lowers_the_loss(corpus, tmp_path):
    first = run(corpus, tmp_path / "short", steps=2)["val_loss"]
    later = run(corpus, tmp_path / "long", steps=40)["val_loss"]
    assert later < first - 0.3


def test_resume_continues_exactly(corpus, tmp_path):
    run(corpus, tmp_path / "straight", steps=6)
    run(corpus, tmp_path / "resumed", steps=3)
    run(corpus, tmp_path / "resumed", steps=6, resume=True)
    a = checkpoint.load_checkpoint(str(tmp_path / "straight")).params
    b = checkpoint.load_checkpoint(str(tmp_path / "resumed")).params
    for name, x in flatten(a).items():
        np.testing.assert_array_equal(x, flatten(b)[name], err_msg=name)


def test_resume_with_changed_shapes_is_refused(corpus, tmp_path):
    run(corpus, tmp_path / "c", steps=2)
    with pytest.raises(ValueError, match="d_model"):
        run(corpus, tmp_path / "c", steps=4, resume=True, d_model=64)


def test_nan_loss_stops_without_overwriting_the_checkpoint(corpus, tmp_path, monkeypatch):
    run(corpus, tmp_path / "d", steps=2)
    before = model_bytes(tmp_path / "d")
    monkeypatch.setattr(train.ops, "cross_entropy_forward", lambda logits, y: (float("nan"), None))
    with pytest.raises(ValueError, match="nan"):
        run(corpus, tmp_path / "d", steps=4)
    assert model_bytes(tmp_path / "d") == before


def test_text_too_short_for_one_batch(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("one short headline\n" * 3)
    with pytest.raises(ValueError, match="too short"):
        run(str(path), tmp_path / "e", vocab_size=260)


def test_fit_clips_and_updates_only_the_trainable_gradients(monkeypatch, tmp_path):
    from minillm.models import gpt
    from minillm import models, optim

    config = models.build_config("gpt", vocab_size=50, context=8, n_layer=1, n_head=2, d_model=16)
    params = gpt.init(config, np.random.default_rng(0))
    before = {n: a.copy() for n, a in flatten(params).items()}
    trainable = {"h.0.attn.c_attn.weight", "ln_f.bias"}
    trainable = {n for n in before if n.endswith(tuple(trainable))}
    assert len(trainable) == 2
    clipped = []
    clip = optim.clip_grad_norm
    monkeypatch.setattr(optim, "clip_grad_norm", lambda g, m: clipped.append(set(flatten(g))) or clip(g, m))
    ids = np.random.default_rng(1).integers(0, 50, 400)
    opts = train.TrainOptions(steps=2, batch_size=2, warmup=1, eval_every=10, eval_batches=1,
                              out=str(tmp_path), progress=False)
    train.fit(gpt, params, config, ids, ids[:100], opts, log=lambda m: None, trainable=trainable)
    assert clipped == [trainable, trainable]
    for name, a in flatten(params).items():
        assert (name in trainable) != np.array_equal(a, before[name]), name


def test_grad_accum_steps_on_the_mean_of_the_micro_batch_gradients():
    """--grad-accum 2: micro-batch k draws from stream k (stream 0 = default_rng(seed), the one-process
    stream), and the step applies clipping + AdamW to (g_0 + g_1) / 2, the same bits as by hand."""
    from minillm import data, models, optim
    from minillm.models import gpt

    config = models.build_config("gpt", vocab_size=40, context=8, n_layer=1, n_head=2, d_model=16, dtype="float64")
    ids = np.random.default_rng(1).integers(0, 40, 500)
    opts = train.TrainOptions(steps=4, batch_size=3, warmup=1, grad_clip=0.1, grad_accum=2, progress=False)
    a, b = gpt.init(config, np.random.default_rng(0)), gpt.init(config, np.random.default_rng(0))
    mask = optim.decay_mask(flatten(a), no_decay=gpt.NO_DECAY)
    state_a, state_b = optim.adamw_init(a), optim.adamw_init(b)
    rngs = train.batch_rngs(opts, train.distributed.World())
    loss, _, _, norm, lr = train.train_step(gpt, a, config, ids, opts, rngs, state_a, 0, mask)
    x0, _ = data.get_batch(ids, 3, 8, np.random.default_rng(opts.seed))
    fresh = data.batch_rngs(opts.seed, [0, 1])
    grads, losses = [], []
    for rng in fresh:
        x, y = data.get_batch(ids, 3, 8, rng)
        logits, cache = gpt.forward(b, x, config)
        value, loss_cache = train.ops.cross_entropy_forward(logits, y)
        grads.append(flatten(gpt.backward(train.ops.cross_entropy_backward(1.0, loss_cache), cache)))
        losses.append(value)
        if len(grads) == 1:
            np.testing.assert_array_equal(x, x0)          # stream 0 is the one-process stream
    mean = {n: (grads[0][n] + grads[1][n]) / 2 for n in grads[0]}
    assert optim.clip_grad_norm(mean, opts.grad_clip) == norm > opts.grad_clip
    optim.adamw_step(b, mean, state_b, lr, weight_decay=opts.weight_decay, mask=mask)
    assert loss == sum(losses) / 2
    for name, p in flatten(a).items():
        np.testing.assert_array_equal(p, flatten(b)[name], err_msg=name)
