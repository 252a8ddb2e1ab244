"""Volumes in, heatmaps out: reading, validation, preprocessing onto the model grid and back.

The model grid: axial slices (after reorienting to LPS), each resampled to image_size x image_size
pixels over a fixed physical field of view (default 240 mm, BraTS's) centred on the brain, one
grid slice per input slice. Intensities are z-scored inside the brain mask, zero outside.
Maps computed on that grid are resampled back onto the exact input grid and zeroed outside the mask.
"""
from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import SimpleITK as sitk

from .arrays import _Orientation, _box, _lps_direction, _orientation, _percentile, background_level  # noqa: F401
from .errors import VolumeError  # noqa: F401  (importable from here, as always)
from .preprocessing import Preprocessing


# --------------------------------------------------------------------------- reading & checks
# Free memory, from each platform's own interface (Slicer ships for Linux, Windows and macOS). Each reader
# returns bytes or None and never raises; available_memory() asks the current platform's readers in turn.
# None means "unknown": the memory checks are then skipped, never failed.
MEMINFO = "/proc/meminfo"


def _never_raises(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> Optional[int]:
        try:
            value = fn(*args, **kwargs)
        except Exception:  # noqa: BLE001  (a missing API, a refused call, an odd value: unknown)
            return None
        return int(value) if value is not None and int(value) > 0 else None
    return wrapper


@_never_raises
def _linux_meminfo() -> Optional[int]:
    """Linux: /proc/meminfo MemAvailable (kernels before 3.14: MemFree + Buffers + Cached)."""
    fields = {}
    with open(MEMINFO, encoding="ascii", errors="replace") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                fields[key.strip()] = int(parts[0]) * 1024  # kB
    if "MemAvailable" in fields:
        return fields["MemAvailable"]
    if "MemFree" in fields:
        return fields["MemFree"] + fields.get("Buffers", 0) + fields.get("Cached", 0)
    return None


def _memorystatusex():
    """The MEMORYSTATUSEX structure of GlobalMemoryStatusEx (sysinfoapi.h): 64 bytes."""
    import ctypes

    class MEMORYSTATUSEX(ctypes.Structure):
        _fields_ = [("dwLength", ctypes.c_uint32), ("dwMemoryLoad", ctypes.c_uint32),
                    ("ullTotalPhys", ctypes.c_uint64), ("ullAvailPhys", ctypes.c_uint64),
                    ("ullTotalPageFile", ctypes.c_uint64), ("ullAvailPageFile", ctypes.c_uint64),
                    ("ullTotalVirtual", ctypes.c_uint64), ("ullAvailVirtual", ctypes.c_uint64),
                    ("ullAvailExtendedVirtual", ctypes.c_uint64)]
    return MEMORYSTATUSEX


@_never_raises
def _windows_global_memory() -> Optional[int]:
    """Windows: kernel32 GlobalMemoryStatusEx, ullAvailPhys (the physical memory available now)."""
    import ctypes
    stat = _memorystatusex()()
    stat.dwLength = ctypes.sizeof(stat)
    if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(stat)):  # AttributeError off Windows
        return None
    return stat.ullAvailPhys


@_never_raises
def _psutil_available() -> Optional[int]:
    """psutil's virtual_memory().available, where psutil is installed (it is not part of Slicer)."""
    import psutil
    return psutil.virtual_memory().available


HOST_VM_INFO64 = 4  # mach/host_info.h
VM_STATISTICS64_INTS = 38  # HOST_VM_INFO64_COUNT: sizeof(vm_statistics64_data_t) / sizeof(integer_t)


def _vm_statistics64():
    """The leading fields of vm_statistics64 (mach/vm_statistics.h): free, active, inactive, wired page counts,
    then 64-bit counters; padded to the full structure (152 bytes) and beyond, so the kernel never writes past it."""
    import ctypes

    class VMStatistics64(ctypes.Structure):
        _fields_ = [("free_count", ctypes.c_uint32), ("active_count", ctypes.c_uint32),
                    ("inactive_count", ctypes.c_uint32), ("wire_count", ctypes.c_uint32),
                    ("rest", ctypes.c_uint8 * 256)]
    return VMStatistics64


