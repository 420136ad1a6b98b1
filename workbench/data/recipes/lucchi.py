"""Lucchi et al.'s EPFL electron-microscopy mitochondria stacks (binary): RankMatch's Table 9 protocol.

Inputs (in ``--archives`` or the root, or a ``lucchi/`` folder there): the four multi-page TIFF stacks of the EPFL
CVLab page "Electron Microscopy Dataset": ``training.tif`` and ``training_groundtruth.tif`` (165 slices of
768 x 1024), ``testing.tif`` and ``testing_groundtruth.tif`` (165 slices). No checksum is published for them, so
none is checked (the manifest says so); every slice is checked for size and label values instead.

Output: one greyscale PNG per slice (``images/{train,test}/NNNN.png``) and its mask (``masks/...``: 0 = background,
1 = mitochondrion; the ground truth's 255 becomes 1, any value other than 0/255 (or 0/1) is an error).

Splits: ``train`` (the 165 training slices), ``val`` (the 165 testing slices: the literature reports on them), and
``labeled_5``/``labeled_10``/``labeled_20`` = 1/32, 1/16, 1/8 of the training slices rounded down (165 -> 5, 10,
20, RankMatch's "1/32(5) 1/16(10) 1/8(20)"), drawn in one seeded order (nested); ``unlabeled_*`` = the other
training slices.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence

from workbench.data.recipes.common import (BuildContext, BuildResult, Recipe, RecipeError, Requirement, Sample, Source,
                                           describe_sources, encode_label_png, fraction_size, generated_splits,
                                           label_splits, load_user_splits, palette_bytes, safe_path, split_lines)

_DIRS = (".", "lucchi", "Lucchi", "EM")
_DESC = "EPFL CVLab Electron Microscopy Dataset (Lucchi et al.)"
_URL_PAGE = "https://www.epfl.ch/labs/cvlab/data/data-em/"
STACKS = {
    "train_img": Requirement("train_img", "training.tif", f"{_DESC}: training stack ({_URL_PAGE})", kind="file",
                             tree_dirs=_DIRS),
    "train_gt": Requirement("train_gt", "training_groundtruth.tif", f"{_DESC}: training labels", kind="file",
                            tree_dirs=_DIRS),
    "test_img": Requirement("test_img", "testing.tif", f"{_DESC}: testing stack", kind="file", tree_dirs=_DIRS),
    "test_gt": Requirement("test_gt", "testing_groundtruth.tif", f"{_DESC}: testing labels", kind="file",
                           tree_dirs=_DIRS),
}
FRACTIONS = {"5": (1, 32), "10": (1, 16), "20": (1, 8)}
"""Split name (labeled slices on the real data) -> fraction of the training slices, rounded down."""
CLASSES = ("background", "mitochondrion")
PALETTE = [[0, 0, 0], [255, 255, 0]]


def read_stack(path: Path) -> list[np.ndarray]:
    """The slices of a (multi-page) TIFF as 2-D arrays; RecipeError naming the file when unreadable."""
    try:
        with Image.open(path) as im:
            frames = [np.asarray(f.convert("L") if f.mode not in ("L", "1") else f).copy()
                      for f in ImageSequence.Iterator(im)]
    except (OSError, ValueError) as e:
        raise RecipeError(f"cannot read TIFF stack {path}: {e}") from None
    if not frames:
        raise RecipeError(f"{path}: no slices")
    return frames


def binary_mask(arr: np.ndarray, name: str) -> np.ndarray:
    """Ground-truth slice -> uint8 {0, 1}: accepts values {0, 255} or {0, 1}; RecipeError naming the slice else."""
    vals = set(np.unique(arr).tolist())
    if vals <= {0, 255}:
        return (arr == 255).astype(np.uint8)
    if vals <= {0, 1}:
        return arr.astype(np.uint8)
    raise RecipeError(f"{name}: label values {sorted(vals)[:8]}, expected 0/255 (or 0/1)")


def build(out: Path, sources: dict[str, Source], ctx: BuildContext) -> BuildResult:
    """Convert the four TIFF stacks into ``out`` (see the module docstring)."""
    pal = palette_bytes(PALETTE)
    sets: dict[str, list[Sample]] = {}
    for split, img_key, gt_key in (("train", "train_img", "train_gt"), ("test", "test_img", "test_gt")):
        img_path, gt_path = sources[img_key].path, sources[gt_key].path
        imgs, gts = read_stack(img_path), read_stack(gt_path)
        if len(imgs) != len(gts):
            raise RecipeError(f"{img_path} has {len(imgs)} slices but {gt_path} has {len(gts)}")
        samples = []
        for i, (img, gt) in enumerate(zip(imgs, gts)):
            if img.shape != gt.shape:
                raise RecipeError(f"slice {i}: {img_path} is {img.shape} but {gt_path} is {gt.shape}")
            key = f"{split}_{i:04d}"
            ipath, mpath = safe_path(out, f"images/{split}/{i:04d}.png"), safe_path(out, f"masks/{split}/{i:04d}.png")
            ipath.parent.mkdir(parents=True, exist_ok=True)
            mpath.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.astype(np.uint8)).save(ipath)
            mpath.write_bytes(encode_label_png(binary_mask(gt, f"{gt_path} slice {i}"), pal))
            samples.append(Sample(key, f"images/{split}/{i:04d}.png", f"masks/{split}/{i:04d}.png"))
        sets[split] = samples
    train = sets["train"]
    splits = {"train": split_lines(train), "val": split_lines(sets["test"])}
    sizes = {n: fraction_size(len(train), *f, rounding="floor") for n, f in FRACTIONS.items()}
    sources_of = generated_splits(splits, train, sizes, ctx.seed)
    if ctx.splits_dir is not None:
        by_key = {s.key: s for s in train}
        for name, (lab, unl) in load_user_splits(ctx.splits_dir, by_key, train, lucchi_key).items():
            label_splits(splits, name, lab, unl)
            sources_of[name] = f"user-provided, verbatim: {ctx.splits_dir}"
    manifest = {
        "name": "lucchi", "num_classes": 2, "class_names": list(CLASSES), "palette": PALETTE,
        "label_splits": list(sources_of), "split_source": describe_sources(sources_of, ctx),
        "split_sources": sources_of, "image_channels": "greyscale (read as RGB)",
        "recommended_eval": {"mode": "original", "note": "whole 768x1024 slices; the 'val' split is the 165-slice "
                                                         "testing stack"},
        "unlabeled_gt": "diagnostics-only",
        "labels": "ground truth 255 -> 1 (mitochondrion), 0 -> 0",
    }
    return BuildResult(manifest, splits)


def lucchi_key(token: str) -> str:
    """Sample key of a split-list token: ``train_NNNN`` for ``.../train/NNNN.png`` or a bare slice number."""
    parts = token.replace("\\", "/").split("/")
    stem = parts[-1].rsplit(".", 1)[0]
    digits = "".join(ch for ch in stem if ch.isdigit())
    if not digits:
        return stem
    return f"train_{int(digits):04d}"


RECIPE = Recipe("lucchi", 1, tuple(STACKS.values()), build,
                "Lucchi EM mitochondria (binary): 165/165 slices, labeled splits 5/10/20 (RankMatch Table 9)")
