"""LoRA: gradient checks, fresh adapters are a no-op, merge / unmerge, target selection, adapter
files and base/adapter mismatches, frozen base under AdamW, and a float64 cross-check against peft
on transformers' GPT2LMHeadModel."""

import numpy as np
import pytest
from gradcheck import check_grads, weighted_sum

from minillm import finetune, optim
from minillm.models import gpt
from minillm.nn import dense, lora
from minillm.tree import flatten

C = 6


def cfg(rank=4, alpha=8.0, dropout=0.0, targets=None, arch="toy"):
    # alpha != r on purpose: a peft merge bug once hid behind alpha == r (DESIGN.md).
    return {"arch": arch, "lora": lora.lora_config(rank, alpha, targets, dropout)}


def toy_params(rng, dtype=np.float64):
    """A tiny model with GPT-2 names (in_out Conv1D) and Mamba-like names (out_in nn.Linear),
    square weights in both layouts so that a transposed merge would show."""
    def n(*shape):
        return rng.standard_normal(shape).astype(dtype) * 0.5
    return {"transformer": {
        "wte": {"weight": n(11, C)},
        "h": {"0": {
            "ln_1": {"weight": n(C), "bias": n(C)},
            "attn": {"c_attn": {"weight": n(C, 3 * C), "bias": n(3 * C)},
                     "c_proj": {"weight": n(C, C), "bias": n(C)}},
            "mixer": {"in_proj": {"weight": n(2 * C, C)},
                      "out_proj": {"weight": n(C, C), "bias": n(C)}}}}}}


def toy_forward(params, x, config):
    """x: (B, T, C) -> y: (B, T, C) through the four dense layers of toy_params."""
    blk = params["transformer"]["h"]["0"]
    caches = []

    def layer(p, name, h):
        y, c = dense.dense_forward(h, p, dense.mode(config, lora.layout_of(name)))
        caches.append(c)
        return y

    y1 = layer(blk["attn"]["c_attn"], "attn.c_attn", x)
    u = np.tanh(y1[..., :C] + y1[..., C:2 * C] * y1[..., 2 * C:])
    y2 = layer(blk["attn"]["c_proj"], "attn.c_proj", u)
    y3 = layer(blk["mixer"]["in_proj"], "mixer.in_proj", y2)
    y4 = layer(blk["mixer"]["out_proj"], "mixer.out_proj", y3[..., :C] * y3[..., C:])
    return y4, (caches, y1, u, y3)


def toy_backward(dy, cache):
    (c1, c2, c3, c4), y1, u, y3 = cache
    d3 = np.zeros_like(y3)
    dh, g4 = dense.dense_backward(dy, c4)
    d3[..., :C], d3[..., C:] = dh * y3[..., C:], dh * y3[..., :C]
    dy2, g3 = dense.dense_backward(d3, c3)
    du, g2 = dense.dense_backward(dy2, c2)
    dpre = du * (1 - u ** 2)
    dy1 = np.concatenate([dpre, dpre * y1[..., 2 * C:], dpre * y1[..., C:2 * C]], axis=-1)
    dx, g1 = dense.dense_backward(dy1, c1)
    return dx, {"transformer": {"h": {"0": {"attn": {"c_attn": g1, "c_proj": g2},
                                            "mixer": {"in_proj": g3, "out_proj": g4}}}}}


def randomise_B(params, rng):
    """Fresh adapters have B = 0; give them values so that every path is exercised."""
    for name, a in flatten(params).items():
        if name.endswith("lora_B"):
            a[...] = rng.standard_normal(a.shape) * 0.3


# --- the op and the dense hook ---------------------------------------------------------------------


def test_lora_delta_gradcheck():
    rng = np.random.default_rng(0)
    x, A, B = rng.standard_normal((2, 3, 5)), rng.standard_normal((4, 5)), rng.standard_normal((7, 4))
    g = rng.standard_normal((2, 3, 7))
    config = cfg(4, 8.0)
    delta, cache = lora.lora_delta_forward(x, A, B, lora.settings(config))
    np.testing.assert_allclose(delta, 2.0 * (x @ A.T) @ B.T, rtol=1e-13)
    dx, dA, dB = lora.lora_delta_backward(g, cache)
    check_grads(lambda: weighted_sum(lora.lora_delta_forward(x, A, B, lora.settings(config))[0], g),
                {"x": x, "A": A, "B": B}, {"x": dx, "A": dA, "B": dB})