@functools.lru_cache(maxsize=1)
def _mach_host():
    """libSystem's host_statistics64 and this host's port (asked for once: each mach_host_self() call adds a
    port right)."""
    import ctypes
    import ctypes.util
    lib = ctypes.CDLL(ctypes.util.find_library("System") or "/usr/lib/libSystem.B.dylib")
    lib.mach_host_self.restype = ctypes.c_uint32
    lib.mach_host_self.argtypes = []
    lib.host_statistics64.restype = ctypes.c_int
    lib.host_statistics64.argtypes = [ctypes.c_uint32, ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]
    return lib, lib.mach_host_self()


@_never_raises
def _macos_host_statistics() -> Optional[int]:
    """macOS without psutil: host_statistics64(HOST_VM_INFO64), (free + inactive) pages, psutil's 'available'."""
    import ctypes
    import mmap
    lib, host = _mach_host()
    stats = _vm_statistics64()()
    count = ctypes.c_uint32(VM_STATISTICS64_INTS)
    if lib.host_statistics64(host, HOST_VM_INFO64, ctypes.byref(stats), ctypes.byref(count)) != 0:  # KERN_SUCCESS
        return None
    return (stats.free_count + stats.inactive_count) * mmap.PAGESIZE  # 16 kB pages on Apple silicon


@_never_raises
def _sysconf_available() -> Optional[int]:
    """POSIX sysconf, where this Python has it and knows both names (Windows has no os.sysconf; macOS has no
    SC_AVPHYS_PAGES). Linux's value is the free pages only, without the reclaimable cache: a last resort."""
    sysconf = getattr(os, "sysconf", None)
    names = getattr(os, "sysconf_names", {})
    if sysconf is None or "SC_PAGE_SIZE" not in names or "SC_AVPHYS_PAGES" not in names:
        return None
    return sysconf("SC_PAGE_SIZE") * sysconf("SC_AVPHYS_PAGES")


def _platform() -> str:
    if os.name == "nt" or sys.platform.startswith(("win", "cygwin", "msys")):
        return "windows"
    return "macos" if sys.platform == "darwin" else "posix"


def available_memory() -> Optional[int]:
    """Bytes of physical memory available to a new computation, or None when this platform does not say.
    Never raises."""
    readers = {"windows": (_windows_global_memory, _psutil_available),
               "macos": (_psutil_available, _macos_host_statistics, _sysconf_available),
               "posix": (_linux_meminfo, _psutil_available, _sysconf_available)}
    try:
        chain = readers[_platform()]
    except Exception:  # noqa: BLE001
        return None
    for reader in chain:
        value = reader()
        if value is not None:
            return value
    return None


def memory_needed(size, n_maps: int = 8) -> int:
    """Bytes to score a volume of this size: float32 copies (input, z-scored, smoothed, mask,
    resampling) and the maps on the input grid."""
    return int(np.prod([int(s) for s in size])) * 4 * (6 + n_maps)


def check_memory(size, n_maps: int = 8, what: str = "input") -> None:
    """Refuse volumes whose processing would need more memory than is available. Where the platform does
    not say how much is available (available_memory() is None), nothing is checked."""
    voxels = int(np.prod([int(s) for s in size]))
    need = memory_needed(size, n_maps)
    avail = available_memory()
    if avail is None:
        return
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
    raw = sitk.GetArrayFromImage(img)
    arr = np.asarray(raw, dtype=np.float32)  # (numpy's astype from int16 measured 20-50x slower than this here)
    if raw.dtype.kind not in "iub" and not np.isfinite(arr).all():  # (integer voxels are always finite)
        n = int((~np.isfinite(arr)).sum())
        raise VolumeError(f"{what} contains {n} NaN or infinite voxels; fix or mask them before scoring")
    if arr.max() == arr.min():
        raise VolumeError(f"{what} is constant (every voxel {arr.flat[0]:g}): an empty or blank volume")
    return arr


