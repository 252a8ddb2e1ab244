"""The one-page report (issue 18): self-contained HTML with the verdict, model, threshold, findings and
thumbnails; rendered and printed to PDF by headless Chromium where it is installed (.ci/run installs it)."""
from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk

from vaeanomaly import findings, report


def _case():
    rng = np.random.default_rng(0)
    scan = rng.normal(100, 5, (30, 40, 40)).astype(np.float32)
    heat = np.zeros_like(scan)
    heat[10:16, 12:20, 12:20] = 2.0
    heat[20:23, 25:30, 25:30] = 1.5
    imgs = []
    for a in (scan, heat):
        im = sitk.GetImageFromArray(a)
        im.SetSpacing((1.5, 1.5, 3.0))
        imgs.append(im)
    return imgs


def _render(tmp_path, found, verdict=None):
    scan, heat = _case()
    return report.write(tmp_path / "r.html", scan, heat, 1.0, "calibrated: 99th percentile of healthy brains",
                        found, "rec-grad", "bvae-l64-b10-v2: β-VAE l=64 β=10", verdict, "case.nii.gz")


def test_report_has_everything_inline(tmp_path):
    scan, heat = _case()
    found = findings.find(heat, 1.0, scan, min_mm3=10)
    verdict = {"in_distribution": False, "fit": 2.3, "flagged_percent": 4.1,
               "warnings": ["the scan is explained much worse than every healthy calibration scan"]}
    text = _render(tmp_path, found, verdict).read_text(encoding="utf-8")
    assert text.count('<img class="thumb"') == 2 and "src=\"http" not in text  # self-contained
    for s in ("Out of distribution", "explained much worse", "bvae-l64-b10-v2", "1 (calibrated", "A1", "A2",
              "not a diagnosis", "LPS"):
        assert s in text, s
    # the thumbnails decode to three cuts side by side, the finding coloured (the overlay), the rest grey
    import base64
    for i, b64 in enumerate(re.findall(r'base64,([^"]+)"', text)):
        f = tmp_path / f"t{i}.png"
        f.write_bytes(base64.b64decode(b64))
        rgb = sitk.GetArrayFromImage(sitk.ReadImage(str(f))).astype(int)
        assert rgb.shape[0] == report.THUMB_HEIGHT and rgb.shape[2] == 3 and rgb.shape[1] > 2 * rgb.shape[0]
        coloured = (np.abs(rgb[..., 0] - rgb[..., 2]) > 40).mean()
        assert 0.005 < coloured < 0.3, coloured
    assert 'class="legend"' in text and "linear-gradient" in text
    empty = _render(tmp_path, []).read_text(encoding="utf-8")
    assert "No region above the threshold" in empty and "No out-of-distribution check" in empty
    with pytest.raises(ValueError, match=".html"):
        report.write(tmp_path / "r.pdf", scan, heat, 1.0, "", [], "rec-grad", "")


def test_report_needs_no_plotting_library(tmp_path):
    """Slicer's Python has no matplotlib: the report (thumbnails included) is written without it."""
    import subprocess
    import sys
    from pathlib import Path
    here = Path(__file__).resolve().parent
    code = ("import sys; sys.modules['matplotlib'] = None; "
            f"sys.path[:0] = [{str(here)!r}, {str(here.parents[1] / 'VAEAnomaly')!r}]; "
            "from test_report import _case; from vaeanomaly import findings, report; scan, heat = _case(); "
            f"report.write({str(tmp_path / 'r.html')!r}, scan, heat, 1.0, 's', findings.find(heat, 1.0, scan, "
            "min_mm3=10), 'rec-grad', 'm')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "r.html").read_text(encoding="utf-8").count('<img class="thumb"') == 2


def _chromium():
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.skipif(_chromium() is None, reason="no Chromium found (apt-get install chromium; .ci/run installs it)")
def test_report_renders_and_prints_in_chromium(tmp_path):
    scan, heat = _case()
    page = _render(tmp_path, findings.find(heat, 1.0, scan, min_mm3=10))
    flags = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
             "--disable-background-networking", "--disable-component-update", f"--user-data-dir={tmp_path / 'p'}"]
    # the DOM after rendering, with each image's decoded width written into it by a probe script added to a copy
    # of the page: both thumbnails decoded (naturalWidth > 0 is what a visible image has)
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", (
        "<script>window.addEventListener('load', () => document.body.setAttribute('data-widths', "
        "[...document.images].map(i => i.naturalWidth).join(',')));</script></body>")), encoding="utf-8")
    dom = subprocess.run(flags + ["--virtual-time-budget=5000", "--dump-dom", probe.as_uri()], capture_output=True,
                         encoding="utf-8", errors="replace", timeout=120).stdout
    assert len(re.findall(r'<img class="thumb"', dom)) == 2 and "A2" in dom
    widths = re.search(r'data-widths="([^"]*)"', dom)
    assert widths and [int(w) > 0 for w in widths.group(1).split(",")] == [True, True], dom[-500:]
    shot = tmp_path / "r.png"
    subprocess.run(flags + ["--window-size=1100,1400", f"--screenshot={shot}", page.as_uri()], capture_output=True,
                   timeout=120)
    png = sitk.ReadImage(str(shot))
    arr = sitk.GetArrayFromImage(png)
    assert arr.std() > 10  # not a blank page: text and thumbnails
    pdf = tmp_path / "r.pdf"
    subprocess.run(flags + ["--no-pdf-header-footer", f"--print-to-pdf={pdf}", page.as_uri()], capture_output=True,
                   timeout=120)
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF") and len(re.findall(rb"/Type\s*/Page[^s]", data)) >= 1
