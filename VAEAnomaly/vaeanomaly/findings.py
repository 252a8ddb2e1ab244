"""Findings: the connected regions of a heatmap above the threshold, ranked, each described the way a
radiologist reads a finding (where, how big, how strong). One implementation, used by `vaeanomaly score
--findings`, cohort scoring's summary and the report.

Coordinates: ITK/DICOM patient coordinates, **LPS** (x to the patient's left, y to posterior, z to superior), in
mm, as SimpleITK gives them (Slicer shows RAS: negate x and y). Regions are 26-connected, inside the brain mask,
at least `min_mm3` (regions.keep_large); ranked by score mass (the sum of the heatmap over the region's voxels
times the voxel volume: size and strength together), largest first; ids A1, A2, ...
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk

from .regions import keep_large, label_regions, voxel_mm3

COORDINATES = "LPS"
FIELDS = ("id", "direction", "volume_ml", "peak", "mean", "score_mass", "centroid_lps_mm", "bbox_min_lps_mm",
          "bbox_max_lps_mm", "slice_first", "slice_last", "mean_intensity_z", "voxels")


def find(heat: sitk.Image, threshold, image: Optional[sitk.Image] = None, mask: Optional[sitk.Image] = None,
         min_mm3: float = 0.0, min_peak=None, direction: Optional[str] = None) -> list[dict]:
    """The findings of one heatmap (on the input grid): regions of voxels > threshold (inside `mask` when given),
    without those under min_mm3 and those whose peak stays below min_peak (calibration.region_peak), ranked by
    score mass. image: the scan, for each region's mean intensity in
    z-score units (the scan standardised by the mean and SD of its brain, as the model's input); slice_first/last
    are indices along the volume's third axis (k), as viewers count slices.
    Each finding's `direction`: 'brighter than expected' / 'darker than expected' (registry.DIRECTIONS) or None.
    direction: 'bright' or 'dark' for a one-sided map of a signed predictor (polarity 'bright' / 'dark'). A signed
    map (threshold a threshold.Tails; min_peak a Tails or None): each tail apart, brighter where s > bright, darker
    where s < -dark; peak, mean and score_mass are then magnitudes in the finding's direction (on -s for a darker
    one), so both rank together."""
    from .threshold import Tails
    h = sitk.GetArrayFromImage(heat).astype(np.float64)
    brain = sitk.GetArrayFromImage(mask) > 0 if mask is not None else np.ones(h.shape, bool)
    if isinstance(threshold, Tails):
        found = []
        for side, score in (("bright", h), ("dark", -h)):
            found += _regions(heat, score, score > getattr(threshold, side), brain, image, min_mm3,
                              None if min_peak is None else getattr(min_peak, side), side)
        return _ranked(found)
    return _ranked(_regions(heat, h, h > threshold, brain, image, min_mm3, min_peak, direction))


def _ranked(found: list[dict]) -> list[dict]:
    found.sort(key=lambda f: -f["score_mass"])
    return [{"id": f"A{i + 1}", **f} for i, f in enumerate(found)]


def _regions(heat: sitk.Image, h: np.ndarray, above: np.ndarray, brain: np.ndarray, image, min_mm3: float, min_peak,
             direction: Optional[str]) -> list[dict]:
    """The kept regions of `above` inside `brain`, described with the scores h (find)."""
    from .registry import DIRECTIONS
    above = keep_large(above & brain, heat.GetSpacing(), min_mm3, h, min_peak)
    if not above.any():
        return []
    lab, n = label_regions(above)
    v_mm3 = voxel_mm3(heat.GetSpacing())
    z = None
    if image is not None:
        arr = sitk.GetArrayFromImage(image).astype(np.float64)
        vals = arr[brain]
        z = (arr - vals.mean()) / (vals.std() or 1.0)
    idx = np.arange(1, n + 1)
    from scipy import ndimage
    count = ndimage.sum_labels(above, lab, idx)
    total = ndimage.sum_labels(h, lab, idx)
    peak = ndimage.maximum(h, lab, idx)
    zmean = ndimage.mean(z, lab, idx) if z is not None else [None] * n
    boxes = ndimage.find_objects(lab)
    d = np.array(heat.GetDirection()).reshape(3, 3)
    sp, org = np.array(heat.GetSpacing()), np.array(heat.GetOrigin())
    to_lps = lambda kji: org + (np.asarray(kji, float)[:, ::-1] * sp) @ d.T  # noqa: E731  (k, j, i) -> LPS mm, (n, 3)
    out = []
    for r in range(n):
        pts = np.argwhere(lab[boxes[r]] == r + 1) + [s.start for s in boxes[r]]
        world = to_lps(pts)
        out.append({"direction": DIRECTIONS.get(direction), "volume_ml": round(float(count[r]) * v_mm3 / 1000, 4),
                    "peak": float(peak[r]),
                    "mean": float(total[r] / count[r]), "score_mass": float(total[r] * v_mm3 / 1000),
                    "centroid_lps_mm": [round(float(c), 2) for c in world.mean(0)],
                    "bbox_min_lps_mm": [round(float(c), 2) for c in world.min(0)],
                    "bbox_max_lps_mm": [round(float(c), 2) for c in world.max(0)],
                    "slice_first": int(boxes[r][0].start), "slice_last": int(boxes[r][0].stop - 1),
                    "mean_intensity_z": None if zmean[r] is None else round(float(zmean[r]), 3),
                    "voxels": int(count[r])})
    return out


def summary(found: list[dict]) -> dict:
    """For cohort scoring's summary.csv: the number of findings and the largest volume (ml)."""
    return {"findings": len(found), "largest_finding_ml": max((f["volume_ml"] for f in found), default=0.0)}


def check_path(path) -> Path:
    p = Path(path)
    if p.suffix.lower() not in (".json", ".csv"):
        raise ValueError(f"--findings {p}: give a .json or .csv file")
    return p


def write(path, found: list[dict], meta: Optional[dict] = None) -> Path:
    """JSON ({coordinates, ..meta, findings: [...]}) or CSV (one row per finding; the coordinate convention in the
    column names), written whole or not at all. An empty list is a valid, empty result."""
    from .io import atomic_path
    p = check_path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(p) as tmp:
        if p.suffix.lower() == ".json":
            Path(tmp).write_text(json.dumps({"coordinates": COORDINATES, **(meta or {}), "findings": found}, indent=1),
                                 encoding="utf-8")
        else:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(FIELDS)
                for x in found:
                    w.writerow([" ".join(str(v) for v in x[k]) if isinstance(x.get(k), list) else
                                ("" if x.get(k) is None else x[k]) for k in FIELDS])
    return p
