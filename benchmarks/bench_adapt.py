"""Site adaptation on a domain the bundled models never saw (docs/adaptation.md).

    python benchmarks/bench_adapt.py --out /tmp/adapt_bench [--domain epi] [--model bvae-l64-b10] [--minutes 8]

1. Generates, with the project's generator (vaeanomaly/synth.py, varied generator), healthy and lesion
   scans of --domain as real NIfTI files: an adaptation pool of 10 healthy scans, --healthy further healthy
   test scans and --per-family lesion test scans of each lesion family, all with their brain masks; seeds
   from the benchmark range, disjoint from any training seed.
2. Runs `vaeanomaly adapt` (the real command, in a subprocess) on the first 3, 5 and 10 pool scans.
3. Scores the test scans with the base model and each adapted model (model grid, brain mask given):
   flagged % of healthy brain at each model's calibrated Rec-grad threshold (what a user would see),
   and pixel AUROC of Rec-grad inside the brain on the lesion scans (pooled pixels).
Writes OUT/results.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "VAEAnomaly"))


def generate(out: Path, domain: str, seed0: int, n_healthy: int, per_family: int, step: int):
    import SimpleITK as sitk

    from vaeanomaly.synth import LESION_FAMILIES, make_subject
    plan = [("pool", i, False) for i in range(10)] + [("healthy", i, False) for i in range(n_healthy)] + \
           [("lesion", i, fam) for i, fam in enumerate(f for f in LESION_FAMILIES for _ in range(per_family))]
    files = {"pool": [], "healthy": [], "lesion": []}
    for k, (group, i, fam) in enumerate(plan):
        d = out / "data" / group
        d.mkdir(parents=True, exist_ok=True)
        t2, mask, seg = d / f"{group}{i:02d}_t2.nii.gz", d / f"{group}{i:02d}_mask.nii.gz", d / f"{group}{i:02d}_seg.nii.gz"
        if not t2.exists():
            sub = make_subject(seed0 + k, lesion=fam or False, domain=domain, step=step)
            sitk.WriteImage(sub.t2, str(t2))
            sitk.WriteImage(sub.mask, str(mask))
            if sub.seg is not None:
                sitk.WriteImage(sub.seg, str(seg))
        files[group].append((t2, mask, seg if fam else None))
        print(f"generated {group}{i:02d} ({fam or 'healthy'})", file=sys.stderr, flush=True)
    return files


def evaluate(model_path, files, predictor="rec-grad"):
    from vaeanomaly.calibration import inference_kwargs
    from vaeanomaly.checkpoint import load_checkpoint
    from vaeanomaly.metrics import pixel_metrics
    from vaeanomaly.predictors import compute_maps
    from vaeanomaly.preprocessing import Preprocessing
    from vaeanomaly.volume import label_on_grid, prepare, read_image
    ck = load_checkpoint(model_path)
    prep = Preprocessing.from_dict(ck.preprocessing)
    thr = ck.thresholds[predictor]
    flagged = []
    for t2, mask, _ in files["healthy"]:
        p = prepare(read_image(t2), read_image(mask), prep)
        m = compute_maps(ck.model, p.slices, [predictor], ck.beta, **inference_kwargs(ck, [predictor]))[predictor]
        flagged.append(100.0 * float(np.mean(m[p.brain] > thr)))
    scores, labels = [], []
    for t2, mask, seg in files["lesion"]:
        p = prepare(read_image(t2), read_image(mask), prep)
        m = compute_maps(ck.model, p.slices, [predictor], ck.beta, **inference_kwargs(ck, [predictor]))[predictor]
        lab = label_on_grid(read_image(seg), p.grid) & p.brain
        scores.append(m[p.brain])
        labels.append(lab[p.brain])
    s, lab = np.concatenate(scores), np.concatenate(labels)
    r = pixel_metrics(s, lab)
    return {"flagged_healthy_percent": round(float(np.mean(flagged)), 2),
            "flagged_healthy_per_scan": [round(f, 2) for f in flagged],
            "lesion_auroc": round(float(r["auroc"]), 4), "lesion_ap": round(float(r["ap"]), 4),
            "lesion_recall_at_threshold": round(float(np.mean(s[lab] > thr)), 4),
            "flagged_normal_tissue_in_lesion_scans_percent": round(100.0 * float(np.mean(s[~lab] > thr)), 2),
            "threshold": thr}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--domain", default="epi")
    ap.add_argument("--model", default="bvae-l64-b10")
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--sizes", default="3,5,10")
    ap.add_argument("--seed", type=int, default=1_500_000)
    ap.add_argument("--healthy", type=int, default=5, help="healthy test scans")
    ap.add_argument("--per-family", type=int, default=2, help="lesion test scans per lesion family")
    ap.add_argument("--step", type=int, default=1, help="generator anatomy step (2: 8x faster, coarser)")
    a = ap.parse_args()
    out = Path(a.out)
    files = generate(out, a.domain, a.seed, a.healthy, a.per_family, a.step)
    results = {"domain": a.domain, "base_model": a.model, "command": " ".join(sys.argv), "runs": {}}
    prev = out / "results.json"
    if prev.exists():  # keep the rows of earlier runs (other --sizes) on the same data, model and budget
        old = json.loads(prev.read_text(encoding="utf-8"))
        if (old.get("domain"), old.get("base_model"), old.get("minutes")) == (a.domain, a.model, a.minutes):
            results["runs"].update({k: v for k, v in old.get("runs", {}).items() if k != "before"})
    results["minutes"] = a.minutes
    results["runs"]["before"] = evaluate(a.model, files)
    print("before", results["runs"]["before"], file=sys.stderr, flush=True)
    vaeanomaly = str(Path(sys.executable).parent / "vaeanomaly")
    for n in [int(x) for x in a.sizes.split(",")]:
        new = out / f"adapted_{n}.safetensors"
        scans = [str(f[0]) for f in files["pool"][:n]]
        masks = [str(f[1]) for f in files["pool"][:n]]
        cmd = [vaeanomaly, "adapt", *scans, "--masks", *masks, "--model", a.model, "-o", str(new),
               "--minutes", str(a.minutes), "--progress", "none", "--force"]
        t0 = time.time()
        subprocess.run(cmd, check=True)
        wall = time.time() - t0
        meta = json.loads(json.dumps(__import__("vaeanomaly.checkpoint", fromlist=["x"]).load_checkpoint(new).meta))
        r = evaluate(new, files)
        r.update(wall_seconds=round(wall), epochs=meta["adaptation"]["epochs"], stopped=meta["adaptation"]["stopped"],
                 card_before=meta["adaptation"]["flagged_percent_before"]["rec-grad"],
                 card_after=meta["adaptation"]["flagged_percent_after"]["rec-grad"])
        results["runs"][f"adapted on {n}"] = r
        print(n, r, file=sys.stderr, flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    (out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(f"| model | flagged % of healthy brain ({a.healthy} test scans) | lesion AUROC (Rec-grad, in brain) | lesion recall at threshold | adapt wall time |")
    print("|---|---|---|---|---|")
    for k, r in results["runs"].items():
        print(f"| {k} | {r['flagged_healthy_percent']:.2f} | {r['lesion_auroc']:.3f} | {r['lesion_recall_at_threshold']:.2f} | "
              f"{r.get('wall_seconds', '-')} s |")


if __name__ == "__main__":
    main()
