""""Adapt to my scanner..." as a background job: `vaeanomaly adapt` in a child process, like ScoringJob.

The scans come from the scene (volume nodes, exported as uncompressed NRRD files to a temporary folder;
the nodes are only read) or from files. The child writes the new checkpoint and its card into that
temporary folder; `finish()` moves both into the user's models folder, so a cancelled or failed job
leaves nothing there. Cancel stops the whole process tree (the PythonSlicer launcher and its Python).

No Qt and no slicer.app here (only `user_models_dir()` asks Slicer for its settings folder when it runs
inside the application); torch is imported only by `finish()` (load_checkpoint) and by the child.
"""
from __future__ import annotations

import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .worker import CANCEL_GRACE, child_env, child_group, kill_process_tree, python_executable

ENV_USER_MODELS = "VAEANOMALY_USER_MODELS"
SCAN_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr")  # what a chosen folder contributes
DEFAULT_MINUTES = 8.0
NAME_RULE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class AdaptJobError(ValueError):
    """A request the panel refuses before starting anything (name, output, inputs)."""


def user_models_dir() -> Path:
    """Where adapted models live: $VAEANOMALY_USER_MODELS if set; inside Slicer, a VAEAnomaly/Models folder
    beside the user settings file (slicer.app.slicerUserSettingsFilePath, as Slicer's ScreenCapture module
    places its own downloads), so it survives Slicer upgrades; elsewhere ~/.vaeanomaly/models. Never the
    bundled models' folder."""
    env = os.environ.get(ENV_USER_MODELS)
    if env:
        return Path(env).expanduser()
    try:
        import slicer
        app = getattr(slicer, "app", None)
        settings = getattr(app, "slicerUserSettingsFilePath", "") if app is not None else ""
        if settings:
            return Path(os.path.dirname(settings)) / "VAEAnomaly" / "Models"
    except Exception:  # headless, or no application: the home folder
        pass
    return Path.home() / ".vaeanomaly" / "models"


def user_models(folder: Optional[Path] = None) -> list[Path]:
    """The adapted models in the user's folder (sorted by name); none when the folder does not exist."""
    d = Path(folder) if folder is not None else user_models_dir()
    try:
        return sorted((p for p in d.glob("*.safetensors") if p.is_file()), key=lambda p: p.name.lower())
    except OSError:
        return []


def folder_scans(folder) -> list[Path]:
    """Every NIfTI / NRRD file of a folder (not its subfolders), sorted; files whose name says 'mask',
    'seg' or 'label' are left out (a scan folder often holds its brain masks too)."""
    d = Path(folder)
    if not d.is_dir():
        raise AdaptJobError(f"folder '{folder}' does not exist")
    out = []
    for p in sorted(d.iterdir()):
        name = p.name.lower()
        if p.is_file() and name.endswith(SCAN_SUFFIXES) and not re.search(r"mask|seg|label", name):
            out.append(p)
    return out


def check_model_name(name: str, folder: Optional[Path] = None, overwrite: bool = False) -> Path:
    """The new model's file in the user's folder; refused: an unusable name, a bundled model's name, a
    name that exists (unless overwrite), a folder that is the bundled models' folder."""
    from .panel import MODELS_DIR, bundled_models
    name = (name or "").strip()
    if name.endswith(".safetensors"):
        name = name[:-len(".safetensors")]
    if not NAME_RULE.match(name):
        raise AdaptJobError(f"'{name}' cannot be a model name: use letters, digits, '-', '_' or '.' "
                            f"(e.g. my-scanner), at most 64 characters")
    if name in bundled_models():
        raise AdaptJobError(f"'{name}' is a bundled model's name; choose another name")
    d = Path(folder) if folder is not None else user_models_dir()
    if d.resolve() == MODELS_DIR.resolve():
        raise AdaptJobError(f"the user models folder {d} is the bundled models' folder; set {ENV_USER_MODELS} "
                            f"to another folder")
    existing = d
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not os.access(existing, os.W_OK):
        raise AdaptJobError(f"the user models folder {d} cannot be written; set {ENV_USER_MODELS} to a writable "
                            f"folder")
    out = d / f"{name}.safetensors"
    if out.exists() and not overwrite:
        raise AdaptJobError(f"a model named '{name}' exists ({out}); choose another name")
    return out


