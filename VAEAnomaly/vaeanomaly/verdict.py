"""When not to trust a heatmap: an out-of-distribution verdict for every scan.

Two kinds of checks.

On the model grid (calibrated): three per-subject statistics of the preprocessed slices, computed
on held-out healthy subjects when a checkpoint is calibrated (`calibrate_verdict`, stored in the
checkpoint metadata under "verdict") and on every scored scan (`assess`, `assess_slices`):
  - median_rec_error: the median over brain pixels of the model's reconstruction error. A focal
    lesion leaves the median alone; a scan the model cannot explain as a whole (another contrast,
    another scanner, artefacts) raises it, and extreme noise (which flattens the z-scored image)
    lowers it. `fit` reports it relative to the typical healthy calibration subject (1.0 = typical).
  - skewness of the brain intensities: positive on T2 (bright CSF is the minority tail), negative on
    T1 and FLAIR (dark CSF).
  - edge_contrast: mean intensity on the brain's outer rim minus in its depth (z-score units): the
    cortical CSF makes the rim bright on T2, dark on T1 and FLAIR.
The fit's accepted range is [min - K*spread, max + K*spread] of the calibration subjects (log scale;
spread = standard deviation, with a floor so that a small calibration set does not give a needle-thin
range). Contrast is a physical rule, not a learnt one (healthy T2 brains vary too much in skewness for
a calibrated range to separate them from T1 and FLAIR): contrast = skewness + edge_contrast must be
positive. Measured on generated brains with the default bundled model: T2 domains (legacy, tse,
tse-lowres, tse-3d, epi, all lesion families) 0.8 to 2.2; T1 -1.4 to -1.8; FLAIR -1.4 to -2.0.
All statistics of the calibration subjects are stored, for the record.

On the input grid (anatomical limits, see brainmask.py): the automatic mask of a head that is not
skull-stripped, implausible brain volume, brain cut off at the edge of the field of view, extreme
noise (robust voxel-noise estimate over the median brain intensity).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import numpy as np

from .registry import DEFAULT_PREDICTOR, DEFAULT_PREDICTORS, ENSEMBLE, PREDICTOR_INFO, option_defaults

VERSION = 1
K = 3.0
STATISTICS = ("median_rec_error", "skewness", "edge_contrast", "contrast")
LOG_STATS = ("median_rec_error",)
SPREAD_FLOOR = {"median_rec_error": 0.15, "skewness": 0.15, "edge_contrast": 0.08, "contrast": 0.2}  # log units for the first
CONTRAST_LIMIT = 0.0  # skewness + edge_contrast: both positive on T2 (bright CSF), both negative on T1 and FLAIR
NOISE_LIMIT = 0.25  # voxel noise (robust std) above 25 % of the median brain intensity: extreme

NO_CALIBRATION = ("This model carries no out-of-distribution calibration, so whether this scan resembles the "
                  "healthy scans it was calibrated on cannot be checked: treat the heatmap with caution, and "
                  "re-calibrate the model with `python training/calibrate.py MODEL.safetensors --cache HEALTHY.npz` "
                  "(or use `vaeanomaly adapt` on healthy scans from this scanner).")


# --------------------------------------------------------------------------- per-subject statistics
RIM_MM, DEPTH_MM = 5.625, 11.25  # rim: within 1.5 pixels of 3.75 mm of the brain's edge (in-plane); depth: 3 pixels


def pixel_mm(checkpoint) -> float:
    """In-plane pixel size of a checkpoint's model grid (mm)."""
    from .preprocessing import Preprocessing
    p = Preprocessing.from_dict(checkpoint.preprocessing)
    return p.fov_mm / checkpoint.model.image_size


def _rim_and_depth(brain: np.ndarray, pix: float):
    """Rim and depth masks from the in-plane distance (mm) to the brain's edge."""
    from scipy import ndimage
    d = np.stack([ndimage.distance_transform_edt(s) if s.any() else np.zeros(s.shape) for s in brain]) * pix
    return brain & (d <= RIM_MM), brain & (d >= DEPTH_MM)


