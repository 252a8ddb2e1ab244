"""A one-page HTML report a person reads: the verdict and its warnings, the model, the threshold and where it came
from, the findings table, and for each of the largest findings axial / coronal / sagittal thumbnails through its
centroid with the heatmap overlay and a legend. Self-contained (images inline as PNG data), prints to one PDF.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk

DISCLAIMER = ("VAEAnomaly is an unsupervised research tool: it marks where a scan differs from the healthy brains its "
              "model learned. It is not a diagnosis and has not been cleared for clinical use; every finding needs "
              "review by a qualified reader.")
MAX_THUMBNAILS = 3


# an inferno-like colour ramp for the overlay (low -> high), the same stops as the legend's CSS gradient
RAMP = ((0.0, (40, 11, 84)), (0.25, (101, 21, 110)), (0.5, (188, 55, 84)), (0.75, (249, 142, 9)),
        (1.0, (252, 255, 164)))
THUMB_HEIGHT = 200  # pixels per cut


def _ramp(t: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 colours of t in [0, 1] along RAMP."""
    pos = [p for p, _ in RAMP]
    return np.stack([np.interp(t, pos, [c[ch] for _, c in RAMP]) for ch in range(3)], -1)


def _cut_rgb(s: np.ndarray, m: np.ndarray, threshold: float, vmax: float, aspect: float) -> np.ndarray:
    """One cut as an RGB array THUMB_HEIGHT high: the scan in grey (1st-99.5th percentile window), the heatmap
    above the threshold blended over it (70 %); rows stretched by `aspect` (row spacing over column spacing)."""
    lo, hi = np.percentile(s, (1, 99.5)) if s.size else (0.0, 1.0)
    grey = np.clip((s - lo) / max(hi - lo, 1e-6), 0, 1)[..., None] * np.ones(3) * 255
    t = np.clip((m - threshold) / max(vmax - threshold, 1e-6), 0, 1)
    over = (m > threshold)[..., None]
    rgb = np.where(over, 0.3 * grey + 0.7 * _ramp(t), grey)
    rows, cols = THUMB_HEIGHT, max(1, round(rgb.shape[1] * THUMB_HEIGHT / (rgb.shape[0] * aspect)))
    ri = np.minimum((np.arange(rows) + 0.5) * rgb.shape[0] / rows, rgb.shape[0] - 1).astype(int)  # nearest voxel
    ci = np.minimum((np.arange(cols) + 0.5) * rgb.shape[1] / cols, rgb.shape[1] - 1).astype(int)
    return rgb[ri][:, ci].astype(np.uint8)


