"""nn/gqa.py (grouped-query attention, sliding window, KV cache) and nn/swiglu.py: float64 gradient checks,
the step against the full forward, and HF's LlamaAttention / MistralAttention / LlamaMLP on one layer."""

import contextlib

import numpy as np
import pytest
import torch

import peers
from gradcheck import check_grads, weighted_sum
from minillm import kernels
from minillm.nn import gqa, ops, swiglu
from minillm.tree import flatten

C, H = 16, 4


def _params(rng, Hkv, scale=0.3):
    hd = C // H
    return {"q_proj": {"weight": rng.standard_normal((H * hd, C)) * scale},
            "k_proj": {"weight": rng.standard_normal((Hkv * hd, C)) * scale},
            "v_proj": {"weight": rng.standard_normal((Hkv * hd, C)) * scale},
            "o_proj": {"weight": rng.standard_normal((C, H * hd)) * scale}}


def _config(Hkv, window=None, theta=100.0):
    return {"d_model": C, "n_head": H, "n_kv_head": Hkv, "rope_theta": theta, "sliding_window": window,
            "context": 4}


@pytest.mark.parametrize("impl", ["numba", "reference"])
@pytest.mark.parametrize("Hkv, window", [(1, None), (2, None), (4, None), (2, 3)])
def test_gqa_gradients_float64(Hkv, window, impl):
    rng = np.random.default_rng(Hkv)
    x, p, config = rng.standard_normal((2, 6, C)), _params(rng, Hkv), _config(Hkv, window)
    g = rng.standard_normal(x.shape)
    forced = kernels.forced("reference") if impl == "reference" else kernels.forced("numba")
    with forced:
        y, cache = gqa.gqa_forward(x, p, config)
        dx, grads = gqa.gqa_backward(g, cache)
        check_grads(lambda: weighted_sum(gqa.gqa_forward(x, p, config)[0], g), {"x": x, **p},
                    {"x": dx, **grads})


def test_sliding_window_hides_old_keys_and_a_window_of_t_changes_nothing():
    rng = np.random.default_rng(5)
    x, p = rng.standard_normal((1, 7, C)), _params(rng, 2)
    full, c_full = gqa.gqa_forward(x, p, _config(2))
    same, _ = gqa.gqa_forward(x, p, _config(2, window=7))
    np.testing.assert_array_equal(same, full)
    _, c = gqa.gqa_forward(x, p, _config(2, window=3))
    i, j = np.nonzero(np.triu(np.ones((7, 7)), 1) + np.tril(np.ones((7, 7)), -3))
    assert (c.prob[..., i, j] == 0).all() and (c.prob.sum(-1) > 0.999).all()
    assert (c_full.prob[..., 6, 0] > 0).all()


