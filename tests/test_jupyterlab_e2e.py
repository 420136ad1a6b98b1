"""A step-through notebook in a real JupyterLab: Debian's chromium driven by Playwright (both installed by .ci/run).

Starts ``jupyter lab`` headless (no browser, a free localhost port, a token, a temporary root folder), opens a copy of
``notebooks/10_maskmatch.ipynb`` whose parameters papermill's way point at the tiny test dataset (a tiny model, a
batch of two), runs every cell from JupyterLab's Run menu, waits for the widgets, then moves a slider (the image of
the patch-mask figure) and a dropdown (the LCR mask strategy) and checks that each figure was redrawn with other
pixels. The notebook still resolves its paths through workbench.paths (the kernel starts in the temporary folder,
outside the project: the checkout holding the package is the project root).

Screenshots of JupyterLab (the executed notebook, then after moving the widgets) go to the folder named by
``WORKBENCH_SCREENSHOTS`` when set (``reports/screenshots/`` keeps the committed ones), else to pytest's tmp folder.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from browser import CHROMIUM, CHROMIUM_ARGS, browser_missing, free_port, stop_process, wait_http
from papermill.iorw import load_notebook_node
from papermill.parameterize import parameterize_notebook

from workbench.runs import flatten

from conftest import tiny_config_dict

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "10_maskmatch.ipynb"
VIEWPORT = {"width": 1280, "height": 900}
RUN_ALL_S = float(os.environ.get("WORKBENCH_E2E_RUN_S", 180))  # Run All, on 2 busy cores






def jupyterlab_missing() -> str | None:
    """Why JupyterLab cannot start here, or None."""
    try:
        import ipywidgets  # noqa: F401
        import jupyterlab  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed (pip install -e '.[test]')"
    return None


def tiny_notebook(folder: Path, data_root: Path) -> Path:
    """The MaskMatch step-through with papermill-injected parameters: the tiny dataset and model, two images per
    batch, tau 0 (every pixel confident), 8-pixel LCR patches drawn at random; widgets on."""
    flat = flatten(tiny_config_dict(folder, data_root))
    over = {k: v for k, v in flat.items() if k.startswith(("data.", "model.")) and k not in ("data.root", "data.split")}
    params = dict(data_root=str(data_root), split="1-4", overrides={**over, "data.batch_size": 2}, seed=1, tau=0.0,
                  patch=8, strategy="random", device="cpu", interactive=True)
    nb = parameterize_notebook(load_notebook_node(str(NOTEBOOK)), params)
    path = folder / NOTEBOOK.name
    nbformat.write(nb, str(path))
    return path


def lab_settings(folder: Path) -> Path:
    """A JupyterLab settings folder: every cell rendered (no windowing), no news prompt."""
    settings = folder / "settings"
    for plugin, values in {"@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
                           "@jupyterlab/apputils-extension/notification": {"fetchNews": "false",
                                                                            "checkForUpdates": False}}.items():
        package, name = plugin.rsplit("/", 1)
        f = settings / package / f"{name}.jupyterlab-settings"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(values))
    return settings



def shots_dir(tmp_path: Path) -> Path:
    d = Path(os.environ["WORKBENCH_SCREENSHOTS"]) if os.environ.get("WORKBENCH_SCREENSHOTS") else tmp_path / "shots"
    d.mkdir(parents=True, exist_ok=True)
    return d


def figure_src(box) -> str:
    """The data URL of the figure an explore() box shows (its Output widget's image)."""
    img = box.locator(".widget-output img").first
    img.wait_for()
    return img.get_attribute("src") or ""


def wait_redrawn(box, before: str, timeout: float = 60.0) -> str:
    t0 = time.time()
    while time.time() - t0 < timeout:
        imgs = box.locator(".widget-output img")
        if imgs.count():
            src = imgs.first.get_attribute("src") or ""
            if src and src != before:
                return src
        time.sleep(0.3)
    raise AssertionError("the figure was not redrawn after the widget moved")


def run_all(page, tries: int = 3) -> None:
    """Run > Run All Cells once the kernel is connected and idle; again if no cell started (a click that came
    before the kernel was ready)."""
    first_prompt = page.locator(".jp-CodeCell .jp-InputPrompt").first
    for _ in range(tries):
        page.locator("#jp-main-statusbar", has_text="Idle").wait_for()
        page.locator(".lm-MenuBar-item", has_text="Run").first.click()
        page.locator(".lm-Menu-item", has_text="Run All Cells").first.click()
        t0 = time.time()
        while time.time() - t0 < 20:
            if not re.fullmatch(r"\[\s*\]:?", first_prompt.inner_text().replace("\xa0", " ").strip() or "[]"):
                return
            time.sleep(0.3)
    raise AssertionError("Run All Cells started no cell")


def test_stepthrough_notebook_in_jupyterlab(tiny_data, tmp_path):
    reason = browser_missing() or jupyterlab_missing()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    root = tmp_path / "lab"
    root.mkdir()
    nb_path = tiny_notebook(root, tiny_data)
    shots = shots_dir(tmp_path)
    port, token = free_port(), secrets.token_hex(16)
    log = tmp_path / "lab.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               JUPYTERLAB_SETTINGS_DIR=str(lab_settings(tmp_path)), JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "ws"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), JUPYTER_PLATFORM_DIRS="1", OMP_NUM_THREADS="1")
    env.pop("WORKBENCH_ROOT", None)
    with open(log, "w") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1",
                                 f"--port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
                                 "--LabApp.news_url=None", *(["--allow-root"] if os.geteuid() == 0 else [])],
                                cwd=root, env=env, stdout=logf, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/api/status?token={token}", proc, log, "jupyter lab", timeout=120.0, request_timeout=30.0)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport=VIEWPORT)
                page.set_default_timeout(120000)
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(f"{base}/lab/tree/{nb_path.name}?token={token}")
                page.locator(".jp-Notebook .jp-Cell").first.wait_for()
                run_all(page)

                boxes = page.locator(".jp-OutputArea-output .widget-vbox")
                # the last cell's table (the step's loss terms) means every cell ran
                try:
                    page.locator("caption", has_text="loss terms").wait_for(timeout=RUN_ALL_S * 1000)
                except Exception:
                    page.screenshot(path=str(tmp_path / "run_all_failed.png"), full_page=True)
                    raise AssertionError(f"Run All did not finish in {RUN_ALL_S} s (screenshot {tmp_path}/"
                                         f"run_all_failed.png); cell outputs:\n"
                                         f"{page.locator('.jp-OutputArea').all_inner_texts()}\n"
                                         f"server log:\n{log.read_text()[-2000:]}") from None
                assert boxes.count() == 4, f"{boxes.count()} explore() widgets"
                errs = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
                tracebacks = [t for t in errs.all_inner_texts() if "Error" in t]
                assert not tracebacks, tracebacks

                masks, lcr = boxes.nth(0), boxes.nth(3)
                masks.scroll_into_view_if_needed()
                src_masks = figure_src(masks)
                page.screenshot(path=str(shots / "jupyterlab_1_executed.png"))

                # slider: the image of the patch-mask figure, 0 -> 1 (the keyboard moves the noUiSlider handle)
                slider = masks.locator(".widget-slider").first
                assert "image" in slider.inner_text()
                slider.locator(".noUi-handle").first.focus()
                page.keyboard.press("ArrowRight")
                slider.locator(".widget-readout", has_text="1").wait_for()
                wait_redrawn(masks, src_masks)
                page.screenshot(path=str(shots / "jupyterlab_2_slider_moved.png"))

                # dropdown: the LCR mask strategy, random -> grid
                lcr.scroll_into_view_if_needed()
                src_lcr = figure_src(lcr)
                lcr.locator(".widget-dropdown select").select_option("grid")
                wait_redrawn(lcr, src_lcr)
                lcr.scroll_into_view_if_needed()
                page.screenshot(path=str(shots / "jupyterlab_3_dropdown_moved.png"))
                assert not errors, errors
            finally:
                browser.close()
    finally:
        stop_process(proc, grace=30.0)
    # the notebook ran in the temporary folder: nothing was written next to the tracked notebooks
    assert not (REPO / "notebooks" / "data").exists() and not (REPO / "notebooks" / "runs").exists()
