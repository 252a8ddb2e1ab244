"""The Slicer panel against the rules Slicer itself applies when it loads it.

The Slicer application is not available here, so its rules are written down below, each next to the
Slicer source file it comes from (Slicer/Slicer main, commit 583e9b37d50e, read 2026-11). The parameter
node class and the .ui are read as text (VAEAnomaly.py imports qt); node classes are checked against the
real MRML classes of slicer-core. Each checker is also run on a known-bad example, so it can fail.
"""
from __future__ import annotations

import ast
import re
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, fields

import pytest

from conftest import ROOT

slicer = pytest.importorskip("slicer")

MODULE = ROOT / "VAEAnomaly"
MODULE_PY = MODULE / "VAEAnomaly.py"
UI = MODULE / "Resources" / "UI" / "VAEAnomaly.ui"

# ---------------------------------------------------------------------------------------------------------
# Base/Python/slicer/parameterNodeWrapper/guiConnectors.py: every registered GuiConnector's canRepresent()
# tests `type(widget) in (...)` (the exact class) and the unannotated type; create() then raises for a
# combo box without a Choice annotation (QComboBoxToStringableConnector, unless the type is an Enum:
# QComboBoxToEnumConnector) and for an unbounded QSlider / ctkSliderWidget / qMRMLSliderWidget
# (QSliderOrSpinBoxToIntConnector, QDoubleSpinBoxCtkSliderWidgetToFloatIntConnector). createGuiConnector()
# raises RuntimeError when no connector accepts the pair.
CONNECTOR_RULES = {
    # widget class: (accepted unannotated types, needs)
    "QCheckBox": ({"bool"}, None), "ctkCheckBox": ({"bool"}, None),
    "QPushButton": ({"bool"}, None), "ctkCheckablePushButton": ({"bool"}, None),
    "QSpinBox": ({"int"}, None), "QSlider": ({"int"}, "bounded"),
    "QDoubleSpinBox": ({"float", "int"}, None), "ctkDoubleSpinBox": ({"float", "int"}, None),
    "ctkDoubleSlider": ({"float", "int"}, None), "qMRMLSpinBox": ({"float", "int"}, None),
    "ctkSliderWidget": ({"float", "int"}, "bounded"), "qMRMLSliderWidget": ({"float", "int"}, "bounded"),
    "QComboBox": ({"int", "float", "str", "bool", "enum"}, "choice"),
    "ctkComboBox": ({"int", "float", "str", "bool", "enum"}, "choice"),
    "QLineEdit": ({"str"}, None), "QLabel": ({"str"}, None), "QTextEdit": ({"str"}, None),
    "ctkRangeWidget": ({"FloatRange"}, "range"), "ctkDoubleRangeSlider": ({"FloatRange"}, "range"),
    "qMRMLRangeWidget": ({"FloatRange"}, "range"),
    "ctkPathLineEdit": ({"Path"}, None), "ctkDirectoryButton": ({"Path"}, None),
    "qMRMLNodeComboBox": ({"node"}, None),  # qMRMLNodeComboBoxToNodeConnector: isNodeOrUnionOfNodes (util.py)
    "ctkColorPickerButton": ({"QColor"}, None),
}
# Base/Python/slicer/parameterNodeWrapper/wrapper.py _checkParamName: a SlicerParameterName that is not a
# parameter raises ValueError in connectGui.

