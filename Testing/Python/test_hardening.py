"""Issue 10: nothing lost, nothing silently wrong — safe writes, whole-file input checks, options checked
before any work, the ensemble as a full predictor, calibration, progress. Real files, real models."""
from __future__ import annotations

import gzip
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import ROOT, make_phantom, write_dicom_series
from vaeanomaly.checkpoint import load_checkpoint, update_metadata
from vaeanomaly.cli import main as cli
from vaeanomaly.predictors import PredictorOptions, compute_maps
from vaeanomaly.volume import VolumeError, read_image


@pytest.fixture
def t2(tmp_path):
    p = tmp_path / "T2.nii.gz"
    sitk.WriteImage(make_phantom((60, 70, 40), blob_index=(30, 35, 20)), str(p))
    return p


def run_cli(args, capsys):
    rc = cli(args)
    return rc, capsys.readouterr().err


# --------------------------------------------------------------------------- 1. every write is safe
def test_outputs_that_are_inputs_are_refused_before_work(t2, tiny_checkpoint, tmp_path, capsys):
    mask = tmp_path / "mask.nii.gz"
    sitk.WriteImage(sitk.Cast(sitk.ReadImage(str(t2)) > 0, sitk.sitkUInt8), str(mask))
    (tmp_path / "link.nii.gz").symlink_to(t2)
    os.link(t2, tmp_path / "hard.nii.gz")
    before = t2.read_bytes(), mask.read_bytes(), tiny_checkpoint.read_bytes()
    m = ["--model", str(tiny_checkpoint), "--progress", "none"]
    for args in (["-o", str(t2)],                                              # the data loss
                 ["-o", str(tmp_path / "." / "T2.nii.gz")],                      # same file, other spelling
                 ["-o", str(tmp_path / "link.nii.gz")],                          # through a symbolic link
                 ["-o", str(tmp_path / "hard.nii.gz")],                          # a hard link
                 ["-o", str(tmp_path / "h.nii.gz"), "--threshold", "p99", "--label", str(t2)],
                 ["-o", str(mask), "--mask", str(mask)],
                 ["-o", str(tmp_path / "h.nii.gz"), "--threshold", "p99", "--label", str(tmp_path / "h.nii.gz")]):
        rc, err = run_cli(["score", str(t2)] + args + m, capsys)
        assert rc == 2, args
        assert ("would destroy" in err or "same file" in err) and "Traceback" not in err, err
    assert (t2.read_bytes(), mask.read_bytes(), tiny_checkpoint.read_bytes()) == before
    assert not (tmp_path / "h.nii.gz").exists()


def test_outputs_go_into_new_folders_whole_and_readable(t2, tiny_checkpoint, tmp_path, capsys):
    heat, label = tmp_path / "a" / "b" / "heat.nii.gz", tmp_path / "c" / "label.nii.gz"
    rc, err = run_cli(["score", str(t2), "-o", str(heat), "--threshold", "p99", "--label", str(label),
                       "--model", str(tiny_checkpoint), "--progress", "none"], capsys)
    assert rc == 0, err
    assert sitk.ReadImage(str(heat)).GetSize() == (60, 70, 40) and sitk.ReadImage(str(label)).GetSize() == (60, 70, 40)
    assert not list(heat.parent.glob(".*tmp*")) and not list(label.parent.glob(".*tmp*"))
    umask = os.umask(0)
    os.umask(umask)
    assert heat.stat().st_mode & 0o777 == 0o666 & ~umask  # not the 0600 of a temporary file


def test_a_failed_write_leaves_the_old_file_and_no_debris(tmp_path):
    from vaeanomaly.io import OutputError, atomic_path, write_image
    dest = tmp_path / "heat.nii.gz"
    dest.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert dest.read_bytes() == b"old" and os.listdir(tmp_path) == ["heat.nii.gz"]
    with pytest.raises(OutputError, match="cannot write"):  # a real writer failure: PNG cannot hold 3D
        write_image(make_phantom((8, 8, 8)), tmp_path / "x.png")
    assert os.listdir(tmp_path) == ["heat.nii.gz"]


