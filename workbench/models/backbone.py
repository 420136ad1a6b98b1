"""ResNet backbones for segmentation: plain or deep stem, dilated stages, width multiplier, local weight files.

The module keeps torchvision's state-dict key names (``conv1``, ``bn1``, ``layer1``..``layer4``, ``downsample.0/1``)
so that torchvision's ImageNet weights load into width-1 plain-stem models, and lays the deep stem out like the
ResNets distributed by the UniMatch/CorrMatch authors (``conv1.0/1/3/4/6`` + ``bn1``).
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.request
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import ResNet18_Weights, ResNet34_Weights, ResNet50_Weights, ResNet101_Weights, WeightsEnum
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1, conv3x3

__all__ = [
    "DilatedBasicBlock",
    "ResNetBackbone",
    "WeightsMismatchError",
    "WeightsNotFoundError",
    "load_backbone_weights",
    "read_state_dict",
    "resolve_torchvision_weights",
    "scale_channels",
    "torchvision_weights_file",
]

STEMS = ("plain", "deep")
OUTPUT_STRIDES = (8, 16, 32)
DOWNLOAD_TIMEOUT_S = 10.0
OFFLINE_ENV = "WORKBENCH_OFFLINE"


class DilatedBasicBlock(BasicBlock):
    """torchvision's ``BasicBlock`` whose two 3x3 convolutions accept a dilation (torchvision's refuses one).

    Same signature, parameters and state-dict keys as ``torchvision.models.resnet.BasicBlock``; ``dilation`` is
    applied to both 3x3 convolutions (padding = dilation, so the spatial size only depends on ``stride``).
    """

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        super().__init__(inplanes, planes, stride, downsample, groups, base_width, 1, norm_layer)
        if dilation > 1:
            self.conv1 = conv3x3(inplanes, planes, stride, dilation=dilation)
            self.conv2 = conv3x3(planes, planes, dilation=dilation)


_ARCHS: dict[int, tuple[type[nn.Module], tuple[int, int, int, int], type[WeightsEnum]]] = {
    18: (DilatedBasicBlock, (2, 2, 2, 2), ResNet18_Weights),
    34: (DilatedBasicBlock, (3, 4, 6, 3), ResNet34_Weights),
    50: (Bottleneck, (3, 4, 6, 3), ResNet50_Weights),
    101: (Bottleneck, (3, 4, 23, 3), ResNet101_Weights),
}
# Which of layer2, layer3, layer4 trade their stride 2 for dilation, per output stride.
_DILATE: dict[int, tuple[bool, bool, bool]] = {
    8: (False, True, True),
    16: (False, False, True),
    32: (False, False, False),
}


class WeightsNotFoundError(FileNotFoundError):
    """A weights file is neither on disk nor downloadable; the message names the file, directory and URL."""


class WeightsMismatchError(RuntimeError):
    """A state dict does not fit the model; the message names the file and the first offending keys."""


def scale_channels(channels: int, width: float) -> int:
    """Return ``channels * width`` rounded to the nearest integer, at least 1 (the width-multiplier rule)."""
    return max(1, int(round(channels * width)))


def _check_positive_float(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return float(value)


class ResNetBackbone(nn.Module):
    """ResNet-18/34/50/101 feature extractor returning ``layer1``..``layer4`` features.

    Args:
        depth: 18, 34 (basic blocks) or 50, 101 (bottlenecks).
        stem: ``"plain"`` (torchvision's 7x7 stride-2 conv, 64 channels) or ``"deep"`` (3x3 convs 3->64 stride 2,
            64->64, 64->128, each followed by BN+ReLU; layer1 then takes 128 channels). Both end with max-pooling.
        output_stride: 8, 16 or 32, the input-to-layer4 downsampling. Stages past the stride budget replace their
            stride 2 by dilation (OS16: dilation 2 in layer4; OS8: 2 in layer3, 4 in layer4). As in torchvision, the
            first block of a dilated stage keeps the previous stage's dilation.
        width: channel multiplier applied to every convolution (stem included); 1.0 is the standard ResNet.
        pretrained: None, a local state-dict file (``.pth``/``.pt``), a torchvision weights name such as
            ``"ResNet50_Weights.IMAGENET1K_V1"`` or ``"IMAGENET1K_V1"``, or a torchvision ``WeightsEnum`` member.
            See :func:`load_backbone_weights`.

    Attributes:
        channels: output channels per stage, e.g. ``{"layer1": 256, ..., "layer4": 2048}`` for ResNet-50.
        strides: input-to-feature downsampling per stage, e.g. ``{"layer1": 4, ..., "layer4": 16}`` at OS16.
    """

    def __init__(
        self,
        depth: int = 50,
        stem: str = "plain",
        output_stride: int = 16,
        width: float = 1.0,
        pretrained: str | os.PathLike | WeightsEnum | None = None,
    ) -> None:
        super().__init__()
        if depth not in _ARCHS:
            raise ValueError(f"depth must be one of {sorted(_ARCHS)}, got {depth!r}")
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}")
        self.depth, self.stem, self.output_stride = depth, stem, output_stride
        self.width = _check_positive_float(width, "width")
        block, counts, _ = _ARCHS[depth]

        def c(n: int) -> int:
            return scale_channels(n, self.width)

        if stem == "plain":
            self.conv1: nn.Module = nn.Conv2d(3, c(64), kernel_size=7, stride=2, padding=3, bias=False)
            stem_out = c(64)
        else:
            self.conv1 = nn.Sequential(
                conv3x3(3, c(64), stride=2), nn.BatchNorm2d(c(64)), nn.ReLU(inplace=True),
                conv3x3(c(64), c(64)), nn.BatchNorm2d(c(64)), nn.ReLU(inplace=True),
                conv3x3(c(64), c(128)),
            )  # fmt: skip
            stem_out = c(128)
        self.bn1 = nn.BatchNorm2d(stem_out)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        inplanes, dilation, stride_so_far = stem_out, 1, 4
        self.channels: dict[str, int] = {}
        self.strides: dict[str, int] = {}
        for i, (planes, n_blocks) in enumerate(zip((64, 128, 256, 512), counts)):
            dilate = i > 0 and _DILATE[output_stride][i - 1]
            stride = 1 if i == 0 or dilate else 2
            layer, inplanes, dilation = _make_stage(block, inplanes, c(planes), n_blocks, stride, dilation, dilate)
            self.add_module(f"layer{i + 1}", layer)
            stride_so_far *= stride
            self.channels[f"layer{i + 1}"] = inplanes
            self.strides[f"layer{i + 1}"] = stride_so_far

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if pretrained is not None:
            load_backbone_weights(self, pretrained)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Map images ``x`` [B, 3, H, W] (float) to ``{"layer1": [B, C1, H/4, W/4], ..., "layer4": [B, C4, H/OS,
        W/OS]}`` (sizes rounded up for sizes not divisible by the stride; channels as in ``self.channels``)."""
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be a [B, 3, H, W] tensor, got {shape}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats: dict[str, Tensor] = {}
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
            feats[name] = x
        return feats


