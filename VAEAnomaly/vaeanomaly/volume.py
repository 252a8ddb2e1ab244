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


NIFTI_DTYPE_BITS = {2: 8, 4: 16, 8: 32, 16: 32, 32: 64, 64: 64, 128: 24, 256: 8, 512: 16, 768: 32,
                    1024: 64, 1280: 64, 1536: 128, 1792: 128, 2048: 256, 2304: 32}


def _read_whole(path: Path, what: str) -> tuple[bytes, int]:
    """The first 1 kB of a file (decompressed) and its whole (decompressed) length. A gzip file is
    decompressed to the end, so truncation or corruption anywhere is found (CRC and length check)."""
    import gzip
    import zlib
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    if not gz:
        with open(path, "rb") as f:
            return f.read(1024), path.stat().st_size
    head, n = b"", 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                if len(head) < 1024:
                    head += chunk[:1024 - len(head)]
                n += len(chunk)
    except EOFError:
        raise VolumeError(f"{what} '{path}' is truncated: its compressed data stop before the end of the stream "
                          f"(an incomplete download or copy?). Copy the complete file again.") from None
    except (gzip.BadGzipFile, zlib.error, OSError) as err:
        raise VolumeError(f"{what} '{path}' is corrupt: its gzip compression is damaged ({err}). "
                          f"Copy the complete file again.") from None
    return head, n


def _check_nifti_size(path: Path, head: bytes, n_bytes: int, what: str) -> None:
    """The data a NIfTI-1/2 header declares (vox_offset + voxels x bytes) must be in the file."""
    import struct
    for order in "<>":
        if len(head) >= 4 and struct.unpack(order + "i", head[:4])[0] in (348, 540):
            break
    else:
        return  # not a NIfTI header we know: SimpleITK's own checks apply
    if struct.unpack(order + "i", head[:4])[0] == 348:
        dims = struct.unpack(order + "8h", head[40:56])
        datatype, bitpix = struct.unpack(order + "hh", head[70:74])
        offset = struct.unpack(order + "f", head[108:112])[0]
    else:
        if len(head) < 540:
            return
        datatype, bitpix = struct.unpack(order + "hh", head[12:16])
        dims = struct.unpack(order + "8q", head[16:80])
        offset = struct.unpack(order + "q", head[168:176])[0]
    nd = dims[0]
    if not 1 <= nd <= 7 or any(d < 1 for d in dims[1:nd + 1]):
        raise VolumeError(f"{what} '{path}' has an invalid NIfTI header (dimensions {dims[:nd + 1]})")
    voxels = int(np.prod([int(d) for d in dims[1:nd + 1]], dtype=np.int64))
    bits = bitpix if bitpix > 0 else NIFTI_DTYPE_BITS.get(datatype, 0)
    need = int(max(offset, 352 if dims[0] else 0)) + voxels * bits // 8
    if bits and n_bytes < need:
        raise VolumeError(f"{what} '{path}' is truncated or its header disagrees with its data: the header declares "
                          f"{'x'.join(str(d) for d in dims[1:nd + 1])} voxels of {bits // 8} bytes "
                          f"({need:,} bytes with the header) but the file holds {n_bytes:,} bytes. "
                          f"Copy the complete file again, or re-export it.")


