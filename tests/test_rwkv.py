"""RWKV-4 model: float64 gradient checks of the mixing layers, the blocks and the model; parity with
HF `RwkvForCausalLM` (rescale_every=0, same weights, float64) in logits and every parameter gradient;
the recurrent `step` path against the parallel forward and against HF's own state path."""

import numpy as np
import pytest
import torch
from transformers import RwkvForCausalLM
from transformers.models.rwkv import modeling_rwkv

import peers
from gradcheck import check_grads, weighted_sum
from minillm.nn import ops
from minillm.models import rwkv
from minillm.kernels import wkv
from minillm.tree import flatten


@pytest.fixture(autouse=True)
def _numba_wkv_on_small_inputs(monkeypatch):
    """The tiny shapes here would run WKV through the NumPy reference (kernels.wkv.SMALL)."""
    monkeypatch.setattr(wkv, "SMALL", 0)


CFG = dict(arch="rwkv", vocab_size=23, context=16, n_layer=2, n_head=1, d_model=8,
           intermediate_size=20, layer_norm_epsilon=1e-5, dtype="float64")


def _params(cfg=CFG, seed=0):
    """HF-style init, then every parameter nudged so that no symmetry or zero hides a bug
    (init sets time_first = 1 everywhere, ramps that start at 0, and a ~1e-4 embedding)."""
    rng = np.random.default_rng(seed)
    params = rwkv.init(cfg, rng)
    for name, x in flatten(params).items():
        x += (0.3 if "embeddings" in name else 0.1) * rng.normal(size=x.shape)
    return params


def _idx(B=2, T=7, seed=1):
    return np.random.default_rng(seed).integers(0, CFG["vocab_size"], (B, T))


# --- gradient checks ----------------------------------------------------------------------------------


def _layer_check(fwd, bwd, p, x, **kw):
    g = np.random.default_rng(5).normal(size=x.shape)
    y, cache = fwd(x, p, CFG, **kw)
    dx, grads = bwd(g, cache)
    check_grads(lambda: weighted_sum(fwd(x, p, CFG, **kw)[0], g), {"x": x, "p": p}, {"x": dx, "p": grads})


def test_time_mix_gradcheck():
    p = _params()["rwkv"]["blocks"]["1"]["attention"]
    x = np.random.default_rng(2).normal(size=(2, 6, CFG["d_model"]))
    _layer_check(rwkv.time_mix_forward, rwkv.time_mix_backward, p, x)


def test_channel_mix_gradcheck():
    p = _params()["rwkv"]["blocks"]["1"]["feed_forward"]
    x = np.random.default_rng(3).normal(size=(2, 6, CFG["d_model"]))
    _layer_check(rwkv.channel_mix_forward, rwkv.channel_mix_backward, p, x)


@pytest.mark.parametrize("layer", ["0", "1"])  # block 0 also has pre_ln (ln0)
def test_block_gradcheck(layer):
    p = _params()["rwkv"]["blocks"][layer]
    x = np.random.default_rng(4).normal(size=(2, 5, CFG["d_model"]))
    _layer_check(rwkv.block_forward, rwkv.block_backward, p, x)


def test_model_gradcheck():
    params, idx = _params(), _idx(2, 5)
    targets = _idx(2, 5, seed=9)

    def loss():
        return ops.cross_entropy_forward(rwkv.forward(params, idx, CFG)[0], targets)[0]

    logits, cache = rwkv.forward(params, idx, CFG)
    _, ce = ops.cross_entropy_forward(logits, targets)
    grads = rwkv.backward(ops.cross_entropy_backward(1.0, ce), cache)
    # eps 1e-5: time_decay's gradient is ~4e-4 against a loss of ~3, so with eps 1e-6 the rounding of
    # the loss (~1e-16 * 3 / 2e-6) alone is ~1e-6 of it; the truncation error at 1e-5 is ~1e-10
    check_grads(loss, params, grads, max_entries=8, eps=1e-5)


# --- HF transformers peer -------------------------------------------------------------------------------


