"""The layers of the code: the core library `vaeanomaly` never imports the application (`VAEAnomalyLib`), and
its modules import each other without cycles.

Imports are read from the source (ast), at module level AND inside functions: a function-level import is
still a dependency (it runs the first time the function does), so both count for the layering and for the
cycles.
"""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap

from conftest import ROOT

CORE = ROOT / "VAEAnomaly" / "vaeanomaly"


def _imports(path):
    """[(imported module's dotted name, enclosing function name or None)] of one file, relative imports
    resolved against the vaeanomaly package; `from . import x` gives vaeanomaly.x."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []

    def visit(node, func):
        for child in ast.iter_child_nodes(node):
            f = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
            if isinstance(child, ast.Import):
                out.extend((a.name, f) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = "vaeanomaly" + (f".{child.module}" if child.module else "")
                    if child.module:
                        out.append((base, f))
                    else:
                        out.extend((f"{base}.{a.name}", f) for a in child.names)
                else:
                    out.append((child.module, f))
                    if child.module == "vaeanomaly":
                        out.extend((f"vaeanomaly.{a.name}", f) for a in child.names)
            visit(child, f)

    visit(tree, None)
    return out


def _graph():
    modules = {p.stem: p for p in CORE.glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for mod, _ in _imports(path):
            parts = mod.split(".")
            if parts[0] == "vaeanomaly" and len(parts) > 1 and parts[1] in modules and parts[1] != name:
                deps.add(parts[1])
        graph[name] = deps
    return graph


def _cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, comps = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return comps


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_core_never_imports_the_application():
    """Not at module level, not inside a function: the browser viewer's command is the application's own
    (`vaeanomaly-web`, VAEAnomalyLib.web:main)."""
    found = []
    for path in sorted(CORE.glob("*.py")):
        for mod, func in _imports(path):
            if mod and mod.split(".")[0] == "VAEAnomalyLib":
                found.append((path.name, func, mod))
    assert found == [], found


def test_no_import_cycles_in_the_core():
    graph = _graph()
    assert {"volume", "brainmask", "verdict", "calibration", "predictors", "registry"} <= set(graph)
    assert _cycles(graph) == []
    # the command line imports the commands it dispatches to, never the other way round
    assert not any("cli" in graph[m] for m in ("adapt", "cohort", "scoring"))


def test_leaf_modules_import_nothing_of_the_core():
    graph = _graph()
    for leaf in ("registry", "errors", "arrays"):
        assert graph[leaf] == set(), (leaf, graph[leaf])
    assert "volume" not in graph["brainmask"]    # the mask checks sit below the volume code


def test_cli_works_without_the_application_package():
    """The scoring command line (and the warm worker, which builds the same parser) with VAEAnomalyLib absent,
    as in an install of the core alone; `web` says where the viewer went and exits 2."""
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(CORE.parent)!r})
        sys.modules["VAEAnomalyLib"] = None          # import VAEAnomalyLib -> ModuleNotFoundError
        from vaeanomaly import cli
        a = cli.build_parser().parse_args(["score", "in.nii.gz", "-o", "out.nii.gz"])
        assert a.cmd == "score"
        sys.exit(cli.main(["web", "--port", "0"]))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "vaeanomaly-web" in r.stderr and 'pip install ".[web]"' in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_nothing_outside_cli_uses_a_private_name_of_cli():
    """cli._options, cli._predictors, cli._is_image_path ... stay inside cli.py; the shared helpers are public
    in scoring.py."""
    found = []
    for path in [p for d in ("VAEAnomaly", "training", "benchmarks", "Testing") for p in (ROOT / d).rglob("*.py")]:
        if path == CORE / "cli.py" or "__pycache__" in path.parts:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            from_cli = isinstance(node, ast.ImportFrom) and (
                node.module == "vaeanomaly.cli" or (node.level == 1 and node.module == "cli"))
            if from_cli and any(a.name.startswith("_") for a in node.names):
                found.append((str(path.relative_to(ROOT)), node.lineno))
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and isinstance(node.value, ast.Name) and node.value.id == "cli":
                found.append((str(path.relative_to(ROOT)), node.lineno))
    assert found == [], found


def test_volumes_are_scored_through_the_one_scoring_api():
    """Cohort scoring, adapt's before/after figures, the warm worker and the application layer (the module's
    Logic, the panel, the web viewer) reach the network through scoring.py (score_prepared, run), never by calling
    the functions below it themselves; calibration (calibration.calibrate) is not scoring and is not checked."""
    below = {"compute_maps", "score_volume", "assess_slices"}
    app = ROOT / "VAEAnomaly" / "VAEAnomalyLib"
    found = []
    for path in [CORE / "cohort.py", CORE / "adapt.py", CORE / "score_worker.py", *sorted(app.rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
            names = [a.name for a in node.names] if isinstance(node, ast.ImportFrom) else [name]
            found += [(path.name, node.lineno, n) for n in names if n in below]
    assert found == [], found


def _module_name(path):
    rel = path.relative_to(ROOT / "VAEAnomaly").with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts), parts[-1] == "__init__"


def _whole_graph():
    """Every Python file of the module's tree (core, application, the module file) -> the project modules it
    imports (module level and inside functions; relative imports resolved; `from pkg import name` counts as
    pkg.name where that is a module)."""
    files = {}
    for path in (ROOT / "VAEAnomaly").rglob("*.py"):
        if "__pycache__" not in path.parts and ".egg-info" not in str(path):
            files[_module_name(path)[0]] = path
    graph = {}
    for name, path in files.items():
        is_pkg = _module_name(path)[1]
        package = name if is_pkg else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def test_no_import_cycles_anywhere_in_the_module_tree():
    """Core and application together: no two files import each other in a circle (the last one ran
    cli -> web -> app -> controller -> logic -> score_worker -> cli), and nothing in the core points up."""
    graph = _whole_graph()
    assert {"vaeanomaly.cli", "VAEAnomalyLib.web", "VAEAnomalyLib.web.app", "VAEAnomalyLib.controller"} <= set(graph)
    # a package's __init__ is imported by its submodules' import machinery, not by their code: only code edges
    cycles = _cycles(graph)
    assert cycles == [], cycles
    up = [(m, d) for m, deps in graph.items() if m.startswith("vaeanomaly") for d in deps
          if d.startswith("VAEAnomalyLib") or d == "VAEAnomaly"]
    assert up == [], up
