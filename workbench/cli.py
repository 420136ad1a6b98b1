"""Command line: ``workbench train|eval|data|bench|quickstart`` (also ``python -m workbench``)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from workbench.config import load_config

    overrides = list(args.set or [])
    if args.name:
        overrides.append(f"name={args.name}")
    cfg = load_config(args.config, overrides)  # validated before any process starts
    if args.nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "workbench", "train"]
        if args.config:
            cmd += ["--config", str(args.config)]
        for o in overrides:
            cmd += ["--set", o]
        return subprocess.call(cmd)
    from workbench.engine.trainer import train

    summary = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"run": str(cfg.run_dir), "final": summary["final"], "best": summary["best"]}, indent=1))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from workbench.config import parse_override
    from workbench.engine.trainer import evaluate_run

    overrides = {".".join(k): v for k, v in (parse_override(o) for o in (args.set or []))}
    res = evaluate_run(args.run, args.checkpoint, overrides)
    res.pop("confusion", None)
    print(json.dumps(res, indent=1))
    return 0


def _data(args: argparse.Namespace) -> int:
    if args.data_cmd == "synth":
        from workbench.config import parse_override
        from workbench.data.synthetic import SyntheticSpec, ensure_synthetic

        spec = SyntheticSpec(**{".".join(k): v for k, v in (parse_override(o) for o in (args.set or []))})
        root = ensure_synthetic(args.out, spec)
        print(f"synthetic dataset ready at {root}")
        return 0
    raise SystemExit(f"unknown data command {args.data_cmd}")


def _data_prepare(args: argparse.Namespace) -> int:
    from workbench.data.recipes import prepare

    res = prepare(args.name, args.root, args.archives, seed=args.seed, splits=args.splits, verify=not args.no_verify,
                  download=args.download, progress=not args.quiet, workers=args.workers)
    m = res.manifest
    if res.status == "up-to-date":
        print(f"{args.name} dataset at {res.root} is already prepared and verified; nothing to do")
    else:
        print(f"{args.name} dataset prepared at {res.root}: {m['num_classes']} classes, "
              f"{m['counts']['train']} train / {m['counts']['val']} val images, label splits "
              f"{', '.join(m.get('label_splits', []))} ({m.get('split_source', '')})")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from workbench.engine.bench import model_overrides, run_bench

    res = run_bench(args.method, iters=args.iters, warmup=args.warmup, repeats=args.repeats,
                    crop=args.crop, batch=args.batch, num_classes=args.classes,
                    overrides=model_overrides(args.model) + (args.set or []),
                    out_dir=Path(args.out),
                    data_root=args.data, workers=args.workers)
    print(json.dumps(res, indent=1))
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    from workbench.quickstart import run_quickstart

    run_quickstart(out=Path(args.out), iters=args.iters, methods=args.methods.split(","), seed=args.seed)
    return 0


def _report(args: argparse.Namespace) -> int:
    from workbench.report import run_report

    run_report(args.notebook, out=Path(args.out), grid=args.grid or [], parameters=args.param or [],
               html=not args.no_html, timeout=args.timeout)
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    from workbench.dashboard.app import serve

    serve(Path(args.runs_dir), port=args.port, address=args.address, show=False)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``workbench`` command."""
    p = argparse.ArgumentParser(prog="workbench", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train a method (resumes when the run directory has a checkpoint)")
    t.add_argument("--config", type=Path, help="YAML config file (defaults when omitted)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="dotted override, e.g. method.tau=0.9")
    t.add_argument("--name", help="run name (runs/<name>)")
    t.add_argument("--nproc", type=int, default=1, help="processes on this machine (launches torchrun)")
    t.set_defaults(fn=_train)

    e = sub.add_parser("eval", help="evaluate a run directory's best (or latest) checkpoint")
    e.add_argument("--run", required=True, type=Path)
    e.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    e.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. eval.mode=sliding")
    e.set_defaults(fn=_eval)

    d = sub.add_parser("data", help="datasets")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    s = dsub.add_parser("synth", help="generate the embedded synthetic dataset")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--set", action="append", metavar="FIELD=VALUE", help="SyntheticSpec field, e.g. num_train=500")
    d.set_defaults(fn=_data)
    pr = dsub.add_parser("prepare", help="prepare a benchmark dataset from its archives (see data_recipes/README.md)")
    pr.add_argument("name", choices=["voc", "cityscapes", "coco", "lucchi", "folder"])
    pr.add_argument("--root", required=True, type=Path, help="dataset root to write (manifest.json, splits/, ...)")
    pr.add_argument("--archives", type=Path, help="folder with the archives or extracted trees (default: --root); "
                                                  "for 'folder': your folder with dataset.yaml, images/, masks/")
    pr.add_argument("--splits", type=Path, help="folder of published split lists to use verbatim")
    pr.add_argument("--seed", type=int, default=0, help="seed of the generated split lists (recorded)")
    pr.add_argument("--no-verify", action="store_true", help="skip the archive checksums")
    pr.add_argument("--download", action="store_true", help="download missing archives that have a public URL")
    pr.add_argument("--workers", type=int, default=1, help="processes for the label conversion")
    pr.add_argument("--quiet", action="store_true", help="no progress bars")
    pr.set_defaults(fn=_data_prepare)

    b = sub.add_parser("bench", help="steady-state speed and peak memory of a method's training step")
    b.add_argument("--method", required=True)
    b.add_argument("--iters", type=int, default=20)
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--model", default="config", help="network: config (the config's own), quickstart, "
                                                      "deeplabv3plus-r50, deeplabv3plus-r101 (overrides before --set)")
    b.add_argument("--crop", type=int, default=64)
    b.add_argument("--batch", type=int, default=8, help="labeled images per step (as many unlabeled)")
    b.add_argument("--classes", type=int, default=6, help="classes of the random batches (without --data)")
    b.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override")
    b.add_argument("--out", default="reports/bench")
    b.add_argument("--data", type=Path, default=None, help="time real batches from the training loader over this "
                                                           "dataset root and report the loader stall fraction")
    b.add_argument("--workers", type=int, default=2, help="loader processes with --data")
    b.set_defaults(fn=_bench)

    q = sub.add_parser("quickstart", help="the README's main job: embedded data, train, evaluate, report")
    q.add_argument("--out", default="reports/quickstart")
    q.add_argument("--iters", type=int, default=None, help="steps per method (default: the quickstart schedule)")
    q.add_argument("--methods", default="supervised")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(fn=_quickstart)
    r = sub.add_parser("report", help="execute a notebook with papermill over a parameter grid; HTML + index")
    r.add_argument("notebook", help="notebook path or name in notebooks/ (e.g. 00_quickstart)")
    r.add_argument("--out", default="reports", help="reports/<name>/ gets the executed notebooks and index.html")
    r.add_argument("--grid", action="append", metavar="KEY=V1,V2", help="parameter grid axis, e.g. seed=0,1")
    r.add_argument("--param", action="append", metavar="KEY=VALUE", help="fixed parameter")
    r.add_argument("--no-html", action="store_true")
    r.add_argument("--timeout", type=float, default=None, help="seconds one cell may run (default: no limit)")
    r.set_defaults(fn=_report)

    db = sub.add_parser("dashboard", help="serve the Panel dashboard over a runs directory")
    db.add_argument("runs_dir", nargs="?", default="runs")
    db.add_argument("--port", type=int, default=5006)
    db.add_argument("--address", default="127.0.0.1", help="bind address (localhost by default)")
    db.set_defaults(fn=_dashboard)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; configuration/data errors print one clear line and exit with status 2."""
    from workbench.config import ConfigError
    from workbench.data.dataset import DataError
    from workbench.engine.checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"workbench: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a failed report is summarised in one line (details in its index)
        from workbench.report import ReportError

        if isinstance(e, ReportError):
            print(f"workbench: error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    raise SystemExit(main())
