"""The dashboard without a browser: readers, per-sample numbers, pictures and the Panel app's components.

Hand-made captures check the numbers (worked out in the comments); a tiny UniMatch run (capture every step) checks
the app on a real run directory.
"""
from __future__ import annotations

import json
import math
import os
import re
import runpy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench.config import config_from_dict
from workbench.dashboard import app as app_mod
from workbench.dashboard.app import Dashboard, build_app, curve_keys, default_curves, serve
from workbench.dashboard.data import (
    ArtifactCache,
    ArtifactError,
    JsonlTail,
    RunData,
    dataset_meta,
    discover_runs,
    feature_points,
    generic_meta,
    most_recent_run,
    per_class_quality,
    run_updated,
    sample_stats,
    select_samples,
    spread_steps,
    tsne_embedding,
)
from workbench.dashboard.render import (
    ERROR_COLOR,
    LOW_CONF_COLOR,
    auto_map,
    error_map,
    extra_maps,
    gallery_views,
    heat,
    ignored_map,
    mark_points,
    method_views_html,
    outline,
    undrawn,
)
from workbench.engine.rundir import RunDir
from workbench.engine.trainer import train

from conftest import tiny_config_dict

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def n_samples(html: str) -> int:
    """Gallery cards in the gallery's HTML."""
    return html.count('class="wb-sample"')


def shown_order(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'class="wb-sample" data-index="(\d+)"', html)]


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory, tiny_data) -> Path:
    """runs/uni: a 4-step tiny UniMatch run capturing every step; runs/other: a copy without its last capture."""
    out = tmp_path_factory.mktemp("dash") / "runs"
    cfg = config_from_dict(tiny_config_dict(out, tiny_data, name="uni", **{
        "method.name": "unimatch", "train.capture_every": 1}))
    train(cfg)
    other = out / "other"
    shutil.copytree(out / "uni", other)
    lines = (other / "artifacts" / "index.jsonl").read_text().splitlines()
    (other / "artifacts" / "index.jsonl").write_text("\n".join(lines[:3]) + "\n")
    return out


@pytest.fixture
def run_copy(runs_dir, tmp_path) -> Path:
    """A private copy of runs/uni inside a fresh runs folder (tests may damage it)."""
    dst = tmp_path / "runs" / "uni"
    shutil.copytree(runs_dir / "uni", dst)
    return dst


def hand_capture() -> dict[str, torch.Tensor]:
    """Three 2x2 unlabeled samples, 3 classes (see test_sample_stats_filter_and_sort for the numbers)."""
    y_u = torch.tensor([[[0, 1], [1, 1]], [[2, 2], [0, 0]], [[1, 255], [2, 2]]], dtype=torch.uint8)
    pseudo = torch.tensor([[[0, 1], [1, 1]], [[2, 0], [1, 1]], [[1, 1], [0, 2]]], dtype=torch.uint8)
    conf = torch.tensor([[[.9, .9], [.9, .9]], [[.2, .2], [.2, .2]], [[1.0, .9], [.95, 0.]]], dtype=torch.float16)
    ignore = torch.zeros(3, 2, 2, dtype=torch.uint8)
    ignore[2, 1, 1] = 255  # padding
    return {"x_w": torch.zeros(3, 3, 2, 2, dtype=torch.uint8), "y_u": y_u, "pseudo": pseudo, "conf": conf,
            "confident": conf >= 0.5, "ignore": ignore}


