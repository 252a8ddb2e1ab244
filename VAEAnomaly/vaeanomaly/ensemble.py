"""Logistic-regression ensemble over predictor maps (Zhou et al. 2020, 'Complementariness').

Each pixel is one sample; its features are the chosen predictor values. Stored as plain JSON
(coefficients, intercept, feature standardisation, and the predictor options the features were
computed with) inside the checkpoint metadata: no pickle. An ensemble refuses to run on features
computed with other settings (e.g. unsmoothed gradient maps): its weights would not hold.
"""
from __future__ import annotations

import numpy as np

DEFAULT_FEATURES = ("rec-error", "kl-grad", "rec-grad")
# Not a predictor: the z-scored scan itself (the plain-intensity baseline) as a feature the ensemble may weigh
# beside the model's maps (training/fit_ensemble.py --features rec-grad,intensity).
INTENSITY = "intensity"
SMOOTHING_KEYS = ("smooth", "smooth_sigma", "smooth_kernel", "smooth_mm")
PROJECTION_KEYS = ("proj_steps", "proj_lambda", "proj_lr", "proj_weighted")
GRADIENT_FEATURES = {"rec-grad", "kl-grad", "elbo-grad", "combi", "dae-residual"}  # the smoothed maps
SIGNED_FEATURES = {"rec-grad", "elbo-grad", "dae-residual"}            # follow the polarity option
# settings recorded before these options existed were made with these values (pixel smoothing, absolute maps)
UNRECORDED = {"smooth_mm": None, "polarity": None, "evidence": None, "rim_mm": None,  # None: the map's own default
              "smooth_z_mm": 0.0,  # (recorded before through-plane smoothing existed: there was none)
              "normalise": "none"}  # (nor the scan's own scale)
# act on an output map after it is computed (predictors.finish_maps), never on the ensemble's features
FINISHING_KEYS = ("rim_mm", "smooth_z_mm", "evidence", "normalise")
# Ensembles stored before the settings were recorded were all fitted by training/fit_ensemble.py with
# the default options (smoothing sigma 3, kernel 7; projection 100 steps, lambda 0.5, lr 0.03).
LEGACY_OPTIONS = {"smooth": True, "smooth_sigma": 3.0, "smooth_kernel": 7,
                  "proj_steps": 100, "proj_lambda": 0.5, "proj_lr": 0.03, "proj_weighted": False,
                  "smooth_mm": None, "polarity": None, "evidence": None, "rim_mm": None, "smooth_z_mm": 0.0,
                  "normalise": "none"}


def relevant_keys(features) -> tuple:
    """The PredictorOptions fields that change the value of these predictor maps."""
    keys = ()
    if set(features) & GRADIENT_FEATURES:
        keys += SMOOTHING_KEYS
    if "proj-rec-error" in features:
        keys += PROJECTION_KEYS
    if set(features) & SIGNED_FEATURES:
        keys += ("polarity",)
    if features:
        keys += FINISHING_KEYS
    return keys


def options_mismatch(recorded: dict, options, features, output: str | None = None,
                     finishing: bool = True) -> list[str]:
    """Human-readable differences between recorded settings and `options` (a PredictorOptions),
    restricted to the fields that matter for `features`; smoothing parameters only matter when on.
    output: the map the features make (the ensemble): the finishing options (rim, smoothing across slices,
    evidence) act on it, not on its features, so they take its defaults; finishing=False leaves them out (what the
    features themselves were computed with)."""
    from .registry import option_defaults
    out = []
    for f in features or [None]:  # compared as each map sees them: unset (None) options take its own defaults
        d = option_defaults(f) if f else {}
        if output is not None:
            d = {**d, **{k: option_defaults(output)[k] for k in FINISHING_KEYS}}
        eff = lambda o: {k: (d[k] if v is None and k in d else v) for k, v in o.items()}  # noqa: E731
        cur, rec = eff(options.to_dict()), eff({**UNRECORDED, **recorded})
        smooth_off = not rec.get("smooth", True) and not cur["smooth"]
        pixel_kernel = not rec.get("smooth_mm") and not cur.get("smooth_mm")
        keys = [k for k in relevant_keys([f] if f else features)
                if not (k in ("smooth_sigma", "smooth_kernel", "smooth_mm", "smooth_z_mm") and smooth_off)
                and not (k in ("smooth_sigma", "smooth_kernel") and not pixel_kernel)
                and (finishing or k not in FINISHING_KEYS)]
        out += [f"{k}={cur[k]!r} (fitted/calibrated with {rec[k]!r})" for k in keys
                if k in rec and cur.get(k) != rec[k]]
    return list(dict.fromkeys(out))