def _read_dicom_series(path: Path, what: str) -> sitk.Image:
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
    if not ids:
        raise VolumeError(f"{what} folder '{path}' contains no DICOM series; give a volume file or a folder of "
                          f"DICOM files")
    if len(ids) > 1:
        raise VolumeError(f"{what} folder '{path}' contains {len(ids)} DICOM series; put the one to score in a "
                          f"folder of its own (series: {', '.join(ids[:5])}{', ...' if len(ids) > 5 else ''})")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), ids[0])
    if len(files) < 3:
        raise VolumeError(f"{what} folder '{path}' holds a DICOM series of {len(files)} slice(s); a 3D volume "
                          f"needs the whole series")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    warn = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's own 'non uniform sampling' warning: checked below
    try:
        img = reader.Execute()
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warn)
    try:
        pos = np.array([[float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")] for i in range(len(files))])
        o = [float(v) for v in reader.GetMetaData(0, "0020|0037").split("\\")]
    except (RuntimeError, ValueError):
        return img  # no position/orientation tags: SimpleITK's geometry is all there is
    normal = np.cross(o[:3], o[3:6])
    gaps = np.diff(pos @ normal)
    step = float(np.median(np.abs(gaps)))
    if step <= 1e-6 or (np.abs(gaps) < 1e-3).any():
        raise VolumeError(f"{what} '{path}': the DICOM series has slices at the same position (duplicates, or "
                          f"several acquisitions in one series); export one volume per series")
    if (np.sign(gaps) != np.sign(gaps[0])).any():
        raise VolumeError(f"{what} '{path}': the DICOM slices are not ordered along the slice direction")
    rel = np.abs(np.abs(gaps) - step) / step
    if rel.max() > 0.05:
        k = int(np.argmax(rel))
        ratio = abs(gaps[k]) / step
        if ratio > 1.5 and abs(ratio - round(ratio)) < 0.1:
            raise VolumeError(f"{what} '{path}': the DICOM series has missing slices (a gap of {abs(gaps[k]):.3g} mm "
                              f"after slice {k + 1} of {len(files)} where the spacing is {step:.3g} mm, so about "
                              f"{round(ratio) - 1} slice(s) missing). Copy the complete series again.")
        raise VolumeError(f"{what} '{path}': the DICOM series has uneven slice spacing ({abs(gaps).min():.3g} to "
                          f"{abs(gaps).max():.3g} mm); resample it to a regular grid (e.g. in 3D Slicer) first")
    return img


def read_image(path, what: str = "input") -> sitk.Image:
    """Read any 3D scalar volume SimpleITK reads (NIfTI, NRRD, MHA, ...) or a DICOM series folder.
    The whole file is checked: truncated or corrupt compressed data, a header that declares more data
    than the file holds, DICOM series with missing slices or uneven spacing each stop with a message."""
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{what} '{path}' does not exist")
    try:
        if path.is_dir():
            return _read_dicom_series(path, what)
        if path.stat().st_size == 0:
            raise VolumeError(f"{what} '{path}' is an empty file")
        head, n_bytes = _read_whole(path, what)
        if path.name.lower().endswith((".nii", ".nii.gz")):  # single-file NIfTI (a .hdr/.img pair: ITK checks)
            _check_nifti_size(path, head, n_bytes, what)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        _check_header(reader.GetDimension(), reader.GetSize(), reader.GetNumberOfComponents(), f"{what} '{path}'")
        img = reader.Execute()
    except RuntimeError as err:
        lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "not read completely" in ln or "expected" in ln or "got only" in ln), None)
        if detail:
            raise VolumeError(f"{what} '{path}' is truncated or its header disagrees with its data ({detail}). "
                              f"Copy the complete file again.") from None
        reason = next((ln for ln in reversed(lines) if "No such file" not in ln), lines[-1] if lines else "")
        raise VolumeError(f"cannot read {what} '{path}': {reason}. Is it a complete volume file "
                          f"(NIfTI, NRRD, MHA, ...)? A truncated or corrupt file also gives this error.") \
            from None
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
        from .brainmask import check_automatic_mask
        check_automatic_mask(img, m)  # a head that is not skull-stripped: refuse, saying how to get a mask
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
    from .calibration import inference_kwargs
    from .predictors import compute_maps
    p = prepare(img, mask, Preprocessing.from_dict(checkpoint.preprocessing))
    maps = compute_maps(checkpoint.model, p.slices, predictors, checkpoint.beta, options, device,
                        progress=progress, cancel=cancel, **inference_kwargs(checkpoint, predictors, options))
    out = {}
    for name, m in maps.items():  # 'reconstruction' stays in z-score units
        out[name] = to_input_grid(np.where(p.brain, m, 0), p)
    return out
