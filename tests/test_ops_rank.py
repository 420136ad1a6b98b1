"""RankMatch ops: agent selection, agent-level correlation, Plackett-Luce rank distributions, KL loss."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from workbench.ops.agents import (
    AGENT_SELECTORS,
    agent_correlation,
    orthogonal_agents,
    random_agents,
    topn_agents,
)
from workbench.ops.ranking import permutations, plackett_luce, rank_consistency_loss, rank_distributions


def pixel_feats(vectors: list[list[float]]) -> torch.Tensor:
    """Features [1, C, 1, P] with the given per-pixel vectors."""
    return torch.tensor(vectors).t().reshape(1, len(vectors[0]), 1, len(vectors))


# ---------------------------------------------------------------------------------------------- Plackett-Luce
def test_plackett_luce_three_agents_by_hand() -> None:
    dist = plackett_luce(torch.tensor([0.5, 0.3, 0.2]))
    # itertools order: abc, acb, bac, bca, cab, cba
    # abc = .5/1 * .3/.5 = .3; acb = .5 * .2/.5 = .2; bac = .3 * .5/.7; bca = .3 * .2/.7; cab = .2 * .5/.8; cba = .2*.3/.8
    expected = torch.tensor([0.3, 0.2, 0.3 * 0.5 / 0.7, 0.3 * 0.2 / 0.7, 0.2 * 0.5 / 0.8, 0.2 * 0.3 / 0.8])
    assert torch.allclose(dist, expected, atol=1e-6)
    assert float(dist.sum()) == pytest.approx(1.0, abs=1e-6)


def test_permutations_follow_itertools_order() -> None:
    assert permutations(3).tolist() == [list(p) for p in itertools.permutations(range(3))]
    assert permutations(4).shape == (24, 4)
    with pytest.raises(ValueError, match="k"):
        permutations(9)


def test_rank_distributions_use_weak_top_k_for_both_views() -> None:
    corr_w = torch.tensor([[0.1, 0.4, 0.05, 0.3, 0.15]])
    corr_s = torch.full((1, 5), 0.2)
    dist_w, dist_s = rank_distributions(corr_w, corr_s, k=3)
    assert dist_w.shape == dist_s.shape == (1, 6)
    # weak top-3 agents in descending order: 1 (.4), 3 (.3), 4 (.15); identity ordering: .4/.85 * .3/.45
    assert float(dist_w[0, 0]) == pytest.approx(0.4 / 0.85 * 0.3 / 0.45, abs=1e-6)
    # ordering (4, 1, 3) = permutation (2, 0, 1): .15/.85 * .4/.7
    assert float(dist_w[0, 4]) == pytest.approx(0.15 / 0.85 * 0.4 / 0.7, abs=1e-6)
    # equal strong values on those agents -> every ordering 1/6
    assert torch.allclose(dist_s, torch.full((1, 6), 1 / 6), atol=1e-6)


def test_rank_distributions_sum_to_one_and_are_batched() -> None:
    g = torch.Generator().manual_seed(0)
    corr_w = torch.randn(2, 7, 16, generator=g).softmax(-1)
    corr_s = torch.randn(2, 7, 16, generator=g).softmax(-1)
    dist_w, dist_s = rank_distributions(corr_w, corr_s, k=4)
    assert dist_w.shape == (2, 7, 24)
    assert torch.allclose(dist_w.sum(-1), torch.ones(2, 7), atol=1e-5)
    assert torch.allclose(dist_s.sum(-1), torch.ones(2, 7), atol=1e-5)
    # the weak view's descending order is the most likely ordering of the weak distribution
    assert bool((dist_w.argmax(-1) == 0).all())
    with pytest.raises(ValueError, match="k"):
        rank_distributions(corr_w, corr_s, k=17)


def test_rank_consistency_loss_by_hand() -> None:
    p = torch.tensor([[0.5, 0.5]])
    assert float(rank_consistency_loss(p, p.clone())) == pytest.approx(0.0, abs=1e-7)
    q = torch.tensor([[0.25, 0.75]])
    # mean over the 2 elements of p (log p - log q): (0.5 ln 2 + 0.5 ln(2/3)) / 2
    assert float(rank_consistency_loss(p, q)) == pytest.approx((0.5 * math.log(2) + 0.5 * math.log(2 / 3)) / 2, 1e-5)
    # zero targets contribute nothing (0 log 0 = 0)
    assert float(rank_consistency_loss(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0]))) == pytest.approx(0, abs=1e-7)
    with pytest.raises(ValueError, match="shape"):
        rank_consistency_loss(p, torch.ones(1, 3) / 3)


def test_rank_loss_gradient_reaches_strong_view_only_through_dist_s() -> None:
    logits_s = torch.zeros(1, 3, 8, requires_grad=True)
    corr_w = torch.linspace(0, 1, 8).softmax(-1).expand(1, 3, 8)
    dist_w, dist_s = rank_distributions(corr_w, logits_s.softmax(-1), k=4)
    rank_consistency_loss(dist_w, dist_s).backward()
    assert logits_s.grad is not None and float(logits_s.grad.abs().sum()) > 0


def test_plackett_luce_reference_guard_on_peaked_weights_by_hand() -> None:
    """The authors' guard adds 1e-10 to every denominator. Peaked top-4 weights v = (1, 3e-11, 2e-11, 1e-11), as a
    softmax of raw 256-channel dot products gives them. In units of 1e-11 the tail is (3, 2, 1) and eps = 10:
    orderings that put agent 0 first have first factor 1 / (1 + 1.6e-10) and the tail factors
    a/(a+b+c+10) * b/(b+c+10) * c/(c+10); orderings that do not are below 1e-11 * 1e11 ... * 1e-11, i.e. ~0.
      (3,2,1): 3/16 * 2/13 * 1/11 = 6/2288     (3,1,2): 3/16 * 1/13 * 2/12 = 6/2496
      (2,3,1): 2/16 * 3/14 * 1/11 = 6/2464     (2,1,3): 2/16 * 1/14 * 3/13 = 6/2912
      (1,3,2): 1/16 * 3/15 * 2/12 = 6/2880     (1,2,3): 1/16 * 2/15 * 3/13 = 6/3120
    so the distribution sums to ~0.0135, not 1. The floor guard adds nothing: identity = 3/6 * 2/3 * 1 = 1/3, sum 1."""
    v = torch.tensor([1.0, 3e-11, 2e-11, 1e-11], dtype=torch.float64)
    ref = plackett_luce(v)  # default guard = the reference's
    identity = 6 / 2288 / (1 + 1.6e-10)
    assert float(ref[0]) == pytest.approx(identity, rel=1e-9)  # ordering (0, 1, 2, 3)
    total = sum(6 / d for d in (2288, 2496, 2464, 2912, 2880, 3120))
    assert float(ref.sum()) == pytest.approx(total, rel=1e-6)
    assert float(ref.sum()) < 0.014
    floor = plackett_luce(v, guard="floor")
    assert float(floor[0]) == pytest.approx(1 / 3, rel=1e-9) and float(floor.sum()) == pytest.approx(1.0, rel=1e-12)
    # the same in float32 (what training uses): 1e-11 is far above float32's smallest normal number
    assert float(plackett_luce(v.float())[0]) == pytest.approx(identity, rel=1e-5)
    # a weight that underflowed to 0 zeroes every ordering under the reference guard (its factor is 0 wherever it
    # stands): (1, 0) -> (0, 0), where the floor gives (1, 0)
    assert plackett_luce(torch.tensor([1.0, 0.0])).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="guard"):
        plackett_luce(v, guard="clamp")


def test_plackett_luce_underflowed_weights_stay_normalised_with_finite_gradients() -> None:
    # floor guard: a zero weight (an underflowed softmax entry) acts as a vanishing positive one: (1, 0) -> (1, 0)
    assert plackett_luce(torch.tensor([1.0, 0.0]), guard="floor").tolist() == pytest.approx([1.0, 0.0], abs=1e-18)
    assert torch.allclose(plackett_luce(torch.zeros(3), guard="floor"), torch.full((6,), 1 / 6))  # uniform
    # near one-hot strong correlations (raw dot products of large features): many exact zeros in float32
    logits_s = torch.tensor([[0.0, -30.0, -60.0, -200.0, -900.0, 5.0]], requires_grad=True)
    corr_s = logits_s.softmax(-1)
    assert int((corr_s == 0).sum()) >= 1
    corr_w = torch.tensor([[0.4, 0.3, 0.2, 0.1, 0.0, 0.0]])
    dist_w, dist_s = rank_distributions(corr_w, corr_s, k=4, guard="floor")
    assert torch.allclose(dist_s.sum(-1), torch.ones(1), atol=1e-6)
    rank_consistency_loss(dist_w, dist_s, eps=1e-10).backward()
    assert bool(torch.isfinite(logits_s.grad).all()) and float(logits_s.grad.abs().sum()) > 0


# ---------------------------------------------------------------------------------------------- agents
HAND = [
    [1.0, 0.0, 0.0],  # 0: e1
    [0.9, 0.1, 0.0],  # 1: almost e1
    [0.0, 2.0, 0.0],  # 2: e2 (length does not matter)
    [1.0, 1.0, 0.0],  # 3: between e1 and e2
    [0.0, 0.0, -3.0],  # 4: -e3 (the sign does not matter either)
    [0.0, 1.0, 1.0],  # 5: between e2 and e3
]


def test_orthogonal_agents_pick_orthogonal_directions_first() -> None:
    agents = orthogonal_agents(pixel_feats(HAND), 4, first=torch.tensor([0]))
    # from e1: pixels 2, 4, 5 have |cos| 0 -> the first of them, 2; then max |cos| to {e1, e2}: p1 .99, p3 .71, p4 0,
    # p5 .71 -> 4; then p1 .99, p3 .71, p5 .71 -> tie, smaller index 3
    assert agents.tolist() == [[0, 2, 4, 3]]
    everyone = orthogonal_agents(pixel_feats(HAND), 6, first=torch.tensor([0]))
    assert sorted(everyone[0].tolist()) == list(range(6))  # never a pixel twice


def test_orthogonal_agents_batched_and_seeded() -> None:
    feats = torch.randn(3, 8, 5, 5, generator=torch.Generator().manual_seed(0))
    a = orthogonal_agents(feats, 10, generator=torch.Generator().manual_seed(5))
    b = orthogonal_agents(feats, 10, generator=torch.Generator().manual_seed(5))
    assert a.shape == (3, 10) and torch.equal(a, b)
    for row in a:
        assert len(set(row.tolist())) == 10
    with pytest.raises(ValueError, match="num"):
        orthogonal_agents(feats, 26)


def test_random_agents_distinct_and_reproducible() -> None:
    feats = torch.zeros(4, 2, 6, 6)
    a = random_agents(feats, 36, generator=torch.Generator().manual_seed(3))
    assert all(sorted(row.tolist()) == list(range(36)) for row in a)
    b = random_agents(feats, 5, generator=torch.Generator().manual_seed(3))
    c = random_agents(feats, 5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(b, c) and b.shape == (4, 5)


def test_topn_agents_by_hand() -> None:
    feats = pixel_feats([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # S rows: pixels 0, 1 -> softmax(1, 1, 0); pixel 2 -> softmax(0, 0, 1). Column sums:
    # col 0 = col 1 = 2e/(2e+1) + 1/(2+e) = 1.0566, col 2 = 2/(2e+1) + e/(2+e) = 0.8868 -> 0 and 1 first
    assert topn_agents(feats, 2).tolist() == [[0, 1]]
    assert topn_agents(feats, 3, chunk=1).tolist() == [[0, 1, 2]]
    assert set(AGENT_SELECTORS) == {"orthogonal", "random", "topn"}


def test_agent_correlation_by_hand() -> None:
    feats = pixel_feats([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    corr = agent_correlation(feats, torch.tensor([[0, 1]]))
    s = 1 / (1 + math.e)  # softmax(0, 1)[0]
    assert torch.allclose(corr, torch.tensor([[[1 - s, s], [s, 1 - s], [0.5, 0.5]]]), atol=1e-6)
    # cosine variant with temperature 0.5: pixel 2 vs agents: cos = 1/sqrt(2) each -> still (0.5, 0.5);
    # pixel 0: logits (1, 0) / 0.5 = (2, 0)
    cos = agent_correlation(feats, torch.tensor([[0, 1]]), normalize=True, temperature=0.5)
    assert float(cos[0, 0, 0]) == pytest.approx(math.e**2 / (1 + math.e**2), abs=1e-6)
    assert torch.allclose(cos[0, 2], torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="agents"):
        agent_correlation(feats, torch.tensor([[0, 3]]))
    with pytest.raises(ValueError, match="temperature"):
        agent_correlation(feats, torch.tensor([[0, 1]]), temperature=0.0)
