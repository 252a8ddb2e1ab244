"""A long-lived scoring process for an application (the Slicer module, the web viewer): it imports torch
once, keeps the checkpoints it loaded, and runs `vaeanomaly score` requests one after another.

    python -m vaeanomaly.score_worker          (started by VAEAnomalyLib.worker; not meant for users)

Protocol, one JSON object per line (UTF-8):
  stdin   {"id": N, "request": {"input": VOLUME, "output": FOLDER, "mask": ..., "model": ..., "predictors": ...,
                               "options": {PredictorOptions.to_dict()}, "report": ..., "device": ...,
                               "progress": "lines"}}       a scoring.ScoreRequest as JSON (to_json)
          {"quit": true}                                          (or the end of stdin: the parent is gone)
  stdout  {"event": "ready", "pid": P}                            once the imports are done
          {"id": N, "started": true}                              the request was read
          {"id": N, "line": TEXT}      what `vaeanomaly score` prints on stderr ("PROGRESS ..." lines included)
          {"id": N, "maps": true, "mask_source": M}               the maps are written (the verdict follows);
                                   M: where the brain mask came from (scoring.Heatmaps.mask_source: 'given',
                                   'automatic' or 'extracted (HD-BET)'), the mask itself in request.mask_out
          {"id": N, "done": RC, "pid": P, "model_cached": BOOL, "seconds": S, "mask_source": M, "error": E}
                                   RC as the command line's exit code; E: the failure's exception class name
                                   (e.g. 'NotSkullStrippedError': a head the worker cannot extract), or null

A request is checked and computed by `vaeanomaly score`'s own code (`scoring.ScoreRequest.checked`,
`scoring.run`: the maps and, with a report, the verdict of `scoring.score_prepared`); the difference is where the
time goes: the checkpoint comes from a cache (keyed by its path, inode, size and times, so a rewritten file is
loaded again), and the maps are written as *uncompressed* NRRD (`<FOLDER>/<map>.nrrd`) for the parent to read
back at once. The process never imports slicer or vtk. Nothing here unpickles anything: requests are JSON,
checkpoints safetensors.
"""
from __future__ import annotations

import io
import json
import os
import sys
import time
import warnings
from collections import OrderedDict
from pathlib import Path

MAX_MODELS = 3  # checkpoints kept loaded (least recently used dropped first)


class ModelCache:
    """Checkpoints by file version (resolved path, inode, size, modification and change times): a file
    replaced or rewritten on disk is read again, also where times have a coarse resolution."""

    def __init__(self, size: int = MAX_MODELS):
        self.size, self.items = size, OrderedDict()

    def get(self, name_or_path):
        """(Checkpoint, whether it came from the cache)."""
        from .checkpoint import load_checkpoint, resolve_model
        path = resolve_model(name_or_path)
        try:
            st = path.stat()
            key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        except OSError:  # load_checkpoint says what is wrong with it
            return load_checkpoint(path), False
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key], True
        ck = load_checkpoint(path)
        self.items[key] = ck
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return ck, False


class _Lines(io.TextIOBase):
    """A text stream that sends each complete line to `emit` (the request's stderr)."""

    def __init__(self, emit):
        self.emit, self.buf = emit, ""

    def writable(self):
        return True

    def write(self, s):
        self.buf += s
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            self.emit(line)
        return len(s)

    def flush(self):
        pass

    def close_line(self):
        if self.buf:
            self.emit(self.buf)
            self.buf = ""


def _write_uncompressed(img, path: Path) -> None:
    """Whole or not at all (a temporary file renamed), without compression: the parent reads it next."""
    import SimpleITK as sitk

    from .io import atomic_path
    with atomic_path(path) as tmp:
        sitk.WriteImage(img, str(tmp), False)


def score(request: dict, models: ModelCache, maps_written=lambda mask_source: None) -> tuple[bool, str]:
    """One scoring request (a scoring.ScoreRequest as JSON) for a single volume; maps into its output folder as
    <name>.nrrd. Returns (whether the checkpoint came from the cache, where the brain mask came from:
    scoring.Heatmaps.mask_source). maps_written(mask_source) once the maps are written. Raises what
    `vaeanomaly score` raises."""
    from .scoring import ScoreRequest, check_options, is_image_path, run
    from .volume import read_image
    r = ScoreRequest.from_json(request)
    if not r.output:
        raise ValueError("the scoring worker's request needs 'output': the folder it writes the maps into")
    out = Path(r.output)
    if is_image_path(out) or (out.exists() and not out.is_dir()):
        raise ValueError(f"the scoring worker writes into a folder; output {out} is not one")
    check_options(r.options)                                # before the checkpoint is loaded
    ck, cached = models.get(r.model)
    names = r.checked(ck)
    img = read_image(r.input)
    mask = read_image(r.mask, "mask") if r.mask else None

    def write(maps):  # as soon as they exist: the parent shows the heatmap while the verdict is computed
        out.mkdir(parents=True, exist_ok=True)
        for name, m in maps.items():
            _write_uncompressed(m, out / f"{name}.nrrd")
            print(f"wrote {out / f'{name}.nrrd'}", file=sys.stderr)
        maps_written(getattr(maps, "mask_source", ""))

    heat = run(r, ck, img, mask, names, on_maps=write)  # exactly `vaeanomaly score`'s computation
    return cached, heat.mask_source


def exit_code(err: BaseException) -> tuple[int, str]:
    """(exit code, the one line `vaeanomaly score` prints) for an error: the command line's own mapping."""
    from .cli import error_exit
    return error_exit(err, debug_hint=False)


def serve(requests, send) -> None:
    """Run requests (an iterable of JSON lines) until {"quit": true} or their end."""
    from . import cli
    models = ModelCache()
    for raw in requests:
        raw = raw.strip()
        if not raw:
            continue
        try:
            req = json.loads(raw)
        except ValueError:
            print(f"vaeanomaly worker: ignored a request that is not JSON: {raw[:80]}", file=sys.stderr)
            continue
        if not isinstance(req, dict) or req.get("quit"):
            if isinstance(req, dict):
                return
            continue
        job = req.get("id")
        send({"id": job, "started": True})
        lines = _Lines(lambda text, job=job: send({"id": job, "line": text}))
        t0, cached, source, error, old_err = time.monotonic(), None, None, None, sys.stderr
        old_warn = warnings.showwarning
        sys.stderr, warnings.showwarning = lines, cli.show_warning
        try:
            cached, source = score(req.get("request"), models,
                                   lambda src, job=job: send({"id": job, "maps": True, "mask_source": src}))
            rc = 0
        except Exception as err:  # noqa: BLE001  (every failure ends the request with a message, not the worker)
            rc, text = exit_code(err)
            error = type(err).__name__
            print(text, file=sys.stderr)
        finally:
            lines.close_line()
            sys.stderr, warnings.showwarning = old_err, old_warn
        send({"id": job, "done": rc, "pid": os.getpid(), "model_cached": cached,
              "seconds": round(time.monotonic() - t0, 4), "mask_source": source, "error": error})


def main() -> int:
    # the protocol keeps the real stdout; anything printed (by us or a library, Python or C) goes to stderr
    proto = open(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(obj):
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    import torch  # noqa: F401  (the expensive imports, once, before the first request)

    from . import cli, verdict, volume  # noqa: F401
    send({"event": "ready", "pid": os.getpid()})
    requests = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8")
    try:
        serve(requests, send)
    except (BrokenPipeError, KeyboardInterrupt):  # the parent went away
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
