"""S4MIM's step, traced, with its tables and figures (notebook ``11_s4mim``).

Phase I (weak pseudo-label, CutMixed strong view, feature-perturbed prediction), the patch masks and the three masked
streams ``x_l * m``, ``x_s * m``, ``x_w * m``, the pixel decoder's reconstructions (per class, ``Head_c(fea_c)``, and
their sum), SeD's predictions of the masked streams against their targets, the prototype dictionary and the
per-class aggregation terms, and the loss with the Eq. 14 normaliser.

A piece the step does not compute because a switch is off (an S4MIM loss switched off, all of phase II when every
MIM loss is off) is computed for display after the step by the method's own stage (``pixel_space``,
``feature_space``, ``semantic_space``), without touching the step: its random draws are made on a forked random
state and the prototype dictionary is restored.

Feature cells are drawn over the image with the package's ``align_corners=True`` convention
(:func:`~workbench.viz.stepthrough.geometry.cell_extent`). S4MIM's grouping labels are nearest-resized by the method
(:func:`~workbench.ops.mim.resize_labels`), which reads pixel ``floor(i H / h)`` for cell ``i``: at most one cell of
offset from the drawn position.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from workbench.viz.figures import IGNORE, plt, to_hwc
from workbench.viz.stepthrough.drawing import (
    FONT,
    below_threshold_patch,
    box_outline,
    cell_map,
    cell_outline,
    class_legend,
    confident_label_image,
    cosine_range,
    figure_grid,
    heat_map,
    image_frame,
    label_image,
    patch_grid,
    show_image,
)
from workbench.viz.stepthrough.geometry import cell_extent
from workbench.viz.stepthrough.session import (
    StepSession,
    Trace,
    batch_u8,
    display_u8,
    rng_devices,
    stage_terms,
    to_cpu,
    trace_fields,
    traced_step,
)

__all__ = [
    "STREAMS", "NO_TERM", "S4MIM_TERMS", "S4MIMTrace", "s4mim_trace", "stream_rows", "main_class",
    "reconstruction_from_terms", "prototype_similarity", "eq14_table", "mim_streams_table", "aggregation_table",
    "s4mim_phase1_figure", "mim_streams_figure", "class_reconstruction_figure", "prototypes_figure",
]

STREAMS = ("labeled", "strong", "weak + fp")
"""S4MIM's masked streams in the method's order: ``x_l * m``, ``x_s * m``, ``x_w * m`` (feature-perturbed)."""
NO_TERM = (255, 255, 255)  # cells a class head does not write to (per-class reconstructions)

#: what S4MIM's loss terms mean, shown in :func:`~workbench.viz.stepthrough.session.losses_table`
S4MIM_TERMS = {"loss_x": "L_s: labeled CE", "loss_s": "L_u, strong view vs the weak pseudo-label (Eq. 2)",
               "loss_fp": "L_u, feature-perturbed weak view vs the weak pseudo-label (Eq. 2)",
               "loss_mimpi": "L_mimpi: class-wise reconstruction MSE, sum of 3 streams",
               "loss_mimfea": "L_mimfea: pull of masked positions to prototypes (Eqs. 10-12)",
               "loss_mimse": "L_mimse: SeD on the masked streams, sum of 3 streams"}


@contextlib.contextmanager
def _kept_dictionary(method: Any, keep: bool) -> Iterator[None]:
    """When ``keep``: the prototype dictionary (and its ``proto_seen``) is restored after the block."""
    saved = (method.prototypes.clone(), method.proto_seen.clone()) if keep else None
    try:
        yield
    finally:
        if saved is not None:
            method.prototypes.copy_(saved[0])
            method.proto_seen.copy_(saved[1])


@dataclass
class S4MIMTrace(Trace):
    """S4MIM's step: phase I (FixMatch with UniPerb) and phase II (three masked streams; class-wise MIM in pixel,
    feature and semantic space). Stream tensors are concatenated in :data:`STREAMS` order, ``sizes`` long."""

    tau: float
    switches: dict[str, Any]
    """``mimpi``, ``mimfea``, ``mimse``, ``classwise``, ``dictionary``, ``confidence``, ``mimse_loss``"""
    weights: dict[str, float]
    """``weight_u`` (l_u), ``weight_mp``, ``weight_mf``, ``weight_ms``"""
    normaliser: float
    """Eq. 14's denominator (switched-off losses left out)"""
    alpha: float
    temperature: float
    """the dictionary's EMA weight and the aggregation temperature T"""
    mean: tuple[float, ...]
    std: tuple[float, ...]
    """the data normalisation (reconstructions live in the normalised space)"""
    # phase I
    y_l: Tensor
    pred_l: Tensor
    """long [n, H, W]: labeled GT and the labeled prediction"""
    pseudo: Tensor
    conf: Tensor
    confident: Tensor
    """the weak view's pseudo-label, confidence and conf >= tau [B, H, W]"""
    box: Tensor
    target_s: Tensor
    confident_s: Tensor
    valid_s: Tensor
    """the CutMixed strong view's targets [B, H, W]"""
    pred_s: Tensor
    pred_fp: Tensor
    """long [B, H, W]: the strong view's and the feature-perturbed weak view's predictions"""
    # phase II
    sizes: list[int]
    patch: int
    ratio: float
    strategy: str
    stream_visible: Tensor
    """bool [N, H, W] the patch masks (1 = visible): the labeled images' own, then the unlabeled mask twice"""
    stream_valid: Tensor
    """bool [N, H, W] non-ignored pixels of each stream"""
    stream_targets: Tensor
    """long [N, H, W] semantic-space targets: argmax of the unmasked predictions (p_l, p_s, p_fp)"""
    stream_groups: Tensor
    """long [N, H, W] grouping pseudo-labels (labeled: its own; strong: CutMixed weak; weak: weak)"""
    masked_pred: Tensor
    """long [N, H, W] SeD's argmax of each masked stream"""
    stream_x: Tensor
    recon: Tensor
    """float [N, 3, H, W] the unmasked streams (reconstruction targets) and their class-wise reconstructions,
    normalised space"""
    recon_classes: Tensor
    """float [B, C, 3, h, w] every class's term Head_c(fea_c) of the weak stream at the feature size"""
    feat_size: tuple[int, int]
    mse: list[float]
    """per stream: MSE(r, x) (Eq. 8; their sum is L_mimpi before the weight)"""
    semantic: list[float]
    """per stream: CE (or squared error, ``mimse_loss: mse``) of SeD on the masked stream (Eq. 13)"""
    fea_groups: Tensor
    fea_masked: Tensor
    fea_weights: Tensor
    """at the feature size [N, h, w]: grouping labels, masked non-ignored positions (where the aggregation loss
    pulls), aggregation weights (confidence, or 1 with ``confidence: false``)"""
    pull: Tensor
    """float [N, h, w]: (1 - cos(fea_p, v_{class(p)})) / T at every position (the loss uses the masked ones)"""
    class_cos: Tensor
    """float [B, C, h, w]: cosine of the weak stream's PiD features to every prototype used"""
    prototypes_before: Tensor
    seen_before: Tensor
    prototypes: Tensor
    available: Tensor
    """[C, D] / bool [C]: the dictionary before the step, and the prototypes the loss used with their availability
    (the dictionary after its EMA update, or this batch's prototypes with ``dictionary: false``)"""
    batch_present: Tensor
    """bool [C]: classes with visible, valid labeled positions this step (their entries are updated)"""
    class_terms: Tensor
    """float [C]: each class's aggregation term (NaN where not averaged)"""
    agg_classes: Tensor
    """bool [C]: the classes averaged (masked positions and an available prototype)"""
    agg_loss: float
    """L_mimfea before the weight: the mean of ``class_terms`` over ``agg_classes``"""
    phase2_in_loss: bool
    """False when every MIM loss is off (phase II drawn for display only)"""

    def stream(self, name: str, i: int) -> int:
        """Row of image ``i`` of stream ``name`` in the concatenated stream tensors (labeled images: ``i`` is
        clamped to the labeled batch)."""
        if name not in STREAMS:
            raise ValueError(f"stream must be one of {STREAMS}, got {name!r}")
        n, m, _ = self.sizes
        k = STREAMS.index(name)
        return min(i, n - 1) if k == 0 else n + (k - 1) * m + i


