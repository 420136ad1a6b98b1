"""RankMatch (CVPR 2024): UniMatch + rank-aware agent-level correlation consistency.

One training step (the paper's Sec. 3 and the authors' public ``rankmatch.py``; ``docs/fidelity.md``):

1. the mix batch is predicted in eval mode without gradients; the same pass gives its ASPP features;
2. UniMatch's passes: ``cat(x_l, x_w)`` with feature perturbation, ``cat(x_s1, x_s2)`` (both CutMixed);
3. for each strong view ``i``: the weak view's ASPP features (detached: the teacher side) are upsampled to the
   image, CutMixed with the mix batch's features inside box ``i``, and resized to the strong view's feature size;
   ``N`` agents are chosen on them (orthogonal selection by default); every pixel of both views is correlated with
   the agents at the *same positions*, each view with its own features: ``c = softmax(f . A^T)`` (Eq. 4);
4. the consistency between the weak and strong correlations: the rank-aware loss (Plackett-Luce distributions over
   the orderings of the weak view's top-k agents, KL(weak || strong) averaged over all elements, the reference's
   ``KLDivLoss(reduction="mean")`` with ``eps = 1e-10`` inside the log), or Table 6's agent-independent variants;
5. ``loss = (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2 + lambda (L_rank1 + L_rank2) / 2``.

Correlation scale (the ops helper's remark): with raw dot products of 256-channel ReLU features, Eq. (4)'s softmax is
nearly one-hot. The paper's Eq. (4) and the reference code both use raw dot products (no normalisation, no
temperature), so that is the default; ``agent_normalize`` (cosine similarities) and ``agent_temperature`` are
switches for studying the alternative. The number of agents defaults to the reference code's 64 (the paper states
128; ``num_agents=128`` reproduces it). It is capped at the number of feature pixels (tiny crops).

Features are the model's ``"aspp"`` output (no dropout after the ASPP projection, as in the reference ASPP); the
mix features come from an eval-mode pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from workbench.config import bounded
from workbench.methods.base import LossTerms, SemiBatch, StepInfo, StepOutput, register_method, weighted_sum
from workbench.methods.fixmatch import Targets, UniMatch, UniMatchConfig, UniMatchPass
from workbench.ops.agents import agent_correlation, orthogonal_agents, random_agents, topn_agents
from workbench.ops.ranking import MAX_K, rank_consistency_loss, rank_distributions
from workbench.ops.semi import pseudo_label

AGENT_CHOICES = ("orthogonal", "random", "topn", "all")
CONSISTENCY_CHOICES = ("rank", "kl", "ce", "l2")


@dataclass
class RankMatchConfig(UniMatchConfig):
    """RankMatch settings on top of UniMatch's.

    ``weight_rank``: lambda (0.1; 0 gives UniMatch exactly, the rank term is then not computed). ``num_agents``: N
    (default 64 = the authors' code; the paper says 128), capped at the feature pixels. ``top_k``: agents ranked per
    pixel (4). ``agents``: Table 5's selection, ``orthogonal`` / ``random`` / ``topn`` / ``all`` (every pixel is an
    agent). ``consistency``: Table 6, ``rank`` (rank-aware) or the agent-independent ``kl`` (Eq. 5: KL(c_w || c_s)
    summed over agents, averaged over pixels), ``ce`` (-sum c_w log c_s, same averaging) and ``l2`` (sum of squared
    differences, same averaging); whichever is chosen is logged as ``loss_rank``. ``agent_normalize`` /
    ``agent_temperature``: cosine similarities and a temperature in Eq. 4 (off / 1 = the paper). ``rank_eps``: added
    inside the logs and, with ``rank_guard: reference``, to every Plackett-Luce denominator (1e-10, as the authors'
    code). ``rank_guard``: ``reference`` (default, the authors' ``+eps`` in every denominator) or ``floor`` (our
    scale-free switch: weights floored at ``sqrt(finfo.tiny)``, distributions always sum to 1; see
    ``docs/fidelity.md``). ``capture_agents``: agent activation maps kept in captured artifacts.
    """

    name: str = "rankmatch"
    weight_rank: float = bounded(0.1, ge=0)
    num_agents: int = bounded(64, ge=1)
    top_k: int = bounded(4, ge=1)
    agents: Literal["orthogonal", "random", "topn", "all"] = "orthogonal"
    consistency: Literal["rank", "kl", "ce", "l2"] = "rank"
    agent_normalize: bool = False
    agent_temperature: float = bounded(1.0, gt=0)
    rank_eps: float = bounded(1e-10, ge=0)
    rank_guard: Literal["reference", "floor"] = "reference"
    capture_agents: int = bounded(16, ge=0)

    def cross_checks(self) -> list[tuple[bool, str, str]]:
        return [*super().cross_checks(),
                (self.top_k <= min(self.num_agents, MAX_K), "top_k", f"must lie in [1, min(num_agents, {MAX_K})]")]


def cutmix_features(feat_w: Tensor, feat_mix: Tensor, box: Tensor | None, size: tuple[int, int]) -> Tensor:
    """Weak-view features with the mix batch's pasted inside the CutMix box, at feature size ``size``.

    As the reference: both [B, C, h, w] maps are bilinearly upsampled to the box's resolution ``[B, H, W]``
    (``align_corners=True``), the box is pasted, and the result is resized to ``size``. With ``box=None`` the weak
    features are only resized. Memory: one image at a time at full resolution. Returns [B, C, *size].
    """
    if feat_w.shape != feat_mix.shape or feat_w.dim() != 4:
        raise ValueError(f"feat_w and feat_mix must be [B, C, h, w] of one shape, got {tuple(feat_w.shape)} and "
                         f"{tuple(feat_mix.shape)}")

    def resize(x: Tensor, to: tuple[int, ...]) -> Tensor:
        return x if tuple(x.shape[-2:]) == tuple(to) else F.interpolate(x, size=to, mode="bilinear",
                                                                        align_corners=True)

    if box is None:
        return resize(feat_w, size)
    if box.dim() != 3 or box.shape[0] != feat_w.shape[0] or box.dtype != torch.bool:
        raise ValueError(f"box must be a bool [B, H, W] tensor for {feat_w.shape[0]} images, got "
                         f"{box.dtype} {tuple(box.shape)}")
    out = []
    for fw, fm, b in zip(feat_w, feat_mix, box):
        full = torch.where(b, resize(fm[None], b.shape), resize(fw[None], b.shape))
        out.append(resize(full, size))
    return torch.cat(out)


def correlation_consistency(corr_w: Tensor, corr_s: Tensor, kind: str = "rank", k: int = 4, eps: float = 1e-10,
                            guard: str = "reference") -> Tensor:
    """Consistency loss between weak and strong agent-level correlations [B, HW, N] (the weak side is the target).

    ``rank``: :func:`~workbench.ops.ranking.rank_consistency_loss` of the top-``k`` Plackett-Luce distributions
    (mean over pixels and the k! orderings; ``guard`` and ``eps`` as in
    :func:`~workbench.ops.ranking.plackett_luce`). Agent-independent (Table 6), summed over agents and averaged over
    pixels: ``kl`` = sum c_w (log c_w - log(c_s + eps)) (Eq. 5), ``ce`` = -sum c_w log(c_s + eps),
    ``l2`` = sum (c_w - c_s)^2. Returns a 0-d tensor.
    """
    if corr_w.shape != corr_s.shape:
        raise ValueError(f"corr_w {tuple(corr_w.shape)} and corr_s {tuple(corr_s.shape)} must match")
    if kind == "rank":
        return rank_consistency_loss(*rank_distributions(corr_w, corr_s, k, guard, eps), eps=eps)
    if kind == "kl":
        per_pixel = (torch.xlogy(corr_w, corr_w) - corr_w * torch.log(corr_s + eps)).sum(-1)
    elif kind == "ce":
        per_pixel = -(corr_w * torch.log(corr_s + eps)).sum(-1)
    elif kind == "l2":
        per_pixel = (corr_w - corr_s).pow(2).sum(-1)
    else:
        raise ValueError(f"kind must be one of {CONSISTENCY_CHOICES}, got {kind!r}")
    return per_pixel.mean()


@dataclass
class AgentView:
    """One strong view's agent-level correlation: agents [B, N], correlations [B, HW, N], feature size, loss."""

    agents: Tensor
    corr_w: Tensor
    corr_s: Tensor
    feat_size: tuple[int, int]
    loss: Tensor
    features: Tensor | None = None
    """the weak features the agents were chosen on (CutMixed with the mix batch's in the box, resized)"""


