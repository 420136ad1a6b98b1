"""Every notebook in notebooks/ runs under papermill (through ``workbench report``) on tiny parameters, and its
executed copy holds the expected figures (image/png outputs) and tables, not only a clean exit."""
import ast
import base64
import json
import re
import shutil
from pathlib import Path

import nbformat
import pytest
from papermill.inspection import inspect_notebook

from workbench.config import config_from_dict
from workbench.engine.trainer import train
from workbench.paths import ENV, describe_root, project_path, project_root, require_dir, require_run
from workbench.report import NOTEBOOKS, ReportError, report_name, resolve_notebook, run_report
from workbench.runs import flatten
from workbench.viz.notebook import strip_notebook, strip_notebooks

from conftest import tiny_config_dict

REPO = Path(__file__).resolve().parents[1]

TESTED = {"00_quickstart", "01_train", "10_maskmatch", "11_s4mim", "12_scalematch", "13_corrmatch", "14_rankmatch",
          "20_pseudo_label_quality", "21_feature_space", "30_compare_runs"}


@pytest.fixture(scope="session")
def tiny_runs(tiny_data, tmp_path_factory) -> Path:
    """A runs directory with a tiny UniMatch run (captures at steps 2 and 4) and a tiny supervised run."""
    runs = tmp_path_factory.mktemp("nb") / "runs"
    for name, method in (("tiny-unimatch", "unimatch"), ("tiny-supervised", "supervised")):
        cfg = tiny_config_dict(runs, tiny_data, name=name, **{"method.name": method, "train.capture_every": 2,
                                                             "train.eval_every": 2})
        train(config_from_dict(cfg))
    return runs


def outputs(path: Path) -> dict:
    """Outputs of an executed notebook by kind: PNG images (decoded), HTML, Markdown, stdout; plus errors."""
    nb = nbformat.read(str(path), as_version=4)
    out = {"png": [], "html": [], "markdown": [], "stdout": "", "errors": []}
    for cell in nb.cells:
        for o in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if o.output_type == "error":
                out["errors"].append(f"{o.ename}: {o.evalue}")
            elif o.output_type == "stream":
                out["stdout"] += o.text  # stdout and stderr (warnings) in order
            else:
                data = o.get("data", {})
                if "image/png" in data:
                    out["png"].append(base64.b64decode(data["image/png"]))
                out["html"] += [data["text/html"]] if "text/html" in data else []
                out["markdown"] += [data["text/markdown"]] if "text/markdown" in data else []
    assert not out["errors"], out["errors"]
    assert all(p.startswith(b"\x89PNG") and len(p) > 2000 for p in out["png"])  # real, non-empty images
    return out


def table(html_outputs: list[str], caption: str) -> str:
    """The HTML table output with ``caption`` (a workbench.runs.Table)."""
    found = [h for h in html_outputs if f"<caption>{caption}" in h]
    assert found, f"no table {caption!r} among {len(html_outputs)} HTML outputs"
    return found[0]


def report(tmp_path: Path, notebook: str, **params) -> tuple[Path, dict]:
    """Run ``notebook`` through run_report with ``params`` (JSON values are YAML); its report dir and outputs."""
    entries = run_report(notebook, out=tmp_path / "reports", parameters=[f"{k}={json.dumps(v)}"
                                                                         for k, v in params.items()])
    assert len(entries) == 1 and entries[0].ok
    d = tmp_path / "reports" / report_name(resolve_notebook(notebook))
    return d, outputs(d / entries[0].notebook)


