"""A throw-away one-node Slurm cluster on this machine, for the tests of ``workbench report --executor slurm``.

``LocalSlurm(workdir).start()`` writes a munge key and a ``slurm.conf`` (this machine's short hostname on 127.0.0.1,
``select/cons_tres``, ``proctrack/linuxproc``, ``task/none``, no cgroups, no accounting) under ``workdir``, starts
``munged``, ``slurmctld`` and ``slurmd`` from Debian's packages (``slurmctld slurmd slurm-client munge``; ``.ci/run``
installs them) and waits until the node is idle; ``env()`` is the environment the Slurm client tools (and submitit)
need (``SLURM_CONF``); ``stop()`` ends the three daemons it started (by their process ids) and waits for them.
Every step is bounded in time; :class:`SlurmUnavailable` says why a cluster cannot be started (missing packages, not
root, a daemon that does not come up), so that a test can skip with that reason.

Run by hand: ``python tests/slurm_cluster.py DIR`` starts one, prints the ``SLURM_CONF`` to export, and stops it on
Ctrl-C.
"""
from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scontrol", "scancel")


class SlurmUnavailable(RuntimeError):
    """A local Slurm cluster cannot be started here; the message says why."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _which(name: str) -> str | None:
    return shutil.which(name) or next((str(p) for p in (Path("/usr/sbin") / name, Path("/sbin") / name)
                                       if p.is_file()), None)


class LocalSlurm:
    """One-node Slurm (controller and compute node on this machine) living in ``workdir``."""

    def __init__(self, workdir: Path, partition: str = "debug", cpus: int | None = None) -> None:
        self.dir = Path(workdir).resolve()
        self.partition = partition
        self.cpus = cpus or os.cpu_count() or 1
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.dir / "slurm.conf"
        self.socket = self.dir / "munge" / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------------------------------------ set-up

    def env(self) -> dict[str, str]:
        """``os.environ`` plus ``SLURM_CONF`` pointing at this cluster's configuration."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _check_installed(self) -> dict[str, str]:
        if os.geteuid() != 0:
            raise SlurmUnavailable("the one-node Slurm cluster needs root (its daemons run as root)")
        paths = {n: _which(n) for n in (*DAEMONS, *CLIENTS)}
        missing = sorted(n for n, p in paths.items() if p is None)
        if missing:
            raise SlurmUnavailable(f"Slurm/munge programs not installed: {missing} (Debian: apt-get install "
                                   "slurmctld slurmd slurm-client munge; .ci/run does it)")
        return {n: str(p) for n, p in paths.items()}

    def _write_config(self) -> None:
        for sub in ("munge", "state", "spool", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir / "munge", 0o700)
        key = self.dir / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        user = getpass.getuser()
        self.conf.write_text(f"""# written by tests/slurm_cluster.py: a one-node test cluster
ClusterName=wbtest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket}
StateSaveLocation={self.dir / 'state'}
SlurmdSpoolDir={self.dir / 'spool'}
SlurmctldPidFile={self.dir / 'slurmctld.pid'}
SlurmdPidFile={self.dir / 'slurmd.pid'}
SlurmctldLogFile={self.dir / 'log' / 'slurmctld.log'}
SlurmdLogFile={self.dir / 'log' / 'slurmd.log'}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={max(mem_mb // 2, 256)} State=UNKNOWN
PartitionName={self.partition} Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")

    def _run(self, args: list[str], timeout: float = 20) -> subprocess.CompletedProcess:
        return subprocess.run(args, env=self.env(), capture_output=True, text=True, timeout=timeout)

    def _log_tail(self, name: str) -> str:
        f = self.dir / "log" / f"{name}.log"
        return "\n".join(f.read_text(errors="replace").splitlines()[-8:]) if f.is_file() else "(no log)"

    def _start_daemon(self, name: str, argv: list[str], ready: Path, timeout: float = 20) -> None:
        """Start ``argv`` in the foreground as our child (so that stop() can end and reap it), wait for ``ready``."""
        ready.unlink(missing_ok=True)
        log = open(self.dir / "log" / f"{name}.out", "w")
        proc = subprocess.Popen(argv, env=self.env(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        log.close()
        self.procs[name] = proc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None and not ready.exists():
            time.sleep(0.1)
        if proc.poll() is not None or not ready.exists():
            out = (self.dir / "log" / f"{name}.out").read_text(errors="replace").strip()[-800:]
            raise SlurmUnavailable(f"{name} did not start (exit {proc.poll()}): {out}\n{self._log_tail(name)}")

    def start(self, timeout: float = 60) -> LocalSlurm:
        """Write the configuration, start munged, slurmctld and slurmd, wait until the node is idle."""
        paths = self._check_installed()
        self._write_config()
        try:
            self._start_daemon("munged", [paths["munged"], "-F", "--force", f"--socket={self.socket}",
                                          f"--key-file={self.dir / 'munge' / 'munge.key'}",
                                          f"--pid-file={self.dir / 'munge' / 'munged.pid'}",
                                          f"--log-file={self.dir / 'log' / 'munged.log'}",
                                          f"--seed-file={self.dir / 'munge' / 'munged.seed'}"],
                               self.socket)
            # -D: foreground; -c: a clean state (no jobs of an earlier cluster); -i: ignore a stale state file
            self._start_daemon("slurmctld", [paths["slurmctld"], "-D", "-c", "-i", "-f", str(self.conf)],
                               self.dir / "slurmctld.pid")
            self._start_daemon("slurmd", [paths["slurmd"], "-D", "-f", str(self.conf)], self.dir / "slurmd.pid")
            self.wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_idle(self, timeout: float = 60) -> None:
        """Until ``sinfo`` shows the node idle (SlurmUnavailable after ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            try:
                r = self._run(["sinfo", "-h", "-N", "-o", "%T"], timeout=10)
                state = (r.stdout or r.stderr).strip()
            except subprocess.TimeoutExpired:
                state = "sinfo timed out"
            if state.startswith("idle"):
                return
            time.sleep(0.5)
        raise SlurmUnavailable(f"the Slurm node did not become idle in {timeout:.0f} s (last state: {state!r})\n"
                               f"{self._log_tail('slurmctld')}\n{self._log_tail('slurmd')}")

    # ----------------------------------------------------------------------------------------------- tear-down

    def stop(self, timeout: float = 20) -> None:
        """Cancel what is still queued, then end slurmd, slurmctld and munged (SIGTERM, SIGKILL after
        ``timeout`` s); waits until they are gone."""
        if "slurmctld" in self.procs:
            try:
                self._run(["scancel", "--full", "--user", getpass.getuser()], timeout=10)
                deadline = time.monotonic() + timeout  # the cancelled jobs' processes end before slurmd does
                while time.monotonic() < deadline and self._run(["squeue", "-h"], timeout=10).stdout.strip():
                    time.sleep(0.5)
            except (subprocess.TimeoutExpired, OSError):
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def __enter__(self) -> LocalSlurm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python tests/slurm_cluster.py WORKDIR")
    cluster = LocalSlurm(Path(sys.argv[1])).start()
    print(f"export SLURM_CONF={cluster.conf}   # Ctrl-C stops the cluster", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
