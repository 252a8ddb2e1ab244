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
