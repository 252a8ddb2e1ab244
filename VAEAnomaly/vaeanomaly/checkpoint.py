"""Checkpoints: safetensors weights + JSON metadata in the safetensors header. Never unpickles.

Metadata keys: format, model (architecture, latent_dim, image_size, channels), beta,
preprocessing, training (data, command, time, hardware), library_version, optional
ensemble (see ensemble.py), thresholds ({predictor: value}), thresholds_options (the predictor
options the thresholds hold for), combi_normalisation (Combi's fixed constants), calibration
(what the thresholds were computed on; see calibration.py) and evaluation.

Bundled models are found by globbing `*.safetensors` in the module's Resources/Models folder (a
source checkout, the Slicer module) or, in an installed wheel, in the package data
`vaeanomaly.bundled` (the same folder, shipped by pyproject.toml), through importlib.resources.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .dae import ARCHITECTURE as DAE_ARCHITECTURE, DAE
from .model import ARCHITECTURE, VAE

FORMAT = "vaeanomaly-checkpoint/1"
META_KEY = "vaeanomaly"
# chosen by the written rule of training/choose_default.py on the validation split (round 3, on a fresh validation
# draw: docs/default_rule_round3.md): the denoising autoencoder on the 64 grid fine-tuned with blob noise (quiet on
# every healthy population, 15 of 15 cells above the intensity row, the highest mean AUROC and AP); the seeds' VAE
# and beta-VAE stay one choice away (--model bvae-l64-b10-v2, --preset paper)
DEFAULT_MODEL = "dae-64-blobs"
DEFAULT_VAE = "bvae-l64-b10-v2"  # what needs a VAE (site adaptation, the paper's predictors) starts from this one


def resources_dir() -> Path:
    """The Resources folder: package data of an installed wheel (importlib.resources), else the
    folder beside the package (source checkout, Slicer module)."""
    import importlib.resources
    try:
        models = importlib.resources.files("vaeanomaly.bundled").joinpath("Models")
        if models.is_dir():
            with importlib.resources.as_file(models) as folder:  # files on disk: the folder itself
                return Path(folder).parent
    except (ModuleNotFoundError, TypeError, ValueError, NotImplementedError):
        pass
    return Path(__file__).resolve().parent.parent / "Resources"


MODELS_DIR = resources_dir() / "Models"
SAMPLE_DIR = resources_dir() / "SampleData"


def sample_data(name: str = "VAEAnomalySample_T2.nrrd") -> Path:
    """A bundled sample-data file (the Slicer module's sample case)."""
    p = SAMPLE_DIR / name
    if not p.is_file():
        have = ", ".join(sorted(q.name for q in SAMPLE_DIR.glob("*"))) or "none"
        raise FileNotFoundError(f"no bundled sample data '{name}' (have: {have})")
    return p


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, truncated, foreign or incompatible."""


@dataclass
class Checkpoint:
    model: VAE | DAE
    meta: dict
    path: Path

    @property
    def kind(self) -> str:
        """'vae' (the VAE / β-VAE of the papers) or 'dae' (the coarse-noise denoising autoencoder)."""
        return model_kind(self.model)

    @property
    def beta(self) -> float:
        return float(self.meta.get("beta", 1.0))

    @property
    def name(self) -> str:
        return self.meta.get("name") or self.path.name.split(".")[0]

    @property
    def preprocessing(self) -> dict:
        return self.meta.get("preprocessing", {})

    @property
    def thresholds(self) -> dict:
        return self.meta.get("thresholds", {})

    @property
    def threshold_options(self) -> dict:
        """The predictor options the calibrated thresholds hold for. Checkpoints written before this was
        recorded were calibrated by training/train.py with the defaults but 50 projection steps."""
        from .calibration import LEGACY_THRESHOLD_OPTIONS
        return self.meta.get("thresholds_options") or dict(LEGACY_THRESHOLD_OPTIONS)

    @property
    def combi_normalisation(self):
        """{'min', 'max', 'options'} from healthy calibration data, or None (older checkpoints)."""
        return self.meta.get("combi_normalisation")

    @property
    def ensemble(self):
        from .ensemble import Ensemble
        e = self.meta.get("ensemble")
        return Ensemble.from_dict(e) if e else None

    def card(self) -> str:
        """A short human-readable model card."""
        m, t = self.meta, self.meta.get("training", {})
        kind = (f"denoising autoencoder (U-Net, {m['model']['levels']} levels, {m['model']['base']} base channels, "
                f"{m['model']['image_size']}x{m['model']['image_size']})" if self.kind == "dae" else
                f"{'β-VAE' if self.beta != 1 else 'VAE'} l={m['model']['latent_dim']} β={self.beta:g}")
        lines = [f"{self.name}: {kind}",
                 f"trained on: {t.get('data', 'unknown')}",
                 f"training time: {t.get('time', '?')} on {t.get('hardware', '?')}"]
        ev = m.get("evaluation", {}).get("auroc_brain")
        if ev:
            lines.append("pixel AUROC (in brain, embedded lesion cohort): " +
                         ", ".join(f"{k} {v:.3f}" for k, v in ev.items()))
        if self.thresholds:
            lines.append("calibrated thresholds: " + ", ".join(f"{k} {v:.3g}" for k, v in self.thresholds.items()))
            if "thresholds_options" in m:
                o = m["thresholds_options"]
                from .ensemble import UNRECORDED
                from .predictors import PredictorOptions
                if self.kind == "dae":  # options recorded before one existed: as UNRECORDED says
                    r = PredictorOptions.from_dict({**UNRECORDED, **o}).for_map("dae-residual")
                    lines.append(f"  hold for: smoothing {'off' if not r.smooth else f'sigma {r.smooth_mm:g} mm' if r.smooth_mm else 'sigma 3 px'}"
                                 f" (across slices {r.smooth_z_mm:g} mm), polarity {r.polarity}, intensity evidence "
                                 f"{r.evidence}, rim {r.rim_mm:g} mm, normalised {r.normalise}")
                else:
                    z = PredictorOptions.from_dict({"smooth_z_mm": 0.0, **o}).for_map("rec-grad").smooth_z_mm
                    lines.append(f"  hold for: smoothing {'on' if o.get('smooth') else 'off'} (rec-grad across "
                                 f"slices {z:g} mm), projection {o.get('proj_steps')} steps, "
                                 f"lambda {o.get('proj_lambda')}")
            else:
                lines.append("  (older calibration: no ensemble threshold, no Combi constants; re-calibrate with "
                             "training/calibrate.py)")
        if m.get("ensemble"):
            lines.append("ensemble: " + ", ".join(m["ensemble"]["features"]))
        if (m.get("label") or {}).get("min_region_mm3") is not None:
            lines.append(f"label and findings: regions under {m['label']['min_region_mm3']:g} mm3 dropped")
        if m.get("region_peaks"):
            from .registry import DEFAULT_PREDICTORS
            d = DEFAULT_PREDICTORS[self.kind]
            shown = f" ({d}: {m['region_peaks'][d]:.4g})" if d in m["region_peaks"] else ""
            lines.append(f"label and findings at the calibrated threshold: a region is kept when its peak reaches the "
                         f"{(m.get('calibration') or {}).get('peak_quantile', 99.9):g}th percentile of healthy "
                         f"brain{shown}")
        if t.get("command"):
            lines.append(f"command: {t['command']}")
        return "\n".join(lines)


def model_kind(model) -> str:
    return getattr(model, "kind", "vae")


def save_checkpoint(path, model: VAE | DAE, meta: dict, fp16: bool = False) -> Path:
    from safetensors.torch import save_file
    from . import __version__
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    full = {"format": FORMAT, "library_version": __version__, **meta, "model": model.config()}
    tensors = {k: (v.half() if fp16 and v.is_floating_point() else v.float() if v.is_floating_point() else v)
               .contiguous().cpu() for k, v in model.state_dict().items()}
    from .io import atomic_path
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(full)})
    return path


def update_metadata(path, **changes) -> Checkpoint:
    """Rewrite a checkpoint with metadata keys replaced (a value None removes the key); weights
    untouched, dtype kept. Written to a temporary file and renamed: never half-written."""
    from safetensors.torch import load_file, save_file

    from .io import atomic_path
    ck = load_checkpoint(path)
    meta = {k: v for k, v in {**ck.meta, **changes}.items() if v is not None}
    tensors = load_file(str(ck.path))
    with atomic_path(ck.path) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})
    return load_checkpoint(ck.path)


def resolve_model(name_or_path=None) -> Path:
    """A path, a bundled model's name, or None for the default bundled model."""
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    p = Path(name_or_path)
    if p.suffix == ".safetensors" or p.exists():
        return p
    cand = MODELS_DIR / f"{name_or_path}.safetensors"
    if cand.exists():
        return cand
    names = ", ".join(bundled_models()) or "none bundled yet"
    raise CheckpointError(f"no checkpoint file or bundled model named '{name_or_path}' (bundled: {names})")


def bundled_models() -> list[str]:
    """Every bundled model (globbed, so newly bundled ones appear without code changes)."""
    return sorted(p.name[:-len(".safetensors")] for p in MODELS_DIR.glob("*.safetensors"))


def load_checkpoint(path=None, device="cpu") -> Checkpoint:
    from safetensors import SafetensorError, safe_open
    path = resolve_model(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint '{path}' is not a readable safetensors file "
                              f"(corrupt, truncated or another format): {err}") from None
    if META_KEY not in header:
        raise CheckpointError(f"checkpoint '{path}' is a safetensors file but not a VAEAnomaly checkpoint "
                              f"(no '{META_KEY}' metadata); train one with training/train.py")
    try:
        meta = json.loads(header[META_KEY])
        cfg = meta["model"]
        if meta.get("format") != FORMAT or cfg.get("architecture") not in (ARCHITECTURE, DAE_ARCHITECTURE):
            raise CheckpointError(f"checkpoint '{path}' has format {meta.get('format')!r} / architecture "
                                  f"{cfg.get('architecture')!r}; this library reads {FORMAT} / {ARCHITECTURE} "
                                  f"or {DAE_ARCHITECTURE}")
        if cfg["architecture"] == DAE_ARCHITECTURE:
            model = DAE(int(cfg["image_size"]), int(cfg["base"]), int(cfg["levels"]))
        else:
            model = VAE(int(cfg["latent_dim"]), int(cfg["image_size"]), tuple(cfg["channels"]))
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint '{path}' has malformed metadata: {err}") from None
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint '{path}' weights do not match its declared architecture: "
                              f"{str(err).splitlines()[0]}") from None
    return Checkpoint(model.to(device).eval(), meta, path)
