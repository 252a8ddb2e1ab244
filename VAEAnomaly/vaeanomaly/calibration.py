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
- for the signed maps (registry `signed`: rec-grad, elbo-grad, dae-residual), every polarity's calibration, so no
  polarity the command line offers lacks a threshold (the options otherwise as ``thresholds_options``):
  ``polarity_thresholds`` {predictor: {'both' | 'bright' | 'dark': {threshold, region_peak}}}: each one-sided map's
  own q-th (and PEAK_QUANTILE-th) percentile, so each flags r = 1 - q/100 of healthy brain, as the main threshold;
  ``two_tailed`` {predictor: {'bright' | 'dark': {threshold, region_peak}}}: the signed map s (polarity 'signed'),
  each tail at half the rate, so the two together flag r of healthy brain, as one threshold would:
      t_bright = Q(s, 1 - r/2),   t_dark = Q(-s, 1 - r/2)      (Q: the pooled quantile over the healthy brain voxels)
  a voxel is brighter than expected where s > t_bright, darker where s < -t_dark; the region peaks likewise at
  1 - r_peak/2 (r_peak = 1 - PEAK_QUANTILE/100). Each tail is an order statistic of its own side alone: a bright
  lesion in the calibration brains (voxels raised that were not in the dark tail) leaves t_dark where it was, where
  the single threshold of |s| would rise with it (`two_tailed`);
- plus whatever the registered hooks return (see HOOKS).

training/train.py, training/fit_ensemble.py and training/calibrate.py (re-calibrate an existing
checkpoint in place) all call `calibrate`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Optional

import numpy as np

from .ensemble import options_mismatch, relevant_keys
# what scoring uses of a calibration lives in inference.py (no cycle with verdict.py); re-exported here
from .inference import RECALIBRATE, combi_constants, inference_kwargs  # noqa: F401
from .predictors import PredictorOptions, combi_map, compute_maps, finish_maps
from .registry import ENSEMBLE, PAPER_PREDICTORS, PREDICTOR_INFO, option_defaults, predictors_for
from .threshold import Tails

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


ONE_SIDED = ("both", "bright", "dark")  # the polarities whose map is >= 0 (one threshold); 'signed' has two tails


def two_tailed(values: np.ndarray, q: float = QUANTILE, peak_q: float = PEAK_QUANTILE) -> dict:
    """The two-tailed calibration of a signed map from its healthy brain values s (pooled): each tail at half the
    rate r = 1 - q/100, so the union flags r of healthy brain: {'bright': {threshold: Q(s, 1 - r/2), region_peak:
    Q(s, 1 - r_peak/2)}, 'dark': {the same on -s}} (r_peak = 1 - peak_q/100; dark levels are magnitudes: a voxel is
    darker than expected where s < -threshold)."""
    s = np.asarray(values, np.float64).ravel()
    if not s.size:
        raise ValueError("two-tailed calibration needs healthy brain values")
    tail_q, tail_peak_q = 100 - (100 - q) / 2, 100 - (100 - peak_q) / 2
    return {side: {"threshold": float(np.percentile(v, tail_q)), "region_peak": float(np.percentile(v, tail_peak_q))}
            for side, v in (("bright", s), ("dark", -s))}