# ---------------------------------------------------------------------------------------------------- readers
def test_jsonl_tail_follows_appends_torn_lines_and_rewrites(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = JsonlTail(path)
    assert tail.poll() is False and tail.records == []  # missing file: nothing, no error
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')  # writer mid-line
    assert tail.poll() is True
    assert [r["step"] for r in tail.records] == [1, 2]
    assert tail.poll() is False  # nothing new
    with open(path, "a") as f:
        f.write('ss": 0.5}\nnot json\n{"step": 4}\n')
    assert tail.poll() is True
    assert [r["step"] for r in tail.records] == [1, 2, 3, 4] and tail.records[2]["loss"] == 0.5
    assert tail.bad_lines == 1
    tmp = tmp_path / "new"
    tmp.write_text('{"step": 1}\n')
    tmp.replace(path)  # atomic rewrite (resume truncates the log)
    assert tail.poll() is True
    assert [r["step"] for r in tail.records] == [1] and tail.bad_lines == 0


def test_discover_runs(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.jsonl").write_text("")
    (tmp_path / "group" / "b").mkdir(parents=True)
    (tmp_path / "group" / "b" / "config.yaml").write_text("name: b\n")
    (tmp_path / ".hidden" / "c").mkdir(parents=True)
    (tmp_path / ".hidden" / "c" / "metrics.jsonl").write_text("")
    (tmp_path / "not_a_run").mkdir()
    assert discover_runs(tmp_path) == ["a", "group/b"]
    assert discover_runs(tmp_path / "a") == ["."]
    assert discover_runs(tmp_path / "missing") == []


def test_artifact_cache_loads_once_and_reloads_rewritten_files(tmp_path):
    cache = ArtifactCache(max_files=2)
    path = tmp_path / "step_0000001.pt"
    torch.save({"pseudo": torch.zeros(1, 2, 2, dtype=torch.uint8)}, path)
    a = cache.load(path)
    assert cache.load(path) is a and cache.loads == 1
    torch.save({"pseudo": torch.ones(1, 2, 2, dtype=torch.uint8)}, path)
    st = path.stat()
    import os

    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a new mtime even on coarse clocks
    b = cache.load(path)
    assert cache.loads == 2 and int(b["pseudo"].sum()) == 4
    assert cache.derived(path, "sum", lambda t: int(t["pseudo"].sum())) == 4
    assert cache.derived(path, "sum", lambda t: -1) == 4  # memoised
    other = tmp_path / "step_0000002.pt"
    torch.save({"pseudo": torch.ones(1, 2, 2, dtype=torch.uint8)}, other)
    assert cache.derived(other, "sum", lambda t: int(t["pseudo"].sum())) == 4 and cache.loads == 3
    assert cache.load(path) is b and cache.loads == 3  # the scan did not evict the viewed file
    cache.load(other)
    assert cache.loads == 4  # derived() read it without keeping it
    with pytest.raises(ArtifactError, match="missing"):
        cache.load(tmp_path / "step_0000009.pt")
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ArtifactError, match="could not read capture file step_0000001.pt"):
        cache.load(path)
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ArtifactError, match="not a dict of tensors"):
        cache.load(path)
    with pytest.raises(ValueError, match="max_files"):
        ArtifactCache(max_files=0)


# ---------------------------------------------------------------------------------------------------- numbers
def test_sample_stats_filter_and_sort():
    arts = hand_capture()
    stats = sample_stats(arts)
    # sample 0: pseudo == gt everywhere -> 0; sample 1: (0,1) 0!=2, (1,0) 1!=0, (1,1) 1!=0 -> 3/4;
    # sample 2: valid pixels are (0,0) [1 == 1] and (1,0) [0 != 2] ((0,1) is gt 255, (1,1) padding) -> 1/2
    assert [s.error for s in stats] == pytest.approx([0.0, 0.75, 0.5])
    # mean confidence over non-padding pixels: 0.9, 0.2, (1.0 + 0.9 + 0.95) / 3 = 0.95
    assert [s.mean_conf for s in stats] == pytest.approx([0.9, 0.2, 0.95], abs=1e-3)
    assert [sorted(s.classes) for s in stats] == [[0, 1], [0, 1, 2], [0, 1, 2]]
    assert select_samples(stats) == [0, 1, 2]
    assert select_samples(stats, order="error_desc") == [1, 2, 0]
    assert select_samples(stats, order="error_asc") == [0, 2, 1]
    assert select_samples(stats, order="conf_asc") == [1, 0, 2]
    assert select_samples(stats, cls=2) == [1, 2]
    assert select_samples(stats, cls=2, order="error_asc") == [2, 1]
    assert select_samples(stats, cls=7) == []
    no_gt = {k: v for k, v in arts.items() if k != "y_u"}
    assert [s.error for s in sample_stats(no_gt)] == [None, None, None]
    assert select_samples(sample_stats(no_gt), order="error_desc") == [0, 1, 2]  # unknown errors keep batch order
    with pytest.raises(ValueError, match="order"):
        select_samples(stats, order="random")


