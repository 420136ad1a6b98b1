"""ScaleMatch: gate arithmetic, scale rules, the reference structure (scale 1 from t-resized features only, the gate
weighting the lower-resolution prediction, floored sizes, the CIF's channel counts, labeled images in every branch),
the step's losses by hand (warm-up, ISVC, FSVC, fusion) in both structures, switches, the CIF multi-scale evaluation
mode, training + resume, and that no loss reads the unlabeled GT."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workbench.config import ConfigError, config_from_dict
from workbench.engine.bench import random_batch
from workbench.engine.evaluate import EvalSettings, evaluate
from workbench.methods import METHODS, SemiBatch, StepInfo
from workbench.methods.scalematch import (
    CrossScaleFusion,
    ReferenceCIF,
    ScaleMatch,
    ScaleMatchPredictor,
    cif_multiscale_inference,
    gated_fusion,
    reference_fusion,
    reference_two_scale,
    resized_feature_size,
    scaled_image,
    scaled_image_size,
)

LN = math.log


@pytest.fixture(autouse=True)
def _one_thread(_threads):
    """One torch thread (after conftest's 2): on the shared, oversubscribed CPU two spinning threads are many times
    slower than one."""
    torch.set_num_threads(1)
    yield


# ------------------------------------------------------------------ pure pieces


def test_gate_arithmetic_on_hand_built_maps():
    s_w = torch.tensor([[0.2, 0.9], [0.5, 1.0]]).view(1, 1, 2, 2)
    a = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, -1.0], [8.0, 2.0]]])[None]   # [1, 2, 2, 2]
    b = torch.tensor([[[6.0, 0.0], [1.0, 5.0]], [[5.0, 1.0], [0.0, 7.0]]])[None]
    fused, s_v = gated_fusion(s_w, a, b)
    assert torch.allclose(s_v, torch.tensor([[0.8, 0.1], [0.5, 0.0]]).view(1, 1, 2, 2))
    expected = torch.tensor([[[0.2 * 1 + 0.8 * 6, 0.9 * 2 + 0.1 * 0], [0.5 * 3 + 0.5 * 1, 4.0]],
                             [[0.2 * 0 + 0.8 * 5, 0.9 * -1 + 0.1 * 1], [0.5 * 8 + 0.5 * 0, 2.0]]])[None]
    assert torch.allclose(fused, expected)
    with pytest.raises(ValueError, match="must match"):
        gated_fusion(s_w, a, b[:, :1])


def test_scaled_sizes_are_floored_and_clamped_for_tiny_crops():
    # the reference resizes with scale factors, whose output size is floor(side x v): 321 x 1.5 = 481.5 -> 481 (a
    # rounding rule would give 482); 321 x 0.25 = 80.25 -> 80; 513 x 0.75 = 384.75 -> 384
    assert scaled_image_size((321, 321), 1.5) == (481, 481)
    assert scaled_image_size((321, 513), 0.25) == (80, 128)
    assert scaled_image(torch.zeros(1, 3, 321, 321), 1.5).shape[-2:] == (481, 481)
    assert scaled_image_size((32, 32), 0.25) == (16, 16)           # 8 px clamped to the 16 px minimum
    assert scaled_image_size((32, 32), 0.25, min_size=1) == (8, 8)
    assert scaled_image_size((32, 48), 2.0) == (64, 96)
    assert scaled_image_size((33, 20), 0.5) == (16, 16)            # floor(16.5) = 16; 10 -> 16
    # feature maps: 81 x 0.75 = 60.75 -> 60, 81 x 1.25 = 101.25 -> 101, at least one cell
    assert resized_feature_size((81, 81), 0.75) == (60, 60) and resized_feature_size((81, 3), 1.25) == (101, 3)
    assert resized_feature_size((1, 1), 0.75) == (1, 1)
    with pytest.raises(ValueError, match="scale"):
        scaled_image_size((32, 32), 0.0)


def test_cif_module_gate_and_fusion():
    """The gate is sigmoid(conv(relu(bn(.)))): with the last conv zeroed and bias -ln 3 it is 1/4 everywhere, so the
    fusion is 1/4 a + 3/4 b; with random weights it lies in (0, 1) at the logits' size and the fusion follows it."""
    torch.manual_seed(0)
    cif = CrossScaleFusion(5, dim=8, chunk=4)
    feat_w, feat_v = torch.randn(2, 5, 4, 4), torch.randn(2, 5, 8, 8)   # scale-v features are resized to 4 x 4
    a, b = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    fused, s_w = cif(feat_w, feat_v, a, b)
    assert s_w.shape == (2, 1, 16, 16) and bool(((s_w > 0) & (s_w < 1)).all())
    assert torch.allclose(fused, s_w * a + (1 - s_w) * b, atol=1e-6)
    with torch.no_grad():
        cif.gate[2].weight.zero_()
        cif.gate[2].bias.fill_(-LN(3))
    fused, s_w = cif(feat_w, feat_v, a, b)
    assert torch.allclose(s_w, torch.full_like(s_w, 0.25)) and torch.allclose(fused, 0.25 * a + 0.75 * b, atol=1e-6)


def force_gate(cif: ReferenceCIF, logit: float) -> None:
    """Make the reference gate the constant ``sigmoid(logit)``: the last BatchNorm (``gate[7]``, weight 0, bias 1)
    outputs 1 whatever its input, the ReLU keeps it, and the last 1x1 conv (no bias) sums ``logit / (C/2)`` over its
    ``C/2`` inputs."""
    with torch.no_grad():
        cif.gate[7].weight.zero_()
        cif.gate[7].bias.fill_(1.0)
        cif.gate[9].weight.fill_(logit / cif.gate_channels)


def test_reference_cif_channel_counts():
    """DeepLabV3+ decoder features have C = 256 channels per scale: cat 512 -> 1x1 (no bias) 512 -> 512 / 16 = 32 +
    BN + ReLU; one Vision-RWKV block of width 32 (pre-LN eps 1e-6 before both mixes, no input norm, layer scales
    0.01 on both branches, Q-Shift by 1, channel-mix hidden 4 x 32 = 128, no key norm); LN eps 1e-6; SE over
    512 + 32 = 544 channels with 544 // 16 = 34 hidden (convs with bias); gate: depthwise 3x3 (544), 1x1 544 -> 128,
    depthwise 3x3 (128), 1x1 128 -> 1 without bias, sigmoid."""
    cif = ReferenceCIF(256)
    c = cif.compress[0]
    assert c.weight.shape == (32, 512, 1, 1) and c.bias is None and isinstance(cif.compress[1], nn.BatchNorm2d)
    assert len(cif.rwkv.blocks) == 1
    blk = cif.rwkv.blocks[0]
    assert blk.ln0 is None and blk.ln1.normalized_shape == (32,) and blk.ln1.eps == 1e-6 and blk.ln2.eps == 1e-6
    assert torch.equal(blk.gamma1, torch.full((32,), 0.01)) and torch.equal(blk.gamma2, torch.full((32,), 0.01))
    assert blk.spatial.shift == 1 and blk.spatial.key_norm is None and blk.channel.key.weight.shape == (128, 32)
    assert cif.norm.normalized_shape == (32,) and cif.norm.eps == 1e-6
    se1, se2 = cif.attention.fc[1], cif.attention.fc[3]
    assert se1.weight.shape == (34, 544, 1, 1) and se1.bias is not None and se2.weight.shape == (544, 34, 1, 1)
    assert se2.bias is not None
    g = cif.gate
    assert g[0].weight.shape == (544, 1, 3, 3) and g[0].groups == 544 and isinstance(g[1], nn.BatchNorm2d)
    assert g[3].weight.shape == (128, 544, 1, 1) and isinstance(g[4], nn.BatchNorm2d)
    assert g[6].weight.shape == (128, 1, 3, 3) and g[6].groups == 128 and isinstance(g[7], nn.BatchNorm2d)
    assert g[9].weight.shape == (1, 128, 1, 1) and g[9].bias is None and isinstance(g[10], nn.Sigmoid)
    # the tiny test model's decoder (C = 64): 128 -> 8, SE over 136 (136 // 16 = 8 hidden), gate 136 -> 32
    tiny = ReferenceCIF(64)
    assert tiny.compress[0].weight.shape == (8, 128, 1, 1) and tiny.attention.fc[1].weight.shape == (8, 136, 1, 1)
    assert tiny.gate[3].weight.shape == (32, 136, 1, 1) and tiny.rwkv.blocks[0].gamma1.shape == (8,)


@pytest.mark.parametrize("v", [2.0, 0.5])
def test_reference_gate_weights_the_lower_resolution_prediction(v):
    """v > 1: scale 1 is the lower-resolution input; v < 1: scale v is. The CIF gets cat([lo, hi]) at lo's feature
    size, and a gate forced to 1 (sigmoid(100) = 1 in float32) returns exactly the lower-resolution prediction; the
    returned s_w (the weight of scale 1) is then 1 for v = 2 and 0 for v = 0.5."""
    torch.manual_seed(0)
    cif = ReferenceCIF(3)
    force_gate(cif, 100.0)
    feat_1 = torch.randn(2, 3, 6, 6)                                # t-resized scale-1 features
    feat_v = torch.randn(2, 3, 12, 12) if v > 1 else torch.randn(2, 3, 3, 3)
    p_1, p_v = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    seen = []
    hook = cif.compress.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    joint, s_w = reference_fusion(cif, v, feat_1, feat_v, p_1, p_v)
    hook.remove()
    lo, hi, p_lo = (feat_1, feat_v, p_1) if v > 1 else (feat_v, feat_1, p_v)
    # (a constant gate resized bilinearly is 1 up to float rounding)
    assert torch.allclose(joint, p_lo, rtol=0, atol=1e-6)
    assert torch.allclose(s_w, torch.full((2, 1, 16, 16), 1.0 if v > 1 else 0.0), rtol=0, atol=1e-6)
    cat = seen[0]
    assert cat.shape == (2, 6, *lo.shape[-2:])                    # at the lower-resolution input's size
    assert torch.equal(cat[:, :3], lo)                              # lo first
    assert torch.allclose(cat[:, 3:], F.interpolate(hi, size=lo.shape[-2:], mode="bilinear", align_corners=True))
    # average fusion: g = 1/2 whatever the direction
    joint, s_w = reference_fusion(None, v, feat_1, feat_v, p_1, p_v)
    assert torch.allclose(joint, (p_1 + p_v) / 2) and bool((s_w == 0.5).all())


# ------------------------------------------------------------------ the step by hand, on a stub network


class StubNet(nn.Module):
    """Features = the image itself (3 channels at full resolution); logits = the first two feature channels x
    ``scale`` plus a per-height offset ``offsets[h] = (o0, o1)`` (0 otherwise), resized to the output size. So a
    constant image gives constant logits, and a scaled image can be told apart by its height."""

    def __init__(self, offsets: dict[int, tuple[float, float]] | None = None) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.offsets = offsets or {}
        self.fp_dropout = 0.0            # FSVC without randomness
        self.head = nn.Module()
        self.head.channels = 3
        self.calls: list | None = None   # (call, batch, rows) of every encode / decode when a list

    def encode(self, x: Tensor) -> dict[str, Tensor]:
        if self.calls is not None:
            self.calls.append(("encode", x.shape[0], x.shape[-2]))
        return {"low": x, "high": x}

    def decode(self, feats: dict[str, Tensor], out_size=None) -> dict[str, Tensor]:
        low = feats["low"]
        if self.calls is not None:
            self.calls.append(("decode", low.shape[0], low.shape[-2]))
        off = torch.tensor(self.offsets.get(low.shape[-2], (0.0, 0.0)), dtype=low.dtype).view(1, 2, 1, 1)
        logits = low[:, :2] * self.scale + off
        if out_size is not None and tuple(out_size) != tuple(logits.shape[-2:]):
            logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=True)
        return {"decoder": low, "logits": logits}

    def forward(self, x: Tensor, perturb: bool = False) -> dict[str, Tensor]:
        feats = self.encode(x)
        return {**feats, **self.decode(feats, x.shape[-2:])}

    def backbone_parameters(self):
        return iter([self.scale])

    def head_parameters(self):
        return iter([])


