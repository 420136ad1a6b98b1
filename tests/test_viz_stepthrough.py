"""workbench.viz.stepthrough: sessions load data as the trainer does, traces reproduce training_step exactly, the
derived quantities follow the papers' equations (worked by hand), and figures / widgets render."""
from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch

from workbench.config import ConfigError, config_from_dict, dump_config
from workbench.runs import flatten
from workbench.viz import stepthrough as st
from workbench.viz.figures import plt
from workbench.viz.stepthrough import s4mim as s4mim_st
from workbench.viz.stepthrough import scalematch as scale_st
from workbench.viz.stepthrough import session as session_st
from workbench.viz.stepthrough import widgets as widgets_st

from conftest import tiny_config_dict

TRACES = {"maskmatch": st.maskmatch_trace, "corrmatch": st.corrmatch_trace, "rankmatch": st.rankmatch_trace}


def tiny_overrides(tmp: Path, data_root: Path, **extra) -> dict:
    """Dotted data/model keys of the tiny test config (2 + 2 images of 32 x 32, a quarter-width model)."""
    flat = flatten(tiny_config_dict(tmp, data_root))
    over = {k: v for k, v in flat.items() if k.startswith(("data.", "model.")) and k not in ("data.root",
                                                                                             "data.split")}
    over["data.batch_size"] = 2
    return {**over, **extra}


@pytest.fixture(scope="module")
def sessions(tiny_data, tmp_path_factory):
    """Fresh tiny sessions of the three methods (CorrMatch with a fixed threshold 0, so every pixel is
    confident and region propagation relabels)."""
    tmp = tmp_path_factory.mktemp("st")
    extra = {"corrmatch": {"method.threshold": "fixed", "method.tau": 0.0, "method.num_shapes": 16}}
    return {m: st.open_session(m, data_root=tiny_data, split="1-4", device="cpu",
                               overrides=tiny_overrides(tmp, tiny_data, **extra.get(m, {})))
            for m in TRACES}


@pytest.fixture(scope="module")
def traces(sessions):
    """One trace per method: MaskMatch at tau 0 with grid masks; RankMatch with 6 agents and top-3."""
    knobs = {"maskmatch": dict(tau=0.0, lcr_strategy="grid", lcr_patch=8), "corrmatch": {},
             "rankmatch": dict(num_agents=6, top_k=3)}
    return {m: TRACES[m](sessions[m], step=1, seed=3, **knobs[m]) for m in TRACES}


# --------------------------------------------------------------------------------------------- package

# each module of the package and the modules of the package it may import (shared first, methods last)
LAYERS = {"session": set(), "geometry": set(), "widgets": set(), "drawing": {"geometry"}}
LAYERS.update({m: {"session", "geometry", "drawing"} for m in ("maskmatch", "corrmatch", "rankmatch", "s4mim",
                                                              "scalematch")})


def test_package_reexports_every_modules_public_names():
    import importlib

    names = []
    for name in LAYERS:
        mod = importlib.import_module(f"workbench.viz.stepthrough.{name}")
        assert mod.__all__ and all(not n.startswith("_") for n in mod.__all__), name
        for n in mod.__all__:
            assert getattr(st, n) is getattr(mod, n), (name, n)
        names += mod.__all__
    assert len(set(names)) == len(names) and sorted(st.__all__) == sorted(names)
    # names the notebooks import, from both former modules, stay importable from the package
    assert {"open_session", "maskmatch_trace", "s4mim_trace", "scalematch_trace", "explore", "cell_extent",
            "STREAMS", "FONT"} <= set(st.__all__)


