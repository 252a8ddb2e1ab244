"""Detection (issue 16): signed maps, smoothing in millimetres, the denoising autoencoder and its checkpoint."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vaeanomaly.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from vaeanomaly.dae import DAE, coarse_noise, dae_loss
from vaeanomaly.predictors import PredictorOptions, apply_polarity, compute_maps, parse_predictors, smooth


def _dae(size=32, seed=0):
    torch.manual_seed(seed)
    m = DAE(size, base=4, levels=3).eval()
    for p in m.parameters():  # non-trivial BatchNorm statistics, so the round trip checks them too
        p.data.add_(0.01 * torch.randn_like(p))
    for b in m.modules():
        if isinstance(b, torch.nn.BatchNorm2d):
            b.running_mean.uniform_(-0.1, 0.1)
            b.running_var.uniform_(0.5, 1.5)
    return m


def _slices(size=32, n=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.3, (n, size, size)).astype(np.float32)
    brain = np.zeros_like(x, bool)
    brain[:, 4:-4, 4:-4] = True
    return np.where(brain, x, 0), brain


def test_polarity_keeps_the_sign():
    s = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0])
    assert apply_polarity(s, "bright").tolist() == [0, 0, 0, 0.5, 2]
    assert apply_polarity(s, "dark").tolist() == [2, 0.5, 0, 0, 0]
    assert apply_polarity(s, "both").tolist() == [2, 0.5, 0, 0.5, 2]
    with pytest.raises(ValueError, match="polarity"):
        apply_polarity(s, "up")


def test_smoothing_in_mm_means_the_same_on_any_grid():
    o = PredictorOptions(smooth_mm=4.0)
    s64, k64 = o.kernel_px(240 / 64)
    s128, k128 = o.kernel_px(240 / 128)
    assert s64 == pytest.approx(4 / 3.75) and s128 == pytest.approx(2 * s64)
    assert k64 % 2 == 1 and k128 % 2 == 1 and k128 > k64
    # a point on each grid, smoothed: the same width in mm (second moment of the profile)
    widths = []
    for n in (64, 128):
        img = torch.zeros(1, 1, n, n)
        img[0, 0, n // 2, n // 2] = 1
        prof = smooth(img, o, 240 / n)[0, 0, n // 2].numpy()
        r = (np.arange(n) - n // 2) * 240 / n
        widths.append(np.sqrt((prof * r ** 2).sum() / prof.sum()))
    assert widths[0] == pytest.approx(4.0, rel=0.08) and widths[1] == pytest.approx(4.0, rel=0.08)
    # the paper preset: sigma 3 px, kernel 7, whatever the grid
    paper = PredictorOptions.preset("paper")
    assert paper.kernel_px(240 / 64) == (3.0, 7) == paper.kernel_px(240 / 128)
    with pytest.raises(ValueError, match="preset"):
        PredictorOptions.preset("fast")


def test_signed_rec_grad_is_positive_on_a_bright_spot():
    """A bright blob in the scan: Rec-grad's 'bright' map carries it, the 'dark' one does not; 'both' is the old
    absolute map."""
    from vaeanomaly.checkpoint import DEFAULT_VAE
    ck = load_checkpoint(DEFAULT_VAE)  # the default bundled VAE (Rec-grad is a VAE's map)
    size = ck.model.image_size
    x = np.zeros((1, size, size), np.float32)
    yy, xx = np.mgrid[:size, :size]
    x[0][(yy - size // 2) ** 2 + (xx - size // 2) ** 2 < (size // 10) ** 2] = 4.0
    maps = {p: compute_maps(ck.model, x, ["rec-grad"], ck.beta, PredictorOptions(polarity=p, smooth=False))["rec-grad"]
            for p in ("bright", "dark", "both")}
    spot = x[0] > 0
    assert maps["bright"][0][spot].mean() > 5 * maps["dark"][0][spot].mean()
    np.testing.assert_allclose(maps["both"], maps["bright"] + maps["dark"], rtol=1e-5, atol=1e-6)
    paper = compute_maps(ck.model, x, ["rec-grad"], ck.beta, PredictorOptions.preset("paper"))["rec-grad"]
    default_before = compute_maps(ck.model, x, ["rec-grad"], ck.beta,
                                  PredictorOptions(smooth_sigma=3, smooth_kernel=7, smooth_mm=0, polarity="both"))
    np.testing.assert_array_equal(paper, default_before["rec-grad"])


def test_dae_residual_maths():
    m = _dae()
    x, brain = _slices()
    opts = PredictorOptions(polarity="bright", smooth=False, rim_mm=0, normalise="none")
    maps = compute_maps(m, x, ["dae-residual", "rec-error", "reconstruction"], options=opts, brain=brain)
    with torch.no_grad():
        rec = m(torch.from_numpy(x)[:, None])[:, 0].numpy()
    np.testing.assert_allclose(maps["reconstruction"], rec, atol=1e-5)
    np.testing.assert_allclose(maps["dae-residual"], np.maximum(x - rec, 0), atol=1e-5)
    np.testing.assert_allclose(maps["rec-error"], (x - rec) ** 2, atol=1e-5)  # unsigned whatever the polarity
    dark = compute_maps(m, x, ["dae-residual"], options=PredictorOptions(polarity="dark", smooth=False,
                                                                         normalise="none"))
    np.testing.assert_allclose(dark["dae-residual"], np.maximum(rec - x, 0), atol=1e-5)
    smoothed = compute_maps(m, x, ["dae-residual"], options=PredictorOptions(polarity="bright", smooth_mm=8.0,
                                                                             smooth_z_mm=0, normalise="none"),
                            pixel_mm=240 / 32)["dae-residual"]
    ref = smooth(torch.from_numpy(np.maximum(x - rec, 0))[:, None], PredictorOptions(smooth_mm=8.0), 240 / 32)
    np.testing.assert_allclose(smoothed, ref[:, 0].numpy(), atol=1e-5)
    # slices without brain are 0
    brain[1] = False
    assert not compute_maps(m, x, ["dae-residual"], options=opts, brain=brain)["dae-residual"][1].any()


def test_the_inference_copy_folds_batchnorm_and_gives_the_same_reconstruction():
    from vaeanomaly.dae import for_inference
    torch.manual_seed(3)
    m = DAE(32, base=4, levels=3)
    with torch.no_grad():  # running statistics far from (0, 1), and affine weights of their own
        for _ in range(5):
            m.train()(2.0 + 3.0 * torch.randn(8, 1, 32, 32))
        for bn in (mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-1.0, 1.0)
    m.eval()
    x = 2.0 + 3.0 * torch.randn(6, 1, 32, 32)
    fast = for_inference(m)
    with torch.no_grad():
        ref, got = m(x), fast(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert not any(isinstance(mod, torch.nn.BatchNorm2d) for mod in fast.modules())
    assert sum(isinstance(mod, torch.nn.BatchNorm2d) for mod in m.modules()) == 2 * (3 + 2)  # the model untouched


def test_normalise_divides_by_the_scans_median_over_the_brain():
    """normalise='median' (the DAE residual's default): the finished map over its median in the brain of the whole
    scan, before the rim; the same map from a scan whose residual is k times larger everywhere (a noisier scanner)
    is unchanged, and a lesion covering a minority of the brain barely moves the median."""
    from vaeanomaly.predictors import normalise_median
    m = _dae()
    x, brain = _slices()
    raw = compute_maps(m, x, ["dae-residual"], options=PredictorOptions(normalise="none", rim_mm=0), brain=brain,
                       pixel_mm=240 / 32)["dae-residual"]
    got = compute_maps(m, x, ["dae-residual"], options=PredictorOptions(rim_mm=0), brain=brain,
                       pixel_mm=240 / 32)["dae-residual"]  # the default: median
    np.testing.assert_allclose(got, raw / np.median(raw[brain]), rtol=1e-5)
    assert np.median(got[brain]) == pytest.approx(1.0)
    np.testing.assert_allclose(normalise_median(7.5 * raw, brain), normalise_median(raw, brain), rtol=1e-5)
    lesion = raw.copy()
    lesion[0, 10:16, 10:16] += 10 * raw.max()  # 36 of 1728 brain pixels
    out = normalise_median(lesion, brain)
    assert out[0, 12, 12] > 10 and np.median(out[brain]) == pytest.approx(1.0)
    assert np.median(raw[brain]) == pytest.approx(np.median(lesion[brain]), rel=0.05)
    # without a mask: over the pixels where the map is not 0; a map that is 0 everywhere stays 0
    np.testing.assert_allclose(normalise_median(raw), raw / np.median(raw[raw != 0]), rtol=1e-5)
    assert not normalise_median(np.zeros((2, 4, 4), np.float32), np.ones((2, 4, 4), bool)).any()
    # the paper preset and the VAE maps keep raw values
    assert PredictorOptions.preset("paper").for_map("dae-residual").normalise == "none"
    assert PredictorOptions().for_map("rec-grad").normalise == "none"


def test_predictors_are_checked_against_the_model_kind():
    m = _dae()
    x, _ = _slices()
    with pytest.raises(ValueError, match="denoising autoencoder"):
        compute_maps(m, x, ["rec-grad"])
    assert parse_predictors("all", kind="dae") == ["dae-residual", "rec-error"]
    with pytest.raises(ValueError, match="not computed by a VAE"):
        parse_predictors("dae-residual", kind="vae")
    with pytest.raises(ValueError, match="not computed by a denoising"):
        parse_predictors("kl-grad", kind="dae")


def test_dae_checkpoint_round_trip(tmp_path):
    m = _dae()
    x, brain = _slices()
    path = save_checkpoint(tmp_path / "d.safetensors", m, {"name": "d", "beta": 1.0,
                                                          "preprocessing": {"image_size": 32}})
    ck = load_checkpoint(path)
    assert ck.kind == "dae" and isinstance(ck.model, DAE) and "denoising autoencoder" in ck.card()
    a = compute_maps(m, x, ["dae-residual"], brain=brain)["dae-residual"]
    b = compute_maps(ck.model, x, ["dae-residual"], brain=brain)["dae-residual"]
    np.testing.assert_array_equal(a, b)
    # no pickle anywhere: the file is safetensors with a JSON header; a foreign architecture is refused
    from safetensors.torch import load_file, save_file
    import json
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["vaeanomaly"])
    meta["model"]["architecture"] = "unet-something"
    save_file(load_file(str(path)), str(tmp_path / "bad.safetensors"), metadata={"vaeanomaly": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="architecture"):
        load_checkpoint(tmp_path / "bad.safetensors")


def test_coarse_noise_is_coarse_and_the_loss_counts_the_brain_only():
    g = torch.Generator().manual_seed(0)
    n = coarse_noise((4, 1, 64, 64), 0.5, 8, g)
    assert n.shape == (4, 1, 64, 64) and 0.2 < float(n.std()) < 0.6
    # neighbouring pixels are strongly correlated (a blob, not white noise)
    corr = np.corrcoef(n[..., :, :-1].flatten().numpy(), n[..., :, 1:].flatten().numpy())[0, 1]
    assert corr > 0.9
    m = _dae(64)
    x = torch.zeros(2, 1, 64, 64)
    brain = torch.zeros_like(x)
    assert float(dae_loss(m, x, brain, 0.5, 8, g).detach()) == 0.0  # no brain, nothing to learn


def test_blob_noise_is_sharp_small_and_inside_the_brain():
    from vaeanomaly.dae import blob_noise
    g = torch.Generator().manual_seed(0)
    brain = torch.zeros(40, 1, 64, 64)
    brain[:39, :, 16:48, 16:48] = 1  # the last slice has no brain
    n = blob_noise(brain, 4, (2.0, 5.0), 0.5, g)
    assert n.shape == brain.shape and float(n[39].abs().max()) == 0.0
    # centred on brain pixels: nothing beyond the largest radius (x 1.3) plus the edge from the brain
    assert float(n[:, :, :8].abs().max()) == 0.0 and float(n[:, :, :, 56:].abs().max()) == 0.0
    lit = n[:39] != 0
    assert 0.01 < float(lit.float().mean()) < 0.2  # small blobs, not a field
    # sharp edges: few pixels in a blob's 1-pixel rim compared with its plateau (coarse noise is all gradient)
    steps = (n[..., 1:] - n[..., :-1]).abs()
    assert float((steps > 0.05).float().mean()) < float(lit.float().mean())
    # the loss with blobs differs from the loss without, from the same generator state
    m = _dae(64)
    x, b = torch.rand(2, 1, 64, 64), torch.ones(2, 1, 64, 64)
    l0 = dae_loss(m, x, b, 0.5, 8, torch.Generator().manual_seed(1))
    l1 = dae_loss(m, x, b, 0.5, 8, torch.Generator().manual_seed(1), blobs=6, blob_radius_px=(2, 6))
    assert float(l0.detach()) != float(l1.detach())


def test_train_dae_with_blobs_and_warm_start(cohort, tmp_path):
    import train_dae
    out, out2 = tmp_path / "d.safetensors", tmp_path / "d2.safetensors"
    args = ["--cache", str(cohort / "healthy.npz"), "--epochs", "1", "--batch-size", "16", "--base", "4",
            "--levels", "2", "--device", "cpu"]
    train_dae.main(args + ["--out", str(out), "--blobs", "3", "--blob-radius-mm", "5", "10"])
    ck = load_checkpoint(out)
    assert ck.kind == "dae" and ck.meta["denoising"]["blobs"] == 3
    assert ck.meta["denoising"]["blob_radius_mm"] == [5.0, 10.0]
    train_dae.main(args + ["--out", str(out2), "--init", str(out), "--lr", "0"])  # no step: the weights it started from
    a, b = load_checkpoint(out).model.state_dict(), load_checkpoint(out2).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if "running" not in k and "num_batches" not in k)
    assert load_checkpoint(out2).meta["training"]["init"] == str(out)
    with pytest.raises(SystemExit, match="not a DAE with this architecture"):
        train_dae.main(args[:-4] + ["--levels", "3", "--out", str(tmp_path / "x.safetensors"), "--init", str(out)])
    # full-resolution patches: trained on 32x32 crops, the model still scores whole 64x64 slices
    train_dae.main(args + ["--out", str(out2), "--crop", "32", "--init", str(out)])
    ck = load_checkpoint(out2)
    assert ck.meta["training"]["augmentation"]["crop_px"] == 32 and ck.model.image_size == 64
    with pytest.raises(SystemExit, match="divisible"):
        train_dae.main(args + ["--out", str(out2), "--crop", "31"])


def test_foreign_patches_blend_another_slice_inside_small_ellipses_and_weigh_the_loss():
    from vaeanomaly.dae import foreign_patches
    g = torch.Generator().manual_seed(0)
    x = torch.stack([torch.full((1, 64, 64), float(i)) for i in range(4)])  # slice i holds the value i
    brain = torch.zeros_like(x)
    brain[:, :, 16:48, 16:48] = 1
    out, w = foreign_patches(x, brain, 3, (2.0, 5.0), g)
    assert out.shape == x.shape and float(w.min()) >= 0 and float(w.max()) <= 1
    changed = w > 0
    assert 0.0 < float(changed.float().mean()) < 0.15                      # small ellipses, not a field
    assert float(w[:, :, :8].max()) == 0.0                                 # centred on the brain
    # where a slice is disturbed it moves towards its donor (the previous slice in the batch), by the blend weight
    donor = torch.roll(x, 1, 0)
    assert torch.allclose(out, x * (1 - w) + donor * w)
    # the anomaly weight only ever raises the loss (same generator state, same disturbances)
    m = _dae(64)
    xb, b = torch.rand(2, 1, 64, 64), torch.ones(2, 1, 64, 64)
    plain = dae_loss(m, xb, b, 0.5, 8, torch.Generator().manual_seed(1), patches=4, blob_radius_px=(2, 6))
    weighted = dae_loss(m, xb, b, 0.5, 8, torch.Generator().manual_seed(1), patches=4, blob_radius_px=(2, 6),
                        anomaly_weight=5.0)
    assert float(weighted.detach()) > float(plain.detach())


def test_train_dae_resumes_from_its_saved_state(cohort, tmp_path, monkeypatch):
    """A run killed after its first epoch's state was saved, then resumed with the same command, ends with the
    same weights as an uninterrupted run (same seed): the saved state holds everything the run depends on."""
    import train_dae
    args = ["--cache", str(cohort / "healthy.npz"), "--batch-size", "16", "--base", "4", "--levels", "2",
            "--device", "cpu", "--patches", "2", "--blobs", "2", "--anomaly-weight", "2", "--epochs", "2"]
    whole, part = tmp_path / "whole.safetensors", tmp_path / "part.safetensors"
    train_dae.main(args + ["--out", str(whole)])
    save = train_dae.save_state

    def killed_after_saving(path, *rest):
        save(path, *rest)
        raise KeyboardInterrupt  # the process dies right after its state reached the disk

    monkeypatch.setattr(train_dae, "save_state", killed_after_saving)
    with pytest.raises(KeyboardInterrupt):
        train_dae.main(args + ["--out", str(part)])
    monkeypatch.setattr(train_dae, "save_state", save)
    state = tmp_path / "part.resume.safetensors"
    assert json.loads(state.with_suffix(".json").read_text())["next_epoch"] == 2 and not part.exists()
    train_dae.main(args + ["--out", str(part), "--resume"])
    a, b = load_checkpoint(whole).model.state_dict(), load_checkpoint(part).model.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    assert load_checkpoint(part).meta["denoising"]["patches"] == 2
    assert len((tmp_path / "part.csv").read_text().splitlines()) == 3  # header + one row per epoch, none twice


def test_min_region_size_in_mm3_drops_small_regions_only():
    from vaeanomaly.regions import keep_large, lesion_detection
    m = np.zeros((10, 20, 20), bool)
    m[2:4, 2:4, 2:4] = True          # 8 voxels
    m[5:9, 10:15, 10:15] = True      # 100 voxels
    # 1 mm voxels: 8 and 100 mm3; 2 mm voxels along x: 16 and 200 mm3
    assert keep_large(m, (1, 1, 1), 10).sum() == 100
    assert keep_large(m, (2, 1, 1), 10).sum() == 108
    assert keep_large(m, (1, 1, 1), 0).sum() == 108
    assert not keep_large(m, (1, 1, 1), 101).any()
    # lesion-wise: the small region lies on a lesion; dropping it loses that lesion and no false region is counted
    label = np.zeros_like(m)
    label[2:4, 2:4, 2:4] = True
    label[0, 18, 18] = True          # a lesion nowhere near a region: missed
    score = m.astype(float)
    brain = np.ones_like(m)
    d = lesion_detection(score, label, brain, 0.5, (1, 1, 1), 0)
    assert d == {"n_lesions": 2, "found": 1, "false_regions": 1}
    d = lesion_detection(score, label, brain, 0.5, (1, 1, 1), 10)
    assert d == {"n_lesions": 2, "found": 0, "false_regions": 1}


def test_a_region_is_kept_only_when_its_peak_reaches_the_region_peak():
    """Hysteresis: of two regions above the threshold, the one whose highest score stays below the region peak is
    dropped (size alone would keep it); without a peak both stay; lesion-wise it stops counting as a false region."""
    from vaeanomaly.regions import keep_large, lesion_detection
    score = np.zeros((10, 20, 20))
    score[1:4, 1:5, 1:5] = 1.2                 # 48 voxels, peak 1.2: noise just above the threshold
    score[5:9, 10:15, 10:15] = 1.5
    score[7, 12, 12] = 3.0                     # 100 voxels, peak 3.0: a lesion's core
    above = score > 1.0
    assert keep_large(above, (1, 1, 1), 10).sum() == 148
    kept = keep_large(above, (1, 1, 1), 10, score, 2.0)
    assert kept.sum() == 100 and not kept[2, 2, 2] and kept[5, 10, 10]  # the whole region, not only its core
    assert keep_large(above, (1, 1, 1), 0, score, 2.0).sum() == 100     # the peak acts without a minimum size
    assert keep_large(above, (1, 1, 1), 10, score, 3.0).sum() == 100    # reaching it exactly is enough
    label = np.zeros(score.shape, bool)
    label[6, 12, 12] = True
    brain = np.ones(score.shape, bool)
    assert lesion_detection(score, label, brain, 1.0, (1, 1, 1), 10) == {"n_lesions": 1, "found": 1,
                                                                         "false_regions": 1}
    assert lesion_detection(score, label, brain, 1.0, (1, 1, 1), 10, 2.0) == {"n_lesions": 1, "found": 1,
                                                                              "false_regions": 0}


def test_label_written_by_score_drops_small_regions(tmp_path):
    """`vaeanomaly score --label` at an absolute threshold: regions under --min-region-mm3 are not in the label."""
    import SimpleITK as sitk

    from vaeanomaly.regions import label_image
    arr = np.zeros((12, 30, 30), np.float32)
    arr[3, 5, 5] = 2.0                  # one voxel of 8 mm3
    arr[6:9, 10:16, 10:16] = 2.0        # 108 voxels = 864 mm3
    heat = sitk.GetImageFromArray(arr)
    heat.SetSpacing((2.0, 2.0, 2.0))
    lab, t, kept, dropped = label_image(heat, "1.0", {}, "rec-grad", 20.0)
    assert (t, kept, dropped) == (1.0, 108, 1)
    assert sitk.GetArrayFromImage(lab)[3, 5, 5] == 0 and lab.GetSpacing() == heat.GetSpacing()


def test_rim_and_the_first_and_last_brain_slices():
    from vaeanomaly.predictors import inner_brain
    brain = np.zeros((12, 32, 32), bool)
    brain[2:10, 6:26, 6:26] = True
    inner = inner_brain(brain, 4.0, 3.75, 3.75)  # one voxel in every direction
    assert not inner[2].any() and not inner[9].any() and inner[3:9, 7:25, 7:25].all()
    assert not inner[:, 6].any()
    # thick slices (8 mm): no erosion across slices, in-plane only
    thick = inner_brain(brain, 3.0, 3.75, 8.0)
    assert thick[2].any() and not thick[2, 6].any()
    # a brain cut off at the edge of the volume is not eroded there (the cut is not the brain's surface)
    cut = np.ones((4, 8, 8), bool)
    assert inner_brain(cut, 4.0, 3.75, 3.75).all()
    # through compute_maps: 0 on the rim, unchanged inside
    m = _dae()
    x, b = _slices()
    plain = compute_maps(m, x, ["dae-residual"], options=PredictorOptions(smooth=False, rim_mm=0), brain=b)["dae-residual"]
    rim = compute_maps(m, x, ["dae-residual"], options=PredictorOptions(smooth=False, rim_mm=7.5), brain=b,
                       pixel_mm=7.5, slice_mm=100.0)["dae-residual"]
    ib = inner_brain(b, 7.5, 7.5, 100.0)
    assert not rim[~ib].any() and np.array_equal(rim[ib], plain[ib])


def test_intensity_evidence_follows_the_polarity():
    from vaeanomaly.predictors import intensity_evidence
    z = torch.tensor([-3.0, 0.0, 3.0])
    assert intensity_evidence(z, "bright")[2] > 0.99 and intensity_evidence(z, "bright")[0] < 0.01
    assert intensity_evidence(z, "dark")[0] > 0.99
    both = intensity_evidence(z, "both")
    assert both[1] == 0 and both[0] == pytest.approx(both[2])
    m = _dae()
    x, b = _slices()
    o = dict(smooth=False, polarity="bright", normalise="none")
    plain = compute_maps(m, x, ["dae-residual", "rec-error"], options=PredictorOptions(**o))
    ev = compute_maps(m, x, ["dae-residual", "rec-error"], options=PredictorOptions(evidence="intensity", **o))
    np.testing.assert_allclose(ev["dae-residual"], plain["dae-residual"] * intensity_evidence(torch.from_numpy(x),
                                                                                                  "bright").numpy(),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(ev["rec-error"], plain["rec-error"])  # unsigned maps: unchanged


def test_create_segment_drops_regions_below_the_minimum_size():
    """The panel's 'Create segment' on a real MRML scene: a one-voxel region is not in the segment, the large
    one is; a heatmap with only small regions above the threshold gives an empty segment and says why."""
    import SimpleITK as sitk
    import slicer
    from VAEAnomalyLib.logic import VAEAnomalyLogic, set_node_from_image
    scene = slicer.vtkMRMLScene()
    try:
        arr = np.zeros((12, 30, 30), np.float32)
        arr[3, 5, 5] = 2.0                  # 8 mm3
        arr[6:9, 10:16, 10:16] = 2.0        # 864 mm3
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((2.0, 2.0, 2.0))
        heat = slicer.vtkMRMLScalarVolumeNode()
        scene.AddNode(heat)
        set_node_from_image(heat, img)
        logic = VAEAnomalyLogic(scene)
        seg = logic.create_segment(heat, 1.0, min_region_mm3=20)
        sid = seg.GetSegmentation().GetSegmentIdBySegmentName("Anomaly")
        got = logic._segment_array(seg, sid, heat)
        assert got.sum() == 108 and not got[3, 5, 5]
        small = arr.copy()
        small[6:9] = 0
        heat2 = slicer.vtkMRMLScalarVolumeNode()
        scene.AddNode(heat2)
        img2 = sitk.GetImageFromArray(small)
        img2.SetSpacing((2.0, 2.0, 2.0))
        set_node_from_image(heat2, img2)
        seg2 = logic.create_segment(heat2, 1.0, min_region_mm3=20)  # valid, empty, and says why
        sid2 = seg2.GetSegmentation().GetSegmentIdBySegmentName("Anomaly")
        assert sid2 and not logic._segment_array(seg2, sid2, heat2).any()
        assert "region of at least 20 mm3" in logic.empty_reason
    finally:
        scene.Clear(1)


def test_create_segment_and_findings_use_the_heatmaps_region_peak(tmp_path):
    """Apply stores the model's region peak on the heatmap node (add_results, from the checkpoint's calibration);
    given it (the panel does at the calibrated threshold, PanelController.region_peak), 'Create segment' and the
    findings table keep only the regions that reach it, as `score --label --threshold auto` does; without it
    every region stays."""
    import shutil

    import SimpleITK as sitk
    import slicer
    from vaeanomaly.checkpoint import resolve_model, update_metadata
    from VAEAnomalyLib.logic import REGION_PEAK, VAEAnomalyLogic, region_peak_of
    arr = np.zeros((12, 30, 30), np.float32)
    arr[2:5, 3:8, 3:8] = 1.2                   # 75 voxels x 8 mm3, peak 1.2
    arr[6:9, 10:16, 10:16] = 1.5
    arr[7, 12, 12] = 3.0                       # 108 voxels, peak 3.0
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((2.0, 2.0, 2.0))
    p = tmp_path / "m.safetensors"
    shutil.copy(resolve_model("bvae-l64-b10-v2"), p)
    update_metadata(p, region_peaks={"rec-grad": 2.0})
    ck = load_checkpoint(p)
    scene = slicer.vtkMRMLScene()
    try:
        logic = VAEAnomalyLogic(scene)
        vol = slicer.vtkMRMLScalarVolumeNode()
        scene.AddNode(vol)
        from VAEAnomalyLib.logic import set_node_from_image
        set_node_from_image(vol, img)
        heat = logic.add_results(vol, {"rec-grad": img}, ck, "rec-grad")
        assert region_peak_of(heat) == 2.0
        seg = logic.create_segment(heat, 1.0, min_region_mm3=20, min_peak=region_peak_of(heat))
        got = logic._segment_array(seg, seg.GetSegmentation().GetSegmentIdBySegmentName("Anomaly"), heat)
        assert got.sum() == 108 and not got[3, 5, 5]
        _, _, found = logic.update_findings(heat, 1.0, vol, min_region_mm3=20, min_peak=region_peak_of(heat))
        assert len(found) == 1 and found[0]["peak"] == pytest.approx(3.0)
        _, _, found = logic.update_findings(heat, 1.0, vol, min_region_mm3=20)
        assert len(found) == 2
        heat.RemoveAttribute(REGION_PEAK)  # a heatmap without one (loaded by hand, an older model)
        assert region_peak_of(heat) is None
        logic.create_segment(heat, 1.0, seg, min_region_mm3=20, min_peak=9.0, overwrite=True)
        assert "reaches 9" in logic.empty_reason  # no region reaches the peak: an empty segment, and why
    finally:
        scene.Clear(1)


def test_each_map_has_its_own_defaults_and_old_thresholds_still_hold():
    """Unset options take the map's own defaults: the VAE maps keep the papers' settings (so thresholds calibrated
    before these options existed still hold), the DAE residual its measured ones; an explicit option overrides."""
    from vaeanomaly.ensemble import options_mismatch
    from vaeanomaly.registry import option_defaults
    d = PredictorOptions()
    assert d.for_map("rec-grad").smooth_mm == 0 and d.for_map("rec-grad").polarity == "both"
    assert d.for_map("dae-residual").to_dict() == {**d.to_dict(), **option_defaults("dae-residual")}
    assert PredictorOptions(polarity="bright").for_map("dae-residual").polarity == "bright"
    old = {"smooth": True, "smooth_sigma": 3.0, "smooth_kernel": 7}  # recorded before the new options existed
    assert options_mismatch(old, d, ["kl-grad"]) == []
    # rec-grad is now smoothed across slices by default: a threshold from before does not hold for it ...
    assert options_mismatch(old, d, ["rec-grad"]) == ["smooth_z_mm=10.0 (fitted/calibrated with 0.0)"]
    # ... but does for the ensemble, whose features are never smoothed across slices (only its own output could be)
    assert options_mismatch(old, d, ["rec-error", "kl-grad", "rec-grad"], output="ensemble") == []
    assert options_mismatch(old, PredictorOptions.preset("paper"), ["rec-grad"]) == []
    assert options_mismatch(old, PredictorOptions(polarity="bright", smooth_z_mm=0), ["rec-grad"]) == \
        ["polarity='bright' (fitted/calibrated with 'both')"]
    assert options_mismatch(old, PredictorOptions(polarity="bright"), ["kl-grad"]) == []  # unsigned: no polarity


def test_panel_switches_to_the_model_kinds_predictor():
    """Choosing the bundled DAE in the panel with Rec-grad selected: the predictor becomes dae-residual and the
    status says so; back to a VAE, dae-residual becomes rec-grad."""
    import slicer
    from VAEAnomalyLib.controller import Dialogs, PanelController, PanelParams
    scene = slicer.vtkMRMLScene()
    try:
        params = PanelParams(predictor="rec-grad")
        ctl = PanelController(scene, params, Dialogs())
        ctl.select_model("dae-64")
        assert params.predictor == "dae-residual" and "not computed by this model" in ctl.status
        assert "denoising autoencoder" in ctl.model_card
        ctl.select_model("bvae-l64-b10-v2")
        assert params.predictor == "rec-grad"
        params.predictor = "kl-grad"
        ctl.select_model("bvae-l64-b10")
        assert params.predictor == "kl-grad"  # a VAE computes it: kept
    finally:
        scene.Clear(1)


def test_smoothing_across_slices_in_millimetres():
    """smooth_z_mm: a Gaussian across the slices of one volume, sigma in mm at the slices' spacing. A whole slice
    lighting up alone (a 2D model's failure on one slice) is damped; a lesion spanning slices keeps its value."""
    from vaeanomaly.predictors import smooth_across_slices
    maps = np.zeros((48, 8, 8), np.float32)
    maps[10] = 1.0                      # one slice alone
    maps[22:34, 2:6, 2:6] = 1.0         # a blob 12 slices thick
    out = smooth_across_slices(maps, 4.0, 1.0)   # sigma 4 slices
    assert out[10].max() < 0.12 and out[28, 3, 3] > 0.8
    assert out.sum() == pytest.approx(maps.sum(), rel=1e-3)  # nothing lost inside the volume (far from its ends)
    # the same sigma in mm on thicker slices is fewer slices: 4 mm at 8 mm spacing smooths far less
    thick = smooth_across_slices(maps, 4.0, 8.0)
    assert thick[10].max() > 0.7
    assert np.array_equal(smooth_across_slices(maps, 0.5, 8.0), maps)  # under a tenth of a slice: unchanged
    # through compute_maps: the slice spacing given converts mm to slices; the paper preset has no such smoothing
    m = _dae()
    x, b = _slices(n=6)
    flat = compute_maps(m, x, ["dae-residual"], options=PredictorOptions(smooth_z_mm=0, normalise="none"),
                        brain=b)["dae-residual"]
    z = compute_maps(m, x, ["dae-residual"], options=PredictorOptions(smooth_z_mm=6.0, normalise="none"), brain=b,
                     slice_mm=2.0)["dae-residual"]
    from vaeanomaly.predictors import inner_brain
    ib = inner_brain(b, 4.0, 240 / 32, 2.0)  # (the default rim is applied after: compare inside it)
    np.testing.assert_allclose(z[ib], smooth_across_slices(flat, 6.0, 2.0)[ib], atol=1e-6)
    assert PredictorOptions.preset("paper").for_map("rec-grad").smooth_z_mm == 0
    assert PredictorOptions().for_map("rec-grad").smooth_z_mm > 0 and PredictorOptions().for_map("kl-grad").smooth_z_mm == 0


def test_calibration_thresholds_are_percentiles_of_the_maps_scoring_gives():
    """calibrate() finishes every map as compute_maps does (smoothing across slices at the case's spacing, the
    rim), and builds the ensemble from the maps before that step, as scoring does: each threshold is the 99th
    percentile of exactly what a scan of that case would be scored with."""
    from vaeanomaly.calibration import calibrate
    from vaeanomaly.ensemble import Ensemble
    from vaeanomaly.model import VAE
    torch.manual_seed(0)
    vae = VAE(latent_dim=4, image_size=32, channels=(4, 8, 8)).eval()
    x, b = _slices(n=8)
    ens = Ensemble(("rec-error", "kl-grad", "rec-grad"), [1.0, 0.5, 2.0], -1.0, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0],
                   options={"smooth": True, "smooth_sigma": 3.0, "smooth_kernel": 7, "smooth_mm": None,
                            "polarity": None, "evidence": None, "rim_mm": None, "smooth_z_mm": 0.0})
    opts = PredictorOptions(proj_steps=2)
    upd = calibrate(vae, 1.0, [("a", x, b, 2.0)], opts, ensemble=ens, max_projection_slices=4)
    maps = compute_maps(vae, x, ["rec-grad", "ensemble"], 1.0, opts, brain=b, slice_mm=2.0, ensemble=ens)
    for p in ("rec-grad", "ensemble"):
        assert upd["thresholds"][p] == pytest.approx(float(np.percentile(maps[p][b], 99)), rel=1e-5)
        assert upd["region_peaks"][p] == pytest.approx(float(np.percentile(maps[p][b], 99.9)), rel=1e-5)
        assert upd["region_peaks"][p] >= upd["thresholds"][p]
    assert upd["thresholds_options"]["smooth_z_mm"] is None  # the map's own default, recorded as such


