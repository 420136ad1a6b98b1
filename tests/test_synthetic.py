"""Tests of the embedded synthetic dataset generator (tiny specs, a few seconds in total)."""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from workbench.data import synthetic
from workbench.data.synthetic import (
    SyntheticSpec,
    dataset_fingerprint,
    ensure_synthetic,
    generate_synthetic,
    render_sample,
    render_sample_detailed,
)

TINY = SyntheticSpec(image_size=(32, 40), num_train=96, num_val=8, seed=3, label_fractions=("1-32", "1-16", "1-8", "1-4"))
FRACTIONS = ("1-32", "1-16", "1-8", "1-4")


def read_split(root: Path, name: str) -> list[list[str]]:
    return [line.split() for line in (root / "splits" / f"{name}.txt").read_text().splitlines()]


def tree_snapshot(root: Path) -> dict[str, int]:
    """Relative path -> mtime (ns) of every file and directory under root (root included)."""
    snap = {".": root.stat().st_mtime_ns}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            snap[str(path.relative_to(root))] = path.stat().st_mtime_ns
    return snap


def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("tiny") / "data", TINY, progress=False)


# ------------------------------------------------------------------------------------------------ the spec
@pytest.mark.parametrize("kwargs, field", [
    ({"image_size": (8, 64)}, "image_size"), ({"image_size": (64,)}, "image_size"),
    ({"num_classes": 1}, "num_classes"), ({"num_classes": 10}, "num_classes"), ({"num_train": 1}, "num_train"),
    ({"num_val": 0}, "num_val"), ({"seed": -1}, "seed"), ({"label_fractions": ("1/32",)}, "label_fractions"),
    ({"label_fractions": ("1-1",)}, "label_fractions"), ({"label_fractions": "1-8"}, "label_fractions"),
    ({"label_fractions": ("1-8", "1-8")}, "label_fractions"), ({"objects_per_image": (3, 2)}, "objects_per_image"),
    ({"object_area": (0.2, 0.1)}, "object_area"), ({"object_area": (0.0001, 0.1)}, "object_area"),
    ({"difficulty": 1.5}, "difficulty"), ({"texture_contrast": -0.1}, "texture_contrast"),
    ({"color_informativeness": 2.0}, "color_informativeness"), ({"num_train": True}, "num_train"),
])
def test_spec_rejects_bad_values_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SyntheticSpec(**kwargs)


def test_spec_normalises_and_round_trips() -> None:
    spec = SyntheticSpec(image_size=48, label_fractions=["1-8", "1-2"], objects_per_image=[1, 2])
    assert spec.image_size == (48, 48) and spec.label_fractions == ("1-8", "1-2")
    assert SyntheticSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ValueError, match="bogus"):
        SyntheticSpec.from_dict({"bogus": 1})
    # labeled sizes are ceil(N / d): 2000/32 = 62.5 -> 63, 2000/16 = 125
    assert SyntheticSpec().labeled_size("1-32") == 63 and SyntheticSpec().labeled_size("1-16") == 125
    assert SyntheticSpec().class_names == ("background", "stripes", "checker", "dots", "grain", "rings")


def test_difficulty_law_and_overrides() -> None:
    easy, hard = SyntheticSpec(difficulty=0.0).effective(), SyntheticSpec(difficulty=1.0).effective()
    assert easy["texture_contrast"] == pytest.approx(0.35) and hard["texture_contrast"] == pytest.approx(0.05)
    assert easy["distractor_rate"] == pytest.approx(0.75) and hard["distractor_rate"] == pytest.approx(2.25)
    # linear in between: 0.6 + (0.0 - 0.6) * 0.25 = 0.45; the default (0.3): 0.035 + (0.085 - 0.035) * 0.3 = 0.05
    assert SyntheticSpec(difficulty=0.25).effective()["color_informativeness"] == pytest.approx(0.45)
    assert SyntheticSpec().effective()["noise_std"] == pytest.approx(0.05)
    # harder = less contrast, more jitter, less informative colour/shape, more clutter, distractors and noise
    for knob, sign in [("texture_contrast", -1), ("texture_jitter", 1), ("color_informativeness", -1),
                       ("shape_informativeness", -1), ("background_contrast", 1), ("distractor_rate", 1),
                       ("noise_std", 1)]:
        assert sign * (hard[knob] - easy[knob]) > 0, knob
    assert SyntheticSpec(difficulty=1.0, texture_contrast=0.9).effective()["texture_contrast"] == 0.9


