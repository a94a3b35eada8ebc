"""Llama (Touvron et al. 2023) with hand-written backprop, keyed like HF LlamaForCausalLM.

    params = {"model": {
        "embed_tokens": {"weight": (V, C)},
        "layers": {"0": {"input_layernorm": {"weight": (C,)},
                         "self_attn": {"q_proj": {"weight": (H hd, C)}, "k_proj": {"weight": (H_kv hd, C)},
                                       "v_proj": {"weight": (H_kv hd, C)}, "o_proj": {"weight": (C, H hd)}},
                         "post_attention_layernorm": {"weight": (C,)},
                         "mlp": {"gate_proj": {"weight": (F, C)}, "up_proj": ..., "down_proj": {"weight": (C, F)}}},
                   "1": ...},
        "norm": {"weight": (C,)}},
      "lm_head": {"weight": (V, C)}}          (absent with config["tie_embeddings"]: logits = x embed^T)

Block (pre-norm): x = x + attn(rmsnorm(x)); x = x + mlp(rmsnorm(x)); then norm and the head. RMSNorm is
weight * x / sqrt(mean(x^2) + eps) (ops.rmsnorm; HF computes it in float32 whatever the input dtype),
attention is causal grouped-query attention with rotary embeddings (nn/gqa.py, nn/rope.py: HF's half-split
layout, rope_theta), the MLP is SwiGLU (nn/swiglu.py); no biases anywhere. The same blocks with the
sparse MoE feed-forward under "block_sparse_moe" (gate, experts.{e}.w1/w2/w3; nn/moe.py) when
config["n_experts"] > 0 are Mixtral (models/mixtral.py), whose load-balancing loss is HF's, pooled over
the layers (moe.pooled_balance_loss).

Sizes: n_kv_head (default n_head) key/value heads, d_ff (default 8/3 d_model rounded up to a multiple of
32: the same parameters as GPT-2's 4 d_model MLP with two matrices), rms_norm_eps 1e-5 (Llama 2 / 3;
HF's LlamaConfig default is 1e-6). `context` is the training sequence length (HF max_position_embeddings):
RoPE has no learned positions, so nothing bounds a sequence (BOUNDED_POSITIONS False; the KV cache grows),
but the model has only seen relative distances below `context`.
Init: N(0, 0.02), the residual projections (o_proj, down_proj, w2) at 0.02 / sqrt(2 n_layer) as our GPT-2
(HF's _init_weights uses 0.02 for all), norms 1.
"""

from typing import NamedTuple

import numpy as np

from minillm.models import check_token_ids, param_dtype, tied_head
from minillm.nn import blas, gqa, ops, swiglu
from minillm.nn import moe as moe_layer

HF_CLASS = "LlamaForCausalLM"
DEFAULTS = {"n_kv_head": None, "rope_theta": 10000.0, "sliding_window": None, "d_ff": None,
            "rms_norm_eps": 1e-5, "tie_embeddings": False}
OPTIONS = ("n_head", "n_kv_head", "rope_theta", "sliding_window", "tie_embeddings", "d_ff", "rms_norm_eps")
LORA_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
NO_DECAY = ("embed_tokens", "lm_head")
BOUNDED_POSITIONS = False        # rotary positions: no table; `context` is the trained length

STEP_SINGLE_THREAD_BATCH = 16

# --- Hugging Face config.json: LlamaConfig, MistralConfig (a sliding window), MixtralConfig (experts) --
HF_MODEL_TYPES = ("llama", "mistral")
HF_DEFAULT_EPS = 1e-6                      # LlamaConfig / MistralConfig (MixtralConfig: 1e-5)


