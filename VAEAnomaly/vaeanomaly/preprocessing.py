"""Preprocessing parameters, stored in every checkpoint (no SimpleITK needed to read them)."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Preprocessing:
    fov_mm: float = 240.0
    image_size: int = 64
    clip: float = 6.0
    antialias: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(**{k: v for k, v in (d or {}).items() if k in cls.__dataclass_fields__})