def test_the_ensemble_may_weigh_the_scans_own_intensity():
    """'intensity' as an ensemble feature is the z-scored slice itself; the other features are the maps before the
    finishing steps (no smoothing across slices), as the ensemble was fitted on them."""
    from vaeanomaly.ensemble import Ensemble
    from vaeanomaly.model import VAE
    torch.manual_seed(1)
    vae = VAE(latent_dim=4, image_size=32, channels=(4, 8, 8)).eval()
    x, b = _slices(n=5)
    rng = np.random.default_rng(0)
    label = b & (rng.random(b.shape) < 0.2)
    raw = compute_maps(vae, x, ["rec-grad"], 1.0, PredictorOptions().unfinished(), brain=b)["rec-grad"]
    ens = Ensemble(("rec-grad", "intensity")).fit({"rec-grad": raw[b], "intensity": x[b]}, label[b],
                                                  options=PredictorOptions().unfinished())
    assert ens.options["smooth_z_mm"] == 0.0
    got = compute_maps(vae, x, ["ensemble", "rec-grad"], 1.0, PredictorOptions(), brain=b, slice_mm=1.0, ensemble=ens)
    logit = (np.stack([raw, x], -1) - ens.mean) / ens.scale @ ens.coef + ens.intercept
    np.testing.assert_allclose(got["ensemble"][b], (1 / (1 + np.exp(-logit)))[b], rtol=1e-5)
    assert not np.allclose(got["rec-grad"][b], raw[b])  # the rec-grad output itself is finished (across slices)
    # the finishing options act on the ensemble's own output, and never stop it (its features are unfinished)
    zs = compute_maps(vae, x, ["ensemble"], 1.0, PredictorOptions(smooth_z_mm=10), brain=b, slice_mm=1.0, ensemble=ens)
    assert not np.allclose(zs["ensemble"][b], got["ensemble"][b])
    with pytest.raises(ValueError, match="z-scored slices"):
        ens.predict_maps({"rec-grad": raw})


