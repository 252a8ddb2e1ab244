"""Bright and dark anomalies calibrated apart (issue 24, item 2): the two-tailed calibration of a signed map, its
label (1 = brighter, 2 = darker than expected), the findings' direction, and old checkpoints without tails."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from vaeanomaly.calibration import (PEAK_QUANTILE, QUANTILE, auto_threshold, calibrate, calibrated_tails,
                                    calibrated_threshold, region_peak, tails_or_fallback, two_tailed)
from vaeanomaly.checkpoint import load_checkpoint, save_checkpoint, update_metadata
from vaeanomaly.dae import DAE
from vaeanomaly.predictors import PredictorOptions, compute_maps
from vaeanomaly.threshold import Tails

RATE = 1 - QUANTILE / 100  # the healthy brain a calibrated threshold flags (1%)


def _flat(tails: dict) -> dict:
    return {(side, k): v for side, d in tails.items() for k, v in d.items()}


def _skewed(n, seed):
    """Healthy signed values with a heavier bright tail than dark one (a map whose tails differ)."""
    rng = np.random.default_rng(seed)
    return np.where(rng.random(n) < 0.5, rng.gamma(2.0, 0.6, n), -rng.gamma(4.0, 0.2, n))


def test_a_bright_lesion_never_moves_the_dark_threshold():
    s = _skewed(200_000, 0)
    before = two_tailed(s)
    lesion = s.copy()
    bright = np.flatnonzero(s > 0)[:2000]  # a bright lesion: voxels made brighter (none of them were dark)
    lesion[bright] += 6.0
    after = two_tailed(lesion)
    assert after["dark"] == before["dark"]  # threshold and region peak, exactly
    assert after["bright"]["threshold"] > before["bright"]["threshold"] + 0.1  # the bright tail takes the lesion
    # one threshold on |s| (polarity 'both') rises with the bright lesion, and so misses more of the dark side
    assert np.percentile(np.abs(lesion), QUANTILE) > np.percentile(np.abs(s), QUANTILE) + 0.05
    # the dark values themselves: a dark-only lesion leaves the bright tail where it was
    dark = np.flatnonzero(s < 0)[:2000]
    lesion = s.copy()
    lesion[dark] -= 6.0
    assert two_tailed(lesion)["bright"] == before["bright"]


def test_each_tail_flags_its_calibrated_rate_on_healthy_brains():
    cal, test = _skewed(400_000, 1), _skewed(400_000, 2)  # calibration brains, then other healthy brains
    t = two_tailed(cal)
    b, d = t["bright"]["threshold"], t["dark"]["threshold"]
    assert b > 0 and d > 0 and b > 1.5 * d  # each tail its own level (the bright one is heavier here)
    tol = 0.0006  # about 4 binomial standard deviations at 400k voxels
    assert abs(np.mean(test > b) - RATE / 2) < tol
    assert abs(np.mean(test < -d) - RATE / 2) < tol
    assert abs(np.mean((test > b) | (test < -d)) - RATE) < 2 * tol  # the union: the rate of one threshold
    peak_rate = 1 - PEAK_QUANTILE / 100
    assert abs(np.mean(test > t["bright"]["region_peak"]) - peak_rate / 2) < 0.0002
    assert abs(np.mean(test < -t["dark"]["region_peak"]) - peak_rate / 2) < 0.0002
    # one threshold on |s| would spend nearly the whole rate on the heavy bright tail
    one = np.percentile(np.abs(cal), QUANTILE)
    assert np.mean(test < -one) < RATE / 10
    with pytest.raises(ValueError):
        two_tailed(np.array([]))


# --------------------------------------------------------------------------- a real tiny denoising autoencoder
def _dae(size=32, seed=0):
    torch.manual_seed(seed)
    m = DAE(size, base=4, levels=3).eval()
    for p in m.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    return m


def _case(seed, size=32, n=6):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.3, (n, size, size)).astype(np.float32)
    brain = np.zeros_like(x, bool)
    brain[:, 4:-4, 4:-4] = True
    return np.where(brain, x, 0), brain


@pytest.fixture(scope="module")
def calibrated_dae(tmp_path_factory):
    """A tiny DAE checkpoint calibrated by calibrate() on two synthetic 'healthy' volumes."""
    m = _dae()
    cases = [("a", *_case(1), 2.0), ("b", *_case(2), 3.0)]
    upd = calibrate(m, 1.0, cases)
    path = save_checkpoint(tmp_path_factory.mktemp("ck") / "d.safetensors", m,
                           {"name": "d", "beta": 1.0, "preprocessing": {"image_size": 32}})
    return update_metadata(path, **upd), m, cases, upd


def test_calibrate_stores_the_tails_of_the_signed_map_and_every_polarity(calibrated_dae):
    ck, m, cases, upd = calibrated_dae
    opts = PredictorOptions()

    def values(polarity):  # the maps scoring gives with this polarity, pooled over the healthy brains
        return np.concatenate([compute_maps(m, x, ["dae-residual"], options=replace(opts, polarity=polarity),
                                            brain=b, slice_mm=mm)["dae-residual"][b] for _, x, b, mm in cases])
    s = values("signed")
    assert (s < 0).any() and (s > 0).any()  # the map keeps its sign
    tails = upd["two_tailed"]["dae-residual"]
    assert _flat(tails) == pytest.approx(_flat(two_tailed(s)))
    assert tails["bright"]["threshold"] == pytest.approx(np.percentile(s, 99.5), rel=1e-5)
    assert tails["dark"]["threshold"] == pytest.approx(np.percentile(-s, 99.5), rel=1e-5)
    pol = upd["polarity_thresholds"]["dae-residual"]
    assert pol["both"]["threshold"] == upd["thresholds"]["dae-residual"]  # the DAE's own polarity: the main one
    for p in ("bright", "dark"):
        v = values(p)
        assert pol[p]["threshold"] == pytest.approx(np.percentile(v, QUANTILE), rel=1e-5)
        assert pol[p]["region_peak"] == pytest.approx(np.percentile(v, PEAK_QUANTILE), rel=1e-5)
    assert "rec-error" not in upd["two_tailed"]  # an unsigned map has one tail
    # read back from the checkpoint
    got = calibrated_tails(ck, "dae-residual", replace(opts, polarity="signed"))
    assert _flat(got) == pytest.approx(_flat(tails))
    signed = replace(opts, polarity="signed")
    assert auto_threshold(ck, "dae-residual", signed) == Tails(got["bright"]["threshold"], got["dark"]["threshold"])
    assert region_peak(ck, "dae-residual", signed) == Tails(got["bright"]["region_peak"], got["dark"]["region_peak"])
    # every polarity offered has a calibrated threshold and region peak
    for p in ("both", "bright", "dark"):
        o = replace(opts, polarity=p)
        assert calibrated_threshold(ck, "dae-residual", o) == pytest.approx(pol[p]["threshold"])
        assert auto_threshold(ck, "dae-residual", o) == pytest.approx(pol[p]["threshold"])
        assert region_peak(ck, "dae-residual", o) == pytest.approx(pol[p]["region_peak"])
    with pytest.raises(ValueError, match="one per tail"):
        calibrated_threshold(ck, "dae-residual", signed)
    # the tails hold for the calibration's other options only
    with pytest.raises(ValueError, match="other options"):
        calibrated_tails(ck, "dae-residual", replace(signed, smooth_mm=2.0))
    assert region_peak(ck, "dae-residual", replace(signed, smooth_mm=2.0)) is None
    assert calibrated_tails(ck, "rec-error", opts) is None


def test_an_old_checkpoint_without_tails_keeps_working(calibrated_dae, tmp_path):
    ck, m, cases, upd = calibrated_dae
    import shutil
    shutil.copy(ck.path, tmp_path / "old.safetensors")
    old = update_metadata(tmp_path / "old.safetensors", two_tailed=None, polarity_thresholds=None,
                          two_tailed_note=None)
    assert "two_tailed" not in old.meta
    opts = PredictorOptions()
    assert calibrated_threshold(old, "dae-residual", opts) == upd["thresholds"]["dae-residual"]
    assert region_peak(old, "dae-residual", opts) == upd["region_peaks"]["dae-residual"]
    signed = replace(opts, polarity="signed")
    assert calibrated_tails(old, "dae-residual", signed) is None
    assert region_peak(old, "dae-residual", signed) is None
    with pytest.raises(ValueError, match="no per-tail thresholds"):
        auto_threshold(old, "dae-residual", signed)
    with pytest.raises(ValueError, match="other options"):  # 'bright' was never calibrated on this one
        calibrated_threshold(old, "dae-residual", replace(opts, polarity="bright"))
    # --threshold auto falls back to the polarity the old threshold holds for, and says so
    back, note = tails_or_fallback(old, ["dae-residual"], signed)
    assert note and "no per-tail thresholds" in note and "dae-residual" in note
    assert calibrated_threshold(old, "dae-residual", back) == upd["thresholds"]["dae-residual"]
    assert tails_or_fallback(ck, ["dae-residual"], signed) == (signed, None)  # a calibrated one keeps 'signed'


# --------------------------------------------------------------------------- label and findings of a signed map
def _two_blobs():
    """A signed map (2 mm voxels) with a bright blob (+3) and a dark blob (-2.5) on faint noise."""
    rng = np.random.default_rng(0)
    arr = (0.1 * rng.standard_normal((16, 40, 40))).astype(np.float32)
    arr[5:10, 5:12, 5:12] = 3.0
    arr[5:10, 25:33, 25:33] = -2.5
    heat = sitk.GetImageFromArray(arr)
    heat.SetSpacing((2.0, 2.0, 2.0))
    return heat, arr


def test_a_signed_label_has_1_on_the_bright_blob_and_2_on_the_dark_one():
    from vaeanomaly.regions import label_image
    heat, arr = _two_blobs()
    lab, t, kept, dropped = label_image(heat, "auto", {"dae-residual": Tails(1.0, 0.8)}, "dae-residual", 50.0)
    la = sitk.GetArrayFromImage(lab)
    assert t == Tails(1.0, 0.8) and set(np.unique(la)) == {0, 1, 2}
    assert (la[5:10, 5:12, 5:12] == 1).all() and (la[5:10, 25:33, 25:33] == 2).all()
    assert kept == 5 * 49 + 5 * 64 and dropped == 0
    # each tail its own region peak: a dark peak above the dark blob drops it, the bright blob stays
    lab, *_ = label_image(heat, "auto", {"dae-residual": Tails(1.0, 0.8)}, "dae-residual", 50.0, Tails(2.0, 3.0))
    assert set(np.unique(sitk.GetArrayFromImage(lab))) == {0, 1}
    # a number or a percentile on a signed map: |value| on both tails
    lab, t, *_ = label_image(heat, "1.0", {}, "dae-residual", 50.0, signed=True)
    assert t == Tails(1.0, 1.0) and set(np.unique(sitk.GetArrayFromImage(lab))) == {0, 1, 2}
    # the same map without the sign (one-sided): only the bright blob is above the threshold
    lab, t, *_ = label_image(heat, "1.0", {}, "dae-residual", 50.0)
    assert set(np.unique(sitk.GetArrayFromImage(lab))) == {0, 1}


def test_findings_carry_their_direction(tmp_path):
    from vaeanomaly import findings
    heat, arr = _two_blobs()
    found = findings.find(heat, Tails(1.0, 0.8), min_mm3=50.0)
    assert [f["direction"] for f in found] == ["darker than expected", "brighter than expected"]  # by score mass
    dark, bright = found
    assert dark["peak"] == pytest.approx(2.5) and dark["mean"] == pytest.approx(2.5)  # magnitudes
    assert bright["peak"] == pytest.approx(3.0) and bright["voxels"] == 5 * 49 and dark["voxels"] == 5 * 64
    assert bright["centroid_lps_mm"][0] < dark["centroid_lps_mm"][0]  # the bright blob at the lower x
    # one-sided maps: their own direction; an unsigned map: none
    assert [f["direction"] for f in findings.find(heat, 1.0, min_mm3=50.0, direction="bright")] == \
        ["brighter than expected"]
    assert [f["direction"] for f in findings.find(heat, 1.0, min_mm3=50.0)] == [None]
    findings.write(tmp_path / "f.csv", found)
    rows = (tmp_path / "f.csv").read_text().splitlines()
    assert rows[0].startswith("id,direction,") and ",darker than expected," in rows[1]
    findings.write(tmp_path / "f.json", found)
    assert json.loads((tmp_path / "f.json").read_text())["findings"][1]["direction"] == "brighter than expected"
    from vaeanomaly import report
    page = report.render(heat, heat, Tails(1.0, 0.8), "calibrated per tail", found, "dae-residual", "d")
    assert "<th>direction</th>" in page and "darker than expected" in page and "+1 / -0.8" in page


def test_score_writes_a_signed_heatmap_its_label_and_findings(calibrated_dae, tmp_path, capsys):
    """`vaeanomaly score --polarity signed --threshold auto`: the per-tail thresholds, label 1/2, directions."""
    from conftest import make_phantom

    from vaeanomaly import cli
    ck, *_ = calibrated_dae
    img = make_phantom((40, 40, 24), (4.0, 4.0, 4.0), blob_index=(12, 20, 12), blob_value=3.0)
    arr = sitk.GetArrayFromImage(img)
    z, y, x = np.meshgrid(*[np.arange(n) for n in arr.shape], indexing="ij")
    arr = np.where((arr > 0) & ((x - 28) ** 2 + (y - 20) ** 2 + (z - 12) ** 2 < 9), 0.2, arr).astype(np.float32)
    dark_img = sitk.GetImageFromArray(arr)
    dark_img.CopyInformation(img)
    sitk.WriteImage(dark_img, str(tmp_path / "t2.nii.gz"))
    rc = cli.main(["score", str(tmp_path / "t2.nii.gz"), "-o", str(tmp_path / "h.nii.gz"), "--model", str(ck.path),
                   "--polarity", "signed", "--threshold", "auto", "--label", str(tmp_path / "l.nii.gz"),
                   "--findings", str(tmp_path / "f.json"), "--progress", "none"])
    assert rc == 0
    h = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "h.nii.gz")))
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "l.nii.gz")))
    tails = calibrated_tails(ck, "dae-residual", PredictorOptions(polarity="signed"))
    tb, td = tails["bright"]["threshold"], tails["dark"]["threshold"]
    assert (h < 0).any() and (h > 0).any()
    # the label is exactly the two tails of the heatmap, regions kept as regions.signed_label keeps them
    from vaeanomaly.regions import min_region_mm3, signed_label
    expect, _ = signed_label(h, Tails(tb, td), (4.0, 4.0, 4.0), min_region_mm3(ck),
                             Tails(tails["bright"]["region_peak"], tails["dark"]["region_peak"]))
    np.testing.assert_array_equal(lab, expect)
    assert (h[lab == 1] > tb).all() and (h[lab == 2] < -td).all()
    meta = json.loads((tmp_path / "f.json").read_text())
    assert meta["threshold"] == pytest.approx({"bright": tb, "dark": td})
    assert "per tail" in meta["threshold_source"]
    names = {1: "brighter than expected", 2: "darker than expected"}
    assert {f["direction"] for f in meta["findings"]} == {names[v] for v in np.unique(lab) if v}
    # this model flags the bright blob (x = 48 mm) brighter and the dark one (x = 112 mm) darker
    assert set(np.unique(lab)) == {0, 1, 2}
    where = {f["direction"]: f["centroid_lps_mm"][0] for f in meta["findings"]}
    assert abs(where["brighter than expected"] - 48) < 8 and abs(where["darker than expected"] - 112) < 8
    # an old checkpoint (no tails): the polarity its threshold holds for, one threshold, a note
    import shutil
    shutil.copy(ck.path, tmp_path / "old.safetensors")
    update_metadata(tmp_path / "old.safetensors", two_tailed=None, polarity_thresholds=None)
    capsys.readouterr()
    rc = cli.main(["score", str(tmp_path / "t2.nii.gz"), "-o", str(tmp_path / "h2.nii.gz"), "--model",
                   str(tmp_path / "old.safetensors"), "--polarity", "signed", "--threshold", "auto", "--label",
                   str(tmp_path / "l2.nii.gz"), "--progress", "none"])
    assert rc == 0 and "no per-tail thresholds" in capsys.readouterr().err
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "h2.nii.gz"))).min() >= 0  # |value|, as before
    assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "l2.nii.gz"))))) <= {0, 1}


def test_training_calibrate_records_the_tails(tmp_path, capsys):
    """training/calibrate.py (re-calibrating a checkpoint in place) stores and prints the two tails."""
    import calibrate

    from vaeanomaly.data import SliceCache
    (xa, ba), (xb, bb) = _case(3), _case(4)
    SliceCache(np.concatenate([xa, xb]).astype(np.float16), np.concatenate([ba, bb]), np.zeros((12, 32, 32), bool),
               np.repeat([0, 1], 6), ["a", "b"]).save(tmp_path / "healthy.npz")
    path = save_checkpoint(tmp_path / "d.safetensors", _dae(), {"name": "d", "beta": 1.0,
                                                                "preprocessing": {"image_size": 32}})
    calibrate.main([str(path), "--cache", str(tmp_path / "healthy.npz"), "--all-cases"])
    ck = load_checkpoint(path)
    tails = calibrated_tails(ck, "dae-residual", PredictorOptions(polarity="signed"))
    assert tails and tails["bright"]["threshold"] > 0 and tails["dark"]["threshold"] > 0
    assert set(ck.meta["polarity_thresholds"]["dae-residual"]) == {"both", "bright", "dark"}
    assert "two-tailed: brighter >" in capsys.readouterr().out
