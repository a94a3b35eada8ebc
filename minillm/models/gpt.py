"""GPT-2 (Radford et al. 2019) with hand-written backprop, keyed like HF GPT2LMHeadModel.

    params = {"transformer": {
        "wte": {"weight": (V, C)}, "wpe": {"weight": (context, C)},
        "h": {"0": {"ln_1": {"weight", "bias"}, "attn": {"c_attn": {...}, "c_proj": {...}},
                    "ln_2": {"weight", "bias"}, "mlp": {"c_fc": {...}, "c_proj": {...}}}, "1": ...},
        "ln_f": {"weight": (C,), "bias": (C,)}}}
The LM head is tied to wte (not stored); its gradient is added to wte's.

Block (pre-LN): x = x + attn(ln_1(x)); x = x + ffn(ln_2(x)); then ln_f and logits = x wte^T.
LayerNorm eps 1e-5, GELU tanh form (HF gelu_new), learned positions, init N(0, 0.02) with the
residual projections (every c_proj.weight) at 0.02 / sqrt(2 n_layer), biases 0, norms 1 (HF _init_weights).

The feed-forward is pluggable: `ffn_forward` / `ffn_backward` run the GPT-2 MLP, or the
Mixture-of-Experts layer of minillm.nn.moe when config["n_experts"] > 0 (same blocks otherwise).

Speed: activations stay (B*T, C) for the dense layers (one GEMM each); LayerNorm, GELU and the embedding
scatter-add run in the kernels that ops takes from the one dispatch (minillm/kernels/: Numba on the CPU,
numba.cuda on a GPU); `step` runs OpenBLAS single-threaded (see nn/attention.py).
"""

from typing import NamedTuple

import numpy as np

from minillm.models import check_token_ids, param_dtype, tied_head
from minillm.nn import attention, dense, ops
from minillm.nn import moe as moe_layer

# --- what the rest of minillm needs to know about this architecture (read through models.facts) ---
HF_CLASS = "GPT2LMHeadModel"
DEFAULTS = {}                                   # GPT-2 adds no keys to models.BASE_DEFAULTS
OPTIONS = ("n_head",)                           # config keys beyond the shared ones that a user may set
LORA_TARGETS = ("attn.c_attn", "attn.c_proj")   # the default LoRA targets: the attention projections
NO_DECAY = ("wte", "wpe")                        # embeddings (and the tied head): no weight decay
BOUNDED_POSITIONS = True                         # learned positions: at most `context` tokens in all

LN_EPS = 1e-5
STEP_SINGLE_THREAD_BATCH = 16

# --- Hugging Face config.json (GPT2Config; minillm.hf_config does the file, these the keys) ---------
HF_MODEL_TYPES = ("gpt2",)
GELU_NAMES = ("gelu_new", "gelu_pytorch_tanh")   # both are the tanh form minillm computes


def to_hf_config(config):
    """minillm config -> GPT2Config keys (dropout 0: minillm trains without it)."""
    return {"model_type": "gpt2", "architectures": [HF_CLASS], "vocab_size": config["vocab_size"],
            "n_positions": config["context"], "n_embd": config["d_model"], "n_layer": config["n_layer"],
            "n_head": config["n_head"], "n_inner": None, "activation_function": "gelu_new",
            "layer_norm_epsilon": LN_EPS, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "tie_word_embeddings": True}


def from_hf_config(hf):
    """GPT2Config keys (an HFReader, see hf_config) -> minillm config; one error for a value GPT-2 here lacks."""
    C = hf.need("n_embd")
    hf.only("n_inner", None, None, 4 * C)
    hf.only("activation_function", "gelu_new", *GELU_NAMES)
    hf.only("layer_norm_epsilon", 1e-5, LN_EPS)
    hf.only("scale_attn_weights", True, True)
    for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        hf.only(key, False, False)
    hf.only("tie_word_embeddings", True, True)
    return {"arch": "gpt", "vocab_size": hf.need("vocab_size"), "context": hf.need("n_positions"),
            "n_layer": hf.need("n_layer"), "n_head": hf.need("n_head"), "d_model": C}


def from_hf_weights(flat, config):
    """HF GPT-2 tensors -> ours: the causal-mask buffers of older files (attn.bias, attn.masked_bias) are
    not parameters and are dropped; a stored lm_head must equal wte (minillm's head is tied)."""
    if "wte.weight" in flat and "transformer.wte.weight" not in flat:   # the original OpenAI files
        flat = {(n if n == "lm_head.weight" else "transformer." + n): a for n, a in flat.items()}
    flat = {n: a for n, a in flat.items() if not n.endswith((".attn.bias", ".attn.masked_bias"))}
    return tied_head(flat, "lm_head.weight", "transformer.wte.weight")



class BlockCache(NamedTuple):
    ln_1: tuple
    attn: tuple
    ln_2: tuple
    ffn: tuple


class Cache(NamedTuple):
    idx: np.ndarray
    wte: np.ndarray
    xf: np.ndarray          # (B*T, C): ln_f's output, the head's input
    blocks: list            # BlockCache per layer
    ln_f: tuple
    config: dict


