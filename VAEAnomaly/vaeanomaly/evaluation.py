"""Evaluation of predictors on a lesion cohort at the model grid (64x64 slices, the paper's protocol):
pixels of all cases pooled, reported inside the brain and over all pixels."""
from __future__ import annotations

import numpy as np

from .metrics import scoped_metrics
from .predictors import compute_maps


def collect_maps(checkpoint, cases, predictors, options=None, device="cpu", progress=None, cancel=None):
    """cases: iterable of (name, slices, brain, label). Returns ({predictor: pooled scores}, brain, label)
    with maps zeroed outside the brain, as the module shows them."""
    scores = {p: [] for p in predictors}
    brains, labels = [], []
    cases = list(cases)
    for i, (name, slices, brain, label) in enumerate(cases):
        maps = compute_maps(checkpoint.model, slices, predictors, checkpoint.beta, options, device,
                            ensemble=checkpoint.ensemble if "ensemble" in predictors else None, cancel=cancel)
        for p in predictors:
            scores[p].append(np.where(brain, maps[p], 0).astype(np.float32))
        brains.append(brain)
        labels.append(label)
        if progress:
            progress((i + 1) / len(cases))
    return {p: np.concatenate(v) for p, v in scores.items()}, np.concatenate(brains), np.concatenate(labels)


def evaluate(checkpoint, cases, predictors, options=None, device="cpu", progress=None) -> dict:
    """{predictor: {'brain': {...}, 'all': {...}}}."""
    scores, brain, label = collect_maps(checkpoint, cases, predictors, options, device, progress)
    return {p: scoped_metrics(s, label, brain) for p, s in scores.items()}


def format_table(results: dict, scope: str = "brain", metric: str = "auroc", row_header: str = "model") -> str:
    """Markdown table, one row per model ({row label: evaluate() result}), predictors as columns,
    the best value of each row in bold."""
    preds = list(next(iter(results.values())))
    lines = [f"| {row_header} | " + " | ".join(preds) + " |", "|---" * (len(preds) + 1) + "|"]
    for label, res in results.items():
        vals = [res[p][scope][metric] for p in preds]
        lines.append(f"| {label} | " + " | ".join(f"**{v:.3f}**" if v == max(vals) else f"{v:.3f}" for v in vals) + " |")
    return "\n".join(lines)
