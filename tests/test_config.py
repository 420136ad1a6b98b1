import pytest

from workbench.config import (
    ConfigError,
    MethodConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    parse_override,
)


def test_defaults_and_roundtrip(tmp_path):
    cfg = load_config()
    assert cfg.method.name == "supervised"
    p = tmp_path / "c.yaml"
    p.write_text(dump_config(cfg))
    assert config_to_dict(load_config(p)) == config_to_dict(cfg)


def test_dotted_overrides_are_typed():
    cfg = load_config(overrides=["method.name=unimatch", "method.tau=0.9", "optim.lr=1e-3", "data.scale_range=[0.5,1.5]",
                                 "train.iters=7", "model.pretrained=null"])
    assert cfg.method.name == "unimatch" and cfg.method.tau == 0.9 and cfg.optim.lr == 0.001
    assert cfg.data.scale_range == (0.5, 1.5) and cfg.train.iters == 7 and cfg.model.pretrained is None


def test_yaml_on_off_reach_string_fields_as_words():
    """YAML 1.1 reads ``off`` as False: a string field takes it back as "off" (and True as "on", which the
    choices then reject where it is not one); a boolean field keeps its booleans."""
    cfg = load_config(overrides=["optim.amp=off", "model.compile=off", "optim.fused=false"])
    assert cfg.optim.amp == "off" and cfg.model.compile == "off" and cfg.optim.fused is False
    with pytest.raises(ConfigError, match="optim.amp"):
        load_config(overrides=["optim.amp=on"])


@pytest.mark.parametrize("override, key", [
    ("optim.lrr=0.1", "optim.lrr"),
    ("method.tau=0.9", "method.tau"),  # supervised has no tau
    ("bogus.x=1", "bogus"),
    ("data.batch_size=abc", "data.batch_size"),
    ("train.iters=1.5", "train.iters"),
    ("data.scale_range=[1,2,3]", "data.scale_range"),
    ("data.flip=3", "data.flip"),
])
def test_bad_keys_and_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert key in str(e.value)


def test_unknown_method_lists_choices():
    with pytest.raises(ConfigError, match="unimatch"):
        load_config(overrides=["method.name=nosuch"])


@pytest.mark.parametrize("override, key", [
    ("data.crop_size=0", "data.crop_size"), ("model.backbone=vgg", "model.backbone"),
    ("optim.amp=fp8", "optim.amp"), ("eval.mode=weird", "eval.mode"), ("data.scale_range=[2,1]", "data.scale_range"),
    ("model.output_stride=4", "model.output_stride"), ("method.loss=focal", "method.loss"),
])
def test_validation(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=[override])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_parse_override():
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("x=true") == (["x"], True)
    with pytest.raises(ConfigError):
        parse_override("novalue")


def test_apply_overrides_does_not_mutate():
    base = {"a": {"b": 1}}
    out = apply_overrides(base, {"a.c": 2})
    assert base == {"a": {"b": 1}} and out == {"a": {"b": 1, "c": 2}}
    with pytest.raises(ConfigError):
        apply_overrides({"a": 1}, ["a.b=2"])


def test_method_section_from_dict():
    cfg = config_from_dict({"method": {"name": "meanteacher", "alpha": 0.99}})
    assert cfg.method.alpha == 0.99 and cfg.method.tau == 0.95


# ------------------------------------------------------------------------------------------------ protocol files
def test_every_protocol_file_loads_with_the_authors_key_settings():
    from pathlib import Path

    from workbench.data.recipes import cityscapes, coco, lucchi, voc
    from workbench.engine.optim import scaled_lr

    splits = {"voc": set(voc.CLASSIC) | set(voc.BLENDER) | {f"u2pl_{n}" for n in voc.BLENDER},
              "cityscapes": set(cityscapes.FRACTIONS), "coco": set(coco.FRACTIONS), "lucchi": set(lucchi.FRACTIONS)}
    root = Path(__file__).resolve().parents[1] / "configs" / "protocols"
    files = sorted(root.rglob("*.yaml"))
    by_kind: dict[str, int] = {}
    for f in files:
        cfg = load_config(f)
        kind = f.parent.name if f.parent != root else "generic"
        by_kind[kind] = by_kind.get(kind, 0) + 1
        dataset = f.stem.split("_")[0]
        crop = int(f.stem.rsplit("_", 1)[1])
        assert cfg.data.split in splits[dataset] and cfg.data.crop_size == crop, f
        # the labeled images per optimiser step on one process: the lr the file states is the lr used
        lr = scaled_lr(cfg.optim.lr, cfg.data.batch_size * cfg.optim.grad_accum, cfg.optim.reference_batch,
                       cfg.optim.lr_scaling)
        if dataset == "cityscapes":
            assert cfg.eval.mode == "sliding" and cfg.eval.window == crop and cfg.eval.stride == int(crop * 2 / 3), f
            assert cfg.eval.sliding_tiles == "clipped_sum" and cfg.method.loss == "ohem", f
            assert cfg.method.ohem_thresh == 0.7 and cfg.method.ohem_min_kept_images == 2, f
        elif dataset in ("voc", "coco"):
            assert cfg.eval.mode == "original", f
        if kind == "generic":
            assert cfg.method.name == "supervised" and cfg.model.output_stride == 16, f
            if dataset == "cityscapes":
                assert cfg.method.ohem_min_kept == 200000 and not hasattr(cfg.method, "tau"), f
        elif kind == "corrmatch":
            # CorrMatch's configs: output stride 8, ASPP 12/24/36; Cityscapes OHEM at least 100000 per 2 images
            assert cfg.method.name == "corrmatch" and cfg.model.output_stride == 8, f
            assert cfg.model.aspp_rates == (12, 24, 36) and cfg.optim.weight_decay == 1e-4, f
            if dataset == "cityscapes":
                assert cfg.method.ohem_min_kept == 100000 and lr == 0.005 and cfg.optim.head_lr_mult == 1.0, f
            else:
                assert lr == 0.001 and cfg.optim.head_lr_mult == 10.0 and crop in (321, 513), f
        elif kind == "maskmatch":
            # the paper: 16 labeled + 16 unlabeled, weight decay 5e-4, crops 513 / 769, lr 0.001 / 0.01
            assert cfg.method.name == "maskmatch" and cfg.method.tau == 0.90, f
            assert cfg.data.batch_size == 16 and cfg.data.unlabeled_batch_size == 16, f
            assert cfg.optim.weight_decay == 5e-4, f
            assert (crop, lr) == ((769, 0.01) if dataset == "cityscapes" else (513, 0.001)), f
        elif kind == "unimatch":
            # UniMatch's Cityscapes config: conf_thresh 0, OHEM 200000 per 2 images, stride 16
            assert dataset == "cityscapes" and cfg.method.name == "unimatch" and cfg.method.tau == 0.0, f
            assert cfg.method.ohem_min_kept == 200000 and lr == 0.005 and cfg.model.output_stride == 16, f
        else:
            raise AssertionError(f"unexpected protocol folder {f.parent}")
    # CorrMatch: classic 5 + blender 3 x 2 crops + U2PL 3 + Cityscapes 4; MaskMatch: 5 + 3 + 3 + 4;
    # UniMatch's Cityscapes: 1/30 .. 1/2
    assert by_kind["corrmatch"] == 18 and by_kind["maskmatch"] == 15 and by_kind["unimatch"] == 5
    assert by_kind["generic"] >= 35


