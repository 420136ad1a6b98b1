"""Fault injection: crafted and damaged checkpoints, concurrent trainers, kills, broken run files, non-finite steps,
bad values and bad inputs. Every test names the point of "trustworthy runs" it covers (1-9) and fails on an engine
that executes pickled code, lets two writers share a run, writes in place, keeps the trace of a skipped step,
accepts meaningless values, loads damaged tensors, duplicates or chokes on metric records, prints tracebacks, or
writes outside its root.

Fast loop: ``pytest -m 'not faults'`` skips this module; the normal run includes it.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from workbench.cli import main as cli
from workbench.config import ConfigError, config_from_dict, load_config
from workbench.data.dataset import DataError
from workbench.engine.checkpoint import (
    CheckpointError,
    checksum_path,
    load_checkpoint,
    load_latest,
    previous_path,
    save_checkpoint,
    sha256_file,
)
from workbench.engine.rundir import RunDir, RunLock, atomic_write_text, read_jsonl
from workbench.engine.trainer import evaluate_run, load_method, train

from conftest import tiny_config_dict

pytestmark = pytest.mark.faults


def cfg_of(tmp_path, data, name="t", **over):
    return config_from_dict(tiny_config_dict(tmp_path / "runs", data, name=name, **over))


def config_file(tmp_path, data, name="t", **over) -> Path:
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps(tiny_config_dict(tmp_path / "runs", data, name=name, **over)))
    return p


def steps(run_dir, kind="train"):
    return [r["step"] for r in RunDir(run_dir).read_metrics(kind)]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [ln for ln in err if ln.startswith("workbench: error:")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


class Payload:
    """A pickle that runs code when unpickled: it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def craft(path: Path, marker: Path, template: dict) -> None:
    """Replace ``path`` by a checkpoint whose state dict carries a code-running payload, with a matching sha256
    (an attacker can rewrite the checksum too: the refusal must not rest on it)."""
    bad = dict(template)
    bad["method"] = dict(template["method"])
    bad["method"]["x"] = Payload(marker)
    torch.save(bad, path)
    checksum_path(path).write_text(f"{sha256_file(path)}  {path.name}\n")


# ------------------------------------------------------------------------------------------------ 1. crafted files
def test_1_crafted_checkpoints_run_no_code(tmp_path, tiny_data, capsys):
    cfg = cfg_of(tmp_path, tiny_data, **{"train.iters": 2})
    train(cfg)
    rd = RunDir(cfg.run_dir)
    template = load_checkpoint(rd.latest)
    refused = 0
    # eval --run with a crafted best.pt
    marker = tmp_path / "pwned_eval"
    craft(rd.best, marker, template)
    assert cli(["eval", "--run", str(cfg.run_dir)]) == 2
    assert not marker.exists()
    assert "--trust-pickle" in one_line_error(capsys)
    refused += 1
    # resume with a crafted latest.pt (no earlier file to fall back to)
    marker = tmp_path / "pwned_resume"
    craft(rd.latest, marker, template)
    assert cli(["train", "--config", str(config_file(tmp_path, tiny_data, **{"train.iters": 2}))]) == 2
    assert not marker.exists()
    assert "latest.pt" in one_line_error(capsys)
    refused += 1
    # the low-level loader, on a file with no checksum at all
    checksum_path(rd.latest).unlink()
    with pytest.raises(CheckpointError, match="trust-pickle"):
        load_checkpoint(rd.latest)
    assert not marker.exists()
    refused += 1
    assert refused == 3


def test_1_older_checkpoint_needs_explicit_trust(tmp_path):
    """A checkpoint of the earlier format (numpy RNG state pickled as an ndarray) is refused with a one-line hint,
    and loads with trust_pickle (the --trust-pickle flag)."""
    path = tmp_path / "latest.pt"
    torch.save({"step": 3, "rng": [{"numpy": np.random.get_state()}]}, path)
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        load_checkpoint(path)
    assert load_checkpoint(path, trust_pickle=True)["step"] == 3


