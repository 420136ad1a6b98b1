"""S4MIM's mask-induced learning as tensor ops ("Masked Image Modeling Boosting Semi-Supervised Semantic
Segmentation", arXiv 2411.08756, Sec. III): class-wise grouping and reconstruction, class
prototypes with their EMA dictionary, the feature-aggregation loss and the Eq. 14 normaliser.

Shapes: ``fea`` [B, D, h, w] are pixel-decoder features (before the heads); ``labels`` long [B, h, w] are one-hot
class indices at the feature size (nearest-resized pseudo-labels, :func:`resize_labels`); ``weights`` float [B, h, w]
are confidences; ``valid`` bool [B, h, w] marks the positions a loss may use.

Class-wise reconstruction (Eq. 7) ``r = sum_c Head_c(fea * Y_c)`` with ``K x K`` heads is computed without building
the C masked copies of ``fea``: since the groups partition the positions, ``r(p) = sum_d W_{class(p+d)}(d) fea(p+d)``
for the kernel offsets ``d``. :class:`ClassHeads` applies every head's weights as one 1x1 convolution producing
``C x 3 x K^2`` channels, keeps at each position the channels of that position's class, and sums the ``K^2`` shifted
slices (the memory of C x 3 x K^2 channels instead of C x D). :meth:`ClassHeads.reference` is the literal Eq. 7.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ClassHeads", "aggregation_loss", "class_prototypes", "ema_prototypes", "group_features",
           "normaliser", "resize_labels"]


def resize_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-resize long/bool maps [B, H, W] to ``size`` (one-hot maps stay one-hot: Eq. 6's interpolation)."""
    if labels.dim() != 3:
        raise ValueError(f"labels must be [B, H, W], got {tuple(labels.shape)}")
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].to(labels.dtype)


