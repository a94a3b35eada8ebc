"""Mamba-1 language model (Gu & Dao 2023) with the math and parameter names of HF `MambaForCausalLM`.

    embeddings -> n_layer x [h + mixer(rmsnorm(h))] -> rmsnorm (norm_f) -> tied head (logits = h E^T)

Mixer (HF `MambaMixer`, slow path), x: (B, T, d_model), Di = expand * d_model:

    x, z  = split(in_proj(x))                      (B, T, Di) each
    x     = silu(causal_depthwise_conv1d(x))       kernel d_conv, left-padded with zeros, bias
    dt, B, C = split(x_proj(x))                    (B, T, R), (B, T, N), (B, T, N)
    dt    = softplus(dt_proj(dt))                  dt_proj has the bias (added before softplus)
    y     = selective_scan(x, dt, A = -exp(A_log), B, C, D)      (kernels/scan.py)
    out   = out_proj(y * silu(z))

Parameter names (nested dicts; flattened with dots they equal HF's state-dict names):
    backbone.embeddings.weight (V, d); backbone.layers.{i}.norm.weight (d,);
    backbone.layers.{i}.mixer.{in_proj (2Di, d), x_proj (R + 2N, Di), dt_proj (Di, R) + bias (Di,),
    out_proj (d, Di)}.weight (nn.Linear layout: out, in); mixer.conv1d.weight (Di, 1, K), .bias (Di,);
    mixer.A_log (Di, N), mixer.D (Di,); backbone.norm_f.weight (d,). No lm_head: it is tied to the embeddings.
Linear layers have no bias (use_bias=False, as released checkpoints); the conv has one (use_conv_bias).
"""

import math

import numpy as np

from minillm.nn import ops
from minillm import kernels
from minillm.nn import dense
from minillm.nn.dense import dense_backward, dense_forward
from minillm.models import check_token_ids, tied_head

# --- what the rest of minillm needs to know about this architecture -------------------------------
HF_CLASS = "MambaForCausalLM"
OPTIONS = ("d_state", "d_conv", "expand")      # config keys beyond the shared ones that a user may set
LORA_TARGETS = ("mixer.in_proj", "mixer.out_proj")
NO_DECAY = ("embeddings", "A_log")  # A_log: mamba_ssm marks it _no_weight_decay
BOUNDED_POSITIONS = False                   # a recurrent state: any length

DEFAULTS = {
    "d_state": 16,          # N, state size per channel
    "d_conv": 4,            # K, causal conv kernel
    "expand": 2,            # Di = expand * d_model
    "dt_rank": "auto",      # R; "auto" = ceil(d_model / 16)
    "dt_min": 0.001,        # dt at init is log-uniform in [dt_min, dt_max] (through the dt_proj bias)
    "dt_max": 0.1,
    "norm_eps": 1e-5,       # HF layer_norm_epsilon
    "initializer_range": 0.1,  # HF MambaConfig default: std of embeddings, in_proj and x_proj at init
}


# --- Hugging Face config.json (MambaConfig). HF has no sequence length key: `context` (the training
# length) stays in minillm's own section, and a directory written by HF gets HF_CONTEXT.
HF_MODEL_TYPES = ("mamba",)
HF_CONTEXT = 1024


def to_hf_config(config):
    """minillm config -> MambaConfig keys: no linear biases, a conv bias, the residual in the model's dtype."""
    d, Di, N, K, R = dims(config)
    return {"model_type": "mamba", "architectures": [HF_CLASS], "vocab_size": config["vocab_size"],
            "hidden_size": d, "num_hidden_layers": config["n_layer"], "state_size": N, "conv_kernel": K,
            "expand": int(_cfg(config, "expand")), "intermediate_size": Di, "time_step_rank": R,
            "layer_norm_epsilon": _cfg(config, "norm_eps"), "use_bias": False, "use_conv_bias": True,
            "hidden_act": "silu", "residual_in_fp32": False, "tie_word_embeddings": True,
            "initializer_range": _cfg(config, "initializer_range"), "time_step_min": _cfg(config, "dt_min"),
            "time_step_max": _cfg(config, "dt_max")}


