"""Vision-RWKV op: chunked Bi-WKV against the direct formula (values and gradients), stability, Q-Shift, blocks."""
from __future__ import annotations

import math

import pytest
import torch

from workbench.ops.rwkv import SpatialMix, VisionRWKV, VRWKVBlock, q_shift, wkv, wkv_reference

LN2 = math.log(2)


@pytest.fixture(autouse=True)
def _one_thread(_threads):
    """One torch thread (after conftest's 2): on the shared, oversubscribed CPU two spinning threads are many times
    slower than one."""
    torch.set_num_threads(1)
    yield


def rand_inputs(b: int, t: int, c: int, seed: int = 0, dtype=torch.float64, scale_k: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, generator=g, dtype=dtype)
    u = torch.randn(c, generator=g, dtype=dtype)
    k = torch.randn(b, t, c, generator=g, dtype=dtype) * scale_k
    v = torch.randn(b, t, c, generator=g, dtype=dtype)
    return [x.requires_grad_() for x in (w, u, k, v)]


def test_bi_wkv_three_tokens_by_hand():
    """w = ln 2 (each extra step of distance halves the weight), u = 0, k = 0, v = (1, 2, 4):
    t=0: weights self 1, i=1: e^0 = 1, i=2: e^{-ln 2} = 1/2 -> (1 + 2 + 2) / 2.5 = 2
    t=1: weights i=0: 1, self 1, i=2: 1               -> (1 + 2 + 4) / 3   = 7/3
    t=2: weights i=0: 1/2, i=1: 1, self 1             -> (0.5 + 2 + 4) / 2.5 = 2.6"""
    w, u = torch.tensor([LN2], dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    k = torch.zeros(1, 3, 1, dtype=torch.float64)
    v = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64).view(1, 3, 1)
    expected = torch.tensor([2.0, 7 / 3, 2.6], dtype=torch.float64).view(1, 3, 1)
    assert torch.allclose(wkv_reference(w, u, k, v), expected, atol=1e-12)
    for chunk in (2, 3, 8):       # 2: two chunks (the last one padded) and a second level of recursion
        assert torch.allclose(wkv(w, u, k, v, chunk), expected, atol=1e-12)
    # the bonus u weights the token itself: u = ln 3 at t=1 -> (1 + 3 * 2 + 4) / (1 + 3 + 1) = 11/5
    assert wkv(w, torch.tensor([math.log(3)], dtype=torch.float64), k, v, 2)[0, 1, 0].item() == pytest.approx(2.2)


@pytest.mark.parametrize("t, chunk", [(1, 4), (3, 4), (4, 4), (13, 4), (16, 4), (70, 4), (37, 8), (50, 16)])
def test_chunked_wkv_equals_direct_formula_values_and_gradients(t, chunk):
    """float64, random w (both signs), u, k, v; T below, equal to, not a multiple of and many times the chunk
    (70 / 4: three levels of chunk summaries)."""
    w, u, k, v = rand_inputs(2, t, 3, seed=t)
    gy = torch.randn(2, t, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y_fast = wkv(w, u, k, v, chunk)
    y_ref = wkv_reference(w, u, k, v)
    assert y_fast.dtype == torch.float64 and y_fast.shape == (2, t, 3)
    assert torch.allclose(y_fast, y_ref, rtol=1e-10, atol=1e-10)
    g_fast = torch.autograd.grad((y_fast * gy).sum(), (w, u, k, v))
    g_ref = torch.autograd.grad((y_ref * gy).sum(), (w, u, k, v))
    for name, a, b in zip("wukv", g_fast, g_ref):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-10), name


def test_wkv_gradcheck_against_finite_differences():
    w, u, k, v = rand_inputs(1, 9, 2, seed=3)
    assert torch.autograd.gradcheck(lambda *a: wkv(*a, chunk=4), (w, u, k, v))


