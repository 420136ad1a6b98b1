"""MaskMatch: multi-scale ensembling (Eqs. 7-8), boundary F-score, the LCR component and the method, by hand."""
from __future__ import annotations

import json
import math

import pytest
import torch

from workbench.config import ConfigError, config_from_dict
from workbench.engine.evaluate import EvalSettings, evaluate
from workbench.engine.metrics import BoundaryFMeter, boundary_f_score, boundary_map, boundary_prf, boundary_radius
from workbench.methods.components import LocalConsistency, lcr_loss
from workbench.ops.ensemble import ensemble_probs, multiscale_ce_loss, multiscale_ensemble, predict_scales

LN = math.log


def logits_of(p0: list[list[float]]) -> torch.Tensor:
    """Two-class logits [1, 2, h, w] whose softmax gives class-0 probabilities ``p0``."""
    p = torch.tensor(p0, dtype=torch.float64)
    return torch.stack([p.log(), (1 - p).log()])[None].float()


# ---------------------------------------------------------------- ensembling (Eq. 7) and Eq. 8

def test_ensemble_of_hand_built_probability_maps():
    a = logits_of([[0.9, 0.2], [0.5, 0.6]])                        # already at the target size 2 x 2
    b = logits_of([[0.5]])                                         # 1 x 1: constant 0.5 after resizing
    # 3 x 3 -> 2 x 2 with align_corners=True samples exactly the four corners; the 0.99s must not matter
    c = logits_of([[0.3, 0.99, 0.8], [0.99, 0.99, 0.99], [0.1, 0.99, 0.4]])
    probs = ensemble_probs([a, b, c], size=(2, 2))
    expected0 = torch.tensor([[0.9 + 0.5 + 0.3, 0.2 + 0.5 + 0.8], [0.5 + 0.5 + 0.1, 0.6 + 0.5 + 0.4]]) / 3
    assert probs.shape == (1, 2, 2, 2) and probs.dtype == torch.float32
    assert torch.allclose(probs[0, 0], expected0, atol=1e-6)
    assert torch.allclose(probs.sum(1), torch.ones(1, 2, 2), atol=1e-6)
    conf, pseudo = probs.max(1)
    assert pseudo.tolist() == [[[0, 0], [1, 0]]]                   # (1,0): class 0 has 1.1/3 < 1/2
    assert conf[0, 1, 0].item() == pytest.approx(1 - 1.1 / 3, abs=1e-6)


def test_predict_scales_sizes_and_ensemble():
    seen = []

    def fn(x):
        seen.append(tuple(x.shape[-2:]))
        h = x.shape[-2]
        # class 0 logit ln(h): at 7, 10, 15 pixels the class-0 probabilities are 7/8, 10/11, 15/16
        return torch.stack([torch.full_like(x[:, 0], LN(h)), torch.zeros_like(x[:, 0])], 1)

    x = torch.zeros(2, 3, 10, 10)
    out = predict_scales(fn, x, (0.7, 1.0, 1.5))
    assert seen == [(7, 7), (10, 10), (15, 15)]
    assert [tuple(t.shape) for t in out] == [(2, 2, 10, 10)] * 3
    probs = multiscale_ensemble(fn, x, (0.7, 1.0, 1.5))
    assert torch.allclose(probs[:, 0], torch.full((2, 10, 10), (7 / 8 + 10 / 11 + 15 / 16) / 3), atol=1e-6)
    with pytest.raises(ValueError, match="scales"):
        predict_scales(fn, x, (0.0,))
    with pytest.raises(ValueError, match="fn returned"):
        predict_scales(lambda t: t[:, :2, :1], x, (1.0,))


