"""A run's tokenizer and data, ready to train on: reuse or train SentencePiece, read, tokenize, clean.

The tokenizer is the run's own file (``Run.tokenizer_paths``): reused when present, copied in from
``tokenizer.src_model``/``tgt_model``, used in place when the config names the run's own file, or
trained on the training corpus. Splits are tokenized once into ``mt.cache`` (compact ids on disk,
shared by every run that uses the same corpus and tokenizer) and cleaned with whole columns.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mt.config import Config, ConfigError
from mt.data import CorpusError, ParallelData, clean, content_key, read_all, read_pairs, tokenized
from mt.run import Run
from mt.tokenizer import Tokenizer, train_sentencepiece


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _sentences(cfg: Config, side: int) -> Iterator[str]:
    """One side (0: source, 1: target) of the training corpus, read again from its files."""
    data = cfg.data
    for chunk in read_pairs(data.train, data.src_lang, data.tgt_lang, data.cache_dir):
        yield from chunk[side]


def tokenizers_in_place(cfg: Config, run: Run) -> tuple[Path, ...]:
    """The configured tokenizer files that already are the run's own files (``mt tokenizer train -o
    RUN/spm.model``): used where they are, never replaced."""
    ours = {p.resolve() for p in run.tokenizer_paths(cfg.tokenizer.joint)}
    named = [Path(m) for m in (cfg.tokenizer.src_model, cfg.tokenizer.tgt_model) if m]
    return tuple(p for p in named if p.resolve() in ours)


def prepare_tokenizers(cfg: Config, run: Run, log: Callable[[str], None]) -> tuple[Tokenizer, Tokenizer]:
    """Reuse the run's tokenizer, copy the configured one in, or train SentencePiece on the training
    corpus."""
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
            yield from _sentences(cfg, 0)
            yield from _sentences(cfg, 1)
        run.own(src_path)
        train_sentencepiece(both(), src_path, **options)
    else:
        run.own(src_path, tgt_path)
        train_sentencepiece(_sentences(cfg, 0), src_path, **options)
        train_sentencepiece(_sentences(cfg, 1), tgt_path, **options)
    log(f"trained SentencePiece {tok.type} ({'joint' if tok.joint else 'separate'}, {tok.vocab_size} pieces) "
        f"in {time.time() - t0:.1f}s -> {src_path.name}" + ("" if tok.joint else f", {tgt_path.name}"))
    return Tokenizer(src_path), Tokenizer(tgt_path)


def load_split(cfg: Config, which: str, src_tok: Tokenizer, tgt_tok: Tokenizer,
               progress: bool | None = None, log: Callable[[str], None] | None = None) -> ParallelData:
    """Tokenize (or find in the cache) and clean one split. Training pairs get the full cleaning;
    validation pairs only lose empty sides and what the model cannot hold, and keep their text
    (validation BLEU needs it)."""
    data = cfg.data
    corpus = getattr(data, which)
    store = tokenized(corpus, data.src_lang, data.tgt_lang, src_tok, tgt_tok, cache_dir=data.cache_dir,
                      num_proc=data.num_proc or cores(),
                      dedup=data.dedup and which == "train", log=log, progress=progress)
    if which == "train":
        rows, lengths, report = clean(store, data.max_len, data.max_ratio)
        text = None
    else:
        rows, lengths, report = clean(store, cfg.model.max_positions)
        text = read_all(corpus, data.src_lang, data.tgt_lang, data.cache_dir)
    if report.kept == 0:
        raise CorpusError(f"{corpus.describe()}: no pairs left after cleaning ({report})")
    return ParallelData(store, rows, lengths, report, text)


@dataclass
class Prepared:
    """What training reads: the run's tokenizers and the cleaned splits."""

    src_tok: Tokenizer
    tgt_tok: Tokenizer
    train: ParallelData
    valid: ParallelData | None
    corpus_key: dict  # ``data.content_key`` of the training corpus, taken before it was read


def prepare(cfg: Config, run: Run, log: Callable[[str], None],
            check: Callable[[Tokenizer, Tokenizer], None] | None = None, progress: bool | None = None) -> Prepared:
    """The run's tokenizer (reused, copied in or trained) and its training and validation splits;
    ``check`` sees the tokenizers before any text is tokenized (resume: are they the run's?)."""
    data = cfg.data
    if not data.train.is_set:
        raise ConfigError("data.train: no training corpus configured (set data.train.src and data.train.tgt)")
    corpus_key = content_key(data.train)
    src_tok, tgt_tok = prepare_tokenizers(cfg, run, log)
    if check is not None:
        check(src_tok, tgt_tok)
    train = load_split(cfg, "train", src_tok, tgt_tok, progress, log)
    log(f"train {data.train.describe()}: {train.report}")
    valid = None
    if data.valid.is_set:
        valid = load_split(cfg, "valid", src_tok, tgt_tok, progress, log)
        log(f"valid {data.valid.describe()}: {valid.report}")
    return Prepared(src_tok, tgt_tok, train, valid, corpus_key)


def prepare_caches(cfg: Config, log: Callable[[str], None], progress: bool | None = None) -> None:
    """``mt data prepare``: tokenize the training and validation corpora into the cache once, with
    the configured tokenizer, so that runs (and ranks) that follow start at once."""
    tok = cfg.tokenizer
    if not tok.src_model or not (tok.joint or tok.tgt_model):
        raise ConfigError("tokenizer.src_model: mt data prepare needs the tokenizer the runs will use "
                          "(train one with mt tokenizer train; separate vocabularies need tgt_model too)")
    src_tok = Tokenizer(tok.src_model)
    tgt_tok = src_tok if tok.joint else Tokenizer(tok.tgt_model)
    if not cfg.data.train.is_set:
        raise ConfigError("data.train: no training corpus configured (set data.train.src and data.train.tgt)")
    for which in ("train", "valid"):
        corpus = getattr(cfg.data, which)
        if not corpus.is_set:
            continue
        t0 = time.time()
        split = load_split(cfg, which, src_tok, tgt_tok, progress)
        store = split.corpus
        size = sum(f.stat().st_size for f in store.path.iterdir())
        log(f"{which} {corpus.describe()}: {len(store):,} pairs, {size / max(len(store), 1):.0f} bytes a pair "
            f"in {store.path} ({time.time() - t0:.1f}s); {split.report}")
