"""errors.py: the message and fields of Interrupted (what `minillm train` prints on Ctrl-C)."""

from minillm.errors import Interrupted


def test_interrupted_names_the_step_and_the_directory():
    e = Interrupted(5, "out")
    assert e.step == 5 and e.out == "out"
    assert str(e).startswith("interrupted at step 5; its checkpoint is in out/") and "--resume" in str(e)