def test_the_bundled_sample_gives_one_finding_on_its_lesion():
    """The bundled sample with the default VAE's Rec-grad, its options and calibrated threshold (what Apply gave
    before the default became a DAE, docs/default_rule.md): one finding, on the lesion; no slice away from the
    lesion lights up (before the maps were smoothed across slices one slice near the vertex did, over half its
    brain: a false 7.4 ml finding). (The default dae-64 gives two regions there, one of them false: README.)"""
    import SimpleITK as sitk
    from vaeanomaly import findings
    from vaeanomaly.calibration import calibrated_threshold
    from vaeanomaly.checkpoint import sample_data
    from vaeanomaly.volume import score_volume
    img = sitk.ReadImage(str(sample_data("VAEAnomalySample_T2.nrrd")))
    lesion = sitk.GetArrayFromImage(sitk.ReadImage(str(sample_data("VAEAnomalySample_Lesion.nrrd")))) > 0
    from vaeanomaly.checkpoint import DEFAULT_VAE
    ck = load_checkpoint(DEFAULT_VAE)
    heat = score_volume(ck, img, None, ["rec-grad"])["rec-grad"]
    thr = calibrated_threshold(ck, "rec-grad")
    found = findings.find(heat, thr, img, min_mm3=100)
    assert len(found) == 1
    flagged = sitk.GetArrayFromImage(heat) > thr
    assert (flagged & lesion).sum() > 0.4 * flagged.sum()  # most of what is flagged is the lesion
    zs = np.flatnonzero(lesion.any((1, 2)))
    away = np.ones(len(flagged), bool)
    away[zs.min():zs.max() + 1] = False
    assert not flagged[away].any()


