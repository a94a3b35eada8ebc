"""A ternary GPT next to its float32 twin: training step time, checkpoint size and sampling tokens/s, same run.

    python benchmarks/ternary_model.py [--d-model 512] [--layers 6] [--vocab 2048] [--tokens 128] [--repeats 3]
                                       [--batch 8] [--context 128] [--train-repeats 7] [--skip-sampling]

Training: one full step (forward, cross-entropy, backward, AdamW) of the float32 model and of the same
model with --ternary (BitLinear in every block linear, quantised afresh each step), and the ternary step
with the NumPy quantisers (kernels.forced("reference") for the "ternary_quant" op: what training ran
before the fused Numba kernels). The three alternate; medians of --train-repeats, the ratio to float32
and the MFU (6N + 12LdT FLOPs per token over the float32 GEMM FLOP/s measured in the same run).
Then the block's four linears alone, forward + backward, the same three ways (many short repeats: the
figure to trust on a busy machine).

Three models with the same shapes and the same random latent weights: float32 (plain linears), ternary
(BitLinear on the latent weights, as trained with --ternary) and packed (what `minillm quantize` writes:
2 bits per weight, the Numba kernel on the packed bytes). Sampling is greedy, batch 1, one token per
`gpt.step` with the KV cache; the models' runs alternate, and the tokens/s of the median run is printed
with the ratio to float32.
Sizes are those of model.safetensors written by checkpoint.save_checkpoint. Sampling is memory-bound: the
last column is the weight bytes a token streams (the file minus the position table) per second, as a
fraction of the copy bandwidth measured in the same run.
"""

import argparse
import os
import platform
import tempfile

import harness  # first: puts the checkout and tests/ on sys.path
import numpy as np

from minillm import checkpoint, generate, kernels, models, optim, quantize
from minillm.models import gpt
from minillm.nn import ops
from minillm.tree import flatten


def sampler(params, config, n_tokens):
    """Greedy sampling of n_tokens tokens, batch 1, one `gpt.step` per token."""
    return lambda: generate.generate(gpt, params, config, [[0]], n_tokens, None, temperature=0)


def train_step(params, config, x, y, state):
    """One training step as `minillm train` runs it (the batch in parts side by side, minillm.batch_parts):
    forward, cross-entropy, backward, AdamW (float32, updates params in place)."""
    def step():
        harness.minillm_step(gpt, params, config, x, y, state, 3e-4, (0.9, 0.95), 1e-8, 0.1)
    return step


def with_reference_quantisers(fn):
    def run():
        with kernels.forced("reference", ops=("ternary_quant",)):
            fn()
    return run


def bench_training(config, a):
    """float32 vs ternary training steps (own params copies: AdamW updates them), interleaved medians."""
    rng = np.random.default_rng(1)
    data = rng.integers(0, config["vocab_size"], (a.batch, a.context + 1))
    x, y = data[:, :-1], data[:, 1:]
    steps = {}
    for name, ternary in (("float32", False), ("ternary (fused kernels)", True), ("ternary (NumPy quantisers)", True)):
        p = gpt.init(config, np.random.default_rng(0))
        c = dict(config, ternary=True) if ternary else config
        fn = train_step(p, c, x, y, optim.adamw_init(p))
        steps[name] = with_reference_quantisers(fn) if "NumPy" in name else fn
    times = harness.medians(list(steps.values()), a.train_repeats, warmup=2)
    n_params = sum(v.size for n, v in flatten(gpt.init(config, np.random.default_rng(0))).items() if "wpe" not in n)
    per_token = harness.gpt_flops_per_token(n_params, config["n_layer"], config["d_model"], a.context)
    tokens = x.size
    print(f"\ntraining step: B={a.batch} T={a.context}, AdamW; median of {a.train_repeats} (interleaved); "
          f"6N + 12LdT = {per_token / 1e6:.1f} MFLOP/token")
    print(f"  {harness.limits_line()}")
    harness.table(["step", "s/step", "tokens/s", "MFU", "time / float32"],
                  [(name, f"{t:.3f}", f"{tokens / t:.0f}", f"{harness.mfu(tokens / t, per_token):.3f}",
                    f"{t / times[0]:.3f}x") for name, t in zip(steps, times)], indent="  ")