def stream_rows(trace: S4MIMTrace, i: int) -> dict[str, int]:
    """``{stream: row}`` of image ``i`` (checked) in each of the three streams."""
    i = trace.check_image(i)
    return {s: trace.stream(s, i) for s in STREAMS}


def s4mim_trace(session: StepSession, step: int = 0, seed: int = 0, tau: float | None = None,
                mask_ratio: float | None = None, mask_patch: int | None = None, mask_strategy: str | None = None
                ) -> S4MIMTrace:
    """S4MIM's step as its stages computed it (:meth:`~workbench.methods.s4mim.S4MIM.stages`, the call
    ``training_step`` makes), kept for display (the knobs, when not None, change ``method.cfg``)."""
    from workbench.methods.s4mim import Phase2
    from workbench.ops.mim import class_prototypes

    knobs = dict(tau=tau, mask_ratio=mask_ratio, mask_patch=mask_patch, mask_strategy=mask_strategy)
    with traced_step(session, "s4mim", step, seed, knobs) as (batch, c):
        m = session.method
        n = batch.x_l.shape[0]
        before, seen_before = m.prototypes.clone(), m.proto_seen.clone()
        st = m.stages(batch, session.step_info(step))
        p, logs = st.passes, m.step_logs(batch, st)
        # phase II's pieces the step skipped (a loss switched off), computed for display only, after the step: all
        # of phase II on a forked random state when every MIM loss is off; the dictionary restored without mimfea
        fork = (contextlib.nullcontext() if st.phase2 is not None
                else torch.random.fork_rng(devices=rng_devices(session)))
        with fork:
            p2 = st.phase2
            if p2 is None:
                streams = m.streams(batch, p)
                xm = streams.x * streams.visible
                p2 = Phase2(streams, xm, *m.masked_forward(xm, n + streams.sizes[1]), None, None, None, None)
            s, sizes, fea = p2.streams, list(p2.streams.sizes), p2.fea
            recon, mse = (p2.recon, p2.mse) if p2.mse is not None else m.pixel_space(s, fea)
            with _kept_dictionary(m, keep=not c.mimfea):
                fs = p2.feature if p2.feature is not None else m.feature_space(s, fea)
            semantic = p2.semantic if p2.semantic is not None else m.semantic_space(s, p2.logits_m)
        # derived for display: the classes this batch updates, each position's pull to its class's prototype and
        # each class's term (Eqs. 10-12), cosines to every prototype, each class's reconstruction term (Eq. 7)
        groups, vis, valid, conf, weights = fs.groups, fs.visible, fs.valid, fs.conf, fs.weights
        fsize = tuple(fea.shape[-2:])
        present = class_prototypes(fea[:n].float(), groups[:n], conf[:n].float(), (vis & valid)[:n],
                                   m.num_classes)[2] > 0
        protos, available, classes = fs.prototypes, fs.available, fs.classes
        flat = fea.float().permute(0, 2, 3, 1)
        unit = F.normalize(protos.float(), dim=1, eps=1e-12)
        pull = (1 - F.cosine_similarity(flat, protos.float()[groups], dim=-1, eps=1e-8)) / c.temperature
        where = ~vis & valid
        class_terms = torch.full((m.num_classes,), float("nan"))
        for k in range(m.num_classes):
            sel = where & (groups == k)
            w = weights[sel].float()
            if bool(classes[k]) and float(w.sum()) > 0:
                class_terms[k] = float((pull[sel] * w).sum() / w.sum())
        wf = fea[sum(sizes[:2]):].float()
        class_cos = torch.einsum("bdhw,cd->bchw", F.normalize(wf, dim=1, eps=1e-12), unit)
        per_class = m.class_heads.per_class(fea[sum(sizes[:2]):], groups[sum(sizes[:2]):])
        d = session.cfg.data
        images = {"labeled": batch_u8(session, batch.x_l), "weak": batch_u8(session, batch.x_w),
                  "strong": batch_u8(session, p.x_s)}
        images.update({f"{k} masked": batch_u8(session, x) for k, x in zip(STREAMS, p2.xm.split(sizes))})
        return S4MIMTrace(
            **trace_fields(session, batch, step, seed, knobs), images=images,
            terms=stage_terms(st.terms, S4MIM_TERMS, logs), total=float(st.loss()),
            tau=float(c.tau), switches={k: getattr(c, k) for k in ("mimpi", "mimfea", "mimse", "classwise",
                                                                    "dictionary", "confidence", "mimse_loss")},
            weights={k: float(getattr(c, k)) for k in ("weight_u", "weight_mp", "weight_mf", "weight_ms")},
            normaliser=float(st.norm), alpha=float(c.alpha), temperature=float(c.temperature), mean=tuple(d.mean),
            std=tuple(d.std),
            y_l=to_cpu(batch.y_l), pred_l=to_cpu(p.logits_l.argmax(1)), pseudo=to_cpu(p.weak.pseudo),
            conf=to_cpu(p.weak.conf), confident=to_cpu(p.weak.confident(c.tau)),
            box=to_cpu(batch.box1 if c.cutmix else torch.zeros_like(batch.box1)), target_s=to_cpu(p.targets_s.pseudo),
            confident_s=to_cpu(p.targets_s.confident(c.tau)), valid_s=to_cpu(p.targets_s.ignore != IGNORE),
            pred_s=to_cpu(p.logits_s.argmax(1)), pred_fp=to_cpu(p.logits_fp.argmax(1)),
            sizes=sizes, patch=c.mask_patch, ratio=c.mask_ratio, strategy=c.mask_strategy,
            stream_visible=to_cpu(s.visible[:, 0] > 0.5), stream_valid=to_cpu(s.valid),
            stream_targets=to_cpu(s.targets), stream_groups=to_cpu(s.groups), stream_x=to_cpu(s.x.float()),
            masked_pred=to_cpu(p2.logits_m.argmax(1)),
            recon=to_cpu(recon.float()),
            recon_classes=to_cpu(per_class.float()), feat_size=(int(fsize[0]), int(fsize[1])),
            mse=[float(v) for v in mse], semantic=[float(v) for v in semantic], fea_groups=to_cpu(groups),
            fea_masked=to_cpu(where), fea_weights=to_cpu(weights.float()), pull=to_cpu(pull),
            class_cos=to_cpu(class_cos), prototypes_before=to_cpu(before.float()), seen_before=to_cpu(seen_before),
            prototypes=to_cpu(protos.float()),
            available=to_cpu(available), batch_present=to_cpu(present), class_terms=class_terms,
            agg_classes=to_cpu(classes), agg_loss=float(fs.loss), phase2_in_loss=bool(c.any_mim))


