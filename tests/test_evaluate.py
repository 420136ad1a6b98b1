"""Sliding window, multi-scale/flip, centre crop, settings and evaluate() on hand-worked cases."""
from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from workbench import registry
from workbench.engine.evaluate import (
    EvalSettings,
    center_crop,
    clipped_window_starts,
    evaluate,
    multiscale_logits,
    sliding_window_coverage,
    sliding_window_logits,
    sliding_window_probs,
    window_starts,
)

torch.manual_seed(0)


def conv1x1(in_ch: int = 3, k: int = 4) -> torch.nn.Conv2d:
    """A per-pixel (translation- and flip-equivariant) logits function."""
    torch.manual_seed(1)
    return torch.nn.Conv2d(in_ch, k, 1)


@pytest.mark.parametrize("size, window, stride, expected", [
    (10, 4, 3, [0, 3, 6]),       # divides exactly: 6 + 4 = 10
    (11, 4, 3, [0, 3, 6, 7]),    # last window clamped to end at 11
    (6, 4, 3, [0, 2]),
    (4, 4, 2, [0]),
    (3, 4, 2, [0]),              # smaller than the window: one (padded) window
])
def test_window_starts_by_hand(size: int, window: int, stride: int, expected: list[int]) -> None:
    assert window_starts(size, window, stride) == expected


def test_coverage_by_hand() -> None:
    # H = 6, window 4, stride 3: starts 0, 2 -> row counts 1 1 2 2 1 1
    # W = 5, window 4, stride 3: starts 0, 1 -> col counts 1 2 2 2 1
    rows = torch.tensor([1, 1, 2, 2, 1, 1])
    cols = torch.tensor([1, 2, 2, 2, 1])
    assert torch.equal(sliding_window_coverage(6, 5, 4, 3), rows[:, None] * cols[None, :])
    # non-square window (3, 2), stride (3, 1) on 3 x 4: one row band; col starts 0, 1, 2 -> 1 2 2 1
    assert sliding_window_coverage(3, 4, (3, 2), (3, 1)).tolist() == [[1, 2, 2, 1]] * 3


@pytest.mark.parametrize("h, w, window, stride", [
    (7, 9, 4, 3), (10, 10, 5, 5), (5, 13, (3, 4), (2, 3)), (2, 3, 4, 2), (3, 10, 5, 2), (11, 11, 4, 1),
])
def test_sliding_window_covers_every_pixel(h: int, w: int, window, stride) -> None:
    wh, ww = (window, window) if isinstance(window, int) else window
    calls: list[tuple[int, int]] = []
    # channels 0/1 carry each pixel's row/col index, so a window's top-left pixel tells where it was cut
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    image = torch.stack([ys, xs, torch.zeros_like(ys)])[None]

    def ones(x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-2:] == (wh, ww)  # every window has the full window size (padded when needed)
        calls.append((int(x[0, 0, 0, 0]), int(x[0, 1, 0, 0])))
        return torch.ones(x.shape[0], 2, wh, ww)

    out = sliding_window_logits(ones, image, window, stride, num_classes=2)
    assert out.shape == (1, 2, h, w)
    assert torch.equal(out, torch.ones_like(out))  # an uncovered pixel would be 0/0 = NaN
    count = torch.zeros(max(h, wh), max(w, ww), dtype=torch.int64)
    for y, x in calls:
        count[y:y + wh, x:x + ww] += 1
    count = count[:h, :w]
    assert count.min() >= 1
    assert torch.equal(count, sliding_window_coverage(h, w, window, stride))
    assert len(calls) == len(set(calls))


@pytest.mark.parametrize("window, stride", [(5, 3), ((4, 6), (3, 2)), (16, 7), ((20, 4), (10, 3))])
def test_sliding_equals_whole_image_for_per_pixel_fn(window, stride) -> None:
    fn = conv1x1()
    image = torch.randn(2, 3, 11, 13)
    with torch.no_grad():
        whole = fn(image)
        sliding = sliding_window_logits(fn, image, window, stride, num_classes=4)
        inferred_k = sliding_window_logits(fn, image, window, stride)
    assert torch.allclose(sliding, whole, atol=1e-5)
    assert torch.equal(sliding, inferred_k)


