"""ScaleMatch (AAAI; seed 002): cross-scale interaction fusion (CIF) and scale-variation consistency (ISVC, FSVC).

One training step (METHODS.md "ScaleMatch"; paper Eqs. 4-17; the authors' ``ScaleMatch.py`` for what the paper
leaves open):

1. the mix batch is predicted in eval mode without gradients (its pseudo-labels fill the CutMix box, as in UniMatch);
2. an image scale ``v`` is drawn from ``scales`` (V = 0.25, 0.5, 1.5, 2.0; one per iteration, torch's global RNG)
   and a feature scale ``t`` from ``feature_scales_down`` (0.75) when ``v > 1``, else ``feature_scales_up`` (1.25);
3. ``cat(x_l, x_w)`` is encoded and decoded at scale 1, and (ISVC or CIF on) predicted again after a bilinear resize
   by ``v``; the scale-``v`` logits are resized back to the crop (``logits_vw``);
4. **CIF** (``cif: true, fusion: cif``, :class:`CrossScaleFusion`): the scale-``v`` decoder features, resized to the
   scale-1 decoder size, are concatenated with the scale-1 ones, compressed by a 1x1 conv, passed through
   Vision-RWKV blocks over the flattened tokens, LayerNorm, reshaped, resized to the crop, channel attention (SE),
   depthwise 3x3 conv; ``s_w = sigmoid(conv1x1(relu(bn(.))))``, ``s_v = 1 - s_w``;
   ``fused = s_w * logits_w + s_v * logits_vw`` (the reference code gates logits). ``fusion: average`` uses
   ``s_w = 1/2`` (Table 6's "Average Fusion"); ``cif: false`` fuses nothing;
5. the labeled loss is the CE of the **fused** labeled logits (so the CIF is trained with the GT; the reference code
   supervises only the fused prediction), or of the plain ones without fusion;
6. pseudo-labels (argmax/max of the softmax) come from the plain weak prediction during the first
   ``cif_warmup_epochs`` epochs (``StepInfo.epoch``), from the fused one after;
7. ``L_s``: CE of the CutMixed strong view (one strong view, FixMatch-style) against the CutMixed targets;
   ``L_ISVC`` (Eq. 14): CE of ``logits_vw`` of the unlabeled half against the pseudo-label; ``L_FSVC`` (Eq. 16): the
   encoder features (layer1 and layer4) of the weak view are resized by ``t``, decoded together with a
   Dropout2d(``model.fp_dropout`` = 0.5)-perturbed copy (UniMatch's joint decode; the perturbed half is used), the
   logits resized back and compared with the pseudo-label. All three are confidence-masked (``tau``, the confidence
   of the pseudo-label's source, as in the reference code) and normalised by the non-ignored pixels;
8. ``loss = (w_x L_x + w_s L_s + w_isvc L_ISVC + w_fsvc L_FSVC) / 2`` (0.25/0.25/0.5 and the halving as in the
   reference code), plus the opt-in components of every weak-to-strong method (LCR).

Ablations: Table 4 = ``isvc`` / ``fsvc`` / ``cif``; Table 5 = ``scales`` (and ``scale_sampling: uniform`` for the
"[0.5, 2.0] random" row; ``scale_sampling: all`` = multi-resolution input, every scale every iteration, losses and
fused logits averaged over scales); Table 6 = ``cif`` / ``fusion`` / ``cif_warmup_epochs``.

**Tiny crops**: a scaled image side is ``max(min_scaled_size, int(side * v + 0.5))``: with the default 16 px, a
32-px crop at v = 0.25 is predicted at 16 px (the effective scale is then 0.5), so the backbone never sees a map
smaller than 2 x 2 at output stride 8 (BatchNorm needs more than one value per channel). Feature maps resized by
``t`` keep at least one cell.

**Inference (the paper's dagger rows)**: ``eval.mode: cif_multiscale`` with ``eval.scales: [0.5, 2.0]``; the
evaluation opens :func:`cif_multiscale_inference` and the :class:`ScaleMatchPredictor` then returns, for every image,
the mean over the extra scales of the CIF fusion of the scale-1 and the scale-``v`` prediction.

Artifacts (``step.capture``), besides the weak-to-strong ones (``pseudo`` is the pseudo-label used): ``scale`` [S]
(the scales of this step), ``feature_scale`` [1], ``pred_w`` [B, H, W] (plain weak prediction), ``pred_v``
[B, S, H, W] (scale-v predictions resized back), ``gate_w`` [B, S, H, W] (``s_w``; with fusion), ``pseudo_fused``,
``pseudo_plain`` [B, H, W] (with fusion) and ``pred_fsvc`` [B, H, W] (with FSVC).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workbench.engine.syncs import host_scalar
from workbench.methods.base import SemiBatch, StepInfo, StepOutput, register_method
from workbench.methods.fixmatch import FixMatchConfig, Targets, WeakStrong
from workbench.methods.supervised import supervised_loss
from workbench.ops.ensemble import resize_logits
from workbench.ops.rwkv import VisionRWKV
from workbench.ops.semi import IGNORE, pseudo_label

__all__ = ["CIFInferenceRequest", "CrossScaleFusion", "ScaleMatch", "ScaleMatchConfig", "ScaleMatchPredictor",
           "SqueezeExcite", "cif_multiscale_inference", "fuse_predictions", "gated_fusion", "scaled_image",
           "scaled_image_size"]

SCALE_SAMPLING = ("choice", "uniform", "all")
FUSIONS = ("cif", "average")


# ---------------------------------------------------------------- pure helpers


def gated_fusion(s_w: Tensor, logits_w: Tensor, logits_vw: Tensor) -> tuple[Tensor, Tensor]:
    """Eq. 12: ``(s_w * logits_w + s_v * logits_vw, s_v)`` with ``s_v = 1 - s_w``.

    ``s_w`` [B, 1, H, W] (or a float) broadcasts over the classes of ``logits_w``/``logits_vw`` [B, K, H, W].
    """
    if logits_w.shape != logits_vw.shape:
        raise ValueError(f"logits_w {tuple(logits_w.shape)} and logits_vw {tuple(logits_vw.shape)} must match")
    s_v = 1 - s_w
    return s_w * logits_w + s_v * logits_vw, s_v


def scaled_image_size(size: Sequence[int], scale: float, min_size: int = 16) -> tuple[int, int]:
    """``(max(min_size, int(H * scale + 0.5)), max(min_size, int(W * scale + 0.5)))`` for ``size = (H, W)``."""
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 1:
        raise ValueError(f"min_size must be a positive int, got {min_size!r}")
    return tuple(max(min_size, int(int(s) * scale + 0.5)) for s in size)  # type: ignore[return-value]


def scaled_image(x: Tensor, scale: float, min_size: int = 16) -> Tensor:
    """Images [B, 3, H, W] resized bilinearly (align_corners=True) to :func:`scaled_image_size`."""
    size = scaled_image_size(x.shape[-2:], scale, min_size)
    if size == tuple(x.shape[-2:]):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def _resize_features(f: Tensor, scale: float) -> Tensor:
    size = tuple(max(1, int(s * scale + 0.5)) for s in f.shape[-2:])
    return f if size == tuple(f.shape[-2:]) else F.interpolate(f, size=size, mode="bilinear", align_corners=True)


# ---------------------------------------------------------------- the CIF module


class SqueezeExcite(nn.Module):
    """Channel attention: ``x * sigmoid(conv(relu(conv(avgpool(x)))))`` with ``channels // reduction`` hidden."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True),
                                nn.Conv2d(hidden, channels, 1), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, C, H, W] (each channel rescaled by its attention weight)."""
        return x * self.fc(x)


class CrossScaleFusion(nn.Module):
    """CIF (Fig. 3): VCFI (concat, 1x1 compress, Vision-RWKV, LayerNorm) and SAG (resize, SE, depthwise conv, gate).

    Args:
        in_channels: channels of the decoder features of each scale.
        dim: width after the 1x1 compression (the Vision-RWKV width).
        depth: Vision-RWKV blocks.
        chunk: WKV chunk length (see :func:`workbench.ops.rwkv.wkv`).
        se_reduction: channel-attention reduction.
    """

    def __init__(self, in_channels: int, dim: int = 64, depth: int = 1, chunk: int = 16, se_reduction: int = 4
                 ) -> None:
        super().__init__()
        for key, value in (("in_channels", in_channels), ("dim", dim), ("depth", depth),
                           ("se_reduction", se_reduction)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive int, got {value!r}")
        self.compress = nn.Conv2d(2 * in_channels, dim, 1)
        self.rwkv = VisionRWKV(dim, depth, chunk)
        self.norm = nn.LayerNorm(dim)
        self.attention = SqueezeExcite(dim, se_reduction)
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.gate = nn.Sequential(nn.BatchNorm2d(dim), nn.ReLU(inplace=True), nn.Conv2d(dim, 1, 1))

    def gate_map(self, feat_w: Tensor, feat_v: Tensor, size: Sequence[int]) -> Tensor:
        """``s_w`` [B, 1, *size] in (0, 1) from the scale-1 features ``feat_w`` [B, C, h, w] and the scale-v features
        ``feat_v`` [B, C, h_v, w_v] (resized to h x w first, Eq. 6)."""
        if feat_w.dim() != 4 or feat_v.dim() != 4 or feat_w.shape[:2] != feat_v.shape[:2]:
            raise ValueError(f"feat_w and feat_v must be [B, C, h, w] with equal B and C, got "
                             f"{tuple(feat_w.shape)} and {tuple(feat_v.shape)}")
        h, w = feat_w.shape[-2:]
        if feat_v.shape[-2:] != (h, w):
            feat_v = F.interpolate(feat_v, size=(h, w), mode="bilinear", align_corners=True)
        e = self.compress(torch.cat([feat_w, feat_v], 1))                         # Eqs. 7-8
        b, d = e.shape[:2]
        tokens = self.norm(self.rwkv(e.flatten(2).transpose(1, 2), (h, w)))      # Eq. 9
        e = tokens.transpose(1, 2).reshape(b, d, h, w)
        e = F.interpolate(e, size=tuple(size), mode="bilinear", align_corners=True)
        e = self.dwconv(self.attention(e))                                         # Eq. 10
        return torch.sigmoid(self.gate(e))                                         # Eq. 11

    def forward(self, feat_w: Tensor, feat_v: Tensor, logits_w: Tensor, logits_vw: Tensor) -> tuple[Tensor, Tensor]:
        """(fused logits [B, K, H, W] (Eq. 12), ``s_w`` [B, 1, H, W]) for logits of both scales at the crop size."""
        s_w = self.gate_map(feat_w, feat_v, logits_w.shape[-2:])
        return gated_fusion(s_w, logits_w, logits_vw)[0], s_w


def fuse_predictions(cif: CrossScaleFusion | None, feat_w: Tensor, logits_w: Tensor,
                     branches: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, list[Tensor]]:
    """Fuse the scale-1 prediction with each scale-v branch ``(logits_vw, feat_v)`` and average over branches.

    ``cif`` None = average fusion (``s_w = 1/2``). Returns (fused logits [B, K, H, W], the gates ``s_w`` per branch,
    each [B, 1, H, W]).
    """
    if not branches:
        raise ValueError("fusion needs at least one scale-v branch")
    fused, gates = [], []
    for logits_vw, feat_v in branches:
        if cif is None:
            s_w = torch.full_like(logits_w[:, :1], 0.5)
            f = gated_fusion(s_w, logits_w, logits_vw)[0]
        else:
            f, s_w = cif(feat_w, feat_v, logits_w, logits_vw)
        fused.append(f)
        gates.append(s_w)
    return (fused[0] if len(fused) == 1 else torch.stack(fused).mean(0)), gates


# ---------------------------------------------------------------- CIF multi-scale inference


@dataclass
class CIFInferenceRequest:
    """An open ``cif_multiscale`` evaluation: the extra scales to fuse with scale 1, and how many predictor calls
    served it (0 after a call = the network evaluated has no CIF)."""

    scales: tuple[float, ...]
    served: int = 0


_CIF_REQUEST: ContextVar[CIFInferenceRequest | None] = ContextVar("cif_inference_request", default=None)


@contextlib.contextmanager
def cif_multiscale_inference(scales: Sequence[float]) -> Iterator[CIFInferenceRequest]:
    """Within this context a :class:`ScaleMatchPredictor` returns CIF-fused multi-scale logits (``scales`` = the
    extra scales fused with scale 1; the paper uses 0.5 and 2.0). Yields the request (check ``served``)."""
    scales = tuple(float(s) for s in scales)
    if not scales or not all(s > 0 for s in scales):
        raise ValueError(f"scales must be a non-empty sequence of positive numbers, got {scales!r}")
    request = CIFInferenceRequest(scales)
    token = _CIF_REQUEST.set(request)
    try:
        yield request
    finally:
        _CIF_REQUEST.reset(token)


class ScaleMatchPredictor(nn.Module):
    """What ScaleMatch evaluates: the student's prediction, or inside :func:`cif_multiscale_inference` the mean over
    the requested scales ``v`` of the CIF fusion of the scale-1 and scale-v predictions (scaled images as in
    training: :func:`scaled_image` with ``min_size``). The fused logits replace ``"logits"``; the plain ones are
    kept as ``"logits_plain"``."""

    def __init__(self, model: nn.Module, cif: CrossScaleFusion, min_size: int = 16) -> None:
        super().__init__()
        self.model = model
        self.cif = cif
        self.min_size = min_size

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Predict images ``x`` [B, 3, H, W] (dict with ``"logits"`` [B, K, H, W] and the model's features)."""
        out = self.model(x)
        request = _CIF_REQUEST.get()
        if request is None:
            return out
        request.served += 1
        size = x.shape[-2:]
        branches = []
        for v in request.scales:
            out_v = self.model(scaled_image(x, v, self.min_size))
            branches.append((resize_logits(out_v["logits"], size), out_v["decoder"]))
        fused, _ = fuse_predictions(self.cif, out["decoder"], out["logits"], branches)
        return {**out, "logits": fused, "logits_plain": out["logits"]}


