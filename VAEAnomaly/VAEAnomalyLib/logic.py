"""MRML side of the VAEAnomaly module: nodes in, core library, nodes out.

Runs anywhere the MRML layer runs (the Slicer application, the `slicer-core` wheel headless, a web
viewer on the same layer): the scene is passed in explicitly; no slicer.mrmlScene, slicer.app or Qt.
The user's input volume, mask and edited segments are never modified.
"""
from __future__ import annotations

import hashlib
import json
import queue
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from vaeanomaly.dicom_out import DIRECTION_MODIFIERS, DIRECTION_RGB, segment_label
from vaeanomaly.threshold import Tails

SEGMENT_NAME = "Anomaly"
HASH_TAG = "VAEAnomaly.LabelHash"
# Standard terminology of the segment, in Slicer's TerminologyEntry format (7 parts separated by '~',
# codes as scheme^value^meaning: Slicer Docs/developer_guide/modules/segmentations.md "TerminologyEntry tag";
# set with vtkSegment.GetTerminologyEntryTagName() as lassoan/SlicerTotalSegmentator setTerminology() does).
# Codes from Slicer Modules/Loadable/Terminologies/Resources/SegmentationCategoryTypeModifier-DICOM-Master.json
# (category "Morphologically Altered Structure", type "Mass") and AnatomicRegionAndModifier-DICOM-Master.json (Brain).
TERMINOLOGY_ENTRY = ("Segmentation category and type - DICOM master list"
                     "~SCT^49755003^Morphologically Altered Structure"
                     "~SCT^4147007^Mass"
                     "~^^"
                     "~Anatomic codes - DICOM master list"
                     "~SCT^12738006^Brain"
                     "~^^")
SEGMENT_COLOR = (144 / 255, 238 / 255, 144 / 255)  # the type's recommendedDisplayRGBValue in the same file
# The extracted brain (brain extraction, vaeanomaly/brainextract.py): category "Anatomical Structure", type "Brain"
# of the same SegmentationCategoryTypeModifier-DICOM-Master.json, with its recommendedDisplayRGBValue
BRAIN_SEGMENT_NAME = "Brain"
BRAIN_TERMINOLOGY_ENTRY = ("Segmentation category and type - DICOM master list"
                           "~SCT^123037004^Anatomical Structure"
                           "~SCT^12738006^Brain"
                           "~^^"
                           "~Anatomic codes - DICOM master list"
                           "~^^"
                           "~^^")
BRAIN_COLOR = (250 / 255, 250 / 255, 225 / 255)


def _with_type_modifier(entry: str, code) -> str:
    """A TerminologyEntry with its 4th part (the type modifier) set to code (value, scheme, meaning)."""
    parts = entry.split("~")
    parts[3] = f"{code[1]}^{code[0]}^{code[2]}"
    return "~".join(parts)


# "Bright and dark apart" (a signed heatmap, polarity 'signed'): one segment per direction, named as the DICOM
# Segmentation of `vaeanomaly score --label seg.dcm` names them (vaeanomaly.dicom_out.segment_label), each the
# 'Anomaly' entry with a type modifier, the MR signal intensity codes of DICOM CID 6335 (RadLex Hyperintense /
# Hypointense: dicom_out.DIRECTION_MODIFIERS). Neither list Slicer ships (Modules/Loadable/Terminologies/Resources:
# the DICOM master list, the General Anatomy list) has a hyper- or hypointensity type or a modifier for Mass; Slicer's
# vtkSlicerTerminologiesModuleLogic::DeserializeTerminologyEntry reads whatever codes the 7 parts carry. Colours: the
# diverging colour map's ends (red brighter, blue darker).
SIGNED_SIDES = ("bright", "dark")
SIGNED_SEGMENT_NAMES = {side: segment_label(side) for side in SIGNED_SIDES}
SIGNED_TERMINOLOGY = {side: _with_type_modifier(TERMINOLOGY_ENTRY, DIRECTION_MODIFIERS[side]) for side in SIGNED_SIDES}
SIGNED_COLORS = {side: tuple(c / 255 for c in DIRECTION_RGB[side]) for side in SIGNED_SIDES}
SIGNED = "VAEAnomaly.Signed"  # on a heatmap scored with polarity 'signed' (add_results): "1"
DIVERGING_OF = "VAEAnomaly.DivergingOf"  # on a signed heatmap's own diverging colour table: the heatmap's ID
# a diverging map (RdBu reversed, ColorBrewer): blue = darker than expected, near white = as expected, red = brighter
_DIVERGING = [(0.020, 0.188, 0.380), (0.129, 0.400, 0.675), (0.263, 0.576, 0.765), (0.573, 0.773, 0.871),
              (0.820, 0.898, 0.941), (0.969, 0.969, 0.969), (0.992, 0.859, 0.780), (0.957, 0.647, 0.510),
              (0.839, 0.376, 0.302), (0.698, 0.094, 0.169), (0.404, 0.000, 0.122)]
MASK_SOURCE = "VAEAnomaly.MaskSource"  # on a segmentation this module made from a brain mask: where it came from
HEAT_TABLE_NAME = "VAEAnomaly Heat"

# inferno anchor colours (matplotlib's, sampled every 1/8) for the self-built heat table
_INFERNO = [(0.001, 0.000, 0.014), (0.106, 0.047, 0.255), (0.316, 0.071, 0.485), (0.512, 0.152, 0.509),
            (0.711, 0.213, 0.476), (0.891, 0.323, 0.371), (0.986, 0.535, 0.192), (0.978, 0.788, 0.171),
            (0.988, 0.998, 0.645)]


FINDINGS_OF = "VAEAnomaly.FindingsOf"  # on the findings table and point list: the ID of their heatmap


def finding_label(f: dict) -> str:
    """A finding's control-point label: "A1 3.2 ml" (two significant digits below 1 ml)."""
    v = float(f["volume_ml"])
    return f"{f['id']} {v:.1f} ml" if v >= 1 else f"{f['id']} {v:.2g} ml"


class SegmentEditedError(RuntimeError):
    """The 'Anomaly' segment was edited by the user since it was created; re-running would overwrite it."""


# ----------------------------------------------------------------------------- node <-> SimpleITK
def _lps(m3):
    return np.diag([-1.0, -1.0, 1.0]) @ m3


def image_from_node(node, what="input volume"):
    """A scalar/label volume node as a SimpleITK image in LPS (voxels copied; the node is untouched)."""
    import SimpleITK as sitk
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    from vaeanomaly.volume import VolumeError
    if node is None:
        raise VolumeError(f"no {what} selected")
    data = node.GetImageData()
    if data is None or data.GetNumberOfPoints() == 0:
        raise VolumeError(f"{what} '{node.GetName()}' has no voxels")
    if data.GetNumberOfScalarComponents() != 1:
        raise VolumeError(f"{what} '{node.GetName()}' has {data.GetNumberOfScalarComponents()} components; "
                          f"a scalar volume is required")
    dims = data.GetDimensions()
    arr = vtk_to_numpy(data.GetPointData().GetScalars()).reshape(dims[::-1]).copy()
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(node.GetSpacing())
    o = node.GetOrigin()
    img.SetOrigin((-o[0], -o[1], o[2]))
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASDirectionMatrix(m)
    d = np.array([[m.GetElement(r, c) for c in range(3)] for r in range(3)])
    img.SetDirection(tuple(_lps(d).ravel()))
    return img


