"""Scale-out (workbench.scaleout): grid points at once on local processes/devices, the same grid as Slurm jobs on a
real one-node Slurm cluster (tests/slurm_cluster.py), and multi-node torchrun; bad input fails in one line first."""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from workbench import scaleout
from workbench.cli import torchrun_command
from workbench.report import ReportError, ReportInputError, plan_report, run_report
from workbench.scaleout import PointJob, SlurmOptions, local_slots

from conftest import TINY_SPEC, tiny_config_dict
from slurm_cluster import LocalSlurm, SlurmUnavailable

REPO = Path(__file__).resolve().parents[1]


def _probe(path: Path) -> Path:
    """A notebook that logs its start/end time, pid, CUDA_VISIBLE_DEVICES and OMP_NUM_THREADS to ``log`` (one JSON
    line per execution), prints progress, and fails for x == 2. With ``meet=True`` the points x=1 and x=2 each wait
    for the other to start (``met``: it did within 120 s), which only happens when they run at the same time."""
    cells = [nbformat.v4.new_code_cell("x = 0\nnap = 2.0\nlog = 'log.jsonl'\nmeet = False"),
             nbformat.v4.new_code_cell(
                 "import json, os, time\nt0 = time.time()\nfor i in range(2):\n"
                 "    print('progress', i, flush=True)\n    time.sleep(nap / 2)\n"
                 "met = None\n"
                 "if meet and x in (1, 2):  # x=1 and x=2 wait (up to 120 s) until the other one has started\n"
                 "    open(f'started-{x}', 'w').close()\n"
                 "    while not os.path.exists(f'started-{3 - x}') and time.time() - t0 < 120:\n"
                 "        time.sleep(0.2)\n"
                 "    met = os.path.exists(f'started-{3 - x}')\n"
                 "rec = {'x': x, 't0': t0, 't1': time.time(), 'pid': os.getpid(), 'met': met,\n"
                 "       'cvd': os.environ.get('CUDA_VISIBLE_DEVICES'), 'omp': os.environ.get('OMP_NUM_THREADS')}\n"
                 "with open(log, 'a') as f:\n    f.write(json.dumps(rec) + '\\n')\n"
                 "assert x != 2, 'x is two'")]
    cells[0].metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))
    return path