# ------------------------------------------------------------------------------------------------ 2. one writer
HOLDER = """
import sys, time
from pathlib import Path
from workbench.engine.rundir import RunLock
RunLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_2_second_trainer_is_refused_then_lock_dies_with_holder(tmp_path, tiny_data, capsys):
    cfg = cfg_of(tmp_path, tiny_data)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(RunDir(cfg.run_dir).lockfile)],
                              stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.time()
        assert cli(["train", "--config", str(config_file(tmp_path, tiny_data)), "--set", "optim.lr=0.5"]) == 2
        assert time.time() - t0 < 30   # at once, not after training
        err = one_line_error(capsys)
        assert f'"pid": {holder.pid}' in err and socket.gethostname() in err
        assert not RunDir(cfg.run_dir).metrics.exists() and not RunDir(cfg.run_dir).config.exists()
    finally:
        holder.send_signal(signal.SIGKILL)   # a crash: the OS releases the lock
        holder.wait()
    assert train(cfg)["finished"]
    assert yaml.safe_load(RunDir(cfg.run_dir).config.read_text())["optim"]["lr"] == cfg.optim.lr


def test_2_lock_is_exclusive_in_process(tmp_path):
    a, b = RunLock(tmp_path / "r" / ".lock"), RunLock(tmp_path / "r" / ".lock")
    a.acquire()
    with pytest.raises(Exception, match="in use by another trainer"):
        b.acquire()
    a.release()
    b.acquire()
    b.release()


# ------------------------------------------------------------------------------------------------ 3. atomic config
def test_3_config_write_is_atomic(tmp_path):
    p = tmp_path / "config.yaml"
    atomic_write_text(p, "a: 1\n")

    class Killed(BaseException):
        pass

    from workbench.engine import rundir

    def dies(f):
        f.write(b"a: ")
        raise Killed

    with pytest.raises(Killed):
        rundir._atomic(p, dies)
    assert p.read_text() == "a: 1\n" and [x.name for x in tmp_path.iterdir()] == ["config.yaml"]


@pytest.mark.parametrize("damage", ["empty", "missing", "yaml"])
def test_3_resume_and_eval_take_the_config_from_the_checkpoint(tmp_path, tiny_data, damage, capsys):
    cfg = cfg_of(tmp_path, tiny_data, **{"train.iters": 4, "train.checkpoint_every": 1})
    train(cfg, stop_at=2)
    rd = RunDir(cfg.run_dir)
    original = rd.config.read_text()
    if damage == "empty":
        rd.config.write_text("")
    elif damage == "missing":
        rd.config.unlink()
    else:
        rd.config.write_text("data: [unclosed\n")
    res = evaluate_run(cfg.run_dir, "latest")   # not the defaults: the defaults' model does not fit the checkpoint
    assert res["num_images"] == 8
    assert "using the config saved in" in capsys.readouterr().err
    s = train(cfg)
    assert s["finished"] and s["steps"] == 4
    assert rd.config.read_text() == original


# ------------------------------------------------------------------------------------------------ 4. skipped steps
def nan_inputs_at(monkeypatch, bad_steps):
    """Make the images of the given 0-based steps NaN (forward, BN statistics and loss all become NaN)."""
    from workbench.methods import SemiBatch

    orig = SemiBatch.from_loader.__func__

    def from_loader(cls, raw, *a, **k):
        b = orig(cls, raw, *a, **k)
        if bad_steps == "all" or raw["step"] in bad_steps:
            b.x_l = b.x_l * float("nan")
            if b.x_w is not None:
                b.x_w = b.x_w * float("nan")
        return b

    monkeypatch.setattr(SemiBatch, "from_loader", classmethod(from_loader))


@pytest.mark.parametrize("fused", [True, False], ids=["deferred", "sync"])
def test_4_skipped_steps_leave_no_trace(tmp_path, tiny_data, monkeypatch, fused):
    nan_inputs_at(monkeypatch, {1, 2})
    cfg = cfg_of(tmp_path, tiny_data, **{"method.name": "meanteacher", "optim.nonfinite": "skip",
                                         "optim.fused": fused, "train.iters": 4})
    s = train(cfg)
    assert s["counters"]["nonfinite_steps"] == 2 and s["nonfinite_tensors"] == []
    rd = RunDir(cfg.run_dir)
    for path in (rd.latest, rd.best):
        state = load_checkpoint(path)["method"]
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        assert bad == [], (path.name, bad[:5])           # BN running stats of student and EMA teacher finite
    assert res_ok(evaluate_run(cfg.run_dir, "latest"))


def res_ok(res):
    return res["nonfinite_tensors"] == [] and 0 <= res["miou"] <= 1


def test_4_skipped_step_restores_buffers_exactly(tmp_path, tiny_data, monkeypatch):
    """A run whose step 2 (of 2) is skipped ends with exactly the state of the same run checkpointed after step 1:
    weights (the fused kernel skipped the update), BN statistics and the EMA teacher (restored on the device)."""
    over = {"method.name": "meanteacher", "optim.nonfinite": "skip", "optim.fused": True, "train.iters": 2,
            "train.checkpoint_every": 1}
    one = cfg_of(tmp_path, tiny_data, name="one", **over)
    train(one, stop_at=1)
    ref = load_checkpoint(RunDir(one.run_dir).latest)["method"]
    nan_inputs_at(monkeypatch, {1})
    two = cfg_of(tmp_path, tiny_data, name="two", **over)
    s = train(two)
    assert s["counters"]["nonfinite_steps"] == 1
    got = load_checkpoint(RunDir(two.run_dir).latest)["method"]
    assert got.keys() == ref.keys() and any(k.startswith("ema.") and "running_mean" in k for k in got)
    for k, v in ref.items():
        assert torch.equal(got[k], v), k


def test_4_run_of_skipped_steps_stops(tmp_path, tiny_data, monkeypatch, capsys):
    nan_inputs_at(monkeypatch, "all")
    cfgf = config_file(tmp_path, tiny_data, **{"optim.nonfinite": "skip", "optim.skip_limit": 3, "train.iters": 8,
                                               "optim.fused": True})
    assert cli(["train", "--config", str(cfgf)]) == 2
    assert "consecutive" in one_line_error(capsys)


def test_4_eval_and_summary_flag_nonfinite_tensors(tmp_path, tiny_data, capsys):
    cfg = cfg_of(tmp_path, tiny_data, **{"train.iters": 2})
    train(cfg)
    rd = RunDir(cfg.run_dir)
    ck = load_checkpoint(rd.best)
    key = next(k for k in ck["method"] if k.endswith("running_var"))
    ck["method"][key][0] = float("nan")
    save_checkpoint(rd.best, **ck)
    res = evaluate_run(cfg.run_dir)
    assert res["nonfinite_tensors"] == [key]
    assert "non-finite" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ 5. bad values
BAD_VALUES = ["eval.window=-3", "eval.stride=500", "eval.batch_size=0", "method.tau=5", "method.tau=-0.2",
              "optim.momentum=1.5", "optim.poly_power=-3", "optim.head_lr_mult=-1", "eval.scales=[0]",
              "optim.lr=.nan", "data.verify=sometimes", "train.device=gpu0"]


@pytest.mark.parametrize("override", BAD_VALUES + ["method.weight_s=-10"])
def test_5_bad_values_refused_at_load(override):
    method = "scalematch" if "weight_s" in override else "fixmatch"
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(None, ["method.name=" + method, override])


def test_5_bad_validation_file_refused_before_training(tmp_path, tiny_data):
    root = tmp_path / "d"
    shutil.copytree(tiny_data, root)
    img = (root / "splits" / "val.txt").read_text().split()[-2]
    (root / img).write_bytes(b"not an image")
    cfg = cfg_of(tmp_path, root, **{"data.root": str(root), "data.dataset": "prepared"})
    with pytest.raises(DataError, match=Path(img).name):
        train(cfg)
    assert not cfg.run_dir.exists()   # no step was trained, nothing written


def test_5_resume_accepts_keys_that_cannot_change_weights(tmp_path, tiny_data):
    cfg = cfg_of(tmp_path, tiny_data, **{"train.iters": 4, "train.checkpoint_every": 1})
    train(cfg, stop_at=2)
    changed = cfg_of(tmp_path, tiny_data, **{"train.iters": 4, "train.checkpoint_every": 1, "eval.mode": "sliding",
                                             "eval.window": 16, "eval.stride": 8, "data.bad_data": "skip",
                                             "data.num_workers": 1, "train.log_every": 2})
    assert train(changed)["finished"]
    rec = [r for r in RunDir(cfg.run_dir).read_metrics("config_change")]
    assert len(rec) == 1 and rec[0]["step"] == 2
    assert rec[0]["changes"]["eval.mode"] == ["original", "sliding"]
    assert rec[0]["changes"]["data.bad_data"] == ["fail", "skip"]
    assert yaml.safe_load(RunDir(cfg.run_dir).config.read_text())["eval"]["mode"] == "sliding"
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        train(cfg_of(tmp_path, tiny_data, **{"train.iters": 4, "optim.lr": 0.5}))


# ------------------------------------------------------------------------------------------------ 6. damaged data
def damage_tensor_bytes(path: Path, n: int = 64) -> None:
    """Change ``n`` bytes in the middle of the largest tensor record of a torch zip checkpoint."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = np.frombuffer(f.read(4), "<u2")
        start = info.header_offset + 30 + int(name_len) + int(extra_len) + info.file_size // 2
        f.seek(start)
        data = bytearray(f.read(n))
        f.seek(start)
        f.write(bytes(b ^ 0x5A for b in data))


