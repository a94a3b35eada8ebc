"""Tokenizer benchmark: minillm vs HF `tokenizers` (training) and vs tiktoken and HF (encoding).

    python benchmarks/tokenizer.py [--corpus FILE ...] [--repeats N] [--gpt2-dir DIR]
    python benchmarks/tokenizer.py --memory [--corpus FILE ...]     # peak memory of encoding (Linux)

On each corpus, in one run: BPE training to vocab 4096 and 8192 (special <|endoftext|> included,
pairs seen at least twice, one thread: RAYON_NUM_THREADS=1 for HF), then encoding throughput in
MB/s of UTF-8 text with GPT-2's files, one thread. minillm keeps a pre-token cache between calls:
"cold" clears it before every repeat (every pre-token is merged from scratch, as tiktoken does),
"warm" encodes the same text a second time. The contestants' calls alternate; medians of the repeats;
ratio = peer time / ours (> 1: minillm is faster).

--memory: the peak resident memory of one encode call (encode_array / tiktoken's encode_ordinary,
GPT-2's files) on 50 MB of the letter a (one giant pre-token) and on each corpus, each in a fresh
process: the high-water mark is reset (/proc/self/clear_refs) once the tokenizer is loaded and
warm and the text is read, so the figure is what the call itself adds.
"""

import os

os.environ["RAYON_NUM_THREADS"] = "1"  # before tokenizers starts its thread pool
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse  # noqa: E402
import sys  # noqa: E402

import harness  # noqa: E402  (first: puts the checkout and tests/ on sys.path)
import tiktoken  # noqa: E402
from tiktoken.load import data_gym_to_mergeable_bpe_ranks  # noqa: E402
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: E402

from minillm.tokenizer import EOT, Tokenizer, bytes_to_unicode, read_text_file  # noqa: E402

ROOT = harness.ROOT
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
_U2B = {c: b for b, c in bytes_to_unicode().items()}  # HF's byte-level strings -> bytes
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def hf_train(text, vocab_size):
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer=trainer)
    return tok


def peers_for_encoding(gpt2_dir):
    vocab, encoder = os.path.join(gpt2_dir, "vocab.bpe"), os.path.join(gpt2_dir, "encoder.json")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # read the local files, no cache, no network
    ranks = data_gym_to_mergeable_bpe_ranks(vocab, encoder)
    tk = tiktoken.Encoding("gpt2-local", pat_str=GPT2_PAT, mergeable_ranks=ranks,
                           special_tokens={EOT: 50256})
    hf = HFTokenizer(models.BPE.from_file(encoder, vocab))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    return Tokenizer.from_gpt2_files(vocab, encoder), tk, hf


def _status_mb(key):
    with open("/proc/self/status") as f:
        return int(f.read().split(key + ":")[1].split()[0]) / 1024


def memory_child(who, what, gpt2_dir):
    """In a fresh process: MB the encode call adds at its peak, printed as 'MB ids'."""
    ours, tk, _ = peers_for_encoding(gpt2_dir)
    enc = ours.encode_array if who == "minillm" else tk.encode_ordinary
    enc("warm up " + "b" * 300)
    text = "a" * 50_000_000 if what == "a50" else read_text_file(what)
    del ours, tk
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status_mb("VmRSS")
    ids = enc(text)
    print(f"{_status_mb('VmHWM') - base:.0f} {len(ids)}")


def memory(corpora, gpt2_dir):
    import subprocess

    print("peak memory an encode call adds (MB; resident set high-water mark, fresh process)")
    for what in ["a50", *corpora]:
        row = []
        for who in ("minillm", "tiktoken"):
            r = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", who,
                                what, "--gpt2-dir", gpt2_dir], capture_output=True, text=True,
                               check=True)
            row.append(r.stdout.split())
        name = "50 MB of 'a'" if what == "a50" else os.path.basename(what)
        print(f"{name:20s} minillm {row[0][0]:>6s} MB   tiktoken {row[1][0]:>6s} MB   "
              f"({row[0][1]} ids)")


def main():
    default_headlines = os.path.join(ROOT, "data", "headlines.txt")
    if not os.path.exists(default_headlines):
        default_headlines = os.path.join(SHARED, "headlines.txt")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", nargs="+",
                    default=[default_headlines, os.path.join(SHARED, "shakespeare.txt")])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gpt2-dir", default=os.path.join(SHARED, "gpt2"))
    ap.add_argument("--memory", action="store_true", help="peak memory of encoding instead")
    ap.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        return memory_child(*args.memory_child, args.gpt2_dir)
    if args.memory:
        return memory(args.corpus, args.gpt2_dir)

    Tokenizer.train("warm up the numba kernels " * 20, 300, progress=False)  # compile / load
    ours, tk, hf = peers_for_encoding(args.gpt2_dir)
    ours.encode("warm up")
    rows = []
    for path in args.corpus:
        text = read_text_file(path)
        name, mb = os.path.basename(path), len(text.encode("utf-8")) / 1e6
        for vs in (4096, 8192):
            t_ours, t_hf = harness.medians([lambda: Tokenizer.train(text, vs, progress=False),
                                            lambda: hf_train(text, vs)], args.repeats, warmup=0)
            a = Tokenizer.train(text, vs, progress=False)
            b = hf_train(text, vs)
            ours_set = set(a.tokens[256:])
            hf_set = {bytes(_U2B[c] for c in s) for s in b.get_vocab() if s != EOT and len(s) > 1}
            shared = len(ours_set & hf_set) / max(len(ours_set), 1)
            rows.append((name, f"train to {vs}", f"{t_ours:.3f} s", "-", f"{t_hf:.3f} s", "-",
                         f"{t_hf / t_ours:.2f}", f"{a.vocab_size} / {b.get_vocab_size()} tokens, "
                         f"{shared:.1%} of the learned tokens shared"))
        assert ours.encode_array(text).tolist() == tk.encode_ordinary(text)
        n = len(text.encode("utf-8"))
        # cold: the cache cleared (untimed) before each call; warm: right after a cold call, whose
        # pre-tokens it finds cached
        t_cold, t_warm, t_tk, t_hf = harness.medians(
            [lambda: ours.encode_array(text), lambda: ours.encode_array(text), lambda: tk.encode_ordinary(text),
             lambda: hf.encode(text, add_special_tokens=False)], args.repeats, warmup=0,
            before=[ours.clear_cache, None, None, None])
        for label, t in (("encode (cold cache)", t_cold), ("encode (warm cache)", t_warm)):
            rows.append((name, label, f"{n / t / 1e6:.1f} MB/s", f"{n / t_tk / 1e6:.1f} MB/s",
                         f"{n / t_hf / 1e6:.1f} MB/s", f"{t_tk / t:.2f}", f"{t_hf / t:.2f}",
                         f"{mb:.1f} MB, ids equal tiktoken's"))
    head = ("corpus", "task", "minillm", "tiktoken", "HF tokenizers", "ratio tiktoken",
            "ratio HF", "note")
    harness.table(head, rows, align="l" * len(head),
                  title=f"median of {args.repeats} repeats (interleaved), one thread; ratio = peer time / "
                        "minillm time (> 1: minillm faster)")

if __name__ == "__main__":
    main()
