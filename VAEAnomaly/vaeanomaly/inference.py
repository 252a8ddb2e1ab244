"""What scoring takes from a checkpoint's calibration: the ensemble and Combi's normalisation constants.

Kept apart from calibration.py (which computes the calibration and calls the verdict's hook) so that
the code that scores a volume (volume.py, verdict.py, cohort.py) does not depend on the code that
calibrates: no import cycle between them.
"""
from __future__ import annotations

import warnings
from typing import Optional

from .ensemble import options_mismatch
from .predictors import PredictorOptions
from .registry import ENSEMBLE

RECALIBRATE = ("re-calibrate the checkpoint with `python training/calibrate.py CHECKPOINT --cache HEALTHY.npz` "
               "(held-out healthy subjects)")


def combi_constants(checkpoint, options: Optional[PredictorOptions] = None, warn: bool = True):
    """(min, max) for Combi's normalisation when the checkpoint has constants for these options, else
    None (Combi is then normalised over the scored volume, with a warning)."""
    opts = options or PredictorOptions()
    c = checkpoint.combi_normalisation
    problem = None
    if not c:
        problem = "the checkpoint has no Combi normalisation constants (an older calibration)"
    elif options_mismatch(c.get("options", {}), opts, ["kl-grad"]):
        problem = "the checkpoint's Combi constants hold for other smoothing settings"
    if problem:
        if warn:
            warnings.warn(f"{problem}: Combi is normalised over this volume, so its values depend on the crop; "
                          f"{RECALIBRATE}", stacklevel=2)
        return None
    return float(c["min"]), float(c["max"])


def inference_kwargs(checkpoint, predictors, options: Optional[PredictorOptions] = None) -> dict:
    """The checkpoint-held extras compute_maps needs for these predictors: the ensemble (checked against
    the options), Combi's constants and the model grid's pixel size (smoothing in mm)."""
    prep = checkpoint.preprocessing or {}
    kw = {"pixel_mm": float(prep.get("fov_mm", 240.0)) / float(prep.get("image_size", checkpoint.model.image_size))}
    if ENSEMBLE in predictors:
        kw["ensemble"] = checkpoint.ensemble
    if "combi" in predictors:
        kw["combi_norm"] = combi_constants(checkpoint, options)
    return kw