def image(logit0: float, n: int = 2, size: int = 4) -> Tensor:
    """[n, 3, size, size] constant images whose StubNet logits are (logit0, 0) at heights without an offset."""
    x = torch.zeros(n, 3, size, size)
    x[:, 0] = logit0
    return x


def make_batch(y_u: Tensor | None = None) -> SemiBatch:
    """4x4 images, 2 per batch; row 0 is padding in both unlabeled batches; CutMix box = rows/cols 2-3 (4 of the 12
    valid pixels); labeled and weak views predict (ln 3, 0) at scale 1, labels are 1; strong views (0, 0); the mix
    batch's weak view is uniform (conf 1/2 < tau, so nothing inside the box is confident)."""
    ign = torch.zeros(2, 4, 4, dtype=torch.long)
    ign[:, 0] = 255
    box = torch.zeros(2, 4, 4, dtype=torch.bool)
    box[:, 2:, 2:] = True
    return SemiBatch(x_l=image(LN(3)), y_l=torch.ones(2, 4, 4, dtype=torch.long), x_w=image(LN(3)),
                     x_s1=image(0.0), x_s2=image(0.0), ignore=ign, box1=box, box2=box, x_w_mix=image(0.0),
                     x_s1_mix=image(0.0), x_s2_mix=image(0.0), ignore_mix=ign.clone(), y_u=y_u)