def statistics(slices: np.ndarray, brain: np.ndarray, rec_error: np.ndarray, pix: float = 3.75) -> dict:
    """The verdict's per-subject statistics from preprocessed slices, their brain mask and the
    model's reconstruction-error map (all (N, S, S) on the model grid; pix: pixel size in mm)."""
    b = np.asarray(brain, bool)
    if not b.any():
        raise ValueError("no brain pixels on the model grid; nothing to assess")
    v = slices[b].astype(np.float64)
    z = (v - v.mean()) / (v.std() + 1e-9)
    rim, depth = _rim_and_depth(b, pix)
    edge = float(slices[rim].mean() - slices[depth].mean()) if rim.any() and depth.any() else 0.0
    skew = float(np.mean(z ** 3))
    return {"median_rec_error": float(np.median(rec_error[b])), "skewness": skew, "edge_contrast": edge,
            "contrast": skew + edge}


def _maps(checkpoint, slices, predictor: Optional[str], options=None, device="cpu", brain=None) -> dict:
    """rec-error and the flagged predictor on the slices; with the brain mask, as scoring computes them (a map
    normalised by the scan's median takes it over the brain: without the mask, over every non-zero pixel of the
    slices, background included, which made a DAE flag 10-50 % of a healthy brain)."""
    from .predictors import compute_maps
    from .inference import inference_kwargs
    names = ["rec-error"] + ([predictor] if predictor and predictor != "rec-error" else [])
    return compute_maps(checkpoint.model, slices, names, checkpoint.beta, options, device, brain=brain,
                        **inference_kwargs(checkpoint, names, options))


def _flag_predictor(checkpoint, predictor: Optional[str]) -> Optional[str]:
    """The predictor whose calibrated threshold gives flagged_percent: the one asked for if the
    checkpoint has its threshold (and, for the ensemble, its weights), else the default."""
    th = checkpoint.thresholds
    if predictor in th and (predictor != ENSEMBLE or checkpoint.ensemble is not None):
        return predictor
    default = DEFAULT_PREDICTORS[getattr(checkpoint, "kind", "vae")]
    return default if default in th else None


# --------------------------------------------------------------------------- calibration
def limits(values: dict, names, flagged=None, predictor: Optional[str] = None, threshold: Optional[float] = None,
           k: float = K) -> dict:
    """The "verdict" metadata entry from per-subject statistics {statistic: [value per subject]}."""
    n = len(names)
    if n < 1:
        raise ValueError("verdict calibration needs at least one held-out healthy subject")
    stats = {}
    for s in STATISTICS:
        v = np.log(np.maximum(values[s], 1e-12)) if s in LOG_STATS else np.asarray(values[s], float)
        sd = float(np.std(v, ddof=1)) if n > 1 else 0.0
        spread = max(sd, SPREAD_FLOOR[s])
        stats[s] = {"values": [round(float(x), 6) for x in values[s]], "center": float(np.mean(v)), "spread": spread,
                    "low": float(v.min() - k * spread), "high": float(v.max() + k * spread),
                    "scale": "log" if s in LOG_STATS else "linear"}
    out = {"version": VERSION, "n_subjects": n, "subjects": [str(x) for x in names], "k": k, "statistics": stats,
           "note": "per-subject statistics of held-out healthy subjects; accepted range = [min - k*spread, "
                   "max + k*spread] (vaeanomaly/verdict.py)"}
    if predictor and flagged:
        out.update(predictor=predictor, threshold=float(threshold), flagged_percent=[round(f, 4) for f in flagged])
    return out


def calibrate_verdict(checkpoint, cases, thresholds: Optional[dict] = None, predictor: Optional[str] = None,
                      options=None, device="cpu", k: float = K) -> dict:
    """The "verdict" metadata entry from held-out HEALTHY subjects, computing their maps.

    checkpoint: a loaded Checkpoint (its model and β are used; `thresholds` overrides its thresholds,
    e.g. freshly calibrated ones). cases: iterable of (slices, brain), (name, slices, brain) or
    (name, slices, brain, label) per subject, on the model grid (a SliceCache's `cases()`).
    `calibration.calibrate` does the same through `calibration_hook` without recomputing maps.
    """
    th = dict(thresholds if thresholds is not None else checkpoint.thresholds)
    pred = predictor or DEFAULT_PREDICTORS[getattr(checkpoint, "kind", "vae")]  # the model kind's own map
    pred = pred if pred in th else None
    pix = pixel_mm(checkpoint)
    values = {s: [] for s in STATISTICS}
    flagged, names = [], []
    for case in cases:
        name, slices, brain = (f"case{len(names)}", *case) if len(case) == 2 else case[:3]
        slices, brain = np.asarray(slices, np.float32), np.asarray(brain, bool)
        maps = _maps(checkpoint, slices, pred, options, device, brain)
        for s, v in statistics(slices, brain, maps["rec-error"], pix).items():
            values[s].append(v)
        if pred:
            flagged.append(100.0 * float(np.mean(maps[pred][brain] > th[pred])))
        names.append(str(name))
    return limits(values, names, flagged, pred, th.get(pred), k)


