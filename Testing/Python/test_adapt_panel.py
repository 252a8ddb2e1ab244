""""Adapt to my scanner..." in the panel, headless on a real vtkMRMLScene (slicer-core): the controller starts
the real `vaeanomaly adapt` in a child process (VAEAnomalyLib/adaptjob.py) on volumes of the scene, generated
by vaeanomaly.synth (the held-out "epi" domain, at half resolution so that a run takes seconds)."""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")

from test_controller import ScriptedUser, alive, children_of, write_launcher  # noqa: E402
from test_logic import add_label, add_volume, snapshot  # noqa: E402
from VAEAnomalyLib.adaptjob import (ENV_USER_MODELS, AdaptJob, AdaptJobError, adaptation_summary,  # noqa: E402
                                    check_model_name, folder_scans, user_models, user_models_dir)
from VAEAnomalyLib.controller import PanelController, PanelParams  # noqa: E402
from VAEAnomalyLib.logic import image_from_node  # noqa: E402
from VAEAnomalyLib.panel import CUSTOM_MODEL, bundled_models, default_vae  # noqa: E402


@pytest.fixture(scope="module")
def site_images():
    """3 healthy generated scans of one unseen scanner domain (skull-stripped) and their brain masks."""
    from vaeanomaly.synth import make_subject
    subs = [make_subject(1_700_000 + k, domain="epi", step=2, off=("partial",)) for k in range(3)]
    return [(s.t2, s.mask) for s in subs]


@pytest.fixture
def scene():
    s = slicer.vtkMRMLScene()
    yield s
    s.Clear(1)


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    d = tmp_path / "user models"
    monkeypatch.setenv(ENV_USER_MODELS, str(d))
    return d


def fingerprint(node):
    """What must not change on an input node: voxels, geometry, and the node's and image's modified times."""
    img = image_from_node(node)
    return (sitk.GetArrayFromImage(img).tobytes(), img.GetSpacing(), img.GetOrigin(), img.GetDirection(),
            node.GetMTime(), node.GetImageData().GetMTime(), node.GetName())


def run_to_end(ctl, timeout=900):
    t0, seen = time.time(), []
    while ctl.poll():
        assert time.time() - t0 < timeout, (ctl.adapt_job.messages if ctl.adapt_job else ctl.adapt_status)
        seen.append((ctl.adapt_progress(), ctl.state().adapt_stage))
        time.sleep(0.1)
    return seen