def from_hf_config(hf):
    """MambaConfig keys (an HFReader) -> minillm config; biases on the linears, no conv bias, another
    activation or an untied head are refused. residual_in_fp32 is accepted: it only keeps the residual in
    float32, which minillm's float32 (and float64) computation does anyway."""
    d = hf.need("hidden_size")
    hf.only("use_bias", False, False)
    hf.only("use_conv_bias", True, True)
    hf.only("hidden_act", "silu", "silu")
    hf.only("tie_word_embeddings", True, True)
    expand = hf.get("expand", 2)
    hf.only("intermediate_size", expand * d, expand * d)
    rank = hf.get("time_step_rank", "auto")
    config = {"arch": "mamba", "vocab_size": hf.need("vocab_size"), "context": HF_CONTEXT,
              "n_layer": hf.need("num_hidden_layers"), "d_model": d, "d_state": hf.get("state_size", 16),
              "d_conv": hf.get("conv_kernel", 4), "expand": expand,
              "dt_rank": "auto" if rank in ("auto", math.ceil(d / 16)) else rank,
              "dt_min": float(hf.get("time_step_min", 0.001)), "dt_max": float(hf.get("time_step_max", 0.1)),
              "norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)),
              "initializer_range": float(hf.get("initializer_range", 0.1))}
    return config


def from_hf_weights(flat, config):
    """A stored copy of the tied head is dropped (models.tied_head)."""
    return tied_head(flat, "lm_head.weight", "backbone.embeddings.weight")


def _cfg(config, key):
    return config.get(key, DEFAULTS[key])


def dims(config):
    """-> (d_model, Di, N, K, R) from a config."""
    d = int(config["d_model"])
    rank = _cfg(config, "dt_rank")
    R = math.ceil(d / 16) if rank == "auto" else int(rank)
    Di, N, K = int(_cfg(config, "expand")) * d, int(_cfg(config, "d_state")), int(_cfg(config, "d_conv"))
    for name, v in (("d_state", N), ("d_conv", K), ("expand", Di), ("dt_rank", R)):
        if v < 1:
            raise ValueError(f"mamba: {name} must be positive, got {v}")
    return d, Di, N, K, R


# --- init -----------------------------------------------------------------------------------------------


