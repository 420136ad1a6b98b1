"""Vision-RWKV in plain PyTorch: bidirectional WKV attention (linear in the number of tokens), Q-Shift, blocks.

**Bi-WKV** (Vision-RWKV, Duan et al. 2024, Eq. 5; the form ScaleMatch's CIF uses). For one channel, tokens
``t = 0..T-1``, per-channel decay ``w`` and bonus ``u``::

    wkv_t = ( sum_{i != t} exp(-(|t - i| - 1) * w + k_i) v_i + exp(u + k_t) v_t )
            / ( sum_{i != t} exp(-(|t - i| - 1) * w + k_i)     + exp(u + k_t)     )

:func:`wkv` takes ``w`` and ``u`` exactly as they enter this formula. The paper writes the decay as ``w / T``;
the spatial-mix block below passes ``decay / T`` and ``bonus / T`` (as the reference code of Vision-RWKV and
ScaleMatch does, i.e. the bonus is divided by T too, unlike the paper's formula). The reference CUDA kernel also adds
1e-6 to the (max-rescaled) denominator; here no epsilon is needed because the rescaled denominator is always >= 1.

**Linear-time evaluation.** Both directions are strictly causal decayed sums
``P_t = sum_{i<t} exp(-(t-i-1) w + k_i) z_i`` (and the mirror image for ``i > t``), evaluated in chunks of ``chunk``
tokens: inside a chunk by a dense ``chunk x chunk`` matrix (vectorised over all chunks); across chunks through the
chunk summaries ``S_c = sum_{b in c} exp(-(L-1-b) w + k_b) z_b``, whose own causal decayed sum (decay ``L * w`` per
chunk) is the same problem on a sequence ``L`` times shorter, solved recursively. Cost and memory are
``O(T * chunk * C)``; no Python loop runs over tokens or chunks.

**Stability.** Every sum is carried as ``(s, m)`` with true value ``exp(m) * s``, where ``m`` is the largest
exponent of its terms (so ``s`` stays O(1) and the rescaled denominator is >= 1). The stabilisers ``m`` are detached:
the value does not depend on them, so gradients stay exact. Inputs in bf16/fp16 are computed in float32 (float64
stays float64) and the result is cast back, so large ``k`` (exp overflow) and long sequences (10^4+ tokens) stay
finite.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["wkv", "wkv_reference", "q_shift", "SpatialMix", "ChannelMix", "VRWKVBlock", "VisionRWKV"]

NEG = -1e30  # log-weight of "no term" (padding, empty sums); exp(NEG - m) underflows to 0 in float32/64


def _check_wkv_inputs(w: Tensor, u: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("w", w), ("u", u), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"k and v must be [B, T, C] of one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    c = k.shape[-1]
    if w.shape != (c,) or u.shape != (c,):
        raise ValueError(f"w and u must be [C] = [{c}], got {tuple(w.shape)} and {tuple(u.shape)}")
    if k.shape[1] < 1:
        raise ValueError("k and v need at least one token (T >= 1)")


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _causal_sum(w: Tensor, x: Tensor, z: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """Strictly causal decayed sums ``P_t = sum_{i<t} exp(-(t-i-1) w + x_i) z_i`` as ``(s, m)``, ``P = exp(m) s``.

    Channels-first layout (so the chunk matrices multiply without copies).

    Args:
        w: [C] decay per step; x: [B, C, T] log-weights; z: [B, C, T, V] values (V columns share the weights).
        chunk: tokens per chunk (>= 2).

    Returns:
        ``s`` [B, C, T, V] and ``m`` [B, C, T] (detached; about ``NEG`` where the sum is empty).
    """
    b, c, t = x.shape
    nv = z.shape[-1]
    size = min(chunk, t)
    n = -(-t // size)
    pad = n * size - t
    if pad:
        x = F.pad(x, (0, pad), value=NEG)
        z = F.pad(z, (0, 0, 0, pad))
    xc = x.reshape(b, c, n, size)
    zc = z.reshape(b, c, n, size, nv)
    pos = torch.arange(size, device=x.device, dtype=x.dtype)
    wc = w[:, None, None]

    # inside each chunk: E[a, j] = -(a - j - 1) w + x_j for j < a
    steps = pos[:, None] - pos[None, :] - 1                          # [L, L]; >= 0 exactly where j < a
    below = steps >= 0
    e = (xc[..., None, :] - steps * wc[..., None]).masked_fill(~below, NEG)   # [B, C, n, L(a), L(j)]
    # rows without any term (a = 0) get the stabiliser NEG / 2, so exp(NEG - m) is 0 for every masked entry and no
    # mask multiplication (another [.., L, L] tensor kept for backward) is needed
    m_in = e.detach().amax(-1).clamp(min=NEG / 2)                   # [B, C, n, L]
    s_in = torch.exp(e - m_in[..., None]) @ zc                      # [B, C, n, L, V]
    if n == 1:
        return s_in.reshape(b, c, size, nv)[:, :, :t], m_in.reshape(b, c, size)[:, :, :t]

    # across chunks: summaries decayed to each chunk's last token, then their causal sum (decay L * w per chunk)
    e_sum = xc - (size - 1 - pos) * wc                              # [B, C, n, L]
    m_sum = e_sum.detach().amax(-1)                                 # [B, C, n]
    s_sum = (torch.exp(e_sum - m_sum[..., None])[..., None, :] @ zc).squeeze(-2)   # [B, C, n, V]
    s_h, m_h = _causal_sum(w * size, m_sum, s_sum, chunk)          # state entering chunk c: [B, C, n, V], [B, C, n]
    g = m_h[..., None] - pos * wc                                   # its log-scale seen from token a: [B, C, n, L]
    m = torch.maximum(m_in, g.detach())
    s = s_in * torch.exp(m_in - m)[..., None] + s_h[..., None, :] * torch.exp(g - m)[..., None]
    return s.reshape(b, c, n * size, nv)[:, :, :t], m.reshape(b, c, n * size)[:, :, :t]


def wkv(w: Tensor, u: Tensor, k: Tensor, v: Tensor, chunk: int = 16) -> Tensor:
    """Bidirectional WKV (module docstring) in ``O(T * chunk * C)`` time and memory.

    Args:
        w: [C] decay (as it enters the formula; positive = attention fades with distance).
        u: [C] bonus of the token itself.
        k, v: [B, T, C] keys and values.
        chunk: tokens per chunk (>= 2); any T works (the last chunk is padded).

    Returns:
        [B, T, C] in ``k``'s dtype (computed in float32, or float64 for float64 inputs); differentiable in all four
        inputs.
    """
    _check_wkv_inputs(w, u, k, v)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 2:
        raise ValueError(f"chunk must be an int >= 2, got {chunk!r}")
    dt = _compute_dtype(k)
    w32, u32 = w.to(dt), u.to(dt)
    k32, v32 = k.to(dt).transpose(1, 2), v.to(dt).transpose(1, 2)   # [B, C, T]
    z = torch.stack([v32, torch.ones_like(v32)], -1)                # numerator and denominator columns
    s_f, m_f = _causal_sum(w32, k32, z, chunk)
    s_b, m_b = _causal_sum(w32, k32.flip(-1), z.flip(-2), chunk)
    s_b, m_b = s_b.flip(-2), m_b.flip(-1)
    e_d = u32[:, None] + k32                                        # the token's own exponent
    m = torch.maximum(torch.maximum(m_f, m_b), e_d.detach())
    s = s_f * torch.exp(m_f - m)[..., None] + s_b * torch.exp(m_b - m)[..., None] + z * torch.exp(e_d - m)[..., None]
    return (s[..., 0] / s[..., 1]).transpose(1, 2).to(k.dtype)


def wkv_reference(w: Tensor, u: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The Bi-WKV formula evaluated directly: an explicit [B, T, T, C] matrix of exponents (``O(T^2)``).

    Each row's exponents are shifted by their maximum before ``exp`` (the ratio does not change), so moderately
    large ``k`` do not overflow. Same arguments and result as :func:`wkv`; for tests and small inputs only.
    """
    _check_wkv_inputs(w, u, k, v)
    dt = _compute_dtype(k)
    w, u, k, v = (t.to(dt) for t in (w, u, k, v))
    t = k.shape[1]
    pos = torch.arange(t, device=k.device, dtype=dt)
    dist = (pos[:, None] - pos[None, :]).abs()                      # |t - i|
    expo = -(dist - 1)[None, :, :, None] * w + k[:, None, :, :]     # [B, T(t), T(i), C]
    diag = torch.eye(t, dtype=torch.bool, device=k.device)[None, :, :, None]
    expo = torch.where(diag, (u + k)[:, None, :, :], expo)
    weights = torch.exp(expo - expo.detach().amax(2, keepdim=True))
    return ((weights * v[:, None]).sum(2) / weights.sum(2)).to(v.dtype)


