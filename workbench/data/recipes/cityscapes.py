"""Cityscapes (fine annotations): 19 train ids, 2975 train / 500 val, label splits 1/16..1/2.

Inputs (in ``--archives`` or the root): ``leftImg8bit_trainvaltest.zip`` and ``gtFine_trainvaltest.zip`` (or their
extracted ``leftImg8bit/`` and ``gtFine/`` folders). Cityscapes needs a registered account, so nothing is
downloaded; the md5 values are the ones the Cityscapes download page lists next to each package.

Labels: each ``*_gtFine_labelIds.png`` is mapped to train ids with the table of
``cityscapesscripts.helpers.labels`` (the official definition, not retyped here): the 19 evaluated classes get train
ids 0..18, every other id (ignored in evaluation, trainId 255 or -1) becomes 255. Masks are palette PNGs with the
official colours at ``masks/<split>/<city>/<city>_<seq>_<frame>.png``; images keep their official names under
``images/<split>/<city>/``.

Splits: ``train`` (2975), ``val`` (500); ``labeled_1-30`` .. ``labeled_1-2`` = 100, 186, 372, 744, 1488 images. By
default (``split_lists="published"``) they are UniMatch's published lists shipped in
``workbench/data/splits/cityscapes`` (labeled and unlabeled, verbatim); ``split_lists="generated"``
(``--generated-splits``) draws them in one seeded order (nested), ``unlabeled_*`` = the rest of train. The manifest
recommends sliding-window evaluation (window = the 801 training crop, stride 2/3 of it, as UniMatch/CorrMatch
evaluate) and the papers train with OHEM (``method.loss: ohem``).

:func:`train_to_label_ids` turns train-id predictions back into label ids, the input format of the official
evaluation (``cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling``).
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from workbench.data.recipes.common import (BuildContext, BuildResult, describe_sources, encode_label_png, fraction_size,
                                           generated_splits, IGNORE_INDEX, label_splits, load_user_splits,
                                           palette_bytes, parallel_map, Recipe, RecipeError, Requirement, safe_path,
                                           Sample, Source, split_lines, use_published_splits)

LEFT = Requirement(
    "left", "leftImg8bit_trainvaltest.zip", "Cityscapes images, 11 GB (cityscapes-dataset.com, packageID=3)",
    md5="0a6e97e94b616a514066c9e2adb0c97f",
    checksum_source="md5 listed on https://www.cityscapes-dataset.com/downloads/ for leftImg8bit_trainvaltest.zip",
    tree_dirs=("leftImg8bit", "leftImg8bit_trainvaltest/leftImg8bit"), tree_marker="train")
GTFINE = Requirement(
    "gtfine", "gtFine_trainvaltest.zip", "Cityscapes fine annotations, 241 MB (packageID=1)",
    md5="4237c19de34c8a376e9ba46b495d6f66",
    checksum_source="md5 listed on https://www.cityscapes-dataset.com/downloads/ for gtFine_trainvaltest.zip",
    tree_dirs=("gtFine", "gtFine_trainvaltest/gtFine"), tree_marker="train")

FRACTIONS = {"1-30": (1, 30), "1-16": (1, 16), "1-8": (1, 8), "1-4": (1, 4), "1-2": (1, 2)}
"""Split name -> fraction of the 2975 train images (100, 186, 372, 744, 1488)."""
PUBLISHED = "cityscapes"
"""Folder of the shipped published lists (:data:`~.common.PUBLISHED_SPLITS`)."""
SLIDING_EVAL = {"mode": "sliding", "window": 801, "stride": 534,
                "note": "UniMatch/CorrMatch: sliding window of the 801 training crop, stride int(2/3 x 801); tiles "
                        "at 0, 534, 1068, 1602, border tiles clipped, tile softmaxes summed "
                        "(eval.sliding_tiles=clipped_sum)"}
GT_PATTERN = r"(?:^|/)gtFine/(?P<split>train|val)/(?P<city>[^/]+)/(?P<stem>[^/]+)_gtFine_labelIds\.png$"
IMG_PATTERN = r"(?:^|/)leftImg8bit/(?P<split>train|val)/(?P<city>[^/]+)/(?P<stem>[^/]+)_leftImg8bit\.png$"


def _labels():
    """cityscapesscripts' label table (RecipeError when the package is missing)."""
    try:
        from cityscapesscripts.helpers.labels import labels
    except ImportError:
        raise RecipeError("the Cityscapes recipe needs the 'cityscapes' extra: pip install -e '.[cityscapes]'") from None
    return labels


def train_classes() -> tuple[list[str], list[list[int]]]:
    """Names and colours of the 19 train ids, in train-id order (from cityscapesscripts)."""
    rows = sorted((lab.trainId, lab.name, list(lab.color)) for lab in _labels() if 0 <= lab.trainId < 255)
    if [r[0] for r in rows] != list(range(19)):
        raise RecipeError(f"cityscapesscripts lists train ids {[r[0] for r in rows]}, expected 0..18")
    return [r[1] for r in rows], [r[2] for r in rows]


def label_to_train_lut() -> np.ndarray:
    """uint8 [256] lookup table: label id -> train id (0..18), 255 for every id that is not evaluated."""
    lut = np.full(256, IGNORE_INDEX, np.uint8)
    for lab in _labels():
        if 0 <= lab.id < 256 and 0 <= lab.trainId < 255 and not lab.ignoreInEval:
            lut[lab.id] = lab.trainId
    return lut


