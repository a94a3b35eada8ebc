"""RWKV-4 (Peng et al. 2023) with hand-written backprop, keyed like HF `RwkvForCausalLM`.

    params = {"rwkv": {
        "embeddings": {"weight": (V, C)},
        "blocks": {"0": {"pre_ln": {"weight", "bias"},           # block 0 only (ln0)
                         "ln1": {...}, "ln2": {...},
                         "attention": {"time_decay": (C,), "time_first": (C,),
                                       "time_mix_key" / "time_mix_value" / "time_mix_receptance": (1, 1, C),
                                       "key" / "value" / "receptance" / "output": {"weight": (C, C)}},
                         "feed_forward": {"time_mix_key" / "time_mix_receptance": (1, 1, C),
                                          "key": {"weight": (F, C)}, "receptance": {"weight": (C, C)},
                                          "value": {"weight": (C, F)}}},
                   "1": ...},
        "ln_out": {"weight", "bias"}},
     "head": {"weight": (V, C)}}                                   # not tied (as HF)

Block: x = ln0(x) (block 0); x = x + time_mix(ln1(x)); x = x + channel_mix(ln2(x)).
Token shift: s_t = x_{t-1} (zero before the first token), mixed as x m + s (1 - m).
Time mixing: k, v, r = key(x_k), value(x_v), sigmoid(receptance(x_r)); output(r * WKV(k, v)) with
w = -exp(time_decay), u = time_first (kernels/wkv.py). Channel mixing:
sigmoid(receptance(x_r)) * value(relu(key(x_k))^2). No rescaling of activations: this is HF with
rescale_every=0 (HF's default halves the hidden state every 6 layers at inference only).
Linear layers go through dense.dense_forward (layout "out_in"); the embedding and head do not.
"""

import math

import numpy as np

from minillm.nn import dense, ops
from minillm.models import check_token_ids, param_dtype
from minillm import kernels
from minillm.kernels import wkv as wkv_kernels

# F = intermediate_size (None: 4 d_model); eps of the block LayerNorms (ln_out always uses 1e-5, as HF).
# --- what the rest of minillm needs to know about this architecture -------------------------------
HF_CLASS = "RwkvForCausalLM"
OPTIONS = ()
LORA_TARGETS = ("attention.key", "attention.value", "attention.receptance", "attention.output")
NO_DECAY = ("embeddings",)
BOUNDED_POSITIONS = False                   # a recurrent state: any length

DEFAULTS = {"intermediate_size": None, "layer_norm_epsilon": 1e-5}


HF_MODEL_TYPES = ("rwkv",)


def to_hf_config(config):
    """minillm config -> RwkvConfig keys; rescale_every 0: minillm never rescales (see the docstring)."""
    C = config["d_model"]
    return {"model_type": "rwkv", "architectures": [HF_CLASS], "vocab_size": config["vocab_size"],
            "context_length": config["context"], "hidden_size": C, "num_hidden_layers": config["n_layer"],
            "attention_hidden_size": C, "intermediate_size": _ffn_size(config),
            "layer_norm_epsilon": _eps(config), "rescale_every": 0, "tie_word_embeddings": False}


def from_hf_config(hf):
    """RwkvConfig keys (an HFReader) -> minillm config. rescale_every > 0 (HF's default 6) is refused: HF then
    halves the activations and the output weights every that many layers at inference, which is not
    exactly the model minillm runs (LayerNorm's eps sees the smaller values)."""
    C = hf.need("hidden_size")
    hf.only("attention_hidden_size", C, C, None)
    hf.only("rescale_every", 6, 0)
    hf.only("tie_word_embeddings", False, False)
    F = hf.get("intermediate_size")
    return {"arch": "rwkv", "vocab_size": hf.need("vocab_size"), "context": hf.get("context_length", 1024),
            "n_layer": hf.need("num_hidden_layers"), "d_model": C,
            "intermediate_size": None if F in (None, 4 * C) else F,
            "layer_norm_epsilon": float(hf.get("layer_norm_epsilon", 1e-5))}