def to_hf_config(config):
    """minillm config -> the keys of LlamaConfig, MistralConfig (sliding window) or MixtralConfig (experts)."""
    H, Hkv, hd = gqa.heads(config)
    hf = {"model_type": "llama", "architectures": [HF_CLASS], "vocab_size": config["vocab_size"],
          "hidden_size": config["d_model"], "intermediate_size": d_ff_of(config),
          "num_hidden_layers": config["n_layer"], "num_attention_heads": H, "num_key_value_heads": Hkv,
          "head_dim": hd, "hidden_act": "silu", "max_position_embeddings": config["context"],
          "rms_norm_eps": _eps(config), "tie_word_embeddings": _tied(config), "attention_dropout": 0.0,
          "rope_parameters": {"rope_type": "default", "rope_theta": float(config.get("rope_theta", 10000.0))}}
    if _is_moe(config):
        return {**hf, "model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
                "sliding_window": config.get("sliding_window"), "num_local_experts": config["n_experts"],
                "num_experts_per_tok": config["top_k"], "router_aux_loss_coef": config["aux_loss_coef"],
                "router_jitter_noise": 0.0, "output_router_logits": False}
    if config.get("sliding_window"):
        return {**hf, "model_type": "mistral", "architectures": ["MistralForCausalLM"],
                "sliding_window": config["sliding_window"]}
    return {**hf, "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}


def from_hf_config(hf, arch="llama", theta=10000.0, eps=HF_DEFAULT_EPS):
    """The keys of a LlamaConfig / MistralConfig / MixtralConfig (an HFReader, see hf_config) -> minillm config;
    one error for a value these blocks do not implement (biases, another activation, RoPE scaling ...)."""
    C, H, mistral = hf.need("hidden_size"), hf.need("num_attention_heads"), hf.get("model_type") == "mistral"
    hf.only("hidden_act", "silu", "silu")
    for key in ("attention_bias", "mlp_bias"):
        hf.only(key, False, False)
    hf.only("pretraining_tp", 1, 1)
    hf.only("rope_scaling", None, None)
    hf.only("partial_rotary_factor", 1.0, 1.0)
    rope = hf.get("rope_parameters") or {}
    hf.only("rope_parameters.rope_type", "default", "default", value=rope.get("rope_type", "default"))
    extra = set(rope) - {"rope_type", "rope_theta"}
    if extra:
        hf.refuse("rope_parameters", rope, "only rope_type \"default\" with rope_theta")
    window = hf.get("sliding_window", 4096 if mistral else None)
    if window is not None and not mistral and arch == "llama":
        hf.refuse("sliding_window", window, "a llama model has none (a mistral one does)")
    hd = hf.get("head_dim") or C // H
    Hkv = hf.get("num_key_value_heads") or H
    config = {"arch": arch, "vocab_size": hf.need("vocab_size"), "context": hf.need("max_position_embeddings"),
              "n_layer": hf.need("num_hidden_layers"), "n_head": H, "d_model": C,
              "n_kv_head": None if Hkv == H else Hkv,
              "rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", theta))),
              "sliding_window": window, "d_ff": hf.need("intermediate_size"),
              "rms_norm_eps": float(hf.get("rms_norm_eps", eps)),
              "tie_embeddings": bool(hf.get("tie_word_embeddings", False))}
    if hd * H != C:
        config["head_dim"] = hd
    if config["d_ff"] == d_ff_of({**config, "d_ff": None}):
        config["d_ff"] = None
    return config


def from_hf_weights(flat, config):
    """HF Llama / Mistral tensors -> ours: the rotary inv_freq buffers of older files are not parameters; a
    tied model's stored head copy is dropped (models.tied_head)."""
    flat = {n: a for n, a in flat.items() if not n.endswith(".rotary_emb.inv_freq")}
    return tied_head(flat, "lm_head.weight", "model.embed_tokens.weight") if _tied(config) else flat


class BlockCache(NamedTuple):
    input_layernorm: tuple
    self_attn: tuple
    post_attention_layernorm: tuple
    ffn: object               # swiglu.MLPCache or the MoE layer's cache dict


class Cache(NamedTuple):
    idx: np.ndarray
    xf: np.ndarray            # (B*T, C): the final norm's output, the head's input
    head: np.ndarray          # (V, C): lm_head.weight, or embed_tokens.weight when tied
    blocks: list              # BlockCache per layer
    norm: tuple
    config: dict


def _is_moe(config):
    return int(config.get("n_experts", 0) or 0) > 0


def ffn_key(config):
    """The name of a layer's feed-forward: "block_sparse_moe" (Mixtral) or "mlp"."""
    return "block_sparse_moe" if _is_moe(config) else "mlp"


