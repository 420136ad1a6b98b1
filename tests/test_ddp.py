"""DDP on CPU (gloo): 2 processes on a global batch == 1 process on that batch; the --nproc launcher."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from workbench.config import config_from_dict
from workbench.data.dataset import SegDataset, StepDataset, StepPlan
from workbench.engine.distributed import convert_sync_batchnorm
from workbench.engine.trainer import build_from_config
from workbench.methods import SemiBatch, StepInfo

from conftest import tiny_config_dict

pytestmark = pytest.mark.slow  # real process groups (gloo), spawned processes

GLOBAL_BATCH = 4


def setup_method(tmp, data_root):
    cfg = config_from_dict(tiny_config_dict(tmp, data_root, **{"data.scale_range": [1.0, 1.0]}))
    torch.manual_seed(0)
    method = build_from_config(cfg, 6, torch.device("cpu"))
    for mod in method.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
    return cfg, method


def global_batch(cfg, data_root):
    lab = SegDataset(data_root, "labeled_1-4")
    ds = StepDataset(lab, None, StepPlan(len(lab), 0, GLOBAL_BATCH, GLOBAL_BATCH, 1, 0, 0, False), 32,
                     scale_range=(1.0, 1.0))
    ds.total_steps = 1
    raw = ds[0]
    assert (raw["y_l"] != 255).all()  # no padding: every process normalises its CE over the same pixel count
    return SemiBatch.from_loader(raw, torch.device("cpu"), cfg.data.mean, cfg.data.std)


def worker(rank, world, init_file, out_dir, data_root):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        cfg, method = setup_method(out_dir, data_root)
        convert_sync_batchnorm(method, torch.device("cpu"))
        ddp = nn.parallel.DistributedDataParallel(method)
        b = global_batch(cfg, data_root)
        half = GLOBAL_BATCH // world
        sl = slice(rank * half, (rank + 1) * half)
        local = SemiBatch(x_l=b.x_l[sl], y_l=b.y_l[sl])
        out = ddp(local, StepInfo(0, 0, 1, 1))
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
        torch.save({"loss": out.loss.detach(), "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one(tmp_path, tiny_data):
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(tmp_path), str(tiny_data)), nprocs=2, join=True)
    cfg, method = setup_method(tmp_path, tiny_data)
    out = method(global_batch(cfg, tiny_data), StepInfo(0, 0, 1, 1))
    out.loss.backward()
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert torch.isclose((r0["loss"] + r1["loss"]) / 2, out.loss.detach(), rtol=1e-5)
    assert not torch.isclose(r0["loss"], r1["loss"])  # the halves really differ
    n = 0
    for name, p in method.named_parameters():
        if p.grad is None:
            continue
        n += 1
        g0, g1 = r0["grads"][name], r1["grads"][name]
        assert torch.allclose(g0, g1, atol=1e-6)                       # DDP synchronised the gradients
        assert torch.allclose(g0, p.grad, rtol=1e-3, atol=1e-5), name  # and they equal the global-batch ones
    assert n > 20


def test_nproc_launcher_end_to_end(tmp_path, tiny_data):
    # the fused SGD as on CUDA: the deferred, sync-free non-finite check under DDP
    cfgd = tiny_config_dict(tmp_path / "runs", tiny_data, **{"train.iters": 2, "data.batch_size": 2,
                                                             "optim.fused": True})
    (tmp_path / "c.json").write_text(json.dumps(cfgd))  # JSON is YAML
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "workbench", "train", "--config", str(tmp_path / "c.json"),
                        "--nproc", "2"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "t" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["finished"]
    lines = (tmp_path / "runs" / "t" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines if '"train"' in line] == [1, 2]  # only rank 0 wrote
