"""Measured effect of a deviation switch on one training step: loss and gradient, default vs switch, same inputs.

    python experiments/fidelity.py --run runs/ablation/X/Y --switch method.rank_guard=floor --name rankmatch_guard
    python experiments/fidelity.py --config configs/maskmatch_synthetic.yaml --switch method.loss_norm=batch_valid \\
        --name maskmatch_norm

Both methods are built from the same config, the second with the ``--switch`` overrides; the second gets the first's
weights (a trained run's ``latest`` checkpoint with ``--run``; with ``--weights RUN`` the student weights of another
method's trained run with the same model, any EMA teacher set equal to them; a fresh initialisation otherwise), and
each step sees
the same batch (the run's own data order: ``--steps`` batches starting at ``--first-step``) and the same RNG state.
Per batch: both losses, the relative loss difference ``|L_switch - L_default| / |L_default|``, the relative gradient
difference ``||g_switch - g_default|| / ||g_default||`` over the parameters both methods share, and their cosine.
Results: ``reports/fidelity/<name>.json`` and ``.md`` (with the command). These rows feed ``docs/fidelity.md``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from workbench.config import apply_overrides, config_from_dict, config_to_dict, load_config
from workbench.data.dataset import SegDataset
from workbench.engine.build import (
    build_from_config,
    load_run_config,
    prepare_dataset,
    split_names,
    step_dataset,
    step_plan,
)
from workbench.engine.checkpoint import load_checkpoint
from workbench.engine.rundir import RunDir, atomic_write_text
from workbench.methods import SemiBatch, StepInfo


def batches(cfg, first: int, count: int) -> list[SemiBatch]:
    """The run's own micro-batches of optimiser steps ``first .. first + count - 1`` (its data order, augmentations,
    ``optim.grad_accum`` micro-batches per step and mix source), built as the trainer builds them
    (:func:`workbench.engine.build.step_plan` / :func:`~workbench.engine.build.step_dataset`)."""
    root = prepare_dataset(cfg)
    lab_split, unl_split = split_names(cfg, True)
    lab, unl = SegDataset(root, lab_split), SegDataset(root, unl_split)
    ds = step_dataset(cfg, lab, unl, step_plan(cfg, len(lab), len(unl), True))
    micro = cfg.optim.grad_accum
    ds.total_steps = (first + count) * micro
    return [SemiBatch.from_loader(ds[m], torch.device("cpu"), cfg.data.mean, cfg.data.std)
            for m in range(first * micro, (first + count) * micro)]


def one_step(method, batch: SemiBatch, seed: int, info: StepInfo) -> tuple[float, dict[str, torch.Tensor],
                                                                          dict[str, float]]:
    """Loss, gradients by parameter name and float logs of one training step from RNG state ``seed``."""
    method.train()
    method.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = method.training_step(batch, info)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in method.named_parameters() if p.grad is not None}
    logs = {k: float(v) for k, v in out.logs.items()}
    return float(out.loss.detach()), grads, logs


def student_state(run: Path, trust_pickle: bool = False) -> tuple[dict, int]:
    """The ``model.*`` entries of a run's latest checkpoint (the student of any method) and its step."""
    ck = load_checkpoint(RunDir(run).latest, trust_pickle=trust_pickle)
    return {k: v for k, v in ck["method"].items() if k.startswith("model.")}, ck["step"]


def compare(cfg_a, cfg_b, state: dict | None, steps: list[SemiBatch], first: int, num_classes: int,
            student_only: bool = False) -> dict:
    """Per-batch loss and gradient differences between the methods of ``cfg_a`` and ``cfg_b``. ``state``: the first
    method's weights; with ``student_only`` only its ``model.*`` entries, and an EMA teacher (``ema``) gets the
    student's weights."""
    torch.manual_seed(cfg_a.train.seed)
    a = build_from_config(cfg_a, num_classes, torch.device("cpu"))
    if state is not None:
        a.load_state_dict(state, strict=not student_only)
        if student_only and hasattr(a, "ema"):
            a.ema.load_state_dict(a.model.state_dict())
    b = build_from_config(cfg_b, num_classes, torch.device("cpu"))
    missing, unexpected = b.load_state_dict(a.state_dict(), strict=False)
    rows = []
    for i, batch in enumerate(steps):
        it = first + i
        info = StepInfo(it, 0, cfg_a.train.iters or 1000, 250)
        la, ga, logs_a = one_step(a, batch, 1000 + it, info)
        lb, gb, logs_b = one_step(b, batch, 1000 + it, info)
        shared = [n for n in ga if n in gb and ga[n].shape == gb[n].shape]
        va = torch.cat([ga[n].flatten() for n in shared]).double()
        vb = torch.cat([gb[n].flatten() for n in shared]).double()
        rows.append({"step": it, "loss_default": la, "loss_switch": lb,
                     "loss_rel_diff": abs(lb - la) / max(abs(la), 1e-12),
                     "grad_rel_diff": float((vb - va).norm() / va.norm().clamp(min=1e-30)),
                     "grad_cosine": float(torch.nn.functional.cosine_similarity(va, vb, dim=0)),
                     "logs_default": logs_a, "logs_switch": logs_b})
    return {"rows": rows, "missing_keys": len(missing), "unexpected_keys": len(unexpected)}


