"""The embedded synthetic segmentation dataset: a seeded generator written to disk like a real dataset.

Each image shows a textured background and 1-6 objects of ``num_classes - 1`` foreground classes. Class identity is
carried by three partly redundant cues, so a small CNN learns it quickly from local evidence while few labels are
still not enough for everything:

* texture (the strongest, local cue): every class has a characteristic luminance pattern (stripes of a given
  orientation and period, checker, dots, grain, concentric rings, ...), jittered per object;
* colour: a class tint mixed with a random colour (``color_informativeness``), overlapping between classes;
* shape: a typical shape per class, used with probability ``shape_informativeness`` (else a random shape).

Difficulty comes from jittered textures, colour overlap, cluttered smooth-noise backgrounds, *distractors* (soft,
faint patches of a class texture in the background, labelled background) and sensor noise. Object areas are drawn
log-uniformly over ``object_area`` (14x by default, so scales vary on purpose); objects are painted largest first,
later ones occluding earlier ones, and the mask shows the visible object. Masks carry no label noise.

One scalar, ``difficulty`` in [0, 1], moves every difficulty knob along a fixed law (``DIFFICULTY_LAW``); any knob
set explicitly overrides the law. On-disk layout (the contract of every workbench dataset)::

    <root>/images/<id>.png   <root>/masks/<id>.png (palette PNG)   <root>/splits/<split>.txt   <root>/manifest.json

Bit-reproducible: the same spec gives byte-identical files whatever numpy, Pillow or zlib is installed. Pixels are
computed in float64 and rounded once to uint8 (no resampling, no lossy encoder), and the PNG files are written by
``png_bytes`` with uncompressed (stored) deflate blocks, so no compressor's version enters the bytes. The manifest
records the generator's version and ``fingerprint``, a sha256 over every file's relative path and bytes
(``dataset_fingerprint``); runs record it (summary.json ``dataset.fingerprint``) and run tables refuse to mix runs
trained on different data unless told to.

Splits: ``train``, ``val`` and, per label fraction ``1-d``, ``labeled_1-d`` (the first ``ceil(N / d)`` images of one
seeded order, hence nested, and chosen so every class appears in the smallest one) and ``unlabeled_1-d`` (the rest of
``train``; its lines keep their mask path, that ground truth is for pseudo-label diagnostics only).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import shutil
import hashlib
import struct
import tempfile
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

FORMAT = "workbench-dataset/1"
GENERATOR_VERSION = 3  # bump whenever the same spec would render different files (3: lossless PNG images)
IGNORE_INDEX = 255
SHAPES = ("ellipse", "rectangle", "triangle", "blob", "cross", "diamond")


class _ClassDef(NamedTuple):
    name: str
    texture: str  # stripes | checker | dots | grain | rings | hatch
    period: float  # texture period in pixels at 64 px image size
    angle: float  # degrees; for stripes the direction in which intensity varies (90 = horizontal lines)
    shape: str  # typical shape
    tint: tuple[float, float, float]  # class colour, RGB in [0, 1]


_CLASSES = (
    _ClassDef("stripes", "stripes", 4.0, 90.0, "ellipse", (0.80, 0.30, 0.25)),
    _ClassDef("checker", "checker", 8.0, 0.0, "rectangle", (0.30, 0.70, 0.30)),
    _ClassDef("dots", "dots", 6.0, 0.0, "triangle", (0.30, 0.40, 0.85)),
    _ClassDef("grain", "grain", 1.0, 0.0, "blob", (0.85, 0.75, 0.30)),
    _ClassDef("rings", "rings", 5.0, 0.0, "cross", (0.70, 0.35, 0.75)),
    _ClassDef("diagonals", "stripes", 6.0, 45.0, "diamond", (0.30, 0.75, 0.80)),
    _ClassDef("hatch", "hatch", 6.0, 45.0, "rectangle", (0.90, 0.55, 0.20)),
    _ClassDef("bars", "stripes", 8.0, 0.0, "ellipse", (0.55, 0.55, 0.55)),
)
MAX_CLASSES = len(_CLASSES) + 1
# display palette (PASCAL VOC's first colours); index 255 (ignore) is drawn light grey in the PNG palette
_PALETTE = ((0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128), (0, 128, 128),
            (128, 128, 128), (64, 0, 0))
_IGNORE_COLOUR = (224, 224, 192)

# knob: (value at difficulty 0, value at difficulty 1); linear in between. The default difficulty 0.5 was the one
# measured to leave a clear gap: a small FCN from scratch (500 iterations, batch 16, CPU) reached val mIoU 0.59 and
# 76% class accuracy on found foreground pixels from the 63 images of labeled_1-32, against mIoU 0.78 / 91% from
# all 2000; at difficulty 0 the same test gave 0.88 vs 0.92 (too easy for semi-supervision to matter).
DIFFICULTY_LAW: dict[str, tuple[float, float]] = {
    "texture_contrast": (0.35, 0.05),
    "texture_jitter": (0.15, 0.35),
    "color_informativeness": (0.60, 0.00),
    "shape_informativeness": (0.70, 0.30),
    "background_contrast": (0.20, 0.40),
    "distractor_rate": (0.75, 2.25),
    "distractor_contrast": (0.50, 0.90),
    "noise_std": (0.035, 0.085),
}
_KNOB_BOUNDS = {"texture_contrast": (0.0, 1.0), "texture_jitter": (0.0, 1.0), "color_informativeness": (0.0, 1.0),
                "shape_informativeness": (0.0, 1.0), "background_contrast": (0.0, 1.0),
                "distractor_rate": (0.0, 10.0), "distractor_contrast": (0.0, 2.0), "noise_std": (0.0, 0.5)}


@dataclass(frozen=True)
class SyntheticSpec:
    """Every parameter of the embedded dataset; the whole spec is stored in the manifest for reproducibility.

    Sizes and layout:
        image_size: (H, W) in pixels, each >= 16 (an int means square). Texture periods scale with
            max(1, min(H, W) / 64).
        num_classes: K = background + K - 1 foreground classes, 2 <= K <= 9.
        num_train / num_val: number of training / validation images.
        seed: master seed; image ``i`` of a split is drawn from ``default_rng([seed, split_code, i])``.
        label_fractions: labeled fractions as "1-d" strings (d >= 2), e.g. "1-32" = ceil(num_train / 32) images.
        objects_per_image: inclusive (min, max) number of objects, drawn uniformly.
        object_area: (min, max) object area as a fraction of the image area, drawn log-uniformly.

    Difficulty: ``difficulty`` in [0, 1] sets each knob below that is left ``None`` by ``DIFFICULTY_LAW``:
        texture_contrast: peak-to-peak luminance amplitude of class textures (intensities in [0, 1]).
        texture_jitter: per-object relative jitter of texture period (log scale) and orientation (x 60 degrees).
        color_informativeness: weight of the class tint in an object's colour (rest: a uniform random colour).
        shape_informativeness: probability an object takes its class's typical shape (else any shape).
        background_contrast: amplitude of the smooth, non-periodic background clutter.
        distractor_rate: mean number (Poisson) of distractor patches per image: soft-edged background patches
            carrying a class texture, labelled background.
        distractor_contrast: distractor texture amplitude relative to ``texture_contrast``.
        noise_std: standard deviation of per-pixel Gaussian sensor noise.
    """

    image_size: tuple[int, int] = (96, 96)
    num_classes: int = 6
    num_train: int = 2000
    num_val: int = 300
    seed: int = 0
    label_fractions: tuple[str, ...] = ("1-256", "1-128", "1-64", "1-32", "1-16", "1-8")
    objects_per_image: tuple[int, int] = (1, 6)
    object_area: tuple[float, float] = (0.025, 0.35)
    difficulty: float = 0.3
    texture_contrast: float | None = None
    texture_jitter: float | None = None
    color_informativeness: float | None = None
    shape_informativeness: float | None = None
    background_contrast: float | None = None
    distractor_rate: float | None = None
    distractor_contrast: float | None = None
    noise_std: float | None = None

    def __post_init__(self) -> None:
        def setf(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        def is_int(v: Any) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)

        size = (self.image_size, self.image_size) if is_int(self.image_size) else self.image_size
        if (not isinstance(size, (tuple, list)) or len(size) != 2 or not all(is_int(s) for s in size)
                or min(size) < 16):
            raise ValueError(f"image_size must be (H, W) with integers >= 16, got {self.image_size!r}")
        setf("image_size", (int(size[0]), int(size[1])))
        for name, low in (("num_classes", 2), ("num_train", 2), ("num_val", 1), ("seed", 0)):
            v = getattr(self, name)
            if not is_int(v) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
            setf(name, int(v))
        if self.num_classes > MAX_CLASSES:
            raise ValueError(f"num_classes must be <= {MAX_CLASSES} (background + {len(_CLASSES)} textures), "
                             f"got {self.num_classes}")
        fr = self.label_fractions
        if isinstance(fr, str) or not isinstance(fr, (tuple, list)) or not fr:
            raise ValueError(f"label_fractions must be a non-empty sequence like ('1-32', '1-8'), got {fr!r}")
        for f in fr:
            m = re.fullmatch(r"1-(\d+)", f) if isinstance(f, str) else None
            if m is None or int(m.group(1)) < 2:
                raise ValueError(f"label_fractions entries must look like '1-d' with d >= 2, got {f!r}")
        if len(set(fr)) != len(fr):
            raise ValueError(f"label_fractions has duplicates: {fr!r}")
        setf("label_fractions", tuple(fr))
        lo_hi = self.objects_per_image
        if (not isinstance(lo_hi, (tuple, list)) or len(lo_hi) != 2 or not all(is_int(v) for v in lo_hi)
                or not 1 <= lo_hi[0] <= lo_hi[1] <= 20):
            raise ValueError(f"objects_per_image must be (min, max) with 1 <= min <= max <= 20, got {lo_hi!r}")
        setf("objects_per_image", (int(lo_hi[0]), int(lo_hi[1])))
        area = self.object_area
        if (not isinstance(area, (tuple, list)) or len(area) != 2 or not all(is_num(v) for v in area)
                or not 0 < area[0] <= area[1] <= 0.5):
            raise ValueError(f"object_area must be (min, max) fractions with 0 < min <= max <= 0.5, got {area!r}")
        if area[0] * self.image_size[0] * self.image_size[1] < 4:
            raise ValueError(f"object_area[0]={area[0]} gives objects under 4 pixels at image_size "
                             f"{self.image_size}; raise it or the image size")
        setf("object_area", (float(area[0]), float(area[1])))
        if not is_num(self.difficulty) or not 0.0 <= self.difficulty <= 1.0:
            raise ValueError(f"difficulty must be a number in [0, 1], got {self.difficulty!r}")
        setf("difficulty", float(self.difficulty))
        for name, (low, high) in _KNOB_BOUNDS.items():
            v = getattr(self, name)
            if v is None:
                continue
            if not is_num(v) or not low <= v <= high:
                raise ValueError(f"{name} must be None or a number in [{low}, {high}], got {v!r}")
            setf(name, float(v))

    @property
    def class_names(self) -> tuple[str, ...]:
        """Names of the K classes, index 0 = "background"."""
        return ("background",) + tuple(c.name for c in _CLASSES[: self.num_classes - 1])

    @property
    def palette(self) -> list[list[int]]:
        """Display colour [r, g, b] (0..255) of each of the K classes."""
        return [list(c) for c in _PALETTE[: self.num_classes]]

    def effective(self) -> dict[str, float]:
        """The difficulty knobs in force: explicit values, else ``DIFFICULTY_LAW`` at ``difficulty``."""
        out = {}
        for name, (easy, hard) in DIFFICULTY_LAW.items():
            v = getattr(self, name)
            out[name] = float(v) if v is not None else easy + (hard - easy) * self.difficulty
        return out

    def labeled_size(self, fraction: str) -> int:
        """Number of labeled images of fraction "1-d": ceil(num_train / d)."""
        if fraction not in self.label_fractions:
            raise ValueError(f"fraction {fraction!r} is not one of label_fractions {self.label_fractions}")
        return math.ceil(self.num_train / int(fraction.split("-")[1]))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SyntheticSpec:
        """Inverse of ``to_dict``; ValueError naming unknown keys."""
        if not isinstance(data, dict):
            raise TypeError(f"data must be a dict, got {type(data).__name__}")
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown SyntheticSpec field(s): {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class ObjectInfo:
    """One painted object: its class, shape, centre (y, x) in pixels, area and visible area in pixels.

    ``area`` counts the object's own pixels inside the image; ``visible`` those not covered by later objects.
    """

    class_id: int
    shape: str
    center: tuple[float, float]
    area: int
    visible: int


@dataclass(frozen=True)
class RenderedSample:
    """A rendered image uint8 [H, W, 3], its mask uint8 [H, W] (values 0..K-1) and its objects in paint order."""

    image: np.ndarray
    mask: np.ndarray
    objects: tuple[ObjectInfo, ...]


# ----------------------------------------------------------------------------------------------------- drawing
@functools.lru_cache(maxsize=8)
def _pixel_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates yy, xx float64 [H, W] (read-only)."""
    yy, xx = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Linear interpolation matrix [n_out, n_in] mapping n_in grid samples (corners aligned) onto n_out points."""
    t = np.linspace(0.0, n_in - 1, n_out)
    i0 = np.minimum(np.floor(t).astype(int), n_in - 2)
    frac = t - i0
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), i0] = 1.0 - frac
    m[np.arange(n_out), i0 + 1] += frac
    return m


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int, channels: int) -> np.ndarray:
    """Standard-normal values on a (cells+1)^2 grid, bilinearly upsampled to float [H, W, channels]."""
    grid = rng.standard_normal((cells + 1, cells + 1, channels))
    return np.einsum("yh,hwc,xw->yxc", _interp_matrix(height, cells + 1), grid, _interp_matrix(width, cells + 1))


def _rotated(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (u, v) relative to (cy, cx), rotated by ``angle`` radians (u along the angle's direction)."""
    dy, dx = yy - cy, xx - cx
    c, s = math.cos(angle), math.sin(angle)
    return dx * c + dy * s, -dx * s + dy * c