def _wkv_in_input_dtype(time_decay, time_first, key, value, state=None, return_state=False):
    """The max-tracking WKV loop of HF's CPU path, keeping the input dtype: HF's own loop casts keys
    to float32 (`key[:, t].float()`), which caps a float64 comparison at ~1e-7. The genuine function
    is compared in float32 in test_kernels_wkv.py and below at float32 tolerance."""
    B, T, C = key.shape
    if state is None:
        num, den = key.new_zeros(B, C), key.new_zeros(B, C)
        mx = key.new_full((B, C), -1e38)
    else:
        num, den, mx = state
    w = -torch.exp(time_decay)
    out = []
    for t in range(T):
        kt, vt = key[:, t], value[:, t]
        q = torch.maximum(mx, time_first + kt)
        a, b = torch.exp(mx - q), torch.exp(time_first + kt - q)
        out.append((a * num + b * vt) / (a * den + b))
        q = torch.maximum(mx + w, kt)
        a, b = torch.exp(mx + w - q), torch.exp(kt - q)
        num, den, mx = a * num + b * vt, a * den + b, q
    return torch.stack(out, 1), ([num, den, mx] if (return_state or state is not None) else None)


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def test_init_names_and_shapes_match_hf():
    params = rwkv.init({**CFG, "dtype": "float32"}, np.random.default_rng(0))
    model = peers.hf_rwkv(_params(), CFG)
    ours = flatten(params)
    theirs = model.state_dict()
    assert list(ours) == [k for k in theirs]
    for k, v in ours.items():
        assert v.shape == tuple(theirs[k].shape) and v.dtype == np.float32, k
    # HF's own init gives the same deterministic (non-random) parameters
    hf_init = RwkvForCausalLM(model.config).state_dict()
    for k in ours:
        if "time_" in k:
            np.testing.assert_allclose(ours[k], hf_init[k].numpy(), rtol=1e-6, err_msg=k)


def test_matches_hf_logits_and_all_grads(monkeypatch):
    monkeypatch.setattr(modeling_rwkv, "rwkv_linear_attention_cpu", _wkv_in_input_dtype)
    params, idx = _params(), _idx(2, 9)
    model = peers.hf_rwkv(params, CFG)    # float64
    logits, cache = rwkv.forward(params, idx, CFG)
    G = np.random.default_rng(7).normal(size=logits.shape)
    grads = flatten(rwkv.backward(G, cache))
    t_logits = model(torch.tensor(idx), use_cache=False).logits
    (t_logits * torch.tensor(G)).sum().backward()
    # float64 on both sides, same algorithm: agreement to ~1e-14; 1e-9 is the bound
    assert _rel(logits, t_logits.detach().numpy()) < 1e-9
    for name, p in model.named_parameters():
        assert _rel(grads[name], p.grad.numpy()) < 1e-9, name
    assert len(grads) == len(list(model.parameters()))


def test_matches_genuine_hf_cpu_path():
    """Unpatched HF (its WKV loop in float32): logits agree to float32 accuracy."""
    params, idx = _params(), _idx(2, 9)
    t_logits = peers.hf_rwkv(params, CFG)(torch.tensor(idx), use_cache=False).logits.detach().numpy()
    assert _rel(rwkv.forward(params, idx, CFG)[0], t_logits) < 1e-5


# --- generation state ---------------------------------------------------------------------------------


def test_step_equals_forward_and_prefill():
    params, idx = _params(), _idx(3, 10)
    logits, _ = rwkv.forward(params, idx, CFG)
    state = rwkv.init_state(params, CFG, 3)
    steps = []
    for t in range(idx.shape[1]):
        out, state = rwkv.step(params, idx[:, t], state)
        steps.append(out)
    np.testing.assert_allclose(np.stack(steps, 1), logits, rtol=1e-12, atol=1e-12)
    assert state["pos"] == 10 and state["num"].shape == (CFG["n_layer"], 3, CFG["d_model"])
    # prefill 6 tokens in one pass, then step the rest: same logits and same final state
    pre, st = rwkv.prefill(params, idx[:, :6], rwkv.init_state(params, CFG, 3))
    np.testing.assert_allclose(pre, logits[:, :6], rtol=1e-12, atol=1e-12)
    for t in range(6, 10):
        out, st = rwkv.step(params, idx[:, t], st)
    np.testing.assert_allclose(out, logits[:, -1], rtol=1e-12, atol=1e-12)
    for key in rwkv.STATE_KEYS:
        np.testing.assert_allclose(st[key], state[key], rtol=1e-12, atol=1e-12)


