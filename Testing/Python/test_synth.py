"""The varied generator: switches by name, held-out design, and the clinician's benchmark."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from vaeanomaly import synth


def _arr(img):
    return sitk.GetArrayFromImage(img)


@pytest.fixture(scope="module")
def healthy():
    return synth.make_varied(11, "tse", False, step=2, off=("partial",))


def test_family_switch_changes_what_is_generated(healthy):
    ms = synth.make_varied(11, "tse", "ms", step=2, off=("partial",))
    assert healthy.seg is None and ms.seg is not None
    labels, n = __import__("scipy.ndimage", fromlist=["label"]).label(_arr(ms.seg) > 0)
    assert n >= 2, "MS-like: several separate lesions"
    sizes = np.bincount(labels.ravel())[1:] * np.prod(ms.seg.GetSpacing())
    assert sizes.max() < 4 / 3 * np.pi * 12 ** 3, "MS-like lesions are small"
    hypo = synth.make_varied(11, "tse", "hypointense", step=2, off=("partial",))
    t2, seg, mask = _arr(hypo.t2), _arr(hypo.seg) > 0, _arr(hypo.mask) > 0
    assert t2[seg].mean() < t2[mask & ~seg].mean(), "hypointense lesions are darker than the brain"


def test_domain_switch_changes_contrast(healthy):
    """T2: the brightest brain voxels are CSF (ventricles); T1: CSF is darker than tissue."""
    t1 = synth.make_varied(11, "t1", False, step=2, off=("partial",))
    a2, a1, m = _arr(healthy.t2), _arr(t1.t2), _arr(healthy.mask) > 0
    bright2 = a2 > np.percentile(a2[m], 95)
    assert a2[bright2 & m].mean() > 1.8 * np.median(a2[m])
    m1 = _arr(t1.mask) > 0
    assert np.percentile(a1[m1], 95) < 1.6 * np.median(a1[m1]), "T1: no bright CSF"
    with pytest.raises(ValueError, match="unknown domain"):
        synth.make_varied(1, "dwi")
    with pytest.raises(ValueError, match="T2 domains only"):
        synth.make_varied(1, "t1", "ms")


def test_effect_switch_and_head(healthy):
    quiet = synth.make_varied(11, "tse", False, step=2, off=("partial", "noise"))
    assert not np.array_equal(_arr(quiet.t2), _arr(healthy.t2))
    with pytest.raises(ValueError, match="unknown effect"):
        synth.make_varied(1, off=("gravity",))
    head = synth.make_varied(11, "tse", False, head=True, step=2, off=("partial",))
    a, m = _arr(head.t2), _arr(head.mask) > 0
    assert (a[~m] > 0.1 * a[m].mean()).sum() > 0.3 * m.sum(), "an unstripped head: scalp and noise outside the brain"
    assert (_arr(healthy.t2)[~(_arr(healthy.mask) > 0)] == 0).all(), "skull-stripped: zero outside the brain"


def test_a_second_draw_of_a_split_shares_no_seed_with_the_first():
    fams = [None] + list(synth.LESION_FAMILIES)
    first = synth.cohort_plan("validation", 1, synth.TRAINING_DOMAINS, fams)
    second = synth.cohort_plan("validation", 2, synth.TRAINING_DOMAINS, fams, seed_offset=1000)
    assert {c["seed"] for c in first}.isdisjoint({c["seed"] for c in second})
    assert min(c["seed"] for c in second) == synth.SPLIT_SEEDS["validation"] + 1000
    assert max(c["seed"] for c in second) < synth.SPLIT_SEEDS["benchmark"]
    with pytest.raises(ValueError, match="seed range"):
        synth.cohort_plan("validation", 1, synth.TRAINING_DOMAINS, fams, seed_offset=400_000)


def test_held_out_domain_never_reaches_training(tmp_path):
    with pytest.raises(ValueError, match="held out"):
        synth.cohort_plan("train", 2, ["tse", "epi"])
    with pytest.raises(ValueError, match="held out"):
        synth.cohort_plan("calibration", 2, ["t1"])
    train = synth.cohort_plan("train", 30, synth.TRAINING_DOMAINS)
    bench = synth.cohort_plan("benchmark", 30, ["tse", "epi"], [None] + list(synth.LESION_FAMILIES))
    assert {c["seed"] for c in train}.isdisjoint({c["seed"] for c in bench})
    assert "epi" in synth.HELD_OUT_DOMAINS and all(c["domain"] != "epi" for c in train)
    # a training cache that holds an EPI case is refused by train.py
    import train as train_script
    from vaeanomaly.data import SliceCache
    n = 4
    cache = SliceCache(np.zeros((n, 64, 64), np.float16), np.ones((n, 64, 64), bool), np.zeros((n, 64, 64), bool),
                       np.array([0, 0, 1, 1]), ["tra-tse-healthy-000/T1w/x.nii.gz", "tra-epi-healthy-001/T1w/x.nii.gz"])
    cache.save(tmp_path / "leak.npz")
    with pytest.raises(SystemExit, match="held-out"):
        train_script.main(["--cache", str(tmp_path / "leak.npz"), "--out", str(tmp_path / "m.safetensors"),
                           "--epochs", "1", "--device", "cpu"])


def test_benchmark_rows_report_clinician_and_oracle_metrics():
    from vaeanomaly.evaluation import INTENSITY, benchmark, format_benchmark
    rng = np.random.default_rng(0)
    cases, groups = [], {}
    for i, fam in enumerate([None, None, "ms", "ms"]):
        x = rng.normal(0, 1, (3, 16, 16)).astype(np.float32)
        brain = np.ones_like(x, bool)
        label = np.zeros_like(brain)
        if fam:
            label[1, 4:8, 4:8] = True
            x[label] += 4
        cases.append((f"c{i}", x, brain, label))
        groups[f"c{i}"] = ("tse", fam)
    rows = benchmark({INTENSITY: lambda s, b, sp: s}, cases, groups, {INTENSITY: 2.33})
    (r,) = rows
    assert r["family"] == "ms" and r["n_cases"] == 2 and r["auroc"] > 0.95
    assert 0.3 < r["healthy_flagged_pct"] < 3, "about 1% of N(0,1) pixels exceed 2.33"
    assert r["lesion_flagged_pct"] > 90 and 0 < r["dice_calibrated"] <= r["dice_oracle"] + 1e-9
    assert "oracle" in format_benchmark(rows)