def test_every_notebook_is_tested_and_parametrised():
    found = {p.stem for p in NOTEBOOKS.glob("*.ipynb")}
    assert found == TESTED, "add a papermill test for each new notebook"
    for name in sorted(found):
        path = NOTEBOOKS / f"{name}.ipynb"
        nb = nbformat.read(str(path), as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code[0].metadata.get("tags") == ["parameters"], name
        assert all(not c.outputs and c.execution_count is None for c in code), f"{name} is stored with outputs"
        assert nb.metadata.kernelspec.name == "python3"
        assigned = {t.id for s in ast.parse(code[0].source).body for t in s.targets}
        assert set(inspect_notebook(str(path))) == assigned, f"papermill misreads a parameter of {name}"


def test_notebooks_are_stored_without_outputs():
    # what JupyterLab adds on save (outputs, counts, widget state, timings) must not reach the repository:
    # `make strip-notebooks` removes it
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(str(path), as_version=4)
        dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
        assert not dirty, f"{path.name}: cells {dirty} are stored with outputs or execution counts; run make strip-notebooks"
        extra = [(i, k) for i, c in enumerate(nb.cells) for k in c.metadata if k != "tags"]
        assert not extra, f"{path.name}: cell metadata {extra} (widget state, timings); run make strip-notebooks"
        assert set(nb.metadata) <= {"kernelspec", "language_info"}, f"{path.name}: metadata {sorted(nb.metadata)}"
    assert strip_notebooks(str(NOTEBOOKS), check=True) == []


def test_strip_notebook_removes_what_a_saved_run_adds(tmp_path):
    src = NOTEBOOKS / "20_pseudo_label_quality.ipynb"
    dirty = tmp_path / "nb.ipynb"
    nb = nbformat.read(str(src), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    code[1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="hello\n")]
    code[1].execution_count = 3
    code[1].metadata["execution"] = {"iopub.status.busy": "2024-01-01T00:00:00"}
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    nb.metadata["language_info"] = {"name": "python", "version": "3.11.7"}
    nbformat.write(nb, str(dirty))
    assert strip_notebook(str(dirty), check=True) and "hello" in dirty.read_text()  # check leaves the file
    assert strip_notebook(str(dirty)) is True
    assert dirty.read_text() == src.read_text()  # byte for byte the stored form
    assert strip_notebook(str(dirty)) is False


# -------------------------------------------------------------------------- paths resolve against the project root


@pytest.fixture
def no_root_env(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)


def fake_project(root: Path, name: str = "workbench") -> Path:
    """A folder that looks like a checkout: pyproject.toml naming ``name`` and a workbench/ package."""
    (root / "workbench").mkdir(parents=True)
    (root / "workbench" / "__init__.py").write_text("")
    (root / "pyproject.toml").write_text(f'[project]\nname = "{name}"\nversion = "0"\n')
    return root


def test_project_path_from_the_notebooks_folder(monkeypatch, no_root_env):
    monkeypatch.chdir(NOTEBOOKS)  # where JupyterLab starts a notebook's kernel
    assert project_root() == REPO
    assert project_path("runs/quickstart-unimatch-s0") == str(REPO / "runs" / "quickstart-unimatch-s0")
    assert project_path(Path("data/synthetic")) == REPO / "data" / "synthetic"  # a Path stays a Path
    assert project_path("/abs/runs") == "/abs/runs"
    assert project_path("~/x") == str(Path.home() / "x")
    assert project_path("") == "" and project_path(None) is None  # the notebooks' "not given"
    with pytest.raises(TypeError, match="str or a path"):
        project_path(3)


def test_project_root_walks_up_to_this_project_only(tmp_path, monkeypatch, no_root_env):
    proj = fake_project(tmp_path / "proj")
    (proj / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(proj / "a" / "b")
    assert project_root() == proj and project_path("runs") == str(proj / "runs")
    other = fake_project(tmp_path / "other", name="workbench-plugin")  # another project's pyproject.toml
    monkeypatch.chdir(other)
    assert project_root() == REPO  # the checkout holding the imported package
    assert "outside it" in describe_root()


def test_workbench_root_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(NOTEBOOKS)
    monkeypatch.setenv(ENV, str(tmp_path))
    assert project_root() == tmp_path.resolve() and project_path("runs") == str(tmp_path.resolve() / "runs")
    monkeypatch.setenv(ENV, str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=f"{ENV}=.*missing.* is not a directory"):
        project_root()


def test_missing_run_names_path_root_and_remedy(tmp_path, monkeypatch, no_root_env):
    monkeypatch.chdir(NOTEBOOKS)
    with pytest.raises(FileNotFoundError) as e:
        require_run("runs/no-such-run")
    msg = str(e.value)
    assert msg.startswith(f"run: {REPO / 'runs' / 'no-such-run'} does not exist")
    assert f"'runs/no-such-run' resolved against the project root {REPO}, found at or above the working " \
           f"directory {NOTEBOOKS}" in msg
    assert "make demo" in msg and "run=<a run directory>" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"run_a: .*empty is not a run directory \(no config.yaml\)\. Run"):
        require_run(str(tmp_path / "empty"), "run_a")
    with pytest.raises(ValueError, match="run is empty"):
        require_run("")
    with pytest.raises(FileNotFoundError, match="runs_dir: .*nowhere does not exist"):
        require_dir(str(tmp_path / "nowhere"), "runs_dir")
    assert require_dir(str(tmp_path), "runs_dir") == tmp_path


@pytest.mark.slow  # papermill: a real kernel
def test_quickstart_notebook(tmp_path, tiny_data):
    # the tiny dataset and one step of supervised-only keep it short
    from conftest import TINY_SPEC

    out = tmp_path / "reports" / "quickstart"
    d, o = report(tmp_path, "00_quickstart", iters=1, methods=["supervised"], seed=0, split="1-4",
                  synthetic=TINY_SPEC, data_root=str(tiny_data), runs=str(tmp_path / "runs"), out=str(out))
    assert d == out
    assert len(o["png"]) == 2  # predictions.png and curves.png
    assert any("| supervised |" in m for m in o["markdown"])
    per_class = table(o["html"], "final per-class IoU")
    assert "<th>background</th>" in per_class and "quickstart-supervised-s0" in per_class
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["methods"]) == ["supervised"] and summary["iters"] == 1
    page = (out / "00_quickstart.html").read_text()
    assert page.count("data:image/png;base64") >= 2 and "<table" in page
    assert 'href="00_quickstart.html"' in (out / "index.html").read_text()


