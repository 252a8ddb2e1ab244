"""Turning a heatmap into a label: absolute, percentile or the checkpoint's calibrated threshold."""
from __future__ import annotations

import numpy as np


def resolve_threshold(spec, heatmap: np.ndarray, brain: np.ndarray, calibrated: dict, predictor: str) -> float:
    """spec: a number ('0.8'), a percentile inside the brain ('p99'), or 'auto' (the threshold the
    checkpoint calibrated on held-out healthy slices for this predictor)."""
    s = str(spec).strip().lower()
    if s == "auto":
        if predictor not in calibrated:
            raise ValueError(f"the checkpoint has no calibrated threshold for '{predictor}'; "
                             f"give a number or a percentile such as p99")
        return float(calibrated[predictor])
    if s.startswith("p"):
        q = float(s[1:])
        if not 0 <= q <= 100:
            raise ValueError(f"percentile {q} is outside 0-100")
        vals = heatmap[brain.astype(bool)]
        return float(np.percentile(vals, q)) if vals.size else float("inf")
    try:
        return float(s)
    except ValueError:
        raise ValueError(f"threshold '{spec}' is not a number, a percentile like p99, or 'auto'") from None


def describe(kind: str, value: float = float("nan")) -> str:
    """Where a threshold came from, in words (the report): kind 'auto' / 'calibrated', 'percentile' (value: q) or
    'absolute'. One wording for the command line, the panel and the web page."""
    if kind in ("auto", "calibrated"):
        return "calibrated: the model's 99th percentile of held-out healthy brains"
    if kind == "percentile":
        return f"percentile: the {value:g}th percentile of this heatmap inside the brain"
    return "absolute: a number given by the user"