def _png(rgb: np.ndarray) -> str:
    """An RGB array as base64 PNG (written by SimpleITK, so the report needs no plotting library)."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "t.png"
        sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(rgb), isVector=True), str(f))
        return base64.b64encode(f.read_bytes()).decode("ascii")


def _lps(img: sitk.Image) -> np.ndarray:
    """The voxels as (z, y, x) of the volume reoriented to LPS, so axial/coronal/sagittal cuts are array cuts."""
    return sitk.GetArrayFromImage(sitk.DICOMOrient(img, "LPS"))


def colour_range(heat: sitk.Image, threshold: float) -> tuple[float, float]:
    """(low, high) of the overlay's colours: the threshold to the heatmap's 99.9th percentile above 0."""
    h = sitk.GetArrayViewFromImage(heat)
    vmax = float(np.percentile(h[h > 0], 99.9)) if (h > 0).any() else 1.0
    return threshold, max(vmax, threshold * 1.01, threshold + 1e-6)


def thumbnails(image: sitk.Image, heat: sitk.Image, threshold: float, centroid_lps) -> str:
    """One PNG (base64): axial, coronal, sagittal cuts of the scan through centroid_lps (mm), side by side, the
    heatmap above the threshold overlaid in the colours of colour_range (the report's legend)."""
    scan, h = _lps(image), _lps(heat)
    o = sitk.DICOMOrient(image, "LPS")
    i, j, k = o.TransformPhysicalPointToIndex([float(c) for c in centroid_lps])
    k, j, i = (int(np.clip(v, 0, n - 1)) for v, n in zip((k, j, i), scan.shape))
    sx, sy, sz = o.GetSpacing()
    cuts = [(scan[k], h[k], sy / sx), (scan[:, j][::-1], h[:, j][::-1], sz / sx),
            (scan[:, :, i][::-1], h[:, :, i][::-1], sz / sy)]
    _, vmax = colour_range(heat, threshold)
    parts = [_cut_rgb(s, m, threshold, vmax, aspect) for s, m, aspect in cuts]
    gap = np.full((THUMB_HEIGHT, 6, 3), 255, np.uint8)
    return _png(np.concatenate([x for p in parts for x in (p, gap)][:-1], axis=1))


def legend(heat: sitk.Image, threshold: float) -> str:
    """The overlay's colour bar as HTML (a CSS gradient of RAMP) with its two ends."""
    lo, hi = colour_range(heat, threshold)
    stops = ", ".join(f"rgb{c} {100 * p:g}%" for p, c in RAMP)
    return (f'<div class="legend"><span>{lo:.3g}</span><span class="bar" style="background:linear-gradient(to right, '
            f'{stops})"></span><span>{hi:.3g}</span> anomaly score above the threshold (axial, coronal, sagittal '
            f'through each finding\'s centroid)</div>')


def _row(f: dict, direction: bool = False) -> str:
    z = "" if f["mean_intensity_z"] is None else f"{f['mean_intensity_z']:.2f}"
    c = ", ".join(f"{v:.1f}" for v in f["centroid_lps_mm"])
    d = f"<td>{html.escape(f.get('direction') or '')}</td>" if direction else ""
    return (f"<tr><td>{html.escape(f['id'])}</td>{d}<td>{f['volume_ml']:.2f}</td><td>{f['peak']:.3g}</td>"
            f"<td>{f['mean']:.3g}</td><td>{c}</td><td>{f['slice_first']}–{f['slice_last']}</td><td>{z}</td></tr>")


def render(image: sitk.Image, heat: sitk.Image, threshold: float, threshold_source: str, found: list[dict],
           predictor: str, model_line: str, verdict: Optional[dict] = None, source: str = "") -> str:
    """The report as one HTML string. A signed map (threshold a threshold.Tails): the findings carry their direction
    (a column), the overlay shows |value| above the lower of the two thresholds."""
    from .threshold import Tails
    e = html.escape
    shown = f"{threshold:.4g}"
    if isinstance(threshold, Tails):
        heat, threshold = sitk.Abs(heat), min(threshold.bright, threshold.dark)
    direction = any(f.get("direction") for f in found)
    rows = "".join(_row(f, direction) for f in found) or \
        '<tr><td colspan="7">No region above the threshold.</td></tr>'
    thumbs = "".join(
        f'<figure><img class="thumb" alt="finding {e(f["id"])}" src="data:image/png;base64,'
        f'{thumbnails(image, heat, threshold, f["centroid_lps_mm"])}"><figcaption>{e(f["id"])}: '
        f'{f["volume_ml"]:.2f} ml, peak {f["peak"]:.3g}</figcaption></figure>' for f in found[:MAX_THUMBNAILS])
    thumbs = legend(heat, threshold) + thumbs if found else thumbs
    if verdict:
        ok = verdict.get("in_distribution")
        head = ("In distribution: the scan looks like the healthy scans the model was calibrated on" if ok else
                "Out of distribution: do not trust this heatmap")
        warn = "".join(f"<li>{e(w)}</li>" for w in verdict.get("warnings", []))
        verdict_html = (f'<p class="{"ok" if ok else "bad"}"><b>{e(head)}</b> (fit {verdict.get("fit")}, '
                        f'flagged {verdict.get("flagged_percent")}% of the brain)</p>' + (f"<ul>{warn}</ul>" if warn else ""))
    else:
        verdict_html = "<p>No out-of-distribution check was run for this scan.</p>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>VAEAnomaly report</title>
<style>
body{{font-family:sans-serif;font-size:11pt;margin:1.5em;max-width:60em}} h1{{font-size:16pt;margin:0}}
table{{border-collapse:collapse;margin:.5em 0}} td,th{{border:1px solid #999;padding:2px 6px;text-align:right}}
th{{background:#eee}} .ok{{color:#075}} .bad{{color:#a00}} .note{{border:1px solid #a00;padding:.4em;color:#600}}
figure{{display:inline-block;margin:.3em}} img.thumb{{width:27em}} @page{{size:A4;margin:12mm}}
.legend{{margin:.5em 0;font-size:9pt}} .legend .bar{{display:inline-block;width:12em;height:.8em;margin:0 .4em;
vertical-align:middle;-webkit-print-color-adjust:exact;print-color-adjust:exact}}
</style></head><body>
<h1>VAEAnomaly report</h1>
<p>{e(source)}</p>
<p class="note">{e(DISCLAIMER)}</p>
<h2>Verdict</h2>{verdict_html}
<h2>Model and threshold</h2>
<p>Model: {e(model_line)}<br>Map: {e(predictor)}; threshold {e(shown)} ({e(threshold_source)}).</p>
<h2>Findings</h2>
<p>Regions above the threshold, largest score mass first. Coordinates: LPS mm (DICOM/ITK; Slicer shows RAS: negate
the first two).</p>
<table><tr><th>id</th>{"<th>direction</th>" if direction else ""}<th>volume (ml)</th><th>peak</th><th>mean</th>
<th>centroid (LPS mm)</th><th>slices</th>
<th>mean intensity (z)</th></tr>{rows}</table>
{thumbs}
</body></html>
"""


def write(path, *args, **kwargs) -> Path:
    """render() to `path`, written whole or not at all."""
    from .io import atomic_path
    p = Path(path)
    if p.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"--report-html {p}: give an .html file")
    text = render(*args, **kwargs)
    with atomic_path(p) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return p
