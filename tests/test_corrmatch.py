"""CorrMatch: loss weights, propagation and dynamic threshold inside a step (by hand), training runs, resume, GT."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workbench.config import ConfigError, config_from_dict
from workbench.engine.bench import random_batch
from workbench.engine.checkpoint import load_checkpoint
from workbench.engine.rundir import RunDir
from workbench.engine.trainer import Trainer, build_from_config, train
from workbench.methods import METHODS, SemiBatch, StepInfo
from workbench.methods.corrmatch import CorrelationHead, CorrMatch

from conftest import StubSegNet

LN = math.log
# KL((3/4, 1/4) || (1/2, 1/2)), the soft loss of a confident class-0 pixel against a uniform student
KL_UNIFORM = 0.75 * LN(1.5) + 0.25 * LN(0.5)


def PixelNet() -> StubSegNet:
    """A stub segmentation model: logits = the first two image channels (x scale), perturbed logits 0, "high"
    features = the 2x2 average-pooled image (3 channels); exposes DeepLabV3+'s channel attributes."""
    return StubSegNet({"high": lambda x: F.avg_pool2d(x, 2)}, channels=3)


def image(logit0: float | Tensor, n: int = 2, size: int = 4) -> Tensor:
    """[n, 3, size, size] images whose PixelNet logits are (logit0, 0) (logit0 a number or a [size, size] map)."""
    x = torch.zeros(n, 3, size, size)
    x[:, 0] = logit0
    return x


def make_batch(x_w: Tensor, x_s: Tensor, y_u: Tensor | None = None) -> SemiBatch:
    """4x4 images, 2 per batch; row 0 is padding (255) in both unlabeled batches; CutMix box = rows/cols 2-3; the
    labeled images predict (ln 3, 0) against label 1; the mix batch's weak view is uniform (conf 1/2)."""
    n = x_w.shape[0]
    ign = torch.zeros(n, 4, 4, dtype=torch.long)
    ign[:, 0] = 255
    box = torch.zeros(n, 4, 4, dtype=torch.bool)
    box[:, 2:, 2:] = True
    return SemiBatch(x_l=image(LN(3), n), y_l=torch.ones(n, 4, 4, dtype=torch.long), x_w=x_w, x_s1=x_s, x_s2=x_s,
                     ignore=ign, box1=box, box2=box, x_w_mix=image(0.0, n), x_s1_mix=x_s, x_s2_mix=x_s,
                     ignore_mix=ign.clone(), y_u=y_u)


def corrmatch(**method) -> CorrMatch:
    cfg = config_from_dict({"method": {"name": "corrmatch", "proj_channels": 4, **method}}).method
    return METHODS["corrmatch"](PixelNet(), cfg, 2)


# ------------------------------------------------------------------ loss terms by hand


# Strong-view terms count the 8 confident pixels outside the CutMix box (the 4 inside come from the mix batch,
# conf 1/2 < tau) over 12 valid pixels; weak-view terms count all 12.
OUT = 8 / 12
HARD = 0.25 * LN(2) * OUT + 0.25 * LN(2)                  # L_s: strong (0, 0) vs pseudo 0; L_fp: zeros vs pseudo 0
CORR = 0.5 * LN(4) + 0.25 * (LN(2) * OUT + LN(4 / 3)) / 2  # L_x_corr = ln 4; L_corr_u = (z_s CE + z_w CE) / 2
SOFT = 0.25 * KL_UNIFORM * OUT


