"""A run's tokenizer and data, ready to train on: reuse or train SentencePiece, read, tokenize, clean.

The tokenizer is the run's own file (``Run.tokenizer_paths``): reused when present, copied in from
``tokenizer.src_model``/``tgt_model``, used in place when the config names the run's own file, or
trained on the training corpus. Splits are tokenized once into ``mt.cache`` (compact ids on disk,
shared by every run that uses the same corpus and tokenizer) and cleaned with whole columns.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mt.config import Config, ConfigError, CorpusConfig
from mt.data import CorpusError, ParallelData, Part, Sampling, clean, content_key, read_all, read_pairs, tokenized
from mt.progress import bar
from mt.run import Run
from mt.tokenizer import Tokenizer, cores, train_sentencepiece


def _sentences(cfg: Config, side: int) -> Iterator[str]:
    """One side (0: source, 1: target) of the training corpora (each once, whatever its weight),
    read again from their files."""
    data = cfg.data
    for corpus in data.train:
        for chunk in read_pairs(corpus, data.src_lang, data.tgt_lang, data.cache_dir):
            yield from chunk[side]


def tokenizers_in_place(cfg: Config, run: Run) -> tuple[Path, ...]:
    """The configured tokenizer files that already are the run's own files (``mt tokenizer train -o
    RUN/spm.model``): used where they are, never replaced."""
    ours = {p.resolve() for p in run.tokenizer_paths(cfg.tokenizer.joint)}
    named = [Path(m) for m in (cfg.tokenizer.src_model, cfg.tokenizer.tgt_model) if m]
    return tuple(p for p in named if p.resolve() in ours)


def prepare_tokenizers(cfg: Config, run: Run, log: Callable[[str], None],
                       progress: bool | None = None) -> tuple[Tokenizer, Tokenizer]:
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
                   input_sentence_size=tok.input_sentence_size, seed=cfg.train.seed)
    t0 = time.time()

    def shown(sentences: Iterator[str], what: str) -> Iterator[str]:
        with bar(progress, desc=f"reading {what} for SentencePiece", unit=" sentences", unit_scale=True,
                 leave=False) as counter:
            for sentence in sentences:
                counter.update(1)
                yield sentence

    if tok.joint:
        def both() -> Iterator[str]:
            yield from _sentences(cfg, 0)
            yield from _sentences(cfg, 1)
        run.own(src_path)
        train_sentencepiece(shown(both(), "both sides"), src_path, **options)
    else:
        run.own(src_path, tgt_path)
        train_sentencepiece(shown(_sentences(cfg, 0), "the source side"), src_path, **options)
        train_sentencepiece(shown(_sentences(cfg, 1), "the target side"), tgt_path, **options)
    log(f"trained SentencePiece {tok.type} ({'joint' if tok.joint else 'separate'}, {tok.vocab_size} pieces) "
        f"in {time.time() - t0:.1f}s -> {src_path.name}" + ("" if tok.joint else f", {tgt_path.name}"))
    return Tokenizer(src_path), Tokenizer(tgt_path)


def _part(cfg: Config, corpus: CorpusConfig, training: bool, src_tok: Tokenizer, tgt_tok: Tokenizer,
          progress: bool | None, log: Callable[[str], None] | None) -> Part:
    """One corpus tokenized (or found in the cache) and cleaned: training pairs get the full
    cleaning; validation pairs only lose empty sides and what the model cannot hold."""
    data = cfg.data
    store = tokenized(corpus, data.src_lang, data.tgt_lang, src_tok, tgt_tok, cache_dir=data.cache_dir,
                      num_proc=data.num_proc or cores(), dedup=data.dedup and training, log=log, progress=progress)
    if training:
        rows, lengths, skews, report = clean(store, data.max_len, data.max_ratio)
    else:
        rows, lengths, skews, report = clean(store, cfg.model.max_positions)
    if report.kept == 0:
        raise CorpusError(f"{corpus.describe()}: no pairs left after cleaning ({report})")
    return Part(store, rows, lengths, report, corpus.weight, skews)


def sampling_for(cfg: Config, src_tok: Tokenizer, tgt_tok: Tokenizer, seed: int) -> Sampling | None:
    """The subword regularisation of training batches that ``cfg.data`` asks for (None: off)."""
    data = cfg.data
    if not data.sampling_alpha:
        return None
    if not (src_tok.can_sample and tgt_tok.can_sample):
        raise ConfigError("data.sampling_alpha: sampling segmentations needs a unigram SentencePiece "
                          "model; the run's tokenizer is not one")
    return Sampling(src_tok, tgt_tok, data.sampling_alpha, data.sampling_nbest, seed, data.max_len)


def describe_sampling(s: Sampling) -> str:
    return f"train: subword regularisation: each batch segmented anew by sampling (alpha {s.alpha:g}, nbest {s.nbest})"


def load_split(cfg: Config, which: str, src_tok: Tokenizer, tgt_tok: Tokenizer,
               progress: bool | None = None, log: Callable[[str], None] | None = None,
               seed: int | None = None) -> ParallelData:
    """The training corpora (each logged with its counts and weight; fractional weights drawn with
    ``seed``, default train.seed), or the validation split with its text (validation BLEU needs it)."""
    data = cfg.data
    say = log or (lambda _: None)
    if which == "train":
        parts = []
        for corpus in data.train:
            parts.append(_part(cfg, corpus, True, src_tok, tgt_tok, progress, log))
            say(f"train {corpus.describe()}: {parts[-1].report}"
                + (f", weight {corpus.weight:g}" if len(data.train) > 1 or corpus.weight != 1 else ""))
        seed = cfg.train.seed if seed is None else seed  # a resumed run's: its checkpoint's
        split = ParallelData(parts, seed=seed, sampling=sampling_for(cfg, src_tok, tgt_tok, seed))
        if len(parts) > 1:
            say(f"train: {len(split):,} examples an epoch from {len(parts)} corpora")
        if split.sampling is not None:
            say(describe_sampling(split.sampling))
        return split
    corpus = getattr(data, which)
    part = _part(cfg, corpus, False, src_tok, tgt_tok, progress, log)
    say(f"{which} {corpus.describe()}: {part.report}")
    return ParallelData([part], read_all(corpus, data.src_lang, data.tgt_lang, data.cache_dir))


@dataclass
class Prepared:
    """What training reads: the run's tokenizers and the cleaned splits."""

    src_tok: Tokenizer
    tgt_tok: Tokenizer
    train: ParallelData
    valid: ParallelData | None
    corpus_key: list[dict]  # ``data.content_key`` of each training corpus, taken before it was read