def test_modules_import_only_public_names_of_the_layers_below():
    import ast

    pkg = Path(st.__file__).parent
    assert {p.stem for p in pkg.glob("*.py")} == set(LAYERS) | {"__init__"}
    found = set()
    for name, allowed in LAYERS.items():
        for node in ast.walk(ast.parse((pkg / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("workbench.viz.stepthrough"):
                dep = node.module.rsplit(".", 1)[-1]
                assert dep in allowed, (name, node.module)
                found.add((name, dep))
                assert not [a.name for a in node.names if a.name.startswith("_")], (name, node.module)
    # every method module builds on the session and the drawing helpers
    assert {(m, layer) for m, deps in LAYERS.items() if "session" in deps for layer in ("session", "drawing")} <= found


# ------------------------------------------------------------------------------------------- positions


def test_feature_cell_and_cell_position_by_hand():
    # 64-pixel image, 8 cells, align_corners: cell i sits on pixel 9 i
    assert st.feature_cell(0, 63, (64, 64), (8, 8)) == (0, 7)
    assert st.feature_cell(32, 9, (64, 64), (8, 8)) == (4, 1)        # 32 * 7/63 = 3.56 -> 4; 9 * 7/63 = 1
    assert st.feature_cell(4, 5, (64, 64), (8, 8)) == (0, 1)         # 0.44 -> 0, 0.56 -> 1
    assert st.cell_position(7, 1, (64, 64), (8, 8)) == (63.0, 9.0)
    y, x = st.cell_position(torch.tensor([0, 2]), torch.tensor([3, 4]), (32, 16), (5, 5))
    assert y.tolist() == [0.0, 15.5] and x.tolist() == [11.25, 15.0]
    # cells of 9 pixels centred on 0, 9, ..., 63; a single row of cells covers the whole height
    assert st.cell_extent((64, 64), (8, 8)) == (-4.5, 67.5, 67.5, -4.5)
    assert st.cell_extent((10, 64), (1, 8)) == (-4.5, 67.5, 9.5, -0.5)
    with pytest.raises(ValueError, match=r"pixel \(64, 0\) lies outside the 64 x 64 image"):
        st.feature_cell(64, 0, (64, 64), (8, 8))


def test_upsample_map_keeps_corner_cells():
    m = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    up = st.upsample_map(m, (3, 3))
    assert up[0, 0] == 0 and up[0, 2] == 1 and up[2, 0] == 2 and up[2, 2] == 3
    assert up[1, 1] == pytest.approx(1.5)                             # the mean of the four corners
    with pytest.raises(ValueError, match=r"\[h, w\]"):
        st.upsample_map(torch.zeros(1, 2, 2), (3, 3))


def test_agent_coherence_by_hand():
    # three pixels with features (1, 0), (0, 1), (1, 1): |cos| = 0, 1/sqrt(2), 1/sqrt(2) between the pairs
    feats = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]).reshape(1, 2, 1, 3)
    assert st.agent_coherence(feats, torch.tensor([[0, 1, 2]]))[0].item() == pytest.approx(2 / (3 * math.sqrt(2)))
    assert st.agent_coherence(feats, torch.tensor([[0, 1]]))[0].item() == pytest.approx(0.0)
    assert st.agent_coherence(feats, torch.tensor([[2, 0]]))[0].item() == pytest.approx(1 / math.sqrt(2))
    with pytest.raises(ValueError, match="at least two agents"):
        st.agent_coherence(feats, torch.tensor([[0]]))


# --------------------------------------------------------------------------------------------- sessions


def test_session_batches_are_the_trainers_batches(tmp_path, tiny_data):
    from workbench.engine.trainer import Trainer

    cfg_dict = tiny_config_dict(tmp_path / "runs", tiny_data, **{"method.name": "maskmatch", "data.batch_size": 2})
    trainer = Trainer(config_from_dict(cfg_dict))
    trainer.setup()
    loader = iter(trainer._loader())
    first, second = next(loader), next(loader)
    session = st.open_session("maskmatch", data_root=tiny_data, split="1-4", device="cpu",
                              overrides=tiny_overrides(tmp_path, tiny_data))
    for step, ref in ((0, first), (1, second)):
        mine = session.raw_batch(step)
        assert mine["ids_u"] == ref["ids_u"] and mine["ids_l"] == ref["ids_l"]
        for key in ("x_l", "y_l", "x_w", "x_s1", "x_s2", "ignore", "box1", "box2", "x_w_mix", "y_u"):
            assert torch.equal(mine[key], ref[key]), (step, key)
    batch = session.batch(1)
    assert batch.x_w.dtype == torch.float32 and batch.y_u.dtype == torch.long and batch.ids_u == second["ids_u"]
    assert session.step_info(1).capture and session.step_info(1).iteration == 1


def test_open_session_errors(tmp_path, tiny_data):
    with pytest.raises(ValueError, match="method must be one of"):
        st.open_session("unimatch", data_root=tiny_data)
    run = tmp_path / "uni"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(config_from_dict(
        tiny_config_dict(tmp_path, tiny_data, **{"method.name": "unimatch"}))))
    with pytest.raises(ValueError, match="is a 'unimatch' run; this step-through needs a 'corrmatch' run"):
        st.open_session("corrmatch", run_dir=run)
    with pytest.raises(ValueError, match="builds a fresh model"):
        st.open_session("rankmatch", run_dir=run, config="configs/x.yaml")
    mm = tmp_path / "mm"
    mm.mkdir()
    (mm / "config.yaml").write_text(dump_config(config_from_dict(
        tiny_config_dict(tmp_path, tiny_data, **{"method.name": "maskmatch"}))))
    with pytest.raises(ValueError, match=r"overrides \['model.width'\] would not fit the checkpoint"):
        st.open_session("maskmatch", run_dir=mm, overrides={"model.width": 0.5})
    with pytest.raises(ValueError, match="checkpoint must be 'best' or 'latest'"):
        st.open_session("maskmatch", run_dir=mm, checkpoint="first")
    with pytest.raises(ConfigError, match="data.bogus"):
        st.open_session("maskmatch", data_root=tiny_data, overrides={"data.bogus": 1})


def test_configured_knobs_are_checked_and_restored(sessions):
    s = sessions["maskmatch"]
    before = s.method.cfg
    with s.configured(tau=0.5, lcr_patch=None) as c:
        assert c.tau == 0.5 and c.lcr_patch == before.lcr_patch and s.method.cfg is c
    assert s.method.cfg is before
    with pytest.raises(ValueError, match="method.bogus: maskmatch has no such config key"):
        with s.configured(bogus=1):
            pass
    with pytest.raises(ConfigError, match="method.lcr_ratio"):
        with s.configured(lcr_ratio=1.5):
            pass
    with pytest.raises(ValueError, match="method.threshold: corrmatch reads it only when built"):
        with sessions["corrmatch"].configured(threshold="dynamic"):
            pass
    assert s.method.cfg is before


# ------------------------------------------------------------------------------------------------ traces


def same_as_training_step(session, trace):
    """Run the method's real ``training_step`` from the trace's state (step, seed, knobs; capture on) and assert
    that every term of the trace is logged with the trace's value and that the loss is the trace's total: the
    session replays the step the trainer makes. Returns the step's output."""
    batch = session.batch(trace.step)
    with session.configured(**trace.knobs), session.replay(trace.seed):
        out = session.method.training_step(batch, session.step_info(trace.step))
    for t in trace.terms:
        assert float(out.logs[t.name]) == pytest.approx(t.logged, rel=1e-6, abs=1e-7), t.name
    assert float(out.loss) == pytest.approx(trace.total, rel=1e-6, abs=1e-7)
    return out


@pytest.mark.parametrize("method", list(TRACES))
def test_trace_is_the_training_step(method, sessions, traces):
    trace = traces[method]
    same_as_training_step(sessions[method], trace)
    assert {t.name for t in trace.terms} >= {"loss_x"}
    # the total is the sum of the weighted terms, as the losses table shows it
    rows = st.losses_table(trace).records()
    assert rows[-1]["term"] == "total"
    assert rows[-1]["weight x value"] == pytest.approx(sum(r["weight"] * r["value"] for r in rows[:-1]))