def auto_mask(img: sitk.Image, arr: Optional[np.ndarray] = None) -> sitk.Image:
    """Foreground mask for SKULL-STRIPPED input (fallback when no brain mask is given):
    voxels above 2% of the robust intensity range (from the background level, arrays.background_level, to the
    99.5th percentile), closed (radius-2 ball), holes filled, largest component
    (face connectivity) -- what ITK's BinaryThreshold, BinaryMorphologicalClosing, BinaryFillhole and
    ConnectedComponent + RelabelComponent give on the whole volume (Testing/Python/test_speed_paths.py).
    arr: the image's voxels as float32 (z, y, x) when the caller has them already (check_image)."""
    if arr is None:
        arr = np.asarray(sitk.GetArrayFromImage(img), dtype=np.float32)
    return _image_like(auto_mask_array(arr), img)


def _image_like(arr: np.ndarray, ref: sitk.Image) -> sitk.Image:
    m = sitk.GetImageFromArray(arr)
    m.CopyInformation(ref)
    return m


def mask_for(img: sitk.Image, mask: Optional[sitk.Image], arr: Optional[np.ndarray] = None) -> sitk.Image:
    """Check a given mask against the image grid (or make the automatic one; arr: see auto_mask)."""
    return _mask_and_box(img, mask, arr)[0]


def _mask_and_box(img: sitk.Image, mask: Optional[sitk.Image], arr: Optional[np.ndarray] = None,
                  values: bool = False):
    """mask_for, plus the mask as a bool array, its bounding box in array order [(start, stop)] * 3 and (values)
    the image's voxels inside it (float32, in array order), which the automatic mask's checks share."""
    if mask is None:
        if arr is None:
            arr = np.asarray(sitk.GetArrayFromImage(img), dtype=np.float32)
        marr, box = _auto_mask(arr)
        m = _image_like(marr.view(np.uint8), img)
        if box is None:
            raise VolumeError("the brain mask is empty: give a mask that covers the brain, or none to use "
                              "the automatic foreground mask")
        vals = arr[_slices(box)][marr[_slices(box)]]
        from .brainmask import check_automatic_mask
        # a head that is not skull-stripped: refuse, saying how to get a mask
        check_automatic_mask(img, m, values=vals, marr=marr, box=box)
        return (m, marr, box) + ((vals,) if values else ())
    else:
        if mask.GetSize() != img.GetSize():
            raise VolumeError(f"mask size {mask.GetSize()} differs from the volume's {img.GetSize()}; "
                              f"resample the mask onto the volume first")
        if not (np.allclose(mask.GetSpacing(), img.GetSpacing(), atol=1e-3) and
                np.allclose(mask.GetOrigin(), img.GetOrigin(), atol=1e-2) and
                np.allclose(mask.GetDirection(), img.GetDirection(), atol=1e-4)):
            raise VolumeError("mask geometry (spacing/origin/direction) differs from the volume's; "
                              "resample the mask onto the volume first")
        marr = sitk.GetArrayViewFromImage(mask) > 0
        m = _image_like(marr.view(np.uint8), img)
    if not marr.any():
        raise VolumeError("the brain mask is empty: give a mask that covers the brain, or none to use "
                          "the automatic foreground mask")
    box = _box(marr)
    if not values:
        return m, marr, box
    if arr is None:
        arr = np.asarray(sitk.GetArrayFromImage(img), dtype=np.float32)
    return m, marr, box, arr[_slices(box)][marr[_slices(box)]]


