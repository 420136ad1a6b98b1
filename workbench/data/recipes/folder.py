"""A researcher's own data: a folder of images, masks for the labeled ones, and a small YAML file.

Input folder (``--archives DIR``; it must not be the dataset root, whose ``images/`` and ``masks/`` the recipe
writes)::

    DIR/dataset.yaml
    DIR/images/<name>.<jpg|jpeg|png|tif|tiff|bmp>   every image (sub-folders allowed)
    DIR/masks/<name>.png                           only for labeled images, same relative name

``dataset.yaml`` keys (unknown keys are errors)::

    classes: [background, cell, nucleus]      # required, at least 2; class i = mask value i
    palette: [[0, 0, 0], [255, 0, 0], ...]    # optional colours (default: the VOC colour map)
    name: my-cells                            # optional (default: the folder name)
    mask_encoding: index                      # "index" (L/P PNG of class ids) or "color" (RGB PNG in palette colours)
    ignore_value: 255                         # index masks: the value meaning "not annotated" (becomes 255)
    ignore_color: [224, 224, 192]             # color masks: the colour meaning "not annotated"
    val: val.txt                              # optional file (relative to DIR) naming the validation images, or
    val_fraction: 0.2                         # the share of labeled images held out for validation (seeded)
    label_fractions: ["1-8", "1-4", "1-2"]    # label splits, as fractions of the labeled training images

Output: the same manifest/split layout as every other recipe, so every method runs on it unchanged: masks are
re-encoded as palette PNGs of class indices (255 = ignore); ``train`` = the labeled non-validation images,
``val``; ``labeled_<f>`` = a seeded ``f`` of ``train`` (rounded up), ``unlabeled_<f>`` = the rest of ``train`` plus
every image without a mask; and, when there are mask-less images, ``labeled_full`` = all of ``train`` with
``unlabeled_full`` = the mask-less images.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from workbench.data.recipes.common import (BuildContext, BuildResult, Recipe, RecipeError, Requirement, Sample, Source,
                                           complement, describe_sources, encode_label_png, fraction_size,
                                           generated_splits, label_splits, load_user_splits, palette_bytes,
                                           parse_fraction, permuted, safe_path, split_lines, voc_palette)

CONFIG = Requirement("folder", "dataset.yaml", "your dataset folder: dataset.yaml, images/, masks/", kind="file")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
KEYS = {"classes", "palette", "name", "mask_encoding", "ignore_value", "ignore_color", "val", "val_fraction",
        "label_fractions"}


def read_config(path: Path) -> dict[str, Any]:
    """Parse and check ``dataset.yaml``; RecipeError naming the file and the bad key."""
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise RecipeError(f"{path}: cannot read ({e})") from None
    if not isinstance(cfg, dict):
        raise RecipeError(f"{path}: expected a mapping of keys")
    unknown = sorted(set(cfg) - KEYS)
    if unknown:
        raise RecipeError(f"{path}: unknown key(s) {unknown}; valid keys are {sorted(KEYS)}")
    classes = cfg.get("classes")
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) and c for c in classes):
        raise RecipeError(f"{path}: classes must be a list of at least 2 names")
    if len(set(classes)) != len(classes) or len(classes) > 255:
        raise RecipeError(f"{path}: classes must be distinct and at most 255")
    k = len(classes)
    palette = cfg.get("palette", voc_palette(k))
    if (not isinstance(palette, list) or len(palette) != k
            or not all(isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
                       for c in palette)):
        raise RecipeError(f"{path}: palette must list one [r, g, b] (0..255) per class ({k})")
    enc = cfg.get("mask_encoding", "index")
    if enc not in ("index", "color"):
        raise RecipeError(f"{path}: mask_encoding must be 'index' or 'color', got {enc!r}")
    if enc == "color" and len({tuple(c) for c in palette}) != k:
        raise RecipeError(f"{path}: color masks need distinct palette colours")
    ignore_value = cfg.get("ignore_value", 255)
    if not isinstance(ignore_value, int) or not k <= ignore_value <= 255:
        raise RecipeError(f"{path}: ignore_value must be an integer in [{k}, 255], got {ignore_value!r}")
    ignore_color = cfg.get("ignore_color", [224, 224, 192])
    if not (isinstance(ignore_color, list) and len(ignore_color) == 3):
        raise RecipeError(f"{path}: ignore_color must be [r, g, b]")
    val_fraction = cfg.get("val_fraction", 0.2)
    if "val" in cfg and "val_fraction" in cfg:
        raise RecipeError(f"{path}: give either val (a list file) or val_fraction, not both")
    if not isinstance(val_fraction, (int, float)) or isinstance(val_fraction, bool) or not 0 < val_fraction < 1:
        raise RecipeError(f"{path}: val_fraction must be a number in (0, 1), got {val_fraction!r}")
    fractions = cfg.get("label_fractions", ["1-8", "1-4", "1-2"])
    if not isinstance(fractions, list) or not fractions:
        raise RecipeError(f"{path}: label_fractions must be a non-empty list such as ['1-8', '1-4']")
    for f in fractions:
        try:
            parse_fraction(str(f))
        except ValueError as e:
            raise RecipeError(f"{path}: label_fractions: {e}") from None
    if "val" in cfg and not isinstance(cfg["val"], str):
        raise RecipeError(f"{path}: val must be the name of a text file listing validation images")
    return {"classes": classes, "palette": palette, "name": str(cfg.get("name", path.parent.name)),
            "mask_encoding": enc, "ignore_value": ignore_value, "ignore_color": [int(v) for v in ignore_color],
            "val": cfg.get("val"), "val_fraction": float(val_fraction), "label_fractions": [str(f) for f in fractions]}


def convert_mask(data: bytes, cfg: dict[str, Any], name: str) -> np.ndarray:
    """A user mask (PNG bytes) -> uint8 [H, W] class ids with 255 = ignore; RecipeError naming ``name``."""
    k = len(cfg["classes"])
    try:
        with Image.open(io.BytesIO(data)) as im:
            mode = im.mode
            arr = np.asarray(im.convert("RGB") if cfg["mask_encoding"] == "color" else im)
    except OSError as e:
        raise RecipeError(f"{name}: unreadable mask ({e})") from None
    if cfg["mask_encoding"] == "index":
        if mode not in ("L", "P"):
            raise RecipeError(f"{name}: mode {mode}; index masks must be greyscale (L) or palette (P) PNGs holding "
                              "class ids (or set mask_encoding: color)")
        out = arr.astype(np.uint8).copy()
        ign = arr == cfg["ignore_value"]
        bad = (arr >= k) & ~ign
        if bad.any():
            raise RecipeError(f"{name}: values {sorted(set(np.unique(arr[bad]).tolist()))[:8]} are neither class "
                              f"ids (0..{k - 1}) nor ignore_value {cfg['ignore_value']}")
        out[ign] = 255
        return out
    code = (arr[..., 0].astype(np.int64) << 16) | (arr[..., 1].astype(np.int64) << 8) | arr[..., 2]
    lut = {(r << 16) | (g << 8) | b: i for i, (r, g, b) in enumerate(cfg["palette"])}
    r, g, b = cfg["ignore_color"]
    lut[(r << 16) | (g << 8) | b] = 255
    uniq, inv = np.unique(code, return_inverse=True)
    unknown = [int(u) for u in uniq if int(u) not in lut]
    if unknown:
        u = unknown[0]
        raise RecipeError(f"{name}: colour {[(u >> 16) & 255, (u >> 8) & 255, u & 255]} is not in the palette "
                          "(nor ignore_color)")
    return np.asarray([lut[int(u)] for u in uniq], np.uint8)[inv.reshape(code.shape)]


def build(out: Path, sources: dict[str, Source], ctx: BuildContext) -> BuildResult:
    """Convert the folder into ``out`` (see the module docstring)."""
    src = sources["folder"].path.parent
    cfg = read_config(sources["folder"].path)
    img_dir, mask_dir = src / "images", src / "masks"
    if not img_dir.is_dir():
        raise RecipeError(f"{img_dir} not found: put every image in images/")
    images: dict[str, Path] = {}
    for p in sorted(img_dir.rglob("*")):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
            key = p.relative_to(img_dir).with_suffix("").as_posix()
            if key in images:
                raise RecipeError(f"{p} and {images[key]} have the same name; names must be unique")
            images[key] = p
    if not images:
        raise RecipeError(f"{img_dir}: no images ({', '.join(IMAGE_EXTS)})")
    masks: dict[str, Path] = {}
    if mask_dir.is_dir():
        for p in sorted(mask_dir.rglob("*.png")):
            key = p.relative_to(mask_dir).with_suffix("").as_posix()
            if key not in images:
                raise RecipeError(f"mask {p} has no image images/{key}.*")
            masks[key] = p
    if len(masks) < 2:
        raise RecipeError(f"{mask_dir}: need masks for at least 2 images (one to train, one to validate)")
    pal = palette_bytes(cfg["palette"])
    samples: dict[str, Sample] = {}
    for key, ip in images.items():
        rel_img = f"images/{ip.relative_to(img_dir).as_posix()}"
        dest = safe_path(out, rel_img)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            dest.hardlink_to(ip)
        except OSError:
            dest.write_bytes(ip.read_bytes())
        rel_mask = None
        try:   # every image decoded, unlabeled ones too: a corrupt file stops here, not in a training worker
            with Image.open(ip) as im:
                w, h = im.size
                im.load()
        except (OSError, ValueError) as e:
            raise RecipeError(f"cannot read image {ip}: {e}") from None
        if key in masks:
            arr = convert_mask(masks[key].read_bytes(), cfg, str(masks[key]))
            if arr.shape != (h, w):
                raise RecipeError(f"mask {masks[key]} is {arr.shape[0]}x{arr.shape[1]} but image {ip} is {h}x{w}")
            rel_mask = f"masks/{key}.png"
            mp = safe_path(out, rel_mask)
            mp.parent.mkdir(parents=True, exist_ok=True)
            mp.write_bytes(encode_label_png(arr, pal))
        samples[key] = Sample(key, rel_img, rel_mask)
    labeled = [s for s in samples.values() if s.mask is not None]
    maskless = [s for s in samples.values() if s.mask is None]
    if cfg["val"]:
        vpath = src / cfg["val"]
        if not vpath.is_file():
            raise RecipeError(f"{sources['folder'].path}: val file {vpath} not found")
        val_keys = []
        for n, line in enumerate(vpath.read_text().splitlines(), 1):
            tok = line.strip()
            if not tok:
                continue
            key = tok[len("images/"):] if tok.startswith("images/") else tok
            key = key.rsplit(".", 1)[0] if Path(key).suffix.lower() in IMAGE_EXTS else key
            if key not in samples or samples[key].mask is None:
                raise RecipeError(f"{vpath}:{n}: {tok!r} is not a labeled image (images/ + masks/)")
            val_keys.append(key)
        val = [samples[k] for k in dict.fromkeys(val_keys)]
    else:
        n_val = max(1, round(cfg["val_fraction"] * len(labeled)))
        val = sorted(permuted(labeled, ctx.seed, 0)[:n_val], key=lambda s: s.key)
    train = complement(labeled, val)
    if not train:
        raise RecipeError(f"{src}: every labeled image is in the validation set; nothing is left to train on")
    splits = {"train": split_lines(train), "val": split_lines(val)}
    sizes = {f: fraction_size(len(train), *parse_fraction(f)) for f in cfg["label_fractions"]}
    sources_of = generated_splits(splits, train, sizes, ctx.seed, maskless)
    if maskless:
        label_splits(splits, "full", train, maskless)
        sources_of["full"] = "all labeled training images; unlabeled = the images without masks"
    if ctx.splits_dir is not None:
        pool = train + maskless
        for name, (lab, unl) in load_user_splits(ctx.splits_dir, {s.key: s for s in pool}, pool,
                                                 lambda t: folder_key(t, samples)).items():
            label_splits(splits, name, lab, unl)
            sources_of[name] = f"user-provided, verbatim: {ctx.splits_dir}"
    manifest = {
        "name": cfg["name"], "num_classes": len(cfg["classes"]), "class_names": cfg["classes"],
        "palette": cfg["palette"], "label_splits": list(sources_of),
        "split_source": describe_sources(sources_of, ctx), "split_sources": sources_of,
        "source_folder": str(src), "recommended_eval": {"mode": "original"}, "unlabeled_gt": "diagnostics-only",
        "labels": f"{cfg['mask_encoding']} masks re-encoded as class-index palette PNGs (255 = ignore)",
    }
    return BuildResult(manifest, splits)


def folder_key(token: str, samples: dict[str, Sample]) -> str:
    """Sample key of a split-list token: the path below ``images/`` without extension."""
    key = token.replace("\\", "/")
    key = key[len("images/"):] if key.startswith("images/") else key
    return key.rsplit(".", 1)[0] if key.rsplit(".", 1)[0] in samples else key


RECIPE = Recipe("folder", 1, (CONFIG,), build,
                "your own data: images/, masks/ (labeled images only), dataset.yaml with classes and palette")
