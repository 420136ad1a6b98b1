"""DeepLabV3+ (ASPP + low-level decoder) over a ResNet backbone, returning a dict of named features.

Layout as in the UniMatch family of code bases: ASPP on layer4 (1x1 + three dilated 3x3 + image pooling, 256
channels each, BN+ReLU, projected by 1x1 conv+BN+ReLU), layer1 reduced to 48 channels, fused by two
3x3 conv(256)+BN+ReLU, 1x1 classifier, bilinear upsampling with ``align_corners=True``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import WeightsEnum

from .backbone import ResNetBackbone, scale_channels

__all__ = ["ASPP", "BACKBONES", "DeepLabV3Plus", "DeepLabV3PlusHead", "conv_bn_relu", "default_aspp_rates"]

BACKBONES = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101}


def default_aspp_rates(output_stride: int) -> tuple[int, ...]:
    """ASPP dilation rates for ``output_stride``: (6, 12, 18) at 16, scaled by 16 / OS (OS8: (12, 24, 36);
    OS32: (3, 6, 9))."""
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride!r}")
    return tuple(r * 16 // output_stride for r in (6, 12, 18))


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1) -> nn.Sequential:
    """Bias-free ``kernel_size`` conv ('same' padding, given dilation) + BatchNorm + ReLU; keys ``0``, ``1``."""
    padding = dilation * (kernel_size // 2)
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def _upsample(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: maps [B, in_channels, h, w] to [B, out_channels, h, w].

    Branches: a 1x1 conv, one dilated 3x3 conv per rate, and global average pooling + 1x1 conv (broadcast back to
    h x w); each conv is followed by BN+ReLU. The concatenation is projected by a 1x1 conv+BN+ReLU (no dropout,
    as in the reference code of the UniMatch family; torchvision's DeepLabV3 adds Dropout(0.5) there).
    """

    def __init__(self, in_channels: int, out_channels: int, rates: Sequence[int]) -> None:
        super().__init__()
        if not rates or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in rates):
            raise ValueError(f"rates must be a non-empty sequence of positive ints, got {rates!r}")
        self.rates = tuple(rates)
        dilated = [conv_bn_relu(in_channels, out_channels, 3, r) for r in rates]
        self.branches = nn.ModuleList([conv_bn_relu(in_channels, out_channels, 1), *dilated])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(in_channels, out_channels, 1))
        n_branches = len(self.branches) + 1
        # no dropout after the projection: the UniMatch/CorrMatch/RankMatch reference ASPP has none
        self.project = conv_bn_relu(n_branches * out_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """[B, C_in, h, w] -> [B, C_out, h, w]."""
        outs = [branch(x) for branch in self.branches]
        outs.append(_upsample(self.pool(x), x.shape[-2:]))
        return self.project(torch.cat(outs, dim=1))


class DeepLabV3PlusHead(nn.Module):
    """The DeepLabV3+ decoder: ASPP on the high-level features, fused with reduced low-level features.

    Args:
        low_channels, high_channels: channels of the low-level (layer1) and high-level (layer4) features.
        out_channels: classifier outputs (number of classes); None builds no classifier (the decoder features are the
            output, e.g. S4MIM's pixel decoder with its per-class heads).
        rates: ASPP dilation rates.
        head_width: multiplier of the head's channel counts (ASPP/fuse 256, low-level reduction 48).
        classifier_kernel, classifier_bias: the final conv (1x1 with bias for segmentation; S4MIM's pixel decoder
            uses a bias-free 3x3 conv with 3 outputs).
    """

    def __init__(
        self,
        low_channels: int,
        high_channels: int,
        out_channels: int | None,
        rates: Sequence[int],
        head_width: float = 1.0,
        classifier_kernel: int = 1,
        classifier_bias: bool = True,
    ) -> None:
        super().__init__()
        if out_channels is not None and (isinstance(out_channels, bool) or not isinstance(out_channels, int)
                                         or out_channels < 1):
            raise ValueError(f"out_channels must be a positive int or None, got {out_channels!r}")
        if isinstance(head_width, bool) or not isinstance(head_width, (int, float)) or not head_width > 0:
            raise ValueError(f"head_width must be a float > 0, got {head_width!r}")
        if classifier_kernel < 1 or classifier_kernel % 2 == 0:
            raise ValueError(f"classifier_kernel must be a positive odd int, got {classifier_kernel!r}")
        mid, reduced = scale_channels(256, head_width), scale_channels(48, head_width)
        self.channels, self.head_width = mid, float(head_width)
        self.aspp = ASPP(high_channels, mid, rates)
        self.reduce = conv_bn_relu(low_channels, reduced, 1)
        self.fuse = nn.Sequential(conv_bn_relu(mid + reduced, mid, 3), conv_bn_relu(mid, mid, 3))
        self.classifier = None if out_channels is None else nn.Conv2d(
            mid, out_channels, classifier_kernel, padding=classifier_kernel // 2, bias=classifier_bias
        )

    def forward(self, low: Tensor, high: Tensor, out_size: Sequence[int] | None = None) -> dict[str, Tensor]:
        """Decode ``low`` [B, C_low, h1, w1] and ``high`` [B, C_high, h4, w4] (any sizes) into
        ``{"aspp": [B, mid, h4, w4], "decoder": [B, mid, h1, w1], "logits": [B, out_channels, *out_size]}``
        (``logits`` at h1 x w1 when ``out_size`` is None; no ``logits`` without a classifier)."""
        if low.dim() != 4 or high.dim() != 4 or low.shape[0] != high.shape[0]:
            shapes = f"{tuple(low.shape)}, {tuple(high.shape)}"
            raise ValueError(f"low and high must be [B, C, h, w] with equal B, got {shapes}")
        aspp = self.aspp(high)
        fused = torch.cat([_upsample(aspp, low.shape[-2:]), self.reduce(low)], dim=1)
        decoder = self.fuse(fused)
        if self.classifier is None:
            return {"aspp": aspp, "decoder": decoder}
        logits = self.classifier(decoder)
        if out_size is not None:
            logits = _upsample(logits, out_size)
        return {"aspp": aspp, "decoder": decoder, "logits": logits}


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ segmentation model over a ResNet backbone.

    Args:
        num_classes: number of output classes.
        backbone: ``"resnet18"``, ``"resnet34"``, ``"resnet50"`` or ``"resnet101"``.
        stem, output_stride, width, pretrained: passed to :class:`~workbench.models.backbone.ResNetBackbone`.
        head_width: multiplier of the head's channels (256 / 48 at 1.0).
        aspp_rates: ASPP dilation rates; default :func:`default_aspp_rates` (6/12/18 at OS16, 12/24/36 at OS8).
        fp_dropout: channel-dropout probability of the UniMatch feature perturbation (``forward(perturb=True)``).

    Feature dicts use the keys ``"low"`` (layer1), ``"layer2"``, ``"layer3"``, ``"high"`` (layer4).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        stem: str = "plain",
        output_stride: int = 16,
        width: float = 1.0,
        head_width: float = 1.0,
        aspp_rates: Sequence[int] | None = None,
        pretrained: str | os.PathLike | WeightsEnum | None = None,
        fp_dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {sorted(BACKBONES)}, got {backbone!r}")
        if isinstance(fp_dropout, bool) or not isinstance(fp_dropout, (int, float)) or not 0 <= fp_dropout < 1:
            raise ValueError(f"fp_dropout must be a float in [0, 1), got {fp_dropout!r}")
        self.backbone = ResNetBackbone(BACKBONES[backbone], stem, output_stride, width, pretrained)
        rates = default_aspp_rates(output_stride) if aspp_rates is None else tuple(aspp_rates)
        channels = self.backbone.channels
        self.head = DeepLabV3PlusHead(channels["layer1"], channels["layer4"], num_classes, rates, head_width)
        self.num_classes = num_classes
        self.output_stride = output_stride
        self.fp_dropout = float(fp_dropout)

    def encode(self, x: Tensor) -> dict[str, Tensor]:
        """Backbone features of images ``x`` [B, 3, H, W]: ``"low"`` [B, C1, H/4, W/4], ``"layer2"``, ``"layer3"``,
        ``"high"`` [B, C4, H/OS, W/OS]."""
        f = self.backbone(x)
        return {"low": f["layer1"], "layer2": f["layer2"], "layer3": f["layer3"], "high": f["layer4"]}

    def decode(self, feats: dict[str, Tensor], out_size: tuple[int, int] | None = None) -> dict[str, Tensor]:
        """Decode ``feats["low"]`` and ``feats["high"]`` (any spatial sizes, equal batch) into ``"aspp"`` (at the
        high features' size), ``"decoder"`` ([B, 256*head_width, *low size]) and ``"logits"`` ([B, num_classes,
        *out_size], or at the low features' size when ``out_size`` is None)."""
        if not isinstance(feats, dict) or "low" not in feats or "high" not in feats:
            raise ValueError("feats must be a dict with keys 'low' and 'high'")
        return self.head(feats["low"], feats["high"], out_size)

    def forward(self, x: Tensor, perturb: bool = False) -> dict[str, Tensor]:
        """Segment images ``x`` [B, 3, H, W].

        Returns ``"low"``, ``"high"`` (backbone features), ``"aspp"``, ``"decoder"`` and ``"logits"`` [B, num_classes,
        H, W]. With ``perturb=True`` (UniMatch's UniPerb) also ``"logits_fp"`` and ``"decoder_fp"``: channel dropout
        with probability ``fp_dropout`` on the low and high features, decoded in the same decoder pass as the clean
        features (batch concatenation, so BatchNorm in train mode sees both halves). As in the reference code the
        perturbation is applied whatever the train/eval mode; the clean outputs are those of the first half.
        """
        feats = self.encode(x)
        low, high = feats["low"], feats["high"]
        if not perturb:
            return {"low": low, "high": high, **self.decode(feats, x.shape[-2:])}
        p = self.fp_dropout
        both = {
            "low": torch.cat([low, F.dropout2d(low, p, training=True)]),
            "high": torch.cat([high, F.dropout2d(high, p, training=True)]),
        }
        decoded = self.decode(both, x.shape[-2:])
        out = {"low": low, "high": high}
        for key, value in decoded.items():
            out[key], perturbed = value.chunk(2)
            if key in ("logits", "decoder"):
                out[f"{key}_fp"] = perturbed
        return out

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the backbone (the optimiser's base learning rate)."""
        return self.backbone.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter outside the backbone (the optimiser gives these 10x the base learning rate)."""
        return (p for name, p in self.named_parameters() if not name.startswith("backbone."))