# --------------------------------------------------------------------------- the model grid
@dataclass
class Prepared:
    slices: np.ndarray      # (nz, S, S) float32, z-scored, 0 outside the mask
    brain: np.ndarray       # (nz, S, S) bool, brain mask on the model grid
    grid: sitk.Image        # reference image of the model grid (S, S, nz)
    image: sitk.Image       # the input, untouched
    mask: sitk.Image        # brain mask on the input grid
    box: Optional[list] = None  # the mask's bounding box in LPS array order [(start, stop)] * 3 (fast path)


def model_grid(img: sitk.Image, mask: sitk.Image, prep: Preprocessing, box: Optional[list] = None) -> sitk.Image:
    """Axial grid over prep.fov_mm centred on the brain (the bounding box of mask label 1; `box`, that box in
    array order, when the caller knows it); one slice per input slice. Its axes are those of
    sitk.DICOMOrient(img, "LPS") (found without touching the voxels, see _orientation)."""
    o = _orientation(img)
    if o is None:
        oriented = sitk.DICOMOrient(img, "LPS")
        d, o_img = np.array(oriented.GetDirection()).reshape(3, 3), np.array(oriented.GetOrigin())
        nz, sz = oriented.GetSize()[2], oriented.GetSpacing()[2]
    else:
        d, o_img, nz, sz = o.direction, o.origin, o.size[2], o.spacing[2]
    box = box or _box(sitk.GetArrayViewFromImage(mask) == 1)  # label 1's bounding box
    centre_idx = [lo + (hi - lo - 1) / 2 for lo, hi in box[::-1]]  # (x, y, z), as LabelShapeStatistics gives it
    c = np.array(mask.TransformContinuousIndexToPhysicalPoint(centre_idx))
    s = prep.fov_mm / prep.image_size
    half = (prep.image_size - 1) / 2 * s
    origin = c - d[:, 0] * half - d[:, 1] * half + d[:, 2] * np.dot(o_img - c, d[:, 2])
    grid = sitk.Image(prep.image_size, prep.image_size, nz, sitk.sitkUInt8)
    grid.SetDirection(tuple(d.ravel()))
    grid.SetSpacing((s, s, sz))
    grid.SetOrigin(tuple(origin))
    return grid


def _to_grid(img: sitk.Image, grid: sitk.Image, interp=sitk.sitkLinear) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.Resample(img, grid, sitk.Transform(), interp, 0.0, sitk.sitkFloat32))


# --------------------------------------------------------------------------- fast separable path
# The model grid's axes are the LPS-reoriented input's voxel axes (model_grid takes its direction), and grid
# slice k lies in the plane of reoriented slice k. So preprocessing needs no 3D resampling: the input array is
# viewed in LPS order by permuting/flipping axes (numpy views, no copy), and each slice goes onto the grid by
# two small matrix products, W_y @ slice @ W_x^T, where W = (linear interpolation at the grid points) x (the
# anti-aliasing Gaussian). The Gaussian matrices are ITK's own DiscreteGaussian operator (obtained by filtering
# an identity image, so kernel, truncation and border handling are ITK's), and the interpolation matrices follow
# ITK's LinearInterpolateImageFunction and ResampleImageFilter (inside when -0.5 <= index < n - 0.5, edge values
# repeated up to there, 0 beyond). The result equals the resampling path (`prepare_by_resampling`) up to float
# rounding; Testing/Python/test_speed_paths.py checks it on oriented, oblique, flipped, sagittal and anisotropic
# inputs. Directions that are not orthonormal (sheared headers) take the resampling path.
_SLAB = 16  # reoriented slices processed at a time (bounds the temporary memory to a few slices)


def _lps_view(arr: np.ndarray, o: _Orientation) -> np.ndarray:
    """A (z, y, x) array of the input, viewed as the LPS-reoriented volume's (z, y, x) array (no copy)."""
    a = arr.transpose(2, 1, 0)                     # (x, y, z) index order of the input
    a = a.transpose(o.perm)                        # reoriented axes
    a = a[tuple(slice(None, None, -1) if f else slice(None) for f in o.flip)]
    return a.transpose(2, 1, 0)


