"""Step through one training step of MaskMatch, CorrMatch or RankMatch and show every intermediate.

(S4MIM and ScaleMatch: :mod:`workbench.viz.stepthrough_methods`, built on this module's sessions and helpers.)

The notebooks ``10_maskmatch``, ``13_corrmatch`` and ``14_rankmatch`` are thin layers over this module:

1. :func:`open_session` loads a method — a run directory's checkpoint, or a freshly initialised model with the
   method's default config — and the training data exactly as the trainer reads it (the same
   :class:`~workbench.data.dataset.StepDataset`, then :meth:`~workbench.methods.SemiBatch.from_loader`).
2. :func:`maskmatch_trace`, :func:`corrmatch_trace` and :func:`rankmatch_trace` run the method's own stages (its
   ``stages``, the very call its ``training_step`` makes) from the same weights and the same global random state,
   and keep every intermediate as CPU tensors, adding only what is drawn for display: what the notebook shows is
   what training computes, because it is the same call.
3. Figures (matplotlib, the dataset manifest's palette; padding white in every label map) and tables
   (:class:`workbench.runs.Table`) of a trace.
4. :func:`explore` shows figures as static PNG outputs (papermill) or behind ipywidgets controls that redraw them.

Nothing here trains: traces run without gradients, and the weights and buffers (BatchNorm statistics, CorrMatch's
dynamic threshold) are restored after every trace, so tracing twice gives the same result. Traces run in float32
(training autocasts to bf16 on CUDA), and the global random state of the caller is left untouched.

Positions: a feature map of ``h x w`` cells is resized to the ``H x W`` image with ``align_corners=True`` throughout
the package, so cell ``(i, j)`` sits on pixel ``(i (H-1)/(h-1), j (W-1)/(w-1))`` and pixel ``(y, x)`` reads the cell
``(round(y (h-1)/(H-1)), round(x (w-1)/(W-1)))`` (:func:`feature_cell`, :func:`cell_position`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from workbench.viz.figures import IGNORE, colorize, legend_handles, plt, to_hwc
from workbench.viz.notebook import show

__all__ = [
    "StepSession", "open_session", "LossTerm", "Trace", "MaskMatchTrace", "CorrMatchTrace", "RankMatchTrace",
    "maskmatch_trace", "corrmatch_trace", "rankmatch_trace", "losses_table", "stage_terms",
    "feature_cell", "cell_position", "cell_extent", "upsample_map", "agent_coherence", "correlation_row", "point_shape",
    "repropagate", "rank_at", "threshold_table", "rank_table", "ms_loss_table", "session_table",
    "patch_masks_figure", "multiscale_figure", "student_scales_figure", "lcr_figure", "correlation_rows_figure",
    "sampled_shapes_figure", "propagation_figure", "corr_predictions_figure", "agent_positions_figure",
    "agent_maps_figure", "topk_agents_figure", "rank_distribution_figure", "Control", "explore", "explore_widget",
]

STEP_METHODS = ("maskmatch", "corrmatch", "rankmatch", "s4mim", "scalematch")  # the last two: stepthrough_methods
# config fields a method reads only when it is built: changing them on a built method would silently do nothing
BUILT_AT_INIT = {"corrmatch": ("threshold", "thresh_init", "thresh_momentum", "pixel_propagation", "feature",
                               "proj_channels"),
                 "scalematch": ("structure", "cif", "fusion", "cif_dim", "cif_depth", "cif_chunk",
                                "cif_se_reduction")}
NOT_CONFIDENT = (200, 200, 200)  # light grey: pixels below the threshold in "confident" panels
JOINED, RELABELLED = (255, 165, 0), (0, 190, 255)  # region propagation's changes (orange, light blue)
FONT = 9
CACHED_TRACES = 8  # traces a session keeps for redrawing widgets


# ------------------------------------------------------------------------------------------------- positions


def feature_cell(y: int, x: int, image_size: Sequence[int], feat_size: Sequence[int]) -> tuple[int, int]:
    """The feature cell ``(i, j)`` that image pixel ``(y, x)`` reads under ``align_corners=True`` resizing.

    ValueError when the pixel lies outside the ``H x W`` image."""
    (hh, ww), (h, w) = image_size, feat_size
    if not (0 <= y < hh and 0 <= x < ww):
        raise ValueError(f"pixel ({y}, {x}) lies outside the {hh} x {ww} image")
    i = round(y * (h - 1) / (hh - 1)) if hh > 1 else 0
    j = round(x * (w - 1) / (ww - 1)) if ww > 1 else 0
    return i, j


def cell_position(i: Tensor | int, j: Tensor | int, image_size: Sequence[int], feat_size: Sequence[int]
                  ) -> tuple[Any, Any]:
    """Image position ``(y, x)`` (floats) of feature cell ``(i, j)`` under ``align_corners=True`` resizing."""
    (hh, ww), (h, w) = image_size, feat_size
    y = i * (hh - 1) / (h - 1) if h > 1 else i * 0 + (hh - 1) / 2
    x = j * (ww - 1) / (w - 1) if w > 1 else j * 0 + (ww - 1) / 2
    return y, x


def cell_extent(image_size: Sequence[int], feat_size: Sequence[int]) -> tuple[float, float, float, float]:
    """``imshow`` extent (left, right, bottom, top) that draws an ``h x w`` map of cells over an ``H x W`` image with
    cell ``(i, j)`` centred on its :func:`cell_position` (so the edge cells overhang the image by half a cell)."""
    (hh, ww), (h, w) = image_size, feat_size
    sy = (hh - 1) / (h - 1) if h > 1 else hh
    sx = (ww - 1) / (w - 1) if w > 1 else ww
    top = -sy / 2 if h > 1 else -0.5
    left = -sx / 2 if w > 1 else -0.5
    return left, left + sx * w, top + sy * h, top


def upsample_map(m: Tensor, size: Sequence[int]) -> Tensor:
    """A feature-resolution map ``[h, w]`` resized bilinearly (``align_corners=True``, as the methods do) to
    ``size`` -> float32 ``[H, W]``."""
    if m.dim() != 2:
        raise ValueError(f"map must be [h, w], got {tuple(m.shape)}")
    return F.interpolate(m.float()[None, None], size=tuple(size), mode="bilinear", align_corners=True)[0, 0]


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
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
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
        method: ``maskmatch``, ``corrmatch``, ``rankmatch``, ``s4mim`` or ``scalematch`` (the traces of the last two
            are in :mod:`workbench.viz.stepthrough_methods`).
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


def _cpu(t: Tensor) -> Tensor:
    return t.detach().cpu()


def _u8(session: StepSession, x: Tensor) -> Tensor:
    from workbench.data.transforms import denormalize

    d = session.cfg.data
    return (denormalize(x.detach().float(), d.mean, d.std) * 255).round().to(torch.uint8).cpu()


def _base(session: StepSession, batch: Any, step: int, seed: int, knobs: dict[str, Any]) -> dict[str, Any]:
    return {"method": session.name, "step": step, "seed": seed, "knobs": {k: v for k, v in knobs.items()
                                                                        if v is not None},
            "ids": list(batch.ids_u), "valid": _cpu(batch.ignore != IGNORE),
            "gt": None if batch.y_u is None else _cpu(batch.y_u)}


#: what each method's loss terms mean, shown in :func:`losses_table`
CORRMATCH_TERMS = {
    "loss_x": "labeled CE", "loss_s": "hard: strong view vs propagated pseudo-label",
    "loss_fp": "feature perturbation vs weak pseudo-label", "loss_kl": "soft: KL(weak || strong) on confident pixels",
    "loss_x_corr": "labeled CE of the propagated prediction",
    "loss_corr_u": "propagated predictions vs pseudo-labels (strong + weak) / 2"}
MASKMATCH_TERMS = {"loss_x": "labeled CE",
                   "loss_u": "L_MSWS: strong view at every scale vs the ensembled pseudo-label (Eq. 8)",
                   "loss_lcr": "L_LCR: masked weak view vs the pseudo-label (Eq. 6)"}
RANKMATCH_TERMS = {"loss_x": "labeled CE", "loss_s": "strong views vs pseudo-label, (L_s1 + L_s2) / 2",
                   "loss_fp": "feature perturbation vs pseudo-label"}
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


@dataclass
class MaskMatchTrace(Trace):
    """MaskMatch's step: multi-scale teacher, CutMixed strong view at every scale, LCR on the masked weak view."""

    tau: float
    scales: tuple[float, ...]
    teacher_pred: Tensor
    """long [B, S, H, W]: the teacher's argmax at each scale (resized back)"""
    teacher_conf: Tensor
    """float [B, S, H, W]: its max probability at each scale"""
    pseudo: Tensor
    conf: Tensor
    confident: Tensor
    """the ensemble (Eq. 7) of the weak view: pseudo-label long, confidence float, conf >= tau (bool) [B, H, W]"""
    box: Tensor
    target_s: Tensor
    confident_s: Tensor
    valid_s: Tensor
    """targets of the CutMixed strong view (the mix batch's inside the box) [B, H, W]"""
    student_pred: Tensor
    """long [B, S, H, W]: the student's argmax of the strong view at each scale (resized back)"""
    ms_losses: list[float]
    """Eq. 8's CE of each scale alone (their mean is L_MS)"""
    patch: int
    ratio: float
    strategy: str
    region: str
    strategy_masks: dict[str, Tensor]
    """strategy -> bool [B, H, W] visible pixels, drawn for illustration with a generator seeded by ``seed``"""
    lcr_enabled: bool
    lcr_visible: Tensor
    lcr_region: Tensor
    lcr_pred: Tensor
    lcr_loss: float
    """the LCR component as the step ran it: its mask, loss region, student prediction of the masked view, L_LCR"""


