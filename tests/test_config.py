"""Config loading: YAML + overrides, unknown keys and bad types rejected with the field named."""
import pytest

from mammodg.config import BuildConfig, ConfigError, load, save


def test_repo_configs_load():
    cfg = load(BuildConfig, "configs/demo/build.yaml")
    assert cfg.preprocess.height == 1152 and cfg.segment_keys == ["source", "manufacturer"]


def test_overrides_and_round_trip(tmp_path):
    cfg = load(BuildConfig, None, ["preprocess.height=256", "segment_keys=[source, view]", "preprocess.target_spacing_mm=0.1"])
    assert cfg.preprocess.height == 256 and cfg.segment_keys == ["source", "view"] and cfg.preprocess.target_spacing_mm == 0.1
    save(cfg, tmp_path / "c.yaml")
    assert load(BuildConfig, tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("override,field", [("preprocess.hieght=3", "hieght"), ("workers=many", "workers"), ("keep_cache=perhaps", "keep_cache")])
def test_errors_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        load(BuildConfig, None, [override])


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load(BuildConfig, "nope.yaml")


def test_empty_override_clears_a_string_field():
    from mammodg.config import TrainConfig, load

    assert load(TrainConfig, None, ["init_from=runs/p"]).init_from == "runs/p"
    assert load(TrainConfig, None, ["init_from="]).init_from == ""
