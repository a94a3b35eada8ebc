"""Sparse Mixture-of-Experts feed-forward layer (Mixtral); models/gpt.py plugs it into GPT-2 blocks ("moe"),
models/llama.py into Llama blocks ("mixtral").

Layer (HF MixtralSparseMoeBlock), for tokens x: (N, C):

    logits = x Wg^T (N, E)   probs = softmax(logits)   idx = top-k experts of each token
    w[n, j] = probs[n, idx[n, j]] / sum_j' probs[n, idx[n, j']]        (renormalised top-k weights)
    y[n] = sum_j w[n, j] E_{idx[n, j]}(x[n]),    E_e(x) = W2_e (silu(W1_e x) * W3_e x)   (SwiGLU)

Tokens are gathered per expert (kernels/moe.py: a counting sort of the (token, slot) assignments),
each expert runs once on its contiguous block of rows (only chosen experts compute; an expert with
no token runs on zero rows), and the outputs are scatter-added back in a fixed order.

Top-k tie-break: among equal router probabilities the lowest expert index wins (a stable sort).
torch.topk does not define its order at ties, so comparisons with HF use inputs away from ties.
Top-k selection is piecewise constant: gradients reach the router only through the k weights (and
through the auxiliary losses below).

Auxiliary losses, per layer (their gradients are added by moe_backward itself):

    aux = E * sum_i f_i P_i      (Switch Transformer eq. 4; HF load_balancing_loss_func)
        f_i = (number of tokens that picked expert i among their top k) / N   (so sum_i f_i = k)
        P_i = mean_n probs[n, i]
    aux equals k at perfect balance (as HF's); f is piecewise constant, the gradient flows through P.
    z = mean_n logsumexp(logits_n)^2                (router z-loss, ST-MoE eq. 5; optional)

    aux_loss_of(cache) = aux_loss_coef * aux + router_z_loss_coef * z  (what the trainer adds)

HF differences: HF takes the router softmax (and the aux loss's probability means) in float32 even
for float64 inputs, so HF's routing weights are float32-accurate; HF computes aux once over all
layers' logits concatenated (E * sum_i mean_l f_il * mean_l P_il) where the "moe" model sums the
per-layer aux (as the Switch Transformer does); the two agree for one layer. The "mixtral" model uses
HF's pooled form (`pooled_balance_loss`, its gradient passed to moe_backward as extra_dprobs). Our default coefficient is 0.01
(Switch Transformer's alpha) rather than HF's 0.001: a stronger push for small models trained briefly.

Parameters (named like the released Mixtral checkpoints' `block_sparse_moe`): gate.weight (E, C),
experts.{e}.w1.weight (F, C), experts.{e}.w3.weight (F, C), experts.{e}.w2.weight (C, F).
transformers 5 fuses them on load into experts.gate_up_proj (E, 2F, C) = [w1; w3] per expert and
experts.down_proj (E, C, F) = w2 (see tests/test_moe.py). Expert linears go through
dense.dense_forward (LoRA / ternary hook); the router gate is a plain linear, never quantised.
"""

import math

import numpy as np

from minillm.nn import dense, ops
from minillm import kernels
from minillm.arrays import to_host

DEFAULTS = {
    "n_experts": 8,
    "top_k": 2,
    "d_ff": None,  # None: 4 * d_model
    "aux_loss_coef": 0.01,
    "router_z_loss_coef": 0.0,
}


def d_ff_of(config):
    """The experts' hidden width: config["d_ff"], or 4 * d_model when unset."""
    return int(config.get("d_ff") or 4 * config["d_model"])


def _top_k(probs, k, xp):
    """probs: (N, E) -> idx: (N, k), by decreasing probability; ties: lowest expert index first."""
    kw = {"kind": "stable"} if xp is np else {}  # cupy's argsort is always stable
    return xp.argsort(-probs, axis=-1, **kw)[:, :k].astype(xp.int64)


def init_ffn(config, rng, dtype=np.float32):
    """One layer's MoE parameters: N(0, 0.02), w2 scaled by 1/sqrt(2 n_layer) like GPT's residual
    projections. Sizes from config: d_model, d_ff (4 d_model when unset), n_experts."""
    C, F, E = int(config["d_model"]), d_ff_of(config), int(config.get("n_experts", DEFAULTS["n_experts"]))
    if E < 1:
        raise ValueError(f"n_experts must be positive, got {E}")
    std, std_out = 0.02, 0.02 / math.sqrt(2 * int(config.get("n_layer", 1)))

    def normal(shape, s):
        return (rng.standard_normal(shape) * s).astype(dtype)

    p = {"gate": {"weight": normal((E, C), std)}, "experts": {}}
    for e in range(E):
        p["experts"][str(e)] = {"w1": {"weight": normal((F, C), std)},
                                "w2": {"weight": normal((C, F), std_out)},
                                "w3": {"weight": normal((F, C), std)}}
    return p


