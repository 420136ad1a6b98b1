"""Builders: everything a run is made of, built from a :class:`~workbench.config.RunConfig`, apart from the loop.

The training loop (:mod:`workbench.engine.trainer`) and the tools that only look at a method — the step-through, the
feature embeddings, the benchmarks, the fidelity experiments — build through these functions, so they see the data,
the model and the method exactly as training does without importing the loop:

- data: :func:`prepare_dataset` (the root, generating the embedded synthetic dataset when needed),
  :func:`split_names` (which manifest splits ``data.split`` means), :func:`check_splits` (a labeled/unlabeled pair
  that can be a semi-supervised protocol), :func:`step_plan` / :func:`step_dataset` (optimiser step -> samples),
  :func:`train_loader`, :func:`val_loader`, :func:`eval_settings`;
- model and method: :func:`build_from_config`, :func:`to_channels_last`, :func:`amp_dtype`,
  :func:`wrap_distributed`;
- optimiser: :func:`build_optimizer` (the scaled learning rate and SGD);
- finished runs: :func:`read_config_file`, :func:`load_run_config`, :func:`load_method`;
- the record of where a run or benchmark ran: :func:`environment`.
"""
from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from workbench.config import ConfigError, RunConfig, config_from_dict, whole_image_mode
from workbench.data.dataset import DataError, EvalDataset, SegDataset, StepDataset, StepPlan, load_manifest, read_split
from workbench.data.transforms import normalize
from workbench.engine import distributed as D
from workbench.engine.checkpoint import (
    CheckpointError,
    latest_exists,
    load_checkpoint,
    load_latest,
    load_state_checked,
    nonfinite_tensors,
)
from workbench.engine.evaluate import EvalSettings
from workbench.engine.optim import build_sgd, fused_choice, scaled_lr
from workbench.engine.rundir import RunDir
from workbench.methods import Method, build_method
from workbench.models import build_model


def warn(msg: str) -> None:
    """One warning line on stderr."""
    print(f"workbench: warning: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------------ data
def prepare_dataset(cfg: RunConfig) -> Path:
    """Make sure the dataset root exists (generating the synthetic one when needed, on rank 0 only)."""
    root = Path(cfg.data.root)
    if cfg.data.dataset == "synthetic":
        if D.is_main():
            from workbench.data.synthetic import SyntheticSpec, ensure_synthetic

            try:
                spec = SyntheticSpec.from_dict(cfg.data.synthetic)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"data.synthetic: {e}") from None
            try:
                ensure_synthetic(root, spec, progress=cfg.train.progress)
            except ValueError as e:
                raise DataError(f"data.root: {e}") from None
        if D.world_size() > 1:
            torch.distributed.barrier()
    load_manifest(root)  # clear error when missing
    return root


def split_names(cfg: RunConfig, semi: bool) -> tuple[str, str | None]:
    """(labeled split, unlabeled split or None) of the manifest for ``data.split``."""
    if cfg.data.split == "all":
        if semi:
            raise ConfigError("data.split: 'all' leaves no unlabeled images for a semi-supervised method; "
                              "choose a label fraction such as 1-16, or method.name=supervised")
        return "train", None
    return f"labeled_{cfg.data.split}", (f"unlabeled_{cfg.data.split}" if semi else None)


def check_splits(labeled: SegDataset, unlabeled: SegDataset | None) -> None:
    """Reject split lists that cannot be a semi-supervised protocol: labeled images outside the dataset's ``train``
    list (when the manifest has one), or images that are both labeled and unlabeled."""
    m = labeled.manifest
    lab = {img for img, _ in labeled.items}
    if "train" in m.splits and labeled.split != "train":
        train_imgs = {img for img, _ in read_split(m, "train", check_files=False)}
        outside = sorted(lab - train_imgs)
        if outside:
            raise ConfigError(f"data.split: {len(outside)} image(s) of split {labeled.split!r} are not in the "
                              f"dataset's train list ({m.split_path('train')}), e.g. {outside[0]}; regenerate the "
                              "split lists (workbench data prepare / synth) or fix the list")
    if unlabeled is not None:
        both = sorted(lab & {img for img, _ in unlabeled.items})
        if both:
            raise ConfigError(f"data.split: {len(both)} image(s) are in both {labeled.split!r} and "
                              f"{unlabeled.split!r}, e.g. {both[0]}; a labeled image must not also be unlabeled")


def step_plan(cfg: RunConfig, n_labeled: int, n_unlabeled: int, semi: bool, world: int = 1,
              rank: int = 0) -> StepPlan:
    """How optimiser steps map to samples for process ``rank`` of ``world``: ``data.batch_size`` labeled and
    ``data.unlabeled_batch_size`` (0 = the labeled size) unlabeled images per process and micro-batch,
    ``optim.grad_accum`` micro-batches per step, the order seeded by ``train.seed``."""
    bl = cfg.data.batch_size
    bu = cfg.data.unlabeled_batch_size or bl
    return StepPlan(n_labeled, n_unlabeled, bl, bu, world, rank, cfg.train.seed, semi, cfg.optim.grad_accum)


