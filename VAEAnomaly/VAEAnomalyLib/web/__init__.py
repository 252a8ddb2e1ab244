"""A browser viewer for the VAEAnomaly workflow, built on Kitware's trame-slicer (optional extra `[web]`).

The application owns its command: `vaeanomaly-web` (a console script of this package, `main` below; also
`python -m VAEAnomalyLib.web`). The core library `vaeanomaly` never imports this package. The page drives
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


def build_parser():
    import argparse
    ap = argparse.ArgumentParser(
        prog="vaeanomaly-web", description="Serve the Slicer panel's workflow as a web page (trame-slicer; needs "
                                           "pip install \".[web]\"). Scoring from the command line: vaeanomaly score.")
    ap.add_argument("volumes", nargs="*", metavar="VOLUME",
                    help="3D volume files (NIfTI, NRRD, MHA) to load; the page reads no other server files")
    ap.add_argument("--mask", help="brain mask label map on the first volume's grid")
    ap.add_argument("--port", type=int, default=8080, help="port (0: any free port)")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to bind; anything but 127.0.0.1/localhost lets others on that network use it")
    ap.add_argument("--apply", action="store_true", help="score the first volume with the default model on start")
    ap.add_argument("--max-upload-mb", type=float, default=512, help="largest volume the page accepts as an upload")
    ap.add_argument("--open-browser", action="store_true", help="open the page in this machine's browser")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an unexpected error")
    return ap


def main(argv=None) -> int:
    """The `vaeanomaly-web` console script."""
    import sys
    a = build_parser().parse_args(argv)
    try:
        return cmd_web(a)
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # noqa: BLE001  (one line; the traceback with --debug)
        if a.debug:
            raise
        print(f"vaeanomaly-web: error: {type(err).__name__}: {err} (run again with --debug for the traceback)",
              file=sys.stderr)
        return 1


def cmd_web(a) -> int:
    """`vaeanomaly-web`'s work, on parsed arguments (build_parser)."""
    import sys
    from pathlib import Path
    ok, why = web_available()
    if not ok:
        print(f"vaeanomaly-web: error: {why}", file=sys.stderr)
        return 2
    if a.host not in LOCAL_HOSTS:
        print(f"vaeanomaly-web: warning: serving on {a.host}: anyone who can reach this address can use the viewer, "
              f"upload volumes and run computations on this machine (there is no login)", file=sys.stderr)
    for f in list(a.volumes) + ([a.mask] if a.mask else []):
        if not Path(f).is_file():
            print(f"vaeanomaly-web: error: '{f}' is not a file (the web viewer loads volume files)", file=sys.stderr)
            return 2
    if a.apply and not a.volumes:
        print("vaeanomaly-web: error: --apply needs a VOLUME", file=sys.stderr)
        return 2
    from .app import serve
    return serve(a.volumes, a.mask, port=a.port, host=a.host, apply=a.apply, max_upload_mb=a.max_upload_mb,
                 open_browser=a.open_browser)
