"""Re-calibrate an existing checkpoint in place: thresholds for every predictor (the ensemble's
included), Combi's normalisation constants and the predictor options they hold for, from held-out
healthy subjects. Weights are untouched.

    python training/calibrate.py runs/vae.safetensors --cache data/healthy.npz
    python training/calibrate.py runs/vae.safetensors --cache data/healthy.npz --cases SUBJ_007 SUBJ_042

Which cases: --cases; else the ones recorded in the checkpoint (train.py records its held-out cases);
else, for older checkpoints, the split train.py makes (seed and --val-fraction from the recorded
training command) — this assumes --cache is the cache the model was trained from. Calibrating on
training subjects would give thresholds that are too low.

Slice spacings (the maps smoothed across slices use them): read from the image headers of the cohort folder the
cache was made from (--data; default: the folder beside the cache that training/make_data.py wrote it from,
data/v/calibration for data/v/calibration_64.npz); without one, the model grid's pixel size stands in.

Options: the inference defaults, unless --no-smooth / --proj-* are given (then the checkpoint says
its thresholds hold for those options, and `--threshold auto` refuses others).

Signed maps (rec-grad, elbo-grad, dae-residual) are calibrated under every polarity (calibration.calibrate):
'both', 'bright' and 'dark' each at its own 99th percentile (polarity_thresholds), and the signed map ('signed')
two-tailed, each tail at the 99.5th percentile of its side (two_tailed: 1% of healthy brain flagged in all).
"""
from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

import common  # noqa: F401  (puts the core library on sys.path)
from vaeanomaly.calibration import QUANTILE, calibrate, cases_from_cache, held_out_cases
from vaeanomaly.checkpoint import load_checkpoint, update_metadata
from vaeanomaly.data import SliceCache
from vaeanomaly.predictors import PredictorOptions


def choose_cases(ck, cache: SliceCache, names=None) -> tuple[list[int], str]:
    """Case indices in `cache` to calibrate on, and a sentence saying why these."""
    if names == "all":
        return list(range(len(cache.names))), "every case of the cache (a dedicated healthy calibration cohort)"
    if names:
        missing = [n for n in names if n not in cache.names]
        if missing:
            raise SystemExit(f"--cases not in the cache: {', '.join(missing)} (it holds {len(cache.names)} cases: "
                             f"{', '.join(cache.names[:5])}, ...)")
        return [cache.names.index(n) for n in names], "the cases given with --cases"
    recorded = ck.meta.get("calibration", {}).get("cases")
    if recorded:
        missing = [n for n in recorded if n not in cache.names]
        if missing:
            raise SystemExit(f"the checkpoint's calibration cases are not all in this cache (missing "
                             f"{', '.join(missing[:5])}); give the training cache, or --cases")
        return [cache.names.index(n) for n in recorded], "the held-out cases recorded in the checkpoint"
    training = ck.meta.get("training", {})
    try:
        argv = shlex.split(training.get("command", ""))
    except ValueError:
        argv = []
    frac = 0.1
    for i, tok in enumerate(argv):
        m = re.fullmatch(r"--val-fraction(?:=(.*))?", tok)
        if m:
            frac = float(m.group(1) if m.group(1) is not None else argv[i + 1])
    seed = int(training.get("seed", 0))
    ids = held_out_cases(len(cache.names), frac, seed)
    if not ids:
        raise SystemExit("the checkpoint records no held-out cases and train.py's split holds none out here; "
                         "give --cases")
    return ids, (f"the cases train.py held out (seed {seed}, --val-fraction {frac:g}), assuming this is the cache "
                 f"the model was trained from")


def cache_folder(cache_path, data=None):
    """The cohort folder a slice cache was made from: `data`, else make_data.py's layout (calibration_64.npz
    beside calibration/), else None."""
    if data:
        return Path(data)
    p = Path(cache_path)
    guess = p.parent / p.stem.rsplit("_", 1)[0]
    return guess if guess.is_dir() else None


def recalibrate(ck, cache_path, device="cpu", ensemble="checkpoint", cases=None, options=None, progress=None,
                only=None, data=None) -> dict:
    """Metadata updates for checkpoint `ck` from the healthy cache (see calibration.calibrate); data: the cohort
    folder it was made from (slice spacings; see cache_folder)."""
    from vaeanomaly.data import slice_spacings
    cache = SliceCache.load(cache_path)
    size = ck.model.image_size
    if cache.slices.shape[-1] != size:
        raise SystemExit(f"the cache holds {cache.slices.shape[-1]}-pixel slices; the model needs {size}")
    ids, why = choose_cases(ck, cache, cases)
    ens = ck.ensemble if ensemble == "checkpoint" else ensemble
    print(f"calibrating on {len(ids)} healthy case(s) of {cache_path}: {why}", file=sys.stderr)
    folder = cache_folder(cache_path, data)
    spacing = slice_spacings(folder, [cache.names[i] for i in ids]) if folder else {}
    print(f"slice spacings: {len(spacing)} of {len(ids)} case(s) from {folder}" if folder else
          "slice spacings: no cohort folder (--data); the model grid's pixel size stands in", file=sys.stderr)
    return calibrate(ck.model.eval(), ck.beta, cases_from_cache(cache, ids, spacing), options or PredictorOptions(),
                     ensemble=ens, device=device, progress=progress, only=only)


