"""The README's main job: embedded data -> supervised-only and a semi-supervised method on the same labeled split
-> evaluation -> ``reports/quickstart/`` (summary.json, report.md, predictions.png, curves.png)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from workbench.config import config_from_dict
from workbench.data.dataset import EvalDataset
from workbench.data.transforms import normalize
from workbench.engine.build import load_method
from workbench.engine.rundir import RunDir, atomic_write_text
from workbench.engine.trainer import train

QUICKSTART_ITERS = 1500
CALIBRATION = "reports/calibration/gain.json"  # the main job's gain over seeds (experiments/learning_signal.py)


def quickstart_config(method: str, iters: int, seed: int, runs: str = "runs", data_root: str = "data/synthetic",
                      split: str = "1-256", synthetic: dict[str, Any] | None = None) -> dict[str, Any]:
    """The quickstart run config (a plain dict) for ``method``: embedded dataset, 1/256 labels (8 images), the tiny
    default model (quarter-width ResNet-18, output stride 8, ASPP rates 2/4/6 for the 8x8 feature maps of 64-pixel
    crops)."""
    return {
        "name": f"quickstart-{method}-s{seed}", "out_dir": runs,
        "data": {"root": data_root, "split": split, "synthetic": dict(synthetic or {})},
        "model": {"aspp_rates": [2, 4, 6]},
        "eval": {"batch_size": 50},
        "train": {"iters": iters, "eval_every": max(iters // 5, 1), "log_every": 25, "seed": seed,
                  "capture_every": max(iters // 5, 1)},
        "method": {"name": method},
    }


@torch.no_grad()
def predict_images(run_dir: Path, images: torch.Tensor) -> torch.Tensor:
    """Predicted label maps [N,H,W] of a run's best checkpoint for uint8 images [N,3,H,W]."""
    method, cfg, _ = load_method(run_dir)
    x = normalize(images, cfg.data.mean, cfg.data.std)
    return method.predictor()(x)["logits"].argmax(1)


