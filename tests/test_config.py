import pytest

from workbench.config import (ConfigError, apply_overrides, config_from_dict, config_to_dict, dump_config,
                              load_config, parse_override)


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