def maskmatch_trace(session: StepSession, step: int = 0, seed: int = 0, tau: float | None = None,
                    lcr_patch: int | None = None, lcr_ratio: float | None = None, lcr_strategy: str | None = None,
                    lcr_region: str | None = None) -> MaskMatchTrace:
    """MaskMatch's step as its stages computed it (:meth:`~workbench.methods.maskmatch.MaskMatch.stages`, the call
    ``training_step`` makes), kept for display (the knobs, when not None, change ``method.cfg``)."""
    from workbench.methods.components import LocalConsistency
    from workbench.ops.masking import MASK_STRATEGIES, patch_mask

    _need(session, "maskmatch")
    knobs = dict(tau=tau, lcr_patch=lcr_patch, lcr_ratio=lcr_ratio, lcr_strategy=lcr_strategy, lcr_region=lcr_region)
    batch = session.batch(step)
    m = session.method
    with session.configured(**knobs) as c, session.replay(seed):
        s = m.stages(batch, session.step_info(step))
        weak, targets_s, out = s.weak, s.targets_s, s.lcr
        # display only, after the step: each scale's L_MSWS alone (their mean is L_MSWS), the single-scale teacher
        # when ms is off, LCR drawn with weight 1 when it is off, and every masking strategy with its own generator
        per_scale = [float(m.msws_loss([t], targets_s)) for t in s.student_scales]
        teacher_scales, scales = (s.teacher_scales, tuple(c.scales)) if c.ms else ([m.predict_eval(batch.x_w)], (1.0,))
        if out is None:
            out = dataclasses.replace(LocalConsistency.from_config(c), weight=1.0)(
                m.model, batch.x_w, weak.pseudo, m.keep(weak), weak.ignore)
        t_conf, t_pred = torch.stack([t.float().softmax(1) for t in teacher_scales], 1).max(2)
        b, _, h, w = batch.x_w.shape
        masks = {k: _cpu(patch_mask(b, h, w, c.lcr_patch, c.lcr_ratio, k,
                                    generator=torch.Generator().manual_seed(seed))[:, 0] > 0.5)
                 for k in MASK_STRATEGIES}
        return MaskMatchTrace(
            **_base(session, batch, step, seed, knobs),
            images={"weak": _u8(session, batch.x_w), "strong": _u8(session, s.x_s),
                    "masked": _u8(session, out.x_masked)},
            terms=stage_terms(s.terms, MASKMATCH_TERMS), total=float(sum(w * v for w, v in s.terms.values())),
            tau=float(c.tau), scales=scales, teacher_pred=_cpu(t_pred), teacher_conf=_cpu(t_conf),
            pseudo=_cpu(weak.pseudo), conf=_cpu(weak.conf), confident=_cpu(m.keep(weak)),
            box=_cpu(batch.box1 if c.cutmix else torch.zeros_like(batch.box1)), target_s=_cpu(targets_s.pseudo),
            confident_s=_cpu(m.keep(targets_s)), valid_s=_cpu(targets_s.ignore != IGNORE),
            student_pred=_cpu(torch.stack([t.argmax(1) for t in s.student_scales], 1)), ms_losses=per_scale,
            patch=c.lcr_patch, ratio=c.lcr_ratio, strategy=c.lcr_strategy, region=c.lcr_region, strategy_masks=masks,
            lcr_enabled=s.lcr is not None, lcr_visible=_cpu(out.visible[:, 0] > 0.5), lcr_region=_cpu(out.region),
            lcr_pred=_cpu(out.logits.argmax(1)), lcr_loss=float(out.loss))


@dataclass
class CorrMatchTrace(Trace):
    """CorrMatch's step: dynamic threshold, correlation map, pixel and region propagation, hard/soft/corr losses."""

    tau: float
    dynamic: bool
    threshold_before: float | None
    momentum: float | None
    class_max: Tensor
    """float [K]: each class's max confidence over the weak view (-1 = class not predicted), the EMA's input"""
    pseudo: Tensor
    conf: Tensor
    confident: Tensor
    pseudo_prop: Tensor
    confident_prop: Tensor
    """weak-view pseudo-label / confidence / confident mask, then after region propagation [B, H, W]"""
    box: Tensor
    valid_s: Tensor
    """bool [B, H, W]: non-padding pixels of the CutMixed strong view"""
    corr: Tensor | None
    """float [B, hw, hw] the weak view's correlation map (None without pixel propagation)"""
    feat_size: tuple[int, int]
    rows: Tensor | None
    """int64 [B, M] the rows region propagation sampled"""
    keep: Tensor
    """bool [B, H, W] pixels shapes may cover (not padding, not in the CutMix box)"""
    pred: dict[str, Tensor]
    """argmax maps [B, H, W]: ``weak``, ``strong``, ``perturbed`` (feature perturbation), and with pixel propagation
    ``propagated weak`` / ``propagated strong`` (z)"""