def _polarity_calibration(model, beta, cases, brains, signed, opts, device, brain_values, q, progress=None) -> tuple:
    """({predictor: {polarity: {threshold, region_peak}}} for the one-sided polarities, {predictor: two_tailed(...)})
    for the signed predictors, each map computed as scoring computes it with that polarity (its values under the
    calibration's own polarity reused from brain_values)."""
    own = {p: opts.for_map(p).polarity for p in signed}
    values = {p: {} for p in signed}
    for pol in ONE_SIDED + ("signed",):
        need = [p for p in signed if own[p] != pol]
        for p in signed:
            if own[p] == pol:
                values[p][pol] = np.concatenate(brain_values[p])
        if not need:
            continue
        acc = {p: [] for p in need}
        for name, slices, brain, slice_mm in cases:
            maps = compute_maps(model, slices, need, beta, replace(opts, polarity=pol), device, brain=brain,
                                slice_mm=slice_mm)
            for p in need:
                acc[p].append(maps[p][brain])
            if progress:
                progress(1.0)
        for p in need:
            values[p][pol] = np.concatenate(acc[p])
    one_sided = {p: {pol: {"threshold": float(np.percentile(values[p][pol], q)),
                           "region_peak": float(np.percentile(values[p][pol], PEAK_QUANTILE))} for pol in ONE_SIDED}
                 for p in signed}
    return one_sided, {p: two_tailed(values[p]["signed"], q) for p in signed}


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
    # the signed maps under every other polarity (one more pass per case and polarity, the signed maps alone)
    signed = [p for p in fused if PREDICTOR_INFO[p].signed and (only is None or p in only)]
    n_polarity = len(cases) * sum(1 for pol in ONE_SIDED + ("signed",) if any(opts.for_map(p).polarity != pol
                                                                           for p in signed))
    total, done = len(cases) + n_polarity + proj_cost * len(pooled_sel) / n_total, 0.0
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
    polarity_thresholds, tails = {}, {}
    if signed:
        def one_pass(_):
            nonlocal done
            done += 1
            if progress:
                progress(done / total)
        polarity_thresholds, tails = _polarity_calibration(model, beta, cases, data.brains, signed, opts, device,
                                                           data.brain_values, q, one_pass)
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
    if signed:
        out["polarity_thresholds"] = polarity_thresholds
        out["two_tailed"] = tails
        out["two_tailed_note"] = (f"signed maps: polarity_thresholds, each one-sided polarity's own {q:g}th (and "
                                  f"{PEAK_QUANTILE:g}th) percentile; two_tailed, the signed map (positive: brighter "
                                  f"than expected) with each tail at half the rate: bright Q(s, {tail_note(q)}), "
                                  f"dark Q(-s, {tail_note(q)}), region peaks at {tail_note(PEAK_QUANTILE)}; the "
                                  f"options otherwise as thresholds_options")
    if dae:
        del out["combi_normalisation"]
    if only is not None:  # a partial calibration: thresholds only (the rest stays as the checkpoint has it)
        out = {k: out[k] for k in ("thresholds", "region_peaks", "polarity_thresholds", "two_tailed",
                                   "two_tailed_note") if k in out}
    from .verdict import calibration_hook  # the out-of-distribution verdict's limits (issue 8)
    for hook in [calibration_hook] + list(HOOKS) + list(hooks or []):
        out.update(hook(data) or {})
    if progress:
        progress(1.0)
    return out


def tail_note(q: float) -> str:
    return f"{100 - (100 - q) / 2:g}th percentile"


# --------------------------------------------------------------------------- using the calibration
def _is_signed(predictor: str) -> bool:
    return predictor in PREDICTOR_INFO and PREDICTOR_INFO[predictor].signed


def recorded_polarity(checkpoint, predictor: str) -> str:
    """The polarity the checkpoint's main thresholds (``thresholds``) hold for `predictor`."""
    rec = checkpoint.threshold_options.get("polarity")
    return rec if rec is not None else option_defaults(predictor)["polarity"]


def _polarity_entry(checkpoint, predictor: str, opts: PredictorOptions):
    """For a signed predictor asked with another polarity than the main calibration's: (polarity asked, its
    polarity_thresholds entry or None); (None, None) where the main calibration's polarity is asked. ValueError
    where the checkpoint's entry exists but the other options differ from the calibration's."""
    if not _is_signed(predictor):
        return None, None
    asked = opts.for_map(predictor).polarity
    if asked == recorded_polarity(checkpoint, predictor):
        return None, None
    entry = ((checkpoint.meta.get("polarity_thresholds") or {}).get(predictor) or {}).get(asked)
    if entry is not None:
        _check_other_options(checkpoint, predictor, opts)
    return asked, entry


def _check_other_options(checkpoint, predictor: str, opts: PredictorOptions) -> None:
    """ValueError where the options other than the polarity differ from those the checkpoint calibrated with."""
    same = replace(opts, polarity=recorded_polarity(checkpoint, predictor))
    diff = options_mismatch(checkpoint.threshold_options, same, [predictor])
    if diff:
        raise ValueError(f"the calibrated '{predictor}' thresholds hold for other options: you asked "
                         + "; ".join(diff) + f". Use those options, give a percentile such as p99, or {RECALIBRATE} "
                         "with your options")


def calibrated_tails(checkpoint, predictor: str, options: Optional[PredictorOptions] = None) -> Optional[dict]:
    """The two-tailed calibration of signed map `predictor` (polarity 'signed'): {'bright': {'threshold',
    'region_peak'}, 'dark': {...}} (dark levels are magnitudes: flagged where s < -threshold; see `two_tailed`), or
    None where the checkpoint records none (calibrated before two-tailed calibration, or not a signed map).
    ValueError where the options other than the polarity differ from those it calibrated with."""
    entry = ((checkpoint.meta.get("two_tailed") or {}) if checkpoint is not None else {}).get(predictor)
    if not entry:
        return None
    _check_other_options(checkpoint, predictor, options or PredictorOptions())
    return {side: {k: float(v) for k, v in entry[side].items()} for side in ("bright", "dark")}


