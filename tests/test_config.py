import textwrap

import pytest

from viq_megatron.config import ConfigError, load_config
from conftest import ROOT


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_example_configs_load():
    tiny = load_config(ROOT / "examples/encoder_tiny_cpu.yaml")
    assert tiny.parallel.tensor_model_parallel_size == 2
    gpu = load_config(ROOT / "examples/encoder_so400m_gpu.yaml")
    enc = gpu.model.encoder
    assert (enc.hidden_size, enc.num_layers, enc.num_attention_heads, enc.ffn_hidden_size, enc.patch_size) == \
        (1152, 27, 16, 4304, 16)


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_is_valid(path):
    load_config(path)  # raises a ConfigError on any unknown key, wrong type or impossible value


def test_yaml_values_and_overrides(tmp_path):
    path = write(tmp_path, """
        model: {encoder: {hidden_size: 96, num_attention_heads: 4}}
        data: {image: {mean: [0.1, 0.2, 0.3]}}
        """)
    cfg = load_config(path, ["model.encoder.num_layers=3", "data.image.max_aspect_ratio=10", "seed=7"])
    assert cfg.model.encoder.hidden_size == 96
    assert cfg.model.encoder.num_layers == 3
    assert cfg.data.image.max_aspect_ratio == 10.0 and isinstance(cfg.data.image.max_aspect_ratio, float)
    assert cfg.data.image.mean == [0.1, 0.2, 0.3]
    assert cfg.seed == 7
    assert cfg.model.encoder.ffn_hidden_size == 4304  # untouched default


def test_unknown_key_names_file_and_key(tmp_path):
    path = write(tmp_path, "model:\n  encoder:\n    hiden_size: 8\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = one_line_error(e)
    assert str(path) in message and "model.encoder.hiden_size" in message and "unknown key" in message


def test_wrong_type_names_file_and_key(tmp_path):
    path = write(tmp_path, "parallel:\n  tensor_model_parallel_size: two\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = one_line_error(e)
    assert str(path) in message and "parallel.tensor_model_parallel_size" in message and "expected int" in message


def test_bool_is_not_an_int(tmp_path):
    with pytest.raises(ConfigError, match="seed: expected int"):
        load_config(write(tmp_path, "seed: true\n"))


def test_bad_value_and_cross_field_checks(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.encoder\.hidden_size: 100 is not divisible"):
        load_config(write(tmp_path, "model: {encoder: {hidden_size: 100, num_attention_heads: 16}}\n"))
    with pytest.raises(ConfigError, match=r"data\.tokens_per_pack: 100 cannot hold the largest image"):
        load_config(None, ["data.tokens_per_pack=100"])
    with pytest.raises(ConfigError, match=r"model\.transformer_impl: 'fast' is not one of"):
        load_config(None, ["model.transformer_impl=fast"])


def test_override_errors_blame_the_command_line(tmp_path):
    path = write(tmp_path, "seed: 3\n")
    with pytest.raises(ConfigError, match=r"^command line: model\.encoder\.depth: unknown key"):
        load_config(path, ["model.encoder.depth=3"])
    with pytest.raises(ConfigError, match=r"^command line: data\.image\.min_pixels: expected int"):
        load_config(path, ["data.image.min_pixels=big"])
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(path, ["seed"])


def test_override_can_fix_a_file_value(tmp_path):
    path = write(tmp_path, "data: {tokens_per_pack: 10}\n")
    assert load_config(path, ["data.tokens_per_pack=4096"]).data.tokens_per_pack == 4096
    with pytest.raises(ConfigError, match=rf"^{path}: data\.tokens_per_pack"):
        load_config(path)


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_yaml_is_loaded_safely(tmp_path):
    path = write(tmp_path, "seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)
