"""Faults: hard kills at random moments, a full disk during a checkpoint write, corrupt images."""
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from workbench.config import config_from_dict
from workbench.data.dataset import DataError
from workbench.engine.rundir import RunDir, atomic_torch_save
from workbench.engine.trainer import train

from conftest import tiny_config_dict


def records(run_dir, kind):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in RunDir(run_dir).read_metrics(kind)]


def test_sigkill_at_random_points_then_resume(tmp_path, tiny_data):
    over = {"method.name": "fixmatch", "train.iters": 24, "train.checkpoint_every": 1, "train.capture_every": 4,
            "data.num_workers": 1}
    ref = config_from_dict(tiny_config_dict(tmp_path / "runs", tiny_data, name="ref", **over))
    train(ref)
    cfgd = tiny_config_dict(tmp_path / "runs", tiny_data, name="killed", **over)
    (tmp_path / "c.json").write_text(json.dumps(cfgd))
    cmd = [sys.executable, "-m", "workbench", "train", "--config", str(tmp_path / "c.json")]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    rng = random.Random(0)
    metrics = tmp_path / "runs" / "killed" / "metrics.jsonl"
    kills = 0
    for _ in range(3):
        before = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None:   # wait until it trains, then kill at a random moment
            if metrics.exists() and len(metrics.read_text().splitlines()) > before:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.4))
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            kills += 1
        p.wait()
    assert kills >= 2
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    killed = tmp_path / "runs" / "killed"
    a, b = records(ref.run_dir, "train"), records(killed, "train")
    assert [x["step"] for x in b] == list(range(1, 25))          # no duplicated or torn lines
    for x, y in zip(a, b):
        for k, v in x.items():
            assert (v == pytest.approx(y[k], rel=1e-5, abs=1e-6)) if isinstance(v, float) else v == y[k], (x["step"], k)
    assert [e["miou"] for e in records(ref.run_dir, "eval")] == pytest.approx(
        [e["miou"] for e in records(killed, "eval")])
    steps = list(range(4, 25, 4))
    assert [e["step"] for e in RunDir(killed).artifact_index()] == steps
    assert sorted(p.name for p in (killed / "artifacts").glob("*.pt")) == [f"step_{s:07d}.pt" for s in steps]
    assert not list((killed / "checkpoints").glob(".*.tmp"))
    assert json.loads((killed / "summary.json").read_text())["finished"]


def test_full_disk_during_checkpoint_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "latest.pt"
    atomic_torch_save({"step": 1}, path)
    real_save = torch.save

    def save_then_fail(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(OSError, match="No space"):
        atomic_torch_save({"step": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"]   # no temp file left behind


def corrupt_one_labeled(root):
    img = (root / "splits" / "labeled_1-4.txt").read_text().split()[0]
    data = (root / img).read_bytes()
    (root / img).write_bytes(data[: len(data) // 3])               # truncated JPEG
    return img


def test_corrupt_image_fail_fast_names_it(tmp_path, tiny_data):
    root = tmp_path / "d"
    shutil.copytree(tiny_data, root)
    img = corrupt_one_labeled(root)
    cfg = config_from_dict(tiny_config_dict(tmp_path / "runs", root, **{"train.iters": 6}))
    with pytest.raises(DataError, match=img.split("/")[-1]):
        train(cfg)


def test_corrupt_image_skip_policy_counts(tmp_path, tiny_data):
    root = tmp_path / "d"
    shutil.copytree(tiny_data, root)
    corrupt_one_labeled(root)
    cfg = config_from_dict(tiny_config_dict(tmp_path / "runs", root, **{"train.iters": 6, "data.bad_data": "skip"}))
    s = train(cfg)
    assert s["finished"] and s["counters"]["skipped_samples"] >= 1
