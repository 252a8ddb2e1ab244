"""The GPU when there is one (issue 25): `--device auto` is the command line's default, and the panel's Use GPU
is ticked on a new parameter node when PyTorch sees CUDA (a saved choice is kept)."""
from __future__ import annotations

import pytest
import torch

from vaeanomaly import cli
from vaeanomaly.scoring import pick_device


def test_auto_picks_cuda_only_when_pytorch_sees_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == "cuda"

    def broken():
        raise RuntimeError("CUDA driver initialization failed")
    monkeypatch.setattr(torch.cuda, "is_available", broken)
    assert pick_device("auto") == "cpu"  # a broken CUDA install never stops a scan
    assert pick_device("cpu") == "cpu"


def test_the_command_line_defaults_to_auto():
    p = cli.build_parser()
    assert p.parse_args(["score", "in.nii.gz", "-o", "out.nii.gz"]).device == "auto"
    assert p.parse_args(["adapt", "a.nii.gz", "-o", "m.safetensors"]).device == "auto"


def test_use_gpu_is_ticked_on_a_new_node_when_cuda_is_seen_and_a_saved_choice_is_kept():
    slicer = pytest.importorskip("slicer")
    from VAEAnomalyLib.controller import PanelController, PanelParams
    scene = slicer.vtkMRMLScene()
    fresh = PanelParams()
    ctl = PanelController(scene, None, gpu_available=lambda: True)
    ctl.set_params(fresh)  # as the Widget's setParameterNode does
    assert fresh.useGPU and fresh.gpuDefaultSet
    # the user unticks it; the node is saved and loaded again: their choice stays
    fresh.useGPU = False
    ctl.set_params(fresh)
    assert not fresh.useGPU
    no_gpu = PanelParams()
    ctl2 = PanelController(scene, None, gpu_available=lambda: False)
    ctl2.set_params(no_gpu)
    assert not no_gpu.useGPU and no_gpu.gpuDefaultSet

    def raises():
        raise OSError("libcuda.so: cannot open shared object file")
    broken = PanelParams()
    ctl3 = PanelController(scene, None, gpu_available=raises)
    ctl3.set_params(broken)
    assert not broken.useGPU
    for c in (ctl, ctl2, ctl3):
        c.close()


def test_the_panel_opens_on_the_default_models_own_predictor_and_adapts_a_vae():
    """Whatever the default (checkpoint.DEFAULT_MODEL, chosen by docs/default_rule.md) is, the panel's predictor is
    that model's own, read from the file without torch; adaptation (a VAE's) starts from the default VAE, and the
    adapt section offers a chosen VAE itself, else the default VAE."""
    from vaeanomaly.checkpoint import DEFAULT_MODEL, DEFAULT_VAE, load_checkpoint
    from vaeanomaly.registry import DEFAULT_PREDICTORS
    from VAEAnomalyLib.panel import MODELS_DIR, adapt_base_for, default_predictor, default_vae, model_kind_of_file
    for name in ("dae-64", "dae-128-blobs", "bvae-l64-b10-v2", "vae-l64-b1"):
        assert model_kind_of_file(MODELS_DIR / f"{name}.safetensors") == load_checkpoint(name).kind
    assert default_predictor() == DEFAULT_PREDICTORS[load_checkpoint(DEFAULT_MODEL).kind]
    assert default_vae() == DEFAULT_VAE and load_checkpoint(DEFAULT_VAE).kind == "vae"
    assert adapt_base_for("vae-l64-b1") == "vae-l64-b1"
    assert adapt_base_for("dae-128-blobs") == DEFAULT_VAE
    assert adapt_base_for("not-a-model") == DEFAULT_VAE


def test_adaptation_refuses_a_denoising_autoencoder_with_what_to_choose(tmp_path):
    from vaeanomaly.adapt import AdaptError, AdaptOptions, adapt
    from vaeanomaly.checkpoint import DEFAULT_VAE
    scans = []
    import numpy as np
    import SimpleITK as sitk
    for i in range(3):
        img = sitk.GetImageFromArray(np.random.default_rng(i).random((20, 30, 30)).astype(np.float32))
        scans.append(tmp_path / f"s{i}.nii.gz")
        sitk.WriteImage(img, str(scans[-1]))
    with pytest.raises(AdaptError, match=f"denoising autoencoder.*--model {DEFAULT_VAE}"):
        adapt(scans, tmp_path / "a.safetensors", model="dae-64", options=AdaptOptions(minutes=0.01, max_epochs=1))
