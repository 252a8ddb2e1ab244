"""One registry of what can be computed and of the defaults everyone uses.

The CLI, the Slicer panel and its parameter node, the checkpoint metadata, training and the tests
all enumerate these entries; nothing else spells out a predictor's name, title or default.
Numerical option defaults live in one dataclass, `predictors.PredictorOptions`.
A leaf: this module imports nothing of the package (predictors.py and everyone else import it).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PredictorInfo:
    name: str
    title: str
    description: str
    calibrated: bool = True      # the checkpoint can hold a healthy-brain threshold for it
    projection: bool = False     # runs the iterative projection (slow)
    models: tuple = ("vae",)     # the model kinds that compute it: 'vae' (VAE / β-VAE), 'dae' (denoising AE)
    signed: bool = False         # has a direction (brighter / darker than expected): follows the polarity option
    defaults: tuple = ()         # (option, value) pairs: this map's own defaults for options left unset (None)


# Options a map takes when the user leaves them unset (None): the papers' settings (the reference code's pixel
# kernel, absolute maps, no intensity evidence), except where a map declares its own (measured on the validation
# split, docs/validation.md).
BASE_DEFAULTS = {"smooth_mm": 0.0, "smooth_z_mm": 0.0, "polarity": "both", "evidence": "none", "rim_mm": 0.0,
                 "normalise": "none"}
# Through-plane smoothing (smooth_z_mm, sigma in mm across slices): a 2D model scores each slice alone, so its
# errors are independent from slice to slice while a lesion is a 3D blob; averaging across slices in mm keeps the
# lesion and damps single-slice failures (a whole slice lighting up). Rec-grad: 10 mm, about its in-plane sigma
# (3 px = 11 mm), so the smoothing is near isotropic; on the validation split (docs/validation.md) it raised the
# mean AUROC over the five lesion families from 0.58 to 0.68 and cut false regions per healthy scan from 11.0 to 2.7.
REC_GRAD_DEFAULTS = (("smooth_z_mm", 10.0),)
# dae-residual: sigma 4 mm, both signs, no intensity evidence, a 4 mm rim: the best mean AUROC over the five lesion
# families of the validation split (docs/validation.md); 'bright' had the best AP but lost the hypointense lesions
# smooth_z_mm 8: mean AUROC 0.727 -> 0.746, false regions per healthy scan 15.0 -> 4.3 on the validation split
# normalise 'median': the residual in units of the scan's own median residual. A denoiser's residual carries the
# scanner's noise and blur, so one absolute threshold flags a whole scan from a noisier or blurrier scanner; on the
# validation split the healthy brain flagged in the worst of its three domains fell from 11.1% to 2.5% (dae-128-blobs,
# docs/validation.md).
NORMALISE = ("none", "median")
DAE_DEFAULTS = (("smooth_mm", 4.0), ("smooth_z_mm", 8.0), ("polarity", "both"), ("evidence", "none"),
                ("rim_mm", 4.0), ("normalise", "median"))

PREDICTOR_INFO: dict[str, PredictorInfo] = {p.name: p for p in (
    PredictorInfo("rec-grad", "Rec-grad",
                  "d L_rec / d x: gradient of the reconstruction error w.r.t. the image (smoothed; positive where "
                  "the scan is brighter than the model expects). Best or equal-best in the paper.", signed=True,
                  defaults=REC_GRAD_DEFAULTS),
    PredictorInfo("elbo-grad", "ELBO-grad",
                  "d (L_rec + beta L_KL) / d x: gradient of the whole ELBO (smoothed).", signed=True),
    PredictorInfo("kl-grad", "KL-grad",
                  "|d L_KL / d x|: gradient of the KL term alone (Zimmerer et al.; smoothed)."),
    PredictorInfo("rec-error", "Rec-Error",
                  "(x - x̂)^2: plain pixel-wise reconstruction error (x̂: the VAE's or the denoiser's output).",
                  models=("vae", "dae")),
    PredictorInfo("combi", "Combi",
                  "normalised KL-grad times the reconstruction error (Zimmerer et al.)."),
    PredictorInfo("proj-rec-error", "Proj-Rec-Error",
                  "reconstruction error after the iterative projection of Dehaene et al. (slow).",
                  projection=True),
    PredictorInfo("ensemble", "Ensemble",
                  "logistic regression on Rec-Error, KL-grad and Rec-grad per pixel (needs a checkpoint "
                  "that carries ensemble weights)."),
    PredictorInfo("dae-residual", "DAE residual",
                  "x - f(x): what a coarse-noise denoising autoencoder (Kascenas et al. 2022) removes from the scan "
                  "(smoothed; positive where the scan is brighter than a healthy brain would be).",
                  models=("dae",), signed=True, defaults=DAE_DEFAULTS),
)}

DEFAULT_PREDICTOR = "rec-grad"
PAPER_PREDICTORS = ("rec-error", "elbo-grad", "kl-grad", "rec-grad", "combi", "proj-rec-error")
DAE_PREDICTORS = ("dae-residual", "rec-error")
DEFAULT_PREDICTORS = {"vae": DEFAULT_PREDICTOR, "dae": "dae-residual"}  # per model kind
# signed maps: |value|, brighter than expected only, darker only, or the map with its sign (positive: brighter than
# expected; thresholded per tail with the checkpoint's two-tailed calibration: calibration.calibrated_tails)
POLARITIES = ("both", "bright", "dark", "signed")
DIRECTIONS = {"bright": "brighter than expected", "dark": "darker than expected"}  # a finding's direction, in words
LABEL_VALUES = {"bright": 1, "dark": 2}  # a signed map's label map: 1 = brighter than expected, 2 = darker
ENSEMBLE = "ensemble"
RECONSTRUCTION = "reconstruction"  # not a predictor: the model's reconstruction (z = mu), for display
THRESHOLD_MODES = ("calibrated", "percentile", "absolute")
DEFAULT_THRESHOLD_MODE = "calibrated"
DEFAULT_PERCENTILE = 99.0


def predictor_names(include_ensemble: bool = True) -> list[str]:
    """Panel order: the default first."""
    return [n for n in PREDICTOR_INFO if include_ensemble or n != ENSEMBLE]


def predictors_for(kind: str) -> tuple:
    """The predictors a model kind computes ('all' for such a checkpoint, without the ensemble)."""
    return PAPER_PREDICTORS if kind == "vae" else DAE_PREDICTORS


def option_defaults(name: str) -> dict:
    """The values unset (None) options take for map `name`: its own defaults over BASE_DEFAULTS."""
    info = PREDICTOR_INFO.get(name)
    return {**BASE_DEFAULTS, **dict(info.defaults if info else ())}


def title(name: str) -> str:
    return PREDICTOR_INFO[name].title if name in PREDICTOR_INFO else name
