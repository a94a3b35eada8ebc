"""Golden cases for the Llama family: RMSNorm, rotary embedding, SwiGLU, grouped-query attention (with
Mistral's sliding window), the Llama decoder layer, and the Llama and Mixtral models, with their registry
entries LLAMA_COMPONENTS. Same conventions as cases.py, which merges these entries into COMPONENTS (after
the older components, whose files stay byte-identical) and re-exports these functions. Imports go one
way: cases -> cases_llama -> common.
"""

import numpy as np

from minillm.models import llama as _llama
from minillm.models import mixtral as _mixtral
from minillm.nn import gqa, ops, rope as _rope, swiglu as _swiglu
from minillm.nn import moe as _moe
from minillm.reference.common import entry, normal
from minillm.tree import flatten, unflatten


def _config(name):
    return LLAMA_COMPONENTS[name]["config"]


def _jitter(rng, params):
    """Random weights around an init: no norm weight at exactly 1, every projection O(0.1)."""
    return {k: v + normal(rng, v.shape, 0.3 if v.ndim == 1 else 0.1) for k, v in flatten(params).items()}


# --- primitives -------------------------------------------------------------------------------------


def _case_rmsnorm(rng):
    x = normal(rng, (2, 5, 8), 3.0, 0.5)
    return {"x": x}, {"weight": normal(rng, 8, 0.3, 1.0)}, {"y": normal(rng, x.shape)}


def rmsnorm(inputs, params, upstream, config):
    y, cache = ops.rmsnorm_forward(inputs["x"], params["weight"], config["eps"])
    dx, dw = ops.rmsnorm_backward(upstream["y"], cache)
    return {"y": y}, {"x": dx, "weight": dw}


def _case_rope(rng):
    x = normal(rng, (2, 3, 6, 8))
    positions = np.array([5, 6, 7, 8, 9, 10], dtype=np.int64)     # a KV cache continuing at position 5
    return {"x": x, "position_ids": positions}, {}, {"y": normal(rng, x.shape)}


def rope(inputs, params, upstream, config):
    x = inputs["x"]
    cos, sin = _rope.tables(inputs["position_ids"], x.shape[-1], config["rope_theta"], x.dtype)
    y, cache = _rope.rope_forward(x, cos, sin)
    return {"y": y}, {"x": _rope.rope_backward(upstream["y"], cache)}


def _case_swiglu(rng):
    C, F = 8, 12
    p = {"gate_proj.weight": normal(rng, (F, C), 0.4), "up_proj.weight": normal(rng, (F, C), 0.4),
         "down_proj.weight": normal(rng, (C, F), 0.4)}
    x = normal(rng, (2, 5, C))
    return {"x": x}, p, {"y": normal(rng, x.shape)}


def swiglu(inputs, params, upstream, config):
    y, cache = _swiglu.swiglu_forward(inputs["x"], unflatten(params), {})
    dx, grads = _swiglu.swiglu_backward(upstream["y"], cache)
    return {"y": y}, {"x": dx, **flatten(grads)}


# --- attention and the decoder layer ------------------------------------------------------------------


def _case_gqa_attention(rng):
    cfg = _config("gqa_attention")
    H, Hkv, hd = gqa.heads(cfg)
    C = cfg["d_model"]
    p = {"q_proj.weight": normal(rng, (H * hd, C), 0.3), "k_proj.weight": normal(rng, (Hkv * hd, C), 0.3),
         "v_proj.weight": normal(rng, (Hkv * hd, C), 0.3), "o_proj.weight": normal(rng, (C, H * hd), 0.3)}
    x = normal(rng, (2, 6, C))
    return {"x": x}, p, {"y": normal(rng, x.shape)}


def gqa_attention(inputs, params, upstream, config):
    y, cache = gqa.gqa_forward(inputs["x"], unflatten(params), config)
    dx, grads = gqa.gqa_backward(upstream["y"], cache)
    return {"y": y}, {"x": dx, **flatten(grads)}