def test_unwritable_output_is_refused_before_reading_the_input(tmp_path, tiny_checkpoint, capsys):
    (tmp_path / "file").write_text("x")
    rc, err = run_cli(["score", str(tmp_path / "never-read.nii.gz"), "-o", str(tmp_path / "file" / "h.nii.gz"),
                       "--model", str(tiny_checkpoint)], capsys)
    assert rc == 2 and "is a file" in err and "never-read" not in err


def test_no_traceback_unless_debug(tmp_path, capsys):
    rc, err = run_cli(["score", str(tmp_path / "missing.nii.gz"), "-o", str(tmp_path / "h.nii.gz")], capsys)
    assert rc == 2 and err.startswith("vaeanomaly: error:") and "does not exist" in err
    with pytest.raises(VolumeError, match="does not exist"):
        cli(["score", str(tmp_path / "missing.nii.gz"), "-o", str(tmp_path / "h.nii.gz"), "--debug"])
    r = subprocess.run([sys.executable, "-m", "vaeanomaly.cli", "--debug", "score", str(tmp_path / "missing.nii.gz"),
                        "-o", str(tmp_path / "h.nii.gz")], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "VAEAnomaly")})
    assert r.returncode == 1 and "Traceback" in r.stderr and "VolumeError" in r.stderr


