"""The warm scoring worker: one background Python process per application session and Python launcher.

A new process per Apply cost seconds before the first voxel was scored (importing torch, loading the
checkpoint). Here a worker (`<launcher> -m vaeanomaly.score_worker`, no slicer or vtk imported) starts
with the first job and stays: torch stays imported, checkpoints stay loaded. Jobs go in as the arguments
of `vaeanomaly score` (one JSON line); progress lines and the end come back as JSON lines.

- Cancel kills the worker's whole process tree (the launcher *and* the Python it started), within a
  fraction of a second; the next job starts a fresh worker.
- A worker that dies (killed, crashed, exited) ends its job with a message saying so; the next job starts a
  fresh one. A worker whose parent dies sees its stdin close and exits.
- The workers stop with the application: at interpreter exit (atexit) and, inside the Slicer application,
  on `aboutToQuit` (connected as Slicer's own DICOMBrowser.py connects it).
- Two jobs at once (two panels, or a web viewer beside the panel) each get a worker; an extra idle worker
  quits when its job ends, so one per launcher stays warm.

This module has no MRML or Qt code; `ScoringJob` (logic.py) is its user.
"""
from __future__ import annotations

import atexit
import collections
import itertools
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

WORKER_MODULE = "vaeanomaly.score_worker"
MODULE_DIR = Path(__file__).resolve().parent.parent  # holds the vaeanomaly core package
CANCEL_GRACE = 0.5  # seconds between SIGTERM and SIGKILL for the worker's process group


def python_executable() -> str:
    """Slicer's own Python launcher inside the application, else this interpreter."""
    return shutil.which("PythonSlicer") or sys.executable


