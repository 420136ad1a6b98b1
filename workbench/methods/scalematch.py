"""ScaleMatch: cross-scale interaction fusion (CIF) and scale-variation consistency (ISVC, FSVC).

"ScaleMatch: Multi-scale Consistency Enhancement for Semi-supervised Semantic Segmentation" (Lv and Zhang, AAAI).
The default (``structure: reference``) trains as the authors' public code does (github.com/lvliang6879/ScaleMatch:
``ScaleMatch.py`` and the ``two_scale_forward`` of its DeepLabV3+), which differs from the paper's Eqs. 4-17;
``structure: paper`` is the paper's reading (below).

One training step, ``structure: reference`` (:func:`reference_two_scale`):

1. the mix batch is predicted in eval mode without gradients (its pseudo-labels fill the CutMix box, as in UniMatch);
2. an image scale ``v`` is drawn from ``scales`` (V = 0.25, 0.5, 1.5, 2.0; one per iteration, torch's global RNG)
   and a feature scale ``t`` from ``feature_scales_down`` (0.75) when ``v > 1``, else ``feature_scales_up`` (1.25);
3. ``cat(x_l, x_w)`` (labeled and weak images in one call, so BatchNorm sees both in every branch) is encoded once.
   The layer1 and layer4 features are resized by ``t`` (bilinear, align_corners=True, sizes floored) and decoded in
   ONE decoder pass over ``[resized, Dropout2d(model.fp_dropout = 0.5)(resized)]``: the clean half is the scale-1
   prediction ``pred_ori`` (upsampled to the crop), the dropout half ``pred_fp``. The unresized features are never
   decoded;
4. the images resized by ``v`` (bilinear, align_corners=True, sizes floored: 321 x 1.5 -> 481) get a plain forward,
   resized back to the crop: ``pred_size``;
5. **CIF** (:class:`ReferenceCIF`): at decoder-feature resolution, the decoder features of the LOWER-resolution input
   (``v > 1``: scale 1 (the ``t``-resized decode); ``v < 1``: scale ``v``) and of the higher one (resized to the
   lower one's size) give a gate ``g`` (resized to the crop), and ``pred_joint = g * p_lo + (1 - g) * p_hi``: the
   gate weights the lower-resolution prediction. ``fusion: average`` uses ``g = 1/2`` (Table 6's "Average Fusion");
   ``cif: false`` fuses nothing (``pred_ori`` takes ``pred_joint``'s place);
6. the labeled loss is the CE of ``pred_joint`` (so the CIF is trained with the GT);
7. pseudo-labels (argmax/max of the softmax) come from ``pred_ori`` during the first ``cif_warmup_epochs`` epochs
   (``StepInfo.epoch``), from ``pred_joint`` after;
8. ``L_s``: CE of the CutMixed strong view (one strong view) against the CutMixed targets; ``L_ISVC``: CE of
   ``pred_size``; ``L_FSVC``: CE of ``pred_fp`` (unlabeled halves, against the pseudo-label). All three are
   confidence-masked (``tau``, the confidence of the pseudo-label's source) and normalised by the non-ignored pixels;
9. ``loss = (w_x L_x + w_s L_s + w_isvc L_ISVC + w_fsvc L_FSVC) / 2`` (1, 0.25, 0.25, 0.5 and the halving as in the
   reference code), plus the opt-in components of every weak-to-strong method (LCR).

``fsvc: false`` (reference) decodes the unresized features once (``t = 1``, no dropout half): the scale-1
prediction is then the plain one.

``structure: paper`` (the paper's reading; the behaviour of earlier versions of this module,
:func:`paper_two_scale`): the scale-1 prediction is decoded from the UNRESIZED features; the scale-``v`` decoder
features are resized to the scale-1 ones and fused by :class:`CrossScaleFusion` (1x1 compress, Vision-RWKV,
LayerNorm, resize to the crop, SE, depthwise conv, ``s_w = sigmoid(conv1x1(relu(bn(.))))``); Eq. 12's gate
``fused = s_w * logits_1 + (1 - s_w) * logits_v`` always weights the scale-1 prediction; FSVC decodes the ``t``-resized
features of the weak view only (a separate decoder pass of ``[resized, dropout(resized)]``).

Ablations (both structures): Table 4 = ``isvc`` / ``fsvc`` / ``cif``; Table 5 = ``scales`` (and
``scale_sampling: uniform`` for the "[0.5, 2.0] random" row; ``scale_sampling: all`` = multi-resolution input, every
scale every iteration, losses and fused logits averaged over scales, ``t`` from the largest scale); Table 6 = ``cif``
/ ``fusion`` / ``cif_warmup_epochs``.

**Tiny crops**: a scaled image side is ``max(min_scaled_size, floor(side * v))``: with the default 16 px, a 32-px crop
at v = 0.25 is predicted at 16 px (the effective scale is then 0.5), so the backbone never sees a map smaller than
2 x 2 at output stride 8. Inactive at the papers' crops (321 x 0.25 = 80 px). Feature maps resized by ``t`` keep at
least one cell.

**Inference (the paper's dagger rows)**: ``eval.mode: cif_multiscale`` with ``eval.scales: [0.5, 2.0]``, the
evaluation mode this method provides (:data:`CIF_EVAL_MODE`, registered in :mod:`workbench.registry`); the
evaluation opens :func:`cif_multiscale_inference` and the :class:`ScaleMatchPredictor` then returns, for every image,
the mean over the extra scales ``v`` of the fused prediction of scale 1 and scale ``v``. The authors' public code
evaluates the plain prediction only; with ``structure: reference`` the predictor runs the training-time two-scale
forward in eval mode (``t`` from ``v`` by the training rule, first entry of each list; no dropout half), so the CIF
sees the inputs it was trained on.

Logs and artifacts: ``gate_mean`` and ``gate_w`` are the weight of the SCALE-1 prediction in both structures (the
reference gate ``g`` when ``v > 1``, ``1 - g`` when ``v < 1``). Artifacts (``step.capture``), besides the
weak-to-strong ones (``pseudo`` is the pseudo-label used): ``scale`` [S] (the scales of this step),
``feature_scale`` [1], ``pred_w`` [B, H, W] (scale-1 prediction), ``pred_v`` [B, S, H, W] (scale-v predictions resized
back), ``gate_w`` [B, S, H, W] (with fusion), ``pseudo_fused``, ``pseudo_plain`` [B, H, W] (with fusion) and
``pred_fsvc`` [B, H, W] (with FSVC).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workbench.config import bounded
from workbench.methods.base import LossTerms, SemiBatch, StepInfo, StepOutput, register_method, term_logs, weighted_sum
from workbench.methods.components import LCROutput
from workbench.methods.fixmatch import FixMatchConfig, Targets, WeakStrong
from workbench.methods.supervised import supervised_loss
from workbench.ops import IGNORE
from workbench.ops.ensemble import rescale, resize_logits, scaled_size
from workbench.ops.host import host_scalar
from workbench.ops.rwkv import VisionRWKV
from workbench.ops.semi import pseudo_label
from workbench.registry import EvalMode, register_eval_mode

__all__ = ["CIFInferenceRequest", "CIF_EVAL_MODE", "CrossScaleFusion", "ReferenceCIF", "ScaleMatch", "ScaleMatchConfig",
           "ScaleMatchPredictor", "ScaleMatchStep", "ScalePass", "ScalePseudoLabels", "SqueezeExcite",
           "cif_multiscale_inference", "fsvc_logits", "fuse_predictions",
           "gated_fusion", "paper_two_scale", "reference_fusion", "reference_two_scale", "resized_feature_size",
           "scaled_image", "scaled_image_size", "cif_eval_scales"]

SCALE_SAMPLING = ("choice", "uniform", "all")
FUSIONS = ("cif", "average")
STRUCTURES = ("reference", "paper")


# ---------------------------------------------------------------- pure helpers


def gated_fusion(s_w: Tensor, logits_w: Tensor, logits_vw: Tensor) -> tuple[Tensor, Tensor]:
    """Eq. 12: ``(s_w * logits_w + s_v * logits_vw, s_v)`` with ``s_v = 1 - s_w``.

    ``s_w`` [B, 1, H, W] (or a float) broadcasts over the classes of ``logits_w``/``logits_vw`` [B, K, H, W].
    """
    if logits_w.shape != logits_vw.shape:
        raise ValueError(f"logits_w {tuple(logits_w.shape)} and logits_vw {tuple(logits_vw.shape)} must match")
    s_v = 1 - s_w
    return s_w * logits_w + s_v * logits_vw, s_v


def scaled_image_size(size: Sequence[int], scale: float, min_size: int = 16) -> tuple[int, int]:
    """``(max(min_size, floor(H * scale)), max(min_size, floor(W * scale)))`` for ``size = (H, W)``: the package's
    scaling rule (:func:`workbench.ops.ensemble.scaled_size`) with the floor of ``F.interpolate(scale_factor=scale)``,
    as in the reference code (321 x 1.5 -> 481)."""
    return scaled_size(size, scale, "floor", min_size)


def scaled_image(x: Tensor, scale: float, min_size: int = 16) -> Tensor:
    """Images [B, 3, H, W] resized bilinearly (align_corners=True) to :func:`scaled_image_size`."""
    return rescale(x, scale, "floor", min_size)


def resized_feature_size(size: Sequence[int], scale: float) -> tuple[int, int]:
    """A feature map's size after a resize by ``scale``: ``max(1, floor(side * scale))`` per side."""
    return scaled_size(size, scale, "floor")


