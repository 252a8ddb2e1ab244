"""VAEAnomaly: unsupervised anomaly heatmaps for brain MRI with a VAE / β-VAE (3D Slicer module).

Thin module file: the panel (Widget), a Logic that hands MRML nodes to VAEAnomalyLib (which runs
headless too), and the self-test. Nothing beyond a stock Slicer is imported at load time; torch and
the other packages are installed on first use, with the user's consent.
"""
import hashlib
import logging
import os
from typing import Annotated, Optional, Union

import qt
import slicer
import vtk
from slicer import (vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
SAMPLE_DIR = os.path.join(MODULE_DIR, "Resources", "SampleData")
SAMPLE_FILES = {  # file name -> SHA256 (checked by Sample Data on load)
    "VAEAnomalySample_T2.nrrd": "8d37d5c044dfda356528ba92634ff3c32693225cd688a5b0ddad78c086bb27d7",
    "VAEAnomalySample_Lesion.nrrd": "7216d9d6eef6d15eb2d16ea1632ad4192c9fbb858aed102a2ed78160cdf390d5",
}
PREDICTORS = ["rec-grad", "elbo-grad", "kl-grad", "rec-error", "combi", "proj-rec-error"]


class VAEAnomaly(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("VAE Anomaly")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["VAEAnomaly developers"]
        self.parent.helpText = _("""
Finds and outlines abnormal tissue in a T2-weighted brain MRI without labelled lesions: a variational
auto-encoder trained on healthy brains cannot explain what it has never seen, and those places light up.
Select a volume, press Apply, drag the threshold, and create an editable "Anomaly" segment.
See the <a href="https://github.com/vaeanomaly/SlicerVAEAnomaly">documentation</a>.""")
        self.parent.acknowledgementText = _("""
Method: L. Zhou, W. Deng, X. Wu, "Unsupervised anomaly localization using VAE and beta-VAE" (2020);
D. Zimmerer, F. Isensee, J. Petersen, S. Kohl, K. Maier-Hein, "Unsupervised Anomaly Localization using
Variational Auto-Encoders", MICCAI 2019. Anatomy of the bundled training data: MNI ICBM152 2009 template.""")
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """The sample case (a generated brain with a tumour-like lesion) in the Sample Data module."""
    import pathlib

    import SampleData
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="VAEAnomaly",
        sampleName="VAEAnomalyBrainLesion",
        thumbnailFileName=os.path.join(MODULE_DIR, "Resources", "Icons", "VAEAnomaly.png"),
        uris=[pathlib.Path(SAMPLE_DIR, f).as_uri() for f in SAMPLE_FILES],
        fileNames=list(SAMPLE_FILES),
        checksums=[f"SHA256:{s}" for s in SAMPLE_FILES.values()],
        nodeNames=["VAEAnomalySample_T2", "VAEAnomalySample_Lesion"],
        loadFileTypes=["VolumeFile", "LabelMapVolumeFile"],
    )


@parameterNodeWrapper
class VAEAnomalyParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    brainMask: Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode, None] = None
    model: str = "bvae-l64-b10"
    customModelPath: str = ""  # kept in sync by hand: ctkPathLineEdit has no str binding
    predictor: str = "rec-grad"
    projectionSteps: Annotated[int, WithinRange(0, 1000)] = 100
    projectionLambda: Annotated[float, WithinRange(0.0, 100.0)] = 0.5
    smoothGradients: bool = True
    useGPU: bool = False
    showReconstruction: bool = False
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.6
    thresholdMode: str = "calibrated"
    threshold: float = 0.0
    show3D: bool = False
    heatmap: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode


class VAEAnomalyWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._timer = qt.QTimer()
        self._timer.setInterval(150)
        self._timer.connect("timeout()", self._pollJob)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/VAEAnomaly.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = VAEAnomalyLogic()
        for name in self.logic.bundledModels():
            self.ui.modelSelector.addItem(name)
        self.ui.modelSelector.addItem(_("Custom file..."), "custom")
        for p in PREDICTORS:
            self.ui.predictorSelector.addItem(p)
        for mode in ("calibrated", "percentile", "absolute"):
            self.ui.thresholdModeSelector.addItem(mode)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.createSegmentButton.connect("clicked(bool)", self.onCreateSegment)
        self.ui.modelSelector.connect("currentIndexChanged(int)", self._updateModelCard)
        self.ui.customModelPath.connect("currentPathChanged(QString)", self._updateModelCard)
        self.ui.thresholdSlider.connect("valueChanged(double)", self._previewThreshold)
        self.ui.thresholdModeSelector.connect("currentIndexChanged(int)", self._thresholdModeChanged)
        self.ui.opacitySlider.connect("valueChanged(double)", self._setOpacity)
        self.initializeParameterNode()
        self._updateModelCard()

    def cleanup(self) -> None:
        self.removeObservers()
        if self._job is not None:
            self._job.cancel()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.GetAttribute("VAEAnomaly.Predictor"):
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode: Optional[VAEAnomalyParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.ui.customModelPath.currentPath = self._parameterNode.customModelPath
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        p = self._parameterNode
        running = self._job is not None
        self.ui.applyButton.enabled = bool(p and p.inputVolume) or running
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.toolTip = _("Stop the running computation") if running else \
            _("Compute the anomaly heatmap") if p and p.inputVolume else _("Select an input volume first")
        has_heat = bool(p and p.heatmap)
        self.ui.outputsCollapsibleButton.enabled = has_heat
        self.ui.customModelPath.visible = self.ui.modelSelector.currentData == "custom"

    # ------------------------------------------------------------------ model card
    def _modelChoice(self):
        if self.ui.modelSelector.currentData == "custom":
            return self.ui.customModelPath.currentPath or None
        return self.ui.modelSelector.currentText

    def _updateModelCard(self, *args) -> None:
        if self._parameterNode and self._parameterNode.customModelPath != self.ui.customModelPath.currentPath:
            self._parameterNode.customModelPath = self.ui.customModelPath.currentPath
        self._checkCanApply()
        try:
            self.ui.modelCardLabel.text = self.logic.modelCard(self._modelChoice())
        except Exception as err:  # a card is informative only; never fail the panel
            self.ui.modelCardLabel.text = _("Model unavailable: {err}").format(err=err)

    # ------------------------------------------------------------------ apply / cancel
    def onApplyButton(self) -> None:
        if self._job is not None:
            self._job.cancel()
            self._endJob(_("Cancelled."))
            return
        if not self.logic.ensureDependencies():
            return
        p = self._parameterNode
        device = "cuda" if p.useGPU else "cpu"
        if p.useGPU and not self.logic.gpuAvailable():
            slicer.util.warningDisplay(_("No CUDA GPU is available to PyTorch; computing on the CPU."))
            device = "cpu"
        warning = self.logic.memoryWarning(p.inputVolume)
        if warning and not slicer.util.confirmOkCancelDisplay(warning):
            return
        with slicer.util.tryWithErrorDisplay(_("Could not start the computation."), waitCursor=True):
            self._job = self.logic.startJob(p.inputVolume, p.brainMask, self._modelChoice(), p.predictor,
                                            steps=p.projectionSteps, lam=p.projectionLambda,
                                            smooth=p.smoothGradients, device=device,
                                            reconstruction=p.showReconstruction)
            self.ui.progressBar.value = 0
            self.ui.progressBar.visible = True
            self.ui.statusLabel.text = _("Computing {predictor}...").format(predictor=p.predictor)
            self._timer.start()
        self._checkCanApply()

    def _pollJob(self) -> None:
        job = self._job
        if job is None:
            return
        rc = job.poll()
        self.ui.progressBar.value = int(100 * job.progress)
        if rc is None:
            return
        if rc != 0:
            err = job.error()
            job.cleanup()
            self._endJob(_("Failed."))
            slicer.util.errorDisplay(_("Computing the heatmap failed:\n{err}").format(err=err))
            return
        with slicer.util.tryWithErrorDisplay(_("Could not load the result."), waitCursor=True):
            heat = job.finish()
            self._parameterNode.heatmap = heat
            self.logic.showHeatmap(self._parameterNode.inputVolume, heat, self._parameterNode.opacity)
            self._initThreshold(heat)
        self._endJob(_("Done."))

    def _endJob(self, message: str) -> None:
        self._timer.stop()
        self._job = None
        self.ui.progressBar.visible = False
        self.ui.statusLabel.text = message
        self._checkCanApply()

    # ------------------------------------------------------------------ outputs
    def _initThreshold(self, heat) -> None:
        arr = self.logic.lib.heatmap_array(heat)
        hi = float(arr.max()) if arr.size else 1.0
        self.ui.thresholdSlider.maximum = hi
        self.ui.thresholdSlider.singleStep = hi / 500 if hi > 0 else 0.01
        self._thresholdModeChanged()

    def _thresholdModeChanged(self, *args) -> None:
        heat = self._parameterNode.heatmap if self._parameterNode else None
        if heat is None:
            return
        mode = self.ui.thresholdModeSelector.currentText
        spec = {"calibrated": "auto", "percentile": "p99"}.get(mode)
        if spec is not None:
            try:
                self.ui.thresholdSlider.value = self.logic.lib.resolve_threshold(heat, spec)
            except ValueError as err:
                self.ui.statusLabel.text = str(err)

    def _previewThreshold(self, value) -> None:
        heat = self._parameterNode.heatmap if self._parameterNode else None
        if heat is not None:
            self.logic.lib.preview_threshold(heat, value)

    def _setOpacity(self, value) -> None:
        slicer.util.setSliceViewerLayers(foregroundOpacity=value)

    def onCreateSegment(self) -> None:
        from VAEAnomalyLib.logic import SegmentEditedError
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Could not create the segment."), waitCursor=True):
            try:
                seg = self.logic.lib.create_segment(p.heatmap, self.ui.thresholdSlider.value, p.segmentation,
                                                    p.inputVolume, show3D=p.show3D)
            except SegmentEditedError as err:
                if not slicer.util.confirmYesNoDisplay(str(err) + "\n\n" + _("Overwrite your edits?")):
                    return
                seg = self.logic.lib.create_segment(p.heatmap, self.ui.thresholdSlider.value, p.segmentation,
                                                    p.inputVolume, overwrite=True, show3D=p.show3D)
            p.segmentation = seg
            self.ui.statusLabel.text = _("Segment 'Anomaly' written: edit it in the Segment Editor.")


class VAEAnomalyLogic(ScriptedLoadableModuleLogic):
    """Slicer-side glue: the parameter node, dependencies, layout. The work is in VAEAnomalyLib."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._lib = None

    def getParameterNode(self):
        return VAEAnomalyParameterNode(super().getParameterNode())

    @property
    def lib(self):
        if self._lib is None:
            from VAEAnomalyLib.logic import VAEAnomalyLogic as LibLogic
            self._lib = LibLogic(slicer.mrmlScene)
        if self._lib.scene is not slicer.mrmlScene:
            self._lib.scene = slicer.mrmlScene
        return self._lib

    @staticmethod
    def bundledModels():
        models = os.path.join(MODULE_DIR, "Resources", "Models")
        return sorted(f[:-len(".safetensors")] for f in os.listdir(models) if f.endswith(".safetensors")) \
            if os.path.isdir(models) else []

    def modelCard(self, model) -> str:
        if not self.dependenciesPresent():
            return _("Model card available once PyTorch is installed (press Apply).")
        from vaeanomaly.checkpoint import load_checkpoint
        return load_checkpoint(model).card()

    @staticmethod
    def dependenciesPresent() -> bool:
        import importlib.util
        return all(importlib.util.find_spec(m) for m in ("torch", "safetensors", "sklearn"))

    def ensureDependencies(self) -> bool:
        """torch through the PyTorch extension (with consent), the rest from requirements.txt."""
        import importlib.util
        if importlib.util.find_spec("torch") is None:
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                slicer.util.errorDisplay(_("This module needs the 'PyTorch' extension. Install it from the "
                                           "Extensions Manager, restart Slicer, and press Apply again."))
                return False
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if not torchLogic.torchInstalled():
                if not slicer.util.confirmOkCancelDisplay(_("VAEAnomaly needs PyTorch (a large download). Install it now?")):
                    return False
                if torchLogic.installTorch(askConfirmation=False) is None:
                    slicer.util.errorDisplay(_("PyTorch could not be installed; see the Python console."))
                    return False
        requirements = os.path.join(MODULE_DIR, "Resources", "requirements.txt")
        try:
            import slicer.pydeps as pydeps
            reqs = pydeps.load_requirements(requirements)
            if not pydeps.pip_check(reqs):
                if not slicer.util.confirmOkCancelDisplay(_("VAEAnomaly needs a few Python packages "
                                                            "(safetensors, scikit-learn). Install them now?")):
                    return False
                pydeps.pip_ensure(reqs, requester="VAEAnomaly")
        except ImportError:  # Slicer < 5.11
            if not self.dependenciesPresent():
                if not slicer.util.confirmOkCancelDisplay(_("VAEAnomaly needs a few Python packages "
                                                            "(safetensors, scikit-learn). Install them now?")):
                    return False
                slicer.util.pip_install(["-r", requirements])
        return True

    @staticmethod
    def memoryWarning(volume) -> str:
        """A warning when scoring this volume would use more than half of the free memory."""
        from vaeanomaly.volume import available_memory, memory_needed
        dims = volume.GetImageData().GetDimensions() if volume and volume.GetImageData() else (0, 0, 0)
        need, avail = memory_needed(dims), available_memory()
        if need > 0.5 * avail:
            return _("Scoring this volume needs about {need:.1f} GB of the {avail:.1f} GB free; Slicer may become "
                     "slow. Continue?").format(need=need / 2**30, avail=avail / 2**30)
        return ""

    @staticmethod
    def gpuAvailable() -> bool:
        import torch
        return torch.cuda.is_available()

    def startJob(self, inputVolume, brainMask, model, predictor, steps=100, lam=0.5, smooth=True,
                 device="cpu", reconstruction=False):
        from VAEAnomalyLib.logic import ScoringJob
        from vaeanomaly.predictors import PredictorOptions
        opts = PredictorOptions(smooth=smooth, proj_steps=steps, proj_lambda=lam)
        return ScoringJob(self.lib, inputVolume, brainMask, model, predictor, opts, device, reconstruction).start()

    def process(self, inputVolume, brainMask=None, model=None, predictor="rec-grad", **kwargs):
        """Scripting entry point (blocking, in this process)."""
        return self.lib.process(inputVolume, brainMask, model, predictor, **kwargs)

    @staticmethod
    def showHeatmap(inputVolume, heatmap, opacity=0.6) -> None:
        slicer.util.setSliceViewerLayers(background=inputVolume, foreground=heatmap, foregroundOpacity=opacity,
                                         fit=True)
        try:  # colour legend (Colors module)
            slicer.modules.colors.logic().AddDefaultColorLegendDisplayNode(heatmap)
        except Exception as err:  # legend is optional
            logging.debug(f"no colour legend: {err}")


class VAEAnomalyTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer on the sample data, on the CPU: the same checks as the headless tests."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SampleChecksums()
        self.setUp()
        self.test_HeatmapAndSegment()

    def test_SampleChecksums(self):
        for name, sha in SAMPLE_FILES.items():
            with open(os.path.join(SAMPLE_DIR, name), "rb") as f:
                self.assertEqual(hashlib.sha256(f.read()).hexdigest(), sha)

    def test_HeatmapAndSegment(self):
        import numpy as np
        self.delayDisplay("Loading sample data")
        registerSampleData()
        import SampleData
        t2, lesion = SampleData.downloadSample("VAEAnomalyBrainLesion")
        logic = VAEAnomalyLogic()
        if not logic.dependenciesPresent():
            self.delayDisplay("PyTorch not installed: skipping the computation test")
            return
        self.delayDisplay("Computing the heatmap (CPU)")
        before = slicer.util.arrayFromVolume(t2).copy()
        heat = logic.process(t2, None, None, "rec-grad")
        self.assertEqual(heat.GetImageData().GetDimensions(), t2.GetImageData().GetDimensions())
        arr = slicer.util.arrayFromVolume(heat)
        gt = slicer.util.arrayFromVolume(lesion) > 0
        brain = arr > 0
        from vaeanomaly.metrics import pixel_metrics
        auroc = pixel_metrics(arr[brain], gt[brain])["auroc"]
        self.delayDisplay(f"AUROC inside the brain: {auroc:.3f}")
        self.assertGreater(auroc, 0.8)
        seg = logic.lib.create_segment(heat, logic.lib.resolve_threshold(heat, "auto"), None, t2)
        self.assertTrue(seg.GetSegmentation().GetSegmentIdBySegmentName("Anomaly"))
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(t2), before))  # input untouched
        self.delayDisplay("Test passed")