def main_class(trace: S4MIMTrace, i: int) -> int:
    """The class covering most feature cells of image ``i``'s weak-stream grouping labels among the classes with an
    available prototype, preferring a class other than 0 (background); 0 when none is available."""
    i = trace.check_image(i)
    counts = torch.bincount(trace.fea_groups[trace.stream("weak + fp", i)].flatten(),
                            minlength=trace.available.numel()).float()
    counts[~trace.available] = -1
    if counts.numel() > 1 and float(counts[1:].max()) > 0:
        return 1 + int(counts[1:].argmax())
    return 0


def prototype_similarity(trace: S4MIMTrace) -> Tensor:
    """Cosine similarity [C, C] between the prototypes the step used (NaN in the rows and columns of prototypes that
    are not available: a never-updated dictionary entry is the zero vector)."""
    p = F.normalize(trace.prototypes.float(), dim=1, eps=1e-12)
    sim = p @ p.T
    bad = ~trace.available
    sim[bad] = float("nan")
    sim[:, bad] = float("nan")
    return sim


def eq14_table(trace: S4MIMTrace) -> Any:
    """Table "Eq. 14 normaliser": each loss of the sum with its weighted value and its share of the denominator
    ``1 + 2 l_u + 3 l_mp + 3 l_mf + 3 l_ms`` (0 for a loss switched off), the sum, the normaliser and their ratio
    (the step's loss without add-on components)."""
    from workbench.runs import Table

    w, s = trace.weights, trace.switches
    v = {t.name: t for t in trace.terms}
    rows = [["L_s (labeled CE)", v["loss_x"].value, 1.0],
            ["L_u = l_u (L_strong + L_fp)", w["weight_u"] * (v["loss_s"].value + v["loss_fp"].value),
             2 * w["weight_u"]]]
    for key, label, wt in (("mimpi", "L_mimpi = l_mp sum of 3 MSE", "weight_mp"),
                           ("mimfea", "L_mimfea = l_mf mean over classes", "weight_mf"),
                           ("mimse", "L_mimse = l_ms sum of 3 CE", "weight_ms")):
        on = bool(s[key])
        rows.append([label + ("" if on else " (off)"), v[f"loss_{key}"].logged if on else None,
                     3 * w[wt] if on else 0.0])
    total = sum(r[1] for r in rows if r[1] is not None)
    rows += [["sum", total, trace.normaliser], ["sum / normaliser", total / trace.normaliser, None]]
    return Table(["loss", "weighted value", "normaliser share"], rows, "Eq. 14 normaliser")


