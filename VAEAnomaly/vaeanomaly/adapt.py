"""Site adaptation: `vaeanomaly adapt SCANS... --model NAME -o NEW.safetensors`.

A model trained on one kind of scanner flags too much healthy brain on another (its calibrated
thresholds are the 99th percentile of ITS healthy brains). Adaptation fine-tunes the model on a few
healthy scans from the user's scanner and recalibrates every threshold (each predictor, the ensemble,
Combi's constants and the out-of-distribution verdict, through `calibration.calibrate`) on scans held
out among those given.

Steps: read and check the scans (at least MIN_SCANS; one protocol; T2-weighted; none that stands out
as abnormal against the others); split them (held out: max(2, 30 %)); fine-tune with the training
augmentation until the held-out loss stops improving or the time budget is spent (Ctrl-C stops
early and keeps the best state so far); calibrate on the held-out scans; write the checkpoint
(safetensors + JSON metadata) and a model card (NEW.md) that says what it was adapted on and the
flagged percentage of healthy brain before and after.

"After" is measured honestly: for each held-out scan, the threshold is calibrated on the OTHER
held-out scans (leave-one-out), so the figure is what a new healthy scan from this scanner would get,
not the 1 % that calibrating on a scan guarantees for that same scan.
"""
from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .registry import DEFAULT_PREDICTOR

MIN_SCANS = 3               # 1 to fine-tune on, 2 held out for calibration and the leave-one-out check
HELD_OUT_FRACTION = 0.3
LESION_LIMIT = 10.0         # % of a scan's brain above the 99th percentile of the other scans: abnormal. A coarse
                            # screen for gross abnormality: healthy scans from a scanner the model does not know
                            # reach 5-7.4 % (docs/adaptation.md, 13 generated EPI scans), a glioma 2-3 %
SPACING_FACTOR = 1.6        # a voxel size this many times larger or smaller than the scans' median: another series
MIN_BRAIN_FRACTION = 0.05   # slices with less brain are not trained on (as training/train.py's cache)
PROJECTION_SLICES = 128     # Proj-Rec-Error's threshold from this many held-out slices (the projection is costly)
FLAG_PREDICTORS = ("rec-error", "rec-grad", "elbo-grad", "kl-grad")  # before/after figures (one fused pass)


@dataclass
class AdaptOptions:
    minutes: float = 8.0            # fine-tuning budget (reading, checks and calibration come on top: ~1-3 min)
    max_epochs: int = 400
    patience: int = 20              # epochs without held-out improvement before stopping
    lr: float = 1e-4
    batch_size: int = 32
    max_rotation: float = 15.0      # augmentation, as training/train.py's defaults
    noise: float = 0.1
    intensity: float = 0.1
    seed: int = 0
    allow_mixed: bool = False       # accept scans of different voxel sizes
    keep_outliers: bool = False     # accept scans that stand out as abnormal
    force: bool = False             # overwrite an existing output (never a bundled model or an input)


class AdaptError(ValueError):
    """Input that adaptation cannot use, with a message that says what to do."""


# --------------------------------------------------------------------------- checks
def check_output(output, inputs) -> Path:
    """The output must be a new .safetensors file: never a bundled model, never an input."""
    from .checkpoint import MODELS_DIR
    out = Path(output)
    if not out.name.endswith(".safetensors"):
        raise AdaptError(f"output '{out}' must end in .safetensors (e.g. my-scanner.safetensors)")
    res = out.resolve()
    if res.parent == MODELS_DIR.resolve():
        raise AdaptError(f"output '{out}' is in the bundled models' folder ({MODELS_DIR}); bundled models are "
                         f"never overwritten or added to by adapt: write elsewhere, e.g. -o my-scanner.safetensors")
    card = card_path(out).resolve()
    for p in inputs:
        if p is not None and Path(p).resolve() in (res, card):
            raise AdaptError(f"output '{out}' (or its card {card.name}) would overwrite the input '{p}'; "
                             f"choose another output name")
    return out