def moe_init(config, rng):
    """init_ffn in config["dtype"] (float32 by default): the call gpt.ffn_init makes."""
    return init_ffn(config, rng, np.dtype(config.get("dtype", "float32")))


def _fusable(p, linear):
    """True when every expert is three plain float linears (no LoRA, ternary or packed weights): then w1 and
    w3 run as one product (_expert_forward_fused)."""
    if linear.ternary or linear.lora is not None:
        return False
    return all(set(pe[n]) == {"weight"} for pe in p["experts"].values() for n in ("w1", "w2", "w3"))


def _expert_forward_fused(xe, pe, K, xp, out):
    """One expert on its rows xe: (M, C), with w1 and w3 as one product (HF's gate_up_proj), computed
    transposed: h = [W1; W3] xe^T: (2F, M), a = silu(h1) * h3: (F, M), out[:] = a^T W2^T: (M, C).
    Every product here and in the backward is laid out so that its output has at least as many rows as
    columns: with NumPy's OpenBLAS the other orientation of the same product is up to 2.5x slower
    (benchmarks/moe.py). Returns the cache."""
    w13 = xp.concatenate([pe["w1"]["weight"], pe["w3"]["weight"]])  # (2F, C)
    w2 = pe["w2"]["weight"]                                          # (C, F)
    h = w13 @ xe.T
    a = K.swiglu_pair(h)
    xp.matmul(a.T, w2.T, out=out)
    return xe, w13, w2, h, a


def _expert_backward_fused(dye, cache, K, xp, out):
    """dye: (M, C) -> grads {"w1", "w2", "w3"} (each {"weight": ...}); out[:] = dx of the expert's rows."""
    xe, w13, w2, h, a = cache
    F = a.shape[0]
    da = w2.T @ dye.T                  # (F, M)
    dw2 = (a @ dye).T                  # (C, F)
    dh = K.swiglu_pair_backward(da, h)  # (2F, M) = [dh1; dh3]
    xp.matmul(dh.T, w13, out=out)      # dx = dh1^T W1 + dh3^T W3 in one product
    dw13 = dh @ xe                     # (2F, C)
    return {"w1": {"weight": dw13[:F]}, "w2": {"weight": dw2}, "w3": {"weight": dw13[F:]}}


def moe_forward(x, p, config):
    """x: (..., C) (e.g. (B, T, C) or (N, C)) -> y: same shape. Returns (y, cache)."""
    xp = ops.array_module(x)
    K = kernels.select("moe", x)
    C = x.shape[-1]
    x2 = x.reshape(-1, C)
    N = x2.shape[0]
    wg = p["gate"]["weight"]
    E = wg.shape[0]
    k = int(config.get("top_k", DEFAULTS["top_k"]))
    if N == 0:
        raise ValueError("moe: got no tokens")
    if not 1 <= k <= E:
        raise ValueError(f"top_k must lie in 1..n_experts ({E}), got {k}")
    if config.get("n_experts") not in (None, E) or len(p["experts"]) != E:
        raise ValueError(f"moe: the gate has {E} experts but config/params say "
                         f"{config.get('n_experts')}/{len(p['experts'])}")

    logits, gate_cache = ops.linear_forward(x2, wg.T)
    probs, softmax_cache = ops.softmax_forward(logits)
    idx = _top_k(probs, k, xp)
    top = xp.take_along_axis(probs, idx, axis=1)
    top_sum = top.sum(axis=1, keepdims=True)
    w = top / top_sum

    linear = dense.mode(config, "out_in")
    fused = _fusable(p, linear)
    xs, order, offsets, pos = K.dispatch(x2, idx, E)
    offs = [int(v) for v in to_host(offsets)]
    ys = xp.empty_like(xs)
    expert_caches = []
    for e in range(E):
        pe, rows = p["experts"][str(e)], slice(offs[e], offs[e + 1])
        if fused:
            expert_caches.append(_expert_forward_fused(xs[rows], pe, K, xp, out=ys[rows]))
            continue
        h1, c1 = dense.dense_forward(xs[rows], pe["w1"], linear)
        h3, c3 = dense.dense_forward(xs[rows], pe["w3"], linear)
        ye, c2 = dense.dense_forward(K.swiglu(h1, h3), pe["w2"], linear)
        ys[rows] = ye
        expert_caches.append((c1, c3, c2, h1, h3))
    y = K.combine(ys, pos, w)

    counts = to_host(offsets[1:] - offsets[:-1]).astype(np.int64)
    f = xp.asarray(counts / N, dtype=x.dtype)
    aux = E * float((f * probs.mean(axis=0)).sum())
    m = logits.max(axis=1, keepdims=True)
    lse = (m + xp.log(xp.exp(logits - m).sum(axis=1, keepdims=True)))[:, 0]
    z = float((lse * lse).mean())

    cache = dict(shape=x.shape, gate_cache=gate_cache, softmax_cache=softmax_cache, logits=logits,
                 probs=probs, idx=idx, w=w, top_sum=top_sum, ys=ys, pos=pos, offs=offs,
                 experts=expert_caches, fused=fused, counts=counts, f=f, lse=lse, aux=aux, z=z, n_experts=E,
                 aux_coef=float(config.get("aux_loss_coef", DEFAULTS["aux_loss_coef"])),
                 z_coef=float(config.get("router_z_loss_coef", DEFAULTS["router_z_loss_coef"])))
    return y.reshape(x.shape), cache


