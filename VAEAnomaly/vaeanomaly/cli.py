"""The `vaeanomaly` command: score, evaluate, generate, info, demo.

Everything the user asked for is checked before any computation (options, predictors, thresholds,
output paths against the inputs); every file is written to a temporary file and renamed; errors
end with one line saying what to do (`--debug` shows the traceback).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .predictors import EVIDENCE, PRESETS, PredictorOptions
from .registry import (DAE_PREDICTORS, DEFAULT_PREDICTOR, DEFAULT_PREDICTORS, ENSEMBLE, NORMALISE,  # noqa: F401
                       PAPER_PREDICTORS, POLARITIES, PREDICTOR_INFO, RECONSTRUCTION)
# the helpers every command shares, and the scoring request, live in scoring.py (importable without cli.py)
from .scoring import (DEVICE_HELP, IMAGE_SUFFIXES, Progress, ScoreRequest, check_options, is_image_path,  # noqa: F401
                      parse_threshold, pick_device, select_predictors)
from .scoring import run as run_request

DEFAULTS_BY_KIND = ", ".join(f"{v} ({'VAE' if k == 'vae' else 'denoising autoencoder'})"
                             for k, v in DEFAULT_PREDICTORS.items())


# --------------------------------------------------------------------------- options
def _options(a) -> PredictorOptions:
    """The predictor options from the flags, or from --options OPTIONS.json (the Slicer module's job);
    checked before any computation."""
    if getattr(a, "options", None):  # one serialised PredictorOptions
        p = Path(a.options)
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"--options file '{p}' does not exist") from None
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"--options file '{p}' is not readable JSON: {err}") from None
        if not isinstance(d, dict):
            raise ValueError(f"--options file '{p}' must hold a JSON object (PredictorOptions.to_dict())")
        unknown = sorted(set(d) - set(PredictorOptions.__dataclass_fields__))
        if unknown:
            raise ValueError(f"--options file '{p}': unknown option(s) {', '.join(unknown)}; known: "
                             f"{', '.join(PredictorOptions.__dataclass_fields__)}")
        opts = PredictorOptions.from_dict(d)
    else:
        given = {k: getattr(a, k, None) for k in ("smooth_mm", "smooth_z_mm", "polarity", "evidence", "rim_mm",
                                                  "normalise")}
        given = {k: v for k, v in given.items() if v is not None}
        opts = PredictorOptions.preset(getattr(a, "preset", None) or "default", smooth=not a.no_smooth,
                                       proj_steps=a.proj_steps, proj_lambda=a.proj_lambda, proj_lr=a.proj_lr,
                                       proj_weighted=a.proj_weighted, batch_size=a.batch_size,
                                       proj_tol=getattr(a, "proj_tol", 0.0), **given)
    return check_options(opts)  # (scoring.py: the one place options are checked)


def _own_defaults(option: str, zero: str = "") -> str:
    """'rec-grad 0, ..., dae-residual 2' for --help: each signed map's default of an option (others: the base one);
    zero: what 0 means there, said in its place (e.g. 'the pixel kernel')."""
    from .registry import BASE_DEFAULTS, option_defaults

    def word(v):
        return zero if zero and not v else f"{v:g}" if isinstance(v, float) else str(v)
    return ", ".join(f"{n} {word(option_defaults(n)[option])}" for n, i in PREDICTOR_INFO.items() if i.signed) + \
        f", others {word(BASE_DEFAULTS[option])}"


def _add_model_args(p, predictor_default: Optional[str] = None):
    from .checkpoint import DEFAULT_MODEL
    d = PredictorOptions()
    p.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint file (.safetensors) or bundled model name "
                                                          "(`vaeanomaly info --list`)")
    p.add_argument("--predictor", default=predictor_default, metavar="NAME[,NAME...]",
                   help=f"{', '.join(PREDICTOR_INFO)}; a comma-separated list; 'all' (the six paper predictors and "
                        f"the checkpoint's ensemble, or a denoising autoencoder's own); '{RECONSTRUCTION}' adds the "
                        f"model's reconstruction (z-score units, for display). Default: "
                        + (predictor_default or f"{DEFAULTS_BY_KIND} by the model's kind"))
    p.add_argument("--device", default="auto", help=DEVICE_HELP + " (a missing GPU falls back to the CPU)")
    p.add_argument("--no-smooth", action="store_true",
                   help="no Gaussian smoothing of gradient maps and the DAE residual; calibrated thresholds and the "
                        "ensemble hold only with the smoothing they were computed with")
    p.add_argument("--smooth-mm", type=float, default=None, metavar="SIGMA_MM",
                   help=f"Gaussian smoothing sigma in millimetres, for every smoothed map (default: each map's own: "
                        f"{_own_defaults('smooth_mm', 'the pixel kernel')}); 0: the reference code's pixel kernel "
                        f"(sigma {d.smooth_sigma:g}, kernel {d.smooth_kernel} pixels)")
    p.add_argument("--smooth-z-mm", type=float, default=None, metavar="SIGMA_MM",
                   help=f"Gaussian smoothing sigma in millimetres across slices, on the finished map of the volume "
                        f"(a 2D model's slice-to-slice errors average out, a lesion spans slices; default: each "
                        f"map's own: {_own_defaults('smooth_z_mm', 'none')}); 0: none (the papers)")
    p.add_argument("--polarity", choices=POLARITIES, default=None,
                   help=f"signed maps (rec-grad, elbo-grad, dae-residual): 'bright' scores only where the "
                        f"scan is brighter than the model expects, 'dark' only darker, 'both' either, 'signed' the map "
                        f"with its sign (positive: brighter; with --threshold auto each tail has its own calibrated "
                        f"threshold, --label writes 1 = brighter, 2 = darker, findings say which) (default: each "
                        f"map's own: {_own_defaults('polarity')})")
    p.add_argument("--evidence", choices=EVIDENCE, default=None,
                   help=f"'intensity': the signed maps times how unusual the scan's own intensity is in the same "
                        f"direction (a lesion must look wrong to the model and stand out in the scan; default: each "
                        f"map's own: {_own_defaults('evidence')})")
    p.add_argument("--rim-mm", type=float, default=None, metavar="MM",
                   help=f"maps are 0 within this distance of the brain mask's surface (default: each map's own: "
                        f"{_own_defaults('rim_mm')})")
    p.add_argument("--normalise", choices=NORMALISE, default=None,
                   help=f"'median': each finished map divided by its median over the scan's brain, so a scanner whose "
                        f"noise or blur raises the map everywhere does not raise what is flagged (default: each "
                        f"map's own: {_own_defaults('normalise')})")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="'paper': Zhou et al.'s settings (smoothing sigma 3 px, kernel 7; absolute maps), which "
                        "reproduce the paper-grid tables; the flags above override it")
    p.add_argument("--proj-steps", type=int, default=d.proj_steps, help="Proj-Rec-Error: projection steps N")
    p.add_argument("--proj-lambda", type=float, default=d.proj_lambda, help="Proj-Rec-Error: L1 weight λ")
    p.add_argument("--proj-lr", type=float, default=d.proj_lr, help="Proj-Rec-Error: Adam step α")
    p.add_argument("--proj-weighted", action="store_true", help="Dehaene et al.'s error-weighted step")
    p.add_argument("--proj-tol", type=float, default=d.proj_tol,
                   help="Proj-Rec-Error early stop: end when the last 10 steps lowered the energy by at most this "
                        "fraction (e.g. 0.002); --proj-steps stays the maximum. 0 (default): always --proj-steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="slices per batch (the fused maps report progress every 16 slices at most)")
    p.add_argument("--options", metavar="OPTIONS.json",
                   help="PredictorOptions as JSON (PredictorOptions.to_dict()); replaces the option flags above")
    p.add_argument("--progress", choices=["bar", "lines", "none"], default="bar",
                   help="progress bar with ETA, 'PROGRESS <fraction> ETA <s>' lines (for a parent process), or none")


# --------------------------------------------------------------------------- score
@dataclass
class ScorePlan:
    """Everything `score` will do, decided and checked before any computation."""
    checkpoint: object
    names: list                      # maps to compute (may include 'reconstruction')
    options: PredictorOptions
    outputs: dict                    # {map name: output path}
    labels: dict = field(default_factory=dict)         # {predictor: label path}
    threshold: Optional[str] = None                     # the --threshold spec (checked by parse_threshold)
    calibrated: dict = field(default_factory=dict)      # {predictor: calibrated threshold} for 'auto'
    min_region_mm3: float = 0.0                         # label regions below this are dropped
    findings: Optional[Path] = None                     # --findings F.json / F.csv (the one heatmap predictor)
    report_html: Optional[Path] = None                  # --report-html R.html
    verdict: Optional[Path] = None                      # --report R.json (read back for the HTML report)
    region_peaks: dict = field(default_factory=dict)    # {predictor: level a kept region reaches, or None}
    signed: tuple = ()                                  # predictors whose map keeps its sign (polarity 'signed')


def plan_score(a) -> ScorePlan:
    """Check every option, the predictors, the thresholds and the output paths; nothing is computed
    or written. Raises ValueError (and subclasses) with a message that says what to do."""
    from .calibration import auto_threshold, is_two_tailed, region_peaks, tails_or_fallback
    from .checkpoint import load_checkpoint
    from .io import OutputError, check_outputs
    opts = _options(a)
    wants = [f for f, v in (("--label", a.label), ("--findings", getattr(a, "findings", None)),
                            ("--report-html", getattr(a, "report_html", None))) if v]
    if a.threshold is not None and not wants:
        raise ValueError("--threshold needs --label LABEL.nii.gz (where to write the thresholded label map), "
                         "--findings F.json or --report-html R.html")
    if wants and a.threshold is None:
        raise ValueError(f"{wants[0]} needs --threshold (a number, a percentile such as p99, or 'auto')")
    threshold = parse_threshold(a.threshold) if a.threshold is not None else None  # checked before any work
    ck = load_checkpoint(a.model)
    names = select_predictors(a.predictor, ck, opts)
    heat = [n for n in names if n != RECONSTRUCTION]
    out = Path(a.output)
    dicom = _check_dicom_outputs(a, out)  # DICOM output: a DICOM series input (issue 18)
    if is_image_path(out) or dicom.get("output"):
        if len(names) > 1:
            raise OutputError(f"-o {out} names one file but {len(names)} maps were asked for ({', '.join(names)}); "
                              f"give a folder (-o maps/) for one <name>.nii.gz per map, or one predictor")
        if out.is_dir():
            raise OutputError(f"-o {out} is an existing folder; give a file name or a folder without an image suffix")
        outputs = {names[0]: out}
    else:
        if out.suffix and not out.is_dir() and not out.suffix[1:].isdigit():
            raise OutputError(f"-o {out}: '{out.suffix}' is not a volume format this command writes "
                              f"({', '.join(IMAGE_SUFFIXES)}); give OUT.nii.gz, or a folder name without a suffix")
        if out.exists() and not out.is_dir():
            raise OutputError(f"-o {out} is an existing file, not a folder; give a folder for several maps")
        outputs = {n: out / f"{n}.nii.gz" for n in names}
    labels = {}
    if a.label:
        if not heat:
            raise ValueError("--label needs a predictor to threshold ('reconstruction' is not a heatmap)")
        lab = Path(a.label)
        if len(heat) == 1 and (is_image_path(lab) or dicom.get("label")):
            labels = {heat[0]: lab}
        elif len(heat) == 1:
            raise OutputError(f"--label {lab}: give a label file such as anomaly.nii.gz")
        elif is_image_path(lab) or dicom.get("label"):
            raise OutputError(f"--label {lab} names one file but {len(heat)} predictors were asked for "
                              f"({', '.join(heat)}): give a folder for one <predictor>_label.nii.gz per predictor, "
                              f"or ask for one predictor")
        else:
            labels = {n: lab / f"{n}_label.nii.gz" for n in heat}
    calibrated = {}
    if threshold and threshold[0] == "auto":  # calibrated for these options? (else: say what to do, now)
        opts, note = tails_or_fallback(ck, heat, opts)  # a signed map: per-tail thresholds, where the checkpoint has
        if note:
            print(note, file=sys.stderr)
        for n in heat:
            calibrated[n] = auto_threshold(ck, n, opts)
    ins = {"input volume": a.input, "brain mask": a.mask, "checkpoint": ck.path,
           "options file": getattr(a, "options", None)}
    outs = {f"output ({n} map)": p for n, p in outputs.items()}
    outs.update({f"label ({n})": p for n, p in labels.items()})
    if getattr(a, "mask_out", None):
        if not is_image_path(Path(a.mask_out)):
            raise OutputError(f"--mask-out {a.mask_out}: give a NIfTI, NRRD or MHA file ({', '.join(IMAGE_SUFFIXES)})")
        outs["mask-out"] = Path(a.mask_out)
    findings_path = report_path = None
    if getattr(a, "findings", None) or getattr(a, "report_html", None):
        if len(heat) != 1:
            raise ValueError("--findings and --report-html describe one heatmap: ask for one predictor "
                             f"(got {', '.join(heat) or 'none'})")
        from .findings import check_path
        if getattr(a, "findings", None):
            findings_path = check_path(a.findings)
            outs["findings"] = findings_path
        if getattr(a, "report_html", None):
            report_path = Path(a.report_html)
            if report_path.suffix.lower() not in (".html", ".htm"):
                raise OutputError(f"--report-html {report_path}: give an .html file")
            outs["report"] = report_path
    check_outputs(outs, ins)
    from .regions import min_region_mm3
    min_mm3 = getattr(a, "min_region_mm3", None)
    if min_mm3 is not None and not (np.isfinite(min_mm3) and min_mm3 >= 0):
        raise ValueError(f"--min-region-mm3 must be a number >= 0 (got {min_mm3:g})")
    return ScorePlan(ck, names, opts, outputs, labels, a.threshold, calibrated,
                     min_region_mm3(ck) if min_mm3 is None else float(min_mm3), findings_path, report_path,
                     Path(a.report) if getattr(a, "report", None) else None,
                     region_peaks(ck, heat, opts, threshold, keep_all=getattr(a, "all_regions", False)),
                     tuple(n for n in heat if is_two_tailed(n, opts)))


def _check_dicom_outputs(a, out: Path) -> dict:
    """{'output'/'label': True} for the .dcm outputs asked for (each names one file: one map, one predictor):
    accepted only for a DICOM series folder input and with highdicom installed; checked before any work."""
    from .dicom_out import is_dicom_path, require_highdicom
    asked = {k: p for k, p in (("output", out), ("label", Path(a.label) if a.label else None))
             if p is not None and is_dicom_path(p)}
    if asked and not Path(a.input).is_dir():
        flag, p = next(iter(("-o" if k == "output" else "--label", p) for k, p in asked.items()))
        raise ValueError(f"{flag} {p}: DICOM output needs a DICOM series folder as input, and '{a.input}' is a "
                         f"file; write {p.name[:-4]}.nii.gz (NIfTI) instead, or score the DICOM series folder")
    if asked:
        require_highdicom()
    return {k: True for k in asked}


def write_score_outputs(plan: ScorePlan, maps: dict, img=None, mask=None, source: str = "") -> None:
    """Heatmaps, labels, findings and the HTML report onto their paths, each written whole or not at all.
    img, mask: the scan and its brain mask (None: the automatic mask), for the findings' intensities.
    .dcm paths (a DICOM series folder `source` only, see plan_score): a DICOM Parametric Map / Segmentation."""
    from .io import write_image
    write_image = _dicom_writer(plan, source, write_image)
    for name, path in plan.outputs.items():
        write_image(maps[name], path, name)
        print(f"wrote {path}", file=sys.stderr)
    from .regions import describe_regions, label_image
    for name, path in plan.labels.items():
        peak = plan.region_peaks.get(name)
        lab, t, kept, dropped = label_image(maps[name], plan.threshold, plan.calibrated, name, plan.min_region_mm3,
                                            peak, signed=name in plan.signed)
        write_image(lab, path, name, label=True)
        above = (f"{name} > {t.bright:.4g} (1: brighter than expected) or < -{t.dark:.4g} (2: darker)"
                 if name in plan.signed else f"{name} > {t:.4g}")
        print(f"wrote {path}: {above}, {kept} voxels in {describe_regions(plan.min_region_mm3, peak)} "
              f"({dropped} voxels in other regions dropped)", file=sys.stderr)
    if plan.findings or plan.report_html:
        write_findings_and_report(plan, maps, img, mask, source)


def _dicom_writer(plan: ScorePlan, source: str, write_image):
    """write(img, path, predictor, label=False): write_image, or vaeanomaly.dicom_out for a .dcm path."""
    from .dicom_out import is_dicom_path
    files = []

    def write(img, path, name, label=False):
        if not is_dicom_path(path):
            return write_image(img, path)
        from . import dicom_out
        if not files:
            files.extend(dicom_out.series_files(source))
        if label:  # a signed map's label (1 brighter, 2 darker): one segment per direction
            return dicom_out.write_segmentation(path, img, files, plan.checkpoint.name, signed=name in plan.signed)
        return dicom_out.write_parametric_map(path, img, files, plan.checkpoint.name, name)
    return write


def threshold_source(spec: str, signed: bool = False) -> str:
    """Where a threshold came from, in words (for the report); signed: a signed map's two tails."""
    from .threshold import describe
    kind, value = parse_threshold(spec)
    if signed and kind == "auto":
        return describe("auto-signed")
    return describe(kind, value) + (" (on |value|, both tails)" if signed else "")


def write_findings_and_report(plan: ScorePlan, maps: dict, img, mask, source: str = "") -> list:
    """--findings and --report-html for the one heatmap predictor."""
    import SimpleITK as sitk

    from . import findings as fnd
    from .registry import PREDICTOR_INFO
    from .threshold import resolve_tails, resolve_threshold
    from .volume import mask_for
    name = next(n for n in plan.names if n != RECONSTRUCTION)
    heat = maps[name]
    arr = sitk.GetArrayFromImage(heat)
    signed = name in plan.signed
    t = resolve_tails(plan.threshold, arr, arr != 0, plan.calibrated, name) if signed else \
        resolve_threshold(plan.threshold, arr, arr > 0, plan.calibrated, name)
    brain = mask_for(img, mask) if img is not None else None
    info = PREDICTOR_INFO.get(name)
    polarity = plan.options.for_map(name).polarity if info and info.signed else None
    found = fnd.find(heat, t, img, brain, plan.min_region_mm3, plan.region_peaks.get(name),
                     direction=polarity if polarity in ("bright", "dark") else None)
    peak = plan.region_peaks.get(name)
    meta = {"predictor": name, "threshold": t.to_dict() if signed else t,
            "threshold_source": threshold_source(plan.threshold, signed),
            "min_region_mm3": plan.min_region_mm3, "region_peak": peak.to_dict() if hasattr(peak, "to_dict") else peak,
            "model": plan.checkpoint.name, "input": source}
    if plan.findings:
        fnd.write(plan.findings, found, meta)
        print(f"wrote {plan.findings}: {len(found)} finding(s)", file=sys.stderr)
    if plan.report_html:
        from . import report
        verdict = json.loads(plan.verdict.read_text(encoding="utf-8")) if plan.verdict and plan.verdict.is_file() \
            else None
        from .regions import describe_regions
        kept = describe_regions(plan.min_region_mm3, plan.region_peaks.get(name))
        report.write(plan.report_html, img, heat, t, f"{threshold_source(plan.threshold, signed)}; {kept}", found, name,
                     plan.checkpoint.card().splitlines()[0], verdict, source)
        print(f"wrote {plan.report_html}", file=sys.stderr)
    return found


def cmd_score(a) -> int:
    from .volume import read_image
    if isinstance(a.input, (list, tuple)):  # many inputs (files, a folder of volumes, a glob, a CSV): cohort.py
        from .cohort import cmd_score_many, is_cohort
        if is_cohort(a.input):
            return cmd_score_many(a, _options(a))
        a.input = a.input[0]
    plan = plan_score(a)                                 # everything checked, nothing computed yet
    img = read_image(a.input)                            # read whole and checked
    mask = read_image(a.mask, "mask") if a.mask else None
    maps = run_request(request_from_args(a, plan.options), plan.checkpoint, img, mask, plan.names)
    if maps.mask_source != "given":
        print(f"brain mask: {maps.mask_source}" + (f" (written to {a.mask_out})" if a.mask_out else ""),
              file=sys.stderr)
    write_score_outputs(plan, maps, img, maps.mask, str(a.input))  # the mask the scoring used (extracted too)
    return 0


def request_from_args(a, options: PredictorOptions) -> ScoreRequest:
    """`vaeanomaly score`'s flags for one volume as a scoring request (options already read by _options)."""
    return ScoreRequest(input=str(a.input), output=str(a.output), mask=a.mask, model=a.model, predictors=a.predictor,
                        options=options, report=getattr(a, "report", None), device=a.device, progress=a.progress,
                        brain_extraction=getattr(a, "brain_extraction", "auto"), mask_out=getattr(a, "mask_out", None))


# --------------------------------------------------------------------------- other commands
def cmd_evaluate(a) -> int:
    from .checkpoint import load_checkpoint
    from .data import brats_items, build_cache
    from .evaluation import evaluate, format_table
    opts = _options(a)
    ck = load_checkpoint(a.model)
    names = [n for n in select_predictors(a.predictor, ck, opts) if n != RECONSTRUCTION]
    items = brats_items(a.folder)
    prog = Progress(a.progress, "preprocessing")
    cache = build_cache(items, progress=prog)
    prog.close()
    prog = Progress(a.progress, "scoring")
    res = evaluate(ck, cache.cases(), names, opts, pick_device(a.device), progress=prog)
    prog.close()
    print(f"{ck.name}: {len(items)} cases, pixels at the model grid ({ck.model.image_size}x{ck.model.image_size} slices)")
    for scope in ("brain", "all"):
        for metric in ("auroc", "ap", "dice"):
            where = "inside the brain" if scope == "brain" else "all pixels, background included"
            print(f"{metric.upper()}, {where}\n\n" + format_table({ck.name: res}, scope, metric) + "\n")
    return 0


def cmd_generate(a) -> int:
    from .synth import write_cohort, write_sample
    if a.sample:
        for name, sha in write_sample(a.output, a.seed).items():
            print(f"{a.output}/{name}  SHA256:{sha}")
        return 0
    prog = Progress(a.progress, "generating")
    paths = write_cohort(a.output, a.n, a.lesion, a.seed, progress=prog)
    prog.close()
    print(f"wrote {len(paths)} {'lesion' if a.lesion else 'healthy'} subjects under {a.output}")
    return 0


def cmd_info(a) -> int:
    from .checkpoint import DEFAULT_MODEL, MODELS_DIR, bundled_models, load_checkpoint
    if a.list:
        models = bundled_models()
        if not models:
            print(f"no bundled models in {MODELS_DIR}", file=sys.stderr)
            return 1
        for m in models:
            print(f"{m}  (default)" if m == DEFAULT_MODEL else m)
        return 0
    print(load_checkpoint(a.model).card())
    return 0


def cmd_demo(a) -> int:
    """Generate a lesion case, score it with a bundled checkpoint, write heatmaps + figure, print AUROC."""
    import SimpleITK as sitk

    from .checkpoint import load_checkpoint
    from .figures import overlay_figure
    from .io import check_outputs, write_image
    from .metrics import pixel_metrics
    from .synth import make_subject
    out = Path(a.output)
    ck = load_checkpoint(a.model)
    check_outputs({"demo output folder": out / "heatmaps" / "x"}, {"checkpoint": ck.path})
    print(ck.card(), "\n")
    sub = make_subject(a.seed, lesion=True)
    for name, im in (("case_t2", sub.t2), ("case_seg", sub.seg), ("case_brainmask", sub.mask)):
        write_image(im, out / f"{name}.nii.gz")
    if ck.kind == "dae":  # a denoising autoencoder's own maps (the default model's kind)
        names = list(DAE_PREDICTORS)
    else:
        names = [p for p in PAPER_PREDICTORS if p != "proj-rec-error" or a.with_projection]
        if ck.ensemble is not None:
            names.append(ENSEMBLE)
    request = ScoreRequest("demo case", model=str(ck.path), predictors=",".join(names), progress=a.progress)
    maps = run_request(request, ck, sub.t2, sub.mask, request.checked(ck))  # the one scoring path (scoring.py)
    brain = sitk.GetArrayFromImage(sub.mask) > 0
    gt = sitk.GetArrayFromImage(sub.seg) > 0
    arrays = {}
    print(f"pixel AUROC inside the brain, demo case (seed {a.seed}, never seen in training):")
    for name, m in maps.items():
        write_image(m, out / "heatmaps" / f"{name}.nii.gz")
        arrays[name] = sitk.GetArrayFromImage(m)
        r = pixel_metrics(arrays[name][brain], gt[brain])
        print(f"  {name:15s} AUROC {r['auroc']:.3f}   AP {r['ap']:.3f}   best Dice {r['dice']:.3f}")
    overlay_figure(out / "overlay.png", sitk.GetArrayFromImage(sub.t2), arrays, gt,
                   title=f"{ck.name}: anomaly maps (green: ground-truth lesion)")
    print(f"\nwrote {out}/case_t2.nii.gz, {out}/heatmaps/*.nii.gz and {out}/overlay.png")
    return 0


# --------------------------------------------------------------------------- parser and errors
class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every default in --help; flags (off unless given) and optional paths say nothing."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "(default" in h or action.default in (None, False, argparse.SUPPRESS):
            return h
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    fmt = _DefaultsFormatter
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback on errors (default: one line saying what to do)")
    ap = argparse.ArgumentParser(prog="vaeanomaly", formatter_class=fmt,
                                 description="Unsupervised anomaly maps for brain MRI (VAE / β-VAE).")
    ap.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("score", parents=[debug], formatter_class=fmt,
                       help="heatmap(s) for one volume, on the input's grid")
    p.add_argument("input", nargs="+", help="3D volume (NIfTI, NRRD, MHA, ...) or a DICOM series folder; or many: "
                                            "several files, a folder of volumes, a quoted glob, or a CSV with "
                                            "'volume' and 'mask' columns (then -o is a folder; see vaeanomaly/cohort.py)")
    p.add_argument("-o", "--output", required=True,
                   help="OUT.nii.gz (one map), or a folder (no suffix): one <name>.nii.gz per map. Never an input. "
                        "OUT.dcm (a DICOM series folder input, one map): a DICOM Parametric Map of the series. "
                        "Many inputs: a folder with <input name>.nii.gz (or <input name>/<map>.nii.gz) and summary.csv")
    p.add_argument("--workers", type=int, default=2, help="many inputs: DataLoader worker processes reading and "
                                                          "preprocessing ahead of the network (0: none)")
    p.add_argument("--mask", help="brain mask on the input grid (default: the automatic foreground mask for a "
                                  "skull-stripped input; a head gets its brain extracted, see --brain-extraction)")
    p.add_argument("--brain-extraction", choices=["auto", "off"], default="auto",
                   help="a head scored without --mask: 'auto' extracts its brain (HD-BET; needs pip install "
                        "\".[brain]\"), 'off' refuses it (default: auto)")
    p.add_argument("--mask-out", metavar="MASK.nii.gz",
                   help="write the brain mask the scoring used (given, extracted or automatic) to this file")
    p.add_argument("--threshold", help="number, percentile inside the brain (p99), or 'auto' (the checkpoint's "
                                       "calibrated 99th percentile on healthy brains); needs --label, --findings "
                                       "or --report-html")
    p.add_argument("--label", help="with --threshold: the label map (one predictor), or a folder: one "
                                   "<predictor>_label.nii.gz per predictor; LABEL.dcm (a DICOM series folder input, "
                                   "one predictor): a DICOM Segmentation of the series")
    p.add_argument("--min-region-mm3", type=float, default=None, metavar="MM3",
                   help="label regions smaller than this are dropped (default: the checkpoint's recorded size, else "
                        "the library's; 0 keeps every voxel above the threshold)")
    p.add_argument("--all-regions", action="store_true",
                   help="keep every region above the threshold; by default, with --threshold auto (hysteresis), a "
                        "label or findings region is kept only when its peak reaches the checkpoint's calibrated "
                        "region peak (99.9th percentile of healthy brain), where the checkpoint has one for these "
                        "options; a number or a percentile keeps every region")
    p.add_argument("--report", help="R.json: the out-of-distribution verdict for this scan (in_distribution, fit, "
                                    "brain_volume_ml, mask, flagged_percent, warnings); see vaeanomaly/verdict.py")
    p.add_argument("--findings", metavar="F.json|F.csv",
                   help="with --threshold: the regions above it (at least --min-region-mm3), ranked, each with volume, "
                        "scores, centroid and box in LPS mm, slices and mean intensity (vaeanomaly/findings.py)")
    p.add_argument("--report-html", metavar="R.html",
                   help="with --threshold: a one-page report (verdict with --report, model, threshold, findings, "
                        "thumbnails); self-contained HTML, prints to PDF")
    _add_model_args(p)
    p.set_defaults(func=cmd_score)
    p = sub.add_parser("evaluate", parents=[debug], formatter_class=fmt,
                       help="metrics tables over a BraTS-layout folder")
    p.add_argument("folder", help="<case>/<case>_t2.nii.gz + <case>_seg.nii.gz folders")
    _add_model_args(p, predictor_default="all")
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("generate", parents=[debug], formatter_class=fmt,
                       help="write N synthetic subjects (healthy: HCP layout; --lesion: BraTS layout)")
    p.add_argument("output", help="folder")
    p.add_argument("--n", type=int, default=4, help="number of subjects")
    p.add_argument("--lesion", action="store_true", help="lesion cases in BraTS layout")
    p.add_argument("--sample", action="store_true", help="write the Slicer module's sample case (use --seed 9001)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--progress", choices=["bar", "lines", "none"], default="bar", help="progress display")
    p.set_defaults(func=cmd_generate)
    from .checkpoint import DEFAULT_MODEL
    p = sub.add_parser("info", parents=[debug], formatter_class=fmt, help="a checkpoint's model card")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="checkpoint file or bundled model name")
    p.add_argument("--list", action="store_true", help="list the bundled models, the default marked")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("demo", parents=[debug], formatter_class=fmt,
                       help="generate a lesion case, score it, write heatmaps and a figure")
    p.add_argument("--output", default="demo_output", help="folder")
    p.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint file or bundled model name")
    p.add_argument("--seed", type=int, default=9001, help="random seed of the generated case")
    p.add_argument("--with-projection", action="store_true", help="include Proj-Rec-Error (slower)")
    p.add_argument("--progress", choices=["bar", "lines", "none"], default="bar", help="progress display")
    p.set_defaults(func=cmd_demo)
    from .adapt import add_parser as add_adapt_parser  # `vaeanomaly adapt` lives in adapt.py (issue 8)
    add_adapt_parser(sub, parents=[debug], formatter_class=fmt)
    return ap


WEB_MOVED = ("the browser viewer is the application's own command now: `vaeanomaly-web` (installed with "
             "`pip install \".[web]\"` from a source checkout; README, 'Install from source'); the core library's "
             "`vaeanomaly` scores, calibrates and adapts")


def show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"vaeanomaly: warning: {message}", file=sys.stderr)


