"""Low-rank adapters (LoRA, Hu et al. 2021) on dense layers: the op, choosing layers, merge / unmerge.

The update, as peft computes it (lora_A.weight (r, I), lora_B.weight (O, r)):

    y = dense(x) + (alpha / r) * (dropout(x) A^T) B^T          x: (..., I) -> y: (..., O)

`dense.dense_forward` adds `lora_delta_forward(x, A, B, settings)` to a dense layer whose params dict
holds "lora_A" and "lora_B"; its backward then returns gradients for lora_A / lora_B (and the bias)
but none for the frozen weight. config["lora"] = {"rank", "alpha", "targets", "dropout"} (see
`lora_config`). A is initialised like peft (kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(I), 1/sqrt(I)))
and B = 0, so a fresh adapter changes nothing, exactly.

Target patterns select dense layers by dotted name (a dense layer is a dict holding a 2-D "weight",
other than embeddings / LM heads). A pattern matches a layer name when
  * it starts with "re:" and the rest re.fullmatch-es the name, or
  * fnmatch (case-sensitive) matches the whole name or a dotted suffix of it (like peft's
    target_modules): "c_attn" matches "transformer.h.0.attn.c_attn"; "h.0.*" matches layer 0 only;
  * "all" matches every dense layer.
Examples (HF names): GPT attention "attn.c_attn", "attn.c_proj" (each model's default is its LORA_TARGETS);
Llama / Mixtral attention "self_attn.q_proj" (k_proj, v_proj, o_proj), MLP "mlp.gate_proj" (up_proj, down_proj);
GPT MLP "mlp.c_fc", "mlp.c_proj"; MoE experts "experts.*.w1" (w2, w3; the router "gate" is never
adapted); Mamba "mixer.in_proj", "mixer.out_proj" (x_proj, dt_proj); RWKV time mixing
"attention.key", "attention.value", "attention.receptance" ("attention.output"), channel mixing
"feed_forward.key" / "feed_forward.value" / "feed_forward.receptance".

Dropout on the adapter input (peft's lora_dropout) runs only when config["lora"]["dropout"] > 0 AND a
random generator is given, either as the `rng` argument or as config["lora"]["dropout_rng"] (set it
in a per-step copy of the config with `training_config(config, rng)`; never save that copy).
Otherwise the adapter is deterministic. Adapter files, fine-tuning and merging checkpoints: finetune.py.
"""

import fnmatch
import re
from typing import NamedTuple

import numpy as np

from minillm.nn.ops import array_module
from minillm.tree import flatten

ADAPTER_KEYS = ("lora_A", "lora_B")
# Last name parts of 2-D "weight" holders that are not dense layers (never adapted): embeddings,
# LM heads, and the MoE router "gate" (a plain linear in moe.py, outside the dense hook).
NOT_DENSE = ("wte", "wpe", "embeddings", "embed_tokens", "lm_head", "head", "gate")
# HF GPT-2's Conv1D modules store the weight as (in, out); every other dense layer is an
# nn.Linear (out, in). See `layout_of`.
IN_OUT_NAMES = ("c_attn", "c_proj", "c_fc")


# --- the adapter op -------------------------------------------------------------------------------


def lora_config(rank, alpha=None, targets=None, dropout=0.0):
    """Validated config["lora"] dict. alpha defaults to rank (scale 1); targets None = arch default."""
    if isinstance(rank, bool) or int(rank) != rank or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    if isinstance(targets, str):
        targets = [t for t in targets.replace(",", " ").split() if t]
    if targets is not None and not targets:
        raise ValueError("empty LoRA target list")
    return {"rank": int(rank), "alpha": alpha, "targets": None if targets is None else list(targets),
            "dropout": float(dropout)}


def _lora(config):
    if "lora" not in config or not config["lora"]:
        raise ValueError("LoRA needs a 'lora' section in the model config (see lora.lora_config)")
    return config["lora"]


def scale_of(config):
    """alpha / r."""
    lc = _lora(config)
    return float(lc["alpha"]) / int(lc["rank"])


def training_config(config, rng):
    """A copy of config whose adapters apply dropout with `rng` (numpy Generator); not JSON-able."""
    return {**config, "lora": {**_lora(config), "dropout_rng": rng}}


class Settings(NamedTuple):
    """What an adapter's forward needs of the config: scale = alpha / r, dropout probability, dropout rng."""
    scale: float
    dropout: float = 0.0
    rng: object = None


