"""CorrMatch's dynamic confidence threshold (CorrMatch, CVPR 2024, Sec. 3.4, Eq. 11).

Each iteration, over the classes predicted on the weak view (argmax, ignored pixels excluded), take each class's
maximum confidence (max softmax probability), average those maxima over the classes, and move the threshold towards
that average with an exponential moving average: ``tau <- m * tau + (1 - m) * mean_l max_{p: pred_p = l} conf_p``.
Under ``torch.distributed`` the per-class maxima are combined across processes first (all-reduce MAX), which equals
computing them on the gathered batch as the authors' code does, so every process holds the same threshold.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["DynamicThreshold", "class_max_confidence"]


def class_max_confidence(logits: Tensor, ignore_mask: Tensor | None = None, ignore_index: int = 255) -> Tensor:
    """Per-class maximum confidence over the pixels predicted as that class.

    Args:
        logits: float ``[B, K, H, W]`` raw segmentation logits (softmax over ``K`` is applied here).
        ignore_mask: optional ``[B, H, W]``; bool (True = ignored) or integer (``== ignore_index`` = ignored).
        ignore_index: the ignored value of an integer ``ignore_mask``.

    Returns:
        float32 ``[K]``: for each class ``l``, ``max softmax prob`` over the non-ignored pixels whose argmax is ``l``,
        or ``-1`` when no such pixel exists (the class was not predicted).
    """
    if not isinstance(logits, Tensor) or logits.dim() != 4 or not logits.is_floating_point():
        raise ValueError(f"logits must be a float [B, K, H, W] tensor, got {getattr(logits, 'shape', logits)!r}")
    conf, pred = logits.detach().float().softmax(dim=1).max(dim=1)
    if ignore_mask is not None:
        if not isinstance(ignore_mask, Tensor) or ignore_mask.shape != pred.shape:
            raise ValueError(f"ignore_mask must be a [B, H, W] tensor matching logits, got "
                             f"{getattr(ignore_mask, 'shape', ignore_mask)!r}")
        ignore_mask = ignore_mask.to(pred.device)
        keep = ~ignore_mask if ignore_mask.dtype == torch.bool else ignore_mask != ignore_index
        # ignored pixels take confidence -1, the initial value of every maximum, so they never raise one (a
        # softmax maximum is > 0); masking instead of selecting keeps the shapes fixed: no host synchronisation
        conf = torch.where(keep, conf, -1.0)
    maxima = torch.full((logits.shape[1],), -1.0, device=logits.device)
    return maxima.scatter_reduce(0, pred.reshape(-1), conf.reshape(-1), reduce="amax", include_self=True)


class DynamicThreshold(nn.Module):
    """EMA confidence threshold of CorrMatch, kept in a buffer so it is saved in ``state_dict``.

    Args:
        init: starting threshold (the paper uses 0.85).
        momentum: EMA momentum ``m`` (0.999 in the paper).

    Attributes:
        value: float32 0-d buffer, the current threshold (compare confidences with ``>=`` it, as the authors do).
    """

    value: Tensor

    def __init__(self, init: float = 0.85, momentum: float = 0.999) -> None:
        super().__init__()
        if not 0.0 <= init <= 1.0:
            raise ValueError(f"init must lie in [0, 1], got {init}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
        self.momentum = float(momentum)
        self.register_buffer("value", torch.tensor(float(init), dtype=torch.float32))

    @torch.no_grad()
    def update(self, logits: Tensor, ignore_mask: Tensor | None = None, ignore_index: int = 255) -> Tensor:
        """One EMA step from the weak-view logits; returns a copy of the new threshold (a 0-d tensor; see ``value``).

        Args:
            logits: float ``[B, K, H, W]`` weak-view logits (detached internally).
            ignore_mask: optional ``[B, H, W]``, bool (True = ignored) or integer (``== ignore_index`` = ignored).
            ignore_index: the ignored value of an integer ``ignore_mask``.

        When no pixel is left (everything ignored, on every process), the threshold is left unchanged. Under DDP keep
        the module on the process's device (the reduction runs there, e.g. CUDA for NCCL).
        """
        maxima = class_max_confidence(logits, ignore_mask, ignore_index).to(self.value.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
        predicted = maxima >= 0
        count = predicted.sum()
        target = (maxima * predicted).sum() / count.clamp(min=1)   # mean over the predicted classes, no host read
        updated = self.value * self.momentum + (1.0 - self.momentum) * target
        self.value.copy_(torch.where(count > 0, updated, self.value))
        return self.value.clone()

    def extra_repr(self) -> str:
        return f"value={float(self.value):.4f}, momentum={self.momentum}"
