"""MoE layer: float64 gradient checks, cross-check against transformers' MixtralSparseMoeBlock, edge cases.

HF (transformers 5) stores the experts fused: experts.gate_up_proj (E, 2F, C) = [w1; w3] per expert and
experts.down_proj (E, C, F) = w2; `peers.hf_mixtral_moe` maps our per-expert checkpoint names onto it.
"""

import numpy as np
import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import peers
from gradcheck import check_grads, weighted_sum
from minillm.models import moe as moe_model
from minillm.nn import moe
from minillm.tree import unflatten


def make_case(seed, E=4, k=2, N=16, C=12, F=10, dead_expert=None, min_gap=1e-3):
    """float64 params/inputs whose routing is at least `min_gap` (in router logits) away from a tie
    between the k-th and (k+1)-th expert, so finite differences never flip a choice."""
    config = {"d_model": C, "d_ff": F, "n_experts": E, "top_k": k, "n_layer": 2,
              "aux_loss_coef": 0.1, "router_z_loss_coef": 0.05}
    for s in range(seed, seed + 1000):
        rng = np.random.default_rng(s)
        p = moe.init_ffn(config, rng, np.float64)
        for ex in p["experts"].values():  # larger weights: a nonlinear, well-conditioned layer
            for lin in ex.values():
                lin["weight"] *= 25.0
        p["gate"]["weight"] *= 40.0
        x = rng.standard_normal((N, C))
        if dead_expert is not None:  # x[:, 0] > 2 and a strongly negative gate weight on it
            x[:, 0] = 2.0 + np.abs(x[:, 0])
            p["gate"]["weight"][dead_expert, 0] = -20.0
        logits = x @ p["gate"]["weight"].T
        srt = np.sort(logits, axis=1)[:, ::-1]
        gaps = np.diff(srt[:, ::-1], axis=1)  # all adjacent gaps (ties anywhere would be ambiguous)
        if gaps.size == 0 or gaps.min() > min_gap:
            return config, p, x
    raise AssertionError("no tie-free case found")


def hf_run(config, p, x, g):
    """HF forward + backward of sum(y g) + aux_coef aux + z_coef z -> (y, logits, aux, grads like p, dx)."""
    E, k = config["n_experts"], config["top_k"]
    block = peers.hf_mixtral_moe(p, config).eval()    # float64
    captured = {}

    def keep_logits(module, inputs, outputs):
        captured["logits"] = outputs[0]  # (router_logits, top-k weights, top-k indices)

    block.gate.register_forward_hook(keep_logits)
    xt = torch.from_numpy(x.reshape(1, -1, x.shape[-1]).copy()).requires_grad_()
    y = block(xt)
    logits = captured["logits"]
    aux = load_balancing_loss_func((logits,), E, k)
    z = (torch.logsumexp(logits, dim=-1) ** 2).mean()  # Mixtral has no z-loss: plain torch
    loss = ((y.reshape(g.shape) * torch.from_numpy(g)).sum() + config["aux_loss_coef"] * aux
            + config["router_z_loss_coef"] * z)
    loss.backward()
    grads = unflatten({n: v.numpy() for n, v in peers.mixtral_moe_grads(block).items()})
    return (y.detach().numpy().reshape(x.shape), logits.detach().numpy(), aux.item(), grads,
            xt.grad.numpy().reshape(x.shape))


def rel(a, b):
    return np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-300)