def scalematch(offsets=None, **method) -> ScaleMatch:
    cfg = config_from_dict({"method": {"name": "scalematch", "tau": 0.7, "scales": [2.0], "min_scaled_size": 1,
                                       "cif_warmup_epochs": 1, "cif_dim": 4, "cif_chunk": 4, **method}}).method
    return METHODS["scalematch"](StubNet(offsets), cfg, 2)


# At scale 2 (height 8) the class-0 logit drops by ln 27 + ln 3: the scale-v prediction is (-ln 27, 0), i.e.
# p1 = 27/28; the average of the two scales is (-ln 3, 0): class 1 with confidence 3/4.
OFFSET_8 = {8: (-LN(27) - LN(3), 0.0)}
OUT = 8 / 12        # strong view: 8 confident pixels outside the CutMix box over 12 valid ones


@pytest.mark.parametrize("epoch, expected, pseudo_class", [
    # warm-up: plain pseudo-label 0 (conf 3/4). L_x = CE(fused labeled (-ln 3, 0), 1) = ln(4/3); L_s = ln 2 on the
    # 8 confident pixels outside the box; L_ISVC = CE((-ln 27, 0), 0) = ln 28; L_FSVC: features resized by 0.75
    # (v = 2 > 1; height 3, no offset) -> (ln 3, 0) vs 0 = ln(4/3)
    (0, (LN(4 / 3) + 0.25 * LN(2) * OUT + 0.25 * LN(28) + 0.5 * LN(4 / 3)) / 2, 0),
    # after the warm-up: the fused pseudo-label 1 (conf 3/4); L_ISVC = ln(28/27); L_FSVC = CE((ln 3, 0), 1) = ln 4
    (1, (LN(4 / 3) + 0.25 * LN(2) * OUT + 0.25 * LN(28 / 27) + 0.5 * LN(4)) / 2, 1),
])
def test_step_by_hand_average_fusion_and_warmup(epoch, expected, pseudo_class):
    m = scalematch(OFFSET_8, fusion="average")
    assert m.cif is None
    out = m.training_step(make_batch(), StepInfo(0, epoch, 10, 10, capture=True))
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.logs["loss_x"].item() == pytest.approx(LN(4 / 3), rel=1e-5)
    assert out.logs["pl_fused"] == float(epoch >= 1) and out.logs["gate_mean"].item() == 0.5
    assert out.logs["scale"] == 2.0 and out.logs["feature_scale"] == 0.75                 # v > 1 -> t = 0.75
    a = out.artifacts
    assert bool((a["pseudo"] == pseudo_class).all())
    assert bool((a["pseudo_plain"] == 0).all()) and bool((a["pseudo_fused"] == 1).all())
    assert bool((a["pred_w"] == 0).all()) and bool((a["pred_v"] == 1).all()) and a["pred_v"].shape == (2, 1, 4, 4)
    assert a["scale"].tolist() == [2.0] and a["feature_scale"].tolist() == [0.75]
    assert torch.equal(a["gate_w"], torch.full((2, 1, 4, 4), 0.5))
    out.loss.backward()
    assert m.model.scale.grad is not None


