"""The sync-free step: host-read counting, every method's steady-state step, the on-device non-finite skip."""
from __future__ import annotations

import contextlib
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from workbench.config import apply_overrides, config_from_dict
from workbench.engine.bench import random_batch
from workbench.engine.optim import DeferredNonFinite, all_finite, build_sgd, zero_momentum_buffers
from workbench.engine.syncs import count_by_op, host_reads, host_scalar
from workbench.engine.trainer import Trainer, build_from_config, load_method, train
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
    assert count_by_op(reads) == {"item": 4, "tolist": 1, "nonzero": 1}
    assert all("test_syncs.py" in site for site in reads)
    assert "tolist" not in torch.Tensor.__dict__ and "cpu" not in torch.Tensor.__dict__
    with pytest.raises(RuntimeError, match="boom"):
        with host_reads():
            raise RuntimeError("boom")
    assert torch.Tensor.tolist is torch._C.TensorBase.tolist


def test_host_reads_sees_data_dependent_shapes_and_only_them():
    """Every operation whose output size (or a host-side value) depends on the data is one synchronisation on
    CUDA; each call below is one (the backward of a boolean-mask index is an index_put through the mask)."""
    x = torch.randn(6, requires_grad=True)
    mask = torch.tensor([True, False, True, False, False, True])
    y = x.detach().clone()
    picked = x[mask].sum()          # its backward alone is counted below
    calls = {
        "index (bool mask)": [lambda: y[mask], lambda: y[mask.to(torch.uint8).bool()]],
        "index_put (bool mask)": [lambda: y.__setitem__(mask, 0.0), lambda: picked.backward()],
        "nonzero": [lambda: mask.nonzero(), lambda: torch.where(mask), lambda: torch.argwhere(mask)],
        "masked_select": [lambda: y.masked_select(mask)],
        "unique": [lambda: torch.unique(mask), lambda: torch.unique(y, return_counts=True)],
        "unique_consecutive": [lambda: torch.unique_consecutive(mask)],
        "repeat_interleave": [lambda: torch.repeat_interleave(torch.tensor([1, 2]))],
        "bincount": [lambda: torch.bincount(torch.tensor([1, 3]))],
        "histc": [lambda: torch.histc(y, bins=4)],
        "equal": [lambda: torch.equal(y, y)],
        "masked_fill (tensor value)": [lambda: y.masked_fill(mask, torch.tensor(2.0))],
        "item": [lambda: y[0].item(), lambda: bool(y[0] > 0), lambda: y[:torch.tensor(2)]],
        "tolist": [lambda: y.tolist()],
        "numpy": [lambda: y.numpy()],
        "cpu": [lambda: y.cpu()],
    }
    for op, fns in calls.items():
        for fn in fns:
            with host_reads() as reads:
                fn()
            assert count_by_op(reads) == {op: 1}, (op, dict(reads))
    idx = torch.tensor([0, 2])
    with host_reads() as reads:   # fixed-size equivalents: no synchronisation
        y[idx]
        y.index_put_((idx,), torch.tensor(1.0))
        torch.where(mask, y, 0.0)
        y.masked_fill(mask, 2.0)
        torch.nonzero_static(mask, size=6)
        torch.repeat_interleave(y[:2], torch.tensor([1, 2]), output_size=3)
        torch.histc(y, bins=4, min=-3, max=3)
        torch.zeros(3).index_add_(0, idx[:1], y[:1])
        x[idx].sum().backward()
    assert not reads, dict(reads)


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
    """Every method's step runs without a host synchronisation: no Python read, no data-dependent shape."""
    for name, reads in step_reads.items():
        assert not reads, f"{name}: {dict(reads)}"