# the stage whose returned terms each trace must show as they are (the trace calls the method's stages)
LOSS_STAGE = {"corrmatch": "loss_terms", "rankmatch": "unimatch_pass", "maskmatch": "stages"}


@pytest.mark.parametrize("method", list(LOSS_STAGE))
def test_trace_numbers_come_from_the_methods_stages(method, sessions, traces, monkeypatch):
    # a probe term added to the stage's output (weight 0.5, value 3.0) must appear in the trace unchanged and move
    # its total by 0.5 x 3.0 = 1.5: the trace reads the stage's terms, it does not recompute them
    cls = type(sessions[method].method)
    stage = getattr(cls, LOSS_STAGE[method])

    def probed(self, *args, **kwargs):
        out = stage(self, *args, **kwargs)
        (out if isinstance(out, dict) else out.terms)["loss_probe"] = (0.5, torch.tensor(3.0))
        return out

    monkeypatch.setattr(cls, LOSS_STAGE[method], probed)
    knobs = {"maskmatch": dict(tau=0.0, lcr_strategy="grid", lcr_patch=8), "corrmatch": {},
             "rankmatch": dict(num_agents=6, top_k=3)}[method]
    t = TRACES[method](sessions[method], step=1, seed=3, **knobs)
    probe = next(x for x in t.terms if x.name == "loss_probe")
    assert (probe.weight, probe.value, probe.logged) == (0.5, 3.0, 3.0)
    assert t.total == pytest.approx(traces[method].total + 1.5, rel=1e-6)
    others = {x.name: x.value for x in traces[method].terms}
    assert {x.name: x.value for x in t.terms if x.name != "loss_probe"} == others


def test_cached_keeps_the_most_recent_settings(sessions, monkeypatch):
    s = sessions["maskmatch"]
    calls = []

    def fake(session, **kw):
        calls.append(kw)
        return kw

    monkeypatch.setattr(session_st, "CACHED_TRACES", 2)
    assert s.cached(fake, tau=0.1) is s.cached(fake, tau=0.1) and len(calls) == 1
    s.cached(fake, tau=0.2)
    s.cached(fake, tau=0.1)                    # used again: now the most recent
    s.cached(fake, tau=0.3)                    # evicts tau=0.2
    s.cached(fake, tau=0.1)
    s.cached(fake, tau=0.2)
    assert [c["tau"] for c in calls] == [0.1, 0.2, 0.3, 0.2]
    s._traces.clear()


def test_tracing_restores_state_and_leaves_the_callers_rng(sessions, traces):
    s = sessions["rankmatch"]
    before = {k: v.clone() for k, v in s.method.state_dict().items()}
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = st.rankmatch_trace(s, step=1, seed=3, num_agents=6, top_k=3)
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(v, s.method.state_dict()[k]) for k, v in before.items())
    assert again.total == traces["rankmatch"].total and torch.equal(again.agents, traces["rankmatch"].agents)
    assert not s.method.training


def test_maskmatch_trace_by_hand(traces):
    t = traces["maskmatch"]
    assert t.tau == 0.0 and t.scales == (0.7, 1.0, 1.5) and t.strategy == "grid"
    # tau = 0: every non-padding pixel is confident
    assert torch.equal(t.confident, t.valid)
    # Eq. 8 divides by S x valid pixels: L_MS is the mean of the per-scale losses
    loss_u = next(x for x in t.terms if x.name == "loss_u")
    assert loss_u.value == pytest.approx(sum(t.ms_losses) / 3, rel=1e-5)
    # L = L_x + 1 * L_MS + 1 * L_LCR (Eq. 9, lambda1 = lambda2 = 1)
    assert [x.name for x in t.terms] == ["loss_x", "loss_u", "loss_lcr"]
    assert t.total == pytest.approx(sum(x.value for x in t.terms))
    # grid masking keeps one 8-pixel patch of every 2 x 2: exactly a quarter of a 32 x 32 image
    assert t.lcr_visible.shape == (2, 32, 32) and t.lcr_visible.float().mean(dim=(1, 2)).tolist() == [0.25, 0.25]
    assert t.strategy_masks["grid"].float().mean().item() == 0.25
    patches = t.lcr_visible.reshape(2, 4, 8, 4, 8)
    assert torch.equal(patches.amin(dim=(2, 4)), patches.amax(dim=(2, 4)))   # constant on every patch
    # the masked input is the weak view where visible (hidden = the mean colour)
    vis = t.lcr_visible[:, None].expand(-1, 3, -1, -1)
    assert torch.equal(t.images["masked"][vis], t.images["weak"][vis])
    assert t.teacher_pred.shape == (2, 3, 32, 32) and t.student_pred.shape == (2, 3, 32, 32)


def test_corrmatch_trace_by_hand(traces, sessions):
    t = traces["corrmatch"]
    assert not t.dynamic and t.tau == 0.0
    # rows of the correlation map are softmaxes: they sum to 1
    row, cell = st.correlation_row(t, 1, 31, 0)
    assert cell == (t.feat_size[0] - 1, 0) and row.sum().item() == pytest.approx(1.0, abs=1e-5)
    shape = st.point_shape(t, 0, 10, 12)
    assert shape.dtype == torch.bool and not bool((shape & ~t.keep[0]).any())   # padding and box cleared
    # re-running the op at the step's threshold gives the step's propagation
    q, pseudo, q_out = st.repropagate(t)
    assert torch.equal(pseudo, t.pseudo_prop) and torch.equal(q_out, t.confident_prop)
    assert torch.equal(q, t.valid)  # tau 0: every valid pixel confident
    # at tau = 1 no pixel is confident (softmax < 1), so every shape has r1 = 0 and is skipped: nothing changes
    q1, pseudo1, q1_out = st.repropagate(t, 1.0)
    assert not bool(q1.any()) and torch.equal(pseudo1, t.pseudo) and not bool(q1_out.any())
    with pytest.raises(ValueError, match="tau must lie in"):
        st.repropagate(t, 1.5)
    rows = dict(st.threshold_table(t, sessions["corrmatch"].class_names).rows)
    assert rows["fixed threshold (used)"] == "0.000000"


