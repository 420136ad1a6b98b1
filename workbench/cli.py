"""Command line: ``workbench train|eval|data|bench|quickstart`` (also ``python -m workbench``)."""
from __future__ import annotations

import argparse
import errno
import json
import os
import subprocess
import sys
from pathlib import Path


def torchrun_command(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    """argv of the torchrun launcher for ``workbench train --nproc/--nnodes``: ``--standalone`` on one node; with
    ``--nnodes N`` either a static master (``--master ADDR:PORT`` + ``--node-rank R``) or a rendezvous
    (``--rdzv-endpoint HOST:PORT`` [+ ``--rdzv-id``], torchrun assigns the node ranks). ValueError for an
    inconsistent set."""
    nnodes, rank = args.nnodes, args.node_rank
    if not isinstance(args.nproc, int) or args.nproc < 1:
        raise ValueError(f"--nproc {args.nproc}: expected an integer >= 1")
    if nnodes < 1:
        raise ValueError(f"--nnodes {nnodes}: expected an integer >= 1")
    if args.master and args.rdzv_endpoint:
        raise ValueError("--master and --rdzv-endpoint: give one (a static master or a rendezvous)")
    if nnodes > 1 and not (args.master or args.rdzv_endpoint):
        raise ValueError(f"--nnodes {nnodes} needs --master ADDR:PORT (with --node-rank) or --rdzv-endpoint "
                         "HOST:PORT")
    if nnodes == 1 and (args.master or args.rdzv_endpoint or rank is not None):
        raise ValueError("--master/--rdzv-endpoint/--node-rank go with --nnodes N > 1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}"]
    if nnodes == 1:
        cmd.insert(3, "--standalone")
    elif args.master:
        addr, _, port = args.master.rpartition(":")
        if not addr or not port.isdigit():
            raise ValueError(f"--master {args.master!r}: expected ADDR:PORT, e.g. node001:29500")
        if rank is None or not 0 <= rank < nnodes:
            raise ValueError(f"--node-rank {rank}: expected 0..{nnodes - 1} with --master (this node's place)")
        cmd += [f"--nnodes={nnodes}", f"--node_rank={rank}", f"--master_addr={addr}", f"--master_port={port}"]
    else:
        if rank is not None:
            raise ValueError("--node-rank goes with --master; a rendezvous assigns the ranks")
        cmd += [f"--nnodes={nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={args.rdzv_endpoint}",
                f"--rdzv_id={args.rdzv_id}"]
    cmd += ["-m", "workbench", "train"]
    if args.config:
        cmd += ["--config", str(args.config)]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def _train(args: argparse.Namespace) -> int:
    from workbench.config import ConfigError, load_config

    overrides = list(args.set or [])
    if args.name:
        overrides.append(f"name={args.name}")
    cfg = load_config(args.config, overrides)  # validated before any process starts
    multi = args.nnodes != 1 or args.master or args.rdzv_endpoint or args.node_rank is not None
    if (args.nproc > 1 or multi) and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        try:
            cmd = torchrun_command(args, overrides)
            if args.trust_pickle:
                cmd.append("--trust-pickle")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return subprocess.call(cmd)
    from workbench.engine.trainer import train

    summary = train(cfg, trust_pickle=args.trust_pickle)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"run": str(cfg.run_dir), "final": summary["final"], "best": summary["best"]}, indent=1))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from workbench.config import parse_override
    from workbench.engine.trainer import evaluate_run

    overrides = {".".join(k): v for k, v in (parse_override(o) for o in (args.set or []))}
    res = evaluate_run(args.run, args.checkpoint, overrides, trust_pickle=args.trust_pickle)
    res.pop("confusion", None)
    print(json.dumps(res, indent=1))
    return 0


def _data(args: argparse.Namespace) -> int:
    if args.data_cmd == "synth":
        from workbench.config import ConfigError, parse_override
        from workbench.data.synthetic import SyntheticSpec, ensure_synthetic

        try:
            spec = SyntheticSpec(**{".".join(k): v for k, v in (parse_override(o) for o in (args.set or []))})
            root = ensure_synthetic(args.out, spec)
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"data synth: {e}") from None
        print(f"synthetic dataset ready at {root}")
        return 0
    raise SystemExit(f"unknown data command {args.data_cmd}")


