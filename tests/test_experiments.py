"""experiments/ablation.py: tables merged from earlier ablations' results (no training)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import ablation
import fidelity


def write_results(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True)
    full = [{"run": "x", "fg_iou": 0.5, "fg_class_acc": 0.5, "mask_ratio": 0.5, "pl_acc": 0.9, "seconds": 10.0, **r}
            for r in rows]
    (folder / "results.json").write_text(json.dumps({"rows": full}))
    return folder


def test_include_merges_seeds_pairs_with_baseline_and_rejects_duplicates(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = write_results(tmp_path / "a", [{"variant": "rank", "seed": 1, "miou": 0.40},
                                       {"variant": "base", "seed": 1, "miou": 0.50}])
    b = write_results(tmp_path / "b", [{"variant": "base", "seed": 0, "miou": 0.30},
                                       {"variant": "rank", "seed": 0, "miou": 0.45},
                                       {"variant": "rank", "seed": 7, "miou": 0.99}])
    assert ablation.main(["--name", "merged", "--seeds", "0", "1", "--include", str(a), "--include", str(b),
                          "--baseline", "base"]) == 0
    out = json.loads((tmp_path / "reports/ablation/merged/results.json").read_text())
    # first-seen variant order (rank, base), seeds ascending within a variant; seed 7 was not asked for
    assert [(r["variant"], r["seed"]) for r in out["rows"]] == [("rank", 0), ("rank", 1), ("base", 0), ("base", 1)]
    # paired by seed: rank - base = +0.15 (seed 0), -0.10 (seed 1), mean +0.025
    assert [round(r["d_miou"], 6) for r in out["rows"]] == [0.15, -0.1, 0.0, 0.0]
    table = (tmp_path / "reports/ablation/merged/table.md").read_text()
    assert "| rank | 0.425 | 0.450, 0.400 | +0.025 |" in table
    with pytest.raises(SystemExit, match="both"):
        ablation.main(["--name", "dup", "--seeds", "1", "--include", str(a), "--include", str(a)])
    with pytest.raises(SystemExit, match="no results.json"):
        ablation.main(["--name", "none", "--seeds", "0", "--include", str(tmp_path / "missing")])


def test_fidelity_compares_one_step_on_identical_inputs(tmp_path, tiny_cfg):
    """experiments/fidelity.py: the same config twice gives identical losses and gradients (difference 0, cosine 1);
    a switch that changes the loss (RankMatch's floor guard at tau 0 on the tiny model) gives a non-zero difference
    and keeps every parameter shared (the switch adds none)."""

    cfg = tiny_cfg(**{"method.name": "rankmatch", "method.tau": 0.0, "method.num_agents": 4})
    from workbench.config import apply_overrides, config_from_dict, config_to_dict

    steps = fidelity.batches(cfg, 0, 2)
    assert len(steps) == 2
    # with gradient accumulation a step is several micro-batches, as the trainer reads them: 2 steps x 2 = 4
    accum = fidelity.batches(tiny_cfg(**{"method.name": "rankmatch", "optim.grad_accum": 2}), 0, 2)
    assert len(accum) == 4 and not torch.equal(accum[0].x_l, accum[1].x_l)
    same = fidelity.compare(cfg, cfg, None, steps, 0, 6)
    for r in same["rows"]:
        assert r["loss_default"] == r["loss_switch"] and r["grad_rel_diff"] == 0.0
        assert r["grad_cosine"] == pytest.approx(1.0)
    weight = config_from_dict(apply_overrides(config_to_dict(cfg), ["method.weight_rank=0.0"]))
    diff = fidelity.compare(cfg, weight, None, steps, 0, 6)
    assert (diff["missing_keys"], diff["unexpected_keys"]) == (0, 0)
    for r in diff["rows"]:
        # lambda = 0 removes exactly 0.1 x loss_rank from the default's loss
        expected = r["loss_default"] - 0.1 * r["logs_default"]["loss_rank"]
        assert r["loss_switch"] == pytest.approx(expected, rel=1e-5)
        assert r["grad_rel_diff"] > 0
