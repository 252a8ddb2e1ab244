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


def healthy_threshold(score_fn, healthy_cases, q: float = 99.0, spacings: dict | None = None) -> float:
    """A scorer's calibrated threshold: the q-th percentile of score_fn(slices, brain, spacing) inside healthy
    brains (healthy_cases: (name, slices, brain, ...) tuples; spacings: {name: (x, y, z) mm}, where known), as
    calibration.calibrate computes the checkpoints'."""
    sp = spacings or {}
    return float(np.percentile(np.concatenate([score_fn(c[1], c[2], sp.get(c[0]))[c[2]] for c in healthy_cases]), q))


def intensity_threshold(healthy_cases, q: float = 99.0) -> float:
    """The baseline's 'calibrated' threshold: q-th percentile of the z-scored scan inside healthy brains."""
    return healthy_threshold(lambda x, b, s: x, healthy_cases, q)


def benchmark(score_fns: dict, cases, groups: dict, thresholds: dict, progress=None, spacings=None,
              min_region_mm3: float = None, peaks: dict | None = None) -> list[dict]:
    """Per (family, domain) and scorer: what a clinician gets beside the oracle metrics.

    score_fns: {scorer: f(slices, brain, spacing or None) -> maps (N, S, S)}; cases: iterable of (name, slices, brain, label);
    groups: {case name: (domain, family or None for healthy)}; thresholds: {scorer: calibrated threshold}.
    spacings: {case name: (x, y, z) mm of its model grid} for the lesion-wise counts (default: 3.75 mm cubes);
    min_region_mm3: regions above the threshold smaller than this are dropped (regions.DEFAULT_MIN_REGION_MM3);
    peaks: {scorer: region peak}: regions whose highest score stays below it are dropped too (as the label does).
    Returns rows {scorer, family, domain, n_cases, auroc, ap, dice_oracle, dice_calibrated,
    lesion_flagged_pct, healthy_flagged_pct, n_lesions, lesions_found_pct, false_regions_per_healthy_scan}
    (healthy_flagged_pct: % of healthy brain pixels above the calibrated threshold in healthy cases of that domain;
    AUROC/AP/Dice pool the pixels of the cases; lesions_found_pct: share of the 3D lesions of the cases with at
    least one voxel in a kept region above the threshold; false regions: kept regions on healthy scans)."""
    from .metrics import dice, pixel_metrics
    from .regions import DEFAULT_MIN_REGION_MM3, lesion_detection
    min_region_mm3 = DEFAULT_MIN_REGION_MM3 if min_region_mm3 is None else min_region_mm3
    cases = list(cases)
    pooled = {}  # (scorer, domain, family) -> [scores in brain], [labels in brain]
    counts = {}  # (scorer, domain, family) -> [n_lesions, found, false regions, cases]
    for i, (name, slices, brain, label) in enumerate(cases):
        dom, fam = groups[name]
        spacing = (spacings or {}).get(name) or (240 / slices.shape[-1],) * 3
        for scorer, f in score_fns.items():
            full = f(slices, brain, (spacings or {}).get(name))
            s = full[brain]
            pooled.setdefault((scorer, dom, fam), ([], []))
            pooled[(scorer, dom, fam)][0].append(s.astype(np.float32))
            pooled[(scorer, dom, fam)][1].append(label[brain])
            if thresholds.get(scorer) is not None:
                d = lesion_detection(full, label, brain, thresholds[scorer], spacing, min_region_mm3,
                                     (peaks or {}).get(scorer))
                c = counts.setdefault((scorer, dom, fam), [0, 0, 0, 0])
                c[0], c[1], c[2], c[3] = c[0] + d["n_lesions"], c[1] + d["found"], c[2] + d["false_regions"], c[3] + 1
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
        les = counts.get((scorer, dom, fam), [0, 0, 0, 0])
        hc = counts.get((scorer, dom, None))
        rows.append({"scorer": scorer, "family": fam, "domain": dom,
                     "n_cases": sum(1 for n, _, _, _ in cases if groups[n] == (dom, fam)),
                     "auroc": m["auroc"], "ap": m["ap"], "dice_oracle": m["dice"],
                     "dice_calibrated": dice(s > thr, y) if thr is not None else float("nan"),
                     "lesion_flagged_pct": float(100 * (s[y] > thr).mean()) if thr is not None else float("nan"),
                     "healthy_flagged_pct": hf, "n_lesions": les[0],
                     "lesions_found_pct": float(100 * les[1] / les[0]) if les[0] else float("nan"),
                     "false_regions_per_healthy_scan": float(hc[2] / hc[3]) if hc and hc[3] else float("nan")})
    return rows


