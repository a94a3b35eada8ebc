"""Sampling: temperature, top-k, top-p, seeded; prompts are fed through the model's `step` (prefill),
then one token at a time from its recurrent state (KV cache for attention, O(1) state for Mamba/RWKV).

Order of the logit filters is HF's: temperature, then top-k, then top-p. Top-k keeps every token whose
logit ties the k-th largest (as HF's TopKLogitsWarper), so ties at the boundary can keep more than k.
Top-p keeps the smallest set of most likely tokens whose probability reaches p (at least one).
Temperature 0 means greedy (argmax; ties go to the lowest id); so does `minillm sample --greedy`.
"""

import unicodedata

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


def _prefill(model, params, config, tokens, xp):
    """tokens: (B, L), L >= 1 -> (logits of the last position: (B, V), state after them)."""
    state = model.init_state(params, config, tokens.shape[0])
    for t in range(tokens.shape[1]):
        logits, state = model.step(params, xp.asarray(tokens[:, t]), state)
    return logits, state


def generate(model, params, config, prompts, max_new_tokens, rng, stop_id=None,
             temperature=1.0, top_k=None, top_p=None, on_token=None):
    """prompts: list of equal-length token lists (B rows, at least one token each) -> list of B lists of
    new tokens, each cut at (and excluding) `stop_id` (one id or a collection of ids). on_token(row, token)
    is called for each kept token.

    A model with learned positions (BOUNDED_POSITIONS: GPT) sees at most `context` tokens: a longer prompt
    is cut to its last `context` tokens, and when the window is full the last context // 2 tokens are read
    again from position 0 and generation goes on (nanoGPT crops the same way, but re-reads the window for
    every token; re-reading half of it keeps the KV cache and costs about one extra step per token). Each
    new token then sees between context // 2 and context - 1 earlier tokens.
    """
    batch = len(prompts)
    stops = set() if stop_id is None else {int(stop_id)} if np.isscalar(stop_id) else {int(s) for s in stop_id}
    prompt = np.asarray(prompts, dtype=np.int64)
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError("generate needs a batch of non-empty prompts of equal length")
    window = int(config["context"]) if getattr(model, "BOUNDED_POSITIONS", False) else None
    leaves = list(flatten(params).values()) if isinstance(params, dict) else []
    xp = ops.array_module(leaves[0]) if leaves else np  # the tokens go where the params are
    seq = prompt[:, -window:] if window else prompt
    logits, state = _prefill(model, params, config, seq, xp)
    pos = seq.shape[1]
    out = [[] for _ in range(batch)]
    done = np.zeros(batch, dtype=bool)
    for _ in range(max_new_tokens):
        tokens = sample_next(to_host(logits), rng, temperature, top_k, top_p)
        for i in np.flatnonzero(~done):
            if int(tokens[i]) in stops:
                done[i] = True
            else:
                out[i].append(int(tokens[i]))
                if on_token is not None:
                    on_token(int(i), int(tokens[i]))
        if done.all():
            break
        if window and pos == window:          # the window is full: slide it
            seq = np.concatenate([seq, tokens[:, None]], axis=1)[:, -max(1, window // 2):]
            logits, state = _prefill(model, params, config, seq, xp)
            pos = seq.shape[1]
            continue
        if window:
            seq = np.concatenate([seq, tokens[:, None]], axis=1)
        logits, state = model.step(params, xp.asarray(tokens), state)
        pos += 1
    return out


def escape_controls(text):
    """Control characters (newlines, tabs, escape sequences, ...) as visible escapes: a sample stays one
    line and cannot move the terminal's cursor."""
    return "".join(ch if unicodedata.category(ch) != "Cc" else
                   {"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(ch, f"\\x{ord(ch):02x}") for ch in text)


class _Streamer:
    """Prints one sample's text as its tokens come, holding back a trailing incomplete UTF-8 character."""

    def __init__(self, tokenizer, prompt, write):
        self.tokenizer, self.ids, self.shown, self.write = tokenizer, [], 0, write
        write(escape_controls(prompt))

    def __call__(self, row, token):
        self.ids.append(token)
        self._show(self.tokenizer.decode(self.ids).rstrip("\ufffd"))

    def finish(self):
        """The rest, once the sample is done (an incomplete character there stays U+FFFD)."""
        self._show(self.tokenizer.decode(self.ids))

    def _show(self, text):
        if len(text) > self.shown:
            self.write(escape_controls(text[self.shown:]))
            self.shown = len(text)


def sample_lines(checkpoint_dir, num, prompt="", max_tokens=64, temperature=0.8, top_k=None, top_p=None,
                 seed=0, adapter=None, device="cpu", stream=None):
    """Load a checkpoint (and optionally a LoRA adapter for it) and return `num` samples as text lines,
    each starting with `prompt`.

    Every sample starts from <|endoftext|> (a document boundary) followed by the prompt's tokens, and stops
    at the next <|endoftext|>, after `max_tokens` new tokens, or, for a model trained on one document per
    line (config "documents" = "lines", the default), at the first token that holds a newline. Control
    characters are shown escaped (escape_controls), so each sample is one line. stream(text): called with
    the text of a single sample (num == 1) as it is generated.
    """
    from minillm import checkpoint, models, validate
    from minillm.device import array_module_for, to_device
    if adapter is None:
        ckpt = checkpoint.load_checkpoint(checkpoint_dir)
    else:
        from minillm.finetune import load_with_adapter

        ckpt = load_with_adapter(checkpoint_dir, adapter)
    tokenizer = checkpoint.load_tokenizer(ckpt)
    c = ckpt.config
    validate.check_memory(8 * num * (2 * c["vocab_size"] + 2 * c["n_layer"] * c["d_model"] * (c["context"] + 1)),
                          f"sampling -n {num}")
    model = models.get_model(ckpt.config["arch"])
    params = to_device(ckpt.params, array_module_for(device))
    start = [tokenizer.eot_id] + tokenizer.encode(prompt)
    stops = {tokenizer.eot_id}
    if ckpt.config.get("documents", "lines") == "lines":      # a newline ends a document, like <|endoftext|>
        stops |= {i for i in range(tokenizer.vocab_size) if b"\n" in tokenizer.decode_bytes([i])}
    if stream is not None and num != 1:
        raise ValueError("streaming prints one sample: use -n 1")
    on_token = None if stream is None else _Streamer(tokenizer, prompt, stream)
    rng = np.random.default_rng(seed)
    new = generate(model, params, ckpt.config, [start] * num, max_tokens, rng, stops,
                   temperature, top_k, top_p, on_token=on_token)
    if on_token is not None:
        on_token.finish()
    return [escape_controls(prompt + tokenizer.decode(ids)) for ids in new]
