"""Dataset recipes on tiny fixture trees in the official on-disk layouts (VOC tar + SBD tgz, Cityscapes zips, COCO
zips, Lucchi TIFF stacks, a user folder): labels, split sizes, idempotence, failure modes, a training step on each,
and Cityscapes mIoU against cityscapesscripts' own evaluation."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import yaml
from PIL import Image

from workbench.config import config_from_dict, load_config
from workbench.data.dataset import EvalDataset, SegDataset, load_manifest
from workbench.data.recipes import RECIPES, RecipeError, coco, common, lucchi, prepare, voc
from workbench.data.recipes import cityscapes as cs
from workbench.data.recipes.common import Recipe, fraction_size, run_recipe
from workbench.engine.metrics import ConfusionMeter

from conftest import tiny_config_dict

REPO = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)


# ------------------------------------------------------------------------------------------------ helpers
def jpeg(h: int, w: int, seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def png(arr: np.ndarray, palette: bool = False) -> bytes:
    """PNG bytes: [H, W] -> greyscale (or a palette PNG with the VOC colours), [H, W, 3] -> RGB."""
    arr = np.asarray(arr).astype(np.uint8)
    if palette:
        im = Image.frombytes("P", (arr.shape[1], arr.shape[0]), arr.tobytes())
        im.putpalette(common.palette_bytes(common.voc_palette(21)))
    else:
        im = Image.fromarray(arr)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, files: dict[str, bytes], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def write_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def read_lines(root: Path, split: str) -> list[list[str]]:
    return [line.split() for line in (root / "splits" / f"{split}.txt").read_text().splitlines()]


def mask_of(root: Path, rel: str) -> np.ndarray:
    with Image.open(root / rel) as im:
        assert im.mode == "P"
        return np.asarray(im)


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Relative path -> (mtime ns, bytes) of every file; directories -> (mtime ns, b'')."""
    out = {".": (root.stat().st_mtime_ns, b"")}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
    return out


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------ VOC + SBD fixture
VOC_TRAIN = [f"2007_{i:06d}" for i in range(1, 9)]          # 8 finely labeled training images
VOC_VAL = [f"2007_{i:06d}" for i in range(101, 105)]        # 4 validation images
SBD_ONLY = [f"2008_{i:06d}" for i in range(1, 25)]          # 24 images with SBD labels only
SBD_TRAIN = SBD_ONLY[:18] + VOC_TRAIN[:3] + VOC_VAL[:1]     # SBD also covers some VOC images (VOC val must go)
SBD_VAL = SBD_ONLY[18:] + VOC_TRAIN[3:4]
H, W = 24, 32


def voc_mask(i: int) -> np.ndarray:
    """Class 1 + i % 20 in a box with a 1-pixel 255 border (VOC's object outline)."""
    m = np.zeros((H, W), np.uint8)
    m[3:13, 5:19] = 255
    m[4:12, 6:18] = 1 + i % 20
    return m


def sbd_seg(i: int) -> np.ndarray:
    """SBD label: class 1 + (i + 7) % 20 in the left half of rows 10..19, class 15 in one pixel."""
    m = np.zeros((H, W), np.uint8)
    m[10:20, : W // 2] = 1 + (i + 7) % 20
    m[0, 0] = 15
    return m


def mat_bytes(seg: np.ndarray) -> bytes:
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"GTcls": {"Segmentation": seg, "Boundaries": np.zeros((1, 1)),
                                     "CategoriesPresent": np.unique(seg)[1:]}})
    return buf.getvalue()


def build_voc_archives(folder: Path, bad_mask: bool = False) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    base = "VOCdevkit/VOC2012/"
    files: dict[str, bytes] = {}
    for n, i in enumerate(VOC_TRAIN + VOC_VAL + SBD_ONLY[:-1] + ["2009_000001"]):  # last SBD image only in SBD img/
        files[f"{base}JPEGImages/{i}.jpg"] = jpeg(H, W, n)
    for n, i in enumerate(VOC_TRAIN + VOC_VAL):
        m = voc_mask(n)
        if bad_mask and n == 2:
            m[0, 0] = 30
        files[f"{base}SegmentationClass/{i}.png"] = png(m, palette=True)
        files[f"{base}SegmentationObject/{i}.png"] = png(np.zeros((H, W), np.uint8), palette=True)
    files[f"{base}ImageSets/Segmentation/train.txt"] = "".join(i + "\n" for i in VOC_TRAIN).encode()
    files[f"{base}ImageSets/Segmentation/val.txt"] = "".join(i + "\n" for i in VOC_VAL).encode()
    files[f"{base}ImageSets/Segmentation/trainval.txt"] = "".join(i + "\n" for i in VOC_TRAIN + VOC_VAL).encode()
    voc_tar = write_tar(folder / "VOCtrainval_11-May-2012.tar", files)
    sbd: dict[str, bytes] = {}
    for n, i in enumerate(sorted(set(SBD_TRAIN + SBD_VAL))):
        sbd[f"benchmark_RELEASE/dataset/cls/{i}.mat"] = mat_bytes(sbd_seg(n))
        sbd[f"benchmark_RELEASE/dataset/inst/{i}.mat"] = mat_bytes(np.zeros((H, W), np.uint8))
    sbd[f"benchmark_RELEASE/dataset/img/{SBD_ONLY[-1]}.jpg"] = jpeg(H, W, 99)
    sbd["benchmark_RELEASE/dataset/train.txt"] = "".join(i + "\n" for i in SBD_TRAIN).encode()
    sbd["benchmark_RELEASE/dataset/val.txt"] = "".join(i + "\n" for i in SBD_VAL).encode()
    sbd_tgz = write_tar(folder / "benchmark.tgz", sbd, "w:gz")
    return voc_tar, sbd_tgz


# ------------------------------------------------------------------------------------------------ Cityscapes fixture
CITY_IDS = np.array([0, 1, 4, 7, 8, 9, 11, 14, 17, 21, 23, 24, 26, 31, 33], np.uint8)


