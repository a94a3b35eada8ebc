"""The golden cases, one per component: how each case's data is drawn, and minillm's implementation of
the component written in the calling convention that other implementations follow.

Every component function here has the signature a checked implementation must have (see
minillm/reference/__init__.py):

    name(inputs, params, upstream, config) -> (outputs, grads)

inputs / params / upstream: {name: np.ndarray}; config: the JSON dict of the manifest; outputs: {name:
array}; grads: {input or param name: d(sum_o <outputs[o], upstream[o]>) / d that tensor}. A module with
functions named like the components (this one included) can be given to `minillm reference check`.
The samplers `_case_<name>(rng)` draw float64 data; integer tensors (ids, targets, text) stay integer.
Here: tokenizer, core ops, GPT-2, AdamW and LoRA cases, and the registry COMPONENTS of every component;
the MoE, Mamba, RWKV and BitNet cases (and their registry entries) are in cases_models.py, the Llama
family's in cases_llama.py, the helpers they share in common.py. Imports go one way: cases ->
cases_models / cases_llama -> common.
"""

import numpy as np

from minillm.nn import attention as _attention
from minillm.models import gpt as _gpt
from minillm.kernels import gelu as _gelu_kernel, layernorm as _layernorm_kernel, softmax as _softmax_kernel
from minillm.nn import lora, ops
from minillm.optim import adamw_step
from minillm.reference.common import entry, normal
# MoE, Mamba, RWKV and BitNet cases live in cases_models.py; re-exported so this module has a function
# for every component (`--impl minillm.reference.cases`)
from minillm.reference.cases_models import MODEL_COMPONENTS
from minillm.reference.cases_models import bitlinear, mamba_block, moe, rwkv_block  # noqa: F401
from minillm.reference.cases_models import selective_scan, ternary_pack, wkv  # noqa: F401
# the Llama family (RMSNorm, RoPE, SwiGLU, GQA, the decoder layer, llama, mixtral): cases_llama.py
from minillm.reference.cases_llama import LLAMA_COMPONENTS
from minillm.reference.cases_llama import gqa_attention, llama, llama_block, mixtral  # noqa: F401
from minillm.reference.cases_llama import rmsnorm, rope, swiglu  # noqa: F401
from minillm.tokenizer import Tokenizer
from minillm.tree import flatten, unflatten

# --- tokenizer --------------------------------------------------------------------------------------

TRAIN_TEXT = (
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.\n"
    "Tokenizers learn merges from counts: the most frequent pair of adjacent tokens is merged first, "
    "then counted again. They're simple, and they've been used since 2019 (GPT-2).\n"
    "Numbers like 12345, 2024 and 3.14159 are split by the pre-tokenizer into runs of digits.\n"
    "Unicode text works too: café, naïve, Straße, 東京, and emoji 🙂🙂 become UTF-8 bytes first.\n"
    "    Indented lines,\ttabs and  double  spaces keep their whitespace as separate pre-tokens.\n"
    "<|endoftext|>A special token separates documents; nothing is learned across it.\n"
    "the the the then there these those other mother brother weather whether together\n"
) * 3
ENCODE_TEXT = ("The other brother's weather report: 3.14159 café, 東京 🙂 -- unseen words like "
               "xylophone.\n  <|endoftext|> is plain text when encoding.  ")


def _train_merges(text, vocab_size, special_tokens, min_frequency):
    """(M, 2) merge pairs (left id, right id) from the plain-Python specification of BPE training,
    checked against the Numba trainer behind Tokenizer.train (same tokens, same order)."""
    import regex

    from minillm.kernels.bpe import GPT2_PATTERN
    from minillm.kernels.bpe_train import train_reference

    pieces = regex.split("|".join(map(regex.escape, special_tokens)), text) if special_tokens else [text]
    words = {}
    for piece in pieces:
        for word in regex.findall(GPT2_PATTERN, piece):
            key = tuple(word.encode("utf-8"))
            words[key] = words.get(key, 0) + 1
    merges = train_reference(words, vocab_size - 256 - len(special_tokens), 256, min_frequency)
    tokens = [bytes([b]) for b in range(256)]
    for a, b in merges:
        tokens.append(tokens[a] + tokens[b])
    fast = Tokenizer.train(text, vocab_size, special_tokens=special_tokens, progress=False,
                           min_frequency=min_frequency)
    if fast.tokens != tokens:
        raise ValueError("tokenizer golden case: Tokenizer.train disagrees with train_reference")
    return np.array(merges, dtype=np.int64).reshape(-1, 2)