def _interp_matrix(first: float, step: float, n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) weights of ITK's linear interpolation at continuous indices first + step * i."""
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        c = first + step * i
        if not (-0.5 <= c < n_in - 0.5):
            continue                                # outside the buffer: the default value 0
        b = max(int(np.floor(c)), 0)
        t = c - b
        if t <= 0 or b + 1 > n_in - 1:
            w[i, b] = 1.0
        else:
            w[i, b], w[i, b + 1] = 1.0 - t, t
    return w


@functools.lru_cache(maxsize=16)
def _itk_gaussian_matrix(n: int, spacing: float, variance_mm2: float) -> np.ndarray:
    """(n, n) matrix of ITK's DiscreteGaussian along one axis (max kernel width 32, max error 0.01, image
    spacing used), found by filtering an identity image: kernel, truncation and border as ITK has them.
    Cached (a cohort's volumes share their geometry); read-only, so the cache cannot be altered."""
    if variance_mm2 <= 0:
        out = np.eye(n)
    else:
        eye = sitk.GetImageFromArray(np.eye(n))
        eye.SetSpacing((spacing, 1.0))
        out = sitk.GetArrayFromImage(sitk.DiscreteGaussian(eye, [variance_mm2, 0.0], 32, 0.01, True)).T.copy()
        # out[r, c] = sum_t G[c, t] * I[r, t] = G[c, r]
    out.flags.writeable = False
    return out


def _grid_matrices(o: _Orientation, grid: sitk.Image, prep: Preprocessing, antialias: bool):
    """In-plane matrices (W_x, W_y) taking a reoriented slice onto the grid: grid = W_y @ slice @ W_x.T."""
    s = grid.GetSpacing()[0]
    g0 = np.array(grid.GetOrigin())
    target = prep.fov_mm / prep.image_size
    mats = []
    for j in range(2):
        first = float(np.dot(g0 - o.origin, o.direction[:, j])) / o.spacing[j]
        w = _interp_matrix(first, s / o.spacing[j], prep.image_size, o.size[j])
        if antialias:
            w = w @ _itk_gaussian_matrix(o.size[j], o.spacing[j], max(target ** 2 - o.spacing[j] ** 2, 0) / 4)
        mats.append(w.astype(np.float32))
    return mats


def _back_matrices(o: _Orientation, grid: sitk.Image):
    """(B_x, B_y) taking a grid slice back onto a reoriented input slice: B_y @ grid_slice @ B_x.T."""
    s = grid.GetSpacing()[0]
    g0 = np.array(grid.GetOrigin())
    return [_interp_matrix(float(np.dot(o.origin - g0, o.direction[:, j])) / s, o.spacing[j] / s,
                           o.size[j], grid.GetSize()[j]).astype(np.float32) for j in range(2)]


def _products(left: np.ndarray, a: np.ndarray, right: np.ndarray) -> np.ndarray:
    """left @ a[k] @ right.T for every slice k of a (k, r, c) array: one GEMM for the right product."""
    k, r, c = a.shape
    t = (np.ascontiguousarray(a).reshape(k * r, c) @ right.T).reshape(k, r, right.shape[0])
    return np.matmul(left, t)


def _threads() -> int:
    """Threads for the slab loops: torch's setting when torch is loaded (torch.set_num_threads is respected),
    else the cores."""
    import sys
    torch = sys.modules.get("torch")
    return max(1, torch.get_num_threads() if torch is not None else (os.cpu_count() or 1))


def _for_slabs(z0: int, z1: int, fn) -> None:
    """fn(k, e) for the slabs [k, e) of _SLAB slices covering [z0, z1); the slabs are independent (each writes
    its own slices), so they run on _threads() threads at once (numpy's products and ufuncs release the GIL)."""
    starts = list(range(z0, z1, _SLAB))
    n = min(_threads(), len(starts))
    if n < 2:
        for k in starts:
            fn(k, min(k + _SLAB, z1))
        return
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(lambda k: fn(k, min(k + _SLAB, z1)), starts))  # (list: re-raises a slab's exception)


