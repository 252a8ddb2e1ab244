"""One scoring API: a request, checked in one place, and the functions that run it.

`ScoreRequest` is what `vaeanomaly score` does for one volume, whoever asks: the command line builds it from its
flags (cli.py), the warm worker receives it as JSON from the Slicer module or the web viewer (score_worker.py),
the module's in-process Logic.process builds one (VAEAnomalyLib/logic.py), cohort scoring builds one for the
cohort, checks it once and scores each input as that request for the input's own volume and mask (cohort.py).
`ScoreRequest.checked(checkpoint)` validates the options and the predictors against the checkpoint.

`score_prepared(checkpoint, prepared, names, ...)` is the computation itself, on a volume already on the model
grid (volume.prepare): the maps of one network pass, then the model-grid part of the out-of-distribution verdict
on those maps. `run(request, checkpoint, img, mask, names)` prepares one volume, calls score_prepared, brings
the heatmaps back to the input grid and, with a report path, adds the input-grid checks and writes the verdict.
Cohort scoring calls score_prepared on the volumes its loader workers prepared, `adapt` on its scans (for the
flagged share before and after fine-tuning).
The helpers the commands share (progress display, device choice, threshold syntax, option and predictor checks)
live here too, so that no module needs a private name of cli.py and cli.py imports the commands it dispatches
to, never the other way round.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .predictors import PredictorOptions, parse_predictors
from .registry import DEFAULT_PREDICTORS, ENSEMBLE, NORMALISE, POLARITIES

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


# --------------------------------------------------------------------------- shared by the commands
class Progress:
    """tqdm bar with ETA on stderr, or 'PROGRESS <fraction> ETA <seconds>s <stage>' lines for a parent
    process (the Slicer module reads the fraction). `stage(text)` names what runs now."""

    def __init__(self, mode: str, desc: str, min_interval: float = 0.1):
        self.mode, self.bar, self.desc, self.text = mode, None, desc, ""
        self.first, self.last, self.min_interval = None, 0.0, min_interval  # (time, fraction) of the first report
        if mode == "bar":
            from tqdm import tqdm
            self.bar = tqdm(total=1000, desc=desc, file=sys.stderr,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}")

    def stage(self, text: str) -> None:
        self.text = text
        if self.bar is not None:
            self.bar.set_postfix_str(text[:60], refresh=True)

    def eta(self, frac: float) -> Optional[float]:
        """Seconds left, from the rate since the first report (so set-up time does not skew it)."""
        now = time.monotonic()
        if self.first is None:
            self.first = (now, frac)
            return None
        t0, f0 = self.first
        return (now - t0) * (1 - frac) / (frac - f0) if frac > f0 else None

    def __call__(self, frac: float):
        frac = min(max(frac, 0.0), 1.0)
        if self.bar is not None:
            self.bar.n = int(1000 * frac)
            self.bar.refresh()
        elif self.mode == "lines":
            now = time.monotonic()
            eta = self.eta(frac)
            if frac < 1 - 1e-9 and now - self.last < self.min_interval:  # the last report always shows (float sums)
                return
            self.last = now
            print(f"PROGRESS {frac:.4f} ETA {'?' if eta is None else f'{eta:.0f}s'} {self.text}".rstrip(),
                  file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def check_options(opts: PredictorOptions) -> PredictorOptions:
    """The predictor options checked once, wherever they come from (the flags, --options FILE.json, a
    request of the warm worker): ValueError naming every problem."""
    problems = []
    if not isinstance(opts.proj_steps, int) or opts.proj_steps < 0:
        problems.append(f"--proj-steps must be a whole number >= 0 (got {opts.proj_steps})")
    if not opts.proj_lambda >= 0:
        problems.append(f"--proj-lambda must be >= 0 (got {opts.proj_lambda})")
    if not 0 <= opts.proj_tol < 1:
        problems.append(f"--proj-tol must be >= 0 and < 1 (got {opts.proj_tol})")
    if not opts.proj_lr > 0:
        problems.append(f"--proj-lr must be > 0 (got {opts.proj_lr})")
    if not isinstance(opts.batch_size, int) or opts.batch_size < 1:
        problems.append(f"--batch-size must be a whole number >= 1 (got {opts.batch_size})")
    if not (opts.smooth_sigma > 0 and int(opts.smooth_kernel) >= 1):
        problems.append("smoothing needs sigma > 0 and a kernel of at least 1 pixel")
    if opts.smooth_mm is not None and not (isinstance(opts.smooth_mm, (int, float)) and 0 <= opts.smooth_mm <= 50):
        problems.append(f"--smooth-mm must be between 0 and 50 mm (got {opts.smooth_mm})")
    if opts.smooth_z_mm is not None and not (isinstance(opts.smooth_z_mm, (int, float)) and 0 <= opts.smooth_z_mm <= 50):
        problems.append(f"--smooth-z-mm must be between 0 and 50 mm (got {opts.smooth_z_mm})")
    if opts.polarity is not None and opts.polarity not in POLARITIES:
        problems.append(f"polarity must be one of {', '.join(POLARITIES)} (got {opts.polarity!r})")
    if opts.evidence is not None and opts.evidence not in ("none", "intensity"):
        problems.append(f"evidence must be 'none' or 'intensity' (got {opts.evidence!r})")
    if opts.rim_mm is not None and not (isinstance(opts.rim_mm, (int, float)) and 0 <= opts.rim_mm <= 30):
        problems.append(f"--rim-mm must be between 0 and 30 mm (got {opts.rim_mm})")
    if opts.normalise is not None and opts.normalise not in NORMALISE:
        problems.append(f"normalise must be one of {', '.join(NORMALISE)} (got {opts.normalise!r})")
    if problems:
        raise ValueError("; ".join(problems))
    return opts


def parse_threshold(spec: str) -> tuple[str, float]:
    """'auto' -> ('auto', nan); 'p99' -> ('percentile', 99.0); '0.8' -> ('absolute', 0.8)."""
    s = str(spec).strip().lower()
    if s == "auto":
        return "auto", float("nan")
    try:
        if s.startswith("p"):
            q = float(s[1:])
            if not 0 <= q <= 100:
                raise ValueError(f"--threshold percentile {q:g} is outside 0-100")
            return "percentile", q
        v = float(s)
        if not np.isfinite(v):
            raise ValueError
        return "absolute", v
    except ValueError as err:
        if "outside" in str(err):
            raise
        raise ValueError(f"--threshold '{spec}' is not a number, a percentile like p99, or 'auto' "
                         f"(the checkpoint's calibrated threshold)") from None


def select_predictors(spec: str, ck, opts: PredictorOptions, explicit_all_note: bool = True) -> list[str]:
    """Validated predictor names for this checkpoint and these options. 'all' is the six paper
    predictors plus the ensemble when the checkpoint carries one that runs with these options."""
    if spec is None:  # the default predictor of the checkpoint's model kind
        spec = DEFAULT_PREDICTORS[ck.kind]
    names = parse_predictors(spec, with_ensemble=ck.ensemble is not None, kind=ck.kind)
    if spec.strip() == "all":
        if ck.ensemble is None:
            print("vaeanomaly: note: 'all' without the ensemble: this checkpoint carries none "
                  "(fit one with training/fit_ensemble.py)", file=sys.stderr)
        else:
            try:
                ck.ensemble.check_options(opts)
            except ValueError as err:
                names.remove(ENSEMBLE)
                print(f"vaeanomaly: note: 'all' without the ensemble: {err}", file=sys.stderr)
    elif ENSEMBLE in names:
        if ck.ensemble is None:
            raise ValueError(f"'{ck.name}' carries no ensemble; fit one with training/fit_ensemble.py, or choose "
                             f"another predictor")
        ck.ensemble.check_options(opts)
    return names


DEVICE_HELP = "auto (the default: CUDA when PyTorch sees a GPU, else the CPU), cpu, cuda, cuda:1 ..."


def pick_device(name: str) -> str:
    """'auto' -> 'cuda' when PyTorch sees a CUDA GPU, else 'cpu'; a CUDA device that is not there -> 'cpu' (warned)."""
    import torch
    if name in ("auto", "", None):
        try:
            return "cuda" if torch.cuda.is_available() else "cpu"
        except Exception:  # noqa: BLE001  (a broken CUDA install: the CPU always works)
            return "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        print("vaeanomaly: warning: CUDA not available, using the CPU", file=sys.stderr)
        return "cpu"
    return name


def is_image_path(p: Path) -> bool:
    return p.name.lower().endswith(IMAGE_SUFFIXES)


# --------------------------------------------------------------------------- the request
@dataclass
class ScoreRequest:
    """`vaeanomaly score` for one volume. predictors: a spec as --predictor takes it (None: the default of the
    checkpoint's model kind); output: where the caller writes the maps (the request only carries it); report: a
    path for the out-of-distribution verdict (None: no verdict); progress: 'bar', 'lines' or 'none';
    brain_extraction: 'auto' (a head scored without a mask gets its brain extracted, brainextract.py) or 'off'
    (such a head is refused); mask_out: a file to write the brain mask the scoring used (given, extracted or
    automatic) to."""
    input: str
    output: Optional[str] = None
    mask: Optional[str] = None
    model: Optional[str] = None
    predictors: Optional[str] = None
    options: PredictorOptions = field(default_factory=PredictorOptions)
    report: Optional[str] = None
    device: str = "cpu"
    progress: str = "none"
    brain_extraction: str = "auto"
    mask_out: Optional[str] = None

    def to_json(self) -> dict:
        d = asdict(self)
        d["options"] = self.options.to_dict()
        return d

    @classmethod
    def from_json(cls, d) -> "ScoreRequest":
        """A request from its JSON form (to_json), checked: unknown keys and option names are refused."""
        if not isinstance(d, dict) or not isinstance(d.get("input"), str):
            raise ValueError("a scoring request is a JSON object with at least 'input' (a volume file)")
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown scoring request field(s) {', '.join(unknown)}; known: "
                             f"{', '.join(cls.__dataclass_fields__)}")
        opts = d.get("options") or {}
        if not isinstance(opts, dict):
            raise ValueError("the request's 'options' must be a JSON object (PredictorOptions.to_dict())")
        bad = sorted(set(opts) - set(PredictorOptions.__dataclass_fields__))
        if bad:
            raise ValueError(f"unknown option(s) {', '.join(bad)}; known: "
                             f"{', '.join(PredictorOptions.__dataclass_fields__)}")
        return cls(**{**d, "options": PredictorOptions.from_dict(opts)})

    def checked(self, checkpoint) -> list[str]:
        """Check the options and the progress mode; return the maps to compute for this checkpoint."""
        check_options(self.options)
        from .brainextract import MODES
        if self.brain_extraction not in MODES:
            raise ValueError(f"brain_extraction must be one of {', '.join(MODES)} (got {self.brain_extraction!r})")
        if self.mask_out and not is_image_path(Path(self.mask_out)):
            raise ValueError(f"mask_out {self.mask_out}: give a NIfTI, NRRD or MHA file name ({', '.join(IMAGE_SUFFIXES)})")
        if self.progress not in ("bar", "lines", "none"):
            raise ValueError(f"progress must be 'bar', 'lines' or 'none' (got {self.progress!r})")
        return select_predictors(self.predictors, checkpoint, self.options)


def score_prepared(checkpoint, prepared, names, options: Optional[PredictorOptions] = None, device: str = "cpu",
                   verdict: bool = True, progress=None, cancel: Optional[Callable[[], bool]] = None,
                   on_maps: Optional[Callable[[dict], None]] = None) -> tuple[dict, Optional[dict]]:
    """Score one volume already on the model grid (volume.Prepared): (maps, verdict). maps: every map in `names`
    on the model grid, and with verdict=True also those the verdict reads (verdict.grid_names), from ONE network
    pass over the brain slices; verdict: the model-grid part of the out-of-distribution verdict on those maps
    (verdict.assess_slices: fit, flagged %, warnings), None when verdict=False. on_maps(maps): called as soon as
    the maps exist, before the verdict is computed. The one place where a volume meets the network for scoring:
    `run`, cohort scoring and adapt's before/after figures all call it."""
    from .verdict import assess_slices, grid_names
    from .volume import grid_maps
    on_grid = grid_names(checkpoint, names) if verdict else list(dict.fromkeys(names))
    maps = grid_maps(checkpoint, prepared, on_grid, options, device, progress, cancel)
    if on_maps is not None:
        on_maps(maps)
    if not verdict:
        return maps, None
    return maps, assess_slices(checkpoint, prepared.slices, prepared.brain, names[0] if names else None, options,
                               device, maps=maps)


def on_input_grid(prepared, grid_map: np.ndarray):
    """A map on the model grid back on the exact input grid (SimpleITK image), 0 outside the brain."""
    from .volume import to_input_grid
    return to_input_grid(np.where(prepared.brain, grid_map, 0), prepared)


class Heatmaps(dict):
    """What `run` returns: {name: heatmap on the input grid}, plus the brain mask the scoring used (`mask`, a
    SimpleITK uint8 image on the input grid) and where it came from (`mask_source`: 'given', 'automatic' or
    'extracted (HD-BET)')."""
    mask = None
    mask_source = ""


def run(request: ScoreRequest, checkpoint, img, mask, names, on_maps: Optional[Callable[[dict], None]] = None,
        progress: Optional[Callable[[float], None]] = None, cancel: Optional[Callable[[], bool]] = None) -> Heatmaps:
    """The computation of `vaeanomaly score` for one volume (the command line's, the warm worker's and the
    module's Logic.process): the heatmaps `names` on the input grid and, with request.report, the
    out-of-distribution verdict from the same network pass (score_prepared), written there. A head that is not
    skull-stripped and comes without a mask gets its brain extracted (request.brain_extraction 'auto' with the
    [brain] extra: _prepare_or_extract) or is refused (VolumeError) after its report is written.
    The mask used is on the result (Heatmaps.mask, .mask_source) and written to request.mask_out.
    on_maps(maps): called as soon as the heatmaps exist (with a report: before the verdict is computed).
    progress: a callable taking the fraction done (default: request.progress's display); cancel() is checked
    between batches."""
    report = None
    if request.report:
        from .verdict import check_report_path
        report = check_report_path(request.report, (request.input, request.mask))
    device = pick_device(request.device)
    prog = progress or Progress(request.progress, "scoring")
    heat = Heatmaps()
    try:
        p, mask, heat.mask_source = _prepare_or_extract(request, checkpoint, img, mask, report, device, prog, cancel)
        if mask is not None and heat.mask_source != "given":  # extracted: the scoring takes the rest of the bar
            prog = _Rescaled(prog, 0.5, 1.0)
        heat.mask = p.mask
        if request.mask_out:
            from .io import write_image
            write_image(p.mask, request.mask_out)

        def ready(maps):  # the heatmaps on the input grid, as soon as the network is done
            heat.update({n: on_input_grid(p, maps[n]) for n in names})  # 'reconstruction' stays in z-score units
            if on_maps is not None:
                on_maps(heat)

        _, grid = score_prepared(checkpoint, p, names, request.options, device, verdict=report is not None,
                                 progress=prog, cancel=cancel, on_maps=ready)
        if report is not None:
            _write_report(report, checkpoint, img, mask, p, grid, heat.mask_source)
    finally:
        if progress is None:
            getattr(prog, "inner", prog).close()
    return heat


def _prepare_or_extract(request, checkpoint, img, mask, report, device, prog, cancel):
    """(prepared, mask, mask source). A head without a mask (NotSkullStrippedError from the automatic mask's
    checks) gets its brain extracted when request.brain_extraction is 'auto' and the [brain] extra is installed,
    on the first half of the progress bar; otherwise the refusal stands (its report written). A skull-stripped
    scan pays nothing for this: the automatic mask is checked once, in volume.prepare."""
    from .errors import NotSkullStrippedError
    if mask is not None:
        return _prepare(checkpoint, img, mask, report, "given"), mask, "given"
    try:
        return _prepare(checkpoint, img, None, None), None, "automatic"
    except NotSkullStrippedError:
        from . import brainextract
        if request.brain_extraction != "auto" or not brainextract.available()[0]:
            if report is not None:
                _report_refusal(report, checkpoint, img, None, "automatic")
            raise
    if hasattr(prog, "stage"):
        prog.stage(f"extracting the brain ({brainextract.METHOD})")
    mask = brainextract.extract_brain(img, device, progress=lambda f: prog(0.5 * f), cancel=cancel)
    if hasattr(prog, "stage"):
        prog.stage("scoring")
    return _prepare(checkpoint, img, mask, report, brainextract.SOURCE), mask, brainextract.SOURCE


class _Rescaled:
    """A progress callable whose [0, 1] maps onto [lo, hi] of another's (the scoring after the brain extraction)."""

    def __init__(self, inner, lo: float, hi: float):
        self.inner, self.lo, self.hi = inner, lo, hi

    def __call__(self, frac: float):
        return self.inner(self.lo + (self.hi - self.lo) * frac)

    def stage(self, text: str) -> None:
        if hasattr(self.inner, "stage"):
            self.inner.stage(text)


def _prepare(checkpoint, img, mask, report: Optional[Path], mask_source: str = ""):
    """volume.prepare with the checkpoint's preprocessing; with a report path, a scan refused as not
    skull-stripped gets its report (the input-grid part) before the refusal is raised."""
    from .preprocessing import Preprocessing
    from .volume import VolumeError, prepare
    try:
        return prepare(img, mask, Preprocessing.from_dict(checkpoint.preprocessing))
    except VolumeError:
        if report is not None:
            _report_refusal(report, checkpoint, img, mask, mask_source)
        raise


def _report_refusal(path: Path, checkpoint, img, mask, mask_source: str = "") -> None:
    """Write the report of a scan that scoring refused, when the input-grid checks say why (a head that is not
    skull-stripped, without a mask); an input unusable in itself gets none (its error says why)."""
    from . import verdict
    from .volume import VolumeError
    try:
        base, scoreable = verdict.input_part(checkpoint, img, mask)
    except VolumeError:
        return
    if not scoreable:
        verdict.publish(path, _with_source(base, mask_source))


def _with_source(base: dict, mask_source: str) -> dict:
    """The report names where its brain mask came from (given, automatic, extracted (HD-BET))."""
    return {**base, "mask": mask_source} if mask_source else base


def _write_report(path: Path, checkpoint, img, mask, prepared, grid: dict, mask_source: str = "") -> None:
    """The whole verdict: the input-grid checks (the automatic mask scoring already checked is reused) joined with
    the model-grid part, written as JSON and summed up on stderr."""
    from . import verdict
    base, _ = verdict.input_part(checkpoint, img, mask, prepared.mask if mask is None else None)
    verdict.publish(path, verdict.with_grid_part(_with_source(base, mask_source), grid))
