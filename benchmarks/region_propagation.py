"""Benchmark: vectorised CorrMatch region propagation vs the per-image, per-shape loop with ``torch.unique``.

Inputs mimic a CorrMatch step on Pascal at crop 321: B = 8 images, M = 128 shapes, 21 classes, a 21x21 correlation
map (output stride 16) of synthetic features that follow a blob layout, shapes made by ``shapes_from_rows`` and
cleared of a CutMix box and an ignored border. Both implementations must give identical outputs; the script prints
one JSON object (timings in seconds, speed-up) and writes it to reports/bench/region_propagation.json.

Usage: ``PYTHONPATH=. python benchmarks/region_propagation.py [--repeats 3] [--threads 1] [--min-speedup 5]``;
the exit status is 1 when the speed-up is below ``--min-speedup``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from workbench.ops.correlation import correlation_map, region_propagation, sample_rows, shapes_from_rows


def loop_region_propagation(
    pseudo: torch.Tensor, confident: torch.Tensor, shapes: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Baseline: the rule run image by image and shape by shape, classes counted with ``torch.unique``."""
    pseudo, out_conf = pseudo.clone(), confident.clone()
    for b in range(shapes.shape[0]):
        for m in range(shapes.shape[1]):
            shape = shapes[b, m]
            inside = shape & confident[b]
            n_inside = inside.sum()
            if n_inside == 0 or n_inside / shape.sum() < tau:
                continue
            classes, counts = torch.unique(pseudo[b][inside], return_counts=True)
            if counts.max() / counts.sum() > tau:
                pseudo[b][shape] = classes[counts.argmax()]
                out_conf[b] |= shape
    return pseudo, out_conf


def make_inputs(
    batch: int, num_shapes: int, size: int, feat: int, num_classes: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Synthetic (pseudo, confident, shapes) with object-like structure; see the module docstring."""
    g = torch.Generator().manual_seed(seed)
    # a blob layout at feature resolution: each pixel takes the class of its nearest of 6 random seeds
    seeds = torch.rand(batch, 6, 2, generator=g) * feat
    seed_cls = torch.randint(num_classes, (batch, 6), generator=g)
    yy, xx = torch.meshgrid(torch.arange(feat, dtype=torch.float32), torch.arange(feat, dtype=torch.float32),
                            indexing="ij")
    grid = torch.stack((yy, xx), -1).reshape(1, -1, 1, 2)
    nearest = ((grid - seeds[:, None]) ** 2).sum(-1).argmin(-1)  # [B, feat*feat]
    layout = seed_cls.gather(1, nearest)
    # two projections (CorrMatch's w1, w2) = class embedding + independent noise -> object-sized shapes (~20%)
    embed = torch.randn(num_classes, num_classes, generator=g)
    w1, w2 = ((embed[layout] + 0.1 * torch.randn(batch, feat * feat, num_classes, generator=g))
              .transpose(1, 2).reshape(batch, num_classes, feat, feat) for _ in range(2))
    corr = correlation_map(w1, w2)
    rows = sample_rows(batch, feat * feat, num_shapes, generator=g)
    shapes = shapes_from_rows(corr, rows, (feat, feat), (size, size))
    # pseudo-label: the layout upsampled, with 3% of pixels flipped; confidence: smooth noise, ~75% confident
    pseudo = F.interpolate(layout.reshape(batch, 1, feat, feat).float(), size=(size, size), mode="nearest")
    pseudo = pseudo.reshape(batch, size, size).long()
    flip = torch.rand(batch, size, size, generator=g) < 0.03
    pseudo = torch.where(flip, torch.randint(num_classes, pseudo.shape, generator=g), pseudo)
    noise = F.interpolate(torch.rand(batch, 1, 12, 12, generator=g), size=(size, size), mode="bilinear",
                          align_corners=True).reshape(batch, size, size)
    confident = noise > 0.25
    # ignored border and a CutMix box, cleared from the shapes and the confident mask
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
    parser.add_argument("--min-speedup", type=float, default=5.0)
    parser.add_argument("--out", default="reports/bench/region_propagation.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pseudo, confident, shapes = make_inputs(args.batch, args.shapes, args.size, args.feat, args.classes, args.seed)
    vec_time, (vec_pseudo, vec_conf) = best_time(
        lambda: region_propagation(pseudo, confident, shapes, args.tau, num_classes=args.classes), args.repeats)
    loop_time, (loop_pseudo, loop_conf) = best_time(
        lambda: loop_region_propagation(pseudo, confident, shapes, args.tau), args.repeats)
    assert torch.equal(vec_pseudo, loop_pseudo), "vectorised and loop pseudo-labels differ"
    assert torch.equal(vec_conf, loop_conf), "vectorised and loop confident masks differ"

    speedup = loop_time / vec_time
    result = {
        "benchmark": "region_propagation",
        "command": "PYTHONPATH=. python " + " ".join(sys.argv),
        "batch": args.batch, "shapes": args.shapes, "size": [args.size, args.size], "feat": [args.feat, args.feat],
        "classes": args.classes, "tau": args.tau, "threads": args.threads, "repeats": args.repeats,
        "mean_shape_fraction": round(float(shapes.float().mean()), 4),
        "confident_fraction_in": round(float(confident.float().mean()), 4),
        "confident_fraction_out": round(float(vec_conf.float().mean()), 4),
        "pixels_relabelled": int((vec_pseudo != pseudo).sum()),
        "loop_seconds": round(loop_time, 4), "vectorised_seconds": round(vec_time, 4),
        "speedup": round(speedup, 2), "min_speedup": args.min_speedup, "outputs_equal": True,
        "torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor(),
    }
    text = json.dumps(result, indent=2)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    return 0 if speedup >= args.min_speedup else 1


if __name__ == "__main__":
    sys.exit(main())
