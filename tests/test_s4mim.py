"""S4MIM: class-wise grouping and reconstruction (Eqs. 6-7), prototypes and their EMA (Eq. 9), the aggregation loss
(Eqs. 10-12), the Eq. 14 normaliser, and the method (switches, artifacts, resume), with hand-worked values."""
from __future__ import annotations

import math

import pytest
import torch

from workbench.config import ConfigError
from workbench.engine.checkpoint import load_checkpoint
from workbench.engine.rundir import RunDir
from workbench.engine.trainer import Trainer, train
from workbench.ops.mim import ClassHeads, aggregation_loss, class_prototypes, ema_prototypes, group_features, normaliser

# ---------------------------------------------------------------- grouping and class-wise heads

def test_grouping_partitions_the_features():
    g = torch.Generator().manual_seed(0)
    fea = torch.randn(2, 5, 4, 6, generator=g)
    labels = torch.randint(0, 3, (2, 4, 6), generator=g)
    groups = group_features(fea, labels, 3)
    assert groups.shape == (2, 3, 5, 4, 6)
    assert torch.equal(groups.sum(1), fea)                              # the union is fea
    nonzero = (groups != 0).any(2)                                      # [B, C, h, w]
    assert nonzero.sum(1).max().item() == 1                             # disjoint: one group per position
    for c in range(3):
        assert torch.equal(nonzero[:, c], labels == c)


def hand_heads() -> ClassHeads:
    heads = ClassHeads(in_channels=1, num_classes=2, out_channels=1, kernel=3)
    with torch.no_grad():
        heads.weight[0].fill_(1.0)      # Head_0 sums its 3x3 neighbourhood
        heads.weight[1].fill_(2.0)      # Head_1 sums it twice
    return heads


def test_classwise_reconstruction_by_hand():
    heads = hand_heads()
    fea = torch.ones(1, 1, 3, 3)
    labels = torch.tensor([[[1, 0, 0], [1, 0, 0], [1, 0, 0]]])     # left column is class 1
    r = heads(fea, labels)[0, 0]
    # centre: 6 class-0 neighbours x 1 + 3 class-1 neighbours x 2 = 12; top-left corner (zero padding): cells
    # (0,0),(1,0) are class 1 (2 each), (0,1),(1,1) class 0 (1 each) = 6; top-right: 4 class-0 cells = 4
    assert r[1, 1].item() == 12 and r[0, 0].item() == 6 and r[0, 2].item() == 4
    assert torch.allclose(r, heads.reference(fea, labels)[0, 0])
    # basic MIM: every head sees every position -> 3 x (number of in-image neighbours)
    basic = heads(fea, None)[0, 0]
    assert basic[1, 1].item() == 27 and basic[0, 0].item() == 12
    per = heads.per_class(fea, labels)
    assert per.shape == (1, 2, 1, 3, 3) and torch.allclose(per.sum(1), heads(fea, labels))
    assert per[0, 1, 0, 1, 1].item() == 6 and per[0, 0, 0, 1, 1].item() == 6


def test_grouped_heads_equal_the_literal_equation_values_and_gradients():
    g = torch.Generator().manual_seed(1)
    heads = ClassHeads(in_channels=4, num_classes=5, out_channels=3, kernel=3).double()
    assert not torch.allclose(heads.weight[0], heads.weight[1])      # independent initialisations
    fea = torch.randn(2, 4, 7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (2, 7, 5), generator=g)
    fast, slow = heads(fea, labels), heads.reference(fea, labels)
    assert torch.allclose(fast, slow, atol=1e-12)
    go = torch.randn(fast.shape, generator=g, dtype=torch.float64)
    ga = torch.autograd.grad((fast * go).sum(), (fea, heads.weight))
    gb = torch.autograd.grad((slow * go).sum(), (fea, heads.weight))
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(ga, gb))


# ---------------------------------------------------------------- prototypes, dictionary, aggregation

