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


@functools.lru_cache(maxsize=2)
def _template(step: int = 1):
    """Template maps cropped to the brain (+6 mm); step > 1 subsamples them (fast generated data for tests).
    Returns gm, wm, brain, affine (RAS mm of the array's voxels)."""
    from nilearn import datasets
    gm = datasets.load_mni152_gm_template(resolution=1)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).get_fdata(), np.float32)
    brain = np.asarray(datasets.load_mni152_brain_mask(resolution=1).get_fdata(), np.float32)
    gmv = np.asarray(gm.get_fdata(), np.float32)
    idx = np.argwhere(brain > 0)
    lo, hi = np.maximum(idx.min(0) - 6, 0), np.minimum(idx.max(0) + 7, brain.shape)
    affine = gm.affine.copy()
    affine[:3, 3] += affine[:3, :3] @ lo  # RAS mm of the cropped array's voxel 0
    crop = tuple(slice(a, b, step) for a, b in zip(lo, hi))
    affine[:3, :3] *= step
    return gmv[crop], wm[crop], brain[crop], affine


@functools.lru_cache(maxsize=2)
def _anatomy(step: int = 1):
    """_template's maps and the depth (mm inside the brain): gm, wm, brain, depth, affine."""
    gm, wm, brain, affine = _template(step)
    kw = {"sampling": step} if step != 1 else {}
    return gm, wm, brain, ndimage.distance_transform_edt(brain > 0.5, **kw).astype(np.float32), affine


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


def make_subject(seed: int, lesion=False, brats_geometry: Optional[bool] = None, domain: Optional[str] = None,
                 head: bool = False, step: int = 1, **switches) -> Subject:
    """One generated subject. domain=None: the original generator ("legacy", which trained the first
    bundled models and made the paper-grid tables). Any other domain (see DOMAINS): the varied generator,
    where `lesion` is False, True ("glioma") or a family name (see LESION_FAMILIES) and head=True adds
    skull, scalp and background (the mask stays the brain). step: the anatomy sampled every `step` mm before
    acquisition (2 is about 8x faster and coarser: for tests); the acquisition grid is the same."""
    if domain is not None and domain != "legacy":
        return make_varied(seed, domain, lesion, head=head, step=step, **switches)
    if head or switches:
        raise ValueError("head and generator switches need a domain other than 'legacy'")
    return _legacy_subject(seed, bool(lesion), brats_geometry, step)


def _legacy_subject(seed: int, lesion: bool, brats_geometry: Optional[bool], step: int = 1) -> Subject:
    rng = np.random.default_rng(seed)
    gm, wm, brain, affine = _template(step)  # the depth only where a lesion is placed
    shape = gm.shape
    # grid, centre, deformation and lesion geometry in mm (voxels of `step` mm)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) * step for s in shape], indexing="ij"))
    centre = (np.array(shape, np.float32) - 1) / 2 * step
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
        depth = _anatomy(step)[3]
        cand = np.argwhere((depth > 14) & (gm + wm > 0.6))
        c = cand[rng.integers(len(cand))].astype(np.float32)
        r_tumour = rng.uniform(7, min(20, depth[tuple(c.astype(int))] - 2))
        c = c * step
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
    src = src if step == 1 else src / step
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


def write_one(out_dir, i: int, lesion: bool, seed: int = 0, step: int = 1) -> Path:
    """Write subject i of a cohort. Healthy: HCP-like <id>/T1w/T2w_acpc_dc_restore_brain.nii.gz
    (+ brainmask_fs.nii.gz). Lesion: BraTS layout <case>/<case>_t2.nii.gz, <case>_seg.nii.gz
    (+ <case>_brainmask.nii.gz). step: see make_subject (2: fast, for tests)."""
    out = Path(out_dir)
    sub = make_subject(seed * 100_003 + i + (50_000 if lesion else 0), lesion=lesion, step=step)
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


