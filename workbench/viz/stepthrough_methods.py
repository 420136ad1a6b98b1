"""Step through one training step of S4MIM or ScaleMatch and show every intermediate.

The notebooks ``11_s4mim`` and ``12_scalematch`` are thin layers over this module, which works like
:mod:`workbench.viz.stepthrough` and reuses its machinery: :func:`~workbench.viz.stepthrough.open_session` loads the
method (a run's checkpoint or a fresh model) and the trainer's batches; :func:`s4mim_trace` and
:func:`scalematch_trace` run the method's own stages (its ``stages``, the very call its ``training_step`` makes)
from the same weights and global random state and keep every intermediate as CPU tensors;
:func:`~workbench.viz.stepthrough.explore` shows the figures below (static PNGs under papermill, ipywidgets controls
interactively).

- **S4MIM**: phase I (weak pseudo-label, CutMixed strong view, feature-perturbed prediction), the patch masks and the
  three masked streams ``x_l * m``, ``x_s * m``, ``x_w * m``, the pixel decoder's reconstructions (per class,
  ``Head_c(fea_c)``, and their sum), SeD's predictions of the masked streams against their targets, the prototype
  dictionary and the per-class aggregation terms, and the loss with the Eq. 14 normaliser.
- **ScaleMatch**: the sampled image scale ``v`` and feature scale ``t``, the weak view at scale 1 and at scale ``v``
  with both predictions (with the default ``structure: reference`` the scale-1 one is decoded from the t-resized
  features, as the authors' code does), the CIF gate as ``s_w``, the weight of the scale-1 prediction (and
  ``s_v = 1 - s_w``), the fused pseudo-label against the plain one, the ISVC and FSVC predictions with their targets,
  and the loss.

A piece the step does not compute because a switch is off (an S4MIM loss switched off, all of phase II when every
MIM loss is off) is computed for display after the step by the method's own stage (``pixel_space``,
``feature_space``, ``semantic_space``), without touching the step: its random draws are made on a forked random
state and the prototype dictionary is restored.

Feature cells are drawn over the image with the package's ``align_corners=True`` convention
(:func:`~workbench.viz.stepthrough.cell_extent`). S4MIM's grouping labels are nearest-resized by the method
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

from workbench.viz.figures import plt, to_hwc
from workbench.viz.stepthrough import (
    FONT,
    IGNORE,
    StepSession,
    Trace,
    _base,
    _below_threshold_patch,
    _box_outline,
    _confident_labels,
    _cpu,
    _figure,
    _heat,
    _labels,
    _legend,
    _need,
    _off,
    _show,
    _u8,
    cell_extent,
    stage_terms,
)

__all__ = [
    "S4MIMTrace", "ScaleMatchTrace", "s4mim_trace", "scalematch_trace", "STREAMS", "stream_rows", "main_class",
    "reconstruction_from_terms",
    "prototype_similarity", "eq14_table", "mim_streams_table", "aggregation_table", "scale_table",
    "pseudo_label_table", "s4mim_phase1_figure", "mim_streams_figure", "class_reconstruction_figure",
    "prototypes_figure", "scales_figure", "gate_figure", "fusion_figure", "consistency_figure",
]

STREAMS = ("labeled", "strong", "weak + fp")
"""S4MIM's masked streams in the method's order: ``x_l * m``, ``x_s * m``, ``x_w * m`` (feature-perturbed)."""
NO_TERM = (255, 255, 255)  # cells a class head does not write to (per-class reconstructions)
SCALEMATCH_TERMS = {"loss_s": "strong view vs the CutMixed pseudo-label",
                    "loss_isvc": "ISVC: scale-v prediction vs the pseudo-label",
                    "loss_fsvc": "FSVC: t-scaled perturbed features vs the pseudo-label"}
S4MIM_TERMS = {"loss_x": "L_s: labeled CE", "loss_s": "L_u, strong view vs the weak pseudo-label (Eq. 2)",
               "loss_fp": "L_u, feature-perturbed weak view vs the weak pseudo-label (Eq. 2)",
               "loss_mimpi": "L_mimpi: class-wise reconstruction MSE, sum of 3 streams",
               "loss_mimfea": "L_mimfea: pull of masked positions to prototypes (Eqs. 10-12)",
               "loss_mimse": "L_mimse: SeD on the masked streams, sum of 3 streams"}


def _rng_devices(session: StepSession) -> list[int]:
    return [session.device.index or 0] if session.device.type == "cuda" else []


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


def _display_u8(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Normalised images [..., 3, H, W] -> uint8 (the inverse normalisation, clipped to [0, 255])."""
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return ((x.float() * s + m).clamp(0, 1) * 255).round().to(torch.uint8)


