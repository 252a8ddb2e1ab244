"""DICOM out (issue 18, item 3): `vaeanomaly score SERIES/ -o heat.dcm --label seg.dcm` writes a DICOM Parametric
Map and a DICOM Segmentation (highdicom) that reference the source series, with the same values as the NIfTI
outputs of the same run; a non-DICOM input asked for DICOM output is refused before anything is written."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

hd = pytest.importorskip("highdicom", reason="DICOM output needs the [dicom] extra: pip install \".[dicom]\"")
pydicom = pytest.importorskip("pydicom")

from vaeanomaly.cli import main  # noqa: E402
from vaeanomaly.volume import read_image  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "VAEAnomaly" / "Resources" / "SampleData" / "VAEAnomalySample_T2.nrrd"
MODEL = "dae-64"  # a bundled model: no training in this test


def write_mr_series(folder: Path, img: sitk.Image) -> list:
    """`img` as a single-frame MR Image Storage series (one file per slice, in shuffled file-name order so that
    file order is not slice order). Returns the SOP Instance UIDs in slice order."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
    folder.mkdir(parents=True)
    arr = sitk.GetArrayFromImage(sitk.Cast(img, sitk.sitkInt16))
    d = np.array(img.GetDirection()).reshape(3, 3)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    order = np.random.default_rng(0).permutation(arr.shape[0])
    uids = []
    for k in range(arr.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = uid = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^VAE", "VAE001", "", "O"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = \
            "20260101", "120000", "", "", "1"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 3, k + 1
        ds.Manufacturer = "test"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "3D"
        ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength, ds.MagneticFieldStrength = 100, 3000, 1, 3
        ds.ImagePositionPatient = [f"{v:.6f}" for v in img.TransformIndexToPhysicalPoint((0, 0, k))]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*d[:, 0], *d[:, 1])]
        ds.PixelSpacing = [f"{img.GetSpacing()[1]:.6f}", f"{img.GetSpacing()[0]:.6f}"]
        ds.SliceThickness = ds.SpacingBetweenSlices = f"{img.GetSpacing()[2]:.6f}"
        ds.Rows, ds.Columns = arr.shape[1], arr.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.ascontiguousarray(arr[k]).tobytes()
        ds.save_as(folder / f"im{order[k]:04d}.dcm", enforce_file_format=True)
        uids.append(uid)
    return uids


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """The bundled sample T2 (240x240x155, LPS-flipped axes) shrunk to 120x120x31 slices of 2x2x5 mm."""
    folder = tmp_path_factory.mktemp("dicom") / "series"
    img = sitk.Shrink(sitk.ReadImage(str(SAMPLE)), (2, 2, 5))
    uids = write_mr_series(folder, img)
    return folder, uids


def score(args) -> int:
    return main(["score", *map(str, args), "--model", MODEL, "--progress", "none"])


def frame_slices(obj, uids) -> list:
    """For each frame of a SEG/PM: the slice index of the source instance it references."""
    out = []
    for item in obj.PerFrameFunctionalGroupsSequence:
        refs = [r.ReferencedSOPInstanceUID for d in item.DerivationImageSequence for r in d.SourceImageSequence]
        assert len(refs) == 1
        out.append(uids.index(refs[0]))
    return out