def test_multiscale_ce_loss_eq8_by_hand():
    pseudo = torch.tensor([[[0, 1, 0]]])
    confident = torch.tensor([[[True, True, True]]])
    ignore = torch.tensor([[[0, 0, 255]]])                         # pixel 2 is padding: not counted anywhere
    # scale A at full size: pixel 0 p = (1/2, 1/2) -> ln 2; pixel 1 p1 = 3/4 -> ln(4/3); pixel 2 anything
    a = torch.tensor([[0.0, 0.0, 9.0], [0.0, LN(3), -9.0]]).view(1, 2, 1, 3)
    # scale B predicted at 1 x 2 with constant logits (ln 3, 0): p = (3/4, 1/4) everywhere after resizing
    b = torch.tensor([[LN(3), LN(3)], [0.0, 0.0]]).view(1, 2, 1, 2)
    expected = (LN(2) + LN(4 / 3) + LN(4 / 3) + LN(4)) / (2 * 2)  # sum over 2 scales / (2 scales x 2 valid px)
    assert multiscale_ce_loss([a, b], pseudo, confident, ignore).item() == pytest.approx(expected, rel=1e-6)
    # one scale alone is the usual confidence-masked CE; an unconfident pixel leaves the denominator unchanged
    conf1 = torch.tensor([[[True, False, True]]])
    assert multiscale_ce_loss([a], pseudo, conf1, ignore).item() == pytest.approx(LN(2) / 2, rel=1e-6)


# ---------------------------------------------------------------- boundary F-score

def square(top: int, left: int, size: int = 6) -> torch.Tensor:
    """[size, size] label map: class 1 on the 3 x 3 square at (top, left), class 0 elsewhere."""
    m = torch.zeros(size, size, dtype=torch.long)
    m[top:top + 3, left:left + 3] = 1
    return m


# boundary pixels of square(1, 1): a pixel is on the boundary if it differs from its right, lower or lower-right
# neighbour -> row 0 cols 0-3 (below/diagonal of the top edge), rows 1-2 cols 0 and 3, row 3 cols 0-3
GT_BOUNDARY = {(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 3), (2, 0), (2, 3), (3, 0), (3, 1), (3, 2), (3, 3)}


def test_boundary_map_by_hand():
    b = boundary_map(square(1, 1) == 1)
    assert {tuple(p) for p in b.nonzero().tolist()} == GT_BOUNDARY
    assert torch.equal(boundary_map(square(1, 1) == 0), b)        # the complement has the same boundary
    assert not boundary_map(torch.ones(4, 5, dtype=torch.bool)).any()   # the image border is no boundary


def test_boundary_radius_rule():
    assert boundary_radius(0.0, 6, 6) == 0
    assert boundary_radius(0.1, 6, 6) == 1                         # 0.1 x 8.485 = 0.85 -> ceil -> 1
    assert boundary_radius(0.2, 6, 6) == 2                         # 1.70 -> 2
    assert boundary_radius(0.0003, 1024, 2048) == 1                # the paper's Cityscapes setting: 0.69 -> 1 px
    with pytest.raises(ValueError, match="tolerance"):
        boundary_radius(1.5, 6, 6)


def test_boundary_f_perfect_shifted_and_empty():
    gt = square(1, 1)
    assert boundary_f_score(gt, gt, 2, tolerance=0.0) == 1.0
    right = square(1, 2)   # shifted one pixel right: 6 of the 12 boundary pixels coincide (top and bottom rows)
    assert boundary_f_score(right, gt, 2, tolerance=0.0) == pytest.approx(0.5)
    assert boundary_f_score(right, gt, 2, tolerance=0.1) == pytest.approx(1.0)   # radius 1: all within 1 pixel
    # shifted diagonally: exact matches (1,3) and (3,1) only -> P = R = 2/12; with radius 1 (a disk, no diagonal
    # neighbours) the far corners (4,4) of the prediction and (0,0) of the GT stay unmatched -> P = R = 11/12
    diag = square(2, 2)
    assert boundary_f_score(diag, gt, 2, tolerance=0.0) == pytest.approx(2 / 12)
    assert boundary_f_score(diag, gt, 2, tolerance=0.1) == pytest.approx(11 / 12)
    # empty prediction (all background): class 1 has no predicted boundary -> P = 1, R = 0, F = 0; class 0 too
    empty = torch.zeros_like(gt)
    res = boundary_prf(empty, gt, 2, tolerance=0.1)
    assert res["precision"][0].tolist() == [1.0, 1.0] and res["recall"][0].tolist() == [0.0, 0.0]
    assert boundary_f_score(empty, gt, 2, tolerance=0.1) == 0.0


