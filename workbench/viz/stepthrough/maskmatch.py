"""MaskMatch's step, traced: the EMA teacher at every scale and its ensemble (Eq. 7), the CutMixed strong view at
every scale (Eq. 8) and LCR on the patch-masked weak view (Eqs. 5-6), with their tables and figures (notebook
``10_maskmatch``)."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from workbench.viz.figures import IGNORE, to_hwc
from workbench.viz.stepthrough.drawing import (
    below_threshold_patch,
    box_outline,
    class_legend,
    confident_label_image,
    figure_grid,
    heat_map,
    label_image,
    patch_grid,
    show_image,
)
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
    "MASKMATCH_TERMS", "MaskMatchTrace", "maskmatch_trace", "ms_loss_table", "patch_masks_figure",
    "multiscale_figure", "student_scales_figure", "lcr_figure",
]

#: what MaskMatch's loss terms mean, shown in :func:`~workbench.viz.stepthrough.session.losses_table`
MASKMATCH_TERMS = {"loss_x": "labeled CE",
                   "loss_u": "L_MSWS: strong view at every scale vs the ensembled pseudo-label (Eq. 8)",
                   "loss_lcr": "L_LCR: masked weak view vs the pseudo-label (Eq. 6)"}


@dataclass
class MaskMatchTrace(Trace):
    """MaskMatch's step: multi-scale teacher, CutMixed strong view at every scale, LCR on the masked weak view."""

    tau: float
    scales: tuple[float, ...]
    teacher_pred: Tensor
    """long [B, S, H, W]: the teacher's argmax at each scale (resized back)"""
    teacher_conf: Tensor
    """float [B, S, H, W]: its max probability at each scale"""
    pseudo: Tensor
    conf: Tensor
    confident: Tensor
    """the ensemble (Eq. 7) of the weak view: pseudo-label long, confidence float, conf >= tau (bool) [B, H, W]"""
    box: Tensor
    target_s: Tensor
    confident_s: Tensor
    valid_s: Tensor
    """targets of the CutMixed strong view (the mix batch's inside the box) [B, H, W]"""
    student_pred: Tensor
    """long [B, S, H, W]: the student's argmax of the strong view at each scale (resized back)"""
    ms_losses: list[float]
    """Eq. 8's CE of each scale alone (their mean is L_MS)"""
    patch: int
    ratio: float
    strategy: str
    region: str
    strategy_masks: dict[str, Tensor]
    """strategy -> bool [B, H, W] visible pixels, drawn for illustration with a generator seeded by ``seed``"""
    lcr_enabled: bool
    lcr_visible: Tensor
    lcr_region: Tensor
    lcr_pred: Tensor
    lcr_loss: float
    """the LCR component as the step ran it: its mask, loss region, student prediction of the masked view, L_LCR"""