def scan_names(paths) -> list[str]:
    """Short distinct names: the file names, or the paths below their common folder when names repeat
    (HCP layout: every file is T2w_acpc_dc_restore_brain.nii.gz)."""
    import os
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    try:
        common = Path(os.path.commonpath([str(p.resolve()) for p in paths]))
    except ValueError:  # Windows: scans on different drives (C:, D:, a \\server share) share no folder
        return [str(p.resolve()) for p in paths]
    return [str(p.resolve().relative_to(common)) for p in paths]


def card_path(out: Path) -> Path:
    return out.with_name(out.name[:-len(".safetensors")] + ".md")


def check_protocol(names, images, allow_mixed: bool) -> None:
    """Scans from one scanner and protocol have similar voxel sizes; a scan whose voxel size differs from
    the median by more than SPACING_FACTOR on any axis (1 mm next to 3 mm slices, a localizer) is refused."""
    sp = np.array([sorted(img.GetSpacing()[:2]) + [img.GetSpacing()[2]] for img in images], float)
    ref = np.median(sp, 0)
    odd = [(n, tuple(round(float(v), 2) for v in s)) for n, s in zip(names, sp)
           if np.any(np.maximum(s / ref, ref / s) > SPACING_FACTOR)]
    if odd and not allow_mixed:
        listing = ", ".join(f"{n} {s}" for n, s in odd[:4])
        raise AdaptError(f"the scans differ in voxel size (typical {tuple(round(float(v), 2) for v in ref)} mm; "
                         f"{listing}{', ...' if len(odd) > 4 else ''}): adaptation learns ONE scanner protocol. "
                         f"Give scans of the same series type, or pass --allow-mixed if they really are from "
                         f"this scanner's protocol")


def leave_one_out_flagged(maps: list, brains: list, q: float = 99.0) -> list[float]:
    """For each scan: % of its brain above the q-th percentile of the OTHER scans' brain pixels."""
    vals = [m[b] for m, b in zip(maps, brains)]
    out = []
    for i, v in enumerate(vals):
        others = np.concatenate([w for j, w in enumerate(vals) if j != i])
        out.append(100.0 * float(np.mean(v > np.percentile(others, q))))
    return out


def _flag_maps(checkpoint, prepared, options, device) -> dict:
    """The flag predictors' maps of one prepared scan on the model grid, as `vaeanomaly score` computes them
    (scoring.score_prepared: the brain slices, finished on the brain mask at the scan's slice spacing), so that
    the before/after figures are the share of the brain that scoring would flag. No verdict is needed here."""
    from .scoring import score_prepared
    return score_prepared(checkpoint, prepared, FLAG_PREDICTORS, options, device, verdict=False)[0]