def _make_stage(
    block: type[nn.Module], inplanes: int, planes: int, n_blocks: int, stride: int, dilation: int, dilate: bool
) -> tuple[nn.Sequential, int, int]:
    """Build one ResNet stage; returns (stage, output channels, dilation of its later blocks)."""
    expansion: int = block.expansion  # type: ignore[attr-defined]
    out = planes * expansion
    new_dilation = dilation * 2 if dilate else dilation
    downsample = None
    if stride != 1 or inplanes != out:
        downsample = nn.Sequential(conv1x1(inplanes, out, stride), nn.BatchNorm2d(out))
    blocks = [block(inplanes, planes, stride, downsample, dilation=dilation)]
    blocks += [block(out, planes, dilation=new_dilation) for _ in range(1, n_blocks)]
    return nn.Sequential(*blocks), out, new_dilation


# ---------------------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------------------


def resolve_torchvision_weights(name: str | WeightsEnum, depth: int) -> WeightsEnum:
    """Turn ``"ResNet50_Weights.IMAGENET1K_V1"``, ``"IMAGENET1K_V1"`` / ``"DEFAULT"`` (resolved for ``depth``) or a
    ``WeightsEnum`` member into the torchvision weights entry for a ResNet of ``depth``; ValueError if they differ."""
    enum_cls = _ARCHS[depth][2] if depth in _ARCHS else None
    if enum_cls is None:
        raise ValueError(f"depth must be one of {sorted(_ARCHS)}, got {depth!r}")
    if isinstance(name, WeightsEnum):
        if not isinstance(name, enum_cls):
            raise ValueError(f"pretrained weights {name} do not belong to ResNet-{depth} ({enum_cls.__name__})")
        return name
    prefix, _, member = name.rpartition(".")
    if prefix and prefix != enum_cls.__name__:
        raise ValueError(f"pretrained weights {name!r} do not belong to ResNet-{depth} (expected {enum_cls.__name__})")
    try:
        return enum_cls[member]
    except KeyError:
        options = [m.name for m in enum_cls] + ["DEFAULT"]
        raise ValueError(f"unknown pretrained weights {name!r} for ResNet-{depth}; options: {options}") from None


