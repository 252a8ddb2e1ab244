"""The six pixel-wise anomaly predictors of Zhou et al. (2020) and their ensemble.

One call (`compute_maps`) returns any subset of the maps for all slices of one volume, sharing
the forward/backward passes: one encoder forward, one decoder forward, one decoder backward and
two encoder backwards (reconstruction and KL paths) give Rec-Error, Rec-grad, KL-grad, ELBO-grad
and Combi together; Proj-Rec-Error runs its own iterative projection.

`reference_map` computes one map at a time the way the reference code does (a separate full
autograd pass per predictor); it exists for the tests and the benchmark.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterable, Optional

import numpy as np
import torch

from .dae import DAE, for_inference
from .model import VAE, kl_loss, rec_loss

from .registry import (DAE_PREDICTORS, ENSEMBLE, PAPER_PREDICTORS as PREDICTORS, POLARITIES,  # noqa: E402
                       PREDICTOR_INFO, RECONSTRUCTION, option_defaults, predictors_for)
ALL_OUTPUTS = tuple(dict.fromkeys(PREDICTORS + DAE_PREDICTORS + (ENSEMBLE, RECONSTRUCTION)))
_GRAD_MAPS = {"elbo-grad", "kl-grad", "rec-grad", "combi"}


class Cancelled(Exception):
    """Raised when the caller's cancel flag is set between batches."""


@dataclass
class PredictorOptions:
    """Documented defaults. smooth*: Gaussian smoothing of gradient maps and the DAE residual: sigma
    smooth_mm millimetres (kernel to +-2.5 sigma), so a model on another grid keeps its meaning; smooth_mm = 0
    uses smooth_sigma / smooth_kernel in pixels (the reference code and the `paper` preset: sigma 3 px, kernel 7).
    smooth_mm, polarity and evidence left None take each map's own default (registry.option_defaults: the
    papers' settings for the VAE maps, measured ones for the DAE residual); for_map(name) resolves them.
    polarity: for the signed maps (registry `signed`): 'both' (absolute value, the papers), 'bright' (only
    where the scan is brighter than the model expects), 'dark', 'signed' (the map with its sign, positive: brighter;
    its intensity evidence is that of 'both', its median normalisation divides by the median absolute value).
    smooth_z_mm: through-plane smoothing of a finished map over the slices of one volume (sigma in mm at the
    slices' spacing; 0: none, the papers); None takes the map's own default.
    normalise: 'median' divides a finished map by its median over the brain of the whole scan (a lesion is a
    minority of the brain, so the median is the scan's healthy level): the map is then in units of this scan's own
    typical value, so a scanner whose noise or blur raises the map everywhere does not raise what is flagged.
    'none': raw values (the papers). None takes the map's own default.
    proj_*: iterative projection, E(x) = L_rec(x) + lambda*|x - x0|_1, Adam(lr)."""
    smooth: bool = True
    smooth_sigma: float = 3.0
    smooth_kernel: int = 7
    smooth_mm: Optional[float] = None  # None: each map's own default (registry.option_defaults)
    polarity: Optional[str] = None     # None: each map's own default
    evidence: Optional[str] = None     # 'intensity': signed maps times the scan's own intensity evidence; None: default
    rim_mm: Optional[float] = None     # maps are 0 within this distance of the brain's surface (3D; needs the mask)
    smooth_z_mm: Optional[float] = None  # Gaussian sigma (mm) across slices, on the finished maps of one volume
    normalise: Optional[str] = None    # 'median': the finished map divided by its median over the scan's brain
    proj_steps: int = 100
    proj_lambda: float = 0.5
    proj_lr: float = 0.03
    proj_weighted: bool = False  # Dehaene et al.: gradient step multiplied by pixel rec. error
    proj_tol: float = 0.0        # early stop (0: off, exactly proj_steps steps): see _project
    batch_size: int = 64

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PredictorOptions":
        known = {k: v for k, v in (d or {}).items() if k in cls.__dataclass_fields__}
        return cls(**known)

    @classmethod
    def preset(cls, name: str, **changes) -> "PredictorOptions":
        """Named option sets: 'default' (the documented defaults) or 'paper' (Zhou et al.'s reference
        settings: smoothing sigma 3 px, kernel 7, absolute maps), which reproduce the paper-grid tables."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset '{name}'; choose from {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **changes})

    def for_map(self, name: str) -> "PredictorOptions":
        """These options with every unset (None) one replaced by map `name`'s default (registry.option_defaults)."""
        d = option_defaults(name)
        return replace(self, **{k: d[k] for k in d if getattr(self, k) is None})

    def unfinished(self) -> "PredictorOptions":
        """These options without the steps that act on finished maps (finish_maps: smoothing across slices,
        intensity evidence, the rim): the maps Combi and the ensemble are made from."""
        return replace(self, smooth_z_mm=0.0, evidence="none", rim_mm=0.0, normalise="none")

    def kernel_px(self, pixel_mm: float) -> tuple[float, int]:
        """(sigma, kernel size) in pixels on a grid of pixel_mm pixels."""
        if self.smooth_mm:
            sigma = self.smooth_mm / pixel_mm
            return sigma, 2 * int(np.ceil(2.5 * sigma)) + 1
        return self.smooth_sigma, int(self.smooth_kernel)


