"""Weak-to-strong machinery: losses, CutMix pasting, diagnostics and the methods' loss formulas, by hand."""
import math

import pytest
import torch
from torch import nn

from workbench.config import config_from_dict
from workbench.methods import METHODS, SemiBatch, StepInfo
from workbench.ops.losses import ce_loss, masked_ce_loss, masked_kl_loss, ohem_ce_loss
from workbench.ops.semi import cutmix_images, paste_in_box, pseudo_label, pseudo_label_diagnostics

LN = math.log


def two_pixel_logits():
    # pixel 0: logits (0, 0) -> p = (1/2, 1/2); pixel 1: logits (ln 3, 0) -> p = (3/4, 1/4)
    return torch.tensor([[0.0, LN(3)], [0.0, 0.0]]).view(1, 2, 1, 2)


def test_masked_ce_normalises_by_non_ignored_pixels():
    logits, target = two_pixel_logits(), torch.tensor([[[0, 0]]])
    both = torch.tensor([[[True, True]]])
    assert masked_ce_loss(logits, target, both).item() == pytest.approx((LN(2) + LN(4 / 3)) / 2)
    # only pixel 1 confident: the sum has one term but the denominator still counts both valid pixels
    only1 = torch.tensor([[[False, True]]])
    assert masked_ce_loss(logits, target, only1).item() == pytest.approx(LN(4 / 3) / 2)
    # pixel 0 ignored (padding): one valid pixel
    ignore = torch.tensor([[[255, 0]]])
    assert masked_ce_loss(logits, target, both, ignore).item() == pytest.approx(LN(4 / 3))


def test_ce_and_kl_by_hand():
    logits = two_pixel_logits()
    assert ce_loss(logits, torch.tensor([[[1, 255]]])).item() == pytest.approx(LN(2))
    assert ce_loss(logits, torch.tensor([[[255, 255]]])).item() == 0.0
    teacher = torch.tensor([[1.0, 0.5], [0.0, 0.5]]).view(1, 2, 1, 2)
    # KL(t||s): pixel 0: 1*ln(1/(1/2)) = ln 2; pixel 1: t = s... s = (3/4, 1/4): .5 ln(.5/.75) + .5 ln(.5/.25)
    k1 = 0.5 * LN(0.5 / 0.75) + 0.5 * LN(2)
    conf = torch.tensor([[[True, True]]])
    assert masked_kl_loss(logits, teacher, conf).item() == pytest.approx((LN(2) + k1) / 2, rel=1e-5)


def test_ohem_keeps_hard_pixels():
    p = torch.tensor([0.9, 0.8, 0.6, 0.5])
    logits = torch.stack([torch.log(p / (1 - p)), torch.zeros(4)]).view(1, 2, 1, 4)
    target = torch.zeros(1, 1, 4, dtype=torch.long)
    # min_kept 2: 2nd smallest p = 0.6 -> threshold max(0.7, 0.6) = 0.7 -> keep 0.6, 0.5
    assert ohem_ce_loss(logits, target, 0.7, 2).item() == pytest.approx(-(LN(0.6) + LN(0.5)) / 2, rel=1e-5)
    # min_kept 3: 3rd smallest = 0.8 -> threshold 0.8 -> keep 0.8, 0.6, 0.5
    assert ohem_ce_loss(logits, target, 0.7, 3).item() == pytest.approx(-(LN(0.8) + LN(0.6) + LN(0.5)) / 3,
                                                                        rel=1e-5)
    # fewer valid pixels than min_kept: plain CE over all
    assert ohem_ce_loss(logits, target, 0.7, 10).item() == pytest.approx(-sum(LN(x) for x in p) / 4, rel=1e-5)


def test_ohem_min_kept_is_per_images_as_the_reference_applies_it():
    from workbench.ops.losses import ohem_min_kept_for

    # UniMatch Cityscapes: 200000 per process of 2 images -> 8 images in one process: 200000 x 8 / 2 = 800000
    assert ohem_min_kept_for(200000, 8, 2) == 800000
    assert ohem_min_kept_for(100000, 8, 2) == 400000        # CorrMatch's 100000
    assert ohem_min_kept_for(100000, 3, 2) == 150000        # floor(300000 / 2)
    assert ohem_min_kept_for(200000, 8, None) == 200000      # the switch: unscaled
    with pytest.raises(ValueError, match="min_kept_images"):
        ohem_min_kept_for(200000, 8, 0)
    # 4 one-pixel-row images of 2 pixels, GT-class probabilities (image by image) 0.95, 0.9 | 0.8, 0.85 |
    # 0.99, 0.98 | 0.75, 0.97 (all easy: above thresh 0.7). min_kept 1 per 2 images -> 2 for these 4 images: the
    # 2nd smallest p is 0.8 -> threshold max(0.7, 0.8) -> keep 0.75 and 0.8: loss = -(ln 0.75 + ln 0.8) / 2;
    # unscaled (1): threshold 0.75 -> keep 0.75 alone: -ln 0.75
    p = torch.tensor([0.95, 0.9, 0.8, 0.85, 0.99, 0.98, 0.75, 0.97])
    logits = torch.stack([torch.log(p / (1 - p)), torch.zeros(8)]).view(2, 4, 1, 2).permute(1, 0, 2, 3)
    target = torch.zeros(4, 1, 2, dtype=torch.long)
    assert ohem_ce_loss(logits, target, 0.7, 1, min_kept_images=2).item() == pytest.approx(
        -(LN(0.75) + LN(0.8)) / 2, rel=1e-5)
    assert ohem_ce_loss(logits, target, 0.7, 1).item() == pytest.approx(-LN(0.75), rel=1e-5)