def require_training_corpus(cfg: Config) -> None:
    if not cfg.data.train or not all(corpus.is_set for corpus in cfg.data.train):
        raise ConfigError("data.train: no training corpus configured (set data.train.src and data.train.tgt)")


def prepare(cfg: Config, run: Run, log: Callable[[str], None],
            check: Callable[[Tokenizer, Tokenizer], None] | None = None, progress: bool | None = None,
            seed: int | None = None) -> Prepared:
    """The run's tokenizer (reused, copied in or trained) and its training and validation splits;
    ``check`` sees the tokenizers before any text is tokenized (resume: are they the run's?)."""
    data = cfg.data
    require_training_corpus(cfg)
    corpus_key = [content_key(corpus) for corpus in data.train]
    src_tok, tgt_tok = prepare_tokenizers(cfg, run, log, progress)
    if check is not None:
        check(src_tok, tgt_tok)
    train = load_split(cfg, "train", src_tok, tgt_tok, progress, log, seed)
    valid = load_split(cfg, "valid", src_tok, tgt_tok, progress, log) if data.valid.is_set else None
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
    require_training_corpus(cfg)
    for which in ("train", "valid"):
        if which == "valid" and not cfg.data.valid.is_set:
            continue
        t0 = time.time()
        split = load_split(cfg, which, src_tok, tgt_tok, progress, log)
        for part in split.parts:
            store = part.corpus
            size = sum(f.stat().st_size for f in store.path.iterdir())
            log(f"{which} cache {store.path}: {len(store):,} pairs, {size / max(len(store), 1):.0f} bytes a pair")
        log(f"{which}: ready in {time.time() - t0:.1f}s")
