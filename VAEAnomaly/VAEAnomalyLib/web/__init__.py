"""A browser viewer for the VAEAnomaly workflow, built on Kitware's trame-slicer (optional extra `[web]`).

`vaeanomaly web` imports this package lazily; the core library `vaeanomaly` never imports it. The page drives
the same `PanelController` and `VAEAnomalyLogic` as the Slicer module (VAEAnomalyLib.controller / .logic):
this package only renders their state and forwards the user's actions.
"""
from __future__ import annotations


def web_available() -> tuple[bool, str]:
    """(True, "") when trame-slicer and its MRML layer import, else (False, why)."""
    try:
        import trame_slicer.core  # noqa: F401
        import trame.app  # noqa: F401
    except Exception as err:  # ImportError, or a broken binary wheel
        return False, (f"the web viewer needs the optional extra: pip install \".[web]\" ({type(err).__name__}: {err})")
    return True, ""


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def cmd_web(a) -> int:
    """`vaeanomaly web`'s work; vaeanomaly.cli defines the subcommand's arguments and calls this when it runs."""
    import sys
    from pathlib import Path
    ok, why = web_available()
    if not ok:
        print(f"vaeanomaly: error: {why}", file=sys.stderr)
        return 2
    if a.host not in LOCAL_HOSTS:
        print(f"vaeanomaly: warning: serving on {a.host}: anyone who can reach this address can use the viewer, "
              f"upload volumes and run computations on this machine (there is no login)", file=sys.stderr)
    for f in list(a.volumes) + ([a.mask] if a.mask else []):
        if not Path(f).is_file():
            print(f"vaeanomaly: error: '{f}' is not a file (the web viewer loads volume files)", file=sys.stderr)
            return 2
    if a.apply and not a.volumes:
        print("vaeanomaly: error: --apply needs a VOLUME", file=sys.stderr)
        return 2
    from .app import serve
    return serve(a.volumes, a.mask, port=a.port, host=a.host, apply=a.apply, max_upload_mb=a.max_upload_mb,
                 open_browser=a.open_browser)