def test_ohem_scaled_count_at_cityscapes_magnitude():
    # 8 images of 320 x 320 (819200 pixels), every pixel easy (GT prob 0.9 .. 0.999, all distinct): OHEM keeps
    # exactly the min_kept hardest. UniMatch's 200000 per 2 images -> 800000 kept; unscaled -> 200000 kept.
    # Expected losses: the mean CE (-ln p) of the 800000 (200000) smallest GT probabilities, sorted in numpy.
    import numpy as np

    n = 8 * 320 * 320
    rng = np.random.default_rng(0)
    p = 0.9 + 0.099 * rng.permutation(n) / n
    logits = torch.from_numpy(np.stack([np.log(p / (1 - p)), np.zeros(n)])).float().view(2, 8, 320, 320)
    logits = logits.permute(1, 0, 2, 3).contiguous()
    target = torch.zeros(8, 320, 320, dtype=torch.long)
    ce = -np.log(np.sort(torch.from_numpy(p).float().double().numpy()))
    for kept, images in ((800000, 2), (200000, None)):
        got = ohem_ce_loss(logits, target, 0.7, 200000, min_kept_images=images).item()
        assert got == pytest.approx(ce[:kept].mean(), rel=1e-4), kept
    # config: the key is validated with a one-line error
    base = {"method": {"name": "supervised", "loss": "ohem", "ohem_min_kept_images": 0}}
    with pytest.raises(ValueError, match=r"^method.ohem_min_kept_images: must be > 0 \(got 0\)"):
        config_from_dict(base)
    cfg = config_from_dict({"method": {"name": "unimatch", "loss": "ohem"}})
    assert cfg.method.ohem_min_kept == 200000 and cfg.method.ohem_min_kept_images == 2


def test_pseudo_label_and_cutmix_paste():
    pseudo, conf = pseudo_label(two_pixel_logits())
    assert pseudo.tolist() == [[[0, 0]]] and conf[0, 0, 1].item() == pytest.approx(0.75)
    box = torch.tensor([[[False, True], [True, False]]])
    a = torch.tensor([[[1, 2], [3, 4]]])
    b = torch.tensor([[[5, 6], [7, 8]]])
    ign = torch.tensor([[[0, 0], [0, 0]]])
    ign_mix = torch.tensor([[[255, 255], [0, 255]]])
    (p, i) = paste_in_box(box, (a, b), (ign, ign_mix))
    assert p.tolist() == [[[1, 6], [7, 4]]]
    assert i.tolist() == [[[0, 255], [0, 0]]]
    x = torch.zeros(1, 3, 2, 2)
    xm = torch.ones(1, 3, 2, 2)
    assert cutmix_images(x, xm, box)[0, :, 0, 1].tolist() == [1, 1, 1]
    assert cutmix_images(x, xm, box)[0, :, 0, 0].tolist() == [0, 0, 0]
    with pytest.raises(ValueError):
        paste_in_box(box, (a[:, :1], b))


def test_diagnostics_by_hand():
    pseudo = torch.tensor([[0, 1, 1, 2]])
    gt = torch.tensor([[0, 1, 2, 255]])
    confident = torch.tensor([[True, False, True, True]])
    d = pseudo_label_diagnostics(pseudo, confident, None, gt, 3)
    assert d["mask_ratio"].item() == pytest.approx(3 / 4)
    assert d["pl_acc"].item() == pytest.approx(1 / 2)          # confident & gt-valid: pixels 0 (right), 2 (wrong)
    assert d["mining_ratio"].item() == pytest.approx(1 / 2)    # correct: pixels 0, 1; confident among them: 0
    assert d["effective_ratio"].item() == pytest.approx(1 / 3)
    # IoU: class 0 = 1, class 1 = 1/2 (pred {1,2}, gt {1}), class 2 = 0 -> mean 1/2
    assert d["pl_miou"].item() == pytest.approx(0.5)
    ignore = torch.tensor([[0, 0, 0, 255]])
    assert pseudo_label_diagnostics(pseudo, confident, ignore, None, 3)["mask_ratio"].item() == pytest.approx(2 / 3)