def test_lora_dropout_only_with_rng():
    rng = np.random.default_rng(1)
    x, A, B = rng.standard_normal((3, 8)), rng.standard_normal((2, 8)), rng.standard_normal((4, 2))
    g = rng.standard_normal((3, 4))
    plain = lora.lora_delta_forward(x, A, B, lora.settings(cfg(2, 3.0)))[0]
    config = cfg(2, 3.0, dropout=0.5)
    assert np.array_equal(lora.lora_delta_forward(x, A, B, lora.settings(config))[0], plain)  # no rng: off
    run = lambda: lora.lora_delta_forward(x, A, B, lora.settings(config), rng=np.random.default_rng(7))
    y, cache = run()
    assert not np.allclose(y, plain)
    assert np.array_equal(y, lora.lora_delta_forward(
        x, A, B, lora.settings(lora.training_config(config, np.random.default_rng(7))))[0])
    mask = cache[4]
    assert set(np.unique(mask)) <= {0.0, 2.0}
    np.testing.assert_allclose(y, 1.5 * ((x * mask) @ A.T) @ B.T, rtol=1e-13)
    dx, dA, dB = lora.lora_delta_backward(g, cache)
    check_grads(lambda: weighted_sum(run()[0], g), {"x": x, "A": A, "B": B},
                {"x": dx, "A": dA, "B": dB})


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
def test_dense_with_adapter_gradcheck(layout):
    rng = np.random.default_rng(2)
    I, O, r = 5, 7, 3
    w = rng.standard_normal((I, O) if layout == "in_out" else (O, I))
    p = {"weight": w, "bias": rng.standard_normal(O),
         "lora_A": rng.standard_normal((r, I)), "lora_B": rng.standard_normal((O, r))}
    x, g = rng.standard_normal((2, 4, I)), rng.standard_normal((2, 4, O))
    config = cfg(r, 5.0)
    y, cache = dense.dense_forward(x, p, dense.mode(config, layout))
    w_io = w if layout == "in_out" else w.T
    ref = x @ w_io + p["bias"] + (5.0 / 3) * (x @ p["lora_A"].T) @ p["lora_B"].T
    np.testing.assert_allclose(y, ref, rtol=1e-12)
    dx, grads = dense.dense_backward(g, cache)
    assert "weight" not in grads                    # the base weight is frozen: no gradient at all
    assert set(grads) == {"bias", "lora_A", "lora_B"}
    trainable = {k: p[k] for k in ("lora_A", "lora_B", "bias")}
    check_grads(lambda: weighted_sum(dense.dense_forward(x, p, dense.mode(config, layout))[0], g),
                {"x": x, **trainable}, {"x": dx, **grads})


def test_toy_model_gradcheck_and_fresh_adapter_is_exact_noop():
    rng = np.random.default_rng(3)
    base = toy_params(rng)
    x = rng.standard_normal((2, 3, C))
    config = cfg(4, 8.0, targets=["all"])
    y0, _ = toy_forward(base, x, config)
    params = lora.add_adapters(base, config, rng)
    assert np.array_equal(toy_forward(params, x, config)[0], y0)        # B = 0: exactly nothing
    for dtype in (np.float32,):
        b32 = toy_params(np.random.default_rng(9), dtype)
        p32 = lora.add_adapters(b32, config, rng)
        assert flatten(p32)["transformer.h.0.attn.c_attn.lora_A"].dtype == dtype
        assert np.array_equal(toy_forward(p32, x.astype(dtype), config)[0],
                              toy_forward(b32, x.astype(dtype), config)[0])
    randomise_B(params, rng)
    g = rng.standard_normal(y0.shape)
    y, cache = toy_forward(params, x, config)
    dx, grads = toy_backward(g, cache)
    names = lora.adapter_names(params)
    assert len(names) == 8 and not any(n.endswith(".weight") for n in flatten(grads))
    flat_p = flatten(params)
    arrays = {n: flat_p[n] for n in names}
    check_grads(lambda: weighted_sum(toy_forward(params, x, config)[0], g),
                {"x": x, **arrays}, {"x": dx, **lora.adapter_grads(grads, params)})


