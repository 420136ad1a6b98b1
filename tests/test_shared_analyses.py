"""One implementation of each analysis, used everywhere: the scaling rule, the eval-mode teacher pass, the
label-to-grid rule (captures, dashboard, notebooks), per-class pseudo-label quality, run discovery and dataset
metadata. Expected values are worked by hand."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from workbench.dashboard.data import feature_points, per_class_quality
from workbench.methods.base import eval_mode
from workbench.methods.scalematch import resized_feature_size, scaled_image_size
from workbench.ops.ensemble import rescale, scaled_size
from workbench.ops.grid import cell_position, feature_cell, grid_labels, grid_positions
from workbench.ops.semi import class_quality
from workbench.runs import dataset_meta, discover_runs, load_runs


def test_scaled_size_roundings():
    # 321 x 1.5 = 481.5: half-up (the evaluation's ensembles) 482, floor (F.interpolate(scale_factor), ScaleMatch) 481
    assert scaled_size((321, 321), 1.5) == (482, 482)
    assert scaled_size((321, 321), 1.5, "floor") == (481, 481) == scaled_image_size((321, 321), 1.5)
    assert scaled_size((32, 10), 0.25, "floor", min_size=16) == (16, 16)   # 8 and 2 raised to the minimum
    assert scaled_size((3, 3), 0.1) == (1, 1)                              # never below one pixel
    assert resized_feature_size((81, 3), 1.25) == scaled_size((81, 3), 1.25, "floor") == (101, 3)
    assert rescale(torch.zeros(1, 2, 10, 6), 0.5, "floor").shape[-2:] == (5, 3)
    with pytest.raises(ValueError, match="rounding"):
        scaled_size((4, 4), 2.0, "nearest")
    with pytest.raises(ValueError, match="scale"):
        scaled_size((4, 4), 0.0)


def test_eval_mode_restores_every_module_even_on_error():
    net = nn.Sequential(nn.BatchNorm2d(2), nn.Dropout(0.5))
    net.train()
    net[1].eval()  # a submodule deliberately left in eval mode by its owner
    with eval_mode(net) as inside:
        assert inside is net and not any(m.training for m in net.modules())
    assert net.training and net[0].training and not net[1].training
    with pytest.raises(RuntimeError, match="boom"), eval_mode(net):
        raise RuntimeError("boom")
    assert net.training and net[0].training and not net[1].training


def test_grid_rule_positions_and_dashboard_labels():
    assert grid_positions(5, 3).tolist() == [0, 2, 4]
    assert grid_positions(32, 4).tolist() == [0, 10, 21, 31]  # round(31/3 k) = 0, 10.33, 20.67, 31
    assert grid_positions(7, 1).tolist() == [3]  # one cell: the middle pixel, where cell_position puts it
    assert cell_position(1, 2, (5, 5), (3, 3)) == (2.0, 4.0) and feature_cell(2, 4, (5, 5), (3, 3)) == (1, 2)
    y_u = (torch.arange(5).view(5, 1) * 10 + torch.arange(5)).unsqueeze(0)  # label 10 r + c
    assert grid_labels(y_u, (3, 3))[0].tolist() == [[0, 2, 4], [20, 22, 24], [40, 42, 44]]
    # the dashboard's t-SNE points of a capture without feature_labels read y_u by the same rule
    feats = torch.arange(9, dtype=torch.float32).view(1, 1, 3, 3)
    pts, lab = feature_points({"features": feats, "y_u": y_u}, max_points=100)
    assert lab.tolist() == [0, 2, 4, 20, 22, 24, 40, 42, 44] and pts[:, 0].tolist() == list(range(9))


def test_class_quality_by_hand_and_dashboard_agrees():
    # 2 classes over 6 pixels, the last one ignored in the ground truth
    gt = torch.tensor([[0, 0, 1, 1, 1, 255]])
    pseudo = torch.tensor([[0, 1, 1, 1, 0, 0]])
    confident = torch.tensor([[True, True, True, False, True, True]])
    q = class_quality(pseudo, confident, gt, 2)
    # class 0: gt {0,1}, pred {0,4}: inter 1, union 3; confident pred-0 {0,4}, correct {0} -> 1/2
    # class 1: gt {2,3,4}, pred {1,2,3}: inter 2, union 4; confident pred-1 {1,2}, correct {2} -> 1/2
    assert q["iou"].tolist() == [1 / 3, 2 / 4] and q["precision"].tolist() == [0.5, 0.5]
    assert q["mask_ratio"].tolist() == [2 / 2, 2 / 3] and q["mining_ratio"].tolist() == [1 / 1, 1 / 2]
    arts = {"pseudo": pseudo, "y_u": gt, "confident": confident, "ignore": torch.zeros_like(gt)}
    d = per_class_quality(arts, 2)
    assert d["iou"] == [1 / 3, 0.5] and d["precision"] == [0.5, 0.5] and d["gt_pixels"] == [2.0, 3.0]
    arts["ignore"] = torch.tensor([[0, 0, 0, 0, 255, 0]])  # pixel 4 is padding: class 1 pred {1,2,3} = gt {2,3}
    d = per_class_quality(arts, 2)
    # valid pixels 0-3: class 0 gt {0,1} pred {0}: iou 1/2, confident pred-0 {0} correct -> 1; class 1 gt {2,3}
    # pred {1,2,3}: iou 2/3, confident pred-1 {1,2}, correct {2} -> 1/2
    assert d["iou"] == [1 / 2, 2 / 3] and d["precision"] == [1.0, 0.5]
    arts["pseudo"] = torch.ones_like(gt)  # nothing predicted 0: precision 0/0 is nan
    assert math.isnan(per_class_quality(arts, 2)["precision"][0])


def _run(path, root=None):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(f"name: {path.name}\ndata:\n  root: {root}\n" if root else f"name: {path.name}\n")


def test_run_discovery_is_shared(tmp_path):
    runs = tmp_path / "runs"
    _run(runs / "a")
    _run(runs / "grid" / "b")
    (runs / "started").mkdir()
    (runs / "started" / "metrics.jsonl").write_text("")  # a run without its config yet: listed, not loadable
    (runs / "notes").mkdir()
    assert discover_runs(runs) == ["a", "grid/b", "started"]
    assert [r.path.name for r in load_runs(runs)] == ["a", "b"]
    assert [r.path.name for r in load_runs(runs, "grid/*")] == ["b"]
    assert [r.path.name for r in load_runs(runs, "a*")] == ["a"]


def test_dataset_meta_one_reader(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    man = {"format": "workbench-dataset/1", "splits": {"train": "train.txt"}, "num_classes": 2,
           "class_names": ["bg", "cell"], "palette": [[0, 0, 0]]}
    (root / "manifest.json").write_text(json.dumps(man))
    _run(tmp_path / "r", root)
    meta = dataset_meta(tmp_path / "r")
    assert meta.class_names == ["bg", "cell"] and meta.palette == [[0, 0, 0], [128, 0, 0]] and not meta.generic
    man["format"] = "something/else"
    (root / "manifest.json").write_text(json.dumps(man))
    meta = dataset_meta(tmp_path / "r", num_classes_hint=3)
    assert meta.generic and meta.num_classes == 3 and "format" in meta.source
