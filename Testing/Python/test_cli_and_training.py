"""The command-line tool and the training scripts, end to end on generated data."""
from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import ROOT
from vaeanomaly.checkpoint import load_checkpoint
from vaeanomaly.cli import main as cli


def test_score_brats_sized_volume_keeps_geometry(cohort, tiny_checkpoint, tmp_path, capsys):
    t2 = sorted((cohort / "lesion").glob("*/*_t2.nii.gz"))[0]
    img = sitk.ReadImage(str(t2))
    assert img.GetSize() == (240, 240, 155)
    out = tmp_path / "heat.nii.gz"
    label = tmp_path / "label.nii.gz"
    assert cli(["score", str(t2), "-o", str(out), "--model", str(tiny_checkpoint), "--predictor", "rec-grad",
                "--threshold", "p98", "--label", str(label), "--progress", "none"]) == 0
    h = sitk.ReadImage(str(out))
    assert h.GetSize() == img.GetSize() and h.GetSpacing() == img.GetSpacing()
    assert np.allclose(h.GetOrigin(), img.GetOrigin()) and np.allclose(h.GetDirection(), img.GetDirection())
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(label)))
    brain = sitk.GetArrayFromImage(h) > 0
    assert 0.01 < lab[brain].mean() < 0.03


def test_score_all_predictors_to_folder_and_mask(cohort, tiny_checkpoint, tmp_path):
    t2 = sorted((cohort / "lesion").glob("*/*_t2.nii.gz"))[0]
    mask = t2.parent / t2.name.replace("_t2", "_brainmask")
    out = tmp_path / "maps"
    assert cli(["score", str(t2), "-o", str(out), "--model", str(tiny_checkpoint), "--predictor", "all",
                "--mask", str(mask), "--proj-steps", "3", "--progress", "lines"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"{p}.nii.gz" for p in
                           ["rec-error", "elbo-grad", "kl-grad", "rec-grad", "combi", "proj-rec-error"])
    m = sitk.GetArrayFromImage(sitk.ReadImage(str(mask))) > 0
    kl = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "kl-grad.nii.gz")))
    assert (kl[~m] == 0).all() and kl[m].max() > 0


