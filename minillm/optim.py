"""AdamW, global-norm gradient clipping and the warmup + cosine learning-rate schedule.

Pure functions on nested param dicts (see minillm.tree): parameters and gradients are updated in
place, the optimizer state is a plain dict

    state = {"step": int, "m": {name: array}, "v": {name: array}}

keyed by dotted parameter names, which is what checkpoint.py saves as optimizer.safetensors
(`m.<name>`, `v.<name>`, step in the metadata). Works unchanged on cupy arrays.
"""

import math

import numpy as np

from minillm import batch_parts, kernels
from minillm.arrays import array_module
from minillm.tree import flatten

# Name fragments that mark a tensor as "not a dense layer matrix" (never decayed): token and
# position embeddings (GPT-2 wte/wpe, HF *embeddings / embed_tokens), the LM head (tied to the
# embedding in GPT-2, and not a dense layer in our design either), and Mamba's A_log, which the
# reference implementation (mamba_ssm) marks `_no_weight_decay`.
NO_DECAY_NAMES = ("wte", "wpe", "embeddings", "embed", "lm_head", "A_log")
PARALLEL_GROUPS = 2       # AdamW updates the tensors in this many groups side by side (where batch_parts may)


def decay_mask(flat_params, no_decay=NO_DECAY_NAMES):
    """{name: array} -> {name: bool}: which parameters get decoupled weight decay.

    The rule (nanoGPT's, made explicit): decay a tensor iff it is a dense-layer matrix, i.e.
      * it has at least two dimensions of size > 1 (so biases, norm weights, and vectors stored
        with singleton axes such as RWKV's time_mix_* of shape (1, 1, C) are never decayed), and
      * its last name part is not "bias", and
      * its dotted name contains none of `no_decay` (embeddings "wte", "wpe", "embeddings",
        "embed", the "lm_head", Mamba's "A_log").
    Dense matrices of every block (attention/MLP/expert/router/projection weights, conv kernels,
    LoRA's lora_A / lora_B) are decayed.
    """
    mask = {}
    for name, p in flat_params.items():
        big_dims = sum(1 for d in p.shape if d > 1)
        mask[name] = (big_dims >= 2 and name.rsplit(".", 1)[-1] != "bias"
                      and not any(frag in name for frag in no_decay))
    return mask


def trainable_predicate(trainable):
    """Turn None / a collection of names / a predicate into a predicate on names."""
    if trainable is None:
        return lambda name: True
    if callable(trainable):
        return trainable
    names = set(trainable)
    return lambda name: name in names


def adamw_init(params, trainable=None):
    """Zero first and second moments for every trainable parameter; step 0.

    params: nested dict of arrays. trainable: None (all), a set of dotted names, or a predicate
    name -> bool; frozen parameters get no m/v at all.
    """
    keep = trainable_predicate(trainable)
    flat = flatten(params)
    m, v = {}, {}
    for name, p in flat.items():
        if keep(name):
            xp = array_module(p)
            m[name] = xp.zeros_like(p)
            v[name] = xp.zeros_like(p)
    return {"step": 0, "m": m, "v": v}


