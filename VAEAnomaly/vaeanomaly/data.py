"""Cohorts on disk and the slice cache.

Healthy cohort: a folder of T2 volumes in HCP layout (<subject>/T1w/T2w_acpc_dc_restore_brain.nii.gz)
or any glob; a brain mask beside each (brainmask_fs.nii.gz, or <case>_brainmask.nii.gz) is used
when present. Lesion cohort: BraTS layout (<case>/<case>_t2.nii.gz, <case>/<case>_seg.nii.gz,
label > 0 = lesion). Both go through the one preprocessing in volume.py into a slice cache
(.npz: slices float16, brain mask, lesion labels, case index), so epochs never re-read NIfTI and
GPU machines without SimpleITK can train and evaluate from it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

HCP_GLOB = "*/T1w/T2w_acpc_dc_restore_brain.nii.gz"
MASK_NAMES = ("brainmask_fs.nii.gz", "brain_mask.nii.gz")


def find_healthy(folder, pattern: str = HCP_GLOB) -> list[Path]:
    paths = sorted(Path(folder).glob(pattern))
    if not paths:
        raise FileNotFoundError(f"no volumes match '{pattern}' under '{folder}'")
    return paths


def find_brats(folder) -> list[tuple[str, Path, Path]]:
    """[(case, t2 path, seg path)] for every <case>/<case>_t2.nii.gz with its _seg."""
    cases = []
    for d in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
        t2, seg = d / f"{d.name}_t2.nii.gz", d / f"{d.name}_seg.nii.gz"
        if t2.exists() and seg.exists():
            cases.append((d.name, t2, seg))
    if not cases:
        raise FileNotFoundError(f"no BraTS cases (<case>/<case>_t2.nii.gz + _seg.nii.gz) under '{folder}'")
    return cases


def mask_beside(t2: Path) -> Optional[Path]:
    for name in MASK_NAMES + (t2.name.replace("_t2.nii.gz", "_brainmask.nii.gz"),):
        p = t2.parent / name
        if p.exists() and p != t2:
            return p
    return None


@dataclass
class SliceCache:
    slices: np.ndarray   # (N, S, S) float16
    brain: np.ndarray    # (N, S, S) bool
    label: np.ndarray    # (N, S, S) bool (all False for healthy data)
    case: np.ndarray     # (N,) int: index into names
    names: list

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, slices=self.slices, brain=self.brain, label=self.label, case=self.case,
                            names=np.array(self.names))
        return path

    @classmethod
    def load(cls, path) -> "SliceCache":
        with np.load(path, allow_pickle=False) as z:
            return cls(z["slices"], z["brain"], z["label"], z["case"], [str(n) for n in z["names"]])

    def cases(self):
        """Yield (name, slices float32, brain, label) per case, in order."""
        for i, n in enumerate(self.names):
            sel = self.case == i
            if not sel.any():  # a case left out of a subset
                continue
            yield n, self.slices[sel].astype(np.float32), self.brain[sel], self.label[sel]

    def cases_in(self, case_ids):
        """Like cases(), restricted to the given case indices."""
        return self.subset(case_ids).cases()

    def subset(self, case_ids) -> "SliceCache":
        sel = np.isin(self.case, list(case_ids))
        return SliceCache(self.slices[sel], self.brain[sel], self.label[sel], self.case[sel], self.names)


def build_cache(items, prep=None, min_brain_fraction: float = 0.0, progress=None) -> SliceCache:
    """items: [(name, image path, mask path or None, seg path or None)] -> SliceCache.
    Slices whose brain covers less than min_brain_fraction of the slice are dropped."""
    from .volume import label_on_grid, prepare, read_image
    out = {k: [] for k in ("slices", "brain", "label", "case")}
    names = []
    for i, (name, img_path, mask_path, seg_path) in enumerate(items):
        img = read_image(img_path)
        mask = read_image(mask_path, "mask") if mask_path else None
        p = prepare(img, mask, prep, what=str(img_path))
        label = label_on_grid(read_image(seg_path, "segmentation"), p.grid) if seg_path else np.zeros_like(p.brain)
        keep = p.brain.mean((1, 2)) > min_brain_fraction
        out["slices"].append(p.slices[keep].astype(np.float16))
        out["brain"].append(p.brain[keep])
        out["label"].append(label[keep] & p.brain[keep])
        out["case"].append(np.full(int(keep.sum()), i, np.int32))
        names.append(name)
        if progress:
            progress((i + 1) / len(items))
    return SliceCache(*(np.concatenate(out[k]) for k in ("slices", "brain", "label", "case")), names)


def healthy_items(folder, pattern: str = HCP_GLOB):
    return [(str(p.relative_to(folder)), p, mask_beside(p), None) for p in find_healthy(folder, pattern)]


def brats_items(folder):
    return [(c, t2, mask_beside(t2), seg) for c, t2, seg in find_brats(folder)]


def slice_spacings(folder, names) -> dict:
    """{case name: slice spacing in mm} read from the image headers of a cohort folder (training/make_data.py's
    layouts: BraTS-style `<name>/<name>_t2.nii.gz`, or HCP-style names that are the image's own relative path).
    The spacing is the one along the axis closest to inferior-superior, as the model grid slices the volume."""
    import SimpleITK as sitk
    folder, out = Path(folder), {}
    for n in names:
        p = folder / n if (folder / n).is_file() else folder / n / f"{n}_t2.nii.gz"
        if not p.exists():
            continue
        r = sitk.ImageFileReader()
        r.SetFileName(str(p))
        r.ReadImageInformation()
        d = np.array(r.GetDirection()).reshape(3, 3)
        out[n] = float(r.GetSpacing()[int(np.argmax(np.abs(d[2])))])
    return out
