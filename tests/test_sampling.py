"""Subword regularisation (data.sampling_alpha): training batches segmented anew by SentencePiece's
sampling, the text unchanged, the draws a function of (seed, epoch, batch) alone."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mt import checkpoint as ckpt
from mt.config import ConfigError, load_config
from mt.prepare import load_split
from mt.tokenizer import EOS_ID, UNK_ID, Tokenizer
from mt.train import train

ROOT = Path(__file__).resolve().parents[1]

@pytest.fixture(scope="module")
def tok(spm_model) -> Tokenizer:
    return Tokenizer(spm_model)


def test_a_sample_is_the_same_text_in_other_pieces_and_follows_its_seed(tok, multi30k_head):
    texts = multi30k_head("train", "en", 50)
    rows = tok.encode(texts)
    sampled = tok.sample(rows, alpha=0.1, nbest=16, seed=7, limit=1000)
    assert tok.decode(sampled) == tok.decode(rows)  # the same sentences
    assert all(row[-1] == EOS_ID for row in sampled)
    assert sum(list(a) != list(b) for a, b in zip(sampled, rows)) >= 35  # most of them in other pieces
    assert tok.sample(rows, alpha=0.1, nbest=16, seed=7, limit=1000) == sampled  # the seed decides
    assert tok.sample(rows, alpha=0.1, nbest=16, seed=8, limit=1000) != sampled
    # alpha sharpens the draw towards the best segmentation
    peaked = tok.sample(rows, alpha=1.0, nbest=16, seed=7, limit=1000)
    assert sum(list(a) == list(b) for a, b in zip(peaked, rows)) > sum(list(a) == list(b) for a, b in zip(sampled, rows))
    # a sample too long for the limit, and a sentence with <unk> (its text would not come back), keep their ids
    longest = max(len(r) for r in rows)
    assert tok.sample(rows, alpha=0.1, nbest=16, seed=7, limit=2) == rows
    with_unk = [rows[0][:2] + [UNK_ID] + rows[0][2:]]
    assert tok.sample(with_unk, alpha=0.1, nbest=16, seed=7, limit=longest + 10) == with_unk


def test_the_draws_are_the_same_in_another_process(tok, spm_model, multi30k_head):
    """What SentencePiece's own seeded sampling does not give (so mt draws with numpy)."""
    rows = tok.encode(multi30k_head("train", "de", 30))
    program = ("import sys, json; from mt.tokenizer import Tokenizer; t = Tokenizer(sys.argv[1]); "
               "rows = json.loads(sys.stdin.read()); "
               "print(json.dumps(t.sample(rows, alpha=0.2, nbest=8, seed=11, limit=1000)))")
    out = subprocess.run([sys.executable, "-c", program, str(spm_model)], input=json.dumps(rows), text=True,
                         capture_output=True, check=True, cwd=ROOT).stdout
    assert json.loads(out) == tok.sample(rows, alpha=0.2, nbest=8, seed=11, limit=1000)


def test_training_batches_are_sampled_per_epoch_and_not_elsewhere(tmp_path, cache_dir, multi30k_head, spm_model, tok):
    for lang in ("de", "en"):
        (tmp_path / f"train.{lang}").write_text("\n".join(multi30k_head("train", lang, 100)) + "\n", encoding="utf-8")
    values = {"data.train.src": tmp_path / "train.de", "data.train.tgt": tmp_path / "train.en",
              "data.cache_dir": cache_dir, "tokenizer.src_model": spm_model, "data.sampling_alpha": 0.2}
    cfg = load_config(None, [f"{k}={v}" for k, v in values.items()])
    split = load_split(cfg, "train", tok, tok, progress=False)
    indices = np.arange(20)
    plain = split.batch(indices)  # no epoch (validation, the zero-weight batch): the cached pieces
    first, again, second = split.batch(indices, 0), split.batch(indices, 0), split.batch(indices, 1)
    assert torch.equal(first.src, again.src) and torch.equal(first.tgt_out, again.tgt_out)
    assert not torch.equal(first.src, second.src) and not torch.equal(first.src[:, :plain.src.shape[1]], plain.src)

    def text(t: torch.Tensor) -> list[str]:
        return tok.decode(t.tolist())

    for batch in (first, second):
        assert text(batch.src) == text(plain.src) and text(batch.tgt_out) == text(plain.tgt_out)


