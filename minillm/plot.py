"""`minillm plot`: training and validation loss against step (learning rate on a second axis) for one or
several runs, from their metrics.jsonl, into a PNG. matplotlib comes with the `plot` extra."""

import os

from minillm import metrics


def _matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise ValueError('minillm plot needs matplotlib: pip install "minillm[plot]"') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_runs(run_dirs, out_path, title=None):
    """run_dirs: directories holding metrics.jsonl -> writes out_path (PNG); returns out_path."""
    runs = []
    for d in run_dirs:
        path = os.path.join(d, "metrics.jsonl")
        if not os.path.exists(path):
            raise ValueError(f"{d}: no metrics.jsonl (written by minillm train)")
        records = metrics.read(path)
        steps = [r for r in records if "loss" in r]
        if not steps:
            raise ValueError(f"{path}: no training steps recorded")
        runs.append((d, steps, [r for r in records if r.get("val_loss") is not None]))
    plt = _matplotlib()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    lr_ax = ax.twinx()
    for i, (d, steps, evals) in enumerate(runs):
        colour = f"C{i}"
        name = os.path.basename(os.path.normpath(d)) or d
        ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], color=colour, alpha=0.45, lw=1,
                label=f"{name} train")
        if evals:
            ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", color=colour, lw=2,
                    ms=4, label=f"{name} validation")
        lr_ax.plot([r["step"] for r in steps], [r.get("lr") for r in steps], ":", color=colour, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    lr_ax.set_ylabel("learning rate (dotted)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title or "training and validation loss")
    fig.tight_layout()
    from minillm.fileio import atomic_write

    atomic_write(out_path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return out_path
