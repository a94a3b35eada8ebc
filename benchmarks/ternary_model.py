"""A ternary GPT next to its float32 twin: checkpoint size and sampling tokens/s, same run.

    python benchmarks/ternary_model.py [--d-model 512] [--layers 6] [--vocab 2048] [--tokens 128] [--repeats 3]

Three models with the same shapes and the same random latent weights: float32 (plain linears), ternary
(BitLinear on the latent weights, as trained with --ternary) and packed (what `minillm quantize` writes:
2 bits per weight, the Numba kernel on the packed bytes). Sampling is greedy, batch 1, one token per
`gpt.step` with the KV cache; the models' runs alternate, and the tokens/s of the median run is printed
with the ratio to float32.
Sizes are those of model.safetensors written by checkpoint.save_checkpoint.
"""

import argparse
import os
import tempfile

import harness  # first: puts the checkout and tests/ on sys.path
import numpy as np

from minillm import checkpoint, generate, models, quantize
from minillm.models import gpt


def sampler(params, config, n_tokens):
    """Greedy sampling of n_tokens tokens, batch 1, one `gpt.step` per token."""
    return lambda: generate.generate(gpt, params, config, [[0]], n_tokens, None, temperature=0)


def file_size(params, config):
    with tempfile.TemporaryDirectory() as d:
        checkpoint.save_checkpoint(d, params, config)
        return os.path.getsize(os.path.join(d, "model.safetensors"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    config = models.build_config("gpt", d_model=a.d_model, n_layer=a.layers, n_head=8, vocab_size=a.vocab,
                                 context=a.tokens + 1)
    params = gpt.init(config, np.random.default_rng(0))
    ternary_config = dict(config, ternary=True)
    contestants = {
        "float32": (params, config),
        "ternary (latent weights)": (params, ternary_config),
        "packed 2-bit": (quantize.pack_params(params, ternary_config), dict(ternary_config, packed=True)),
    }
    print(f"GPT d_model {a.d_model}, {a.layers} layers, vocab {a.vocab}; greedy, batch 1, {a.tokens} tokens; "
          f"load average {os.getloadavg()[0]:.1f}")
    for p, c in contestants.values():
        sampler(p, c, 4)()  # compile / warm up
    sizes = [file_size(p, c) for p, c in contestants.values()]
    # the three models' runs alternate; median seconds per run -> tokens/s
    speeds = [a.tokens / t for t in harness.medians([sampler(p, c, a.tokens) for p, c in contestants.values()],
                                                    a.repeats, warmup=0)]
    harness.table(["model", "model.safetensors", "size ratio", "tokens/s", "speed ratio"],
                  [(name, f"{size / 1e6:.2f} MB", f"{sizes[0] / size:.1f}x", f"{speed:.0f}", f"{speed / speeds[0]:.2f}x")
                   for name, size, speed in zip(contestants, sizes, speeds)])


if __name__ == "__main__":
    main()
