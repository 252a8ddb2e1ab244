"""Every platform Slicer ships for (issue 25): Windows and macOS simulated on the Linux CI.

The simulation replaces what the project's modules see, not the interpreter: each module that asks which
platform it runs on (vaeanomaly.volume, vaeanomaly.cli, VAEAnomalyLib.worker) gets an `os` / `sys` stand-in
with Windows' or macOS's name and without the POSIX calls those platforms lack (os.sysconf, os.killpg, ...).
Setting the real os.name would break pathlib (Path() then builds a WindowsPath, which Linux refuses).
/proc/meminfo is made unreadable through volume.MEMINFO; signal.SIGKILL is removed from the real module."""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_phantom
from vaeanomaly import cli, volume
from vaeanomaly.checkpoint import sample_data

POSIX_ONLY = ("sysconf", "sysconf_names", "killpg", "getpgid", "setsid", "getuid", "getloadavg", "fork")


class StandIn:
    """A module as another platform's Python has it: `over` replaces attributes, `drop` removes them."""

    def __init__(self, real, drop=(), **over):
        self.__dict__.update(over)
        self._real, self._drop = real, set(drop)

    def __getattr__(self, name):
        if name in self._drop:
            raise AttributeError(f"module '{self._real.__name__}' has no attribute '{name}'")
        return getattr(self._real, name)


def _no_meminfo(monkeypatch, tmp_path):
    monkeypatch.setattr(volume, "MEMINFO", str(tmp_path / "no-proc" / "meminfo"))


def _no_psutil(monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", None)  # `import psutil` raises ImportError


@pytest.fixture
def windows(monkeypatch, tmp_path):
    """Windows: os.name 'nt', sys.platform 'win32', no os.sysconf / os.killpg / ..., no /proc, no SIGKILL,
    no psutil, Popen.kill is Popen.terminate (TerminateProcess there); ctypes has no windll here, so GlobalMemoryStatusEx is unreachable unless a test provides it."""
    fake_os = StandIn(os, drop=POSIX_ONLY, name="nt")
    fake_sys = StandIn(sys, platform="win32")
    monkeypatch.setattr(volume, "os", fake_os)
    monkeypatch.setattr(volume, "sys", fake_sys)
    monkeypatch.setattr(cli, "os", fake_os)
    try:
        from VAEAnomalyLib import worker
    except ImportError:  # the application layer needs nothing of Slicer at import; only if it moved
        worker = None
    if worker is not None:
        monkeypatch.setattr(worker, "os", fake_os)
    monkeypatch.delattr(signal, "SIGKILL")
    monkeypatch.setattr(subprocess.Popen, "kill", subprocess.Popen.terminate)  # Windows' Popen: kill = terminate
    _no_meminfo(monkeypatch, tmp_path)
    _no_psutil(monkeypatch)
    return fake_os


def _macos(monkeypatch, tmp_path, psutil=None):
    def sysconf(name):
        if name == "SC_AVPHYS_PAGES":
            raise ValueError("unrecognized configuration name")
        return os.sysconf(name)
    names = {k: v for k, v in os.sysconf_names.items() if k != "SC_AVPHYS_PAGES"}
    fake_os = StandIn(os, name="posix", sysconf=sysconf, sysconf_names=names)
    monkeypatch.setattr(volume, "os", fake_os)
    monkeypatch.setattr(volume, "sys", StandIn(sys, platform="darwin"))
    _no_meminfo(monkeypatch, tmp_path)
    if psutil is None:
        _no_psutil(monkeypatch)
    else:
        monkeypatch.setitem(sys.modules, "psutil", psutil)
    return fake_os


@pytest.fixture
def macos(monkeypatch, tmp_path):
    """macOS without psutil: no /proc, os.sysconf without SC_AVPHYS_PAGES (ValueError), and libSystem's
    host_statistics64 unreachable (it is not on Linux)."""
    import ctypes.util
    volume._mach_host.cache_clear()
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)  # Linux has no libSystem: fast refusal
    return _macos(monkeypatch, tmp_path)  # nothing is cached: _mach_host raised


