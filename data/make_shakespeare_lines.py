"""Make data/shakespeare_lines.txt, the small second corpus of the LoRA example, from shakespeare.txt.

    python data/make_shakespeare_lines.py ../shared/data/shakespeare.txt > data/shakespeare_lines.txt

Lines 20,000-30,000 of the concatenated Project Gutenberg texts; of those, the spoken lines only (not
speaker names in capitals, not stage directions in brackets) with at least four words, stripped and
lower-cased like the headlines. Deterministic: the same input gives the same file.
"""

import sys


def spoken_lines(lines):
    for line in lines:
        text = line.strip()
        if len(text.split()) < 4 or text.startswith("[") or text.upper() == text:
            continue
        yield text.lower()


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        chosen = f.read().splitlines()[20000:30000]
    sys.stdout.write("".join(line + "\n" for line in spoken_lines(chosen)))