def _hf_zero_state(B):
    state = [torch.zeros(B, CFG["d_model"], CFG["n_layer"], dtype=torch.float64) for _ in range(5)]
    state[4] -= 1e38
    return state


def _assert_state_equal(ours, hf_state):
    for i, key in enumerate(("ffn_x", "att_x", "num", "den", "max")):
        assert _rel(ours[key], hf_state[i].permute(2, 0, 1).numpy()) < 1e-9, key


def test_step_matches_hf_state_path(monkeypatch):
    """HF fed one token at a time with use_cache=True and a float64 state (its default state is
    float32). HF's state is [ffn_x, att_x, num, den, max], each (B, C, n_layer). Batch 1: HF's
    one-token path broadcasts the (B, C) shift state against (B, 1, C) activations into (B, B, C)
    when B > 1 (transformers 5.x), which our step does not copy."""
    monkeypatch.setattr(modeling_rwkv, "rwkv_linear_attention_cpu", _wkv_in_input_dtype)
    params, idx = _params(), _idx(1, 8)
    model = peers.hf_rwkv(params, CFG).eval()
    hf_state, state = _hf_zero_state(1), rwkv.init_state(params, CFG, 1)
    with torch.no_grad():
        for t in range(idx.shape[1]):
            out = model(torch.tensor(idx[:, t:t + 1]), state=hf_state, use_cache=True)
            hf_state = out.state
            ours, state = rwkv.step(params, idx[:, t], state)
            assert _rel(ours, out.logits[:, 0].numpy()) < 1e-9
    _assert_state_equal(state, hf_state)


def test_prefill_matches_hf_chunked_state_path(monkeypatch):
    """Batch 2 through HF's multi-token state path: chunks of 3 and 4 tokens."""
    monkeypatch.setattr(modeling_rwkv, "rwkv_linear_attention_cpu", _wkv_in_input_dtype)
    params, idx = _params(), _idx(2, 7)
    model = peers.hf_rwkv(params, CFG).eval()
    hf_state, state = _hf_zero_state(2), rwkv.init_state(params, CFG, 2)
    with torch.no_grad():
        for chunk in (idx[:, :3], idx[:, 3:]):
            out = model(torch.tensor(chunk), state=hf_state, use_cache=True)
            hf_state = out.state
            ours, state = rwkv.prefill(params, chunk, state)
            assert _rel(ours, out.logits.numpy()) < 1e-9
    _assert_state_equal(state, hf_state)


# --- misc -------------------------------------------------------------------------------------------------


def test_float32_training_steps_reduce_loss():
    cfg = {**CFG, "dtype": "float32", "d_model": 16, "intermediate_size": None}
    params = rwkv.init(cfg, np.random.default_rng(0))
    idx = _idx(4, 12)
    losses = []
    for _ in range(15):
        logits, cache = rwkv.forward(params, idx[:, :-1], cfg)
        assert logits.dtype == np.float32
        loss, ce = ops.cross_entropy_forward(logits, idx[:, 1:])
        grads = flatten(rwkv.backward(ops.cross_entropy_backward(1.0, ce), cache))
        for name, p in flatten(params).items():
            assert grads[name].dtype == np.float32, name
            p -= 0.5 * grads[name]
        losses.append(loss)
    assert losses[-1] < losses[0] - 0.3


def test_bad_input_raises():
    params = _params()
    with pytest.raises(ValueError, match="outside"):
        rwkv.forward(params, np.array([[0, CFG["vocab_size"]]]), CFG)
    with pytest.raises(ValueError, match="integer"):
        rwkv.forward(params, np.zeros((1, 3)), CFG)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        rwkv.forward(params, np.zeros(3, np.int64), CFG)
    with pytest.raises(ValueError, match="tokens must be"):
        rwkv.step(params, np.zeros(3, np.int64), rwkv.init_state(params, CFG, 2))
    with pytest.raises(ValueError, match="dtype"):
        rwkv.init({**CFG, "dtype": "float16"}, np.random.default_rng(0))