def _ffn_size(config):
    return int(config.get("intermediate_size") or 4 * int(config["d_model"]))


def _eps(config):
    return float(config.get("layer_norm_epsilon", DEFAULTS["layer_norm_epsilon"]))


# --- token shift and mixing -------------------------------------------------------------------------


def _shift(x, prev):
    """x: (B, T, C) -> s: (B, T, C) with s[:, t] = x[:, t-1], s[:, 0] = prev (B, C) or 0."""
    xp = ops.array_module(x)
    s = xp.empty_like(x)
    s[:, 1:] = x[:, :-1]
    s[:, 0] = 0 if prev is None else prev
    return s


def _mix_backward(d, x, s, m):
    """Gradients of x m + s (1 - m) -> (dx, ds, dm: (1, 1, C))."""
    return d * m, d * (1 - m), (d * (x - s)).sum(axis=(0, 1), keepdims=True)


def _unshift(dx, ds):
    """Adds the gradient of the shifted copy back onto x (s[:, t] = x[:, t-1])."""
    dx[:, :-1] += ds[:, 1:]
    return dx


def _dense(x, p, config):
    return dense.dense_forward(x, p, dense.mode(config, "out_in"))


# --- time mixing (attention) ------------------------------------------------------------------------


def time_mix_forward(x, p, config, prev=None, state=None):
    """x: (B, T, C) -> y: (B, T, C). Returns (y, cache).

    prev: the last token of the previous segment (B, C) for the token shift, state: the WKV state
    (num, den, max) to start from; both None for training. The final WKV state is cache["state_out"]."""
    s = _shift(x, prev)
    xk, xv, xr = (x * p[m] + s * (1 - p[m]) for m in ("time_mix_key", "time_mix_value",
                                                      "time_mix_receptance"))
    k, ck = _dense(xk, p["key"], config)
    v, cv = _dense(xv, p["value"], config)
    rl, cr = _dense(xr, p["receptance"], config)
    r, cs = ops.sigmoid_forward(rl)
    xp = ops.array_module(x)
    w = -xp.exp(p["time_decay"])
    y, cw = kernels.pick("wkv", "forward", k)(k, v, w, p["time_first"], state=state)
    out, co = _dense(r * y, p["output"], config)
    cache = dict(x=x, s=s, p=p, ck=ck, cv=cv, cr=cr, cs=cs, r=r, y=y, w=w, cw=cw, co=co,
                 state_out=cw["state_out"])
    return out, cache


def time_mix_backward(dout, cache):
    """dout: (B, T, C) -> (dx: (B, T, C), grads keyed like p)."""
    c, p = cache, cache["p"]
    g = {}
    dry, g["output"] = dense.dense_backward(dout, c["co"])
    dr, dy = dry * c["y"], dry * c["r"]
    dk, dv, dw, g["time_first"] = kernels.pick("wkv", "backward", dy)(dy, c["cw"])
    g["time_decay"] = dw * c["w"]  # w = -exp(time_decay): dw/dtime_decay = w
    dxr, g["receptance"] = dense.dense_backward(ops.sigmoid_backward(dr, c["cs"]), c["cr"])
    dxv, g["value"] = dense.dense_backward(dv, c["cv"])
    dxk, g["key"] = dense.dense_backward(dk, c["ck"])
    dx, ds = 0, 0
    for name, d in (("time_mix_key", dxk), ("time_mix_value", dxv), ("time_mix_receptance", dxr)):
        a, b, g[name] = _mix_backward(d, c["x"], c["s"], p[name])
        dx, ds = dx + a, ds + b
    return _unshift(dx, ds), {name: g[name] for name in p}


# --- channel mixing (feed-forward) ------------------------------------------------------------------


