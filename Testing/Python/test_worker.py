"""The warm scoring worker (VAEAnomalyLib/worker.py, vaeanomaly/score_worker.py) behind ScoringJob, headless
on a real vtkMRMLScene, with the bundled default model and the bundled sample volume at 2 mm (fast).

Each test gets its own launcher script (a stand-in for Slicer's PythonSlicer: a shell that starts the real
Python as its child), hence its own worker, and ends with every worker stopped and no process left."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")

from conftest import ROOT  # noqa: E402
from test_logic import add_volume  # noqa: E402
from VAEAnomalyLib import worker  # noqa: E402
from VAEAnomalyLib.logic import ScoringJob, VAEAnomalyLogic  # noqa: E402
from vaeanomaly.checkpoint import DEFAULT_VAE, sample_data  # noqa: E402
from vaeanomaly.predictors import PredictorOptions  # noqa: E402


def alive(pid) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def gone_within(pids, timeout) -> float:
    """Seconds until none of `pids` runs (polled); fails after `timeout`."""
    t0 = time.monotonic()
    while any(alive(p) for p in pids):
        assert time.monotonic() - t0 < timeout, [p for p in pids if alive(p)]
        time.sleep(0.01)
    return time.monotonic() - t0


def launcher(tmp_path, name="PythonSlicer") -> str:
    """Like Slicer's launcher: the real Python runs as the launcher's *child* (not exec'd)."""
    path = tmp_path / name
    path.write_text(f'#!/bin/sh\n"{sys.executable}" "$@"\nexit $?\n', encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.fixture(scope="module")
def sample_small():
    """The bundled sample T2 at 2 mm (120 x 120 x 78): real anatomy, scored in well under a second."""
    return sitk.Shrink(sitk.ReadImage(str(sample_data("VAEAnomalySample_T2.nrrd"))), [2, 2, 2])


@pytest.fixture
def scene():
    s = slicer.vtkMRMLScene()
    yield s
    s.Clear(1)


@pytest.fixture(autouse=True)
def no_worker_left():
    yield
    procs = [w.proc for w in worker.workers()]
    pids = [w.pid for w in worker.workers() if w.pid] + [p.pid for p in procs]
    worker.shutdown()
    gone_within(pids, 10)
    assert worker.workers() == []


def run(job, timeout=240) -> int:
    rc = job.wait(timeout)
    assert rc is not None
    return rc


def wait_running(job, timeout=120):
    """Until the worker computes this job: its Python is up (it reads the request once its imports are done;
    a long Proj-Rec-Error job shows no progress for a while, its verdict comes first)."""
    assert job.worker.ready.wait(timeout), job.messages
    time.sleep(0.5)
    assert job.poll() is None, ("the job ended before it could be stopped", job.messages)
    return job.worker.pid


def test_second_job_reuses_the_warm_worker(scene, sample_small, tmp_path):
    logic = VAEAnomalyLogic(scene)
    node = add_volume(scene, sample_small, "T2")
    exe = launcher(tmp_path)
    first = ScoringJob(logic, node, launcher=exe).start()
    assert run(first) == 0, first.messages
    assert first.model_cached is False and first.progress == pytest.approx(1.0)
    r1 = first.finish()
    second = ScoringJob(logic, node, launcher=exe).start()
    assert second.proc is first.proc  # the same worker process ...
    assert run(second) == 0, second.messages
    assert second.worker_pid == first.worker_pid == first.worker.pid  # ... scored both
    assert second.model_cached is True  # with the checkpoint it had loaded
    r2 = second.finish(r1.heatmap)
    assert r2.heatmap is r1.heatmap and isinstance(r2.verdict, dict)
    assert not first.tmp.exists() and not second.tmp.exists()
    assert len([w for w in worker.workers() if w.launcher == exe]) == 1
    # another launcher (another Python) gets its own worker
    other = ScoringJob(logic, node, launcher=launcher(tmp_path, "other")).start()
    assert run(other) == 0 and other.worker_pid != first.worker_pid
    other.cleanup()


def test_results_equal_the_command_line(scene, sample_small, tmp_path):
    """The worker gives what the one-shot `vaeanomaly score` gives for the same input: maps and report."""
    logic = VAEAnomalyLogic(scene)
    node = add_volume(scene, sample_small, "T2")
    opts = PredictorOptions(smooth=False, batch_size=9)  # not the defaults: the worker must get these
    job = ScoringJob(logic, node, None, DEFAULT_VAE, "elbo-grad", opts, reconstruction=True).start()
    assert run(job) == 0, job.messages
    result = job.finish()
    inp = tmp_path / "in.nrrd"
    sitk.WriteImage(sample_small, str(inp))
    (tmp_path / "opts.json").write_text(json.dumps(opts.to_dict()), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "VAEAnomaly")}
    cp = subprocess.run([sys.executable, "-m", "vaeanomaly.cli", "score", str(inp), "-o", str(tmp_path / "out"),
                         "--model", DEFAULT_VAE, "--predictor", "elbo-grad,reconstruction", "--options",
                         str(tmp_path / "opts.json"),
                         "--report", str(tmp_path / "r.json"), "--progress", "none"],
                        env=env, capture_output=True, text=True, timeout=300)
    assert cp.returncode == 0, cp.stderr
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "elbo-grad.nii.gz")))
    np.testing.assert_allclose(logic.heatmap_array(result.heatmap), ref, rtol=1e-4, atol=1e-6)
    rec = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "reconstruction.nii.gz")))
    np.testing.assert_allclose(logic.heatmap_array(result.reconstruction), rec, rtol=1e-4, atol=1e-5)
    report = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert result.verdict.keys() == report.keys()
    for k, v in report.items():
        if isinstance(v, float):
            assert result.verdict[k] == pytest.approx(v, rel=1e-3), k
        elif k != "statistics":
            assert result.verdict[k] == v, k
    assert result.warnings == report["warnings"]


