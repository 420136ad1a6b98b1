"""The sync-free step: host-read counting, every method's steady-state step, the on-device non-finite skip."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from workbench.config import config_from_dict
from workbench.engine.optim import DeferredNonFinite, all_finite, zero_momentum_buffers
from workbench.engine.syncs import host_reads, host_scalar
from workbench.engine.trainer import Trainer, load_method, train
from workbench.methods import METHODS, SemiBatch, StepInfo
from workbench.ops.losses import ce_loss

from conftest import tiny_config_dict


def test_host_reads_counts_each_read_and_restores_tensor():
    t = torch.tensor([1.5])
    with host_reads() as reads:
        t.item()
        bool(t > 0)
        float(t)
        int(torch.tensor(3))
        t.tolist()
        torch.tensor([0, 2]).nonzero()
        host_scalar(t)              # exempt
        _ = t * 2 + 1               # no read
    assert sum(reads.values()) == 6
    assert all(site.split(" at ")[0] in ("item", "__bool__", "__float__", "__int__", "tolist", "nonzero")
               for site in reads)
    assert all("test_syncs.py" in site for site in reads)
    assert "item" not in torch.Tensor.__dict__ and "__bool__" not in torch.Tensor.__dict__
    with pytest.raises(RuntimeError, match="boom"):
        with host_reads():
            raise RuntimeError("boom")
    assert torch.Tensor.item is torch._C.TensorBase.item


def test_host_scalar_only_reads_one_cpu_element():
    assert host_scalar(torch.tensor(7)) == 7
    with pytest.raises(ValueError, match="one-element CPU"):
        host_scalar(torch.tensor([1, 2]))


def two_steps(name: str, out_dir, data_root, **overrides):
    """Two training steps of method ``name`` on the tiny data; the host reads of the second (lazy set-up is done in
    the first) and the trainer."""
    cfg = config_from_dict(tiny_config_dict(out_dir, data_root, **{"method.name": name, "train.iters": 2,
                                                                  **overrides}))
    t = Trainer(cfg)
    t.setup()
    it = iter(t._loader())
    for i in range(2):
        batch = SemiBatch.from_loader(next(it), t.device, cfg.data.mean, cfg.data.std, cfg.model.channels_last)
        info = StepInfo(i, 0, 2, 2, False)
        with host_reads() as reads:
            res = t.method.training_step(batch, info)
            res.loss.backward()
            t.method.after_step(info)
        assert torch.isfinite(res.loss)
    return reads, t


@pytest.fixture(scope="module")
def step_reads(tiny_data, tmp_path_factory):
    """Host reads of the second training step of every registered method."""
    return {name: two_steps(name, tmp_path_factory.mktemp(name), tiny_data)[0] for name in sorted(METHODS)}


def test_steady_state_steps_read_nothing_back(step_reads):
    """Every method's step runs without a device-to-host read, except CorrMatch's region propagation, whose sparse
    work on the pixels that change label has data-dependent sizes (one read of the shape batches that have any
    usable shape, plus one per batch with pixels to relabel)."""
    for name, reads in step_reads.items():
        if name == "corrmatch":
            assert reads and all("workbench/ops/correlation.py" in site for site in reads), dict(reads)
        else:
            assert not reads, f"{name}: {dict(reads)}"


def test_every_method_trains_in_channels_last(tiny_data, tmp_path):
    """model.channels_last converts every 4-d weight (S4MIM's 5-d class heads stay as they are) and each method's
    step runs on channels_last images."""
    for name in sorted(METHODS):
        _, t = two_steps(name, tmp_path / name, tiny_data, **{"model.channels_last": True})
        convs = [p for p in t.method.parameters() if p.dim() == 4]
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs), name


def test_ce_loss_without_valid_pixels_is_zero_and_otherwise_the_mean():
    logits = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1).repeat(1, 1, 1, 2).requires_grad_()
    target = torch.tensor([[[1, 255]]])
    loss = ce_loss(logits, target)           # one valid pixel with p(class 1) = 3/4
    assert loss.item() == pytest.approx(math.log(4 / 3))
    none = ce_loss(logits, torch.full((1, 1, 2), 255))
    none.backward()
    assert none.item() == 0.0 and logits.grad.abs().sum() == 0
    x, y = torch.randn(2, 4, 3, 3), torch.randint(0, 4, (2, 3, 3))
    y[0, 0] = 255
    assert ce_loss(x, y).item() == pytest.approx(F.cross_entropy(x, y, ignore_index=255).item(), rel=1e-6)


def test_all_finite():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    a.grad, b.grad = torch.ones(2), torch.tensor([1.0, float("nan"), 2.0])
    assert bool(all_finite(torch.tensor(1.0), [a])) and not bool(all_finite(torch.tensor(1.0), [a, b]))
    assert not bool(all_finite(torch.tensor(float("inf")), [a]))
    c = torch.nn.Parameter(torch.ones(1))
    c.grad = torch.tensor([3e38])            # huge but finite: the max-abs norm does not overflow
    assert bool(all_finite(torch.tensor(0.0), [c]))


def test_fused_sgd_skips_on_device_from_a_zero_momentum_buffer():
    """p = 1, lr 0.1, momentum 0.9, gradients 1, 2, 3, the first step flagged: step 2 gives buf = 2, p = 0.8;
    step 3 buf = 0.9 * 2 + 3 = 4.8, p = 0.8 - 0.48 = 0.32 (the plain SGD run of the last two steps)."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, fused=True)
    zero_momentum_buffers(opt)
    pending = DeferredNonFinite(torch.device("cpu"))
    for i, g in enumerate((1.0, 2.0, 3.0)):
        p.grad = torch.full((3,), g if i else float("nan"))
        good = pending.flag(opt, torch.tensor(0.5 * g), [p], i, {"loss": torch.tensor(0.5 * g)}, [f"id{i}"])
        assert bool(good) == (i > 0)
        opt.step()
        if i == 0:
            assert torch.equal(p.data, torch.ones(3)) and torch.equal(opt.state[p]["momentum_buffer"], torch.zeros(3))
    assert torch.allclose(p.data, torch.full((3,), 0.32))
    assert pending.read() == (0, 1, {"loss": 0.5}, ["id0"])
    assert pending.read() is None


def test_deferred_skip_equals_the_synchronous_skip(tiny_cfg, monkeypatch):
    """A NaN loss at step 1 under ``skip``: the fused SGD skipping on the device ends with the same weights as the
    per-step host check that never calls the optimiser, and the logged loss leaves the bad step out."""
    from workbench.methods.supervised import Supervised

    orig = Supervised.training_step

    def nan_at_1(self, batch, step):
        out = orig(self, batch, step)
        if step.iteration == 1:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(Supervised, "training_step", nan_at_1)
    weights, losses = {}, {}
    for fused in (False, True):
        cfg = tiny_cfg(name=f"f{fused}", **{"optim.nonfinite": "skip", "optim.fused": fused, "train.log_every": 2})
        assert train(cfg)["counters"]["nonfinite_steps"] == 1
        m, _, _ = load_method(cfg.run_dir, "latest")
        weights[fused] = torch.cat([p.detach().flatten() for p in m.parameters()])
        losses[fused] = [r["loss"] for r in cfg_metrics(cfg)]
    assert torch.allclose(weights[False], weights[True], atol=1e-6)
    assert all(math.isfinite(v) for v in losses[True]) and losses[True] == pytest.approx(losses[False], rel=1e-5)


def cfg_metrics(cfg):
    from workbench.engine.rundir import RunDir

    return RunDir(cfg.run_dir).read_metrics("train")


@pytest.mark.parametrize("fused", [False, True])
def test_a_skipped_last_step_still_ends_the_run(tiny_cfg, monkeypatch, fused):
    """A non-finite final step under ``skip`` still gets the final log, evaluation and checkpoint (the synchronous
    path used to jump over them)."""
    from workbench.engine.rundir import RunDir
    from workbench.methods.supervised import Supervised

    orig = Supervised.training_step

    def nan_last(self, batch, step):
        out = orig(self, batch, step)
        if step.iteration == step.total_iters - 1:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(Supervised, "training_step", nan_last)
    cfg = tiny_cfg(name="last", **{"optim.nonfinite": "skip", "optim.fused": fused, "train.log_every": 4})
    s = train(cfg)
    assert s["finished"] and s["counters"]["nonfinite_steps"] == 1
    rd = RunDir(cfg.run_dir)
    assert [r["step"] for r in rd.read_metrics("eval")][-1] == 4
    assert [r["step"] for r in rd.read_metrics("train")] == [4]
    assert torch.load(rd.latest, weights_only=False)["step"] == 4