def confident_method(name: str, scale: float = 50.0, **method):
    """Method ``name`` on the quickstart model, its ``classifier`` convolutions multiplied by ``scale`` (peaked
    softmax: pixels pass the confidence thresholds, so the paths that run on confident pixels run too)."""
    cfg = config_from_dict(apply_overrides({"method": {"name": name, **method}}, ["model.aspp_rates=[2,4,6]"]))
    m = build_from_config(cfg, 6, torch.device("cpu"))
    with torch.no_grad():
        for mod_name, mod in m.named_modules():
            if mod_name.split(".")[-1] == "classifier":
                for p in mod.parameters():
                    p.mul_(scale)
    return m


@pytest.mark.parametrize("name", sorted(METHODS))
def test_confident_steps_read_nothing_back(name, monkeypatch):
    """The third step of every method in a confident state (forward, backward, optimiser, after_step) makes no host
    synchronisation. For CorrMatch the state really runs region propagation: shapes pass and relabel pixels
    (checked after the counted step, from tensors recorded during it)."""
    import workbench.methods.corrmatch as corrmatch_module

    torch.manual_seed(0)
    m = confident_method(name)
    recorded = []
    if name == "corrmatch":
        orig = corrmatch_module.region_propagation

        def spy(pseudo, confident, *args, **kwargs):
            out = orig(pseudo, confident, *args, **kwargs)
            recorded.append((pseudo, out[0], confident, out[1]))
            return out

        monkeypatch.setattr(corrmatch_module, "region_propagation", spy)
    opt = build_sgd(m.param_groups(1e-6), 0.9, 1e-4, fused=True)
    g = torch.Generator().manual_seed(0)
    batches = [random_batch(6, 2, 64, m.uses_unlabeled, torch.device("cpu"), g) for _ in range(2)]
    m.train()
    for i in range(3):
        info = StepInfo(i, 0, 100, 100, False)
        with host_reads() if i == 2 else contextlib.nullcontext(Counter()) as reads:
            opt.zero_grad(set_to_none=True)
            out = m(batches[i % 2], info)
            out.loss.backward()
            opt.step()
            m.after_step(info)
    assert not reads, dict(reads)
    assert torch.isfinite(out.loss)
    if name == "corrmatch":
        pseudo, pseudo_out, conf, conf_out = recorded[-1]
        assert bool(conf.any()) and bool((conf_out & ~conf).any()) and not torch.equal(pseudo, pseudo_out)


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