# --------------------------------------------------------------------------- 2. every input read whole
def test_truncated_corrupt_and_inconsistent_files_are_refused(t2, tmp_path, tiny_checkpoint, capsys):
    data = t2.read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(data[: len(data) * 3 // 7])  # the case: SimpleITK reads it, the rest zeros
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(cut))).size > 0  # (what happened before)
    with pytest.raises(VolumeError, match="truncated"):
        read_image(cut)
    rc, err = run_cli(["score", str(cut), "-o", str(tmp_path / "h.nii.gz"), "--model", str(tiny_checkpoint)], capsys)
    assert rc == 2 and "truncated" in err and not (tmp_path / "h.nii.gz").exists()
    bad = bytearray(data)
    bad[len(bad) // 2: len(bad) // 2 + 64] = bytes(64)  # damaged in the middle: zlib or CRC error
    (tmp_path / "corrupt.nii.gz").write_bytes(bytes(bad))
    with pytest.raises(VolumeError, match="corrupt|truncated"):
        read_image(tmp_path / "corrupt.nii.gz")
    raw = gzip.decompress(data)
    (tmp_path / "cut.nii").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(VolumeError, match="header disagrees with its data"):
        read_image(tmp_path / "cut.nii")
    big = bytearray(raw)
    big[46:48] = struct.pack("<h", 80)  # dim[3]: 40 -> 80 slices declared, 40 present
    (tmp_path / "lies.nii").write_bytes(bytes(big))
    with pytest.raises(VolumeError, match="header declares 60x70x80"):
        read_image(tmp_path / "lies.nii")
    sitk.WriteImage(sitk.ReadImage(str(t2)), str(tmp_path / "v.nrrd"), True)
    nrrd = (tmp_path / "v.nrrd").read_bytes()
    (tmp_path / "cut.nrrd").write_bytes(nrrd[: len(nrrd) // 2])
    with pytest.raises(VolumeError, match="truncated"):
        read_image(tmp_path / "cut.nrrd")
    assert read_image(t2).GetSize() == (60, 70, 40)  # an intact file still reads


def test_dicom_series_gaps_uneven_spacing_and_mixed_series(tmp_path):
    img = make_phantom((40, 40, 12), spacing=(1.0, 1.0, 2.5))
    img = sitk.Cast(sitk.RescaleIntensity(img, 0, 1000), sitk.sitkInt16)
    write_dicom_series(tmp_path / "ok", img)
    good = read_image(tmp_path / "ok")
    assert good.GetSize() == (40, 40, 12) and abs(good.GetSpacing()[2] - 2.5) < 1e-3
    shutil.copytree(tmp_path / "ok", tmp_path / "gap")
    sorted((tmp_path / "gap").glob("*.dcm"))[5].unlink()  # SimpleITK alone averages the spacing silently
    with pytest.raises(VolumeError, match="missing slices"):
        read_image(tmp_path / "gap")
    write_dicom_series(tmp_path / "uneven", img, positions=[2.5 * i + (0.7 if i == 6 else 0) for i in range(12)])
    with pytest.raises(VolumeError, match="uneven slice spacing"):
        read_image(tmp_path / "uneven")
    shutil.copytree(tmp_path / "ok", tmp_path / "mixed")
    write_dicom_series(tmp_path / "mixed", img, uid="1.2.826.0.1.3680043.2.1125.2")
    with pytest.raises(VolumeError, match="2 DICOM series"):
        read_image(tmp_path / "mixed")


# --------------------------------------------------------------------------- 3. options checked first
def test_every_option_is_checked_before_the_input_is_read(tmp_path, tiny_checkpoint, capsys):
    never = str(tmp_path / "never-read.nii.gz")  # does not exist: any error about it means work began
    m = ["--model", str(tiny_checkpoint)]
    cases = [
        (["-o", "h.nii.gz", "--threshold", "high", "--label", "l.nii.gz"], "not a number, a percentile"),
        (["-o", "h.nii.gz", "--threshold", "p120", "--label", "l.nii.gz"], "outside 0-100"),
        (["-o", "h.nii.gz", "--threshold", "auto"], "--threshold needs --label"),
        (["-o", "h.nii.gz", "--label", "l.nii.gz"], "--label needs --threshold"),
        (["-o", str(tmp_path / "heat.nii.gz"), "--predictor", "rec-grad,kl-grad"], "names one file but 2 maps"),
        (["-o", "maps", "--predictor", "rec-grad,kl-grad", "--threshold", "p99", "--label", "l.nii.gz"],
         "names one file but 2 predictors"),
        (["-o", "h.nii.gz", "--proj-steps", "-1"], "--proj-steps must be"),
        (["-o", "h.nii.gz", "--proj-lr", "0"], "--proj-lr must be"),
        (["-o", "h.nii.gz", "--options", str(tmp_path / "none.json")], "does not exist"),
        (["-o", "h.nii.gz", "--predictor", "ensemble"], "carries no ensemble"),
        (["-o", "h.png"], "not a volume format"),
        (["-o", "h.nii.gz", "--predictor", "proj-rec-error", "--proj-steps", "7", "--threshold", "auto",
          "--label", "l.nii.gz"], "holds for other options"),
    ]
    for args, msg in cases:
        rc, err = run_cli(["score", never] + args + m, capsys)
        assert rc == 2 and msg in err and "never-read" not in err, (args, err)
    assert not (tmp_path / "heat.nii.gz").exists()  # the issue: a *folder* called heat.nii.gz


def test_several_predictors_one_label_each(t2, tiny_checkpoint, tmp_path, capsys):
    rc, err = run_cli(["score", str(t2), "-o", str(tmp_path / "maps"), "--predictor", "rec-grad,kl-grad",
                       "--threshold", "p99", "--label", str(tmp_path / "labels"), "--model", str(tiny_checkpoint),
                       "--progress", "none"], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == ["kl-grad_label.nii.gz", "rec-grad_label.nii.gz"]
    for name in ("rec-grad", "kl-grad"):
        heat = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "maps" / f"{name}.nii.gz")))
        lab = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "labels" / f"{name}_label.nii.gz")))
        brain = heat > 0
        assert 0.005 < lab[brain].mean() < 0.02  # its own 99th percentile, not the first predictor's
        assert (lab == (heat > np.percentile(heat[brain], 99))).all()


# --------------------------------------------------------------------------- 4. ensemble and calibration
@pytest.fixture(scope="module")
def ens_checkpoint(cohort, tiny_checkpoint, tmp_path_factory):
    """The tiny model with an ensemble, fitted and calibrated by training/fit_ensemble.py."""
    import fit_ensemble
    out = tmp_path_factory.mktemp("ens") / "ens.safetensors"
    shutil.copy(tiny_checkpoint, out)
    fit_ensemble.main(["--checkpoint", str(out), "--cache", str(cohort / "lesion.npz"), "--fraction", "0.5",
                       "--device", "cpu", "--healthy-cache", str(cohort / "healthy.npz")])
    return out


