"""Crash safety of a save: a process that dies between any two steps of save_checkpoint (os._exit in a forked
child, before each write, rename, link, removal) leaves a directory holding one whole checkpoint, the old
or the new, and the next save cleans up after it; `kill -9` of a real training during its saves too."""

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from minillm import store
from minillm.checkpoint import load_checkpoint, save_checkpoint
from minillm.tree import flatten
from test_checkpoint import CONFIG, FakeTokenizer, make_params, plain_copy, trained_state

HERE = os.path.dirname(os.path.abspath(__file__))
CRASHED = 3
STEPS = [(os, "replace"), (os, "rename"), (os, "symlink"), (os, "remove"), (os, "link"), (os, "makedirs"),
         (store.shutil, "rmtree"), (store, "write_temp")]

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def contents(params, opt=None, trainer=None, tokenizer=None):
    return {"params": {n: a.tobytes() for n, a in flatten(params).items()},
            "opt": None if opt is None else {k: {n: a.tobytes() for n, a in opt[k].items()} for k in ("m", "v")},
            "step": None if opt is None else opt["step"], "trainer": trainer, "tokenizer": tokenizer}


def on_disk(out):
    ck = load_checkpoint(out)
    tok = open(ck.tokenizer_path).read() if ck.tokenizer_path else None
    return contents(ck.params, ck.optimizer_state, ck.trainer_state, tok)


def save_in_child(out, k, kwargs):
    """Fork; the child saves, dying (os._exit) just before its k-th file-system step. -> its exit status."""
    pid = os.fork()
    if pid == 0:
        try:
            count = [0]
            for owner, name in STEPS:
                real = getattr(owner, name)

                def step(*a, _real=real, **kw):
                    count[0] += 1
                    if count[0] == k:
                        os._exit(CRASHED)
                    return _real(*a, **kw)
                setattr(owner, name, step)
            save_checkpoint(out, **kwargs)
            os._exit(0)
        except BaseException:
            os._exit(99)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def assert_clean(out):
    """After a completed save: one version, no temporaries, no stray links."""
    assert os.listdir(os.path.join(out, store.VERSIONS)) == [os.readlink(os.path.join(out, store.CURRENT))[10:]]
    assert not [n for n in os.listdir(out) if n.endswith(".link")]


def new_save(params_seed=1, with_state=True):
    params = make_params(seed=params_seed)
    kw = dict(params=params, config=CONFIG, tokenizer=FakeTokenizer({"new": 1}))
    want = dict(tokenizer='{"new": 1}')
    if with_state:
        opt = trained_state(make_params(seed=params_seed), steps=2)
        kw.update(optimizer_state=opt, trainer_state={"step": 2})
        want.update(opt=opt, trainer={"step": 2})
    return kw, contents(params, want.get("opt"), want.get("trainer"), want["tokenizer"])


def old_save(out, legacy=False):
    params = make_params(seed=0)
    opt = trained_state(make_params(seed=0), steps=1)
    target = out + ".src" if legacy else out
    save_checkpoint(target, params, CONFIG, tokenizer=FakeTokenizer({"old": 1}), optimizer_state=opt,
                    trainer_state={"step": 1})
    if legacy:            # the plain files an older minillm wrote (config.json marks them as minillm's)
        plain_copy(target, out)
    return contents(params, opt, {"step": 1}, '{"old": 1}')


@pytest.mark.parametrize("scenario", ["full", "weights only", "legacy directory", "first save"])
def test_a_crash_at_any_step_leaves_the_old_or_the_new_checkpoint(tmp_path, monkeypatch, scenario):
    # os._exit loses nothing the kernel has (fsync guards against power loss, not process death): skip it
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    kw, new = new_save(with_state=scenario != "weights only")
    seen = set()
    for k in range(1, 200):
        out = str(tmp_path / f"k{k}")
        old = None if scenario == "first save" else old_save(out, legacy=scenario == "legacy directory")
        code = save_in_child(out, k, kw)
        assert code in (0, CRASHED), f"the child failed at step {k}"
        if code == 0:        # the save has fewer steps than k: every step has had its crash
            assert on_disk(out) == new and (old is None or "new" in seen)
            assert_clean(out)
            break
        try:
            got = on_disk(out)
        except ValueError as e:
            assert old is None, f"crash before step {k}: {e}"      # only a first save may leave nothing
            got = None
        assert got in (old, new), f"crash before step {k} left a mix"
        seen.add("old" if got == old else "new")
        save_checkpoint(out, **kw)                                  # the next save recovers and cleans up
        assert on_disk(out) == new
        assert_clean(out)
    else:
        pytest.fail("the save never completed")
    assert "old" in seen or old is None


