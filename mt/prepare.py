"""A run's tokenizer and data, ready to train on: reuse or train SentencePiece, read, tokenize, clean.

The tokenizer is the run's own file (``Run.tokenizer_paths``): reused when present, copied in from
``tokenizer.src_model``/``tgt_model``, used in place when the config names the run's own file, or
trained on the training corpus. Splits are read and tokenized through ``mt.data`` (Arrow, cached).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mt.config import Config, ConfigError
from mt.data import CorpusError, ParallelData, clean, content_key, load_corpus, tokenize
from mt.run import Run
from mt.tokenizer import Tokenizer, train_sentencepiece


def _text_stream(ds, column: str) -> Iterator[str]:
    for batch in ds.iter(batch_size=10_000):
        yield from batch[column]


def tokenizers_in_place(cfg: Config, run: Run) -> tuple[Path, ...]:
    """The configured tokenizer files that already are the run's own files (``mt tokenizer train -o
    RUN/spm.model``): used where they are, never replaced."""
    ours = {p.resolve() for p in run.tokenizer_paths(cfg.tokenizer.joint)}
    named = [Path(m) for m in (cfg.tokenizer.src_model, cfg.tokenizer.tgt_model) if m]
    return tuple(p for p in named if p.resolve() in ours)


def prepare_tokenizers(cfg: Config, run: Run, train_ds, log: Callable[[str], None]) -> tuple[Tokenizer, Tokenizer]:
    """Reuse the run's tokenizer, copy the configured one in, or train SentencePiece on ``train_ds``."""
    tok = cfg.tokenizer
    src_path, tgt_path = run.tokenizer_paths(tok.joint)
    if src_path.exists() and tgt_path.exists():
        return Tokenizer(src_path), Tokenizer(tgt_path)
    if tok.src_model:
        if not tok.joint and not tok.tgt_model:
            raise ConfigError("tokenizer.tgt_model: needed with tokenizer.src_model when joint is false")
        for given, path in ((tok.src_model, src_path), (tok.tgt_model, tgt_path)):
            if given and not path.exists():
                run.own(path)
                Tokenizer(given).save(path)
        return Tokenizer(src_path), Tokenizer(tgt_path)
    options = dict(vocab_size=tok.vocab_size, model_type=tok.type, character_coverage=tok.character_coverage,
                   input_sentence_size=tok.input_sentence_size)
    t0 = time.time()
    if tok.joint:
        def both() -> Iterator[str]:
            yield from _text_stream(train_ds, "src")
            yield from _text_stream(train_ds, "tgt")
        run.own(src_path)
        train_sentencepiece(both(), src_path, **options)
    else:
        run.own(src_path, tgt_path)
        train_sentencepiece(_text_stream(train_ds, "src"), src_path, **options)
        train_sentencepiece(_text_stream(train_ds, "tgt"), tgt_path, **options)
    log(f"trained SentencePiece {tok.type} ({'joint' if tok.joint else 'separate'}, {tok.vocab_size} pieces) "
        f"in {time.time() - t0:.1f}s -> {src_path.name}" + ("" if tok.joint else f", {tgt_path.name}"))
    return Tokenizer(src_path), Tokenizer(tgt_path)


def load_split(cfg: Config, which: str, src_tok: Tokenizer, tgt_tok: Tokenizer, raw=None) -> ParallelData:
    """Read, tokenize and clean one split. Training pairs get the full cleaning; validation pairs only
    lose empty sides and what the model cannot hold."""
    data = cfg.data
    corpus = getattr(data, which)
    raw = raw if raw is not None else load_corpus(corpus, data.src_lang, data.tgt_lang, data.cache_dir)
    ds = tokenize(raw, src_tok, tgt_tok, data.num_proc)
    if which == "train":
        ds, report = clean(ds, data.max_len, data.max_ratio)
    else:
        ds, report = clean(ds, cfg.model.max_positions)
    if report.kept == 0:
        raise CorpusError(f"{corpus.describe()}: no pairs left after cleaning ({report})")
    return ParallelData(ds, report)


@dataclass
class Prepared:
    """What training reads: the run's tokenizers and the cleaned splits."""

    src_tok: Tokenizer
    tgt_tok: Tokenizer
    train: ParallelData
    valid: ParallelData | None
    corpus_key: dict  # ``data.content_key`` of the training corpus, taken before it was read


def prepare(cfg: Config, run: Run, log: Callable[[str], None],
            check: Callable[[Tokenizer, Tokenizer], None] | None = None) -> Prepared:
    """The run's tokenizer (reused, copied in or trained) and its training and validation splits;
    ``check`` sees the tokenizers before any text is tokenized (resume: are they the run's?)."""
    data = cfg.data
    if not data.train.is_set:
        raise ConfigError("data.train: no training corpus configured (set data.train.src and data.train.tgt)")
    corpus_key = content_key(data.train)
    raw_train = load_corpus(data.train, data.src_lang, data.tgt_lang, data.cache_dir)
    src_tok, tgt_tok = prepare_tokenizers(cfg, run, raw_train, log)
    if check is not None:
        check(src_tok, tgt_tok)
    train = load_split(cfg, "train", src_tok, tgt_tok, raw=raw_train)
    log(f"train {data.train.describe()}: {train.report}")
    valid = None
    if data.valid.is_set:
        valid = load_split(cfg, "valid", src_tok, tgt_tok)
        log(f"valid {data.valid.describe()}: {valid.report}")
    return Prepared(src_tok, tgt_tok, train, valid, corpus_key)