def run_quickstart(out: Path = Path("reports/quickstart"), iters: int | None = None,
                   methods: list[str] | None = None, seed: int = 0, runs: str = "runs",
                   data_root: str = "data/synthetic", num_figure: int = 6, split: str = "1-256",
                   synthetic: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train each method on the embedded dataset and write the report; returns the summary dict.

    ``split`` is the label fraction; ``synthetic`` overrides fields of the embedded dataset's SyntheticSpec.
    """
    from workbench.viz.figures import prediction_grid, training_curves

    methods = methods or ["supervised", "unimatch"]
    iters = iters or QUICKSTART_ITERS
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    run_dirs: dict[str, Path] = {}
    fingerprints: dict[str, str | None] = {}
    for m in methods:
        cfg = config_from_dict(quickstart_config(m, iters, seed, runs, data_root, split, synthetic))
        t0 = time.perf_counter()
        summary = train(cfg)
        run_dirs[m] = cfg.run_dir
        fingerprints[m] = (summary.get("dataset") or {}).get("fingerprint")
        best = summary["best"]
        final = summary["final"]
        results[m] = {"run": str(cfg.run_dir), "steps": summary["steps"], "best_miou": best["miou"],
                      "best_step": best["step"], "final_miou": final.get("miou"),
                      "final_fg_iou": final.get("fg_iou"), "final_fg_class_acc": final.get("fg_class_acc"),
                      "final_iou": final.get("iou"), "train_seconds": summary["timing"]["seconds_total"],
                      "wall_seconds_this_call": time.perf_counter() - t0}
    val = EvalDataset(data_root, "val")
    names, palette = val.base.manifest.class_names, val.base.manifest.palette
    idx = list(range(min(num_figure, len(val))))
    images = torch.stack([val[i][0] for i in idx])
    gts = torch.stack([val[i][1] for i in idx])
    cols = {"ground truth": gts, **{m: predict_images(run_dirs[m], images) for m in methods}}
    fig = prediction_grid(images, cols, palette, names, title="validation predictions (best checkpoints)")
    fig.savefig(out / "predictions.png", dpi=110)
    curves = training_curves({m: RunDir(run_dirs[m]).read_metrics("eval") for m in methods},
                             ["miou", "fg_iou", "fg_class_acc"], title="validation during training")
    curves.savefig(out / "curves.png", dpi=110)
    if len(set(fingerprints.values())) > 1:
        raise ValueError(f"the quickstart's runs trained on different data ({fingerprints}); delete {runs} and "
                         "run it again")
    summary = {"dataset": str(data_root), "data_fingerprint": next(iter(fingerprints.values()), None),
               "split": split, "iters": iters, "seed": seed, "methods": results, "class_names": names,
               "command": "make demo (workbench report 00_quickstart), or python -m workbench quickstart"}
    summary["calibration"] = calibration_text(summary)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "report.md", render_report(summary))
    print(summary_line(summary), flush=True)  # one line for logs (a Slurm job's, papermill's); the table is displayed
    return summary


def summary_line(summary: dict[str, Any]) -> str:
    """``quickstart seed 0: supervised final mIoU 0.283, unimatch 0.337 (gain +0.055)``: a summary's one-line form."""
    methods = summary["methods"]
    f = lambda v: "-" if v is None else f"{v:.3f}"
    parts = [f"{m} {f(r.get('final_miou'))}" if i else f"{m} final mIoU {f(r.get('final_miou'))}"
             for i, (m, r) in enumerate(methods.items())]
    sup = methods.get("supervised", {}).get("final_miou")
    gains = [f"{m} {r['final_miou'] - sup:+.3f}" for m, r in methods.items()
             if m != "supervised" and sup is not None and r.get("final_miou") is not None]
    return f"quickstart seed {summary['seed']}: {', '.join(parts)}" + (f" (gain {', '.join(gains)})" if gains else "")


def calibration_text(summary: dict[str, Any], path: str | Path = CALIBRATION) -> str | None:
    """One line per semi-supervised method of ``summary`` that the calibration record ``path`` (a ``gain.json`` of
    experiments/learning_signal.py, relative to the project root) holds for the same labels and steps: its gain over
    supervised-only across seeds. None when there is no such record; a note when it was made on other data."""
    from workbench.paths import project_path

    try:
        records = json.loads(Path(project_path(str(path))).read_text())
    except (OSError, ValueError):
        return None
    lines = []
    for g in records if isinstance(records, list) else []:
        if (g.get("method") in summary["methods"] and g.get("split") == summary["split"]
                and summary["iters"] in g.get("iters", [])):
            std = "" if g.get("std") is None else f", std {g['std']:.3f}"
            text = (f"Calibration ({Path(str(path)).parent.as_posix()}/table.md): over {len(g['seeds'])} seeds "
                    f"{g['method']} gains {g['mean']:+.3f} on average{std}, from {g['min']:+.3f} to {g['max']:+.3f}.")
            fp = summary.get("data_fingerprint")
            if fp and fp not in g.get("data", []):
                text += f" It was measured on other data than this run's ({fp[:19]}...): compare with care."
            lines.append(text)
    return "\n".join(lines) or None


def render_report(summary: dict[str, Any]) -> str:
    """Markdown of a quickstart summary: the table of methods, and the gain of each semi-supervised method over
    supervised-only (final mIoU) next to the calibrated gain over seeds when the summary is the default job's."""
    f = lambda v: "-" if v is None else f"{v:.3f}"
    lines = [f"### Embedded dataset, labels {summary['split']}, {summary['iters']} steps, seed {summary['seed']}", "",
             "| method | best mIoU | final mIoU | fg IoU | fg class acc | train s |", "|---|---|---|---|---|---|"]
    methods = summary["methods"]
    for m, r in methods.items():
        lines.append(f"| {m} | {f(r['best_miou'])} | {f(r['final_miou'])} | {f(r['final_fg_iou'])} | "
                     f"{f(r['final_fg_class_acc'])} | {r['train_seconds']:.0f} |")
    lines.append("")
    sup = methods.get("supervised", {}).get("final_miou")
    for m, r in methods.items():
        if m != "supervised" and sup is not None and r.get("final_miou") is not None:
            lines.append(f"Gain of {m} over supervised-only (final mIoU, this seed): **{r['final_miou'] - sup:+.3f}**.")
    if summary.get("calibration"):
        lines.append(summary["calibration"])
    fp = summary.get("data_fingerprint")
    lines += ["", f"Data: `{summary['dataset']}`" + (f", fingerprint `{fp[:19]}...`" if fp else "") + ".",
              "Figures: predictions.png (validation images, ground truth, each method), curves.png.",
              f"Command: `{summary['command']}`", ""]
    return "\n".join(lines)