# ---------------------------------------------------------------- one validation style: declarations on the fields


def test_choices_are_declared_once_and_match_the_implementations():
    import typing

    from workbench import registry
    from workbench.config import field_rules
    from workbench.methods.components import LCR_REGIONS
    from workbench.methods.corrmatch import FEATURE_POSITIONS
    from workbench.methods.rankmatch import AGENT_CHOICES, CONSISTENCY_CHOICES
    from workbench.methods.scalematch import FUSIONS, SCALE_SAMPLING, STRUCTURES
    from workbench.ops.losses import NORMS
    from workbench.ops.masking import MASK_STRATEGIES
    from workbench.ops.ranking import GUARDS

    implemented = {"lcr_strategy": MASK_STRATEGIES, "mask_strategy": MASK_STRATEGIES, "lcr_region": LCR_REGIONS,
                   "loss_norm": NORMS, "feature": FEATURE_POSITIONS, "agents": AGENT_CHOICES,
                   "consistency": CONSISTENCY_CHOICES, "rank_guard": GUARDS, "structure": STRUCTURES,
                   "scale_sampling": SCALE_SAMPLING, "fusion": FUSIONS}
    seen = set()
    for name in registry.method_names():
        cls = registry.method_config(name)
        for field_name, (choices, _) in field_rules(cls).items():
            if field_name in implemented:
                assert set(choices) == set(implemented[field_name]), (name, field_name)
                seen.add(field_name)
        # the one style: no method config validates in its own __post_init__ (cross-field relations go through
        # cross_checks, everything else is a field declaration)
        assert all("__post_init__" not in vars(k) for k in cls.__mro__ if k is not MethodConfig
                   and issubclass(k, MethodConfig)), name
    assert seen == set(implemented)
    assert typing.get_args(typing.get_type_hints(MethodConfig)["name"]) == ()  # a plain str: any registered name


def test_field_declarations_are_enforced_everywhere():
    from workbench.methods.maskmatch import MaskMatchConfig
    from workbench.methods.scalematch import ScaleMatchConfig

    # a redeclared default keeps the base's bounds (MaskMatch redeclares tau, lcr_weight and loss_norm)
    with pytest.raises(ConfigError, match=r"method\.tau: must be >= 0 and <= 1 \(got 1\.5\)"):
        MaskMatchConfig(tau=1.5)
    with pytest.raises(ConfigError, match=r"method\.loss_norm: must be one of batch_valid, image_confident"):
        MaskMatchConfig(loss_norm="sum")
    with pytest.raises(ConfigError, match=r"method\.scales: must include 1\.0"):
        MaskMatchConfig(scales=(0.5, 2.0))
    with pytest.raises(ConfigError, match=r"method\.scales: must be > 0 \(got \[0\.5, -1\.0\]\)"):
        ScaleMatchConfig(scales=[0.5, -1.0])  # every number of a tuple, lists turned into tuples
    assert ScaleMatchConfig(scales=[0.5]).scales == (0.5,)
    with pytest.raises(ConfigError, match=r"method\.cif_chunk: must be >= 2"):
        ScaleMatchConfig(cif_chunk=1)
    # sections: choices from YAML (off read as a boolean), bounds, None passes an optional bounded field
    assert config_from_dict({"optim": {"amp": False}}).optim.amp == "off"
    with pytest.raises(ConfigError, match=r"model\.output_stride: must be one of 8, 16, 32 \(got 12\)"):
        config_from_dict({"model": {"output_stride": 12}})
    with pytest.raises(ConfigError, match=r"optim\.momentum: must be >= 0 and < 1 \(got 1\.0\)"):
        config_from_dict({"optim": {"momentum": 1.0}})
    with pytest.raises(ConfigError, match=r"data\.std: must be > 0"):
        config_from_dict({"data": {"std": [0.2, 0.0, 0.2]}})
    assert config_from_dict({"eval": {"window": None}}).eval.window is None
