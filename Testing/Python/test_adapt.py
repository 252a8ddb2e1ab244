"""`vaeanomaly adapt` (vaeanomaly/adapt.py): site adaptation of the bundled default model on tiny data,
real files, the real command."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import SimpleITK as sitk

from vaeanomaly.adapt import AdaptError, AdaptOptions, adapt
from vaeanomaly.checkpoint import MODELS_DIR, load_checkpoint, resolve_model
from vaeanomaly.cli import main as cli

SITE_SPACING = (1.3, 1.3, 2.5)


def site_scan(img, mask, gamma=0.55, blur=1.6):
    """The same brain as acquired by "another scanner": resampled onto one protocol's voxel size, another
    tissue contrast (gamma) and a softer point-spread function."""
    size = [int(round(s * sp / t)) for s, sp, t in zip(img.GetSize(), img.GetSpacing(), SITE_SPACING)]
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetSpacing(SITE_SPACING)
    ref.SetDirection(img.GetDirection())
    ref.SetOrigin(img.GetOrigin())
    m = sitk.Resample(mask, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    a = sitk.GetArrayFromImage(sitk.Resample(sitk.SmoothingRecursiveGaussian(sitk.Cast(img, sitk.sitkFloat32), blur),
                                             ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    a = np.clip(a, 0, None) / max(float(a.max()), 1e-6)
    out = sitk.GetImageFromArray((a ** gamma * 1000 * (sitk.GetArrayFromImage(m) > 0)).astype(np.float32))
    out.CopyInformation(ref)
    return out, m


@pytest.fixture(scope="module")
def site(cohort, tmp_path_factory):
    """The 3 generated healthy subjects and 1 lesion case, as scans of one other scanner (files)."""
    d = tmp_path_factory.mktemp("site")
    scans, masks = [], []
    for i, p in enumerate(sorted((cohort / "healthy").glob("*/T1w/T2w_acpc_dc_restore_brain.nii.gz"))):
        img, m = site_scan(sitk.ReadImage(str(p)), sitk.ReadImage(str(p.parent / "brainmask_fs.nii.gz")))
        scans.append(d / f"site{i}.nii.gz")
        masks.append(d / f"site{i}_mask.nii.gz")
        sitk.WriteImage(img, str(scans[-1]))
        sitk.WriteImage(m, str(masks[-1]))
    t2 = sorted((cohort / "lesion").glob("*/*_t2.nii.gz"))[0]
    img, m = site_scan(sitk.ReadImage(str(t2)), sitk.ReadImage(str(t2.parent / t2.name.replace("_t2", "_brainmask"))))
    sitk.WriteImage(img, str(d / "lesion.nii.gz"))
    sitk.WriteImage(m, str(d / "lesion_mask.nii.gz"))
    return d, scans, masks


@pytest.fixture(scope="module")
def epi(tmp_path_factory):
    """3 healthy scans of the generator's held-out "epi" domain (another scanner: blurred, distorted, noisy
    EPI), on which the bundled default model over-flags healthy brain (files, brain masks beside)."""
    from vaeanomaly.synth import make_subject
    d = tmp_path_factory.mktemp("epi")
    scans, masks = [], []
    for k in range(3):
        sub = make_subject(1_700_000 + k, domain="epi", step=2, off=("partial",))
        scans.append(d / f"epi{k}.nii.gz")
        masks.append(d / f"epi{k}_mask.nii.gz")
        sitk.WriteImage(sub.t2, str(scans[-1]))
        sitk.WriteImage(sub.mask, str(masks[-1]))
    return scans, masks


def sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


# the paper-grid model, trained on one generator (the bundled models are all calibrated on the varied calibration
# cohort, where it flags little of these EPI-like scans; adapt_base below is it as calibrated at one site)
BASE = "bvae-l64-b10"


@pytest.fixture(scope="module")
def adapt_base(cohort, tmp_path_factory):
    """bvae-l64-b10 calibrated on the test cohort's healthy brains alone (one generator, one "site"), as a model
    from another site would come: on the EPI-like scans it over-flags healthy brain."""
    from vaeanomaly.calibration import calibrate, cases_from_cache
    from vaeanomaly.checkpoint import update_metadata
    from vaeanomaly.data import SliceCache
    from vaeanomaly.predictors import PredictorOptions
    p = tmp_path_factory.mktemp("base") / "site-a.safetensors"
    p.write_bytes(resolve_model(BASE).read_bytes())
    ck = load_checkpoint(p)
    upd = calibrate(ck.model, ck.beta, cases_from_cache(SliceCache.load(cohort / "healthy.npz")),
                    PredictorOptions(proj_steps=2),
                    ensemble=ck.ensemble, max_projection_slices=8)
    update_metadata(p, **upd)
    return p


def spy_on_score_prepared(monkeypatch) -> list:
    """Every call of scoring.score_prepared from now on: (checkpoint, names, verdict); the real function runs."""
    from vaeanomaly import scoring
    calls, real = [], scoring.score_prepared

    def spy(checkpoint, prepared, names, *args, **kwargs):
        calls.append((checkpoint, tuple(names), kwargs.get("verdict", True)))
        return real(checkpoint, prepared, names, *args, **kwargs)

    monkeypatch.setattr(scoring, "score_prepared", spy)
    return calls


@pytest.mark.slow
def test_adapt_improves_flagged_percent_on_held_out_scans(epi, adapt_base, tmp_path, capsys, monkeypatch):
    """The flagged % before and after are what scoring computes (scoring.score_prepared, no verdict): every
    scan with the base model, then the held-out scans with the adapted weights (the base checkpoint's grid and
    beta); adapted and recalibrated, the model flags much less of the new scanner's healthy brain."""
    from vaeanomaly.adapt import FLAG_PREDICTORS
    scans, masks = epi
    before_sha = sha(adapt_base)
    out = tmp_path / "my-scanner.safetensors"
    calls = spy_on_score_prepared(monkeypatch)
    rc = cli(["adapt", *map(str, scans), "--masks", *map(str, masks), "-o", str(out), "--minutes", "0.3",
              "--max-epochs", "3", "--allow-mixed", "--progress", "none", "--model", str(adapt_base)])
    assert rc == 0, capsys.readouterr().err
    ck = load_checkpoint(out)
    a = ck.meta["adaptation"]
    assert len(a["held_out"]) == 2 and len(a["fine_tuned_on"]) == 1
    assert len(calls) == len(scans) + 2 and all(c[1:] == (FLAG_PREDICTORS, False) for c in calls)
    base, adapted = calls[0][0], calls[-1][0]
    assert all(c[0] is base for c in calls[:len(scans)]) and all(c[0] is adapted for c in calls[len(scans):])
    assert adapted.model is not base.model and (adapted.preprocessing, adapted.beta) == (base.preprocessing, base.beta)
    # the site shift made the base model over-flag healthy brain; adapted and recalibrated, much less
    assert a["flagged_percent_before"]["rec-grad"] > 3
    assert a["flagged_percent_after"]["rec-grad"] < a["flagged_percent_before"]["rec-grad"] / 2
    # every threshold recalibrated (each predictor, the ensemble), and the verdict on the held-out scans
    base = load_checkpoint(adapt_base)
    assert set(ck.thresholds) >= set(base.thresholds) | {"ensemble"}
    assert all(ck.thresholds[k] != base.thresholds[k] for k in base.thresholds)
    assert ck.meta["verdict"]["n_subjects"] == 2 and ck.meta["verdict"]["subjects"] == a["held_out"]
    card = (tmp_path / "my-scanner.md").read_text(encoding="utf-8")
    assert f"Adapted from **{a['base_model']}**" in card and "epi0.nii.gz" in card and "before" in card
    assert "ADAPTED on 3 healthy scans" in ck.card()
    assert sha(adapt_base) == before_sha  # the base model is untouched
    # the adapted model scores, with a verdict
    rep = tmp_path / "r.json"
    assert cli(["score", str(scans[0]), "--mask", str(masks[0]), "-o", str(tmp_path / "h.nii.gz"), "--model", str(out),
                "--report", str(rep), "--progress", "none"]) == 0
    assert json.loads(rep.read_text(encoding="utf-8"))["fit"] is not None