def test_calibration_uses_the_inference_defaults(cohort, tiny_checkpoint):
    from vaeanomaly.calibration import held_out_cases, option_subset
    from vaeanomaly.data import SliceCache, slice_spacings
    ck = load_checkpoint(tiny_checkpoint)
    assert ck.meta["thresholds_options"] == option_subset(PredictorOptions())  # before: 50 projection steps
    cache = SliceCache.load(cohort / "healthy.npz")
    held = ck.meta["calibration"]["cases"]
    assert held == [cache.names[i] for i in held_out_cases(len(cache.names), 0.1, 0)]  # calibrate.py's fallback rule
    (name, slices, brain, _), = cache.cases_in([cache.names.index(held[0])])
    # train.py reads the held-out case's slice spacing from the cohort folder (the maps are smoothed across slices)
    slice_mm = slice_spacings(cohort / "healthy", [name])[name]
    assert slice_mm != pytest.approx(240.0 / ck.model.image_size)  # else the spacing would not be tested
    maps = compute_maps(ck.model, slices, ["rec-grad", "kl-grad", "combi"], ck.beta, PredictorOptions(),
                        combi_norm=(ck.combi_normalisation["min"], ck.combi_normalisation["max"]), brain=brain,
                        slice_mm=slice_mm)
    for p in ("rec-grad", "kl-grad", "combi"):
        assert ck.thresholds[p] == pytest.approx(float(np.percentile(maps[p][brain], 99)), rel=1e-4)
        assert ck.meta["region_peaks"][p] == pytest.approx(float(np.percentile(maps[p][brain], 99.9)), rel=1e-4)


def test_ensemble_is_a_full_predictor(ens_checkpoint, t2, tmp_path, capsys):
    ck = load_checkpoint(ens_checkpoint)
    # the settings its features were computed with: smoothing, sign; none of the finishing steps (evidence, rim,
    # smoothing across slices), which act on the ensemble's own output
    d = PredictorOptions().unfinished().to_dict()
    assert ck.ensemble.options == {k: d[k] for k in ("smooth", "smooth_sigma", "smooth_kernel", "smooth_mm", "polarity",
                                                     "evidence", "rim_mm", "smooth_z_mm", "normalise")}
    assert "ensemble" in ck.thresholds and 0 < ck.thresholds["ensemble"] < 1
    m = ["--model", str(ens_checkpoint), "--progress", "none"]
    rc, err = run_cli(["score", str(t2), "-o", str(tmp_path / "all"), "--predictor", "all", "--proj-steps", "2"] + m, capsys)
    assert rc == 0, err
    assert "ensemble.nii.gz" in os.listdir(tmp_path / "all") and len(os.listdir(tmp_path / "all")) == 7
    rc, err = run_cli(["score", str(t2), "-o", str(tmp_path / "e.nii.gz"), "--predictor", "ensemble",
                       "--threshold", "auto", "--label", str(tmp_path / "e_label.nii.gz")] + m, capsys)
    assert rc == 0 and f"ensemble > {ck.thresholds['ensemble']:.4g}" in err, err
    rc, err = run_cli(["score", str(t2), "-o", str(tmp_path / "n.nii.gz"), "--predictor", "ensemble", "--no-smooth"] + m,
                      capsys)
    assert rc == 2 and "fitted on features computed with other settings: smooth=False" in err
    rc, err = run_cli(["score", str(t2), "-o", str(tmp_path / "ns"), "--predictor", "all", "--no-smooth",
                       "--proj-steps", "2"] + m, capsys)
    assert rc == 0 and "'all' without the ensemble" in err and "ensemble.nii.gz" not in os.listdir(tmp_path / "ns")
    with pytest.raises(ValueError, match="smooth=False"):
        compute_maps(ck.model, np.zeros((2, 64, 64), np.float32), ["ensemble"], ck.beta, PredictorOptions(smooth=False),
                     ensemble=ck.ensemble)


