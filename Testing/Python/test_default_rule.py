"""The default's rule (training/choose_default.py) and the fusion candidates it can weigh (training/try_fusion.py)."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

import choose_default
import try_fusion
from vaeanomaly.calibration import calibrate, calibrated_tails
from vaeanomaly.checkpoint import save_checkpoint, update_metadata
from vaeanomaly.model import VAE
from vaeanomaly.predictors import PredictorOptions, compute_maps

from test_two_tailed import _case, _dae

FIELDS = ["scorer", "family", "domain", "n_cases", "auroc", "ap", "dice_calibrated", "healthy_flagged_pct",
          "false_regions_per_healthy_scan"]


def _rows(scorer, auroc, healthy):
    return [{"scorer": scorer, "family": fam, "domain": dom, "n_cases": 1, "auroc": auroc + d, "ap": 0.1 + d,
             "dice_calibrated": 0.2, "healthy_flagged_pct": healthy, "false_regions_per_healthy_scan": 1.0}
            for fam in ("glioma", "ms") for dom, d in (("tse", 0.0), ("tse-3d", 0.01))]


def _write(path, rows, fields):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return str(path)


def test_a_candidate_loud_on_another_healthy_population_is_out(tmp_path):
    rows = _rows("intensity (64x64)", 0.6, 1.0) + _rows("fusion best", 0.9, 1.0) + _rows("fusion second", 0.8, 1.0)
    table = _write(tmp_path / "validation.csv", rows, FIELDS)
    out = tmp_path / "rule.md"
    assert choose_default.main([table, "--sizes", "fusion=64", "--out", str(out)]) == 0
    assert "**Winner: fusion best**" in out.read_text()
    # another population where the better detector flags 4 % of healthy brain: the rule passes to the quiet one
    pops = _write(tmp_path / "pops.csv", [{"scorer": "fusion best", "population": "legacy (4)", "flagged_pct": 4.0},
                                          {"scorer": "fusion second", "population": "legacy (4)", "flagged_pct": 0.5}],
                  ["scorer", "population", "flagged_pct"])
    assert choose_default.main([table, "--sizes", "fusion=64", "--populations", pops, "--out", str(out)]) == 0
    text = out.read_text()
    assert "**Winner: fusion second**" in text and "legacy (4) 4.00" in text and "**no** (1.00)" in text
    figs = choose_default.figures(choose_default.load_rows([table]), {"fusion": 64})
    assert figs["fusion best"]["auroc_wins"] == 4 and figs["fusion best"]["cells"] == 4  # beats its grid's intensity


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny VAE and a tiny DAE on one 32x32 grid, each calibrated by calibrate() on the same healthy volumes (one
    projection step: Proj-Rec-Error is no fusion input, and its step count changes no other threshold)."""
    cases = [("a", *_case(1), 2.0), ("b", *_case(2), 3.0)]
    d = tmp_path_factory.mktemp("pair")
    torch.manual_seed(0)
    vae = VAE(latent_dim=8, image_size=32, channels=(8, 8, 16)).eval()
    models = {}
    for name, m in (("v", vae), ("d", _dae())):
        path = save_checkpoint(d / f"{name}.safetensors", m, {"name": name, "beta": 1.0,
                                                              "preprocessing": {"image_size": 32}})
        models[name] = update_metadata(path, **calibrate(m, 1.0, cases, PredictorOptions(proj_steps=1)))
    return models["v"], models["d"], cases


def test_fusion_scores_are_in_units_of_each_models_calibrated_threshold(pair):
    vae, dae, cases = pair
    f = try_fusion.Fusion(vae, dae)
    x, brain = _case(7)
    s = compute_maps(dae.model, x, ["dae-residual"], 1.0, PredictorOptions(polarity="signed"), brain=brain,
                     slice_mm=2.0)["dae-residual"]
    tails = calibrated_tails(dae, "dae-residual", PredictorOptions(polarity="signed"))
    flagged = (s > tails["bright"]["threshold"]) | (s < -tails["dark"]["threshold"])  # what --polarity signed flags
    signed = f.score("dae-signed", x, brain, (1, 1, 2.0))
    assert ((signed > 1) == flagged).all() and flagged.any()
    v, d = f.score("vae", x, brain, (1, 1, 2.0)), f.score("dae", x, brain, (1, 1, 2.0))
    assert np.allclose(f.score("mean", x, brain, (1, 1, 2.0)), (v + d) / 2)
    assert np.allclose(f.score("geo", x, brain, (1, 1, 2.0)), np.sqrt(np.clip(v, 0, None) * signed))
    # on the calibration volumes themselves, each map flags about its calibrated 1 % of brain
    pooled = np.concatenate([f.score("dae", c[1], c[2], (1, 1, c[3]))[c[2]] for c in cases])
    assert 0.5 < 100 * np.mean(pooled > 1) < 2.0


def test_the_ensemble_candidate_scores_a_domain_by_a_fit_without_it(pair):
    vae, dae, _ = pair
    f = try_fusion.Fusion(vae, dae)
    cases, groups = [], {}
    for i, dom in enumerate(("tse", "tse", "tse-3d", "tse-3d")):
        x, brain = _case(10 + i)
        label = np.zeros_like(brain)
        label[:, 10:16, 10:16] = True
        x = np.where(label, x + 2.0 + i, x)  # a bright lesion, of another contrast in each case
        cases.append((f"c{i}", x, brain, label))
        groups[f"c{i}"] = (dom, "glioma")
    f.fit_lr(cases, groups, {})
    assert set(f.lr_by_domain) == {"tse", "tse-3d"}
    x, brain, label = cases[0][1], cases[0][2], cases[0][3]
    held_out = f.score("lr", x, brain, None, "tse")
    assert not np.allclose(held_out, f.score("lr", x, brain, None, None))  # another fit than the one on all cases
    assert held_out[label].mean() > held_out[brain & ~label].mean()  # and still finds the bright lesion
