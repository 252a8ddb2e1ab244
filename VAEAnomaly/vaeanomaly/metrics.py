"""Pixel-level metrics: AUROC, average precision and best Dice over thresholds.

Every result names its scope: 'brain' (pixels inside the brain mask) or 'all' (every pixel of
every slice, background included, as the reference code pools them).
"""
from __future__ import annotations

import numpy as np


def _validate(scores, labels):
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.size}) and labels ({y.size}) differ in size")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinity")
    if y.all() or not y.any():
        raise ValueError("labels must contain both lesion and healthy pixels")
    return s, y


def pixel_metrics(scores, labels) -> dict:
    """{'auroc', 'ap', 'dice', 'dice_threshold'} pooled over all given pixels."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score
    s, y = _validate(scores, labels)
    prec, rec, thr = precision_recall_curve(y, s)
    f1 = 2 * prec * rec / np.maximum(prec + rec, 1e-12)  # Dice == F1 at each threshold
    best = int(np.argmax(f1[:-1])) if len(thr) else 0
    return {"auroc": float(roc_auc_score(y, s)), "ap": float(average_precision_score(y, s)),
            "dice": float(f1[best]), "dice_threshold": float(thr[best]) if len(thr) else float("nan")}


def scoped_metrics(scores, labels, mask) -> dict:
    """{'brain': metrics inside mask, 'all': metrics over every pixel}."""
    m = np.asarray(mask).astype(bool)
    s, y = np.asarray(scores), np.asarray(labels).astype(bool)
    return {"brain": pixel_metrics(s[m], y[m]), "all": pixel_metrics(s, y)}


def dice(a, b) -> float:
    a, b = np.asarray(a).astype(bool), np.asarray(b).astype(bool)
    denom = a.sum() + b.sum()
    return float(2 * (a & b).sum() / denom) if denom else 1.0