def settings(config):
    """config (with a "lora" section, see lora_config / training_config) -> Settings."""
    lc = _lora(config)
    return Settings(scale_of(config), float(lc.get("dropout", 0.0) or 0.0), lc.get("dropout_rng"))


def lora_delta_forward(x, A, B, lora, rng=None):
    """x: (..., I), A: (r, I), B: (O, r), lora: Settings -> delta: (..., O) = scale (dropout(x) A^T) B^T."""
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1] or A.shape[1] != x.shape[-1]:
        raise ValueError(f"LoRA shapes do not fit: x {x.shape}, lora_A {A.shape} (r, in), "
                         f"lora_B {B.shape} (out, r)")
    xp = array_module(x)
    scale, p = lora.scale, lora.dropout
    rng = lora.rng if rng is None else rng
    mask = None
    if p > 0.0 and rng is not None:
        # inverted dropout as torch.nn.Dropout: keep with prob 1 - p, scale kept entries by 1/(1-p)
        mask = xp.asarray(rng.random(x.shape) >= p).astype(x.dtype) / (1.0 - p)
        x = x * mask
    h = (x @ A.T) * scale                     # (..., r): the scale is applied on the small side
    return h @ B.T, (x, A, B, h, mask, scale)


def lora_delta_backward(dy, cache):
    """dy: (..., O) -> (dx: (..., I), dA: (r, I), dB: (O, r))."""
    x, A, B, h, mask, scale = cache
    dy2 = dy.reshape(-1, dy.shape[-1])
    dB = dy2.T @ h.reshape(-1, h.shape[-1])
    dh = (dy @ B) * scale                     # (..., r)
    dA = dh.reshape(-1, dh.shape[-1]).T @ x.reshape(-1, x.shape[-1])
    dx = dh @ A
    if mask is not None:
        dx = dx * mask
    return dx, dA, dB


# --- choosing layers ------------------------------------------------------------------------------


def _is_dense(name, node):
    w = node.get("weight") if isinstance(node, dict) else None
    return (w is not None and getattr(w, "ndim", 0) == 2
            and name.rsplit(".", 1)[-1] not in NOT_DENSE)


def _walk(tree, prefix=""):
    """Yield (dotted name, node) for every dict and leaf below tree (dicts and lists)."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for k, v in items:
        name = f"{prefix}.{k}" if prefix else str(k)
        yield name, v
        if isinstance(v, (dict, list, tuple)):
            yield from _walk(v, name)


def dense_layers(params):
    """Dotted names of the dense layers (dicts holding a 2-D "weight", not embeddings/heads)."""
    return [n for n, v in _walk(params) if _is_dense(n, v)]


def _matches(pattern, name):
    if pattern == "all":
        return True
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def match_targets(params, patterns, strict=True):
    """Dotted names of the dense layers matched by any pattern (see the module docstring).

    ValueError when nothing matches at all and, if strict, when a pattern matches no dense layer:
    the message says whether it names a param that is not a dense layer (an embedding, head, norm,
    bias or bare tensor) or nothing. Wildcards may also hit non-dense params; those are ignored.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    for pat in patterns:
        if pat.startswith("re:"):
            try:
                re.compile(pat[3:])
            except re.error as e:
                raise ValueError(f"bad LoRA target regex {pat!r}: {e}") from None
    nodes = [(n, v) for n, v in _walk(params) if n.rsplit(".", 1)[-1] not in ADAPTER_KEYS]
    dense = [n for n, v in nodes if _is_dense(n, v)]
    examples = ", ".join(dense[:4]) + (", ..." if len(dense) > 4 else "")
    chosen = set()
    for pat in patterns:
        hits = {n for n in dense if _matches(pat, n)}
        if not hits and strict:
            other = [(n, v) for n, v in nodes if _matches(pat, n)]
            if other:
                n, v = other[0]
                what = "a dict" if isinstance(v, dict) else f"a tensor of shape {tuple(v.shape)}"
                raise ValueError(f"LoRA target {pat!r} names {n!r} ({what}), which is not a dense "
                                 "layer (embeddings, heads, norms and biases are never adapted; "
                                 f"name the layer, e.g. {examples})")
            raise ValueError(f"LoRA target {pat!r} matches no layer; dense layers are {examples}")
        chosen |= hits
    if not chosen:
        raise ValueError(f"no dense layer matches the LoRA targets {list(patterns)}; dense layers "
                         f"are {examples}")
    return [n for n in dense if n in chosen]


