"""DICOM output of `vaeanomaly score` for a DICOM series input (issue 18): the label map as a DICOM
Segmentation (one segment, the Slicer panel's terminology) and a heatmap as a DICOM Parametric Map (float
values with a real-world value mapping), both referencing the source series and its instances.

Written with highdicom (the optional [dicom] extra, imported only here and only when DICOM output is asked for).
The label/heatmap are on the input's exact grid (vaeanomaly.volume.read_image of the series folder); each
SimpleITK slice is matched to its source instance by ImagePositionPatient, never by file order.
An all-empty label still gives a valid Segmentation: highdicom then keeps every frame (all zero) instead of
omitting the empty ones, so readers see the referenced slices and no segmented voxel."""
from __future__ import annotations

from pathlib import Path

import numpy as np

DICOM_MISSING = ("DICOM output (.dcm) needs highdicom, which is not installed: `pip install \".[dicom]\"` from a "
                 "source checkout (or `pip install highdicom`), or write NIfTI (.nii.gz) instead")

# The Slicer panel's terminology (VAEAnomalyLib/logic.py TERMINOLOGY_ENTRY): SNOMED CT codes.
CATEGORY = ("49755003", "SCT", "Morphologically Altered Structure")
PROPERTY_TYPE = ("4147007", "SCT", "Mass")
ANATOMIC_REGION = ("12738006", "SCT", "Brain")
SEGMENT_RGB = (144, 238, 144)  # the panel's SEGMENT_COLOR
# A signed map's label (registry.LABEL_VALUES: 1 = brighter, 2 = darker than expected) gives one segment per direction:
# the same category, type and region with a type modifier, the MR signal intensity codes of DICOM CID 6335 (RadLex
# "Hyperintense" / "Hypointense", pydicom codes.cid6335). The Slicer panel's segments use the same codes
# (VAEAnomalyLib/logic.py SIGNED_TERMINOLOGY) and colours (red brighter, blue darker: its diverging colour map).
DIRECTION_MODIFIERS = {"bright": ("RID35805", "RADLEX", "Hyperintense"), "dark": ("RID35804", "RADLEX", "Hypointense")}
DIRECTION_RGB = {"bright": (214, 48, 39), "dark": (33, 102, 172)}
SEG_SERIES_NUMBER = 901
PM_SERIES_NUMBER = 902


def is_dicom_path(p) -> bool:
    return Path(p).name.lower().endswith(".dcm")


def require_highdicom():
    """Raise ValueError saying how to install highdicom when it is missing (checked before any work)."""
    try:
        import highdicom  # noqa: F401
    except ModuleNotFoundError as err:
        if err.name not in ("highdicom", "pydicom"):
            raise
        raise ValueError(DICOM_MISSING) from None


def series_files(folder) -> list[str]:
    """The files of the one DICOM series in `folder`, as vaeanomaly.volume.read_image reads it."""
    import SimpleITK as sitk
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if len(ids) != 1:
        raise ValueError(f"'{folder}' must hold exactly one DICOM series for DICOM output (found {len(ids)})")
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0]))


def _sources_by_slice(img, source_files):
    """(source datasets in file order, slice index k of `img` for each): matched by ImagePositionPatient."""
    import pydicom
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in source_files]
    size = img.GetSize()
    if len(size) != 3 or size[2] != len(datasets):
        raise ValueError(f"the image ({'x'.join(map(str, size))}) does not match the DICOM series "
                         f"({len(datasets)} instances)")
    origins = np.array([img.TransformIndexToPhysicalPoint((0, 0, k)) for k in range(size[2])])
    tol = max(1e-3, 0.1 * min(img.GetSpacing()))
    slices = []
    for ds in datasets:
        if (int(ds.Rows), int(ds.Columns)) != (size[1], size[0]):
            raise ValueError(f"DICOM instance {ds.SOPInstanceUID} is {ds.Rows}x{ds.Columns}, the image "
                             f"{size[1]}x{size[0]}")
        dist = np.linalg.norm(origins - np.array([float(v) for v in ds.ImagePositionPatient]), axis=1)
        k = int(np.argmin(dist))
        if dist[k] > tol:
            raise ValueError(f"DICOM instance {ds.SOPInstanceUID} at {list(ds.ImagePositionPatient)} lies on no "
                             f"slice of the image grid")
        slices.append(k)
    if sorted(slices) != list(range(size[2])):
        raise ValueError("the DICOM instances do not map one-to-one onto the image slices")
    return datasets, slices


def _common(model_name: str) -> dict:
    import highdicom as hd

    from . import __version__
    return dict(series_instance_uid=hd.UID(), sop_instance_uid=hd.UID(), instance_number=1,
                manufacturer="VAEAnomaly", manufacturer_model_name=str(model_name)[:64],
                software_versions=f"vaeanomaly {__version__}", device_serial_number="none")


