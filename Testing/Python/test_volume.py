import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_phantom, oblique_direction, write_dicom_series
from vaeanomaly.checkpoint import load_checkpoint
from vaeanomaly.volume import Preprocessing, VolumeError, prepare, read_image, score_volume, to_input_grid


def same_geometry(a, b):
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing())
            and np.allclose(a.GetOrigin(), b.GetOrigin()) and np.allclose(a.GetDirection(), b.GetDirection()))


@pytest.mark.parametrize("direction,spacing", [
    (None, (1.0, 1.0, 1.0)),
    (oblique_direction(20, flip_x=True), (0.9, 1.3, 2.5)),
    (np.diag([-1.0, -1.0, -1.0]), (1.2, 1.2, 3.0)),
    (np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], float), (2.0, 1.0, 1.0)),  # sagittal acquisition
])
def test_blob_lands_at_its_physical_point(direction, spacing):
    size = (int(180 / spacing[0]), int(200 / spacing[1]), int(150 / spacing[2]))
    blob = (size[0] // 3, size[1] // 2 + 5, size[2] // 2 + 3)
    img = make_phantom(size, spacing, direction, (-40.0, 25.0, 10.0), blob_index=blob, blob_value=4.0)
    blob_phys = np.array(img.TransformIndexToPhysicalPoint(blob))
    p = prepare(img, None, Preprocessing(clip=1e6))  # no clipping: the argmax must be unique
    # on the model grid: the brightest pixel is where the blob is (within one 3.75 mm grid pixel)
    k = np.unravel_index(np.argmax(p.slices), p.slices.shape)
    grid_phys = np.array(p.grid.TransformIndexToPhysicalPoint([int(k[2]), int(k[1]), int(k[0])]))
    assert np.linalg.norm(grid_phys - blob_phys) < 240 / 64 + max(spacing)
    # back on the input grid: exact geometry, zero outside the mask, blob at the same point
    back = to_input_grid(p.slices, p)
    assert same_geometry(back, img)
    arr = sitk.GetArrayFromImage(back)
    assert (arr[sitk.GetArrayFromImage(p.mask) == 0] == 0).all()
    kb = np.unravel_index(np.argmax(arr), arr.shape)
    back_phys = np.array(img.TransformIndexToPhysicalPoint([int(kb[2]), int(kb[1]), int(kb[0])]))
    assert np.linalg.norm(back_phys - blob_phys) < 240 / 64 + max(spacing)


def test_zscore_inside_mask_and_fov():
    img = make_phantom((120, 120, 30), (2.0, 2.0, 4.0))
    p = prepare(img)
    assert p.slices.shape == (30, 64, 64) and p.brain.shape == (30, 64, 64)
    assert abs(float(p.slices[p.brain].mean())) < 0.2
    assert (p.slices[~p.brain] == 0).all()
    assert np.allclose(p.grid.GetSpacing()[:2], 240 / 64)


def test_score_volume_geometry_and_values(tiny_checkpoint):
    ck = load_checkpoint(tiny_checkpoint)
    img = make_phantom((80, 90, 20), (2.2, 2.2, 5.0), oblique_direction(15), (3.0, -7.0, 11.0), blob_index=(30, 40, 10))
    maps = score_volume(ck, img, None, ["rec-error", "rec-grad", "reconstruction"])
    for m in maps.values():
        assert same_geometry(m, img) and m.GetPixelID() == sitk.sitkFloat32
    assert sitk.GetArrayFromImage(maps["rec-grad"]).max() > 0


def write(img, path):
    sitk.WriteImage(img, str(path))
    return path


def test_bad_inputs(tmp_path):
    with pytest.raises(VolumeError, match="does not exist"):
        read_image(tmp_path / "nope.nii.gz")
    two_d = sitk.GetImageFromArray(np.random.rand(64, 64).astype(np.float32))
    with pytest.raises(VolumeError, match="2-dimensional"):
        read_image(write(two_d, tmp_path / "a.nii.gz"))
    four_d = sitk.GetImageFromArray(np.random.rand(3, 8, 8, 8).astype(np.float32), isVector=False)
    with pytest.raises(VolumeError, match="4-dimensional"):
        read_image(write(four_d, tmp_path / "b.nii.gz"))
    rgb = sitk.GetImageFromArray(np.random.rand(8, 8, 8, 3).astype(np.float32), isVector=True)
    with pytest.raises(VolumeError, match="components"):
        read_image(write(rgb, tmp_path / "c.nrrd"))
    (tmp_path / "junk.nii.gz").write_bytes(b"not an image at all")
    with pytest.raises(VolumeError, match="cannot read"):
        read_image(tmp_path / "junk.nii.gz")
    empty_dir = tmp_path / "dicom"
    empty_dir.mkdir()
    with pytest.raises(VolumeError, match="no DICOM series"):
        read_image(empty_dir)
    nan = make_phantom((40, 40, 20))
    arr = sitk.GetArrayFromImage(nan)
    arr[5, 5, 5] = np.nan
    nan_img = sitk.GetImageFromArray(arr)
    with pytest.raises(VolumeError, match="NaN"):
        prepare(nan_img)
    with pytest.raises(VolumeError, match="constant"):
        prepare(sitk.Image(40, 40, 20, sitk.sitkFloat32))
    img = make_phantom((40, 40, 20))
    with pytest.raises(VolumeError, match="mask is empty"):
        prepare(img, sitk.Image(40, 40, 20, sitk.sitkUInt8))
    with pytest.raises(VolumeError, match="differs"):
        prepare(img, sitk.Image(41, 40, 20, sitk.sitkUInt8))


def test_too_large_for_memory(tmp_path):
    from vaeanomaly.volume import check_memory
    with pytest.raises(VolumeError, match="Crop the volume"):
        check_memory((4096, 4096, 4096))
    # the header is checked before the voxels are read
    big = tmp_path / "big.mhd"
    big.write_text("ObjectType = Image\nNDims = 3\nDimSize = 8192 8192 4096\nElementType = MET_FLOAT\n"
                   "ElementDataFile = big.raw\n")
    (tmp_path / "big.raw").write_bytes(b"")
    with pytest.raises(VolumeError, match="GiB"):
        read_image(big)


def test_mha_and_dicom_inputs(tmp_path):
    img = make_phantom((40, 44, 12), (1.5, 1.5, 3.0))
    p = read_image(write(img, tmp_path / "x.mha"))
    assert p.GetSize() == img.GetSize()
    d = tmp_path / "series"
    write_dicom_series(d, sitk.RescaleIntensity(img, 0, 1000))
    dic = read_image(d)
    assert dic.GetSize() == img.GetSize()
    assert np.allclose(dic.GetSpacing(), img.GetSpacing(), atol=1e-3)
