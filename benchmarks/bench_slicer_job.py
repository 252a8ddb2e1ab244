"""The Slicer module's Apply, start to heatmap node in the scene, cold and warm (prints figures; not a test).

    python benchmarks/bench_slicer_job.py [--repeats 3] [--threads N]

On the bundled sample volume (240x240x155) in a real vtkMRMLScene (slicer-core, headless), with the default
model and its own default predictor (--model: another), as the panel runs it: `ScoringJob(...).start(); wait();
finish()`.
- cold: the first Apply of a session (no worker yet: it starts, imports torch, loads the checkpoint);
- warm: the next Applies (the same worker; the checkpoint cached), the median of `repeats`: start -> heatmap
  node in the scene (shown as soon as the worker has written the maps, as the panel does), and start -> verdict;
each in ms and as a ratio to the network time (`compute_maps` for that predictor on the same prepared slices,
median of `repeats` runs after a warm-up). Issue 11's target: warm <= 4x the network time.
`measure()` returns the figures as a dict (benchmarks/bench_predictors.py prints them with the others).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from platform_facts import load_average  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "VAEAnomaly"))
TARGET_WARM_RATIO = 4.0


def measure(repeats: int = 3, threads: int | None = None, model: str | None = None) -> dict:
    """{'network_ms', 'cold_ms', 'warm_ms' (median), 'warm_runs_ms', 'cold_ratio', 'warm_ratio',
    'worker_ms' (median time of a warm request inside the worker: read, report, score_volume, write),
    'score_volume_ms' (in this process, for reference), 'target_warm_ratio', 'met', 'load', 'volume',
    'threads', 'model', 'predictor'}. threads: torch threads here and in the worker (None: torch's default in both).
    model: a bundled name or file (None: the default model); the predictor is that model's own default."""
    import numpy as np
    import SimpleITK as sitk
    import slicer
    import torch

    from VAEAnomalyLib import logic as L
    from VAEAnomalyLib import worker as W
    from vaeanomaly.checkpoint import load_checkpoint, sample_data
    from vaeanomaly.predictors import compute_maps
    from vaeanomaly.preprocessing import Preprocessing
    from vaeanomaly.registry import DEFAULT_PREDICTORS
    from vaeanomaly.volume import prepare, score_volume
    old_env = os.environ.get("OMP_NUM_THREADS")
    if threads:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # the worker's torch, which inherits the environment
    loads = [load_average()]
    try:
        img = sitk.ReadImage(str(sample_data("VAEAnomalySample_T2.nrrd")))
        scene = slicer.vtkMRMLScene()
        logic = L.VAEAnomalyLogic(scene)
        node = slicer.vtkMRMLScalarVolumeNode()
        node.SetName("VAEAnomalySample_T2")
        scene.AddNode(node)
        L.set_node_from_image(node, img)
        node.CreateDefaultDisplayNodes()

        # the network: compute_maps for the model's own predictor on its prepared slices
        ck = load_checkpoint(model)
        pred = DEFAULT_PREDICTORS[ck.kind]
        p = prepare(img, None, Preprocessing.from_dict(ck.preprocessing))
        slices = p.slices
        compute_maps(ck.model, slices, [pred], ck.beta, brain=p.brain)  # warm-up
        net = []
        for _ in range(repeats):
            t = time.perf_counter()
            compute_maps(ck.model, slices, [pred], ck.beta, brain=p.brain)
            net.append(time.perf_counter() - t)
        sv = []
        for _ in range(repeats):
            t = time.perf_counter()
            score_volume(ck, img, None, [pred])
            sv.append(time.perf_counter() - t)
        loads.append(load_average())

        def apply(heat=None):
            """As the panel runs it (its timer polls every 100 ms; here every 2 ms, so the figures measure the
            job, not the timer): the heatmap node as soon as the maps are written, then the verdict."""
            t = time.perf_counter()
            job = L.ScoringJob(logic, node, None, model, pred).start()
            t_heat = None
            while (rc := job.poll()) is None:
                if job.maps_ready and job.shown is None:
                    heat = job.show_maps(heat).heatmap
                    t_heat = time.perf_counter() - t
                time.sleep(0.002)
            if rc != 0:
                raise RuntimeError(f"the job failed: {job.error()}")
            res = job.finish(heat)
            total = time.perf_counter() - t
            return (total if t_heat is None else t_heat), total, job, res.heatmap

        W.shutdown()  # cold: no worker, and the panel side has not read the checkpoint either
        L._CHECKPOINTS = None
        cold, _, job, heat = apply()
        assert job.model_cached is False
        warm, verdict, inside = [], [], []
        for _ in range(repeats):
            s, total, job, heat = apply(heat)  # the panel's second Apply writes into its heatmap node again
            assert job.model_cached is True, "the warm worker did not keep the checkpoint"
            warm.append(s)
            verdict.append(total)
            inside.append(job.worker_seconds)
            loads.append(load_average())
        scene.Clear(1)
    finally:
        W.shutdown()
        if threads:
            if old_env is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = old_env
    net_ms = 1000 * float(np.median(net))
    warm_ms = 1000 * float(np.median(warm))
    return {"network_ms": net_ms, "cold_ms": 1000 * cold, "warm_ms": warm_ms,
            "warm_runs_ms": [1000 * w for w in warm], "warm_verdict_ms": 1000 * float(np.median(verdict)),
            "cold_ratio": 1000 * cold / net_ms, "warm_ratio": warm_ms / net_ms,
            "worker_ms": 1000 * float(np.median([x for x in inside if x is not None])),
            "score_volume_ms": 1000 * float(np.median(sv)),
            "target_warm_ratio": TARGET_WARM_RATIO, "met": warm_ms / net_ms <= TARGET_WARM_RATIO,
            "load": max(loads), "volume": list(img.GetSize()), "threads": threads or torch.get_num_threads(),
            "model": ck.name, "predictor": pred}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads here and in the worker")
    ap.add_argument("--model", default=None, help="bundled model name or file (default: the default model)")
    a = ap.parse_args()
    r = measure(a.repeats, a.threads, a.model)
    net = r["network_ms"]
    print(f"Slicer job on the sample {r['volume']}, {r['model']}, {r['predictor']}, {r['threads']} thread(s), "
          f"load average up to {r['load']:.2f} on {os.cpu_count()} cores")
    print("| case | ms | / network time |\n|---|---|---|")
    print(f"| network (compute_maps, {r['predictor']}; median of {a.repeats}) | {net:.0f} | 1.00x |")
    print(f"| score_volume ({r['predictor']}), in-process | {r['score_volume_ms']:.0f} | {r['score_volume_ms'] / net:.2f}x |")
    print(f"| cold job: first Apply (worker start, torch import, checkpoint load) | {r['cold_ms']:.0f} | "
          f"{r['cold_ratio']:.2f}x |")
    print(f"| warm job: next Apply, start -> heatmap node (median of {a.repeats}) | {r['warm_ms']:.0f} | "
          f"{r['warm_ratio']:.2f}x |")
    print(f"| warm job: start -> verdict too (the job's end; median of {a.repeats}) | {r['warm_verdict_ms']:.0f} | "
          f"{r['warm_verdict_ms'] / net:.2f}x |")
    print(f"|   of which inside the worker (read, score_volume, write, verdict) | {r['worker_ms']:.0f} | "
          f"{r['worker_ms'] / net:.2f}x |")
    print(f"\nwarm target <= {r['target_warm_ratio']:g}x the network: {'met' if r['met'] else 'NOT met'}")


if __name__ == "__main__":
    main()
