"""Live progress (workbench.progress.RunWatcher, `workbench report`'s progress lines) and the data identity that runs
record (summary.json ``dataset``) with the tables that refuse to mix runs trained on different data. Expected lines
and numbers are worked out by hand from the records written here."""
import io
import json
import shutil

import nbformat
import pytest
import yaml

from workbench.data.dataset import data_identity, load_manifest
from workbench.progress import RunWatcher, format_seconds
from workbench.report import run_report
from workbench.runs import MixedDataError, ablation_table, load_runs, per_class_table, runs_table


def _run_dir(root, name, iters=100):
    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"name": name, "train": {"iters": iters}}))
    (d / "metrics.jsonl").write_text("")
    return d


def _append(d, *records, partial=""):
    with (d / "metrics.jsonl").open("a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records) + partial)


def test_format_seconds():
    assert [format_seconds(s) for s in (0, 42, 60, 75, 3599, 3700)] == ["0s", "42s", "1m00s", "1m15s", "59m59s",
                                                                         "1h01m"]


def test_watcher_lines_rate_eta_eval_and_done(tmp_path):
    runs = tmp_path / "runs"
    d = _run_dir(runs, "quickstart-unimatch-s0")
    out = io.StringIO()
    w = RunWatcher(runs, since=0, stream=out, every=30)
    w.poll(now=0.0)
    assert out.getvalue() == "[progress] quickstart-unimatch-s0: training (100 steps)\n"
    _append(d, {"kind": "train", "step": 20, "loss": 0.5})
    w.poll(now=0.0)   # first sample of the step: no rate yet, but 0 - last_print(0) < every: nothing printed
    assert out.getvalue().count("\n") == 1
    _append(d, {"kind": "train", "step": 40, "loss": 0.25}, partial='{"kind": "eval", "st')
    w.poll(now=10.0)  # 20 steps in 10 s = 2.0 it/s; 60 steps left -> 30 s; the half-written line waits
    assert out.getvalue().count("\n") == 1   # 10 s < every=30: not due, no evaluation seen
    w.poll(now=31.0)
    assert out.getvalue().splitlines()[-1] == (
        "[progress] quickstart-unimatch-s0  step  40/100 (40%)  loss 0.250  2.0 it/s  ETA 30s")
    _append(d, {"kind": "eval", "step": 40, "miou": 0.25})  # completes the half line? no: a fresh line after it
    with (d / "metrics.jsonl").open("r+") as f:  # rewrite the tail: the half line becomes a whole eval record
        text = f.read().replace('{"kind": "eval", "st{"kind"', '{"kind"')
        f.seek(0), f.truncate(), f.write(text)
    w.poll(now=32.0)  # an evaluation always prints
    assert out.getvalue().splitlines()[-1] == (
        "[progress] quickstart-unimatch-s0  step  40/100 (40%)  loss 0.250  val mIoU 0.250 @40  2.0 it/s  ETA 30s")
    _append(d, {"kind": "train", "step": 100, "loss": 0.125}, {"kind": "eval", "step": 100, "miou": 0.125})
    w.poll(now=50.0)  # steps 20 -> 100 over 0 -> 50 s: 1.6 it/s; done: no ETA, the best of 0.25 and 0.125
    assert out.getvalue().splitlines()[-1] == (
        "[progress] quickstart-unimatch-s0  step 100/100 (100%)  loss 0.125  val mIoU 0.125 @100  1.6 it/s  done, "
        "best val mIoU 0.250")
    n = out.getvalue().count("\n")
    w.poll(now=500.0)
    assert out.getvalue().count("\n") == n   # a finished run prints nothing more


def test_watcher_ignores_runs_untouched_since_the_start_and_missing_roots(tmp_path):
    old = _run_dir(tmp_path / "runs", "old")
    _append(old, {"kind": "train", "step": 5, "loss": 1.0})
    import os
    os.utime(old / "metrics.jsonl", (1000, 1000))
    out = io.StringIO()
    RunWatcher(tmp_path / "runs", since=2000, stream=out).poll(now=0)
    RunWatcher(tmp_path / "absent", since=0, stream=out).poll(now=0)
    assert out.getvalue() == ""
    with pytest.raises(ValueError, match="interval"):
        RunWatcher(tmp_path, interval=0)


def _training_notebook(path):
    """A notebook that writes a run with 3 training records and an evaluation at its end, slowly."""
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('runs = "runs"')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(
        "import json, time, pathlib\n"
        "d = pathlib.Path(runs) / 'probe-s0'\n"
        "d.mkdir(parents=True, exist_ok=True)\n"
        "(d / 'config.yaml').write_text('train:\\n  iters: 30\\n')\n"
        "for step in (10, 20, 30):\n"
        "    with open(d / 'metrics.jsonl', 'a') as f:\n"
        "        f.write(json.dumps({'kind': 'train', 'step': step, 'loss': 1.0 / step}) + '\\n')\n"
        "    time.sleep(0.3)\n"
        "with open(d / 'metrics.jsonl', 'a') as f:\n"
        "    f.write(json.dumps({'kind': 'eval', 'step': 30, 'miou': 0.375}) + '\\n')\n")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))


