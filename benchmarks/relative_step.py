"""Every method's training step relative to UniMatch's (or one code version's relative to another's), on a shared
or noisy machine.

Each (round, code, method) runs ``workbench bench`` in a fresh subprocess (so the peak RSS is that method's alone),
interleaved round by round so that all see the same background load. Per round, the step time is divided by the
same round's UniMatch step (when UniMatch is measured) and by the same method's step under the first ``--code``
(when several are given); the tables give the median over rounds and the per-round spread (min-max), absolute
numbers included, so a ratio is only as good as its spread says.

    python benchmarks/relative_step.py --rounds 3 --out reports/bench/relative
    python benchmarks/relative_step.py --model deeplabv3plus-r50 --crop 129 --batch 2 --methods corrmatch \\
        --code before=/tmp/old-checkout --code after=. --rounds 3 --out reports/bench/corrmatch_before_after
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

from workbench.engine.bench import MODEL_PRESETS, model_overrides, write_result
from workbench.engine.rundir import atomic_write_text

METHODS = ("supervised", "fixmatch", "meanteacher", "unimatch", "maskmatch", "s4mim", "scalematch", "corrmatch",
           "rankmatch")

SMALL = model_overrides("quickstart")
"""The CPU default: the quickstart model (ResNet-18 at width 0.25, output stride 8) with ASPP rates for 8x8 maps."""


def bench_once(method: str, args: argparse.Namespace, out: Path, overrides: list[str] | None = None,
               code: str | None = None) -> dict:
    """One ``workbench bench`` subprocess (``args``: iters, warmup, repeats, crop, batch, threads, and optionally
    classes), importing the package from ``code`` (a checkout root; default: this one); its JSON result, with
    ``peak_mb`` = CUDA max allocated on a GPU, peak RSS on the CPU."""
    cmd = [sys.executable, "-m", "workbench", "bench", "--method", method, "--iters", str(args.iters), "--warmup",
           str(args.warmup), "--repeats", str(args.repeats), "--crop", str(args.crop), "--batch", str(args.batch),
           "--classes", str(getattr(args, "classes", 6)), "--out", str(Path(out).resolve())]
    for o in SMALL if overrides is None else overrides:
        cmd += ["--set", o]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    root = Path(code).resolve() if code is not None else Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    out.mkdir(parents=True, exist_ok=True)   # run from there: the working directory must not shadow ``root``
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, cwd=out)
    res = json.loads((out / f"{method}.json").read_text())
    res["peak_mb"] = res.get("peak_memory_mb", res.get("peak_rss_mb"))
    return res


def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max of per-round values."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def fmt(s: dict[str, float], digits: int = 3, suffix: str = "") -> str:
    """``median (min-max)`` of a :func:`spread`."""
    return f"{s['median']:.{digits}f}{suffix} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default="quickstart", choices=sorted(MODEL_PRESETS),
                   help="the network (workbench bench --model); the paper's is deeplabv3plus-r101")
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--batch", type=int, default=8, help="labeled images per step (as many unlabeled)")
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--code", action="append", default=[], metavar="LABEL=PATH",
                   help="a checkout to import the package from (repeatable: code versions interleaved per round, "
                        "each compared with the first)")
    p.add_argument("--out", default="reports/bench/relative")
    args = p.parse_args()
    codes = [tuple(c.split("=", 1)) for c in args.code] or [("this", None)]
    if any(len(c) != 2 for c in codes):
        raise SystemExit("--code takes LABEL=PATH")
    overrides = model_overrides(args.model) + args.set
    runs: dict[tuple[str, str], list[dict]] = {(c, m): [] for c, _ in codes for m in args.methods}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for c, path in codes:
                for m in args.methods:
                    res = bench_once(m, args, Path(tmp) / f"r{r}-{c}", overrides, path)
                    runs[c, m].append(res)
                    loads.append(os.getloadavg()[0])
                    print(f"round {r} {c} {m}: {res['seconds_per_iter']:.3f} s/iter", flush=True)
    rows = []
    base = codes[0][0]
    for c, _ in codes:
        for m in args.methods:
            rs = runs[c, m]
            row = {"code": c, "method": m, "seconds_per_iter": spread([a["seconds_per_iter"] for a in rs]),
                   "seconds_per_iter_rounds": [a["seconds_per_iter"] for a in rs],
                   "peak_mb": spread([a["peak_mb"] for a in rs]),
                   "host_reads_per_step": [a.get("host_reads_per_step") for a in rs]}
            if "unimatch" in args.methods:
                row["step_time_vs_unimatch"] = spread([a["seconds_per_iter"] / u["seconds_per_iter"]
                                                       for a, u in zip(rs, runs[c, "unimatch"])])
                row["peak_vs_unimatch"] = spread([a["peak_mb"] / u["peak_mb"] for a, u in zip(rs, runs[c, "unimatch"])])
            if len(codes) > 1:
                row[f"step_time_vs_{base}"] = spread([a["seconds_per_iter"] / b["seconds_per_iter"]
                                                      for a, b in zip(rs, runs[base, m])])
            rows.append(row)
    first = runs[codes[0][0], args.methods[0]][0]
    result = {"benchmark": "relative_step", "command": "python " + " ".join(sys.argv), "device": first["device"],
              "model_preset": args.model, "overrides": overrides, "crop": args.crop,
              "batch": f"{args.batch}+{args.batch}", "threads": args.threads, "rounds": args.rounds,
              "iters": args.iters, "warmup": args.warmup, "repeats": args.repeats,
              "codes": {c: path for c, path in codes}, "load_average_1min": {"min": min(loads), "max": max(loads)},
              "model": f"{first['model']} width {first['width']} OS{first['output_stride']}", "rows": rows}
    out = Path(args.out)
    write_result(result, out.with_suffix(".json"))
    heads = ["code"] if len(codes) > 1 else []
    heads += ["method", "s/iter", "peak memory MB"]
    if "unimatch" in args.methods:
        heads += ["step time vs unimatch", "peak memory vs unimatch"]
    if len(codes) > 1:
        heads += [f"step time vs {base}"]
    lines = [f"# Step time and peak memory ({result['device']}, {result['model']} [{args.model}], crop {args.crop}, "
             f"batch {args.batch}+{args.batch}, {args.threads} thread(s))", "",
             f"Command: `{result['command']}`. Median (min-max) over {args.rounds} interleaved rounds, each a fresh "
             f"process timing {args.repeats} x {args.iters} steps after {args.warmup} warm-up steps (median of the "
             f"repeats); 1-min load average during the runs {min(loads):.1f}-{max(loads):.1f}"
             + (" (a shared machine: absolute times move with the load, the per-round ratios less)." if
                first["device_type"] == "cpu" else "."), "",
             "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        cells = [r["code"]] if len(codes) > 1 else []
        cells += [r["method"], fmt(r["seconds_per_iter"]), fmt(r["peak_mb"], 0)]
        if "unimatch" in args.methods:
            cells += [fmt(r["step_time_vs_unimatch"], 2, "x"), fmt(r["peak_vs_unimatch"], 2, "x")]
        if len(codes) > 1:
            cells += [fmt(r[f"step_time_vs_{base}"], 2, "x")]
        lines.append("| " + " | ".join(cells) + " |")
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
