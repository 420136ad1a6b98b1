"""Trainer: run directory, resume reproducibility, clean failures, artifacts, CLI."""
import json
import re
import shutil

import pytest
import torch

from workbench.cli import main as cli
from workbench.config import ConfigError
from workbench.engine.checkpoint import CheckpointError, checksum_path
from workbench.engine.rundir import RunDir, read_jsonl
from workbench.engine.trainer import Trainer, evaluate_run, load_method, train


def train_records(run_dir, kind="train"):
    return [{k: v for k, v in r.items() if k not in ("seconds",)} for r in RunDir(run_dir).read_metrics(kind)]


def test_run_directory_contents(tiny_cfg):
    cfg = tiny_cfg(**{"train.capture_every": 2, "method.name": "unimatch"})
    s = train(cfg)
    rd = RunDir(cfg.run_dir)
    assert rd.config.is_file() and rd.latest.is_file() and rd.best.is_file() and rd.summary.is_file()
    assert s["finished"] and s["steps"] == 4
    summary = json.loads(rd.summary.read_text())
    assert summary["environment"]["torch"] == torch.__version__ and summary["seed"] == 0
    assert 0.0 <= summary["final"]["miou"] <= 1.0
    idx = rd.artifact_index()
    assert [e["step"] for e in idx] == [2, 4]
    arts = rd.load_artifacts(2)
    assert arts["x_w"].dtype == torch.uint8 and arts["x_w"].shape == (4, 3, 32, 32)
    assert arts["pseudo"].dtype == torch.uint8 and arts["conf"].dtype == torch.float16
    train_recs = rd.read_metrics("train")
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4]
    assert {"loss", "loss_x", "loss_s", "loss_fp", "mask_ratio", "pl_acc", "pl_miou", "mining_ratio",
            "effective_ratio"} <= set(train_recs[0])


def test_capture_off_writes_no_artifacts(tiny_cfg):
    cfg = tiny_cfg()
    train(cfg)
    assert RunDir(cfg.run_dir).artifact_index() == []


@pytest.mark.parametrize("method", ["supervised", "unimatch"])
def test_resume_reproduces_uninterrupted_run(tiny_cfg, tmp_path, method):
    over = {"method.name": method, "train.iters": 6, "train.checkpoint_every": 2, "train.capture_every": 1}
    full = tiny_cfg(**over, name="full")
    train(full)
    cut = tiny_cfg(**over, name="cut")
    Trainer(cut).fit(stop_at=3)           # "crash" after step 3: the last checkpoint is at step 2
    assert torch.load(RunDir(cut.run_dir).latest, weights_only=False)["step"] == 2
    assert max(r["step"] for r in train_records(cut.run_dir)) == 3
    s = train(cut)                        # resume: steps 3..6 again
    assert s["finished"]
    a, b = train_records(full.run_dir), train_records(cut.run_dir)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]  # no duplicated step-3 line
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            if isinstance(ra[k], float):
                assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-7), (ra["step"], k)
            else:
                assert ra[k] == rb[k], (ra["step"], k)
    ea, eb = train_records(full.run_dir, "eval"), train_records(cut.run_dir, "eval")
    assert [e["miou"] for e in ea] == pytest.approx([e["miou"] for e in eb])
    assert [e["step"] for e in RunDir(cut.run_dir).artifact_index()] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("method", ["supervised", "unimatch"])
