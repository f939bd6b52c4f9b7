"""Reliability: SIGKILL then --resume reproduces the run step by step, SIGINT saves, checkpoints are
atomic and loaded safely (a code-running pickle is refused, a truncated file is named and skipped),
bad input gives one-line errors, non-finite updates are skipped, translation keeps line counts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mt import checkpoint as ckpt
from mt.cli import app
from mt.config import config_from_dict, load_config, save_config
from mt.data import CorpusError, _read_text_pair, read_lines
from mt.model import Transformer
from mt.tokenizer import Tokenizer, TokenizerError, train_sentencepiece
from mt.train import TrainingError, train

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def small_corpus(tmp: Path, multi30k_head, n: int = 200) -> dict:
    for lang in ("de", "en"):
        (tmp / f"train.{lang}").write_text("\n".join(multi30k_head("train", lang, n)) + "\n", encoding="utf-8")
        (tmp / f"val.{lang}").write_text("\n".join(multi30k_head("val", lang, 40)) + "\n", encoding="utf-8")
    return {"train": {"src": str(tmp / "train.de"), "tgt": str(tmp / "train.en")},
            "valid": {"src": str(tmp / "val.de"), "tgt": str(tmp / "val.en")},
            "max_len": 64, "cache_dir": str(tmp / "cache")}


def config_file(tmp: Path, multi30k_head, spm_model: Path, **train_keys) -> Path:
    cfg = config_from_dict({
        "data": small_corpus(tmp, multi30k_head),
        "tokenizer": {"src_model": str(spm_model)},
        "model": {"d_model": 32, "n_heads": 2, "ffn_dim": 64, "encoder_layers": 1, "decoder_layers": 1,
                  "dropout": 0.1, "max_positions": 128},
        "train": {"max_tokens": 512, "lr": 2e-3, "warmup_steps": 5, "log_every": 1, "num_threads": 1,
                  "keep_checkpoints": 10, **train_keys},
    })
    path = tmp / "config.yaml"
    save_config(cfg, path)
    return path


def mt_cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "mt", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    start = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training ended before {path} appeared: {proc.stderr.read()}")
        if time.time() - start > timeout:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout}s")
        time.sleep(0.02)


def train_losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = {}
    for r in rows:
        if r["kind"] == "train":
            assert r["step"] not in losses, f"step {r['step']} logged twice"
            losses[r["step"]] = r["loss"]
    return losses


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_losses_step_by_step(tmp_path, multi30k_head, spm_model):
    config = config_file(tmp_path, multi30k_head, spm_model, max_steps=60, valid_every=10)
    full = mt_cli("train", str(config), "-o", str(tmp_path / "full"), "-q")
    assert full.wait(timeout=300) == 0, full.stderr.read()

    killed = mt_cli("train", str(config), "-o", str(tmp_path / "killed"), "-q")
    wait_for(tmp_path / "killed" / "checkpoints" / "last.pt", killed)  # written after step_00000010.pt
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert killed.returncode == -signal.SIGKILL
    last = ckpt.load(tmp_path / "killed" / "checkpoints" / "last.pt")
    assert 10 <= last["trainer"]["step"] < 60  # killed mid-run, after a checkpoint

    resumed = mt_cli("train", "-o", str(tmp_path / "killed"), "--resume", "-q")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    expected, got = train_losses(tmp_path / "full"), train_losses(tmp_path / "killed")
    assert sorted(got) == sorted(expected) == list(range(1, 61))
    assert [got[s] for s in range(1, 61)] == [expected[s] for s in range(1, 61)]  # bit-exact
    a = ckpt.load(tmp_path / "full" / "checkpoints" / "last.pt")["model"]
    b = ckpt.load(tmp_path / "killed" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_and_exits_nonzero(tmp_path, multi30k_head, spm_model):
    config = config_file(tmp_path, multi30k_head, spm_model, max_steps=100000, valid_every=5)
    proc = mt_cli("train", str(config), "-o", str(tmp_path / "run"), "-q")
    wait_for(tmp_path / "run" / "checkpoints" / "step_00000005.pt", proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 128 + signal.SIGINT
    stderr = proc.stderr.read()
    assert "interrupted by SIGINT" in stderr and "--resume" in stderr and "Traceback" not in stderr
    state = ckpt.load(tmp_path / "run" / "checkpoints" / "last.pt")
    logged = max(train_losses(tmp_path / "run"))
    assert state["trainer"]["step"] == logged  # the state of the last finished update was saved


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "PWNED"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.pt"
    torch.save({"format": "mt", "version": 1, "model": {}, "payload": Exploit()}, bad)
    with pytest.raises(ckpt.CheckpointError, match="evil.pt.*refused"):
        ckpt.load(bad)
    assert not marker.exists()


def test_truncated_or_foreign_checkpoints_are_named(tmp_path):
    good = ckpt.atomic_save({"format": "mt", "version": 1, "model": {"w": torch.ones(1000)}}, tmp_path / "a.pt")
    data = good.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match=r"cut\.pt: not a readable mt checkpoint"):
        ckpt.load(tmp_path / "cut.pt")
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"other\.pt: not an mt checkpoint"):
        ckpt.load(tmp_path / "other.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ckpt.CheckpointError, match=r"text\.pt"):
        ckpt.load(tmp_path / "text.pt")
    assert torch.equal(ckpt.load(good)["model"]["w"], torch.ones(1000))


def test_atomic_save_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = ckpt.atomic_save({"format": "mt", "version": 1, "model": {"w": torch.zeros(3)}}, tmp_path / "x.pt")

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        ckpt.atomic_save({"format": "mt", "version": 1, "model": {"w": torch.ones(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(ckpt.load(path)["model"]["w"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]  # no temporary file left behind


def test_resume_falls_back_to_the_newest_readable_checkpoint(tmp_path, multi30k_head, spm_model, caplog):
    config = config_file(tmp_path, multi30k_head, spm_model, max_steps=20, valid_every=5)
    cfg = load_config(config)
    cfg.train.run_dir = str(tmp_path / "run")
    train(cfg, log=lambda _: None, progress=False)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    for name in ("last.pt", "step_00000020.pt"):
        data = (ckpt_dir / name).read_bytes()
        (ckpt_dir / name).write_bytes(data[: len(data) // 3])
    messages = []
    cfg.train.max_steps = 25
    result = train(cfg, resume=True, log=messages.append, progress=False)
    assert any("last.pt: not a readable mt checkpoint" in m for m in messages)
    assert any("falling back to" in m and "step_00000015.pt" in m for m in messages)
    assert any("resumed from" in m and "at step 15" in m for m in messages)
    assert result.step == 25
    assert sorted(train_losses(tmp_path / "run")) == list(range(1, 26))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_non_finite_updates_are_skipped_then_training_stops(tmp_path, multi30k_head, spm_model, monkeypatch, precision):
    import mt.train as train_module

    config = config_file(tmp_path, multi30k_head, spm_model, max_steps=30, valid_every=100)
    cfg = load_config(config, [f"train.precision={precision}"])
    cfg.train.run_dir = str(tmp_path / "run")
    real = train_module.batch_loss
    calls = {"n": 0}

    def sometimes_nan(model, batch, epsilon):
        calls["n"] += 1
        loss, nll = real(model, batch, epsilon)
        if calls["n"] in (3, 4) or calls["n"] >= 10:
            return loss * float("nan"), nll
        return loss, nll

    monkeypatch.setattr(train_module, "batch_loss", sometimes_nan)
    messages = []
    with pytest.raises(TrainingError, match="5 non-finite updates in a row"):
        train(cfg, log=messages.append, progress=False)
    skipped = [m.split(":")[0] for m in messages if "update skipped" in m]
    assert skipped == ["step 3", "step 4", "step 10", "step 11", "step 12", "step 13", "step 14"]


def test_disk_space_and_unwritable_run_dir_fail_at_start(tmp_path, multi30k_head, spm_model, monkeypatch):
    import shutil

    import mt.run
    from mt.run import RunError

    config = config_file(tmp_path, multi30k_head, spm_model, max_steps=5, valid_every=5)
    cfg = load_config(config)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cfg.train.run_dir = str(blocker / "run")
    with pytest.raises(RunError, match="a_file/run: run directory is not writable"):
        train(cfg, log=lambda _: None, progress=False)

    cfg.train.run_dir = str(tmp_path / "run")
    monkeypatch.setattr(mt.run.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(RunError, match="MiB free on disk"):
        train(cfg, log=lambda _: None, progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_training_input_gives_one_line_errors(tmp_path, multi30k_head, spm_model):
    config = config_file(tmp_path, multi30k_head, spm_model, max_steps=2)
    (tmp_path / "bad.de").write_bytes(b"ein Hund\nzwei \xff Katzen\n")
    (tmp_path / "bad.en").write_bytes(b"a dog\ntwo cats\n")
    (tmp_path / "empty.de").write_text("\n\n  \n")
    (tmp_path / "empty.en").write_text("a\nb\nc\n")
    cases = [
        (["data.train.src=" + str(tmp_path / "bad.de"), "data.train.tgt=" + str(tmp_path / "bad.en")],
         "bad.de:2: invalid UTF-8"),
        (["data.train.src=" + str(tmp_path / "missing.de")], "missing.de: cannot open"),
        (["data.train.src=" + str(tmp_path / "empty.de"), "data.train.tgt=" + str(tmp_path / "empty.en")],
         "no pairs left after cleaning"),
        (["tokenizer.src_model=", "tokenizer.vocab_size=60000"], "set tokenizer.vocab_size <="),
        (["train.precision=fp8"], "train.precision: 'fp8' is not one of fp32, bf16, fp16"),
    ]
    for i, (overrides, message) in enumerate(cases):
        result = runner.invoke(app, ["train", str(config), "-o", str(tmp_path / f"run{i}"), "-q", *overrides])
        assert result.exit_code == 1, (overrides, result.output)
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith("mt: error: ") and message in lines[-1], (message, result.stderr)
        assert "Traceback" not in result.output


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    from mt import cli

    monkeypatch.setitem(cli._state, "debug", False)
    result = runner.invoke(app, ["--debug", "translate", "-m", str(tmp_path / "nowhere")], input="x\n")
    assert result.exit_code != 0
    assert isinstance(result.exception, ckpt.CheckpointError)


def test_vocabulary_too_large_names_the_limit(tmp_path):
    with pytest.raises(TokenizerError, match=r"vocab_size=5000 .* set tokenizer.vocab_size <= \d+"):
        train_sentencepiece(["ein Hund", "zwei Katzen", "a dog"] * 10, tmp_path / "x.model", vocab_size=5000)


# --------------------------------------------------------------------------------------------------
# Property-based: arbitrary bytes and Unicode


def expected_lines(data: bytes) -> int:
    return data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(src=st.binary(max_size=300), tgt=st.binary(max_size=300))
def test_corpus_reader_never_crashes_and_never_shifts_pairs(tmp_path, src, tgt):
    (tmp_path / "s").write_bytes(src)
    (tmp_path / "t").write_bytes(tgt)
    try:
        pairs = list(_read_text_pair(str(tmp_path / "s"), str(tmp_path / "t")))
    except CorpusError as e:
        message = str(e)
        assert ("invalid UTF-8" in message and ("/s:" in message or "/t:" in message)) or \
            (f"has {expected_lines(src)} lines" in message and f"has {expected_lines(tgt)}" in message)
        return
    assert len(pairs) == expected_lines(src) == expected_lines(tgt)
    for pair, s_raw, t_raw in zip(pairs, src.split(b"\n"), tgt.split(b"\n")):
        assert pair[0] == s_raw.decode("utf-8").rstrip("\r").strip()
        assert pair[1] == t_raw.decode("utf-8").rstrip("\r").strip()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_corpus_reader_splits_unicode_on_newline_only(tmp_path, text):
    path = tmp_path / "u.txt"
    path.write_bytes(text.encode("utf-8"))
    assert len(list(read_lines(path))) == expected_lines(text.encode("utf-8"))


@pytest.fixture(scope="module")
def random_run(tmp_path_factory, spm_model) -> Path:
    """A run directory holding an untrained model: enough to exercise `mt translate`."""
    run = tmp_path_factory.mktemp("random_run")
    cfg = config_from_dict({"data": {"max_len": 32}, "model": {"d_model": 16, "n_heads": 2, "ffn_dim": 32, "encoder_layers": 1,
                                      "decoder_layers": 1, "max_positions": 64},
                            "decode": {"beam": 2, "max_len_a": 0.0, "max_len_b": 6}})
    tok = Tokenizer(spm_model)
    tok.save(run / "spm.model")
    torch.manual_seed(0)
    model = Transformer(cfg.model, tok.vocab_size, tok.vocab_size)
    ckpt.atomic_save({"format": "mt", "version": 1, "model": model.state_dict(), "config": cfg.to_dict(),
                      "vocab": {"src": tok.vocab_size, "tgt": tok.vocab_size}}, run / "checkpoints" / "last.pt")
    save_config(cfg, run / "config.yaml")
    return run


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=400),
                      st.lists(st.text(max_size=80), max_size=12).map(lambda ls: "\n".join(ls).encode("utf-8"))))
def test_translate_keeps_the_line_count_for_any_input(random_run, data):
    result = runner.invoke(app, ["translate", "-m", str(random_run)], input=data)
    assert result.exit_code == 0, result.output
    assert result.stdout.count("\n") == expected_lines(data)


def test_translate_truncates_overlong_lines_with_a_warning(random_run):
    line = " ".join(["Hund"] * 500)
    result = runner.invoke(app, ["translate", "-m", str(random_run)], input=f"ein Hund\n{line}\n\n")
    assert result.exit_code == 0
    assert result.stdout.count("\n") == 3
    assert "line 2:" in result.stderr and "truncated to 64" in result.stderr


def test_metrics_rows_torn_by_a_kill_are_dropped_on_resume(tmp_path):
    from mt.run import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3):
        log.write(kind="train", step=step, loss=1.0)
    with open(log.path, "a") as f:
        f.write('{"kind": "train", "st')  # killed mid-write
    log.truncate_after(2)
    rows = [json.loads(line) for line in log.path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


def test_resuming_a_finished_run_changes_nothing(tmp_path, multi30k_head, spm_model):
    config = config_file(tmp_path, multi30k_head, spm_model, max_steps=10, valid_every=5, patience=3)
    cfg = load_config(config)
    cfg.train.run_dir = str(tmp_path / "run")
    train(cfg, log=lambda _: None, progress=False)
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    state = ckpt.load(tmp_path / "run" / "checkpoints" / "last.pt")
    result = train(cfg, resume=True, log=lambda _: None, progress=False)
    assert result.step == 10
    after = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["kind"] for r in after[len(before.splitlines()):]] == ["end"]
    assert ckpt.load(tmp_path / "run" / "checkpoints" / "last.pt")["trainer"] == state["trainer"]