# --------------------------------------------------------------------------------------------------- S4MIM


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

    _need(session, "s4mim")
    knobs = dict(tau=tau, mask_ratio=mask_ratio, mask_patch=mask_patch, mask_strategy=mask_strategy)
    batch = session.batch(step)
    m = session.method
    with session.configured(**knobs) as c, session.replay(seed):
        n = batch.x_l.shape[0]
        before, seen_before = m.prototypes.clone(), m.proto_seen.clone()
        st = m.stages(batch, session.step_info(step))
        p, logs = st.passes, m.step_logs(batch, st)
        # phase II's pieces the step skipped (a loss switched off), computed for display only, after the step: all
        # of phase II on a forked random state when every MIM loss is off; the dictionary restored without mimfea
        fork = (contextlib.nullcontext() if st.phase2 is not None
                else torch.random.fork_rng(devices=_rng_devices(session)))
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
        images = {"labeled": _u8(session, batch.x_l), "weak": _u8(session, batch.x_w), "strong": _u8(session, p.x_s)}
        images.update({f"{k} masked": _u8(session, x) for k, x in zip(STREAMS, p2.xm.split(sizes))})
        return S4MIMTrace(
            **_base(session, batch, step, seed, knobs), images=images,
            terms=stage_terms(st.terms, S4MIM_TERMS, logs), total=float(st.loss()),
            tau=float(c.tau), switches={k: getattr(c, k) for k in ("mimpi", "mimfea", "mimse", "classwise",
                                                                    "dictionary", "confidence", "mimse_loss")},
            weights={k: float(getattr(c, k)) for k in ("weight_u", "weight_mp", "weight_mf", "weight_ms")},
            normaliser=float(st.norm), alpha=float(c.alpha), temperature=float(c.temperature), mean=tuple(d.mean),
            std=tuple(d.std),
            y_l=_cpu(batch.y_l), pred_l=_cpu(p.logits_l.argmax(1)), pseudo=_cpu(p.weak.pseudo),
            conf=_cpu(p.weak.conf), confident=_cpu(p.weak.confident(c.tau)),
            box=_cpu(batch.box1 if c.cutmix else torch.zeros_like(batch.box1)), target_s=_cpu(p.targets_s.pseudo),
            confident_s=_cpu(p.targets_s.confident(c.tau)), valid_s=_cpu(p.targets_s.ignore != IGNORE),
            pred_s=_cpu(p.logits_s.argmax(1)), pred_fp=_cpu(p.logits_fp.argmax(1)),
            sizes=sizes, patch=c.mask_patch, ratio=c.mask_ratio, strategy=c.mask_strategy,
            stream_visible=_cpu(s.visible[:, 0] > 0.5), stream_valid=_cpu(s.valid), stream_targets=_cpu(s.targets),
            stream_groups=_cpu(s.groups), stream_x=_cpu(s.x.float()), masked_pred=_cpu(p2.logits_m.argmax(1)),
            recon=_cpu(recon.float()),
            recon_classes=_cpu(per_class.float()), feat_size=(int(fsize[0]), int(fsize[1])),
            mse=[float(v) for v in mse], semantic=[float(v) for v in semantic], fea_groups=_cpu(groups),
            fea_masked=_cpu(where), fea_weights=_cpu(weights.float()), pull=_cpu(pull), class_cos=_cpu(class_cos),
            prototypes_before=_cpu(before.float()), seen_before=_cpu(seen_before), prototypes=_cpu(protos.float()),
            available=_cpu(available), batch_present=_cpu(present), class_terms=class_terms,
            agg_classes=_cpu(classes), agg_loss=float(fs.loss), phase2_in_loss=bool(c.any_mim))


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


