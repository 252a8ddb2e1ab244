"""The module's self-test without PyTorch reports a skip, not a failure; the panel's refresh survives a Slicer
without a main window (VAEAnomalyLib/selftest.py, VAEAnomaly.py)."""
from __future__ import annotations

import ast
import unittest

import pytest
import slicer.util  # slicer-core: the same tryWithErrorDisplay the panel's Test button runs the self-test in

from conftest import ROOT
from VAEAnomalyLib.selftest import reset_slice_views, run_steps, summary

MODULE_PY = ROOT / "VAEAnomaly" / "VAEAnomaly.py"


class _Case(unittest.TestCase):
    """A real unittest.TestCase, as ScriptedLoadableModuleTest is one."""

    def runTest(self):
        pass

    def needs_torch(self):
        self.skipTest("PyTorch is not installed: install the PyTorch extension")

    def fails(self):
        self.assertEqual(1, 2)


def test_a_skipped_part_is_logged_and_the_run_is_not_a_failure():
    case, ran, logged = _Case(), [], []
    outcome = None
    # Slicer's panel: ScriptedLoadableModule.runTest -> VAEAnomalyTest.runTest inside tryWithErrorDisplay("Test
    # failed."), which shows the error for any exception that escapes (show=False here: no dialog headless)
    with slicer.util.tryWithErrorDisplay("Test failed.", show=False):
        outcome = run_steps([("first", lambda: ran.append("first")), ("torch", case.needs_torch),
                             ("last", lambda: ran.append("last"))], log=logged.append, before=lambda: ran.append("setUp"))
    assert ran == ["setUp", "first", "setUp", "setUp", "last"]
    assert outcome == {"first": "passed", "torch": "skipped: PyTorch is not installed: install the PyTorch extension",
                       "last": "passed"}
    assert logged == ["torch skipped: PyTorch is not installed: install the PyTorch extension"]
    assert summary(outcome).startswith("Test passed, 1 of 3 parts skipped (torch)")
    assert summary({"a": "passed"}) == "Test passed"


def test_a_failure_still_fails_and_a_bare_skip_would_too():
    case = _Case()
    with pytest.raises(AssertionError):
        with slicer.util.tryWithErrorDisplay("Test failed.", show=False):
            run_steps([("fails", case.fails)], log=print)
    with pytest.raises(unittest.SkipTest):  # what runTest did before: SkipTest escaped -> "Test failed."
        with slicer.util.tryWithErrorDisplay("Test failed.", show=False):
            case.needs_torch()


def test_module_self_test_runs_every_part_through_run_steps():
    """VAEAnomalyTest.runTest hands every test_* method to run_steps (none forgotten, none called bare), and the
    module calls no slicer.util.resetSliceViews (it fails without a layout manager)."""
    tree = ast.parse(MODULE_PY.read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "VAEAnomalyTest")
    methods = {n.name for n in cls.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}
    run = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "runTest")
    call = next(n for n in ast.walk(run) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "run_steps")
    passed = {e.elts[0].value for e in call.args[0].elts}
    assert passed == methods and methods
    direct = [n for n in ast.walk(run) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
              and n.func.attr.startswith("test_")]
    assert direct == []
    assert "resetSliceViews()" not in ast.unparse(tree).replace("layout_manager.resetSliceViews()", "")


def test_reset_slice_views_without_a_layout_manager():
    assert reset_slice_views(None) is False  # slicer.app.layoutManager() without a main window