# ----------------------------------------------------------------------------- available_memory and check_memory
def test_linux_reads_meminfo_and_falls_back_without_raising(monkeypatch, tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemFree:         1000000 kB\nMemAvailable:    8000000 kB\n")
    monkeypatch.setattr(volume, "MEMINFO", str(meminfo))
    assert volume.available_memory() == 8000000 * 1024
    meminfo.write_text("MemTotal: 16000000 kB\nMemFree: 1000 kB\nBuffers: 2000 kB\nCached: 3000 kB\n")  # < 3.14
    assert volume.available_memory() == 6000 * 1024
    meminfo.write_text("garbage\n")  # unparsable: the next reader (psutil or sysconf), never an exception
    value = volume.available_memory()
    assert value is None or value > 0


def test_windows_without_its_api_says_unknown_and_checks_nothing(windows):
    assert volume.available_memory() is None
    volume.check_memory((4096, 4096, 4096))  # 68.7 G voxels: not refused on a guess
    img = make_phantom((40, 44, 12))
    volume.check_image(img)


def test_windows_reads_global_memory_status(windows, monkeypatch):
    """GlobalMemoryStatusEx through ctypes: the structure is the 64-byte MEMORYSTATUSEX, dwLength set."""
    seen = {}

    def GlobalMemoryStatusEx(ref):
        stat = ref._obj
        seen["length"] = stat.dwLength
        stat.ullTotalPhys, stat.ullAvailPhys = 16 << 30, 3 << 30
        return 1

    fake = types.SimpleNamespace(kernel32=types.SimpleNamespace(GlobalMemoryStatusEx=GlobalMemoryStatusEx))
    monkeypatch.setattr(ctypes, "windll", fake, raising=False)
    assert ctypes.sizeof(volume._memorystatusex()) == 64
    assert volume.available_memory() == 3 << 30 and seen["length"] == 64
    with pytest.raises(volume.VolumeError, match="GiB are available"):
        volume.check_memory((1024, 1024, 512))  # 2 GiB of voxels x 56 bytes: far above 3 GiB
    volume.check_memory((240, 240, 155))
    fake.kernel32.GlobalMemoryStatusEx = lambda ref: 0  # the call failed: unknown
    assert volume.available_memory() is None


def test_macos_without_psutil_or_libsystem_says_unknown(macos):
    assert volume.available_memory() is None
    volume.check_memory((4096, 4096, 4096))
    volume.check_image(make_phantom((40, 44, 12)))


def test_macos_uses_psutil_when_importable(monkeypatch, tmp_path):
    psutil = types.SimpleNamespace(virtual_memory=lambda: types.SimpleNamespace(available=5 << 30))
    _macos(monkeypatch, tmp_path, psutil=psutil)
    assert volume.available_memory() == 5 << 30


def test_macos_host_statistics64(macos, monkeypatch):
    """Without psutil: host_statistics64(HOST_VM_INFO64), free + inactive pages (psutil's 'available')."""
    calls = []

    class Lib:
        @staticmethod
        def host_statistics64(host, flavor, stats, count):
            calls.append((host, flavor, count._obj.value))
            stats._obj.free_count, stats._obj.inactive_count, stats._obj.active_count = 1000, 500, 9999
            return 0

    monkeypatch.setattr(volume, "_mach_host", lambda: (Lib, 7))
    import mmap
    assert volume.available_memory() == 1500 * mmap.PAGESIZE
    assert calls == [(7, volume.HOST_VM_INFO64, volume.VM_STATISTICS64_INTS)]
    assert ctypes.sizeof(volume._vm_statistics64()) >= 4 * volume.VM_STATISTICS64_INTS  # room for all it writes
    Lib.host_statistics64 = staticmethod(lambda *a: 5)  # KERN_FAILURE
    assert volume.available_memory() is None


@pytest.mark.parametrize("broken", [AttributeError, ValueError, OSError, TypeError])
def test_available_memory_never_raises(monkeypatch, tmp_path, broken):
    def boom(*a, **k):
        raise broken("no")
    _no_meminfo(monkeypatch, tmp_path)
    _no_psutil(monkeypatch)
    monkeypatch.setattr(volume, "os", StandIn(os, sysconf=boom))
    assert volume.available_memory() is None
    monkeypatch.setattr(volume, "_platform", boom)
    assert volume.available_memory() is None
    volume.check_memory((100, 100, 100))


# ----------------------------------------------------------------------------- the command line, in-process
def test_cli_scores_the_bundled_sample_on_simulated_windows(windows, tmp_path, capsys):
    """`vaeanomaly score` of the bundled sample: before issue 25 this ended in AttributeError (os.sysconf)."""
    out = tmp_path / "heat.nii.gz"
    assert cli.main(["score", str(sample_data("VAEAnomalySample_T2.nrrd")), "-o", str(out),
                     "--predictor", "rec-error", "--progress", "none"]) == 0, capsys.readouterr().err
    h = sitk.ReadImage(str(out))
    assert h.GetSize() == sitk.ReadImage(str(sample_data("VAEAnomalySample_T2.nrrd"))).GetSize()
    assert np.isfinite(sitk.GetArrayViewFromImage(h)).all()


def test_cli_on_simulated_macos_refuses_only_what_does_not_fit(macos, monkeypatch, tmp_path, capsys):
    """With a reading (host_statistics64), too little memory is a clear error (exit 2), not a traceback."""
    class Lib:
        @staticmethod
        def host_statistics64(host, flavor, stats, count):
            stats._obj.free_count, stats._obj.inactive_count = 10, 10  # a few pages free
            return 0
    monkeypatch.setattr(volume, "_mach_host", lambda: (Lib, 1))
    assert cli.main(["score", str(sample_data("VAEAnomalySample_T2.nrrd")), "-o", str(tmp_path / "h.nii.gz"),
                     "--progress", "none"]) == 2
    err = capsys.readouterr().err
    assert "vaeanomaly: error:" in err and "GiB are available" in err and "Traceback" not in err


def test_cli_output_survives_a_code_page_console(windows, monkeypatch):
    """Windows, output redirected: cp1252 has no λ; the help text is written escaped, not a UnicodeEncodeError."""
    import io
    buf = io.BytesIO()
    stream = io.TextIOWrapper(buf, encoding="cp1252")
    monkeypatch.setattr(sys, "stdout", stream)
    with pytest.raises(SystemExit) as e:
        cli.main(["score", "--help"])
    assert e.value.code == 0
    stream.flush()
    assert b"Proj-Rec-Error" in buf.getvalue() and b"\\u03bb" in buf.getvalue()  # lambda, escaped


# ----------------------------------------------------------------------------- the worker's process tree
def _sleeper(**kwargs):
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], **kwargs)


