"""metrics.jsonl: one JSON object per line, one line per training step (and per evaluation), appended.

    {"step": 10, "loss": 5.12, "lr": 0.003, "grad_norm": 0.87, "tokens_per_s": 5400.0}
    {"step": 10, "val_loss": 5.31, "train_loss": 5.12}                 (an evaluation)

Each line is written with a single write() of the whole line to a file opened in append mode, so a
crash leaves at most the last line incomplete; a reader (`read`) skips such a torn last line, and
`MetricsLog(path, resume_step)` first cuts the file back to the lines of steps up to `resume_step` (the
checkpoint's: the resumed run writes the later ones again) and drops a torn tail.
"""

import json
import math
import os

from minillm.fileio import atomic_write


def _clean(value):
    """JSON-able: numpy scalars and arrays to Python numbers and lists; non-finite floats to None."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def read(path):
    """-> list of dicts, in file order (a torn last line is skipped; a missing file reads as [])."""
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except FileNotFoundError:
        return []
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1 and any(rest.strip() for rest in lines[i + 1:]):
                raise ValueError(f"{path}: line {i + 1} is not JSON") from None
    return records


class MetricsLog:
    """Appends records to `path`; with resume_step, keeps only the records of steps up to it."""

    def __init__(self, path, resume_step=0):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        kept = [r for r in read(path) if r.get("step", 0) <= resume_step] if resume_step else []
        atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept))

    def append(self, **record):
        line = (json.dumps({k: _clean(v) for k, v in record.items()}) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
