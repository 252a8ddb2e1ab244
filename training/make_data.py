"""Generate the embedded cohorts and their slice caches.

    python training/make_data.py --out data --healthy 60 --lesion 30

Writes data/healthy/ (HCP layout), data/lesion/ (BraTS layout), data/healthy.npz and
data/lesion.npz (slice caches for train.py / evaluate.py / fit_ensemble.py). Deterministic: the
healthy cohort uses seed 0, the lesion cohort seed 1 (no subject appears in both).
"""
from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import common  # noqa: F401


def _write(args):
    out, i, lesion, seed = args
    from vaeanomaly.synth import write_one
    return write_one(out, i, lesion, seed)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data")
    ap.add_argument("--healthy", type=int, default=60)
    ap.add_argument("--lesion", type=int, default=30)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args(argv)
    from tqdm import tqdm

    from common import load_or_build_cache
    out = Path(a.out)
    t0 = time.time()
    jobs = [(out / "healthy", i, False, 0) for i in range(a.healthy)] + \
           [(out / "lesion", i, True, 1) for i in range(a.lesion)]
    with ProcessPoolExecutor(a.workers) as ex:
        list(tqdm(ex.map(_write, jobs), total=len(jobs), desc="generating subjects", file=sys.stderr))
    print(f"generated {a.healthy} healthy + {a.lesion} lesion subjects in {time.time() - t0:.0f} s", file=sys.stderr)
    for name, lesion in (("healthy", False), ("lesion", True)):
        c = load_or_build_cache(str(out / f"{name}.npz"), str(out / name), lesion=lesion)
        print(f"{name}: {len(c.names)} subjects, {len(c.slices)} slices -> {out / name}.npz", file=sys.stderr)


if __name__ == "__main__":
    main()
