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
   and ``L_x_corr`` the supervised loss of ``z_l``. Every unlabeled loss keeps the UniMatch normalisation (divided by the non-ignored pixels).

Two quirks of the authors' code are the defaults, each with a switch for the consistent variant:
``kl_target`` (the soft loss compares the CutMixed strong prediction with the *un-mixed* weak probabilities, so
inside the box the mix image's prediction is pulled towards another image's softmax) and ``threshold_ignore`` (the
dynamic threshold reads the un-mixed weak prediction through the *CutMixed* ignore mask).

Switches for the paper's ablations: Table 5 (``threshold`` dynamic/fixed, ``hard_loss``, ``soft_loss``, propagation
``P`` = ``pixel_propagation`` + ``region_propagation``), Table 6 (pixel, pixel + region), Table 7 (``feature``:
backbone / aspp / fusion / classifier) and Table 8 (``num_shapes``, ``sampling`` random / uniform).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workbench.methods.base import SemiBatch, StepInfo, StepOutput, register_method
from workbench.methods.fixmatch import FixMatchConfig, Targets, WeakStrong
from workbench.methods.supervised import supervised_loss
from workbench.ops import IGNORE
from workbench.ops.correlation import (correlation_map, pixel_propagation, region_propagation, sample_rows,
                                       shapes_from_rows)
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
    threshold: str = "dynamic"
    thresh_init: float = 0.85
    thresh_momentum: float = 0.999
    hard_loss: bool = True
    soft_loss: bool = True
    pixel_propagation: bool = True
    region_propagation: bool = True
    feature: str = "backbone"
    proj_channels: int = 256
    num_shapes: int = 128
    sampling: str = "random"
    weight_x: float = 0.5
    weight_x_corr: float = 0.5
    weight_hard: float = 0.25
    weight_soft: float = 0.25
    weight_fp: float = 0.25
    weight_corr_u: float = 0.25
    capture_shapes: int = 8
    kl_target: str = "unmixed"
    threshold_ignore: str = "mixed"

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [
            (self.threshold in ("dynamic", "fixed"), "threshold", "must be 'dynamic' or 'fixed'"),
            (0.0 <= self.thresh_init <= 1.0, "thresh_init", "must lie in [0, 1]"),
            (0.0 <= self.thresh_momentum <= 1.0, "thresh_momentum", "must lie in [0, 1]"),
            (0.0 <= self.tau <= 1.0, "tau", "must lie in [0, 1]"),
            (self.feature in FEATURE_POSITIONS, "feature", f"must be one of {', '.join(FEATURE_POSITIONS)}"),
            (self.proj_channels > 0, "proj_channels", "must be positive"),
            (self.num_shapes > 0, "num_shapes", "must be positive"),
            (self.sampling in ("random", "uniform"), "sampling", "must be 'random' or 'uniform'"),
            (self.capture_shapes >= 0, "capture_shapes", "must be >= 0"),
            (self.kl_target in ("unmixed", "mixed"), "kl_target", "must be 'unmixed' or 'mixed'"),
            (self.threshold_ignore in ("mixed", "unmixed"), "threshold_ignore", "must be 'mixed' or 'unmixed'"),
            (not self.region_propagation or self.pixel_propagation, "region_propagation",
             "needs the correlation map: set method.pixel_propagation=true or method.region_propagation=false"),
        ]
        self.check(checks)


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
        c, k = self.cfg, self.num_classes
        n = batch.x_l.shape[0]
        mix_logits = self.predict_eval(batch.x_w_mix)
        x_s = self.strong_view(batch.x_s1, batch.x_s1_mix, batch.box1)
        out = self.model(torch.cat([batch.x_l, batch.x_w]), perturb=True)
        out_s = self.model(x_s)
        logits_l, logits_w = out["logits"].split([n, batch.x_w.shape[0]])
        logits_fp, logits_s = out["logits_fp"][n:], out_s["logits"]
        def mixed(value: Tensor, value_mix: Tensor) -> Tensor:  # CutMix a per-pixel target like the images
            if not c.cutmix:
                return value
            box = batch.box1 if value.dim() == 3 else batch.box1[:, None]
            return torch.where(box, value_mix, value)

        ignore_s = mixed(batch.ignore, batch.ignore_mix)
        tau = self.current_threshold(logits_w, ignore_s if c.threshold_ignore == "mixed" else batch.ignore)
        weak = Targets(*pseudo_label(logits_w), batch.ignore)
        mix = Targets(*pseudo_label(mix_logits), batch.ignore_mix)
        q_w, q_mix = weak.confident(tau), mix.confident(tau)

        pseudo_p, q_p, corr = weak.pseudo, q_w, None
        if self.corr_head is not None:
            feats = correlation_features(out, c.feature)
            corr_lw, z_lw = self.corr_head(feats, out["logits"])
            _, z_s = self.corr_head(correlation_features(out_s, c.feature), logits_s)
            z_l, z_w = z_lw.split([n, batch.x_w.shape[0]])
            corr = {"map": corr_lw[n:].detach(), "size": tuple(feats.shape[-2:])}
            if c.region_propagation:
                pseudo_p, q_p, corr["rows"], corr["shapes"] = self.propagate_regions(
                    corr["map"], corr["size"], weak, q_w, tau, batch.box1 if c.cutmix else None)

        pseudo_s, q_s = mixed(pseudo_p, mix.pseudo), mixed(q_p, q_mix)
        terms: dict[str, tuple[float, Tensor]] = {
            "loss_x": (c.weight_x if self.corr_head is not None else c.weight_x + c.weight_x_corr,
                       supervised_loss(c, logits_l, batch.y_l))}
        if c.hard_loss:
            terms["loss_s"] = (c.weight_hard, masked_ce_loss(logits_s, pseudo_s, q_s, ignore_s))
            terms["loss_fp"] = (c.weight_fp, masked_ce_loss(logits_fp, weak.pseudo, q_w, weak.ignore))
        if c.soft_loss:
            probs_s = logits_w.detach().float().softmax(1)
            if c.kl_target == "mixed":
                probs_s = mixed(probs_s, mix_logits.float().softmax(1))
            terms["loss_kl"] = (c.weight_soft, masked_kl_loss(logits_s, probs_s, mixed(q_w, q_mix), ignore_s))
        if self.corr_head is not None:
            terms["loss_x_corr"] = (c.weight_x_corr, supervised_loss(c, z_l, batch.y_l))
            corr_u = masked_ce_loss(z_s, pseudo_s, q_s, ignore_s) + masked_ce_loss(z_w, weak.pseudo, q_w, weak.ignore)
            terms["loss_corr_u"] = (c.weight_corr_u, corr_u / 2)
        extra = self.component_losses(batch, weak, step)
        loss = sum(w * v for w, v in terms.values()) / 2 + sum(extra.values())

        threshold = torch.as_tensor(tau, dtype=torch.float32, device=logits_w.device).detach()
        logs: dict[str, Tensor | float] = {key: v.detach() for key, (_, v) in terms.items()}
        logs["threshold"] = threshold
        logs.update(pseudo_label_diagnostics(weak.pseudo, q_w, weak.ignore, batch.y_u, k))
        if c.region_propagation:
            after = pseudo_label_diagnostics(pseudo_p, q_p, weak.ignore, batch.y_u, k)
            logs.update({f"{key}_prop": v for key, v in after.items()})
        logs.update({key: v.detach() for key, v in extra.items()})
        arts: dict[str, Tensor] = {}
        if step.capture:
            arts = self.capture(batch, weak, x_s, logits_s, confident=q_w, threshold=threshold,
                                pred_fp=logits_fp.argmax(1))
            if c.region_propagation:
                arts.update(pseudo_prop=pseudo_p, confident_prop=q_p)
            if corr is not None:
                arts.update(self.correlation_artifacts(corr), pred_corr_s=z_s.argmax(1))
        return StepOutput(loss, logs, arts)

    @torch.no_grad()
    def correlation_artifacts(self, corr: dict[str, Any]) -> dict[str, Tensor]:
        """The paper's Fig. 3 for the first ``capture_shapes`` sampled rows: ``corr_rows`` [B, m, h, w] (rows of the
        weak view's correlation map), ``corr_points`` [B, m] (their flat pixel indices) and, with region
        propagation, ``shapes`` [B, m, H, W] (as used, cleared of padding and the CutMix box). Without region
        propagation the rows are evenly spaced, so capturing draws nothing from the random generator."""
        cmap, size = corr["map"], corr["size"]
        rows = corr["rows"] if "rows" in corr else self.shape_rows(cmap.shape[0], cmap.shape[1], cmap.device,
                                                                    "uniform")
        m = min(self.cfg.capture_shapes, rows.shape[1])
        picked = cmap.gather(1, rows[:, :m, None].expand(-1, -1, cmap.shape[2]))
        arts = {"corr_rows": picked.reshape(*picked.shape[:2], *size), "corr_points": rows[:, :m]}
        if "shapes" in corr:
            arts["shapes"] = corr["shapes"][:, :m]
        return arts


__all__ = ["CorrMatch", "CorrMatchConfig", "CorrelationHead", "FEATURE_POSITIONS", "correlation_features",
           "feature_channels"]