@pytest.mark.slow
def test_report_prints_the_progress_of_the_runs_its_notebooks_write(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _training_notebook(tmp_path / "05_probe.ipynb")
    run_report("05_probe.ipynb", out=tmp_path / "reports", html=False, parameters=["runs=my-runs"])
    err = capsys.readouterr().err
    assert "[progress] probe-s0: training (30 steps)" in err
    assert "[progress] probe-s0  step 30/30 (100%)  loss 0.033  val mIoU 0.375 @30" in err and "done" in err
    run_report("05_probe.ipynb", out=tmp_path / "reports2", html=False, parameters=["runs=quiet"], progress=False)
    assert "[progress]" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ data identity


def test_data_identity_uses_the_content_fingerprint_else_the_lists(tmp_path, tiny_data):
    m = load_manifest(tiny_data)
    ident = data_identity(m, ["labeled_1-4", "val", "val"])
    assert ident["fingerprint"] == json.loads((tiny_data / "manifest.json").read_text())["fingerprint"]
    assert ident["fingerprint_of"] == "files" and ident["splits"] == ["labeled_1-4", "val"]
    copy = tmp_path / "copy"
    shutil.copytree(tiny_data, copy)
    raw = json.loads((copy / "manifest.json").read_text())
    del raw["fingerprint"]   # e.g. a prepared real dataset: only its lists identify it
    (copy / "manifest.json").write_text(json.dumps(raw))
    a = data_identity(load_manifest(copy), ["labeled_1-4", "val"])
    assert a["fingerprint_of"] == "lists" and a["fingerprint"].startswith("sha256:")
    val = copy / "splits" / "val.txt"
    lines = val.read_text().splitlines()
    val.write_text("\n".join(lines[:-1]) + "\n")  # one validation image fewer: other data
    b = data_identity(load_manifest(copy), ["labeled_1-4", "val"])
    assert b["fingerprint"] != a["fingerprint"]
    assert data_identity(load_manifest(copy), ["labeled_1-4"])["fingerprint"] != b["fingerprint"]


def _fake(root, name, seed, miou, fingerprint):
    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"name": name, "train": {"seed": seed},
                                                   "method": {"name": "unimatch"}}))
    summary = {"best": {"miou": miou}, "final": {"miou": miou, "iou": [miou, miou]}}
    if fingerprint:
        summary["dataset"] = {"fingerprint": fingerprint}
    (d / "summary.json").write_text(json.dumps(summary))


def test_tables_refuse_runs_trained_on_different_data_unless_told(tmp_path):
    _fake(tmp_path, "a", 0, 0.5, "sha256:" + "a" * 64)
    _fake(tmp_path, "b", 1, 0.6, "sha256:" + "a" * 64)
    _fake(tmp_path, "c", 0, 0.9, "sha256:" + "b" * 64)
    _fake(tmp_path, "old", 2, 0.4, None)   # made before runs recorded their data: not compared
    runs = load_runs(tmp_path)
    same = [r for r in runs if r.name != "c"]
    assert runs_table(same).columns[-1] != "data"
    for table in (runs_table, per_class_table, ablation_table):
        with pytest.raises(MixedDataError, match="2 different datasets.*sha256:aaaaaaaaaaaa.*a, b.*c"):
            table(runs, class_names=["bg", "fg"]) if table is per_class_table else table(runs)
    t = runs_table(runs, mixed_data=True)
    assert t.columns[-1] == "data"
    assert [row[-1] for row in t.rows] == ["sha256:aaaaaaaa", "sha256:aaaaaaaa", "sha256:bbbbbbbb", "unknown"]
    ab = ablation_table(runs, by=["method.name"], metrics=["final.miou"], mixed_data=True)
    # grouped by method and data: (unimatch, a) = runs a, b; (unimatch, b) = c; (unimatch, None) = old
    assert ab.columns == ["method.name", "dataset.fingerprint", "runs", "seeds", "final.miou"]
    assert [(row[1], row[2], row[3]) for row in ab.rows] == [
        ("sha256:" + "a" * 64, 2, [0, 1]), ("sha256:" + "b" * 64, 1, [0]), (None, 1, [2])]
    assert ab.rows[0][4].mean == pytest.approx(0.55)


def test_a_training_line_at_an_evaluated_step_waits_for_its_evaluation(tmp_path):
    runs = tmp_path / "runs"
    d = _run_dir(runs, "r")
    (d / "config.yaml").write_text(yaml.safe_dump({"train": {"iters": 100, "eval_every": 50}}))
    out = io.StringIO()
    w = RunWatcher(runs, since=0, stream=out, every=0)
    w.poll(now=0.0)
    _append(d, {"kind": "train", "step": 25, "loss": 0.5})
    w.poll(now=1.0)   # due (every=0) and not an evaluated step: printed
    assert out.getvalue().splitlines()[-1].startswith("[progress] r  step  25/100")
    _append(d, {"kind": "train", "step": 50, "loss": 0.25})
    w.poll(now=2.0)   # step 50 is evaluated (eval_every 50): no line until its evaluation arrives
    assert out.getvalue().splitlines()[-1].startswith("[progress] r  step  25/100")
    _append(d, {"kind": "eval", "step": 50, "miou": 0.5})
    w.poll(now=3.0)
    lines = out.getvalue().splitlines()
    assert lines[-1].startswith("[progress] r  step  50/100 (50%)  loss 0.250  val mIoU 0.500 @50")
    assert sum("step  50/100" in line for line in lines) == 1


def test_quickstart_summary_line():
    from workbench.quickstart import summary_line
    s = {"seed": 0, "methods": {"supervised": {"final_miou": 0.283}, "unimatch": {"final_miou": 0.337}}}
    # 0.337 - 0.283 = 0.054
    assert summary_line(s) == "quickstart seed 0: supervised final mIoU 0.283, unimatch 0.337 (gain unimatch +0.054)"
    assert summary_line({"seed": 2, "methods": {"supervised": {"final_miou": None}}}) == \
        "quickstart seed 2: supervised final mIoU -"