def adaptation_summary(meta: dict) -> str:
    """A few lines for the model card: what the model was adapted on and the flagged % before/after."""
    a = meta.get("adaptation") if isinstance(meta, dict) else None
    if not isinstance(a, dict):
        return ""
    pred = a.get("predictor", "rec-grad")
    before = (a.get("flagged_percent_before") or {}).get(pred)
    after = (a.get("flagged_percent_after") or {}).get(pred)

    def pct(v):
        return f"{v:.1f}%" if isinstance(v, (int, float)) else "not known"
    lines = [f"Adapted from {a.get('base_model', '?')} on {len(a.get('scans') or [])} healthy scans "
             f"({len(a.get('fine_tuned_on') or [])} fine-tuned on, {len(a.get('held_out') or [])} held out; "
             f"masks {a.get('masks', '?')}).",
             f"Healthy brain flagged ({pred}, held-out scans): {pct(before)} before, {pct(after)} after.",
             f"{a.get('epochs', '?')} epochs ({a.get('stopped', '?')}), {a.get('minutes', '?')} min"
             f"{'; interrupted' if a.get('interrupted') else ''}."]
    return "\n".join(lines)


@dataclass
class AdaptResult:
    path: Path            # the new checkpoint in the user's models folder
    card: Optional[Path]  # its model card (NEW.md), if the child wrote one
    adaptation: dict      # the checkpoint's "adaptation" metadata (before/after flagged %, epochs, ...)
    summary: str          # adaptation_summary() of it


def _copy_into_place(src: Path, dst: Path) -> None:
    """Copy to a partial file beside `dst`, then rename: `dst` is never half-written (and the temporary
    folder may be on another file system, where a rename alone cannot move it)."""
    part = dst.with_name(dst.name + ".part")
    try:
        shutil.copyfile(src, part)
        os.replace(part, dst)
    finally:
        if part.exists():
            part.unlink()


def _safe_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "scan"


def _is_file_item(x) -> bool:
    return isinstance(x, (str, os.PathLike))