# qSlicerIO::fileType() of Slicer's readers (loadFileTypes of SampleData are passed to coreIOManager().loadNodes):
# Modules/Loadable/Volumes/qSlicerVolumesReader.cxx "VolumeFile", Modules/Loadable/Segmentations/
# qSlicerSegmentationsReader.cxx "SegmentationFile", Modules/Loadable/Models/qSlicerModelsReader.cxx "ModelFile",
# Modules/Loadable/Markups/qSlicerMarkupsReader.cxx "MarkupsFile", Modules/Loadable/Transforms/
# qSlicerTransformsReader.cxx "TransformFile", Modules/Loadable/Colors/qSlicerColorsReader.cxx "ColorTableFile",
# Modules/Loadable/Tables/qSlicerTablesReader.cxx "TableFile", Modules/Loadable/Sequences/qSlicerSequencesReader.cxx
# "SequenceFile", Modules/Loadable/Texts/qSlicerTextsReader.cxx "TextFile", Modules/Loadable/Terminologies/
# qSlicerTerminologiesReader.cxx "TerminologyFile", Modules/Loadable/VolumeRendering/qSlicerVolumeRenderingReader.cxx
# "TransferFunctionFile", .../qSlicerShaderPropertyReader.cxx "ShaderPropertyFile", Modules/Loadable/Markups/
# qSlicerAnnotationsReader.cxx "AnnotationFile", Base/QTCore/qSlicerSceneReader.cxx and qSlicerSceneBundleReader.cxx
# "SceneFile"; Modules/Scripted/SampleData/SampleData.py handles "ZipFile" itself (downloadFromSource).
SLICER_FILE_TYPES = {"VolumeFile", "SegmentationFile", "ModelFile", "MarkupsFile", "TransformFile", "ColorTableFile",
                     "TableFile", "SequenceFile", "TextFile", "TerminologyFile", "TransferFunctionFile",
                     "ShaderPropertyFile", "AnnotationFile", "SceneFile", "ZipFile"}


# --------------------------------------------------------------------------------------------------------- reading
@dataclass
class Param:
    name: str
    base: str                     # "str", "int", "float", "bool", "node", "Path", ... or "?"
    validators: dict = field(default_factory=dict)   # "Choice" / "WithinRange" / "Minimum" / "Maximum" -> args
    node_types: list = field(default_factory=list)
    optional: bool = False
    default: object = None
    has_default: bool = False


def _namespace():
    import VAEAnomalyLib.panel as panel
    return dict(vars(panel))


def read_parameter_class(source: str, class_name: str = "VAEAnomalyParameterNode") -> dict[str, Param]:
    tree = ast.parse(source)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    ns = _namespace()
    out = {}
    for n in cls.body:
        if not (isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)):
            continue
        p = Param(n.target.id, "?")
        _annotation(n.annotation, p, ns)
        if n.value is not None:
            p.default, p.has_default = eval(compile(ast.Expression(n.value), "<default>", "eval"), ns), True
        out[p.name] = p
    return out


def _annotation(a, p: Param, ns) -> None:
    if isinstance(a, ast.Name):
        if a.id.startswith("vtkMRML"):
            p.base, p.node_types = "node", [a.id]
        else:
            p.base = a.id
        return
    if isinstance(a, ast.Constant) and a.value is None:
        p.optional = True
        return
    if isinstance(a, ast.Subscript):
        head = a.value.id if isinstance(a.value, ast.Name) else ast.unparse(a.value)
        args = a.slice.elts if isinstance(a.slice, ast.Tuple) else [a.slice]
        if head == "Annotated":
            _annotation(args[0], p, ns)
            for v in args[1:]:
                if isinstance(v, ast.Call):
                    p.validators[v.func.id] = [eval(compile(ast.Expression(x), "<v>", "eval"), ns) for x in v.args]
            return
        if head in ("Union", "Optional"):
            names = []
            for x in args:
                if isinstance(x, ast.Constant) and x.value is None:
                    p.optional = True
                else:
                    names.append(x.id if isinstance(x, ast.Name) else ast.unparse(x))
            if head == "Optional":
                p.optional = True
            if names and all(x.startswith("vtkMRML") for x in names):
                p.base, p.node_types = "node", names
            elif len(names) == 1:
                p.base = names[0]
            return
    p.base = ast.unparse(a)


@dataclass
class UiWidget:
    name: str
    cls: str
    parameter: str | None
    props: dict


def read_ui(text: str) -> dict[str, UiWidget]:
    root = ET.fromstring(text)
    out = {}
    for w in root.iter("widget"):
        props = {}
        for pr in w.findall("property"):
            child = list(pr)[0] if len(pr) else None
            if child is None:
                continue
            if child.tag == "stringlist":
                props[pr.get("name")] = [s.text for s in child]
            else:
                props[pr.get("name")] = child.text
        out[w.get("name")] = UiWidget(w.get("name"), w.get("class"), props.get("SlicerParameterName"), props)
    return out