def _case_llama_block(rng):
    cfg = {**_config("llama_block"), "vocab_size": 3, "n_layer": 1, "dtype": "float64"}
    p = _jitter(rng, _llama.init(cfg, rng)["model"]["layers"]["0"])
    x = normal(rng, (2, 6, cfg["d_model"]))
    return {"x": x}, p, {"y": normal(rng, x.shape)}


def llama_block(inputs, params, upstream, config):
    y, cache = _llama.block_forward(inputs["x"], unflatten(params), config)
    dx, grads = _llama.block_backward(upstream["y"], cache)
    return {"y": y}, {"x": dx, **flatten(grads)}


# --- models -----------------------------------------------------------------------------------------


def _case_llama(rng):
    cfg = {**_config("llama"), "dtype": "float64"}
    params = _jitter(rng, _llama.init(cfg, rng))
    idx = rng.integers(0, cfg["vocab_size"], (2, 7)).astype(np.int64)
    return {"idx": idx}, params, {"logits": normal(rng, (2, 7, cfg["vocab_size"]))}


def llama(inputs, params, upstream, config):
    logits, cache = _llama.forward(unflatten(params), inputs["idx"], config)
    return {"logits": logits}, flatten(_llama.backward(upstream["logits"], cache))


def _routing_gaps(params, idx, cfg):
    """The smallest gap between sorted router logits of any token in any layer."""
    _, cache = _mixtral.forward(unflatten(params), idx, cfg)
    return min(float(np.diff(np.sort(b.ffn["logits"], axis=1), axis=1).min()) for b in cache.blocks)


def _case_mixtral(rng):
    cfg = {**_config("mixtral"), "dtype": "float64"}
    while True:   # routing at least 1e-3 (in router logits) away from any tie, also rounded to float32
        params = _jitter(rng, _mixtral.init(cfg, rng))
        for k in params:
            if k.endswith("gate.weight"):
                params[k] *= 10.0
        idx = rng.integers(0, cfg["vocab_size"], (2, 8)).astype(np.int64)   # B T n_layer = 32 tokens
        rounded = {k: v.astype(np.float32).astype(np.float64) for k, v in params.items()}
        if min(_routing_gaps(params, idx, cfg), _routing_gaps(rounded, idx, cfg)) > 1e-3:
            upstream = {"logits": normal(rng, (2, 8, cfg["vocab_size"])), "aux_loss": np.array(0.1)}
            return {"idx": idx}, params, upstream


def mixtral(inputs, params, upstream, config):
    cfg = {**config, "aux_loss_coef": float(upstream["aux_loss"])}
    logits, cache = _mixtral.forward(unflatten(params), inputs["idx"], cfg)
    aux, _ = _moe.pooled_balance_loss([b.ffn for b in cache.blocks])
    grads = flatten(_mixtral.backward(upstream["logits"], cache))
    return {"logits": logits, "aux_loss": np.array(aux, dtype=logits.dtype)}, grads


# --- the registry entries (cases.py puts them into COMPONENTS, in manifest order) ---------------------

LLAMA_COMPONENTS = {}


def _add(name, fn, sample, config, matches, math, float32=False):
    LLAMA_COMPONENTS[name] = entry(fn, sample, config, matches, math, float32)


_ROPE = ("rotary embedding, HF's half-split layout: per head, h = head_dim / 2, theta_i = rope_theta^(-2i / "
         "head_dim), angle = position * theta_i; y[:h] = x[:h] cos - x[h:] sin, y[h:] = x[h:] cos + x[:h] sin "
         "(= x cat(cos, cos) + rotate_half(x) cat(sin, sin)); Meta's interleaved checkpoints need HF's q/k "
         "row permutation first")
