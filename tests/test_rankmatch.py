"""RankMatch: consistency losses and feature CutMix by hand, the whole loss on a stub model, training runs, GT."""
from __future__ import annotations

import math

import pytest
import torch

from workbench.config import ConfigError, config_from_dict
from workbench.engine.rundir import RunDir
from workbench.engine.trainer import train
from workbench.methods import METHODS, SemiBatch, StepInfo
from workbench.methods.rankmatch import RankMatch, correlation_consistency, cutmix_features

from conftest import StubSegNet

LN = math.log


def test_consistency_losses_by_hand():
    """One pixel, three agents: c_w = (1/2, 3/10, 1/5), c_s = (1/5, 1/5, 3/5)."""
    cw = torch.tensor([[[0.5, 0.3, 0.2]]])
    cs = torch.tensor([[[0.2, 0.2, 0.6]]])
    kl = 0.5 * LN(0.5 / 0.2) + 0.3 * LN(0.3 / 0.2) + 0.2 * LN(0.2 / 0.6)
    assert correlation_consistency(cw, cs, "kl", eps=0.0).item() == pytest.approx(kl, rel=1e-5)
    ce = -(0.5 * LN(0.2) + 0.3 * LN(0.2) + 0.2 * LN(0.6))
    assert correlation_consistency(cw, cs, "ce", eps=0.0).item() == pytest.approx(ce, rel=1e-5)
    assert correlation_consistency(cw, cs, "l2").item() == pytest.approx(0.09 + 0.01 + 0.16, rel=1e-5)
    # rank, k = 2: weak top-2 = agents (0, 1); Plackett-Luce on the top-2 values only:
    # weak (0,1): 0.5/0.8 = 5/8, (1,0): 3/8; strong on the same agents (0.2, 0.2): 1/2 each; mean over 2 orderings
    rank = (5 / 8 * LN(5 / 4) + 3 / 8 * LN(3 / 4)) / 2
    assert correlation_consistency(cw, cs, "rank", k=2, eps=0.0).item() == pytest.approx(rank, rel=1e-5)
    # identical views: every divergence is 0; the cross-entropy is the entropy of c_w
    for kind in ("rank", "kl", "ce", "l2"):
        same = correlation_consistency(cw, cw, kind, k=3, eps=0.0).item()
        expected = -(0.5 * LN(0.5) + 0.3 * LN(0.3) + 0.2 * LN(0.2)) if kind == "ce" else 0.0
        assert same == pytest.approx(expected, abs=1e-7), kind
    with pytest.raises(ValueError, match="kind"):
        correlation_consistency(cw, cs, "cosine")


def test_ce_and_kl_consistency_train_identically():
    """Table 6's CE and KL rows differ by the weak view's entropy, a constant when the weak side is a target: their
    gradients are equal. One pixel, c_w = (1/2, 3/10, 1/5), c_s = (1/5, 1/5, 3/5): d/dc_s = -c_w / c_s =
    (-5/2, -3/2, -1/3) for both, and KL - CE = sum c_w log c_w."""
    cw = torch.tensor([[[0.5, 0.3, 0.2]]])
    grads, values = {}, {}
    for kind in ("kl", "ce"):
        cs = torch.tensor([[[0.2, 0.2, 0.6]]], requires_grad=True)
        loss = correlation_consistency(cw, cs, kind, eps=0.0)
        loss.backward()
        grads[kind], values[kind] = cs.grad[0, 0].tolist(), loss.item()
    for kind in ("kl", "ce"):
        assert grads[kind] == pytest.approx([-5 / 2, -3 / 2, -1 / 3], rel=1e-6), kind
    assert values["kl"] - values["ce"] == pytest.approx(0.5 * LN(0.5) + 0.3 * LN(0.3) + 0.2 * LN(0.2), rel=1e-5)


