"""Benchmark: vectorised CorrMatch region propagation vs the per-image, per-shape loop with ``torch.unique``.

Inputs mimic a CorrMatch step on Pascal at crop 321: B = 8 images, M = 128 shapes, 21 classes, shapes made by
``shapes_from_rows`` from a 21x21 correlation map (output stride 16) of synthetic features that follow a blob
layout, cleared of an ignored border and a CutMix box. Regimes (see ``make_inputs``): ``early`` / ``mid`` /
``late`` training (pseudo-labels from smooth logits of rising sharpness, so more and more shapes pass the r1 test)
and ``salt`` (a stress test: i.i.d. label noise inside confident regions). Both implementations must give identical
outputs (asserted). The script prints one JSON object (timings in seconds, speed-ups, the share of (image, shape)
pairs that pass the r1 test, relabelled pixels) and writes it to reports/bench/region_propagation.json. The loop skips
a shape that fails r1 cheaply, so its cost, and the speed-up, grow with that share; the vectorised op always reads
every shape once (one int8 matrix product), which bounds the speed-up when few shapes pass.

Usage: ``PYTHONPATH=. python benchmarks/region_propagation.py [--repeats 3] [--threads 1] [--scenarios ...]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from workbench.engine.bench import write_result
from workbench.ops.correlation import (
    correlation_map,
    region_propagation,
    region_propagation_reference,
    sample_rows,
    shapes_from_rows,
)

SCENARIOS = {"early": 8.0, "mid": 10.0, "late": 14.0, "salt": None}  # logit sharpness of the coherent ones


def make_inputs(
    batch: int, num_shapes: int, size: int, feat: int, num_classes: int, seed: int, scenario: str = "mid"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Synthetic (pseudo, confident, shapes) with object-like structure.

    A ground-truth layout at feature resolution (each pixel takes the class of the nearest of 6 random seeds) gives
    the correlation shapes: CorrMatch's two projections ``w1, w2`` = class embedding + independent noise, so a row
    of the map picks out the region of its class (~18% of the image). Pseudo-labels, coherent regimes: logits =
    ``SCENARIOS[scenario]`` * bilinearly upsampled one-hot layout + 3.5 * smooth per-class noise, so confidence drops
    at class boundaries and confidently wrong pixels come in blobs; confident = max softmax > 0.85. ``salt``: the
    layout upsampled with 3% of pixels flipped to random classes independently (nearly every shape then holds
    confident pixels of other classes), confidence from smooth noise. Finally an ignored border and
    one 100x100 CutMix box per image are cleared from the shapes and the confident mask.
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {sorted(SCENARIOS)}, got {scenario!r}")
    g = torch.Generator().manual_seed(seed)
    seeds = torch.rand(batch, 6, 2, generator=g) * feat
    seed_cls = torch.randint(num_classes, (batch, 6), generator=g)
    yy, xx = torch.meshgrid(torch.arange(feat, dtype=torch.float32), torch.arange(feat, dtype=torch.float32),
                            indexing="ij")
    grid = torch.stack((yy, xx), -1).reshape(1, -1, 1, 2)
    layout = seed_cls.gather(1, ((grid - seeds[:, None]) ** 2).sum(-1).argmin(-1))  # [B, feat*feat]
    embed = torch.randn(num_classes, num_classes, generator=g)
    w1, w2 = ((embed[layout] + 0.1 * torch.randn(batch, feat * feat, num_classes, generator=g))
              .transpose(1, 2).reshape(batch, num_classes, feat, feat) for _ in range(2))
    corr = correlation_map(w1, w2)
    rows = sample_rows(batch, feat * feat, num_shapes, generator=g)
    shapes = shapes_from_rows(corr, rows, (feat, feat), (size, size))

    def smooth(channels: int, grid_size: int) -> torch.Tensor:
        field = torch.randn(batch, channels, grid_size, grid_size, generator=g)
        return F.interpolate(field, size=(size, size), mode="bilinear", align_corners=True)

    if SCENARIOS[scenario] is not None:
        onehot = F.one_hot(layout.reshape(batch, feat, feat), num_classes).permute(0, 3, 1, 2).float()
        logits = SCENARIOS[scenario] * F.interpolate(onehot, size=(size, size), mode="bilinear", align_corners=True)
        confidence, pseudo = (logits + 3.5 * smooth(num_classes, 6)).softmax(dim=1).max(dim=1)
        confident = confidence > 0.85
    else:
        pseudo = F.interpolate(layout.reshape(batch, 1, feat, feat).float(), size=(size, size), mode="nearest")
        pseudo = pseudo.reshape(batch, size, size).long()
        flip = torch.rand(batch, size, size, generator=g) < 0.03
        pseudo = torch.where(flip, torch.randint(num_classes, pseudo.shape, generator=g), pseudo)
        noise = F.interpolate(torch.rand(batch, 1, 12, 12, generator=g), size=(size, size), mode="bilinear",
                              align_corners=True)
        confident = noise.reshape(batch, size, size) > 0.25
    keep = torch.zeros(batch, size, size, dtype=torch.bool)
    keep[:, : size - 20, : size - 30] = True
    for b in range(batch):
        y0, x0 = torch.randint(size - 100, (2,), generator=g).tolist()
        keep[b, y0 : y0 + 100, x0 : x0 + 100] = False
    return pseudo, confident & keep, shapes & keep[:, None]


def best_time(fn, repeats: int) -> tuple[float, object]:
    """Median wall time over ``repeats`` calls of ``fn()`` and its last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def pass_rate(confident: torch.Tensor, shapes: torch.Tensor, tau: float) -> float:
    """Share of (image, shape) pairs whose r1 = |S & Q| / |S| passes (``|S & Q| > 0`` and ``r1 >= tau``)."""
    inside = (shapes & confident[:, None]).flatten(2).sum(-1)
    return round(float(((inside > 0) & ~(inside / shapes.flatten(2).sum(-1) < tau)).float().mean()), 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--shapes", type=int, default=128)
    parser.add_argument("--size", type=int, default=321)
    parser.add_argument("--feat", type=int, default=21)
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--tau", type=float, default=0.85)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scenarios", default="early,mid,late,salt")
    parser.add_argument("--min-speedup", type=float, default=5.0)
    parser.add_argument("--out", default="reports/bench/region_propagation.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for scenario in args.scenarios.split(","):
        pseudo, confident, shapes = make_inputs(
            args.batch, args.shapes, args.size, args.feat, args.classes, args.seed, scenario)
        vec_time, (vec_pseudo, vec_conf) = best_time(
            lambda: region_propagation(pseudo, confident, shapes, args.tau, num_classes=args.classes), args.repeats)
        loop_time, (loop_pseudo, loop_conf) = best_time(
            lambda: region_propagation_reference(pseudo, confident, shapes, args.tau), args.repeats)
        assert torch.equal(vec_pseudo, loop_pseudo), f"{scenario}: vectorised and loop pseudo-labels differ"
        assert torch.equal(vec_conf, loop_conf), f"{scenario}: vectorised and loop confident masks differ"
        rows.append({
            "scenario": scenario, "pass_r1": pass_rate(confident, shapes, args.tau),
            "pixels_relabelled": int((vec_pseudo != pseudo).sum()),
            "confident_in": round(float(confident.float().mean()), 3),
            "confident_out": round(float(vec_conf.float().mean()), 3),
            "loop_seconds": round(loop_time, 4), "vectorised_seconds": round(vec_time, 4),
            "speedup": round(loop_time / vec_time, 2), "meets_min_speedup": loop_time / vec_time >= args.min_speedup,
            "outputs_equal": True,
        })
    result = {
        "benchmark": "region_propagation",
        "command": "PYTHONPATH=. python " + " ".join(sys.argv),
        "batch": args.batch, "shapes": args.shapes, "size": [args.size, args.size], "feat": [args.feat, args.feat],
        "classes": args.classes, "tau": args.tau, "threads": args.threads, "repeats (median)": args.repeats,
        "min_speedup": args.min_speedup, "scenarios": rows,
        "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