def test_worker_starts_children_in_a_windows_process_group(windows, monkeypatch):
    from VAEAnomalyLib import worker
    monkeypatch.setattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x200, raising=False)
    monkeypatch.setattr(subprocess, "CREATE_NO_WINDOW", 0x08000000, raising=False)
    kw = worker.child_group()
    assert kw == {"creationflags": 0x200 | 0x08000000}  # no start_new_session (POSIX only)
    assert worker.describe_exit(1) == "exit code 1" and worker.describe_exit(137) == "exit code 137"


def test_worker_kill_on_simulated_windows_ends_the_child(windows, monkeypatch):
    """The Windows branch: taskkill /F /T /PID (absent here: FileNotFoundError), then Popen.kill; no
    os.killpg, no signal.SIGKILL, and no wait for the grace period when taskkill could not run."""
    from VAEAnomalyLib import worker
    kw = worker.child_group()
    assert "start_new_session" not in kw
    proc = _sleeper(**{k: v for k, v in kw.items() if k != "creationflags" or v == 0})
    ran = []
    real_run = subprocess.run

    def run(cmd, *a, **k):
        ran.append(cmd)
        return real_run(["taskkill-not-on-linux", *cmd[1:]], *a, **k)  # FileNotFoundError, as without taskkill
    monkeypatch.setattr(subprocess, "run", run)
    t0 = time.monotonic()
    worker.kill_process_tree(proc, grace=5.0)
    assert proc.returncode is not None and time.monotonic() - t0 < 3
    assert ran == [["taskkill", "/F", "/T", "/PID", str(proc.pid)]]
    worker.kill_process_tree(proc, grace=5.0)  # a second stop of an ended process: nothing raised