@pytest.mark.slow
def test_cancel_kills_the_tree_and_the_next_job_starts_a_fresh_worker(scene, sample_small, tmp_path):
    logic = VAEAnomalyLogic(scene)
    node = add_volume(scene, sample_small, "T2")
    exe = launcher(tmp_path)
    long = PredictorOptions(proj_steps=100000)
    early = ScoringJob(logic, node, None, DEFAULT_VAE, "proj-rec-error", long, launcher=exe).start()
    early.cancel()  # before the new worker even read the job: it is not handed to another worker
    assert early.proc.poll() is not None and early.poll() is not None
    assert not [w for w in worker.workers() if w.launcher == exe]
    job = ScoringJob(logic, node, None, DEFAULT_VAE, "proj-rec-error", long, launcher=exe).start()
    python = wait_running(job)
    assert python != job.proc.pid and alive(python)  # the launcher's child does the work
    t0 = time.monotonic()
    job.cancel()
    gone_within([python, job.proc.pid], 10)
    assert time.monotonic() - t0 < 2.0  # the design: SIGTERM to the group, SIGKILL 0.5 s later (1 s on a quiet machine)
    assert job.proc.poll() is not None and not job.tmp.exists()
    assert job.worker not in worker.workers()
    nxt = ScoringJob(logic, node, launcher=exe).start()
    assert nxt.proc is not job.proc
    assert run(nxt) == 0, nxt.messages
    assert nxt.worker_pid != python and nxt.model_cached is False
    assert nxt.finish().heatmap is not None


