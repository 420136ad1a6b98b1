"""Metrics on confusion matrices worked out by hand, and the distributed all-reduce of ConfusionMeter."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from workbench.engine.metrics import (
    ConfusionMeter,
    class_iou,
    confusion_matrix,
    foreground_stats,
    mean_iou,
    pixel_accuracy,
)

# Hand-built 3-class case, (ground truth, prediction) pairs:
#   GT\pred   0  1  2
#      0      3  1  0
#      1      1  2  1
#      2      0  0  2
# IoU_0 = 3 / (3 + 1 + 1) = 3/5, IoU_1 = 2 / (2 + 2 + 1) = 2/5, IoU_2 = 2 / (2 + 0 + 1) = 2/3,
# mIoU = (3/5 + 2/5 + 2/3) / 3 = 5/9, pixel accuracy = 7/10.
PAIRS = [(0, 0)] * 3 + [(0, 1)] + [(1, 0)] + [(1, 1)] * 2 + [(1, 2)] + [(2, 2)] * 2
EXPECTED_CM = [[3, 1, 0], [1, 2, 1], [0, 0, 2]]
EXPECTED_IOU = [3 / 5, 2 / 5, 2 / 3]


def hand_case() -> tuple[torch.Tensor, torch.Tensor]:
    """The 10 pixels above plus 6 ignored pixels (target 255) with predictions that would change every count."""
    gt = [g for g, _ in PAIRS] + [255] * 6
    pr = [p for _, p in PAIRS] + [0, 1, 2, 2, 1, 0]
    return torch.tensor(pr).reshape(2, 8), torch.tensor(gt).reshape(2, 8)


def test_confusion_matrix_and_iou_by_hand() -> None:
    pred, target = hand_case()
    cm = confusion_matrix(pred, target, 3)
    assert cm.dtype == torch.int64
    assert cm.tolist() == EXPECTED_CM  # the 6 ignored pixels are not counted (sum is 10, not 16)
    assert torch.allclose(class_iou(cm), torch.tensor(EXPECTED_IOU, dtype=torch.float64))
    assert mean_iou(cm) == pytest.approx(5 / 9)
    assert pixel_accuracy(cm) == pytest.approx(7 / 10)


def test_ignore_index_none_counts_everything_in_range() -> None:
    pred = torch.tensor([0, 1, 1, 0])
    target = torch.tensor([0, 1, 0, 0])
    assert confusion_matrix(pred, target, 2, ignore_index=None).tolist() == [[2, 1], [0, 1]]


def test_absent_class_is_nan_and_excluded_from_mean() -> None:
    pred, target = hand_case()
    cm = confusion_matrix(pred, target, 4)  # class 3 in neither prediction nor ground truth
    iou = class_iou(cm)
    assert math.isnan(iou[3].item())
    assert torch.allclose(iou[:3], torch.tensor(EXPECTED_IOU, dtype=torch.float64))
    assert mean_iou(cm) == pytest.approx(5 / 9)


def test_class_in_gt_but_never_predicted_has_iou_zero() -> None:
    # GT: 0 0 1 1 2 2; pred: 0 0 1 1 0 0 -> IoU_2 = 0 / (0 + 2 + 0) = 0, IoU_0 = 2 / (2 + 0 + 2) = 1/2, IoU_1 = 1
    pred = torch.tensor([[0, 0, 1, 1, 0, 0]])
    target = torch.tensor([[0, 0, 1, 1, 2, 2]])
    iou = class_iou(confusion_matrix(pred, target, 3))
    assert iou.tolist() == [0.5, 1.0, 0.0]
    assert mean_iou(confusion_matrix(pred, target, 3)) == pytest.approx(0.5)


def test_empty_matrix_gives_nan() -> None:
    cm = torch.zeros(3, 3, dtype=torch.int64)
    assert math.isnan(mean_iou(cm)) and math.isnan(pixel_accuracy(cm))
    assert torch.isnan(class_iou(cm)).all()


def test_foreground_stats_by_hand() -> None:
    cm = torch.tensor(EXPECTED_CM)
    # background 0: fg-fg block [[2,1],[0,2]] sums to 5, GT fg -> bg: 1 + 0, GT bg -> fg: 1 + 0
    # fg_iou = 5 / (5 + 1 + 1) = 5/7; right class on fg-fg pixels = (2 + 2) / 5 = 0.8
    # GT fg pixels = 4 + 2 = 6 of 10; predicted fg = column 1 + column 2 = 3 + 3 = 6 of 10
    stats = foreground_stats(cm, background=0)
    assert stats["fg_iou"] == pytest.approx(5 / 7)
    assert stats["fg_class_acc"] == pytest.approx(0.8)
    assert stats["fg_gt_frac"] == pytest.approx(0.6)
    assert stats["fg_pred_frac"] == pytest.approx(0.6)
    # background 2: fg = {0, 1}; fg-fg block [[3,1],[1,2]] = 7, GT fg -> bg: 0 + 1, GT bg -> fg: 0 + 0
    # fg_iou = 7 / 8; class acc = (3 + 2) / 7; GT fg = 8/10; predicted fg = (4 + 3) / 10
    stats = foreground_stats(cm, background=2)
    assert stats["fg_iou"] == pytest.approx(7 / 8)
    assert stats["fg_class_acc"] == pytest.approx(5 / 7)
    assert stats["fg_gt_frac"] == pytest.approx(0.8)
    assert stats["fg_pred_frac"] == pytest.approx(0.7)


def test_foreground_stats_finds_objects_but_confuses_classes() -> None:
    # every foreground pixel is found, but classes 1 and 2 are always swapped: fg_iou 1, class accuracy 0
    cm = torch.tensor([[5, 0, 0], [0, 0, 3], [0, 4, 0]])
    stats = foreground_stats(cm)
    assert stats["fg_iou"] == 1.0 and stats["fg_class_acc"] == 0.0
    assert mean_iou(cm) == pytest.approx(1 / 3)  # background IoU 1, both object classes 0


@pytest.mark.parametrize("bad", [3, 7, -1])
def test_target_out_of_range_raises(bad: int) -> None:
    with pytest.raises(ValueError, match="target"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, bad]), 3)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="pred"):
        confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]), 3)
    with pytest.raises(TypeError, match="pred"):
        confusion_matrix(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="num_classes"):
        confusion_matrix(torch.tensor([0]), torch.tensor([0]), 0)
    with pytest.raises(ValueError, match="square"):
        class_iou(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="background"):
        foreground_stats(torch.zeros(3, 3), background=3)


def test_meter_accumulates_and_computes_json_ready() -> None:
    pred, target = hand_case()
    meter = ConfusionMeter(4)  # class 3 absent -> its IoU must come out as None
    meter.update(pred[:1], target[:1])
    meter.update(pred[1:], target[1:])
    out = meter.compute()
    assert out["confusion"] == [row + [0] for row in EXPECTED_CM] + [[0, 0, 0, 0]]
    assert out["miou"] == pytest.approx(5 / 9)
    assert out["iou"][:3] == pytest.approx(EXPECTED_IOU) and out["iou"][3] is None
    assert out["pixel_acc"] == pytest.approx(0.7)
    assert out["fg_iou"] == pytest.approx(5 / 7) and out["fg_class_acc"] == pytest.approx(0.8)
    json.loads(json.dumps(out, allow_nan=False))  # strict JSON: no NaN left anywhere
    meter.reset()
    assert meter.compute()["miou"] is None and meter.compute()["confusion"] == [[0] * 4] * 4


def test_meter_accepts_scores_and_guards_double_reduce() -> None:
    pred, target = hand_case()
    scores = torch.nn.functional.one_hot(pred, 3).permute(2, 0, 1).unsqueeze(0).float()  # [1, 3, 2, 8]
    meter = ConfusionMeter(3)
    meter.update(scores, target.unsqueeze(0))
    assert meter.matrix.tolist() == EXPECTED_CM
    meter.all_reduce()  # no process group: unchanged
    assert meter.matrix.tolist() == EXPECTED_CM
    with pytest.raises(RuntimeError):
        meter.all_reduce()
    with pytest.raises(RuntimeError):
        meter.update(pred, target)


def _reduce_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        pred, target = hand_case()
        meter = ConfusionMeter(3)
        # rank 0 sees the first row of pixels, rank 1 the second: the sum is the hand-worked matrix
        meter.update(pred[rank:rank + 1], target[rank:rank + 1])
        local = meter.matrix.clone()
        meter.all_reduce()
        torch.save({"local": local, "reduced": meter.matrix, "out": meter.compute()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_all_reduce_sums_across_two_gloo_processes(tmp_path) -> None:
    mp.spawn(_reduce_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert results[0]["local"].sum() + results[1]["local"].sum() == 10  # each rank saw only part of the pixels
    assert not torch.equal(results[0]["local"], results[1]["local"])
    for res in results:
        assert res["reduced"].tolist() == EXPECTED_CM
        assert res["out"]["miou"] == pytest.approx(5 / 9)