def _cells(ax: Any, rgb: np.ndarray, size: Sequence[int], title: str) -> None:
    """An ``h x w`` RGB map of feature cells drawn over an ``H x W`` image frame (align_corners positions)."""
    ax.imshow(rgb, interpolation="nearest", extent=cell_extent(size, rgb.shape[:2]))
    ax.set_xlim(-0.5, size[1] - 0.5)
    ax.set_ylim(size[0] - 0.5, -0.5)
    ax.set_title(title, fontsize=FONT)
    _off(ax)


def _cell_outline(ax: Any, mask: Tensor, size: Sequence[int], color: Any) -> None:
    """The border of the feature cells of ``mask`` (bool [h, w]) as :func:`_cells` draws them (every cell edge
    between a cell of the mask and one outside it)."""
    from matplotlib.collections import LineCollection

    if not bool(mask.any()):
        return
    h, w = mask.shape
    left, right, bottom, top = cell_extent(size, (h, w))
    sx, sy = (right - left) / w, (bottom - top) / h
    m = F.pad(mask.bool(), (1, 1, 1, 1)).numpy()
    segs = []
    for i, j in torch.nonzero(mask).tolist():
        x0, y0 = left + j * sx, top + i * sy
        x1, y1 = x0 + sx, y0 + sy
        if not m[i, j + 1]:
            segs.append(((x0, y0), (x1, y0)))
        if not m[i + 2, j + 1]:
            segs.append(((x0, y1), (x1, y1)))
        if not m[i + 1, j]:
            segs.append(((x0, y0), (x0, y1)))
        if not m[i + 1, j + 2]:
            segs.append(((x1, y0), (x1, y1)))
    ax.add_collection(LineCollection(segs, colors=[color], linewidths=1.5), autolim=False)


