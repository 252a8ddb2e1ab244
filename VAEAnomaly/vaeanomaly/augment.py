"""Training-time augmentation of healthy slices (Zhou et al. 2020: random noise, rotation and intensity
changes; optionally a random Gaussian blur, for scans of coarser resolution than the training cohort),
shared by training/train.py, training/train_dae.py and `vaeanomaly adapt`."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_blur(x: torch.Tensor, max_sigma: float, gen: torch.Generator) -> torch.Tensor:
    """Each slice blurred by a Gaussian of its own sigma, uniform in [0, max_sigma] pixels (separable)."""
    n, dev = len(x), x.device
    if max_sigma <= 0 or n == 0:
        return x
    radius = max(1, math.ceil(3 * max_sigma))
    t = torch.arange(-radius, radius + 1, device=dev, dtype=x.dtype)
    sigma = (torch.rand(n, generator=gen, device=dev) * max_sigma).clamp_min(1e-3).to(x.dtype)
    k = torch.exp(-0.5 * (t[None] / sigma[:, None]) ** 2)
    k = k / k.sum(1, keepdim=True)                                   # (N, K): one kernel per slice
    y = x.transpose(0, 1)                                            # (1, N, S, S): slices as channels
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), k[:, None, None, :], groups=n)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), k[:, None, :, None], groups=n)
    return y.transpose(0, 1)


def augment(x: torch.Tensor, brain: torch.Tensor, a, gen: torch.Generator) -> torch.Tensor:
    """Random rotation, intensity scale/shift, blur (if a.blur > 0) and noise, inside the brain (background
    stays 0). x, brain: (N, 1, S, S); a: anything with max_rotation (degrees), intensity and noise
    attributes, and optionally blur (max Gaussian sigma in pixels)."""
    n, dev = len(x), x.device
    r = lambda *s: torch.rand(*s, generator=gen, device=dev)  # noqa: E731
    th = (r(n) * 2 - 1) * math.radians(a.max_rotation)
    rot = torch.stack([torch.stack([th.cos(), -th.sin(), torch.zeros_like(th)], 1),
                       torch.stack([th.sin(), th.cos(), torch.zeros_like(th)], 1)], 1)
    grid = F.affine_grid(rot, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, align_corners=False)
    m = F.grid_sample(brain, grid, align_corners=False) > 0.5
    x = random_blur(x, getattr(a, "blur", 0.0), gen)
    scale = 1 + (r(n, 1, 1, 1) * 2 - 1) * a.intensity
    shift = (r(n, 1, 1, 1) * 2 - 1) * a.intensity
    noise = torch.randn(x.shape, generator=gen, device=dev) * r(n, 1, 1, 1) * a.noise
    return torch.where(m, x * scale + shift + noise, torch.zeros_like(x))