def step_dataset(cfg: RunConfig, labeled: SegDataset, unlabeled: SegDataset | None, plan: StepPlan) -> StepDataset:
    """The training samples of ``plan`` (item = one micro-batch) with the config's crop, scale range, flip, bad-data
    policy and mix source."""
    d = cfg.data
    return StepDataset(labeled, unlabeled, plan, d.crop_size, d.scale_range, d.flip, d.bad_data, d.mix_source)


def train_loader(cfg: RunConfig, dataset: StepDataset, start: int, total: int, device: torch.device) -> DataLoader:
    """The loader of optimiser steps ``start`` .. ``total - 1`` (``optim.grad_accum`` items each) of ``dataset``,
    with ``data.num_workers`` processes; sets ``dataset.total_steps``."""
    micro = cfg.optim.grad_accum
    dataset.total_steps = total * micro
    nw = cfg.data.num_workers
    # the loader gets its own generator: creating its iterator must not draw from the global RNG (a resumed
    # run creates it after restoring the RNG state, an uninterrupted one before the first step)
    return DataLoader(dataset, batch_size=None, sampler=range(start * micro, total * micro),
                      num_workers=nw, pin_memory=cfg.data.pin_memory and device.type == "cuda",
                      prefetch_factor=4 if nw else None, persistent_workers=False,
                      generator=torch.Generator().manual_seed(cfg.train.seed))


def val_loader(cfg: RunConfig, val: EvalDataset, world: int, rank: int, device: torch.device) -> DataLoader:
    """The validation loader of process ``rank`` of ``world`` (every ``world``-th image): normalised image batches
    of ``eval.batch_size`` (1 when whole images of different sizes are evaluated) with their masks."""
    ds = val if world == 1 else Subset(val, range(rank, len(val), world))
    mean, std = cfg.data.mean, cfg.data.std

    def collate(items):
        imgs = torch.stack([i for i, _ in items])
        return normalize(imgs, mean, std), torch.stack([m for _, m in items])

    whole = whole_image_mode(cfg.eval.mode)   # whole images: one batch needs equal sizes
    bs = cfg.eval.batch_size if not whole or _same_size(val) else 1
    nw = min(2, cfg.data.num_workers)
    return DataLoader(ds, batch_size=bs, num_workers=nw, collate_fn=collate, persistent_workers=nw > 0,
                      pin_memory=cfg.data.pin_memory and device.type == "cuda")


def eval_settings(cfg: RunConfig) -> EvalSettings:
    """The evaluation settings of ``cfg.eval``."""
    e = cfg.eval
    return EvalSettings(mode=e.mode, crop_size=e.crop_size, window=e.window, stride=e.stride, scales=tuple(e.scales),
                        flip=e.flip, boundary_tolerance=e.boundary_tolerance, sliding_tiles=e.sliding_tiles)


def _same_size(ds: EvalDataset) -> bool:
    return ds.base.manifest.raw.get("image_size") is not None


# ---------------------------------------------------------------------------------------------- model and method
def build_from_config(cfg: RunConfig, num_classes: int, device: torch.device) -> Method:
    """The method (with its freshly built model) on ``device``."""
    m = cfg.model
    model = build_model(num_classes, backbone=m.backbone, stem=m.stem, output_stride=m.output_stride,
                        width=m.width, head_width=m.head_width, aspp_rates=m.aspp_rates, pretrained=m.pretrained,
                        fp_dropout=m.fp_dropout)
    method = build_method(cfg.method.name, model, cfg.method, num_classes).to(device)
    if m.channels_last:
        to_channels_last(method)
    if m.compile != "off":
        inductor = m.compile_backend == "inductor"
        model.compile(backend=m.compile_backend, mode=m.compile if inductor else None)
    return method