def test_combi_does_not_depend_on_the_crop(cohort, tiny_checkpoint):
    from vaeanomaly.calibration import inference_kwargs
    from vaeanomaly.data import SliceCache
    ck = load_checkpoint(tiny_checkpoint)
    _, slices, brain, _ = next(SliceCache.load(cohort / "lesion.npz").cases())
    kw = inference_kwargs(ck, ["combi"])
    assert kw["combi_norm"] == (ck.combi_normalisation["min"], ck.combi_normalisation["max"])
    kl = compute_maps(ck.model, slices, ["kl-grad"], ck.beta)["kl-grad"]
    top = int(np.argmax(kl.max((1, 2))))  # a crop without the slice that holds the volume's maximum
    a, b = (top + 5, top + 45) if top + 45 <= len(slices) else (top - 45, top - 5)
    full = compute_maps(ck.model, slices, ["combi"], ck.beta, **kw)["combi"]
    crop = compute_maps(ck.model, slices[a:b], ["combi"], ck.beta, **kw)["combi"]
    np.testing.assert_allclose(crop, full[a:b], rtol=1e-5, atol=1e-7)
    old_full = compute_maps(ck.model, slices, ["combi"], ck.beta)["combi"]  # per-volume min-max (the reference)
    old_crop = compute_maps(ck.model, slices[a:b], ["combi"], ck.beta)["combi"]
    assert not np.allclose(old_crop, old_full[a:b], rtol=1e-3)  # what the issue found: up to 93% apart


def legacy_copy(tmp_path):
    """bvae-l64-b10 as it was bundled before the calibration recorded its options, Combi's constants and an
    ensemble threshold (its thresholds then: the papers' settings, 50 projection steps)."""
    from vaeanomaly.checkpoint import MODELS_DIR
    path = tmp_path / "legacy.safetensors"
    shutil.copy(MODELS_DIR / "bvae-l64-b10.safetensors", path)
    old = load_checkpoint(path)
    update_metadata(path, thresholds={k: v for k, v in old.thresholds.items() if k != "ensemble"},
                    thresholds_options=None, combi_normalisation=None, calibration=None)
    return path


def test_bundled_checkpoints_without_new_keys_keep_working_with_clear_messages(t2, tmp_path, capsys):
    from vaeanomaly.calibration import calibrated_threshold, combi_constants
    path = legacy_copy(tmp_path)
    ck = load_checkpoint(path)
    # its Rec-grad threshold holds without smoothing across slices (today's default): a clear message, and it
    # holds when asked for
    with pytest.raises(ValueError, match="smooth_z_mm=10.0"):
        calibrated_threshold(ck, "rec-grad")
    assert calibrated_threshold(ck, "rec-grad", PredictorOptions(smooth_z_mm=0)) == ck.thresholds["rec-grad"]
    for pred, msg in (("ensemble", "training/calibrate.py"), ("combi", "fixed normalisation constants"),
                      ("proj-rec-error", "50 steps")):
        with pytest.raises(ValueError, match=msg):
            calibrated_threshold(ck, pred)
    assert calibrated_threshold(ck, "proj-rec-error", PredictorOptions(proj_steps=50)) == ck.thresholds["proj-rec-error"]
    with pytest.warns(UserWarning, match="no Combi normalisation constants"):
        assert combi_constants(ck) is None
    rc, err = run_cli(["score", str(t2), "-o", str(tmp_path / "c.nii.gz"), "--predictor", "combi",
                       "--model", str(path), "--progress", "none"], capsys)
    assert rc == 0 and "warning: the checkpoint has no Combi normalisation constants" in err