def test_per_class_quality_by_hand():
    q = per_class_quality(hand_capture(), 3)
    # valid (pseudo, gt) pairs: s0 (0,0) (1,1) (1,1) (1,1); s1 (2,2) (0,2) (1,0) (1,0); s2 (1,1) (0,2)
    # class 0: 1 hit, union 5; class 1: 4 hits, union 6; class 2: 1 hit, union 3
    assert q["iou"] == pytest.approx([1 / 5, 4 / 6, 1 / 3])
    # confident valid pixels: all of s0, s2 (0,0) and (1,0); s1 none (conf 0.2)
    # class 0: s0 hit + s2 miss -> 1/2; class 1: 3 + 1 hits of 4 -> 1; class 2: never confident -> nan
    assert q["precision"][:2] == pytest.approx([0.5, 1.0]) and math.isnan(q["precision"][2])
    assert per_class_quality({"pseudo": hand_capture()["pseudo"]}, 3) is None


def test_spread_steps_keeps_picks_stable():
    steps = list(range(10, 110, 10))  # 10 captures
    # stride 4 (10 / 2 > 3 picks, 10 / 4 = 3 fits): indices 0, 4, 8 plus the last
    assert spread_steps(steps, 4) == [10, 50, 90, 100]
    assert spread_steps(steps[:3], 4) == [10, 20, 30]
    more = spread_steps(steps + [110, 120], 4)  # 12 captures: same stride, earlier picks reused
    assert more == [10, 50, 90, 120]
    with pytest.raises(ValueError):
        spread_steps(steps, 1)


def test_feature_points_and_tsne_separate_two_clusters():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(40, 8, generator=g) * 0.1
    f[20:] += 5.0  # two far-apart clusters
    labels = torch.tensor([0] * 20 + [1] * 20)
    labels[0] = 255  # ignored points are dropped
    pts, lab = feature_points({"features": f, "feature_labels": labels}, max_points=30)
    assert pts.shape == (30, 8) and lab.shape == (30,) and not (lab == 255).any()
    xy, lab = tsne_embedding({"features": f, "feature_labels": labels})
    assert xy.shape == (39, 2)
    a, b = xy[lab == 0], xy[lab == 1]
    within = max(torch.cdist(a, a).mean(), torch.cdist(b, b).mean())
    assert torch.cdist(a, b).mean() > 2 * within
    # [B,D,h,w] features take their labels from y_u resized to h x w (nearest)
    y_u = torch.zeros(1, 4, 4, dtype=torch.uint8)
    y_u[0, :2] = 3
    pts, lab = feature_points({"features": torch.randn(1, 2, 2, 2), "y_u": y_u, "pseudo": y_u}, max_points=10)
    assert pts.shape == (4, 2) and lab.tolist() == [3, 3, 0, 0]
    with pytest.raises(ValueError, match="features"):
        feature_points({"pseudo": y_u})


# ---------------------------------------------------------------------------------------------------- pictures
def test_colours_agree_with_viz_figures():
    """The dashboard draws with the same colorize / to_hwc as workbench.viz.figures (workbench.viz.arrays)."""
    from workbench.dashboard import render
    from workbench.viz import figures

    palette = figures.voc_palette(6)
    lab = torch.tensor([[0, 1, 5], [255, 2, 7]], dtype=torch.uint8)  # 7: beyond the palette (black), 255 white
    assert np.array_equal(render.colorize(lab, palette), figures.colorize(lab, palette))
    assert render.colorize(lab, palette)[1, 0].tolist() == [255, 255, 255]
    assert render.colorize(lab, palette)[1, 2].tolist() == [0, 0, 0]
    assert render.colorize(lab, palette)[0, 1].tolist() == [128, 0, 0]  # VOC class 1: bit 0 -> R 128
    for img in (torch.randint(0, 256, (3, 4, 5), dtype=torch.uint8), torch.rand(3, 4, 5), torch.rand(4, 5, 3) * 200):
        assert np.array_equal(render.to_hwc(img), figures.to_hwc(img))
    assert render.to_hwc(torch.full((3, 2, 2), 0.5))[0, 0].tolist() == [127, 127, 127]  # 0.5 * 255, truncated
    with pytest.raises(ValueError, match="labels"):
        render.colorize(torch.tensor([[256]]), palette)


