"""Scale-out of notebook grids: every local GPU (or CPU processes) at once, or a Slurm cluster through submitit.

``workbench report NOTEBOOK --grid ... --devices 0,1,2,3`` runs one grid point per CUDA device at a time: a queue
hands the next point to the next free device, each point runs in its own process (``python -m workbench.scaleout
point PLAN STEM``) with ``CUDA_VISIBLE_DEVICES`` set to its device, and its output is echoed with the point as a
prefix. ``--jobs N`` does the same with N processes and no device (on a CPU machine each gets ``cpu_count // N`` torch
threads through ``OMP_NUM_THREADS``, unless that is set already). A failing point does not stop the others; the index
page is rewritten as points start and finish; the command fails at the end naming the failed points.

``--executor slurm`` submits the points as one Slurm job array (submitit; one array task per point) with the
partition/GPUs/CPUs/time/memory of :class:`SlurmOptions` (command-line options over a YAML profile), then follows
them until they end (``--no-wait``: return after submitting; ``workbench report NOTEBOOK --status`` shows where the
grid stands and rewrites the index). Each job records its point's outcome and rewrites the index itself. A job that
Slurm preempts or times out is requeued (submitit's checkpoint hook) and, its parameters naming the same run,
training resumes from the run's ``latest.pt``.

All options are checked before anything runs or is submitted; bad ones raise
:class:`~workbench.report.ReportInputError` (one line; the command line exits with status 2).
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from workbench.report import (
    GridPlan,
    GridPoint,
    ReportEntry,
    ReportInputError,
    _package_importable,
    point_line,
    run_plan_point,
)

SLURM_PROBE_TIMEOUT = 30.0
"""seconds ``sinfo`` may take to answer before the cluster counts as unreachable"""


# ------------------------------------------------------------------------------------------- local pool


def cuda_device_count() -> int | None:
    """CUDA devices visible to this process; None when CUDA is unavailable."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else None


def parse_devices(devices: Sequence[int] | str) -> list[int]:
    """``"0,1,3"`` or ``[0, 1, 3]`` -> ``[0, 1, 3]``, checked against the CUDA devices of this machine."""
    items = devices.split(",") if isinstance(devices, str) else list(devices)
    try:
        out = [int(str(d).strip()) for d in items]
    except ValueError:
        raise ReportInputError(f"--devices {devices!r}: expected comma-separated device indices, e.g. 0,1") from None
    if not out or any(d < 0 for d in out) or len(set(out)) < len(out):
        raise ReportInputError(f"--devices {devices!r}: expected distinct device indices >= 0")
    n = cuda_device_count()
    if n is None:
        raise ReportInputError("--devices needs CUDA and this machine has none; use --jobs N to run N points at "
                               "once on the CPU")
    bad = [d for d in out if d >= n]
    if bad:
        raise ReportInputError(f"--devices: device(s) {bad} do not exist; this machine has {n} CUDA device(s) "
                               f"(0-{n - 1})")
    return out


@dataclass
class Slot:
    """One place a point can run: a name for the output and the environment changes of its process."""

    name: str
    env: dict[str, str]


