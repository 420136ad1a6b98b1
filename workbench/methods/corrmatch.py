"""CorrMatch ("CorrMatch: Label Propagation via Correlation Matching for Semi-Supervised Semantic Segmentation",
CVPR 2024): label propagation through correlation matching, with a dynamic confidence threshold.

One training step (the paper's Sec. 3; the authors' public ``corrmatch.py`` for the loss weights and quirks, see
``docs/fidelity.md``):

1. the mix batch is predicted in eval mode without gradients (its pseudo-labels, confidences and probabilities
   fill the CutMix box of the strong view);
2. one forward of ``cat(x_l, x_w)`` with UniMatch's feature perturbation, one of the CutMixed strong view;
3. the correlation head (:class:`CorrelationHead`) turns the features of both passes into correlation maps
   ``C = softmax(w1^T w2 / sqrt(K))`` and spreads the detached logits through them (pixel propagation), giving a
   second prediction ``z`` of every image;
4. the threshold ``tau`` is the dynamic one (updated from the un-mixed weak logits over the CutMixed ignore mask,
   then used, as in the reference) or a fixed value;
5. region propagation: sampled rows of the weak view's correlation map become binary shapes (cleared of the CutMix
   box and of padding); confident shapes dominated by one class relabel the whole shape and join the confident mask;
6. losses (reference weights) ``(0.5 L_x + 0.5 L_x_corr + 0.25 L_s + 0.25 L_kl + 0.25 L_fp + 0.25 L_corr_u) / 2``:
   ``L_s`` hard CE of the strong view against the propagated (CutMixed) pseudo-label and mask, ``L_kl`` the soft
   loss (KL(teacher || student) summed over classes, masked by the CutMixed confident mask *before* propagation;
   the teacher is the *un-mixed* weak softmax, as in the reference), ``L_fp`` CE of the perturbed weak prediction
   against the plain weak pseudo-label, ``L_corr_u = (CE(z_s, propagated targets) + CE(z_w, weak targets)) / 2``
   and ``L_x_corr`` the supervised loss of ``z_l``. Every unlabeled loss keeps the UniMatch normalisation (divided by
   the non-ignored pixels).

Two quirks of the authors' code are the defaults, each with a switch for the consistent variant:
``kl_target`` (the soft loss compares the CutMixed strong prediction with the *un-mixed* weak probabilities, so
inside the box the mix image's prediction is pulled towards another image's softmax) and ``threshold_ignore`` (the
dynamic threshold reads the un-mixed weak prediction through the *CutMixed* ignore mask).

Switches for the paper's ablations: Table 5 (``threshold`` dynamic/fixed, ``hard_loss``, ``soft_loss``, propagation
``P`` = ``pixel_propagation`` + ``region_propagation``), Table 6 (pixel, pixel + region), Table 7 (``feature``:
backbone / aspp / fusion / classifier) and Table 8 (``num_shapes``, ``sampling`` random / uniform).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workbench.config import bounded
from workbench.methods.base import LossTerms, SemiBatch, StepInfo, StepOutput, register_method, term_logs, weighted_sum
from workbench.methods.components import LCROutput
from workbench.methods.fixmatch import FixMatchConfig, Targets, WeakStrong
from workbench.methods.supervised import supervised_loss
from workbench.ops import IGNORE
from workbench.ops.correlation import (
    correlation_map,
    pixel_propagation,
    region_propagation,
    sample_rows,
    shapes_from_rows,
)
from workbench.ops.losses import masked_ce_loss, masked_kl_loss
from workbench.ops.semi import pseudo_label, pseudo_label_diagnostics
from workbench.ops.threshold import DynamicThreshold

FEATURE_POSITIONS = ("backbone", "aspp", "fusion", "classifier")


@dataclass
class CorrMatchConfig(FixMatchConfig):
    """CorrMatch settings (defaults = the paper / reference code).

    ``threshold``: ``dynamic`` (EMA of the mean per-class maximum confidence, from ``thresh_init`` with
    ``thresh_momentum``) or ``fixed`` (``tau``, 0.95 as in Table 5's "Fixed" rows).
    ``hard_loss``: the hard unsupervised loss ``L^h_u`` (strong-view CE and feature-perturbation CE);
    ``soft_loss``: ``L^s_u``. ``pixel_propagation``: the correlation head with ``L_x_corr`` and ``L_corr_u`` (without
    it the labeled loss keeps weight ``weight_x + weight_x_corr``, i.e. ``L_s = L^h_s``); ``region_propagation``
    (needs the correlation map, hence ``pixel_propagation``). ``feature``: where the correlation features come from
    (``backbone`` = layer4, ``aspp``, ``fusion`` = decoder output, ``classifier`` = logits at the decoder's
    resolution). ``proj_channels``: width of the projection before the two 1x1 convs. ``num_shapes`` rows of the
    correlation map per image, drawn ``random`` (uniform with replacement, per image) or ``uniform`` (evenly spaced
    flat indices, the same for every image). ``capture_shapes``: rows/shapes kept in captured artifacts.

    Reference quirks (defaults) and their switches (no effect without ``cutmix``):

    - ``kl_target``: ``unmixed`` (reference) = the soft loss's teacher is the un-mixed weak softmax everywhere, also
      inside the CutMix box where the strong view shows the mix image (the authors' ``softmax(pred_u_w)``);
      ``mixed`` (our fix, off by default) = CutMixed like the hard pseudo-labels (the mix batch's softmax in the box).
    - ``threshold_ignore``: ``mixed`` (reference) = the dynamic threshold is updated from the un-mixed weak logits
      over the CutMixed ignore mask (the authors pass ``ignore_mask_cutmixed1``, so padding pasted from the mix
      image hides weak pixels inside the box and the weak view's own padding there counts); ``unmixed`` (our fix,
      off by default) = the weak view's own ignore mask, matching the prediction it masks.
    """

    name: str = "corrmatch"
    threshold: Literal["dynamic", "fixed"] = "dynamic"
    thresh_init: float = bounded(0.85, ge=0, le=1)
    thresh_momentum: float = bounded(0.999, ge=0, le=1)
    hard_loss: bool = True
    soft_loss: bool = True
    pixel_propagation: bool = True
    region_propagation: bool = True
    feature: Literal["backbone", "aspp", "fusion", "classifier"] = "backbone"
    proj_channels: int = bounded(256, ge=1)
    num_shapes: int = bounded(128, ge=1)
    sampling: Literal["random", "uniform"] = "random"
    weight_x: float = bounded(0.5, ge=0)
    weight_x_corr: float = bounded(0.5, ge=0)
    weight_hard: float = bounded(0.25, ge=0)
    weight_soft: float = bounded(0.25, ge=0)
    weight_fp: float = bounded(0.25, ge=0)
    weight_corr_u: float = bounded(0.25, ge=0)
    capture_shapes: int = bounded(8, ge=0)
    kl_target: Literal["unmixed", "mixed"] = "unmixed"
    threshold_ignore: Literal["mixed", "unmixed"] = "mixed"

    def cross_checks(self) -> list[tuple[bool, str, str]]:
        return [*super().cross_checks(), (not self.region_propagation or self.pixel_propagation, "region_propagation",
                "needs the correlation map: set method.pixel_propagation=true or method.region_propagation=false")]


class CorrelationHead(nn.Module):
    """CorrMatch's correlation branch: projection, two 1x1 convs, correlation map and pixel propagation.

    ``proj`` = 3x3 conv (``in_channels`` -> ``mid``, no bias) + BN + ReLU + Dropout2d(0.1); ``w1``, ``w2`` = 1x1 convs
    ``mid`` -> ``num_classes`` (with bias, as the reference ``Corr`` module).
    """

    def __init__(self, in_channels: int, num_classes: int, mid: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        for key, value in (("in_channels", in_channels), ("num_classes", num_classes), ("mid", mid)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive int, got {value!r}")
        self.proj = nn.Sequential(nn.Conv2d(in_channels, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid),
                                  nn.ReLU(inplace=True), nn.Dropout2d(dropout))
        self.w1 = nn.Conv2d(mid, num_classes, 1)
        self.w2 = nn.Conv2d(mid, num_classes, 1)

    def forward(self, feats: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
        """Correlate ``feats`` [B, C, h, w] and propagate ``logits`` [B, K, H, W] (detached) through the map.

        Returns ``(corr, z)``: float ``[B, h*w, h*w]`` (rows sum to 1; row ``i`` = pixel ``i`` against all pixels)
        and the propagated prediction ``[B, K, H, W]`` (computed at ``h x w``, bilinearly upsampled with
        ``align_corners=True``), differentiable with respect to the head and ``feats`` only.
        """
        if feats.dim() != 4 or logits.dim() != 4 or feats.shape[0] != logits.shape[0]:
            raise ValueError(f"feats and logits must be [B, C, h, w] and [B, K, H, W] with equal B, got "
                             f"{tuple(feats.shape)} and {tuple(logits.shape)}")
        p = self.proj(feats)
        corr = correlation_map(self.w1(p), self.w2(p))
        z = pixel_propagation(logits, corr, feat_size=tuple(feats.shape[-2:]))
        return corr, F.interpolate(z, size=logits.shape[-2:], mode="bilinear", align_corners=True)


def feature_channels(model: nn.Module, position: str, num_classes: int) -> int:
    """Channels of the correlation features at ``position`` of a DeepLabV3+ ``model`` (see ``FEATURE_POSITIONS``)."""
    if position == "classifier":
        return num_classes
    try:
        return model.backbone.channels["layer4"] if position == "backbone" else model.head.channels
    except AttributeError:
        raise TypeError(f"cannot read the {position!r} feature channels of {type(model).__name__}: CorrMatch needs "
                        "a DeepLabV3Plus (backbone.channels and head.channels)") from None


def correlation_features(out: dict[str, Tensor], position: str) -> Tensor:
    """The features of a model output dict that the correlation head reads (``FEATURE_POSITIONS``):
    ``high`` (layer4), ``aspp``, ``decoder``, or the logits resized to the decoder's resolution."""
    if position == "classifier":
        return F.interpolate(out["logits"], size=out["decoder"].shape[-2:], mode="bilinear", align_corners=True)
    return out[{"backbone": "high", "aspp": "aspp", "fusion": "decoder"}[position]]


@register_method
class CorrMatch(WeakStrong):
    """CorrMatch: hard + soft weak-to-strong losses, pixel and region propagation, dynamic threshold."""

    name = "corrmatch"
    config_class = CorrMatchConfig
    cfg: CorrMatchConfig

    def __init__(self, model: nn.Module, cfg: CorrMatchConfig, num_classes: int) -> None:
        super().__init__(model, cfg, num_classes)
        self.corr_head: CorrelationHead | None = None
        if cfg.pixel_propagation:
            channels = feature_channels(model, cfg.feature, num_classes)
            self.corr_head = CorrelationHead(channels, num_classes, cfg.proj_channels)
        self.dynamic: DynamicThreshold | None = None
        if cfg.threshold == "dynamic":
            self.dynamic = DynamicThreshold(cfg.thresh_init, cfg.thresh_momentum)

    def param_groups(self, lr: float, head_mult: float = 10.0) -> list[dict[str, Any]]:
        """The model's groups, with the correlation head in the (10x lr) head group."""
        groups = super().param_groups(lr, head_mult)
        if self.corr_head is not None:
            next(g for g in groups if g["name"] == "head")["params"] += list(self.corr_head.parameters())
        return groups

    def current_threshold(self, logits_w: Tensor, ignore: Tensor) -> Tensor | float:
        """This step's ``tau``: the dynamic threshold after its update from the weak logits [B,K,H,W] over the
        ``ignore`` mask [B,H,W] (``threshold_ignore`` picks which one the step passes; a 0-d tensor; the update
        happens here, before use, as in the reference: once per call, i.e. per micro-batch
        under gradient accumulation), or the fixed ``cfg.tau``."""
        if self.dynamic is None:
            return self.cfg.tau
        return self.dynamic.update(logits_w, ignore.to(self.dynamic.value.device), IGNORE)

    def shape_rows(self, batch: int, pixels: int, device: torch.device, sampling: str | None = None) -> Tensor:
        """int64 [B, num_shapes] rows of the correlation map to turn into shapes: ``random`` (uniform with
        replacement, per image) or ``uniform`` (evenly spaced flat indices, the same for every image, no RNG);
        ``sampling`` defaults to ``cfg.sampling``."""
        if (sampling or self.cfg.sampling) == "random":
            return sample_rows(batch, pixels, self.cfg.num_shapes, device=device)
        rows = torch.linspace(0, pixels - 1, self.cfg.num_shapes, device=device).round().long()
        return rows.expand(batch, -1).contiguous()

    def propagate_regions(self, corr_w: Tensor, feat_size: tuple[int, int], weak: Targets, confident: Tensor,
                          tau: Tensor | float, box: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Region propagation on the weak view: ``(pseudo, confident, rows, shapes)`` after propagation.

        ``corr_w`` [B, hw, hw] (detached) is the weak view's correlation map at ``feat_size``; ``num_shapes`` rows
        become bool shapes [B, M, H, W] (Eq. 7), cleared of padding and of the CutMix ``box`` (bool [B, H, W], None
        without CutMix) as in the reference, so the mix batch's pixels pasted there are never relabelled; then
        :func:`~workbench.ops.correlation.region_propagation` with the step's ``tau`` for both ratios.
        """
        rows = self.shape_rows(corr_w.shape[0], corr_w.shape[1], corr_w.device)
        keep = weak.ignore != IGNORE
        if box is not None:
            keep &= ~box
        shapes = shapes_from_rows(corr_w, rows, feat_size, tuple(weak.pseudo.shape[-2:]), check=False) & keep[:, None]
        pseudo, confident = region_propagation(weak.pseudo, confident, shapes, tau, self.num_classes, check=False)
        return pseudo, confident, rows, shapes

    def training_step(self, batch: SemiBatch, step: StepInfo) -> StepOutput:
        s = self.stages(batch, step)
        arts = self.step_artifacts(batch, s) if step.capture else {}
        return StepOutput(weighted_sum(s.terms), self.step_logs(batch, s), arts)

    def stages(self, batch: SemiBatch, step: StepInfo) -> CorrMatchStep:
        """One CorrMatch step as the paper's Sec. 3 reads (the module docstring's numbers), stage by stage; the
        step-through (:func:`workbench.viz.stepthrough.corrmatch.corrmatch_trace`) shows this very call."""
        passes = self.forward_passes(batch)                                    # 1-2
        targets = self.weak_targets(batch, passes)                             # 4: tau, pseudo-labels, masks
        corr = self.correlate(passes) if self.corr_head is not None else None   # 3
        if corr is not None and self.cfg.region_propagation:                   # 5
            targets = self.relabel_regions(batch, targets, corr)
        targets = self.strong_targets(batch, targets)
        terms = self.loss_terms(batch, passes, targets, corr)                  # 6
        lcr = self.local_consistency(batch, targets.weak, targets.confident)   # opt-in component
        if lcr is not None:
            terms["loss_lcr"] = (self.cfg.lcr_weight, lcr.loss)
        return CorrMatchStep(passes, targets, corr, terms, lcr)

    def cutmixed(self, batch: SemiBatch, value: Tensor, value_mix: Tensor) -> Tensor:
        """A per-pixel target ([B,H,W] or [B,K,H,W]) of the strong view: ``value_mix`` inside CutMix box 1 (when
        CutMix is on), ``value`` elsewhere, like the images."""
        if not self.cfg.cutmix:
            return value
        box = batch.box1 if value.dim() == 3 else batch.box1[:, None]
        return torch.where(box, value_mix, value)

    def forward_passes(self, batch: SemiBatch) -> CorrPasses:
        """The mix batch in eval mode without gradients, one pass of ``cat(x_l, x_w)`` with feature perturbation and
        one of the CutMixed strong view."""
        n = batch.x_l.shape[0]
        mix_logits = self.predict_eval(batch.x_w_mix)
        x_s = self.strong_view(batch.x_s1, batch.x_s1_mix, batch.box1)
        out = self.model(torch.cat([batch.x_l, batch.x_w]), perturb=True)
        out_s = self.model(x_s)
        logits_l, logits_w = out["logits"].split([n, batch.x_w.shape[0]])
        return CorrPasses(mix_logits, x_s, out, out_s, logits_l, logits_w, out["logits_fp"][n:], out_s["logits"])

    def weak_targets(self, batch: SemiBatch, p: CorrPasses) -> CorrTargets:
        """This step's threshold (updated first when dynamic, :meth:`current_threshold`, over the ignore mask
        ``threshold_ignore`` picks) and the weak and mix batches' pseudo-labels and confident masks."""
        ignore_s = self.cutmixed(batch, batch.ignore, batch.ignore_mix)
        thr_ignore = ignore_s if self.cfg.threshold_ignore == "mixed" else batch.ignore
        tau = self.current_threshold(p.logits_w, thr_ignore)
        weak = Targets(*pseudo_label(p.logits_w), batch.ignore)
        mix = Targets(*pseudo_label(p.mix_logits), batch.ignore_mix)
        q_w = weak.confident(tau)
        return CorrTargets(tau, thr_ignore, weak, mix, q_w, mix.confident(tau), weak.pseudo, q_w, ignore_s)

    def correlate(self, p: CorrPasses) -> Propagation:
        """The correlation head on both passes (Eqs. 4-5): the correlation maps and the propagated predictions z."""
        n, c = p.logits_l.shape[0], self.cfg
        feats = correlation_features(p.out, c.feature)
        corr_lw, z_lw = self.corr_head(feats, p.out["logits"])
        _, z_s = self.corr_head(correlation_features(p.out_s, c.feature), p.logits_s)
        z_l, z_w = z_lw.split([n, p.logits_w.shape[0]])
        return Propagation(corr_lw[n:].detach(), tuple(feats.shape[-2:]), z_l, z_w, z_s)

    def relabel_regions(self, batch: SemiBatch, t: CorrTargets, corr: Propagation) -> CorrTargets:
        """``t`` with the weak view's pseudo-label and confident mask after region propagation (Eqs. 7-10); the
        sampled rows and shapes are kept on ``corr``."""
        box = batch.box1 if self.cfg.cutmix else None
        pseudo, confident, corr.rows, corr.shapes = self.propagate_regions(corr.map, corr.size, t.weak, t.confident,
                                                                           t.tau, box)
        return dataclasses.replace(t, pseudo_prop=pseudo, confident_prop=confident)

    def strong_targets(self, batch: SemiBatch, t: CorrTargets) -> CorrTargets:
        """``t`` with the strong view's targets: the (propagated) weak ones, the mix batch's inside the CutMix box."""
        return dataclasses.replace(t, pseudo_s=self.cutmixed(batch, t.pseudo_prop, t.mix.pseudo),
                                   confident_s=self.cutmixed(batch, t.confident_prop, t.confident_mix))

    def soft_target(self, batch: SemiBatch, p: CorrPasses) -> Tensor:
        """The soft loss's teacher probabilities: the un-mixed weak softmax (reference), CutMixed with the mix
        batch's softmax when ``kl_target`` is ``mixed``."""
        probs = p.logits_w.detach().float().softmax(1)
        if self.cfg.kl_target == "mixed":
            probs = self.cutmixed(batch, probs, p.mix_logits.float().softmax(1))
        return probs

    def loss_terms(self, batch: SemiBatch, p: CorrPasses, t: CorrTargets, corr: Propagation | None
                   ) -> LossTerms:
        """The reference's terms ``(0.5 L_x + 0.5 L_x_corr + 0.25 L_s + 0.25 L_kl + 0.25 L_fp + 0.25 L_corr_u) / 2``
        as ``{name: (weight, value)}``, the halving folded into the weights."""
        c, weak = self.cfg, t.weak
        terms: LossTerms = {"loss_x": ((c.weight_x if corr is not None else c.weight_x + c.weight_x_corr) / 2,
                                       supervised_loss(c, p.logits_l, batch.y_l))}
        if c.hard_loss:
            terms["loss_s"] = (c.weight_hard / 2, masked_ce_loss(p.logits_s, t.pseudo_s, t.confident_s, t.ignore_s))
            terms["loss_fp"] = (c.weight_fp / 2, masked_ce_loss(p.logits_fp, weak.pseudo, t.confident, weak.ignore))
        if c.soft_loss:
            q_soft = self.cutmixed(batch, t.confident, t.confident_mix)   # confident mask *before* propagation
            terms["loss_kl"] = (c.weight_soft / 2,
                                masked_kl_loss(p.logits_s, self.soft_target(batch, p), q_soft, t.ignore_s))
        if corr is not None:
            terms["loss_x_corr"] = (c.weight_x_corr / 2, supervised_loss(c, corr.z_l, batch.y_l))
            corr_u = (masked_ce_loss(corr.z_s, t.pseudo_s, t.confident_s, t.ignore_s)
                      + masked_ce_loss(corr.z_w, weak.pseudo, t.confident, weak.ignore))
            terms["loss_corr_u"] = (c.weight_corr_u / 2, corr_u / 2)
        return terms

    def step_logs(self, batch: SemiBatch, s: CorrMatchStep) -> dict[str, Tensor | float]:
        """The terms, the threshold and the pseudo-label diagnostics (before and, with region propagation, after)."""
        t, k = s.targets, self.num_classes
        logs: dict[str, Tensor | float] = term_logs(s.terms)
        logs["threshold"] = s.threshold
        logs.update(pseudo_label_diagnostics(t.weak.pseudo, t.confident, t.weak.ignore, batch.y_u, k))
        if self.cfg.region_propagation:
            after = pseudo_label_diagnostics(t.pseudo_prop, t.confident_prop, t.weak.ignore, batch.y_u, k)
            logs.update({f"{key}_prop": v for key, v in after.items()})
        return logs

    def step_artifacts(self, batch: SemiBatch, s: CorrMatchStep) -> dict[str, Tensor]:
        """The captured tensors of a step (the weak-to-strong ones, propagation, correlation rows, LCR)."""
        p, t = s.passes, s.targets
        arts = self.capture(batch, t.weak, p.x_s, p.logits_s, confident=t.confident, threshold=s.threshold,
                            pred_fp=p.logits_fp.argmax(1))
        if self.cfg.region_propagation:
            arts.update(pseudo_prop=t.pseudo_prop, confident_prop=t.confident_prop)
        if s.corr is not None:
            arts.update(self.correlation_artifacts(s.corr), pred_corr_s=s.corr.z_s.argmax(1))
        if s.lcr is not None:
            arts.update(s.lcr.artifacts())
        return arts

    @torch.no_grad()
    def correlation_artifacts(self, corr: Propagation) -> dict[str, Tensor]:
        """The paper's Fig. 3 for the first ``capture_shapes`` sampled rows: ``corr_rows`` [B, m, h, w] (rows of the
        weak view's correlation map), ``corr_points`` [B, m] (their flat pixel indices) and, with region
        propagation, ``shapes`` [B, m, H, W] (as used, cleared of padding and the CutMix box). Without region
        propagation the rows are evenly spaced, so capturing draws nothing from the random generator."""
        cmap, size = corr.map, corr.size
        rows = corr.rows if corr.rows is not None else self.shape_rows(cmap.shape[0], cmap.shape[1], cmap.device,
                                                                        "uniform")
        m = min(self.cfg.capture_shapes, rows.shape[1])
        picked = cmap.gather(1, rows[:, :m, None].expand(-1, -1, cmap.shape[2]))
        arts = {"corr_rows": picked.reshape(*picked.shape[:2], *size), "corr_points": rows[:, :m]}
        if corr.shapes is not None:
            arts["shapes"] = corr.shapes[:, :m]
        return arts


@dataclass
class CorrPasses:
    """The forward passes of a CorrMatch step: the mix batch's eval-mode logits, the CutMixed strong view ``x_s``,
    the outputs ``out`` of cat(x_l, x_w) (with feature perturbation) and ``out_s`` of ``x_s``, and their logits."""

    mix_logits: Tensor
    x_s: Tensor
    out: dict[str, Tensor]
    out_s: dict[str, Tensor]
    logits_l: Tensor
    logits_w: Tensor
    logits_fp: Tensor
    logits_s: Tensor


@dataclass
class CorrTargets:
    """A step's threshold ``tau`` (and the ignore mask its update read), the weak / mix targets with their confident
    masks, the weak view's after region propagation (``*_prop``, the plain ones without it) and the strong view's
    (``*_s``: CutMixed, the mix batch's inside the box; set by :meth:`CorrMatch.strong_targets`)."""

    tau: Tensor | float
    threshold_ignore: Tensor
    weak: Targets
    mix: Targets
    confident: Tensor
    confident_mix: Tensor
    pseudo_prop: Tensor
    confident_prop: Tensor
    ignore_s: Tensor
    pseudo_s: Tensor | None = None
    confident_s: Tensor | None = None


@dataclass
class Propagation:
    """Pixel propagation: the weak view's correlation ``map`` [B, hw, hw] (detached) at feature ``size``, the
    propagated predictions ``z_l``, ``z_w``, ``z_s``; region propagation's sampled ``rows`` [B, M] and bool
    ``shapes`` [B, M, H, W] (None without it)."""

    map: Tensor
    size: tuple[int, int]
    z_l: Tensor
    z_w: Tensor
    z_s: Tensor
    rows: Tensor | None = None
    shapes: Tensor | None = None


@dataclass
class CorrMatchStep:
    """What :meth:`CorrMatch.stages` computed: passes, targets, pixel/region propagation (None without the
    correlation head), the loss ``terms`` ``{name: (weight, value)}`` (loss = sum of weight x value) and the LCR
    component's output (None when off)."""

    passes: CorrPasses
    targets: CorrTargets
    corr: Propagation | None
    terms: LossTerms
    lcr: LCROutput | None

    @property
    def threshold(self) -> Tensor:
        """The step's threshold as a detached float32 0-d tensor."""
        return torch.as_tensor(self.targets.tau, dtype=torch.float32, device=self.passes.logits_w.device).detach()


__all__ = ["CorrMatch", "CorrMatchConfig", "CorrMatchStep", "CorrPasses", "CorrTargets", "CorrelationHead",
           "Propagation", "FEATURE_POSITIONS", "correlation_features", "feature_channels"]
