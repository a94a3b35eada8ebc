"""Hugging Face directories in minillm: load time, peak memory, greedy sampling speed against HF itself.

GPT-2 124M (`GPT2Config()` defaults, random weights), built with transformers and saved with save_pretrained,
then loaded by minillm (checkpoint.load_checkpoint):
  * load time and peak RSS, each in a fresh subprocess (its VmHWM), beside the size of
    model.safetensors and the RSS of a subprocess that only imports (the interpreter, NumPy, Numba);
    HF's from_pretrained in the same way for reference;
  * greedy sampling, batch 1: tokens/s of minillm's generate (temperature 0) vs HF generate(do_sample=False)
    on the same weights, in this process, timed alternately (harness.medians), and the ratio.
Mamba-130m-size (d 768, 24 layers) and RWKV-169m-size (d 768, 12 layers, rescale_every 0): sampling only.
Targets: sampling >= 1.0x HF, peak RSS <= 1.5x the safetensors file.

    python benchmarks/hf_interop.py [--tokens 64] [--repeats 3] [--only gpt2,mamba,rwkv] [--dir /tmp/x]
                                    [--skip-memory | --skip-sampling]
"""

import argparse
import os
import subprocess
import sys
import tempfile

import harness  # first: puts the checkout and tests/ on sys.path
import numpy as np
import torch
import transformers as tf
from transformers.utils import logging as hf_logging

from minillm import checkpoint, generate, models

SIZES = {
    "gpt2": lambda: tf.GPT2Config(),
    "mamba": lambda: tf.MambaConfig(hidden_size=768, num_hidden_layers=24, vocab_size=50280, state_size=16),
    "rwkv": lambda: tf.RwkvConfig(hidden_size=768, num_hidden_layers=12, vocab_size=50277, context_length=1024,
                                  rescale_every=0),
}
PROMPT = [[464, 2068, 7586, 21831]]      # any 4 ids


def build(name, root):
    path = os.path.join(root, name)
    if not os.path.isfile(os.path.join(path, "config.json")):
        torch.manual_seed(0)
        hc = SIZES[name]()
        hc.bos_token_id = hc.eos_token_id = None
        tf.AutoModelForCausalLM.from_config(hc).save_pretrained(path)
    return path


PEAK = ("\nprint([int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")


def _child(code):
    """Run `code` in a fresh interpreter -> (its stdout, peak RSS in bytes). The peak is the child's own
    VmHWM, read at its end: ru_maxrss of a forked child counts the parent's pages before the exec."""
    proc = subprocess.run([sys.executable, "-c", code + PEAK], capture_output=True, cwd=harness.ROOT,
                          env={**os.environ, "PYTHONPATH": harness.ROOT})
    if proc.returncode:
        raise RuntimeError(f"child failed ({proc.returncode}): {proc.stderr.decode()[-2000:]}")
    *out, peak = proc.stdout.decode().split()
    return " ".join(out), int(peak)


def memory_rows(path):
    size = os.path.getsize(os.path.join(path, "model.safetensors"))
    _, base = _child("import numpy, numba, minillm.checkpoint, minillm.models.gpt")
    t, ours = _child("import time; from minillm import checkpoint; t = time.perf_counter(); "
                     f"checkpoint.load_checkpoint({path!r}); print(time.perf_counter() - t)")
    _, torch_base = _child("import torch, transformers")
    t_hf, theirs = _child("import time, transformers; t = time.perf_counter(); "
                          f"transformers.AutoModelForCausalLM.from_pretrained({path!r}); print(time.perf_counter() - t)")
    mb = lambda n: f"{n / 1e6:,.0f}"  # noqa: E731
    harness.table(["", "load s", "peak RSS MB", "after imports MB", "peak / file", "(peak - imports) / file"],
                  [["minillm load_checkpoint", f"{float(t):.2f}", mb(ours), mb(base), f"{ours / size:.2f}",
                    f"{(ours - base) / size:.2f}"],
                   ["HF from_pretrained", f"{float(t_hf):.2f}", mb(theirs), mb(torch_base), f"{theirs / size:.2f}",
                    f"{(theirs - torch_base) / size:.2f}"]],
                  title=f"\nGPT-2 124M: model.safetensors {mb(size)} MB (float32); each load in a fresh process")


def sampling_row(name, path, tokens, repeats):
    ckpt = checkpoint.load_checkpoint(path)
    model = models.get_model(ckpt.config["arch"])
    hf = tf.AutoModelForCausalLM.from_pretrained(path).eval()
    got = {}

    def ours():
        got["ours"] = generate.generate(model, ckpt.params, ckpt.config, PROMPT, tokens, np.random.default_rng(0),
                                        temperature=0)[0]

    def theirs():
        with torch.no_grad():
            out = hf.generate(torch.tensor(PROMPT), do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens,
                              pad_token_id=0, eos_token_id=None)
        got["theirs"] = out[0, len(PROMPT[0]):].tolist()

    t_ours, t_hf = harness.medians([ours, theirs], repeats)
    same = "yes" if got["ours"] == got["theirs"] else f"no ({sum(a == b for a, b in zip(got['ours'], got['theirs']))} of {tokens})"
    return [name, f"{tokens / t_ours:.1f}", f"{tokens / t_hf:.1f}", f"{t_hf / t_ours:.2f}", same]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default="gpt2,mamba,rwkv")
    ap.add_argument("--skip-memory", action="store_true", help="only the sampling table")
    ap.add_argument("--skip-sampling", action="store_true", help="only GPT-2's load time and memory")
    ap.add_argument("--dir", default=None, help="where the HF directories are built (kept for the next run)")
    args = ap.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    root = args.dir or tempfile.mkdtemp(prefix="hf_interop_")
    names = args.only.split(",")
    paths = {name: build(name, root) for name in names}
    print(harness.limits_line())
    print(f"torch threads {torch.get_num_threads()}, CPUs {len(os.sched_getaffinity(0))}")
    if "gpt2" in paths and not args.skip_memory:
        memory_rows(paths["gpt2"])
    rows = []
    for name in ([] if args.skip_sampling else names):
        rows.append(sampling_row(name, paths[name], args.tokens, args.repeats))
        print("  ".join(rows[-1]), flush=True)          # as it comes: the whole run takes minutes
    if not rows:
        return
    harness.table(["", "minillm tok/s", "HF generate tok/s", "minillm / HF speed", "same tokens"], rows,
                  title=f"\nGreedy sampling, batch 1, {len(PROMPT[0])}-token prompt + {args.tokens} new tokens, "
                        f"float32; medians of {args.repeats}, alternated")


if __name__ == "__main__":
    main()