@pytest.mark.parametrize("switches, expected", [
    ({}, (0.5 * LN(4) + CORR + HARD + SOFT) / 2),
    ({"soft_loss": False}, (0.5 * LN(4) + CORR + HARD) / 2),
    ({"hard_loss": False}, (0.5 * LN(4) + CORR + SOFT) / 2),
    # without the correlation head the labeled CE keeps the weight 0.5 + 0.5
    ({"pixel_propagation": False, "region_propagation": False}, (LN(4) + HARD + SOFT) / 2),
])
def test_loss_weights_by_hand(switches, expected):
    """Weak (ln 3, 0): pseudo 0, conf 3/4 >= tau 0.7 on all 12 valid pixels; strong (0, 0); labeled target 1.
    mask_ratio (weak view) = 1.
    The correlation head's w1, w2 are zeroed: C is uniform, so z = the mean logit = the (constant) logits."""
    m = corrmatch(threshold="fixed", tau=0.7, **switches)
    if m.corr_head is not None:
        with torch.no_grad():
            for conv in (m.corr_head.w1, m.corr_head.w2):
                conv.weight.zero_()
                conv.bias.zero_()
    out = m.training_step(make_batch(image(LN(3)), image(0.0)), StepInfo(0, 0, 10, 10))
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.logs["loss_x"].item() == pytest.approx(LN(4), rel=1e-5)
    assert out.logs["mask_ratio"].item() == 1.0 and out.logs["threshold"].item() == pytest.approx(0.7)
    out.loss.backward()
    assert m.model.scale.grad is not None


