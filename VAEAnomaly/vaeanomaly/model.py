"""The VAE of Zimmerer et al. (2019), reused by Zhou et al. (2020), and its loss.

Encoder: 4x4 convolutions, stride 2, padding 1, channels 16-32-64-256, no bias, no normalisation,
LeakyReLU(0.01); a 4x4 valid convolution head gives 2*l channels at 1x1 (mu and log sigma).
Decoder: mirrored transposed convolutions from z at 1x1 to a 64x64x1 image, linear output.
Likelihood p(x|z) = N(x; g(z), I), so  L = L_rec + beta * L_KL  with
    L_rec = 0.5 * sum_i (x_i - x̂_i)^2          (per image, constant dropped)
    L_KL  = 0.5 * sum_j (mu_j^2 + sigma_j^2 - 2 log sigma_j - 1)
"""
from __future__ import annotations

import torch
from torch import nn

ARCHITECTURE = "zimmerer2019-vae"


class VAE(nn.Module):
    kind = "vae"  # registry: the predictors a model kind computes
    def __init__(self, latent_dim: int = 64, image_size: int = 64,
                 channels: tuple[int, ...] = (16, 32, 64, 256), slope: float = 0.01):
        super().__init__()
        if image_size != 4 * 2 ** len(channels):
            raise ValueError(f"image_size {image_size} does not fit {len(channels)} stride-2 stages "
                             f"(expected {4 * 2 ** len(channels)})")
        self.latent_dim, self.image_size, self.channels = latent_dim, image_size, tuple(channels)
        act = lambda: nn.LeakyReLU(slope)  # noqa: E731
        enc, c_in = [], 1
        for c in channels:
            enc += [nn.Conv2d(c_in, c, 4, 2, 1, bias=False), act()]
            c_in = c
        enc.append(nn.Conv2d(c_in, 2 * latent_dim, 4, 1, 0, bias=False))
        self.encoder = nn.Sequential(*enc)
        rev = list(reversed(channels))
        dec = [nn.ConvTranspose2d(latent_dim, rev[0], 4, 1, 0, bias=False), act()]
        for c_prev, c in zip(rev, rev[1:] + [1]):
            dec.append(nn.ConvTranspose2d(c_prev, c, 4, 2, 1, bias=False))
            if c != 1:
                dec.append(act())
        self.decoder = nn.Sequential(*dec)

    def config(self) -> dict:
        return {"architecture": ARCHITECTURE, "latent_dim": self.latent_dim,
                "image_size": self.image_size, "channels": list(self.channels)}

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x).flatten(1)
        mu, log_sigma = h.chunk(2, dim=1)
        return mu, log_sigma

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z[:, :, None, None])

    def forward(self, x: torch.Tensor, sample: bool = True):
        mu, log_sigma = self.encode(x)
        z = mu + torch.randn_like(mu) * log_sigma.exp() if sample else mu
        return self.decode(z), mu, log_sigma


def rec_loss(x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian negative log-likelihood with unit variance (constant dropped)."""
    return 0.5 * (x - x_rec).pow(2).flatten(1).sum(1)


def kl_loss(mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """Per-image KL(N(mu, sigma^2) || N(0, I))."""
    return 0.5 * (mu.pow(2) + (2 * log_sigma).exp() - 2 * log_sigma - 1).sum(1)


def vae_loss(model: nn.Module, x: torch.Tensor, beta: float = 1.0):
    """Training loss (batch mean of L_rec + beta*L_KL) with the reparameterised sample.
    `model` is a VAE or a wrapper with the same forward (DistributedDataParallel)."""
    x_rec, mu, log_sigma = model(x, sample=True)
    rec, kl = rec_loss(x, x_rec).mean(), kl_loss(mu, log_sigma).mean()
    return rec + beta * kl, rec, kl
