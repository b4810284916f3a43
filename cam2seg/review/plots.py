"""Report figures with matplotlib: arrays in, PNG bytes out (the report writes them)."""

from __future__ import annotations

import io as _io

import numpy as np

__all__ = ["dice_bars", "threshold_sweep", "score_histograms", "roc_curves", "png"]


def _figure(w: float, h: float):
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display on servers; the report only writes files
    from matplotlib.figure import Figure

    # A bare Figure (not pyplot) is never registered globally, so nothing leaks between plots.
    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def png(fig) -> bytes:
    buf = _io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def dice_bars(rows: dict[str, np.ndarray], class_names: list[str], title: str, ylabel: str) -> bytes:
    """Grouped bars: one group per class, one bar per row (``name -> float[C]``, NaN drawn as 0)."""
    # row names are long (a segmenter's recipe): the legend goes under the axes, one per line
    fig = _figure(max(6.0, 1.6 * len(class_names) + 2), 3.6 + 0.2 * len(rows))
    ax = fig.add_subplot()
    n = max(1, len(rows))
    width = 0.8 / n
    x = np.arange(len(class_names))
    for i, (name, vals) in enumerate(rows.items()):
        v = np.nan_to_num(np.asarray(vals, float))
        ax.bar(x + (i - (n - 1) / 2) * width, v, width, label=name)
    ax.set_xticks(x, class_names)
    ax.set_ylim(0, 1)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.legend(loc="outside lower center", fontsize=7, ncols=1)
    return png(fig)


def threshold_sweep(curves: dict[str, dict], class_names: list[str], ylabel: str) -> bytes:
    """Dice against the pixel threshold, one panel per source (``name -> {"threshold": float[T],
    "dice": float[C][T], "chosen": float[C]}``); the chosen threshold of each class is marked."""
    n = len(curves)
    fig = _figure(5.0 * n, 3.8)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (name, cv) in zip(axes, curves.items()):
        thr = np.asarray(cv["threshold"], float)
        for c, label in enumerate(class_names):
            d = np.asarray(cv["dice"][c], float)
            (line,) = ax.plot(thr, d, label=label)
            chosen = cv.get("chosen")
            if chosen is not None:
                j = int(np.argmin(np.abs(thr - chosen[c])))
                ax.plot(thr[j], d[j], "o", color=line.get_color())
        ax.set_xlabel("pixel threshold")
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return png(fig)


def score_histograms(scores: np.ndarray, class_names: list[str], labels: np.ndarray | None = None,
                     title: str = "") -> bytes:
    """Per class, the distribution of ``scores float[N, C]``; split by ``labels bool[N, C]``
    (label says present / absent) when given."""
    c = len(class_names)
    fig = _figure(3.2 * c, 2.8)
    axes = fig.subplots(1, c, squeeze=False)[0]
    bins = np.linspace(0, 1, 26)
    for k, ax in enumerate(axes):
        s = np.asarray(scores[:, k], float)
        if labels is None:
            ax.hist(s, bins=bins, color="tab:blue")
        else:
            y = np.asarray(labels[:, k], bool)
            ax.hist(s[~y], bins=bins, alpha=0.6, label="label: absent", color="tab:blue")
            ax.hist(s[y], bins=bins, alpha=0.6, label="label: present", color="tab:red")
            ax.legend(fontsize=7)
        ax.set_title(class_names[k], fontsize=9)
        ax.set_xlabel("score")
    fig.suptitle(title, fontsize=10)
    return png(fig)


def roc_curves(labels: np.ndarray, probs: np.ndarray, class_names: list[str], title: str) -> bytes:
    """ROC curve per class from ``labels bool[N, C]`` and ``probs float[N, C]`` (classes with one
    label value only are left out: their curve is undefined)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fig = _figure(4.6, 4.2)
    ax = fig.add_subplot()
    for k, name in enumerate(class_names):
        y = np.asarray(labels[:, k], bool)
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, probs[:, k])
            ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(y, probs[:, k]):.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return png(fig)