def _data_prepare(args: argparse.Namespace) -> int:
    from workbench.data.recipes import prepare

    res = prepare(args.name, args.root, args.archives, seed=args.seed, splits=args.splits, verify=not args.no_verify,
                  download=args.download, progress=not args.quiet, workers=args.workers,
                  split_lists="generated" if args.generated_splits else None)
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
    from workbench.quickstart import render_report, run_quickstart

    summary = run_quickstart(out=Path(args.out), iters=args.iters, methods=args.methods.split(","), seed=args.seed)
    print(render_report(summary))
    return 0


def _report(args: argparse.Namespace) -> int:
    from workbench.config import ConfigError
    from workbench.extras import MissingExtraError, require

    try:
        require("notebooks", "workbench report")
        if args.executor == "slurm":
            require("slurm", "workbench report --executor slurm")
    except MissingExtraError as e:
        raise ConfigError(str(e)) from None
    from workbench.report import ReportError, ReportInputError, run_report
    from workbench.scaleout import SlurmOptions, report_status

    if args.status:
        report_status(args.notebook, out=Path(args.out))
        return 0
    slurm_flags = {"partition": args.partition, "gpus_per_node": args.gpus_per_node,
                   "cpus_per_task": args.cpus_per_task, "time": args.time, "mem_gb": args.mem}
    slurm = None
    if args.executor == "slurm":
        slurm = SlurmOptions.from_profile(args.slurm_profile, **slurm_flags)
    elif args.slurm_profile or args.no_wait or any(v is not None for v in slurm_flags.values()):
        raise ReportInputError("--partition/--gpus-per-node/--cpus-per-task/--time/--mem/--slurm-profile/--no-wait "
                               "go with --executor slurm")
    try:
        run_report(args.notebook, out=Path(args.out), grid=args.grid or [], parameters=args.param or [],
                   html=not args.no_html, timeout=args.timeout, jobs=args.jobs, devices=args.devices,
                   executor=args.executor, slurm=slurm, wait=not args.no_wait, rerun=args.rerun,
                   progress=not args.no_progress)
    except (ReportError, ReportInputError):
        raise
    except (ValueError, FileNotFoundError) as e:   # bad notebook name, grid or parameter
        raise ConfigError(f"report: {e}") from None
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    import socket

    from workbench.config import ConfigError
    from workbench.extras import MissingExtraError, require

    try:
        require("dashboard", "workbench dashboard")
    except MissingExtraError as e:
        raise ConfigError(str(e)) from None

    try:   # a port in use or an address that is not ours: one line instead of the server's traceback
        fam = socket.AF_INET6 if ":" in args.address else socket.AF_INET
        with socket.socket(fam, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((args.address, args.port))
    except (OSError, OverflowError) as e:
        raise ConfigError(f"dashboard: cannot listen on {args.address}:{args.port}: "
                          f"{getattr(e, 'strerror', None) or e}; pick another --port") from None
    from workbench.dashboard.server import serve

    try:
        serve(Path(args.runs_dir), port=args.port, address=args.address, show=False)
    except ValueError as e:
        raise ConfigError(f"dashboard: {e}") from None
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
    t.add_argument("--trust-pickle", action="store_true", help="resume from an older checkpoint that needs full "
                   "unpickling (can run code: only for files you made yourself)")
    t.add_argument("--nnodes", type=int, default=1, help="machines taking part (multi-node torchrun; run the same "
                                                         "command on each, see the README's Slurm example)")
    t.add_argument("--node-rank", type=int, help="this machine's rank 0..nnodes-1 (with --master)")
    t.add_argument("--master", metavar="ADDR:PORT", help="address of node rank 0 (static multi-node launch)")
    t.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="c10d rendezvous instead of --master/--node-rank")
    t.add_argument("--rdzv-id", default="workbench", help="rendezvous job id (the same on every node)")
    t.set_defaults(fn=_train)

    e = sub.add_parser("eval", help="evaluate a run directory's best (or latest) checkpoint")
    e.add_argument("--run", required=True, type=Path)
    e.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    e.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. eval.mode=sliding")
    e.add_argument("--trust-pickle", action="store_true", help="load an older checkpoint that needs full "
                   "unpickling (can run code: only for files you made yourself)")
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
    pr.add_argument("--generated-splits", action="store_true",
                    help="voc/cityscapes/coco: draw seeded split lists instead of the shipped published ones")
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
    r.add_argument("--no-progress", action="store_true", help="do not print the progress of the training runs the "
                                                              "notebooks write (step, loss, val mIoU, ETA)")
    r.add_argument("--timeout", type=float, default=None, help="seconds one cell may run (default: no limit)")
    r.add_argument("--rerun", action="store_true", help="execute points that finished before again (default: skip "
                                                        "them; unfinished ones always run, their trainings resume)")
    r.add_argument("--status", action="store_true", help="show where the grid under --out stands (points, states, "
                                                         "Slurm jobs) and rewrite its index; runs nothing")
    sc = r.add_argument_group("scale-out", "run grid points concurrently: local processes or Slurm jobs")
    sc.add_argument("--jobs", type=int, default=1, help="points at once on this machine, one process each (CPU "
                                                        "threads split between them)")
    sc.add_argument("--devices", help="CUDA devices, e.g. 0,1,2,3: one point per device at a time")
    sc.add_argument("--executor", choices=["local", "slurm"], default="local",
                    help="slurm: one Slurm job (array task) per point through submitit")
    sc.add_argument("--slurm-profile", type=Path, help="YAML with Slurm options (partition, gpus_per_node, "
                                                       "cpus_per_task, time, mem_gb, setup, ...); flags override")
    sc.add_argument("--partition", help="Slurm partition")
    sc.add_argument("--gpus-per-node", type=int, help="GPUs per point's job")
    sc.add_argument("--cpus-per-task", type=int, help="CPUs per point's job")
    sc.add_argument("--time", type=int, help="minutes per point's job (default 60; past it: requeued, resumes)")
    sc.add_argument("--mem", type=float, help="GB of memory per point's job")
    sc.add_argument("--no-wait", action="store_true", help="return once submitted (see --status)")
    r.set_defaults(fn=_report)

    db = sub.add_parser("dashboard", help="serve the Panel dashboard over a runs directory")
    db.add_argument("runs_dir", nargs="?", default="runs")
    db.add_argument("--port", type=int, default=5006)
    db.add_argument("--address", default="127.0.0.1", help="bind address (localhost by default)")
    db.set_defaults(fn=_dashboard)
    return p


