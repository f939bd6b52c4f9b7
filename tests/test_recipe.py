"""The recipe script end to end (tiny configs, a few seconds of training per direction) and the
reference configs themselves."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mt.config import load_config
from mt.device import slow_bf16_warning

ROOT = Path(__file__).resolve().parents[1]
MULTI30K = ROOT / "data" / "multi30k"


def write_head(src: Path, dst: Path, n: int) -> None:
    if not src.exists():
        pytest.fail(f"{src} is missing: run `make data`")
    with gzip.open(src, "rt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(n)]
    with gzip.open(dst, "wt", encoding="utf-8") as f:
        f.writelines(lines)


def test_reference_recipes_are_one_recipe_in_two_directions():
    de_en = load_config(ROOT / "configs" / "multi30k_de_en.yaml")
    en_de = load_config(ROOT / "configs" / "multi30k_en_de.yaml")
    assert (de_en.data.src_lang, de_en.data.tgt_lang) == ("de", "en")
    assert (en_de.data.src_lang, en_de.data.tgt_lang) == ("en", "de")
    assert en_de.data.train[0].src == de_en.data.train[0].tgt and en_de.data.valid.tgt == de_en.data.valid.src
    assert (en_de.model, en_de.tokenizer, en_de.decode) == (de_en.model, de_en.tokenizer, de_en.decode)
    assert {k: v for k, v in vars(en_de.train).items() if k != "run_dir"} == \
           {k: v for k, v in vars(de_en.train).items() if k != "run_dir"}
    # what makes `mt translate -m RUN` give the headline number: a budget, averaging, tuning on val
    assert de_en.train.max_time and de_en.train.average_last >= 2 and de_en.decode.tune_lenpen
    assert de_en.train.best_metric == "bleu"


def test_multi30k_script_trains_both_directions_and_writes_the_table(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 2000), ("val", 60), ("test_2016_flickr", 40)):
        for lang in ("de", "en"):
            write_head(MULTI30K / f"{split}.{lang}.gz", data / f"{split}.{lang}.gz", n)
    configs = tmp_path / "configs"
    configs.mkdir()
    for src, tgt in (("de", "en"), ("en", "de")):
        cfg = {
            "data": {"src_lang": src, "tgt_lang": tgt, "max_len": 64, "cache_dir": str(tmp_path / "cache"),
                     **{key: {"src": str(data / f"{split}.{src}.gz"), "tgt": str(data / f"{split}.{tgt}.gz")}
                        for key, split in (("train", "train"), ("valid", "val"))}},
            "tokenizer": {"vocab_size": 300},
            "model": {"d_model": 32, "n_heads": 2, "ffn_dim": 64, "encoder_layers": 1, "decoder_layers": 1,
                      "max_positions": 256},
            "train": {"max_steps": 12, "max_tokens": 1024, "lr": 3e-3, "warmup_steps": 4, "valid_every": 6,
                      "save_every": 3, "keep_checkpoints": 3, "average_last": 2, "valid_beam": 1,
                      "best_metric": "bleu"},
            "decode": {"beam": 2, "max_len_b": 5, "tune_beam": [1, 2], "tune_lenpen": [1.0]},
        }
        (configs / f"multi30k_{src}_{tgt}.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    out = tmp_path / "multi30k.md"
    env = {**os.environ, "CONFIGS": str(configs), "DATA": str(data), "RUNS": str(tmp_path / "runs"),
           "OUT": str(out), "MT": str(Path(sys.executable).parent / "mt")}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "multi30k.sh")], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    table = out.read_text(encoding="utf-8")
    rows = [line for line in table.splitlines() if line.startswith("| de→en") or line.startswith("| en→de")]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        bleu_test, chrf_test, bleu_val, chrf_val = map(float, cells[1:5])
        assert all(0 <= x <= 100 for x in (bleu_test, chrf_test, bleu_val, chrf_val))  # 12 steps: near 0
        assert cells[6] == "12"  # steps
    assert "BLEU|nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:" in table
    assert f"mt train {configs}/multi30k_de_en.yaml -o {tmp_path}/runs/multi30k_de_en" in table
    for pair, tgt in (("de_en", "en"), ("en_de", "de")):
        run = tmp_path / "runs" / f"multi30k_{pair}"
        chosen = yaml.safe_load((run / "decode.yaml").read_text())
        assert chosen["checkpoint"] in ("best", "average") and chosen["beam"] in (1, 2)
        assert len((run / f"test_2016_flickr.hyp.{tgt}").read_text(encoding="utf-8").split("\n")) == 41
        scores = json.loads((run / "test_2016_flickr.scores.json").read_text())
        assert [s["name"] for s in scores] == ["BLEU", "chrF2"]


def test_slow_bf16_warning_reads_the_cpu_flags(tmp_path):
    avx2 = tmp_path / "avx2"
    avx2.write_text("processor : 0\nflags : fpu sse sse2 avx avx2 fma f16c\n")
    zen4 = tmp_path / "zen4"
    zen4.write_text("processor : 0\nflags : fpu avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n")
    assert "no native bf16" in slow_bf16_warning(torch.device("cpu"), avx2)
    assert slow_bf16_warning(torch.device("cpu"), zen4) == ""
    assert slow_bf16_warning(torch.device("cuda"), avx2) == ""  # GPUs are not judged by CPU flags
    assert slow_bf16_warning(torch.device("cpu"), tmp_path / "missing") == ""  # cannot tell: no warning