def _is_moe(config):
    return int(config.get("n_experts", 0) or 0) > 0


def _layernorm_forward(x, p):
    return ops.layernorm_forward(x, p["weight"], p["bias"], LN_EPS)


# --- feed-forward: GPT-2 MLP or MoE -----------------------------------------------------------------


def ffn_init(config, rng):
    """Params of one block's feed-forward ("mlp"); draws from rng after the block's attention."""
    if _is_moe(config):
        return moe_layer.moe_init(config, rng)
    C, L, dtype = int(config["d_model"]), int(config["n_layer"]), param_dtype(config)
    return {
        "c_fc": {"weight": _normal(rng, (C, 4 * C), 0.02, dtype), "bias": np.zeros(4 * C, dtype)},
        "c_proj": {"weight": _normal(rng, (4 * C, C), 0.02 / np.sqrt(2 * L), dtype),
                   "bias": np.zeros(C, dtype)},
    }


def ffn_forward(x, p, config):
    """x: (B, T, C) -> y: (B, T, C). Returns (y, cache)."""
    if _is_moe(config):
        y, cache = moe_layer.moe_forward(x, p, config)
        return y, ("moe", cache)
    shape = x.shape
    conv1d = dense.mode(config, "in_out")
    h, c_fc = dense.dense_forward(x.reshape(-1, shape[-1]), p["c_fc"], conv1d)
    g, c_gelu = ops.gelu_forward(h)
    y, c_proj = dense.dense_forward(g, p["c_proj"], conv1d)
    return y.reshape(shape), ("mlp", (c_fc, c_gelu, c_proj))


def ffn_backward(dy, cache):
    """dy: (B, T, C) -> (dx: (B, T, C), grads keyed like p)."""
    kind, inner = cache
    if kind == "moe":
        return moe_layer.moe_backward(dy, inner)
    c_fc, c_gelu, c_proj = inner
    dg, g_proj = dense.dense_backward(dy.reshape(-1, dy.shape[-1]), c_proj)
    dh = ops.gelu_backward(dg, c_gelu)
    dx, g_fc = dense.dense_backward(dh, c_fc)
    return dx.reshape(dy.shape), {"c_fc": g_fc, "c_proj": g_proj}


# --- one transformer block --------------------------------------------------------------------------


def block_forward(x, p, config):
    """x: (B, T, C) -> (B, T, C). Returns (y, BlockCache)."""
    h, c_ln1 = _layernorm_forward(x, p["ln_1"])
    a, c_attn = attention.attention_forward(h, p["attn"], config)
    x = x + a
    h, c_ln2 = _layernorm_forward(x, p["ln_2"])
    m, c_ffn = ffn_forward(h, p["mlp"], config)
    return x + m, BlockCache(c_ln1, c_attn, c_ln2, c_ffn)


def block_backward(dy, cache):
    """dy: (B, T, C) -> (dx: (B, T, C), grads keyed like p)."""
    dh, g_mlp = ffn_backward(dy, cache.ffn)
    dh, dw2, db2 = ops.layernorm_backward(dh, cache.ln_2)
    dx = dh + dy                                 # gradient at the mid-block residual stream
    dh, g_attn = attention.attention_backward(dx, cache.attn)
    dh, dw1, db1 = ops.layernorm_backward(dh, cache.ln_1)
    dh += dx
    grads = {"ln_1": {"weight": dw1, "bias": db1}, "attn": g_attn,
             "ln_2": {"weight": dw2, "bias": db2}, "mlp": g_mlp}
    return dh, grads


# --- the model --------------------------------------------------------------------------------------


def _normal(rng, shape, std, dtype):
    # Drawn in float64 then rounded, so float32 and float64 models start from the same values.
    return (rng.standard_normal(shape) * std).astype(dtype)


def init(config, rng):
    """-> params (nested dict, config["dtype"], default float32); deterministic given rng's state."""
    V, T, C = int(config["vocab_size"]), int(config["context"]), int(config["d_model"])
    L, dtype = int(config["n_layer"]), param_dtype(config)
    if C % int(config["n_head"]):
        raise ValueError(f"d_model {C} is not divisible by n_head {config['n_head']}")
    tr = {"wte": {"weight": _normal(rng, (V, C), 0.02, dtype)},
          "wpe": {"weight": _normal(rng, (T, C), 0.02, dtype)}, "h": {}}
    ones, zeros = (lambda: np.ones(C, dtype)), (lambda: np.zeros(C, dtype))
    for i in range(L):
        tr["h"][str(i)] = {
            "ln_1": {"weight": ones(), "bias": zeros()},
            "attn": {
                "c_attn": {"weight": _normal(rng, (C, 3 * C), 0.02, dtype), "bias": np.zeros(3 * C, dtype)},
                "c_proj": {"weight": _normal(rng, (C, C), 0.02 / np.sqrt(2 * L), dtype), "bias": zeros()},
            },
            "ln_2": {"weight": ones(), "bias": zeros()},
            "mlp": ffn_init(config, rng),
        }
    tr["ln_f"] = {"weight": ones(), "bias": zeros()}
    return {"transformer": tr}


