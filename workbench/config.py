"""Typed run configuration: dataclasses, YAML in/out, dotted overrides, validation.

A run is described by one :class:`RunConfig`. It is built from a YAML file (or a dict, or a notebook's parameters)
plus ``key=value`` overrides with dotted keys (``method.tau=0.9``). Every key is checked: an unknown key, a value of
the wrong type or an impossible combination raises :class:`ConfigError` naming the key and how to fix it.

Validation has one style: each field declares what it accepts, a ``Literal[...]`` type for a choice and
:func:`bounded` for numeric bounds (every number of a tuple field is checked), and :func:`check_fields` enforces the
declarations of every section, including a method's fields (at construction). What one field cannot say (a relation
between fields) is one list of named cross-field checks: :func:`validate` for the sections,
:meth:`MethodConfig.cross_checks` for a method.

The ``method`` section is polymorphic: ``method.name`` picks a registered method, whose own dataclass (a subclass of
:class:`MethodConfig`) defines the remaining keys. Methods register their config with :func:`register_method_config`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from workbench import registry
from workbench.registry import register_method_config  # noqa: F401  (re-exported: methods register here)


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the key and the fix."""


# ---------------------------------------------------------------- field declarations (the one validation style)


@dataclass(frozen=True)
class Bounds:
    """Numeric bounds of a config field (None = unbounded on that side); a tuple field's every number is checked."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def allows(self, v: float) -> bool:
        """Whether the finite number ``v`` lies within the bounds."""
        return (math.isfinite(v) and (self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))

    def text(self) -> str:
        """``must be >= 0 and < 1``-style wording for an error message."""
        parts = [f"{op} {b:g}" for op, b in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                 if b is not None]
        return "must be " + " and ".join(parts)


def bounded(default: Any = dataclasses.MISSING, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field with ``default`` whose value (each number of a tuple) must satisfy the bounds, e.g.
    ``tau: float = bounded(0.95, ge=0, le=1)``; None always passes (optional fields)."""
    return field(default=default, metadata={"bounds": Bounds(ge, gt, le, lt)})


def literal_choices(tp: Any) -> tuple[Any, ...] | None:
    """The allowed values of a ``Literal[...]`` type hint (also inside ``Optional``/``X | None``), else None."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            choices = literal_choices(arg)
            if choices is not None:
                return choices
    return None


@functools.cache
def field_rules(cls: type) -> dict[str, tuple[tuple[Any, ...] | None, Bounds | None]]:
    """``{field: (choices, bounds)}`` of a config dataclass. A subclass that redeclares a field only to change its
    default (``tau: float = 0.9``) keeps the choices and bounds its base declared."""
    rules: dict[str, tuple[tuple[Any, ...] | None, Bounds | None]] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        hints = typing.get_type_hints(klass)
        for f in dataclasses.fields(klass):
            old = rules.get(f.name, (None, None))
            rules[f.name] = (literal_choices(hints[f.name]) or old[0], f.metadata.get("bounds") or old[1])
    return rules


def check_fields(obj: Any, prefix: str = "") -> None:
    """Enforce the field declarations (``Literal`` choices, :func:`bounded` bounds) of a config dataclass and of
    the dataclasses it holds: ConfigError ``<prefix><field>: <what it must be> (got <value>)`` for the first
    violation."""
    rules = field_rules(type(obj))
    for f in dataclasses.fields(obj):
        v, key = getattr(obj, f.name), prefix + f.name
        if dataclasses.is_dataclass(v):
            check_fields(v, key + ".")
            continue
        choices, bounds = rules[f.name]
        if v is None:
            continue
        if choices is not None and (v not in choices or isinstance(v, bool) != isinstance(choices[0], bool)):
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, choices))} (got {v!r})")
        if bounds is not None:
            for x in (v if isinstance(v, (tuple, list)) else (v,)):
                if isinstance(x, bool) or not isinstance(x, (int, float)) or not bounds.allows(x):
                    shown = list(v) if isinstance(v, tuple) else v
                    raise ConfigError(f"{key}: {bounds.text()} (got {shown!r})")


def as_tuples(obj: Any) -> None:
    """Turn the list values of ``obj``'s tuple-typed fields into tuples (values given in Python as lists)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, list) and typing.get_origin(hints[f.name]) is tuple:
            setattr(obj, f.name, tuple(v))