@pytest.mark.slow  # papermill: a real kernel
def test_train_notebook(tmp_path, tiny_data):
    over = {k: v for k, v in flatten(tiny_config_dict(tmp_path, tiny_data)).items()
            if k not in ("name", "out_dir", "data.root", "data.split", "train.iters", "train.seed")}
    over["train.eval_every"] = 2
    d, o = report(tmp_path, "01_train", method="fixmatch", split="1-4", data_root=str(tiny_data), iters=4,
                  name="tiny-train", runs=str(tmp_path / "runs"), overrides=over, num_figure=3)
    summary = json.loads((tmp_path / "runs" / "tiny-train" / "summary.json").read_text())
    assert summary["finished"] and summary["steps"] == 4 and summary["method"] == "fixmatch"
    assert "tiny-train" in table(o["html"], "runs")
    assert len(o["png"]) == 3  # training curves, validation curves, predictions
    assert (d / "01_train.html").is_file()


@pytest.fixture
def from_notebooks_folder(monkeypatch):
    """Run with the working directory JupyterLab gives a kernel (notebooks/); nothing may appear there."""
    before = {p for p in NOTEBOOKS.rglob("*") if ".ipynb_checkpoints" not in p.parts}
    monkeypatch.chdir(NOTEBOOKS)
    yield
    after = {p for p in NOTEBOOKS.rglob("*") if ".ipynb_checkpoints" not in p.parts}
    assert after == before, f"written under notebooks/: {sorted(map(str, after - before))}"


@pytest.mark.slow  # papermill: a real kernel
def test_pseudo_label_quality_notebook(tmp_path, tiny_runs, tiny_data, monkeypatch, from_notebooks_folder):
    # started in notebooks/ (as JupyterLab does) with a path relative to the project root
    monkeypatch.setenv(ENV, str(tiny_runs.parent))
    _, o = report(tmp_path, "20_pseudo_label_quality", run="runs/tiny-unimatch", step=None, num_images=2)
    t = table(o["html"], "per-class pseudo-label quality at step 4")
    names = json.loads((tiny_data / "manifest.json").read_text())["class_names"]
    assert all(f"<td>{n}</td>" in t for n in names) and "<th>mining_ratio</th>" in t
    assert len(o["png"]) == 4  # diagnostics curves, per-class curves, per-class bars, example panel


@pytest.mark.slow  # papermill: a real kernel
def test_pseudo_label_quality_notebook_explains_a_missing_run(tmp_path, monkeypatch, from_notebooks_folder):
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(ReportError) as e:
        run_report("20_pseudo_label_quality", out=tmp_path / "reports", parameters=['run="runs/no-such-run"'])
    err = e.value.entries[0].error
    assert f"FileNotFoundError: run: {REPO / 'runs' / 'no-such-run'} does not exist" in err
    assert f"resolved against the project root {REPO}, found at or above the working directory {NOTEBOOKS}" in err
    assert "make demo" in err


@pytest.mark.slow  # papermill: a real kernel
def test_feature_space_notebook(tmp_path, tiny_runs):
    _, o = report(tmp_path, "21_feature_space", run_a=str(tiny_runs / "tiny-supervised"),
                  run_b=str(tiny_runs / "tiny-unimatch"), num_images=8, per_class=8, seed=0, device="cpu")
    t = table(o["html"], "sampled pixels per class")
    assert "<td>tiny-supervised</td>" in t and "<td>tiny-unimatch</td>" in t
    assert len(o["png"]) == 1


