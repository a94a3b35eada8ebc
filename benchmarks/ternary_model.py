"""A ternary GPT next to its float32 twin: checkpoint size and sampling tokens/s, same run.

    python benchmarks/ternary_model.py [--d-model 512] [--layers 6] [--vocab 2048] [--tokens 128] [--repeats 3]

Three models with the same shapes and the same random latent weights: float32 (plain linears), ternary
(BitLinear on the latent weights, as trained with --ternary) and packed (what `minillm quantize` writes:
2 bits per weight, the Numba kernel on the packed bytes). Sampling is greedy, batch 1, one token per
`gpt.step` with the KV cache; the median tokens/s of the repeats is printed with the ratio to float32.
Sizes are those of model.safetensors written by checkpoint.save_checkpoint.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minillm import checkpoint, generate, models, quantize  # noqa: E402
from minillm.models import gpt


def tokens_per_second(params, config, n_tokens, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        generate.generate(gpt, params, config, [[0]], n_tokens, None, temperature=0)
        times.append(time.perf_counter() - start)
    return n_tokens / float(np.median(times))


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
    print(f"{'model':26s} {'model.safetensors':>18s} {'size ratio':>10s} {'tokens/s':>9s} {'speed ratio':>11s}")
    base_size = base_speed = None
    for name, (p, c) in contestants.items():
        tokens_per_second(p, c, 4, 1)  # compile / warm up
        size, speed = file_size(p, c), tokens_per_second(p, c, a.tokens, a.repeats)
        base_size, base_speed = base_size or size, base_speed or speed
        print(f"{name:26s} {size / 1e6:15.2f} MB {base_size / size:9.1f}x {speed:9.0f} {speed / base_speed:10.2f}x")


if __name__ == "__main__":
    main()