# --- merge / unmerge --------------------------------------------------------------------------------


def test_merge_equals_adapter_model_and_unmerge_restores():
    rng = np.random.default_rng(4)
    base = toy_params(rng)
    before = {n: a.copy() for n, a in flatten(base).items()}
    config = cfg(3, 7.0, targets=["all"])
    params = lora.add_adapters(base, config, rng)
    randomise_B(params, rng)
    x = rng.standard_normal((2, 5, C))
    y = toy_forward(params, x, config)[0]
    merged = lora.merge(params, config)
    assert not lora.adapter_names(merged)
    # float64: merged and adapter model differ only by rounding (x (W + s B A) vs x W + s (x A) B)
    np.testing.assert_allclose(toy_forward(merged, x, {"arch": "toy"})[0], y, rtol=1e-11, atol=1e-12)
    assert not np.allclose(y, toy_forward(base, x, config)[0])          # the adapter did something
    for n, a in flatten(base).items():                                   # inputs untouched
        assert np.array_equal(a, before[n])
    _, adapters = lora.split_adapters(params)
    restored = lora.unmerge(merged, adapters, config)
    fr, fp = flatten(restored), flatten(params)
    assert fr.keys() == fp.keys()
    for n in fp:
        np.testing.assert_allclose(fr[n], fp[n], rtol=0, atol=1e-13)


def test_merge_errors():
    rng = np.random.default_rng(5)
    params = lora.add_adapters(toy_params(rng), cfg(targets=["c_attn"]), rng)
    with pytest.raises(ValueError, match="ternary"):
        lora.merge(params, {**cfg(), "ternary": True})
    with pytest.raises(ValueError, match="needs a 'lora' section"):
        lora.merge(params, {"arch": "toy"})
    with pytest.raises(ValueError, match="no LoRA adapters"):
        lora.merge(toy_params(rng), cfg())


# --- choosing layers --------------------------------------------------------------------------------


def test_targets():
    rng = np.random.default_rng(6)
    base = toy_params(rng)
    pick = lambda t, **kw: lora.match_targets(base, t, **kw)
    assert pick(["c_attn", "attn.c_proj"]) == ["transformer.h.0.attn.c_attn",
                                                "transformer.h.0.attn.c_proj"]
    assert pick(["mixer.*"]) == ["transformer.h.0.mixer.in_proj", "transformer.h.0.mixer.out_proj"]
    assert pick(["re:.*_proj"]) == ["transformer.h.0.attn.c_proj", "transformer.h.0.mixer.in_proj",
                                    "transformer.h.0.mixer.out_proj"]
    assert len(pick("all")) == 4 and len(pick(["h.0.*"])) == 4          # wildcards skip ln_1, biases
    params = lora.add_adapters(base, cfg(arch="gpt"), rng, default_targets=gpt.LORA_TARGETS)  # attention
    assert {n.rsplit(".", 1)[0] for n in lora.adapter_names(params)} == {
        "transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"}
    for bad, msg in [(["wte"], "not a dense layer"), (["ln_1"], "not a dense layer"),
                     (["c_attn.weight"], "not a dense layer"), (["c_attn", "q_proj"], "matches no"),
                     (["re:("], "bad LoRA target regex")]:
        with pytest.raises(ValueError, match=msg):
            pick(bad)
    with pytest.raises(ValueError, match="no default LoRA targets"):
        lora.add_adapters(base, cfg(arch="toy"), rng)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        lora.add_adapters(params, cfg(arch="gpt"), rng, default_targets=gpt.LORA_TARGETS)
    with pytest.raises(ValueError, match="rank"):
        lora.lora_config(0, 1.0)


