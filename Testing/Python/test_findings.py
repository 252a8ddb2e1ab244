"""Findings (issue 18): ranked regions above the threshold with volume, scores, LPS centroid, box and slices."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk

from vaeanomaly import findings


def _heat(direction=None):
    arr = np.zeros((20, 30, 40), np.float32)         # (k, j, i)
    arr[4:8, 10:14, 5:9] = 3.0                       # 64 voxels, strong
    arr[12:16, 20:26, 20:30] = 1.5                   # 240 voxels, weaker but larger: more score mass
    arr[18, 2, 2] = 9.0                              # one voxel: dropped by the minimum size
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.0, 2.0, 3.0))                  # 6 mm3 voxels
    img.SetOrigin((10.0, -20.0, 5.0))
    if direction is not None:
        img.SetDirection(direction)
    return img, arr


def test_regions_ranked_with_volume_centroid_box_and_slices():
    heat, arr = _heat()
    scan = sitk.GetImageFromArray(np.where(arr > 0, 5.0, 1.0).astype(np.float32))
    scan.CopyInformation(heat)
    found = findings.find(heat, 1.0, scan, None, min_mm3=20)
    assert [f["id"] for f in found] == ["A1", "A2"]
    big, small = found
    assert big["voxels"] == 240 and big["volume_ml"] == pytest.approx(240 * 6 / 1000)
    assert small["voxels"] == 64 and small["peak"] == 3.0 and small["mean"] == pytest.approx(3.0)
    assert big["score_mass"] > small["score_mass"]
    # centroid of the first region: voxel centre (i 6.5, j 11.5, k 5.5) -> origin + index * spacing (identity dir.)
    assert small["centroid_lps_mm"] == pytest.approx([10 + 6.5, -20 + 11.5 * 2, 5 + 5.5 * 3])
    assert small["bbox_min_lps_mm"] == pytest.approx([15.0, 0.0, 17.0])
    assert small["bbox_max_lps_mm"] == pytest.approx([18.0, 6.0, 26.0])
    assert (small["slice_first"], small["slice_last"]) == (4, 7)
    assert small["mean_intensity_z"] > 1  # brighter than the rest of the scan
    assert findings.summary(found) == {"findings": 2, "largest_finding_ml": big["volume_ml"]}


def test_oblique_direction_and_mask():
    d = sitk.VersorTransform((0, 0, 1), np.pi / 2).GetMatrix()  # 90 degrees about z: i -> +y
    heat, arr = _heat(d)
    found = findings.find(heat, 1.0, min_mm3=20)
    small = found[1]
    c = np.array(heat.TransformContinuousIndexToPhysicalPoint((6.5, 11.5, 5.5)))
    assert small["centroid_lps_mm"] == pytest.approx(c.tolist(), abs=0.01)
    mask = sitk.GetImageFromArray((np.arange(20)[:, None, None] < 10).repeat(30, 1).repeat(40, 2).astype(np.uint8))
    mask.CopyInformation(heat)
    assert [f["voxels"] for f in findings.find(heat, 1.0, mask=mask, min_mm3=20)] == [64]


def test_empty_is_valid_and_files_are_whole(tmp_path):
    heat, _ = _heat()
    assert findings.find(heat, 100.0) == []
    p = findings.write(tmp_path / "f.json", [], {"threshold": 100.0})
    assert json.loads(p.read_text(encoding="utf-8")) == {"coordinates": "LPS", "threshold": 100.0, "findings": []}
    found = findings.find(heat, 1.0, min_mm3=20)
    c = findings.write(tmp_path / "f.csv", found)
    rows = list(csv.DictReader(open(c)))
    assert [r["id"] for r in rows] == ["A1", "A2"] and rows[0]["centroid_lps_mm"].count(" ") == 2
    with pytest.raises(ValueError, match=".json or .csv"):
        findings.write(tmp_path / "f.txt", found)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["f.csv", "f.json"]  # no temporary files left


def test_score_writes_findings_and_report_that_match_the_label(tmp_path, capsys):
    """`vaeanomaly score SAMPLE --threshold auto --label L --findings F --report-html R --report V`: the findings
    cover exactly the label's voxels; the report carries the verdict; bad requests fail before any work."""
    from vaeanomaly.checkpoint import sample_data
    from vaeanomaly.cli import main
    sample = str(sample_data())
    base = ["score", sample, "-o", str(tmp_path / "h.nii.gz"), "--progress", "none"]
    assert main(base + ["--findings", str(tmp_path / "f.json")]) == 2
    assert "needs --threshold" in capsys.readouterr().err
    assert main(base + ["--threshold", "auto", "--findings", str(tmp_path / "f.txt")]) == 2
    assert ".json or .csv" in capsys.readouterr().err and not (tmp_path / "h.nii.gz").exists()
    rc = main(base + ["--threshold", "auto", "--label", str(tmp_path / "l.nii.gz"), "--findings", str(tmp_path / "f.json"),
                      "--report-html", str(tmp_path / "r.html"), "--report", str(tmp_path / "v.json")])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads((tmp_path / "f.json").read_text(encoding="utf-8"))
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "l.nii.gz")))
    assert doc["coordinates"] == "LPS" and doc["threshold_source"].startswith("calibrated")
    assert sum(f["voxels"] for f in doc["findings"]) == int(lab.sum()) > 0
    # at the calibrated threshold every kept region reaches the model's region peak, and the outputs say so
    assert doc["region_peak"] is not None and all(f["peak"] >= doc["region_peak"] for f in doc["findings"])
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert f"whose peak reaches {doc['region_peak']:.4g}" in page
    assert "Verdict" in page and ("In distribution" in page or "Out of distribution" in page)
    assert page.count('<img class="thumb"') == min(3, len(doc["findings"]))
