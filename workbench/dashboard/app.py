"""The Panel dashboard over a runs directory: curves, the capture gallery, per-class quality, method views, t-SNE.

Three ways to open it:

- ``workbench dashboard [RUNS_DIR] --port 5006`` (:func:`~workbench.dashboard.server.serve`, bound to 127.0.0.1
  unless ``--address`` says otherwise; it listens before this module is imported, see
  :mod:`workbench.dashboard.server`);
- ``panel serve workbench/dashboard/app.py --args RUNS_DIR`` (or ``WORKBENCH_RUNS_DIR``; default ``runs``);
- in a notebook: ``pn.extension(); build_app("runs")``.

It only reads run directories (see :mod:`workbench.dashboard.data` for the artifact keys it looks for) and polls
them every ``refresh_ms`` so a running training's new steps and metrics appear. Unreadable files show a message in
the page instead of breaking it.
"""
from __future__ import annotations

import asyncio
import html
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import panel as pn

from workbench.dashboard.data import (
    CACHE,
    ORDERS,
    ArtifactCache,
    ArtifactError,
    RunData,
    discover_runs,
    most_recent_run,
    quality_over_time,
    sample_stats,
    select_samples,
    tsne_embedding,
)
from workbench.dashboard.render import (
    GALLERY_CSS,
    curves_png,
    gallery_html,
    labeled_html,
    message_html,
    method_views_html,
    quality_png,
    tsne_png,
)
from workbench.dashboard.server import serve  # noqa: F401 (re-exported: the server lives in a light module)

#: metric keys drawn by default when a run logs them (any key containing "thresh" or "tau" is added too)
DEFAULT_CURVES = ("loss", "miou", "mask_ratio", "pl_acc", "pl_miou", "mining_ratio")
#: record fields that are not curves
NOT_CURVES = frozenset({"kind", "step", "epoch", "seconds", "num_images", "lr"})
TABS = ("Gallery", "Curves", "Per-class quality", "Method views", "t-SNE")
#: tabs drawn only while shown (a change to a hidden one marks it stale; it is drawn when next opened): tab -> method
LAZY_TABS = {"Curves": "render_curves", "Per-class quality": "render_quality", "Method views": "render_method_views"}


def _label(text: str) -> dict[str, str]:
    """Widget caption keyword: ``label`` (Panel >= 1.9; ``name`` is deprecated there) or ``name``."""
    return {"label" if "label" in pn.widgets.Select.param else "name": text}


def _msg(text: str, error: bool = True) -> pn.pane.HTML:
    """A message pane (error box or plain note)."""
    return pn.pane.HTML(message_html(text, error), stylesheets=[GALLERY_CSS], sizing_mode="stretch_width")


def curve_keys(records: list[dict[str, Any]]) -> list[str]:
    """Numeric metric keys present in ``records`` (per-class lists and bookkeeping fields excluded), the default
    curves first."""
    seen: dict[str, None] = {}
    for r in records:
        for k, v in r.items():
            if k not in NOT_CURVES and isinstance(v, (int, float)) and not isinstance(v, bool):
                seen[k] = None
    keys = list(seen)
    return sorted(keys, key=lambda k: (k not in DEFAULT_CURVES, DEFAULT_CURVES.index(k) if k in DEFAULT_CURVES
                                       else 0, not k.startswith("loss"), k))


def default_curves(keys: list[str]) -> list[str]:
    """The curves shown before the user picks: losses, mIoU, mask ratio, pseudo-label accuracy / mIoU, mining
    ratio and thresholds, when logged."""
    return [k for k in keys if k in DEFAULT_CURVES or k.startswith("loss") or "thresh" in k or "tau" in k]