def _one_blas_thread():
    """The products are small: one BLAS thread does them as fast as two on a quiet machine and much faster on a
    busy one (waiting BLAS threads spin), and leaves the other cores to the network (torch has its own pool)."""
    try:
        from threadpoolctl import threadpool_limits
        return threadpool_limits(1, "blas")
    except ImportError:  # threadpoolctl comes with scikit-learn; without it, BLAS's own setting
        import contextlib
        return contextlib.nullcontext()


def _slices(box) -> tuple:
    return tuple(slice(a, b) for a, b in box)


def _lps_box(box, o: "_Orientation", shape) -> list[tuple[int, int]]:
    """A bounding box in the input's array order -> the same box in _lps_view's array order."""
    out = []
    for i in range(3):                 # LPS array axis i (z, y, x) = reoriented axis j = 2 - i ...
        j = 2 - i
        a = 2 - o.perm[j]              # ... = input array axis a, read backwards when flip[j]
        lo, hi = box[a]
        out.append((shape[a] - hi, shape[a] - lo) if o.flip[j] else (lo, hi))
    return out


# the ball of radius 2 ITK's BinaryMorphologicalClosing uses (sitkBall): the 81 offsets of [-2, 2]^3 with at most
# one coordinate of magnitude 2 = the 3x3x3 cube (+) the 6-neighbour cross, so dilating (eroding) by it is
# dilating (eroding) by the cross, then by the cube (three 1D runs)


def _run(a: np.ndarray, axis: int, r: int, dilate: bool) -> np.ndarray:
    """1D dilation (OR, background outside) or erosion (AND, foreground outside) of radius r along an axis."""
    out = a.copy()
    for s in range(1, r + 1):
        hi = [slice(None)] * 3
        lo = [slice(None)] * 3
        hi[axis], lo[axis] = slice(s, None), slice(None, -s)
        if dilate:
            out[tuple(hi)] |= a[tuple(lo)]
            out[tuple(lo)] |= a[tuple(hi)]
        else:
            out[tuple(hi)] &= a[tuple(lo)]
            out[tuple(lo)] &= a[tuple(hi)]
    return out


def _ball2(a: np.ndarray, dilate: bool) -> np.ndarray:
    cross = a.copy()
    for axis in range(3):
        hi, lo = [slice(None)] * 3, [slice(None)] * 3
        hi[axis], lo[axis] = slice(1, None), slice(None, -1)
        if dilate:
            cross[tuple(hi)] |= a[tuple(lo)]
            cross[tuple(lo)] |= a[tuple(hi)]
        else:
            cross[tuple(hi)] &= a[tuple(lo)]
            cross[tuple(lo)] &= a[tuple(hi)]
    return _run(_run(_run(cross, 0, 1, dilate), 1, 1, dilate), 2, 1, dilate)


def auto_mask_array(arr: np.ndarray) -> np.ndarray:
    """`auto_mask` on a float32 (z, y, x) array, as a uint8 array."""
    return _auto_mask(arr)[0].view(np.uint8)


def _components(b: np.ndarray):
    """Connected components of a bool array with face connectivity (ITK's filter: multi-threaded, faster than
    scipy.ndimage.label here): (the label image, which keeps the view alive; the labels as a read-only array
    view, 0 = background, 1..n in raster order of first voxel; n)."""
    f = sitk.ConnectedComponentImageFilter()
    f.SetFullyConnected(False)
    img = f.Execute(sitk.GetImageFromArray(b.view(np.uint8)))
    return img, sitk.GetArrayViewFromImage(img), int(f.GetObjectCount())