def init_mixer(config, rng, dtype=np.float32):
    """Parameters of one MambaMixer, initialised as HF (`MambaPreTrainedModel._init_weights`)."""
    d, Di, N, K, R = dims(config)
    std = float(_cfg(config, "initializer_range"))
    dt_min, dt_max = float(_cfg(config, "dt_min")), float(_cfg(config, "dt_max"))
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"mamba: need 0 < dt_min <= dt_max, got {dt_min} and {dt_max}")
    # dt log-uniform in [dt_min, dt_max] (floored at 1e-4 as HF), stored as its inverse softplus
    dt = np.exp(rng.random(Di) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = np.maximum(dt, 1e-4)
    p = {
        "in_proj": {"weight": rng.normal(0.0, std, (2 * Di, d))},
        "conv1d": {"weight": rng.uniform(-1, 1, (Di, 1, K)) / math.sqrt(K),  # kaiming_uniform(a=sqrt 5)
                   "bias": np.zeros(Di)},
        "x_proj": {"weight": rng.normal(0.0, std, (R + 2 * N, Di))},
        "dt_proj": {"weight": rng.uniform(-1, 1, (Di, R)) / math.sqrt(R),
                    "bias": dt + np.log(-np.expm1(-dt))},
        "A_log": np.log(np.tile(np.arange(1, N + 1, dtype=np.float64), (Di, 1))),  # S4D-real: A = -(1..N)
        "D": np.ones(Di),
        "out_proj": {"weight": rng.uniform(-1, 1, (d, Di)) / math.sqrt(Di)},
    }
    return _cast(p, dtype)


def _cast(tree, dtype):
    if isinstance(tree, dict):
        return {k: _cast(v, dtype) for k, v in tree.items()}
    return np.asarray(tree, dtype=dtype)


def init(config, rng):
    """-> params (nested dict, dtype config["dtype"]) of a Mamba LM."""
    dtype = np.dtype(config.get("dtype", "float32"))
    d = dims(config)[0]
    std = float(_cfg(config, "initializer_range"))
    layers = {}
    for i in range(int(config["n_layer"])):
        layers[str(i)] = {"norm": {"weight": np.ones(d, dtype)}, "mixer": init_mixer(config, rng, dtype)}
    return {"backbone": {
        "embeddings": {"weight": rng.normal(0.0, std, (int(config["vocab_size"]), d)).astype(dtype)},
        "layers": layers,
        "norm_f": {"weight": np.ones(d, dtype)},
    }}


# --- causal depthwise conv1d ------------------------------------------------------------------------------


def causal_conv1d_forward(x, w, b):
    """x: (B, T, C), w: (C, 1, K), b: (C,) -> y: (B, T, C),
    y[t] = b + sum_k w[:, 0, k] x[t - (K - 1) + k] (zeros before the first token), as torch Conv1d with
    padding K - 1 truncated to the first T outputs."""
    xp = ops.array_module(x)
    K = w.shape[-1]
    T = x.shape[1]
    xpad = xp.concatenate([xp.zeros((x.shape[0], K - 1, x.shape[2]), x.dtype), x], axis=1)
    y = xp.broadcast_to(b, x.shape).copy()
    for k in range(K):
        y += w[:, 0, k] * xpad[:, k:k + T]
    return y, (xpad, w)


def causal_conv1d_backward(dy, cache):
    """dy: (B, T, C) -> (dx: (B, T, C), dw: (C, 1, K), db: (C,))."""
    xpad, w = cache
    xp = ops.array_module(dy)
    K = w.shape[-1]
    T = dy.shape[1]
    dxpad = xp.zeros_like(xpad)
    dw = xp.empty_like(w)
    for k in range(K):
        dxpad[:, k:k + T] += w[:, 0, k] * dy
        dw[:, 0, k] = (dy * xpad[:, k:k + T]).sum(axis=(0, 1))
    return dxpad[:, K - 1:], dw, dy.sum(axis=(0, 1))


# --- the mixer (one Mamba block without its norm and residual) --------------------------------------------


def _out_in(p):
    """(out, in) features of a dense layer: a packed ternary layer (quantize.py) keeps them in
    "weight_shape", its uint8 "weight" is (ceil(out / 4), in)."""
    if "weight_shape" in p:
        return tuple(int(v) for v in p["weight_shape"])
    return tuple(p["weight"].shape)


def mixer_forward(x, p, config):
    """x: (B, T, d_model), p: mixer params -> (out: (B, T, d_model), cache)."""
    xp = ops.array_module(x)
    linear = dense.mode(config, "out_in")
    Di, R = _out_in(p["dt_proj"])
    N = p["A_log"].shape[1]
    xz, c_in = dense_forward(x, p["in_proj"], linear)
    xs, z = xz[..., :Di], xz[..., Di:]
    xc, c_conv = causal_conv1d_forward(xs, p["conv1d"]["weight"], p["conv1d"]["bias"])
    u, c_act = ops.silu_forward(xc)
    dbc, c_xp = dense_forward(u, p["x_proj"], linear)
    dtr, Bm, Cm = dbc[..., :R], dbc[..., R:R + N], dbc[..., R + N:]
    dtl, c_dtp = dense_forward(dtr, p["dt_proj"], linear)
    dt, c_sp = ops.softplus_forward(dtl)
    A = -xp.exp(p["A_log"])
    y, c_scan = kernels.pick("scan", "forward", x)(u, dt, A, Bm, Cm, p["D"])
    y = y.astype(x.dtype, copy=False)
    gate, c_z = ops.silu_forward(z)
    out, c_out = dense_forward(y * gate, p["out_proj"], linear)
    return out, (c_in, c_conv, c_act, c_xp, c_dtp, c_sp, A, c_scan, y, gate, c_z, c_out)


def mixer_backward(dout, cache):
    """dout: (B, T, d_model) -> (dx, grads keyed like the mixer params)."""
    c_in, c_conv, c_act, c_xp, c_dtp, c_sp, A, c_scan, y, gate, c_z, c_out = cache
    xp = ops.array_module(dout)
    g = {}
    dyg, g["out_proj"] = dense_backward(dout, c_out)
    dz = ops.silu_backward(dyg * y, c_z)
    du, ddt, dA, dB, dC, g["D"] = kernels.pick("scan", "backward", dout)(dyg * gate, c_scan)
    g["A_log"] = dA * A                                    # d(-exp(A_log)) / dA_log = A
    ddtr, g["dt_proj"] = dense_backward(ops.softplus_backward(ddt, c_sp), c_dtp)
    du2, g["x_proj"] = dense_backward(xp.concatenate([ddtr, dB, dC], axis=-1).astype(dout.dtype), c_xp)
    dxc = ops.silu_backward(du + du2, c_act)
    dxs, dw, db = causal_conv1d_backward(dxc, c_conv)
    g["conv1d"] = {"weight": dw, "bias": db}
    dx, g["in_proj"] = dense_backward(xp.concatenate([dxs, dz], axis=-1), c_in)
    order = ("in_proj", "conv1d", "x_proj", "dt_proj", "A_log", "D", "out_proj")
    return dx, {k: g[k] for k in order}


# --- the language model -------------------------------------------------------------------------------------


def _check_idx(idx, config):
    if idx.ndim != 2 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"mamba: token ids must be an integer array (B, T), got {idx.dtype} {idx.shape}")
    check_token_ids(idx, config, "mamba: idx")