def test_single_token_and_symmetry():
    """T = 1 returns v (only the token itself); reversing the sequence reverses the output (bidirectional)."""
    w, u, k, v = rand_inputs(1, 1, 4)
    assert torch.allclose(wkv(w, u, k, v), v)
    w, u, k, v = rand_inputs(2, 11, 3, seed=5)
    assert torch.allclose(wkv(w, u, k.flip(1), v.flip(1), 4), wkv(w, u, k, v, 4).flip(1), atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_at_ten_thousand_tokens_with_huge_keys(dtype):
    """T = 10000, k ~ 300 * N(0, 1) (exp overflows float32 beyond 88): output and gradients finite. One token with
    k = 5000 dominates every weighted average (its weight is e^{5000 - ...} times the others', the decay w/T being
    tiny), so every output equals its value: a result that would fail with overflow or underflow to 0/0."""
    t, c = 10_000, 8
    w, u, k, v = (x.detach() for x in rand_inputs(1, t, c, seed=7, dtype=torch.float32, scale_k=300.0))
    k[0, 1234] = 5000.0
    w, u, k, v = (x.to(dtype).requires_grad_() for x in (w / t, u / t, k, v))
    y = wkv(w, u, k, v)
    assert y.dtype == dtype and bool(torch.isfinite(y).all())
    assert torch.allclose(y.float(), v[0, 1234].float().expand(1, t, c), atol=1e-6)
    (y.float() * torch.linspace(-1, 1, t)[None, :, None]).sum().backward()
    for p in (w, u, k, v):
        assert bool(torch.isfinite(p.grad.float()).all())


def test_wkv_input_errors():
    w, u, k, v = rand_inputs(1, 5, 3)
    with pytest.raises(ValueError, match="w and u"):
        wkv(w[:2], u, k, v)
    with pytest.raises(ValueError, match="k and v"):
        wkv(w, u, k, v[:, :4])
    with pytest.raises(ValueError, match="chunk"):
        wkv(w, u, k, v, chunk=1)
    with pytest.raises(TypeError, match="k"):
        wkv(w, u, k.long(), v)


def test_q_shift_by_hand():
    """2 x 3 grid, C = 5 (quarters of one channel + one untouched channel); token (h, w) holds 10 h + w + 1."""
    grid = torch.tensor([[1.0, 2.0, 3.0], [11.0, 12.0, 13.0]])
    x = grid.flatten()[None, :, None].repeat(1, 1, 5)                  # [1, 6, 5]
    out = q_shift(x, (2, 3)).view(2, 3, 5)
    assert out[..., 0].tolist() == [[0, 1, 2], [0, 11, 12]]            # from the left neighbour
    assert out[..., 1].tolist() == [[2, 3, 0], [12, 13, 0]]            # from the right neighbour
    assert out[..., 2].tolist() == [[0, 0, 0], [1, 2, 3]]              # from above
    assert out[..., 3].tolist() == [[11, 12, 13], [0, 0, 0]]           # from below
    assert out[..., 4].tolist() == grid.tolist()                       # unchanged
    with pytest.raises(ValueError, match="tokens"):
        q_shift(x, (3, 3))


def test_spatial_mix_sees_the_whole_grid_and_trains():
    """Changing the first token changes the last token's output (global receptive field, unlike the 1-pixel
    Q-Shift); gradients reach the decay and bonus."""
    torch.manual_seed(0)
    mix = SpatialMix(8, chunk=4)
    x = torch.randn(2, 30, 8)
    y = mix(x, (5, 6))
    x2 = x.clone()
    x2[:, 0] += 1.0
    assert y.shape == (2, 30, 8)
    assert not torch.allclose(mix(x2, (5, 6))[:, -1], y[:, -1])
    y.square().sum().backward()
    assert mix.decay.grad is not None and mix.bonus.grad.abs().sum() > 0


def test_vision_rwkv_stack_shapes_and_errors():
    net = VisionRWKV(6, depth=2, chunk=4)
    x = torch.randn(1, 12, 6, requires_grad=True)
    y = net(x, (3, 4))
    assert y.shape == (1, 12, 6) and net.blocks[0].ln0 is not None and net.blocks[1].ln0 is None
    y.sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    with pytest.raises(ValueError, match="depth"):
        VisionRWKV(6, depth=0)


def test_block_layer_scale_eps_and_input_norm():
    """``x + g1 * spatial(ln1(x))`` then ``+ g2 * channel(ln2(.))``: with both layer scales 0 and no input norm the
    block is the identity; with g1 = 0.01 and g2 = 0 it adds exactly 0.01 x the spatial branch. ``eps`` reaches
    every LayerNorm; the default block (no layer scale) keeps ``ln0`` with eps 1e-5."""
    torch.manual_seed(0)
    blk = VRWKVBlock(8, eps=1e-6, layer_scale=0.0, input_norm=False, chunk=4).double()
    assert blk.ln0 is None and blk.ln1.eps == blk.ln2.eps == 1e-6
    x = torch.randn(2, 12, 8, dtype=torch.float64)
    assert torch.equal(blk(x, (3, 4)), x)
    with torch.no_grad():
        blk.gamma1.fill_(0.01)
        assert torch.allclose(blk(x, (3, 4)) - x, 0.01 * blk.spatial(blk.ln1(x), (3, 4)), rtol=0, atol=1e-12)
    default = VRWKVBlock(8)
    assert default.gamma1 is None and default.ln0 is not None and default.ln0.eps == 1e-5
    stack = VisionRWKV(8, depth=2, eps=1e-6, layer_scale=0.01, input_norm=False)
    assert all(b.ln0 is None and b.ln1.eps == 1e-6 and torch.equal(b.gamma2.detach(), torch.full((8,), 0.01))
               for b in stack.blocks)
    with pytest.raises(ValueError, match="eps"):
        VRWKVBlock(8, eps=0.0)