@dataclass
class DataConfig:
    """Dataset, split and augmentation settings."""

    dataset: Literal["synthetic", "prepared"] = "synthetic"
    """``synthetic`` (generated at ``root`` when missing) or ``prepared`` (a dataset root with a manifest.json,
    written by ``workbench data prepare``)."""
    root: str = "data/synthetic"
    """Dataset root directory (holds manifest.json)."""
    split: str = "1-128"
    """Label fraction: the manifest's ``labeled_<split>``/``unlabeled_<split>`` lists; ``all`` = the ``train`` list."""
    val_split: str = "val"
    crop_size: int = bounded(64, gt=0)
    scale_range: tuple[float, float] = bounded((0.5, 2.0), gt=0)
    """Random resize range of the weak transform (factor of the original size)."""
    flip: bool = True
    batch_size: int = bounded(8, gt=0)
    """Labeled images per process per micro-batch."""
    unlabeled_batch_size: int | None = bounded(None, gt=0)
    """Unlabeled images per process per micro-batch (default: ``batch_size``)."""
    num_workers: int = bounded(2, ge=0)
    pin_memory: bool = True
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = bounded((0.229, 0.224, 0.225), gt=0)
    synthetic: dict[str, Any] = field(default_factory=dict)
    """Overrides of :class:`workbench.data.synthetic.SyntheticSpec` fields (synthetic dataset only)."""
    bad_data: Literal["fail", "skip"] = "fail"
    """What to do with an unreadable/corrupt sample: ``fail`` (default, error names the file) or ``skip`` (replaced
    by the next readable sample; every skipped file is named in the run's log and summary.json)."""
    verify: Literal["header", "full", "off"] = "header"
    """Check the dataset's files before any training step: ``header`` (default: every listed image and mask of the
    training and validation splits is opened and its size read, cheap), ``full`` (every file decoded) or ``off``.
    A bad validation file always stops the run; bad training files stop it under ``bad_data=fail`` and are listed
    up front under ``skip``."""
    mix_source: Literal["same_images", "independent"] = "same_images"
    """Where the CutMix mix batch (``x_w_mix``, ``x_s*_mix``) comes from. ``same_images`` (default, the reference
    code: UniMatch and the methods built on its code zip the unlabeled loader with itself, so the mix batch is the
    main batch's images, in the same positions, with a different augmentation; the authors confirm it in UniMatch
    issue #51 and CorrMatch issue #29 on GitHub): a CutMix box pastes another view of the same image.
    ``independent`` (switch): a second, independent draw of unlabeled images, so a box pastes a different image
    (how the papers describe CutMix)."""


@dataclass
class ModelConfig:
    """DeepLabV3+ settings (see :class:`workbench.models.DeepLabV3Plus`)."""

    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = "resnet18"
    stem: Literal["plain", "deep"] = "plain"
    output_stride: Literal[8, 16, 32] = 8
    width: float = bounded(0.25, gt=0)
    head_width: float = bounded(0.25, gt=0)
    aspp_rates: tuple[int, ...] | None = None
    """ASPP dilation rates; None = (6, 12, 18) at output stride 16, doubled at 8. For small crops use rates that
    fit the feature map (the embedded dataset's 64-pixel crops give 8x8 maps at stride 8: rates 2, 4, 6)."""
    pretrained: str | None = None
    """None, a local state-dict file, or a torchvision weights name (``ResNet50_Weights.IMAGENET1K_V1``)."""
    fp_dropout: float = bounded(0.5, ge=0, lt=1)
    channels_last: bool = False
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = "off"
    """``torch.compile`` the segmentation network's forward in place (``nn.Module.compile``, so checkpoints keep
    their keys): ``off``, or a mode ``default`` / ``reduce-overhead`` / ``max-autotune``. Methods that call
    ``encode``/``decode`` directly run those parts uncompiled."""
    compile_backend: str = "inductor"
    """``torch.compile`` backend (``inductor``; ``eager``/``aot_eager`` for debugging, which ignore the mode)."""