# ------------------------------------------------------------------------------------------------ rendering
def test_render_sample_types_shapes_values() -> None:
    image, mask = render_sample(np.random.default_rng(0), TINY)
    assert image.dtype == np.uint8 and image.shape == (32, 40, 3)
    assert mask.dtype == np.uint8 and mask.shape == (32, 40)
    assert set(np.unique(mask).tolist()) <= set(range(6))
    with pytest.raises(TypeError, match="rng"):
        render_sample(0, TINY)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="spec"):
        render_sample(np.random.default_rng(0), {"num_classes": 6})  # type: ignore[arg-type]


def test_object_metadata_matches_mask_and_occlusion_happens() -> None:
    spec = SyntheticSpec(num_train=10, num_val=1)
    occluded = 0
    for i in range(40):
        s = render_sample_detailed(np.random.default_rng([1, i]), spec)
        lo, hi = spec.objects_per_image
        assert lo <= len(s.objects) <= hi
        for c in range(1, spec.num_classes):  # visible pixels of class c = its pixels in the mask
            assert int((s.mask == c).sum()) == sum(o.visible for o in s.objects if o.class_id == c)
        assert all(0 <= o.visible <= o.area for o in s.objects)
        assert s.objects[-1].visible == s.objects[-1].area  # nothing is painted over the last object
        occluded += sum(o.visible < o.area for o in s.objects)
    assert occluded >= 10


def test_object_areas_span_an_order_of_magnitude() -> None:
    spec = SyntheticSpec(image_size=64, num_train=10, num_val=1)
    areas = [o.area for i in range(150) for o in render_sample_detailed(np.random.default_rng([2, i]), spec).objects]
    # nominal areas are log-uniform over 0.025..0.35 of 4096 px = 102..1434 px (14x)
    assert max(areas) / min(areas) >= 10
    assert max(areas) <= 0.35 * 4096 * 1.15  # pixelisation of the largest nominal shape, never much beyond
    # median of a log-uniform law is the geometric mean sqrt(102.4 * 1433.6) = 383 px; clipping lowers it a bit
    assert 250 <= float(np.median(areas)) <= 420


def test_default_foreground_fraction_and_class_balance() -> None:
    spec = SyntheticSpec()
    counts = np.zeros(6)
    for i in range(150):
        counts += np.bincount(render_sample(np.random.default_rng([4, i]), spec)[1].ravel(), minlength=6)
    fg = 1.0 - counts[0] / counts.sum()
    assert 0.25 <= fg <= 0.40  # the brief's target band
    shares = counts[1:] / counts[1:].sum()  # classes are drawn uniformly: each near 1/5 of the foreground
    assert shares.min() > 0.12 and shares.max() < 0.28


def test_class_textures_are_oriented() -> None:
    """Class 'stripes' varies along y (horizontal lines), class 'bars' along x (vertical lines)."""
    spec = SyntheticSpec(num_classes=9, difficulty=0.0, noise_std=0.0)
    grads = {1: np.zeros(2), 8: np.zeros(2)}
    for i in range(60):
        image, mask = render_sample(np.random.default_rng([5, i]), spec)
        grey = image.astype(float).mean(axis=2)
        dy, dx = np.abs(np.diff(grey, axis=0))[:, :-1], np.abs(np.diff(grey, axis=1))[:-1, :]
        m = mask[:-1, :-1]
        for c in grads:
            inner = (m == c) & (mask[1:, :-1] == c) & (mask[:-1, 1:] == c)  # both differences inside class c
            grads[c] += [dy[inner].sum(), dx[inner].sum()]
    assert grads[1][0] > 3 * grads[1][1]
    assert grads[8][1] > 3 * grads[8][0]