@pytest.mark.slow
def test_a_worker_killed_from_outside_fails_its_job_and_is_replaced(scene, sample_small, tmp_path):
    logic = VAEAnomalyLogic(scene)
    node = add_volume(scene, sample_small, "T2")
    exe = launcher(tmp_path)
    job = ScoringJob(logic, node, None, DEFAULT_VAE, "proj-rec-error", PredictorOptions(proj_steps=100000),
                     launcher=exe).start()
    python = wait_running(job)
    os.kill(python, signal.SIGKILL)  # a crash: nobody asked for it
    rc = run(job, 30)
    assert rc != 0
    err = job.error()
    assert "stopped unexpectedly" in err and "signal 9" in err and "next run starts a new one" in err, err
    assert "probably out of memory" in err  # SIGKILL: most often the out-of-memory killer; say what to do
    job.cleanup()
    ok = ScoringJob(logic, node, launcher=exe).start()
    assert run(ok) == 0, ok.messages
    assert ok.worker_pid != python and ok.finish().heatmap is not None
    # killed while idle: the next job does not even notice
    idle = ok.worker.pid
    os.kill(idle, signal.SIGKILL)
    gone_within([idle], 10)
    again = ScoringJob(logic, node, launcher=exe).start()
    assert run(again) == 0, again.messages
    assert again.worker_pid not in (idle, python)
    again.cleanup()


def test_a_failing_job_keeps_the_worker(scene, sample_small, tmp_path):
    """Bad input inside the worker (here: the input file damaged after the job was made): the job fails with
    the command line's own message and exit code 2; the worker lives on and scores the next job."""
    logic = VAEAnomalyLogic(scene)
    node = add_volume(scene, sample_small, "T2")
    exe = launcher(tmp_path)
    good = ScoringJob(logic, node, launcher=exe).start()
    assert run(good) == 0
    good.cleanup()
    bad = ScoringJob(logic, node, launcher=exe)
    (bad.tmp / "input.nrrd").write_bytes(b"NRRD0004\ngarbage")
    bad.start()
    assert run(bad) == 2
    assert bad.error().startswith("vaeanomaly: error:") and "input" in bad.error(), bad.messages
    bad.cleanup()
    after = ScoringJob(logic, node, launcher=exe).start()
    assert run(after) == 0 and after.worker_pid == good.worker_pid and after.model_cached
    after.cleanup()


def test_a_launcher_that_fails_reports_its_message(scene, sample_small, tmp_path):
    logic = VAEAnomalyLogic(scene)
    node = add_volume(scene, sample_small, "T2")
    bad = tmp_path / "PythonSlicer"
    bad.write_text('#!/bin/sh\necho "vaeanomaly: error: no Python here" >&2\nexit 3\n', encoding="utf-8")
    bad.chmod(bad.stat().st_mode | stat.S_IEXEC)
    job = ScoringJob(logic, node, launcher=str(bad)).start()
    assert run(job, 30) == 3
    assert "no Python here" in job.error() and "exit code 3" in job.error()
    job.cleanup()


@pytest.mark.slow
def test_shutdown_leaves_no_process(scene, sample_small, tmp_path):
    logic = VAEAnomalyLogic(scene)
    node = add_volume(scene, sample_small, "T2")
    exe = launcher(tmp_path)
    idle = ScoringJob(logic, node, launcher=exe).start()
    assert run(idle) == 0
    idle.cleanup()
    busy = ScoringJob(logic, node, None, DEFAULT_VAE, "proj-rec-error", PredictorOptions(proj_steps=100000),
                      launcher=launcher(tmp_path, "second")).start()
    wait_running(busy)
    pids = [w.pid for w in worker.workers()] + [w.proc.pid for w in worker.workers()]
    assert len(pids) == 4 and all(alive(p) for p in pids)
    worker.shutdown()
    gone_within(pids, 10)
    assert worker.workers() == []
    assert busy.poll() is not None and "stopped" in busy.error()
    busy.cleanup()


@pytest.mark.slow
def test_workers_stop_when_the_application_exits(tmp_path):
    """atexit, and the worker's own end when its parent vanishes without running atexit (stdin closes)."""
    code = ("import sys, os; sys.path.insert(0, {lib!r}); from VAEAnomalyLib import worker; "
            "w = worker.prestart(); assert w.ready.wait(120); print(w.pid, w.proc.pid, flush=True); {end}")
    for end in ("sys.exit(0)", "os._exit(0)"):
        cp = subprocess.run([sys.executable, "-c", code.format(lib=str(ROOT / "VAEAnomaly"), end=end)],
                            capture_output=True, text=True, timeout=200)
        assert cp.returncode == 0, cp.stderr
        pids = [int(x) for x in cp.stdout.split()]
        gone_within(pids, 20)


