"""How much ScaleMatch's ``method.structure`` changes a training step: the authors' two-scale forward
(``reference``, the default) against the paper's reading (``paper``), on identical inputs and network weights.

For each model (the default tiny DeepLabV3+ at 64-px crops, 6 classes; a DeepLabV3+ ResNet-50 at output stride 16,
ASPP 6/12/18, 129-px crops, 21 classes; both randomly initialised) and each image scale v of V, one
``training_step`` per structure (same batch, same seed, copies of the same weights, BatchNorm in train mode) gives:

- ``warmup_changed``: the share of valid unlabeled pixels whose warm-up pseudo-label (the scale-1 prediction;
  reference: decoded from the t-resized features, paper: from the unresized ones) differs between the structures
  (the first 10 epochs of a run use these);
- ``joint_changed_average``: the same for the fused pseudo-label with ``fusion: average`` (no learned parameters,
  so the difference is the scale-1 source alone; used after the warm-up);
- ``joint_changed_cif``: the same with each structure's own CIF module (their random initialisations differ, so this
  mixes the structural change with the CIF's initial weights);
- ``loss_*``: the step's total loss (after the warm-up, CIF fusion) of each structure and their difference, with
  ``tau = 0`` so every unsupervised term is active (a random network never reaches the default 0.95).

Images are smooth random fields (bilinearly upsampled 8 x 8 noise plus a little pixel noise), labels random.

    python experiments/scalematch_structure.py

Prints the JSON and writes reports/fidelity/scalematch_structure.json and .md (``--out``, without suffix).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from workbench.config import config_from_dict
from workbench.engine.bench import random_batch
from workbench.engine.rundir import atomic_write_text
from workbench.methods import METHODS, SemiBatch, StepInfo
from workbench.models import build_model
from workbench.ops.semi import IGNORE

MODELS: dict[str, dict[str, Any]] = {
    "tiny (resnet18 x 0.25, crop 64)": {
        "crop": 64, "classes": 6, "batch": 2,
        "model": dict(backbone="resnet18", width=0.25, head_width=0.25, output_stride=8, aspp_rates=(2, 4, 6))},
    "DeepLabV3+ ResNet-50 (OS16, crop 129)": {
        "crop": 129, "classes": 21, "batch": 2,
        "model": dict(backbone="resnet50", width=1.0, head_width=1.0, output_stride=16, aspp_rates=(6, 12, 18))},
}
SCALES = (0.25, 0.5, 1.5, 2.0)


def smooth_images(n: int, crop: int, g: torch.Generator) -> torch.Tensor:
    """[n, 3, crop, crop] normalised-looking images: 8 x 8 Gaussian noise upsampled bilinearly, plus 0.1 noise."""
    low = torch.randn(n, 3, 8, 8, generator=g)
    return F.interpolate(low, size=(crop, crop), mode="bilinear", align_corners=True) + 0.1 * torch.randn(
        n, 3, crop, crop, generator=g)


def make_batch(spec: dict[str, Any], seed: int) -> SemiBatch:
    """random_batch's labels, padding and CutMix boxes with smooth images."""
    g = torch.Generator().manual_seed(seed)
    b = random_batch(spec["classes"], spec["batch"], spec["crop"], True, torch.device("cpu"), g)
    for key in ("x_l", "x_w", "x_s1", "x_s2", "x_w_mix", "x_s1_mix", "x_s2_mix"):
        setattr(b, key, smooth_images(spec["batch"], spec["crop"], g))
    return b


def step(model: torch.nn.Module, spec: dict[str, Any], batch: SemiBatch, v: float, seed: int, epoch: int,
         **method: Any) -> tuple[float, dict[str, torch.Tensor]]:
    """(loss, artifacts) of one ScaleMatch step at image scale ``v`` on a copy of ``model``."""
    cfg = config_from_dict({"method": {"name": "scalematch", "tau": 0.0, "scales": [v], **method}}).method
    torch.manual_seed(seed)
    m = METHODS["scalematch"](copy.deepcopy(model), cfg, spec["classes"])
    torch.manual_seed(seed + 1)          # the step's draws (t, dropout) from the same state for both structures
    with torch.no_grad():
        out = m.training_step(batch, StepInfo(0, epoch, 10, 10, capture=True))
    return float(out.loss), out.artifacts


