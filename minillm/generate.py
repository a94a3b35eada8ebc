"""Sampling: temperature, top-k, top-p, seeded; prompts are fed through the model's `step` (prefill),
then one token at a time from its recurrent state (KV cache for attention, O(1) state for Mamba/RWKV).

Order of the logit filters is HF's: temperature, then top-k, then top-p. Top-k keeps every token whose
logit ties the k-th largest (as HF's TopKLogitsWarper), so ties at the boundary can keep more than k.
Top-p keeps the smallest set of most likely tokens whose probability reaches p (at least one).
Temperature 0 means greedy (argmax; ties go to the lowest id).
"""

import numpy as np

from minillm.nn import ops
from minillm.device import to_host
from minillm.tree import flatten


def filter_logits(logits, temperature=1.0, top_k=None, top_p=None):
    """logits: (B, V) -> log-probabilities (B, V) after the filters, -inf where removed."""
    z = logits.astype(np.float64) / temperature
    if top_k is not None and 0 < top_k < z.shape[-1]:
        kth = np.partition(z, -top_k, axis=-1)[:, -top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    logp = ops.log_softmax(z)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-logp, axis=-1, kind="stable")
        sorted_p = np.exp(np.take_along_axis(logp, order, axis=-1))
        before = np.cumsum(sorted_p, axis=-1) - sorted_p  # mass of the strictly more likely tokens
        drop_sorted = before >= top_p
        drop_sorted[:, 0] = False
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        logp = ops.log_softmax(np.where(drop, -np.inf, logp))
    return logp


def sample_next(logits, rng, temperature=1.0, top_k=None, top_p=None):
    """logits: (B, V) -> tokens: (B,) int64, one uniform draw per row (inverse CDF)."""
    if temperature == 0:
        return np.argmax(logits, axis=-1).astype(np.int64)
    p = np.exp(filter_logits(logits, temperature, top_k, top_p))
    cdf = np.cumsum(p, axis=-1)
    u = rng.random(len(p)) * cdf[:, -1]
    tokens = (cdf < u[:, None]).sum(axis=-1)
    return np.minimum(tokens, p.shape[-1] - 1).astype(np.int64)


def generate(model, params, config, prompts, max_new_tokens, rng, stop_id=None,
             temperature=1.0, top_k=None, top_p=None):
    """prompts: list of equal-length token lists (B rows, at least one token each) -> list of B lists of
    new tokens, each cut at (and excluding) `stop_id`."""
    batch = len(prompts)
    prompt = np.asarray(prompts, dtype=np.int64)
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError("generate needs a batch of non-empty prompts of equal length")
    if getattr(model, "BOUNDED_POSITIONS", False):
        room = config["context"] - prompt.shape[1]
        if room < 1:
            raise ValueError(f"the prompt is {prompt.shape[1]} tokens; this model's context is {config['context']}")
        max_new_tokens = min(max_new_tokens, room)
    leaves = list(flatten(params).values()) if isinstance(params, dict) else []
    xp = ops.array_module(leaves[0]) if leaves else np  # the tokens go where the params are
    state = model.init_state(params, config, batch)
    for t in range(prompt.shape[1]):
        logits, state = model.step(params, xp.asarray(prompt[:, t]), state)
    out = [[] for _ in range(batch)]
    done = np.zeros(batch, dtype=bool)
    for _ in range(max_new_tokens):
        tokens = sample_next(to_host(logits), rng, temperature, top_k, top_p)
        for i in np.flatnonzero(~done):
            if stop_id is not None and tokens[i] == stop_id:
                done[i] = True
            else:
                out[i].append(int(tokens[i]))
        if done.all():
            break
        logits, state = model.step(params, xp.asarray(tokens), state)
    return out


def sample_lines(checkpoint_dir, num, prompt="", max_tokens=64, temperature=0.8, top_k=None, top_p=None,
                 seed=0, adapter=None, device="cpu"):
    """Load a checkpoint (and optionally a LoRA adapter for it) and return `num` samples as text lines,
    each starting with `prompt`.

    Every sample starts from <|endoftext|> (a document boundary) followed by the prompt's tokens,
    and stops at the next <|endoftext|> or after `max_tokens` new tokens.
    """
    from minillm import checkpoint, models
    from minillm.device import array_module_for, to_device
    from minillm.char_tokenizer import load_tokenizer

    if adapter is None:
        ckpt = checkpoint.load_checkpoint(checkpoint_dir)
    else:
        from minillm.finetune import load_with_adapter

        ckpt = load_with_adapter(checkpoint_dir, adapter)
    tokenizer = load_tokenizer(ckpt.tokenizer_path)
    model = models.get_model(ckpt.config["arch"])
    params = to_device(ckpt.params, array_module_for(device))
    start = [tokenizer.eot_id] + tokenizer.encode(prompt)
    rng = np.random.default_rng(seed)
    new = generate(model, params, ckpt.config, [start] * num, max_tokens, rng, tokenizer.eot_id,
                   temperature, top_k, top_p)
    # One sample per line: a line break inside a sample (possible from an undertrained model) becomes a space.
    return [" ".join((prompt + tokenizer.decode(ids)).splitlines()) for ids in new]