def _rebuild(tree, fn, prefix=""):
    """Copy the containers of tree, replacing each dict node by fn(name, node) (None = keep)."""
    if isinstance(tree, dict):
        items = list(tree.items())
    elif isinstance(tree, (list, tuple)):
        items = list(enumerate(tree))
    else:
        return tree
    out = []
    for k, v in items:
        name = f"{prefix}.{k}" if prefix else str(k)
        new = fn(name, v) if isinstance(v, dict) else None
        out.append((k, _rebuild(v, fn, name) if new is None else new))
    return dict(out) if isinstance(tree, dict) else type(tree)(v for _, v in out)


# --- adding, splitting, counting ------------------------------------------------------------------


def add_adapters(params, config, rng, targets=None, default_targets=None):
    """-> a new params tree (base arrays shared, not copied) with lora_A / lora_B in each target.

    targets: patterns (default config["lora"]["targets"], else `default_targets`, the model's LORA_TARGETS,
    for which only "no layer matched at all" is an error).
    lora_A ~ U(-1/sqrt(I), 1/sqrt(I)) of shape (r, I) (peft's kaiming_uniform(a=sqrt(5))), lora_B = 0
    of shape (O, r), in the weight's dtype and array module.
    """
    lc = _lora(config)
    r = int(lc["rank"])
    strict = True
    if targets is None:
        targets = lc.get("targets")
    if targets is None:
        if default_targets is None:
            raise ValueError(f"no default LoRA targets for architecture {config.get('arch')!r}; give targets")
        targets, strict = list(default_targets), False
    chosen = set(match_targets(params, targets, strict=strict))

    def adapt(name, node):
        if name not in chosen:
            return None
        if any(k in node for k in ADAPTER_KEYS):
            raise ValueError(f"layer {name!r} already has a LoRA adapter")
        w = node["weight"]
        i, o = _in_out(name, w, layout_of(name, config))
        xp = array_module(w)
        bound = 1.0 / np.sqrt(i)
        a = xp.asarray(rng.uniform(-bound, bound, size=(r, i)).astype(w.dtype))
        return {**node, "lora_A": a, "lora_B": xp.zeros((o, r), dtype=w.dtype)}

    return _rebuild(params, adapt)


def adapter_names(params):
    """The dotted names of every lora_A / lora_B tensor: the trainable set when fine-tuning."""
    return {n for n in flatten(params) if n.rsplit(".", 1)[-1] in ADAPTER_KEYS}


def split_adapters(params):
    """params -> (base, adapters): two nested trees, adapters holding only lora_A / lora_B."""
    adapters = {}

    def strip(name, node):
        if not any(k in node for k in ADAPTER_KEYS):
            return None
        parent = adapters
        for part in name.split("."):
            parent = parent.setdefault(part, {})
        parent.update({k: node[k] for k in ADAPTER_KEYS if k in node})
        return {k: v for k, v in node.items() if k not in ADAPTER_KEYS}

    base = _rebuild(params, strip)
    return base, adapters


def join(base, adapters, config=None):
    """Inverse of split_adapters; checks every adapter against its base layer (ValueError if not).

    `adapters` may be nested or flat ({"transformer.h.0.attn.c_attn.lora_A": A, ...}).
    """
    flat = flatten(adapters)
    layers = {}
    for name, a in flat.items():
        layer, key = name.rsplit(".", 1) if "." in name else ("", name)
        if key not in ADAPTER_KEYS:
            raise ValueError(f"{name!r} is not a LoRA tensor (expected names ending in lora_A / "
                             "lora_B)")
        layers.setdefault(layer, {})[key] = a
    nodes = dict(_walk(base))
    for layer, ab in layers.items():
        if layer not in nodes:
            raise ValueError(f"adapter layer {layer!r} does not exist in the base model")
        if not _is_dense(layer, nodes[layer]):
            raise ValueError(f"adapter layer {layer!r} is not a dense layer in the base model")
        if set(ab) != set(ADAPTER_KEYS):
            raise ValueError(f"adapter layer {layer!r} needs both lora_A and lora_B, got {sorted(ab)}")
        w, A, B = nodes[layer]["weight"], ab["lora_A"], ab["lora_B"]
        i, o = _in_out(layer, w, layout_of(layer, config))
        if A.ndim != 2 or B.ndim != 2 or A.shape[1] != i or B.shape[0] != o or A.shape[0] != B.shape[1]:
            raise ValueError(f"adapter of {layer!r} does not fit the base weight {tuple(w.shape)} "
                             f"(in {i}, out {o}): lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}")
        rank = ((config or {}).get("lora") or {}).get("rank", A.shape[0])
        if A.shape[0] != rank:
            raise ValueError(f"adapter of {layer!r} has rank {A.shape[0]}, the config says {rank}")
        xp = array_module(w)
        ab["lora_A"], ab["lora_B"] = xp.asarray(A, dtype=w.dtype), xp.asarray(B, dtype=w.dtype)
    return _rebuild(base, lambda n, d: {**d, **layers[n]} if n in layers else None)