def test_recalibrate_an_existing_checkpoint_in_place(cohort, t2, tmp_path, capsys):
    import calibrate
    path = legacy_copy(tmp_path)
    before = load_checkpoint(path)
    m = ["--model", str(path), "--progress", "none", "--predictor", "ensemble", "--threshold", "auto"]
    rc, err = run_cli(["score", str(t2), "-o", str(tmp_path / "e.nii.gz"), "--label", str(tmp_path / "l.nii.gz")] + m,
                      capsys)
    assert rc == 2 and "training/calibrate.py" in err
    from vaeanomaly.data import SliceCache
    case = SliceCache.load(cohort / "healthy.npz").names[-1]
    calibrate.main([str(path), "--cache", str(cohort / "healthy.npz"), "--cases", case, "--proj-steps", "5"])
    after = load_checkpoint(path)
    assert after.meta["thresholds_options"]["proj_steps"] == 5  # the options its thresholds hold for
    assert set(after.thresholds) == set(before.thresholds) | {"ensemble"}
    assert after.meta["calibration"]["cases"] == [case]
    assert after.combi_normalisation["max"] > after.combi_normalisation["min"] >= 0
    for k, v in before.model.state_dict().items():  # weights untouched
        assert (after.model.state_dict()[k] == v).all()
    rc, err = run_cli(["score", str(t2), "-o", str(tmp_path / "e.nii.gz"), "--label", str(tmp_path / "l.nii.gz")] + m,
                      capsys)
    assert rc == 0, err


# --------------------------------------------------------------------------- 6. progress
class Recorder:
    def __init__(self):
        self.values, self.stages = [], []

    def __call__(self, f):
        self.values.append(f)

    def stage(self, text):
        self.stages.append(text)


def test_progress_every_16_slices_and_every_projection_step(random_model):
    x = np.random.default_rng(0).normal(size=(40, 64, 64)).astype(np.float32)
    rec = Recorder()
    compute_maps(random_model, x, ["rec-grad"], options=PredictorOptions(batch_size=64), progress=rec)
    assert len(rec.values) == 3 and rec.values[-1] == pytest.approx(1.0)  # 16 + 16 + 8 slices
    rec = Recorder()
    compute_maps(random_model, x, ["rec-grad", "proj-rec-error"], options=PredictorOptions(batch_size=32, proj_steps=4),
                 progress=rec)
    assert len(rec.values) == 3 + 2 * 4  # two projection batches of four steps each
    assert np.all(np.diff(rec.values) > 0) and rec.values[-1] == pytest.approx(1.0)
    assert any("proj-rec-error, slices 33-40 of 40" in s for s in rec.stages)


def test_cli_progress_lines_carry_an_eta(t2, tiny_checkpoint, tmp_path, capsys):
    rc, err = run_cli(["score", str(t2), "-o", str(tmp_path / "p.nii.gz"), "--predictor", "proj-rec-error",
                       "--proj-steps", "10", "--model", str(tiny_checkpoint), "--progress", "lines"], capsys)
    lines = [ln for ln in err.splitlines() if ln.startswith("PROGRESS ")]
    assert rc == 0 and len(lines) >= 2 and lines[-1].startswith("PROGRESS 1.0000 ETA 0s")
    assert any(ln.split()[2] == "ETA" and ln.split()[3].endswith("s") for ln in lines)


def test_evaluate_reports_progress_per_case_and_predictor(cohort, tiny_checkpoint):
    from vaeanomaly.data import SliceCache
    from vaeanomaly.evaluation import collect_maps
    cache = SliceCache.load(cohort / "lesion.npz")
    rec = Recorder()
    collect_maps(load_checkpoint(tiny_checkpoint), cache.cases(), ["rec-error", "proj-rec-error"],
                 PredictorOptions(proj_steps=2), progress=rec)
    for name in cache.names:
        assert any(s.startswith(f"case {name}") and "rec-error" in s for s in rec.stages)
        assert any(s.startswith(f"case {name}") and "proj-rec-error" in s for s in rec.stages)
    assert len(rec.values) > 2 * len(cache.names) and rec.values[-1] == pytest.approx(1.0)


def test_bench_warns_on_a_busy_machine():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_predictors
    assert "load average 2.40" in bench_predictors.busy_warning(2.4)
    assert bench_predictors.busy_warning(0.3) is None