@dataclass
class OptimConfig:
    """SGD with poly decay. ``lr`` is the backbone lr for ``reference_batch`` labeled images per optimiser step."""

    lr: float = bounded(0.02, gt=0)
    reference_batch: int = bounded(8, gt=0)
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    """How lr follows the labeled images per optimiser step B (= batch_size x processes x grad_accum):
    ``linear``: lr x B / reference_batch (Goyal et al. 2017); ``sqrt``: lr x sqrt(B / reference_batch); ``none``."""
    head_lr_mult: float = bounded(10.0, gt=0)
    """The head's lr = lr x head_lr_mult."""
    momentum: float = bounded(0.9, ge=0, lt=1)
    weight_decay: float = bounded(1e-4, ge=0)
    poly_power: float = bounded(0.9, ge=0)
    """0 = constant lr (a negative power would raise the lr)."""
    grad_accum: int = bounded(1, ge=1)
    """Micro-batches per optimiser step (for a single GPU with less memory than the papers' 4-8)."""
    amp: Literal["auto", "bf16", "fp16", "off"] = "off"
    """``off`` (fp32, the authors' setting; CUDA still uses TF32 in convolutions), ``bf16`` (autocast on CUDA or
    CPU), ``auto`` (bf16 on CUDA, off on CPU) or ``fp16`` (CUDA, with a gradient scaler). Off by default: on the
    quickstart model bf16 raised the training loss and lowered mIoU in 3 of 3 seeds (reports/bench/amp_curves_cpu.md),
    so it is opt-in until a GPU run of the paper model shows it within noise (benchmarks/amp_curves.py)."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """Non-finite loss or gradients: ``stop`` (error naming step, loss terms and batch ids) or ``skip`` (count).
    The check costs no host synchronisation (except under fp16, where the gradient scaler decides): the optimiser
    skips the update on the device (the fused SGD kernel's ``found_inf`` input; with the per-tensor kernel the step
    is undone on the device from a copy) and the verdict is read at the next logging point, which is where ``stop``
    raises (naming the first bad step) and ``skip`` counts. A skipped step leaves no trace: BatchNorm running
    statistics, EMA teachers and every other buffer are restored to their values before the step (on the device,
    without a host read)."""
    skip_limit: int = bounded(20, ge=0)
    """Under ``nonfinite=skip``: stop (one-line error) once this many consecutive steps were skipped, a diverged run
    (0 = never stop). Read at the same points as the deferred verdict."""
    fused: bool | None = None
    """Fused (one-kernel) SGD: ``null`` = on CUDA and CPU, ``true`` (any device) or ``false`` (the per-tensor loop,
    which keeps one extra copy of the weights and momentum to undo a non-finite step)."""


@dataclass
class TrainConfig:
    """Schedule, logging, checkpointing."""

    epochs: int = bounded(10, ge=0)
    """Epochs over the unlabeled set (supervised-only: over the labeled set)."""
    iters: int | None = bounded(None, gt=0)
    """Total optimiser steps; overrides ``epochs`` when set."""
    eval_every: int = bounded(0, ge=0)
    """Evaluate every N steps (0 = at every epoch end); always at the end."""
    checkpoint_every: int = bounded(0, ge=0)
    """Also checkpoint every N steps (0 = only at epoch ends and at the end)."""
    checkpoint_min_seconds: float = bounded(30.0, ge=0)
    """Skip an epoch-end checkpoint when the last one is younger than this (tiny labeled sets make epochs of a few
    steps); ``checkpoint_every`` and the final checkpoint are always written."""
    log_every: int = bounded(10, gt=0)
    capture_every: int = bounded(0, ge=0)
    """Save the step's tensors (artifacts) every N steps (0 = never)."""
    seed: int = 0
    device: str = "auto"
    threads: int = bounded(0, ge=0)
    """torch CPU threads (0 = leave torch's default)."""
    cudnn_benchmark: bool = True
    """``torch.backends.cudnn.benchmark`` on CUDA (autotuned convolutions for fixed crop sizes)."""
    tensorboard: bool = False
    progress: bool = True