def torchvision_weights_file(weights: WeightsEnum) -> Path:
    """Return the local file holding torchvision ``weights``: ``torch.hub.get_dir()/checkpoints/<url file name>``.

    When the file is missing it is downloaded (timeout ``DOWNLOAD_TIMEOUT_S`` per network operation, SHA-256 prefix
    in the file name verified), unless the environment variable ``WORKBENCH_OFFLINE=1`` is set. Raises
    :class:`WeightsNotFoundError` naming the file to place, the directory and the URL when it cannot be had.
    """
    url: str = weights.url
    directory = Path(torch.hub.get_dir()) / "checkpoints"
    path = directory / os.path.basename(url)
    if path.is_file():
        return path
    hint = f"place the file '{path.name}' in '{directory}' (download it from {url})"
    if os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes"):
        raise WeightsNotFoundError(f"weights {weights} not found and {OFFLINE_ENV} is set: {hint}")
    try:
        _download(url, path)
    except OSError as err:  # URLError, timeouts, DNS failures and disk errors are all OSErrors
        raise WeightsNotFoundError(f"weights {weights} not found and the download failed ({err}): {hint}") from err
    return path


def _download(url: str, path: Path) -> None:
    """Download ``url`` to ``path`` atomically (temporary file + rename), checking the hash prefix in its name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    sha = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(tmp, "wb") as f:
            while chunk := response.read(1 << 20):
                sha.update(chunk)
                f.write(chunk)
        expected = re.search(r"-([a-f0-9]+)\.", path.name)
        if expected and not sha.hexdigest().startswith(expected.group(1)):
            raise OSError(f"hash mismatch: sha256 {sha.hexdigest()[:16]}... does not start with {expected.group(1)}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a backbone state dict from ``path`` (a ``torch.save``d dict of tensors, loaded on CPU).

    A dict wrapped as ``{"state_dict": ...}`` or ``{"model": ...}`` is unwrapped, a leading ``"module."`` (from
    DataParallel/DDP) is stripped from every key and classifier keys ``fc.*`` are dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file '{path}' does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in several types; name the file whatever the cause
        raise WeightsMismatchError(f"cannot read a state dict from '{path}': {err}") from err
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise WeightsMismatchError(f"'{path}' holds a {type(obj).__name__}, not a state dict")
    state = {str(k).removeprefix("module."): v for k, v in obj.items()}
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def _check_fit(model: nn.Module, state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """Raise WeightsMismatchError unless ``state`` fits ``model``; return it completed with BN batch counters."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} (file {tuple(v.shape)}, model {tuple(own[k].shape)})"
        for k, v in state.items()
        if k in own and (not isinstance(v, Tensor) or v.shape != own[k].shape)
    ]
    problems = [
        f"{len(keys)} {what}: {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
        if keys
    ]
    if problems:
        raise WeightsMismatchError(f"state dict from {source} does not fit the model: " + "; ".join(problems))
    return {**{k: v for k, v in own.items() if k not in state}, **state}


def load_backbone_weights(backbone: ResNetBackbone, pretrained: str | os.PathLike | WeightsEnum) -> None:
    """Load ``pretrained`` into ``backbone`` in place, checking that every key and shape fits.

    ``pretrained`` is a local state-dict file (see :func:`read_state_dict`) or a torchvision weights name/member (only
    for plain-stem, width-1 backbones; see :func:`torchvision_weights_file`). A string that names an existing file, ends
    in ``.pth``/``.pt`` or contains a path separator is a file; any other string is a torchvision weights name.
    Raises :class:`WeightsMismatchError` naming the file and the first offending keys when the state dict does not
    fit, :class:`WeightsNotFoundError` / ``FileNotFoundError`` when the file is missing.
    """
    if not isinstance(pretrained, (str, os.PathLike, WeightsEnum)):
        raise TypeError(f"pretrained must be a path, a weights name or a WeightsEnum, got {type(pretrained).__name__}")
    is_file = isinstance(pretrained, os.PathLike) or (
        isinstance(pretrained, str)
        and (os.path.exists(pretrained) or pretrained.endswith((".pth", ".pt")) or os.sep in pretrained)
    )
    if is_file:
        path = Path(pretrained)  # type: ignore[arg-type]
    else:
        weights = resolve_torchvision_weights(pretrained, backbone.depth)  # type: ignore[arg-type]
        if backbone.stem != "plain" or backbone.width != 1.0:
            raise ValueError(
                f"pretrained={pretrained!r}: torchvision weights fit only stem='plain' and width=1.0, "
                f"got stem={backbone.stem!r}, width={backbone.width}"
            )
        path = torchvision_weights_file(weights)
    state = _check_fit(backbone, read_state_dict(path), f"'{path}'")
    backbone.load_state_dict(state, strict=True)
