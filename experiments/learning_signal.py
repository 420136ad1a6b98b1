"""Learning-signal experiment (issue 3): on the embedded dataset at its smallest labeled fraction, does UniMatch beat
supervised-only at the same number of iterations? Also trains supervised-only on all labels (the ceiling).

    python experiments/learning_signal.py --iters 1000 --seeds 0 1

Writes reports/learning_signal/results.json and table.md (with the command line). Runs go to runs/learning_signal/.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from workbench.config import apply_overrides, config_from_dict
from workbench.engine.rundir import atomic_write_text
from workbench.engine.trainer import train
from workbench.quickstart import quickstart_config

from tables import seed_table

KEYS = ("miou", "fg_iou", "fg_class_acc")


def write_table(out: Path, result_files: list[Path]) -> str:
    """Merge results.json files (e.g. one per seed, run in parallel) into ``out/table.md``; returns the text."""
    rows, cmds, iters = [], [], set()
    for f in result_files:
        d = json.loads(Path(f).read_text())
        rows += d["rows"]
        cmds.append(d["command"])
        iters.add(d.get("iters"))
    order = sorted({(r["method"], r["split"]) for r in rows}, key=lambda k: (k[1] == "all", k[0] != "supervised"))
    rows = sorted(rows, key=lambda r: order.index((r["method"], r["split"])))
    lines = [f"# Learning signal ({'/'.join(map(str, sorted(iters)))} steps, seeds "
             f"{sorted({r['seed'] for r in rows})})", "", *[f"Command: `{c}`" for c in cmds], "",
             *seed_table(rows, ("method", "labels"), lambda r: (r["method"], r["split"]),
                         [("mIoU (final, mean)", "miou", ".3f"), ("fg IoU", "fg_iou", ".3f"),
                          ("fg class acc", "fg_class_acc", ".3f"), ("best mIoU", "best_miou", ".3f"),
                          ("train s", "seconds", ".0f")])]
    lines += ["", *gain_lines(rows)]
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "table.md", text)
    gains = [{"iters": sorted(iters), **g} for g in gain_records(rows)]
    atomic_write_text(out / "gain.json", json.dumps(gains, indent=1) + "\n")
    return text


def gain_records(rows: list[dict]) -> list[dict]:
    """Per semi-supervised method and label split: the seeds and the final-mIoU gain over supervised-only on each
    (paired by seed), with mean, sample std, min and max; the best-mIoU gains alongside."""
    by = {(r["method"], r["split"], r["seed"]): r for r in rows}
    out = []
    for method, split in dict.fromkeys((r["method"], r["split"]) for r in rows):
        pairs = [(seed, by[("supervised", split, seed)], r) for (m, sp, seed), r in by.items()
                 if method != "supervised" and (m, sp) == (method, split) and ("supervised", split, seed) in by]
        if not pairs:
            continue
        gains = [r["miou"] - s["miou"] for _, s, r in pairs]
        best = [r["best_miou"] - s["best_miou"] for _, s, r in pairs]
        out.append({"method": method, "split": split, "seeds": [seed for seed, _, _ in pairs],
                    "supervised": [s["miou"] for _, s, _ in pairs], "semi": [r["miou"] for _, _, r in pairs],
                    "gain": gains, "mean": statistics.mean(gains),
                    "std": statistics.stdev(gains) if len(gains) > 1 else None, "min": min(gains),
                    "max": max(gains), "best_gain": best, "best_mean": statistics.mean(best),
                    "best_min": min(best), "seconds": [s["seconds"] + r["seconds"] for _, s, r in pairs],
                    "data": sorted({x.get("data") or "" for _, s, r in pairs for x in (s, r)})})
    return out


def gain_lines(rows: list[dict]) -> list[str]:
    """Markdown of :func:`gain_records`: one table per semi-supervised method and label split."""
    out: list[str] = []
    for g in gain_records(rows):
        out += [f"Gain of {g['method']} over supervised-only, labels {g['split']} (final mIoU, paired by seed):", "",
                f"| seed | supervised | {g['method']} | gain | gain in best mIoU | train s (both) |",
                "|---|---|---|---|---|---|"]
        for i, seed in enumerate(g["seeds"]):
            out.append(f"| {seed} | {g['supervised'][i]:.3f} | {g['semi'][i]:.3f} | {g['gain'][i]:+.3f} | "
                       f"{g['best_gain'][i]:+.3f} | {g['seconds'][i]:.0f} |")
        std = "-" if g["std"] is None else f"{g['std']:.3f}"
        out += ["", f"Over {len(g['seeds'])} seeds: gain mean {g['mean']:+.3f}, std {std}, min {g['min']:+.3f}, max "
                    f"{g['max']:+.3f} (best mIoU: mean {g['best_mean']:+.3f}, min {g['best_min']:+.3f}).", ""]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--iters", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--split", default="1-128")
    p.add_argument("--methods", nargs="+", default=["supervised", "unimatch"])
    p.add_argument("--no-ceiling", action="store_true", help="skip supervised-only on all labels")
    p.add_argument("--data-root", default="data/synthetic")
    p.add_argument("--out", default="reports/learning_signal")
    p.add_argument("--set", action="append", default=[], help="extra config override for every run")
    p.add_argument("--merge", nargs="+", type=Path, help="only merge these results.json files into --out/table.md")
    a = p.parse_args(argv)
    if a.merge:
        print(write_table(Path(a.out), a.merge))
        return 0
    runs = [(m, a.split) for m in a.methods] + ([] if a.no_ceiling else [("supervised", "all")])
    rows = []
    for seed in a.seeds:
        for method, split in runs:
            base = quickstart_config(method, a.iters, seed, "runs/learning_signal", a.data_root)
            base["name"] = f"{method}-{split}-s{seed}"
            base["train"]["progress"] = False
            cfg = config_from_dict(apply_overrides(base, [f"data.split={split}", *a.set]))
            s = train(cfg)
            row = {"method": method, "split": split, "seed": seed, "best_miou": s["best"]["miou"],
                   **{k: s["final"].get(k) for k in KEYS}, "seconds": s["timing"]["seconds_total"],
                   "data": (s.get("dataset") or {}).get("fingerprint")}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python " + " ".join(sys.argv)
    atomic_write_text(out / "results.json", json.dumps({"command": cmd, "iters": a.iters, "rows": rows}, indent=1)
                      + "\n")
    print(write_table(out, [out / "results.json"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
