"""CorrMatch's step, traced: the dynamic threshold (Eq. 11), the weak view's correlation map and pixel propagation
(Eqs. 4-5), the binary shapes of sampled rows (Eq. 7) and region propagation (Eqs. 8-10), with their tables and
figures (notebook ``13_corrmatch``)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from workbench.viz.figures import IGNORE, to_hwc
from workbench.viz.stepthrough.drawing import (
    JOINED,
    RELABELLED,
    below_threshold_patch,
    box_outline,
    class_legend,
    confident_label_image,
    figure_grid,
    heat_map,
    label_image,
    mark_point,
    show_image,
)
from workbench.viz.stepthrough.geometry import cell_position, feature_cell, upsample_map
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
    "CORRMATCH_TERMS", "CorrMatchTrace", "corrmatch_trace", "threshold_table", "correlation_row", "point_shape",
    "repropagate", "correlation_rows_figure", "sampled_shapes_figure", "propagation_figure",
    "corr_predictions_figure",
]

#: what CorrMatch's loss terms mean, shown in :func:`~workbench.viz.stepthrough.session.losses_table`
CORRMATCH_TERMS = {
    "loss_x": "labeled CE", "loss_s": "hard: strong view vs propagated pseudo-label",
    "loss_fp": "feature perturbation vs weak pseudo-label", "loss_kl": "soft: KL(weak || strong) on confident pixels",
    "loss_x_corr": "labeled CE of the propagated prediction",
    "loss_corr_u": "propagated predictions vs pseudo-labels (strong + weak) / 2"}


@dataclass
class CorrMatchTrace(Trace):
    """CorrMatch's step: dynamic threshold, correlation map, pixel and region propagation, hard/soft/corr losses."""

    tau: float
    dynamic: bool
    threshold_before: float | None
    momentum: float | None
    class_max: Tensor
    """float [K]: each class's max confidence over the weak view (-1 = class not predicted), the EMA's input"""
    pseudo: Tensor
    conf: Tensor
    confident: Tensor
    pseudo_prop: Tensor
    confident_prop: Tensor
    """weak-view pseudo-label / confidence / confident mask, then after region propagation [B, H, W]"""
    box: Tensor
    valid_s: Tensor
    """bool [B, H, W]: non-padding pixels of the CutMixed strong view"""
    corr: Tensor | None
    """float [B, hw, hw] the weak view's correlation map (None without pixel propagation)"""
    feat_size: tuple[int, int]
    rows: Tensor | None
    """int64 [B, M] the rows region propagation sampled"""
    keep: Tensor
    """bool [B, H, W] pixels shapes may cover (not padding, not in the CutMix box)"""
    pred: dict[str, Tensor]
    """argmax maps [B, H, W]: ``weak``, ``strong``, ``perturbed`` (feature perturbation), and with pixel propagation
    ``propagated weak`` / ``propagated strong`` (z)"""