PRESETS = {"default": {}, "paper": {"smooth": True, "smooth_sigma": 3.0, "smooth_kernel": 7, "smooth_mm": 0.0,
                                    "smooth_z_mm": 0.0, "polarity": "both", "evidence": "none", "rim_mm": 0.0,
                                    "normalise": "none"}}
EVIDENCE = ("none", "intensity")


def intensity_evidence(x: torch.Tensor, polarity: str) -> torch.Tensor:
    """How unusual the scan's own (z-scored) intensity is in the map's direction, in [0, 1]: Phi(z) where
    brighter counts ('bright'), Phi(-z) ('dark'), |2 Phi(z) - 1| ('both'). A signed map times this is a soft
    product of the model's evidence and the intensity's (Baur et al.'s hyperintensity prior, without a hard
    gate): a lesion must look wrong to the model *and* stand out in the scan; normal bright CSF that the model
    explains, or a tissue edge it blurs at ordinary intensity, is damped."""
    phi = 0.5 * (1 + torch.erf(x / 2 ** 0.5))
    if polarity == "bright":
        return phi
    if polarity == "dark":
        return 1 - phi
    return (2 * phi - 1).abs()


def smooth_across_slices(maps: np.ndarray, sigma_mm: float, slice_mm: float) -> np.ndarray:
    """Gaussian smoothing of (N, H, W) maps along the slice axis: sigma_mm millimetres at slice_mm spacing
    (kernel to +-2.5 sigma), zero outside the volume, as the in-plane smoothing pads. A sigma under a tenth of a
    slice changes nothing and is skipped."""
    sigma = sigma_mm / slice_mm
    if sigma < 0.1 or len(maps) < 2:
        return maps
    from scipy import ndimage
    return ndimage.gaussian_filter1d(np.asarray(maps, np.float32), sigma, axis=0, mode="constant", truncate=2.5)


def inner_brain(brain: np.ndarray, rim_mm: float, pixel_mm: float, slice_mm: float) -> np.ndarray:
    """The brain mask (N, H, W) eroded by rim_mm in 3D (an ellipsoid of rim_mm in voxels of pixel_mm in-plane and
    slice_mm across); a direction where rim_mm is under half a voxel is not eroded."""
    from scipy import ndimage
    r = [int(round(rim_mm / slice_mm)), int(round(rim_mm / pixel_mm)), int(round(rim_mm / pixel_mm))]
    if rim_mm <= 0 or not any(r):
        return np.asarray(brain, bool)
    g = np.ogrid[tuple(slice(-k, k + 1) for k in r)]
    ball = sum((gi / k) ** 2 for gi, k in zip(g, r) if k) <= 1  # an axis with k = 0 has length 1
    pad = [(k, k) for k in r]  # outside the volume counts as brain: the first/last slices are the brain's own edge
    b = np.pad(np.asarray(brain, bool), pad, mode="edge")
    inner = ndimage.binary_erosion(b, ball)
    return inner[tuple(slice(k, k + s) for k, s in zip(r, brain.shape))]

DEFAULT_PIXEL_MM = 240.0 / 64  # the model grid of the paper (240 mm over 64 pixels) when no pixel size is given