# ---------------------------------------------------------------- the method


@dataclass
class ScaleMatchConfig(FixMatchConfig):
    """ScaleMatch (module docstring). ``tau`` 0.95; ``scales`` V; ``scale_sampling``: ``choice`` (one scale of V per
    iteration), ``uniform`` (one scale uniform in [min V, max V]) or ``all`` (every scale each iteration: the
    multi-resolution-input baseline of Table 5); ``feature_scales_down`` / ``feature_scales_up``: the FSVC factors
    drawn from when the image scale is > 1 / <= 1; ``isvc``, ``fsvc``, ``cif`` switch the components (Table 4);
    ``fusion`` ``cif`` or ``average`` (Table 6); ``cif_warmup_epochs`` before pseudo-labels come from the fusion;
    ``weight_*`` the loss weights (the total is halved); ``min_scaled_size`` the smallest scaled image side (px);
    ``cif_dim``, ``cif_depth``, ``cif_chunk``, ``cif_se_reduction`` shape the CIF module."""

    name: str = "scalematch"
    tau: float = 0.95
    scales: tuple[float, ...] = (0.25, 0.5, 1.5, 2.0)
    scale_sampling: str = "choice"
    feature_scales_down: tuple[float, ...] = (0.75,)
    feature_scales_up: tuple[float, ...] = (1.25,)
    isvc: bool = True
    fsvc: bool = True
    cif: bool = True
    fusion: str = "cif"
    cif_warmup_epochs: int = 10
    weight_x: float = 1.0
    weight_s: float = 0.25
    weight_isvc: float = 0.25
    weight_fsvc: float = 0.5
    min_scaled_size: int = 16
    cif_dim: int = 64
    cif_depth: int = 1
    cif_chunk: int = 16
    cif_se_reduction: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        self.scales = tuple(self.scales)
        self.feature_scales_down = tuple(self.feature_scales_down)
        self.feature_scales_up = tuple(self.feature_scales_up)

        def positive(values: tuple[float, ...]) -> bool:
            return bool(values) and all(v > 0 for v in values)

        checks = [
            (0.0 <= self.tau <= 1.0, "tau", "must lie in [0, 1]"),
            (positive(self.scales), "scales", "must be a non-empty list of positive scale factors"),
            (self.scale_sampling in SCALE_SAMPLING, "scale_sampling", f"must be one of {', '.join(SCALE_SAMPLING)}"),
            (positive(self.feature_scales_down), "feature_scales_down", "must be a non-empty list of positives"),
            (positive(self.feature_scales_up), "feature_scales_up", "must be a non-empty list of positives"),
            (self.fusion in FUSIONS, "fusion", f"must be one of {', '.join(FUSIONS)}"),
            (self.cif_warmup_epochs >= 0, "cif_warmup_epochs", "must be >= 0"),
            *((getattr(self, key) >= 0, key, "must be >= 0") for key in
              ("weight_x", "weight_s", "weight_isvc", "weight_fsvc")),
            (self.min_scaled_size >= 1, "min_scaled_size", "must be a positive number of pixels"),
            (self.cif_dim >= 1, "cif_dim", "must be positive"),
            (self.cif_depth >= 1, "cif_depth", "must be positive"),
            (self.cif_chunk >= 2, "cif_chunk", "must be >= 2"),
            (self.cif_se_reduction >= 1, "cif_se_reduction", "must be positive"),
        ]
        self.check(checks)

    @property
    def has_cif(self) -> bool:
        """Whether the method owns a CIF module (fusion on and learned): what ``eval.mode=cif_multiscale`` needs."""
        return self.cif and self.fusion == "cif"

    @property
    def scale_branch(self) -> bool:
        """Whether a step predicts the scaled weak view (needed by ISVC and by the fusion)."""
        return self.isvc or self.cif