def test_confidence_weighted_prototype_and_ema_by_hand():
    # four positions in a 1 x 2 x 2 map, D = 2: classes [[0, 0], [1, 0]], confidences [[0.5, 1.0], [0.8, 0.25]]
    fea = torch.tensor([[[[2.0, 4.0], [1.0, 8.0]], [[0.0, 6.0], [3.0, 0.0]]]])      # [1, 2, 2, 2]
    labels = torch.tensor([[[0, 0], [1, 0]]])
    conf = torch.tensor([[[0.5, 1.0], [0.8, 0.25]]])
    valid = torch.tensor([[[True, True], [True, False]]])                        # last position excluded
    num, den, count = class_prototypes(fea, labels, conf, valid, num_classes=3)
    v = num / den.clamp(min=1e-12)[:, None]
    # class 0: (0.5 * (2, 0) + 1.0 * (4, 6)) / 1.5 = (5/1.5, 6/1.5); class 1: the single vector (1, 3)
    assert torch.allclose(v[0], torch.tensor([5 / 1.5, 4.0])) and torch.allclose(v[1], torch.tensor([1.0, 3.0]))
    assert count.tolist() == [2, 1, 0] and den[2].item() == 0
    present = count > 0
    d0 = torch.zeros(3, 2)
    d1 = ema_prototypes(d0, v, present, alpha=0.99)
    assert torch.allclose(d1[0], 0.01 * v[0]) and torch.equal(d1[2], torch.zeros(2))
    d2 = ema_prototypes(d1, torch.tensor([[1.0, 1.0], [0.0, 0.0], [9.0, 9.0]]), torch.tensor([True, False, False]),
                        alpha=0.99)
    assert torch.allclose(d2[0], 0.99 * 0.01 * v[0] + 0.01 * torch.tensor([1.0, 1.0]))
    assert torch.equal(d2[1], d1[1]) and torch.equal(d2[2], d1[2])


def test_aggregation_loss_on_known_cosines():
    # class 0 prototype (1, 0): vectors with cos 1, 0, -1 and weights 1, 2, 1 -> (0 + 2 x 0.1 + 1 x 0.2) / 4 = 0.1
    # class 1 prototype (0, 3): vector (1, 1), cos 1/sqrt(2), weight 0.5 -> (1 - 1/sqrt(2)) / 10
    # class 2: prototype not available -> not averaged; class 3: available but no position -> not averaged
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0], [5.0, 5.0], [7.0, 1.0]])
    fea = z.T.reshape(1, 2, 1, 6)
    labels = torch.tensor([[[0, 0, 0, 1, 2, 1]]])
    weights = torch.tensor([[[1.0, 2.0, 1.0, 0.5, 1.0, 3.0]]])
    valid = torch.tensor([[[True, True, True, True, True, False]]])
    protos = torch.tensor([[1.0, 0.0], [0.0, 3.0], [1.0, 1.0], [1.0, 0.0]])
    available = torch.tensor([True, True, False, True])
    loss, classes = aggregation_loss(fea, labels, weights, valid, protos, available, temperature=10.0)
    expected = (0.1 + (1 - 1 / math.sqrt(2)) / 10) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert classes.tolist() == [True, True, False, False]
    # a zero prototype gives 1/T, without gradient
    fea2 = fea.clone().requires_grad_(True)
    l0, _ = aggregation_loss(fea2, torch.zeros_like(labels), torch.ones_like(weights), valid, torch.zeros(4, 2),
                             torch.ones(4, dtype=torch.bool))
    l0.backward()
    assert l0.item() == pytest.approx(0.1) and fea2.grad.abs().sum().item() == 0


def test_eq14_normaliser():
    assert normaliser(0.5, 1 / 3, 0.05, 0.1 / 3) == pytest.approx(1 + 1 + 1 + 0.15 + 0.1)    # 3.25
    assert normaliser(0.5, 1 / 3, 0.05, 0.1 / 3, False, False, False) == pytest.approx(2.0)    # the baseline
    assert normaliser(0.5, 1 / 3, 0.05, 0.1 / 3, True, False, True) == pytest.approx(3.1)


# ---------------------------------------------------------------- the method

