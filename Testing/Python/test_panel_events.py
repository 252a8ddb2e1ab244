"""Panel defects of issue 25 (item 3), each replayed in Slicer's own order of events, headless on a real vtkMRMLScene
(slicer-core): the heatmap selector against the parameter-node binding, the findings point list against the Markups
logic's active list, a findings-table click during the debounce, masks under another transform or with hidden
segments, and the report's file name."""
from __future__ import annotations

import ast

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from conftest import make_phantom  # noqa: E402
from test_controller import ScriptedUser  # noqa: E402
from test_findings_panel import case, controller_for, heat_array  # noqa: E402,F401  (case: a fixture)
from test_logic import add_volume  # noqa: E402
from VAEAnomalyLib.controller import PanelController, PanelParams  # noqa: E402
from VAEAnomalyLib.logic import (VAEAnomalyLogic, calibration_of, image_from_node, set_node_from_image,  # noqa: E402
                                 store_calibration)
from VAEAnomalyLib.panel import ABSOLUTE, CALIBRATED  # noqa: E402
from vaeanomaly.registry import DEFAULT_PREDICTOR  # noqa: E402
from vaeanomaly.volume import VolumeError  # noqa: E402

NODE_PARAMETERS = ("inputVolume", "brainMask", "heatmap", "segmentation")


# ----------------------------------------------------------------------------- Slicer's binding, replayed
class WrappedParameterNode:
    """The panel's parameters on a real vtkMRMLScriptedModuleNode, written as Slicer's parameterNodeWrapper writes
    them (Base/Python/slicer/parameterNodeWrapper/serializers.py: NodeSerializer.write = SetParameter(name, "") +
    SetNodeReferenceID; the others SetParameter(name, str(value))). Each write that changes something fires the
    node's ModifiedEvent at once (vtkMRMLScriptedModuleNode::SetParameter), as in Slicer."""

    def __init__(self, scene, **values):
        node = slicer.vtkMRMLScriptedModuleNode()
        scene.AddNode(node)
        object.__setattr__(self, "node", node)
        for name, value in {**PanelParams().__dict__, **values}.items():
            setattr(self, name, value)

    def __setattr__(self, name, value):
        if name in NODE_PARAMETERS:
            self.node.SetParameter(name, "")
            self.node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
        else:
            self.node.SetParameter(name, repr(value))

    def __getattr__(self, name):
        if name in NODE_PARAMETERS:
            return self.node.GetNodeReference(name)
        return ast.literal_eval(self.node.GetParameter(name))


class NodeComboBox:
    """The part of qMRMLNodeComboBox the binding uses (Libs/MRML/Widgets/qMRMLNodeComboBox.cxx): setCurrentNode
    changes the current item; currentNodeChanged(node) is emitted (QComboBox::currentTextChanged ->
    emitCurrentNodeChanged) only when the current node changed, to the slots in the order they were connected.
    (Qt widgets cannot run here.)"""

    def __init__(self):
        self._node, self._slots = None, []

    def connect(self, slot):
        self._slots.append(slot)

    def disconnect(self, slot):
        self._slots.remove(slot)

    def currentNode(self):
        return self._node

    def setCurrentNode(self, node):
        if (self._node.GetID() if self._node else None) == (node.GetID() if node else None):
            return
        self._node = node
        for slot in list(self._slots):
            slot(node)


def connect_gui(params: WrappedParameterNode, name: str, combo: NodeComboBox):
    """wrapper.py _connectParametersToGui for one qMRMLNodeComboBoxToNodeConnector: write the parameter into the
    widget, then widget -> parameter (skipped while the wrapper itself updates the GUI), and on every ModifiedEvent
    of the parameter node every bound widget gets its parameter written back (_updateGUIFromParameterNode)."""
    updating = [False]

    def gui_to_param(_node):  # _makeGuiToParamCallback: the connector's read() is the combo's current node
        if not updating[0]:
            setattr(params, name, combo.currentNode())

    def param_to_gui(caller, event):
        if updating[0]:
            return
        updating[0] = True
        try:
            combo.setCurrentNode(getattr(params, name))
        finally:
            updating[0] = False

    combo.setCurrentNode(getattr(params, name))
    combo.connect(gui_to_param)
    return params.node.AddObserver(vtk.vtkCommand.ModifiedEvent, param_to_gui)


