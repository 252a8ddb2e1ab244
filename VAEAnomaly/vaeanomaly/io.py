"""Safe writes: outputs never overwrite an input, and a file is either written whole or not at all.

Every file the library writes for a user (heatmaps, label maps, checkpoints) goes through
`write_image` / `atomic_path`: the data go to a temporary file in the destination folder (created
if missing), which is renamed onto the destination only once complete. `check_outputs` refuses,
before any computation, an output path that resolves to an input (volume, mask, checkpoint), also
through symbolic or hard links, or two outputs that are the same file.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Optional


class OutputError(ValueError):
    """An output path that cannot or must not be written, with a message that says what to do."""


def _same(a: Path, b: Path) -> bool:
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists() and os.path.samefile(a, b):
            return True
    except OSError:
        pass
    return a.expanduser().resolve() == b.expanduser().resolve()


def _inside(path: Path, folder: Path) -> bool:
    try:
        return Path(folder).is_dir() and Path(path).expanduser().resolve().is_relative_to(Path(folder).resolve())
    except OSError:
        return False


def check_outputs(outputs: dict, inputs: dict) -> None:
    """outputs/inputs: {description: path or None}. Raises OutputError if an output is an input
    (or lies inside an input DICOM folder), if two outputs coincide, or if an output's folder cannot
    be created. Nothing is written."""
    outs = {k: Path(v) for k, v in outputs.items() if v is not None}
    ins = {k: Path(v) for k, v in inputs.items() if v is not None}
    for ko, o in outs.items():
        for ki, i in ins.items():
            if _same(o, i) or _inside(o, i):
                raise OutputError(f"{ko} '{o}' is the {ki} '{i}': writing it would destroy the {ki}. "
                                  f"Choose another output path.")
        if o.is_dir() and ko.endswith("file"):
            raise OutputError(f"{ko} '{o}' is an existing folder; give a file name such as heat.nii.gz")
    keys = list(outs)
    for a in range(len(keys)):
        for b in range(a + 1, len(keys)):
            if _same(outs[keys[a]], outs[keys[b]]):
                raise OutputError(f"{keys[a]} and {keys[b]} are the same file '{outs[keys[a]]}'; "
                                  f"give them different paths")
    for ko, o in outs.items():
        parent = o.expanduser().resolve().parent
        existing = next((p for p in [parent, *parent.parents] if p.exists()), None)
        if existing is not None and not existing.is_dir():
            raise OutputError(f"cannot create the folder for {ko} '{o}': '{existing}' is a file")
        if existing is not None and not os.access(existing, os.W_OK):
            raise OutputError(f"cannot write {ko} '{o}': no write permission in '{existing}'")


@contextlib.contextmanager
def atomic_path(path, suffix: Optional[str] = None) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same folder, so the rename is atomic; same file
    extension, so writers pick the same format); rename it onto `path` on success, delete it on
    failure. Missing parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name
    ext = suffix if suffix is not None else next((e for e in (".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".nii",
                                                             ".safetensors", ".json", ".npz")
                                                  if name.lower().endswith(e)), path.suffix)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp" + ext, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files: give the final file the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_image(img, path) -> Path:
    """Write a SimpleITK image atomically (temporary file + rename), creating missing folders.
    Formats that write a separate data file (.nhdr, .mhd) are written directly, after the checks."""
    import SimpleITK as sitk
    path = Path(path)
    if path.name.lower().endswith((".nhdr", ".mhd")):  # header + detached data file: no single rename
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(img, str(path), True)
        return path
    try:
        with atomic_path(path) as tmp:
            sitk.WriteImage(img, str(tmp), True)
    except RuntimeError as err:
        raise OutputError(f"cannot write '{path}': {str(err).strip().splitlines()[-1]}") from None
    return path


def temporary_files(folder) -> Iterable[Path]:
    """Left-over temporary files of interrupted writes in a folder (for tests and clean-up)."""
    return [p for p in Path(folder).glob(".*.tmp*")]