def moe_backward(dy, cache, extra_dprobs=None):
    """dy: like y -> (dx: like x, grads keyed like p). Includes the gradient of the layer's
    aux_loss_coef * aux + router_z_loss_coef * z, and `extra_dprobs` (broadcastable to (N, E)), a
    gradient on the router probabilities from outside the layer (a loss pooled over layers:
    pooled_balance_loss)."""
    xp = ops.array_module(dy)
    K = kernels.select("moe", dy)
    shape, offs, E = cache["shape"], cache["offs"], cache["n_experts"]
    C = shape[-1]
    dy2 = dy.reshape(-1, C)
    N = dy2.shape[0]
    probs, idx, w = cache["probs"], cache["idx"], cache["w"]

    dys, dw = K.combine_backward(dy2, cache["ys"], cache["pos"], w)
    dxs = xp.empty_like(dys)
    expert_grads = {}
    for e, expert_cache in enumerate(cache["experts"]):
        rows = slice(offs[e], offs[e + 1])
        if cache["fused"]:
            expert_grads[str(e)] = _expert_backward_fused(dys[rows], expert_cache, K, xp, out=dxs[rows])
            continue
        c1, c3, c2, h1, h3 = expert_cache
        da, g2 = dense.dense_backward(dys[rows], c2)
        dh1, dh3 = K.swiglu_backward(da, h1, h3)
        dx1, g1 = dense.dense_backward(dh1, c1)
        dx3, g3 = dense.dense_backward(dh3, c3)
        xp.add(dx1, dx3, out=dxs[rows])
        expert_grads[str(e)] = {"w1": g1, "w2": g2, "w3": g3}
    dx = K.combine(dxs, cache["pos"])  # backward of dispatch: sum over each token's k rows

    # renormalisation w_j = t_j / S:  dt_j = (dw_j - sum_l dw_l w_l) / S
    dtop = (dw - (dw * w).sum(axis=1, keepdims=True)) / cache["top_sum"]
    dprobs = xp.zeros_like(probs)
    dprobs[xp.arange(N)[:, None], idx] = dtop  # the k experts of a row are distinct
    if cache["aux_coef"]:
        # d(E sum_i f_i mean_n probs[n, i]) / d probs[n, i] = E f_i / N
        dprobs += (cache["aux_coef"] * E / N) * cache["f"]
    if extra_dprobs is not None:
        dprobs += extra_dprobs
    dlogits = ops.softmax_backward(dprobs, cache["softmax_cache"])
    if cache["z_coef"]:
        # d mean_n lse_n^2 / d logits[n, i] = 2 lse_n probs[n, i] / N
        dlogits += (cache["z_coef"] * 2.0 / N) * cache["lse"][:, None] * probs
    dxg, dwg, _ = ops.linear_backward(dlogits, cache["gate_cache"])
    dx += dxg
    return dx.reshape(shape), {"gate": {"weight": dwg.T}, "experts": expert_grads}


def aux_loss_of(cache):
    """The layer's term of the training loss: aux_loss_coef * aux + router_z_loss_coef * z."""
    return cache["aux_coef"] * cache["aux"] + cache["z_coef"] * cache["z"]


def stats_of(cache):
    """{"expert_tokens": (E,) int64 tokens routed to each expert (sums to N k), "balance_loss": aux
    without coefficient (k at perfect balance), "router_z_loss": z}; summable over dense."""
    return {"expert_tokens": cache["counts"].copy(), "balance_loss": cache["aux"],
            "router_z_loss": cache["z"]}


def pooled_balance_loss(caches):
    """HF's load_balancing_loss_func over several layers (their router logits concatenated), from the
    layers' caches: aux = E sum_i F_i P_i with F_i = sum_l count_li / (L N) and P_i = sum_l sum_n
    probs_l[n, i] / (L N) (the layers' f and P averaged, then multiplied). -> (aux: float,
    dprobs: (E,) d aux / d probs_l[n, i] = E F_i / (L N), the same for every layer and row; F is
    piecewise constant). For one layer this is the layer's own aux."""
    xp = ops.array_module(caches[0]["probs"])
    E, N, L = caches[0]["n_experts"], caches[0]["probs"].shape[0], len(caches)
    counts = sum(c["counts"] for c in caches)
    F = xp.asarray(counts / (L * N), dtype=caches[0]["probs"].dtype)
    P = sum(c["probs"].sum(axis=0) for c in caches) / (L * N)
    return E * float((F * P).sum()), (E / (L * N)) * F