def channel_mix_forward(x, p, config, prev=None):
    """x: (B, T, C) -> y: (B, T, C); prev as in time_mix_forward. Returns (y, cache)."""
    s = _shift(x, prev)
    xk = x * p["time_mix_key"] + s * (1 - p["time_mix_key"])
    xr = x * p["time_mix_receptance"] + s * (1 - p["time_mix_receptance"])
    kl, ck = _dense(xk, p["key"], config)
    k, cq = ops.relu_squared_forward(kl)
    kv, cv = _dense(k, p["value"], config)
    rl, cr = _dense(xr, p["receptance"], config)
    r, cs = ops.sigmoid_forward(rl)
    return r * kv, dict(x=x, s=s, p=p, ck=ck, cq=cq, cv=cv, cr=cr, cs=cs, r=r, kv=kv)


def channel_mix_backward(dout, cache):
    """dout: (B, T, C) -> (dx: (B, T, C), grads keyed like p)."""
    c, p = cache, cache["p"]
    g = {}
    dk, g["value"] = dense.dense_backward(dout * c["r"], c["cv"])
    dxk, g["key"] = dense.dense_backward(ops.relu_squared_backward(dk, c["cq"]), c["ck"])
    dxr, g["receptance"] = dense.dense_backward(ops.sigmoid_backward(dout * c["kv"], c["cs"]), c["cr"])
    dx1, ds1, g["time_mix_key"] = _mix_backward(dxk, c["x"], c["s"], p["time_mix_key"])
    dx2, ds2, g["time_mix_receptance"] = _mix_backward(dxr, c["x"], c["s"], p["time_mix_receptance"])
    return _unshift(dx1 + dx2, ds1 + ds2), {name: g[name] for name in p}


# --- block ------------------------------------------------------------------------------------------


def block_forward(x, p, config, state=None):
    """x: (B, T, C) -> y: (B, T, C). Returns (y, cache). state: this layer's generation state
    {"att_x", "num", "den", "max", "ffn_x"} (each (B, C)) or None; the new one is cache["state_out"]."""
    eps, st = _eps(config), state or {}
    c = {"pre_ln": None}
    if "pre_ln" in p:
        x, c["pre_ln"] = ops.layernorm_forward(x, p["pre_ln"]["weight"], p["pre_ln"]["bias"], eps)
    h, c["ln1"] = ops.layernorm_forward(x, p["ln1"]["weight"], p["ln1"]["bias"], eps)
    wkv_state = (st["num"], st["den"], st["max"]) if state is not None else None
    a, c["attention"] = time_mix_forward(h, p["attention"], config, st.get("att_x"), wkv_state)
    x = x + a
    h2, c["ln2"] = ops.layernorm_forward(x, p["ln2"]["weight"], p["ln2"]["bias"], eps)
    f, c["feed_forward"] = channel_mix_forward(h2, p["feed_forward"], config, st.get("ffn_x"))
    num, den, mx = c["attention"]["state_out"]
    c["state_out"] = {"att_x": h[:, -1], "num": num, "den": den, "max": mx, "ffn_x": h2[:, -1]}
    return x + f, c


def block_backward(dy, cache):
    """dy: (B, T, C) -> (dx: (B, T, C), grads keyed like p)."""
    g = {}
    dh2, g["feed_forward"] = channel_mix_backward(dy, cache["feed_forward"])
    dx2, g2w, g2b = ops.layernorm_backward(dh2, cache["ln2"])
    dx = dy + dx2
    dh, g["attention"] = time_mix_backward(dx, cache["attention"])
    dx1, g1w, g1b = ops.layernorm_backward(dh, cache["ln1"])
    dx = dx + dx1
    g["ln1"], g["ln2"] = {"weight": g1w, "bias": g1b}, {"weight": g2w, "bias": g2b}
    out = {}
    if cache["pre_ln"] is not None:
        dx, w0, b0 = ops.layernorm_backward(dx, cache["pre_ln"])
        out["pre_ln"] = {"weight": w0, "bias": b0}
    out.update((k, g[k]) for k in ("ln1", "ln2", "attention", "feed_forward"))
    return dx, out


