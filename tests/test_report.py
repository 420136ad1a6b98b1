"""workbench.report (grid parsing, batch execution, index page), workbench.runs (tables from run directories,
per-class pseudo-label quality) and the viz helpers behind the notebooks; expected values worked out by hand."""
import json
import math

import nbformat
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from workbench.config import parse_override
from workbench.report import (
    ReportError,
    grid_points,
    parse_grid,
    parse_parameters,
    point_stem,
    report_name,
    resolve_notebook,
    run_report,
    split_values,
)
from workbench.runs import (
    Table,
    ablation_table,
    class_quality,
    load_run,
    load_runs,
    lookup,
    mean_std,
    metrics_frame,
    per_class_table,
    train_overrides,
    training_command,
    varied_keys,
)
from workbench.viz.embedding import FeatureSpace, feature_space_figure, grid_labels, sample_pixels
from workbench.viz.figures import training_curves
from workbench.viz.quality import ERROR_COLORS, error_map, pseudo_label_panel

nan = float("nan")


# ------------------------------------------------------------------------------------------ parsing


def test_split_values_respects_brackets_and_quotes():
    assert split_values("0, [a, b],{k: 1, j: 2}, 'x,y'") == ["0", "[a, b]", "{k: 1, j: 2}", "'x,y'"]


def test_parse_parameters_and_grid_yaml_values():
    assert parse_parameters(["iters=20", "methods=[supervised, unimatch]", "name=null", "lr=1e-3", "tag=a-b"]) == {
        "iters": 20, "methods": ["supervised", "unimatch"], "name": None, "lr": 0.001, "tag": "a-b"}
    assert parse_grid(["seed=0,1", "method=fixmatch,unimatch,supervised"]) == {
        "seed": [0, 1], "method": ["fixmatch", "unimatch", "supervised"]}
    assert parse_grid(["methods=[a],[a, b]"]) == {"methods": [["a"], ["a", "b"]]}
    # a glob starting with '*' is a string (YAML would read an undefined alias): no quoting needed
    assert parse_parameters(["pattern=*-s0", "other=&x"]) == {"pattern": "*-s0", "other": "&x"}
    assert parse_grid(["pattern=*unimatch*,quickstart-*"]) == {"pattern": ["*unimatch*", "quickstart-*"]}


@pytest.mark.parametrize("bad,fn,msg", [
    (["iters"], parse_parameters, "KEY=VALUE"), (["a=1", "a=2"], parse_parameters, "twice"),
    (["my-key=1"], parse_parameters, "not a notebook parameter"), (["seed=0,,1"], parse_grid, "empty value"),
    (["seed=0", "seed=1"], parse_grid, "twice"), (["x=[1"], parse_parameters, "cannot parse")])
def test_parse_errors_name_the_item(bad, fn, msg):
    with pytest.raises(ValueError, match=msg):
        fn(bad)


def test_grid_points_is_the_cartesian_product_last_axis_fastest():
    pts = grid_points({"seed": [0, 1], "method": ["a", "b", "c"]})
    assert len(pts) == 6
    assert pts[:4] == [{"seed": 0, "method": "a"}, {"seed": 0, "method": "b"}, {"seed": 0, "method": "c"},
                       {"seed": 1, "method": "a"}]
    assert grid_points({}) == [{}]


def test_names_of_reports_and_points():
    assert report_name(resolve_notebook("00_quickstart")) == "quickstart"
    assert resolve_notebook("quickstart").name == "00_quickstart.ipynb"
    assert resolve_notebook("20_pseudo_label_quality.ipynb").name == "20_pseudo_label_quality.ipynb"
    assert point_stem("00_quickstart", {}) == "00_quickstart"
    assert point_stem("30_x", {"seed": 1, "method": "uni match", "m": ["a", "b"]}) == \
        "30_x__seed-1__method-uni-match__m--a-b"
    with pytest.raises(FileNotFoundError, match="00_quickstart"):
        resolve_notebook("no_such_notebook")


# ------------------------------------------------------------------------------------- batch execution


def _write_notebook(path):
    cells = [nbformat.v4.new_code_cell("x = 0\nlabel = 'a'"),
             nbformat.v4.new_code_cell("print('value', x * 10)"),
             nbformat.v4.new_code_cell("assert x != 1, 'x is one'\nprint('done', label)")]
    cells[0].metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))