def _shift(x: Tensor, dim: int, offset: int) -> Tensor:
    """``out[..., i, ...] = x[..., i - offset, ...]`` along ``dim`` with zeros shifted in."""
    n = x.shape[dim]
    if abs(offset) >= n:
        return torch.zeros_like(x)
    if offset == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim())
    if offset > 0:
        return F.pad(x.narrow(dim, 0, n - offset), pad + [offset, 0])
    return F.pad(x.narrow(dim, -offset, n + offset), pad + [0, -offset])


def q_shift(x: Tensor, size: Sequence[int], shift: int = 1, gamma: float = 0.25) -> Tensor:
    """Quad-directional token shift (Vision-RWKV's Q-Shift) of tokens ``x`` [B, T, C] laid out row-major on an
    ``(H, W) = size`` grid (T = H * W).

    With ``g = int(C * gamma)``: channels ``[0, g)`` take the token ``shift`` to the **left** (out[h, w] =
    x[h, w - shift]), ``[g, 2g)`` the one to the **right**, ``[2g, 3g)`` the one **above** (x[h - shift, w]),
    ``[3g, 4g)`` the one **below**; zeros come in at the borders; channels from ``4g`` on are unchanged.
    """
    if x.dim() != 3:
        raise ValueError(f"x must be [B, T, C], got {tuple(x.shape)}")
    h, w = (int(s) for s in size)
    b, t, c = x.shape
    if h * w != t:
        raise ValueError(f"size {tuple(size)} holds {h * w} tokens but x has T = {t}")
    if not 0 < gamma <= 0.25:
        raise ValueError(f"gamma must be in (0, 1/4], got {gamma!r}")
    g = int(c * gamma)
    img = x.transpose(1, 2).reshape(b, c, h, w)
    parts = [_shift(img[:, :g], 3, shift), _shift(img[:, g:2 * g], 3, -shift),
             _shift(img[:, 2 * g:3 * g], 2, shift), _shift(img[:, 3 * g:4 * g], 2, -shift), img[:, 4 * g:]]
    return torch.cat(parts, 1).flatten(2).transpose(1, 2)


