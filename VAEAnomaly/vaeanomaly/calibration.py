"""Calibration on held-out healthy brains: the one place thresholds and constants are computed.

`calibrate(model, beta, healthy_cases, options, ensemble)` scores healthy cases with exactly the
options inference uses (the defaults, unless told otherwise) and returns the checkpoint metadata
updates:

- ``thresholds``: the q-th (99th) percentile inside the brain of every paper predictor and, when the
  checkpoint carries one, of the ensemble;
- ``thresholds_options``: the predictor options those thresholds hold for (a threshold is refused,
  with a message, when inference runs with options that change that predictor's values);
- ``combi_normalisation``: Combi's fixed min-max constants for KL-grad (the median over the healthy
  cases of each whole volume's minimum and maximum), so a voxel's Combi value does not depend on
  which slices are scored together;
- ``calibration``: what they were computed on (cases, slices, quantile, library version);
- plus whatever the registered hooks return (see HOOKS).

training/train.py, training/fit_ensemble.py and training/calibrate.py (re-calibrate an existing
checkpoint in place) all call `calibrate`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import numpy as np

from .ensemble import options_mismatch, relevant_keys
# what scoring uses of a calibration lives in inference.py (no cycle with verdict.py); re-exported here
from .inference import RECALIBRATE, combi_constants, inference_kwargs  # noqa: F401
from .predictors import PredictorOptions, combi_map, compute_maps, finish_maps
from .registry import ENSEMBLE, PAPER_PREDICTORS, predictors_for

QUANTILE = 99.0
# a region above the threshold is kept only when its peak reaches this percentile of healthy brain (hysteresis):
# chosen on the validation split (docs/validation.md), where it cut false regions on healthy scans 3-5x and kept
# every lesion the default model found
PEAK_QUANTILE = 99.9
OPTION_KEYS = ("smooth", "smooth_sigma", "smooth_kernel", "smooth_mm", "smooth_z_mm", "polarity", "evidence", "rim_mm",
               "normalise", "proj_steps", "proj_lambda", "proj_lr", "proj_weighted")
# training/train.py calibrated with PredictorOptions(proj_steps=50) before the options were recorded
LEGACY_THRESHOLD_OPTIONS = {**{k: v for k, v in PredictorOptions.preset("paper").to_dict().items() if k in OPTION_KEYS},
                            "proj_steps": 50}


@dataclass
class CalibrationData:
    """What a calibration hook sees: the healthy maps (brain pixels only, per case) and the settings."""
    model: object
    beta: float
    options: PredictorOptions
    case_names: list
    brain_values: dict = field(default_factory=dict)   # {predictor: [1D float32 array per case]}
    maps: dict = field(default_factory=dict)           # {predictor: [(nz, S, S) array per case]} (non-projection)
    brains: list = field(default_factory=list)         # [(nz, S, S) bool per case]
    slices: list = field(default_factory=list)         # [(nz, S, S) float32 per case]: the preprocessed input
    quantile: float = QUANTILE


# Extra calibration steps, called by calibrate() after the thresholds: fn(CalibrationData) -> dict of
# metadata updates (merged into calibrate()'s result). The verdict limits (issue 8) belong here, e.g.
# `calibration.HOOKS.append(verdict.calibrate_limits)` in verdict.py, or pass hooks=[...] to calibrate().
HOOKS: list[Callable[[CalibrationData], dict]] = []


def option_subset(options: PredictorOptions) -> dict:
    d = options.to_dict()
    return {k: d[k] for k in OPTION_KEYS}


def held_out_cases(n_cases: int, val_fraction: float = 0.1, seed: int = 0) -> list[int]:
    """The case indices training/train.py holds out for calibration (same rule, same generator)."""
    rng = np.random.default_rng(seed)
    if n_cases <= 1 or val_fraction <= 0:
        return []
    return sorted(rng.choice(n_cases, max(1, int(round(val_fraction * n_cases))), replace=False).tolist())


def cases_from_cache(cache, case_ids=None, slice_mm: Optional[dict] = None) -> list[tuple]:
    """[(name, slices float32, brain, slice spacing mm or None)] from a SliceCache, all cases or the given indices.
    slice_mm: {name: slice spacing} (data.slice_spacings), for the maps smoothed across slices."""
    ids = range(len(cache.names)) if case_ids is None else case_ids
    return [(n, s, b, (slice_mm or {}).get(n)) for n, s, b, _ in cache.cases_in(ids)]


def calibrate(model, beta: float, healthy_cases: Iterable, options: Optional[PredictorOptions] = None,
              ensemble=None, q: float = QUANTILE, device: str = "cpu", max_projection_slices: int = 512,
              progress: Optional[Callable[[float], None]] = None, hooks: Optional[list] = None,
              only: Optional[Iterable[str]] = None) -> dict:
    """Thresholds (q-th percentile inside the brain) for every paper predictor and the ensemble,
    Combi's constants and the options they hold for, from held-out healthy cases.

    healthy_cases: [(name, slices (nz, S, S) float32, brain (nz, S, S) bool[, slice spacing mm])] — whole volumes
    on the model grid (Combi's constants are per-volume minima/maxima; the spacing, where given, sets the smoothing
    across slices in voxels, as scoring the scan would). options: the predictor options inference
    uses (default: PredictorOptions(), the defaults). Returns metadata updates for `update_metadata`.
    only: thresholds for these predictors alone (e.g. ['ensemble'] after refitting it, skipping the costly
    projection); the caller then keeps the checkpoint's other thresholds, which must hold for the same options.
    """
    opts = options or PredictorOptions()
    cases = [(str(c[0]), np.asarray(c[1], np.float32), np.asarray(c[2], bool), c[3] if len(c) > 3 else None)
             for c in healthy_cases]
    if not cases:
        raise ValueError("calibration needs at least one healthy case")
    if ensemble is not None:
        ensemble.check_options(opts)
    dae = getattr(model, "kind", "vae") == "dae"  # a denoising autoencoder: its own maps, no Combi, no projection
    every = predictors_for("dae") if dae else PAPER_PREDICTORS
    fused = [p for p in every if p not in ("proj-rec-error", "combi")]
    data = CalibrationData(model, beta, opts, [c[0] for c in cases], quantile=q,
                           brain_values={p: [] for p in every + ((ENSEMBLE,) if ensemble else ())},
                           maps={p: [] for p in fused}, brains=[c[2] for c in cases],
                           slices=[c[1] for c in cases])
    n_total = sum(len(c[1]) for c in cases)
    # the projection is costly: evenly spaced slices of the pooled cases, at most max_projection_slices
    pooled_sel = np.linspace(0, n_total - 1, min(n_total, max_projection_slices)).astype(int)
    project = not dae and (only is None or "proj-rec-error" in only)
    proj_cost = opts.proj_steps / 20 if project else 0
    total, done = len(cases) + proj_cost * len(pooled_sel) / n_total, 0.0
    kl_min, kl_max = [], []
    # the maps before the finishing options (smoothing across slices, rim): Combi and the ensemble are made from
    # these, as compute_maps makes them; every map is then finished as scoring finishes it
    for name, slices, brain, slice_mm in cases:
        maps = compute_maps(model, slices, fused, beta, opts.unfinished(), device, brain=brain)
        for p in fused:
            data.maps[p].append(maps[p])
        if not dae:
            kl_min.append(float(maps["kl-grad"].min()))
            kl_max.append(float(maps["kl-grad"].max()))
        done += 1
        if progress:
            progress(done / total)
    lo, hi = (float(np.median(kl_min)), float(np.median(kl_max))) if kl_min else (0.0, 0.0)
    for i, brain in enumerate(data.brains):
        maps = {p: data.maps[p][i] for p in fused}
        if not dae:
            maps["combi"] = combi_map(maps["kl-grad"], maps["rec-error"], (lo, hi))
        if ensemble is not None:
            maps[ENSEMBLE] = ensemble.predict_maps({**maps, "intensity": data.slices[i]})  # (ensemble.INTENSITY)
        maps = finish_maps(maps, data.slices[i], brain, opts, 240.0 / model.image_size, cases[i][3])
        for p, m in maps.items():  # hooks (the verdict) see the finished maps, as scoring gives them
            if p == "combi":
                data.maps.setdefault(p, []).append(m)
            elif p in data.maps:
                data.maps[p][i] = m
            data.brain_values[p].append(m[brain])
    if project:
        x = np.concatenate([c[1] for c in cases])[pooled_sel]
        b = np.concatenate(data.brains)[pooled_sel]
        proj_progress = (lambda f: progress((done + f * proj_cost * len(pooled_sel) / n_total) / total)) \
            if progress else None
        proj = compute_maps(model, x, ["proj-rec-error"], beta, opts, device, progress=proj_progress)["proj-rec-error"]
        data.brain_values["proj-rec-error"] = [proj[b]]
    thresholds = {p: float(np.percentile(np.concatenate(v), q)) for p, v in data.brain_values.items() if v}
    peaks = {p: float(np.percentile(np.concatenate(v), PEAK_QUANTILE)) for p, v in data.brain_values.items() if v}
    wanted = list(every) + ([ENSEMBLE] if ensemble else [])
    out = {
        "thresholds": {p: thresholds[p] for p in wanted if only is None or p in only},
        "region_peaks": {p: peaks[p] for p in wanted if only is None or p in only},
        "region_peaks_note": f"{PEAK_QUANTILE:g}th percentile inside the brain on the same healthy subjects: a region "
                             f"above the threshold is kept only when its peak reaches it",
        "thresholds_options": option_subset(opts),
        "thresholds_note": f"{q:g}th percentile inside the brain on held-out healthy subjects",
        "combi_normalisation": {"min": lo, "max": hi, "options": {k: option_subset(opts)[k] for k in relevant_keys(["kl-grad"])},
                                "note": "KL-grad min-max constants: median over the healthy calibration cases of "
                                        "each whole volume's minimum and maximum (model grid)"},
        "calibration": {"quantile": q, "peak_quantile": PEAK_QUANTILE, "cases": data.case_names,
                        "n_slices": int(n_total),
                        "n_projection_slices": int(len(pooled_sel)) if project else 0, "ensemble": ensemble is not None},
    }
    if dae:
        del out["combi_normalisation"]
    if only is not None:  # a partial calibration: thresholds only (the rest stays as the checkpoint has it)
        out = {"thresholds": out["thresholds"], "region_peaks": out["region_peaks"]}
    from .verdict import calibration_hook  # the out-of-distribution verdict's limits (issue 8)
    for hook in [calibration_hook] + list(HOOKS) + list(hooks or []):
        out.update(hook(data) or {})
    if progress:
        progress(1.0)
    return out


# --------------------------------------------------------------------------- using the calibration
def calibrated_threshold(checkpoint, predictor: str, options: Optional[PredictorOptions] = None) -> float:
    """The checkpoint's calibrated threshold for `predictor`, or ValueError saying why it does not hold
    for these options and what to do."""
    opts = options or PredictorOptions()
    thr = checkpoint.thresholds
    legacy = "thresholds_options" not in checkpoint.meta
    if predictor not in thr:
        why = ("the checkpoint's ensemble has no calibrated threshold (calibrated before ensembles had one)"
               if predictor == ENSEMBLE else f"the checkpoint has no calibrated threshold for '{predictor}'")
        raise ValueError(f"{why}; {RECALIBRATE}, or give --threshold as a number or a percentile such as p99")
    if predictor == "combi" and not checkpoint.combi_normalisation:
        raise ValueError("the checkpoint's Combi threshold was calibrated before Combi used fixed normalisation "
                         f"constants, so it does not hold; {RECALIBRATE}, or give a percentile such as p99")
    features = checkpoint.ensemble.features if predictor == ENSEMBLE and checkpoint.ensemble else [predictor]
    if predictor == "combi":
        features = ["kl-grad"]
    diff = options_mismatch(checkpoint.threshold_options, opts, features,
                            output=predictor if predictor == ENSEMBLE else None)
    if diff:
        note = " (older checkpoint: train.py calibrated Proj-Rec-Error with 50 steps)" if legacy else ""
        raise ValueError(f"the calibrated '{predictor}' threshold holds for other options{note}: you asked "
                         + "; ".join(diff) + f". Use those options, give a percentile such as p99, or {RECALIBRATE} "
                         "with your options (--proj-steps ..., --no-smooth)")
    return float(thr[predictor])


def region_peak(checkpoint, predictor: str, options: Optional[PredictorOptions] = None) -> Optional[float]:
    """The level a region above the threshold must reach to be kept (the checkpoint's calibrated
    PEAK_QUANTILE-th percentile of healthy brain for `predictor`), or None where the checkpoint has none or its
    calibration does not hold for these options (then every region is kept, as before)."""
    peaks = (checkpoint.meta.get("region_peaks") or {}) if checkpoint is not None else {}
    if predictor not in peaks:
        return None
    try:
        calibrated_threshold(checkpoint, predictor, options)
    except ValueError:
        return None
    return float(peaks[predictor])


def region_peaks(checkpoint, predictors, options: Optional[PredictorOptions] = None, threshold=None,
                 keep_all: bool = False) -> dict:
    """{predictor: region_peak(...)} for the label and findings of `predictors` at `threshold` (the parsed
    --threshold, scoring.parse_threshold): the peaks hold for the calibrated threshold ('auto') only; all None
    otherwise and with keep_all (every region above the threshold kept: `--all-regions`)."""
    calibrated = threshold is not None and threshold[0] == "auto" and not keep_all
    return {p: region_peak(checkpoint, p, options) if calibrated else None for p in predictors}
