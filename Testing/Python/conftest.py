"""Shared fixtures: a small generated cohort and a tiny model trained on it for seconds."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "VAEAnomaly"))
sys.path.insert(0, str(ROOT / "training"))
sys.path.insert(0, str(ROOT / "VAEAnomaly" / "VAEAnomalyLib" / ".."))
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def cohort(tmp_path_factory):
    """3 healthy (HCP layout) + 2 lesion (BraTS layout) generated subjects and their caches (the lesion cases'
    anatomy sampled every 2 mm: about 15x faster to generate; the acquisition grid is the same)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from vaeanomaly.data import brats_items, build_cache, healthy_items
    from vaeanomaly.synth import write_one
    d = tmp_path_factory.mktemp("cohort")
    jobs = [(d / "healthy", i, False, 0, 1) for i in range(3)] + [(d / "lesion", i, True, 1, 2) for i in range(2)]
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:  # numpy: one core each
        list(pool.map(write_one, *zip(*jobs)))
    build_cache(healthy_items(d / "healthy"), min_brain_fraction=0.05).save(d / "healthy.npz")
    build_cache(brats_items(d / "lesion")).save(d / "lesion.npz")
    return d


@pytest.fixture(scope="session")
def tiny_checkpoint(cohort):
    """A real model, trained for a few epochs by training/train.py on the generated cohort."""
    import train
    out = cohort / "tiny.safetensors"
    train.main(["--cache", str(cohort / "healthy.npz"), "--out", str(out), "--epochs", "4",
                "--latent", "16", "--beta", "1", "--device", "cpu", "--batch-size", "32"])
    return out


@pytest.fixture
def random_model():
    from vaeanomaly.model import VAE
    torch.manual_seed(0)
    return VAE(latent_dim=8).eval()


def make_phantom(size=(60, 70, 40), spacing=(1.0, 1.0, 1.0), direction=None, origin=(0.0, 0.0, 0.0),
                 blob_index=None, blob_value=3.0):
    """An ellipsoidal 'brain' with smooth texture and an optional bright blob (index in x, y, z)."""
    z, y, x = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
    c = [(n - 1) / 2 for n in size]
    r = ((x - c[0]) / (0.42 * size[0])) ** 2 + ((y - c[1]) / (0.42 * size[1])) ** 2 + ((z - c[2]) / (0.42 * size[2])) ** 2
    arr = np.where(r < 1, 1.0 + 0.2 * np.sin(x / 3.0) * np.cos(y / 4.0), 0).astype(np.float32)
    if blob_index is not None:
        bx, by, bz = blob_index
        d2 = ((x - bx) * spacing[0]) ** 2 + ((y - by) * spacing[1]) ** 2 + ((z - bz) * spacing[2]) ** 2
        arr += np.where(r < 1, blob_value * np.exp(-d2 / (2 * 5.0 ** 2)), 0).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(tuple(np.asarray(direction, float).ravel()))
    return img


def oblique_direction(deg=20.0, flip_x=True):
    t = np.deg2rad(deg)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]]) @ \
        np.array([[1, 0, 0], [0, np.cos(t / 2), -np.sin(t / 2)], [0, np.sin(t / 2), np.cos(t / 2)]])
    return rot @ np.diag([-1.0 if flip_x else 1.0, 1.0, 1.0])


@pytest.fixture
def scene():
    """A real MRML scene (slicer-core) with a colour logic, cleared afterwards."""
    import slicer
    s = slicer.vtkMRMLScene()
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLScene(s)
    yield s
    s.Clear(1)


def write_dicom_series(folder, img, positions=None, uid="1.2.826.0.1.3680043.2.1125.1"):
    """A DICOM series of `img` (int16, one file per slice; positions: the slices' z in mm, default the image's)."""
    import locale
    saved = locale.setlocale(locale.LC_ALL)  # GDCM's writer leaves the process in the "C" locale: restored below,
    try:                                     # else later tests decode their subprocesses' UTF-8 output as ASCII
        _write_dicom_series(folder, img, positions, uid)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_dicom_series(folder, img, positions, uid):
    folder.mkdir(parents=True, exist_ok=True)
    w = sitk.ImageFileWriter()
    w.KeepOriginalImageUIDOn()
    img = sitk.Cast(img, sitk.sitkInt16)
    for i in range(img.GetDepth()):
        s = img[:, :, i]
        for k, v in (("0020|000e", uid), ("0020|000d", "1.2.3"), ("0008|0060", "MR"),
                     ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0020|0013", str(i + 1))):
            s.SetMetaData(k, v)
        z = positions[i] if positions is not None else img.TransformIndexToPhysicalPoint((0, 0, i))[2]
        s.SetMetaData("0020|0032", f"0\\0\\{z}")
        w.SetFileName(str(folder / f"{uid[-1]}_{i:03d}.dcm"))
        w.Execute(s)