def mim_streams_table(trace: S4MIMTrace) -> Any:
    """Table "masked streams": per stream its images, hidden fraction, reconstruction MSE (pixel space), SeD's
    loss on the masked stream (semantic space) and its masked positions pulled by the aggregation loss."""
    from workbench.runs import Table

    rows, start = [], 0
    sem = "CE" if trace.switches["mimse_loss"] == "ce" else "squared error"
    for name, size, mse, se in zip(STREAMS, trace.sizes, trace.mse, trace.semantic):
        sl = slice(start, start + size)
        hidden = 1 - float(trace.stream_visible[sl].float().mean())
        rows.append([name, size, hidden, mse, se, int(trace.fea_masked[sl].sum())])
        start += size
    rows.append(["sum", sum(trace.sizes), None, sum(trace.mse), sum(trace.semantic), int(trace.fea_masked.sum())])
    return Table(["stream", "images", "hidden", "MSE (pixel)", f"SeD {sem} (semantic)", "masked positions"], rows,
                 "masked streams")


def aggregation_table(trace: S4MIMTrace, class_names: Sequence[str]) -> Any:
    """Table "prototypes and aggregation": per class whether its dictionary entry was seen before the step, is
    updated by this batch and is available to the loss, its masked positions (3 streams), their weight sum, its
    aggregation term (Eqs. 10-12) and whether it enters the mean; last row the mean (L_mimfea before l_mf)."""
    from workbench.runs import Table

    if len(class_names) != trace.class_terms.numel():
        raise ValueError(f"{len(class_names)} class names for {trace.class_terms.numel()} classes")
    rows = []
    for k, name in enumerate(class_names):
        sel = trace.fea_masked & (trace.fea_groups == k)
        t = float(trace.class_terms[k])
        rows.append([name, bool(trace.seen_before[k]), bool(trace.batch_present[k]), bool(trace.available[k]),
                     int(sel.sum()), float(trace.fea_weights[sel].sum()), None if np.isnan(t) else t,
                     "yes" if bool(trace.agg_classes[k]) else "no"])
    rows.append(["mean (L_mimfea / l_mf)", None, None, None, int(trace.fea_masked.sum()), None, trace.agg_loss,
                 f"{int(trace.agg_classes.sum())} classes"])
    return Table(["class", "seen before", "updated now", "available", "masked positions", "weight sum",
                  "(1 - cos) / T", "in the mean"], rows, "prototypes and aggregation")