# --------------------------------------------------------------------------------------------------------- rules
def connector_problems(widget: UiWidget, p: Param | None) -> list[str]:
    """What Slicer's connectGui would raise for this binding (empty: it connects)."""
    where = f"{widget.name} ({widget.cls}) <-> {widget.parameter}"
    if p is None:
        return [f"{where}: no such parameter (wrapper.py _checkParamName raises ValueError)"]
    if widget.cls not in CONNECTOR_RULES:
        return [f"{where}: no Slicer GUI connector for widget class {widget.cls} (guiConnectors.py)"]
    accepted, needs = CONNECTOR_RULES[widget.cls]
    problems = []
    if p.base not in accepted:
        problems.append(f"{where}: a {widget.cls} cannot represent {p.base} (accepts {sorted(accepted)})")
    if needs == "choice" and p.base != "enum" and "Choice" not in p.validators:
        problems.append(f"{where}: a combo box needs Annotated[{p.base}, Choice(...)] (QComboBoxToStringableConnector)")
    if needs == "bounded" and "WithinRange" not in p.validators and not {"Minimum", "Maximum"} <= set(p.validators):
        problems.append(f"{where}: a {widget.cls} needs WithinRange (or Minimum and Maximum)")
    if needs == "range" and "RangeBounds" not in p.validators:
        problems.append(f"{where}: a range widget needs RangeBounds")
    if p.base == "node":
        for t in p.node_types:
            cls = getattr(slicer, t, None)
            if cls is None or not issubclass(cls, slicer.vtkMRMLNode):
                problems.append(f"{where}: {t} is not an MRML node class")
        if p.node_types and widget.props.get("nodeTypes") != [getattr(slicer, t)().GetClassName() for t in p.node_types
                                                                  if getattr(slicer, t, None)]:
            problems.append(f"{where}: the .ui nodeTypes {widget.props.get('nodeTypes')} differ from the annotation "
                            f"{p.node_types} (qMRMLNodeComboBoxToNodeConnector replaces them)")
    return problems


def default_problems(p: Param) -> list[str]:
    """Validators check the default too (parameterNodeWrapper validates every write)."""
    if not p.has_default:
        return []
    out = []
    if "Choice" in p.validators and p.default not in p.validators["Choice"][0]:
        out.append(f"{p.name}: default {p.default!r} is not one of its choices")
    if "WithinRange" in p.validators:
        lo, hi = p.validators["WithinRange"]
        if not lo <= p.default <= hi:
            out.append(f"{p.name}: default {p.default!r} outside WithinRange({lo}, {hi})")
    return out


def missing_ui_names(module_source: str, ui: dict) -> set[str]:
    """`self.ui.<name>` in the module that the .ui does not define (slicer.util.childWidgetVariables)."""
    used = set(re.findall(r"\bself\.ui\.(\w+)", module_source)) | set(re.findall(r"\bwidget\.ui\.(\w+)", module_source))
    return used - set(ui)


def load_file_types(module_source: str) -> list[str]:
    tree = ast.parse(module_source)
    for call in ast.walk(tree):
        if isinstance(call, ast.Call) and getattr(call.func, "attr", "") == "registerCustomSampleDataSource":
            for kw in call.keywords:
                if kw.arg in ("loadFileTypes", "loadFileType"):
                    v = ast.literal_eval(kw.value)
                    return [v] if isinstance(v, str) else list(v)
    return []


def unpacked_download_sample(module_source: str) -> list[str]:
    """SampleData.downloadSample returns one node (Modules/Scripted/SampleData/SampleData.py); unpacking it
    into several names fails."""
    bad = []
    for n in ast.walk(ast.parse(module_source)):
        if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Tuple) and isinstance(n.value, ast.Call) \
                and getattr(n.value.func, "attr", "") == "downloadSample":
            bad.append(ast.unparse(n))
    return bad


# --------------------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def module_source():
    return MODULE_PY.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def params(module_source):
    return read_parameter_class(module_source)


@pytest.fixture(scope="module")
def ui():
    return read_ui(UI.read_text(encoding="utf-8"))


def test_every_bound_widget_has_a_slicer_connector(params, ui):
    bound = [w for w in ui.values() if w.parameter]
    assert len(bound) >= 12
    problems = [msg for w in bound for msg in connector_problems(w, params.get(w.parameter))]
    assert not problems, "\n".join(problems)
    problems = [msg for p in params.values() for msg in default_problems(p)]
    assert not problems, "\n".join(problems)