@register_method
class RankMatch(UniMatch):
    """RankMatch: UniMatch + lambda * rank-aware correlation consistency on ASPP features."""

    name = "rankmatch"
    config_class = RankMatchConfig
    cfg: RankMatchConfig

    def mix_outputs(self, batch: SemiBatch) -> tuple[Targets, Tensor]:
        """Targets and ASPP features [B, C, h, w] of the mix batch, from one eval-mode pass without gradients
        (:meth:`teacher_eval`)."""
        out = self.teacher_eval(batch.x_w_mix)
        return Targets(*pseudo_label(out["logits"]), batch.ignore_mix), out["aspp"]

    def select_agents(self, feats: Tensor) -> Tensor:
        """int64 [B, N] flat agent positions on ``feats`` [B, C, h, w] (``cfg.agents``; N capped at h*w)."""
        c = self.cfg
        b, _, h, w = feats.shape
        if c.agents == "all":
            return torch.arange(h * w, device=feats.device).expand(b, -1)
        num = min(c.num_agents, h * w)
        if c.agents == "topn":
            return topn_agents(feats, num, normalize=c.agent_normalize, temperature=c.agent_temperature)
        return (orthogonal_agents if c.agents == "orthogonal" else random_agents)(feats, num)

    def agent_view(self, feat_w: Tensor, feat_mix: Tensor, box: Tensor, feat_s: Tensor) -> AgentView:
        """Agents and correlations of one strong view: weak features (detached) CutMixed in ``box`` [B,H,W] and
        resized to ``feat_s`` [B,C,h,w]; the consistency loss between the two views."""
        c = self.cfg
        size = (feat_s.shape[-2], feat_s.shape[-1])
        fw = cutmix_features(feat_w.detach(), feat_mix, box if c.cutmix else None, size)
        agents = self.select_agents(fw)
        corr_w = agent_correlation(fw, agents, c.agent_normalize, c.agent_temperature, check=False)
        corr_s = agent_correlation(feat_s, agents, c.agent_normalize, c.agent_temperature, check=False)
        loss = correlation_consistency(corr_w.float(), corr_s.float(), c.consistency, c.top_k, c.rank_eps,
                                       c.rank_guard)
        return AgentView(agents, corr_w, corr_s, size, loss, fw)

    def training_step(self, batch: SemiBatch, step: StepInfo) -> StepOutput:
        s = self.stages(batch, step)
        arts: dict[str, Tensor] = {}
        if step.capture:
            arts = self.capture_pass(batch, s.unimatch, features=s.feat_w.detach())
            if s.views:
                arts.update(self.agent_artifacts(s.views[0]))
        return StepOutput(weighted_sum(s.terms), self.pass_logs(batch, s.unimatch), arts)

    def stages(self, batch: SemiBatch, step: StepInfo) -> RankMatchStep:
        """One RankMatch step as the module docstring's numbers read; the step-through
        (:func:`workbench.viz.stepthrough.rankmatch.rankmatch_trace`) shows this very call."""
        mix, feat_mix = self.mix_outputs(batch)                                  # 1
        p = self.unimatch_pass(batch, step, mix)                                 # 2: UniMatch's terms
        feat_w = p.out["aspp"][batch.x_l.shape[0]:]
        views: list[AgentView] = []
        if self.cfg.weight_rank > 0:                                             # 3-4, per strong view
            feat_s1, feat_s2 = p.out_s["aspp"].chunk(2)
            views = [self.agent_view(feat_w, feat_mix, batch.box1, feat_s1),
                     self.agent_view(feat_w, feat_mix, batch.box2, feat_s2)]
            p.terms["loss_rank"] = (self.cfg.weight_rank, (views[0].loss + views[1].loss) / 2)   # 5
        return RankMatchStep(p, feat_w, feat_mix, views)

    @torch.no_grad()
    def agent_artifacts(self, view: AgentView) -> dict[str, Tensor]:
        """Tensors of the paper's Fig. 5 for one strong view: ``agents`` [B, N] flat positions and ``agent_yx``
        [B, N, 2] (row, column) at feature resolution; ``agent_maps`` [B, n, h, w], the weak view's correlation of
        every pixel with the first ``n = capture_agents`` agents; ``rank_w`` / ``rank_s`` [B, k!, h, w], the
        per-pixel Plackett-Luce distributions over orderings of the weak view's top-k agents (``rank_agents``
        [B, k, h, w], indices into the agent list, best first)."""
        h, w = view.feat_size
        b, n_agents = view.agents.shape
        k = min(self.cfg.top_k, n_agents)
        n = min(self.cfg.capture_agents, n_agents)
        dist_w, dist_s = rank_distributions(view.corr_w.float(), view.corr_s.float(), k, self.cfg.rank_guard,
                                            self.cfg.rank_eps)

        def spatial(x: Tensor) -> Tensor:  # [B, HW, D] -> [B, D, h, w]
            return x.transpose(1, 2).reshape(b, -1, h, w)

        return {"agents": view.agents, "agent_yx": torch.stack([view.agents // w, view.agents % w], dim=-1),
                "agent_maps": spatial(view.corr_w[..., :n]), "rank_w": spatial(dist_w), "rank_s": spatial(dist_s),
                "rank_agents": spatial(view.corr_w.topk(k, dim=-1).indices)}


@dataclass
class RankMatchStep:
    """What :meth:`RankMatch.stages` computed: UniMatch's pass (its ``terms`` include ``loss_rank``), the weak view's
    ASPP features ``feat_w``, the mix batch's ``feat_mix`` and the two strong views' :class:`AgentView` (empty when
    ``weight_rank`` is 0)."""

    unimatch: UniMatchPass
    feat_w: Tensor
    feat_mix: Tensor
    views: list[AgentView]

    @property
    def terms(self) -> LossTerms:
        """The step's loss terms ``{name: (weight, value)}``."""
        return self.unimatch.terms


__all__ = ["AgentView", "RankMatch", "RankMatchConfig", "RankMatchStep", "correlation_consistency", "cutmix_features"]
