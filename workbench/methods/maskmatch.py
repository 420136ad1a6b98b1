"""MaskMatch (fine-grained locality learning for semi-supervised segmentation; a preprint without public code): mean
teacher + weak-to-strong consistency + LCR + multi-scale ensembled pseudo-labels.

``L = L_x + lambda1 L_MSWS + lambda2 L_LCR`` (Eq. 9) with lambda1 = ``unsup_weight`` = 1 and lambda2 = ``lcr_weight``
= 1, tau = 0.90, EMA alpha a constant 0.999 from the first step (``ema_warmup: false``; the mean teacher's warm-up is
a switch). No public code exists, so the defaults follow the paper's equations (``docs/fidelity.md``):

- the unlabeled losses (Eqs. 3, 6, 8) average each image's loss over *its* confident pixels and then average the
  images (``loss_norm: image_confident``; ``batch_valid`` is the UniMatch convention, a switch);
- a pixel is confident when its probability is strictly above tau (``tau_strict: true``).

- **MS** (``ms``, Eq. 7): the teacher predicts the weak view (and the mix batch) at ``scales`` (0.7, 1.0, 1.5); each
  prediction is resized back and the softmaxes are averaged; pseudo-label and confidence come from the average.
  The student predicts the CutMixed strong view at the same scales, every prediction resized back and supervised by
  the ensembled pseudo-label; the loss is averaged over scales (Eq. 8,
  :func:`workbench.ops.ensemble.multiscale_ce_loss`).
  With ``ms: false`` both fall back to the single-scale mean teacher.
- **LCR** (``lcr_weight`` > 0; Eqs. 5-6): the component of :mod:`workbench.methods.components`, shared with every
  weak-to-strong method; its pseudo-label is the (ensembled) teacher target of the weak view, as in the paper's Fig. 2.

Ablation switches (paper's Tables 7-9): Table 7 rows = ``ms`` true/false x ``lcr_weight`` 1/0; Table 8 = ``lcr_region``
(``both`` = "LP LP", ``unmasked`` = "LP /", ``lcr_weight: 0`` = "/ /"; the image-reconstruction rows are not built);
Table 9 = ``lcr_strategy`` random/block/grid.

The paper trains with SGD weight decay 5e-4: an optimiser setting, so MaskMatch configs set
``optim.weight_decay: 5.0e-4`` (see ``configs/maskmatch_synthetic.yaml``); the method cannot change it.

Artifacts (when capturing), besides the weak-to-strong ones (pseudo/conf are the ensemble's when ``ms`` is on):
``x_masked``, ``lcr_visible``, ``lcr_region``, ``pred_masked`` (LCR); ``ms_scales`` [S], ``ms_pred`` / ``ms_conf``
[B,S,H,W] (teacher's per-scale argmax / max probability, resized back), ``ms_ensemble`` / ``ms_ensemble_conf``
[B,H,W] and ``pred_s_scales`` [B,S,H,W] (student's per-scale predictions of the strong view).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from workbench.config import bounded
from workbench.methods.base import LossTerms, SemiBatch, StepInfo, StepOutput, register_method, term_logs, weighted_sum
from workbench.methods.components import LCROutput
from workbench.methods.fixmatch import MeanTeacher, MeanTeacherConfig, Targets
from workbench.methods.supervised import supervised_loss
from workbench.ops.ensemble import (
    DEFAULT_SCALES,
    ensemble_probs,
    multiscale_ce_loss,
    predict_scales,
    rescale,
    resize_logits,
)
from workbench.ops.semi import pseudo_label


@dataclass
class MaskMatchConfig(MeanTeacherConfig):
    """MaskMatch: tau 0.90, lambda1 = ``unsup_weight`` = 1, lambda2 = ``lcr_weight`` = 1; ``ms`` switches the
    multi-scale ensembling (``scales`` must contain 1.0, the original view)."""

    name: str = "maskmatch"
    tau: float = 0.90
    ema_warmup: bool = False
    loss_norm: str = "image_confident"
    tau_strict: bool = True
    lcr_weight: float = 1.0
    ms: bool = True
    scales: tuple[float, ...] = bounded(DEFAULT_SCALES, gt=0)

    def cross_checks(self) -> list[tuple[bool, str, str]]:
        return [*super().cross_checks(), (1.0 in self.scales, "scales", "must include 1.0 (the original view)")]


@register_method
class MaskMatch(MeanTeacher):
    """MaskMatch on the mean teacher (EMA teacher in eval mode makes the pseudo-labels and is evaluated)."""

    name = "maskmatch"
    config_class = MaskMatchConfig
    cfg: MaskMatchConfig

    def teacher_targets(self, x: Tensor, ignore: Tensor | None) -> tuple[Targets, list[Tensor] | None]:
        """The teacher's targets of weak views ``x``: the multi-scale ensemble when ``ms`` is on (then also the
        per-scale logits, resized back), else the single-scale prediction (and None)."""
        if not self.cfg.ms:
            return Targets(*pseudo_label(self.predict_eval(x)), ignore), None
        per_scale = predict_scales(self.predict_eval, x, self.cfg.scales)
        conf, pseudo = ensemble_probs(per_scale).max(1)
        return Targets(pseudo, conf, ignore), per_scale

    def mix_targets(self, batch: SemiBatch) -> Targets:
        return self.teacher_targets(batch.x_w_mix, batch.ignore_mix)[0]

    def training_step(self, batch: SemiBatch, step: StepInfo) -> StepOutput:
        s = self.stages(batch, step)
        logs = {**term_logs(s.terms), **self.diagnostics(s.weak, batch)}
        return StepOutput(weighted_sum(s.terms), logs, self.step_artifacts(batch, s) if step.capture else {})

    def stages(self, batch: SemiBatch, step: StepInfo) -> MaskMatchStep:
        """One MaskMatch step, ``L = L_x + lambda1 L_MSWS + lambda2 L_LCR`` (Eq. 9), stage by stage; the
        step-through (:func:`workbench.viz.stepthrough.maskmatch.maskmatch_trace`) shows this very call."""
        c = self.cfg
        mix = self.mix_targets(batch)                                            # teacher, mix batch (Eq. 7)
        weak, teacher_scales = self.teacher_targets(batch.x_w, batch.ignore)     # teacher, weak view (Eq. 7)
        x_s = self.strong_view(batch.x_s1, batch.x_s1_mix, batch.box1)
        targets_s = self.mixed_targets(weak, mix, batch.box1)                    # the mix batch's in the box
        n = batch.x_l.shape[0]
        logits_l, logits_s = self.model(torch.cat([batch.x_l, x_s]))["logits"].split([n, x_s.shape[0]])
        terms: LossTerms = {"loss_x": (1.0, supervised_loss(c, logits_l, batch.y_l))}
        student_scales = self.student_scales(x_s, logits_s)                      # Eq. 8's predictions
        terms["loss_u"] = (c.unsup_weight, self.msws_loss(student_scales, targets_s))   # Eq. 8
        lcr = self.local_consistency(batch, weak, self.keep(weak))               # Eqs. 5-6, the step's confident mask
        if lcr is not None:
            terms["loss_lcr"] = (c.lcr_weight, lcr.loss)
        return MaskMatchStep(terms, weak, teacher_scales, x_s, targets_s, logits_s, student_scales, lcr)

    def student_scales(self, x_s: Tensor, logits_s: Tensor) -> list[Tensor]:
        """The student's logits of the strong view at every scale of ``cfg.scales``, resized back (``logits_s`` at
        1.0); only ``[logits_s]`` when ``ms`` is off."""
        if not self.cfg.ms:
            return [logits_s]
        size = x_s.shape[-2:]
        return [logits_s if s == 1.0 else resize_logits(self.model(rescale(x_s, s))["logits"], size)
                for s in self.cfg.scales]

    def msws_loss(self, student_scales: list[Tensor], targets: Targets) -> Tensor:
        """L_MSWS (Eq. 8): the confidence-masked CE of every scale's prediction against ``targets``, averaged over
        the scales (the single-scale weak-to-strong loss when ``ms`` is off)."""
        if not self.cfg.ms:
            return self.unsup_loss(student_scales[0], targets)
        return multiscale_ce_loss(student_scales, targets.pseudo, self.keep(targets), targets.ignore,
                                  norm=self.cfg.loss_norm)

    def step_artifacts(self, batch: SemiBatch, s: MaskMatchStep) -> dict[str, Tensor]:
        """The captured tensors: the weak-to-strong ones, LCR's and the multi-scale ones (module docstring)."""
        arts = self.capture(batch, s.weak, s.x_s, s.logits_s, **(s.lcr.artifacts() if s.lcr is not None else {}))
        if s.teacher_scales is not None:
            probs = torch.stack([t.float().softmax(1) for t in s.teacher_scales], 1)   # [B, S, K, H, W]
            conf, pred = probs.max(2)
            arts.update(ms_scales=torch.tensor(self.cfg.scales), ms_pred=pred, ms_conf=conf,
                        ms_ensemble=s.weak.pseudo, ms_ensemble_conf=s.weak.conf,
                        pred_s_scales=torch.stack([t.argmax(1) for t in s.student_scales], 1))
        return arts


@dataclass
class MaskMatchStep:
    """What :meth:`MaskMatch.stages` computed: the loss ``terms`` ``{name: (weight, value)}`` (loss = sum of weight
    x value), the teacher's (ensembled) weak targets and per-scale logits (None without ``ms``), the CutMixed strong
    view with its targets, the student's logits of it (at 1.0 and at every scale) and LCR's output (None when off)."""

    terms: LossTerms
    weak: Targets
    teacher_scales: list[Tensor] | None
    x_s: Tensor
    targets_s: Targets
    logits_s: Tensor
    student_scales: list[Tensor]
    lcr: LCROutput | None