def test_help_shows_every_default(capsys):
    from vaeanomaly.checkpoint import DEFAULT_MODEL
    from vaeanomaly.registry import DEFAULT_PREDICTOR
    with pytest.raises(SystemExit):
        cli(["score", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    d = PredictorOptions()
    for text in (f"Default: {DEFAULT_PREDICTOR} (VAE), dae-residual (denoising autoencoder) by the model's kind",
                 f"(default: {DEFAULT_MODEL})", f"(default: {d.proj_steps})",
                 f"(default: {d.proj_lambda})", f"(default: {d.proj_lr})", f"(default: {d.batch_size})",
                 "(default: auto)", "(default: bar)", "sigma 3, kernel 7", "reconstruction"):
        assert text in out, text
    assert cli(["info", "--list"]) == 0
    assert f"{DEFAULT_MODEL}  (default)" in capsys.readouterr().out


# --------------------------------------------------------------------------- 5. packaging
def test_torch_is_a_range_in_the_library_and_pinned_only_for_the_project_venv():
    import tomllib
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    torch_req = next(d for d in meta["dependencies"] if d.startswith("torch"))
    assert "==" not in torch_req and ">=" in torch_req
    assert meta["license"] == "BSD-3-Clause"  # an SPDX expression, not a table
    assert "torch==2.13.0" in (ROOT / "constraints-cpu.txt").read_text(encoding="utf-8").split()
    run_sh = (ROOT / "run.sh").read_text(encoding="utf-8")
    assert run_sh.count("-c constraints-cpu.txt") == 2  # torch first, then the project, both constrained
    assert "torch" not in (ROOT / "VAEAnomaly" / "Resources" / "requirements.txt").read_text(encoding="utf-8")
    assert "RUN_SLOW=1 bash run.sh test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


@pytest.mark.slow
def test_constraints_resolve_to_the_cpu_build(tmp_path):
    """What run.sh installs: torch exactly 2.13.0 (on this machine the +cpu file on disk), while the
    library's range alone would take the newest release (a CUDA build with several GB of dependencies)."""
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps",
                        "--quiet", "--report", str(tmp_path / "r.json"), "-c", str(ROOT / "constraints-cpu.txt"),
                        "torch>=2.1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    import json
    (item,) = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["install"]
    assert item["metadata"]["version"].split("+")[0] == "2.13.0"


@pytest.mark.slow
def test_wheel_carries_models_and_sample_data_and_scores_in_a_fresh_environment(tmp_path):
    import sysconfig
    import zipfile
    src = tmp_path / "src"
    src.mkdir()
    for f in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / f, src / f)
    shutil.copytree(ROOT / "VAEAnomaly", src / "VAEAnomaly", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    bundled = sorted((ROOT / "VAEAnomaly" / "Resources" / "Models").glob("*"))
    assert bundled and all(f"vaeanomaly/bundled/Models/{p.name}" in names for p in bundled if p.suffix in (".md", ".safetensors"))
    assert "vaeanomaly/bundled/SampleData/VAEAnomalySample_T2.nrrd" in names
    for init in list((ROOT / "VAEAnomaly" / "vaeanomaly").rglob("__init__.py")) + \
            list((ROOT / "VAEAnomaly" / "VAEAnomalyLib").rglob("__init__.py")):  # every (sub)package is shipped
        assert str(init.relative_to(ROOT / "VAEAnomaly")) in names, init
    env_dir = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    py = env_dir / "bin" / "python"
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # the dependencies (torch, SimpleITK, ...) from this environment; the project itself only from the wheel
    (Path(purelib) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([str(env_dir / "bin" / "vaeanomaly"), "info", "--list"], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    from vaeanomaly.checkpoint import DEFAULT_MODEL, bundled_models
    assert r.stdout.split("\n")[:-1] == [f"{m}  (default)" if m == DEFAULT_MODEL else m for m in bundled_models()]
    script = ("import vaeanomaly, vaeanomaly.checkpoint as c; print(vaeanomaly.__file__); print(c.sample_data())")
    r = subprocess.run([str(py), "-I", "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    pkg, sample = r.stdout.split()
    assert pkg.startswith(str(env_dir)) and sample.startswith(str(env_dir)), r.stdout
    r = subprocess.run([str(env_dir / "bin" / "vaeanomaly"), "score", sample, "-o", str(tmp_path / "heat.nii.gz"),
                        "--progress", "none"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    heat, t2 = sitk.ReadImage(str(tmp_path / "heat.nii.gz")), sitk.ReadImage(sample)
    assert heat.GetSize() == t2.GetSize() and sitk.GetArrayFromImage(heat).max() > 0
