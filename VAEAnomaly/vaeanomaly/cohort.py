"""Scoring many volumes: `vaeanomaly score A.nii.gz B.nii.gz ... -o OUT/` (or a folder, a glob, a CSV).

The model is loaded once and the cohort's scoring request (scoring.ScoreRequest: model, predictors, options,
device) is checked once; each input is scored as that request for its own volume and mask. Reading, validating
and preprocessing (onto the model grid) run in torch DataLoader worker processes, ahead of the network; the
network pass and the verdict are scoring.score_prepared's (what `vaeanomaly score` computes for one volume);
heatmaps go back to the input grid and are written by a writer thread while the next volume is scored, so I/O
overlaps compute. One output per input, plus OUT/summary.csv with a row per input: status, outputs, the verdict
(in distribution, fit, % of the brain flagged at the calibrated threshold, from the maps already computed),
seconds.

Under `torchrun` (WORLD_SIZE > 1) each rank scores items rank, rank + world, ... of the sorted list (CUDA:
device cuda:LOCAL_RANK), and rank 0 gathers the rows (torch.distributed, gloo or nccl) into the one summary.

Inputs (`expand_inputs`):
  - files (any volume SimpleITK reads), several at once;
  - a folder holding volume files (a folder without any is a DICOM series: one input, as before);
  - a glob pattern ('data/*/T2.nii.gz', quoted so the shell leaves it);
  - a CSV file with a `volume` column and an optional `mask` column (paths relative to the CSV's folder).
"""
from __future__ import annotations

import csv
import glob
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from .scoring import IMAGE_SUFFIXES, ScoreRequest

SUMMARY_FIELDS = ("input", "mask", "status", "outputs", "in_distribution", "fit", "flagged_percent", "predictor",
                  "threshold", "findings", "largest_finding_ml", "seconds", "message")


@dataclass
class Item:
    volume: str
    mask: Optional[str] = None
    name: str = ""


def _stem(path: str) -> str:
    n = Path(path).name
    for s in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if n.lower().endswith(s):
            return n[:-len(s)]
    return n


def _is_glob(s: str) -> bool:
    return any(c in s for c in "*?[") and not Path(s).exists()


def _volumes_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))


def is_cohort(inputs) -> bool:
    """More than one input, a glob, a CSV, or a folder of volume files (not a DICOM series folder)."""
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    if len(inputs) != 1:
        return True
    s = inputs[0]
    p = Path(s)
    return _is_glob(s) or p.name.lower().endswith(".csv") or (p.is_dir() and bool(_volumes_in(p)))


def read_csv(path: Path) -> list[Item]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or "volume" not in rows[0]:
        raise ValueError(f"CSV '{path}' needs a header with a 'volume' column (and optionally 'mask'); "
                         f"found {list(rows[0]) if rows else 'no rows'}")
    base = path.parent
    out = []
    for k, r in enumerate(rows, 2):
        v = (r.get("volume") or "").strip()
        if not v:
            raise ValueError(f"CSV '{path}' line {k}: empty 'volume'")
        m = (r.get("mask") or "").strip() or None
        out.append(Item(str(base / v) if not Path(v).is_absolute() else v,
                        (str(base / m) if not Path(m).is_absolute() else m) if m else None))
    return out


def expand_inputs(inputs, mask: Optional[str] = None) -> list[Item]:
    """Items (volume, mask, unique output name) from files, folders, globs and CSVs, in a stable order."""
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    items: list[Item] = []
    for s in inputs:
        p = Path(s)
        if p.name.lower().endswith(".csv") and p.is_file():
            items += read_csv(p)
        elif _is_glob(s):
            found = sorted(glob.glob(s))
            if not found:
                raise ValueError(f"the pattern '{s}' matches no file")
            items += [Item(f) for f in found]
        elif p.is_dir() and _volumes_in(p):
            items += [Item(str(f)) for f in _volumes_in(p)]
        elif not p.exists():
            raise ValueError(f"input '{s}' does not exist")
        else:
            items.append(Item(s))  # a volume file or a DICOM series folder
    if mask is not None:
        if len(items) != 1:
            raise ValueError("--mask names one mask for one input; for many inputs give a CSV with a 'mask' column")
        items[0].mask = mask
    # unique names: the file's stem, qualified by its folder when stems repeat (data/a/T2.nii.gz -> a_T2)
    stems = [_stem(it.volume) for it in items]
    for it, st in zip(items, stems):
        it.name = st if stems.count(st) == 1 else f"{Path(it.volume).parent.name}_{st}"
    names = [it.name for it in items]
    for k, it in enumerate(items):
        if names.count(it.name) > 1:
            it.name = f"{it.name}_{k}"
    return items


def outputs_for(item: Item, names: list[str], out: Path) -> dict:
    heat = [n for n in names]
    if len(heat) == 1:
        return {heat[0]: out / f"{item.name}.nii.gz"}
    return {n: out / item.name / f"{n}.nii.gz" for n in heat}


