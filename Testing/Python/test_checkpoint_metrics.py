import json

import numpy as np
import pytest
import torch

from vaeanomaly.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, update_metadata
from vaeanomaly.ensemble import Ensemble
from vaeanomaly.metrics import dice, pixel_metrics, scoped_metrics
from vaeanomaly.model import VAE


def test_roundtrip_fp16_and_metadata(tmp_path):
    torch.manual_seed(0)
    m = VAE(latent_dim=8)
    p = save_checkpoint(tmp_path / "m.safetensors", m, {"beta": 10.0, "thresholds": {"rec-grad": 0.5}}, fp16=True)
    ck = load_checkpoint(p)
    assert ck.beta == 10.0 and ck.model.latent_dim == 8 and ck.thresholds == {"rec-grad": 0.5}
    for k, v in m.state_dict().items():
        assert torch.allclose(ck.model.state_dict()[k], v, atol=2e-3, rtol=2e-3)
    e = Ensemble(["rec-error"], [1.0], 0.0, [0.0], [1.0])
    ck2 = update_metadata(p, ensemble=e.to_dict())
    assert ck2.ensemble.features == ("rec-error",) and ck2.beta == 10.0
    assert "VAE l=8" in ck2.card() or "β-VAE l=8" in ck2.card()


def test_bad_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint file or bundled model"):
        load_checkpoint(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")
    good = save_checkpoint(tmp_path / "g.safetensors", VAE(latent_dim=8), {"beta": 1.0})
    data = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt, truncated"):
        load_checkpoint(tmp_path / "trunc.safetensors")
    (tmp_path / "pickle.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 100)  # a pickle is not read
    with pytest.raises(CheckpointError, match="corrupt, truncated"):
        load_checkpoint(tmp_path / "pickle.safetensors")
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(3)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="not a VAEAnomaly checkpoint"):
        load_checkpoint(tmp_path / "foreign.safetensors")
    sd = VAE(latent_dim=8).state_dict()
    meta = {"format": "vaeanomaly-checkpoint/1", "model": {"architecture": "zimmerer2019-vae", "latent_dim": 16,
                                                           "image_size": 64, "channels": [16, 32, 64, 256]}}
    save_file(dict(sd), str(tmp_path / "mismatch.safetensors"), metadata={"vaeanomaly": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(tmp_path / "mismatch.safetensors")
    meta["format"] = "other/9"
    save_file(dict(sd), str(tmp_path / "fmt.safetensors"), metadata={"vaeanomaly": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="this library reads"):
        load_checkpoint(tmp_path / "fmt.safetensors")


def test_metrics():
    y = np.zeros((4, 8, 8), bool)
    y[1, 2:5, 2:5] = True
    perfect = y * 2.0 + 0.1
    r = pixel_metrics(perfect, y)
    assert r["auroc"] == 1.0 and r["ap"] == pytest.approx(1.0) and r["dice"] == pytest.approx(1.0)
    assert 0.1 < r["dice_threshold"] <= 2.1
    rnd = np.random.default_rng(0).random((200, 64))
    yy = np.random.default_rng(1).random((200, 64)) < 0.2
    assert abs(pixel_metrics(rnd, yy)["auroc"] - 0.5) < 0.03
    mask = np.zeros_like(y)
    mask[1] = True
    s = scoped_metrics(perfect, y, mask)
    assert set(s) == {"brain", "all"}
    with pytest.raises(ValueError, match="both lesion and healthy"):
        pixel_metrics(perfect, np.zeros_like(y))
    with pytest.raises(ValueError, match="NaN"):
        pixel_metrics(np.full(y.shape, np.nan), y)
    from sklearn.metrics import average_precision_score, roc_auc_score
    ties = np.round(rnd * 10) + yy * 0.5  # many tied scores
    r = pixel_metrics(ties, yy)
    assert r["auroc"] == pytest.approx(roc_auc_score(yy.ravel(), ties.ravel()), abs=1e-12)
    assert r["ap"] == pytest.approx(average_precision_score(yy.ravel(), ties.ravel()), abs=1e-12)
    pred = ties >= r["dice_threshold"]
    assert dice(pred, yy) == pytest.approx(r["dice"], abs=1e-12)
    assert dice(y, y) == 1.0 and dice(y, ~y) == 0.0
