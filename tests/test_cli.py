"""The command line, through Typer's test runner (and once as a real subprocess)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mt import cli
from mt.cli import app
from mt.tokenizer import PAD_ID, Tokenizer


@pytest.fixture
def runner(monkeypatch):
    monkeypatch.delenv("MT_DEBUG", raising=False)
    monkeypatch.setitem(cli._state, "debug", False)
    return CliRunner()


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_help_lists_commands(runner):
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    for command in ("train", "tokenizer", "data"):
        assert command in result.stdout
    result = runner.invoke(app, ["tokenizer", "--help"])
    assert result.exit_code == 0 and "train" in result.stdout


def test_train_help_mentions_options(runner):
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0, result.output
    assert "--run-dir" in result.stdout and "--resume" in result.stdout


def test_unknown_config_key_is_one_line_without_traceback(runner, repo_root):
    result = runner.invoke(app, ["train", str(repo_root / "configs" / "tiny.yaml"), "model.foo=1"])
    assert result.exit_code == 1
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mt: error: ") and "model.foo" in lines[0]
    assert "d_model" in lines[0]  # the valid keys are listed
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


def test_train_without_config_is_an_error(runner):
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 1
    assert "give a config file" in result.stderr


def test_tokenizer_train_writes_a_model_with_mt_special_ids(runner, tmp_path, multi30k_head):
    de = write(tmp_path / "a.de", multi30k_head("train", "de", 300))
    en = write(tmp_path / "a.en", multi30k_head("train", "en", 300))
    out = tmp_path / "tok" / "spm.model"
    result = runner.invoke(app, ["tokenizer", "train", str(de), str(en), "-o", str(out), "--vocab-size", "200"])
    assert result.exit_code == 0, result.output
    tok = Tokenizer(out)
    assert tok.vocab_size == 200
    assert tok.sp.pad_id() == PAD_ID == 1
    assert tok.sp.id_to_piece(1) == "<pad>" and tok.sp.id_to_piece(2) == "</s>"
    # both languages went into it
    assert tok.decode(tok.encode(["Ein Mann"]))[0] == "Ein Mann"
    assert tok.decode(tok.encode(["A man"]))[0] == "A man"


def test_tokenizer_train_bad_type_is_a_user_error(runner, tmp_path):
    text = write(tmp_path / "a.txt", ["hello world"] * 10)
    result = runner.invoke(app, ["tokenizer", "train", str(text), "-o", str(tmp_path / "x.model"),
                                 "--type", "wordpiece"])
    assert result.exit_code == 1
    assert "tokenizer.type" in result.stderr and "Traceback" not in result.output


def test_train_on_mismatched_files_names_both(runner, tmp_path):
    src = write(tmp_path / "train.de", ["a", "b", "c", "d", "e"])
    tgt = write(tmp_path / "train.en", ["a", "b", "c"])
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  train: {{src: {src}, tgt: {tgt}}}\ntrain:\n  max_steps: 5\n", encoding="utf-8")
    result = runner.invoke(app, ["train", str(config), f"data.cache_dir={tmp_path / 'cache'}",
                                 "-o", str(tmp_path / "run"), "-q"])
    assert result.exit_code == 1, result.output
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    assert f"{src} has 5 lines" in lines[0] and f"{tgt} has 3" in lines[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize("name", ["2024-01-01", "null"])
def test_run_dir_option_is_taken_literally(runner, tmp_path, monkeypatch, name):
    """`-o NAME` names a directory, whatever YAML would make of NAME."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.yaml").write_text("train: {max_steps: 1}\n", encoding="utf-8")
    result = runner.invoke(app, ["train", "empty.yaml", "-o", name, "-q"])
    # no training corpus is configured, so training stops right after creating the run directory
    assert result.exit_code == 1
    assert "no training corpus configured" in result.stderr, (
        f"-o {name} was parsed as YAML by the train.run_dir override: {result.stderr.strip()}")
    assert (tmp_path / name).is_dir(), (
        f"-o {name} did not create ./{name}: the train.run_dir={name} override was read as YAML "
        f"({name!r} -> None -> ''), so the run would go into the current directory")