def city_labels(n: int) -> np.ndarray:
    """A 16 x 32 labelIds image: vertical stripes cycling through CITY_IDS, shifted by n."""
    cols = (np.arange(32) // 2 + n) % len(CITY_IDS)
    return np.repeat(CITY_IDS[cols][None, :], 16, axis=0)


def build_cityscapes_tree(folder: Path) -> Path:
    """The extracted gtFine/ and leftImg8bit/ trees: 32 train images (2 cities), 3 val, 2 test (ignored)."""
    names = {"train": [("aachen", k) for k in range(16)] + [("bremen", k) for k in range(16)],
             "val": [("frankfurt", k) for k in range(3)], "test": [("berlin", k) for k in range(2)]}
    n = 0
    for split, items in names.items():
        for city, k in items:
            stem = f"{city}_{k:06d}_000019"
            img_dir, gt_dir = folder / "leftImg8bit" / split / city, folder / "gtFine" / split / city
            img_dir.mkdir(parents=True, exist_ok=True)
            gt_dir.mkdir(parents=True, exist_ok=True)
            (img_dir / f"{stem}_leftImg8bit.png").write_bytes(png(RNG.integers(0, 256, (16, 32, 3))))
            labels = city_labels(n) if split != "test" else np.zeros((16, 32), np.uint8)
            (gt_dir / f"{stem}_gtFine_labelIds.png").write_bytes(png(labels))
            (gt_dir / f"{stem}_gtFine_instanceIds.png").write_bytes(png(labels))
            (gt_dir / f"{stem}_gtFine_color.png").write_bytes(png(np.zeros((16, 32, 3))))
            (gt_dir / f"{stem}_gtFine_polygons.json").write_text("{}")
            n += 1
    return folder


def zip_tree(src: Path, top: str, dest: Path) -> Path:
    files = {p.relative_to(src).as_posix(): p.read_bytes() for p in sorted((src / top).rglob("*")) if p.is_file()}
    files["README"] = b"fixture"
    return write_zip(dest, files)


# ------------------------------------------------------------------------------------------------ COCO fixture
COCO_CATS = [{"id": 90, "name": "toothbrush", "supercategory": "indoor"},
             {"id": 1, "name": "person", "supercategory": "person"},
             {"id": 3, "name": "car", "supercategory": "vehicle"}]
CH, CW = 20, 24


def coco_json(ids: list[int], with_anns: bool) -> dict:
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "height": CH, "width": CW} for i in ids]
    anns = []
    if with_anns:
        # image ids[0]: a large car rectangle, a small person rectangle on it (painted last: smaller area)
        anns.append({"id": 1, "image_id": ids[0], "category_id": 1, "iscrowd": 0, "area": 40.0,
                     "segmentation": [[2, 3, 10, 3, 10, 8, 2, 8]]})
        anns.append({"id": 2, "image_id": ids[0], "category_id": 3, "iscrowd": 0, "area": 200.0,
                     "segmentation": [[0, 0, 15, 0, 15, 12, 0, 12]]})
        # ids[1]: crowd toothbrush as uncompressed RLE: 45 zeros, 10 ones (column 2, rows 5..14), rest zeros
        anns.append({"id": 3, "image_id": ids[1], "category_id": 90, "iscrowd": 1, "area": 10.0,
                     "segmentation": {"size": [CH, CW], "counts": [45, 10, CH * CW - 55]}})
        # ids[2]: compressed RLE "T3d0l1h8" = [100, 20, 60, 300]: column 5 and columns 9..23 are the object
        anns.append({"id": 4, "image_id": ids[2], "category_id": 3, "iscrowd": 1, "area": 320.0,
                     "segmentation": {"size": [CH, CW], "counts": "T3d0l1h8"}})
    return {"images": images, "annotations": anns, "categories": COCO_CATS}