@pytest.mark.slow
def test_ctrl_c_keeps_the_last_good_state(site, tmp_path):
    d, scans, masks = site
    out = tmp_path / "interrupted.safetensors"

    def progress(frac):  # the user presses Ctrl-C during fine-tuning
        if 0.12 < frac < 0.85:
            raise KeyboardInterrupt

    a = adapt(scans, out, None, masks, AdaptOptions(minutes=1, max_epochs=5), progress=progress)
    assert a["interrupted"] and a["epochs"] == 1 and a["best_epoch"] in (0, 1)
    ck = load_checkpoint(out)  # written, calibrated, usable
    assert ck.meta["adaptation"]["interrupted"] and "rec-grad" in ck.thresholds and "verdict" in ck.meta


def test_bad_input_is_refused_with_a_clear_message(site, cohort, tmp_path):
    d, scans, masks = site
    o = AdaptOptions(minutes=0.1, max_epochs=1)
    with pytest.raises(AdaptError, match="at least 3 healthy scans"):
        adapt(scans[:1], tmp_path / "a.safetensors", masks=masks[:1], options=o)
    with pytest.raises(AdaptError, match="bundled models"):
        adapt(scans, MODELS_DIR / "bvae-l64-b10.safetensors", masks=masks, options=o)
    with pytest.raises(AdaptError, match="bundled models"):
        adapt(scans, MODELS_DIR / "new-one.safetensors", masks=masks, options=o)
    renamed = tmp_path / "scan.safetensors"
    renamed.write_bytes(scans[0].read_bytes())
    with pytest.raises(AdaptError, match="overwrite the input"):
        adapt([renamed, *scans[1:]], renamed, masks=masks, options=o)
    with pytest.raises(AdaptError, match="one mask per scan"):
        adapt(scans, tmp_path / "a.safetensors", masks=masks[:2], options=o)
    # scans of different protocols (the generator's 1 mm and 3 mm slices)
    raw = sorted((cohort / "healthy").glob("*/T1w/T2w_acpc_dc_restore_brain.nii.gz"))
    with pytest.raises(AdaptError, match="differ in voxel size"):
        adapt(raw, tmp_path / "a.safetensors", masks=[p.parent / "brainmask_fs.nii.gz" for p in raw], options=o)
    # a T1-weighted scan among them
    t2 = sitk.ReadImage(str(scans[2]))
    a = sitk.GetArrayFromImage(t2)
    m = sitk.GetArrayFromImage(sitk.ReadImage(str(masks[2]))) > 0
    t1 = sitk.GetImageFromArray(np.where(m, a.max() * 1.1 - a, 0).astype(np.float32))
    t1.CopyInformation(t2)
    sitk.WriteImage(t1, str(tmp_path / "t1.nii.gz"))
    with pytest.raises(AdaptError, match="t1.nii.gz' does not look T2-weighted"):
        adapt([*scans[:2], tmp_path / "t1.nii.gz"], tmp_path / "a.safetensors", masks=masks, options=o)
    assert not (tmp_path / "a.safetensors").exists()


