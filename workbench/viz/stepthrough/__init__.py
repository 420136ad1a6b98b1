"""Step through one training step of MaskMatch, S4MIM, ScaleMatch, CorrMatch or RankMatch and show every
intermediate.

The notebooks ``10_maskmatch`` to ``14_rankmatch`` are thin layers over this package:

1. :func:`~workbench.viz.stepthrough.session.open_session` loads a method — a run directory's checkpoint, or a
   freshly initialised model with the method's default config — and the training data exactly as the trainer reads
   it (the same :class:`~workbench.data.dataset.StepDataset`, then :meth:`~workbench.methods.SemiBatch.from_loader`).
2. Each method's trace (``maskmatch_trace``, ``s4mim_trace``, ``scalematch_trace``, ``corrmatch_trace``,
   ``rankmatch_trace``, one module each) runs the method's own stages (its ``stages``, the very call its
   ``training_step`` makes) from the same weights and the same global random state, and keeps every intermediate as
   CPU tensors, adding only what is drawn for display: what the notebook shows is what training computes, because
   it is the same call.
3. Figures (matplotlib, the dataset manifest's palette; padding white in every label map) and tables
   (:class:`workbench.runs.Table`) of a trace, in the method's module.
4. :func:`~workbench.viz.stepthrough.widgets.explore` shows figures as static PNG outputs (papermill) or behind
   ipywidgets controls that redraw them.

Nothing here trains: traces run without gradients, and the weights and buffers (BatchNorm statistics, CorrMatch's
dynamic threshold, S4MIM's prototype dictionary) are restored after every trace, so tracing twice gives the same
result. Traces run in float32 (training autocasts to bf16 on CUDA), and the global random state of the caller is
left untouched.

Positions: a feature map of ``h x w`` cells is resized to the ``H x W`` image with ``align_corners=True`` throughout
the package, so cell ``(i, j)`` sits on pixel ``(i (H-1)/(h-1), j (W-1)/(w-1))`` and pixel ``(y, x)`` reads the cell
``(round(y (h-1)/(H-1)), round(x (w-1)/(W-1)))`` (:mod:`~workbench.viz.stepthrough.geometry`).

Modules (shared first; a method's module imports only the shared ones):

- :mod:`~workbench.viz.stepthrough.session`: :class:`StepSession`, :func:`open_session`, :func:`session_table`, the
  :class:`Trace` every trace extends, its loss terms (:func:`stage_terms`, :func:`losses_table`) and the plumbing
  traces share.
- :mod:`~workbench.viz.stepthrough.geometry`: positions on feature grids.
- :mod:`~workbench.viz.stepthrough.drawing`: the matplotlib helpers of the figures.
- :mod:`~workbench.viz.stepthrough.widgets`: :class:`Control`, :func:`explore`, :func:`explore_widget`.
- :mod:`~workbench.viz.stepthrough.maskmatch`, :mod:`~workbench.viz.stepthrough.s4mim`,
  :mod:`~workbench.viz.stepthrough.scalematch`, :mod:`~workbench.viz.stepthrough.corrmatch`,
  :mod:`~workbench.viz.stepthrough.rankmatch`: each method's trace dataclass, its ``*_trace`` function and its
  analyses, tables and figures.

Every public name of these modules is importable from the package as well (``__all__`` lists them); the notebooks
import the shared names from the package and a method's own names from its module.
"""
from __future__ import annotations

