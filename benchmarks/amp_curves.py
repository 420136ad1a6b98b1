"""Does bf16 autocast train like fp32? Loss curves over a few hundred iterations, judged against seed noise.

For each seed, one fp32 run and one bf16-autocast run of the same method and config: the same seed means the same
data order, augmentations and dropout draws, so a pair differs only through the arithmetic. The logged training loss
(means over ``--log-every`` steps) is compared:

- paired: for every seed, the mean over the second half of training of (bf16 loss - fp32 loss); their mean over
  seeds and its standard error. bf16 "reaches the same curve within noise" when that mean bias lies within two
  standard errors of zero (and with one seed no verdict is given);
- unpaired: the seed-to-seed spread of the fp32 curves (std over seeds of the second-half mean), for scale;
- final mIoU of every run.

    python benchmarks/amp_curves.py --iters 300 --seeds 0 1 2          # CPU: the quickstart model
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
from workbench.engine.build import environment
from workbench.engine.rundir import RunDir, atomic_write_text
from workbench.engine.trainer import train
from workbench.quickstart import quickstart_config

PRECISIONS = (("fp32", "off"), ("bf16", "bf16"))


def curve(run_dir: Path) -> tuple[list[int], list[float]]:
    """(steps, mean training loss of each logged window) of a finished run."""
    recs = [r for r in RunDir(run_dir).read_metrics("train") if r.get("loss") is not None]
    return [r["step"] for r in recs], [r["loss"] for r in recs]


def late_mean(losses: list[float]) -> float:
    """Mean of the second half of a curve's windows."""
    if not losses:
        raise ValueError("empty curve")
    return statistics.fmean(losses[len(losses) // 2:])


def paired_bias(fp32: list[list[float]], bf16: list[list[float]]) -> tuple[float, float | None]:
    """Mean over seeds of late_mean(bf16) - late_mean(fp32), and its standard error (None for one seed)."""
    if len(fp32) != len(bf16) or not fp32:
        raise ValueError("need one fp32 and one bf16 curve per seed")
    diffs = [late_mean(b) - late_mean(f) for f, b in zip(fp32, bf16)]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None
    return statistics.fmean(diffs), se


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="unimatch")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--split", default="1-128")
    p.add_argument("--data-root", default="data/synthetic")
    p.add_argument("--runs", default="runs/amp_curves")
    p.add_argument("--set", action="append", default=[], help="config override for every run")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    runs: dict[str, list[dict]] = {label: [] for label, _ in PRECISIONS}
    for seed in a.seeds:
        for label, amp in PRECISIONS:
            base = quickstart_config(a.method, a.iters, seed, a.runs, a.data_root, a.split)
            base["name"] = f"{a.method}-{amp}-s{seed}"
            base["train"].update(log_every=a.log_every, eval_every=a.iters, capture_every=0, progress=False)
            cfg = config_from_dict(apply_overrides(base, [f"optim.amp={amp}", *a.set]))
            summary = train(cfg)
            steps, losses = curve(cfg.run_dir)
            runs[label].append({"run": str(cfg.run_dir), "seed": seed, "steps": steps, "loss": losses,
                                "miou": summary["final"]["miou"], "seconds": summary["timing"]["seconds_total"]})
            print(f"{label} seed {seed}: final mIoU {summary['final']['miou']:.3f}", flush=True)
    bias, se = paired_bias([r["loss"] for r in runs["fp32"]], [r["loss"] for r in runs["bf16"]])
    spread = statistics.stdev(late_mean(r["loss"]) for r in runs["fp32"]) if len(a.seeds) > 1 else None
    within = None if se is None else abs(bias) <= 2 * se
    dev = environment()["device"]
    out = Path(a.out or f"reports/bench/amp_curves_{'cuda' if 'cuda' in dev.lower() else 'cpu'}")
    result = {"benchmark": "amp_curves", "command": "python " + " ".join(sys.argv), "device": dev,
              "method": a.method, "iters": a.iters, "seeds": a.seeds, "log_every": a.log_every, "overrides": a.set,
              "late_bias_bf16_minus_fp32": bias, "late_bias_standard_error": se, "fp32_seed_spread": spread,
              "within_noise": within, "runs": runs}
    write_result(result, out.with_suffix(".json"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (label, _), color in zip(PRECISIONS, ("tab:blue", "tab:orange")):
        for i, r in enumerate(runs[label]):
            ax.plot(r["steps"], r["loss"], color=color, lw=1.0, alpha=0.8, label=label if i == 0 else None)
    ax.set(xlabel="step", ylabel=f"training loss (mean of {a.log_every} steps)",
           title=f"{a.method}: bf16 autocast vs fp32, seeds {a.seeds} ({dev})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    lines = [f"# bf16 autocast vs fp32 training curves: {a.method}, {a.iters} steps, {dev}", "",
             f"Command: `{result['command']}`", "",
             "| precision | seed | second-half mean loss | final mIoU | train s |", "|---|---|---|---|---|"]
    for label, _ in PRECISIONS:
        for r in runs[label]:
            lines.append(f"| {label} | {r['seed']} | {late_mean(r['loss']):.4f} | {r['miou']:.3f} | "
                         f"{r['seconds']:.0f} |")
    verdict = ("no verdict with one seed" if within is None else
               f"bf16 {'within' if within else 'OUTSIDE'} two standard errors of the fp32 curve")
    lines += ["", f"Paired bias of the second-half loss, bf16 - fp32 (same seed): **{bias:+.4f}**"
              + (f" +- {se:.4f} (standard error over {len(a.seeds)} seeds)" if se is not None else "")
              + (f"; fp32 seed-to-seed spread (std) {spread:.4f}" if spread is not None else "") + f": {verdict}.",
              "", f"![curves]({out.with_suffix('.png').name})"]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
