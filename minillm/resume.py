"""`train --resume`: the checkpoint to continue, checked against the flags, and the schedule it carries.

The architecture and sizes come from the checkpoint's config (a flag that contradicts them is an error);
the schedule (SCHEDULE, saved as trainer_state.json "schedule") is taken from it for every option the user
did not give; a larger --steps extends the run. The batch streams continue from the saved RNG states
(train_step.batch_rngs), which needs the same number of MPI processes and --grad-accum.
"""

import os

from minillm import checkpoint, validate

# What --resume takes from the checkpoint's trainer_state.json ("schedule") unless given explicitly.
SCHEDULE = ("steps", "batch_size", "lr", "min_lr_ratio", "warmup", "weight_decay", "grad_clip")


def check_config(saved, requested):
    for key, value in requested.items():
        if value is not None and key in saved and saved[key] != value:
            raise ValueError(f"--resume: the checkpoint has {key}={saved[key]!r} but {value!r} was asked for; "
                             "drop the flag or start a new --out")


def take_schedule(opts, saved):
    """opts with the schedule of the run being resumed (trainer_state "schedule"): an option the user did not
    give is taken from it, one given with another value is an error, except a larger --steps, which extends
    the run (the cosine decay is then recomputed to end at the new total: from this step on the learning
    rate follows the longer schedule, so it rises to where that schedule is)."""
    if opts.explicit is None:
        return
    for key in SCHEDULE:
        if key not in saved:
            continue
        if key not in opts.explicit:
            setattr(opts, key, type(getattr(opts, key))(saved[key]))
        elif getattr(opts, key) != saved[key] and not (key == "steps" and opts.steps > saved[key]):
            flag = "--" + key.replace("_", "-")
            raise ValueError(f"--resume: the run was trained with {flag} {saved[key]}, not {getattr(opts, key)}; "
                             f"drop {flag} (the schedule comes from the checkpoint) or start a new --out")


def load(opts, arch, config_overrides):
    """The checkpoint in opts.out, checked for resuming to opts.steps."""
    ckpt = checkpoint.load_checkpoint(opts.out, arch=arch)
    check_config(ckpt.config, config_overrides)
    tokenizer = checkpoint.load_tokenizer(ckpt)
    if ckpt.optimizer_state is None or ckpt.trainer_state is None:
        raise ValueError(f"{opts.out!r} has no optimizer and trainer state to resume from")
    step = ckpt.trainer_state.get("step", 0)
    if opts.steps < step:
        raise ValueError(f"--resume --steps {opts.steps}: the checkpoint in {opts.out!r} is already at step "
                         f"{step}; give --steps {step} or more")
    take_schedule(opts, ckpt.trainer_state.get("schedule") or {})
    saved_documents = ckpt.config.get("documents", "lines")
    if opts.documents != saved_documents:
        if opts.explicit is not None and "documents" not in opts.explicit:
            opts.documents = saved_documents
        else:
            raise ValueError(f"--resume: the run was trained with --documents {saved_documents}, not "
                             f"{opts.documents}")
    if ckpt.trainer_state.get("rng_state") is not None:   # garbage is refused before any work
        checkpoint.rng_from_state(ckpt.trainer_state["rng_state"],
                                  f"'{os.path.join(opts.out, checkpoint.TRAINER_FILE)}' (rng_state)")
    validate.check_memory(validate.training_bytes(ckpt.config, opts.batch_size),
                          f"training (--batch-size {opts.batch_size})")
    return ckpt, tokenizer