def test_cutmix_features_pastes_at_image_resolution_and_resizes():
    """2x2 features (0, 2 / 4, 6) upsampled to a 3x3 image (align_corners: 0 1 2 / 2 3 4 / 4 5 6); the mix batch's
    constant 10 pasted at the centre pixel; resized to 3x3 it shows, resized to 2x2 (the corners) it does not."""
    fw = torch.tensor([[0.0, 2.0], [4.0, 6.0]]).view(1, 1, 2, 2)
    fm = torch.full_like(fw, 10.0)
    box = torch.zeros(1, 3, 3, dtype=torch.bool)
    box[0, 1, 1] = True
    big = cutmix_features(fw, fm, box, (3, 3))
    assert big[0, 0].tolist() == [[0, 1, 2], [2, 10, 4], [4, 5, 6]]
    assert torch.allclose(cutmix_features(fw, fm, box, (2, 2)), fw)
    corner = torch.zeros(1, 3, 3, dtype=torch.bool)
    corner[0, 0, 0] = True
    assert cutmix_features(fw, fm, corner, (2, 2))[0, 0].tolist() == [[10, 2], [4, 6]]
    assert cutmix_features(fw, fm, None, (3, 3))[0, 0, 1].tolist() == [2, 3, 4]
    with pytest.raises(ValueError, match="box"):
        cutmix_features(fw, fm, box.long(), (2, 2))


def AgentNet() -> StubSegNet:
    """A stub model on 4-channel images: logits = channels 0-1, "aspp" features = channels 2-3 (full resolution),
    perturbed logits 0 (everything x the scale parameter)."""
    return StubSegNet({"aspp": lambda x: x[:, 2:]}, scaled=True)


def rankmatch(**method) -> RankMatch:
    cfg = config_from_dict({"method": {"name": "rankmatch", **method}}).method
    return METHODS["rankmatch"](AgentNet(), cfg, 2)


def test_rankmatch_loss_by_hand():
    """1x2 images. Weak and mix logits (ln 3, 0) (pseudo 0, conf 3/4 >= tau 0.7), strong logits (0, 0), labeled
    target 1: UniMatch part = (ln 4 + 0.25 ln 2 + 0.25 ln 2 + 0.5 ln 2) / 2.

    Agents = all pixels (A, B). Weak features A = (s, 0), B = (0, s) with s^2 = ln 3: c_w(A) = softmax(ln 3, 0)
    = (3/4, 1/4), c_w(B) = (1/4, 3/4); strong features 0: c_s = (1/2, 1/2). Rank-aware with k = 2: weak
    orderings (3/4, 1/4), strong (1/2, 1/2): KL = 3/4 ln 3/2 + 1/4 ln 1/2 per pixel, mean over 2 orderings.
    View 2's box covers B, where the mix batch's feature is (s, 0): both pixels equal, c_w = (1/2, 1/2) -> 0.
    """
    s = math.sqrt(LN(3))
    x_w = torch.zeros(1, 4, 1, 2)
    x_w[:, 0] = LN(3)
    x_w[0, 2, 0, 0] = s
    x_w[0, 3, 0, 1] = s
    x_mix = torch.zeros(1, 4, 1, 2)
    x_mix[:, 0] = LN(3)
    x_mix[:, 2] = s
    x_s = torch.zeros(1, 4, 1, 2)
    box1 = torch.zeros(1, 1, 2, dtype=torch.bool)
    box2 = torch.tensor([[[False, True]]])
    ign = torch.zeros(1, 1, 2, dtype=torch.long)
    x_l = torch.zeros(1, 4, 1, 2)
    x_l[:, 0] = LN(3)
    batch = SemiBatch(x_l=x_l, y_l=torch.ones(1, 1, 2, dtype=torch.long), x_w=x_w, x_s1=x_s, x_s2=x_s, ignore=ign,
                      box1=box1, box2=box2, x_w_mix=x_mix, x_s1_mix=x_s, x_s2_mix=x_s, ignore_mix=ign.clone())
    m = rankmatch(tau=0.7, agents="all", top_k=2, rank_eps=0.0)
    out = m.training_step(batch, StepInfo(0, 0, 10, 10, capture=True))
    kl = (0.75 * LN(1.5) + 0.25 * LN(0.5)) / 2
    unimatch = (LN(4) + 0.25 * LN(2) * 2 + 0.5 * LN(2)) / 2
    assert out.logs["loss_rank"].item() == pytest.approx((kl + 0.0) / 2, rel=1e-5)
    assert out.loss.item() == pytest.approx(unimatch + 0.1 * (kl + 0.0) / 2, rel=1e-5)
    a = out.artifacts
    assert a["agents"].tolist() == [[0, 1]] and a["agent_yx"].tolist() == [[[0, 0], [0, 1]]]
    assert torch.allclose(a["agent_maps"][0, :, 0], torch.tensor([[0.75, 0.25], [0.25, 0.75]]))
    # orderings are of each pixel's own top-k (best first): ordering 0 = "its best agent first" has 3/4 for both
    assert torch.allclose(a["rank_w"][0, :, 0], torch.tensor([[0.75, 0.75], [0.25, 0.25]]))
    assert torch.allclose(a["rank_s"], torch.full((1, 2, 1, 2), 0.5))
    assert a["rank_agents"][0, :, 0].tolist() == [[0, 1], [1, 0]]  # pixel A ranks agent 0 first, B agent 1
    # lambda = 0: exactly UniMatch, the rank term is not computed
    out0 = rankmatch(tau=0.7, weight_rank=0.0).training_step(batch, StepInfo(0, 0, 10, 10))
    assert out0.loss.item() == pytest.approx(unimatch, rel=1e-6) and "loss_rank" not in out0.logs


