"""RankMatch rank-aware correlation consistency ("RankMatch: Exploring the Better Consistency Regularization for
Semi-supervised Semantic Segmentation", CVPR 2024, Sec. 3.3, Eqs. 6-8).

Each pixel's agent-level correlation ``c`` (a distribution over N agents) is turned into a distribution over
orderings of its top-k agents with the Plackett-Luce model,
``P(pi | c) = prod_n c_pi(n) / sum_{n' >= n} c_pi(n')``, using the top-k values only (the denominators run over the
remaining top-k agents, as in the authors' code). The orderings are enumerated once as an index tensor in
``itertools.permutations(range(k))`` order, ordering ``(0, 1, ..., k-1)`` being the weak view's descending order.

Two guards against zero denominators exist (``guard`` argument, see ``docs/fidelity.md``):

- ``"reference"`` (the default, as the authors' code): ``eps`` (1e-10) is added to *every* denominator,
  ``c_pi(n) / (sum_{n' >= n} c_pi(n') + eps)``. It is not scale-free: with raw 256-channel agent correlations the
  softmax is peaked and many top-k values fall below 1e-10, so such pixels' distributions sum to well under 1 and
  contribute almost nothing to the loss.
- ``"floor"`` (our switch): weights are raised to at least ``sqrt(finfo.tiny)`` and nothing is added, so every
  distribution sums to 1 whatever the scale.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

__all__ = ["GUARDS", "REFERENCE_EPS", "permutations", "plackett_luce", "rank_distributions", "rank_consistency_loss"]

MAX_K = 8  # 8! = 40320 orderings; beyond that the distributions get impractically large
GUARDS = ("reference", "floor")
REFERENCE_EPS = 1e-10  # the authors' epsilon, in every Plackett-Luce denominator and inside the loss's log


def permutations(k: int, device: torch.device | str | None = None) -> Tensor:
    """All orderings of ``k`` items: int64 ``[k!, k]`` in ``itertools.permutations(range(k))`` order."""
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
        raise ValueError(f"k must be an int in [1, {MAX_K}], got {k!r}")
    return torch.tensor(list(itertools.permutations(range(k))), dtype=torch.long, device=device)


def plackett_luce(values: Tensor, guard: str = "reference", eps: float = REFERENCE_EPS) -> Tensor:
    """Plackett-Luce probabilities of every ordering of the last axis.

    Args:
        values: float ``[..., k]`` non-negative item weights.
        guard: ``"reference"`` adds ``eps`` to every denominator (the authors' code); ``"floor"`` raises the
            weights to at least ``sqrt(finfo.tiny)`` and adds nothing (scale-free; ``eps`` unused).
        eps: the reference guard's epsilon (1e-10 in the authors' code).

    Returns:
        float32 (or float64 for float64 input) ``[..., k!]``: entry ``p`` is the probability of ordering
        ``permutations(k)[p]``, ``prod_n v[pi(n)] / (sum_{n' >= n} v[pi(n')] + eps)``.

    With ``"reference"`` the entries sum to 1 only while the weights are large against ``eps``: a pixel whose top-k
    weights lie near or below 1e-10 gets a distribution with a small total. With ``"floor"`` they always sum to 1:
    weights that all underflowed give the uniform distribution, no intermediate gradient exceeds
    ``upstream / 1.1e-19`` (float32), and gradients do not flow into floored weights.
    """
    if not isinstance(values, Tensor) or values.dim() < 1 or not values.is_floating_point():
        raise ValueError(f"values must be a float tensor [..., k], got {getattr(values, 'shape', values)!r}")
    if guard not in GUARDS:
        raise ValueError(f"guard must be one of {GUARDS}, got {guard!r}")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    values = values.double() if values.dtype == torch.float64 else values.float()
    if guard == "floor":
        values = values.clamp_min(torch.finfo(values.dtype).tiny ** 0.5)
    order = permutations(values.shape[-1], values.device)
    ranked = values[..., order]  # [..., k!, k]
    remaining = ranked.flip(-1).cumsum(-1).flip(-1)  # sum over positions n' >= n
    if guard == "reference":
        remaining = remaining + eps
    return (ranked / remaining).prod(dim=-1)


def rank_distributions(corr_w: Tensor, corr_s: Tensor, k: int = 4, guard: str = "reference",
                       eps: float = REFERENCE_EPS) -> tuple[Tensor, Tensor]:
    """Agent-ranking distributions of the weak and strong views (RankMatch Eq. 6 on the weak view's top-k agents).

    Args:
        corr_w: float ``[..., N]`` weak-view agent-level correlation (softmax over agents), e.g. ``[B, HW, N]``.
        corr_s: float ``[..., N]`` strong-view correlation with the same agents.
        k: agents ranked per pixel (4 in the paper), at most ``min(N, 8)``.
        guard, eps: the zero-denominator guard of :func:`plackett_luce` (the authors' ``+1e-10`` by default).

    Returns:
        ``(dist_w, dist_s)``, each float32 ``[..., k!]``: the Plackett-Luce probabilities, computed from the top-k
        values only, of every ordering of the weak view's top-k agents (taken in descending order of ``corr_w``, ties
        as ``torch.topk`` breaks them); the strong view is evaluated on the same agent indices.
    """
    for name, value in (("corr_w", corr_w), ("corr_s", corr_s)):
        if not isinstance(value, Tensor) or value.dim() < 1 or not value.is_floating_point():
            raise ValueError(f"{name} must be a float tensor [..., N], got {getattr(value, 'shape', value)!r}")
    if corr_w.shape != corr_s.shape:
        raise ValueError(f"corr_w {tuple(corr_w.shape)} and corr_s {tuple(corr_s.shape)} must have the same shape")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= min(corr_w.shape[-1], MAX_K):
        raise ValueError(f"k must be an int in [1, min(N={corr_w.shape[-1]}, {MAX_K})], got {k!r}")
    top_w, index = corr_w.topk(k, dim=-1)
    return plackett_luce(top_w, guard, eps), plackett_luce(corr_s.gather(-1, index), guard, eps)


def rank_consistency_loss(dist_w: Tensor, dist_s: Tensor, eps: float = REFERENCE_EPS) -> Tensor:
    """``KL(weak || strong)`` over the orderings, PyTorch ``kl_div(log(dist_s + eps), dist_w, reduction="mean")``.

    That convention (the authors' ``KLDivLoss`` with the default ``"mean"``) averages
    ``dist_w * (log dist_w - log(dist_s + eps))`` over *all* elements, pixels and orderings alike, with ``0 log 0 = 0``.
    The weak distribution is the target: detach it (stop-gradient on the teacher side, as in RankMatch).

    Args:
        dist_w: float ``[..., k!]`` target distributions (weak view).
        dist_s: float ``[..., k!]`` predicted distributions (strong view), same shape.
        eps: added before the log of ``dist_s`` (1e-10 in the authors' code).

    Returns:
        float 0-d tensor.
    """
    if not isinstance(dist_w, Tensor) or not isinstance(dist_s, Tensor) or dist_w.shape != dist_s.shape:
        raise ValueError(
            f"dist_w and dist_s must be tensors of one shape, got {getattr(dist_w, 'shape', dist_w)!r} and "
            f"{getattr(dist_s, 'shape', dist_s)!r}"
        )
    if dist_w.numel() == 0:
        raise ValueError("dist_w and dist_s must not be empty")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    return (torch.xlogy(dist_w, dist_w) - dist_w * torch.log(dist_s + eps)).mean()