_GQA = ("q, k, v = x q_proj^T, x k_proj^T, x v_proj^T (nn.Linear (out, in), no bias), split into n_head resp. "
        "n_kv_head heads of head_dim = d_model / n_head; query head h uses kv head h // (n_head / n_kv_head) "
        "(repeat_kv); q, k rotated by their positions 0..T-1 (as in 'rope'); per head softmax(q k^T / "
        "sqrt(head_dim) + mask) v, mask allowing key j for query i iff j <= i and (sliding_window null or "
        "j > i - sliding_window); heads concatenated; y = o o_proj^T")
_LAYER = ("h = x + self_attn(input_layernorm(x)); y = h + mlp(post_attention_layernorm(h)); RMSNorms as in "
          "'rmsnorm' (eps rms_norm_eps), self_attn as in 'gqa_attention', mlp as in 'swiglu'")

_add("rmsnorm", rmsnorm, _case_rmsnorm, {"eps": 1e-5},
     "transformers LlamaRMSNorm (HF computes it in float32 whatever the input dtype)",
     "y = weight * x / sqrt(mean(x^2) + eps) over the last axis (eps inside the square root).", float32=True)
_add("rope", rope, _case_rope, {"rope_theta": 10000.0},
     "transformers apply_rotary_pos_emb with LlamaRotaryEmbedding's tables (HF computes them in float32)",
     f"x: (B, H, T, head_dim), position_ids: (T,) int64 (here 5..10, as a KV cache continuing); {_ROPE}. "
     "grads: x only.", float32=True)
_add("swiglu", swiglu, _case_swiglu, {},
     "transformers LlamaMLP (hidden_act='silu', mlp_bias=False)",
     "y = down_proj(silu(gate_proj(x)) * up_proj(x)), silu(g) = g sigmoid(g); nn.Linear (out, in) weights.")
_add("gqa_attention", gqa_attention, _case_gqa_attention,
     {"d_model": 16, "n_head": 4, "n_kv_head": 2, "rope_theta": 10000.0, "sliding_window": 4},
     "transformers MistralAttention (LlamaAttention when sliding_window is null), eager, no dropout",
     f"{_GQA}.", float32=True)
_add("llama_block", llama_block, _case_llama_block,
     {"d_model": 16, "n_head": 4, "n_kv_head": 2, "d_ff": 24, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
      "sliding_window": None},
     "transformers LlamaDecoderLayer (layer 0, eager attention, position_ids 0..T-1)",
     f"{_LAYER}; self_attn: {_GQA}.")
_add("llama", llama, _case_llama,
     {"vocab_size": 37, "context": 8, "n_layer": 2, "n_head": 4, "n_kv_head": 1, "d_model": 16, "d_ff": 24,
      "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "sliding_window": None, "tie_embeddings": False},
     "transformers LlamaForCausalLM (untied lm_head, eager attention)",
     "x = model.embed_tokens.weight[idx]; n_layer decoder layers as in 'llama_block' (n_kv_head 1: "
     "multi-query); model.norm; logits = x lm_head.weight^T. grads: every parameter.", float32=True)
_add("mixtral", mixtral, _case_mixtral,
     {"vocab_size": 37, "context": 8, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "d_model": 16, "d_ff": 12,
      "rope_theta": 1e6, "rms_norm_eps": 1e-5, "sliding_window": None, "tie_embeddings": False,
      "n_experts": 4, "top_k": 2},
     "transformers MixtralForCausalLM (eager experts; released names block_sparse_moe.experts.<e>.w1/w2/w3, "
     "which HF 5 fuses on load) + load_balancing_loss_func over all layers",
     "layers as in 'llama_block' with mlp replaced by block_sparse_moe as in 'moe' (routing away from ties); "
     "logits as in 'llama'; aux_loss (0-d, no coefficient: its upstream gradient plays that role) = "
     "n_experts * sum_i F_i P_i with F_i = fraction of the n_layer B T (token, layer) rows that picked expert "
     "i among their top_k and P_i = the mean router probability over those rows (HF pools the layers; "
     "top_k at perfect balance). grads include the aux_loss path. HF's router softmax runs in float32.",
     float32=True)