def test_segmentation_and_parametric_map_match_the_nifti_outputs(series, tmp_path):
    folder, uids = series
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert score([folder, "-o", tmp_path / "heat.dcm", "--threshold", "auto", "--label", tmp_path / "seg.dcm"]) == 0
    assert score([folder, "-o", tmp_path / "heat.nii.gz", "--threshold", "auto",
                  "--label", tmp_path / "label.nii.gz"]) == 0
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # the input is never written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heat.dcm", "heat.nii.gz", "label.nii.gz", "seg.dcm"]
    src = read_image(folder)
    heat = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "heat.nii.gz")))
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "label.nii.gz")))
    assert heat.shape == label.shape == sitk.GetArrayViewFromImage(src).shape
    assert label.any() and not label.all()
    series_uid = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).SeriesInstanceUID

    seg = hd.seg.segread(tmp_path / "seg.dcm")
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.SegmentationType == "BINARY"
    ref = seg.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == series_uid
    assert {r.ReferencedSOPInstanceUID for r in ref.ReferencedInstanceSequence} == set(uids)
    assert seg.SeriesInstanceUID != series_uid and seg.FrameOfReferenceUID == \
        pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).FrameOfReferenceUID
    s = seg.SegmentSequence[0]
    assert s.SegmentAlgorithmType == "AUTOMATIC" and s.SegmentAlgorithmName == f"VAEAnomaly {MODEL}"
    assert (s.SegmentedPropertyCategoryCodeSequence[0].CodeValue, s.SegmentedPropertyTypeCodeSequence[0].CodeValue,
            s.AnatomicRegionSequence[0].CodeValue) == ("49755003", "4147007", "12738006")
    seg_vol = np.zeros_like(label)
    frames = seg.pixel_array if seg.pixel_array.ndim == 3 else seg.pixel_array[None]
    for frame, k in zip(frames, frame_slices(seg, uids)):
        seg_vol[k] = frame
    assert np.array_equal(seg_vol, label != 0)  # empty slices omitted from the SEG are empty in the label
    assert len(frames) == int((label.reshape(len(label), -1) != 0).any(1).sum())

    pm = pydicom.dcmread(tmp_path / "heat.dcm")
    assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30" and "FloatPixelData" in pm
    assert pm.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    assert {r.ReferencedSOPInstanceUID for r in pm.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == set(uids)
    rwvm = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert float(rwvm.RealWorldValueSlope) == 1.0 and float(rwvm.RealWorldValueIntercept) == 0.0
    pm_vol = np.full(heat.shape, np.nan, np.float32)
    for frame, k in zip(pm.pixel_array, frame_slices(pm, uids)):
        pm_vol[k] = frame
    assert np.allclose(pm_vol, heat.astype(np.float32), rtol=1e-6, atol=1e-6)  # every slice, same values


def test_empty_label_gives_a_valid_segmentation_with_every_frame_empty(series, tmp_path):
    folder, uids = series
    assert score([folder, "-o", tmp_path / "heat.nii.gz", "--threshold", "1e9", "--label", tmp_path / "seg.dcm"]) == 0
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    # highdicom omits empty frames unless all are empty: then it keeps one frame per source instance, all zero
    assert int(seg.NumberOfFrames) == len(uids) and not seg.pixel_array.any()
    assert sorted(frame_slices(seg, uids)) == list(range(len(uids)))


def test_dicom_output_needs_a_dicom_series_input(tmp_path, capsys):
    nii = tmp_path / "t2.nii.gz"
    sitk.WriteImage(sitk.Shrink(sitk.ReadImage(str(SAMPLE)), (4, 4, 4)), str(nii))
    out = tmp_path / "out"
    for args in (["-o", out / "heat.dcm"],
                 ["-o", out / "heat.nii.gz", "--threshold", "auto", "--label", out / "s.dcm"]):
        assert score([nii, *args]) == 2
        err = capsys.readouterr().err
        assert "DICOM output needs a DICOM series folder as input" in err and ".nii.gz" in err
    assert not out.exists()  # refused before any work: nothing written


def test_dcm_outputs_follow_the_existing_rules(series, tmp_path, capsys):
    folder, _ = series
    assert score([folder, "-o", tmp_path / "h.dcm", "--predictor", "all"]) == 2  # one file, several maps
    assert "names one file" in capsys.readouterr().err
    assert score([folder, "-o", folder / "h.dcm"]) == 2  # never inside the input series folder
    assert "destroy" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_terminology_is_the_slicer_panels():
    from vaeanomaly import dicom_out
    logic = (ROOT / "VAEAnomaly" / "VAEAnomalyLib" / "logic.py").read_text()
    entry = "".join(re.findall(r'"([^"]*)"', logic.split("TERMINOLOGY_ENTRY = (", 1)[1].split(")", 1)[0]))
    for value, scheme, meaning in (dicom_out.CATEGORY, dicom_out.PROPERTY_TYPE, dicom_out.ANATOMIC_REGION):
        assert f"{scheme}^{value}^{meaning}" in entry


def test_missing_highdicom_says_what_to_install(series, tmp_path, monkeypatch, capsys):
    folder, _ = series
    monkeypatch.setitem(__import__("sys").modules, "highdicom", None)  # as if the [dicom] extra were not installed
    assert score([folder, "-o", tmp_path / "heat.dcm"]) == 2
    assert 'pip install ".[dicom]"' in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_oblique_series_frames_reference_the_instances_they_came_from(tmp_path):
    """No scoring: on an oblique series, a heatmap/label whose slice k holds k (and a marker pixel) comes back from
    the Parametric Map / Segmentation with every frame referencing the instance at slice k's position."""
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import oblique_direction

    from vaeanomaly import dicom_out
    img = sitk.Shrink(sitk.ReadImage(str(SAMPLE)), (6, 6, 10))
    img.SetDirection(tuple(oblique_direction(25.0, flip_x=False).ravel()))
    uids = write_mr_series(tmp_path / "series", img)
    src = read_image(tmp_path / "series")
    assert np.allclose(src.GetOrigin(), img.GetOrigin(), atol=1e-3)
    assert np.allclose(src.GetDirection(), img.GetDirection(), atol=1e-5)
    files = dicom_out.series_files(tmp_path / "series")
    n = src.GetSize()[2]
    arr = np.zeros(sitk.GetArrayViewFromImage(src).shape, np.float32)
    arr += np.arange(n, dtype=np.float32)[:, None, None] + 0.25
    heat = sitk.GetImageFromArray(arr)
    heat.CopyInformation(src)
    lab_arr = np.zeros(arr.shape, np.uint8)
    lab_arr[np.arange(n), np.arange(n) % arr.shape[1], 3] = 1  # one voxel per slice, at row k
    lab = sitk.GetImageFromArray(lab_arr)
    lab.CopyInformation(src)
    dicom_out.write_parametric_map(tmp_path / "pm.dcm", heat, files, "m", "p")
    dicom_out.write_segmentation(tmp_path / "seg.dcm", lab, files, "m")
    pm = pydicom.dcmread(tmp_path / "pm.dcm")
    positions = {ds.SOPInstanceUID: np.array(ds.ImagePositionPatient, float)
                 for ds in map(pydicom.dcmread, files)}
    for frame, item, k in zip(pm.pixel_array, pm.PerFrameFunctionalGroupsSequence, frame_slices(pm, uids)):
        assert np.allclose(frame, k + 0.25)  # write_mr_series: uids[k] is slice k of img (and of src)
        ipp = item.PlanePositionSequence[0].ImagePositionPatient
        assert np.allclose(ipp, src.TransformIndexToPhysicalPoint((0, 0, k)), atol=1e-3)
        assert np.allclose(positions[uids[k]], ipp, atol=1e-3)
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    for frame, k in zip(seg.pixel_array, frame_slices(seg, uids)):
        assert frame.sum() == 1 and frame[k % arr.shape[1], 3] == 1


def segment_volumes(seg, uids, shape) -> dict:
    """{segment number: its voxels} of a SEG, frame by frame through the frame's segment and source instance."""
    out = {int(s.SegmentNumber): np.zeros(shape, bool) for s in seg.SegmentSequence}
    frames = seg.pixel_array if seg.pixel_array.ndim == 3 else seg.pixel_array[None]
    shared = seg.SharedFunctionalGroupsSequence[0]
    for frame, item, k in zip(frames, seg.PerFrameFunctionalGroupsSequence, frame_slices(seg, uids)):
        ident = item if "SegmentIdentificationSequence" in item else shared  # one segment: in the shared group
        out[int(ident.SegmentIdentificationSequence[0].ReferencedSegmentNumber)][k] |= frame.astype(bool)
    return out


def test_signed_label_gives_one_segment_per_direction(tmp_path):
    """No scoring: a label with 1 (brighter) and 2 (darker) voxels becomes two segments named by direction, each with
    its type modifier (Hyperintense / Hypointense) and exactly its own voxels; a direction without voxels is a
    segment all the same; a label with other values is refused."""
    from vaeanomaly import dicom_out
    img = sitk.Shrink(sitk.ReadImage(str(SAMPLE)), (6, 6, 10))
    uids = write_mr_series(tmp_path / "series", img)
    src = read_image(tmp_path / "series")
    files = dicom_out.series_files(tmp_path / "series")
    lab = np.zeros(sitk.GetArrayViewFromImage(src).shape, np.uint8)
    lab[3:6, 10:15, 10:15] = 1
    lab[8:10, 20:25, 18:25] = 2

    def write(arr, name, **kw):
        li = sitk.GetImageFromArray(arr)
        li.CopyInformation(src)
        return dicom_out.write_segmentation(tmp_path / name, li, files, "dae-64", **kw)

    seg = hd.seg.segread(write(lab, "signed.dcm", signed=True))
    assert seg.SegmentationType == "BINARY"
    got = [(int(s.SegmentNumber), s.SegmentLabel, s.SegmentedPropertyTypeCodeSequence[0].CodeValue,
            s.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0].CodeValue,
            s.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning)
           for s in seg.SegmentSequence]
    assert got == [(1, "Brighter than expected", "4147007", "RID35805", "Hyperintense"),
                   (2, "Darker than expected", "4147007", "RID35804", "Hypointense")]
    vols = segment_volumes(seg, uids, lab.shape)
    assert np.array_equal(vols[1], lab == 1) and np.array_equal(vols[2], lab == 2)
    only_bright = np.where(lab == 2, 0, lab).astype(np.uint8)
    seg = hd.seg.segread(write(only_bright, "bright.dcm", signed=True))
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Brighter than expected", "Darker than expected"]
    vols = segment_volumes(seg, uids, lab.shape)
    assert np.array_equal(vols[1], lab == 1) and not vols[2].any()
    # unsigned (the default): one segment, the nonzero voxels, no modifier
    seg = hd.seg.segread(write(lab, "one.dcm"))
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["VAEAnomaly anomaly"]
    assert "SegmentedPropertyTypeModifierCodeSequence" not in \
        seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0]
    assert np.array_equal(segment_volumes(seg, uids, lab.shape)[1], lab != 0)
    with pytest.raises(ValueError, match="1 \\(brighter\\) and 2 \\(darker\\)"):
        write(np.where(lab == 2, 3, lab).astype(np.uint8), "bad.dcm", signed=True)


def test_signed_polarity_from_the_command_line_gives_two_segments(series, tmp_path):
    """`--polarity signed --threshold auto --label seg.dcm`: the SEG's two segments hold the NIfTI label's 1 and 2
    voxels of the same run (dae-64 records per-tail thresholds)."""
    folder, uids = series
    args = ["--polarity", "signed", "--threshold", "auto"]
    assert score([folder, "-o", tmp_path / "heat.nii.gz", *args, "--label", tmp_path / "seg.dcm"]) == 0
    assert score([folder, "-o", tmp_path / "heat2.nii.gz", *args, "--label", tmp_path / "label.nii.gz"]) == 0
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "label.nii.gz")))
    assert set(np.unique(label)) <= {0, 1, 2} and (label == 1).any()
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Brighter than expected", "Darker than expected"]
    vols = segment_volumes(seg, uids, label.shape)
    assert np.array_equal(vols[1], label == 1) and np.array_equal(vols[2], label == 2)

