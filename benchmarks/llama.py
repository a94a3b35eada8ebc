"""Llama training-step and sampling throughput: minillm (NumPy + Numba) vs HF LlamaForCausalLM on the CPU.

Training: tokens/s of one full step (forward, cross-entropy loss, backward, AdamW) on the same model
(HF LlamaForCausalLM from a config, our initial weights copied by name) and the same batch, float32;
PyTorch eager (no torch.compile) with torch.optim.AdamW (minillm's hyper-parameters and decay groups) and
as many threads as NumPy's BLAS, HF's "eager" attention and, for reference, its default (sdpa).

Sampling: tokens/s of greedy decoding, batch 1, 256 new tokens after a 1-token prompt, with a KV cache:
llama.step in a loop vs a manual PyTorch loop over HF Llama with its cache, and HF `generate`; the
shakespeare-size model with a context of 512.

    python benchmarks/llama.py [--repeats 5] [--only small|shakespeare] [--skip-sampling]
    python benchmarks/llama.py --profile [--only ...]      # where a minillm llama step spends its time
"""

import argparse
import collections
import time

import harness  # first: puts the checkout and tests/ on sys.path
import numpy as np
import peers
import torch
import torch.nn.functional as F
from transformers.utils import logging as hf_logging

from minillm import optim
from minillm.models import llama
from minillm.nn import ops
from minillm.tree import flatten

CONFIGS = {
    "small": dict(vocab_size=512, context=64, d_model=128, n_layer=4, n_head=4, n_kv_head=2, batch=32),
    "shakespeare": dict(vocab_size=65, context=256, d_model=384, n_layer=6, n_head=6, n_kv_head=2, batch=16),
}
LR, BETAS, EPS, WD = 3e-4, (0.9, 0.95), 1e-8, 0.1


def _setup(name):
    c = dict(CONFIGS[name])
    batch = c.pop("batch")
    config = {"arch": "llama", **llama.DEFAULTS, **c, "dtype": "float32"}
    rng = np.random.default_rng(0)
    params = llama.init(config, rng)
    data = rng.integers(0, config["vocab_size"], (batch, config["context"] + 1))
    return config, params, data


def _ours(params, config, x, y):
    state = optim.adamw_init(params)
    mask = optim.decay_mask(flatten(params), no_decay=llama.NO_DECAY)

    def step():                 # as `minillm train` runs it: the batch in parts side by side (batch_parts.py)
        return harness.minillm_step(llama, params, config, x, y, state, LR, BETAS, EPS, WD, mask=mask)
    return step


