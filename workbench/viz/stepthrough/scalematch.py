"""ScaleMatch's step, traced, with its tables and figures (notebook ``12_scalematch``).

The sampled image scale ``v`` and feature scale ``t``, the weak view at scale 1 and at scale ``v`` with both
predictions (with the default ``structure: reference`` the scale-1 one is decoded from the t-resized features, as the
authors' code does), the CIF gate as ``s_w``, the weight of the scale-1 prediction (and ``s_v = 1 - s_w``), the fused
pseudo-label against the plain one, the ISVC and FSVC predictions with their targets, and the loss.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from workbench.viz.figures import IGNORE, to_hwc
from workbench.viz.stepthrough.drawing import (
    FONT,
    below_threshold_patch,
    box_outline,
    class_legend,
    confident_label_image,
    figure_grid,
    heat_map,
    label_image,
    show_image,
)
from workbench.viz.stepthrough.session import (
    StepSession,
    Trace,
    batch_u8,
    check_session,
    stage_terms,
    to_cpu,
    trace_fields,
    traced_step,
)

__all__ = [
    "SCALEMATCH_TERMS", "ScaleMatchTrace", "scalematch_trace", "scale_table", "pseudo_label_table",
    "scales_figure", "gate_figure", "fusion_figure", "consistency_figure",
]

#: what ScaleMatch's loss terms mean (``loss_x``'s depends on the fusion), shown in
#: :func:`~workbench.viz.stepthrough.session.losses_table`
SCALEMATCH_TERMS = {"loss_s": "strong view vs the CutMixed pseudo-label",
                    "loss_isvc": "ISVC: scale-v prediction vs the pseudo-label",
                    "loss_fsvc": "FSVC: t-scaled perturbed features vs the pseudo-label"}


@dataclass
class ScaleMatchTrace(Trace):
    """ScaleMatch's step: scale-1 and scale-v predictions, the CIF gate and fusion, the pseudo-label (plain during
    the warm-up, fused after), and the strong, ISVC and FSVC losses. Per-branch tensors have an ``S`` axis (one
    branch per sampled scale; ``S = 1`` unless ``scale_sampling: all``)."""

    tau: float
    structure: str
    """``reference`` (the authors' code: scale 1 decoded from the t-resized features, the gate weights the
    lower-resolution prediction) or ``paper``"""
    scales: tuple[float, ...]
    """the image scales v of the step"""
    sampling: str
    feature_scale: float | None
    """the FSVC feature scale t (None without FSVC)"""
    image_size: tuple[int, int]
    scaled_sizes: list[tuple[int, int]]
    """each branch's image size after :func:`~workbench.methods.scalematch.scaled_image` (``min_scaled_size``)"""
    feature_sizes: dict[str, tuple[int, int]]
    """encoder feature sizes: ``low`` / ``high`` at scale 1, and ``low @ t`` / ``high @ t`` (FSVC)"""
    epoch: int
    warmup_epochs: int
    use_fused: bool
    """whether the pseudo-label comes from the fusion (after the warm-up) or from the plain prediction"""
    fusion: str | None
    """``cif``, ``average`` or None (``cif: false``)"""
    scaled_views: list[Tensor]
    """uint8 [B, 3, h_v, w_v] per branch: the weak view at scale v (unlabeled half)"""
    logits_w: Tensor
    """float [B, K, H, W] the scale-1 logits of the weak view (reference: ``pred_ori``, decoded from the t-resized
    features)"""
    logits_v: Tensor
    """float [B, S, K, H, W] the scale-v logits resized back"""
    fused: Tensor | None
    """float [B, K, H, W] the fused logits (None without fusion)"""
    gate_w: Tensor | None
    gate_v: Tensor | None
    """float [B, S, H, W] s_w (the weight of the scale-1 prediction) and s_v = 1 - s_w (None without fusion)"""
    pseudo_plain: Tensor
    conf_plain: Tensor
    confident_plain: Tensor
    pseudo_fused: Tensor | None
    conf_fused: Tensor | None
    confident_fused: Tensor | None
    """pseudo-label, confidence and conf >= tau of the plain and of the fused prediction [B, H, W]"""
    pseudo: Tensor
    confident: Tensor
    """the pseudo-label the step used and its confident mask"""
    box: Tensor
    target_s: Tensor
    confident_s: Tensor
    valid_s: Tensor
    pred_s: Tensor
    """the CutMixed strong view: targets, confident mask, valid pixels, prediction [B, H, W]"""
    isvc_losses: list[float]
    """per branch: CE of the scale-v prediction against the pseudo-label (Eq. 14; their mean is L_ISVC)"""
    pred_fsvc: Tensor | None
    """long [B, H, W] the prediction of the t-scaled, perturbed features (None without FSVC)"""

    @property
    def num_branches(self) -> int:
        """Scale branches (0 when the step predicts no scaled view: ISVC and CIF both off)."""
        return len(self.scaled_views)


