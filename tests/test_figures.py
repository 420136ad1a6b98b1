"""Tick labels of the notebooks' and the quickstart's figures do not overlap (workbench.viz.figures)."""
import math

import numpy as np
import pytest
import torch

from workbench.viz.figures import fit_tick_labels, overlapping_tick_labels, plt, step_axis, step_label, training_curves
from workbench.viz.quality import class_quality_bars, class_quality_curves

VOC = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
       "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]


def x_label_boxes(ax):
    """Window boxes of the drawn, non-empty x tick labels inside the view, left to right (measured here, not by the
    code under test)."""
    ax.figure.canvas.draw()
    r = ax.figure.canvas.get_renderer()
    lo, hi = sorted(ax.get_xlim())
    boxes = [lab.get_window_extent(r) for t, lab in zip(ax.get_xticks(), ax.get_xticklabels())
             if lab.get_visible() and lab.get_text() and lo <= t <= hi]
    return sorted(boxes, key=lambda b: b.x0)


def assert_upright_labels_apart(ax):
    boxes = x_label_boxes(ax)
    assert len(boxes) >= 2
    gaps = [b.x0 - a.x1 for a, b in zip(boxes, boxes[1:])]
    assert min(gaps) > 0, f"x tick labels overlap on {ax.get_title()!r}: gaps {gaps} px"


def test_step_label():
    # thousands from 10 000 up, shortest form; below that the plain integer
    assert [step_label(v) for v in (0, 1350, 9999, 10000, 12500, 40000.0)] == ["0", "1350", "9999", "10k", "12.5k",
                                                                                 "40k"]


def test_training_curves_step_ticks_do_not_collide():
    # a 1500-step run logged every 25 steps in four 3.6-inch panels: the former integer locator put 11 labels of up
    # to four digits (0, 150, ..., 1500) on each panel and they touched; now at most 6 round values, apart
    recs = {"run": [{"step": s, **{k: s / 1500 for k in "abcd"}} for s in range(0, 1501, 25)]}
    fig = training_curves(recs, list("abcd"))
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert len(ticks) <= 6 and all(t % 250 == 0 for t in ticks), ticks  # steps of 1, 2, 2.5, 5 x 10^k
        assert_upright_labels_apart(ax)
    plt.close(fig)


def test_long_runs_label_thousands():
    recs = {"run": [{"step": s, "miou": 0.5} for s in range(0, 40001, 1000)]}
    fig = training_curves(recs, ["miou", "miou", "miou"])
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels() if t.get_text()]
    assert "20k" in labels and "20000" not in labels
    for ax in fig.axes:
        assert_upright_labels_apart(ax)
    plt.close(fig)


def test_class_quality_curves_ticks_apart():
    # four captures 300 steps apart in 3.3-inch panels (the former locator: 13 labels, 300 ... 1500 by 100)
    q = {k: torch.rand(6) for k in ("iou", "precision", "mask_ratio", "mining_ratio")}
    fig = class_quality_curves([(s, q) for s in (300, 600, 900, 1200, 1500)], [f"c{i}" for i in range(6)],
                               [[i * 40, 0, 0] for i in range(6)])
    for ax in fig.axes:
        assert_upright_labels_apart(ax)
    plt.close(fig)


def test_fixed_labels_turn_until_they_fit():
    # ten VOC names on a 2.5-inch axis at 110 dpi: ticks (axis width / 10) apart; upright they overlap, at 45 degrees
    # the gap between the parallel text lines is spacing * sin 45 against the 10-point text height (10/72 * 110 px)
    fig, ax = plt.subplots(figsize=(2.5, 2.0), dpi=110, layout="constrained")
    ax.set_xticks(range(10), VOC[:10], fontsize=10)
    ax.set_xlim(-0.5, 9.5)
    assert overlapping_tick_labels(fig) == [(ax, "x")]
    fit_tick_labels(fig)
    fig.canvas.draw()
    spacing = ax.get_window_extent().width / 10
    rot = ax.get_xticklabels()[0].get_rotation()
    assert rot in (45.0, 90.0)
    height = 10 / 72 * 110
    assert spacing * math.sin(math.radians(rot)) > height
    if rot == 90.0:  # vertical: the boxes themselves must be apart
        assert_upright_labels_apart(ax)
    assert overlapping_tick_labels(fig) == []
    plt.close(fig)


def test_fixed_labels_shrink_then_thin_when_turning_is_not_enough():
    # 21 names, ticks 0..20 on a 1.3-inch figure at 110 dpi: the axes span 0.775 x 143 = 110.8 px over the x range
    # 20 x 1.1 (5 % margins) = 22, so ticks are 5.04 px apart. A 6-point line is 6 / 72 x 110 = 9.17 px (+ 1 px pad):
    # turned to 90 degrees and shrunk to 6 points, every other label is hidden (10.07 px: still < 10.17), then every
    # other again (20.1 px): labels 0, 4, 8, ..., 20 stay
    fig, ax = plt.subplots(figsize=(1.3, 2.0), dpi=110)
    ax.set_xticks(range(21), VOC, fontsize=8)
    fit_tick_labels(fig, max_rounds=30)
    labels = [tick.label1 for tick in ax.xaxis.get_major_ticks(21)]
    assert labels[0].get_rotation() == 90.0 and labels[0].get_fontsize() == 6.0
    assert [lab.get_visible() for lab in labels] == [i % 4 == 0 for i in range(21)]
    plt.close(fig)


@pytest.mark.parametrize("n", [6, 21])
def test_class_quality_bars_names_readable(n):
    names = VOC[:n]
    q = {k: torch.tensor(np.linspace(0.1, 0.9, n)) for k in ("iou", "precision", "mask_ratio", "mining_ratio")}
    fig = class_quality_bars(q, names, [[10 * i, 0, 0] for i in range(n)])
    assert overlapping_tick_labels(fig) == []
    plt.close(fig)


def test_step_axis_caps_the_ticks():
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1350], [0, 1])
    step_axis(ax)
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if 0 <= t <= 1350]
    # the view spans 1350 x 1.1 = 1485 (5 % margins); 1485 / 5 bins = 297 -> the next allowed step (1, 2, 2.5, 5, 10
    # x 100) is 500
    assert ticks == [0, 500, 1000]
    plt.close(fig)