def test_step_by_hand_with_the_paper_cif_gate():
    """structure: paper. A real CIF whose gate is fixed at 1/4 (last conv zeroed, bias -ln 3): fused = 1/4 (ln 3, 0)
    + 3/4 (-ln 27, 0) = (-2 ln 3, 0), p1 = 9/10: L_x = ln(10/9); after the warm-up the pseudo-label is 1 with conf
    0.9. (The gate weights scale 1 whatever v.)"""
    m = scalematch(OFFSET_8, structure="paper")
    with torch.no_grad():
        m.cif.gate[2].weight.zero_()
        m.cif.gate[2].bias.fill_(-LN(3))
    out = m.training_step(make_batch(), StepInfo(0, 1, 10, 10, capture=True))
    expected = (LN(10 / 9) + 0.25 * LN(2) * OUT + 0.25 * LN(28 / 27) + 0.5 * LN(4)) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.artifacts["conf"][0, 1, 1].item() == pytest.approx(0.9, rel=1e-5)
    assert out.logs["gate_mean"].item() == pytest.approx(0.25, rel=1e-6)
    out.loss.backward()
    assert m.cif.gate[2].bias.grad is not None and m.cif.compress.weight.grad is not None


@pytest.mark.parametrize("v, gate_logit, loss_x, s_w", [
    # v = 2 (t = 0.75): pred_ori, decoded from the 3-row features, is (ln 3, 0) and is the LOWER-resolution input;
    # pred_size (8 rows) is (-ln 27, 0). Gate 1: pred_joint = pred_ori, CE vs label 1 = ln(1 + 3) = ln 4 (the
    # opposite direction would give ln(28/27)); gate sigmoid(ln 3) = 3/4: 3/4 ln 3 - 1/4 ln 27 = 0 -> ln 2
    (2.0, 100.0, LN(4), 1.0),
    (2.0, LN(3), LN(2), 0.75),
    # v = 0.5 (t = 1.25): pred_size (2 rows) = (-ln 27, 0) is the lower-resolution input, pred_ori (5 rows) = (ln 3,
    # 0). Gate 1: pred_joint = pred_size, CE = ln(1 + 1/27) = ln(28/27); gate 3/4: -3/4 ln 27 + 1/4 ln 3 = -2 ln 3
    # -> CE = ln(1 + 1/9) = ln(10/9); s_w (the weight of scale 1) = 1 - g
    (0.5, 100.0, LN(28 / 27), 0.0),
    (0.5, LN(3), LN(10 / 9), 0.25),
])
def test_reference_step_gate_direction_by_hand(v, gate_logit, loss_x, s_w):
    m = scalematch({8: (-LN(27) - LN(3), 0.0), 2: (-LN(27) - LN(3), 0.0)}, scales=[v])
    force_gate(m.cif, gate_logit)
    out = m.training_step(make_batch(), StepInfo(0, 1, 10, 10, capture=True))
    assert out.logs["loss_x"].item() == pytest.approx(loss_x, rel=1e-5, abs=1e-7)
    assert out.logs["gate_mean"].item() == pytest.approx(s_w, abs=1e-6)
    assert out.logs["feature_scale"] == (0.75 if v > 1 else 1.25)


