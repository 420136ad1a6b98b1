"""Step-through sessions and the plumbing every trace shares.

:func:`open_session` loads a method (a run directory's checkpoint, or a freshly initialised model) with the training
data exactly as the trainer reads it; a :class:`StepSession` replays one training step of it
(:meth:`StepSession.replay`) with its config knobs changed for the block (:meth:`StepSession.configured`). Every
method's trace (:mod:`workbench.viz.stepthrough.maskmatch`, ...) is a :class:`Trace`: the step, its knobs and views,
and its loss terms (:class:`LossTerm`, :func:`stage_terms`, shown by :func:`losses_table`); the helpers below build
those common fields (:func:`traced_step`, :func:`trace_fields`, :func:`to_cpu`, :func:`batch_u8`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from workbench.viz.figures import IGNORE

__all__ = [
    "STEP_METHODS", "BUILT_AT_INIT", "CACHED_TRACES", "COMPONENT_TERMS", "StepSession", "open_session",
    "session_table", "LossTerm", "Trace", "stage_terms", "losses_table", "check_session", "traced_step",
    "trace_fields", "to_cpu", "batch_u8", "display_u8", "rng_devices",
]

STEP_METHODS = ("maskmatch", "corrmatch", "rankmatch", "s4mim", "scalematch")  # one module each in this package
# config fields a method reads only when it is built: changing them on a built method would silently do nothing
BUILT_AT_INIT = {"corrmatch": ("threshold", "thresh_init", "thresh_momentum", "pixel_propagation", "feature",
                               "proj_channels"),
                 "scalematch": ("structure", "cif", "fusion", "cif_dim", "cif_depth", "cif_chunk",
                                "cif_se_reduction")}
CACHED_TRACES = 8  # traces a session keeps for redrawing widgets


# --------------------------------------------------------------------------------------------------- session


@dataclass
class StepSession:
    """A method ready to be stepped through, with the training data as the trainer reads it.

    Attributes:
        method: the :class:`~workbench.methods.Method` (weights of a run's checkpoint or freshly initialised).
        cfg: the resolved run config (the run's, with the notebook's data overrides; or the defaults).
        dataset: the :class:`~workbench.data.dataset.StepDataset` of the training split (item = micro-step).
        class_names, palette: from the dataset manifest.
        device: where the method runs.
        source: where the weights come from (shown in :func:`session_table`).
    """

    method: Any
    cfg: Any
    dataset: Any
    class_names: list[str]
    palette: list[list[int]]
    device: torch.device
    source: str
    checkpoint_step: int | None = None
    _initial: dict[str, Tensor] = field(default_factory=dict, repr=False)
    _batches: dict[int, Any] = field(default_factory=dict, repr=False)
    _traces: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        """The method's registered name."""
        return self.method.name

    @property
    def num_classes(self) -> int:
        """Classes of the dataset."""
        return len(self.class_names)

    def raw_batch(self, step: int = 0) -> dict[str, Any]:
        """The trainer's loader item for optimiser step ``step`` (its first micro-batch): uint8 tensors and ids."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        accum = self.cfg.optim.grad_accum
        self.dataset.total_steps = max(self.dataset.total_steps or 0, (step + 1) * accum)
        return self.dataset[step * accum]

    def batch(self, step: int = 0) -> Any:
        """The :class:`~workbench.methods.SemiBatch` of optimiser step ``step`` on the device (cached)."""
        from workbench.methods import SemiBatch

        if step not in self._batches:
            d = self.cfg.data
            self._batches[step] = SemiBatch.from_loader(self.raw_batch(step), self.device, d.mean, d.std,
                                                        self.cfg.model.channels_last)
        return self._batches[step]

    def step_info(self, step: int) -> Any:
        """The :class:`~workbench.methods.StepInfo` of step ``step`` with ``capture`` on."""
        from workbench.methods import StepInfo

        ipe = self.dataset.plan.iters_per_epoch
        total = self.cfg.train.iters or self.cfg.train.epochs * ipe
        return StepInfo(step, step // ipe, total, ipe, capture=True)

    def reset(self) -> None:
        """Restore the weights and buffers the session started with."""
        self.method.load_state_dict(self._initial)

    @contextmanager
    def configured(self, **changes: Any) -> Iterator[Any]:
        """Run a block with ``method.cfg`` fields changed (None values are ignored); the config is restored after.

        ValueError naming the key for a field the method does not have or reads only when built (e.g. CorrMatch's
        ``threshold``); the config's own checks (ConfigError naming ``method.<key>``) for bad values.
        """
        changes = {k: v for k, v in changes.items() if v is not None}
        old = self.method.cfg
        names = {f.name for f in dataclasses.fields(old)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"method.{unknown[0]}: {self.name} has no such config key; its keys are {sorted(names)}")
        fixed = sorted(set(changes) & set(BUILT_AT_INIT.get(self.name, ())))
        if fixed:
            raise ValueError(f"method.{fixed[0]}: {self.name} reads it only when built; set it with overrides "
                             "(fresh model) or train a run with it")
        if "scales" in changes:
            changes["scales"] = tuple(changes["scales"])
        self.method.cfg = dataclasses.replace(old, **changes)
        try:
            yield self.method.cfg
        finally:
            self.method.cfg = old

    @contextmanager
    def replay(self, seed: int) -> Iterator[None]:
        """Run a block as one training step: initial weights, train mode, global RNG seeded with ``seed``, no
        gradients; afterwards the weights, eval mode and the caller's RNG state are restored."""
        with torch.random.fork_rng(devices=rng_devices(self)):
            self.reset()
            self.method.train()
            torch.manual_seed(seed)
            try:
                with torch.no_grad():
                    yield
            finally:
                self.reset()
                self.method.eval()

    def cached(self, fn: Callable[..., Trace], **kwargs: Any) -> Trace:
        """``fn(self, **kwargs)``, remembered per (fn, kwargs) so widgets can redraw without recomputing (the
        ``CACHED_TRACES`` most recent settings are kept)."""
        key = (fn.__name__, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
        if key in self._traces:
            self._traces[key] = self._traces.pop(key)  # most recently used last
        else:
            self._traces[key] = fn(self, **kwargs)
            while len(self._traces) > CACHED_TRACES:
                self._traces.pop(next(iter(self._traces)))
        return self._traces[key]


def _device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def open_session(method: str, run_dir: str | Path | None = "", config: str | Path | None = None,
                 data_root: str | Path | None = "", split: str | None = "", overrides: dict[str, Any] | None = None,
                 seed: int = 0, checkpoint: str = "best", device: str | torch.device = "auto") -> StepSession:
    """Load ``method`` and its training data for a step-through.

    Args:
        method: ``maskmatch``, ``corrmatch``, ``rankmatch``, ``s4mim`` or ``scalematch`` (each method's trace is in its
            module of this package, e.g. :func:`workbench.viz.stepthrough.s4mim.s4mim_trace`).
        run_dir: a run directory of that method, whose ``checkpoint`` (``best``, falling back to ``latest``, or
            ``latest``) is loaded; empty/None = a freshly initialised model (seeded with ``seed``).
        config: YAML config of the fresh model (None = the defaults of ``workbench/config.py`` and the method's
            config dataclass); not allowed with ``run_dir``.
        data_root, split: dataset root and label fraction; empty = the run's (or the config's).
        overrides: dotted config keys (``{"data.batch_size": 4, "method.tau": 0.8}``); with a run, ``model.*`` and
            ``method.name`` are refused (they would not fit its checkpoint).
        seed: the data seed (``train.seed``: sample order and augmentations).
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda``...

    A missing dataset root is prepared as training would (the embedded synthetic dataset is generated); an existing
    one is used as it is. A relative dataset root resolves against the project root
    (:func:`workbench.paths.project_path`), wherever the kernel started.
    """
    from workbench.config import apply_overrides, config_from_dict, config_to_dict, load_config
    from workbench.data.dataset import SegDataset
    from workbench.engine.build import (
        build_from_config,
        check_splits,
        load_run_config,
        prepare_dataset,
        split_names,
        step_dataset,
        step_plan,
    )
    from workbench.engine.checkpoint import load_checkpoint, load_state_checked
    from workbench.engine.rundir import RunDir
    from workbench.paths import project_path

    if method not in STEP_METHODS:
        raise ValueError(f"method must be one of {STEP_METHODS}, got {method!r}")
    if checkpoint not in ("best", "latest"):
        raise ValueError(f"checkpoint must be 'best' or 'latest', got {checkpoint!r}")
    over = dict(overrides or {})
    if data_root:
        over["data.root"] = str(data_root)
    if split:
        over["data.split"] = str(split)
    over["train.seed"] = seed
    dev = _device(device)
    if run_dir:
        if config:
            raise ValueError(f"config={config!r} builds a fresh model; leave it empty when loading run_dir={run_dir!r}")
        base = load_run_config(run_dir)
        if base.method.name != method:
            raise ValueError(f"run_dir {run_dir} is a {base.method.name!r} run; this step-through needs a {method!r} "
                             "run (or leave run_dir empty for a fresh model)")
        bad = sorted(k for k in over if k.startswith("model.") or k == "model" or k == "method.name")
        if bad:
            raise ValueError(f"overrides {bad} would not fit the checkpoint of {run_dir}; drop them")
        cfg = config_from_dict(apply_overrides(config_to_dict(base), over))
    else:
        data = config_to_dict(load_config(config)) if config else {}
        if config and data["method"]["name"] != method:
            raise ValueError(f"config {config} is for method {data['method']['name']!r}, not {method!r}")
        data = apply_overrides(data, {"method.name": method}) if not config else data
        cfg = config_from_dict(apply_overrides(data, over))
    root = Path(project_path(cfg.data.root))  # relative roots (a run's, the config's) mean the project root's
    cfg.data.root = str(root)
    if not (root / "manifest.json").is_file():
        print(f"workbench: no dataset at {root} yet; preparing it as training would (the embedded synthetic dataset "
              "is generated once: a few minutes)", flush=True)
        prepare_dataset(cfg)
    lab_split, unl_split = split_names(cfg, True)
    labeled, unlabeled = SegDataset(root, lab_split), SegDataset(root, unl_split)
    check_splits(labeled, unlabeled)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = build_from_config(cfg, labeled.num_classes, dev)
    source, ck_step = f"fresh initialisation (seed {seed})", None
    if run_dir:
        rd = RunDir(run_dir)
        path = rd.best if checkpoint == "best" and rd.best.is_file() else rd.latest
        ck = load_checkpoint(path)
        load_state_checked(m, ck["method"], path)
        ck_step = ck.get("step")
        source = f"{path} (step {ck_step})"
    m.eval()
    ds = step_dataset(cfg, labeled, unlabeled, step_plan(cfg, len(labeled), len(unlabeled), True))
    man = labeled.manifest
    session = StepSession(m, cfg, ds, list(man.class_names), [list(c) for c in man.palette], dev, source, ck_step)
    session._initial = {k: v.detach().clone() for k, v in m.state_dict().items()}
    return session


def session_table(session: StepSession) -> Any:
    """A :class:`~workbench.runs.Table` "step-through setup": method, weights, data, batch and main settings."""
    from workbench.runs import Table

    c, d = session.method.cfg, session.cfg.data
    rows = [["method", session.name], ["weights", session.source], ["dataset", f"{d.root} (split {d.split})"],
            ["batch (labeled + unlabeled)", f"{d.batch_size} + {d.unlabeled_batch_size or d.batch_size}"],
            ["crop", d.crop_size], ["classes", ", ".join(session.class_names)], ["device", str(session.device)]]
    rows += [[f"method.{f.name}", getattr(c, f.name)] for f in dataclasses.fields(c) if f.name != "name"]
    return Table(["setting", "value"], [[k, v if isinstance(v, (int, float, str)) else str(v)] for k, v in rows],
                 "step-through setup")


# ---------------------------------------------------------------------------------------------------- traces


@dataclass
class LossTerm:
    """One term of a step's loss: ``weight x value`` enters the total; ``logged`` is what ``training_step`` logs
    under ``name`` (the value, or the weighted value for add-on components such as ``loss_lcr``)."""

    name: str
    value: float
    weight: float
    logged: float
    meaning: str = ""


@dataclass
class Trace:
    """What every trace holds: the step, its knobs and images, and the loss terms of the method's stages (``total``
    = the step's loss)."""

    method: str
    step: int
    seed: int
    knobs: dict[str, Any]
    ids: list[str]
    images: dict[str, Tensor]
    """uint8 [B, 3, H, W] views by name (``weak``, ``strong``, ...)"""
    valid: Tensor
    """bool [B, H, W]: pixels of the weak view that are not padding"""
    gt: Tensor | None
    """long [B, H, W] unlabeled ground truth (diagnostics only) or None"""
    terms: list[LossTerm]
    total: float

    @property
    def batch_size(self) -> int:
        """Unlabeled images in the batch."""
        return self.valid.shape[0]

    def check_image(self, i: int) -> int:
        """``i`` when it indexes an image of the batch; ValueError otherwise."""
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.batch_size:
            raise ValueError(f"image index must be an int in [0, {self.batch_size - 1}], got {i!r}")
        return i


def to_cpu(t: Tensor) -> Tensor:
    """``t`` detached and on the CPU (what traces keep)."""
    return t.detach().cpu()


def batch_u8(session: StepSession, x: Tensor) -> Tensor:
    """Normalised images ``[B, 3, H, W]`` of the session's data -> uint8 on the CPU, for display."""
    from workbench.data.transforms import denormalize

    d = session.cfg.data
    return (denormalize(x.detach().float(), d.mean, d.std) * 255).round().to(torch.uint8).cpu()


def display_u8(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Normalised images [..., 3, H, W] -> uint8 (the inverse normalisation, clipped to [0, 255])."""
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return ((x.float() * s + m).clamp(0, 1) * 255).round().to(torch.uint8)


def rng_devices(session: StepSession) -> list[int]:
    """The CUDA devices whose random state a fork of the global RNG must cover (none on the CPU)."""
    return [session.device.index or 0] if session.device.type == "cuda" else []


def check_session(session: StepSession, name: str) -> None:
    """TypeError unless ``session`` is a :class:`StepSession`; ValueError unless it holds the method ``name``."""
    if not isinstance(session, StepSession):
        raise TypeError(f"session must be a StepSession (open_session), got {type(session).__name__}")
    if session.name != name:
        raise ValueError(f"this is the {name} step-through; the session holds a {session.name!r} method")


@contextmanager
def traced_step(session: StepSession, name: str, step: int, seed: int, knobs: dict[str, Any]
                ) -> Iterator[tuple[Any, Any]]:
    """Run a block as training step ``step`` of the ``name`` session (checked by :func:`check_session`): yields
    ``(batch, cfg)``, the step's :class:`~workbench.methods.SemiBatch` and ``method.cfg`` with ``knobs`` applied
    (:meth:`StepSession.configured`), inside :meth:`StepSession.replay` with ``seed``."""
    check_session(session, name)
    batch = session.batch(step)
    with session.configured(**knobs) as cfg, session.replay(seed):
        yield batch, cfg


def trace_fields(session: StepSession, batch: Any, step: int, seed: int, knobs: dict[str, Any]) -> dict[str, Any]:
    """The :class:`Trace` fields every method's trace fills alike: method, step, seed, the knobs that were set,
    the unlabeled ids, valid pixels and ground truth (when known) of ``batch``."""
    return {"method": session.name, "step": step, "seed": seed, "knobs": {k: v for k, v in knobs.items()
                                                                        if v is not None},
            "ids": list(batch.ids_u), "valid": to_cpu(batch.ignore != IGNORE),
            "gt": None if batch.y_u is None else to_cpu(batch.y_u)}

#: add-on components' loss terms (any method may carry them), shown in :func:`losses_table`
COMPONENT_TERMS = {"loss_lcr": "L_LCR: masked weak view vs the pseudo-label (add-on component)"}


def stage_terms(terms: dict[str, tuple[float, Tensor]], meanings: dict[str, str],
                logs: dict[str, Any] | None = None) -> list[LossTerm]:
    """The :class:`LossTerm` rows of a method's stage terms ``{name: (weight, value)}`` (the step's loss is the sum
    of weight x value); ``logged`` is ``logs[name]`` (the step's logs) when given, else what
    :func:`workbench.methods.base.term_logs` logs."""
    from workbench.methods.base import WEIGHTED_LOGS

    rows = []
    for name, (w, v) in terms.items():
        w, v = float(w), float(v)
        logged = float(logs[name]) if logs is not None and name in logs else w * v if name in WEIGHTED_LOGS else v
        rows.append(LossTerm(name, v, w, logged, meanings.get(name, COMPONENT_TERMS.get(name, ""))))
    return rows


def losses_table(trace: Trace) -> Any:
    """A :class:`~workbench.runs.Table` "loss terms": each term's value, weight and share of the total, then the
    total (= the sum of the weighted terms)."""
    from workbench.runs import Table

    rows = [[t.name, t.meaning, t.value, t.weight, t.weight * t.value] for t in trace.terms]
    rows.append(["total", "the step's loss", None, None, trace.total])
    return Table(["term", "meaning", "value", "weight", "weight x value"], rows, "loss terms")
