"""The GPU-path switches measured: fp32 vs bf16 autocast vs bf16 + channels_last per method, and the other toggles.

For every method, each precision variant runs ``workbench bench`` in a fresh process (so peak memory is that run's
alone), the variants and methods interleaved round by round so they share the background load; per round the
ratio to the same method's fp32 step is taken, and the median over rounds reported. For UniMatch the other switches
are also turned off one at a time from the full GPU path (bf16 + channels_last + cudnn benchmark + fused SGD), and
``torch.compile`` turned on with ``--compile ROUNDS`` (in the first ROUNDS rounds: compiling takes minutes; the
timed steps come after the warm-up, so compilation is not in them).

    # the issue's setting on a GPU: DeepLabV3+ ResNet-101 (deep stem, output stride 16), 321x321, batch 8+8, 21 classes
    python benchmarks/efficiency.py --preset paper --rounds 3 --compile 1
    # the CPU sanity run: the quickstart model at 64x64
    python benchmarks/efficiency.py --preset small --rounds 2 --threads 1

Writes ``reports/bench/efficiency_<preset>_<device type>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from relative_step import METHODS, SMALL, bench_once

from workbench.engine.bench import write_result
from workbench.engine.rundir import atomic_write_text

PRESETS = {
    "paper": {"crop": 321, "batch": 8, "classes": 21,
              "sets": ["model.backbone=resnet101", "model.stem=deep", "model.width=1.0", "model.head_width=1.0",
                       "model.output_stride=16", "model.aspp_rates=null"]},
    "small": {"crop": 64, "batch": 8, "classes": 6, "sets": SMALL},
}
VARIANTS = {
    "fp32": ["optim.amp=off", "model.channels_last=false"],
    "bf16": ["optim.amp=bf16", "model.channels_last=false"],
    "bf16+channels_last": ["optim.amp=bf16", "model.channels_last=true"],
}
FULL = "bf16+channels_last"
COMMON = ["optim.fused=true", "train.cudnn_benchmark=true"]
"""Every run uses the fused SGD (also on the CPU, where it is not the default) and cudnn autotuning (CUDA only)."""
TOGGLES = {   # UniMatch, each from the full GPU path
    "fused SGD off": ["optim.fused=false"],
}
CUDA_TOGGLES = {"cudnn benchmark off": ["train.cudnn_benchmark=false"]}   # a no-op on the CPU
COMPILE = {"torch.compile (default mode)": ["model.compile=default"]}


def round_median(num: list[dict], den: list[dict], key: str) -> float:
    """Median over rounds of ``num[i][key] / den[i][key]``: round ``i`` of both ran back to back, under the same
    background load, so each ratio is taken within a round."""
    return statistics.median(a[key] / b[key] for a, b in zip(num, den))


def relative_to_unimatch(runs: dict[tuple[str, str], list[dict]], method: str, variant: str) -> dict:
    """``method``'s step time and peak memory over UniMatch's at the same ``variant`` (per-round ratios, median)."""
    mine, base = runs[(method, variant)], runs[("unimatch", variant)]
    return {"method": method, "variant": variant,
            "time_vs_unimatch": round_median(mine, base, "seconds_per_iter"),
            "memory_vs_unimatch": round_median(mine, base, "peak_mb")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="OMP threads per process (0 = all cores)")
    p.add_argument("--compile", type=int, default=0, metavar="ROUNDS",
                   help="also time UniMatch with torch.compile in the first ROUNDS rounds (compiling takes minutes)")
    p.add_argument("--set", action="append", default=[], help="extra override for every run")
    p.add_argument("--out", default="reports/bench")
    args = p.parse_args()
    preset = PRESETS[args.preset]
    args.crop, args.batch, args.classes = preset["crop"], preset["batch"], preset["classes"]
    if args.threads <= 0:
        args.threads = os.cpu_count() or 1
    import torch

    toggles = {**TOGGLES, **(CUDA_TOGGLES if torch.cuda.is_available() else {}), **(COMPILE if args.compile else {})}
    toggles = toggles if "unimatch" in args.methods else {}
    compile_rounds = min(args.compile, args.rounds)
    runs: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            jobs = [(m, v, VARIANTS[v]) for m in args.methods for v in VARIANTS]
            jobs += [("unimatch", t, VARIANTS[FULL] + sets) for t, sets in toggles.items()
                     if t not in COMPILE or r < compile_rounds]
            for m, v, sets in jobs:
                res = bench_once(m, args, Path(tmp) / f"r{r}-{v.replace('+', '_').replace(' ', '_')}",
                                 preset["sets"] + COMMON + sets + args.set)
                runs.setdefault((m, v), []).append(res)
                print(f"round {r} {m} {v}: {res['seconds_per_iter']:.4f} s/iter, {res['peak_mb']:.0f} MB",
                      flush=True)

    def row(m: str, v: str, ref: str) -> dict:
        mine, base = runs[(m, v)], runs[(m, ref)]
        return {"method": m, "variant": v, "reference": ref,
                "seconds_per_iter_median": statistics.median(a["seconds_per_iter"] for a in mine),
                "speedup_vs_reference": round_median(base, mine, "seconds_per_iter"),
                "peak_mb_median": statistics.median(a["peak_mb"] for a in mine),
                "peak_vs_reference": round_median(mine, base, "peak_mb"),
                "host_reads_per_step": mine[0]["host_reads_per_step"]}

    rows = [row(m, v, "fp32") for m in args.methods for v in VARIANTS]
    toggle_rows = [row("unimatch", t, FULL) for t in toggles]
    relative_rows = ([relative_to_unimatch(runs, m, v) for v in ("fp32", FULL) for m in args.methods]
                     if "unimatch" in args.methods else [])
    first = runs[(args.methods[0], "fp32")][0]
    result = {"benchmark": "efficiency", "command": "python " + " ".join(sys.argv), "device": first["device"],
              "device_type": first["device_type"], "preset": args.preset,
              "overrides": preset["sets"] + COMMON + args.set,
              "crop": args.crop, "batch": f"{args.batch}+{args.batch}", "classes": args.classes,
              "threads": args.threads, "rounds": args.rounds, "iters": args.iters, "repeats": args.repeats,
              "rows": rows, "toggles": toggle_rows, "relative_to_unimatch": relative_rows}
    stem = Path(args.out) / f"efficiency_{args.preset}_{first['device_type']}"
    write_result(result, stem.with_suffix(".json"))
    mem = "CUDA max allocated" if first["device_type"] == "cuda" else "peak RSS"
    lines = [f"# GPU-path switches: {result['device']}, preset {args.preset} ({', '.join(result['overrides'])}), "
             f"crop {args.crop}, batch {args.batch}+{args.batch}", "",
             f"Command: `{result['command']}`. Median over {args.rounds} interleaved rounds, every run a fresh process "
             f"(`workbench bench`, {args.warmup} warm-up steps, {args.repeats} x {args.iters} timed); speed-up = "
             f"fp32 s/iter / variant s/iter of the same round. Memory: {mem}.", "",
             "| method | variant | s/iter | speed-up vs fp32 | peak MB | memory vs fp32 | host reads/step |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['variant']} | {r['seconds_per_iter_median']:.4f} | "
                     f"{r['speedup_vs_reference']:.2f}x | {r['peak_mb_median']:.0f} | {r['peak_vs_reference']:.2f}x | "
                     f"{r['host_reads_per_step']} |")
    if toggle_rows:
        lines += ["", f"UniMatch, one switch changed from the full path ({FULL}, fused SGD, cudnn benchmark); "
                  "speed-up = full-path s/iter / s/iter with the change (below 1: the change is slower):",
                  "",
                  "| change | s/iter | speed-up vs full path | peak MB | memory vs full path |",
                  "|---|---|---|---|---|"]
        for r in toggle_rows:
            lines.append(f"| {r['variant']} | {r['seconds_per_iter_median']:.4f} | {r['speedup_vs_reference']:.2f}x "
                         f"| {r['peak_mb_median']:.0f} | {r['peak_vs_reference']:.2f}x |")
    if relative_rows:
        lines += ["", "Every method relative to UniMatch at the same precision (median over rounds of the per-round "
                  "ratio):", "", "| precision | method | step time vs unimatch | peak memory vs unimatch |",
                  "|---|---|---|---|"]
        for r in relative_rows:
            lines.append(f"| {r['variant']} | {r['method']} | {r['time_vs_unimatch']:.2f}x | "
                         f"{r['memory_vs_unimatch']:.2f}x |")
    atomic_write_text(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
