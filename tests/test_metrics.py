"""metrics.py: appended lines, a torn last line skipped, resume cuts back to the steps before it."""

import pytest

from minillm import metrics


def test_append_read_and_resume(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    log = metrics.MetricsLog(path)
    for step in range(5):
        log.append(step=step, loss=float(5 - step), lr=0.1)
    log.append(step=4, val_loss=float("nan"), train_loss=1.0)
    records = metrics.read(path)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 4] and records[-1]["val_loss"] is None
    with open(path, "ab") as f:
        f.write(b'{"step": 5, "lo')                 # a crash in the middle of a line
    assert len(metrics.read(path)) == 6
    metrics.MetricsLog(path, resume_step=3)           # resumed from the checkpoint of step 3
    assert [r["step"] for r in metrics.read(path)] == [0, 1, 2, 3]
    metrics.MetricsLog(path)                          # a fresh run starts a new log
    assert metrics.read(path) == []


def test_a_bad_line_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\nnot json\n{"step": 1}\n')
    with pytest.raises(ValueError, match="line 2"):
        metrics.read(str(path))