def bench_layers(config, a):
    """The block's four linears alone (forward + backward on B T tokens): plain linear vs BitLinear with the
    fused kernels and with the NumPy quantisers; many short interleaved repeats, so steadier than the step."""
    from minillm.nn import ternary

    d, n = config["d_model"], a.batch * a.context
    rng = np.random.default_rng(2)
    x = {i: rng.standard_normal((n, i)).astype(np.float32) for i in (d, 4 * d)}
    rows, total = [], np.zeros(3)
    for name, (i, o) in (("attn.c_attn", (d, 3 * d)), ("attn.c_proj", (d, d)), ("mlp.c_fc", (d, 4 * d)),
                         ("mlp.c_proj", (4 * d, d))):
        w = (rng.standard_normal((i, o)) * 0.02).astype(np.float32)
        b = np.zeros(o, np.float32)
        dy = rng.standard_normal((n, o)).astype(np.float32)

        def plain(w=w, b=b, dy=dy, xi=x[i]):
            ops.linear_backward(dy, ops.linear_forward(xi, w, b)[1])

        def bit(w=w, b=b, dy=dy, xi=x[i]):
            ternary.bitlinear_backward(dy, ternary.bitlinear_forward(xi, w, b, layout="in_out")[1])

        t = np.array(harness.medians([plain, bit, with_reference_quantisers(bit)], a.layer_repeats, warmup=2))
        total += t
        rows.append((f"{name} ({i} x {o})", *(f"{1e3 * v:.2f}" for v in t),
                     f"{t[1] / t[0]:.3f}x", f"{t[2] / t[0]:.3f}x"))
    rows.append(("all four", *(f"{1e3 * v:.2f}" for v in total), f"{total[1] / total[0]:.3f}x",
                 f"{total[2] / total[0]:.3f}x"))
    harness.table(["layer, fwd+bwd", "linear ms", "fused ms", "NumPy quant. ms", "fused / linear", "NumPy / linear"],
                  rows, title=f"\nblock linears alone, {n} tokens, float32; median of {a.layer_repeats} (interleaved)",
                  indent="  ")


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
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--train-repeats", type=int, default=7)
    ap.add_argument("--layer-repeats", type=int, default=41)
    ap.add_argument("--skip-sampling", action="store_true")
    a = ap.parse_args()
    config = models.build_config("gpt", d_model=a.d_model, n_layer=a.layers, n_head=8, vocab_size=a.vocab,
                                 context=max(a.tokens + 1, a.context))
    print(f"GPT d_model {a.d_model}, {a.layers} layers, vocab {a.vocab}, float32; load average "
          f"{os.getloadavg()[0]:.1f}; {platform.processor() or platform.machine()}")
    bench_training(config, a)
    bench_layers(config, a)
    if a.skip_sampling:
        return
    params = gpt.init(config, np.random.default_rng(0))
    ternary_config = dict(config, ternary=True)
    contestants = {
        "float32": (params, config),
        "ternary (latent weights)": (params, ternary_config),
        "packed 2-bit": (quantize.pack_params(params, ternary_config), dict(ternary_config, packed=True)),
    }
    print(f"\nsampling: greedy, batch 1, {a.tokens} tokens; median of {a.repeats} (interleaved)")
    for p, c in contestants.values():
        sampler(p, c, 4)()  # compile / warm up
    sizes = [file_size(p, c) for p, c in contestants.values()]
    # the three models' runs alternate; median seconds per run -> tokens/s
    speeds = [a.tokens / t for t in harness.medians([sampler(p, c, a.tokens) for p, c in contestants.values()],
                                                    a.repeats, warmup=0)]
    wpe = sum(v.nbytes for n, v in flatten(params).items() if "wpe" in n)
    harness.table(["model", "model.safetensors", "size ratio", "tokens/s", "speed ratio", "of copy bw"],
                  [(name, f"{size / 1e6:.2f} MB", f"{sizes[0] / size:.1f}x", f"{speed:.0f}",
                    f"{speed / speeds[0]:.2f}x",
                    f"{(size - wpe) * speed / harness.copy_bandwidth():.3f}")
                   for name, size, speed in zip(contestants, sizes, speeds)], indent="  ")


if __name__ == "__main__":
    main()