def _stdout(path):
    nb = nbformat.read(str(path), as_version=4)
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                   if o.output_type == "stream")


def test_run_report_failures_reported_with_cell_and_others_still_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "07_probe.ipynb"
    _write_notebook(src)
    with pytest.raises(ReportError) as ei:
        run_report(str(src), out=tmp_path / "reports", grid=["x=1,3"], parameters=["label=zz"])
    entries = ei.value.entries
    assert [e.ok for e in entries] == [False, True]  # the failing first point did not stop the second
    fail, ok = entries
    assert fail.error.startswith("In [4], line 1: assert x != 1, 'x is one'")  # 4th: papermill injects a cell
    assert fail.error.endswith("AssertionError: x is one")
    assert "1 of 2" in str(ei.value)
    out = tmp_path / "reports" / "probe"
    assert ok.notebook == "07_probe__x-3.ipynb" and ok.html == "07_probe__x-3.html"
    assert "value 30" in _stdout(out / ok.notebook) and "done zz" in _stdout(out / ok.notebook)
    assert "value 10" in _stdout(out / fail.notebook) and "done" not in _stdout(out / fail.notebook)
    for e in entries:  # executed copies and HTML exports exist for both points, failure included
        assert (out / e.notebook).is_file()
        page = (out / e.html).read_text()
        assert "<html" in page.lower() and "value" in page
    index = (out / "index.html").read_text()
    assert index.count("<tr><td>") == 2 and 'href="07_probe__x-1.html"' in index and "x is one" in index
    assert "1 failed" in index
    assert [e["parameters"] for e in json.loads((out / "index.json").read_text())] == [
        {"label": "zz", "x": 1}, {"label": "zz", "x": 3}]


def test_interactive_notebooks_run_static_and_cells_time_out(tmp_path, monkeypatch):
    """A notebook with an ``interactive`` parameter runs headless with interactive=False unless it is given; a cell
    past ``timeout`` fails its point instead of hanging."""
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "probe.ipynb"
    cells = [nbformat.v4.new_code_cell("interactive = True\nnap = 0.0"),
             nbformat.v4.new_code_cell("import time\ntime.sleep(nap)\nprint('interactive', interactive)")]
    cells[0].metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(src))
    out = tmp_path / "reports" / "probe"
    [e] = run_report(str(src), out=tmp_path / "reports", html=False)
    assert "interactive False" in _stdout(out / e.notebook)
    [e] = run_report(str(src), out=tmp_path / "reports", parameters=["interactive=true"], html=False)
    assert "interactive True" in _stdout(out / e.notebook)
    with pytest.raises(ReportError) as ei:
        run_report(str(src), out=tmp_path / "reports", parameters=["nap=30"], html=False, timeout=2)
    assert not ei.value.entries[0].ok and "interactive" not in _stdout(out / ei.value.entries[0].notebook)


def test_run_report_rejects_unknown_parameters_before_running(tmp_path):
    src = tmp_path / "probe.ipynb"
    _write_notebook(src)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['y'\].*\['label', 'x'\]"):
        run_report(str(src), out=tmp_path / "reports", grid=["y=1,2"])
    with pytest.raises(ValueError, match="same file names"):
        run_report(str(src), out=tmp_path / "reports", grid=["label=a b,a-b"])
    with pytest.raises(ValueError, match="both on the grid and fixed"):
        run_report(str(src), out=tmp_path / "reports", grid=["x=1,2"], parameters=["x=3"])
    assert not (tmp_path / "reports").exists()


# ------------------------------------------------------------------------------------------- tables


def test_mean_std_sample_std_skips_missing():
    m = mean_std([1.0, 2.0, 3.0, None, nan])
    assert m.mean == 2.0 and m.std == pytest.approx(1.0) and m.n == 3
    assert str(m) == "2.000 ± 1.000"
    assert mean_std([0.5]).std is None and str(mean_std([0.5])) == "0.500"
    assert mean_std([None]) is None


