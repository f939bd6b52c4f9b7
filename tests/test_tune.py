"""Checkpoint averaging and decoding defaults chosen on validation: `mt average`, RUN/decode.yaml,
and `mt translate` / `mt eval` using the run's choice unless told otherwise."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from mt import checkpoint as ckpt
from mt.cli import app
from mt.config import config_from_dict
from mt.run import Run
from mt.train import train

runner = CliRunner()


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory, small_corpus) -> Path:
    """A tiny de->en run: checkpoints every 5 steps, validation every 15, the last 3 averaged, beam
    and length penalty tuned on 80 validation pairs."""
    tmp = tmp_path_factory.mktemp("tune")
    cfg = config_from_dict({
        "data": {**small_corpus(tmp, 3000, 80), "max_len": 64},
        "tokenizer": {"vocab_size": 500},
        "model": {"d_model": 32, "n_heads": 2, "ffn_dim": 64, "encoder_layers": 1, "decoder_layers": 1,
                  "dropout": 0.0, "max_positions": 256},
        "train": {"run_dir": str(tmp / "run"), "max_steps": 30, "valid_every": 15, "save_every": 5,
                  "max_tokens": 1024, "lr": 3e-3, "warmup_steps": 10, "keep_checkpoints": 4, "average_last": 3,
                  "valid_beam": 1, "best_metric": "bleu"},
        "decode": {"beam": 2, "max_len_b": 10, "tune_beam": [1, 2, 3], "tune_lenpen": [0.5, 1.0]},
    })
    messages = []
    train(cfg, log=messages.append, progress=False)
    assert any("decoding defaults chosen on validation" in m for m in messages)
    return tmp / "run"


def test_average_of_the_last_checkpoints_is_their_mean(tuned_run):
    steps = Run(tuned_run).step_checkpoints()
    assert [s for s, _ in steps] == [15, 20, 25, 30]  # save_every 5, keep 4
    average = ckpt.load(tuned_run / "checkpoints" / "average.pt")
    assert average["averaged"] == [p.name for _, p in steps[-3:]]
    assert "optimizer" not in average
    parts = [ckpt.load(p)["model"] for _, p in steps[-3:]]
    for key in ("encoder_layers.0.ffn.fc1.weight", "tgt_embed.weight", "decoder_norm.bias"):
        torch.testing.assert_close(average["model"][key], sum(p[key] for p in parts) / 3)


def test_decode_yaml_records_the_best_of_what_was_tried_on_validation(tuned_run):
    chosen = yaml.safe_load((tuned_run / "decode.yaml").read_text())
    tried = chosen["tried"]
    # both checkpoints with the configured beam 2 / lenpen 1.0, then the grid on the winner
    assert {(t["checkpoint"], t["beam"], t["lenpen"]) for t in tried[:2]} == {("best", 2, 1.0), ("average", 2, 1.0)}
    # greedy (beam 1) once: the length penalty never changes its output
    assert [(t["beam"], t["lenpen"]) for t in tried[2:]] == [(1, 0.5), (2, 0.5), (3, 0.5), (3, 1.0)]
    assert all(t["checkpoint"] == chosen["checkpoint"] for t in tried[2:])
    assert chosen["valid_bleu"] == max(t["bleu"] for t in tried)
    winner = [t for t in tried if (t["checkpoint"], t["beam"], t["lenpen"]) ==
              (chosen["checkpoint"], chosen["beam"], chosen["lenpen"])]
    assert winner and winner[0]["bleu"] == chosen["valid_bleu"]
    # the recorded score is the validation split's, as mt eval computes it with the chosen settings
    val_de, val_en = tuned_run.parent / "val.de", tuned_run.parent / "val.en"
    result = runner.invoke(app, ["eval", "-m", str(tuned_run), "--src", str(val_de), "-r", str(val_en),
                                 "--metrics", "bleu", "--json", "-w", "2"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["score"] == pytest.approx(chosen["valid_bleu"], abs=0.01)


def test_translate_uses_the_runs_choice_unless_told_otherwise(tuned_run, multi30k_head):
    chosen = yaml.safe_load((tuned_run / "decode.yaml").read_text())
    lines = "\n".join(multi30k_head("test_2016_flickr", "de", 20)) + "\n"
    default = runner.invoke(app, ["translate", "-m", str(tuned_run), "--scores"], input=lines)
    explicit = runner.invoke(app, ["translate", "-m", str(tuned_run), "--scores", "-c", chosen["checkpoint"],
                                   "--beam", str(chosen["beam"]), "--lenpen", str(chosen["lenpen"])]
                             + (["--greedy"] if chosen["beam"] == 1 else []), input=lines)
    assert default.exit_code == 0 and explicit.exit_code == 0, default.output + explicit.output
    assert default.stdout == explicit.stdout
    other = "average" if chosen["checkpoint"] == "best" else "best"
    overridden = runner.invoke(app, ["translate", "-m", str(tuned_run), "--scores", "-c", other, "--beam", "4",
                                     "--lenpen", "0.3"], input=lines)
    assert overridden.exit_code == 0 and overridden.stdout != default.stdout


def test_mt_average_last_and_best(tuned_run, tmp_path):
    out = tmp_path / "last2.pt"
    result = runner.invoke(app, ["average", str(tuned_run), "--last", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    steps = Run(tuned_run).step_checkpoints()
    assert ckpt.load(out)["averaged"] == [p.name for _, p in steps[-2:]]
    # only steps 15 and 30 were validated: they are the two best there are
    out = tmp_path / "best2.pt"
    result = runner.invoke(app, ["average", str(tuned_run), "--best", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert ckpt.load(out)["averaged"] == ["step_00000015.pt", "step_00000030.pt"]
    result = runner.invoke(app, ["translate", "-m", str(tuned_run), "-c", str(out)], input="Ein Hund.\n")
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 1
    result = runner.invoke(app, ["average", str(tuned_run), "--best", "3", "-o", str(out)])
    assert result.exit_code == 1 and "needs at least" in result.stderr and "found 2" in result.stderr
    result = runner.invoke(app, ["average", str(tuned_run), "--last", "2", "--best", "2"])
    assert result.exit_code == 1 and "exactly one of --last N or --best N" in result.stderr


def test_mt_average_never_replaces_the_checkpoint_the_run_chose(tuned_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tuned_run, run)
    before = (run / "checkpoints" / "average.pt").read_bytes()
    result = runner.invoke(app, ["average", str(run), "--last", "4"])
    assert result.exit_code == 0, result.output
    assert (run / "checkpoints" / "average_last4.pt").exists()
    assert (run / "checkpoints" / "average.pt").read_bytes() == before


def test_nbest_alone_widens_the_tuned_beam(tuned_run):
    chosen = yaml.safe_load((tuned_run / "decode.yaml").read_text())
    result = runner.invoke(app, ["translate", "-m", str(tuned_run), "--nbest", "4"], input="Ein Hund.\n")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 4 and chosen["beam"] < 4
    result = runner.invoke(app, ["translate", "-m", str(tuned_run), "--nbest", "4", "--beam", "2"],
                           input="Ein Hund.\n")
    assert result.exit_code == 1 and "--nbest 4 exceeds --beam 2" in result.stderr


def test_training_further_replaces_the_choice(tuned_run, tmp_path):
    import shutil

    from mt.config import load_config

    run = tmp_path / "run"
    shutil.copytree(tuned_run, run)
    (run / "decode.yaml").write_text("checkpoint: best\nbeam: 3\nlenpen: 0.5\nvalid_bleu: 99.0\n")
    cfg = load_config(run / "config.yaml", [f"train.run_dir={run}", "train.max_steps=33"])
    train(cfg, resume=True, log=lambda _: None, progress=False)
    chosen = yaml.safe_load((run / "decode.yaml").read_text())
    assert chosen["valid_bleu"] != 99.0 and len(chosen["tried"]) >= 2  # chosen again for the new model
    average = ckpt.load(run / "checkpoints" / "average.pt")
    assert average["averaged"][-1] == "step_00000033.pt"


def test_a_broken_decode_yaml_is_a_one_line_error(tuned_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tuned_run, run)
    (run / "decode.yaml").write_text("checkpoint: best\nbeam: five\n")
    result = runner.invoke(app, ["translate", "-m", str(run)], input="Ein Hund.\n")
    assert result.exit_code == 1
    assert "decode.yaml: beam: expected int, got 'five'" in result.stderr and len(result.stderr.splitlines()) == 1