def test_corrmatch_dynamic_threshold_follows_eq_11(tmp_path, tiny_data):
    s = st.open_session("corrmatch", data_root=tiny_data, split="1-4", device="cpu",
                        overrides=tiny_overrides(tmp_path, tiny_data, **{"method.num_shapes": 4}))
    t = st.corrmatch_trace(s, step=0, seed=0)
    seen = t.class_max[t.class_max >= 0]
    assert t.dynamic and t.threshold_before == pytest.approx(0.85) and t.momentum == 0.999
    assert t.tau == pytest.approx(0.999 * 0.85 + 0.001 * float(seen.mean()), abs=1e-6)
    rows = dict(st.threshold_table(t, s.class_names).rows)
    assert rows["threshold before"] == "0.850000" and float(rows["threshold after (used)"]) == pytest.approx(t.tau,
                                                                                                           abs=1e-6)
    same_as_training_step(s, t)


def test_rankmatch_trace_by_hand(traces):
    t = traces["rankmatch"]
    assert t.agents.shape == (2, 6) and t.random_agents.shape == (2, 6) and t.top_k == 3
    assert all(len(set(a.tolist())) == 6 for a in t.agents)
    assert torch.allclose(t.corr_w.sum(-1), torch.ones(2, t.corr_w.shape[1]), atol=1e-5)
    r = st.rank_at(t, 0, 5, 20)
    assert r["orderings"].shape == (6, 3)
    # the authors' guard: e = 1e-10 in every denominator, so the orderings' total is at most 1 (below it when the
    # weights are small against e, as here for the weak view's third agent)
    assert 0.9 < r["dist_w"].sum().item() <= 1 + 1e-6
    # Plackett-Luce of the weak view's own order (w1 >= w2 >= w3): w1/(w1+w2+w3+e) * w2/(w2+w3+e) * w3/(w3+e)
    e = 1e-10
    w1, w2, w3 = r["weights_w"].tolist()
    assert w1 >= w2 >= w3
    assert r["dist_w"][0].item() == pytest.approx(w1 / (w1 + w2 + w3 + e) * w2 / (w2 + w3 + e) * w3 / (w3 + e),
                                                  rel=1e-5)
    assert r["dist_w"][0] == r["dist_w"].max()
    s1, s2, s3 = r["weights_s"].tolist()                              # ordering (2, 0, 1) under the strong view
    assert r["dist_s"][4].item() == pytest.approx(s3 / (s1 + s2 + s3 + e) * s1 / (s1 + s2 + e) * s2 / (s2 + e),
                                                  rel=1e-5)
    table = st.rank_table(t, 0, 5, 20)
    assert len(table.rows) == 6 and table.rows[0][0] == " > ".join(f"a{a}" for a in r["agents"].tolist())
    rank = next(x for x in t.terms if x.name == "loss_rank")
    assert rank.weight == 0.1 and rank.value == pytest.approx(sum(t.view_losses) / 2)


def test_traces_refuse_a_session_of_another_method(sessions, traces):
    with pytest.raises(ValueError, match="this is the corrmatch step-through; the session holds a 'maskmatch'"):
        st.corrmatch_trace(sessions["maskmatch"])
    with pytest.raises(ValueError, match=r"image index must be an int in \[0, 1\]"):
        st.lcr_figure(traces["maskmatch"], 2, [[0, 0, 0]] * 6, ["c"] * 6)


# ----------------------------------------------------------------------------------------------- figures


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=60)
    plt.close(fig)
    return buf.getvalue()


def _titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes if ax.get_visible() and ax.get_title()]


def test_figures_render_with_titles(sessions, traces):
    names, pal = sessions["maskmatch"].class_names, sessions["maskmatch"].palette
    mm, cm, rm = traces["maskmatch"], traces["corrmatch"], traces["rankmatch"]
    figs = {
        "patch": st.patch_masks_figure(mm, 1), "ms": st.multiscale_figure(mm, 0, pal, names),
        "student": st.student_scales_figure(mm, 0, pal, names), "lcr": st.lcr_figure(mm, 1, pal, names),
        "pred": st.corr_predictions_figure(cm, 0, pal, names),
        "rows": st.correlation_rows_figure(cm, 1, [[3, 4], [30, 30]]), "shapes": st.sampled_shapes_figure(cm, 0, 5),
        "prop": st.propagation_figure(cm, 0, pal, names, tau=0.5),
        "agents": st.agent_positions_figure(rm, 0), "maps": st.agent_maps_figure(rm, 1, [0, 5]),
        "topk": st.topk_agents_figure(rm, 0), "rank": st.rank_distribution_figure(rm, 0, 16, 16),
    }
    titles = {k: _titles(f) for k, f in figs.items()}
    assert titles["patch"][0].startswith("weak view ") and titles["patch"][3] == "grid: 75% hidden (used)"
    assert "teacher @ scale 0.7" in titles["ms"] and "confident (tau 0): 100%" in titles["ms"]
    assert "ground truth (not used)" in titles["ms"]
    assert any(t.startswith("student @ 1.5\nL = ") for t in titles["student"])
    assert "mask z (grid): 75% hidden" in titles["lcr"]
    assert {"propagated weak", "propagated strong", "perturbed"} <= set(titles["pred"])
    assert any(t.startswith("row of (30, 30) = cell") for t in titles["rows"])
    assert sum(t.startswith("shape ") for t in titles["shapes"]) == 5
    assert any(t.startswith("before: ") for t in titles["prop"]) and "chosen" in figs["prop"]._suptitle.get_text()
    assert titles["agents"][0].startswith("orthogonal: 6 agents") and titles["agents"][1].startswith("random: 6")
    assert titles["maps"][:2] == ["agent 0 on weak (CutMixed)", "agent 5 on weak (CutMixed)"]
    assert [t for t in titles["topk"] if t.startswith("choice")] == [f"choice {k} (agent index)" for k in (1, 2, 3)]
    assert titles["rank"][1].startswith("3! = 6 orderings")
    for name, fig in figs.items():
        assert len(_png(fig)) > 2000, name
    with pytest.raises(ValueError, match=r"agents must be indices in \[0, 5\]"):
        st.agent_maps_figure(rm, 0, [6])
    with pytest.raises(ValueError, match="points is empty"):
        st.correlation_rows_figure(cm, 0, [])