@dataclass
class EvalConfig:
    """Evaluation mode (see :class:`EvalSettings`).

    ``mode``: original, center_crop, sliding, or a mode the configured method provides
    (:attr:`MethodConfig.eval_modes`): ScaleMatch's ``cif_multiscale`` (CIF-fused multi-scale inference; then
    ``scales`` lists the scales fused with scale 1, e.g. [0.5, 2.0], and the method must own a CIF module)."""

    mode: str = "original"
    crop_size: int = bounded(321, gt=0)
    window: int | None = bounded(None, gt=0)
    """Sliding-window side (``mode: sliding``); None = ``crop_size`` (the reference: the training crop)."""
    stride: int | None = bounded(None, gt=0)
    """Sliding-window step; None = int(2/3 of the window) (UniMatch: 534 for 801)."""
    sliding_tiles: Literal["clipped_sum", "shifted_mean"] = "clipped_sum"
    """How ``mode: sliding`` tiles and merges. ``clipped_sum`` (default, UniMatch's evaluation code): tiles start at
    0, stride, 2 x stride, ... while the start lies inside the image (width 2048, window 801: 0, 534, 1068, 1602),
    border tiles are clipped to the image and predicted at their smaller size, and the tiles' softmax
    probabilities are summed. ``shifted_mean`` (switch, this workbench's earlier tiling): the last tile is shifted
    back to end at the border (every tile full-sized, images smaller than the window zero-padded) and overlapping
    logits are averaged; it changes the predictions near the right and bottom borders."""
    scales: tuple[float, ...] = bounded((1.0,), gt=0)
    flip: bool = False
    batch_size: int = bounded(1, gt=0)
    boundary_tolerance: float | None = bounded(None, ge=0, lt=1)
    """Also report the boundary F-score with this tolerance (fraction of the image diagonal; MaskMatch: 0.0003)."""


@dataclass
class MethodConfig:
    """Base of every method's configuration; ``name`` selects the method."""

    name: str = "supervised"
    eval_modes: ClassVar[tuple[str, ...]] = ()
    """The evaluation modes this method adds to the engine's own (:data:`BASE_EVAL_MODES`); each is registered
    with :func:`workbench.registry.register_eval_mode` by the method's module, which implements it."""

    def provides_eval_mode(self, mode: str) -> bool:
        """Whether this configured method serves ``eval.mode=mode`` (one of :attr:`eval_modes`; a method may
        provide a mode only under some settings, e.g. ScaleMatch's ``cif_multiscale`` only with a CIF module)."""
        return mode in self.eval_modes

    def __post_init__(self) -> None:
        as_tuples(self)
        check_fields(self, "method.")
        for ok, key, msg in self.cross_checks():
            if not ok:
                got = f" (got {getattr(self, key)!r})" if hasattr(self, key) else ""
                raise ConfigError(f"method.{key}: {msg}{got}")

    def cross_checks(self) -> list[tuple[bool, str, str]]:
        """``(ok, key, message)`` relations between this method's fields that no single field declaration can
        state (a subclass extends its base's list); each field's own choices and bounds are declared on it."""
        return []


def method_config_class(name: str) -> type[MethodConfig]:
    """The config dataclass registered for method ``name`` (:mod:`workbench.registry`); ConfigError listing the
    known names otherwise."""
    cls = registry.method_config(name)
    if cls is None:
        raise ConfigError(f"method.name: unknown method {name!r}; choose one of {registry.method_names()}")
    return cls


# ---------------------------------------------------------------- evaluation settings


BASE_EVAL_MODES = ("original", "center_crop", "sliding")
"""The engine's own evaluation modes; a method adds its own (:attr:`MethodConfig.eval_modes`)."""
SLIDING_TILES = ("clipped_sum", "shifted_mean")
"""Sliding-window tilings: UniMatch's (clipped border tiles, summed softmax; default) and the shifted-tile mean."""


def whole_image_mode(mode: str) -> bool:
    """Whether ``eval.mode`` predicts each image whole at its own size ("original" and every method-provided mode,
    which the evaluation runs on whole images): a batch then needs images of one size."""
    return mode not in ("center_crop", "sliding")