def test_score_keeps_regions_by_the_calibrated_region_peak(tmp_path):
    """`score --label/--findings --threshold auto`: the checkpoint's region peak for the predictor; none with
    --all-regions or another threshold (then every region is kept)."""
    import shutil

    from vaeanomaly.checkpoint import resolve_model, update_metadata
    from vaeanomaly.cli import build_parser, plan_score
    p = tmp_path / "m.safetensors"
    shutil.copy(resolve_model("bvae-l64-b10-v2"), p)
    update_metadata(p, region_peaks={"rec-grad": 2.5, "kl-grad": 0.5})
    t2 = tmp_path / "t2.nii.gz"
    t2.write_bytes(b"")  # not read: planning only checks paths

    def plan(*extra):
        a = build_parser().parse_args(["score", str(t2), "-o", str(tmp_path / "h.nii.gz"), "--model", str(p),
                                       "--threshold", "auto", "--label", str(tmp_path / "l.nii.gz"), *extra])
        a.input = a.input[0]  # one volume (cmd_score does this)
        return plan_score(a)
    assert plan().region_peaks == {"rec-grad": 2.5}
    assert plan("--all-regions").region_peaks == {"rec-grad": None}
    assert plan("--threshold", "p99").region_peaks == {"rec-grad": None}  # a percentile: every region
    assert plan("--threshold", "0.5").region_peaks == {"rec-grad": None}
    assert plan("--predictor", "kl-grad").region_peaks == {"kl-grad": 0.5}