def error_exit(err: BaseException, debug_hint: bool = True) -> tuple[int, str]:
    """(exit code, the one line printed) for an error ending a command (also the warm worker's jobs)."""
    from .checkpoint import CheckpointError
    from .predictors import Cancelled
    from .volume import VolumeError
    if isinstance(err, Cancelled):
        return 130, "vaeanomaly: cancelled"
    if isinstance(err, (VolumeError, CheckpointError, ValueError, OSError)):  # files, permissions, a full disk
        return 2, f"vaeanomaly: error: {err}"
    if isinstance(err, MemoryError):
        return 2, "vaeanomaly: error: out of memory; crop or resample the volume, or lower --batch-size"
    msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if "out of memory" in msg.lower():
        return 2, f"vaeanomaly: error: out of memory on the device ({msg}); lower --batch-size or use --device cpu"
    hint = "run again with --debug for the traceback, and " if debug_hint else ""
    return 1, f"vaeanomaly: error: unexpected {type(err).__name__}: {msg} ({hint}please report it)"


def _console_never_fails() -> None:
    """Windows: stdout/stderr redirected to a file or pipe use the ANSI code page (cp1252), which has no λ, β or
    →; such a character would end the command in UnicodeEncodeError. It is written escaped there instead."""
    if os.name != "nt":
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            if "utf" not in (getattr(stream, "encoding", "") or "").lower().replace("-", ""):
                stream.reconfigure(errors="backslashreplace")
        except Exception:  # noqa: BLE001  (a replaced stream without reconfigure: left as it is)
            pass


def main(argv=None) -> int:
    from .predictors import Cancelled
    _console_never_fails()
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["web"]:  # the viewer left the core (it is the application's): say where it went
        print(f"vaeanomaly: error: {WEB_MOVED}", file=sys.stderr)
        return 2
    a = build_parser().parse_args(args)
    debug = getattr(a, "debug", False)
    old = warnings.showwarning
    warnings.showwarning = show_warning
    try:
        return a.func(a)
    except KeyboardInterrupt:
        if debug:
            raise
        print("vaeanomaly: interrupted; no output was written partially", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001  (one line; the traceback with --debug)
        if debug and not isinstance(err, Cancelled):
            raise
        code, line = error_exit(err)
        print(line, file=sys.stderr)
        return code
    finally:
        warnings.showwarning = old


if __name__ == "__main__":
    sys.exit(main())