def _shape_region(shape: str, rng: np.random.Generator, cy: float, cx: float, area: float,
                  yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Boolean [H, W] region of a randomly rotated ``shape`` of (nominal) ``area`` pixels centred at (cy, cx)."""
    u, v = _rotated(yy, xx, cy, cx, rng.uniform(0.0, math.pi))
    if shape == "ellipse":
        aspect = rng.uniform(1.0, 1.8)
        b = math.sqrt(area / (math.pi * aspect))
        return (u / (aspect * b)) ** 2 + (v / b) ** 2 <= 1.0
    if shape == "rectangle":
        aspect = rng.uniform(1.0, 2.0)
        b = math.sqrt(area / (4.0 * aspect))
        return (np.abs(u) <= aspect * b) & (np.abs(v) <= b)
    if shape == "diamond":
        aspect = rng.uniform(1.0, 1.6)
        b = math.sqrt(area / (2.0 * aspect))
        return np.abs(u) / (aspect * b) + np.abs(v) / b <= 1.0
    if shape == "cross":
        t = rng.uniform(0.25, 0.35)  # arm half-width / arm half-length
        a = math.sqrt(area / (8.0 * t - 4.0 * t * t))
        w = t * a
        return ((np.abs(u) <= a) & (np.abs(v) <= w)) | ((np.abs(u) <= w) & (np.abs(v) <= a))
    if shape == "blob":
        k = np.arange(2, 5)
        amp, phase = rng.uniform(0.0, 0.15, 3), rng.uniform(0.0, 2 * math.pi, 3)
        r0 = math.sqrt(area / (math.pi * (1.0 + 0.5 * float(np.sum(amp ** 2)))))
        theta = np.arctan2(v, u)[..., None]
        radius = r0 * (1.0 + np.sum(amp * np.cos(k * theta + phase), axis=-1))
        return u * u + v * v <= radius * radius
    if shape == "triangle":
        angles = np.array([0.0, 2 * math.pi / 3, 4 * math.pi / 3]) + rng.uniform(-0.25, 0.25, 3)
        radii = rng.uniform(0.85, 1.15, 3)
        pu, pv = radii * np.cos(angles), radii * np.sin(angles)
        unit_area = 0.5 * abs((pu[1] - pu[0]) * (pv[2] - pv[0]) - (pu[2] - pu[0]) * (pv[1] - pv[0]))
        scale = math.sqrt(area / unit_area)
        pu, pv = pu * scale, pv * scale
        sides = [(pu[(i + 1) % 3] - pu[i]) * (v - pv[i]) - (pv[(i + 1) % 3] - pv[i]) * (u - pu[i]) for i in range(3)]
        return (sides[0] >= 0) & (sides[1] >= 0) & (sides[2] >= 0)  # vertices are counter-clockwise in (u, v)
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def _texture(cdef: _ClassDef, rng: np.random.Generator, cy: float, cx: float, jitter: float, scale: float,
             yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Class texture float [H, W] in about [-1, 1], anchored at (cy, cx), period/orientation jittered."""
    period = cdef.period * scale * math.exp(jitter * rng.standard_normal())
    angle = math.radians(cdef.angle + 60.0 * jitter * rng.standard_normal())
    phase = rng.uniform(0.0, 2 * math.pi)
    if cdef.texture == "grain":
        h, w = yy.shape
        cell = max(1, round(scale))
        noise = rng.uniform(-1.0, 1.0, (-(-h // cell), -(-w // cell)))
        return np.repeat(np.repeat(noise, cell, axis=0), cell, axis=1)[:h, :w]
    if cdef.texture == "rings":
        return np.sin(2 * math.pi * np.hypot(yy - cy, xx - cx) / period + phase)
    u, v = _rotated(yy, xx, cy, cx, angle)
    if cdef.texture == "stripes":
        return np.sin(2 * math.pi * u / period + phase)
    if cdef.texture == "checker":
        return np.tanh(4.0 * np.sin(2 * math.pi * u / period + phase) * np.sin(2 * math.pi * v / period))
    if cdef.texture == "hatch":
        return np.maximum(np.sin(2 * math.pi * u / period + phase), np.sin(2 * math.pi * v / period)) - 0.4
    if cdef.texture == "dots":
        off = period * rng.uniform(0.0, 1.0, 2)
        du = np.mod(u + off[0], period) - period / 2
        dv = np.mod(v + off[1], period) - period / 2
        return np.tanh(2.0 * (0.3 * period - np.hypot(du, dv)))
    raise ValueError(f"unknown texture {cdef.texture!r}")


def _background(rng: np.random.Generator, height: int, width: int, knobs: dict[str, float]) -> np.ndarray:
    """Background float [H, W, 3]: random base colour, smooth colour variation, a gradient and smooth clutter."""
    yy, xx = _pixel_grid(height, width)
    base = rng.uniform(0.2, 0.8, 3)
    colour_var = 0.12 * _smooth_noise(rng, height, width, 2, 3)
    g = rng.uniform(0.0, 2 * math.pi)
    gradient = rng.uniform(-0.2, 0.2) * ((yy / height - 0.5) * math.sin(g) + (xx / width - 0.5) * math.cos(g))
    clutter = 0.5 * knobs["background_contrast"] * _smooth_noise(rng, height, width, 9, 1)
    return base + colour_var + gradient[..., None] + clutter


def render_sample_detailed(rng: np.random.Generator, spec: SyntheticSpec) -> RenderedSample:
    """Draw one image with its mask and per-object metadata (see the module docstring for the recipe).

    Args:
        rng: numpy Generator; the output is a deterministic function of its state and ``spec``.
        spec: dataset parameters (size, classes, object counts/areas, difficulty knobs).
    Returns:
        RenderedSample with image uint8 [H, W, 3], mask uint8 [H, W] in 0..K-1 and the objects in paint order.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if not isinstance(spec, SyntheticSpec):
        raise TypeError(f"spec must be a SyntheticSpec, got {type(spec).__name__}")
    height, width = spec.image_size
    knobs = spec.effective()
    yy, xx = _pixel_grid(height, width)
    scale = max(1.0, min(height, width) / 64.0)  # never finer than at 64 px: 2-px periods would alias
    n_pix = height * width
    log_area = (math.log(spec.object_area[0] * n_pix), math.log(spec.object_area[1] * n_pix))
    img = _background(rng, height, width, knobs)

    for _ in range(rng.poisson(knobs["distractor_rate"])):  # faint class textures in soft background patches
        cdef = _CLASSES[rng.integers(0, spec.num_classes - 1)]
        cy, cx = rng.uniform(0.0, height), rng.uniform(0.0, width)
        radius = math.sqrt(math.exp(rng.uniform(*log_area)) / math.pi)
        u, v = _rotated(yy, xx, cy, cx, rng.uniform(0.0, math.pi))
        aspect = rng.uniform(1.0, 1.8)
        dist = np.sqrt((u / (radius * math.sqrt(aspect))) ** 2 + (v * math.sqrt(aspect) / radius) ** 2)
        alpha = np.clip(2.0 * (1.0 - dist), 0.0, 1.0)
        amp = knobs["distractor_contrast"] * knobs["texture_contrast"]
        img += (0.5 * amp * alpha * _texture(cdef, rng, cy, cx, knobs["texture_jitter"], scale, yy, xx))[..., None]

    mask = np.zeros((height, width), np.uint8)
    owner = np.full((height, width), -1, np.int64)
    n_obj = int(rng.integers(spec.objects_per_image[0], spec.objects_per_image[1] + 1))
    classes = rng.integers(1, spec.num_classes, n_obj)
    areas = np.sort(np.exp(rng.uniform(*log_area, n_obj)))[::-1]  # largest first: small objects stay visible
    painted: list[tuple[int, str, tuple[float, float], int]] = []
    for idx, (cls, area) in enumerate(zip(classes.tolist(), areas.tolist())):
        cdef = _CLASSES[cls - 1]
        shape = cdef.shape if rng.random() < knobs["shape_informativeness"] else SHAPES[rng.integers(len(SHAPES))]
        cy, cx = rng.uniform(0.1, 0.9) * height, rng.uniform(0.1, 0.9) * width
        region = _shape_region(shape, rng, cy, cx, area, yy, xx)
        ci = knobs["color_informativeness"]
        colour = ci * np.asarray(cdef.tint) + (1.0 - ci) * rng.uniform(0.15, 0.85, 3) + rng.normal(0.0, 0.04, 3)
        amp = knobs["texture_contrast"] * rng.uniform(0.8, 1.2)
        tex = _texture(cdef, rng, cy, cx, knobs["texture_jitter"], scale, yy, xx)
        img[region] = colour + 0.5 * amp * tex[region][:, None]
        mask[region] = cls
        owner[region] = idx
        painted.append((cls, shape, (cy, cx), int(region.sum())))

    img += rng.normal(0.0, knobs["noise_std"], img.shape)
    image = np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
    visible = np.bincount(owner[owner >= 0], minlength=n_obj)
    objects = tuple(ObjectInfo(c, s, ctr, a, int(vis)) for (c, s, ctr, a), vis in zip(painted, visible))
    return RenderedSample(image, mask, objects)


def render_sample(rng: np.random.Generator, spec: SyntheticSpec) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image uint8 [H, W, 3] and its mask uint8 [H, W] (values 0..K-1); see render_sample_detailed."""
    sample = render_sample_detailed(rng, spec)
    return sample.image, sample.mask


# ---------------------------------------------------------------------------------------------- splits, disk
def _partition(presence: np.ndarray, spec: SyntheticSpec, rng: np.random.Generator) -> dict[str, list[int]]:
    """Labeled/unlabeled index lists per fraction from ``presence`` bool [N, K] (class k visible in image n).

    One seeded order; labeled_1-d = its first ceil(N/d) images (so fractions nest). The order starts with a greedy
    set cover of all K classes (most new classes first, random ties) so the smallest labeled split has every class.
    """
    n, k = presence.shape
    absent = np.flatnonzero(~presence.any(axis=0))
    if absent.size:
        raise ValueError(f"classes {absent.tolist()} never appear among the {n} training images; raise num_train")
    chosen: list[int] = []
    covered = np.zeros(k, bool)
    while not covered.all():
        gain = (presence & ~covered).sum(axis=1)
        gain[chosen] = -1
        pick = int(rng.choice(np.flatnonzero(gain == gain.max())))
        chosen.append(pick)
        covered |= presence[pick]
    smallest = min(spec.labeled_size(f) for f in spec.label_fractions)
    if len(chosen) > smallest:
        raise ValueError(f"the smallest labeled split has {smallest} image(s) but covering all {k} classes needs "
                         f"{len(chosen)}; raise num_train or objects_per_image")
    taken = set(chosen)
    order = chosen + [i for i in rng.permutation(n).tolist() if i not in taken]
    out: dict[str, list[int]] = {}
    for f in spec.label_fractions:
        labeled = set(order[: spec.labeled_size(f)])
        out[f"labeled_{f}"] = sorted(labeled)
        out[f"unlabeled_{f}"] = [i for i in range(n) if i not in labeled]
    return out


def _generator_record(spec: SyntheticSpec) -> dict[str, Any]:
    """The manifest's "generator" entry: every spec field, the generator version and the knobs in force."""
    return {**spec.to_dict(), "version": GENERATOR_VERSION, "effective": spec.effective()}


def _sample_id(split: str, index: int, total: int) -> str:
    return f"{split}_{index:0{max(5, len(str(total - 1)))}d}"


def png_bytes(pixels: np.ndarray, palette: list[tuple[int, int, int]] | None = None) -> bytes:
    """A PNG file's bytes for uint8 ``pixels`` [H, W, 3] (RGB) or [H, W] with ``palette`` (indexed, 256 entries).

    The image data is one zlib stream of stored (uncompressed) deflate blocks, filter type 0 on every row, and the
    checksums come from zlib's adler32/crc32 (fixed functions), so the bytes depend on the pixels alone: no
    compressor or library version enters them. Any PNG reader decodes the file.
    """
    pixels = np.ascontiguousarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] != 3):
        raise ValueError(f"pixels must be uint8 [H, W, 3] or [H, W], got {pixels.dtype} {list(pixels.shape)}")
    if (pixels.ndim == 2) != (palette is not None):
        raise ValueError("a palette is given with [H, W] index pixels, and only then")
    height, width = pixels.shape[:2]
    rows = pixels.reshape(height, -1)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()  # filter byte 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    stream = [b"\x78\x01"]  # zlib header: deflate, 32K window, no preset dictionary (31 divides 0x7801)
    blocks = [raw[i:i + 65535] for i in range(0, len(raw), 65535)] or [b""]
    for n, block in enumerate(blocks):
        stream.append(struct.pack("<BHH", n == len(blocks) - 1, len(block), 0xFFFF ^ len(block)) + block)
    stream.append(struct.pack(">I", zlib.adler32(raw)))
    header = struct.pack(">IIBBBBB", width, height, 8, 2 if palette is None else 3, 0, 0, 0)
    parts = [b"\x89PNG\r\n\x1a\n", chunk(b"IHDR", header)]
    if palette is not None:
        table = [tuple(c) for c in palette] + [(0, 0, 0)] * (256 - len(palette))
        if len(table) != 256:
            raise ValueError(f"palette must have at most 256 colours, got {len(palette)}")
        parts.append(chunk(b"PLTE", bytes(v for rgb in table for v in rgb)))
    parts += [chunk(b"IDAT", b"".join(stream)), chunk(b"IEND", b"")]
    return b"".join(parts)


def dataset_fingerprint(root: str | Path) -> str:
    """``"sha256:<hex>"`` over every file of a dataset root except manifest.json, in sorted relative-path order
    (path and bytes of each), so two roots share it exactly when they hold the same files."""
    root = Path(root)
    total = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() != "manifest.json"):
        rel = path.relative_to(root).as_posix().encode()
        total.update(struct.pack(">I", len(rel)) + rel)
        total.update(hashlib.sha256(path.read_bytes()).digest())
    return f"sha256:{total.hexdigest()}"


def _write_dataset(out: Path, spec: SyntheticSpec, progress: bool) -> None:
    """Render every image into the empty directory ``out`` and write split lists and the manifest."""
    for sub in ("images", "masks", "splits"):
        (out / sub).mkdir()
    png_palette = [(0, 0, 0)] * 256
    png_palette[:len(spec.palette)] = [tuple(c) for c in spec.palette]
    png_palette[IGNORE_INDEX] = _IGNORE_COLOUR
    lines: dict[str, list[str]] = {"train": [], "val": []}
    presence = np.zeros((spec.num_train, spec.num_classes), bool)
    jobs = [("train", 0, spec.num_train), ("val", 1, spec.num_val)]
    with tqdm(total=spec.num_train + spec.num_val, desc="synthetic dataset", disable=not progress) as bar:
        for split, code, total in jobs:
            for i in range(total):
                sample = render_sample_detailed(np.random.default_rng([spec.seed, code, i]), spec)
                sid = _sample_id(split, i, total)
                (out / "images" / f"{sid}.png").write_bytes(png_bytes(sample.image))
                (out / "masks" / f"{sid}.png").write_bytes(png_bytes(sample.mask, png_palette))
                lines[split].append(f"images/{sid}.png masks/{sid}.png")
                if split == "train":
                    presence[i, np.unique(sample.mask)] = True
                bar.update(1)
    for name, idx in _partition(presence, spec, np.random.default_rng([spec.seed, 2])).items():
        lines[name] = [lines["train"][i] for i in idx]
    for name, rows in lines.items():
        (out / "splits" / f"{name}.txt").write_text("".join(r + "\n" for r in rows))
    height, width = spec.image_size
    manifest = {
        "format": FORMAT, "name": "synthetic", "num_classes": spec.num_classes,
        "class_names": list(spec.class_names), "palette": spec.palette, "ignore_index": IGNORE_INDEX,
        "image_size": [height, width], "splits": {name: f"splits/{name}.txt" for name in lines},
        "label_fractions": list(spec.label_fractions), "unlabeled_gt": "diagnostics-only",
        "counts": {name: len(rows) for name, rows in lines.items()}, "generator": _generator_record(spec),
        "fingerprint": dataset_fingerprint(out),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _inspect(root: Path, spec: SyntheticSpec) -> str:
    """State of ``root``: "absent" (missing or empty dir), "complete", "incomplete" (same spec, files missing),
    "different" (a dataset manifest with another spec) or "foreign" (anything else)."""
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return "absent"
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return "foreign"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return "foreign"
    if manifest.get("generator") != _generator_record(spec):
        return "different"
    splits = manifest.get("splits", {})
    expected = {"train", "val"} | {f"{p}_{f}" for f in spec.label_fractions for p in ("labeled", "unlabeled")}
    if set(splits) != expected:
        return "incomplete"
    for rel in splits.values():
        path = root / rel
        if not path.is_file():
            return "incomplete"
        for line in path.read_text().splitlines():
            if not all((root / part).is_file() for part in line.split()):
                return "incomplete"
    return "complete"


def _refuse(root: Path, state: str) -> ValueError:
    what = ("holds a synthetic dataset generated with a different spec (or generator version)" if state == "different"
            else "exists and is not a workbench synthetic dataset")
    return ValueError(f"root {str(root)!r} {what}; pick another root or delete it")


def generate_synthetic(root: str | Path, spec: SyntheticSpec = SyntheticSpec(), progress: bool = True) -> Path:
    """Generate the dataset of ``spec`` at ``root`` (always renders; see ``ensure_synthetic`` to reuse).

    Everything is written into a temporary sibling directory that is renamed into place at the end, so an
    interrupted run leaves nothing at ``root``. A same-spec dataset already at ``root`` is replaced; a dataset with
    another spec, or any other non-empty content, raises ValueError. Returns ``root`` as a Path.
    """
    if not isinstance(spec, SyntheticSpec):
        raise TypeError(f"spec must be a SyntheticSpec, got {type(spec).__name__}")
    root = Path(root)
    state = _inspect(root, spec)
    if state in ("different", "foreign"):
        raise _refuse(root, state)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        _write_dataset(tmp, spec, progress)
        state = _inspect(root, spec)  # again: another process may have finished meanwhile
        if state == "absent":
            if root.exists():
                root.rmdir()
            os.rename(tmp, root)
        elif state in ("complete", "incomplete"):
            trash = root.parent / f".{root.name}.old-{uuid.uuid4().hex}"
            os.rename(root, trash)
            os.rename(tmp, root)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            raise _refuse(root, state)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def ensure_synthetic(root: str | Path, spec: SyntheticSpec = SyntheticSpec(), progress: bool = True) -> Path:
    """Return ``root`` at once if it holds the complete dataset of ``spec`` (manifest with the same spec and every
    listed file present), else generate it with ``generate_synthetic`` (same errors)."""
    if not isinstance(spec, SyntheticSpec):
        raise TypeError(f"spec must be a SyntheticSpec, got {type(spec).__name__}")
    root = Path(root)
    if _inspect(root, spec) == "complete":
        return root
    return generate_synthetic(root, spec, progress)
