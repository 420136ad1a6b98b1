import copy
import math

import pytest
import torch
from torch import nn

from workbench.engine.optim import build_sgd, ema_update, poly_factor, scaled_lr, set_poly_lr


def test_poly_values_by_hand():
    # (1 - 50/100)^0.9 = 0.5^0.9 = 0.535886731...
    assert poly_factor(50, 100, 0.9) == pytest.approx(0.5358867312681466)
    assert poly_factor(0, 100) == 1.0 and poly_factor(100, 100) == 0.0
    assert poly_factor(25, 100, 1.0) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        poly_factor(101, 100)


def test_set_poly_lr_keeps_constant_groups():
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = build_sgd([{"params": [a], "lr": 0.01, "base_lr": 0.01, "poly": True},
                     {"params": [b], "lr": 0.1, "base_lr": 0.1, "poly": False}], 0.9, 0.0)
    set_poly_lr(opt, 75, 100, 1.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0025)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.1)


def test_parameter_in_two_groups_rejected():
    a = nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError):
        build_sgd([{"params": [a], "lr": 1, "base_lr": 1}, {"params": [a], "lr": 1, "base_lr": 1}], 0.9, 0)


def test_lr_scaling_rules():
    assert scaled_lr(0.001, 16, 8, "linear") == pytest.approx(0.002)
    assert scaled_lr(0.001, 2, 8, "sqrt") == pytest.approx(0.0005)
    assert scaled_lr(0.001, 2, 8, "none") == 0.001
    with pytest.raises(ValueError):
        scaled_lr(0.001, 2, 8, "cubic")


def test_ema_arithmetic():
    student = nn.BatchNorm1d(2)
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        teacher.weight.copy_(torch.tensor([1.0, 2.0]))
        student.weight.copy_(torch.tensor([3.0, 6.0]))
        student.running_mean.copy_(torch.tensor([10.0, 0.0]))
        student.num_batches_tracked.fill_(7)
    ema_update(teacher, student, 0.75)
    # 0.75 * 1 + 0.25 * 3 = 1.5 ; 0.75 * 2 + 0.25 * 6 = 3.0
    assert torch.allclose(teacher.weight, torch.tensor([1.5, 3.0]))
    # running mean: 0.75 * 0 + 0.25 * 10 = 2.5
    assert torch.allclose(teacher.running_mean, torch.tensor([2.5, 0.0]))
    assert int(teacher.num_batches_tracked) == 7
    assert math.isclose(float(student.weight[0].detach()), 3.0)
