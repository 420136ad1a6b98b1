"""What the dashboard reads from run directories: runs, metrics, the capture index and captured tensors.

No Panel here: everything is plain Python/torch so it is tested without a server. Layout and artifact format are
those of :mod:`workbench.engine.rundir`; the dashboard only reads (it never trains or writes into a run).

Reading is incremental and lazy, so a run with hundreds of captures stays fast:

- ``metrics.jsonl`` and ``artifacts/index.jsonl`` are followed by :class:`JsonlTail` (only the bytes appended since
  the last poll are parsed; an incomplete last line waits for its newline; a file replaced atomically, e.g. on
  resume, is read again from the start; unreadable complete lines are counted and skipped);
- a step's ``.pt`` file is loaded only when that step is shown, through :class:`ArtifactCache` (LRU keyed by
  ``(path, mtime, size)``, so a rewritten file is loaded again); results derived from a file (per-class quality,
  t-SNE) are memoised under the same key.

Artifact keys the dashboard looks for (B = unlabeled batch; all optional, a view appears when its keys exist; of a
stack of maps the first 4 are drawn):

================  ==========================  =====================================================================
key               dtype / shape               shown as
================  ==========================  =====================================================================
x_w               uint8 [B,3,H,W]             weak view (the gallery's image)
y_u               uint8 [B,H,W]               unlabeled ground truth (diagnostics only), 255 = ignore
pseudo            uint8 [B,H,W]               pseudo-label
conf              float [B,H,W]               confidence in [0, 1]
confident         bool [B,H,W]                pixels above the threshold (used by the loss)
ignore            uint8/bool [B,H,W]          padding (non-zero = ignored)
x_s1, x_s2        uint8 [B,3,H,W]             strong views (CutMixed), with box1 / box2 (bool [B,H,W]) outlined
pred_s1, pred_fp  uint8 [B,H,W]               predictions on the strong view / with feature perturbation
x_l, y_l          uint8 [L,3,H,W], [L,H,W]    the labeled batch (its own strip)
x_masked          uint8 [B,3,H,W]             MaskMatch / S4MIM: the masked input the student saw
pred_masked       uint8 [B,H,W]               MaskMatch / S4MIM: prediction on the masked input
patch_mask        bool/float [B,(1,)H,W]      MaskMatch / S4MIM: 1 = visible patch, 0 = hidden
x_recon           uint8 [B,3,H,W]             S4MIM: reconstruction of the masked image
gate              float [B,(S,)H,W]           ScaleMatch: scale gate map(s) in [0, 1], one column per map (<= 4)
corr_rows         float [B,M,h,w]             CorrMatch: M rows of the correlation map, each reshaped to h x w
corr_points       int [B,M]                   CorrMatch: flat index (y*w + x) of each row's query pixel (marked)
shapes            bool [B,M,H,W]              CorrMatch: binary shapes from the rows (Eq. 7), or uint8 [B,H,W] ids
agents            int [B,N]                   RankMatch: flat index of each agent on the grid of ``agent_maps``
agent_maps        float [B,n,h,w]             RankMatch: activation (agent correlation) maps of the first n agents
features          float [n,D,h,w] or [N,D]    t-SNE of pixel features (every method captures them: the evaluated
                                              network's ASPP map of the first n <= 4 weak views, or labeled views
                                              for supervised-only training, on <= 32 x 32 cells)
feature_labels    int [n,h,w] or [N]          t-SNE colours: captured with ``features`` (the images' ground truth,
                                              else the network's prediction; 255 = ignore); when absent, y_u
                                              else pseudo (when their batch is n), resized to h x w
================  ==========================  =====================================================================

Other keys are drawn too, under their own names: a per-sample map [B,H,W] (H, W >= 4; bool as a mask, integers as
labels, floats as a heat map) in the gallery, an image ``x_*`` uint8 [B,3,H,W] in the gallery, a stack of maps
[B,C,h,w] (first 4 channels) in the method views; anything else (scalars such as a threshold, small vectors) is
listed under the gallery with its value or shape.
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from workbench.engine.rundir import RunDir
from workbench.ops import IGNORE
from workbench.ops.grid import grid_labels
from workbench.ops.semi import class_quality
from workbench.runfiles import JsonlTail, discover_runs  # noqa: F401  (re-exported)
from workbench.runs import DatasetMeta, dataset_meta, generic_meta  # noqa: F401  (re-exported)

#: keys read by the gallery and the method views; everything else per-sample is shown generically
KNOWN_KEYS = frozenset({
    "x_w", "y_u", "pseudo", "conf", "confident", "ignore", "x_s1", "x_s2", "box1", "box2", "pred_s1", "pred_fp",
    "x_l", "y_l", "x_masked", "pred_masked", "patch_mask", "x_recon", "gate", "corr_rows", "corr_points", "shapes",
    "agents", "agent_maps", "features", "feature_labels"})
#: keys whose first axis is not the unlabeled batch
NOT_PER_SAMPLE = frozenset({"x_l", "y_l", "features", "feature_labels"})
#: gallery sort orders: value -> label
ORDERS = {"batch": "batch order", "error_desc": "pseudo-label error (worst first)",
          "error_asc": "pseudo-label error (best first)", "conf_asc": "mean confidence (lowest first)"}


class ArtifactError(RuntimeError):
    """A capture file is missing, truncated, corrupt or not a dict of tensors; the message names the file."""


# ---------------------------------------------------------------------------------------------------- files
def _file_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path), st.st_mtime_ns, st.st_size


class ArtifactCache:
    """LRU of loaded capture files and of results derived from them, keyed by ``(path, mtime_ns, size)``.

    Args:
        max_files: capture files kept in memory (each is one step's tensors).
        max_derived: derived results kept (small: per-class numbers, t-SNE coordinates).
    """

    def __init__(self, max_files: int = 6, max_derived: int = 4096) -> None:
        if max_files < 1 or max_derived < 1:
            raise ValueError(f"max_files and max_derived must be >= 1, got {max_files}, {max_derived}")
        self.max_files, self.max_derived = max_files, max_derived
        self._files: OrderedDict[tuple, dict[str, Tensor]] = OrderedDict()
        self._derived: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()  # the t-SNE runs in a worker thread
        self.loads = 0  # number of actual torch.load calls (tests and diagnostics)

    def _get(self, store: OrderedDict, key: tuple) -> Any:
        with self._lock:
            if key not in store:
                return None
            store.move_to_end(key)
            return store[key]

    def _put(self, store: OrderedDict, key: tuple, value: Any, limit: int) -> None:
        with self._lock:
            store[key] = value
            store.move_to_end(key)
            while len(store) > limit:
                store.popitem(last=False)

    def load(self, path: str | Path, keep: bool = True) -> dict[str, Tensor]:
        """The tensors of a capture file; :class:`ArtifactError` naming the file when unreadable. Kept in the LRU
        unless ``keep`` is False (a scan over many files must not evict the steps being viewed)."""
        path = Path(path)
        try:
            key = _file_key(path)
        except OSError as e:
            raise ArtifactError(f"capture file {path.name} is missing ({e.strerror})") from None
        hit = self._get(self._files, key)
        if hit is not None:
            return hit
        try:
            obj = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as e:
            raise ArtifactError(f"could not read capture file {path.name}: {type(e).__name__}: {e}") from None
        finally:
            self.loads += 1
        if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
            raise ArtifactError(f"could not read capture file {path.name}: not a dict of tensors")
        if keep:
            self._put(self._files, key, obj, self.max_files)
        return obj

    def derived(self, path: str | Path, name: str, fn: Callable[[dict[str, Tensor]], Any]) -> Any:
        """``fn(tensors of path)`` memoised under (file identity, ``name``); loads the file only when needed."""
        try:
            key = (*_file_key(Path(path)), name)
        except OSError as e:
            raise ArtifactError(f"capture file {Path(path).name} is missing ({e.strerror})") from None
        with self._lock:
            if key in self._derived:
                self._derived.move_to_end(key)
                return self._derived[key]
        value = fn(self.load(path, keep=False))
        self._put(self._derived, key, value, self.max_derived)
        return value


#: shared by every session of a server (captures are read-only, so sharing is safe)
CACHE = ArtifactCache()


# ---------------------------------------------------------------------------------------------------- runs
#: files whose modification time says when a run was last updated (the artifacts folder changes with each capture)
UPDATE_MARKERS = ("metrics.jsonl", "summary.json", "artifacts", "artifacts/index.jsonl")


def run_updated(run_path: str | Path) -> float:
    """When a run directory was last updated: the newest modification time (seconds since the epoch) of its
    ``metrics.jsonl``, ``summary.json``, ``artifacts/`` folder and ``artifacts/index.jsonl``; the folder's own time
    when none exists (a run that has just started); -inf when the folder is gone."""
    root = Path(run_path)
    times = []
    for name in UPDATE_MARKERS:
        try:
            times.append((root / name).stat().st_mtime)
        except OSError:
            pass
    if times:
        return max(times)
    try:
        return root.stat().st_mtime
    except OSError:
        return -math.inf


def most_recent_run(runs_dir: str | Path, names: list[str]) -> str | None:
    """The name in ``names`` (run paths relative to ``runs_dir``) of the most recently updated run
    (:func:`run_updated`; a tie goes to the name sorted last); None when ``names`` is empty."""
    if not names:
        return None
    return max(names, key=lambda n: (run_updated(Path(runs_dir) / n), n))


class RunData:
    """One run directory as the dashboard sees it: metrics, captures, dataset metadata, lazily loaded steps.

    The JSON-lines files are read at construction; :meth:`refresh` reads what was appended since.
    """

    def __init__(self, path: str | Path, cache: ArtifactCache | None = None) -> None:
        self.run = RunDir(path)
        self.cache = cache or CACHE
        self.metrics = JsonlTail(self.run.metrics)
        self.index = JsonlTail(self.run.artifacts / "index.jsonl")
        self._meta: DatasetMeta | None = None
        self.refresh()

    @property
    def path(self) -> Path:
        """The run directory."""
        return self.run.path

    def refresh(self) -> tuple[bool, bool]:
        """Poll both JSON-lines files: (metrics changed, captures changed)."""
        return self.metrics.poll(), self.index.poll()

    def records(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Metric records (``kind`` "train" / "eval" / None for all) read so far."""
        return [r for r in self.metrics.records if kind is None or r.get("kind") == kind]

    def captures(self) -> dict[int, dict[str, Any]]:
        """Index entries by step (a step captured again after a resume: the last entry wins), sorted by step."""
        out: dict[int, dict[str, Any]] = {}
        for e in self.index.records:
            if isinstance(e.get("step"), int) and isinstance(e.get("file"), str):
                out[e["step"]] = e
        return dict(sorted(out.items()))

    def steps(self) -> list[int]:
        """Captured steps, ascending."""
        return list(self.captures())

    def step_path(self, step: int) -> Path:
        """The capture file of ``step`` (KeyError naming the step when it was not captured)."""
        entry = self.captures().get(step)
        if entry is None:
            raise KeyError(f"step {step} has no capture in {self.run.artifacts}")
        path = self.run.artifacts / Path(entry["file"]).name
        if path.is_symlink():
            raise KeyError(f"capture {path} is a symbolic link; the dashboard reads only files inside the run")
        return path

    def load_step(self, step: int) -> dict[str, Tensor]:
        """The tensors captured at ``step`` (cached); :class:`ArtifactError` when the file is unreadable."""
        return self.cache.load(self.step_path(step))

    def meta(self) -> DatasetMeta:
        """Dataset class names and palette (read once)."""
        if self._meta is None:
            evals = [r for r in self.records("eval") if isinstance(r.get("iou"), list)]
            self._meta = dataset_meta(self.path, len(evals[-1]["iou"]) if evals else None)
        return self._meta

    def warnings(self) -> list[str]:
        """Problems worth showing (unreadable JSON lines)."""
        out = []
        for tail in (self.metrics, self.index):
            if tail.bad_lines:
                out.append(f"{tail.path.relative_to(self.path)}: {tail.bad_lines} unreadable line(s) skipped")
        return out


# ---------------------------------------------------------------------------------------------------- tensors
def batch_size(arts: dict[str, Tensor]) -> int:
    """The unlabeled batch size of a capture: first axis of x_w, pseudo, conf or y_u (0 when none exists)."""
    for k in ("x_w", "pseudo", "conf", "y_u"):
        if k in arts and arts[k].dim() >= 1:
            return int(arts[k].shape[0])
    return 0


def per_sample_keys(arts: dict[str, Tensor]) -> dict[str, Tensor]:
    """The tensors whose first axis is the unlabeled batch (the labeled batch and ``features`` excluded)."""
    b = batch_size(arts)
    return {k: v for k, v in arts.items() if k not in NOT_PER_SAMPLE and v.dim() >= 1 and v.shape[0] == b}


def valid_mask(arts: dict[str, Tensor]) -> Tensor | None:
    """bool [B,H,W]: pixels neither padding (``ignore`` != 0) nor ignored in the ground truth (``y_u`` == 255);
    None without ``y_u``."""
    if "y_u" not in arts:
        return None
    valid = arts["y_u"] != IGNORE
    if "ignore" in arts:
        valid &= arts["ignore"] == 0
    return valid


@dataclass(frozen=True)
class SampleStats:
    """Per-sample numbers of one capture, used to filter and sort the gallery."""

    index: int
    error: float | None  # fraction of valid pixels whose pseudo-label differs from y_u (None: no y_u / no pixel)
    mean_conf: float | None  # mean confidence over non-padding pixels
    classes: frozenset[int]  # classes present in y_u or in the pseudo-label (valid pixels)


def sample_stats(arts: dict[str, Tensor]) -> list[SampleStats]:
    """:class:`SampleStats` of every unlabeled sample of a capture."""
    b = batch_size(arts)
    valid = valid_mask(arts)
    pad_ok = (arts["ignore"] == 0) if "ignore" in arts else None
    out = []
    for i in range(b):
        err = None
        if valid is not None and "pseudo" in arts and int(valid[i].sum()):
            err = float((arts["pseudo"][i] != arts["y_u"][i])[valid[i]].float().mean())
        conf = None
        if "conf" in arts:
            c = arts["conf"][i].float()
            c = c[pad_ok[i]] if pad_ok is not None else c.flatten()
            conf = float(c.mean()) if c.numel() else None
        classes: set[int] = set()
        for k in ("y_u", "pseudo"):
            if k in arts:
                lab = arts[k][i]
                keep = (lab != IGNORE) if pad_ok is None else (lab != IGNORE) & pad_ok[i]
                classes.update(int(c) for c in lab[keep].unique())
        out.append(SampleStats(i, err, conf, frozenset(classes)))
    return out


def select_samples(stats: list[SampleStats], cls: int | None = None, order: str = "batch") -> list[int]:
    """Indices of the samples to show: those containing class ``cls`` (all when None), in ``order``
    (a key of :data:`ORDERS`; samples without the sort value come last, in batch order)."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {sorted(ORDERS)}, got {order!r}")
    rows = [s for s in stats if cls is None or cls in s.classes]
    if order == "batch":
        return [s.index for s in rows]
    attr, sign = {"error_desc": ("error", -1), "error_asc": ("error", 1), "conf_asc": ("mean_conf", 1)}[order]
    known = sorted((s for s in rows if getattr(s, attr) is not None), key=lambda s: (sign * getattr(s, attr), s.index))
    return [s.index for s in known] + [s.index for s in rows if getattr(s, attr) is None]


def per_class_quality(arts: dict[str, Tensor], num_classes: int) -> dict[str, list[float]] | None:
    """Pseudo-label quality per class of one capture (:func:`workbench.ops.semi.class_quality` over the valid
    pixels of :func:`valid_mask`; all pixels count as confident when the capture has no ``confident`` mask), as
    lists: ``iou``, ``precision``, ``mask_ratio``, ``mining_ratio`` and ``gt_pixels`` (nan where a ratio is 0/0).

    None when the capture lacks ``pseudo`` or ``y_u``.
    """
    valid = valid_mask(arts)
    if valid is None or "pseudo" not in arts:
        return None
    confident = arts["confident"].bool() if "confident" in arts else torch.ones_like(valid)
    q = class_quality(arts["pseudo"], confident, arts["y_u"], num_classes, valid)
    return {k: v.tolist() for k, v in q.items()}


def spread_steps(steps: list[int], max_points: int) -> list[int]:
    """At most ``max_points`` (>= 2) of ``steps``: every ``stride``-th one from the first, plus the last, with
    ``stride`` the smallest power of two that fits. The picks stay the same while captures are appended (until the
    stride doubles, when they become a subset), so memoised per-file results keep being reused."""
    if max_points < 2:
        raise ValueError(f"max_points must be >= 2, got {max_points}")
    stride = 1
    while -(-len(steps) // stride) > max_points - 1:
        stride *= 2
    picks = list(steps[::stride])
    if steps and picks[-1] != steps[-1]:
        picks.append(steps[-1])
    return picks


def quality_over_time(run: RunData, max_points: int = 40) -> tuple[list[int], list[dict[str, list[float]]], list[str]]:
    """Per-class pseudo-label quality at up to ``max_points`` captured steps (memoised per file).

    Returns (steps, one :func:`per_class_quality` dict per step, messages about captures that were skipped:
    unreadable, or without pseudo-label / ground truth).
    """
    n = run.meta().num_classes
    steps, vals, notes = [], [], []
    for s in spread_steps(run.steps(), max_points):
        try:
            q = run.cache.derived(run.step_path(s), f"quality/{n}", lambda a: per_class_quality(a, n))
        except (ArtifactError, OSError) as e:
            notes.append(f"step {s}: {e}")
            continue
        if q is None:
            notes.append(f"step {s}: no pseudo-label or ground truth captured")
            continue
        steps.append(s)
        vals.append(q)
    return steps, vals, notes


def feature_points(arts: dict[str, Tensor], max_points: int = 600, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Pixel features and their labels for t-SNE: (float32 [N,D], int64 [N]), N <= ``max_points``.

    ``features`` [B,D,h,w] gives one point per pixel, labelled by ``feature_labels`` [B,h,w] or else ``y_u`` /
    ``pseudo`` read at the feature cells (:func:`workbench.ops.grid.grid_labels`, the package's one rule);
    ``features`` [N,D] needs ``feature_labels`` [N] (else all -1). Points labelled 255 are dropped; a seeded
    random subset is kept when there are more than ``max_points``.
    ValueError when there are no usable features.
    """
    f = arts.get("features")
    if f is None:
        raise ValueError("the capture has no 'features' tensor")
    lab = arts.get("feature_labels")
    if f.dim() == 4:
        b, d, h, w = f.shape
        if lab is None:
            src = arts.get("y_u", arts.get("pseudo"))
            lab = grid_labels(src, (h, w)) if src is not None and src.shape[0] == b else None
        pts = f.permute(0, 2, 3, 1).reshape(-1, d)
        lab = lab.reshape(-1).long() if lab is not None else torch.full((pts.shape[0],), -1)
    elif f.dim() == 2:
        pts = f
        lab = lab.reshape(-1).long() if lab is not None else torch.full((f.shape[0],), -1)
    else:
        raise ValueError(f"features must be [B,D,h,w] or [N,D], got shape {list(f.shape)}")
    if lab.shape[0] != pts.shape[0]:
        raise ValueError(f"feature_labels has {lab.shape[0]} entries for {pts.shape[0]} feature vectors")
    keep = lab != IGNORE
    pts, lab = pts[keep].float(), lab[keep]
    if pts.shape[0] > max_points:
        idx = torch.randperm(pts.shape[0], generator=torch.Generator().manual_seed(seed))[:max_points]
        pts, lab = pts[idx], lab[idx]
    return pts, lab


def tsne_embedding(arts: dict[str, Tensor], max_points: int = 600, seed: int = 0, iters: int = 500
                   ) -> tuple[Tensor, Tensor]:
    """2-D t-SNE (:func:`workbench.viz.embedding.tsne_2d`: PCA init, perplexity min(30, (N-1)/3); here at least
    250 iterations and one CPU thread so a server stays responsive) of :func:`feature_points`: (float32 [N,2],
    int64 [N] labels)."""
    from workbench.viz.embedding import tsne_2d

    pts, lab = feature_points(arts, max_points, seed)
    n = pts.shape[0]
    if n < 5:
        raise ValueError(f"t-SNE needs at least 5 labelled feature vectors, got {n}")
    xy = tsne_2d(pts, seed, iters=max(250, iters), threads=1)
    return torch.from_numpy(xy).float(), lab