def is_two_tailed(predictor: str, options: Optional[PredictorOptions] = None) -> bool:
    """Whether map `predictor` is signed under these options (a signed map with polarity 'signed'): its label and
    findings then threshold each tail apart (1 = brighter, 2 = darker than expected)."""
    return _is_signed(predictor) and (options or PredictorOptions()).for_map(predictor).polarity == "signed"


def tails_or_fallback(checkpoint, predictors, options: Optional[PredictorOptions] = None):
    """(options, note) for `--threshold auto`: the options unchanged where every signed map asked with polarity
    'signed' has per-tail thresholds in the checkpoint; else (a checkpoint calibrated before two-tailed calibration)
    the options with the polarity its thresholds hold for (one threshold, no direction: the behaviour before), and
    a note that says so and what to do."""
    opts = options or PredictorOptions()
    lacking = [p for p in predictors if is_two_tailed(p, opts) and not (checkpoint.meta.get("two_tailed") or {}).get(p)]
    if not lacking:
        return opts, None
    rec = checkpoint.threshold_options.get("polarity")
    shown = rec if rec is not None else ", ".join(f"{p}: {option_defaults(p)['polarity']}" for p in lacking)
    return replace(opts, polarity=rec), (
        f"note: the checkpoint records no per-tail thresholds for {', '.join(lacking)} (calibrated before two-tailed "
        f"calibration): scored with the polarity its threshold holds for ({shown}), one threshold and no direction; "
        f"{RECALIBRATE} for the two tails, or give a percentile such as p99 to keep the sign")


def auto_threshold(checkpoint, predictor: str, options: Optional[PredictorOptions] = None):
    """What `--threshold auto` uses: the per-tail thresholds (threshold.Tails) of a signed map under polarity
    'signed', else `calibrated_threshold` (a float). ValueError where none holds."""
    opts = options or PredictorOptions()
    if _is_signed(predictor) and opts.for_map(predictor).polarity == "signed":
        tails = calibrated_tails(checkpoint, predictor, opts)
        if tails is None:
            raise ValueError(f"the checkpoint records no per-tail thresholds for '{predictor}' (calibrated before "
                             f"two-tailed calibration); {RECALIBRATE}, or give a percentile such as p99 (on |value|, "
                             f"both tails)")
        return Tails(tails["bright"]["threshold"], tails["dark"]["threshold"])
    return calibrated_threshold(checkpoint, predictor, opts)


def calibrated_threshold(checkpoint, predictor: str, options: Optional[PredictorOptions] = None) -> float:
    """The checkpoint's calibrated threshold for `predictor`, or ValueError saying why it does not hold
    for these options and what to do. A signed map under another one-sided polarity than the main calibration's
    ('both', 'bright', 'dark') has its own (``polarity_thresholds``, recorded by calibrate()); under 'signed' it has
    two (calibrated_tails, auto_threshold)."""
    opts = options or PredictorOptions()
    thr = checkpoint.thresholds
    legacy = "thresholds_options" not in checkpoint.meta
    asked, entry = _polarity_entry(checkpoint, predictor, opts)
    if asked == "signed":
        raise ValueError(f"'{predictor}' with polarity 'signed' has two calibrated thresholds, one per tail "
                         f"(calibration.calibrated_tails)")
    if entry is not None:
        return float(entry["threshold"])
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


def region_peak(checkpoint, predictor: str, options: Optional[PredictorOptions] = None):
    """The level a region above the threshold must reach to be kept (the checkpoint's calibrated
    PEAK_QUANTILE-th percentile of healthy brain for `predictor`), or None where the checkpoint has none or its
    calibration does not hold for these options (then every region is kept, as before). A signed map under
    polarity 'signed': a threshold.Tails of the two tails' region peaks (the dark one on -s)."""
    if checkpoint is None:
        return None
    opts = options or PredictorOptions()
    if _is_signed(predictor) and opts.for_map(predictor).polarity == "signed":
        try:
            tails = calibrated_tails(checkpoint, predictor, opts)
        except ValueError:
            return None
        return None if tails is None else Tails(tails["bright"]["region_peak"], tails["dark"]["region_peak"])
    peaks = checkpoint.meta.get("region_peaks") or {}
    try:
        asked, entry = _polarity_entry(checkpoint, predictor, opts)
        if entry is not None:
            return float(entry["region_peak"])
        if predictor not in peaks:
            return None
        calibrated_threshold(checkpoint, predictor, opts)
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