class AdaptJob:
    """`vaeanomaly adapt` in a child process: start(), poll() from a timer (progress, stage, messages),
    cancel() stops the whole process tree and removes everything, finish() moves the new model into the
    user's folder and returns an AdaptResult. The scene is never touched (the nodes are only read)."""

    def __init__(self, logic, volumes: Sequence, masks: Optional[Sequence] = None, base_model: Optional[str] = None,
                 output_name: str = "", minutes: float = DEFAULT_MINUTES, launcher: Optional[str] = None,
                 output_dir: Optional[Path] = None, overwrite: bool = False, max_epochs: Optional[int] = None,
                 device: str = "cpu"):
        import SimpleITK as sitk
        volumes = list(volumes or [])
        if not volumes:
            raise AdaptJobError("pick the healthy scans to adapt on (volumes of the scene, or a folder)")
        if masks is not None and len(list(masks)) != len(volumes):
            raise AdaptJobError(f"{len(volumes)} scans but {len(list(masks))} masks: give one mask per scan")
        masks = list(masks) if masks is not None else [None] * len(volumes)
        if any(m is None for m in masks) and any(m is not None for m in masks):
            raise AdaptJobError("give a brain mask for every scan or for none (skull-stripped scans need none)")
        if not float(minutes) > 0:
            raise AdaptJobError("the fine-tuning time must be positive")
        self.output = check_model_name(output_name, output_dir, overwrite)
        self.overwrite = overwrite
        self.logic, self.base_model, self.minutes = logic, base_model, float(minutes)
        for v in volumes:
            if not _is_file_item(v) and v.GetAttribute("VAEAnomaly.Predictor"):
                raise AdaptJobError(f"'{v.GetName()}' is a heatmap computed by this module, not a scan")
            if not _is_file_item(v) and v.GetAttribute("VAEAnomaly.ReconstructionOf"):
                raise AdaptJobError(f"'{v.GetName()}' is a reconstruction computed by this module, not a scan")
        self.tmp = Path(tempfile.mkdtemp(prefix="vaeanomaly-adapt-"))
        try:
            scans, mask_files, used = [], [], set()
            for i, (v, m) in enumerate(zip(volumes, masks)):
                if _is_file_item(v):
                    scans.append(Path(v))
                    if m is not None:
                        if not _is_file_item(m):
                            raise AdaptJobError("a scan given as a file needs its mask as a file")
                        mask_files.append(Path(m))
                    continue
                # a node: its voxels (and mask) exported, uncompressed; the node is only read
                stem = _safe_stem(v.GetName())
                while stem in used:
                    stem = f"{stem}_{i}"
                used.add(stem)
                if m is not None and _is_file_item(m):
                    img, _ = logic.input_images(v, None)
                    mask_files.append(Path(m))
                else:
                    img, mask = logic.input_images(v, m)
                    if mask is not None:
                        mask_files.append(self.tmp / "masks" / f"{stem}.nrrd")
                        mask_files[-1].parent.mkdir(exist_ok=True)
                        sitk.WriteImage(mask, str(mask_files[-1]), False)
                scans.append(self.tmp / "scans" / f"{stem}.nrrd")
                scans[-1].parent.mkdir(exist_ok=True)
                sitk.WriteImage(img, str(scans[-1]), False)
        except Exception:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        self.scans, self.masks = scans, mask_files
        self.child_output = self.tmp / "out" / self.output.name
        self.cmd = [launcher or python_executable(), "-m", "vaeanomaly.cli", "adapt", *map(str, scans),
                    "-o", str(self.child_output), "--minutes", f"{self.minutes:g}", "--device", device,
                    "--progress", "lines"]
        if base_model:
            self.cmd += ["--model", str(base_model)]
        if mask_files:
            self.cmd += ["--masks", *map(str, mask_files)]
        if max_epochs is not None:
            self.cmd += ["--max-epochs", str(int(max_epochs))]
        self.proc, self.progress, self.stage, self.eta, self.messages = None, 0.0, "starting", None, []
        self._q: queue.Queue = queue.Queue()
        self._reader = None
        self._done = False

    # ------------------------------------------------------------------ the child
    def start(self):
        try:
            self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                         encoding="utf-8", errors="replace", env=child_env(), **child_group())
        except Exception:
            self.cleanup()
            raise
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self):
        for line in self.proc.stderr:
            self._q.put(line.rstrip())

    def poll(self) -> Optional[int]:
        """Update progress / stage / eta / messages; the exit code once finished, else None."""
        rc = None if self.proc is None else self.proc.poll()
        if rc is not None and self._reader is not None:
            self._reader.join(5)  # the child's last lines (its error message) are read before we report
        self._drain()
        return rc

    def _drain(self) -> None:
        while not self._q.empty():
            line = self._q.get_nowait()
            if line.startswith("PROGRESS "):  # PROGRESS <fraction> ETA <s>s <stage> (vaeanomaly.cli.Progress)
                parts = line.split(maxsplit=4)
                try:
                    self.progress = float(parts[1])
                except (IndexError, ValueError):
                    continue
                if len(parts) > 3 and parts[2] == "ETA":
                    self.eta = float(parts[3][:-1]) if parts[3][:-1].replace(".", "", 1).isdigit() else None
                if len(parts) > 4:
                    self.stage = parts[4]
            elif line:
                self.messages.append(line)

    def wait(self, timeout=None) -> Optional[int]:
        self.proc.wait(timeout)
        return self.poll()

    def error(self) -> str:
        """The child's own message (vaeanomaly: error: ...), without the prefix."""
        errs = [m for m in self.messages if "error" in m.lower()]
        msg = (errs or self.messages or ["the adaptation process failed without a message"])[-1]
        for prefix in ("vaeanomaly: error: ", "error: "):
            if msg.startswith(prefix):
                msg = msg[len(prefix):]
        return msg[:1].upper() + msg[1:]

    def cancel(self) -> None:
        """Stop the child and everything it started, then remove the temporary folder: nothing is written."""
        if self.proc is not None:
            kill_process_tree(self.proc, CANCEL_GRACE)  # on the GUI thread: at most about 2 x 0.5 s
        self.cleanup()

    def finish(self) -> AdaptResult:
        """After a successful run: check the new checkpoint (load_checkpoint: safetensors + JSON, no
        pickle), move it and its card into the user's folder, return the adaptation summary. The
        temporary folder is removed whatever happens."""
        from vaeanomaly.checkpoint import load_checkpoint
        try:
            if self._done:
                raise RuntimeError("this adaptation's result was already taken")
            self._done = True
            if not self.child_output.is_file():
                raise RuntimeError(f"the adaptation process wrote no model "
                                   f"({'; '.join(self.messages[-3:]) or 'no output'})")
            meta = load_checkpoint(self.child_output).meta
            if self.output.exists() and not self.overwrite:  # appeared while the job ran
                raise AdaptJobError(f"a model named '{self.output.stem}' appeared in {self.output.parent} "
                                    f"during the adaptation; it was not replaced")
            self.output.parent.mkdir(parents=True, exist_ok=True)
            card_src = self.child_output.with_suffix(".md")
            card = self.output.with_suffix(".md") if card_src.is_file() else None
            if card is not None:
                _copy_into_place(card_src, card)
            _copy_into_place(self.child_output, self.output)  # the model last: listed only when complete
            adaptation = meta.get("adaptation") or {}
            return AdaptResult(self.output, card, adaptation, adaptation_summary(meta))
        finally:
            self.cleanup()

    def cleanup(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
