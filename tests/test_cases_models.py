"""minillm/reference/cases_models.py: the MoE / Mamba / RWKV / BitNet golden cases. Samplers deterministic
per seed, float64, README shapes; the margins the module promises (MoE routing away from top-k ties, BitLinear
values away from rounding boundaries, also after a float32 cast); the upstream-gradient contract by central
differences (BitLinear: its straight-through backward, written out from the manifest's math)."""

import ast
import os
import subprocess
import sys

import numpy as np
import pytest

from casecheck import check_upstream_grads, run, sample
from minillm.reference import cases as rc
from minillm.reference import cases_models as rcm
from minillm.reference import common

MODELS = ["moe", "selective_scan", "mamba_block", "wkv", "rwkv_block", "bitlinear", "ternary_pack"]


def dist_to_half(v):
    """Distance of each value to the nearest rounding boundary k + 1/2."""
    return np.abs(v - 0.5 - np.round(v - 0.5))


def _reference_imports(module):
    """The minillm.reference modules `module`'s source imports, at the top or inside functions."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(rc.__file__)))     # the minillm package
    is_module = lambda n: os.path.isfile(os.path.join(root, *n.split(".")[1:]) + ".py")  # noqa: E731
    tree = ast.parse(open(module.__file__, encoding="utf-8").read())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.module:   # `from pkg import module` names the module
            names |= {f"{n.module}.{a.name}" if is_module(f"{n.module}.{a.name}") else n.module for a in n.names}
    return {n for n in names if n.startswith("minillm.reference.")}


def test_leaf_module_and_reexports():
    # importing cases_models alone loads only the package (with its manifest and report modules) and common.py
    code = ("import sys, minillm.reference.cases_models as m; "
            "print(*sorted(k for k in sys.modules if k.startswith('minillm.reference')))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=root, capture_output=True, text=True)
    assert out.stdout.split() == ["minillm.reference", "minillm.reference.cases_models",
                                  "minillm.reference.common", "minillm.reference.manifest",
                                  "minillm.reference.report"]
    # no cycle, lazy imports included: cases -> cases_models -> common, and common imports no other
    # reference module
    assert _reference_imports(rcm) == {"minillm.reference.common"}
    assert _reference_imports(common) == set()
    assert _reference_imports(rc) == {"minillm.reference.cases_models", "minillm.reference.cases_llama",
                                      "minillm.reference.common"}
    # the registry's model entries are this module's, their functions re-exported by cases.py, so
    # `--impl minillm.reference.cases` has every component
    assert set(rcm.MODEL_COMPONENTS) == set(MODELS)
    for name in MODELS:
        assert rc.COMPONENTS[name] is rcm.MODEL_COMPONENTS[name]
        assert rc.COMPONENTS[name]["fn"] is getattr(rcm, name) is getattr(rc, name)


def test_away_from_half():
    # private, but the BitLinear cases are only valid (every implementation rounds alike) if it is right
    assert rcm._away_from_half(np.array([0.2, 1.7, -3.1, 126.9]))
    assert not rcm._away_from_half(np.array([0.2, 2.5004]))
    assert rcm._away_from_half(np.array([0.2, 2.5004]), margin=1e-4)
    assert not rcm._away_from_half(np.array([-0.5])) and not rcm._away_from_half(np.array([1.0, -1.4995]))


@pytest.mark.parametrize("name", MODELS)
def test_samplers_are_deterministic_float64(name):
    a, b, c = sample(name, 3), sample(name, 3), sample(name, 4)
    a, b, c = ({k: v for d in s for k, v in d.items()} for s in (a, b, c))
    assert list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert all(v.dtype == np.float64 for v in a.values())
    assert not any(np.array_equal(v, c[k]) for k, v in a.items() if v.size > 1 and np.ptp(v) > 0)


def test_documented_shapes():
    cfg = rc.COMPONENTS["moe"]["config"]
    i, p, u = sample("moe")
    E, C, F = cfg["n_experts"], cfg["d_model"], cfg["d_ff"]
    assert i["x"].shape == (2, 8, C) and p["gate.weight"].shape == (E, C) and u["aux_loss"].shape == ()
    assert all(p[f"experts.{e}.{w}.weight"].shape == s for e in range(E)
               for w, s in (("w1", (F, C)), ("w2", (C, F)), ("w3", (F, C))))
    i = sample("selective_scan")[0]
    (B, L, D), N = i["x"].shape, i["A"].shape[1]
    assert i["dt"].shape == (B, L, D) and i["A"].shape == (D, N) and i["D"].shape == (D,)
    assert i["B"].shape == i["C"].shape == (B, L, N) and (i["dt"] > 0).all() and (i["A"] < 0).all()
    sh = {k: v.shape for k, v in sample("wkv")[0].items()}
    assert sh["key"] == sh["value"] and len(sh["key"]) == 3 and sh["time_decay"] == sh["time_first"] == sh["key"][2:]
    p = sample("mamba_block")[1]
    assert p["norm.weight"].shape == (8,) and not np.any(p["norm.weight"] == 1.0)   # no special values
    p = sample("rwkv_block")[1]
    assert {k.split(".")[0] for k in p} == {"pre_ln", "ln1", "ln2", "attention", "feed_forward"}
    i, p, u = sample("bitlinear")
    O, I = p["weight"].shape
    assert p["bias"].shape == (O,) and i["x"].shape[-1] == I and u["y"].shape == i["x"].shape[:-1] + (O,)


def test_moe_routing_away_from_ties():
    # ~2% of unfiltered draws have two router logits within 1e-3: 200 seeds would catch a lost filter
    for seed in range(200):
        i, p, u = sample("moe", seed)
        for dt in (np.float64, np.float32):             # the float32 file must route the same way
            logits = i["x"].reshape(16, -1).astype(dt) @ p["gate.weight"].T.astype(dt)
            assert np.diff(np.sort(logits, axis=1), axis=1).min() > 1e-3, (seed, dt)


def test_moe_outputs():
    i, p, u = sample("moe")
    x, gate, cfg = i["x"], p["gate.weight"], rc.COMPONENTS["moe"]["config"]
    assert x.shape[0] * x.shape[1] == 16 and set(u) == {"y", "aux_loss"}      # 16 tokens: exact f_i
    out = run("moe", i, p, u)[0]
    assert set(out) == {"y", "aux_loss", "router_logits"} and out["aux_loss"].shape == ()
    logits = x @ gate.T
    assert out["router_logits"].shape == logits.shape and np.allclose(out["router_logits"], logits, 1e-12, 1e-12)
    z = logits.reshape(-1, cfg["n_experts"])
    probs = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    chosen = np.zeros_like(probs)
    np.put_along_axis(chosen, np.argsort(-z, axis=1)[:, :cfg["top_k"]], 1.0, axis=1)
    aux = cfg["n_experts"] * np.sum(chosen.mean(0) * probs.mean(0))     # n_experts * sum_i f_i P_i
    assert np.isclose(out["aux_loss"], aux, 1e-12, 0)


def test_bitlinear_case_away_from_rounding_boundaries():
    for seed in range(50):
        i, p, u = sample("bitlinear", seed)
        for dt in (np.float64, np.float32):
            x, w = (v.astype(dt).astype(np.float64) for v in (i["x"], p["weight"]))
            assert dist_to_half(x * 127 / np.abs(x).max(-1, keepdims=True)).min() > 1e-3, (seed, dt)
            assert dist_to_half(w / np.abs(w).mean()).min() > 1e-3, (seed, dt)
        np.testing.assert_array_equal(sample("ternary_pack", seed)[0]["weight"], p["weight"])


def test_bitlinear_and_ternary_pack_follow_the_manifest_math():
    i, p, u = sample("bitlinear")
    x, w, dy = i["x"], p["weight"], u["y"]
    s = max(np.abs(w).mean(), 1e-5)
    wq = np.clip(np.round(w / s), -1, 1)
    a = 127 / np.maximum(np.abs(x).max(-1, keepdims=True), 1e-5)
    xq = np.clip(np.round(x * a), -128, 127)
    out, grads = run("bitlinear", i, p, u)
    assert np.allclose(out["y"], (xq / a) @ (s * wq).T + p["bias"], 1e-12, 1e-12)
    assert np.allclose(grads["x"], dy @ (s * wq), 1e-12, 1e-12)                      # straight-through
    assert np.allclose(grads["weight"], np.einsum("bto,bti->oi", dy, xq / a), 1e-12, 1e-12)
    assert np.allclose(grads["bias"], dy.sum((0, 1)), 1e-12, 1e-12) and set(grads) == {"x", "weight", "bias"}
    i = sample("ternary_pack")[0]
    out, grads = run("ternary_pack", i, {}, {})
    (O, I), R = w.shape, -(-w.shape[0] // 4)
    assert grads == {} and out["packed"].dtype == np.uint8 and out["packed"].shape == (R, I)
    assert out["scale"].shape == (1,) and np.isclose(out["scale"][0], s, 1e-12, 0)
    unpacked = np.concatenate([(out["packed"] >> (2 * j)) & 3 for j in range(4)]).astype(np.int64) - 1
    np.testing.assert_array_equal(unpacked[:O], wq)


@pytest.mark.parametrize("name", ["moe", "selective_scan", "mamba_block", "wkv", "rwkv_block"])
def test_gradients_are_those_of_the_upstream_weighted_sum(name):
    """grads[k] . d == d/dt sum_o <outputs[o](k + t d), upstream[o]> at t = 0 (MoE: the aux_loss path too)."""
    inputs, params, upstream = sample(name, 1)
    outputs, grads = run(name, inputs, params, upstream)
    assert set(upstream) <= set(outputs) and set(grads) == set(inputs) | set(params)
    check_upstream_grads(name, inputs, params, upstream, grads)
