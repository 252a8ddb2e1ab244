"""The Slicer module's files: what a stock Slicer can import, CMake lists, catalog entry, sample data."""
from __future__ import annotations

import ast
import hashlib
import json
import re

from conftest import ROOT

MODULE = ROOT / "VAEAnomaly"
STOCK = {"os", "hashlib", "logging", "typing", "qt", "ctk", "slicer", "vtk",
         "VAEAnomalyLib"}  # only VAEAnomalyLib.panel, standard library only (test_conformance.py checks the chain)


def test_module_file_imports_only_what_stock_slicer_has():
    tree = ast.parse((MODULE / "VAEAnomaly.py").read_text(encoding="utf-8"))
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            top.add(node.module.split(".")[0])
    assert top <= STOCK, top - STOCK
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {"VAEAnomaly", "VAEAnomalyWidget", "VAEAnomalyLogic", "VAEAnomalyTest", "VAEAnomalyParameterNode"} <= classes


def test_lib_logic_has_no_application_globals():
    tree = ast.parse((MODULE / "VAEAnomalyLib" / "logic.py").read_text(encoding="utf-8"))
    code = [n for n in ast.walk(tree) if isinstance(n, (ast.Attribute, ast.Import, ast.ImportFrom))]
    src = " ".join(ast.unparse(n) for n in code)  # code only, not docstrings
    assert "slicer.mrmlScene" not in src and "slicer.app" not in src and "import qt" not in src


def test_cmake_lists_every_script_and_resource():
    cm = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    for p in list((MODULE / "vaeanomaly").glob("*.py")) + list((MODULE / "VAEAnomalyLib").glob("*.py")):
        assert str(p.relative_to(MODULE)).replace("VAEAnomaly.", "${MODULE_NAME}.") in cm or str(p.relative_to(MODULE)) in cm, p
    for p in (MODULE / "Resources").rglob("*"):
        if p.is_file():
            assert str(p.relative_to(MODULE)).replace("VAEAnomaly.", "${MODULE_NAME}.") in cm or str(p.relative_to(MODULE)) in cm, p
    assert "WITH_GENERIC_TESTS" in cm


def test_catalog_entry_matches_cmake_metadata():
    cm = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    entry = json.loads((ROOT / "VAEAnomaly.json").read_text(encoding="utf-8"))
    assert re.search(r'set\(EXTENSION_CATEGORY "(.+)"\)', cm).group(1) == entry["category"]
    assert re.search(r'set\(EXTENSION_DEPENDS "(.+)"\)', cm).group(1).split() == entry["build_dependencies"]
    for key in ("HOMEPAGE", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS"):
        assert re.search(rf'set\(EXTENSION_{key} "(.+)"\)', cm), key
    assert (ROOT / "LICENSE").exists()


def test_sample_data_checksums_match_registration():
    tree = ast.parse((MODULE / "VAEAnomaly.py").read_text(encoding="utf-8"))
    sums = next(ast.literal_eval(n.value) for n in tree.body
                if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "SAMPLE_FILES")
    for name, sha in sums.items():
        data = (MODULE / "Resources" / "SampleData" / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == sha


def test_ui_binds_parameters_to_widgets():
    ui = (MODULE / "Resources" / "UI" / "VAEAnomaly.ui").read_text(encoding="utf-8")
    bound = set(re.findall(r'SlicerParameterName" stdset="0">\s*<string>(\w+)<', ui))
    src = (MODULE / "VAEAnomaly.py").read_text(encoding="utf-8")
    wrapper = src[src.index("class VAEAnomalyParameterNode"):src.index("class VAEAnomalyWidget")]
    fields = set(re.findall(r"^    (\w+):", wrapper, re.M))
    # written and restored by the Widget/controller: ctkPathLineEdit binds only to pathlib.Path, the model combo
    # carries item data, the threshold slider's range follows the heatmap (test_conformance.py has the rules)
    synced_by_hand = {"customModelPath", "model", "threshold", "calibratedThreshold"}
    assert bound == fields - synced_by_hand, (bound ^ fields)
    assert "self._parameterNode.customModelPath" in src


def test_module_file_compiles():
    compile((MODULE / "VAEAnomaly.py").read_text(encoding="utf-8"), "VAEAnomaly.py", "exec")
