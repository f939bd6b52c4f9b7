"""`mt translate` and `mt eval` end to end on real Multi30k lines, with a run trained in-test."""

import gzip
import json
from pathlib import Path

import pytest
import torch
from sacrebleu.metrics import BLEU, CHRF, TER
from typer.testing import CliRunner

from mt.cli import app
from mt.config import config_from_dict
from mt.run import Run
from mt.train import train
from mt.checkpoint import average as average_checkpoints
from mt.int8 import unavailable as int8_unavailable
from mt.translate import Translator

ROOT = Path(__file__).resolve().parents[1]
MULTI30K = ROOT / "data" / "multi30k"
runner = CliRunner()


def head(name: str, n: int) -> list[str]:
    if not (MULTI30K / name).exists():
        pytest.fail(f"{MULTI30K / name} is missing: run `make data`")
    with gzip.open(MULTI30K / name, "rt", encoding="utf-8") as f:
        return [next(f).rstrip("\n") for _ in range(n)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, small_corpus) -> Path:
    """A tiny de->en run trained for a few seconds on 3,000 Multi30k pairs."""
    tmp = tmp_path_factory.mktemp("translate")
    cfg = config_from_dict({
        "data": {**small_corpus(tmp, 3000, 100), "max_len": 64},
        "tokenizer": {"vocab_size": 500},
        "model": {"d_model": 32, "n_heads": 2, "ffn_dim": 64, "encoder_layers": 1, "decoder_layers": 1,
                  "dropout": 0.0, "max_positions": 256},
        "train": {"run_dir": str(tmp / "run"), "max_steps": 30, "valid_every": 10, "max_tokens": 1024,
                  "lr": 3e-3, "warmup_steps": 10, "keep_checkpoints": 3, "valid_beam": 1, "best_metric": "bleu"},
        "decode": {"beam": 3, "max_len_b": 10},
    })
    train(cfg, log=lambda _: None, progress=False)
    return tmp / "run"


def test_validation_bleu_is_logged_and_picks_best(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in rows if r["kind"] == "valid"]
    assert [r["step"] for r in valid] == [10, 20, 30]
    assert all(0.0 <= r["bleu"] <= 100.0 for r in valid)
    best_step = max(valid, key=lambda r: r["bleu"])["step"]  # first of equals wins, as in training
    import torch

    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert best["trainer"]["step"] == best_step


def test_translate_keeps_line_count_and_order_with_empty_and_long_lines(run_dir):
    lines = head("test_2016_flickr.de.gz", 12)
    long_line = " ".join(lines) * 8  # far more tokens than max_positions = 256
    text = "\n".join([lines[0], "", lines[1], "   ", long_line, *lines[2:], ""]) + "\n"
    result = runner.invoke(app, ["translate", "-m", str(run_dir), "--beam", "2"], input=text)
    assert result.exit_code == 0, result.output
    out = result.stdout.split("\n")
    assert out[-1] == ""  # ends with a newline
    out = out[:-1]
    n_in = len(text.split("\n")) - 1
    assert len(out) == n_in == 16
    assert out[1] == "" and out[3] == "" and out[-1] == ""
    assert out[0] and out[2] and out[4]  # real lines give something
    # the same lines alone give the same translations (order restored after sorting by length)
    alone = runner.invoke(app, ["translate", "-m", str(run_dir), "--beam", "2"], input=lines[1] + "\n")
    assert alone.stdout == out[2] + "\n"
    assert "truncated" in result.stderr


def test_translate_file_options_nbest_and_scores(run_dir, tmp_path):
    lines = head("test_2016_flickr.de.gz", 5)
    src = tmp_path / "in.de"
    src.write_text("\n".join(lines[:2] + [""] + lines[2:]) + "\n", encoding="utf-8")
    out = tmp_path / "out.en"
    result = runner.invoke(app, ["translate", "-m", str(run_dir), "-i", str(src), "-o", str(out), "--nbest", "3"])
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 3 * 6
    assert [int(r[0]) for r in rows] == [i for i in range(6) for _ in range(3)]
    for i in range(6):
        scores = [float(r[1]) for r in rows[3 * i: 3 * i + 3]]
        assert scores == sorted(scores, reverse=True)
    best = runner.invoke(app, ["translate", "-m", str(run_dir), "-i", str(src), "--beam", "3"]).stdout.splitlines()
    assert [rows[3 * i][2] for i in range(6)] == best
    scored = runner.invoke(app, ["translate", "-m", str(run_dir), "-i", str(src), "--scores"]).stdout.splitlines()
    assert [line.split("\t", 1)[1] for line in scored] == best
    assert all(float(line.split("\t")[0]) <= 0 for line in scored)


