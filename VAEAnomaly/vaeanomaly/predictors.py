"""The six pixel-wise anomaly predictors of Zhou et al. (2020) and their ensemble.

One call (`compute_maps`) returns any subset of the maps for all slices of one volume, sharing
the forward/backward passes: one encoder forward, one decoder forward, one decoder backward and
two encoder backwards (reconstruction and KL paths) give Rec-Error, Rec-grad, KL-grad, ELBO-grad
and Combi together; Proj-Rec-Error runs its own iterative projection.

`reference_map` computes one map at a time the way the reference code does (a separate full
autograd pass per predictor); it exists for the tests and the benchmark.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Optional

import numpy as np
import torch

from .model import VAE, kl_loss, rec_loss

from .registry import ENSEMBLE, PAPER_PREDICTORS as PREDICTORS, RECONSTRUCTION  # noqa: E402  (one registry)
ALL_OUTPUTS = PREDICTORS + (ENSEMBLE, RECONSTRUCTION)
_GRAD_MAPS = {"elbo-grad", "kl-grad", "rec-grad", "combi"}


class Cancelled(Exception):
    """Raised when the caller's cancel flag is set between batches."""


@dataclass
class PredictorOptions:
    """Documented defaults. smooth*: Gaussian smoothing of gradient maps (reference code: sigma 3,
    kernel 7). proj_*: iterative projection, E(x) = L_rec(x) + lambda*|x - x0|_1, Adam(lr)."""
    smooth: bool = True
    smooth_sigma: float = 3.0
    smooth_kernel: int = 7
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


def parse_predictors(spec: str | Iterable[str], allow_ensemble: bool = True, with_ensemble: bool = False) -> list[str]:
    """'all', 'rec-grad' or 'rec-error,kl-grad' -> validated list of predictor names.
    'all' is the six paper predictors, plus the ensemble when with_ensemble (a checkpoint carries one)."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    if names == ["all"]:
        return list(PREDICTORS) + ([ENSEMBLE] if with_ensemble and allow_ensemble else [])
    valid = PREDICTORS + ((ENSEMBLE,) if allow_ensemble else ()) + (RECONSTRUCTION,)
    bad = [n for n in names if n not in valid]
    if bad or not names:
        raise ValueError(f"unknown predictor(s) {bad or names}; choose from {', '.join(valid)} or 'all'")
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


def smooth(maps: torch.Tensor, opts: PredictorOptions) -> torch.Tensor:
    """Gaussian smoothing of (..., H, W) maps with zero padding, as the reference code's 2D
    convolution does; the kernel is separable, so it is two banded matrix products (fast on CPUs)."""
    g = gaussian_kernel(opts.smooth_sigma, opts.smooth_kernel, maps.device, maps.dtype)
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
        out = {"x_rec": x_rec.detach(), "rec-error": (x.detach() - x_rec.detach()).pow(2)}
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
                 brain: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """Anomaly maps for all slices of ONE volume.

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
    if ENSEMBLE in names and ensemble is None:
        raise ValueError("the ensemble predictor needs a checkpoint that carries ensemble weights "
                         "(fit one with training/fit_ensemble.py)")
    if ENSEMBLE in names:
        ensemble.check_options(opts)  # refuses feature settings other than those it was fitted with
    need = set(names) | (set(ensemble.features) if ENSEMBLE in names else set())
    if "combi" in need:
        need |= {"kl-grad", "rec-error"}
    x_all = torch.as_tensor(np.asarray(slices, dtype=np.float32))
    if x_all.ndim != 3 or tuple(x_all.shape[1:]) != (model.image_size,) * 2:
        raise ValueError(f"slices must be (N, {model.image_size}, {model.image_size}); got {tuple(x_all.shape)}")
    model = model.to(device).eval().requires_grad_(False)
    fused = need - {"proj-rec-error"}
    n, bs = len(x_all), opts.batch_size
    sel = np.arange(n) if brain is None else np.flatnonzero(np.asarray(brain).reshape(n, -1).any(1))
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
            maps = {"rec-error": r["rec-error"], RECONSTRUCTION: r["x_rec"]}
            grads = {}
            if "g_rec" in r:
                grads["rec-grad"] = r["g_rec"].abs()
            if "g_kl" in r:
                grads["kl-grad"] = r["g_kl"].abs()
            if "g_rec" in r and "g_kl" in r:
                grads["elbo-grad"] = (r["g_rec"] + beta * r["g_kl"]).abs()
            if grads and opts.smooth:  # all gradient maps in one grouped convolution
                smoothed = smooth(torch.cat(list(grads.values()), 1), opts)
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
        out[ENSEMBLE] = ensemble.predict_maps(out)
        if len(fused_sel) < n:
            out[ENSEMBLE][np.setdiff1d(np.arange(n), fused_sel)] = 0
    return {k: out[k].astype(np.float32) for k in names}


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