def corrmatch_trace(session: StepSession, step: int = 0, seed: int = 0, num_shapes: int | None = None,
                    sampling: str | None = None) -> CorrMatchTrace:
    """CorrMatch's step as its stages computed it (:meth:`~workbench.methods.corrmatch.CorrMatch.stages`, the
    call ``training_step`` makes), kept for display (``num_shapes``/``sampling``, when set, change the config).

    The threshold is the method's own for this step (the dynamic one after its update, or the fixed ``tau``);
    :func:`repropagate` shows region propagation at any other threshold."""
    from workbench.ops.threshold import class_max_confidence

    _need(session, "corrmatch")
    knobs = dict(num_shapes=num_shapes, sampling=sampling)
    batch = session.batch(step)
    m = session.method
    with session.configured(**knobs) as c, session.replay(seed):
        before = float(m.dynamic.value) if m.dynamic is not None else None
        s = m.stages(batch, session.step_info(step))
        p, t, corr = s.passes, s.targets, s.corr
        # display only: each class's max confidence, the dynamic threshold's input (Eq. 11)
        class_max = class_max_confidence(p.logits_w, t.threshold_ignore)
        pred = {"weak": p.logits_w.argmax(1), "strong": p.logits_s.argmax(1), "perturbed": p.logits_fp.argmax(1)}
        if corr is not None:
            pred.update({"propagated weak": corr.z_w.argmax(1), "propagated strong": corr.z_s.argmax(1)})
        box = batch.box1 if c.cutmix else torch.zeros_like(batch.box1)
        keep = (batch.ignore != IGNORE) & ~box
        return CorrMatchTrace(
            **_base(session, batch, step, seed, knobs),
            images={"weak": _u8(session, batch.x_w), "strong": _u8(session, p.x_s)},
            terms=stage_terms(s.terms, CORRMATCH_TERMS), total=float(sum(w * v for w, v in s.terms.values())),
            tau=float(t.tau), dynamic=m.dynamic is not None, threshold_before=before,
            momentum=m.dynamic.momentum if m.dynamic is not None else None, class_max=_cpu(class_max),
            pseudo=_cpu(t.weak.pseudo), conf=_cpu(t.weak.conf), confident=_cpu(t.confident),
            pseudo_prop=_cpu(t.pseudo_prop), confident_prop=_cpu(t.confident_prop), box=_cpu(box),
            valid_s=_cpu(t.ignore_s != IGNORE), corr=None if corr is None else _cpu(corr.map.float()),
            feat_size=(1, 1) if corr is None else tuple(int(x) for x in corr.size),
            rows=None if corr is None or corr.rows is None else _cpu(corr.rows), keep=_cpu(keep),
            pred={k: _cpu(v) for k, v in pred.items()})


@dataclass
class RankMatchTrace(Trace):
    """RankMatch's step: UniMatch's passes, agents on the CutMixed weak features, agent-level correlations of the
    weak and strong views, and the rank-aware consistency (for the first strong view; both enter the loss)."""

    feat_size: tuple[int, int]
    top_k: int
    consistency: str
    selection: str
    agents: Tensor
    """int64 [B, N] flat agent positions chosen by the method (view 1)"""
    random_agents: Tensor
    """int64 [B, N] random positions (Table 5's baseline), drawn for comparison with a generator seeded by ``seed``"""
    features: Tensor
    """float [B, C, h, w] the weak features the agents were chosen on (CutMixed with the mix batch's in box 1)"""
    corr_w: Tensor
    corr_s: Tensor
    """float [B, hw, N] agent-level correlations of the weak and strong view (Eq. 4)"""
    view_losses: list[float]
    box: Tensor
    pseudo: Tensor
    confident: Tensor
    rank_guard: str = "reference"
    rank_eps: float = 1e-10
    """the method's Plackett-Luce guard and epsilon (:func:`~workbench.ops.ranking.plackett_luce`)"""


def rankmatch_trace(session: StepSession, step: int = 0, seed: int = 0, num_agents: int | None = None,
                    top_k: int | None = None, agents: str | None = None, consistency: str | None = None
                    ) -> RankMatchTrace:
    """RankMatch's step as its stages computed it (:meth:`~workbench.methods.rankmatch.RankMatch.stages`, the call
    ``training_step`` makes), kept for display (the knobs, when not None, change ``method.cfg``)."""
    from workbench.ops.agents import random_agents
    from workbench.ops.semi import cutmix_images

    _need(session, "rankmatch")
    knobs = dict(num_agents=num_agents, top_k=top_k, agents=agents, consistency=consistency)
    batch = session.batch(step)
    m = session.method
    with session.configured(**knobs) as c, session.replay(seed):
        s = m.stages(batch, session.step_info(step))
        p, views = s.unimatch, s.views
        if not views:  # weight_rank 0: the agent stage run for display only, after the step
            feat_s1, feat_s2 = p.out_s["aspp"].chunk(2)
            views = [m.agent_view(s.feat_w, s.feat_mix, batch.box1, feat_s1),
                     m.agent_view(s.feat_w, s.feat_mix, batch.box2, feat_s2)]
        v = views[0]
        rand = random_agents(v.features, v.agents.shape[1], generator=torch.Generator().manual_seed(seed))
        # the image under the agents: the weak view with the mix batch's weak view in box 1, like the features
        mixed_w = cutmix_images(batch.x_w, batch.x_w_mix, batch.box1) if c.cutmix else batch.x_w
        return RankMatchTrace(
            **_base(session, batch, step, seed, knobs),
            images={"weak": _u8(session, batch.x_w), "weak mixed": _u8(session, mixed_w),
                    "strong": _u8(session, p.x_s1), "strong 2": _u8(session, p.x_s2)},
            terms=stage_terms(s.terms, {**RANKMATCH_TERMS, "loss_rank": f"{c.consistency} consistency of the agent "
                                        "correlations, (view 1 + view 2) / 2"}),
            total=float(sum(w * x for w, x in s.terms.values())),
            feat_size=tuple(int(x) for x in v.feat_size), top_k=c.top_k, consistency=c.consistency,
            selection=c.agents, agents=_cpu(v.agents), random_agents=_cpu(rand), features=_cpu(v.features.float()),
            corr_w=_cpu(v.corr_w.float()), corr_s=_cpu(v.corr_s.float()),
            view_losses=[float(views[0].loss), float(views[1].loss)],
            box=_cpu(batch.box1 if c.cutmix else torch.zeros_like(batch.box1)), pseudo=_cpu(p.weak.pseudo),
            confident=_cpu(p.weak.confident(c.tau)), rank_guard=c.rank_guard, rank_eps=c.rank_eps)


def _need(session: StepSession, name: str) -> None:
    if not isinstance(session, StepSession):
        raise TypeError(f"session must be a StepSession (open_session), got {type(session).__name__}")
    if session.name != name:
        raise ValueError(f"this is the {name} step-through; the session holds a {session.name!r} method")


# ----------------------------------------------------------------------------------------- check and tables


def losses_table(trace: Trace) -> Any:
    """A :class:`~workbench.runs.Table` "loss terms": each term's value, weight and share of the total, then the
    total (= the sum of the weighted terms)."""
    from workbench.runs import Table

    rows = [[t.name, t.meaning, t.value, t.weight, t.weight * t.value] for t in trace.terms]
    rows.append(["total", "the step's loss", None, None, trace.total])
    return Table(["term", "meaning", "value", "weight", "weight x value"], rows, "loss terms")