# --- model ------------------------------------------------------------------------------------------


def _orthogonal(rng, shape, gain, dtype):
    """A (rows, cols) matrix with orthonormal rows or columns, times gain (torch.nn.init.orthogonal_)."""
    rows, cols = shape
    a = rng.standard_normal((max(rows, cols), min(rows, cols)))
    q, r = np.linalg.qr(a)
    q = q * np.sign(np.diag(r))
    q = q if rows >= cols else q.T
    return (gain * q).astype(dtype)


def init(config, rng):
    """-> params (nested dict, config["dtype"], default float32), initialised as HF RwkvPreTrainedModel:
    orthogonal linears with gain sqrt(out / in) when out > in (0.5 more for the head), a tiny
    orthogonal embedding, per-layer time_decay / time_mix ramps."""
    V, C, L, F = int(config["vocab_size"]), int(config["d_model"]), int(config["n_layer"]), _ffn_size(config)
    dtype = param_dtype(config)
    if L < 1 or C < 2:
        raise ValueError(f"rwkv needs n_layer >= 1 and d_model >= 2, got {L} and {C}")

    def linear(out, inp, scale=1.0):
        return {"weight": _orthogonal(rng, (out, inp), scale * math.sqrt(max(out / inp, 1.0)), dtype)}

    def ln():
        return {"weight": np.ones(C, dtype), "bias": np.zeros(C, dtype)}

    ramp = (np.arange(C) / C)[None, None, :]  # (1, 1, C): 0 .. (C-1)/C
    h = np.arange(C)
    emb = _orthogonal(rng, (V, C), 1e-4 * math.sqrt(max(V, C)), dtype)
    blocks = {}
    for i in range(L):
        ratio_0_to_1 = i / max(L - 1, 1)
        ratio_1_to_0 = 1.0 - i / L
        blk = {"pre_ln": ln()} if i == 0 else {}
        blk["ln1"], blk["ln2"] = ln(), ln()
        decay = -5 + 8 * (h / (C - 1)) ** (0.7 + 1.3 * ratio_0_to_1)
        blk["attention"] = {
            "time_decay": decay.astype(dtype),
            # RWKV-LM starts time_first at log(0.3) + zigzag; HF's init (the peer) ends up with ones
            "time_first": np.ones(C, dtype),
            "time_mix_key": (ramp ** ratio_1_to_0).astype(dtype),
            "time_mix_value": (ramp ** ratio_1_to_0 + 0.3 * ratio_0_to_1).astype(dtype),
            "time_mix_receptance": (ramp ** (0.5 * ratio_1_to_0)).astype(dtype),
            "key": linear(C, C), "value": linear(C, C), "receptance": linear(C, C), "output": linear(C, C),
        }
        blk["feed_forward"] = {
            "time_mix_key": (ramp ** ratio_1_to_0).astype(dtype),
            "time_mix_receptance": (ramp ** ratio_1_to_0).astype(dtype),
            "key": linear(F, C), "receptance": linear(C, C), "value": linear(C, F),
        }
        blocks[str(i)] = blk
    return {"rwkv": {"embeddings": {"weight": emb}, "blocks": blocks, "ln_out": ln()},
            "head": linear(V, C, 0.5)}


def _run(params, idx, config, state):
    """Embedding -> blocks -> ln_out -> head; state None (training) or the generation state."""
    tr = params["rwkv"]
    x, c_emb = ops.embedding_forward(idx, tr["embeddings"]["weight"])
    block_caches, new_state = [], {key: [] for key in STATE_KEYS}
    for i in range(int(config["n_layer"])):
        layer_state = {key: state[key][i] for key in STATE_KEYS} if state is not None else None
        x, c = block_forward(x, tr["blocks"][str(i)], config, layer_state)
        block_caches.append(c)
        for key in STATE_KEYS:
            new_state[key].append(c["state_out"][key])
    x, c_ln = ops.layernorm_forward(x, tr["ln_out"]["weight"], tr["ln_out"]["bias"], 1e-5)
    W = params["head"]["weight"]
    logits, c_head = ops.linear_forward(x, W.T)
    return logits, (c_emb, block_caches, c_ln, c_head), new_state