def test_boundary_f_averages_over_classes_present_and_respects_ignore():
    gt, right = square(1, 1), square(1, 2)
    # class 2 never occurs: averaged over classes 0 and 1 only (0.5), not counted as a perfect 1 (which gives 2/3)
    assert boundary_f_score(right, gt, 3, tolerance=0.0) == pytest.approx(0.5)
    # ignored GT pixels count as "no class" in both masks: a prediction spilling into them is not penalised
    gt_ign = gt.clone()
    gt_ign[:, 4:] = 255
    wide = torch.zeros(6, 6, dtype=torch.long)
    wide[1:4, 1:6] = 1                                             # class 1 runs on into the ignored columns
    assert boundary_f_score(wide, gt_ign, 2, tolerance=0.0) == 1.0
    assert boundary_f_score(wide, gt, 2, tolerance=0.0) < 1.0      # without the ignore region it is penalised
    # a class with no boundary in either map (the whole image background in both) is not counted
    res = boundary_prf(torch.zeros(6, 6, dtype=torch.long), torch.zeros(6, 6, dtype=torch.long), 2, 0.0)
    assert not res["counted"].any()
    assert math.isnan(boundary_f_score(torch.zeros(6, 6, dtype=torch.long),
                                       torch.zeros(6, 6, dtype=torch.long), 2, 0.0))


def test_boundary_meter_aggregates_per_class_over_images():
    gt = square(1, 1)
    blank = torch.zeros_like(gt)
    meter = BoundaryFMeter(2, tolerance=0.0)
    meter.update(gt[None], gt[None])                               # F = 1 for both classes
    meter.update(torch.stack([square(1, 2), blank]), torch.stack([gt, blank]))   # 0.5 both; blank not counted
    meter.all_reduce()
    res = meter.compute()
    assert res["boundary_f_per_class"] == pytest.approx([0.75, 0.75])
    assert res["boundary_f"] == pytest.approx(0.75)
    with pytest.raises(RuntimeError):
        meter.update(gt[None], gt[None])


def test_evaluate_reports_boundary_f_when_asked():
    gt, pred = square(1, 1), square(1, 2)
    image = torch.nn.functional.one_hot(pred, 3).permute(2, 0, 1)[None].float() * 10   # fn = first 2 channels
    loader = [(image, gt[None])]

    def fn(x):
        return x[:, :2]

    res = evaluate(fn, loader, 2, EvalSettings(boundary_tolerance=0.0), "cpu", progress=False)
    assert res["boundary_f"] == pytest.approx(0.5) and res["boundary_f_per_class"] == pytest.approx([0.5, 0.5])
    assert "boundary_f" not in evaluate(fn, loader, 2, EvalSettings(), "cpu", progress=False)
    with pytest.raises(ValueError, match="boundary_tolerance"):
        EvalSettings(boundary_tolerance=2.0)


# ---------------------------------------------------------------- LCR

def lcr_case():
    """2 x 2 pixels, pseudo-label 0 everywhere. Left column visible, right column hidden.

    CE per pixel: (0,0) ln 2 confident; (1,0) ln(4/3) NOT confident; (0,1) ln 4 confident; (1,1) ln 5 confident but
    padding (ignore 255).
    """
    p0 = torch.tensor([[1 / 2, 1 / 4], [3 / 4, 1 / 5]])
    logits = torch.stack([torch.log(p0), torch.log(1 - p0)])[None]
    pseudo = torch.zeros(1, 2, 2, dtype=torch.long)
    confident = torch.tensor([[[True, True], [False, True]]])
    ignore = torch.tensor([[[0, 0], [0, 255]]])
    visible = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).view(1, 1, 2, 2)
    return logits, pseudo, confident, ignore, visible


@pytest.mark.parametrize("region, expected", [
    ("both", (LN(2) + LN(4)) / 3),      # 3 valid pixels; confident ones: (0,0), (0,1)
    ("unmasked", LN(2) / 2),            # visible column: 2 valid pixels, (0,0) confident
    ("masked", LN(4) / 1),              # hidden column: (1,1) is padding -> 1 valid pixel
])
def test_lcr_loss_regions_by_hand(region, expected):
    assert lcr_loss(*lcr_case(), region=region).item() == pytest.approx(expected, rel=1e-6)