@pytest.mark.parametrize("fused", [True, None])
def test_sgd_skips_on_device_from_a_zero_momentum_buffer(fused):
    """p = 1, lr 0.1, momentum 0.9, gradients 1, 2, 3, the first step flagged: step 2 gives buf = 2, p = 0.8;
    step 3 buf = 0.9 * 2 + 3 = 4.8, p = 0.8 - 0.48 = 0.32 (the plain SGD run of the last two steps). The fused
    kernel skips by itself; the per-tensor kernel (``fused=None``) is undone on the device, with no host read."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = build_sgd([{"params": [p], "lr": 0.1}], momentum=0.9, weight_decay=0.0, fused=fused)
    zero_momentum_buffers(opt)
    pending = DeferredNonFinite(torch.device("cpu"))
    for i, g in enumerate((1.0, 2.0, 3.0)):
        p.grad = torch.full((3,), g if i else float("nan"))
        with host_reads() as reads:
            good = pending.flag(opt, torch.tensor(0.5 * g), [p], i, {"loss": torch.tensor(0.5 * g)}, [f"id{i}"])
            opt.step()
        assert not reads, dict(reads)
        assert bool(good) == (i > 0)
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


def test_dynamic_threshold_update_is_sync_free():
    """Pixels (softmax over 2 classes): (0, 0) conf 3/4 class 0, (0, 1) conf 9/10 class 0 but ignored, (0, 2) conf
    3/5 class 1. Class maxima 3/4 and 3/5 -> tau = 0.5 * 0.85 + 0.5 * 0.675 = 0.7625; no host synchronisation
    (the ignored pixel is masked, not selected: ``conf[keep]`` would be one per call)."""
    from workbench.ops.threshold import DynamicThreshold, class_max_confidence

    logits = torch.tensor([[math.log(3), math.log(9), 0.0], [0.0, 0.0, math.log(1.5)]]).reshape(1, 2, 1, 3)
    ignore = torch.tensor([[[0, 255, 0]]])
    thr = DynamicThreshold(0.85, 0.5)
    with host_reads() as reads:
        maxima = class_max_confidence(logits, ignore)
        value = thr.update(logits, ignore == 255)
    assert not reads, dict(reads)
    assert maxima.tolist() == pytest.approx([0.75, 0.6])
    assert value.item() == pytest.approx(0.7625)
    all_ignored = class_max_confidence(logits, torch.full((1, 1, 3), 255))
    assert all_ignored.tolist() == [-1.0, -1.0]


def test_region_propagation_is_sync_free_and_equals_the_loop():
    """At a realistic size (2 images of 65x65, 128 shapes, 21 classes, blocky labels) the step's call
    (``check=False``) makes no host synchronisation and equals the authors' loop."""
    from workbench.ops.correlation import region_propagation, region_propagation_reference

    g = torch.Generator().manual_seed(0)
    b, m, h, w, k = 2, 128, 65, 65, 21
    pseudo = torch.randint(k, (b, 1, 4, 4), generator=g).float()
    pseudo = F.interpolate(pseudo, size=(h, w), mode="nearest").long()[:, 0]
    pseudo = torch.where(torch.rand(b, h, w, generator=g) < 0.03, torch.randint(k, (b, h, w), generator=g), pseudo)
    confident = torch.rand(b, h, w, generator=g) < 0.9
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    cx, cy = torch.rand(b, m, 1, 1, generator=g) * w, torch.rand(b, m, 1, 1, generator=g) * h
    shapes = (xx - cx) ** 2 + (yy - cy) ** 2 <= (4 + torch.rand(b, m, 1, 1, generator=g) * 20) ** 2
    tau = torch.tensor(0.8)
    with host_reads() as reads:
        got = region_propagation(pseudo, confident, shapes, tau, k, check=False)
    assert not reads, dict(reads)
    expected = region_propagation_reference(pseudo, confident, shapes, tau)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert not torch.equal(expected[0], pseudo)


def test_ohem_is_sync_free():
    """GT probabilities 0.5, 0.6, 0.8, 0.9 (one pixel ignored): min_kept 2 -> the 2nd smallest is 0.6, below
    thresh 0.7, so t = 0.7 keeps 0.5 and 0.6: loss = -(ln 0.5 + ln 0.6) / 2; no host synchronisation."""
    from workbench.ops.losses import ohem_ce_loss

    p = torch.tensor([0.5, 0.6, 0.8, 0.9, 0.3])
    logits = torch.stack([p.log(), (1 - p).log()]).reshape(1, 2, 1, 5)
    target = torch.tensor([[[0, 0, 0, 0, 255]]])
    with host_reads() as reads:
        loss = ohem_ce_loss(logits, target, 0.7, 2)
        none = ohem_ce_loss(logits, torch.full_like(target, 255), 0.7, 2)
    assert not reads, dict(reads)
    assert loss.item() == pytest.approx(-(math.log(0.5) + math.log(0.6)) / 2, rel=1e-5)
    assert none.item() == 0.0


@pytest.mark.parametrize("fused", [None, False, True])
def test_the_non_finite_verdict_is_deferred_with_every_kernel(tiny_cfg, fused):
    """With amp off the trainer never reads the verdict per step, whatever ``optim.fused``: the optimiser skips a
    flagged step on the device (automatic = the fused kernel on CPU as on CUDA)."""
    from workbench.engine.optim import SkippableSGD

    t = Trainer(tiny_cfg(name=f"defer{fused}", **{"optim.fused": fused}))
    t.setup()
    assert t.deferred and isinstance(t.optimizer, SkippableSGD)
    assert bool(t.optimizer.defaults.get("fused")) == (fused is not False)