def set_node_from_image(node, img):
    """Fill a volume node with a SimpleITK image's voxels and geometry."""
    import SimpleITK as sitk
    import vtk
    from vtk.util.numpy_support import numpy_to_vtk
    arr = np.ascontiguousarray(sitk.GetArrayFromImage(img))
    data = vtk.vtkImageData()
    data.SetDimensions(img.GetSize())
    scalars = numpy_to_vtk(arr.ravel(), deep=True)
    data.GetPointData().SetScalars(scalars)
    node.SetSpacing(img.GetSpacing())
    o = img.GetOrigin()
    node.SetOrigin(-o[0], -o[1], o[2])
    d = _lps(np.array(img.GetDirection()).reshape(3, 3))
    m = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            m.SetElement(r, c, d[r, c])
    node.SetIJKToRASDirectionMatrix(m)
    node.SetAndObserveImageData(data)


def geometry_of(node):
    import vtk
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return node.GetImageData().GetDimensions(), [[m.GetElement(r, c) for c in range(4)] for r in range(4)]


# ----------------------------------------------------------------------------- the logic
class VAEAnomalyLogic:
    def __init__(self, scene):
        if scene is None:
            raise ValueError("VAEAnomalyLogic needs an MRML scene")
        self.scene = scene
        self.empty_reason = None  # why the last create_segment gave an empty segment (None: it was not empty)
        self.empty_segments = []  # the names of the segments the last create_segment wrote empty
        self._register_converters()

    # ------------------------------------------------------------------ setup helpers
    @staticmethod
    def _register_converters():
        """Closed-surface conversion needs the converter rules (the application registers them;
        headless we do it once, before any segmentation node is made)."""
        import slicer
        factory = slicer.vtkSegmentationConverterFactory.GetInstance()
        rules = factory.GetConverterRules()
        if rules is None or len(rules) == 0:
            factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
            factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())

    def heat_color_node(self):
        """Inferno where the file-based tables exist (the application); otherwise our own heat table."""
        node = self.scene.GetNodeByID("vtkMRMLColorTableNodeFileInferno.txt")
        if node is not None:
            return node
        nodes = self.scene.GetNodesByName(HEAT_TABLE_NAME)
        if nodes.GetNumberOfItems():
            return nodes.GetItemAsObject(0)
        import slicer
        node = slicer.vtkMRMLColorTableNode()
        node.SetName(HEAT_TABLE_NAME)
        node.SetTypeToUser()
        node.SetNumberOfColors(256)
        anchors = np.array(_INFERNO)
        x = np.linspace(0, 1, len(anchors))
        for i in range(256):
            t = i / 255
            rgb = [float(np.interp(t, x, anchors[:, k])) for k in range(3)]
            node.SetColor(i, f"{i}", *rgb, 1.0)
        node.SetAttribute("Category", "VAEAnomaly")
        self.scene.AddNode(node)
        return node

    # ------------------------------------------------------------------ inputs
    def input_images(self, inputVolume, maskNode=None):
        """(image, mask image or None) from nodes, validated. Masks: label map or segmentation."""
        from vaeanomaly.volume import VolumeError, check_image
        img = image_from_node(inputVolume)
        check_image(img, f"input volume '{inputVolume.GetName()}'")
        mask = None
        if maskNode is not None:
            if maskNode.IsA("vtkMRMLSegmentationNode"):
                mask = self._segmentation_mask(maskNode, inputVolume)
            else:
                mask = self._labelmap_mask(maskNode, inputVolume, img)
                if mask.GetSize() != img.GetSize():
                    raise VolumeError("the brain mask label map is not on the input volume's grid; "
                                      "resample it (Resample Scalar/Vector/DWI Volume) or use a segmentation")
        return img, mask

    @staticmethod
    def _labelmap_mask(maskNode, inputVolume, img):
        """A label-map mask as an image in the input volume's frame (the mask node is untouched). The core compares
        the mask's grid with the input's in each node's own coordinates; a mask under another parent transform than
        the input lies elsewhere in the world, so it is resampled (nearest neighbour) through the transform between
        the two frames onto the input's grid. A transform between them that is not linear is refused."""
        import SimpleITK as sitk
        import slicer
        import vtk

        from vaeanomaly.volume import VolumeError
        mask = image_from_node(maskNode, "brain mask")
        src, dst = maskNode.GetParentTransformNode(), inputVolume.GetParentTransformNode()
        if (src.GetID() if src else None) == (dst.GetID() if dst else None):
            return mask
        m = vtk.vtkMatrix4x4()
        if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(src, dst, m):
            raise VolumeError(f"the brain mask '{maskNode.GetName()}' is under another transform than the input volume "
                              f"'{inputVolume.GetName()}', and the transform between them is not linear: harden the "
                              f"transforms (Transforms module, 'Harden transform') or resample the mask onto the "
                              f"input volume, then press Apply again")
        mask_to_input = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
        if np.allclose(mask_to_input, np.eye(4), atol=1e-9):
            return mask
        # SimpleITK maps the output's (the input volume's) physical points to the mask's: the inverse, in LPS
        inv, flip = np.linalg.inv(mask_to_input), np.diag([-1.0, -1.0, 1.0])
        tx = sitk.AffineTransform(3)
        tx.SetMatrix(tuple((flip @ inv[:3, :3] @ flip).ravel()))
        tx.SetTranslation(tuple(flip @ inv[:3, 3]))
        return sitk.Resample(mask, img, tx, sitk.sitkNearestNeighbor, 0, mask.GetPixelID())

    def _segmentation_mask(self, segNode, referenceVolume):
        """Visible segments of a segmentation, on the reference volume's grid (segmentation untouched)."""
        import SimpleITK as sitk
        mask = sitk.GetImageFromArray(self._segment_array(segNode, None, referenceVolume).astype(np.uint8))
        mask.CopyInformation(image_from_node(referenceVolume))
        return mask

    def _remove(self, node):
        if node is None:
            return
        for i in range(node.GetNumberOfDisplayNodes() if hasattr(node, "GetNumberOfDisplayNodes") else 0):
            d = node.GetNthDisplayNode(i)
            if d is not None:
                self.scene.RemoveNode(d)
        if hasattr(node, "GetStorageNode") and node.GetStorageNode() is not None:
            self.scene.RemoveNode(node.GetStorageNode())
        self.scene.RemoveNode(node)

    # ------------------------------------------------------------------ processing
    def process(self, inputVolume, maskNode=None, model: Optional[str] = None, predictor: Optional[str] = None,
                options=None, device: str = "cpu", heatmapNode=None, reconstruction: bool = False,
                progress: Optional[Callable[[float], None]] = None,
                cancel: Optional[Callable[[], bool]] = None):
        """Score the input in this process. Returns the heatmap node (and sets the reconstruction node
        as self.lastReconstruction when asked). Raises before touching the scene on bad input or cancel.
        The request is a `vaeanomaly.scoring.ScoreRequest`, checked and run as the warm worker runs it
        (ScoreRequest.checked, scoring.run), without a report."""
        from vaeanomaly.checkpoint import load_checkpoint
        from vaeanomaly.predictors import PredictorOptions
        from vaeanomaly.registry import DEFAULT_PREDICTORS, RECONSTRUCTION
        from vaeanomaly.scoring import ScoreRequest, run
        img, mask = self.input_images(inputVolume, maskNode)
        ck = load_checkpoint(model)
        predictor = predictor or DEFAULT_PREDICTORS[ck.kind]  # none given: the model's own default
        request = ScoreRequest(input=inputVolume.GetName(), model=str(ck.path),
                               predictors=",".join([predictor] + ([RECONSTRUCTION] if reconstruction else [])),
                               options=options if options is not None else PredictorOptions(), device=device)
        maps = run(request, ck, img, mask, request.checked(ck), progress=progress, cancel=cancel)
        return self.add_results(inputVolume, maps, ck, predictor, options, heatmapNode)

    def add_results(self, inputVolume, maps: dict, checkpoint, predictor: str, options=None, heatmapNode=None):
        """Put computed maps (SimpleITK images on the input grid) into the scene."""
        import slicer
        if predictor not in maps:  # checked before anything in the scene changes
            raise RuntimeError(f"the scoring produced no '{predictor}' map")
        node = heatmapNode
        if node is None:
            node = slicer.vtkMRMLScalarVolumeNode()
            node.SetName(self.scene.GenerateUniqueName(f"{inputVolume.GetName()} anomaly ({predictor})"))
            self.scene.AddNode(node)
        set_node_from_image(node, maps[predictor])
        # the maps are on the input's voxel grid (its IJK-to-RAS), so they sit under the same parent transform:
        # in world coordinates they lie where the (transformed) input is shown
        node.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())
        opts = options.to_dict() if options is not None else {}
        for k, v in {"VAEAnomaly.Model": checkpoint.name, "VAEAnomaly.Predictor": predictor,
                     "VAEAnomaly.Input": inputVolume.GetID(), "VAEAnomaly.Options": json.dumps(opts)}.items():
            node.SetAttribute(k, v)  # provenance only; nothing parses these back
        from vaeanomaly.calibration import is_two_tailed, region_peak
        if is_two_tailed(predictor, options):  # the map keeps its sign: bright and dark apart
            node.SetAttribute(SIGNED, "1")
        else:
            node.RemoveAttribute(SIGNED)
        peak = region_peak(checkpoint, predictor, options)  # read back by create_segment and update_findings
        if peak is None:
            node.RemoveAttribute(REGION_PEAK)
        else:  # a signed map: the two tails' peaks
            node.SetAttribute(REGION_PEAK, json.dumps(peak.to_dict()) if isinstance(peak, Tails) else repr(float(peak)))
        self.lastCalibratedThreshold, self.lastCalibrationNote = calibrated_threshold(checkpoint, predictor, options)
        # kept on the heatmap (saved with the scene): picking it again in the panel restores its own threshold
        store_calibration(node, self.lastCalibratedThreshold, self.lastCalibrationNote,
                          calibrated_pair(checkpoint, predictor, options)[0])
        self._display_heatmap(node)
        self.lastReconstruction = None
        if "reconstruction" in maps:  # registry.RECONSTRUCTION
            rec = slicer.vtkMRMLScalarVolumeNode()
            rec.SetName(self.scene.GenerateUniqueName(f"{inputVolume.GetName()} reconstruction"))
            self.scene.AddNode(rec)
            set_node_from_image(rec, maps["reconstruction"])
            rec.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())
            rec.SetAttribute("VAEAnomaly.ReconstructionOf", inputVolume.GetID())  # not a scan (adapt refuses it)
            rec.CreateDefaultDisplayNodes()
            self.lastReconstruction = rec
        return node

    def _display_heatmap(self, node):
        """Inferno from 0 to the 99.5th percentile; a signed heatmap (is_signed) its own diverging colour table
        (diverging_color_node) on a window symmetric about 0 (+-the 99.5th percentile of |value|), so 0 (as
        expected) sits in its middle: blue darker, red brighter than expected."""
        from vtk.util.numpy_support import vtk_to_numpy
        if node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()
        disp = node.GetDisplayNode()
        arr = vtk_to_numpy(node.GetImageData().GetPointData().GetScalars())
        disp.AutoWindowLevelOff()
        if is_signed(node):
            mag = np.abs(arr[arr != 0])
            hi = float(np.percentile(mag, 99.5)) if mag.size else 1.0
            disp.SetAndObserveColorNodeID(self.diverging_color_node(node).GetID())
            disp.SetWindowLevelMinMax(-hi, hi)
            disp.ApplyThresholdOff()
            return
        disp.SetAndObserveColorNodeID(self.heat_color_node().GetID())
        pos = arr[arr > 0]
        hi = float(np.percentile(pos, 99.5)) if pos.size else 1.0
        disp.SetWindowLevelMinMax(0.0, hi)

    def diverging_color_node(self, heatmapNode):
        """The signed heatmap's own diverging colour table (made once, attribute DIVERGING_OF): its own because the
        threshold preview makes the entries between the tails transparent (preview_threshold), and another heatmap
        keeps its own band."""
        import slicer
        for i in range(self.scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode")):
            node = self.scene.GetNthNodeByClass(i, "vtkMRMLColorTableNode")
            if node.GetAttribute(DIVERGING_OF) == heatmapNode.GetID():
                return node
        node = slicer.vtkMRMLColorTableNode()
        node.SetName(self.scene.GenerateUniqueName(f"VAEAnomaly Diverging ({heatmapNode.GetName()})"))
        node.SetTypeToUser()
        node.SetNumberOfColors(256)
        anchors = np.array(_DIVERGING)
        x = np.linspace(0, 1, len(anchors))
        for i in range(256):
            rgb = [float(np.interp(i / 255, x, anchors[:, k])) for k in range(3)]
            node.SetColor(i, f"{i}", *rgb, 1.0)
        node.SetAttribute("Category", "VAEAnomaly")
        node.SetAttribute(DIVERGING_OF, heatmapNode.GetID())
        self.scene.AddNode(node)
        return node

    def _preview_band(self, heatmapNode, tails: Optional[Tails]) -> None:
        """A signed heatmap's preview: the entries of its diverging table whose values all lie between the tails
        (-dark <= s <= bright) transparent, the others opaque (tails None: all opaque). The display node maps its
        window [lo, hi] onto the 256 entries (vtkMRMLScalarVolumeDisplayNode: window/level to 0..255, then the
        table; the table's alpha becomes the slice view's), values beyond the window onto the end entries; an entry
        is shown when any value it stands for is beyond a tail, so no voxel above a threshold is ever hidden (one
        entry, 1/255 of the window, below it may show)."""
        disp = heatmapNode.GetDisplayNode()
        table = self.diverging_color_node(heatmapNode)
        if disp.GetColorNodeID() != table.GetID():
            disp.SetAndObserveColorNodeID(table.GetID())
        lo, hi = disp.GetWindowLevelMin(), disp.GetWindowLevelMax()
        step = (hi - lo) / 255
        rgba = [0.0] * 4
        was = table.StartModify()
        try:
            for i in range(256):
                low = -np.inf if i == 0 else lo + i * step
                high = np.inf if i == 255 else lo + (i + 1) * step
                table.GetColor(i, rgba)
                shown = tails is None or high > tails.bright or low < -tails.dark
                table.SetColor(i, *rgba[:3], 1.0 if shown else 0.0)
        finally:
            table.EndModify(was)

    # ------------------------------------------------------------------ threshold and segment
    @staticmethod
    def heatmap_array(node) -> np.ndarray:
        from vtk.util.numpy_support import vtk_to_numpy
        d = node.GetImageData()
        return vtk_to_numpy(d.GetPointData().GetScalars()).reshape(d.GetDimensions()[::-1])

    def resolve_threshold(self, heatmapNode, spec, calibrated: Optional[float] = None) -> float:
        """A number, 'pNN' (percentile inside the brain) or 'auto' (`calibrated`: the checkpoint's
        healthy-brain threshold for this predictor, a number carried by the job's result). A signed heatmap
        (is_signed): a percentile of |value| inside the brain (value != 0), one threshold for both tails; 'auto' its
        calibrated tails (a threshold.Tails, tails_of)."""
        from vaeanomaly.threshold import resolve_tails, resolve_threshold
        arr = self.heatmap_array(heatmapNode)
        pred = heatmapNode.GetAttribute("VAEAnomaly.Predictor") or ""
        if is_signed(heatmapNode):
            tails = tails_of(heatmapNode)
            t = resolve_tails(spec, arr, arr != 0, {pred: tails} if tails is not None else {}, pred)
            return t if str(spec).strip().lower() == "auto" else float(t.bright)
        return resolve_threshold(spec, arr, arr > 0, {pred: float(calibrated)} if calibrated is not None else {}, pred)

    def preview_threshold(self, heatmapNode, threshold):
        """Live preview: show only voxels above the threshold (display only; voxels unchanged). A signed heatmap:
        `threshold` a threshold.Tails (or a number t for both: |value| > t), the voxels brighter than +bright or
        darker than -dark are shown, through its colour table (_preview_band): the display node's threshold keeps
        one interval only."""
        disp = heatmapNode.GetDisplayNode()
        if is_signed(heatmapNode):
            disp.ApplyThresholdOff()
            self._preview_band(heatmapNode, None if threshold is None else as_tails(threshold))
            return
        if threshold is None:
            disp.ApplyThresholdOff()
            return
        disp.SetThreshold(float(threshold), float(self.heatmap_array(heatmapNode).max()) + 1.0)
        disp.ApplyThresholdOn()

    def _segment_array(self, segNode, segmentId, referenceVolume) -> np.ndarray:
        """One segment (or, with segmentId None, all visible segments) as a bool array on the reference
        volume's grid, through a temporary label map that is removed again."""
        import slicer
        import vtk

        from vaeanomaly.volume import VolumeError
        ids = vtk.vtkStringArray()
        if segmentId is not None:
            ids.InsertNextValue(segmentId)
        else:
            # the visible segments, named here: Slicer's ExportVisibleSegmentsToLabelmapNode passes an empty list on
            # to ExportSegmentsToLabelmapNode when none is visible, and an empty list there means *every* segment
            display = segNode.GetDisplayNode()
            if display is not None:
                display.GetVisibleSegmentIDs(ids)
            else:  # nothing hides a segment without a display node
                for sid in segNode.GetSegmentation().GetSegmentIDs():
                    ids.InsertNextValue(sid)
            if ids.GetNumberOfValues() == 0:
                if segNode.GetSegmentation().GetNumberOfSegments() == 0:
                    raise VolumeError(f"segmentation '{segNode.GetName()}' has no segments: choose another mask, "
                                      f"or none for the automatic one")
                raise VolumeError(f"every segment of segmentation '{segNode.GetName()}' is hidden, and its visible "
                                  f"segments are the mask: show the brain segment(s) (the eye icon in the "
                                  f"Segmentations or Data module), or choose another mask")
        label = slicer.vtkMRMLLabelMapVolumeNode()
        self.scene.AddNode(label)
        colors = self._node_ids("vtkMRMLColorTableNode")  # the export adds a color table for the label map
        try:
            ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segNode, ids, label,
                                                                                       referenceVolume)
            if not ok or label.GetImageData() is None:
                raise VolumeError(f"could not export segmentation '{segNode.GetName()}' as a label map")
            return self.heatmap_array(label) > 0  # a new array: survives the node's removal
        finally:
            display = label.GetDisplayNode()
            color = display.GetColorNodeID() if display is not None else None
            self._remove(label)
            if color and color not in colors:  # made by this export: removed with the label map
                self.scene.RemoveNode(self.scene.GetNodeByID(color))

    def _node_ids(self, cls: str) -> set:
        nodes = self.scene.GetNodesByClass(cls)
        return {nodes.GetItemAsObject(i).GetID() for i in range(nodes.GetNumberOfItems())}

    @staticmethod
    def _hash(mask: np.ndarray) -> str:
        return hashlib.sha1(np.packbits(mask.astype(bool)).tobytes() + str(mask.shape).encode()).hexdigest()

    def create_segment(self, heatmapNode, threshold, segmentationNode=None, referenceVolume=None,
                       overwrite: bool = False, show3D: bool = False, min_region_mm3: Optional[float] = None,
                       min_peak=None):
        """Write voxels above `threshold` as segment 'Anomaly' (reference geometry = the input volume), without
        regions smaller than min_region_mm3 (default: vaeanomaly.regions.DEFAULT_MIN_REGION_MM3, as the command
        line's --label) and, given min_peak (at the calibrated threshold the panel passes the heatmap's region
        peak, region_peak_of, as `--threshold auto` does), regions whose peak stays below it. Refuses to replace an
        'Anomaly' segment the user edited unless overwrite=True. Nothing above the threshold is a valid result: an
        empty 'Anomaly' segment (to paint in), and `empty_reason` says why it is empty (None when it is not).

        A signed heatmap (is_signed; threshold a threshold.Tails or a number t for both tails, min_peak a Tails or
        None): two segments, 'Brighter than expected' (s > bright) and 'Darker than expected' (s < -dark), each
        direction's regions kept apart (vaeanomaly.regions.direction_masks: the voxels of `score --label`'s 1 and
        2), each with its own terminology (SIGNED_TERMINOLOGY); an edited one of them is refused as 'Anomaly' is,
        before either changes. `empty_segments`: the names of the segments written empty."""
        import slicer

        from vaeanomaly.regions import DEFAULT_MIN_REGION_MM3, direction_masks, keep_large
        ref = referenceVolume or self.scene.GetNodeByID(heatmapNode.GetAttribute("VAEAnomaly.Input") or "") or heatmapNode
        heat = self.heatmap_array(heatmapNode)
        min_mm3 = DEFAULT_MIN_REGION_MM3 if min_region_mm3 is None else float(min_region_mm3)
        if is_signed(heatmapNode):
            tails = as_tails(threshold)
            peaks = None if min_peak is None else as_tails(min_peak)
            masks = direction_masks(heat, tails, heatmapNode.GetSpacing(), min_mm3, peaks)
            segments = [(SIGNED_SEGMENT_NAMES[d], masks[d], SIGNED_TERMINOLOGY[d], SIGNED_COLORS[d])
                        for d in SIGNED_SIDES]
            above_any, shown = masks["above"] > 0, f"{tails:.4g}"
        else:
            peaks = None if min_peak is None else float(min_peak)
            above = heat > float(threshold)
            segments = [(SEGMENT_NAME, keep_large(above, heatmapNode.GetSpacing(), min_mm3, heat, peaks),
                         TERMINOLOGY_ENTRY, SEGMENT_COLOR)]
            above_any, shown = bool(above.any()), f"{float(threshold):.4g}"
        self.empty_segments = [name for name, mask, _, _ in segments if not mask.any()]
        self.empty_reason = None if len(self.empty_segments) < len(segments) else (  # a valid, empty result
            f"no voxel of '{heatmapNode.GetName()}' is above the threshold {shown}"
            + (f" in a region of at least {min_mm3:g} mm3" if above_any else "")
            + (f" that reaches {peaks:.4g} (the model's region peak)" if above_any and peaks is not None else ""))
        if segmentationNode is None:
            segmentationNode = slicer.vtkMRMLSegmentationNode()
            segmentationNode.SetName(self.scene.GenerateUniqueName(f"{ref.GetName()} anomaly segmentation"))
            self.scene.AddNode(segmentationNode)
            segmentationNode.CreateDefaultDisplayNodes()
            segmentationNode.SetAndObserveTransformNodeID(ref.GetTransformNodeID())  # where the input is shown
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(ref)
        seg = segmentationNode.GetSegmentation()
        old = {}
        for name, _, _, _ in segments:  # every segment checked before any is replaced
            old_id = seg.GetSegmentIdBySegmentName(name)
            if not old_id:
                continue
            import vtk
            ref_str = vtk.reference("")
            stored = str(ref_str) if seg.GetSegment(old_id).GetTag(HASH_TAG, ref_str) else None
            current = self._hash(self._segment_array(segmentationNode, old_id, ref))
            if stored != current and not overwrite:
                raise SegmentEditedError(f"segment '{name}' in '{segmentationNode.GetName()}' was edited "
                                         f"since it was created; keep it, or confirm to overwrite it")
            old[name] = old_id
        for name, mask, entry, color in segments:
            if name in old:
                seg.RemoveSegment(old[name])
            if not mask.any():  # nothing to import: an empty segment the user can paint in
                new_ids = [seg.AddEmptySegment("", name, list(color))]
            else:
                new_ids = self._import_mask(mask, heatmapNode, segmentationNode)
            s = seg.GetSegment(new_ids[0]) if new_ids else None
            if s is not None:
                s.SetName(name)
                s.SetTag(s.GetTerminologyEntryTagName(), entry)
                s.SetColor(*color)
                s.SetTag(HASH_TAG, self._hash(self._segment_array(segmentationNode, new_ids[0], ref)))
        if show3D:
            segmentationNode.CreateClosedSurfaceRepresentation()
        return segmentationNode

    def _import_mask(self, mask: np.ndarray, heatmapNode, segmentationNode) -> list:
        """Import a non-empty mask on the heatmap's grid into the segmentation; the new segment ids."""
        import slicer
        seg = segmentationNode.GetSegmentation()
        label = slicer.vtkMRMLLabelMapVolumeNode()
        label.SetName(SEGMENT_NAME)
        self.scene.AddNode(label)
        try:
            set_node_from_image(label, self._mask_image(mask.astype(np.uint8), heatmapNode))
            # on the heatmap's grid, under its transform: the import maps it into the segmentation's coordinates
            # (vtkSlicerSegmentationsModuleLogic::ImportLabelmapToSegmentationNode applies the transform between them)
            label.SetAndObserveTransformNodeID(heatmapNode.GetTransformNodeID())
            before = set(seg.GetSegmentIDs())
            slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(label, segmentationNode)
            new_ids = [i for i in seg.GetSegmentIDs() if i not in before]
        finally:
            self._remove(label)
        return new_ids

    # ------------------------------------------------------------------ the extracted brain
    def add_brain_segmentation(self, inputVolume, mask, source: str = ""):
        """A NEW segmentation node "<input> brain (<method>)" with one segment 'Brain' (standard terminology) holding
        `mask` (a SimpleITK image on the input volume's grid, e.g. the brain the scoring extracted), under the
        input's parent transform, on the input's geometry: the user checks and edits it in the Segment Editor and
        the panel reuses it as the brain mask. No existing node is touched; an empty mask is refused."""
        import slicer

        from vaeanomaly.volume import VolumeError
        ref = image_from_node(inputVolume)
        if mask.GetSize() != ref.GetSize() or not np.allclose(mask.GetOrigin(), ref.GetOrigin(), atol=1e-3) \
                or not np.allclose(mask.GetSpacing(), ref.GetSpacing(), rtol=1e-4) \
                or not np.allclose(mask.GetDirection(), ref.GetDirection(), atol=1e-4):
            raise VolumeError(f"the brain mask is not on the grid of '{inputVolume.GetName()}'")
        import SimpleITK as sitk
        arr = sitk.GetArrayViewFromImage(mask) > 0
        if not arr.any():
            raise VolumeError(f"the brain mask of '{inputVolume.GetName()}' is empty")
        method = source[source.find("(") + 1:source.rfind(")")] if "(" in source else (source or "mask")
        seg = slicer.vtkMRMLSegmentationNode()
        seg.SetName(self.scene.GenerateUniqueName(f"{inputVolume.GetName()} brain ({method})"))
        self.scene.AddNode(seg)
        try:
            seg.CreateDefaultDisplayNodes()
            seg.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())  # where the input is shown
            seg.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
            if source:
                seg.SetAttribute(MASK_SOURCE, source)
            label = slicer.vtkMRMLLabelMapVolumeNode()
            label.SetName(BRAIN_SEGMENT_NAME)
            self.scene.AddNode(label)
            try:
                clean = sitk.GetImageFromArray(arr.astype(np.uint8))
                clean.CopyInformation(ref)  # the input's own geometry (a file's header may round it)
                set_node_from_image(label, clean)
                label.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())
                if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(label, seg):
                    raise VolumeError("could not import the brain mask into a segmentation")
            finally:
                self._remove(label)
            segmentation = seg.GetSegmentation()
            if segmentation.GetNumberOfSegments() != 1:
                raise VolumeError("the brain mask did not become one segment")
            s = segmentation.GetNthSegment(0)
            s.SetName(BRAIN_SEGMENT_NAME)
            s.SetTag(s.GetTerminologyEntryTagName(), BRAIN_TERMINOLOGY_ENTRY)
            s.SetColor(*BRAIN_COLOR)
        except Exception:
            self._remove(seg)  # never a half-made node left behind
            raise
        return seg

    # ------------------------------------------------------------------ findings
    def findings_nodes(self, heatmapNode):
        """(table node, markups node) holding the findings of this heatmap, or None for each not made yet."""
        out = {"vtkMRMLTableNode": None, "vtkMRMLMarkupsFiducialNode": None}
        for cls in out:
            for i in range(self.scene.GetNumberOfNodesByClass(cls)):
                node = self.scene.GetNthNodeByClass(i, cls)
                if node.GetAttribute(FINDINGS_OF) == heatmapNode.GetID() and node.IsA(cls):
                    out[cls] = node
                    break
        return out["vtkMRMLTableNode"], out["vtkMRMLMarkupsFiducialNode"]

    def update_findings(self, heatmapNode, threshold, inputVolume=None, min_region_mm3: Optional[float] = None,
                        min_peak=None):
        """The findings of the heatmap above `threshold` (vaeanomaly.findings.find: regions of at least
        min_region_mm3, default vaeanomaly.regions.DEFAULT_MIN_REGION_MM3 as for Create segment, reaching min_peak
        where given as for Create segment, ranked by
        score mass; the input volume gives their mean intensity) into the scene: a table node (one row per
        finding, saved with the scene) and one point list with a control point per finding at its centroid,
        labelled "A1 3.2 ml". A signed heatmap (is_signed; threshold and min_peak as create_segment takes them): each
        direction's regions (find's per-tail findings: their `direction`, peak and mean as magnitudes in it), and the
        table has a direction column. Both are this heatmap's own (attribute VAEAnomaly.FindingsOf), updated in place on
        later calls. Centroids are RAS in the heatmap's frame, so the point list sits under the heatmap's parent
        transform (the input volume's: add_results puts it there). No finding: an empty table and point list.
        Returns (table node, markups node, the findings as find() gives them, LPS, each with centroid_ras_mm)."""
        import SimpleITK as sitk
        import slicer

        from vaeanomaly.findings import find
        from vaeanomaly.regions import DEFAULT_MIN_REGION_MM3
        heat = image_from_node(heatmapNode, "heatmap")
        image = None
        if inputVolume is not None and inputVolume.GetImageData() is not None:
            image = image_from_node(inputVolume)
            if image.GetSize() != heat.GetSize():  # not the heatmap's grid: no intensities rather than wrong ones
                image = None
        # the brain is where the heatmap is positive (as resolve_threshold's percentile): the intensities' z-scores
        # are taken inside it, and a threshold at or below zero never makes the background a finding; a signed
        # heatmap's brain is where it is not zero (scoring writes 0 outside the brain)
        signed = is_signed(heatmapNode)
        brain = sitk.Cast(heat != 0 if signed else heat > 0, sitk.sitkUInt8)
        min_mm3 = DEFAULT_MIN_REGION_MM3 if min_region_mm3 is None else float(min_region_mm3)
        if signed:
            threshold, min_peak = as_tails(threshold), None if min_peak is None else as_tails(min_peak)
        else:
            threshold, min_peak = float(threshold), None if min_peak is None else float(min_peak)
        found = find(heat, threshold, image, brain, min_mm3, min_peak)
        for f in found:
            x, y, z = f["centroid_lps_mm"]
            f["centroid_ras_mm"] = [-x, -y, z]
        table, points = self.findings_nodes(heatmapNode)
        name = f"{heatmapNode.GetName()} findings"
        if table is None:
            table = slicer.vtkMRMLTableNode()
            table.SetName(self.scene.GenerateUniqueName(name))
            table.SetAttribute(FINDINGS_OF, heatmapNode.GetID())
            self.scene.AddNode(table)
        if points is None:
            points = slicer.vtkMRMLMarkupsFiducialNode()
            points.SetName(self.scene.GenerateUniqueName(name))
            points.SetAttribute(FINDINGS_OF, heatmapNode.GetID())
            points.SetLocked(1)  # computed positions: not dragged by accident
            with _active_place_node_kept(self.scene):  # never the list the user's next point goes into
                self.scene.AddNode(points)
            points.CreateDefaultDisplayNodes()
        self._fill_findings_table(table, found, signed)
        points.SetAndObserveTransformNodeID(heatmapNode.GetTransformNodeID())
        wasModifying = points.StartModify()
        try:
            points.RemoveAllControlPoints()
            for f in found:
                points.AddControlPoint(*f["centroid_ras_mm"], finding_label(f))
        finally:
            points.EndModify(wasModifying)
        for node in (table, points):
            node.SetAttribute("VAEAnomaly.Threshold", f"{threshold:.6g}")  # a signed one: "+b / -d"
        return table, points, found

    @staticmethod
    def _fill_findings_table(table, found: list, signed: bool = False) -> None:
        import vtk
        columns = [(vtk.vtkStringArray, "id", lambda f: f["id"], "A1 is the largest score mass")]
        if signed:  # a signed heatmap: each finding's direction; its peak and mean are magnitudes in that direction
            columns.append((vtk.vtkStringArray, "direction", lambda f: f.get("direction") or "",
                            "brighter or darker than a healthy brain would be"))
        columns += [(vtk.vtkDoubleArray, "volume (ml)", lambda f: f["volume_ml"], ""),
                   (vtk.vtkDoubleArray, "peak", lambda f: f["peak"], "highest anomaly score in the region"),
                   (vtk.vtkDoubleArray, "mean", lambda f: f["mean"], "mean anomaly score in the region")]
        for k, axis in enumerate("RAS"):
            columns.append((vtk.vtkDoubleArray, f"centroid {axis} (RAS mm)",
                            lambda f, k=k: f["centroid_ras_mm"][k],
                            "centroid in Slicer's RAS coordinates of the heatmap's frame (the command line's "
                            "findings are LPS: x and y negated)"))
        k_axis = "slice index along the volume's K axis"
        columns += [(vtk.vtkIntArray, "first slice", lambda f: f["slice_first"], k_axis),
                    (vtk.vtkIntArray, "last slice", lambda f: f["slice_last"], k_axis)]
        wasModifying = table.StartModify()
        try:
            table.RemoveAllColumns()
            for cls, title, get, description in columns:
                arr = cls()
                arr.SetName(title)
                for f in found:
                    arr.InsertNextValue(get(f))
                table.AddColumn(arr)
                if description:
                    table.SetColumnDescription(title, description)
            table.SetColumnUnitLabel("volume (ml)", "ml")
        finally:
            table.EndModify(wasModifying)

    @staticmethod
    def _mask_image(mask, like_node):
        import SimpleITK as sitk
        img = sitk.GetImageFromArray(mask)
        ref = image_from_node(like_node, "heatmap")
        img.CopyInformation(ref)
        return img


