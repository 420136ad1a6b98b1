"""``workbench bench``: steady-state speed and peak memory of a method's training step.

By default the step is timed on synthetic in-memory batches (no data loading), after ``warmup`` steps; ``repeats``
timed blocks of ``iters`` steps each, median reported. With ``data_root`` (``--data``) the batches come from the
training data loader over that dataset (the trainer's own loader: ``num_workers`` processes, prefetch, pinned memory
on CUDA), and the result adds ``data_stall_fraction``: the share of the timed wall time spent waiting for the next
batch (0 = the loader keeps up). Peak memory is CUDA max
allocated on GPU, and on CPU the growth of the process's peak RSS during the timed steps plus the absolute peak.
One more, untimed step counts the step's device-to-host reads (``host_reads_per_step``, with their code sites: see
:mod:`workbench.engine.syncs`); on a GPU each is a synchronisation. The toggles of the GPU path are config overrides:
``optim.amp`` (bf16/fp16/off), ``model.channels_last``, ``train.cudnn_benchmark``, ``optim.fused``,
``model.compile``.
Results: JSON in ``reports/bench/<method>.json`` (+ a markdown table of all methods benchmarked so far).
"""
from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from workbench.config import apply_overrides, config_from_dict
from workbench.engine.build import amp_dtype, build_from_config, environment
from workbench.engine.optim import build_sgd, fused_choice
from workbench.engine.rundir import atomic_write_text
from workbench.engine.syncs import host_reads
from workbench.methods import SemiBatch, StepInfo

PAPER_MODEL = ["model.stem=deep", "model.width=1.0", "model.head_width=1.0", "model.output_stride=16",
               "model.aspp_rates=null"]
MODEL_PRESETS: dict[str, list[str]] = {
    "config": [],
    "quickstart": ["model.aspp_rates=[2,4,6]"],
    "deeplabv3plus-r50": ["model.backbone=resnet50", *PAPER_MODEL],
    "deeplabv3plus-r101": ["model.backbone=resnet101", *PAPER_MODEL],
}
"""``workbench bench --model``: config overrides naming the network. ``config``: the run config's model as it is;
``quickstart``: the quickstart network (ResNet-18 at width 0.25, output stride 8) with ASPP rates for 8x8 maps;
``deeplabv3plus-r50`` / ``-r101``: the papers' DeepLabV3+ (deep stem, full width, output stride 16, ASPP 6/12/18;
random weights: the step costs the same)."""


def model_overrides(preset: str) -> list[str]:
    """The overrides of a :data:`MODEL_PRESETS` entry; ValueError naming ``model`` for an unknown one."""
    if preset not in MODEL_PRESETS:
        raise ValueError(f"model must be one of {', '.join(MODEL_PRESETS)}, got {preset!r}")
    return list(MODEL_PRESETS[preset])


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (ru_maxrss; bytes on macOS, KiB elsewhere)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 / (1024 if sys.platform == "darwin" else 1)


