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

from workbench.methods.base import SemiBatch, StepInfo, StepOutput, register_method
from workbench.methods.fixmatch import MeanTeacher, MeanTeacherConfig, Targets
from workbench.methods.supervised import supervised_loss
from workbench.ops.ensemble import (DEFAULT_SCALES, ensemble_probs, multiscale_ce_loss, predict_scales, rescale,
                                    resize_logits)
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
    scales: tuple[float, ...] = DEFAULT_SCALES

    def __post_init__(self) -> None:
        super().__post_init__()
        from workbench.config import ConfigError

        self.scales = tuple(self.scales)
        if not self.scales or not all(s > 0 for s in self.scales) or 1.0 not in self.scales:
            raise ConfigError(f"method.scales: must be positive numbers including 1.0 (got {list(self.scales)!r})")


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

    def mix_targets(self, batch: SemiBatch) -> Targets:  # noqa: D102 - the mix batch's targets are ensembled too
        return self.teacher_targets(batch.x_w_mix, batch.ignore_mix)[0]

    def training_step(self, batch: SemiBatch, step: StepInfo) -> StepOutput:
        c = self.cfg
        n = batch.x_l.shape[0]
        mix = self.mix_targets(batch)
        weak, teacher_scales = self.teacher_targets(batch.x_w, batch.ignore)
        x_s = self.strong_view(batch.x_s1, batch.x_s1_mix, batch.box1)
        targets_s = self.mixed_targets(weak, mix, batch.box1)
        logits_l, logits_s = self.model(torch.cat([batch.x_l, x_s]))["logits"].split([n, x_s.shape[0]])
        loss_x = supervised_loss(c, logits_l, batch.y_l)
        if c.ms:
            size = x_s.shape[-2:]
            student_scales = [logits_s if s == 1.0 else resize_logits(self.model(rescale(x_s, s))["logits"], size)
                              for s in c.scales]
            loss_u = multiscale_ce_loss(student_scales, targets_s.pseudo, self.keep(targets_s), targets_s.ignore,
                                        norm=c.loss_norm)
        else:
            student_scales = [logits_s]
            loss_u = self.unsup_loss(logits_s, targets_s)
        extra, extra_arts = self.component_outputs(batch, weak, step)
        loss = loss_x + c.unsup_weight * loss_u + sum(extra.values())
        logs = {"loss_x": loss_x.detach(), "loss_u": loss_u.detach(), **self.diagnostics(weak, batch),
                **{k: v.detach() for k, v in extra.items()}}
        arts: dict[str, Tensor] = {}
        if step.capture:
            arts = self.capture(batch, weak, x_s, logits_s, **extra_arts)
            if teacher_scales is not None:
                probs = torch.stack([t.float().softmax(1) for t in teacher_scales], 1)   # [B, S, K, H, W]
                conf, pred = probs.max(2)
                arts.update(ms_scales=torch.tensor(c.scales), ms_pred=pred, ms_conf=conf, ms_ensemble=weak.pseudo,
                            ms_ensemble_conf=weak.conf,
                            pred_s_scales=torch.stack([t.argmax(1) for t in student_scales], 1))
        return StepOutput(loss, logs, arts)