def scalematch_trace(session: StepSession, step: int = 0, seed: int = 0, scale: float | None = None,
                     tau: float | None = None, cif_warmup_epochs: int | None = None) -> ScaleMatchTrace:
    """ScaleMatch's step as its stages computed it (:meth:`~workbench.methods.scalematch.ScaleMatch.stages`, the
    call ``training_step`` makes), kept for display.

    ``scale`` (when not None) makes ``v`` that scale (``method.scales = [scale]``, so the step's draw can only give
    it); ``tau`` and ``cif_warmup_epochs`` change ``method.cfg``."""
    from workbench.methods.scalematch import fsvc_logits, gated_fusion, scaled_image

    check_session(session, "scalematch")  # before the scale's check (traced_step checks the session again)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0):
        raise ValueError(f"scale must be a positive number (one of method.scales), got {scale!r}")
    knobs = dict(scales=None if scale is None else (float(scale),), tau=tau, cif_warmup_epochs=cif_warmup_epochs)
    with traced_step(session, "scalematch", step, seed, knobs) as (batch, c):
        m = session.method
        info = session.step_info(step)
        n = batch.x_l.shape[0]
        s = m.stages(batch, info)
        sp, pl, t = s.passes, s.pseudo, s.feature_scale
        logits, fused, gates, branches = sp.pred_ori, sp.pred_joint, sp.gates, sp.pred_size
        # display only: the weak view at each scale v, and s_v = 1 - s_w of every branch
        views = [scaled_image(batch.x_w, v, c.min_scaled_size) for v in s.scales] if branches else []
        gates_v = [gated_fusion(g, logits, lv)[1] for g, lv in zip(gates, branches)]
        logits_fp = fsvc_logits(sp, batch.x_w.shape[0])
        size = tuple(batch.x_w.shape[-2:])
        fs = sp.feature_sizes if t is not None else {k: sp.feature_sizes[k] for k in ("low", "high")}
        weak, fused_t, t_s = pl.weak, pl.fused, s.targets_s
        meanings = {**SCALEMATCH_TERMS, "loss_x": "labeled CE" + (" of the fused prediction (trains the CIF)"
                                                                  if fused is not None else "")}

        def stack(ts: list[Tensor]) -> Tensor | None:
            return to_cpu(torch.stack([g[n:, 0].float() for g in ts], 1)) if ts else None

        return ScaleMatchTrace(
            **trace_fields(session, batch, step, seed, knobs),
            images={"weak": batch_u8(session, batch.x_w), "strong": batch_u8(session, s.x_s),
                    "labeled": batch_u8(session, batch.x_l)},
            terms=stage_terms(s.terms, meanings), total=float(sum(w * v for w, v in s.terms.values())),
            tau=float(c.tau), scales=tuple(float(v) for v in s.scales), sampling=c.scale_sampling,
            feature_scale=t, image_size=(int(size[0]), int(size[1])),
            scaled_sizes=list(sp.scaled_sizes), structure=c.structure,
            feature_sizes={k: (int(a), int(b)) for k, (a, b) in fs.items()}, epoch=info.epoch,
            warmup_epochs=c.cif_warmup_epochs, use_fused=pl.use_fused,
            fusion=c.fusion if c.cif else None,
            scaled_views=[batch_u8(session, v) for v in views], logits_w=to_cpu(logits[n:].float()),
            logits_v=to_cpu(torch.stack([lv[n:].float() for lv in branches], 1)) if branches else
            torch.zeros(0), fused=None if fused is None else to_cpu(fused[n:].float()), gate_w=stack(gates),
            gate_v=stack(gates_v), pseudo_plain=to_cpu(pl.plain.pseudo), conf_plain=to_cpu(pl.plain.conf),
            confident_plain=to_cpu(pl.plain.confident(c.tau)),
            pseudo_fused=None if fused_t is None else to_cpu(fused_t.pseudo),
            conf_fused=None if fused_t is None else to_cpu(fused_t.conf),
            confident_fused=None if fused_t is None else to_cpu(fused_t.confident(c.tau)),
            pseudo=to_cpu(weak.pseudo), confident=to_cpu(weak.confident(c.tau)),
            box=to_cpu(batch.box1 if c.cutmix else torch.zeros_like(batch.box1)), target_s=to_cpu(t_s.pseudo),
            confident_s=to_cpu(t_s.confident(c.tau)), valid_s=to_cpu(t_s.ignore != IGNORE),
            pred_s=to_cpu(s.logits_s.argmax(1)), isvc_losses=[float(v) for v in s.isvc],
            pred_fsvc=None if logits_fp is None else to_cpu(logits_fp.argmax(1)))


