"""The dashboard in a real headless browser: Debian's chromium driven by Playwright (both installed by .ci/run).

Starts ``workbench dashboard`` on a free localhost port over a tiny UniMatch run (default capture) and an older,
damaged copy of it, then checks that the page opens on the most recently updated run, computes the t-SNE of its
captured features, switches run and step, filters, reads the curves and per-class tabs, watches a new capture
appear, and checks that a truncated capture file shows a message. Screenshots go to reports/dashboard/ (PNG files
are git-ignored); when ``WORKBENCH_SCREENSHOTS`` names a directory, ``dashboard_first_page.png`` and
``dashboard_tsne.png`` are saved there too.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from browser import CHROMIUM, CHROMIUM_ARGS, browser_missing, free_port, stop_process, wait_http

from workbench.config import config_from_dict
from workbench.engine.rundir import RunDir
from workbench.engine.trainer import train

from conftest import tiny_config_dict

pytestmark = pytest.mark.slow  # a real server and a real browser

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "reports" / "dashboard"




@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data) -> Path:
    """runs/uni (4 steps, every step captured, default capture otherwise) and runs/uni_b, a copy whose step-2
    capture is truncated and whose files are dated an hour earlier (so uni is the most recently updated run)."""
    out = tmp_path_factory.mktemp("e2e") / "runs"
    train(config_from_dict(tiny_config_dict(out, tiny_data, name="uni", **{
        "method.name": "unimatch", "train.capture_every": 1})))
    shutil.copytree(out / "uni", out / "uni_b")
    f = out / "uni_b" / "artifacts" / "step_0000002.pt"
    f.write_bytes(f.read_bytes()[:1000])
    old = time.time() - 3600
    for p in (out / "uni_b").rglob("*"):
        os.utime(p, (old, old))
    return out


def screenshot_dir() -> Path | None:
    """The directory named by ``WORKBENCH_SCREENSHOTS`` (created), or None when the variable is unset/empty."""
    name = os.environ.get("WORKBENCH_SCREENSHOTS")
    if not name:
        return None
    d = Path(name)
    d.mkdir(parents=True, exist_ok=True)
    return d



def test_dashboard_in_headless_chromium(runs, tiny_data, tmp_path):
    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    arts = RunDir(runs / "uni").load_artifacts(4)
    batch = arts["x_w"].shape[0]
    keep = arts["ignore"] == 0
    cls = 1  # the class filter keeps samples whose GT or pseudo-label (non-padding pixels) contains it
    with_cls = sum(bool(((arts["y_u"][i] == cls) & keep[i]).any() or ((arts["pseudo"][i] == cls) & keep[i]).any())
                   for i in range(batch))
    valid = keep & (arts["y_u"] != 255)
    errors_by_hand = [float((arts["pseudo"][i] != arts["y_u"][i])[valid[i]].float().mean()) for i in range(batch)]
    class_name = json.loads((tiny_data / "manifest.json").read_text())["class_names"][cls]

    SHOTS.mkdir(parents=True, exist_ok=True)
    extra_shots = screenshot_dir()
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    log = tmp_path / "server.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    with open(log, "w") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "workbench", "dashboard", str(runs), "--port", str(port)],
                                cwd=REPO, env=env, stdout=logf, stderr=subprocess.STDOUT)
    try:
        wait_http(url, proc, log, "the dashboard server")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1500, "height": 1000})
                page.set_default_timeout(120000)
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(url)
                samples = page.locator(".wb-sample")
                page.get_by_text("uni · step 4 · 4 of 4 samples").wait_for()  # the most recently updated run
                assert samples.count() == batch
                assert page.locator(".wb-run select").input_value() == "uni"
                if extra_shots:
                    page.screenshot(path=str(extra_shots / "dashboard_first_page.png"), full_page=True)

                # the t-SNE of the default capture's features
                page.locator(".bk-tab", has_text="t-SNE").click()
                page.get_by_role("button", name="Compute t-SNE of this step").click()
                page.locator(".wb-tsne img").wait_for()
                assert page.locator(".wb-tsne-pane .wb-error").count() == 0
                page.screenshot(path=str(SHOTS / "tsne.png"), full_page=True)
                if extra_shots:
                    page.screenshot(path=str(extra_shots / "dashboard_tsne.png"), full_page=True)
                page.locator(".bk-tab", has_text="Gallery").click()

                page.locator(".wb-step select").select_option(label="step 2 (epoch 0)")
                page.get_by_text(f"uni · step 2 · {batch} of {batch} samples").wait_for()
                assert samples.count() == batch
                page.locator(".wb-step select").select_option(label="step 4 (epoch 0)")
                page.locator(".wb-class select").select_option(label=class_name)
                page.get_by_text(f"uni · step 4 · {with_cls} of {batch} samples containing {class_name}").wait_for()
                assert samples.count() == with_cls
                page.locator(".wb-class select").select_option(label="all classes")
                page.locator(".wb-order select").select_option(label="pseudo-label error (worst first)")
                page.get_by_text("sorted by pseudo-label error (worst first)").wait_for()
                shown = [int(i) for i in page.locator(".wb-gallery-pane .wb-sample").evaluate_all(
                    "els => els.map(e => e.dataset.index)")]
                assert shown == sorted(range(batch), key=lambda i: (-errors_by_hand[i], i))
                page.screenshot(path=str(SHOTS / "gallery.png"), full_page=True)

                page.locator(".bk-tab", has_text="Curves").click()
                page.locator(".wb-curves img").first.wait_for()
                page.screenshot(path=str(SHOTS / "curves.png"), full_page=True)
                page.locator(".bk-tab", has_text="Per-class quality").click()
                page.get_by_text("4 of 4 captured steps read").wait_for()
                page.screenshot(path=str(SHOTS / "per_class.png"), full_page=True)
                page.locator(".bk-tab", has_text="Gallery").click()

                # switch run; its step-2 file is truncated: a message, not a crash
                page.locator(".wb-run select").select_option("uni_b")
                page.get_by_text(f"uni_b · step 4 · {batch} of {batch} samples").wait_for()
                page.locator(".wb-step select").select_option(label="step 2 (epoch 0)")
                err = page.locator(".wb-gallery-pane .wb-error")
                err.wait_for()
                assert "could not read capture file step_0000002.pt" in err.inner_text()
                assert samples.count() == 0
                page.screenshot(path=str(SHOTS / "corrupt_capture.png"), full_page=True)
                page.locator(".wb-step select").select_option(label="step 3 (epoch 0)")
                page.get_by_text(f"uni_b · step 3 · {batch} of {batch} samples").wait_for()
                assert samples.count() == batch

                # a running training appends a capture: it appears without reloading the page
                RunDir(runs / "uni_b").save_artifacts(5, 1, {k: v.clone() for k, v in arts.items()})
                page.locator(".wb-step select option", has_text="step 5 (epoch 1)").wait_for(state="attached")
                page.locator(".wb-step select").select_option(label="step 5 (epoch 1)")
                page.get_by_text(f"uni_b · step 5 · {batch} of {batch} samples").wait_for()
                assert samples.count() == batch
                assert not errors, errors
            finally:
                browser.close()
    finally:
        stop_process(proc)