def forward(params, idx, config):
    """idx: (B, T) int, T <= context -> logits: (B, T, V). Returns (logits, cache)."""
    idx = check_token_ids(idx, config)
    if idx.ndim != 2 or idx.shape[1] < 1:
        raise ValueError(f"idx must be (B, T) with T >= 1, got shape {idx.shape}")
    B, T = idx.shape
    if T > int(config["context"]):
        raise ValueError(f"sequence of {T} tokens is longer than the context ({config['context']})")
    tr = params["transformer"]
    wte = tr["wte"]["weight"]
    x = wte[idx] + tr["wpe"]["weight"][:T]
    block_caches = []
    for i in range(int(config["n_layer"])):
        x, c = block_forward(x, tr["h"][str(i)], config)
        block_caches.append(c)
    x, c_lnf = _layernorm_forward(x, tr["ln_f"])
    C = x.shape[-1]
    xf = x.reshape(B * T, C)
    logits = (xf @ wte.T).reshape(B, T, -1)      # tied head
    return logits, Cache(idx, wte, xf, block_caches, c_lnf, config)


def backward(dlogits, cache):
    """dlogits: (B, T, V) -> grads keyed like params."""
    idx, wte, xf, block_caches, c_lnf, config = cache
    B, T = idx.shape
    dl = dlogits.reshape(B * T, -1)
    dwte = dl.T @ xf                              # head part of the tied weight
    dx = (dl @ wte).reshape(B, T, -1)
    dx, dwf, dbf = ops.layernorm_backward(dx, c_lnf)
    h = {}
    for i in reversed(range(len(block_caches))):
        dx, h[str(i)] = block_backward(dx, block_caches[i])
    h = {str(i): h[str(i)] for i in range(len(block_caches))}
    C = dx.shape[-1]
    ops.embedding_backward(dx, (idx, dwte.shape), out=dwte)          # embedding part, in a fixed order
    dwpe = ops.array_module(dx).zeros((int(config["context"]), C), dtype=dx.dtype)
    dwpe[:T] = dx.sum(axis=0)
    return {"transformer": {"wte": {"weight": dwte}, "wpe": {"weight": dwpe}, "h": h,
                            "ln_f": {"weight": dwf, "bias": dbf}}}


def aux_loss(cache):
    """Sum of the MoE load-balancing losses of all layers (0.0 for plain GPT)."""
    if not _is_moe(cache.config):
        return 0.0
    return float(sum(moe_layer.aux_loss_of(block.ffn[1]) for block in cache.blocks))


def stats(cache):
    """MoE: moe_layer.stats_of summed over layers (e.g. per-expert token counts); {} for plain GPT."""
    if not _is_moe(cache.config):
        return {}
    total = {}
    for block in cache.blocks:
        for key, value in moe_layer.stats_of(block.ffn[1]).items():
            total[key] = total[key] + value if key in total else value
    return total


# --- generation with a KV cache ---------------------------------------------------------------------


def init_state(params, config, batch):
    """-> state for `step`: position 0 and an empty (B, H, context, hd) KV cache per layer."""
    wte = params["transformer"]["wte"]["weight"]
    xp = ops.array_module(wte)
    kv = [attention.init_kv_cache(batch, config, wte.dtype, xp) for _ in range(int(config["n_layer"]))]
    return {"config": config, "pos": 0, "kv": kv}


def step(params, tokens, state):
    """tokens: (B,) int, the tokens at position state["pos"] -> (logits: (B, V), state).

    The KV cache is updated in place and pos advanced; equals the last row of `forward` on the prefix.
    """
    config = state["config"]
    tokens = check_token_ids(tokens, config, "tokens")
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be (B,), got shape {tokens.shape}")
    pos = state["pos"]
    if pos >= int(config["context"]):
        raise ValueError(f"the context of {config['context']} positions is full")
    if len(tokens) <= STEP_SINGLE_THREAD_BATCH:
        # one token per row: matrix-vector products, where OpenBLAS's threads cost more than they
        # bring (and stall when another process holds a core); see attention.py
        with attention.single_threaded_blas():
            logits = _step(params, tokens, pos, state)
    else:
        logits = _step(params, tokens, pos, state)
    state["pos"] = pos + 1
    return logits, state


def _step(params, tokens, pos, state):
    config = state["config"]
    tr = params["transformer"]
    wte = tr["wte"]["weight"]
    x = wte[tokens] + tr["wpe"]["weight"][pos]                     # (B, C)
    for i in range(int(config["n_layer"])):
        p = tr["h"][str(i)]
        h = _layernorm_rows(x, p["ln_1"])
        a, _ = attention.attention_step(h, p["attn"], config, state["kv"][i], pos)
        x = x + a
        h = _layernorm_rows(x, p["ln_2"])
        m, _ = ffn_forward(h[:, None, :], p["mlp"], config)
        x = x + m[:, 0]
    return _layernorm_rows(x, tr["ln_f"]) @ wte.T


def _layernorm_rows(x, p):
    """Forward-only LayerNorm of a few rows: one kernel call instead of ~10 NumPy ones."""
    return ops.layernorm_rows(x, p["weight"], p["bias"], LN_EPS)
