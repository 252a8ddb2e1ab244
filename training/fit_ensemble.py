"""Fit the paper's logistic-regression ensemble on 10% of the lesion cohort (by case), evaluate it
on the other 90%, and store it (plain JSON weights, and the feature settings it was fitted with) in
the checkpoint's metadata, with its calibrated threshold.

    python training/fit_ensemble.py --checkpoint runs/l64_b10.safetensors --cache data/lesion.npz \
        --healthy-cache data/healthy.npz

The ensemble's threshold (99th percentile on held-out healthy brains) is recomputed by
vaeanomaly.calibration.calibrate on the checkpoint's calibration cases of --healthy-cache (the ones
train.py held out); without --healthy-cache any old ensemble threshold is removed and the script says
how to add one (training/calibrate.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import common  # noqa: F401
from vaeanomaly.checkpoint import load_checkpoint, update_metadata
from vaeanomaly.ensemble import DEFAULT_FEATURES, INTENSITY, Ensemble
from vaeanomaly.evaluation import collect_maps
from vaeanomaly.metrics import scoped_metrics
from vaeanomaly.predictors import PredictorOptions, parse_predictors


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--cache", help="lesion slice cache .npz (built from --data if missing)")
    ap.add_argument("--data", help="lesion cohort folder, BraTS layout")
    ap.add_argument("--features", default=",".join(DEFAULT_FEATURES),
                    help=f"predictors, and '{INTENSITY}' (the z-scored scan itself) (default: %(default)s)")
    ap.add_argument("--fraction", type=float, default=0.1, help="share of cases used to fit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", help="write a Markdown report here")
    ap.add_argument("--healthy-cache", help="healthy slice cache (.npz) holding the checkpoint's held-out calibration "
                                            "cases: recompute all thresholds, the ensemble's included")
    a = ap.parse_args(argv)
    import torch

    from common import command_line, load_or_build_cache
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cache = load_or_build_cache(a.cache, a.data, lesion=True)
    names = [f.strip() for f in a.features.split(",")]
    features = [f for f in names if f == INTENSITY or f in parse_predictors([f for f in names if f != INTENSITY] or
                                                                            ["rec-grad"], allow_ensemble=False)]
    n = len(cache.names)
    fit_ids = np.random.default_rng(a.seed).choice(n, max(1, int(round(a.fraction * n))), replace=False)
    test_ids = [i for i in range(n) if i not in set(fit_ids.tolist())]
    if not test_ids:
        raise SystemExit("need at least two cases: one to fit, one to evaluate")
    ck = load_checkpoint(a.checkpoint, device)
    opts = PredictorOptions(batch_size=256)  # the inference defaults (batch size changes nothing)
    # the features as the ensemble sees them at inference: the maps before the finishing steps (predictors.finish_maps)
    fit_opts = opts.unfinished()
    model_features = [f for f in features if f != INTENSITY]
    maps, brain, label = collect_maps(ck, cache.cases_in(fit_ids), model_features, fit_opts, device)
    if INTENSITY in features:
        maps[INTENSITY] = cache.subset(fit_ids).slices.astype(np.float32)
    ens = Ensemble(features).fit({f: m[brain] for f, m in maps.items()}, label[brain], seed=a.seed, options=fit_opts)
    ck.meta["ensemble"] = ens.to_dict()
    scores, brain, label = collect_maps(ck, cache.cases_in(test_ids), model_features + ["ensemble"], opts, device)
    if INTENSITY in features:
        scores[INTENSITY] = cache.subset(test_ids).slices.astype(np.float32)
    res = {p: scoped_metrics(s, label, brain)["brain"]["auroc"] for p, s in scores.items()}
    report = {"fit_cases": [cache.names[i] for i in fit_ids], "n_test_cases": len(test_ids),
              "raw_weights": dict(zip(features, ens.raw_weights.tolist())),
              "test_auroc_brain": res, "command": command_line()}
    calib = {}
    if a.healthy_cache:
        from calibrate import recalibrate
        from vaeanomaly.calibration import option_subset
        if ck.meta.get("thresholds_options") == option_subset(opts):  # current calibration: add the ensemble's
            new = recalibrate(ck, a.healthy_cache, device=device, ensemble=ens, options=opts, only=["ensemble"])
            calib = {"thresholds": {**ck.thresholds, **new["thresholds"]},
                     "region_peaks": {**(ck.meta.get("region_peaks") or {}), **new["region_peaks"]}}
        else:  # an older calibration: everything again, with the inference defaults
            calib = recalibrate(ck, a.healthy_cache, device=device, ensemble=ens, options=opts)
    elif "ensemble" in ck.thresholds:  # a threshold of an earlier ensemble would not hold for this one
        calib = {"thresholds": {k: v for k, v in ck.thresholds.items() if k != "ensemble"},
                 "region_peaks": {k: v for k, v in (ck.meta.get("region_peaks") or {}).items() if k != "ensemble"}}
    update_metadata(a.checkpoint, ensemble=ens.to_dict(), ensemble_evaluation=report, **calib)
    if not a.healthy_cache:
        print("note: the ensemble has no calibrated threshold yet (--threshold auto will refuse it); add one with "
              f"`python training/calibrate.py {a.checkpoint} --cache HEALTHY.npz`, or pass --healthy-cache",
              file=sys.stderr)
    lines = [f"# Ensemble for {ck.name}", "",
             f"Logistic regression on {', '.join(features)}, fitted on {len(fit_ids)} case(s) "
             f"({100 * a.fraction:.0f}%), evaluated on the other {len(test_ids)}.", "",
             f"Command: `{command_line()}`", "",
             "Weights on the raw (unstandardised) predictor values: " +
             ", ".join(f"{f} {w:.3g}" for f, w in report["raw_weights"].items()), "",
             "| predictor | " + " | ".join(res) + " |", "|---" * (len(res) + 1) + "|",
             "| pixel AUROC (brain, test cases) | " + " | ".join(f"{v:.3f}" for v in res.values()) + " |"]
    text = "\n".join(lines) + "\n"
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text, encoding="utf-8")
    print(text)
    print(json.dumps(report["raw_weights"]), file=sys.stderr)


if __name__ == "__main__":
    main()