def _case_tokenizer_train(rng):
    return {"text": np.frombuffer(TRAIN_TEXT.encode("utf-8"), np.uint8).copy()}, {}, {}


def tokenizer_train(inputs, params, upstream, config):
    text = bytes(inputs["text"]).decode("utf-8")
    return {"merges": _train_merges(text, config["vocab_size"], config["special_tokens"],
                                    config["min_frequency"])}, {}


def _case_tokenizer_encode(rng):
    merges = tokenizer_train(_case_tokenizer_train(rng)[0], {}, {}, COMPONENTS["tokenizer_train"]["config"])
    return ({"text": np.frombuffer(ENCODE_TEXT.encode("utf-8"), np.uint8).copy()},
            {"merges": merges[0]["merges"]}, {})


def tokenizer_encode(inputs, params, upstream, config):
    tokens = [bytes([b]) for b in range(256)]
    for a, b in params["merges"].tolist():
        tokens.append(tokens[a] + tokens[b])
    ids = Tokenizer(tokens).encode(bytes(inputs["text"]).decode("utf-8"))
    return {"ids": np.array(ids, dtype=np.int64)}, {}


# --- primitives -------------------------------------------------------------------------------------


def _case_layernorm(rng):
    x = normal(rng, (2, 5, 8), 3.0, 1.5)
    return ({"x": x}, {"weight": normal(rng, 8, 0.3, 1.0), "bias": normal(rng, 8, 0.3)},
            {"y": normal(rng, x.shape)})


def layernorm(inputs, params, upstream, config):
    y, cache = _layernorm_kernel.forward_reference(inputs["x"], params["weight"], params["bias"], config["eps"])
    dx, dw, db = _layernorm_kernel.backward_reference(upstream["y"], cache)
    return {"y": y}, {"x": dx, "weight": dw, "bias": db}


def _case_gelu(rng):
    x = normal(rng, (4, 16), 3.0)
    return {"x": x}, {}, {"y": normal(rng, x.shape)}


def gelu(inputs, params, upstream, config):
    y, cache = _gelu_kernel.forward_reference(inputs["x"])
    return {"y": y}, {"x": _gelu_kernel.backward_reference(upstream["y"], cache)}


def _case_cross_entropy(rng):
    targets = rng.integers(0, 11, 10)
    targets[[2, 7]] = -100
    return ({"logits": normal(rng, (10, 11), 2.0), "targets": targets.astype(np.int64)}, {},
            {"loss": np.array(1.3)})


def cross_entropy(inputs, params, upstream, config):
    logits = inputs["logits"]
    loss, cache = _softmax_kernel.cross_entropy_forward_reference(logits, inputs["targets"], config["ignore_index"])
    dlogits = _softmax_kernel.cross_entropy_backward_reference(float(upstream["loss"]), cache)
    return {"loss": np.array(loss, dtype=logits.dtype)}, {"logits": dlogits}


# --- GPT-2 ------------------------------------------------------------------------------------------


def _gpt_block_params(rng, C, prefix=""):
    """Random GPT2Block params (HF names, Conv1D (in, out) weights): O(0.3) weights, nonzero biases."""
    shapes = {"ln_1.weight": C, "ln_1.bias": C, "attn.c_attn.weight": (C, 3 * C), "attn.c_attn.bias": 3 * C,
              "attn.c_proj.weight": (C, C), "attn.c_proj.bias": C, "ln_2.weight": C, "ln_2.bias": C,
              "mlp.c_fc.weight": (C, 4 * C), "mlp.c_fc.bias": 4 * C, "mlp.c_proj.weight": (4 * C, C),
              "mlp.c_proj.bias": C}
    return {prefix + k: normal(rng, s, 0.3, 1.0 if k.startswith("ln") and k.endswith("weight") else 0.0)
            for k, s in shapes.items()}


def _case_attention(rng):
    p = {k[5:]: v for k, v in _gpt_block_params(rng, 16).items() if k.startswith("attn.")}
    x = normal(rng, (2, 6, 16))
    return {"x": x}, p, {"y": normal(rng, x.shape)}


def attention(inputs, params, upstream, config):
    p = unflatten(params)
    y, cache = _attention.attention_forward(inputs["x"], p, config)
    dx, grads = _attention.attention_backward(upstream["y"], cache)
    return {"y": y}, {"x": dx, **flatten(grads)}


def _case_gpt_block(rng):
    x = normal(rng, (2, 6, 16))
    return {"x": x}, _gpt_block_params(rng, 16), {"y": normal(rng, x.shape)}


