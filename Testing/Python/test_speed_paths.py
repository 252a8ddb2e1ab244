"""The fast preprocessing paths (issue 11) give today's results up to float rounding.

The reference is the implementation they replaced, kept here verbatim (`old_*`): reorient the whole volume
(sitk.DICOMOrient), anti-alias it at full resolution (sitk.DiscreteGaussian), resample it onto the model grid
(sitk.Resample) and back; the automatic mask with ITK's filters on the whole volume (`auto_mask_itk`).
Tolerances: the new path does the same linear operations in float32 matrix products, so values differ from
ITK's double-precision interpolation by float32 rounding (~1e-6 of z-scores clipped to +-6); masks must be equal.
"""
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import make_phantom, oblique_direction
from vaeanomaly.checkpoint import load_checkpoint
from vaeanomaly.predictors import PredictorOptions, compute_maps
from vaeanomaly.preprocessing import Preprocessing
from vaeanomaly import volume as V


# --------------------------------------------------------------------------- the replaced implementation
def old_model_grid(img, mask, prep):
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


def old_to_grid(img, grid, interp=sitk.sitkLinear):
    return sitk.GetArrayFromImage(sitk.Resample(img, grid, sitk.Transform(), interp, 0.0, sitk.sitkFloat32))


def auto_mask_itk(img):
    """The automatic mask with ITK's filters on the whole volume (what `auto_mask` replaced)."""
    from vaeanomaly.arrays import background_level
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    lo, hi = background_level(arr), float(np.percentile(arr, 99.5))  # (the same background level, not the minimum)
    fg = sitk.GetImageFromArray((arr > lo + 0.02 * (hi - lo)).astype(np.uint8))
    fg.CopyInformation(img)
    fg = sitk.BinaryMorphologicalClosing(fg, [2, 2, 2])
    fg = sitk.BinaryFillhole(fg)
    cc = sitk.RelabelComponent(sitk.ConnectedComponent(fg), sortByObjectSize=True)
    return sitk.Cast(cc == 1, sitk.sitkUInt8)


def old_face_coverage(mask):
    from vaeanomaly.brainmask import FACES
    m = sitk.GetArrayFromImage(sitk.DICOMOrient(mask, "LPS")) > 0
    out = {}
    for name, axis, idx in FACES:
        areas = m.sum(axis=tuple(a for a in range(3) if a != axis))
        big = float(areas.max()) if areas.size else 0.0
        out[name] = float(areas[idx]) / big if big else 0.0
    return out


def old_dark_fraction(img, mask):
    from vaeanomaly.arrays import background_level
    from vaeanomaly.brainmask import DARK_LEVEL
    vals = sitk.GetArrayViewFromImage(img)[sitk.GetArrayViewFromImage(mask) > 0].astype(np.float32)
    lo = background_level(sitk.GetArrayViewFromImage(img))  # the volume's background
    hi = float(np.percentile(vals, 99))
    return float(np.mean(vals < lo + DARK_LEVEL * (hi - lo))) if hi > lo else 0.0


def old_mask_for(img, mask):
    if mask is None:
        return auto_mask_itk(img)
    m = sitk.Cast(sitk.GetImageFromArray((sitk.GetArrayViewFromImage(mask) > 0).astype(np.uint8)), sitk.sitkUInt8)
    m.CopyInformation(img)
    return m


