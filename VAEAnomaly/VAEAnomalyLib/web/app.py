"""The VAEAnomaly page on trame-slicer: the Slicer panel's workflow, in a browser.

Everything the workflow decides (what may be pressed when, the background job, progress, cancel, the
verdict, thresholds and their live preview, Create segment with the protected edited segment) is
`PanelController` (VAEAnomalyLib.controller) on a real MRML scene -- the one the Slicer Widget drives.
This module only: loads the given files and uploads into the scene, shows the scene in trame-slicer's slice
views, renders `controller.state()` into the page, forwards clicks, polls the job, offers paint/erase on the
segment (trame-slicer's segment editor effects) and exports heatmap and segmentation as files.

Safety: binds 127.0.0.1 unless told otherwise; reads only the files given on the command line and uploads
(size limit, type check, read by SimpleITK and checked as a 3D scalar volume before they enter the scene);
one job at a time (the controller refuses a second); every action is wrapped so that an error becomes a
message in the page and the page stays usable.
"""
from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import traceback
from pathlib import Path
from typing import Optional

from ..controller import FINDINGS_HEADER, Dialogs, PanelController, PanelParams
from ..panel import PREDICTOR_CHOICES, PREDICTOR_INFO, THRESHOLD_MODE_CHOICES

log = logging.getLogger("vaeanomaly.web")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_MAX_UPLOAD_MB = 512
# What SimpleITK reads as one file (no header+raw pairs, no folders over the web)
UPLOAD_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")
EXPORT_FORMATS = {"nii.gz": ".nii.gz", "nrrd": ".nrrd"}
POLL_S = 0.25
FINDINGS_DELAY_S = 0.3  # the findings are listed this long after the last threshold change (the panel's timer)


class WebDialogs(Dialogs):
    """The controller's questions and messages, as page state. A question cannot block a web request, so
    `confirm` answers no and records the question; the page shows it, and "Yes" repeats the action with
    that text approved (the controller then asks the same question and gets yes)."""

    def __init__(self):
        super().__init__()
        self.approved: set[str] = set()
        self.question: Optional[str] = None

    def confirm(self, text: str) -> bool:
        if text in self.approved:
            self.approved.discard(text)
            self.shown.append(("confirm", text))
            return True
        self.question = text
        return super().confirm(text)


def _suffix(name: str) -> str:
    low = name.lower()
    return next((s for s in UPLOAD_SUFFIXES if low.endswith(s)), "")


def load_volume_file(scene, path, name: Optional[str] = None, label: bool = False):
    """Read one volume file with SimpleITK, check it, and add it to the scene through the Lib's own
    node <-> image conversion (the geometry convention the scoring job uses)."""
    import SimpleITK as sitk
    import slicer

    from vaeanomaly.volume import VolumeError, check_image

    from ..logic import set_node_from_image
    path = Path(path)
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise VolumeError(f"cannot read '{path.name}' as a volume: {str(err).strip().splitlines()[-1]}") from None
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(f"'{path.name}' is not a 3D scalar volume ({img.GetDimension()}D, "
                          f"{img.GetNumberOfComponentsPerPixel()} components)")
    if not label:
        check_image(img, f"volume '{path.name}'")
    node = slicer.vtkMRMLLabelMapVolumeNode() if label else slicer.vtkMRMLScalarVolumeNode()
    stem = name or path.name
    for s in UPLOAD_SUFFIXES:
        if stem.lower().endswith(s):
            stem = stem[:-len(s)]
            break
    node.SetName(scene.GenerateUniqueName(stem))
    scene.AddNode(node)
    if label:
        img = sitk.Cast(img, sitk.sitkUInt8)
    set_node_from_image(node, img)
    node.CreateDefaultDisplayNodes()
    disp = node.GetDisplayNode()
    if not label:
        disp.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
        disp.AutoWindowLevelOn()
    else:
        disp.SetAndObserveColorNodeID("vtkMRMLColorTableNodeLabels")
    return node