def d_ff_of(config):
    """config["d_ff"], or 8/3 d_model rounded up to a multiple of 32."""
    if config.get("d_ff"):
        return int(config["d_ff"])
    return -(-8 * int(config["d_model"]) // (3 * 32)) * 32


def _eps(config):
    return float(config.get("rms_norm_eps", DEFAULTS["rms_norm_eps"]))


def _tied(config):
    return bool(config.get("tie_embeddings", False))


def _normal(rng, shape, std, dtype):
    return (rng.standard_normal(shape) * std).astype(dtype)    # drawn in float64: float32/64 start alike


# --- one decoder layer ------------------------------------------------------------------------------


def _moe_config(config):
    # the layers add no loss of their own: the model adds HF's pooled one (see aux_loss, backward)
    return {**config, "aux_loss_coef": 0.0, "router_z_loss_coef": 0.0}


def ffn_forward(x, p, config):
    """x: (..., C) -> y: (..., C): SwiGLU, or the sparse MoE layer (without its own aux loss)."""
    if _is_moe(config):
        return moe_layer.moe_forward(x, p, _moe_config(config))
    return swiglu.swiglu_forward(x, p, config)


def ffn_backward(dy, cache, extra_dprobs=None):
    if isinstance(cache, swiglu.MLPCache):
        return swiglu.swiglu_backward(dy, cache)
    return moe_layer.moe_backward(dy, cache, extra_dprobs)


def block_forward(x, p, config, rot=None):
    """x: (B, T, C) -> (B, T, C); rot: the rotary tables of positions 0..T-1. Returns (y, BlockCache)."""
    eps = _eps(config)
    h, c_in = ops.rmsnorm_forward(x, p["input_layernorm"]["weight"], eps)
    a, c_attn = gqa.gqa_forward(h, p["self_attn"], config, rot)
    x = x + a
    h, c_post = ops.rmsnorm_forward(x, p["post_attention_layernorm"]["weight"], eps)
    m, c_ffn = ffn_forward(h, p[ffn_key(config)], config)
    return x + m, BlockCache(c_in, c_attn, c_post, c_ffn)


def block_backward(dy, cache, extra_dprobs=None):
    """dy: (B, T, C) -> (dx, grads keyed like p); extra_dprobs: the pooled aux loss's router gradient."""
    dh, g_ffn = ffn_backward(dy, cache.ffn, extra_dprobs)
    dh, dw_post = ops.rmsnorm_backward(dh, cache.post_attention_layernorm)
    dx = dh + dy                                   # gradient at the mid-block residual stream
    dh, g_attn = gqa.gqa_backward(dx, cache.self_attn)
    dh, dw_in = ops.rmsnorm_backward(dh, cache.input_layernorm)
    dh += dx
    key = "mlp" if isinstance(cache.ffn, swiglu.MLPCache) else "block_sparse_moe"
    return dh, {"input_layernorm": {"weight": dw_in}, "self_attn": g_attn,
                "post_attention_layernorm": {"weight": dw_post}, key: g_ffn}


# --- the model --------------------------------------------------------------------------------------


def init(config, rng):
    """-> params (nested dict, config["dtype"], default float32); deterministic given rng's state."""
    V, C, L = int(config["vocab_size"]), int(config["d_model"]), int(config["n_layer"])
    H, Hkv, hd = gqa.heads(config)
    dtype, F = param_dtype(config), d_ff_of(config)
    std, std_out = 0.02, 0.02 / np.sqrt(2 * L)
    model = {"embed_tokens": {"weight": _normal(rng, (V, C), std, dtype)}, "layers": {}}
    for i in range(L):
        attn = {"q_proj": {"weight": _normal(rng, (H * hd, C), std, dtype)},
                "k_proj": {"weight": _normal(rng, (Hkv * hd, C), std, dtype)},
                "v_proj": {"weight": _normal(rng, (Hkv * hd, C), std, dtype)},
                "o_proj": {"weight": _normal(rng, (C, H * hd), std_out, dtype)}}
        if _is_moe(config):
            ffn = moe_layer.init_ffn({**config, "d_ff": F}, rng, dtype)
        else:
            ffn = {"gate_proj": {"weight": _normal(rng, (F, C), std, dtype)},
                   "up_proj": {"weight": _normal(rng, (F, C), std, dtype)},
                   "down_proj": {"weight": _normal(rng, (C, F), std_out, dtype)}}
        model["layers"][str(i)] = {"input_layernorm": {"weight": np.ones(C, dtype)}, "self_attn": attn,
                                   "post_attention_layernorm": {"weight": np.ones(C, dtype)},
                                   ffn_key(config): ffn}
    model["norm"] = {"weight": np.ones(C, dtype)}
    params = {"model": model}
    if not _tied(config):
        params["lm_head"] = {"weight": _normal(rng, (V, C), std, dtype)}
    return params


def _head(params, config):
    return params["model"]["embed_tokens"]["weight"] if _tied(config) else params["lm_head"]["weight"]


def forward(params, idx, config):
    """idx: (B, T) int -> logits: (B, T, V). Returns (logits, Cache)."""
    idx = check_token_ids(idx, config)
    if idx.ndim != 2 or idx.shape[1] < 1:
        raise ValueError(f"idx must be (B, T) with T >= 1, got shape {idx.shape}")
    B, T = idx.shape
    m = params["model"]
    x = m["embed_tokens"]["weight"][idx]
    xp = ops.array_module(x)
    rot = gqa.rotary(config, np.arange(T), x.dtype, xp)      # shared by every layer
    blocks = []
    for i in range(int(config["n_layer"])):
        x, c = block_forward(x, m["layers"][str(i)], config, rot)
        blocks.append(c)
    x, c_norm = ops.rmsnorm_forward(x, m["norm"]["weight"], _eps(config))
    xf = x.reshape(B * T, -1)
    head = _head(params, config)
    logits = (xf @ head.T).reshape(B, T, -1)
    return logits, Cache(idx, xf, head, blocks, c_norm, config)


def backward(dlogits, cache):
    """dlogits: (B, T, V) -> grads keyed like params (with Mixtral's pooled aux loss gradient)."""
    idx, xf, head, blocks, c_norm, config = cache
    B, T = idx.shape
    dl = dlogits.reshape(B * T, -1)
    dhead = dl.T @ xf
    dx = (dl @ head).reshape(B, T, -1)
    dx, dnorm = ops.rmsnorm_backward(dx, c_norm)
    extra = None
    if _is_moe(config) and float(config.get("aux_loss_coef", 0.0)):
        _, dprobs = moe_layer.pooled_balance_loss([b.ffn for b in blocks])
        extra = float(config["aux_loss_coef"]) * dprobs
    layers = {}
    for i in reversed(range(len(blocks))):
        dx, layers[str(i)] = block_backward(dx, blocks[i], extra)
    layers = {str(i): layers[str(i)] for i in range(len(blocks))}
    shape = (int(config["vocab_size"]), dx.shape[-1])
    if _tied(config):
        dembed = ops.embedding_backward(dx, (idx, shape), out=dhead)     # head part + embedding part
        return {"model": {"embed_tokens": {"weight": dembed}, "layers": layers, "norm": {"weight": dnorm}}}
    dembed = ops.embedding_backward(dx, (idx, shape))
    return {"model": {"embed_tokens": {"weight": dembed}, "layers": layers, "norm": {"weight": dnorm}},
            "lm_head": {"weight": dhead}}


def aux_loss(cache):
    """aux_loss_coef * HF's load-balancing loss pooled over the layers (0.0 without MoE)."""
    if not _is_moe(cache.config):
        return 0.0
    aux, _ = moe_layer.pooled_balance_loss([b.ffn for b in cache.blocks])
    return float(cache.config.get("aux_loss_coef", 0.0)) * aux


def stats(cache):
    """MoE: {"expert_tokens": (E,) tokens per expert summed over layers, "balance_loss": the pooled aux
    without coefficient (top_k at perfect balance)}; {} without MoE."""
    if not _is_moe(cache.config):
        return {}
    caches = [b.ffn for b in cache.blocks]
    return {"expert_tokens": sum(c["counts"] for c in caches),
            "balance_loss": moe_layer.pooled_balance_loss(caches)[0]}


# --- generation with a KV cache ---------------------------------------------------------------------


def init_state(params, config, batch):
    """-> state for `step`: position 0 and an empty (B, H_kv, context, hd) KV cache per layer (grows)."""
    w = params["model"]["embed_tokens"]["weight"]
    xp = ops.array_module(w)
    kv = [gqa.init_kv_cache(batch, config, w.dtype, xp) for _ in range(int(config["n_layer"]))]
    return {"config": config, "pos": 0, "kv": kv}


def step(params, tokens, state):
    """tokens: (B,) int at position state["pos"] -> (logits: (B, V), state); the KV caches are updated in
    place and pos advanced; equals the last row of `forward` on the prefix."""
    config = state["config"]
    tokens = check_token_ids(tokens, config, "tokens")
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be (B,), got shape {tokens.shape}")
    if len(tokens) <= STEP_SINGLE_THREAD_BATCH:   # matrix-vector products: see nn/blas.py
        with blas.single_threaded_blas():
            logits = _step(params, tokens, state)
    else:
        logits = _step(params, tokens, state)
    state["pos"] += 1
    return logits, state


def _step(params, tokens, state):
    config, pos = state["config"], state["pos"]
    m, eps = params["model"], _eps(config)
    x = m["embed_tokens"]["weight"][tokens]                              # (B, C)
    rot = gqa.rotary(config, [pos], x.dtype, ops.array_module(x))
    for i in range(int(config["n_layer"])):
        p = m["layers"][str(i)]
        h, _ = ops.rmsnorm_forward(x, p["input_layernorm"]["weight"], eps)
        a, _ = gqa.gqa_step(h, p["self_attn"], config, state["kv"][i], pos, rot)
        x = x + a
        h, _ = ops.rmsnorm_forward(x, p["post_attention_layernorm"]["weight"], eps)
        f, _ = ffn_forward(h, p[ffn_key(config)], config)
        x = x + f
    h, _ = ops.rmsnorm_forward(x, m["norm"]["weight"], eps)
    return h @ _head(params, config).T
