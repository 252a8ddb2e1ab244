import numpy as np
import pytest
import torch

from vaeanomaly.ensemble import Ensemble
from vaeanomaly.model import VAE, kl_loss, rec_loss
from vaeanomaly.predictors import (PREDICTORS, PredictorOptions, _fused_batch, compute_maps,
                                   parse_predictors, reference_map)


def test_architecture_shapes():
    m = VAE(latent_dim=32)
    x = torch.randn(3, 1, 64, 64)
    mu, ls = m.encode(x)
    assert mu.shape == ls.shape == (3, 32)
    assert m.decode(mu).shape == (3, 1, 64, 64)
    convs = [l for l in m.modules() if isinstance(l, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert all(c.bias is None for c in convs)
    assert [c.out_channels for c in m.encoder if isinstance(c, torch.nn.Conv2d)] == [16, 32, 64, 256, 64]
    with pytest.raises(ValueError):
        VAE(image_size=128)


def test_gradients_match_finite_differences():
    torch.manual_seed(1)
    m = VAE(latent_dim=4).double().eval().requires_grad_(False)
    x = torch.randn(2, 1, 64, 64, dtype=torch.float64)
    r = _fused_batch(m, x, {"elbo-grad"})

    def losses(xx):
        mu, ls = m.encode(xx)
        return rec_loss(xx, m.decode(mu)).sum(), kl_loss(mu, ls).sum()

    rng = np.random.default_rng(0)
    eps = 1e-5
    for _ in range(6):
        b, i, j = rng.integers(2), rng.integers(64), rng.integers(64)
        xp, xm = x.clone(), x.clone()
        xp[b, 0, i, j] += eps
        xm[b, 0, i, j] -= eps
        (rp, kp), (rm, km) = losses(xp), losses(xm)
        assert float((rp - rm) / (2 * eps)) == pytest.approx(float(r["g_rec"][b, 0, i, j]), rel=1e-4, abs=1e-7)
        assert float((kp - km) / (2 * eps)) == pytest.approx(float(r["g_kl"][b, 0, i, j]), rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("smooth", [True, False])
def test_fused_equals_one_at_a_time(random_model, smooth):
    x = np.random.default_rng(0).normal(size=(10, 64, 64)).astype(np.float32)
    opts = PredictorOptions.preset("paper", smooth=smooth, proj_steps=5, batch_size=4)  # several batches: Combi per volume
    fused = compute_maps(random_model, x, PREDICTORS, beta=2.0, options=opts)
    for name in PREDICTORS:
        ref = reference_map(random_model, x, name, beta=2.0, options=opts)
        np.testing.assert_allclose(fused[name], ref, rtol=1e-4, atol=1e-6 * float(np.abs(ref).max()), err_msg=name)


def test_elbo_grad_is_combination_of_signed_grads(random_model):
    x = np.random.default_rng(1).normal(size=(3, 64, 64)).astype(np.float32)
    opts = PredictorOptions(smooth=False)
    maps = compute_maps(random_model, x, ["elbo-grad", "kl-grad", "rec-grad"], beta=10.0, options=opts)
    assert not np.allclose(maps["elbo-grad"], maps["rec-grad"] + 10 * maps["kl-grad"])  # |a+b| != |a|+|b|
    assert (maps["elbo-grad"] <= maps["rec-grad"] + 10 * maps["kl-grad"] + 1e-4).all()  # triangle inequality


def test_projection_variants(random_model):
    x = np.random.default_rng(2).normal(size=(2, 64, 64)).astype(np.float32)
    zero = compute_maps(random_model, x, ["proj-rec-error", "rec-error"], options=PredictorOptions(proj_steps=0))
    np.testing.assert_allclose(zero["proj-rec-error"], zero["rec-error"], rtol=1e-5, atol=1e-6)
    plain = compute_maps(random_model, x, ["proj-rec-error"], options=PredictorOptions(proj_steps=10, proj_lambda=0))
    weighted = compute_maps(random_model, x, ["proj-rec-error"],
                            options=PredictorOptions(proj_steps=10, proj_lambda=0, proj_weighted=True))
    assert not np.allclose(plain["proj-rec-error"], zero["rec-error"])
    assert not np.allclose(plain["proj-rec-error"], weighted["proj-rec-error"])


def test_cancel_and_progress(random_model):
    x = np.zeros((8, 64, 64), np.float32)
    seen = []
    compute_maps(random_model, x, ["rec-grad"], options=PredictorOptions(batch_size=2), progress=seen.append)
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0)
    from vaeanomaly.predictors import Cancelled
    with pytest.raises(Cancelled):
        compute_maps(random_model, x, ["rec-grad"], cancel=lambda: True)


def test_parse_predictors():
    assert parse_predictors("all") == list(PREDICTORS)
    assert parse_predictors("rec-grad,kl-grad") == ["rec-grad", "kl-grad"]
    with pytest.raises(ValueError, match="unknown predictor"):
        parse_predictors("rec_grad")


def test_ensemble_fit_predict_roundtrip(random_model):
    rng = np.random.default_rng(0)
    y = rng.random((4, 64, 64)) < 0.1
    maps = {"rec-error": y * 2.0 + rng.random(y.shape), "kl-grad": rng.random(y.shape),
            "rec-grad": y * 1.0 + rng.random(y.shape)}
    e = Ensemble().fit(maps, y)
    p = e.predict_maps(maps)
    assert p.shape == y.shape and 0 <= p.min() and p.max() <= 1
    from sklearn.metrics import roc_auc_score
    assert roc_auc_score(y.ravel(), p.ravel()) > 0.95
    e2 = Ensemble.from_dict(e.to_dict())
    np.testing.assert_allclose(e2.predict_maps(maps), p)
    with pytest.raises(ValueError, match="both lesion and healthy"):
        Ensemble().fit(maps, np.zeros_like(y))
    with pytest.raises(ValueError, match="ensemble weights"):
        compute_maps(random_model, np.zeros((1, 64, 64), np.float32), ["ensemble"])


@pytest.mark.parametrize("subset", [["kl-grad"], ["rec-grad"], ["combi"], ["elbo-grad", "rec-error"]])
def test_subsets_equal_the_full_call(random_model, subset):
    x = np.random.default_rng(3).normal(size=(5, 64, 64)).astype(np.float32)
    full = compute_maps(random_model, x, PREDICTORS[:5], beta=0.5)
    part = compute_maps(random_model, x, subset, beta=0.5)
    assert list(part) == subset
    for k in subset:
        np.testing.assert_allclose(part[k], full[k], rtol=1e-5, atol=1e-7)


def test_smoothing_equals_2d_gaussian_convolution():
    from vaeanomaly.predictors import gaussian_kernel, smooth
    x = torch.rand(3, 2, 64, 64)
    opts = PredictorOptions()
    g = gaussian_kernel(opts.smooth_sigma, opts.smooth_kernel)
    k2d = (g[:, None] * g[None, :])[None, None]
    ref = torch.nn.functional.conv2d(x.reshape(6, 1, 64, 64), k2d, padding=opts.smooth_kernel // 2).reshape(3, 2, 64, 64)
    torch.testing.assert_close(smooth(x, opts), ref, rtol=1e-5, atol=1e-6)


def test_deterministic(random_model):
    x = np.random.default_rng(4).normal(size=(6, 64, 64)).astype(np.float32)
    opts = PredictorOptions(proj_steps=3, batch_size=4)
    a = compute_maps(random_model, x, PREDICTORS, options=opts)
    b = compute_maps(random_model, x, PREDICTORS, options=opts)
    for k in PREDICTORS:
        assert np.array_equal(a[k], b[k]), k