def leaves(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def ours(config, p, x, g):
    y, cache = moe.moe_forward(x, p, config)
    dx, grads = moe.moe_backward(g, cache)
    return y, cache, dx, grads


# (E, k, N, dead expert): k = 1, k = E, an expert with no token, a batch of one token
CASES = [(4, 2, 16, None), (4, 1, 16, None), (4, 4, 16, None), (4, 2, 16, 3), (4, 2, 1, None),
         (8, 2, 32, None)]


@pytest.mark.parametrize("E,k,N,dead", CASES)
def test_matches_hf_float64(E, k, N, dead):
    # With HF's float32 router casts disabled, both sides compute the same float64 math: only
    # summation order differs (~1e-15). N is a power of two so HF's float32 fractions f_i = count/N
    # are exact. Tolerance 1e-9 relative (to the largest entry of each array), as the issue asks.
    config, p, x = make_case(1, E=E, k=k, N=N, dead_expert=dead)
    g = np.random.default_rng(7).standard_normal(x.shape)
    y, cache, dx, grads = ours(config, p, x, g)
    with peers.no_float_upcast():   # HF's float32 router casts off
        hy, hlogits, haux, hgrads, hdx = hf_run(config, p, x, g)
    assert rel(y, hy) < 1e-9
    assert rel(cache["logits"], hlogits) < 1e-9
    assert abs(cache["aux"] - haux) < 1e-9 * abs(haux)
    assert rel(dx, hdx) < 1e-9
    hflat = dict(leaves(hgrads))
    for name, a in leaves(grads):
        assert rel(a, hflat[name]) < 1e-9 or np.abs(hflat[name]).max() == np.abs(a).max() == 0, name
    counts = cache["counts"]
    assert counts.sum() == N * k
    if dead is not None:
        assert counts[dead] == 0
        assert not np.any(grads["experts"][str(dead)]["w1"]["weight"])
    if k == E:
        assert np.all(counts == N)


def test_matches_hf_as_is():
    # Unmodified HF takes the router softmax in float32, so its routing weights (and the output and
    # gradients that scale with them) carry float32 rounding: ~1e-7 relative. Router logits come from
    # a float64 linear before the cast. Tolerances: 1e-12 for logits, 1e-6 for the rest (~10x float32
    # epsilon; measured ~4e-8 for outputs, aux and dx, ~8e-8 for the parameter gradients).
    config, p, x = make_case(2)
    g = np.random.default_rng(3).standard_normal(x.shape)
    y, cache, dx, grads = ours(config, p, x, g)
    hy, hlogits, haux, hgrads, hdx = hf_run(config, p, x, g)
    assert rel(cache["logits"], hlogits) < 1e-12
    assert rel(y, hy) < 1e-6 and rel(dx, hdx) < 1e-6
    assert abs(cache["aux"] - haux) < 1e-6 * haux
    hflat = dict(leaves(hgrads))
    for name, a in leaves(grads):
        assert rel(a, hflat[name]) < 1e-6, name


@pytest.mark.parametrize("E,k,N,dead", [(4, 2, 6, None), (4, 1, 5, None), (3, 3, 4, None),
                                        (4, 2, 6, 2), (4, 2, 1, None)])
def test_gradients(E, k, N, dead):
    config, p, x = make_case(5, E=E, k=k, N=N, C=5, F=4, dead_expert=dead, min_gap=1e-2)
    g = np.random.default_rng(1).standard_normal(x.shape)
    y, cache, dx, grads = ours(config, p, x, g)

    def loss():
        yy, cc = moe.moe_forward(x, p, config)
        return weighted_sum(yy, g) + moe.aux_loss_of(cc)

    check_grads(loss, {"x": x, "p": p}, {"x": dx, "p": grads}, max_entries=12)


def test_fused_experts_equal_the_per_linear_path(monkeypatch):
    """Plain experts run w1 and w3 as one product [W1; W3] (transposed layout); the per-linear path
    (dense layers, as LoRA and ternary experts take) gives the same layer to float64 rounding."""
    config, p, x = make_case(7, E=4, k=2, N=40, C=12, F=10, dead_expert=1)
    g = np.random.default_rng(2).standard_normal(x.shape)
    y, cache, dx, grads = ours(config, p, x, g)
    assert cache["fused"]
    monkeypatch.setattr(moe, "_fusable", lambda *a: False)
    y2, cache2, dx2, grads2 = ours(config, p, x, g)
    assert not cache2["fused"]
    np.testing.assert_allclose(y, y2, rtol=1e-12, atol=1e-12 * np.abs(y).max())
    np.testing.assert_allclose(dx, dx2, rtol=1e-12, atol=1e-12 * np.abs(dx).max())
    for (name, a), (_, b) in zip(leaves(grads), leaves(grads2)):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-12 * max(np.abs(b).max(), 1e-300), err_msg=name)
    monkeypatch.undo()
    ternary_cache = moe.moe_forward(x, p, dict(config, ternary=True))[1]
    assert not ternary_cache["fused"]  # BitLinear experts keep their dense layers


def test_shapes_determinism_and_stats():
    config, p, x = make_case(3, N=12)
    y2, c2 = moe.moe_forward(x, p, config)
    y3, c3 = moe.moe_forward(x.reshape(3, 4, -1), p, config)
    assert y3.shape == (3, 4, x.shape[1]) and np.array_equal(y3.reshape(y2.shape), y2)
    dx, grads = moe.moe_backward(np.ones_like(y3), c3)
    dx2, grads2 = moe.moe_backward(np.ones_like(y3), c3)
    assert dx.shape == (3, 4, x.shape[1]) and np.array_equal(dx, dx2)
    for (name, a), (_, b) in zip(leaves(grads), leaves(grads2)):
        assert np.array_equal(a, b), name
    stats = moe.stats_of(c2)
    assert stats["expert_tokens"].sum() == 12 * 2 and stats["expert_tokens"].dtype == np.int64
    aux = moe.aux_loss_of(c2)
    assert aux == pytest.approx(0.1 * c2["aux"] + 0.05 * c2["z"])


def test_tie_break_and_uniform_router():
    # A zero router gives every expert probability 1/E: all tokens tie, the lowest indices win, and
    # aux = E * sum_i f_i / E = sum_i f_i = k (the value HF's loss has at perfect balance).
    config, p, x = make_case(4, E=4, k=2, N=8)
    p["gate"]["weight"][:] = 0.0
    y, cache = moe.moe_forward(x, p, config)
    assert list(cache["counts"]) == [8, 8, 0, 0]  # tie-break: lowest expert index wins
    assert cache["aux"] == pytest.approx(2.0)


