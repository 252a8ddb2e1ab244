"""The `vaeanomaly` command: score, evaluate, generate, info, demo."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .predictors import ALL_OUTPUTS, PREDICTORS, PredictorOptions, parse_predictors


class Progress:
    """tqdm bar on stderr, or 'PROGRESS <fraction>' lines for a parent process (the Slicer module)."""

    def __init__(self, mode: str, desc: str):
        self.mode, self.bar = mode, None
        if mode == "bar":
            from tqdm import tqdm
            self.bar = tqdm(total=1000, desc=desc, file=sys.stderr, bar_format="{l_bar}{bar}| {elapsed}<{remaining}")

    def __call__(self, frac: float):
        if self.bar is not None:
            self.bar.n = int(1000 * min(frac, 1.0))
            self.bar.refresh()
        elif self.mode == "lines":
            print(f"PROGRESS {frac:.4f}", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _options(a) -> PredictorOptions:
    if getattr(a, "options", None):  # one serialised PredictorOptions (the Slicer module's job)
        import json
        return PredictorOptions.from_dict(json.loads(Path(a.options).read_text()))
    return PredictorOptions(smooth=not a.no_smooth, proj_steps=a.proj_steps, proj_lambda=a.proj_lambda,
                            proj_lr=a.proj_lr, proj_weighted=a.proj_weighted, batch_size=a.batch_size)


def _add_model_args(p):
    p.add_argument("--model", help="checkpoint file or bundled model name (default: the bundled default)")
    p.add_argument("--predictor", default="rec-grad",
                   help=f"one of {', '.join(PREDICTORS)}, ensemble; a comma-separated list; or 'all'")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (falls back to cpu if unavailable)")
    p.add_argument("--no-smooth", action="store_true", help="no Gaussian smoothing of gradient maps")
    p.add_argument("--proj-steps", type=int, default=100, help="Proj-Rec-Error: projection steps N")
    p.add_argument("--proj-lambda", type=float, default=0.5, help="Proj-Rec-Error: L1 weight λ")
    p.add_argument("--proj-lr", type=float, default=0.03, help="Proj-Rec-Error: Adam step α")
    p.add_argument("--proj-weighted", action="store_true", help="Dehaene et al.'s error-weighted step")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--options", metavar="OPTIONS.json",
                   help="PredictorOptions as JSON (PredictorOptions.to_dict()); replaces the option flags above")
    p.add_argument("--progress", choices=["bar", "lines", "none"], default="bar")


def pick_device(name: str) -> str:
    import torch
    if name.startswith("cuda") and not torch.cuda.is_available():
        print("warning: CUDA not available, using the CPU", file=sys.stderr)
        return "cpu"
    return name


def cmd_score(a) -> int:
    import SimpleITK as sitk

    from .checkpoint import load_checkpoint
    from .threshold import resolve_threshold
    from .volume import read_image, score_volume
    names = parse_predictors(a.predictor)
    ck = load_checkpoint(a.model)
    img = read_image(a.input)
    mask = read_image(a.mask, "mask") if a.mask else None
    prog = Progress(a.progress, "scoring")
    maps = score_volume(ck, img, mask, names, _options(a), pick_device(a.device), progress=prog)
    prog.close()
    out = Path(a.output)
    image_suffix = out.name.lower().endswith((".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd"))
    many = len(names) > 1 or a.predictor == "all" or not image_suffix
    if many:
        out.mkdir(parents=True, exist_ok=True)
    for name, m in maps.items():
        path = out / f"{name}.nii.gz" if many else out
        sitk.WriteImage(m, str(path))
        print(f"wrote {path}", file=sys.stderr)
    if a.threshold is not None:
        if not a.label:
            raise ValueError("--threshold needs --label LABEL.nii.gz")
        name = names[0]
        arr = sitk.GetArrayFromImage(maps[name])
        t = resolve_threshold(a.threshold, arr, arr > 0, ck.thresholds, name)
        lab = sitk.GetImageFromArray((arr > t).astype(np.uint8))
        lab.CopyInformation(maps[name])
        sitk.WriteImage(lab, str(a.label))
        print(f"wrote {a.label}: {name} > {t:.4g}, {int((arr > t).sum())} voxels", file=sys.stderr)
    return 0


def cmd_evaluate(a) -> int:
    from .checkpoint import load_checkpoint
    from .data import brats_items, build_cache
    from .evaluation import evaluate, format_table
    names = parse_predictors(a.predictor)
    ck = load_checkpoint(a.model)
    items = brats_items(a.folder)
    prog = Progress(a.progress, "preprocessing")
    cache = build_cache(items, progress=prog)
    prog.close()
    prog = Progress(a.progress, "scoring")
    res = evaluate(ck, cache.cases(), names, _options(a), pick_device(a.device), progress=prog)
    prog.close()
    print(f"{ck.name}: {len(items)} cases, pixels at the model grid ({ck.model.image_size}x{ck.model.image_size} slices)")
    for scope in ("brain", "all"):
        for metric in ("auroc", "ap", "dice"):
            where = "inside the brain" if scope == "brain" else "all pixels, background included"
            print(f"{metric.upper()}, {where}\n\n" + format_table({ck.name: res}, scope, metric) + "\n")
    return 0


def cmd_generate(a) -> int:
    from .synth import write_cohort, write_sample
    if a.sample:
        for name, sha in write_sample(a.output, a.seed).items():
            print(f"{a.output}/{name}  SHA256:{sha}")
        return 0
    prog = Progress(a.progress, "generating")
    paths = write_cohort(a.output, a.n, a.lesion, a.seed, progress=prog)
    prog.close()
    print(f"wrote {len(paths)} {'lesion' if a.lesion else 'healthy'} subjects under {a.output}")
    return 0


def cmd_info(a) -> int:
    from .checkpoint import bundled_models, load_checkpoint
    if a.list:
        print("\n".join(bundled_models()))
        return 0
    print(load_checkpoint(a.model).card())
    return 0


def cmd_demo(a) -> int:
    """Generate a lesion case, score it with a bundled checkpoint, write heatmaps + figure, print AUROC."""
    import SimpleITK as sitk

    from .checkpoint import load_checkpoint
    from .figures import overlay_figure
    from .metrics import pixel_metrics
    from .synth import make_subject
    from .volume import score_volume
    out = Path(a.output)
    (out / "heatmaps").mkdir(parents=True, exist_ok=True)
    ck = load_checkpoint(a.model)
    print(ck.card(), "\n")
    sub = make_subject(a.seed, lesion=True)
    for name, im in (("case_t2", sub.t2), ("case_seg", sub.seg), ("case_brainmask", sub.mask)):
        sitk.WriteImage(im, str(out / f"{name}.nii.gz"))
    names = [p for p in PREDICTORS if p != "proj-rec-error" or a.with_projection]
    if ck.ensemble is not None:
        names.append("ensemble")
    prog = Progress(a.progress, "scoring")
    maps = score_volume(ck, sub.t2, sub.mask, names, progress=prog)
    prog.close()
    brain = sitk.GetArrayFromImage(sub.mask) > 0
    gt = sitk.GetArrayFromImage(sub.seg) > 0
    arrays = {}
    print(f"pixel AUROC inside the brain, demo case (seed {a.seed}, never seen in training):")
    for name, m in maps.items():
        sitk.WriteImage(m, str(out / "heatmaps" / f"{name}.nii.gz"))
        arrays[name] = sitk.GetArrayFromImage(m)
        r = pixel_metrics(arrays[name][brain], gt[brain])
        print(f"  {name:15s} AUROC {r['auroc']:.3f}   AP {r['ap']:.3f}   best Dice {r['dice']:.3f}")
    overlay_figure(out / "overlay.png", sitk.GetArrayFromImage(sub.t2), arrays, gt,
                   title=f"{ck.name}: anomaly maps (green: ground-truth lesion)")
    print(f"\nwrote {out}/case_t2.nii.gz, {out}/heatmaps/*.nii.gz and {out}/overlay.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vaeanomaly", description="Unsupervised anomaly maps for brain MRI (VAE / β-VAE).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("score", help="heatmap(s) for one volume, on the input's grid")
    p.add_argument("input", help="3D volume (NIfTI, NRRD, MHA, ...) or a DICOM series folder")
    p.add_argument("-o", "--output", required=True,
                   help="OUT.nii.gz (one predictor), or a folder: one <predictor>.nii.gz per map")
    p.add_argument("--mask", help="brain mask on the input grid (default: automatic foreground mask, "
                                  "for skull-stripped input)")
    p.add_argument("--threshold", help="number, percentile in the brain (p99), or 'auto' (calibrated)")
    p.add_argument("--label", help="with --threshold: write the thresholded label map here")
    _add_model_args(p)
    p.set_defaults(func=cmd_score)
    p = sub.add_parser("evaluate", help="metrics tables over a BraTS-layout folder")
    p.add_argument("folder")
    _add_model_args(p)
    p.set_defaults(func=cmd_evaluate, predictor="all")
    p = sub.add_parser("generate", help="write N synthetic subjects (healthy: HCP layout; --lesion: BraTS layout)")
    p.add_argument("output")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--lesion", action="store_true")
    p.add_argument("--sample", action="store_true", help="write the Slicer module's sample case (use --seed 9001)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", choices=["bar", "lines", "none"], default="bar")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("info", help="a checkpoint's model card")
    p.add_argument("model", nargs="?")
    p.add_argument("--list", action="store_true", help="list the bundled models")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("demo", help="generate a lesion case, score it, write heatmaps and a figure")
    p.add_argument("--output", default="demo_output")
    p.add_argument("--model")
    p.add_argument("--seed", type=int, default=9001)
    p.add_argument("--with-projection", action="store_true", help="include Proj-Rec-Error (slower)")
    p.add_argument("--progress", choices=["bar", "lines", "none"], default="bar")
    p.set_defaults(func=cmd_demo)
    return ap


def main(argv=None) -> int:
    from .checkpoint import CheckpointError
    from .volume import VolumeError
    a = build_parser().parse_args(argv)
    try:
        return a.func(a)
    except (VolumeError, CheckpointError, ValueError, FileNotFoundError) as err:
        print(f"vaeanomaly: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