def corrmatch_trace(session: StepSession, step: int = 0, seed: int = 0, num_shapes: int | None = None,
                    sampling: str | None = None) -> CorrMatchTrace:
    """CorrMatch's step as its stages computed it (:meth:`~workbench.methods.corrmatch.CorrMatch.stages`, the
    call ``training_step`` makes), kept for display (``num_shapes``/``sampling``, when set, change the config).

    The threshold is the method's own for this step (the dynamic one after its update, or the fixed ``tau``);
    :func:`repropagate` shows region propagation at any other threshold."""
    from workbench.ops.threshold import class_max_confidence

    knobs = dict(num_shapes=num_shapes, sampling=sampling)
    with traced_step(session, "corrmatch", step, seed, knobs) as (batch, c):
        m = session.method
        before = float(m.dynamic.value) if m.dynamic is not None else None
        s = m.stages(batch, session.step_info(step))
        p, t, corr = s.passes, s.targets, s.corr
        # display only: each class's max confidence, the dynamic threshold's input (Eq. 11)
        class_max = class_max_confidence(p.logits_w, t.threshold_ignore)
        pred = {"weak": p.logits_w.argmax(1), "strong": p.logits_s.argmax(1), "perturbed": p.logits_fp.argmax(1)}
        if corr is not None:
            pred.update({"propagated weak": corr.z_w.argmax(1), "propagated strong": corr.z_s.argmax(1)})
        box = batch.box1 if c.cutmix else torch.zeros_like(batch.box1)
        keep = (batch.ignore != IGNORE) & ~box
        return CorrMatchTrace(
            **trace_fields(session, batch, step, seed, knobs),
            images={"weak": batch_u8(session, batch.x_w), "strong": batch_u8(session, p.x_s)},
            terms=stage_terms(s.terms, CORRMATCH_TERMS), total=float(sum(w * v for w, v in s.terms.values())),
            tau=float(t.tau), dynamic=m.dynamic is not None, threshold_before=before,
            momentum=m.dynamic.momentum if m.dynamic is not None else None, class_max=to_cpu(class_max),
            pseudo=to_cpu(t.weak.pseudo), conf=to_cpu(t.weak.conf), confident=to_cpu(t.confident),
            pseudo_prop=to_cpu(t.pseudo_prop), confident_prop=to_cpu(t.confident_prop), box=to_cpu(box),
            valid_s=to_cpu(t.ignore_s != IGNORE), corr=None if corr is None else to_cpu(corr.map.float()),
            feat_size=(1, 1) if corr is None else tuple(int(x) for x in corr.size),
            rows=None if corr is None or corr.rows is None else to_cpu(corr.rows), keep=to_cpu(keep),
            pred={k: to_cpu(v) for k, v in pred.items()})


def threshold_table(trace: CorrMatchTrace, class_names: Sequence[str]) -> Any:
    """Table "dynamic threshold": each class's max confidence on the weak view (``-`` = not predicted), their mean,
    and the threshold before and after this step's EMA update (Eq. 11); for a fixed threshold, its value."""
    from workbench.runs import Table

    if len(class_names) != trace.class_max.numel():
        raise ValueError(f"{len(class_names)} class names for {trace.class_max.numel()} classes")
    rows = [[f"max confidence: {n}", f"{float(v):.6f}" if v >= 0 else "-"]
            for n, v in zip(class_names, trace.class_max)]
    seen = trace.class_max[trace.class_max >= 0]
    rows.append(["mean over predicted classes", f"{float(seen.mean()):.6f}" if seen.numel() else "-"])
    if trace.dynamic:
        rows += [["threshold before", f"{trace.threshold_before:.6f}"], ["momentum", f"{trace.momentum:g}"],
                 ["threshold after (used)", f"{trace.tau:.6f}"]]
    else:
        rows.append(["fixed threshold (used)", f"{trace.tau:.6f}"])
    return Table(["quantity", "value"], rows, "dynamic threshold" if trace.dynamic else "fixed threshold")


def correlation_row(trace: CorrMatchTrace, i: int, y: int, x: int) -> tuple[Tensor, tuple[int, int]]:
    """Row of image ``i``'s correlation map for the feature cell under pixel ``(y, x)``: float ``[h, w]`` (sums to
    1 over the cells) and the cell. ValueError without pixel propagation (no correlation map)."""
    if trace.corr is None:
        raise ValueError("this CorrMatch has no correlation map (method.pixel_propagation is false)")
    i = trace.check_image(i)
    cell = feature_cell(y, x, trace.valid.shape[-2:], trace.feat_size)
    return trace.corr[i, cell[0] * trace.feat_size[1] + cell[1]].reshape(trace.feat_size), cell


def point_shape(trace: CorrMatchTrace, i: int, y: int, x: int) -> Tensor:
    """The binary shape (Eq. 7, :func:`~workbench.ops.correlation.shapes_from_rows`) of the row under pixel
    ``(y, x)`` of image ``i``, cleared of padding and the CutMix box as region propagation does: bool [H, W]."""
    from workbench.ops.correlation import shapes_from_rows

    _, (ci, cj) = correlation_row(trace, i, y, x)
    row = torch.tensor([[ci * trace.feat_size[1] + cj]])
    shape = shapes_from_rows(trace.corr[i: i + 1], row, trace.feat_size, tuple(trace.valid.shape[-2:]))[0, 0]
    return shape & trace.keep[i]


