"""Weak-to-strong baselines: FixMatch (teacher = student), mean teacher (EMA teacher) and UniMatch.

All three share :class:`WeakStrong`: teacher prediction of the mix batch in eval mode, CutMix of the strong views
and of their targets (UniMatch convention), confidence-masked CE normalised by the non-ignored pixels, and the
pseudo-label diagnostics. Loss weights follow the authors' UniMatch code base ("Revisiting Weak-to-Strong
Consistency in Semi-Supervised Semantic Segmentation", CVPR 2023).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from workbench.config import bounded
from workbench.methods.base import (
    LossTerms,
    Method,
    SemiBatch,
    StepInfo,
    StepOutput,
    eval_mode,
    register_method,
    term_logs,
    weighted_sum,
)
from workbench.methods.components import LCROutput, LocalConsistency
from workbench.methods.supervised import SupervisedConfig, supervised_loss
from workbench.ops.ema import ema_update
from workbench.ops.losses import masked_ce_loss
from workbench.ops.semi import confident_mask, cutmix_images, paste_in_box, pseudo_label, pseudo_label_diagnostics


@dataclass
class FixMatchConfig(SupervisedConfig):
    """FixMatch: confidence threshold ``tau``; CutMix across the batch on/off.

    Every weak-to-strong method's step calls the opt-in LCR component (MaskMatch's local consistency regularisation,
    see :mod:`workbench.methods.components`) by name, :meth:`WeakStrong.local_consistency`, with the step's own
    confident mask (CorrMatch's dynamic threshold included): ``lcr_weight`` > 0 adds ``lcr_weight x L_LCR`` to the
    loss (logged as ``loss_lcr``, weighted); ``lcr_patch`` (pixels), ``lcr_ratio`` (hidden fraction),
    ``lcr_strategy`` (random/block/grid) and ``lcr_region`` (both/unmasked/masked) shape it.

    ``loss_norm``: how the confidence-masked CE losses (the weak-to-strong loss, LCR, MaskMatch's multi-scale loss)
    are normalised, ``batch_valid`` (the UniMatch convention of the authors' code bases: by the non-ignored pixels of
    the batch) or ``image_confident`` (MaskMatch's Eqs. 3/6/8: per image over its confident pixels, then over
    images); see :mod:`workbench.ops.losses`. ``tau_strict``: keep pixels with conf > tau (MaskMatch's equations)
    instead of conf >= tau (the authors' UniMatch-family code).
    """

    name: str = "fixmatch"
    tau: float = bounded(0.95, ge=0, le=1)
    cutmix: bool = True
    lcr_weight: float = bounded(0.0, ge=0)
    """0 switches LCR off."""
    lcr_patch: int = bounded(32, ge=1)
    lcr_ratio: float = bounded(0.7, ge=0, le=1)
    lcr_strategy: Literal["random", "block", "grid"] = "random"
    lcr_region: Literal["both", "masked", "unmasked"] = "both"
    loss_norm: Literal["batch_valid", "image_confident"] = "batch_valid"
    tau_strict: bool = False


def lcr_artifacts(out: LCROutput | None) -> dict[str, Tensor]:
    """The LCR component's capture tensors ({} when it is off)."""
    return {} if out is None else out.artifacts()


@dataclass
class Targets:
    """Pseudo-label, confidence and ignore mask of one (possibly CutMixed) view."""

    pseudo: Tensor
    conf: Tensor
    ignore: Tensor

    def confident(self, tau: float, strict: bool = False) -> Tensor:
        """bool mask conf >= tau (conf > tau when ``strict``) on non-ignored pixels."""
        return confident_mask(self.conf, tau, self.ignore, strict)


class WeakStrong(Method):
    """Shared machinery of the weak-to-strong methods (not registered itself)."""

    uses_unlabeled = True
    cfg: FixMatchConfig

    def teacher(self) -> nn.Module:
        """The network that makes pseudo-labels (the student itself unless overridden)."""
        return self.model

    @torch.no_grad()
    def teacher_eval(self, x: Tensor) -> dict[str, Tensor]:
        """The teacher's outputs of ``x`` (logits and feature maps) in eval mode without gradients
        (:func:`~workbench.methods.base.eval_mode`)."""
        with eval_mode(self.teacher()) as net:
            return net(x)

    def predict_eval(self, x: Tensor) -> Tensor:
        """Teacher logits of ``x`` in eval mode without gradients (:meth:`teacher_eval`)."""
        return self.teacher_eval(x)["logits"]

    def mix_targets(self, batch: SemiBatch) -> Targets:
        """Teacher's pseudo-label and confidence of the mix batch (eval mode, no grad) with its ignore mask."""
        pseudo, conf = pseudo_label(self.predict_eval(batch.x_w_mix))
        return Targets(pseudo, conf, batch.ignore_mix)

    def strong_view(self, x_s: Tensor, x_s_mix: Tensor, box: Tensor) -> Tensor:
        """The strong view with the mix batch's strong view pasted into the CutMix box (when CutMix is on)."""
        return cutmix_images(x_s, x_s_mix, box) if self.cfg.cutmix else x_s

    def mixed_targets(self, weak: Targets, mix: Targets, box: Tensor) -> Targets:
        """Targets of a CutMixed strong view: the weak view's outside the box, the mix batch's inside it."""
        if not self.cfg.cutmix:
            return weak
        p, c, i = paste_in_box(box, (weak.pseudo, mix.pseudo), (weak.conf, mix.conf), (weak.ignore, mix.ignore))
        return Targets(p, c, i)

    def keep(self, t: Targets) -> Tensor:
        """bool [B,H,W]: the pixels of ``t`` whose pseudo-label is used (``cfg.tau``, ``cfg.tau_strict``)."""
        return t.confident(self.cfg.tau, self.cfg.tau_strict)

    def unsup_loss(self, logits: Tensor, t: Targets) -> Tensor:
        """Confidence-masked CE of ``logits`` against targets ``t``, normalised as ``cfg.loss_norm`` says."""
        return masked_ce_loss(logits, t.pseudo, self.keep(t), t.ignore, norm=self.cfg.loss_norm)

    def diagnostics(self, weak: Targets, batch: SemiBatch) -> dict[str, Tensor]:
        """Pseudo-label quality of the weak view (GT read for diagnostics only)."""
        return pseudo_label_diagnostics(weak.pseudo, self.keep(weak), weak.ignore, batch.y_u, self.num_classes)

    def local_consistency(self, batch: SemiBatch, weak: Targets, confident: Tensor) -> LCROutput | None:
        """MaskMatch's LCR component (None when ``cfg.lcr_weight`` is 0): the student (``self.model``) predicts the
        patch-masked weak view, supervised by ``weak``'s pseudo-label on the pixels ``confident`` (bool [B,H,W], the
        calling method's own confident mask) with ``weak``'s ignore mask. The loss is unweighted (weight:
        ``cfg.lcr_weight``)."""
        lcr = LocalConsistency.from_config(self.cfg)
        if not lcr.enabled:
            return None
        return lcr(self.model, batch.x_w, weak.pseudo, confident, weak.ignore)

    def capture(self, batch: SemiBatch, weak: Targets, x_s: Tensor, logits_s: Tensor, **extra: Tensor
                ) -> dict[str, Tensor]:
        """Artifacts of a weak-to-strong step (see the run-directory docs for the format)."""
        arts = {"x_w": batch.x_w, "x_s1": x_s, "pseudo": weak.pseudo, "conf": weak.conf,
                "confident": self.keep(weak), "ignore": weak.ignore, "box1": batch.box1,
                "pred_s1": logits_s.argmax(1), "x_l": batch.x_l, "y_l": batch.y_l}
        if batch.y_u is not None:
            arts["y_u"] = batch.y_u
        arts.update(extra)
        return arts


@register_method
class FixMatch(WeakStrong):
    """FixMatch with CutMix (UniMatch's ``fixmatch.py`` protocol): loss = (L_x + L_s) / 2."""

    name = "fixmatch"
    config_class = FixMatchConfig

    def training_step(self, batch: SemiBatch, step: StepInfo) -> StepOutput:
        n = batch.x_l.shape[0]
        mix = self.mix_targets(batch)
        x_s = self.strong_view(batch.x_s1, batch.x_s1_mix, batch.box1)
        logits_l, logits_w = self.model(torch.cat([batch.x_l, batch.x_w]))["logits"].split(
            [n, batch.x_w.shape[0]])
        weak = Targets(*pseudo_label(logits_w), batch.ignore)
        logits_s = self.model(x_s)["logits"]
        terms: LossTerms = {"loss_x": (0.5, supervised_loss(self.cfg, logits_l, batch.y_l)),
                            "loss_s": (0.5, self.unsup_loss(logits_s, self.mixed_targets(weak, mix, batch.box1)))}
        lcr = self.local_consistency(batch, weak, self.keep(weak))
        if lcr is not None:
            terms["loss_lcr"] = (self.cfg.lcr_weight, lcr.loss)
        arts = self.capture(batch, weak, x_s, logits_s, **lcr_artifacts(lcr)) if step.capture else {}
        return StepOutput(weighted_sum(terms), {**term_logs(terms), **self.diagnostics(weak, batch)}, arts)


@dataclass
class MeanTeacherConfig(FixMatchConfig):
    """Mean teacher: EMA ``alpha``; ``ema_warmup`` uses min(alpha, 1 - 1/(step+1)) as in Tarvainen & Valpola and
    U2PL (the teacher follows the student closely at first; MaskMatch turns it off: its paper uses a constant
    alpha); ``unsup_weight`` multiplies L_u."""

    name: str = "meanteacher"
    alpha: float = bounded(0.999, ge=0, le=1)
    ema_warmup: bool = True
    unsup_weight: float = bounded(1.0, ge=0)


@register_method
class MeanTeacher(WeakStrong):
    """Mean teacher: the EMA teacher (eval mode) makes pseudo-labels and is evaluated; L = L_x + w L_u."""

    name = "meanteacher"
    config_class = MeanTeacherConfig
    cfg: MeanTeacherConfig

    def __init__(self, model: nn.Module, cfg: MeanTeacherConfig, num_classes: int) -> None:
        super().__init__(model, cfg, num_classes)
        self.ema = copy.deepcopy(model)
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.ema.eval()

    def teacher(self) -> nn.Module:
        return self.ema

    def predictor(self) -> nn.Module:
        return self.ema

    def train(self, mode: bool = True) -> MeanTeacher:
        super().train(mode)
        self.ema.eval()
        return self

    def ema_alpha(self, iteration: int) -> float:
        """EMA weight at ``iteration`` (0-based)."""
        a = self.cfg.alpha
        return min(a, 1 - 1 / (iteration + 1)) if self.cfg.ema_warmup else a

    def training_step(self, batch: SemiBatch, step: StepInfo) -> StepOutput:
        n = batch.x_l.shape[0]
        mix = self.mix_targets(batch)
        weak = Targets(*pseudo_label(self.predict_eval(batch.x_w)), batch.ignore)
        x_s = self.strong_view(batch.x_s1, batch.x_s1_mix, batch.box1)
        logits_l, logits_s = self.model(torch.cat([batch.x_l, x_s]))["logits"].split([n, x_s.shape[0]])
        terms: LossTerms = {"loss_x": (1.0, supervised_loss(self.cfg, logits_l, batch.y_l)),
                            "loss_u": (self.cfg.unsup_weight,
                                       self.unsup_loss(logits_s, self.mixed_targets(weak, mix, batch.box1)))}
        lcr = self.local_consistency(batch, weak, self.keep(weak))
        if lcr is not None:
            terms["loss_lcr"] = (self.cfg.lcr_weight, lcr.loss)
        arts = self.capture(batch, weak, x_s, logits_s, **lcr_artifacts(lcr)) if step.capture else {}
        return StepOutput(weighted_sum(terms), {**term_logs(terms), **self.diagnostics(weak, batch)}, arts)

    def after_step(self, step: StepInfo) -> None:
        ema_update(self.ema, self.model, self.ema_alpha(step.iteration))


@dataclass
class UniMatchConfig(FixMatchConfig):
    """UniMatch: loss = (L_x + w_s L_s1 + w_s L_s2 + w_fp L_fp) / 2 with w_s = 0.25, w_fp = 0.5."""

    name: str = "unimatch"
    weight_s: float = bounded(0.25, ge=0)
    weight_fp: float = bounded(0.5, ge=0)


@register_method
class UniMatch(WeakStrong):
    """UniMatch (UniPerb feature perturbation + DusPerb dual strong views), teacher = student."""

    name = "unimatch"
    config_class = UniMatchConfig
    cfg: UniMatchConfig

    def forward_weak(self, batch: SemiBatch) -> tuple[Tensor, Tensor, Tensor, dict[str, Any]]:
        """One pass over cat(x_l, x_w) with feature perturbation: (logits_l, logits_w, logits_w_fp, outputs)."""
        n, m = batch.x_l.shape[0], batch.x_w.shape[0]
        out = self.model(torch.cat([batch.x_l, batch.x_w]), perturb=True)
        logits_l, logits_w = out["logits"].split([n, m])
        return logits_l, logits_w, out["logits_fp"][n:], out

    def unimatch_pass(self, batch: SemiBatch, step: StepInfo, mix: Targets) -> UniMatchPass:
        """UniMatch's passes and loss terms (with the opt-in LCR component), with the intermediate tensors that
        extensions (RankMatch) reuse. Terms: ``(L_x + w_s (L_s1 + L_s2) + w_fp L_fp) / 2`` as ``loss_x`` (1/2),
        ``loss_s`` = (L_s1 + L_s2) / 2 (w_s), ``loss_fp`` (w_fp / 2)."""
        c = self.cfg
        x_s1 = self.strong_view(batch.x_s1, batch.x_s1_mix, batch.box1)
        x_s2 = self.strong_view(batch.x_s2, batch.x_s2_mix, batch.box2)
        logits_l, logits_w, logits_fp, out = self.forward_weak(batch)
        weak = Targets(*pseudo_label(logits_w), batch.ignore)
        out_s = self.model(torch.cat([x_s1, x_s2]))
        logits_s1, logits_s2 = out_s["logits"].chunk(2)
        loss_s1 = self.unsup_loss(logits_s1, self.mixed_targets(weak, mix, batch.box1))
        loss_s2 = self.unsup_loss(logits_s2, self.mixed_targets(weak, mix, batch.box2))
        terms: LossTerms = {"loss_x": (0.5, supervised_loss(c, logits_l, batch.y_l)),
                            "loss_s": (c.weight_s, (loss_s1 + loss_s2) / 2),
                            "loss_fp": (c.weight_fp / 2, self.unsup_loss(logits_fp, weak))}
        lcr = self.local_consistency(batch, weak, self.keep(weak))
        if lcr is not None:
            terms["loss_lcr"] = (c.lcr_weight, lcr.loss)
        return UniMatchPass(terms, weak, x_s1, x_s2, logits_s1, logits_fp, out, out_s, lcr)

    def pass_logs(self, batch: SemiBatch, p: UniMatchPass) -> dict[str, Tensor]:
        """What a UniMatch step logs: its terms and the weak view's pseudo-label diagnostics."""
        return {**term_logs(p.terms), **self.diagnostics(p.weak, batch)}

    def capture_pass(self, batch: SemiBatch, p: UniMatchPass, **extra: Tensor) -> dict[str, Tensor]:
        """Artifacts of a UniMatch pass (both strong views, boxes, feature-perturbed prediction, LCR's)."""
        return self.capture(batch, p.weak, p.x_s1, p.logits_s1, x_s2=p.x_s2, box2=batch.box2,
                            pred_fp=p.logits_fp.argmax(1), **lcr_artifacts(p.lcr), **extra)

    def training_step(self, batch: SemiBatch, step: StepInfo) -> StepOutput:
        p = self.unimatch_pass(batch, step, self.mix_targets(batch))
        arts = self.capture_pass(batch, p) if step.capture else {}
        return StepOutput(weighted_sum(p.terms), self.pass_logs(batch, p), arts)


@dataclass
class UniMatchPass:
    """What :meth:`UniMatch.unimatch_pass` computed: the loss ``terms`` ``{name: (weight, value)}`` (loss = sum of
    weight x value), weak targets, strong views and network outputs (``out`` of cat(x_l, x_w) with perturbation,
    ``out_s`` of cat(x_s1, x_s2)), and the LCR component's output (None when off)."""

    terms: LossTerms
    weak: Targets
    x_s1: Tensor
    x_s2: Tensor
    logits_s1: Tensor
    logits_fp: Tensor
    out: dict[str, Tensor]
    out_s: dict[str, Tensor]
    lcr: LCROutput | None = None