def _auto_mask(arr: np.ndarray) -> tuple[np.ndarray, Optional[list]]:
    """The automatic mask as a bool array and its bounding box (None when empty). Closing with a radius-2 ball
    and a safe border, hole filling and connected components with face connectivity, on the foreground's
    bounding box only; the common cases (no holes, one component) skip the relabelling passes."""
    lo, hi = background_level(arr), _percentile(arr, 99.5)  # (not the minimum: interpolation ringing, arrays.py)
    fg = arr > lo + 0.02 * (hi - lo)
    out = np.zeros(arr.shape, bool)
    fg_box = _box(fg)
    if fg_box is None:
        return out, None
    r = 2
    box = [slice(max(a - r - 1, 0), min(b + r + 1, n)) for (a, b), n in zip(fg_box, arr.shape)]
    crop = np.pad(fg[tuple(box)], r)                       # the safe border: background around the crop
    closed = np.ascontiguousarray(_ball2(_ball2(crop, True), False)[r:-r, r:-r, r:-r])
    keep, labels, n_bg = _components(~closed)             # background components
    faces = np.concatenate([labels[0].ravel(), labels[-1].ravel(), labels[:, 0].ravel(), labels[:, -1].ravel(),
                            labels[:, :, 0].ravel(), labels[:, :, -1].ravel()])
    outside = np.zeros(n_bg + 1, bool)
    outside[faces] = True
    outside[0] = True                                     # (foreground: kept by `closed`)
    # holes: background not reaching the crop's faces
    filled = closed if outside.all() else closed | ~outside[labels]
    keep, labels, n = _components(filled)
    if n == 0:
        return out, None
    if n == 1:
        comp = filled
    else:
        counts = np.bincount(labels.ravel(), minlength=n + 1)
        counts[0] = 0
        comp = labels == int(np.argmax(counts))
    out[tuple(box)] = comp
    inner = _box(comp)
    return out, [(s.start + a, s.start + b) for s, (a, b) in zip(box, inner)]


def _checked_and_masked(img: sitk.Image, mask: Optional[sitk.Image], what: str):
    """The validated voxels, the brain mask (image, bool array, bounding box) and the z-score statistics
    inside it (the mask's voxels in array order, as arr[marr] gives them)."""
    arr = check_image(img, what)
    m, marr, box, vals = _mask_and_box(img, mask, arr, values=True)
    mean, std = float(vals.mean()), float(vals.std())
    if std == 0:
        raise VolumeError(f"{what} is constant inside the brain mask; nothing to score")
    return arr, m, marr, box, mean, std


def prepare(img: sitk.Image, mask: Optional[sitk.Image] = None,
            prep: Optional[Preprocessing] = None, what: str = "input") -> Prepared:
    """The input on the model grid: z-scored inside the brain mask, anti-aliased in-plane, clipped.
    Separable path (see above): one float32 copy of the input (check_image's), slabs of _SLAB slices."""
    prep = prep or Preprocessing()
    arr, m, marr, box, mean, std = _checked_and_masked(img, mask, what)
    o = _orientation(img)
    if o is None:
        return _prepare_resampled(img, m, prep, arr, marr, mean, std)
    grid = model_grid(img, m, prep, box)
    a_o, m_o = _lps_view(arr, o), _lps_view(marr, o)
    n, S = o.size[2], prep.image_size
    slices, brain = np.zeros((n, S, S), np.float32), np.zeros((n, S, S), bool)
    lps_box = _lps_box(box, o, marr.shape)
    (z0, z1), (y0, y1), (x0, x1) = lps_box  # z is 0 outside the mask: only its bounding box contributes
    with _one_blas_thread():
        wx, wy = _grid_matrices(o, grid, prep, prep.antialias)
        lx, ly = _grid_matrices(o, grid, prep, False)  # the mask: interpolation only
        wx, wy, lx, ly = wx[:, x0:x1], wy[:, y0:y1], lx[:, x0:x1], ly[:, y0:y1]
        def slab(k, e):  # dense products: ~10x faster here than gathering the narrow bands
            mk = m_o[k:e, y0:y1, x0:x1]
            z = np.where(mk, (a_o[k:e, y0:y1, x0:x1] - mean) / std, 0).astype(np.float32)
            slices[k:e] = _products(wy, z, wx)
            brain[k:e] = _products(ly, mk.astype(np.float32), lx) > 0.5
        _for_slabs(z0, z1, slab)
    slices = np.clip(np.where(brain, slices, 0), -prep.clip, prep.clip).astype(np.float32)
    return Prepared(slices, brain, grid, img, m, lps_box)