def test_translate_greedy_equals_beam_one_and_invalid_utf8_keeps_lines(run_dir):
    lines = head("test_2016_flickr.de.gz", 6)
    text = "\n".join(lines) + "\n"
    greedy = runner.invoke(app, ["translate", "-m", str(run_dir), "--greedy"], input=text).stdout
    beam1 = runner.invoke(app, ["translate", "-m", str(run_dir), "--beam", "1"], input=text).stdout
    assert greedy == beam1
    raw = [line.encode("utf-8") for line in lines]
    raw[2] = b"\xff\xfe" + raw[2]
    bad = b"\n".join(raw) + b"\n"
    result = runner.invoke(app, ["translate", "-m", str(run_dir)], input=bad)
    assert result.exit_code == 0
    assert len(result.stdout.splitlines()) == 6
    assert "<stdin>:3: invalid UTF-8" in result.stderr


def test_translator_streams_in_chunks(run_dir, monkeypatch):
    import mt.translate

    monkeypatch.setattr(mt.translate, "CHUNK_LINES", 4)
    translator = Translator.from_run(run_dir, beam=2)
    lines = head("test_2016_flickr.de.gz", 10)
    consumed = []

    def source():
        for line in lines:
            consumed.append(line)
            yield line

    stream = translator.translate(source())
    next(stream)
    assert len(consumed) == 4  # the first output came after reading one chunk only
    rest = list(stream)
    assert len(rest) == 9
    assert [t.texts[0] for t in [None] * 0 + rest] == translator.translate_lines(lines)[1:]


def test_average_and_checkpoint_choice(run_dir):
    from mt import checkpoint as ckpt

    steps = Run(run_dir).step_checkpoints()
    assert [s for s, _ in steps] == [10, 20, 30]
    avg = average_checkpoints([p for _, p in steps[-2:]])
    a, b = (ckpt.load(p)["model"] for _, p in steps[-2:])
    key = "encoder_layers.0.ffn.fc1.weight"
    assert avg["model"][key].allclose((a[key] + b[key]) / 2)
    result = runner.invoke(app, ["translate", "-m", str(run_dir), "--average", "2"], input="Ein Hund.\n")
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 1
    result = runner.invoke(app, ["translate", "-m", str(run_dir), "--average", "5"], input="Ein Hund.\n")
    assert result.exit_code == 1 and "--average 5 needs 5" in result.stderr
    result = runner.invoke(app, ["translate", "-m", str(run_dir), "-c", "20"], input="Ein Hund.\n")
    assert result.exit_code == 0


def test_eval_equals_sacrebleu_python_api(tmp_path):
    refs = head("test_2016_flickr.en.gz", 200)
    hyps = [" ".join(r.split()[:-2]) if i % 3 else r.lower() for i, r in enumerate(refs)]  # imperfect system
    (tmp_path / "ref.en").write_text("\n".join(refs) + "\n", encoding="utf-8")
    (tmp_path / "hyp.en").write_text("\n".join(hyps) + "\n", encoding="utf-8")
    result = runner.invoke(app, ["eval", "-r", str(tmp_path / "ref.en"), "--json", "-w", "4"],
                           input="\n".join(hyps) + "\n")
    assert result.exit_code == 0, result.output
    got = {r["name"]: r for r in json.loads(result.stdout)}
    for metric in (BLEU(), CHRF(), TER()):
        expected = metric.corpus_score(hyps, [refs])
        assert got[expected.name]["score"] == pytest.approx(expected.score, abs=1e-9)
        assert got[expected.name]["signature"] == metric.get_signature().format()
    text = runner.invoke(app, ["eval", "-r", str(tmp_path / "ref.en"), "-s", str(tmp_path / "hyp.en"),
                               "--metrics", "bleu"])
    bleu = BLEU()
    assert text.stdout.strip() == bleu.corpus_score(hyps, [refs]).format(width=1, signature=bleu.get_signature().format())
    assert text.stdout.startswith("BLEU|nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")