def s4mim_phase1_figure(trace: S4MIMTrace, i: int, palette: Sequence[Sequence[int]], class_names: Sequence[str]
                        ) -> Any:
    """Phase I (FixMatch with UniPerb): the labeled image with its GT and prediction (L_s); the weak view, its
    ground truth (not used), confidence and confident pseudo-label; the CutMixed strong view with its target and
    prediction, and the feature-perturbed prediction (both parts of L_u)."""
    i = trace.check_image(i)
    j = trace.stream("labeled", i)
    v, vs = trace.valid[i], trace.valid_s[i]
    lv = trace.y_l[j] != IGNORE
    loss = {t.name: t.value for t in trace.terms}
    fig, axes = figure_grid(2, 6, cell=2.2, extra_h=1.0, extra_w=0.6)
    show_image(axes[0, 0], to_hwc(trace.images["labeled"][j]), f"labeled image {j}")
    show_image(axes[0, 1], label_image(trace.y_l[j], torch.ones_like(lv), palette), "labeled GT")
    show_image(axes[0, 2], label_image(trace.pred_l[j], lv, palette), f"labeled prediction\nL_s = {loss['loss_x']:.4f}")
    show_image(axes[0, 3], to_hwc(trace.images["weak"][i]), f"weak view {trace.ids[i]}")
    if trace.gt is not None:
        show_image(axes[0, 4], label_image(trace.gt[i], v, palette), "ground truth (not used)")
    else:
        axes[0, 4].set_visible(False)
    heat_map(fig, axes[0, 5], trace.conf[i].masked_fill(~v, float("nan")), "weak confidence", label="max prob")
    share = float((trace.confident[i] & v).sum()) / max(1, int(v.sum()))
    show_image(axes[1, 0], label_image(trace.pseudo[i], v, palette), "weak pseudo-label")
    show_image(axes[1, 1], confident_label_image(trace.pseudo[i], trace.confident[i], v, palette),
               f"confident (tau {trace.tau:g}): {share:.0%}")
    show_image(axes[1, 2], to_hwc(trace.images["strong"][i]), "strong view (CutMix)")
    box_outline(axes[1, 2], trace.box[i])
    show_image(axes[1, 3], confident_label_image(trace.target_s[i], trace.confident_s[i], vs, palette), "strong target")
    box_outline(axes[1, 3], trace.box[i])
    show_image(axes[1, 4], label_image(trace.pred_s[i], vs, palette),
               f"strong prediction\nL_strong = {loss['loss_s']:.4f}")
    box_outline(axes[1, 4], trace.box[i])
    show_image(axes[1, 5], label_image(trace.pred_fp[i], v, palette),
               f"feature-perturbed (fp)\nL_fp = {loss['loss_fp']:.4f}")
    class_legend(fig, class_names, palette, [below_threshold_patch()])
    fig.suptitle(f"S4MIM phase I (FixMatch with UniPerb), image {i}: L_u = l_u (L_strong + L_fp), "
                 f"l_u = {trace.weights['weight_u']:g}; losses of the batch; CutMix box dashed", fontsize=10)
    return fig