def test_lcr_component_feeds_the_masked_view_to_the_student():
    seen = []

    def student(x):
        seen.append(x)
        return {"logits": torch.zeros(x.shape[0], 2, *x.shape[-2:])}

    x = torch.randn(2, 3, 8, 8)
    pseudo = torch.zeros(2, 8, 8, dtype=torch.long)
    ones = torch.ones(2, 8, 8, dtype=torch.bool)
    out = LocalConsistency(1.0, 4, 1.0, "random", "both", "batch_valid")(student, x, pseudo, ones, None)        # ratio 1: every patch hidden
    assert torch.equal(seen[-1], torch.zeros_like(x)) and out.loss.item() == pytest.approx(LN(2))
    out = LocalConsistency(1.0, 4, 0.0, "random", "both", "batch_valid")(student, x, pseudo, ones, None)        # ratio 0: nothing hidden
    assert torch.equal(seen[-1], x) and out.visible.min().item() == 1.0
    torch.manual_seed(0)
    out = LocalConsistency(1.0, 4, 0.5, "random", "masked", "batch_valid")(student, x, pseudo, ones, None)
    hidden = out.visible[:, 0] == 0
    assert torch.equal(out.x_masked, x * out.visible) and torch.equal(out.region, hidden)
    assert set(out.artifacts()) == {"x_masked", "lcr_visible", "lcr_region", "pred_masked"}


@pytest.mark.parametrize("key, value", [("lcr_region", "everywhere"), ("lcr_strategy", "checker"),
                                        ("lcr_ratio", 1.5), ("lcr_weight", -1.0), ("scales", [0.7, 1.5])])
def test_lcr_and_maskmatch_config_errors_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"method.{key}"):
        config_from_dict({"method": {"name": "maskmatch", key: value}})


def semi_batch(tiny_data, cfg):
    from workbench.data.dataset import SegDataset, StepDataset, StepPlan
    from workbench.methods import SemiBatch

    lab, unl = SegDataset(tiny_data, "labeled_1-4"), SegDataset(tiny_data, "unlabeled_1-4")
    ds = StepDataset(lab, unl, StepPlan(len(lab), len(unl), 2, 2, 1, 0, 0, True), 32)
    ds.total_steps = 1
    return SemiBatch.from_loader(ds[0], torch.device("cpu"), cfg.data.mean, cfg.data.std)


@pytest.mark.parametrize("name", ["fixmatch", "unimatch", "corrmatch", "rankmatch"])
def test_lcr_switched_on_by_config_adds_its_loss(name, tmp_path, tiny_data):
    from workbench.engine.trainer import build_from_config
    from workbench.methods import StepInfo

    from conftest import tiny_config_dict

    def step(weight):
        fixed = {"method.threshold": "fixed"} if name == "corrmatch" else {}  # tau is CorrMatch's only when fixed
        cfg = config_from_dict(tiny_config_dict(tmp_path, tiny_data, **{
            "method.name": name, "method.tau": 0.0, "method.lcr_weight": weight, "method.lcr_patch": 8, **fixed}))
        torch.manual_seed(0)
        method = build_from_config(cfg, 6, torch.device("cpu"))
        torch.manual_seed(1)
        return method.training_step(semi_batch(tiny_data, cfg), StepInfo(0, 0, 1, 1))

    off, on = step(0.0), step(2.0)
    assert "loss_lcr" not in off.logs and "loss_lcr" in on.logs
    # tau = 0: every pixel is confident, so the LCR term is positive; the rest of the step is unchanged
    assert on.logs["loss_lcr"].item() > 0
    assert on.loss.item() == pytest.approx(off.loss.item() + on.logs["loss_lcr"].item(), rel=1e-5)
    assert on.loss.requires_grad