class Dashboard:
    """The app's state and widgets over one runs directory (one instance per browser session).

    Args:
        runs_dir: folder holding run directories (searched 3 levels deep), or a run directory itself.
        refresh_ms: poll period for new runs / steps / metrics; None or 0 disables polling (call :meth:`refresh`).
        cache: capture-file cache (shared by all sessions by default).
        max_quality_points: captured steps read for the per-class quality curves (evenly spread).
    """

    def __init__(self, runs_dir: str | Path, refresh_ms: int | None = 2000, cache: ArtifactCache | None = None,
                 max_quality_points: int = 40) -> None:
        self.runs_dir = Path(runs_dir)
        if self.runs_dir.exists() and not self.runs_dir.is_dir():
            raise ValueError(f"runs_dir {self.runs_dir} is a file, expected a directory of runs")
        if refresh_ms is not None and refresh_ms < 0:
            raise ValueError(f"refresh_ms must be >= 0 or None, got {refresh_ms}")
        if max_quality_points < 2:
            raise ValueError(f"max_quality_points must be >= 2, got {max_quality_points}")
        self.cache = cache or CACHE
        self.max_quality_points = max_quality_points
        self.runs: dict[str, RunData] = {}
        self._quiet = False
        self._stale: set[str] = set(LAZY_TABS)  # lazy tabs to draw when next opened
        self.notes: list[str] = []

        w = pn.widgets
        self.run = w.Select(**_label("Run"), options=[], css_classes=["wb-run"], sizing_mode="stretch_width")
        self.compare = w.MultiChoice(**_label("Compare with (curves)"), options=[], sizing_mode="stretch_width")
        self.step = w.Select(**_label("Step"), options={}, css_classes=["wb-step"], sizing_mode="stretch_width")
        self.follow = w.Checkbox(**_label("follow the latest capture"), value=False)
        self.cls = w.Select(**_label("Class"), options={"all classes": -1}, css_classes=["wb-class"],
                            sizing_mode="stretch_width")
        self.order = w.Select(**_label("Sort"), options={v: k for k, v in ORDERS.items()}, value="batch",
                              css_classes=["wb-order"], sizing_mode="stretch_width")
        self.thumb = w.IntSlider(**_label("Thumbnail size"), start=64, end=256, step=32, value=128,
                                 sizing_mode="stretch_width")
        self.curves = w.MultiChoice(**_label("Curves"), options=[], sizing_mode="stretch_width")
        self.tsne_button = w.Button(**_label("Compute t-SNE of this step"))

        html_pane = lambda cls: pn.pane.HTML("", stylesheets=[GALLERY_CSS], css_classes=[cls],
                                             sizing_mode="stretch_width")
        self.status = html_pane("wb-status")
        self.messages = html_pane("wb-messages")
        self.gallery = html_pane("wb-gallery-pane")
        self.labeled = html_pane("wb-labeled-pane")
        self.method_views = html_pane("wb-method-pane")
        self.curves_pane = pn.Column(sizing_mode="stretch_width", css_classes=["wb-curves"])
        self.quality_pane = pn.Column(sizing_mode="stretch_width")
        self.tsne_pane = pn.Column(sizing_mode="stretch_width", css_classes=["wb-tsne-pane"])
        self.tabs = pn.Tabs(
            ("Gallery", pn.Column(self.gallery, self.labeled, sizing_mode="stretch_width")),
            ("Curves", self.curves_pane),
            ("Per-class quality", self.quality_pane),
            ("Method views", self.method_views),
            ("t-SNE", pn.Column(self.tsne_button, self.tsne_pane, sizing_mode="stretch_width")),
            dynamic=False, sizing_mode="stretch_width")
        sidebar = pn.Column("## workbench runs", self.run, self.step, self.follow, self.cls, self.order, self.thumb,
                            self.curves, self.compare, width=300)
        self.layout = pn.Row(sidebar, pn.Column(self.status, self.messages, self.tabs, sizing_mode="stretch_width"),
                             sizing_mode="stretch_width")

        self.run.param.watch(self._guarded(self.on_run), "value")
        self.step.param.watch(self._guarded(self.on_step), "value")
        for wid in (self.cls, self.order, self.thumb):
            wid.param.watch(self._guarded(self.render_gallery), "value")
        for wid in (self.curves, self.compare):
            wid.param.watch(self._guarded(lambda *_: self.update_view("Curves")), "value")
        self.follow.param.watch(self._guarded(lambda *_: self.refresh()), "value")
        self.tabs.param.watch(self._guarded(self.on_tab), "active")
        self.tsne_button.on_click(self._tsne_clicked)

        self.scan_runs()
        self.on_run()
        self._callback = None
        if refresh_ms:
            self._callback = pn.state.add_periodic_callback(self._guarded(self.refresh), period=int(refresh_ms))

    # ------------------------------------------------------------------------------------------------ plumbing
    def _guarded(self, fn: Callable[..., Any]) -> Callable[..., None]:
        """``fn`` with any exception turned into a message in the page (the app must never die on bad files)."""
        def call(*args: Any) -> None:
            if self._quiet:
                return
            try:
                fn(*args)
            except Exception as e:
                self.note(f"{getattr(fn, '__name__', 'update')}: {type(e).__name__}: {e}")
                traceback.print_exc(file=sys.stderr)
        return call

    def note(self, text: str) -> None:
        """Show a message above the tabs (the latest few are kept)."""
        self.notes = [n for n in self.notes if n != text][-4:] + [text]
        self.messages.object = "".join(message_html(n) for n in self.notes)

    def clear_notes(self) -> None:
        """Remove the messages."""
        self.notes = []
        self.messages.object = ""

    def current(self) -> RunData | None:
        """The selected run's data (None when there is no run)."""
        name = self.run.value
        return self._run_data(name) if name is not None else None

    def _run_data(self, name: str) -> RunData:
        if name not in self.runs:
            self.runs[name] = RunData(self.runs_dir / name, self.cache)
        return self.runs[name]

    def _update_status(self) -> None:
        rd = self.current()
        if rd is None:
            text = f"no run directories in {self.runs_dir} yet (looking every few seconds)"
        else:
            text = (f"{self.runs_dir} · {len(self.run.options)} run(s) · <b>{html.escape(str(self.run.value))}</b>: "
                    f"{len(rd.records('train'))} train records, {len(rd.records('eval'))} evaluations, "
                    f"{len(rd.steps())} captures · dataset: {html.escape(rd.meta().source)} · "
                    f"updated {time.strftime('%H:%M:%S')}")
        self.status.object = f'<div class="wb-note">{text}</div>'

    # ------------------------------------------------------------------------------------------------ events
    def scan_runs(self) -> bool:
        """Look for run directories; True when the list changed. The selected run stays selected while it exists;
        otherwise the most recently updated run is selected (:func:`most_recent_run`)."""
        names = discover_runs(self.runs_dir)
        if names == list(self.run.options):
            return False
        keep = self.run.value if self.run.value in names else most_recent_run(self.runs_dir, names)
        self._quiet = True
        try:
            self.run.options = names
            self.run.value = keep
            self.compare.options = names
            self.compare.value = [n for n in self.compare.value if n in names]
        finally:
            self._quiet = False
        return True

    def _step_options(self, rd: RunData) -> dict[str, int]:
        return {f"step {s} (epoch {e.get('epoch', '?')})": s for s, e in rd.captures().items()}

    def on_run(self, *_: Any) -> None:
        """A run was picked: steps, classes, curve keys, then every view."""
        rd = self.current()
        if rd is not None:
            rd.refresh()
        self._quiet = True
        try:
            if rd is None:
                self.step.options, self.step.value = {}, None
                self.cls.options = {"all classes": -1}
            else:
                opts = self._step_options(rd)
                self.step.options = opts
                self.step.value = list(opts.values())[-1] if opts else None
                meta = rd.meta()
                self.cls.options = {"all classes": -1, **{n: k for k, n in enumerate(meta.class_names)}}
                self.cls.value = -1
                keys = curve_keys(rd.records())
                self.curves.options = keys
                self.curves.value = default_curves(keys)
        finally:
            self._quiet = False
        self._reset_notes()
        self._update_status()
        self.render_gallery()
        self._reset_tsne()
        for tab in ("Curves", "Per-class quality"):  # the method views follow the gallery
            self.update_view(tab)

    def _reset_notes(self) -> None:
        self.clear_notes()
        for w in self.current().warnings() if self.current() else []:
            self.note(w)

    def on_step(self, *_: Any) -> None:
        """A step was picked."""
        self._reset_notes()
        self.render_gallery()
        self._reset_tsne()

    def _reset_tsne(self) -> None:
        self.tsne_pane.objects = [_msg("press the button to compute the t-SNE of this step's features",
                                       error=False)]

    def shown(self, tab: str) -> bool:
        """Whether ``tab`` (a name of :data:`TABS`) is the open tab."""
        return self.tabs.active == TABS.index(tab)

    def update_view(self, tab: str) -> None:
        """Draw the view of lazy tab ``tab`` now when it is open, else when it is next opened (the first page draws
        only the gallery; curves, per-class quality and method views cost nothing until looked at)."""
        if self.shown(tab):
            self._stale.discard(tab)
            getattr(self, LAZY_TABS[tab])()
        else:
            self._stale.add(tab)

    def on_tab(self, *_: Any) -> None:
        """A tab was opened: draw its view when something changed since it was last drawn."""
        tab = TABS[self.tabs.active]
        if tab in self._stale:
            self.update_view(tab)

    def refresh(self) -> None:
        """Periodic poll: new runs, new metrics and captures of the selected and compared runs."""
        before = self.run.value
        self.scan_runs()
        if self.run.value != before:
            self.on_run()
            return
        rd = self.current()
        if rd is None:
            self._update_status()
            return
        metrics_changed, captures_changed = rd.refresh()
        for name in self.compare.value:
            if name != self.run.value:
                metrics_changed |= self._run_data(name).refresh()[0]
        if captures_changed:
            opts = self._step_options(rd)
            latest = list(opts.values())[-1] if opts else None
            self._quiet = True
            try:
                keep = self.step.value if self.step.value in opts.values() else latest
                self.step.options = opts
                self.step.value = latest if self.follow.value else keep
            finally:
                self._quiet = False
            self.render_gallery()
            self.update_view("Per-class quality")
        elif self.follow.value and self.step.options and self.step.value != list(self.step.options.values())[-1]:
            self.step.value = list(self.step.options.values())[-1]
        if metrics_changed:
            keys = curve_keys(rd.records())
            if keys != list(self.curves.options):
                self._quiet = True
                try:
                    added = [k for k in default_curves(keys) if k not in self.curves.options]
                    self.curves.options = keys
                    self.curves.value = [k for k in self.curves.value if k in keys] + added
                finally:
                    self._quiet = False
            self.update_view("Curves")
        for w in rd.warnings():
            if w not in self.notes:
                self.note(w)
        self._update_status()

    # ------------------------------------------------------------------------------------------------ views
    def _selected_step(self) -> tuple[dict[str, Any] | None, str]:
        """(tensors of the selected step, "") or (None, the message to show instead)."""
        rd, step = self.current(), self.step.value
        if rd is None:
            return None, message_html(f"no run directories found in {self.runs_dir}", error=False)
        if step is None:
            return None, message_html("this run has no captures yet (runs write artifacts/step_<N>.pt when "
                                      "train.capture_every > 0)", error=False)
        try:
            return rd.load_step(step), ""
        except (ArtifactError, KeyError) as e:
            return None, message_html(f"step {step}: {e.args[0] if e.args else e}")

    def _order(self, stats: list[Any]) -> tuple[int | None, list[int]]:
        """(class filter or None, indices of the samples shown, in the chosen order)."""
        cls = None if self.cls.value in (None, -1) else int(self.cls.value)
        return cls, select_samples(stats, cls, self.order.value)

    def render_gallery(self, *_: Any) -> None:
        """The selected step's samples (filtered by class, sorted) and the labeled batch; the method views follow
        (drawn when their tab is open)."""
        self.update_view("Method views")
        self.labeled.object = ""
        arts, text = self._selected_step()
        if arts is None:
            self.gallery.object = text
            return
        rd, step = self.current(), self.step.value
        stats = sample_stats(arts)
        cls, order = self._order(stats)
        meta = rd.meta()
        filt = "" if cls is None else f" containing {meta.class_names[cls] if cls < meta.num_classes else cls}"
        title = f"{self.run.value} · step {step} · {len(order)} of {len(stats)} samples{filt}"
        if self.order.value != "batch":
            title += f" · sorted by {ORDERS[self.order.value]}"
        self.gallery.object = gallery_html(arts, stats, order, meta, title, self.thumb.value)
        self.labeled.object = labeled_html(arts, meta, max(64, self.thumb.value * 3 // 4))

    def render_method_views(self, *_: Any) -> None:
        """CorrMatch / RankMatch / other stacks of maps of the selected step (the gallery's samples and order)."""
        arts, text = self._selected_step()
        if arts is None:
            self.method_views.object = "" if self.step.value is None else text
            return
        _, order = self._order(sample_stats(arts))
        self.method_views.object = method_views_html(arts, order, self.current().meta(), self.thumb.value)

    def render_curves(self, *_: Any) -> None:
        """Curves of the selected keys for the selected run and the compared runs (4 panels per row)."""
        rd = self.current()
        keys = list(self.curves.value)
        if rd is None or not keys:
            self.curves_pane.objects = [_msg("no metrics to draw yet", error=False)]
            return
        names = [self.run.value] + [n for n in self.compare.value if n != self.run.value]
        records = {n: self._run_data(n).records() for n in names}
        rows = [curves_png(records, keys[i:i + 4]) for i in range(0, len(keys), 4)]
        self.curves_pane.objects = [pn.pane.PNG(png) for png in rows if png]

    def render_quality(self, *_: Any) -> None:
        """Per-class pseudo-label IoU / precision over up to ``max_quality_points`` captures, and the eval IoU."""
        rd = self.current()
        if rd is None:
            return
        steps, values, notes = quality_over_time(rd, self.max_quality_points)
        png = quality_png(steps, values, rd.meta(), rd.records("eval"))
        objs: list[Any] = []
        if png is None:
            objs.append(_msg("no capture with both a pseudo-label and the unlabeled ground truth (keys pseudo, y_u) "
                             "and no evaluation yet", error=False))
        else:
            objs.append(pn.pane.PNG(png))
        n = len(rd.steps())
        objs.append(_msg(f"{len(steps)} of {n} captured steps read (at most {self.max_quality_points}, evenly "
                         "spread)", error=False))
        objs += [_msg(t) for t in notes[:5]]
        self.quality_pane.objects = objs

    def tsne_result(self) -> tuple[bytes | None, str]:
        """(PNG of the t-SNE of the selected step's ``features``, or None; a message). Memoised per capture file."""
        rd, step = self.current(), self.step.value
        if rd is None or step is None:
            return None, "no capture selected"
        try:
            xy, lab = self.cache.derived(rd.step_path(step), "tsne", tsne_embedding)
        except (ArtifactError, KeyError, ValueError) as e:
            return None, f"step {step}: {e.args[0] if e.args else e}"
        title = f"{self.run.value} · step {step} · t-SNE of {len(lab)} pixel features"
        return tsne_png(xy, lab, rd.meta(), title), title

    def _show_tsne(self, png: bytes | None, text: str) -> None:
        self.tsne_pane.objects = ([pn.pane.PNG(png, width=560, css_classes=["wb-tsne"])] if png is not None
                                  else [_msg(text)])

    def render_tsne(self, *_: Any) -> None:
        """Compute and show the t-SNE (blocking; the button runs it in a worker thread)."""
        self._show_tsne(*self.tsne_result())

    async def _tsne_clicked(self, *_: Any) -> None:
        self.tsne_pane.objects = [_msg("computing the t-SNE...", error=False)]
        try:
            png, text = await asyncio.to_thread(self.tsne_result)
        except Exception as e:
            png, text = None, f"t-SNE: {type(e).__name__}: {e}"
        self._show_tsne(png, text)


def build_app(runs_dir: str | Path = "runs", refresh_ms: int | None = 2000) -> pn.viewable.Viewable:
    """The dashboard as a Panel layout (servable, or shown in a notebook after ``pn.extension()``).

    Args:
        runs_dir: folder of run directories (or one run directory).
        refresh_ms: poll period in milliseconds; None/0 to disable.
    """
    return Dashboard(runs_dir, refresh_ms).layout


if __name__.startswith("bokeh"):  # `panel serve workbench/dashboard/app.py --args RUNS_DIR`
    build_app(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("WORKBENCH_RUNS_DIR", "runs")).servable(
        title="workbench dashboard")
