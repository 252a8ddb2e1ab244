"""The two machine facts the benchmarks print, on every platform (each never raises): the 1-minute load average
(POSIX os.getloadavg; 0.0 where the platform has none, e.g. Windows) and this process's peak resident memory in
KiB (POSIX resource.getrusage; psutil's peak working set on Windows where installed; else 0.0)."""
from __future__ import annotations

import os
import sys


def load_average() -> float:
    """The 1-minute load average, or 0.0 where the platform does not say (Windows)."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0.0


def peak_rss_kb() -> float:
    """Peak resident memory of this process in KiB (ru_maxrss: KiB on Linux, bytes on macOS), or 0.0 if unknown."""
    try:
        import resource  # POSIX only
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 1024 if sys.platform == "darwin" else float(peak)
    except ImportError:
        try:
            import psutil
            return psutil.Process().memory_info().peak_wset / 1024  # Windows
        except Exception:  # noqa: BLE001
            return 0.0