# --------------------------------------------------------------------------- the data loader
class _Volumes:
    """torch Dataset: request k -> (k, Prepared or the error message, seconds). Runs in DataLoader workers."""

    def __init__(self, requests: list[ScoreRequest], prep):
        self.requests, self.prep = requests, prep

    def __len__(self):
        return len(self.requests)

    def __getitem__(self, k):
        from .volume import prepare, read_image
        r = self.requests[k]
        t = time.perf_counter()
        try:
            img = read_image(r.input)
            mask = read_image(r.mask, "mask") if r.mask else None
            return k, prepare(img, mask, self.prep, what=f"input '{r.input}'"), time.perf_counter() - t
        except Exception as err:  # one bad input must not stop the cohort: reported in the summary
            return k, f"{type(err).__name__}: {err}", time.perf_counter() - t


def _identity(batch):
    return batch


def dist_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def request_for(request: ScoreRequest, item: Item) -> ScoreRequest:
    """The cohort's request for one item: the same model, predictors, options and device, the item's volume and
    mask (nothing `ScoreRequest.checked` looks at, so the cohort's request is checked once for all)."""
    return replace(request, input=item.volume, mask=item.mask)


def score_many(checkpoint, items: list[Item], names: list[str], out: Path, request: ScoreRequest,
               workers: int = 2, labels: Optional[dict] = None, log=sys.stderr) -> list[dict]:
    """Score every item (this rank's share under torchrun) as `request` (the cohort's, checked: names =
    request.checked(checkpoint)) for the item's volume and mask; returns the summary rows of this rank.
    labels: optional {'threshold': spec, 'calibrated': {...}, 'folder': Path} to write label maps too."""
    from torch.utils.data import DataLoader

    from .io import write_image
    from .preprocessing import Preprocessing
    from .scoring import on_input_grid, score_prepared
    rank, world, _ = dist_info()
    mine = items[rank::world]
    requests = [request_for(request, it) for it in mine]
    prep = Preprocessing.from_dict(checkpoint.preprocessing)
    loader = DataLoader(_Volumes(requests, prep), batch_size=None, shuffle=False, num_workers=workers,
                        collate_fn=_identity, prefetch_factor=2 if workers else None,
                        persistent_workers=False)
    rows: list[dict] = []
    todo: queue.Queue = queue.Queue(maxsize=2)

    def writer():  # back to the input grid and onto disk, while the next volume is scored
        while (job := todo.get()) is not None:
            row, p, maps, t0 = job
            try:
                written = []
                for n, path in outputs_for(mine[row["_k"]], names, out).items():
                    img = on_input_grid(p, maps[n])
                    write_image(img, path)
                    written.append(str(path))
                    if labels and n != "reconstruction":
                        from .regions import label_image
                        lab, t = label_image(img, labels["threshold"], labels["calibrated"], n,
                                             labels["min_region_mm3"], labels["region_peaks"].get(n),
                                             signed=n in labels.get("signed", ()))[:2]
                        if "findings" not in row:  # the first heatmap's findings (vaeanomaly/findings.py)
                            from .findings import find, summary
                            row.update(summary(find(img, t, p.image, p.mask, labels["min_region_mm3"],
                                                    labels["region_peaks"].get(n))))
                        lp = Path(labels["folder"]) / (f"{mine[row['_k']].name}_label.nii.gz" if len(names) == 1
                                                       else f"{mine[row['_k']].name}/{n}_label.nii.gz")
                        write_image(lab, lp)
                        written.append(str(lp))
                row["outputs"] = ";".join(written)
                row["status"] = "ok"
            except Exception as err:
                row["status"], row["message"] = "error", f"{type(err).__name__}: {err}"
            row["seconds"] = round(row["seconds"] + time.perf_counter() - t0, 3)
            print(f"[{rank}] {row['status']:5s} {row['input']} ({row['seconds']:.2f} s)", file=log, flush=True)

    th = threading.Thread(target=writer, daemon=True)
    th.start()
    try:
        for k, p, t_read in loader:
            r = requests[k]
            row = {"_k": k, "input": r.input, "mask": r.mask or "", "status": "error", "outputs": "",
                   "in_distribution": "", "fit": "", "flagged_percent": "", "predictor": "", "threshold": "",
                   "seconds": t_read, "message": ""}
            rows.append(row)
            if isinstance(p, str):
                row["message"] = p
                row["seconds"] = round(t_read, 3)
                print(f"[{rank}] error {r.input}: {p}", file=log, flush=True)
                continue
            t0 = time.perf_counter()
            maps, v = score_prepared(checkpoint, p, names, r.options, r.device)  # the maps, then their verdict
            row.update({"in_distribution": v["in_distribution"], "fit": v["fit"] if v["fit"] is not None else "",
                        "flagged_percent": v["flagged_percent"] if v["flagged_percent"] is not None else "",
                        "predictor": v["predictor"] or "",
                        "threshold": v["threshold"] if v["threshold"] is not None else "",
                        "message": " | ".join(v["warnings"])})
            todo.put((row, p, maps, t0))
    finally:
        todo.put(None)
        th.join()
    for row in rows:
        row.pop("_k", None)
    return rows