def local_slots(jobs: int = 1, devices: Sequence[int] | str | None = None) -> list[Slot]:
    """The slots of ``--devices`` (one per device: CUDA_VISIBLE_DEVICES, mapped through this process's own
    CUDA_VISIBLE_DEVICES) or ``--jobs`` (N CPU slots). Each slot gets ``OMP_NUM_THREADS = cpu_count // slots``
    unless the caller set OMP_NUM_THREADS."""
    if devices is not None:
        devs = parse_devices(devices)
        if jobs not in (1, len(devs)):
            raise ReportInputError(f"--jobs {jobs} with --devices: one point runs per device; give one of them")
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        slots = [Slot(f"device {d}", {"CUDA_VISIBLE_DEVICES": visible[d] if d < len(visible) else str(d)})
                 for d in devs]
    else:
        if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
            raise ReportInputError(f"--jobs {jobs!r}: expected an integer >= 1")
        slots = [Slot(f"slot {i}", {}) for i in range(jobs)]
    if "OMP_NUM_THREADS" not in os.environ:
        threads = str(max(1, (os.cpu_count() or 1) // len(slots)))
        for s in slots:
            s.env["OMP_NUM_THREADS"] = threads
    return slots


class _Echo:
    """Prefixes a point's output lines; carriage-return progress bars are echoed at most every ``every`` s."""

    def __init__(self, prefix: str, lock: threading.Lock, every: float = 10.0) -> None:
        self.prefix, self.lock, self.every, self.last = prefix, lock, every, 0.0
        self.tail: list[str] = []

    def feed(self, stream: Any) -> None:
        buf = ""
        while True:
            chunk = stream.read1(4096) if hasattr(stream, "read1") else stream.read(4096)
            if not chunk:
                break
            buf += chunk.decode("utf-8", "replace") if isinstance(chunk, bytes) else chunk
            while True:
                cut = min((i for i in (buf.find("\n"), buf.find("\r")) if i >= 0), default=-1)
                if cut < 0:
                    break
                line, sep, buf = buf[:cut], buf[cut], buf[cut + 1:]
                self.line(line, progress=sep == "\r")
        if buf:
            self.line(buf, progress=False)

    def line(self, text: str, progress: bool) -> None:
        text = text.rstrip()
        if not text or "Kernel is running over TCP without encryption" in text:  # every kernel says it
            return
        self.tail = (self.tail + [text])[-15:]
        now = time.monotonic()
        if progress and now - self.last < self.every:
            return
        self.last = now if progress else self.last
        with self.lock:
            print(f"[{self.prefix}] {text}", flush=True)


def run_local(plan: GridPlan, todo: list[GridPoint], slots: list[Slot]) -> None:
    """Run ``todo`` over ``slots``, one worker process per point; the index is rewritten as points start and end.
    Ctrl-C ends the running points (their process groups) and re-raises."""
    name = Path(plan.notebook).stem
    pending: queue.Queue[GridPoint] = queue.Queue()
    for p in todo:
        pending.put(p)
    lock = threading.Lock()
    live: dict[str, tuple[str, str]] = {p.stem: ("queued", "") for p in todo}
    procs: dict[str, subprocess.Popen] = {}
    plan_path = plan.state_dir / "plan.json"
    stop = threading.Event()

    def work(slot: Slot) -> None:
        while not stop.is_set():
            try:
                p = pending.get_nowait()
            except queue.Empty:
                return
            with lock:
                live[p.stem] = ("running", slot.name)
                plan.write_index(live)
            t0 = time.perf_counter()
            with _package_importable():
                env = {**os.environ, **slot.env, "PYTHONUNBUFFERED": "1"}
            proc = subprocess.Popen([sys.executable, "-m", "workbench.scaleout", "point", str(plan_path), p.stem,
                                     "--where", slot.name], cwd=plan.cwd, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            with lock:
                procs[p.stem] = proc
            echo = _Echo(p.label, lock)
            assert proc.stdout is not None
            echo.feed(proc.stdout)
            rc = proc.wait()
            entry = plan.record(p)
            if entry is None:  # the worker died before recording (killed, out of memory, import error...)
                tail = "\n".join(echo.tail[-5:])
                entry = ReportEntry(p.parameters, "", None, False, time.perf_counter() - t0,
                                    f"worker process exited with status {rc} before recording an outcome:\n{tail}",
                                    grid=p.grid, where=slot.name)
                plan.write_record(p, entry)
            with lock:
                procs.pop(p.stem, None)
                live.pop(p.stem, None)
                plan.write_index(live)
                print(point_line(p, entry, name), file=sys.stderr, flush=True)

    threads = [threading.Thread(target=work, args=(s,), daemon=True) for s in slots]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.5)
    except KeyboardInterrupt:
        stop.set()
        with lock:
            for proc in procs.values():
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        raise


# ------------------------------------------------------------------------------------------------ Slurm


@dataclass
class SlurmOptions:
    """Resources of each point's Slurm job; any of them may come from a YAML profile (``--slurm-profile``) whose
    keys are these field names."""

    partition: str | None = None
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    time: int = 60
    """minutes a point may run (a job past it is requeued and resumes)"""
    mem_gb: float | None = None
    array_parallelism: int = 256
    """array tasks running at once"""
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    setup: list[str] = field(default_factory=list)
    """shell lines run before the point (``module load cuda``, ``source .venv/bin/activate``)"""
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    """further ``#SBATCH`` options, e.g. ``{"exclude": "node7"}``"""
    max_requeues: int = 3
    """times a preempted or timed-out point is requeued"""
    poll: float = 5.0
    """seconds between looks at the queue while following the jobs"""

    @classmethod
    def from_profile(cls, path: str | Path | None, **overrides: Any) -> SlurmOptions:
        """Options from the YAML ``path`` (None: defaults) with the non-None ``overrides`` (the command line) on
        top; ReportInputError for an unknown key or an unreadable file."""
        data: dict[str, Any] = {}
        if path is not None:
            try:
                data = yaml.safe_load(Path(path).read_text()) or {}
            except (OSError, yaml.YAMLError) as e:
                raise ReportInputError(f"--slurm-profile {path}: {e}".splitlines()[0]) from None
            if not isinstance(data, dict):
                raise ReportInputError(f"--slurm-profile {path}: expected a mapping of option: value")
        data.update({k: v for k, v in overrides.items() if v is not None})
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ReportInputError(f"unknown Slurm option(s) {unknown}; known: {names}")
        opts = cls(**data)
        for key in ("gpus_per_node", "cpus_per_task", "time", "array_parallelism", "max_requeues"):
            v = getattr(opts, key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < (0 if key in (
                    "gpus_per_node", "max_requeues") else 1)):
                raise ReportInputError(f"Slurm option {key}={v!r}: expected a positive integer")
        return opts


def _slurm_command(args: list[str], timeout: float = SLURM_PROBE_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def check_slurm(opts: SlurmOptions) -> list[str]:
    """The cluster's partitions; ReportInputError when submitit is missing, Slurm does not answer, or
    ``opts.partition`` is not one of them."""
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise ReportInputError("--executor slurm needs submitit (pip install submitit)") from None
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        raise ReportInputError("Slurm is not reachable: sinfo/sbatch not found on PATH (run on a login node, or use "
                               "--executor local)")
    try:
        r = _slurm_command(["sinfo", "-h", "-o", "%R"])
    except subprocess.TimeoutExpired:
        raise ReportInputError(f"Slurm is not reachable: sinfo did not answer in {SLURM_PROBE_TIMEOUT:.0f} s") \
            from None
    if r.returncode != 0:
        why = next((ln.strip() for ln in (r.stderr or r.stdout).splitlines() if ln.strip()), f"exit {r.returncode}")
        raise ReportInputError(f"Slurm is not reachable: sinfo: {why.removeprefix('sinfo: ')}")
    parts = list(dict.fromkeys(ln.strip() for ln in r.stdout.splitlines() if ln.strip()))
    if opts.partition is not None and opts.partition not in parts:
        raise ReportInputError(f"unknown Slurm partition {opts.partition!r}; the cluster has {parts}")
    return parts


def queue_states(job_ids: Sequence[str]) -> dict[str, str] | None:
    """Slurm state (PENDING, RUNNING, REQUEUED, ...) of each job id still in the queue (array tasks one by one);
    None when ``squeue`` does not answer."""
    if not job_ids:
        return {}
    try:
        r = _slurm_command(["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(sorted(set(job_ids)))])
    except (subprocess.TimeoutExpired, OSError):
        return None
    if r.returncode != 0 and "Invalid job id" not in r.stderr:
        return None
    return dict(ln.split(None, 1) for ln in r.stdout.splitlines() if len(ln.split(None, 1)) == 2)


def _final_state(job_id: str) -> str:
    """sacct's state of an ended job ('' when accounting is not available)."""
    try:
        r = _slurm_command(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id], timeout=10)
    except (subprocess.TimeoutExpired, OSError):
        return ""
    return r.stdout.split()[0] if r.returncode == 0 and r.stdout.split() else ""


class PointJob:
    """The callable a Slurm job runs: execute one point of a saved plan (submitit pickles it). On preemption or
    timeout submitit calls :meth:`checkpoint` and requeues the same point; its run resumes from ``latest.pt``."""

    def __init__(self, plan_path: str, stem: str) -> None:
        self.plan_path, self.stem = plan_path, stem

    def __call__(self) -> dict[str, Any]:
        plan = GridPlan.load(Path(self.plan_path))
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus and "OMP_NUM_THREADS" not in os.environ:
            os.environ["OMP_NUM_THREADS"] = cpus
        job = os.environ.get("SLURM_ARRAY_JOB_ID")
        job = f"{job}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if job else os.environ.get("SLURM_JOB_ID", "?")
        entry = run_plan_point(plan, self.stem, where=f"job {job} on {os.uname().nodename}", stream=True)
        _index_from_job(plan)
        return asdict(entry)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """The same point again (submitit requeues it)."""
        import submitit

        return submitit.helpers.DelayedSubmission(PointJob(self.plan_path, self.stem))


def _jobs_file(plan: GridPlan) -> Path:
    return plan.state_dir / "slurm.json"


def read_jobs(plan: GridPlan) -> dict[str, dict[str, str]]:
    """``{stem: {"job": id, "log": path}}`` of the plan's submitted points (``{}`` when none)."""
    try:
        return json.loads(_jobs_file(plan).read_text())
    except (OSError, ValueError):
        return {}


def _index_from_job(plan: GridPlan) -> None:
    jobs = read_jobs(plan)
    plan.write_index({s: ("queued", f"job {j['job']}") for s, j in jobs.items()})


def slurm_live(plan: GridPlan) -> tuple[dict[str, tuple[str, str]], dict[str, str] | None]:
    """(state, where) of each submitted point without a record, from ``squeue``; and the raw squeue states (None
    when squeue did not answer)."""
    jobs = read_jobs(plan)
    states = queue_states([j["job"] for j in jobs.values()])
    live = {}
    for stem, j in jobs.items():
        st = (states or {}).get(j["job"])
        live[stem] = (st.lower() if st else ("queued" if states is None else "ended"), f"job {j['job']}")
    return live, states


def submit_slurm(plan: GridPlan, todo: list[GridPoint], opts: SlurmOptions) -> dict[str, str]:
    """Submit ``todo`` as one job array; returns {stem: job id}. Points whose earlier job is still queued or
    running are not submitted again."""
    import submitit

    jobs = read_jobs(plan)
    states = queue_states([jobs[p.stem]["job"] for p in todo if p.stem in jobs]) or {}
    still = [p for p in todo if p.stem in jobs and jobs[p.stem]["job"] in states]
    for p in still:
        print(f"[report] {p.label}: still in the queue as job {jobs[p.stem]['job']} "
              f"({states[jobs[p.stem]['job']]}); not submitted again", file=sys.stderr)
    todo = [p for p in todo if p not in still]
    if not todo:
        return {}
    folder = plan.dir / "slurm"
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=opts.max_requeues)
    params: dict[str, Any] = {"job_name": f"report-{Path(plan.notebook).stem}", "time": opts.time,
                              "array_parallelism": opts.array_parallelism, "setup": list(opts.setup),
                              "stderr_to_stdout": True,
                              "additional_parameters": dict(opts.additional_parameters)}
    for key in ("partition", "gpus_per_node", "cpus_per_task", "account", "qos", "constraint"):
        if getattr(opts, key) is not None:
            params[key] = getattr(opts, key)
    if opts.mem_gb is not None:
        params["mem"] = f"{int(round(opts.mem_gb * 1024))}M"
    ex.update_parameters(**params)
    plan_path = str(plan.state_dir / "plan.json")
    with _package_importable():  # sbatch exports this environment to the jobs: they import this workbench
        with ex.batch():
            submitted = [ex.submit(PointJob(plan_path, p.stem)) for p in todo]
    ids = {p.stem: str(j.job_id) for p, j in zip(todo, submitted)}
    for p, j in zip(todo, submitted):
        jobs[p.stem] = {"job": str(j.job_id), "log": str(j.paths.stdout)}
    plan.state_dir.mkdir(parents=True, exist_ok=True)
    _jobs_file(plan).write_text(json.dumps(jobs, indent=1) + "\n")
    array = str(submitted[0].job_id).split("_")[0]
    print(f"[report] submitted {len(todo)} point(s) as Slurm job array {array} "
          f"({', '.join(ids.values())}); logs under {folder}", file=sys.stderr)
    return ids


def follow_slurm(plan: GridPlan, stems: Sequence[str], poll: float = 5.0, grace: float = 30.0) -> None:
    """Wait until each point in ``stems`` has a record or its job left the queue without one (recorded as failed
    after ``grace`` seconds, with sacct's state when accounting exists); the index is rewritten on every change."""
    name = Path(plan.notebook).stem
    left = {s: None for s in stems}  # stem -> monotonic time it was first seen gone without a record
    jobs = read_jobs(plan)
    last = None
    seen: dict[str, str] = {}
    while left:
        live, states = slurm_live(plan)
        for stem in list(left):
            p = plan.point(stem)
            e = plan.record(p)
            st = live.get(stem, ("", ""))[0]
            if e is None and st and st != seen.get(stem) and states is not None:
                print(f"[report] {p.label}: job {jobs[stem]['job']} {st}", file=sys.stderr, flush=True)
                seen[stem] = st
            if e is None and states is not None and live.get(stem, ("", ""))[0] == "ended":
                left[stem] = left[stem] or time.monotonic()
                if time.monotonic() - left[stem] > grace:
                    job = jobs[stem]["job"]
                    st = _final_state(job) or "ended"
                    e = ReportEntry(p.parameters, "", None, False, 0.0, f"Slurm job {job} {st} without recording "
                                    f"an outcome; see {jobs[stem]['log']}", grid=p.grid, where=f"job {job}")
                    plan.write_record(p, e)
            if e is not None:
                del left[stem]
                live.pop(stem, None)
                print(point_line(p, e, name), file=sys.stderr, flush=True)
        snapshot = json.dumps([live, sorted(left)], sort_keys=True)
        if snapshot != last:
            plan.write_index({s: v for s, v in live.items() if s in left})
            last = snapshot
        if left:
            time.sleep(poll)


def report_status(notebook: str | Path, out: Path = Path("reports")) -> list[ReportEntry]:
    """Where a report's grid stands (``workbench report NOTEBOOK --status``): prints one line per point (state,
    job or device, seconds, the error's last line) and rewrites the index; returns the entries."""
    from workbench.report import report_name, resolve_notebook

    try:
        src = resolve_notebook(notebook)
    except FileNotFoundError as e:
        raise ReportInputError(str(e)) from None
    path = Path(out) / report_name(src) / ".grid" / "plan.json"
    if not path.is_file():
        raise ReportInputError(f"no grid under {path.parent.parent}: nothing was run there (check --out)")
    plan = GridPlan.load(path)
    live, states = slurm_live(plan) if read_jobs(plan) else ({}, {})
    entries = plan.write_index(live)
    width = max(len(p.label) for p in plan.points)
    for p, e in zip(plan.points, entries):
        err = (e.error or "").strip().splitlines()[-1:] if e.state == "failed" else []
        secs = f"{e.seconds:7.0f} s" if e.state in ("ok", "failed") else " " * 9
        print(f"{p.label:<{width}}  {e.state:<9} {secs}  {e.where}" + (f"  {err[0]}" if err else ""))
    counts = {s: sum(e.state == s for e in entries) for s in dict.fromkeys(e.state for e in entries)}
    note = "" if states is not None else " (squeue did not answer: queued/running states may be stale)"
    print(f"{len(entries)} point(s): " + ", ".join(f"{n} {s}" for s, n in counts.items()) +
          f"; index: {plan.dir / 'index.html'}{note}")
    return entries


# ---------------------------------------------------------------------------------------------- wiring


def prepare(plan: GridPlan, executor: str = "local", jobs: int = 1, devices: Sequence[int] | str | None = None,
            slurm: SlurmOptions | None = None) -> Callable[..., None]:
    """Check the scale-out options of a report (ReportInputError before anything runs) and return its runner
    ``runner(todo, wait=True)``."""
    if executor == "slurm":
        if devices is not None or jobs != 1:
            raise ReportInputError("--devices/--jobs are for --executor local; Slurm places each point itself "
                                   "(--gpus-per-node)")
        opts = slurm if slurm is not None else SlurmOptions()
        if not isinstance(opts, SlurmOptions):
            raise ReportInputError(f"slurm must be SlurmOptions, got {type(opts).__name__}")
        check_slurm(opts)

        def run_slurm(todo: list[GridPoint], wait: bool = True) -> None:
            submit_slurm(plan, todo, opts)
            if wait:
                try:
                    follow_slurm(plan, [p.stem for p in todo], poll=opts.poll)
                except KeyboardInterrupt:
                    print("[report] stopped following; the jobs go on: `workbench report NOTEBOOK --status` shows "
                          "where they stand", file=sys.stderr)
                    raise
            else:
                _index_from_job(plan)

        return run_slurm
    slots = local_slots(jobs, devices)

    def run_pool(todo: list[GridPoint], wait: bool = True) -> None:
        run_local(plan, todo, slots)

    return run_pool


def _main(argv: list[str] | None = None) -> int:
    """``python -m workbench.scaleout point PLAN STEM [--where W]``: the worker process of one local point."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m workbench.scaleout")
    sub = p.add_subparsers(dest="cmd", required=True)
    pt = sub.add_parser("point", help="execute one point of a saved grid plan and record its outcome")
    pt.add_argument("plan", type=Path)
    pt.add_argument("stem")
    pt.add_argument("--where", default="this process")
    args = p.parse_args(argv)
    entry = run_plan_point(GridPlan.load(args.plan), args.stem, where=args.where, stream=True)
    return 0 if entry.ok else 1


if __name__ == "__main__":
    raise SystemExit(_main())
