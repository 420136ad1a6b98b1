"""Benchmark (paper Table 5): ScaleMatch's peak training memory depends on the largest sampled scale, not on how
many scales the set V holds; feeding every scale at once (multi-resolution input, MRI) grows with the set.

Each configuration runs in a fresh subprocess (so one configuration's high-water mark cannot hide another's): the
tiny DeepLabV3+ of the workbench's default model config, ScaleMatch with every component on (ISVC, FSVC, CIF),
random batches of ``--batch`` labeled + ``--batch`` unlabeled ``--crop``-pixel images, full training steps (forward,
backward, SGD step), ``--min-steps`` of them; with ``scale_sampling: choice`` the steps continue (seeded) until
every scale of V has been drawn at least once, so the step with the largest scale is always among them. Peak memory:
on CPU the growth of the process's peak RSS over the steps (``workbench.engine.bench.peak_rss_mb``; the children run
with ``MALLOC_MMAP_THRESHOLD_=131072`` so freed tensors leave the RSS) and the absolute peak; on CUDA
``max_memory_allocated`` above the model and batches. Writes JSON (``--out``, default
reports/bench/scalematch_memory.json) and prints it.

Usage: ``PYTHONPATH=. python benchmarks/scalematch_memory.py [--crop 96] [--batch 4] [--device cpu] [--threads 1]``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from workbench.engine.bench import write_result

# (name, ScaleMatch overrides): Table 5's rows; "no scale branch" = neither ISVC nor CIF (FixMatch + FSVC)
CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("no scale branch", {"isvc": False, "cif": False}),
    ("V={0.5}", {"scales": [0.5]}),
    ("V={2.0}", {"scales": [2.0]}),
    ("V={0.5,2.0}", {"scales": [0.5, 2.0]}),
    ("V={0.25,0.5,1.5,2.0}", {"scales": [0.25, 0.5, 1.5, 2.0]}),
    ("MRI V={0.5,2.0} (all at once)", {"scales": [0.5, 2.0], "scale_sampling": "all"}),
    ("MRI V={0.25,0.5,1.5,2.0} (all at once)", {"scales": [0.25, 0.5, 1.5, 2.0], "scale_sampling": "all"}),
]


def child(args: argparse.Namespace) -> dict[str, Any]:
    """Run one configuration in this process and return its measurements."""
    from workbench.config import config_from_dict
    from workbench.engine.bench import peak_rss_mb, random_batch
    from workbench.engine.build import build_from_config
    from workbench.engine.optim import build_sgd
    from workbench.methods import StepInfo

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = json.loads(args.child)
    device = torch.device(args.device)
    cfg = config_from_dict({"model": {"aspp_rates": [2, 4, 6]},
                            "method": {"name": "scalematch", "cif_warmup_epochs": 0, "tau": 0.0, **overrides}})
    torch.manual_seed(0)
    method = build_from_config(cfg, args.classes, device)
    method.train()
    opt = build_sgd(method.param_groups(0.001), 0.9, 1e-4)
    g = torch.Generator().manual_seed(0)
    batch = random_batch(args.classes, args.batch, args.crop, True, device, g)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    rss0 = peak_rss_mb()
    needed = set(cfg.method.scales) if cfg.method.scale_branch and cfg.method.scale_sampling == "choice" else set()
    seen: list[float] = []
    step, t0 = 0, time.perf_counter()
    while step < args.min_steps or (needed - set(seen) and step < args.max_steps):
        opt.zero_grad(set_to_none=True)
        out = method.training_step(batch, StepInfo(step, 0, args.max_steps, args.max_steps))
        out.loss.backward()
        opt.step()
        if "scale" in out.logs:
            seen.append(float(out.logs["scale"]))
        step += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    res = {"steps": step, "seconds_per_step": (time.perf_counter() - t0) / step, "scales_drawn": seen,
           "largest_scale": max(seen) if seen else None, "all_scales_drawn": not (needed - set(seen))}
    if device.type == "cuda":
        res["peak_memory_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        res["peak_rss_mb"] = peak_rss_mb()
        res["peak_rss_growth_mb"] = peak_rss_mb() - rss0
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--batch", type=int, default=4, help="labeled images per step (as many unlabeled)")
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--min-steps", type=int, default=8, help="steps per configuration (at least)")
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = leave the default)")
    parser.add_argument("--out", default="reports/bench/scalematch_memory.json", help="JSON path ('' = print only)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args)))
        return
    rows = []
    for name, overrides in CONFIGS:
        cmd = [sys.executable, __file__, "--child", json.dumps(overrides), "--device", args.device,
               "--crop", str(args.crop), "--batch", str(args.batch), "--classes", str(args.classes),
               "--min-steps", str(args.min_steps), "--max-steps", str(args.max_steps), "--threads", str(args.threads)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                                          os.environ.get("PYTHONPATH")])),
               # glibc: every block >= 128 KiB is mmap'd and unmapped when freed (no dynamic threshold), so the peak
               # RSS follows the peak of live tensors instead of heap fragmentation
               "MALLOC_MMAP_THRESHOLD_": "131072"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"configuration {name!r} failed:\n{proc.stderr}")
        row = {"config": name, "method_overrides": overrides, **json.loads(proc.stdout.strip().splitlines()[-1])}
        key = "peak_memory_mb" if "peak_memory_mb" in row else "peak_rss_growth_mb"
        print(f"{name}: {row[key]:.0f} MB ({row['steps']} steps, largest scale {row['largest_scale']})",
              file=sys.stderr)
        rows.append(row)
    result = {
        "benchmark": "ScaleMatch peak training memory vs the scale set (paper Table 5)",
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__, "threads": args.threads, "crop": args.crop,
        "batch_labeled": args.batch, "batch_unlabeled": args.batch,
        "model": "resnet18 width 0.25, head width 0.25, output stride 8 (workbench default)",
        "memory_measure": "cuda max_memory_allocated above model and batches" if args.device.startswith("cuda")
        else "growth of the subprocess's peak RSS over the training steps (peak_rss_growth_mb; glibc "
        "MALLOC_MMAP_THRESHOLD_=131072 in the subprocesses)",
        "rows": rows, "command": "python " + " ".join(sys.argv),
    }
    write_result(result, args.out)


if __name__ == "__main__":
    main()