def _patch_grid(ax: Any, patch: int, size: Sequence[int]) -> None:
    h, w = size
    for t in range(patch, max(h, w), patch):
        if t < w:
            ax.axvline(t - 0.5, color="grey", lw=0.4, alpha=0.7)
        if t < h:
            ax.axhline(t - 0.5, color="grey", lw=0.4, alpha=0.7)


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
    fig, axes = _figure(2, 6, cell=2.2, extra_h=1.0, extra_w=0.6)
    _show(axes[0, 0], to_hwc(trace.images["labeled"][j]), f"labeled image {j}")
    _show(axes[0, 1], _labels(trace.y_l[j], torch.ones_like(lv), palette), "labeled GT")
    _show(axes[0, 2], _labels(trace.pred_l[j], lv, palette), f"labeled prediction\nL_s = {loss['loss_x']:.4f}")
    _show(axes[0, 3], to_hwc(trace.images["weak"][i]), f"weak view {trace.ids[i]}")
    if trace.gt is not None:
        _show(axes[0, 4], _labels(trace.gt[i], v, palette), "ground truth (not used)")
    else:
        axes[0, 4].set_visible(False)
    _heat(fig, axes[0, 5], trace.conf[i].masked_fill(~v, float("nan")), "weak confidence", label="max prob")
    share = float((trace.confident[i] & v).sum()) / max(1, int(v.sum()))
    _show(axes[1, 0], _labels(trace.pseudo[i], v, palette), "weak pseudo-label")
    _show(axes[1, 1], _confident_labels(trace.pseudo[i], trace.confident[i], v, palette),
          f"confident (tau {trace.tau:g}): {share:.0%}")
    _show(axes[1, 2], to_hwc(trace.images["strong"][i]), "strong view (CutMix)")
    _box_outline(axes[1, 2], trace.box[i])
    _show(axes[1, 3], _confident_labels(trace.target_s[i], trace.confident_s[i], vs, palette), "strong target")
    _box_outline(axes[1, 3], trace.box[i])
    _show(axes[1, 4], _labels(trace.pred_s[i], vs, palette), f"strong prediction\nL_strong = {loss['loss_s']:.4f}")
    _box_outline(axes[1, 4], trace.box[i])
    _show(axes[1, 5], _labels(trace.pred_fp[i], v, palette),
          f"feature-perturbed (fp)\nL_fp = {loss['loss_fp']:.4f}")
    _legend(fig, class_names, palette, [_below_threshold_patch()])
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
    fig, axes = _figure(3, 6, cell=2.1, extra_h=1.1)
    sem = "CE" if trace.switches["mimse_loss"] == "ce" else "sq. err."
    for r, (name, k) in enumerate(rows.items()):
        img = trace.images["labeled" if r == 0 else "strong" if r == 1 else "weak"]
        src = k - sum(trace.sizes[:r]) if r > 0 else k
        vis, val = trace.stream_visible[k], trace.stream_valid[k]
        label = f"labeled image {k}" if r == 0 else f"{name}, image {i}"
        _show(axes[r, 0], to_hwc(img[src]), f"{label}\n(target x)")
        _show(axes[r, 1], vis.float().numpy(), f"mask m: {1 - float(vis.float().mean()):.0%} hidden", cmap="gray",
              vmin=0, vmax=1)
        _patch_grid(axes[r, 1], trace.patch, size)
        _show(axes[r, 2], to_hwc(trace.images[f"{name} masked"][src]), "x * m" + (" (+ fp)" if r == 2 else ""))
        _show(axes[r, 3], to_hwc(_display_u8(trace.recon[k], trace.mean, trace.std)),
              f"reconstruction r\nstream MSE = {trace.mse[r]:.4f}")
        _show(axes[r, 4], _labels(trace.masked_pred[k], val, palette),
              f"SeD on x * m\nstream {sem} = {trace.semantic[r]:.4f}")
        _show(axes[r, 5], _labels(trace.stream_targets[k], val, palette),
              "target: argmax " + ("p_l", "p_s", "p_fp")[r])
    _legend(fig, class_names, palette)
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
    fig, axes = _figure(2, cols, cell=2.2, extra_h=1.0)
    _show(axes[0, 0], to_hwc(trace.images["weak"][i]), "unmasked x_w (target)")
    _show(axes[0, 1], to_hwc(trace.images["weak + fp masked"][i]), "masked input x_w * m")
    _cells(axes[0, 2], _labels(groups, torch.ones_like(groups, dtype=torch.bool), palette), size,
           f"grouping Y at {h} x {w}\n(weak pseudo-label)")
    terms = trace.recon_classes[i]
    _show(axes[0, 3], to_hwc(_display_u8(trace.recon[k], trace.mean, trace.std)),
          f"r = sum_c Head_c(fea_c)\nMSE (this image) = {float(F.mse_loss(trace.recon[k], trace.stream_x[k])):.4f}")
    for ax in axes[0, 4:]:
        ax.set_visible(False)
    for c, ax in zip(present, axes[1]):
        t = terms[c]
        rgb = to_hwc(_display_u8(t, trace.mean, trace.std))
        support = (t.abs().sum(0) > 0).numpy()
        rgb[~support] = NO_TERM
        _cells(ax, rgb, size, f"Head_{c}(fea_{c}): {class_names[c]}\n{int(counts[c])} cells")
        _cell_outline(ax, groups == c, size, "red")
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


def _cos_range(values: np.ndarray) -> tuple[float, str]:
    """Colour range of cosines: [0, 1] in viridis when none is negative (ReLU features), else [-1, 1] in coolwarm."""
    finite = values[np.isfinite(values)]
    return (0.0, "viridis") if finite.size == 0 or finite.min() >= 0 else (-1.0, "coolwarm")


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
    lo, name = _cos_range(sim)
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
    _heat(fig, ax, pull, "pull to own prototype\n(masked positions, weak stream)", vmin=0.0, vmax=None,
          cmap="magma", label="(1 - cos) / T", under=trace.images["weak"][i], extent=extent)
    ax.set_xlim(-0.5, size[1] - 0.5)
    ax.set_ylim(size[0] - 0.5, -0.5)
    ax = fig.add_subplot(grid[0, 3])
    cos = trace.class_cos[i, cls]
    if not bool(trace.available[cls]):
        cos = torch.full_like(cos, float("nan"))
    lo, name = _cos_range(trace.class_cos.numpy())
    _heat(fig, ax, cos, f"cos to prototype of {class_names[cls]}\n(its cells outlined)", vmin=lo, vmax=1.0,
          cmap=name, label="cosine", under=trace.images["weak"][i], extent=extent)
    ax.set_xlim(-0.5, size[1] - 0.5)
    ax.set_ylim(size[0] - 0.5, -0.5)
    _cell_outline(ax, trace.fea_groups[k] == cls, size, "lime")
    seen = f"{int(trace.seen_before.sum())} -> {int(trace.available.sum())} of {nc} entries available"
    fig.suptitle(f"S4MIM prototypes and class-wise feature aggregation, image {i} ({seen}; EMA alpha "
                 f"{trace.alpha:g}, T = {temperature:g})", fontsize=10)
    return fig