def random_batch(num_classes: int, batch: int, crop: int, semi: bool, device: torch.device,
                 generator: torch.Generator, channels_last: bool = False) -> SemiBatch:
    """A SemiBatch of random normalised images and labels (with CutMix boxes and some padding) on ``device``;
    images in ``channels_last`` memory format when asked (as the trainer's loader delivers them)."""
    def img() -> torch.Tensor:
        x = torch.randn(batch, 3, crop, crop, generator=generator).to(device)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def lab() -> torch.Tensor:
        return torch.randint(0, num_classes, (batch, crop, crop), generator=generator).to(device)

    kw: dict[str, Any] = {"x_l": img(), "y_l": lab()}
    if semi:
        ign = torch.zeros(batch, crop, crop, dtype=torch.long)
        ign[:, :, -crop // 8:] = 255
        box = torch.zeros(batch, crop, crop, dtype=torch.bool)
        box[:, crop // 4: crop // 2, crop // 4: crop // 2] = True
        kw.update(x_w=img(), x_s1=img(), x_s2=img(), x_w_mix=img(), x_s1_mix=img(), x_s2_mix=img(),
                  ignore=ign.to(device), ignore_mix=ign.to(device), box1=box.to(device), box2=box.to(device))
    return SemiBatch(**kw)


def run_bench(method: str, iters: int = 20, warmup: int = 3, repeats: int = 3, crop: int = 64, batch: int = 8,
              num_classes: int = 6, overrides: list[str] | None = None, out_dir: Path | None = Path("reports/bench"),
              device: str = "auto", data_root: Path | str | None = None, workers: int = 2) -> dict[str, Any]:
    """Benchmark ``method``'s training step (forward, backward, optimiser step, after_step); returns the result.

    ``data_root``: time real batches from the training loader over that dataset (``workers`` loader processes) and
    report the loader stall fraction; otherwise random in-memory batches of ``num_classes`` classes.
    """
    from workbench.engine.distributed import local_device

    total = warmup + iters * repeats
    base: dict[str, Any] = {"method": {"name": method}}
    tmp = None
    if data_root is not None:
        import tempfile

        tmp = tempfile.TemporaryDirectory(prefix="workbench-bench-")
        base.update(out_dir=tmp.name, name="bench",
                    data={"root": str(data_root), "crop_size": crop, "batch_size": batch, "num_workers": workers},
                    train={"iters": total + 1, "progress": False})   # + the untimed host-read count step
    cfg = config_from_dict(apply_overrides(base, list(overrides or [])))
    dev = local_device(device if device != "auto" else cfg.train.device)
    torch.manual_seed(0)
    waits: list[float] = []
    if data_root is None:
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
        m = build_from_config(cfg, num_classes, dev)
        opt = build_sgd(m.param_groups(0.001), 0.9, 1e-4, fused=fused_choice(cfg.optim.fused, dev))
        g = torch.Generator().manual_seed(0)
        batches = [random_batch(num_classes, batch, crop, m.uses_unlabeled, dev, g, cfg.model.channels_last)
                   for _ in range(2)]

        def next_batch(i: int) -> SemiBatch:
            return batches[i % 2]
    else:
        from workbench.engine.trainer import Trainer

        trainer = Trainer(cfg)
        trainer.setup()
        m, opt, dev = trainer.method, trainer.optimizer, trainer.device
        loader = iter(trainer._loader())

        def next_batch(i: int) -> SemiBatch:
            t0 = time.perf_counter()
            raw = next(loader)
            waits.append(time.perf_counter() - t0)
            return SemiBatch.from_loader(raw, dev, cfg.data.mean, cfg.data.std, cfg.model.channels_last)
    m.train()
    amp = amp_dtype(cfg.optim.amp, dev)

    def step(i: int) -> None:
        info = StepInfo(i, 0, total, total, False)
        b = next_batch(i)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            out = m(b, info)
        out.loss.backward()
        opt.step()
        m.after_step(info)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for i in range(warmup):
        step(i)
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss0 = peak_rss_mb()
    waits.clear()
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        for i in range(iters):
            step(warmup + r * iters + i)
        sync()
        times.append((time.perf_counter() - t0) / iters)
    sec = statistics.median(times)
    waited = sum(waits)
    with host_reads() as reads:   # one more step, untimed: the device-to-host reads a step makes
        step(total)
    images = batch * (2 if m.uses_unlabeled else 1)
    res = {"method": method, "device": environment()["device"], "device_type": dev.type, "crop": crop,
           "batch_labeled": batch, "batch_unlabeled": batch if m.uses_unlabeled else 0,
           "model": cfg.model.backbone, "width": cfg.model.width, "output_stride": cfg.model.output_stride,
           "amp": str(amp).replace("torch.", "") if amp else "off", "seconds_per_iter": sec,
           "iters_per_second": 1 / sec, "images_per_second": images / sec, "seconds_per_iter_all": times,
           "torch_threads": torch.get_num_threads(), "overrides": list(overrides or []),
           "host_reads_per_step": sum(reads.values()), "host_read_sites": dict(reads),
           "channels_last": cfg.model.channels_last, "compile": cfg.model.compile,
           "fused_optimizer": bool(opt.defaults.get("fused")),
           "command": "workbench " + " ".join(sys.argv[1:]) if sys.argv and "bench" in sys.argv else None}
    if data_root is not None:
        res.update(data_root=str(data_root), num_workers=cfg.data.num_workers,
                   data_stall_fraction=waited / max(sum(times) * iters, 1e-12))
        tmp.cleanup()
    if dev.type == "cuda":
        res["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        res["peak_rss_mb"] = peak_rss_mb()
        res["rss_growth_mb"] = peak_rss_mb() - rss0
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / f"{method}.json", json.dumps(res, indent=1) + "\n")
        write_table(out_dir)
    return res


def write_result(result: dict[str, Any], out: str | Path | None) -> str:
    """Print a benchmark's ``result`` as JSON and, when ``out`` is a path (not None or ""), write it there
    atomically (parents created). Returns the JSON text."""
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(out), text + "\n")
    return text


def _stall(r: dict[str, Any]) -> str:
    f = r.get("data_stall_fraction")
    return "-" if f is None else f"{100 * f:.1f}% ({r['num_workers']} workers)"


def write_table(out_dir: Path) -> str:
    """Markdown table (``bench.md``) of every ``<method>.json`` in ``out_dir``, relative to unimatch when present."""
    rows = []
    for p in sorted(out_dir.glob("*.json")):
        try:
            r = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        if "seconds_per_iter" in r:
            rows.append(r)
    ref = next((r for r in rows if r["method"] == "unimatch"), None)
    lines = ["| method | device | crop | batch (l+u) | s/iter | images/s | peak memory MB | step time vs unimatch "
             "| loader stall |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mem = r.get("peak_memory_mb", r.get("peak_rss_mb", 0.0))
        rel = f"{r['seconds_per_iter'] / ref['seconds_per_iter']:.2f}x" if ref else "-"
        lines.append(f"| {r['method']} | {r['device_type']} | {r['crop']} | {r['batch_labeled']}+"
                     f"{r['batch_unlabeled']} | {r['seconds_per_iter']:.4f} | {r['images_per_second']:.1f} | "
                     f"{mem:.0f} | {rel} | {_stall(r)} |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(out_dir / "bench.md", text)
    return text