@pytest.mark.parametrize("epoch, expected, pseudo_class", [
    # v = 2, t = 0.75, gate forced to 0 (pred_joint = pred_size, the higher-resolution input). pred_ori (3 rows,
    # offset -2 ln 3) = (-ln 3, 0): class 1 at 3/4 (the unresized 4-row decode would say class 0); pred_size (8
    # rows, no offset) = (ln 3, 0): class 0 at 3/4. L_x = CE(pred_joint = (ln 3, 0), 1) = ln 4.
    # Warm-up: pseudo-label 1 from pred_ori; L_ISVC = CE((ln 3, 0), 1) = ln 4; L_FSVC = CE(pred_fp = pred_ori
    # (dropout 0), 1) = ln(4/3); L_s = ln 2 on the 8 confident pixels outside the box
    (0, (LN(4) + 0.25 * LN(2) * OUT + 0.25 * LN(4) + 0.5 * LN(4 / 3)) / 2, 1),
    # after the warm-up: pseudo-label 0 from pred_joint; L_ISVC = ln(4/3); L_FSVC = CE((-ln 3, 0), 0) = ln 4
    (1, (LN(4) + 0.25 * LN(2) * OUT + 0.25 * LN(4 / 3) + 0.5 * LN(4)) / 2, 0),
])
def test_reference_warmup_switches_from_pred_ori_to_pred_joint(epoch, expected, pseudo_class):
    m = scalematch({3: (-2 * LN(3), 0.0)})
    force_gate(m.cif, -100.0)
    out = m.training_step(make_batch(), StepInfo(0, epoch, 10, 10, capture=True))
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    a = out.artifacts
    assert bool((a["pseudo"] == pseudo_class).all())
    assert bool((a["pseudo_plain"] == 1).all()) and bool((a["pseudo_fused"] == 0).all())
    assert bool((a["pred_w"] == 1).all()) and bool((a["pred_v"] == 0).all())
    # the paper's reading decodes scale 1 from the unresized 4-row features: its warm-up pseudo-label is class 0
    paper = scalematch({3: (-2 * LN(3), 0.0)}, structure="paper", fusion="average")
    assert bool((paper.training_step(make_batch(), StepInfo(0, 0, 10, 10, capture=True)).artifacts["pseudo"]
                 == 0).all())


def test_both_branches_see_the_labeled_images():
    """Every network call of one step, as (call, images, rows). Reference: the mix batch (2 images, eval); ONE
    encode of cat(x_l, x_w) (4 images); ONE decode of the t-resized features (3 rows) and their dropout copy
    (8 images); the scale-2 forward of all 4 images (8 rows); the strong view (2). No decode at the unresized 4-row
    size of the 4-image batch. Paper: scale 1 decoded unresized (4 images, 4 rows), FSVC a separate decode of the
    weak images only (2 + 2 dropout copies at 3 rows)."""
    mix = [("encode", 2, 4), ("decode", 2, 4)]
    strong = [("encode", 2, 4), ("decode", 2, 4)]
    for structure, expected in (
            ("reference", mix + [("encode", 4, 4), ("decode", 8, 3), ("encode", 4, 8), ("decode", 4, 8)] + strong),
            ("paper", mix + [("encode", 4, 4), ("decode", 4, 4), ("encode", 4, 8), ("decode", 4, 8),
                             ("decode", 4, 3)] + strong)):
        m = scalematch(OFFSET_8, structure=structure)
        m.model.calls = []
        m.training_step(make_batch(), StepInfo(0, 0, 10, 10))
        assert m.model.calls == expected, structure


def test_switches_by_hand():
    """Table 4 rows on the same batch (epoch 0): no fusion = plain labeled CE ln 4 and the plain pseudo-label;
    ISVC / FSVC off drop their terms."""
    cases = {
        (True, True, True): (LN(4 / 3), True, True),
        (True, True, False): (LN(4), True, True),
        (True, False, False): (LN(4), True, False),
        (False, False, False): (LN(4), False, False),
    }
    for (isvc, fsvc, cif), (lx, has_isvc, has_fsvc) in cases.items():
        m = scalematch(OFFSET_8, fusion="average", isvc=isvc, fsvc=fsvc, cif=cif)
        out = m.training_step(make_batch(), StepInfo(0, 0, 10, 10))
        expected = lx + 0.25 * LN(2) * OUT + (0.25 * LN(28) if has_isvc else 0) + (0.5 * LN(4 / 3) if has_fsvc else 0)
        assert out.loss.item() == pytest.approx(expected / 2, rel=1e-5), (isvc, fsvc, cif)
        assert ("loss_isvc" in out.logs) == has_isvc and ("loss_fsvc" in out.logs) == has_fsvc
        assert ("gate_mean" in out.logs) == cif and ("scale" in out.logs) == (isvc or cif)


def test_all_scales_at_once_averages_over_scales():
    """scale_sampling=all (multi-resolution input) with V = (2, 0.5): scale 0.5 (height 2) predicts (ln 3, 0), scale
    2 predicts (-ln 27, 0); plain pseudo-label 0 (warm-up): L_ISVC = (ln 28 + ln(4/3)) / 2; the FSVC factor follows
    the largest scale (0.75)."""
    m = scalematch(OFFSET_8, fusion="average", scales=[2.0, 0.5], scale_sampling="all")
    out = m.training_step(make_batch(), StepInfo(0, 0, 10, 10, capture=True))
    assert out.logs["loss_isvc"].item() == pytest.approx((LN(28) + LN(4 / 3)) / 2, rel=1e-5)
    assert out.artifacts["pred_v"].shape == (2, 2, 4, 4) and out.artifacts["scale"].tolist() == [2.0, 0.5]
    assert out.logs["feature_scale"] == 0.75 and out.logs["scale"] == 2.0


