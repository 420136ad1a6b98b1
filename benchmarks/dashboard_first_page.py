"""How long ``workbench dashboard RUNS`` takes to show its first page, from the command's start.

Each repetition starts the command in a fresh process (``python -P -m workbench dashboard RUNS --port P``), notes when
its port accepts connections (``listen_s``: imports and server start) and then, in Debian's headless chromium driven
by Playwright (launched before the clock starts), opens the page and waits until the status line and the gallery
pane show their content (``first_page_s``: the session's first render, its transfer and the browser's layout,
counted from the command's start: what a user waits). Without chromium/Playwright only the HTML document is
fetched (``html_s``). ``server_cpu_s`` is the CPU time the server process used until then: on a shared machine the
wall-clock times grow with the load, the CPU time much less.

Several code checkouts can be compared on the same runs, interleaved repetition by repetition (a shared machine's
load then hits both alike): ``--code LABEL=PATH`` puts PATH first on PYTHONPATH for that label.

    git archive <old-commit> | tar -x -C /tmp/before          # the code before the change
    python benchmarks/dashboard_first_page.py --runs runs --repeats 5 \\
        --code before=/tmp/before --code after=. --out reports/bench/dashboard_first_page

Writes ``<out>.json`` (every repetition) and ``<out>.md`` (median, min-max per label). ``--cwd`` is where the
command runs (relative ``data.root`` paths of the runs' configs resolve from there; default the repository root).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
#: in <out>.md, the text after this line (written by hand: what the numbers mean) is kept when the table is rewritten
NOTES = "<!-- notes (kept when the benchmark rewrites the table above) -->"
#: the first page is there when the status line names the runs and the gallery pane shows samples or a note
READY = (".wb-status .wb-note", ".wb-gallery-pane .wb-sample, .wb-gallery-pane .wb-note, "
         ".wb-gallery-pane .wb-error")


def free_port() -> int:
    """A free localhost TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def browser() -> tuple[object, object] | None:
    """(playwright, chromium browser) when both are installed, else None."""
    if not CHROMIUM.exists():
        return None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    pw = sync_playwright().start()
    return pw, pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds process ``pid`` has used so far (Linux /proc; None elsewhere): a measure of the
    server's work that a loaded machine does not inflate the way it inflates wall-clock time."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 2)


def wait_listen(port: int, proc: subprocess.Popen, timeout: float) -> None:
    """Return once ``port`` accepts connections; RuntimeError when the server exits or ``timeout`` passes."""
    end = time.perf_counter() + timeout
    while time.perf_counter() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the dashboard exited with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} not open after {timeout} s")


