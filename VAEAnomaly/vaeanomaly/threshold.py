"""Turning a heatmap into a label: absolute, percentile or the checkpoint's calibrated threshold.

A signed map (polarity 'signed': positive where the scan is brighter than expected) has two thresholds, one per
tail (`Tails`): a voxel is brighter than expected where s > bright, darker where s < -dark (`resolve_tails`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tails:
    """A signed map's two thresholds (both >= 0 on any sensible map): flagged brighter than expected where
    s > bright, darker than expected where s < -dark. Also a pair of region peaks (the level each direction's
    region must reach, in the same units: the bright peak on s, the dark peak on -s)."""
    bright: float
    dark: float

    def __format__(self, spec: str) -> str:
        return f"+{format(self.bright, spec)} / -{format(self.dark, spec)}"

    def to_dict(self) -> dict:
        return {"bright": float(self.bright), "dark": float(self.dark)}


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


def resolve_tails(spec, heatmap: np.ndarray, brain: np.ndarray, calibrated: dict, predictor: str) -> Tails:
    """The two thresholds of a signed map: 'auto' the checkpoint's per-tail thresholds (calibrated[predictor], a
    Tails: calibration.auto_threshold); a percentile 'p99' the q-th percentile of |s| inside the brain on both tails;
    a number t on both tails (s > t brighter, s < -t darker)."""
    s = str(spec).strip().lower()
    if s == "auto":
        if predictor not in calibrated:
            raise ValueError(f"the checkpoint has no calibrated thresholds for '{predictor}'; "
                             f"give a number or a percentile such as p99")
        c = calibrated[predictor]
        return c if isinstance(c, Tails) else Tails(float(c), float(c))
    t = resolve_threshold(spec, np.abs(heatmap), brain, calibrated, predictor)
    return Tails(t, t)


def describe(kind: str, value: float = float("nan")) -> str:
    """Where a threshold came from, in words (the report): kind 'auto' / 'calibrated', 'percentile' (value: q) or
    'absolute'. One wording for the command line, the panel and the web page."""
    if kind in ("auto", "calibrated"):
        return "calibrated: the model's 99th percentile of held-out healthy brains"
    if kind in ("auto-signed", "calibrated-signed"):
        return ("calibrated per tail: the model's 99.5th percentiles of held-out healthy brains, brighter and darker "
                "than expected apart (1% of healthy brain flagged in all)")
    if kind == "percentile":
        return f"percentile: the {value:g}th percentile of this heatmap inside the brain"
    return "absolute: a number given by the user"
