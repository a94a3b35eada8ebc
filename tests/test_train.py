"""The training loop end to end on a small slice of the headlines: determinism, resume, errors."""

import json
import os

import numpy as np
import pytest

from minillm import checkpoint, data, train
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


def run(corpus, out, steps=6, resume=False, overwrite=False, documents="lines", **overrides):
    opts = train.TrainOptions(steps=steps, batch_size=4, lr=1e-3, warmup=2, eval_every=3, eval_batches=2,
                              out=str(out), resume=resume, overwrite=overwrite, progress=False,
                              documents=documents)
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


def test_output_directories_share_one_token_cache(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("MINILLM_CACHE", str(tmp_path / "cache"))
    encoded, real = [], data.encode_stream
    monkeypatch.setattr(data, "encode_stream", lambda *a, **k: encoded.append(a[0]) or real(*a, **k))
    run(corpus, tmp_path / "one", steps=1)
    run(corpus, tmp_path / "two", steps=1)
    assert encoded == [corpus] and len(os.listdir(tmp_path / "cache" / "tokens")) == 1
    assert not (tmp_path / "one" / "cache").exists() and not (tmp_path / "two" / "cache").exists()
    run(corpus, tmp_path / "three", steps=1, documents="file")   # one document: encoded again
    assert len(encoded) == 2 and len(os.listdir(tmp_path / "cache" / "tokens")) == 2


def test_val_text_bytes_counts_each_eot_as_a_newline():
    class Tok:
        eot_id = 9

        def decode_bytes(self, ids):
            return bytes(97 + int(i) for i in ids)

    ids = np.array([9, 0, 1, 9, 2, 9, 9, 3], np.int32)
    want = b"\n".join(Tok().decode_bytes([t for t in p if t != 9]) for p in np.split(ids, np.flatnonzero(ids == 9)))
    for block in (1, 3, 100):
        assert train.val_text_bytes(ids, Tok(), block=block) == want == b"\nab\nc\n\nd"


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
    with pytest.raises(ValueError, match="nan .*no checkpoint of this run had been saved yet"):
        run(corpus, tmp_path / "d", steps=4, overwrite=True)   # a fresh run: nothing of it is on disk
    with pytest.raises(ValueError, match="the last good checkpoint, step 2, is kept"):
        run(corpus, tmp_path / "d", steps=4, resume=True)
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
