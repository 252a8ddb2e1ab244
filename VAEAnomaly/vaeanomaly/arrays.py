"""Array helpers shared by the volume code (volume.py) and the mask checks below it (brainmask.py):
a mask's bounding box, what reorienting to LPS does to the axes, a fast exact percentile and the robust
background level of a volume. Imports nothing of the package."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import numpy as np
import SimpleITK as sitk


@dataclass
class _Orientation:
    perm: tuple            # reoriented axis j (x, y, z order) is input axis perm[j] ...
    flip: tuple            # ... read backwards when flip[j]
    size: tuple
    spacing: tuple
    direction: np.ndarray  # 3x3, columns = reoriented axes
    origin: np.ndarray


@functools.lru_cache(maxsize=64)
def _lps_direction(direction: tuple) -> tuple:
    """The direction sitk.DICOMOrient(img, "LPS") gives an image of this direction (found on a 2x2x2 image)."""
    probe = sitk.Image(2, 2, 2, sitk.sitkUInt8)
    probe.SetDirection(direction)
    return sitk.DICOMOrient(probe, "LPS").GetDirection()


def _orientation(img: sitk.Image) -> Optional[_Orientation]:
    """What sitk.DICOMOrient(img, 'LPS') does to the axes, without touching the voxels; None when the
    direction is not orthonormal (then only resampling is exact)."""
    d = np.array(img.GetDirection(), float).reshape(3, 3)
    if not np.allclose(d.T @ d, np.eye(3), atol=1e-6):
        return None
    d_o = np.array(_lps_direction(img.GetDirection()), float).reshape(3, 3)
    p = np.rint(d.T @ d_o)
    if not (np.abs(p).sum(0) == 1).all() or not (np.abs(p).sum(1) == 1).all():
        return None
    perm = tuple(int(np.argmax(np.abs(p[:, j]))) for j in range(3))
    flip = tuple(bool(p[perm[j], j] < 0) for j in range(3))
    size, sp = img.GetSize(), img.GetSpacing()
    corner = [size[a] - 1 if flip[j] else 0 for j, a in enumerate(perm)]
    idx = [0, 0, 0]
    for j, a in enumerate(perm):
        idx[a] = corner[j]
    origin = np.array(img.TransformIndexToPhysicalPoint(idx))
    return _Orientation(perm, flip, tuple(size[a] for a in perm), tuple(sp[a] for a in perm), d_o, origin)


def _box(marr: np.ndarray) -> Optional[list[tuple[int, int]]]:
    """Bounding box of a 3D mask: [(start, stop)] per array axis (None when empty). Two passes: the z range,
    then the (y, x) projection of those slices only."""
    z = np.flatnonzero(marr.any(axis=(1, 2)))
    if not len(z):
        return None
    yx = marr[z[0]:z[-1] + 1].any(0)
    y, x = np.flatnonzero(yx.any(1)), np.flatnonzero(yx.any(0))
    return [(int(z[0]), int(z[-1]) + 1), (int(y[0]), int(y[-1]) + 1), (int(x[0]), int(x[-1]) + 1)]


def _percentile(a: np.ndarray, q: float) -> float:
    """float(np.percentile(a, q)) (method 'linear', the same float arithmetic) for a large array, without
    partitioning all of it: the two order statistics it interpolates are bracketed from a subsample's estimate
    and checked by counting. Falls back to np.percentile when the bracket misses."""
    flat = a.reshape(-1)
    n = flat.size
    if n < 1 << 18:
        return float(np.percentile(a, q))
    qq = float(np.true_divide(q, 100))
    vi = n * qq + (1 + qq * (1 - 1 - 1)) - 1          # numpy's virtual index for 'linear'
    i = min(max(int(np.floor(vi)), 0), n - 1)
    j = min(i + 1, n - 1)
    sub = np.sort(flat[::n // (1 << 16)])
    m = len(sub)
    lo_v, hi_v = sub[max(int(qq * m) - 256, 0)], sub[min(int(qq * m) + 256, m - 1)]
    below = int(np.count_nonzero(flat < lo_v))
    inside = flat[(flat >= lo_v) & (flat <= hi_v)]
    if not (below <= i and j < below + inside.size):
        return float(np.percentile(a, q))
    inside = np.sort(inside)
    prev, nxt = inside[i - below], inside[j - below]
    gamma = float(vi - i)
    d = nxt - prev                                     # numpy's _lerp, in the array's dtype
    res = prev + d * gamma
    if gamma >= 0.5:
        res = nxt - d * (1 - gamma)
    return float(res)


BACKGROUND_PERCENTILE = 10.0


def background_level(values: np.ndarray) -> float:
    """The intensity of a volume's background: its 10th percentile (np.percentile's value), not its minimum.
    A skull-stripped volume resampled with a B-spline or windowed-sinc interpolator rings at the brain's edge:
    a few percent of its voxels undershoot the zero background (down to a third of the brain's range), and the
    minimum follows them -- the automatic mask's threshold then falls below the background, which becomes
    'foreground' everywhere. The background itself is always more than 10 % of a volume that holds a whole
    brain (a brain fills at most about two thirds of its bounding box), so this percentile lies in it.
    Estimated on an evenly strided sample of at most 2^18 voxels (a few milliseconds; the exact percentile of a
    volume that is mostly zero costs a third of a second)."""
    flat = np.asarray(values).reshape(-1)
    sample = flat[::max(1, flat.size >> 18)]
    return float(np.percentile(sample, BACKGROUND_PERCENTILE))
