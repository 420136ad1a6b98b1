"""Host synchronisations per training step of every method, untrained and in a confident state.

Each method's step (forward, backward, optimiser step, ``after_step``) runs on random batches; the third step is
counted with :func:`workbench.engine.syncs.host_reads` (every Python read and every data-dependent-shape operation,
i.e. what synchronises on CUDA; the first two steps do the lazy set-up). The *confident* state multiplies every
``classifier`` convolution of the method (weights and bias) by ``--scale``, so that the softmax is peaked and pixels
pass the confidence thresholds: the paths that only run on confident pixels (CorrMatch's region propagation, ...)
then run too. ``--device cuda`` also counts the step's synchronisations with ``torch.cuda.set_sync_debug_mode``
(the independent check of the counter: the script fails when the two counts differ).

    python benchmarks/syncs.py --label after --out reports/bench/syncs_after
    python benchmarks/syncs.py --label before --out /tmp/syncs_before      # with PYTHONPATH at older code
    python benchmarks/syncs.py --table reports/bench/syncs --inputs /tmp/syncs_before.json reports/bench/syncs_after.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

METHODS = ("supervised", "fixmatch", "meanteacher", "unimatch", "maskmatch", "s4mim", "scalematch", "corrmatch",
           "rankmatch")
STATES = ("untrained", "confident")


def count_method(method: str, state: str, crop: int, batch: int, classes: int, scale: float,
                 overrides: list[str], device: str = "cpu") -> dict:
    """Syncs of the third step of ``method`` in ``state``: ``{"total", "by_op", "sites"}``, and on CUDA
    ``cuda_sync_debug``: the synchronisations ``torch.cuda.set_sync_debug_mode("warn")`` reports for the same step.

    The step is the trainer's with amp off: forward (the batch carries unlabeled ground truth, so the pseudo-label
    diagnostics run), backward, the on-device non-finite flag, the fused SGD step, ``after_step``."""
    import warnings

    from workbench.config import apply_overrides, config_from_dict
    from workbench.engine.bench import random_batch
    from workbench.engine.build import build_from_config
    from workbench.engine.optim import DeferredNonFinite, build_sgd, zero_momentum_buffers
    from workbench.engine.syncs import host_reads
    from workbench.methods import StepInfo

    torch.manual_seed(0)
    cfg = config_from_dict(apply_overrides({"method": {"name": method}}, overrides))
    dev = torch.device(device)
    m = build_from_config(cfg, classes, dev)
    if state == "confident":
        with torch.no_grad():
            for name, mod in m.named_modules():
                if name.split(".")[-1] == "classifier":
                    for p in mod.parameters():
                        p.mul_(scale)
    opt = build_sgd(m.param_groups(1e-6), 0.9, 1e-4, fused=True)
    zero_momentum_buffers(opt)
    pending = DeferredNonFinite(dev)
    g = torch.Generator().manual_seed(0)
    batches = [random_batch(classes, batch, crop, m.uses_unlabeled, dev, g) for _ in range(2)]
    for b in batches:
        if m.uses_unlabeled:
            b.y_u = torch.randint(0, classes, (batch, crop, crop), generator=g).to(dev)
    m.train()
    cuda_syncs = None
    for i in range(3):
        info = StepInfo(i, 0, 100, 100, False)
        counted = i == 2
        if counted and dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
        with host_reads() if counted else _null() as reads, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.zero_grad(set_to_none=True)
            out = m(batches[i % 2], info)
            out.loss.backward()
            pending.flag(opt, out.loss, m.parameters(), i, {"loss": out.loss.detach()}, [])
            opt.step()
            m.after_step(info)
        if counted and dev.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
            cuda_syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    by_op: dict[str, int] = {}
    for key, n in reads.items():
        op = key.split(" at ")[0]
        by_op[op] = by_op.get(op, 0) + n
    res = {"total": sum(reads.values()), "by_op": by_op, "sites": dict(reads)}
    if cuda_syncs is not None:
        res["cuda_sync_debug"] = len(cuda_syncs)
        res["cuda_sync_debug_messages"] = sorted(set(cuda_syncs))
    return res


class _null:
    def __enter__(self):
        return {}

    def __exit__(self, *exc):
        return False


def git_commit() -> str | None:
    """The checkout's commit (of the code measured: the first ``workbench`` on the path)."""
    import workbench

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(workbench.__file__).parent, text=True,
                              capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def table(inputs: list[Path], out: Path) -> None:
    """Markdown (+ JSON) table of syncs per step: one column per input (label) and state."""
    runs = [json.loads(p.read_text()) for p in inputs]
    heads = [f"{r['label']}, {s}" for r in runs for s in STATES]
    lines = [f"| method | {' | '.join(heads)} |", "|---|" + "---|" * len(heads)]
    for m in METHODS:
        cells = [str(r["counts"][m][s]["total"]) if m in r["counts"] else "-" for r in runs for s in STATES]
        lines.append(f"| {m} | {' | '.join(cells)} |")
    lines.append("")
    for r in runs:
        lines.append(f"Sites, {r['label']} (code at {r.get('commit') or '?'}; `{r['command']}`):")
        lines.append("")
        for m in METHODS:
            for s in STATES:
                sites = r["counts"].get(m, {}).get(s, {}).get("sites", {})
                if sites:
                    lines.append(f"- {m}, {s}: " + "; ".join(f"{k} x{v}" for k, v in sorted(sites.items())))
        lines.append("")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--label", default="now")
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--scale", type=float, default=50.0, help="classifier factor of the confident state")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (adds torch.cuda.set_sync_debug_mode's count)")
    p.add_argument("--set", action="append", default=["model.aspp_rates=[2,4,6]"], dest="overrides")
    p.add_argument("--out", default="reports/bench/syncs_now")
    p.add_argument("--table", default=None, help="write a table of --inputs to this path instead of measuring")
    p.add_argument("--inputs", nargs="+", type=Path, default=[])
    args = p.parse_args()
    if args.table:
        table(args.inputs, Path(args.table))
        return
    torch.set_num_threads(1)
    counts = {}
    for m in args.methods:
        counts[m] = {}
        for s in STATES:
            counts[m][s] = count_method(m, s, args.crop, args.batch, args.classes, args.scale, args.overrides,
                                        args.device)
            cuda = counts[m][s].get("cuda_sync_debug")
            print(f"{m} {s}: {counts[m][s]['total']} {counts[m][s]['by_op']}"
                  + ("" if cuda is None else f"; torch.cuda sync debug: {cuda}"), flush=True)
    mismatch = [f"{m} {s}" for m in counts for s in STATES
                if counts[m][s].get("cuda_sync_debug", counts[m][s]["total"]) != counts[m][s]["total"]]
    res = {"label": args.label, "command": "python " + " ".join(sys.argv), "commit": git_commit(),
           "device": args.device, "cuda_check_mismatches": mismatch,
           "crop": args.crop, "batch": f"{args.batch}+{args.batch}", "classes": args.classes, "scale": args.scale,
           "overrides": args.overrides, "counts": counts}
    out = Path(args.out).with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    if mismatch:   # the counter missed (or over-counted) what CUDA itself reports
        raise SystemExit(f"host_reads and torch.cuda.set_sync_debug_mode disagree: {', '.join(mismatch)}")


if __name__ == "__main__":
    main()