def test_the_checker_rejects_what_slicer_rejects():
    """The panel as it was before issue 9: combos bound to plain str, threshold slider unbounded."""
    old = read_parameter_class('''
class P:
    inputVolume: vtkMRMLScalarVolumeNode
    brainMask: Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode, None] = None
    predictor: str = "rec-grad"
    threshold: float = 0.0
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.6
    mode: Annotated[str, Choice(("a", "b"))] = "c"
    path: str = ""
''', "P")
    combo = UiWidget("predictorSelector", "QComboBox", "predictor", {})
    slider = UiWidget("thresholdSlider", "ctkSliderWidget", "threshold", {})
    assert any("Choice" in m for m in connector_problems(combo, old["predictor"]))
    assert any("WithinRange" in m for m in connector_problems(slider, old["threshold"]))
    assert not connector_problems(UiWidget("o", "ctkSliderWidget", "opacity", {}), old["opacity"])
    assert any("choices" in m for m in default_problems(old["mode"]))
    assert connector_problems(UiWidget("p", "ctkPathLineEdit", "path", {}), old["path"])  # str is not a Path
    assert connector_problems(UiWidget("x", "QSpinBox", "nope", {}), None)
    mask = UiWidget("m", "qMRMLNodeComboBox", "brainMask", {"nodeTypes": ["vtkMRMLLabelMapVolumeNode"]})
    assert any("nodeTypes" in m for m in connector_problems(mask, old["brainMask"]))
    mask.props["nodeTypes"] = ["vtkMRMLLabelMapVolumeNode", "vtkMRMLSegmentationNode"]
    assert not connector_problems(mask, old["brainMask"])
    assert missing_ui_names("self.ui.applyButton.enabled; self.ui.nosuchWidget", {"applyButton": 0}) == {"nosuchWidget"}
    bad = 'SampleData.SampleDataLogic.registerCustomSampleDataSource(loadFileTypes=["VolumeFile", "LabelMapVolumeFile"])'
    assert set(load_file_types(bad)) - SLICER_FILE_TYPES == {"LabelMapVolumeFile"}
    assert unpacked_download_sample("t2, lesion = SampleData.downloadSample('X')")


def test_every_ui_name_the_module_uses_exists(module_source, ui):
    assert not missing_ui_names(module_source, ui)


def test_sample_data_uses_slicer_reader_types_and_loads(module_source, tmp_path):
    types = load_file_types(module_source)
    assert types and set(types) <= SLICER_FILE_TYPES, set(types) - SLICER_FILE_TYPES
    assert not unpacked_download_sample(module_source)
    assert types == ["VolumeFile", "SegmentationFile"]
    # what qSlicerSegmentationsReader::load does with the lesion file: vtkSlicerSegmentationsModuleLogic::
    # LoadSegmentationFromFile (Modules/Loadable/Segmentations/qSlicerSegmentationsReader.cxx)
    scene = slicer.vtkMRMLScene()
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    seg = logic.LoadSegmentationFromFile(str(MODULE / "Resources" / "SampleData" / "VAEAnomalySample_Lesion.nrrd"),
                                         True, "VAEAnomalySample_Lesion")
    assert seg is not None and seg.GetSegmentation().GetNumberOfSegments() == 1
    from VAEAnomalyLib.logic import VAEAnomalyLogic
    t2 = slicer.vtkMRMLScalarVolumeNode()
    scene.AddNode(t2)
    t2.AddDefaultStorageNode()
    t2.GetStorageNode().SetFileName(str(MODULE / "Resources" / "SampleData" / "VAEAnomalySample_T2.nrrd"))
    assert t2.GetStorageNode().ReadData(t2)
    lesion = VAEAnomalyLogic(scene)._segment_array(seg, None, t2)
    assert 100 < lesion.sum() < 0.1 * lesion.size