@pytest.mark.slow
def test_adapt_from_scene_volumes_adds_and_selects_the_model(scene, site_images, models_dir):
    scans = [add_volume(scene, img, f"site scan {k}") for k, (img, _) in enumerate(site_images)]
    masks = [add_label(scene, sitk.GetArrayFromImage(m), img) for img, m in site_images]
    before = [fingerprint(n) for n in scans + masks]
    nodes_before = snapshot(scene)
    user = ScriptedUser()
    params = PanelParams()
    ctl = PanelController(scene, params, user)
    assert not any(v.endswith(".safetensors") for _, v in ctl.model_choices())
    assert ctl.start_adapt(scans, base_model=default_vae(), name="my-scanner", minutes=0.05, masks=masks,
                           max_epochs=2), (ctl.adapt_status, user.shown)
    st = ctl.state()
    assert st.adapt_text == "Cancel" and st.adapt_enabled and st.adapt_progress_visible and not st.adapt_inputs_enabled
    # one job at a time: Apply is refused while the adaptation runs
    params.inputVolume = scans[0]
    assert not ctl.state().apply_enabled and "adaptation is running" in ctl.state().apply_tooltip
    assert not ctl.apply() and ctl.job is None
    tmp = ctl.adapt_job.tmp
    seen = run_to_end(ctl)
    assert user.shown == [], user.shown
    assert any(p > 0 for p, _ in seen) and any("fine-tuning" in s for _, s in seen)
    out = models_dir / "my-scanner.safetensors"
    assert out.is_file() and (models_dir / "my-scanner.md").is_file() and not tmp.exists()
    assert not list(models_dir.glob("*.part"))
    # in the model list (after the bundled ones, before "Custom file..."), selected, its card says how it went
    choices = ctl.model_choices()
    assert ("my-scanner (adapted)", str(out)) in choices
    assert [v for _, v in choices][:len(bundled_models())] == bundled_models() and choices[-1][1] == CUSTOM_MODEL
    assert ctl.take_models_changed() and not ctl.take_models_changed()
    assert params.model == str(out) and ctl.model_path() == str(out)
    card = ctl.state().model_card
    assert card.startswith(f"Adapted from {default_vae()} on 3 healthy scans") and "before" in card
    assert "masks given" in card and "ADAPTED on 3 healthy scans" in card
    assert "saved in" in ctl.state().adapt_status and ctl.state().adapt_text == "Adapt"
    from vaeanomaly.checkpoint import load_checkpoint
    a = load_checkpoint(out).meta["adaptation"]
    assert sorted(a["scans"]) == [f"site_scan_{k}.nrrd" for k in range(3)]
    # the inputs were only read: same voxels, geometry, names and modified times; no node added or removed
    assert [fingerprint(n) for n in scans + masks] == before and snapshot(scene) == nodes_before
    # the same name again is refused before anything starts; the model is not touched
    mtime = out.stat().st_mtime_ns
    assert not ctl.start_adapt(scans, name="my-scanner", minutes=0.05) and ctl.adapt_job is None
    assert user.kinds() == ["error"] and "exists" in user.shown[0][1] and out.stat().st_mtime_ns == mtime
    # the new model scores in the panel
    assert ctl.apply(), (ctl.status, user.shown)
    while ctl.poll():
        time.sleep(0.1)
    assert ctl.status.startswith("Done"), (ctl.status, user.shown)
    assert params.heatmap.GetAttribute("VAEAnomaly.Model") == "my-scanner"
    ctl.close()


def test_cancel_stops_the_process_tree_and_writes_nothing(scene, site_images, models_dir, tmp_path):
    scans = [add_volume(scene, img, f"s{k}") for k, (img, _) in enumerate(site_images)]
    launcher = write_launcher(tmp_path, f'"{sys.executable}" "$@"\nexit $?')  # Python as the launcher's child
    user = ScriptedUser()
    ctl = PanelController(scene, PanelParams(), user, launcher=launcher)
    assert ctl.start_adapt(scans, name="cancelled", minutes=5), (ctl.adapt_status, user.shown)
    job = ctl.adapt_job
    t0 = time.time()
    while not children_of(job.proc.pid):
        assert time.time() - t0 < 30 and job.proc.poll() is None, job.messages
        time.sleep(0.05)
    python = children_of(job.proc.pid)[0]
    while ctl.poll() and job.progress == 0:  # it is reading the scans
        assert time.time() - t0 < 60, job.messages
        time.sleep(0.05)
    assert alive(python)
    t1 = time.time()
    assert not ctl.adapt_or_cancel()  # the Adapt button reads Cancel
    assert time.time() - t1 < 2.0
    assert not alive(python) and job.proc.poll() is not None
    assert ctl.adapt_job is None and "no model was written" in ctl.adapt_status and ctl.state().adapt_text == "Adapt"
    time.sleep(0.5)
    assert not job.tmp.exists() and not models_dir.exists() and user.shown == []
    assert not ctl.poll()
    ctl.close()


