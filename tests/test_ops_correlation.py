"""CorrMatch ops: correlation map, pixel/region propagation, shapes, dynamic threshold (numbers worked by hand)."""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from workbench.ops.correlation import (
    correlation_map,
    pixel_propagation,
    region_propagation,
    region_propagation_reference,
    sample_rows,
    shapes_from_rows,
)
from workbench.ops.threshold import DynamicThreshold, class_max_confidence

E2 = math.e**2
BOTH = pytest.mark.parametrize("propagate", [region_propagation, region_propagation_reference])


def line(values: list[int]) -> torch.Tensor:
    """A [1, 1, W] tensor (one image, one row of pixels)."""
    return torch.tensor(values).reshape(1, 1, -1)


def shape_set(width: int, *members: list[int]) -> torch.Tensor:
    """Shapes [1, M, 1, W] from lists of member pixel indices."""
    out = torch.zeros(1, len(members), 1, width, dtype=torch.bool)
    for m, pixels in enumerate(members):
        out[0, m, 0, pixels] = True
    return out


# ---------------------------------------------------------------------------------------------- correlation map
def test_correlation_map_rows_are_f1_pixels_and_scaled_by_sqrt_d() -> None:
    # D = 4, one row of two pixels. f1: a = (2,0,0,0), b = 0; f2: c = (1,0,0,0), d = (3,0,0,0).
    f1 = torch.zeros(1, 4, 1, 2)
    f1[0, 0, 0, 0] = 2.0
    f2 = torch.zeros(1, 4, 1, 2)
    f2[0, 0, 0, 0], f2[0, 0, 0, 1] = 1.0, 3.0
    corr = correlation_map(f1, f2)
    # row a: logits (2*1, 2*3) / sqrt(4) = (1, 3) -> softmax (1, e^2) / (1 + e^2); row b: logits (0, 0) -> (0.5, 0.5)
    expected = torch.tensor([[[1 / (1 + E2), E2 / (1 + E2)], [0.5, 0.5]]])
    assert torch.allclose(corr, expected, atol=1e-6)
    assert torch.allclose(corr.sum(-1), torch.ones(1, 2))


def test_correlation_map_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="same shape"):
        correlation_map(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 3))
    with pytest.raises(ValueError, match="f1"):
        correlation_map(torch.zeros(4, 2, 2), torch.zeros(4, 2, 2))
    with pytest.raises(TypeError, match="f1"):
        correlation_map([1.0], torch.zeros(1, 4, 2, 2))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- pixel propagation
def test_pixel_propagation_uses_pred_times_corr() -> None:
    # pred: class 0 on pixel 0, class 1 on pixel 1. out[k, j] = sum_i pred[k, i] C[i, j] -> row k of C for class k.
    pred = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # [1, 2, 1, 2]
    corr = torch.tensor([[[0.9, 0.1], [0.3, 0.7]]])
    out = pixel_propagation(pred, corr)
    # (the transposed product would put 0.3 at [0, 0, 0, 1])
    assert torch.allclose(out, torch.tensor([[[[0.9, 0.1]], [[0.3, 0.7]]]]))


def test_pixel_propagation_resizes_logits_and_detaches() -> None:
    # constant logits (2 for class 0, -1 for class 1) stay constant under bilinear resizing to the 1x2 feature size
    logits = torch.stack([torch.full((4, 6), 2.0), torch.full((4, 6), -1.0)])[None].requires_grad_()
    corr = torch.tensor([[[0.25, 0.75], [0.5, 0.5]]])
    out = pixel_propagation(logits, corr, feat_size=(1, 2))
    # column sums of C: (0.75, 1.25) -> class 0: 2 * (0.75, 1.25), class 1: -1 * (0.75, 1.25)
    assert torch.allclose(out, torch.tensor([[[[1.5, 2.5]], [[-0.75, -1.25]]]]))
    assert not out.requires_grad
    with pytest.raises(ValueError, match="feat_size"):
        pixel_propagation(logits, corr)


