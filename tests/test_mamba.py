"""mamba.py: gradients, step == forward, and parity with HF transformers' MambaForCausalLM (slow torch path)."""

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import MambaForCausalLM

import peers
from gradcheck import check_grads, weighted_sum
from minillm.models import mamba
from minillm.tree import flatten, unflatten


def config(**kw):
    # dt in [0.01, 1] rather than [0.001, 0.1]: gradients through A_log and dt_proj are then not tiny next to
    # the loss, so central differences resolve them (their float64 rounding noise is ~1e-16 |loss| / eps)
    c = {"arch": "mamba", "vocab_size": 37, "context": 16, "n_layer": 2, "n_head": 1, "d_model": 12,
         "dtype": "float64", **mamba.DEFAULTS, "d_state": 5, "d_conv": 3, "dt_rank": 3, "dt_min": 0.01,
         "dt_max": 1.0}
    c.update(kw)
    return c


def randomize(params, rng):
    """Perturb the init so that no parameter sits at a special value (ones, zeros, log(1..N))."""
    flat = flatten(params)
    return unflatten({k: v + 0.1 * rng.standard_normal(v.shape) for k, v in flat.items()})


def rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def test_causal_conv1d_matches_torch_and_gradients():
    rng = np.random.default_rng(0)
    a = {"x": rng.standard_normal((2, 6, 5)), "w": rng.standard_normal((5, 1, 4)), "b": rng.standard_normal(5)}
    y, c = mamba.causal_conv1d_forward(a["x"], a["w"], a["b"])
    ref = F.conv1d(torch.tensor(a["x"]).transpose(1, 2), torch.tensor(a["w"]), torch.tensor(a["b"]),
                   padding=3, groups=5)[:, :, :6].transpose(1, 2)
    assert rel(y, ref.numpy()) < 1e-14
    g = rng.standard_normal(y.shape)
    grads = dict(zip("xwb", mamba.causal_conv1d_backward(g, c)))
    check_grads(lambda: weighted_sum(mamba.causal_conv1d_forward(a["x"], a["w"], a["b"])[0], g), a,
                {"x": grads["x"], "w": grads["w"], "b": grads["b"]})


def test_mixer_gradients():
    cfg = config()
    rng = np.random.default_rng(1)
    p = randomize(mamba.init_mixer(cfg, rng, np.float64), rng)
    x = rng.standard_normal((2, 7, cfg["d_model"]))
    out, c = mamba.mixer_forward(x, p, cfg)
    g = rng.standard_normal(out.shape)
    dx, grads = mamba.mixer_backward(g, c)
    check_grads(lambda: weighted_sum(mamba.mixer_forward(x, p, cfg)[0], g), {"x": x, "p": p}, {"x": dx, "p": grads},
                eps=1e-5)


def test_model_gradients():
    cfg = config()
    rng = np.random.default_rng(2)
    params = randomize(mamba.init(cfg, rng), rng)
    idx = rng.integers(0, cfg["vocab_size"], (2, 6))
    logits, cache = mamba.forward(params, idx, cfg)
    g = rng.standard_normal(logits.shape)
    grads = mamba.backward(g, cache)
    assert list(flatten(grads)) == list(flatten(params))
    check_grads(lambda: weighted_sum(mamba.forward(params, idx, cfg)[0], g), params, grads, max_entries=12, eps=1e-4)


def test_step_equals_forward():
    cfg = config(n_layer=3)
    rng = np.random.default_rng(3)
    params = randomize(mamba.init(cfg, rng), rng)
    idx = rng.integers(0, cfg["vocab_size"], (3, 11))
    logits, _ = mamba.forward(params, idx, cfg)
    state = mamba.init_state(params, cfg, 3)
    steps = []
    for t in range(idx.shape[1]):
        out, state = mamba.step(params, idx[:, t], state)
        steps.append(out)
    assert rel(np.stack(steps, 1), logits) < 1e-12
    assert state["layers"][0]["conv"].shape == (3, 24, 3) and state["layers"][0]["ssm"].shape == (3, 24, 5)


def test_init_names_shapes_and_values():
    cfg = config(dtype="float32", dt_rank="auto", d_model=40, dt_min=0.001, dt_max=0.1)
    p = mamba.init(cfg, np.random.default_rng(0))
    flat = flatten(p)
    assert all(v.dtype == np.float32 for v in flat.values())
    hf = MambaForCausalLM(peers.mamba_config(cfg))
    expected = {k: tuple(v.shape) for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    assert {k: v.shape for k, v in flat.items()} == expected
    m = p["backbone"]["layers"]["0"]["mixer"]
    assert m["dt_proj"]["weight"].shape == (80, 3)                         # auto rank = ceil(40 / 16)
    np.testing.assert_allclose(np.exp(m["A_log"][7]), np.arange(1, 6), rtol=1e-6)
    assert (m["D"] == 1).all() and (m["conv1d"]["bias"] == 0).all()
    dt = np.log1p(np.exp(m["dt_proj"]["bias"].astype(np.float64)))         # softplus(bias) = dt at init
    assert dt.min() >= 0.001 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    again = flatten(mamba.init(cfg, np.random.default_rng(0)))
    assert all(np.array_equal(v, again[k]) for k, v in flat.items())


def test_float32_and_bad_input():
    cfg = config(dtype="float32")
    params = mamba.init(cfg, np.random.default_rng(4))
    idx = np.random.default_rng(4).integers(0, cfg["vocab_size"], (2, 9))
    logits, cache = mamba.forward(params, idx, cfg)
    grads = flatten(mamba.backward(np.ones_like(logits), cache))
    assert logits.dtype == np.float32 and all(v.dtype == np.float32 for v in grads.values())
    p64 = unflatten({k: v.astype(np.float64) for k, v in flatten(params).items()})
    assert rel(logits, mamba.forward(p64, idx, config())[0]) < 1e-5
    with pytest.raises(ValueError, match="token ids"):
        mamba.forward(params, idx + cfg["vocab_size"], cfg)
    with pytest.raises(ValueError, match="token ids"):
        mamba.forward(params, idx.astype(np.float32), cfg)


# --- parity with HF transformers ---------------------------------------------------------------------------


def test_matches_hf_mamba_float64():
    # the CUDA fast paths (mamba_ssm, causal_conv1d) must not be importable: the slow torch path is the peer
    assert importlib.util.find_spec("mamba_ssm") is None and importlib.util.find_spec("causal_conv1d") is None
    cfg = config()
    rng = np.random.default_rng(5)
    params = randomize(mamba.init(cfg, rng), rng)
    model = peers.hf_mamba(params, cfg).eval()        # float64; loading checks missing == [lm_head.weight]
    flat = flatten(params)
    assert model.lm_head.weight is model.backbone.embeddings.weight      # tied head
    idx = rng.integers(0, cfg["vocab_size"], (2, 10))
    with peers.mamba_float64():
        logits_t = model(torch.tensor(idx), use_cache=False).logits
        g = rng.standard_normal(logits_t.shape)
        (logits_t * torch.tensor(g)).sum().backward()
    logits, cache = mamba.forward(params, idx, cfg)
    grads = flatten(mamba.backward(g, cache))
    # float64 everywhere; the two sides differ only in rounding (exp polynomial, summation order)
    assert rel(logits, logits_t.detach().numpy()) < 1e-9
    named = dict(model.named_parameters())
    for name in flat:
        assert rel(grads[name], named[name].grad.numpy()) < 1e-9, name
