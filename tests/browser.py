"""What the real-browser tests share: Debian's chromium driven by Playwright (never `playwright install`: .ci/run
installs the Debian package), the reason to skip when it cannot run here, and a free local port."""
from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def browser_missing() -> str | None:
    """Why the browser cannot run here, or None."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} not found (.ci/run installs Debian's chromium: apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Python playwright is not installed (pip install -e '.[test]')"
    return None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, what: str, timeout: float = 240.0,
              request_timeout: float = 60.0) -> None:
    """Poll ``url`` until it answers 200; AssertionError with the server's log tail when ``proc`` (``what``) exits
    or ``timeout`` seconds pass (a first page can take long on a loaded machine)."""
    t0 = time.time()
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=request_timeout) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.time() - t0 > timeout:
            raise AssertionError(f"no answer from {url} after {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Terminate a server started by a test; kill it when it has not exited after ``grace`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