def _source(trace: ScaleMatchTrace) -> str:
    if trace.fusion is None:
        return "plain (no fusion: cif off)"
    if trace.use_fused:
        return f"fused (epoch {trace.epoch} >= warm-up {trace.warmup_epochs})"
    return f"plain (CIF warm-up: epoch {trace.epoch} < {trace.warmup_epochs})"


def scale_table(trace: ScaleMatchTrace) -> Any:
    """Table "scales of the step": the sampled image scale(s) v with the scaled size and the effective scale (after
    ``min_scaled_size``), the feature scale t with the encoder feature sizes before and after, the mean gate s_w
    per branch and where the pseudo-label comes from."""
    from workbench.runs import Table

    hh, ww = trace.image_size
    rows: list[list[Any]] = [["structure", trace.structure], ["scale sampling", trace.sampling],
                             ["crop (H x W)", f"{hh} x {ww}"]]
    for k, v in enumerate(trace.scales):
        tag = f" [{k}]" if len(trace.scales) > 1 else ""
        rows.append([f"image scale v{tag}", v])
        if k < trace.num_branches:
            sh, sw = trace.scaled_sizes[k]
            rows += [[f"scaled weak view{tag}", f"{sh} x {sw}"], [f"effective scale{tag}", sh / hh]]
            if trace.gate_w is not None:
                valid = trace.valid
                g = trace.gate_w[:, k]
                rows.append([f"mean s_w{tag} (s_v = 1 - s_w)", float((g * valid).sum() / valid.sum().clamp(min=1))])
    if trace.feature_scale is not None:
        rows.append(["feature scale t (FSVC)", trace.feature_scale])
        for key in ("low", "high"):
            a, b = trace.feature_sizes[key], trace.feature_sizes[f"{key} @ t"]
            rows.append([f"{key} features", f"{a[0]} x {a[1]} -> {b[0]} x {b[1]}"])
    rows += [["fusion", trace.fusion or "none"], ["pseudo-label", _source(trace)]]
    return Table(["quantity", "value"], rows, "scales of the step")


def pseudo_label_table(trace: ScaleMatchTrace) -> Any:
    """Table "plain vs fused pseudo-labels": confident share (at tau), mean confidence and, when the unlabeled
    ground truth is known (diagnostics only), accuracy of all and of the confident pixels; plus the pixels whose
    label the fusion changes."""
    from workbench.runs import Table

    v = trace.valid
    nv = max(1, int(v.sum()))

    def row(name: str, pseudo: Tensor, conf: Tensor, confident: Tensor) -> list[Any]:
        r = [name, float((confident & v).sum()) / nv, float(conf[v].mean()) if bool(v.any()) else None]
        if trace.gt is not None:
            ok = v & (trace.gt != IGNORE)
            q = ok & confident
            r += [float((pseudo[ok] == trace.gt[ok]).float().mean()) if bool(ok.any()) else None,
                  float((pseudo[q] == trace.gt[q]).float().mean()) if bool(q.any()) else None]
        return r

    rows = [row("plain (scale 1)", trace.pseudo_plain, trace.conf_plain, trace.confident_plain)]
    if trace.pseudo_fused is not None:
        rows.append(row("fused (CIF)" if trace.fusion == "cif" else "fused (average)", trace.pseudo_fused,
                        trace.conf_fused, trace.confident_fused))
    cols = ["pseudo-label", f"confident (tau {trace.tau:g})", "mean confidence"]
    if trace.gt is not None:
        cols += ["accuracy (GT, not used)", "accuracy of confident"]
    if trace.pseudo_fused is not None:
        changed = float(((trace.pseudo_fused != trace.pseudo_plain) & v).sum()) / nv
        rows.append(["changed by the fusion", changed, None] + [None] * (len(cols) - 3))
    return Table(cols, rows, "plain vs fused pseudo-labels")


