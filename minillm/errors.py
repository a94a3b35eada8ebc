"""Exceptions the command line reports in its own way (it imports only this module to catch them)."""


class Interrupted(Exception):
    """Ctrl-C during training: the state after the last whole step was saved (train.fit); exit status 130."""

    def __init__(self, step, out):
        super().__init__(f"interrupted at step {step}; its checkpoint is in {out}/ "
                         f"(--resume continues the run exactly)")
        self.step, self.out = step, out