def old_prepare(img, mask=None, prep=None):
    prep = prep or Preprocessing()
    arr = sitk.GetArrayFromImage(img).astype(np.float32, copy=False)
    m = old_mask_for(img, mask)
    marr = sitk.GetArrayViewFromImage(m).astype(bool)
    vals = arr[marr]
    mean, std = float(vals.mean()), float(vals.std())
    z = np.where(marr, (arr - mean) / std, 0).astype(np.float32)
    zimg = sitk.GetImageFromArray(z)
    zimg.CopyInformation(img)
    grid = old_model_grid(img, m, prep)
    if prep.antialias:
        target = prep.fov_mm / prep.image_size
        oriented = sitk.DICOMOrient(zimg, "LPS")
        sp = oriented.GetSpacing()
        var = [max(target ** 2 - sp[i] ** 2, 0) / 4 if i < 2 else 0.0 for i in range(3)]
        zimg = sitk.DiscreteGaussian(oriented, var, 32, 0.01, True)
    slices = old_to_grid(zimg, grid)
    brain = old_to_grid(sitk.Cast(m, sitk.sitkFloat32), grid) > 0.5
    slices = np.clip(np.where(brain, slices, 0), -prep.clip, prep.clip).astype(np.float32)
    return V.Prepared(slices, brain, grid, img, m)


def old_to_input_grid(maps, p):
    back = sitk.Resample(V.grid_image(maps, p.grid), p.image, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(back) * sitk.GetArrayViewFromImage(p.mask)
    out = sitk.GetImageFromArray(arr.astype(np.float32))
    out.CopyInformation(p.image)
    return out


# --------------------------------------------------------------------------- inputs
SAGITTAL = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], float)
CORONAL_FLIPPED = np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], float)
CASES = {
    "axial-iso": (None, (1.0, 1.0, 1.0)),
    "oblique-flipped-aniso": (oblique_direction(20, flip_x=True), (0.9, 1.3, 2.5)),
    "all-flipped-thick": (np.diag([-1.0, -1.0, -1.0]), (1.2, 1.2, 3.0)),
    "sagittal": (SAGITTAL, (2.0, 1.0, 1.0)),
    "coronal-flipped-aniso": (CORONAL_FLIPPED, (1.0, 4.0, 1.1)),
    "oblique-45": (oblique_direction(45, flip_x=False), (1.5, 0.7, 1.9)),
}


def phantom(name, fov=(150, 170, 120)):
    direction, spacing = CASES[name]
    size = tuple(int(f / s) for f, s in zip(fov, spacing))
    return make_phantom(size, spacing, direction, (-40.0, 25.0, 10.0),
                        blob_index=(size[0] // 3, size[1] // 2 + 3, size[2] // 2 + 2), blob_value=4.0)


def assert_same_prepared(new, old):
    assert new.grid.GetSize() == old.grid.GetSize()
    assert np.allclose(new.grid.GetOrigin(), old.grid.GetOrigin(), atol=1e-9)
    assert np.allclose(new.grid.GetDirection(), old.grid.GetDirection(), atol=1e-12)
    assert np.allclose(new.grid.GetSpacing(), old.grid.GetSpacing(), atol=1e-12)
    assert (sitk.GetArrayViewFromImage(new.mask) == sitk.GetArrayViewFromImage(old.mask)).all()
    assert (new.brain == old.brain).all()
    assert new.brain.sum() > 100
    np.testing.assert_allclose(new.slices, old.slices, rtol=0, atol=2e-5)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("antialias", [True, False])
def test_prepare_and_back_equal_the_resampling_path(name, antialias):
    img = phantom(name)
    prep = Preprocessing(antialias=antialias)
    new, old = V.prepare(img, None, prep), old_prepare(img, None, prep)
    assert_same_prepared(new, old)
    maps = np.random.default_rng(0).random(new.slices.shape).astype(np.float32) * 5
    a = sitk.GetArrayFromImage(V.to_input_grid(maps, new))
    b = sitk.GetArrayFromImage(old_to_input_grid(maps, old))
    assert a.dtype == np.float32 and a.shape == b.shape and (a != 0).sum() > 1000
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-5)
    # and the library's own resampling path (sheared directions) agrees too
    np.testing.assert_allclose(V.prepare_by_resampling(img, None, prep).slices, old.slices, rtol=0, atol=1e-6)


def test_given_mask_and_fine_in_plane_spacing():
    """An explicit mask, a 0.5 mm in-plane grid (strong anti-aliasing) and a 64-pixel 128 mm field of view."""
    img = make_phantom((300, 260, 40), (0.5, 0.55, 3.0), oblique_direction(10), (5.0, -3.0, 2.0), blob_index=(100, 140, 20))
    mask = sitk.Cast(sitk.BinaryThreshold(img, 0.5, 1e9), sitk.sitkUInt8) * 3  # labels > 0 count as brain
    for prep in (Preprocessing(), Preprocessing(fov_mm=128.0, image_size=64), Preprocessing(image_size=128)):
        assert_same_prepared(V.prepare(img, mask, prep), old_prepare(img, mask, prep))


def test_orientation_matches_dicomorient():
    for name in CASES:
        img = phantom(name, fov=(40, 50, 30))
        o = V._orientation(img)
        ref = sitk.DICOMOrient(img, "LPS")
        assert o.size == ref.GetSize() and np.allclose(o.spacing, ref.GetSpacing())
        assert np.allclose(o.direction.ravel(), ref.GetDirection()) and np.allclose(o.origin, ref.GetOrigin())
        view = V._lps_view(sitk.GetArrayFromImage(img), o)
        assert (view == sitk.GetArrayFromImage(ref)).all()


def test_sheared_direction_takes_the_resampling_path():
    img = make_phantom((60, 70, 40), (1.5, 1.5, 3.0))
    img.SetDirection((1.0, 0.2, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))  # not orthonormal
    assert V._orientation(img) is None
    new, old = V.prepare(img), old_prepare(img)
    assert_same_prepared(new, old)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(V.to_input_grid(new.slices, new)),
                                  sitk.GetArrayFromImage(old_to_input_grid(old.slices, old)))


