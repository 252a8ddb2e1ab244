"""Volumes in, heatmaps out: reading, validation, preprocessing onto the model grid and back.

The model grid: axial slices (after reorienting to LPS), each resampled to image_size x image_size
pixels over a fixed physical field of view (default 240 mm, BraTS's) centred on the brain, one
grid slice per input slice. Intensities are z-scored inside the brain mask, zero outside.
Maps computed on that grid are resampled back onto the exact input grid and zeroed outside the mask.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import SimpleITK as sitk

from .preprocessing import Preprocessing


class VolumeError(ValueError):
    """An input volume or mask that cannot be used, with a message that says what to do."""


# --------------------------------------------------------------------------- reading & checks
def available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def memory_needed(size, n_maps: int = 8) -> int:
    """Bytes to score a volume of this size: float32 copies (input, z-scored, smoothed, mask,
    resampling) and the maps on the input grid."""
    return int(np.prod([int(s) for s in size])) * 4 * (6 + n_maps)


def check_memory(size, n_maps: int = 8, what: str = "input") -> None:
    """Refuse volumes whose processing would need more memory than is available."""
    voxels = int(np.prod([int(s) for s in size]))
    need = memory_needed(size, n_maps)
    avail = available_memory()
    if need > 0.8 * avail:
        raise VolumeError(f"{what} has {voxels:,} voxels ({'x'.join(map(str, size))}); processing needs "
                          f"about {need / 2**30:.1f} GiB but {avail / 2**30:.1f} GiB are available. Crop the "
                          f"volume to the head or resample it to ~1 mm spacing first.")


def _check_header(dim: int, size, components: int, what: str) -> None:
    if dim != 3:
        hint = ("a single 2D image" if dim == 2 else
                "a time series or multi-volume file: extract one 3D volume first" if dim == 4 else f"{dim}D")
        raise VolumeError(f"{what} is {dim}-dimensional ({hint}); a 3D MRI volume is required")
    if components != 1:
        raise VolumeError(f"{what} has {components} components per voxel (colour or vector image); "
                          f"a scalar (grey-level) MRI volume is required")
    if sum(int(s) > 1 for s in size) < 3:
        raise VolumeError(f"{what} has size {tuple(int(s) for s in size)}: a single 2D slice, not a 3D volume; "
                          f"load the whole series")
    check_memory(size, what=what)


def read_image(path, what: str = "input") -> sitk.Image:
    """Read any 3D scalar volume SimpleITK reads (NIfTI, NRRD, MHA, ...) or a DICOM series folder."""
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{what} '{path}' does not exist")
    try:
        if path.is_dir():
            ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
            if not ids:
                raise VolumeError(f"{what} folder '{path}' contains no DICOM series")
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), ids[0])
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            img = reader.Execute()
        else:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            _check_header(reader.GetDimension(), reader.GetSize(), reader.GetNumberOfComponents(), f"{what} '{path}'")
            img = reader.Execute()
    except RuntimeError as err:
        raise VolumeError(f"cannot read {what} '{path}': {str(err).strip().splitlines()[-1]}") from None
    return img


def check_image(img: sitk.Image, what: str = "input") -> np.ndarray:
    """Validate a 3D scalar volume; return its voxels as float32 (z, y, x)."""
    _check_header(img.GetDimension(), img.GetSize(), img.GetNumberOfComponentsPerPixel(), what)
    arr = sitk.GetArrayFromImage(img).astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        n = int((~np.isfinite(arr)).sum())
        raise VolumeError(f"{what} contains {n} NaN or infinite voxels; fix or mask them before scoring")
    if arr.max() == arr.min():
        raise VolumeError(f"{what} is constant (every voxel {arr.flat[0]:g}): an empty or blank volume")
    return arr


def auto_mask(img: sitk.Image) -> sitk.Image:
    """Foreground mask for SKULL-STRIPPED input (fallback when no brain mask is given):
    voxels above 2% of the robust intensity range, closed, holes filled, largest component."""
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    lo, hi = float(arr.min()), float(np.percentile(arr, 99.5))
    fg = sitk.GetImageFromArray((arr > lo + 0.02 * (hi - lo)).astype(np.uint8))
    fg.CopyInformation(img)
    fg = sitk.BinaryMorphologicalClosing(fg, [2, 2, 2])
    fg = sitk.BinaryFillhole(fg)
    cc = sitk.RelabelComponent(sitk.ConnectedComponent(fg), sortByObjectSize=True)
    return sitk.Cast(cc == 1, sitk.sitkUInt8)


def mask_for(img: sitk.Image, mask: Optional[sitk.Image]) -> sitk.Image:
    """Check a given mask against the image grid (or make the automatic one)."""
    if mask is None:
        m = auto_mask(img)
    else:
        if mask.GetSize() != img.GetSize():
            raise VolumeError(f"mask size {mask.GetSize()} differs from the volume's {img.GetSize()}; "
                              f"resample the mask onto the volume first")
        if not (np.allclose(mask.GetSpacing(), img.GetSpacing(), atol=1e-3) and
                np.allclose(mask.GetOrigin(), img.GetOrigin(), atol=1e-2) and
                np.allclose(mask.GetDirection(), img.GetDirection(), atol=1e-4)):
            raise VolumeError("mask geometry (spacing/origin/direction) differs from the volume's; "
                              "resample the mask onto the volume first")
        m = sitk.Cast(sitk.GetImageFromArray((sitk.GetArrayViewFromImage(mask) > 0).astype(np.uint8)), sitk.sitkUInt8)
        m.CopyInformation(img)
    if not sitk.GetArrayViewFromImage(m).any():
        raise VolumeError("the brain mask is empty: give a mask that covers the brain, or none to use "
                          "the automatic foreground mask")
    return m


# --------------------------------------------------------------------------- the model grid
@dataclass
class Prepared:
    slices: np.ndarray      # (nz, S, S) float32, z-scored, 0 outside the mask
    brain: np.ndarray       # (nz, S, S) bool, brain mask on the model grid
    grid: sitk.Image        # reference image of the model grid (S, S, nz)
    image: sitk.Image       # the input, untouched
    mask: sitk.Image        # brain mask on the input grid


def model_grid(img: sitk.Image, mask: sitk.Image, prep: Preprocessing) -> sitk.Image:
    """Axial grid over prep.fov_mm centred on the brain; one slice per input slice."""
    oriented = sitk.DICOMOrient(img, "LPS")
    d = np.array(oriented.GetDirection()).reshape(3, 3)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    bb = stats.GetBoundingBox(1)
    centre_idx = [bb[i] + (bb[i + 3] - 1) / 2 for i in range(3)]
    c = np.array(mask.TransformContinuousIndexToPhysicalPoint(centre_idx))
    s = prep.fov_mm / prep.image_size
    half = (prep.image_size - 1) / 2 * s
    o_img = np.array(oriented.GetOrigin())
    origin = c - d[:, 0] * half - d[:, 1] * half + d[:, 2] * np.dot(o_img - c, d[:, 2])
    grid = sitk.Image(prep.image_size, prep.image_size, oriented.GetSize()[2], sitk.sitkUInt8)
    grid.SetDirection(tuple(d.ravel()))
    grid.SetSpacing((s, s, oriented.GetSpacing()[2]))
    grid.SetOrigin(tuple(origin))
    return grid


def _to_grid(img: sitk.Image, grid: sitk.Image, interp=sitk.sitkLinear) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.Resample(img, grid, sitk.Transform(), interp, 0.0, sitk.sitkFloat32))


def prepare(img: sitk.Image, mask: Optional[sitk.Image] = None,
            prep: Optional[Preprocessing] = None, what: str = "input") -> Prepared:
    prep = prep or Preprocessing()
    arr = check_image(img, what)
    m = mask_for(img, mask)
    marr = sitk.GetArrayViewFromImage(m).astype(bool)
    vals = arr[marr]
    mean, std = float(vals.mean()), float(vals.std())
    if std == 0:
        raise VolumeError(f"{what} is constant inside the brain mask; nothing to score")
    z = np.where(marr, (arr - mean) / std, 0).astype(np.float32)
    zimg = sitk.GetImageFromArray(z)
    zimg.CopyInformation(img)
    grid = model_grid(img, m, prep)
    if prep.antialias:
        target = prep.fov_mm / prep.image_size
        # smooth in-plane (grid axes 0, 1) before downsampling; grid axes map onto input axes by the orientation
        oriented = sitk.DICOMOrient(zimg, "LPS")
        sp = oriented.GetSpacing()
        var = [max(target ** 2 - sp[i] ** 2, 0) / 4 if i < 2 else 0.0 for i in range(3)]
        zimg = sitk.DiscreteGaussian(oriented, var, 32, 0.01, True)
    slices = _to_grid(zimg, grid)
    brain = _to_grid(sitk.Cast(m, sitk.sitkFloat32), grid) > 0.5
    slices = np.clip(np.where(brain, slices, 0), -prep.clip, prep.clip).astype(np.float32)
    return Prepared(slices, brain, grid, img, m)


def grid_image(maps: np.ndarray, grid: sitk.Image) -> sitk.Image:
    out = sitk.GetImageFromArray(np.ascontiguousarray(maps, dtype=np.float32))
    out.CopyInformation(grid)
    return out


def to_input_grid(maps: np.ndarray, p: Prepared) -> sitk.Image:
    """A (nz, S, S) map on the model grid -> float32 image on the exact input grid, 0 outside mask."""
    back = sitk.Resample(grid_image(maps, p.grid), p.image, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(back) * sitk.GetArrayViewFromImage(p.mask)
    out = sitk.GetImageFromArray(arr.astype(np.float32))
    out.CopyInformation(p.image)
    return out


def label_on_grid(seg: sitk.Image, grid: sitk.Image) -> np.ndarray:
    """Ground-truth lesion (label > 0) on the model grid, as bool."""
    binary = sitk.Cast(sitk.GetImageFromArray((sitk.GetArrayViewFromImage(seg) > 0).astype(np.float32)), sitk.sitkFloat32)
    binary.CopyInformation(seg)
    return _to_grid(binary, grid) > 0.5


# --------------------------------------------------------------------------- volume in, heatmaps out
def score_volume(checkpoint, img: sitk.Image, mask: Optional[sitk.Image] = None, predictors=("rec-grad",),
                 options=None, device="cpu", progress: Optional[Callable[[float], None]] = None,
                 cancel: Optional[Callable[[], bool]] = None) -> dict[str, sitk.Image]:
    """Heatmaps on the exact input grid, one per requested predictor (and 'reconstruction')."""
    from .predictors import compute_maps
    p = prepare(img, mask, Preprocessing.from_dict(checkpoint.preprocessing))
    maps = compute_maps(checkpoint.model, p.slices, predictors, checkpoint.beta, options, device,
                        ensemble=checkpoint.ensemble if "ensemble" in predictors else None,
                        progress=progress, cancel=cancel)
    out = {}
    for name, m in maps.items():  # 'reconstruction' stays in z-score units
        out[name] = to_input_grid(np.where(p.brain, m, 0), p)
    return out