def test_scale_sampling_rules():
    m = scalematch(scales=[0.25, 0.5, 1.5, 2.0], feature_scales_up=[1.25, 1.5])
    torch.manual_seed(0)
    draws = [m.sample_scales()[0] for _ in range(60)]
    assert set(draws) == {0.25, 0.5, 1.5, 2.0}
    torch.manual_seed(0)
    assert [m.sample_scales()[0] for _ in range(60)] == draws          # the torch global RNG decides
    assert m.sample_feature_scale(2.0) == 0.75 and m.sample_feature_scale(1.5) == 0.75
    assert {m.sample_feature_scale(0.5) for _ in range(40)} == {1.25, 1.5}
    u = scalematch(scales=[0.5, 2.0], scale_sampling="uniform")
    vals = [u.sample_scales()[0] for _ in range(50)]
    assert all(0.5 <= s <= 2.0 for s in vals) and len(set(vals)) == 50


def test_config_checks():
    for key, value in (("scale_sampling", "random"), ("fusion", "max"), ("scales", []), ("cif_chunk", 1),
                       ("feature_scales_up", [0.0]), ("cif_warmup_epochs", -1), ("weight_isvc", -0.1)):
        with pytest.raises(ConfigError, match=f"method.{key}"):
            config_from_dict({"method": {"name": "scalematch", key: value}})
    with pytest.raises(ConfigError, match="method.structure"):
        config_from_dict({"method": {"name": "scalematch", "structure": "code"}})
    cfg = config_from_dict({"method": {"name": "scalematch"}}).method
    assert cfg.structure == "reference" and cfg.cif_dim is None and cfg.cif_se_reduction is None
    assert cfg.scales == (0.25, 0.5, 1.5, 2.0) and cfg.tau == 0.95 and cfg.cif_warmup_epochs == 10
    assert cfg.feature_scales_down == (0.75,) and cfg.feature_scales_up == (1.25,)
    assert (cfg.weight_s, cfg.weight_isvc, cfg.weight_fsvc) == (0.25, 0.25, 0.5) and cfg.has_cif


# ------------------------------------------------------------------ on the tiny DeepLabV3+


def tiny_method(tiny_cfg, **method):
    from workbench.engine.trainer import build_from_config

    cfg = tiny_cfg(**{"method.name": "scalematch", **{f"method.{k}": v for k, v in method.items()}})
    torch.manual_seed(0)
    return build_from_config(cfg, 3, torch.device("cpu"))


def test_deeplab_step_tiny_scales_gradients_reach_cif(tiny_cfg):
    """32-px crops at scale 0.25 (clamped to 16 px) run; the loss is finite and every CIF parameter gets a gradient;
    the CIF parameters are in the 10x-lr head group."""
    m = tiny_method(tiny_cfg, scales=[0.25], tau=0.0, cif_warmup_epochs=0)
    batch = random_batch(3, 2, 32, True, torch.device("cpu"), torch.Generator().manual_seed(0))
    out = m.training_step(batch, StepInfo(0, 0, 10, 10, capture=True))
    assert bool(torch.isfinite(out.loss)) and out.logs["loss_isvc"].item() > 0
    out.loss.backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in m.cif.parameters())
    assert out.artifacts["gate_w"].shape == (2, 1, 32, 32)
    groups = {g["name"]: g for g in m.param_groups(0.01, 10.0)}
    assert {id(p) for p in m.cif.parameters()} <= {id(p) for p in groups["head"]["params"]}
    assert groups["head"]["lr"] == pytest.approx(0.1)


def test_pred_ori_is_the_decode_of_t_resized_features(tiny_cfg):
    """On the tiny DeepLabV3+ (eval mode, so BatchNorm does not mix the clean and dropout halves): a 36-px crop has
    layer1 features of 9 x 9 (stride 4: 36 -> 18 -> 9) and layer4 of 5 x 5 (output stride 8: 9 -> 5, then dilated);
    t = 0.75 resizes them to floor(6.75) = 6 and floor(3.75) = 3. pred_ori is the decode of exactly those, not the
    unresized decode; a change to what a decode of the unresized 9 x 9 features returns leaves it unchanged (it
    changes the paper structure's scale-1 prediction)."""
    from workbench.methods.scalematch import paper_two_scale

    m = tiny_method(tiny_cfg)
    assert m.cfg.structure == "reference" and isinstance(m.cif, ReferenceCIF)
    model = m.model.eval()
    x = torch.randn(2, 3, 36, 36, generator=torch.Generator().manual_seed(0))
    kw = dict(fusion="cif", branches=True, min_size=16)
    with torch.no_grad():
        sp = reference_two_scale(model, m.cif, x, (2.0,), 0.75, perturb=True, **kw)
        feats = model.encode(x)
        assert feats["low"].shape[-2:] == (9, 9) and feats["high"].shape[-2:] == (5, 5)
        by_hand = model.decode({
            "low": F.interpolate(feats["low"], size=(6, 6), mode="bilinear", align_corners=True),
            "high": F.interpolate(feats["high"], size=(3, 3), mode="bilinear", align_corners=True)}, (36, 36))
        assert torch.allclose(sp.pred_ori, by_hand["logits"], atol=1e-5)
        assert not torch.allclose(sp.pred_ori, model(x)["logits"], atol=1e-3)
        assert sp.feature_sizes["low @ t"] == (6, 6) and sp.feature_sizes["high @ t"] == (3, 3)
        assert sp.scaled_sizes == [(72, 72)] and sp.pred_fp.shape == sp.pred_ori.shape
        paper = paper_two_scale(model, None, x, (2.0,), 0.75, fusion=None, branches=True)

        decode = model.decode

        def shifted(f, out_size=None):       # +100 on every logit of an unresized decode (9 x 9 layer1)
            out = decode(f, out_size)
            return {**out, "logits": out["logits"] + 100} if f["low"].shape[-2:] == (9, 9) else out

        model.decode = shifted
        try:
            sp2 = reference_two_scale(model, m.cif, x, (2.0,), 0.75, perturb=True, **kw)
            paper2 = paper_two_scale(model, None, x, (2.0,), 0.75, fusion=None, branches=True)
        finally:
            del model.decode
    assert torch.equal(sp2.pred_ori, sp.pred_ori) and torch.equal(sp2.pred_joint, sp.pred_joint)
    assert torch.allclose(paper2.pred_ori, paper.pred_ori + 100)