def adamw_step(params, grads, state, lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
               mask=None, trainable=None):
    """One AdamW update of `params` in place (torch.optim.AdamW semantics, amsgrad off).

    For every trainable parameter p with gradient g, at step t = state["step"] + 1:
        p <- p * (1 - lr * weight_decay)          only where mask[name] (decoupled decay)
        m <- m + (1 - b1) (g - m)                  (torch's lerp)
        v <- b2 v + (1 - b2) g^2
        p <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    The operations follow torch's single-tensor path one for one; torch's CPU kernels fuse some
    multiply-adds (FMA), so float64 results agree to a few ulps rather than bit for bit. mask: {name: bool} (default `decay_mask(params)`);
    trainable: as in `adamw_init`, default: the parameters that have moments in `state`; frozen
    parameters are not touched (bit-identical) and need no gradient. grads: nested like params (extra gradients for frozen params are ignored).
    state is updated in place (m, v, step). Raises ValueError on a missing gradient or moment
    and on shape mismatches.
    """
    b1, b2 = betas
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"AdamW betas must be in [0, 1), got {betas}")
    if lr < 0 or eps < 0 or weight_decay < 0:
        raise ValueError(f"AdamW lr, eps and weight_decay must be >= 0, got lr={lr}, eps={eps}, "
                         f"weight_decay={weight_decay}")
    flat_p = flatten(params)
    flat_g = flatten(grads)
    if mask is None:
        mask = decay_mask(flat_p)
    stray = [n for n in state["m"] if n not in flat_p]
    if stray:
        raise ValueError(f"optimizer state has moments for unknown parameters: {stray[:3]}")
    if trainable is None:     # the parameters adamw_init set up
        names = [n for n in flat_p if n in state["m"]]
    else:
        keep = trainable_predicate(trainable)
        names = [n for n in flat_p if keep(n)]
    # Check everything before touching anything, so a bad call leaves params and state intact.
    for name in names:
        p = flat_p[name]
        if name not in flat_g:
            raise ValueError(f"no gradient for trainable parameter {name!r}")
        if name not in state["m"] or name not in state["v"]:
            raise ValueError(f"no optimizer state for parameter {name!r} (was adamw_init called "
                             "with the same trainable set?)")
        for what, a in (("gradient", flat_g[name]), ("m", state["m"][name]),
                        ("v", state["v"][name])):
            if a.shape != p.shape:
                raise ValueError(f"{what} of {name!r} has shape {a.shape}, parameter has "
                                 f"{p.shape}")

    step = state["step"] + 1
    bias_correction1 = 1.0 - b1 ** step
    bias_correction2_sqrt = math.sqrt(1.0 - b2 ** step)
    step_size = lr / bias_correction1

    def update(group):
        for name in group:
            p, g = flat_p[name], flat_g[name]
            m, v = state["m"][name], state["v"][name]
            decayed = weight_decay != 0.0 and mask.get(name, False)
            kernels.pick("adamw", "update", p)(p, g, m, v, 1.0 - lr * weight_decay if decayed else 1.0, b1, b2,
                                                step_size, bias_correction2_sqrt, eps)

    # Each tensor's update is elementwise, so splitting the tensors over threads changes no bits.
    side_by_side = batch_parts.independent(PARALLEL_GROUPS, {}, flat_p[names[0]]) if names else 1
    groups = batch_parts.balanced(names, [flat_p[n].size for n in names], side_by_side)
    batch_parts.run(update, [(group,) for group in groups])
    state["step"] = step


def clip_grad_norm(grads, max_norm):
    """Scale all gradients in place so their global L2 norm is at most max_norm.

    Same formula as torch.nn.utils.clip_grad_norm_: total = ||(||g_1||, ..., ||g_n||)||_2,
    coef = max_norm / (total + 1e-6), gradients multiplied by min(coef, 1). Returns the total norm
    before clipping as a Python float (inf/nan when a gradient is non-finite: as in torch the
    gradients are then scaled by nan, so check the returned norm before stepping).
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    flat = flatten(grads)
    xp = array_module(next(iter(flat.values()))) if flat else np
    sq = 0.0 if xp is np else xp.zeros((), np.float64)  # on a GPU: summed there, one transfer
    for g in flat.values():
        n = xp.linalg.norm(g.reshape(-1))
        n = float(n) if xp is np else n.astype(np.float64)
        sq += n * n
    total = math.sqrt(float(sq))
    coef = max_norm / (total + 1e-6)
    if not coef < 1.0:        # multiplying by the clamped 1.0 is exact: skip it (nan falls through)
        return total
    with np.errstate(invalid="ignore"):   # inf * 0 -> nan, as in torch
        for g in flat.values():
            g *= coef
    return total


def lr_at(step, max_lr, warmup_steps, total_steps, min_lr_ratio=0.1):
    """Learning rate for 0-based `step`: linear warmup, then cosine decay to min_lr_ratio * max_lr.

        step < warmup_steps:             max_lr * (step + 1) / warmup_steps  (first step > 0,
                                         step warmup_steps - 1 reaches max_lr)
        warmup_steps <= step < total:    min + (max - min) * (1 + cos(pi * r)) / 2,
                                         r = (step - warmup_steps) / (total_steps - warmup_steps)
        step >= total_steps:             min_lr
    """
    if step < 0 or warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"lr_at needs step >= 0, warmup_steps >= 0, total_steps >= 1; got "
                         f"step={step}, warmup_steps={warmup_steps}, total_steps={total_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if max_lr < 0:
        raise ValueError(f"max_lr must be >= 0, got {max_lr}")
    min_lr = max_lr * min_lr_ratio
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    ratio = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)
