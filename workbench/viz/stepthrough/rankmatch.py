"""RankMatch's step, traced: UniMatch's passes, agents chosen on the CutMixed weak features, the agent-level
correlations of the weak and strong views (Eq. 4), each pixel's top-k agents and the Plackett-Luce distributions
over their orderings (Eq. 6), with their tables and figures (notebook ``14_rankmatch``)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from workbench.viz.figures import plt, to_hwc
from workbench.viz.stepthrough.drawing import (
    FONT,
    axis_off,
    box_outline,
    figure_grid,
    heat_map,
    image_frame,
    mark_point,
    show_image,
)
from workbench.viz.stepthrough.geometry import cell_extent, cell_position, feature_cell, upsample_map
from workbench.viz.stepthrough.session import (
    StepSession,
    Trace,
    batch_u8,
    stage_terms,
    to_cpu,
    trace_fields,
    traced_step,
)

__all__ = [
    "RANKMATCH_TERMS", "RankMatchTrace", "rankmatch_trace", "agent_coherence", "rank_at", "rank_table",
    "agent_positions_figure", "agent_maps_figure", "topk_agents_figure", "rank_distribution_figure",
]

#: what RankMatch's loss terms mean (``loss_rank``'s depends on the consistency), shown in
#: :func:`~workbench.viz.stepthrough.session.losses_table`
RANKMATCH_TERMS = {"loss_x": "labeled CE", "loss_s": "strong views vs pseudo-label, (L_s1 + L_s2) / 2",
                   "loss_fp": "feature perturbation vs pseudo-label"}


@dataclass
class RankMatchTrace(Trace):
    """RankMatch's step: UniMatch's passes, agents on the CutMixed weak features, agent-level correlations of the
    weak and strong views, and the rank-aware consistency (for the first strong view; both enter the loss)."""

    feat_size: tuple[int, int]
    top_k: int
    consistency: str
    selection: str
    agents: Tensor
    """int64 [B, N] flat agent positions chosen by the method (view 1)"""
    random_agents: Tensor
    """int64 [B, N] random positions (Table 5's baseline), drawn for comparison with a generator seeded by ``seed``"""
    features: Tensor
    """float [B, C, h, w] the weak features the agents were chosen on (CutMixed with the mix batch's in box 1)"""
    corr_w: Tensor
    corr_s: Tensor
    """float [B, hw, N] agent-level correlations of the weak and strong view (Eq. 4)"""
    view_losses: list[float]
    box: Tensor
    pseudo: Tensor
    confident: Tensor
    rank_guard: str = "reference"
    rank_eps: float = 1e-10
    """the method's Plackett-Luce guard and epsilon (:func:`~workbench.ops.ranking.plackett_luce`)"""


def rankmatch_trace(session: StepSession, step: int = 0, seed: int = 0, num_agents: int | None = None,
                    top_k: int | None = None, agents: str | None = None, consistency: str | None = None
                    ) -> RankMatchTrace:
    """RankMatch's step as its stages computed it (:meth:`~workbench.methods.rankmatch.RankMatch.stages`, the call
    ``training_step`` makes), kept for display (the knobs, when not None, change ``method.cfg``)."""
    from workbench.ops.agents import random_agents
    from workbench.ops.semi import cutmix_images

    knobs = dict(num_agents=num_agents, top_k=top_k, agents=agents, consistency=consistency)
    with traced_step(session, "rankmatch", step, seed, knobs) as (batch, c):
        m = session.method
        s = m.stages(batch, session.step_info(step))
        p, views = s.unimatch, s.views
        if not views:  # weight_rank 0: the agent stage run for display only, after the step
            feat_s1, feat_s2 = p.out_s["aspp"].chunk(2)
            views = [m.agent_view(s.feat_w, s.feat_mix, batch.box1, feat_s1),
                     m.agent_view(s.feat_w, s.feat_mix, batch.box2, feat_s2)]
        v = views[0]
        rand = random_agents(v.features, v.agents.shape[1], generator=torch.Generator().manual_seed(seed))
        # the image under the agents: the weak view with the mix batch's weak view in box 1, like the features
        mixed_w = cutmix_images(batch.x_w, batch.x_w_mix, batch.box1) if c.cutmix else batch.x_w
        return RankMatchTrace(
            **trace_fields(session, batch, step, seed, knobs),
            images={"weak": batch_u8(session, batch.x_w), "weak mixed": batch_u8(session, mixed_w),
                    "strong": batch_u8(session, p.x_s1), "strong 2": batch_u8(session, p.x_s2)},
            terms=stage_terms(s.terms, {**RANKMATCH_TERMS, "loss_rank": f"{c.consistency} consistency of the agent "
                                        "correlations, (view 1 + view 2) / 2"}),
            total=float(sum(w * x for w, x in s.terms.values())),
            feat_size=tuple(int(x) for x in v.feat_size), top_k=c.top_k, consistency=c.consistency,
            selection=c.agents, agents=to_cpu(v.agents), random_agents=to_cpu(rand),
            features=to_cpu(v.features.float()),
            corr_w=to_cpu(v.corr_w.float()), corr_s=to_cpu(v.corr_s.float()),
            view_losses=[float(views[0].loss), float(views[1].loss)],
            box=to_cpu(batch.box1 if c.cutmix else torch.zeros_like(batch.box1)), pseudo=to_cpu(p.weak.pseudo),
            confident=to_cpu(p.weak.confident(c.tau)), rank_guard=c.rank_guard, rank_eps=c.rank_eps)


def agent_coherence(features: Tensor, agents: Tensor) -> Tensor:
    """Mean ``|cosine|`` between the features of distinct agents, per image: float [B] (lower = more orthogonal
    agents; what orthogonal selection minimises greedily). ``features`` [B, C, h, w], ``agents`` int64 [B, N]."""
    if features.dim() != 4 or agents.dim() != 2 or agents.shape[0] != features.shape[0]:
        raise ValueError(f"features [B, C, h, w] and agents [B, N] must match, got {tuple(features.shape)} and "
                         f"{tuple(agents.shape)}")
    n = agents.shape[1]
    if n < 2:
        raise ValueError("agent coherence needs at least two agents")
    unit = F.normalize(features.float().flatten(2), dim=1)  # [B, C, hw]
    picked = torch.gather(unit, 2, agents[:, None, :].expand(-1, unit.shape[1], -1))  # [B, C, N]
    cos = torch.bmm(picked.transpose(1, 2), picked).abs()
    return (cos.sum((1, 2)) - cos.diagonal(dim1=1, dim2=2).sum(1)) / (n * (n - 1))


def rank_at(trace: RankMatchTrace, i: int, y: int, x: int) -> dict[str, Any]:
    """The rank-aware consistency at the feature cell under pixel ``(y, x)`` of image ``i`` (view 1).

    Returns a dict: ``cell`` (i, j); ``agents`` the weak view's top-k agents (indices into the agent list, best
    first); ``weights_w`` / ``weights_s`` their correlations; ``orderings`` int64 [k!, k] (positions into the
    top-k, :func:`~workbench.ops.ranking.permutations` order); ``dist_w`` / ``dist_s`` the Plackett-Luce
    probabilities [k!] (:func:`~workbench.ops.ranking.rank_distributions`); ``kl`` = sum dist_w log(dist_w / dist_s)
    at this pixel."""
    from workbench.ops.ranking import permutations, rank_distributions

    i = trace.check_image(i)
    ci, cj = feature_cell(y, x, trace.valid.shape[-2:], trace.feat_size)
    p = ci * trace.feat_size[1] + cj
    cw, cs = trace.corr_w[i, p], trace.corr_s[i, p]
    dist_w, dist_s = rank_distributions(cw, cs, trace.top_k, trace.rank_guard, trace.rank_eps)
    top = cw.topk(trace.top_k).indices
    kl = float((torch.xlogy(dist_w, dist_w) - dist_w * torch.log(dist_s + trace.rank_eps)).sum())
    return {"cell": (ci, cj), "agents": top, "weights_w": cw[top], "weights_s": cs[top],
            "orderings": permutations(trace.top_k), "dist_w": dist_w, "dist_s": dist_s, "kl": kl}


def _ordering_label(order: Sequence[int], agents: Sequence[int]) -> str:
    return " > ".join(f"a{int(agents[int(o)])}" for o in order)


def rank_table(trace: RankMatchTrace, i: int, y: int, x: int) -> Any:
    """Table "rank distributions at (y, x)": every ordering of the weak view's top-k agents at that pixel with its
    Plackett-Luce probability under the weak and the strong view (k! rows, the weak view's order first)."""
    from workbench.runs import Table

    r = rank_at(trace, i, y, x)
    rows = [[_ordering_label(o, r["agents"].tolist()), float(pw), float(ps)]
            for o, pw, ps in zip(r["orderings"].tolist(), r["dist_w"], r["dist_s"])]
    return Table(["ordering (agents, best first)", "P weak", "P strong"], rows,
                 f"rank distributions at pixel ({y}, {x}) of image {i}")


def agent_positions_figure(trace: RankMatchTrace, i: int) -> Any:
    """Agent positions on the weak view: the method's selection (``agents``) and random positions, each titled
    with its mean |cosine| between agents (:func:`agent_coherence`; lower = more orthogonal)."""
    i = trace.check_image(i)
    size, (h, w) = tuple(trace.valid.shape[-2:]), trace.feat_size
    fig, axes = figure_grid(1, 2, cell=3.2, extra_h=0.4)
    for ax, (name, a) in zip(axes[0], ((trace.selection, trace.agents), ("random", trace.random_agents))):
        coh = float(agent_coherence(trace.features[i: i + 1], a[i: i + 1])[0]) if a.shape[1] > 1 else float("nan")
        show_image(ax, to_hwc(trace.images["weak mixed"][i]), f"{name}: {a.shape[1]} agents\nmean |cos| {coh:.3f}")
        y, x = cell_position(a[i] // w, a[i] % w, size, (h, w))
        ax.scatter(x.numpy(), y.numpy(), s=28, c=np.arange(a.shape[1]), cmap="turbo", edgecolors="white",
                   linewidths=0.8, vmin=0, vmax=max(1, a.shape[1] - 1))
        box_outline(ax, trace.box[i])
    every = trace.agents.shape[1] == h * w
    note = "\nN = every cell: both sets hold all cells, only the order differs" if every else ""
    fig.suptitle(f"RankMatch agents on the CutMixed weak view (colour = selection order,\nfeature grid {h} x {w}), "
                 f"image {i}{note}", fontsize=10)
    return fig


def agent_maps_figure(trace: RankMatchTrace, i: int, agents: Sequence[int]) -> Any:
    """Agent-pixel activation maps (Eq. 4, softmax over agents): for each agent index in ``agents``, its column of
    the weak and the strong correlation over the image, the agent marked."""
    i = trace.check_image(i)
    n_agents = trace.agents.shape[1]
    bad = [a for a in agents if not 0 <= int(a) < n_agents]
    if not agents or bad:
        raise ValueError(f"agents must be indices in [0, {n_agents - 1}], got {list(agents)}")
    size, (h, w) = tuple(trace.valid.shape[-2:]), trace.feat_size
    fig, axes = figure_grid(2, len(agents), cell=2.5, extra_h=0.5)
    for k, a in enumerate(int(a) for a in agents):
        pos = int(trace.agents[i, a])
        y, x = cell_position(pos // w, pos % w, size, (h, w))
        for r, (name, corr, img) in enumerate((("weak (CutMixed)", trace.corr_w, "weak mixed"),
                                               ("strong", trace.corr_s, "strong"))):
            m = corr[i, :, a].reshape(h, w)
            vmax = float(torch.maximum(trace.corr_w[i, :, a].max(), trace.corr_s[i, :, a].max()))
            heat_map(fig, axes[r, k], upsample_map(m, size), f"agent {a} on {name}", vmin=0.0, vmax=vmax,
                     cmap="magma", under=trace.images[img][i])
            mark_point(axes[r, k], y, x, "cyan")
    fig.suptitle(f"RankMatch agent-pixel activation (softmax over agents), image {i}", fontsize=10)
    return fig


def topk_agents_figure(trace: RankMatchTrace, i: int) -> Any:
    """Each pixel's top-k agents of the weak view (k maps: 1st, 2nd, ... choice; colour = agent, the same colour
    as its marker) and the top-k agents' share of the correlation mass."""
    i = trace.check_image(i)
    size, (h, w) = tuple(trace.valid.shape[-2:]), trace.feat_size
    n_agents = trace.agents.shape[1]
    vals, idx = trace.corr_w[i].topk(trace.top_k, dim=-1)  # [hw, k]
    fig, axes = figure_grid(1, trace.top_k + 1, cell=2.4, extra_h=0.5, extra_w=0.6)
    y, x = cell_position(trace.agents[i] // w, trace.agents[i] % w, size, (h, w))
    for r in range(trace.top_k):
        ax = axes[0, r]
        im = ax.imshow(idx[:, r].reshape(h, w).numpy(), cmap="turbo", vmin=0, vmax=max(1, n_agents - 1),
                       interpolation="nearest", extent=cell_extent(size, (h, w)))
        ax.imshow(to_hwc(trace.images["weak mixed"][i]), alpha=0.35, interpolation="nearest")
        image_frame(ax, size)
        ax.scatter(x.numpy(), y.numpy(), s=18, c=np.arange(n_agents), cmap="turbo", vmin=0,
                   vmax=max(1, n_agents - 1), edgecolors="white", linewidths=0.6)
        ax.set_title(f"choice {r + 1} (agent index)", fontsize=FONT)
        axis_off(ax)
    cb = fig.colorbar(im, ax=axes[0, trace.top_k - 1], fraction=0.046, pad=0.03)
    cb.ax.tick_params(labelsize=7)
    cb.set_label("agent index", fontsize=7)
    heat_map(fig, axes[0, trace.top_k], vals.sum(-1).reshape(h, w), f"top-{trace.top_k} share of correlation",
             cmap="viridis", extent=cell_extent(size, (h, w)))
    image_frame(axes[0, trace.top_k], size)
    fig.suptitle(f"RankMatch: top-{trace.top_k} agents per feature cell (CutMixed weak view), image {i}",
                 fontsize=10)
    return fig


def rank_distribution_figure(trace: RankMatchTrace, i: int, y: int, x: int, max_bars: int = 24) -> Any:
    """The k! Plackett-Luce distributions (Eq. 6) at pixel ``(y, x)``: weak vs strong bars over the orderings of
    the weak view's top-k agents (the ``max_bars`` most likely under the weak view), and the pixel marked."""
    i = trace.check_image(i)
    r = rank_at(trace, i, y, x)
    order = torch.argsort(r["dist_w"], descending=True, stable=True)[:max_bars]
    labels = [_ordering_label(r["orderings"][o].tolist(), r["agents"].tolist()) for o in order.tolist()]
    fig = plt.figure(figsize=(11, 3.8), layout="constrained")
    grid = fig.add_gridspec(1, 4)
    ax_img = fig.add_subplot(grid[0, 0])
    show_image(ax_img, to_hwc(trace.images["weak mixed"][i]),
               f"pixel ({y}, {x}) -> cell {r['cell']}\nand its top agents")
    size, (h, w) = tuple(trace.valid.shape[-2:]), trace.feat_size
    for a in r["agents"].tolist():
        pos = int(trace.agents[i, a])
        ay, ax_ = cell_position(pos // w, pos % w, size, (h, w))
        ax_img.scatter([ax_], [ay], s=40, marker="o", facecolors="none", edgecolors="yellow", linewidths=1.5)
        ax_img.annotate(f"a{a}", (ax_, ay), xytext=(3, -9), textcoords="offset points", color="yellow", fontsize=8,
                        fontweight="bold")
    mark_point(ax_img, y, x, "cyan")
    ax = fig.add_subplot(grid[0, 1:])
    pos = np.arange(len(order))
    ax.bar(pos - 0.2, r["dist_w"][order].numpy(), 0.4, label="weak (target)", color="#1f77b4")
    ax.bar(pos + 0.2, r["dist_s"][order].numpy(), 0.4, label="strong", color="#ff7f0e")
    ax.set_xticks(pos, labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("Plackett-Luce probability", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ws = ", ".join(f"a{int(a)}: {float(v):.3f}/{float(s):.3f}" for a, v, s in
                   zip(r["agents"], r["weights_w"], r["weights_s"]))
    ax.set_title(f"{trace.top_k}! = {len(r['dist_w'])} orderings; KL(weak||strong) here = {r['kl']:.4f}\n"
                 f"top-{trace.top_k} correlations weak/strong: {ws}", fontsize=8)
    fig.suptitle(f"RankMatch rank distributions at one pixel, image {i}", fontsize=10)
    return fig