def bench_train(name, repeats):
    config, params, data = _setup(name)
    x, y = data[:, :-1], data[:, 1:]
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    init_params = {k: v.copy() for k, v in flatten(params).items()}
    mask = optim.decay_mask(init_params, no_decay=llama.NO_DECAY)
    labels, fns = ["minillm"], [_ours(params, config, x, y)]
    for attn in ("eager", "sdpa"):
        model = peers.hf_llama(init_params, config, torch.float32, attn=attn)
        named = dict(model.named_parameters())
        groups = [{"params": [p for n, p in named.items() if mask[n]], "weight_decay": WD},
                  {"params": [p for n, p in named.items() if not mask[n]], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS)

        def theirs(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            logits = model(tx).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ty.reshape(-1))
            loss.backward()
            opt.step()
            return loss

        labels.append(f"HF LlamaForCausalLM, torch eager ({attn} attn)")
        fns.append(theirs)
    rows = list(zip(labels, harness.medians(fns, repeats, warmup=2)))   # interleaved
    print(f"\ntraining step on the CPU, {name}: B={data.shape[0]} T={config['context']} C={config['d_model']} "
          f"L={config['n_layer']} H={config['n_head']} H_kv={config['n_kv_head']} F={llama.d_ff_of(config)} "
          f"V={config['vocab_size']}, float32, median of {repeats} (interleaved)")
    n_params = sum(a.size for a in init_params.values())   # no position table: every weight is used per token
    per_token = harness.gpt_flops_per_token(n_params, config["n_layer"], config["d_model"], config["context"])
    print(f"  {harness.limits_line()}; 6N + 12LdT = {per_token / 1e6:.2f} MFLOP/token")
    harness.table(["implementation", "s/step", "tokens/s", "MFU", "minillm speed-up"],
                  [(label, f"{t:.4f}", f"{x.size / t:.0f}", f"{harness.mfu(x.size / t, per_token):.3f}",
                    f"{t / rows[0][1]:.2f}x") for label, t in rows],
                  indent="  ")


def bench_sampling(repeats, new_tokens=256):
    c = dict(CONFIGS["shakespeare"])
    c.pop("batch")
    config = {"arch": "llama", **llama.DEFAULTS, **c, "context": 512, "dtype": "float32"}
    params = llama.init(config, np.random.default_rng(0))
    model = peers.hf_llama(params, config, torch.float32, attn="sdpa").eval()
    prompt = np.array([1], dtype=np.int64)

    def ours():
        state = llama.init_state(params, config, 1)
        logits, state = llama.step(params, prompt, state)
        out = []
        for _ in range(new_tokens):
            tok = np.argmax(logits, axis=-1)
            out.append(int(tok[0]))
            logits, state = llama.step(params, tok, state)
        return out

    @torch.no_grad()
    def torch_loop():
        res = model(torch.from_numpy(prompt)[None], use_cache=True)
        out = []
        for _ in range(new_tokens):
            tok = res.logits[:, -1].argmax(-1, keepdim=True)
            out.append(int(tok[0, 0]))
            res = model(tok, cache=res.cache, use_cache=True)
        return out

    @torch.no_grad()
    def hf_generate():
        res = model.generate(torch.from_numpy(prompt)[None], max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return res[0, 1:].tolist()

    agree = ours() == torch_loop()
    labels = ["minillm llama.step loop", "torch loop, HF cache", "HF generate (greedy)"]
    rows = list(zip(labels, harness.medians([ours, torch_loop, hf_generate], repeats, warmup=1)))
    print(f"\nsampling: batch 1, {new_tokens} new tokens (greedy, KV cache), C={config['d_model']} "
          f"L={config['n_layer']} H={config['n_head']} H_kv={config['n_kv_head']} V={config['vocab_size']}, "
          f"float32, median of {repeats} (interleaved); greedy tokens identical to the torch loop: {agree}")
    n_params = sum(a.size for a in flatten(params).values())
    per_token = 2 * n_params + 2 * config["n_layer"] * config["d_model"] * new_tokens  # forward only, mean position
    harness.table(["implementation", "s", "tokens/s", "MFU (2N + 2LdT)", "minillm speed-up"],
                  [(label, f"{t:.4f}", f"{new_tokens / t:.0f}", f"{harness.mfu(new_tokens / t, per_token):.4f}",
                    f"{t / rows[0][1]:.2f}x") for label, t in rows],
                  indent="  ")


def profile_step(name, repeats):
    """Wall time per component of one minillm llama training step (best of `repeats`); nested rows include
    their children (gqa_forward includes its four dense layers and the rotary embedding)."""
    from minillm.kernels import moe as moe_kernels, softmax
    from minillm.nn import dense, gqa, rope, swiglu

    config, params, data = _setup(name)
    step = _ours(params, config, data[:, :-1], data[:, 1:])
    spent = collections.defaultdict(float)
    wrapped = [(llama, ["forward", "backward"]), (gqa, ["gqa_forward", "gqa_backward", "bmm"]),
               (swiglu, ["swiglu_forward", "swiglu_backward"]), (rope, ["rope_forward", "rope_backward"]),
               (dense, ["dense_forward", "dense_backward"]), (ops, ["rmsnorm_forward", "rmsnorm_backward",
               "cross_entropy_forward", "cross_entropy_backward", "embedding_backward"]),
               (moe_kernels, ["swiglu", "swiglu_backward"]), (softmax, ["causal", "causal_backward"]),
               (optim, ["adamw_step"])]
    saved = []
    for module, names in wrapped:
        for fn_name in names:
            fn = getattr(module, fn_name)
            saved.append((module, fn_name, fn))

            def timed(*a, _fn=fn, _name=f"{module.__name__.rsplit('.', 1)[-1]}.{fn_name}", **k):
                t0 = time.perf_counter()
                out = _fn(*a, **k)
                spent[_name] += time.perf_counter() - t0
                return out

            setattr(module, fn_name, timed)
    best = None
    try:
        for _ in range(repeats + 1):
            spent.clear()
            t0 = time.perf_counter()
            step()
            total = time.perf_counter() - t0
            if best is None or total < best[0]:
                best = (total, dict(spent))
    finally:
        for module, fn_name, fn in saved:
            setattr(module, fn_name, fn)
    total, parts = best
    print(f"\nprofile of one minillm llama step, {name} (best of {repeats}): {total * 1e3:.1f} ms")
    for fn_name, t in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {fn_name:32s} {t * 1e3:8.1f} ms {100 * t / total:5.1f}%")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", choices=sorted(CONFIGS))
    ap.add_argument("--skip-sampling", action="store_true")
    ap.add_argument("--profile", action="store_true", help="time the parts of a minillm step instead")
    args = ap.parse_args()
    hf_logging.set_verbosity_error()
    from train_gpt import numpy_threads

    torch.set_num_threads(numpy_threads())
    print(f"threads: torch {torch.get_num_threads()}; numpy {np.__version__}, torch {torch.__version__}")
    names = [args.only] if args.only else list(CONFIGS)
    for name in names:
        (profile_step if args.profile else bench_train)(name, args.repeats)
    if not (args.profile or args.skip_sampling):
        bench_sampling(args.repeats)


if __name__ == "__main__":
    main()
