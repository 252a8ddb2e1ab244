"""Copy a trained checkpoint into the module's bundled models (float16), with its model card.

    python training/bundle.py runs/l64_b1.safetensors --name vae-l64-b1
"""
from __future__ import annotations

import argparse
from pathlib import Path

import common  # noqa: F401
from vaeanomaly.checkpoint import MODELS_DIR, load_checkpoint, save_checkpoint


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--name", required=True)
    ap.add_argument("--dest", default=str(MODELS_DIR))
    ap.add_argument("--note", default="", help="markdown for the model card: when to use this model")
    a = ap.parse_args(argv)
    ck = load_checkpoint(a.checkpoint)
    meta = {k: v for k, v in ck.meta.items() if k not in ("format", "library_version", "model")}
    meta["name"] = a.name
    out = save_checkpoint(Path(a.dest) / f"{a.name}.safetensors", ck.model, meta, fp16=True)
    card = load_checkpoint(out).card()
    ev = ck.meta.get("evaluation", {})
    table = ""
    if ev.get("auroc_brain"):
        preds = list(ev["auroc_brain"])
        table = ("\n## Pixel AUROC on the embedded lesion cohort\n\n" + ev.get("cohort", "") + "\n\n| scope | " +
                 " | ".join(preds) + " |\n" + "|---" * (len(preds) + 1) + "|\n" +
                 "\n".join(f"| {s} | " + " | ".join(f"{ev[k][p]:.3f}" for p in preds) + " |"
                           for s, k in (("inside brain", "auroc_brain"), ("all pixels", "auroc_all"))) + "\n")
    ens = ck.meta.get("ensemble_evaluation")
    if ens:
        table += ("\n## Ensemble\n\nFitted on " + ", ".join(ens["fit_cases"]) + f"; tested on {ens['n_test_cases']} "
                  "other cases: " + ", ".join(f"{k} {v:.3f}" for k, v in ens["test_auroc_brain"].items()) + "\n")
    note = f"\n## When to use it\n\n{a.note}\n" if a.note else ""
    Path(a.dest, f"{a.name}.md").write_text(f"# Model card: {a.name}\n{note}\n```\n{card}\n```\n{table}\n"
                                            f"Bundled from `{a.checkpoint}` by `python training/bundle.py "
                                            f"{a.checkpoint} --name {a.name}` (weights stored as float16).\n", encoding="utf-8")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) and its model card")


if __name__ == "__main__":
    main()
