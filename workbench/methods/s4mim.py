"""S4MIM ("Masked Image Modeling Boosting Semi-Supervised Semantic Segmentation", arXiv 2411.08756): class-wise
masked image modelling.

Every step has the two phases of the paper's Fig. 2, summed into one loss (Eq. 14) and one backward pass:

- **Phase I** (the baseline, "FixMatch with UniPerb"): ``L_s`` = CE of the labeled prediction against the GT;
  ``L_u = l_u (CE(p_s, y_w) + CE(p_fp, y_w))`` on confident pixels (tau 0.95), one CutMixed strong view and the
  feature-perturbed weak view (Eqs. 1-2). The pixel decoder is not used.
- **Phase II** (mask-induced learning) on three masked streams: ``x_l * m``, ``x_s * m`` and ``x_w * m`` with the
  feature perturbation (channel dropout on the encoder features, as UniPerb), ``m`` random 6-pixel patches with ratio
  0.4 (the strong and weak streams of an image share its mask; the labeled images get their own). The shared encoder
  feeds both the semantic decoder SeD (the segmentation model's head) and the pixel decoder PiD (the same DeepLabV3+
  decoder structure, no classifier, with one bias-free 3x3 head per class, :class:`~workbench.ops.mim.ClassHeads`):

  - ``L_mimpi = l_mp sum_streams MSE(r, x)`` (Eqs. 5-8): class-wise reconstruction ``r = sum_c Head_c(fea * Y_c)`` of
    the unmasked (normalised) image, ``Y`` = the labeled stream's own pseudo-label (argmax of ``p_l``) or the weak
    view's pseudo-label (CutMixed like the strong view for ``x_s * m``), nearest-resized to the feature size;
    reconstructions are upsampled to the image like logits.
  - ``L_mimfea = l_mf mean_c l_agg`` (Eqs. 9-12): the prototype of class c is the confidence-weighted mean of the
    labeled stream's PiD features at visible, non-ignored positions (confidence of ``p_l``); a dictionary of
    prototypes (zeros at first) is updated by EMA ``alpha = 0.99`` with it, then the masked, non-ignored positions of
    all three streams are pulled to their class's prototype by ``conf x (1 - cos) / T`` (T = 10; confidences of
    ``p_l``, ``p_s``, ``p_fp``), averaged over the classes that have masked positions.
  - ``L_mimse = l_ms sum_streams CE(p_m, y)`` (Eq. 13): SeD's prediction of each masked stream against the argmax of
    the corresponding unmasked stream's prediction (``p_l``, ``p_s``, ``p_fp``); padded/ignored pixels excluded, no
    confidence threshold.

- Total (Eq. 14): ``(L_s + L_u + L_mimpi + L_mimfea + L_mimse) / (1 + 2 l_u + 3 l_mp + 3 l_mf + 3 l_ms)``, with
  ``l_u = 1/2, l_mp = 1/3, l_mf = 0.05, l_ms = 0.1/3``; a switched-off loss leaves the sum and the normaliser.

The encoder and SeD follow the poly schedule; PiD and the class heads have a constant lr (``pid_lr_mult`` x the base
lr; the paper gives no value, the default equals SeD's starting lr). Distributed: the prototype sums are all-reduced
before the dictionary update, so every process keeps the same dictionary. The dictionary is a buffer of the method
(saved in checkpoints).

Ablation switches (the paper's Tables IV-VII): ``mimpi`` / ``mimfea`` / ``mimse`` (Table IV); ``classwise: false`` =
basic MIM with the same heads, ``r = sum_c Head_c(fea)`` (Table V); ``dictionary: false`` = batch prototypes only,
``confidence: false`` = unit weights (Table VI); ``mimse_loss: mse`` = squared error between the softmax of the masked
and of the unmasked predictions (Table VII).

Artifacts (when capturing), besides the weak-to-strong ones: ``x_l_masked``, ``x_s_masked``, ``x_w_masked`` (masked
inputs), ``mim_visible`` (bool [B,H,W], the unlabeled streams' mask), ``recon_l``, ``recon_s``, ``recon_fp`` (images
[B,3,H,W] in the normalised space), ``recon_classes`` ([B,C,3,h,w], each class's term of the weak stream's
reconstruction, at the feature size), ``mim_groups`` ([B,h,w], that stream's grouping labels), ``pred_masked_*``
(SeD's argmax on the masked streams), ``prototypes`` [C,D] and ``proto_seen`` [C], ``pid_features`` ([B,D,h,w], PiD
features of the masked weak stream) and ``sed_features`` ([B,D,h,w], SeD decoder features of the weak view) with
``sed_labels`` (the weak pseudo-label at that size) for t-SNE (:mod:`workbench.viz.embedding`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workbench.config import bounded
from workbench.methods.base import LossTerms, SemiBatch, StepInfo, StepOutput, register_method
from workbench.methods.components import LCROutput
from workbench.methods.fixmatch import FixMatchConfig, Targets, UniMatch
from workbench.methods.supervised import supervised_loss
from workbench.models.deeplab import DeepLabV3PlusHead
from workbench.ops import IGNORE
from workbench.ops.collective import all_reduce_sum
from workbench.ops.losses import masked_ce_loss
from workbench.ops.masking import patch_mask
from workbench.ops.mim import ClassHeads, aggregation_loss, class_prototypes, ema_prototypes, normaliser, resize_labels
from workbench.ops.semi import pseudo_label


@dataclass
class S4MIMConfig(FixMatchConfig):
    """S4MIM settings (defaults = the paper). Weights: ``weight_u`` (l_u), ``weight_mp`` (l_mp), ``weight_mf``
    (l_mf), ``weight_ms`` (l_ms). Mask: ``mask_patch`` pixels, ``mask_ratio``, ``mask_strategy``. Dictionary EMA
    ``alpha``, cosine ``temperature`` T. Switches: see the module docstring."""

    name: str = "s4mim"
    tau: float = 0.95
    weight_u: float = bounded(0.5, ge=0)
    weight_mp: float = bounded(1 / 3, ge=0)
    weight_mf: float = bounded(0.05, ge=0)
    weight_ms: float = bounded(0.1 / 3, ge=0)
    mask_patch: int = bounded(6, ge=1)
    mask_ratio: float = bounded(0.4, ge=0, le=1)
    mask_strategy: Literal["random", "block", "grid"] = "random"
    alpha: float = bounded(0.99, ge=0, le=1)
    temperature: float = bounded(10.0, gt=0)
    mimpi: bool = True
    mimfea: bool = True
    mimse: bool = True
    classwise: bool = True
    dictionary: bool = True
    confidence: bool = True
    mimse_loss: Literal["ce", "mse"] = "ce"
    pid_lr_mult: float = bounded(10.0, gt=0)

    @property
    def any_mim(self) -> bool:
        """True when phase II has a loss switched on."""
        return self.mimpi or self.mimfea or self.mimse


@dataclass
class Streams:
    """The three masked streams of phase II, concatenated in the order labeled, strong, weak-with-perturbation."""

    x: Tensor           # unmasked images [N,3,H,W] (reconstruction targets)
    visible: Tensor     # float [N,1,H,W] patch mask (1 = visible)
    groups: Tensor      # long [N,H,W] grouping pseudo-labels
    conf: Tensor        # float [N,H,W] confidence of the unmasked prediction (aggregation weights)
    valid: Tensor       # bool [N,H,W] non-ignored pixels
    targets: Tensor     # long [N,H,W] semantic-space targets (argmax of the unmasked predictions)
    probs: Tensor       # float [N,K,H,W] softmax of the unmasked predictions (mimse_loss = mse; else empty)
    sizes: list[int]    # stream lengths [n, m, m]


@register_method
class S4MIM(UniMatch):
    """S4MIM: FixMatch with UniPerb (phase I) + class-wise MIM in pixel, feature and semantic space (phase II)."""

    name = "s4mim"
    config_class = S4MIMConfig
    cfg: S4MIMConfig

    def __init__(self, model: nn.Module, cfg: S4MIMConfig, num_classes: int) -> None:
        super().__init__(model, cfg, num_classes)
        head = model.head
        ch = model.backbone.channels
        self.pixel_decoder = DeepLabV3PlusHead(ch["layer1"], ch["layer4"], None, head.aspp.rates, head.head_width)
        self.class_heads = ClassHeads(self.pixel_decoder.channels, num_classes, 3, 3)
        self.register_buffer("prototypes", torch.zeros(num_classes, self.pixel_decoder.channels))
        self.register_buffer("proto_seen", torch.zeros(num_classes, dtype=torch.bool))

    def param_groups(self, lr: float, head_mult: float = 10.0) -> list[dict[str, Any]]:
        """Encoder and SeD poly-decayed (base groups); PiD and the class heads at a constant ``lr x pid_lr_mult``."""
        pid_lr = lr * self.cfg.pid_lr_mult
        params = [*self.pixel_decoder.parameters(), *self.class_heads.parameters()]
        return [*super().param_groups(lr, head_mult),
                {"params": params, "lr": pid_lr, "base_lr": pid_lr, "poly": False, "name": "pixel_decoder"}]

    # ---- phase II pieces -------------------------------------------------------------------------------------------
    def masked_forward(self, xm: Tensor, perturbed_from: int) -> tuple[Tensor, Tensor]:
        """Encode the masked streams once, channel-dropout the features of samples ``perturbed_from:`` (the weak
        stream's UniPerb), decode with SeD and PiD: (SeD logits [N,K,H,W], PiD features [N,D,H/4,W/4])."""
        feats = self.model.encode(xm)
        p = self.model.fp_dropout
        low, high = feats["low"], feats["high"]
        low = torch.cat([low[:perturbed_from], F.dropout2d(low[perturbed_from:], p, training=True)])
        high = torch.cat([high[:perturbed_from], F.dropout2d(high[perturbed_from:], p, training=True)])
        sed = self.model.decode({"low": low, "high": high}, xm.shape[-2:])
        pid = self.pixel_decoder(low, high)
        return sed["logits"], pid["decoder"]

    def reconstruct(self, fea: Tensor, groups: Tensor, size: tuple[int, int]) -> Tensor:
        """Class-wise (or basic, ``classwise: false``) reconstruction upsampled to ``size``: [N,3,*size]."""
        labels = resize_labels(groups, fea.shape[-2:]) if self.cfg.classwise else None
        r = self.class_heads(fea, labels)
        return F.interpolate(r, size=size, mode="bilinear", align_corners=True)

    def update_dictionary(self, fea_l: Tensor, groups_l: Tensor, conf_l: Tensor, visible_l: Tensor
                          ) -> tuple[Tensor, Tensor]:
        """Eq. 9 on the labeled stream's visible valid positions, all-reduced, then the EMA update of the dictionary
        (when ``dictionary`` is on). Returns the prototypes the loss uses ([C,D]: the dictionary, or this batch's
        prototypes when the dictionary is off) and which of them are available (bool [C]: entries ever updated, or
        the classes of this batch)."""
        c = self.cfg
        with torch.no_grad():
            w = conf_l if c.confidence else torch.ones_like(conf_l)
            num, den, count = class_prototypes(fea_l.detach().float(), groups_l, w.float(), visible_l,
                                               self.num_classes)
            num, den, count = all_reduce_sum(num), all_reduce_sum(den), all_reduce_sum(count)
            present = (count > 0) & (den > 0)
            batch_protos = num / den.clamp(min=1e-12)[:, None]
            if not c.dictionary:
                return torch.where(present[:, None], batch_protos, torch.zeros_like(batch_protos)), present
            self.prototypes.copy_(ema_prototypes(self.prototypes, batch_protos, present, c.alpha))
            self.proto_seen |= present
            return self.prototypes.clone(), self.proto_seen.clone()

    def streams(self, batch: SemiBatch, p: Phase1) -> Streams:
        """Masks, grouping labels, confidences and targets of the three masked streams (no gradients)."""
        c = self.cfg
        x_s, logits_l, logits_s, logits_fp, weak, t_s = p.x_s, p.logits_l, p.logits_s, p.logits_fp, p.weak, p.targets_s
        n, m = batch.x_l.shape[0], batch.x_w.shape[0]
        h, w = batch.x_w.shape[-2:]
        dev = batch.x_w.device
        vis_l = patch_mask(n, h, w, c.mask_patch, c.mask_ratio, c.mask_strategy, device=dev)
        vis_u = patch_mask(m, h, w, c.mask_patch, c.mask_ratio, c.mask_strategy, device=dev)
        with torch.no_grad():
            pl_l, conf_l = pseudo_label(logits_l)
            pl_s, conf_s = pseudo_label(logits_s)
            pl_fp, conf_fp = pseudo_label(logits_fp)
            probs = torch.cat([lg.detach().float().softmax(1) for lg in (logits_l, logits_s, logits_fp)]) \
                if c.mimse_loss == "mse" else torch.empty(0)
        return Streams(
            x=torch.cat([batch.x_l, x_s, batch.x_w]),
            visible=torch.cat([vis_l, vis_u, vis_u]).to(batch.x_w.dtype),
            groups=torch.cat([pl_l, t_s.pseudo, weak.pseudo]),
            conf=torch.cat([conf_l, conf_s, conf_fp]),
            valid=torch.cat([batch.y_l != IGNORE, t_s.ignore != IGNORE, weak.ignore != IGNORE]),
            targets=torch.cat([pl_l, pl_s, pl_fp]),
            probs=probs,
            sizes=[n, m, m],
        )

    def phase2(self, s: Streams) -> Phase2:
        """Phase II on the streams ``s``: the masked forward (SeD + PiD), then the spaces whose loss is on:
        :meth:`pixel_space` (Eqs. 5-8), :meth:`feature_space` (Eqs. 9-12, updates the dictionary) and
        :meth:`semantic_space` (Eq. 13)."""
        c = self.cfg
        n, m, _ = s.sizes
        xm = s.x * s.visible
        logits_m, fea = self.masked_forward(xm, n + m)
        recon, mse = self.pixel_space(s, fea) if c.mimpi else (None, None)
        feature = self.feature_space(s, fea) if c.mimfea else None
        semantic = self.semantic_space(s, logits_m) if c.mimse else None
        return Phase2(s, xm, logits_m, fea, recon, mse, feature, semantic)

    def pixel_space(self, s: Streams, fea: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The reconstructions [N,3,H,W] of the streams and each stream's MSE against its unmasked images (Eq. 8)."""
        recon = self.reconstruct(fea, s.groups, tuple(s.x.shape[-2:]))
        return recon, [F.mse_loss(r.float(), x.float()) for r, x in zip(recon.split(s.sizes), s.x.split(s.sizes))]

    def feature_space(self, s: Streams, fea: Tensor) -> FeatureSpace:
        """The aggregation loss (Eqs. 9-12) at the feature size: the labeled stream's prototypes update the
        dictionary (:meth:`update_dictionary`), then masked valid positions are pulled to their class's one."""
        c, n = self.cfg, s.sizes[0]
        fsize = fea.shape[-2:]
        groups = resize_labels(s.groups, fsize)
        vis = resize_labels(s.visible[:, 0] > 0.5, fsize)
        valid = resize_labels(s.valid, fsize)
        conf = F.interpolate(s.conf[:, None], size=tuple(fsize), mode="nearest")[:, 0]
        protos, available = self.update_dictionary(fea[:n], groups[:n], conf[:n], (vis & valid)[:n])
        weights = conf if c.confidence else torch.ones_like(conf)
        agg, classes = aggregation_loss(fea.float(), groups, weights, ~vis & valid, protos, available, c.temperature)
        return FeatureSpace(groups, vis, valid, conf, weights, protos, available, agg, classes)

    def semantic_space(self, s: Streams, logits_m: Tensor) -> list[Tensor]:
        """Each stream's loss of SeD's prediction of the masked stream against the unmasked one's argmax (Eq. 13;
        CE, or the squared error of the softmaxes with ``mimse_loss: mse``), padding excluded, no threshold."""
        per_stream = []
        for i, (lg, t, v) in enumerate(zip(logits_m.split(s.sizes), s.targets.split(s.sizes), s.valid.split(s.sizes))):
            if self.cfg.mimse_loss == "ce":
                ign = torch.where(v, torch.zeros_like(t), torch.full_like(t, IGNORE))
                per_stream.append(masked_ce_loss(lg.float(), t, torch.ones_like(v), ign))
            else:
                sq = (lg.float().softmax(1) - s.probs.split(s.sizes)[i]).pow(2).sum(1)
                per_stream.append((sq * v).sum() / v.sum().clamp(min=1))
        return per_stream

    @torch.no_grad()
    def phase2_artifacts(self, s: Streams, xm: Tensor, logits_m: Tensor, fea: Tensor,
                         recon: Tensor | None) -> dict[str, Tensor]:
        """Capture tensors of phase II (see the module docstring)."""
        n, m, _ = s.sizes
        names = ("l", "s", "w")
        arts = {f"x_{k}_masked": x for k, x in zip(names, xm.split(s.sizes))}
        arts.update({f"pred_masked_{k}": lg.argmax(1) for k, lg in zip(("l", "s", "fp"), logits_m.split(s.sizes))})
        arts["mim_visible"] = s.visible[n:n + m, 0] > 0.5
        if recon is None:
            recon = self.reconstruct(fea, s.groups, tuple(s.x.shape[-2:]))
        arts.update({f"recon_{k}": r for k, r in zip(("l", "s", "fp"), recon.split(s.sizes))})
        groups_w = resize_labels(s.groups[n + m:], fea.shape[-2:])
        arts["recon_classes"] = self.class_heads.per_class(fea[n + m:], groups_w)
        arts["mim_groups"] = groups_w
        arts["pid_features"] = fea[n + m:]
        arts["prototypes"], arts["proto_seen"] = self.prototypes.clone(), self.proto_seen.clone()
        return arts

    # ---- the step ------------------------------------------------------------------------------------------------
    def phase1(self, batch: SemiBatch) -> Phase1:
        """Phase I's passes: the mix batch (eval mode), the CutMixed strong view, ``cat(x_l, x_w)`` with UniPerb and
        the strong view; the weak targets and the strong view's (the mix batch's inside the box)."""
        mix = self.mix_targets(batch)
        x_s = self.strong_view(batch.x_s1, batch.x_s1_mix, batch.box1)
        logits_l, logits_w, logits_fp, out = self.forward_weak(batch)
        weak = Targets(*pseudo_label(logits_w), batch.ignore)
        t_s = self.mixed_targets(weak, mix, batch.box1)
        return Phase1(x_s, logits_l, logits_fp, self.model(x_s)["logits"], out, weak, t_s)

    def stages(self, batch: SemiBatch, step: StepInfo) -> S4MIMStep:
        """One S4MIM step, the two phases of the paper's Fig. 2 summed by Eq. 14, stage by stage; the step-through
        (:func:`workbench.viz.stepthrough.s4mim.s4mim_trace`) shows this very call."""
        c = self.cfg
        p = self.phase1(batch)
        phase1: LossTerms = {"loss_x": (1.0, supervised_loss(c, p.logits_l, batch.y_l)),            # Eq. 1
                             "loss_s": (c.weight_u, self.unsup_loss(p.logits_s, p.targets_s)),     # Eq. 2
                             "loss_fp": (c.weight_u, self.unsup_loss(p.logits_fp, p.weak))}
        p2 = self.phase2(self.streams(batch, p)) if c.any_mim else None                          # Eqs. 5-13
        norm = normaliser(c.weight_u, c.weight_mp, c.weight_mf, c.weight_ms, c.mimpi, c.mimfea, c.mimse)  # Eq. 14
        lcr = self.local_consistency(batch, p.weak, self.keep(p.weak))                           # opt-in component
        return S4MIMStep(p, phase1, p2.terms(c) if p2 is not None else {}, float(norm), p2, lcr, c.lcr_weight)

    def training_step(self, batch: SemiBatch, step: StepInfo) -> StepOutput:
        s = self.stages(batch, step)
        arts: dict[str, Tensor] = {}
        if step.capture:
            arts = self.step_artifacts(batch, s)
        return StepOutput(s.loss(), self.step_logs(batch, s), arts)

    def step_logs(self, batch: SemiBatch, s: S4MIMStep) -> dict[str, Tensor]:
        """Phase I's losses, phase II's weighted by their lambdas (l_mp L_mimpi, ...), ``mimfea_classes``, LCR's
        weighted loss, the dictionary's seen classes and the pseudo-label diagnostics."""
        logs = {k: v.detach() for k, (_, v) in s.phase1.items()}
        logs.update({k: (w * v).detach() for k, (w, v) in s.mim.items()})
        if s.phase2 is not None and s.phase2.feature is not None:
            logs["mimfea_classes"] = s.phase2.feature.classes.sum().float()
        if s.lcr is not None:
            logs["loss_lcr"] = (self.cfg.lcr_weight * s.lcr.loss).detach()
        return {**logs, "proto_seen": self.proto_seen.sum().float(), **self.diagnostics(s.passes.weak, batch)}

    def step_artifacts(self, batch: SemiBatch, s: S4MIMStep) -> dict[str, Tensor]:
        """The captured tensors: the weak-to-strong ones, phase II's, LCR's and the SeD features (module docstring)."""
        p, n = s.passes, batch.x_l.shape[0]
        extra = dict(s.lcr.artifacts()) if s.lcr is not None else {}
        if s.phase2 is not None:
            p2 = s.phase2
            extra.update(self.phase2_artifacts(p2.streams, p2.xm, p2.logits_m, p2.fea, p2.recon))
        sed_labels = resize_labels(p.weak.pseudo, p.out["decoder"].shape[-2:])
        return self.capture(batch, p.weak, p.x_s, p.logits_s, pred_fp=p.logits_fp.argmax(1), **extra,
                            sed_features=p.out["decoder"][n:], sed_labels=sed_labels)


@dataclass
class Phase1:
    """Phase I of an S4MIM step: the CutMixed strong view, the logits (labeled, feature-perturbed weak, strong),
    the output of ``cat(x_l, x_w)``, the weak targets and the strong view's."""

    x_s: Tensor
    logits_l: Tensor
    logits_fp: Tensor
    logits_s: Tensor
    out: dict[str, Tensor]
    weak: Targets
    targets_s: Targets


@dataclass
class FeatureSpace:
    """The aggregation loss's inputs at the feature size [N,h,w] (grouping labels, visible, valid, confidence,
    weights), the prototypes it used with their availability ([C,D], bool [C]), the loss and the classes averaged."""

    groups: Tensor
    visible: Tensor
    valid: Tensor
    conf: Tensor
    weights: Tensor
    prototypes: Tensor
    available: Tensor
    loss: Tensor
    classes: Tensor


@dataclass
class Phase2:
    """Phase II of an S4MIM step: the streams, masked inputs ``xm``, SeD logits and PiD features of the masked
    forward, and each space's result (None when its loss is off): reconstructions with per-stream MSE, the feature
    space, per-stream semantic losses."""

    streams: Streams
    xm: Tensor
    logits_m: Tensor
    fea: Tensor
    recon: Tensor | None
    mse: list[Tensor] | None
    feature: FeatureSpace | None
    semantic: list[Tensor] | None

    def terms(self, c: S4MIMConfig) -> LossTerms:
        """Eq. 14's phase-II terms ``{name: (lambda, value)}`` of the losses switched on."""
        terms: LossTerms = {}
        if self.mse is not None:
            terms["loss_mimpi"] = (c.weight_mp, sum(self.mse))
        if self.feature is not None:
            terms["loss_mimfea"] = (c.weight_mf, self.feature.loss)
        if self.semantic is not None:
            terms["loss_mimse"] = (c.weight_ms, sum(self.semantic))
        return terms


@dataclass
class S4MIMStep:
    """What :meth:`S4MIM.stages` computed: phase I's passes and terms, phase II's terms (``{name: (lambda,
    value)}``, Eq. 14's numerator) and outputs (None when every MIM loss is off), Eq. 14's normaliser and LCR's
    output (None when off)."""

    passes: Phase1
    phase1: LossTerms
    mim: LossTerms
    norm: float
    phase2: Phase2 | None
    lcr: LCROutput | None
    lcr_weight: float

    def loss(self) -> Tensor:
        """The step's loss as Eq. 14 writes it, ``(L_s + l_u (L_u,s + L_u,fp) + sum of l L_mim) / normaliser`` (+ LCR):
        the sum of :attr:`terms`' weight x value up to float rounding, in the order the reference record holds."""
        (_, loss_x), (wu, loss_s), (_, loss_fp) = (self.phase1[k] for k in ("loss_x", "loss_s", "loss_fp"))
        total = loss_x + wu * (loss_s + loss_fp)
        if self.mim:
            total = total + sum(w * v for w, v in self.mim.values())
        extra = self.lcr_weight * self.lcr.loss if self.lcr is not None else 0
        return total / self.norm + extra

    @property
    def terms(self) -> LossTerms:
        """The step's loss terms ``{name: (weight, value)}``: Eq. 14's numerator terms with their weights over the
        normaliser, then LCR."""
        terms = {k: (w / self.norm, v) for k, (w, v) in {**self.phase1, **self.mim}.items()}
        if self.lcr is not None:
            terms["loss_lcr"] = (self.lcr_weight, self.lcr.loss)
        return terms
