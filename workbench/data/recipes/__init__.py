"""Dataset recipes: from the official archives (or a folder of your own) to a prepared dataset root.

``workbench data prepare NAME --root DIR [--archives DIR]`` (or :func:`prepare`) runs one recipe:

- ``voc``: Pascal VOC 2012 + SBD (classic 92..1464, blender 1/16..1/2, U2PL splits), see :mod:`.voc`;
- ``cityscapes``: 19 train ids, splits 1/30..1/2, sliding-window evaluation, see :mod:`.cityscapes`;
- ``coco``: COCO 2017 with 81 classes from the instance annotations, splits 1/512..1/32, see :mod:`.coco`;
- ``lucchi``: EPFL EM mitochondria stacks, 5/10/20 labeled slices, see :mod:`.lucchi`;
- ``folder``: images/ + masks/ + dataset.yaml of your own, see :mod:`.folder`.

``voc``, ``cityscapes`` and ``coco`` use the published label partitions shipped in ``workbench/data/splits``
(UniMatch's lists, the ones the papers report on) by default; ``split_lists="generated"`` draws seeded lists.
Every recipe writes the ``workbench-dataset/1`` layout read by :class:`workbench.data.dataset.SegDataset`, stages
everything next to the root and renames it into place, and is idempotent (see :mod:`.common`). Train on a prepared
root with ``data.dataset=prepared data.root=DIR data.split=<split>`` (e.g. the configs in configs/protocols/).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from workbench.data.recipes import cityscapes, coco, folder, lucchi, voc
from workbench.data.recipes.common import PrepareResult, Recipe, RecipeError, check_prepared, run_recipe

RECIPES: dict[str, Recipe] = {r.name: r for r in (voc.RECIPE, cityscapes.RECIPE, coco.RECIPE, lucchi.RECIPE,
                                                  folder.RECIPE)}

__all__ = ["RECIPES", "PrepareResult", "Recipe", "RecipeError", "check_prepared", "prepare"]


def prepare(name: str, root: str | Path, archives: str | Path | None = None, *, seed: int = 0,
            splits: str | Path | None = None, verify: bool = True, download: bool = False, progress: bool = True,
            workers: int = 1, split_lists: str | None = None, **options: Any) -> PrepareResult:
    """Run recipe ``name`` (see :func:`workbench.data.recipes.common.run_recipe` for the arguments).

    ``splits`` is a folder of user-provided split lists used verbatim; ``download`` fetches missing inputs that
    have a public URL; ``split_lists`` is ``"published"`` (the default of voc, cityscapes and coco: the shipped
    published lists) or ``"generated"`` (seeded lists; the only kind for lucchi and folder). Returns a PrepareResult
    whose status is ``"prepared"`` or ``"up-to-date"``.
    """
    if name not in RECIPES:
        raise RecipeError(f"unknown dataset recipe {name!r}; choose one of {sorted(RECIPES)}")
    if split_lists is not None:
        options["split_lists"] = split_lists
    return run_recipe(RECIPES[name], root, archives, seed=seed, splits_dir=splits, verify=verify, fetch=download,
                      progress=progress, workers=workers, options=options)