def gpt_block(inputs, params, upstream, config):
    y, cache = _gpt.block_forward(inputs["x"], unflatten(params), config)
    dx, grads = _gpt.block_backward(upstream["y"], cache)
    return {"y": y}, {"x": dx, **flatten(grads)}


def _case_gpt(rng):
    cfg = {**COMPONENTS["gpt"]["config"], "dtype": "float64"}
    params = flatten(_gpt.init(cfg, rng))
    for name, a in params.items():
        a += normal(rng, a.shape, 0.3 if a.ndim == 1 else 0.1)
    idx = rng.integers(0, cfg["vocab_size"], (2, 7)).astype(np.int64)
    return {"idx": idx}, params, {"logits": normal(rng, (2, 7, cfg["vocab_size"]))}


def gpt(inputs, params, upstream, config):
    logits, cache = _gpt.forward(unflatten(params), inputs["idx"], config)
    return {"logits": logits}, flatten(_gpt.backward(upstream["logits"], cache))


# --- optimizer --------------------------------------------------------------------------------------


def _case_adamw(rng):
    inputs = {}
    for name, shape in (("weight", (6, 5)), ("bias", (5,))):
        g = normal(rng, shape) * 10.0 ** rng.uniform(-9, 0, shape)   # tiny ones: eps matters
        inputs["param." + name] = normal(rng, shape)
        inputs["grad." + name] = g
        inputs["exp_avg." + name] = 0.5 * g + normal(rng, shape, 1e-3)
        inputs["exp_avg_sq." + name] = g * g * rng.uniform(0.5, 2.0, shape)
    return inputs, {}, {}


def adamw(inputs, params, upstream, config):
    names = [k[len("param."):] for k in inputs if k.startswith("param.")]
    p = {n: inputs["param." + n].copy() for n in names}
    state = {"step": config["step"], "m": {n: inputs["exp_avg." + n].copy() for n in names},
             "v": {n: inputs["exp_avg_sq." + n].copy() for n in names}}
    adamw_step(p, {n: inputs["grad." + n] for n in names}, state, config["lr"], betas=tuple(config["betas"]),
               eps=config["eps"], weight_decay=config["weight_decay"], mask=config["decay"])
    out = {}
    for n in names:
        out["param." + n], out["exp_avg." + n], out["exp_avg_sq." + n] = p[n], state["m"][n], state["v"][n]
    return out, {}


# --- LoRA -----------------------------------------------------------------------------------------


def _case_lora_linear(rng):
    I, O, r = 12, 10, COMPONENTS["lora_linear"]["config"]["rank"]
    p = {"weight": normal(rng, (O, I), 0.3), "bias": normal(rng, O, 0.3),
         "lora_A": normal(rng, (r, I), 0.3), "lora_B": normal(rng, (O, r), 0.3)}
    x = normal(rng, (2, 5, I))
    return {"x": x}, p, {"y": normal(rng, (2, 5, O))}


def lora_linear(inputs, params, upstream, config):
    from minillm.nn import dense

    cfg = {"lora": lora.lora_config(config["rank"], config["alpha"])}
    y, cache = dense.dense_forward(inputs["x"], dict(params), dense.mode(cfg, "out_in"))
    dx, grads = dense.dense_backward(upstream["y"], cache)
    return {"y": y}, {"x": dx, "lora_A": grads["lora_A"], "lora_B": grads["lora_B"]}


# --- the registry -----------------------------------------------------------------------------------
# Each entry (common.entry): the component function (above, or in cases_models.py), its sampler, the
# config given to implementations, the float dtypes written with their tolerances, which peer it
# matches, and the exact math. The model-family entries come from cases_models.MODEL_COMPONENTS.

_HERE = {}


def _add(name, fn, sample, config, matches, math, float32=False):
    _HERE[name] = entry(fn, sample, config, matches, math, float32)


_add("tokenizer_train", tokenizer_train, _case_tokenizer_train,
     {"vocab_size": 321, "min_frequency": 2, "special_tokens": ["<|endoftext|>"]},
     "minillm's BPE trainer (GPT-2 byte-level BPE; the tie-break is ours)",
     "text: UTF-8 bytes. Ids 0..255 are the bytes themselves; merge m creates id 256 + m. Special-token "
     "text is cut out first; the rest is split by GPT-2's pre-tokenizer regex; each step merges the "
     "adjacent pair with the highest count summed over pre-tokens (ties: smallest (left id, right id)); "
     "stops at vocab_size - 256 - len(special_tokens) merges or when the best count < min_frequency. "
     "merges: (M, 2) int64 (left id, right id).")