def test_lcr_uses_the_hosts_confident_mask_under_corrmatchs_dynamic_threshold(tmp_path, tiny_data):
    # CorrMatch's dynamic threshold from thresh_init 0 with momentum 1 stays at 0 (0 x 1 + 0 x maxima), so every
    # non-padding pixel is confident for CorrMatch while the fixed cfg.tau = 1 would keep none (softmax < 1): LCR
    # follows the step's own mask, so its loss is positive (it would be exactly 0 under cfg.tau)
    from workbench.engine.trainer import build_from_config
    from workbench.methods import StepInfo

    from conftest import tiny_config_dict

    cfg = config_from_dict(tiny_config_dict(tmp_path, tiny_data, **{
        "method.name": "corrmatch", "method.tau": 1.0, "method.thresh_init": 0.0, "method.thresh_momentum": 1.0,
        "method.lcr_weight": 1.0, "method.lcr_patch": 8}))
    torch.manual_seed(0)
    method = build_from_config(cfg, 6, torch.device("cpu"))
    torch.manual_seed(1)
    out = method.training_step(semi_batch(tiny_data, cfg), StepInfo(0, 0, 1, 1, capture=True))
    assert out.logs["threshold"].item() == 0.0
    assert out.logs["loss_lcr"].item() > 0
    assert torch.equal(out.artifacts["confident"], out.artifacts["ignore"] != 255)
    assert out.artifacts["pred_masked"].shape == (2, 32, 32)   # LCR's artifacts are captured with the step's


# ---------------------------------------------------------------- the method

def test_maskmatch_training_run_writes_its_artifacts(tiny_cfg):
    from workbench.engine.rundir import RunDir
    from workbench.engine.trainer import train

    cfg = tiny_cfg(**{"method.name": "maskmatch", "method.lcr_patch": 8, "train.capture_every": 2,
                      "eval.boundary_tolerance": 0.05})
    summary = train(cfg)
    assert summary["finished"] and summary["steps"] == 4
    run = RunDir(cfg.run_dir)
    assert [e["step"] for e in run.artifact_index()] == [2, 4]
    arts = run.load_artifacts(4)
    b = 4
    assert arts["x_masked"].shape == (b, 3, 32, 32) and arts["x_masked"].dtype == torch.uint8
    assert arts["pred_masked"].shape == arts["lcr_visible"].shape == (b, 32, 32)
    assert arts["ms_pred"].shape == arts["ms_conf"].shape == arts["pred_s_scales"].shape == (b, 3, 32, 32)
    assert arts["ms_ensemble"].shape == arts["ms_ensemble_conf"].shape == (b, 32, 32)
    assert arts["ms_scales"].float().tolist() == pytest.approx([0.7, 1.0, 1.5], abs=1e-3)
    assert torch.equal(arts["ms_ensemble"], arts["pseudo"])        # the weak-view pseudo-label is the ensemble's
    # hidden pixels are 0 after normalisation, i.e. the dataset's mean colour once denormalised
    hidden = ~arts["lcr_visible"]
    if hidden.any():
        mean = torch.tensor(cfg.data.mean) * 255
        assert torch.allclose(arts["x_masked"].permute(0, 2, 3, 1)[hidden].float(), mean.round().expand(
            int(hidden.sum()), 3), atol=1)
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("loss_lcr" in r and "loss_u" in r for r in records if r["kind"] == "train")
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals and 0.0 <= evals[-1]["boundary_f"] <= 1.0


def test_maskmatch_switches_change_the_step(tmp_path, tiny_data):
    """Table 7 switches: MS off and LCR off give the plain mean-teacher step (same loss, same logs)."""
    from workbench.engine.trainer import build_from_config
    from workbench.methods import StepInfo

    from conftest import tiny_config_dict

    def step(name, **kw):
        cfg = config_from_dict(tiny_config_dict(tmp_path, tiny_data, **{"method.name": name, "method.tau": 0.0,
                                                                         **kw}))
        torch.manual_seed(0)
        method = build_from_config(cfg, 6, torch.device("cpu"))
        torch.manual_seed(1)
        return method.training_step(semi_batch(tiny_data, cfg), StepInfo(0, 0, 1, 1, capture=True))

    # the plain mean teacher once MaskMatch's paper conventions are switched to the mean teacher's (UniMatch-style
    # normalisation, conf >= tau); the EMA warm-up acts only after the step
    base = step("maskmatch", **{"method.ms": False, "method.lcr_weight": 0.0, "method.loss_norm": "batch_valid",
                                "method.tau_strict": False})
    mt = step("meanteacher")
    assert base.loss.item() == pytest.approx(mt.loss.item(), rel=1e-6)
    assert "loss_lcr" not in base.logs and "ms_pred" not in base.artifacts
    ms = step("maskmatch", **{"method.lcr_weight": 0.0, "method.loss_norm": "batch_valid",
                              "method.tau_strict": False})
    assert "ms_pred" in ms.artifacts and "x_masked" not in ms.artifacts
    assert ms.loss.item() != pytest.approx(base.loss.item(), rel=1e-6)
    # the paper's per-image normalisation (the default) changes the loss of the same step
    paper = step("maskmatch", **{"method.ms": False, "method.lcr_weight": 0.0})
    assert paper.loss.item() != pytest.approx(base.loss.item(), rel=1e-4)