def mim_streams_figure(trace: S4MIMTrace, i: int, palette: Sequence[Sequence[int]], class_names: Sequence[str]
                       ) -> Any:
    """Phase II's three masked streams of image ``i``, one row each (labeled, strong, weak + fp): the unmasked image,
    the patch mask (white = visible), the masked input, PiD's class-wise reconstruction (pixel space, with the stream's
    MSE), SeD's prediction of the masked stream (semantic space, with the stream's loss) and its target, the argmax of
    the unmasked stream's prediction."""
    rows = stream_rows(trace, i)
    size = tuple(trace.valid.shape[-2:])
    fig, axes = figure_grid(3, 6, cell=2.1, extra_h=1.1)
    sem = "CE" if trace.switches["mimse_loss"] == "ce" else "sq. err."
    for r, (name, k) in enumerate(rows.items()):
        img = trace.images["labeled" if r == 0 else "strong" if r == 1 else "weak"]
        src = k - sum(trace.sizes[:r]) if r > 0 else k
        vis, val = trace.stream_visible[k], trace.stream_valid[k]
        label = f"labeled image {k}" if r == 0 else f"{name}, image {i}"
        show_image(axes[r, 0], to_hwc(img[src]), f"{label}\n(target x)")
        show_image(axes[r, 1], vis.float().numpy(), f"mask m: {1 - float(vis.float().mean()):.0%} hidden", cmap="gray",
                   vmin=0, vmax=1)
        patch_grid(axes[r, 1], trace.patch, size)
        show_image(axes[r, 2], to_hwc(trace.images[f"{name} masked"][src]), "x * m" + (" (+ fp)" if r == 2 else ""))
        show_image(axes[r, 3], to_hwc(display_u8(trace.recon[k], trace.mean, trace.std)),
                   f"reconstruction r\nstream MSE = {trace.mse[r]:.4f}")
        show_image(axes[r, 4], label_image(trace.masked_pred[k], val, palette),
                   f"SeD on x * m\nstream {sem} = {trace.semantic[r]:.4f}")
        show_image(axes[r, 5], label_image(trace.stream_targets[k], val, palette),
                   "target: argmax " + ("p_l", "p_s", "p_fp")[r])
    class_legend(fig, class_names, palette)
    fig.suptitle(f"S4MIM phase II: masked streams ({trace.patch} px patches, ratio {trace.ratio:g}, "
                 f"{trace.strategy}); the strong and weak streams share the mask; losses over each stream's batch",
                 fontsize=10)
    return fig


