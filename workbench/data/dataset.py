"""Datasets: the manifest, split lists, and the per-step training dataset.

Every dataset on disk (embedded synthetic or prepared by a recipe) has the same layout::

    <root>/manifest.json         {"format": "workbench-dataset/1", "num_classes", "class_names", "palette",
                                  "ignore_index": 255, "splits": {name: "splits/<name>.txt", ...}, ...}
    <root>/splits/<name>.txt     one sample a line: "<image path> [<mask path>]" relative to root

Training reads whole *steps*: item ``s`` of :class:`StepDataset` is the batch of optimiser step ``s`` for this
process, computed from (seed, step, position) alone. Data order and augmentation are therefore independent of the
number of loader workers, resuming at step ``s`` only needs ``range(s, total)``, and a global batch split over
several processes sees exactly the samples (and augmentations) one process would.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors

from workbench.data.manifest import (  # noqa: F401  (DataError, Manifest, load_manifest, voc_palette: re-exported)
    MANIFEST_FORMAT,
    DataError,
    Manifest,
    load_manifest,
    voc_palette,
)
from workbench.data.transforms import IGNORE, cutmix_box, strong_transform, weak_transform

def data_identity(manifest: Manifest, splits: Sequence[str]) -> dict[str, Any]:
    """What a run records of the data it trained on (summary.json ``dataset``): the dataset's name and root, the
    splits it read, and ``fingerprint``. When the manifest carries a content fingerprint (the embedded dataset:
    a sha256 over every file, see ``workbench.data.synthetic.dataset_fingerprint``) that is it
    (``fingerprint_of: "files"``); otherwise a sha256 over manifest.json and the split lists read
    (``"lists"``: the same image list, not a check of the pixels)."""
    fingerprint = manifest.raw.get("fingerprint")
    if isinstance(fingerprint, str) and fingerprint.startswith("sha256:"):
        of = "files"
    else:
        h = hashlib.sha256((manifest.root / "manifest.json").read_bytes())
        for split in sorted(set(splits)):
            h.update(split.encode() + b"\0" + manifest.split_path(split).read_bytes())
        fingerprint, of = f"sha256:{h.hexdigest()}", "lists"
    return {"name": manifest.name, "root": str(manifest.root), "splits": sorted(set(splits)),
            "fingerprint": fingerprint, "fingerprint_of": of}


def read_split(manifest: Manifest, split: str, check_files: bool = True) -> list[tuple[Path, Path | None]]:
    """(image, mask or None) paths of a split list; DataError naming the first missing file when checked."""
    path = manifest.split_path(split)
    if not path.is_file():
        raise DataError(f"split list {path} not found")
    items: list[tuple[Path, Path | None]] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) > 2:
            raise DataError(f"{path}:{n}: expected '<image> [<mask>]', got {line!r}")
        img = manifest.root / parts[0]
        mask = manifest.root / parts[1] if len(parts) == 2 else None
        items.append((img, mask))
    if not items:
        raise DataError(f"split list {path} is empty")
    if check_files:
        missing = [p for it in items for p in it if p is not None and not p.is_file()]
        if missing:
            raise DataError(f"{len(missing)} file(s) of split {split!r} ({path}) are missing, first: {missing[0]}")
    return items


def read_image(path: Path) -> Tensor:
    """RGB uint8 tensor [3, H, W]; DataError naming the file when it cannot be decoded."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def read_mask(path: Path, num_classes: int, ignore_index: int = IGNORE) -> Tensor:
    """Label mask uint8 [H, W] (palette index or grey value); DataError on bad values or unreadable files."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise DataError(f"mask {path}: mode {im.mode}, expected a palette (P) or greyscale (L) PNG")
            arr = np.asarray(im)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"cannot read mask {path}: {e}") from None
    bad = (arr >= num_classes) & (arr != ignore_index)
    if bad.any():
        vals = sorted(set(np.unique(arr[bad]).tolist()))
        raise DataError(f"mask {path}: values {vals[:8]} outside [0, {num_classes}) and {ignore_index}")
    return torch.from_numpy(arr.copy())


def verify_files(ds: "SegDataset", level: str = "header") -> list[tuple[Path, str]]:
    """(file, reason) of every unreadable file of a split: ``header`` opens each image and mask (format and size
    read from the header; the mask's mode and its size against the image's are checked), ``full`` decodes them
    (mask values too). Cheap enough for every listed file: the header read touches only the first bytes."""
    bad: list[tuple[Path, str]] = []
    for i, (img, mask) in enumerate(ds.items):
        if level == "full":
            try:
                ds.load(i)
            except DataError as e:
                bad.append((img, str(e)))
            continue
        try:
            with Image.open(img) as im:
                size = im.size
        except (OSError, UnidentifiedImageError, ValueError) as e:
            bad.append((img, f"cannot read image: {e}"))
            continue
        if mask is None:
            continue
        try:
            with Image.open(mask) as m:
                if m.mode not in ("P", "L"):
                    bad.append((mask, f"mode {m.mode}, expected a palette (P) or greyscale (L) PNG"))
                elif m.size != size:
                    bad.append((mask, f"size {m.size[::-1]} differs from image {img} {size[::-1]}"))
        except (OSError, UnidentifiedImageError, ValueError) as e:
            bad.append((mask, f"cannot read mask: {e}"))
    return bad


class SegDataset(Dataset):
    """One split list of a dataset root: item i -> {"image": uint8 [3,H,W], "mask": uint8 [H,W] | None, "id"}."""

    def __init__(self, root: str | Path, split: str, check_files: bool = True) -> None:
        self.manifest = load_manifest(root)
        self.split = split
        self.items = read_split(self.manifest, split, check_files)

    @property
    def num_classes(self) -> int:
        """Number of classes of the dataset."""
        return self.manifest.num_classes

    def __len__(self) -> int:
        return len(self.items)

    def has_masks(self) -> bool:
        """True when every line of the split names a mask."""
        return all(m is not None for _, m in self.items)

    def load(self, i: int) -> dict[str, Any]:
        """Decode sample ``i`` (checked: readable, mask values valid, image and mask of equal size)."""
        img_path, mask_path = self.items[i]
        image = read_image(img_path)
        mask = None
        if mask_path is not None:
            mask = read_mask(mask_path, self.num_classes, self.manifest.ignore_index)
            if tuple(mask.shape) != tuple(image.shape[1:]):
                raise DataError(f"size mismatch: image {img_path} is {tuple(image.shape[1:])}, "
                                f"mask {mask_path} is {tuple(mask.shape)}")
        return {"image": image, "mask": mask, "id": img_path.stem}

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.load(i)


class EvalDataset(Dataset):
    """Validation samples at their original size: (uint8 image [3,H,W], long mask [H,W])."""

    def __init__(self, root: str | Path, split: str) -> None:
        self.base = SegDataset(root, split)
        if not self.base.has_masks():
            raise DataError(f"evaluation split {split!r} of {self.base.manifest.root} has lines without masks")

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        s = self.base.load(i)
        return s["image"], s["mask"].long()


def _seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (numpy SeedSequence)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


@dataclass
class StepPlan:
    """How steps map to samples: sizes per process, world size, and the epoch length in steps."""

    labeled: int
    unlabeled: int
    batch_l: int
    batch_u: int
    world: int
    rank: int
    seed: int
    semi: bool
    accum: int = 1

    @property
    def iters_per_epoch(self) -> int:
        """Optimiser steps per epoch: a pass over the unlabeled set (semi) or the labeled set (supervised)."""
        n, b = (self.unlabeled, self.batch_u) if self.semi else (self.labeled, self.batch_l)
        return max(1, n // (b * self.world * self.accum))


class StepDataset(Dataset):
    """Item ``s`` = this process's batch for optimiser step ``s`` (a dict of uint8 tensors and ids).

    Keys, with B = batch size and h = w = crop size:
      - always: ``x_l`` [B,3,h,w], ``y_l`` [B,h,w] (uint8, 255 = ignore), ``ids_l``;
      - semi-supervised: ``x_w``, ``x_s1``, ``x_s2`` [B,3,h,w]; ``ignore`` [B,h,w] (255 on padding, else 0);
        ``box1``, ``box2`` [B,h,w] bool CutMix boxes; the mix stream ``x_w_mix``, ``x_s1_mix``, ``x_s2_mix``,
        ``ignore_mix``; ``ids_u``, ``ids_mix``; and, when the unlabeled split lists masks (diagnostics only),
        ``y_u`` and ``y_u_mix``;
      - ``skipped``: samples replaced under the ``skip`` bad-data policy; ``skipped_files``: {file: reason} of them.

    Labeled samples are a concatenation of independent permutations of the labeled set (the labeled set repeated to
    the unlabeled set's length each epoch). The mix stream (``mix_source``): ``"same_images"`` (default, as the
    reference code draws it: UniMatch zips the unlabeled loader with itself, so the mix batch holds the same images
    in the same positions as the main batch, each with its own, different augmentation and CutMix boxes) or
    ``"independent"`` (switch: a second, independent permutation of the unlabeled set per epoch, so a CutMix box
    pastes another image).
    """

    MIX_SOURCES = ("same_images", "independent")

    def __init__(self, labeled: SegDataset, unlabeled: SegDataset | None, plan: StepPlan, crop_size: int,
                 scale_range: tuple[float, float] = (0.5, 2.0), flip: bool = True, bad_data: str = "fail",
                 mix_source: str = "same_images") -> None:
        if not labeled.has_masks():
            raise DataError(f"labeled split {labeled.split!r} has lines without masks")
        if mix_source not in self.MIX_SOURCES:
            raise ValueError(f"mix_source must be one of {self.MIX_SOURCES}, got {mix_source!r}")
        self.mix_source = mix_source
        self.labeled, self.unlabeled, self.plan = labeled, unlabeled, plan
        self.weak = weak_transform(crop_size, scale_range, flip)
        self.strong = strong_transform()
        self.crop_size = crop_size
        self.bad_data = bad_data
        self.with_gt = unlabeled is not None and unlabeled.has_masks()
        self._perm_cache: dict[tuple[int, int], Tensor] = {}
        self.total_steps: int | None = None

    def __len__(self) -> int:
        if self.total_steps is None:
            raise RuntimeError("StepDataset.total_steps is not set")
        return self.total_steps

    # ---- order
    def _order(self, epoch: int, stream: int, n: int, length: int) -> Tensor:
        key = (epoch, stream)
        if key not in self._perm_cache:
            g = torch.Generator().manual_seed(_seed(self.plan.seed, epoch, stream))
            reps = math.ceil(length / n)
            self._perm_cache = {k: v for k, v in self._perm_cache.items() if k[0] >= epoch - 1}
            self._perm_cache[key] = torch.cat([torch.randperm(n, generator=g) for _ in range(reps)])[:length]
        return self._perm_cache[key]

    def positions(self, micro: int, batch: int) -> tuple[int, list[int]]:
        """(epoch, positions within the epoch) of this process's ``batch`` samples at micro-step ``micro``.

        Optimiser step s = micro // accum holds the global batch of world x accum x batch positions; micro-batch a of
        rank r takes the slice ``(a x world + r) x batch`` of it, so any (world, accum) split of one global batch
        sees the same samples.
        """
        p = self.plan
        s, a = divmod(micro, p.accum)
        epoch, si = divmod(s, p.iters_per_epoch)
        start = si * batch * p.world * p.accum + (a * p.world + p.rank) * batch
        return epoch, list(range(start, start + batch))

    # ---- samples
    def _load(self, ds: SegDataset, index: int) -> tuple[dict[str, Any], dict[str, str]]:
        """Load a sample; under the skip policy replace unreadable ones by the next index ({file: why} of the
        skipped ones returned)."""
        skipped: dict[str, str] = {}
        while True:
            try:
                return ds.load(index), skipped
            except DataError as e:
                if self.bad_data != "skip" or len(skipped) >= len(ds) - 1:
                    raise
                skipped[str(ds.items[index][0])] = str(e)
                index = (index + 1) % len(ds)

    def _sample(self, ds: SegDataset, index: int, seed: int, strong: bool, need_mask: bool) -> dict[str, Any]:
        s, skipped = self._load(ds, index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            image = tv_tensors.Image(s["image"])
            h, w = image.shape[-2:]
            gt = s["mask"] if s["mask"] is not None else torch.zeros(h, w, dtype=torch.uint8)
            ign = torch.zeros(h, w, dtype=torch.uint8)
            image, gt, ign = self.weak(image, tv_tensors.Mask(gt), tv_tensors.Mask(ign))
            out = {"x": image.as_subclass(Tensor), "ignore": ign.as_subclass(Tensor), "id": s["id"],
                   "skipped": len(skipped), "skipped_files": skipped}
            if need_mask:
                out["y"] = gt.as_subclass(Tensor)
            if strong:
                g = torch.Generator().manual_seed(seed ^ 0x5EED)
                out["s1"] = self.strong(out["x"])
                out["s2"] = self.strong(out["x"])
                out["box1"] = cutmix_box(self.crop_size, generator=g)
                out["box2"] = cutmix_box(self.crop_size, generator=g)
        return out

    def __getitem__(self, step: int) -> dict[str, Any]:
        p = self.plan
        batch: dict[str, Any] = {}
        epoch, pos_l = self.positions(step, p.batch_l)
        length = p.iters_per_epoch * p.world * p.accum * max(p.batch_l, p.batch_u)
        order_l = self._order(epoch, 0, p.labeled, length)
        lab = [self._sample(self.labeled, int(order_l[q]), _seed(p.seed, epoch, 0, q), False, True) for q in pos_l]
        batch["x_l"] = torch.stack([s["x"] for s in lab])
        batch["y_l"] = torch.stack([s["y"] for s in lab])
        batch["ids_l"] = [s["id"] for s in lab]
        skipped = sum(s["skipped"] for s in lab)
        files: dict[str, str] = {}
        for s in lab:
            files.update(s["skipped_files"])
        if p.semi:
            assert self.unlabeled is not None
            _, pos_u = self.positions(step, p.batch_u)
            for stream, suffix in ((1, ""), (2, "_mix")):
                # same_images: the mix stream reads the main stream's order (same image per position); its
                # augmentation seeds stay those of stream 2, so every mix view differs from the main one
                order_stream = 1 if self.mix_source == "same_images" else stream
                order = self._order(epoch, order_stream, p.unlabeled, length)
                us = [self._sample(self.unlabeled, int(order[q]), _seed(p.seed, epoch, stream, q), True,
                                   self.with_gt) for q in pos_u]
                batch["x_w" + suffix] = torch.stack([s["x"] for s in us])
                batch["x_s1" + suffix] = torch.stack([s["s1"] for s in us])
                batch["x_s2" + suffix] = torch.stack([s["s2"] for s in us])
                batch["ignore" + suffix] = torch.stack([s["ignore"] for s in us])
                batch["ids" + ("_u" if not suffix else suffix)] = [s["id"] for s in us]
                if self.with_gt:
                    batch["y_u" + suffix] = torch.stack([s["y"] for s in us])
                if not suffix:
                    batch["box1"] = torch.stack([s["box1"] for s in us])
                    batch["box2"] = torch.stack([s["box2"] for s in us])
                skipped += sum(s["skipped"] for s in us)
                for s in us:
                    files.update(s["skipped_files"])
        batch["skipped"] = skipped
        batch["skipped_files"] = files
        batch["step"] = step
        return batch