def test_6_damaged_tensor_data_detected_and_previous_used(tmp_path, tiny_data, capsys):
    cfg = cfg_of(tmp_path, tiny_data, **{"train.iters": 4, "train.checkpoint_every": 1})
    train(cfg, stop_at=3)
    rd = RunDir(cfg.run_dir)
    assert previous_path(rd.latest).is_file()
    torch.load(rd.latest, weights_only=True)            # the container itself still loads after the damage:
    damage_tensor_bytes(rd.latest)
    torch.load(rd.latest, weights_only=True)            # only the checksum can tell
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(rd.latest)
    ck, used = load_latest(rd.latest)
    assert used == previous_path(rd.latest) and ck["step"] == 2
    err = capsys.readouterr().err
    assert "latest.pt" in err and "latest.prev.pt" in err
    s = train(cfg)                                     # resumes from step 2
    assert s["finished"] and steps(cfg.run_dir) == [1, 2, 3, 4]
    damage_tensor_bytes(rd.best)
    with pytest.raises(CheckpointError, match="damaged"):
        load_method(cfg.run_dir)


# ------------------------------------------------------------------------------------------------ 7. records
class Interrupt(BaseException):
    pass


def test_7_restart_without_checkpoint_does_not_duplicate(tmp_path, tiny_data, monkeypatch):
    from workbench.methods.supervised import Supervised

    orig = Supervised.training_step

    def dies_at_3(self, batch, step):
        if step.iteration == 2:
            raise Interrupt
        return orig(self, batch, step)

    cfg = cfg_of(tmp_path, tiny_data, **{"train.iters": 4, "train.checkpoint_min_seconds": 1e9})
    monkeypatch.setattr(Supervised, "training_step", dies_at_3)
    with pytest.raises(Interrupt):
        train(cfg)
    assert steps(cfg.run_dir) == [1, 2] and not RunDir(cfg.run_dir).latest.exists()
    monkeypatch.setattr(Supervised, "training_step", orig)
    train(cfg)
    assert steps(cfg.run_dir) == [1, 2, 3, 4]