@pytest.mark.slow  # two adapt processes: CI runs it (RUN_SLOW=1)
def test_bad_sets_show_the_commands_own_message(scene, site_images, models_dir):
    user = ScriptedUser()
    ctl = PanelController(scene, PanelParams(), user)
    one = add_volume(scene, site_images[0][0], "only one")
    assert ctl.start_adapt([one], name="one", minutes=0.05)
    run_to_end(ctl, 120)
    assert user.kinds() == ["error"] and "at least 3 healthy scans" in user.shown[0][1], user.shown
    assert "failed" in ctl.adapt_status and not models_dir.exists()
    # a T1-like scan (the cerebrospinal fluid dark) among T2 scans
    img = site_images[2][0]
    a = sitk.GetArrayFromImage(img)
    t1 = sitk.GetImageFromArray(np.where(a > 0, a.max() * 1.1 - a, 0).astype(np.float32))
    t1.CopyInformation(img)
    vols = [add_volume(scene, site_images[k][0], f"t2 {k}") for k in range(2)] + [add_volume(scene, t1, "T1 scan")]
    assert ctl.start_adapt(vols, name="mixed", minutes=0.05)
    run_to_end(ctl, 180)
    assert user.kinds() == ["error", "error"] and "'T1_scan.nrrd' does not look T2-weighted" in user.shown[1][1], \
        user.shown
    assert not models_dir.exists() and ctl.adapt_job is None
    ctl.close()


def test_refusals_before_anything_starts(scene, site_images, models_dir, tmp_path):
    """Nothing picked, a taken / bundled / unusable name, a heatmap, an empty folder, a job already running:
    an error message (or a status line), no child process, nothing written, the scene unchanged."""
    vols = [add_volume(scene, img, f"v{k}") for k, (img, _) in enumerate(site_images)]
    models_dir.mkdir()
    (models_dir / "taken.safetensors").write_bytes(b"x")
    heat = add_volume(scene, site_images[0][0], "a heatmap")
    heat.SetAttribute("VAEAnomaly.Predictor", "rec-grad")
    rec = add_volume(scene, site_images[0][0], "a reconstruction")
    rec.SetAttribute("VAEAnomaly.ReconstructionOf", vols[0].GetID())  # as logic.add_results marks it
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "brain_mask.nii.gz").write_bytes(b"")  # masks are not scans
    before = snapshot(scene)
    user = ScriptedUser()
    ctl = PanelController(scene, PanelParams(), user)
    cases = [((), "x", "pick the healthy scans"), (vols, "taken", "exists"),
             (vols, bundled_models()[0], "bundled model"), (vols, "", "cannot be a model name"),
             (vols, "../escape", "cannot be a model name"), (vols + [heat], "new", "heatmap computed by this module"),
             (vols + [rec], "new", "reconstruction computed by this module")]
    for k, (v, name, why) in enumerate(cases):
        assert not ctl.start_adapt(v, name=name) and ctl.adapt_job is None, name
        assert user.kinds() == ["error"] * (k + 1) and why in user.shown[-1][1], (why, user.shown[-1])
        assert why.split()[0].lower() in ctl.state().adapt_status.lower()
    assert not ctl.start_adapt(folder=str(empty), name="new") and "no NIfTI or NRRD" in user.shown[-1][1]
    assert sorted(p.name for p in models_dir.iterdir()) == ["taken.safetensors"] and snapshot(scene) == before
    # a heatmap computation is running: Adapt waits (a launcher that only sleeps stands in for the job)
    ctl.launcher = write_launcher(tmp_path, "sleep 30")
    ctl.params.inputVolume, ctl.params.model = vols[0], CUSTOM_MODEL
    ctl.params.customModelPath = str(_tiny_checkpoint(tmp_path))
    assert ctl.apply(), (ctl.status, user.shown)
    assert not ctl.state().adapt_enabled and "being computed" in ctl.state().adapt_tooltip
    assert not ctl.start_adapt(vols, name="new") and ctl.adapt_job is None and "being computed" in ctl.adapt_status
    ctl.cancel()
    assert ctl.state().adapt_enabled
    ctl.close()


def _tiny_checkpoint(tmp_path):
    import torch

    from vaeanomaly.checkpoint import save_checkpoint
    from vaeanomaly.model import VAE
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "tiny.safetensors", VAE(latent_dim=8), {"beta": 1.0, "name": "tiny"})


