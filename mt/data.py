"""Parallel corpora: reading, the tokenized cache, cleaning, token-budget batching.

Corpora are read from two plain-text files (``.gz`` allowed), a TSV or JSONL file, or a Hugging Face
hub dataset, in chunks. Text files are split on ``\\n`` only — ``str.splitlines`` would also split on
U+2028, ``\\x85`` or ``\\x0c`` and shift the pairs. Tokenized pairs live in ``mt.cache`` (compact ids
on disk, built once per corpus and tokenizer, read without mapping). Pairs are filtered jointly
(never one side alone), with whole length columns, and every dropped pair is counted. Training
batches come from a token-budget sampler (fairseq-style length buckets, reshuffled every epoch
from a seed), computed with numpy: an epoch's batches depend on (seed, epoch) only, so training
resumes mid-epoch on the same batches.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import itertools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mt import cache
from mt.batch import Batch, collate
from mt.config import CorpusConfig
from mt.errors import MtError
from mt.progress import bar
from mt.tokenizer import Tokenizer

CACHE_KEY_VERSION = "3"  # bump when reading or tokenizing changes what a cache holds
CHUNK = 20_000  # pairs read (and sent to a tokenizing process) at a time


class CorpusError(MtError):
    """A corpus file is missing or malformed; the message names the file (and line)."""


# --------------------------------------------------------------------------------------------------
# Reading


def _open_binary(path: Path):
    try:
        if path.suffix == ".gz":
            return gzip.open(path, "rb")
        return open(path, "rb")
    except OSError as e:
        raise CorpusError(f"{path}: cannot open ({e.strerror})") from None


BLOCK = 1 << 20  # bytes read at a time
NEWLINE = b"\n"


def read_line_blocks(path: str | Path, strip: bool = True) -> Iterator[list[str]]:
    """The lines of a UTF-8 text file (``.gz`` allowed) a block at a time, split on ``\\n`` only;
    with ``strip``, surrounding whitespace is removed (else only the line break). A block of lines is
    decoded and split at once (a newline byte is never inside a UTF-8 sequence), so reading costs
    little next to tokenizing."""
    path = Path(path)
    with _open_binary(path) as f:
        lineno, rest = 0, b""
        while True:
            try:
                data = f.read(BLOCK)
            except (OSError, EOFError) as e:  # truncated or corrupt gzip
                where = lineno + rest.count(NEWLINE) + 1
                raise CorpusError(f"{path}:{where}: cannot read ({e})") from None
            data, last = rest + data, not data
            cut = len(data) if last else data.rfind(b"\n") + 1
            block, rest = data[:cut], data[cut:]
            if block:
                try:
                    text = block.decode("utf-8")
                except UnicodeDecodeError as e:
                    start = block.rfind(NEWLINE, 0, e.start) + 1
                    where = lineno + block.count(NEWLINE, 0, start) + 1
                    raise CorpusError(f"{path}:{where}: invalid UTF-8 at byte {e.start - start}") from None
                lines = text.split("\n")
                if lines[-1] == "" and text.endswith("\n"):
                    lines.pop()
                lineno += len(lines)
                yield [line.strip() for line in lines] if strip else [line.rstrip("\r") for line in lines]
            if last:
                return


def read_lines(path: str | Path, strip: bool = True) -> Iterator[str]:
    """``read_line_blocks``, line by line."""
    for block in read_line_blocks(path, strip):
        yield from block


def _text_pair_chunks(src: str, tgt: str, size: int) -> Iterator[tuple[list[str], list[str]]]:
    """Aligned chunks of ``size`` lines from two text files; their line counts must agree."""
    blocks = {"src": read_line_blocks(src), "tgt": read_line_blocks(tgt)}
    lines: dict[str, list[str]] = {"src": [], "tgt": []}
    ended = {"src": False, "tgt": False}
    seen = 0
    while True:
        for side in ("src", "tgt"):
            while len(lines[side]) < size and not ended[side]:
                block = next(blocks[side], None)
                if block is None:
                    ended[side] = True
                else:
                    lines[side] += block
        k = min(len(lines["src"]), len(lines["tgt"]), size)
        if k < size and len(lines["src"]) != len(lines["tgt"]):
            counts = {side: seen + len(lines[side]) + sum(len(b) for b in blocks[side]) for side in ("src", "tgt")}
            raise CorpusError(f"line counts differ: {src} has {counts['src']} lines, {tgt} has {counts['tgt']}")
        if k == 0:
            return
        yield lines["src"][:k], lines["tgt"][:k]
        del lines["src"][:k], lines["tgt"][:k]
        seen += k


def _read_text_pair(src: str, tgt: str) -> Iterator[tuple[str, str]]:
    for sources, targets in _text_pair_chunks(src, tgt, CHUNK):
        yield from zip(sources, targets)


def _read_tsv(path: str) -> Iterator[tuple[str, str]]:
    for lineno, line in enumerate(read_lines(path, strip=False), start=1):
        fields = line.split("\t")
        if len(fields) != 2:
            raise CorpusError(f"{path}:{lineno}: expected 2 tab-separated fields, found {len(fields)}")
        yield fields[0].strip(), fields[1].strip()


def _pair_from_record(record: object, src_lang: str, tgt_lang: str) -> tuple[str, str] | None:
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("translation"), dict):
        record = record["translation"]
    for s_key, t_key in (("src", "tgt"), (src_lang, tgt_lang)):
        s, t = record.get(s_key), record.get(t_key)
        if isinstance(s, str) and isinstance(t, str):
            return s, t
    return None


def _read_jsonl(path: str, src_lang: str, tgt_lang: str) -> Iterator[tuple[str, str]]:
    for lineno, line in enumerate(read_lines(path), start=1):
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        pair = _pair_from_record(record, src_lang, tgt_lang)
        if pair is None:
            raise CorpusError(f"{path}:{lineno}: expected {{\"src\": .., \"tgt\": ..}} or "
                              f"{{\"translation\": {{\"{src_lang}\": .., \"{tgt_lang}\": ..}}}}")
        yield pair[0].strip(), pair[1].strip()


def _pairs(corpus: CorpusConfig, src_lang: str, tgt_lang: str, cache_dir: str) -> Iterator[tuple[str, str]]:
    if corpus.hub:
        yield from _hub_pairs(corpus, src_lang, tgt_lang, cache_dir)
    elif corpus.path.endswith((".tsv", ".tsv.gz")):
        yield from _read_tsv(corpus.path)
    elif corpus.path.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
        yield from _read_jsonl(corpus.path, src_lang, tgt_lang)
    else:
        raise CorpusError(f"{corpus.path}: unknown corpus format; use .tsv or .jsonl (optionally .gz), "
                          "or give src and tgt text files")


def read_pairs(corpus: CorpusConfig, src_lang: str, tgt_lang: str, cache_dir: str = "",
               chunk_size: int = CHUNK) -> Iterator[tuple[list[str], list[str]]]:
    """The corpus's (sources, targets) in order, ``chunk_size`` pairs at a time."""
    if corpus.src and not corpus.hub:
        _stamp([corpus.src, corpus.tgt])  # both files must exist before either is read
        yield from _text_pair_chunks(corpus.src, corpus.tgt, chunk_size)
        return
    pairs = _pairs(corpus, src_lang, tgt_lang, cache_dir)
    while True:
        chunk = list(itertools.islice(pairs, chunk_size))
        if not chunk:
            return
        yield [s for s, _ in chunk], [t for _, t in chunk]