def _shapes(trace: CorrMatchTrace, images: Sequence[int] | None = None) -> Tensor:
    from workbench.ops.correlation import shapes_from_rows

    if trace.rows is None or trace.corr is None:
        raise ValueError("this CorrMatch runs no region propagation (method.region_propagation is false)")
    idx = list(range(trace.batch_size)) if images is None else list(images)
    shapes = shapes_from_rows(trace.corr[idx], trace.rows[idx], trace.feat_size, tuple(trace.valid.shape[-2:]))
    return shapes & trace.keep[idx][:, None]


def repropagate(trace: CorrMatchTrace, tau: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Region propagation of the step's shapes at threshold ``tau`` (None = the step's own):
    ``(confident, pseudo_out, confident_out)`` [B, H, W] with ``confident`` = conf >= tau on valid pixels,
    through :func:`~workbench.ops.correlation.region_propagation` (the op the method calls)."""
    from workbench.ops.correlation import region_propagation
    from workbench.ops.semi import confident_mask

    tau = trace.tau if tau is None else float(tau)
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must lie in [0, 1], got {tau}")
    q = confident_mask(trace.conf, tau, torch.where(trace.valid, 0, IGNORE))
    pseudo, q_out = region_propagation(trace.pseudo, q, _shapes(trace), tau, int(trace.class_max.numel()))
    return q, pseudo, q_out


def _tinted(base: np.ndarray, shape: Tensor) -> np.ndarray:
    """The image ``base`` (float [H, W, 3]) darkened, with the pixels of ``shape`` (bool [H, W]) tinted yellow."""
    tint = np.where(shape.numpy()[..., None], base * 0.4 + np.array([255, 200, 0]) * 0.6, base * 0.5)
    return tint.astype(np.uint8)


def correlation_rows_figure(trace: CorrMatchTrace, i: int, points: Sequence[Sequence[int]]) -> Any:
    """For each chosen pixel ``(y, x)``: its correlation-map row (over the image, colour bar) and the binary shape
    that row gives (Eq. 7: min-max normalised > 0.5, cleared of padding and the CutMix box)."""
    i = trace.check_image(i)
    if not points:
        raise ValueError("points is empty: give at least one (y, x) pixel")
    size = tuple(trace.valid.shape[-2:])
    fig, axes = figure_grid(2, len(points), cell=2.5, extra_h=0.5)
    img = trace.images["weak"][i]
    for k, (y, x) in enumerate(points):
        row, (ci, cj) = correlation_row(trace, i, int(y), int(x))
        heat_map(fig, axes[0, k], upsample_map(row, size), f"row of ({y}, {x}) = cell ({ci}, {cj})", vmin=None,
                 vmax=None, cmap="magma", label="correlation", under=img)
        mark_point(axes[0, k], y, x, "cyan")
        shape = point_shape(trace, i, int(y), int(x))
        show_image(axes[1, k], _tinted(to_hwc(img).astype(np.float32), shape), f"shape: {int(shape.sum())} px")
        box_outline(axes[1, k], trace.box[i])
        mark_point(axes[1, k], y, x, "cyan")
    fig.suptitle(f"CorrMatch: correlation rows and shapes,\nimage {i} (CutMix box dashed)", fontsize=10)
    return fig


def sampled_shapes_figure(trace: CorrMatchTrace, i: int, n: int = 8) -> Any:
    """The first ``n`` shapes region propagation sampled for image ``i`` (as used: padding and box cleared), each
    with its source pixel marked; title: the shape's size and its share of confident pixels (r1)."""
    i = trace.check_image(i)
    if trace.rows is None:
        raise ValueError("this CorrMatch runs no region propagation (method.region_propagation is false)")
    shapes = _shapes(trace, [i])[0]
    n = max(1, min(n, shapes.shape[0]))
    cols = min(n, 4)
    fig, axes = figure_grid(-(-n // cols), cols, cell=2.2, extra_h=0.5)
    base = to_hwc(trace.images["weak"][i]).astype(np.float32)
    size, (h, w) = tuple(trace.valid.shape[-2:]), trace.feat_size
    for k, ax in enumerate(axes.flat):
        if k >= n:
            ax.set_visible(False)
            continue
        sh = shapes[k]
        r = int(trace.rows[i, k])
        y, x = cell_position(r // w, r % w, size, (h, w))
        inside = int((sh & trace.confident[i]).sum())
        r1 = inside / max(1, int(sh.sum()))
        show_image(ax, _tinted(base, sh), f"shape {k}: {int(sh.sum())} px, r1 {r1:.2f}")
        mark_point(ax, y, x, "cyan")
    fig.suptitle(f"CorrMatch: first {n} of {trace.rows.shape[1]} sampled shapes, image {i}", fontsize=10)
    return fig


def propagation_figure(trace: CorrMatchTrace, i: int, palette: Sequence[Sequence[int]], class_names: Sequence[str],
                       tau: float | None = None) -> Any:
    """Region propagation before / after at ``tau`` (None = the step's threshold): the weak view, ground truth
    (when known), pseudo-label and confident pseudo-label before, after, and the pixels that changed."""
    i = trace.check_image(i)
    t = trace.tau if tau is None else float(tau)
    if trace.rows is None:
        q, pseudo_p, q_p = trace.confident, trace.pseudo, trace.confident_prop
    else:
        q, pseudo_p, q_p = repropagate(trace, t)
    v = trace.valid[i]
    cols = 6 if trace.gt is not None else 5
    fig, axes = figure_grid(1, cols, cell=2.3, extra_h=1.0)
    show_image(axes[0, 0], to_hwc(trace.images["weak"][i]), "weak view")
    k = 1
    if trace.gt is not None:
        show_image(axes[0, 1], label_image(trace.gt[i], v, palette), "ground truth (not used)")
        k = 2
    before, after = int((q[i] & v).sum()), int((q_p[i] & v).sum())
    show_image(axes[0, k], confident_label_image(trace.pseudo[i], q[i], v, palette), f"before: {before} confident px")
    show_image(axes[0, k + 1], confident_label_image(pseudo_p[i], q_p[i], v, palette), f"after: {after} confident px")
    relabel = (pseudo_p[i] != trace.pseudo[i]) & v
    joined = q_p[i] & ~q[i] & v
    change = np.full((*v.shape, 3), 255, dtype=np.uint8)
    change[v.numpy()] = (235, 235, 235)
    change[joined.numpy()] = JOINED
    change[relabel.numpy()] = RELABELLED
    show_image(axes[0, k + 2], change, f"changed: {int(joined.sum())} joined,\n{int(relabel.sum())} relabelled")
    box_outline(axes[0, k + 2], trace.box[i])
    heat_map(fig, axes[0, k + 3], trace.conf[i].masked_fill(~v, float("nan")), "confidence", label="max prob")
    from matplotlib.patches import Patch

    extra = [below_threshold_patch(), Patch(facecolor=np.asarray(JOINED) / 255, label="joined the mask"),
             Patch(facecolor=np.asarray(RELABELLED) / 255, label="relabelled")]
    class_legend(fig, class_names, palette, extra)
    which = "the step's" if tau is None or t == trace.tau else "chosen"
    fig.suptitle(f"CorrMatch region propagation at tau = {t:.4f} ({which}), image {i}", fontsize=10)
    return fig


def corr_predictions_figure(trace: CorrMatchTrace, i: int, palette: Sequence[Sequence[int]],
                            class_names: Sequence[str]) -> Any:
    """The step's predictions of image ``i``: weak, strong (CutMix box dashed), feature-perturbed, and the
    pixel-propagated ones (z, Eq. 5) of the weak and strong views."""
    i = trace.check_image(i)
    v = trace.valid[i]
    fig, axes = figure_grid(1, len(trace.pred) + 2, cell=2.2, extra_h=0.9)
    show_image(axes[0, 0], to_hwc(trace.images["weak"][i]), "weak view")
    show_image(axes[0, 1], to_hwc(trace.images["strong"][i]), "strong view")
    box_outline(axes[0, 1], trace.box[i])
    for ax, (name, p) in zip(axes[0, 2:], trace.pred.items()):
        show_image(ax, label_image(p[i], trace.valid_s[i] if "strong" in name else v, palette), name)
        if "strong" in name:
            box_outline(ax, trace.box[i])
    class_legend(fig, class_names, palette)
    fig.suptitle(f"CorrMatch predictions, image {i} (propagated = logits spread through the correlation map)",
                 fontsize=10)
    return fig