def ms_loss_table(trace: MaskMatchTrace) -> Any:
    """Table "multi-scale loss": Eq. 8's CE of each scale alone, and their mean L_MS (= ``loss_u``)."""
    from workbench.runs import Table

    rows = [[f"{s:g}", v] for s, v in zip(trace.scales, trace.ms_losses)]
    rows.append(["mean (L_MS)", float(np.mean(trace.ms_losses))])
    return Table(["scale", "CE vs ensembled pseudo-label"], rows, "multi-scale loss per scale")


def threshold_table(trace: CorrMatchTrace, class_names: Sequence[str]) -> Any:
    """Table "dynamic threshold": each class's max confidence on the weak view (``-`` = not predicted), their mean,
    and the threshold before and after this step's EMA update (Eq. 11); for a fixed threshold, its value."""
    from workbench.runs import Table

    if len(class_names) != trace.class_max.numel():
        raise ValueError(f"{len(class_names)} class names for {trace.class_max.numel()} classes")
    rows = [[f"max confidence: {n}", f"{float(v):.6f}" if v >= 0 else "-"]
            for n, v in zip(class_names, trace.class_max)]
    seen = trace.class_max[trace.class_max >= 0]
    rows.append(["mean over predicted classes", f"{float(seen.mean()):.6f}" if seen.numel() else "-"])
    if trace.dynamic:
        rows += [["threshold before", f"{trace.threshold_before:.6f}"], ["momentum", f"{trace.momentum:g}"],
                 ["threshold after (used)", f"{trace.tau:.6f}"]]
    else:
        rows.append(["fixed threshold (used)", f"{trace.tau:.6f}"])
    return Table(["quantity", "value"], rows, "dynamic threshold" if trace.dynamic else "fixed threshold")


# ------------------------------------------------------------------------------------ derived computations


def correlation_row(trace: CorrMatchTrace, i: int, y: int, x: int) -> tuple[Tensor, tuple[int, int]]:
    """Row of image ``i``'s correlation map for the feature cell under pixel ``(y, x)``: float ``[h, w]`` (sums to
    1 over the cells) and the cell. ValueError without pixel propagation (no correlation map)."""
    if trace.corr is None:
        raise ValueError("this CorrMatch has no correlation map (method.pixel_propagation is false)")
    i = trace.check_image(i)
    cell = feature_cell(y, x, trace.valid.shape[-2:], trace.feat_size)
    return trace.corr[i, cell[0] * trace.feat_size[1] + cell[1]].reshape(trace.feat_size), cell


def point_shape(trace: CorrMatchTrace, i: int, y: int, x: int) -> Tensor:
    """The binary shape (Eq. 7, :func:`~workbench.ops.correlation.shapes_from_rows`) of the row under pixel
    ``(y, x)`` of image ``i``, cleared of padding and the CutMix box as region propagation does: bool [H, W]."""
    from workbench.ops.correlation import shapes_from_rows

    _, (ci, cj) = correlation_row(trace, i, y, x)
    row = torch.tensor([[ci * trace.feat_size[1] + cj]])
    shape = shapes_from_rows(trace.corr[i: i + 1], row, trace.feat_size, tuple(trace.valid.shape[-2:]))[0, 0]
    return shape & trace.keep[i]


def _shapes(trace: CorrMatchTrace, images: Sequence[int] | None = None) -> Tensor:
    from workbench.ops.correlation import shapes_from_rows

    if trace.rows is None or trace.corr is None:
        raise ValueError("this CorrMatch runs no region propagation (method.region_propagation is false)")
    idx = list(range(trace.batch_size)) if images is None else list(images)
    shapes = shapes_from_rows(trace.corr[idx], trace.rows[idx], trace.feat_size, tuple(trace.valid.shape[-2:]))
    return shapes & trace.keep[idx][:, None]