def calibration_hook(data) -> dict:
    """calibration.calibrate's hook: the verdict limits from the maps it already computed on the
    held-out healthy cases (data: calibration.CalibrationData)."""
    slices_list = getattr(data, "slices", None)
    if not slices_list:
        return {}
    pix = 240.0 / data.model.image_size if not getattr(data, "pixel_mm", None) else data.pixel_mm
    values = {s: [] for s in STATISTICS}
    for sl, brain, rec in zip(slices_list, data.brains, data.maps["rec-error"]):
        for s, v in statistics(sl, brain, rec, pix).items():
            values[s].append(v)
    pred, flagged, th = DEFAULT_PREDICTORS[getattr(data.model, "kind", "vae")], [], None
    if data.brain_values.get(pred):
        th = float(np.percentile(np.concatenate(data.brain_values[pred]), data.quantile))
        flagged = [100.0 * float(np.mean(v > th)) for v in data.brain_values[pred]]
    return {"verdict": limits(values, data.case_names, flagged, pred, th)}


# --------------------------------------------------------------------------- assessment
def _add(report: dict, warning: str, out_of_distribution: bool = True) -> None:
    report["warnings"].append(warning)
    if out_of_distribution:
        report["in_distribution"] = False


def assess_slices(checkpoint, slices, brain, predictor: Optional[str] = None, options=None, device="cpu",
                  maps: Optional[dict] = None) -> dict:
    """The model-grid part of the verdict for one subject (also usable on a slice cache's cases, as
    training/evaluate.py has them). maps: already computed {name: (N, S, S)} maps to reuse (must
    include 'rec-error', and the flagged predictor if wanted). Returns the report keys in_distribution,
    fit, fit_range, flagged_percent, predictor, threshold, statistics, warnings."""
    slices = np.asarray(slices, np.float32)
    b = np.asarray(brain, bool)
    pred = _flag_predictor(checkpoint, predictor)
    if maps is None or "rec-error" not in maps or (pred and pred not in maps):
        maps = _maps(checkpoint, slices, pred, options, device, b)
    st = statistics(slices, b, maps["rec-error"], pixel_mm(checkpoint))
    report = {"in_distribution": True, "fit": None, "fit_range": None, "flagged_percent": None,
              "predictor": pred, "threshold": None, "statistics": {k: round(v, 6) for k, v in st.items()},
              "warnings": []}
    if pred:
        t = float(checkpoint.thresholds[pred])
        report["threshold"] = t
        vals = maps[pred][b]
        recorded = checkpoint.threshold_options.get("polarity") or option_defaults(pred)["polarity"]
        if options is not None and PREDICTOR_INFO.get(pred) is not None and PREDICTOR_INFO[pred].signed \
                and options.for_map(pred).polarity == "signed" and recorded == "both":
            vals = np.abs(vals)  # a signed map (bright and dark apart) against the threshold of |value| ('both')
        report["flagged_percent"] = round(100.0 * float(np.mean(vals > t)), 3)
    cal = checkpoint.meta.get("verdict")
    if not cal:
        _add(report, NO_CALIBRATION)
        return report
    cs = cal["statistics"]
    rec = cs["median_rec_error"]
    report["fit"] = round(st["median_rec_error"] / math.exp(rec["center"]), 3)
    report["fit_range"] = [round(math.exp(rec["low"] - rec["center"]), 3), round(math.exp(rec["high"] - rec["center"]), 3)]
    if cal.get("flagged_percent"):
        report["flagged_percent_healthy"] = [min(cal["flagged_percent"]), max(cal["flagged_percent"])]

    def outside(s):
        x = math.log(max(st[s], 1e-12)) if cs[s].get("scale") == "log" else st[s]
        return "low" if x < cs[s]["low"] else "high" if x > cs[s]["high"] else None

    fit = outside("median_rec_error")
    wrong_contrast = report["statistics"]["contrast"] < CONTRAST_LIMIT
    if wrong_contrast:
        _add(report, "This scan does not look T2-weighted (the cerebrospinal fluid is not the brightest tissue, as "
                     "in a T1-weighted or FLAIR scan); the model only knows T2 and its heatmap is meaningless here. "
                     "Score the T2-weighted series of this examination instead.")
    if fit == "high" and not wrong_contrast:
        _add(report, f"The model explains this scan much worse than any healthy scan it was calibrated on "
                     f"(fit {report['fit']:.2f}, accepted up to {report['fit_range'][1]:.2f}): another scanner or "
                     f"protocol, strong artefacts, or abnormality throughout the brain. Do not trust the heatmap "
                     f"as it is: check the scan for artefacts, and adapt the model to this scanner with "
                     f"`vaeanomaly adapt` on a few healthy scans from it.")
    elif fit == "low":
        _add(report, f"The scan has far less visible structure than the healthy scans the model was calibrated on "
                     f"(fit {report['fit']:.2f}, accepted from {report['fit_range'][0]:.2f}): extreme noise, "
                     f"blurring or a wrong brain mask. Check the scan and the mask before reading the heatmap.")
    return report