def test_shutdown_is_connected_to_slicers_aboutToQuit(monkeypatch):
    """Inside the application (slicer.app exists) the hook is connected as Slicer's modules connect it."""
    connected = []

    class App:
        def connect(self, signal_name, slot):
            connected.append((signal_name, slot))

    monkeypatch.setattr(slicer, "app", App(), raising=False)
    monkeypatch.setattr(worker, "_hooks_installed", False)
    worker._install_shutdown_hooks()
    assert connected == [("aboutToQuit()", worker.shutdown)]
    worker._install_shutdown_hooks()  # once per session
    assert len(connected) == 1


def test_module_open_warms_the_worker_for_the_first_apply(scene, sample_small, tmp_path):
    """The panel's warm_up (called when the module opens) starts the worker; the first Apply then runs in it
    (torch already imported) instead of starting one."""
    from VAEAnomalyLib.controller import PanelController, PanelParams
    exe = launcher(tmp_path)
    ctl = PanelController(scene, PanelParams(), launcher=exe)
    assert ctl.warm_up()
    (w,) = [w for w in worker.workers() if w.launcher == exe]
    assert w.ready.wait(120)
    assert ctl.warm_up() and [x for x in worker.workers() if x.launcher == exe] == [w]  # no second worker
    job = ScoringJob(VAEAnomalyLogic(scene), add_volume(scene, sample_small, "T2"), launcher=exe).start()
    assert job.proc is w.proc
    assert run(job) == 0, job.messages
    assert job.worker_pid == w.pid
    job.cleanup()
    ctl.close()


def test_a_job_that_cannot_start_leaves_no_scan_behind(scene, sample_small, tmp_path):
    """The exported input (a patient scan, uncompressed) is removed when no worker can be started."""
    job = ScoringJob(VAEAnomalyLogic(scene), add_volume(scene, sample_small, "T2"),
                     launcher=str(tmp_path / "no-such-PythonSlicer"))
    assert (job.tmp / "input.nrrd").exists()
    with pytest.raises(OSError):
        job.start()
    assert not job.tmp.exists()


def test_model_cache_reads_a_rewritten_checkpoint_again(tmp_path):
    """The worker's checkpoint cache: a hit for the same file, a miss once the file was rewritten, even with
    the same size and modification time (file systems with coarse times)."""
    import shutil

    from vaeanomaly.checkpoint import resolve_model
    from vaeanomaly.score_worker import ModelCache
    path = tmp_path / "m.safetensors"
    shutil.copyfile(resolve_model(None), path)
    cache = ModelCache()
    first, cached = cache.get(str(path))
    assert not cached and cache.get(str(path)) == (first, True)
    st = path.stat()
    time.sleep(0.01)
    path.write_bytes(path.read_bytes())  # rewritten in place: same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same modification time
    again, cached = cache.get(str(path))
    assert not cached and again is not first


def test_heatmap_can_be_shown_before_the_verdict(scene, sample_small, tmp_path):
    """The worker says when the maps are written (before it computes the verdict); show_maps puts the heatmap
    into the scene then, and finish() adds the verdict to the same result, the same node."""
    logic = VAEAnomalyLogic(scene)
    node = add_volume(scene, sample_small, "T2")
    job = ScoringJob(logic, node, launcher=launcher(tmp_path)).start()
    with pytest.raises(RuntimeError, match="not written yet"):
        job.show_maps()
    assert run(job) == 0, job.messages
    assert job.maps_ready
    early = job.show_maps()
    assert early.heatmap.GetScene() is scene and early.verdict is None
    with pytest.raises(RuntimeError, match="already loaded"):
        job.show_maps()
    final = job.finish()
    assert final is early and final.heatmap is early.heatmap and isinstance(final.verdict, dict)
    assert final.verdict["in_distribution"] in (True, False) and not job.tmp.exists()
