"""The memory-bound kernels of a GPT step on the CPU: minillm's Numba kernels against torch's CPU ops, with the
fraction of the machine's copy bandwidth each reaches.

    python benchmarks/cpu_kernels.py [--repeats 20] [--only small|shakespeare]

Per config (the activation shapes of benchmarks/train_gpt.py's training step), float32, interleaved medians:
- causal softmax forward (in place) and backward, scores (B, H, T, T): against torch.softmax of the scores
  masked with -inf (the eager-attention path) and torch's softmax backward (torch._softmax_backward_data);
- LayerNorm forward and backward, (B*T, C): against F.layer_norm and its autograd backward;
- GELU (tanh form) forward and backward, (B*T, 4C): against F.gelu(approximate="tanh") and its backward;
- cross-entropy forward and backward, logits (B*T, V): against F.cross_entropy and its backward.
Bytes counted per call are the arrays a kernel must read and write at least once (each counted once,
e.g. the causal softmax forward reads and writes (B, H, T, T) once: 2 x 4 bytes per score), so
"of copy" = bytes / time / copy bandwidth (harness.copy_bandwidth: read + write of a large copy).
minillm's in-place softmax kernels are timed with the copy that restores their input; so that both sides
pay one copy of the scores, torch's forward includes its masked_fill and its backward a clone of dp.
"""

import argparse

import harness  # first: puts the checkout and tests/ on sys.path
import numpy as np
import torch
import torch.nn.functional as F

from minillm.kernels import gelu, layernorm, softmax

CONFIGS = {
    "small": dict(B=32, T=64, C=128, H=4, V=512),
    "shakespeare": dict(B=16, T=256, C=384, H=6, V=65),
    "default": dict(B=32, T=64, C=128, H=4, V=2048),
}


def cases(B, T, C, H, V):
    """-> [(name, bytes moved, minillm fn, torch fn)] for one config."""
    rng = np.random.default_rng(0)
    f32 = np.float32
    scores = (rng.standard_normal((B, H, T, T)) * 3).astype(f32)
    causal = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    prob = softmax.causal(scores.copy())
    dprob = rng.standard_normal(scores.shape).astype(f32)
    t_scores, t_prob, t_dprob = (torch.from_numpy(a.copy()) for a in (scores, prob, dprob))
    work = scores.copy()

    x = rng.standard_normal((B * T, C)).astype(f32)
    w, b = np.ones(C, f32), np.zeros(C, f32)
    dy = rng.standard_normal(x.shape).astype(f32)
    ln_cache = layernorm.forward(x, w, b)[1]
    tx = torch.from_numpy(x).requires_grad_()
    tw, tb = torch.ones(C, requires_grad=True), torch.zeros(C, requires_grad=True)

    h = (rng.standard_normal((B * T, 4 * C)) * 2).astype(f32)
    dh = rng.standard_normal(h.shape).astype(f32)
    gelu_cache = gelu.forward(h)[1]
    th = torch.from_numpy(h).requires_grad_()

    logits = (rng.standard_normal((B * T, V)) * 2).astype(f32)
    targets = rng.integers(0, V, B * T)
    tl, tt = torch.from_numpy(logits).requires_grad_(), torch.from_numpy(targets)

    def fresh(src):                  # the in-place kernels get their input back first (timed with them)
        np.copyto(work, src)
        return work

    def torch_backward(fn, inputs, grad):
        def run():
            for i in inputs:
                i.grad = None
            fn().backward(grad)
        return run

    def masked_softmax():
        with torch.no_grad():
            return torch.softmax(t_scores.masked_fill(causal, float("-inf")), dim=-1)

    S, X, G, L = scores.nbytes, x.nbytes, h.nbytes, logits.nbytes
    tdy, tdh = torch.from_numpy(dy), torch.from_numpy(dh)
    return [
        ("causal softmax forward", 2 * S, lambda: softmax.causal(fresh(scores)), masked_softmax),
        ("causal softmax backward", 3 * S, lambda: softmax.causal_backward(fresh(dprob), prob),
         lambda: torch._softmax_backward_data(t_dprob.clone(), t_prob, -1, torch.float32)),
        ("LayerNorm forward", 2 * X, lambda: layernorm.forward(x, w, b),
         lambda: F.layer_norm(tx.detach(), (C,), tw.detach(), tb.detach())),
        ("LayerNorm backward", 3 * X, lambda: layernorm.backward(dy, ln_cache),
         torch_backward(lambda: F.layer_norm(tx, (C,), tw, tb), [tx, tw, tb], tdy)),
        ("GELU forward", 3 * G, lambda: gelu.forward(h), lambda: F.gelu(th.detach(), approximate="tanh")),
        ("GELU backward", 4 * G, lambda: gelu.backward(dh, gelu_cache),
         torch_backward(lambda: F.gelu(th, approximate="tanh"), [th], tdh)),
        ("cross-entropy forward", L, lambda: softmax.cross_entropy_forward(logits, targets),
         lambda: F.cross_entropy(tl.detach(), tt)),
        ("cross-entropy forward+backward", 3 * L,
         lambda: softmax.cross_entropy_backward(1.0, softmax.cross_entropy_forward(logits, targets)[1]),
         torch_backward(lambda: F.cross_entropy(tl, tt), [tl], None)),
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--only", choices=sorted(CONFIGS))
    args = ap.parse_args()
    torch.set_num_threads(2 if torch.get_num_threads() >= 2 else 1)
    print(f"threads: torch {torch.get_num_threads()}; {harness.limits_line()}")
    bandwidth = harness.copy_bandwidth()
    for name in ([args.only] if args.only else ["small", "shakespeare", "default"]):
        c = CONFIGS[name]
        rows = cases(**c)
        times = harness.medians([f for row in rows for f in row[2:]], args.repeats, warmup=2)
        body = []
        for i, (label, nbytes, _, _) in enumerate(rows):
            ours, theirs = times[2 * i], times[2 * i + 1]
            body.append((label, f"{ours * 1e3:.3f}", f"{nbytes / ours / bandwidth:.2f}", f"{theirs * 1e3:.3f}",
                         f"{nbytes / theirs / bandwidth:.2f}", f"{ours / theirs:.2f}x"))
        harness.table(["kernel", "minillm ms", "of copy", "torch ms", "of copy", "minillm / torch"], body,
                      title=f"\n{name}: B {c['B']}, T {c['T']}, C {c['C']}, H {c['H']}, V {c['V']}, float32, "
                            f"median of {args.repeats} (interleaved)")


if __name__ == "__main__":
    main()