# =========================================================================== the varied generator
# Anatomy from the same template, but every subject differs in shape (strong smooth deformation,
# head size, pose), age (ventricle enlargement, cortical atrophy) and acquisition (contrast from
# a spin-echo signal model at the domain's TE/TR/TI, voxel size, slice thickness, blur, geometric
# distortion, bias field, Rician noise on the acquisition grid). Lesion families and domains are
# switched by name; the benchmark's domain "epi" and the foreign contrasts never reach training.

# (T1 ms, T2 ms, proton density) at 3 T, rounded literature values
TISSUE = {"csf": (4000.0, 2000.0, 1.0), "gm": (1400.0, 110.0, 0.82), "wm": (850.0, 80.0, 0.70),
          "fat": (380.0, 130.0, 0.9), "muscle": (1400.0, 45.0, 0.7), "bone": (1000.0, 1.0, 0.05)}


@dataclass(frozen=True)
class Domain:
    name: str
    contrast: str                     # "t2" (what the models learn); "t1", "flair": foreign (verdict tests)
    te: tuple                         # echo time range, ms
    tr: tuple                         # repetition time range, ms
    ti: tuple = (0.0, 0.0)            # inversion time (FLAIR)
    inplane: tuple = (0.8, 1.2)       # in-plane voxel size range, mm
    thickness: tuple = (1.0, 5.0)     # slice thickness range, mm
    noise: tuple = (0.008, 0.035)     # Rician sigma relative to the CSF signal
    bias: tuple = (0.04, 0.15)        # bias-field log-amplitude
    blur: tuple = (0.0, 0.0)          # extra in-plane point-spread sigma, in voxels (EPI)
    distortion: tuple = (0.0, 0.0)    # geometric distortion along the phase-encode (AP) axis, mm
    training: bool = True             # may reach a training or calibration cohort
    description: str = ""


DOMAINS = {d.name: d for d in (
    Domain("tse", "t2", (70, 130), (2500, 9000), description="2D turbo spin echo, several TE/TR, 1-5 mm slices"),
    Domain("tse-lowres", "t2", (80, 120), (3000, 8000), inplane=(1.5, 3.0), thickness=(3.0, 6.0),
           noise=(0.015, 0.05), description="low-resolution clinical TSE: 1.5-3 mm pixels, 3-6 mm slices"),
    Domain("tse-3d", "t2", (90, 140), (2500, 3500), inplane=(0.8, 1.3), thickness=(0.8, 1.3),
           noise=(0.006, 0.025), description="3D TSE (SPACE/CUBE-like), near-isotropic 0.8-1.3 mm"),
    Domain("epi", "t2", (60, 100), (6000, 10000), inplane=(1.8, 3.0), thickness=(2.5, 5.0),
           noise=(0.03, 0.07), bias=(0.1, 0.25), blur=(0.5, 1.0), distortion=(2.0, 6.0), training=False,
           description="HELD OUT: T2-weighted EPI / b0-like, blurred, distorted along AP, low SNR"),
    Domain("t1", "t1", (8, 15), (400, 700), training=False, description="FOREIGN: T1-weighted spin echo"),
    Domain("flair", "flair", (80, 120), (8000, 10000), ti=(2300, 2700), training=False,
           description="FOREIGN: T2-FLAIR (CSF nulled)"),
)}
TRAINING_DOMAINS = tuple(n for n, d in DOMAINS.items() if d.training)
HELD_OUT_DOMAINS = tuple(n for n, d in DOMAINS.items() if not d.training and d.contrast == "t2")
FOREIGN_DOMAINS = tuple(n for n, d in DOMAINS.items() if d.contrast != "t2")

