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
