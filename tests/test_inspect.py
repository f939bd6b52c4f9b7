"""Seeing inside a run from the command line: mt attention (JSON and pictures), mt translate --align,
mt plot, mt info, and TensorBoard events equal to metrics.jsonl, on a tiny run trained in-test."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mt.cli import app
from mt.config import config_from_dict
from mt.tokenizer import Tokenizer
from mt.train import train

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, small_corpus) -> Path:
    """A tiny de->en run (2+2 layers) trained for a few seconds, with TensorBoard events."""
    tmp = tmp_path_factory.mktemp("inspect")
    cfg = config_from_dict({
        "data": {**small_corpus(tmp, 2000, 50), "max_len": 64},
        "tokenizer": {"vocab_size": 400},
        "model": {"d_model": 32, "n_heads": 2, "ffn_dim": 64, "encoder_layers": 2, "decoder_layers": 2,
                  "dropout": 0.0, "max_positions": 256},
        "train": {"run_dir": str(tmp / "run"), "max_steps": 20, "valid_every": 10, "log_every": 5,
                  "max_tokens": 1024, "lr": 3e-3, "warmup_steps": 5, "valid_beam": 1, "best_metric": "bleu",
                  "tensorboard": True},
        "decode": {"beam": 2, "max_len_b": 10},
    })
    train(cfg, log=lambda _: None, progress=False)
    return tmp / "run"


def pieces(run_dir: Path, text: str) -> list[str]:
    tok = Tokenizer(run_dir / "spm.model")
    return tok.pieces(tok.encode([text])[0])


def test_attention_json_gives_every_layer_and_head_labelled_with_pieces(run_dir):
    src, tgt = "Ein Mann mit einem orangefarbenen Hut.", "A man in an orange hat."
    result = runner.invoke(app, ["attention", "-m", str(run_dir), "--src", src, "--tgt", tgt, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["kind"] == "cross" and data["source"] == src and data["target"] == tgt
    assert data["columns"] == pieces(run_dir, src) and data["rows"] == pieces(run_dir, tgt)
    assert data["rows"][-1] == "</s>" and len(data["layers"]) == 2
    for layer in data["layers"]:
        assert len(layer) == 2  # heads
        for head in layer:
            assert len(head) == len(data["rows"]) and all(len(r) == len(data["columns"]) for r in head)
            assert all(abs(sum(r) - 1.0) < 1e-3 for r in head)

    result = runner.invoke(app, ["attention", "-m", str(run_dir), "--src", src, "--kind", "self-dec", "--json",
                                 "--layer", "2"])
    data = json.loads(result.stdout)
    assert data["rows"] == data["columns"] and data["rows"][0] == "<s>" and len(data["layers"]) == 1
    assert all(w == 0 for head in data["layers"][0] for t, row in enumerate(head) for w in row[t + 1:])
    own = runner.invoke(app, ["translate", "-m", str(run_dir)], input=src + "\n").stdout.strip()
    assert data["target"] == own  # no --tgt: the model's own translation


def test_attention_pictures_are_valid_pngs(run_dir, tmp_path):
    import matplotlib.image

    src = " ".join(["Ein Mann mit einem orangefarbenen Hut, der etwas anstarrt."] * 4)  # 40+ pieces
    assert len(pieces(run_dir, src)) > 40
    for text, extra, name in ((src, [], "avg.png"), ("Ein Hund rennt.", ["--heads", "--kind", "self-enc"], "heads.png")):
        out = tmp_path / name
        result = runner.invoke(app, ["attention", "-m", str(run_dir), "--src", text, "-o", str(out), *extra])
        assert result.exit_code == 0, result.output
        assert out.read_bytes()[:8] == PNG and out.stat().st_size < 200_000
        assert matplotlib.image.imread(out).ndim == 3
    result = runner.invoke(app, ["attention", "-m", str(run_dir), "--src", src, "--layer", "3", "--json"])
    assert result.exit_code == 1 and "--layer 3: the model has 2 layers" in result.stderr
    result = runner.invoke(app, ["attention", "-m", str(run_dir), "--src", " ", "--json"])
    assert result.exit_code == 1 and "--src is empty" in result.stderr


def test_pictures_without_matplotlib_say_what_to_install(run_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    out = tmp_path / "a.png"
    for args in (["attention", "-m", str(run_dir), "--src", "Ein Hund.", "-o", str(out)], ["plot", str(run_dir), "-o", str(out)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and "pip install 'mt[plot]'" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def test_translate_align_prints_word_links_after_each_hypothesis(run_dir, multi30k_head):
    lines = multi30k_head("test_2016_flickr", "de", 6)
    lines = lines[:3] + [""] + lines[3:]
    result = runner.invoke(app, ["translate", "-m", str(run_dir), "--align"], input="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.output
    rows = result.stdout.split("\n")[:-1]
    assert len(rows) == len(lines) and rows[3] == "\t"
    plain = runner.invoke(app, ["translate", "-m", str(run_dir)], input="\n".join(lines) + "\n").stdout.split("\n")[:-1]
    for line, row, hyp in zip(lines, rows, plain):
        text, links = row.split("\t")
        assert text == hyp
        pairs = [tuple(map(int, p.split("-"))) for p in links.split()]
        assert all(0 <= s < len(line.split()) and 0 <= t < len(text.split()) for s, t in pairs)
        assert {t for _, t in pairs} == set(range(len(text.split())))  # every target word has a link
    alone = [runner.invoke(app, ["translate", "-m", str(run_dir), "--align"], input=line + "\n").stdout.rstrip("\n")
             for line in lines[:2]]
    assert alone == rows[:2]  # a sentence aligns the same alone as in a batch

    nbest = runner.invoke(app, ["translate", "-m", str(run_dir), "--align", "--nbest", "2", "--align-layer", "1"],
                          input=lines[0] + "\n").stdout.splitlines()
    assert len(nbest) == 2
    for row in nbest:  # each hypothesis with its own links
        _, _, text, links = row.split("\t")
        assert {int(p.split("-")[1]) for p in links.split()} == set(range(len(text.split())))
    result = runner.invoke(app, ["translate", "-m", str(run_dir), "--align", "--align-layer", "3"], input="x\n")
    assert result.exit_code == 1 and "--align-layer 3: the model has 2 decoder layers" in result.stderr


def test_plot_draws_curves_from_metrics(run_dir, tmp_path):
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(isinstance(r["elapsed"], float) for r in rows)  # training time on every row
    assert [r["elapsed"] for r in rows] == sorted(r["elapsed"] for r in rows)
    out = tmp_path / "curves.png"
    result = runner.invoke(app, ["plot", str(run_dir), str(run_dir), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == PNG
    result = runner.invoke(app, ["plot", str(tmp_path), "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and "metrics.jsonl: no such file" in result.stderr


def test_info_prints_progress_scores_and_machine(run_dir):
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    best = max((r for r in rows if r["kind"] == "valid"), key=lambda r: r["bleu"])
    result = runner.invoke(app, ["info", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "20 updates" in result.stdout and f"BLEU {best['bleu']:.2f} (step {best['step']})" in result.stdout
    assert "CUDA:" in result.stdout and "int8:" in result.stdout
    facts = json.loads(runner.invoke(app, ["info", str(run_dir), "--json"]).stdout)
    assert facts["training"]["steps"] == 20 and facts["best"]["bleu"]["value"] == best["bleu"]
    assert facts["vocabulary"]["src"] == 400 and facts["model"]["decoder_layers"] == 2
    result = runner.invoke(app, ["info", str(run_dir.parent)])
    assert result.exit_code == 1 and "not a run directory" in result.stderr


def test_tensorboard_events_hold_the_rows_of_metrics_jsonl(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for kind, key in (("train", "loss"), ("train", "lr"), ("valid", "nll"), ("valid", "bleu")):
        expected = [(r["step"], r[key]) for r in rows if r["kind"] == kind]
        got = [(e.step, e.value) for e in events.Scalars(f"{kind}/{key}")]
        assert [s for s, _ in got] == [s for s, _ in expected] and expected
        assert all(abs(a - b) <= 1e-6 * max(1.0, abs(b)) for (_, a), (_, b) in zip(got, expected))  # fp32 in the file
