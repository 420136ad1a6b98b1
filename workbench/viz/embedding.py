"""Feature space of trained runs: decoder features of sampled pixels, their t-SNE (scikit-learn) and a side-by-side
scatter coloured by class.

The decoder features ("decoder" of :class:`workbench.models.DeepLabV3Plus`) are at 1/4 of the input size and are
upsampled to logits with ``align_corners=True``, so feature cell (i, j) sits on input pixel
(round(i (H-1)/(h-1)), round(j (W-1)/(w-1))): that pixel's label is the cell's class (the package's one rule,
:func:`workbench.ops.grid.grid_labels`, re-exported here).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from workbench.ops import IGNORE
from workbench.ops.grid import grid_labels
from workbench.viz.figures import legend_handles, plt

if TYPE_CHECKING:
    from workbench.runs import Table


def sample_pixels(features: Tensor, labels: Tensor, per_class: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Up to ``per_class`` random feature vectors of each class.

    Args: ``features`` float [B, C, h, w]; ``labels`` long [B, h, w] (255 = ignore, never sampled). Returns
    (float32 [M, C], long [M]) grouped by class in ascending order; the choice is seeded (``seed``).
    """
    if features.dim() != 4 or labels.shape != (features.shape[0], *features.shape[2:]):
        raise ValueError(f"features [B, C, h, w] and labels [B, h, w] must match, got {tuple(features.shape)} "
                         f"and {tuple(labels.shape)}")
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    flat = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]).float()
    lab = labels.reshape(-1).long()
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for c in sorted(set(lab.unique().tolist()) - {IGNORE}):
        idx = torch.nonzero(lab == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)[:per_class]].sort().values
        xs.append(flat[idx])
        ys.append(lab[idx])
    if not xs:
        raise ValueError("labels hold no pixel outside the ignore index 255")
    return torch.cat(xs), torch.cat(ys)


@torch.no_grad()
def run_pixel_features(run_dir: str | Path, images: Tensor, labels: Tensor, per_class: int = 150, seed: int = 0,
                       device: str = "cpu", feature: str = "decoder", batch_size: int = 16
                       ) -> tuple[Tensor, Tensor]:
    """Sampled ``feature`` vectors of a run's best checkpoint (its predictor) on uint8 ``images`` [N,3,H,W] with
    long ``labels`` [N,H,W]; see :func:`sample_pixels` for the result. ``device`` "auto" = CUDA when present."""
    from workbench.data.transforms import normalize
    from workbench.engine.build import load_method

    if images.dtype != torch.uint8 or images.dim() != 4:
        raise TypeError(f"images must be uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    method, cfg, _ = load_method(run_dir, device=device)
    net = method.predictor()
    feats = []
    for chunk in images.split(batch_size):
        out = net(normalize(chunk.to(device), cfg.data.mean, cfg.data.std))
        if feature not in out:
            raise ValueError(f"feature {feature!r} not among the model outputs {sorted(out)}")
        feats.append(out[feature].float().cpu())
    f = torch.cat(feats)
    return sample_pixels(f, grid_labels(labels, tuple(f.shape[2:])), per_class, seed)


def tsne_2d(x: Tensor | np.ndarray, seed: int = 0, perplexity: float | None = None, iters: int | None = None,
            threads: int | None = None) -> np.ndarray:
    """t-SNE (scikit-learn, PCA init) of [M, C] features -> float [M, 2]: the package's one t-SNE (notebooks and
    dashboard). ``perplexity`` default min(30, (M-1)/3); ``iters`` the optimisation's iterations (None =
    scikit-learn's default); ``threads`` caps the BLAS/OpenMP threads (None = no cap; the dashboard uses 1 so a
    server stays responsive)."""
    import inspect

    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    a = x.numpy() if isinstance(x, Tensor) else np.asarray(x)
    if a.ndim != 2 or a.shape[0] < 5:
        raise ValueError(f"x must be [M, C] with M >= 5, got shape {a.shape}")
    p = perplexity if perplexity is not None else min(30.0, (a.shape[0] - 1) / 3)
    extra = {}
    if iters is not None:  # the keyword was renamed in scikit-learn 1.5
        extra["max_iter" if "max_iter" in inspect.signature(TSNE).parameters else "n_iter"] = iters
    tsne = TSNE(n_components=2, perplexity=p, init="pca", random_state=seed, **extra)
    with threadpool_limits(limits=threads):
        return tsne.fit_transform(a.astype(np.float32))


@dataclass
class FeatureSpace:
    """A run's sampled pixels: t-SNE coordinates [M, 2], classes [M], and the silhouette score of the classes in
    the original feature space (cosine; None with fewer than two classes)."""

    xy: np.ndarray
    labels: np.ndarray
    silhouette: float | None


def feature_space(run_dirs: Sequence[str | Path], images: Tensor, labels: Tensor, per_class: int = 150,
                  seed: int = 0, device: str = "cpu") -> dict[str, FeatureSpace]:
    """:class:`FeatureSpace` of each run (keyed by run directory name) on the same images and seed."""
    from sklearn.metrics import silhouette_score
    from tqdm.auto import tqdm

    out: dict[str, FeatureSpace] = {}
    for rd in tqdm(list(run_dirs), desc="runs"):
        x, y = run_pixel_features(rd, images, labels, per_class, seed, device)
        sil = float(silhouette_score(x.numpy(), y.numpy(), metric="cosine")) if len(y.unique()) > 1 else None
        out[Path(rd).name] = FeatureSpace(tsne_2d(x, seed), y.numpy(), sil)
    return out


def feature_space_table(spaces: dict[str, FeatureSpace], class_names: Sequence[str]) -> Table:
    """A :class:`workbench.runs.Table`: per run, the silhouette score and the number of sampled pixels per class."""
    from workbench.runs import Table

    rows = [[name, fs.silhouette, *np.bincount(fs.labels, minlength=len(class_names)).tolist()]
            for name, fs in spaces.items()]
    return Table(["run", "silhouette", *class_names], rows, "sampled pixels per class")


def feature_space_figure(spaces: dict[str, FeatureSpace], palette: Sequence[Sequence[int]],
                         class_names: Sequence[str], title: str | None = "t-SNE of decoder features",
                         size: float = 3.8) -> plt.Figure:
    """Side-by-side t-SNE scatters (one panel per run), points in their class's palette colour, a class legend
    below; panel titles carry the run name and silhouette score."""
    if not spaces:
        raise ValueError("spaces is empty")
    fig, axes = plt.subplots(1, len(spaces), figsize=(size * len(spaces), size + 0.7), squeeze=False,
                             layout="constrained")
    pal = np.asarray(palette, dtype=np.float64)[: len(class_names)] / 255
    for ax, (name, fs) in zip(axes[0], spaces.items()):
        ax.scatter(fs.xy[:, 0], fs.xy[:, 1], c=pal[fs.labels], s=7, linewidths=0.2, edgecolors="white")
        sil = "-" if fs.silhouette is None else f"{fs.silhouette:.2f}"
        ax.set_title(f"{name}\nsilhouette {sil}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.legend(handles=legend_handles(class_names, palette), loc="outside lower center",
               ncol=min(len(class_names), 6), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
