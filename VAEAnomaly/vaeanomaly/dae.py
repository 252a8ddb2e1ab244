"""A coarse-noise denoising autoencoder (Kascenas et al., "Denoising Autoencoders for Unsupervised Anomaly
Detection in Brain MRI", MIDL 2022), beside the VAE.

Model: a small U-Net (levels of two 3x3 convolutions + BatchNorm + LeakyReLU, 2x2 max-pooling down,
transposed 2x2 convolutions up, skip connections, a 1x1 linear head), trained on healthy slices to remove
*coarse* noise:
    n  = upsample_bilinear(N(0, std^2) on a (S/r) x (S/r) grid)   (r = noise_scale, about 8)
    x~ = x + n * brain                                              (noise inside the brain only)
    L  = mean over brain pixels of (f(x~) - x)^2
Coarse noise makes the network replace whole blob-sized regions that do not look healthy by what healthy
tissue would look like there; at inference one forward pass gives f(x), and the anomaly map is the signed
residual x - f(x) (positive: brighter than a healthy brain would be there).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURE = "unet-dae"


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.01),
                         nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.01))


class DAE(nn.Module):
    """U-Net denoiser. levels: number of resolutions (channels base, 2 base, ..., 2^(levels-1) base)."""
    kind = "dae"  # registry: the predictors a model kind computes

    def __init__(self, image_size: int = 64, base: int = 16, levels: int = 4):
        super().__init__()
        if image_size % 2 ** (levels - 1):
            raise ValueError(f"image_size {image_size} is not divisible by 2^{levels - 1} ({levels} levels)")
        self.image_size, self.base, self.levels = image_size, base, levels
        ch = [base * 2 ** i for i in range(levels)]
        self.down = nn.ModuleList([_block(1 if i == 0 else ch[i - 1], ch[i]) for i in range(levels)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(ch[i + 1], ch[i], 2, 2) for i in range(levels - 1)])
        self.merge = nn.ModuleList([_block(2 * ch[i], ch[i]) for i in range(levels - 1)])
        self.head = nn.Conv2d(ch[0], 1, 1)

    def config(self) -> dict:
        return {"architecture": ARCHITECTURE, "image_size": self.image_size, "base": self.base, "levels": self.levels}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for i in reversed(range(self.levels - 1)):
            x = self.merge[i](torch.cat([self.up[i](x), skips[i]], 1))
        return self.head(x)


def coarse_noise(shape, std: float, scale: int, gen: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Noise N(0, std^2) drawn on a grid `scale` times coarser than the image, bilinearly upsampled."""
    n, c, h, w = shape
    coarse = torch.randn((n, c, max(1, h // scale), max(1, w // scale)), generator=gen, device=device) * std
    return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)


def dae_loss(model: nn.Module, x: torch.Tensor, brain: torch.Tensor, std: float, scale: int,
             gen: torch.Generator | None = None) -> torch.Tensor:
    """L2 inside the brain between the denoised noisy slice and the clean slice (batch mean per brain pixel)."""
    noisy = x + coarse_noise(x.shape, std, scale, gen, x.device) * brain
    err = (model(noisy) - x).pow(2) * brain
    return err.sum() / brain.sum().clamp_min(1)
