"""Pascal VOC 2012 + SBD: the "classic", "blender" (CPS) and U2PL-style semi-supervised protocols.

Inputs (in ``--archives`` or the root): ``VOCtrainval_11-May-2012.tar`` and SBD's ``benchmark.tgz`` (or their
extracted ``VOCdevkit/VOC2012/`` and ``benchmark_RELEASE/dataset/`` folders).

Labels: the 2913 VOC segmentation images keep their official ``SegmentationClass`` PNGs byte for byte (palette PNG,
object borders = 255, ignored). Every other training image takes its SBD label: the ``GTcls.Segmentation`` array of
``cls/<id>.mat`` (read with ``scipy.io.loadmat``; values 0..20, no borders), written as a palette PNG with the VOC
colours. Images are VOC's ``JPEGImages`` (SBD's ``img/`` fills any gap).

Sets: ``train`` = the 10582 "aug" images (VOC train + SBD train + SBD val, minus VOC val), ``train_classic`` = VOC
train (1464), ``val`` = VOC val (1449, evaluated on original images). Label splits (``labeled_<name>`` /
``unlabeled_<name>``; the unlabeled list is ``train`` minus the labeled images, as UniMatch does):

- classic ``92``, ``183``, ``366``, ``732``, ``1464``: 1/16, 1/8, 1/4, 1/2, 1 of VOC train (rounded up);
- blender ``1-16``, ``1-8``, ``1-4``, ``1-2``: 662, 1323, 2646, 5291 of the 10582 (CPS-style);
- U2PL ``u2pl_1-16`` .. ``u2pl_1-2``: the same sizes, the 1464 finely annotated images first (1/16 and 1/8 hold only
  fine labels, 1/4 all of them; CorrMatch and MaskMatch describe U2PL's blender partition this way).

By default (``split_lists="published"``) every split with a published list takes it verbatim from the lists shipped
in ``workbench/data/splits/pascal`` (UniMatch's partitions, which CorrMatch, RankMatch, ScaleMatch and S4MIM reuse:
classic 92..1464, blender 1/16..1/4, U2PL 1/16..1/4); a prepared dataset lacking any listed image fails with one
error naming how many keys are missing. No 1/2 blender or U2PL list was published: those two are generated (the
manifest's ``split_sources`` says so). ``split_lists="generated"`` (``--generated-splits``) draws every split from
one seeded order per family instead (smaller splits nest in larger ones; ``"generated, seed N"``). ``--splits DIR``
replaces splits of the same name by the user's lists, verbatim (see :func:`~.common.load_user_splits`).
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from workbench.data.recipes.common import (BuildContext, BuildResult, complement, describe_sources, encode_label_png,
                                           fraction_size, image_size, label_splits, load_user_splits, nested_prefixes,
                                           palette_bytes, permuted, Recipe, RecipeError, Requirement, safe_path, Sample,
                                           Source, split_lines, use_published_splits, voc_palette)

CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
           "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
NUM_CLASSES = len(CLASSES)

VOC = Requirement(
    "voc", "VOCtrainval_11-May-2012.tar", "Pascal VOC 2012 trainval, 1.9 GB",
    md5="6cd6e144f989b92b3379bac3b3de84fd",
    checksum_source="torchvision.datasets.VOCSegmentation (DATASET_YEAR_DICT['2012']['md5'])",
    url="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
    tree_dirs=("VOCdevkit/VOC2012", "VOC2012"), tree_marker="ImageSets/Segmentation/train.txt")
SBD = Requirement(
    "sbd", "benchmark.tgz", "SBD, Hariharan et al. 2011, 1.4 GB",
    md5="82b4d87ceb2ed10f6038a1cba92111cb", checksum_source="torchvision.datasets.SBDataset.md5",
    url="https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz",
    tree_dirs=("benchmark_RELEASE/dataset", "dataset"), tree_marker="cls")

PUBLISHED = "pascal"
"""Folder of the shipped published lists (:data:`~.common.PUBLISHED_SPLITS`)."""
CLASSIC = {"92": (1, 16), "183": (1, 8), "366": (1, 4), "732": (1, 2), "1464": (1, 1)}
"""Classic split name -> fraction of VOC train (1464 -> 92, 183, 366, 732, 1464)."""
BLENDER = {"1-16": (1, 16), "1-8": (1, 8), "1-4": (1, 4), "1-2": (1, 2)}
"""Blender split name -> fraction of the 10582 aug set (662, 1323, 2646, 5291)."""

VOC_PATTERN = (r"(?:^|/)(?:JPEGImages/(?P<jpg>[^/]+)\.jpg|SegmentationClass/(?P<seg>[^/]+)\.png"
               r"|ImageSets/Segmentation/(?P<list>train|val)\.txt)$")
SBD_PATTERN = r"(?:^|/)(?:cls/(?P<mat>[^/]+)\.mat|img/(?P<jpg>[^/]+)\.jpg|(?P<list>train|val)\.txt)$"


def read_sbd_mat(data: bytes, name: str = "cls .mat") -> np.ndarray:
    """``GTcls.Segmentation`` of an SBD ``cls/*.mat`` file as uint8 [H, W]; RecipeError naming ``name`` otherwise."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise RecipeError("reading SBD's .mat labels needs scipy (installed with scikit-learn); pip install "
                          "scipy") from None
    try:
        mat = loadmat(io.BytesIO(data))
        seg = mat["GTcls"]["Segmentation"][0, 0]
    except (ValueError, KeyError, IndexError, TypeError, NotImplementedError) as e:
        raise RecipeError(f"{name}: not an SBD class label file (expected struct GTcls.Segmentation): {e}") from None
    seg = np.asarray(seg)
    if seg.ndim != 2:
        raise RecipeError(f"{name}: GTcls.Segmentation has shape {seg.shape}, expected [H, W]")
    if seg.size and (seg.min() < 0 or seg.max() >= NUM_CLASSES):
        raise RecipeError(f"{name}: label values {sorted(set(np.unique(seg).tolist()))[:8]} outside 0..20")
    return seg.astype(np.uint8)


def _check_voc_png(data: bytes, name: str) -> tuple[int, int]:
    """Validate a SegmentationClass PNG (palette, values 0..20 or 255); returns (H, W)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode not in ("P", "L"):
                raise RecipeError(f"{name}: mode {im.mode}, expected a palette PNG")
            arr = np.asarray(im)
    except OSError as e:
        raise RecipeError(f"{name}: unreadable PNG ({e})") from None
    bad = (arr >= NUM_CLASSES) & (arr != 255)
    if bad.any():
        raise RecipeError(f"{name}: values {sorted(set(np.unique(arr[bad]).tolist()))[:8]} outside 0..20 and 255")
    return arr.shape[0], arr.shape[1]


def _read_ids(data: bytes, name: str) -> list[str]:
    ids = [line.strip() for line in data.decode().splitlines() if line.strip()]
    if not ids:
        raise RecipeError(f"{name}: empty image list")
    return ids


def build(out: Path, sources: dict[str, Source], ctx: BuildContext) -> BuildResult:
    """Convert VOC + SBD into ``out`` (see the module docstring)."""
    pal = palette_bytes(voc_palette(NUM_CLASSES))
    jpgs: set[str] = set()
    voc_masks: dict[str, tuple[int, int]] = {}
    lists: dict[str, list[str]] = {}
    for mem in sources["voc"].stream(VOC_PATTERN, "VOC 2012", ctx.progress):
        g = mem.match.groupdict()
        if g["jpg"]:
            mem.copy_to(safe_path(out, f"images/{g['jpg']}.jpg"))
            jpgs.add(g["jpg"])
        elif g["seg"]:
            data = mem.read()
            voc_masks[g["seg"]] = _check_voc_png(data, f"{sources['voc'].path}:{mem.name}")
            safe_path(out, f"masks/{g['seg']}.png").parent.mkdir(parents=True, exist_ok=True)
            safe_path(out, f"masks/{g['seg']}.png").write_bytes(data)
        else:
            lists["voc_" + g["list"]] = _read_ids(mem.read(), f"{sources['voc'].path}:{mem.name}")
    for need in ("voc_train", "voc_val"):
        if need not in lists:
            raise RecipeError(f"{sources['voc'].path}: ImageSets/Segmentation/{need[4:]}.txt not found; is this the "
                              "VOC 2012 trainval archive?")
    voc_train, voc_val = lists["voc_train"], lists["voc_val"]
    fine = set(voc_train) | set(voc_val)
    for i in fine:
        if i not in voc_masks:
            raise RecipeError(f"{sources['voc'].path}: SegmentationClass/{i}.png is missing (listed in ImageSets)")

    sbd_masks: set[str] = set()
    for mem in sources["sbd"].stream(SBD_PATTERN, "SBD", ctx.progress):
        g = mem.match.groupdict()
        if g["mat"] and g["mat"] not in fine:
            seg = read_sbd_mat(mem.read(), f"{sources['sbd'].path}:{mem.name}")
            path = safe_path(out, f"masks/{g['mat']}.png")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode_label_png(seg, pal))
            sbd_masks.add(g["mat"])
        elif g["jpg"] and g["jpg"] not in jpgs:
            mem.copy_to(safe_path(out, f"images/{g['jpg']}.jpg"))
            jpgs.add(g["jpg"])
        elif g["list"]:
            lists["sbd_" + g["list"]] = _read_ids(mem.read(), f"{sources['sbd'].path}:{mem.name}")
    for need in ("sbd_train", "sbd_val"):
        if need not in lists:
            raise RecipeError(f"{sources['sbd'].path}: {need[4:]}.txt not found; is this SBD's benchmark.tgz?")

    val_set = set(voc_val)
    aug = sorted((set(voc_train) | set(lists["sbd_train"]) | set(lists["sbd_val"])) - val_set)
    for i in aug + voc_val:
        if i not in jpgs:
            raise RecipeError(f"image {i}.jpg is in the image lists but in neither VOC's JPEGImages nor SBD's img/")
        if i not in voc_masks and i not in sbd_masks:
            raise RecipeError(f"no label for {i}: neither VOC SegmentationClass/{i}.png nor SBD cls/{i}.mat")
    for i in sorted(sbd_masks & set(aug)):
        h, w = image_size(out / "images" / f"{i}.jpg")
        with Image.open(out / "masks" / f"{i}.png") as im:
            if im.size != (w, h):
                raise RecipeError(f"SBD cls/{i}.mat is {im.size[1]}x{im.size[0]} but image {i}.jpg is {h}x{w}")
    keep = set(aug) | val_set
    for sub, ext in (("images", ".jpg"), ("masks", ".png")):
        for p in (out / sub).iterdir():
            if p.name[: -len(ext)] not in keep:
                p.unlink()

    samples = {i: Sample(i, f"images/{i}.jpg", f"masks/{i}.png") for i in aug + voc_val}
    train = [samples[i] for i in aug]
    classic_pool = [samples[i] for i in sorted(voc_train)]
    splits: dict[str, list[str]] = {"train": split_lines(train), "val": split_lines([samples[i] for i in voc_val]),
                                    "train_classic": split_lines(classic_pool)}
    sizes_classic = {n: fraction_size(len(classic_pool), *f) for n, f in CLASSIC.items()}
    sizes_blender = {n: fraction_size(len(train), *f) for n, f in BLENDER.items()}
    fine_first = permuted(classic_pool, ctx.seed, 3) + permuted(complement(train, classic_pool), ctx.seed, 4)
    families = [(nested_prefixes(permuted(classic_pool, ctx.seed, 1), sizes_classic), ""),
                (nested_prefixes(permuted(train, ctx.seed, 2), sizes_blender), ""),
                (nested_prefixes(fine_first, sizes_blender), "u2pl_")]
    sources_of: dict[str, str] = {}
    for labeled_sets, prefix in families:
        for name, lab in labeled_sets.items():
            label_splits(splits, prefix + name, lab, complement(train, lab))
            sources_of[prefix + name] = f"generated, seed {ctx.seed}"
    use_published_splits(ctx, PUBLISHED, splits, sources_of, train,
                         check_lists={"val.txt": set(voc_val), "train_aug.txt": set(aug)})
    if ctx.splits_dir is not None:
        for name, (lab, unl) in load_user_splits(ctx.splits_dir, {s.key: s for s in train}, train).items():
            label_splits(splits, name, lab, unl)
            sources_of[name] = f"user-provided, verbatim: {ctx.splits_dir}"
    manifest = {
        "name": "pascal_voc_2012", "num_classes": NUM_CLASSES, "class_names": list(CLASSES),
        "palette": voc_palette(NUM_CLASSES), "label_splits": list(sources_of),
        "split_source": describe_sources(sources_of, ctx),
        "split_sources": sources_of,
        "protocols": {"classic": list(CLASSIC), "blender": list(BLENDER),
                      "u2pl": [f"u2pl_{n}" for n in BLENDER]},
        "recommended_eval": {"mode": "original", "note": "single scale, original image size (UniMatch protocol)"},
        "unlabeled_gt": "diagnostics-only",
        "labels": "VOC SegmentationClass PNGs verbatim (borders 255) for the 2913 VOC images; SBD GTcls "
                  "Segmentation for the other aug images",
    }
    return BuildResult(manifest, splits)


RECIPE = Recipe("voc", 1, (VOC, SBD), build,
                "Pascal VOC 2012 + SBD (10582 aug): classic 92..1464, blender 1/16..1/2, U2PL splits (published)",
                published=PUBLISHED)
