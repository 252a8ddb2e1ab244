"""Fusions of a VAE's and a denoising autoencoder's maps as default candidates, scored as evaluate.py scores.

    python training/try_fusion.py --benchmark data/v2 --split validation --out docs/validation2_fusion \
        --healthy legacy=data/legacy_check/healthy
    python training/choose_default.py docs/validation2_all_models.csv docs/validation2_fusion.csv \
        --sizes fusion=64 --populations docs/validation2_fusion_populations.csv

Both models on the same grid; each one's default map (core predictors, their defaults) in units of its own
calibrated threshold, so 1 is each map's healthy 99th percentile:
    v  = VAE map / t_vae                    d = DAE |residual| map / t_dae
    d~ = the DAE's signed residual over its own tail: s / t_bright where s > 0, -s / t_dark where s < 0
         (calibration.calibrated_tails: what --polarity signed flags is exactly d~ > 1)
Candidates (scorer 'fusion <name>'):
    mean      (v + d) / 2                          weighted  (v + 2 d) / 3
    max       max(v, d~)                           geo       sqrt(max(v, 0) d~)   (both must agree)
    lr        the paper's logistic-regression ensemble (vaeanomaly.ensemble) on [v, d, sign(s) d~, the z-scored
              scan], fitted leave-one-domain-out on the split's lesion cases: each case is scored by the ensemble
              fitted without its domain (so the split can still compare it), healthy calibration by the one fitted
              on every domain
and, for comparison in the same units, 'fusion dae', 'fusion dae-signed' (d~) and 'fusion vae'.
Every candidate's threshold: the 99th percentile of its score on the healthy calibration brains, its region peak
the 99.9th, as calibration computes a checkpoint's. Writes PREFIX.csv (evaluate.py's columns, with the intensity
row) and, with --healthy, PREFIX_populations.csv: each candidate's mean % of brain above its threshold on another
healthy population (slices of an HCP-layout folder), for choose_default.py --populations.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import common  # noqa: F401

NAMES = ("mean", "weighted", "max", "geo", "lr", "dae", "dae-signed", "vae")
LR_FEATURES = ("vae", "dae", "dae-signed", "intensity")


class Fusion:
    """Both models' maps of a case (memoised by its slices), in units of their calibrated thresholds."""

    def __init__(self, vae, dae, device="cpu"):
        from vaeanomaly.calibration import calibrated_tails, calibrated_threshold
        from vaeanomaly.predictors import PredictorOptions
        from vaeanomaly.registry import DEFAULT_PREDICTORS
        self.vae, self.dae, self.device = vae, dae, device
        self.pv, self.pd = DEFAULT_PREDICTORS[vae.kind], DEFAULT_PREDICTORS[dae.kind]
        self.opts, self.signed = PredictorOptions(), PredictorOptions(polarity="signed")
        self.tv = calibrated_threshold(vae, self.pv, self.opts)
        self.td = calibrated_threshold(dae, self.pd, self.opts)
        tails = calibrated_tails(dae, self.pd, self.signed)
        if tails is None:
            raise SystemExit(f"{dae.name} has no two-tailed calibration: run training/calibrate.py on it first")
        self.tb, self.tk = tails["bright"]["threshold"], tails["dark"]["threshold"]
        self.lr, self.lr_by_domain, self._memo = None, {}, {}

    def features(self, x, brain, spacing) -> dict:
        from vaeanomaly.predictors import compute_maps
        key = (x.shape, float(np.asarray(x, np.float64).sum()), int(brain.sum()))
        if key not in self._memo:
            kw = {"brain": brain, "slice_mm": spacing[2] if spacing else None}
            v = compute_maps(self.vae.model, x, [self.pv], self.vae.beta, self.opts, self.device, **kw)[self.pv]
            d = compute_maps(self.dae.model, x, [self.pd], 1.0, self.opts, self.device, **kw)[self.pd]
            s = compute_maps(self.dae.model, x, [self.pd], 1.0, self.signed, self.device, **kw)[self.pd]
            tilde = np.where(s > 0, s / self.tb, -s / self.tk)
            self._memo[key] = ({"vae": v / self.tv, "dae": d / self.td, "dae~": tilde,
                                "dae-signed": np.sign(s) * tilde, "intensity": np.asarray(x, np.float32)})
        return self._memo[key]

    def score(self, name: str, x, brain, spacing, domain: str | None = None) -> np.ndarray:
        f = self.features(x, brain, spacing)
        v, d, t = f["vae"], f["dae"], f["dae~"]
        if name == "lr":
            ens = self.lr_by_domain.get(domain, self.lr)
            return np.where(brain, ens.predict_maps(f), 0).astype(np.float32)
        return {"mean": lambda: (v + d) / 2, "weighted": lambda: (v + 2 * d) / 3, "max": lambda: np.maximum(v, t),
                "geo": lambda: np.sqrt(np.clip(v, 0, None) * t), "dae": lambda: d, "dae-signed": lambda: t,
                "vae": lambda: v}[name]().astype(np.float32)

    def fit_lr(self, cases, groups, spacings, seed=0) -> None:
        """The ensemble on every lesion case, and one per domain fitted without that domain's cases."""
        from vaeanomaly.ensemble import Ensemble
        per = []
        for name, x, brain, label in cases:
            dom, fam = groups[name]
            if fam:
                f = self.features(x, brain, spacings.get(name))
                per.append((dom, {k: f[k][brain] for k in LR_FEATURES}, label[brain]))

        def fit(rows):
            return Ensemble(LR_FEATURES).fit({k: np.concatenate([r[1][k] for r in rows]) for k in LR_FEATURES},
                                             np.concatenate([r[2] for r in rows]), seed=seed)
        self.lr = fit(per)
        for dom in {r[0] for r in per}:
            self.lr_by_domain[dom] = fit([r for r in per if r[0] != dom])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--benchmark", default="data/v", help="generated cohort folder (training/make_data.py varied)")
    ap.add_argument("--split", default="validation", help="the split to score (choose on validation, never benchmark)")
    ap.add_argument("--vae", default=None, help="VAE checkpoint (default: the bundled default VAE)")
    ap.add_argument("--dae", default=None, help="DAE checkpoint (default: the bundled default model)")
    ap.add_argument("--candidates", default=",".join(NAMES), help="comma-separated, of: " + ", ".join(NAMES))
    ap.add_argument("--healthy", nargs="*", default=[], metavar="LABEL=FOLDER",
                    help="another healthy population (HCP layout): its mean flagged %% per candidate")
    ap.add_argument("--out", required=True, help="PREFIX: writes PREFIX.csv (and PREFIX_populations.csv)")
    a = ap.parse_args(argv)
    from common import load_or_build_cache
    from evaluate import grid_spacings
    from vaeanomaly.calibration import PEAK_QUANTILE
    from vaeanomaly.checkpoint import DEFAULT_MODEL, DEFAULT_VAE, load_checkpoint
    from vaeanomaly.data import SliceCache
    from vaeanomaly.evaluation import benchmark, healthy_threshold, intensity_rows, write_rows
    from vaeanomaly.synth import read_manifest
    t0 = time.time()
    vae, dae = load_checkpoint(a.vae or DEFAULT_VAE), load_checkpoint(a.dae or DEFAULT_MODEL)
    if vae.model.image_size != dae.model.image_size:
        raise SystemExit(f"the two models' grids differ ({vae.model.image_size} and {dae.model.image_size}): "
                         "a pixel-wise fusion needs one grid")
    size, root = vae.model.image_size, Path(a.benchmark)
    manifest = read_manifest(root / a.split)
    if manifest is None:
        raise SystemExit(f"{root / a.split} has no cohort.json: make it with training/make_data.py varied")
    groups = {c["case"]: (c["domain"], c["family"]) for c in manifest.values()}
    cases = list(SliceCache.load(root / f"{a.split}_{size}.npz").cases())
    calib = list(SliceCache.load(root / f"calibration_{size}.npz").cases())
    sp = grid_spacings(root / a.split, [c[0] for c in cases], size)
    sp_calib = grid_spacings(root / "calibration", [c[0] for c in calib], size)
    fusion = Fusion(vae, dae)
    names = [n.strip() for n in a.candidates.split(",") if n.strip()]
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise SystemExit(f"unknown candidate(s) {unknown}; choose from {', '.join(NAMES)}")
    if "lr" in names:
        fusion.fit_lr(cases, groups, sp)
    # benchmark() hands each score function a case's slices, not its name: its domain (for 'lr') by those slices
    by_slices = {id(c[1]): groups[c[0]][0] for c in cases}

    def fn(n):
        return lambda x, b, s: fusion.score(n, x, b, s, by_slices.get(id(x)))
    fns = {f"fusion {n}": fn(n) for n in names}
    thr = {k: healthy_threshold(f, calib, spacings=sp_calib) for k, f in fns.items()}
    peaks = {k: healthy_threshold(f, calib, PEAK_QUANTILE, spacings=sp_calib) for k, f in fns.items()}
    rows = benchmark(fns, cases, groups, thr, spacings=sp, peaks=peaks)
    rows += intensity_rows(cases, groups, calib, size, sp, peak_q=PEAK_QUANTILE)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_rows(f"{out}.csv", rows)
    pops = []
    for spec in a.healthy:
        label, folder = spec.split("=", 1)
        pop = list(load_or_build_cache(None, folder, lesion=False, image_size=size).cases())
        pop_sp = grid_spacings(Path(folder), [c[0] for c in pop], size)
        for k, f in fns.items():
            vals = [100 * float((f(x, b, pop_sp.get(n))[b] > thr[k]).mean()) for n, x, b, _ in pop]
            pops.append({"scorer": k, "population": f"{label} ({len(pop)})", "flagged_pct": sum(vals) / len(vals)})
    if pops:
        write_rows(f"{out}_populations.csv", pops)
    print(f"{len(rows)} rows -> {out}.csv ({time.time() - t0:.0f} s); models {vae.name} + {dae.name}; "
          f"weights of the ensemble fitted on every domain: "
          + (", ".join(f"{k} {w:.3g}" for k, w in zip(LR_FEATURES, fusion.lr.coef)) if fusion.lr else "-"),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
