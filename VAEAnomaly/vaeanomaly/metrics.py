"""Pixel-level metrics: AUROC, average precision and best Dice over thresholds.

Every result names its scope: 'brain' (pixels inside the brain mask) or 'all' (every pixel of
every slice, background included, as the reference code pools them).
"""
from __future__ import annotations

import numpy as np


def _validate(scores, labels):
    s = np.asarray(scores).ravel()
    if s.dtype not in (np.float32, np.float64):
        s = s.astype(np.float64)
    y = np.asarray(labels).ravel().astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.size}) and labels ({y.size}) differ in size")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinity")
    if y.all() or not y.any():
        raise ValueError("labels must contain both lesion and healthy pixels")
    return s, y


def pixel_metrics(scores, labels) -> dict:
    """{'auroc', 'ap', 'dice', 'dice_threshold'} pooled over all given pixels.

    One sort serves all three (tens of millions of pixels in seconds); ties are grouped into one
    threshold. AP is sklearn's step-wise definition; Dice at a threshold equals F1."""
    s, y = _validate(scores, labels)
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s) - 1]  # last index of each tied group
    tp = np.cumsum(y_sorted, dtype=np.int64)[last].astype(np.float64)
    fp = (last + 1) - tp
    pos, neg = tp[-1], fp[-1]
    tpr, fpr = np.r_[0.0, tp / pos], np.r_[0.0, fp / neg]
    auroc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    precision, recall = tp / (tp + fp), tp / pos
    ap = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1))
    return {"auroc": auroc, "ap": ap, "dice": float(f1[best]), "dice_threshold": float(s_sorted[last[best]])}


def scoped_metrics(scores, labels, mask) -> dict:
    """{'brain': metrics inside mask, 'all': metrics over every pixel}."""
    m = np.asarray(mask).astype(bool)
    s, y = np.asarray(scores), np.asarray(labels).astype(bool)
    return {"brain": pixel_metrics(s[m], y[m]), "all": pixel_metrics(s, y)}


def dice(a, b) -> float:
    a, b = np.asarray(a).astype(bool), np.asarray(b).astype(bool)
    denom = a.sum() + b.sum()
    return float(2 * (a & b).sum() / denom) if denom else 1.0
