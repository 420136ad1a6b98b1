"""RankMatch agents: choosing representative pixels and correlating every pixel with them (RankMatch, CVPR 2024).

Pixel features ``[B, C, H, W]`` are flattened row-major: pixel ``(y, x)`` has flat index ``y * W + x``. Agent sets are
int64 ``[B, N]`` flat pixel indices, so the strong view can reuse the weak view's positions with its own features.

Selection strategies (the paper's Table 5, same signature ``(feats, num, generator=None)``; see ``AGENT_SELECTORS``):

- ``orthogonal`` (Sec. 3.2, the method's choice): greedy, starting from a random pixel, each new agent is the pixel
  whose largest ``|cosine|`` to the agents chosen so far is smallest;
- ``random``: ``num`` distinct pixels drawn uniformly;
- ``topn``: the ``num`` pixels with the largest column sums of the pixel self-correlation matrix (defined below).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["orthogonal_agents", "random_agents", "topn_agents", "agent_correlation", "AGENT_SELECTORS"]


def _pixels(feats: Tensor) -> Tensor:
    """Validate ``feats`` and return its pixel features ``[B, HW, C]``."""
    if not isinstance(feats, Tensor):
        raise TypeError(f"feats must be a torch.Tensor, got {type(feats).__name__}")
    if feats.dim() != 4 or not feats.is_floating_point():
        raise ValueError(f"feats must be a float [B, C, H, W] tensor, got {feats.dtype} {tuple(feats.shape)}")
    return feats.flatten(2).transpose(1, 2)


def _check_num(num: int, pixels: int) -> None:
    if not isinstance(num, int) or isinstance(num, bool) or not 1 <= num <= pixels:
        raise ValueError(f"num must be an int in [1, {pixels}] (the number of pixels), got {num!r}")


def _draw_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    return generator.device if generator is not None else device


def orthogonal_agents(
    feats: Tensor, num: int, first: Tensor | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """Orthogonal agent selection (RankMatch Sec. 3.2), greedy and batched over images.

    Pixel features are L2-normalised; starting from ``first``, agents are added one at a time, each being the pixel
    whose maximum absolute cosine similarity to the agents already chosen is smallest; a chosen pixel is never chosen
    again. Ties go to the smallest flat index. A zero feature vector has cosine 0 with everything, so such pixels are
    taken early (they look orthogonal to all).

    Args:
        feats: float ``[B, C, H, W]`` features (the weak view's, in RankMatch).
        num: number of agents ``N`` (at most ``H * W``).
        first: optional int64 ``[B]`` flat index of each image's first agent; drawn uniformly when None.
        generator: optional ``torch.Generator`` for the random first agents.

    Returns:
        int64 ``[B, N]`` flat pixel indices in selection order.
    """
    _pixels(feats)  # validation
    # unit pixel vectors kept channels-first, [B, C, HW] like the input: each step is then one contiguous batched
    # row-vector x matrix product (a transposed [B, HW, C] view made every step ~10x slower at 81x81 x 256)
    unit = F.normalize(feats.detach().float().flatten(2), dim=1)
    b, _, n = unit.shape
    _check_num(num, n)
    if first is None:
        first = torch.randint(n, (b,), generator=generator, device=_draw_device(generator, feats.device))
    elif not isinstance(first, Tensor) or first.shape != (b,) or first.dtype != torch.long:
        raise ValueError(f"first must be an int64 tensor of shape ({b},), got {getattr(first, 'shape', first)!r}")
    elif bool(((first < 0) | (first >= n)).any()):  # only a caller's start is checked (a host sync)
        raise ValueError(f"first must index pixels in [0, {n}), got {first.tolist()}")
    chosen = first.to(feats.device)
    agents = [chosen]
    worst = torch.zeros(b, n, device=feats.device)  # max |cos| of every pixel to the chosen agents
    rows = torch.arange(b, device=feats.device)
    for _ in range(num - 1):
        cos = torch.bmm(unit[rows, :, chosen].unsqueeze(1), unit).squeeze(1).abs()
        worst = torch.maximum(worst, cos)
        worst[rows, chosen] = float("inf")
        chosen = worst.argmin(dim=1)
        agents.append(chosen)
    return torch.stack(agents, dim=1)


def random_agents(feats: Tensor, num: int, generator: torch.Generator | None = None) -> Tensor:
    """``num`` distinct pixels per image, uniformly at random (Table 5's "Random"); only the shape of feats is used.

    Args:
        feats: float ``[B, C, H, W]`` features.
        num: number of agents ``N`` (at most ``H * W``).
        generator: optional ``torch.Generator`` for reproducible draws.

    Returns:
        int64 ``[B, N]`` flat pixel indices.
    """
    b, n, _ = _pixels(feats).shape
    _check_num(num, n)
    keys = torch.rand(b, n, generator=generator, device=_draw_device(generator, feats.device))
    return keys.argsort(dim=1)[:, :num].to(feats.device)


def topn_agents(
    feats: Tensor,
    num: int,
    generator: torch.Generator | None = None,
    normalize: bool = False,
    temperature: float = 1.0,
    chunk: int = 1024,
) -> Tensor:
    """Table 5's "Top-N": pixels with the largest cumulative self-correlation.

    The paper selects "top N pixels conditioned on the cumulative self-correlation matrix along the pixels dimension"
    without more detail. Here the self-correlation is Eq. (4) with every pixel as an agent,
    ``S[i, j] = softmax_j(f_i . f_j / temperature)`` (the "All" variant of Table 5), and pixel ``j`` scores
    ``sum_i S[i, j]``: how much attention all pixels pay to it. The ``num`` highest scores win (ties: smaller index).

    Args:
        feats: float ``[B, C, H, W]`` features.
        num: number of agents ``N`` (at most ``H * W``).
        generator: unused (the choice is deterministic); present so all selectors share one signature.
        normalize, temperature: as in :func:`agent_correlation`.
        chunk: rows of ``S`` computed at a time (memory ``B * chunk * HW`` floats).

    Returns:
        int64 ``[B, N]`` flat pixel indices, best first.
    """
    del generator
    pix = _scaled(feats, normalize, temperature)
    b, n, _ = pix.shape
    _check_num(num, n)
    score = torch.zeros(b, n, device=feats.device, dtype=pix.dtype)
    for start in range(0, n, chunk):
        score += torch.bmm(pix[:, start : start + chunk], pix.transpose(1, 2)).softmax(dim=-1).sum(dim=1)
    return score.argsort(dim=1, descending=True, stable=True)[:, :num]


def _scaled(feats: Tensor, normalize: bool, temperature: float) -> Tensor:
    """Pixel features ``[B, HW, C]``, L2-normalised if asked, divided by ``sqrt(temperature)`` (so that every dot
    product of two of them is divided by ``temperature``)."""
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature <= 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    pix = _pixels(feats)
    pix = F.normalize(pix, dim=-1) if normalize else pix
    return pix if temperature == 1 else pix / temperature**0.5


def agent_correlation(feats: Tensor, agents: Tensor, normalize: bool = False, temperature: float = 1.0,
                      check: bool = True) -> Tensor:
    """Agent-level correlation (RankMatch Eq. 4): ``c = softmax(f . A^T)`` over the agents, for every pixel.

    The paper applies the softmax to raw dot products of the (ASPP, 256-channel) features with the agents' features,
    with no normalisation or temperature; those are the defaults. ``normalize=True`` uses cosine similarities and
    ``temperature`` divides the logits, for studying variants.

    Args:
        feats: float ``[B, C, H, W]`` features of one view (weak or strong).
        agents: int64 ``[B, N]`` flat pixel indices (the same positions serve both views).
        normalize: L2-normalise pixel features (and therefore agents) first.
        temperature: positive divisor of the logits.
        check: verify that the indices lie in range (a device-to-host read: a GPU synchronisation); callers
            whose indices come from the selectors of this module pass False.

    Returns:
        float ``[B, H*W, N]``, each row a probability distribution over the agents.
    """
    pix = _scaled(feats, normalize, temperature)
    b, n, c = pix.shape
    if not isinstance(agents, Tensor) or agents.dim() != 2 or agents.shape[0] != b or agents.dtype != torch.long:
        raise ValueError(f"agents must be an int64 [B={b}, N] tensor, got {getattr(agents, 'shape', agents)!r}")
    if check and agents.numel() and (int(agents.min()) < 0 or int(agents.max()) >= n):
        raise ValueError(f"agents must index pixels in [0, {n})")
    anchor = torch.gather(pix, 1, agents[:, :, None].expand(b, agents.shape[1], c))
    return torch.bmm(pix, anchor.transpose(1, 2)).softmax(dim=-1)


AGENT_SELECTORS: dict[str, Callable[..., Tensor]] = {
    "orthogonal": orthogonal_agents,
    "random": random_agents,
    "topn": topn_agents,
}