def test_eval_errors(tmp_path):
    (tmp_path / "ref.en").write_text("a b c\nd e f\n", encoding="utf-8")
    result = runner.invoke(app, ["eval", "-r", str(tmp_path / "ref.en")], input="a b c\n")
    assert result.exit_code == 1 and "1 hypotheses but 2 references" in result.stderr
    result = runner.invoke(app, ["eval", "-r", str(tmp_path / "ref.en"), "--metrics", "bleu,meteor"], input="x\ny\n")
    assert result.exit_code == 1 and "unknown metric 'meteor'" in result.stderr
    result = runner.invoke(app, ["eval", "-r", str(tmp_path / "missing.en")], input="x\n")
    assert result.exit_code == 1 and "missing.en" in result.stderr


def test_eval_translates_with_a_model(run_dir, tmp_path):
    src, ref = head("val.de.gz", 20), head("val.en.gz", 20)
    (tmp_path / "src.de").write_text("\n".join(src) + "\n", encoding="utf-8")
    (tmp_path / "ref.en").write_text("\n".join(ref) + "\n", encoding="utf-8")
    out = tmp_path / "hyp.en"
    result = runner.invoke(app, ["eval", "-m", str(run_dir), "--src", str(tmp_path / "src.de"),
                                 "-r", str(tmp_path / "ref.en"), "-o", str(out), "--metrics", "bleu,chrf"])
    assert result.exit_code == 0, result.output
    hyps = out.read_text(encoding="utf-8").splitlines()
    assert len(hyps) == 20
    assert f"= {BLEU().corpus_score(hyps, [ref]).score:.1f} " in result.stdout
    assert "chrF2|" in result.stdout


def test_translate_option_errors_are_one_line(run_dir):
    result = runner.invoke(app, ["translate", "-m", str(run_dir), "--nbest", "4", "--beam", "2"], input="x\n")
    assert result.exit_code == 1 and "--nbest 4 exceeds --beam 2" in result.stderr
    result = runner.invoke(app, ["translate", "-m", str(run_dir), "--beam", "0"], input="x\n")
    assert result.exit_code == 1 and "decode.beam" in result.stderr
    result = runner.invoke(app, ["translate", "-m", str(run_dir), "-i", "/nonexistent/in.txt"])
    assert result.exit_code == 1 and "/nonexistent/in.txt" in result.stderr
    assert "Traceback" not in result.output


def test_more_option_errors(run_dir, tmp_path):
    result = runner.invoke(app, ["translate", "-m", str(run_dir), "--nbest", "0"], input="x\n")
    assert result.exit_code == 1 and "--nbest must be at least 1" in result.stderr
    result = runner.invoke(app, ["translate", "-m", str(run_dir), "--device", "gpu"], input="x\n")
    assert result.exit_code == 1 and "device 'gpu'" in result.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = runner.invoke(app, ["eval", "-r", str(empty), "-s", str(empty)])
    assert result.exit_code == 1 and "nothing to score" in result.stderr
    out = tmp_path / "out.txt"
    result = runner.invoke(app, ["translate", "-m", str(run_dir), "-o", str(out)], input=b"ok\n")
    assert result.exit_code == 0 and out.read_text().count("\n") == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_bf16_translation_keeps_lines_and_mostly_agrees_with_fp32(run_dir):
    lines = head("test_2016_flickr.de.gz", 40)
    bf16 = Translator.from_run(run_dir, dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in bf16.model.parameters())
    fast = bf16.translate_lines(lines + [""])
    exact = Translator.from_run(run_dir).translate_lines(lines + [""])
    assert len(fast) == 41 and fast[-1] == ""
    assert sum(a == b for a, b in zip(fast, exact)) >= 20  # bf16 rounding changes a few, not most
    # alone, each of the first five lines translates as it did among forty
    assert [bf16.translate_lines([line])[0] for line in lines[:5]] == fast[:5]


