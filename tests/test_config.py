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

    assert load(TrainConfig, None, ["classifier.init_from=runs/p"]).classifier.init_from == "runs/p"
    assert load(TrainConfig, None, ["classifier.init_from="]).classifier.init_from == ""


def _config_class(path):
    from mammodg.config import TrainConfig

    return BuildConfig if path.name == "build.yaml" else TrainConfig


def _check_protocol_spec(name, path):
    import yaml

    from mammodg.config import TrainConfig

    spec = yaml.safe_load(path.read_text())
    assert set(spec["tasks"]) <= set(spec["stages"]), name
    for stage, s in spec["stages"].items():
        cfg = load(TrainConfig, s["config"], list(s.get("set", [])) + [f"stage={stage}"])
        assert cfg.stage == stage, (name, stage)


def test_every_shipped_config_loads():
    """Every YAML under configs/ loads into its dataclass (found as package data, not by a repo path)."""
    from mammodg.config import list_shipped_configs, shipped_configs

    names = list_shipped_configs()
    assert {"demo/contrastive.yaml", "msvcl/contrastive.yaml", "periodic_sampling/classifier.yaml"} <= set(names)
    for name in names:
        path = shipped_configs() / name
        if name.startswith("protocol/"):  # a protocol spec (pipelines/msvcl_v2.py): every stage config it runs loads
            _check_protocol_spec(name, path)
            continue
        cfg = load(_config_class(path), name)
        if _config_class(path) is not BuildConfig:
            assert cfg.stage == name.split("/")[1].removesuffix(".yaml"), name


def test_config_by_name_and_missing_name():
    from mammodg.config import TrainConfig, config_path, default_config

    assert config_path("configs/demo/patch.yaml").read_text() == config_path("demo/patch.yaml").read_text()
    assert load(TrainConfig, default_config("contrastive")).stage == "contrastive"
    with pytest.raises(ConfigError, match="nope/x.yaml.*shipped: .*demo/build.yaml"):
        config_path("nope/x.yaml")


@pytest.mark.parametrize("override,allowed", [
    ("strategy=periodical", "'balanced_labels'"), ("contrastive.method=moco", "'msvcl'"),
    ("contrastive.optimizer=lars", "'adamw'")])
def test_choice_fields_name_the_allowed_values(override, allowed):
    from mammodg.config import TrainConfig

    with pytest.raises(ConfigError, match=f"{override.split('=')[0]}: must be one of .*{allowed}"):
        load(TrainConfig, None, [override])
    with pytest.raises(ConfigError, match="preprocess.voi: must be one of \\['auto', 'none', 'always'\\]"):
        load(BuildConfig, None, ["preprocess.voi=sometimes"])


def test_alias_bomb_is_refused_without_expanding(tmp_path):
    """530 bytes of YAML aliases expand to 9**9 values; neither the count nor str() may expand them."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\nseed: *a8\n")
    with pytest.raises(ConfigError, match="alias bomb"):
        load(BuildConfig, bomb)
    with pytest.raises(ConfigError, match="seed: expected int, got a list"):
        load(BuildConfig, None, ["seed=[1, 2]"])


def test_bad_files_and_set_values(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (1 << 20) + "\nseed: 1\n")
    with pytest.raises(ConfigError, match="over the 1048576-byte limit"):
        load(BuildConfig, big)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"# caf\xe9\nseed: 1\n")
    with pytest.raises(ConfigError, match="not UTF-8 \\(byte 5\\)"):
        load(BuildConfig, latin)
    with pytest.raises(ConfigError, match="--set 'segment_keys=\\[source': not a valid YAML value"):
        load(BuildConfig, None, ["segment_keys=[source"])


def test_tensorflow_install_check():
    """No TensorFlow: a clear error naming both extras (unless Keras runs on JAX); both distributions: refused."""
    from mammodg import check_tensorflow

    check_tensorflow(installed=lambda d: d == "tensorflow-cpu", importable=lambda: True, backend="tensorflow")
    with pytest.raises(ImportError, match=r"mammodg\[cpu\].*mammodg\[gpu\]"):
        check_tensorflow(installed=lambda d: False, importable=lambda: False, backend="tensorflow")
    check_tensorflow(installed=lambda d: False, importable=lambda: False, backend="jax")
    with pytest.raises(ImportError, match="both tensorflow and tensorflow-cpu"):
        check_tensorflow(installed=lambda d: True, importable=lambda: True, backend="tensorflow")


def test_wheel_ships_every_config(tmp_path):
    """The configs are package data: a built wheel holds every YAML under configs/ (an installed, non-editable
    package finds them by name, without the source tree)."""
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    from mammodg.config import list_shipped_configs

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(root)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("mammodg-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"mammodg/configs/{n}" for n in list_shipped_configs()} <= names