def test_7_garbled_line_named_and_resume_logs_full_window(tmp_path, tiny_data, monkeypatch, capsys):
    from workbench.methods.supervised import Supervised

    over = {"train.iters": 4, "train.checkpoint_every": 1, "train.log_every": 2}
    full = cfg_of(tmp_path, tiny_data, name="full", **over)
    train(full)
    orig = Supervised.training_step

    def dies_at_4(self, batch, step):   # a kill after the checkpoint of step 3, inside the logging window 3-4
        if step.iteration == 3:
            raise Interrupt
        return orig(self, batch, step)

    cut = cfg_of(tmp_path, tiny_data, name="cut", **over)
    monkeypatch.setattr(Supervised, "training_step", dies_at_4)
    with pytest.raises(Interrupt):
        train(cut)
    monkeypatch.setattr(Supervised, "training_step", orig)
    rd = RunDir(cut.run_dir)
    lines = rd.metrics.read_text().splitlines()
    rd.metrics.write_text("\n".join([lines[0], '{"kind": "train", "st', *lines[1:]]) + "\n")   # garbled line 2
    (rd.path / ".config.yaml.x1.tmp").write_text("stale")
    (rd.artifacts / ".step_0000009.pt.x2.tmp").write_text("stale")
    assert train(cut)["finished"]
    err = capsys.readouterr().err
    assert "metrics.jsonl:2" in err
    assert not list(rd.path.rglob("*.tmp"))
    a, b = rd.read_metrics("train"), RunDir(full.run_dir).read_metrics("train")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [2, 4]
    for ra, rb in zip(a, b):   # step 4 averages steps 3 and 4 in both: the window's sums were checkpointed
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6), ra["step"]