@contextmanager
def _active_place_node_kept(scene):
    """Markups added inside this block do not become the list that points placed with the mouse go into.
    Slicer's Markups logic makes every markups node added to the scene the active one (vtkSlicerMarkupsLogic::
    OnMRMLSceneNodeAdded -> SetActiveList: the selection node's active place node ID and class name), so the
    user's next point would land in the findings list and be wiped by the next findings update: the selection
    node's active place node (ID and class) is put back as it was."""
    selection = scene.GetNodeByID("vtkMRMLSelectionNodeSingleton") or scene.GetFirstNodeByClass("vtkMRMLSelectionNode")
    if selection is None:  # no selection node (a bare scene): no active list to protect
        yield
        return
    old_id, old_class = selection.GetActivePlaceNodeID(), selection.GetActivePlaceNodeClassName()
    try:
        yield
    finally:
        if old_class is not None and selection.GetActivePlaceNodeClassName() != old_class:
            selection.SetReferenceActivePlaceNodeClassName(old_class)  # (none set before: the toolbar keeps points)
        if selection.GetActivePlaceNodeID() != old_id:
            selection.SetReferenceActivePlaceNodeID(old_id)


# ----------------------------------------------------------------------------- the background job
# the process side (the session's warm worker, stopping a process tree) lives in worker.py
from .worker import kill_process_tree, python_executable  # noqa: E402,F401  (names this module always had)

_CHECKPOINTS = None  # the panel's side of a job needs a checkpoint's name and thresholds: once per file version


def cached_checkpoint(model):
    """load_checkpoint, once per file version (a rewritten file is read again): the worker's own cache."""
    global _CHECKPOINTS
    if _CHECKPOINTS is None:
        from vaeanomaly.score_worker import ModelCache
        _CHECKPOINTS = ModelCache()
    return _CHECKPOINTS.get(model)[0]


def calibrated_threshold(checkpoint, predictor: str, options=None) -> tuple[Optional[float], str]:
    """(the checkpoint's healthy-brain threshold for `predictor` with these options as a number, "") or
    (None, why not) -- vaeanomaly.calibration decides whether a calibration holds. A signed map under polarity
    'signed' has two (calibrated_pair): the larger, where the panel's slider shows them."""
    from vaeanomaly.calibration import calibrated_threshold as _calibrated
    from vaeanomaly.calibration import is_two_tailed
    try:
        if is_two_tailed(predictor, options):
            tails, why = calibrated_pair(checkpoint, predictor, options)
            return (None, why) if tails is None else (max(tails.bright, tails.dark), "")
        return float(_calibrated(checkpoint, predictor, options)), ""
    except ValueError as err:
        return None, str(err)
    except Exception as err:  # a calibration that cannot be read never stops a computation
        return None, f"the checkpoint's calibration could not be read ({type(err).__name__}: {err})"


def cli_supports(option: str, command: str = "score") -> bool:
    """Whether this version of the `vaeanomaly` command line knows `option` (e.g. --report)."""
    import argparse

    from vaeanomaly.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return option in sub.choices[command]._option_string_actions


REGION_PEAK = "VAEAnomaly.RegionPeak"  # heatmap node attribute: the calibrated region peak (add_results)


CALIBRATED_THRESHOLD = "VAEAnomaly.CalibratedThreshold"  # heatmap node attribute: its calibrated threshold
CALIBRATION_NOTE = "VAEAnomaly.CalibrationNote"  # heatmap node attribute: why it has none (add_results)


CALIBRATED_TAILS = "VAEAnomaly.CalibratedTails"  # on a signed heatmap: its per-tail thresholds (JSON)


def is_signed(heatmapNode) -> bool:
    """A heatmap scored with its sign (polarity 'signed': positive brighter, negative darker than expected)."""
    return heatmapNode is not None and heatmapNode.GetAttribute(SIGNED) == "1"


def as_tails(value) -> Tails:
    """A signed map's thresholds: a threshold.Tails as it is, a number t as Tails(t, t) (|value| > t, both tails)."""
    return value if isinstance(value, Tails) else Tails(float(value), float(value))


def _tails_attribute(heatmapNode, name) -> Optional[Tails]:
    v = heatmapNode.GetAttribute(name) if heatmapNode is not None else None
    try:
        d = json.loads(v) if v else None
        return Tails(float(d["bright"]), float(d["dark"])) if isinstance(d, dict) else None
    except (ValueError, KeyError, TypeError):
        return None


def tails_of(heatmapNode) -> Optional[Tails]:
    """A signed heatmap's calibrated per-tail thresholds that add_results stored on it (None: none known)."""
    return _tails_attribute(heatmapNode, CALIBRATED_TAILS)


def calibrated_pair(checkpoint, predictor: str, options=None) -> tuple[Optional[Tails], str]:
    """(the checkpoint's per-tail thresholds for a signed map under polarity 'signed' as a threshold.Tails, "") or
    (None, why not); (None, "") for any other map (vaeanomaly.calibration.calibrated_tails decides)."""
    from vaeanomaly.calibration import calibrated_tails, is_two_tailed
    if not is_two_tailed(predictor, options):
        return None, ""
    try:
        tails = calibrated_tails(checkpoint, predictor, options)
    except ValueError as err:
        return None, str(err)
    if tails is None:
        return None, (f"the checkpoint records no per-tail thresholds for '{predictor}' (calibrated before two-tailed "
                      f"calibration)")
    return Tails(tails["bright"]["threshold"], tails["dark"]["threshold"]), ""


def store_calibration(heatmapNode, threshold: Optional[float], note: str = "", tails: Optional[Tails] = None) -> None:
    """Keep a heatmap's calibrated threshold (or why it has none) on the heatmap node itself; a signed heatmap's
    per-tail thresholds too (`tails`; its threshold is then the larger of the two, where the panel's slider sits)."""
    if tails is None:
        heatmapNode.RemoveAttribute(CALIBRATED_TAILS)
    else:
        heatmapNode.SetAttribute(CALIBRATED_TAILS, json.dumps(tails.to_dict()))
    if threshold is None:
        heatmapNode.RemoveAttribute(CALIBRATED_THRESHOLD)
        heatmapNode.SetAttribute(CALIBRATION_NOTE, note or "the checkpoint has no calibrated threshold for it")
    else:
        heatmapNode.SetAttribute(CALIBRATED_THRESHOLD, repr(float(threshold)))
        heatmapNode.RemoveAttribute(CALIBRATION_NOTE)


def calibration_of(heatmapNode) -> tuple[Optional[float], Optional[str]]:
    """(the calibrated threshold add_results stored on a heatmap, "") or (None, why not); (None, None) when
    nothing is stored on it (a heatmap loaded by hand, or saved by an older version of the module)."""
    if heatmapNode is None:
        return None, None
    v = heatmapNode.GetAttribute(CALIBRATED_THRESHOLD)
    try:
        if v:
            return float(v), ""
    except ValueError:
        pass
    note = heatmapNode.GetAttribute(CALIBRATION_NOTE)
    return None, (note or None)


def region_peak_of(heatmapNode):
    """The calibrated region peak that add_results stored on a heatmap node (None: keep every region, e.g. a
    heatmap loaded by hand or a model without one); a signed heatmap's: a threshold.Tails of the two tails' peaks."""
    v = heatmapNode.GetAttribute(REGION_PEAK) if heatmapNode is not None else None
    if v and v.lstrip().startswith("{"):
        return _tails_attribute(heatmapNode, REGION_PEAK)
    try:
        return float(v) if v else None
    except ValueError:
        return None


@dataclass
class JobResult:
    """What a finished job put into the scene and what it learned: the calibrated threshold as a number,
    and the out-of-distribution verdict (None when the command line wrote no report)."""
    heatmap: object
    reconstruction: object = None
    calibrated: Optional[float] = None
    verdict: Optional[dict] = None
    warnings: list = field(default_factory=list)
    calibration_note: str = ""  # why there is no calibrated threshold, when there is none
    brain_mask: object = None  # the segmentation made from the brain the scoring extracted (None: none extracted)


class ScoringJob:
    """Scores in the session's warm worker process (VAEAnomalyLib/worker.py: `vaeanomaly.score_worker`, which
    keeps torch imported and the checkpoint loaded), so the application stays responsive: start(), poll()
    from a timer, cancel() stops the worker's whole process tree (the next job starts a fresh worker),
    finish() loads the result. The scene is not touched until finish().

    The request is a `vaeanomaly.scoring.ScoreRequest` as JSON (`request`), checked and run in the worker by
    `vaeanomaly score`'s own code; the options travel inside it (PredictorOptions.to_dict()); the input and mask
    as uncompressed NRRD, the maps come back uncompressed.
    The checkpoint is loaded here once per file (name, calibrated threshold) and kept by the worker."""

    def __init__(self, logic: VAEAnomalyLogic, inputVolume, maskNode=None, model=None, predictor=None,
                 options=None, device="cpu", reconstruction=False, launcher: Optional[str] = None,
                 brain_extraction: str = "auto"):
        import SimpleITK as sitk

        from vaeanomaly.predictors import PredictorOptions
        from vaeanomaly.registry import DEFAULT_PREDICTORS, RECONSTRUCTION
        from vaeanomaly.scoring import ScoreRequest
        self.options = options if options is not None else PredictorOptions()
        img, mask = logic.input_images(inputVolume, maskNode)  # validate before any work
        self.checkpoint = cached_checkpoint(model)
        predictor = predictor or DEFAULT_PREDICTORS[self.checkpoint.kind]  # none given: the model's own default
        self.logic, self.inputVolume, self.predictor = logic, inputVolume, predictor
        self.calibrated, self.calibration_note = calibrated_threshold(self.checkpoint, predictor, self.options)
        self.tmp = Path(tempfile.mkdtemp(prefix="vaeanomaly-"))
        try:
            sitk.WriteImage(img, str(self.tmp / "input.nrrd"), False)  # uncompressed: read back at once
            if mask is not None:
                sitk.WriteImage(mask, str(self.tmp / "mask.nrrd"), False)
        except Exception:
            self.cleanup()
            raise
        names = [predictor] + ([RECONSTRUCTION] if reconstruction else [])
        self.report_path = self.tmp / "report.json"
        self.out = self.tmp / "out"
        # without a mask, a head gets its brain extracted in the worker (brain_extraction 'auto', with the [brain]
        # extra); the mask it used comes back in mask_path and becomes a segmentation (_load_maps)
        self.mask_path = self.tmp / "brain_mask.nrrd" if mask is None else None
        self.request = ScoreRequest(
            input=str(self.tmp / "input.nrrd"), output=str(self.out), predictors=",".join(names),
            mask=str(self.tmp / "mask.nrrd") if mask is not None else None, model=str(self.checkpoint.path),
            options=self.options, report=str(self.report_path), device=device, progress="lines",
            brain_extraction=brain_extraction,
            mask_out=str(self.mask_path) if self.mask_path is not None else None).to_json()
        self.launcher = launcher or python_executable()
        self.progress, self.messages = 0.0, []
        self.stage = ""  # what the worker does now (its progress lines' text: "extracting the brain (HD-BET)")
        self.mask_source: Optional[str] = None  # where the scoring's brain mask came from (the worker says)
        self.error_type: Optional[str] = None  # the failure's exception class in the worker (NotSkullStrippedError)
        self.ticket = None
        self.worker_pid: Optional[int] = None     # the Python process that scored (from its reply)
        self.model_cached: Optional[bool] = None  # whether the worker had the checkpoint loaded already
        self.worker_seconds: Optional[float] = None  # the request's time inside the worker
        self._rc: Optional[int] = None
        self._failure = ""
        self._done = False
        self.maps_ready = False  # the worker wrote the maps; the verdict may still be computing
        self.shown: Optional[JobResult] = None  # what show_maps put into the scene before the verdict

    def start(self):
        from .worker import Ticket, submit
        self.ticket = Ticket(self.request)
        try:
            submit(self.launcher, self.ticket)
        except BaseException:  # no worker could be started: the exported scan is not left behind
            self.cleanup()
            raise
        return self

    @property
    def worker(self):
        """The worker running this job (VAEAnomalyLib.worker.Worker), once started."""
        return self.ticket.worker if self.ticket is not None else None

    @property
    def proc(self):
        """The worker's process (inside Slicer the PythonSlicer launcher; the Python runs as its child)."""
        return self.worker.proc if self.worker is not None else None

    def poll(self) -> Optional[int]:
        """Update self.progress/self.messages; the exit code once finished (0: maps written), else None."""
        if self.ticket is None:
            return None
        while True:
            try:
                ev = self.ticket.events.get_nowait()
            except queue.Empty:
                break
            if ev[0] == "line":
                self._line(ev[1])
            elif ev[0] == "done":
                self._rc, info = ev[1], ev[2]
                self.worker_pid, self.model_cached = info.get("pid"), info.get("model_cached")
                self.worker_seconds = info.get("seconds")
                self.mask_source = info.get("mask_source") or self.mask_source
                self.error_type = info.get("error")
            elif ev[0] == "maps":
                self.maps_ready = True
                self.mask_source = ev[1] if len(ev) > 1 else None
            elif ev[0] == "retry":  # its worker ended before reading it; a fresh one runs it
                self.messages, self.progress, self.stage = [], 0.0, ""
            elif ev[0] == "died":
                from .worker import describe_exit
                rc = ev[1]
                last = next((m for m in reversed(self.messages) if "error" in m.lower()), "")
                oom = rc in (-9, 137)  # SIGKILL: on Linux most often the out-of-memory killer
                self._failure = (f"vaeanomaly: error: the scoring process stopped unexpectedly ({describe_exit(rc)})"
                                 + (f": {last}" if last else "")
                                 + (". It was probably out of memory: crop or resample the volume, lower the batch "
                                    "size or compute on the CPU, then try again" if oom else "")
                                 + ". The next run starts a new one.")
                self.messages.append(self._failure)
                self._rc = rc if rc else 1
        return self._rc

    def _line(self, line: str) -> None:
        if line.startswith("PROGRESS "):  # PROGRESS <fraction> ETA <seconds>s [<stage>] (scoring.Progress)
            parts = line.split(maxsplit=4)
            try:
                self.progress = float(parts[1])
            except (IndexError, ValueError):
                pass
            self.stage = parts[4].strip() if len(parts) > 4 else ""
        elif line:
            self.messages.append(line)

    def wait(self, timeout=None) -> int:
        if self.ticket is None:
            raise RuntimeError("the job was not started")
        if not self.ticket.done.wait(timeout):
            raise subprocess.TimeoutExpired("vaeanomaly.score_worker", timeout)
        return self.poll()

    def error(self) -> str:
        if self._failure:
            return self._failure
        errs = [m for m in self.messages if "error" in m.lower()]
        return (errs or self.messages or ["the scoring process failed"])[-1]

    def cancel(self):
        """Stop the computation: the worker's whole process tree is killed (the next job starts a fresh
        worker), then the temporary folder is removed (nothing can recreate it)."""
        if self.ticket is not None:
            from .worker import cancel
            cancel(self.ticket)
        self.cleanup()

    def _load_maps(self, heatmapNode=None) -> JobResult:
        import SimpleITK as sitk
        if self.inputVolume is None or self.inputVolume.GetScene() is not self.logic.scene:
            raise RuntimeError("the input volume was removed from the scene during the computation")
        maps = {p.name[:-len(".nrrd")]: sitk.ReadImage(str(p)) for p in self.out.glob("*.nrrd")
                if not p.name.startswith(".")} if self.out.is_dir() else {}
        if self.predictor not in maps:
            raise RuntimeError(f"the scoring process wrote no '{self.predictor}' heatmap "
                               f"({'; '.join(self.messages[-3:]) or 'no output'})")
        brain = self.extracted_mask()  # read (and its grid checked) before the scene changes
        heat = self.logic.add_results(self.inputVolume, maps, self.checkpoint, self.predictor, self.options,
                                      heatmapNode)
        result = JobResult(heat, self.logic.lastReconstruction, self.calibrated, None, [], self.calibration_note)
        if brain is not None:
            result.brain_mask = self.logic.add_brain_segmentation(self.inputVolume, brain, self.mask_source)
        return result

    def extracted_mask(self):
        """The brain mask the worker extracted for this job (a SimpleITK image on the input's grid), or None when
        the scoring used a given or the automatic mask."""
        import SimpleITK as sitk

        from vaeanomaly.brainextract import SOURCE
        if self.mask_source != SOURCE or self.mask_path is None:
            return None
        if not self.mask_path.is_file():
            raise RuntimeError(f"the scoring process extracted the brain but wrote no mask ({self.mask_path.name})")
        return sitk.ReadImage(str(self.mask_path))

    def show_maps(self, heatmapNode=None) -> JobResult:
        """Once `maps_ready` (poll): load the maps into the scene while the worker still computes the verdict,
        so the heatmap appears as early as possible. finish() adds the verdict to the same result."""
        if self.shown is not None or self._done:
            raise RuntimeError("this job's maps were already loaded")
        if not self.maps_ready:
            raise RuntimeError("the maps are not written yet")
        self.shown = self._load_maps(heatmapNode)
        return self.shown

    def finish(self, heatmapNode=None) -> JobResult:
        """After a successful run: load the maps into the scene (unless show_maps did) and the verdict.
        Everything is checked before the scene changes; the temporary folder is removed whatever happens."""
        try:
            if self._done:
                raise RuntimeError("this job's result was already loaded")
            self._done = True
            result = self.shown if self.shown is not None else self._load_maps(heatmapNode)
            result.verdict, result.warnings = self.read_report()
            return result
        finally:
            self.cleanup()

    def read_report(self):
        """(verdict dict or None, warnings) from the report the command line wrote, if it wrote one."""
        if not self.report_path.is_file():
            return None, []
        try:
            verdict = json.loads(self.report_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            return None, [f"The out-of-distribution report could not be read ({err}); judge the heatmap with care."]
        if not isinstance(verdict, dict):
            return None, ["The out-of-distribution report is malformed; judge the heatmap with care."]
        return verdict, [str(w) for w in verdict.get("warnings") or []]

    def cleanup(self):
        shutil.rmtree(self.tmp, ignore_errors=True)