def _resize_features(f: Tensor, scale: float) -> Tensor:
    return rescale(f, scale, "floor")


# ---------------------------------------------------------------- the CIF modules


class SqueezeExcite(nn.Module):
    """Channel attention: ``x * sigmoid(conv(relu(conv(avgpool(x)))))`` with ``channels // reduction`` hidden
    (1x1 convs with bias)."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True),
                                nn.Conv2d(hidden, channels, 1), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, C, H, W] (each channel rescaled by its attention weight)."""
        return x * self.fc(x)


def _check_positive_ints(**values: Any) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive int, got {value!r}")


class ReferenceCIF(nn.Module):
    """CIF as the authors' public code builds it (``structure: reference``), for decoder features of ``C`` channels
    per scale (``C = 256`` for DeepLabV3+; the channel counts follow ``C``, so narrow test models work too):

    - ``cat([feats_lo, feats_hi])`` (``2C`` = 512 channels; ``feats_hi`` resized bilinearly to ``feats_lo``'s size),
      where "lo" is the LOWER-resolution input;
    - 1x1 conv ``2C -> D`` without bias + BN + ReLU, ``D = 2C / 16`` (32);
    - tokens through ``depth`` (1) Vision-RWKV blocks of width ``D``: pre-LayerNorm (eps 1e-6) before the spatial
      mix and before the channel mix, Q-Shift (shift 1, channel gamma 1/4), channel-mix hidden ratio 4, no key norm,
      learned layer scales initialised to 0.01 on both residual branches, no input norm; the exact linear-time
      bidirectional WKV of :func:`workbench.ops.rwkv.wkv`;
    - LayerNorm (eps 1e-6), back to a map (``D`` channels);
    - SE (reduction 16, 1x1 convs with bias) over ``cat([2C inputs, D RWKV outputs])`` (``2C + D`` = 544 channels);
    - gate: depthwise 3x3 (``2C + D``) + BN + ReLU, 1x1 ``2C + D -> C/2`` (128) + BN + ReLU, depthwise 3x3 (``C/2``)
      + BN + ReLU, 1x1 ``C/2 -> 1`` without bias, sigmoid; computed at feature resolution and resized bilinearly
      (align_corners=True) to the prediction size.

    The fusion ``g * p_lo + (1 - g) * p_hi`` is :func:`reference_fusion`.

    Args:
        in_channels: ``C``, the decoder width of one scale.
        depth: Vision-RWKV blocks (1 in the reference code).
        chunk: WKV chunk length (numerics only; see :func:`workbench.ops.rwkv.wkv`).
        dim: RWKV width ``D`` (None: ``max(1, 2C // 16)``).
        se_reduction: SE reduction (16).
    """

    def __init__(self, in_channels: int, depth: int = 1, chunk: int = 16, dim: int | None = None,
                 se_reduction: int = 16) -> None:
        super().__init__()
        dim = max(1, 2 * in_channels // 16) if dim is None else dim
        _check_positive_ints(in_channels=in_channels, depth=depth, dim=dim, se_reduction=se_reduction)
        cat, hidden = 2 * in_channels, max(1, in_channels // 2)
        mixed = cat + dim
        self.in_channels, self.dim, self.mixed_channels, self.gate_channels = in_channels, dim, mixed, hidden
        self.compress = nn.Sequential(nn.Conv2d(cat, dim, 1, bias=False), nn.BatchNorm2d(dim), nn.ReLU(inplace=True))
        self.rwkv = VisionRWKV(dim, depth, chunk, hidden_rate=4.0, eps=1e-6, layer_scale=0.01, input_norm=False)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.attention = SqueezeExcite(mixed, se_reduction)
        self.gate = nn.Sequential(
            nn.Conv2d(mixed, mixed, 3, padding=1, groups=mixed, bias=False), nn.BatchNorm2d(mixed),
            nn.ReLU(inplace=True),
            nn.Conv2d(mixed, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 1, 1, bias=False), nn.Sigmoid())

    def gate_map(self, feats_lo: Tensor, feats_hi: Tensor, size: Sequence[int]) -> Tensor:
        """The gate ``g`` [B, 1, *size] in (0, 1) (the weight of the lower-resolution prediction) from decoder
        features ``feats_lo`` [B, C, h, w] and ``feats_hi`` [B, C, h', w'] (resized to h x w first)."""
        if feats_lo.dim() != 4 or feats_hi.dim() != 4 or feats_lo.shape[:2] != feats_hi.shape[:2] \
                or feats_lo.shape[1] != self.in_channels:
            raise ValueError(f"feats_lo and feats_hi must be [B, {self.in_channels}, h, w] with equal B, got "
                             f"{tuple(feats_lo.shape)} and {tuple(feats_hi.shape)}")
        h, w = feats_lo.shape[-2:]
        if feats_hi.shape[-2:] != (h, w):
            feats_hi = F.interpolate(feats_hi, size=(h, w), mode="bilinear", align_corners=True)
        cat = torch.cat([feats_lo, feats_hi], 1)
        e = self.compress(cat)
        b, d = e.shape[:2]
        tokens = self.norm(self.rwkv(e.flatten(2).transpose(1, 2), (h, w)))
        e = tokens.transpose(1, 2).reshape(b, d, h, w)
        g = self.gate(self.attention(torch.cat([cat, e], 1)))
        if tuple(g.shape[-2:]) != tuple(size):
            g = F.interpolate(g, size=tuple(size), mode="bilinear", align_corners=True)
        return g

    def forward(self, feats_lo: Tensor, feats_hi: Tensor, p_lo: Tensor, p_hi: Tensor) -> tuple[Tensor, Tensor]:
        """(``g * p_lo + (1 - g) * p_hi`` [B, K, H, W], ``g`` [B, 1, H, W]) for logits of both inputs at one size."""
        if p_lo.shape != p_hi.shape:
            raise ValueError(f"p_lo {tuple(p_lo.shape)} and p_hi {tuple(p_hi.shape)} must match")
        g = self.gate_map(feats_lo, feats_hi, p_lo.shape[-2:])
        return g * p_lo + (1 - g) * p_hi, g


class CrossScaleFusion(nn.Module):
    """CIF as the paper reads (``structure: paper``; Fig. 3): VCFI (concat, 1x1 compress, Vision-RWKV, LayerNorm)
    and SAG (resize, SE, depthwise conv, gate ``s_w`` of the scale-1 prediction, Eqs. 6-12).

    Args:
        in_channels: channels of the decoder features of each scale.
        dim: width after the 1x1 compression (the Vision-RWKV width).
        depth: Vision-RWKV blocks.
        chunk: WKV chunk length (see :func:`workbench.ops.rwkv.wkv`).
        se_reduction: channel-attention reduction.
    """

    def __init__(self, in_channels: int, dim: int = 64, depth: int = 1, chunk: int = 16, se_reduction: int = 4
                 ) -> None:
        super().__init__()
        _check_positive_ints(in_channels=in_channels, dim=dim, depth=depth, se_reduction=se_reduction)
        self.compress = nn.Conv2d(2 * in_channels, dim, 1)
        self.rwkv = VisionRWKV(dim, depth, chunk)
        self.norm = nn.LayerNorm(dim)
        self.attention = SqueezeExcite(dim, se_reduction)
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.gate = nn.Sequential(nn.BatchNorm2d(dim), nn.ReLU(inplace=True), nn.Conv2d(dim, 1, 1))

    def gate_map(self, feat_w: Tensor, feat_v: Tensor, size: Sequence[int]) -> Tensor:
        """``s_w`` [B, 1, *size] in (0, 1) from the scale-1 features ``feat_w`` [B, C, h, w] and the scale-v features
        ``feat_v`` [B, C, h_v, w_v] (resized to h x w first, Eq. 6)."""
        if feat_w.dim() != 4 or feat_v.dim() != 4 or feat_w.shape[:2] != feat_v.shape[:2]:
            raise ValueError(f"feat_w and feat_v must be [B, C, h, w] with equal B and C, got "
                             f"{tuple(feat_w.shape)} and {tuple(feat_v.shape)}")
        h, w = feat_w.shape[-2:]
        if feat_v.shape[-2:] != (h, w):
            feat_v = F.interpolate(feat_v, size=(h, w), mode="bilinear", align_corners=True)
        e = self.compress(torch.cat([feat_w, feat_v], 1))                         # Eqs. 7-8
        b, d = e.shape[:2]
        tokens = self.norm(self.rwkv(e.flatten(2).transpose(1, 2), (h, w)))      # Eq. 9
        e = tokens.transpose(1, 2).reshape(b, d, h, w)
        e = F.interpolate(e, size=tuple(size), mode="bilinear", align_corners=True)
        e = self.dwconv(self.attention(e))                                         # Eq. 10
        return torch.sigmoid(self.gate(e))                                         # Eq. 11

    def forward(self, feat_w: Tensor, feat_v: Tensor, logits_w: Tensor, logits_vw: Tensor) -> tuple[Tensor, Tensor]:
        """(fused logits [B, K, H, W] (Eq. 12), ``s_w`` [B, 1, H, W]) for logits of both scales at the crop size."""
        s_w = self.gate_map(feat_w, feat_v, logits_w.shape[-2:])
        return gated_fusion(s_w, logits_w, logits_vw)[0], s_w


def fuse_predictions(cif: CrossScaleFusion | None, feat_w: Tensor, logits_w: Tensor,
                     branches: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, list[Tensor]]:
    """``structure: paper``: fuse the scale-1 prediction with each scale-v branch ``(logits_vw, feat_v)`` and
    average over branches.

    ``cif`` None = average fusion (``s_w = 1/2``). Returns (fused logits [B, K, H, W], the gates ``s_w`` per branch,
    each [B, 1, H, W]).
    """
    if not branches:
        raise ValueError("fusion needs at least one scale-v branch")
    fused, gates = [], []
    for logits_vw, feat_v in branches:
        if cif is None:
            s_w = torch.full_like(logits_w[:, :1], 0.5)
            f = gated_fusion(s_w, logits_w, logits_vw)[0]
        else:
            f, s_w = cif(feat_w, feat_v, logits_w, logits_vw)
        fused.append(f)
        gates.append(s_w)
    return (fused[0] if len(fused) == 1 else torch.stack(fused).mean(0)), gates


def reference_fusion(cif: ReferenceCIF | None, scale: float, feat_1: Tensor, feat_v: Tensor, logits_1: Tensor,
                     logits_v: Tensor) -> tuple[Tensor, Tensor]:
    """``structure: reference``: fuse the scale-1 and the scale-``scale`` predictions (logits at one size, decoder
    features at their own sizes). The lower-resolution input is scale 1 when ``scale > 1``, scale ``v`` otherwise;
    ``pred_joint = g * p_lo + (1 - g) * p_hi`` with ``g`` from ``cif`` (None: ``g = 1/2``, average fusion).

    Returns (``pred_joint`` [B, K, H, W], ``s_w`` [B, 1, H, W] = the weight of the SCALE-1 prediction: ``g`` when
    ``scale > 1``, ``1 - g`` otherwise).
    """
    if logits_1.shape != logits_v.shape:
        raise ValueError(f"logits_1 {tuple(logits_1.shape)} and logits_v {tuple(logits_v.shape)} must match")
    one_is_lo = scale > 1
    (f_lo, p_lo), (f_hi, p_hi) = ((feat_1, logits_1), (feat_v, logits_v)) if one_is_lo else \
        ((feat_v, logits_v), (feat_1, logits_1))
    if cif is None:
        g = torch.full_like(logits_1[:, :1], 0.5)
        joint = g * p_lo + (1 - g) * p_hi
    else:
        joint, g = cif(f_lo, f_hi, p_lo, p_hi)
    return joint, (g if one_is_lo else 1 - g)


# ---------------------------------------------------------------- the two-scale forward passes


@dataclass
class ScalePass:
    """What one two-scale forward computed for a batch ``x`` [B, 3, H, W] (logits at H x W)."""

    pred_ori: Tensor
    """[B, K, H, W] the scale-1 prediction (reference: decoded from the t-resized features)"""
    pred_fp: Tensor | None
    """the Dropout2d-perturbed, t-resized decode [B_fp, K, H, W] (reference: the whole batch; paper: the images from
    ``fp_from`` on); None without FSVC"""
    pred_size: list[Tensor] = field(default_factory=list)
    """per scale branch [B, K, H, W]: the scale-v prediction resized back"""
    pred_joint: Tensor | None = None
    """[B, K, H, W] the fused prediction (mean over branches); None without fusion"""
    gates: list[Tensor] = field(default_factory=list)
    """per branch [B, 1, H, W]: the weight of the scale-1 prediction in the fusion"""
    scaled_sizes: list[tuple[int, int]] = field(default_factory=list)
    """per branch: the scaled image size"""
    feature_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    """encoder feature sizes ``low`` / ``high`` and (t-resized) ``low @ t`` / ``high @ t``"""


def _sizes(feats: dict[str, Tensor], t: float | None) -> dict[str, tuple[int, int]]:
    out = {k: (int(feats[k].shape[-2]), int(feats[k].shape[-1])) for k in ("low", "high")}
    if t is not None:
        out.update({f"{k} @ t": resized_feature_size(out[k], t) for k in ("low", "high")})
    return out


def reference_two_scale(model: nn.Module, cif: ReferenceCIF | None, x: Tensor, scales: Sequence[float], t: float,
                        *, fusion: str | None, branches: bool, perturb: bool, min_size: int = 16) -> ScalePass:
    """The authors' two-scale forward (module docstring, steps 3-5) for images ``x``.

    Args:
        model: a DeepLabV3+ (``encode``, ``decode``, ``fp_dropout``).
        cif: the :class:`ReferenceCIF` (used when ``fusion == "cif"``).
        scales: the image scales ``v`` (one branch each).
        t: the feature scale of the scale-1 decode (1.0 = unresized).
        fusion: ``"cif"``, ``"average"`` or None (no fusion).
        branches: whether to predict the scaled images (needed by ISVC and by the fusion).
        perturb: whether the decoder pass also decodes the Dropout2d copy (``pred_fp``).
        min_size: smallest scaled image side.
    """
    if fusion is not None and not branches:
        raise ValueError("fusion needs the scale branches (branches=True)")
    if fusion == "cif" and cif is None:
        raise ValueError("fusion 'cif' needs a ReferenceCIF module")
    size = tuple(x.shape[-2:])
    feats = model.encode(x)
    low, high = _resize_features(feats["low"], t), _resize_features(feats["high"], t)
    pred_fp = None
    if perturb:
        p = float(getattr(model, "fp_dropout", 0.5))
        out = model.decode({"low": torch.cat([low, F.dropout2d(low, p, training=True)]),
                            "high": torch.cat([high, F.dropout2d(high, p, training=True)])}, size)
        pred_ori, pred_fp = out["logits"].chunk(2)
        dec_1 = out["decoder"].chunk(2)[0]
    else:
        out = model.decode({"low": low, "high": high}, size)
        pred_ori, dec_1 = out["logits"], out["decoder"]
    sp = ScalePass(pred_ori, pred_fp, feature_sizes=_sizes(feats, t))
    joints = []
    if branches:
        for v in scales:
            xv = scaled_image(x, v, min_size)
            sp.scaled_sizes.append((int(xv.shape[-2]), int(xv.shape[-1])))
            out_v = model(xv)
            pv = resize_logits(out_v["logits"], size)
            sp.pred_size.append(pv)
            if fusion is not None:
                joint, s_w = reference_fusion(cif if fusion == "cif" else None, v, dec_1, out_v["decoder"],
                                              pred_ori, pv)
                joints.append(joint)
                sp.gates.append(s_w)
    if joints:
        sp.pred_joint = joints[0] if len(joints) == 1 else torch.stack(joints).mean(0)
    return sp


def paper_two_scale(model: nn.Module, cif: CrossScaleFusion | None, x: Tensor, scales: Sequence[float],
                    t: float | None, *, fusion: str | None, branches: bool, fp_from: int = 0, min_size: int = 16
                    ) -> ScalePass:
    """The paper's reading (``structure: paper``): scale 1 decoded from the unresized features, Eq. 12's gate
    (:func:`fuse_predictions`), and FSVC (``t`` not None) as a separate decode of the t-resized features of
    ``x[fp_from:]`` jointly with their Dropout2d copy (the perturbed half is ``pred_fp``)."""
    if fusion is not None and not branches:
        raise ValueError("fusion needs the scale branches (branches=True)")
    if fusion == "cif" and cif is None:
        raise ValueError("fusion 'cif' needs a CrossScaleFusion module")
    size = tuple(x.shape[-2:])
    feats = model.encode(x)
    out = model.decode(feats, size)
    sp = ScalePass(out["logits"], None, feature_sizes=_sizes(feats, t))
    pairs: list[tuple[Tensor, Tensor]] = []
    if branches:
        for v in scales:
            xv = scaled_image(x, v, min_size)
            sp.scaled_sizes.append((int(xv.shape[-2]), int(xv.shape[-1])))
            out_v = model(xv)
            pairs.append((resize_logits(out_v["logits"], size), out_v["decoder"]))
        sp.pred_size = [lv for lv, _ in pairs]
    if fusion is not None:
        sp.pred_joint, sp.gates = fuse_predictions(cif if fusion == "cif" else None, out["decoder"], out["logits"],
                                                   pairs)
    if t is not None:
        p = float(getattr(model, "fp_dropout", 0.5))
        both = {}
        for key in ("low", "high"):
            f = _resize_features(feats[key][fp_from:], t)
            both[key] = torch.cat([f, F.dropout2d(f, p, training=True)])
        sp.pred_fp = model.decode(both, size)["logits"].chunk(2)[1]
    return sp


# ---------------------------------------------------------------- CIF multi-scale inference


@dataclass
class CIFInferenceRequest:
    """An open ``cif_multiscale`` evaluation: the extra scales to fuse with scale 1, and how many predictor calls
    served it (0 after a call = the network evaluated has no CIF)."""

    scales: tuple[float, ...]
    served: int = 0


_CIF_REQUEST: ContextVar[CIFInferenceRequest | None] = ContextVar("cif_inference_request", default=None)


@contextlib.contextmanager
def cif_multiscale_inference(scales: Sequence[float]) -> Iterator[CIFInferenceRequest]:
    """Within this context a :class:`ScaleMatchPredictor` returns CIF-fused multi-scale logits (``scales`` = the
    extra scales fused with scale 1; the paper uses 0.5 and 2.0). Yields the request (check ``served``)."""
    scales = tuple(float(s) for s in scales)
    if not scales or not all(s > 0 for s in scales):
        raise ValueError(f"scales must be a non-empty sequence of positive numbers, got {scales!r}")
    request = CIFInferenceRequest(scales)
    token = _CIF_REQUEST.set(request)
    try:
        yield request
    finally:
        _CIF_REQUEST.reset(token)


def cif_eval_scales(settings: Any) -> tuple[float, ...]:
    """The scales ``eval.mode=cif_multiscale`` fuses with scale 1: ``settings.scales`` without the entries 1.0."""
    return tuple(float(s) for s in settings.scales if s != 1.0)


def _check_cif_eval(settings: Any) -> tuple[str, str] | None:
    """Why ``settings`` cannot serve ``cif_multiscale`` (no scale other than 1), None when they can."""
    if cif_eval_scales(settings):
        return None
    return ("scales", "mode 'cif_multiscale' fuses scale 1 with the other scales listed here; give at least one "
                      f"scale other than 1.0 (the paper: (0.5, 2.0)), got {tuple(settings.scales)!r}")


CIF_EVAL_MODE = EvalMode(
    "cif_multiscale",
    requirement="a method with a CIF module (method.name=scalematch with method.cif=true and method.fusion=cif)",
    owners=("scalematch",), open=lambda settings: cif_multiscale_inference(cif_eval_scales(settings)),
    check=_check_cif_eval)
"""ScaleMatch's evaluation mode (the paper's dagger rows): every image predicted whole by the
:class:`ScaleMatchPredictor` inside :func:`cif_multiscale_inference`."""
register_eval_mode(CIF_EVAL_MODE)


class ScaleMatchPredictor(nn.Module):
    """What ScaleMatch evaluates: the student's plain prediction, or inside :func:`cif_multiscale_inference` the mean
    over the requested scales ``v`` of the CIF fusion of the scale-1 and scale-v predictions (scaled images as in
    training: :func:`scaled_image` with ``min_size``). The fused logits replace ``"logits"``; the plain ones are
    kept as ``"logits_plain"``.

    Args:
        model: the student.
        cif: the method's CIF module: a :class:`ReferenceCIF` runs :func:`reference_two_scale` per scale (eval mode,
            no dropout half, ``t = feature_scale(v)``); a :class:`CrossScaleFusion` fuses the plain scale-1
            prediction with each scale-v one (:func:`fuse_predictions`).
        min_size: smallest scaled image side.
        feature_scale: ``v -> t`` for the reference structure (default: 0.75 when ``v > 1``, else 1.25).
    """

    def __init__(self, model: nn.Module, cif: CrossScaleFusion | ReferenceCIF, min_size: int = 16,
                 feature_scale: Any = None) -> None:
        super().__init__()
        self.model = model
        self.cif = cif
        self.min_size = min_size
        self.feature_scale = feature_scale or (lambda v: 0.75 if v > 1 else 1.25)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Predict images ``x`` [B, 3, H, W] (dict with ``"logits"`` [B, K, H, W] and the model's features)."""
        out = self.model(x)
        request = _CIF_REQUEST.get()
        if request is None:
            return out
        request.served += 1
        if isinstance(self.cif, ReferenceCIF):
            joints = [reference_two_scale(self.model, self.cif, x, (v,), self.feature_scale(v), fusion="cif",
                                          branches=True, perturb=False, min_size=self.min_size).pred_joint
                      for v in request.scales]
            fused = joints[0] if len(joints) == 1 else torch.stack(joints).mean(0)
            return {**out, "logits": fused, "logits_plain": out["logits"]}
        size = x.shape[-2:]
        branches = []
        for v in request.scales:
            out_v = self.model(scaled_image(x, v, self.min_size))
            branches.append((resize_logits(out_v["logits"], size), out_v["decoder"]))
        fused, _ = fuse_predictions(self.cif, out["decoder"], out["logits"], branches)
        return {**out, "logits": fused, "logits_plain": out["logits"]}


# ---------------------------------------------------------------- the method


@dataclass
class ScaleMatchConfig(FixMatchConfig):
    """ScaleMatch (module docstring).

    ``structure``: ``reference`` (default: the authors' public code, ``two_scale_forward``: the scale-1 prediction
    decoded only from the t-resized encoder features, jointly with the FSVC dropout copy; the labeled images in
    every branch; :class:`ReferenceCIF`, whose gate weights the LOWER-resolution prediction) or ``paper`` (the
    paper's reading, Eqs. 4-17: scale 1 decoded from the unresized features, :class:`CrossScaleFusion` with Eq. 12's
    gate on the scale-1 prediction, FSVC a separate decode of the weak view's t-resized features; a departure from
    the code, off by default);
    ``tau`` 0.95; ``scales`` V; ``scale_sampling``: ``choice`` (one scale of V per iteration, as the reference code),
    ``uniform`` (one scale uniform in [min V, max V]) or ``all`` (every scale each iteration: the multi-resolution
    input baseline of Table 5); ``feature_scales_down`` / ``feature_scales_up``: the feature factors t drawn from
    when the image scale is > 1 / <= 1 (0.75 / 1.25 as the reference code); ``isvc``, ``fsvc``, ``cif`` switch the
    components (Table 4); ``fusion`` ``cif`` or ``average`` (Table 6); ``cif_warmup_epochs`` before pseudo-labels
    come from the fusion (10); ``weight_*`` the loss weights (the total is halved); ``min_scaled_size`` the smallest
    scaled image side (px; a guard for tiny crops, inactive at the papers' crops);
    ``cif_depth`` (1), ``cif_chunk`` (WKV chunk, numerics only), ``cif_dim`` and ``cif_se_reduction`` shape the CIF:
    None = the structure's own (reference: ``2C / 16`` channels and 16 for a decoder of ``C`` channels, i.e. 32 and
    16 for DeepLabV3+; paper: 64 and 4)."""

    name: str = "scalematch"
    structure: Literal["reference", "paper"] = "reference"
    tau: float = 0.95
    scales: tuple[float, ...] = bounded((0.25, 0.5, 1.5, 2.0), gt=0)
    scale_sampling: Literal["choice", "uniform", "all"] = "choice"
    feature_scales_down: tuple[float, ...] = bounded((0.75,), gt=0)
    feature_scales_up: tuple[float, ...] = bounded((1.25,), gt=0)
    isvc: bool = True
    fsvc: bool = True
    cif: bool = True
    fusion: Literal["cif", "average"] = "cif"
    cif_warmup_epochs: int = bounded(10, ge=0)
    weight_x: float = bounded(1.0, ge=0)
    weight_s: float = bounded(0.25, ge=0)
    weight_isvc: float = bounded(0.25, ge=0)
    weight_fsvc: float = bounded(0.5, ge=0)
    min_scaled_size: int = bounded(16, ge=1)
    cif_dim: int | None = bounded(None, ge=1)
    cif_depth: int = bounded(1, ge=1)
    cif_chunk: int = bounded(16, ge=2)
    cif_se_reduction: int | None = bounded(None, ge=1)

    def cross_checks(self) -> list[tuple[bool, str, str]]:
        nonempty = "must be a non-empty list of positives"
        return [*super().cross_checks(), (len(self.scales) > 0, "scales", nonempty),
                (len(self.feature_scales_down) > 0, "feature_scales_down", nonempty),
                (len(self.feature_scales_up) > 0, "feature_scales_up", nonempty)]

    eval_modes: ClassVar[tuple[str, ...]] = ("cif_multiscale",)

    def provides_eval_mode(self, mode: str) -> bool:
        """``cif_multiscale`` needs the CIF module (:attr:`has_cif`)."""
        return mode == "cif_multiscale" and self.has_cif

    @property
    def has_cif(self) -> bool:
        """Whether the method owns a CIF module (fusion on and learned): what ``eval.mode=cif_multiscale`` needs."""
        return self.cif and self.fusion == "cif"

    @property
    def scale_branch(self) -> bool:
        """Whether a step predicts the scaled images (needed by ISVC and by the fusion)."""
        return self.isvc or self.cif

    @property
    def fusion_mode(self) -> str | None:
        """``"cif"``, ``"average"`` or None (``cif: false``)."""
        return self.fusion if self.cif else None

    def feature_scale_for(self, scale: float) -> float:
        """The deterministic ``v -> t`` rule used at inference: the first entry of ``feature_scales_down`` when
        ``scale > 1``, else of ``feature_scales_up``."""
        return (self.feature_scales_down if scale > 1 else self.feature_scales_up)[0]


def decoder_channels(model: nn.Module) -> int:
    """Channels of a DeepLabV3+ model's decoder features (``model.head.channels``); TypeError otherwise."""
    try:
        return int(model.head.channels)
    except AttributeError:
        raise TypeError(f"ScaleMatch's CIF needs a DeepLabV3Plus (head.channels), got {type(model).__name__}") from None


@register_method
class ScaleMatch(WeakStrong):
    """ScaleMatch: FixMatch-style weak-to-strong + ISVC + FSVC + CIF-fused pseudo-labels (teacher = student)."""

    name = "scalematch"
    config_class = ScaleMatchConfig
    cfg: ScaleMatchConfig

    def __init__(self, model: nn.Module, cfg: ScaleMatchConfig, num_classes: int) -> None:
        super().__init__(model, cfg, num_classes)
        self.cif: CrossScaleFusion | ReferenceCIF | None = None
        if cfg.has_cif:
            channels = decoder_channels(model)
            if cfg.structure == "reference":
                self.cif = ReferenceCIF(channels, cfg.cif_depth, cfg.cif_chunk, cfg.cif_dim,
                                        16 if cfg.cif_se_reduction is None else cfg.cif_se_reduction)
            else:
                self.cif = CrossScaleFusion(channels, 64 if cfg.cif_dim is None else cfg.cif_dim, cfg.cif_depth,
                                            cfg.cif_chunk, 4 if cfg.cif_se_reduction is None else cfg.cif_se_reduction)

    def param_groups(self, lr: float, head_mult: float = 10.0) -> list[dict[str, Any]]:
        """The model's groups, with the CIF module in the (10x lr) head group (the reference code gives every
        parameter outside the backbone the 10x rate)."""
        groups = super().param_groups(lr, head_mult)
        if self.cif is not None:
            next(g for g in groups if g["name"] == "head")["params"] += list(self.cif.parameters())
        return groups

    def predictor(self) -> nn.Module:
        """The student, wrapped (when a CIF exists) so that ``eval.mode=cif_multiscale`` gets fused logits."""
        if self.cif is None:
            return self.model
        return ScaleMatchPredictor(self.model, self.cif, self.cfg.min_scaled_size, self.cfg.feature_scale_for)

    def sample_scales(self) -> list[float]:
        """This step's image scales (torch's global RNG): one of V (``choice``), one uniform in [min V, max V]
        (``uniform``) or all of V (``all``)."""
        c = self.cfg
        if c.scale_sampling == "all":
            return list(c.scales)
        if c.scale_sampling == "uniform":
            lo, hi = min(c.scales), max(c.scales)
            return [lo + (hi - lo) * host_scalar(torch.rand(()))]
        return [c.scales[host_scalar(torch.randint(len(c.scales), ()))]]

    def sample_feature_scale(self, scale: float) -> float:
        """The feature scale t for image scale ``scale``: drawn from ``feature_scales_down`` when ``scale > 1``,
        else from ``feature_scales_up`` (no draw when the list holds one value)."""
        options = self.cfg.feature_scales_down if scale > 1 else self.cfg.feature_scales_up
        return options[host_scalar(torch.randint(len(options), ()))] if len(options) > 1 else options[0]

    def scale_pass(self, x: Tensor, n: int, scales: Sequence[float], t: float | None) -> ScalePass:
        """The step's network outputs for ``x = cat(x_l, x_w)`` (``n`` labeled images): :func:`reference_two_scale`
        (``t`` None = FSVC off: unresized features, no dropout half) or :func:`paper_two_scale` (FSVC on the
        unlabeled images only)."""
        c = self.cfg
        if c.structure == "reference":
            return reference_two_scale(self.model, self.cif, x, scales, 1.0 if t is None else t,
                                       fusion=c.fusion_mode, branches=c.scale_branch, perturb=t is not None,
                                       min_size=c.min_scaled_size)
        return paper_two_scale(self.model, self.cif, x, scales, t, fusion=c.fusion_mode, branches=c.scale_branch,
                               fp_from=n, min_size=c.min_scaled_size)

    def training_step(self, batch: SemiBatch, step: StepInfo) -> StepOutput:
        s = self.stages(batch, step)
        arts = self.step_artifacts(batch, s) if step.capture else {}
        return StepOutput(weighted_sum(s.terms), self.step_logs(batch, s), arts)

    def stages(self, batch: SemiBatch, step: StepInfo) -> ScaleMatchStep:
        """One ScaleMatch step (the module docstring), stage by stage; the step-through
        (:func:`workbench.viz.stepthrough.scalematch.scalematch_trace`) shows this very call."""
        c, n = self.cfg, batch.x_l.shape[0]
        mix = self.mix_targets(batch)                                            # the mix batch (eval mode)
        scales = self.sample_scales()                                            # image scale v
        t = self.sample_feature_scale(max(scales)) if c.fsvc else None           # feature scale t
        sp = self.scale_pass(torch.cat([batch.x_l, batch.x_w]), n, scales, t)    # scale 1, scale v, CIF, FSVC
        pl = self.pseudo_labels(batch, sp, step)                                 # plain; fused after the warm-up
        x_s = self.strong_view(batch.x_s1, batch.x_s1_mix, batch.box1)
        logits_s = self.model(x_s)["logits"]
        targets_s = self.mixed_targets(pl.weak, mix, batch.box1)
        isvc = [self.unsup_loss(lv[n:], pl.weak) for lv in sp.pred_size] if c.isvc else []   # Eq. 14, per branch
        terms = self.loss_terms(batch, sp, pl, logits_s, targets_s, isvc)
        lcr = self.local_consistency(batch, pl.weak, self.keep(pl.weak))        # opt-in component
        if lcr is not None:
            terms["loss_lcr"] = (c.lcr_weight, lcr.loss)
        return ScaleMatchStep(scales, t, sp, pl, x_s, logits_s, targets_s, isvc, terms, lcr)

    def pseudo_labels(self, batch: SemiBatch, sp: ScalePass, step: StepInfo) -> ScalePseudoLabels:
        """The unlabeled images' plain (scale-1) and fused targets; the step uses the fused ones once
        ``step.epoch`` reaches ``cif_warmup_epochs``, the plain ones before (and without fusion)."""
        n = batch.x_l.shape[0]
        plain = Targets(*pseudo_label(sp.pred_ori[n:]), batch.ignore)
        fused = Targets(*pseudo_label(sp.pred_joint[n:]), batch.ignore) if sp.pred_joint is not None else None
        use_fused = fused is not None and step.epoch >= self.cfg.cif_warmup_epochs
        return ScalePseudoLabels(plain, fused, use_fused)

    def loss_terms(self, batch: SemiBatch, sp: ScalePass, pl: ScalePseudoLabels, logits_s: Tensor,
                   targets_s: Targets, isvc: list[Tensor]) -> LossTerms:
        """``(w_x L_x + w_s L_s + w_isvc L_ISVC + w_fsvc L_FSVC) / 2`` as ``{name: (weight, value)}``, the halving
        folded into the weights: ``L_x`` of the fused prediction when fusing (it trains the CIF), ``L_s`` of the
        strong view, ``L_ISVC`` the mean of ``isvc`` over the branches, ``L_FSVC`` of the t-scaled perturbed
        decode (Eqs. 15-16)."""
        c, n = self.cfg, batch.x_l.shape[0]
        labeled = sp.pred_joint if sp.pred_joint is not None else sp.pred_ori
        terms: LossTerms = {"loss_x": (c.weight_x / 2, supervised_loss(c, labeled[:n], batch.y_l)),
                            "loss_s": (c.weight_s / 2, self.unsup_loss(logits_s, targets_s))}
        if c.isvc:
            terms["loss_isvc"] = (c.weight_isvc / 2, isvc[0] if len(isvc) == 1 else torch.stack(isvc).mean())
        logits_fp = fsvc_logits(sp, batch.x_w.shape[0])
        if logits_fp is not None:
            terms["loss_fsvc"] = (c.weight_fsvc / 2, self.unsup_loss(logits_fp, pl.weak))
        return terms

    def step_logs(self, batch: SemiBatch, s: ScaleMatchStep) -> dict[str, Tensor | float]:
        """The terms, the pseudo-label diagnostics, the scales, and with fusion the plain and fused diagnostics,
        whether the fused targets were used and the gate's mean over valid pixels."""
        n, sp, pl = batch.x_l.shape[0], s.passes, s.pseudo
        logs: dict[str, Tensor | float] = term_logs(s.terms)
        logs.update(self.diagnostics(pl.weak, batch))
        if self.cfg.scale_branch:
            logs["scale"] = max(s.scales)
        if s.feature_scale is not None:
            logs["feature_scale"] = s.feature_scale
        if pl.fused is not None:
            logs["pl_fused"] = float(pl.use_fused)
            logs.update({f"{k}_plain": v for k, v in self.diagnostics(pl.plain, batch).items()})
            logs.update({f"{k}_fused": v for k, v in self.diagnostics(pl.fused, batch).items()})
            valid = (batch.ignore != IGNORE).float()
            gate = sp.gates[0][n:, 0].detach().float()
            logs["gate_mean"] = (gate * valid).sum() / valid.sum().clamp(min=1)
        return logs

    def step_artifacts(self, batch: SemiBatch, s: ScaleMatchStep) -> dict[str, Tensor]:
        """The captured tensors: the weak-to-strong ones, LCR's, the scale-1 / scale-v predictions, the gate and
        both pseudo-labels (with fusion), the FSVC prediction (module docstring)."""
        n, sp, pl = batch.x_l.shape[0], s.passes, s.pseudo
        arts = self.capture(batch, pl.weak, s.x_s, s.logits_s, **(s.lcr.artifacts() if s.lcr is not None else {}))
        arts["pred_w"] = sp.pred_ori[n:].argmax(1)
        if sp.pred_size:
            arts["scale"] = torch.tensor(s.scales, dtype=torch.float32)
            arts["pred_v"] = torch.stack([lv[n:].argmax(1) for lv in sp.pred_size], 1)
        if sp.pred_joint is not None:
            arts["gate_w"] = torch.stack([g[n:, 0] for g in sp.gates], 1)
            arts["pseudo_fused"] = sp.pred_joint[n:].argmax(1)
            arts["pseudo_plain"] = pl.plain.pseudo
        logits_fp = fsvc_logits(sp, batch.x_w.shape[0])
        if logits_fp is not None:
            arts["feature_scale"] = torch.tensor([s.feature_scale], dtype=torch.float32)
            arts["pred_fsvc"] = logits_fp.argmax(1)
        return arts


def fsvc_logits(sp: ScalePass, unlabeled: int) -> Tensor | None:
    """The FSVC prediction of the ``unlabeled`` (last) images of a two-scale pass; None without FSVC."""
    return None if sp.pred_fp is None else sp.pred_fp[sp.pred_fp.shape[0] - unlabeled:]


@dataclass
class ScalePseudoLabels:
    """The unlabeled images' targets of the plain (scale-1) and fused (None without fusion) predictions, and
    whether the step uses the fused ones (after the CIF warm-up)."""

    plain: Targets
    fused: Targets | None
    use_fused: bool

    @property
    def weak(self) -> Targets:
        """The targets the step uses."""
        return self.fused if self.use_fused else self.plain


@dataclass
class ScaleMatchStep:
    """What :meth:`ScaleMatch.stages` computed: the image scales and feature scale t (None without FSVC), the
    two-scale pass, the pseudo-labels, the CutMixed strong view with its logits and targets, each branch's ISVC
    loss, the loss ``terms`` ``{name: (weight, value)}`` (loss = sum of weight x value) and LCR's output."""

    scales: list[float]
    feature_scale: float | None
    passes: ScalePass
    pseudo: ScalePseudoLabels
    x_s: Tensor
    logits_s: Tensor
    targets_s: Targets
    isvc: list[Tensor]
    terms: LossTerms
    lcr: LCROutput | None