def test_layouts_place_every_item(ui):
    """QFormLayout / QGridLayout items need row and column, or the fields do not stretch with the panel."""
    root = ET.fromstring(UI.read_text(encoding="utf-8"))
    for lay in root.iter("layout"):
        if lay.get("class") in ("QFormLayout", "QGridLayout"):
            for item in lay.findall("item"):
                assert item.get("row") is not None and item.get("column") is not None, ET.tostring(item)[:200]
    forms = [lay for lay in root.iter("layout") if lay.get("class") == "QFormLayout"]
    assert len(forms) == 3  # Inputs, Advanced, Outputs
    # the verdict and warnings sit above the heatmap in the Outputs section
    outputs = next(w for w in root.iter("widget") if w.get("name") == "outputsCollapsibleButton")
    names = [w.get("name") for w in outputs.iter("widget")]
    assert names.index("verdictLabel") < names.index("warningsLabel") < names.index("heatmapSelector")


def test_parameter_node_matches_the_controller_and_the_registry(params):
    from vaeanomaly.predictors import PredictorOptions
    from vaeanomaly.registry import DEFAULT_PREDICTOR, DEFAULT_THRESHOLD_MODE, THRESHOLD_MODES, predictor_names
    from VAEAnomalyLib.controller import PanelParams
    from VAEAnomalyLib.panel import OPTION_DEFAULTS
    assert list(params) == [f.name for f in fields(PanelParams)]
    ref = PanelParams()
    for name, p in params.items():
        if p.has_default:
            assert p.default == getattr(ref, name), name
        else:
            assert p.base == "node" and getattr(ref, name) is None, name
    assert tuple(params["predictor"].validators["Choice"][0]) == tuple(predictor_names())
    # the panel opens on the default model's own predictor (its kind's default), read without torch from the file
    from vaeanomaly.checkpoint import DEFAULT_MODEL as _DM, load_checkpoint
    from vaeanomaly.registry import DEFAULT_PREDICTORS
    assert params["predictor"].default == DEFAULT_PREDICTORS[load_checkpoint(_DM).kind]
    assert DEFAULT_PREDICTOR == "rec-grad"  # the VAE's (the papers') default is unchanged
    assert tuple(params["thresholdMode"].validators["Choice"][0]) == tuple(THRESHOLD_MODES)
    assert params["thresholdMode"].default == DEFAULT_THRESHOLD_MODE
    assert OPTION_DEFAULTS == PredictorOptions().to_dict()  # read without importing torch, equal to the real thing
    from vaeanomaly.checkpoint import DEFAULT_MODEL, bundled_models
    from VAEAnomalyLib.panel import bundled_models as panel_models, default_model
    assert default_model() == DEFAULT_MODEL and params["model"].default == DEFAULT_MODEL
    assert panel_models() == bundled_models()
    opts = PredictorOptions()
    assert (ref.projectionSteps, ref.projectionLambda, ref.smoothGradients) == \
        (opts.proj_steps, opts.proj_lambda, opts.smooth)


def test_widget_calls_only_what_the_controller_has(module_source):
    from VAEAnomalyLib.controller import PanelController, PanelState
    called = set(re.findall(r"self\.controller\.(\w+)", module_source))
    assert {"apply", "cancel", "poll", "state", "create_segment", "set_threshold", "set_threshold_mode",
            "set_opacity", "select_model", "set_params", "close"} <= called
    assert not {c for c in called if not hasattr(PanelController, c)}
    rendered = set(re.findall(r"\bs\.(\w+)", module_source))
    assert rendered and rendered <= {f.name for f in fields(PanelState)}, rendered - {f.name for f in fields(PanelState)}


def test_module_load_imports_only_the_standard_library():
    """VAEAnomaly.py imports VAEAnomalyLib.panel when Slicer loads it: that chain must not need torch or numpy."""
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    for path, allowed in ((MODULE / "VAEAnomalyLib" / "panel.py", {"vaeanomaly"}),
                          (MODULE / "vaeanomaly" / "registry.py", set()),
                          (MODULE / "vaeanomaly" / "__init__.py", set())):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = set()
        for n in tree.body:  # module level only: imports inside functions run later
            if isinstance(n, ast.Import):
                top |= {a.name.split(".")[0] for a in n.names}
            elif isinstance(n, ast.ImportFrom) and n.level == 0:
                top.add(n.module.split(".")[0])
        assert top <= stdlib | allowed, (path.name, top - stdlib - allowed)
    tree = ast.parse(MODULE_PY.read_text(encoding="utf-8"))
    lib = [n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module.startswith("VAEAnomalyLib")]
    assert lib == ["VAEAnomalyLib.panel"]