def _log(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.is_file() else []


# ------------------------------------------------------------------------------------------- slots, options


def test_local_slots_split_threads_and_map_devices(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    slots = local_slots(jobs=3)
    assert [s.name for s in slots] == ["slot 0", "slot 1", "slot 2"]
    assert [s.env for s in slots] == [{"OMP_NUM_THREADS": "2"}] * 3  # 8 // 3 threads each
    monkeypatch.setattr(scaleout, "cuda_device_count", lambda: 4)
    slots = local_slots(devices="3,1")
    assert [(s.name, s.env) for s in slots] == [("device 3", {"CUDA_VISIBLE_DEVICES": "3", "OMP_NUM_THREADS": "4"}),
                                                ("device 1", {"CUDA_VISIBLE_DEVICES": "1", "OMP_NUM_THREADS": "4"})]
    # indices count the devices this process sees: with CUDA_VISIBLE_DEVICES=4,5,6,7 device 1 is physical 5
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the caller's choice wins
    assert [s.env for s in local_slots(devices=[1])] == [{"CUDA_VISIBLE_DEVICES": "5"}]


@pytest.mark.parametrize("kwargs,count,msg", [
    ({"devices": "0,1"}, None, "needs CUDA and this machine has none; use --jobs N"),
    ({"devices": "0,2"}, 2, r"device\(s\) \[2\] do not exist; this machine has 2 CUDA device\(s\) \(0-1\)"),
    ({"devices": "0,0"}, 2, "distinct"), ({"devices": "a"}, 2, "device indices"),
    ({"jobs": 0}, None, "--jobs 0"), ({"jobs": 3, "devices": "0,1"}, 2, "one point runs per device")])
def test_local_slots_bad_input(monkeypatch, kwargs, count, msg):
    monkeypatch.setattr(scaleout, "cuda_device_count", lambda: count)
    with pytest.raises(ReportInputError, match=msg):
        local_slots(**kwargs)


def test_slurm_options_profile_and_flags(tmp_path):
    prof = tmp_path / "p.yaml"
    prof.write_text("partition: gpu\ngpus_per_node: 1\ntime: 120\nsetup: [module load cuda]\n")
    o = SlurmOptions.from_profile(prof, time=30, partition=None, mem_gb=16)
    assert (o.partition, o.gpus_per_node, o.time, o.mem_gb, o.setup) == ("gpu", 1, 30, 16, ["module load cuda"])
    prof.write_text("partion: gpu\n")
    with pytest.raises(ReportInputError, match=r"unknown Slurm option\(s\) \['partion'\]"):
        SlurmOptions.from_profile(prof)
    with pytest.raises(ReportInputError, match="time=0"):
        SlurmOptions.from_profile(None, time=0)


def test_point_job_requeues_the_same_point():
    job = PointJob("/r/.grid/plan.json", "nb__seed-1")
    again = job.checkpoint()
    assert isinstance(again.function, PointJob)
    assert (again.function.plan_path, again.function.stem) == ("/r/.grid/plan.json", "nb__seed-1")


def test_quickstart_points_get_their_own_figure_folder(tmp_path):
    plan = plan_report("00_quickstart", out=tmp_path / "r", grid=["seed=0,1"], parameters=["iters=3"])
    assert [p.parameters["out"] for p in plan.points] == [str(tmp_path / "r" / "quickstart" / f"00_quickstart__seed-{s}")
                                                         for s in (0, 1)]
    one = plan_report("00_quickstart", out=tmp_path / "r", parameters=["iters=3"])
    assert "out" not in one.points[0].parameters  # a single point keeps the notebook's default
    fixed = plan_report("00_quickstart", out=tmp_path / "r", grid=["seed=0,1"], parameters=["out=x"])
    assert [p.parameters["out"] for p in fixed.points] == ["x", "x"]  # given explicitly: left alone


# ------------------------------------------------------------------------------------------- local pool


@pytest.mark.slow
def test_jobs_run_points_at_once_isolate_failures_and_resume(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    src = _probe(tmp_path / "probe.ipynb")
    with pytest.raises(ReportError) as ei:
        run_report(str(src), out=tmp_path / "reports", grid=["x=1,2,3"], parameters=["meet=true"], html=False,
                   jobs=2)
    assert [(e.grid["x"], e.state) for e in ei.value.entries] == [(1, "ok"), (2, "failed"), (3, "ok")]
    assert "1 of 3" in str(ei.value) and "{'x': 2}" in str(ei.value) and "x is two" in str(ei.value)
    runs = {r["x"]: r for r in _log(tmp_path / "log.jsonl")}
    assert sorted(runs) == [1, 2, 3]  # the failing point did not stop the third
    assert len({r["pid"] for r in runs.values()}) == 3 and all(r["omp"] == "2" for r in runs.values())  # 4 // 2
    assert runs[1]["met"] and runs[2]["met"]  # the first two points ran at the same time
    out = capfd.readouterr()
    assert "[x=1] progress 0" in out.out and "[x=3] progress 1" in out.out  # each point's output, prefixed
    d = tmp_path / "reports" / "probe"
    index = (d / "index.html").read_text()
    assert index.count("<tr><td>") == 3 and "1 failed" in index and "x is two" in index
    assert {e["where"] for e in json.loads((d / "index.json").read_text())} <= {"slot 0", "slot 1"}

    # the same grid again: x=1 and x=3 are skipped, the failed x=2 runs again; a point whose record is gone (an
    # interrupted one) runs again too
    (d / ".grid" / "probe__x-3.json").unlink()
    mtime = (d / "probe__x-1.ipynb").stat().st_mtime_ns
    with pytest.raises(ReportError):
        run_report(str(src), out=tmp_path / "reports", grid=["x=1,2,3"], parameters=["meet=true"], html=False,
                   jobs=2)
    assert [r["x"] for r in _log(tmp_path / "log.jsonl")][3:] in ([2, 3], [3, 2])
    assert (d / "probe__x-1.ipynb").stat().st_mtime_ns == mtime
    assert "{'x': 1}: finished earlier, skipped" in capfd.readouterr().err
    # other parameters are another point: not skipped
    run_report(str(src), out=tmp_path / "reports", grid=["x=1,3"], parameters=["nap=0.1"], html=False, jobs=2)
    assert len(_log(tmp_path / "log.jsonl")) == 7


@pytest.mark.slow
def test_devices_give_each_point_its_cuda_device(tmp_path, monkeypatch):
    """No GPU needed: the points' processes report the CUDA_VISIBLE_DEVICES they received."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(scaleout, "cuda_device_count", lambda: 2)
    src = _probe(tmp_path / "probe.ipynb")
    entries = run_report(str(src), out=tmp_path / "reports", grid=["x=1,3,4"], parameters=["nap=1.0"], html=False,
                         devices="0,1")
    runs = {r["x"]: r for r in _log(tmp_path / "log.jsonl")}
    assert {e.grid["x"]: e.where for e in entries} == {x: f"device {runs[x]['cvd']}" for x in (1, 3, 4)}
    assert {r["cvd"] for r in runs.values()} == {"0", "1"}
    for x in (1, 3, 4):  # at no moment two points on the same device
        for y in (1, 3, 4):
            if x < y and runs[x]["cvd"] == runs[y]["cvd"]:
                assert runs[x]["t1"] <= runs[y]["t0"] or runs[y]["t1"] <= runs[x]["t0"]


def _cli(args, env=None, timeout=600, cwd=None):
    return subprocess.run([sys.executable, "-m", "workbench", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


@pytest.mark.slow
def test_cli_bad_scaleout_input_one_line_exit_2(tmp_path):
    src = _probe(tmp_path / "probe.ipynb")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cases = [(["--devices", "0,1"] if scaleout.cuda_device_count() is None else ["--devices", "0,99"],
              "--devices"),
             (["--jobs", "0"], "--jobs 0"),
             (["--partition", "gpu"], "go with --executor slurm"),
             (["--executor", "slurm", "--slurm-profile", str(tmp_path / "missing.yaml")], "--slurm-profile")]
    for args, msg in cases:
        r = _cli(["report", str(src), "--grid", "x=1,3", "--out", str(tmp_path / "r"), *args], env=env,
                 cwd=tmp_path)
        assert r.returncode == 2 and msg in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    bare = {**env, "PATH": str(tmp_path)}  # no sinfo at all
    r = subprocess.run([sys.executable, "-m", "workbench", "report", str(src), "--executor", "slurm"],
                       capture_output=True, text=True, env=bare, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "Slurm is not reachable: sinfo/sbatch not found" in r.stderr, r.stderr
    assert not (tmp_path / "r").exists() and not (tmp_path / "reports").exists()  # nothing ran, nothing written


# ----------------------------------------------------------------------------------------------- Slurm


@pytest.fixture
def slurm(tmp_path_factory):
    """A one-node Slurm cluster for one test (skipped, with the reason, where it cannot start)."""
    try:
        cluster = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    except SlurmUnavailable as e:
        print(f"skipping: {e}")
        pytest.skip(f"no local Slurm cluster: {e}".splitlines()[0])
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.slow
def test_slurm_grid_on_a_real_cluster(slurm, tmp_path, tiny_data):
    env = {**slurm.env(), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    base = ["report", "00_quickstart", "--out", str(tmp_path / "reports"), "--executor", "slurm", "--no-html",
            "--grid", "seed=0,1", "--param", "iters=2", "--param", "methods=[supervised]", "--param", "split=1-4",
            "--param", f"synthetic={json.dumps(TINY_SPEC)}", "--param", f"data_root={tiny_data}",
            "--param", f"runs={tmp_path / 'runs'}"]

    # bad input: one line, exit 2, nothing submitted
    r = _cli([*base, "--partition", "nope"], env=env, cwd=tmp_path)
    assert r.returncode == 2 and "unknown Slurm partition 'nope'; the cluster has ['debug']" in r.stderr, r.stderr
    conf = slurm.conf.read_text().replace("SlurmctldPort=", "SlurmctldPort=1#")  # port 1: nobody listens
    (tmp_path / "down.conf").write_text(conf)
    t0 = time.monotonic()
    r = _cli(base, env={**env, "SLURM_CONF": str(tmp_path / "down.conf")}, cwd=tmp_path, timeout=300)
    print(f"unreachable controller: exit {r.returncode} after {time.monotonic() - t0:.0f} s: {r.stderr.strip()}")
    assert r.returncode == 2 and "Slurm is not reachable: sinfo" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True).stdout.strip() == ""
    assert not (tmp_path / "reports").exists()

    # the grid: a 2-task job array, followed to the end
    r = _cli([*base, "--partition", "debug", "--time", "10", "--cpus-per-task", "1"], env=env, cwd=tmp_path)
    print(r.stderr)
    assert r.returncode == 0, r.stderr[-3000:]
    d = tmp_path / "reports" / "quickstart"
    jobs = json.loads((d / ".grid" / "slurm.json").read_text())
    ids = [jobs[f"00_quickstart__seed-{s}"]["job"] for s in (0, 1)]
    array = ids[0].split("_")[0]
    assert ids == [f"{array}_0", f"{array}_1"] and f"submitted 2 point(s) as Slurm job array {array}" in r.stderr
    index = json.loads((d / "index.json").read_text())
    assert [(e["grid"], e["state"]) for e in index] == [({"seed": 0}, "ok"), ({"seed": 1}, "ok")]
    assert [e["where"].split(" on ")[0] for e in index] == [f"job {i}" for i in ids]
    for s in (0, 1):
        assert (d / f"00_quickstart__seed-{s}.ipynb").is_file()
        summary = json.loads((d / f"00_quickstart__seed-{s}" / "summary.json").read_text())  # the point's figures
        assert summary["seed"] == s and summary["iters"] == 2
        run = json.loads((tmp_path / "runs" / f"quickstart-supervised-s{s}" / "summary.json").read_text())
        assert run["finished"] and run["steps"] == 2
        log = Path(jobs[f"00_quickstart__seed-{s}"]["log"]).read_text()  # the job's log: the notebook's output
        assert f"quickstart seed {s}: supervised final mIoU" in log
    page = (d / "index.html").read_text()
    assert page.count("<tr><td>") == 2 and "0 failed" in page and f"job {ids[1]}" in page

    st = _cli(["report", "00_quickstart", "--out", str(tmp_path / "reports"), "--status"], env=env, cwd=tmp_path)
    print(st.stdout)
    assert st.returncode == 0 and "2 point(s): 2 ok" in st.stdout
    assert [ln.split()[:2] for ln in st.stdout.splitlines()[:2]] == [["seed=0", "ok"], ["seed=1", "ok"]]

    # submitted again: both finished, nothing is submitted
    r = _cli([*base, "--partition", "debug"], env=env, cwd=tmp_path)
    assert r.returncode == 0 and r.stderr.count("finished earlier, skipped") == 2 and "submitted" not in r.stderr

    # --rerun --no-wait: submitted again (the finished runs just report), --status follows the grid to the end. The
    # partition is down while they are submitted and first looked at, so that look sees them queued whatever the
    # machine's speed; it is brought up again before the loop
    def partition(state: str) -> None:
        subprocess.run(["scontrol", "update", "PartitionName=debug", f"State={state}"], env=env, check=True,
                       capture_output=True, timeout=60)

    partition("DOWN")
    r = _cli([*base, "--rerun", "--no-wait"], env=env, cwd=tmp_path)
    assert r.returncode == 0 and "submitted 2 point(s) as Slurm job array" in r.stderr, r.stderr
    again = r.stderr.split("job array ")[1].split()[0]
    assert again != array and json.loads((d / ".grid" / "slurm.json").read_text())[
        "00_quickstart__seed-1"]["job"] == f"{again}_1"
    st = _cli(["report", "00_quickstart", "--out", str(tmp_path / "reports"), "--status"], env=env, cwd=tmp_path)
    print(st.stdout)
    seen = [[ln.split()[1] for ln in st.stdout.splitlines()[:2]]]
    partition("UP")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        st = _cli(["report", "00_quickstart", "--out", str(tmp_path / "reports"), "--status"], env=env, cwd=tmp_path)
        seen.append([ln.split()[1] for ln in st.stdout.splitlines()[:2]])
        print(st.stdout)
        if seen[-1] == ["ok", "ok"]:
            break
        time.sleep(2)
    assert seen[-1] == ["ok", "ok"] and f"job {again}_1" in st.stdout
    assert any(s != ["ok", "ok"] for s in seen[:1]), seen  # the first look saw them queued or running


# -------------------------------------------------------------------------------------- multi-node torchrun


def _train_args(**kw):
    d = dict(nproc=1, nnodes=1, node_rank=None, master=None, rdzv_endpoint=None, rdzv_id="workbench",
             config=None)
    d.update(kw)
    return argparse.Namespace(**d)


def test_torchrun_command_multi_node():
    cmd = torchrun_command(_train_args(nproc=4, nnodes=2, node_rank=1, master="node001:29500"), ["a=1"])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--nproc_per_node=4", "--nnodes=2", "--node_rank=1",
                       "--master_addr=node001", "--master_port=29500", "-m", "workbench", "train", "--set", "a=1"]
    cmd = torchrun_command(_train_args(nproc=2, nnodes=3, rdzv_endpoint="h:29400", rdzv_id="42"), [])
    assert cmd[3:7] == ["--nproc_per_node=2", "--nnodes=3", "--rdzv_backend=c10d", "--rdzv_endpoint=h:29400"]
    assert "--rdzv_id=42" in cmd
    assert cmd_of(_train_args(nproc=2))[3:5] == ["--standalone", "--nproc_per_node=2"]
    for kw, msg in [({"nnodes": 2}, "needs --master"), ({"nnodes": 2, "master": "h:1"}, "--node-rank None"),
                    ({"nnodes": 2, "master": "h:1", "node_rank": 2}, r"0\.\.1"),
                    ({"nnodes": 2, "master": "h", "node_rank": 0}, "ADDR:PORT"),
                    ({"master": "h:1"}, "go with --nnodes"),
                    ({"nnodes": 2, "master": "h:1", "rdzv_endpoint": "h:2"}, "give one")]:
        with pytest.raises(ValueError, match=msg):
            torchrun_command(_train_args(**kw), [])


def cmd_of(args):
    return torchrun_command(args, [])


@pytest.mark.slow
def test_two_nodes_on_localhost(tmp_path, tiny_data):
    """Two `workbench train --nnodes 2` launchers (as on two machines) form one world of two processes."""
    import socket

    cfg = tiny_config_dict(tmp_path / "runs", tiny_data, **{"train.iters": 2, "data.batch_size": 2})
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-m", "workbench", "train", "--config", str(tmp_path / "c.json"),
                               "--nnodes", "2", "--node-rank", str(r), "--master", f"127.0.0.1:{port}"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for r in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    summary = json.loads((tmp_path / "runs" / "t" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["finished"]
