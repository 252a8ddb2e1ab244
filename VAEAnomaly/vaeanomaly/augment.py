"""Training-time augmentation of healthy slices (Zhou et al. 2020: random noise, rotation and intensity
changes), shared by training/train.py and `vaeanomaly adapt`."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def augment(x: torch.Tensor, brain: torch.Tensor, a, gen: torch.Generator) -> torch.Tensor:
    """Random rotation, intensity scale/shift and noise, inside the brain (background stays 0).
    x, brain: (N, 1, S, S); a: anything with max_rotation (degrees), intensity and noise attributes."""
    n, dev = len(x), x.device
    r = lambda *s: torch.rand(*s, generator=gen, device=dev)  # noqa: E731
    th = (r(n) * 2 - 1) * math.radians(a.max_rotation)
    rot = torch.stack([torch.stack([th.cos(), -th.sin(), torch.zeros_like(th)], 1),
                       torch.stack([th.sin(), th.cos(), torch.zeros_like(th)], 1)], 1)
    grid = F.affine_grid(rot, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, align_corners=False)
    m = F.grid_sample(brain, grid, align_corners=False) > 0.5
    scale = 1 + (r(n, 1, 1, 1) * 2 - 1) * a.intensity
    shift = (r(n, 1, 1, 1) * 2 - 1) * a.intensity
    noise = torch.randn(x.shape, generator=gen, device=dev) * r(n, 1, 1, 1) * a.noise
    return torch.where(m, x * scale + shift + noise, torch.zeros_like(x))
