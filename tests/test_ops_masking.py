"""Patch masks: patch structure, hidden fractions, grid layout, partial patches, seeding."""

from __future__ import annotations

import pytest
import torch

from workbench.ops.masking import MASK_STRATEGIES, patch_mask


def patch_values(mask: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, rows, cols] value of each patch, checking that the mask is constant inside every patch."""
    b, _, h, w = mask.shape
    rows, cols = -(-h // patch), -(-w // patch)
    values = mask[:, 0, ::patch, ::patch]
    assert values.shape == (b, rows, cols)
    expanded = values.repeat_interleave(patch, 1).repeat_interleave(patch, 2)[:, :h, :w]
    assert torch.equal(expanded, mask[:, 0]), "mask is not constant within a patch"
    return values


@pytest.mark.parametrize("strategy", MASK_STRATEGIES)
def test_masks_are_constant_per_patch_including_partial_ones(strategy: str) -> None:
    # 70 x 50 with 32-pixel patches: 3 x 2 patches, the last row (64..69) and column (32..49) partial
    mask = patch_mask(5, 70, 50, 32, 0.5, strategy, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (5, 1, 70, 50) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    patch_values(mask, 32)


def test_random_hidden_fraction_matches_ratio() -> None:
    mask = patch_mask(64, 320, 320, 10, 0.7, "random", generator=torch.Generator().manual_seed(1))
    hidden = 1 - patch_values(mask, 10)  # 64 * 1024 patches -> std of the fraction ~ 0.0018
    assert float(hidden.mean()) == pytest.approx(0.7, abs=0.01)
    assert float(patch_values(patch_mask(2, 64, 64, 8, 0.0), 8).min()) == 1.0  # ratio 0: everything visible
    assert float(patch_values(patch_mask(2, 64, 64, 8, 1.0), 8).max()) == 0.0  # ratio 1: everything hidden


@pytest.mark.parametrize(("size", "patch", "ratio"), [(224, 16, 0.4), (321, 32, 0.7), (96, 6, 0.4)])
def test_block_hidden_fraction_close_to_ratio_never_above(size: int, patch: int, ratio: float) -> None:
    mask = patch_mask(16, size, size, patch, ratio, "block", generator=torch.Generator().manual_seed(2))
    hidden = (1 - patch_values(mask, patch)).flatten(1).sum(1)
    patches = (-(-size // patch)) ** 2
    target = round(ratio * patches)
    assert int(hidden.max()) <= target  # a block is only placed if it does not overshoot
    assert float(hidden.mean()) / patches == pytest.approx(ratio, abs=0.05)


def test_block_masks_are_made_of_rectangles() -> None:
    # with few, large blocks most hidden patches have a hidden horizontal or vertical neighbour
    mask = patch_mask(8, 224, 224, 16, 0.4, "block", generator=torch.Generator().manual_seed(3))
    hidden = 1 - patch_values(mask, 16)
    padded = torch.nn.functional.pad(hidden, (1, 1, 1, 1))
    neighbours = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
    isolated = ((hidden == 1) & (neighbours == 0)).sum()
    assert int(isolated) <= 0.1 * int(hidden.sum())


def test_grid_keeps_exactly_one_patch_in_every_two_by_two() -> None:
    mask = patch_mask(6, 64, 96, 8, 0.3, "grid", generator=torch.Generator().manual_seed(4))  # 8 x 12 patches
    visible = patch_values(mask, 8)
    groups = visible.reshape(6, 4, 2, 6, 2).sum(dim=(2, 4))
    assert torch.equal(groups, torch.ones(6, 4, 6))
    assert float(visible.mean()) == 0.25
    # the kept position is the same in every group of an image
    corner = visible.reshape(6, 4, 2, 6, 2).permute(0, 1, 3, 2, 4).reshape(6, 24, 4).argmax(-1)
    assert bool((corner == corner[:, :1]).all())


@pytest.mark.parametrize("strategy", MASK_STRATEGIES)
def test_seeding_is_reproducible(strategy: str) -> None:
    def make(seed: int) -> torch.Tensor:
        return patch_mask(4, 96, 96, 8, 0.5, strategy, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(make(7), make(7))
    assert not torch.equal(make(7), make(8))


def test_patch_mask_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="ratio"):
        patch_mask(1, 8, 8, 4, 1.5)
    with pytest.raises(ValueError, match="strategy"):
        patch_mask(1, 8, 8, 4, 0.5, "checker")
    with pytest.raises(ValueError, match="patch"):
        patch_mask(1, 8, 8, 0, 0.5)
    with pytest.raises(ValueError, match="height"):
        patch_mask(1, -8, 8, 4, 0.5)