def _ratios(layer_id: int, num_layers: int) -> tuple[float, float]:
    """(0 -> 1 over the layers, 1 -> ~0 over the layers) used by the layer-dependent initialisation."""
    return (layer_id / (num_layers - 1) if num_layers > 1 else 0.0), 1.0 - layer_id / num_layers


class SpatialMix(nn.Module):
    """Vision-RWKV spatial mix: Q-Shift interpolation, R/K/V projections, Bi-WKV, ``sigmoid(R)`` gate, output.

    ``x -> out(sigmoid(r) * wkv(decay / T, bonus / T, k, v))`` with ``k, v, r`` linear maps (no bias) of
    ``x * mix + q_shift(x) * (1 - mix)`` (one learned ``mix`` per projection). ``decay`` and ``bonus`` are learned
    per channel; their initialisation spreads the decay from -5 to 3 across channels (Vision-RWKV's layer-dependent
    scheme), so channels range from long- to short-range attention. ``key_norm`` adds a LayerNorm after the WKV.
    """

    def __init__(self, dim: int, layer_id: int = 0, num_layers: int = 1, shift: int = 1, chunk: int = 16,
                 key_norm: bool = False) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.dim, self.shift, self.chunk = dim, shift, chunk
        r01, r10 = _ratios(layer_id, num_layers)
        i = torch.arange(dim, dtype=torch.float32)
        frac = i / dim
        self.decay = nn.Parameter(-5 + 8 * (i / max(dim - 1, 1)) ** (0.7 + 1.3 * r01))
        self.bonus = nn.Parameter(torch.full((dim,), math.log(0.3)) + 0.5 * ((i + 1) % 3 - 1))
        self.mix_k = nn.Parameter(frac ** r10)
        self.mix_v = nn.Parameter(frac ** r10 + 0.3 * r01)
        self.mix_r = nn.Parameter(frac ** (0.5 * r10))
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.output = nn.Linear(dim, dim, bias=False)
        self.key_norm = nn.LayerNorm(dim) if key_norm else None

    def forward(self, x: Tensor, size: Sequence[int]) -> Tensor:
        """Tokens ``x`` [B, T, C] on an ``(H, W)`` grid -> [B, T, C]."""
        t = x.shape[1]
        xx = q_shift(x, size, self.shift) if self.shift > 0 else x
        k = self.key(x * self.mix_k + xx * (1 - self.mix_k))
        v = self.value(x * self.mix_v + xx * (1 - self.mix_v))
        r = self.receptance(x * self.mix_r + xx * (1 - self.mix_r))
        y = wkv(self.decay / t, self.bonus / t, k, v, self.chunk)
        if self.key_norm is not None:
            y = self.key_norm(y)
        return self.output(torch.sigmoid(r) * y)


