"""Generate cohorts and their slice caches.

    # the varied generator (vaeanomaly/synth.py): training, calibration and the held-out benchmark
    python training/make_data.py varied --out data/v --train 50 --calibration 8 --benchmark 4
    # the original generator that made the paper-grid tables (docs/table1_latent.md, table2_beta.md)
    python training/make_data.py legacy --out data --healthy 100 --lesion 40

varied writes OUT/train, OUT/calibration (HCP layout, healthy) and OUT/benchmark (BraTS layout: one
subfolder per case, lesion families and healthy cases, every domain including the held-out ones),
each with a cohort.json manifest, and slice caches OUT/<split>_<size>.npz for each --sizes grid.
Training and calibration never use a held-out domain (synth.check_training_domains); the three
splits draw their seeds from disjoint ranges (synth.SPLIT_SEEDS).
"""
from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import common  # noqa: F401


def _write_legacy(args):
    out, i, lesion, seed = args
    from vaeanomaly.synth import write_one
    return write_one(out, i, lesion, seed)


def _write_case(args):
    out, case = args
    from vaeanomaly.synth import write_case
    return write_case(out, case)


def _csv(s):
    return [x.strip() for x in s.split(",") if x.strip()]


def main(argv=None):
    from vaeanomaly import synth
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("generator", nargs="?", choices=["varied", "legacy"], default="varied")
    ap.add_argument("--out", default="data")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--healthy", type=int, default=60, help="legacy: healthy subjects")
    ap.add_argument("--lesion", type=int, default=30, help="legacy: lesion subjects")
    ap.add_argument("--train", type=int, default=50, help="varied: healthy training subjects per training domain")
    ap.add_argument("--calibration", type=int, default=8, help="varied: healthy calibration subjects per training domain")
    ap.add_argument("--benchmark", type=int, default=4, help="varied: benchmark cases per (domain, family)")
    ap.add_argument("--validation", type=int, default=0,
                    help="varied: lesion cases per (training domain, family) for choosing option defaults "
                         "(never the benchmark's seeds or domains); 0: none")
    ap.add_argument("--seed-offset", type=int, default=0,
                    help="varied: start each split's seeds this far into its range (a second, independent draw, e.g. "
                         "--splits validation --seed-offset 1000 --out data/v2 after the first validation set was "
                         "searched)")
    ap.add_argument("--splits", type=_csv, default=None, help="varied: only these splits (default: all asked for)")
    ap.add_argument("--train-domains", type=_csv, default=list(synth.TRAINING_DOMAINS))
    ap.add_argument("--benchmark-domains", type=_csv, default=["tse", "tse-lowres"] + list(synth.HELD_OUT_DOMAINS))
    ap.add_argument("--families", type=_csv, default=list(synth.LESION_FAMILIES),
                    help="lesion families of the benchmark (healthy cases are always added)")
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in _csv(s)], default=[64],
                    help="model grids to cache (64, 128)")
    a = ap.parse_args(argv)
    from tqdm import tqdm

    from common import load_or_build_cache
    out = Path(a.out)
    t0 = time.time()
    if a.generator == "legacy":
        jobs = [(out / "healthy", i, False, 0) for i in range(a.healthy)] + \
               [(out / "lesion", i, True, 1) for i in range(a.lesion)]
        with ProcessPoolExecutor(a.workers) as ex:
            list(tqdm(ex.map(_write_legacy, jobs), total=len(jobs), desc="generating subjects", file=sys.stderr))
        for name, lesion in (("healthy", False), ("lesion", True)):
            c = load_or_build_cache(str(out / f"{name}.npz"), str(out / name), lesion=lesion)
            print(f"{name}: {len(c.names)} subjects, {len(c.slices)} slices -> {out / name}.npz", file=sys.stderr)
        return
    off = {"seed_offset": a.seed_offset}
    plans = {"train": synth.cohort_plan("train", a.train, a.train_domains, **off),
             "calibration": synth.cohort_plan("calibration", a.calibration, a.train_domains, **off),
             "benchmark": synth.cohort_plan("benchmark", a.benchmark, a.benchmark_domains, [None] + a.families, **off)}
    if a.validation:
        plans["validation"] = synth.cohort_plan("validation", a.validation, a.train_domains, [None] + a.families, **off)
    if a.splits:
        plans = {k: v for k, v in plans.items() if k in a.splits}
    jobs = []
    for split, plan in plans.items():
        synth.write_manifest(out / split, plan)
        jobs += [(out / split, c) for c in plan if not _done(out / split, c)]
    with ProcessPoolExecutor(a.workers) as ex:
        list(tqdm(ex.map(_write_case, jobs, chunksize=1), total=len(jobs), desc="generating subjects", file=sys.stderr))
    print(f"generated {len(jobs)} subjects in {time.time() - t0:.0f} s", file=sys.stderr)
    for size in a.sizes:
        for split in plans:
            cache = out / f"{split}_{size}.npz"
            c = load_or_build_cache(str(cache), str(out / split), lesion=split in synth.LESION_SPLITS,
                                   image_size=size)
            print(f"{split} ({size}x{size}): {len(c.names)} subjects, {len(c.slices)} slices -> {cache}", file=sys.stderr)


def _done(folder: Path, c: dict) -> bool:
    from vaeanomaly.synth import LESION_SPLITS
    if c["split"] in LESION_SPLITS:
        return (folder / c["case"] / f"{c['case']}_t2.nii.gz").exists()
    return (folder / c["case"] / "T1w" / "T2w_acpc_dc_restore_brain.nii.gz").exists()


if __name__ == "__main__":
    main()
