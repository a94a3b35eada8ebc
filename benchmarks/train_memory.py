"""Peak memory of `minillm train` on a large corpus (issue 15): a benchmark, not a test.

    python benchmarks/train_memory.py                  # 64 MB, then the same file again (cache hit)
    python benchmarks/train_memory.py --mb 64 256      # several sizes
    python benchmarks/train_memory.py --source /path/to/other/checkout   # measure another tree (before/after)

The corpus is data/headlines.txt repeated (whole lines) up to the size asked for, written once to --work.
Each run is `python -m minillm train CORPUS` with the default tokenizer (a 2,048-token BPE trained on the
first 64 MB), a tiny model and a few steps (the model is not what is measured: the data path is), in a
fresh subprocess with MINILLM_CACHE pointing into --work; its peak resident set size comes from
os.wait4's rusage (ru_maxrss: anonymous memory plus the pages of the memory-mapped token file it touched).
The first run of a size encodes the corpus (a cache miss); the second finds the token cache (a hit).
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADLINES = os.path.join(ROOT, "data", "headlines.txt")
MODEL = ["--context", "64", "--layers", "1", "--heads", "1", "--d-model", "16", "--batch-size", "64",
         "--steps", "2", "--eval-every", "1000", "--quiet"]


def make_corpus(path, size):
    """Repeat the headlines (whole lines) until the file has at least `size` bytes."""
    if os.path.exists(path) and os.path.getsize(path) >= size:
        return
    with open(HEADLINES, "rb") as f:
        block = f.read()
    with open(path + ".part", "wb") as f:
        written = 0
        while written < size:
            f.write(block)
            written += len(block)
    os.replace(path + ".part", path)


def run(source, corpus, out, cache, extra=()):
    """-> (peak RSS bytes, wall seconds, the last stderr lines) of one `minillm train` subprocess."""
    env = {**os.environ, "PYTHONPATH": source, "MINILLM_CACHE": cache}
    cmd = [sys.executable, "-m", "minillm", "train", corpus, "--out", out, *MODEL, *extra]
    err = tempfile.TemporaryFile()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=source)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err.seek(0)
    text = err.read().decode(errors="replace")
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{text}")
    return usage.ru_maxrss * 1024, wall, text.strip().splitlines()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, nargs="+", default=[64], help="corpus sizes in MB (10^6 bytes)")
    ap.add_argument("--source", default=ROOT, help="the checkout whose minillm is measured")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "minillm-train-memory"))
    ap.add_argument("--no-hit", action="store_true", help="skip the second (cache-hit) run")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    rows = []
    for mb in args.mb:
        corpus = os.path.join(args.work, f"headlines-{mb}MB.txt")
        make_corpus(corpus, mb * 10**6)
        size = os.path.getsize(corpus)
        cache = os.path.join(args.work, f"cache-{mb}")
        shutil.rmtree(cache, ignore_errors=True)
        for label in ("miss", "hit")[: 1 if args.no_hit else 2]:
            out = os.path.join(args.work, f"out-{mb}")
            peak, wall, lines = run(args.source, corpus, out, cache)
            tokens = next((ln for ln in lines if "training and" in ln), "")
            rows.append((f"{size / 1e6:.0f} MB", label, f"{peak / 1e6:,.0f} MB", f"{peak / size:.2f}x",
                         f"{wall:.0f} s", tokens.split(": ", 1)[-1]))
            print(*rows[-1], sep="  |  ", flush=True)
        shutil.rmtree(os.path.join(args.work, f"out-{mb}"), ignore_errors=True)
    print()
    print("| corpus | cache | peak RSS | / input | wall | tokens |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
