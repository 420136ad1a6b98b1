"""Ablation runner: variants x seeds on the embedded dataset, same schedule as the learning-signal experiment.

    python experiments/ablation.py --name rankmatch --seeds 0 1 \\
        --variant "unimatch=method.name=unimatch" \\
        --variant "rankmatch=method.name=rankmatch" \\
        --variant "random agents=method.name=rankmatch;method.agents=random"

A variant is ``label=override;override;...`` (config overrides). Runs go to runs/ablation/<name>/<label>-s<seed>
(resumable); results to reports/ablation/<name>/results.json and table.md (mean and per-seed final mIoU, fg IoU, fg
class accuracy, mask ratio and pseudo-label accuracy at the end of training). ``--reuse LABEL=RUNDIR_PATTERN`` takes
finished runs instead of training (e.g. the learning-signal runs: "unimatch=runs/learning_signal/unimatch-1-128-s{seed}").
``--include REPORT_DIR`` takes the rows of an earlier ablation's results.json (those of the seeds asked for), so
variants and seeds trained in separate processes (one per core) form one table:

    python experiments/ablation.py --name rankmatch --seeds 0 1 --baseline "unimatch (baseline)" \
        --include reports/ablation/rankmatch-s0-unimatch --include reports/ablation/rankmatch-unimatch ...

Rows are grouped by variant in first-seen order, seeds ascending within a variant.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from workbench.config import apply_overrides, config_from_dict
from workbench.engine.rundir import RunDir, atomic_write_text
from workbench.engine.trainer import train
from workbench.quickstart import quickstart_config

from tables import seed_table

EVAL_KEYS = ("miou", "fg_iou", "fg_class_acc")
TRAIN_KEYS = ("mask_ratio", "pl_acc")


def run_row(run_dir: Path) -> dict:
    """Final eval metrics and the last logged pseudo-label diagnostics of a finished run."""
    rd = RunDir(run_dir)
    summary = json.loads(rd.summary.read_text())
    if not summary.get("finished"):
        raise SystemExit(f"{run_dir} is not finished")
    last = rd.read_metrics("train")[-1]
    return {**{k: summary["final"].get(k) for k in EVAL_KEYS}, **{k: last.get(k) for k in TRAIN_KEYS},
            "seconds": summary["timing"]["seconds_total"], "data": (summary.get("dataset") or {}).get("fingerprint")}


def included_rows(folders: list[Path], seeds: list[int]) -> list[dict]:
    """Rows of earlier ablations' ``results.json`` in ``folders`` whose seed is in ``seeds``; a (variant, seed) pair
    given twice is an error, and so is a folder without results."""
    rows: list[dict] = []
    seen: dict[tuple[str, int], Path] = {}
    for folder in folders:
        path = folder / "results.json"
        if not path.is_file():
            raise SystemExit(f"--include {folder}: no results.json there (run that ablation first)")
        for r in json.loads(path.read_text())["rows"]:
            if r["seed"] not in seeds:
                continue
            key = (r["variant"], r["seed"])
            if key in seen:
                raise SystemExit(f"--include: variant {key[0]!r} seed {key[1]} is in both {seen[key]} and {folder}")
            seen[key] = folder
            rows.append(r)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True)
    p.add_argument("--variant", action="append", default=[], help="LABEL=override;override")
    p.add_argument("--reuse", action="append", default=[], help="LABEL=run dir pattern with {seed}")
    p.add_argument("--include", action="append", default=[], type=Path,
                   help="an earlier ablation's report folder (its results.json): its rows of --seeds")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--iters", type=int, default=1000)
    p.add_argument("--split", default="1-128")
    p.add_argument("--data-root", default="data/synthetic")
    p.add_argument("--set", action="append", default=[], help="override for every variant")
    p.add_argument("--baseline", default=None, help="LABEL of a variant: add the mIoU difference to it, paired by "
                                                      "seed (same seed = same labeled split, data order and init)")
    a = p.parse_args(argv)
    rows = []
    for spec in a.reuse:
        label, pattern = spec.split("=", 1)
        rows += [{"variant": label, "seed": s, "run": pattern.format(seed=s), **run_row(Path(pattern.format(seed=s)))}
                 for s in a.seeds]
    rows += included_rows(a.include, a.seeds)
    for spec in a.variant:
        label, _, ovs = spec.partition("=")
        overrides = [o for o in ovs.split(";") if o] + a.set
        for seed in a.seeds:
            base = quickstart_config("supervised", a.iters, seed, f"runs/ablation/{a.name}", a.data_root, a.split)
            base["name"] = f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)}-s{seed}"
            base["train"]["progress"] = False
            cfg = config_from_dict(apply_overrides(base, overrides))
            train(cfg)
            rows.append({"variant": label, "seed": seed, "run": str(cfg.run_dir), "overrides": overrides,
                         **run_row(cfg.run_dir)})
            print(json.dumps(rows[-1]), flush=True)
    order = {v: i for i, v in enumerate(dict.fromkeys(r["variant"] for r in rows))}
    rows.sort(key=lambda r: (order[r["variant"]], r["seed"]))
    columns = [("mIoU (mean)", "miou", ".3f")]
    if a.baseline is not None:
        base = {r["seed"]: r["miou"] for r in rows if r["variant"] == a.baseline}
        if set(base) != set(a.seeds):
            raise SystemExit(f"--baseline {a.baseline!r}: no finished run for every seed")
        for r in rows:
            r["d_miou"] = r["miou"] - base[r["seed"]]
        columns.append((f"vs {a.baseline} (paired)", "d_miou", "+.3f"))
    out = Path("reports/ablation") / a.name
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python " + " ".join(sys.argv)
    atomic_write_text(out / "results.json", json.dumps({"command": cmd, "iters": a.iters, "split": a.split,
                                                        "rows": rows}, indent=1) + "\n")
    lines = [f"# Ablation {a.name}: embedded dataset, labels {a.split}, {a.iters} steps, seeds {a.seeds}", "",
             f"Command: `{cmd}`", "",
             *seed_table(rows, ("variant",), lambda r: (r["variant"],),
                         [*columns, ("fg IoU", "fg_iou", ".3f"),
                          ("fg class acc", "fg_class_acc", ".3f"), ("mask ratio (end)", "mask_ratio", ".3f"),
                          ("pl acc (end)", "pl_acc", ".3f"), ("train s", "seconds", ".0f")])]
    atomic_write_text(out / "table.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
