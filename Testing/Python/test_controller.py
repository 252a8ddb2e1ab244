"""The panel controller through the clinician's workflow, headless on a real vtkMRMLScene (slicer-core),
with real jobs (the project's command line in a child process) and a real trained checkpoint.

The only stand-in is the user: `ScriptedUser` answers the panel's questions the way a test wants
(Slicer shows message boxes there)."""
from __future__ import annotations

import json
import stat
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")

from vaeanomaly.checkpoint import load_checkpoint  # noqa: E402
from conftest import make_phantom  # noqa: E402
from test_logic import add_label, add_volume, snapshot  # noqa: E402
from VAEAnomalyLib.controller import Dialogs, PanelController, PanelParams, verdict_text  # noqa: E402
from VAEAnomalyLib.logic import TERMINOLOGY_ENTRY, VAEAnomalyLogic, cli_supports, image_from_node  # noqa: E402
from VAEAnomalyLib.panel import CUSTOM_MODEL  # noqa: E402


class ScriptedUser(Dialogs):
    """Answers confirmations from a queue (default: no) and records every message."""

    def __init__(self, *answers):
        super().__init__()
        self.answers = list(answers)

    def confirm(self, text):
        self.shown.append(("confirm", text))
        return self.answers.pop(0) if self.answers else False

    def kinds(self):
        return [k for k, _ in self.shown]


@pytest.fixture
def scene():
    s = slicer.vtkMRMLScene()
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLScene(s)
    s.colors = colors
    # three slice views as the application's layout has them; one more shows another volume
    for name in ("Red", "Yellow", "Green"):
        c = slicer.vtkMRMLSliceCompositeNode()
        c.SetName(f"vtkMRMLSliceCompositeNode{name}")
        s.AddNode(c)
    yield s
    s.Clear(1)


def voxels(node):
    return sitk.GetArrayFromImage(image_from_node(node)).copy()


def run_to_end(ctl, timeout=240):
    t0 = time.time()
    while ctl.poll():
        assert time.time() - t0 < timeout, ctl.job.messages if ctl.job else ctl.status
        time.sleep(0.1)


