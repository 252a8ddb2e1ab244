"""The web viewer (`vaeanomaly-web`, VAEAnomalyLib/web) in a real headless Chromium.

The server is the real command line on a free port with the bundled sample; the browser is Debian's
Chromium driven over the DevTools protocol (a small websocket client below). Skipped, with the reason, when
the [web] extra (trame-slicer) is not installed or no Chromium can be found (.ci/run installs both).

WEB_TEST_OUT=folder keeps the screenshots and the measured timings (timings.json) there.
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "VAEAnomaly" / "Resources" / "SampleData" / "VAEAnomalySample_T2.nrrd"
sys.path.insert(0, str(ROOT / "VAEAnomaly"))

from VAEAnomalyLib.web import web_available  # noqa: E402  (stdlib only; trame-slicer is imported in web.app)

WEB_OK, WEB_WHY = web_available()
needs_web = pytest.mark.skipif(not WEB_OK, reason=f"web viewer not installed: {WEB_WHY}")


def find_browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        exe = shutil.which(name)
        if exe:
            return exe
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- a minimal DevTools client
class Chrome:
    """Headless Chromium over the DevTools protocol (websocket-client, from the [web] extra)."""

    def __init__(self, exe: str, width=1400, height=900):
        import websocket
        self.profile = tempfile.mkdtemp(prefix="vaeanomaly-chrome-")
        self.downloads = Path(tempfile.mkdtemp(prefix="vaeanomaly-downloads-"))
        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={self.profile}", "--remote-debugging-port=0", f"--window-size={width},{height}",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text(encoding="utf-8").strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("Chromium did not start")
            time.sleep(0.1)
        port = port_file.read_text(encoding="utf-8").split()[0]
        base = f"http://127.0.0.1:{port}"
        version = json.load(urllib.request.urlopen(f"{base}/json/version", timeout=30))
        self.browser = websocket.create_connection(version["webSocketDebuggerUrl"], timeout=120, suppress_origin=True)
        page = next(t for t in json.load(urllib.request.urlopen(f"{base}/json", timeout=30)) if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=120, suppress_origin=True)
        self._id = 0
        self.call("Browser.setDownloadBehavior", ws=self.browser, behavior="allow",
                  downloadPath=str(self.downloads))
        self.call("Page.enable")
        self.call("DOM.enable")

    def call(self, method, ws=None, **params):
        ws = ws or self.ws
        self._id += 1
        ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(ws.recv())
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def js(self, expr):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def text(self, selector) -> str:
        return self.js(f"(e => e ? e.innerText : '')(document.querySelector({json.dumps(selector)}))") or ""

    def rect(self, selector, scroll=False) -> dict:
        """The element's box in the viewport (scrolled into view first when asked)."""
        if scroll:
            self.js(f"document.querySelector({json.dumps(selector)}).scrollIntoView({{block: 'center'}})")
            time.sleep(0.3)
        r = self.js(f"(e => e ? JSON.stringify(e.getBoundingClientRect()) : null)"
                    f"(document.querySelector({json.dumps(selector)}))")
        assert r, f"no element {selector}"
        return json.loads(r)

    def mouse(self, kind, x, y, buttons=0):
        self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left" if kind != "mouseMoved" or buttons
                  else "none", buttons=buttons, clickCount=1 if kind != "mouseMoved" else 0)

    def click_at(self, x, y):
        self.mouse("mouseMoved", x, y)
        self.mouse("mousePressed", x, y, 1)
        self.mouse("mouseReleased", x, y, 0)

    def click(self, selector):
        r = self.rect(selector, scroll=True)
        self.click_at(r["x"] + r["width"] / 2, r["y"] + r["height"] / 2)

    def drag(self, points):
        (x0, y0), rest = points[0], points[1:]
        self.mouse("mouseMoved", x0, y0)
        self.mouse("mousePressed", x0, y0, 1)
        for x, y in rest:
            time.sleep(0.05)
            self.mouse("mouseMoved", x, y, 1)
        self.mouse("mouseReleased", *rest[-1], 0)

    def screenshot(self) -> np.ndarray:
        from PIL import Image
        png = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))

    def wait(self, what, predicate, timeout):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if isinstance(value, np.ndarray) or value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.25)

    def download(self, name, timeout=60) -> Path:
        path = self.downloads / name
        self.wait(f"download {name}", lambda: path.is_file() and not (self.downloads / (name + ".crdownload")).exists()
                  and path.stat().st_size > 0, timeout)
        return path

    def close(self):
        for ws in (self.ws, self.browser):
            try:
                ws.close()
            except Exception:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)


