"""Configuration: defaults, YAML, overrides, validation messages, round trip."""

from __future__ import annotations

import dataclasses

import pytest

from mt.config import (Config, ConfigError, ModelConfig, TrainConfig, config_from_dict, load_config,
                       parse_override, save_config)


def test_defaults_build():
    cfg = Config()
    assert cfg.model.d_model == 512 and cfg.model.n_heads == 8 and cfg.model.norm == "pre"
    assert cfg.train.betas == (0.9, 0.98) and cfg.train.schedule == "inverse_sqrt"
    assert cfg.data.src_lang == "de" and not cfg.data.train
    assert load_config() == cfg
    assert config_from_dict({}) == cfg


def test_yaml_file_loads_and_keeps_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "data:\n  train: {src: a.de, tgt: a.en}\n  max_len: 50\n"
        "model:\n  d_model: 256\n  n_heads: 4\n  norm: post\n"
        "train:\n  betas: [0.9, 0.997]\n  lr: 0.001\n  warmup_steps: 10\n"
        "decode:\n", encoding="utf-8")
    cfg = load_config(path)
    assert cfg.data.train[0].src == "a.de" and cfg.data.train[0].tgt == "a.en" and cfg.data.max_len == 50
    assert (cfg.model.d_model, cfg.model.n_heads, cfg.model.norm) == (256, 4, "post")
    assert cfg.model.ffn_dim == 2048  # default kept
    assert cfg.train.betas == (0.9, 0.997) and isinstance(cfg.train.betas, tuple)
    assert cfg.train.lr == 0.001 and cfg.train.warmup_steps == 10
    assert cfg.decode == Config().decode


def test_repository_configs_load(repo_root):
    tiny = load_config(repo_root / "configs" / "tiny.yaml")
    assert tiny.model.d_model == 64 and tiny.train.max_steps == 120 and tiny.train.lr == 3e-3
    load_config(repo_root / "configs" / "multi30k_de_en.yaml")
    base = load_config(repo_root / "configs" / "wmt14_en_de_base.yaml")  # transformer base: the paper's shape
    assert (base.model.d_model, base.model.n_heads, base.model.ffn_dim, base.model.encoder_layers) == (512, 8, 2048, 6)
    assert base.data.train[0].hub == "wmt14" and base.tokenizer.vocab_size == 32000 and base.train.betas == (0.9, 0.98)


def test_overrides_are_applied_with_types():
    cfg = load_config(None, ["train.max_steps=100", "model.d_model=128", "train.lr=0.002",
                             "model.share_embeddings=false", "data.train.src=x.de", "data.train.tgt=x.en",
                             "train.betas=[0.8, 0.9]", "train.run_dir=runs/x"])
    assert cfg.train.max_steps == 100 and type(cfg.train.max_steps) is int
    assert cfg.model.d_model == 128 and type(cfg.model.d_model) is int
    assert cfg.train.lr == 0.002 and type(cfg.train.lr) is float
    assert cfg.model.share_embeddings is False
    assert cfg.data.train[0].src == "x.de" and cfg.data.train[0].tgt == "x.en"
    assert cfg.train.betas == (0.8, 0.9)
    assert cfg.train.run_dir == "runs/x"
    # an integer where a float is expected becomes a float; a number where a string is expected, a string
    cfg = load_config(None, ["train.lr=1", "data.src_lang=12"])
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float
    assert cfg.data.src_lang == "12"


def test_overrides_win_over_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {max_steps: 5, lr: 0.01}\n", encoding="utf-8")
    cfg = load_config(path, ["train.max_steps=7"])
    assert cfg.train.max_steps == 7 and cfg.train.lr == 0.01


def test_float_override_in_exponent_notation():
    """`train.lr=1e-3` is how people write learning rates; PyYAML reads it as a string."""
    try:
        cfg = load_config(None, ["train.lr=1e-3", "train.adam_eps=1e-9"])
    except ConfigError as e:
        pytest.fail(f"train.lr=1e-3 rejected: {e}")
    assert cfg.train.lr == 1e-3 and cfg.train.adam_eps == 1e-9