def test_user_models_folder_listing_and_summary(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_USER_MODELS, raising=False)
    assert user_models_dir() == __import__("pathlib").Path.home() / ".vaeanomaly" / "models"  # headless default
    monkeypatch.setenv(ENV_USER_MODELS, str(tmp_path / "m"))
    assert user_models_dir() == tmp_path / "m" and user_models() == []  # no folder yet: no models, no error
    (tmp_path / "m").mkdir()
    for n in ("b-site", "A-site"):
        (tmp_path / "m" / f"{n}.safetensors").write_bytes(b"")
    (tmp_path / "m" / "half.safetensors.part").write_bytes(b"")
    assert [p.name for p in user_models()] == ["A-site.safetensors", "b-site.safetensors"]
    labels = [lab for lab, _ in PanelController.model_choices()]
    assert labels[-3:] == ["A-site (adapted)", "b-site (adapted)", "Custom file..."]
    assert check_model_name("new.safetensors") == tmp_path / "m" / "new.safetensors"
    from VAEAnomalyLib.panel import MODELS_DIR
    with pytest.raises(AdaptJobError, match="bundled models' folder"):
        check_model_name("new", MODELS_DIR)
    assert check_model_name("b-site", overwrite=True).name == "b-site.safetensors"
    # a folder contributes its NIfTI/NRRD scans, not its masks
    d = tmp_path / "scans"
    d.mkdir()
    for n in ("a.nii.gz", "b.nrrd", "a_mask.nii.gz", "seg.nrrd", "notes.txt", "c.nii"):
        (d / n).write_bytes(b"")
    assert [p.name for p in folder_scans(d)] == ["a.nii.gz", "b.nrrd", "c.nii"]
    meta = {"adaptation": {"base_model": "bvae", "scans": ["a", "b", "c"], "fine_tuned_on": ["a"],
                           "held_out": ["b", "c"], "masks": "automatic", "predictor": "rec-grad",
                           "flagged_percent_before": {"rec-grad": 20.44}, "flagged_percent_after": {"rec-grad": 1.2},
                           "epochs": 7, "stopped": "time budget of 8 min", "minutes": 9.1}}
    s = adaptation_summary(meta)
    assert s.startswith("Adapted from bvae on 3 healthy scans (1 fine-tuned on, 2 held out")
    assert "20.4% before, 1.2% after" in s and adaptation_summary({}) == ""


def test_adapt_job_from_files_with_masks_builds_the_command(tmp_path, site_images, models_dir):
    """Files are passed as they are (no copy); the output goes to the job's temporary folder first."""
    files, masks = [], []
    for k, (img, m) in enumerate(site_images):
        files.append(tmp_path / f"f{k}.nii.gz")
        masks.append(tmp_path / f"f{k}_m.nii.gz")
        sitk.WriteImage(img, str(files[-1]))
        sitk.WriteImage(m, str(masks[-1]))
    job = AdaptJob(None, files, masks, "bvae-l64-b10", "from-files", 2, launcher="PY", max_epochs=3)
    try:
        c = job.cmd
        assert c[:4] == ["PY", "-m", "vaeanomaly.cli", "adapt"] and c[4:7] == list(map(str, files))
        assert c[c.index("--masks") + 1:c.index("--masks") + 4] == list(map(str, masks))
        assert c[c.index("-o") + 1] == str(job.tmp / "out" / "from-files.safetensors")
        assert c[c.index("--model") + 1] == "bvae-l64-b10" and c[c.index("--minutes") + 1] == "2"
        assert c[c.index("--progress") + 1] == "lines" and c[c.index("--max-epochs") + 1] == "3"
        assert job.output == models_dir / "from-files.safetensors"
    finally:
        job.cleanup()
    assert not job.tmp.exists()
    with pytest.raises(AdaptJobError, match="every scan or for none"):
        AdaptJob(None, files, [masks[0], None, None], None, "x")
    assert os.listdir(tmp_path).count("user models") == 0