# ----------------------------------------------------------------------------- helpers on the page
def hot_pixels(img: np.ndarray, rect: dict) -> int:
    """Pixels of the heat colour table (red/orange/yellow: red well above blue) inside a view, left of its
    colour legend (drawn at the right edge). The MRI is grey (R = G = B), so without a heatmap this is 0."""
    x0, y0 = int(rect["x"]) + 2, int(rect["y"]) + 30  # skip the view's border and its icons
    x1, y1 = int(rect["x"] + 0.88 * rect["width"]), int(rect["y"] + rect["height"]) - 30
    v = img[y0:y1, x0:x1].astype(int)
    return int(((v[..., 0] > 120) & (v[..., 0] - v[..., 2] > 60)).sum())


def grey_pixels(img: np.ndarray, rect: dict) -> int:
    x0, y0, x1, y1 = int(rect["x"]), int(rect["y"]), int(rect["x"] + rect["width"]), int(rect["y"] + rect["height"])
    v = img[y0:y1, x0:x1].astype(int)
    return int(((v.max(-1) - v.min(-1) < 12) & (v.mean(-1) > 40)).sum())


def first_view_shown(c: Chrome) -> bool:
    return bool(c.js("(() => { const i = document.querySelector('#views img.image-display-area');"
                     " return !!(i && i.complete && i.naturalWidth > 0); })()"))


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text(encoding="utf-8").split()
        except OSError:
            kids = []
        out += [int(k) for k in kids]
        todo += [int(k) for k in kids]
    return out


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and of its children it has waited for (the finished jobs)."""
    f = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()
    return sum(int(x) for x in f[11:15]) / os.sysconf("SC_CLK_TCK")


def geometry(path):
    import SimpleITK as sitk
    img = sitk.ReadImage(str(path))
    return img, (img.GetSize(), np.array(img.GetSpacing()), np.array(img.GetOrigin()), np.array(img.GetDirection()))


def assert_same_grid(a, b):
    assert a[0] == b[0], f"size {a[0]} != {b[0]}"
    for got, want, what in zip(a[1:], b[1:], ("spacing", "origin", "direction")):
        np.testing.assert_allclose(got, want, atol=1e-4, err_msg=what)


# ----------------------------------------------------------------------------- tests
def test_web_command_is_registered_and_checks_its_arguments():
    """`vaeanomaly-web` (the application's command, `python -m VAEAnomalyLib.web`) runs even without the extra;
    bad arguments stop before serving; a non-local --host warns."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "VAEAnomaly")}
    r = subprocess.run([sys.executable, "-m", "VAEAnomalyLib.web", "--host", "0.0.0.0", "/nonexistent/x.nrrd"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2
    if WEB_OK:
        assert "anyone who can reach this address" in r.stderr
        assert "is not a file" in r.stderr
    else:
        assert "pip install" in r.stderr


@needs_web
def test_upload_checks(tmp_path):
    """Uploads: type and size are checked and the file must read as a 3D scalar volume; a good one becomes
    the input. (The app object on its own scene, no server.)"""
    from VAEAnomalyLib.web.app import VAEAnomalyWebApp
    app = VAEAnomalyWebApp(max_upload_mb=4)
    try:
        def upload(name, content):
            app.on_upload({"name": name, "size": len(content), "type": "", "content": content})
            return app.dialogs.shown[-1][1] if app.dialogs.shown else ""
        assert "is not a NIfTI, NRRD or MHA file" in upload("notes.txt", b"hello")
        assert "limit is 4 MB" in upload("big.nii.gz", b"\0" * (5 * 2**20))
        assert "cannot read" in upload("broken.nii.gz", b"not really a nifti file")
        assert app.params.inputVolume is None
        n = len(app.dialogs.shown)
        upload("/etc/../sample.nrrd", SAMPLE.read_bytes())
        assert len(app.dialogs.shown) == n, app.dialogs.shown[n:]
        assert app.params.inputVolume is not None and app.params.inputVolume.GetName() == "sample"
        assert app.state.input_id == app.params.inputVolume.GetID()
        assert app.state.apply_enabled
    finally:
        app.controller.close()
        app.tmp.cleanup()



@pytest.mark.slow
@needs_web
def test_a_head_scored_in_the_page_shows_the_extracted_brain(tmp_path):
    """A generated head without a mask, scored by the page's controller (the app object on its own scene, no
    server): the brain is extracted in the worker, the page's state lists the new "<name> brain (HD-BET)"
    segmentation and has it as the brain mask, the status says to check it. Skipped without the [brain] extra."""
    import SimpleITK as sitk
    from vaeanomaly import brainextract
    ok, why = brainextract.available()
    if not ok:
        pytest.skip(f"brain extraction not installed: {why}")
    from vaeanomaly.synth import make_varied
    from VAEAnomalyLib.web.app import VAEAnomalyWebApp
    head = make_varied(1_900_001, "tse", "glioma", head=True, step=2, off=("partial",))
    sitk.WriteImage(head.t2, str(tmp_path / "head.nrrd"))
    app = VAEAnomalyWebApp(volumes=[tmp_path / "head.nrrd"])
    try:
        assert app.controller.apply(), (app.controller.status, app.dialogs.shown)
        t0 = time.monotonic()
        while app.controller.poll():
            assert time.monotonic() - t0 < 900, app.controller.status
            time.sleep(0.2)
        app.render()
        seg = app.params.brainMask
        assert seg is not None and seg.IsA("vtkMRMLSegmentationNode") and seg.GetName() == "head brain (HD-BET)"
        assert app.state.mask_id == seg.GetID()
        assert {"title": "head brain (HD-BET)", "value": seg.GetID()} in app.state.masks
        assert "Brain extracted with HD-BET" in app.state.status and app.state.has_heatmap
    finally:
        app.controller.close()
        app.tmp.cleanup()


def stop_server(server) -> None:
    """The web server's whole process group: SIGTERM, then SIGKILL if it does not end within 20 s."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(server.pid, signal.SIGKILL)

@pytest.mark.slow
@needs_web
def test_browser_workflow(tmp_path):
    """The whole workflow in headless Chromium: the sample appears, Apply (--apply) draws the heatmap, the
    threshold slider previews, Create segment, paint on it, export both as NIfTI on the input's grid, a
    crashed job leaves the page usable, a question is answered in the page."""
    exe = find_browser()
    if exe is None:
        pytest.skip("no Chromium found (apt-get install chromium; .ci/run installs it)")
    out = Path(os.environ.get("WEB_TEST_OUT") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "VAEAnomaly")}
    t0 = time.monotonic()
    server = subprocess.Popen([sys.executable, "-m", "VAEAnomalyLib.web", str(SAMPLE), "--port", str(port),
                               "--apply"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                              cwd=str(ROOT), start_new_session=True)
    log = []
    c = None
    try:
        while True:  # the command says when it listens
            line = server.stdout.readline()
            if not line:
                raise AssertionError("the server stopped:\n" + "".join(log[-30:]))
            log.append(line)
            if "ready on http://127.0.0.1:" in line:
                break
        t_ready = time.monotonic() - t0
        import threading
        threading.Thread(target=lambda: [log.append(ln) for ln in server.stdout], daemon=True).start()
        c = Chrome(exe)
        c.call("Page.navigate", url=f"http://127.0.0.1:{port}/")
        c.wait("the first frame of the slice views", lambda: first_view_shown(c), 120)
        t_first = time.monotonic() - t0
        axial = c.rect("#views img.image-display-area")
        first = c.screenshot()
        still_computing = c.text("#status-line").startswith("Computing")
        assert grey_pixels(first, axial) > 5000, "the sample MRI is not drawn in the axial view"
        c.wait("the heatmap", lambda: c.text("#heatmap-name").startswith("Heatmap:") and c.text("#status-line")
               .startswith("Done"), 420)  # generous: CI machines may be busy
        time.sleep(1.5)  # the views' next frames
        t_heat = time.monotonic() - t0
        cpu_heat = cpu_seconds(server.pid)  # server + its finished scoring job, whatever else the machine runs
        shot = c.wait("hot pixels in the axial view", lambda: (lambda im: im if hot_pixels(im, axial) > 300 else None)(
            c.screenshot()), 30)
        from PIL import Image
        Image.fromarray(shot).save(out / "web_heatmap.png")
        hot_before = hot_pixels(shot, axial)
        if still_computing:  # the first frame came before the job's result: no heat colours yet
            assert hot_pixels(first, axial) < 50, "heat-coloured pixels before any heatmap"
        assert c.text("#verdict"), "no out-of-distribution verdict shown"
        assert "Apply" in c.text("#apply-button") or "APPLY" in c.text("#apply-button")
        (out / "timings.json").write_text(json.dumps({"server_ready_s": round(t_ready, 1),
                                                      "first_frame_s": round(t_first, 1),
                                                      "heatmap_s": round(t_heat, 1),
                                                      "server_and_job_cpu_s": round(cpu_heat, 1),
                                                      "load_average": os.getloadavg()}))
        print(f"\nweb viewer: server ready {t_ready:.1f} s, first frame {t_first:.1f} s, heatmap {t_heat:.1f} s "
              f"(server + job CPU {cpu_heat:.1f} s; load average {os.getloadavg()[0]:.1f})")

        # findings: listed at once after the job; a click on one centres the slice views on its centroid (the
        # server-side slice nodes' offsets, shown in #slice-position); the report downloads with their ids
        c.wait("the findings", lambda: c.js("document.querySelectorAll('#findings tr.finding-row').length") > 0, 60)
        assert "finding" in c.text("#findings-text")
        rows = c.js("[...document.querySelectorAll('#findings tr.finding-row')]"
                    ".map(r => [...r.querySelectorAll('td')].map(td => td.innerText.trim()))")
        ids = [r[0] for r in rows]
        before_pos = c.text("#slice-position")
        pick = len(rows) - 1  # not the first: the views start centred on the volume, not on a finding
        c.click(f"#findings tr.finding-row:nth-child({pick + 1})")
        c.wait("the slice views to move", lambda: c.text("#slice-position") != before_pos
               and f"finding {ids[pick]}" in c.text("#status-line"), 30)
        offsets = {part.split()[0]: float(part.split()[-1]) for part in c.text("#slice-position").split("|")}
        ras = [float(x) for x in rows[pick][3].split(",")]  # the page lists RAS, as the slice views use
        # each view's offset along its normal (Slicer's presets: Red axial +S, Green coronal +A, Yellow sagittal -R)
        assert all(abs(offsets[v] - w) < 0.2 for v, w in (("Red", ras[2]), ("Green", ras[1]), ("Yellow", -ras[0]))), \
            (ras, offsets)
        c.click("#download-report")
        name = c.wait("the report download", lambda: next((f.name for f in c.downloads.glob("*_report.html")), None), 60)
        report_html = c.download(name).read_text(encoding="utf-8")
        assert report_html.lstrip().lower().startswith("<!doctype html")
        for fid in ids:
            assert f"<td>{fid}</td>" in report_html, f"finding {fid} missing from the report"

        # threshold slider: a click at 85% of the track -> absolute mode, a higher threshold, fewer hot pixels
        before = float(c.text("#threshold-value").split()[-1])
        findings_before = c.text("#findings-text")
        c.rect("#threshold-value", scroll=True)
        track = c.js("JSON.stringify(document.getElementById('threshold').closest('.v-slider')"
                     ".querySelector('.v-slider__container').getBoundingClientRect())")
        track = json.loads(track)
        c.click_at(track["x"] + 0.85 * track["width"], track["y"] + track["height"] / 2)
        c.wait("the threshold to move", lambda: float(c.text("#threshold-value").split()[-1]) > before, 30)
        threshold = float(c.text("#threshold-value").split()[-1])
        c.wait("absolute threshold mode", lambda: "absolute" in c.text("#panel"), 10)
        time.sleep(1.5)
        hot_after = hot_pixels(c.screenshot(), axial)
        assert hot_after < hot_before, f"the preview did not follow the threshold ({hot_before} -> {hot_after})"
        c.wait("the findings at the new threshold (once the slider rests)",
               lambda: c.text("#findings-text") not in ("", findings_before), 30)
        print(f"findings: {findings_before!r} -> {c.text('#findings-text')!r}; jumped to {ras}: {offsets}")

        # create the segment, export heatmap and segmentation (NIfTI) and compare with the input's grid
        c.click("#create-segment")
        c.wait("the segment", lambda: "Segment 'Anomaly' written" in c.text("#status-line"), 60)
        c.click("#export-heatmap")
        heat_img, heat_geo = geometry(c.download("heatmap.nii.gz"))
        c.click("#export-segmentation")
        seg_path = c.download("segmentation.nii.gz")
        seg_img, seg_geo = geometry(seg_path)
        _, in_geo = geometry(SAMPLE)
        assert_same_grid(heat_geo, in_geo)
        assert_same_grid(seg_geo, in_geo)
        import SimpleITK as sitk
        heat, seg = sitk.GetArrayFromImage(heat_img), sitk.GetArrayFromImage(seg_img) > 0
        step = float(heat.max()) / 500
        assert seg.any()
        assert not (seg & (heat <= threshold - step)).any(), "segment voxels below the threshold"
        assert seg[heat > threshold + step].all(), "voxels above the threshold missing from the segment"
        n_seg = int(seg.sum())

        # paint on the segment in the axial view (trame-slicer's paint effect), export again: it grew
        seg_path.rename(out / "segmentation_created.nii.gz")
        c.click("#effect-paint")
        c.wait("the paint effect", lambda: c.js("document.querySelector('#effect-paint')"
                                                ".classList.contains('v-btn--active')"), 10)
        time.sleep(1.5)  # the effect's pipeline is set up on the server
        axial = c.rect("#views img.image-display-area")
        cx, cy = axial["x"] + axial["width"] * 0.5, axial["y"] + axial["height"] * 0.62
        c.drag([(cx - 60 + 10 * i, cy) for i in range(13)])
        time.sleep(1.5)
        c.click("#export-segmentation")
        seg2_img, seg2_geo = geometry(c.download("segmentation.nii.gz"))
        assert_same_grid(seg2_geo, in_geo)
        n_painted = int((sitk.GetArrayFromImage(seg2_img) > 0).sum())
        assert n_painted > n_seg + 50, f"painting did not add to the segment ({n_seg} -> {n_painted})"
        Image.fromarray(c.screenshot()).save(out / "web_painted.png")

        # a crashed job: Apply, kill the scoring process; the page says so and stays usable
        c.click("#apply-button")
        c.wait("the job to run", lambda: "Computing" in c.text("#status-line"), 60)
        kids = c.wait("the scoring process", lambda: [p for p in descendants(server.pid)
                      if "score" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")], 60)
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        c.wait("the failure to be shown", lambda: c.text("#status-line").startswith("Failed"), 60)
        assert c.js("document.querySelectorAll('.error-message').length") >= 1
        assert "APPLY" in c.text("#apply-button").upper()
        assert c.text("#heatmap-name").startswith("Heatmap:"), "the previous heatmap was lost"

        # the page still works: Create segment again asks before overwriting the painted segment
        c.click("#effect-none")  # leave paint mode
        c.click("#create-segment")
        c.wait("the overwrite question", lambda: "Overwrite your edits" in c.text("#question"), 30)
        c.click("#question-yes")
        c.wait("the segment rewritten", lambda: "Segment 'Anomaly' written" in c.text("#status-line"), 60)
    except BaseException:
        print("server log:\n" + "".join(log[-60:]))
        raise
    finally:
        if c is not None:
            c.close()
        stop_server(server)


@pytest.mark.slow
@needs_web
def test_browser_upload(tmp_path):
    """Uploads through the page's file input over the real websocket: a wrong type is refused with a message,
    the sample (3 MB) becomes the input and Apply is enabled. The server got no volume on its command line."""
    exe = find_browser()
    if exe is None:
        pytest.skip("no Chromium found (apt-get install chromium; .ci/run installs it)")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "VAEAnomaly")}
    server = subprocess.Popen([sys.executable, "-m", "VAEAnomalyLib.web", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=str(ROOT),
                              start_new_session=True)
    c = None
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.5)
        c = Chrome(exe)
        c.call("Page.navigate", url=f"http://127.0.0.1:{port}/")
        c.wait("the panel", lambda: c.js("!!document.querySelector('input[type=file]')"), 120)
        assert c.js("document.querySelector('#apply-button').disabled"), "Apply enabled without an input"

        def upload(path):
            root = c.call("DOM.getDocument")["root"]["nodeId"]
            node = c.call("DOM.querySelector", nodeId=root, selector="input[type=file]")["nodeId"]
            c.call("DOM.setFileInputFiles", nodeId=node, files=[str(path)])

        bad = tmp_path / "notes.txt"
        bad.write_text("not a volume")
        upload(bad)
        c.wait("the refusal", lambda: "is not a NIfTI, NRRD or MHA file" in c.text("#panel"), 120)
        upload(SAMPLE)
        c.wait("the upload", lambda: "Loaded 'VAEAnomalySample_T2'" in c.text("#status-line"), 240)
        assert "VAEAnomalySample_T2" in c.text("#panel")
        assert not c.js("document.querySelector('#apply-button').disabled"), "Apply not enabled after the upload"
    finally:
        if c is not None:
            c.close()
        stop_server(server)
