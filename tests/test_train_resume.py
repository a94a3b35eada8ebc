"""Resume and overwrite rules and Ctrl-C, through the CLI: --resume takes the architecture and the schedule
from the checkpoint, a contradicting flag is one error line, a larger --steps extends the run; training into
a directory that holds a checkpoint needs --resume or --overwrite; Ctrl-C saves the step it finished, exits
130, and --resume from there ends byte-identical to an uninterrupted run."""

import os
import signal

from clirun import run_cli
from minillm import optim

TINY = ["--vocab-size", "300", "--context", "8", "--layers", "1", "--d-model", "16", "--batch-size", "4",
        "--quiet", "--eval-every", "3"]
FILES = ("model.safetensors", "optimizer.safetensors", "trainer_state.json", "config.json")


def files(out):
    return {name: open(os.path.join(out, name), "rb").read() for name in FILES}


def test_resume_takes_arch_and_schedule_and_checks_flags(capsys, corpus, tmp_path):
    out = str(tmp_path / "m")
    code, _, err = run_cli(capsys, "train", corpus, "--arch", "mamba", "--steps", "3", "--lr", "2e-3",
                           "--warmup", "1", "--out", out, *TINY)
    assert code == 0, err
    code, _, err = run_cli(capsys, "train", corpus, "--resume", "--steps", "5", "--out", out, "--quiet")
    assert code == 0, err                                           # no --arch, no sizes: from the checkpoint
    code, _, err = run_cli(capsys, "train", corpus, "--resume", "--lr", "1e-3", "--steps", "6", "--out", out)
    assert code == 1 and err.strip().splitlines()[-1].startswith("error: --resume: the run was trained with --lr")
    code, _, err = run_cli(capsys, "train", corpus, "--resume", "--arch", "gpt", "--out", out)
    assert code == 1 and "mamba" in err
    code, _, err = run_cli(capsys, "train", corpus, "--steps", "3", "--out", out, *TINY)
    assert code == 1 and "--overwrite" in err.strip().splitlines()[-1]
    code, _, err = run_cli(capsys, "train", corpus, "--steps", "2", "--overwrite", "--out", out, *TINY)
    assert code == 0, err


def test_ctrl_c_saves_and_resume_equals_the_uninterrupted_run(capsys, corpus, tmp_path, monkeypatch):
    whole = str(tmp_path / "whole")
    assert run_cli(capsys, "train", corpus, "--steps", "7", "--out", whole, *TINY)[0] == 0
    cut = str(tmp_path / "cut")
    real_step = optim.adamw_step
    calls = []

    def step_then_ctrl_c(*a, **k):
        calls.append(1)
        if len(calls) == 5:                 # Ctrl-C while step 5 runs: it finishes, is saved, the run stops
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*a, **k)

    monkeypatch.setattr(optim, "adamw_step", step_then_ctrl_c)
    code, _, err = run_cli(capsys, "train", corpus, "--steps", "7", "--out", cut, *TINY)
    monkeypatch.setattr(optim, "adamw_step", real_step)
    assert code == 130 and err.strip().splitlines()[-1].startswith("interrupted at step 5;"), err
    assert '"step": 5' in open(os.path.join(cut, "trainer_state.json")).read()
    code, _, err = run_cli(capsys, "train", corpus, "--resume", "--out", cut, "--quiet")
    assert code == 0, err
    assert files(cut) == files(whole)


def test_documents_file_is_recorded_and_resumed(capsys, corpus, tmp_path):
    import json

    out = str(tmp_path / "f")
    code, _, err = run_cli(capsys, "train", corpus, "--documents", "file", "--steps", "2", "--out", out, *TINY)
    assert code == 0, err
    assert json.loads(open(os.path.join(out, "config.json")).read())["minillm"]["documents"] == "file"   # HF has no key
    code, _, err = run_cli(capsys, "train", corpus, "--resume", "--steps", "3", "--out", out, "--quiet")
    assert code == 0, err                                      # takes --documents file from the checkpoint
    code, _, err = run_cli(capsys, "train", corpus, "--resume", "--documents", "lines", "--steps", "4",
                           "--out", out, "--quiet")
    assert code == 1 and "--documents file" in err