def _need_branches(trace: ScaleMatchTrace) -> None:
    if trace.num_branches == 0:
        raise ValueError("this ScaleMatch predicts no scaled view (method.isvc and method.cif are both false)")


def scales_figure(trace: ScaleMatchTrace, i: int, palette: Sequence[Sequence[int]], class_names: Sequence[str]
                  ) -> Any:
    """The weak view at scale 1 and at each scale v (its own size), with the prediction and confidence of each (the
    scale-v ones resized back to the crop), one row per branch."""
    i = trace.check_image(i)
    _need_branches(trace)
    v = trace.valid[i]
    s = trace.num_branches
    fig, axes = figure_grid(s, 6, cell=2.2, extra_h=0.7, extra_w=0.8)
    conf_v = trace.logits_v.softmax(2).max(2)[0]
    hh, ww = trace.image_size
    for k in range(s):
        sh, sw = trace.scaled_sizes[k]
        show_image(axes[k, 0], to_hwc(trace.images["weak"][i]), f"weak view, scale 1\n{hh} x {ww}")
        show_image(axes[k, 1], to_hwc(trace.scaled_views[k][i]),
                   f"weak view, scale v = {trace.scales[k]:g}\n{sh} x {sw}")
        show_image(axes[k, 2], label_image(trace.pseudo_plain[i], v, palette), "prediction @ 1")
        heat_map(fig, axes[k, 3], trace.conf_plain[i].masked_fill(~v, float("nan")), "confidence @ 1")
        show_image(axes[k, 4], label_image(trace.logits_v[i, k].argmax(0), v, palette),
                   f"prediction @ {trace.scales[k]:g}\n(resized back)")
        heat_map(fig, axes[k, 5], conf_v[i, k].masked_fill(~v, float("nan")), f"confidence @ {trace.scales[k]:g}",
                 label="max prob")
    class_legend(fig, class_names, palette)
    t = "" if trace.feature_scale is None else f", feature scale t = {trace.feature_scale:g}"
    fig.suptitle(f"ScaleMatch scales, image {i}: v = {', '.join(f'{x:g}' for x in trace.scales)}{t}", fontsize=10)
    return fig


def gate_figure(trace: ScaleMatchTrace, i: int) -> Any:
    """The fusion gate of image ``i`` per branch: the weak view, s_w (the scale-1 weight) and s_v = 1 - s_w with
    colour bars over [0, 1], and the histogram of s_w over the valid pixels."""
    i = trace.check_image(i)
    if trace.gate_w is None:
        raise ValueError("this ScaleMatch fuses nothing (method.cif is false): no gate")
    v = trace.valid[i]
    s = trace.num_branches
    fig, axes = figure_grid(s, 4, cell=2.5, extra_h=0.6, extra_w=1.2)
    for k in range(s):
        sw, sv = trace.gate_w[i, k], trace.gate_v[i, k]
        show_image(axes[k, 0], to_hwc(trace.images["weak"][i]), "weak view")
        heat_map(fig, axes[k, 1], sw.masked_fill(~v, float("nan")), "s_w (weight of scale 1)", cmap="viridis",
                 label="gate")
        heat_map(fig, axes[k, 2], sv.masked_fill(~v, float("nan")), f"s_v = 1 - s_w (scale {trace.scales[k]:g})",
                 cmap="viridis", label="gate")
        ax = axes[k, 3]
        ax.hist(sw[v].numpy(), bins=40, range=(0, 1), color="#1f77b4")
        ax.axvline(float(sw[v].mean()), color="black", ls="--", lw=1)
        ax.set_title(f"s_w over valid pixels\nmean {float(sw[v].mean()):.3f}", fontsize=FONT)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("s_w", fontsize=7)
    how = "CIF (learned gate)" if trace.fusion == "cif" else "average fusion (s_w = 1/2)"
    fig.suptitle(f"ScaleMatch {how}, image {i}: fused = s_w logits_1 + s_v logits_v", fontsize=10)
    return fig