LESION_FAMILIES = {
    "glioma": "large tumour: necrotic core, enhancing-like rim, T2-hyperintense oedema, mass effect",
    "ms": "3-10 small lesions (radius 3-8 mm), periventricular and deep white matter, about grey-matter intensity",
    "low-contrast": "1-3 lesions (radius 6-15 mm), +20-40% of the white-matter intensity, soft edge",
    "hypointense": "1-2 lesions (radius 5-12 mm), 30-60% of the white-matter intensity",
    "mass-iso": "a mass (radius 10-20 mm) iso-intense to grey matter, with strong mass effect",
}
EFFECTS = ("deformation", "atrophy", "pose", "partial", "oblique", "bias", "noise", "blur", "distortion", "texture")
# seeds of the splits never overlap: a benchmark subject's anatomy and deformation never occur in training.
# validation: lesion cases of the training domains, on which option defaults are chosen (never the benchmark)
SPLIT_SEEDS = {"train": 0, "calibration": 300_000, "validation": 600_000, "benchmark": 1_000_000}
LESION_SPLITS = ("validation", "benchmark")  # BraTS layout, lesion families allowed


def signal(tissue: str, d: Domain, te: float, tr: float, ti: float) -> float:
    """Spin-echo (or inversion-recovery for FLAIR) signal of a tissue at the given timings."""
    t1, t2, pd = TISSUE[tissue]
    if d.contrast == "flair":
        return pd * abs(1 - 2 * np.exp(-ti / t1) + np.exp(-tr / t1)) * np.exp(-te / t2)
    return pd * (1 - np.exp(-tr / t1)) * np.exp(-te / t2)


@functools.lru_cache(maxsize=2)
def _atlas_distances(step: int = 1):
    """Template-space distances (mm) to the ventricles and to the outer CSF / sulci."""
    gm, wm, brain, depth, _ = _anatomy(step)
    csf = (brain - gm - wm > 0.5) & (brain > 0.5)
    vent = csf & (depth > 15)
    outer = (csf & (depth <= 15)) | (brain < 0.5)
    kw = {"sampling": step} if step != 1 else {}
    return (ndimage.distance_transform_edt(~vent, **kw).astype(np.float32),
            ndimage.distance_transform_edt(~outer, **kw).astype(np.float32))


def _rot(rng, max_deg):
    a = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    cx, sx, cy, sy, cz, sz = np.cos(a[0]), np.sin(a[0]), np.cos(a[1]), np.sin(a[1]), np.cos(a[2]), np.sin(a[2])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return (rz @ ry @ rx).astype(np.float32)


def _ball(grid, c, r, rng, shape, irregular=0.15, axes=None):
    """Signed 'inside-ness' (r - distance) of an irregular ellipsoid, in mm."""
    d = grid - np.asarray(c, np.float32)[:, None, None, None]
    if axes is not None:
        d = d / np.asarray(axes, np.float32)[:, None, None, None]
    dist = np.sqrt((d ** 2).sum(0)) + 1e-3
    if irregular:
        dist = dist * (1 + _smooth_noise(rng, shape, (8, 9, 8), irregular))
    return r - dist, dist


def _pick(rng, cand, n=1):
    idx = np.argwhere(cand)
    if len(idx) == 0:
        raise RuntimeError("no place for a lesion in this subject")
    return idx[rng.integers(len(idx), size=n)].astype(np.float32)


