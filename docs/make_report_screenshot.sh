#!/usr/bin/env bash
# Resources/Report.png, the README's report picture: the report of the README's sample run (bundled sample, default
# model, calibrated threshold), rendered by headless Chromium with the flags Testing/Python/test_report.py uses.
#   bash docs/make_report_screenshot.sh            (needs `bash run.sh setup` and chromium on the PATH)
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
.venv/bin/vaeanomaly score VAEAnomaly/Resources/SampleData/VAEAnomalySample_T2.nrrd -o "$out/heat.nii.gz" \
  --threshold auto --findings "$out/findings.json" --report "$out/verdict.json" --report-html "$out/report.html"
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome)
"$browser" --headless --no-sandbox --disable-gpu --no-first-run --hide-scrollbars --user-data-dir="$out/profile" \
  --window-size=1100,700 --screenshot="$PWD/Resources/Report.png" "file://$out/report.html"
