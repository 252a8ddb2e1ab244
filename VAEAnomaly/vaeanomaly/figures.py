"""Figures people would rather look at than read: overlays, galleries, ROC curves."""
from __future__ import annotations

import numpy as np


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def overlay_figure(path, image: np.ndarray, maps: dict, label=None, title: str = "", n_slices: int = 3):
    """Rows of axial slices (z, y, x arrays): the input with ground truth contour, then each map."""
    plt = _plt()
    zs = _pick_slices(label if label is not None and label.any() else list(maps.values())[0], n_slices)
    cols = 1 + len(maps)
    fig, axes = plt.subplots(len(zs), cols, figsize=(2.4 * cols, 2.4 * len(zs)), squeeze=False)
    for r, z in enumerate(zs):
        axes[r, 0].imshow(image[z], cmap="gray")
        if label is not None:
            axes[r, 0].contour(label[z].astype(float), levels=[0.5], colors="lime", linewidths=0.8)
        axes[r, 0].set_title(f"input z={z}" if r == 0 else f"z={z}", fontsize=8)
        for c, (name, m) in enumerate(maps.items(), 1):
            axes[r, c].imshow(image[z], cmap="gray")
            hi = np.percentile(m[m > 0], 99.5) if (m > 0).any() else 1
            axes[r, c].imshow(np.ma.masked_less_equal(m[z], 0), cmap="inferno", alpha=0.7, vmin=0, vmax=hi)
            if r == 0:
                axes[r, c].set_title(name, fontsize=8)
    for a in axes.ravel():
        a.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pick_slices(vol, n):
    w = np.asarray(vol, dtype=float).reshape(len(vol), -1).sum(1)
    if not w.any():
        return [len(vol) // 2]
    order = np.argsort(-w)
    top = order[0]
    cands = [top] + [z for z in order[1:] if all(abs(z - t) > 3 for t in [top])]
    return sorted(set(int(z) for z in cands[:n]))


def roc_figure(path, curves: dict, title: str = ""):
    """curves: {name: (scores, labels)} -> ROC plot with AUROC in the legend."""
    from sklearn.metrics import roc_auc_score, roc_curve
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for name, (s, y) in curves.items():
        fpr, tpr, _ = roc_curve(y, s)
        step = max(1, len(fpr) // 2000)
        ax.plot(fpr[::step], tpr[::step], label=f"{name} ({roc_auc_score(y, s):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
