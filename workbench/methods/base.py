"""The Method interface: what one training step computes (the engine decides how the loop runs).

A method owns the student model (and its teacher or extra heads) and turns a :class:`SemiBatch` into a
:class:`StepOutput`. Logs are tensors (read by the engine at logging time, so a step never synchronises with the
device); artifacts are filled only when ``step.capture`` is true.

Every method's capture also holds ``features`` / ``feature_labels`` (the dashboard's t-SNE), added by
:meth:`Method.forward` (the call the engine makes) unless the method captured its own ``features``: see
:meth:`Method.feature_artifacts`. Nothing of it is computed or kept at other steps.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from workbench.config import MethodConfig, register_method_config
from workbench.data.transforms import normalize
from workbench.ops import IGNORE
from workbench.ops.grid import grid_labels

METHODS: dict[str, type[Method]] = {}
#: feature maps a capture keeps for the t-SNE: of the first FEATURE_IMAGES images, on at most FEATURE_GRID x
#: FEATURE_GRID cells (nearest subsampling of the network's grid), from the first of FEATURE_KEYS the network returns
FEATURE_IMAGES = 4
FEATURE_GRID = 32
FEATURE_KEYS = ("aspp", "decoder")


@contextlib.contextmanager
def eval_mode(net: nn.Module) -> Iterator[nn.Module]:
    """``net`` in eval mode for the ``with`` block, every submodule's own train/eval flag restored afterwards (also
    on error): the one way the package runs a network in eval mode inside a training step (teacher passes,
    captures)."""
    modes = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        yield net
    finally:
        for m, mode in modes:
            m.training = mode


@dataclass
class SemiBatch:
    """One step's data on the device. Images are normalised float [B,3,h,w]; labels long [B,h,w] (255 = ignore).

    ``ignore``/``ignore_mix`` are 255 on padded pixels of the unlabeled views, 0 elsewhere; ``box1``/``box2`` are bool
    CutMix boxes of the first unlabeled batch. ``y_u``/``y_u_mix`` (unlabeled ground truth) exist only for
    diagnostics: no loss may read them (tests prove it).
    """

    x_l: Tensor
    y_l: Tensor
    x_w: Tensor | None = None
    x_s1: Tensor | None = None
    x_s2: Tensor | None = None
    ignore: Tensor | None = None
    box1: Tensor | None = None
    box2: Tensor | None = None
    x_w_mix: Tensor | None = None
    x_s1_mix: Tensor | None = None
    x_s2_mix: Tensor | None = None
    ignore_mix: Tensor | None = None
    y_u: Tensor | None = None
    y_u_mix: Tensor | None = None
    ids_l: list[str] = field(default_factory=list)
    ids_u: list[str] = field(default_factory=list)
    ids_mix: list[str] = field(default_factory=list)

    @classmethod
    def from_loader(cls, raw: dict[str, Any], device: torch.device, mean: tuple[float, ...],
                    std: tuple[float, ...], channels_last: bool = False) -> SemiBatch:
        """Move a :class:`~workbench.data.dataset.StepDataset` item to ``device``: images normalised, labels long."""
        kw: dict[str, Any] = {}
        names = {f.name for f in fields(cls)}
        for key, value in raw.items():
            if key not in names:
                continue
            if isinstance(value, Tensor):
                value = value.to(device, non_blocking=True)
                if key.startswith("x_"):
                    value = normalize(value, mean, std)
                    if channels_last:
                        value = value.contiguous(memory_format=torch.channels_last)
                elif key.startswith(("y_", "ignore")):
                    value = value.long()
            kw[key] = value
        return cls(**kw)


@dataclass
class StepInfo:
    """Where the loop is: 0-based optimiser step, epoch, schedule length, and whether to capture artifacts."""

    iteration: int
    epoch: int
    total_iters: int
    iters_per_epoch: int
    capture: bool = False


@dataclass
class StepOutput:
    """A step's loss (to backpropagate), logs (scalar tensors or floats) and captured tensors (when capturing)."""

    loss: Tensor
    logs: dict[str, Tensor | float] = field(default_factory=dict)
    artifacts: dict[str, Tensor] = field(default_factory=dict)


#: a step's loss terms by log name: (weight, value); the step's loss is the sum of weight x value
LossTerms = dict[str, tuple[float, Tensor]]
#: terms logged with their weight applied (add-on components such as LCR), every other term logs its value
WEIGHTED_LOGS = ("loss_lcr",)


def weighted_sum(terms: LossTerms) -> Tensor:
    """The loss of ``terms``: the sum of weight x value, in the terms' order."""
    if not terms:
        raise ValueError("terms: a step needs at least one loss term")
    return sum(w * v for w, v in terms.values())


def term_logs(terms: LossTerms) -> dict[str, Tensor]:
    """What a step logs of ``terms``: each value detached (weight x value for :data:`WEIGHTED_LOGS`)."""
    return {k: (w * v if k in WEIGHTED_LOGS else v).detach() for k, (w, v) in terms.items()}