def train_to_label_ids(pred: np.ndarray) -> np.ndarray:
    """Train-id predictions (0..18) -> label ids (uint8), the format the official evaluation reads."""
    inv = np.zeros(256, np.uint8)
    for lab in _labels():
        if 0 <= lab.trainId < 255 and not lab.ignoreInEval:
            inv[lab.trainId] = lab.id
    pred = np.asarray(pred)
    if pred.size and (pred.min() < 0 or pred.max() >= 19):
        raise ValueError(f"predictions must be train ids 0..18, got values in [{pred.min()}, {pred.max()}]")
    return inv[pred.astype(np.int64)]


def _convert(job: tuple[str, bytes, str, np.ndarray, list[int]]) -> tuple[str, bytes]:
    """(output path, labelIds PNG bytes, name, lut, palette) -> (output path, train-id palette PNG bytes); a
    process-pool job."""
    rel, data, name, lut, pal = job
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode not in ("L", "P"):
                raise RecipeError(f"{name}: mode {im.mode}, expected a single-channel 8-bit labelIds PNG")
            arr = np.asarray(im)
    except OSError as e:
        raise RecipeError(f"{name}: unreadable PNG ({e})") from None
    return rel, encode_label_png(lut[arr], pal)


def cityscapes_key(token: str) -> str:
    """Sample key of a split-list token: ``<city>_<seq>_<frame>`` (file suffixes such as ``_leftImg8bit`` and
    ``_gtFine_labelTrainIds`` dropped)."""
    name = token.replace("\\", "/").rsplit("/", 1)[-1]
    parts = name.split("_")
    return "_".join(parts[:3]) if len(parts) >= 3 else name.rsplit(".", 1)[0]


def build(out: Path, sources: dict[str, Source], ctx: BuildContext) -> BuildResult:
    """Convert the Cityscapes archives into ``out`` (see the module docstring)."""
    names, colours = train_classes()
    lut, pal = label_to_train_lut(), palette_bytes(colours)
    masks: dict[str, str] = {}

    def jobs():
        """Conversion jobs, one per labelIds PNG, in archive order."""
        for mem in sources["gtfine"].stream(GT_PATTERN, "gtFine", ctx.progress):
            g = mem.match.groupdict()
            rel = f"masks/{g['split']}/{g['city']}/{g['stem']}.png"
            masks[g["split"] + "/" + g["stem"]] = rel
            yield rel, mem.read(), f"{sources['gtfine'].path}:{mem.name}", lut, pal

    for rel, png in parallel_map(_convert, jobs(), ctx.workers):
        path = safe_path(out, rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
    images: dict[str, str] = {}
    for mem in sources["left"].stream(IMG_PATTERN, "leftImg8bit", ctx.progress):
        g = mem.match.groupdict()
        rel = f"images/{g['split']}/{g['city']}/{g['stem']}_leftImg8bit.png"
        mem.copy_to(safe_path(out, rel))
        images[g["split"] + "/" + g["stem"]] = rel
    for key in sorted(set(images) ^ set(masks)):
        what = "label (gtFine ..._gtFine_labelIds.png)" if key in images else "image (leftImg8bit)"
        raise RecipeError(f"Cityscapes {key}: no {what}; are both archives complete?")
    samples = {k: Sample(k.split("/", 1)[1], images[k], masks[k]) for k in sorted(images)}
    train = [s for k, s in samples.items() if k.startswith("train/")]
    val = [s for k, s in samples.items() if k.startswith("val/")]
    if not train or not val:
        raise RecipeError(f"Cityscapes archives hold {len(train)} train and {len(val)} val images; need both")
    splits = {"train": split_lines(train), "val": split_lines(val)}
    sizes = {n: fraction_size(len(train), *f) for n, f in FRACTIONS.items()}
    sources_of = generated_splits(splits, train, sizes, ctx.seed)
    use_published_splits(ctx, PUBLISHED, splits, sources_of, train, cityscapes_key,
                         check_lists={"val.txt": {s.key for s in val}})
    if ctx.splits_dir is not None:
        for name, (lab, unl) in load_user_splits(ctx.splits_dir, {s.key: s for s in train}, train,
                                                 cityscapes_key).items():
            label_splits(splits, name, lab, unl)
            sources_of[name] = f"user-provided, verbatim: {ctx.splits_dir}"
    manifest = {
        "name": "cityscapes", "num_classes": 19, "class_names": names, "palette": colours,
        "label_splits": list(sources_of), "split_source": describe_sources(sources_of, ctx),
        "split_sources": sources_of, "recommended_eval": SLIDING_EVAL,
        "recommended_loss": {"method.loss": "ohem", "method.ohem_thresh": 0.7, "method.ohem_min_kept": 200000,
                             "method.ohem_min_kept_images": 2},
        "unlabeled_gt": "diagnostics-only",
        "labels": "gtFine labelIds -> trainIds with cityscapesscripts.helpers.labels; ignored ids -> 255",
    }
    return BuildResult(manifest, splits)


def write_prediction(pred: np.ndarray, path: Path) -> None:
    """Save a train-id prediction [H, W] as a label-id PNG for the official evaluation script."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(train_to_label_ids(pred)).save(path)


RECIPE = Recipe("cityscapes", 1, (LEFT, GTFINE), build,
                "Cityscapes fine: 19 train ids, 2975/500, published splits 1/30..1/2 (100..1488), sliding-window eval",
                published=PUBLISHED)