def our_heatmap(scene, like, name, calibrated):
    """A heatmap of this module on `like`'s grid, with the calibrated threshold add_results stores on it."""
    h = sitk.GetImageFromArray(heat_array())
    h.CopyInformation(image_from_node(like))
    heat = slicer.vtkMRMLScalarVolumeNode()
    heat.SetName(name)
    scene.AddNode(heat)
    set_node_from_image(heat, h)
    heat.SetAndObserveTransformNodeID(like.GetTransformNodeID())
    heat.SetAttribute("VAEAnomaly.Predictor", DEFAULT_PREDICTOR)
    heat.SetAttribute("VAEAnomaly.Input", like.GetID())
    VAEAnomalyLogic(scene)._display_heatmap(heat)
    store_calibration(heat, calibrated)
    return heat


# ----------------------------------------------------------------------------- 1. heatmap selector
def test_picking_a_heatmap_keeps_the_pick_and_its_calibrated_threshold(case, scene):
    """The Widget connects heatmapSelector.currentNodeChanged before connectGui binds the same combo, so Qt calls
    the controller first, while params.heatmap still holds the previous heatmap; any parameter write then makes
    the wrapper write params.heatmap back into the combo."""
    _, t2, heat_a, _ = case
    store_calibration(heat_a, 0.5)
    heat_b = our_heatmap(scene, t2, "T2 anomaly (other)", 0.85)
    params = WrappedParameterNode(scene, inputVolume=t2, heatmap=heat_a, thresholdMode=CALIBRATED,
                                  calibratedThreshold=0.5)
    ctl = PanelController(scene, None, ScriptedUser())
    ctl.set_params(params)
    ctl.update_threshold()
    assert params.threshold == 0.5
    combo = NodeComboBox()
    combo.connect(lambda node: ctl.heatmap_selected(node))  # setup(): the module's handler first
    connect_gui(params, "heatmap", combo)                   # then initializeParameterNode() -> connectGui
    assert combo.currentNode() is heat_a

    combo.setCurrentNode(heat_b)  # the user picks the other heatmap
    assert combo.currentNode().GetID() == heat_b.GetID()  # the pick stays
    assert params.heatmap.GetID() == heat_b.GetID()
    assert params.calibratedThreshold == 0.85 and params.threshold == 0.85  # heat_b's own, not heat_a's
    assert ctl.heatmap() is not None and ctl.heatmap().GetID() == heat_b.GetID()
    assert heat_b.GetDisplayNode().GetApplyThreshold() and heat_b.GetDisplayNode().GetLowerThreshold() == 0.85

    combo.setCurrentNode(heat_a)  # and back: heat_a's threshold again
    assert params.heatmap.GetID() == heat_a.GetID() and combo.currentNode().GetID() == heat_a.GetID()
    assert params.calibratedThreshold == 0.5 and params.threshold == 0.5

    # a heatmap that carries no calibration (loaded by hand): the percentile stands in, and the status says why
    store_calibration(heat_b, None, "the model has no calibrated threshold for these options")
    combo.setCurrentNode(heat_b)
    assert params.heatmap.GetID() == heat_b.GetID() and params.calibratedThreshold is None
    assert ctl.status.startswith("The model has no calibrated threshold for these options")
    bare = our_heatmap(scene, t2, "loaded by hand", None)
    for attr in ("VAEAnomaly.CalibratedThreshold", "VAEAnomaly.CalibrationNote"):
        bare.RemoveAttribute(attr)
    assert calibration_of(bare) == (None, None)
    combo.setCurrentNode(bare)
    assert params.heatmap.GetID() == bare.GetID() and "chosen by hand" in ctl.status
    combo.setCurrentNode(None)  # "None" in the selector
    assert params.heatmap is None and combo.currentNode() is None and ctl.heatmap() is None


