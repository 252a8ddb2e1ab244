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


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _lps(img: sitk.Image) -> np.ndarray:
    """The voxels as (z, y, x) of the volume reoriented to LPS, so axial/coronal/sagittal cuts are array cuts."""
    return sitk.GetArrayFromImage(sitk.DICOMOrient(img, "LPS"))


def thumbnails(image: sitk.Image, heat: sitk.Image, threshold: float, centroid_lps) -> str:
    """One PNG (base64): axial, coronal, sagittal cuts of the scan through centroid_lps (mm), the heatmap above the
    threshold overlaid, with a colour bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    scan, h = _lps(image), _lps(heat)
    o = sitk.DICOMOrient(image, "LPS")
    i, j, k = o.TransformPhysicalPointToIndex([float(c) for c in centroid_lps])
    k, j, i = (int(np.clip(v, 0, n - 1)) for v, n in zip((k, j, i), scan.shape))
    sx, sy, sz = o.GetSpacing()
    cuts = [("axial", scan[k], h[k], sy / sx), ("coronal", scan[:, j][::-1], h[:, j][::-1], sz / sx),
            ("sagittal", scan[:, :, i][::-1], h[:, :, i][::-1], sz / sy)]
    vmax = float(np.percentile(h[h > 0], 99.9)) if (h > 0).any() else 1.0
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
    im = None
    for ax, (name, s, m, aspect) in zip(axes, cuts):
        ax.imshow(s, cmap="gray", aspect=aspect)
        im = ax.imshow(np.ma.masked_less_equal(m, threshold), cmap="inferno", vmin=threshold, vmax=max(vmax, threshold * 1.01),
                       alpha=0.7, aspect=aspect)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.colorbar(im, ax=axes, fraction=0.02, label="anomaly score (above threshold)")
    out = _png(fig)
    plt.close(fig)
    return out


def _row(f: dict) -> str:
    z = "" if f["mean_intensity_z"] is None else f"{f['mean_intensity_z']:.2f}"
    c = ", ".join(f"{v:.1f}" for v in f["centroid_lps_mm"])
    return (f"<tr><td>{html.escape(f['id'])}</td><td>{f['volume_ml']:.2f}</td><td>{f['peak']:.3g}</td>"
            f"<td>{f['mean']:.3g}</td><td>{c}</td><td>{f['slice_first']}–{f['slice_last']}</td><td>{z}</td></tr>")


def render(image: sitk.Image, heat: sitk.Image, threshold: float, threshold_source: str, found: list[dict],
           predictor: str, model_line: str, verdict: Optional[dict] = None, source: str = "") -> str:
    """The report as one HTML string."""
    e = html.escape
    rows = "".join(_row(f) for f in found) or '<tr><td colspan="7">No region above the threshold.</td></tr>'
    thumbs = "".join(
        f'<figure><img class="thumb" alt="finding {e(f["id"])}" src="data:image/png;base64,'
        f'{thumbnails(image, heat, threshold, f["centroid_lps_mm"])}"><figcaption>{e(f["id"])}: '
        f'{f["volume_ml"]:.2f} ml, peak {f["peak"]:.3g}</figcaption></figure>' for f in found[:MAX_THUMBNAILS])
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
</style></head><body>
<h1>VAEAnomaly report</h1>
<p>{e(source)}</p>
<p class="note">{e(DISCLAIMER)}</p>
<h2>Verdict</h2>{verdict_html}
<h2>Model and threshold</h2>
<p>Model: {e(model_line)}<br>Map: {e(predictor)}; threshold {threshold:.4g} ({e(threshold_source)}).</p>
<h2>Findings</h2>
<p>Regions above the threshold, largest score mass first. Coordinates: LPS mm (DICOM/ITK; Slicer shows RAS: negate
the first two).</p>
<table><tr><th>id</th><th>volume (ml)</th><th>peak</th><th>mean</th><th>centroid (LPS mm)</th><th>slices</th>
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
