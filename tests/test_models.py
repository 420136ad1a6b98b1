"""Tests of workbench.models: ResNet backbones (stems, dilation, width, weights) and DeepLabV3+."""

from __future__ import annotations

import io
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from workbench.models import (
    DeepLabV3Plus,
    ResNetBackbone,
    WeightsMismatchError,
    WeightsNotFoundError,
    build_model,
)

torch.set_num_threads(1)

TINY = dict(width=0.25, head_width=0.25)


def _tv_layer4(net: torchvision.models.ResNet, x: torch.Tensor) -> torch.Tensor:
    """torchvision's own forward, stopped after layer4."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def _randomise_bn(module: nn.Module) -> None:
    """Give every BatchNorm non-trivial running statistics and affine parameters (eval mode then uses them)."""
    g = torch.Generator().manual_seed(0)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


# ----------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("depth", [18, 34])
@pytest.mark.parametrize("stem", ["plain", "deep"])
@pytest.mark.parametrize("os_", [8, 16, 32])
def test_basic_block_models_shapes(depth: int, stem: str, os_: int) -> None:
    torch.manual_seed(0)
    model = build_model(3, backbone=f"resnet{depth}", stem=stem, output_stride=os_, **TINY)
    # width 0.25 of 64/128/256/512 (basic blocks, expansion 1)
    assert model.backbone.channels == {"layer1": 16, "layer2": 32, "layer3": 64, "layer4": 128}
    assert model.backbone.strides == {"layer1": 4, "layer2": 8, "layer3": min(16, os_), "layer4": os_}
    out = model(torch.randn(2, 3, 64, 64))
    assert set(out) == {"low", "high", "aspp", "decoder", "logits"}
    assert out["low"].shape == (2, 16, 16, 16)
    assert out["high"].shape == (2, 128, 64 // os_, 64 // os_)
    assert out["aspp"].shape == (2, 64, 64 // os_, 64 // os_)  # 256 * 0.25 channels at layer4 resolution
    assert out["decoder"].shape == (2, 64, 16, 16)  # at layer1 resolution
    assert out["logits"].shape == (2, 3, 64, 64)
    feats = model.encode(torch.randn(2, 3, 64, 64))
    assert feats["layer2"].shape == (2, 32, 8, 8) and feats["layer3"].shape[-1] == 64 // min(16, os_)


@pytest.mark.parametrize(
    "depth,stem,os_", [(50, "plain", 16), (50, "deep", 8), (101, "deep", 16), (101, "plain", 32)]
)
def test_bottleneck_models_shapes(depth: int, stem: str, os_: int) -> None:
    model = build_model(2, backbone=f"resnet{depth}", stem=stem, output_stride=os_, width=0.125, head_width=0.125)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32))
    # width 0.125: 8/16/32/64 planes, expansion 4
    assert model.backbone.channels == {"layer1": 32, "layer2": 64, "layer3": 128, "layer4": 256}
    assert out["low"].shape == (1, 32, 8, 8)
    assert out["high"].shape == (1, 256, 32 // os_, 32 // os_)
    assert out["logits"].shape == (1, 2, 32, 32)


def test_default_tiny_model_channels_and_odd_input_size() -> None:
    model = build_model(4, backbone="resnet18", width=0.5, head_width=0.5, output_stride=8)
    assert model.backbone.channels == {"layer1": 32, "layer2": 64, "layer3": 128, "layer4": 256}
    assert model.head.reduce[0].out_channels == 24  # 48 * 0.5
    assert model.num_classes == 4
    out = model(torch.randn(2, 3, 50, 70))
    assert out["logits"].shape == (2, 4, 50, 70)
    # 50 -> 25 (stem) -> 13 (max-pool), 70 -> 35 -> 18; layer1 keeps that size
    assert out["low"].shape[-2:] == (13, 18) and out["decoder"].shape == (2, 128, 13, 18)


def test_dilation_layout_basic_block_os8() -> None:
    bb = ResNetBackbone(18, output_stride=8, width=0.25)
    # torchvision convention: the first block of a dilated stage keeps the previous dilation
    expected = {"layer2": [1, 1], "layer3": [1, 2], "layer4": [2, 4]}
    for name, dils in expected.items():
        layer = getattr(bb, name)
        for block, d in zip(layer, dils):
            assert block.conv1.dilation == (d, d) and block.conv1.padding == (d, d)
            assert block.conv2.dilation == (d, d) and block.conv2.padding == (d, d)
        assert layer[0].conv1.stride == ((2, 2) if name == "layer2" else (1, 1))


def test_aspp_rates() -> None:
    def rates(model: DeepLabV3Plus) -> list[tuple[int, int]]:
        return [branch[0].dilation for branch in model.head.aspp.branches[1:]]

    assert rates(build_model(2, backbone="resnet18", output_stride=16, **TINY)) == [(6, 6), (12, 12), (18, 18)]
    assert rates(build_model(2, backbone="resnet18", output_stride=8, **TINY)) == [(12, 12), (24, 24), (36, 36)]
    custom = build_model(2, backbone="resnet18", output_stride=8, aspp_rates=(1, 2, 3), **TINY)
    assert rates(custom) == [(1, 1), (2, 2), (3, 3)]
    assert custom.head.aspp.branches[0][0].kernel_size == (1, 1)


# --------------------------------------------------------------------------------- torchvision compatibility


def test_resnet50_keys_and_outputs_match_torchvision() -> None:
    torch.manual_seed(0)
    tv = torchvision.models.resnet50()
    _randomise_bn(tv)
    tv_state = {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    ours = ResNetBackbone(50, stem="plain", output_stride=32, width=1.0)
    own_state = ours.state_dict()
    assert list(own_state) == list(tv_state)
    assert all(own_state[k].shape == v.shape for k, v in tv_state.items())
    ours.load_state_dict(tv_state, strict=True)
    tv.eval(), ours.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)["layer4"], _tv_layer4(tv, x), rtol=0, atol=0)
        # output stride 16 matches torchvision's own dilation of layer4
        tv16 = torchvision.models.resnet50(replace_stride_with_dilation=[False, False, True]).eval()
        tv16.load_state_dict(tv.state_dict())
        ours16 = ResNetBackbone(50, output_stride=16).eval()
        ours16.load_state_dict(tv_state)
        got = ours16(x)["layer4"]
        assert got.shape == (1, 2048, 4, 4)
        torch.testing.assert_close(got, _tv_layer4(tv16, x), rtol=0, atol=0)


def test_resnet18_outputs_match_torchvision() -> None:
    torch.manual_seed(1)
    tv = torchvision.models.resnet18()
    _randomise_bn(tv)
    tv.eval()
    ours = ResNetBackbone(18, output_stride=32).eval()
    ours.load_state_dict({k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}, strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)["layer4"], _tv_layer4(tv, x), rtol=0, atol=0)


def test_deep_stem_key_layout() -> None:
    bb = ResNetBackbone(50, stem="deep", output_stride=16)
    state = bb.state_dict()
    bn_keys = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    expected_stem = (
        ["conv1.0.weight"] + [f"conv1.1.{k}" for k in bn_keys]
        + ["conv1.3.weight"] + [f"conv1.4.{k}" for k in bn_keys]
        + ["conv1.6.weight"] + [f"bn1.{k}" for k in bn_keys]
    )  # fmt: skip
    assert [k for k in state if not k.startswith("layer")] == expected_stem
    assert state["conv1.0.weight"].shape == (64, 3, 3, 3)
    assert state["conv1.3.weight"].shape == (64, 64, 3, 3)
    assert state["conv1.6.weight"].shape == (128, 64, 3, 3)
    assert state["bn1.weight"].shape == (128,)
    assert bb.conv1[0].stride == (2, 2)
    # layer1 takes 128 channels, so its first block gets a projection shortcut 128 -> 256
    assert state["layer1.0.conv1.weight"].shape == (64, 128, 1, 1)
    assert state["layer1.0.downsample.0.weight"].shape == (256, 128, 1, 1)
    # everything after the stem keeps torchvision's names and shapes
    tv = {k: v.shape for k, v in torchvision.models.resnet50().state_dict().items() if k.startswith("layer")}
    assert {k for k in state if k.startswith("layer")} == set(tv)
    widened = ("layer1.0.conv1.weight", "layer1.0.downsample.0.weight")
    assert all(state[k].shape == s for k, s in tv.items() if k not in widened)


# ----------------------------------------------------------------------------------------------- decoder


def test_decode_any_size_and_align_corners() -> None:
    torch.manual_seed(0)
    model = build_model(3, backbone="resnet18", output_stride=16, **TINY).eval()
    _randomise_bn(model)
    feats = {"low": torch.randn(1, 16, 5, 7), "high": torch.randn(1, 128, 2, 3)}
    with torch.no_grad():
        small = model.decode(feats, None)
        big = model.decode(feats, (17, 25))
    assert small["aspp"].shape == (1, 64, 2, 3)
    assert small["decoder"].shape == (1, 64, 5, 7) and small["logits"].shape == (1, 3, 5, 7)
    assert big["logits"].shape == (1, 3, 17, 25)
    # align_corners=True: output pixel 4i maps to input pixel i exactly ((5-1)/(17-1) = (7-1)/(25-1) = 1/4)
    torch.testing.assert_close(big["logits"][..., ::4, ::4], small["logits"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="feats"):
        model.decode({"low": feats["low"]}, None)


def test_perturb_eval_clean_half_unchanged() -> None:
    torch.manual_seed(0)
    model = build_model(3, backbone="resnet18", output_stride=8, **TINY)
    _randomise_bn(model)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
        pert = model(x, perturb=True)
    assert set(pert) == {"low", "high", "aspp", "decoder", "logits", "logits_fp", "decoder_fp"}
    for key in ("low", "high", "aspp", "decoder", "logits"):
        assert pert[key].shape == plain[key].shape
        torch.testing.assert_close(pert[key], plain[key], rtol=1e-4, atol=1e-5)
    assert pert["logits_fp"].shape == (2, 3, 32, 32) and pert["decoder_fp"].shape == (2, 64, 8, 8)
    # reference behaviour: the perturbation is applied whenever it is asked for
    assert (pert["logits_fp"] - pert["logits"]).abs().max() > 1e-3
    # with a dropout probability of 0 the perturbed branch is the clean one
    model.fp_dropout = 0.0
    with torch.no_grad():
        same = model(x, perturb=True)
    torch.testing.assert_close(same["logits_fp"], same["logits"], rtol=1e-4, atol=1e-5)


def test_perturb_train_single_decoder_pass() -> None:
    torch.manual_seed(0)
    model = build_model(3, backbone="resnet18", output_stride=8, **TINY).train()
    out = model(torch.randn(2, 3, 32, 32), perturb=True)
    assert out["logits"].shape == out["logits_fp"].shape == (2, 3, 32, 32)
    assert (out["logits_fp"] - out["logits"]).abs().max() > 1e-3
    # one forward through backbone and decoder: every BatchNorm counted exactly one batch
    counts = {int(m.num_batches_tracked) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    assert counts == {1}
    (out["logits"].sum() + out["logits_fp"].sum()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_parameter_split_covers_everything_once() -> None:
    model = build_model(3, backbone="resnet18", **TINY)
    backbone = [id(p) for p in model.backbone_parameters()]
    head = [id(p) for p in model.head_parameters()]
    everything = [id(p) for p in model.parameters()]
    assert backbone and head
    assert len(set(backbone)) == len(backbone) and len(set(head)) == len(head)
    assert not set(backbone) & set(head)
    assert sorted(backbone + head) == sorted(everything)
    assert set(backbone) == {id(p) for n, p in model.named_parameters() if n.startswith("backbone.")}
    assert id(model.head.classifier.weight) in set(head)


# ----------------------------------------------------------------------------------------------- weights


def test_local_state_dict_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = ResNetBackbone(18, stem="deep", output_stride=8, width=0.25)
    _randomise_bn(src)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}
    wrapped["state_dict"]["module.fc.weight"] = torch.zeros(10, 128)  # classifier weights are ignored
    path = tmp_path / "deep18.pth"
    torch.save(wrapped, path)
    for pretrained in (str(path), path):
        dst = ResNetBackbone(18, stem="deep", output_stride=8, width=0.25, pretrained=pretrained)
        for k, v in src.state_dict().items():
            assert torch.equal(dst.state_dict()[k], v), k
    # a {"model": ...} checkpoint without BN batch counters (older torch) also loads into the whole model
    plain = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"model": plain}, tmp_path / "m.pt")
    model = build_model(2, backbone="resnet18", stem="deep", output_stride=8, pretrained=tmp_path / "m.pt", **TINY)
    assert torch.equal(model.backbone.layer4[1].conv2.weight, src.layer4[1].conv2.weight)


def test_mismatched_state_dict_names_file_and_keys(tmp_path: Path) -> None:
    state = ResNetBackbone(18, width=0.25).state_dict()
    path = tmp_path / "narrow.pth"
    torch.save(state, path)
    with pytest.raises(WeightsMismatchError, match="narrow.pth") as err:
        ResNetBackbone(18, width=0.5, pretrained=path)
    assert "conv1.weight" in str(err.value) and "shape" in str(err.value)
    del state["layer4.1.bn2.running_var"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(WeightsMismatchError) as err:
        ResNetBackbone(18, width=0.25, pretrained=path)
    assert str(path) in str(err.value)
    assert "layer4.1.bn2.running_var" in str(err.value) and "extra.weight" in str(err.value)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        ResNetBackbone(18, width=0.25, pretrained=tmp_path / "absent.pth")


def test_torchvision_weights_from_hub_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("WORKBENCH_OFFLINE", "1")
    tv = torchvision.models.resnet18()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(tv.state_dict(), tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    for name in ("IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1", torchvision.models.ResNet18_Weights.DEFAULT):
        bb = ResNetBackbone(18, pretrained=name)
        assert torch.equal(bb.layer3[0].downsample[0].weight, tv.layer3[0].downsample[0].weight)
        assert torch.equal(bb.bn1.running_var, tv.bn1.running_var)
    with pytest.raises(ValueError, match="ResNet-18"):
        ResNetBackbone(18, pretrained="ResNet50_Weights.IMAGENET1K_V1")
    with pytest.raises(ValueError, match="IMAGENET9K"):
        ResNetBackbone(18, pretrained="IMAGENET9K_V7")
    with pytest.raises(ValueError, match="stem"):
        ResNetBackbone(18, stem="deep", pretrained="IMAGENET1K_V1")


def test_missing_torchvision_weights_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("WORKBENCH_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as err:
        ResNetBackbone(50, pretrained="ResNet50_Weights.IMAGENET1K_V2")
    message = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert "resnet50-11ad3fa6.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "https://download.pytorch.org/models/resnet50-11ad3fa6.pth" in message


def test_failed_or_corrupt_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("WORKBENCH_OFFLINE", raising=False)

    def unreachable(url: str, timeout: float) -> None:
        assert timeout <= 30
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr("urllib.request.urlopen", unreachable)
    with pytest.raises(WeightsNotFoundError, match="resnet18-f37072fd.pth"):
        ResNetBackbone(18, pretrained="IMAGENET1K_V1")
    # bytes whose SHA-256 does not start with the hash in the file name are rejected and not kept
    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout: io.BytesIO(b"not a checkpoint"))
    with pytest.raises(WeightsNotFoundError, match="hash"):
        ResNetBackbone(18, pretrained="IMAGENET1K_V1")
    assert list((tmp_path / "hub" / "checkpoints").iterdir()) == []


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,word",
    [
        (dict(backbone="resnet42"), "backbone"),
        (dict(output_stride=4), "output_stride"),
        (dict(stem="tall"), "stem"),
        (dict(width=0.0), "width"),
        (dict(head_width=-1.0), "head_width"),
        (dict(fp_dropout=1.0), "fp_dropout"),
        (dict(aspp_rates=(6, 0, 18)), "rates"),
    ],
)
def test_bad_arguments(kwargs: dict, word: str) -> None:
    full = {"backbone": "resnet18", **TINY, **kwargs}
    with pytest.raises(ValueError, match=word):
        build_model(2, **full)


def test_bad_num_classes_and_input() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        build_model(0, backbone="resnet18", **TINY)
    with pytest.raises(TypeError, match="width"):
        ResNetBackbone(18, width="wide")  # type: ignore[arg-type]
    model = build_model(2, backbone="resnet18", **TINY)
    with pytest.raises(ValueError, match="x must be"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="x must be"):
        model(torch.randn(1, 1, 32, 32))
