"""Does bf16 autocast train like fp32? Loss curves over a few hundred iterations, with seed noise as the yardstick.

Three runs of the same method and config: fp32 and bf16 autocast with the same seed (same data order, same
augmentations and dropout draws: the curves differ only through the arithmetic), and fp32 with another seed (the
run-to-run noise). The logged training loss (means over ``--log-every`` steps) is compared window by window:
bf16 "reaches the same curve within noise" when its mean absolute gap to the fp32 curve is no larger than the gap
between the two fp32 seeds. Final mIoU of the three runs is reported too.

    python benchmarks/amp_curves.py --iters 300                              # CPU: the quickstart model
    python benchmarks/amp_curves.py --iters 300 --set model.backbone=resnet101 --set model.width=1.0 \\
        --set model.head_width=1.0 --set model.output_stride=16 --set model.aspp_rates=null   # on a GPU

Writes ``<out>.json``, ``<out>.md`` and ``<out>.png`` (default ``reports/bench/amp_curves_<device type>``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from workbench.config import apply_overrides, config_from_dict
from workbench.engine.bench import write_result
from workbench.engine.rundir import RunDir, atomic_write_text
from workbench.engine.trainer import environment, train
from workbench.quickstart import quickstart_config

RUNS = (("fp32", "off", 0), ("bf16", "bf16", 0), ("fp32 (seed 1)", "off", 1))


def curve(run_dir: Path) -> tuple[list[int], list[float]]:
    """(steps, mean training loss of each logged window) of a finished run."""
    recs = [r for r in RunDir(run_dir).read_metrics("train") if r.get("loss") is not None]
    return [r["step"] for r in recs], [r["loss"] for r in recs]


def mean_gap(a: list[float], b: list[float]) -> float:
    """Mean absolute difference of two curves logged at the same steps."""
    if len(a) != len(b) or not a:
        raise ValueError(f"curves of {len(a)} and {len(b)} points cannot be compared")
    return statistics.fmean(abs(x - y) for x, y in zip(a, b))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="unimatch")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--split", default="1-128")
    p.add_argument("--data-root", default="data/synthetic")
    p.add_argument("--runs", default="runs/amp_curves")
    p.add_argument("--set", action="append", default=[], help="config override for all three runs")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    results = {}
    for label, amp, seed in RUNS:
        base = quickstart_config(a.method, a.iters, seed, a.runs, a.data_root, a.split)
        base["name"] = f"{a.method}-{amp}-s{seed}"
        base["train"].update(log_every=a.log_every, eval_every=a.iters, capture_every=0, progress=False)
        cfg = config_from_dict(apply_overrides(base, [f"optim.amp={amp}", *a.set]))
        summary = train(cfg)
        steps, losses = curve(cfg.run_dir)
        results[label] = {"run": str(cfg.run_dir), "amp": amp, "seed": seed, "steps": steps, "loss": losses,
                          "miou": summary["final"]["miou"], "seconds": summary["timing"]["seconds_total"],
                          "device": summary.get("environment", {}).get("device")}
        print(f"{label}: final mIoU {results[label]['miou']:.3f}, {results[label]['seconds']:.0f} s", flush=True)
    ref, amp_run, other = (results[r[0]] for r in RUNS)
    gap_amp, gap_seed = mean_gap(amp_run["loss"], ref["loss"]), mean_gap(other["loss"], ref["loss"])
    dev = environment()["device"]
    out = Path(a.out or f"reports/bench/amp_curves_{'cuda' if 'cuda' in dev.lower() else 'cpu'}")
    result = {"benchmark": "amp_curves", "command": "python " + " ".join(sys.argv), "device": dev,
              "method": a.method, "iters": a.iters, "log_every": a.log_every, "overrides": a.set,
              "mean_gap_bf16_vs_fp32": gap_amp, "mean_gap_seed1_vs_seed0": gap_seed,
              "within_noise": gap_amp <= gap_seed, "runs": results}
    write_result(result, out.with_suffix(".json"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, r in results.items():
        ax.plot(r["steps"], r["loss"], label=f"{label} (mIoU {r['miou']:.3f})", lw=1.2)
    ax.set(xlabel="step", ylabel=f"training loss (mean of {a.log_every} steps)",
           title=f"{a.method}: bf16 autocast vs fp32 ({dev})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    lines = [f"# bf16 autocast vs fp32 training curves: {a.method}, {a.iters} steps, {dev}", "",
             f"Command: `{result['command']}`", "",
             "| run | amp | seed | final loss window | final mIoU | train s |", "|---|---|---|---|---|---|"]
    for label, r in results.items():
        lines.append(f"| {label} | {r['amp']} | {r['seed']} | {r['loss'][-1]:.4f} | {r['miou']:.3f} | "
                     f"{r['seconds']:.0f} |")
    lines += ["", f"Mean absolute gap of the logged loss curves ({len(ref['loss'])} windows of {a.log_every} steps): "
              f"bf16 vs fp32 (same seed) **{gap_amp:.4f}**; fp32 seed 1 vs seed 0 **{gap_seed:.4f}** "
              f"-> bf16 {'within' if gap_amp <= gap_seed else 'OUTSIDE'} the seed-to-seed noise.",
              "", f"![curves]({out.with_suffix('.png').name})"]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
