import textwrap

import pytest
from conftest import ROOT

from viq_megatron.config import ConfigError, load_config


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
    assert (enc.hidden_size, enc.num_layers, enc.num_attention_heads, enc.ffn_hidden_size, enc.patch_size) == (
        1152,
        27,
        16,
        4304,
        16,
    )


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_is_valid(path):
    load_config(path)  # raises a ConfigError on any unknown key, wrong type or impossible value


def test_yaml_values_and_overrides(tmp_path):
    path = write(
        tmp_path,
        """
        model: {encoder: {hidden_size: 96, num_attention_heads: 4}}
        data: {image: {mean: [0.1, 0.2, 0.3]}}
        """,
    )
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


def test_whole_file_errors_are_one_line_naming_the_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("seed: 3  # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert one_line_error(e) == f"{path}: not UTF-8 text (byte 0xe9 at offset 14)"
    deep = write(tmp_path, "train: " + "[" * 20000 + "]" * 20000 + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(deep)
    assert one_line_error(e) == f"{deep}: YAML nested too deeply to read"


def test_a_key_given_twice_is_refused(tmp_path):
    # PyYAML's own loader keeps the second value without a word.
    path = write(
        tmp_path,
        """\
        train:
          steps: 5
          optimizer: {lr: 0.1}
        train:
          steps: 6
        """,
    )
    with pytest.raises(ConfigError, match=rf"^{path}: train: given twice \(line 4\)$"):
        load_config(path)
    with pytest.raises(ConfigError, match="steps: given twice"):
        load_config(write(tmp_path, "train: {steps: 5, steps: 6}\n"))


def test_exponent_floats_without_a_dot_are_floats(tmp_path):
    # YAML 1.1 reads `1e-3` as a string; every float field takes it as the number.
    cfg = load_config(
        write(tmp_path, "train: {optimizer: {lr: 1e-3, min_lr: 2E-5, adam_eps: 1e-8}}\n"),
        ["train.optimizer.weight_decay=5e-2"],
    )
    assert (
        cfg.train.optimizer.lr,
        cfg.train.optimizer.min_lr,
        cfg.train.optimizer.adam_eps,
        cfg.train.optimizer.weight_decay,
    ) == (1e-3, 2e-5, 1e-8, 5e-2)
    with pytest.raises(ConfigError, match="seed: expected int, got float"):
        load_config(None, ["seed=1e3"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.log_every=0", "train.log_every: must be >= 1"),
        ("train.eval_batches=0", "train.eval_batches: must be >= 1"),
        ("data.seq_length=0", "data.seq_length: must be >= 1"),
        ("train.optimizer.lr=-1e-4", "train.optimizer.lr: must be >= 0"),
        ("train.optimizer.lr=.nan", "train.optimizer.lr: nan is not a finite number"),
        ("train.optimizer.lr=.inf", "train.optimizer.lr: inf is not a finite number"),
        ("seed=4294967296", r"seed: 4294967296 is not in \[0, 2\*\*32\)"),
        ("seed=-1", r"seed: -1 is not in \[0, 2\*\*32\)"),
        ("train.output_dir=", "train.output_dir: must name a folder"),
        ("train.output_dir=' '", "train.output_dir: must name a folder"),
        ("model.head={}", None),  # even patch: fine
        ("model.encoder.patch_size=15", None),  # no head: any size
    ],
)
def test_impossible_values_are_refused(override, message):
    if message is None:
        load_config(None, [override, "data.image.max_pixels=4096"])
        return
    with pytest.raises(ConfigError, match=rf"^command line: {message}"):
        load_config(None, [override])


def test_patch_sizes_that_break_the_2x2_layout_are_refused():
    with pytest.raises(ConfigError, match=r"model\.encoder\.patch_size: 15 cannot be cut into the head's 2x2"):
        load_config(None, ["model.encoder.patch_size=15", "model.head={}", "data.image.max_pixels=4096"])
    with pytest.raises(ConfigError, match=r"model\.encoder\.patch_size: 14: the pixel decoder draws 8x8"):
        load_config(
            None, ["model.encoder.patch_size=14", "model.head={}", "model.decoder={}", "data.image.max_pixels=4096"]
        )


def test_a_tokenizer_larger_than_the_vocabulary_is_refused():
    arch = (
        "model.llm.arch={hidden_size: 64, num_layers: 2, num_attention_heads: 4, num_query_groups: 2, "
        "ffn_hidden_size: 128, vocab_size: 300}"
    )
    with pytest.raises(ConfigError, match=r"sentencepiece_vocab_size: 512 pieces do not fit .*vocab_size=300"):
        load_config(None, [arch, "model.llm.tokenizer.kind=sentencepiece"])


def test_stage_requirements_are_config_errors():
    """Each stage checks what it needs of the config (training/stages/)."""
    from viq_megatron.training.stages import stage_for

    with pytest.raises(ConfigError, match=r"model\.head: missing \(train\.stage stage2"):
        stage_for(load_config(None, ["train.stage=stage2"]))
    with pytest.raises(ConfigError, match=r"model\.viq_tokenizer: missing"):
        stage_for(load_config(None, ["train.stage=discrete"]))
    with pytest.raises(ConfigError, match=r"train\.stage: 'stage3' is not one of 'encoder_pretrain', 'stage1'"):
        stage_for(load_config(None, ["train.stage=stage3"]))
    pretrain = ROOT / "examples/encoder_pretrain_tiny_cpu.yaml"
    assert stage_for(load_config(pretrain)).name == "encoder_pretrain"
    with pytest.raises(ConfigError, match=r"train\.freeze: encoder pretraining trains every part"):
        stage_for(load_config(pretrain, ["train.freeze=[llm]"]))
    with pytest.raises(ConfigError, match=r"model\.llm\.arch: the captioning decoder learns from scratch"):
        stage_for(load_config(None, ["train.stage=encoder_pretrain", "train.freeze=[]"]))