def apply_polarity(signed: torch.Tensor, polarity: str) -> torch.Tensor:
    """A signed map (positive: brighter than expected) as an anomaly score >= 0; 'signed' keeps the sign (the two tails
    are thresholded apart: calibration.calibrated_tails)."""
    if polarity == "signed":
        return signed
    if polarity == "bright":
        return signed.clamp_min(0)
    if polarity == "dark":
        return (-signed).clamp_min(0)
    if polarity == "both":
        return signed.abs()
    raise ValueError(f"unknown polarity '{polarity}'; choose from {', '.join(POLARITIES)}")


def parse_predictors(spec: str | Iterable[str], allow_ensemble: bool = True, with_ensemble: bool = False,
                     kind: Optional[str] = None) -> list[str]:
    """'all', 'rec-grad' or 'rec-error,kl-grad' -> validated list of predictor names.
    'all' is the six paper predictors (a VAE; a denoising autoencoder's kind='dae': its own predictors),
    plus the ensemble when with_ensemble (a checkpoint carries one). kind: the checkpoint's model kind, when
    known (the names are then checked against what it computes)."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    if names == ["all"]:
        return list(predictors_for(kind or "vae")) + ([ENSEMBLE] if with_ensemble and allow_ensemble else [])
    valid = tuple(n for n in ALL_OUTPUTS if (allow_ensemble or n != ENSEMBLE)
                  and (kind is None or n == RECONSTRUCTION or kind in PREDICTOR_INFO[n].models))
    bad = [n for n in names if n not in valid]
    if bad or not names:
        other = [n for n in bad if n in PREDICTOR_INFO]
        why = (f"{', '.join(other)}: not computed by a {'denoising autoencoder' if kind == 'dae' else 'VAE'} "
               f"checkpoint (choose another model or predictor); " if other else f"unknown predictor(s) {bad or names}; ")
        raise ValueError(f"{why}choose from {', '.join(valid)} or 'all'")
    return names


def gaussian_kernel(sigma: float, size: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised 1D Gaussian; the 2D kernel is its outer product (separable)."""
    r = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def _band(n: int, g: torch.Tensor) -> torch.Tensor:
    """n x n matrix applying the 1D kernel g with zero padding: (B @ v)[i] = sum_t g[t] v[i + t - k//2]."""
    k = len(g)
    idx = torch.arange(n, device=g.device)
    off = idx[None, :] - idx[:, None] + k // 2
    return torch.where((off >= 0) & (off < k), g[off.clamp(0, k - 1)], torch.zeros((), dtype=g.dtype, device=g.device))


def smooth(maps: torch.Tensor, opts: PredictorOptions, pixel_mm: float = DEFAULT_PIXEL_MM) -> torch.Tensor:
    """Gaussian smoothing of (..., H, W) maps with zero padding, as the reference code's 2D
    convolution does; the kernel is separable, so it is two banded matrix products (fast on CPUs).
    The kernel: opts.kernel_px(pixel_mm) (millimetres, or the reference code's pixels)."""
    sigma, size = opts.kernel_px(pixel_mm)
    g = gaussian_kernel(sigma, size, maps.device, maps.dtype)
    h, w = maps.shape[-2:]
    return _band(h, g) @ maps @ _band(w, g).T


def _fused_batch(model: VAE, x: torch.Tensor, need: set[str]) -> dict[str, torch.Tensor]:
    """Signed gradients and the reconstruction for one batch, sharing all passes.

    g_rec = dL_rec/dx = (x - x̂) + J_mu^T dL_rec/dmu   (direct term + path through the encoder)
    g_kl  = dL_KL/dx  = J_mu^T mu + J_logsigma^T (sigma^2 - 1)
    """
    x = x.detach().requires_grad_(any(n in _GRAD_MAPS for n in need))
    with torch.set_grad_enabled(x.requires_grad):
        mu, log_sigma = model.encode(x)
        mu_d = mu.detach().requires_grad_(x.requires_grad)
        x_rec = model.decode(mu_d)
        out = {"x_rec": x_rec.detach(), "residual": x.detach() - x_rec.detach()}
        if not x.requires_grad:
            return out
        need_rec = bool(need & {"rec-grad", "elbo-grad"})
        need_kl = bool(need & {"elbo-grad", "kl-grad", "combi"})
        if need_rec:
            rec = rec_loss(x.detach(), x_rec).sum()
            (g_mu,) = torch.autograd.grad(rec, mu_d)                                # decoder backward
            (g_enc,) = torch.autograd.grad(mu, x, g_mu, retain_graph=need_kl)      # encoder backward 1
            out["g_rec"] = (x.detach() - x_rec.detach()) + g_enc
        if need_kl:
            (out["g_kl"],) = torch.autograd.grad(kl_loss(mu, log_sigma).sum(), x)  # encoder backward 2
    return out