# ------------------------------------------------------------------------------------------------ on disk
def test_layout_and_manifest(tiny_root: Path) -> None:
    manifest = json.loads((tiny_root / "manifest.json").read_text())
    names = ["train", "val"] + [f"{p}_{f}" for f in FRACTIONS for p in ("labeled", "unlabeled")]
    expected_counts = {"train": 96, "val": 8}
    for f, n in zip(FRACTIONS, (3, 6, 12, 24)):  # ceil(96 / d)
        expected_counts |= {f"labeled_{f}": n, f"unlabeled_{f}": 96 - n}
    expected = {
        "format": "workbench-dataset/1", "name": "synthetic", "num_classes": 6,
        "class_names": ["background", "stripes", "checker", "dots", "grain", "rings"],
        "palette": [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128], [128, 0, 128]],
        "ignore_index": 255, "image_size": [32, 40], "splits": {n: f"splits/{n}.txt" for n in names},
        "label_fractions": list(FRACTIONS), "unlabeled_gt": "diagnostics-only", "counts": expected_counts,
    }
    assert {k: v for k, v in manifest.items() if k not in ("generator", "fingerprint")} == expected
    assert manifest["fingerprint"] == dataset_fingerprint(tiny_root)
    gen = manifest["generator"]
    assert {k: gen[k] for k in TINY.to_dict()} == TINY.to_dict()
    assert SyntheticSpec.from_dict({k: gen[k] for k in TINY.to_dict()}) == TINY
    assert gen["effective"] == pytest.approx(TINY.effective())
    assert sorted(p.name for p in tiny_root.iterdir()) == ["images", "manifest.json", "masks", "splits"]
    assert sorted(p.name for p in (tiny_root / "splits").iterdir()) == sorted(f"{n}.txt" for n in names)
    assert len(list((tiny_root / "images").iterdir())) == len(list((tiny_root / "masks").iterdir())) == 104
    for name in names:
        rows = read_split(tiny_root, name)
        assert len(rows) == expected_counts[name]
        for img_rel, mask_rel in rows:
            sid = re.fullmatch(r"images/((train|val)_\d{5})\.png", img_rel).group(1)
            assert mask_rel == f"masks/{sid}.png"
    img_rel, mask_rel = read_split(tiny_root, "val")[0]
    with Image.open(tiny_root / img_rel) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (40, 32)
    with Image.open(tiny_root / mask_rel) as im:
        assert im.format == "PNG" and im.mode == "P" and im.size == (40, 32)
        assert im.getpalette()[:18] == [v for rgb in expected["palette"] for v in rgb]


def test_split_arithmetic(tiny_root: Path) -> None:
    train = {r[0] for r in read_split(tiny_root, "train")}
    val = {r[0] for r in read_split(tiny_root, "val")}
    assert len(train) == 96 and len(val) == 8 and not train & val
    previous: set[str] = set()
    for f in FRACTIONS:  # smallest first: each labeled set contains the previous one
        labeled = {r[0] for r in read_split(tiny_root, f"labeled_{f}")}
        unlabeled_rows = read_split(tiny_root, f"unlabeled_{f}")
        unlabeled = {r[0] for r in unlabeled_rows}
        assert len(labeled) == math.ceil(96 / int(f[2:]))
        assert previous <= labeled and not labeled & unlabeled and labeled | unlabeled == train
        assert all(len(r) == 2 for r in unlabeled_rows)  # unlabeled lines keep their (diagnostic) mask path
        previous = labeled
    present: set[int] = set()
    for _, mask_rel in read_split(tiny_root, "labeled_1-32"):
        present |= set(np.unique(np.array(Image.open(tiny_root / mask_rel))).tolist())
    assert present == set(range(6))


def test_masks_hold_only_class_values_and_every_class(tiny_root: Path) -> None:
    seen: set[int] = set()
    for path in (tiny_root / "masks").iterdir():
        seen |= set(np.unique(np.array(Image.open(path))).tolist())
    assert seen == set(range(6))  # 0..K-1, every class present, no 255 (nothing is ignored)