def fusion_figure(trace: ScaleMatchTrace, i: int, palette: Sequence[Sequence[int]], class_names: Sequence[str]
                  ) -> Any:
    """Plain (scale 1) against fused pseudo-labels of image ``i``: each one's label map, confidence and confident
    pixels at tau; the weak view, its ground truth (not used) and the pixels the fusion relabels."""
    i = trace.check_image(i)
    if trace.pseudo_fused is None:
        raise ValueError("this ScaleMatch fuses nothing (method.cif is false): no fused pseudo-label")
    v = trace.valid[i]
    fig, axes = figure_grid(2, 5, cell=2.2, extra_h=1.0, extra_w=0.8)
    show_image(axes[0, 0], to_hwc(trace.images["weak"][i]), "weak view")
    if trace.gt is not None:
        show_image(axes[1, 0], label_image(trace.gt[i], v, palette), "ground truth (not used)")
    else:
        axes[1, 0].set_visible(False)
    rows = (("plain", trace.pseudo_plain, trace.conf_plain, trace.confident_plain),
            ("fused", trace.pseudo_fused, trace.conf_fused, trace.confident_fused))
    for r, (name, p, cf, q) in enumerate(rows):
        used = " (used)" if (name == "fused") == trace.use_fused else ""
        show_image(axes[r, 1], label_image(p[i], v, palette), f"{name} pseudo-label{used}")
        heat_map(fig, axes[r, 2], cf[i].masked_fill(~v, float("nan")), f"{name} confidence", label="max prob")
        share = float((q[i] & v).sum()) / max(1, int(v.sum()))
        show_image(axes[r, 3], confident_label_image(p[i], q[i], v, palette), f"{name} confident (tau {trace.tau:g})\n"
                   f"{share:.0%} of pixels")
    changed = (trace.pseudo_fused[i] != trace.pseudo_plain[i]) & v
    img = np.full((*v.shape, 3), 255, dtype=np.uint8)
    img[v.numpy()] = (235, 235, 235)
    img[changed.numpy()] = (255, 165, 0)
    show_image(axes[0, 4], img, f"relabelled by the fusion\n{int(changed.sum())} px (orange)")
    axes[1, 4].set_visible(False)
    class_legend(fig, class_names, palette, [below_threshold_patch()])
    fig.suptitle(f"ScaleMatch pseudo-labels, image {i}: the step uses the {_source(trace)} one", fontsize=10)
    return fig


def consistency_figure(trace: ScaleMatchTrace, i: int, palette: Sequence[Sequence[int]],
                       class_names: Sequence[str]) -> Any:
    """The unlabeled losses of image ``i``: the target (the pseudo-label used, confident pixels) with the ISVC
    prediction (scale v, resized back) and the FSVC prediction (features scaled by t, perturbed); the CutMixed
    strong view with its target and prediction."""
    i = trace.check_image(i)
    v, vs = trace.valid[i], trace.valid_s[i]
    loss = {t.name: t.value for t in trace.terms}
    fig, axes = figure_grid(2, 4, cell=2.3, extra_h=1.0)
    show_image(axes[0, 0], to_hwc(trace.images["weak"][i]), "weak view")
    show_image(axes[0, 1], confident_label_image(trace.pseudo[i], trace.confident[i], v, palette),
               f"target: {'fused' if trace.use_fused else 'plain'}\npseudo-label (tau {trace.tau:g})")
    if trace.num_branches and trace.isvc_losses:
        show_image(axes[0, 2], label_image(trace.logits_v[i, 0].argmax(0), v, palette),
                   f"ISVC: prediction @ {trace.scales[0]:g}\nL_ISVC = {loss['loss_isvc']:.4f}")
    else:
        axes[0, 2].set_visible(False)
    if trace.pred_fsvc is not None:
        show_image(axes[0, 3], label_image(trace.pred_fsvc[i], v, palette),
                   f"FSVC: features x {trace.feature_scale:g}\n+ dropout, L = {loss['loss_fsvc']:.4f}")
    else:
        axes[0, 3].set_visible(False)
    show_image(axes[1, 0], to_hwc(trace.images["strong"][i]), "strong view (CutMix)")
    box_outline(axes[1, 0], trace.box[i])
    show_image(axes[1, 1], confident_label_image(trace.target_s[i], trace.confident_s[i], vs, palette), "strong target")
    box_outline(axes[1, 1], trace.box[i])
    show_image(axes[1, 2], label_image(trace.pred_s[i], vs, palette), f"strong prediction\nL_s = {loss['loss_s']:.4f}")
    box_outline(axes[1, 2], trace.box[i])
    axes[1, 3].set_visible(False)
    class_legend(fig, class_names, palette, [below_threshold_patch()])
    fig.suptitle(f"ScaleMatch consistency losses, image {i} (losses of the batch, on the target's confident pixels; "
                 "CutMix box dashed)", fontsize=10)
    return fig