def test_worker_kill_when_taskkill_succeeds_but_the_child_lingers(windows, monkeypatch):
    from VAEAnomalyLib import worker
    proc = _sleeper()
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: types.SimpleNamespace(returncode=0))
    t0 = time.monotonic()
    worker.kill_process_tree(proc, grace=0.3)
    assert proc.returncode is not None and 0.25 < time.monotonic() - t0 < 3


def test_worker_kill_on_macos_when_the_group_cannot_be_signalled(monkeypatch):
    """macOS answers killpg with EPERM for a group left with zombies only: the child itself is killed."""
    from VAEAnomalyLib import worker
    proc = _sleeper(start_new_session=True)

    def killpg(pgid, sig):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(worker, "os", StandIn(os, killpg=killpg))
    t0 = time.monotonic()
    worker.kill_process_tree(proc, grace=5.0)
    assert proc.returncode is not None and time.monotonic() - t0 < 3


# ----------------------------------------------------------------------------- adaptation
def test_adaptation_names_scans_on_different_windows_drives(monkeypatch, tmp_path):
    """os.path.commonpath raises ValueError for paths on different drives (C:, D:): full paths then."""
    from pathlib import Path

    from vaeanomaly.adapt import scan_names
    a, b = tmp_path / "a" / "T2.nii.gz", tmp_path / "b" / "T2.nii.gz"

    def commonpath(paths):
        raise ValueError("Paths don't have the same drive")
    monkeypatch.setattr(os.path, "commonpath", commonpath)
    names = scan_names([Path(a), Path(b)])
    assert len(set(names)) == 2 and all(n.endswith("T2.nii.gz") for n in names)


# ----------------------------------------------------------------------------- the panel's Apply
def test_apply_on_simulated_windows_starts_the_job(windows, tmp_path):
    """Apply reaches the memory estimate before its guarded part: on Windows (no os.sysconf) it used to raise
    there, so Apply did nothing. Now the estimate is 'unknown', the job starts; Cancel takes the Windows kill."""
    pytest.importorskip("slicer")
    from test_controller import ScriptedUser
    from test_logic import add_volume
    from VAEAnomalyLib import worker
    from VAEAnomalyLib.controller import PanelController, PanelParams
    import slicer as sl
    s = sl.vtkMRMLScene()
    try:
        node = add_volume(s, make_phantom((40, 44, 12), (3.0, 3.0, 6.0)), "T2")
        user = ScriptedUser()
        ctl = PanelController(s, PanelParams(inputVolume=node), user)
        assert ctl.apply(), (ctl.status, user.shown)
        assert ctl.job is not None and not [k for k in user.kinds() if k in ("error", "confirm")]
        proc = ctl.job.proc
        ctl.cancel()
        assert proc.poll() is not None or worker._reap(proc, 3) is not None
        ctl.close()
    finally:
        worker.shutdown(timeout=1.0)
        s.Clear(1)


def test_apply_shows_an_error_or_runs_when_the_memory_estimate_fails(monkeypatch):
    """Nothing before Apply's guarded part fails silently: a failing estimate is advice lost, the job runs."""
    pytest.importorskip("slicer")
    from test_controller import ScriptedUser
    from test_logic import add_volume
    from VAEAnomalyLib import worker
    from VAEAnomalyLib.controller import PanelController, PanelParams
    import slicer as sl

    def broken(volume):
        raise AttributeError("module 'os' has no attribute 'sysconf'")
    s = sl.vtkMRMLScene()
    try:
        node = add_volume(s, make_phantom((40, 44, 12), (3.0, 3.0, 6.0)), "T2")
        user = ScriptedUser()
        params = PanelParams(inputVolume=node)
        ctl = PanelController(s, params, user, memory_warning=broken, gpu_available=lambda: 1 / 0)
        params.useGPU = True  # the GPU check raises too: a warning, then the CPU
        assert ctl.apply(), (ctl.status, user.shown)
        assert ctl.job is not None and user.kinds() == ["warning"]  # "no CUDA GPU": the CPU
        ctl.cancel()
        ctl.close()
    finally:
        worker.shutdown(timeout=1.0)
        s.Clear(1)