def class_reconstruction_figure(trace: S4MIMTrace, i: int, palette: Sequence[Sequence[int]],
                                class_names: Sequence[str], max_classes: int = 8) -> Any:
    """The pixel decoder's class-wise reconstruction (Eq. 7) of the weak stream of image ``i``: the unmasked image
    (the target), the masked input, the grouping labels Y at the feature size, the sum ``r = sum_c Head_c(fea_c)``
    (upsampled, as the loss sees it), then each present class's term ``Head_c(fea_c)`` at the feature size (white
    = cells the head does not write to; the class's cells outlined). Up to ``max_classes`` classes, largest first."""
    i = trace.check_image(i)
    k = trace.stream("weak + fp", i)
    size, (h, w) = tuple(trace.valid.shape[-2:]), trace.feat_size
    groups = trace.fea_groups[k]
    counts = torch.bincount(groups.flatten(), minlength=len(class_names))
    present = [int(c) for c in torch.argsort(counts, descending=True, stable=True) if counts[c] > 0][:max_classes]
    cols = max(4, len(present))
    fig, axes = figure_grid(2, cols, cell=2.2, extra_h=1.0)
    show_image(axes[0, 0], to_hwc(trace.images["weak"][i]), "unmasked x_w (target)")
    show_image(axes[0, 1], to_hwc(trace.images["weak + fp masked"][i]), "masked input x_w * m")
    cell_map(axes[0, 2], label_image(groups, torch.ones_like(groups, dtype=torch.bool), palette), size,
             f"grouping Y at {h} x {w}\n(weak pseudo-label)")
    terms = trace.recon_classes[i]
    mse = float(F.mse_loss(trace.recon[k], trace.stream_x[k]))
    show_image(axes[0, 3], to_hwc(display_u8(trace.recon[k], trace.mean, trace.std)),
               f"r = sum_c Head_c(fea_c)\nMSE (this image) = {mse:.4f}")
    for ax in axes[0, 4:]:
        ax.set_visible(False)
    for c, ax in zip(present, axes[1]):
        t = terms[c]
        rgb = to_hwc(display_u8(t, trace.mean, trace.std))
        support = (t.abs().sum(0) > 0).numpy()
        rgb[~support] = NO_TERM
        cell_map(ax, rgb, size, f"Head_{c}(fea_{c}): {class_names[c]}\n{int(counts[c])} cells")
        cell_outline(ax, groups == c, size, "red")
    for ax in axes[1, len(present):]:
        ax.set_visible(False)
    err = float((reconstruction_from_terms(trace, i) - trace.recon[k]).abs().max())
    fig.suptitle(f"S4MIM class-wise reconstruction of the weak stream, image {i}: each class head sees only its "
                 f"class's features\n(the sum of the terms, upsampled, is r: max |difference| {err:.1e}; "
                 "white = cells a head does not write to; red = the class's cells)", fontsize=10)
    return fig


def reconstruction_from_terms(trace: S4MIMTrace, i: int) -> Tensor:
    """``sum_c Head_c(fea_c)`` of image ``i``'s weak stream from the per-class terms (``ClassHeads.per_class``),
    upsampled to the image as the method upsamples reconstructions: float [3, H, W]. Equals the weak stream's
    reconstruction ``r`` (``ClassHeads.forward``, a different computation) up to rounding."""
    i = trace.check_image(i)
    total = trace.recon_classes[i].sum(0)
    return F.interpolate(total[None], size=tuple(trace.valid.shape[-2:]), mode="bilinear", align_corners=True)[0]