# --------------------------------------------------------------------------- the whole run
def adapt(scans, output, model=None, masks=None, options: Optional[AdaptOptions] = None, device: str = "cpu",
          progress: Optional[Callable[[float], None]] = None, stage: Optional[Callable[[str], None]] = None,
          log: Callable[[str], None] = lambda s: print(s, file=sys.stderr), command: str = "") -> dict:
    """Adapt `model` (a bundled model's name or a checkpoint file) to healthy `scans` (paths) and write
    `output`. Returns the "adaptation" metadata entry (before/after figures, epochs, ...)."""
    import torch

    from . import verdict
    from .calibration import calibrate
    from .checkpoint import load_checkpoint, save_checkpoint
    from .preprocessing import Preprocessing
    from .volume import VolumeError, prepare, read_image

    o = options or AdaptOptions()
    progress = progress or (lambda f: None)
    stage = stage or (lambda s: None)
    scans = [Path(s) for s in scans]
    masks = [Path(m) for m in masks] if masks else [None] * len(scans)
    if len(masks) != len(scans):
        raise AdaptError(f"{len(scans)} scans but {len(masks)} masks: give one mask per scan, in the same order")
    if len(scans) < MIN_SCANS:
        raise AdaptError(f"adaptation needs at least {MIN_SCANS} healthy scans from this scanner (got {len(scans)}): "
                         f"one or more to fine-tune on and 2 held out to recalibrate the thresholds on; 10 are better")
    if len({s.resolve() for s in scans}) != len(scans):
        raise AdaptError("the same scan is given twice; give distinct healthy scans")
    out = check_output(output, scans + masks)
    if out.exists() and not o.force:
        raise AdaptError(f"output '{out}' exists; choose another name, or pass --force to replace it")
    from .checkpoint import DEFAULT_VAE
    base = load_checkpoint(model if model is not None else DEFAULT_VAE)
    if base.kind != "vae":
        raise AdaptError(f"'{base.name}' is a denoising autoencoder; adaptation fine-tunes a VAE (its predictors and "
                         f"verdict are recalibrated with it): choose a VAE as the base, e.g. --model {DEFAULT_VAE}")
    prep = Preprocessing.from_dict(base.preprocessing)
    t_start = time.monotonic()

    # 1. read, check and preprocess every scan
    stage("reading scans")
    names = scan_names(scans)
    images, prepared = [], []
    for i, (s, m) in enumerate(zip(scans, masks)):
        img = read_image(s, f"scan '{s.name}'")
        images.append(img)
        try:
            prepared.append(prepare(img, read_image(m, f"mask '{m.name}'") if m else None, prep, what=f"scan '{s.name}'"))
        except VolumeError as err:
            raise AdaptError(str(err)) from None
        progress(0.08 * (i + 1) / len(scans))
    check_protocol(names, images, o.allow_mixed)

    # 2. with the base model: contrast, abnormal scans, and the "before" figures
    stage("checking scans")
    popts = _predictor_options(base)
    base_maps = []
    for i, p in enumerate(prepared):
        base_maps.append(_flag_maps(base, p, popts, device))
        progress(0.08 + 0.04 * (i + 1) / len(prepared))
    pix = verdict.pixel_mm(base)
    for n, p, mp in zip(names, prepared, base_maps):
        st = verdict.statistics(p.slices, p.brain, mp["rec-error"], pix)
        if st["contrast"] < verdict.CONTRAST_LIMIT:
            raise AdaptError(f"scan '{n}' does not look T2-weighted (the cerebrospinal fluid is not the brightest "
                             f"tissue, as in T1-weighted or FLAIR scans); the model can only be adapted to T2 scans "
                             f"of the same kind: remove it")
    loo = leave_one_out_flagged([mp[DEFAULT_PREDICTOR] for mp in base_maps], [p.brain for p in prepared])
    odd = [(n, f) for n, f in zip(names, loo) if f > LESION_LIMIT]
    if odd and not o.keep_outliers:
        listing = ", ".join(f"{n} ({f:.1f}%)" for n, f in odd)
        raise AdaptError(f"scan(s) {listing} stand out against the others: that share of the brain is above the "
                         f"99th percentile of the other scans (healthy scans: about 1%, at most {LESION_LIMIT:g}%). "
                         f"They may contain lesions or artefacts; adapt only on healthy scans (remove them), or pass "
                         f"--keep-outliers if you are sure they are healthy")

    # 3. split: held-out scans for calibration, the rest to fine-tune on
    rng = np.random.default_rng(o.seed)
    n_hold = max(2, int(round(HELD_OUT_FRACTION * len(scans))))
    hold = sorted(rng.choice(len(scans), n_hold, replace=False).tolist())
    train = [i for i in range(len(scans)) if i not in hold]
    before = {k: _flagged([base_maps[i][k] for i in hold], [prepared[i].brain for i in hold], base.thresholds.get(k))
              for k in FLAG_PREDICTORS}

    # 4. fine-tune
    stage("fine-tuning")
    torch.manual_seed(o.seed)
    net = copy.deepcopy(base.model).to(device).train().requires_grad_(True)
    x_tr, b_tr = _slices([prepared[i] for i in train], device)
    x_ho, _ = _slices([prepared[i] for i in hold], device)
    result = _fine_tune(net, base.beta, x_tr, b_tr, x_ho, o, device,
                        lambda f: progress(0.12 + 0.73 * f), log)
    net = result.pop("model").eval().requires_grad_(False)

    # 5. calibrate every threshold on the held-out scans (the predictors, the ensemble, Combi, the verdict)
    stage("calibrating")
    held_cases = [(names[i], prepared[i].slices, prepared[i].brain, prepared[i].grid.GetSpacing()[2]) for i in hold]
    ens = base.ensemble
    upd = calibrate(net, base.beta, held_cases, popts, ensemble=ens, device=device,
                    max_projection_slices=PROJECTION_SLICES, progress=lambda f: progress(0.85 + 0.12 * f))
    adapted = replace(base, model=net)  # the base checkpoint's grid and beta, the adapted weights
    adapted_maps = [_flag_maps(adapted, prepared[i], popts, device) for i in hold]
    after_loo = {k: _mean(leave_one_out_flagged([m[k] for m in adapted_maps], [prepared[i].brain for i in hold],
                                                upd["calibration"]["quantile"])) for k in FLAG_PREDICTORS}

    # 6. write the checkpoint and its card
    stage("writing")
    minutes = (time.monotonic() - t_start) / 60
    adaptation = {
        "base_model": base.name, "scans": names, "fine_tuned_on": [names[i] for i in train],
        "held_out": [names[i] for i in hold], "masks": "given" if masks[0] else "automatic",
        **result, "minutes": round(minutes, 2), "lr": o.lr, "seed": o.seed,
        "flagged_percent_before": before, "flagged_percent_after": after_loo,
        "predictor": DEFAULT_PREDICTOR,
        "note": "flagged % of healthy brain on the held-out scans: before = the base model at its own calibrated "
                "thresholds; after = the adapted model, each held-out scan at a threshold calibrated on the other "
                "held-out scans (leave-one-out). The ensemble keeps the base model's weights (refitting needs "
                "lesion labels); its threshold is recalibrated.",
        "command": command,
    }
    meta = {k: v for k, v in base.meta.items() if k not in ("model", "format", "library_version", "evaluation",
                                                            "ensemble_evaluation", "verdict")}
    meta.update(upd)
    meta["name"] = out.name[:-len(".safetensors")]
    t = dict(base.meta.get("training", {}))
    t["data"] = (f"{t.get('data', 'unknown')}; ADAPTED on {len(scans)} healthy scans from the user's scanner "
                 f"({len(train)} fine-tuned on, {len(hold)} held out for calibration): {', '.join(names)}")
    t["command"] = command or t.get("command")
    t["time"] = f"{minutes * 60:.0f} s (adaptation)"
    t["hardware"] = f"{device}, {torch.get_num_threads()} threads"
    meta["training"] = t
    meta["adaptation"] = adaptation
    save_checkpoint(out, net.cpu(), meta)
    card_path(out).write_text(model_card(meta), encoding="utf-8")
    progress(1.0)
    return adaptation