_add("tokenizer_encode", tokenizer_encode, _case_tokenizer_encode, {},
     "tiktoken.Encoding(pat_str=GPT-2's pattern, mergeable_ranks={bytes of id i: i}).encode_ordinary",
     "params merges: (M, 2) int64, token 256 + m = bytes(left) + bytes(right); ids 0..255 are bytes. "
     "GPT-2 regex pre-tokenization; inside a pre-token repeatedly merge the adjacent pair whose "
     "concatenation is the token of lowest id (leftmost first). '<|endoftext|>' in the text is plain text. "
     "ids: (n,) int64.")
_add("layernorm", layernorm, _case_layernorm, {"eps": 1e-5}, "torch.nn.LayerNorm (HF GPT2 ln_1 / ln_2 / ln_f)",
     "y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias over the last axis, biased variance.")
_add("gelu", gelu, _case_gelu, {}, "transformers NewGELUActivation (gelu_new) = torch gelu(approximate='tanh')",
     "y = 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))): the tanh form, not erf.")
_add("cross_entropy", cross_entropy, _case_cross_entropy, {"ignore_index": -100},
     "torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100) (reduction mean)",
     "logits (N, V), targets (N,) int64; loss = mean over targets != ignore_index of "
     "-log softmax(logits)[target]; loss is a 0-d array, its upstream gradient a 0-d array.")
_add("attention", attention, _case_attention, {"n_head": 4},
     "transformers GPT2Attention (causal, no dropout)",
     "qkv = x W_attn + b_attn (Conv1D weights (in, out)), split into q, k, v, then n_head heads; per head "
     "softmax(q k^T / sqrt(head_dim) + causal mask) v; heads concatenated; y = o W_proj + b_proj.")
_add("gpt_block", gpt_block, _case_gpt_block, {"n_head": 4, "layer_norm_epsilon": 1e-5},
     "transformers GPT2Block (activation_function='gelu_new', no dropout)",
     "pre-LN: h = x + attn(ln_1(x)); y = h + mlp(ln_2(h)), mlp = c_proj(gelu_tanh(c_fc(.))); "
     "attention as in 'attention'; Conv1D weights (in, out).")
_add("gpt", gpt, _case_gpt,
     {"vocab_size": 37, "context": 8, "n_layer": 2, "n_head": 2, "d_model": 16, "layer_norm_epsilon": 1e-5},
     "transformers GPT2LMHeadModel (tied lm_head, gelu_new, no dropout)",
     "x = wte[idx] + wpe[0..T-1]; n_layer GPT-2 blocks; ln_f; logits = x wte^T (tied head: "
     "grads of transformer.wte.weight include the head's). grads: every parameter (none for idx); "
     "wpe rows past T get zero gradient.", float32=True)
_add("adamw", adamw, _case_adamw,
     {"lr": 0.01, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "step": 4,
      "decay": {"weight": True, "bias": False}},
     "torch.optim.AdamW (amsgrad off) with state step = config step, exp_avg, exp_avg_sq",
     "one update, t = step + 1: p *= 1 - lr wd (only where decay[name]); m = b1 m + (1 - b1) g; "
     "v = b2 v + (1 - b2) g^2; p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps). "
     "inputs param.N, grad.N, exp_avg.N, exp_avg_sq.N -> outputs param.N, exp_avg.N, exp_avg_sq.N.")
_add("lora_linear", lora_linear, _case_lora_linear, {"rank": 4, "alpha": 8.0},
     "peft LoRA on torch.nn.Linear (lora_dropout=0, bias='none'): lora_A = lora_A.default.weight, "
     "lora_B = lora_B.default.weight, weight / bias = base_layer's",
     "y = x weight^T + bias + (alpha / rank) (x lora_A^T) lora_B^T; weight and bias are frozen: "
     "grads for x, lora_A, lora_B only.")

# manifest order (also the order `minillm reference check` runs and reports the components in)
ORDER = ("tokenizer_train", "tokenizer_encode", "layernorm", "gelu", "cross_entropy", "attention",
         "gpt_block", "gpt", "adamw", "moe", "selective_scan", "mamba_block", "wkv", "rwkv_block",
         "lora_linear", "bitlinear", "ternary_pack",
         "rmsnorm", "rope", "swiglu", "gqa_attention", "llama_block", "llama", "mixtral")
_ALL = {**_HERE, **MODEL_COMPONENTS, **LLAMA_COMPONENTS}
assert sorted(ORDER) == sorted(_ALL), "ORDER must list every component once"
COMPONENTS = {name: _ALL[name] for name in ORDER}