# ----------------------------------------------------------------------------- 2. the findings point list
@pytest.fixture
def markups_logic(scene):
    """Slicer's Markups logic on the scene, with the application's selection node (the singleton it governs
    active lists with: vtkSlicerMarkupsLogic::GetSelectionNodeID without an application logic)."""
    selection = slicer.vtkMRMLSelectionNode()
    selection.SetSingletonTag("Singleton")
    scene.AddNode(selection)
    assert selection.GetID() == "vtkMRMLSelectionNodeSingleton"
    logic = slicer.vtkSlicerMarkupsLogic()
    logic.SetMRMLScene(scene)
    yield logic, selection
    logic.SetMRMLScene(None)


def test_the_findings_point_list_never_becomes_the_active_list(case, scene, markups_logic):
    """vtkSlicerMarkupsLogic::OnMRMLSceneNodeAdded makes every markups node added to the scene the active list:
    the user's next placed point would go into the findings list and be wiped by the next findings update."""
    logic, t2, heat, _ = case
    mlogic, selection = markups_logic
    mine = slicer.vtkMRMLMarkupsLineNode()  # the user is placing a line
    scene.AddNode(mine)
    assert mlogic.GetActiveListID() == mine.GetID()  # the real logic does make an added node active
    _, points, _ = logic.update_findings(heat, 0.5, t2)
    assert points.GetNumberOfControlPoints() == 2 and points.GetLocked()
    assert mlogic.GetActiveListID() == mine.GetID()
    assert selection.GetActivePlaceNodeClassName() == "vtkMRMLMarkupsLineNode"
    assert points.GetDisplayNode() is not None
    # nothing active before (a fresh scene): still nothing active, so a placed point makes its own new list
    scene.RemoveNode(mine)
    selection.SetReferenceActivePlaceNodeID(None)
    heat2 = our_heatmap(scene, t2, "T2 anomaly 2", 0.5)
    _, points2, _ = logic.update_findings(heat2, 0.5, t2)
    assert points2.GetID() != points.GetID() and mlogic.GetActiveListID() == ""
    # later updates reuse the list and leave the active one alone too
    user = slicer.vtkMRMLMarkupsFiducialNode()
    scene.AddNode(user)
    logic.update_findings(heat, 0.85, t2)
    assert mlogic.GetActiveListID() == user.GetID() and user.GetNumberOfControlPoints() == 0


# ----------------------------------------------------------------------------- 3. a table click during the debounce
def test_a_click_during_the_findings_debounce_uses_the_rows_it_was_shown(case, scene):
    """The table shows the findings at 0.5 (A1 large, A2 small); the slider moves to 0.85 (only the large region is
    above it) and the 300 ms findings timer is running when the user clicks row 1, the small region."""
    _, t2, heat, _ = case
    ctl = controller_for(scene, t2, heat, thresholdMode=ABSOLUTE, threshold=0.5)
    ctl.refresh_findings()
    red = slicer.vtkMRMLSliceNode()
    red.SetName("Red")
    red.SetLayoutName("Red")
    scene.AddNode(red)
    shown = ctl.state().findings_rows  # what the Widget's table shows
    assert [r[0] for r in shown] == ["A1", "A2"]
    small = np.array(ctl.findings[1]["centroid_ras_mm"]) + [10.0, -5.0, 7.0]  # through the input's transform
    ctl.set_threshold(0.85)
    assert ctl.findings_pending and ctl.state().findings_rows == shown  # the table still shows the old rows
    assert ctl.jump_to_finding(1) and "A2" in ctl.status  # the clicked row: the small region
    m = red.GetSliceToRAS()
    assert [m.GetElement(r, 3) for r in range(3)] == pytest.approx(small, abs=1e-6)
    # the timer fires: the table shows the new list, and its rows are what a click means from then on
    ctl.refresh_findings()
    assert [r[0] for r in ctl.state().findings_rows] == ["A1"]
    assert not ctl.jump_to_finding(1) and ctl.status == "No such finding."
    assert ctl.jump_to_finding(0) and "A1" in ctl.status
    # another heatmap picked: the old heatmap's rows are not shown any more, and a stale row does nothing
    other = our_heatmap(scene, t2, "T2 anomaly (other)", 0.5)
    ctl.heatmap_selected(other)
    assert ctl.state().findings_rows == [] and not ctl.jump_to_finding(0)