class ChannelMix(nn.Module):
    """Vision-RWKV channel mix: ``sigmoid(R(x_r)) * V(relu(K(x_k))^2)`` with Q-Shift interpolated inputs and a
    hidden width of ``hidden_rate * dim``."""

    def __init__(self, dim: int, layer_id: int = 0, num_layers: int = 1, shift: int = 1,
                 hidden_rate: float = 4.0) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not hidden_rate > 0:
            raise ValueError(f"hidden_rate must be > 0, got {hidden_rate!r}")
        self.shift = shift
        _, r10 = _ratios(layer_id, num_layers)
        frac = torch.arange(dim, dtype=torch.float32) / dim
        self.mix_k = nn.Parameter(frac ** r10)
        self.mix_r = nn.Parameter(frac ** r10)
        hidden = max(1, int(hidden_rate * dim))
        self.key = nn.Linear(dim, hidden, bias=False)
        self.value = nn.Linear(hidden, dim, bias=False)
        self.receptance = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, size: Sequence[int]) -> Tensor:
        """Tokens ``x`` [B, T, C] on an ``(H, W)`` grid -> [B, T, C]."""
        xx = q_shift(x, size, self.shift) if self.shift > 0 else x
        k = torch.relu(self.key(x * self.mix_k + xx * (1 - self.mix_k))).square()
        return torch.sigmoid(self.receptance(x * self.mix_r + xx * (1 - self.mix_r))) * self.value(k)


class VRWKVBlock(nn.Module):
    """Pre-norm residual block: ``x + g1 * SpatialMix(LN(x))``, then ``x + g2 * ChannelMix(LN(x))``.

    Args:
        dim, layer_id, num_layers, chunk, hidden_rate: width, position in the stack (initialisation), WKV chunk,
            channel-mix hidden ratio.
        eps: the LayerNorms' epsilon (1e-5 by default; ScaleMatch's CIF uses 1e-6).
        layer_scale: None (``g1 = g2 = 1``) or the initial value of the learned per-channel layer scales ``g1``,
            ``g2`` (Vision-RWKV's ``init_values``).
        input_norm: whether the block also normalises its input first (``ln0``); None = only the first block of a
            stack (``layer_id == 0``), as Vision-RWKV's backbone does.
    """

    def __init__(self, dim: int, layer_id: int = 0, num_layers: int = 1, chunk: int = 16,
                 hidden_rate: float = 4.0, eps: float = 1e-5, layer_scale: float | None = None,
                 input_norm: bool | None = None) -> None:
        super().__init__()
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        if input_norm is None:
            input_norm = layer_id == 0
        self.ln0 = nn.LayerNorm(dim, eps=eps) if input_norm else None
        self.ln1 = nn.LayerNorm(dim, eps=eps)
        self.ln2 = nn.LayerNorm(dim, eps=eps)
        self.spatial = SpatialMix(dim, layer_id, num_layers, chunk=chunk)
        self.channel = ChannelMix(dim, layer_id, num_layers, hidden_rate=hidden_rate)
        self.gamma1: nn.Parameter | None = None
        self.gamma2: nn.Parameter | None = None
        if layer_scale is not None:
            self.gamma1 = nn.Parameter(torch.full((dim,), float(layer_scale)))
            self.gamma2 = nn.Parameter(torch.full((dim,), float(layer_scale)))

    def forward(self, x: Tensor, size: Sequence[int]) -> Tensor:
        """Tokens ``x`` [B, T, C] on an ``(H, W)`` grid -> [B, T, C]."""
        if self.ln0 is not None:
            x = self.ln0(x)
        a = self.spatial(self.ln1(x), size)
        x = x + (a if self.gamma1 is None else self.gamma1 * a)
        f = self.channel(self.ln2(x), size)
        return x + (f if self.gamma2 is None else self.gamma2 * f)


class VisionRWKV(nn.Module):
    """A stack of ``depth`` :class:`VRWKVBlock` over flattened 2-D tokens (no patch embedding, no final norm);
    ``eps``, ``layer_scale`` and ``input_norm`` are passed to every block."""

    def __init__(self, dim: int, depth: int = 1, chunk: int = 16, hidden_rate: float = 4.0, eps: float = 1e-5,
                 layer_scale: float | None = None, input_norm: bool | None = None) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive int, got {depth!r}")
        self.blocks = nn.ModuleList(VRWKVBlock(dim, i, depth, chunk, hidden_rate, eps, layer_scale, input_norm)
                                    for i in range(depth))

    def forward(self, x: Tensor, size: Sequence[int]) -> Tensor:
        """Tokens ``x`` [B, T, C] on an ``(H, W)`` grid -> [B, T, C]."""
        for block in self.blocks:
            x = block(x, size)
        return x