def summarise(rows: list[dict], key: str) -> dict:
    """Median, min and max of ``key`` over the rows."""
    vals = [r[key] for r in rows]
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", type=Path, help="a trained run directory: its config and latest checkpoint")
    src.add_argument("--config", type=Path, help="a config file (fresh initialisation unless --weights)")
    p.add_argument("--weights", type=Path, help="with --config: a trained run whose student weights both methods get")
    p.add_argument("--method", help="replace the config's method section by this method's defaults")
    p.add_argument("--set", action="append", default=[], help="override for both (key=value)")
    p.add_argument("--switch", action="append", required=True, help="the deviation switch (key=value)")
    p.add_argument("--name", required=True, help="report name under reports/fidelity/")
    p.add_argument("--steps", type=int, default=3, help="batches compared")
    p.add_argument("--first-step", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--trust-pickle", action="store_true",
                   help="load a checkpoint written before checkpoints became plain data (only your own files)")
    p.add_argument("--out", type=Path, default=Path("reports/fidelity"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    state, ck_step = None, None
    if args.run is not None:
        cfg = load_run_config(args.run, trust_pickle=args.trust_pickle)
        ck = load_checkpoint(RunDir(args.run).latest, trust_pickle=args.trust_pickle)
        state, ck_step = ck["method"], ck["step"]
    else:
        cfg = load_config(args.config)
        if args.weights is not None:
            state, ck_step = student_state(args.weights, args.trust_pickle)
    base = config_to_dict(cfg)
    if args.method:
        base["method"] = {"name": args.method}
    base = apply_overrides(base, args.set)
    cfg_a = config_from_dict(base)
    cfg_b = config_from_dict(apply_overrides(base, args.switch))
    steps = batches(cfg_a, args.first_step, args.steps)
    from workbench.data.dataset import load_manifest

    num_classes = load_manifest(prepare_dataset(cfg_a)).num_classes
    result = compare(cfg_a, cfg_b, state, steps, args.first_step, num_classes, student_only=args.weights is not None)
    command = "python experiments/fidelity.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result.update(command=command, checkpoint_step=ck_step, method=cfg_a.method.name, switch=args.switch, source=str(args.run or args.config),
                  loss_rel_diff=summarise(result["rows"], "loss_rel_diff"),
                  grad_rel_diff=summarise(result["rows"], "grad_rel_diff"))
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / f"{args.name}.json", json.dumps(result, indent=1) + "\n")
    weights = (f"trained run {args.run} at step {ck_step}" if args.run else
               f"student of trained run {args.weights} at step {ck_step} (teacher = student)" if args.weights else
               "fresh initialisation")
    lines = [f"# Fidelity: {cfg_a.method.name}, {', '.join(args.switch)}", "", f"Command: `{command}`", "",
             f"Weights: {weights}; "
             f"{args.steps} batches from step {args.first_step}; parameters not shared by both methods: "
             f"{result['missing_keys']} missing, {result['unexpected_keys']} unexpected.", "",
             "| step | loss (default) | loss (switch) | loss rel. diff | grad rel. diff | grad cosine |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['step']} | {r['loss_default']:.4f} | {r['loss_switch']:.4f} | {r['loss_rel_diff']:.3f} "
                     f"| {r['grad_rel_diff']:.3f} | {r['grad_cosine']:.3f} |")
    atomic_write_text(args.out / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