PLATEAU_WINDOW = 10  # steps over which the early-stopping rule measures the energy decrease


def _project(model: VAE, x0: torch.Tensor, opts: PredictorOptions,
             step_done: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """Dehaene et al.'s iterative projection; returns (VAE(x_N) - x0)^2. step_done(k) after each step
    (progress, and the caller's chance to cancel).

    Early stopping (opts.proj_tol > 0; off by default): the batch's energy E_k is recorded at every step and
    the projection stops at step k >= PLATEAU_WINDOW once E_{k-W} - E_k <= proj_tol * E_{k-W}, i.e. the last
    W = PLATEAU_WINDOW steps lowered the energy by at most a fraction proj_tol; proj_steps (the paper's N =
    100) stays the maximum. The rule is per batch, so a slice's map depends on the slices batched with it
    only through when the batch stops."""
    x = x0.detach().clone().requires_grad_(True)
    optim = torch.optim.Adam([x], lr=opts.proj_lr)
    energies = []
    for k in range(opts.proj_steps):
        x_rec = model.decode(model.encode(x)[0])
        energy = rec_loss(x, x_rec).sum() + opts.proj_lambda * (x - x0).abs().sum()
        if opts.proj_tol > 0:  # (reading the energy syncs a GPU: only when the rule is on)
            energies.append(float(energy.detach()))
            if k >= PLATEAU_WINDOW and \
                    energies[k - PLATEAU_WINDOW] - energies[k] <= opts.proj_tol * energies[k - PLATEAU_WINDOW]:
                if step_done:
                    step_done(opts.proj_steps)  # the steps not taken count as done
                return (x_rec.detach() - x0).pow(2)  # x is unchanged since this forward: no second one
        (g,) = torch.autograd.grad(energy, x)
        if opts.proj_weighted:
            g = g * (x - x_rec).detach().pow(2)
        optim.zero_grad(set_to_none=True)
        x.grad = g
        optim.step()
        if step_done:
            step_done(k + 1)
    with torch.inference_mode():
        return (model.decode(model.encode(x.detach())[0]) - x0).pow(2)


def _normalise(a: torch.Tensor, constants: Optional[tuple[float, float]] = None) -> torch.Tensor:
    """Min-max normalisation: over `a` itself (the reference code: whatever slices are passed), or
    with fixed (min, max) constants, so a voxel's value does not depend on the crop."""
    lo, hi = (a.min(), a.max()) if constants is None else (float(constants[0]), float(constants[1]))
    return (a - lo) / (hi - lo) if hi > lo else torch.zeros_like(a)


def combi_map(kl_grad: np.ndarray, rec_error: np.ndarray, constants: Optional[tuple[float, float]] = None) -> np.ndarray:
    """Combi = min-max normalised KL-grad x Rec-Error (constants: see _normalise)."""
    return (_normalise(torch.from_numpy(np.asarray(kl_grad)), constants) * torch.from_numpy(np.asarray(rec_error))).numpy()


PROGRESS_SLICES = 16  # the fused pass runs (and reports progress) in batches of at most this many slices


def _stage(progress, text: str) -> None:
    """Tell a progress reporter that has a `stage` method (the CLI's) what runs now."""
    if progress is not None and hasattr(progress, "stage"):
        progress.stage(text)


def compute_maps(model: VAE, slices, predictors: Iterable[str], beta: float = 1.0,
                 options: Optional[PredictorOptions] = None, device: str | torch.device = "cpu",
                 ensemble=None, progress: Optional[Callable[[float], None]] = None,
                 cancel: Optional[Callable[[], bool]] = None,
                 combi_norm: Optional[tuple[float, float]] = None,
                 brain: Optional[np.ndarray] = None, pixel_mm: Optional[float] = None,
                 slice_mm: Optional[float] = None) -> dict[str, np.ndarray]:
    """Anomaly maps for all slices of ONE volume.

    model: a VAE (the paper predictors, the ensemble) or a DAE (dae-residual, rec-error); see registry.
    pixel_mm: the model grid's pixel size (smoothing in mm; default: 240 mm over the model's grid); slice_mm: the
    spacing of the slices (the rim option; default: pixel_mm).

    slices: (N, H, W) array of preprocessed slices. Returns {name: (N, H, W) float32 array}.
    Combi: KL-grad min-max normalised with the checkpoint's constants `combi_norm` = (min, max) from
    healthy calibration data; without them (older checkpoints), over the slices passed (the reference code).
    progress(fraction) is called after every batch of at most PROGRESS_SLICES slices of the fused pass
    and after every projection step; cancel() is checked as often.
    brain: optional (N, H, W) bool brain mask on the slices (score_volume passes it). With it, the maps are
    computed only on the slices that contain brain and are 0 on the others (the projection batches those
    slices together, batch_size at a time) -- except that without `combi_norm`, Combi (alone or as an ensemble
    feature) normalises over all slices passed, so the fused maps then run on every slice as before.
    Without it, every slice (the reference code).
    """
    opts = options or PredictorOptions()
    names = list(dict.fromkeys(predictors))
    pixel_mm = pixel_mm or 240.0 / model.image_size
    kind = getattr(model, "kind", "vae")
    wrong = [n for n in names if n != RECONSTRUCTION and (n not in PREDICTOR_INFO or kind not in PREDICTOR_INFO[n].models)]
    if wrong:
        raise ValueError(f"{', '.join(wrong)}: not computed by a {'denoising autoencoder' if kind == 'dae' else 'VAE'}"
                         f" checkpoint; it computes {', '.join(n for n, i in PREDICTOR_INFO.items() if kind in i.models)}"
                         f" (choose another predictor or model)")
    if opts.polarity not in POLARITIES + (None,):
        raise ValueError(f"unknown polarity '{opts.polarity}'; choose from {', '.join(POLARITIES)}")
    if opts.evidence not in EVIDENCE + (None,):
        raise ValueError(f"unknown evidence '{opts.evidence}'; choose from {', '.join(EVIDENCE)}")
    x_all = torch.as_tensor(np.asarray(slices, dtype=np.float32))
    if x_all.ndim != 3 or tuple(x_all.shape[1:]) != (model.image_size,) * 2:
        raise ValueError(f"slices must be (N, {model.image_size}, {model.image_size}); got {tuple(x_all.shape)}")
    model = model.to(device).eval().requires_grad_(False)
    n, bs = len(x_all), opts.batch_size
    sel = np.arange(n) if brain is None else np.flatnonzero(np.asarray(brain).reshape(n, -1).any(1))
    if kind == "dae":
        return _dae_maps(model, x_all, sel, names, opts, device, brain, pixel_mm, slice_mm, progress, cancel)
    if ENSEMBLE in names and ensemble is None:
        raise ValueError("the ensemble predictor needs a checkpoint that carries ensemble weights "
                         "(fit one with training/fit_ensemble.py)")
    if ENSEMBLE in names:
        ensemble.check_options(opts)  # refuses feature settings other than those it was fitted with
    need = set(names) | (set(ensemble.model_features) if ENSEMBLE in names else set())
    if "combi" in need:
        need |= {"kl-grad", "rec-error"}
    fused = need - {"proj-rec-error"}
    # fused maps on the brain slices only, unless Combi is normalised over the slices passed
    fused_sel = np.arange(n) if "combi" in need and combi_norm is None else sel
    project = "proj-rec-error" in need
    step_cost = 1 / 20  # one projection step costs about 1/20 of a fused pass over the same slices
    total = ((1 if fused else 0) + (opts.proj_steps * step_cost if project else 0)) or 1.0
    done, acc = 0.0, {k: [] for k in need | {RECONSTRUCTION}}

    def report(amount: float) -> None:
        nonlocal done
        done += amount
        if progress:
            progress(min(done / total, 1.0))
        if cancel and cancel():
            raise Cancelled("cancelled")

    if cancel and cancel():
        raise Cancelled("cancelled")
    if fused:
        _stage(progress, ", ".join(sorted(fused - {ENSEMBLE})))
        small = max(1, min(bs, PROGRESS_SLICES))
        nf = len(fused_sel)
        x_fused = x_all if nf == n else x_all[torch.as_tensor(fused_sel)]
        for start in range(0, nf, small):
            x = x_fused[start:start + small, None].to(device)
            r = _fused_batch(model, x, fused)
            maps = {"rec-error": r["residual"].pow(2), RECONSTRUCTION: r["x_rec"]}
            grads = {}
            if "g_rec" in r:
                grads["rec-grad"] = apply_polarity(r["g_rec"], opts.for_map("rec-grad").polarity)
            if "g_kl" in r:
                grads["kl-grad"] = r["g_kl"].abs()
            if "g_rec" in r and "g_kl" in r:
                grads["elbo-grad"] = apply_polarity(r["g_rec"] + beta * r["g_kl"], opts.for_map("elbo-grad").polarity)
            if grads and opts.smooth:  # all gradient maps in one grouped convolution
                smoothed = smooth(torch.cat(list(grads.values()), 1), opts.for_map("rec-grad"), pixel_mm)
                grads = dict(zip(grads, smoothed.split(1, 1)))
            maps.update(grads)
            for k in acc:
                if k in maps:
                    acc[k].append(maps[k][:, 0].detach().cpu())
            report(len(x) / max(nf, 1))
        if nf < n:  # 0 on the slices without brain
            for k in acc:
                if k not in ("proj-rec-error", "combi", ENSEMBLE):
                    full = torch.zeros(x_all.shape)
                    if acc[k]:
                        full[torch.as_tensor(fused_sel)] = torch.cat(acc[k])
                    acc[k] = [full]
        if nf == 0:
            report(1.0)
    if project:
        proj = torch.zeros(x_all.shape)
        for start in range(0, len(sel), bs):
            idx = torch.as_tensor(sel[start:start + bs])
            x = x_all[idx, None].to(device)
            _stage(progress, f"proj-rec-error, slices {start + 1}-{start + len(x)} of {len(sel)}"
                             f"{'' if brain is None else ' with brain'}, {opts.proj_steps} steps")
            frac = len(x) / max(len(sel), 1) * step_cost
            taken, last = [0], start + bs >= len(sel)

            def step_done(k, frac=frac, taken=taken, last=last):
                # the very last step reports what is left, so float sums of the fractions end at exactly 1
                report(total - done if last and k >= opts.proj_steps else frac * (k - taken[0]))
                taken[0] = k
            proj[idx] = _project(model, x, opts, step_done)[:, 0].cpu()
        if not len(sel):
            report(total - done)
        acc["proj-rec-error"].append(proj)
    out = {k: torch.cat(v).numpy() for k, v in acc.items() if v}
    if "combi" in need:
        out["combi"] = combi_map(out["kl-grad"], out["rec-error"], combi_norm)
    if ENSEMBLE in names:
        out[ENSEMBLE] = ensemble.predict_maps({**out, "intensity": x_all.numpy()})  # (ensemble.INTENSITY)
        if len(fused_sel) < n:
            out[ENSEMBLE][np.setdiff1d(np.arange(n), fused_sel)] = 0
    return finish_maps({k: out[k].astype(np.float32) for k in names}, x_all, brain, opts, pixel_mm, slice_mm)


def finish_maps(maps: dict, x_all, brain, opts: PredictorOptions, pixel_mm: float,
                slice_mm: Optional[float]) -> dict[str, np.ndarray]:
    """The options that act on finished maps: smoothing across slices (smooth_z_mm, at slice_mm spacing, default
    pixel_mm), intensity evidence on the signed maps, the scan's own scale (normalise: over the brain mask, or
    where the map is not 0 without one), then the rim (0 within rim_mm of the brain's surface, on every heatmap;
    needs the brain mask). Combi and the ensemble are made from the maps before this step.
    x_all: the (N, H, W) slices the maps were computed from."""
    x_all = torch.as_tensor(np.asarray(x_all, dtype=np.float32))
    for k in maps:
        o = opts.for_map(k)
        if k != RECONSTRUCTION and o.smooth and o.smooth_z_mm:
            maps[k] = smooth_across_slices(maps[k], o.smooth_z_mm, slice_mm or pixel_mm)
        if o.evidence == "intensity" and k in PREDICTOR_INFO and PREDICTOR_INFO[k].signed:
            maps[k] = (maps[k] * intensity_evidence(x_all, o.polarity).numpy()).astype(np.float32)
        if k != RECONSTRUCTION and o.normalise == "median":
            maps[k] = normalise_median(maps[k], brain)
    if brain is not None:
        inner = {}  # one erosion per rim width
        for k in maps:
            rim = opts.for_map(k).rim_mm
            if k != RECONSTRUCTION and rim > 0:
                if rim not in inner:
                    inner[rim] = inner_brain(np.asarray(brain, bool), rim, pixel_mm, slice_mm or pixel_mm)
                maps[k] = np.where(inner[rim], maps[k], 0).astype(np.float32)
    return maps


def normalise_median(m: np.ndarray, brain=None) -> np.ndarray:
    """A map divided by its median over the brain (where it is not 0 without a mask); unchanged when that is 0.
    A signed map (polarity 'signed') by the median of its absolute value (the same for a map >= 0)."""
    inside = np.asarray(brain, bool) if brain is not None else m != 0
    level = float(np.median(np.abs(m[inside]))) if inside.any() else 0.0
    return (m / level).astype(np.float32) if level > 0 else m.astype(np.float32)


def _dae_maps(model: DAE, x_all: torch.Tensor, sel: np.ndarray, names: list, opts: PredictorOptions, device, brain,
              pixel_mm: float, slice_mm: Optional[float], progress, cancel) -> dict[str, np.ndarray]:
    """The denoising autoencoder's maps: one forward pass per batch of brain slices. residual r = x - f(x);
    dae-residual = polarity(r), smoothed (opts); rec-error = r^2 (unsmoothed, unsigned, as the VAE's);
    reconstruction = f(x). 0 on slices without brain (sel: the slices with brain, from compute_maps)."""
    out = {k: torch.zeros(x_all.shape) for k in names}
    o = opts.for_map("dae-residual")
    if cancel and cancel():
        raise Cancelled("cancelled")
    _stage(progress, ", ".join(names))
    step = max(1, min(opts.batch_size, PROGRESS_SLICES))
    fast = for_inference(model)  # BatchNorm folded, channels-last: the same maps, faster
    for start in range(0, len(sel), step):
        idx = torch.as_tensor(sel[start:start + step])
        x = x_all[idx, None].to(device)
        with torch.inference_mode():
            rec = fast(x.contiguous(memory_format=torch.channels_last))
            res = apply_polarity(x - rec, o.polarity)
            maps = {"rec-error": (x - rec).pow(2), RECONSTRUCTION: rec,
                    "dae-residual": smooth(res, o, pixel_mm) if o.smooth else res}
        for k in names:
            out[k][idx] = maps[k][:, 0].cpu()
        if progress:
            progress(min((start + len(x)) / max(len(sel), 1), 1.0))
        if cancel and cancel():
            raise Cancelled("cancelled")
    if progress and not len(sel):
        progress(1.0)
    return finish_maps({k: v.numpy().astype(np.float32) for k, v in out.items()}, x_all, brain, opts, pixel_mm, slice_mm)


def reference_map(model: VAE, slices, name: str, beta: float = 1.0,
                  options: Optional[PredictorOptions] = None, weight_grads: bool = False) -> np.ndarray:
    """One predictor by its own full forward/backward, as the reference code does (for tests and
    benchmarks). Shares nothing with `compute_maps` but the model and the loss definitions.
    weight_grads=True also computes the weight gradients, as the reference code's loss.backward() does."""
    opts = options or PredictorOptions()
    model = model.eval().requires_grad_(weight_grads)
    x = torch.as_tensor(np.asarray(slices, dtype=np.float32))[:, None]
    if name == "proj-rec-error":
        return _project(model, x, opts)[:, 0].numpy()
    x = x.clone().requires_grad_(True)
    mu, log_sigma = model.encode(x)
    x_rec = model.decode(mu)
    if name == "rec-error":
        return (x - x_rec).pow(2)[:, 0].detach().numpy()
    losses = {"rec-grad": lambda: rec_loss(x, x_rec).sum(),
              "kl-grad": lambda: kl_loss(mu, log_sigma).sum(),
              "elbo-grad": lambda: (rec_loss(x, x_rec) + beta * kl_loss(mu, log_sigma)).sum()}
    key = "kl-grad" if name == "combi" else name
    if weight_grads:
        model.zero_grad(set_to_none=True)
        losses[key]().backward()
        g = x.grad
        model.requires_grad_(False)
    else:
        (g,) = torch.autograd.grad(losses[key](), x)
    g = smooth(g.abs(), opts) if opts.smooth else g.abs()
    if name == "combi":
        return (_normalise(g) * (x - x_rec).pow(2)).detach()[:, 0].numpy()
    return g[:, 0].numpy()