def test_sliding_rejects_bad_arguments() -> None:
    fn = conv1x1()
    image = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="stride"):
        sliding_window_logits(fn, image, 4, 5, 4)
    with pytest.raises(ValueError, match="window"):
        sliding_window_logits(fn, image, 0, 1, 4)
    with pytest.raises(ValueError, match="fn returned"):
        sliding_window_logits(fn, image, 4, 2, num_classes=3)
    with pytest.raises(ValueError, match="image"):
        sliding_window_logits(fn, torch.randn(3, 8, 8), 4, 2, 4)


def test_multiscale_single_scale_is_softmax_of_whole_image() -> None:
    fn = conv1x1()
    image = torch.randn(2, 3, 9, 10)
    with torch.no_grad():
        expected = fn(image).softmax(1)
        assert torch.allclose(multiscale_logits(fn, image), expected, atol=1e-6)
        assert torch.allclose(multiscale_logits(fn, image, mode="sliding", window=4, stride=3), expected, atol=1e-6)


@pytest.mark.parametrize("scales", [(1.0,), (0.75, 1.0, 1.5)])
def test_flip_with_flip_equivariant_fn_changes_nothing(scales) -> None:
    fn = conv1x1()
    image = torch.randn(1, 3, 12, 15)
    with torch.no_grad():
        plain = multiscale_logits(fn, image, scales=scales)
        flipped = multiscale_logits(fn, image, scales=scales, flip=True)
    assert torch.allclose(plain, flipped, atol=1e-5)
    assert torch.allclose(plain.sum(1), torch.ones(1, 12, 15), atol=1e-5)


def test_multiscale_resizes_input_and_output() -> None:
    sizes: list[tuple[int, int]] = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        sizes.append(tuple(x.shape[-2:]))
        return torch.zeros(x.shape[0], 3, *x.shape[-2:])

    out = multiscale_logits(fn, torch.randn(2, 3, 10, 12), scales=(0.5, 1.5), flip=True)
    assert sizes == [(5, 6), (5, 6), (15, 18), (15, 18)]
    assert out.shape == (2, 3, 10, 12)
    assert torch.allclose(out, torch.full_like(out, 1 / 3))  # zero logits -> uniform probabilities
    with pytest.raises(ValueError, match="scales"):
        multiscale_logits(fn, torch.randn(1, 3, 4, 4), scales=())
    with pytest.raises(ValueError, match="mode"):
        multiscale_logits(fn, torch.randn(1, 3, 4, 4), mode="tiles")
    with pytest.raises(ValueError, match="window"):
        multiscale_logits(fn, torch.randn(1, 3, 4, 4), mode="sliding")
    with pytest.raises(ValueError, match="fn returned"):
        multiscale_logits(lambda x: torch.zeros(1, 3, 2, 2), torch.randn(1, 3, 4, 4))


# ------------------------------------------------------------------------------------------------ UniMatch's tiling
@pytest.mark.parametrize("size, window, stride, expected", [
    (2048, 801, 534, [0, 534, 1068, 1602]),   # Cityscapes width: the last tile [1602, 2048) is 446 wide
    (1024, 801, 534, [0, 534]),               # Cityscapes height: [534, 1024) is 490 high
    (10, 4, 3, [0, 3, 6, 9]),                 # 9 < 10: a 1-pixel border tile, not shifted back to 6
    (11, 4, 3, [0, 3, 6, 9]),
    (3, 4, 2, [0, 2]),                        # smaller than the window: clipped tiles [0, 3) and [2, 3), no padding
    (4, 4, 4, [0]),
])
def test_clipped_window_starts_by_hand(size: int, window: int, stride: int, expected: list[int]) -> None:
    assert clipped_window_starts(size, window, stride) == expected
    assert int(801 * 2 / 3) == EvalSettings(mode="sliding", crop_size=801).resolved_stride == 534


