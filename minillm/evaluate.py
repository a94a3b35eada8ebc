"""`minillm eval`: the loss of a checkpoint (or checkpoint + LoRA adapter) on a text file.

The file is encoded like training text (one document per line, each followed by <|endoftext|>) and cut
into consecutive windows of `context` + 1 tokens that overlap by one token, so every token after the
first is predicted exactly once, each window read from position 0 (the usual non-overlapping
evaluation; a sliding window would score long-range models higher). Reported: the mean loss in
nats/token, the perplexity exp(loss), and bits per byte of the text (each <|endoftext|> counted as the
newline it stands for), which compares across tokenizers.
"""

import math
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from minillm.nn import ops


@dataclass
class Evaluation:
    nats_per_token: float
    perplexity: float
    bits_per_byte: float
    tokens: int
    bytes: int

    def summary(self):
        return (f"{self.nats_per_token:.4f} nats/token, perplexity {self.perplexity:.2f}, "
                f"{self.bits_per_byte:.4f} bits/byte ({self.tokens} tokens, {self.bytes} bytes)")


def windows(ids, context):
    """ids: (N,) -> list of (x, y) int64 pairs, x = ids[s:s+T], y = ids[s+1:s+T+1], s = 0, T, 2T, ...
    (the last one shorter); every token but the first is a target once."""
    out = []
    for s in range(0, len(ids) - 1, context):
        e = min(s + context, len(ids) - 1)
        out.append((np.asarray(ids[s:e], dtype=np.int64), np.asarray(ids[s + 1:e + 1], dtype=np.int64)))
    return out


def loss_over(model, params, config, ids, batch_size=16, progress=True, xp=np):
    """Mean cross-entropy (nats/token) of the model over every target of `ids` (see windows)."""
    pairs = windows(ids, int(config["context"]))
    if not pairs:
        raise ValueError("the text encodes to fewer than two tokens: nothing to evaluate")
    total, count = 0.0, 0
    with tqdm(total=len(pairs), desc="eval", unit="window", disable=not progress, leave=False) as bar:
        for i in range(0, len(pairs), batch_size):
            group = pairs[i:i + batch_size]
            for length in sorted({len(x) for x, _ in group}):   # equal lengths batch together
                xs = [p for p in group if len(p[0]) == length]
                x = xp.asarray(np.stack([a for a, _ in xs]))
                y = xp.asarray(np.stack([b for _, b in xs]))
                logits, _ = model.forward(params, x, config)
                loss, _ = ops.cross_entropy_forward(logits, y)
                total += loss * y.size
                count += y.size
            bar.update(len(group))
    return total / count, count


def evaluate_file(checkpoint_dir, text_path, adapter=None, batch_size=16, progress=True, device="cpu"):
    """-> Evaluation of the checkpoint (with the adapter, if given) on the UTF-8 text file."""
    from minillm import checkpoint, data, models, train
    from minillm.device import array_module_for, to_device

    if adapter is None:
        ckpt = checkpoint.load_checkpoint(checkpoint_dir)
    else:
        from minillm.finetune import load_with_adapter

        ckpt = load_with_adapter(checkpoint_dir, adapter)
    tokenizer = checkpoint.load_tokenizer(ckpt)
    ids = data.load_tokens(text_path, tokenizer, ckpt.config.get("documents", "lines"), progress=progress)
    xp = array_module_for(device)
    params = to_device(ckpt.params, xp)
    nats, n = loss_over(models.get_model(ckpt.config["arch"]), params, ckpt.config, ids, batch_size, progress, xp)
    n_bytes = len(train.val_text_bytes(ids[1:], tokenizer))   # the bytes of the predicted tokens
    return Evaluation(nats, math.exp(min(nats, 700.0)), train.bits_per_byte(nats, n, n_bytes), n, n_bytes)