# ---------------------------------------------------------------- the paper's normalisation (Eqs. 3, 6, 8)

def test_per_image_confident_normalisation_by_hand():
    """Two images of 1 x 3 pixels, two classes. Logits (ln 3, 0) everywhere: CE = ln(4/3) for target 0 and ln 4 for
    target 1. Image 0: targets (0, 1, 0), all confident -> its mean = (2 ln(4/3) + ln 4) / 3. Image 1: targets
    (1, 1, 1), only pixel 0 confident, pixel 2 padding -> its mean = ln 4 / 1.
    image_confident (MaskMatch's Eq. 3) = mean of the two image means; batch_valid (UniMatch) = the confident CE
    sum / the 5 valid pixels = (2 ln(4/3) + 2 ln 4) / 5."""
    from workbench.ops.losses import masked_ce_loss

    logits = torch.zeros(2, 2, 1, 3)
    logits[:, 0] = LN(3)
    pseudo = torch.tensor([[[0, 1, 0]], [[1, 1, 1]]])
    confident = torch.tensor([[[True, True, True]], [[True, False, True]]])
    ignore = torch.tensor([[[0, 0, 0]], [[0, 0, 255]]])
    image0, image1 = (2 * LN(4 / 3) + LN(4)) / 3, LN(4)
    got = masked_ce_loss(logits, pseudo, confident, ignore, norm="image_confident").item()
    assert got == pytest.approx((image0 + image1) / 2, rel=1e-6)
    assert masked_ce_loss(logits, pseudo, confident, ignore).item() == pytest.approx(
        (2 * LN(4 / 3) + 2 * LN(4)) / 5, rel=1e-6)
    # an image without a confident pixel contributes 0 (not NaN) and still counts in the batch mean
    none = torch.tensor([[[True, True, True]], [[False, False, False]]])
    assert masked_ce_loss(logits, pseudo, none, ignore, norm="image_confident").item() == pytest.approx(
        image0 / 2, rel=1e-6)
    with pytest.raises(ValueError, match="norm"):
        masked_ce_loss(logits, pseudo, confident, ignore, norm="pixels")


def test_per_image_normalisation_at_half_confident_pixels():
    """At a realistic 50% of confident pixels with equal CE, the paper's normalisation is twice the UniMatch one
    (the per-image denominator counts half the pixels); with peaked softmaxes (logit gap 30) the CE of a wrong target
    is ~30 and of a right one ~1e-13, and the ratio stays 2."""
    from workbench.ops.losses import masked_ce_loss

    logits = torch.zeros(4, 3, 8, 8)
    logits[:, 1] = 30.0
    pseudo = torch.ones(4, 8, 8, dtype=torch.long)
    pseudo[:, :, :4] = 0                                 # half the pixels get the wrong class: CE ~ 30
    confident = torch.zeros(4, 8, 8, dtype=torch.bool)
    confident[:, ::2] = True                             # every other row: 50% confident, half of them wrong
    valid_norm = masked_ce_loss(logits, pseudo, confident).item()
    image_norm = masked_ce_loss(logits, pseudo, confident, norm="image_confident").item()
    ce_wrong = 30 + LN(1 + 2 * math.exp(-30))           # -log softmax of a logit 0 against (30, 0, 0)
    ce_right = LN(1 + 2 * math.exp(-30))
    assert image_norm == pytest.approx((ce_wrong + ce_right) / 2, rel=1e-5)
    assert valid_norm == pytest.approx((ce_wrong + ce_right) / 4, rel=1e-5)
    assert image_norm / valid_norm == pytest.approx(2.0, rel=1e-5)