def test_brain_crops_lie_inside_the_slice_and_on_brain():
    from vaeanomaly.dae import brain_crops
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(4 * 32 * 32, dtype=torch.float32).reshape(4, 1, 32, 32)
    brain = torch.zeros(4, 1, 32, 32)
    brain[0, 0, 0:3, 0:3] = 1        # brain in a corner: the crop is shifted inside the slice
    brain[1, 0, 20:24, 25:30] = 1
    brain[2, 0, 10:12, 10:12] = 1    # slice 3: no brain at all
    cx, cb = brain_crops(x, brain, 8, gen)
    assert cx.shape == cb.shape == (4, 1, 8, 8)
    for i in range(4):  # every crop is a contiguous 8x8 window of its own slice
        top, left = divmod(int(cx[i, 0, 0, 0] - i * 1024), 32)
        assert 0 <= top <= 24 and 0 <= left <= 24
        assert torch.equal(cx[i, 0], x[i, 0, top:top + 8, left:left + 8])
        assert torch.equal(cb[i, 0], brain[i, 0, top:top + 8, left:left + 8])
    assert cb[:3].flatten(1).sum(1).min() > 0  # the slices with brain: the crop holds some of it
    with pytest.raises(ValueError, match="larger"):
        brain_crops(x, brain, 64, gen)