from workbench.viz.stepthrough.corrmatch import (
    CORRMATCH_TERMS,
    CorrMatchTrace,
    corr_predictions_figure,
    correlation_row,
    correlation_rows_figure,
    corrmatch_trace,
    point_shape,
    propagation_figure,
    repropagate,
    sampled_shapes_figure,
    threshold_table,
)
from workbench.viz.stepthrough.drawing import (
    FONT,
    JOINED,
    NOT_CONFIDENT,
    RELABELLED,
    axis_off,
    below_threshold_patch,
    box_outline,
    cell_map,
    cell_outline,
    class_legend,
    confident_label_image,
    cosine_range,
    figure_grid,
    heat_map,
    image_frame,
    label_image,
    mark_point,
    patch_grid,
    show_image,
)
from workbench.viz.stepthrough.geometry import (
    cell_extent,
    cell_position,
    feature_cell,
    upsample_map,
)
from workbench.viz.stepthrough.maskmatch import (
    MASKMATCH_TERMS,
    MaskMatchTrace,
    lcr_figure,
    maskmatch_trace,
    ms_loss_table,
    multiscale_figure,
    patch_masks_figure,
    student_scales_figure,
)
from workbench.viz.stepthrough.rankmatch import (
    RANKMATCH_TERMS,
    RankMatchTrace,
    agent_coherence,
    agent_maps_figure,
    agent_positions_figure,
    rank_at,
    rank_distribution_figure,
    rank_table,
    rankmatch_trace,
    topk_agents_figure,
)
from workbench.viz.stepthrough.s4mim import (
    NO_TERM,
    S4MIM_TERMS,
    STREAMS,
    S4MIMTrace,
    aggregation_table,
    class_reconstruction_figure,
    eq14_table,
    main_class,
    mim_streams_figure,
    mim_streams_table,
    prototype_similarity,
    prototypes_figure,
    reconstruction_from_terms,
    s4mim_phase1_figure,
    s4mim_trace,
    stream_rows,
)
from workbench.viz.stepthrough.scalematch import (
    SCALEMATCH_TERMS,
    ScaleMatchTrace,
    consistency_figure,
    fusion_figure,
    gate_figure,
    pseudo_label_table,
    scale_table,
    scalematch_trace,
    scales_figure,
)
from workbench.viz.stepthrough.session import (
    BUILT_AT_INIT,
    CACHED_TRACES,
    COMPONENT_TERMS,
    STEP_METHODS,
    LossTerm,
    StepSession,
    Trace,
    batch_u8,
    check_session,
    display_u8,
    losses_table,
    open_session,
    rng_devices,
    session_table,
    stage_terms,
    to_cpu,
    trace_fields,
    traced_step,
)
from workbench.viz.stepthrough.widgets import (
    Control,
    explore,
    explore_widget,
)

__all__ = [
    # session
    "STEP_METHODS", "BUILT_AT_INIT", "CACHED_TRACES", "COMPONENT_TERMS", "StepSession", "open_session",
    "session_table", "LossTerm", "Trace", "stage_terms", "losses_table", "check_session", "traced_step",
    "trace_fields", "to_cpu", "batch_u8", "display_u8", "rng_devices",
    # geometry
    "feature_cell", "cell_position", "cell_extent", "upsample_map",
    # drawing
    "NOT_CONFIDENT", "JOINED", "RELABELLED", "FONT", "axis_off", "show_image", "heat_map", "label_image",
    "confident_label_image", "class_legend", "below_threshold_patch", "box_outline", "figure_grid", "image_frame",
    "mark_point", "cell_map", "cell_outline", "patch_grid", "cosine_range",
    # widgets
    "Control", "explore", "explore_widget",
    # maskmatch
    "MASKMATCH_TERMS", "MaskMatchTrace", "maskmatch_trace", "ms_loss_table", "patch_masks_figure",
    "multiscale_figure", "student_scales_figure", "lcr_figure",
    # corrmatch
    "CORRMATCH_TERMS", "CorrMatchTrace", "corrmatch_trace", "threshold_table", "correlation_row", "point_shape",
    "repropagate", "correlation_rows_figure", "sampled_shapes_figure", "propagation_figure",
    "corr_predictions_figure",
    # rankmatch
    "RANKMATCH_TERMS", "RankMatchTrace", "rankmatch_trace", "agent_coherence", "rank_at", "rank_table",
    "agent_positions_figure", "agent_maps_figure", "topk_agents_figure", "rank_distribution_figure",
    # s4mim
    "STREAMS", "NO_TERM", "S4MIM_TERMS", "S4MIMTrace", "s4mim_trace", "stream_rows", "main_class",
    "reconstruction_from_terms", "prototype_similarity", "eq14_table", "mim_streams_table", "aggregation_table",
    "s4mim_phase1_figure", "mim_streams_figure", "class_reconstruction_figure", "prototypes_figure",
    # scalematch
    "SCALEMATCH_TERMS", "ScaleMatchTrace", "scalematch_trace", "scale_table", "pseudo_label_table", "scales_figure",
    "gate_figure", "fusion_figure", "consistency_figure",
]