def forward(params, idx, config):
    """idx: (B, T) int -> logits: (B, T, V). Returns (logits, cache). T is not limited by the context
    (RWKV is recurrent); the trainer still feeds context-long windows."""
    idx = check_token_ids(idx, config)
    if idx.ndim != 2 or idx.shape[1] < 1:
        raise ValueError(f"idx must be (B, T) with T >= 1, got shape {idx.shape}")
    logits, caches, _ = _run(params, idx, config, None)
    return logits, caches


def backward(dlogits, cache):
    """dlogits: (B, T, V) -> grads keyed like params."""
    c_emb, block_caches, c_ln, c_head = cache
    dx, dW, _ = ops.linear_backward(dlogits, c_head)
    dx, dlw, dlb = ops.layernorm_backward(dx, c_ln)
    blocks = {}
    for i in reversed(range(len(block_caches))):
        dx, blocks[str(i)] = block_backward(dx, block_caches[i])
    blocks = {str(i): blocks[str(i)] for i in range(len(block_caches))}
    demb = ops.embedding_backward(dx, c_emb)
    return {"rwkv": {"embeddings": {"weight": demb}, "blocks": blocks,
                     "ln_out": {"weight": dlw, "bias": dlb}},
            "head": {"weight": dW.T}}


# --- generation: O(1) state per token ---------------------------------------------------------------

# per layer: token-shift inputs of time and channel mixing, and the WKV state (num, den, max)
STATE_KEYS = ("att_x", "num", "den", "max", "ffn_x")


def init_state(params, config, batch):
    """-> state for `step`: {"config", "pos", and for each STATE_KEYS entry (n_layer, B, C) arrays}.
    Shift inputs and num, den start at 0, the WKV max at -1e38 (so the empty state weighs nothing)."""
    W = params["rwkv"]["embeddings"]["weight"]
    xp = ops.array_module(W)
    shape = (int(config["n_layer"]), int(batch), W.shape[1])
    state = {key: xp.zeros(shape, W.dtype) for key in STATE_KEYS}
    state["max"] = xp.full(shape, -wkv_kernels.BIG, W.dtype)
    return {"config": config, "pos": 0, **state}


def _advance(params, idx, state):
    config = state["config"]
    logits, _, new = _run(params, idx, config, state)
    xp = ops.array_module(logits)
    out = {"config": config, "pos": state["pos"] + idx.shape[1]}
    out.update((key, xp.stack(new[key])) for key in STATE_KEYS)
    return logits, out


def step(params, tokens, state):
    """tokens: (B,) int, the next token of each row -> (logits: (B, V), new state). O(1) in the
    position: equals the last row of `forward` on the whole prefix."""
    tokens = check_token_ids(tokens, state["config"], "tokens")
    if tokens.ndim != 1 or tokens.shape[0] != state["num"].shape[1]:
        raise ValueError(f"tokens must be ({state['num'].shape[1]},), got shape {tokens.shape}")
    logits, state = _advance(params, tokens[:, None], state)
    return logits[:, 0], state


def prefill(params, idx, state):
    """idx: (B, T) int -> (logits: (B, T, V), state after the T tokens): `step` T times in one pass."""
    idx = check_token_ids(idx, state["config"])
    if idx.ndim != 2 or idx.shape[0] != state["num"].shape[1]:
        raise ValueError(f"idx must be ({state['num'].shape[1]}, T), got shape {idx.shape}")
    return _advance(params, idx, state)