def make_varied(seed: int, domain: str = "tse", lesion=False, head: bool = False, off=(), age=None,
                step: int = 1) -> Subject:
    """A subject of the varied generator. lesion: False, True ('glioma') or a LESION_FAMILIES name;
    off: effects (EFFECTS) to switch off; age: years (default random 20-90); step: anatomy sampled every
    `step` mm before acquisition (2 is 8x faster and coarser: for tests)."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain '{domain}'; choose from {', '.join(DOMAINS)}")
    family = "glioma" if lesion is True else (lesion or None)
    if family is not None and family not in LESION_FAMILIES:
        raise ValueError(f"unknown lesion family '{family}'; choose from {', '.join(LESION_FAMILIES)}")
    bad = set(off) - set(EFFECTS)
    if bad:
        raise ValueError(f"unknown effect(s) {sorted(bad)}; choose from {', '.join(EFFECTS)}")
    dom = DOMAINS[domain]
    if family and dom.contrast != "t2":
        raise ValueError(f"lesions are generated for T2 domains only, not '{domain}'")
    on = lambda e: e not in off  # noqa: E731
    rng = np.random.default_rng([seed, 7])
    gm, wm, brain, depth, affine = _anatomy(step)
    gm, wm = gm.copy(), wm.copy()
    shape0 = gm.shape
    age = float(rng.uniform(20, 90)) if age is None else float(age)
    # ageing in template space: tissue next to the ventricles / outer CSF becomes CSF
    if on("atrophy"):
        d_vent, d_outer = _atlas_distances(step)
        enl = np.clip((age - 25) / 60, 0, 1) * rng.uniform(1.0, 6.0)            # ventricle enlargement, mm
        atr = np.clip((age - 35) / 55, 0, 1) * rng.uniform(0.5, 2.5)            # cortical atrophy, mm
        atr_f = atr * (1 + _smooth_noise(rng, shape0, (6, 7, 6), 0.35))
        w = np.maximum(np.clip(enl - d_vent + 0.5, 0, 1) * (depth > 8),
                       np.clip(atr_f - d_outer + 0.5, 0, 1) * (depth < 25))
        gm *= 1 - w
        wm *= 1 - w
    pad = (24 // step) if head else 0                      # voxels of air around the head
    shape = tuple(s + 2 * pad for s in shape0)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    centre = (np.array(shape, np.float32) - 1) / 2
    if step != 1:  # below, grid, centre, src and lesion geometry are in mm
        grid *= step
        centre *= step
    scale = rng.uniform(0.92, 1.08, 3) * rng.uniform(0.88, 1.1)                  # head size and shape
    rot = _rot(rng, 15) if on("pose") else np.eye(3, dtype=np.float32)
    a = (rot @ np.diag(1 / scale)).astype(np.float32)
    src = np.einsum("ij,j...->i...", a, grid - centre[:, None, None, None]) + centre[:, None, None, None] - pad * step
    if on("deformation"):
        amp = rng.uniform(2.0, 7.0)
        src += np.stack([_smooth_noise(rng, shape, (5, 6, 5), amp) + _smooth_noise(rng, shape, (9, 10, 9), amp / 3)
                         for _ in range(3)]).astype(np.float32)
    if on("distortion") and dom.distortion[1] > 0:  # EPI: displacement along AP, strongest at the frontal base
        amp = rng.uniform(*dom.distortion)
        y = grid[1] / shape[1]
        z = grid[2] / shape[2]
        field = amp * np.exp(-((y - 0.8) ** 2) / 0.02 - ((z - 0.3) ** 2) / 0.03) \
            + _smooth_noise(rng, shape, (4, 4, 4), amp / 4)
        src[1] += field.astype(np.float32)
        jac = 1 + np.gradient(field, axis=1) / step
    else:
        jac = None
    warp = lambda v: ndimage.map_coordinates(v, src if step == 1 else src / step, order=1, mode="constant", cval=0.0)  # noqa: E731
    seg = None
    w_les = None
    if family in ("glioma", "mass-iso"):
        # centre deep in tissue (output space), then push the anatomy away from it (mass effect)
        depth_w, tis_w = warp(depth), warp(gm) + warp(wm)
        c = _pick(rng, (depth_w > 16) & (tis_w > 0.6))[0]
        r_t = rng.uniform(8, min(20, depth_w[tuple(c.astype(int))] - 2)) if family == "glioma" else rng.uniform(10, 18)
        c = c * step
        d = grid - c[:, None, None, None]
        r = np.sqrt((d ** 2).sum(0)) + 1e-3
        m, s = (0.6 if family == "glioma" else 0.8) * r_t, 1.5 * r_t
        r_src = np.maximum(r - m * np.exp(-r ** 2 / (2 * s ** 2)), 0)
        src = (c[:, None, None, None] + (src - c[:, None, None, None]) * (r_src / r)).astype(np.float32)
    gm_w, wm_w, brain_w = warp(gm), warp(wm), warp(brain)
    csf_w = np.clip(brain_w - gm_w - wm_w, 0, 1)
    te, tr, ti = rng.uniform(*dom.te), rng.uniform(*dom.tr), rng.uniform(*dom.ti) if dom.ti[1] else 0.0
    sig = {t: signal(t, dom, te, tr, ti) for t in TISSUE}
    norm = max(sig["csf"], sig["gm"], sig["wm"])
    i_csf, i_gm, i_wm = (sig[t] / norm * rng.normal(1, 0.04) for t in ("csf", "gm", "wm"))
    img = csf_w * i_csf + gm_w * i_gm + wm_w * i_wm
    if on("texture"):
        img *= 1 + _smooth_noise(rng, shape, (24, 28, 24), 0.03)
    mask = brain_w > 0.5
    tissue = np.clip(gm_w + wm_w, 0, 1)
    if family == "glioma":
        irr, _ = _ball(grid, c, r_t, rng, shape, 0.18)
        oed, _ = _ball(grid, c, r_t * rng.uniform(1.4, 2.1), rng, shape, 0.3)
        tumour = (irr > 0) & mask
        core = (irr > 0.5 * r_t) & mask if r_t > 9 else np.zeros_like(mask)
        w_oed = np.clip(oed / 4, 0, 1) * mask * ~tumour * (tissue > 0.3) * (wm_w + 0.6 * gm_w)
        img = img * (1 - w_oed) + (i_wm + rng.uniform(0.6, 0.9) * (i_csf - i_wm)) * w_oed
        rim = i_wm + rng.uniform(0.4, 0.7) * (i_csf - i_wm)
        img = np.where(tumour, rim * (1 + _smooth_noise(rng, shape, (16, 18, 16), 0.06)), img)
        img = np.where(core, i_csf * rng.uniform(1.0, 1.25), img)
        seg = np.zeros(shape, np.uint8)
        seg[(w_oed > 0.05)] = 2
        seg[tumour] = 4
        seg[core] = 1
    elif family == "mass-iso":
        irr, _ = _ball(grid, c, r_t, rng, shape, 0.15)
        w_les = np.clip(irr / 1.5 + 0.5, 0, 1) * mask
        target = i_gm * rng.uniform(0.92, 1.08) * (1 + _smooth_noise(rng, shape, (16, 18, 16), 0.04))
    elif family is not None:
        w_les = np.zeros(shape, np.float32)
        target = np.zeros(shape, np.float32)
        if family == "ms":
            d_vent_w = warp(_atlas_distances(step)[0])
            cand = (wm_w > 0.6) & mask & ((d_vent_w < 10) | (warp(depth) > 15))
            n, rr, edge = int(rng.integers(3, 11)), (3.0, 8.0), 1.0
        elif family == "low-contrast":
            cand = (wm_w > 0.6) & mask
            n, rr, edge = int(rng.integers(1, 4)), (6.0, 15.0), 2.0
        else:  # hypointense
            cand = (tissue > 0.7) & mask
            n, rr, edge = int(rng.integers(1, 3)), (5.0, 12.0), 1.5
        for c in _pick(rng, cand, n) * step:
            rad = rng.uniform(*rr)
            axes = rng.uniform(0.7, 1.3, 3) if family == "ms" else None
            inside, _ = _ball(grid, c, rad, rng, shape, 0.12 if family == "ms" else 0.2, axes)
            w = np.clip(inside / edge + 0.5, 0, 1)
            if family == "ms":
                level = i_wm + rng.uniform(0.7, 1.2) * (i_gm - i_wm)
            elif family == "low-contrast":
                level = i_wm * (1 + rng.uniform(0.2, 0.4))
            else:
                level = i_wm * rng.uniform(0.3, 0.6)
            target = np.where(w > w_les, level, target)
            w_les = np.maximum(w_les, w)
        w_les *= mask * (tissue > 0.2)
    if w_les is not None:
        img = img * (1 - w_les) + target * w_les
        seg = (w_les > 0.5).astype(np.uint8)
    if head:  # extra-cerebral CSF, skull, scalp (fat/muscle); air beyond
        out = ndimage.distance_transform_edt(~mask, **({"sampling": step} if step != 1 else {})).astype(np.float32)
        vary = lambda lo, hi: rng.uniform(lo, hi) * (1 + _smooth_noise(rng, shape, (5, 5, 5), 0.25))  # noqa: E731
        t_csf, t_bone, t_scalp = vary(1.0, 3.0), vary(4.0, 8.0), vary(4.0, 9.0)
        csf_l = (out > 0) & (out <= t_csf)
        bone = (out > t_csf) & (out <= t_csf + t_bone)
        scalp = (out > t_csf + t_bone) & (out <= t_csf + t_bone + t_scalp)
        img = np.where(csf_l, sig["csf"] / norm, img)
        img = np.where(bone, sig["bone"] / norm + 0.3 * sig["fat"] / norm * (out - t_csf > t_bone / 3)
                       * (out - t_csf < 2 * t_bone / 3), img)
        mix = rng.uniform(0.3, 0.8)
        img = np.where(scalp, (mix * sig["fat"] + (1 - mix) * sig["muscle"]) / norm, img)
    if jac is not None:
        img = img * np.clip(jac, 0.3, 3)
    if on("bias"):
        img *= np.exp(_smooth_noise(rng, shape, (3, 3, 3), rng.uniform(*dom.bias)))
    aff = affine.copy()
    aff[:3, 3] -= aff[:3, :3] @ np.full(3, pad)
    return _acquire(img.astype(np.float32), mask, seg, aff, rng, dom, on, head, i_csf)


def _acquire(img, mask, seg, affine, rng, dom: Domain, on, head: bool, i_csf: float) -> Subject:
    """Sample onto the domain's acquisition grid (voxel size, slice thickness, in-plane blur, tilt,
    partial coverage), then Rician noise on that grid and a scanner-like intensity scale."""
    src = _as_image(img, affine)
    ip = rng.uniform(*dom.inplane)
    th = rng.uniform(*dom.thickness)
    spacing = (ip, ip, th)
    d = np.array(src.GetDirection()).reshape(3, 3)
    if on("oblique") and rng.random() < 0.5:
        d = d @ _rot(rng, 10).astype(float)
    extent = np.array(src.GetSize()) * np.array(src.GetSpacing())
    size = [int(np.ceil(e / s)) + 4 for e, s in zip(extent, spacing)]
    centre = np.array(src.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in src.GetSize()]))
    if on("partial") and rng.random() < 0.3:  # the top or the bottom of the brain outside the slab
        cut = rng.uniform(5, 35)
        size[2] = max(int(size[2] - cut / th), 8)
        centre = centre + d[:, 2] * (cut / 2) * (1 if rng.random() < 0.5 else -1)
    ref = sitk.Image(*size, sitk.sitkFloat32)
    ref.SetSpacing(spacing)
    ref.SetDirection(tuple(d.ravel()))
    ref.SetOrigin(tuple(centre - d @ ((np.array(size) - 1) / 2 * np.array(spacing))))
    blur = rng.uniform(*dom.blur) * ip if on("blur") else 0.0
    var = [max(s ** 2 - 1, 0) / 4 + (blur ** 2 if i < 2 else 0) for i, s in enumerate(spacing)]
    out = sitk.Resample(sitk.DiscreteGaussian(src, var) if any(var) else src, ref, sitk.Transform(),
                        sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(out)
    if on("noise"):
        sigma = rng.uniform(*dom.noise) * i_csf
        arr = np.sqrt((arr + rng.normal(0, sigma, arr.shape)) ** 2 + rng.normal(0, sigma, arr.shape) ** 2)
    nn = lambda a: sitk.Cast(sitk.Resample(_as_image(a.astype(np.uint8), affine), ref, sitk.Transform(),  # noqa: E731
                                           sitk.sitkNearestNeighbor, 0), sitk.sitkUInt8)
    m_out = nn(mask)
    if not head:  # skull-stripped: zero outside the brain mask
        arr = arr * sitk.GetArrayViewFromImage(m_out)
    arr = (np.clip(arr, 0, None) * rng.uniform(300, 1500)).astype(np.float32)
    t2 = sitk.GetImageFromArray(arr)
    t2.CopyInformation(ref)
    return Subject(t2, m_out, nn(seg) if seg is not None else None)


# --------------------------------------------------------------------------- cohorts of the varied generator
def check_training_domains(domains) -> None:
    """Refuse held-out and foreign domains for training/calibration cohorts."""
    bad = [d for d in domains if d not in DOMAINS or not DOMAINS[d].training]
    if bad:
        raise ValueError(f"domain(s) {bad} are held out of training by design (held out: "
                         f"{', '.join(HELD_OUT_DOMAINS + FOREIGN_DOMAINS)}); training may use "
                         f"{', '.join(TRAINING_DOMAINS)}")


def cohort_plan(split: str, n: int, domains, families=(None,), head: bool = False, seed_offset: int = 0) -> list[dict]:
    """The cases of a cohort: n per (domain, family), each with its own seed from the split's range, starting
    seed_offset into it (a second, independent draw of a split: e.g. a fresh validation set after the first one was
    used to search; keep the offsets of two draws further apart than their sizes)."""
    if not 0 <= seed_offset < 300_000:
        raise ValueError(f"seed_offset {seed_offset}: must be within the split's seed range (0 to 299999)")
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split '{split}'; choose from {', '.join(SPLIT_SEEDS)}")
    if split != "benchmark":
        check_training_domains(domains)
        if split != "validation" and any(f for f in families):
            raise ValueError("training and calibration cohorts are healthy: no lesion families")
    plan, k = [], 0
    for dom in domains:
        for fam in families:
            for j in range(n):
                plan.append({"case": f"{split[:3]}-{dom}-{fam or 'healthy'}-{j:03d}", "split": split, "domain": dom,
                             "family": fam, "seed": SPLIT_SEEDS[split] + seed_offset + k, "head": head})
                k += 1
    return plan


def write_case(out_dir, c: dict) -> Path:
    """One case of a plan. Training/calibration (healthy): HCP layout <case>/T1w/T2w_acpc_dc_restore_brain.nii.gz
    + brainmask_fs.nii.gz. Benchmark: BraTS layout <case>/<case>_t2.nii.gz, _seg (empty for healthy), _brainmask."""
    sub = make_varied(c["seed"], c["domain"], c["family"] or False, head=c.get("head", False))
    out = Path(out_dir)
    if c["split"] in LESION_SPLITS:
        d = out / c["case"]
        d.mkdir(parents=True, exist_ok=True)
        seg = sub.seg if sub.seg is not None else sitk.Cast(sub.mask * 0, sitk.sitkUInt8)
        sitk.WriteImage(seg, str(d / f"{c['case']}_seg.nii.gz"))
        sitk.WriteImage(sub.mask, str(d / f"{c['case']}_brainmask.nii.gz"))
        p = d / f"{c['case']}_t2.nii.gz"
    else:
        d = out / c["case"] / "T1w"
        d.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(sub.mask, str(d / "brainmask_fs.nii.gz"))
        p = d / "T2w_acpc_dc_restore_brain.nii.gz"
    sitk.WriteImage(sub.t2, str(p))
    return p


MANIFEST = "cohort.json"


def write_manifest(out_dir, plan: list[dict]) -> Path:
    import json
    p = Path(out_dir) / MANIFEST
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"generator": "vaeanomaly.synth.make_varied", "cases": plan}, indent=1), encoding="utf-8")
    return p


def read_manifest(folder) -> Optional[dict]:
    """{case name: plan entry} of a generated cohort, or None for a folder that has no manifest."""
    import json
    p = Path(folder) / MANIFEST
    if not p.exists():
        return None
    return {c["case"]: c for c in json.loads(p.read_text(encoding="utf-8"))["cases"]}