def _predictor_options(ck):
    """The options inference uses with this checkpoint (its calibrated ones where recorded)."""
    from .predictors import PredictorOptions
    return PredictorOptions()


def _mean(v):
    return round(float(np.mean(v)), 3)


def _flagged(maps, brains, threshold) -> Optional[float]:
    if threshold is None:
        return None
    return _mean([100.0 * float(np.mean(m[b] > threshold)) for m, b in zip(maps, brains)])


def _slices(prepared, device):
    import torch
    xs, bs = [], []
    for p in prepared:
        keep = p.brain.mean((1, 2)) > MIN_BRAIN_FRACTION
        xs.append(p.slices[keep])
        bs.append(p.brain[keep])
    x = torch.from_numpy(np.concatenate(xs).astype(np.float32))[:, None].to(device)
    b = torch.from_numpy(np.concatenate(bs).astype(np.float32))[:, None].to(device)
    return x, b


def _held_out_loss(net, beta, x, bs=128) -> float:
    import torch

    from .model import kl_loss, rec_loss
    tot = 0.0
    with torch.no_grad():
        for i in range(0, len(x), bs):
            mu, log_sigma = net.encode(x[i:i + bs])
            tot += float((rec_loss(x[i:i + bs], net.decode(mu)) + beta * kl_loss(mu, log_sigma)).sum())
    return tot / len(x)