def test_add_adapters_init_and_counts():
    rng = np.random.default_rng(7)
    base = toy_params(rng)
    params = lora.add_adapters(base, cfg(4, 8.0, targets=["c_attn", "in_proj"]), np.random.default_rng(0))
    again = lora.add_adapters(base, cfg(4, 8.0, targets=["c_attn", "in_proj"]), np.random.default_rng(0))
    flat, fb = flatten(params), flatten(base)
    for layer, (i, o) in {"transformer.h.0.attn.c_attn": (C, 3 * C),
                          "transformer.h.0.mixer.in_proj": (C, 2 * C)}.items():
        A, B = flat[f"{layer}.lora_A"], flat[f"{layer}.lora_B"]
        assert A.shape == (4, i) and B.shape == (o, 4) and not B.any()
        assert np.abs(A).max() <= 1 / np.sqrt(i) and np.abs(A).max() > 0.5 / np.sqrt(i)
        assert np.array_equal(A, flatten(again)[f"{layer}.lora_A"])    # seeded
    assert all(flat[n] is fb[n] for n in fb)                            # base arrays shared
    assert "lora_A" not in base["transformer"]["h"]["0"]["attn"]["c_attn"]
    s = lora.trainable_summary(params)
    assert s["trainable"] == 4 * (C + 3 * C) + 4 * (C + 2 * C)
    assert s["total"] == lora.count_params(base) + s["trainable"]
    assert "trainable params: 168 of 528 (31.818%)" in lora.format_summary(params)


def test_split_join_and_mismatches():
    rng = np.random.default_rng(8)
    base = toy_params(rng)
    config = cfg(2, 4.0, targets=["all"])
    params = lora.add_adapters(base, config, rng)
    b, adapters = lora.split_adapters(params)
    assert flatten(b).keys() == flatten(base).keys() and len(flatten(adapters)) == 8
    assert flatten(lora.join(b, adapters)).keys() == flatten(params).keys()
    flat = flatten(adapters)
    A = "transformer.h.0.attn.c_attn.lora_A"
    cases = [({**flat, "transformer.h.9.attn.c_attn.lora_A": flat[A]}, "does not exist"),
             ({**flat, A: np.zeros((2, C + 1))}, "does not fit"),
             ({k: v for k, v in flat.items() if k != A}, "needs both"),
             ({**flat, "transformer.wte.lora_A": flat[A]}, "not a dense layer"),
             ({**flat, "transformer.h.0.attn.c_attn.weight": flat[A]}, "not a LoRA tensor")]
    for bad, msg in cases:
        with pytest.raises(ValueError, match=msg):
            lora.join(b, bad)
    with pytest.raises(ValueError, match="has rank 2, the config says 3"):
        lora.join(b, adapters, cfg(3, 4.0))
    with pytest.raises(ValueError, match="no gradient for adapter"):
        lora.adapter_grads({}, params)


def test_adapter_files_roundtrip_and_attach_errors(tmp_path):
    rng = np.random.default_rng(9)
    base = toy_params(rng, np.float32)
    config = {"arch": "gpt", "vocab_size": 11, "n_layer": 1, "n_head": 2, "d_model": C,
              "lora": lora.lora_config(2, 4.0, ["c_attn"], 0.1)}
    params = lora.add_adapters(base, config, rng)
    randomise_B(params, rng)
    finetune.save_adapter(str(tmp_path), params, lora.training_config(config, rng), base="ckpt/b")
    adapters, meta = finetune.load_adapter(str(tmp_path))
    assert sorted(adapters) == sorted(lora.adapter_names(params)) and meta["base"] == "ckpt/b"
    plain = {k: v for k, v in config.items() if k != "lora"}
    joined, jconfig = finetune.attach(base, plain, adapters, meta)
    assert jconfig["lora"] == config["lora"]
    for n, a in flatten(params).items():
        assert np.array_equal(flatten(joined)[n], a)
    with pytest.raises(ValueError, match="architecture 'gpt', the base model is 'rwkv'"):
        finetune.attach(base, {**plain, "arch": "rwkv"}, adapters, meta)
    with pytest.raises(ValueError, match="d_model 6 vs 8"):
        finetune.attach(base, {**plain, "d_model": 8}, adapters, meta)
    with pytest.raises(ValueError, match="does not exist in the base"):      # missing layer names
        del base["transformer"]["h"]["0"]["attn"]["c_attn"]
        finetune.attach(base, plain, adapters, meta)
    with pytest.raises(ValueError, match="not a LoRA adapter directory"):
        finetune.load_adapter(str(tmp_path / "nope"))