def group_features(fea: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Eq. 6: ``fea_c = fea * Y_c`` for every class, stacked: [B, C, D, h, w] (the groups are disjoint and sum to
    ``fea`` when every label lies in ``[0, C)``)."""
    _check(fea, labels)
    onehot = F.one_hot(labels.clamp(0, num_classes - 1), num_classes).permute(0, 3, 1, 2).to(fea.dtype)
    return fea[:, None] * onehot[:, :, None]


def _check(fea: Tensor, labels: Tensor) -> None:
    if fea.dim() != 4 or labels.shape != (fea.shape[0], *fea.shape[2:]):
        raise ValueError(f"fea [B, D, h, w] and labels [B, h, w] must match, got {tuple(fea.shape)} and "
                         f"{tuple(labels.shape)}")


class ClassHeads(nn.Module):
    """One bias-free ``kernel x kernel`` conv head per class (``out_channels`` outputs each, 3 for RGB), every head
    initialised independently like ``nn.Conv2d``.

    ``forward(fea, labels)`` = Eq. 7 ``sum_c Head_c(fea * Y_c)`` (class-wise MIM); ``forward(fea, None)`` =
    ``sum_c Head_c(fea)``, the basic MIM with the same parameters (the paper's Table V compares the two on "the same
    model structure, including {Head_c}").
    """

    def __init__(self, in_channels: int, num_classes: int, out_channels: int = 3, kernel: int = 3) -> None:
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"kernel must be a positive odd int, got {kernel!r}")
        if num_classes < 1 or in_channels < 1 or out_channels < 1:
            raise ValueError("in_channels, num_classes and out_channels must be positive")
        self.num_classes, self.out_channels, self.kernel = num_classes, out_channels, kernel
        self.weight = nn.Parameter(torch.empty(num_classes, out_channels, in_channels, kernel, kernel))
        for c in range(num_classes):   # nn.Conv2d's default initialisation, drawn per head
            nn.init.kaiming_uniform_(self.weight[c], a=math.sqrt(5))

    def forward(self, fea: Tensor, labels: Tensor | None) -> Tensor:
        """Reconstruction [B, out_channels, h, w] of features [B, D, h, w] grouped by ``labels`` [B, h, w]
        (None = no grouping: every head sees every position)."""
        c, o, k = self.num_classes, self.out_channels, self.kernel
        if labels is None:
            return F.conv2d(fea, self.weight.sum(0), padding=k // 2)
        _check(fea, labels)
        b, _, h, w = fea.shape
        # per position and offset d: W_c(d) fea(p) for every class c -> keep the position's own class
        taps = F.conv2d(fea, self.weight.permute(0, 1, 3, 4, 2).reshape(c * o * k * k, -1, 1, 1))
        taps = taps.view(b, c, o * k * k, h, w)
        index = labels.clamp(0, c - 1)[:, None, None].expand(b, 1, o * k * k, h, w)
        own = taps.gather(1, index)[:, 0].view(b, o, k * k, h, w)
        # conv2d is a cross-correlation: r(p) = sum_d tap_d(p + d); pad and add the shifted slices
        pad = k // 2
        own = F.pad(own, (pad, pad, pad, pad))
        out = fea.new_zeros(b, o, h, w)
        for i in range(k):
            for j in range(k):
                out = out + own[:, :, i * k + j, i:i + h, j:j + w]
        return out

    def reference(self, fea: Tensor, labels: Tensor) -> Tensor:
        """The literal Eq. 7, one masked copy and one conv per class (slow; for tests)."""
        groups = group_features(fea, labels, self.num_classes)
        return sum(F.conv2d(groups[:, i], self.weight[i], padding=self.kernel // 2) for i in range(self.num_classes))

    def per_class(self, fea: Tensor, labels: Tensor) -> Tensor:
        """Every class's term ``Head_c(fea_c)`` [B, C, out_channels, h, w] (their sum is :meth:`forward`)."""
        groups = group_features(fea, labels, self.num_classes)
        return torch.stack([F.conv2d(groups[:, i], self.weight[i], padding=self.kernel // 2)
                            for i in range(self.num_classes)], 1)


def class_prototypes(fea: Tensor, labels: Tensor, weights: Tensor, valid: Tensor, num_classes: int
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """Eq. 9: per class, the ``weights``-weighted mean of the feature vectors at its ``valid`` positions.

    Returns ``(numerator [C, D], denominator [C], count [C])`` (sums, so processes can all-reduce them before
    dividing); the prototype of class c is ``numerator[c] / denominator[c]`` where ``count[c] > 0``.
    """
    _check(fea, labels)
    d = fea.shape[1]
    flat = fea.permute(0, 2, 3, 1).reshape(-1, d)
    keep, idx, w = _kept(labels, weights, valid, fea.dtype)
    num = fea.new_zeros(num_classes, d).index_add_(0, idx, torch.where(keep[:, None], flat * w[:, None], 0.0))
    den = fea.new_zeros(num_classes).index_add_(0, idx, w)
    count = torch.zeros(num_classes, device=fea.device).index_add_(0, idx, keep.float())
    return num, den, count


def _kept(labels: Tensor, weights: Tensor, valid: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Flat ``(keep, class index, weight)`` over every position, without selecting (a boolean-mask index would
    synchronise on a GPU): dropped positions get class 0 and weight 0, so they add exact zeros."""
    keep = valid.reshape(-1)
    idx = torch.where(keep, labels.reshape(-1), 0)
    w = torch.where(keep, weights.reshape(-1).to(dtype), 0.0)
    return keep, idx, w


def ema_prototypes(dictionary: Tensor, prototypes: Tensor, present: Tensor, alpha: float) -> Tensor:
    """The dictionary update ``v~_c <- alpha v~_c + (1 - alpha) v_c`` for the classes ``present`` (bool [C]); the
    other entries are unchanged. Returns the new dictionary [C, D]."""
    updated = alpha * dictionary + (1 - alpha) * prototypes
    return torch.where(present[:, None], updated, dictionary)


def aggregation_loss(fea: Tensor, labels: Tensor, weights: Tensor, valid: Tensor, prototypes: Tensor,
                     available: Tensor, temperature: float = 10.0) -> tuple[Tensor, Tensor]:
    """Eqs. 10-12 without the weight: ``mean_c [sum_p w_p (1 - cos(fea_p, v_c)) / T / sum_p w_p]`` over the
    ``valid`` positions p of class c, averaged over the classes that have such positions and an ``available``
    prototype (bool [C]).

    A zero prototype (a dictionary entry never updated) has cosine 0 with everything, so its term is ``1 / T``
    without gradient. Returns ``(loss, classes)``: the scalar loss (0 when no class qualifies) and the bool [C] mask of
    the classes averaged.
    """
    _check(fea, labels)
    c, d = prototypes.shape
    flat = fea.permute(0, 2, 3, 1).reshape(-1, d)
    keep, idx, w = _kept(labels, weights, valid, fea.dtype)
    cos = F.cosine_similarity(flat, prototypes.to(fea.dtype)[idx], dim=1, eps=1e-8)
    per = (1 - cos) / temperature
    num = fea.new_zeros(c).index_add(0, idx, torch.where(keep, per * w, 0.0))
    den = fea.new_zeros(c).index_add(0, idx, w)
    count = torch.zeros(c, device=fea.device).index_add_(0, idx, keep.float())
    classes = (count > 0) & available & (den > 0)
    n = classes.sum()
    loss = torch.where(classes, num / den.clamp(min=1e-12), torch.zeros_like(num)).sum() / n.clamp(min=1)
    return loss, classes


def normaliser(weight_u: float, weight_mp: float, weight_mf: float, weight_ms: float, mimpi: bool = True,
               mimfea: bool = True, mimse: bool = True) -> float:
    """The denominator of Eq. 14, ``1 + 2 l_u + 3 l_mp + 3 l_mf + 3 l_ms``, counting only the losses switched on (the
    baseline alone gives ``1 + 2 l_u``)."""
    return 1 + 2 * weight_u + 3 * (weight_mp * mimpi + weight_mf * mimfea + weight_ms * mimse)
