"""Connected regions of a thresholded heatmap: the segment a clinician gets, and lesion-wise counting.

One implementation, used by `vaeanomaly score --label`, the Slicer panel's "Create segment" and the
benchmark's lesion-wise metrics:
- `keep_large(mask, spacing, min_mm3, score, min_peak)`: regions (3D, 26-connected) smaller than min_mm3 dropped, and
  (hysteresis) those whose highest score stays below `min_peak` (the checkpoint's calibrated region peak,
  calibration.region_peak);
- `lesion_detection(...)`: lesions found (a lesion counts as found when at least one of its voxels lies in a
  region above the threshold that is kept) and false regions (kept regions that touch no lesion).
Arrays are (z, y, x) as SimpleITK gives them; spacing is (x, y, z) in mm, as SimpleITK gives it.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from scipy import ndimage

DEFAULT_MIN_REGION_MM3 = 100.0  # label regions below this are dropped (a 4.6 mm cube; docs/validation.md)
_FULL = np.ones((3, 3, 3), bool)  # 26-connectivity


def min_region_mm3(checkpoint) -> float:
    """The smallest label region kept: the checkpoint's recorded `label.min_region_mm3`, else the default."""
    v = (checkpoint.meta.get("label") or {}).get("min_region_mm3") if checkpoint is not None else None
    return float(DEFAULT_MIN_REGION_MM3 if v is None else v)


def describe_regions(min_mm3: float, min_peak: Optional[float] = None) -> str:
    """The regions a label, a findings list or a segment keeps, in words (the report and the command line say it)."""
    return (f"regions of at least {min_mm3:g} mm3" +
            (f" whose peak reaches {min_peak:.4g} (the model's region peak)" if min_peak is not None else ""))


def voxel_mm3(spacing) -> float:
    return float(np.prod([float(s) for s in spacing]))


def label_regions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """(labels, count): 26-connected regions of a 3D boolean array."""
    lab, n = ndimage.label(np.asarray(mask, bool), structure=_FULL)
    return lab, int(n)


def keep_large(mask: np.ndarray, spacing, min_mm3: float, score: Optional[np.ndarray] = None,
               min_peak: Optional[float] = None) -> np.ndarray:
    """The mask without its regions smaller than min_mm3 (0 keeps every size) and, given `score` (same shape) and
    `min_peak`, without the regions whose highest score is below min_peak."""
    mask = np.asarray(mask, bool)
    use_size = bool(min_mm3) and min_mm3 > 0
    use_peak = score is not None and min_peak is not None
    if not (use_size or use_peak) or not mask.any():
        return mask.copy()
    lab, n = label_regions(mask)
    keep = np.ones(n + 1, bool)
    if use_size:
        keep &= np.bincount(lab.ravel(), minlength=n + 1) * voxel_mm3(spacing) >= min_mm3
    if use_peak:
        top = np.full(n + 1, -np.inf)
        np.maximum.at(top, lab[mask], np.asarray(score, np.float64)[mask])
        keep &= top >= min_peak
    keep[0] = False
    return keep[lab]


def label_image(heat, spec, calibrated: dict, predictor: str, min_mm3: float, min_peak=None, signed: bool = False):
    """The label map a clinician gets from a heatmap (SimpleITK image): voxels above the threshold `spec`
    (threshold.resolve_threshold: a number, 'p99', 'auto'), regions below min_mm3 dropped and, given `min_peak`, the
    regions that never reach it. Returns (label image uint8 on the heatmap's grid, threshold, voxels kept,
    voxels dropped). A signed map (signed=True, or calibrated[predictor] a threshold.Tails: polarity 'signed'): each
    tail apart (threshold.resolve_tails; min_peak a Tails or None), label 1 where brighter than expected, 2 where
    darker (signed_label); the threshold returned is then a Tails."""
    import SimpleITK as sitk

    from .threshold import Tails, resolve_threshold, resolve_tails
    arr = sitk.GetArrayFromImage(heat)
    if signed or isinstance(calibrated.get(predictor), Tails):
        t = resolve_tails(spec, arr, arr != 0, calibrated, predictor)
        lab_arr, n_above = signed_label(arr, t, heat.GetSpacing(), min_mm3, min_peak)
        lab = sitk.GetImageFromArray(lab_arr)
        lab.CopyInformation(heat)
        kept = int((lab_arr > 0).sum())
        return lab, t, kept, n_above - kept
    t = resolve_threshold(spec, arr, arr > 0, calibrated, predictor)
    above = arr > t
    kept = keep_large(above, heat.GetSpacing(), min_mm3, arr, min_peak)
    lab = sitk.GetImageFromArray(kept.astype(np.uint8))
    lab.CopyInformation(heat)
    return lab, t, int(kept.sum()), int(above.sum() - kept.sum())


def direction_masks(arr: np.ndarray, tails, spacing, min_mm3: float, min_peak=None) -> dict:
    """{'bright': voxels with s > tails.bright, 'dark': s < -tails.dark} of a signed map s, each direction's regions
    kept as keep_large keeps them (min_peak: a threshold.Tails of region peaks, the dark one on -s, or None), plus
    'above': how many voxels were above either threshold before."""
    arr = np.asarray(arr)
    out, n = {}, 0
    for side, score, t in (("bright", arr, tails.bright), ("dark", -arr, tails.dark)):
        above = score > t
        n += int(above.sum())
        out[side] = keep_large(above, spacing, min_mm3, score, None if min_peak is None else getattr(min_peak, side))
    out["dark"] &= ~out["bright"]  # disjoint whenever both thresholds are >= 0 (always on a calibrated map)
    out["above"] = n
    return out


def signed_label(arr: np.ndarray, tails, spacing, min_mm3: float, min_peak=None) -> tuple[np.ndarray, int]:
    """The label of a signed map: registry.LABEL_VALUES (1 = brighter than expected, 2 = darker), 0 elsewhere
    (uint8, arr's shape), and the number of voxels above either threshold before small / weak regions were
    dropped."""
    from .registry import LABEL_VALUES
    m = direction_masks(arr, tails, spacing, min_mm3, min_peak)
    lab = np.zeros(np.shape(arr), np.uint8)
    for side in ("bright", "dark"):
        lab[m[side]] = LABEL_VALUES[side]
    return lab, m["above"]


def lesion_detection(score: np.ndarray, label: np.ndarray, brain: np.ndarray, threshold: float, spacing,
                     min_mm3: float = DEFAULT_MIN_REGION_MM3, min_peak: Optional[float] = None) -> dict:
    """Lesion-wise counts for one case: n_lesions (26-connected lesion regions), found, false_regions
    (regions above the threshold, inside the brain, at least min_mm3, reaching `min_peak` where given, touching no
    lesion voxel)."""
    above = keep_large((np.asarray(score) > threshold) & np.asarray(brain, bool), spacing, min_mm3, score, min_peak)
    lesions, n_les = label_regions(np.asarray(label, bool) & np.asarray(brain, bool))
    found = len(np.setdiff1d(np.unique(lesions[above]), [0])) if n_les else 0
    regions, n_reg = label_regions(above)
    on_lesion = np.unique(regions[(lesions > 0) & above]) if n_les else np.array([], int)
    return {"n_lesions": n_les, "found": int(found), "false_regions": int(n_reg - len(np.setdiff1d(on_lesion, [0])))}
