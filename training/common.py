"""Shared by the training scripts: import path, caches, devices, run records."""
from __future__ import annotations

import platform
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "VAEAnomaly"))  # the core library, also where it is not pip-installed


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0]).resolve().relative_to(ROOT))
                                                         if Path(sys.argv[0]).resolve().is_relative_to(ROOT)
                                                         else sys.argv[0]] + sys.argv[1:])


def code_version() -> str:
    """The git commit the scripts run from ('+dirty' with uncommitted changes), or 'unknown'."""
    import subprocess
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("+dirty" if dirty else "")) if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def hardware(device: str) -> str:
    import torch
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def load_or_build_cache(cache: str | None, data: str | None, lesion: bool, pattern: str | None = None,
                        image_size: int = 64):
    """A slice cache from --cache, or built (and saved beside the data) from a cohort folder."""
    from vaeanomaly.data import HCP_GLOB, SliceCache, brats_items, build_cache, healthy_items
    from vaeanomaly.preprocessing import Preprocessing
    if cache and Path(cache).exists():
        return SliceCache.load(cache)
    if not data:
        raise SystemExit("give --cache FILE.npz (existing) or --data FOLDER")
    from tqdm import tqdm
    items = brats_items(data) if lesion else healthy_items(data, pattern or HCP_GLOB)
    bar = tqdm(total=len(items), desc=f"building slice cache ({image_size}x{image_size})", file=sys.stderr)
    c = build_cache(items, Preprocessing(image_size=image_size), min_brain_fraction=0.0 if lesion else 0.05,
                    progress=lambda f: bar.update(round(f * len(items)) - bar.n))
    bar.close()
    if cache:
        c.save(cache)
    return c
