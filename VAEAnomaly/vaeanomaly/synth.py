"""Embedded data: realistic skull-stripped T2-weighted brains from real anatomy.

The anatomy is the MNI152 2009 1 mm template's grey- and white-matter probability maps and brain
mask, shipped inside the nilearn wheel (no download). T2 contrast follows from the tissue classes
(CSF bright, grey matter intermediate, white matter dark). Each subject gets a random smooth
deformation and global scaling (size/shape), tissue-contrast, bias-field and noise variation, and
its own voxel size and slice thickness. Lesion subjects get a tumour-like lesion (necrotic core,
rim, surrounding T2-hyperintense oedema, mass effect displacing the anatomy), written with a
BraTS-style label map (1 necrotic core, 2 oedema, 4 rim). Deterministic by seed.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk
from scipy import ndimage


@functools.lru_cache(maxsize=1)
def _anatomy():
    from nilearn import datasets
    gm = datasets.load_mni152_gm_template(resolution=1)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).get_fdata(), np.float32)
    brain = np.asarray(datasets.load_mni152_brain_mask(resolution=1).get_fdata(), np.float32)
    gmv = np.asarray(gm.get_fdata(), np.float32)
    idx = np.argwhere(brain > 0)
    lo, hi = np.maximum(idx.min(0) - 6, 0), np.minimum(idx.max(0) + 7, brain.shape)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    affine = gm.affine.copy()
    affine[:3, 3] += affine[:3, :3] @ lo  # RAS mm of the cropped array's voxel 0
    depth = ndimage.distance_transform_edt(brain[crop] > 0.5).astype(np.float32)
    return gmv[crop], wm[crop], brain[crop], depth, affine


def _smooth_noise(rng, shape, coarse, amp):
    """Smooth random field: normal noise on a coarse grid, cubic-upsampled to shape."""
    c = rng.normal(0, amp, coarse).astype(np.float32)
    return ndimage.zoom(c, [s / k for s, k in zip(shape, coarse)], order=1, mode="nearest", grid_mode=True)[
        tuple(slice(0, s) for s in shape)]


@dataclass
class Subject:
    t2: sitk.Image
    mask: sitk.Image
    seg: Optional[sitk.Image] = None


def make_subject(seed: int, lesion: bool = False, brats_geometry: Optional[bool] = None) -> Subject:
    rng = np.random.default_rng(seed)
    gm, wm, brain, depth, affine = _anatomy()
    shape = gm.shape
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    centre = (np.array(shape, np.float32) - 1) / 2
    # global affine: per-axis scale (head size/shape) and a small rotation about the vertical axis
    scale = rng.uniform(0.92, 1.06, 3) * rng.uniform(0.96, 1.03)
    th = np.deg2rad(rng.uniform(-6, 6))
    rot = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]], np.float32)
    a = rot @ np.diag(1 / scale).astype(np.float32)
    src = np.einsum("ij,j...->i...", a, grid - centre[:, None, None, None]) + centre[:, None, None, None]
    # smooth non-linear deformation, ~2-4 mm
    amp = rng.uniform(2.0, 4.0)
    src += np.stack([_smooth_noise(rng, shape, (5, 6, 5), amp) for _ in range(3)]).astype(np.float32)
    seg = None
    if lesion:
        # lesion centre inside deep tissue (at least ~12 mm from the brain surface), in output space
        cand = np.argwhere((depth > 14) & (gm + wm > 0.6))
        c = cand[rng.integers(len(cand))].astype(np.float32)
        r_tumour = rng.uniform(7, min(20, depth[tuple(c.astype(int))] - 2))
        r_oedema = r_tumour * rng.uniform(1.4, 2.1)
        d = grid - c[:, None, None, None]
        r = np.sqrt((d ** 2).sum(0)) + 1e-3
        # mass effect: radial push of the anatomy away from the centre (monotone in r)
        m, s = 0.6 * r_tumour, 1.5 * r_tumour
        r_src = np.maximum(r - m * np.exp(-r ** 2 / (2 * s ** 2)), 0)
        src = c[:, None, None, None] + (src - c[:, None, None, None]) * (r_src / r)
        # irregular shapes: distance modulated by smooth noise
        r_irr = r * (1 + _smooth_noise(rng, shape, (8, 9, 8), 0.18))
        r_oed = r * (1 + _smooth_noise(rng, shape, (10, 11, 10), 0.3))
    warp = lambda v: ndimage.map_coordinates(v, src, order=1, mode="constant", cval=0.0)  # noqa: E731
    gm_w, wm_w, brain_w = warp(gm), warp(wm), warp(brain)
    csf_w = np.clip(brain_w - gm_w - wm_w, 0, 1)
    i_csf, i_gm, i_wm = rng.normal(1.0, 0.05), rng.normal(0.56, 0.04), rng.normal(0.38, 0.03)
    t2 = csf_w * i_csf + gm_w * i_gm + wm_w * i_wm
    t2 *= 1 + _smooth_noise(rng, shape, (24, 28, 24), 0.03)  # fine tissue texture
    mask = brain_w > 0.5
    if lesion:
        tissue = np.clip(gm_w + wm_w, 0, 1)
        core_r = 0.5 * r_tumour if r_tumour > 9 else 0
        tumour = (r_irr < r_tumour) & mask
        core = (r_irr < core_r) & mask
        oedema = (r_oed < r_oedema) & mask & ~tumour & (tissue > 0.3)
        w_oed = np.clip((r_oedema - r_oed) / 4, 0, 1) * oedema * (wm_w + 0.6 * gm_w)
        t2 = t2 * (1 - w_oed) + rng.uniform(0.78, 0.95) * w_oed
        rim_i = rng.uniform(0.62, 0.8)
        t2 = np.where(tumour, rim_i * (1 + _smooth_noise(rng, shape, (16, 18, 16), 0.06)), t2)
        t2 = np.where(core, rng.uniform(1.05, 1.3), t2)
        seg = np.zeros(shape, np.uint8)
        seg[oedema & (w_oed > 0.05)] = 2
        seg[tumour] = 4
        seg[core] = 1
    t2 *= np.exp(_smooth_noise(rng, shape, (3, 3, 3), rng.uniform(0.04, 0.12)))  # bias field
    sigma = rng.uniform(0.015, 0.035)
    t2 = np.sqrt((t2 + rng.normal(0, sigma, shape)) ** 2 + rng.normal(0, sigma, shape) ** 2)  # Rician
    t2 = np.where(mask, t2 * rng.uniform(300, 1500), 0).astype(np.float32)
    return _geometry(t2, mask, seg, affine, rng, brats_geometry if brats_geometry is not None else lesion)


def _as_image(arr, affine):
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))  # (x,y,z) -> sitk (z,y,x)
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    img.SetDirection(tuple((ras_to_lps @ affine[:3, :3] / np.abs(affine[:3, :3]).sum(0)).ravel()))
    img.SetSpacing(tuple(np.abs(affine[:3, :3]).sum(0)))
    img.SetOrigin(tuple(ras_to_lps @ affine[:3, 3]))
    return img


def _geometry(t2, mask, seg, affine, rng, brats: bool) -> Subject:
    """Resample to the subject's acquisition grid: BraTS-like (1 mm, 240x240x155) or varied."""
    img = _as_image(t2, affine)
    if brats:
        spacing, size = (1.0, 1.0, 1.0), (240, 240, 155)
    else:
        ip = rng.uniform(0.9, 1.3)
        spacing = (ip, ip, float(rng.choice([1.0, 1.5, 2.0, 3.0])))
        size = tuple(int(np.ceil(sz * sp / s)) + 6 for sz, sp, s in zip(img.GetSize(), img.GetSpacing(), spacing))
    ref = sitk.Image(*size, sitk.sitkFloat32)
    ref.SetSpacing(spacing)
    ref.SetDirection(img.GetDirection())
    centre = img.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in img.GetSize()])
    d = np.array(img.GetDirection()).reshape(3, 3)
    ref.SetOrigin(tuple(np.array(centre) - d @ ((np.array(size) - 1) / 2 * np.array(spacing))))
    # partial-volume: average over the slice thickness before sampling
    var = [max(s ** 2 - 1, 0) / 4 for s in spacing]
    t2_out = sitk.Resample(sitk.DiscreteGaussian(img, var) if any(var) else img, ref, sitk.Transform(),
                           sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    nn = lambda a: sitk.Cast(sitk.Resample(_as_image(a.astype(np.uint8), affine), ref, sitk.Transform(),  # noqa: E731
                                           sitk.sitkNearestNeighbor, 0), sitk.sitkUInt8)
    m_out = nn(mask)
    t2_out = sitk.Mask(sitk.Clamp(t2_out, lowerBound=0), m_out)
    return Subject(t2_out, m_out, nn(seg) if seg is not None else None)


def write_one(out_dir, i: int, lesion: bool, seed: int = 0) -> Path:
    """Write subject i of a cohort. Healthy: HCP-like <id>/T1w/T2w_acpc_dc_restore_brain.nii.gz
    (+ brainmask_fs.nii.gz). Lesion: BraTS layout <case>/<case>_t2.nii.gz, <case>_seg.nii.gz
    (+ <case>_brainmask.nii.gz)."""
    out = Path(out_dir)
    sub = make_subject(seed * 100_003 + i + (50_000 if lesion else 0), lesion=lesion)
    if lesion:
        case = f"SYN_{seed:02d}_{i:03d}"
        d = out / case
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"{case}_t2.nii.gz"
        sitk.WriteImage(sub.seg, str(d / f"{case}_seg.nii.gz"))
        sitk.WriteImage(sub.mask, str(d / f"{case}_brainmask.nii.gz"))
    else:
        d = out / f"{seed:02d}{i:04d}" / "T1w"
        d.mkdir(parents=True, exist_ok=True)
        p = d / "T2w_acpc_dc_restore_brain.nii.gz"
        sitk.WriteImage(sub.mask, str(d / "brainmask_fs.nii.gz"))
    sitk.WriteImage(sub.t2, str(p))
    return p


def write_cohort(out_dir, n: int, lesion: bool, seed: int = 0, progress=None) -> list[Path]:
    """Write n subjects (see write_one)."""
    paths = []
    for i in range(n):
        paths.append(write_one(out_dir, i, lesion, seed))
        if progress:
            progress((i + 1) / n)
    return paths


def write_sample(out_dir, seed: int = 9001) -> dict:
    """The module's sample case (a generated brain with a lesion, never in any training set):
    VAEAnomalySample_T2.nrrd (int16) and the ground-truth label map VAEAnomalySample_Lesion.nrrd. Returns {file name: SHA256}."""
    import hashlib
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sub = make_subject(seed, lesion=True)
    files = {"VAEAnomalySample_T2.nrrd": sitk.Cast(sitk.Round(sub.t2), sitk.sitkInt16),
             "VAEAnomalySample_Lesion.nrrd": sitk.Cast(sub.seg > 0, sitk.sitkUInt8)}
    sums = {}
    for name, img in files.items():
        sitk.WriteImage(img, str(out / name), useCompression=True)
        sums[name] = hashlib.sha256((out / name).read_bytes()).hexdigest()
    return sums
