"""Tokenizer benchmark: minillm vs HF `tokenizers` (training) and vs tiktoken and HF (encoding).

    python benchmarks/tokenizer.py [--corpus FILE ...] [--repeats N] [--gpt2-dir DIR]

On each corpus, in one run: BPE training to vocab 4096 and 8192 (special <|endoftext|> included,
pairs seen at least twice, one thread: RAYON_NUM_THREADS=1 for HF), then encoding throughput in
MB/s of UTF-8 text with GPT-2's files, one thread. minillm keeps a pre-token cache between calls:
"cold" clears it before every repeat (every pre-token is merged from scratch, as tiktoken does),
"warm" encodes the same text a second time. The contestants' calls alternate; medians of the repeats;
ratio = peer time / ours (> 1: minillm is faster).
"""

import os

os.environ["RAYON_NUM_THREADS"] = "1"  # before tokenizers starts its thread pool
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse  # noqa: E402

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


def main():
    default_headlines = os.path.join(ROOT, "data", "headlines.txt")
    if not os.path.exists(default_headlines):
        default_headlines = os.path.join(SHARED, "headlines.txt")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", nargs="+",
                    default=[default_headlines, os.path.join(SHARED, "shakespeare.txt")])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gpt2-dir", default=os.path.join(SHARED, "gpt2"))
    args = ap.parse_args()

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
