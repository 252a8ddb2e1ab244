"""Evaluate checkpoints on a lesion cohort: the paper's Tables 1/2 layout (pixel AUROC per
predictor, one row per model), plus AP and best Dice, inside the brain and over all pixels;
ROC curves and a heatmap gallery as PNG.

    python training/evaluate.py --cache data/lesion.npz --checkpoints runs/l32_b1.safetensors \\
        runs/l64_b1.safetensors --row latent --out docs/table1 --title "Table 1: VAE, latent size"
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

import common  # noqa: F401
from vaeanomaly.checkpoint import load_checkpoint, update_metadata
from vaeanomaly.evaluation import collect_maps, format_table
from vaeanomaly.figures import overlay_figure, roc_figure
from vaeanomaly.metrics import scoped_metrics
from vaeanomaly.predictors import PredictorOptions, parse_predictors
from vaeanomaly.registry import PREDICTOR_INFO

METRICS = (("auroc", "pixel AUROC"), ("ap", "average precision"), ("dice", "best Dice"))


def row_label(ck, row: str) -> str:
    return {"latent": f"{ck.model.latent_dim}", "beta": f"{ck.beta:g}"}.get(row, ck.name)


def case_verdicts(ck, cache, groups, opts, device) -> list[dict]:
    """The out-of-distribution verdict (vaeanomaly.verdict) of every benchmark case, on the model grid."""
    from vaeanomaly.verdict import assess_slices
    rows = []
    for name, slices, brain, _ in cache.cases():
        r = assess_slices(ck, slices, brain, options=opts, device=device)
        dom, fam = groups[name]
        rows.append({"model": ck.name, "case": name, "domain": dom, "family": fam or "healthy",
                     "in_distribution": r["in_distribution"], "fit": r["fit"], "flagged_percent": r["flagged_percent"],
                     "warnings": " | ".join(r["warnings"])})
    return rows


def verdict_table(verdicts: list[dict], stem: str) -> str:
    """Share of cases the verdict calls in-distribution, per model and domain (healthy / lesion cases)."""
    if not verdicts:
        return ""
    lines = ["## Out-of-distribution verdict per case", "",
             "Share of benchmark cases whose verdict is `in_distribution: true` (healthy cases / lesion cases); "
             f"every case with its fit and warnings: [{stem}_verdicts.csv]({stem}_verdicts.csv).", "",
             "| model | domain | healthy in-distribution | lesion cases in-distribution |", "|---|---|---|---|"]
    keys = dict.fromkeys((v["model"], v["domain"]) for v in verdicts)
    for m, d in keys:
        h = [v["in_distribution"] for v in verdicts if (v["model"], v["domain"]) == (m, d) and v["family"] == "healthy"]
        les = [v["in_distribution"] for v in verdicts if (v["model"], v["domain"]) == (m, d) and v["family"] != "healthy"]
        lines.append(f"| {m} | {d} | {sum(h)}/{len(h)} | {sum(les)}/{len(les)} |")
    return "\n".join(lines) + "\n"


def variant_options(spec: str, a) -> PredictorOptions:
    """'default', 'paper', or a preset followed by key=value changes: 'paper,polarity=bright', 'smooth_mm=4'."""
    parts = [s for s in spec.split(",") if s]
    preset = parts.pop(0) if parts and "=" not in parts[0] else "default"
    changes = {"batch_size": a.batch_size, "proj_steps": a.proj_steps}
    fields = PredictorOptions.__dataclass_fields__
    for kv in parts:
        k, v = kv.split("=", 1)
        if k not in fields:
            raise SystemExit(f"--variants {spec}: unknown option '{k}' (known: {', '.join(fields)})")
        t = str(fields[k].type)  # the annotation: 'bool', 'int', 'float', 'Optional[float]', 'Optional[str]', ...
        changes[k] = (v.lower() in ("1", "true", "yes") if "bool" in t else int(v) if "int" in t else
                      float(v) if "float" in t else v)
    return PredictorOptions.preset(preset, **changes)


def grid_spacings(folder: Path, names, size: int, fov_mm: float = 240.0) -> dict:
    """{case: (x, y, z) mm of its model grid}: fov/size in plane, the scan's slice spacing across (the model grid
    has one slice per input slice along the axis closest to inferior-superior), read from the image headers."""
    from vaeanomaly.data import slice_spacings
    return {n: (fov_mm / size, fov_mm / size, z) for n, z in slice_spacings(folder, names).items()}


def run_benchmark(a, device) -> None:
    """Per lesion family x domain: healthy-brain flagged %, Dice and lesion recall at the calibrated threshold
    (what a clinician gets), and AUROC, AP and best Dice at the oracle threshold, for each checkpoint and the
    plain-intensity baseline (the z-scored scan), on the held-out benchmark of a generated cohort folder."""
    from common import command_line, hardware
    from vaeanomaly.data import SliceCache
    from vaeanomaly.evaluation import (INTENSITY, benchmark, format_benchmark, healthy_threshold, intensity_rows,
                                       write_rows)
    from vaeanomaly.calibration import PEAK_QUANTILE, calibrated_threshold, inference_kwargs, region_peak
    from vaeanomaly.predictors import compute_maps
    from vaeanomaly.registry import DEFAULT_PREDICTORS
    from vaeanomaly.synth import DOMAINS, read_manifest
    root = Path(a.benchmark)
    manifest = read_manifest(root / a.split)
    if manifest is None:
        raise SystemExit(f"{root / a.split} has no cohort.json: make it with training/make_data.py varied")
    groups = {c["case"]: (c["domain"], c["family"]) for c in manifest.values()}
    caches, rows, verdicts, sizes, t0 = {}, [], [], {}, time.time()
    variants = {v: variant_options(v, a) for v in a.variants}

    def cache_for(size):
        if size not in caches:
            bench = SliceCache.load(root / f"{a.split}_{size}.npz")
            calib = list(SliceCache.load(root / f"calibration_{size}.npz").cases())
            calib_sp = grid_spacings(root / "calibration", [c[0] for c in calib], size)
            caches[size] = (bench, calib, grid_spacings(root / a.split, bench.names, size), calib_sp)
        return caches[size]

    from tqdm import tqdm
    for path in a.checkpoints:
        ck = load_checkpoint(path, device)
        size = ck.model.image_size
        sizes[ck.name] = size
        bench, calib, spacings, calib_spacings = cache_for(size)
        preds = parse_predictors(DEFAULT_PREDICTORS[ck.kind] if a.predictors == "default" else a.predictors,
                                 kind=None)
        preds = [p for p in preds if ck.kind in PREDICTOR_INFO[p].models]
        fns = {}
        for v, opts in variants.items():
            for p in preds:
                kw = inference_kwargs(ck, [p], opts)  # the ensemble, Combi's constants
                fns[f"{ck.name} {p}" + (f" [{v}]" if v != "default" else "")] = \
                    lambda x, b, sp, p=p, opts=opts, ck=ck, kw=kw: compute_maps(
                        ck.model, x, [p], ck.beta, opts, device, brain=b, slice_mm=sp[2] if sp else None, **kw)[p]
        # the checkpoint's calibrated threshold where it holds for the variant's options (what a clinician gets with
        # --threshold auto); else, computed as calibration does: the 99th percentile on the healthy calibration split
        thr, peaks = {}, {}
        for v, opts in variants.items():
            for p in preds:
                key = f"{ck.name} {p}" + (f" [{v}]" if v != "default" else "")
                try:
                    thr[key] = calibrated_threshold(ck, p, opts)
                except ValueError:
                    thr[key] = healthy_threshold(fns[key], calib, spacings=calib_spacings)
                # the region peak the label keeps regions by (hysteresis); computed as calibration does where the
                # checkpoint has none for these options
                peaks[key] = None if a.all_regions or a.peak_quantile else region_peak(ck, p, opts)
                if peaks[key] is None and not a.all_regions:
                    peaks[key] = healthy_threshold(fns[key], calib, a.peak_quantile or PEAK_QUANTILE,
                                                   spacings=calib_spacings)
        bar = tqdm(total=len(bench.names), desc=f"{a.split} {ck.name}", file=sys.stderr)
        rows += benchmark(fns, bench.cases(), groups, thr, spacings=spacings, min_region_mm3=a.min_region_mm3,
                          progress=lambda f: bar.update(round(f * len(bench.names)) - bar.n), peaks=peaks)
        bar.close()
        if not a.no_verdicts:
            verdicts += case_verdicts(ck, bench, groups, variants[a.variants[0]], device)
    for size in sorted(caches):
        bench, calib, spacings, _ = caches[size]
        rows += intensity_rows(bench.cases(), groups, calib, size, spacings, a.min_region_mm3,
                               None if a.all_regions else a.peak_quantile or PEAK_QUANTILE)
    elapsed = time.time() - t0
    rows.sort(key=lambda r: (list(dict.fromkeys(c["family"] for c in manifest.values() if c["family"])).index(r["family"]),
                             r["domain"], r["scorer"]))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_rows(f"{out}.csv", rows)
    if verdicts:
        write_rows(f"{out}_verdicts.csv", verdicts)
    doms = sorted({g[0] for g in groups.values()})
    from vaeanomaly.checkpoint import DEFAULT_MODEL
    from vaeanomaly.evaluation import headline_table
    from vaeanomaly.registry import DEFAULT_PREDICTOR
    from vaeanomaly.registry import DEFAULT_PREDICTORS
    lead = a.lead or f"{DEFAULT_MODEL} {DEFAULT_PREDICTORS[load_checkpoint(DEFAULT_MODEL).kind]}"
    lead = lead if any(r["scorer"] == lead for r in rows) else rows[0]["scorer"]
    lead_size = next((sz for n, sz in sizes.items() if lead.startswith(n + " ")), 64)
    base = f"{INTENSITY} ({lead_size}x{lead_size})"
    headline = (f"## Headline: {lead}\n\nBold: worse than the plain-intensity baseline ({base}, in brackets).\n\n"
                + headline_table(rows, lead, base) + "\n\n## Every model, family and domain\n")
    md = [f"# {a.title or 'Benchmark: what a clinician gets'}", "",
          (f"Held-out generated cohort `{root / a.split}`" if a.split == "benchmark" else
           f"Validation cohort `{root / a.split}` (training domains, its own seeds; for choosing defaults)")
          + f": {len(manifest)} cases, "
          f"{sum(1 for g in groups.values() if g[1] is None)} of them healthy. Domains: " +
          "; ".join(f"**{d}** ({DOMAINS[d].description})" for d in doms) + ".",
          "Benchmark subjects, deformation seeds and the `epi` domain never occur in training or calibration.", "",
          "Columns: *healthy brain flagged %* = share of brain pixels of the healthy cases of that domain above the "
          "calibrated threshold (what a clinician sees on a normal scan); *Dice (calibrated)* and *lesion recall* at "
          "that same threshold. AUROC, AP and *best Dice (oracle threshold)* are oracle metrics: they pick the "
          "threshold with the ground truth. *intensity* is the plain-intensity baseline: the z-scored scan itself "
          "as the score (threshold: 99th percentile of healthy calibration brains). Pixels inside the brain, "
          "on each model's grid.", "",
          f"Command: `{command_line()}`", f"Time: {elapsed:.0f} s on {hardware(device)}.", "",
          headline, format_benchmark(rows), verdict_table(verdicts, out.name)]
    Path(f"{out}.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    print(Path(f"{out}.md").read_text(encoding="utf-8"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--benchmark", help="a generated cohort folder (make_data.py varied): per family x domain tables")
    ap.add_argument("--cache", help="lesion slice cache .npz (built from --data if missing)")
    ap.add_argument("--data", help="lesion cohort folder, BraTS layout")
    ap.add_argument("--checkpoints", nargs="+", required=True)
    ap.add_argument("--predictors", default="all")
    ap.add_argument("--row", choices=["latent", "beta", "name"], default="name")
    ap.add_argument("--out", required=True, help="output prefix: writes PREFIX.md, .csv, _roc.png, _gallery.png")
    ap.add_argument("--title", default="")
    ap.add_argument("--cases", help="comma-separated case indices to use (default: all)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--proj-steps", type=int, default=100)
    ap.add_argument("--update-card", action="store_true", help="store the in-brain AUROC in each checkpoint")
    ap.add_argument("--split", default="benchmark", choices=["benchmark", "validation"],
                    help="--benchmark: the held-out benchmark, or the validation split (choosing defaults)")
    ap.add_argument("--variants", nargs="+", default=["default"],
                    help="--benchmark: option sets to score each predictor with: 'default', 'paper', or "
                         "'[preset,]key=value,...' (e.g. polarity=bright,smooth_mm=4)")
    ap.add_argument("--min-region-mm3", type=float, default=None,
                    help="--benchmark: regions above the threshold smaller than this are dropped (lesion-wise counts)")
    ap.add_argument("--all-regions", action="store_true",
                    help="--benchmark: count every region above the threshold (by default a region counts only when "
                         "its peak reaches the region peak, as the label keeps regions)")
    ap.add_argument("--peak-quantile", type=float, default=None,
                    help="--benchmark: the region peak at this percentile of the calibration split's healthy brains "
                         "instead of the checkpoint's (to choose it, on the validation split)")
    ap.add_argument("--lead", help="--benchmark: the scorer of the headline table (default: the default model's)")
    ap.add_argument("--no-verdicts", action="store_true", help="--benchmark: skip the per-case verdict table")
    a = ap.parse_args(argv)
    import torch

    from common import command_line, hardware, load_or_build_cache
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.benchmark:
        return run_benchmark(a, device)
    cache = load_or_build_cache(a.cache, a.data, lesion=True)
    if a.cases:
        cache = cache.subset(int(i) for i in a.cases.split(","))
    names = parse_predictors(a.predictors)
    # the paper-grid tables (docs/table1_latent.md, table2_beta.md): the reference code's settings
    opts = PredictorOptions.preset("paper", batch_size=a.batch_size, proj_steps=a.proj_steps)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results, curves, t0 = {}, {}, time.time()
    first = None
    for path in a.checkpoints:
        ck = load_checkpoint(path, device)
        preds = names
        scores, brain, label = collect_maps(ck, cache.cases(), preds, opts, device)
        res = {p: scoped_metrics(s, label, brain) for p, s in scores.items()}
        results[row_label(ck, a.row)] = res
        print(f"{ck.name}: " + ", ".join(f"{p} {r['brain']['auroc']:.3f}" for p, r in res.items()), file=sys.stderr)
        sub = np.random.default_rng(0).random(brain.sum()) < min(1.0, 2e6 / brain.sum())
        curves[ck.name] = {p: (s[brain][sub], label[brain][sub]) for p, s in scores.items()}
        if first is None:  # gallery of the first checkpoint on the case with the largest lesion
            sel = cache.case == cache.case[np.argmax(cache.label.sum((1, 2)))]
            first = (ck.name, cache.slices[sel].astype(np.float32), cache.label[sel],
                     {p: s[sel] for p, s in scores.items()})
        if a.update_card:
            update_metadata(path, evaluation={
                "auroc_brain": {p: round(r["brain"]["auroc"], 4) for p, r in res.items()},
                "auroc_all": {p: round(r["all"]["auroc"], 4) for p, r in res.items()},
                "cohort": f"{len(cache.names)} embedded lesion cases (held out), model grid pixels",
                "command": command_line()})
    elapsed = time.time() - t0
    n_cases, n_pix = len(cache.names), int(cache.brain.sum())
    md = [f"# {a.title or 'Evaluation'}", "",
          f"Lesion cohort: {n_cases} cases, {len(cache.slices)} slices, {n_pix:,} brain pixels at the model grid "
          f"(64×64 slices over 240 mm). Predictor settings: {json.dumps(opts.to_dict())}.",
          f"Command: `{command_line()}`", f"Evaluation time: {elapsed:.0f} s on {hardware(device)}.", ""]
    for scope, scope_name in (("brain", "inside the brain mask"), ("all", "all pixels, background included")):
        for metric, metric_name in METRICS:
            header = {"latent": "latent size l", "beta": "β"}.get(a.row, "model")
            md += [f"## {metric_name}, {scope_name}", "", format_table(results, scope, metric, header), ""]
    md.append(f"![ROC curves]({out.name}_roc.png)\n\n![Heatmaps]({out.name}_gallery.png)")
    Path(f"{out}.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    with open(f"{out}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "predictor", "scope", "auroc", "ap", "dice", "dice_threshold"])
        for label, res in results.items():
            for p, r in res.items():
                for scope in ("brain", "all"):
                    m = r[scope]
                    w.writerow([label, p, scope, f"{m['auroc']:.4f}", f"{m['ap']:.4f}", f"{m['dice']:.4f}",
                                f"{m['dice_threshold']:.5g}"])
    best_name = next(iter(curves))
    roc_figure(f"{out}_roc.png", curves[best_name], title=f"{best_name}: ROC inside the brain")
    name, img, lab, maps = first
    overlay_figure(f"{out}_gallery.png", img, maps, lab, title=f"{name}: input, ground truth (green), predictors")
    print(Path(f"{out}.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