def maskmatch_trace(session: StepSession, step: int = 0, seed: int = 0, tau: float | None = None,
                    lcr_patch: int | None = None, lcr_ratio: float | None = None, lcr_strategy: str | None = None,
                    lcr_region: str | None = None) -> MaskMatchTrace:
    """MaskMatch's step as its stages computed it (:meth:`~workbench.methods.maskmatch.MaskMatch.stages`, the call
    ``training_step`` makes), kept for display (the knobs, when not None, change ``method.cfg``)."""
    from workbench.methods.components import LocalConsistency
    from workbench.ops.masking import MASK_STRATEGIES, patch_mask

    knobs = dict(tau=tau, lcr_patch=lcr_patch, lcr_ratio=lcr_ratio, lcr_strategy=lcr_strategy, lcr_region=lcr_region)
    with traced_step(session, "maskmatch", step, seed, knobs) as (batch, c):
        m = session.method
        s = m.stages(batch, session.step_info(step))
        weak, targets_s, out = s.weak, s.targets_s, s.lcr
        # display only, after the step: each scale's L_MSWS alone (their mean is L_MSWS), the single-scale teacher
        # when ms is off, LCR drawn with weight 1 when it is off, and every masking strategy with its own generator
        per_scale = [float(m.msws_loss([t], targets_s)) for t in s.student_scales]
        teacher_scales, scales = (s.teacher_scales, tuple(c.scales)) if c.ms else ([m.predict_eval(batch.x_w)], (1.0,))
        if out is None:
            out = dataclasses.replace(LocalConsistency.from_config(c), weight=1.0)(
                m.model, batch.x_w, weak.pseudo, m.keep(weak), weak.ignore)
        t_conf, t_pred = torch.stack([t.float().softmax(1) for t in teacher_scales], 1).max(2)
        b, _, h, w = batch.x_w.shape
        masks = {k: to_cpu(patch_mask(b, h, w, c.lcr_patch, c.lcr_ratio, k,
                                      generator=torch.Generator().manual_seed(seed))[:, 0] > 0.5)
                 for k in MASK_STRATEGIES}
        return MaskMatchTrace(
            **trace_fields(session, batch, step, seed, knobs),
            images={"weak": batch_u8(session, batch.x_w), "strong": batch_u8(session, s.x_s),
                    "masked": batch_u8(session, out.x_masked)},
            terms=stage_terms(s.terms, MASKMATCH_TERMS), total=float(sum(w * v for w, v in s.terms.values())),
            tau=float(c.tau), scales=scales, teacher_pred=to_cpu(t_pred), teacher_conf=to_cpu(t_conf),
            pseudo=to_cpu(weak.pseudo), conf=to_cpu(weak.conf), confident=to_cpu(m.keep(weak)),
            box=to_cpu(batch.box1 if c.cutmix else torch.zeros_like(batch.box1)), target_s=to_cpu(targets_s.pseudo),
            confident_s=to_cpu(m.keep(targets_s)), valid_s=to_cpu(targets_s.ignore != IGNORE),
            student_pred=to_cpu(torch.stack([t.argmax(1) for t in s.student_scales], 1)), ms_losses=per_scale,
            patch=c.lcr_patch, ratio=c.lcr_ratio, strategy=c.lcr_strategy, region=c.lcr_region, strategy_masks=masks,
            lcr_enabled=s.lcr is not None, lcr_visible=to_cpu(out.visible[:, 0] > 0.5), lcr_region=to_cpu(out.region),
            lcr_pred=to_cpu(out.logits.argmax(1)), lcr_loss=float(out.loss))


def ms_loss_table(trace: MaskMatchTrace) -> Any:
    """Table "multi-scale loss": Eq. 8's CE of each scale alone, and their mean L_MS (= ``loss_u``)."""
    from workbench.runs import Table

    rows = [[f"{s:g}", v] for s, v in zip(trace.scales, trace.ms_losses)]
    rows.append(["mean (L_MS)", float(np.mean(trace.ms_losses))])
    return Table(["scale", "CE vs ensembled pseudo-label"], rows, "multi-scale loss per scale")


def patch_masks_figure(trace: MaskMatchTrace, i: int = 0) -> Any:
    """MaskMatch's patch masks: the weak view, then the same image under each strategy (random, block, grid; hidden
    patches dark, patch grid drawn) with the hidden fraction in the title."""
    i = trace.check_image(i)
    img = to_hwc(trace.images["weak"][i]).astype(np.float32)
    fig, axes = figure_grid(1, 1 + len(trace.strategy_masks), cell=2.4, extra_h=0.6)
    show_image(axes[0, 0], img.astype(np.uint8), f"weak view {trace.ids[i]}")
    for ax, (name, vis) in zip(axes[0, 1:], trace.strategy_masks.items()):
        v = vis[i].numpy()[..., None]
        show_image(ax, (img * np.where(v, 1.0, 0.2)).astype(np.uint8),
                   f"{name}: {1 - v.mean():.0%} hidden" + (" (used)" if name == trace.strategy else ""))
        patch_grid(ax, trace.patch, img.shape[:2], color="white", alpha=0.6)
    fig.suptitle(f"patch masks: {trace.patch} px patches, ratio {trace.ratio:g} (illustration, seed {trace.seed})",
                 fontsize=10)
    return fig


