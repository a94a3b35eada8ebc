"""quantize.py: a --ternary model packed to 2 bits samples the same tokens as the unpacked one."""

import os

import numpy as np
import pytest

from minillm import checkpoint, generate, models, quantize, train
from minillm.nn import dense
from minillm.tree import flatten

HERE = os.path.dirname(os.path.abspath(__file__))
SMALL = dict(vocab_size=300, context=16, n_layer=2, n_head=2, d_model=32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    with open(os.path.join(HERE, "..", "data", "headlines.txt"), encoding="utf-8") as f:
        path.write_text("".join(f.readlines()[:400]), encoding="utf-8")
    return str(path)


def trained(corpus, out, arch="gpt", ternary=True):
    opts = train.TrainOptions(steps=4, batch_size=4, warmup=1, eval_every=10, eval_batches=1, out=str(out),
                              progress=False)
    train.train(corpus, opts, dict(SMALL, arch=arch, ternary=ternary), log=lambda m: None)
    return str(out)


@pytest.mark.parametrize("arch", list(models.ARCHITECTURES))
def test_packed_checkpoint_samples_the_same_tokens(corpus, tmp_path, arch):
    src = trained(corpus, tmp_path / "t", arch)
    before, after = quantize.quantize_checkpoint(src, str(tmp_path / "q"))
    assert after < before
    packed = checkpoint.load_checkpoint(str(tmp_path / "q"))
    assert packed.config["packed"] and any(a.dtype == np.uint8 for a in flatten(packed.params).values())
    kw = dict(num=4, max_tokens=12, temperature=1.0, seed=3)
    assert generate.sample_lines(src, **kw) == generate.sample_lines(str(tmp_path / "q"), **kw)
    ckpt = checkpoint.load_checkpoint(src)
    model = models.get_model(arch)
    idx = np.array([[1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(model.forward(ckpt.params, idx, ckpt.config)[0],
                                  model.forward(packed.params, idx, packed.config)[0])


def test_refuses_full_precision_in_place_and_repacking(corpus, tmp_path):
    full = trained(corpus, tmp_path / "f", ternary=False)
    with pytest.raises(ValueError, match="--ternary"):
        quantize.quantize_checkpoint(full, str(tmp_path / "x"))
    src = trained(corpus, tmp_path / "t")
    with pytest.raises(ValueError, match="in place"):
        quantize.quantize_checkpoint(src, src)
    quantize.quantize_checkpoint(src, str(tmp_path / "q"))
    with pytest.raises(ValueError, match="already"):
        quantize.quantize_checkpoint(str(tmp_path / "q"), str(tmp_path / "q2"))


def test_packed_layers_have_no_backward():
    w = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    p = flatten(quantize.pack_params({"a": {"weight": w}}, {"arch": "rwkv"}))
    node = {"weight": p["a.weight"], "weight_scale": p["a.weight_scale"], "weight_shape": p["a.weight_shape"]}
    y, cache = dense.dense_forward(np.ones((2, 4), np.float32), node, dense.mode({}, "out_in"))
    assert y.shape == (2, 8)
    with pytest.raises(ValueError, match="inference only"):
        dense.dense_backward(np.ones_like(y), cache)