# ----------------------------------------------------------------------------- 4. a label map under another transform
def linear_transform(scene, translation):
    tf = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(tf)
    m = vtk.vtkMatrix4x4()
    for r, v in enumerate(translation):
        m.SetElement(r, 3, v)
    tf.SetMatrixTransformToParent(m)
    return tf


def test_a_label_map_mask_under_another_transform_is_used_where_it_is_shown(scene):
    """Mask and input on the same local grid, the mask under a transform 4 mm superior (two 2 mm slices): in the
    world, where Slicer shows it, it covers the input's slices two higher, and that is the mask the scoring gets."""
    logic = VAEAnomalyLogic(scene)
    img = make_phantom((30, 32, 16), (1.5, 1.5, 2.0))
    t2 = add_volume(scene, img)
    box = np.zeros(img.GetSize()[::-1], np.uint8)
    box[4:10, 8:24, 6:24] = 1
    lab_img = sitk.GetImageFromArray(box)
    lab_img.CopyInformation(img)
    lab = slicer.vtkMRMLLabelMapVolumeNode()
    lab.SetName("brain")
    scene.AddNode(lab)
    set_node_from_image(lab, lab_img)
    _, mask = logic.input_images(t2, lab)
    assert np.array_equal(sitk.GetArrayFromImage(mask), box)  # same frame: as it is
    up = linear_transform(scene, (0.0, 0.0, 4.0))
    lab.SetAndObserveTransformNodeID(up.GetID())
    _, mask = logic.input_images(t2, lab)
    want = np.zeros_like(box)
    want[6:12] = box[4:10]
    assert mask.GetSize() == img.GetSize() and np.array_equal(sitk.GetArrayFromImage(mask), want)
    assert np.array_equal(logic.heatmap_array(lab), box) and lab.GetTransformNodeID() == up.GetID()  # untouched
    # the input under the same transform: the same frame again; under an equal one: nothing to resample
    t2.SetAndObserveTransformNodeID(up.GetID())
    assert np.array_equal(sitk.GetArrayFromImage(logic.input_images(t2, lab)[1]), box)
    t2.SetAndObserveTransformNodeID(linear_transform(scene, (0.0, 0.0, 4.0)).GetID())
    assert np.array_equal(sitk.GetArrayFromImage(logic.input_images(t2, lab)[1]), box)
    # a transform between them that is not linear: refused, saying what to do
    warp = slicer.vtkMRMLTransformNode()
    scene.AddNode(warp)
    tps = vtk.vtkThinPlateSplineTransform()
    src, dst = vtk.vtkPoints(), vtk.vtkPoints()
    for p, q in (((0, 0, 0), (0, 0, 1)), ((50, 0, 0), (50, 2, 0)), ((0, 50, 0), (1, 50, 0)), ((0, 0, 30), (0, 0, 30))):
        src.InsertNextPoint(*p)
        dst.InsertNextPoint(*q)
    tps.SetSourceLandmarks(src)
    tps.SetTargetLandmarks(dst)
    tps.SetBasisToR()
    warp.SetAndObserveTransformToParent(tps)
    lab.SetAndObserveTransformNodeID(warp.GetID())
    with pytest.raises(VolumeError, match="not linear: harden the transforms"):
        logic.input_images(t2, lab)