class ConstantNet(nn.Module):
    """A 'segmentation model' with hand-chosen outputs: logits (ln 3, 0) everywhere, (0, 0) on the fp branch."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.b = nn.Parameter(torch.zeros(()))

    def forward(self, x, perturb=False):
        n, _, h, w = x.shape
        base = torch.tensor([LN(3), 0.0]).view(1, 2, 1, 1).expand(n, 2, h, w)
        out = {"logits": base * self.w + self.b}
        if perturb:
            out["logits_fp"] = torch.zeros(n, 2, h, w) * self.w
        return out

    def backbone_parameters(self):
        return iter([self.w])

    def head_parameters(self):
        return iter([self.b])


def constant_batch(with_gt=True):
    n, h, w = 2, 4, 4
    x = torch.zeros(n, 3, h, w)
    ign = torch.zeros(n, h, w, dtype=torch.long)
    ign[:, 0, :] = 255
    box = torch.zeros(n, h, w, dtype=torch.bool)
    box[:, 2:, 2:] = True
    return SemiBatch(x_l=x, y_l=torch.ones(n, h, w, dtype=torch.long), x_w=x, x_s1=x, x_s2=x, ignore=ign,
                     box1=box, box2=box, x_w_mix=x, x_s1_mix=x, x_s2_mix=x, ignore_mix=ign.clone(),
                     y_u=torch.zeros(n, h, w, dtype=torch.long) if with_gt else None)


@pytest.mark.parametrize("name, expected", [
    # labeled target 1 with p(1) = 1/4 -> L_x = ln 4; pseudo = 0 with p = 3/4 >= tau -> L_s = ln(4/3) on valid px
    ("fixmatch", (LN(4) + LN(4 / 3)) / 2),
    ("meanteacher", LN(4) + LN(4 / 3)),
    # UniMatch: fp branch logits (0, 0) -> L_fp = ln 2
    ("unimatch", (LN(4) + 0.25 * LN(4 / 3) * 2 + 0.5 * LN(2)) / 2),
])
def test_method_loss_formulas(name, expected):
    cfg = config_from_dict({"method": {"name": name, "tau": 0.7}}).method
    m = METHODS[name](ConstantNet(), cfg, 2)
    out = m.training_step(constant_batch(), StepInfo(0, 0, 10, 10, capture=True))
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.logs["mask_ratio"].item() == pytest.approx(1.0)
    assert out.logs["pl_acc"].item() == pytest.approx(1.0)
    assert "pseudo" in out.artifacts and "conf" in out.artifacts


def test_threshold_above_confidence_zeroes_unsup_loss():
    cfg = config_from_dict({"method": {"name": "fixmatch", "tau": 0.8}}).method  # conf 0.75 < 0.8
    out = METHODS["fixmatch"](ConstantNet(), cfg, 2).training_step(constant_batch(), StepInfo(0, 0, 10, 10))
    assert out.loss.item() == pytest.approx(LN(4) / 2, rel=1e-5)
    assert out.logs["mask_ratio"].item() == 0.0


def test_mean_teacher_ema_and_predictor():
    cfg = config_from_dict({"method": {"name": "meanteacher", "alpha": 0.9, "ema_warmup": True}}).method
    m = METHODS["meanteacher"](ConstantNet(), cfg, 2)
    assert m.predictor() is m.ema and not m.ema.training
    with torch.no_grad():
        m.model.w.fill_(3.0)
    m.after_step(StepInfo(0, 0, 10, 10))   # warm-up: alpha = min(0.9, 1 - 1/1) = 0 -> copy
    assert m.ema.w.item() == pytest.approx(3.0)
    with torch.no_grad():
        m.model.w.fill_(5.0)
    m.after_step(StepInfo(20, 0, 10, 10))  # alpha = min(0.9, 1 - 1/21) = 0.9 -> 0.9*3 + 0.1*5 = 3.2
    assert m.ema.w.item() == pytest.approx(3.2)
    assert all(not p.requires_grad for p in m.ema.parameters())
    m.train()
    assert not m.ema.training


@pytest.mark.parametrize("name", ["fixmatch", "meanteacher", "unimatch"])
def test_no_loss_reads_unlabeled_ground_truth(name, tmp_path, tiny_data):
    """Changing (or removing) the unlabeled GT leaves the loss and every gradient unchanged; diagnostics do change."""
    from conftest import check_no_gt_in_losses

    check_no_gt_in_losses(tmp_path, tiny_data, **{"method.name": name, "method.tau": 0.0})
