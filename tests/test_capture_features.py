"""The t-SNE features every method captures (``Method.feature_artifacts`` via ``Method.forward``): present at a
capture step under the default config, absent otherwise, and without any effect on the step's numerics."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from workbench.config import config_from_dict
from workbench.dashboard.data import feature_points
from workbench.engine.trainer import artifact_tensor, build_from_config
from workbench.methods import SemiBatch, StepInfo
from workbench.methods.base import FEATURE_GRID, FEATURE_IMAGES
from workbench.methods.supervised import Supervised, SupervisedConfig

from conftest import tiny_config_dict

METHODS = ("supervised", "fixmatch", "meanteacher", "unimatch", "maskmatch", "s4mim", "scalematch", "corrmatch",
           "rankmatch")


@pytest.fixture(scope="module")
def raw_batch(tiny_data):
    """One loader item of the tiny dataset: 2 labeled + 2 unlabeled 32x32 images, with unlabeled ground truth."""
    from workbench.data.dataset import SegDataset, StepDataset, StepPlan

    lab, unl = SegDataset(tiny_data, "labeled_1-4"), SegDataset(tiny_data, "unlabeled_1-4")
    ds = StepDataset(lab, unl, StepPlan(len(lab), len(unl), 2, 2, 1, 0, 0, True), 32)
    ds.total_steps = 1
    return ds[0]


def build(tmp_path, tiny_data, name):
    """(method, config) of ``name`` under the default config on the tiny model (the tests' usual overrides)."""
    cfg = config_from_dict(tiny_config_dict(tmp_path, tiny_data, **{"method.name": name}))
    torch.manual_seed(0)
    return build_from_config(cfg, 6, torch.device("cpu")), cfg


def step(method, cfg, raw, capture: bool):
    """One forward (the engine's call) + backward from the current weights with a fixed seed: (output, gradients,
    RNG state after)."""
    method.zero_grad(set_to_none=True)
    batch = SemiBatch.from_loader(raw, torch.device("cpu"), cfg.data.mean, cfg.data.std)
    torch.manual_seed(1)
    out = method(batch, StepInfo(0, 0, 10, 10, capture=capture))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    return out, grads, torch.get_rng_state()


CELLS = [0, 10, 21, 31]  # pixels under the 4 feature cells of a 32-pixel side (align_corners=True)


@pytest.mark.parametrize("name", METHODS)
def test_capture_has_tsne_features_and_does_not_change_the_step(name, tmp_path, tiny_data, raw_batch):
    method, cfg = build(tmp_path, tiny_data, name)
    method.train()
    state = copy.deepcopy(method.state_dict())
    out_off, grads_off, rng_off = step(method, cfg, raw_batch, capture=False)
    after_off = copy.deepcopy(method.state_dict())  # BatchNorm statistics after the step
    assert "features" not in out_off.artifacts and "feature_labels" not in out_off.artifacts

    method.load_state_dict(state)
    modes = {n: m.training for n, m in method.named_modules()}
    out_on, grads_on, rng_on = step(method, cfg, raw_batch, capture=True)
    # the step's numerics are those of a step without capture: loss, every gradient, buffers, random state
    assert torch.equal(out_on.loss, out_off.loss)
    assert grads_on.keys() == grads_off.keys() and all(torch.equal(grads_on[k], grads_off[k]) for k in grads_on)
    after_on = method.state_dict()
    assert all(torch.equal(after_on[k], after_off[k]) for k in after_on)
    assert torch.equal(rng_on, rng_off)
    assert {n: m.training for n, m in method.named_modules()} == modes  # train/eval modes restored

    arts = out_on.artifacts
    f, lab = arts["features"], arts.get("feature_labels")
    # the tiny model: 32x32 crops, output stride 8 -> a 4x4 ASPP grid of 256 x head_width 0.25 = 64 channels
    # (RankMatch captures its own weak-view ASPP features of the whole unlabeled batch, labelled by y_u)
    assert f.dim() == 4 and f.shape[1:] == (64, 4, 4) and f.shape[0] == 2
    assert not f.requires_grad
    if name != "rankmatch":
        # the align_corners cells of a 4-cell grid on 32 pixels: cell i reads pixel round(31 i / 3) = 0, 10, 21, 31;
        # the labeled view (supervised) is labelled by y_l, the weak unlabeled view by y_u (255 on padding)
        gt = raw_batch["y_l"] if name == "supervised" else raw_batch["y_u"]
        assert torch.equal(lab, gt[:2][:, CELLS][:, :, CELLS].long())
    compact = {k: artifact_tensor(k, v, cfg.data.mean, cfg.data.std) for k, v in arts.items()}
    assert compact["features"].dtype == torch.float16
    pts, labels = feature_points(compact, max_points=1000)
    gt = (raw_batch["y_l"] if name == "supervised" else raw_batch["y_u"])[:2][:, CELLS][:, :, CELLS].reshape(-1)
    # one point per 4x4 cell of 2 images, minus the cells whose label is 255
    assert pts.shape == (int((gt != 255).sum()), 64) and labels.tolist() == gt[gt != 255].tolist()


def test_mean_teacher_features_come_from_the_evaluated_teacher(tmp_path, tiny_data, raw_batch):
    method, cfg = build(tmp_path, tiny_data, "meanteacher")
    with torch.no_grad():  # make the EMA teacher differ from the student
        for p in method.ema.parameters():
            p.mul_(0.5)
    method.train()
    batch = SemiBatch.from_loader(raw_batch, torch.device("cpu"), cfg.data.mean, cfg.data.std)
    arts = method(batch, StepInfo(0, 0, 10, 10, capture=True)).artifacts
    with torch.no_grad():
        teacher = method.ema(batch.x_w)["aspp"]  # the EMA model always runs in eval mode
        method.model.eval()
        student = method.model(batch.x_w)["aspp"]
    assert torch.allclose(arts["features"], teacher) and not torch.allclose(arts["features"], student)


class GridNet(nn.Module):
    """A stand-in network: ``aspp`` [B, 2, 64, 64] holds each cell's (row, column); 3 classes, logits
    favouring class (row + column) % 3; a BatchNorm to check the eval mode and its restoration."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.modes: list[bool] = []

    def forward(self, x):
        self.modes.append(self.training)
        b = x.shape[0]
        r, c = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
        aspp = torch.stack([r, c])[None].expand(b, 2, 64, 64)
        logits = nn.functional.one_hot(((r + c) % 3).long(), 3).permute(2, 0, 1)[None].float().expand(b, 3, 64, 64)
        return {"aspp": aspp, "logits": self.bn(logits)}


def test_feature_grid_is_subsampled_and_labels_follow():
    net = GridNet()
    m = Supervised(net, SupervisedConfig(), 3)
    m.train()
    n_img = FEATURE_IMAGES + 2
    y = (torch.arange(64)[:, None] + torch.arange(64)[None]).remainder(3).expand(n_img, 64, 64).clone()
    y[:, 0, 0] = 255
    batch = SemiBatch(x_l=torch.zeros(n_img, 3, 64, 64), y_l=y)
    arts = m.feature_artifacts(batch)
    assert net.modes == [False] and net.training and net.bn.training  # eval for the pass, train mode restored
    # FEATURE_GRID = 32 of 64 cells: cell i keeps cell 2i (nearest), for rows and columns alike
    assert FEATURE_GRID == 32
    f, lab = arts["features"], arts["feature_labels"]
    assert f.shape == (FEATURE_IMAGES, 2, 32, 32)
    assert f[0, 0, 5, 7] == 10 and f[0, 1, 5, 7] == 14 and f[3, 1, 31, 31] == 62
    assert lab.shape == (FEATURE_IMAGES, 32, 32) and lab[0, 0, 0] == 255
    assert lab[1, 5, 7] == (10 + 14) % 3 and lab[2, 31, 30] == (62 + 60) % 3
    # without ground truth the network's prediction labels the features: argmax of one_hot((r + c) % 3)
    batch.y_l = None
    lab = m.feature_artifacts(batch)["feature_labels"]
    assert lab[0, 0, 0] == 0 and lab[1, 5, 7] == (10 + 14) % 3


def test_no_feature_map_no_features():
    class LogitsOnly(nn.Module):
        def forward(self, x):
            return {"logits": torch.zeros(x.shape[0], 2, 8, 8)}

    m = Supervised(LogitsOnly(), SupervisedConfig(), 2)
    assert m.feature_artifacts(SemiBatch(x_l=torch.zeros(1, 3, 8, 8), y_l=torch.zeros(1, 8, 8).long())) == {}
