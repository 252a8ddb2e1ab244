"""Predictor speed and memory on a 240x240x155 volume (prints figures; not a test).

    python benchmarks/bench_predictors.py [--threads 2] [--repeat 3] [--device cpu]

Each case runs in a fresh process so its peak resident memory (ru_maxrss) is its own. Cases:
each predictor alone (fused code path), the five non-projection maps in one fused call, the same
five maps one at a time (a separate full forward/backward each; 'reference-code-5' also computes
the weight gradients, as the reference code's loss.backward() does), and the
whole `score_volume` (preprocessing + all five maps + resampling back to the input grid).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "VAEAnomaly"))
FIVE = ["rec-error", "elbo-grad", "kl-grad", "rec-grad", "combi"]
BUSY_LOAD = 1.5


def busy_warning(load: float | None = None) -> str | None:
    """A warning when the 1-minute load average says other work is running (timings then mean little)."""
    import os
    load = os.getloadavg()[0] if load is None else load
    if load > BUSY_LOAD:
        return (f"WARNING: load average {load:.2f} > {BUSY_LOAD}: the machine is busy with other work; these "
                f"timings and ratios are not comparable to a quiet run. Re-run on a quiet machine.")
    return None


def run_case(case: str, threads: int, repeat: int, device: str) -> dict:
    import numpy as np
    import SimpleITK as sitk
    import torch
    torch.set_num_threads(threads)
    from vaeanomaly.checkpoint import load_checkpoint, sample_data
    from vaeanomaly.predictors import PredictorOptions, compute_maps, reference_map
    from vaeanomaly.volume import prepare, score_volume
    ck = load_checkpoint(None, device)
    img = sitk.ReadImage(str(sample_data("VAEAnomalySample_T2.nrrd")))
    slices = prepare(img).slices
    opts = PredictorOptions()

    def once():
        if case == "fused-5":
            compute_maps(ck.model, slices, FIVE, ck.beta, opts, device)
        elif case == "one-at-a-time-5":
            for p in FIVE:
                reference_map(ck.model, slices, p, ck.beta, opts)
        elif case == "reference-code-5":  # one at a time with loss.backward() (weight grads too)
            for p in FIVE:
                reference_map(ck.model, slices, p, ck.beta, opts, weight_grads=True)
        elif case == "score-volume-5":
            score_volume(ck, img, None, FIVE, opts, device)
        else:
            compute_maps(ck.model, slices, [case], ck.beta, opts, device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    once()  # warm-up
    times = []
    for _ in range(repeat if case != "proj-rec-error" else 1):
        t = time.perf_counter()
        once()
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"case": case, "ms": 1000 * float(np.median(times)), "peak_mb": peak / 1024,
            "slices": len(slices), "size": img.GetSize()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case:
        print(json.dumps(run_case(a.case, a.threads, a.repeat, a.device)))
        return
    cases = FIVE + ["fused-5", "one-at-a-time-5", "reference-code-5", "score-volume-5", "proj-rec-error"]
    rows, loads = [], []
    for c in cases:
        warning = busy_warning()
        loads.append(os.getloadavg()[0])
        if warning:
            print(warning, file=sys.stderr)
        r = subprocess.run([sys.executable, __file__, "--case", c, "--threads", str(a.threads), "--repeat",
                            str(a.repeat), "--device", a.device], capture_output=True, text=True, check=True)
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(f"{c:18s} {rows[-1]['ms']:9.0f} ms   peak RSS {rows[-1]['peak_mb']:6.0f} MB", file=sys.stderr)
    by = {r["case"]: r for r in rows}
    print(f"\nvolume {rows[0]['size']}, {rows[0]['slices']} axial slices at 64x64, {a.threads} threads, {a.device}\n")
    print("| case | ms per volume | peak RSS of the process (MB) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['ms']:.0f} | {r['peak_mb']:.0f} |")
    print("\n(peak RSS includes the torch import, about 0.5 GB, and reading + preprocessing the volume)")
    print(f"\nfused five maps / one rec-grad pass: {by['fused-5']['ms'] / by['rec-grad']['ms']:.2f}x (target <= 1.5)")
    print(f"one-at-a-time / fused (five maps): {by['one-at-a-time-5']['ms'] / by['fused-5']['ms']:.2f}x "
          f"without weight gradients, {by['reference-code-5']['ms'] / by['fused-5']['ms']:.2f}x with them as the "
          f"reference code's loss.backward() computes (target >= 3)")
    print(f"proj-rec-error, 100 steps: {by['proj-rec-error']['ms'] / 1000:.1f} s (target < 30 s)")
    worst = max(loads + [os.getloadavg()[0]])
    print(f"\nload average during the run: up to {worst:.2f} on {os.cpu_count()} cores" +
          (f" -- {busy_warning(worst)}" if busy_warning(worst) else " (quiet)"))


if __name__ == "__main__":
    main()