# ----------------------------------------------------------------------------------------------- ScaleMatch


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

    _need(session, "scalematch")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0):
        raise ValueError(f"scale must be a positive number (one of method.scales), got {scale!r}")
    knobs = dict(scales=None if scale is None else (float(scale),), tau=tau, cif_warmup_epochs=cif_warmup_epochs)
    batch = session.batch(step)
    m = session.method
    with session.configured(**knobs) as c, session.replay(seed):
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
            return _cpu(torch.stack([g[n:, 0].float() for g in ts], 1)) if ts else None

        return ScaleMatchTrace(
            **_base(session, batch, step, seed, knobs),
            images={"weak": _u8(session, batch.x_w), "strong": _u8(session, s.x_s),
                    "labeled": _u8(session, batch.x_l)},
            terms=stage_terms(s.terms, meanings), total=float(sum(w * v for w, v in s.terms.values())),
            tau=float(c.tau), scales=tuple(float(v) for v in s.scales), sampling=c.scale_sampling,
            feature_scale=t, image_size=(int(size[0]), int(size[1])),
            scaled_sizes=list(sp.scaled_sizes), structure=c.structure,
            feature_sizes={k: (int(a), int(b)) for k, (a, b) in fs.items()}, epoch=info.epoch,
            warmup_epochs=c.cif_warmup_epochs, use_fused=pl.use_fused,
            fusion=c.fusion if c.cif else None,
            scaled_views=[_u8(session, v) for v in views], logits_w=_cpu(logits[n:].float()),
            logits_v=_cpu(torch.stack([lv[n:].float() for lv in branches], 1)) if branches else
            torch.zeros(0), fused=None if fused is None else _cpu(fused[n:].float()), gate_w=stack(gates),
            gate_v=stack(gates_v), pseudo_plain=_cpu(pl.plain.pseudo), conf_plain=_cpu(pl.plain.conf),
            confident_plain=_cpu(pl.plain.confident(c.tau)),
            pseudo_fused=None if fused_t is None else _cpu(fused_t.pseudo),
            conf_fused=None if fused_t is None else _cpu(fused_t.conf),
            confident_fused=None if fused_t is None else _cpu(fused_t.confident(c.tau)),
            pseudo=_cpu(weak.pseudo), confident=_cpu(weak.confident(c.tau)),
            box=_cpu(batch.box1 if c.cutmix else torch.zeros_like(batch.box1)), target_s=_cpu(t_s.pseudo),
            confident_s=_cpu(t_s.confident(c.tau)), valid_s=_cpu(t_s.ignore != IGNORE),
            pred_s=_cpu(s.logits_s.argmax(1)), isvc_losses=[float(v) for v in s.isvc],
            pred_fsvc=None if logits_fp is None else _cpu(logits_fp.argmax(1)))


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
    fig, axes = _figure(s, 6, cell=2.2, extra_h=0.7, extra_w=0.8)
    conf_v = trace.logits_v.softmax(2).max(2)[0]
    hh, ww = trace.image_size
    for k in range(s):
        sh, sw = trace.scaled_sizes[k]
        _show(axes[k, 0], to_hwc(trace.images["weak"][i]), f"weak view, scale 1\n{hh} x {ww}")
        _show(axes[k, 1], to_hwc(trace.scaled_views[k][i]), f"weak view, scale v = {trace.scales[k]:g}\n{sh} x {sw}")
        _show(axes[k, 2], _labels(trace.pseudo_plain[i], v, palette), "prediction @ 1")
        _heat(fig, axes[k, 3], trace.conf_plain[i].masked_fill(~v, float("nan")), "confidence @ 1")
        _show(axes[k, 4], _labels(trace.logits_v[i, k].argmax(0), v, palette),
              f"prediction @ {trace.scales[k]:g}\n(resized back)")
        _heat(fig, axes[k, 5], conf_v[i, k].masked_fill(~v, float("nan")), f"confidence @ {trace.scales[k]:g}",
              label="max prob")
    _legend(fig, class_names, palette)
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
    fig, axes = _figure(s, 4, cell=2.5, extra_h=0.6, extra_w=1.2)
    for k in range(s):
        sw, sv = trace.gate_w[i, k], trace.gate_v[i, k]
        _show(axes[k, 0], to_hwc(trace.images["weak"][i]), "weak view")
        _heat(fig, axes[k, 1], sw.masked_fill(~v, float("nan")), "s_w (weight of scale 1)", cmap="viridis",
              label="gate")
        _heat(fig, axes[k, 2], sv.masked_fill(~v, float("nan")), f"s_v = 1 - s_w (scale {trace.scales[k]:g})",
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
    fig, axes = _figure(2, 5, cell=2.2, extra_h=1.0, extra_w=0.8)
    _show(axes[0, 0], to_hwc(trace.images["weak"][i]), "weak view")
    if trace.gt is not None:
        _show(axes[1, 0], _labels(trace.gt[i], v, palette), "ground truth (not used)")
    else:
        axes[1, 0].set_visible(False)
    rows = (("plain", trace.pseudo_plain, trace.conf_plain, trace.confident_plain),
            ("fused", trace.pseudo_fused, trace.conf_fused, trace.confident_fused))
    for r, (name, p, cf, q) in enumerate(rows):
        used = " (used)" if (name == "fused") == trace.use_fused else ""
        _show(axes[r, 1], _labels(p[i], v, palette), f"{name} pseudo-label{used}")
        _heat(fig, axes[r, 2], cf[i].masked_fill(~v, float("nan")), f"{name} confidence", label="max prob")
        share = float((q[i] & v).sum()) / max(1, int(v.sum()))
        _show(axes[r, 3], _confident_labels(p[i], q[i], v, palette), f"{name} confident (tau {trace.tau:g})\n"
              f"{share:.0%} of pixels")
    changed = (trace.pseudo_fused[i] != trace.pseudo_plain[i]) & v
    img = np.full((*v.shape, 3), 255, dtype=np.uint8)
    img[v.numpy()] = (235, 235, 235)
    img[changed.numpy()] = (255, 165, 0)
    _show(axes[0, 4], img, f"relabelled by the fusion\n{int(changed.sum())} px (orange)")
    axes[1, 4].set_visible(False)
    _legend(fig, class_names, palette, [_below_threshold_patch()])
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
    fig, axes = _figure(2, 4, cell=2.3, extra_h=1.0)
    _show(axes[0, 0], to_hwc(trace.images["weak"][i]), "weak view")
    _show(axes[0, 1], _confident_labels(trace.pseudo[i], trace.confident[i], v, palette),
          f"target: {'fused' if trace.use_fused else 'plain'}\npseudo-label (tau {trace.tau:g})")
    if trace.num_branches and trace.isvc_losses:
        _show(axes[0, 2], _labels(trace.logits_v[i, 0].argmax(0), v, palette),
              f"ISVC: prediction @ {trace.scales[0]:g}\nL_ISVC = {loss['loss_isvc']:.4f}")
    else:
        axes[0, 2].set_visible(False)
    if trace.pred_fsvc is not None:
        _show(axes[0, 3], _labels(trace.pred_fsvc[i], v, palette),
              f"FSVC: features x {trace.feature_scale:g}\n+ dropout, L = {loss['loss_fsvc']:.4f}")
    else:
        axes[0, 3].set_visible(False)
    _show(axes[1, 0], to_hwc(trace.images["strong"][i]), "strong view (CutMix)")
    _box_outline(axes[1, 0], trace.box[i])
    _show(axes[1, 1], _confident_labels(trace.target_s[i], trace.confident_s[i], vs, palette), "strong target")
    _box_outline(axes[1, 1], trace.box[i])
    _show(axes[1, 2], _labels(trace.pred_s[i], vs, palette), f"strong prediction\nL_s = {loss['loss_s']:.4f}")
    _box_outline(axes[1, 2], trace.box[i])
    axes[1, 3].set_visible(False)
    _legend(fig, class_names, palette, [_below_threshold_patch()])
    fig.suptitle(f"ScaleMatch consistency losses, image {i} (losses of the batch, on the target's confident pixels; "
                 "CutMix box dashed)", fontsize=10)
    return fig