def prototypes_figure(trace: S4MIMTrace, i: int, cls: int, palette: Sequence[Sequence[int]],
                      class_names: Sequence[str]) -> Any:
    """The prototype dictionary and the aggregation loss (Eqs. 9-12): the per-class terms (bars in the class
    colours; why a class is missing), the cosine similarity between the prototypes used, the pull
    ``(1 - cos) / T`` of the weak stream's masked positions of image ``i`` to their class's prototype, and the
    cosine of every position to the prototype of class ``cls`` (its cells outlined)."""
    i = trace.check_image(i)
    nc = len(class_names)
    if isinstance(cls, bool) or not isinstance(cls, int) or not 0 <= cls < nc:
        raise ValueError(f"cls must be a class index in [0, {nc - 1}], got {cls!r}")
    if trace.class_terms.numel() != nc:
        raise ValueError(f"{nc} class names for {trace.class_terms.numel()} classes")
    k = trace.stream("weak + fp", i)
    size = tuple(trace.valid.shape[-2:])
    fig = plt.figure(figsize=(14.5, 3.9), layout="constrained")
    grid = fig.add_gridspec(1, 4, width_ratios=[1.3, 1.15, 1, 1])
    ax = fig.add_subplot(grid[0, 0])
    pos = np.arange(nc)
    vals = np.nan_to_num(trace.class_terms.numpy(), nan=0.0)
    colors = [np.asarray(palette[c]) / 255 for c in range(nc)]
    ax.bar(pos, vals, color=colors, edgecolor="black")
    lift = 0.03 * max(float(vals.max()), 1e-9)
    for c in range(nc):
        if not bool(trace.agg_classes[c]):
            why = "no prototype" if not bool(trace.available[c]) else "no masked\npositions"
            ax.text(c, lift, why, rotation=90, ha="center", va="bottom", fontsize=7, color="dimgray")
    ticks = [f"{n}{'' if bool(trace.available[c]) else ' *'}" for c, n in enumerate(class_names)]
    ax.set_xticks(pos, ticks, rotation=45, ha="right", fontsize=7)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_ylabel("(1 - cos) / T, weighted mean", fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    state = "in the loss" if trace.switches["mimfea"] and trace.phase2_in_loss else "display only: mimfea off"
    ax.set_title(f"per-class terms; mean = {trace.agg_loss:.4f} ({state})\n* = prototype not available",
                 fontsize=FONT)
    ax = fig.add_subplot(grid[0, 1])
    sim = prototype_similarity(trace).numpy()
    lo, name = cosine_range(sim)
    cmap = plt.get_cmap(name).with_extremes(bad=(0.85, 0.85, 0.85))
    im = ax.imshow(np.ma.masked_invalid(sim), cmap=cmap, vmin=lo, vmax=1, interpolation="nearest")
    if nc <= 12:
        for a in range(nc):
            for b in range(nc):
                if not np.isnan(sim[a, b]):
                    dark = name == "viridis" and sim[a, b] < 0.55
                    ax.text(b, a, f"{sim[a, b]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if dark else "black")
    ax.set_xticks(pos, class_names, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(pos, class_names, fontsize=7)
    source = "dictionary after the EMA update" if trace.switches["dictionary"] else "this batch's prototypes"
    ax.set_title(f"cosine between prototypes\n({source}; grey = not available)", fontsize=FONT)
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    cb.ax.tick_params(labelsize=7)
    extent = cell_extent(size, trace.feat_size)
    ax = fig.add_subplot(grid[0, 2])
    pull = trace.pull[k].masked_fill(~trace.fea_masked[k], float("nan"))
    temperature = trace.temperature
    heat_map(fig, ax, pull, "pull to own prototype\n(masked positions, weak stream)", vmin=0.0, vmax=None,
             cmap="magma", label="(1 - cos) / T", under=trace.images["weak"][i], extent=extent)
    image_frame(ax, size)
    ax = fig.add_subplot(grid[0, 3])
    cos = trace.class_cos[i, cls]
    if not bool(trace.available[cls]):
        cos = torch.full_like(cos, float("nan"))
    lo, name = cosine_range(trace.class_cos.numpy())
    heat_map(fig, ax, cos, f"cos to prototype of {class_names[cls]}\n(its cells outlined)", vmin=lo, vmax=1.0,
             cmap=name, label="cosine", under=trace.images["weak"][i], extent=extent)
    image_frame(ax, size)
    cell_outline(ax, trace.fea_groups[k] == cls, size, "lime")
    seen = f"{int(trace.seen_before.sum())} -> {int(trace.available.sum())} of {nc} entries available"
    fig.suptitle(f"S4MIM prototypes and class-wise feature aggregation, image {i} ({seen}; EMA alpha "
                 f"{trace.alpha:g}, T = {temperature:g})", fontsize=10)
    return fig