def test_dtype_auto_is_what_the_policy_chooses_here(run_dir, monkeypatch):
    from mt.device import choose_dtype

    assert Translator.from_run(run_dir).model.src_embed.weight.dtype == torch.float32  # auto, pinned to fp32
    monkeypatch.delenv("MT_AUTO_FP32")
    chosen, _ = choose_dtype("auto", torch.device("cpu"), int8_missing=int8_unavailable())
    model = Translator.from_run(run_dir, device="cpu").model
    if chosen == "int8":
        from mt.int8 import Int8Linear

        assert isinstance(model.output_proj, Int8Linear)
    else:
        assert model.src_embed.weight.dtype == {"bf16": torch.bfloat16, "fp32": torch.float32}[chosen]


@pytest.mark.skipif(bool(int8_unavailable()), reason=int8_unavailable() or "-")
def test_int8_translation_keeps_lines_and_mostly_agrees_with_fp32(run_dir):
    lines = head("test_2016_flickr.de.gz", 40)
    fast = Translator.from_run(run_dir, dtype="int8", device="cpu").translate_lines(lines + [""])
    exact = Translator.from_run(run_dir).translate_lines(lines + [""])
    assert len(fast) == 41 and fast[-1] == ""
    assert sum(a == b for a, b in zip(fast, exact)) >= 20
    # alone, the first five lines translate as they did among forty: int8 scales are per token
    result = runner.invoke(app, ["translate", "-m", str(run_dir), "--dtype", "int8", "--device", "cpu"],
                           input="\n".join(lines[:5]) + "\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == fast[:5]
    result = runner.invoke(app, ["translate", "-m", str(run_dir), "--dtype", "int4"], input="x\n")
    assert result.exit_code != 0 and "decode.dtype" in result.output and "int8" in result.output


def test_translate_answers_each_line_while_stdin_stays_open(run_dir):
    """A filter a program can talk to: each line sent is answered before the next is sent."""
    import select
    import subprocess
    import sys

    lines = head("test_2016_flickr.de.gz", 3)
    expected = Translator.from_run(run_dir).translate_lines(lines)
    proc = subprocess.Popen([sys.executable, "-m", "mt", "translate", "-m", str(run_dir)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for line, want in zip(lines, expected):
            proc.stdin.write((line + "\n").encode())
            proc.stdin.flush()
            answered, _, _ = select.select([proc.stdout], [], [], 120)
            assert answered, f"no answer to {line!r} while stdin stays open"
            assert proc.stdout.readline().decode().rstrip("\n") == want
        proc.stdin.close()
        assert proc.wait(60) == 0 and proc.stdout.read() == b""
    finally:
        proc.kill()
        proc.wait()


def test_translate_into_a_closed_pipe_stops_quietly(run_dir):
    """mt translate | head -1: once the reader has gone, the next write ends mt, quietly, with 141."""
    import subprocess
    import sys

    lines = head("test_2016_flickr.de.gz", 12)
    proc = subprocess.Popen([sys.executable, "-m", "mt", "translate", "-m", str(run_dir)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc.stdin.write((lines[0] + "\n").encode())
        proc.stdin.flush()
        assert proc.stdout.readline()  # one answer read, as head -1 does; then the reader leaves
        proc.stdout.close()
        proc.stdin.write("".join(line + "\n" for line in lines[1:]).encode())
        proc.stdin.close()
        assert proc.wait(120) == 141
        assert proc.stderr.read() == b""
    finally:
        proc.kill()
        proc.wait()


def test_line_stream_reads_lines_as_they_arrive():
    import os

    from mt.translate import LineStream

    read_end, write_end = os.pipe()
    stream = LineStream(read_end)
    lines = iter(stream)
    assert not stream.ready()  # nothing sent yet
    os.write(write_end, b"eins\nzw")
    assert stream.ready() and next(lines) == b"eins\n"
    assert not stream.ready()  # half a line is not a line yet
    os.write(write_end, b"ei\r\ndrei")
    assert next(lines) == b"zwei\r\n"
    os.close(write_end)
    assert stream.ready() and list(lines) == [b"drei"]  # the last line without its \n
    os.close(read_end)


def _sacrebleu(*args: str) -> str:
    """The sacrebleu command line's stdout (colours off)."""
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "sacrebleu", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_COLOR": "1"})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _systems(tmp_path):
    refs = head("test_2016_flickr.en.gz", 150)
    other = head("val.en.gz", 150)
    files = {"ref.en": refs, "ref2.en": [r if i % 2 else o for i, (r, o) in enumerate(zip(refs, other))],
             "base.en": [" ".join(r.split()[:-2]) if i % 3 else r.lower() for i, r in enumerate(refs)],
             "sys.en": [" ".join(r.split()[1:]) if i % 4 else r for i, r in enumerate(refs)]}
    for name, lines in files.items():
        (tmp_path / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {name: str(tmp_path / name) for name in files}


def test_eval_with_several_references_and_a_target_language_equals_sacrebleu_cli(tmp_path):
    f = _systems(tmp_path)
    for extra_mt, extra_cli in (([], []), (["-l", "en-zh"], ["-l", "en-zh"])):
        result = runner.invoke(app, ["eval", "-r", f["ref.en"], "-r", f["ref2.en"], "-s", f["base.en"], "--json",
                                     "-w", "3", *extra_mt])
        assert result.exit_code == 0, result.output
        got = json.loads(result.stdout)
        expected = json.loads(_sacrebleu(f["ref.en"], f["ref2.en"], "-i", f["base.en"], "-m", "bleu", "chrf", "ter",
                                         "-f", "json", "-w", "3", *extra_cli))
        assert [(g["name"], round(g["score"], 3)) for g in got] == [(e["name"], e["score"]) for e in expected]
        assert [g["signature"] for g in got] == [e["signature"] for e in expected]
        assert "nrefs:2" in got[0]["signature"]
        assert ("tok:zh" in got[0]["signature"]) == bool(extra_mt)
        text = runner.invoke(app, ["eval", "-r", f["ref.en"], "-r", f["ref2.en"], "-s", f["base.en"], *extra_mt]).stdout
        cli = _sacrebleu(f["ref.en"], f["ref2.en"], "-i", f["base.en"], "-m", "bleu", "chrf", "ter", "-f", "text", *extra_cli)
        assert [line.split() for line in text.splitlines()] == [line.split() for line in cli.splitlines()]  # CLI aligns on "="


def test_eval_paired_bootstrap_equals_sacrebleu_cli(tmp_path):
    f = _systems(tmp_path)
    result = runner.invoke(app, ["eval", "-r", f["ref.en"], "-s", f["base.en"], "-s", f["sys.en"], "--paired-bs",
                                 "--metrics", "bleu,chrf", "-w", "2"])
    assert result.exit_code == 0, result.output
    expected = _sacrebleu(f["ref.en"], "-i", f["base.en"], f["sys.en"], "--paired-bs", "-m", "bleu", "chrf", "-w", "2",
                          "-f", "text")
    assert result.stdout == expected
    assert "p = " in result.stdout and f"Baseline: {f['base.en']}" in result.stdout
    rows = json.loads(runner.invoke(app, ["eval", "-r", f["ref.en"], "-s", f["base.en"], "-s", f["sys.en"],
                                          "--paired-bs", "--metrics", "bleu", "--json"]).stdout)
    assert [r["system"] for r in rows] == [f"Baseline: {f['base.en']}", f["sys.en"]]
    assert rows[1]["BLEU"]["p_value"] is not None and rows[0]["BLEU"]["p_value"] is None
    result = runner.invoke(app, ["eval", "-r", f["ref.en"], "-s", f["base.en"], "--paired-bs"])
    assert result.exit_code == 1 and "at least two" in result.stderr


def test_eval_for_a_japanese_target_needs_mecab_or_says_what_to_install(tmp_path):
    import importlib.util

    (tmp_path / "r.ja").write_text("猫が好きです。\n", encoding="utf-8")
    result = runner.invoke(app, ["eval", "-r", str(tmp_path / "r.ja"), "-s", str(tmp_path / "r.ja"), "-l", "en-ja",
                                 "--metrics", "bleu"])
    if importlib.util.find_spec("MeCab") is None:
        assert result.exit_code == 1 and result.stderr == "mt: error: BLEU for a 'ja' target needs its tokenizer: " \
                                                          "pip install 'sacrebleu[ja]'\n"
    else:
        assert result.exit_code == 0 and "tok:ja-mecab" in result.stdout
    result = runner.invoke(app, ["eval", "-r", str(tmp_path / "r.ja"), "-s", str(tmp_path / "r.ja"), "-l", "ja"])
    assert result.exit_code == 1 and "--language-pair 'ja': give SRC-TGT" in result.stderr