# ---------------------------------------------------------------------------------------------- shapes
def test_shapes_from_rows_resize_normalise_threshold() -> None:
    corr = torch.zeros(1, 4, 4)
    corr[0, 2] = torch.tensor([0.0, 0.1, 0.2, 1.0])  # 2x2 map [[0, .1], [.2, 1]]
    corr[0, 1] = 0.25  # a constant row -> empty shape
    shapes = shapes_from_rows(corr, torch.tensor([[2, 1]]), (2, 2), (3, 3))
    # bilinear, align_corners: rows y = 0, .5, 1 of [[0, .05, .1], [.1, .325, .55], [.2, .6, 1]]; min 0, max 1
    expected = torch.tensor([[False, False, False], [False, False, True], [False, True, True]])
    assert shapes.shape == (1, 2, 3, 3) and shapes.dtype == torch.bool
    assert torch.equal(shapes[0, 0], expected)
    assert not shapes[0, 1].any()


def test_sample_rows_range_and_reproducibility() -> None:
    rows = sample_rows(3, 10, 50, generator=torch.Generator().manual_seed(1))
    again = sample_rows(3, 10, 50, generator=torch.Generator().manual_seed(1))
    assert rows.shape == (3, 50) and rows.dtype == torch.long
    assert int(rows.min()) >= 0 and int(rows.max()) == 9  # the last row can be drawn
    assert torch.equal(rows, again)


# ---------------------------------------------------------------------------------------------- region propagation
@BOTH
def test_region_order_of_shapes_changes_the_answer(propagate) -> None:
    # pixels 0..5, confident all but pixel 5, labels [0 0 0 1 1 2], tau 0.6; A = {0,1,2,3}, B = {3,4,5}
    pseudo = line([0, 0, 0, 1, 1, 2])
    confident = line([1, 1, 1, 1, 1, 0]).bool()
    a, b = [0, 1, 2, 3], [3, 4, 5]
    # A then B: A has r1 = 1, class 0 at 3/4 > 0.6 -> A painted 0 -> [0 0 0 0 1 2]. B: r1 = 2/3 >= 0.6, current labels
    # of its confident pixels {3, 4} = {0, 1}: share 1/2 -> unchanged.
    out, conf = propagate(pseudo, confident, shape_set(6, a, b), 0.6)
    assert out.tolist() == [[[0, 0, 0, 0, 1, 2]]]
    assert conf.tolist() == [[[True] * 5 + [False]]]
    # B then A: B sees {1, 1} -> share 1 -> B painted 1 -> [0 0 0 1 1 1], pixel 5 confident. A: {0,0,0,1} -> 0.
    out, conf = propagate(pseudo, confident, shape_set(6, b, a), 0.6)
    assert out.tolist() == [[[0, 0, 0, 0, 1, 1]]]
    assert conf.tolist() == [[[True] * 6]]


@BOTH
def test_region_r1_uses_the_input_confident_mask(propagate) -> None:
    # S1 = {0,1}: r1 = 1/2 (not < 0.5), class 0 share 1 -> painted 0 and both confident in the output.
    # S2 = {1,2}: pixel 1 is confident only in the *output* mask, so |S2 & Q| = 0 -> skipped (pixel 2 keeps 3).
    out, conf = propagate(line([0, 1, 3]), line([1, 0, 0]).bool(), shape_set(3, [0, 1], [1, 2]), 0.5)
    assert out.tolist() == [[[0, 0, 3]]]
    assert conf.tolist() == [[[True, True, False]]]


@BOTH
def test_region_tie_goes_to_smallest_class(propagate) -> None:
    # classes 3, 3, 1, 1 under the shape: shares 1/2 each > tau 0.4 -> the smaller class id, 1, wins
    out, conf = propagate(line([3, 3, 1, 1, 5]), line([1, 1, 1, 1, 0]).bool(), shape_set(5, [0, 1, 2, 3, 4]), 0.4)
    assert out.tolist() == [[[1, 1, 1, 1, 1]]]
    assert conf.all()