def test_weak_side_is_a_target_and_agents_are_shared():
    """Gradients reach the strong features only; both views use the weak view's agent positions."""
    m = rankmatch(num_agents=5)
    feat_w = torch.randn(2, 8, 4, 4, requires_grad=True)
    feat_s = torch.randn(2, 8, 4, 4, requires_grad=True)
    box = torch.zeros(2, 16, 16, dtype=torch.bool)
    torch.manual_seed(0)
    view = m.agent_view(feat_w, torch.randn(2, 8, 4, 4), box, feat_s)
    view.loss.backward()
    assert feat_w.grad is None and feat_s.grad is not None and feat_s.grad.abs().sum() > 0
    assert view.agents.shape == (2, 5) and view.corr_w.shape == view.corr_s.shape == (2, 16, 5)
    assert torch.allclose(view.corr_s.sum(-1), torch.ones(2, 16))
    # the strong correlations are those of the strong features at the weak view's agents
    pix = feat_s.detach().flatten(2).transpose(1, 2)
    anchors = torch.stack([pix[b, view.agents[b]] for b in range(2)])
    assert torch.allclose(view.corr_s, (pix @ anchors.transpose(1, 2)).softmax(-1), atol=1e-6)


def test_agent_selection_switches():
    """Orthogonal picks orthogonal directions first; N is capped at the pixels; "all" = every pixel."""
    feats = torch.zeros(1, 3, 2, 2)
    feats[0, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])
    feats[0, :, 0, 1] = torch.tensor([1.0, 0.1, 0.0])   # nearly parallel to pixel 0
    feats[0, :, 1, 0] = torch.tensor([0.0, 1.0, 0.0])
    feats[0, :, 1, 1] = torch.tensor([0.0, 0.0, 1.0])
    torch.manual_seed(0)
    for _ in range(5):  # whatever the random first agent, the three directions come before the near-duplicate
        picked = rankmatch(num_agents=3, top_k=2).select_agents(feats)[0].tolist()
        assert sorted(picked) in ([0, 2, 3], [1, 2, 3])
    assert rankmatch(num_agents=64).select_agents(feats).shape == (1, 4)
    assert rankmatch(agents="all").select_agents(feats).tolist() == [[0, 1, 2, 3]]
    assert sorted(rankmatch(agents="random", num_agents=4).select_agents(feats)[0].tolist()) == [0, 1, 2, 3]
    assert rankmatch(agents="topn", num_agents=2, top_k=2).select_agents(feats).shape == (1, 2)


def test_config_defaults_and_checks():
    cfg = config_from_dict({"method": {"name": "rankmatch"}}).method
    assert (cfg.num_agents, cfg.top_k, cfg.weight_rank, cfg.agents, cfg.consistency) == (64, 4, 0.1, "orthogonal",
                                                                                          "rank")
    assert (cfg.rank_guard, cfg.rank_eps) == ("reference", 1e-10)  # the authors' +1e-10 in every denominator
    assert config_from_dict({"method": {"name": "rankmatch", "num_agents": 128}}).method.num_agents == 128
    for key, value in (("agents", "kmeans"), ("consistency", "js"), ("top_k", 9), ("weight_rank", -1.0),
                       ("agent_temperature", 0.0), ("rank_guard", "clamp")):
        with pytest.raises(ConfigError, match=f"method.{key}"):
            config_from_dict({"method": {"name": "rankmatch", key: value}})


