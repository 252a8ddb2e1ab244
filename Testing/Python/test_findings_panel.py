"""Findings in the panel (issue 18): the Logic writes a table and a point list per heatmap, the controller keeps
them in step with the threshold (debounced), centres the slice views on a finding and writes the HTML report.
Headless on a real vtkMRMLScene (slicer-core), with a heatmap whose regions are known voxel by voxel."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from conftest import make_phantom, oblique_direction  # noqa: E402
from test_controller import ScriptedUser  # noqa: E402
from test_logic import add_volume  # noqa: E402
from VAEAnomalyLib.controller import PanelController, PanelParams  # noqa: E402
from VAEAnomalyLib.logic import (FINDINGS_OF, JobResult, VAEAnomalyLogic, image_from_node,  # noqa: E402
                                 set_node_from_image)
from VAEAnomalyLib.panel import ABSOLUTE, CALIBRATED  # noqa: E402
from vaeanomaly.registry import DEFAULT_PREDICTOR  # noqa: E402

GEOMETRY = dict(size=(40, 36, 20), spacing=(1.5, 1.5, 2.0), direction=oblique_direction(20), origin=(12.0, -30.0, 5.0))
VOXEL_MM3 = 1.5 * 1.5 * 2.0
# (z, y, x) slices of the heatmap array: a large strong region, a smaller weaker one, one voxel (under 30 mm3)
BIG = (slice(6, 11), slice(8, 16), slice(8, 16))      # 320 voxels, 1.44 ml, score 1.0
SMALL = (slice(12, 15), slice(24, 28), slice(26, 30))  # 48 voxels, 0.216 ml, score 0.8
SPECK = (3, 30, 5)                                     # 1 voxel, score 0.9


def heat_array():
    a = np.zeros(GEOMETRY["size"][::-1], np.float32)
    a[2:18, 2:34, 2:38] = 0.1  # the brain
    a[BIG], a[SMALL], a[SPECK] = 1.0, 0.8, 0.9
    return a


def ijk_centroid_ras(node, region):
    """The region's centroid in RAS through the node's own IJK-to-RAS matrix (independent of any LPS step)."""
    kji = np.argwhere(np.ones([s.stop - s.start for s in region], bool)) + [s.start for s in region]
    ijk = kji.mean(0)[::-1]
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array(m.MultiplyPoint([*ijk, 1.0])[:3])


@pytest.fixture
def case(scene):
    """An input volume under a linear transform and a heatmap of this module on its grid, under the same."""
    logic = VAEAnomalyLogic(scene)
    img = make_phantom(**GEOMETRY)
    t2 = add_volume(scene, img)
    tf = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(tf)
    m = vtk.vtkMatrix4x4()
    for r, v in enumerate((10.0, -5.0, 7.0)):
        m.SetElement(r, 3, v)
    tf.SetMatrixTransformToParent(m)
    t2.SetAndObserveTransformNodeID(tf.GetID())
    h = sitk.GetImageFromArray(heat_array())
    h.CopyInformation(img)
    heat = slicer.vtkMRMLScalarVolumeNode()
    heat.SetName("T2 anomaly")
    scene.AddNode(heat)
    set_node_from_image(heat, h)
    heat.SetAndObserveTransformNodeID(t2.GetTransformNodeID())  # as add_results does
    heat.SetAttribute("VAEAnomaly.Predictor", DEFAULT_PREDICTOR)
    heat.SetAttribute("VAEAnomaly.Input", t2.GetID())
    logic._display_heatmap(heat)
    return logic, t2, heat, tf


def points_of(markups):
    return [(markups.GetNthControlPointLabel(i), np.array(markups.GetNthControlPointPositionVector(i)))
            for i in range(markups.GetNumberOfControlPoints())]


def column(table, title):
    c = table.GetColumnIndex(title)
    assert c >= 0, title
    return [table.GetCellText(r, c) for r in range(table.GetNumberOfRows())]


def test_logic_writes_table_and_points_in_ras_under_the_inputs_transform(case, scene):
    logic, t2, heat, tf = case
    before = sitk.GetArrayFromImage(image_from_node(t2)).copy()
    table, markups, found = logic.update_findings(heat, 0.5, t2)
    assert [f["id"] for f in found] == ["A1", "A2"]  # the one-voxel region is under the default 30 mm3
    assert found[0]["voxels"] == 320 and found[1]["voxels"] == 48
    assert found[0]["volume_ml"] == pytest.approx(320 * VOXEL_MM3 / 1000)
    assert found[0]["mean_intensity_z"] is not None  # the input gave the intensities
    # one row per finding, centroid columns in RAS
    assert table.GetNumberOfRows() == 2 and table.GetAttribute(FINDINGS_OF) == heat.GetID()
    assert column(table, "id") == ["A1", "A2"]
    assert float(column(table, "volume (ml)")[0]) == pytest.approx(1.44)
    assert float(column(table, "peak")[1]) == pytest.approx(0.8)
    ras_cols = [[float(v) for v in column(table, f"centroid {a} (RAS mm)")] for a in "RAS"]
    # the point list: one point per finding, labelled, at the centroid in RAS = LPS with x and y negated
    pts = points_of(markups)
    assert [lab for lab, _ in pts] == ["A1 1.4 ml", "A2 0.22 ml"]
    for k, (f, region) in enumerate(zip(found, (BIG, SMALL))):
        x, y, z = f["centroid_lps_mm"]
        assert pts[k][1] == pytest.approx([-x, -y, z], abs=1e-6)
        assert pts[k][1] == pytest.approx(ijk_centroid_ras(heat, region), abs=0.01)
        assert [c[k] for c in ras_cols] == pytest.approx(pts[k][1], abs=1e-6)
    assert int(column(table, "first slice")[0]) == 6 and int(column(table, "last slice")[0]) == 10
    # under the input's parent transform: in the world the points sit where the transformed input shows them
    assert markups.GetTransformNodeID() == tf.GetID()
    world = np.array(markups.GetNthControlPointPositionWorld(0))
    assert world == pytest.approx(pts[0][1] + [10.0, -5.0, 7.0], abs=1e-6)
    assert np.array_equal(sitk.GetArrayFromImage(image_from_node(t2)), before)  # input untouched
    assert t2.GetTransformNodeID() == tf.GetID()


def test_nodes_are_reused_and_an_empty_result_is_empty_nodes(case, scene):
    logic, t2, heat, _ = case
    table, markups, _ = logic.update_findings(heat, 0.5, t2)
    n_nodes = scene.GetNumberOfNodes()
    table2, markups2, found = logic.update_findings(heat, 0.85, t2)  # only the strong region is above
    assert (table2, markups2) == (table, markups)
    assert scene.GetNumberOfNodes() == n_nodes
    assert [f["id"] for f in found] == ["A1"] and table.GetNumberOfRows() == 1
    assert [lab for lab, _ in points_of(markups)] == ["A1 1.4 ml"]
    # nothing above: a valid empty table (its columns kept) and an empty point list, no error
    table3, markups3, found = logic.update_findings(heat, 5.0, t2)
    assert found == [] and (table3, markups3) == (table, markups)
    assert table.GetNumberOfRows() == 0 and table.GetColumnIndex("centroid R (RAS mm)") >= 0
    assert markups.GetNumberOfControlPoints() == 0
    # a smaller minimum region keeps the one-voxel region; another heatmap gets its own nodes
    _, _, found = logic.update_findings(heat, 0.5, t2, min_region_mm3=0)
    assert len(found) == 3 and found[2]["voxels"] == 1
    other = slicer.vtkMRMLScalarVolumeNode()
    scene.AddNode(other)
    set_node_from_image(other, image_from_node(heat, "heatmap"))
    table4, markups4, _ = logic.update_findings(other, 0.5)
    assert table4 is not table and markups4 is not markups
    assert logic.findings_nodes(heat) == (table, markups)
    assert markups4.GetTransformNodeID() is None  # a heatmap under no transform


def test_the_table_is_saved_with_the_scene(case, scene, tmp_path):
    logic, t2, heat, _ = case
    table, _, _ = logic.update_findings(heat, 0.5, t2)
    assert table.AddDefaultStorageNode()
    path = tmp_path / "findings.tsv"
    table.GetStorageNode().SetFileName(str(path))
    assert table.GetStorageNode().WriteData(table)
    text = path.read_text()
    assert "centroid R (RAS mm)" in text and "A2" in text


def controller_for(scene, t2, heat, dialogs=None, **kw):
    params = PanelParams(inputVolume=t2, heatmap=heat, **kw)
    ctl = PanelController(scene, None, dialogs or ScriptedUser())
    ctl.set_params(params)
    return ctl


def test_controller_updates_findings_after_the_threshold_settles(case, scene):
    logic, t2, heat, tf = case
    ctl = controller_for(scene, t2, heat, thresholdMode=ABSOLUTE, threshold=0.5)
    assert ctl.findings == [] and ctl.state().findings_rows == []
    for v in (0.3, 0.4, 0.5):  # dragging: the preview follows, the findings wait for the debounce
        ctl.set_threshold(v)
    assert ctl.findings_pending and ctl.state().findings_pending and ctl.findings == []
    assert logic.findings_nodes(heat) == (None, None)
    assert ctl.refresh_findings()
    s = ctl.state()
    assert not s.findings_pending
    assert [r[0] for r in s.findings_rows] == ["A1", "A2"] and s.findings_text.startswith("2 findings above 0.5")
    assert s.findings_rows[0][1] == "1.44"
    table, markups = logic.findings_nodes(heat)
    assert markups.GetNumberOfControlPoints() == 2 and markups.GetTransformNodeID() == tf.GetID()
    ctl.set_threshold(0.85)
    ctl.refresh_findings()
    assert [r[0] for r in ctl.state().findings_rows] == ["A1"]
    assert logic.findings_nodes(heat) == (table, markups) and markups.GetNumberOfControlPoints() == 1
    ctl.set_threshold(0.99)
    ctl.set_threshold(1.5)
    ctl.refresh_findings()
    s = ctl.state()
    assert s.findings_rows == [] and s.findings_text.startswith("0 findings")
    assert table.GetNumberOfRows() == 0 and markups.GetNumberOfControlPoints() == 0


def test_a_finished_job_lists_its_findings_at_once(case, scene):
    _, t2, heat, _ = case
    ctl = controller_for(scene, t2, None, thresholdMode=CALIBRATED)
    ctl._display(JobResult(heat, calibrated=0.5))  # what poll() does with a finished job's result
    assert ctl.params.threshold == 0.5 and not ctl.findings_pending
    assert [f["id"] for f in ctl.findings] == ["A1", "A2"]
    scene.InvokeEvent(scene.StartCloseEvent)
    assert ctl.findings == [] and ctl.state().findings_rows == []


def test_jump_to_finding_centres_the_slice_views_in_world_coordinates(case, scene):
    _, t2, heat, _ = case
    ctl = controller_for(scene, t2, heat, thresholdMode=ABSOLUTE, threshold=0.5)
    ctl.refresh_findings()
    assert not ctl.jump_to_finding(0) and "No slice view" in ctl.status  # no layout: nothing to move, no error
    # vtkMRMLSliceNode::JumpAllSlices moves every vtkMRMLSliceNode of the scene (Libs/MRML/Core/vtkMRMLSliceNode.cxx)
    red = slicer.vtkMRMLSliceNode()
    red.SetName("Red")
    red.SetLayoutName("Red")
    scene.AddNode(red)
    assert red.GetSliceOffset() == 0.0
    assert ctl.jump_to_finding(1) and "A2" in ctl.status
    want = np.array(ctl.findings[1]["centroid_ras_mm"]) + [10.0, -5.0, 7.0]  # through the input's transform
    m = red.GetSliceToRAS()
    assert [m.GetElement(r, 3) for r in range(3)] == pytest.approx(want, abs=1e-6)
    assert red.GetSliceOffset() == pytest.approx(want[2], abs=1e-6)
    assert not ctl.jump_to_finding(5) and ctl.status == "No such finding."


def test_write_report_names_the_findings_and_the_threshold_source(case, scene, tmp_path):
    _, t2, heat, _ = case
    pytest.importorskip("matplotlib")
    user = ScriptedUser()
    ctl = controller_for(scene, t2, heat, user, thresholdMode=ABSOLUTE, threshold=0.5)
    heat.SetAttribute("VAEAnomaly.ModelLine", "tiny: VAE l=8 β=1")
    path = tmp_path / "report.html"
    assert ctl.write_report(str(path)), user.shown
    text = path.read_text(encoding="utf-8")
    assert "<td>A1</td>" in text and "<td>A2</td>" in text and "<td>A3</td>" not in text
    assert "absolute: a number given by the user" in text and "tiny: VAE l=8 β=1" in text and "threshold 0.5" in text
    assert "No out-of-distribution check" in text  # no job's verdict belongs to this heatmap
    assert str(path) in ctl.status
    # the verdict of the job that computed this heatmap goes in
    ctl.verdict, ctl._verdict_for = {"in_distribution": False, "fit": 3.2, "flagged_percent": 9.0,
                                     "warnings": ["scan unlike training"]}, heat.GetID()
    assert ctl.write_report(str(path))
    assert "Out of distribution" in path.read_text(encoding="utf-8")
    # a name typed without .html: the suffix is added (test_panel_events.py: the report's file name)
    assert ctl.write_report(str(tmp_path / "report.pdf"))
    assert (tmp_path / "report.pdf.html").is_file() and not (tmp_path / "report.pdf").exists()
    assert "error" not in user.kinds()


def test_a_saved_scenes_heatmap_gets_its_findings_and_the_report_a_file_name(case, scene):
    _, t2, heat, _ = case
    ctl = controller_for(scene, t2, heat, thresholdMode=ABSOLUTE, threshold=0.5)
    assert ctl.findings_pending  # the Widget starts its debounce timer after set_params
    assert ctl.report_file_name() == "T2_anomaly_report.html"
    ctl.set_params(None)
    assert not ctl.findings_pending and ctl.findings == [] and not ctl.refresh_findings()
    assert not ctl.write_report("x.html")  # no parameters, no heatmap: refused, not raised


def test_the_widget_wires_the_findings_table_and_the_report_button():
    """The Widget only wires (VAEAnomaly.py imports qt, so it is read as text): a click on a row jumps, the
    button writes the report, the threshold handlers restart the single-shot findings timer."""
    from conftest import ROOT
    src = (ROOT / "VAEAnomaly" / "VAEAnomaly.py").read_text(encoding="utf-8")
    assert 'findingsTable.connect("cellClicked(int,int)"' in src and "self.controller.jump_to_finding, row" in src
    assert 'saveReportButton.connect("clicked(bool)", self.onSaveReport)' in src
    assert "self._call(self.controller.write_report, path)" in src
    assert "self._findingsTimer.setSingleShot(True)" in src
    assert "self._findingsTimer.connect(\"timeout()\", lambda: self._call(self.controller.refresh_findings))" in src
    for handler in ("set_threshold, v", "set_threshold_mode,", "heatmap_selected, node"):
        assert f"self._thresholdCall(self.controller.{handler}" in src, handler