# ----------------------------------------------------------------------------- 5. a segmentation with hidden segments
def test_a_segmentation_mask_is_its_visible_segments_and_all_hidden_is_refused(scene):
    logic = VAEAnomalyLogic(scene)
    img = make_phantom((30, 32, 16), (1.5, 1.5, 2.0))
    t2 = add_volume(scene, img)
    brain, other = (np.zeros(img.GetSize()[::-1], np.uint8) for _ in range(2))
    brain[3:12, 6:26, 5:25] = 1
    other[12:15, 2:6, 2:6] = 1
    seg = slicer.vtkMRMLSegmentationNode()
    seg.SetName("masks")
    scene.AddNode(seg)
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(t2)
    for name, arr in (("brain", brain), ("other", other)):
        lab_img = sitk.GetImageFromArray(arr)
        lab_img.CopyInformation(img)
        lab = slicer.vtkMRMLLabelMapVolumeNode()
        lab.SetName(name)
        scene.AddNode(lab)
        set_node_from_image(lab, lab_img)
        slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(lab, seg)
        scene.RemoveNode(lab)
    ids = seg.GetSegmentation().GetSegmentIDs()
    assert len(ids) == 2
    display = seg.GetDisplayNode()

    def mask():
        return sitk.GetArrayFromImage(logic.input_images(t2, seg)[1]) > 0

    assert np.array_equal(mask(), (brain | other) > 0)  # both visible: both
    display.SetSegmentVisibility(ids[1], False)
    assert np.array_equal(mask(), brain > 0)  # the hidden one is not part of the mask
    display.SetSegmentVisibility(ids[0], False)
    with pytest.raises(VolumeError, match="every segment of segmentation 'masks' is hidden.*show the brain segment"):
        mask()
    n_nodes = scene.GetNumberOfNodes()
    with pytest.raises(VolumeError):
        logic.input_images(t2, seg)
    assert scene.GetNumberOfNodes() == n_nodes  # nothing left behind
    assert [display.GetSegmentVisibility(i) for i in ids] == [False, False]  # the user's segmentation untouched
    assert seg.GetSegmentation().GetNumberOfSegments() == 2


# ----------------------------------------------------------------------------- 6. the report's file name
def test_save_report_adds_the_html_suffix_to_a_typed_name(case, scene, tmp_path):
    """The Save report dialog returns the name as typed (its '*.html' filter adds no suffix)."""
    pytest.importorskip("matplotlib")
    _, t2, heat, _ = case
    user = ScriptedUser(False, True)  # replace an existing file: no, then yes
    ctl = controller_for(scene, t2, heat, user, thresholdMode=ABSOLUTE, threshold=0.5)
    assert ctl.write_report(str(tmp_path / "case 12"))
    written = tmp_path / "case 12.html"
    assert written.is_file() and "<td>A1</td>" in written.read_text(encoding="utf-8")
    assert str(written) in ctl.status and user.kinds() == []  # no error, nothing asked
    assert ctl.write_report(str(tmp_path / "other.HTM")) and (tmp_path / "other.HTM").is_file()  # kept as typed
    # the dialog asked about "case 12", not "case 12.html": replacing that file is asked here
    written.write_text("the user's own file", encoding="utf-8")
    assert not ctl.write_report(str(tmp_path / "case 12"))
    assert written.read_text(encoding="utf-8") == "the user's own file" and "not written" in ctl.status
    assert ctl.write_report(str(tmp_path / "case 12")) and "<td>A1</td>" in written.read_text(encoding="utf-8")
    assert user.kinds() == ["confirm", "confirm"] and "Replace" in user.shown[0][1]