def test_no_loss_reads_unlabeled_ground_truth(tmp_path, tiny_data):
    """Loss and every gradient are independent of y_u (CIF-fused pseudo-labels, tau 0 so every term is active)."""
    from conftest import check_no_gt_in_losses

    _, grads = check_no_gt_in_losses(tmp_path, tiny_data, **{
        "method.name": "scalematch", "method.tau": 0.0, "method.cif_warmup_epochs": 0, "method.scales": [0.5]})
    assert any(k.startswith("cif.") for k in grads)


# ------------------------------------------------------------------ CIF multi-scale evaluation mode


def fixed_gate_predictor(offsets) -> ScaleMatchPredictor:
    torch.manual_seed(0)
    cif = CrossScaleFusion(3, dim=4, chunk=4)
    with torch.no_grad():
        cif.gate[2].weight.zero_()
        cif.gate[2].bias.fill_(-LN(3))       # s_w = 1/4
    return ScaleMatchPredictor(StubNet(offsets), cif, min_size=1)


def test_predictor_fuses_scales_only_inside_the_request():
    """Scales 0.5 (height 2: offset +ln 3 -> (2 ln 3, 0)) and 2 (height 8: (-ln 27, 0)) fused with scale 1
    ((ln 3, 0)) at s_w = 1/4, then averaged: class-0 logit = ((1/4 ln 3 + 3/4 2 ln 3) + (1/4 ln 3 - 3/4 3 ln 3)) / 2
    = (7/4 - 2) ln 3 / 2 = -ln 3 / 8."""
    pred = fixed_gate_predictor({2: (LN(3), 0.0), 8: (-LN(27) - LN(3), 0.0)}).eval()
    x = image(LN(3), n=1)
    assert torch.allclose(pred(x)["logits"][0, :, 0, 0], torch.tensor([LN(3), 0.0]))
    with torch.no_grad(), cif_multiscale_inference((0.5, 2.0)) as request:
        out = pred(x)
    assert request.served == 1
    assert torch.allclose(out["logits"][0, :, 1, 2], torch.tensor([-LN(3) / 8, 0.0]), atol=1e-6)
    assert torch.allclose(out["logits_plain"], pred(x)["logits"])


def test_evaluate_cif_multiscale_mode():
    """Labels 1 everywhere: the plain prediction (class 0) scores mIoU 0, the CIF-fused one (class 1) 1."""
    pred = fixed_gate_predictor({2: (LN(3), 0.0), 8: (-LN(27) - LN(3), 0.0)}).eval()
    loader = [(image(LN(3), n=2), torch.ones(2, 4, 4, dtype=torch.long))]

    def fn(x):                                        # what the trainer evaluates: the predictor's "logits"
        return pred(x)["logits"]

    plain = evaluate(fn, loader, 2, EvalSettings(), "cpu", progress=False)
    fused = evaluate(fn, loader, 2, EvalSettings(mode="cif_multiscale", scales=(1.0, 0.5, 2.0)), "cpu",
                     progress=False)
    assert plain["miou"] == 0.0 and fused["miou"] == pytest.approx(1.0)
    net = StubNet().eval()
    with pytest.raises(ValueError, match="CIF"):
        evaluate(lambda x: net(x)["logits"], loader, 2, EvalSettings(mode="cif_multiscale", scales=(0.5, 2.0)),
                 "cpu", progress=False)
    with pytest.raises(ValueError, match="other than 1.0"):
        EvalSettings(mode="cif_multiscale")


def reference_predictor(offsets) -> ScaleMatchPredictor:
    torch.manual_seed(0)
    cif = ReferenceCIF(3)
    force_gate(cif, LN(3))                   # g = 3/4 (in eval mode the last BN still outputs its bias)
    return ScaleMatchPredictor(StubNet(offsets), cif, min_size=1)