@BOTH
def test_region_shapes_below_tau_are_skipped(propagate) -> None:
    pseudo, confident = line([0, 0, 0, 1, 2, 2]), line([1, 1, 1, 1, 0, 0]).bool()
    # {0,1,2,3,4}: r1 = 4/5 = 0.8 < 0.9 -> skipped although its confident labels are 3/4 class 0
    # {0,1,2,3}: r1 = 1, r2 = 3/4 = 0.75, not > 0.75 -> unchanged (strict comparison)
    out, conf = propagate(pseudo, confident, shape_set(6, [0, 1, 2, 3, 4]), 0.9)
    assert torch.equal(out, pseudo) and torch.equal(conf, confident)
    out, conf = propagate(pseudo, confident, shape_set(6, [0, 1, 2, 3]), 0.75)
    assert torch.equal(out, pseudo) and torch.equal(conf, confident)
    # with tau 0.7, r2 = 0.75 > 0.7 -> painted
    out, _ = propagate(pseudo, confident, shape_set(6, [0, 1, 2, 3]), 0.7)
    assert out.tolist() == [[[0, 0, 0, 0, 2, 2]]]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_region_vectorised_equals_loop_on_random_inputs(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    b, m, h, w, k = 3, 24, 9, 11, 4
    # blocky labels so that shapes often hold one dominant class; a few confident pixels relabelled to other classes
    pseudo = torch.randint(k, (b, 1, 3, 3), generator=g).float()
    pseudo = torch.nn.functional.interpolate(pseudo, size=(h, w), mode="nearest").long()[:, 0]
    noise = torch.rand(b, h, w, generator=g) < 0.1
    pseudo = torch.where(noise, torch.randint(k, (b, h, w), generator=g), pseudo)
    confident = torch.rand(b, h, w, generator=g) < 0.85
    pseudo = torch.where(confident, pseudo, torch.full_like(pseudo, 255))  # ignored values off the mask
    shapes = torch.rand(b, m, 1, 1, generator=g) < 0.5
    cx, cy = torch.rand(b, m, 1, 1, generator=g) * w, torch.rand(b, m, 1, 1, generator=g) * h
    radius = 1 + torch.rand(b, m, 1, 1, generator=g) * 4
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    shapes = ((xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2) | (shapes & (torch.rand(b, m, h, w, generator=g) < 0.05))
    tau = [0.5, 0.7, torch.tensor(0.8), 0.6][seed]
    expected = region_propagation_reference(pseudo, confident, shapes, tau)
    got = region_propagation(pseudo, confident, shapes, tau, num_classes=k if seed % 2 else None)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert not torch.equal(expected[0], pseudo)  # the case exercises some repainting


@pytest.mark.parametrize(("h", "w", "m", "k"), [(1, 1, 20, 3), (1, 3, 30, 2), (4, 5, 260, 300)])
def test_region_edge_sizes_equal_loop(h: int, w: int, m: int, k: int) -> None:
    # one-pixel images (an inner size of 1 breaks torch's CPU int8 matmul), > 256 classes, >= 256 shapes
    g = torch.Generator().manual_seed(h * 100 + m)
    for _ in range(5):
        block = torch.randint(k, (3, 1, 1, 1), generator=g).expand(3, 1, h, w)
        pseudo = torch.where(torch.rand(3, h, w, generator=g) < 0.2, torch.randint(k, (3, h, w), generator=g),
                             block[:, 0])
        confident = torch.rand(3, h, w, generator=g) < 0.8
        shapes = torch.rand(3, m, h, w, generator=g) < 0.6
        expected = region_propagation_reference(pseudo, confident, shapes, 0.55)
        got = region_propagation(pseudo, confident, shapes, 0.55)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_region_input_checks_and_inputs_untouched() -> None:
    pseudo, confident = line([0, 1]), line([1, 1]).bool()
    shapes = shape_set(2, [0, 1])
    before = pseudo.clone()
    region_propagation(pseudo, confident, shapes, 0.4)
    assert torch.equal(pseudo, before)
    with pytest.raises(TypeError, match="pseudo"):
        region_propagation(pseudo.float(), confident, shapes, 0.5)
    with pytest.raises(TypeError, match="confident"):
        region_propagation(pseudo, confident.long(), shapes, 0.5)
    with pytest.raises(ValueError, match="shapes"):
        region_propagation(pseudo, confident, shapes[:, :, :, :1], 0.5)
    with pytest.raises(ValueError, match="num_classes"):
        region_propagation(pseudo, confident, shapes, 0.5, num_classes=1)
    with pytest.raises(ValueError, match="non-negative"):
        region_propagation(line([-1, 0]), confident, shapes, 0.5)
    with pytest.raises(TypeError, match="tau"):
        region_propagation(pseudo, confident, shapes, "0.5")  # type: ignore[arg-type]
    empty = region_propagation(pseudo, confident, shapes[:, :0], 0.5)
    assert torch.equal(empty[0], pseudo) and torch.equal(empty[1], confident)


# ---------------------------------------------------------------------------------------------- dynamic threshold
def probs_logits(probs: list[list[float]]) -> torch.Tensor:
    """Logits [1, K, 1, W] whose softmax over K gives ``probs`` (one list of K values per pixel)."""
    return torch.tensor(probs).log().t().reshape(1, len(probs[0]), 1, len(probs))


PIXELS = [[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.8, 0.1, 0.1]]  # predictions 0, 1, 0 with confidences .7, .6, .8


def test_class_max_confidence() -> None:
    maxima = class_max_confidence(probs_logits(PIXELS))
    assert torch.allclose(maxima, torch.tensor([0.8, 0.6, -1.0]), atol=1e-6)  # class 2 never predicted
    ignored = class_max_confidence(probs_logits(PIXELS), torch.tensor([[[0, 0, 255]]]))
    assert torch.allclose(ignored, torch.tensor([0.7, 0.6, -1.0]), atol=1e-6)


def test_dynamic_threshold_two_steps_by_hand() -> None:
    thr = DynamicThreshold(init=0.85, momentum=0.9)
    # step 1: class maxima 0.8 (class 0) and 0.6 (class 1) -> mean 0.7 -> 0.9 * 0.85 + 0.1 * 0.7 = 0.835
    assert float(thr.update(probs_logits(PIXELS))) == pytest.approx(0.835, abs=1e-6)
    # step 2: pixel 2 ignored (bool mask) -> maxima 0.7, 0.6 -> mean 0.65 -> 0.9 * 0.835 + 0.1 * 0.65 = 0.8165
    thr.update(probs_logits(PIXELS), torch.tensor([[[False, False, True]]]))
    assert float(thr.value) == pytest.approx(0.8165, abs=1e-6)
    # the paper's momentum: 0.999 * 0.85 + 0.001 * 0.7 = 0.84985
    assert float(DynamicThreshold().update(probs_logits(PIXELS))) == pytest.approx(0.84985, abs=1e-6)


def test_dynamic_threshold_state_and_all_ignored() -> None:
    thr = DynamicThreshold(init=0.85, momentum=0.5)
    thr.update(probs_logits(PIXELS), torch.full((1, 1, 3), 255))  # nothing left -> unchanged
    assert float(thr.value) == pytest.approx(0.85)
    thr.update(probs_logits(PIXELS))  # 0.5 * 0.85 + 0.5 * 0.7 = 0.775
    state = thr.state_dict()
    assert set(state) == {"value"}
    restored = DynamicThreshold(init=0.5, momentum=0.5)
    restored.load_state_dict(state)
    assert float(restored.value) == pytest.approx(0.775, abs=1e-6)
    with pytest.raises(ValueError, match="momentum"):
        DynamicThreshold(momentum=1.5)


def _ddp_worker(rank: int, world: int, init_file: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        thr = DynamicThreshold(init=0.85, momentum=0.5)
        # rank 0 predicts class 0 at 0.7 and class 1 at 0.6; rank 1 predicts class 0 at 0.8 and class 2 at 0.9
        mine = [[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]] if rank == 0 else [[0.8, 0.1, 0.1], [0.05, 0.05, 0.9]]
        thr.update(probs_logits(mine))
        torch.save(thr.value, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


def test_dynamic_threshold_is_shared_across_processes() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ddp_worker, args=(2, os.path.join(tmp, "init"), os.path.join(tmp, "value")), nprocs=2)
        values = [float(torch.load(os.path.join(tmp, f"value.{r}"))) for r in range(2)]
    # gathered maxima: class 0 -> 0.8, class 1 -> 0.6, class 2 -> 0.9; mean 2.3 / 3 -> 0.5 * 0.85 + 0.5 * 2.3 / 3
    assert values[0] == values[1] == pytest.approx(0.5 * 0.85 + 0.5 * 2.3 / 3, abs=1e-6)
