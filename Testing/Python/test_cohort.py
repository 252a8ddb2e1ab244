"""`vaeanomaly score` with many inputs: files, a folder, a glob, a CSV; one output per input, summary.csv;
the same heatmaps as scoring each input alone; a bad input reported, not fatal; torchrun shares the list."""
import csv
from pathlib import Path
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import ROOT, make_phantom, oblique_direction
from vaeanomaly.checkpoint import DEFAULT_VAE, load_checkpoint
from vaeanomaly.registry import DEFAULT_PREDICTORS
from vaeanomaly.cli import main
from vaeanomaly.cohort import expand_inputs, is_cohort
from vaeanomaly.scoring import ScoreRequest
from vaeanomaly.volume import score_volume


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    d = tmp_path_factory.mktemp("cohort_in")
    (d / "a").mkdir()
    (d / "b").mkdir()
    imgs = {
        "a/T2.nii.gz": make_phantom((64, 72, 30), (3.0, 3.0, 5.0), None, (0, 0, 0), blob_index=(20, 30, 15)),
        "b/T2.nii.gz": make_phantom((60, 70, 26), (3.2, 3.0, 5.5), oblique_direction(15), (5, -3, 2),
                                    blob_index=(30, 40, 12)),
        "c.nrrd": make_phantom((70, 64, 24), (3.0, 3.3, 6.0), np.diag([-1.0, -1.0, 1.0]), (1, 2, 3)),
    }
    for name, img in imgs.items():
        sitk.WriteImage(img, str(d / name))
    mask = sitk.Cast(sitk.BinaryThreshold(imgs["c.nrrd"], 0.5, 1e9), sitk.sitkUInt8)
    sitk.WriteImage(mask, str(d / "c_mask.nrrd"))
    (d / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    return d, imgs


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_inputs_expand_from_files_folders_globs_and_csv(volumes, tmp_path):
    d, _ = volumes
    assert not is_cohort([str(d / "c.nrrd")])
    assert is_cohort([str(d / "c.nrrd"), str(d / "a/T2.nii.gz")]) and is_cohort([str(d / "*/T2.nii.gz")])
    items = expand_inputs([str(d / "*/T2.nii.gz")])
    assert [it.name for it in items] == ["a_T2", "b_T2"]  # same stem: the folder makes them unique
    (tmp_path / "list.csv").write_text(f"volume,mask\n{d}/c.nrrd,{d}/c_mask.nrrd\n{d}/a/T2.nii.gz,\n")
    items = expand_inputs([str(tmp_path / "list.csv")])
    assert [(it.name, it.mask) for it in items] == [("c", f"{d}/c_mask.nrrd"), ("T2", None)]
    assert [it.name for it in expand_inputs([str(d)])] == ["broken", "c", "c_mask"]
    with pytest.raises(ValueError, match="matches no file"):
        expand_inputs([str(d / "*.mha")])
    (tmp_path / "bad.csv").write_text("file\nx.nii.gz\n")
    with pytest.raises(ValueError, match="'volume' column"):
        expand_inputs([str(tmp_path / "bad.csv")])


def test_cohort_outputs_equal_single_scoring_and_summary(volumes, tmp_path, capsys):
    d, imgs = volumes
    (tmp_path / "list.csv").write_text("volume,mask\n"
                                       f"{d}/a/T2.nii.gz,\n{d}/b/T2.nii.gz,\n{d}/c.nrrd,{d}/c_mask.nrrd\n"
                                       f"{d}/broken.nii.gz,\n")
    out = tmp_path / "out"
    rc = main(["score", str(tmp_path / "list.csv"), "-o", str(out), "--progress", "none", "--workers", "2"])
    assert rc == 1  # the broken input fails, the others are scored
    summary = rows(out / "summary.csv")
    assert [r["input"].split("/")[-1] for r in summary] == ["T2.nii.gz", "T2.nii.gz", "c.nrrd", "broken.nii.gz"]
    assert [r["status"] for r in summary] == ["ok", "ok", "ok", "error"]
    assert "gzip" in summary[3]["message"] or "corrupt" in summary[3]["message"]
    ck = load_checkpoint(None)  # the default model, with its own default predictor
    pred = DEFAULT_PREDICTORS[ck.kind]
    for r, (name, key, mask) in zip(summary, [("a_T2", "a/T2.nii.gz", None), ("b_T2", "b/T2.nii.gz", None),
                                             ("c", "c.nrrd", d / "c_mask.nrrd")]):
        assert r["outputs"] == str(out / f"{name}.nii.gz")
        assert float(r["seconds"]) > 0 and r["predictor"] == pred and float(r["threshold"]) > 0
        assert 0 <= float(r["flagged_percent"]) <= 100 and r["in_distribution"] in ("True", "False")
        got = sitk.ReadImage(r["outputs"])
        img = sitk.ReadImage(str(d / key))  # as written (NIfTI stores the geometry in float32)
        ref = score_volume(ck, img, sitk.ReadImage(str(mask)) if mask else None, [pred])[pred]
        assert got.GetSize() == img.GetSize() and np.allclose(got.GetDirection(), img.GetDirection(), atol=1e-5)
        np.testing.assert_allclose(sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(ref), rtol=1e-5, atol=1e-6)
    assert "3 of 4 volumes" in capsys.readouterr().err


def test_folder_glob_several_predictors_labels(volumes, tmp_path, capsys):
    d, _ = volumes
    out, lab = tmp_path / "maps", tmp_path / "labels"
    rc = main(["score", str(d / "*/T2.nii.gz"), str(d / "c.nrrd"), "-o", str(out), "--model", DEFAULT_VAE, "--predictor", "rec-error,rec-grad",
               "--threshold", "p99", "--label", str(lab), "--progress", "none", "--workers", "0"])
    assert rc == 0
    for name in ("a_T2", "b_T2", "c"):
        for p in ("rec-error", "rec-grad"):
            assert (out / name / f"{p}.nii.gz").exists() and (lab / name / f"{p}_label.nii.gz").exists()
    summary = rows(out / "summary.csv")
    assert len(summary) == 3
    # the number of findings and the largest one's volume: those of the first heatmap's label (regions of it)
    import SimpleITK as sitk
    from scipy import ndimage
    for r in summary:
        name = Path(r["input"]).name.split(".")[0] if "c.nrrd" in r["input"] else Path(r["input"]).parent.name + "_T2"
        lab_img = sitk.ReadImage(str(lab / name / "rec-error_label.nii.gz"))
        n = ndimage.label(sitk.GetArrayFromImage(lab_img) > 0, structure=np.ones((3, 3, 3)))[1]
        assert int(r["findings"]) == n and (float(r["largest_finding_ml"]) > 0) == (n > 0)
    capsys.readouterr()
    # one file for many inputs: refused before any work
    assert main(["score", str(d / "c.nrrd"), str(d / "a/T2.nii.gz"), "-o", str(tmp_path / "x.nii.gz")]) != 0
    assert "the output is a folder" in capsys.readouterr().err and not (tmp_path / "x.nii.gz").exists()


def test_single_input_keeps_its_behaviour(volumes, tmp_path):
    d, _ = volumes
    out = tmp_path / "one.nii.gz"
    assert main(["score", str(d / "c.nrrd"), "-o", str(out), "--mask", str(d / "c_mask.nrrd"),
                 "--progress", "none"]) == 0
    assert out.exists() and not (tmp_path / "summary.csv").exists()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_ranks_share_the_list(volumes, tmp_path):
    """Two CPU ranks (gloo): each scores its share, rank 0 writes the one summary."""
    d, _ = volumes
    out = tmp_path / "dist"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "VAEAnomaly"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "vaeanomaly.cli", "score",
           str(d / "*/T2.nii.gz"), str(d / "c.nrrd"), "-o", str(out), "--progress", "none", "--workers", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = rows(out / "summary.csv")
    assert [r_["status"] for r_ in summary] == ["ok"] * 3
    assert {(out / f"{n}.nii.gz").exists() for n in ("a_T2", "b_T2", "c")} == {True}
    log = r.stderr
    assert log.count("[0] ok") == 2 and log.count("[1] ok") == 1  # items 0, 2 on rank 0; item 1 on rank 1
    assert "2 rank(s)" in log


def test_each_input_is_scored_as_the_cohorts_request_checked_once(volumes, tmp_path, monkeypatch):
    """The cohort's scoring request is checked once (ScoreRequest.checked), and each input is scored through
    scoring.score_prepared, the computation of `vaeanomaly score` for one volume, with the verdict's maps in the
    same pass (the summary's verdict columns)."""
    from vaeanomaly import scoring
    d, _ = volumes
    checked, scored = [], []
    real_checked, real_score = ScoreRequest.checked, scoring.score_prepared

    def check(self, checkpoint):
        checked.append(self)
        return real_checked(self, checkpoint)

    def score(checkpoint, prepared, names, options=None, device="cpu", verdict=True, **kwargs):
        scored.append((list(names), options, device, verdict))
        return real_score(checkpoint, prepared, names, options, device, verdict, **kwargs)

    monkeypatch.setattr(ScoreRequest, "checked", check)
    monkeypatch.setattr(scoring, "score_prepared", score)
    inputs = [str(d / "a/T2.nii.gz"), str(d / "c.nrrd")]
    rc = main(["score", *inputs, "-o", str(tmp_path / "out"), "--model", DEFAULT_VAE, "--predictor", "rec-grad,kl-grad", "--smooth-mm", "6",
               "--progress", "none", "--workers", "0"])
    assert rc == 0
    assert len(checked) == 1 and checked[0].input == " ".join(inputs) and checked[0].predictors == "rec-grad,kl-grad"
    assert [s[0] for s in scored] == [["rec-grad", "kl-grad"]] * 2 and all(s[1:] == scored[0][1:] for s in scored)
    assert scored[0][1].smooth_mm == 6 and scored[0][2:] == ("cpu", True)
    summary = rows(tmp_path / "out" / "summary.csv")
    assert [r["status"] for r in summary] == ["ok", "ok"] and all(r["predictor"] == "rec-grad" for r in summary)