def test_dataset_meta_reads_the_manifest_and_falls_back(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    root = tmp_path / "data"
    root.mkdir()
    (run / "config.yaml").write_text(f"data:\n  root: {root}\n")
    base = {"format": "workbench-dataset/1", "splits": {"train": "train.txt"}}  # what every manifest holds
    (root / "manifest.json").write_text(json.dumps({**base, "num_classes": 3, "class_names": ["sky", "road", "car"],
                                                    "palette": [[1, 2, 3], [4, 5, 6]]}))
    meta = dataset_meta(run)
    # two colours given; the third class gets the VOC colour of class 2 (bit 1 -> G 128)
    assert meta.class_names == ["sky", "road", "car"] and meta.palette == [[1, 2, 3], [4, 5, 6], [0, 128, 0]]
    assert meta.source == str(root / "manifest.json")
    (root / "manifest.json").write_text(json.dumps({**base, "num_classes": 3, "class_names": ["sky"], "palette": []}))
    meta = dataset_meta(run, num_classes_hint=4)
    assert meta.class_names == [f"class {k}" for k in range(4)] and "num_classes = 3" in meta.source
    assert meta.generic
    (root / "manifest.json").write_text("{broken")
    assert "manifest not readable" in dataset_meta(run).source and dataset_meta(run).num_classes == 21
    (root / "manifest.json").unlink()
    assert "manifest.json" in dataset_meta(run).source


def test_maps_by_hand():
    # viridis end points (matplotlib's table): (0.267, 0.005, 0.329) and (0.993, 0.906, 0.144)
    assert heat(np.array([[0.0, 1.0]])).tolist() == [[[68, 1, 84], [253, 231, 37]]]
    pseudo = torch.tensor([[1, 2], [0, 1]], dtype=torch.uint8)
    gt = torch.tensor([[1, 1], [255, 1]], dtype=torch.uint8)
    ign = torch.tensor([[0, 0], [0, 255]], dtype=torch.uint8)
    err = error_map(pseudo, gt, ign)
    assert err[0, 0].tolist() == [0, 0, 0] and err[0, 1].tolist() == list(ERROR_COLOR)
    assert err[1, 0].tolist() == [255, 255, 255] and err[1, 1].tolist() == [255, 255, 255]
    palette = [[0, 0, 0], [10, 20, 30], [40, 50, 60]]
    used = ignored_map(pseudo, torch.tensor([[True, False], [True, True]]), ign, palette)
    assert used[0, 0].tolist() == [10, 20, 30] and used[0, 1].tolist() == list(LOW_CONF_COLOR)
    assert used[1, 1].tolist() == [255, 255, 255]
    box = torch.zeros(5, 5, dtype=torch.bool)
    box[1:4, 1:4] = True
    edge = outline(box)
    assert edge.sum() == 8 and not edge[2, 2] and edge[1, 1] and not edge[0, 0]
    # cell (y, x) = (1, 1) of a 2x2 grid over 8x8 pixels: 4-pixel cells, enlarged x2 to 8 pixels, cell 8..15
    img = mark_points(np.zeros((8, 8, 3), np.uint8), [3], (2, 2))
    red = (img == [255, 0, 0]).all(-1)
    assert img.shape == (16, 16, 3) and red.sum() == 28  # the 8x8 cell's border
    assert red[8, 8] and red[15, 12] and red[12, 15] and not red[12, 12] and not red[7, 7]
    big = mark_points(np.zeros((256, 256, 3), np.uint8), [0], (256, 256))  # 1-pixel cells: a 5x5 square
    assert big.shape == (256, 256, 3) and (big == [255, 0, 0]).all(-1).sum() == 9  # clipped at the corner: 3x3


def test_views_follow_the_keys_present():
    arts = hand_capture()
    titles = [v.title for v in gallery_views(arts)]
    assert titles[:4] == ["image", "ground truth", "pseudo-label", "confidence"]
    assert "pseudo-label error" in titles and "masked input" not in titles
    b, meta = 3, generic_meta(3, "test")
    arts = {k: v.repeat_interleave(2, -1).repeat_interleave(2, -2) for k, v in arts.items()}  # 4x4 maps
    u8 = torch.uint8
    arts.update(x_masked=torch.zeros(b, 3, 4, 4, dtype=u8), pred_masked=torch.zeros(b, 4, 4, dtype=u8),
                patch_mask=torch.ones(b, 1, 4, 4), gate=torch.rand(b, 2, 4, 4), lcr_region=torch.ones(b, 4, 4) > 0,
                threshold=torch.tensor(0.9), agent_yx=torch.zeros(b, 5, 2, dtype=torch.long),
                ms_pred=torch.zeros(b, 3, 4, 4, dtype=torch.uint8), tiny=torch.zeros(b, 2, 2))
    titles = [v.title for v in gallery_views(arts)]
    for t in ("masked input", "patch mask", "prediction (masked)", "gate 0", "gate 1", "lcr_region"):
        assert t in titles
    assert "ms_pred" not in titles and "tiny" not in titles  # a stack of maps / too small for a map
    assert extra_maps(arts) == ["ms_pred"]
    assert undrawn(arts) == ["agent_yx [3, 5, 2]", "threshold = 0.9", "tiny [3, 2, 2]"]
    page = method_views_html(arts, [0, 1, 2], meta)
    assert re.findall(r"<figcaption>([^<]*)</figcaption>", page) == ["image", "ms_pred 0", "ms_pred 1", "ms_pred 2"] * 3
    del arts["ms_pred"]
    assert "no method-specific maps" in method_views_html(arts, [0, 1, 2], meta)
    arts.update(corr_rows=torch.rand(b, 6, 4, 4), corr_points=torch.zeros(b, 6, dtype=torch.long),
                shapes=torch.rand(b, 6, 4, 4) > 0.5, agents=torch.zeros(b, 5, dtype=torch.long),
                agent_maps=torch.rand(b, 5, 4, 4))
    page = method_views_html(arts, [2, 0], meta, max_maps=4)
    assert page.count('class="wb-sample-method"') == 2
    caps = re.findall(r"<figcaption>([^<]*)</figcaption>", page)
    per_sample = ["image"] + [f"CorrMatch row {m}" for m in range(4)] + [f"CorrMatch shape {m}" for m in range(4)] + [
        f"RankMatch agent {n}" for n in range(4)]  # 6 rows, 6 shapes and 5 agents capped at max_maps = 4
    assert caps == per_sample * 2


def test_auto_map_by_dtype():
    palette = [[0, 0, 0], [10, 20, 30]]
    assert auto_map(torch.tensor([[True, False]]), palette).tolist() == [[[255] * 3, [0] * 3]]
    assert auto_map(torch.tensor([[1, 0]], dtype=torch.uint8), palette).tolist() == [[[10, 20, 30], [0, 0, 0]]]
    # floats in [0, 1] keep the fixed scale; others are stretched to their own range
    ends = [[[68, 1, 84], [253, 231, 37]]]
    assert auto_map(torch.tensor([[0.0, 1.0]]), palette).tolist() == ends
    assert auto_map(torch.tensor([[-3.0, 5.0]]), palette).tolist() == ends
    assert auto_map(torch.tensor([[0.5, 0.5]]), palette)[0, 0].tolist() != [68, 1, 84]


# ---------------------------------------------------------------------------------------------------- the app
def test_run_data_on_a_training_run(runs_dir, tiny_data):
    rd = RunData(runs_dir / "uni", ArtifactCache())
    rd.refresh()
    assert rd.steps() == [1, 2, 3, 4]
    assert len(rd.records("train")) == 4 and len(rd.records("eval")) == 1
    arts = rd.load_step(2)
    assert arts["x_w"].shape == (4, 3, 32, 32) and arts["pseudo"].dtype == torch.uint8
    manifest = json.loads((tiny_data / "manifest.json").read_text())
    assert rd.meta().class_names == manifest["class_names"] and rd.meta().palette[:6] == manifest["palette"]
    assert rd.meta().source == str(tiny_data / "manifest.json")
    assert rd.load_step(2) is arts and rd.cache.loads == 1
    with pytest.raises(KeyError, match="step 9"):
        rd.load_step(9)


def test_dashboard_components(runs_dir):
    dash = Dashboard(runs_dir, refresh_ms=None, cache=ArtifactCache())
    assert list(dash.run.options) == ["other", "uni"]
    dash.run.value = "uni"
    assert list(dash.step.options.values()) == [1, 2, 3, 4] and dash.step.value == 4
    arts = RunData(runs_dir / "uni").load_step(4)
    b = arts["x_w"].shape[0]
    assert n_samples(dash.gallery.object) == b == 4
    assert "uni · step 4 · 4 of 4 samples" in dash.gallery.object
    caps = re.findall(r"<figcaption>([^<]*)</figcaption>", dash.labeled.object)
    assert caps == [c for i in range(arts["x_l"].shape[0]) for c in (f"labeled {i}", f"label {i}")]

    dash.step.value = 2
    arts = RunData(runs_dir / "uni").load_step(2)
    assert "uni · step 2" in dash.gallery.object
    # the class filter keeps the samples whose GT or pseudo-label (non-padding pixels) has the class
    for c in range(6):
        keep = arts["ignore"] == 0
        has = [bool(((arts["y_u"][i] == c) & keep[i]).any() or ((arts["pseudo"][i] == c) & keep[i]).any())
               for i in range(b)]
        dash.cls.value = c
        assert shown_order(dash.gallery.object) == [i for i in range(b) if has[i]]
    dash.cls.value = -1
    # sorted by pseudo-label error, worst first
    valid = (arts["ignore"] == 0) & (arts["y_u"] != 255)
    err = [float((arts["pseudo"][i] != arts["y_u"][i])[valid[i]].float().mean()) for i in range(b)]
    dash.order.value = "error_desc"
    assert shown_order(dash.gallery.object) == sorted(range(b), key=lambda i: (-err[i], i))

    keys = list(dash.curves.value)
    assert {"loss", "loss_x", "loss_s", "loss_fp", "miou", "mask_ratio", "pl_acc", "mining_ratio"} <= set(keys)
    assert dash.curves_pane.objects == []  # lazy: nothing drawn before the tab is opened
    dash.tabs.active = 1
    pngs = [p.object for p in dash.curves_pane.objects]
    assert len(pngs) == -(-len(keys) // 4) and all(p.startswith(PNG_MAGIC) for p in pngs)
    dash.compare.value = ["other"]
    assert len(dash.curves_pane.objects) == len(pngs)

    dash.tabs.active = 2  # per-class quality: read on demand
    assert dash.quality_pane.objects[0].object.startswith(PNG_MAGIC)
    assert "4 of 4 captured steps read" in dash.quality_pane.objects[1].object
    assert dash.method_views.object == ""
    dash.tabs.active = 3
    assert "no method-specific maps" in dash.method_views.object
    dash.render_tsne()  # a run with the default capture has the t-SNE's features
    assert dash.tsne_pane.objects[0].object.startswith(PNG_MAGIC)

    dash.run.value = "other"
    assert list(dash.step.options.values()) == [1, 2, 3] and dash.step.value == 3
    assert "other · step 3 · 4 of 4 samples" in dash.gallery.object
    assert dash.messages.object == ""
    assert isinstance(build_app(runs_dir, refresh_ms=None), app_mod.pn.viewable.Viewable)


def test_corrupt_truncated_and_missing_captures_show_messages(run_copy):
    art = run_copy / "artifacts"
    data = (art / "step_0000002.pt").read_bytes()
    (art / "step_0000002.pt").write_bytes(data[: len(data) // 2])  # truncated
    (art / "step_0000003.pt").unlink()  # listed in the index, gone
    lines = (run_copy / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run_copy / "metrics.jsonl").write_text("".join(lines[:2] + ["{garbage\n"] + lines[2:]))
    dash = Dashboard(run_copy.parent, refresh_ms=None, cache=ArtifactCache())
    dash.step.value = 2
    assert n_samples(dash.gallery.object) == 0
    assert 'class="wb-error"' in dash.gallery.object
    assert "could not read capture file step_0000002.pt" in dash.gallery.object
    dash.tabs.active = 3
    assert "could not read capture file step_0000002.pt" in dash.method_views.object
    dash.tabs.active = 0
    assert "metrics.jsonl: 1 unreadable line(s) skipped" in dash.messages.object
    assert "step_0000002" not in dash.messages.object  # said once, in the gallery
    dash.step.value = 3
    assert "capture file step_0000003.pt is missing" in dash.gallery.object
    dash.tabs.active = 2
    notes = " ".join(str(o.object) for o in dash.quality_pane.objects[1:])
    assert "step 2:" in notes and "step 3:" in notes and "2 of 4 captured steps read" in notes
    dash.step.value = 4  # the page keeps working
    assert n_samples(dash.gallery.object) == 4


def test_refresh_follows_a_running_training(run_copy):
    dash = Dashboard(run_copy.parent, refresh_ms=None, cache=ArtifactCache())
    dash.follow.value = True
    n_train = len(dash.current().records("train"))
    rd = RunDir(run_copy)
    arts = dict(rd.load_artifacts(4))
    rd.save_artifacts(5, 1, arts)
    with open(rd.metrics, "a") as f:
        f.write(json.dumps({"kind": "train", "step": 5, "epoch": 1, "loss": 0.5, "threshold": 0.9}) + "\n")
        f.write('{"kind": "train", "step": 6, "ep')  # still being written
    dash.refresh()
    assert list(dash.step.options.values())[-1] == 5 and dash.step.value == 5
    assert "step 5 · 4 of 4" in dash.gallery.object
    assert len(dash.current().records("train")) == n_train + 1
    assert "threshold" in dash.curves.value  # a new curve shows up, selected by default
    with open(rd.metrics, "a") as f:
        f.write('och": 1, "loss": 0.4}\n')
    dash.refresh()
    assert len(dash.current().records("train")) == n_train + 2
    assert dash.messages.object == ""


def test_runs_without_captures_and_runs_that_appear_later(tmp_path):
    runs = tmp_path / "runs"
    dash = Dashboard(runs, refresh_ms=None, cache=ArtifactCache())
    assert dash.run.options == [] and "no run directories" in dash.gallery.object
    (runs / "fresh").mkdir(parents=True)
    (runs / "fresh" / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "loss": 1.0}) + "\n")
    dash.refresh()
    assert dash.run.value == "fresh"
    assert "no captures yet" in dash.gallery.object
    dash.tabs.active = 1
    assert dash.curves.value == ["loss"] and dash.curves_pane.objects[0].object.startswith(PNG_MAGIC)
    assert "class 0" in dash.cls.options  # no config.yaml: generic class names
    dash.tabs.active = 2
    assert "no capture with both a pseudo-label" in dash.quality_pane.objects[0].object
    with pytest.raises(ValueError, match="runs_dir"):
        Dashboard(runs / "fresh" / "metrics.jsonl", refresh_ms=None)
    with pytest.raises(ValueError, match="max_quality_points"):
        Dashboard(runs, refresh_ms=None, max_quality_points=1)


def test_opens_on_the_most_recently_updated_run(tmp_path):
    runs = tmp_path / "runs"

    def touch(rel: str, t: float) -> None:
        p = runs / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if not p.exists():
            p.write_text(json.dumps({"kind": "train", "step": 1, "loss": 1.0}) + "\n" if p.suffix == ".jsonl" else "{}")
        os.utime(p, (t, t))

    # "a_killed" sorts first but stopped at t=1000; "b" logged at 2000 and finished (summary) at 3000; "c" logged at
    # 2500 and its capture folder changed at 2800; deeper folders (the artifacts folder itself) count too
    touch("a_killed/metrics.jsonl", 1000)
    touch("a_killed/config.yaml", 5000)  # the config is written once at the start: not an update
    touch("b/metrics.jsonl", 2000)
    touch("b/summary.json", 3000)
    touch("c/metrics.jsonl", 2500)
    touch("c/artifacts/index.jsonl", 2800)
    os.utime(runs / "c" / "artifacts", (2800, 2800))
    os.utime(runs / "a_killed", (6000, 6000))
    names = discover_runs(runs)
    assert names == ["a_killed", "b", "c"]
    assert [run_updated(runs / n) for n in names] == [1000, 3000, 2800]
    assert most_recent_run(runs, names) == "b" and most_recent_run(runs, []) is None
    dash = Dashboard(runs, refresh_ms=None, cache=ArtifactCache())
    assert list(dash.run.options) == names and dash.run.value == "b"
    touch("c/artifacts/index.jsonl", 4000)  # c captures again: the choice made stays while b exists
    touch("d/metrics.jsonl", 4500)
    dash.refresh()
    assert dash.run.value == "b"
    shutil.rmtree(runs / "b")  # the selected run is gone: the most recently updated one left
    dash.refresh()
    assert dash.run.value == "d"


def test_method_specific_captures_in_the_app(run_copy):
    rd = RunDir(run_copy)
    arts = dict(rd.load_artifacts(4))
    b, h, w = arts["pseudo"].shape
    arts.update(x_masked=arts["x_w"] // 2, pred_masked=arts["pseudo"], gate=torch.rand(b, h, w).half(),
                corr_rows=torch.rand(b, 3, 8, 8).half(), shapes=torch.rand(b, 3, h, w) > 0.5,
                agents=torch.randint(0, 64, (b, 2)), agent_maps=torch.rand(b, 2, 8, 8).half(),
                features=torch.randn(b, 4, 2, 2).half())
    del arts["feature_labels"]  # a method's own features (RankMatch's) come without labels: y_u colours them
    rd.save_artifacts(5, 1, arts)
    dash = Dashboard(run_copy.parent, refresh_ms=None, cache=ArtifactCache())
    assert dash.step.value == 5
    for caption in ("masked input", "prediction (masked)", "gate"):
        assert f"<figcaption>{caption}</figcaption>" in dash.gallery.object
    dash.tabs.active = 3
    assert dash.method_views.object.count('class="wb-sample-method"') == b
    assert "<figcaption>CorrMatch row 2</figcaption>" in dash.method_views.object
    assert "<figcaption>RankMatch agent 1</figcaption>" in dash.method_views.object
    dash.render_tsne()
    assert dash.tsne_pane.objects[0].object.startswith(PNG_MAGIC)


def test_serve_binds_localhost_and_cli_calls_it(monkeypatch, tmp_path):
    calls, polls = [], []
    monkeypatch.setattr(app_mod.pn, "serve", lambda panels, **kw: calls.append((panels, kw)))
    monkeypatch.setattr(app_mod.pn.state, "add_periodic_callback", lambda fn, period: polls.append(period))
    serve(tmp_path, port=5123)
    factory, kw = calls[-1]
    assert kw["address"] == "127.0.0.1" and kw["port"] == 5123 and kw["show"] is False
    assert "127.0.0.1:5123" in kw["websocket_origin"] and "*" not in kw["websocket_origin"]
    assert isinstance(factory(), app_mod.pn.viewable.Viewable)
    assert polls == [2000]  # each session polls the runs directory
    serve(tmp_path, port=5124, address="0.0.0.0")
    assert calls[-1][1]["websocket_origin"] == ["*"]
    from workbench.cli import main

    assert main(["dashboard", str(tmp_path), "--port", "5125"]) == 0
    assert calls[-1][1]["address"] == "127.0.0.1" and calls[-1][1]["port"] == 5125
    with pytest.raises(ValueError, match="port"):
        serve(tmp_path, port=70000)


def test_session_page_is_replaced_by_the_dashboard_on_load(monkeypatch, runs_dir):
    from workbench.dashboard import server

    monkeypatch.setattr(app_mod.pn.state, "add_periodic_callback", lambda fn, period: None)
    page = server.session_page(runs_dir, None)  # outside a server, "on load" is at once
    assert len(page.objects) == 1 and isinstance(page.objects[0], app_mod.pn.Row)  # the dashboard's layout
    assert "wb-loading" not in str(getattr(page.objects[0], "object", ""))

    def broken(*_):
        raise OSError("disk gone")

    monkeypatch.setattr(app_mod, "build_app", broken)
    page = server.session_page(runs_dir, None)
    assert "the dashboard could not start: OSError: disk gone" in page.objects[0].object


def test_dashboard_command_listens_before_importing_torch(tmp_path):
    """The first page's speed: `workbench dashboard` reaches the server without importing torch, torchvision,
    matplotlib or the dashboard app (a background thread imports them once the server listens)."""
    import subprocess
    import sys

    code = ("import sys\n"
            "import workbench.dashboard.server as server\n"
            "def fake_serve(*args, **kw):\n"
            "    print(sorted(m for m in ('torch', 'torchvision', 'matplotlib', 'workbench.dashboard.app')\n"
            "                 if m in sys.modules))\n"
            "server.serve = fake_serve\n"
            "from workbench.cli import main\n"
            f"sys.exit(main(['dashboard', {str(tmp_path)!r}, '--port', '0']))\n")
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(repo)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_panel_serve_entry_point(monkeypatch, runs_dir):
    """`panel serve workbench/dashboard/app.py --args RUNS_DIR` runs the module under a bokeh_app name."""
    polls = []
    monkeypatch.setattr(app_mod.pn.state, "add_periodic_callback", lambda fn, period: polls.append(period))
    monkeypatch.setattr("sys.argv", ["app.py", str(runs_dir)])
    runpy.run_path(app_mod.__file__, run_name="bokeh_app_test")
    assert polls == [2000]


def test_curve_keys():
    recs = [{"kind": "train", "step": 1, "epoch": 0, "lr": 0.1, "loss": 1.0, "loss_x": 1.0, "pl_acc": 0.5,
             "dyn_threshold": 0.8, "flag": True},
            {"kind": "eval", "step": 1, "miou": 0.3, "iou": [0.1, None], "pixel_acc": 0.9}]
    keys = curve_keys(recs)
    assert keys[:3] == ["loss", "miou", "pl_acc"] and set(keys) == {"loss", "miou", "pl_acc", "loss_x",
                                                                    "dyn_threshold", "pixel_acc"}
    assert default_curves(keys) == ["loss", "miou", "pl_acc", "loss_x", "dyn_threshold"]