@pytest.mark.slow  # papermill: a real kernel
def test_compare_runs_notebook(tmp_path, tiny_runs):
    runs = tmp_path / "runs"
    shutil.copytree(tiny_runs, runs)
    shutil.copytree(runs / "tiny-unimatch", runs / "tiny-broken")
    (runs / "tiny-broken" / "summary.json").write_text('{"best": ')  # cut short
    _, o = report(tmp_path, "30_compare_runs", runs_dir=str(runs), pattern="tiny-*")
    # the unreadable run is named and skipped; the others are compared
    assert f"skipping run tiny-broken: {runs / 'tiny-broken' / 'summary.json'}: unreadable (JSONDecodeError" in o["stdout"]
    assert "tiny-broken" not in table(o["html"], "runs")
    assert "tiny-supervised" in table(o["html"], "runs") and "tiny-unimatch" in table(o["html"], "runs")
    ablation = table(o["html"], "ablation")
    assert "<th>method.name</th>" in ablation
    # across methods, settings that only come with a method (UniMatch's tau, missing from the supervised config)
    # leave the ablation table for one of their own: a row per setting, a column per method
    assert "<th>method.tau</th>" not in ablation
    settings = table(o["html"], "settings that come with each method")
    assert "<th>supervised</th><th>unimatch</th>" in settings and "<tr><td>method.tau</td><td>-</td><td>0.95" in settings
    assert "<th>background</th>" in table(o["html"], "per-class IoU")
    assert "config keys that differ between runs: ['method.name'" in o["stdout"]
    assert len(o["png"]) == 2


# ------------------------------------------------------------------- step-through notebooks (10, 13, 14)


def stepthrough_overrides(tmp: Path, data_root: Path) -> dict:
    """Data and model keys of the tiny config (32-pixel crops, a quarter-width model), two images per batch."""
    flat = flatten(tiny_config_dict(tmp, data_root))
    over = {k: v for k, v in flat.items() if k.startswith(("data.", "model.")) and k not in ("data.root", "data.split")}
    return {**over, "data.batch_size": 2}


