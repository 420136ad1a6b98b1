"""COCO 2017 with 81 classes (background + the 80 thing categories): UniMatch's COCO protocol.

Inputs (in ``--archives`` or the root): ``train2017.zip``, ``val2017.zip`` and ``annotations_trainval2017.zip`` (or
the extracted ``train2017/``, ``val2017/`` and ``annotations/`` folders).

Path chosen: masks are rasterised from the *instance annotations* (``annotations/instances_{train,val}2017.json``)
with this module's own code, so neither pycocotools nor the separately distributed stuff-thing maps are needed.
Classes: 0 = background, 1..80 = the JSON's categories sorted by id (COCO's ids 1..90 have gaps). Per image, the
annotations are painted largest area first, so a smaller object lying on a larger one stays visible; polygons are
filled with PIL (the filled area includes the outline pixels, which can differ from pycocotools by a pixel along
the border); RLE segmentations (``iscrowd=1``: uncompressed ``counts`` lists, or the compressed string form) are
decoded here (:func:`rle_decode`) and painted with their class like any other annotation. Pixels covered by no
annotation are background; nothing is ignored (255 does not occur). UniMatch's published masks cannot be
reproduced bit for bit (they were made with other tools); the conversion rule above is what this recipe promises.

Splits: ``train`` (118287), ``val`` (5000, evaluated on original images as UniMatch does); ``labeled_1-512`` ..
``labeled_1-32`` = 232, 463, 925, 1849, 3697 images (1/512 .. 1/32, rounded up). By default
(``split_lists="published"``) the labeled lists are UniMatch's published ones shipped in
``workbench/data/splits/coco`` (verbatim) and ``unlabeled_*`` = train minus the labeled images (no unlabeled lists
were published with them); ``split_lists="generated"`` (``--generated-splits``) draws them in one seeded order
(nested).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from workbench.data.recipes.common import (BuildContext, BuildResult, describe_sources, encode_label_png, fraction_size,
                                           generated_splits, label_splits, load_user_splits, palette_bytes,
                                           parallel_map, Recipe, RecipeError, Requirement, safe_path, Sample, Source,
                                           split_lines, use_published_splits, voc_palette)

_SRC = "md5 published with COCO's download links (images.cocodataset.org), e.g. in PaddleDetection's dataset list"
TRAIN = Requirement("train", "train2017.zip", "COCO train2017 images, 18 GB", md5="cced6f7f71b7629ddf16f17bbcfab6b2",
                    checksum_source=_SRC, url="http://images.cocodataset.org/zips/train2017.zip",
                    tree_dirs=("train2017",), tree_marker="")
VAL = Requirement("val", "val2017.zip", "COCO val2017 images, 0.8 GB", md5="442b8da7639aecaf257c1dceb8ba8c80",
                  checksum_source=_SRC, url="http://images.cocodataset.org/zips/val2017.zip",
                  tree_dirs=("val2017",), tree_marker="")
ANNOTATIONS = Requirement("ann", "annotations_trainval2017.zip", "COCO 2017 annotations, 241 MB",
                          md5="f4bbac642086de4f52a3fdda2de5fa2c", checksum_source=_SRC,
                          url="http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
                          tree_dirs=("annotations",), tree_marker="instances_val2017.json")

FRACTIONS = {"1-512": (1, 512), "1-256": (1, 256), "1-128": (1, 128), "1-64": (1, 64), "1-32": (1, 32)}
"""Split name -> fraction of the 118287 train images (232, 463, 925, 1849, 3697)."""
PUBLISHED = "coco"
"""Folder of the shipped published lists (:data:`~.common.PUBLISHED_SPLITS`)."""
ANN_PATTERN = r"(?:^|/)annotations/instances_(?P<split>train|val)2017\.json$"


def rle_counts(counts: list[int] | str) -> list[int]:
    """Run lengths of a COCO RLE: a list of ints as is, or the compressed string form decoded.

    The string form stores each count in 5-bit groups (characters offset by 48, bit 0x20 = more groups follow,
    bit 0x10 of the last group = negative); from the third count on, the value is a difference to the count two
    places back.
    """
    if isinstance(counts, list):
        return [int(c) for c in counts]
    if not isinstance(counts, str):
        raise ValueError(f"RLE counts must be a list or a string, got {type(counts).__name__}")
    out: list[int] = []
    p = 0
    while p < len(counts):
        x, k, more = 0, 0, True
        while more:
            if p >= len(counts):
                raise ValueError("truncated compressed RLE string")
            c = ord(counts[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """bool [H, W] of a COCO RLE ``{"size": [H, W], "counts": ...}``: runs alternate 0s and 1s (starting with 0s)
    over the pixels in column-major order."""
    h, w = (int(v) for v in rle["size"])
    counts = rle_counts(rle["counts"])
    if any(c < 0 for c in counts) or sum(counts) != h * w:
        raise ValueError(f"RLE counts sum to {sum(counts)}, expected {h} x {w} = {h * w}")
    flat = np.zeros(h * w, bool)
    pos = 0
    for i, c in enumerate(counts):
        if i % 2:
            flat[pos:pos + c] = True
        pos += c
    return flat.reshape(w, h).T


def rasterize(anns: list[dict[str, Any]], height: int, width: int, cat_index: dict[int, int]) -> np.ndarray:
    """uint8 [H, W] class mask of one image's annotations (see the module docstring for the rules)."""
    mask = np.zeros((height, width), np.uint8)
    for ann in sorted(anns, key=lambda a: -float(a.get("area", 0.0))):
        cls = cat_index[int(ann["category_id"])]
        seg = ann.get("segmentation")
        if isinstance(seg, list):
            canvas = Image.new("L", (width, height), 0)
            draw = ImageDraw.Draw(canvas)
            for poly in seg:
                if len(poly) >= 6:
                    draw.polygon([(float(poly[i]), float(poly[i + 1])) for i in range(0, len(poly) - 1, 2)], fill=1)
            region = np.asarray(canvas, bool)
        elif isinstance(seg, dict):
            region = rle_decode(seg)
            if region.shape != (height, width):
                raise ValueError(f"annotation {ann.get('id')}: RLE size {region.shape} != image {height}x{width}")
        else:
            continue
        mask[region] = cls
    return mask