def read_all(corpus: CorpusConfig, src_lang: str, tgt_lang: str, cache_dir: str = "") -> tuple[list[str], list[str]]:
    """The whole corpus as two lists (for small splits: validation, tests)."""
    src, tgt = [], []
    for s, t in read_pairs(corpus, src_lang, tgt_lang, cache_dir):
        src += s
        tgt += t
    return src, tgt


def _stamp(paths: list[str]) -> str:
    """Identify file contents cheaply (path, size, mtime) so a changed file is read again."""
    parts = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError as e:
            raise CorpusError(f"{p}: cannot open ({e.strerror})") from None
        parts.append(f"{os.path.abspath(p)}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


SAMPLE_BLOCK = 1 << 16  # bytes hashed at each sampled place of a big file
SAMPLE_BLOCKS = 64
WHOLE_FILE = 16 << 20  # files up to this size are hashed whole


def _sampled_digest(path: str, size: int) -> str:
    """SHA-256 of a file, whole when small (<= 16 MiB), else of 64 evenly spaced 64 KiB blocks and
    the last one: milliseconds for any size. With the size, it catches any edit of a small file and
    any edit that changes a big file's size; a same-size edit of a big file outside the sampled
    blocks (two equal-length lines swapped) goes unseen."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= WHOLE_FILE:
            h.update(f.read())
        else:
            for i in range(SAMPLE_BLOCKS + 1):
                f.seek(min(i * (size // SAMPLE_BLOCKS), size - SAMPLE_BLOCK))
                h.update(f.read(SAMPLE_BLOCK))
    return h.hexdigest()[:32]


def _corpus_files(corpus: CorpusConfig) -> list[str]:
    return [p for p in (corpus.src, corpus.tgt, corpus.path) if p]


def content_key(corpus: CorpusConfig) -> dict:
    """What a corpus holds, cheaply: size, mtime and a sampled hash of each file (a hub corpus: its
    name). Stored in checkpoints, so resume can tell an edited corpus from a copy (``same_content``)."""
    if corpus.hub:
        return {"hub": corpus.describe()}
    keys = []
    for path in _corpus_files(corpus):
        try:
            st = os.stat(path)
        except OSError as e:
            raise CorpusError(f"{path}: cannot open ({e.strerror})") from None
        keys.append({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sample": _sampled_digest(path, st.st_size)})
    return {"files": keys}


def same_content(saved: dict, corpus: CorpusConfig) -> bool:
    """Whether ``corpus`` still holds what ``content_key`` saw: same sizes, and an unchanged mtime
    (the fast path) or else the same sampled hash, so a byte-identical copy (``cp``, ``rsync``) is the
    same corpus and a file edited in place is not (within ``_sampled_digest``'s reach)."""
    if "hub" in saved or corpus.hub:
        return saved.get("hub") == (corpus.describe() if corpus.hub else None)
    paths = _corpus_files(corpus)
    if len(paths) != len(saved.get("files", [])):
        return False
    for key, path in zip(saved["files"], paths):
        try:
            st = os.stat(path)
        except OSError as e:
            raise CorpusError(f"{path}: cannot open ({e.strerror})") from None
        if st.st_size != key["size"]:
            return False
        if st.st_mtime_ns != key["mtime_ns"] and _sampled_digest(path, st.st_size) != key["sample"]:
            return False
    return True


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _hub_dataset(corpus: CorpusConfig, cache_dir: str):
    """The hub dataset, downloaded into (or read from) Hugging Face's cache (``data.cache_dir``/hub
    when set)."""
    # imported here: reading local files (every test, most users) never pays for importing datasets
    import datasets

    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity_error()  # its info lines, for this call only; progress bars stay the user's
    try:
        return datasets.load_dataset(corpus.hub, corpus.hub_config or None, split=corpus.split,
                                     cache_dir=str(Path(cache_dir) / "hub") if cache_dir else None)
    except Exception as e:  # network, unknown name, unknown split: all user-facing
        raise CorpusError(f"hub:{corpus.hub}: cannot load ({type(e).__name__}: {e})") from None
    finally:
        datasets.logging.set_verbosity(verbosity)


def _hub_pairs(corpus: CorpusConfig, src_lang: str, tgt_lang: str, cache_dir: str) -> Iterator[tuple[str, str]]:
    ds = _hub_dataset(corpus, cache_dir)
    columns = set(ds.column_names)
    if "translation" in columns:
        for batch in ds.iter(batch_size=CHUNK):
            for t in batch["translation"]:
                yield t[src_lang].strip(), t[tgt_lang].strip()
    elif {src_lang, tgt_lang} <= columns or {"src", "tgt"} <= columns:
        s_key, t_key = ("src", "tgt") if {"src", "tgt"} <= columns else (src_lang, tgt_lang)
        for batch in ds.iter(batch_size=CHUNK):
            for s, t in zip(batch[s_key], batch[t_key]):
                yield s.strip(), t.strip()
    else:
        raise CorpusError(f"hub:{corpus.hub}: no 'translation', '{src_lang}'/'{tgt_lang}' or 'src'/'tgt' "
                          f"columns (has {', '.join(sorted(columns))})")


def cache_root(cache_dir: str = "") -> Path:
    """Where tokenized corpora are cached: ``data.cache_dir``, else ``$XDG_CACHE_HOME/mt`` (~/.cache/mt)."""
    if cache_dir:
        return Path(cache_dir)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mt"


def cache_path(corpus: CorpusConfig, src_lang: str, tgt_lang: str, src_tok: Tokenizer, tgt_tok: Tokenizer,
               cache_dir: str = "", dedup: bool = False) -> Path:
    """The cache of ``corpus`` tokenized by these tokenizers, keyed by what the files are (path, size,
    mtime; a hub corpus: its name), the languages, the tokenizers' fingerprints and ``dedup``."""
    if corpus.hub:  # the dataset's own fingerprint: a new revision is another cache
        stamp = f"hub:{corpus.hub}:{corpus.hub_config}:{corpus.split}:{_hub_dataset(corpus, cache_dir)._fingerprint}"
    else:
        stamp = _stamp(_corpus_files(corpus))
    key = _digest(CACHE_KEY_VERSION, str(cache.VERSION), stamp, src_lang, tgt_lang, src_tok.fingerprint,
                  tgt_tok.fingerprint, "dedup" if dedup else "")
    return cache_root(cache_dir) / "tokenized" / key


def tokenized(corpus: CorpusConfig, src_lang: str, tgt_lang: str, src_tok: Tokenizer, tgt_tok: Tokenizer, *,
              cache_dir: str = "", num_proc: int = 1, dedup: bool = False,
              log=None, progress: bool | None = None) -> cache.TokenizedCorpus:
    """The tokenized cache of ``corpus``: opened when complete, else built first (``num_proc``
    processes; a cache left by a killed build is never used)."""
    path = cache_path(corpus, src_lang, tgt_lang, src_tok, tgt_tok, cache_dir, dedup)
    if not (path / "meta.json").exists():
        with bar(progress, desc=f"tokenizing {corpus.describe()}", unit=" pairs", unit_scale=True) as shown:
            cache.build(read_pairs(corpus, src_lang, tgt_lang, cache_dir), path, src_tok, tgt_tok,
                        num_proc=num_proc, dedup=dedup, source=corpus.describe(), progress=shown.update)
        if log is not None:
            log(f"tokenized {corpus.describe()} into {path}")
    return cache.TokenizedCorpus(path)


# --------------------------------------------------------------------------------------------------
# Cleaning


@dataclass
class CleaningReport:
    total: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        details = ", ".join(f"{n} {why}" for why, n in self.dropped.items() if n)
        return f"{self.kept}/{self.total} pairs kept" + (f" (dropped: {details})" if details else "")


def drop_reasons(src_len: np.ndarray, tgt_len: np.ndarray, flags: np.ndarray, max_len: int,
                 max_ratio: float = 0.0) -> list[tuple[str, np.ndarray]]:
    """Why each pair would be dropped, in the order reasons are counted: an empty side, control
    characters, a duplicate (of an earlier pair), a side longer than ``max_len`` tokens, a length
    ratio above ``max_ratio`` (0: no ratio filter). Lengths count ``</s>``."""
    src_len, tgt_len = src_len.astype(np.int64), tgt_len.astype(np.int64)
    ratio = ((np.maximum(src_len, tgt_len) > max_ratio * np.minimum(src_len, tgt_len)) if max_ratio
             else np.zeros(len(src_len), dtype=bool))
    return [
        ("empty", (src_len <= 1) | (tgt_len <= 1)),  # only </s>
        ("with control characters", (flags & cache.CONTROL) != 0),
        ("duplicates", (flags & cache.DUPLICATE) != 0),
        (f"longer than {max_len} tokens", (src_len > max_len) | (tgt_len > max_len)),
        (f"length ratio above {max_ratio:g}", ratio),
    ]


class KeptRows:
    """The row numbers of a cleaned corpus's kept pairs, held as the (few) dropped rows: kept pair k
    is row k + the number of dropped rows whose ``row - rank`` is at most k. 8 bytes a dropped pair
    instead of 4 bytes a kept one."""

    def __init__(self, dropped: np.ndarray, total: int):
        self.dropped, self.total = dropped, total
        self._shifted = dropped - np.arange(len(dropped))

    def __len__(self) -> int:
        return self.total - len(self.dropped)

    def __getitem__(self, kept: np.ndarray) -> np.ndarray:
        kept = np.asarray(kept)
        return kept + np.searchsorted(self._shifted, kept, side="right")


def clean(corpus: cache.TokenizedCorpus, max_len: int,
          max_ratio: float = 0.0) -> tuple[KeptRows | None, np.ndarray, np.ndarray, CleaningReport]:
    """Filter a tokenized corpus jointly (see ``drop_reasons``), a chunk of whole columns at a time.
    Returns the kept pairs' rows (None: all kept), their lengths (the longer side, the sampler's
    key; one byte each below 256 tokens), their skews (the sampler's second key: the source's
    length minus the target's, plus ``max_len``, so never negative; one byte each up to 128 tokens)
    and the counts; a dropped pair is counted once, under its first reason."""
    n = len(corpus)
    lengths = np.empty(n, dtype=np.uint8 if max_len < 1 << 8 else np.uint16 if max_len < 1 << 16 else np.int32)
    widest = 2 * max_len - 2  # the largest skew: sides of at least 2 tokens (</s> included), at most max_len
    skews = np.empty(n, dtype=np.uint8 if widest < 1 << 8 else np.uint16 if widest < 1 << 16 else np.int32)
    report, kept, dropped = CleaningReport(total=n), 0, []
    for start, src_len, tgt_len, flags in corpus.chunks():
        keep = np.ones(len(src_len), dtype=bool)
        for why, bad in drop_reasons(src_len, tgt_len, flags, max_len, max_ratio):
            report.dropped[why] = report.dropped.get(why, 0) + int((keep & bad).sum())
            keep &= ~bad
        dropped.append(start + np.flatnonzero(~keep))
        chosen = np.maximum(src_len, tgt_len)[keep]
        lengths[kept: kept + len(chosen)] = chosen
        skews[kept: kept + len(chosen)] = (src_len - tgt_len)[keep] + max_len  # both sides within max_len
        kept += len(chosen)
    report.kept = kept
    lengths.resize(kept, refcheck=False)
    skews.resize(kept, refcheck=False)
    rows = KeptRows(np.concatenate(dropped) if dropped else np.zeros(0, np.int64), n) if kept < n else None
    return rows, lengths, skews, report


# --------------------------------------------------------------------------------------------------
# Batching


def _sort_by_length(order: np.ndarray, lengths: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
    """``order`` stably sorted by ``lengths[order]`` (a counting sort, ``chunk`` at a time: its
    scratch memory stays at a chunk, and the result has ``order``'s type, not int64)."""
    counts = np.bincount(lengths, minlength=1).astype(np.int64)
    starts = np.cumsum(counts) - counts  # where each length's run begins in the result
    out = np.empty_like(order)
    for c in range(0, len(order), chunk):
        part = order[c: c + chunk]
        keys = lengths[part]
        within = np.argsort(keys, kind="stable")
        keys = keys[within]
        here = np.bincount(keys, minlength=len(counts))
        first = np.cumsum(here) - here  # where each length begins within this chunk
        out[starts[keys] + np.arange(len(keys)) - first[keys]] = part[within]
        starts += here
    return out


def _boundaries(counts: np.ndarray, max_tokens: int) -> np.ndarray:
    """Greedy packing of examples sorted by length, from the count of each length: where each
    batch starts. A batch takes the next example while (size + 1) x its length <= ``max_tokens``;
    within a run of one length that means full batches of ``max_tokens // length``, so the loop is
    over distinct lengths, not examples."""
    cuts, start, pos = [np.zeros(1, dtype=np.int64)], 0, 0
    for length in np.flatnonzero(counts):
        n, fits = int(counts[length]), max_tokens // max(int(length), 1)
        if pos - start >= fits:  # the open batch cannot take one more of this length
            start = pos
            cuts.append(np.array([pos]))
        inside = np.arange(start + fits, pos + n, fits, dtype=np.int64)
        if len(inside):
            cuts.append(inside)
            start = int(inside[-1])
        pos += n
    return np.concatenate(cuts) if pos else np.zeros(0, dtype=np.int64)


class EpochBatches(Sequence):
    """One epoch's batches as views into one sorted index array (no list of arrays)."""

    def __init__(self, order: np.ndarray, starts: np.ndarray, permutation: np.ndarray | None):
        self.order, self.ends = order, np.append(starts[1:], len(order))
        self.starts, self.permutation = starts, permutation

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, j: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(j, slice):
            return [self[i] for i in range(*j.indices(len(self)))]
        if not -len(self) <= j < len(self):
            raise IndexError(j)
        k = int(self.permutation[j]) if self.permutation is not None else int(j) % len(self)
        return self.order[self.starts[k]: self.ends[k]]


class TokenBatchSampler:
    """Batches of example indices whose padded size (sentences x longest side) fits ``max_tokens``.

    Each epoch, examples are shuffled (seed + epoch), stably sorted by length so batches hold similar
    lengths with little padding, packed greedily, and the batch order is shuffled. Given ``skews``,
    examples of one length are sorted by their skew (the source's length minus the target's) first,
    so that both sides of a batch have similar lengths, as fairseq sorts by both sides: on Multi30k
    at 2,048 tokens a batch's padding falls from 6.9% of its tokens to 2.8% (source 5.3% -> 2.2%,
    target 8.5% -> 3.5%) in the same batches' count. Without shuffling (validation) batches follow
    length order. All of it is numpy over whole arrays (the indices in int32 below 2^31 examples):
    10M examples take about a second and 60 MB. An epoch's batches are a function of (seed, epoch)
    alone, so a position in training is just (epoch, batches done), kept by the trainer; the state
    saved here identifies the batching (seed, budget, examples, order) and is checked on load.
    """

    STATE_VERSION = 3  # 2: no "order" (by length alone)

    def __init__(self, lengths: np.ndarray, max_tokens: int, *, shuffle: bool = True, seed: int = 1,
                 skews: np.ndarray | None = None):
        """``lengths``: each example's longer side in tokens; ``skews``: any non-negative integers
        that rise with the source's length minus the target's (``clean``'s), or None."""
        self.lengths = np.asarray(lengths)
        self.skews = None if skews is None else np.asarray(skews)
        if self.skews is not None and self.skews.shape != self.lengths.shape:
            raise ValueError(f"{len(self.skews)} skews for {len(self.lengths)} examples")
        if len(self.lengths) and self.lengths.max() > max_tokens:
            i = int(self.lengths.argmax())
            raise ValueError(f"example {i} has {self.lengths[i]} tokens, more than max_tokens={max_tokens}")
        self.max_tokens = max_tokens
        self.shuffle = shuffle
        self.seed = seed
        self._cache: tuple[int, int, EpochBatches] | None = None  # (seed, epoch, batches)

    def batches(self, epoch: int) -> EpochBatches:
        """All batches of ``epoch``, deterministic given (seed, epoch); the latest epoch is cached."""
        if self._cache is not None and self._cache[:3] == (self.seed, epoch, self.order):
            return self._cache[3]
        n = len(self.lengths)
        rng = np.random.default_rng([self.seed, epoch])
        order = np.arange(n, dtype=np.int32 if n < 1 << 31 else np.int64)
        if self.shuffle:
            rng.shuffle(order)  # the same draws as rng.permutation(n), in a narrower array
        if self.skews is not None:
            order = _sort_by_length(order, self.skews)  # then stably by length: by (length, skew)
        order = _sort_by_length(order, self.lengths)
        starts = _boundaries(np.bincount(self.lengths, minlength=1), self.max_tokens)
        permutation = rng.permutation(len(starts)) if self.shuffle else None
        result = EpochBatches(order, starts, permutation)
        self._cache = (self.seed, epoch, self.order, result)
        return result

    @property
    def order(self) -> str:
        """How examples are ordered before packing: "length" or "length, skew"."""
        return "length" if self.skews is None else "length, skew"

    def state_dict(self) -> dict:
        return {"version": self.STATE_VERSION, "seed": self.seed, "max_tokens": self.max_tokens,
                "num_examples": len(self.lengths), "order": self.order}

    def load_state_dict(self, state: dict) -> None:
        """Adopt the saved seed and order (a resumed run keeps its batches: one saved by a sampler
        of version 2 ordered by length alone); refuse other data or another budget."""
        if not isinstance(state, dict):
            raise ValueError(f"expected a dict, found {type(state).__name__}")
        if state.get("version") not in (2, self.STATE_VERSION):
            raise ValueError(f"version {state.get('version')} is not {self.STATE_VERSION}")
        order = state.get("order") if state.get("version") == self.STATE_VERSION else "length"
        if order not in ("length", self.order):
            raise ValueError(f"order={order!r} but this run's examples can be ordered by {self.order!r} only")
        for key, mine in (("num_examples", len(self.lengths)), ("max_tokens", self.max_tokens)):
            if state.get(key) != mine:
                raise ValueError(f"{key}={state.get(key)} but this run has {mine}: "
                                 "the data or train.max_tokens changed since the checkpoint")
        seed = state.get("seed")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed={seed!r} is not a seed")
        self.seed = seed
        if order == "length":
            self.skews = None


@dataclass
class Part:
    """One cleaned corpus of a split: its cache, the kept rows (None: all), their lengths, the counts,
    the weight and the kept rows' skews (``clean``'s; None: the sampler orders by length alone)."""

    corpus: cache.TokenizedCorpus
    rows: KeptRows | None
    lengths: np.ndarray
    report: CleaningReport
    weight: float = 1.0
    skews: np.ndarray | None = None


def _uses(part: Part, k: int, seed: int) -> np.ndarray:
    """Positions among the kept pairs of ``part`` (corpus ``k``) as an epoch uses them: each
    ``floor(weight)`` times, and a share drawn once for the fraction, from (seed, k)."""
    kept = len(part.lengths)
    positions = np.arange(kept, dtype=np.int32 if kept < 1 << 31 else np.int64)
    whole, fraction = int(part.weight), part.weight - int(part.weight)
    extra = np.random.default_rng([seed, k]).choice(kept, size=int(round(fraction * kept)), replace=False)
    return np.concatenate([np.tile(positions, whole), np.sort(extra).astype(positions.dtype)])


@dataclass
class Sampling:
    """Subword regularisation of the training batches (``data.sampling_alpha``): every batch's
    sentences segmented anew each time the batch is drawn (``Tokenizer.sample``), with draws that
    follow (seed, epoch, the batch's first example, side) alone, so that resuming, prefetching or
    the number of ranks never changes them. Samples longer than ``limit`` (``data.max_len``) keep
    the one best segmentation."""

    src_tok: Tokenizer
    tgt_tok: Tokenizer
    alpha: float
    nbest: int
    seed: int
    limit: int

    def apply(self, src: list, tgt: list, epoch: int, first: int) -> tuple[list, list]:
        def seed(side: str) -> int:
            key = f"{self.seed} {epoch} {first} {side}".encode()
            return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "little")

        options = {"alpha": self.alpha, "nbest": self.nbest, "limit": self.limit}
        return (self.src_tok.sample(src, seed=seed("src"), **options),
                self.tgt_tok.sample(tgt, seed=seed("tgt"), **options))


class ParallelData:
    """A cleaned split of one or more tokenized corpora: padded batches by example index (0 .. len - 1),
    the lengths the sampler packs by, and, for validation, the text of the kept pairs. Several
    training corpora are one list of examples, each corpus's pairs repeated by its weight."""

    def __init__(self, parts: list[Part], text: tuple[list[str], list[str]] | None = None, seed: int = 1,
                 sampling: Sampling | None = None):
        self.parts, self.sampling = parts, sampling
        if len(parts) == 1 and parts[0].weight == 1.0:
            self.owner, self.rows, self.lengths, self.skews = None, parts[0].rows, parts[0].lengths, parts[0].skews
        else:
            uses = [_uses(part, k, seed) for k, part in enumerate(parts)]
            for part, used in zip(parts, uses):
                if not len(used):
                    raise CorpusError(f"{part.corpus.meta.get('source') or part.corpus.path}: weight {part.weight:g} "
                                      f"of {len(part.lengths)} kept pairs uses none; raise its weight")
            self.owner = np.concatenate([np.full(len(u), k, dtype=np.uint16) for k, u in enumerate(uses)])
            self.rows = np.concatenate([part.rows[u] if part.rows is not None else u for part, u in zip(parts, uses)])
            self.lengths = np.concatenate([part.lengths[u] for part, u in zip(parts, uses)])
            self.skews = (np.concatenate([part.skews[u] for part, u in zip(parts, uses)])
                          if all(part.skews is not None for part in parts) else None)
        if text is not None and self.rows is not None:
            rows = self.rows[np.arange(len(self.lengths))]
            text = ([text[0][i] for i in rows], [text[1][i] for i in rows])
        self.src_text, self.tgt_text = text if text is not None else (None, None)

    @property
    def report(self) -> CleaningReport:
        total = CleaningReport()
        for part in self.parts:
            total.total += part.report.total
            total.kept += part.report.kept
            for why, n in part.report.dropped.items():
                total.dropped[why] = total.dropped.get(why, 0) + n
        return total

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, indices: np.ndarray, epoch: int | None = None) -> Batch:
        """The padded batch of examples ``indices``; with ``sampling`` and the ``epoch`` it is drawn
        in, its sentences segmented anew (``Sampling``)."""
        rows = indices if self.rows is None else self.rows[indices]
        if self.owner is None:
            corpus = self.parts[0].corpus
            src, tgt = corpus.rows("src", rows), corpus.rows("tgt", rows)
        else:
            owners = self.owner[indices]
            src, tgt = [None] * len(indices), [None] * len(indices)
            for k in np.unique(owners):
                where = np.flatnonzero(owners == k)
                corpus = self.parts[k].corpus
                for i, s_row, t_row in zip(where, corpus.rows("src", rows[where]), corpus.rows("tgt", rows[where])):
                    src[i], tgt[i] = s_row, t_row
        if self.sampling is not None and epoch is not None and len(indices):
            src, tgt = self.sampling.apply(src, tgt, epoch, int(indices[0]))
        return collate(src, tgt, indices)

    def sampler(self, max_tokens: int, *, shuffle: bool, seed: int = 1) -> TokenBatchSampler:
        return TokenBatchSampler(self.lengths, max_tokens, shuffle=shuffle, seed=seed, skews=self.skews)