def forward(params, idx, config):
    """idx: (B, T) int -> (logits: (B, T, V), cache)."""
    _check_idx(idx, config)
    bb = params["backbone"]
    eps = float(_cfg(config, "norm_eps"))
    E = bb["embeddings"]["weight"]
    h, c_emb = ops.embedding_forward(idx, E)
    layer_caches = []
    for i in range(len(bb["layers"])):
        lp = bb["layers"][str(i)]
        hn, c_norm = ops.rmsnorm_forward(h, lp["norm"]["weight"], eps)
        out, c_mix = mixer_forward(hn, lp["mixer"], config)
        h = h + out
        layer_caches.append((c_norm, c_mix))
    hf, c_nf = ops.rmsnorm_forward(h, bb["norm_f"]["weight"], eps)
    logits, c_head = ops.linear_forward(hf, E.T)
    return logits, (c_emb, layer_caches, c_nf, c_head)


def backward(dlogits, cache):
    """dlogits: (B, T, V) -> grads keyed like params."""
    c_emb, layer_caches, c_nf, c_head = cache
    dhf, dET, _ = ops.linear_backward(dlogits, c_head)
    dh, dnf = ops.rmsnorm_backward(dhf, c_nf)
    layers = {}
    for i in reversed(range(len(layer_caches))):
        c_norm, c_mix = layer_caches[i]
        dhn, g_mix = mixer_backward(dh, c_mix)
        dx, dnw = ops.rmsnorm_backward(dhn, c_norm)
        dh = dh + dx
        layers[str(i)] = {"norm": {"weight": dnw}, "mixer": g_mix}
    dE = ops.embedding_backward(dh, c_emb) + dET.T
    return {"backbone": {"embeddings": {"weight": dE},
                         "layers": {str(i): layers[str(i)] for i in range(len(layer_caches))},
                         "norm_f": {"weight": dnf}}}


# --- generation: O(1) recurrent state per token -------------------------------------------------------------


def init_state(params, config, batch):
    """-> {"config", "layers": [{"conv": (B, Di, K) last K conv inputs, "ssm": (B, Di, N)}, ...]}."""
    bb = params["backbone"]
    E = bb["embeddings"]["weight"]
    xp = ops.array_module(E)
    layers = []
    for i in range(len(bb["layers"])):
        p = bb["layers"][str(i)]["mixer"]
        Di, N = p["A_log"].shape
        K = p["conv1d"]["weight"].shape[-1]
        layers.append({"conv": xp.zeros((batch, Di, K), E.dtype), "ssm": xp.zeros((batch, Di, N), E.dtype)})
    return {"config": config, "layers": layers}


def _mixer_step(x, p, config, st):
    """x: (B, d_model), st: this layer's state -> (out: (B, d_model), new state). Same math as mixer_forward."""
    xp = ops.array_module(x)
    linear = dense.mode(config, "out_in")
    Di, R = _out_in(p["dt_proj"])
    N = p["A_log"].shape[1]
    xz, _ = dense_forward(x, p["in_proj"], linear)
    xs, z = xz[:, :Di], xz[:, Di:]
    conv = xp.concatenate([st["conv"][:, :, 1:], xs[:, :, None]], axis=2)    # (B, Di, K), newest last
    xc = (conv * p["conv1d"]["weight"][:, 0, :]).sum(-1) + p["conv1d"]["bias"]
    u, _ = ops.silu_forward(xc)
    dbc, _ = dense_forward(u, p["x_proj"], linear)
    dtr, Bm, Cm = dbc[:, :R], dbc[:, R:R + N], dbc[:, R + N:]
    dt, _ = ops.softplus_forward(dense_forward(dtr, p["dt_proj"], linear)[0])
    A = -xp.exp(p["A_log"])
    h = xp.exp(dt[:, :, None] * A) * st["ssm"] + (dt * u)[:, :, None] * Bm[:, None, :]
    y = (h * Cm[:, None, :]).sum(-1) + p["D"] * u
    out, _ = dense_forward(y * ops.silu_forward(z)[0], p["out_proj"], linear)
    return out, {"conv": conv, "ssm": h.astype(st["ssm"].dtype, copy=False)}


def step(params, tokens, state):
    """tokens: (B,) int -> (logits: (B, V), new state)."""
    config = state["config"]
    tokens = tokens if hasattr(tokens, "ndim") else np.asarray(tokens)
    _check_idx(tokens.reshape(-1, 1), config)
    bb = params["backbone"]
    eps = float(_cfg(config, "norm_eps"))
    E = bb["embeddings"]["weight"]
    h = E[tokens]
    layers = []
    for i, st in enumerate(state["layers"]):
        lp = bb["layers"][str(i)]
        hn, _ = ops.rmsnorm_forward(h, lp["norm"]["weight"], eps)
        out, st = _mixer_step(hn, lp["mixer"], config, st)
        h = h + out
        layers.append(st)
    hf, _ = ops.rmsnorm_forward(h, bb["norm_f"]["weight"], eps)
    return hf @ E.T, {"config": config, "layers": layers}