def one(runs: Path, code: Path, cwd: Path, chrome: object | None, timeout: float) -> dict:
    """One repetition: start the dashboard on ``runs`` with ``code`` first on PYTHONPATH; seconds to listen and to
    the first page (browser) or the HTML document (no browser)."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    log = tempfile.TemporaryFile()
    t0 = time.perf_counter()
    # -P: the working directory is not put on sys.path (a checkout there must not shadow ``code``)
    proc = subprocess.Popen([sys.executable, "-P", "-m", "workbench", "dashboard", str(runs), "--port", str(port)],
                            cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    rec: dict = {"load1": round(os.getloadavg()[0], 2)}
    try:
        wait_listen(port, proc, timeout)
        rec["listen_s"] = round(time.perf_counter() - t0, 3)
        url = f"http://127.0.0.1:{port}/"
        if chrome is None:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                r.read()
            rec["html_s"] = round(time.perf_counter() - t0, 3)
            rec["server_cpu_s"] = cpu_seconds(proc.pid)
        else:
            page = chrome.new_page(viewport={"width": 1500, "height": 1000})
            try:
                page.set_default_timeout(timeout * 1000)
                page.goto(url)
                for sel in READY:
                    page.locator(sel).first.wait_for()
                rec["first_page_s"] = round(time.perf_counter() - t0, 3)
                rec["server_cpu_s"] = cpu_seconds(proc.pid)
                rec["run_shown"] = page.locator(".wb-run select").input_value()
            finally:
                page.close()
    except Exception:
        log.seek(0)
        sys.stderr.write(log.read().decode(errors="replace")[-3000:])
        raise
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
    return rec


def summary(values: list[float]) -> dict:
    """Median, min, max and count of ``values``."""
    return {"median": round(statistics.median(values), 3), "min": min(values), "max": max(values),
            "n": len(values)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=Path, default=REPO / "runs", help="runs directory the dashboard opens")
    p.add_argument("--code", action="append", default=[], metavar="LABEL=PATH",
                   help="a checkout to measure (repeatable; default now=<this repository>)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cwd", type=Path, default=REPO, help="where the command runs (relative data roots)")
    p.add_argument("--timeout", type=float, default=180.0)
    p.add_argument("--no-browser", action="store_true", help="time the HTML document only")
    p.add_argument("--out", type=Path, default=REPO / "reports" / "bench" / "dashboard_first_page")
    a = p.parse_args()
    if a.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    codes = []
    for item in a.code or [f"now={REPO}"]:
        label, sep, path = item.partition("=")
        if not sep or not label or not Path(path).is_dir():
            raise SystemExit(f"--code {item!r}: expected LABEL=PATH with PATH a directory")
        codes.append((label, Path(path).resolve()))
    if not a.runs.is_dir():
        raise SystemExit(f"--runs {a.runs}: not a directory")
    started = None if a.no_browser else browser()
    chrome = started[1] if started else None
    reps: dict[str, list[dict]] = {label: [] for label, _ in codes}
    try:
        for r in range(a.repeats):  # interleaved: repetition r of every label, then r + 1
            for label, path in codes:
                rec = one(a.runs.resolve(), path, a.cwd.resolve(), chrome, a.timeout)
                reps[label].append(rec)
                print(f"{label} #{r}: {rec}", flush=True)
    finally:
        if started:
            started[1].close()
            started[0].stop()
    key = "html_s" if chrome is None else "first_page_s"
    argv = " ".join(["python", "benchmarks/dashboard_first_page.py", *sys.argv[1:]])
    runs = sorted(str(d.parent.relative_to(a.runs)) for d in a.runs.rglob("metrics.jsonl"))
    res = {"command": argv, "measure": key, "browser": str(CHROMIUM) if chrome else None, "runs_dir": str(a.runs),
           "runs": runs, "cpus": os.cpu_count(), "python": sys.version.split()[0],
           "labels": {label: {"code": str(path), "listen_s": summary([x["listen_s"] for x in reps[label]]),
                              key: summary([x[key] for x in reps[label]]),
                              "server_cpu_s": summary([x["server_cpu_s"] for x in reps[label]
                                                       if x.get("server_cpu_s") is not None] or [math.nan]),
                              "repetitions": reps[label]}
                      for label, path in codes}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    what = "first page in the browser" if chrome else "HTML document"
    lines = [f"# `workbench dashboard`: seconds from the command's start to the {what}", "",
             f"Command: `{argv}`. Runs directory: {len(runs)} run(s). {a.repeats} repetition(s) per label, "
             "interleaved, each in a fresh process; median (min-max).", "",
             f"| label | port open (s) | {what} (s) | server CPU until then (s) | 1-min load average |",
             "|---|---|---|---|---|"]
    for label, _ in codes:
        d = res["labels"][label]
        loads = [x["load1"] for x in reps[label]]
        cpu = d["server_cpu_s"]
        cells = [f"{x['median']:.2f} ({x['min']:.2f}-{x['max']:.2f})" for x in (d["listen_s"], d[key], cpu)]
        lines.append(f"| {label} | {' | '.join(cells)} | {min(loads):.1f}-{max(loads):.1f} |")
    md = a.out.with_suffix(".md")
    notes = md.read_text().partition(NOTES)[2] if md.is_file() and NOTES in md.read_text() else ""
    md.write_text("\n".join(lines) + "\n" + (f"\n{NOTES}{notes}" if notes else ""))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
