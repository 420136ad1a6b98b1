"""``workbench dashboard``: the server, started before the heavy imports so that the first page appears early.

The dashboard itself (:mod:`workbench.dashboard.app`) needs torch, matplotlib and the rest of the package, seconds of
imports. :func:`serve` imports only Panel, starts importing the app in a background thread and listens at once; a
session's page is first a light placeholder, which the browser loads (Panel's scripts) while the imports finish;
once the page is shown (``pn.state.onload``) the dashboard is built and takes the placeholder's place.
"""
from __future__ import annotations

import importlib
import sys
import threading
import traceback
from pathlib import Path

import panel as pn

APP_MODULE = "workbench.dashboard.app"
LOADING_HTML = '<div class="wb-loading" style="padding: 12px; color: #555">loading the dashboard...</div>'


def _import_app() -> None:
    """Import the dashboard module (run in a background thread while the server starts)."""
    try:
        importlib.import_module(APP_MODULE)
    except Exception:
        traceback.print_exc(file=sys.stderr)


def session_page(runs_dir: Path, refresh_ms: int | None) -> pn.Column:
    """One browser session: a placeholder now, replaced by :func:`~workbench.dashboard.app.build_app` once the page
    is loaded (at once outside a server). An error while building shows in the page."""
    root = pn.Column(pn.pane.HTML(LOADING_HTML), sizing_mode="stretch_width")

    def fill() -> None:
        try:
            app = importlib.import_module(APP_MODULE)
            root.objects = [app.build_app(runs_dir, refresh_ms)]
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            root.objects = [pn.pane.Alert(f"the dashboard could not start: {type(e).__name__}: {e}",
                                          alert_type="danger")]

    pn.state.onload(fill)
    return root


def serve(runs_dir: Path, port: int = 5006, address: str = "127.0.0.1", show: bool = False,
          refresh_ms: int = 2000) -> None:
    """Serve the dashboard at ``http://{address}:{port}/`` until interrupted (one app instance per session).

    Binds to localhost by default; any other address makes the page reachable from other machines (the server
    accepts websocket connections for any host name then).
    """
    runs_dir = Path(runs_dir)
    if runs_dir.exists() and not runs_dir.is_dir():
        raise ValueError(f"runs_dir {runs_dir} is a file, expected a directory of runs")
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"port must be in [0, 65535], got {port}")
    local = address in ("127.0.0.1", "localhost", "::1")
    origins = sorted({f"{address}:{port}", f"localhost:{port}", f"127.0.0.1:{port}"}) if local else ["*"]
    if APP_MODULE not in sys.modules:
        threading.Thread(target=_import_app, name="dashboard-imports", daemon=True).start()
    print(f"workbench dashboard: serving {runs_dir.resolve()} at http://{address}:{port}/", flush=True)
    pn.serve(lambda: session_page(runs_dir, refresh_ms), port=int(port), address=address, show=show,
             websocket_origin=origins, title="workbench dashboard", threaded=False, start=True)
