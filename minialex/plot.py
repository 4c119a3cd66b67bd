"""Training curves and confusion matrices as PNG files, with matplotlib (an optional extra).

matplotlib is imported only when a plot is asked for, with the non-interactive Agg backend, so a
headless server never needs a display and minialex never needs matplotlib to train.
"""
from .errors import MinialexError
from .files import write_atomically

_MISSING = "-plot needs matplotlib, which is not installed (pip install 'minialex[plot]' or pip install matplotlib)"


def require_matplotlib():
    """The pyplot module; MinialexError with the install command when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MinialexError(_MISSING) from None
    return plt


def _save(fig, plt, path):
    # Atomic: a viewer refreshing the file never sees half a PNG.
    try:
        write_atomically(path, lambda f: fig.savefig(f, dpi=100, format="png"), what="plot")
    finally:
        plt.close(fig)


def plot_curves(history, path):
    """Loss (train, validation) and accuracy (train, validation top-1/top-5) against the epoch."""
    plt = require_matplotlib()
    epochs = [r["epoch"] for r in history]

    def series(key):
        pts = [(r["epoch"], r[key]) for r in history if r.get(key) is not None]
        return [e for e, _ in pts], [v for _, v in pts]

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(*series("train_loss"), "o-", label="train")
    ax_loss.plot(*series("val_loss"), "s-", label="validation")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    for key, label, style in (("train_acc", "train", "o-"), ("val_top1", "validation top-1", "s-"),
                              ("val_top5", "validation top-5", "^--")):
        e, v = series(key)
        ax_acc.plot(e, [100 * x for x in v], style, label=label)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.legend()
    ax_acc.grid(alpha=0.3)
    if epochs:
        for ax in (ax_loss, ax_acc):
            ax.set_xticks(epochs if len(epochs) <= 20 else epochs[::max(1, len(epochs) // 10)])
    fig.tight_layout()
    _save(fig, plt, path)


def plot_confusion(confusion, class_names, path):
    """The confusion matrix as an image, rows normalised to the true class's count."""
    plt = require_matplotlib()
    c = len(class_names)
    rows = confusion.sum(axis=1, keepdims=True)
    share = confusion / (rows + (rows == 0))
    size = min(4 + 0.4 * c, 30)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    if c <= 40:
        ax.set_xticks(range(c), [n[:15] for n in class_names], rotation=90)
        ax.set_yticks(range(c), [n[:15] for n in class_names])
    if c <= 20:
        for i in range(c):
            for j in range(c):
                if confusion[i, j]:
                    ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if share[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    _save(fig, plt, path)