def test_table_markdown_and_html():
    t = Table(["a", "b<"], [[1, 0.12345], [None, nan]], title="T")
    assert t.to_markdown() == "**T**\n\n| a | b< |\n|---|---|\n| 1 | 0.123 |\n| - | - |\n"
    h = t._repr_html_()
    assert "<th>b&lt;</th>" in h and "<td>0.123</td>" in h and "<caption>T</caption>" in h
    col = t.column("b<")
    assert col[0] == 0.12345 and math.isnan(col[1])
    with pytest.raises(ValueError, match="rows\\[0\\]"):
        Table(["a"], [[1, 2]])


def _fake_run(root, name, method, tau, seed, best, iou=None):
    d = root / name
    (d / "artifacts").mkdir(parents=True)
    cfg = {"name": name, "out_dir": str(root), "data": {"root": "/nonexistent", "split": "1-8"},
           "train": {"seed": seed, "iters": 10}, "method": {"name": method, "tau": tau}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    summary = {"name": name, "method": method, "steps": 10, "best": {"miou": best, "step": 10},
               "final": {"miou": best - 0.1, "iou": iou or [0.9, 0.1, None]}}
    (d / "summary.json").write_text(json.dumps(summary))
    lines = [{"kind": "train", "step": 1, "epoch": 0, "loss": 2.0, "mask_ratio": 0.1},
             {"kind": "eval", "step": 5, "epoch": 0, "miou": 0.3, "iou": [0.1]},
             {"kind": "train", "step": 2, "epoch": 0, "loss": 1.5}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return d


def test_runs_lookup_varied_keys_and_ablation_table(tmp_path):
    _fake_run(tmp_path, "b-s1", "fixmatch", 0.9, 1, 0.7)
    _fake_run(tmp_path, "a-s0", "fixmatch", 0.9, 0, 0.5)
    _fake_run(tmp_path, "c-s0", "fixmatch", 0.95, 0, 0.6)
    (tmp_path / "not-a-run").mkdir()
    runs = load_runs(tmp_path)
    assert [r.name for r in runs] == ["a-s0", "b-s1", "c-s0"]
    r = runs[0]
    assert lookup(r, "method.name") == "fixmatch" and lookup(r, "best.miou") == 0.5
    assert lookup(r, "method.tau") == 0.9 and lookup(r, "train.seed") == 0 and lookup(r, "x.y", "d") == "d"
    assert varied_keys(runs) == ["method.tau"]  # names, out_dir and seeds never count
    t = ablation_table(runs, metrics=["best.miou", "final.miou"])
    assert t.columns == ["method.tau", "runs", "seeds", "best.miou", "final.miou"]
    (tau09, n09, seeds09, best09, final09), (tau95, n95, seeds95, best95, _) = t.rows
    assert (tau09, n09, seeds09, tau95, n95, seeds95) == (0.9, 2, [0, 1], 0.95, 1, [0])
    assert best09.mean == pytest.approx(0.6) and best09.std == pytest.approx(math.sqrt(0.02))
    assert final09.mean == pytest.approx(0.5) and best95.std is None
    with pytest.warns(UserWarning, match="manifest unavailable"):
        pc = per_class_table(runs[:1])
    assert pc.columns == ["run", "class 0", "class 1", "class 2"] and pc.rows == [["a-s0", 0.9, 0.1, None]]
    with pytest.raises(FileNotFoundError, match="runs_dir"):
        load_runs(tmp_path / "missing")
    with pytest.raises(ValueError, match="not a run directory"):
        load_run(tmp_path / "not-a-run")


def test_metrics_frame_columns(tmp_path):
    run = load_run(_fake_run(tmp_path, "r", "fixmatch", 0.9, 0, 0.5))
    assert metrics_frame(run, "train") == {"step": [1, 2], "loss": [2.0, 1.5], "mask_ratio": [0.1, None]}
    assert metrics_frame(run, "eval", ["miou"]) == {"step": [5], "miou": [0.3]}
    with pytest.raises(ValueError, match="kind"):
        metrics_frame(run, "test")


def test_class_quality_by_hand():
    pseudo = torch.tensor([[0, 1, 1], [2, 2, 0]])
    gt = torch.tensor([[0, 1, 2], [2, 255, 1]])
    conf = torch.tensor([[False, True, False], [True, True, True]])
    valid = torch.tensor([[True, False, True], [True, True, True]])
    q = class_quality(pseudo, conf, gt, 4, valid)
    # counted pixels (valid, gt != 255): (0,0) p0 g0 -, (0,2) p1 g2 -, (1,0) p2 g2 conf, (1,2) p0 g1 conf
    expect = {"gt_pixels": [1, 1, 2, 0], "iou": [0.5, 0.0, 0.5, nan], "precision": [0.0, nan, 1.0, nan],
              "mask_ratio": [0.0, 1.0, 0.5, nan], "mining_ratio": [0.0, nan, 1.0, nan]}
    for k, v in expect.items():
        assert torch.allclose(q[k], torch.tensor(v, dtype=torch.float64), equal_nan=True), k
    with pytest.raises(TypeError, match="confident"):
        class_quality(pseudo, conf.long(), gt, 4)
    with pytest.raises(ValueError, match="same shape"):
        class_quality(pseudo[:1], conf, gt, 4)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        class_quality(pseudo, conf, gt, 2)


# -------------------------------------------------------------------------------- launching a run


def test_train_overrides_and_command_round_trip():
    ov = train_overrides("unimatch", "1-16", seed=2, iters=50, overrides={"method.tau": 0.9, "train.iters": 60})
    assert ov == {"method.name": "unimatch", "data.split": "1-16", "train.seed": 2, "name": "unimatch-1-16-s2",
                  "out_dir": "runs", "train.iters": 60, "method.tau": 0.9}
    assert train_overrides("fixmatch", "1-8", epochs=3, name="x")["train.iters"] is None
    with pytest.raises(ValueError, match="iters and epochs"):
        train_overrides("fixmatch", "1-8", iters=3, epochs=3)
    cmd = training_command({**ov, "model.aspp_rates": [2, 4, 6]}, config="c.yaml", nproc=2, python="py")
    assert cmd[:8] == ["py", "-m", "workbench", "train", "--nproc", "2", "--config", "c.yaml"]
    sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
    parsed = {".".join(k): v for k, v in map(parse_override, sets)}  # what the CLI will read back
    assert parsed == {**ov, "model.aspp_rates": [2, 4, 6]} and isinstance(parsed["data.split"], str)
    with pytest.raises(ValueError, match="nproc"):
        training_command(ov, nproc=0)


# ---------------------------------------------------------------------------------------- viz helpers


def test_error_map_colours_by_hand():
    pseudo = torch.tensor([[1, 2, 0], [0, 3, 4]])
    gt = torch.tensor([[1, 1, 255], [0, 0, 2]])
    conf = torch.tensor([[True, True, True], [False, False, True]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    m = error_map(pseudo, conf, gt, valid)
    c = {k: tuple(v) for k, v in ERROR_COLORS.items()}
    assert [tuple(m[0, j]) for j in range(3)] == [c["confident, correct"], c["confident, wrong"], c["ignored"]]
    assert [tuple(m[1, j]) for j in range(3)] == [c["below threshold"], c["below threshold"], c["ignored"]]


def test_grid_labels_match_align_corners_upsampling():
    labels = (torch.arange(5).view(5, 1) * 10 + torch.arange(5)).unsqueeze(0)  # value 10 r + c
    assert grid_labels(labels, (3, 3))[0].tolist() == [[0, 2, 4], [20, 22, 24], [40, 42, 44]]
    spike = torch.zeros(1, 1, 3, 3)
    spike[0, 0, 1, 2] = 1.0  # feature cell (1, 2) ...
    up = F.interpolate(spike, size=(5, 5), mode="bilinear", align_corners=True)[0, 0]
    assert divmod(int(up.argmax()), 5) == (2, 4) and float(up.max()) == 1.0  # ... sits on pixel (2, 4): label 24
    assert grid_labels(labels, (2, 3))[0].tolist() == [[0, 2, 4], [40, 42, 44]]


def test_sample_pixels_per_class_never_ignore():
    feats = torch.arange(6, dtype=torch.float32).view(1, 1, 2, 3).repeat(1, 2, 1, 1)  # value = flat position
    feats[:, 1] *= -1
    labels = torch.tensor([[[0, 0, 1], [255, 1, 1]]])
    x, y = sample_pixels(feats, labels, per_class=5)
    assert y.tolist() == [0, 0, 1, 1, 1] and x[:, 0].tolist() == [0, 1, 2, 4, 5] and x[:, 1].tolist() == [
        0, -1, -2, -4, -5]
    x1, y1 = sample_pixels(feats, labels, per_class=1, seed=3)
    x2, _ = sample_pixels(feats, labels, per_class=1, seed=3)
    assert y1.tolist() == [0, 1] and torch.equal(x1, x2)
    assert int(x1[0, 0]) in (0, 1) and int(x1[1, 0]) in (2, 4, 5)
    with pytest.raises(ValueError, match="ignore"):
        sample_pixels(feats, torch.full((1, 2, 3), 255), per_class=1)


def test_training_curves_keep_one_colour_per_run():
    recs = {"a": [{"step": 1, "x": 1.0}, {"step": 2, "x": 2.0}], "b": [{"step": 1, "x": 2.0, "y": 3.0}]}
    fig = training_curves(recs, ["x", "y"])
    ax_x, ax_y = fig.axes
    assert [ln.get_color() for ln in ax_x.lines] == ["C0", "C1"]
    assert [ln.get_color() for ln in ax_y.lines] == ["C1"]  # b keeps its colour where a has no data
    assert [t.get_text() for t in ax_x.get_legend().get_texts()] == ["a", "b"]
    grid = training_curves(recs, ["x", "y", "x", "y", "x"], ncols=3)  # 2 rows of 3, the sixth panel hidden
    assert len(grid.axes) == 6 and [a.get_visible() for a in grid.axes] == [True] * 5 + [False]
    assert grid.axes[3].get_title() == "y" and grid.axes[3].get_subplotspec().rowspan.start == 1


def test_pseudo_label_panel_shows_aligned_maps_in_palette_colours():
    palette = [[0, 0, 0], [128, 0, 0], [0, 128, 0]]
    pseudo = torch.tensor([[[0, 1], [2, 1]]], dtype=torch.uint8)
    cap = {"x_w": torch.full((1, 3, 2, 2), 100, dtype=torch.uint8), "pseudo": pseudo,
           "y_u": torch.tensor([[[0, 1], [1, 255]]], dtype=torch.uint8),
           "conf": torch.tensor([[[0.99, 0.5], [0.97, 0.96]]], dtype=torch.float16),
           "confident": torch.tensor([[[True, False], [True, True]]]),
           "ignore": torch.tensor([[[0, 0], [0, 255]]], dtype=torch.uint8)}  # pixel (1, 1) is padding
    fig = pseudo_label_panel(cap, palette, ["bg", "a", "b"], n=3)
    panels = [ax for ax in fig.axes if ax.get_title() or ax.get_images()][:6]
    arr = [ax.get_images()[0].get_array() for ax in panels]
    white, black, red, green = [255] * 3, [0] * 3, [128, 0, 0], [0, 128, 0]
    assert [ax.get_title() for ax in panels] == ["weak view", "ground truth", "pseudo-label",
                                                 "confident pseudo-label", "errors", "confidence"]
    assert arr[1].tolist() == [[black, red], [red, white]]  # ground truth, padding white
    assert arr[2].tolist() == [[black, red], [green, white]]  # pseudo-label, padding white
    assert arr[3].tolist() == [[black, white], [green, white]]  # only confident pixels keep their colour
    c = {k: list(v) for k, v in ERROR_COLORS.items()}
    assert arr[4].tolist() == [[c["confident, correct"], c["below threshold"]], [c["confident, wrong"], white]]
    conf = np.ma.getdata(arr[5])
    assert conf[0, 0] == pytest.approx(0.99, abs=1e-3) and np.isnan(conf[1, 1])
    assert any(ax.get_label() == "<colorbar>" for ax in fig.axes)


def test_feature_space_figure_colours_points_by_class():
    palette = [[0, 0, 0], [128, 0, 0], [0, 0, 128]]
    fs = FeatureSpace(np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]]), np.array([2, 0, 1]), 0.25)
    fig = feature_space_figure({"run-a": fs, "run-b": fs}, palette, ["bg", "a", "b"])
    ax = fig.axes[0]
    cols = ax.collections[0].get_facecolors()[:, :3]
    assert np.allclose(cols, np.array([[0, 0, 128], [0, 0, 0], [128, 0, 0]]) / 255)
    assert ax.get_title() == "run-a\nsilhouette 0.25" and fig.axes[1].get_title().startswith("run-b")