def test_auto_mask_equals_itk_filters():
    """Holes, a separate small component, foreground touching the volume's faces, integer voxels."""
    rng = np.random.default_rng(3)
    for k in range(4):
        arr = np.zeros((40, 50, 60), np.float32)
        z, y, x = np.ogrid[:40, :50, :60]
        arr[((z - 20) / 18.0) ** 2 + ((y - 25) / (22 + 6 * k)) ** 2 + ((x - 30) / 26.0) ** 2 < 1] = 100
        arr[rng.random(arr.shape) < 0.08] = 0                         # pepper: closing and holes matter
        arr[18:23, 20:26, 25:33] = 0                                  # a cavity the closing does not close
        arr[2:5, 2:5, 2:5] = 100                                      # a second, smaller component
        if k % 2:
            arr[:, :, :4] = 100 * (rng.random((40, 50, 4)) < 0.7)     # touches the x faces (safe border)
            arr[0] = 100
        arr += rng.integers(0, 5, arr.shape)
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((1.0, 1.2, 2.0))
        fast = sitk.GetArrayFromImage(V.auto_mask(img))
        ref = sitk.GetArrayFromImage(auto_mask_itk(img))
        assert ref.sum() > 1000
        np.testing.assert_array_equal(fast, ref)
        marr, box = V._auto_mask(arr)  # and its bounding box, found with it
        np.testing.assert_array_equal(marr, ref > 0)
        assert box == V._box(ref > 0)


@pytest.mark.parametrize("name", list(CASES))
def test_mask_checks_equal_the_reoriented_computation(name):
    """Face coverage counted on the input's own axes (and inside the box) equals counting on the volume
    reoriented to LPS; the dark fraction with the fast percentile equals np.percentile's."""
    from vaeanomaly import brainmask as B
    for fov in ((150, 170, 120), (40, 50, 30)):
        img = phantom(name, fov=fov)
        m = sitk.Cast(img > 0.5, sitk.sitkUInt8)
        assert B.face_coverage(m) == old_face_coverage(m)
        cut = sitk.Image(m)  # cut off at some faces of the field of view
        size = m.GetSize()
        a = sitk.GetArrayFromImage(m)
        a[:, :, : size[0] // 2] = 0
        a[: size[2] // 3] = 0
        a[:, -size[1] // 4:] = 1
        cut = sitk.GetImageFromArray(a)
        cut.CopyInformation(m)
        ref = old_face_coverage(cut)
        assert B.face_coverage(cut) == ref and max(ref.values()) > 0.2
        marr = a > 0
        assert B.face_coverage(cut, marr, V._box(marr)) == ref
        assert B.dark_fraction(img, cut) == old_dark_fraction(img, cut)


def test_mask_checks_on_a_sheared_direction():
    from vaeanomaly import brainmask as B
    img = make_phantom((60, 70, 40), (1.5, 1.5, 3.0))
    img.SetDirection((1.0, 0.2, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    m = sitk.Cast(img > 0.5, sitk.sitkUInt8)
    assert B.face_coverage(m) == old_face_coverage(m)
    assert B.face_coverage(sitk.Image(m.GetSize(), sitk.sitkUInt8)) == {f: 0.0 for f, _, _ in B.FACES}


def test_percentile_equals_numpy():
    rng = np.random.default_rng(2)
    for t in range(30):
        n = int(rng.integers(300_000, 1_500_000))
        a = [rng.integers(0, 3000, n), rng.normal(size=n) * 100, rng.gamma(2, 50, n).round()][t % 3].astype(np.float32)
        q = [99.5, 99.0, 50.0, 0.5, 99.99][t % 5]
        assert V._percentile(a, q) == float(np.percentile(a, q))


def test_maps_through_the_network_equal_the_old_path(tiny_checkpoint):
    """score_volume (new path) against old prepare -> compute_maps -> old to_input_grid, a real trained model."""
    ck = load_checkpoint(tiny_checkpoint)
    img = phantom("oblique-flipped-aniso")
    names = ["rec-error", "rec-grad", "kl-grad"]
    flat = PredictorOptions(smooth_z_mm=0)  # (the old path had no smoothing across slices)
    new = V.score_volume(ck, img, None, names, flat)
    p = old_prepare(img, None, Preprocessing.from_dict(ck.preprocessing))
    maps = compute_maps(ck.model, p.slices, names, ck.beta, flat)
    for n in names:
        ref = sitk.GetArrayFromImage(old_to_input_grid(np.where(p.brain, maps[n], 0), p))
        got = sitk.GetArrayFromImage(new[n])
        assert ref.max() > 0
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(ref.max()))


@pytest.mark.slow
def test_sample_case_equals_the_old_path():
    """The bundled 240x240x155 sample with the default VAE (Rec-grad), automatic mask."""
    from vaeanomaly.checkpoint import DEFAULT_VAE, sample_data
    ck = load_checkpoint(DEFAULT_VAE)
    img = sitk.ReadImage(str(sample_data("VAEAnomalySample_T2.nrrd")))
    new, old = V.prepare(img), old_prepare(img)
    assert_same_prepared(new, old)
    flat = PredictorOptions(smooth_z_mm=0)  # (the old path had no smoothing across slices)
    m = compute_maps(ck.model, old.slices, ["rec-grad"], ck.beta, flat)["rec-grad"]
    got = sitk.GetArrayFromImage(V.score_volume(ck, img, None, ["rec-grad"], flat)["rec-grad"])
    ref = sitk.GetArrayFromImage(old_to_input_grid(np.where(old.brain, m, 0), old))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(ref.max()))


def test_projection_on_brain_slices_only_and_early_stop(random_model):
    """Brain slices only: the same values on them as projecting every slice (slices are independent), 0 on the
    others. Early stop: the plateau rule ends the projection before proj_steps; progress still reaches 1."""
    from vaeanomaly.predictors import PredictorOptions
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 64, 64)).astype(np.float32)
    brain = np.zeros(x.shape, bool)
    brain[[1, 2, 4], 20:40, 20:40] = True
    opts = PredictorOptions(proj_steps=15, batch_size=2)
    every = compute_maps(random_model, x, ["proj-rec-error"], options=opts)["proj-rec-error"]
    only = compute_maps(random_model, x, ["proj-rec-error"], options=opts, brain=brain)["proj-rec-error"]
    np.testing.assert_allclose(only[[1, 2, 4]], every[[1, 2, 4]], rtol=1e-5, atol=1e-6)
    assert (only[[0, 3, 5]] == 0).all() and (every[[0, 3, 5]] > 0).any()
    steps = []
    seen = []
    import vaeanomaly.predictors as P
    full = P._project(random_model, torch.as_tensor(x[:, None]), PredictorOptions(proj_steps=40), steps.append)
    early = []
    stopped = P._project(random_model, torch.as_tensor(x[:, None]), PredictorOptions(proj_steps=40, proj_tol=0.5),
                         early.append)
    assert steps == list(range(1, 41))
    assert early[-1] == 40 and len(early) - 1 < 40 and len(early) - 1 >= P.PLATEAU_WINDOW  # stopped early
    assert not np.allclose(full.numpy(), stopped.numpy())
    compute_maps(random_model, x, ["proj-rec-error"], options=PredictorOptions(proj_steps=40, proj_tol=0.5),
                 progress=seen.append, brain=brain)
    assert seen[-1] == pytest.approx(1.0)


# --------------------------------------------------------------------------- the fused pass on brain slices (issue 11)
def test_fused_maps_on_brain_slices_only(random_model):
    """With a brain mask, the fused maps are computed on the brain slices only: the same values there as
    computing every slice (up to float rounding), 0 on the others. Combi without constants normalises over all slices passed, so
    then every slice is computed (and the values equal the call without a mask)."""
    from vaeanomaly.ensemble import Ensemble
    rng = np.random.default_rng(4)
    x = rng.normal(size=(7, 64, 64)).astype(np.float32)
    brain = np.zeros(x.shape, bool)
    brain[[1, 2, 5], 10:50, 12:40] = True
    five = ["rec-error", "elbo-grad", "kl-grad", "rec-grad", "combi", "reconstruction"]
    flat = PredictorOptions(smooth_z_mm=0)  # per-slice maps (smoothing across slices mixes in the non-brain slices)
    every = compute_maps(random_model, x, five, 2.0, flat, combi_norm=(0.0, 0.05))
    only = compute_maps(random_model, x, five, 2.0, flat, combi_norm=(0.0, 0.05), brain=brain)
    for n in five:
        # (other slices in the batch: float rounding of the convolutions may differ in the last bit)
        np.testing.assert_allclose(only[n][[1, 2, 5]], every[n][[1, 2, 5]], rtol=1e-5, atol=1e-6)
        assert (only[n][[0, 3, 4, 6]] == 0).all() and (every[n][[0, 3, 4, 6]] != 0).any()
    no_norm = compute_maps(random_model, x, ["combi", "rec-grad"], 2.0, flat, brain=brain)
    ref = compute_maps(random_model, x, ["combi", "rec-grad"], 2.0, flat)
    for n in ("combi", "rec-grad"):
        np.testing.assert_array_equal(no_norm[n], ref[n])
    ens = Ensemble(features=("rec-grad", "rec-error"), coef=[1.0, 0.5], intercept=-1.0, mean=[0, 0], scale=[1, 1],
                   options={"smooth": True, "smooth_sigma": 3.0, "smooth_kernel": 7})
    a = compute_maps(random_model, x, ["ensemble"], 2.0, ensemble=ens)["ensemble"]
    b = compute_maps(random_model, x, ["ensemble"], 2.0, ensemble=ens, brain=brain)["ensemble"]
    np.testing.assert_allclose(b[[1, 2, 5]], a[[1, 2, 5]], rtol=1e-5, atol=1e-6)
    assert (b[[0, 3, 4, 6]] == 0).all()
    none = compute_maps(random_model, x, ["rec-grad", "proj-rec-error"], 2.0, brain=np.zeros(x.shape, bool),
                        options=__import__("vaeanomaly.predictors").predictors.PredictorOptions(proj_steps=2))
    assert all((v == 0).all() and v.shape == x.shape for v in none.values())