def _algorithm(model_name: str):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from . import __version__
    return hd.AlgorithmIdentificationSequence(name=f"VAEAnomaly {model_name}"[:64],
                                              family=codes.cid7162.ArtificialIntelligence, version=__version__)


def _save(obj, path) -> Path:
    from .io import atomic_path
    with atomic_path(path, suffix=".dcm") as tmp:
        obj.save_as(str(tmp), enforce_file_format=True)
    return Path(path)


def segment_label(direction: str) -> str:
    """A direction's segment name: 'Brighter than expected' / 'Darker than expected' (registry.DIRECTIONS)."""
    from .registry import DIRECTIONS
    text = DIRECTIONS[direction]
    return text[0].upper() + text[1:]


def write_segmentation(path, label_img, source_files, model_name: str, signed: bool = False) -> Path:
    """The label map as a binary DICOM Segmentation of the source series: one segment (nonzero: the anomaly), or with
    `signed` (a signed map's label, registry.LABEL_VALUES) two, 'Brighter than expected' (label 1) and 'Darker than
    expected' (label 2), each with its type modifier (DIRECTION_MODIFIERS). A direction without a voxel is a segment
    all the same (readers see both, one empty)."""
    require_highdicom()
    import highdicom as hd
    import SimpleITK as sitk
    from pydicom.sr.coding import Code

    from .registry import LABEL_VALUES
    datasets, slices = _sources_by_slice(label_img, source_files)
    arr = sitk.GetArrayViewFromImage(label_img)

    def describe(number: int, label: str, rgb, modifier=None):
        d = hd.seg.SegmentDescription(
            segment_number=number, segment_label=label,
            segmented_property_category=Code(*CATEGORY), segmented_property_type=Code(*PROPERTY_TYPE),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=_algorithm(model_name),
            anatomic_regions=[Code(*ANATOMIC_REGION)], display_color=hd.color.CIELabColor.from_rgb(*rgb))
        if modifier is not None:  # (0062,0011) inside the type's item: highdicom's constructor takes none
            d.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = \
                [hd.sr.CodedConcept(*modifier)]
        return d

    if signed:
        bad = sorted(set(np.unique(arr).tolist()) - {0, *LABEL_VALUES.values()})
        if bad:
            raise ValueError(f"a signed label holds 0, 1 (brighter) and 2 (darker) only; it holds {bad}")
        sides = ("bright", "dark")
        segments = [describe(i + 1, segment_label(s), DIRECTION_RGB[s], DIRECTION_MODIFIERS[s])
                    for i, s in enumerate(sides)]
        # frame i <-> datasets[i]; the segment numbers 1, 2 are the label values (a label-map style array)
        pixels = np.stack([np.where(arr[k] == LABEL_VALUES["bright"], 1, np.where(arr[k] == LABEL_VALUES["dark"], 2, 0))
                           for k in slices]).astype(np.uint8)
    else:
        segments = [describe(1, "VAEAnomaly anomaly", SEGMENT_RGB)]
        pixels = np.stack([arr[k] != 0 for k in slices]).astype(np.uint8)  # frame i <-> datasets[i]
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments, series_number=SEG_SERIES_NUMBER,
        series_description=f"VAEAnomaly {model_name} label"[:64], **_common(model_name))
    return _save(seg, path)


def write_parametric_map(path, heat_img, source_files, model_name: str, predictor: str) -> Path:
    """A heatmap as a DICOM Parametric Map (32-bit float values, identity real-world value mapping)."""
    require_highdicom()
    import highdicom as hd
    import SimpleITK as sitk
    from pydicom.sr.codedict import codes
    datasets, slices = _sources_by_slice(heat_img, source_files)
    arr = sitk.GetArrayViewFromImage(heat_img)
    pixels = np.stack([arr[k] for k in slices]).astype(np.float32)
    if not np.isfinite(pixels).all():
        raise ValueError(f"the {predictor} heatmap holds non-finite values; it cannot be written as DICOM")
    lo, hi = float(pixels.min()), float(pixels.max())
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=str(predictor)[:16], lut_explanation=f"VAEAnomaly {predictor} anomaly score"[:64],
        unit=codes.UCUM.NoUnits, value_range=(lo, hi), slope=1.0, intercept=0.0)
    pm = hd.pm.ParametricMap(
        source_images=datasets, pixel_array=pixels, series_number=PM_SERIES_NUMBER,
        contains_recognizable_visual_features=False, real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=(lo + hi) / 2, window_width=max(hi - lo, 1e-6),
                                                         window_explanation="full range")],
        series_description=f"VAEAnomaly {model_name} {predictor}"[:64], **_common(model_name))
    return _save(pm, path)
