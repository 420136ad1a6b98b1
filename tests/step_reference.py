"""A reference record of every method's training step under its default config, to hold refactors to "no behaviour
change": two optimiser steps of the tiny model on the tiny dataset from fixed weights, batches and RNG seeds; per
step the loss, every logged term and a digest of every parameter's gradient (sum, sum of |g|, L2 norm).

    python tests/step_reference.py --write     # records tests/data/step_reference.json (only when a change of the
                                               # steps' numerics is intended; say so in the commit)

tests/test_step_reference.py recomputes the record and compares it with the stored one (relative 1e-5: the same
computation on another CPU rounds a few last bits differently).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import TINY_SPEC, tiny_config_dict

METHODS = ("supervised", "fixmatch", "meanteacher", "unimatch", "maskmatch", "s4mim", "scalematch", "corrmatch",
           "rankmatch")
STORED = Path(__file__).resolve().parent / "data" / "step_reference.json"


def _digest(t: torch.Tensor) -> list[float]:
    d = t.detach().double()
    return [float(d.sum()), float(d.abs().sum()), float(d.norm())]


def reference_steps(name: str, data_root: Path, out_dir: Path, steps: int = 2) -> dict[str, Any]:
    """The record of ``steps`` training steps of method ``name`` (default config, tiny model)."""
    from workbench.config import config_from_dict
    from workbench.data.dataset import SegDataset, StepDataset, StepPlan
    from workbench.engine.trainer import build_from_config
    from workbench.methods import SemiBatch, StepInfo

    torch.set_num_threads(2)
    cfg = config_from_dict(tiny_config_dict(out_dir, data_root, **{"method.name": name}))
    torch.manual_seed(0)
    method = build_from_config(cfg, 6, torch.device("cpu"))
    method.train()
    lab, unl = SegDataset(data_root, "labeled_1-4"), SegDataset(data_root, "unlabeled_1-4")
    ds = StepDataset(lab, unl, StepPlan(len(lab), len(unl), 2, 2, 1, 0, 0, True), 32)
    ds.total_steps = steps
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    record: list[dict[str, Any]] = []
    for i in range(steps):
        batch = SemiBatch.from_loader(ds[i], torch.device("cpu"), cfg.data.mean, cfg.data.std)
        info = StepInfo(i, 0, 10, 10, capture=False)
        torch.manual_seed(100 + i)
        out = method(batch, info)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        logs = {k: float(v) for k, v in sorted(out.logs.items())}
        grads = {n: _digest(p.grad) for n, p in method.named_parameters() if p.grad is not None}
        record.append({"loss": float(out.loss.detach()), "logs": logs, "grads": grads})
        opt.step()
        method.after_step(info)
    return {"steps": record}


def all_records(data_root: Path) -> dict[str, Any]:
    """The record of every method."""
    with tempfile.TemporaryDirectory() as tmp:
        return {m: reference_steps(m, data_root, Path(tmp) / m) for m in METHODS}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help=f"write {STORED}")
    a = p.parse_args()
    from workbench.data.synthetic import SyntheticSpec, generate_synthetic

    with tempfile.TemporaryDirectory() as tmp:
        root = generate_synthetic(Path(tmp) / "synthetic", SyntheticSpec.from_dict(TINY_SPEC), progress=False)
        records = all_records(root)
    text = json.dumps(records, indent=1, sort_keys=True) + "\n"
    if a.write:
        STORED.parent.mkdir(parents=True, exist_ok=True)
        STORED.write_text(text)
        print(f"wrote {STORED} ({len(records)} methods)")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
