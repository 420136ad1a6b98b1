"""Every method's training step relative to UniMatch's, on a shared or noisy machine.

Each (round, method) runs ``workbench bench`` in a fresh subprocess (so the peak RSS is that method's alone), the
methods interleaved round by round so that they see the same background load; the ratio to the same round's
UniMatch step is taken per round and the median over rounds reported, with the median absolute numbers.

    python benchmarks/relative_step.py --rounds 3 --out reports/bench/relative
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from workbench.engine.bench import write_result
from workbench.engine.rundir import atomic_write_text

METHODS = ("supervised", "fixmatch", "meanteacher", "unimatch", "maskmatch", "s4mim", "scalematch", "corrmatch",
           "rankmatch")


SMALL = ["model.aspp_rates=[2,4,6]"]
"""The CPU default: the quickstart model (ResNet-18 at width 0.25, output stride 8) with ASPP rates for 8x8 maps."""


def bench_once(method: str, args: argparse.Namespace, out: Path, overrides: list[str] | None = None) -> dict:
    """One ``workbench bench`` subprocess (``args``: iters, warmup, repeats, crop, batch, threads, and optionally
    classes); its JSON result, with ``peak_mb`` = CUDA max allocated on a GPU, peak RSS on the CPU."""
    cmd = [sys.executable, "-m", "workbench", "bench", "--method", method, "--iters", str(args.iters), "--warmup",
           str(args.warmup), "--repeats", str(args.repeats), "--crop", str(args.crop), "--batch", str(args.batch),
           "--classes", str(getattr(args, "classes", 6)), "--out", str(out)]
    for o in SMALL if overrides is None else overrides:
        cmd += ["--set", o]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    res = json.loads((out / f"{method}.json").read_text())
    res["peak_mb"] = res.get("peak_memory_mb", res.get("peak_rss_mb"))
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--out", default="reports/bench/relative")
    args = p.parse_args()
    if "unimatch" not in args.methods:
        raise SystemExit("--methods must include unimatch (the reference)")
    runs: dict[str, list[dict]] = {m: [] for m in args.methods}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for m in args.methods:
                runs[m].append(bench_once(m, args, Path(tmp) / f"r{r}"))
                loads.append(os.getloadavg()[0])
                print(f"round {r} {m}: {runs[m][-1]['seconds_per_iter']:.3f} s/iter", flush=True)
    rows = []
    for m in args.methods:
        ratios = [a["seconds_per_iter"] / u["seconds_per_iter"] for a, u in zip(runs[m], runs["unimatch"])]
        mem_ratios = [a["peak_mb"] / u["peak_mb"] for a, u in zip(runs[m], runs["unimatch"])]
        rows.append({"method": m, "seconds_per_iter_median": statistics.median(a["seconds_per_iter"] for a in runs[m]),
                     "step_time_vs_unimatch": statistics.median(ratios), "step_time_ratios": ratios,
                     "peak_rss_mb_median": statistics.median(a["peak_mb"] for a in runs[m]),
                     "peak_rss_vs_unimatch": statistics.median(mem_ratios)})
    first = runs["unimatch"][0]
    result = {"benchmark": "relative_step", "command": "python " + " ".join(sys.argv), "device": first["device"],
              "crop": args.crop, "batch": f"{args.batch}+{args.batch}", "threads": args.threads,
              "rounds": args.rounds, "load_average_1min": {"min": min(loads), "max": max(loads)},
              "model": f"{first['model']} width {first['width']} OS{first['output_stride']}", "rows": rows}
    out = Path(args.out)
    write_result(result, out.with_suffix(".json"))
    lines = [f"# Step time and peak memory relative to UniMatch ({result['device']}, crop {args.crop}, batch "
             f"{args.batch}+{args.batch}, {args.threads} thread(s), {result['model']})", "",
             f"Command: `{result['command']}`. Median over {args.rounds} interleaved rounds, each method in a fresh "
             f"process; 1-min load average during the runs {min(loads):.1f}-{max(loads):.1f}.", "",
             "| method | s/iter (median) | step time vs unimatch | peak memory MB | peak memory vs unimatch |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['seconds_per_iter_median']:.3f} | {r['step_time_vs_unimatch']:.2f}x | "
                     f"{r['peak_rss_mb_median']:.0f} | {r['peak_rss_vs_unimatch']:.2f}x |")
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