# errno values of a write that failed for lack of room or rights: one line, the previous files are intact
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def _clean_errors() -> tuple[type[Exception], ...]:
    """The errors :func:`main` prints as one line. Imported when an error is being handled, not at start: their modules
    import torch and torchvision (seconds), which ``workbench dashboard`` must not wait for before it listens."""
    from workbench.config import ConfigError
    from workbench.data.dataset import DataError
    from workbench.engine.checkpoint import CheckpointError
    from workbench.engine.rundir import RunLockedError
    from workbench.report import ReportInputError

    return ConfigError, DataError, CheckpointError, RunLockedError, ReportInputError


def main(argv: list[str] | None = None) -> int:
    """Entry point; configuration/data/checkpoint errors, a diverged run, a run in use by another trainer and a
    full disk print one clear line and exit with status 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        raise
    except _clean_errors() as e:  # evaluated only once something failed
        print(f"workbench: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in _WRITE_ERRNOS:
            raise
        where = f" {e.filename}" if e.filename else ""
        print(f"workbench: error: cannot write{where}: {e.strerror or e} (the files written before are intact; free "
              "space or fix the permissions, then run the same command again to resume)", file=sys.stderr)
        return 2
    except Exception as e:
        from workbench.engine.trainer import NonFiniteError
        from workbench.report import ReportError

        if isinstance(e, ReportError):
            print(f"workbench: error: {e}", file=sys.stderr)
            return 1
        if isinstance(e, NonFiniteError):
            print(f"workbench: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    raise SystemExit(main())