class Ensemble:
    def __init__(self, features=DEFAULT_FEATURES, coef=None, intercept=0.0, mean=None, scale=None, options=None):
        self.features = tuple(features)
        # the feature settings (PredictorOptions fields that matter for these features) it was fitted with
        self.options = dict(options) if options is not None else None
        self.coef = None if coef is None else np.asarray(coef, dtype=np.float64)
        self.intercept = float(intercept)
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float64)
        self.scale = None if scale is None else np.asarray(scale, dtype=np.float64)

    @property
    def model_features(self) -> tuple:
        """The features a model computes (all but the scan's own intensity)."""
        return tuple(f for f in self.features if f != INTENSITY)

    def _stack(self, maps: dict) -> np.ndarray:
        missing = [f for f in self.features if f not in maps]
        if missing:
            raise ValueError(f"ensemble needs maps {missing}" + (" (the ensemble's 'intensity' feature is the "
                                                                "z-scored slices: pass them as maps['intensity'])"
                                                                if INTENSITY in missing else ""))
        return np.stack([np.asarray(maps[f], dtype=np.float64).ravel() for f in self.features], 1)

    def fit(self, maps: dict, labels, max_samples: int = 500_000, seed: int = 0, options=None) -> "Ensemble":
        """maps: {feature: array}, labels: same-shaped 0/1 array (pixels to use, e.g. in-brain).
        options: the PredictorOptions the feature maps were computed with (recorded; default: the defaults)."""
        from .predictors import PredictorOptions
        opts = (options or PredictorOptions()).to_dict()
        self.options = {k: opts[k] for k in relevant_keys(self.features)}
        from sklearn.linear_model import LogisticRegression
        X, y = self._stack(maps), np.asarray(labels).ravel().astype(bool)
        if len(X) != len(y):
            raise ValueError("maps and labels differ in size")
        if y.all() or not y.any():
            raise ValueError("fitting the ensemble needs both lesion and healthy pixels")
        if len(X) > max_samples:
            idx = np.random.default_rng(seed).choice(len(X), max_samples, replace=False)
            X, y = X[idx], y[idx]
        self.mean, self.scale = X.mean(0), X.std(0) + 1e-12
        lr = LogisticRegression(max_iter=1000).fit((X - self.mean) / self.scale, y)
        self.coef, self.intercept = lr.coef_[0], float(lr.intercept_[0])
        return self

    @property
    def raw_weights(self) -> np.ndarray:
        """Weights on the unstandardised features (the scale the paper reports)."""
        return self.coef / self.scale

    @property
    def fitted_options(self) -> dict:
        """The recorded feature settings (for ensembles stored before they were recorded: the defaults
        fit_ensemble.py always used)."""
        if self.options is not None:
            return self.options
        return {k: LEGACY_OPTIONS[k] for k in relevant_keys(self.features)}

    def check_options(self, options) -> None:
        """Raise ValueError, saying what to change, if `options` compute the features differently from
        the settings the ensemble was fitted with."""
        diff = options_mismatch(self.fitted_options, options, self.features, finishing=False)
        if diff:
            hint = " (drop --no-smooth / turn gradient smoothing back on)" if any(d.startswith("smooth=") for d in diff) else ""
            raise ValueError("the ensemble was fitted on features computed with other settings: " + "; ".join(diff) +
                             f". Run it with the settings it was fitted with{hint}, or choose another predictor.")

    def predict_maps(self, maps: dict) -> np.ndarray:
        if self.coef is None:
            raise ValueError("ensemble is not fitted")
        shape = np.shape(maps[self.features[0]])
        logit = ((self._stack(maps) - self.mean) / self.scale) @ self.coef + self.intercept
        return (1.0 / (1.0 + np.exp(-logit))).reshape(shape).astype(np.float32)

    def to_dict(self) -> dict:
        d = {"features": list(self.features), "coef": self.coef.tolist(), "intercept": self.intercept,
             "mean": self.mean.tolist(), "scale": self.scale.tolist()}
        if self.options is not None:
            d["options"] = dict(self.options)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Ensemble":
        try:
            e = cls(d["features"], d["coef"], d["intercept"], d["mean"], d["scale"], d.get("options"))
        except (KeyError, TypeError) as err:
            raise ValueError(f"malformed ensemble entry in checkpoint metadata: {err}") from None
        if not (len(e.features) == len(e.coef) == len(e.mean) == len(e.scale)):
            raise ValueError("malformed ensemble entry: feature and weight counts differ")
        return e
