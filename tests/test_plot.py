"""`minillm plot`: a PNG of the loss curves that is written and not blank; clear errors."""

import numpy as np
import pytest

from clirun import run_cli
from minillm import metrics

matplotlib = pytest.importorskip("matplotlib", reason="minillm plot needs the plot extra (matplotlib)")


def fake_run(path, scale):
    path.mkdir()
    log = metrics.MetricsLog(str(path / "metrics.jsonl"))
    for step in range(50):
        log.append(step=step, loss=scale * (5 - step / 20), lr=1e-3 * min(1, step / 10))
        if step % 10 == 9:
            log.append(step=step, val_loss=scale * (5.2 - step / 20), train_loss=scale * (5 - step / 20))
    return str(path)


def test_plot_writes_a_png_that_is_not_blank(capsys, tmp_path):
    a, b = fake_run(tmp_path / "a", 1.0), fake_run(tmp_path / "b", 0.8)
    out = tmp_path / "loss.png"
    code, _, err = run_cli(capsys, "plot", a, b, "--out", str(out))
    assert code == 0, err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(str(out))
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert np.unique(image.reshape(-1, image.shape[-1]), axis=0).shape[0] > 20   # lines, text: many colours
    assert run_cli(capsys, "plot", a)[0] == 0 and (tmp_path / "a" / "loss.png").exists()


def test_plot_errors(capsys, tmp_path):
    code, _, err = run_cli(capsys, "plot", str(tmp_path))
    assert code == 1 and "metrics.jsonl" in err and "Traceback" not in err
