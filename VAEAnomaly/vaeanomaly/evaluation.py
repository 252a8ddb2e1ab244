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
    from .calibration import inference_kwargs
    kwargs = inference_kwargs(checkpoint, predictors, options)  # the ensemble, Combi's constants
    for i, (name, slices, brain, label) in enumerate(cases):
        if progress is not None and hasattr(progress, "stage"):
            progress.stage(f"case {name} ({i + 1}/{len(cases)})")
        case_progress = (lambda f, i=i: progress((i + f) / len(cases))) if progress else None
        if case_progress is not None and hasattr(progress, "stage"):
            case_progress.stage = lambda text, name=name, i=i: progress.stage(f"case {name} ({i + 1}/{len(cases)}): {text}")
        maps = compute_maps(checkpoint.model, slices, predictors, checkpoint.beta, options, device,
                            progress=case_progress, cancel=cancel, **kwargs)
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


# --------------------------------------------------------------------------- the clinician's benchmark
INTENSITY = "intensity"  # the plain-intensity baseline: the z-scored scan itself as the score


def intensity_threshold(healthy_cases, q: float = 99.0) -> float:
    """The baseline's 'calibrated' threshold: q-th percentile of the z-scored scan inside healthy brains."""
    vals = np.concatenate([s[b] for _, s, b, _ in healthy_cases])
    return float(np.percentile(vals, q))


def benchmark(score_fns: dict, cases, groups: dict, thresholds: dict, progress=None) -> list[dict]:
    """Per (family, domain) and scorer: what a clinician gets beside the oracle metrics.

    score_fns: {scorer: f(slices) -> maps (N, S, S)}; cases: iterable of (name, slices, brain, label);
    groups: {case name: (domain, family or None for healthy)}; thresholds: {scorer: calibrated threshold}.
    Returns rows {scorer, family, domain, n_cases, auroc, ap, dice_oracle, dice_calibrated,
    lesion_flagged_pct, healthy_flagged_pct} (healthy_flagged_pct: % of healthy brain pixels above the
    calibrated threshold in healthy cases of that domain; AUROC/AP/Dice pool the pixels of the cases)."""
    from .metrics import dice, pixel_metrics
    cases = list(cases)
    pooled = {}  # (scorer, domain, family) -> [scores in brain], [labels in brain]
    for i, (name, slices, brain, label) in enumerate(cases):
        dom, fam = groups[name]
        for scorer, f in score_fns.items():
            s = f(slices)[brain]
            pooled.setdefault((scorer, dom, fam), ([], []))
            pooled[(scorer, dom, fam)][0].append(s.astype(np.float32))
            pooled[(scorer, dom, fam)][1].append(label[brain])
        if progress:
            progress((i + 1) / len(cases))
    rows = []
    for (scorer, dom, fam), (s, y) in sorted(pooled.items(), key=lambda kv: (str(kv[0][2]), kv[0][1], kv[0][0])):
        if fam is None:
            continue
        s, y = np.concatenate(s), np.concatenate(y)
        thr = thresholds.get(scorer)
        m = pixel_metrics(s, y)
        healthy = pooled.get((scorer, dom, None))
        hf = float(100 * (np.concatenate(healthy[0]) > thr).mean()) if healthy and thr is not None else float("nan")
        rows.append({"scorer": scorer, "family": fam, "domain": dom,
                     "n_cases": sum(1 for n, _, _, _ in cases if groups[n] == (dom, fam)),
                     "auroc": m["auroc"], "ap": m["ap"], "dice_oracle": m["dice"],
                     "dice_calibrated": dice(s > thr, y) if thr is not None else float("nan"),
                     "lesion_flagged_pct": float(100 * (s[y] > thr).mean()) if thr is not None else float("nan"),
                     "healthy_flagged_pct": hf})
    return rows


def format_benchmark(rows: list[dict]) -> str:
    """Markdown: one table per lesion family, rows domain x scorer."""
    out = []
    for fam in dict.fromkeys(r["family"] for r in rows):
        out += [f"### {fam}", "",
                "| domain | scorer | cases | healthy brain flagged % (calibrated) | Dice (calibrated) | "
                "lesion recall % (calibrated) | AUROC | AP | best Dice (oracle threshold) |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["family"] == fam:
                out.append(f"| {r['domain']} | {r['scorer']} | {r['n_cases']} | {r['healthy_flagged_pct']:.2f} | "
                           f"{r['dice_calibrated']:.3f} | {r['lesion_flagged_pct']:.1f} | {r['auroc']:.3f} | "
                           f"{r['ap']:.3f} | {r['dice_oracle']:.3f} |")
        out.append("")
    return "\n".join(out)


def headline_table(rows: list[dict], scorer: str, baseline: str) -> str:
    """One compact table for a README: the scorer's clinician numbers and oracle metrics per family x domain,
    the baseline's AUROC/AP beside them (bold where the scorer is worse than the baseline)."""
    base = {(r["family"], r["domain"]): r for r in rows if r["scorer"] == baseline}
    out = ["| lesion family | domain | healthy brain flagged % | Dice (calibrated) | AUROC (intensity) | "
           "AP (intensity) | best Dice (oracle) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["scorer"] != scorer:
            continue
        b = base.get((r["family"], r["domain"]))
        worse = lambda k: b is not None and r[k] < b[k]  # noqa: E731
        fmt = lambda k: (f"**{r[k]:.3f}**" if worse(k) else f"{r[k]:.3f}") + (f" ({b[k]:.3f})" if b else "")  # noqa: E731
        out.append(f"| {r['family']} | {r['domain']} | {r['healthy_flagged_pct']:.2f} | {r['dice_calibrated']:.3f} | "
                   f"{fmt('auroc')} | {fmt('ap')} | {r['dice_oracle']:.3f} |")
    return "\n".join(out)
