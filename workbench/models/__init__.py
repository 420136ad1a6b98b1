"""Segmentation models: ResNet backbones (plain or deep stem, dilation, width multiplier) and DeepLabV3+."""

from __future__ import annotations

from typing import Any

from .backbone import (
    DilatedBasicBlock,
    ResNetBackbone,
    WeightsMismatchError,
    WeightsNotFoundError,
    load_backbone_weights,
    read_state_dict,
    resolve_torchvision_weights,
    scale_channels,
    torchvision_weights_file,
)
from .deeplab import ASPP, BACKBONES, DeepLabV3Plus, DeepLabV3PlusHead, conv_bn_relu, default_aspp_rates

__all__ = [
    "ASPP",
    "BACKBONES",
    "DeepLabV3Plus",
    "DeepLabV3PlusHead",
    "DilatedBasicBlock",
    "ResNetBackbone",
    "WeightsMismatchError",
    "WeightsNotFoundError",
    "build_model",
    "conv_bn_relu",
    "default_aspp_rates",
    "load_backbone_weights",
    "read_state_dict",
    "resolve_torchvision_weights",
    "scale_channels",
    "torchvision_weights_file",
]


def build_model(num_classes: int, **kwargs: Any) -> DeepLabV3Plus:
    """Build a :class:`DeepLabV3Plus` with ``num_classes`` outputs; ``kwargs`` are its keyword arguments
    (backbone, stem, output_stride, width, head_width, aspp_rates, pretrained, fp_dropout)."""
    return DeepLabV3Plus(num_classes, **kwargs)