def test_grossly_abnormal_scan_among_healthy_is_refused(site, tmp_path):
    """A scan with a large abnormal region (a fifth of the brain replaced by fluid-bright, blurred signal)
    stands out against the others and is refused; nothing is written."""
    d, scans, masks = site
    img = sitk.ReadImage(str(scans[0]))
    a = sitk.GetArrayFromImage(img)
    brain = sitk.GetArrayFromImage(sitk.ReadImage(str(masks[0]))) > 0
    zz, yy, xx = np.nonzero(brain)
    c = np.array([zz.mean(), yy.mean(), xx.mean()])
    idx = np.indices(a.shape).reshape(3, -1).T
    dist = np.linalg.norm((idx - c) * np.array(img.GetSpacing()[::-1]), axis=1).reshape(a.shape)
    region = brain & (dist < np.quantile(dist[brain], 0.2))
    bad = sitk.GetImageFromArray(np.where(region, a[brain].max() * 0.95, a).astype(np.float32))
    bad.CopyInformation(img)
    sitk.WriteImage(bad, str(tmp_path / "abnormal.nii.gz"))
    with pytest.raises(AdaptError, match="abnormal.nii.gz .* stand out"):
        adapt([tmp_path / "abnormal.nii.gz", *scans[1:], d / "lesion.nii.gz"], tmp_path / "a.safetensors",
              masks=[*masks, d / "lesion_mask.nii.gz"], options=AdaptOptions(minutes=0.1, max_epochs=1))
    assert not (tmp_path / "a.safetensors").exists()


@pytest.mark.slow
@pytest.mark.xfail(reason="known limitation (docs/adaptation.md): the leave-one-out screen catches gross "
                          "abnormality only; this site-shifted generated glioma (2 % of the brain) flags 2-3 %, "
                          "healthy scans from an unknown scanner up to 7.4 %", strict=False)
def test_lesion_scan_among_healthy_is_refused(site, tmp_path):
    """The lesion case at the healthy scans' anatomical resolution (the cohort's lesion cases are generated
    coarser, which alone would make one stand out among them)."""
    from vaeanomaly.synth import write_one
    d, scans, masks = site
    t2 = write_one(tmp_path / "gen", 0, True, seed=1)
    img, m = site_scan(sitk.ReadImage(str(t2)), sitk.ReadImage(str(t2.parent / t2.name.replace("_t2", "_brainmask"))))
    sitk.WriteImage(img, str(tmp_path / "lesion.nii.gz"))
    sitk.WriteImage(m, str(tmp_path / "lesion_mask.nii.gz"))
    with pytest.raises(AdaptError, match="lesion.nii.gz .* stand out"):
        adapt([*scans, tmp_path / "lesion.nii.gz"], tmp_path / "a.safetensors",
              masks=[*masks, tmp_path / "lesion_mask.nii.gz"], options=AdaptOptions(minutes=0.1, max_epochs=1))


@pytest.mark.slow
def test_progress_only_moves_forward(epi, tmp_path):
    """The progress bar never runs past a stage and back: a fine-tuning budget overrun (here: after the
    first epoch) reports the stage's end, not more."""
    scans, masks = epi
    seen = []
    adapt(scans, tmp_path / "p.safetensors", BASE, masks, AdaptOptions(minutes=0.001, max_epochs=3, allow_mixed=True),
          progress=seen.append)
    assert seen[-1] == 1.0 and all(0.0 <= f <= 1.0 for f in seen)
    assert all(b >= a for a, b in zip(seen, seen[1:])), seen
