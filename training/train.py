"""Train a VAE / β-VAE on healthy slices (Zhou et al. 2020 settings: Adam, lr 1e-4, augmentation
with random noise, rotation and intensity changes).

    python training/train.py --cache data/healthy.npz --latent 64 --beta 1 --out runs/vae.safetensors
    torchrun --nproc_per_node 4 training/train.py ...        # several GPUs (DistributedDataParallel)

Writes the core library's checkpoint (safetensors + JSON metadata with this exact command), a CSV
log, a resumable state file, and thresholds calibrated on held-out healthy subjects (99th
percentile of each predictor inside the brain).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import common  # noqa: F401  (puts the core library on sys.path)
from vaeanomaly.checkpoint import save_checkpoint
from vaeanomaly.model import VAE, vae_loss
from vaeanomaly.predictors import PredictorOptions
from vaeanomaly.preprocessing import Preprocessing


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="JSON file with any of these options (command line wins)")
    ap.add_argument("--cache", help="slice cache .npz (built from --data if missing)")
    ap.add_argument("--data", help="healthy cohort folder (HCP layout or --pattern)")
    ap.add_argument("--pattern", help="glob for volumes under --data")
    ap.add_argument("--out", required=True, help="checkpoint path (.safetensors)")
    ap.add_argument("--name", help="model name in the metadata")
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=64, choices=[64, 128],
                    help="model grid: 64 (3.75 mm pixels over 240 mm, the paper's) or 128 (1.9 mm; one more stage)")
    ap.add_argument("--init", help="start from this checkpoint's weights (same architecture); recorded in the card")
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--val-fraction", type=float, default=0.1, help="held-out healthy subjects (thresholds)")
    ap.add_argument("--max-rotation", type=float, default=15.0, help="degrees")
    ap.add_argument("--noise", type=float, default=0.1, help="max std of added noise (z-score units)")
    ap.add_argument("--intensity", type=float, default=0.1, help="max relative intensity scale/shift")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-minutes", type=float, default=0, help="stop after this wall time (0: no limit)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--resume", action="store_true", help="continue from OUT.state.safetensors")
    ap.add_argument("--fp16", action="store_true", help="store weights as float16 (small bundled files)")
    ap.add_argument("--data-description", default="", help="free text stored in the model card")
    a = ap.parse_args(argv)
    if a.config:
        cfg = json.loads(Path(a.config).read_text(encoding="utf-8"))
        defaults = ap.parse_args(["--out", a.out])
        for k, v in cfg.items():
            k = k.replace("-", "_")
            if getattr(a, k, None) == getattr(defaults, k, None):
                setattr(a, k, v)
    return a


CHANNELS = {64: (16, 32, 64, 256), 128: (16, 32, 64, 128, 256)}  # one more stride-2 stage per doubling


from vaeanomaly.augment import augment  # noqa: E402  (one implementation, shared with `vaeanomaly adapt`)


def _state_path(out: Path) -> Path:
    return out.with_name(out.name.replace(".safetensors", "") + ".state.safetensors")


def save_state(path: Path, model, opt, epoch: int):
    from safetensors.torch import save_file
    t = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for i, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            t[f"opt.{i}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    save_file(t, str(path), metadata={"epoch": str(epoch)})


def load_state(path: Path, model, opt) -> int:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        epoch = int(f.metadata()["epoch"])
        t = {k: f.get_tensor(k) for k in f.keys()}
    model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
    sd = opt.state_dict()
    for key, v in t.items():
        if key.startswith("opt."):
            _, i, k = key.split(".", 2)
            sd["state"].setdefault(int(i), {})[k] = v
    opt.load_state_dict(sd)
    return epoch


def calibrate(model, beta, cache, case_ids, device, folder=None) -> dict:
    """Metadata updates from the held-out healthy subjects: thresholds (99th percentile inside the brain)
    for every predictor, Combi's constants and the options they hold for (the inference defaults).
    folder: the cohort folder of the cache, for the slice spacings (maps smoothed across slices).
    One implementation: vaeanomaly.calibration.calibrate (also used by training/calibrate.py)."""
    from vaeanomaly.calibration import calibrate as calibrate_checkpoint, cases_from_cache
    from vaeanomaly.data import slice_spacings
    ids = sorted(case_ids)
    spacing = slice_spacings(folder, [cache.names[i] for i in ids]) if folder else {}
    return calibrate_checkpoint(model, beta, cases_from_cache(cache, ids, spacing), PredictorOptions(),
                                device=device)


def main(argv=None):
    from common import code_version, command_line, hardware, load_or_build_cache
    a = parse(argv)
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = 0
    if ddp:
        torch.distributed.init_process_group("nccl" if a.device.startswith("cuda") else "gloo")
        rank = torch.distributed.get_rank()
        if a.device.startswith("cuda"):
            a.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(a.device)
    torch.manual_seed(a.seed)
    out = Path(a.out)
    if a.data:
        from vaeanomaly.synth import check_training_domains, read_manifest
        manifest = read_manifest(a.data)  # a generated cohort: never a held-out domain
        if manifest:
            check_training_domains({c["domain"] for c in manifest.values()})
    cache = load_or_build_cache(a.cache, a.data, lesion=False, pattern=a.pattern, image_size=a.image_size)
    from vaeanomaly.synth import HELD_OUT_DOMAINS, FOREIGN_DOMAINS
    leaked = [n for n in cache.names if any(f"-{d}-" in n.split("/")[0] for d in HELD_OUT_DOMAINS + FOREIGN_DOMAINS)]
    if leaked:
        raise SystemExit(f"the training cache holds cases of a held-out domain ({leaked[:3]}...): "
                         f"held-out domains never reach training")
    if cache.slices.shape[-1] != a.image_size:
        raise SystemExit(f"the cache holds {cache.slices.shape[-1]}x{cache.slices.shape[-1]} slices but "
                         f"--image-size is {a.image_size}")
    rng = np.random.default_rng(a.seed)
    n_cases = len(cache.names)
    val_ids = set(rng.choice(n_cases, max(1, int(round(a.val_fraction * n_cases))), replace=False).tolist()) \
        if n_cases > 1 and a.val_fraction > 0 else set()
    train_sel = ~np.isin(cache.case, list(val_ids))
    x_all = torch.from_numpy(cache.slices[train_sel].astype(np.float32))[:, None].to(a.device)
    b_all = torch.from_numpy(cache.brain[train_sel].astype(np.float32))[:, None].to(a.device)
    model = VAE(a.latent, a.image_size, CHANNELS[a.image_size]).to(a.device)
    if a.init:
        from vaeanomaly.checkpoint import load_checkpoint
        init = load_checkpoint(a.init)
        if init.model.config() != model.config():
            raise SystemExit(f"--init {a.init} has architecture {init.model.config()}, not {model.config()}")
        model.load_state_dict(init.model.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    start = 0
    if a.resume and _state_path(out).exists():
        start = load_state(_state_path(out), model, opt)
        if rank == 0:
            print(f"resumed from epoch {start}", file=sys.stderr)
    net = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    world = torch.distributed.get_world_size() if ddp else 1
    gen = torch.Generator(device=a.device).manual_seed(a.seed * 1000 + rank)   # augmentation: per rank
    order_gen = torch.Generator(device=a.device).manual_seed(a.seed)           # epoch order: same on all ranks
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.with_suffix(".csv")
    log = open(log_path, "a" if a.resume else "w", newline="")
    writer = csv.writer(log)
    if not a.resume or start == 0:
        writer.writerow(["epoch", "loss", "rec", "kl", "seconds"])
    from tqdm import tqdm
    bar = tqdm(range(start, a.epochs), desc=f"train l={a.latent} β={a.beta:g}", file=sys.stderr, disable=rank != 0)
    t0 = time.time()
    done_epochs, tot = start, [float("nan")] * 3
    for epoch in bar:
        net.train()
        perm = torch.randperm(len(x_all), generator=order_gen, device=a.device)[rank::world]
        tot = torch.zeros(3, device=a.device)
        nb = 0
        for i in range(0, len(perm) - a.batch_size + 1, a.batch_size):
            idx = perm[i:i + a.batch_size]
            x = augment(x_all[idx], b_all[idx], a, gen)
            loss, rec, kl = vae_loss(net, x, a.beta)  # net: the model, or its DDP wrapper
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += torch.stack([loss, rec, kl]).detach()  # no per-step device sync
            nb += 1
        tot = (tot / max(nb, 1)).tolist()
        if rank == 0:
            writer.writerow([epoch + 1, f"{tot[0]:.3f}", f"{tot[1]:.3f}", f"{tot[2]:.3f}", f"{time.time() - t0:.1f}"])
            log.flush()
            bar.set_postfix(loss=f"{tot[0]:.1f}", rec=f"{tot[1]:.1f}", kl=f"{tot[2]:.1f}")
            if (epoch + 1) % 10 == 0 or epoch + 1 == a.epochs:
                save_state(_state_path(out), model, opt, epoch + 1)
        done_epochs = epoch + 1
        if a.max_minutes and time.time() - t0 > 60 * a.max_minutes:
            print(f"stopping after {done_epochs} epochs: --max-minutes {a.max_minutes} reached", file=sys.stderr)
            if rank == 0:
                save_state(_state_path(out), model, opt, done_epochs)
            break
    log.close()
    if rank != 0:
        torch.distributed.destroy_process_group()
        return
    train_time = time.time() - t0
    val_sel = np.isin(cache.case, list(val_ids))
    calib = {}
    if val_sel.any():
        from calibrate import cache_folder
        folder = cache_folder(a.cache, a.data) if (a.cache or a.data) else None
        calib = calibrate(model.eval(), a.beta, cache, val_ids, a.device, folder)
    thresholds = calib.get("thresholds", {})
    meta = {
        "name": a.name or out.name.replace(".safetensors", ""),
        "beta": a.beta,
        "preprocessing": Preprocessing(image_size=a.image_size).to_dict(),
        "predictor_defaults": PredictorOptions().to_dict(),
        "thresholds": thresholds,
        "thresholds_note": "99th percentile inside the brain on held-out healthy subjects",
        "training": {
            "command": command_line(),
            "code_version": code_version(),
            "data": a.data_description or f"{n_cases} healthy subjects, {int(train_sel.sum())} training slices "
                                          f"({len(val_ids)} subjects held out for calibration)",
            "epochs": done_epochs, "batch_size": a.batch_size, "lr": a.lr, "seed": a.seed,
            "initialised_from": Path(a.init).name if a.init else None,
            "augmentation": {"max_rotation_deg": a.max_rotation, "noise": a.noise, "intensity": a.intensity},
            "time": f"{train_time:.0f} s", "hardware": hardware(a.device) + (f" x{world}" if ddp else ""),
            "final_loss": {"loss": tot[0], "rec": tot[1], "kl": tot[2]},
        },
    }
    save_checkpoint(out, model.cpu(), {**meta, **calib}, fp16=a.fp16)  # calib: thresholds, their options, Combi
    print(f"wrote {out} ({train_time:.0f} s, final loss {tot[0]:.2f}; log {log_path})", file=sys.stderr)
    if ddp:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