class VAEAnomalyWebApp:
    def __init__(self, volumes=(), mask=None, server=None, apply: bool = False,
                 max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, launcher: Optional[str] = None):
        import slicer
        from trame.app import get_server
        from trame_slicer import module as trame_slicer_module
        from trame_slicer.core import LayoutManager, SlicerApp
        from trame_slicer.rca_view import register_rca_factories
        from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition

        self.server = server or get_server(client_type="vue3")
        self.server.enable_module(trame_slicer_module)
        self.state, self.ctrl = self.server.state, self.server.controller
        self.max_upload_bytes = int(max_upload_mb * 2**20)
        self.slicer_app = SlicerApp()
        self.scene = self.slicer_app.scene
        # the slice views' colour legend (vtkMRMLColorLegendDisplayableManager) needs its node class registered
        self.scene.RegisterNodeClass(slicer.vtkMRMLColorLegendDisplayNode())
        register_rca_factories(self.slicer_app.view_manager, self.server)
        self.layout_manager = LayoutManager(self.scene, self.slicer_app.view_manager, self.server)
        axial, coronal, sagittal = (ViewLayoutDefinition.axial_view(), ViewLayoutDefinition.coronal_view(),
                                    ViewLayoutDefinition.sagittal_view())
        self.layout_manager.register_layout("VAEAnomaly", Layout(
            LayoutDirection.Horizontal, [axial, Layout(LayoutDirection.Vertical, [coronal, sagittal])]))
        self.layout_manager.set_layout("VAEAnomaly")

        self.dialogs = WebDialogs()
        self.params = PanelParams()
        # the same controller the Slicer Widget drives; the colour legend through Slicer's own Colors logic
        self.controller = PanelController(self.scene, self.params, self.dialogs,
                                          color_logic=slicer.vtkSlicerColorLogic, launcher=launcher)
        self.controller.set_params(self.params)
        self._poll_task = None
        self._findings_task = None
        self._errors_seen = 0
        self.tmp = tempfile.TemporaryDirectory(prefix="vaeanomaly-web-")
        self.first_frame_logged = False

        self._init_state()
        self._build_ui()
        for path in volumes:
            node = load_volume_file(self.scene, path)
            self.params.inputVolume = self.params.inputVolume or node
        if mask is not None:
            self.params.brainMask = load_volume_file(self.scene, mask, label=True)
        if self.params.inputVolume is not None:
            self._show_input()
        if apply and self.params.inputVolume is not None:
            # --apply: the job starts now, in its own process, while the server starts; polling once it runs
            self._guard("Apply", self.controller.apply)
            self.ctrl.on_server_ready.add(lambda **_: self._start_polling())
        self.render()

    # ------------------------------------------------------------------ state <-> controller
    def _init_state(self):
        s = self.state
        s.trame__title = "VAE Anomaly"
        s.models = [{"title": t, "value": v} for t, v in PanelController.model_choices() if v != "custom"]
        s.predictors = [{"title": PREDICTOR_INFO[p].title if p in PREDICTOR_INFO else p, "value": p}
                        for p in PREDICTOR_CHOICES]
        s.threshold_modes = [{"title": m, "value": m} for m in THRESHOLD_MODE_CHOICES]
        s.export_formats = list(EXPORT_FORMATS)
        s.export_format = "nii.gz"
        s.effect = "none"
        s.brush_mm = 6.0
        s.upload_info = f"NIfTI, NRRD or MHA, at most {self.max_upload_bytes / 2**20:.0f} MB"
        s.errors = []
        s.question = None
        s.legend_max = 1.0
        s.upload_file = None
        s.findings_header = list(FINDINGS_HEADER)
        s.signed_heatmap, s.signed_enabled, s.signed_tooltip, s.signed_shown = False, False, "", False
        s.findings_rows = []
        s.findings_text = ""
        s.report_enabled = False
        s.report_name = "VAEAnomaly_report.html"
        s.slice_position = ""

    def _volume_items(self, label_ok: bool):
        items = []
        for i in range(self.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
            n = self.scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
            if n.GetAttribute("VAEAnomaly.Predictor"):
                continue  # our own heatmaps are outputs, not inputs
            if n.IsA("vtkMRMLLabelMapVolumeNode") and not label_ok:
                continue
            items.append({"title": n.GetName(), "value": n.GetID()})
        if label_ok:
            for i in range(self.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")):
                n = self.scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode")
                items.append({"title": n.GetName(), "value": n.GetID()})
        return items

    def render(self):
        """Put everything the controller says into the page state."""
        c, p = self.controller, self.params
        st = c.state()
        with self.state as s:
            s.volumes = self._volume_items(label_ok=False)
            s.masks = [i for i in self._volume_items(label_ok=True)
                       if p.inputVolume is None or i["value"] != p.inputVolume.GetID()]
            s.input_id = p.inputVolume.GetID() if p.inputVolume is not None else None
            s.mask_id = p.brainMask.GetID() if p.brainMask is not None else None
            s.model = p.model
            s.predictor = p.predictor
            s.signed_heatmap = bool(p.signedHeatmap)
            s.signed_enabled, s.signed_tooltip, s.signed_shown = st.signed_enabled, st.signed_tooltip, st.signed_shown
            s.apply_enabled, s.apply_text, s.apply_tooltip = st.apply_enabled, st.apply_text, st.apply_tooltip
            s.running, s.progress, s.progress_visible = st.running, st.progress, st.progress_visible
            s.busy = st.running
            s.status = st.status
            s.inputs_enabled = st.inputs_enabled
            s.model_card = st.model_card
            s.outputs_enabled = st.outputs_enabled
            s.create_segment_enabled = st.create_segment_enabled
            s.threshold_max, s.threshold_step = st.threshold_maximum, st.threshold_step
            s.threshold_decimals = st.threshold_decimals
            s.threshold = round(st.threshold_value, st.threshold_decimals)
            s.threshold_mode = p.thresholdMode
            s.opacity = p.opacity
            s.verdict_text = st.verdict_text
            s.verdict_ok = (st.verdict or {}).get("in_distribution") if st.verdict else None
            s.warnings = list(st.warnings)
            s.has_segment = p.segmentation is not None and p.segmentation.GetScene() is self.scene
            heat = c.heatmap()
            s.has_heatmap = heat is not None
            s.heatmap_name = heat.GetName() if heat is not None else ""
            if heat is not None:
                disp = heat.GetDisplayNode()
                s.legend_min = round(float(disp.GetWindowLevelMin()), 4)
                s.legend_max = round(float(disp.GetWindowLevelMax()), 4)
            new = [text for kind, text in self.dialogs.shown[self._errors_seen:] if kind in ("error", "warning")]
            self._errors_seen = len(self.dialogs.shown)
            if new:
                s.errors = (list(s.errors or []) + new)[-5:]
            s.question = self.dialogs.question
            s.findings_header = list(st.findings_header)  # a signed heatmap's: with the direction column
            s.findings_rows = [list(r) for r in st.findings_rows]
            s.findings_text = st.findings_text
            s.report_enabled = st.report_enabled
            s.report_name = c.report_file_name()
            s.slice_position = self._slice_position()

    def _guard(self, what: str, fn, *args):
        """Run an action; an unexpected error becomes a message, never a broken page."""
        try:
            return fn(*args)
        except Exception as err:
            log.error("%s failed:\n%s", what, traceback.format_exc())
            self.dialogs.error(f"{what} failed: {err}")
        finally:
            self.render()

    # ------------------------------------------------------------------ display
    def _slice_views(self):
        return self.slicer_app.view_manager.get_slice_views()

    def _show_input(self):
        p = self.params
        heat = self.controller.heatmap()
        shown = heat is not None and heat.GetAttribute("VAEAnomaly.Input") == (
            p.inputVolume.GetID() if p.inputVolume is not None else "")
        for v in self._slice_views():
            v.set_background_volume_id(p.inputVolume.GetID() if p.inputVolume is not None else None)
            v.set_foreground_volume_id(heat.GetID() if shown else None)
        if shown:
            self._compact_legend(heat)
        self._fit_views()

    @staticmethod
    def _compact_legend(heat):
        """Slicer's colour legend in the slice views, with a short title (its text scales to the legend)."""
        import slicer
        legend = slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(heat)
        if legend is not None:
            legend.SetTitleText(heat.GetAttribute("VAEAnomaly.Predictor") or "")
            legend.SetSize(0.1, 0.4)
            legend.SetLabelFormat("%.2g")

    def _fit_views(self):
        for v in self._slice_views():
            v.fit_view_to_content()
            v.schedule_render()

    def _render_views(self):
        for v in self._slice_views():
            v.schedule_render()

    # ------------------------------------------------------------------ actions
    def on_input(self, node_id):
        def run():
            self.params.inputVolume = self.scene.GetNodeByID(node_id) if node_id else None
            self._show_input()
        self._guard("Selecting the input", run)

    def on_mask(self, node_id):
        def run():
            self.params.brainMask = self.scene.GetNodeByID(node_id) if node_id else None
        self._guard("Selecting the brain mask", run)

    def on_model(self, value):
        self._guard("Selecting the model", self.controller.select_model, value)

    def on_predictor(self, value):
        def run():
            self.params.predictor = value
        self._guard("Selecting the predictor", run)

    def on_signed(self, value):
        self._guard("Bright and dark apart", self.controller.set_signed_heatmap, bool(value))

    def on_apply(self):
        def run():
            if self.controller.apply_or_cancel():
                self._start_polling()
            self._render_views()
        self._guard("Apply", run)

    def _start_polling(self):
        if self.controller.running and (self._poll_task is None or self._poll_task.done()):
            self._poll_task = asyncio.ensure_future(self._poll())

    async def _poll(self):
        c = self.controller
        while c.running:
            await asyncio.sleep(POLL_S)
            self._guard("Checking the computation", c.poll)
        if c.take_new_result():
            self._guard("Showing the heatmap", self._show_input)
        self._render_views()

    def on_opacity(self, value):
        def run():
            self.controller.set_opacity(float(value))
            self._render_views()
        self._guard("Opacity", run)

    def on_threshold_mode(self, mode):
        def run():
            self.controller.set_threshold_mode(mode)
            self._render_views()
        self._guard("Threshold mode", run)
        self._schedule_findings()

    def on_threshold(self, value):
        def run():
            self.controller.set_threshold(float(value))
            self._render_views()
        self._guard("Threshold", run)
        self._schedule_findings()

    # ------------------------------------------------------------------ findings and report
    def _schedule_findings(self):
        """The preview follows the slider at once; the findings (a connected-component pass) once the threshold
        rests for FINDINGS_DELAY_S (each change restarts the wait), like the panel's timer."""
        if not self.controller.findings_pending:
            return
        if self._findings_task is not None and not self._findings_task.done():
            self._findings_task.cancel()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no server loop (the app used on its own): list them now
            self._guard("Listing the findings", self.controller.refresh_findings)
            return
        self._findings_task = loop.create_task(self._findings_later())

    async def _findings_later(self):
        await asyncio.sleep(FINDINGS_DELAY_S)
        if self.controller.findings_pending:
            self._guard("Listing the findings", self.controller.refresh_findings)

    def _slice_position(self) -> str:
        """Where the slice views are: each slice node's offset along its normal (mm), e.g. 'Red 12.3'."""
        parts = []
        for i in range(self.scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
            n = self.scene.GetNthNodeByClass(i, "vtkMRMLSliceNode")
            m = n.GetSliceToRAS()
            offset = sum(m.GetElement(r, 2) * m.GetElement(r, 3) for r in range(3))
            parts.append(f"{n.GetName()} {offset:.1f}")
        return " | ".join(parts)

    def on_finding(self, index):
        def run():
            if self.controller.jump_to_finding(int(index)):
                self._render_views()
        self._guard("Jump to the finding", run)

    def report_bytes(self) -> bytes:
        """The one-page HTML report (controller.write_report) written to a private temporary file and read back."""
        folder = Path(tempfile.mkdtemp(dir=self.tmp.name))
        path = folder / "report.html"
        try:
            if not self.controller.write_report(str(path)):
                raise ValueError(self.controller.status or "the report was not written")
            return path.read_bytes()
        finally:
            path.unlink(missing_ok=True)
            folder.rmdir()

    def on_report(self):
        try:
            data = self.report_bytes()
            self.controller.status = f"Report sent ({len(data) / 2**10:.0f} kB)."
            return self.server.protocol.addAttachment(data)
        except Exception as err:
            log.error("Report failed:\n%s", traceback.format_exc())
            self.dialogs.error(f"Report failed: {err}")
            return None
        finally:
            self.render()

    def on_create_segment(self):
        def run():
            if self.controller.create_segment():
                self._activate_segmentation()
            self._render_views()
        self._guard("Create segment", run)

    def _activate_segmentation(self):
        from ..logic import SEGMENT_NAME
        p = self.params
        editor = self.slicer_app.segmentation_editor
        editor.set_active_segmentation(p.segmentation, p.inputVolume)
        seg_id = p.segmentation.GetSegmentation().GetSegmentIdBySegmentName(SEGMENT_NAME)
        if seg_id:
            editor.set_active_segment_id(seg_id)
        self.on_effect(self.state.effect or "none")

    def on_effect(self, effect):
        def run():
            from trame_slicer.segmentation import SegmentationEffectErase, SegmentationEffectPaint
            editor = self.slicer_app.segmentation_editor
            if editor.active_segmentation is None:
                self.state.effect = "none"
                return
            if effect == "paint":
                eff = editor.set_active_effect_type(SegmentationEffectPaint)
            elif effect == "erase":
                eff = editor.set_active_effect_type(SegmentationEffectErase)
            else:
                editor.deactivate_effect()
                eff = None
            if eff is not None and hasattr(eff, "set_brush_diameter"):
                from trame_slicer.segmentation.paint_effect_parameters import BrushDiameterMode
                eff.set_brush_diameter(float(self.state.brush_mm or 6.0), BrushDiameterMode.Absolute)
            self.state.effect = effect
        self._guard("Segment editor", run)

    def on_brush(self, value):
        self.state.brush_mm = float(value)
        self.on_effect(self.state.effect or "none")

    def on_answer(self, yes: bool):
        """The page's answer to the controller's question: yes repeats the action that asked."""
        def run():
            q, self.dialogs.question = self.dialogs.question, None
            if not yes or not q:
                return
            self.dialogs.approved.add(q)
            if "Overwrite your edits" in q:
                self.on_create_segment()
            else:
                self.on_apply()
        self._guard("Answer", run)

    def on_dismiss_errors(self):
        self.state.errors = []

    # ------------------------------------------------------------------ upload
    def on_upload(self, files):
        def run():
            items = files if isinstance(files, list) else [files]
            for f in items:
                if not f:
                    continue
                self._load_upload(f)
        self._guard("Upload", run)
        self.state.upload_file = None

    def _load_upload(self, f: dict):
        from trame.app.file_upload import ClientFile
        cf = ClientFile(f)
        name = Path(str(cf.name or "upload")).name  # never a path from the client
        suffix = _suffix(name)
        if not suffix:
            raise ValueError(f"'{name}' is not a NIfTI, NRRD or MHA file ({', '.join(UPLOAD_SUFFIXES)})")
        size = int(cf.size or 0)
        content = cf.content or b""
        if max(size, len(content)) > self.max_upload_bytes:
            raise ValueError(f"'{name}' is {max(size, len(content)) / 2**20:.0f} MB; the limit is "
                             f"{self.max_upload_bytes / 2**20:.0f} MB (--max-upload-mb)")
        if not content:
            raise ValueError(f"'{name}' is empty")
        folder = Path(tempfile.mkdtemp(dir=self.tmp.name))
        path = folder / f"upload{suffix}"
        path.write_bytes(content)
        try:
            node = load_volume_file(self.scene, path, name=name)
        finally:
            path.unlink(missing_ok=True)
        if not self.controller.running:
            self.params.inputVolume = node
            self._show_input()
        self.controller.status = f"Loaded '{node.GetName()}'."

    # ------------------------------------------------------------------ export
    def export_bytes(self, what: str, fmt: str):
        """The heatmap or the segmentation ('Anomaly' as a 0/1 label map) on the input's grid, as file bytes."""
        import numpy as np
        import SimpleITK as sitk

        from ..logic import SEGMENT_NAME, image_from_node
        suffix = EXPORT_FORMATS.get(fmt)
        if suffix is None:
            raise ValueError(f"unknown export format {fmt!r}")
        p, heat = self.params, self.controller.heatmap()
        if what == "heatmap":
            if heat is None:
                raise ValueError("compute a heatmap first")
            img = image_from_node(heat, "heatmap")
        elif what == "segmentation":
            seg = p.segmentation
            if seg is None or seg.GetScene() is not self.scene:
                raise ValueError("create the segment first")
            ref = self.scene.GetNodeByID(heat.GetAttribute("VAEAnomaly.Input") or "") if heat is not None else None
            ref = ref or p.inputVolume
            seg_id = seg.GetSegmentation().GetSegmentIdBySegmentName(SEGMENT_NAME)
            arr = self.controller.logic._segment_array(seg, seg_id or None, ref)
            img = sitk.GetImageFromArray(arr.astype(np.uint8))
            img.CopyInformation(image_from_node(ref))
        else:
            raise ValueError(f"unknown export {what!r}")
        folder = Path(tempfile.mkdtemp(dir=self.tmp.name))
        path = folder / f"{what}{suffix}"
        try:
            sitk.WriteImage(img, str(path), True)
            return path.read_bytes()
        finally:
            path.unlink(missing_ok=True)
            folder.rmdir()

    def on_export(self, what: str, fmt: str):
        try:
            data = self.export_bytes(what, fmt)
            self.controller.status = f"Exported the {what} ({len(data) / 2**10:.0f} kB)."
            return self.server.protocol.addAttachment(data)
        except Exception as err:
            self.dialogs.error(f"Export failed: {err}")
            return None
        finally:
            self.render()

    # ------------------------------------------------------------------ page
    def _build_ui(self):
        from trame.ui.vuetify3 import SinglePageWithDrawerLayout
        from trame.widgets import html
        from trame.widgets import vuetify3 as v3

        export_trigger = self.ctrl.trigger_name(self.on_export)
        report_trigger = self.ctrl.trigger_name(self.on_report)
        with SinglePageWithDrawerLayout(self.server, theme="dark") as layout:
            self.ui = layout
            layout.title.set_text("VAE Anomaly")
            layout.root.theme = "dark"
            with layout.toolbar:
                v3.VSpacer()
                v3.VChip("busy: one computation runs", v_show=("busy",), color="orange", size="small",
                         classes="mr-2", id="busy-chip")
                html.Div("{{ status }}", classes="text-caption mr-4", id="status-line")
            with layout.drawer as drawer:
                drawer.width = 380
                with html.Div(classes="pa-3 d-flex flex-column", style="gap: 6px;", id="panel"):
                    v3.VSelect(label="Input volume", items=("volumes",), model_value=("input_id",),
                               update_modelValue=(self.on_input, "[$event]"), disabled=("!inputs_enabled",),
                               density="compact", hide_details=True, id="input-select")
                    v3.VFileInput(label="Upload a volume", v_model=("upload_file",), hint=("upload_info",),
                                  persistent_hint=True, accept=",".join(UPLOAD_SUFFIXES), density="compact",
                                  show_size=True, disabled=("!inputs_enabled",), id="upload",
                                  update_modelValue=(self.on_upload, "[$event]"))
                    v3.VSelect(label="Brain mask (optional)", items=("masks",), model_value=("mask_id",),
                               update_modelValue=(self.on_mask, "[$event]"), clearable=True,
                               disabled=("!inputs_enabled",), density="compact", hide_details=True)
                    v3.VSelect(label="Model", items=("models",), model_value=("model",),
                               update_modelValue=(self.on_model, "[$event]"), disabled=("!inputs_enabled",),
                               density="compact", hide_details=True)
                    html.Pre("{{ model_card }}", style="max-height: 90px; overflow: auto; font-size: 10px;"
                             " white-space: pre-wrap;", classes="text-grey")
                    v3.VSelect(label="Predictor", items=("predictors",), model_value=("predictor",),
                               update_modelValue=(self.on_predictor, "[$event]"), disabled=("!inputs_enabled",),
                               density="compact", hide_details=True)
                    v3.VCheckbox(label="Bright and dark apart", model_value=("signed_heatmap",),
                                 update_modelValue=(self.on_signed, "[$event]"),
                                 disabled=("!inputs_enabled || !signed_enabled",), title=("signed_tooltip",),
                                 density="compact", hide_details=True, id="signed-heatmap")
                    v3.VBtn("{{ apply_text }}", click=self.on_apply, disabled=("!apply_enabled",),
                            color=("running ? 'orange' : 'primary'",), block=True, id="apply-button",
                            title=("apply_tooltip",))
                    v3.VProgressLinear(model_value=("progress",), v_show=("progress_visible",), height=8,
                                       color="orange", id="progress")
                    v3.VAlert(text=("verdict_text",), v_show=("verdict_text",), density="compact",
                              type=("verdict_ok === false ? 'error' : (verdict_ok ? 'success' : 'info')",),
                              classes="text-caption", id="verdict")
                    with html.Div(v_for="(w, i) in warnings", key="i"):
                        v3.VAlert(text=("w",), type="warning", density="compact", classes="mb-1 text-caption")
                    with html.Div(v_for="(e, i) in errors", key="i"):
                        v3.VAlert(text=("e",), type="error", density="compact", classes="mb-1 text-caption error-message",
                                  closable=True, click_close=self.on_dismiss_errors)
                    with v3.VCard(v_if=("question",), variant="outlined", classes="pa-2", id="question"):
                        html.Div("{{ question }}", classes="text-body-2 mb-2")
                        v3.VBtn("Yes", click=(self.on_answer, "[true]"), size="small", color="primary",
                                classes="mr-2", id="question-yes")
                        v3.VBtn("No", click=(self.on_answer, "[false]"), size="small", id="question-no")
                    v3.VDivider()
                    html.Div("Heatmap: {{ heatmap_name }}", v_show=("has_heatmap",), classes="text-caption",
                             id="heatmap-name")
                    # colour legend of the heatmap (the slice views also draw Slicer's own legend)
                    with html.Div(v_show=("has_heatmap",), id="legend"):
                        html.Div(v_show=("!signed_shown",),
                                 style="height: 10px; border-radius: 2px; background: linear-gradient(to right,"
                                       " #000004, #1b0c41, #51127c, #832681, #b5367a, #e3514e, #fb8a31,"
                                       " #f9c72b, #fcffa4);")
                        # a signed heatmap (bright and dark apart): blue darker, red brighter than expected
                        html.Div(v_show=("signed_shown",), id="legend-diverging",
                                 style="height: 10px; border-radius: 2px; background: linear-gradient(to right,"
                                       " #053061, #2166ac, #92c5de, #f7f7f7, #f4a582, #b2182b, #67001f);")
                        with html.Div(classes="d-flex text-caption"):
                            html.Span("{{ legend_min }}")
                            v3.VSpacer()
                            html.Span("{{ legend_max }}")
                    v3.VSlider(label="Opacity", model_value=("opacity",), min=0, max=1, step=0.05,
                               update_modelValue=(self.on_opacity, "[$event]"), disabled=("!outputs_enabled",),
                               density="compact", hide_details=True, id="opacity")
                    v3.VSelect(label="Threshold from", items=("threshold_modes",), model_value=("threshold_mode",),
                               update_modelValue=(self.on_threshold_mode, "[$event]"),
                               disabled=("!outputs_enabled",), density="compact", hide_details=True,
                               id="threshold-mode")
                    v3.VSlider(label="Threshold", model_value=("threshold",), min=0, max=("threshold_max",),
                               step=("threshold_step",), update_modelValue=(self.on_threshold, "[$event]"),
                               disabled=("!outputs_enabled",), density="compact", hide_details=True,
                               thumb_label=True, id="threshold")
                    html.Div("threshold {{ threshold }}", classes="text-caption", id="threshold-value")
                    # the findings at this threshold (the panel's table); a click centres the slice views on one
                    html.Div("{{ findings_text }}", v_show=("has_heatmap",), classes="text-caption",
                             id="findings-text")
                    with v3.VTable(v_show=("findings_rows.length",), density="compact", id="findings",
                                   style="max-height: 180px; overflow: auto; font-size: 11px;"):
                        with html.Thead(), html.Tr():
                            html.Th("{{ h }}", v_for="(h, j) in findings_header", key="j")
                        with html.Tbody(), html.Tr(v_for="(row, i) in findings_rows", key="i", classes="finding-row",
                                                   style="cursor: pointer;", title="Centre the slice views here",
                                                   click=(self.on_finding, "[i]")):
                            html.Td("{{ cell }}", v_for="(cell, j) in row", key="j")
                    html.Div("{{ slice_position }}", classes="text-caption text-grey", id="slice-position")
                    v3.VBtn("Download report", prepend_icon="mdi-file-document-outline", size="small", block=True,
                            disabled=("!report_enabled",), id="download-report",
                            click=(f"utils.download(report_name, trigger('{report_trigger}', []), 'text/html')"))
                    v3.VBtn("Create segment \"Anomaly\"", click=self.on_create_segment,
                            disabled=("!create_segment_enabled",), block=True, id="create-segment")
                    with v3.VBtnToggle(model_value=("effect",), update_modelValue=(self.on_effect, "[$event]"),
                                       mandatory=True, density="compact", disabled=("!has_segment",),
                                       divided=True, id="effects"):
                        v3.VBtn("None", value="none", size="small", id="effect-none")
                        v3.VBtn("Paint", value="paint", size="small", id="effect-paint")
                        v3.VBtn("Erase", value="erase", size="small", id="effect-erase")
                    v3.VSlider(label="Brush (mm)", model_value=("brush_mm",), min=1, max=40, step=1,
                               update_modelValue=(self.on_brush, "[$event]"), disabled=("!has_segment",),
                               density="compact", hide_details=True, thumb_label=True)
                    with html.Div(classes="d-flex", style="gap: 6px;"):
                        v3.VSelect(items=("export_formats",), v_model=("export_format",), density="compact",
                                   hide_details=True, style="max-width: 130px;", id="export-format")
                        v3.VBtn("Heatmap", prepend_icon="mdi-download", size="small",
                                disabled=("!has_heatmap",), id="export-heatmap",
                                click=(f"utils.download('heatmap.' + export_format, trigger('{export_trigger}',"
                                       f" ['heatmap', export_format]), 'application/octet-stream')"))
                        v3.VBtn("Segmentation", prepend_icon="mdi-download", size="small",
                                disabled=("!has_segment",), id="export-segmentation",
                                click=(f"utils.download('segmentation.' + export_format, trigger('{export_trigger}',"
                                       f" ['segmentation', export_format]), 'application/octet-stream')"))
            with layout.content:
                with html.Div(style="position: relative; width: 100%; height: calc(100vh - 64px);", id="views"):
                    self.layout_manager.initialize_layout_grid(layout)


def serve(volumes=(), mask=None, port: int = 8080, host: str = DEFAULT_HOST, apply: bool = False,
          max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, open_browser: bool = False) -> int:
    """Build the page and serve it until interrupted (blocking)."""
    import sys
    import time
    os.environ["WSLINK_MAX_MSG_SIZE"] = str(int(max_upload_mb * 2**20) + 2**20)  # uploads travel over the socket
    t0 = time.monotonic()
    app = VAEAnomalyWebApp(volumes, mask, apply=apply, max_upload_mb=max_upload_mb)
    app.ctrl.on_server_ready.add(lambda **_: print(f"VAEAnomaly web viewer ready on http://{host}:{app.server.port}/ "
                                                   f"({time.monotonic() - t0:.1f} s after start)", flush=True))
    argv = sys.argv
    sys.argv = argv[:1]  # trame's own command line parser must not read `vaeanomaly web`'s options
    try:
        app.server.start(port=port, host=host, open_browser=open_browser, timeout=0, show_connection_info=False)
    finally:
        sys.argv = argv
        app.controller.close()
        app.tmp.cleanup()
    return 0
