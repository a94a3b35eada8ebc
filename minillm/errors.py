"""Exceptions the command line reports in its own way (it imports only this module to catch them)."""


class Interrupted(Exception):
    """Ctrl-C during training: the state after the last whole step was saved (train.fit); exit status 130.
    Under MPI every rank raises it after the same step (fit agrees on it), so rank 0 alone reports it."""
    all_ranks = True

    def __init__(self, step, out):
        super().__init__(f"interrupted at step {step}; its checkpoint is in {out}/ "
                         f"(--resume continues the run exactly)")
        self.step, self.out = step, out