class Method(nn.Module):
    """Base class of every semi-supervised recipe (the interface every method implements)."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    uses_unlabeled: ClassVar[bool] = False

    def __init__(self, model: nn.Module, cfg: MethodConfig, num_classes: int) -> None:
        super().__init__()
        if not isinstance(cfg, self.config_class):
            raise TypeError(f"{type(self).__name__} expects a {self.config_class.__name__}, got {type(cfg).__name__}")
        self.model = model
        self.cfg = cfg
        self.num_classes = num_classes

    def forward(self, batch: SemiBatch, step: StepInfo) -> StepOutput:
        """The step the engine runs (through DDP): :meth:`training_step`, and at a capture step the t-SNE features
        (:meth:`feature_artifacts`) unless the method captured its own ``features``."""
        out = self.training_step(batch, step)
        if step.capture and "features" not in out.artifacts:
            out.artifacts.update(self.feature_artifacts(batch))
        return out

    @torch.no_grad()
    def feature_artifacts(self, batch: SemiBatch) -> dict[str, Tensor]:
        """Pixel features of a capture for the dashboard's t-SNE: ``features`` [n, D, h, w] and ``feature_labels``
        long [n, h, w] (255 = ignore), n <= :data:`FEATURE_IMAGES`, h, w <= :data:`FEATURE_GRID`.

        The images are the first ones of the weak unlabeled view (the labeled view for a method without unlabeled
        data); the network is :meth:`predictor` (the one evaluated: the EMA teacher of a mean teacher) run once more
        on them in eval mode without gradients, so the step's loss, gradients, BatchNorm statistics and random
        state are those of a step without capture (every module's train/eval mode is restored). The features are its
        ``aspp`` map (the ``decoder`` map when there is none); {} when the network returns neither. Labels are the
        images' ground truth (``y_u`` / ``y_l``) when the batch carries it, else the network's prediction, with
        padding (``ignore``) set to 255, read at the feature cells (:func:`~workbench.ops.grid.grid_labels`); grids
        larger than :data:`FEATURE_GRID` are subsampled (nearest) for features and labels alike.
        """
        if self.uses_unlabeled and batch.x_w is not None:
            x, labels, ignore = batch.x_w, batch.y_u, batch.ignore
        else:
            x, labels, ignore = batch.x_l, batch.y_l, None
        n = min(FEATURE_IMAGES, x.shape[0])
        with eval_mode(self.predictor()) as net:
            out = net(x[:n])
        key = next((k for k in FEATURE_KEYS if k in out), None)
        if key is None:
            return {}
        feats = out[key]
        labels = out["logits"].argmax(1) if labels is None else labels[:n].long()
        if ignore is not None:
            labels = labels.masked_fill(ignore[:n] != 0, IGNORE)
        h, w = feats.shape[-2:]
        labels = grid_labels(labels, (h, w))
        if h > FEATURE_GRID or w > FEATURE_GRID:
            rows = torch.arange(min(h, FEATURE_GRID), device=feats.device) * h // min(h, FEATURE_GRID)
            cols = torch.arange(min(w, FEATURE_GRID), device=feats.device) * w // min(w, FEATURE_GRID)
            feats = feats[:, :, rows][..., cols]
            labels = labels[:, rows][..., cols]
        return {"features": feats, "feature_labels": labels}

    def training_step(self, batch: SemiBatch, step: StepInfo) -> StepOutput:
        """Compute the loss of one step."""
        raise NotImplementedError

    def predictor(self) -> nn.Module:
        """The network evaluation runs (returns a dict with "logits"); the student unless overridden."""
        return self.model

    def param_groups(self, lr: float, head_mult: float = 10.0) -> list[dict[str, Any]]:
        """Optimiser groups: backbone at ``lr``, head at ``lr x head_mult``, both poly-decayed.

        A method adds its own groups (e.g. a constant-lr decoder) by extending this list; groups with
        ``"poly": False`` keep their lr.
        """
        return [
            {"params": list(self.model.backbone_parameters()), "lr": lr, "base_lr": lr, "poly": True,
             "name": "backbone"},
            {"params": list(self.model.head_parameters()), "lr": lr * head_mult, "base_lr": lr * head_mult,
             "poly": True, "name": "head"},
        ]

    def after_step(self, step: StepInfo) -> None:
        """Hook after the optimiser step (EMA teachers, thresholds, dictionaries)."""


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register a method under ``cls.name`` (with its config dataclass)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    METHODS[cls.name] = cls
    register_method_config(cls.name, cls.config_class)
    return cls


def build_method(name: str, model: nn.Module, cfg: MethodConfig, num_classes: int) -> Method:
    """Instantiate the registered method ``name``."""
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name](model, cfg, num_classes)
