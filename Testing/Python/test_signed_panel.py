"""Bright and dark apart in the panel (issue 24, item 2, app side): "Bright and dark apart" scores a signed map with
its sign (polarity 'signed') where the model records per-tail thresholds, shows it in a diverging colour map centred
on 0, previews both tails, writes two segments ('Brighter than expected' = label 1, 'Darker than expected' = label 2
of `score --label`) and lists findings with their direction. A model without per-tail thresholds (a VAE) disables
it and ignores it with a note; left unticked (the default) nothing changes.

Headless on a real vtkMRMLScene (slicer-core), through PanelController and the real warm worker, with the bundled
dae-64 (its per-tail thresholds are recorded) on the bundled sample with a dark blob painted in."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from test_controller import ScriptedUser, run_to_end  # noqa: E402
from test_logic import add_label, add_volume  # noqa: E402
from VAEAnomalyLib.controller import (FINDINGS_HEADER, SIGNED_FINDINGS_HEADER, PanelController,  # noqa: E402
                                      PanelParams)
from VAEAnomalyLib.logic import (DIVERGING_OF, HEAT_TABLE_NAME, SIGNED_TERMINOLOGY, TERMINOLOGY_ENTRY,  # noqa: E402
                                 image_from_node, is_signed, tails_of)
from VAEAnomalyLib.panel import ABSOLUTE, CALIBRATED  # noqa: E402
from vaeanomaly.checkpoint import DEFAULT_VAE, load_checkpoint  # noqa: E402
from vaeanomaly.dicom_out import DIRECTION_MODIFIERS  # noqa: E402
from vaeanomaly.predictors import PredictorOptions  # noqa: E402
from vaeanomaly.regions import DEFAULT_MIN_REGION_MM3, signed_label  # noqa: E402
from vaeanomaly.threshold import Tails  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[2] / "VAEAnomaly" / "Resources" / "SampleData" / "VAEAnomalySample_T2.nrrd"
MODEL = "dae-64"
NO_TAILS = "bvae-l64-b10"  # a bundled paper-grid VAE calibrated before per-tail thresholds existed
BRIGHTER, DARKER = "Brighter than expected", "Darker than expected"


@pytest.fixture(scope="module")
def sample():
    """The bundled sample (a bright tumour-like lesion) at 2 mm, with a dark blob (10 mm radius, 35% intensity)."""
    img = sitk.Shrink(sitk.ReadImage(str(SAMPLE)), (2, 2, 2))
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    z, y, x = np.indices(arr.shape)
    c = np.array(arr.shape) // 2 + np.array([4, 12, -14])
    sp = img.GetSpacing()
    blob = ((z - c[0]) * sp[2]) ** 2 + ((y - c[1]) * sp[1]) ** 2 + ((x - c[2]) * sp[0]) ** 2 < 10 ** 2
    arr[blob] *= 0.35
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    return out, blob


def panel(scene, img, **params):
    t2 = add_volume(scene, img, "T2")
    user = ScriptedUser()
    p = PanelParams(inputVolume=t2, **params)
    ctl = PanelController(scene, p, user)
    ctl.set_params(p)
    return ctl, p, t2, user


def voxels(node):
    return sitk.GetArrayFromImage(image_from_node(node)).copy()


def shown_alpha(heat):
    """The alpha of each voxel as the slice views draw the heatmap: the display node's own pipeline
    (vtkMRMLScalarVolumeDisplayNode: window/level, colour table, threshold), run headless."""
    from vtk.util.numpy_support import vtk_to_numpy
    alg = heat.GetDisplayNode().GetOutputImageDataConnection().GetProducer()
    alg.Update()
    rgba = vtk_to_numpy(alg.GetOutputDataObject(0).GetPointData().GetScalars())
    return rgba[:, 3].reshape(heat.GetImageData().GetDimensions()[::-1])


def test_bright_and_dark_apart(scene, sample, tmp_path):
    img, blob = sample
    ctl, p, t2, user = panel(scene, img, model=MODEL, signedHeatmap=True)
    before = voxels(t2)
    st = ctl.state()
    assert st.signed_enabled and "brighter" in st.signed_tooltip
    assert ctl.apply(), (ctl.status, user.shown)
    assert "bright and dark apart" in ctl.status
    run_to_end(ctl)
    assert ctl.status.startswith("Done") and "Bright and dark apart" in ctl.status, (ctl.status, user.shown)
    heat = p.heatmap
    assert is_signed(heat) and "signed" in heat.GetAttribute("VAEAnomaly.Options")
    arr = ctl.logic.heatmap_array(heat)
    assert arr.min() < 0 < arr.max()  # the sign kept: darker and brighter than expected
    assert np.array_equal(voxels(t2), before)  # the input is never modified
    # the checkpoint's per-tail thresholds: the calibrated threshold is the pair; the slider shows the larger
    ck = load_checkpoint(MODEL)
    from vaeanomaly.calibration import calibrated_tails, region_peak
    opts = PredictorOptions(polarity="signed")
    tails = calibrated_tails(ck, "dae-residual", opts)
    want = Tails(tails["bright"]["threshold"], tails["dark"]["threshold"])
    assert tails_of(heat) == want and p.thresholdMode == CALIBRATED
    assert ctl.current_threshold() == want and p.threshold == pytest.approx(max(want.bright, want.dark))
    st = ctl.state()
    assert st.signed_shown and st.threshold_maximum == pytest.approx(float(np.abs(arr).max()))
    # a diverging colour table of its own, centred on 0: blue darker, near white as expected, red brighter
    disp = heat.GetDisplayNode()
    table = scene.GetNodeByID(disp.GetColorNodeID())
    assert table.GetAttribute(DIVERGING_OF) == heat.GetID()
    assert disp.GetWindowLevelMin() == pytest.approx(-disp.GetWindowLevelMax()) and disp.GetWindowLevelMax() > 0
    rgba = [0.0] * 4
    table.GetColor(0, rgba)
    assert rgba[2] > 2 * rgba[0]
    table.GetColor(255, rgba)
    assert rgba[0] > 2 * rgba[2]
    table.GetColor(128, rgba)
    assert min(rgba[:3]) > 0.85
    # the preview shows both tails (what the slice views draw): every voxel beyond a tail, nothing well inside
    alpha = shown_alpha(heat)
    assert (alpha[(arr > want.bright) | (arr < -want.dark)] == 255).all()
    inside = np.abs(arr) < 0.8 * min(want.bright, want.dark)
    assert inside.any() and (alpha[inside] == 0).all()
    # Create segment: two segments, the voxels of `score --label`'s 1 and 2 (regions.signed_label)
    peaks = region_peak(ck, "dae-residual", opts)
    label, _ = signed_label(arr, want, heat.GetSpacing(), DEFAULT_MIN_REGION_MM3, peaks)
    assert (label == 1).any() and (label[blob] == 2).any()  # the dark blob is found darker than expected
    assert ctl.create_segment(), (ctl.status, user.shown)
    assert BRIGHTER in ctl.status and DARKER in ctl.status
    seg = p.segmentation
    segmentation = seg.GetSegmentation()
    assert not segmentation.GetSegmentIdBySegmentName("Anomaly")
    terms = slicer.vtkSlicerTerminologiesModuleLogic()
    for name, value, side in ((BRIGHTER, 1, "bright"), (DARKER, 2, "dark")):
        sid = segmentation.GetSegmentIdBySegmentName(name)
        assert np.array_equal(ctl.logic._segment_array(seg, sid, t2), label == value), name
        entry_text = segmentation.GetSegment(sid).GetTerminology()
        assert entry_text == SIGNED_TERMINOLOGY[side] and entry_text != TERMINOLOGY_ENTRY
        entry = slicer.vtkSlicerTerminologyEntry()
        assert terms.DeserializeTerminologyEntry(entry_text, entry)  # Slicer's own reader of the tag
        modifier = entry.GetTypeModifierObject()
        assert (modifier.GetCodeValue(), modifier.GetCodingSchemeDesignator(), modifier.GetCodeMeaning()) == \
            DIRECTION_MODIFIERS[side]
        assert entry.GetTypeObject().GetCodeMeaning() == "Mass" and entry.GetRegionObject().GetCodeMeaning() == "Brain"
    # findings with their direction; the table's direction column; the same voxels as the segments
    assert ctl.refresh_findings()
    st = ctl.state()
    assert st.findings_header == SIGNED_FINDINGS_HEADER
    directions = {f["direction"] for f in ctl.findings}
    assert directions == {"brighter than expected", "darker than expected"}
    assert [r[1] for r in st.findings_rows] == [f["direction"] for f in ctl.findings]
    assert "brighter than +" in st.findings_text and "darker than -" in st.findings_text
    for direction, value in (("brighter than expected", 1), ("darker than expected", 2)):
        assert sum(f["voxels"] for f in ctl.findings if f["direction"] == direction) == int((label == value).sum())
    table_node, _ = ctl.logic.findings_nodes(heat)
    col = table_node.GetTable().GetColumnByName("direction")
    assert [col.GetValue(i) for i in range(col.GetNumberOfValues())] == [f["direction"] for f in ctl.findings]
    # the report: the threshold's source per tail, each finding's direction
    assert ctl.write_report(str(tmp_path / "r.html")), ctl.status
    html = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "calibrated per tail" in html and "darker than expected" in html and "brighter than expected" in html
    # an edited direction segment is kept unless the user confirms; the other is not touched either
    sid = segmentation.GetSegmentIdBySegmentName(DARKER)
    edited = (label == 2).astype(np.uint8)
    edited[2, 4:8, 4:8] = 1
    lab = add_label(scene, edited, image_from_node(t2))
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(sid)
    slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(lab, seg, ids)
    scene.RemoveNode(lab)
    bright_before = ctl.logic._segment_array(seg, segmentation.GetSegmentIdBySegmentName(BRIGHTER), t2)
    # the slider: one threshold on |value| for both directions (the status says so)
    t = 0.8 * min(want.bright, want.dark)
    ctl.set_threshold(t)
    assert p.thresholdMode == ABSOLUTE and ctl.current_threshold() == Tails(t, t) and "|value|" in ctl.status
    alpha = shown_alpha(heat)
    assert (alpha[np.abs(arr) > t] == 255).all() and (alpha[np.abs(arr) < 0.9 * t] == 0).all()
    assert not ctl.create_segment() and "Kept" in ctl.status and user.kinds()[-1] == "confirm"
    assert ctl.logic._segment_array(seg, sid, t2).sum() == edited.sum()
    assert np.array_equal(ctl.logic._segment_array(seg, segmentation.GetSegmentIdBySegmentName(BRIGHTER), t2),
                          bright_before)
    user.answers = [True]
    assert ctl.create_segment()
    lower, _ = signed_label(arr, Tails(t, t), heat.GetSpacing(), DEFAULT_MIN_REGION_MM3, None)
    for name, value in ((BRIGHTER, 1), (DARKER, 2)):
        got = ctl.logic._segment_array(seg, segmentation.GetSegmentIdBySegmentName(name), t2)
        assert np.array_equal(got, lower == value), name
    assert "(on |value|, both tails)" in ctl.threshold_source()


def test_models_without_tails_disable_it_and_ignore_it(scene, sample):
    img, _ = sample
    ctl, p, t2, user = panel(scene, img, model=MODEL, signedHeatmap=True)
    p.predictor = "rec-error"  # the DAE's unsigned map
    ok, why = ctl.signed_available()
    assert not ok and not ctl.state().signed_enabled and "no sign" in why
    ctl.select_model(DEFAULT_VAE)  # the default VAE, recalibrated with training/calibrate.py: Rec-grad has its tails
    p.predictor = "rec-grad"
    assert ctl.signed_available()[0]
    ctl.select_model(NO_TAILS)  # a VAE calibrated before per-tail thresholds existed
    p.predictor = "rec-grad"  # its default, a signed map
    ok, why = ctl.signed_available()
    assert not ok and "no per-tail thresholds" in why and ctl.state().signed_tooltip == why
    assert ctl.apply(), (ctl.status, user.shown)
    run_to_end(ctl)
    assert ctl.status.startswith("Done") and "Bright and dark apart ignored" in ctl.status, ctl.status
    heat = p.heatmap
    assert not is_signed(heat) and ctl.logic.heatmap_array(heat).min() >= 0  # |value|, as before
    assert ctl.state().findings_header == FINDINGS_HEADER


def test_unticked_is_unchanged(scene, sample):
    img, _ = sample
    ctl, p, t2, user = panel(scene, img, model=MODEL)
    assert p.signedHeatmap is False and PanelParams().signedHeatmap is False
    assert ctl.apply(), (ctl.status, user.shown)
    run_to_end(ctl)
    assert ctl.status == "Done." or ctl.status.startswith("Done, with warnings"), ctl.status
    heat = p.heatmap
    arr = ctl.logic.heatmap_array(heat)
    assert not is_signed(heat) and arr.min() >= 0 and tails_of(heat) is None
    assert scene.GetNodeByID(heat.GetDisplayNode().GetColorNodeID()).GetName() == HEAT_TABLE_NAME
    assert heat.GetDisplayNode().GetWindowLevelMin() == 0.0 and heat.GetDisplayNode().GetApplyThreshold()
    assert ctl.create_segment()
    segmentation = p.segmentation.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1 and segmentation.GetSegmentIdBySegmentName("Anomaly")
    assert segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("Anomaly")).GetTerminology() == \
        TERMINOLOGY_ENTRY
    assert ctl.refresh_findings()
    st = ctl.state()
    assert st.findings_header == FINDINGS_HEADER and not st.signed_shown
    assert all(len(r) == len(FINDINGS_HEADER) for r in st.findings_rows)
    assert all(f["direction"] is None for f in ctl.findings)


def test_web_page_has_the_check_box_and_the_direction_column(sample, tmp_path):
    """The web page (its app object on its own scene, no server or browser): the check box reaches the parameter,
    is disabled for a model without per-tail thresholds, and a signed heatmap's findings show their direction."""
    from VAEAnomalyLib.web import web_available
    ok, why = web_available()
    if not ok:
        pytest.skip(f"web viewer not installed: {why}")
    from VAEAnomalyLib.web.app import VAEAnomalyWebApp
    img, _ = sample
    path = tmp_path / "t2.nrrd"
    sitk.WriteImage(img, str(path))
    app = VAEAnomalyWebApp([str(path)])
    try:
        app.on_model(NO_TAILS)
        assert not app.state.signed_enabled and "no per-tail thresholds" in app.state.signed_tooltip
        app.on_model(MODEL)
        app.on_predictor("dae-residual")
        assert app.state.signed_enabled and not app.state.signed_heatmap
        app.on_signed(True)
        assert app.params.signedHeatmap and app.state.signed_heatmap
        assert app.controller.apply(), app.dialogs.shown
        run_to_end(app.controller)
        app.render()
        assert app.state.signed_shown and app.state.findings_header == list(SIGNED_FINDINGS_HEADER)
        assert {r[1] for r in app.state.findings_rows} <= {"brighter than expected", "darker than expected"}
        assert app.state.findings_rows and app.state.legend_min == pytest.approx(-app.state.legend_max)
    finally:
        app.controller.close()
        app.tmp.cleanup()


def test_verdict_counts_both_tails_of_a_signed_map():
    """The verdict's 'x% of the brain flagged' (the panel's verdict line) of a signed map counts both tails against
    the threshold of |value| it was calibrated with, as for the same map scored as |value|."""
    from vaeanomaly.verdict import assess_slices
    ck = load_checkpoint(MODEL)
    t = float(ck.thresholds["dae-residual"])
    rng = np.random.default_rng(0)
    slices = rng.normal(size=(4, 64, 64)).astype(np.float32)
    brain = np.ones(slices.shape, bool)
    s = np.zeros(slices.shape, np.float32)
    s[0], s[1] = 2 * t, -2 * t  # a quarter of the brain brighter, a quarter darker than expected
    maps = {"rec-error": np.abs(rng.normal(size=slices.shape)).astype(np.float32), "dae-residual": s}
    signed = assess_slices(ck, slices, brain, "dae-residual", PredictorOptions(polarity="signed"), maps=maps)
    assert signed["flagged_percent"] == pytest.approx(50.0)
    both = assess_slices(ck, slices, brain, "dae-residual", PredictorOptions(), maps={**maps, "dae-residual": np.abs(s)})
    assert both["flagged_percent"] == pytest.approx(50.0)