@pytest.mark.parametrize("Hkv, window", [(1, None), (2, 3), (4, None)])
def test_kv_cache_steps_equal_the_forward_and_grow_past_capacity(Hkv, window):
    rng = np.random.default_rng(7)
    config = _config(Hkv, window)                     # capacity 4 < T: the cache doubles twice
    x, p = rng.standard_normal((3, 9, C)), _params(rng, Hkv)
    full, _ = gqa.gqa_forward(x, p, config)
    kv = gqa.init_kv_cache(3, config, x.dtype)
    rows = [gqa.gqa_step(x[:, t], p, config, kv, t)[0] for t in range(9)]
    np.testing.assert_allclose(np.stack(rows, 1), full, rtol=1e-12, atol=1e-13)
    assert kv["k"].shape == (3, Hkv, 16, C // H)


def test_bad_head_counts_are_refused():
    with pytest.raises(ValueError, match="divide"):
        gqa.heads({"d_model": 16, "n_head": 4, "n_kv_head": 3})
    with pytest.raises(ValueError, match="even"):
        gqa.heads({"d_model": 12, "n_head": 4})


@pytest.mark.parametrize("Hkv, window", [(1, None), (2, None), (4, None), (2, 3)])
def test_gqa_equals_hf_attention_float64(Hkv, window):
    """One HF LlamaAttention (MistralAttention with a window) with our weights, fed HF's own rotary tables
    (float64 under llama_float64) and causal mask."""
    from transformers import AutoModelForCausalLM

    rng = np.random.default_rng(11)
    x, p, config = rng.standard_normal((2, 6, C)), _params(rng, Hkv), _config(Hkv, window)
    g = rng.standard_normal(x.shape)
    y, cache = gqa.gqa_forward(x, p, config)
    dx, grads = gqa.gqa_backward(g, cache)
    with peers.llama_float64():
        hc = peers.llama_config({**config, "vocab_size": 8, "n_layer": 1, "context": 8})
        model = AutoModelForCausalLM.from_config(hc).to(torch.float64)
        attn = peers.load_params(model.model.layers[0].self_attn, p)
        xt = torch.tensor(x, requires_grad=True)
        pos = torch.arange(6)[None]
        rot = model.model.rotary_emb(xt, pos)
        i, j = np.indices((6, 6))
        keep = (j <= i) & ((j > i - window) if window else True)
        mask = torch.zeros(6, 6, dtype=torch.float64).masked_fill(torch.tensor(~keep), torch.finfo(torch.float64).min)
        out, _ = attn(xt, position_embeddings=rot, attention_mask=mask[None, None])
        (out * torch.tensor(g)).sum().backward()
    np.testing.assert_allclose(y, out.detach().numpy(), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-12, atol=1e-12)
    theirs = dict(attn.named_parameters())
    for name, grad in flatten(grads).items():
        np.testing.assert_allclose(grad, theirs[name].grad.numpy(), rtol=1e-12, atol=1e-12, err_msg=name)


def test_swiglu_gradients_and_hf_llama_mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    rng = np.random.default_rng(3)
    F = 24
    p = {"gate_proj": {"weight": rng.standard_normal((F, C)) * 0.5},
         "up_proj": {"weight": rng.standard_normal((F, C)) * 0.5},
         "down_proj": {"weight": rng.standard_normal((C, F)) * 0.5}}
    x, g = rng.standard_normal((2, 5, C)), rng.standard_normal((2, 5, C))
    y, cache = swiglu.swiglu_forward(x, p, {})
    dx, grads = swiglu.swiglu_backward(g, cache)
    check_grads(lambda: weighted_sum(swiglu.swiglu_forward(x, p, {})[0], g), {"x": x, **p}, {"x": dx, **grads})
    mlp = peers.load_params(LlamaMLP(LlamaConfig(hidden_size=C, intermediate_size=F, num_attention_heads=H)).to(torch.float64), p)
    xt = torch.tensor(x, requires_grad=True)
    out = mlp(xt)
    (out * torch.tensor(g)).sum().backward()
    np.testing.assert_allclose(y, out.detach().numpy(), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("patched", [True, False])
def test_rmsnorm_equals_hf_llama_rmsnorm(patched):
    """ops.rmsnorm is HF's LlamaRMSNorm (eps inside the square root, weight after the normalisation). HF
    computes in float32 for any input: in float64 compare with that cast disabled (peers.llama_float64);
    the genuine float32 code is float32-accurate."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    rng = np.random.default_rng(4)
    x, w, g = rng.standard_normal((3, 4, C)) * 3.0, rng.standard_normal(C), rng.standard_normal((3, 4, C))
    y, cache = ops.rmsnorm_forward(x, w, 1e-5)
    dx, dw = ops.rmsnorm_backward(g, cache)
    norm = peers.load_params(LlamaRMSNorm(C, eps=1e-5).to(torch.float64), {"weight": w})
    xt = torch.tensor(x, requires_grad=True)
    with peers.llama_float64() if patched else contextlib.nullcontext():
        out = norm(xt)
    (out * torch.tensor(g)).sum().backward()
    tol = 1e-13 if patched else 1e-6
    np.testing.assert_allclose(y, out.detach().numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(dw, norm.weight.grad.numpy(), rtol=tol, atol=tol)
