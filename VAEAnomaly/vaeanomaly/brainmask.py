"""Is a brain mask plausible? Skull handling for input scored without a mask.

The automatic foreground mask (`volume.auto_mask`) is a documented fallback for SKULL-STRIPPED input.
On a head that is not skull-stripped it covers scalp, skull and air, and every heatmap computed inside
it would be meaningless. This module recognises that case and refuses with a message that says how
to get a brain mask; it does not attempt brain extraction itself (no maintained brain-extraction
package here runs robustly without downloading network weights, and a wrong automatic mask would be
worse than none).

A head is recognised by an automatic mask that is
  - far larger than any brain (> HEAD_ML millilitres), or
  - dominated by background: more than BACKGROUND_FRACTION of its voxels darker than 5 % of its
    bright (99th percentile) intensity, or
  - touching the edges of the field of view on three or more sides (more than half of its largest
    cross-section lies on each of those faces).
Limits are anatomical (an adult brain mask, CSF included, is about 1000-1900 ml; a head with scalp
3500 ml and more), not learnt, so they hold for every model.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

HEAD_ML = 3000.0                 # an automatic mask larger than this is not a brain
BACKGROUND_FRACTION = 0.25       # more than this share of dark voxels inside the mask: background
DARK_LEVEL = 0.05                # "dark": below 5 % of the mask's 99th-percentile intensity
FACE_TOUCH = 0.5                 # a face "touched" when >50 % of the largest cross-section lies on it
PARTIAL_COVERAGE = 0.25          # a brain "cut off" at a face carrying >25 % of its largest cross-section
BRAIN_ML_RANGE = (600.0, 2600.0)  # plausible brain-mask volumes (adults, generous)

# LPS-oriented array axes (z, y, x): x grows to the Left, y to Posterior, z to Superior
FACES = (("right", 2, 0), ("left", 2, -1), ("anterior", 1, 0), ("posterior", 1, -1),
         ("inferior", 0, 0), ("superior", 0, -1))

HOW_TO_GET_A_MASK = (
    "Give a brain mask on the same grid: `vaeanomaly score IN -o OUT --mask brain_mask.nii.gz` "
    "(in 3D Slicer: choose it in the panel's 'Brain mask' selector). To make one: FSL `bet IN.nii.gz brain -m`, "
    "FreeSurfer `mri_synthstrip -i IN.nii.gz -m brain_mask.nii.gz`, HD-BET, or Slicer's SwissSkullStripper "
    "extension / Segment Editor. Or score a skull-stripped volume.")


def volume_ml(mask: sitk.Image) -> float:
    return float(np.count_nonzero(sitk.GetArrayViewFromImage(mask))) * float(np.prod(mask.GetSpacing())) / 1000.0


def face_coverage(mask: sitk.Image) -> dict:
    """{face: share of the mask's largest cross-section (perpendicular to that face) lying on the face},
    faces named in patient coordinates (right, left, anterior, posterior, inferior, superior)."""
    m = sitk.GetArrayFromImage(sitk.DICOMOrient(mask, "LPS")) > 0
    out = {}
    for name, axis, idx in FACES:
        areas = m.sum(axis=tuple(a for a in range(3) if a != axis))
        big = float(areas.max()) if areas.size else 0.0
        out[name] = float(areas[idx]) / big if big else 0.0
    return out


def dark_fraction(img: sitk.Image, mask: sitk.Image) -> float:
    """Share of mask voxels darker than DARK_LEVEL of the mask's 99th-percentile intensity."""
    vals = sitk.GetArrayViewFromImage(img)[sitk.GetArrayViewFromImage(mask) > 0].astype(np.float32)
    if vals.size == 0:
        return 0.0
    lo, hi = float(vals.min()), float(np.percentile(vals, 99))
    return float(np.mean(vals < lo + DARK_LEVEL * (hi - lo))) if hi > lo else 0.0


def automatic_mask_problems(img: sitk.Image, mask: sitk.Image) -> list[str]:
    """Reasons why an AUTOMATIC mask cannot be a brain (empty list: plausible)."""
    reasons = []
    ml = volume_ml(mask)
    if ml > HEAD_ML:
        reasons.append(f"it covers {ml:.0f} ml, far more than any brain (about 1000-1900 ml)")
    dark = dark_fraction(img, mask)
    if dark > BACKGROUND_FRACTION:
        reasons.append(f"{100 * dark:.0f}% of it is dark background")
    touched = [f for f, v in face_coverage(mask).items() if v > FACE_TOUCH]
    if len(touched) >= 3:
        reasons.append(f"it touches the edge of the field of view on {len(touched)} sides ({', '.join(touched)})")
    return reasons


def refusal_message(reasons, what: str = "input") -> str:
    return (f"{what} does not look skull-stripped and no brain mask was given: the automatic mask "
            f"({'; '.join(reasons)}) would include scalp, skull and air, and their heatmap would mean nothing. "
            + HOW_TO_GET_A_MASK)


def check_automatic_mask(img: sitk.Image, mask: sitk.Image, what: str = "input") -> None:
    """Raise VolumeError (with how to get a mask) if an automatic mask is not a plausible brain."""
    reasons = automatic_mask_problems(img, mask)
    if reasons:
        from .volume import VolumeError
        raise VolumeError(refusal_message(reasons, what))