def one_step(tiny_cfg, capture: bool = False, **overrides):
    from workbench.data.dataset import SegDataset, StepDataset, StepPlan
    from workbench.engine.trainer import build_from_config
    from workbench.methods import SemiBatch, StepInfo

    cfg = tiny_cfg(**{"method.name": "s4mim", **overrides})
    root = cfg.data.root
    lab, unl = SegDataset(root, "labeled_1-4"), SegDataset(root, "unlabeled_1-4")
    ds = StepDataset(lab, unl, StepPlan(len(lab), len(unl), 2, 2, 1, 0, 0, True), 32)
    ds.total_steps = 1
    torch.manual_seed(0)
    method = build_from_config(cfg, 6, torch.device("cpu"))
    batch = SemiBatch.from_loader(ds[0], torch.device("cpu"), cfg.data.mean, cfg.data.std)
    out = method.training_step(batch, StepInfo(0, 0, 1, 1, capture=capture))
    out.loss.backward()
    return method, out


def test_step_total_is_the_eq14_normalised_sum_and_reaches_the_pixel_decoder(tiny_cfg):
    method, out = one_step(tiny_cfg)
    lg = {k: v.item() for k, v in out.logs.items() if k.startswith("loss_")}
    assert set(lg) == {"loss_x", "loss_s", "loss_fp", "loss_mimpi", "loss_mimfea", "loss_mimse"}
    total = lg["loss_x"] + 0.5 * (lg["loss_s"] + lg["loss_fp"]) + lg["loss_mimpi"] + lg["loss_mimfea"] \
        + lg["loss_mimse"]
    assert out.loss.item() == pytest.approx(total / 3.25, rel=1e-5)
    assert all(v > 0 for k, v in lg.items() if "mim" in k or k == "loss_x")   # untrained: no confident pixels
    for part in (method.pixel_decoder, method.class_heads):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters() if p.requires_grad)
    assert method.proto_seen.any() and method.prototypes.abs().sum() > 0
    seen = method.proto_seen
    assert torch.equal(method.prototypes[~seen], torch.zeros_like(method.prototypes[~seen]))


@pytest.mark.parametrize("switches,absent,norm", [
    ({"method.mimpi": False, "method.mimfea": False, "method.mimse": False},
     {"loss_mimpi", "loss_mimfea", "loss_mimse"}, 2.0),
    ({"method.mimfea": False}, {"loss_mimfea"}, 3.1),
    ({"method.mimpi": False, "method.mimse": False}, {"loss_mimpi", "loss_mimse"}, 2.15),
])
def test_switches_drop_losses_and_their_normaliser(tiny_cfg, switches, absent, norm):
    method, out = one_step(tiny_cfg, **switches)
    lg = {k: v.item() for k, v in out.logs.items() if k.startswith("loss_")}
    assert not absent & lg.keys()
    total = lg["loss_x"] + 0.5 * (lg["loss_s"] + lg["loss_fp"]) + sum(v for k, v in lg.items() if "mim" in k)
    assert out.loss.item() == pytest.approx(total / norm, rel=1e-5)
    if "loss_mimpi" in absent:
        assert all(p.grad is None for p in method.class_heads.parameters())
    if "loss_mimfea" in absent:
        assert not method.proto_seen.any()


@pytest.mark.parametrize("overrides", [{"method.classwise": False}, {"method.dictionary": False},
                                       {"method.confidence": False}, {"method.mimse_loss": "mse"}])
def test_ablation_variants_run(tiny_cfg, overrides):
    method, out = one_step(tiny_cfg, **overrides)
    assert torch.isfinite(out.loss)
    if overrides == {"method.dictionary": False}:
        assert not method.proto_seen.any() and method.prototypes.abs().sum() == 0
        assert out.logs["mimfea_classes"].item() >= 1