def write_launcher(tmp_path, body):
    """A stand-in for Slicer's PythonSlicer launcher: a shell script that starts the real Python as its
    *child* (the situation in which killing only the launcher leaves the computation running)."""
    path = tmp_path / "PythonSlicer"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def children_of(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_clinician_workflow(scene, tiny_checkpoint, tmp_path):
    img = make_phantom((60, 64, 20), (2.0, 2.0, 4.0), blob_index=(30, 30, 10))
    t2 = add_volume(scene, img, "T2")
    other = add_volume(scene, make_phantom((20, 20, 8)), "other")
    before = voxels(t2)
    user = ScriptedUser()
    params = PanelParams()
    ctl = PanelController(scene, params, user, color_logic=scene.colors)
    # nothing selected: Apply is disabled and says why; the outputs are disabled
    st = ctl.state()
    assert not st.apply_enabled and "input volume" in st.apply_tooltip and not st.outputs_enabled
    assert not ctl.apply() and ctl.job is None
    params.inputVolume = t2
    params.model = CUSTOM_MODEL
    assert not ctl.state().apply_enabled and ctl.state().custom_path_visible  # custom, but no file yet
    ctl.select_model(CUSTOM_MODEL, str(tiny_checkpoint))
    assert "l=16" in ctl.state().model_card
    params.useGPU = True  # no GPU here: a warning, then the CPU
    # a view that shows something else keeps its own opacity later
    extra = slicer.vtkMRMLSliceCompositeNode()
    scene.AddNode(extra)
    n_before = scene.GetNumberOfNodes()
    assert ctl.apply(), (ctl.status, ctl.dialogs.shown)
    st = ctl.state()
    assert st.running and st.apply_text == "Cancel" and st.apply_enabled and st.progress_visible
    assert not st.inputs_enabled and not st.outputs_enabled
    assert "warning" in user.kinds() and "GPU" in user.shown[0][1]
    # a second Apply while one runs does not start another job
    job = ctl.job
    assert ctl.apply() and ctl.job is job and "already running" in ctl.status
    assert scene.GetNumberOfNodes() == n_before  # nothing added while it runs
    run_to_end(ctl)
    st = ctl.state()
    assert ctl.status.startswith("Done"), (ctl.status, user.shown)
    assert not st.running and st.apply_text == "Apply" and st.outputs_enabled and st.create_segment_enabled
    heat = params.heatmap
    assert heat is not None and heat.GetImageData().GetDimensions() == t2.GetImageData().GetDimensions()
    assert not job.tmp.exists()
    # shown over the input in every slice view, with a legend; the checkpoint's threshold came as a number
    for i in range(3):
        comp = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        assert comp.GetForegroundVolumeID() == heat.GetID() and comp.GetBackgroundVolumeID() == t2.GetID()
    assert scene.GetFirstNodeByClass("vtkMRMLColorLegendDisplayNode") is not None
    assert isinstance(params.calibratedThreshold, float)
    # verdict: only what the command line reported; none invented
    if cli_supports("--report"):  # the command line's report, carried as it is
        assert isinstance(ctl.verdict, dict) and isinstance(ctl.verdict["in_distribution"], bool)
        assert st.warnings == [str(w) for w in ctl.verdict.get("warnings") or []] and st.verdict_text
    else:
        assert ctl.verdict is None and st.verdict_text == "" and st.warnings == []
    # threshold: calibrated, percentile, then a drag turns the mode to absolute; preview follows
    assert params.thresholdMode == "calibrated" and params.threshold == pytest.approx(params.calibratedThreshold)
    # at the calibrated threshold the segment and the findings keep the regions reaching the model's region peak
    peak = load_checkpoint(tiny_checkpoint).meta["region_peaks"]["rec-grad"]
    assert ctl.region_peak() == pytest.approx(peak) and peak > params.threshold
    ctl.refresh_findings()
    assert f"region peak {peak:.4g}" in ctl.state().findings_text  # the panel says why a faint blob is no finding
    assert all(f["peak"] >= peak for f in ctl.findings)
    disp = heat.GetDisplayNode()
    assert disp.GetApplyThreshold() and disp.GetLowerThreshold() == pytest.approx(params.threshold)
    arr = VAEAnomalyLogic.heatmap_array(heat)
    ctl.set_threshold_mode("percentile")
    assert (arr[arr > 0] > params.threshold).mean() == pytest.approx(0.01, abs=0.005)
    ctl.set_threshold(params.threshold)  # the Widget writing the value back: no change of mode
    assert params.thresholdMode == "percentile" and ctl.region_peak() is None  # every region, as `--threshold p99`
    hi, step, _ = ctl.threshold_range()
    assert hi == pytest.approx(float(arr.max()))
    ctl.set_threshold(0.5 * hi)
    assert params.thresholdMode == "absolute" and disp.GetLowerThreshold() == pytest.approx(0.5 * hi)
    # opacity: only views showing the heatmap
    extra.SetForegroundVolumeID(other.GetID())
    extra.SetForegroundOpacity(0.3)
    ctl.set_opacity(0.8)
    assert extra.GetForegroundOpacity() == pytest.approx(0.3)
    assert scene.GetNthNodeByClass(0, "vtkMRMLSliceCompositeNode").GetForegroundOpacity() == pytest.approx(0.8)
    # create the segment: standard terminology, reference geometry of the input
    params.show3D = True
    assert ctl.create_segment(), user.shown
    seg = params.segmentation
    sid = seg.GetSegmentation().GetSegmentIdBySegmentName("Anomaly")
    segment = seg.GetSegmentation().GetSegment(sid)
    assert segment.GetTerminology() == TERMINOLOGY_ENTRY
    got = ctl.logic._segment_array(seg, sid, t2)
    assert got.sum() == (arr > 0.5 * hi).sum()
    # the user edits it; Create again asks, and "no" keeps the edit
    edited = got.astype(np.uint8)
    edited[2, 4:8, 4:8] = 1
    lab = add_label(scene, edited, img)
    import vtk
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(sid)
    slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(lab, seg, ids)
    scene.RemoveNode(lab)
    ctl.set_threshold(0.3 * hi)
    assert not ctl.create_segment() and "Kept" in ctl.status and user.kinds()[-1] == "confirm"
    assert ctl.logic._segment_array(seg, sid, t2).sum() == edited.sum()
    user.answers = [True]  # "yes, overwrite"
    assert ctl.create_segment()
    sid = seg.GetSegmentation().GetSegmentIdBySegmentName("Anomaly")
    assert ctl.logic._segment_array(seg, sid, t2).sum() == (arr > 0.3 * hi).sum()
    # nothing above the threshold: a valid, empty segment (no error), and the status says why
    n, shown = scene.GetNumberOfNodes(), len(user.shown)
    ctl.set_threshold(hi * 2)
    params.threshold = hi * 2
    assert ctl.create_segment() and len(user.shown) == shown and "is empty" in ctl.status
    sid = seg.GetSegmentation().GetSegmentIdBySegmentName("Anomaly")
    assert scene.GetNumberOfNodes() == n and sid and not ctl.logic._segment_array(seg, sid, t2).any()
    # running again for the same input and predictor re-uses the panel's heatmap node
    params.useGPU = False
    assert ctl.apply(), (ctl.status, ctl.dialogs.shown)
    run_to_end(ctl)
    assert params.heatmap is heat and ctl.status.startswith("Done")
    assert np.array_equal(voxels(t2), before)  # the input was never modified
    ctl.close()


def test_apply_refusals_and_start_errors_leave_scene_unchanged(scene, tiny_checkpoint, tmp_path):
    user = ScriptedUser()
    params = PanelParams(model=CUSTOM_MODEL, customModelPath=str(tiny_checkpoint))
    ctl = PanelController(scene, params, user)
    a = sitk.GetArrayFromImage(make_phantom((40, 40, 12)))
    a[3, 3, 3] = np.nan
    bad = sitk.GetImageFromArray(a)
    nan_node = add_volume(scene, bad, "nan")
    before = snapshot(scene)
    params.inputVolume = nan_node
    assert not ctl.apply() and ctl.job is None
    assert user.kinds() == ["error"] and "NaN" in user.shown[0][1] and "Could not start" in ctl.status
    params.inputVolume = add_volume(scene, make_phantom((40, 40, 12)), "good")
    before = snapshot(scene)
    (tmp_path / "x.safetensors").write_bytes(b"garbage")
    params.customModelPath = str(tmp_path / "x.safetensors")
    assert not ctl.apply() and "corrupt" in user.shown[-1][1]
    assert "Model unavailable" in ctl.update_model_card()
    # a memory question answered "no": nothing starts
    params.customModelPath = str(tiny_checkpoint)
    ctl2 = PanelController(scene, params, ScriptedUser(False), memory_warning=lambda v: "needs 90 GB. Continue?")
    assert not ctl2.apply() and ctl2.job is None and ctl2.status == "Not started."
    assert snapshot(scene) == before
    ctl.close()
    ctl2.close()


def test_cancel_stops_the_whole_process_tree(scene, tiny_checkpoint, tmp_path):
    node = add_volume(scene, make_phantom((50, 56, 16), (2.5, 2.5, 5.0)))
    launcher = write_launcher(tmp_path, f'"{sys.executable}" "$@"\nexit $?')
    params = PanelParams(inputVolume=node, model=CUSTOM_MODEL, customModelPath=str(tiny_checkpoint),
                         predictor="proj-rec-error", projectionSteps=1000)
    ctl = PanelController(scene, params, ScriptedUser(), launcher=launcher)
    ctl.logic.heat_color_node()
    before = snapshot(scene)
    assert ctl.apply(), (ctl.status, ctl.dialogs.shown)
    job = ctl.job
    t0 = time.time()
    while not children_of(job.proc.pid):  # the real Python, started by the launcher
        assert time.time() - t0 < 30 and job.proc.poll() is None
        time.sleep(0.05)
    python = children_of(job.proc.pid)[0]
    assert alive(python)
    assert not ctl.apply_or_cancel()  # the button reads Cancel
    assert ctl.job is None and ctl.status == "Cancelled." and ctl.state().apply_text == "Apply"
    assert not alive(python) and job.proc.poll() is not None
    time.sleep(1.0)
    assert not job.tmp.exists()  # and nothing recreated it
    assert not ctl.poll() and snapshot(scene) == before
    ctl.close()


def test_scene_close_during_a_run_cancels_it(scene, tiny_checkpoint):
    node = add_volume(scene, make_phantom((50, 56, 16), (2.5, 2.5, 5.0)))
    user = ScriptedUser()
    params = PanelParams(inputVolume=node, model=CUSTOM_MODEL, customModelPath=str(tiny_checkpoint),
                         predictor="proj-rec-error", projectionSteps=1000)
    ctl = PanelController(scene, params, user)
    assert ctl.apply(), (ctl.status, ctl.dialogs.shown)
    job = ctl.job
    scene.Clear(0)  # File > Close scene
    assert ctl.job is None and "scene was closed" in ctl.status
    assert job.proc.poll() is not None and not job.tmp.exists()
    assert not ctl.poll() and scene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode") is None
    assert "error" not in user.kinds()
    ctl.close()


def test_failures_after_the_process_end_once(scene, tiny_checkpoint, tmp_path):
    """The child fails; or it succeeds but its output vanished (the folder was removed) or the input was
    deleted meanwhile: one error message each, the job ends, no node is added, polling again is quiet."""
    node = add_volume(scene, make_phantom((40, 44, 12), (2.5, 2.5, 5.0)))
    user = ScriptedUser()
    failing = write_launcher(tmp_path, 'echo "vaeanomaly: error: out of cheese" >&2\nexit 2')
    params = PanelParams(inputVolume=node, model=CUSTOM_MODEL, customModelPath=str(tiny_checkpoint))
    ctl = PanelController(scene, params, user, launcher=failing)
    before = snapshot(scene)
    assert ctl.apply(), (ctl.status, ctl.dialogs.shown)
    job = ctl.job
    run_to_end(ctl)
    assert ctl.status == "Failed." and user.kinds() == ["error"] and "out of cheese" in user.shown[0][1]
    assert not job.tmp.exists() and snapshot(scene) == before
    # success, then the output folder disappears before the result is loaded
    ctl.launcher = None
    assert ctl.apply(), (ctl.status, ctl.dialogs.shown)
    job = ctl.job
    job.wait(240)
    import shutil
    shutil.rmtree(job.tmp / "out")
    assert not ctl.poll()
    assert user.kinds() == ["error", "error"] and "wrote no" in user.shown[-1][1]
    assert ctl.job is None and snapshot(scene) == before
    for _ in range(3):
        assert not ctl.poll()
    assert len(user.shown) == 2
    # success, but the input volume was deleted during the run
    assert ctl.apply(), (ctl.status, ctl.dialogs.shown)
    ctl.job.wait(240)
    scene.RemoveNode(node)
    assert not ctl.poll() and "removed" in user.shown[-1][1]
    assert scene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode") is None
    ctl.close()


def test_verdict_and_warnings_come_from_the_report(scene, tiny_checkpoint, tmp_path):
    report = {"in_distribution": False, "fit": 0.997, "brain_volume_ml": 2310.0, "mask": "automatic",
              "flagged_percent": 41.5,
              "warnings": ["The automatic brain mask covers far more than a brain: the head is probably not "
                           "skull-stripped. Give a brain mask."]}
    node = add_volume(scene, make_phantom((40, 44, 12), (2.5, 2.5, 5.0), blob_index=(20, 22, 6)))
    params = PanelParams(inputVolume=node, model=CUSTOM_MODEL, customModelPath=str(tiny_checkpoint))
    ctl = PanelController(scene, params, ScriptedUser())
    assert ctl.apply(), (ctl.status, ctl.dialogs.shown)
    # the real computation (in the warm worker, which stays running), then this report in the file the job's
    # request's `report` names, as `vaeanomaly score --report` writes it, before the panel loads the result
    assert ctl.job.wait(240) == 0, ctl.job.messages
    assert ctl.job.request["report"]
    Path(ctl.job.request["report"]).write_text(json.dumps(report), encoding="utf-8")
    run_to_end(ctl)
    st = ctl.state()
    assert params.heatmap is not None
    assert st.verdict == report and st.warnings == report["warnings"]
    assert st.verdict_text.startswith("Out of distribution") and "41.5%" in st.verdict_text
    assert "warnings" in ctl.status
    # a new run clears the old verdict until its own report arrives
    ctl.launcher = None
    assert ctl.apply() and ctl.state().verdict is None and ctl.state().warnings == []
    run_to_end(ctl)
    if not cli_supports("--report"):
        assert ctl.verdict is None  # no report, no verdict
    ctl.close()


def test_heatmap_is_shown_before_the_verdict_arrives(scene, tiny_checkpoint):
    """Once the worker has written the maps (it then checks the scan), the panel shows the heatmap; the
    verdict completes the same result, on the same node. (The poll that sees the maps is taken by hand
    here: in the panel the timer's 100 ms polls catch the window between maps and verdict.)"""
    node = add_volume(scene, make_phantom((40, 44, 12), (2.5, 2.5, 5.0), blob_index=(20, 22, 6)))
    params = PanelParams(inputVolume=node, model=CUSTOM_MODEL, customModelPath=str(tiny_checkpoint))
    ctl = PanelController(scene, params, ScriptedUser())
    assert ctl.apply(), (ctl.status, ctl.dialogs.shown)
    job = ctl.job
    assert job.wait(240) == 0 and job.maps_ready, job.messages
    ctl._show_early(job)  # what poll() does when it sees the maps before the end
    assert params.heatmap is not None and ctl.running and ctl.verdict is None
    assert "checking the scan" in ctl.status and ctl.take_new_result()
    heat = params.heatmap
    run_to_end(ctl)
    assert params.heatmap is heat and isinstance(ctl.verdict, dict) and ctl.status.startswith("Done")
    assert not ctl.take_new_result()  # the views were fitted once, when the heatmap appeared
    ctl.close()


def test_verdict_text():
    assert verdict_text(None) == ""
    t = verdict_text({"in_distribution": True, "fit": 0.4, "mask": "given", "warnings": []})
    assert t.startswith("Looks like") and "mask given" in t
    assert verdict_text({"in_distribution": False}).startswith("Out of distribution")


def test_outputs_only_act_on_this_modules_heatmaps(scene, tiny_checkpoint):
    """A heatmap picked by hand gets its own calibrated threshold, or none when it carries none (the percentile
    stands in, and the status says so); a volume that is not a VAEAnomaly heatmap is never thresholded or
    segmented."""
    t2 = add_volume(scene, make_phantom((40, 44, 12), (2.5, 2.5, 5.0), blob_index=(20, 22, 6)), "T2")
    user = ScriptedUser()
    params = PanelParams(inputVolume=t2, model=CUSTOM_MODEL, customModelPath=str(tiny_checkpoint))
    ctl = PanelController(scene, params, user)
    heat = ctl.logic.process(t2, None, str(tiny_checkpoint))  # an earlier result, in this process
    params.heatmap, params.calibratedThreshold = t2, 1.0  # the user's own volume in the heatmap selector
    ctl.heatmap_selected(t2)
    st = ctl.state()
    assert not st.outputs_enabled and not st.create_segment_enabled
    ctl.set_threshold(0.5)
    assert not t2.GetDisplayNode().GetApplyThreshold()
    assert not ctl.create_segment() and "heatmap first" in ctl.status
    assert scene.GetFirstNodeByClass("vtkMRMLSegmentationNode") is None
    ctl.heatmap_selected(heat)  # one of this module's heatmaps: its own calibrated threshold comes back with it
    assert params.heatmap is heat and params.calibratedThreshold == ctl.logic.lastCalibratedThreshold
    for attr in ("VAEAnomaly.CalibratedThreshold", "VAEAnomaly.CalibrationNote"):
        heat.RemoveAttribute(attr)  # as a heatmap saved by an older version carries none
    ctl.heatmap_selected(t2)
    ctl.heatmap_selected(heat)
    assert params.calibratedThreshold is None and "chosen by hand" in ctl.status
    arr = VAEAnomalyLogic.heatmap_array(heat)
    assert params.threshold == pytest.approx(np.percentile(arr[arr > 0], 99))
    assert ctl.state().outputs_enabled and heat.GetDisplayNode().GetApplyThreshold()
    assert user.shown == []
    ctl.close()
