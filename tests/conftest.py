"""Shared fixtures: a tiny embedded dataset and tiny run configs (fast on 2 CPU cores)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from workbench.config import RunConfig, apply_overrides, config_from_dict
from workbench.data.synthetic import SyntheticSpec, generate_synthetic

TINY_SPEC = dict(image_size=[32, 32], num_train=40, num_val=8, label_fractions=["1-4"], seed=3)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A 40+8 image synthetic dataset at 32x32 with one label fraction (1-4 = 10 labeled images)."""
    root = tmp_path_factory.mktemp("data") / "synthetic"
    generate_synthetic(root, SyntheticSpec.from_dict(TINY_SPEC), progress=False)
    return root


def tiny_config_dict(out_dir: Path, data_root: Path, **sections: Any) -> dict[str, Any]:
    """A config dict for a few-step run of a tiny model on ``tiny_data``; ``sections`` are dotted overrides."""
    base = {
        "name": "t", "out_dir": str(out_dir),
        "data": {"root": str(data_root), "split": "1-4", "crop_size": 32, "batch_size": 4, "num_workers": 0,
                 "synthetic": TINY_SPEC},
        "model": {"width": 0.25, "head_width": 0.25, "aspp_rates": [1, 2, 3]},
        "train": {"iters": 4, "log_every": 1, "progress": False, "seed": 0},
        "eval": {"batch_size": 8},
    }
    return apply_overrides(base, {k.replace("__", "."): v for k, v in sections.items()})


@pytest.fixture
def tiny_cfg(tmp_path, tiny_data):
    """Factory: tiny_cfg(**{"method.name": "unimatch"}) -> RunConfig writing under tmp_path."""
    def make(**overrides: Any) -> RunConfig:
        return config_from_dict(tiny_config_dict(tmp_path / "runs", tiny_data, **overrides))
    return make


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield


def check_no_gt_in_losses(tmp_path: Path, data_root: Path, diag_key: str = "pl_acc", **overrides: Any):
    """Run one training step of the configured method three times from the same weights and RNG state — with the
    true unlabeled GT, with a random one, and with none — and assert the loss and every gradient are identical while
    the diagnostic ``diag_key`` does depend on the GT. Returns the three StepOutputs and the gradients of the first."""
    import copy

    from workbench.data.dataset import SegDataset, StepDataset, StepPlan
    from workbench.engine.trainer import build_from_config
    from workbench.methods import SemiBatch, StepInfo

    cfg = config_from_dict(tiny_config_dict(tmp_path, data_root, **overrides))
    lab, unl = SegDataset(data_root, "labeled_1-4"), SegDataset(data_root, "unlabeled_1-4")
    ds = StepDataset(lab, unl, StepPlan(len(lab), len(unl), 2, 2, 1, 0, 0, True), 32)
    ds.total_steps = 1
    raw = ds[0]
    torch.manual_seed(0)
    method = build_from_config(cfg, 6, torch.device("cpu"))
    state = copy.deepcopy(method.state_dict())

    def run(y_u):
        method.load_state_dict(state)
        method.zero_grad(set_to_none=True)
        batch = SemiBatch.from_loader(raw, torch.device("cpu"), cfg.data.mean, cfg.data.std)
        batch.y_u = y_u
        torch.manual_seed(1)
        out = method.training_step(batch, StepInfo(0, 0, 1, 1))
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}

    true_gt = raw["y_u"].long()
    out_a, grads_a = run(true_gt)
    out_b, grads_b = run(torch.randint(0, 6, true_gt.shape, generator=torch.Generator().manual_seed(5)))
    out_c, grads_c = run(None)
    assert out_a.loss.item() == out_b.loss.item() == out_c.loss.item()
    assert grads_a.keys() == grads_b.keys() == grads_c.keys() and len(grads_a) > 20
    for k in grads_a:
        assert torch.equal(grads_a[k], grads_b[k]) and torch.equal(grads_a[k], grads_c[k]), k
    assert out_a.logs[diag_key].item() != out_b.logs[diag_key].item()   # the GT is really used, for diagnostics
    assert diag_key not in out_c.logs
    return (out_a, out_b, out_c), grads_a


class StubSegNet(torch.nn.Module):
    """A stub segmentation model for hand-worked method tests: ``logits`` = the first two image channels x a scalar
    parameter, perturbed logits (``perturb=True``) = 0 x the parameter, plus the named ``features`` (each a function
    of the image, multiplied by the parameter when ``scaled``); ``channels`` sets DeepLabV3+'s channel attributes
    (``backbone.channels["layer4"]`` and ``head.channels``) for methods that read them."""

    def __init__(self, features: dict[str, Any], scaled: bool = False, channels: int | None = None) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.features, self.scaled = features, scaled
        if channels is not None:
            self.backbone, self.head = torch.nn.Module(), torch.nn.Module()
            self.backbone.channels, self.head.channels = {"layer4": channels}, channels

    def forward(self, x: torch.Tensor, perturb: bool = False) -> dict[str, torch.Tensor]:
        out = {"logits": x[:, :2] * self.scale}
        out.update({k: f(x) * self.scale if self.scaled else f(x) for k, f in self.features.items()})
        if perturb:
            out["logits_fp"] = torch.zeros_like(out["logits"]) * self.scale
        return out

    def backbone_parameters(self):
        return iter([self.scale])

    def head_parameters(self):
        return iter([])