def test_pixel_decoder_has_a_constant_lr_group(tiny_cfg):
    method, _ = one_step(tiny_cfg)
    groups = {g["name"]: g for g in method.param_groups(0.01)}
    assert groups["pixel_decoder"]["poly"] is False and groups["pixel_decoder"]["lr"] == pytest.approx(0.1)
    assert groups["backbone"]["poly"] and groups["head"]["lr"] == pytest.approx(0.1)
    pid = {id(p) for p in groups["pixel_decoder"]["params"]}
    assert pid == {id(p) for p in [*method.pixel_decoder.parameters(), *method.class_heads.parameters()]}
    assert not pid & {id(p) for p in groups["head"]["params"]}
    assert method.pixel_decoder.classifier is None


def test_capture_holds_masked_inputs_reconstructions_and_prototypes(tiny_cfg):
    method, out = one_step(tiny_cfg, capture=True)
    a = out.artifacts
    for key in ("x_l_masked", "x_s_masked", "x_w_masked", "recon_l", "recon_s", "recon_fp"):
        assert a[key].shape == (2, 3, 32, 32), key
    assert a["recon_classes"].shape == (2, 6, 3, 8, 8) and a["mim_groups"].shape == (2, 8, 8)
    assert a["prototypes"].shape == (6, method.pixel_decoder.channels) and a["proto_seen"].dtype == torch.bool
    assert a["sed_features"].shape[0] == 2 and a["sed_labels"].shape == (2, 8, 8)
    vis = a["mim_visible"]
    # hidden pixels of the masked weak view are exactly 0 (the mean colour), visible ones keep the image
    assert torch.equal(a["x_w_masked"] * (~vis[:, None]), torch.zeros_like(a["x_w_masked"]))
    assert torch.allclose(a["x_w_masked"][vis[:, None].expand(-1, 3, -1, -1)],
                          a["x_w"][vis[:, None].expand(-1, 3, -1, -1)])
    assert 0.2 < 1 - vis.float().mean().item() < 0.8                    # ratio 0.4 on 6-pixel patches


@pytest.mark.parametrize("key,value", [("mask_ratio", 1.5), ("mimse_loss", "kl"), ("mask_strategy", "zigzag"),
                                       ("temperature", 0), ("weight_mf", -1.0)])
def test_config_errors_name_the_key(tiny_cfg, key, value):
    with pytest.raises(ConfigError, match=key.split("_")[0]):
        tiny_cfg(**{"method.name": "s4mim", f"method.{key}": value})


def test_dictionary_survives_checkpoint_and_resume(tiny_cfg):
    over = {"method.name": "s4mim", "train.iters": 4, "train.checkpoint_every": 2, "train.capture_every": 2}
    full = tiny_cfg(**over, name="full")
    assert train(full)["finished"]
    cut = tiny_cfg(**over, name="cut")
    Trainer(cut).fit(stop_at=3)
    train(cut)
    states = [load_checkpoint(RunDir(c.run_dir).latest)["method"] for c in (full, cut)]
    assert states[0]["prototypes"].abs().sum() > 0
    assert torch.equal(states[0]["prototypes"], states[1]["prototypes"])
    assert torch.equal(states[0]["proto_seen"], states[1]["proto_seen"])
    index = RunDir(full.run_dir).artifact_index()
    assert [e["step"] for e in index] == [2, 4] and "recon_classes" in index[-1]["keys"]


def test_no_loss_reads_unlabeled_ground_truth(tmp_path, tiny_data):
    from conftest import check_no_gt_in_losses

    _, grads = check_no_gt_in_losses(tmp_path, tiny_data, **{"method.name": "s4mim", "method.tau": 0.0})
    assert any(k.startswith("class_heads.") for k in grads) and any(k.startswith("pixel_decoder.") for k in grads)


def test_s4mim_config_file_loads():
    from pathlib import Path

    from workbench.config import load_config

    cfg = load_config(Path(__file__).parents[1] / "configs" / "s4mim_synthetic.yaml", ["method.mimfea=false"])
    assert cfg.method.name == "s4mim" and cfg.method.mask_patch == 6 and cfg.method.mask_ratio == 0.4
    assert cfg.method.weight_mp == pytest.approx(1 / 3) and not cfg.method.mimfea