def _mask_job(job: tuple[str, list[dict[str, Any]], int, int, dict[int, int], list[int], str]) -> tuple[str, bytes]:
    """(output path, annotations, H, W, category map, palette, name) -> (output path, mask PNG bytes)."""
    rel, anns, h, w, cat_index, pal, name = job
    try:
        return rel, encode_label_png(rasterize(anns, h, w, cat_index), pal)
    except (ValueError, KeyError, TypeError) as e:
        raise RecipeError(f"{name}: cannot rasterise the annotations: {e}") from None


def build(out: Path, sources: dict[str, Source], ctx: BuildContext) -> BuildResult:
    """Convert the COCO archives into ``out`` (see the module docstring)."""
    categories: list[dict[str, Any]] | None = None
    wanted: dict[str, dict[str, str]] = {}
    pal: list[int] = []
    cat_index: dict[int, int] = {}
    for mem in sources["ann"].stream(ANN_PATTERN, "COCO annotations", ctx.progress):
        split = mem.match.group("split")
        name = f"{sources['ann'].path}:{mem.name}"
        try:
            data = json.loads(mem.read())
            cats = sorted(({"id": int(c["id"]), "name": str(c["name"])} for c in data["categories"]),
                          key=lambda c: c["id"])
            images, anns = data["images"], data["annotations"]
        except (ValueError, KeyError, TypeError) as e:
            raise RecipeError(f"{name}: not a COCO instances file ({e})") from None
        del data
        if categories is None:
            categories = cats
            cat_index = {c["id"]: i + 1 for i, c in enumerate(cats)}
            pal = palette_bytes(voc_palette(len(cats) + 1))
        elif cats != categories:
            raise RecipeError(f"{name}: categories differ from the other split's annotation file")
        per_image: dict[int, list[dict[str, Any]]] = {}
        for a in anns:
            per_image.setdefault(int(a["image_id"]), []).append(a)
        unknown = sorted({int(a["category_id"]) for a in anns} - set(cat_index))
        if unknown:
            raise RecipeError(f"{name}: annotations use category ids {unknown[:5]} that are not in 'categories'")
        del anns
        files: dict[str, str] = {}
        jobs = []
        for im in images:
            fname = str(im["file_name"])
            stem = fname.rsplit(".", 1)[0]
            rel = f"masks/{split}2017/{stem}.png"
            safe_path(out, rel)
            files[fname] = rel
            jobs.append((rel, per_image.get(int(im["id"]), []), int(im["height"]), int(im["width"]), cat_index, pal,
                         f"{name} image {fname}"))
        wanted[split] = files
        for rel, png in parallel_map(_mask_job, jobs, ctx.workers):
            path = out / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png)
    for split in ("train", "val"):
        if split not in wanted:
            raise RecipeError(f"{sources['ann'].path}: annotations/instances_{split}2017.json not found")
    assert categories is not None
    samples: dict[str, list[Sample]] = {}
    for split, key in (("train", "train"), ("val", "val")):
        present: dict[str, str] = {}
        pattern = rf"(?:^|/){split}2017/(?P<file>[^/]+\.jpg)$"
        for mem in sources[key].stream(pattern, f"{split}2017", ctx.progress):
            fname = mem.match.group("file")
            if fname in wanted[split]:
                rel = f"images/{split}2017/{fname}"
                mem.copy_to(safe_path(out, rel))
                present[fname] = rel
        missing = sorted(set(wanted[split]) - set(present))
        if missing:
            raise RecipeError(f"{sources[key].path}: {len(missing)} image(s) of instances_{split}2017.json are "
                              f"missing, e.g. {split}2017/{missing[0]}")
        samples[split] = [Sample(f.rsplit(".", 1)[0], present[f], wanted[split][f]) for f in sorted(present)]
    train = samples["train"]
    splits = {"train": split_lines(train), "val": split_lines(samples["val"])}
    sizes = {n: fraction_size(len(train), *f) for n, f in FRACTIONS.items()}
    sources_of = generated_splits(splits, train, sizes, ctx.seed)
    use_published_splits(ctx, PUBLISHED, splits, sources_of, train,
                         check_lists={"val.txt": {s.key for s in samples["val"]}})
    if ctx.splits_dir is not None:
        for name, (lab, unl) in load_user_splits(ctx.splits_dir, {s.key: s for s in train}, train).items():
            label_splits(splits, name, lab, unl)
            sources_of[name] = f"user-provided, verbatim: {ctx.splits_dir}"
    names = ["background"] + [c["name"] for c in categories]
    manifest = {
        "name": "coco2017", "num_classes": len(names), "class_names": names,
        "palette": voc_palette(len(names)), "label_splits": list(sources_of),
        "split_source": describe_sources(sources_of, ctx), "split_sources": sources_of,
        "category_ids": {str(c["id"]): i + 1 for i, c in enumerate(categories)},
        "recommended_eval": {"mode": "original", "note": "UniMatch evaluates COCO on original images"},
        "unlabeled_gt": "diagnostics-only",
        "labels": "rasterised from instances_*.json: background 0, categories 1..80 by sorted id, largest area "
                  "painted first, crowd RLEs painted with their class",
    }
    return BuildResult(manifest, splits)


RECIPE = Recipe("coco", 1, (TRAIN, VAL, ANNOTATIONS), build,
                "COCO 2017, 81 classes from the instance annotations; published splits 1/512..1/32 (232..3697)",
                published=PUBLISHED)