class RowsHead(nn.Module):
    """A stub correlation head with a fixed map over 2x2 features: row 0 = top half, row 3 = bottom half."""

    def forward(self, feats: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
        corr = torch.full((4, 4), 0.25)
        corr[0] = torch.tensor([0.5, 0.5, 0.0, 0.0])
        corr[3] = torch.tensor([0.0, 0.0, 0.5, 0.5])
        return corr.expand(feats.shape[0], 4, 4).clone(), logits.detach() * 1.0


def test_region_propagation_inside_a_step_by_hand():
    """Uniform sampling of 2 rows = rows 0 and 3 -> shapes "image rows 0-1" and "rows 2-3", each cleared of the
    padding (row 0) and of the CutMix box (rows/cols 2-3): S1 = row 1, S2 = {(2,0), (2,1), (3,0), (3,1)}.

    Weak view (C = confident class 0 (ln 3, 0), conf 3/4; U = class 1 (0, ln 3/2), conf 3/5; tau = 0.7):
        row 1: C C C U  -> S1: r1 = 3/4 >= tau, class 0 has r2 = 1 > tau -> (1,3) becomes a confident 0
        row 2: C U C C  -> S2: r1 = 1/4 < tau -> skipped
        row 3: U U C C
    """
    c, u = LN(3), 0.0
    logit0 = torch.tensor([[0, 0, 0, 0], [c, c, c, u], [c, u, c, c], [u, u, c, c]], dtype=torch.float32)
    x_w = image(logit0)
    x_w[:, 1] = (logit0 == u).float() * LN(1.5)
    m = corrmatch(threshold="fixed", tau=0.7, sampling="uniform", num_shapes=2, capture_shapes=2)
    m.corr_head = RowsHead()
    y_u = torch.zeros(2, 4, 4, dtype=torch.long)
    out = m.training_step(make_batch(x_w, image(0.0), y_u), StepInfo(0, 0, 10, 10, capture=True))
    a = out.artifacts
    expected = (logit0 == u).long()
    assert torch.equal(a["pseudo"], expected.expand(2, 4, 4))
    expected[1, 3] = 0
    assert torch.equal(a["pseudo_prop"], expected.expand(2, 4, 4))
    assert int(a["confident"][0].sum()) == 8 and int(a["confident_prop"][0].sum()) == 9
    assert bool(a["confident_prop"][0, 1].all())
    assert torch.equal(a["corr_points"], torch.tensor([[0, 3], [0, 3]]))
    assert a["shapes"][0, 0].nonzero().tolist() == [[1, 0], [1, 1], [1, 2], [1, 3]]
    assert a["shapes"][0, 1].nonzero().tolist() == [[2, 0], [2, 1], [3, 0], [3, 1]]
    assert a["corr_rows"].shape == (2, 2, 2, 2)
    # strong view: uniform logits (CE ln 2); inside the box the mix batch is not confident (conf 1/2); outside the
    # box 4 pixels are confident before propagation (row 1: 3, (2,0)) and 5 after; 12 valid pixels
    assert out.logs["loss_s"].item() == pytest.approx(5 * LN(2) / 12, rel=1e-5)
    # the soft loss keeps the mask from before propagation (4 confident class-0 pixels)
    assert out.logs["loss_kl"].item() == pytest.approx(4 * KL_UNIFORM / 12, rel=1e-5)
    # GT all 0: 8 correct pixels, all confident -> effective 8/12; after propagation 9/12; mining ratio 1 both
    assert out.logs["effective_ratio"].item() == pytest.approx(8 / 12)
    assert out.logs["effective_ratio_prop"].item() == pytest.approx(9 / 12)
    assert out.logs["mining_ratio"].item() == out.logs["mining_ratio_prop"].item() == 1.0
    assert out.logs["mask_ratio_prop"].item() == pytest.approx(9 / 12)


def test_dynamic_threshold_two_steps_by_hand():
    """Classes predicted on the valid pixels: 0 with max conf 3/4, 1 with max conf 3/5 (a 9/10-confident pixel in
    the padded row is excluded) -> increment (3/4 + 3/5) / 2 = 0.675; tau = 0.999 tau + 0.001 * 0.675 from 0.85."""
    logit0 = torch.full((4, 4), LN(3))
    logit0[0, 0] = LN(9)
    logit0[2:, :] = 0.0
    x_w = image(logit0)
    x_w[:, 1, 2:, :] = LN(1.5)
    m = corrmatch()
    assert m.dynamic is not None and "dynamic.value" in m.state_dict()
    t1 = 0.999 * 0.85 + 0.001 * 0.675
    t2 = 0.999 * t1 + 0.001 * 0.675
    for expected in (t1, t2):
        out = m.training_step(make_batch(x_w, image(0.0)), StepInfo(0, 0, 10, 10))
        assert out.logs["threshold"].item() == pytest.approx(expected, abs=1e-7)
    assert m.dynamic.value.item() == pytest.approx(t2, abs=1e-7)
    assert out.logs["mask_ratio"].item() == 0.0  # 3/4 < 0.8497: nothing confident, so no unlabeled loss
    assert out.logs["loss_s"].item() == 0.0


@pytest.mark.parametrize("kl_target", ["unmixed", "mixed"])
def test_soft_loss_target_inside_the_cutmix_box_by_hand(kl_target):
    """Weak view (ln 3, 0): teacher (3/4, 1/4); mix batch (ln 9, 0): (9/10, 1/10), confident as well (tau 0.7);
    strong view (0, 0): student (1/2, 1/2). 12 valid pixels (row 0 padded), 4 of them in the CutMix box, all
    confident under the CutMixed mask. KL(p || uniform) = sum p ln(2p):
    - ``unmixed`` (the reference compares with softmax(pred_u_w) everywhere): 12 KL(3/4) / 12 = KL(3/4);
    - ``mixed``: (8 KL(3/4) + 4 KL(9/10)) / 12 with KL(9/10) = 0.9 ln 1.8 + 0.1 ln 0.2."""
    kl_mix = 0.9 * LN(1.8) + 0.1 * LN(0.2)
    expected = KL_UNIFORM if kl_target == "unmixed" else (8 * KL_UNIFORM + 4 * kl_mix) / 12
    m = corrmatch(threshold="fixed", tau=0.7, pixel_propagation=False, region_propagation=False,
                  kl_target=kl_target)
    batch = make_batch(image(LN(3)), image(0.0))
    batch.x_w_mix = image(LN(9))
    out = m.training_step(batch, StepInfo(0, 0, 10, 10))
    assert out.logs["loss_kl"].item() == pytest.approx(expected, rel=1e-5)
    assert abs(KL_UNIFORM - (8 * KL_UNIFORM + 4 * kl_mix) / 12) > 0.03   # the two targets really differ here


@pytest.mark.parametrize("threshold_ignore", ["mixed", "unmixed"])
def test_dynamic_threshold_update_mask_by_hand(threshold_ignore):
    """The weak view predicts class 0 at 3/4 everywhere except (3,3): class 0 at 9/10, and (2,2): class 1 at 4/5.
    Both pixels lie in the CutMix box (rows/cols 2-3). The weak view pads (2,2) (and row 0); the mix image pads
    (3,3) (and row 0).
    - ``mixed`` (reference: the CutMixed ignore mask over the un-mixed prediction): (3,3) is hidden, (2,2) counts
      -> class maxima 3/4 and 4/5, increment (0.75 + 0.8) / 2 = 0.775;
    - ``unmixed`` (the weak view's own mask): (3,3) counts, (2,2) is hidden -> only class 0 is predicted on valid
      pixels, with max 9/10, increment 0.9.
    tau = 0.999 * 0.85 + 0.001 * increment."""
    logit0 = torch.full((4, 4), LN(3))
    logit0[3, 3] = LN(9)
    logit0[2, 2] = 0.0
    x_w = image(logit0)
    x_w[:, 1, 2, 2] = LN(4)
    batch = make_batch(x_w, image(0.0))
    batch.ignore[:, 2, 2] = 255
    batch.ignore_mix[:, 3, 3] = 255
    m = corrmatch(threshold_ignore=threshold_ignore, pixel_propagation=False, region_propagation=False)
    out = m.training_step(batch, StepInfo(0, 0, 10, 10))
    increment = 0.775 if threshold_ignore == "mixed" else 0.9
    assert out.logs["threshold"].item() == pytest.approx(0.999 * 0.85 + 0.001 * increment, abs=2e-7)


def test_capture_without_region_propagation_draws_nothing_from_the_rng():
    """Capture-only rows are evenly spaced (linspace(0, 3, 3) rounded = 0, 2, 3), so a capturing step leaves the
    random generator exactly where a plain step does; nothing claims a propagation that did not happen."""
    m = corrmatch(region_propagation=False, num_shapes=3)
    batch = make_batch(image(LN(3)), image(0.0))
    states = []
    for capture in (False, True):
        torch.manual_seed(0)
        out = m.training_step(batch, StepInfo(0, 0, 10, 10, capture=capture))
        states.append(torch.get_rng_state())
    assert torch.equal(states[0], states[1])
    assert out.artifacts["corr_points"].tolist() == [[0, 2, 3], [0, 2, 3]]
    assert out.artifacts["corr_rows"].shape == (2, 3, 2, 2)
    assert not {"shapes", "pseudo_prop", "confident_prop", "mining_ratio_prop"} & (out.artifacts.keys() | out.logs.keys())


# ------------------------------------------------------------------ configuration and structure


def test_config_checks_and_threshold_modules():
    with pytest.raises(ConfigError, match="method.region_propagation"):
        config_from_dict({"method": {"name": "corrmatch", "pixel_propagation": False}})
    for key, value in (("feature", "layer2"), ("sampling", "grid"), ("threshold", "adaptive"), ("num_shapes", 0),
                       ("kl_target", "both"), ("threshold_ignore", "strong")):
        with pytest.raises(ConfigError, match=f"method.{key}"):
            config_from_dict({"method": {"name": "corrmatch", key: value}})
    assert corrmatch(threshold="fixed").dynamic is None
    assert corrmatch(pixel_propagation=False, region_propagation=False).corr_head is None


def test_correlation_head_in_head_group_and_shapes():
    m = corrmatch()
    groups = {g["name"]: g for g in m.param_groups(0.01, 10.0)}
    head_ids = {id(p) for p in groups["head"]["params"]}
    assert {id(p) for p in m.corr_head.parameters()} <= head_ids and groups["head"]["lr"] == pytest.approx(0.1)
    head = CorrelationHead(3, 5, mid=8)
    corr, z = head(torch.randn(2, 3, 3, 4), torch.randn(2, 5, 9, 13, requires_grad=True))
    assert corr.shape == (2, 12, 12) and z.shape == (2, 5, 9, 13)
    assert torch.allclose(corr.sum(-1), torch.ones(2, 12), atol=1e-5)


def test_uniform_and_random_rows():
    m = corrmatch(sampling="uniform", num_shapes=4)
    assert m.shape_rows(2, 16, torch.device("cpu")).tolist() == [[0, 5, 10, 15], [0, 5, 10, 15]]
    torch.manual_seed(0)
    rows = corrmatch(num_shapes=64).shape_rows(2, 16, torch.device("cpu"))
    assert rows.shape == (2, 64) and 0 <= int(rows.min()) and int(rows.max()) < 16
    assert not torch.equal(rows[0], rows[1])  # drawn per image


@pytest.mark.parametrize("position, size", [("backbone", 4), ("aspp", 4), ("fusion", 8), ("classifier", 8)])
def test_feature_positions_on_deeplab(tiny_cfg, position, size):
    """Table 7: the correlation map is built at the chosen feature's resolution (32 px crop, OS 8: layer4 and ASPP
    4x4, decoder 8x8)."""
    cfg = tiny_cfg(**{"method.name": "corrmatch", "method.feature": position})
    m = build_from_config(cfg, 3, torch.device("cpu"))
    batch = random_batch(3, 2, 32, True, torch.device("cpu"), torch.Generator().manual_seed(0))
    out = m.training_step(batch, StepInfo(0, 0, 10, 10, capture=True))
    assert out.artifacts["corr_rows"].shape[-2:] == (size, size)
    assert out.artifacts["shapes"].shape[-2:] == (32, 32)
    out.loss.backward()
    assert all(p.grad is not None for p in m.corr_head.parameters())


# ------------------------------------------------------------------ training runs


def test_training_writes_artifacts_and_threshold_survives_resume(tiny_cfg):
    """A few steps train and capture; a run cut after step 3 and resumed (checkpoint at step 2) ends with the same
    dynamic threshold as the uninterrupted run, and logs the same thresholds."""
    over = {"method.name": "corrmatch", "train.iters": 4, "train.checkpoint_every": 2, "train.capture_every": 2}
    full = tiny_cfg(**over, name="full")
    assert train(full)["finished"]
    cut = tiny_cfg(**over, name="cut")
    Trainer(cut).fit(stop_at=3)
    train(cut)
    values = [load_checkpoint(RunDir(c.run_dir).latest)["method"]["dynamic.value"].item() for c in (full, cut)]
    assert values[0] == values[1] and values[0] != pytest.approx(0.85, abs=1e-9)
    runs = [RunDir(c.run_dir).read_metrics("train") for c in (full, cut)]
    assert [r["threshold"] for r in runs[0]] == pytest.approx([r["threshold"] for r in runs[1]], abs=1e-7)
    assert {"effective_ratio_prop", "mining_ratio_prop", "loss_corr_u", "loss_kl"} <= runs[0][-1].keys()
    index = RunDir(full.run_dir).artifact_index()
    assert [e["step"] for e in index] == [2, 4]
    keys = index[-1]["keys"]
    for key in ("corr_rows", "corr_points", "shapes", "pseudo_prop", "confident_prop", "confident", "threshold"):
        assert key in keys, key
    assert keys["shapes"][1] == "bool" and keys["shapes"][0][1] == 8  # capture_shapes rows only


def test_no_loss_reads_unlabeled_ground_truth(tmp_path, tiny_data):
    """Changing (or removing) the unlabeled GT leaves the loss and every gradient unchanged (propagation on: tau 0
    makes every shape with a confident pixel eligible); the diagnostics do change."""
    from conftest import check_no_gt_in_losses

    _, grads = check_no_gt_in_losses(tmp_path, tiny_data, diag_key="pl_acc_prop", **{
        "method.name": "corrmatch", "method.threshold": "fixed", "method.tau": 0.0})
    assert any(k.startswith("corr_head.") for k in grads)
