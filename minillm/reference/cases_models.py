"""Golden cases for the model-family components: Mixture of Experts, Mamba (selective scan, block),
RWKV (WKV, block) and BitNet (BitLinear, ternary packing). Same conventions as reference_cases.py, which
holds the registry (configs, tolerances, peers, math) and re-exports these functions, so
`--impl minillm.reference.cases` covers them too. This module is the leaf: it imports no other
reference module at import time (the samplers read their configs from the registry when called).
"""

import numpy as np

from minillm.models import mamba, rwkv
from minillm.nn import ops, ternary
from minillm.nn import moe as _moe
from minillm.tree import flatten, unflatten


def _normal(rng, shape, scale=1.0, shift=0.0):
    return rng.standard_normal(shape) * scale + shift


def _away_from_half(values, margin=1e-3):
    """True when no value lies within `margin` of a rounding boundary k + 1/2."""
    frac = np.abs(values - np.floor(values) - 0.5)
    return bool(frac.min() > margin)


def _config(name):
    """The registry's config of component `name` (imported here, at call time, to avoid a cycle)."""
    from minillm.reference.cases import COMPONENTS

    return COMPONENTS[name]["config"]


# --- Mixture of Experts -----------------------------------------------------------------------------


def _case_moe(rng):
    cfg = _config("moe")
    while True:   # routing at least 1e-3 (in router logits) away from any tie, also in float32
        p = flatten(_moe.init_ffn({**cfg, "n_layer": 1}, rng, np.float64))
        for k in p:
            p[k] *= 40.0 if k == "gate.weight" else 25.0
        x = _normal(rng, (2, 8, cfg["d_model"]))   # 16 tokens: HF's float32 token fractions f_i are exact
        logits = np.sort(x.reshape(-1, x.shape[-1]) @ p["gate.weight"].T, axis=1)
        if np.diff(logits, axis=1).min() > 1e-3:
            return {"x": x}, p, {"y": _normal(rng, x.shape), "aux_loss": np.array(0.1)}


def moe(inputs, params, upstream, config):
    x = inputs["x"]
    cfg = {**config, "aux_loss_coef": float(upstream["aux_loss"]), "router_z_loss_coef": 0.0}
    y, cache = _moe.moe_forward(x, unflatten(params), cfg)
    dx, grads = _moe.moe_backward(upstream["y"], cache)
    aux = np.array(_moe.stats_of(cache)["balance_loss"], dtype=x.dtype)
    return {"y": y, "aux_loss": aux, "router_logits": x @ params["gate.weight"].T}, {"x": dx, **flatten(grads)}


# --- Mamba ------------------------------------------------------------------------------------------


def _case_selective_scan(rng):
    Bt, L, Dm, N = 2, 12, 6, 4
    dtl = _normal(rng, (Bt, L, Dm), 0.5, -1.0)
    inputs = {"x": _normal(rng, (Bt, L, Dm)), "dt": np.log1p(np.exp(dtl)),
              "A": -np.exp(_normal(rng, (Dm, N), 0.5)), "B": _normal(rng, (Bt, L, N)),
              "C": _normal(rng, (Bt, L, N)), "D": _normal(rng, Dm)}
    return inputs, {}, {"y": _normal(rng, (Bt, L, Dm))}


def selective_scan(inputs, params, upstream, config):
    from minillm.kernels import scan

    args = [inputs[k] for k in ("x", "dt", "A", "B", "C", "D")]
    y, cache = scan.forward(*args)
    grads = scan.backward(upstream["y"], cache)
    return {"y": y}, dict(zip(("x", "dt", "A", "B", "C", "D"), grads))


def _case_mamba_block(rng):
    cfg = _config("mamba_block")
    mixer = flatten(mamba.init_mixer({**cfg, "dt_min": 0.01, "dt_max": 1.0}, rng, np.float64))
    p = {"norm.weight": np.ones(cfg["d_model"]), **{"mixer." + k: v for k, v in mixer.items()}}
    p = {k: v + _normal(rng, v.shape, 0.1) for k, v in p.items()}    # no parameter at a special value
    x = _normal(rng, (2, 7, cfg["d_model"]))
    return {"x": x}, p, {"y": _normal(rng, x.shape)}


