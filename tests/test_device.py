"""device.py: choosing where arrays live; --device cuda without a GPU is one clear error."""

import importlib.util

import numpy as np
import pytest

from minillm import cli, device


def test_cpu_is_numpy_and_to_device_keeps_the_tree():
    assert device.array_module_for("cpu") is np
    tree = {"a": {"w": np.ones(3)}, "n": 2}
    moved = device.to_device(tree, np)
    assert moved["n"] == 2 and np.array_equal(moved["a"]["w"], tree["a"]["w"])
    assert isinstance(device.to_host(np.arange(3)), np.ndarray)
    with pytest.raises(ValueError, match="unknown device"):
        device.array_module_for("tpu")


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed here")
def test_cuda_without_cupy_is_a_clear_cli_error(capsys, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("some headline text\n" * 50)
    with pytest.raises(SystemExit) as e:
        cli.main(["train", str(path), "--device", "cuda", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error:") and "CuPy" in err and "Traceback" not in err