def gather_rows(rows: list[dict]) -> Optional[list[dict]]:
    """All ranks' rows on rank 0 (None on the others); just `rows` without torchrun."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return rows
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rows)
    return [r for part in parts for r in part] if dist.get_rank() == 0 else None


def write_summary(rows: list[dict], path: Path, order: list[str]) -> Path:
    pos = {v: k for k, v in enumerate(order)}
    rows = sorted(rows, key=lambda r: pos.get(r["input"], len(pos)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)
    return path


def cmd_score_many(a, opts) -> int:
    """`vaeanomaly score` with many inputs (see the module docstring); opts: the checked PredictorOptions of the
    command line's flags (cli._options)."""
    import torch

    from .calibration import auto_threshold, is_two_tailed, tails_or_fallback
    from .checkpoint import load_checkpoint
    from .registry import RECONSTRUCTION
    from .scoring import parse_threshold, pick_device
    if getattr(a, "report", None):
        raise ValueError("--report is for one input; with many inputs the verdict of each is in OUT/summary.csv")
    if a.threshold is not None and not a.label:
        raise ValueError("--threshold needs --label FOLDER (where to write the label maps)")
    if a.label and a.threshold is None:
        raise ValueError("--label needs --threshold (a number, a percentile such as p99, or 'auto')")
    threshold = parse_threshold(a.threshold) if a.threshold is not None else None
    given = [a.input] if isinstance(a.input, str) else list(a.input)
    items = expand_inputs(given, a.mask)
    out = Path(a.output)
    if out.name.lower().endswith(IMAGE_SUFFIXES) or (out.exists() and not out.is_dir()):
        raise ValueError(f"-o {out}: with {len(items)} inputs the output is a folder (one heatmap per input and "
                         f"summary.csv)")
    if a.label and Path(a.label).name.lower().endswith(IMAGE_SUFFIXES):
        raise ValueError(f"--label {a.label}: with many inputs give a folder (one label map per input)")
    ck = load_checkpoint(a.model)
    # the cohort's request (input: the inputs as given); each item is scored as it for its own volume (request_for)
    request = ScoreRequest(input=" ".join(given), output=str(out), model=a.model, predictors=a.predictor,
                           options=opts, device=a.device)
    names = request.checked(ck)  # once for the cohort
    labels = None
    if threshold:
        heat = [n for n in names if n != RECONSTRUCTION]
        if threshold[0] == "auto":  # a signed map: per-tail thresholds, where the checkpoint has them
            opts, note = tails_or_fallback(ck, heat, opts)
            if note:
                print(note, file=sys.stderr)
                request = replace(request, options=opts)
        calibrated = {n: auto_threshold(ck, n, opts) for n in heat} if threshold[0] == "auto" else {}
        from .calibration import region_peaks
        from .regions import min_region_mm3
        labels = {"threshold": a.threshold, "calibrated": calibrated, "folder": Path(a.label),
                  "min_region_mm3": min_region_mm3(ck) if getattr(a, "min_region_mm3", None) is None
                  else float(a.min_region_mm3),
                  "region_peaks": region_peaks(ck, heat, opts, threshold, keep_all=getattr(a, "all_regions", False)),
                  "signed": [n for n in heat if is_two_tailed(n, opts)]}
    inputs = {str(Path(x).resolve()) for it in items for x in (it.volume, it.mask) if x}
    for it in items:
        for p in outputs_for(it, names, out).values():
            if str(p.resolve()) in inputs:
                raise ValueError(f"output {p} would overwrite an input; choose another -o folder")
    rank, world, local = dist_info()
    device = pick_device(a.device)
    if world > 1:
        import torch.distributed as dist
        if device.startswith("cuda"):
            device = f"cuda:{local}"
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    t = time.perf_counter()
    try:
        rows = score_many(ck, items, names, out, replace(request, device=device), workers=getattr(a, "workers", 2),
                          labels=labels)
        all_rows = gather_rows(rows)
    finally:
        if world > 1:
            import torch.distributed as dist
            dist.destroy_process_group()
    if all_rows is None:
        return 0 if all(r["status"] == "ok" for r in rows) else 1
    s = write_summary(all_rows, out / "summary.csv", [it.volume for it in items])
    dt = time.perf_counter() - t
    bad = [r for r in all_rows if r["status"] != "ok"]
    print(f"scored {len(all_rows) - len(bad)} of {len(items)} volumes in {dt:.1f} s "
          f"({60 * len(items) / dt:.1f} volumes/min, {world} rank(s)); wrote {s}", file=sys.stderr)
    if bad:
        print(f"vaeanomaly: error: {len(bad)} input(s) failed (see the 'message' column of {s})", file=sys.stderr)
    return 1 if bad else 0
