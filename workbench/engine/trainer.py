"""The training loop: one engine for every method (single process or torchrun/DDP, CPU or CUDA).

``Trainer(cfg).fit()`` builds data, model, method and optimiser from a :class:`~workbench.config.RunConfig` (through
the builders of :mod:`workbench.engine.build`), resumes from ``<run>/checkpoints/latest.pt`` when present, trains with
poly lr decay, evaluates, checkpoints atomically (every epoch, every ``train.checkpoint_every`` steps, at the end, and
the best by validation mIoU), and writes ``metrics.jsonl`` / ``summary.json``. Only rank 0 writes.

The builders (``prepare_dataset``, ``split_names``, ``check_splits``, ``build_from_config``, ``amp_dtype``,
``load_run_config``, ``load_method``, ...) live in :mod:`workbench.engine.build`; they stay importable from here.
"""
from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from workbench.config import ConfigError, RunConfig, config_from_dict, config_to_dict, dump_config
from workbench.data.dataset import DataError, EvalDataset, SegDataset, data_identity, load_manifest, verify_files
from workbench.data.transforms import denormalize
from workbench.engine import distributed as D
from workbench.engine.build import (
    amp_dtype,
    build_from_config,
    build_optimizer,
    check_splits,
    environment,
    eval_settings,
    load_method,
    load_run_config,
    prepare_dataset,
    read_config_file,
    split_names,
    step_dataset,
    step_plan,
    to_channels_last,
    train_loader,
    val_loader,
    warn,
    wrap_distributed,
)
from workbench.engine.checkpoint import (
    CheckpointError,
    latest_exists,
    load_latest,
    load_state_checked,
    nonfinite_tensors,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from workbench.engine.evaluate import evaluate
from workbench.engine.optim import DeferredNonFinite, all_finite, set_poly_lr, zero_momentum_buffers
from workbench.engine.rundir import RunDir, RunLock, atomic_write_text
from workbench.methods import METHODS, SemiBatch, StepInfo


class NonFiniteError(RuntimeError):
    """The loss or the gradients became NaN/inf under the ``stop`` policy (or too many steps in a row under
    ``skip``)."""


# Keys a resumed run may change: they cannot change the trained weights (evaluation, logging, capture, checkpoint
# cadence, loader processes, the bad-data policy, file checks, progress bars). Each change is recorded in
# metrics.jsonl ({"kind": "config_change"}) and config.yaml is rewritten. Any other difference stops the resume.
RESUMABLE_KEYS = ("eval.", "train.progress", "train.log_every", "train.capture_every", "train.tensorboard",
                  "train.eval_every", "train.checkpoint_every", "train.checkpoint_min_seconds", "train.threads",
                  "data.num_workers", "data.pin_memory", "data.bad_data", "data.verify")


def resumable(key: str) -> bool:
    """Whether a resumed run may change config key ``key`` (see ``RESUMABLE_KEYS``)."""
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS)


