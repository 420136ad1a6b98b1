"""experiments/step_reading.py: the functions a training step runs, their callers, lines and the before/after table."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import step_reading

INNER = '''def helper(x):
    return x + 1


def outer(x, via):
    def nested(y):
        return helper(y)
    return via(nested, x)
'''


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_recorder_keeps_package_code_and_links_callers_across_outside_frames(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "inner.py").write_text(INNER)
    (tmp_path / "outside.py").write_text("def via(f, x):\n    return f(x)\n")
    inner, outside = load(pkg / "inner.py", "inner_mod"), load(tmp_path / "outside.py", "outside_mod")
    rec = step_reading.CallRecorder(pkg)
    sys.setprofile(rec)
    try:
        assert inner.outer(1, outside.via) == 2
    finally:
        sys.setprofile(None)
    names = [c.co_qualname for c in rec.codes]
    assert names == ["outer", "outer.<locals>.nested", "helper"]          # via (outside the package) not kept
    edges = {(a.co_qualname, b.co_qualname) for a, b in rec.edges}
    # nested is called by via, outside the package: its caller as a reader sees it is outer
    assert edges == {("outer", "outer.<locals>.nested"), ("outer.<locals>.nested", "helper")}
    s = step_reading.summarise(list(rec.codes), tmp_path)
    # helper: lines 1-2, outer: lines 5-8 (nested, 6-7, inside it): 6 lines, not 8
    assert (s["functions"], s["lines"], s["files"]) == (3, 6, ["pkg/inner.py"])
    assert [(f["function"], f["lines"]) for f in s["function_list"]] == [
        ("helper", 2), ("outer", 4), ("outer.<locals>.nested", 2)]


def record(label: str, funcs: list[tuple[str, str]], loss: float) -> dict:
    part = {"functions": len(funcs), "files": sorted({f for f, _ in funcs}), "lines": 10 * len(funcs),
            "function_list": [{"function": q, "file": f, "line": 1, "lines": 10} for f, q in funcs]}
    return {"label": label, "commit": label * 5, "dirty": False, "command": f"cmd {label}",
            "step": {"iteration": 1}, "methods": {"m": {"loss": loss, "mro_depth": 2, "all": part, "logic": part,
                                                         "entry": part, "direct_callees": part}}}


def test_merge_table_and_moved_functions():
    before = record("b", [("wb/engine/a.py", "sync"), ("wb/methods/m.py", "M.training_step")], 0.5)
    after = record("a", [("wb/ops/h.py", "sync"), ("wb/methods/m.py", "M.training_step"),
                         ("wb/methods/m.py", "M.stages")], 0.5)
    text = step_reading.merge_markdown(before, after, "merge cmd")
    assert "| m | 2 -> 3 | 2 -> 3 | 2 -> 2 | 2 -> 2 | 20 -> 30 | 20 -> 30 | 20 -> 30 | 2 (20) -> 3 (30) | 2 -> 2 | yes |" \
        in text
    assert "- only before: -" in text and "- only after: `M.stages`" in text
    assert "- moved (same name, another file): `sync` wb/engine/a.py -> wb/ops/h.py" in text
    after["methods"]["m"]["loss"] = 0.25
    assert "| no (0.5 vs 0.25) |" in step_reading.merge_markdown(before, after, "merge cmd")


def test_fixmatch_step_is_measured(tmp_path):
    assert step_reading.main(["--label", "x", "--methods", "fixmatch", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "step_reading_x.json").read_text())["methods"]["fixmatch"]
    assert [f["function"] for f in r["entry"]["function_list"]] == ["FixMatch.training_step"]
    fns = {f["function"] for f in r["all"]["function_list"]}
    assert "FixMatch.training_step" in fns and "DeepLabV3Plus.forward" in fns
    assert r["mro"][0] == "workbench.methods.fixmatch.FixMatch" and r["mro_depth"] == len(r["mro"])
    assert set(r["logic"]["files"]) | set(r["other"]["files"]) == set(r["all"]["files"])
    assert all(f.startswith(("workbench/methods/", "workbench/ops/")) for f in r["logic"]["files"])
    assert (tmp_path / "step_reading_x.md").read_text().startswith("# Reading one training step: x")