def _fine_tune(net, beta, x, b, x_ho, o: AdaptOptions, device, progress, log) -> dict:
    """Adam on the VAE loss with augmentation; keeps the state with the lowest held-out loss.
    Stops at max_epochs, after `patience` epochs without improvement, at the time budget, or on Ctrl-C."""
    import torch

    from .augment import augment
    from .model import vae_loss
    opt = torch.optim.Adam(net.parameters(), lr=o.lr)
    gen = torch.Generator(device=device).manual_seed(o.seed)
    net.eval()
    best = _held_out_loss(net, beta, x_ho)
    start_loss, best_state, best_epoch, since = best, copy.deepcopy(net.state_dict()), 0, 0
    t0, epoch, interrupted, why = time.monotonic(), 0, False, "max epochs"
    bs = min(o.batch_size, len(x))
    try:
        for epoch in range(1, o.max_epochs + 1):
            net.train()
            perm = torch.randperm(len(x), generator=gen, device=device)
            for i in range(0, len(perm) - bs + 1, bs):
                idx = perm[i:i + bs]
                loss, _, _ = vae_loss(net, augment(x[idx], b[idx], o, gen), beta)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            net.eval()
            ho = _held_out_loss(net, beta, x_ho)
            if ho < best:
                best, best_state, best_epoch, since = ho, copy.deepcopy(net.state_dict()), epoch, 0
            else:
                since += 1
            elapsed = time.monotonic() - t0
            progress(min(1.0, max(epoch / o.max_epochs, elapsed / (60 * o.minutes),
                                  since / o.patience if o.patience else 0)))  # never past the stage's end
            if since >= o.patience:
                why = f"no held-out improvement for {o.patience} epochs"
                break
            if elapsed > 60 * o.minutes:
                why = f"time budget of {o.minutes:g} min"
                break
    except KeyboardInterrupt:
        interrupted, why = True, "interrupted (Ctrl-C)"
        log(f"adapt: interrupted after epoch {epoch}; keeping the best state so far (epoch {best_epoch}) and "
            f"calibrating it (press Ctrl-C again to abort without writing anything)")
    net.load_state_dict(best_state)
    return {"model": net, "epochs": epoch, "best_epoch": best_epoch, "stopped": why, "interrupted": interrupted,
            "held_out_loss_before": round(start_loss, 3), "held_out_loss_after": round(best, 3),
            "training_slices": int(len(x))}


# --------------------------------------------------------------------------- model card
def model_card(meta: dict) -> str:
    a = meta["adaptation"]
    rows = "\n".join(f"| {k} | {a['flagged_percent_before'][k] if a['flagged_percent_before'][k] is not None else '-'} "
                     f"| {a['flagged_percent_after'][k]} |" for k in FLAG_PREDICTORS)
    return f"""# Model card: {meta['name']} (adapted)

Adapted from **{a['base_model']}** by `vaeanomaly adapt` on {len(a['scans'])} healthy scans from the user's scanner
(masks: {a['masks']}):

- fine-tuned on: {', '.join(a['fine_tuned_on'])}
- held out (thresholds, Combi constants, ensemble threshold and the out-of-distribution verdict recalibrated on them):
  {', '.join(a['held_out'])}
- {a['epochs']} epochs ({a['stopped']}); best held-out loss at epoch {a['best_epoch']}
  ({a['held_out_loss_before']} → {a['held_out_loss_after']}); {a['training_slices']} training slices;
  {a['minutes']} min in all; lr {a['lr']}, seed {a['seed']}{'; INTERRUPTED by the user' if a['interrupted'] else ''}

## Flagged % of healthy brain on the held-out scans

| predictor | before (base model, its thresholds) | after (adapted, leave-one-out thresholds) |
|---|---|---|
{rows}

{a['note']}

Base model's training data: {meta['training']['data']}

Command: `{a['command']}`

No lesion AUROC was measured for this model (adaptation sees no lesions); see docs/adaptation.md for
measurements of adaptation on generated data.
"""