def test_tables(sessions, traces):
    setup = st.session_table(sessions["maskmatch"]).records()
    assert setup[0] == {"setting": "method", "value": "maskmatch"}
    assert {"setting": "method.tau", "value": 0.9} in setup
    ms = st.ms_loss_table(traces["maskmatch"]).rows
    assert [r[0] for r in ms] == ["0.7", "1", "1.5", "mean (L_MS)"]
    with pytest.raises(ValueError, match="2 class names for 6 classes"):
        st.threshold_table(traces["corrmatch"], ["a", "b"])


# ----------------------------------------------------------------------------------------------- widgets


def test_explore_static_shows_figures_and_tables(monkeypatch, capsys):
    shown = []
    monkeypatch.setattr(widgets_st, "show", lambda fig, dpi=110: shown.append((fig, dpi)))
    fig = plt.figure()
    from workbench.runs import Table

    assert st.explore(lambda image, mode: [fig, Table(["a"], [[f"{image}-{mode}"]], "t")],
                      {"image": st.Control(2, 0, 3), "mode": st.Control("b", options=["a", "b"])}, False) is None
    assert shown == [(fig, 110)]
    assert "2-b" in capsys.readouterr().out   # the table, displayed (printed outside a kernel)
    plt.close(fig)


def test_explore_widget_redraws_on_change():
    import ipywidgets as W

    calls = []
    box = st.explore_widget(lambda image, tau, mode: calls.append((image, tau, mode)),
                            {"image": st.Control(1, 0, 3), "tau": st.Control(0.5, 0.0, 1.0, 0.05),
                             "mode": st.Control("b", options=["a", "b"])})
    controls = box.children[0].children
    assert [type(c) for c in controls] == [W.IntSlider, W.FloatSlider, W.Dropdown]
    assert isinstance(box.children[1], W.Output) and calls == [(1, 0.5, "b")]
    controls[0].value = 3
    controls[2].value = "a"
    assert calls[1:] == [(3, 0.5, "b"), (3, 0.5, "a")]
    with pytest.raises(ValueError, match=r"control image: value 5 lies outside \[0, 3\]"):
        st.Control(5, 0, 3).widget("image")
    with pytest.raises(ValueError, match="control mode: value 'c' is not among the options"):
        st.Control("c", options=["a"]).widget("mode")
    with pytest.raises(ValueError, match="give low and high"):
        st.Control(1).widget("x")
    with pytest.raises(ValueError, match="controls is empty"):
        st.explore_widget(lambda: None, {})


# ---------------------------------------------------------------------------- S4MIM and ScaleMatch (their modules)


@pytest.fixture(scope="module")
def sessions2(tiny_data, tmp_path_factory):
    """Fresh tiny sessions of S4MIM (default switches; all MIM losses off with LCR on; mimfea off) and ScaleMatch
    (CIF; average fusion; no fusion; the paper's structure)."""
    tmp = tmp_path_factory.mktemp("st2")
    variants = {
        "s4mim": ("s4mim", {}),
        "s4mim_off": ("s4mim", {"method.mimpi": False, "method.mimfea": False, "method.mimse": False,
                                "method.lcr_weight": 1.0, "method.lcr_patch": 8}),
        "s4mim_nofea": ("s4mim", {"method.mimfea": False}),
        "scalematch": ("scalematch", {}),
        "average": ("scalematch", {"method.fusion": "average"}),
        "nocif": ("scalematch", {"method.cif": False}),
        "paper": ("scalematch", {"method.structure": "paper"}),
    }
    return {k: st.open_session(m, data_root=tiny_data, split="1-4", device="cpu",
                               overrides=tiny_overrides(tmp, tiny_data, **extra)) for k, (m, extra) in variants.items()}


@pytest.fixture(scope="module")
def traces2(sessions2):
    """S4MIM with tau 0 and 8-pixel grid masks (exactly 3 of 4 patches hidden); ScaleMatch at v = 0.25 (plain
    pseudo-labels: warm-up) and at v = 2 with no warm-up (fused pseudo-labels)."""
    return {"s4mim": s4mim_st.s4mim_trace(sessions2["s4mim"], step=1, seed=3, tau=0.0, mask_patch=8,
                                          mask_strategy="grid"),
            "small": scale_st.scalematch_trace(sessions2["scalematch"], step=1, seed=3, scale=0.25),
            "large": scale_st.scalematch_trace(sessions2["scalematch"], step=1, seed=3, scale=2.0,
                                               cif_warmup_epochs=0, tau=0.0)}


@pytest.mark.parametrize("name", ["s4mim", "small", "large"])
def test_s4mim_and_scalematch_traces_are_the_training_step(name, sessions2, traces2):
    trace = traces2[name]
    session = sessions2["s4mim" if name == "s4mim" else "scalematch"]
    same_as_training_step(session, trace)
    rows = st.losses_table(trace).records()
    assert rows[-1]["weight x value"] == pytest.approx(sum(r["weight"] * r["value"] for r in rows[:-1]))