def test_unimatch_tiles_on_a_cityscapes_image() -> None:
    tiles: list[tuple[int, int, int, int]] = []
    ys, xs = torch.meshgrid(torch.arange(1024.0), torch.arange(2048.0), indexing="ij")
    image = torch.stack([ys, xs, torch.zeros_like(ys)])[None]

    def fn(x: torch.Tensor) -> torch.Tensor:
        tiles.append((int(x[0, 0, 0, 0]), int(x[0, 1, 0, 0]), x.shape[-2], x.shape[-1]))
        return torch.zeros(1, 2, *x.shape[-2:])

    out = sliding_window_probs(fn, image, 801, 534)
    # rows start 0, 534 (heights 801, 490); columns 0, 534, 1068, 1602 (widths 801, 801, 801, 446)
    assert tiles == [(y, x, h, w) for y, h in ((0, 801), (534, 490))
                     for x, w in ((0, 801), (534, 801), (1068, 801), (1602, 446))]
    # zero logits: every tile adds (1/2, 1/2); a pixel holds 1/2 x its number of tiles (summed, not averaged):
    # (600, 600): rows [0, 801) and [534, 1024), columns [0, 801) and [534, 1335) -> 4 tiles -> 2.0;
    # (100, 1868): one row band, columns [1068, 1869) and [1602, 2048) -> 1.0; (100, 1869): only [1602, 2048) -> 0.5
    assert out[0, 0, 0, 0] == 0.5 and out[0, 0, 600, 600] == 2.0 and out[0, 0, 1023, 2047] == 0.5
    assert out[0, 0, 600, 1700] == 2.0 and out[0, 0, 100, 1869] == 0.5 and out[0, 0, 100, 1868] == 1.0
    cover = sliding_window_coverage(1024, 2048, 801, 534, "clipped_sum")
    assert torch.equal(out[0, 0] * 2, cover.float()) and int(cover.max()) == 4


def test_sliding_sums_tile_softmax_not_logits() -> None:
    # width 5, window (1, 4), stride 3: tiles [0, 4) and [3, 5) overlap at column 3. The first tile predicts logits
    # (0, 10, 9.9), the second (5, 0, 0) at every pixel. Column 3, summed softmax:
    #   p_A = softmax(0, 10, 9.9) = (e^-10, 1, e^-0.1) / (e^-10 + 1 + e^-0.1) ~ (0.00002, 0.525, 0.475)
    #   p_B = softmax(5, 0, 0) = (e^5, 1, 1) / (e^5 + 2) ~ (0.987, 0.0066, 0.0066)
    #   sum ~ (0.987, 0.532, 0.482) -> class 0; averaged logits (2.5, 5, 4.95) would give class 1
    a, b = torch.tensor([0.0, 10.0, 9.9]), torch.tensor([5.0, 0.0, 0.0])

    def fn(x: torch.Tensor) -> torch.Tensor:
        logits = a if int(x[0, 0, 0, 0]) == 0 else b
        return logits.view(1, 3, 1, 1).expand(x.shape[0], 3, *x.shape[-2:]).clone()

    image = torch.stack([torch.arange(5.0).view(1, 5), torch.zeros(1, 5), torch.zeros(1, 5)])[None]
    out = sliding_window_probs(fn, image, (1, 4), (1, 3))
    pa, pb = torch.exp(a) / torch.exp(a).sum(), torch.exp(b) / torch.exp(b).sum()
    assert torch.allclose(out[0, :, 0, 3], pa + pb, atol=1e-6)
    assert torch.allclose(out[0, :, 0, 0], pa, atol=1e-6) and torch.allclose(out[0, :, 0, 4], pb, atol=1e-6)
    assert out[0, :, 0, 3].argmax() == 0
    shifted = sliding_window_logits(fn, image, (1, 4), (1, 3))    # tiles [0, 4) and [1, 5): mean logits
    assert shifted[0, :, 0, 3].argmax() == 1
    # through evaluate(): GT class 0 at column 3 -> correct with the default tiling, wrong with shifted_mean
    mask = torch.full((1, 1, 5), 255)
    mask[0, 0, 3] = 0
    default = evaluate(fn, [(image, mask)], 3, EvalSettings(mode="sliding", window=4, stride=3), "cpu",
                       progress=False)
    assert default["confusion"][0] == [1, 0, 0]
    old = evaluate(fn, [(image, mask)], 3, EvalSettings(mode="sliding", window=4, stride=3,
                                                        sliding_tiles="shifted_mean"), "cpu", progress=False)
    assert old["confusion"][0] == [0, 1, 0]
    with pytest.raises(ValueError, match="sliding_tiles"):
        EvalSettings(sliding_tiles="mean")