def decoder_channels(model: nn.Module) -> int:
    """Channels of a DeepLabV3+ model's decoder features (``model.head.channels``); TypeError otherwise."""
    try:
        return int(model.head.channels)
    except AttributeError:
        raise TypeError(f"ScaleMatch's CIF needs a DeepLabV3Plus (head.channels), got {type(model).__name__}") from None


@register_method
class ScaleMatch(WeakStrong):
    """ScaleMatch: FixMatch-style weak-to-strong + ISVC + FSVC + CIF-fused pseudo-labels (teacher = student)."""

    name = "scalematch"
    config_class = ScaleMatchConfig
    cfg: ScaleMatchConfig

    def __init__(self, model: nn.Module, cfg: ScaleMatchConfig, num_classes: int) -> None:
        super().__init__(model, cfg, num_classes)
        self.cif: CrossScaleFusion | None = None
        if cfg.has_cif:
            self.cif = CrossScaleFusion(decoder_channels(model), cfg.cif_dim, cfg.cif_depth, cfg.cif_chunk,
                                        cfg.cif_se_reduction)

    def param_groups(self, lr: float, head_mult: float = 10.0) -> list[dict[str, Any]]:
        """The model's groups, with the CIF module in the (10x lr) head group."""
        groups = super().param_groups(lr, head_mult)
        if self.cif is not None:
            next(g for g in groups if g["name"] == "head")["params"] += list(self.cif.parameters())
        return groups

    def predictor(self) -> nn.Module:
        """The student, wrapped (when a CIF exists) so that ``eval.mode=cif_multiscale`` gets fused logits."""
        if self.cif is None:
            return self.model
        return ScaleMatchPredictor(self.model, self.cif, self.cfg.min_scaled_size)

    def sample_scales(self) -> list[float]:
        """This step's image scales (torch's global RNG): one of V (``choice``), one uniform in [min V, max V]
        (``uniform``) or all of V (``all``)."""
        c = self.cfg
        if c.scale_sampling == "all":
            return list(c.scales)
        if c.scale_sampling == "uniform":
            lo, hi = min(c.scales), max(c.scales)
            return [lo + (hi - lo) * host_scalar(torch.rand(()))]
        return [c.scales[host_scalar(torch.randint(len(c.scales), ()))]]

    def sample_feature_scale(self, scale: float) -> float:
        """The FSVC feature scale for image scale ``scale``: drawn from ``feature_scales_down`` when ``scale > 1``,
        else from ``feature_scales_up`` (no draw when the list holds one value)."""
        options = self.cfg.feature_scales_down if scale > 1 else self.cfg.feature_scales_up
        return options[host_scalar(torch.randint(len(options), ()))] if len(options) > 1 else options[0]

    def fsvc_logits(self, feats: dict[str, Tensor], scale: float, size: Sequence[int]) -> Tensor:
        """Eqs. 15-16: the low/high encoder features resized by ``scale``, decoded jointly with a
        Dropout2d(``model.fp_dropout``) copy; the perturbed half's logits at ``size``."""
        p = float(getattr(self.model, "fp_dropout", 0.5))
        both = {}
        for key in ("low", "high"):
            f = _resize_features(feats[key], scale)
            both[key] = torch.cat([f, F.dropout2d(f, p, training=True)])
        return self.model.decode(both, tuple(size))["logits"].chunk(2)[1]

    def training_step(self, batch: SemiBatch, step: StepInfo) -> StepOutput:
        c = self.cfg
        n = batch.x_l.shape[0]
        mix = self.mix_targets(batch)
        x = torch.cat([batch.x_l, batch.x_w])
        size = tuple(x.shape[-2:])
        scales = self.sample_scales()
        t = self.sample_feature_scale(max(scales)) if c.fsvc else None

        feats = self.model.encode(x)
        out = self.model.decode(feats, size)
        logits = out["logits"]
        branches: list[tuple[Tensor, Tensor]] = []
        if c.scale_branch:
            for v in scales:
                out_v = self.model(scaled_image(x, v, c.min_scaled_size))
                branches.append((resize_logits(out_v["logits"], size), out_v["decoder"]))
        fused, gates = None, []
        if c.cif:
            fused, gates = fuse_predictions(self.cif, out["decoder"], logits, branches)

        loss_x = supervised_loss(c, (fused if fused is not None else logits)[:n], batch.y_l)
        plain = Targets(*pseudo_label(logits[n:]), batch.ignore)
        use_fused = fused is not None and step.epoch >= c.cif_warmup_epochs
        weak = Targets(*pseudo_label(fused[n:]), batch.ignore) if use_fused else plain
        x_s = self.strong_view(batch.x_s1, batch.x_s1_mix, batch.box1)
        logits_s = self.model(x_s)["logits"]
        terms: dict[str, tuple[float, Tensor]] = {
            "loss_x": (c.weight_x, loss_x),
            "loss_s": (c.weight_s, self.unsup_loss(logits_s, self.mixed_targets(weak, mix, batch.box1))),
        }
        if c.isvc:
            isvc = [self.unsup_loss(lv[n:], weak) for lv, _ in branches]
            terms["loss_isvc"] = (c.weight_isvc, isvc[0] if len(isvc) == 1 else torch.stack(isvc).mean())
        logits_fp = None
        if c.fsvc:
            logits_fp = self.fsvc_logits({k: feats[k][n:] for k in ("low", "high")}, t, size)
            terms["loss_fsvc"] = (c.weight_fsvc, self.unsup_loss(logits_fp, weak))
        extra, extra_arts = self.component_outputs(batch, weak, step)
        loss = sum(w * v for w, v in terms.values()) / 2 + sum(extra.values())

        logs: dict[str, Tensor | float] = {key: v.detach() for key, (_, v) in terms.items()}
        logs.update(self.diagnostics(weak, batch))
        if c.scale_branch:
            logs["scale"] = max(scales)
        if t is not None:
            logs["feature_scale"] = t
        if fused is not None:
            fused_t = Targets(*pseudo_label(fused[n:]), batch.ignore)
            logs["pl_fused"] = float(use_fused)
            logs.update({f"{k}_plain": v for k, v in self.diagnostics(plain, batch).items()})
            logs.update({f"{k}_fused": v for k, v in self.diagnostics(fused_t, batch).items()})
            valid = (batch.ignore != IGNORE).float()
            gate = gates[0][n:, 0].detach().float()
            logs["gate_mean"] = (gate * valid).sum() / valid.sum().clamp(min=1)
        logs.update({k: v.detach() for k, v in extra.items()})

        arts: dict[str, Tensor] = {}
        if step.capture:
            arts = self.capture(batch, weak, x_s, logits_s, **extra_arts)
            arts["pred_w"] = logits[n:].argmax(1)
            if branches:
                arts["scale"] = torch.tensor(scales, dtype=torch.float32)
                arts["pred_v"] = torch.stack([lv[n:].argmax(1) for lv, _ in branches], 1)
            if fused is not None:
                arts["gate_w"] = torch.stack([g[n:, 0] for g in gates], 1)
                arts["pseudo_fused"] = fused[n:].argmax(1)
                arts["pseudo_plain"] = plain.pseudo
            if logits_fp is not None:
                arts["feature_scale"] = torch.tensor([t], dtype=torch.float32)
                arts["pred_fsvc"] = logits_fp.argmax(1)
        return StepOutput(loss, logs, arts)