@pytest.mark.parametrize("name", ["s4mim", "small"])
def test_s4mim_and_scalematch_trace_numbers_come_from_the_stages(name, sessions2, traces2, monkeypatch):
    # a probe term (lambda 0.5, value 3.0) added where the method's stages make their terms: ScaleMatch's loss_terms
    # (weight as given: the trace shows 0.5 and the total moves by 1.5), S4MIM's phase-II terms (Eq. 14 divides the
    # weight by the normaliser 3.25: the trace shows 0.5 / 3.25 and the total moves by 1.5 / 3.25)
    from workbench.methods.s4mim import Phase2
    from workbench.methods.scalematch import ScaleMatch

    owner, attr, norm = (Phase2, "terms", 3.25) if name == "s4mim" else (ScaleMatch, "loss_terms", 1.0)
    stage = getattr(owner, attr)

    def probed(self, *args, **kwargs):
        terms = stage(self, *args, **kwargs)
        terms["loss_probe"] = (0.5, torch.tensor(3.0))
        return terms

    monkeypatch.setattr(owner, attr, probed)
    if name == "s4mim":
        t = s4mim_st.s4mim_trace(sessions2["s4mim"], step=1, seed=3, tau=0.0, mask_patch=8, mask_strategy="grid")
    else:
        t = scale_st.scalematch_trace(sessions2["scalematch"], step=1, seed=3, scale=0.25)
    probe = next(x for x in t.terms if x.name == "loss_probe")
    assert probe.weight == pytest.approx(0.5 / norm) and probe.value == 3.0
    assert t.total == pytest.approx(traces2[name].total + 1.5 / norm, rel=1e-6)
    assert {x.name: x.value for x in t.terms if x.name != "loss_probe"} == {x.name: x.value
                                                                            for x in traces2[name].terms}


def test_s4mim_trace_by_hand(sessions2, traces2):
    import torch.nn.functional as F

    t = traces2["s4mim"]
    n, m, m2 = t.sizes
    assert (n, m, m2) == (2, 2, 2) and t.recon.shape == (6, 3, 32, 32) and t.feat_size == (8, 8)
    # Eq. 14 with every loss on: 1 + 2 (1/2) + 3 (1/3) + 3 (0.05) + 3 (0.1/3) = 3.25
    assert t.normaliser == pytest.approx(3.25)
    v = {x.name: x for x in t.terms}
    assert list(v) == ["loss_x", "loss_s", "loss_fp", "loss_mimpi", "loss_mimfea", "loss_mimse"]
    assert v["loss_x"].weight == pytest.approx(1 / 3.25) and v["loss_s"].weight == pytest.approx(0.5 / 3.25)
    by_hand = (v["loss_x"].value + 0.5 * (v["loss_s"].value + v["loss_fp"].value) + v["loss_mimpi"].value / 3
               + 0.05 * v["loss_mimfea"].value + 0.1 / 3 * v["loss_mimse"].value) / 3.25
    assert t.total == pytest.approx(by_hand, rel=1e-6)
    assert v["loss_mimpi"].logged == pytest.approx(v["loss_mimpi"].value / 3)   # the step logs l_mp x L
    # tau 0: every valid pixel is confident
    assert torch.equal(t.confident, t.valid)
    # grid masks: 1 of every 2 x 2 patches visible, constant on 8-pixel patches; strong and weak share the mask
    vis = t.stream_visible
    assert vis.float().mean(dim=(1, 2)).tolist() == [0.25] * 6
    patches = vis.reshape(6, 4, 8, 4, 8)
    assert torch.equal(patches.amin(dim=(2, 4)), patches.amax(dim=(2, 4)))
    assert torch.equal(vis[n:n + m], vis[n + m:])
    # masked inputs: the image where visible, 0 after normalisation (the mean colour) where hidden
    for name, img, rows in (("strong", t.images["strong"], vis[n:n + m]), ("weak + fp", t.images["weak"], vis[n + m:])):
        masked = t.images[f"{name} masked"]
        v3 = rows[:, None].expand(-1, 3, -1, -1)
        assert torch.equal(masked[v3], img[v3])
        for c in range(3):
            assert bool((masked[:, c][~rows] == round(t.mean[c] * 255)).all())
    # Eq. 8: each stream's MSE against its unmasked images; L_mimpi sums the three
    for k, (a, b) in enumerate(((0, n), (n, n + m), (n + m, n + 2 * m))):
        assert t.mse[k] == pytest.approx(float(F.mse_loss(t.recon[a:b], t.stream_x[a:b])), rel=1e-5)
    assert v["loss_mimpi"].value == pytest.approx(sum(t.mse), rel=1e-6)
    # Eq. 7: the per-class terms sum (then upsample) to the reconstruction the heads' forward computes
    for i in range(2):
        assert torch.allclose(s4mim_st.reconstruction_from_terms(t, i), t.recon[t.stream("weak + fp", i)], atol=1e-5)
    # Eqs. 10-12 by hand: each class's confidence-weighted mean pull, then the mean over the classes averaged
    for k in torch.nonzero(t.agg_classes).flatten().tolist():
        sel = t.fea_masked & (t.fea_groups == k)
        w = t.fea_weights[sel]
        assert t.class_terms[k].item() == pytest.approx(float((t.pull[sel] * w).sum() / w.sum()), rel=1e-5)
    assert t.agg_loss == pytest.approx(float(t.class_terms[t.agg_classes].mean()), rel=1e-5)
    assert bool(torch.isnan(t.class_terms[~t.agg_classes]).all())
    assert bool((t.pull >= 0).all()) and bool((t.pull <= 2 / t.temperature + 1e-6).all())   # (1 - cos) / T
    # a fresh dictionary: all zeros and never seen; after the step exactly this batch's classes are available, each
    # entry (1 - 0.99) x its batch prototype, so no longer zero
    assert not bool(t.seen_before.any()) and not bool(t.prototypes_before.any())
    assert torch.equal(t.available, t.batch_present) and bool(t.available.any())
    assert bool((t.prototypes[t.available].norm(dim=1) > 0).all()) and not bool(t.prototypes[~t.available].any())
    sim = s4mim_st.prototype_similarity(t)
    avail = torch.nonzero(t.available).flatten()
    assert torch.allclose(sim[avail][:, avail], sim[avail][:, avail].T)
    assert torch.allclose(sim[avail, avail], torch.ones(len(avail)), atol=1e-5)
    assert bool(torch.isnan(sim[~t.available]).all())
    assert bool(t.available[s4mim_st.main_class(t, 0)])
    # the Eq. 14 table: the shares sum to the normaliser, and the weighted sum over it is the step's loss
    rows = {r["loss"]: r for r in s4mim_st.eq14_table(t).records()}
    assert [rows[k]["normaliser share"] for k in list(rows)[:5]] == pytest.approx([1.0, 1.0, 1.0, 0.15, 0.1])
    assert rows["sum"]["normaliser share"] == pytest.approx(3.25)
    assert rows["sum / normaliser"]["weighted value"] == pytest.approx(t.total, rel=1e-6)
    streams = s4mim_st.mim_streams_table(t).records()
    assert [r["stream"] for r in streams] == ["labeled", "strong", "weak + fp", "sum"]
    assert [r["hidden"] for r in streams[:3]] == [0.75] * 3
    assert streams[3]["masked positions"] == int(t.fea_masked.sum())
    agg = s4mim_st.aggregation_table(t, sessions2["s4mim"].class_names).records()
    assert agg[-1]["(1 - cos) / T"] == t.agg_loss and len(agg) == 7


def test_s4mim_switched_off_pieces_are_shown_without_changing_the_step(sessions2):
    # every MIM loss off: Eq. 14's normaliser is 1 + 2 l_u = 2; phase II is drawn on a forked random state, so the
    # LCR mask drawn after it is still the step's (the check compares loss_lcr and the total)
    off = s4mim_st.s4mim_trace(sessions2["s4mim_off"], step=1, seed=3)
    assert off.normaliser == pytest.approx(2.0) and not off.phase2_in_loss
    assert [x.name for x in off.terms] == ["loss_x", "loss_s", "loss_fp", "loss_lcr"]
    same_as_training_step(sessions2["s4mim_off"], off)
    assert off.recon.shape[0] == 6 and len(off.mse) == 3
    # mimfea off: 1 + 1 + 1 + 0.1 = 3.1; the step leaves the dictionary at zero, the trace shows the update it would
    # make
    nofea = s4mim_st.s4mim_trace(sessions2["s4mim_nofea"], step=1, seed=3)
    assert nofea.normaliser == pytest.approx(3.1) and "loss_mimfea" not in {x.name for x in nofea.terms}
    out = same_as_training_step(sessions2["s4mim_nofea"], nofea)
    assert not bool(out.artifacts["prototypes"].any()) and not bool(out.artifacts["proto_seen"].any())
    assert bool(nofea.prototypes[nofea.available].abs().sum() > 0)
    assert not bool(sessions2["s4mim_nofea"].method.prototypes.any())
    rows = {r["loss"]: r for r in s4mim_st.eq14_table(nofea).records()}
    assert rows["L_mimfea = l_mf mean over classes (off)"]["normaliser share"] == 0.0
    assert rows["sum"]["normaliser share"] == pytest.approx(3.1)


def test_scalematch_trace_by_hand(sessions2, traces2):
    small, large = traces2["small"], traces2["large"]
    # v = 0.25 of a 32-pixel crop is 8 px, raised to min_scaled_size 16: effective scale 0.5; t = 1.25 for v <= 1
    assert small.scales == (0.25,) and small.scaled_sizes == [(16, 16)] and small.feature_scale == 1.25
    assert small.scaled_views[0].shape == (2, 3, 16, 16)
    # FSVC resizes the 8 x 8 layer1 features by t: int(8 x 1.25 + 0.5) = 10; by 0.75 (v = 2 > 1): int(6.5) = 6
    assert small.feature_sizes["low"] == (8, 8) and small.feature_sizes["low @ t"] == (10, 10)
    assert large.scales == (2.0,) and large.scaled_sizes == [(64, 64)] and large.feature_scale == 0.75
    assert large.feature_sizes["low @ t"] == (6, 6)
    for t in (small, large):
        # Eq. 12: s_v = 1 - s_w, fused = s_w logits_1 + s_v logits_v, s_w in (0, 1)
        assert torch.allclose(t.gate_w + t.gate_v, torch.ones_like(t.gate_w), atol=1e-6)
        assert bool(((t.gate_w > 0) & (t.gate_w < 1)).all())
        by_hand = t.gate_w[:, 0, None] * t.logits_w + t.gate_v[:, 0, None] * t.logits_v[:, 0]
        assert torch.allclose(t.fused, by_hand, atol=1e-5)
        # the total: (1 L_x + 0.25 L_s + 0.25 L_ISVC + 0.5 L_FSVC) / 2
        v = {x.name: x.value for x in t.terms}
        assert list(v) == ["loss_x", "loss_s", "loss_isvc", "loss_fsvc"]
        assert t.total == pytest.approx((v["loss_x"] + 0.25 * v["loss_s"] + 0.25 * v["loss_isvc"]
                                         + 0.5 * v["loss_fsvc"]) / 2, rel=1e-6)
        assert v["loss_isvc"] == pytest.approx(t.isvc_losses[0])
    # step 1 is in epoch 0: the default 10-epoch warm-up keeps the plain pseudo-label; no warm-up uses the fusion
    assert small.epoch == 0 and not small.use_fused and torch.equal(small.pseudo, small.pseudo_plain)
    assert large.use_fused and torch.equal(large.pseudo, large.pseudo_fused)
    assert torch.equal(large.confident, large.valid)          # tau 0
    assert torch.equal(small.pseudo_plain, small.logits_w.argmax(1))
    rows = dict(scale_st.scale_table(small).rows)
    assert rows["scaled weak view"] == "16 x 16" and rows["effective scale"] == 0.5
    assert rows["low features"] == "8 x 8 -> 10 x 10" and rows["pseudo-label"].startswith("plain (CIF warm-up")
    plt_rows = {r[0]: r for r in scale_st.pseudo_label_table(large).rows}
    assert plt_rows["fused (CIF)"][1] == 1.0 and plt_rows["plain (scale 1)"][1] == 1.0   # tau 0: all confident
    changed = float(((large.pseudo_fused != large.pseudo_plain) & large.valid).sum()) / float(large.valid.sum())
    assert plt_rows["changed by the fusion"][1] == pytest.approx(changed)


def test_scalematch_average_and_no_fusion(sessions2):
    avg = scale_st.scalematch_trace(sessions2["average"], step=0, seed=1, cif_warmup_epochs=0)
    assert avg.fusion == "average" and bool((avg.gate_w == 0.5).all()) and bool((avg.gate_v == 0.5).all())
    assert torch.allclose(avg.fused, (avg.logits_w + avg.logits_v[:, 0]) / 2, atol=1e-6)
    none = scale_st.scalematch_trace(sessions2["nocif"], step=0, seed=1)
    assert none.fusion is None and none.gate_w is None and none.pseudo_fused is None and not none.use_fused
    # the paper's structure: scale 1 decoded from the unresized features, Eq. 12's gate on it
    paper = scale_st.scalematch_trace(sessions2["paper"], step=0, seed=1, cif_warmup_epochs=0)
    assert paper.structure == "paper" and avg.structure == "reference"
    assert torch.allclose(paper.fused, paper.gate_w[:, 0, None] * paper.logits_w
                          + paper.gate_v[:, 0, None] * paper.logits_v[:, 0], atol=1e-5)
    assert dict(scale_st.scale_table(paper).rows)["structure"] == "paper"
    for s, t in ((sessions2["average"], avg), (sessions2["nocif"], none), (sessions2["paper"], paper)):
        same_as_training_step(s, t)
    names, pal = sessions2["nocif"].class_names, sessions2["nocif"].palette
    with pytest.raises(ValueError, match="fuses nothing"):
        scale_st.gate_figure(none, 0)
    with pytest.raises(ValueError, match="fuses nothing"):
        scale_st.fusion_figure(none, 0, pal, names)
    assert len(scale_st.pseudo_label_table(none).rows) == 1
    fig = scale_st.gate_figure(avg, 1)
    assert "average fusion (s_w = 1/2)" in fig._suptitle.get_text()
    plt.close(fig)


def test_s4mim_and_scalematch_errors(sessions2, traces2):
    with pytest.raises(ValueError, match="this is the s4mim step-through; the session holds a 'scalematch'"):
        s4mim_st.s4mim_trace(sessions2["scalematch"])
    with pytest.raises(ValueError, match="scale must be a positive number"):
        scale_st.scalematch_trace(sessions2["scalematch"], scale=0)
    with pytest.raises(ValueError, match="method.cif: scalematch reads it only when built"):
        with sessions2["scalematch"].configured(cif=False):
            pass
    with pytest.raises(ConfigError, match="method.mask_ratio"):
        s4mim_st.s4mim_trace(sessions2["s4mim"], mask_ratio=1.5)
    names, pal = sessions2["s4mim"].class_names, sessions2["s4mim"].palette
    with pytest.raises(ValueError, match=r"cls must be a class index in \[0, 5\]"):
        s4mim_st.prototypes_figure(traces2["s4mim"], 0, 6, pal, names)
    with pytest.raises(ValueError, match="2 class names for 6 classes"):
        s4mim_st.aggregation_table(traces2["s4mim"], ["a", "b"])
    with pytest.raises(ValueError, match=r"image index must be an int in \[0, 1\]"):
        s4mim_st.mim_streams_figure(traces2["s4mim"], 2, pal, names)
    with pytest.raises(ValueError, match="stream must be one of"):
        traces2["s4mim"].stream("masked", 0)


def test_s4mim_and_scalematch_figures_render(sessions2, traces2):
    names, pal = sessions2["s4mim"].class_names, sessions2["s4mim"].palette
    s4, small, large = traces2["s4mim"], traces2["small"], traces2["large"]
    cls = s4mim_st.main_class(s4, 1)
    figs = {"phase1": s4mim_st.s4mim_phase1_figure(s4, 1, pal, names),
            "streams": s4mim_st.mim_streams_figure(s4, 0, pal, names),
            "recon": s4mim_st.class_reconstruction_figure(s4, 1, pal, names),
            "protos": s4mim_st.prototypes_figure(s4, 1, cls, pal, names),
            "scales": scale_st.scales_figure(small, 0, pal, names), "gate": scale_st.gate_figure(small, 1),
            "fusion": scale_st.fusion_figure(large, 0, pal, names),
            "cons": scale_st.consistency_figure(large, 1, pal, names)}
    titles = {k: _titles(f) for k, f in figs.items()}
    assert "confident (tau 0): 100%" in titles["phase1"] and "ground truth (not used)" in titles["phase1"]
    assert titles["streams"][1] == "mask m: 75% hidden" and titles["streams"][-1] == "target: argmax p_fp"
    assert sum(t.startswith("Head_") for t in titles["recon"]) == int(
        (torch.bincount(s4.fea_groups[s4.stream("weak + fp", 1)].flatten(), minlength=6) > 0).sum())
    assert any(t.startswith(f"cos to prototype of {names[cls]}") for t in titles["protos"])
    assert "weak view, scale v = 0.25\n16 x 16" in titles["scales"]
    assert "s_v = 1 - s_w (scale 0.25)" in titles["gate"]
    assert "fused pseudo-label (used)" in titles["fusion"] and "plain pseudo-label" in titles["fusion"]
    assert any(t.startswith("FSVC: features x 0.75") for t in titles["cons"])
    for name, fig in figs.items():
        assert len(_png(fig)) > 2000, name