# ---------------------------------------------------------------------------------------------------------
# "Adapt to my scanner...": the widgets Slicer's designer plugins provide, and only their API.
# Libs/MRML/Widgets/qMRMLCheckableNodeComboBox.h (a qMRMLNodeComboBox: Q_INVOKABLE checkedNodes, checkState,
# setCheckState, ...; nodeCount and nodeFromIndex from Libs/MRML/Widgets/qMRMLNodeComboBox.h, where
# nodeFromIndex skips the "None" item itself) and its designer plugin
# Libs/MRML/Widgets/DesignerPlugins/qMRMLCheckableNodeComboBoxPlugin.cxx (header qMRMLCheckableNodeComboBox.h).
# CTK Libs/Widgets/ctkPathLineEdit.h: Filters flag Dirs, property currentPath (empty allowed; ctkDirectoryButton
# always holds a directory, the current one by default, so "no folder" could not be expressed).
CHECKABLE_COMBO_API = {"checkedNodes", "uncheckedNodes", "allChecked", "noneChecked", "checkState", "setCheckState",
                       "setUserCheckable", "check", "uncheck", "nodeCount", "nodeFromIndex", "setMRMLScene",
                       "mrmlScene", "nodeTypes", "enabled", "connect"}
QT_WIDGETS = {"QWidget", "QLabel", "QPushButton", "QComboBox", "QCheckBox", "QSpinBox", "QDoubleSpinBox",
              "QProgressBar", "QLineEdit", "QTextEdit", "QSlider", "QGroupBox", "QFrame", "QToolButton",
              "QTableWidget"}


def undeclared_widget_classes(ui_text: str) -> set[str]:
    """Widget classes of the .ui that are neither Qt's nor declared as <customwidget> (uic/QUiLoader, which
    slicer.util.loadUI uses, cannot create them)."""
    root = ET.fromstring(ui_text)
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    return used - declared - QT_WIDGETS


def test_adapt_section_widgets_and_their_api(module_source, ui):
    text = UI.read_text(encoding="utf-8")
    assert not undeclared_widget_classes(text), undeclared_widget_classes(text)
    assert undeclared_widget_classes('<ui><widget class="qMRMLCheckableNodeComboBox" name="x"/></ui>')
    root = ET.fromstring(text)
    custom = {c.findtext("class"): c.findtext("header") for c in root.iter("customwidget")}
    assert custom["qMRMLCheckableNodeComboBox"] == "qMRMLCheckableNodeComboBox.h"
    sel = ui["adaptVolumesSelector"]
    assert sel.cls == "qMRMLCheckableNodeComboBox" and sel.parameter is None  # not bound: no GUI connector for it
    assert sel.props["nodeTypes"] == ["vtkMRMLScalarVolumeNode"] and sel.props["showChildNodeTypes"] == "false"
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("slot").startswith("setMRMLScene")}
    assert "adaptVolumesSelector" in receivers  # the scene reaches the combo (as for every node selector here)
    folder = ui["adaptFolderPath"]
    assert folder.cls == "ctkPathLineEdit" and folder.props["filters"] == "ctkPathLineEdit::Dirs"
    from VAEAnomalyLib.adaptjob import DEFAULT_MINUTES
    assert float(ui["adaptMinutesSpinBox"].props["value"]) == DEFAULT_MINUTES
    called = set(re.findall(r"\bcombo\.(\w+)", module_source)) | \
        set(re.findall(r"adaptVolumesSelector\.(\w+)", module_source))
    assert called and called <= CHECKABLE_COMBO_API | {"blockSignals", "clear", "addItem"}, called
    # the adapt section lays out its items in a grid (row and column, checked above by test_layouts_place_every_item)
    adapt = next(w for w in root.iter("widget") if w.get("name") == "adaptCollapsibleButton")
    assert adapt.find("layout").get("class") == "QGridLayout"
    assert {"adaptButton", "adaptProgressBar", "adaptStatusLabel", "adaptBaseModelSelector", "adaptNameLineEdit"} <= \
        {w.get("name") for w in adapt.iter("widget")}
    called = set(re.findall(r"self\.controller\.(\w+)", module_source))
    assert {"start_adapt", "cancel_adapt", "take_models_changed", "adapting"} <= called