def test_clipped_tiles_cover_small_images_without_padding() -> None:
    sizes: list[tuple[int, int]] = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        sizes.append(tuple(x.shape[-2:]))
        return torch.zeros(x.shape[0], 2, *x.shape[-2:])

    # 3 x 5 image, window 4, stride 2: rows 0, 2 (heights 3, 1); columns 0, 2, 4 (widths 4, 3, 1)
    out = sliding_window_probs(fn, torch.zeros(2, 3, 3, 5), 4, 2)
    assert sizes == [(3, 4), (3, 3), (3, 1), (1, 4), (1, 3), (1, 1)]
    # coverage rows (1, 1, 2), columns (1, 1, 2, 2, 2) -> probabilities 1/2 x count
    rows, cols = torch.tensor([1, 1, 2]), torch.tensor([1, 1, 2, 2, 2])
    assert torch.equal(sliding_window_coverage(3, 5, 4, 2, "clipped_sum"), rows[:, None] * cols[None, :])
    assert torch.equal(out[:, 0] * 2, (rows[:, None] * cols[None, :]).float().expand(2, 3, 5))
    # multiscale_logits divides by the coverage: a per-pixel fn gives its own softmax back
    net = conv1x1()
    image = torch.randn(1, 3, 7, 9)
    with torch.no_grad():
        got = multiscale_logits(net, image, mode="sliding", window=4, stride=3)
        assert torch.allclose(got, net(image).softmax(1), atol=1e-6)


def test_center_crop_by_hand() -> None:
    image = torch.arange(30.0).reshape(1, 1, 5, 6)
    mask = torch.arange(30).reshape(1, 5, 6)
    img, msk = center_crop(image, mask, 3)  # top = (5 - 3) // 2 = 1, left = (6 - 3) // 2 = 1
    assert img[0, 0].tolist() == [[7.0, 8.0, 9.0], [13.0, 14.0, 15.0], [19.0, 20.0, 21.0]]
    assert msk[0].tolist() == [[7, 8, 9], [13, 14, 15], [19, 20, 21]]
    img, msk = center_crop(image, mask, (8, 4))  # height 5 < 8 stays; width cropped from left = 1
    assert msk[0].tolist() == [[r * 6 + c for c in range(1, 5)] for r in range(5)]
    img, msk = center_crop(image, mask, 10)  # smaller than the size: untouched
    assert torch.equal(img, image) and torch.equal(msk, mask)
    with pytest.raises(ValueError, match="mask"):
        center_crop(image, mask[..., :5], 3)


def test_eval_settings_defaults_and_validation() -> None:
    s = EvalSettings()
    assert (s.mode, s.resolved_window, s.resolved_stride, s.scales, s.flip) == ("original", 321, 214, (1.0,), False)
    assert EvalSettings(mode="sliding", crop_size=30).resolved_stride == 20
    assert EvalSettings(window=9).resolved_stride == 6 and EvalSettings(window=9, stride=9).resolved_stride == 9
    assert EvalSettings(scales=[0.5, 1]).scales == (0.5, 1)
    with pytest.raises(ValueError, match="original.*center_crop.*sliding"):
        EvalSettings(mode="whole")
    with pytest.raises(ValueError, match="stride"):
        EvalSettings(window=10, stride=11)
    with pytest.raises(ValueError, match="crop_size"):
        EvalSettings(crop_size=0)
    with pytest.raises(ValueError, match="scales"):
        EvalSettings(scales=(1.0, -0.5))