def test_float32_and_init():
    config = {"d_model": 16, "n_layer": 4, "n_experts": 4, "top_k": 2}
    p = moe.init_ffn(config, np.random.default_rng(0), np.float32)
    assert p["gate"]["weight"].shape == (4, 16) and p["gate"]["weight"].dtype == np.float32
    assert p["experts"]["3"]["w1"]["weight"].shape == (64, 16)  # d_ff defaults to 4 d_model
    assert p["experts"]["3"]["w2"]["weight"].shape == (16, 64)
    assert p["experts"]["0"]["w2"]["weight"].std() < 0.02 / np.sqrt(8) * 1.2
    x = np.random.default_rng(1).standard_normal((2, 3, 16)).astype(np.float32)
    y, cache = moe.moe_forward(x, p, config)
    dx, grads = moe.moe_backward(np.ones_like(y), cache)
    assert y.dtype == dx.dtype == grads["experts"]["1"]["w3"]["weight"].dtype == np.float32
    assert grads["gate"]["weight"].dtype == np.float32


def test_bad_config():
    config, p, x = make_case(0)
    with pytest.raises(ValueError, match="top_k"):
        moe.moe_forward(x, p, {**config, "top_k": 5})
    with pytest.raises(ValueError, match="top_k"):
        moe.moe_forward(x, p, {**config, "top_k": 0})
    with pytest.raises(ValueError, match="experts"):
        moe.moe_forward(x, p, {**config, "n_experts": 8})


# --- the "moe" model: GPT blocks with MoE feed-forwards -------------------------------------------


def model_case(seed=0):
    from minillm import models

    config = models.build_config("moe", vocab_size=11, context=6, n_layer=2, n_head=2, d_model=8,
                                 dtype="float64", n_experts=4, top_k=2, d_ff=6, aux_loss_coef=0.3,
                                 router_z_loss_coef=0.1)
    for s in range(seed, seed + 200):
        rng = np.random.default_rng(s)
        params = moe_model.init(config, rng)
        for layer in params["transformer"]["h"].values():
            layer["mlp"]["gate"]["weight"] *= 30.0  # a router far from uniform
            for ex in layer["mlp"]["experts"].values():  # experts that matter (measurable gradients)
                for lin in ex.values():
                    lin["weight"] *= 20.0
        idx = rng.integers(0, 11, (2, 5))
        _, cache = moe_model.forward(params, idx, config)
        gaps = [np.diff(np.sort(c[3][1]["logits"], axis=1), axis=1).min() for c in cache[3]]
        if min(gaps) > 1e-3:
            return config, params, idx, rng.integers(0, 11, (2, 5))
    raise AssertionError("no tie-free case found")


def test_model_gradients_include_aux_losses():
    from minillm.nn import ops

    config, params, idx, targets = model_case()
    assert config["n_experts"] == 4 and config["aux_loss_coef"] == 0.3

    def loss_and_cache():
        logits, cache = moe_model.forward(params, idx, config)
        ce, ce_cache = ops.cross_entropy_forward(logits, targets)
        return ce + moe_model.aux_loss(cache), cache, ce_cache

    total, cache, ce_cache = loss_and_cache()
    grads = moe_model.backward(ops.cross_entropy_backward(1.0, ce_cache), cache)
    layer = params["transformer"]["h"]["1"]["mlp"]
    arrays = {"wte": params["transformer"]["wte"]["weight"], "gate": layer["gate"]["weight"],
              "w1": layer["experts"]["2"]["w1"]["weight"], "ln_2": params["transformer"]["h"]["0"]["ln_2"]["weight"]}
    g = grads["transformer"]
    analytic = {"wte": g["wte"]["weight"], "gate": g["h"]["1"]["mlp"]["gate"]["weight"],
                "w1": g["h"]["1"]["mlp"]["experts"]["2"]["w1"]["weight"], "ln_2": g["h"]["0"]["ln_2"]["weight"]}
    check_grads(lambda: loss_and_cache()[0], arrays, analytic, max_entries=10)
    assert moe_model.aux_loss(cache) > 0
    stats = moe_model.stats(cache)
    assert stats["expert_tokens"].shape == (4,) and stats["expert_tokens"].sum() == 2 * 10 * 2


def test_model_step_matches_forward():
    config, params, idx, _ = model_case(1)
    logits, _ = moe_model.forward(params, idx, config)
    state = moe_model.init_state(params, config, idx.shape[0])
    for t in range(idx.shape[1]):
        step_logits, state = moe_model.step(params, idx[:, t], state)
        np.testing.assert_allclose(step_logits, logits[:, t], rtol=1e-10, atol=1e-12)


def test_model_defaults():
    from minillm import models

    config = models.build_config("moe")
    assert config["n_experts"] == 8 and config["top_k"] == 2 and config["aux_loss_coef"] == 0.01
    with pytest.raises(ValueError, match="top-k"):
        moe_model.init({**config, "top_k": 9}, np.random.default_rng(0))
