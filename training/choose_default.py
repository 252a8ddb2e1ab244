"""The default detector, chosen by a written rule on the VALIDATION split (never the benchmark).

    python training/evaluate.py --benchmark data/v --split validation --predictors default --no-verdicts \
        --checkpoints M1.safetensors M2.safetensors ... --out runs/v/validation_all
    python training/choose_default.py runs/v/validation_all.csv --out docs/default_rule.md

The rule (issue 24; written before it was applied to this round's candidates):
  1. Quiet on healthy brains: at the checkpoint's calibrated threshold, the healthy brain flagged is at most
     QUIET_PCT % in every validation domain (the benchmark's target is 2 %; the validation split holds one
     healthy scan per domain, so one scan's noise gets a margin) AND, on average, on every other healthy
     population given with --healthy (brains of another generator that the candidates never trained on: the
     validation split comes from the training generator, so it cannot show a model that keys on that generator's
     look; added in round 2 of this rule, see docs/default_rule.md). A candidate that fails is out, whatever it
     detects.
  2. Of those, the most family x domain cells where the candidate beats the plain-intensity row of its own grid
     in AUROC (an oracle metric: the threshold-free ranking); ties: the most cells where it also beats it in AP.
  3. Then the higher mean AUROC over the cells, then the higher mean AP, then the lower worst-domain healthy
     flagged %.
  If no candidate is quiet, none is chosen and the script says so (the default then stays as it is).
Intensity rows ("intensity (SxS)") are the baseline, never candidates. Prints a Markdown table of every candidate's
figures and the winner; --out writes it with the rule and the command.
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import defaultdict
from pathlib import Path

QUIET_PCT = 3.0
INTENSITY = re.compile(r"^intensity \((\d+)x\d+\)$")


def load_rows(paths):
    rows = []
    for p in paths:
        with open(p, newline="") as f:
            rows += list(csv.DictReader(f))
    return rows


def grid_of(scorer: str, sizes: dict) -> int | None:
    model = scorer.split(" ")[0]
    if model in sizes:
        return sizes[model]
    m = re.search(r"-(64|128|256)(?:-|$)", model) or re.search(r"l(64|128|256)", model)
    return int(m.group(1)) if m else None


def figures(rows, sizes: dict | None = None) -> dict:
    """{scorer: figures} for every non-intensity scorer (cells: family x domain with lesions)."""
    sizes = sizes or {}
    base = {}
    for r in rows:
        m = INTENSITY.match(r["scorer"])
        if m:
            base[(int(m.group(1)), r["family"], r["domain"])] = r
    out = defaultdict(lambda: {"cells": 0, "auroc_wins": 0, "ap_wins": 0, "auroc": [], "ap": [], "healthy": {},
                               "false_regions": {}, "dice": []})
    for r in rows:
        s = r["scorer"]
        if INTENSITY.match(s):
            continue
        f = out[s]
        if r.get("healthy_flagged_pct") not in (None, ""):
            f["healthy"][r["domain"]] = float(r["healthy_flagged_pct"])
        if r.get("false_regions_per_healthy_scan") not in (None, ""):
            f["false_regions"][r["domain"]] = float(r["false_regions_per_healthy_scan"])
        if not r["family"] or r.get("auroc") in (None, ""):
            continue
        g = grid_of(s, sizes)
        b = base.get((g, r["family"], r["domain"]))
        auroc, ap = float(r["auroc"]), float(r["ap"])
        f["cells"] += 1
        f["auroc"].append(auroc)
        f["ap"].append(ap)
        if r.get("dice_calibrated") not in (None, ""):
            f["dice"].append(float(r["dice_calibrated"]))
        if b is not None and auroc > float(b["auroc"]):
            f["auroc_wins"] += 1
            if ap > float(b["ap"]):
                f["ap_wins"] += 1
    for f in out.values():
        f["worst_healthy"] = max(f["healthy"].values()) if f["healthy"] else float("inf")
        f["mean_auroc"] = sum(f["auroc"]) / max(len(f["auroc"]), 1)
        f["mean_ap"] = sum(f["ap"]) / max(len(f["ap"]), 1)
        f["mean_dice"] = sum(f["dice"]) / max(len(f["dice"]), 1)
        f["quiet"] = f["worst_healthy"] <= QUIET_PCT
    return dict(out)


def healthy_flagged(models, scans, files: dict | None = None) -> dict:
    """{model: mean % of brain flagged over the healthy `scans` [(volume, mask)]} at each model's calibrated
    threshold for its default predictor (the verdict's flagged_percent: what a clinician sees)."""
    from vaeanomaly import verdict
    from vaeanomaly.checkpoint import load_checkpoint
    from vaeanomaly.volume import read_image
    images = [(read_image(v), read_image(m, "mask")) for v, m in scans]
    out = {}
    for name in models:
        ck = load_checkpoint((files or {}).get(name, name))
        vals = [verdict.assess(ck, img, mask)["flagged_percent"] for img, mask in images]
        out[name] = sum(vals) / len(vals)
    return out


def add_population(figs: dict, label: str, flagged: dict) -> None:
    """One more healthy population's mean flagged % per scorer ('MODEL predictor'; or per MODEL), into the quiet
    test."""
    for s, f in figs.items():
        v = flagged.get(s, flagged.get(s.split(" ")[0]))
        if v is not None:
            f.setdefault("populations", {})[label] = v
            f["quiet"] = f["quiet"] and v <= QUIET_PCT


def choose(figs: dict):
    """The rule: (winner or None, candidates in rule order)."""
    order = sorted(figs, key=lambda s: (not figs[s]["quiet"], -figs[s]["auroc_wins"], -figs[s]["ap_wins"],
                                        -figs[s]["mean_auroc"], -figs[s]["mean_ap"], figs[s]["worst_healthy"]))
    winner = order[0] if order and figs[order[0]]["quiet"] else None
    return winner, order


def table(figs: dict, order) -> str:
    lines = [f"| rank | scorer | quiet (worst healthy flagged %, <= {QUIET_PCT:.1f}) | healthy flagged % by domain | "
             "other healthy populations (mean flagged %) | false regions per healthy scan | cells above intensity: "
             "AUROC / and AP | mean AUROC | mean AP | mean Dice (calibrated) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for i, s in enumerate(order, 1):
        f = figs[s]
        dom = ", ".join(f"{d} {v:.2f}" for d, v in sorted(f["healthy"].items()))
        fr = ", ".join(f"{d} {v:.1f}" for d, v in sorted(f["false_regions"].items()))
        pop = ", ".join(f"{k} {v:.2f}" for k, v in sorted(f.get("populations", {}).items())) or "-"
        lines.append(f"| {i} | {s} | {'yes' if f['quiet'] else '**no**'} ({f['worst_healthy']:.2f}) | {dom} | {pop} | {fr} | "
                     f"{f['auroc_wins']} / {f['ap_wins']} of {f['cells']} | {f['mean_auroc']:.3f} | {f['mean_ap']:.3f} | "
                     f"{f['mean_dice']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="+", help="evaluate.py --split validation tables (PREFIX.csv)")
    ap.add_argument("--sizes", nargs="*", default=[], metavar="MODEL=SIZE",
                    help="model grid sizes where the name does not say (e.g. my-model=128)")
    ap.add_argument("--healthy", nargs="*", default=[], metavar="LABEL=FOLDER",
                    help="another healthy population: FOLDER/*/T1w/T2w_acpc_dc_restore_brain.nii.gz with its "
                         "brainmask_fs.nii.gz (HCP layout, e.g. the legacy generator's healthy subjects)")
    ap.add_argument("--files", nargs="*", default=[], metavar="MODEL=FILE",
                    help="checkpoint files of candidates that are not bundled (e.g. dae-128-small=runs/v/dae128s.safetensors)")
    ap.add_argument("--populations", nargs="*", default=[], metavar="CSV",
                    help="other healthy populations already scored (columns scorer, population, flagged_pct; e.g. "
                         "try_fusion.py's PREFIX_populations.csv for candidates that are no checkpoint file)")
    ap.add_argument("--out", help="write the rule, the table and the winner to this Markdown file")
    a = ap.parse_args(argv)
    sizes = {k: int(v) for k, v in (s.split("=", 1) for s in a.sizes)}
    rows = load_rows(a.csv)
    if any("validation" not in str(p) for p in a.csv):
        print("choose_default: warning: the rule is for the validation split (a file name without 'validation')",
              file=sys.stderr)
    figs = figures(rows, sizes)
    scored = defaultdict(dict)  # label -> {scorer: flagged %} from --populations
    for path in a.populations:
        for r in load_rows([path]):
            scored[r["population"]][r["scorer"]] = float(r["flagged_pct"])
    covered = {s for flagged in scored.values() for s in flagged}
    for spec in a.healthy:
        label, folder = spec.split("=", 1)
        vols = sorted(Path(folder).glob("*/T1w/T2w_acpc_dc_restore_brain.nii.gz"))
        if not vols:
            raise SystemExit(f"--healthy {spec}: no */T1w/T2w_acpc_dc_restore_brain.nii.gz under {folder}")
        scans = [(v, v.parent / "brainmask_fs.nii.gz") for v in vols]
        files = dict(f.split("=", 1) for f in a.files)
        models = {s.split(" ")[0] for s in figs if s not in covered}  # the others were scored by their own script
        add_population(figs, f"{label} ({len(vols)})", healthy_flagged(models, scans, files))
    for label, flagged in scored.items():
        add_population(figs, label, flagged)
    winner, order = choose(figs)
    text = table(figs, order)
    verdict = (f"**Winner: {winner}**" if winner else
               "**No candidate is quiet on healthy brains: no winner; the default stays as it is.**")
    print(text + "\n\n" + verdict)
    if a.out:
        cmd = "python training/choose_default.py " + " ".join(sys.argv[1:] if argv is None else argv)
        doc = __doc__.split("The rule", 1)[1].split("Intensity rows", 1)[0]
        Path(a.out).write_text(
            "# The default detector: the rule and its inputs\n\n"
            f"The rule{doc}\n" "Intensity rows are the baseline, never candidates. Cells: lesion family x "
            "domain of the validation split (training domains only; its own seeds, never the benchmark's).\n\n"
            f"Command: `{cmd}`\n\n" + text + "\n\n" + verdict + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
