"""Logistic-regression ensemble over predictor maps (Zhou et al. 2020, 'Complementariness').

Each pixel is one sample; its features are the chosen predictor values. Stored as plain JSON
(coefficients, intercept, feature standardisation) inside the checkpoint metadata: no pickle.
"""
from __future__ import annotations

import numpy as np

DEFAULT_FEATURES = ("rec-error", "kl-grad", "rec-grad")


class Ensemble:
    def __init__(self, features=DEFAULT_FEATURES, coef=None, intercept=0.0, mean=None, scale=None):
        self.features = tuple(features)
        self.coef = None if coef is None else np.asarray(coef, dtype=np.float64)
        self.intercept = float(intercept)
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float64)
        self.scale = None if scale is None else np.asarray(scale, dtype=np.float64)

    def _stack(self, maps: dict) -> np.ndarray:
        missing = [f for f in self.features if f not in maps]
        if missing:
            raise ValueError(f"ensemble needs maps {missing}")
        return np.stack([np.asarray(maps[f], dtype=np.float64).ravel() for f in self.features], 1)

    def fit(self, maps: dict, labels, max_samples: int = 500_000, seed: int = 0) -> "Ensemble":
        """maps: {feature: array}, labels: same-shaped 0/1 array (pixels to use, e.g. in-brain)."""
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

    def predict_maps(self, maps: dict) -> np.ndarray:
        if self.coef is None:
            raise ValueError("ensemble is not fitted")
        shape = np.shape(maps[self.features[0]])
        logit = ((self._stack(maps) - self.mean) / self.scale) @ self.coef + self.intercept
        return (1.0 / (1.0 + np.exp(-logit))).reshape(shape).astype(np.float32)

    def to_dict(self) -> dict:
        return {"features": list(self.features), "coef": self.coef.tolist(), "intercept": self.intercept,
                "mean": self.mean.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "Ensemble":
        try:
            e = cls(d["features"], d["coef"], d["intercept"], d["mean"], d["scale"])
        except (KeyError, TypeError) as err:
            raise ValueError(f"malformed ensemble entry in checkpoint metadata: {err}") from None
        if not (len(e.features) == len(e.coef) == len(e.mean) == len(e.scale)):
            raise ValueError("malformed ensemble entry: feature and weight counts differ")
        return e