def changed(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> float:
    """Share of valid pixels where the labels differ."""
    return float(((a != b) & valid).sum()) / max(1, int(valid.sum()))


def measure(name: str, spec: dict[str, Any], seed: int, scales: tuple[float, ...]) -> dict[str, Any]:
    """Every measurement for one model (module docstring)."""
    torch.manual_seed(seed)
    model = build_model(spec["classes"], **spec["model"])
    batch = make_batch(spec, seed)
    valid = batch.ignore != IGNORE
    rows = []
    for v in scales:
        t0 = time.perf_counter()
        row: dict[str, Any] = {"v": v}
        arts = {}
        for structure in ("reference", "paper"):
            loss_w, a_avg = step(model, spec, batch, v, seed, 0, structure=structure, fusion="average")
            loss, a_cif = step(model, spec, batch, v, seed, 10, structure=structure)
            arts[structure] = (a_avg, a_cif)
            row[f"loss_{structure}"] = loss
            row[f"loss_warmup_average_{structure}"] = loss_w
        (ra, rc), (pa, pc) = arts["reference"], arts["paper"]
        row["warmup_changed"] = changed(ra["pseudo_plain"], pa["pseudo_plain"], valid)
        row["joint_changed_average"] = changed(ra["pseudo_fused"], pa["pseudo_fused"], valid)
        row["joint_changed_cif"] = changed(rc["pseudo_fused"], pc["pseudo_fused"], valid)
        row["loss_diff"] = row["loss_reference"] - row["loss_paper"]
        row["loss_rel_diff"] = row["loss_diff"] / row["loss_paper"]
        row["seconds"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
    return {"model": name, "crop": spec["crop"], "classes": spec["classes"], "batch": f"{spec['batch']} labeled + "
            f"{spec['batch']} unlabeled", "rows": rows}


def markdown(result: dict[str, Any], command: str) -> str:
    """The report: one table per model."""
    lines = ["# ScaleMatch: reference structure (default) vs the paper's reading, one step on identical inputs", "",
             f"Command: `{command}` (CPU, {result['threads']} thread(s), {result['seconds']:.0f} s).", "",
             "Random-init networks, smooth random images, tau 0 (every unsupervised term active). Shares are of the "
             "valid unlabeled pixels whose pseudo-label differs between the structures; losses are the step's total "
             "after the warm-up with each structure's own CIF (random init: their CIFs differ too).", "",
             "Caveat: a random network's class scores are nearly uniform, so argmax flips overstate what a trained "
             "network would show, and its losses sit near ln K, so the loss differences understate it. The warm-up "
             "share depends on t only (0.75 for v > 1, 1.25 for v < 1).", ""]
    for model in result["models"]:
        lines += [f"## {model['model']} ({model['classes']} classes, {model['batch']})", "",
                  "| v | warm-up PL changed | fused PL changed (average fusion) | fused PL changed (CIF) | "
                  "loss reference | loss paper | difference | relative |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in model["rows"]:
            lines.append(f"| {r['v']:g} | {r['warmup_changed']:.3f} | {r['joint_changed_average']:.3f} | "
                         f"{r['joint_changed_cif']:.3f} | {r['loss_reference']:.4f} | {r['loss_paper']:.4f} | "
                         f"{r['loss_diff']:+.4f} | {r['loss_rel_diff']:+.2%} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--r50-scales", type=float, nargs="+", default=[0.5, 2.0],
                   help="image scales for the ResNet-50 (each costs a few CPU seconds); the tiny model runs all of V")
    p.add_argument("--out", type=Path, default=Path("reports/fidelity/scalematch_structure"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    start = time.perf_counter()
    models = []
    for name, spec in MODELS.items():
        scales = SCALES if spec["model"]["backbone"] == "resnet18" else tuple(a.r50_scales)
        models.append(measure(name, spec, a.seed, scales))
    result = {"seed": a.seed, "threads": a.threads, "models": models, "seconds": time.perf_counter() - start}
    text = json.dumps(result, indent=1)
    print(text)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out.with_suffix(".json"), text + "\n")
    command = "python " + " ".join(["experiments/scalematch_structure.py", *sys.argv[1:]])
    atomic_write_text(a.out.with_suffix(".md"), markdown(result, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