def test_multiscale_loss_per_image_by_hand():
    """Eq. 8: 1/N sum_i 1/(3 sum_j w_ij) sum_j sum_k w_ij CE_k; two scales here. One image of 1 x 2 pixels, both
    confident, targets (0, 0); scale A logits (0, 0) -> CE ln 2 at both pixels; scale B (ln 3, 0) -> ln(4/3).
    Per image: (2 ln 2 + 2 ln(4/3)) / (2 scales x 2 pixels). A second image with no confident pixel adds 0."""
    a = torch.zeros(2, 2, 1, 2)
    b = torch.zeros(2, 2, 1, 2)
    b[:, 0] = LN(3)
    pseudo = torch.zeros(2, 1, 2, dtype=torch.long)
    confident = torch.tensor([[[True, True]], [[False, False]]])
    image0 = (2 * LN(2) + 2 * LN(4 / 3)) / 4
    got = multiscale_ce_loss([a, b], pseudo, confident, norm="image_confident").item()
    assert got == pytest.approx(image0 / 2, rel=1e-6)
    # the UniMatch convention divides by all 4 valid pixels of the batch and the 2 scales
    assert multiscale_ce_loss([a, b], pseudo, confident).item() == pytest.approx(
        (2 * LN(2) + 2 * LN(4 / 3)) / (2 * 4), rel=1e-6)


def test_lcr_loss_per_image_confident_by_hand():
    """Eq. 6 with the paper's normalisation on the LCR case below: region "both", one image, confident valid pixels
    (0,0) -> ln 2 and (0,1) -> ln 4: their mean (ln 2 + ln 4) / 2 (the UniMatch convention divides by 3)."""
    got = lcr_loss(*lcr_case(), region="both", norm="image_confident").item()
    assert got == pytest.approx((LN(2) + LN(4)) / 2, rel=1e-6)


def test_strict_threshold_and_maskmatch_defaults():
    """The paper keeps conf > tau (strict); the UniMatch-family code keeps conf >= tau. MaskMatch's defaults are the
    paper's: per-image confident normalisation, strict tau, constant EMA 0.999 from the first step."""
    from workbench.ops.semi import confident_mask

    conf = torch.tensor([[[0.9, 0.95, 0.5]]])
    assert confident_mask(conf, 0.9).tolist() == [[[True, True, False]]]
    assert confident_mask(conf, 0.9, strict=True).tolist() == [[[False, True, False]]]
    cfg = config_from_dict({"method": {"name": "maskmatch"}}).method
    assert (cfg.loss_norm, cfg.tau_strict, cfg.ema_warmup, cfg.alpha) == ("image_confident", True, False, 0.999)
    from workbench.methods import METHODS

    from conftest import StubSegNet

    method = METHODS["maskmatch"](StubSegNet({}), cfg, 2)
    assert method.ema_alpha(0) == 0.999 and method.ema_alpha(5) == 0.999     # no warm-up
    warm = config_from_dict({"method": {"name": "maskmatch", "ema_warmup": True}}).method
    assert METHODS["maskmatch"](StubSegNet({}), warm, 2).ema_alpha(0) == 0.0  # min(0.999, 1 - 1/1)
    # the baselines keep the authors' conventions
    for name in ("fixmatch", "unimatch", "meanteacher", "corrmatch", "rankmatch"):
        other = config_from_dict({"method": {"name": name}}).method
        assert (other.loss_norm, other.tau_strict) == ("batch_valid", False), name
    with pytest.raises(ConfigError, match="method.loss_norm"):
        config_from_dict({"method": {"name": "maskmatch", "loss_norm": "pixels"}})


def test_no_loss_reads_unlabeled_ground_truth_maskmatch(tmp_path, tiny_data):
    """The property of tests/test_semi.py (loss and every gradient independent of y_u) for maskmatch (MS + LCR on)."""
    from conftest import check_no_gt_in_losses

    check_no_gt_in_losses(tmp_path, tiny_data, **{"method.name": "maskmatch", "method.tau": 0.0})


def test_maskmatch_config_file_loads():
    from pathlib import Path

    from workbench.config import load_config

    cfg = load_config(Path(__file__).parents[1] / "configs" / "maskmatch_synthetic.yaml", ["method.ms=false"])
    assert cfg.method.name == "maskmatch" and cfg.method.tau == 0.9 and not cfg.method.ms
    assert cfg.optim.weight_decay == pytest.approx(5e-4) and cfg.eval.boundary_tolerance == pytest.approx(3e-4)
