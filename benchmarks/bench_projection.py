"""Proj-Rec-Error with and without early stopping: pixel AUROC inside the brain, steps taken, time.

    python benchmarks/bench_projection.py [--cache data/v/benchmark_64.npz] [--cases 4] [--tol 0.002 0.005 0.01]

Lesion cases from the benchmark slice cache (read-only) if it exists, else generated ones
(vaeanomaly.synth.make_subject(seed, lesion=True)); brain slices only, batched (batch_size at a time), as
score_volume runs the projection. The early-stopping rule is predictors._project's: stop once the last 10
steps lowered the batch's energy by at most a fraction proj_tol; proj_steps (100, the paper's N) is the maximum.
Each row also gives the network time (compute_maps, Rec-grad, on the first case's slices, measured just before
the row) and the row's time as a ratio to it, the load average, and the process's peak memory so far (ru_maxrss).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from platform_facts import load_average, peak_rss_kb  # noqa: E402

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "VAEAnomaly"))


def lesion_cases(cache: Path, n: int):
    if cache.exists():
        from vaeanomaly.data import SliceCache
        c = SliceCache.load(cache)
        with_lesion = [i for i in range(len(c.names)) if c.label[c.case == i].any()]
        pick = [with_lesion[k] for k in np.linspace(0, len(with_lesion) - 1, n).astype(int)]
        return f"{cache} (read-only), cases {pick}", [(c.names[i], c.slices[c.case == i].astype(np.float32),
                                                       c.brain[c.case == i], c.label[c.case == i]) for i in pick]
    from vaeanomaly.preprocessing import Preprocessing
    from vaeanomaly.synth import make_subject
    from vaeanomaly.volume import label_on_grid, prepare
    out = []
    for seed in range(9100, 9100 + n):
        s = make_subject(seed, lesion=True)
        p = prepare(s.t2, s.brain_mask, Preprocessing())
        out.append((f"seed {seed}", p.slices, p.brain, label_on_grid(s.seg, p.grid)))
    return "generated lesion subjects (make_subject(seed, lesion=True))", out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=str(ROOT / "data" / "v" / "benchmark_64.npz"))
    ap.add_argument("--cases", type=int, default=4)
    ap.add_argument("--tol", type=float, nargs="+", default=[0.002, 0.005, 0.01])
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import torch
    torch.set_num_threads(a.threads)
    from vaeanomaly.checkpoint import DEFAULT_VAE, load_checkpoint
    from vaeanomaly.metrics import pixel_metrics
    from vaeanomaly.predictors import PredictorOptions, _project, compute_maps
    ck = load_checkpoint(DEFAULT_VAE)  # the projection is a VAE's
    model = ck.model.eval().requires_grad_(False)
    source, cases = lesion_cases(Path(a.cache), a.cases)
    print(f"model {ck.name}; {source}; {a.threads} threads")
    print("| proj_tol | steps per batch (mean, max) | AUROC in brain | AP | seconds | per case / network | load | "
          "peak RSS (MB) |\n|---|---|---|---|---|---|---|---|")
    for tol in [0.0] + list(a.tol):
        compute_maps(model, cases[0][1], ["rec-grad"], ck.beta)  # the network time, just before the row
        t_net = time.perf_counter()
        compute_maps(model, cases[0][1], ["rec-grad"], ck.beta)
        t_net = time.perf_counter() - t_net
        load = load_average()
        opts = PredictorOptions(proj_tol=tol)
        scores, labels, steps, t = [], [], [], time.perf_counter()
        for _, slices, brain, label in cases:
            sel = np.flatnonzero(brain.reshape(len(brain), -1).any(1))
            proj = np.zeros(slices.shape, np.float32)
            for s in range(0, len(sel), opts.batch_size):
                idx = sel[s:s + opts.batch_size]
                taken = [0]

                def step_done(k, taken=taken):  # k = steps done; an early stop reports proj_steps at once
                    if k < opts.proj_steps or taken[0] == opts.proj_steps - 1:
                        taken[0] = k

                x = torch.as_tensor(slices[idx, None])
                proj[idx] = _project(model, x, opts, step_done)[:, 0].numpy()
                steps.append(min(taken[0], opts.proj_steps))
            scores.append(proj[brain])
            labels.append(label[brain])
        dt = time.perf_counter() - t
        m = pixel_metrics(np.concatenate(scores), np.concatenate(labels))
        print(f"| {tol:g}{' (off: N = 100)' if tol == 0 else ''} | {np.mean(steps):.0f}, {max(steps)} | "
              f"{m['auroc']:.4f} | {m['ap']:.4f} | {dt:.1f} | {dt / len(cases) / t_net:.0f}x ({1000 * t_net:.0f} ms) | "
              f"{max(load, load_average()):.2f} | {peak_rss_kb() / 1024:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