def test_parse_override():
    assert parse_override("train.max_steps=100") == (["train", "max_steps"], 100)
    assert parse_override("data.train.src=a=b.txt") == (["data", "train", "src"], "a=b.txt")
    assert parse_override("train.run_dir=") == (["train", "run_dir"], "")
    for bad in ("train.max_steps", "=3"):
        with pytest.raises(ConfigError, match="expected section.key=value"):
            parse_override(bad)


def test_unknown_key_is_named_with_valid_keys():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.foo=1"])
    message = str(info.value)
    assert "'model.foo'" in message
    for key in (f.name for f in dataclasses.fields(ModelConfig)):
        assert key in message


def test_unknown_key_in_file_names_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_step: 10\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"{path}: unknown key 'train.max_step'.*max_steps"):
        load_config(path)


def test_unknown_section():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["foo.bar=1"])
    message = str(info.value)
    assert "'foo'" in message
    for section in ("data", "tokenizer", "model", "train", "decode"):
        assert section in message


def test_scalar_where_a_section_is_expected():
    with pytest.raises(ConfigError, match="model: expected a mapping"):
        config_from_dict({"model": 3})
    with pytest.raises(ConfigError, match="not a section"):
        load_config(None, ["model=3", "model.d_model=4"])


@pytest.mark.parametrize("override,fragment", [
    ("model.d_model=abc", "model.d_model: expected an integer, got 'abc'"),
    ("model.d_model=1.5", "model.d_model: expected an integer"),
    ("model.d_model=true", "model.d_model: expected an integer"),
    ("model.share_embeddings=1", "model.share_embeddings: expected true or false"),
    ("train.lr=fast", "train.lr: expected a number"),
    ("train.betas=0.9", "train.betas: expected a list"),
    ("data.src_lang=[a]", "data.src_lang: expected a string"),
])
def test_wrong_type_is_named(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert fragment in str(info.value)


def test_betas_must_be_two_numbers():
    with pytest.raises(ConfigError, match="train.betas"):
        load_config(None, ["train.betas=[0.9]"])
    with pytest.raises(ConfigError, match="train.betas"):
        load_config(None, ["train.betas=[0.9, 0.98, 0.5]"])


@pytest.mark.parametrize("override,choices", [
    ("train.precision=fp8", ["fp32", "bf16", "fp16"]),
    ("model.norm=middle", ["pre", "post"]),
    ("train.schedule=step", ["inverse_sqrt", "cosine", "linear", "constant"]),
    ("tokenizer.type=wordpiece", ["unigram", "bpe"]),
])
def test_invalid_choice_lists_choices(override, choices):
    key, _, value = override.partition("=")
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert key in message and repr(value) in message
    for choice in choices:
        assert choice in message


def test_d_model_must_be_divisible_by_heads():
    with pytest.raises(ConfigError, match=r"model.d_model \(100\) must be divisible by model.n_heads \(8\)"):
        load_config(None, ["model.d_model=100"])
    with pytest.raises(ConfigError, match="divisible"):
        ModelConfig(d_model=64, n_heads=3)


@pytest.mark.parametrize("override,fragment", [
    ("train.max_steps=-1", "train.max_steps"),
    ("model.dropout=1.0", "model.dropout"),
    ("data.max_len=0", "data.max_len"),
    ("data.tgt_lang=de", "both 'de'"),
    ("train.schedule=cosine", "set train.max_steps or train.max_time"),
    ("train.average_last=6", r"train.average_last \(6\) exceeds train.keep_checkpoints \(5\)"),
    ("data.max_len=5000", "exceeds train.max_tokens"),
    ("train.device=tpu", "train.device"),
    ("data.train.src=only.de", "src and tgt must be given together"),
])
def test_other_validation(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [override])


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  max_steps: 3\n  lr: [1,\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"{path}:\d+: invalid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_save_then_load_round_trips(tmp_path):
    cfg = load_config(None, ["train.max_steps=100", "model.d_model=128", "model.norm=post",
                             "train.betas=[0.85, 0.995]", "data.train.src=a b.de", "data.train.tgt=a b.en",
                             "data.valid.path=v.tsv", "tokenizer.joint=false", "train.run_dir=runs/rt",
                             "data.src_lang=en", "data.tgt_lang=de", "train.lr=0.0005"])
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    assert not (tmp_path / "config.yaml.tmp").exists()
    again = load_config(path)
    assert again == cfg
    assert isinstance(again.train.betas, tuple)
    assert again.to_dict() == cfg.to_dict()
    # the saved file is complete: every key of every section is written out
    assert set(again.to_dict()["train"]) == {f.name for f in dataclasses.fields(TrainConfig)}


@pytest.mark.parametrize("text, seconds", [("", 0.0), ("90", 90.0), ("45s", 45.0), ("30m", 1800.0),
                                           ("1.5h", 5400.0), ("1d", 86400.0)])
def test_parse_duration(text, seconds):
    from mt.config import parse_duration

    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["abc", "10x", "-5m", "0", "nan", "inf"])
def test_bad_max_time_is_a_config_error(text):
    with pytest.raises(ConfigError, match="train.max_time"):
        load_config(None, [f"train.max_time={text}"])


def test_override_into_an_empty_yaml_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\ntrain:\n  max_steps: 5\n")
    cfg = load_config(path, ["model.d_model=64", "model.n_heads=4"])
    assert cfg.model.d_model == 64 and cfg.train.max_steps == 5


@pytest.mark.parametrize("override, message", [
    ("train.lr=1e309", "train.lr: must be a finite number, got '1e309'"),
    ("data.max_ratio=.nan", "data.max_ratio: must be a finite number, got nan"),
    ("decode.max_len_a=1e309", "decode.max_len_a: must be a finite number"),
    ("decode.lenpen=-.inf", "decode.lenpen: must be a finite number"),
    ("train.adam_eps=-1", "train.adam_eps: must be > 0, got -1.0"),
    ("train.seed=-1", "train.seed: must be >= 0, got -1"),
    ("train.betas=[0.9, 1.0]", r"train.betas: must be two numbers in \[0, 1\), got \[0.9, 1.0\]"),
    ("train.optimizer=sgd", "train.optimizer: 'sgd' is not one of adam, adamw"),
    ("decode.dtype=int4", "decode.dtype: 'int4' is not one of auto, fp32, bf16, int8"),
])
def test_bad_values_give_one_error_line_before_any_data_is_read(tmp_path, override, message):
    import re

    from typer.testing import CliRunner

    from mt.cli import app

    config = tmp_path / "c.yaml"  # its corpus does not exist: reading data would fail differently
    config.write_text("data:\n  train: {src: nowhere.de, tgt: nowhere.en}\ntrain:\n  max_steps: 5\n")
    result = CliRunner().invoke(app, ["train", str(config), "-o", str(tmp_path / "run"), override])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mt: error: ") and re.search(message, lines[0]), lines
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError):  # the same check when the dataclasses are built from Python
        load_config(None, [override])


def test_every_config_field_has_a_docstring_and_decoding_help_uses_them():
    from typer.testing import CliRunner

    from mt import config
    from mt.cli import app

    for cls in (config.CorpusConfig, config.DataConfig, config.TokenizerConfig, config.ModelConfig,
                config.TrainConfig, config.DecodeConfig, config.Config):
        docs = config.field_docs(cls)
        assert [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)] == [], cls.__name__
    with pytest.raises(ConfigError, match="model.n_heads: must be > 0"):
        ModelConfig(n_heads=0)
    with pytest.raises(ConfigError, match="model.dropout: must be a finite number"):
        ModelConfig(dropout=float("nan"))
    text = " ".join(CliRunner().invoke(app, ["translate", "--help"], env={"COLUMNS": "400"}).output.split())
    assert config.field_docs(config.DecodeConfig)["beam"] in text
    assert config.field_docs(config.DecodeConfig)["min_len"] in text