def test_reference_predictor_fuses_with_the_training_forward():
    """Reference structure, g = 3/4 on the lower-resolution prediction, 4-px image of logit ln 3:
    v = 0.5 (t = 1.25): lo = scale 0.5 (2 rows, offset +ln 3: (2 ln 3, 0)), hi = pred_ori (5 rows: (ln 3, 0)) ->
    3/4 2 ln 3 + 1/4 ln 3 = 7/4 ln 3; v = 2 (t = 0.75): lo = pred_ori (3 rows: (ln 3, 0)), hi = scale 2 (8 rows,
    offset -13 ln 3: (-12 ln 3, 0)) -> 3/4 ln 3 - 3 ln 3 = -9/4 ln 3; mean = -ln 3 / 4: class 1, while the plain
    prediction (ln 3, 0) is class 0."""
    pred = reference_predictor({2: (LN(3), 0.0), 8: (-13 * LN(3), 0.0)}).eval()
    x = image(LN(3), n=1)
    with torch.no_grad(), cif_multiscale_inference((0.5, 2.0)) as request:
        out = pred(x)
    assert request.served == 1
    assert torch.allclose(out["logits"][0, :, 1, 2], torch.tensor([-LN(3) / 4, 0.0]), atol=1e-5)
    assert torch.allclose(out["logits_plain"][0, :, 1, 2], torch.tensor([LN(3), 0.0]))
    loader = [(image(LN(3), n=2), torch.ones(2, 4, 4, dtype=torch.long))]

    def fn(x):
        return pred(x)["logits"]

    assert evaluate(fn, loader, 2, EvalSettings(), "cpu", progress=False)["miou"] == 0.0
    fused = evaluate(fn, loader, 2, EvalSettings(mode="cif_multiscale", scales=(1.0, 0.5, 2.0)), "cpu",
                     progress=False)
    assert fused["miou"] == pytest.approx(1.0)


def test_cif_multiscale_needs_a_cif_in_the_config():
    ok = {"eval": {"mode": "cif_multiscale", "scales": [0.5, 2.0]}}
    assert config_from_dict({**ok, "method": {"name": "scalematch"}}).eval.mode == "cif_multiscale"
    for method in ({"name": "unimatch"}, {"name": "scalematch", "fusion": "average"},
                   {"name": "scalematch", "cif": False}):
        with pytest.raises(ConfigError, match="eval.mode.*CIF module"):
            config_from_dict({**ok, "method": method})
    with pytest.raises(ConfigError, match="eval.scales"):
        config_from_dict({"eval": {"mode": "cif_multiscale"}, "method": {"name": "scalematch"}})


# ------------------------------------------------------------------ training runs


def test_training_resume_and_artifacts(tiny_cfg):
    """A short run with CIF multi-scale evaluation trains, captures, and a run cut at step 3 and resumed from its
    step-2 checkpoint logs the same scales and losses and ends with the same CIF weights."""
    from workbench.engine.checkpoint import load_checkpoint
    from workbench.engine.rundir import RunDir
    from workbench.engine.trainer import Trainer, train

    over = {"method.name": "scalematch", "method.cif_warmup_epochs": 0, "method.tau": 0.5, "train.iters": 4,
            "train.checkpoint_every": 2, "train.capture_every": 2, "eval.mode": "cif_multiscale",
            "eval.scales": [0.5, 2.0]}
    full = tiny_cfg(**over, name="full")
    summary = train(full)
    assert summary["finished"]
    cut = tiny_cfg(**over, name="cut")
    Trainer(cut).fit(stop_at=3)
    train(cut)
    runs = [RunDir(c.run_dir).read_metrics("train") for c in (full, cut)]
    assert [r["scale"] for r in runs[0]] == [r["scale"] for r in runs[1]] and len(runs[0]) == 4
    assert [r["loss"] for r in runs[0]] == pytest.approx([r["loss"] for r in runs[1]], rel=1e-5)
    assert {"loss_isvc", "loss_fsvc", "gate_mean", "pl_acc_fused", "pl_acc_plain"} <= runs[0][-1].keys()
    states = [load_checkpoint(RunDir(c.run_dir).latest)["method"] for c in (full, cut)]
    for key in ("cif.compress.0.weight", "cif.gate.9.weight", "cif.rwkv.blocks.0.gamma1"):
        assert torch.allclose(states[0][key], states[1][key], atol=1e-6), key
    evals = RunDir(full.run_dir).read_metrics("eval")
    assert evals and 0.0 <= evals[-1]["miou"] <= 1.0
    index = RunDir(full.run_dir).artifact_index()
    assert [e["step"] for e in index] == [2, 4]
    for key in ("pred_w", "pred_v", "gate_w", "pseudo_fused", "pseudo_plain", "scale", "feature_scale", "pred_fsvc",
                "pseudo", "pred_s1"):
        assert key in index[-1]["keys"], key


def test_config_file_loads():
    from pathlib import Path

    from workbench.config import load_config

    cfg = load_config(Path(__file__).parents[1] / "configs" / "scalematch_synthetic.yaml", ["method.fusion=average"])
    assert cfg.method.name == "scalematch" and cfg.method.fusion == "average" and not cfg.method.has_cif
    assert cfg.method.scales == (0.25, 0.5, 1.5, 2.0)