@torch.no_grad()
def to_channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """Every 4-d parameter and buffer of ``module`` in ``channels_last`` memory format, in place; other ranks are
    left alone (``Module.to(memory_format=...)`` refuses a module holding a 5-d tensor, such as S4MIM's per-class
    heads). Returns ``module``."""
    for t in [*module.parameters(), *module.buffers()]:
        if t.dim() == 4:
            t.data = t.data.contiguous(memory_format=torch.channels_last)
    return module


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for optim.amp on ``device`` (None = fp32): ``auto`` = bf16 on CUDA only; ``bf16`` anywhere
    (CPU autocast is slow without bf16 hardware, but it lets the numerics be checked off-GPU); fp16 on CUDA only."""
    if mode == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if mode == "off":
        return None
    if mode == "bf16":
        return torch.bfloat16
    if device.type != "cuda":
        raise ConfigError(f"optim.amp={mode!r} needs CUDA (device is {device}); use bf16, auto or off")
    return torch.float16


def wrap_distributed(method: Method, device: torch.device, world: int) -> torch.nn.Module:
    """What the loop calls for a step: ``method`` itself in a single process; under DDP (``world`` > 1) its batch
    norms made synchronised (in place) and the method wrapped in ``DistributedDataParallel``."""
    if world <= 1:
        return method
    D.convert_sync_batchnorm(method, device)
    return torch.nn.parallel.DistributedDataParallel(
        method, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=False)


# ------------------------------------------------------------------------------------------------------- optimiser
def build_optimizer(cfg: RunConfig, method: Method, world: int,
                    device: torch.device) -> tuple[torch.optim.Optimizer, float]:
    """(SGD over the method's parameter groups, its base learning rate): ``optim.lr`` scaled by ``optim.lr_scaling``
    from ``optim.reference_batch`` to the global batch (``data.batch_size`` x ``world`` x ``optim.grad_accum``);
    the head's groups at ``optim.head_lr_mult`` times it; the fused kernel per ``optim.fused``."""
    o = cfg.optim
    lr = scaled_lr(o.lr, cfg.data.batch_size * world * o.grad_accum, o.reference_batch, o.lr_scaling)
    fused = fused_choice(o.fused, device)
    return build_sgd(method.param_groups(lr, o.head_lr_mult), o.momentum, o.weight_decay, fused=fused), lr


# ------------------------------------------------------------------------------------------------- finished runs
def read_config_file(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """A run's config.yaml as a dict, or ``(None, why)`` when it is missing, empty, not a mapping or unreadable
    (``why`` completes "<path> ...", e.g. "is empty")."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        return None, "is missing"
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        return None, f"is unreadable ({str(e).splitlines()[0]})"
    if not isinstance(data, dict) or not data:
        return None, "is empty" if not data else "is not a mapping"
    return data, None


def load_run_config(run_dir: str | Path, trust_pickle: bool = False) -> RunConfig:
    """The resolved config of an existing run directory: config.yaml, or, when that file is missing, empty or not
    valid YAML, the config saved in the run's checkpoint (with a warning). CheckpointError when neither exists."""
    rd = RunDir(run_dir)
    data, why = read_config_file(rd.config)
    if why is None:
        return config_from_dict(data)
    for path in (rd.latest, rd.best):
        if latest_exists(path):
            ck, used = load_latest(path, trust_pickle) if path == rd.latest else (load_checkpoint(path, trust_pickle),
                                                                                   path)
            if isinstance(ck.get("config"), dict):
                warn(f"{rd.config} {why}: using the config saved in {used}")
                return config_from_dict(ck["config"])
    raise CheckpointError(f"{rd.config} {why} and {run_dir} has no checkpoint holding a config: "
                          + ("it is not a run directory" if why == "is missing" else "restore the file"))


def load_method(run_dir: str | Path, checkpoint: str = "best", device: str | torch.device = "cpu",
                trust_pickle: bool = False) -> tuple[Method, RunConfig, dict[str, Any]]:
    """A run's method with the weights of its ``best`` (falls back to ``latest`` when the run has none) or
    ``latest`` (falls back to the previous one when damaged) checkpoint, in eval mode, plus its config and the
    checkpoint's metadata ({"path", "step", "nonfinite_tensors"}); a warning names any non-finite tensor."""
    cfg = load_run_config(run_dir, trust_pickle)
    rd = RunDir(run_dir)
    if checkpoint == "best" and rd.best.is_file():
        path = rd.best
        ck = load_checkpoint(path, trust_pickle)
    else:
        ck, path = load_latest(rd.latest, trust_pickle)
    num_classes = load_manifest(cfg.data.root).num_classes
    method = build_from_config(cfg, num_classes, torch.device(device))
    load_state_checked(method, ck["method"], path)
    method.eval()
    bad = nonfinite_tensors(ck["method"])
    if bad:
        warn(f"checkpoint {path} holds non-finite values in {len(bad)} tensor(s), e.g. {bad[:3]}; its predictions "
             "are unreliable")
    return method, cfg, {"path": str(path), "step": ck.get("step"), "nonfinite_tensors": bad}


# ----------------------------------------------------------------------------------------------------- environment
def environment() -> dict[str, Any]:
    """Versions, device and git commit, recorded in a run's summary.json and in benchmark results."""
    import torchvision

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parents[2]).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "device": dev, "cuda": torch.version.cuda, "threads": torch.get_num_threads(), "git_commit": commit,
            "platform": platform.platform()}


__all__ = ["prepare_dataset", "split_names", "check_splits", "step_plan", "step_dataset", "train_loader",
           "val_loader", "eval_settings", "build_from_config", "to_channels_last", "amp_dtype", "wrap_distributed",
           "build_optimizer", "read_config_file", "load_run_config", "load_method", "environment", "warn"]