def test_cli_errors_are_clear(tmp_path, tiny_checkpoint, capsys):
    two_d = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(32, 32).astype(np.float32)), str(two_d))
    assert cli(["score", str(two_d), "-o", str(tmp_path / "o.nii.gz"), "--model", str(tiny_checkpoint)]) == 2
    assert "2-dimensional" in capsys.readouterr().err
    assert cli(["score", str(two_d), "-o", str(tmp_path / "o.nii.gz"), "--model", str(tmp_path / "no.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli(["score", str(two_d), "-o", "x.nii.gz", "--predictor", "foo"]) == 2
    assert "unknown predictor" in capsys.readouterr().err


@pytest.mark.slow  # about 20 s: the demo's case is generated at full resolution
def test_demo_scores_its_generated_case(tiny_checkpoint, tmp_path, capsys):
    """`vaeanomaly demo` (what `bash run.sh demo` runs): the generated case, one heatmap per paper predictor
    (no projection unless asked) through the one scoring path, the figure, and the AUROC of each on the case."""
    assert cli(["demo", "--model", str(tiny_checkpoint), "--output", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    names = ["rec-error", "elbo-grad", "kl-grad", "rec-grad", "combi"]
    for n in names:
        assert (tmp_path / "d" / "heatmaps" / f"{n}.nii.gz").is_file() and f"  {n}" in out
    assert not (tmp_path / "d" / "heatmaps" / "proj-rec-error.nii.gz").exists()
    assert (tmp_path / "d" / "overlay.png").stat().st_size > 10_000 and (tmp_path / "d" / "case_seg.nii.gz").is_file()
    heat = sitk.ReadImage(str(tmp_path / "d" / "heatmaps" / "rec-grad.nii.gz"))
    t2 = sitk.ReadImage(str(tmp_path / "d" / "case_t2.nii.gz"))
    assert heat.GetSize() == t2.GetSize() and sitk.GetArrayViewFromImage(heat).max() > 0


def test_evaluate_command_prints_tables(cohort, tiny_checkpoint, capsys):
    assert cli(["evaluate", str(cohort / "lesion"), "--model", str(tiny_checkpoint), "--predictor",
                "rec-error,rec-grad", "--progress", "none"]) == 0
    out = capsys.readouterr().out
    assert "AUROC, inside the brain" in out and "AUROC, all pixels" in out and "| model | rec-error | rec-grad |" in out


def test_bundled_checkpoints_load_and_carry_cards():
    from vaeanomaly.checkpoint import DEFAULT_MODEL, bundled_models
    names = bundled_models()  # globbed: every bundled model, whatever its name
    assert DEFAULT_MODEL in names and {"vae-l64-b1", "bvae-l64-b10"} <= set(names)
    for name in names:
        ck = load_checkpoint(name)
        assert ck.thresholds and ck.meta["training"]["command"].startswith(
            ("python training/train.py", "python training/train_dae.py"))
        assert (ROOT / "VAEAnomaly" / "Resources" / "Models" / f"{name}.md").exists()
    for name in ("vae-l64-b1", "bvae-l64-b10"):
        ck = load_checkpoint(name)
        assert ck.model.latent_dim == 64 and ck.ensemble is not None
        assert max(ck.meta["evaluation"]["auroc_brain"].values()) >= 0.90
    assert load_checkpoint("bvae-l64-b10").beta == 10.0


@pytest.mark.slow
def test_train_resume_and_scripts(cohort, tmp_path):
    import evaluate
    import fit_ensemble
    import train
    out = tmp_path / "m.safetensors"
    args = ["--cache", str(cohort / "healthy.npz"), "--out", str(out), "--latent", "8", "--device", "cpu",
            "--batch-size", "32"]
    train.main(args + ["--epochs", "2"])
    log = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert [r["epoch"] for r in log] == ["1", "2"]
    train.main(args + ["--epochs", "3", "--resume"])
    log = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert [r["epoch"] for r in log] == ["1", "2", "3"]
    ck = load_checkpoint(out)
    assert ck.meta["training"]["code_version"] != "" and ck.meta["training"]["epochs"] == 3 and set(ck.thresholds) >= {"rec-grad", "proj-rec-error"}
    fit_ensemble.main(["--checkpoint", str(out), "--cache", str(cohort / "lesion.npz"), "--fraction", "0.5",
                       "--device", "cpu", "--out", str(tmp_path / "ens.md")])
    ck = load_checkpoint(out)  # no healthy cache given: no ensemble threshold (and none stale)
    assert ck.ensemble is not None and "ensemble" not in ck.thresholds and ck.ensemble.options["smooth"] is True
    evaluate.main(["--cache", str(cohort / "lesion.npz"), "--checkpoints", str(out), "--out", str(tmp_path / "t"),
                   "--predictors", "rec-error,rec-grad,ensemble", "--proj-steps", "2", "--device", "cpu",
                   "--update-card"])
    md = (tmp_path / "t.md").read_text(encoding="utf-8")
    assert md.count("| model | rec-error | rec-grad | ensemble |") == 6  # 3 metrics x 2 scopes, predictors as columns
    assert md.count("\n| m | ") == 6
    assert (tmp_path / "t_roc.png").stat().st_size > 0 and (tmp_path / "t_gallery.png").stat().st_size > 0
    assert "auroc_brain" in load_checkpoint(out).meta["evaluation"]


@pytest.mark.slow  # a fresh process training and calibrating: CI runs it; the fixtures run train.main in-process
def test_training_script_runs_as_a_command(cohort, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "training" / "train.py"), "--cache", str(cohort / "healthy.npz"),
                        "--out", str(tmp_path / "c.safetensors"), "--epochs", "1", "--latent", "8", "--device", "cpu"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "python training/train.py" in load_checkpoint(tmp_path / "c.safetensors").meta["training"]["command"]


@pytest.mark.slow  # two processes importing torch and training: CI runs it (RUN_SLOW=1), `bash run.sh test` skips it
def test_distributed_training_on_cpu(cohort, tmp_path):
    """torchrun with two processes (gloo on the CPU): the DistributedDataParallel path."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    out = tmp_path / "ddp.safetensors"
    r = subprocess.run(torchrun + [str(ROOT / "training" / "train.py"), "--cache", str(cohort / "healthy.npz"),
                                   "--out", str(out), "--epochs", "2", "--latent", "8", "--device", "cpu"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ck = load_checkpoint(out)
    assert ck.meta["training"]["hardware"].endswith("x2") and ck.meta["training"]["epochs"] == 2


@pytest.mark.slow  # generates four varied-generator subjects: CI runs it (RUN_SLOW=1)
def test_benchmark_counts_regions_by_the_region_peak(tmp_path):
    """`evaluate.py --benchmark` on a tiny generated cohort (make_data.py varied): the lesion-wise counts keep a
    region only when it reaches the region peak, so there are never more false regions than with --all-regions,
    and the intensity row is there."""
    import csv

    import evaluate
    import make_data
    d = tmp_path / "v"
    make_data.main(["varied", "--out", str(d), "--train", "0", "--calibration", "2", "--benchmark", "1",
                    "--train-domains", "tse", "--benchmark-domains", "tse", "--families", "glioma",
                    "--splits", "calibration,benchmark", "--workers", "2"])
    rows = {}
    for v, extra in (("peak", []), ("all", ["--all-regions"]), ("low", ["--peak-quantile", "99.5"]),
                     ("high", ["--peak-quantile", "99.99"])):
        evaluate.main(["--benchmark", str(d), "--predictors", "default", "--checkpoints", "bvae-l64-b10-v2",
                       "--out", str(tmp_path / v), "--no-verdicts", "--device", "cpu", *extra])
        rows[v] = {r["scorer"]: r for r in csv.DictReader(open(tmp_path / f"{v}.csv"))}
    assert set(rows["peak"]) == {"bvae-l64-b10-v2 rec-grad", "intensity (64x64)"}
    for s in rows["peak"]:
        fr = {v: float(rows[v][s]["false_regions_per_healthy_scan"]) for v in rows}
        assert fr["peak"] <= fr["all"] and fr["high"] <= fr["low"] <= fr["all"]  # a higher peak keeps fewer
        assert float(rows["peak"][s]["auroc"]) == float(rows["all"][s]["auroc"])  # the maps are the same