def test_masks_on_disk_equal_rendered_masks(tiny_root: Path) -> None:
    image, mask = render_sample(np.random.default_rng([TINY.seed, 1, 0]), TINY)  # val image 0
    assert np.array_equal(np.array(Image.open(tiny_root / "masks/val_00000.png")), mask)
    assert np.array_equal(np.array(Image.open(tiny_root / "images/val_00000.png")), image)  # lossless


def test_determinism(tmp_path: Path, tiny_root: Path) -> None:
    again = generate_synthetic(tmp_path / "again", TINY, progress=False)
    assert file_bytes(again) == file_bytes(tiny_root)
    other = generate_synthetic(tmp_path / "other", SyntheticSpec(image_size=(32, 40), num_train=96, num_val=8,
                                                                 seed=4), progress=False)
    assert (other / "images/train_00000.png").read_bytes() != (tiny_root / "images/train_00000.png").read_bytes()


def test_ensure_is_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "data"
    assert ensure_synthetic(root, TINY, progress=False) == root
    before = tree_snapshot(root)

    def no_render(*args: object, **kwargs: object) -> None:
        raise AssertionError("ensure_synthetic rendered again")

    monkeypatch.setattr(synthetic, "render_sample_detailed", no_render)
    assert ensure_synthetic(str(root), TINY, progress=False) == root
    assert tree_snapshot(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_ensure_repairs_a_missing_file(tmp_path: Path) -> None:
    root = ensure_synthetic(tmp_path / "data", TINY, progress=False)
    original = file_bytes(root)
    (root / "masks/train_00007.png").unlink()
    ensure_synthetic(root, TINY, progress=False)
    assert file_bytes(root) == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_other_spec_or_foreign_content_raises(tmp_path: Path) -> None:
    root = generate_synthetic(tmp_path / "data", TINY, progress=False)
    before = file_bytes(root)
    other = SyntheticSpec(image_size=(32, 40), num_train=96, num_val=8, seed=3, difficulty=0.7)
    for fn in (generate_synthetic, ensure_synthetic):
        with pytest.raises(ValueError, match="different spec.*pick another root or delete it"):
            fn(root, other, progress=False)
    assert file_bytes(root) == before
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a workbench synthetic dataset"):
        ensure_synthetic(foreign, TINY, progress=False)
    assert (foreign / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "notes"]


def test_interrupted_generation_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = synthetic.render_sample_detailed
    calls = {"n": 0}

    def failing(rng: np.random.Generator, spec: SyntheticSpec) -> synthetic.RenderedSample:
        calls["n"] += 1
        if calls["n"] > 20:
            raise RuntimeError("interrupted")
        return real(rng, spec)

    monkeypatch.setattr(synthetic, "render_sample_detailed", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        generate_synthetic(tmp_path / "data", TINY, progress=False)
    assert calls["n"] == 21 and list(tmp_path.iterdir()) == []


def test_smallest_split_covers_classes_even_when_chance_would_not(tmp_path: Path) -> None:
    # 2 objects per image, 3 labeled images (ceil(64 / 24)): 6 uniform draws over 5 classes cover all of them
    # with probability 5! * S(6, 5) / 5^6 = 1800 / 15625 = 0.115 only, so the partition must choose on purpose
    spec = SyntheticSpec(image_size=32, num_train=64, num_val=2, objects_per_image=(2, 2), label_fractions=("1-24",))
    root = generate_synthetic(tmp_path / "data", spec, progress=False)
    rows = read_split(root, "labeled_1-24")
    assert len(rows) == 3
    present = set().union(*(np.unique(np.array(Image.open(root / m))).tolist() for _, m in rows))
    assert present == set(range(6))


def test_uncoverable_smallest_split_raises(tmp_path: Path) -> None:
    # one object per image covers at most 2 classes (with background); 2 labeled images cannot hold all 6
    spec = SyntheticSpec(image_size=32, num_train=40, num_val=2, objects_per_image=(1, 1), label_fractions=("1-32",))
    with pytest.raises(ValueError, match="smallest labeled split"):
        generate_synthetic(tmp_path / "data", spec, progress=False)
    assert list(tmp_path.iterdir()) == []


# The pinned fingerprint of TINY (generator version 3). It was first computed on numpy 2.4 / Pillow 13 and reproduced
# byte for byte with numpy 1.26 / Pillow 10 (reports/calibration/README.md); a change of it means the same spec no
# longer gives the same files: bump GENERATOR_VERSION and re-pin, on purpose.
TINY_FINGERPRINT = "sha256:e5c6e1e862910702714a4869ef39fc8d14eca3d053c433722b88fcb76c997a06"


def test_fingerprint_is_pinned(tiny_root: Path) -> None:
    assert json.loads((tiny_root / "manifest.json").read_text())["fingerprint"] == TINY_FINGERPRINT


def test_fingerprint_sees_every_byte_and_path(tmp_path: Path, tiny_root: Path) -> None:
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(tiny_root, copy)
    (copy / "manifest.json").write_text("{}")  # the manifest is not part of it (it stores the fingerprint)
    assert dataset_fingerprint(copy) == dataset_fingerprint(tiny_root)
    mask = copy / "masks" / "train_00005.png"
    data = bytearray(mask.read_bytes())
    data[-20] ^= 1  # one bit of one mask's image data
    mask.write_bytes(bytes(data))
    assert dataset_fingerprint(copy) != dataset_fingerprint(tiny_root)
    mask.write_bytes(bytes(data[:-20]) + bytes([data[-20] ^ 1]) + bytes(data[-19:]))
    assert dataset_fingerprint(copy) == dataset_fingerprint(tiny_root)
    mask.rename(copy / "masks" / "train_x.png")  # same bytes under another name
    assert dataset_fingerprint(copy) != dataset_fingerprint(tiny_root)


def test_png_bytes_are_stored_deflate_that_any_reader_decodes() -> None:
    import io
    import struct
    import zlib
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (80, 300, 3), dtype=np.uint8)  # 80 rows x 901 bytes = 72080 > one 65535-byte block
    data = synthetic.png_bytes(rgb)
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG" and im.mode == "RGB" and np.array_equal(np.array(im), rgb)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    # IHDR: length 13, width 300, height 80, depth 8, colour type 2 (RGB), no interlace
    assert data[8:33] == struct.pack(">I", 13) + b"IHDR" + struct.pack(">IIBBBBB", 300, 80, 8, 2, 0, 0, 0) + data[29:33]
    idat_len = struct.unpack(">I", data[33:37])[0]
    stream = data[41:41 + idat_len]
    raw = b"".join(b"\x00" + rgb[r].tobytes() for r in range(80))  # filter byte 0 before every row
    assert zlib.decompress(stream) == raw
    # stored blocks: first block header byte 0 (not final, type 00), LEN 65535 and its complement
    assert stream[:2] == b"\x78\x01" and stream[2:7] == b"\x00\xff\xff\x00\x00"
    # the second (final) block holds the other 72080 - 65535 = 6545 bytes: header 1, LEN 6545, NLEN 65535 - 6545
    assert stream[7 + 65535:12 + 65535] == b"\x01" + (6545).to_bytes(2, "little") + (65535 - 6545).to_bytes(2, "little")
    assert len(stream) == 2 + 5 + 65535 + 5 + 6545 + 4  # zlib header, two blocks, adler32
    mask = np.array([[0, 1, 255]], np.uint8)
    pal = [(0, 0, 0), (128, 0, 0)]
    with Image.open(io.BytesIO(synthetic.png_bytes(mask, pal))) as im:
        assert im.mode == "P" and np.array_equal(np.array(im), mask) and im.getpalette()[:6] == [0, 0, 0, 128, 0, 0]
    with pytest.raises(ValueError, match="uint8"):
        synthetic.png_bytes(rgb.astype(np.int16))
    with pytest.raises(ValueError, match="palette"):
        synthetic.png_bytes(mask)