def artifact_tensor(key: str, t: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Compact CPU copy of a captured tensor: images (keys ``x_*``) -> uint8, labels -> uint8, floats -> fp16."""
    t = t.detach()
    if key.startswith("x_") and t.dim() == 4 and t.shape[1] == 3 and t.is_floating_point():
        return (denormalize(t.float(), mean, std) * 255).round().to(torch.uint8).cpu()
    if t.dtype in (torch.int64, torch.int32) and t.numel() and int(t.min()) >= 0 and int(t.max()) <= 255:
        return t.to(torch.uint8).cpu()
    if t.is_floating_point():
        return t.to(torch.float16).cpu()
    return t.cpu()


class Trainer:
    """Runs one configuration to completion (or to ``stop_at``), resuming when the run directory has a checkpoint."""

    def __init__(self, cfg: RunConfig, trust_pickle: bool = False) -> None:
        self.cfg = cfg
        self.trust_pickle = trust_pickle
        self.bar_loss: float | None = None  # the progress bar's last logged loss
        self.lock: RunLock | None = None
        self._ck: dict[str, Any] | None = None   # the checkpoint to resume from, once read
        self.device = D.local_device(cfg.train.device)
        D.init_from_env(self.device)
        self.rank, self.world = D.rank(), D.world_size()
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
        self.run = RunDir(cfg.run_dir)
        self.method_cls = METHODS[cfg.method.name]
        self.semi = self.method_cls.uses_unlabeled
        self.amp = amp_dtype(cfg.optim.amp, self.device)

    # ------------------------------------------------------------------ setup
    def _load_resume_checkpoint(self) -> dict[str, Any]:
        if self._ck is None:
            self._ck, self._ck_path = load_latest(self.run.latest, self.trust_pickle)
        return self._ck

    def _saved_config(self) -> dict[str, Any]:
        """The run's recorded config: config.yaml, or the checkpoint's copy when the file is missing, empty or
        unreadable (a kill while it was written by an older version); the file is then rewritten at setup."""
        old, why = read_config_file(self.run.config)
        if why is None:
            return old
        ck = self._load_resume_checkpoint()
        if not isinstance(ck.get("config"), dict):
            raise CheckpointError(f"{self.run.config} {why} and checkpoint {self._ck_path} holds no config; restore "
                                  "the file or pick another train name")
        warn(f"{self.run.config} {why}: using the config saved in {self._ck_path}; the file will be rewritten")
        return ck["config"]

    def _check_run_dir(self) -> None:
        """A run directory with a checkpoint must hold the same config, apart from ``RESUMABLE_KEYS`` (recorded)."""
        self.config_changes: dict[str, list[Any]] = {}
        if not latest_exists(self.run.latest):
            return
        old = self._saved_config()
        try:   # through today's schema: keys added since the run was made take their defaults
            old = config_to_dict(config_from_dict(old))
        except ConfigError:
            pass   # an unknown or renamed key: the comparison below names it
        new = config_to_dict(self.cfg)
        o_opt, n_opt = old.get("optim", {}), new.get("optim", {})
        if "amp" in o_opt and "amp" in n_opt and _same_amp(o_opt["amp"], n_opt["amp"], self.device):
            o_opt["amp"] = n_opt["amp"]   # e.g. "auto" and "off" are both fp32 on the CPU
        diff = sorted(_diff_keys(old, new))
        refused = [k for k in diff if not resumable(k)]
        if refused:
            raise ConfigError(f"{self.run.path} holds a run with a different config (keys {refused[:5]}); resume "
                              "with the same config, or pick another train name / delete the directory (keys a "
                              f"resume may change: {', '.join(RESUMABLE_KEYS)})")
        self.config_changes = {k: [_get_dotted(old, k), _get_dotted(new, k)] for k in diff if k != "train.progress"}

    def _verify_data(self) -> None:
        """``data.verify``: check every listed file before any work (see :class:`~workbench.config.DataConfig`)."""
        level = self.cfg.data.verify
        if level == "off":
            return
        bad_val = verify_files(self.val.base, level)
        if bad_val:
            raise DataError(f"{len(bad_val)} file(s) of the validation split {self.cfg.data.val_split!r} cannot be "
                            f"read, first: {bad_val[0][0]} ({bad_val[0][1]}); fix or remove them from the list "
                            "(or data.verify=off to defer the check to the first evaluation)")
        bad: list[tuple[Path, str]] = []
        for ds in (self.labeled, self.unlabeled):
            if ds is not None:
                bad += verify_files(ds, level)
        if not bad:
            return
        if self.cfg.data.bad_data != "skip":
            raise DataError(f"{len(bad)} training file(s) cannot be read, first: {bad[0][0]} ({bad[0][1]}); fix "
                            "them, remove them from the split list, or set data.bad_data=skip")
        for path, why in bad:
            self.skipped_files.setdefault(str(path), why)
        warn(f"data.bad_data=skip: {len(bad)} unreadable training file(s) will be skipped: "
             f"{', '.join(str(p) for p, _ in bad[:10])}{' ...' if len(bad) > 10 else ''}")

    def setup(self) -> None:
        """Build everything; resume from the latest checkpoint when present."""
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)
        self.skipped_files: dict[str, str] = {}
        self.config_changes = {}
        created = not self.run.path.exists()
        if self.rank == 0:   # one writer per run: the lock first, before anything is read or written
            self.lock = RunLock(self.run.lockfile)
            self.lock.acquire()
        try:
            self._setup(created)
        except BaseException:
            self._release(remove_dir=created)
            raise

    def _release(self, remove_dir: bool = False) -> None:
        """Release the run lock; ``remove_dir``: the setup failed in a directory it created (nothing else in it)."""
        if self.lock is None:
            return
        self.lock.release()
        self.lock = None
        if remove_dir and self.run.path.is_dir() and [p.name for p in self.run.path.iterdir()] == [".lock"]:
            shutil.rmtree(self.run.path, ignore_errors=True)

    def _setup(self, created: bool) -> None:
        """Check the run directory, build data, method and optimiser, then resume or start the records."""
        if self.rank == 0:
            for tmp in self.run.clean_temps():
                warn(f"removed {tmp}, a temp file of an interrupted write")
            self._check_run_dir()
        self._build_data()
        self._build_method_and_optimizer()
        self._reset_progress()
        if self.rank == 0:  # everything built: only now does the run directory get its files
            self.run.create()
            atomic_write_text(self.run.config, dump_config(self.cfg))
        if latest_exists(self.run.latest):
            self._resume()
        elif self.rank == 0:   # a restart before the first checkpoint: nothing of the earlier attempt stays
            self._truncate_records(0)

    def _build_data(self) -> None:
        """The labeled, unlabeled and validation sets (checked; files verified on rank 0 per ``data.verify``), the
        dataset record, the step plan, the epoch length and the total of steps."""
        cfg = self.cfg
        root = prepare_dataset(cfg)
        lab_split, unl_split = split_names(cfg, self.semi)
        self.labeled = SegDataset(root, lab_split)
        self.unlabeled = SegDataset(root, unl_split) if unl_split else None
        check_splits(self.labeled, self.unlabeled)
        self.num_classes = self.labeled.num_classes
        self.val = EvalDataset(root, cfg.data.val_split)
        self.data_record = data_identity(self.labeled.manifest, [lab_split, *([unl_split] if unl_split else []),
                                                                 cfg.data.val_split])
        if self.rank == 0:
            self._verify_data()
        self.plan = step_plan(cfg, len(self.labeled), len(self.unlabeled) if self.unlabeled else 0, self.semi,
                              self.world, self.rank)
        self.ipe = self.plan.iters_per_epoch
        self.total = cfg.train.iters or cfg.train.epochs * self.ipe

    def _build_method_and_optimizer(self) -> None:
        """The method (DDP-wrapped in ``self.ddp`` when distributed), the optimiser, the grad scaler, the deferred
        non-finite check and the state a skipped step must leave untouched."""
        cfg = self.cfg
        self.method = build_from_config(cfg, self.num_classes, self.device)
        self.ddp = wrap_distributed(self.method, self.device, self.world)
        self.optimizer, self.lr = build_optimizer(cfg, self.method, self.world, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        # the optimiser skips a step on the device when given ``found_inf`` (fused kernel or SkippableSGD): the
        # non-finite check then needs no host read per step (fp16 leaves the check to the GradScaler)
        self.deferred = self.amp != torch.float16
        if self.deferred:
            zero_momentum_buffers(self.optimizer)
        self.pending = DeferredNonFinite(self.device)
        # state a skipped step must not touch: buffers (BN statistics, thresholds, dictionaries) and parameters the
        # optimiser does not own (EMA teachers); snapshotted before each step under nonfinite=skip
        owned = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        self.guarded = [*self.method.buffers(), *(p for p in self.method.parameters() if id(p) not in owned)]

    def _reset_progress(self) -> None:
        """A fresh run's progress (a resume then loads the checkpoint's): step, best, counters, elapsed time, the
        logging window and the streak of skipped steps."""
        self.streak = 0   # consecutive skipped steps (synchronous check; the deferred one counts on the device)
        self.log_sums: dict[str, Tensor] = {}
        self.log_n: Any = 0
        self.start = 0
        self.best = {"miou": -1.0, "step": -1}
        self.counters = {"skipped_samples": 0, "nonfinite_steps": 0}
        self.elapsed = 0.0

    def _truncate_records(self, step: int) -> None:
        for problem in self.run.truncate_metrics(step):
            warn(problem)
        self.run.truncate_artifacts(step)
        if self.config_changes:
            warn(f"resuming with changed keys {self.config_changes} (recorded in {self.run.metrics})")
            self.run.append_metrics({"kind": "config_change", "step": step, "changes": self.config_changes})

    def _resume(self) -> None:
        ck = self._load_resume_checkpoint()
        path = self._ck_path
        self._ck = None
        load_state_checked(self.method, ck["method"], path)
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scaler.load_state_dict(ck["scaler"])
        self.start = ck["step"]
        self.best = ck["best"]
        self.counters = ck["counters"]
        self.elapsed = ck.get("elapsed", 0.0)
        set_rng_state(ck["rng"][min(self.rank, len(ck["rng"]) - 1)])
        self.log_sums = {k: v.to(self.device) for k, v in ck.get("log_sums", {}).items()}
        self.log_n = ck.get("log_n", 0)
        self.skipped_files.update(ck.get("skipped_files", {}))
        if self.rank == 0:
            self._truncate_records(self.start)

    def _loader(self) -> DataLoader:
        """The training loader from the current step to the end."""
        ds = step_dataset(self.cfg, self.labeled, self.unlabeled, self.plan)
        return train_loader(self.cfg, ds, self.start, self.total, self.device)

    # ------------------------------------------------------------------ steps
    def _checkpoint(self, step: int) -> None:
        self.last_ckpt = time.monotonic()
        states = [rng_state()]
        if self.world > 1:
            gathered: list[Any] = [None] * self.world
            torch.distributed.all_gather_object(gathered, states[0])
            states = gathered
        if self.rank == 0:
            save_checkpoint(self.run.latest, keep_previous=True, method=self.method.state_dict(),
                            optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(), step=step,
                            epoch=step // self.ipe, best=self.best, counters=self.counters, rng=states,
                            elapsed=self.elapsed, config=config_to_dict(self.cfg),
                            log_sums={k: v.detach().float().cpu() for k, v in self.log_sums.items()},
                            log_n=float(self.log_n), skipped_files=dict(self.skipped_files))

    def _val_loader(self) -> DataLoader:
        """The validation loader, built once: its worker processes persist from one evaluation to the next."""
        if getattr(self, "_val", None) is None:
            self._val = val_loader(self.cfg, self.val, self.world, self.rank, self.device)
        return self._val

    def evaluate(self) -> dict[str, Any]:
        """Validation metrics of the method's predictor (all processes take part; the result is all-reduced)."""
        cfg = self.cfg
        settings = eval_settings(cfg)
        predictor = self.method.predictor()
        was_training = self.method.training
        self.method.eval()
        try:
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                res = evaluate(lambda x: predictor(x)["logits"].float(), self._val_loader(), self.num_classes,
                               settings, self.device, progress=cfg.train.progress and self.rank == 0)
        finally:
            self.method.train(was_training)
        return res

    def _log(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            self.run.append_metrics(record)
            if self.tb is not None:
                for k, v in record.items():
                    if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                        self.tb.add_scalar(f"{record['kind']}/{k}", v, record["step"])

    def fit(self, stop_at: int | None = None) -> dict[str, Any]:
        """Train from the current step to the end (or until ``stop_at`` steps are done); returns the summary.

        The run's lock is held from setup to the end (released on any exit; the OS releases it on a crash)."""
        self.setup()
        try:
            return self._fit(stop_at)
        finally:
            self._release()

    def _fit(self, stop_at: int | None) -> dict[str, Any]:
        """The loop's outline: one optimiser step, then, at their cadences, the deferred non-finite verdict, the
        logged means, the evaluation (and best checkpoint), and the checkpoint."""
        cfg = self.cfg
        self._open_tensorboard()
        end = self.total if stop_at is None else min(stop_at, self.total)
        self.last_eval: dict[str, Any] | None = None
        self.data_time = 0.0   # seconds spent waiting for the loader this session
        self.method.train()
        step = self.start
        self.pbar = self._progress_bar()
        t_start = time.perf_counter()
        self.last_ckpt = time.monotonic()
        it = iter(self._loader()) if self.start < end else iter(())
        while step < end:
            self._optimizer_step(it, step)
            step += 1
            if self.pbar:
                self.pbar.update(1)
            epoch_end = step % self.ipe == 0
            if step % cfg.train.log_every == 0 or step == end or epoch_end:
                self._read_nonfinite()   # the deferred verdict, before anything is logged, evaluated or saved
            if step % cfg.train.log_every == 0 or step == end:
                self._log_window(step)
            if self._eval_due(step, epoch_end):
                self._evaluate_and_keep_best(step)
            self.elapsed += time.perf_counter() - t_start
            t_start = time.perf_counter()
            if self._checkpoint_due(step, epoch_end):
                self._checkpoint(step)
        if self.pbar:
            self.pbar.close()
        self.elapsed += time.perf_counter() - t_start
        summary = self._summary(step, self.last_eval, self.data_time)
        if self.tb is not None:
            self.tb.close()
        return summary

    def _open_tensorboard(self) -> None:
        """``train.tensorboard``: the SummaryWriter of rank 0 in ``<run>/tensorboard`` (else ``self.tb`` = None)."""
        self.tb = None
        if self.cfg.train.tensorboard and self.rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("train.tensorboard=true needs the tensorboard package: "
                                  "pip install 'workbench[tensorboard]'") from None
            self.tb = SummaryWriter(str(self.run.path / "tensorboard"))

    def _progress_bar(self) -> Any:
        """``train.progress``: rank 0's progress bar over all steps, starting at the current one (else None)."""
        if not (self.cfg.train.progress and self.rank == 0):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.total, initial=self.start, desc=f"{self.cfg.method.name}", dynamic_ncols=True)

    def _optimizer_step(self, it: Iterator[dict[str, Any]], step: int) -> None:
        """Optimiser step ``step``: poly lr, the micro-batches' forward/backward, the non-finite policy and the
        update, the guarded state put back when the step is skipped, and the captured tensors saved."""
        cfg = self.cfg
        capture = cfg.train.capture_every > 0 and (step + 1) % cfg.train.capture_every == 0
        info = StepInfo(step, step // self.ipe, self.total, self.ipe, capture)
        set_poly_lr(self.optimizer, step, self.total, cfg.optim.poly_power)
        self.optimizer.zero_grad(set_to_none=True)
        guard = cfg.optim.nonfinite == "skip" and bool(self.guarded)
        snap = [t.detach().clone() for t in self.guarded] if guard else None
        out, logs_step, ids = self._micro_batches(it, step, info)
        good, applied = self._apply_update(out, logs_step, step, ids, info)
        if snap is not None:
            self._restore_if_skipped(snap, good, applied)
        if applied and capture and self.rank == 0 and out.artifacts:
            self.run.save_artifacts(step + 1, info.epoch, {k: artifact_tensor(k, v, cfg.data.mean, cfg.data.std)
                                                           for k, v in out.artifacts.items()})

    def _micro_batches(self, it: Iterator[dict[str, Any]], step: int,
                       info: StepInfo) -> tuple[Any, dict[str, Tensor], list[str]]:
        """Forward and backward of the step's ``optim.grad_accum`` micro-batches (DDP all-reduces on the last one
        only) -> (the last micro-batch's output, the loss terms averaged over the micro-batches, the sample ids)."""
        cfg = self.cfg
        micro = cfg.optim.grad_accum
        ids: list[str] = []
        logs_step: dict[str, Tensor] = {}
        for a in range(micro):
            t0 = time.perf_counter()
            raw = next(it)
            self.data_time += time.perf_counter() - t0
            self.counters["skipped_samples"] += int(raw.get("skipped", 0))
            self._note_skipped(raw.get("skipped_files", {}), step)
            batch = SemiBatch.from_loader(raw, self.device, cfg.data.mean, cfg.data.std, cfg.model.channels_last)
            ids += batch.ids_l + batch.ids_u
            sync = contextlib.nullcontext() if (a == micro - 1 or self.world == 1) else self.ddp.no_sync()
            with sync:
                with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                    out = self.ddp(batch, info)
                self.scaler.scale(out.loss / micro).backward()
            for k, v in {"loss": out.loss, **out.logs}.items():
                v = v.detach().float() if isinstance(v, Tensor) else torch.tensor(float(v))
                logs_step[k] = logs_step.get(k, 0) + v / micro
        return out, logs_step, ids

    def _apply_update(self, out: Any, logs_step: dict[str, Tensor], step: int, ids: list[str],
                      info: StepInfo) -> tuple[Tensor | None, bool]:
        """The non-finite policy and the optimiser update; the step's terms join the logging window.

        Returns ``(good, applied)``: deferred check = (a device bool, True: the optimiser skips a bad step on the
        device itself); synchronous check = (None, whether the host let the step through)."""
        good = None   # deferred: a device bool; the synchronous check decides on the host
        if self.deferred:
            good = self.pending.flag(self.optimizer, out.loss, self.method.parameters(), step, logs_step, ids)
            applied = True   # handed to the optimiser, which skips a bad step on the device itself
        else:
            applied = self._finite_step(out, logs_step, step, ids)
        if applied:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.method.after_step(info)
            for k, v in logs_step.items():   # a step skipped on the device adds nothing to the logged means
                self.log_sums[k] = self.log_sums.get(k, 0) + (v if good is None else torch.where(good, v, 0.0))
            self.log_n = self.log_n + (1 if good is None else good.float())
        return good, applied

    def _log_window(self, step: int) -> None:
        """Log the window's mean loss terms (``{"kind": "train"}``) and start a new window. The window's sums are
        checkpointed: a resumed run logs the same means as an uninterrupted one."""
        rec = {"kind": "train", "step": step, "epoch": (step - 1) // self.ipe,
               "lr": self.optimizer.param_groups[0]["lr"]}
        n_read = float(self.log_n)
        rec.update({k: float(v / n_read) if n_read else None for k, v in self.log_sums.items()})
        self._log(rec)
        if self.pbar:
            self.pbar.set_postfix(self._bar_fields(rec, self.last_eval))
        self.log_sums, self.log_n = {}, 0

    def _eval_due(self, step: int, epoch_end: bool) -> bool:
        """Evaluate after the last step, and every ``train.eval_every`` steps (0 = at each epoch's end)."""
        every = self.cfg.train.eval_every
        return step == self.total or bool(every and step % every == 0) or (not every and epoch_end)

    def _evaluate_and_keep_best(self, step: int) -> None:
        """Evaluate and log (``{"kind": "eval"}``); a better validation mIoU becomes ``best`` (checkpoint best.pt)."""
        res = self.evaluate()
        self.last_eval = {"kind": "eval", "step": step, "epoch": (step - 1) // self.ipe, **res}
        self._log(self.last_eval)
        miou = res["miou"] if res["miou"] is not None else 0.0
        if self.pbar:
            self.pbar.set_postfix(self._bar_fields(None, self.last_eval))
        if miou > self.best["miou"]:
            self.best = {"miou": miou, "step": step}
            if self.rank == 0:
                save_checkpoint(self.run.best, method=self.method.state_dict(), step=step, miou=miou,
                                config=config_to_dict(self.cfg))

    def _checkpoint_due(self, step: int, epoch_end: bool) -> bool:
        """Checkpoint after the last step and every ``train.checkpoint_every`` steps (reading the deferred verdict
        first), and at an epoch's end when ``train.checkpoint_min_seconds`` have passed since the last one (rank 0
        decides under DDP: the checkpoint is a collective)."""
        cfg = self.cfg
        due = step == self.total or bool(cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0)
        if due:
            self._read_nonfinite()
        if not due and epoch_end:
            due = time.monotonic() - self.last_ckpt >= cfg.train.checkpoint_min_seconds
            if self.world > 1:
                due = D.broadcast_object(due)  # rank 0 decides: the checkpoint is a collective
        return due

    @torch.no_grad()
    def _restore_if_skipped(self, snap: list[Tensor], good: Tensor | None, applied: bool) -> None:
        """Put the guarded state (buffers, EMA teachers) back to its value before a skipped step: on the device
        with ``torch.where`` under the deferred verdict (no host read), by a copy when the host decided."""
        if good is not None:
            for t, old in zip(self.guarded, snap):
                t.copy_(torch.where(good, t, old))
        elif not applied:
            for t, old in zip(self.guarded, snap):
                t.copy_(old)

    def _note_skipped(self, files: dict[str, str], step: int) -> None:
        """Name every newly skipped file (bad_data=skip) on stderr and in metrics.jsonl; summary.json lists all."""
        new = {f: why for f, why in files.items() if f not in self.skipped_files}
        if not new:
            return
        self.skipped_files.update(new)
        for f, why in new.items():
            warn(f"data.bad_data=skip: skipped {f} ({why})")
        if self.rank == 0:
            self.run.append_metrics({"kind": "skipped", "step": step + 1, "files": new})

    def _too_many_skipped(self, streak: int, last: int) -> None:
        limit = self.cfg.optim.skip_limit
        if limit and streak >= limit:
            raise NonFiniteError(f"{streak} consecutive steps up to step {last} had non-finite loss/gradients and "
                                 f"were skipped (optim.skip_limit={limit}): the run diverged; the last checkpoint "
                                 f"{self.run.latest} holds the weights before it. Lower optim.lr, or raise "
                                 "optim.skip_limit")

    def _read_nonfinite(self) -> None:
        """Read the deferred non-finite verdict (one host read): count skipped steps, or raise under ``stop``."""
        if not self.deferred:
            return
        bad = self.pending.read()
        if bad is None:
            return
        first, count, terms, ids = bad
        if self.cfg.optim.nonfinite == "skip":
            self.counters["nonfinite_steps"] += count
            self._too_many_skipped(self.pending.max_streak_read, self.pending.last_step_read)
            return
        raise NonFiniteError(f"non-finite loss/gradients at step {first} ({count} step(s) since the last check, none "
                             f"applied to the weights): loss terms {terms}; batch ids {ids}. Set optim.nonfinite=skip "
                             "to skip such steps, or lower optim.lr.")

    def _finite_step(self, out, logs: dict[str, Tensor], step: int, ids: list[str]) -> bool:
        """Check loss (and, for fp16, the scaler handles grads); apply the non-finite policy."""
        if self.amp == torch.float16:
            return True  # GradScaler skips steps with inf/NaN gradients itself
        # one host synchronisation for the loss and all gradients (not one per parameter)
        ok = bool(all_finite(out.loss, self.method.parameters()))
        if ok:
            self.streak = 0
            return True
        if self.cfg.optim.nonfinite == "skip":
            self.counters["nonfinite_steps"] += 1
            self.streak += 1
            self.optimizer.zero_grad(set_to_none=True)
            self._too_many_skipped(self.streak, step + 1)
            return False
        terms = {k: float(v) for k, v in logs.items()}
        raise NonFiniteError(f"non-finite loss/gradients at step {step}: loss terms {terms}; batch ids {ids}. "
                             "Set optim.nonfinite=skip to skip such steps, or lower optim.lr.")

    def _bar_fields(self, rec: dict[str, Any] | None, last_eval: dict[str, Any] | None) -> dict[str, str]:
        """The progress bar's postfix: the logged loss and the latest validation mIoU with its step."""
        if rec is not None:
            self.bar_loss = rec.get("loss")
        fields = {"loss": "-" if self.bar_loss is None else f"{self.bar_loss:.3f}"}
        if last_eval is not None and last_eval.get("miou") is not None:
            fields["val_mIoU"] = f"{last_eval['miou']:.3f}@{last_eval['step']}"
        return fields

    def _summary(self, step: int, last_eval: dict[str, Any] | None, data_time: float) -> dict[str, Any]:
        if last_eval is None:
            evals = self.run.read_metrics("eval") if self.rank == 0 else []
            last_eval = evals[-1] if evals else None
        done = step - self.start
        summary = {
            "name": self.cfg.name, "method": self.cfg.method.name, "steps": step, "total_steps": self.total,
            "finished": step >= self.total, "iters_per_epoch": self.ipe, "world_size": self.world,
            "seed": self.cfg.train.seed, "lr": self.lr,
            "final": {k: v for k, v in (last_eval or {}).items() if k not in ("kind", "confusion")},
            "best": self.best, "counters": self.counters, "skipped_files": self.skipped_files,
            "nonfinite_tensors": nonfinite_tensors(self.method.state_dict()),
            "timing": {"seconds_total": self.elapsed, "steps_this_session": done,
                       "data_wait_seconds_this_session": data_time},
            "dataset": self.data_record, "environment": environment(),
        }
        if summary["nonfinite_tensors"]:
            warn(f"the trained state holds non-finite values in {len(summary['nonfinite_tensors'])} tensor(s), e.g. "
                 f"{summary['nonfinite_tensors'][:3]}; its predictions are unreliable")
        if self.rank == 0:
            self.run.write_summary(summary)
        return summary


def _same_amp(a: str, b: str, device: torch.device) -> bool:
    """Whether two ``optim.amp`` values give the same autocast dtype on ``device``."""
    try:
        return amp_dtype(a, device) == amp_dtype(b, device)
    except ConfigError:
        return False


def _get_dotted(d: Any, key: str) -> Any:
    for part in key.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _diff_keys(a: Any, b: Any, prefix: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: set[str] = set()
        for k in set(a) | set(b):
            out |= _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return set() if a == b else {prefix.rstrip(".")}


def train(cfg: RunConfig, stop_at: int | None = None, trust_pickle: bool = False) -> dict[str, Any]:
    """Train ``cfg`` (resuming if its run directory has a checkpoint); returns the summary dict.

    ``trust_pickle``: resume from a checkpoint that needs full unpickling (an older file the user vouches for)."""
    return Trainer(cfg, trust_pickle=trust_pickle).fit(stop_at)


def evaluate_run(run_dir: str | Path, checkpoint: str = "best", overrides: dict[str, Any] | None = None,
                 trust_pickle: bool = False) -> dict[str, Any]:
    """Evaluate a run's ``best`` (or ``latest``) checkpoint with its config's eval settings (optionally overridden);
    the result also lists the checkpoint's non-finite tensors (``nonfinite_tensors``, [] when none)."""
    from workbench.config import apply_overrides

    cfg = load_run_config(run_dir, trust_pickle)
    if overrides:
        cfg = config_from_dict(apply_overrides(config_to_dict(cfg), overrides))
    t = Trainer(cfg)
    t.method, _, meta = load_method(run_dir, checkpoint, t.device, trust_pickle)
    root = prepare_dataset(cfg)
    t.num_classes = load_manifest(root).num_classes
    t.val = EvalDataset(root, cfg.data.val_split)
    res = t.evaluate()
    res["checkpoint"] = meta["path"]
    res["checkpoint_step"] = meta["step"]
    res["nonfinite_tensors"] = meta["nonfinite_tensors"]
    return res


__all__ = ["Trainer", "train", "evaluate_run", "load_method", "load_run_config", "NonFiniteError",
           # builders whose home is workbench.engine.build, kept importable from here
           "prepare_dataset", "split_names", "check_splits", "build_from_config", "to_channels_last", "amp_dtype",
           "read_config_file", "warn", "environment"]
