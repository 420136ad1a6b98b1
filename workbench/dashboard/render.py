"""Pictures of captured tensors for the dashboard: RGB maps, thumbnails, the gallery's HTML and the figures.

Plain numpy/matplotlib/PIL (no Panel), in the look of :mod:`workbench.viz.figures` so the dashboard, notebooks and
reports look alike: the dataset's palette, ignored pixels white (``colorize`` and ``to_hwc`` of
:mod:`workbench.viz.arrays`, which imports neither matplotlib's pyplot nor torchvision: the first page must not wait
for them; the views opened later (curves, CorrMatch shape ids) import :mod:`workbench.viz.figures`).
"""
from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg", force=False)  # pyplot itself is imported by the figures (lazy tabs), not by the first page
import numpy as np
import torch
from PIL import Image
from torch import Tensor

from workbench.dashboard.data import IGNORE, KNOWN_KEYS, DatasetMeta, SampleStats, batch_size, per_sample_keys
from workbench.viz.arrays import IGNORE_COLOR, RGB, colorize, to_hwc  # noqa: F401  (used by the views)

BOX_COLOR = (255, 215, 0)
ERROR_COLOR = (220, 20, 60)
LOW_CONF_COLOR = (128, 128, 128)
POINT_COLOR = (255, 0, 0)


# ---------------------------------------------------------------------------------------------------- maps
def heat(values: Tensor | np.ndarray, vmin: float = 0.0, vmax: float = 1.0, cmap: str = "viridis") -> RGB:
    """Float map [H, W] -> RGB uint8 [H, W, 3] through ``cmap`` (values clipped to [vmin, vmax])."""
    v = np.asarray(values.float() if isinstance(values, Tensor) else values, dtype=np.float32)
    if v.ndim != 2:
        raise ValueError(f"values must be [H, W], got shape {v.shape}")
    span = vmax - vmin if vmax > vmin else 1.0
    rgba = matplotlib.colormaps[cmap](np.clip((v - vmin) / span, 0.0, 1.0))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def minmax_heat(values: Tensor | np.ndarray) -> RGB:
    """Heat map of a float map min-max scaled to its own range (a constant map is drawn at the low end)."""
    v = np.asarray(values.float() if isinstance(values, Tensor) else values, dtype=np.float32)
    lo, hi = float(v.min()), float(v.max())
    return heat(v, lo, hi if hi > lo else lo + 1.0)


def mask_rgb(mask: Tensor | np.ndarray) -> RGB:
    """bool (or 0/1) map [H, W] -> white where true, black elsewhere."""
    m = np.asarray(mask).astype(bool)
    return np.repeat((m * 255).astype(np.uint8)[..., None], 3, axis=2)


def ignored_map(pseudo: Tensor, confident: Tensor | None, ignore: Tensor | None, palette: Sequence) -> RGB:
    """The target the loss uses: pseudo-label colours on confident pixels, grey below the threshold, white on
    padding (``ignore`` != 0)."""
    out = colorize(pseudo, palette)
    if confident is not None:
        out[~np.asarray(confident).astype(bool)] = LOW_CONF_COLOR
    if ignore is not None:
        out[np.asarray(ignore) != 0] = (255, 255, 255)
    return out


def error_map(pseudo: Tensor, gt: Tensor, ignore: Tensor | None = None) -> RGB:
    """Pseudo-label errors: red where pseudo != gt, black where equal, white where gt is 255 or padding."""
    p, g = np.asarray(pseudo), np.asarray(gt)
    out = np.zeros((*g.shape, 3), dtype=np.uint8)
    out[p != g] = ERROR_COLOR
    skip = g == IGNORE
    if ignore is not None:
        skip |= np.asarray(ignore) != 0
    out[skip] = (255, 255, 255)
    return out


def outline(mask: Tensor | np.ndarray) -> np.ndarray:
    """bool [H, W]: pixels of ``mask`` with a 4-neighbour outside it (or on the image border)."""
    m = np.asarray(mask).astype(bool)
    p = np.pad(m, 1, constant_values=False)
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~inner