def test_7_unreadable_line_named_by_file_and_line(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    problems: list[str] = []
    assert read_jsonl(p, problems) == [{"step": 1}, {"step": 3}]
    assert len(problems) == 1 and problems[0].startswith(f"{p}:2: unreadable line")


# ------------------------------------------------------------------------------------------------ 8. one line
def test_8_nan_stop_is_one_line(tmp_path, tiny_data, monkeypatch, capsys):
    nan_inputs_at(monkeypatch, {1})
    assert cli(["train", "--config", str(config_file(tmp_path, tiny_data))]) == 2
    assert "non-finite" in one_line_error(capsys)


def test_8_disk_full_is_one_line_and_keeps_files(tmp_path, tiny_data, monkeypatch, capsys):
    import errno

    cfg = cfg_of(tmp_path, tiny_data, **{"train.iters": 4, "train.checkpoint_every": 1})
    train(cfg, stop_at=2)
    rd = RunDir(cfg.run_dir)
    before = sha256_file(rd.latest)
    real = torch.save

    def full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    assert cli(["train", "--config", str(config_file(tmp_path, tiny_data, **{"train.iters": 4,
                                                                           "train.checkpoint_every": 1}))]) == 2
    assert "No space left" in one_line_error(capsys)
    monkeypatch.setattr(torch, "save", real)
    assert sha256_file(rd.latest) == before and load_checkpoint(rd.latest)["step"] == 2
    assert not list(rd.path.rglob("*.tmp"))


def test_8_yaml_error_in_run_config_is_handled(tmp_path, tiny_data, capsys):
    cfg = cfg_of(tmp_path, tiny_data, **{"train.iters": 2})
    train(cfg)
    RunDir(cfg.run_dir).config.write_text("model: {width: [\n")
    assert cli(["eval", "--run", str(cfg.run_dir)]) == 0
    assert "using the config saved in" in capsys.readouterr().err
    shutil.rmtree(RunDir(cfg.run_dir).checkpoints)
    RunDir(cfg.run_dir).config.write_text("model: {width: [\n")
    assert cli(["eval", "--run", str(cfg.run_dir)]) == 2
    assert "config.yaml is unreadable" in one_line_error(capsys)


def test_8_port_in_use_is_one_line(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert cli(["dashboard", str(tmp_path), "--port", str(port)]) == 2
    assert str(port) in one_line_error(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_8_cuda_without_cuda_is_one_line(tmp_path, tiny_data, capsys):
    assert cli(["train", "--config", str(config_file(tmp_path, tiny_data)), "--set", "train.device=cuda"]) == 2
    assert "CUDA is not available" in one_line_error(capsys)


@pytest.mark.parametrize("argv", [["report", "no_such_notebook"], ["data", "synth", "--out", "{tmp}/s", "--set",
                                                                   "no_such_field=1"],
                                  ["data", "synth", "--out", "{tmp}/s", "--set", "num_train=-5"]],
                         ids=["report", "synth-key", "synth-value"])
def test_8_report_and_synth_input_errors_are_one_line(tmp_path, argv, capsys):
    assert cli([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    one_line_error(capsys)


# ------------------------------------------------------------------------------------------------ 9. boundaries
def test_9_run_name_cannot_leave_the_runs_root(tmp_path, tiny_data, capsys):
    cfgf = config_file(tmp_path, tiny_data)
    assert cli(["train", "--config", str(cfgf), "--name", "../../escaped"]) == 2
    assert "name" in one_line_error(capsys)
    assert not (tmp_path.parent / "escaped").exists() and not (tmp_path / "escaped").exists()


def test_9_dashboard_skips_symlinks_out_of_its_root(tmp_path):
    from workbench.dashboard.data import discover_runs

    (tmp_path / "root" / "real").mkdir(parents=True)
    (tmp_path / "root" / "real" / "metrics.jsonl").write_text("")
    (tmp_path / "outside" / "secret").mkdir(parents=True)
    (tmp_path / "outside" / "secret" / "config.yaml").write_text("name: x\n")
    (tmp_path / "root" / "link").symlink_to(tmp_path / "outside" / "secret", target_is_directory=True)
    assert discover_runs(tmp_path / "root") == ["real"]


def test_9_prepare_folder_checks_unlabeled_images(tmp_path):
    from test_recipes import build_folder

    from workbench.data.recipes import prepare
    from workbench.data.recipes.common import RecipeError

    build_folder(tmp_path / "src")
    bad = tmp_path / "src" / "images" / "b02.jpg"          # a mask-less (unlabeled) image
    bad.write_bytes(bad.read_bytes()[:60])
    with pytest.raises(RecipeError, match="b02.jpg"):
        prepare("folder", tmp_path / "root", tmp_path / "src", verify=False, progress=False)


def test_9_skipped_samples_are_named(tmp_path, tiny_data, capsys):
    root = tmp_path / "d"
    shutil.copytree(tiny_data, root)
    img = (root / "splits" / "labeled_1-4.txt").read_text().split()[0]
    data = (root / img).read_bytes()
    (root / img).write_bytes(data[: len(data) // 3])        # truncated: its header still reads
    cfg = cfg_of(tmp_path, root, **{"data.root": str(root), "data.dataset": "prepared", "data.bad_data": "skip",
                                    "train.iters": 6})
    s = train(cfg)
    assert s["counters"]["skipped_samples"] >= 1
    assert [Path(f).name for f in s["skipped_files"]] == [Path(img).name]
    assert json.loads(RunDir(cfg.run_dir).summary.read_text())["skipped_files"] == s["skipped_files"]
    recs = RunDir(cfg.run_dir).read_metrics("skipped")
    assert recs and [Path(f).name for f in recs[0]["files"]] == [Path(img).name]
    assert Path(img).name in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ kills
KILL_POINTS = 3


@pytest.mark.slow  # real processes killed with SIGKILL
def test_kills_during_training_then_resume(tmp_path, tiny_data):
    """SIGKILL a trainer at random moments (mid-step, mid-checkpoint, mid-log) KILL_POINTS times; each restart is
    accepted (the lock died with its holder), and the final run has every step once and a verified checkpoint."""
    import random

    cfgf = config_file(tmp_path, tiny_data, name="killed", **{"train.iters": 16, "train.checkpoint_every": 1,
                                                                "data.num_workers": 0})
    cmd = [sys.executable, "-m", "workbench", "train", "--config", str(cfgf)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rd = RunDir(tmp_path / "runs" / "killed")
    rng = random.Random(1)
    survived = 0
    for _ in range(KILL_POINTS):
        before = len(rd.metrics.read_text().splitlines()) if rd.metrics.exists() else 0
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None:
            if rd.metrics.exists() and len(rd.metrics.read_text().splitlines()) > before:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.3))
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        survived += 1
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert steps(rd.path) == list(range(1, 17))
    assert load_checkpoint(rd.latest)["step"] == 16
    assert not list(rd.path.rglob("*.tmp"))
    assert survived == KILL_POINTS
