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

Optional blob noise (`blob_noise`, train_dae.py --blobs): a few sharp-edged ellipses of random size and
contrast added inside the brain. Bilinear coarse noise is smooth, so a U-Net trained on it alone learns to
remove smooth, bias-field-like changes and passes sharp-edged blobs (small lesions) through unchanged; blobs
with lesion-like edges are meant to teach it to replace those too (measured with dae-128-blobs: gliomas and
masses gained, MS-like lesions are still reconstructed; docs/README.md).
"""
from __future__ import annotations

import copy
import math

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


def for_inference(model: DAE) -> DAE:
    """An inference copy of a DAE in eval mode: every convolution with the BatchNorm after it folded in (its running
    statistics: w' = w g / sqrt(v + eps), b' = b - m g / sqrt(v + eps)), in channels-last memory. The same outputs to
    float rounding (about 1e-6), in fewer passes over memory: on 2 CPU threads about 1.4x (64x64) and 1.5x
    (128x128) faster (benchmarks/bench_slicer_job.py). The model itself is left as it is (training keeps its
    BatchNorm)."""
    fast = copy.deepcopy(model).eval()
    for block in list(fast.down) + list(fast.merge):
        layers = list(block)
        for i, (conv, bn) in enumerate(zip(layers, layers[1:])):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
                folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                   bias=True).to(conv.weight.device, conv.weight.dtype)
                bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
                folded.weight.data = conv.weight.detach() * scale[:, None, None, None]
                folded.bias.data = bn.bias.detach() + (bias - bn.running_mean) * scale
                block[i], block[i + 1] = folded, nn.Identity()
    return fast.to(memory_format=torch.channels_last).requires_grad_(False)


def coarse_noise(shape, std: float, scale: int, gen: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Noise N(0, std^2) drawn on a grid `scale` times coarser than the image, bilinearly upsampled."""
    n, c, h, w = shape
    coarse = torch.randn((n, c, max(1, h // scale), max(1, w // scale)), generator=gen, device=device) * std
    return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)


def _ellipses(brain: torch.Tensor, count: int, radius_px: tuple[float, float], gen: torch.Generator | None = None,
              edge_px: float = 1.0) -> torch.Tensor:
    """`count` soft ellipse masks per slice (brain: (n, 1, h, w) 0/1), centred on brain pixels, radii drawn in
    radius_px (each axis 0.7-1.3 times it, random orientation), an edge edge_px wide. Returns (n, count, h, w) in
    [0, 1]; slices without brain get empty masks."""
    n, _, h, w = brain.shape
    dev = brain.device
    rand = lambda *shape: torch.rand(shape, generator=gen, device=dev)  # noqa: E731
    flat = brain.reshape(n, h * w).float()
    has = flat.sum(1) > 0
    centres = torch.multinomial(torch.where(has[:, None], flat, torch.ones_like(flat)), count, replacement=True,
                                generator=gen)                                       # (n, count)
    cy, cx = (centres // w).float(), (centres % w).float()
    rad = radius_px[0] + (radius_px[1] - radius_px[0]) * rand(n, count)
    ax_y, ax_x = rad * (0.7 + 0.6 * rand(n, count)), rad * (0.7 + 0.6 * rand(n, count))
    ang = math.pi * rand(n, count)
    yy = torch.arange(h, device=dev, dtype=torch.float32)[None, None, :, None] - cy[..., None, None]
    xx = torch.arange(w, device=dev, dtype=torch.float32)[None, None, None, :] - cx[..., None, None]
    c, s = torch.cos(ang)[..., None, None], torch.sin(ang)[..., None, None]
    u, v = (c * yy + s * xx) / ax_y[..., None, None], (-s * yy + c * xx) / ax_x[..., None, None]
    dist = (torch.sqrt(u * u + v * v) - 1) * rad[..., None, None]                    # ~ px outside the edge
    return (0.5 - dist / edge_px).clamp(0, 1) * has[:, None, None, None]


def _used(n: int, count: int, gen: torch.Generator | None, dev) -> torch.Tensor:
    """A random share of each slice's `count` shapes is used (n, count) 0/1."""
    return (torch.rand((n, count), generator=gen, device=dev)
            < 0.5 + 0.5 * torch.rand((n, 1), generator=gen, device=dev)).float()


def blob_noise(brain: torch.Tensor, count: int, radius_px: tuple[float, float], std: float,
               gen: torch.Generator | None = None, edge_px: float = 1.0) -> torch.Tensor:
    """Up to `count` ellipses per slice (brain: (n, 1, h, w) 0/1; geometry as `_ellipses`), each with one
    contrast N(0, std^2); overlapping blobs add. Slices without brain get none. Returns (n, 1, h, w)."""
    inside = _ellipses(brain, count, radius_px, gen, edge_px)
    n = brain.shape[0]
    amp = torch.randn((n, count), generator=gen, device=brain.device) * std * _used(n, count, gen, brain.device)
    return (inside * amp[..., None, None]).sum(1, keepdim=True)


def foreign_patches(x: torch.Tensor, brain: torch.Tensor, count: int, radius_px: tuple[float, float],
                    gen: torch.Generator | None = None, edge_px: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreign-patch interpolation (Tan et al., FPI; the MOOD 2020/2022 self-supervised entries): up to `count`
    ellipses per slice (geometry as `_ellipses`) where the slice is blended with another slice of the batch,
        x~ = (1 - a m) x + a m x_other,   a ~ U(0.2, 1) per ellipse, m the soft ellipse mask,
    so the disturbance has real tissue texture and a contrast that varies from barely visible to a full swap.
    Returns (the disturbed slices, the blend weight a m of each pixel, (n, 1, h, w))."""
    n = x.shape[0]
    inside = _ellipses(brain, count, radius_px, gen, edge_px)
    alpha = (0.2 + 0.8 * torch.rand((n, count), generator=gen, device=x.device)) * _used(n, count, gen, x.device)
    weight = (inside * alpha[..., None, None]).amax(1, keepdim=True)
    donor = torch.roll(x, 1, 0) if n > 1 else torch.flip(x, (-1, -2))
    return x * (1 - weight) + donor * weight, weight


def brain_crops(x: torch.Tensor, brain: torch.Tensor, size: int,
                gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One size x size crop of each slice (x, brain: (n, 1, h, w)), centred on a random brain pixel and shifted to lie
    inside the slice: full-resolution patches, so a U-Net trained on them learns lesion-scale detail at the cost of a
    small image (it is fully convolutional: inference runs on whole slices). Slices without brain: any pixel."""
    n, _, h, w = x.shape
    if size > min(h, w):
        raise ValueError(f"crop {size} is larger than the {h}x{w} slices")
    flat = brain.reshape(n, h * w).float()
    has = flat.sum(1) > 0
    centre = torch.multinomial(torch.where(has[:, None], flat, torch.ones_like(flat)), 1, generator=gen)[:, 0]
    top = (centre // w - size // 2).clamp(0, h - size)
    left = (centre % w - size // 2).clamp(0, w - size)
    steps = torch.arange(size, device=x.device)
    rows, cols = (top[:, None] + steps)[:, :, None], (left[:, None] + steps)[:, None, :]
    pick = lambda t: t[torch.arange(n, device=x.device)[:, None, None], 0, rows, cols][:, None]  # noqa: E731
    return pick(x), pick(brain)


def dae_loss(model: nn.Module, x: torch.Tensor, brain: torch.Tensor, std: float, scale: int,
             gen: torch.Generator | None = None, blobs: int = 0,
             blob_radius_px: tuple[float, float] = (2.0, 8.0), patches: int = 0,
             anomaly_weight: float = 0.0) -> torch.Tensor:
    """L2 inside the brain between the denoised disturbed slice and the clean slice (batch mean per brain pixel).
    Disturbances, all inside the brain: coarse noise; up to `blobs` sharp-edged blobs (blob_noise) when blobs > 0;
    up to `patches` foreign patches (foreign_patches, same radii as the blobs) when patches > 0.
    anomaly_weight w > 0 weighs each pixel's error by 1 + w * (how much a blob or patch disturbed it), so the few
    pixels of a small disturbance are not drowned by the rest of the brain (restoration of small anomalies)."""
    disturbed = torch.zeros_like(x)
    n = coarse_noise(x.shape, std, scale, gen, x.device)
    if blobs > 0:
        b = blob_noise(brain, blobs, blob_radius_px, std, gen)
        n, disturbed = n + b, disturbed + b.abs() / max(std, 1e-6)
    noisy = x
    if patches > 0:
        noisy, weight = foreign_patches(x, brain, patches, blob_radius_px, gen)
        noisy = x + (noisy - x) * brain
        disturbed = disturbed + weight
    noisy = noisy + n * brain
    err = (model(noisy) - x).pow(2) * brain
    if anomaly_weight > 0:
        err = err * (1 + anomaly_weight * disturbed.clamp(0, 1))
    return err.sum() / brain.sum().clamp_min(1)