def test_training_run_writes_agent_artifacts(tiny_cfg):
    cfg = tiny_cfg(**{"method.name": "rankmatch", "train.iters": 2, "train.capture_every": 2})
    assert train(cfg)["finished"]
    rec = RunDir(cfg.run_dir).read_metrics("train")[-1]
    assert rec["loss_rank"] > 0 and math.isfinite(rec["loss"])
    keys = RunDir(cfg.run_dir).artifact_index()[-1]["keys"]
    # 32 px crop at output stride 8: 4x4 ASPP features, so N = 16 agents (capped) and 4! = 24 orderings
    assert keys["agents"][0] == [4, 16] and keys["agent_maps"][0] == [4, 16, 4, 4]
    assert keys["rank_w"][0] == keys["rank_s"][0] == [4, 24, 4, 4]
    assert keys["features"][0][:1] + keys["features"][0][2:] == [4, 4, 4]  # weak-view ASPP features (t-SNE)


def test_no_loss_reads_unlabeled_ground_truth(tmp_path, tiny_data):
    """Changing (or removing) the unlabeled GT leaves the loss and every gradient unchanged; diagnostics change."""
    from conftest import check_no_gt_in_losses

    (out_a, _, _), _ = check_no_gt_in_losses(tmp_path, tiny_data, **{"method.name": "rankmatch", "method.tau": 0.0})
    assert out_a.logs["loss_rank"].item() > 0


def _reference_rank_loss(corr_w: torch.Tensor, corr_s: torch.Tensor, k: int = 4, eps: float = 1e-10) -> float:
    """The rank loss written from its definition, pixel by pixel in float64: the weak view's top-k agents, every
    ordering's Plackett-Luce probability with ``eps`` added to each denominator (weak and strong alike), then
    ``KLDivLoss(mean)(log(rank_s + eps), rank_w)`` = mean over pixels and orderings of w (log w - log(s + eps))."""
    import itertools

    terms = []
    for cw, cs in zip(corr_w.double().reshape(-1, corr_w.shape[-1]), corr_s.double().reshape(-1, corr_s.shape[-1])):
        top = sorted(range(len(cw)), key=lambda a: -float(cw[a]))[:k]
        for order in itertools.permutations(range(k)):
            pw = ps = 1.0
            for n in range(k):
                rest = [top[o] for o in order[n:]]
                pw *= float(cw[rest[0]]) / (sum(float(cw[a]) for a in rest) + eps)
                ps *= float(cs[rest[0]]) / (sum(float(cs[a]) for a in rest) + eps)
            terms.append(0.0 if pw == 0 else pw * (math.log(pw) - math.log(ps + eps)))
    return sum(terms) / len(terms)


def test_default_rank_loss_is_the_reference_at_realistic_magnitudes():
    """Raw 256-channel ReLU-like features (the ASPP output) make Eq. 4's softmax peaked: a large share of the top-4
    values is below 1e-10. The default loss equals the reference definition there, and the floor switch differs."""
    g = torch.Generator().manual_seed(0)
    feat_w = torch.relu(torch.randn(1, 256, 4, 4, generator=g)) * 0.6  # |f|^2 ~ 46: dot products differ by ~30
    feat_s = torch.relu(feat_w + 0.1 * torch.randn(1, 256, 4, 4, generator=g))
    m = rankmatch(num_agents=8)
    torch.manual_seed(0)
    view = m.agent_view(feat_w, feat_w, torch.zeros(1, 4, 4, dtype=torch.bool), feat_s)
    top4 = view.corr_w.topk(4, dim=-1).values
    assert float((top4 < 1e-10).float().mean()) > 0.2  # realistic: many top-4 weights below the epsilon
    expected = _reference_rank_loss(view.corr_w, view.corr_s)
    assert view.loss.item() == pytest.approx(expected, rel=1e-3)
    floor = correlation_consistency(view.corr_w, view.corr_s, "rank", k=4, eps=1e-10, guard="floor").item()
    assert abs(floor - expected) > 0.05 * abs(expected)
