"""The run directory (mt/run.py): mt never replaces or deletes a file it did not write, one training
process at a time holds a run, and resume refuses what would silently change the run."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from mt import checkpoint as ckpt
from mt.cli import app
from mt.config import load_config
from mt.run import Run, RunError, RunLock
from mt.tokenizer import train_sentencepiece
from mt.train import TrainingError, TrainState, train
from test_reliability import config_file, mt_cli, train_losses, wait_for

runner = CliRunner()


def quiet(_: str) -> None:
    pass


def test_a_tokenizer_written_into_the_run_directory_is_used_in_place(tmp_path, multi30k_head, spm_model):
    run = tmp_path / "runs" / "x"
    text = tmp_path / "text.txt"
    text.write_text("\n".join(multi30k_head("train", "de", 1000) + multi30k_head("train", "en", 1000)) + "\n")
    made = runner.invoke(app, ["tokenizer", "train", str(text), "-o", str(run / "spm.model"), "--vocab-size", "300"])
    assert made.exit_code == 0, made.output
    before = (run / "spm.model").read_bytes()
    config = config_file(tmp_path, multi30k_head, spm_model, max_steps=2, valid_every=2)
    result = runner.invoke(app, ["train", str(config), "-o", str(run), "-q", f"tokenizer.src_model={run / 'spm.model'}"])
    assert result.exit_code == 0, result.output
    assert (run / "spm.model").read_bytes() == before  # used where it is, not replaced
    assert "spm.model" not in Run(run).owned()  # and never mt's to delete
    assert ckpt.load(run / "checkpoints" / "last.pt")["trainer"]["step"] == 2


def test_files_mt_did_not_write_are_never_replaced_or_deleted(tmp_path, multi30k_head, spm_model):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("my own notes\n")
    (run / "notes.txt").write_text("keep me\n")
    cfg = load_config(config_file(tmp_path, multi30k_head, spm_model, max_steps=2, valid_every=2))
    cfg.train.run_dir = str(run)
    with pytest.raises(RunError, match=r"run/metrics.jsonl: not written by mt train here"):
        train(cfg, log=quiet, progress=False)
    assert (run / "metrics.jsonl").read_text() == "my own notes\n"
    assert not (run / "config.yaml").exists() and not (run / ".mt-lock").exists()
    (run / "metrics.jsonl").rename(run / "train.log")  # the log and TensorBoard's directory too
    with pytest.raises(RunError, match=r"run/train.log: not written by mt train here"):
        train(cfg, log=quiet, progress=False)
    (run / "train.log").rename(run / "metrics.jsonl")

    # a start that fails after writing files of its own: the next start removes those, and only those
    (run / "metrics.jsonl").unlink()
    cfg.data.valid.src = str(tmp_path / "missing.de")
    cfg.data.valid.tgt = str(tmp_path / "missing.en")
    with pytest.raises(Exception, match="missing.de"):
        train(cfg, log=quiet, progress=False)
    assert (run / "spm.model").exists() and "spm.model" in Run(run).owned()  # copied in before the failure
    assert "train.log" in Run(run).owned()
    with open(run / "train.log", "a") as f:
        f.write("the failed start's line\n")
    cfg = load_config(config_file(tmp_path, multi30k_head, spm_model, max_steps=2, valid_every=2))
    cfg.train.run_dir = str(run)
    train(cfg, log=quiet, progress=False)
    assert "the failed start's line" not in (run / "train.log").read_text()  # its log went with it
    assert (run / "notes.txt").read_text() == "keep me\n"
    assert {"config.yaml", "spm.model", "metrics.jsonl", "checkpoints/last.pt"} <= Run(run).owned()

    # a trained run that lost its last.pt is still a trained run: a fresh start deletes none of it
    (run / "checkpoints" / "last.pt").unlink()
    with pytest.raises(RunError, match="already holds a trained run"):
        train(cfg, log=quiet, progress=False)
    assert (run / "checkpoints" / "best.pt").exists() and Run(run).step_checkpoints()


def test_the_run_lock(tmp_path):
    path = tmp_path / ".mt-lock"
    mine = RunLock(path, "RUN")
    mine.acquire()
    with pytest.raises(RunError, match=rf"^RUN is in use by pid {os.getpid()} on {socket.gethostname()}$"):
        RunLock(path, "RUN").acquire()
    mine.release()
    assert not path.exists()

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process that held the lock and was killed: its pid is free
    here = {"host": socket.gethostname(), "pidns": os.readlink("/proc/self/ns/pid"), "token": "t"}
    path.write_text(json.dumps({"pid": gone.pid, "start": "1", **here}))
    taker = RunLock(path, "RUN")
    taker.acquire()  # stale: taken over
    assert json.loads(path.read_text())["pid"] == os.getpid()
    taker.release()

    # the same pid, but a process started at another time (pid reuse): stale too
    path.write_text(json.dumps({"pid": os.getpid(), "start": "-1", **here}))
    RunLock(path, "RUN").acquire()

    # the same host name, but another container (pid namespace): its pids cannot be checked from here
    path.write_text(json.dumps({"pid": gone.pid, "start": "1", **here, "pidns": "pid:[1]"}))
    with pytest.raises(RunError, match=rf"RUN is in use by pid {gone.pid} on {socket.gethostname()} \(if"):
        RunLock(path, "RUN").acquire()

    path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "token": "t"}))
    with pytest.raises(RunError, match=r"RUN is in use by pid 1 on elsewhere \(if that run is gone, delete"):
        RunLock(path, "RUN").acquire()
    assert json.loads(path.read_text())["host"] == "elsewhere"  # another host's lock is never taken


@pytest.mark.slow
def test_a_second_training_process_is_refused_and_the_first_goes_on_intact(tmp_path, multi30k_head, spm_model):
    config = config_file(tmp_path, multi30k_head, spm_model, max_steps=100000, valid_every=10)
    run = tmp_path / "run"
    first = mt_cli("train", str(config), "-o", str(run), "-q")
    wait_for(run / "checkpoints" / "step_00000010.pt", first)
    second = mt_cli("train", "-o", str(run), "--resume", "-q")
    assert second.wait(timeout=120) == 1
    assert second.stderr.read().strip().splitlines()[-1] == \
        f"mt: error: {run} is in use by pid {first.pid} on {socket.gethostname()}"
    assert first.poll() is None  # still training, undisturbed
    first.send_signal(signal.SIGINT)  # stop it the way a user would: it saves and exits
    assert first.wait(timeout=60) == 128 + signal.SIGINT, first.stderr.read()
    steps = sorted(train_losses(run))
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] > 10  # one trajectory, each step once
    assert ckpt.load(run / "checkpoints" / "last.pt")["trainer"]["step"] == steps[-1]
    assert Run(run).step_checkpoints()[-1][0] == steps[-1]
    assert not (run / ".mt-lock").exists()


def test_an_early_stopped_run_resumes_to_no_new_step(tmp_path, multi30k_head, spm_model):
    # lr 1e-12 leaves the fp32 weights exactly as they are: the second validation cannot improve
    config = config_file(tmp_path, multi30k_head, spm_model, max_steps=1000, valid_every=2, patience=1, lr=1e-12,
                         schedule="constant", warmup_steps=0)
    cfg = load_config(config, ["decode.tune_beam=[1]", f"train.run_dir={tmp_path / 'run'}"])
    messages = []
    first = train(cfg, log=messages.append, progress=False)
    assert first.step == 4 and first.stopped.startswith("early stopping")
    run = Run(tmp_path / "run")
    tuned = run.defaults_path.read_bytes(), run.defaults_path.stat().st_mtime_ns
    again = train(cfg, resume=True, log=messages.append, progress=False)
    assert again.step == 4 and again.stopped.startswith("early stopping")
    assert (run.defaults_path.read_bytes(), run.defaults_path.stat().st_mtime_ns) == tuned  # not tuned again
    assert [s for s, _ in run.step_checkpoints()] == [2, 4]


def test_resume_refuses_a_replaced_or_missing_tokenizer(tmp_path, multi30k_head, spm_model):
    cfg = load_config(config_file(tmp_path, multi30k_head, spm_model, max_steps=2, valid_every=2),
                      [f"train.run_dir={tmp_path / 'run'}"])
    train(cfg, log=quiet, progress=False)
    run = Run(tmp_path / "run")
    spm = run.tokenizer_paths(joint=True)[0]
    original = spm.read_bytes()
    other = train_sentencepiece(multi30k_head("train", "en", 2000), tmp_path / "other.model", vocab_size=300,
                                num_threads=1)  # the same size, another vocabulary
    shutil.copyfile(other, spm)
    resumed = load_config(run.config_path, ["train.max_steps=4"])
    with pytest.raises(TrainingError, match=r"trained with another tokenizer than .*spm.model"):
        train(resumed, resume=True, log=quiet, progress=False)
    spm.unlink()
    no_model = load_config(run.config_path, ["train.max_steps=4", "tokenizer.src_model="])
    with pytest.raises(TrainingError, match=r"spm.model: missing; .*last.pt was trained with it"):
        train(no_model, resume=True, log=quiet, progress=False)
    spm.write_bytes(original)
    assert train(resumed, resume=True, log=quiet, progress=False).step == 4


def test_resume_refuses_an_edited_corpus_and_accepts_a_copy(tmp_path, multi30k_head, spm_model):
    cfg = load_config(config_file(tmp_path, multi30k_head, spm_model, max_steps=2, valid_every=2),
                      [f"train.run_dir={tmp_path / 'run'}"])
    train(cfg, log=quiet, progress=False)
    run = Run(tmp_path / "run")
    copies = tmp_path / "copies"
    copies.mkdir()
    for side in ("src", "tgt"):  # a byte-identical copy elsewhere (new path, new mtime): the same corpus
        shutil.copy(getattr(cfg.data.train[0], side), copies / f"train.{side}")
    moved = load_config(run.config_path, ["train.max_steps=4", f"data.train.src={copies / 'train.src'}",
                                          f"data.train.tgt={copies / 'train.tgt'}"])
    messages = []
    assert train(moved, resume=True, log=messages.append, progress=False).step == 4
    assert any("resuming with changed settings: data.train.src" in m for m in messages)

    src = copies / "train.src"  # edited in place: same size, same line count, one word changed
    text = src.read_text()
    first = text.split()[0]
    src.write_text(text.replace(first, first[::-1], 1))
    assert src.stat().st_size == len(text.encode())
    more = load_config(run.config_path, ["train.max_steps=6"])
    with pytest.raises(TrainingError, match=r"data.train: .*train.src .* is not the corpus .*last.pt was trained on"):
        train(more, resume=True, log=quiet, progress=False)
    assert ckpt.load(run.checkpoint_path("last"))["trainer"]["step"] == 4


def test_a_checkpoint_whose_weights_do_not_fit_its_config_is_refused_before_building(tmp_path, multi30k_head,
                                                                                       spm_model):
    cfg = load_config(config_file(tmp_path, multi30k_head, spm_model, max_steps=2, valid_every=2),
                      [f"train.run_dir={tmp_path / 'run'}"])
    train(cfg, log=quiet, progress=False)
    run = Run(tmp_path / "run")
    state = ckpt.load(run.checkpoint_path("best"))
    # a small file claiming a model of ~100 GB: refused from the shapes, nothing allocated
    state["config"]["model"].update(d_model=65536, n_heads=8, ffn_dim=262144, max_positions=128)
    ckpt.atomic_save(state, tmp_path / "huge.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"huge.pt: tgt_embed.weight has shape \(300, 32\), its config "
                                                   r"says \(300, 65536\)"):
        run.load_for_inference(str(tmp_path / "huge.pt"), device="cpu")
    state["model"].pop("decoder_norm.weight")
    state["config"]["model"].update(d_model=32, n_heads=2, ffn_dim=64)
    ckpt.atomic_save(state, tmp_path / "cut.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"cut.pt: its weights are not the model its config describes "
                                                   r"\(missing \['decoder_norm.weight'\]"):
        run.load_for_inference(str(tmp_path / "cut.pt"), device="cpu")


def test_train_state_round_trips_and_refuses_other_versions_and_types():
    state = TrainState(step=7, epoch=2, batch=5, best_metric="bleu", best=31.5, bad_validations=1, elapsed=12.5,
                       window_tokens=900, window_loss=2100.0, window_nll=1800.0)
    saved = state.state_dict()
    assert saved["version"] == TrainState.VERSION == 2
    loaded = TrainState()
    loaded.load_state_dict(saved)
    assert loaded == state
    for bad, message in (({**saved, "version": 1}, "version 1 is not 2"),
                         ({**saved, "step": "7"}, "step='7' is not of type int"),
                         ({**saved, "batch": True}, "batch=True is not of type int"),
                         ({**saved, "best": None}, "best=None is not of type float"),
                         ({k: v for k, v in saved.items() if k != "elapsed"}, "elapsed: missing"),
                         ({**saved, "batch": -3}, "batch=-3 is out of range"),
                         ({**saved, "elapsed": float("nan")}, "elapsed=nan is out of range"),
                         ({**saved, "best": float("nan")}, "best=nan is out of range"),
                         (None, "expected a dict")):
        with pytest.raises(ValueError, match=message):
            TrainState().load_state_dict(bad)
    unbounded = TrainState()
    unbounded.load_state_dict({**saved, "best": -math.inf})  # no validation yet, bleu: best is -inf
    assert unbounded.best == -math.inf
    whole = TrainState()
    whole.load_state_dict({**saved, "best": 3})  # an int where a float is kept is fine
    assert whole.best == 3.0 and isinstance(whole.best, float)


def test_a_checkpoint_holds_the_trainer_parts_and_resume_checks_each(tmp_path, multi30k_head, spm_model):
    cfg = load_config(config_file(tmp_path, multi30k_head, spm_model, max_steps=2, valid_every=2),
                      [f"train.run_dir={tmp_path / 'run'}"])
    train(cfg, log=quiet, progress=False)
    run = Run(tmp_path / "run")
    last = run.checkpoint_path("last")
    state = ckpt.load(last)
    parts = {"trainer", "model", "optimizer", "sampler", "scale", "rng"}
    assert set(state) == parts | {"format", "version", "config", "vocab", "tokenizer", "corpus", "valid", "update_batches"}
    assert state["trainer"]["step"] == 2 and state["sampler"]["num_examples"] > 0
    more = load_config(run.config_path, ["train.max_steps=4"])
    for name, broken, message in (
            ("trainer", {**state["trainer"], "version": 1}, "trainer state: version 1 is not 2"),
            ("sampler", {**state["sampler"], "num_examples": 3}, "sampler state: num_examples=3 but this run has"),
            ("trainer", {**state["trainer"], "batch": 10_000}, "trainer state: batch 10000 of epoch"),
            ("sampler", None, "sampler state: expected a dict, found NoneType"),
            ("optimizer", {"state": {}, "param_groups": []}, "optimizer state: "),
            ("rng", None, "rng state: ")):
        ckpt.atomic_save({**state, name: broken}, last)
        with pytest.raises(TrainingError, match=f"last.pt: cannot resume its {message}"):
            train(more, resume=True, log=quiet, progress=False)
    ckpt.atomic_save(state, last)
    assert train(more, resume=True, log=quiet, progress=False).step == 4