def test_same_config_same_threads_gives_bit_identical_runs(tiny_cfg, method):
    """Deterministic training on one machine: two runs of one config (same thread count) log exactly the same
    numbers and end with bitwise equal weights (not approx: ==). Across CPUs it cannot hold (README)."""
    over = {"method.name": method, "train.iters": 4, "train.eval_every": 2}
    a, b = tiny_cfg(**over, name="a"), tiny_cfg(**over, name="b")
    sa, sb = train(a), train(b)
    ra = [{k: v for k, v in r.items() if k != "seconds"} for r in RunDir(a.run_dir).read_metrics()]  # wall time
    rb = [{k: v for k, v in r.items() if k != "seconds"} for r in RunDir(b.run_dir).read_metrics()]
    assert ra == rb and len(ra) >= 4
    assert sa["dataset"]["fingerprint"] == sb["dataset"]["fingerprint"]
    assert sa["dataset"]["fingerprint"].startswith("sha256:") and sa["dataset"]["fingerprint_of"] == "files"
    wa = torch.load(RunDir(a.run_dir).latest, weights_only=False)["method"]
    wb = torch.load(RunDir(b.run_dir).latest, weights_only=False)["method"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_changed_config_on_existing_run_is_rejected(tiny_cfg):
    train(tiny_cfg())
    with pytest.raises(ConfigError, match="different config"):
        train(tiny_cfg(**{"optim.lr": 0.5}))


def test_run_from_an_older_schema_resumes(tiny_cfg):
    """A run directory written before a config key existed (here optim.fused) and with an amp value that means the
    same on this device ("auto" = fp32 on the CPU) resumes; a key that does change the run still stops it."""
    import yaml

    cfg = tiny_cfg(name="old", **{"train.iters": 2})
    train(cfg)
    saved = yaml.safe_load((cfg.run_dir / "config.yaml").read_text())
    del saved["optim"]["fused"]
    saved["optim"]["amp"] = "auto"
    (cfg.run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    s = train(tiny_cfg(name="old", **{"train.iters": 2}))
    assert s["finished"] and s["steps"] == 2
    with pytest.raises(ConfigError, match="optim.momentum"):
        train(tiny_cfg(name="old", **{"train.iters": 2, "optim.momentum": 0.5}))


def test_checkpoint_from_other_model_is_named(tiny_cfg, tmp_path):
    a = tiny_cfg(name="a")
    train(a)
    b = tiny_cfg(name="b", **{"model.width": 0.5})
    train(b)
    shutil.copy(RunDir(a.run_dir).best, RunDir(b.run_dir).best)
    shutil.copy(checksum_path(RunDir(a.run_dir).best), checksum_path(RunDir(b.run_dir).best))   # with its sha256
    with pytest.raises(CheckpointError, match="best.pt") as e:
        load_method(b.run_dir)
    assert "does not fit" in str(e.value)
    RunDir(b.run_dir).best.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="damaged"):    # the recorded sha256 no longer matches
        load_method(b.run_dir)
    checksum_path(RunDir(b.run_dir).best).unlink()            # no checksum recorded (an older run): read, and fail
    with pytest.raises(CheckpointError, match="cannot read"):
        load_method(b.run_dir)


def test_missing_file_fails_before_writing(tiny_cfg, tmp_path, tiny_data):
    root = tmp_path / "broken"
    shutil.copytree(tiny_data, root)
    img = (root / "splits" / "val.txt").read_text().split()[0]
    (root / img).unlink()
    # "prepared": a synthetic root would be repaired (regenerated) by ensure_synthetic instead
    cfg = tiny_cfg(**{"data.root": str(root), "data.dataset": "prepared"})
    from workbench.data.dataset import DataError

    with pytest.raises(DataError, match=img.split("/")[-1]):
        train(cfg)
    assert not cfg.run_dir.exists()


@pytest.mark.parametrize("fused", [False, True], ids=["foreach-undone", "fused-skipped"])
def test_nonfinite_policy(tiny_cfg, monkeypatch, fused):
    """Both kernels defer the verdict: the fused SGD skips the step on the device, the per-tensor step is undone
    there from a copy."""
    from workbench.engine.trainer import NonFiniteError
    from workbench.methods.supervised import Supervised

    orig = Supervised.training_step

    def nan_at_2(self, batch, step):
        out = orig(self, batch, step)
        if step.iteration == 1:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(Supervised, "training_step", nan_at_2)
    with pytest.raises(NonFiniteError, match="step 1") as e:
        train(tiny_cfg(name="stop", **{"optim.fused": fused}))
    assert re.search(r"batch ids \['", str(e.value)), str(e.value)
    s = train(tiny_cfg(name="skip", **{"optim.nonfinite": "skip", "optim.fused": fused}))
    assert s["counters"]["nonfinite_steps"] == 1 and s["finished"]
    m, _, _ = load_method(tiny_cfg(name="skip", **{"optim.fused": fused}).run_dir, "latest")
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_torn_metrics_line_is_ignored(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert read_jsonl(p) == [{"step": 1}, {"step": 2}]


def test_evaluate_run_and_cli(tiny_cfg, capsys):
    cfg = tiny_cfg()
    train(cfg)
    res = evaluate_run(cfg.run_dir, overrides={"eval.mode": "sliding", "eval.window": 16, "eval.stride": 8})
    assert 0 <= res["miou"] <= 1 and res["num_images"] == 8
    assert cli(["eval", "--run", str(cfg.run_dir), "--checkpoint", "latest"]) == 0
    assert '"miou"' in capsys.readouterr().out


def test_cli_rejects_unknown_key_without_writing(tmp_path, capsys):
    code = cli(["train", "--set", f"out_dir={tmp_path}/runs", "--set", "optim.lrr=1"])
    assert code == 2
    assert "optim.lrr" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_cli_bench_writes_json(tmp_path):
    assert cli(["bench", "--method", "fixmatch", "--iters", "2", "--warmup", "1", "--repeats", "1", "--crop", "32",
                "--batch", "2", "--out", str(tmp_path), "--set", "model.width=0.25", "--set",
                "model.head_width=0.25"]) == 0
    res = json.loads((tmp_path / "fixmatch.json").read_text())
    assert res["seconds_per_iter"] > 0 and res["images_per_second"] > 0 and res["peak_rss_mb"] > 0
    assert "fixmatch" in (tmp_path / "bench.md").read_text()
    assert res["host_reads_per_step"] == 0 and res["host_read_sites"] == {}
    assert res["amp"] == "off" and not res["channels_last"] and res["fused_optimizer"]   # automatic: fused on CPU
    assert cli(["bench", "--method", "supervised", "--model", "quickstart", "--iters", "1", "--warmup", "0",
                "--repeats", "1", "--crop", "32", "--batch", "2", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "supervised.json").read_text())["overrides"] == ["model.aspp_rates=[2,4,6]"]
    with pytest.raises(ValueError, match="model must be one of"):
        cli(["bench", "--method", "supervised", "--model", "resnet7", "--out", str(tmp_path)])


def test_cli_bench_gpu_path_switches_run_on_cpu(tmp_path):
    """bf16 autocast, channels_last and the fused SGD are reachable from the CLI on the CPU too."""
    assert cli(["bench", "--method", "unimatch", "--iters", "1", "--warmup", "1", "--repeats", "1", "--crop", "32",
                "--batch", "2", "--out", str(tmp_path), "--set", "model.width=0.25", "--set", "model.head_width=0.25",
                "--set", "optim.amp=bf16", "--set", "model.channels_last=true", "--set", "optim.fused=true"]) == 0
    res = json.loads((tmp_path / "unimatch.json").read_text())
    assert res["amp"] == "bfloat16" and res["channels_last"] and res["fused_optimizer"]
    assert res["host_reads_per_step"] == 0


def test_cli_bench_on_real_data_reports_loader_stall(tmp_path, tiny_data):
    """With --data the batches come from the training loader; with 0 workers every batch is loaded in the timed
    loop, so the stall fraction is strictly between 0 and 1."""
    assert cli(["bench", "--method", "fixmatch", "--iters", "2", "--warmup", "1", "--repeats", "1", "--crop", "32",
                "--batch", "2", "--out", str(tmp_path), "--data", str(tiny_data), "--workers", "0",
                "--set", "data.split=1-4", "--set", "data.dataset=prepared", "--set", "model.width=0.25", "--set", "model.head_width=0.25"]) == 0
    res = json.loads((tmp_path / "fixmatch.json").read_text())
    assert 0 < res["data_stall_fraction"] < 1 and res["num_workers"] == 0 and res["data_root"] == str(tiny_data)
    assert "(0 workers)" in (tmp_path / "bench.md").read_text()


def test_grad_accumulation_and_lr_scaling(tiny_cfg):
    s = train(tiny_cfg(**{"optim.grad_accum": 2, "data.batch_size": 2, "optim.lr": 0.01}))
    assert s["finished"] and s["steps"] == 4
    # 2 images x 1 process x 2 micro-batches = 4 labeled images per step; reference 8 -> lr x 0.5 (linear rule)
    assert s["lr"] == pytest.approx(0.005)


def test_inconsistent_splits_rejected_before_writing(tiny_cfg, tmp_path, tiny_data):
    root = tmp_path / "d"
    shutil.copytree(tiny_data, root)
    lab = (root / "splits" / "labeled_1-4.txt").read_text().splitlines()
    unl = root / "splits" / "unlabeled_1-4.txt"
    unl.write_text("\n".join(unl.read_text().splitlines() + lab[:1]) + "\n")   # one image labeled AND unlabeled
    cfg = tiny_cfg(**{"data.root": str(root), "data.dataset": "prepared", "method.name": "fixmatch"})
    with pytest.raises(ConfigError, match="both"):
        train(cfg)
    unl.write_text("\n".join(unl.read_text().splitlines()[:-1]) + "\n")
    train_list = root / "splits" / "train.txt"
    train_list.write_text("\n".join(x for x in train_list.read_text().splitlines() if x != lab[0]) + "\n")
    with pytest.raises(ConfigError, match="not in the dataset's train list"):
        train(cfg)
    assert not cfg.run_dir.exists()


def test_same_seed_same_metrics(tiny_cfg):
    a, b = tiny_cfg(name="a", **{"method.name": "unimatch"}), tiny_cfg(name="b", **{"method.name": "unimatch"})
    train(a)
    train(b)
    assert train_records(a.run_dir) == train_records(b.run_dir)
    assert train_records(a.run_dir, "eval") == train_records(b.run_dir, "eval")


def test_compiled_model_trains_and_checkpoints_keep_plain_keys(tiny_cfg):
    """model.compile compiles the network in place (eager backend here: no C++ toolchain needed); the run trains and
    its checkpoint loads into an uncompiled model (no ``_orig_mod.`` prefixes)."""
    from workbench.engine.checkpoint import load_checkpoint
    from workbench.engine.rundir import RunDir
    from workbench.engine.trainer import build_from_config

    cfg = tiny_cfg(**{"method.name": "supervised", "model.compile": "default", "model.compile_backend": "eager",
                      "train.iters": 2})
    method = build_from_config(cfg, 6, torch.device("cpu"))
    assert method.model._compiled_call_impl is not None
    assert train(cfg)["finished"]
    state = load_checkpoint(RunDir(cfg.run_dir).latest)["method"]
    assert not any("_orig_mod" in k for k in state)
    plain = build_from_config(tiny_cfg(**{"method.name": "supervised"}), 6, torch.device("cpu"))
    plain.load_state_dict(state)
    with pytest.raises(ConfigError, match="model.compile"):
        tiny_cfg(**{"model.compile": "fast"})


def test_loader_workers_persist_across_evaluations(tiny_cfg):
    """With loader workers, the training loader and the (built once, persistent) validation loader serve several
    evaluations, and the run matches the one without workers (the data pipeline is seeded per sample)."""
    runs = {}
    for nw in (0, 1):
        cfg = tiny_cfg(name=f"w{nw}", **{"data.num_workers": nw, "train.eval_every": 2})
        s = train(cfg)
        assert s["finished"]
        runs[nw] = [r["miou"] for r in RunDir(cfg.run_dir).read_metrics("eval")]
    assert len(runs[1]) == 2 and runs[1] == pytest.approx(runs[0])