@pytest.mark.parametrize("key, value, message", [("data.sampling_alpha", 1.5, "between 0 and 1"),
                                                 ("data.sampling_alpha", -0.1, "between 0 and 1"),
                                                 ("data.sampling_nbest", 1, "at least 2"),
                                                 ("tokenizer.type", "bpe", "needs tokenizer.type unigram")])
def test_bad_sampling_settings_are_refused_with_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.sampling_alpha=0.2", f"{key}={value}"])


def test_sampled_training_resumed_mid_epoch_is_the_uninterrupted_run(tmp_path, cache_dir, multi30k_head, spm_model):
    for split, n in (("train", 200), ("val", 20)):
        for lang in ("de", "en"):
            (tmp_path / f"{split}.{lang}").write_text("\n".join(multi30k_head(split, lang, n)) + "\n", encoding="utf-8")

    def config(run_dir: Path, alpha: float = 0.2, **train_keys):
        values = {"data.train.src": tmp_path / "train.de", "data.train.tgt": tmp_path / "train.en",
                  "data.valid.src": tmp_path / "val.de", "data.valid.tgt": tmp_path / "val.en",
                  "data.cache_dir": cache_dir, "data.max_len": 64, "data.sampling_alpha": alpha,
                  "tokenizer.src_model": spm_model, "model.d_model": 32, "model.n_heads": 2, "model.ffn_dim": 64,
                  "model.encoder_layers": 1, "model.decoder_layers": 1, "model.max_positions": 128,
                  "train.run_dir": run_dir, "train.max_tokens": 512, "train.max_steps": 24, "train.valid_every": 1000,
                  "train.log_every": 1, "train.lr": 0.003, "train.warmup_steps": 4, "train.device": "cpu",
                  "train.num_threads": 1, **{f"train.{k}": v for k, v in train_keys.items()}}
        return load_config(None, [f"{k}={v}" for k, v in values.items()])

    whole, resumed, unsampled = tmp_path / "whole", tmp_path / "resumed", tmp_path / "unsampled"
    quiet = {"log": lambda m: None, "progress": False}
    train(config(whole, prefetch=2), **quiet)
    train(config(resumed, max_steps=11), **quiet)  # mid-epoch (an epoch is ~20 updates), no prefetching
    train(config(resumed, seed=9), resume=True, **quiet)  # the run keeps its seed: batches and draws
    train(config(unsampled, alpha=0.0), **quiet)
    a, b, c = (ckpt.load(d / "checkpoints" / "last.pt") for d in (whole, resumed, unsampled))
    assert a["trainer"]["step"] == b["trainer"]["step"] == 24 and a["trainer"]["epoch"] >= 1
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # same batches, same pieces
    assert not all(torch.equal(a["model"][k], c["model"][k]) for k in a["model"])  # sampling changed them


def test_a_bpe_tokenizer_with_sampling_is_refused_before_training(tmp_path, cache_dir, multi30k_head):
    from mt.tokenizer import train_sentencepiece

    bpe = train_sentencepiece(multi30k_head("train", "en", 500) + multi30k_head("train", "de", 500),
                              tmp_path / "bpe.model", vocab_size=300, model_type="bpe", num_threads=1)
    for lang in ("de", "en"):
        (tmp_path / f"train.{lang}").write_text("\n".join(multi30k_head("train", lang, 50)) + "\n", encoding="utf-8")
    values = {"data.train.src": tmp_path / "train.de", "data.train.tgt": tmp_path / "train.en",
              "data.cache_dir": cache_dir, "tokenizer.src_model": bpe, "data.sampling_alpha": 0.2}
    cfg = load_config(None, [f"{k}={v}" for k, v in values.items()])
    bpe_tok = Tokenizer(bpe)
    assert not bpe_tok.can_sample
    with pytest.raises(ConfigError, match="data.sampling_alpha: .*unigram"):
        load_split(cfg, "train", bpe_tok, bpe_tok, progress=False)