def prepare_by_resampling(img: sitk.Image, mask: Optional[sitk.Image] = None,
                          prep: Optional[Preprocessing] = None, what: str = "input") -> Prepared:
    """`prepare` by 3D resampling (reorient, full-resolution DiscreteGaussian, sitk.Resample): the way it was
    done before the separable path, kept for sheared directions and as the reference in the tests."""
    prep = prep or Preprocessing()
    arr, m, marr, _, mean, std = _checked_and_masked(img, mask, what)
    return _prepare_resampled(img, m, prep, arr, marr, mean, std)


def _prepare_resampled(img, m, prep, arr, marr, mean, std) -> Prepared:
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
    """A (nz, S, S) map on the model grid -> float32 image on the exact input grid, 0 outside mask.
    Separable path: two matrix products per slice written straight into the input's voxel order."""
    o = _orientation(p.image)
    if o is None:
        return to_input_grid_by_resampling(maps, p)
    bx, by = _back_matrices(o, p.grid)
    out = np.zeros(p.image.GetSize()[::-1], np.float32)
    out_o = _lps_view(out, o)  # a writable view in LPS order
    maps = np.ascontiguousarray(maps, np.float32)
    m_o = _lps_view(sitk.GetArrayViewFromImage(p.mask), o)
    (z0, z1), (y0, y1), (x0, x1) = p.box or _box(m_o)  # 0 outside the mask's box
    bx, by = bx[x0:x1], by[y0:y1]
    def slab(k, e):
        out_o[k:e, y0:y1, x0:x1] = _products(by, maps[k:e], bx) * m_o[k:e, y0:y1, x0:x1]
    with _one_blas_thread():
        _for_slabs(z0, z1, slab)
    img = sitk.GetImageFromArray(out)
    img.CopyInformation(p.image)
    return img


def to_input_grid_by_resampling(maps: np.ndarray, p: Prepared) -> sitk.Image:
    """`to_input_grid` by sitk.Resample (sheared directions; the reference in the tests)."""
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
def grid_maps(checkpoint, p: Prepared, names, options=None, device="cpu",
              progress: Optional[Callable[[float], None]] = None,
              cancel: Optional[Callable[[], bool]] = None) -> dict[str, np.ndarray]:
    """The maps `names` of one prepared volume on the model grid, from one network pass over its brain slices
    (0 on the slices without brain); the ensemble and Combi get their checkpoint constants."""
    from .inference import inference_kwargs
    from .predictors import compute_maps
    return compute_maps(checkpoint.model, p.slices, names, checkpoint.beta, options, device,
                        progress=progress, cancel=cancel, brain=p.brain,  # projection: brain slices only
                        slice_mm=p.grid.GetSpacing()[2], **inference_kwargs(checkpoint, names, options))


def score_volume(checkpoint, img: sitk.Image, mask: Optional[sitk.Image] = None, predictors=("rec-grad",),
                 options=None, device="cpu", progress: Optional[Callable[[float], None]] = None,
                 cancel: Optional[Callable[[], bool]] = None) -> dict[str, sitk.Image]:
    """Heatmaps on the exact input grid, one per requested predictor (and 'reconstruction'): the library's
    plain call (scoring.run adds the request, the progress display and the verdict)."""
    names = list(dict.fromkeys(predictors))
    p = prepare(img, mask, Preprocessing.from_dict(checkpoint.preprocessing))
    maps = grid_maps(checkpoint, p, names, options, device, progress, cancel)
    return {n: to_input_grid(np.where(p.brain, maps[n], 0), p) for n in names}  # 'reconstruction': z-score units