@pytest.mark.slow
def test_train_end_to_end(runner, tmp_path, monkeypatch, repo_root, multi30k):
    monkeypatch.chdir(repo_root)
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    result = runner.invoke(app, ["train", "configs/tiny.yaml", "-o", str(run_dir), "train.max_steps=10",
                                 "train.valid_every=5", f"data.cache_dir={cache}", "-q"])
    assert result.exit_code == 0, result.output
    assert f"run directory: {run_dir}" in result.stderr
    for name in ("config.yaml", "spm.model", "metrics.jsonl", "checkpoints/last.pt", "checkpoints/best.pt",
                 "checkpoints/step_00000010.pt"):
        assert (run_dir / name).is_file(), name
    from mt.config import load_config

    saved = load_config(run_dir / "config.yaml")
    assert saved.train.max_steps == 10 and saved.train.run_dir == str(run_dir)
    assert saved.data.cache_dir == str(cache)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "valid"] == [5, 10]
    assert rows[-1]["kind"] == "end" and rows[-1]["step"] == 10
    assert any(cache.iterdir())  # the datasets cache went where it was told
    log = (run_dir / "train.log").read_text().splitlines()  # what training printed, with times
    valid_lines = [line for line in log if re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d step (5|10): valid loss .*", line)]
    assert len(valid_lines) == 2
    assert all(line.split(" ", 2)[2] in result.stderr for line in log)


def test_version(runner):
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout == f"mt {version('mt')}\n"


def test_python_dash_m_mt_help(repo_root):
    proc = subprocess.run([sys.executable, "-m", "mt", "--help"], cwd=repo_root, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "train" in proc.stdout and "tokenizer" in proc.stdout


def test_data_prepare_fills_the_cache_that_training_then_reads(runner, tmp_path, multi30k_head, spm_model, monkeypatch):
    src = write(tmp_path / "train.de", multi30k_head("train", "de", 300))
    tgt = write(tmp_path / "train.en", multi30k_head("train", "en", 300))
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  train: {{src: {src}, tgt: {tgt}}}\n  cache_dir: {tmp_path / 'cache'}\n"
                      "model: {d_model: 16, n_heads: 2, ffn_dim: 32, encoder_layers: 1, decoder_layers: 1}\n"
                      "train: {max_steps: 2, max_tokens: 1024}\n", encoding="utf-8")
    result = runner.invoke(app, ["data", "prepare", str(config), "-q"])
    assert result.exit_code == 1 and error_lines(result) == [
        "mt: error: tokenizer.src_model: mt data prepare needs the tokenizer the runs will use (train one with "
        "mt tokenizer train; separate vocabularies need tgt_model too)"]
    result = runner.invoke(app, ["data", "prepare", str(config), f"tokenizer.src_model={spm_model}", "-q"])
    assert result.exit_code == 0, result.output
    assert "train " in result.stderr and "300 pairs" in result.stderr and "bytes a pair" in result.stderr

    from mt import cache

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("training tokenized the corpus again")

    monkeypatch.setattr(cache, "build", no_tokenizing)
    result = runner.invoke(app, ["train", str(config), f"tokenizer.src_model={spm_model}", "-o", str(tmp_path / "run"),
                                 "-q"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("progress", [True, None])
def test_long_phases_show_progress_only_when_asked_or_on_a_terminal(tmp_path, small_corpus, capsys, progress):
    from mt.config import config_from_dict
    from mt.train import train

    cfg = config_from_dict({
        "data": small_corpus(tmp_path, 300, 20),
        "tokenizer": {"vocab_size": 300},
        "model": {"d_model": 16, "n_heads": 2, "ffn_dim": 32, "encoder_layers": 1, "decoder_layers": 1, "dropout": 0.0},
        "train": {"run_dir": str(tmp_path / "run"), "max_steps": 4, "valid_every": 4, "valid_beam": 1,
                  "warmup_steps": 2, "num_threads": 1},
        "decode": {"beam": 1, "max_len_b": 5, "tune_beam": [1, 2]},
    })
    train(cfg, log=lambda _: None, progress=progress)
    err = capsys.readouterr().err
    phases = ["reading both sides for SentencePiece", "tokenizing", "step", "validation BLEU",
              "choosing decoding defaults on validation"]
    if progress:
        assert all(phase in err for phase in phases), err
    else:  # stderr is not a terminal here: nothing
        assert err == ""
