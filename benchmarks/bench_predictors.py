"""Predictor speed and memory on a 240x240x155 volume (prints figures; not a test).

    python benchmarks/bench_predictors.py [--threads 2] [--repeat 3] [--device cpu]

Each case runs in a fresh process so its peak resident memory (ru_maxrss) is its own. Cases:
each predictor alone (fused code path), the five non-projection maps in one fused call, the same
five maps one at a time (a separate full forward/backward each; 'reference-code-5' also computes
the weight gradients, as the reference code's loss.backward() does), and the
whole `score_volume` (preprocessing + all five maps + resampling back to the input grid).
Issue 11 added: `score_volume` for Rec-grad alone (against the network time, `compute_maps` for Rec-grad) and
the same with the replaced 3D-resampling preprocessing ('score-volume-resampling'); `prepare` and
`to_input_grid` alone; Proj-Rec-Error on brain slices only, with and without early stopping; cohort throughput
(`vaeanomaly.cohort.score_many` over copies of the sample, DataLoader workers, heatmaps written as .nii.gz).
Every time is also given as a ratio to the network time (the 'rec-grad' case). Peak memory: the process's peak
resident set (ru_maxrss) and the peak of memory traced by tracemalloc (numpy arrays and Python objects; torch's
CPU tensors are not traced) during one extra run of the case. The Slicer job (cold and warm Apply) comes from
benchmarks/bench_slicer_job.py's measure(), in a process of its own, for the default model and for the default VAE
(checkpoint.DEFAULT_VAE, which every VAE case above uses): their warm Apply times side by side (issue 24: <= 3x).

--interleaved (for a busy machine): one process; each round times every case back to back, so the load hits them
alike; medians over rounds and ratios to the network time of the same rounds, with the load average next to each
figure. --clock cpu measures process CPU time instead of wall time (with --threads 1 the fairest A/B on a machine
shared with other work: time spent waiting for a core is not counted).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from platform_facts import load_average, peak_rss_kb  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "VAEAnomaly"))
FIVE = ["rec-error", "elbo-grad", "kl-grad", "rec-grad", "combi"]
BUSY_LOAD = 1.5
PROJ_TOL = 0.005  # the early-stopping tolerance the bench times (see benchmarks/bench_projection.py for AUROC)
TARGET_VERDICT_RATIO = 5.0        # issue 17: warm Apply, start -> verdict, <= 5x the network time
TARGET_VERDICT_EXTRA_RATIO = 1.0  # issue 17: the verdict on top of the heatmap <= 1x the network time


def auto_mask_itk(img):
    """The replaced automatic mask (ITK's filters on the whole volume; the 'replaced path' case): the
    reference implementation the equality tests keep, Testing/Python/test_speed_paths.py."""
    sys.path.insert(0, str(ROOT / "Testing" / "Python"))
    from test_speed_paths import auto_mask_itk as reference
    return reference(img)


def traced_peak_mb(f) -> float:
    """Peak of the memory tracemalloc traces (numpy arrays, Python objects) while f() runs, in MB."""
    import tracemalloc
    tracemalloc.start()
    try:
        f()
        return tracemalloc.get_traced_memory()[1] / 2 ** 20
    finally:
        tracemalloc.stop()


def slicer_job(threads: int, repeats: int = 3, model: str | None = None) -> dict | str:
    """benchmarks/bench_slicer_job.py's measure() in a process of its own: its dict, or why it was not measured.
    model: None for the default model."""
    code = ("import json, sys; sys.path.insert(0, %r); import bench_slicer_job as B; "
            "print(json.dumps(B.measure(repeats=%d, threads=%d, model=%r)))"
            % (str(ROOT / "benchmarks"), repeats, threads, model))
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"{type(err).__name__}: {err}"
    if r.returncode != 0:
        lines = [ln for ln in (r.stderr or r.stdout).strip().splitlines() if ln.strip()]
        return lines[-1] if lines else f"exit status {r.returncode}"
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return "its output was not the expected JSON"


def print_slicer_job(res, net_ms: float) -> None:
    """The Slicer job's figures (bench_slicer_job.measure's dict, or why it was not measured), each in ms and as
    ratios to this run's network time and to the job's own network time, beside its target."""
    if isinstance(res, str):
        print(f"slicer job: not measured ({res})")
        return
    own = res["network_ms"]

    def ratios(ms: float, target: float) -> str:
        return f"{ms:.0f} ms = {ms / net_ms:.2f}x this run's network time ({ms / own:.2f}x the job's own; target <= " \
               f"{target:g}x)"

    print(f"slicer job (bench_slicer_job.measure, {res.get('threads')} threads, load up to {res.get('load', 0):.2f}; "
          f"the job's own network time {own:.0f} ms): cold {res['cold_ms']:.0f} ms = {res['cold_ms'] / net_ms:.1f}x")
    print(f"slicer job, warm start -> heatmap node: {ratios(res['warm_ms'], res.get('target_warm_ratio', 4))}")
    if "warm_verdict_ms" not in res:
        return
    verdict = res["warm_verdict_ms"]
    print(f"slicer job, warm start -> verdict: {ratios(verdict, TARGET_VERDICT_RATIO)}")
    print(f"slicer job, the verdict on top of the heatmap (difference of the medians): "
          f"{ratios(verdict - res['warm_ms'], TARGET_VERDICT_EXTRA_RATIO)}")


TARGET_DEFAULT_VS_VAE = 3.0  # issue 24: the default model's warm Apply -> heatmap <= 3x the VAE's, in one run


def print_default_against_vae(default, vae) -> None:
    """The default model's warm Apply (start -> heatmap node) beside the default VAE's, measured in the same run."""
    if isinstance(default, str) or isinstance(vae, str):
        print(f"default model against the VAE: not measured ({default if isinstance(default, str) else vae})")
        return
    ratio = default["warm_ms"] / vae["warm_ms"]
    print(f"slicer job, warm start -> heatmap node: {default['model']} ({default['predictor']}) {default['warm_ms']:.0f} ms, "
          f"{vae['model']} ({vae['predictor']}) {vae['warm_ms']:.0f} ms: {ratio:.2f}x (target <= "
          f"{TARGET_DEFAULT_VS_VAE:g}x: {'met' if ratio <= TARGET_DEFAULT_VS_VAE else 'NOT met'})")


def busy_warning(load: float | None = None) -> str | None:
    """A warning when the 1-minute load average says other work is running (timings then mean little)."""
    import os
    load = load_average() if load is None else load
    if load > BUSY_LOAD:
        return (f"WARNING: load average {load:.2f} > {BUSY_LOAD}: the machine is busy with other work; these "
                f"timings and ratios are not comparable to a quiet run. Re-run on a quiet machine.")
    return None


# a new predictor against one Rec-grad pass on the same grid (issue 16: at most 1.5x): case -> (bundled model, map)
OTHER_GRIDS = {"dae-residual-64": ("dae-64", "dae-residual"), "rec-grad-64-brain": (None, "rec-grad"),
               "dae-residual-128": ("dae-128-blobs", "dae-residual"), "rec-grad-128-brain": ("bvae-l128-b10-v2", "rec-grad")}


def run_case(case: str, threads: int, repeat: int, device: str) -> dict:
    import numpy as np
    import SimpleITK as sitk
    import torch
    torch.set_num_threads(threads)
    from vaeanomaly.checkpoint import DEFAULT_VAE, load_checkpoint, sample_data
    from vaeanomaly.predictors import PredictorOptions, compute_maps, reference_map
    from vaeanomaly import volume as V
    from vaeanomaly.volume import prepare, score_volume
    model, pred = OTHER_GRIDS.get(case, (None, None))
    ck = load_checkpoint(model or DEFAULT_VAE, device)  # the VAE's cases: the default VAE
    img = sitk.ReadImage(str(sample_data("VAEAnomalySample_T2.nrrd")))
    from vaeanomaly.preprocessing import Preprocessing
    prepared = prepare(img, None, Preprocessing.from_dict(ck.preprocessing))
    slices = prepared.slices
    opts = PredictorOptions()
    n_items = 0
    if case == "cohort":  # copies of the sample, written once (uncompressed NRRD, as a scanner export would be)
        import tempfile
        tmp = Path(tempfile.mkdtemp(prefix="vaeanomaly-bench-"))
        n_items = 2 * max(threads, 2)
        for k in range(n_items):
            sitk.WriteImage(img, str(tmp / f"case{k:02d}.nrrd"))

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
        elif case == "score-volume-rec-grad":
            score_volume(ck, img, None, ["rec-grad"], opts, device)
        elif case == "score-volume-resampling":  # the replaced path: 3D reorient/smooth/resample and back
            p = V.prepare_by_resampling(img, auto_mask_itk(img))  # ITK's filters on the whole volume too
            m = compute_maps(ck.model, p.slices, ["rec-grad"], ck.beta, opts, device)["rec-grad"]
            V.to_input_grid_by_resampling(np.where(p.brain, m, 0), p)
        elif case == "prepare":
            prepare(img)
        elif case == "to-input-grid":
            V.to_input_grid(slices, prepared)
        elif case == "proj-rec-error-brain":
            compute_maps(ck.model, slices, ["proj-rec-error"], ck.beta, opts, device, brain=prepared.brain)
        elif case == "proj-rec-error-brain-tol":
            compute_maps(ck.model, slices, ["proj-rec-error"], ck.beta, PredictorOptions(proj_tol=PROJ_TOL), device,
                         brain=prepared.brain)
        elif case in OTHER_GRIDS:  # one map of another bundled model, with the brain mask (its finishing steps)
            compute_maps(ck.model, slices, [pred], ck.beta, opts, device, brain=prepared.brain)
        elif case == "cohort":
            import shutil
            from vaeanomaly.cohort import expand_inputs, score_many
            out = tmp / "out"
            shutil.rmtree(out, ignore_errors=True)
            from vaeanomaly.scoring import ScoreRequest
            request = ScoreRequest(input=str(tmp), output=str(out), predictors="rec-grad", options=opts, device=device)
            rows = score_many(ck, expand_inputs([str(tmp)]), request.checked(ck), out, request, workers=2,
                              log=open(os.devnull, "w"))
            assert all(r["status"] == "ok" for r in rows), rows
        else:
            compute_maps(ck.model, slices, [case], ck.beta, opts, device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    if not case.startswith(("proj-rec-error", "cohort")):  # (the long cases: one timed run, no warm-up)
        once()  # warm-up
    times = []
    for _ in range(repeat if not case.startswith(("proj-rec-error", "cohort")) else 1):
        t = time.perf_counter()
        once()
        times.append(time.perf_counter() - t)
    peak = peak_rss_kb()
    traced = traced_peak_mb(once) if not case.startswith(("proj-rec-error", "cohort")) else float("nan")
    if case == "cohort":
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return {"case": case, "ms": 1000 * float(np.median(times)), "peak_mb": peak / 1024, "traced_mb": traced,
            "slices": len(slices), "size": img.GetSize(), "items": n_items,
            "brain_slices": int(prepared.brain.reshape(len(slices), -1).any(1).sum())}


def interleaved(threads: int, rounds: int, device: str, cohort_items: int, clock: str = "wall",
                proj: bool = True, job: bool = True) -> None:
    """--interleaved: for a busy machine. One process; each round times the network (compute_maps, Rec-grad),
    score_volume (Rec-grad), prepare, to_input_grid, the five fused maps, the reference code's way and the replaced
    resampling path back to back, so the load hits them alike; medians over rounds, ratios to the network time of
    the same rounds, the load average next to each figure; then the projection, the cohort, the Slicer job and
    peak memory once."""
    import shutil
    import tempfile

    import numpy as np
    import SimpleITK as sitk
    import torch
    torch.set_num_threads(threads)
    from vaeanomaly import volume as V
    from vaeanomaly.checkpoint import DEFAULT_VAE, load_checkpoint, sample_data
    from vaeanomaly.cohort import expand_inputs, score_many
    from vaeanomaly.predictors import PredictorOptions, compute_maps, reference_map
    from vaeanomaly.scoring import ScoreRequest
    tick = time.process_time if clock == "cpu" else time.perf_counter
    ck = load_checkpoint(DEFAULT_VAE, device)
    img = sitk.ReadImage(str(sample_data("VAEAnomalySample_T2.nrrd")))
    p = V.prepare(img)
    compute_maps(ck.model, p.slices, ["rec-grad"], ck.beta, None, device)  # warm-up

    def old_path():
        q = V.prepare_by_resampling(img, auto_mask_itk(img))
        m = compute_maps(ck.model, q.slices, ["rec-grad"], ck.beta, None, device)["rec-grad"]
        V.to_input_grid_by_resampling(np.where(q.brain, m, 0), q)

    def reference_way():
        for name in FIVE:
            reference_map(ck.model, p.slices, name, ck.beta, None, weight_grads=True)

    net_key = "network (compute_maps, rec-grad)"
    cases = {net_key: lambda: compute_maps(ck.model, p.slices, ["rec-grad"], ck.beta, None, device),
             "score_volume (rec-grad)": lambda: V.score_volume(ck, img, None, ["rec-grad"], None, device),
             "prepare": lambda: V.prepare(img),
             "to_input_grid": lambda: V.to_input_grid(p.slices, p),
             "fused five maps (compute_maps)": lambda: compute_maps(ck.model, p.slices, FIVE, ck.beta, None, device),
             "reference code's way (5 maps, loss.backward())": reference_way,
             "replaced path (3D resampling, ITK mask)": old_path}
    times = {k: [] for k in cases}
    loads = {k: [] for k in cases}
    for r in range(rounds):
        for k, f in cases.items():
            loads[k].append(load_average())
            t = tick()
            f()
            times[k].append(tick() - t)
            print(f"round {r + 1}: {k:48s} {1000 * times[k][-1]:9.0f} ms  load {loads[k][-1]:.2f}",
                  file=sys.stderr, flush=True)
    net = 1000 * float(np.median(times[net_key]))
    med = {k: 1000 * float(np.median(v)) for k, v in times.items()}
    rows = [(k, med[k], float(np.median(loads[k]))) for k in cases]
    brain_slices = int(p.brain.reshape(len(p.brain), -1).any(1).sum())
    if proj:  # (long: once each)
        for label, opts in ((f"proj-rec-error, {brain_slices} brain slices, 100 steps", PredictorOptions()),
                            (f"proj-rec-error, {brain_slices} brain slices, early stop (proj_tol {PROJ_TOL:g})",
                             PredictorOptions(proj_tol=PROJ_TOL))):
            load = load_average()
            t = tick()
            compute_maps(ck.model, p.slices, ["proj-rec-error"], ck.beta, opts, device, brain=p.brain)
            rows.append((label, 1000 * (tick() - t), load))
            print(f"{label}: {rows[-1][1]:.0f} ms", file=sys.stderr, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="vaeanomaly-bench-"))
    try:
        for k in range(cohort_items):
            sitk.WriteImage(img, str(tmp / f"case{k:02d}.nrrd"))
        load = load_average()
        t = time.perf_counter()  # (wall time: the DataLoader workers are other processes)
        request = ScoreRequest(input=str(tmp), output=str(tmp / "out"), predictors="rec-grad", device=device)
        res = score_many(ck, expand_inputs([str(tmp)]), request.checked(ck), tmp / "out", request, workers=2,
                         log=open(os.devnull, "w"))
        cohort_s = time.perf_counter() - t
        assert all(r_["status"] == "ok" for r_ in res), res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows.append((f"cohort: {cohort_items} copies, 2 DataLoader workers, read + score + write .nii.gz (wall)",
                 1000 * cohort_s / cohort_items, load))
    traced = {"score_volume (rec-grad)": traced_peak_mb(cases["score_volume (rec-grad)"]),
              "fused five maps (compute_maps)": traced_peak_mb(cases["fused five maps (compute_maps)"])}
    print(f"\nvolume {img.GetSize()}, {len(p.slices)} slices ({brain_slices} with brain), {threads} thread(s), "
          f"{device}, {rounds} interleaved rounds (medians), {'process CPU time' if clock == 'cpu' else 'wall time'}\n")
    print("| case | ms per volume | / network time | load (1-min average) |\n|---|---|---|---|")
    for k, ms, load in rows:
        print(f"| {k} | {ms:.0f} | {ms / net:.2f}x | {load:.2f} |")
    print(f"\nnetwork time (compute_maps, Rec-grad): {net:.0f} ms")
    print(f"score_volume (Rec-grad) / network: {med['score_volume (rec-grad)'] / net:.2f}x (target <= 2)")
    print(f"fused five maps / one Rec-grad pass: {med['fused five maps (compute_maps)'] / net:.2f}x (target <= 1.25)")
    ref_key = "reference code's way (5 maps, loss.backward())"
    print(f"reference code's way / fused: {med[ref_key] / med['fused five maps (compute_maps)']:.2f}x (target >= 3)")
    if proj:
        for k, ms, load in rows:
            if k.startswith("proj-rec-error"):
                print(f"{k}: {ms / 1000:.1f} s = {ms / net:.1f}x network (target <= 4 s for 100 steps)")
    print(f"cohort throughput: {60 * cohort_items / cohort_s:.1f} volumes/min")
    print(f"peak memory: RSS of this process {peak_rss_kb() / 1024:.0f} MB "
          f"(torch import, model, all cases; workers not counted); traced by tracemalloc (numpy + Python) during "
          + ", ".join(f"{k} {v:.0f} MB" for k, v in traced.items()))
    if job:
        print_slicer_job(slicer_job(threads), net)
    worst = max(max(v) for v in loads.values())
    worst = max(worst, load_average())
    print(f"load average during the run: up to {worst:.2f} on {os.cpu_count()} cores" +
          (f" -- {busy_warning(worst)}" if busy_warning(worst) else " (quiet)"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--only", nargs="+", metavar="CASE", help="run only these cases ('rec-grad', the network time, "
                                                              "is always run)")
    ap.add_argument("--interleaved", action="store_true",
                    help="busy machine: the score_volume / preprocessing cases in one process, alternating rounds")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="--interleaved: wall time, or process CPU time (with --threads 1: A/B on a shared machine)")
    ap.add_argument("--no-projection", action="store_true", help="--interleaved: leave out the projection")
    ap.add_argument("--no-slicer-job", action="store_true", help="leave out the Slicer job")
    a = ap.parse_args()
    if a.interleaved:
        interleaved(a.threads, a.rounds, a.device, 2, a.clock, not a.no_projection, not a.no_slicer_job)
        return
    if a.case:
        print(json.dumps(run_case(a.case, a.threads, a.repeat, a.device)))
        return
    cases = FIVE + ["fused-5", "one-at-a-time-5", "reference-code-5", "prepare", "to-input-grid",
                    "score-volume-rec-grad", "score-volume-resampling", "score-volume-5", "proj-rec-error",
                    "proj-rec-error-brain", "proj-rec-error-brain-tol", "cohort"] + list(OTHER_GRIDS)
    if a.only:
        cases = [c for c in cases if c in set(a.only) | {"rec-grad"}]
    rows, loads = [], []
    for c in cases:
        warning = busy_warning()
        loads.append(load_average())
        if warning:
            print(warning, file=sys.stderr)
        r = subprocess.run([sys.executable, __file__, "--case", c, "--threads", str(a.threads), "--repeat",
                            str(a.repeat), "--device", a.device], capture_output=True, text=True, check=True)
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        rows[-1]["load"] = loads[-1]
        print(f"{c:18s} {rows[-1]['ms']:9.0f} ms   peak RSS {rows[-1]['peak_mb']:6.0f} MB  load {loads[-1]:.2f}",
              file=sys.stderr)
    by = {r["case"]: r for r in rows}
    print(f"\nvolume {rows[0]['size']}, {rows[0]['slices']} axial slices at 64x64, {a.threads} threads, {a.device}\n")
    net = by["rec-grad"]["ms"]
    print(f"network time (compute_maps, Rec-grad): {net:.0f} ms\n")
    print("| case | ms per volume | / network time | peak RSS of the process (MB) | peak traced (MB) | load |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        ms = r["ms"] / r["items"] if r.get("items") else r["ms"]
        print(f"| {r['case']} | {ms:.0f} | {ms / net:.2f}x | {r['peak_mb']:.0f} | {r['traced_mb']:.0f} | "
              f"{r['load']:.2f} |")
    print("\n(peak RSS includes the torch import, about 0.5 GB, and reading + preprocessing the volume; 'traced':\n"
          "tracemalloc's peak during one run of the case -- numpy arrays and Python objects, not torch's tensors)")
    def has(*names):
        return all(n in by for n in names)
    if has("fused-5"):
        print(f"\nfused five maps / one rec-grad pass: {by['fused-5']['ms'] / by['rec-grad']['ms']:.2f}x (target <= 1.25)")
    if has("fused-5", "one-at-a-time-5"):
        print(f"one-at-a-time / fused (five maps): {by['one-at-a-time-5']['ms'] / by['fused-5']['ms']:.2f}x "
              f"without weight gradients (target >= 3)")
    if has("fused-5", "reference-code-5"):
        print(f"reference code's way (one at a time, loss.backward() with weight gradients) / fused (five maps): "
              f"{by['reference-code-5']['ms'] / by['fused-5']['ms']:.2f}x (target >= 3)")
    for c, what in (("proj-rec-error", f"all {rows[0]['slices']} slices, 100 steps"),
                    ("proj-rec-error-brain", f"the {rows[0]['brain_slices']} brain slices, 100 steps"),
                    ("proj-rec-error-brain-tol", f"the {rows[0]['brain_slices']} brain slices, early stop "
                                                 f"(proj_tol {PROJ_TOL:g})")):
        if has(c):
            print(f"proj-rec-error on {what}: {by[c]['ms'] / 1000:.1f} s = {by[c]['ms'] / net:.1f}x network (target <= 4 s)")
    for size in (64, 128):
        if has(f"dae-residual-{size}", f"rec-grad-{size}-brain"):
            d, r = by[f"dae-residual-{size}"], by[f"rec-grad-{size}-brain"]
            print(f"DAE residual ({OTHER_GRIDS[f'dae-residual-{size}'][0]}) / one Rec-grad pass on the {size}x{size} grid "
                  f"(both with the brain mask): {d['ms']:.0f} / {r['ms']:.0f} ms = {d['ms'] / r['ms']:.2f}x (target <= 1.5)")
    if has("score-volume-rec-grad"):
        print(f"score_volume (Rec-grad) / network: {by['score-volume-rec-grad']['ms'] / net:.2f}x (target <= 2)")
    if has("score-volume-resampling"):
        print(f"the same with the replaced preprocessing (3D reorient, DiscreteGaussian, Resample; ITK mask): "
              f"{by['score-volume-resampling']['ms'] / net:.2f}x")
    if has("cohort"):
        c = by["cohort"]
        print(f"cohort: {c['items']} copies of the sample, 2 DataLoader workers: {60000 * c['items'] / c['ms']:.1f} "
              f"volumes/min ({c['ms'] / c['items']:.0f} ms per volume: read + score Rec-grad + write .nii.gz; "
              f"peak RSS of the main process {c['peak_mb']:.0f} MB, workers not counted)")
    if not a.no_slicer_job:
        loads.append(load_average())
        default = slicer_job(a.threads, a.repeat)
        print_slicer_job(default, net)
        from vaeanomaly.checkpoint import DEFAULT_VAE
        print_default_against_vae(default, slicer_job(a.threads, a.repeat, DEFAULT_VAE))
    worst = max(loads + [load_average()])
    print(f"\nload average during the run: up to {worst:.2f} on {os.cpu_count()} cores" +
          (f" -- {busy_warning(worst)}" if busy_warning(worst) else " (quiet)"))


if __name__ == "__main__":
    main()