def refresh_card(ck) -> None:
    """A bundled checkpoint's model card (<name>.md beside it, training/bundle.py) gets the new card text and the
    calibration command; its hand-written notes stay."""
    md = ck.path.with_suffix(".md")
    if not md.exists():
        return
    text = md.read_text(encoding="utf-8")
    start = text.find("```\n")
    end = text.find("\n```", start + 4)
    if start < 0 or end < 0:
        return
    cmd = ck.meta.get("calibration", {}).get("command")
    card = ck.card() + (f"\ncalibrated by: {cmd}" if cmd else "")
    md.write_text(text[:start + 4] + card + text[end:], encoding="utf-8")
    print(f"updated the model card {md}", file=sys.stderr)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="checkpoint file (.safetensors), rewritten in place (weights untouched)")
    ap.add_argument("--cache", required=True, help="healthy slice cache (.npz), e.g. the training cache")
    ap.add_argument("--data", help="the cohort folder the cache was made from, for the slice spacings (default: "
                                    "the folder beside the cache, as training/make_data.py writes them)")
    ap.add_argument("--cases", nargs="+", help="case names to calibrate on (default: the held-out cases)")
    ap.add_argument("--all-cases", action="store_true",
                    help="calibrate on every case of --cache (a dedicated healthy calibration cohort, never trained on)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    d = PredictorOptions()
    ap.add_argument("--no-smooth", action="store_true", help="calibrate for unsmoothed gradient maps")
    ap.add_argument("--proj-steps", type=int, default=d.proj_steps, help=f"(default: {d.proj_steps})")
    ap.add_argument("--proj-lambda", type=float, default=d.proj_lambda, help=f"(default: {d.proj_lambda})")
    ap.add_argument("--proj-lr", type=float, default=d.proj_lr, help=f"(default: {d.proj_lr})")
    ap.add_argument("--proj-weighted", action="store_true")
    from vaeanomaly.predictors import PRESETS
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default",
                    help="the option set the thresholds hold for (default: the inference defaults)")
    ap.add_argument("--min-region-mm3", type=float, default=None,
                    help="record the smallest label/finding region (mm3) this model's labels keep (docs/validation.md)")
    a = ap.parse_args(argv)
    from tqdm import tqdm
    ck = load_checkpoint(a.checkpoint)
    opts = PredictorOptions.preset(a.preset, smooth=not a.no_smooth, proj_steps=a.proj_steps,
                                   proj_lambda=a.proj_lambda, proj_lr=a.proj_lr, proj_weighted=a.proj_weighted)
    bar = tqdm(total=1000, desc="calibrating", file=sys.stderr)
    calib = recalibrate(ck, a.cache, a.device, cases="all" if a.all_cases else a.cases, options=opts, data=a.data,
                        progress=lambda f: bar.update(int(1000 * f) - bar.n))
    bar.close()
    old = ck.thresholds
    if a.min_region_mm3 is not None:
        calib["label"] = {"min_region_mm3": a.min_region_mm3, "note": "label regions below this are dropped; chosen "
                                                                      "on the validation split (docs/validation.md)"}
    from common import command_line
    calib["calibration"]["command"] = command_line()
    new = update_metadata(ck.path, **calib)
    refresh_card(new)
    print(f"{ck.path}: thresholds ({QUANTILE:g}th percentile inside the brain) for "
          + ", ".join(f"{k}={v}" for k, v in calib["thresholds_options"].items()))
    for k, v in calib["thresholds"].items():
        print(f"  {k:15s} {v:10.4g}   (was {old[k]:.4g})" if k in old else f"  {k:15s} {v:10.4g}   (new)")
    for k, tails in (calib.get("two_tailed") or {}).items():  # the signed maps, each tail apart (polarity 'signed')
        print(f"  {k:15s} two-tailed: brighter > {tails['bright']['threshold']:.4g}, darker < "
              f"-{tails['dark']['threshold']:.4g} (each tail {100 - (100 - QUANTILE) / 2:g}th percentile)")
    for k, pols in (calib.get("polarity_thresholds") or {}).items():
        print(f"  {k:15s} " + ", ".join(f"{pol} {v['threshold']:.4g}" for pol, v in pols.items()))
    c = calib.get("combi_normalisation")  # a denoising autoencoder has no Combi
    if c:
        print(f"  Combi constants: KL-grad min {c['min']:.4g}, max {c['max']:.4g}")


if __name__ == "__main__":
    main()