def repropagate(trace: CorrMatchTrace, tau: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Region propagation of the step's shapes at threshold ``tau`` (None = the step's own):
    ``(confident, pseudo_out, confident_out)`` [B, H, W] with ``confident`` = conf >= tau on valid pixels,
    through :func:`~workbench.ops.correlation.region_propagation` (the op the method calls)."""
    from workbench.ops.correlation import region_propagation
    from workbench.ops.semi import confident_mask

    tau = trace.tau if tau is None else float(tau)
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must lie in [0, 1], got {tau}")
    q = confident_mask(trace.conf, tau, torch.where(trace.valid, 0, IGNORE))
    pseudo, q_out = region_propagation(trace.pseudo, q, _shapes(trace), tau, int(trace.class_max.numel()))
    return q, pseudo, q_out


def agent_coherence(features: Tensor, agents: Tensor) -> Tensor:
    """Mean ``|cosine|`` between the features of distinct agents, per image: float [B] (lower = more orthogonal
    agents; what orthogonal selection minimises greedily). ``features`` [B, C, h, w], ``agents`` int64 [B, N]."""
    if features.dim() != 4 or agents.dim() != 2 or agents.shape[0] != features.shape[0]:
        raise ValueError(f"features [B, C, h, w] and agents [B, N] must match, got {tuple(features.shape)} and "
                         f"{tuple(agents.shape)}")
    n = agents.shape[1]
    if n < 2:
        raise ValueError("agent coherence needs at least two agents")
    unit = F.normalize(features.float().flatten(2), dim=1)  # [B, C, hw]
    picked = torch.gather(unit, 2, agents[:, None, :].expand(-1, unit.shape[1], -1))  # [B, C, N]
    cos = torch.bmm(picked.transpose(1, 2), picked).abs()
    return (cos.sum((1, 2)) - cos.diagonal(dim1=1, dim2=2).sum(1)) / (n * (n - 1))


def rank_at(trace: RankMatchTrace, i: int, y: int, x: int) -> dict[str, Any]:
    """The rank-aware consistency at the feature cell under pixel ``(y, x)`` of image ``i`` (view 1).

    Returns a dict: ``cell`` (i, j); ``agents`` the weak view's top-k agents (indices into the agent list, best
    first); ``weights_w`` / ``weights_s`` their correlations; ``orderings`` int64 [k!, k] (positions into the
    top-k, :func:`~workbench.ops.ranking.permutations` order); ``dist_w`` / ``dist_s`` the Plackett-Luce
    probabilities [k!] (:func:`~workbench.ops.ranking.rank_distributions`); ``kl`` = sum dist_w log(dist_w / dist_s)
    at this pixel."""
    from workbench.ops.ranking import permutations, rank_distributions

    i = trace.check_image(i)
    ci, cj = feature_cell(y, x, trace.valid.shape[-2:], trace.feat_size)
    p = ci * trace.feat_size[1] + cj
    cw, cs = trace.corr_w[i, p], trace.corr_s[i, p]
    dist_w, dist_s = rank_distributions(cw, cs, trace.top_k, trace.rank_guard, trace.rank_eps)
    top = cw.topk(trace.top_k).indices
    kl = float((torch.xlogy(dist_w, dist_w) - dist_w * torch.log(dist_s + trace.rank_eps)).sum())
    return {"cell": (ci, cj), "agents": top, "weights_w": cw[top], "weights_s": cs[top],
            "orderings": permutations(trace.top_k), "dist_w": dist_w, "dist_s": dist_s, "kl": kl}


def _ordering_label(order: Sequence[int], agents: Sequence[int]) -> str:
    return " > ".join(f"a{int(agents[int(o)])}" for o in order)


def rank_table(trace: RankMatchTrace, i: int, y: int, x: int) -> Any:
    """Table "rank distributions at (y, x)": every ordering of the weak view's top-k agents at that pixel with its
    Plackett-Luce probability under the weak and the strong view (k! rows, the weak view's order first)."""
    from workbench.runs import Table

    r = rank_at(trace, i, y, x)
    rows = [[_ordering_label(o, r["agents"].tolist()), float(pw), float(ps)]
            for o, pw, ps in zip(r["orderings"].tolist(), r["dist_w"], r["dist_s"])]
    return Table(["ordering (agents, best first)", "P weak", "P strong"], rows,
                 f"rank distributions at pixel ({y}, {x}) of image {i}")


# --------------------------------------------------------------------------------------------------- figures


def _off(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _show(ax: Any, img: Any, title: str, **kw: Any) -> Any:
    im = ax.imshow(img, interpolation="nearest", **kw)
    ax.set_title(title, fontsize=FONT)
    _off(ax)
    return im


def _heat(fig: Any, ax: Any, values: Tensor, title: str, vmin: float | None = 0.0, vmax: float | None = 1.0,
          cmap: str = "viridis", label: str | None = None, under: Tensor | None = None,
          extent: Sequence[float] | None = None) -> Any:
    """A heat map with its own colour bar; drawn semi-transparent over the grey image ``under`` when given."""
    if under is not None:
        ax.imshow(to_hwc(under).mean(-1), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    im = ax.imshow(values.float().numpy(), vmin=vmin, vmax=vmax, cmap=cmap, interpolation="nearest",
                   alpha=0.65 if under is not None else 1.0, extent=extent)
    ax.set_title(title, fontsize=FONT)
    _off(ax)
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    cb.ax.tick_params(labelsize=7)
    if label:
        cb.set_label(label, fontsize=7)
    return im


def _labels(labels: Tensor, valid: Tensor, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """Coloured label map, padding white."""
    return colorize(torch.where(valid, labels.long(), IGNORE), palette)


def _confident_labels(labels: Tensor, confident: Tensor, valid: Tensor, palette: Sequence[Sequence[int]]
                      ) -> np.ndarray:
    """Coloured labels on confident pixels, light grey below the threshold, white on padding."""
    out = colorize(torch.where(confident & valid, labels.long(), IGNORE), palette)
    out[(~confident & valid).numpy()] = NOT_CONFIDENT
    return out


def _legend(fig: Any, class_names: Sequence[str], palette: Sequence[Sequence[int]], extra: Sequence[Any] = ()
            ) -> None:
    from matplotlib.patches import Patch

    handles = legend_handles(class_names, palette) + list(extra)
    handles.append(Patch(facecolor="white", edgecolor="black", label="padding"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 8), fontsize=8, frameon=False)


def _below_threshold_patch() -> Any:
    from matplotlib.patches import Patch

    return Patch(facecolor=np.asarray(NOT_CONFIDENT) / 255, edgecolor="black", label="below threshold")


def _box_outline(ax: Any, box: Tensor) -> None:
    """Outline of a CutMix box (bool [H, W]) in dashed white/black."""
    if bool(box.any()):
        ax.contour(box.float().numpy(), levels=[0.5], colors=["white"], linewidths=1.2, linestyles="--")


def _figure(rows: int, cols: int, cell: float = 2.1, extra_h: float = 0.9, extra_w: float = 0.0) -> tuple[Any, Any]:
    return plt.subplots(rows, cols, figsize=(cell * cols + extra_w, cell * rows + extra_h), squeeze=False,
                        layout="constrained")


def patch_masks_figure(trace: MaskMatchTrace, i: int = 0) -> Any:
    """MaskMatch's patch masks: the weak view, then the same image under each strategy (random, block, grid; hidden
    patches dark, patch grid drawn) with the hidden fraction in the title."""
    i = trace.check_image(i)
    img = to_hwc(trace.images["weak"][i]).astype(np.float32)
    fig, axes = _figure(1, 1 + len(trace.strategy_masks), cell=2.4, extra_h=0.6)
    _show(axes[0, 0], img.astype(np.uint8), f"weak view {trace.ids[i]}")
    h, w = img.shape[:2]
    for ax, (name, vis) in zip(axes[0, 1:], trace.strategy_masks.items()):
        v = vis[i].numpy()[..., None]
        _show(ax, (img * np.where(v, 1.0, 0.2)).astype(np.uint8),
              f"{name}: {1 - v.mean():.0%} hidden" + (" (used)" if name == trace.strategy else ""))
        for t in range(trace.patch, max(h, w), trace.patch):
            if t < w:
                ax.axvline(t - 0.5, color="white", lw=0.4, alpha=0.6)
            if t < h:
                ax.axhline(t - 0.5, color="white", lw=0.4, alpha=0.6)
    fig.suptitle(f"patch masks: {trace.patch} px patches, ratio {trace.ratio:g} (illustration, seed {trace.seed})",
                 fontsize=10)
    return fig


def multiscale_figure(trace: MaskMatchTrace, i: int, palette: Sequence[Sequence[int]],
                      class_names: Sequence[str]) -> Any:
    """The teacher at every scale and the ensemble (Eq. 7), one column each: predictions above, confidences (colour
    bars) below; first column the weak view and its ground truth (diagnostics only, when known), last column the
    confident ensembled pseudo-label at ``tau``."""
    i = trace.check_image(i)
    s = len(trace.scales)
    fig, axes = _figure(2, s + 3, cell=2.2, extra_w=0.8)
    v = trace.valid[i]
    _show(axes[0, 0], to_hwc(trace.images["weak"][i]), "weak view")
    if trace.gt is not None:
        _show(axes[1, 0], _labels(trace.gt[i], v, palette), "ground truth (not used)")
    else:
        axes[1, 0].set_visible(False)
    for k, sc in enumerate(trace.scales):
        _show(axes[0, k + 1], _labels(trace.teacher_pred[i, k], v, palette), f"teacher @ scale {sc:g}")
        _heat(fig, axes[1, k + 1], trace.teacher_conf[i, k].masked_fill(~v, float("nan")),
              f"confidence @ {sc:g}")
    _show(axes[0, s + 1], _labels(trace.pseudo[i], v, palette), "ensemble pseudo-label")
    _heat(fig, axes[1, s + 1], trace.conf[i].masked_fill(~v, float("nan")), "ensemble confidence", label="max prob")
    share = float((trace.confident[i] & v).sum()) / max(1, int(v.sum()))
    _show(axes[0, s + 2], _confident_labels(trace.pseudo[i], trace.confident[i], v, palette),
          f"confident (tau {trace.tau:g}): {share:.0%}")
    axes[1, s + 2].set_visible(False)
    _legend(fig, class_names, palette, [_below_threshold_patch()])
    fig.suptitle(f"MaskMatch teacher: multi-scale ensembling (Eq. 7), image {i}", fontsize=10)
    return fig


def student_scales_figure(trace: MaskMatchTrace, i: int, palette: Sequence[Sequence[int]],
                          class_names: Sequence[str]) -> Any:
    """The student on the CutMixed strong view at every scale (Eq. 8): the strong view (box dashed), its target
    (confident pixels), and each scale's prediction with that scale's loss."""
    i = trace.check_image(i)
    s = len(trace.scales)
    fig, axes = _figure(1, s + 2, cell=2.3, extra_h=0.9)
    vs = trace.valid_s[i]
    _show(axes[0, 0], to_hwc(trace.images["strong"][i]), "strong view (CutMix)")
    _box_outline(axes[0, 0], trace.box[i])
    _show(axes[0, 1], _confident_labels(trace.target_s[i], trace.confident_s[i], vs, palette), "target (confident)")
    _box_outline(axes[0, 1], trace.box[i])
    for k, sc in enumerate(trace.scales):
        _show(axes[0, k + 2], _labels(trace.student_pred[i, k], vs, palette),
              f"student @ {sc:g}\nL = {trace.ms_losses[k]:.4f}")
    _legend(fig, class_names, palette, [_below_threshold_patch()])
    fig.suptitle(f"MaskMatch student: strong view at every scale (batch L_MS = {np.mean(trace.ms_losses):.4f})",
                 fontsize=10)
    return fig


def lcr_figure(trace: MaskMatchTrace, i: int, palette: Sequence[Sequence[int]], class_names: Sequence[str]) -> Any:
    """LCR (Eqs. 5-6) as the step ran it: weak view, its patch mask, the masked input, the student's prediction of
    it, the target (the teacher's confident pseudo-label of the unmasked view) and the region the loss covers."""
    i = trace.check_image(i)
    v = trace.valid[i]
    fig, axes = _figure(1, 6, cell=2.2, extra_h=0.9)
    _show(axes[0, 0], to_hwc(trace.images["weak"][i]), "weak view")
    vis = trace.lcr_visible[i]
    _show(axes[0, 1], vis.float().numpy(), f"mask z ({trace.strategy}): {1 - float(vis.float().mean()):.0%} hidden",
          cmap="gray", vmin=0, vmax=1)
    _show(axes[0, 2], to_hwc(trace.images["masked"][i]), "masked input x_w * z")
    _show(axes[0, 3], _labels(trace.lcr_pred[i], v, palette), "student on masked input")
    _show(axes[0, 4], _confident_labels(trace.pseudo[i], trace.confident[i], v, palette),
          f"target (tau {trace.tau:g})")
    region = trace.lcr_region[i]
    covered = float(region.float().mean())
    _show(axes[0, 5], region.float().numpy(), f"loss region ({trace.region}):\n{covered:.0%} (white)",
          cmap="gray", vmin=0, vmax=1)
    status = f"L_LCR = {trace.lcr_loss:.4f}" + ("" if trace.lcr_enabled else " (not in the loss: lcr_weight = 0)")
    _legend(fig, class_names, palette, [_below_threshold_patch()])
    fig.suptitle(f"MaskMatch LCR, image {i}: {status}; mask white = visible", fontsize=10)
    return fig


def _mark(ax: Any, y: float, x: float, color: str = "red", label: str | None = None, size: float = 60) -> None:
    ax.scatter([x], [y], s=size, marker="x", c=color, linewidths=2)
    if label:
        ax.annotate(label, (x, y), xytext=(3, 3), textcoords="offset points", color=color, fontsize=8,
                    fontweight="bold")


def correlation_rows_figure(trace: CorrMatchTrace, i: int, points: Sequence[Sequence[int]]) -> Any:
    """For each chosen pixel ``(y, x)``: its correlation-map row (over the image, colour bar) and the binary shape
    that row gives (Eq. 7: min-max normalised > 0.5, cleared of padding and the CutMix box)."""
    i = trace.check_image(i)
    if not points:
        raise ValueError("points is empty: give at least one (y, x) pixel")
    size = tuple(trace.valid.shape[-2:])
    fig, axes = _figure(2, len(points), cell=2.5, extra_h=0.5)
    img = trace.images["weak"][i]
    for k, (y, x) in enumerate(points):
        row, (ci, cj) = correlation_row(trace, i, int(y), int(x))
        _heat(fig, axes[0, k], upsample_map(row, size), f"row of ({y}, {x}) = cell ({ci}, {cj})", vmin=None,
              vmax=None, cmap="magma", label="correlation", under=img)
        _mark(axes[0, k], y, x, "cyan")
        shape = point_shape(trace, i, int(y), int(x))
        base = to_hwc(img).astype(np.float32)
        tint = np.where(shape.numpy()[..., None], base * 0.4 + np.array([255, 200, 0]) * 0.6, base * 0.5)
        _show(axes[1, k], tint.astype(np.uint8), f"shape: {int(shape.sum())} px")
        _box_outline(axes[1, k], trace.box[i])
        _mark(axes[1, k], y, x, "cyan")
    fig.suptitle(f"CorrMatch: correlation rows and shapes,\nimage {i} (CutMix box dashed)", fontsize=10)
    return fig


def sampled_shapes_figure(trace: CorrMatchTrace, i: int, n: int = 8) -> Any:
    """The first ``n`` shapes region propagation sampled for image ``i`` (as used: padding and box cleared), each
    with its source pixel marked; title: the shape's size and its share of confident pixels (r1)."""
    i = trace.check_image(i)
    if trace.rows is None:
        raise ValueError("this CorrMatch runs no region propagation (method.region_propagation is false)")
    shapes = _shapes(trace, [i])[0]
    n = max(1, min(n, shapes.shape[0]))
    cols = min(n, 4)
    fig, axes = _figure(-(-n // cols), cols, cell=2.2, extra_h=0.5)
    base = to_hwc(trace.images["weak"][i]).astype(np.float32)
    size, (h, w) = tuple(trace.valid.shape[-2:]), trace.feat_size
    for k, ax in enumerate(axes.flat):
        if k >= n:
            ax.set_visible(False)
            continue
        sh = shapes[k]
        tint = np.where(sh.numpy()[..., None], base * 0.4 + np.array([255, 200, 0]) * 0.6, base * 0.5)
        r = int(trace.rows[i, k])
        y, x = cell_position(r // w, r % w, size, (h, w))
        inside = int((sh & trace.confident[i]).sum())
        r1 = inside / max(1, int(sh.sum()))
        _show(ax, tint.astype(np.uint8), f"shape {k}: {int(sh.sum())} px, r1 {r1:.2f}")
        _mark(ax, y, x, "cyan")
    fig.suptitle(f"CorrMatch: first {n} of {trace.rows.shape[1]} sampled shapes, image {i}", fontsize=10)
    return fig


def propagation_figure(trace: CorrMatchTrace, i: int, palette: Sequence[Sequence[int]], class_names: Sequence[str],
                       tau: float | None = None) -> Any:
    """Region propagation before / after at ``tau`` (None = the step's threshold): the weak view, ground truth
    (when known), pseudo-label and confident pseudo-label before, after, and the pixels that changed."""
    i = trace.check_image(i)
    t = trace.tau if tau is None else float(tau)
    if trace.rows is None:
        q, pseudo_p, q_p = trace.confident, trace.pseudo, trace.confident_prop
    else:
        q, pseudo_p, q_p = repropagate(trace, t)
    v = trace.valid[i]
    cols = 6 if trace.gt is not None else 5
    fig, axes = _figure(1, cols, cell=2.3, extra_h=1.0)
    _show(axes[0, 0], to_hwc(trace.images["weak"][i]), "weak view")
    k = 1
    if trace.gt is not None:
        _show(axes[0, 1], _labels(trace.gt[i], v, palette), "ground truth (not used)")
        k = 2
    before, after = int((q[i] & v).sum()), int((q_p[i] & v).sum())
    _show(axes[0, k], _confident_labels(trace.pseudo[i], q[i], v, palette), f"before: {before} confident px")
    _show(axes[0, k + 1], _confident_labels(pseudo_p[i], q_p[i], v, palette), f"after: {after} confident px")
    relabel = (pseudo_p[i] != trace.pseudo[i]) & v
    joined = q_p[i] & ~q[i] & v
    change = np.full((*v.shape, 3), 255, dtype=np.uint8)
    change[v.numpy()] = (235, 235, 235)
    change[joined.numpy()] = JOINED
    change[relabel.numpy()] = RELABELLED
    _show(axes[0, k + 2], change, f"changed: {int(joined.sum())} joined,\n{int(relabel.sum())} relabelled")
    _box_outline(axes[0, k + 2], trace.box[i])
    _heat(fig, axes[0, k + 3], trace.conf[i].masked_fill(~v, float("nan")), "confidence", label="max prob")
    from matplotlib.patches import Patch

    extra = [_below_threshold_patch(), Patch(facecolor=np.asarray(JOINED) / 255, label="joined the mask"),
             Patch(facecolor=np.asarray(RELABELLED) / 255, label="relabelled")]
    _legend(fig, class_names, palette, extra)
    which = "the step's" if tau is None or t == trace.tau else "chosen"
    fig.suptitle(f"CorrMatch region propagation at tau = {t:.4f} ({which}), image {i}", fontsize=10)
    return fig


def corr_predictions_figure(trace: CorrMatchTrace, i: int, palette: Sequence[Sequence[int]],
                            class_names: Sequence[str]) -> Any:
    """The step's predictions of image ``i``: weak, strong (CutMix box dashed), feature-perturbed, and the
    pixel-propagated ones (z, Eq. 5) of the weak and strong views."""
    i = trace.check_image(i)
    v = trace.valid[i]
    fig, axes = _figure(1, len(trace.pred) + 2, cell=2.2, extra_h=0.9)
    _show(axes[0, 0], to_hwc(trace.images["weak"][i]), "weak view")
    _show(axes[0, 1], to_hwc(trace.images["strong"][i]), "strong view")
    _box_outline(axes[0, 1], trace.box[i])
    for ax, (name, p) in zip(axes[0, 2:], trace.pred.items()):
        _show(ax, _labels(p[i], trace.valid_s[i] if "strong" in name else v, palette), name)
        if "strong" in name:
            _box_outline(ax, trace.box[i])
    _legend(fig, class_names, palette)
    fig.suptitle(f"CorrMatch predictions, image {i} (propagated = logits spread through the correlation map)",
                 fontsize=10)
    return fig


def agent_positions_figure(trace: RankMatchTrace, i: int) -> Any:
    """Agent positions on the weak view: the method's selection (``agents``) and random positions, each titled
    with its mean |cosine| between agents (:func:`agent_coherence`; lower = more orthogonal)."""
    i = trace.check_image(i)
    size, (h, w) = tuple(trace.valid.shape[-2:]), trace.feat_size
    fig, axes = _figure(1, 2, cell=3.2, extra_h=0.4)
    for ax, (name, a) in zip(axes[0], ((trace.selection, trace.agents), ("random", trace.random_agents))):
        coh = float(agent_coherence(trace.features[i: i + 1], a[i: i + 1])[0]) if a.shape[1] > 1 else float("nan")
        _show(ax, to_hwc(trace.images["weak mixed"][i]), f"{name}: {a.shape[1]} agents\nmean |cos| {coh:.3f}")
        y, x = cell_position(a[i] // w, a[i] % w, size, (h, w))
        ax.scatter(x.numpy(), y.numpy(), s=28, c=np.arange(a.shape[1]), cmap="turbo", edgecolors="white",
                   linewidths=0.8, vmin=0, vmax=max(1, a.shape[1] - 1))
        _box_outline(ax, trace.box[i])
    every = trace.agents.shape[1] == h * w
    note = "\nN = every cell: both sets hold all cells, only the order differs" if every else ""
    fig.suptitle(f"RankMatch agents on the CutMixed weak view (colour = selection order,\nfeature grid {h} x {w}), "
                 f"image {i}{note}", fontsize=10)
    return fig


def agent_maps_figure(trace: RankMatchTrace, i: int, agents: Sequence[int]) -> Any:
    """Agent-pixel activation maps (Eq. 4, softmax over agents): for each agent index in ``agents``, its column of
    the weak and the strong correlation over the image, the agent marked."""
    i = trace.check_image(i)
    n_agents = trace.agents.shape[1]
    bad = [a for a in agents if not 0 <= int(a) < n_agents]
    if not agents or bad:
        raise ValueError(f"agents must be indices in [0, {n_agents - 1}], got {list(agents)}")
    size, (h, w) = tuple(trace.valid.shape[-2:]), trace.feat_size
    fig, axes = _figure(2, len(agents), cell=2.5, extra_h=0.5)
    for k, a in enumerate(int(a) for a in agents):
        pos = int(trace.agents[i, a])
        y, x = cell_position(pos // w, pos % w, size, (h, w))
        for r, (name, corr, img) in enumerate((("weak (CutMixed)", trace.corr_w, "weak mixed"),
                                               ("strong", trace.corr_s, "strong"))):
            m = corr[i, :, a].reshape(h, w)
            vmax = float(torch.maximum(trace.corr_w[i, :, a].max(), trace.corr_s[i, :, a].max()))
            _heat(fig, axes[r, k], upsample_map(m, size), f"agent {a} on {name}", vmin=0.0, vmax=vmax,
                  cmap="magma", under=trace.images[img][i])
            _mark(axes[r, k], y, x, "cyan")
    fig.suptitle(f"RankMatch agent-pixel activation (softmax over agents), image {i}", fontsize=10)
    return fig


def topk_agents_figure(trace: RankMatchTrace, i: int) -> Any:
    """Each pixel's top-k agents of the weak view (k maps: 1st, 2nd, ... choice; colour = agent, the same colour
    as its marker) and the top-k agents' share of the correlation mass."""
    i = trace.check_image(i)
    size, (h, w) = tuple(trace.valid.shape[-2:]), trace.feat_size
    n_agents = trace.agents.shape[1]
    vals, idx = trace.corr_w[i].topk(trace.top_k, dim=-1)  # [hw, k]
    fig, axes = _figure(1, trace.top_k + 1, cell=2.4, extra_h=0.5, extra_w=0.6)
    y, x = cell_position(trace.agents[i] // w, trace.agents[i] % w, size, (h, w))
    for r in range(trace.top_k):
        ax = axes[0, r]
        im = ax.imshow(idx[:, r].reshape(h, w).numpy(), cmap="turbo", vmin=0, vmax=max(1, n_agents - 1),
                       interpolation="nearest", extent=cell_extent(size, (h, w)))
        ax.imshow(to_hwc(trace.images["weak mixed"][i]), alpha=0.35, interpolation="nearest")
        ax.set_xlim(-0.5, size[1] - 0.5)
        ax.set_ylim(size[0] - 0.5, -0.5)
        ax.scatter(x.numpy(), y.numpy(), s=18, c=np.arange(n_agents), cmap="turbo", vmin=0,
                   vmax=max(1, n_agents - 1), edgecolors="white", linewidths=0.6)
        ax.set_title(f"choice {r + 1} (agent index)", fontsize=FONT)
        _off(ax)
    cb = fig.colorbar(im, ax=axes[0, trace.top_k - 1], fraction=0.046, pad=0.03)
    cb.ax.tick_params(labelsize=7)
    cb.set_label("agent index", fontsize=7)
    _heat(fig, axes[0, trace.top_k], vals.sum(-1).reshape(h, w), f"top-{trace.top_k} share of correlation",
          cmap="viridis", extent=cell_extent(size, (h, w)))
    axes[0, trace.top_k].set_xlim(-0.5, size[1] - 0.5)
    axes[0, trace.top_k].set_ylim(size[0] - 0.5, -0.5)
    fig.suptitle(f"RankMatch: top-{trace.top_k} agents per feature cell (CutMixed weak view), image {i}",
                 fontsize=10)
    return fig


def rank_distribution_figure(trace: RankMatchTrace, i: int, y: int, x: int, max_bars: int = 24) -> Any:
    """The k! Plackett-Luce distributions (Eq. 6) at pixel ``(y, x)``: weak vs strong bars over the orderings of
    the weak view's top-k agents (the ``max_bars`` most likely under the weak view), and the pixel marked."""
    i = trace.check_image(i)
    r = rank_at(trace, i, y, x)
    order = torch.argsort(r["dist_w"], descending=True, stable=True)[:max_bars]
    labels = [_ordering_label(r["orderings"][o].tolist(), r["agents"].tolist()) for o in order.tolist()]
    fig = plt.figure(figsize=(11, 3.8), layout="constrained")
    grid = fig.add_gridspec(1, 4)
    ax_img = fig.add_subplot(grid[0, 0])
    _show(ax_img, to_hwc(trace.images["weak mixed"][i]), f"pixel ({y}, {x}) -> cell {r['cell']}\nand its top agents")
    size, (h, w) = tuple(trace.valid.shape[-2:]), trace.feat_size
    for a in r["agents"].tolist():
        pos = int(trace.agents[i, a])
        ay, ax_ = cell_position(pos // w, pos % w, size, (h, w))
        ax_img.scatter([ax_], [ay], s=40, marker="o", facecolors="none", edgecolors="yellow", linewidths=1.5)
        ax_img.annotate(f"a{a}", (ax_, ay), xytext=(3, -9), textcoords="offset points", color="yellow", fontsize=8,
                        fontweight="bold")
    _mark(ax_img, y, x, "cyan")
    ax = fig.add_subplot(grid[0, 1:])
    pos = np.arange(len(order))
    ax.bar(pos - 0.2, r["dist_w"][order].numpy(), 0.4, label="weak (target)", color="#1f77b4")
    ax.bar(pos + 0.2, r["dist_s"][order].numpy(), 0.4, label="strong", color="#ff7f0e")
    ax.set_xticks(pos, labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("Plackett-Luce probability", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ws = ", ".join(f"a{int(a)}: {float(v):.3f}/{float(s):.3f}" for a, v, s in
                   zip(r["agents"], r["weights_w"], r["weights_s"]))
    ax.set_title(f"{trace.top_k}! = {len(r['dist_w'])} orderings; KL(weak||strong) here = {r['kl']:.4f}\n"
                 f"top-{trace.top_k} correlations weak/strong: {ws}", fontsize=8)
    fig.suptitle(f"RankMatch rank distributions at one pixel, image {i}", fontsize=10)
    return fig


# --------------------------------------------------------------------------------------------------- widgets


@dataclass
class Control:
    """One widget control of :func:`explore`: an int or float slider (``low``..``high``, ``step``), or a dropdown
    when ``options`` is given; ``value`` is the starting value (the notebook parameter)."""

    value: Any
    low: float | None = None
    high: float | None = None
    step: float | None = None
    options: Sequence[Any] | None = None
    label: str | None = None

    def widget(self, name: str) -> Any:
        """The ipywidgets control."""
        import ipywidgets as W

        desc = self.label or name
        style = {"description_width": "initial"}
        if self.options is not None:
            if self.value not in self.options:
                raise ValueError(f"control {name}: value {self.value!r} is not among the options {list(self.options)}")
            return W.Dropdown(options=list(self.options), value=self.value, description=desc, style=style)
        if self.low is None or self.high is None:
            raise ValueError(f"control {name}: give low and high (a slider) or options (a dropdown)")
        if not self.low <= self.value <= self.high:
            raise ValueError(f"control {name}: value {self.value!r} lies outside [{self.low}, {self.high}]")
        if isinstance(self.value, int) and not isinstance(self.value, bool) and float(self.step or 1).is_integer():
            return W.IntSlider(value=self.value, min=int(self.low), max=int(self.high), step=int(self.step or 1),
                               description=desc, continuous_update=False, style=style)
        return W.FloatSlider(value=float(self.value), min=float(self.low), max=float(self.high),
                             step=float(self.step or 0.01), description=desc, continuous_update=False,
                             readout_format=".3f", style=style)


def _render(draw: Callable[..., Any], values: dict[str, Any], dpi: int) -> None:
    """Display ``draw(**values)``: figures as PNG outputs, anything else (tables) with ``display``."""
    from IPython.display import display

    result = draw(**values)
    for item in result if isinstance(result, (list, tuple)) else [result]:
        if isinstance(item, plt.Figure):
            show(item, dpi)
        elif item is not None:
            display(item)


def explore_widget(draw: Callable[..., Any], controls: dict[str, Control], dpi: int = 110) -> Any:
    """The ipywidgets box of :func:`explore` (controls above an output area), not displayed yet; the output is
    drawn once with the starting values and redrawn whenever a control changes (an error is printed there)."""
    import ipywidgets as W

    if not controls:
        raise ValueError("controls is empty: give at least one Control")
    widgets = {k: c.widget(k) for k, c in controls.items()}
    out = W.Output()

    def redraw(_: Any = None) -> None:
        with out:
            out.clear_output(wait=True)
            try:
                _render(draw, {k: w.value for k, w in widgets.items()}, dpi)
            except Exception as e:
                print(f"{type(e).__name__}: {e}")

    for w in widgets.values():
        w.observe(redraw, names="value")
    redraw()
    return W.VBox([W.HBox(list(widgets.values()), layout=W.Layout(flex_flow="row wrap")), out])


def explore(draw: Callable[..., Any], controls: dict[str, Control], interactive: bool, dpi: int = 110) -> None:
    """Show ``draw(**values)`` (a Figure, or a list of Figures and displayable objects such as Tables).

    ``interactive=False`` (papermill): drawn once with the controls' starting values; figures become PNG outputs.
    ``interactive=True``: :func:`explore_widget`'s controls, displayed, redrawing on every change. Returns None (so a
    notebook cell ending with it shows nothing twice).
    """
    if interactive:
        from IPython.display import display

        display(explore_widget(draw, controls, dpi))
    else:
        _render(draw, {k: c.value for k, c in controls.items()}, dpi)