# Hand-worked evaluation case, K = 3, two 2 x 3 images (255 = ignored):
#   A: GT [[0,0,1],[1,2,2]]   pred [[0,1,1],[1,2,0]]
#   B: GT [[0,0,0],[2,2,255]] pred [[0,0,2],[2,1,1]]
# confusion (rows GT): [[3,1,1],[0,2,0],[1,1,2]]
# IoU_0 = 3/(3+2+1) = 1/2, IoU_1 = 2/(2+0+2) = 1/2, IoU_2 = 2/(2+2+1) = 2/5 -> mIoU = 7/15; pixel acc = 7/11
# background 0: fg-fg block [[2,0],[1,2]] = 5, missed 0+1, false alarm 1+1 -> fg_iou = 5/8, fg_class_acc = 4/5
GT = torch.tensor([[[0, 0, 1], [1, 2, 2]], [[0, 0, 0], [2, 2, 255]]])
PRED = torch.tensor([[[0, 1, 1], [1, 2, 0]], [[0, 0, 2], [2, 1, 1]]])


def encode(pred: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] whose channel 0 carries the class the fake model will predict."""
    return torch.stack([pred.float(), torch.zeros_like(pred, dtype=torch.float32),
                        torch.zeros_like(pred, dtype=torch.float32)], dim=1)


def one_hot_fn(image: torch.Tensor) -> torch.Tensor:
    """Fake model: logits 10 for the class written in channel 0, 0 elsewhere."""
    return 10.0 * F.one_hot(image[:, 0].round().long().clamp(0, 2), 3).permute(0, 3, 1, 2).float()


def hand_loader(first: int = 0, last: int = 2) -> list:
    """Image A as a (image, mask) tuple, image B as a dict: evaluate() must accept both."""
    batches = [(encode(PRED[:1]), GT[:1]), {"image": encode(PRED[1:]), "mask": GT[1:]}]
    return batches[first:last]


@pytest.mark.parametrize("settings", [
    EvalSettings(), EvalSettings(mode="sliding", window=2, stride=1), EvalSettings(flip=True),
    EvalSettings(mode="center_crop", crop_size=8),  # crop larger than the images: nothing removed
])
def test_evaluate_hand_case(settings: EvalSettings) -> None:
    out = evaluate(one_hot_fn, hand_loader(), 3, settings, "cpu", progress=False)
    assert out["confusion"] == [[3, 1, 1], [0, 2, 0], [1, 1, 2]]
    assert out["miou"] == pytest.approx(7 / 15)
    assert out["iou"] == pytest.approx([0.5, 0.5, 0.4])
    assert out["pixel_acc"] == pytest.approx(7 / 11)
    assert out["fg_iou"] == pytest.approx(5 / 8) and out["fg_class_acc"] == pytest.approx(0.8)
    assert out["num_images"] == 2 and out["seconds"] >= 0


def test_evaluate_center_crop_mode_drops_the_border() -> None:
    # 5 x 5 mask: inner 3 x 3 is class 0, the border class 1; the model predicts 0 everywhere.
    # original: IoU_0 = 9/25, IoU_1 = 0 -> mIoU 0.18; centre crop 3: only class 0, IoU 1 -> mIoU 1
    mask = torch.ones(1, 5, 5, dtype=torch.long)
    mask[:, 1:4, 1:4] = 0
    loader = [(encode(torch.zeros(1, 5, 5, dtype=torch.long)), mask)]
    whole = evaluate(one_hot_fn, loader, 2, EvalSettings(), "cpu", progress=False)
    assert whole["miou"] == pytest.approx(0.18)
    cropped = evaluate(one_hot_fn, loader, 2, EvalSettings(mode="center_crop", crop_size=3), "cpu", progress=False)
    assert cropped["miou"] == pytest.approx(1.0) and cropped["iou"] == [1.0, None]


def test_evaluate_uses_eval_mode_and_restores_it() -> None:
    class Fake(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.modes: list[bool] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.modes.append(self.training)
            assert torch.is_inference_mode_enabled()
            return one_hot_fn(x)

    model = Fake().train()
    out = evaluate(model, hand_loader(), 3, EvalSettings(), "cpu", progress=False)
    assert model.modes == [False, False] and model.training
    assert out["miou"] == pytest.approx(7 / 15)
    with pytest.raises(TypeError, match="loader"):
        evaluate(one_hot_fn, [torch.zeros(1)], 3, EvalSettings(), "cpu", progress=False)
    with pytest.raises(ValueError, match="mask"):
        evaluate(one_hot_fn, [(encode(PRED[:1]), GT[0])], 3, EvalSettings(), "cpu", progress=False)


def _eval_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = evaluate(one_hot_fn, hand_loader(rank, rank + 1), 3, EvalSettings(), "cpu", progress=False)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_evaluate_sums_over_two_gloo_processes(tmp_path) -> None:
    # rank 0 evaluates image A, rank 1 image B: both must report the metrics of the two images together
    mp.spawn(_eval_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        assert out["num_images"] == 2
        assert out["confusion"] == [[3, 1, 1], [0, 2, 0], [1, 1, 2]]
        assert out["miou"] == pytest.approx(7 / 15)


# ------------------------------------------------------------------ a mode a method provides (workbench.registry)


class ToyRequest:
    served = 0


@contextlib.contextmanager
def toy_open(settings):
    request = ToyRequest()
    TOY_REQUEST.append(request)
    try:
        yield request
    finally:
        TOY_REQUEST.pop()


TOY_REQUEST: list[ToyRequest] = []
TOY = registry.EvalMode("toy_swap", requirement="a toy predictor that swaps its classes", owners=("toy",),
                        open=toy_open,
                        check=lambda s: ("flip", "toy_swap predicts unflipped images") if s.flip else None)


def toy_fn(x: torch.Tensor) -> torch.Tensor:
    """Logits (1, 0) at every pixel (class 0); inside an open toy request (0, 1) (class 1), counted as served."""
    logits = torch.zeros(x.shape[0], 2, *x.shape[-2:])
    if TOY_REQUEST:
        TOY_REQUEST[-1].served += 1
        logits[:, 1] = 1.0
    else:
        logits[:, 0] = 1.0
    return logits


def test_a_method_provided_mode_is_served_through_the_registry(monkeypatch) -> None:
    """Labels 1 everywhere: the plain prediction (class 0 at all 8 pixels) has IoU 0 for both classes present
    (class 0: 0 / (0 + 8), class 1: 0 / (8 + 0)) -> mIoU 0; inside the toy mode every pixel is class 1 -> class 1
    IoU 8 / 8 and class 0 absent from labels and prediction (not averaged) -> mIoU 1. The evaluation knows the mode
    only through the registry."""
    monkeypatch.setitem(registry._EVAL_MODES, "toy_swap", TOY)
    loader = [(torch.zeros(2, 3, 2, 2), torch.ones(2, 2, 2, dtype=torch.long))]
    assert evaluate(toy_fn, loader, 2, EvalSettings(), "cpu", progress=False)["miou"] == 0.0
    out = evaluate(toy_fn, loader, 2, EvalSettings(mode="toy_swap"), "cpu", progress=False)
    assert out["miou"] == pytest.approx(1.0) and out["num_images"] == 2
    with pytest.raises(ValueError, match="toy_swap.*a toy predictor that swaps its classes"):
        evaluate(one_hot_fn, [(encode(PRED[:1]), GT[:1])], 3, EvalSettings(mode="toy_swap"), "cpu", progress=False)
    with pytest.raises(ValueError, match="eval.flip: toy_swap predicts unflipped images"):
        EvalSettings(mode="toy_swap", flip=True)
    with pytest.raises(ValueError, match="eval.mode: must be one of .*cif_multiscale.*toy_swap"):
        EvalSettings(mode="weird")


def test_the_config_asks_the_method_for_its_mode(monkeypatch) -> None:
    """eval.mode beyond the engine's own is valid only when the configured method provides it."""
    from workbench.config import ConfigError, config_from_dict

    monkeypatch.setitem(registry._EVAL_MODES, "toy_swap", TOY)
    with pytest.raises(ConfigError, match=r"eval.mode: toy_swap needs a toy predictor .*method.name is 'supervised'"):
        config_from_dict({"eval": {"mode": "toy_swap"}})
    with pytest.raises(ConfigError, match="eval.mode: must be one of original, center_crop, sliding, cif_multiscale"):
        config_from_dict({"eval": {"mode": "weird"}})
