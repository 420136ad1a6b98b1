"""Region propagation of two code versions on identical inputs: outputs compared, times interleaved.

Loads ``workbench/ops/correlation.py`` from an older checkout (``--old``) next to this one's and times both on the
inputs of ``benchmarks/region_propagation.py`` (``make_inputs``: CorrMatch-like shapes and pseudo-labels, one
scenario per row), alternating old/new call by call so that both see the same background load; every output pair
must be identical. Reports the median and min-max per version and the per-pair ratio new/old.

    PYTHONPATH=. python benchmarks/region_propagation_versions.py --old /path/to/old/checkout --size 129 --batch 2
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from region_propagation import make_inputs

from workbench.ops.correlation import region_propagation


def load_old(root: Path):
    """``region_propagation`` of ``root/workbench/ops/correlation.py`` (``ops`` imports nothing of the package)."""
    spec = importlib.util.spec_from_file_location("old_correlation", root / "workbench/ops/correlation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.region_propagation


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", type=Path, required=True)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--shapes", type=int, default=128)
    p.add_argument("--size", type=int, default=129)
    p.add_argument("--feat", type=int, default=9)
    p.add_argument("--classes", type=int, default=21)
    p.add_argument("--tau", type=float, default=0.85)
    p.add_argument("--pairs", type=int, default=7)
    p.add_argument("--scenarios", default="early,mid,late,salt")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    old = load_old(args.old)
    rows = []
    for scenario in args.scenarios.split(","):
        pseudo, conf, shapes = make_inputs(args.batch, args.shapes, args.size, args.feat, args.classes, 0, scenario)
        times = {"old": [], "new": []}
        for _ in range(args.pairs):
            for name, fn in (("old", old), ("new", region_propagation)):
                t0 = time.perf_counter()
                out = fn(pseudo, conf, shapes, args.tau, args.classes, check=False)
                times[name].append(time.perf_counter() - t0)
                if name == "old":
                    ref = out
            if not (torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])):
                raise SystemExit(f"{scenario}: the two versions differ")
        ratio = [n / o for n, o in zip(times["new"], times["old"])]
        row = {"scenario": scenario, "relabelled": int((ref[0] != pseudo).sum()),
               **{f"{k}_s": {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in times.items()},
               "new_over_old": {"median": statistics.median(ratio), "min": min(ratio), "max": max(ratio)}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    res = {"command": "python " + " ".join(sys.argv), "batch": args.batch, "shapes": args.shapes, "size": args.size,
           "classes": args.classes, "tau": args.tau, "pairs": args.pairs, "load_average_1min": os.getloadavg()[0],
           "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