# ----------------------------------------------------------------------------- starting and stopping a process tree
def child_env() -> dict:
    """The environment of our children: the module folder on PYTHONPATH (the core library), UTF-8 pipes."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(MODULE_DIR)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("PYTHONIOENCODING", "utf-8")
    return env


def child_group() -> dict:
    """Popen arguments that put a child in its own process group (so kill_process_tree stops all of it) and,
    on Windows, show no console window: PythonSlicer.exe is a console program started from a GUI process
    (Slicer's own slicer.util.launchConsoleProcess hides the window the same way)."""
    if os.name == "posix":
        return {"start_new_session": True}
    return {"creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0) | getattr(subprocess, "CREATE_NO_WINDOW", 0)}


def kill_process_tree(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """Stop a child and everything it started. Inside Slicer the child is the PythonSlicer launcher and
    the real Python runs as *its* child, so killing only `proc` leaves the computation running
    (lassoan/SlicerMONAIAuto3DSeg MONAIAuto3DSegLib/process.py _killProcess kills the children for the
    same reason). The child is started in a new session (POSIX: its own process group) or a new
    process group (Windows), so the whole group can be stopped. Never raises for a platform reason: where
    the group cannot be signalled the child itself is killed."""
    if proc is None:
        return
    if os.name == "posix" and hasattr(os, "killpg"):
        _kill_group_posix(proc, grace)
    else:
        _kill_tree_windows(proc, grace)


def _kill_group_posix(proc: subprocess.Popen, grace: float) -> None:
    import signal
    pgid = proc.pid  # start_new_session=True: the child leads its own process group
    for sig in (signal.SIGTERM, getattr(signal, "SIGKILL", signal.SIGTERM)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        except OSError:  # macOS: EPERM for a group left with zombies only; the child itself, then
            _kill_child(proc, 0.0)
            break
        if _wait_group_gone(proc, pgid, grace):
            break
    proc.poll()


def _kill_tree_windows(proc: subprocess.Popen, grace: float) -> None:
    """Windows: taskkill /T /F ends the launcher and its children (there are no process groups to signal);
    where taskkill cannot run or fails, Popen.kill (TerminateProcess) ends the child itself."""
    try:
        done = subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], capture_output=True, timeout=10,
                              creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0)).returncode == 0
    except (OSError, subprocess.SubprocessError):  # no taskkill (not Windows after all, a locked-down PATH)
        done = False
    _kill_child(proc, grace if done else 0.0)


def _kill_child(proc: subprocess.Popen, grace: float) -> None:
    """Wait `grace` seconds for the child to end, then kill it (SIGKILL / TerminateProcess) and reap it
    (polling, as _reap: another thread may be blocked in Popen.wait)."""
    if _reap(proc, grace) is not None:
        return
    try:
        proc.kill()
    except OSError:  # ended meanwhile
        pass
    _reap(proc, max(grace, 2.0))


def _wait_group_gone(proc, pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.poll()  # reap our own child
        try:
            os.killpg(pgid, 0)  # anyone left in the group?
        except ProcessLookupError:
            return True
        except OSError:  # macOS: EPERM once only zombies are left
            return proc.poll() is not None
        if _group_only_zombies(pgid):
            return True
        time.sleep(0.02)
    return False


def _group_only_zombies(pgid: int) -> bool:
    """Linux: True when every process left in the group is a zombie (dead, awaiting its parent)."""
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():
        return False
    states = []
    for d in proc_dir.iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after ')': state, ppid, pgrp, ...
            states.append(fields[0])
    return all(st == "Z" for st in states)


def _reap(proc: subprocess.Popen, timeout: float) -> Optional[int]:
    """The exit code once the process ended (reaped here or by another thread), None after `timeout`.
    Popen.poll() returns None while another thread blocks in Popen.wait(), so nobody here blocks in it."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return proc.returncode


def describe_exit(rc: Optional[int]) -> str:
    """'exit code 2', 'killed by signal 9 (SIGKILL)'; a shell launcher reports a killed child as 128 + signal."""
    import signal
    if rc is None:
        return "no exit code"
    if os.name == "nt":  # no signals: a killed process exits with the code its killer chose (taskkill: 1)
        return f"exit code {rc}"
    sig = -rc if rc < 0 else rc - 128 if 128 < rc < 160 else None
    if sig:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = "?"
        return f"killed by signal {sig} ({name})" if rc < 0 else f"exit code {rc}: killed by signal {sig} ({name})"
    return f"exit code {rc}"


# ----------------------------------------------------------------------------- one worker
class Ticket:
    """One job's channel to its worker. `events` receives, in order: ("line", text) for each stderr line
    of the request, ("maps", mask source) once the maps are written, then ("done", exit code, info dict: the
    worker's end event, with its mask_source and error) or, if the worker ended, ("died", its exit code)."""
    _ids = itertools.count(1)

    def __init__(self, request: dict):
        self.id, self.request = next(Ticket._ids), dict(request)  # a vaeanomaly.scoring.ScoreRequest as JSON
        self.events: queue.Queue = queue.Queue()
        self.done = threading.Event()
        self.worker: Optional[Worker] = None
        self.accepted = False  # the worker read the request
        self.retried = False
        self.cancelled = False


class Worker:
    """`<launcher> -m vaeanomaly.score_worker` in its own process group, with two reader threads."""

    def __init__(self, launcher: str):
        self.launcher = launcher
        self.proc = subprocess.Popen([launcher, "-m", WORKER_MODULE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8",
                                     errors="replace", bufsize=1, env=child_env(), **child_group())
        self.pid: Optional[int] = None  # the Python worker's own pid (the launcher's child inside Slicer)
        self.ready = threading.Event()
        self.current: Optional[Ticket] = None
        self.jobs = 0  # requests finished
        self.retiring = False
        self.gone = threading.Event()
        self.stray = collections.deque(maxlen=50)  # stderr lines outside a job (start-up, after the end)
        self._lock = threading.Lock()
        self._err = threading.Thread(target=self._read_stderr, daemon=True, name="vaeanomaly-worker-stderr")
        self._out = threading.Thread(target=self._read_events, daemon=True, name="vaeanomaly-worker-events")
        self._err.start()
        self._out.start()

    def alive(self) -> bool:
        return not self.gone.is_set() and self.proc.poll() is None

    def busy(self) -> bool:
        return self.current is not None

    def submit(self, ticket: Ticket) -> None:
        with self._lock:
            ticket.worker = self
            for line in self.stray:  # what the worker said while starting belongs to its first job
                ticket.events.put(("line", line))
            self.stray.clear()
            ended = self.gone.is_set()  # checked under the lock the events thread sets it under: no gap
            if not ended:
                self.current = ticket
        if ended:
            self._ended(ticket, self.proc.returncode)
            return
        self._send({"id": ticket.id, "request": ticket.request})

    def _send(self, obj) -> None:
        try:
            self.proc.stdin.write(json.dumps(obj) + "\n")
            self.proc.stdin.flush()
        except (OSError, ValueError):
            pass  # the worker is gone: the events thread tells the job

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            line = line.rstrip("\n")
            with self._lock:
                if self.current is not None:
                    self.current.events.put(("line", line))
                else:
                    self.stray.append(line)

    def _read_events(self) -> None:
        for raw in self.proc.stdout:
            try:
                ev = json.loads(raw)
                if not isinstance(ev, dict):
                    raise ValueError
            except ValueError:
                with self._lock:
                    self.stray.append(raw.rstrip("\n"))
                continue
            if ev.get("event") == "ready":
                self.pid = ev.get("pid")
                self.ready.set()
                continue
            with self._lock:
                t = self.current if self.current is not None and self.current.id == ev.get("id") else None
            if t is None:
                continue
            if "started" in ev:
                t.accepted = True
            elif "line" in ev:
                t.events.put(("line", str(ev["line"])))
            elif "maps" in ev:
                t.events.put(("maps", ev.get("mask_source")))
            elif "done" in ev:
                with self._lock:
                    self.current = None
                    self.jobs += 1
                t.events.put(("done", int(ev["done"]), ev))
                t.done.set()
                _released(self)
        # end of stdout: the worker ended (quit, killed, crashed); its last stderr lines first
        self._err.join(2)
        rc = _reap(self.proc, 5.0)  # polling, never a blocking wait: that would make poll() elsewhere say None
        if rc is None:  # stdout closed but the process lingers: stop it
            kill_process_tree(self.proc, CANCEL_GRACE)
            rc = _reap(self.proc, 2.0)
        with self._lock:
            t, self.current = self.current, None
            self.gone.set()
        if t is not None:
            self._ended(t, rc)

    def _ended(self, t: Ticket, rc: Optional[int]) -> None:
        """This worker ended while `t` was its job."""
        with _pool_lock:  # a cancel decides under this lock too: never a retry after it
            retry = not t.accepted and not t.retried and not t.cancelled
            if retry:  # it died before reading the job (e.g. killed while idle, just before the job came):
                t.retried = True  # the job goes to a fresh worker, once
                t.events.put(("retry", rc))
                try:
                    submit(self.launcher, t)
                    return
                except Exception as err:  # noqa: BLE001  (cannot start another: the job fails with the reason)
                    t.events.put(("line", f"vaeanomaly: error: cannot start the scoring process: {err}"))
        t.events.put(("died", rc))
        t.done.set()

    def kill(self) -> None:
        """The whole process tree, now (cancel)."""
        self.retiring = True
        kill_process_tree(self.proc, CANCEL_GRACE)
        _reap(self.proc, 2.0)
        self._close_pipes()

    def quit(self) -> None:
        """Ask an idle worker to exit (it also exits when its stdin closes)."""
        self.retiring = True
        self._send({"quit": True})
        try:
            self.proc.stdin.close()
        except (OSError, ValueError):
            pass

    def _close_pipes(self) -> None:
        try:
            self.proc.stdin.close()
        except (OSError, ValueError):
            pass


# ----------------------------------------------------------------------------- the session's workers
_workers: list = []
_pool_lock = threading.RLock()
_hooks_installed = False


def submit(launcher: Optional[str], ticket: Ticket) -> Worker:
    """Give the job to an idle, live worker of this launcher, or to a new one."""
    launcher = launcher or python_executable()
    with _pool_lock:
        _install_shutdown_hooks()
        _prune()
        w = next((w for w in _workers if w.launcher == launcher and not w.busy() and not w.retiring
                  and w.alive()), None)
        if w is None:
            w = Worker(launcher)
            _workers.append(w)
        w.submit(ticket)
        return w


def prestart(launcher: Optional[str] = None) -> Worker:
    """Start this launcher's worker now (e.g. when the module opens), so the first Apply finds it warm."""
    launcher = launcher or python_executable()
    with _pool_lock:
        _install_shutdown_hooks()
        _prune()
        w = next((w for w in _workers if w.launcher == launcher and not w.retiring and w.alive()), None)
        if w is None:
            w = Worker(launcher)
            _workers.append(w)
        return w


def discard(worker: Worker) -> None:
    """Kill a worker's process tree and forget it; the next job starts a fresh worker."""
    with _pool_lock:
        if worker in _workers:
            _workers.remove(worker)
    worker.kill()


def cancel(ticket: Ticket) -> None:
    """Stop a job: its worker's whole process tree is killed (a job never shares a worker), and the job is
    not given to another worker (as a job whose worker died before reading it would be)."""
    with _pool_lock:
        ticket.cancelled = True
        w = ticket.worker
        if w is None or ticket.done.is_set():
            return
        with w._lock:  # the events thread frees the worker under this lock before it sets `done`
            if w.current is not ticket:  # the job just finished: the worker may run another client's job
                return
        if w in _workers:
            _workers.remove(w)
    w.kill()


def workers() -> list:
    """The live workers of this session (for tests and diagnostics)."""
    with _pool_lock:
        _prune()
        return list(_workers)


def _prune() -> None:
    for w in list(_workers):
        if not w.alive():
            _workers.remove(w)


def _released(worker: Worker) -> None:
    """A job ended: keep one idle worker per launcher; a second idle one quits."""
    with _pool_lock:
        others = [w for w in _workers if w is not worker and w.launcher == worker.launcher and w.alive()
                  and not w.busy() and not w.retiring]
        if others and worker in _workers:
            _workers.remove(worker)
            worker.quit()


def shutdown(timeout: float = 2.0) -> None:
    """Stop every worker: ask them to quit, then kill whatever is left after `timeout` seconds."""
    with _pool_lock:
        ws, _workers[:] = list(_workers), []
    for w in ws:
        if w.busy():
            w.kill()
        else:
            w.quit()
    deadline = time.monotonic() + timeout
    for w in ws:
        _reap(w.proc, max(0.0, deadline - time.monotonic()))
        if w.proc.poll() is None or os.name == "posix":
            kill_process_tree(w.proc, CANCEL_GRACE)  # a launcher's children too, even when it exited


def _install_shutdown_hooks() -> None:
    """atexit always; inside the Slicer application also its aboutToQuit signal (Slicer's own modules
    connect it this way: Modules/Scripted/DICOMLib/DICOMBrowser.py `slicer.app.connect("aboutToQuit()", ...)`)."""
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(shutdown)
    try:
        import slicer
    except ImportError:
        return
    app = getattr(slicer, "app", None)  # absent in the headless MRML layer (slicer-core) and the web viewer
    if app is None:
        return
    try:
        app.connect("aboutToQuit()", shutdown)
    except Exception as err:  # noqa: BLE001  (atexit still stops the workers)
        print(f"VAEAnomaly: could not connect the worker shutdown to aboutToQuit ({err}); "
              f"it runs at exit instead", file=sys.stderr)