def count_params(tree):
    return int(sum(int(a.size) for a in flatten(tree).values()))


def trainable_summary(params):
    """{"trainable": adapter parameter count, "total": all parameters (adapters included),
    "fraction": trainable / total} (peft's print_trainable_parameters convention)."""
    flat = flatten(params)
    names = adapter_names(params)
    trainable = sum(int(flat[n].size) for n in names)
    total = sum(int(a.size) for a in flat.values())
    return {"trainable": trainable, "total": total, "fraction": trainable / max(total, 1)}


def format_summary(params):
    s = trainable_summary(params)
    return (f"trainable params: {s['trainable']:,} of {s['total']:,} "
            f"({100 * s['fraction']:.3f}%)")


def adapter_grads(grads, params):
    """The adapter gradients {dotted name: array}; ValueError if the model produced none for some
    adapter (a targeted layer that does not go through layers.dense_forward)."""
    flat = flatten(grads)
    missing = sorted(n for n in adapter_names(params) if n not in flat)
    if missing:
        raise ValueError(f"no gradient for adapter(s) {missing[:4]}: these layers do not go "
                         "through layers.dense_forward")
    return {n: flat[n] for n in adapter_names(params)}


# --- merge / unmerge ------------------------------------------------------------------------------


def layout_of(name, config=None):
    """The storage layout of dense layer `name`: "in_out" for HF GPT-2 Conv1D modules (last name
    part c_attn, c_proj or c_fc), "out_in" (nn.Linear) for all others. config may override per
    layer name with config["dense_layouts"] = {name: layout}."""
    overrides = (config or {}).get("dense_layouts") or {}
    if name in overrides:
        return overrides[name]
    return "in_out" if name.rsplit(".", 1)[-1] in IN_OUT_NAMES else "out_in"


def _in_out(name, w, layout):
    if layout == "in_out":
        return w.shape[0], w.shape[1]
    if layout == "out_in":
        return w.shape[1], w.shape[0]
    raise ValueError(f"unknown dense layout {layout!r} for {name!r}")


def _fold(params, config, sign):
    if config.get("ternary"):
        raise ValueError("cannot merge a LoRA adapter into ternary weights: quantisation is not "
                         "linear, the merged model would differ from the adapter model")
    scale = scale_of(config)

    def fold(name, node):
        if "lora_A" not in node:
            return None
        w, A, B = node["weight"], node["lora_A"], node["lora_B"]
        delta = (B * scale) @ A                                          # (O, I)
        delta = delta.T if layout_of(name, config) == "in_out" else delta
        if delta.shape != w.shape:
            raise ValueError(f"merge: update of {name!r} has shape {delta.shape}, weight "
                             f"{w.shape}: wrong layout for this layer")
        out = {k: v for k, v in node.items() if k not in ADAPTER_KEYS}
        out["weight"] = (w + delta if sign > 0 else w - delta).astype(w.dtype, copy=False)
        return out

    return _rebuild(params, fold)


def merge(params, config):
    """-> plain params (no adapters): W + (alpha / r) B A in each adapted layer (transposed for
    in_out layers). The input is not modified."""
    if not adapter_names(params):
        raise ValueError("merge: the parameters hold no LoRA adapters")
    return _fold(params, config, +1)


def unmerge(merged, adapters, config):
    """Inverse of merge: W - (alpha / r) B A, adapters attached again (W equal to float tolerance)."""
    joined = join(merged, adapters, config)
    base = _fold(joined, config, -1)
    return join(base, adapters, config)