def mamba_block(inputs, params, upstream, config):
    x, p = inputs["x"], unflatten(params)
    h, c_norm = ops.rmsnorm_forward(x, p["norm"]["weight"], config["norm_eps"])
    m, c_mix = mamba.mixer_forward(h, p["mixer"], config)
    dh, g_mix = mamba.mixer_backward(upstream["y"], c_mix)
    dx, dw = ops.rmsnorm_backward(dh, c_norm)
    return {"y": x + m}, {"x": dx + upstream["y"], "norm.weight": dw, **flatten({"mixer": g_mix})}


# --- RWKV -------------------------------------------------------------------------------------------


def _case_wkv(rng):
    B, T, C = 2, 9, 6
    inputs = {"time_decay": _normal(rng, C, 0.5), "time_first": _normal(rng, C, 0.5),
              "key": _normal(rng, (B, T, C), 3.0), "value": _normal(rng, (B, T, C))}
    return inputs, {}, {"y": _normal(rng, (B, T, C))}


def wkv(inputs, params, upstream, config):
    from minillm.kernels import wkv as kernels

    w = -np.exp(inputs["time_decay"])
    y, cache = kernels.forward(inputs["key"], inputs["value"], w, inputs["time_first"])
    dk, dv, dw, du = kernels.backward(upstream["y"], cache)
    return {"y": y}, {"key": dk, "value": dv, "time_decay": dw * w, "time_first": du}


def _case_rwkv_block(rng):
    cfg = _config("rwkv_block")
    full = rwkv.init({**cfg, "vocab_size": 3, "n_layer": 1, "dtype": "float64"}, rng)
    p = flatten(full["rwkv"]["blocks"]["0"])
    p = {k: v + _normal(rng, v.shape, 0.1) for k, v in p.items()}
    x = _normal(rng, (2, 6, cfg["d_model"]))
    return {"x": x}, p, {"y": _normal(rng, x.shape)}


def rwkv_block(inputs, params, upstream, config):
    y, cache = rwkv.block_forward(inputs["x"], unflatten(params), config)
    dx, grads = rwkv.block_backward(upstream["y"], cache)
    return {"y": y}, {"x": dx, **flatten(grads)}


# --- BitLinear ------------------------------------------------------------------------------------


def _case_bitlinear_weights(rng, O=12, I=40):
    """x, w whose quantised values are >= 1e-3 away from every rounding boundary (so any float32 or
    float64 implementation rounds them the same way)."""
    while True:
        x, w = _normal(rng, (2, 3, I)), _normal(rng, (O, I), 0.05)
        for cast in (np.float64, np.float32):
            xc, wc = x.astype(cast).astype(np.float64), w.astype(cast).astype(np.float64)
            a = 127.0 / np.abs(xc).max(axis=-1, keepdims=True)
            ok = _away_from_half(xc * a) and _away_from_half(wc / np.abs(wc).mean())
            if not ok:
                break
        else:
            return x, w


def _case_bitlinear(rng):
    x, w = _case_bitlinear_weights(rng)
    return {"x": x}, {"weight": w, "bias": _normal(rng, w.shape[0])}, {"y": _normal(rng, x.shape[:-1] + (12,))}


def bitlinear(inputs, params, upstream, config):
    y, cache = ternary.bitlinear_forward(inputs["x"], params["weight"], params["bias"], layout="out_in")
    dx, dw, db = ternary.bitlinear_backward(upstream["y"], cache)
    return {"y": y}, {"x": dx, "weight": dw, "bias": db}


def _case_ternary_pack(rng):
    return {"weight": _case_bitlinear_weights(rng)[1]}, {}, {}


def ternary_pack(inputs, params, upstream, config):
    packed, scale, _ = ternary.pack_weight(inputs["weight"], layout="out_in")
    return {"packed": packed, "scale": scale}, {}