@dataclass
class EvalSettings:
    """How to evaluate (:func:`workbench.engine.evaluate.evaluate`; built from the ``eval`` section).

    Attributes:
        mode: "original" (whole image), "center_crop" (crop to ``crop_size`` first), "sliding", or a mode a
            method provides (:mod:`workbench.registry`; e.g. ScaleMatch's "cif_multiscale": whole image, fused by
            the predictor's CIF module with the scales of ``scales`` other than 1.0).
        crop_size: crop side for "center_crop", and the default sliding window.
        window: sliding-window side; None = ``crop_size`` (see ``resolved_window``).
        stride: sliding-window step; None = int(2/3 of the window) (see ``resolved_stride``).
        sliding_tiles: ``"clipped_sum"`` (default; UniMatch's tiling: tiles at 0, stride, ... while inside the image,
            border tiles clipped, tile softmaxes summed) or ``"shifted_mean"`` (switch: last tile shifted back to the
            border, small images padded, overlapping logits averaged).
        scales: image scales to average over (1.0 = original size); a method-provided mode reads them its own way
            ("cif_multiscale": the scales fused with scale 1; entries equal to 1.0 are skipped, at least one other
            scale is required).
        flip: also average the horizontally flipped prediction.
        boundary_tolerance: when set, also report the boundary F-score ("boundary_f", see
            :class:`~workbench.engine.metrics.BoundaryFMeter`) with this matching distance, a fraction of the image
            diagonal in [0, 1) (MaskMatch reports 0.0003); None = not computed.
    """
    mode: str = "original"
    crop_size: int = bounded(321, gt=0)
    window: int | None = bounded(None, gt=0)
    stride: int | None = bounded(None, gt=0)
    scales: tuple[float, ...] = bounded((1.0,), gt=0)
    flip: bool = False
    boundary_tolerance: float | None = bounded(None, ge=0, lt=1)
    sliding_tiles: Literal["clipped_sum", "shifted_mean"] = "clipped_sum"

    def __post_init__(self) -> None:
        if isinstance(self.scales, (int, float)):
            raise ConfigError(f"eval.scales: must be a list of numbers (got {self.scales!r})")
        as_tuples(self)
        check_fields(self, "eval.")
        for ok, key, msg in self.cross_checks():
            if not ok:
                raise ConfigError(f"eval.{key}: {msg} (got {getattr(self, key)!r})")

    def cross_checks(self) -> list[tuple[bool, str, str]]:
        """``(ok, key, message)`` relations the field declarations cannot state: a known mode (the engine's or a
        method's, :mod:`workbench.registry`) and that mode's own checks, types the evaluation relies on, and a
        sliding step no longer than the window."""
        extra = None if self.mode in BASE_EVAL_MODES else registry.eval_mode(self.mode)
        known = ", ".join(BASE_EVAL_MODES + tuple(registry.eval_modes()))
        checks = [
            (self.mode in BASE_EVAL_MODES or extra is not None, "mode",
             f"must be one of {known} (a mode after the first three is provided by a method)"),
            (isinstance(self.crop_size, int) and not isinstance(self.crop_size, bool), "crop_size",
             "must be a positive int"),
            (all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in (self.window, self.stride)),
             "window", "window and stride must be positive ints or null"),
            (len(self.scales) > 0, "scales", "must be a non-empty list of positives"),
            (isinstance(self.flip, bool), "flip", "must be true or false"),
        ]
        if not all(ok for ok, _, _ in checks):
            return checks
        checks.append((self.resolved_stride <= self.resolved_window, "stride",
                       f"({self.resolved_stride}) must not exceed the window ({self.resolved_window})"))
        problem = extra.check(self) if extra is not None else None
        if problem is not None:
            checks.append((False, problem[0], problem[1]))
        return checks

    @property
    def resolved_window(self) -> int:
        """The sliding window side actually used: ``window`` or, when None, ``crop_size``."""
        return self.window if self.window is not None else self.crop_size

    @property
    def resolved_stride(self) -> int:
        """The sliding step actually used: ``stride`` or, when None, int(2/3 * window) (at least 1)."""
        return self.stride if self.stride is not None else max(1, self.resolved_window * 2 // 3)


@dataclass
class RunConfig:
    """A whole run: where it writes, data, model, optimiser, schedule, evaluation and method."""

    name: str = "run"
    out_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    method: MethodConfig = field(default_factory=MethodConfig)

    @property
    def run_dir(self) -> Path:
        """``out_dir/name``."""
        return Path(self.out_dir) / self.name


# ---------------------------------------------------------------- conversion


def _check_value(value: Any, tp: Any, key: str) -> Any:
    """Convert/check a YAML value against a type hint; ConfigError naming ``key`` on mismatch."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and all(isinstance(c, str) for c in choices):
            value = "on" if value else "off"  # YAML 1.1 reads off/on as booleans: `--set optim.amp=off`
        if value in choices and isinstance(value, bool) == isinstance(choices[0], bool):
            return value
        raise ConfigError(f"{key}: must be one of {', '.join(map(str, choices))} (got {value!r})")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_value(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)} ({value!r})")
        return tuple(_check_value(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        (arg,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_value(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads off/on (and no/yes) as booleans: `--set optim.amp=off`
            value = "on" if value else "off"
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys (named with their dotted path)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(
                f"{prefix}{key}: unknown key; valid keys of {prefix.rstrip('.') or 'the config'} are {sorted(names)}"
            )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        value = data[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, value, f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _check_value(value, tp, f"{prefix}{f.name}")
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Build and validate a :class:`RunConfig` from a plain mapping (e.g. parsed YAML)."""
    data = dict(data or {})
    method = dict(data.pop("method", None) or {})
    cfg = _build(RunConfig, data, "")
    name = method.get("name", "supervised")
    if not isinstance(name, str):
        raise ConfigError(f"method.name: expected a string, got {name!r}")
    cfg.method = _build(method_config_class(name), method, "method.")
    validate(cfg)
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (tuples become lists), suitable for YAML/JSON."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``"a.b=value"`` into (["a", "b"], value parsed as YAML: numbers, booleans, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. method.tau=0.9")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot parse value: {e}") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Apply dotted overrides (``["a.b=1"]`` or ``{"a.b": 1}``) to a nested dict, returning a new dict."""
    import copy

    out = copy.deepcopy(data)
    items = (
        [parse_override(o) for o in overrides] if isinstance(overrides, list)
        else [(k.split("."), v) for k, v in overrides.items()]
    )
    for path, value in items:
        node = out
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"{'.'.join(path)}: {part!r} is not a section")
            node = nxt
        node[path[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> RunConfig:
    """Load a YAML config file (or start from defaults when ``path`` is None) and apply dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p}: invalid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p}: expected a mapping at the top level")
    if overrides:
        data = apply_overrides(data, overrides)
    return config_from_dict(data)


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML text (the run directory's config.yaml)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def validate(cfg: RunConfig) -> None:
    """Reject impossible values and combinations before any work starts (ConfigError names key and fix)."""
    d, t, e = cfg.data, cfg.train, cfg.eval
    bad_name = check_run_name(cfg.name)
    extra = None if e.mode in BASE_EVAL_MODES else registry.eval_mode(e.mode)
    check_fields(cfg)  # every field's declared choices and bounds (the method's were checked when it was built)
    checks = [  # what no single field declaration can state
        (bad_name is None, "name", f"{bad_name}"),
        (_valid_device(t.device), "train.device", "must be auto, cpu, cuda or cuda:<index>"),
        (d.scale_range[0] <= d.scale_range[1], "data.scale_range", "must be [low, high] with 0 < low <= high"),
        (t.epochs > 0 or (t.iters or 0) > 0, "train.epochs", "set train.epochs or train.iters to a positive number"),
        (extra is None or cfg.method.provides_eval_mode(e.mode), "eval.mode",
         f"{e.mode} needs {extra.requirement if extra else ''} (method.name is {cfg.method.name!r})"),
    ]
    for ok, key, msg in checks:
        if not ok:
            raise ConfigError(f"{key}: {msg} (got {_get(cfg, key)!r})")
    _check_eval(cfg.eval)
    _check_finite(cfg, "")


def _check_eval(e: EvalConfig) -> None:
    """The eval section through the evaluation's own settings (:class:`EvalSettings`: declared fields, the mode
    and its own checks, stride within the window), at load time."""
    EvalSettings(mode=e.mode, crop_size=e.crop_size, window=e.window, stride=e.stride, scales=tuple(e.scales),
                 flip=e.flip, boundary_tolerance=e.boundary_tolerance, sliding_tiles=e.sliding_tiles)


def _check_finite(node: Any, prefix: str) -> None:
    """No NaN or infinite number anywhere in the config (``.nan``/``.inf`` in YAML)."""
    import math

    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            _check_finite(getattr(node, f.name), f"{prefix}{f.name}.")
    elif isinstance(node, (list, tuple)):
        for i, x in enumerate(node):
            _check_finite(x, f"{prefix.rstrip('.')}[{i}].")
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{prefix.rstrip('.')}: must be a finite number (got {node!r})")


def check_run_name(name: str) -> str | None:
    """Why ``name`` cannot name a run directory (path separators, ``..``, hidden, empty), or None when it can."""
    if not name or not name.strip():
        return "must not be empty"
    if "/" in name or "\\" in name or "\0" in name:
        return "must not contain a path separator ('/' or '\\'): a run lives directly under out_dir"
    if name in (".", "..") or name.startswith("."):
        return "must not be '.' or '..' or start with '.' (hidden)"
    return None


def _valid_device(name: str) -> bool:
    if name == "auto":
        return True
    import torch

    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        return False
    return True


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg
