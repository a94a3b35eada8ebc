"""minillm/reference/cases.py: the registry, the samplers of the tokenizer / core-op / GPT-2 / AdamW / LoRA
cases (deterministic per seed, float64, the README's shapes) and the component functions (the upstream-
gradient contract, checked by central differences; forward values against the manifest's math written
out here). The MoE / Mamba / RWKV / BitNet cases are in test_cases_models.py."""

import json

import numpy as np
import pytest

from casecheck import check_upstream_grads, run, sample
from minillm.reference import cases as rc

HERE = [n for n, s in rc.COMPONENTS.items() if s["fn"].__module__ == rc.__name__]
WITH_GRADS = ["layernorm", "gelu", "cross_entropy", "attention", "gpt_block", "gpt", "lora_linear"]


def test_registry():
    float32 = {"gpt", "moe", "selective_scan", "wkv", "bitlinear",          # README: the float32 files
               "rmsnorm", "rope", "gqa_attention", "llama", "mixtral"}
    assert set(HERE) == {"tokenizer_train", "tokenizer_encode", "layernorm", "gelu", "cross_entropy",
                         "attention", "gpt_block", "gpt", "adamw", "lora_linear"}
    for name, spec in rc.COMPONENTS.items():
        assert getattr(rc, name) is spec["fn"]                              # `--impl minillm.reference.cases`
        assert spec["matches"] and spec["math"] and json.loads(json.dumps(spec["config"])) == spec["config"]
        want = {"float64": 1e-9, **({"float32": 1e-5} if name in float32 else {})}
        assert spec["variants"] == want, name


@pytest.mark.parametrize("name", HERE)
def test_samplers_are_deterministic_float64(name):
    a, b, c = sample(name, 5), sample(name, 5), sample(name, 6)
    for da, db in zip(a, b):
        assert list(da) == list(db) and all(np.array_equal(da[k], db[k]) for k in da)
    floats = {k: v for d in a for k, v in d.items() if v.dtype.kind == "f"}
    assert all(v.dtype == np.float64 for v in floats.values())
    if name.startswith("tokenizer"):                                       # fixed texts, no randomness
        return
    assert floats and all(v.dtype.kind in "fi" for d in a for v in d.values())
    other = {k: v for d in c for k, v in d.items()}
    assert not any(np.array_equal(v, other[k]) for k, v in floats.items() if v.size > 1)


def test_documented_shapes():
    i, p, u = sample("layernorm")
    x = i["x"]
    assert x.shape == (2, 5, 8) and p["weight"].shape == p["bias"].shape == (8,) and u["y"].shape == x.shape
    i, _, u = sample("cross_entropy")
    (N, V), t = i["logits"].shape, i["targets"]
    assert t.shape == (N,) and t.dtype == np.int64 and u["loss"].shape == ()
    assert (t == -100).any() and ((t >= 0) & (t < V) | (t == -100)).all()  # the ignore path is exercised
    i, p, u = sample("attention")
    B, T, C = i["x"].shape
    assert p["c_attn.weight"].shape == (C, 3 * C) and p["c_proj.weight"].shape == (C, C)
    cfg = rc.COMPONENTS["gpt"]["config"]
    i, p, u = sample("gpt")
    assert i["idx"].dtype == np.int64 and i["idx"].max() < cfg["vocab_size"]
    assert i["idx"].shape[1] <= cfg["context"]
    assert u["logits"].shape == i["idx"].shape + (cfg["vocab_size"],)
    assert all(k.startswith("transformer.") for k in p) and "transformer.wte.weight" in p
    i, p, u = sample("lora_linear")
    r, (O, I) = rc.COMPONENTS["lora_linear"]["config"]["rank"], p["weight"].shape
    assert p["lora_A"].shape == (r, I) and p["lora_B"].shape == (O, r) and i["x"].shape[-1] == I
    i = sample("adamw")[0]
    assert sorted(i) == sorted(f"{s}.{n}" for s in ("param", "grad", "exp_avg", "exp_avg_sq") for n in
                               rc.COMPONENTS["adamw"]["config"]["decay"])
    assert (np.abs(np.concatenate([i["grad.weight"].ravel(), i["grad.bias"]])) < 1e-7).any()   # eps matters


@pytest.mark.parametrize("name", WITH_GRADS)
def test_gradients_are_those_of_the_upstream_weighted_sum(name):
    """grads[k] . d == d/dt sum_o <outputs[o](k + t d), upstream[o]> at t = 0, central differences."""
    inputs, params, upstream = sample(name, 1)
    outputs, grads = run(name, inputs, params, upstream)
    assert set(upstream) <= set(outputs)
    floats = {k for k, v in {**inputs, **params}.items() if v.dtype.kind == "f"}
    want = {"lora_linear": {"x", "lora_A", "lora_B"}, "gpt": set(params)}.get(name, floats)
    assert set(grads) == want
    check_upstream_grads(name, inputs, params, upstream, grads)


def test_forward_values_follow_the_manifest_math():
    i, p, u = sample("gelu")
    x, y = i["x"], run("gelu", i, p, u)[0]["y"]
    assert np.allclose(y, 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))), 1e-12, 0)
    i, p, u = sample("layernorm")
    x, eps = i["x"], rc.COMPONENTS["layernorm"]["config"]["eps"]
    want = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * p["weight"] + p["bias"]
    assert np.allclose(run("layernorm", i, p, u)[0]["y"], want, 1e-12, 1e-12)
    i, p, u = sample("cross_entropy")
    z, t = i["logits"], i["targets"]
    logp = z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
    keep = t != -100
    assert np.isclose(run("cross_entropy", i, p, u)[0]["loss"], -logp[keep, t[keep]].mean(), 1e-12, 0)
    i, p, u = sample("lora_linear")
    cfg = rc.COMPONENTS["lora_linear"]["config"]
    x = i["x"]
    want = x @ p["weight"].T + p["bias"] + cfg["alpha"] / cfg["rank"] * (x @ p["lora_A"].T) @ p["lora_B"].T
    assert np.allclose(run("lora_linear", i, p, u)[0]["y"], want, 1e-12, 1e-12)
    i, p, u = sample("gpt")
    wpe = run("gpt", i, p, u)[1]["transformer.wpe.weight"]
    T = i["idx"].shape[1]
    assert np.all(wpe[T:] == 0) and np.all(np.abs(wpe[:T]).sum(1) > 0)     # wpe rows past T: zero gradient


def test_adamw_is_one_step_of_the_manifest_formula():
    i, p, u = sample("adamw")
    cfg = rc.COMPONENTS["adamw"]["config"]
    out = run("adamw", i, p, u)[0]
    (b1, b2), t, lr = cfg["betas"], cfg["step"] + 1, cfg["lr"]
    for n, decay in cfg["decay"].items():
        g = i["grad." + n]
        m = b1 * i["exp_avg." + n] + (1 - b1) * g
        v = b2 * i["exp_avg_sq." + n] + (1 - b2) * g * g
        w = i["param." + n] * (1 - lr * cfg["weight_decay"] if decay else 1.0)
        w = w - lr / (1 - b1 ** t) * m / (np.sqrt(v) / np.sqrt(1 - b2 ** t) + cfg["eps"])
        for k, want in (("param.", w), ("exp_avg.", m), ("exp_avg_sq.", v)):
            assert np.allclose(out[k + n], want, 1e-12, 1e-15), k + n


def test_tokenizer_cases():
    cfg = rc.COMPONENTS["tokenizer_train"]["config"]
    merges = run("tokenizer_train", *sample("tokenizer_train"))[0]["merges"]
    M = len(merges)
    assert merges.dtype == np.int64 and merges.shape == (M, 2) and 0 < M <= cfg["vocab_size"] - 256 - 1
    assert (merges >= 0).all() and (merges < 256 + np.arange(M)[:, None]).all()   # only earlier tokens
    inputs, params, upstream = sample("tokenizer_encode")
    assert np.array_equal(params["merges"], merges)
    ids = run("tokenizer_encode", inputs, params, upstream)[0]["ids"]
    tokens = [bytes([b]) for b in range(256)]
    for a, b in merges.tolist():
        tokens.append(tokens[a] + tokens[b])
    assert ids.dtype == np.int64 and ids.max() < len(tokens) and ids.max() >= 256
    assert b"".join(tokens[k] for k in ids) == bytes(inputs["text"]) and len(ids) < inputs["text"].size