def input_checks(image, mask_given: bool, mask=None, checked_auto_mask=None) -> tuple[dict, list[str], bool]:
    """Input-grid checks. Returns (fields, warnings, scoreable). scoreable is False when an
    automatic mask is not a plausible brain (a head that is not skull-stripped): then scoring refuses.
    checked_auto_mask: the automatic mask that scoring already computed and checked (volume.prepare refuses
    an implausible one), so it is neither computed nor checked twice."""
    import SimpleITK as sitk
    from scipy import ndimage

    from . import brainmask
    from .volume import _box, auto_mask, check_image
    arr = check_image(image)
    m = mask if mask_given else checked_auto_mask if checked_auto_mask is not None else auto_mask(image)
    fields = {"mask": "given" if mask_given else "automatic", "brain_volume_ml": round(brainmask.volume_ml(m), 1)}
    warnings = []
    if not mask_given and checked_auto_mask is None:
        reasons = brainmask.automatic_mask_problems(image, m)
        if reasons:
            return fields, [brainmask.refusal_message(reasons, "This scan")], False
    lo, hi = brainmask.BRAIN_ML_RANGE
    ml = fields["brain_volume_ml"]
    if not lo <= ml <= hi:
        where = "the given brain mask" if mask_given else "the automatic brain mask"
        warnings.append(f"{where[0].upper() + where[1:]} covers {ml:.0f} ml, outside the {lo:.0f}-{hi:.0f} ml of an "
                        f"adult brain: check that the mask belongs to this scan and covers the whole brain.")
    faces = brainmask.face_coverage(m)
    fields["coverage"] = {f: round(v, 3) for f, v in faces.items()}
    cut = [f for f, v in faces.items() if v > brainmask.PARTIAL_COVERAGE]
    if cut:
        warnings.append(f"The brain appears cut off at the {' and '.join(cut)} edge of the scan (partial brain "
                        f"coverage): the model has only seen whole brains, and the cut region cannot be assessed. "
                        f"Use a scan that covers the whole brain.")
    mv = sitk.GetArrayViewFromImage(m) > 0
    box = _box(mv)
    if box is not None:  # within the mask's box and a 2-voxel margin: the same result as on the whole volume
        crop = tuple(slice(max(0, a - 2), min(n, b + 2)) for (a, b), n in zip(box, mv.shape))
        mv, arr = mv[crop], arr[crop]
    inner = ndimage.binary_erosion(mv, iterations=2)
    if inner.sum() > 100:
        a = arr.astype(np.float32)
        resid = (a - ndimage.uniform_filter(a, 3))[inner]
        sigma = 1.4826 * float(np.median(np.abs(resid - np.median(resid)))) * math.sqrt(27 / 26)
        med = float(np.median(a[mv]))
        noise = sigma / med if med > 0 else float("inf")
        fields["noise"] = round(noise, 4)
        if noise > NOISE_LIMIT:
            warnings.append(f"The scan is extremely noisy (voxel noise {100 * noise:.0f}% of the brain's median "
                            f"intensity): the heatmap would mostly show noise. Use a scan with less noise "
                            f"(or a denoised one).")
    return fields, warnings, True


