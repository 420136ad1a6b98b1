"""CorrMatch's label propagation on the embedded dataset (the paper's Fig. 5 b/c): the mining ratio (confident and
correct / correct pixels) and the effective pseudo-label ratio (confident and correct / all pixels) of the weak view's
pseudo-labels before (``mining_ratio``) and after (``mining_ratio_prop``) pixel + region propagation, from the logged
training metrics of finished CorrMatch runs (the same batches, so the difference is the propagation's own effect).

    python experiments/propagation_ratios.py runs/ablation/corrmatch/CorrMatch_full_-s0 runs/ablation/corrmatch/CorrMatch_full_-s1

Writes reports/ablation/corrmatch/propagation.md (``--out``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from workbench.engine.rundir import RunDir, atomic_write_text

KEYS = ("mining_ratio", "effective_ratio", "mask_ratio")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("reports/ablation/corrmatch/propagation.md"))
    a = p.parse_args(argv)
    lines = ["# CorrMatch: pseudo-label ratios before and after propagation (embedded dataset)", "",
             f"Command: `python {' '.join(sys.argv)}`", "",
             "Means over the logged training steps of each half of the run; 'before' = thresholded weak-view "
             "pseudo-label, 'after' = after pixel and region propagation.", "",
             "| run | steps | " + " | ".join(f"{k} before | {k} after" for k in KEYS) + " |",
             "|---|---|" + "---|---|" * len(KEYS)]
    for run in a.runs:
        rows = [r for r in RunDir(run).read_metrics("train") if "mining_ratio_prop" in r]
        if not rows:
            raise SystemExit(f"{run}: no CorrMatch propagation metrics (mining_ratio_prop) logged")
        half = len(rows) // 2
        for label, part in (("first half", rows[:half]), ("second half", rows[half:])):
            cells = []
            for k in KEYS:
                cells += [f"{statistics.mean(r[k] for r in part):.3f}", f"{statistics.mean(r[k + '_prop'] for r in part):.3f}"]
            lines.append(f"| {run.name} | {label} ({part[0]['step']}-{part[-1]['step']}) | " + " | ".join(cells) + " |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
