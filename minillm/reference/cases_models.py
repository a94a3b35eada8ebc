"""Golden cases for the model-family components: Mixture of Experts, Mamba (selective scan, block),
RWKV (WKV, block) and BitNet (BitLinear, ternary packing), and their registry entries
MODEL_COMPONENTS (config, tolerances, peer, math). Same conventions as cases.py, which merges these
entries into the registry COMPONENTS and re-exports these functions, so `--impl minillm.reference.cases`
covers them too. The shared helpers are in common.py: this module imports no other case module (the
samplers read their configs from MODEL_COMPONENTS, defined at the bottom, when called).
"""

import numpy as np

from minillm.models import mamba, rwkv
from minillm.nn import ops, ternary
from minillm.nn import moe as _moe
from minillm.reference.common import entry, normal
from minillm.tree import flatten, unflatten


def _away_from_half(values, margin=1e-3):
    """True when no value lies within `margin` of a rounding boundary k + 1/2."""
    frac = np.abs(values - np.floor(values) - 0.5)
    return bool(frac.min() > margin)


def _config(name):
    """The config of component `name` (MODEL_COMPONENTS is defined below; read when a sampler runs)."""
    return MODEL_COMPONENTS[name]["config"]


# --- Mixture of Experts -----------------------------------------------------------------------------


def _case_moe(rng):
    cfg = _config("moe")
    while True:   # routing at least 1e-3 (in router logits) away from any tie, also in float32
        p = flatten(_moe.init_ffn({**cfg, "n_layer": 1}, rng, np.float64))
        for k in p:
            p[k] *= 40.0 if k == "gate.weight" else 25.0
        x = normal(rng, (2, 8, cfg["d_model"]))   # 16 tokens: HF's float32 token fractions f_i are exact
        logits = np.sort(x.reshape(-1, x.shape[-1]) @ p["gate.weight"].T, axis=1)
        if np.diff(logits, axis=1).min() > 1e-3:
            return {"x": x}, p, {"y": normal(rng, x.shape), "aux_loss": np.array(0.1)}


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
    dtl = normal(rng, (Bt, L, Dm), 0.5, -1.0)
    inputs = {"x": normal(rng, (Bt, L, Dm)), "dt": np.log1p(np.exp(dtl)),
              "A": -np.exp(normal(rng, (Dm, N), 0.5)), "B": normal(rng, (Bt, L, N)),
              "C": normal(rng, (Bt, L, N)), "D": normal(rng, Dm)}
    return inputs, {}, {"y": normal(rng, (Bt, L, Dm))}


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
    p = {k: v + normal(rng, v.shape, 0.1) for k, v in p.items()}    # no parameter at a special value
    x = normal(rng, (2, 7, cfg["d_model"]))
    return {"x": x}, p, {"y": normal(rng, x.shape)}


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
    inputs = {"time_decay": normal(rng, C, 0.5), "time_first": normal(rng, C, 0.5),
              "key": normal(rng, (B, T, C), 3.0), "value": normal(rng, (B, T, C))}
    return inputs, {}, {"y": normal(rng, (B, T, C))}


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
    p = {k: v + normal(rng, v.shape, 0.1) for k, v in p.items()}
    x = normal(rng, (2, 6, cfg["d_model"]))
    return {"x": x}, p, {"y": normal(rng, x.shape)}


def rwkv_block(inputs, params, upstream, config):
    y, cache = rwkv.block_forward(inputs["x"], unflatten(params), config)
    dx, grads = rwkv.block_backward(upstream["y"], cache)
    return {"y": y}, {"x": dx, **flatten(grads)}


# --- BitLinear ------------------------------------------------------------------------------------


def _case_bitlinear_weights(rng, O=12, I=40):
    """x, w whose quantised values are >= 1e-3 away from every rounding boundary (so any float32 or
    float64 implementation rounds them the same way)."""
    while True:
        x, w = normal(rng, (2, 3, I)), normal(rng, (O, I), 0.05)
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
    return {"x": x}, {"weight": w, "bias": normal(rng, w.shape[0])}, {"y": normal(rng, x.shape[:-1] + (12,))}


def bitlinear(inputs, params, upstream, config):
    y, cache = ternary.bitlinear_forward(inputs["x"], params["weight"], params["bias"], layout="out_in")
    dx, dw, db = ternary.bitlinear_backward(upstream["y"], cache)
    return {"y": y}, {"x": dx, "weight": dw, "bias": db}


def _case_ternary_pack(rng):
    return {"weight": _case_bitlinear_weights(rng)[1]}, {}, {}


def ternary_pack(inputs, params, upstream, config):
    packed, scale, _ = ternary.pack_weight(inputs["weight"], layout="out_in")
    return {"packed": packed, "scale": scale}, {}