def grid_names(checkpoint, names) -> list:
    """`names` plus the maps the verdict reads on the model grid (rec-error, the flagged predictor), so one
    network pass serves the heatmaps and the verdict."""
    flag = _flag_predictor(checkpoint, names[0] if names else None)
    return list(dict.fromkeys(list(names) + ["rec-error"] + ([flag] if flag else [])))


def input_part(checkpoint, image, mask, checked_auto_mask=None) -> tuple[dict, bool]:
    """The report's input-grid part (mask, brain volume, coverage, noise) and whether the scan can be scored."""
    from .volume import mask_for
    fields, warnings, scoreable = input_checks(image, mask is not None, mask_for(image, mask) if mask is not None
                                               else None, checked_auto_mask)
    base = {"in_distribution": scoreable and not warnings, "fit": None, "fit_range": None, "flagged_percent": None,
            "predictor": None, "threshold": None, "model": checkpoint.name, **fields, "warnings": list(warnings)}
    return base, scoreable


def with_grid_part(base: dict, grid: dict) -> dict:
    report = dict(base)
    report.update({k: v for k, v in grid.items() if k != "warnings"})
    report["warnings"] = list(base["warnings"]) + grid["warnings"]
    report["in_distribution"] = base["in_distribution"] and grid["in_distribution"]
    return report


def assess(checkpoint, image, mask=None, predictor: Optional[str] = None, options=None, device="cpu") -> dict:
    """The verdict for one scan (a SimpleITK image, and a brain mask or None for the automatic one).

    Returns a JSON-ready dict: in_distribution (bool), fit (reconstruction error relative to a typical
    healthy calibration subject; null when not computed), fit_range, brain_volume_ml, mask
    ("given"/"automatic"), flagged_percent (percent of brain voxels above the calibrated threshold of
    `predictor`), predictor, threshold, warnings (sentences that each say what to do), plus details.
    A head that is not skull-stripped and comes without a mask is not scored (fit and flagged_percent
    null, in_distribution false)."""
    from .preprocessing import Preprocessing
    from .volume import prepare
    base, scoreable = input_part(checkpoint, image, mask)
    if not scoreable:
        return base
    from .volume import grid_maps
    p = prepare(image, mask, Preprocessing.from_dict(checkpoint.preprocessing))
    # the maps as scoring computes them on this grid (slice spacing for the smoothing across slices, the brain)
    pred = _flag_predictor(checkpoint, predictor)
    maps = grid_maps(checkpoint, p, ["rec-error"] + ([pred] if pred and pred != "rec-error" else []), options, device)
    return with_grid_part(base, assess_slices(checkpoint, p.slices, p.brain, predictor, options, device, maps=maps))


def write_report(path, report: dict) -> Path:
    import os
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def summary(report: dict) -> str:
    """One line for a terminal or a log, then the warnings."""
    head = ("in distribution" if report["in_distribution"] else "NOT in distribution") + (
        f", fit {report['fit']:.2f}" if report.get("fit") is not None else "") + (
        f", {report['flagged_percent']:.1f}% of the brain flagged" if report.get("flagged_percent") is not None else "")
    return "\n".join([f"verdict: {head}"] + [f"  warning: {w}" for w in report["warnings"]])


def check_report_path(path, inputs=()) -> Path:
    p = Path(path)
    if not p.name.lower().endswith(".json"):
        raise ValueError(f"--report '{p}' must be a .json file")
    if any(x and Path(x).resolve() == p.resolve() for x in inputs):
        raise ValueError(f"--report '{p}' is one of the inputs; choose another file name")
    return p


def publish(path: Path, report: dict) -> None:
    import sys
    write_report(path, report)
    print(summary(report) + f"\nwrote {path}", file=sys.stderr)


def score_report(path, checkpoint, image, mask=None, predictor: Optional[str] = None, options=None, device="cpu",
                 inputs=()) -> dict:
    """Assess one scan, write the JSON report, print the summary to stderr (the verdict alone)."""
    p = check_report_path(path, inputs)
    report = assess(checkpoint, image, mask, predictor, options, device)
    publish(p, report)
    return report