def test_adamw_never_touches_frozen_weights():
    rng = np.random.default_rng(10)
    config = cfg(2, 4.0, targets=["all"])
    params = lora.add_adapters(toy_params(rng, np.float32), config, rng)
    before = {n: a.copy() for n, a in flatten(params).items()}
    trainable = lora.adapter_names(params)
    state = optim.adamw_init(params, trainable=trainable)
    x = rng.standard_normal((2, 3, C)).astype(np.float32)
    for _ in range(3):
        y, cache = toy_forward(params, x, config)
        _, grads = toy_backward(y, cache)                                # loss = |y|^2 / 2
        optim.adamw_step(params, grads, state, lr=1e-2, trainable=trainable)
    for n, a in flatten(params).items():
        same = np.array_equal(a, before[n])
        assert same != (n in trainable), n            # adapters moved, everything else bit-identical


# --- peft on transformers' GPT2LMHeadModel ---------------------------------------------------------


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.filterwarnings("ignore::FutureWarning")   # transformers' own deprecation notice
def test_matches_peft_on_gpt2():
    import torch

    import peers
    from minillm.models import gpt
    from minillm import models

    rng = np.random.default_rng(11)
    config = models.build_config("gpt", vocab_size=37, context=12, n_layer=2, n_head=2, d_model=16,
                                 dtype="float64")
    config["lora"] = lora.lora_config(4, 8.0, ["c_attn", "c_proj"])     # alpha != r
    base = gpt.init(config, rng)
    params = lora.add_adapters(base, config, rng)
    idx = rng.integers(0, config["vocab_size"], (2, 9))
    assert np.array_equal(gpt.forward(params, idx, config)[0], gpt.forward(base, idx, config)[0])
    randomise_B(params, rng)
    # GPT2LMHeadModel in float64 (HF's default attention) from the base weights, then peft's adapters set
    # from ours; peft turns fan_in_fan_out on by itself for Conv1D (with a warning); say it explicitly.
    hf = peers.hf_gpt2(base, config, attn=None).eval()
    peft_model, theirs = peers.peft_lora(hf, params, rank=4, alpha=8, targets=["c_attn", "c_proj"],
                                         fan_in_fan_out=True)
    assert set(theirs) == lora.adapter_names(params)   # same layers chosen (attn and mlp c_proj)

    g = rng.standard_normal((2, 9, config["vocab_size"]))
    logits, cache = gpt.forward(params, idx, config)
    grads = lora.adapter_grads(gpt.backward(g, cache), params)
    ref = peft_model(input_ids=torch.from_numpy(idx)).logits
    (ref * torch.from_numpy(g)).sum().backward()
    # Same float64 math in a different order (fused qkv views, BLAS blocking): agreement is
    # ~1e-15 relative; 1e-9 is the bound.
    assert _rel(logits, ref.detach().numpy()) <= 1e-9
    for n, p in theirs.items():
        assert _rel(grads[n], p.grad.numpy()) <= 1e-9, n

    merged = lora.merge(params, config)
    hf_merged = peft_model.merge_and_unload()
    for n, a in flatten(merged).items():                # Conv1D update transposed like peft's
        np.testing.assert_allclose(a, hf_merged.state_dict()[n].numpy(), rtol=0, atol=1e-14)
    assert _rel(gpt.forward(merged, idx, config)[0], logits) <= 1e-12
    state = gpt.init_state(params, config, 2)             # generation (KV cache) sees the adapters
    for t in range(idx.shape[1]):
        last, state = gpt.step(params, idx[:, t], state)
    assert _rel(last, logits[:, -1]) <= 1e-12
