"""Every notebook in notebooks/ runs under papermill (through ``workbench report``) on tiny parameters, and its
executed copy holds the expected figures (image/png outputs) and tables, not only a clean exit."""
import ast
import base64
import json
from pathlib import Path

import nbformat
import pytest
from papermill.inspection import inspect_notebook

from conftest import tiny_config_dict
from workbench.config import config_from_dict
from workbench.engine.trainer import train
from workbench.report import NOTEBOOKS, report_name, resolve_notebook, run_report
from workbench.runs import flatten

TESTED = {"00_quickstart", "01_train", "20_pseudo_label_quality", "21_feature_space", "30_compare_runs"}


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
                out["stdout"] += o.text
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


def test_pseudo_label_quality_notebook(tmp_path, tiny_runs, tiny_data):
    _, o = report(tmp_path, "20_pseudo_label_quality", run=str(tiny_runs / "tiny-unimatch"), step=None,
                  num_images=2)
    t = table(o["html"], "per-class pseudo-label quality at step 4")
    names = json.loads((tiny_data / "manifest.json").read_text())["class_names"]
    assert all(f"<td>{n}</td>" in t for n in names) and "<th>mining_ratio</th>" in t
    assert len(o["png"]) == 4  # diagnostics curves, per-class curves, per-class bars, example panel


def test_feature_space_notebook(tmp_path, tiny_runs):
    _, o = report(tmp_path, "21_feature_space", run_a=str(tiny_runs / "tiny-supervised"),
                  run_b=str(tiny_runs / "tiny-unimatch"), num_images=8, per_class=8, seed=0, device="cpu")
    t = table(o["html"], "sampled pixels per class")
    assert "<td>tiny-supervised</td>" in t and "<td>tiny-unimatch</td>" in t
    assert len(o["png"]) == 1


def test_compare_runs_notebook(tmp_path, tiny_runs):
    _, o = report(tmp_path, "30_compare_runs", runs_dir=str(tiny_runs), pattern="tiny-*")
    assert "tiny-supervised" in table(o["html"], "runs") and "tiny-unimatch" in table(o["html"], "runs")
    assert "<th>method.name</th>" in table(o["html"], "ablation")
    assert "<th>background</th>" in table(o["html"], "per-class IoU")
    assert "config keys that differ between runs: ['method.name'" in o["stdout"]
    assert len(o["png"]) == 2
