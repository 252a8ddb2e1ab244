"""Train the coarse-noise denoising autoencoder (vaeanomaly/dae.py) on healthy slices.

    python training/train_dae.py --cache data/v/train_64.npz --image-size 64 --out runs/dae64.safetensors
    python training/calibrate.py runs/dae64.safetensors --cache data/v/calibration_64.npz --all-cases

Adam with a cosine learning-rate decay over the run (by epochs, or by wall time with --max-minutes, so a
CPU budget still ends at a small learning rate); each batch gets the VAE's rotation / intensity augmentation
(white noise and a random blur only when asked: --noise, --blur), then coarse noise inside the brain
(dae.dae_loss), plus sharp-edged blobs with --blobs (small-lesion-sized disturbances the U-Net learns to
remove; coarse noise alone is smooth and teaches it to pass sharp small blobs through), plus foreign patches
with --patches (another slice's tissue blended into ellipses: real texture, any contrast; dae.foreign_patches) and
--anomaly-weight (the disturbed pixels weigh more, so small disturbances are not drowned by the rest of the brain).
--crop trains on full-resolution patches (dae.brain_crops; e.g. --image-size 256 --crop 64: 0.94 mm pixels at the
cost of a 64x64 slice); the model still scores whole slices.
Resumable: the run's state (weights, optimiser, epoch, wall time used, random generator) is saved every
--save-minutes to OUT.resume.safetensors (+ .json; tensors and JSON, no pickle); `--resume` continues from it
with the same command (the time budget counts the minutes already spent). Writes the core
library's checkpoint (safetensors + JSON metadata with this exact command) and a CSV log (train loss,
held-out healthy loss).
Thresholds, the verdict and the rest come from training/calibrate.py on the calibration split.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

import common  # noqa: F401  (puts the core library on sys.path)
from vaeanomaly.augment import augment
from vaeanomaly.checkpoint import save_checkpoint
from vaeanomaly.dae import DAE, brain_crops, dae_loss
from vaeanomaly.predictors import PredictorOptions
from vaeanomaly.preprocessing import Preprocessing


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, help="healthy slice cache .npz (training/make_data.py)")
    ap.add_argument("--out", required=True, help="checkpoint path (.safetensors)")
    ap.add_argument("--name", help="model name in the metadata")
    ap.add_argument("--image-size", type=int, default=64, choices=[64, 128, 256])
    ap.add_argument("--crop", type=int, default=0,
                    help="train on random CROP x CROP patches of the slices centred on brain (full-resolution patches: "
                         "e.g. --image-size 256 --crop 64; inference still scores whole slices); 0: whole slices")
    ap.add_argument("--base", type=int, default=16, help="channels of the first U-Net level")
    ap.add_argument("--levels", type=int, default=4)
    ap.add_argument("--noise-std", type=float, default=0.5, help="coarse noise std (z-score units)")
    ap.add_argument("--noise-scale", type=int, default=8, help="noise grid = image size (the crop's, with --crop) / this")
    ap.add_argument("--blobs", type=int, default=0,
                    help="also add up to this many sharp-edged blobs per slice (dae.blob_noise; 0: coarse noise only)")
    ap.add_argument("--blob-radius-mm", type=float, nargs=2, default=(4.0, 15.0), metavar=("MIN", "MAX"),
                    help="blob radii in mm (pixels: 240 mm field of view over --image-size)")
    ap.add_argument("--patches", type=int, default=0,
                    help="also blend up to this many foreign patches per slice (dae.foreign_patches; same radii)")
    ap.add_argument("--anomaly-weight", type=float, default=0.0,
                    help="weigh the error of disturbed pixels by 1 + this (0: plain L2 over the brain)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT.resume.safetensors if it exists")
    ap.add_argument("--save-minutes", type=float, default=5.0, help="save the resumable state this often")
    ap.add_argument("--init", help="start from this DAE checkpoint's weights (same architecture: base, levels; any grid "
                                   "size, the layers are convolutions), e.g. to fine-tune")
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--max-minutes", type=float, default=0, help="stop after this wall time (0: no limit)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--val-fraction", type=float, default=0.05, help="held-out healthy subjects (loss log)")
    ap.add_argument("--max-rotation", type=float, default=15.0)
    ap.add_argument("--intensity", type=float, default=0.1)
    ap.add_argument("--noise", type=float, default=0.0,
                    help="max std of white noise added to the clean slice (z-score units; the target keeps it)")
    ap.add_argument("--blur", type=float, default=0.0,
                    help="max Gaussian blur sigma in pixels (scans coarser than the training cohort)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--fp16", action="store_true", help="store weights as float16 (small bundled files)")
    ap.add_argument("--data-description", default="")
    return ap.parse_args(argv)


def main(argv=None):
    from common import code_version, command_line, hardware
    from vaeanomaly.data import SliceCache
    a = parse(argv)
    torch.manual_seed(a.seed)
    cache = SliceCache.load(a.cache)
    if cache.slices.shape[-1] != a.image_size:
        raise SystemExit(f"the cache holds {cache.slices.shape[-1]}-pixel slices but --image-size is {a.image_size}")
    if a.crop and (a.crop > a.image_size or a.crop % 2 ** (a.levels - 1)):
        raise SystemExit(f"--crop {a.crop}: must be at most --image-size and divisible by 2^(levels-1) = "
                         f"{2 ** (a.levels - 1)}")
    rng = np.random.default_rng(a.seed)
    n_cases = len(cache.names)
    val_ids = rng.choice(n_cases, max(1, round(a.val_fraction * n_cases)), replace=False) if n_cases > 1 else []
    val = np.isin(cache.case, val_ids)
    to_t = lambda arr: torch.from_numpy(arr.astype(np.float32))[:, None].to(a.device)  # noqa: E731
    x_all, b_all = to_t(cache.slices[~val]), to_t(cache.brain[~val])
    x_val, b_val = to_t(cache.slices[val][::4]), to_t(cache.brain[val][::4])
    model = DAE(a.image_size, a.base, a.levels).to(a.device)
    if a.init:
        from vaeanomaly.checkpoint import load_checkpoint
        init = load_checkpoint(a.init, "cpu")
        layers = lambda c: {k: v for k, v in c.items() if k != "image_size"}  # noqa: E731 (convolutions: any grid)
        if init.kind != "dae" or layers(init.model.config()) != layers(model.config()):
            raise SystemExit(f"--init {a.init}: not a DAE with this architecture ({layers(model.config())})")
        model.load_state_dict({k: v.float() for k, v in init.model.state_dict().items()})
    pixel_mm = Preprocessing(image_size=a.image_size).fov_mm / a.image_size
    noise = dict(blobs=a.blobs, blob_radius_px=tuple(r / pixel_mm for r in a.blob_radius_mm), patches=a.patches,
                 anomaly_weight=a.anomaly_weight)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    aug = SimpleNamespace(max_rotation=a.max_rotation, intensity=a.intensity, noise=a.noise, blur=a.blur)
    gen = torch.Generator(device=a.device).manual_seed(a.seed)
    val_gen_seed = a.seed + 12345
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state_path = out.with_name(out.name.replace(".safetensors", "") + ".resume.safetensors")
    first, spent = 1, 0.0
    if a.resume and state_path.exists():
        first, spent = load_state(state_path, model, opt, gen)
        print(f"resumed from {state_path}: epoch {first}, {spent / 60:.1f} min already spent", file=sys.stderr)
    log = open(out.with_suffix(".csv"), "a" if first > 1 else "w", newline="")
    writer = csv.writer(log)
    if first == 1:
        writer.writerow(["epoch", "loss", "val_loss", "lr", "seconds"])
    t0, epoch, loss_mean = time.time() - spent, first - 1, float("nan")
    budget = 60 * a.max_minutes
    last_save = time.time()
    for epoch in range(first, a.epochs + 1):
        model.train()
        perm = torch.randperm(len(x_all), generator=gen, device=a.device)
        tot, nb, stop = 0.0, 0, False
        for i in range(0, len(perm) - a.batch_size + 1, a.batch_size):
            progress = (time.time() - t0) / budget if budget else (epoch - 1 + i / len(perm)) / a.epochs
            if progress >= 1:
                stop = True
                break
            for g in opt.param_groups:
                g["lr"] = a.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))
            idx = perm[i:i + a.batch_size]
            x, b = augment(x_all[idx], b_all[idx], aug, gen), b_all[idx]
            if a.crop:
                x, b = brain_crops(x, b, a.crop, gen)
            loss = dae_loss(model, x, b, a.noise_std, a.noise_scale, gen, **noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot, nb = tot + float(loss.detach()), nb + 1
            if time.time() - last_save > 60 * a.save_minutes:
                # mid-epoch: a resumed run restarts this epoch (with the weights learnt so far)
                save_state(state_path, model, opt, gen, epoch, time.time() - t0)
                last_save = time.time()
        model.eval()
        with torch.no_grad():
            vg = torch.Generator(device=a.device).manual_seed(val_gen_seed)
            val_loss = (float(dae_loss(model, x_val, b_val, a.noise_std, a.noise_scale, vg, **noise))
                        if len(x_val) else float("nan"))
        loss_mean = tot / max(nb, 1)
        writer.writerow([epoch, f"{loss_mean:.5f}", f"{val_loss:.5f}", f"{opt.param_groups[0]['lr']:.2e}",
                         f"{time.time() - t0:.0f}"])
        log.flush()
        print(f"epoch {epoch}: loss {loss_mean:.4f} val {val_loss:.4f} ({time.time() - t0:.0f} s)", file=sys.stderr)
        save_state(state_path, model, opt, gen, epoch + 1, time.time() - t0)
        last_save = time.time()
        if stop:
            break
    log.close()
    meta = {
        "name": a.name or out.name.replace(".safetensors", ""),
        "beta": 1.0,
        "preprocessing": Preprocessing(image_size=a.image_size).to_dict(),
        "predictor_defaults": PredictorOptions().to_dict(),
        "denoising": {"noise_std": a.noise_std, "noise_scale": a.noise_scale, "blobs": a.blobs,
                      "blob_radius_mm": list(a.blob_radius_mm), "patches": a.patches,
                      "anomaly_weight": a.anomaly_weight},
        "training": {
            "command": command_line(), "code_version": code_version(),
            "data": a.data_description or f"{n_cases} healthy subjects, {len(x_all)} training slices",
            "epochs": epoch, "batch_size": a.batch_size, "lr": a.lr, "seed": a.seed,
            "augmentation": {"max_rotation_deg": a.max_rotation, "intensity": a.intensity,
                             "white_noise": a.noise, "blur_sigma_px": a.blur,
                             "coarse_noise_std": a.noise_std, "coarse_noise_scale": a.noise_scale,
                             "blobs": a.blobs, "blob_radius_mm": list(a.blob_radius_mm),
                             "foreign_patches": a.patches, "anomaly_weight": a.anomaly_weight,
                             "crop_px": a.crop or None},
            "init": a.init or None,
            "time": f"{time.time() - t0:.0f} s", "hardware": hardware(a.device),
            "final_loss": {"loss": loss_mean},
        },
    }
    save_checkpoint(out, model.cpu().eval(), meta, fp16=a.fp16)
    print(f"wrote {out} ({time.time() - t0:.0f} s, {epoch} epochs)", file=sys.stderr)


def save_state(path: Path, model, opt, gen, next_epoch: int, spent: float) -> None:
    """The resumable state: weights, Adam's moments and steps, the generator, as safetensors + JSON (no pickle).
    Written to a temporary name and renamed, so a run killed while saving keeps the previous state."""
    from safetensors.torch import save_file
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    steps = {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st:
                for k in ("exp_avg", "exp_avg_sq"):
                    tensors[f"opt.{names[id(p)]}.{k}"] = st[k].detach().cpu().contiguous()
                steps[names[id(p)]] = float(st["step"])
    tensors["gen"] = gen.get_state().cpu()
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    meta = {"next_epoch": next_epoch, "seconds": spent, "steps": steps, "lr": opt.param_groups[0]["lr"]}
    path.with_suffix(".json").write_text(json.dumps(meta))
    os.replace(tmp, path)


def load_state(path: Path, model, opt, gen) -> tuple[int, float]:
    """Restore what save_state wrote; returns (the epoch to start at, seconds already spent)."""
    from safetensors.torch import load_file
    meta = json.loads(path.with_suffix(".json").read_text())
    tensors = load_file(str(path))
    dev = next(model.parameters()).device
    model.load_state_dict({k[6:]: v.to(dev) for k, v in tensors.items() if k.startswith("model.")})
    for n, p in model.named_parameters():
        if n in meta["steps"]:
            opt.state[p] = {"step": torch.tensor(meta["steps"][n]),
                            "exp_avg": tensors[f"opt.{n}.exp_avg"].to(dev),
                            "exp_avg_sq": tensors[f"opt.{n}.exp_avg_sq"].to(dev)}
    gen.set_state(tensors["gen"])
    return int(meta["next_epoch"]), float(meta["seconds"])


if __name__ == "__main__":
    main()