def boxed(image: Tensor, box: Tensor | None) -> RGB:
    """Image [3,H,W] (or [H,W,3]) with the outline of the bool CutMix ``box`` [H, W] drawn in yellow."""
    out = to_hwc(image).copy()
    if box is not None:
        out[outline(box)] = BOX_COLOR
    return out


def mark_points(rgb: RGB, flat: Sequence[int], grid: tuple[int, int]) -> RGB:
    """Outline in red the cells ``y * w + x`` of a ``grid`` = (h, w) laid over ``rgb``. A small image is first
    enlarged (nearest, to at most 256 px) so that a cell spans at least 8 pixels; cells still under 3 pixels get a
    5x5 square at their centre instead."""
    hh, ww = rgb.shape[:2]
    h, w = grid
    f = min(max(1, math.ceil(8 * h / hh), math.ceil(8 * w / ww)), max(1, 256 // max(hh, ww)))
    out = np.repeat(np.repeat(rgb, f, axis=0), f, axis=1)
    hh, ww = hh * f, ww * f
    for idx in flat:
        y, x = divmod(int(idx), w)
        if not (0 <= y < h):
            continue
        y0, y1, x0, x1 = y * hh // h, (y + 1) * hh // h - 1, x * ww // w, (x + 1) * ww // w - 1
        if min(y1 - y0, x1 - x0) >= 2:
            out[[y0, y1], x0: x1 + 1] = POINT_COLOR
            out[y0: y1 + 1, [x0, x1]] = POINT_COLOR
        else:
            cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
            out[max(cy - 2, 0): cy + 3, max(cx - 2, 0): cx + 3] = POINT_COLOR
    return out


def is_map(t: Tensor, batch: int) -> bool:
    """Whether ``t`` is a per-sample map: first axis ``batch``, then [H, W] or [C, H, W] with H, W >= 4."""
    return t.dim() in (3, 4) and t.shape[0] == batch and min(t.shape[-2:]) >= 4


def auto_map(t: Tensor, palette: Sequence) -> RGB:
    """A map [H, W] drawn by dtype: bool as a mask, integers in [0, 255] as labels (``palette``), floats in [0, 1]
    on a fixed scale, other numbers min-max scaled."""
    if t.dtype == torch.bool:
        return mask_rgb(t)
    if not t.is_floating_point() and t.numel() and 0 <= int(t.min()) and int(t.max()) <= 255:
        return colorize(t, palette)
    v = t.float()
    if t.is_floating_point() and v.numel() and 0.0 <= float(v.min()) and float(v.max()) <= 1.0:
        return heat(v)
    return minmax_heat(v)


# ---------------------------------------------------------------------------------------------------- html
def png_uri(rgb: RGB, max_side: int = 160, smooth: bool = False) -> str:
    """``data:image/png;base64,...`` of ``rgb``, shrunk so its longer side is at most ``max_side``
    (bilinear when ``smooth``, else nearest, so label maps keep crisp class colours)."""
    im = Image.fromarray(np.ascontiguousarray(rgb))
    scale = max_side / max(im.size)
    if scale < 1:
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                       Image.BILINEAR if smooth else Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def figure_html(rgb: RGB, caption: str, max_side: int, smooth: bool = False) -> str:
    """One ``<figure>`` (thumbnail + caption). Shown at half ``max_side`` (sharp on high-density screens): maps
    are enlarged pixel by pixel; natural images larger than that are shrunk smoothly."""
    cap = html.escape(caption)
    cls = ' class="smooth"' if smooth and max(rgb.shape[:2]) > max_side // 2 else ""
    return (f'<figure><img{cls} src="{png_uri(rgb, max_side, smooth)}" alt="{cap}" title="{cap}">'
            f"<figcaption>{cap}</figcaption></figure>")


@dataclass(frozen=True)
class View:
    """A gallery column: shown when every key in ``keys`` exists; ``draw(arts, i, meta)`` -> RGB."""

    title: str
    keys: tuple[str, ...]
    draw: Callable[[dict[str, Tensor], int, DatasetMeta], RGB]
    smooth: bool = False  # natural image: bilinear thumbnail


def _image(key: str) -> Callable:
    return lambda a, i, m: to_hwc(a[key][i])


def _labels(key: str) -> Callable:
    return lambda a, i, m: colorize(a[key][i], m.palette)


def _opt(a: dict[str, Tensor], key: str, i: int) -> Tensor | None:
    return a[key][i] if key in a else None


def _auto(key: str, channel: int | None = None) -> Callable:
    def draw(a: dict[str, Tensor], i: int, m: DatasetMeta) -> RGB:
        t = a[key][i]
        return auto_map(t[channel] if channel is not None else t.reshape(t.shape[-2:]), m.palette)
    return draw


GALLERY_VIEWS: tuple[View, ...] = (
    View("image", ("x_w",), _image("x_w"), smooth=True),
    View("ground truth", ("y_u",), _labels("y_u")),
    View("pseudo-label", ("pseudo",), _labels("pseudo")),
    View("confidence", ("conf",), lambda a, i, m: heat(a["conf"][i])),
    View("ignored (grey: below threshold, white: padding)", ("pseudo",),
         lambda a, i, m: ignored_map(a["pseudo"][i], _opt(a, "confident", i), _opt(a, "ignore", i), m.palette)),
    View("pseudo-label error", ("pseudo", "y_u"),
         lambda a, i, m: error_map(a["pseudo"][i], a["y_u"][i], _opt(a, "ignore", i))),
    View("strong view 1", ("x_s1",), lambda a, i, m: boxed(a["x_s1"][i], _opt(a, "box1", i)), smooth=True),
    View("prediction (strong 1)", ("pred_s1",), _labels("pred_s1")),
    View("strong view 2", ("x_s2",), lambda a, i, m: boxed(a["x_s2"][i], _opt(a, "box2", i)), smooth=True),
    View("prediction (feature perturbation)", ("pred_fp",), _labels("pred_fp")),
    View("masked input", ("x_masked",), _image("x_masked"), smooth=True),
    View("patch mask", ("patch_mask",), _auto("patch_mask")),
    View("prediction (masked)", ("pred_masked",), _labels("pred_masked")),
    View("reconstruction", ("x_recon",), _image("x_recon"), smooth=True),
)


def gallery_views(arts: dict[str, Tensor]) -> list[View]:
    """The gallery's columns for a capture: the known views whose keys exist, the ScaleMatch gate map(s) (up to 4),
    then any other image ``x_*`` [B,3,H,W] and per-sample map [B,H,W] (see :func:`is_map`), in key order."""
    per = per_sample_keys(arts)
    b = batch_size(arts)
    views = [v for v in GALLERY_VIEWS if all(k in per for k in v.keys)]
    gate = per.get("gate")
    if gate is not None and is_map(gate, b):
        n = 1 if gate.dim() == 3 or gate.shape[1] == 1 else min(gate.shape[1], 4)
        views += [View("gate" if n == 1 else f"gate {k}", ("gate",), _auto("gate", None if n == 1 else k))
                  for k in range(n)]
    for k in sorted(per):
        t = per[k]
        if k in KNOWN_KEYS:
            continue
        if k.startswith("x_") and t.dim() == 4 and t.shape[1] == 3 and t.dtype == torch.uint8:
            views.append(View(k, (k,), _image(k), smooth=True))
        elif t.dim() == 3 and is_map(t, b):
            views.append(View(k, (k,), _auto(k)))
    return views


def extra_maps(arts: dict[str, Tensor]) -> list[str]:
    """Keys of unknown stacks of per-sample maps [B,C,h,w] (e.g. per-scale predictions, rank distributions),
    drawn in the method views."""
    per, b = per_sample_keys(arts), batch_size(arts)
    return [k for k in sorted(per) if k not in KNOWN_KEYS and per[k].dim() == 4 and is_map(per[k], b)
            and not (k.startswith("x_") and per[k].shape[1] == 3)]


def undrawn(arts: dict[str, Tensor]) -> list[str]:
    """What no view draws, as text: "name = value" for tensors of up to 8 numbers (a threshold, the scales),
    "name [shape]" otherwise."""
    drawn = KNOWN_KEYS | {v.keys[0] for v in gallery_views(arts)} | set(extra_maps(arts))
    out = []
    for k in sorted(set(arts) - drawn):
        t = arts[k]
        if t.numel() <= 8 and not t.is_complex():
            vals = [round(x, 4) if isinstance(x, float) else x for x in t.flatten().tolist()]
            out.append(f"{k} = {vals[0] if t.dim() == 0 else vals}")
        else:
            out.append(f"{k} {list(t.shape)}")
    return out


GALLERY_CSS = """
.wb-gallery { display: flex; flex-direction: column; gap: 10px; }
.wb-sample, .wb-labeled { border: 1px solid #ddd; border-radius: 6px; padding: 6px 8px; background: #fafafa; }
.wb-head { font: 13px sans-serif; margin-bottom: 4px; color: #333; }
.wb-row { display: flex; flex-wrap: wrap; gap: 6px; }
.wb-row figure { margin: 0; text-align: center; }
.wb-row img { width: var(--wb-thumb, 128px); height: auto; image-rendering: pixelated; border: 1px solid #ccc; }
.wb-row img.smooth { image-rendering: auto; }
.wb-row figcaption { font: 11px sans-serif; color: #555; max-width: var(--wb-thumb, 128px); }
.wb-error { border: 1px solid #e0a0a0; background: #fdecea; color: #8a1c1c; padding: 8px 10px; border-radius: 6px;
            font: 13px sans-serif; }
.wb-note { color: #555; font: 13px sans-serif; padding: 4px 0; }
.wb-legend span { display: inline-block; margin-right: 10px; font: 12px sans-serif; }
.wb-legend i { display: inline-block; width: 11px; height: 11px; margin-right: 3px; border: 1px solid #888;
               vertical-align: -1px; }
"""


def message_html(text: str, error: bool = True) -> str:
    """A boxed message (error style) or a plain note, escaped."""
    return f'<div class="{"wb-error" if error else "wb-note"}">{html.escape(text)}</div>'


def legend_html(meta: DatasetMeta) -> str:
    """The class colours as an inline legend."""
    items = "".join(f'<span><i style="background: rgb{tuple(meta.palette[k][:3])}"></i>{html.escape(n)}</span>'
                    for k, n in enumerate(meta.class_names))
    return f'<div class="wb-legend">{items}</div>'


def _fmt(x: float | None, pct: bool = True) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def sample_html(arts: dict[str, Tensor], stat: SampleStats, views: list[View], meta: DatasetMeta,
                thumb: int = 128) -> str:
    """One gallery card: header (sample, pseudo-label error, mean confidence, classes) and one figure per view."""
    names = ", ".join(meta.class_names[c] if c < meta.num_classes else str(c) for c in sorted(stat.classes))
    head = (f"sample {stat.index} · pseudo-label error {_fmt(stat.error)} · mean confidence "
            f"{_fmt(stat.mean_conf, pct=False)} · classes: {names or 'none'}")
    figs = []
    for v in views:
        try:
            figs.append(figure_html(v.draw(arts, stat.index, meta), v.title, 2 * thumb, v.smooth))
        except Exception as e:
            figs.append(message_html(f"{v.title}: {type(e).__name__}: {e}"))
    return (f'<div class="wb-sample" data-index="{stat.index}"><div class="wb-head">{html.escape(head)}</div>'
            f'<div class="wb-row">{"".join(figs)}</div></div>')


def gallery_html(arts: dict[str, Tensor], stats: list[SampleStats], order: list[int], meta: DatasetMeta,
                 title: str, thumb: int = 128) -> str:
    """The gallery: a title line, the class legend and one card per sample index in ``order``."""
    views = gallery_views(arts)
    by_index = {s.index: s for s in stats}
    cards = "".join(sample_html(arts, by_index[i], views, meta, thumb) for i in order)
    if not order:
        cards = message_html("no sample matches the filter", error=False)
    rest = undrawn(arts)
    if rest:
        cards += message_html("also captured: " + " · ".join(rest), error=False)
    return (f'<div class="wb-gallery" style="--wb-thumb: {thumb}px"><div class="wb-head"><b>{html.escape(title)}'
            f"</b></div>{legend_html(meta)}{cards}</div>")


def labeled_html(arts: dict[str, Tensor], meta: DatasetMeta, thumb: int = 96) -> str:
    """The labeled batch (``x_l`` with ``y_l``) as one strip; empty string without ``x_l``."""
    if "x_l" not in arts:
        return ""
    figs = []
    for i in range(arts["x_l"].shape[0]):
        figs.append(figure_html(to_hwc(arts["x_l"][i]), f"labeled {i}", 2 * thumb, smooth=True))
        if "y_l" in arts and i < arts["y_l"].shape[0]:
            figs.append(figure_html(colorize(arts["y_l"][i], meta.palette), f"label {i}", 2 * thumb))
    return (f'<div class="wb-labeled" style="--wb-thumb: {thumb}px"><div class="wb-head">labeled batch</div>'
            f'<div class="wb-row">{"".join(figs)}</div></div>')


def method_views_html(arts: dict[str, Tensor], order: list[int], meta: DatasetMeta, thumb: int = 112,
                      max_maps: int = 4) -> str:
    """CorrMatch rows and shapes, RankMatch agents and their maps, and other stacks of maps (:func:`extra_maps`):
    one card per sample, up to ``max_maps`` maps each; a note naming the keys looked for when there is none."""
    per = per_sample_keys(arts)
    sections: list[tuple[str, Callable[[int], list[tuple[RGB, str]]]]] = []
    base = (lambda i: to_hwc(per["x_w"][i])) if "x_w" in per else None

    def corr(i: int) -> list[tuple[RGB, str]]:
        rows = per["corr_rows"][i]
        pts = per["corr_points"][i].tolist() if "corr_points" in per else []
        out = []
        for m in range(min(rows.shape[0], max_maps)):
            rgb = minmax_heat(rows[m])
            if m < len(pts):
                rgb = mark_points(rgb, [pts[m]], tuple(rows.shape[-2:]))
            out.append((rgb, f"CorrMatch row {m}"))
        return out

    def shapes(i: int) -> list[tuple[RGB, str]]:
        s = per["shapes"][i]
        if s.dim() == 2:
            from workbench.viz.figures import voc_palette

            return [(colorize(s, voc_palette(256)), "CorrMatch shape ids")]
        out = []
        for m in range(min(s.shape[0], max_maps)):
            rgb = base(i).copy() if base is not None and tuple(base(i).shape[:2]) == tuple(s.shape[-2:]) else None
            if rgb is None:
                rgb = mask_rgb(s[m])
            else:
                rgb[~s[m].bool().numpy()] //= 3  # dim the pixels outside the shape
            out.append((rgb, f"CorrMatch shape {m}"))
        return out

    def agents(i: int) -> list[tuple[RGB, str]]:
        maps = per["agent_maps"][i] if "agent_maps" in per else None
        idx = per["agents"][i].tolist() if "agents" in per else []
        out = []
        if maps is not None:
            for n in range(min(maps.shape[0], max_maps)):
                rgb = minmax_heat(maps[n])
                if n < len(idx):
                    rgb = mark_points(rgb, [idx[n]], tuple(maps.shape[-2:]))
                out.append((rgb, f"RankMatch agent {n}"))
        elif base is not None and idx:
            grid = tuple(per["x_w"].shape[-2:])
            out.append((mark_points(base(i), idx, grid), f"RankMatch: {len(idx)} agents"))
        return out

    if "corr_rows" in per and per["corr_rows"].dim() == 4:
        sections.append(("CorrMatch correlation rows", corr))
    if "shapes" in per and per["shapes"].dim() in (3, 4):
        sections.append(("CorrMatch shapes", shapes))
    if ("agent_maps" in per and per["agent_maps"].dim() == 4) or ("agents" in per and "x_w" in per):
        sections.append(("RankMatch agents", agents))
    for key in extra_maps(arts):
        sections.append((key, lambda i, key=key: [(auto_map(per[key][i][c], meta.palette), f"{key} {c}")
                                                   for c in range(min(per[key].shape[1], max_maps))]))
    if not sections:
        return message_html("this capture has no method-specific maps (looked for: corr_rows, corr_points, shapes, "
                            "agents, agent_maps, other [B,C,h,w] stacks; masked inputs and gate maps appear in the "
                            "gallery)", error=False)
    cards = []
    for i in order:
        figs = []
        if base is not None:
            figs.append(figure_html(base(i), "image", 2 * thumb, smooth=True))
        for title, fn in sections:
            try:
                figs += [figure_html(rgb, cap, 2 * thumb) for rgb, cap in fn(i)]
            except Exception as e:
                figs.append(message_html(f"{title}: {type(e).__name__}: {e}"))
        cards.append(f'<div class="wb-sample-method" data-index="{i}"><div class="wb-head">sample {i}</div>'
                     f'<div class="wb-row">{"".join(figs)}</div></div>')
    return f'<div class="wb-gallery" style="--wb-thumb: {thumb}px">{"".join(cards)}</div>'


# ---------------------------------------------------------------------------------------------------- figures
def fig_png(fig: matplotlib.figure.Figure, dpi: int = 90) -> bytes:
    """PNG bytes of a matplotlib figure, which is closed afterwards."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return buf.getvalue()


def curves_png(records: dict[str, list[dict]], keys: Sequence[str]) -> bytes | None:
    """Training curves (one panel per key, one line per run) as PNG; None when no key is given."""
    if not keys:
        return None
    from workbench.viz.figures import training_curves

    return fig_png(training_curves(records, list(keys)))


def quality_png(steps: list[int], values: list[dict[str, list[float]]], meta: DatasetMeta,
                eval_records: list[dict] | None = None) -> bytes | None:
    """Per-class pseudo-label IoU and confident-pixel precision over the captured steps (one line per class), plus
    the per-class validation IoU of the eval records when present. None without data."""
    panels = [("pseudo-label IoU per class", steps, [v["iou"] for v in values]),
              ("precision of confident pseudo-labels", steps, [v["precision"] for v in values])]
    ev = [r for r in (eval_records or []) if isinstance(r.get("iou"), list)]
    if ev:
        panels.append(("validation IoU per class", [r["step"] for r in ev],
                       [[math.nan if x is None else x for x in r["iou"]] for r in ev]))
    panels = [p for p in panels if p[1]]
    if not panels:
        return None
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.0), squeeze=False)
    for ax, (title, xs, rows) in zip(axes[0], panels):
        arr = np.asarray(rows, dtype=np.float64)
        for c in range(min(arr.shape[1], meta.num_classes)):
            ax.plot(xs, arr[:, c], marker="." if len(xs) < 30 else None, label=meta.class_names[c],
                    color=np.asarray(meta.palette[c][:3]) / 255)
        if not np.isfinite(arr).any():
            ax.text(0.5, 0.5, "no pixels yet", ha="center", va="center", transform=ax.transAxes, color="0.4")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig_png(fig)


def tsne_png(xy: Tensor, labels: Tensor, meta: DatasetMeta, title: str) -> bytes:
    """Scatter of 2-D points coloured by class (label -1: grey, "unlabelled")."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    pts, lab = xy.numpy(), labels.numpy()
    for c in sorted(set(lab.tolist())):
        sel = lab == c
        if 0 <= c < meta.num_classes:
            color, name = np.asarray(meta.palette[c][:3]) / 255, meta.class_names[c]
        else:
            color, name = (0.6, 0.6, 0.6), "unlabelled" if c < 0 else f"class {c}"
        ax.scatter(pts[sel, 0], pts[sel, 1], s=8, color=color, label=name, edgecolors="none")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig_png(fig)


__all__ = ["heat", "minmax_heat", "mask_rgb", "ignored_map", "error_map", "outline", "boxed", "mark_points", "is_map",
           "auto_map", "png_uri", "View", "GALLERY_VIEWS", "gallery_views", "extra_maps", "undrawn", "gallery_html",
           "labeled_html", "method_views_html", "message_html", "legend_html", "fig_png", "curves_png", "quality_png",
           "tsne_png", "GALLERY_CSS"]