def cells(html: str) -> dict[str, str]:
    """First two cells of every row of an HTML table: {first: second}."""
    return {a: b for a, b in re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td>", html)}


def loss_terms_add_up(html: str) -> int:
    """The "loss terms" table: the total row (the step's loss) is the sum of the weight x value column (three
    decimals shown per cell); returns the number of terms."""
    rows = [re.findall(r"<td>(.*?)</td>", r) for r in html.split("<tbody>")[1].split("<tr>")[1:]]
    *terms, total = rows
    assert total[0] == "total" and terms, html
    assert float(total[4]) == pytest.approx(sum(float(r[4]) for r in terms), abs=1e-3 * len(rows))
    return len(terms)


@pytest.fixture(scope="session")
def tiny_maskmatch_run(tiny_data, tmp_path_factory) -> Path:
    """A two-step tiny MaskMatch run directory (checkpoints to load)."""
    runs = tmp_path_factory.mktemp("st") / "runs"
    cfg = tiny_config_dict(runs, tiny_data, name="tiny-maskmatch", **{"method.name": "maskmatch", "train.iters": 2,
                                                                       "method.lcr_patch": 8})
    train(config_from_dict(cfg))
    return runs / "tiny-maskmatch"


@pytest.mark.slow  # papermill: a real kernel
def test_maskmatch_notebook(tmp_path, tiny_maskmatch_run):
    # a run's checkpoint; tau 0 makes every pixel confident, grid masks hide exactly 3 of 4 patches
    _, o = report(tmp_path, "10_maskmatch", run_dir=str(tiny_maskmatch_run), overrides={"data.batch_size": 2},
                  seed=1, step=1, image=1, tau=0.0, patch=8, strategy="grid", device="cpu", interactive=False)
    assert len(o["png"]) == 4  # patch masks, teacher scales + ensemble, student scales, LCR
    setup = cells(table(o["html"], "step-through setup"))
    assert setup["method"] == "maskmatch" and "tiny-maskmatch/checkpoints/best.pt (step 2)" in setup["weights"]
    losses = cells(table(o["html"], "loss terms"))
    assert set(losses) == {"loss_x", "loss_u", "loss_lcr", "total"}
    assert loss_terms_add_up(table(o["html"], "loss terms")) == 3
    ms = cells(table(o["html"], "multi-scale loss per scale"))
    assert list(ms) == ["0.7", "1", "1.5", "mean (L_MS)"]
    # Eq. 8: L_MS is the mean of the per-scale losses (three decimals shown)
    assert float(ms["mean (L_MS)"]) == pytest.approx(sum(float(ms[k]) for k in ("0.7", "1", "1.5")) / 3, abs=2e-3)


@pytest.mark.slow  # papermill: a real kernel
def test_corrmatch_notebook(tmp_path, tiny_data, monkeypatch, from_notebooks_folder):
    # a fresh model on the tiny dataset with the default (dynamic) threshold, started in notebooks/ with the default
    # data_root: the config's data/synthetic of the project root (here a stand-in holding the tiny dataset), no
    # second dataset generated under notebooks/
    root = tmp_path / "project"
    (root / "data").mkdir(parents=True)
    (root / "data" / "synthetic").symlink_to(tiny_data, target_is_directory=True)
    monkeypatch.setenv(ENV, str(root))
    _, o = report(tmp_path, "13_corrmatch", split="1-4",
                  overrides=stepthrough_overrides(tmp_path, tiny_data), pixels=[[4, 4], [20, 28]], num_shapes=8,
                  image=1, device="cpu", interactive=False)
    assert len(o["png"]) == 4  # predictions, correlation rows + shapes, sampled shapes, propagation
    setup = cells(table(o["html"], "step-through setup"))
    assert setup["weights"] == "fresh initialisation (seed 0)"
    assert setup["dataset"] == f"{root.resolve() / 'data' / 'synthetic'} (split 1-4)"
    th = cells(table(o["html"], "dynamic threshold"))
    # Eq. 11 from the initial 0.85 with momentum 0.999: tau = 0.999 * 0.85 + 0.001 * mean of the class maxima
    assert th["threshold before"] == "0.850000" and th["momentum"] == "0.999"
    mean = float(th["mean over predicted classes"])
    assert float(th["threshold after (used)"]) == pytest.approx(0.999 * 0.85 + 0.001 * mean, abs=2e-6)
    losses = cells(table(o["html"], "loss terms"))
    assert set(losses) == {"loss_x", "loss_s", "loss_fp", "loss_kl", "loss_x_corr", "loss_corr_u", "total"}
    loss_terms_add_up(table(o["html"], "loss terms"))


@pytest.mark.slow  # papermill: a real kernel
def test_rankmatch_notebook(tmp_path, tiny_data):
    _, o = report(tmp_path, "14_rankmatch", data_root=str(tiny_data), split="1-4",
                  overrides=stepthrough_overrides(tmp_path, tiny_data), pixel=[16, 16], agent=2, num_agents=8,
                  top_k=3, device="cpu", interactive=False)
    assert len(o["png"]) == 4  # agent positions, activation maps, top-k agents, rank distributions
    ranks = table(o["html"], "rank distributions at pixel (16, 16) of image 0")
    rows = ranks.split("<tbody>")[1].split("<tr>")[1:]
    assert len(rows) == 6  # 3! orderings of the top-3 agents
    p_weak = [float(re.findall(r"<td>(.*?)</td>", r)[1]) for r in rows]
    assert sum(p_weak) == pytest.approx(1.0, abs=6 * 5e-4)  # a distribution (three decimals per cell)
    assert "loss_rank" in cells(table(o["html"], "loss terms"))
    loss_terms_add_up(table(o["html"], "loss terms"))


# --------------------------------------------------------------------- step-through notebooks (11, 12)


def table_rows(html: str) -> list[list[str]]:
    """Every body row of an HTML table as its cell texts."""
    return [re.findall(r"<td>(.*?)</td>", r) for r in html.split("<tbody>")[1].split("<tr>")[1:]]


@pytest.mark.slow  # papermill: a real kernel
def test_s4mim_notebook(tmp_path, tiny_data):
    # a fresh model; tau 0 (every pixel confident), 8-pixel grid masks (exactly 3 of 4 patches hidden)
    _, o = report(tmp_path, "11_s4mim", data_root=str(tiny_data), split="1-4",
                  overrides=stepthrough_overrides(tmp_path, tiny_data), image=1, cls=2, tau=0.0, mask_patch=8,
                  mask_strategy="grid", device="cpu", interactive=False)
    assert len(o["png"]) == 4  # phase I, masked streams, class-wise reconstruction, prototypes
    assert cells(table(o["html"], "step-through setup"))["method"] == "s4mim"
    streams = {r[0]: r for r in table_rows(table(o["html"], "masked streams"))}
    assert [streams[k][2] for k in ("labeled", "strong", "weak + fp")] == ["0.750"] * 3
    # L_mimpi's MSE and L_mimse's CE: the sum row is the sum of the three streams (three decimals shown)
    for col in (3, 4):
        parts = [float(streams[k][col]) for k in ("labeled", "strong", "weak + fp")]
        assert float(streams["sum"][col]) == pytest.approx(sum(parts), abs=2e-3)
    agg = table_rows(table(o["html"], "prototypes and aggregation"))
    used = [float(r[6]) for r in agg[:-1] if r[7] == "yes"]
    assert used and float(agg[-1][6]) == pytest.approx(sum(used) / len(used), abs=2e-3)   # Eq. 12: the class mean
    losses = cells(table(o["html"], "loss terms"))
    assert set(losses) == {"loss_x", "loss_s", "loss_fp", "loss_mimpi", "loss_mimfea", "loss_mimse", "total"}
    eq14 = {r[0]: r for r in table_rows(table(o["html"], "Eq. 14 normaliser"))}
    # 1 + 2 (1/2) + 3 (1/3) + 3 (0.05) + 3 (0.1/3) = 3.25
    assert [eq14[k][2] for k in list(eq14)[:5]] == ["1.000", "1.000", "1.000", "0.150", "0.100"]
    assert eq14["sum"][2] == "3.250"
    assert float(eq14["sum / normaliser"][1]) == pytest.approx(float(eq14["sum"][1]) / 3.25, abs=1e-3)
    total = re.search(r"<td>total</td><td>.*?</td><td>-</td><td>-</td><td>(.*?)</td>", table(o["html"],
                                                                                             "loss terms")).group(1)
    assert float(eq14["sum / normaliser"][1]) == pytest.approx(float(total), abs=1e-3)
    assert loss_terms_add_up(table(o["html"], "loss terms")) == 6


@pytest.fixture(scope="session")
def tiny_scalematch_run(tiny_data, tmp_path_factory) -> Path:
    """A two-step tiny ScaleMatch run directory (checkpoints to load)."""
    runs = tmp_path_factory.mktemp("st2") / "runs"
    cfg = tiny_config_dict(runs, tiny_data, name="tiny-scalematch", **{"method.name": "scalematch",
                                                                        "train.iters": 2})
    train(config_from_dict(cfg))
    return runs / "tiny-scalematch"


@pytest.mark.slow  # papermill: a real kernel
def test_scalematch_notebook(tmp_path, tiny_scalematch_run):
    # a run's checkpoint; v = 0.5, tau 0 and no CIF warm-up: every pixel confident, fused pseudo-labels used
    _, o = report(tmp_path, "12_scalematch", run_dir=str(tiny_scalematch_run), overrides={"data.batch_size": 2},
                  seed=1, step=1, image=1, scale=0.5, tau=0.0, warmup=0, device="cpu", interactive=False)
    assert len(o["png"]) == 4  # scales, gate, fused vs plain, consistency
    assert "tiny-scalematch/checkpoints/best.pt (step 2)" in cells(table(o["html"], "step-through setup"))["weights"]
    scales = cells(table(o["html"], "scales of the step"))
    # 32 px x 0.5 = 16 px (= min_scaled_size); t = 1.25 for v <= 1: the 8 x 8 layer1 features become
    # int(8 x 1.25 + 0.5) = 10 cells a side
    assert scales["image scale v"] == "0.500" and scales["scaled weak view"] == "16 x 16"
    assert scales["feature scale t (FSVC)"] == "1.250" and scales["low features"] == "8 x 8 -&gt; 10 x 10"
    assert scales["pseudo-label"] == "fused (epoch 0 &gt;= warm-up 0)"
    assert 0.0 < float(scales["mean s_w (s_v = 1 - s_w)"]) < 1.0
    pl = {r[0]: r for r in table_rows(table(o["html"], "plain vs fused pseudo-labels"))}
    assert pl["plain (scale 1)"][1] == pl["fused (CIF)"][1] == "1.000"   # tau 0: every valid pixel confident
    assert set(cells(table(o["html"], "loss terms"))) == {"loss_x", "loss_s", "loss_isvc", "loss_fsvc", "total"}
    assert loss_terms_add_up(table(o["html"], "loss terms")) == 4