def build_coco_archives(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    train_ids, val_ids = list(range(1, 41)), list(range(1001, 1005))
    write_zip(folder / "train2017.zip", {**{f"train2017/{i:012d}.jpg": jpeg(CH, CW, i) for i in train_ids},
                                         "train2017/000000009999.jpg": jpeg(CH, CW, 5)})  # not annotated: ignored
    write_zip(folder / "val2017.zip", {f"val2017/{i:012d}.jpg": jpeg(CH, CW, i) for i in val_ids})
    write_zip(folder / "annotations_trainval2017.zip", {
        "annotations/instances_train2017.json": json.dumps(coco_json(train_ids, True)).encode(),
        "annotations/instances_val2017.json": json.dumps(coco_json(val_ids, True)).encode(),
        "annotations/captions_train2017.json": b"{}"})


# ------------------------------------------------------------------------------------------------ Lucchi fixture
def lucchi_gt(i: int) -> np.ndarray:
    m = np.zeros((24, 32), np.uint8)
    m[4 + i % 6: 12 + i % 6, 8:20] = 255
    return m


def write_stack(path: Path, frames: list[np.ndarray]) -> None:
    ims = [Image.fromarray(f) for f in frames]
    ims[0].save(path, save_all=True, append_images=ims[1:])


def build_lucchi(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    grey = lambda n, s: [np.random.default_rng(s + k).integers(0, 256, (24, 32), dtype=np.uint8) for k in range(n)]
    write_stack(folder / "training.tif", grey(40, 0))
    write_stack(folder / "training_groundtruth.tif", [lucchi_gt(i) for i in range(40)])
    write_stack(folder / "testing.tif", grey(6, 100))
    write_stack(folder / "testing_groundtruth.tif", [lucchi_gt(i + 1) for i in range(6)])


# ------------------------------------------------------------------------------------------------ folder fixture
def folder_mask(i: int) -> np.ndarray:
    m = np.zeros((20, 24), np.uint8)
    m[2:10, 3:12] = 1
    m[12:18, 14:22] = 2
    m[0, :] = 7  # the fixture's "not annotated" value
    m[19, i % 24] = 2
    return m


def build_folder(folder: Path) -> None:
    (folder / "images" / "batch1").mkdir(parents=True)
    (folder / "masks" / "batch1").mkdir(parents=True)
    for i in range(10):
        Image.fromarray(RNG.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / "images" / "batch1"
                                                                                 / f"a{i:02d}.png")
        (folder / "masks" / "batch1" / f"a{i:02d}.png").write_bytes(png(folder_mask(i)))
    for i in range(4):
        (folder / "images" / f"b{i:02d}.jpg").write_bytes(jpeg(20, 24, 50 + i))
    (folder / "dataset.yaml").write_text(yaml.safe_dump({
        "name": "cells", "classes": ["background", "cell", "nucleus"],
        "palette": [[0, 0, 0], [255, 0, 0], [0, 0, 255]], "ignore_value": 7, "val_fraction": 0.2,
        "label_fractions": ["1-4", "1-2"]}))


# ------------------------------------------------------------------------------------------------ prepared roots
@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("voc")
    build_voc_archives(d / "archives")
    res = prepare("voc", d / "root", d / "archives", verify=False, progress=False, split_lists="generated")
    assert res.status == "prepared"
    return res.root


@pytest.fixture(scope="module")
def city_src(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("city")
    tree = build_cityscapes_tree(d / "tree")
    (d / "archives").mkdir()
    zip_tree(tree, "leftImg8bit", d / "archives" / "leftImg8bit_trainvaltest.zip")
    zip_tree(tree, "gtFine", d / "archives" / "gtFine_trainvaltest.zip")
    return d


@pytest.fixture(scope="module")
def city_root(city_src) -> Path:
    return prepare("cityscapes", city_src / "root", city_src / "archives", verify=False, progress=False,
                   split_lists="generated").root


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("coco")
    build_coco_archives(d / "archives")
    return prepare("coco", d / "root", d / "archives", verify=False, progress=False, split_lists="generated").root


@pytest.fixture(scope="module")
def lucchi_root(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("lucchi")
    build_lucchi(d / "em")
    return prepare("lucchi", d / "root", d / "em", progress=False).root


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("folder")
    build_folder(d / "mydata")
    return prepare("folder", d / "root", d / "mydata", progress=False).root


ROOTS = {"voc": "voc_root", "cityscapes": "city_root", "coco": "coco_root", "lucchi": "lucchi_root",
         "folder": "folder_root"}


# ------------------------------------------------------------------------------------------------ split arithmetic
def test_fraction_sizes_reproduce_the_papers_split_sizes() -> None:
    # VOC classic (1464), blender (10582), Cityscapes (2975), COCO (118287): rounded up; Lucchi (165): down
    assert [fraction_size(1464, 1, d) for d in (16, 8, 4, 2, 1)] == [92, 183, 366, 732, 1464]
    assert [fraction_size(10582, 1, d) for d in (16, 8, 4, 2)] == [662, 1323, 2646, 5291]
    assert [fraction_size(2975, 1, d) for d in (16, 8, 4, 2)] == [186, 372, 744, 1488]
    assert [fraction_size(118287, 1, d) for d in (512, 256, 128, 64, 32)] == [232, 463, 925, 1849, 3697]
    assert [fraction_size(165, 1, d, "floor") for d in (32, 16, 8)] == [5, 10, 20]
    # the recipes' split tables are these fractions
    assert {n: fraction_size(1464, *f) for n, f in voc.CLASSIC.items()} == {n: int(n) for n in voc.CLASSIC}
    assert {n: fraction_size(165, *f, "floor") for n, f in lucchi.FRACTIONS.items()} == {"5": 5, "10": 10, "20": 20}


# ------------------------------------------------------------------------------------------------ VOC
def test_voc_sets_labels_and_borders(voc_root: Path) -> None:
    m = load_manifest(voc_root)
    assert m.num_classes == 21 and m.class_names[15] == "person" and m.palette[1] == [128, 0, 0]
    aug = sorted((set(VOC_TRAIN) | set(SBD_TRAIN) | set(SBD_VAL)) - set(VOC_VAL))
    assert len(aug) == 8 + 24
    assert [line[0] for line in read_lines(voc_root, "train")] == [f"images/{i}.jpg" for i in aug]
    assert [line[0] for line in read_lines(voc_root, "val")] == [f"images/{i}.jpg" for i in VOC_VAL]
    assert [line[0] for line in read_lines(voc_root, "train_classic")] == [f"images/{i}.jpg" for i in VOC_TRAIN]
    # VOC masks byte for byte, 255 borders kept; also for VOC images that SBD labels too (VOC wins)
    for n, i in enumerate(VOC_TRAIN + VOC_VAL):
        arr = mask_of(voc_root, f"masks/{i}.png")
        assert np.array_equal(arr, voc_mask(n)), i
        assert (arr == 255).sum() == 10 * 14 - 8 * 12
    # SBD-only images: GTcls.Segmentation, converted to a palette PNG with the VOC colours
    sbd_sorted = sorted(set(SBD_TRAIN + SBD_VAL))
    for i in SBD_ONLY:
        n = sbd_sorted.index(i)
        assert np.array_equal(mask_of(voc_root, f"masks/{i}.png"), sbd_seg(n)), i
    with Image.open(voc_root / "masks" / f"{SBD_ONLY[0]}.png") as im:
        assert im.getpalette()[3:6] == [128, 0, 0] and im.getpalette()[45:48] == [192, 128, 128]
    assert (voc_root / "images" / f"{SBD_ONLY[-1]}.jpg").is_file()    # taken from SBD's img/
    assert not (voc_root / "images" / "2009_000001.jpg").exists()     # in no list: not copied over
    ds = SegDataset(voc_root, "train")
    assert len(ds) == 32 and ds.has_masks()


def test_voc_split_sizes_nesting_and_u2pl_priority(voc_root: Path) -> None:
    man = json.loads((voc_root / "manifest.json").read_text())
    assert man["split_source"] == "generated, seed 0"
    train = {line[0] for line in read_lines(voc_root, "train")}
    fine = {f"images/{i}.jpg" for i in VOC_TRAIN}
    # classic: ceil(8/16)=1, ceil(8/8)=1, 2, 4, 8 of VOC train; blender: ceil(32/16)=2, 4, 8, 16 of the aug set
    expected = {"92": 1, "183": 1, "366": 2, "732": 4, "1464": 8, "1-16": 2, "1-8": 4, "1-4": 8, "1-2": 16,
                "u2pl_1-16": 2, "u2pl_1-8": 4, "u2pl_1-4": 8, "u2pl_1-2": 16}
    for name, size in expected.items():
        lab = [line[0] for line in read_lines(voc_root, f"labeled_{name}")]
        unl = [line[0] for line in read_lines(voc_root, f"unlabeled_{name}")]
        assert len(lab) == size and len(set(lab)) == size, name
        assert set(lab) | set(unl) == train and not set(lab) & set(unl), name
        assert man["counts"][f"labeled_{name}"] == size
    sets = {n: {line[0] for line in read_lines(voc_root, f"labeled_{n}")} for n in expected}
    assert sets["92"] <= sets["183"] <= sets["366"] <= sets["732"] <= sets["1464"] == fine
    assert sets["1-16"] <= sets["1-8"] <= sets["1-4"] <= sets["1-2"]
    assert sets["u2pl_1-16"] < fine and sets["u2pl_1-4"] == fine < sets["u2pl_1-2"]  # fine labels first


def test_voc_user_splits_are_used_verbatim(tmp_path: Path) -> None:
    build_voc_archives(tmp_path / "a")
    (tmp_path / "splits" / "92").mkdir(parents=True)
    lab = [VOC_TRAIN[5], VOC_TRAIN[2]]
    (tmp_path / "splits" / "92" / "labeled.txt").write_text(
        "".join(f"JPEGImages/{i}.jpg SegmentationClass/{i}.png\n" for i in lab))
    (tmp_path / "splits" / "92" / "unlabeled.txt").write_text(f"JPEGImages/{SBD_ONLY[3]}.jpg\n{SBD_ONLY[1]}\n")
    res = prepare("voc", tmp_path / "root", tmp_path / "a", splits=tmp_path / "splits", verify=False,
                  progress=False, seed=5, split_lists="generated")
    assert [line[0] for line in read_lines(res.root, "labeled_92")] == [f"images/{i}.jpg" for i in lab]
    assert [line[0] for line in read_lines(res.root, "unlabeled_92")] == [f"images/{SBD_ONLY[3]}.jpg",
                                                                         f"images/{SBD_ONLY[1]}.jpg"]
    assert res.manifest["split_sources"]["92"].startswith("user-provided")
    assert res.manifest["split_sources"]["1-16"] == "generated, seed 5"
    # an unknown image in a user list names the file and line
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "labeled_x.txt").write_text(f"{VOC_TRAIN[0]}\n2099_000001\n")
    with pytest.raises(RecipeError, match=r"labeled_x.txt:2: .*2099_000001"):
        prepare("voc", tmp_path / "root2", tmp_path / "a", splits=tmp_path / "bad", verify=False, progress=False,
                split_lists="generated")
    assert not (tmp_path / "root2").exists() and not leftovers(tmp_path)


def test_voc_from_extracted_trees(tmp_path: Path) -> None:
    voc_tar, sbd_tgz = build_voc_archives(tmp_path / "a")
    for arc in (voc_tar, sbd_tgz):
        with tarfile.open(arc) as tf:
            tf.extractall(tmp_path / "trees", filter="data")
    res = prepare("voc", tmp_path / "root", tmp_path / "trees", progress=False, split_lists="generated")
    assert {s["kind"] for s in res.manifest["sources"].values()} == {"tree"}
    assert all(not s["verified"] for s in res.manifest["sources"].values())
    first = VOC_TRAIN[0]
    assert (res.root / "masks" / f"{first}.png").read_bytes() == (
        tmp_path / "trees/VOCdevkit/VOC2012/SegmentationClass" / f"{first}.png").read_bytes()
    assert len(read_lines(res.root, "train")) == 32


# ------------------------------------------------------------------------------------------------ published splits
SHIPPED = REPO / "workbench" / "data" / "splits"


def shipped_keys(rel: str) -> list[str]:
    return [line.split()[0] for line in (SHIPPED / rel).read_text().splitlines() if line.strip()]


def test_shipped_published_lists_have_the_papers_counts() -> None:
    # counts as the papers state them: Pascal classic 92..1464 of the 1464, blender/U2PL 1/16..1/4 of the 10582
    # (662, 1323, 2646), Cityscapes 1/30..1/2 of 2975 (100, 186, 372, 744, 1488), COCO 1/512..1/32 of 118287;
    # val 1449 / 500 / 5000
    assert common.PUBLISHED_SPLITS == SHIPPED
    pascal = {"92": 92, "183": 183, "366": 366, "732": 732, "1464": 1464, "1_16": 662, "1_8": 1323, "1_4": 2646,
              "u2pl_1_16": 662, "u2pl_1_8": 1323, "u2pl_1_4": 2646}
    aug = set(shipped_keys("pascal/train_aug.txt"))
    assert len(aug) == 10582 and len(shipped_keys("pascal/val.txt")) == 1449
    for name, n in pascal.items():
        lab, unl = shipped_keys(f"pascal/{name}/labeled.txt"), shipped_keys(f"pascal/{name}/unlabeled.txt")
        assert len(set(lab)) == len(lab) == n and len(unl) == 10582 - n, name
        assert set(lab) | set(unl) == aug and not set(lab) & set(unl), name
    classic = set(shipped_keys("pascal/1464/labeled.txt"))
    assert set(shipped_keys("pascal/u2pl_1_8/labeled.txt")) <= classic           # U2PL: fine labels first
    assert classic <= set(shipped_keys("pascal/u2pl_1_4/labeled.txt"))
    for name, n in {"1_30": 100, "1_16": 186, "1_8": 372, "1_4": 744, "1_2": 1488}.items():
        lab, unl = shipped_keys(f"cityscapes/{name}/labeled.txt"), shipped_keys(f"cityscapes/{name}/unlabeled.txt")
        assert len(set(lab)) == n and len(set(unl)) == 2975 - n and not set(lab) & set(unl), name
    assert len(shipped_keys("cityscapes/val.txt")) == 500
    for name, n in {"1_512": 232, "1_256": 463, "1_128": 925, "1_64": 1849, "1_32": 3697}.items():
        assert len(set(shipped_keys(f"coco/{name}/labeled.txt"))) == n, name
        assert not (SHIPPED / "coco" / name / "unlabeled.txt").exists()
    assert len(shipped_keys("coco/val.txt")) == 5000
    assert "MIT" in (SHIPPED / "README.md").read_text() and "Lihe Yang" in (SHIPPED / "README.md").read_text()
    # package data, so that a non-editable install ships them
    import tomllib

    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert {"splits/*/*.txt", "splits/*/*/*.txt", "splits/README.md"} <= set(data["workbench.data"])


def test_published_name_mapping() -> None:
    assert [common.published_name(n) for n in ("92", "1_16", "u2pl_1_4", "1_512")] == \
        ["92", "1-16", "u2pl_1-4", "1-512"]


def test_published_lists_are_the_default_and_missing_keys_fail_once(tmp_path: Path) -> None:
    build_voc_archives(tmp_path / "a")
    # the fixture holds none (or almost none) of the real VOC images: every published key it lacks is counted once,
    # over all the Pascal lists (labeled, unlabeled, train_aug, val), in one error
    train_listed = set()
    for f in SHIPPED.joinpath("pascal").rglob("*.txt"):
        if f.name != "val.txt":
            train_listed |= set(shipped_keys(f.relative_to(SHIPPED).as_posix()))
    fixture_train = set(VOC_TRAIN) | set(SBD_ONLY)
    lacking = sorted((train_listed - fixture_train) | (set(shipped_keys("pascal/val.txt")) - set(VOC_VAL)))
    with pytest.raises(RecipeError) as e:
        prepare("voc", tmp_path / "root", tmp_path / "a", verify=False, progress=False)
    msg = str(e.value)
    assert msg.startswith(f"{len(lacking)} image key(s) of the published pascal split lists are not in the "
                          f"prepared dataset: {', '.join(lacking[:5])}, ...")
    assert "--generated-splits" in msg and "\n" not in msg
    assert not (tmp_path / "root").exists() and not leftovers(tmp_path)
    with pytest.raises(RecipeError, match="split_lists must be 'published'.*got 'mine'"):
        prepare("voc", tmp_path / "root", tmp_path / "a", verify=False, progress=False, split_lists="mine")
    with pytest.raises(RecipeError, match="'lucchi' has no published split lists"):
        prepare("lucchi", tmp_path / "root", tmp_path / "a", progress=False, split_lists="published")


def write_lists(folder: Path, lists: dict[str, list[str]]) -> None:
    for rel, keys in lists.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text("".join(k + "\n" for k in keys))


def test_voc_uses_the_published_lists_verbatim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build_voc_archives(tmp_path / "a")
    aug = sorted((set(VOC_TRAIN) | set(SBD_TRAIN) | set(SBD_VAL)) - set(VOC_VAL))
    lab92 = [VOC_TRAIN[4], VOC_TRAIN[1]]                       # published order kept, not sorted
    lab116 = [SBD_ONLY[7], VOC_TRAIN[0], SBD_ONLY[2]]
    unl116 = [k for k in reversed(aug) if k not in lab116]
    write_lists(tmp_path / "pub" / "pascal", {
        "92/labeled.txt": lab92, "92/unlabeled.txt": [k for k in aug if k not in lab92],
        "1_16/labeled.txt": lab116, "1_16/unlabeled.txt": unl116,
        "train_aug.txt": aug, "val.txt": VOC_VAL})
    monkeypatch.setattr(common, "PUBLISHED_SPLITS", tmp_path / "pub")
    res = prepare("voc", tmp_path / "root", tmp_path / "a", verify=False, progress=False)
    assert [line[0] for line in read_lines(res.root, "labeled_92")] == [f"images/{i}.jpg" for i in lab92]
    assert [line for line in read_lines(res.root, "labeled_1-16")] == [
        [f"images/{i}.jpg", f"masks/{i}.png"] for i in lab116]
    assert [line[0] for line in read_lines(res.root, "unlabeled_1-16")] == [f"images/{i}.jpg" for i in unl116]
    src = res.manifest["split_sources"]
    assert src["92"] == src["1-16"] == "published: UniMatch's lists (workbench/data/splits/pascal)"
    # splits without a published list (here 183 ... and 1-2) are generated and say so
    assert src["1-2"] == src["u2pl_1-2"] == src["183"] == "generated, seed 0 (no published list)"
    assert res.manifest["recipe"]["options"] == {"split_lists": "published"}
    assert res.manifest["split_source"] == (
        "published: UniMatch's lists (workbench/data/splits/pascal) for 92, 1-16; generated, seed 0 (no published "
        "list) for 183, 366, 732, 1464, 1-8, 1-4, 1-2, u2pl_1-16, u2pl_1-8, u2pl_1-4, u2pl_1-2")
    # a listed key the dataset lacks (and a val key): one error with the count and the keys
    write_lists(tmp_path / "pub" / "pascal", {"92/labeled.txt": lab92 + ["2012_999999"],
                                              "val.txt": VOC_VAL + ["2012_888888"]})
    with pytest.raises(RecipeError, match=r"^2 image key\(s\) of the published pascal split lists are not in the "
                                          r"prepared dataset: 2012_888888, 2012_999999 \(listed in 92/labeled.txt, "
                                          r"val.txt\)"):
        prepare("voc", tmp_path / "root2", tmp_path / "a", verify=False, progress=False)


def test_cityscapes_and_coco_published_lists(city_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stems = [f"aachen_{k:06d}_000019" for k in range(16)] + [f"bremen_{k:06d}_000019" for k in range(16)]
    token = lambda s: f"leftImg8bit/train/{s.split('_')[0]}/{s}_leftImg8bit.png"
    lab = [stems[20], stems[3]]
    write_lists(tmp_path / "pub" / "cityscapes", {
        "1_30/labeled.txt": [token(s) for s in lab],
        "1_30/unlabeled.txt": [token(s) for s in stems if s not in lab],
        "val.txt": [f"leftImg8bit/val/frankfurt/frankfurt_{k:06d}_000019_leftImg8bit.png" for k in range(3)]})
    build_coco_archives(tmp_path / "coco")
    write_lists(tmp_path / "pub" / "coco", {"1_512/labeled.txt": ["train2017/000000000007", "train2017/000000000002"],
                                            "val.txt": [f"val2017/{i:012d}" for i in range(1001, 1005)]})
    monkeypatch.setattr(common, "PUBLISHED_SPLITS", tmp_path / "pub")
    res = prepare("cityscapes", tmp_path / "city", city_src / "archives", verify=False, progress=False)
    assert [line[0] for line in read_lines(res.root, "labeled_1-30")] == [
        f"images/train/{s.split('_')[0]}/{s}_leftImg8bit.png" for s in lab]
    assert len(read_lines(res.root, "unlabeled_1-30")) == 30
    assert res.manifest["split_sources"]["1-30"].startswith("published")
    assert res.manifest["split_sources"]["1-16"] == "generated, seed 0 (no published list)"
    res = prepare("coco", tmp_path / "cocoroot", tmp_path / "coco", verify=False, progress=False)
    assert [line[0] for line in read_lines(res.root, "labeled_1-512")] == [
        "images/train2017/000000000007.jpg", "images/train2017/000000000002.jpg"]
    # no unlabeled list published: unlabeled = the 40 train images minus the 2 labeled ones, in train order
    unl = [line[0] for line in read_lines(res.root, "unlabeled_1-512")]
    assert unl == [f"images/train2017/{i:012d}.jpg" for i in range(1, 41) if i not in (2, 7)]


# ------------------------------------------------------------------------------------------------ Cityscapes
def test_cityscapes_train_ids_from_cityscapesscripts(city_root: Path) -> None:
    lut = cs.label_to_train_lut()
    # hand-picked ids (Cityscapes label table): road 7 -> 0, sidewalk 8 -> 1, building 11 -> 2, pole 17 -> 5,
    # vegetation 21 -> 8, sky 23 -> 10, person 24 -> 11, car 26 -> 13, train 31 -> 16, bicycle 33 -> 18;
    # unlabeled 0, ego vehicle 1, static 4, parking 9, guard rail 14 are not evaluated -> 255
    picked = {7: 0, 8: 1, 11: 2, 17: 5, 21: 8, 23: 10, 24: 11, 26: 13, 31: 16, 33: 18,
              0: 255, 1: 255, 4: 255, 9: 255, 14: 255}
    assert {k: int(lut[k]) for k in picked} == picked
    m = load_manifest(city_root)
    assert m.num_classes == 19 and m.class_names[0] == "road" and m.class_names[18] == "bicycle"
    assert m.palette[13] == [0, 0, 142]
    lines = read_lines(city_root, "val")
    assert lines[0] == ["images/val/frankfurt/frankfurt_000000_000019_leftImg8bit.png",
                        "masks/val/frankfurt/frankfurt_000000_000019.png"]
    n_train = 32
    got = mask_of(city_root, lines[1][1])
    expected = np.vectorize(picked.get)(city_labels(n_train + 1))
    assert np.array_equal(got, expected)
    assert not (city_root / "images" / "test").exists()


def test_cityscapes_splits_and_eval_recommendation(city_root: Path) -> None:
    man = json.loads((city_root / "manifest.json").read_text())
    assert man["counts"]["train"] == 32 and man["counts"]["val"] == 3
    # 32 train images: ceil(32/30)=2, ceil(32/16)=2, 4, 8, 16
    sets = {}
    for name, size in {"1-30": 2, "1-16": 2, "1-8": 4, "1-4": 8, "1-2": 16}.items():
        lab = {line[0] for line in read_lines(city_root, f"labeled_{name}")}
        unl = {line[0] for line in read_lines(city_root, f"unlabeled_{name}")}
        assert len(lab) == size and len(unl) == 32 - size and not lab & unl
        sets[name] = lab
    assert sets["1-16"] < sets["1-8"] < sets["1-4"] < sets["1-2"]
    assert man["recommended_eval"]["mode"] == "sliding" and man["recommended_eval"]["window"] == 801
    assert man["recommended_eval"]["stride"] == int(2 / 3 * 801)


def test_cityscapes_worker_processes_give_the_same_dataset(city_src: Path, city_root: Path, tmp_path: Path) -> None:
    res = prepare("cityscapes", tmp_path / "root", city_src / "archives", verify=False, progress=False, workers=2,
                  split_lists="generated")
    masks = sorted(p.relative_to(city_root) for p in (city_root / "masks").rglob("*.png"))
    assert len(masks) == 35
    assert sorted(p.relative_to(res.root) for p in (res.root / "masks").rglob("*.png")) == masks
    assert all((res.root / m).read_bytes() == (city_root / m).read_bytes() for m in masks)
    split = Path("splits") / "labeled_1-8.txt"
    assert (res.root / split).read_text() == (city_root / split).read_text()


def test_cityscapes_miou_matches_the_official_evaluation(city_src: Path, city_root: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling as ev

    pred_dir = tmp_path / "results"
    meter = ConfusionMeter(19)
    val = EvalDataset(city_root, "val")
    rng = np.random.default_rng(7)
    for k in range(len(val)):
        _, gt = val[k]
        pred = gt.numpy().copy()
        pred[pred == 255] = rng.integers(0, 19, int((pred == 255).sum()))
        flip = rng.random(pred.shape) < 0.3                      # 30% of the pixels get a random class
        pred[flip] = rng.integers(0, 19, int(flip.sum()))
        meter.update(torch.from_numpy(pred.astype(np.int64)), gt)
        stem = Path(val.base.items[k][1]).stem                   # <city>_<seq>_<frame>
        cs.write_prediction(pred, pred_dir / f"{stem}_pred.png")
    ours = meter.compute()
    monkeypatch.setenv("CITYSCAPES_DATASET", str(city_src / "tree"))
    monkeypatch.setenv("CITYSCAPES_RESULTS", str(pred_dir))
    args = ev.args
    monkeypatch.setattr(args, "predictionPath", None)
    monkeypatch.setattr(args, "predictionWalk", None)
    monkeypatch.setattr(args, "evalInstLevelScore", False)
    monkeypatch.setattr(args, "JSONOutput", False)
    monkeypatch.setattr(args, "quiet", True)
    gts = sorted(str(p) for p in (city_src / "tree" / "gtFine" / "val").glob("*/*_gtFine_labelIds.png"))
    preds = [ev.getPrediction(args, g) for g in gts]
    res = ev.evaluateImgLists(preds, gts, args)
    names = load_manifest(city_root).class_names
    theirs = [res["classScores"][n] for n in names]
    for n, a, b in zip(names, ours["iou"], theirs):
        assert (a is None and math.isnan(b)) or a == pytest.approx(b, abs=1e-12), n
    assert ours["miou"] == pytest.approx(res["averageScoreClasses"], abs=1e-12)
    assert 0.3 < ours["miou"] < 0.95  # the comparison is not trivial: predictions are partly wrong


# ------------------------------------------------------------------------------------------------ COCO
def test_coco_rle_strings_decode_to_hand_worked_counts() -> None:
    # "T3d0l1h8": 100 = 'T'(4 | more) '3'(3 << 5); 20 = 'd'(20 | more) '0'; 60 = 'l' '1'; the 4th count is stored
    # as a difference to the 2nd: 300 - 20 = 280 = 'h'(24 | more) '8'(8 << 5)
    assert coco.rle_counts("T3d0l1h8") == [100, 20, 60, 300]
    # 300 = '\\'(12 | more = 44) '9'(9 << 5); a negative difference: 150 - 300 = -150 = 'Z'(10 | more) 'K'(27,
    # sign bit 0x10 set: -150 = 10 + 27 x 32 - 1024)
    assert coco.rle_counts(":\\9d0ZK") == [10, 300, 20, 150]
    m = coco.rle_decode({"size": [3, 2], "counts": [1, 3, 2]})  # column-major: (1,0), (2,0), (0,1) set
    assert m.tolist() == [[False, True], [True, False], [True, False]]


def test_coco_classes_and_rasterised_masks(coco_root: Path) -> None:
    m = load_manifest(coco_root)
    assert m.num_classes == 4 and m.class_names == ["background", "person", "car", "toothbrush"]
    assert m.raw["category_ids"] == {"1": 1, "3": 2, "90": 3}
    a = mask_of(coco_root, "masks/train2017/000000000001.png")
    exp = np.zeros((CH, CW), np.uint8)
    exp[0:13, 0:16] = 2          # car polygon (0,0)-(15,12), outline included
    exp[3:9, 2:11] = 1           # person polygon (2,3)-(10,8) painted on top (smaller area)
    assert np.array_equal(a, exp)
    b = mask_of(coco_root, "masks/train2017/000000000002.png")
    exp = np.zeros((CH, CW), np.uint8)
    exp[5:15, 2] = 3
    assert np.array_equal(b, exp)
    c = mask_of(coco_root, "masks/train2017/000000000003.png")
    exp = np.zeros((CH, CW), np.uint8)
    exp[:, 5] = 2
    exp[:, 9:] = 2
    assert np.array_equal(c, exp)
    assert not mask_of(coco_root, "masks/train2017/000000000004.png").any()   # no annotation: background
    assert not (coco_root / "images" / "train2017" / "000000009999.jpg").exists()
    man = json.loads((coco_root / "manifest.json").read_text())
    # 40 train images: ceil(40/512) = ... = ceil(40/64) = 1, ceil(40/32) = 2
    assert {n: man["counts"][f"labeled_{n}"] for n in coco.FRACTIONS} == {"1-512": 1, "1-256": 1, "1-128": 1,
                                                                          "1-64": 1, "1-32": 2}
    assert man["counts"]["train"] == 40 and man["counts"]["val"] == 4


# ------------------------------------------------------------------------------------------------ Lucchi
def test_lucchi_slices_labels_and_splits(lucchi_root: Path) -> None:
    m = load_manifest(lucchi_root)
    assert m.num_classes == 2 and m.class_names == ["background", "mitochondrion"]
    assert np.array_equal(mask_of(lucchi_root, "masks/train/0007.png"), (lucchi_gt(7) == 255).astype(np.uint8))
    assert np.array_equal(mask_of(lucchi_root, "masks/test/0002.png"), (lucchi_gt(3) == 255).astype(np.uint8))
    with Image.open(lucchi_root / "images" / "train" / "0007.png") as im:
        assert np.array_equal(np.asarray(im), np.random.default_rng(7).integers(0, 256, (24, 32), dtype=np.uint8))
    man = json.loads((lucchi_root / "manifest.json").read_text())
    # 40 slices: floor(40/32) = 1, floor(40/16) = 2, floor(40/8) = 5
    assert {n: man["counts"][f"labeled_{n}"] for n in ("5", "10", "20")} == {"5": 1, "10": 2, "20": 5}
    assert man["counts"]["train"] == 40 and man["counts"]["val"] == 6
    assert man["sources"]["train_img"]["verified"] is False and "no published" in man["sources"]["train_img"]["note"]


def test_lucchi_rejects_non_binary_labels(tmp_path: Path) -> None:
    build_lucchi(tmp_path / "em")
    frames = [lucchi_gt(i) for i in range(40)]
    frames[3][0, 0] = 128
    write_stack(tmp_path / "em" / "training_groundtruth.tif", frames)
    with pytest.raises(RecipeError, match=r"training_groundtruth.tif slice 3: label values \[0, 128, 255\]"):
        prepare("lucchi", tmp_path / "root", tmp_path / "em", progress=False)
    assert not (tmp_path / "root").exists() and not leftovers(tmp_path)


# ------------------------------------------------------------------------------------------------ folder
def test_folder_recipe_masks_and_splits(folder_root: Path) -> None:
    m = load_manifest(folder_root)
    assert m.class_names == ["background", "cell", "nucleus"] and m.palette[2] == [0, 0, 255]
    got = mask_of(folder_root, "masks/batch1/a03.png")
    exp = folder_mask(3)
    exp[exp == 7] = 255  # ignore_value 7 becomes 255
    assert np.array_equal(got, exp)
    man = json.loads((folder_root / "manifest.json").read_text())
    # 10 labeled: round(0.2 x 10) = 2 validation, 8 train; 1-4 -> 2, 1-2 -> 4; the 4 mask-less images are unlabeled
    assert man["counts"]["val"] == 2 and man["counts"]["train"] == 8
    assert man["counts"]["labeled_1-4"] == 2 and man["counts"]["labeled_1-2"] == 4
    assert man["counts"]["unlabeled_1-4"] == 6 + 4 and man["counts"]["labeled_full"] == 8
    unl = read_lines(folder_root, "unlabeled_full")
    assert sorted(line[0] for line in unl) == [f"images/b{i:02d}.jpg" for i in range(4)]
    assert all(len(line) == 1 for line in unl)


def test_folder_colour_masks_and_errors(tmp_path: Path) -> None:
    cfg = {"classes": ["bg", "a", "b"], "palette": [[0, 0, 0], [10, 20, 30], [200, 0, 0]], "mask_encoding": "color",
           "ignore_value": 255, "ignore_color": [255, 255, 255], "val": None, "val_fraction": 0.2,
           "label_fractions": ["1-2"]}
    rgb = np.array([[[0, 0, 0], [10, 20, 30]], [[200, 0, 0], [255, 255, 255]]], np.uint8)
    from workbench.data.recipes import folder

    assert folder.convert_mask(png(rgb), cfg, "m.png").tolist() == [[0, 1], [2, 255]]
    rgb[0, 0] = [1, 2, 3]
    with pytest.raises(RecipeError, match=r"m.png: colour \[1, 2, 3\] is not in the palette"):
        folder.convert_mask(png(rgb), cfg, "m.png")
    build_folder(tmp_path / "src")
    (tmp_path / "src" / "masks" / "batch1" / "a04.png").write_bytes(png(np.full((20, 24), 5, np.uint8)))
    with pytest.raises(RecipeError, match=r"a04.png: values \[5\] are neither class ids"):
        prepare("folder", tmp_path / "root", tmp_path / "src", progress=False)
    (tmp_path / "src" / "dataset.yaml").write_text("classes: [a, b]\ncolours: [1]\n")
    with pytest.raises(RecipeError, match=r"dataset.yaml: unknown key\(s\) \['colours'\]"):
        prepare("folder", tmp_path / "root", tmp_path / "src", progress=False)
    assert not (tmp_path / "root").exists() and not leftovers(tmp_path)


# ------------------------------------------------------------------------------------------------ every recipe
@pytest.mark.parametrize("name", sorted(ROOTS))
def test_second_run_verifies_and_changes_nothing(name: str, request: pytest.FixtureRequest) -> None:
    root = request.getfixturevalue(ROOTS[name])
    before = snapshot(root)
    man = json.loads((root / "manifest.json").read_text())
    src = man["sources"]
    archives = Path(next(iter(src.values()))["path"]).parent
    res = prepare(name, root, archives, verify=False, progress=False, **man["recipe"]["options"])
    assert res.status == "up-to-date"
    assert snapshot(root) == before
    assert not leftovers(root.parent)


def test_changed_options_or_modified_splits_are_refused(voc_root: Path) -> None:
    with pytest.raises(RecipeError, match="prepared with .*seed.*0.*not the requested"):
        prepare("voc", voc_root, verify=False, progress=False, seed=1)
    split = voc_root / "splits" / "labeled_92.txt"
    text = split.read_text()
    try:
        split.write_text(text + "images/x.jpg\n")
        with pytest.raises(RecipeError, match="labeled_92.txt was modified"):
            prepare("voc", voc_root, verify=False, progress=False, split_lists="generated")
    finally:
        split.write_text(text)


@pytest.mark.parametrize("name, split", [("voc", "92"), ("voc", "u2pl_1-8"), ("cityscapes", "1-16"),
                                         ("coco", "1-32"), ("lucchi", "10"), ("folder", "1-2")])
def test_a_training_step_runs_on_the_prepared_data(name: str, split: str, tmp_path: Path,
                                                   request: pytest.FixtureRequest) -> None:
    from workbench.engine.trainer import train

    root = request.getfixturevalue(ROOTS[name])
    # one torch thread: two threads on a loaded 2-core machine made these steps 50x slower
    cfg = config_from_dict(tiny_config_dict(tmp_path / "runs", root, **{
        "data.dataset": "prepared", "data.split": split, "train.iters": 2, "train.threads": 1,
        "method.name": "fixmatch", "data.synthetic": {}}))
    summary = train(cfg)
    assert summary["steps"] == 2 and summary["finished"]
    final = summary["final"]
    assert len(final["iou"]) == load_manifest(root).num_classes
    assert 0.0 <= final["miou"] <= 1.0
    assert (tmp_path / "runs" / "t" / "checkpoints" / "latest.pt").is_file()


# ------------------------------------------------------------------------------------------------ failures
def test_missing_archive_fails_fast_naming_it_and_where(tmp_path: Path) -> None:
    build_voc_archives(tmp_path / "a")
    (tmp_path / "a" / "benchmark.tgz").unlink()
    with pytest.raises(RecipeError) as e:
        prepare("voc", tmp_path / "root", tmp_path / "a", progress=False)
    msg = str(e.value)
    assert "benchmark.tgz" in msg and f"Place them in {tmp_path / 'a'}" in msg
    assert "VOCtrainval" not in msg  # only the missing one is named
    assert not (tmp_path / "root").exists() and not leftovers(tmp_path)
    with pytest.raises(RecipeError, match=r"leftImg8bit_trainvaltest.zip .*gtFine_trainvaltest.zip"):
        prepare("cityscapes", tmp_path / "root", tmp_path / "nothing", progress=False)


def test_offline_download_fails_fast(tmp_path: Path) -> None:
    import time

    build_voc_archives(tmp_path / "a")
    (tmp_path / "a" / "benchmark.tgz").unlink()
    sbd = dataclasses.replace(voc.SBD, url="http://127.0.0.1:9/benchmark.tgz")  # nothing listens on port 9
    recipe = Recipe("voc", 1, (voc.VOC, sbd), voc.build)
    t0 = time.monotonic()
    with pytest.raises(RecipeError, match=rf"cannot download benchmark.tgz .*place it in {tmp_path / 'a'}"):
        run_recipe(recipe, tmp_path / "root", tmp_path / "a", fetch=True, verify=False, progress=False)
    assert time.monotonic() - t0 < 10
    assert not (tmp_path / "a" / "benchmark.tgz.part").exists() and not (tmp_path / "root").exists()


def test_checksums_accept_the_published_value_and_reject_a_corrupt_archive(tmp_path: Path) -> None:
    voc_tar, sbd_tgz = build_voc_archives(tmp_path / "a")
    # the official constants do not match the fixture archives: rejected, nothing written
    with pytest.raises(RecipeError, match=r"checksum mismatch for .*VOCtrainval_11-May-2012.tar.*expected "
                                          r"6cd6e144f989b92b3379bac3b3de84fd"):
        prepare("voc", tmp_path / "root", tmp_path / "a", progress=False)
    assert not (tmp_path / "root").exists() and not leftovers(tmp_path)
    # with the fixture's own md5 as the published value it is accepted and recorded
    recipe = Recipe("voc", 1, (dataclasses.replace(voc.VOC, md5=md5(voc_tar)),
                               dataclasses.replace(voc.SBD, md5=md5(sbd_tgz))), voc.build)
    res = run_recipe(recipe, tmp_path / "ok", tmp_path / "a", progress=False)
    assert res.manifest["sources"]["voc"] == {"input": voc_tar.name, "path": str(voc_tar), "kind": "archive",
                                              "verified": True, "md5": md5(voc_tar)}
    # one flipped byte: rejected
    data = bytearray(voc_tar.read_bytes())
    data[len(data) // 2] ^= 0xFF
    voc_tar.write_bytes(bytes(data))
    with pytest.raises(RecipeError, match="checksum mismatch"):
        run_recipe(recipe, tmp_path / "root", tmp_path / "a", progress=False)
    assert not (tmp_path / "root").exists() and not leftovers(tmp_path)


def test_truncated_or_invalid_input_leaves_nothing_behind(tmp_path: Path) -> None:
    voc_tar, sbd_tgz = build_voc_archives(tmp_path / "a")
    sbd_tgz.write_bytes(sbd_tgz.read_bytes()[: len(sbd_tgz.read_bytes()) // 2])
    with pytest.raises(RecipeError, match=r"benchmark\.tgz.*corrupt or truncated"):
        prepare("voc", tmp_path / "root", tmp_path / "a", verify=False, progress=False)
    assert not (tmp_path / "root").exists() and not leftovers(tmp_path)
    build_voc_archives(tmp_path / "b", bad_mask=True)
    with pytest.raises(RecipeError, match=rf"SegmentationClass/{VOC_TRAIN[2]}.png: values \[30\]"):
        prepare("voc", tmp_path / "root", tmp_path / "b", verify=False, progress=False)
    assert not (tmp_path / "root").exists() and not leftovers(tmp_path)


def test_path_traversal_members_are_rejected(tmp_path: Path) -> None:
    voc_tar, _ = build_voc_archives(tmp_path / "a")
    with tarfile.open(voc_tar, "a") as tf:
        info = tarfile.TarInfo("VOCdevkit/VOC2012/JPEGImages/../../../../evil.jpg")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(RecipeError, match=r"unsafe: member .*evil.jpg"):
        prepare("voc", tmp_path / "root", tmp_path / "a", verify=False, progress=False)
    assert not (tmp_path / "evil.jpg").exists() and not list(tmp_path.rglob("evil.jpg"))
    assert not (tmp_path / "root").exists() and not leftovers(tmp_path)
    link_zip = tmp_path / "z" / "gtFine_trainvaltest.zip"
    link_zip.parent.mkdir()
    with zipfile.ZipFile(link_zip, "w") as zf:
        info = zipfile.ZipInfo("gtFine/train/x/x_000000_000000_gtFine_labelIds.png")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    src = common.Source(cs.GTFINE, link_zip, "archive")
    with pytest.raises(RecipeError, match="symbolic link"):
        list(src.stream(cs.GT_PATTERN))


def test_foreign_content_in_root_is_refused(tmp_path: Path) -> None:
    build_lucchi(tmp_path / "root")                     # inputs inside the root are fine ...
    (tmp_path / "root" / "images").mkdir()              # ... but an unknown images/ folder is not
    with pytest.raises(RecipeError, match="already contains images but no manifest.json"):
        prepare("lucchi", tmp_path / "root", progress=False)
    (tmp_path / "root" / "images").rmdir()
    res = prepare("lucchi", tmp_path / "root", progress=False)   # archives in the root: entries moved in
    assert (tmp_path / "root" / "training.tif").is_file() and (tmp_path / "root" / "manifest.json").is_file()
    assert res.manifest["counts"]["train"] == 40 and not leftovers(tmp_path)


# ------------------------------------------------------------------------------------------------ CLI, configs
def test_cli_prepare_and_up_to_date(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from workbench.cli import main

    build_lucchi(tmp_path / "em")
    assert main(["data", "prepare", "lucchi", "--root", str(tmp_path / "r"), "--archives", str(tmp_path / "em"),
                 "--quiet", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "lucchi dataset prepared" in out and "generated, seed 3" in out
    assert main(["data", "prepare", "lucchi", "--root", str(tmp_path / "r"), "--archives", str(tmp_path / "em"),
                 "--quiet", "--seed", "3"]) == 0
    assert "already prepared" in capsys.readouterr().out
    # --generated-splits: lucchi's lists are always generated, so the same preparation
    assert main(["data", "prepare", "lucchi", "--root", str(tmp_path / "r"), "--archives", str(tmp_path / "em"),
                 "--quiet", "--seed", "3", "--generated-splits"]) == 0
    assert "already prepared" in capsys.readouterr().out
    assert main(["data", "prepare", "coco", "--root", str(tmp_path / "c"), "--quiet"]) == 2
    assert "train2017.zip" in capsys.readouterr().err


PROTOCOL_SPLITS = {
    "voc": set(voc.CLASSIC) | set(voc.BLENDER) | {f"u2pl_{n}" for n in voc.BLENDER},
    "cityscapes": set(cs.FRACTIONS), "coco": set(coco.FRACTIONS), "lucchi": set(lucchi.FRACTIONS)}


def test_protocol_configs_load_and_name_real_splits() -> None:
    files = sorted((REPO / "configs" / "protocols").glob("*.yaml"))
    assert len(files) >= 20
    seen = set()
    for f in files:
        cfg = load_config(f)
        dataset = f.stem.split("_")[0]
        assert dataset in PROTOCOL_SPLITS, f
        assert cfg.data.dataset == "prepared" and cfg.data.split in PROTOCOL_SPLITS[dataset], f
        crop = int(f.stem.rsplit("_", 1)[1])
        assert cfg.data.crop_size == crop and cfg.model.backbone == "resnet" + f.stem.split("_")[-2][1:], f
        if dataset == "cityscapes":
            assert cfg.eval.mode == "sliding" and cfg.eval.window == 801 and cfg.method.loss == "ohem", f
        else:
            assert cfg.eval.mode == "original", f
        seen.add((dataset, cfg.data.split))
    for dataset, splits in PROTOCOL_SPLITS.items():
        assert {s for d, s in seen if d == dataset} == splits, dataset
    assert set(RECIPES) == {"voc", "cityscapes", "coco", "lucchi", "folder"}


def test_folder_prepare_message_names_every_split_source(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`workbench data prepare folder` ends with one line: counts, the label splits and where each came from (it
    once read "user-provided lists from None for ")."""
    from workbench.cli import main
    build_folder(tmp_path / "mine")
    assert main(["data", "prepare", "folder", "--root", str(tmp_path / "root"), "--archives", str(tmp_path / "mine"),
                 "--quiet"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    m = load_manifest(tmp_path / "root")
    splits = ", ".join(m.raw["label_splits"])
    assert line == (f"folder dataset prepared at {tmp_path / 'root'}: {m.num_classes} classes, "
                    f"{m.raw['counts']['train']} train / {m.raw['counts']['val']} val images, label splits {splits} "
                    "(generated, seed 0 for 1-4, 1-2; all labeled training images; unlabeled = the images without "
                    "masks for full)")  # the fixture has mask-less images: split "full" uses them all
    assert "None" not in line