# --- the registry entries of these components (cases.py puts them into COMPONENTS, in manifest order) ---

MODEL_COMPONENTS = {}


def _add(name, fn, sample, config, matches, math, float32=False):
    MODEL_COMPONENTS[name] = entry(fn, sample, config, matches, math, float32)


_add("moe", moe, _case_moe, {"d_model": 12, "d_ff": 10, "n_experts": 4, "top_k": 2},
     "transformers MixtralSparseMoeBlock + load_balancing_loss_func (one layer)",
     "router_logits = x gate^T; p = softmax(router_logits); top_k experts per token (inputs are away "
     "from ties); weights = top-k p renormalised to sum 1; y = sum_k weight_k E_k(x), "
     "E(x) = w2 (silu(w1 x) * w3 x) (nn.Linear (out, in) weights); aux_loss = n_experts * sum_i f_i P_i, "
     "f_i = fraction of the N tokens with i among their top k (sum_i f_i = k), P_i = mean_n p[n, i] "
     "(no coefficient: its upstream gradient plays that role); router_logits: (..., n_experts). grads "
     "include the aux_loss path. HF 5 "
     "fuses experts: gate_up_proj[e] = [w1; w3], down_proj[e] = w2; HF's router softmax runs in float32.",
     float32=True)
_add("selective_scan", selective_scan, _case_selective_scan, {},
     "the scan of transformers MambaMixer.slow_forward (mamba_ssm selective_scan_ref, delta_softplus=False, "
     "no z)",
     "x, dt: (B, L, D), A: (D, N), B, C: (B, L, N), D: (D,); h_0 = 0; "
     "h_t = exp(dt_t A) * h_{t-1} + dt_t B_t x_t; y_t = C_t . h_t + D x_t. dt is used as given "
     "(no softplus, no bias).", float32=True)
_add("mamba_block", mamba_block, _case_mamba_block,
     {"d_model": 8, "d_state": 4, "d_conv": 4, "expand": 2, "dt_rank": 2, "norm_eps": 1e-5},
     "transformers MambaBlock (use_bias=False, use_conv_bias=True, residual_in_fp32=False, slow path)",
     "y = x + mixer(rmsnorm(x)); mixer: x, z = split(in_proj x); x = silu(causal depthwise conv1d(x) + bias) "
     "(left zero padding d_conv - 1); dt, B, C = split(x_proj x); dt = softplus(dt_proj dt + bias) "
     "(identity above 20); A = -exp(A_log); selective scan with D; out_proj(y * silu(z)).")
_add("wkv", wkv, _case_wkv, {},
     "transformers rwkv_linear_attention_cpu (RWKV-4 WKV)",
     "w = -exp(time_decay), u = time_first; y_t = (sum_{i<t} e^{(t-1-i) w + k_i} v_i + e^{u + k_t} v_t) / "
     "(sum_{i<t} e^{(t-1-i) w + k_i} + e^{u + k_t}) per channel; key, value, y: (B, T, C).", float32=True)
_add("rwkv_block", rwkv_block, _case_rwkv_block,
     {"d_model": 8, "intermediate_size": 16, "layer_norm_epsilon": 1e-5},
     "transformers RwkvBlock(layer_id=0) with rescale_every=0 (pre_ln present)",
     "x = pre_ln(x); x = x + time_mix(ln1(x)); y = x + channel_mix(ln2(x)). Token shift s_t = x_{t-1}, "
     "s_0 = 0; mix = x m + s (1 - m). time_mix: output(sigmoid(receptance(x_r)) * WKV(key(x_k), "
     "value(x_v))); channel_mix: sigmoid(receptance(x_r)) * value(relu(key(x_k))^2); nn.Linear weights.")
_add("bitlinear", bitlinear, _case_bitlinear, {},
     "transformers AutoBitLinear(online_quant=True) (BitNet b1.58; STE backward)",
     "s = max(mean |W|, 1e-5), W_q = clip(round(W / s), -1, 1); a = 127 / max(max_j |x_j|, 1e-5) per "
     "token, x_q = clip(round(x a), -128, 127); y = (x_q / a) (s W_q)^T + bias; round half to even. "
     "Straight-through backward: dx = dy (s W_q), dW = dy^T (x_q / a), dbias = sum dy.", float32=True)
_add("ternary_pack", ternary_pack, _case_ternary_pack, {},
     "transformers integrations.bitnet.pack_weights (on W_q) with weight_scale = s (AutoBitLinear's "
     "direction; BitLinear stores 1 / s)",
     "W (O, I) -> W_q as in bitlinear; packed (ceil(O / 4), I) uint8, packed[r, i] = "
     "sum_j (W_q[j R + r, i] + 1) << 2 j, R = ceil(O / 4); scale: (1,) = s.")