def multiscale_figure(trace: MaskMatchTrace, i: int, palette: Sequence[Sequence[int]],
                      class_names: Sequence[str]) -> Any:
    """The teacher at every scale and the ensemble (Eq. 7), one column each: predictions above, confidences (colour
    bars) below; first column the weak view and its ground truth (diagnostics only, when known), last column the
    confident ensembled pseudo-label at ``tau``."""
    i = trace.check_image(i)
    s = len(trace.scales)
    fig, axes = figure_grid(2, s + 3, cell=2.2, extra_w=0.8)
    v = trace.valid[i]
    show_image(axes[0, 0], to_hwc(trace.images["weak"][i]), "weak view")
    if trace.gt is not None:
        show_image(axes[1, 0], label_image(trace.gt[i], v, palette), "ground truth (not used)")
    else:
        axes[1, 0].set_visible(False)
    for k, sc in enumerate(trace.scales):
        show_image(axes[0, k + 1], label_image(trace.teacher_pred[i, k], v, palette), f"teacher @ scale {sc:g}")
        heat_map(fig, axes[1, k + 1], trace.teacher_conf[i, k].masked_fill(~v, float("nan")),
                 f"confidence @ {sc:g}")
    show_image(axes[0, s + 1], label_image(trace.pseudo[i], v, palette), "ensemble pseudo-label")
    heat_map(fig, axes[1, s + 1], trace.conf[i].masked_fill(~v, float("nan")), "ensemble confidence", label="max prob")
    share = float((trace.confident[i] & v).sum()) / max(1, int(v.sum()))
    show_image(axes[0, s + 2], confident_label_image(trace.pseudo[i], trace.confident[i], v, palette),
               f"confident (tau {trace.tau:g}): {share:.0%}")
    axes[1, s + 2].set_visible(False)
    class_legend(fig, class_names, palette, [below_threshold_patch()])
    fig.suptitle(f"MaskMatch teacher: multi-scale ensembling (Eq. 7), image {i}", fontsize=10)
    return fig


def student_scales_figure(trace: MaskMatchTrace, i: int, palette: Sequence[Sequence[int]],
                          class_names: Sequence[str]) -> Any:
    """The student on the CutMixed strong view at every scale (Eq. 8): the strong view (box dashed), its target
    (confident pixels), and each scale's prediction with that scale's loss."""
    i = trace.check_image(i)
    s = len(trace.scales)
    fig, axes = figure_grid(1, s + 2, cell=2.3, extra_h=0.9)
    vs = trace.valid_s[i]
    show_image(axes[0, 0], to_hwc(trace.images["strong"][i]), "strong view (CutMix)")
    box_outline(axes[0, 0], trace.box[i])
    show_image(axes[0, 1], confident_label_image(trace.target_s[i], trace.confident_s[i], vs, palette),
               "target (confident)")
    box_outline(axes[0, 1], trace.box[i])
    for k, sc in enumerate(trace.scales):
        show_image(axes[0, k + 2], label_image(trace.student_pred[i, k], vs, palette),
                   f"student @ {sc:g}\nL = {trace.ms_losses[k]:.4f}")
    class_legend(fig, class_names, palette, [below_threshold_patch()])
    fig.suptitle(f"MaskMatch student: strong view at every scale (batch L_MS = {np.mean(trace.ms_losses):.4f})",
                 fontsize=10)
    return fig


def lcr_figure(trace: MaskMatchTrace, i: int, palette: Sequence[Sequence[int]], class_names: Sequence[str]) -> Any:
    """LCR (Eqs. 5-6) as the step ran it: weak view, its patch mask, the masked input, the student's prediction of
    it, the target (the teacher's confident pseudo-label of the unmasked view) and the region the loss covers."""
    i = trace.check_image(i)
    v = trace.valid[i]
    fig, axes = figure_grid(1, 6, cell=2.2, extra_h=0.9)
    show_image(axes[0, 0], to_hwc(trace.images["weak"][i]), "weak view")
    vis = trace.lcr_visible[i]
    show_image(axes[0, 1], vis.float().numpy(),
               f"mask z ({trace.strategy}): {1 - float(vis.float().mean()):.0%} hidden", cmap="gray", vmin=0, vmax=1)
    show_image(axes[0, 2], to_hwc(trace.images["masked"][i]), "masked input x_w * z")
    show_image(axes[0, 3], label_image(trace.lcr_pred[i], v, palette), "student on masked input")
    show_image(axes[0, 4], confident_label_image(trace.pseudo[i], trace.confident[i], v, palette),
               f"target (tau {trace.tau:g})")
    region = trace.lcr_region[i]
    covered = float(region.float().mean())
    show_image(axes[0, 5], region.float().numpy(), f"loss region ({trace.region}):\n{covered:.0%} (white)",
               cmap="gray", vmin=0, vmax=1)
    status = f"L_LCR = {trace.lcr_loss:.4f}" + ("" if trace.lcr_enabled else " (not in the loss: lcr_weight = 0)")
    class_legend(fig, class_names, palette, [below_threshold_patch()])
    fig.suptitle(f"MaskMatch LCR, image {i}: {status}; mask white = visible", fontsize=10)
    return fig
