"""Data-parallel training under `mpiexec -n 2` on localhost (skipped without mpi4py / mpiexec):
2 ranks x batch B = one process with --grad-accum 2 (every architecture, float64, clipping active), the
parameters identical on every rank, repeated runs bit-identical, resume with the same N and the error for
another N, LoRA fine-tuning, and a rank that fails or is killed ending the job instead of hanging."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

import mpi_fit
from clirun import run_cli
from minillm import checkpoint
from minillm.tree import flatten
from mpirun import minillm, needs_mpi, run_mpi

pytestmark = needs_mpi
HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--vocab-size", "280", "--context", "16", "--layers", "1", "--heads", "2", "--d-model", "16",
        "--batch-size", "4", "--eval-every", "3", "--warmup", "2", "--seed", "7", "--quiet"]


def ok(result):
    assert result.returncode == 0, result.stderr
    return result


def rel_error(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)) if a.size else 0.0


def test_two_ranks_match_one_process_accumulating_two_micro_batches(tmp_path):
    """Every architecture: the ranks' parameters are bit-identical, a second run in the same job and a run
    stopped and resumed (gpt) give the same bits, and one process with --grad-accum 2 gets the same
    parameters to 1e-12 (float64)."""
    ok(run_mpi(2, [os.path.join(HERE, "mpi_fit.py"), tmp_path, "--repeat", "2"], timeout=120))
    (tmp_path / "one").mkdir()
    for arch in mpi_fit.ARCHS:
        rank0, rank1, again = (np.load(tmp_path / f"{arch}-rank{r}-run{i}.npz") for r, i in ((0, 0), (1, 0), (0, 1)))
        resumed = [np.load(tmp_path / f"gpt-rank{r}-resumed.npz") for r in (0, 1)] if arch == "gpt" else []
        params, val_loss = mpi_fit.fit(arch, str(tmp_path / "one"), grad_accum=2)
        flat = mpi_fit.flatten(params)
        assert set(flat) | {"val_loss"} == set(rank0.files)
        worst = 0.0
        for name, want in flat.items():
            got = rank0[name]
            assert got.dtype == np.float64 and got.tobytes() == rank1[name].tobytes(), f"{arch} {name}: ranks differ"
            assert got.tobytes() == again[name].tobytes(), f"{arch} {name}: a repeated run differs"
            for r in resumed:
                assert got.tobytes() == r[name].tobytes(), f"{name}: the resumed run differs"
            worst = max(worst, rel_error(got, want))
        assert worst <= 1e-12, f"{arch}: 2 ranks vs --grad-accum 2 differ by {worst:.1e} (relative)"
        assert float(rank0["val_loss"]) == pytest.approx(val_loss, rel=1e-12)
        norms = [[r["grad_norm"] for r in map(json.loads, open(d / f"{arch}-metrics.jsonl")) if "grad_norm" in r]
                 for d in (tmp_path, tmp_path / "one")]
        if arch != "gpt":   # (gpt's file in the job is the resumed run's)
            assert len(norms[0]) == len(norms[1]) == 3 and np.allclose(norms[0], norms[1], rtol=1e-12, atol=0)
        assert min(norms[1]) > 0.05                                  # every step clipped (--grad-clip 0.05)


def test_train_resume_and_the_world_size_error(corpus, tmp_path, capsys):
    """`mpiexec -n 2 minillm train` 3 steps + `--resume` to 6 = one process with --grad-accum 2 (float64, to
    1e-12); the checkpoint on one process, or a one-process checkpoint on two, is one error line."""
    resumed, one = tmp_path / "resumed", tmp_path / "one"
    flags = [*TINY, "--dtype", "float64"]
    result = ok(minillm(2, "train", corpus, *flags, "--steps", "3", "--out", resumed, timeout=90))
    assert result.stderr.count("checkpoint written") == 1 and "validation:" in result.stderr   # rank 0 alone
    state = json.loads((resumed / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["grad_accum"] == 1 and len(state["rng_states"]) == 2
    assert state["rng_states"][0] == state["rng_state"] != state["rng_states"][1]
    ok(minillm(2, "train", corpus, *flags, "--steps", "6", "--resume", "--out", resumed, timeout=90))
    assert run_cli(capsys, "train", corpus, *flags, "--steps", "6", "--grad-accum", "2", "--out", str(one))[0] == 0
    got, want = (checkpoint.load_checkpoint(str(d)).params for d in (resumed, one))
    for name, a in flatten(want).items():
        assert rel_error(flatten(got)[name], a) <= 1e-12, name
    steps = [r["step"] for r in map(json.loads, open(resumed / "metrics.jsonl")) if "loss" in r]
    assert steps[-3:] == [4, 5, 6] and len(set(steps)) == len(steps)      # rank 0 alone appended
    # the same checkpoint on one process: one clear line, nothing written
    before = (resumed / "model.safetensors").read_bytes()
    code, _, err = run_cli(capsys, "train", corpus, *flags, "--steps", "8", "--resume", "--out", str(resumed))
    assert code == 1 and err.strip().splitlines()[-1].startswith("error: --resume: the checkpoint")
    assert "2 MPI process(es), this run has 1" in err and "mpiexec -n 2" in err
    assert (resumed / "model.safetensors").read_bytes() == before
    # one process -> two: the error is printed once (by rank 0) and every rank exits with status 1
    result = minillm(2, "train", corpus, *flags, "--steps", "8", "--resume", "--out", one, timeout=90)
    assert result.returncode == 1
    assert result.stderr.count("error: ") == 1 and "1 MPI process(es), this run has 2" in result.stderr


def test_finetune_on_two_ranks_equals_grad_accum_two(corpus, tmp_path, capsys):
    base = tmp_path / "base"
    assert run_cli(capsys, "train", corpus, *TINY, "--dtype", "float64", "--steps", "2", "--out", str(base))[0] == 0
    flags = ["--steps", "3", "--batch-size", "4", "--eval-every", "2", "--quiet", "--lora-rank", "2"]
    result = ok(minillm(2, "finetune", base, corpus, *flags, "--out", tmp_path / "mpi", timeout=90))
    assert result.stderr.count("adapter written") == 1
    assert run_cli(capsys, "finetune", str(base), corpus, *flags, "--grad-accum", "2",
                   "--out", str(tmp_path / "one"))[0] == 0
    got, want = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("mpi", "one"))
    assert set(got) == set(want) and all(rel_error(got[n], want[n]) <= 1e-12 for n in want)


@pytest.mark.parametrize("how, expect", [("", "error: rank 1: RuntimeError: injected failure"),
                                         (":kill", "BAD TERMINATION")])
def test_a_failing_rank_ends_the_job(corpus, tmp_path, how, expect):
    result = minillm(2, "train", corpus, *TINY, "--steps", "6", "--out", tmp_path / "f",
                     env={"MINILLM_TEST_FAULT": f"1:2{how}"}, timeout=60)
    assert result.returncode != 0 and "checkpoint written" not in result.stderr
    if "BAD TERMINATION" in expect and "BAD TERMINATION" not in result.stderr + result.stdout:
        return   # another MPI than MPICH's Hydra words it differently: the exit status is what counts
    assert expect in result.stderr + result.stdout, result.stderr


def test_ctrl_c_stops_every_rank_after_the_same_step_and_resume_is_exact(corpus, tmp_path):
    """Ctrl-C to mpiexec (which passes it to every rank): the ranks agree on one step, rank 0 saves it and
    reports it once, every rank exits 130, and --resume ends bit-identical to an uninterrupted run."""
    import signal
    import subprocess
    import sys
    import time

    import mpirun

    flags = [*[f for f in TINY if f not in ("--eval-every", "3")], "--eval-every", "100000", "--steps", "1500"]
    stopped, whole = tmp_path / "stopped", tmp_path / "whole"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "MINILLM_TEST_"))}
    env.update(mpirun.ONE_THREAD, PYTHONPATH=mpirun.ROOT)
    command = mpirun.mpiexec() + ["-n", "2", sys.executable, "-m", "minillm", "train", corpus, *flags,
                                  "--out", str(stopped)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if (stopped / "metrics.jsonl").exists() and len((stopped / "metrics.jsonl").read_text().splitlines()) > 2:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("mpiexec did not stop after Ctrl-C")
    assert proc.returncode == 130, err
    assert err.count("interrupted at step") == 1, err
    step = json.loads((stopped / "trainer_state.json").read_text())["step"]
    assert 0 < step < 1500 and f"interrupted at step {step};" in err
    ok(minillm(2, "train", corpus, *flags, "--resume", "--out", stopped, timeout=120))
    ok(minillm(2, "train", corpus, *flags, "--out", whole, timeout=120))
    assert (stopped / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
