"""The Qt-free decisions of the module's self-test and of the panel's refresh (standard library only).

Slicer runs a module's self-test in two ways (Slicer: Base/Python/slicer/ScriptedLoadableModule.py):
  - from the module panel (Reload and Test, or the Test button): ScriptedLoadableModule.runTest calls
    VAEAnomalyTest.runTest() directly, inside slicer.util.tryWithErrorDisplay("Test failed."), so ANY exception,
    unittest.SkipTest included, shows "Test failed.";
  - from ctest (slicer_add_python_unittest): a unittest runner calls the test_* methods, and reports SkipTest as
    a skip.
So a test method says "skip" with unittest's SkipTest (right for the runner), and runTest goes through
`run_steps`, which logs a skip and carries on instead of letting it escape as a failure.
"""
from __future__ import annotations

import unittest
from typing import Callable, Iterable, Optional


def run_steps(steps: Iterable[tuple[str, Callable[[], None]]], log: Callable[[str], None],
              before: Optional[Callable[[], None]] = None) -> dict:
    """Run (name, step) in order (`before()` ahead of each). A step that raises unittest.SkipTest is reported
    through `log` as skipped, with its reason, and the others still run; any other exception (a failure) ends
    the run as it is. Returns {name: "passed" or "skipped: <reason>"}."""
    outcome = {}
    for name, step in steps:
        if before is not None:
            before()
        try:
            step()
        except unittest.SkipTest as skip:
            outcome[name] = f"skipped: {skip}"
            log(f"{name} skipped: {skip}")
        else:
            outcome[name] = "passed"
    return outcome


def summary(outcome: dict) -> str:
    """One line for the end of a self-test run."""
    skipped = [n for n, r in outcome.items() if r != "passed"]
    if not skipped:
        return "Test passed"
    return f"Test passed, {len(skipped)} of {len(outcome)} parts skipped ({', '.join(skipped)}): see the log"


def reset_slice_views(layout_manager) -> bool:
    """Fit the slice views to the new volumes when there are views: Slicer without a main window (the
    --no-main-window self-tests, a headless session) has no layout manager (slicer.app.layoutManager() is None),
    where slicer.util.resetSliceViews() raises AttributeError. Returns whether the views were reset."""
    if layout_manager is None:
        return False
    layout_manager.resetSliceViews()
    return True