# --------------------------------------------------------------------------- command line
def add_parser(sub, **kwargs):
    """Register `vaeanomaly adapt` on the CLI's subparsers."""
    d = AdaptOptions()
    p = sub.add_parser("adapt", help="fine-tune a model on a few healthy scans from your scanner and recalibrate it",
                       description=__doc__.split("\n\n")[0] + " Healthy scans only.", **kwargs)
    p.add_argument("scans", nargs="+", help=f"healthy T2 volumes from one scanner and protocol (at least {MIN_SCANS}; "
                                            f"10 recommended)")
    p.add_argument("--model", help="base checkpoint file or bundled model name, a VAE (default: the bundled default "
                                   "VAE, checkpoint.DEFAULT_VAE)")
    p.add_argument("-o", "--output", required=True, help="NEW.safetensors (never a bundled model or an input); "
                                                         "its card is written beside it as NEW.md")
    p.add_argument("--masks", nargs="+", help="brain masks, one per scan in the same order (default: automatic, "
                                              "for skull-stripped scans)")
    p.add_argument("--minutes", type=float, default=d.minutes, help="fine-tuning time budget")
    p.add_argument("--max-epochs", type=int, default=d.max_epochs)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--allow-mixed", action="store_true",
                   help=f"accept scans whose voxel sizes differ by more than {SPACING_FACTOR:g}x")
    p.add_argument("--keep-outliers", action="store_true", help="accept scans that stand out as abnormal")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    from .scoring import DEVICE_HELP
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--progress", choices=["bar", "lines", "none"], default="bar", help="progress display")
    p.set_defaults(func=cmd_adapt)
    return p


def cmd_adapt(a) -> int:
    import shlex

    from .scoring import Progress, pick_device
    o = AdaptOptions(minutes=a.minutes, max_epochs=a.max_epochs, lr=a.lr, seed=a.seed, allow_mixed=a.allow_mixed,
                     keep_outliers=a.keep_outliers, force=a.force)
    if not o.minutes > 0 or o.max_epochs < 1 or not o.lr > 0:
        raise AdaptError("--minutes and --lr must be positive and --max-epochs at least 1")
    prog = Progress(a.progress, "adapting")
    command = "vaeanomaly " + " ".join(shlex.quote(x) for x in sys.argv[1:]) if sys.argv[1:2] == ["adapt"] else \
        f"vaeanomaly adapt {' '.join(shlex.quote(str(s)) for s in a.scans)} -o {shlex.quote(a.output)}"
    try:
        res = adapt(a.scans, a.output, a.model, a.masks, o, pick_device(a.device), progress=prog,
                    stage=getattr(prog, "stage", None), command=command)
    finally:
        prog.close()
    out = Path(a.output)
    b, f = res["flagged_percent_before"][DEFAULT_PREDICTOR], res["flagged_percent_after"][DEFAULT_PREDICTOR]
    print(f"wrote {out} and {card_path(out)}: {res['epochs']} epochs ({res['stopped']}), {res['minutes']:.1f} min; "
          f"{DEFAULT_PREDICTOR} flags {b}% of healthy held-out brain before, {f}% after (leave-one-out)",
          file=sys.stderr)
    return 0
