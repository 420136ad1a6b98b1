"""Op-level effect of two deviation switches at the papers' tensor sizes (no training, CPU, about a minute).

    python experiments/fidelity_ops.py            # reports/fidelity/ops.json and ops.md

- **RankMatch ``rank_guard``** (``reference`` vs ``floor``): the rank loss and its gradient with respect to the strong
  features at a 321 crop (21 x 21 ASPP cells at output stride 16, 256 channels, 64 orthogonal agents, top-4), on
  ReLU features whose scale makes the agent softmax as peaked as a trained network's (a share of top-4 values below
  1e-10 is printed). Three feature scales, three seeds each.
- **OHEM ``ohem_min_kept_images``** (2, per process as the reference, vs ``null``, unscaled): pixels kept and loss on
  one batch of 8 Cityscapes-sized crops (801 x 801, 19 classes) with a trained-like GT probability spread.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from workbench.engine.rundir import atomic_write_text
from workbench.methods.rankmatch import correlation_consistency
from workbench.ops.agents import agent_correlation, orthogonal_agents
from workbench.ops.losses import ohem_ce_loss, ohem_min_kept_for


def rank_guard_case(scale: float, seed: int) -> dict:
    """Reference vs floor guard on one batch of 2 images' features at ``scale``."""
    g = torch.Generator().manual_seed(seed)
    feat_w = torch.relu(torch.randn(2, 256, 21, 21, generator=g)) * scale
    noise = 0.5 * scale * torch.randn(2, 256, 21, 21, generator=g)
    out = {"scale": scale, "seed": seed}
    torch.manual_seed(seed)
    agents = orthogonal_agents(feat_w, 64)
    corr_w = agent_correlation(feat_w, agents, False, 1.0)
    out["top4_below_1e-10"] = float((corr_w.topk(4, dim=-1).values < 1e-10).float().mean())
    grads = {}
    for guard in ("reference", "floor"):
        feat_s = torch.relu(feat_w + noise).requires_grad_(True)
        corr_s = agent_correlation(feat_s, agents, False, 1.0)
        loss = correlation_consistency(corr_w, corr_s, "rank", k=4, eps=1e-10, guard=guard)
        loss.backward()
        out[f"loss_{guard}"] = float(loss.detach())
        grads[guard] = feat_s.grad.flatten().double()
    out["grad_rel_diff"] = float((grads["floor"] - grads["reference"]).norm() / grads["reference"].norm())
    return out


def ohem_case(seed: int) -> dict:
    """Pixels kept and loss for 8 images of 801 x 801 with and without the per-process scaling."""
    g = torch.Generator().manual_seed(seed)
    b, k, h, w = 8, 19, 801, 801
    target = torch.randint(0, k, (b, h, w), generator=g)
    # GT logit margin drawn so that most pixels are easy (p_gt near 1) and a few percent are hard (p_gt <= 0.7), as
    # for a network past its first epochs: the minimum kept count, not the threshold, then decides what is kept
    margin = torch.randn(b, h, w, generator=g) * 2.5 + 9
    logits = torch.randn(b, k, h, w, generator=g)
    logits.scatter_add_(1, target[:, None], margin[:, None])
    out = {"seed": seed, "pixels": b * h * w}
    p_gt = logits.softmax(1).gather(1, target[:, None])[:, 0]
    for name, images in (("per_process", 2), ("unscaled", None)):
        min_kept = ohem_min_kept_for(200000, b, images)
        kth = p_gt.flatten().kthvalue(min_kept).values
        out[f"min_kept_{name}"] = min_kept
        out[f"kept_{name}"] = int((p_gt <= kth.clamp(min=0.7)).sum())
        out[f"loss_{name}"] = float(ohem_ce_loss(logits, target, 0.7, 200000, min_kept_images=images))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("reports/fidelity"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rank = [rank_guard_case(scale, seed) for scale in (0.6, 0.8, 1.0) for seed in range(3)]
    ohem = [ohem_case(seed) for seed in range(2)]
    command = "python experiments/fidelity_ops.py " + " ".join(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "ops.json", json.dumps({"command": command, "rank_guard": rank, "ohem": ohem},
                                                        indent=1) + "\n")
    lines = ["# Fidelity at the op level: RankMatch's Plackett-Luce guard, OHEM's minimum per process", "",
             f"Command: `{command.strip()}`", "",
             "## RankMatch `rank_guard` (reference = +1e-10 in every denominator; floor = our scale-free switch)", "",
             "2 images, 21 x 21 ASPP cells x 256 channels (a 321 crop at output stride 16), 64 orthogonal agents, "
             "top-4; ReLU features x scale, a larger scale giving a more peaked agent softmax (the strong view = ReLU(weak + 50% noise)).", "",
             "| feature scale | top-4 values < 1e-10 | loss (reference) | loss (floor) | loss rel. diff | "
             "grad rel. diff |", "|---|---|---|---|---|---|"]
    for scale in sorted({r["scale"] for r in rank}):
        rows = [r for r in rank if r["scale"] == scale]

        def span(key: str, fmt: str = ".3f") -> str:
            vals = [r[key] for r in rows]
            return f"{statistics.median(vals):{fmt}} ({min(vals):{fmt}}-{max(vals):{fmt}})"

        rel = [abs(r["loss_floor"] - r["loss_reference"]) / r["loss_reference"] for r in rows]
        lines.append(f"| {scale} | {span('top4_below_1e-10', '.2f')} | {span('loss_reference', '.4f')} | "
                     f"{span('loss_floor', '.4f')} | {statistics.median(rel):.3f} ({min(rel):.3f}-{max(rel):.3f}) | "
                     f"{span('grad_rel_diff')} |")
    lines += ["", "Median (min-max) over 3 seeds.", "",
              "## OHEM `ohem_min_kept_images` (2 = per process as the reference; null = unscaled)", "",
              "8 crops of 801 x 801, 19 classes, GT logit margin ~ N(9, 2.5^2) over unit-normal logits (a few percent of pixels below the threshold), threshold 0.7, "
              "the reference's min_kept 200000 (per 2 images).", "",
              "| seed | min kept (per process / unscaled) | pixels kept | loss |", "|---|---|---|---|"]
    for r in ohem:
        lines.append(f"| {r['seed']} | {r['min_kept_per_process']} / {r['min_kept_unscaled']} | "
                     f"{r['kept_per_process']} / {r['kept_unscaled']} | {r['loss_per_process']:.4f} / "
                     f"{r['loss_unscaled']:.4f} |")
    atomic_write_text(args.out / "ops.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