def test_stale_temporaries_and_versions_are_removed_by_the_next_save(tmp_path):
    out = str(tmp_path / "ck")
    old_save(out)
    vroot = os.path.join(out, store.VERSIONS)
    os.makedirs(os.path.join(vroot, ".tmp-999-deadbeef"))
    os.makedirs(os.path.join(vroot, "v000007"))
    os.symlink("nowhere", os.path.join(out, ".current.999.deadbeef.link"))
    assert on_disk(out)["step"] == 1                                # debris does not disturb a reader
    save_checkpoint(out, make_params(), CONFIG)
    assert_clean(out)
    assert os.listdir(vroot) == ["v000002"]


def test_a_legacy_directory_is_adopted_and_a_foreign_one_refused(tmp_path):
    legacy = str(tmp_path / "legacy")
    old = old_save(legacy, legacy=True)
    assert on_disk(legacy) == old                                   # plain files still load
    save_checkpoint(legacy, make_params(seed=3), CONFIG)
    assert os.path.islink(os.path.join(legacy, "model.safetensors")) and "optimizer.safetensors" not in os.listdir(legacy)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer.json' is not a file minillm saved there"):
        save_checkpoint(str(foreign), make_params(), CONFIG)
    assert sorted(os.listdir(foreign)) == [".lock", "tokenizer.json"]


def test_kill_9_during_training_saves(tmp_path):
    """A real training that saves every step, killed (SIGKILL) at random moments and resumed: each time the
    directory holds one whole checkpoint whose files agree (checksums, optimizer and trainer step)."""
    from minillm import train
    from minillm.tokenizer import Tokenizer

    corpus = tmp_path / "small.txt"
    with open(os.path.join(HERE, "..", "data", "headlines.txt"), encoding="utf-8") as f:
        corpus.write_text("".join(f.readlines()[:300]), encoding="utf-8")
    tok = str(tmp_path / "tok.json")
    Tokenizer.train(corpus.read_text(), 280, progress=False).save(tok)
    out = str(tmp_path / "out")
    args = [sys.executable, "-m", "minillm", "train", str(corpus), "--out", out, "--tokenizer", tok,
            "--context", "8", "--layers", "1", "--heads", "1", "--d-model", "8", "--batch-size", "2",
            "--eval-every", "1", "--steps", "100000", "--quiet"]
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
    rng, steps = random.Random(0), []
    for attempt in range(3):
        proc = subprocess.Popen(args + (["--resume"] if attempt else []), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        start = load_checkpoint(out).trainer_state["step"] if attempt else 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:   # until this run has saved
            try:
                # (seen once in CI: a read during the first save returned no trainer state; the checks after
                # each kill below still require a whole checkpoint)
                state = load_checkpoint(out).trainer_state
                if state is not None and state["step"] >= start + 1:
                    break
            except ValueError:
                pass
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(rng.uniform(0, 0.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        ck = load_checkpoint(out)                  # whole: checksums, shapes and steps all agree
        assert ck.optimizer_state["step"] == ck.trainer_state["step"] > start
        steps.append(ck.trainer_state["step"])
    opts = train.TrainOptions(steps=steps[-1] + 1, batch_size=2, eval_every=1, out=out, resume=True,
                              progress=False)
    train.train(str(corpus), opts, {}, log=lambda m: None)        # resumes (in-process: no start-up time)
    assert load_checkpoint(out).trainer_state["step"] == steps[-1] + 1
    assert_clean(out)
    assert np.isfinite(load_checkpoint(out).trainer_state["val_loss"])


def test_a_reader_whose_version_a_save_removed_retries(tmp_path):
    out = str(tmp_path / "ck")
    old_save(out)
    kw, new = new_save()
    calls = []

    def reader(vdir, files):
        calls.append(vdir)
        if len(calls) == 1:                 # a save lands between resolving `current` and opening a file
            save_checkpoint(out, **kw)
        return open(os.path.join(vdir, "trainer_state.json")).read()
    assert store.read(out, reader) == '{\n  "step": 2\n}\n' and calls[0] != calls[1]


def test_a_save_of_another_kind_never_replaces_a_checkpoint(tmp_path):
    out = str(tmp_path / "ck")
    old = old_save(out)
    with pytest.raises(ValueError, match="holds another kind of save .*model.safetensors"):
        store.publish(out, {"adapter_model.safetensors": b"x", "adapter_config.json": "{}"},
                      known=("adapter_model.safetensors", "adapter_config.json"))
    assert on_disk(out) == old