def intensity_rows(cases, groups: dict, healthy_cases, size: int, spacings=None, min_region_mm3: float = None,
                   peak_q: float | None = None) -> list[dict]:
    """`benchmark` rows of the plain-intensity baseline, scorer 'intensity (SxS)': the z-scored scan itself as the
    score, its threshold the 99th percentile on the healthy cases, regions kept by the peak_q-th percentile (None:
    every region)."""
    name = f"{INTENSITY} ({size}x{size})"
    score = lambda x, b, s: x  # noqa: E731
    peak = None if peak_q is None else healthy_threshold(score, healthy_cases, peak_q)
    return benchmark({name: score}, cases, groups, {name: healthy_threshold(score, healthy_cases)},
                     spacings=spacings, min_region_mm3=min_region_mm3, peaks={name: peak})


def write_rows(path, rows: list[dict]) -> None:
    """Rows of dicts as a CSV file (the columns of the first row)."""
    import csv
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def format_benchmark(rows: list[dict]) -> str:
    """Markdown: one table per lesion family, rows domain x scorer."""
    out = []
    for fam in dict.fromkeys(r["family"] for r in rows):
        out += [f"### {fam}", "",
                "| domain | scorer | cases | healthy brain flagged % (calibrated) | false regions per healthy scan | "
                "Dice (calibrated) | lesion recall % (calibrated) | lesions found | AUROC | AP | "
                "best Dice (oracle threshold) |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["family"] == fam:
                out.append(f"| {r['domain']} | {r['scorer']} | {r['n_cases']} | {r['healthy_flagged_pct']:.2f} | "
                           f"{r.get('false_regions_per_healthy_scan', float('nan')):.1f} | "
                           f"{r['dice_calibrated']:.3f} | {r['lesion_flagged_pct']:.1f} | {_found(r)} | "
                           f"{r['auroc']:.3f} | {r['ap']:.3f} | {r['dice_oracle']:.3f} |")
        out.append("")
    return "\n".join(out)


def _found(r: dict) -> str:
    n = r.get("n_lesions") or 0
    return f"{r['lesions_found_pct']:.0f}% of {n}" if n else "-"


def headline_table(rows: list[dict], scorer: str, baseline: str) -> str:
    """One compact table for a README: the scorer's clinician numbers and oracle metrics per family x domain,
    the baseline's AUROC/AP beside them (bold where the scorer is worse than the baseline)."""
    base = {(r["family"], r["domain"]): r for r in rows if r["scorer"] == baseline}
    out = ["| lesion family | domain | healthy brain flagged % | false regions per healthy scan | Dice (calibrated) | "
           "lesions found | AUROC (intensity) | AP (intensity) | best Dice (oracle) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["scorer"] != scorer:
            continue
        b = base.get((r["family"], r["domain"]))
        worse = lambda k: b is not None and r[k] < b[k]  # noqa: E731
        fmt = lambda k: (f"**{r[k]:.3f}**" if worse(k) else f"{r[k]:.3f}") + (f" ({b[k]:.3f})" if b else "")  # noqa: E731
        out.append(f"| {r['family']} | {r['domain']} | {r['healthy_flagged_pct']:.2f} | "
                   f"{r.get('false_regions_per_healthy_scan', float('nan')):.1f} | {r['dice_calibrated']:.3f} | "
                   f"{_found(r)} | {fmt('auroc')} | {fmt('ap')} | {r['dice_oracle']:.3f} |")
    return "\n".join(out)
