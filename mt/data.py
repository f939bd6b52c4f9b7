"""Parallel corpora with Hugging Face ``datasets``: reading, cleaning, tokenizing, batching.

Corpora are read into Arrow datasets (memory-mapped, cached on disk) from two plain-text files
(``.gz`` allowed), a TSV or JSONL file, or a hub dataset. Text files are split on ``\\n`` only —
``str.splitlines`` would also split on U+2028, ``\\x85`` or ``\\x0c`` and shift the pairs. Pairs are
filtered jointly (never one side alone) and every dropped pair is counted. Training batches come from a
token-budget sampler (fairseq-style length buckets, reshuffled every epoch from a seed): an epoch's
batches depend on (seed, epoch) only, so training resumes mid-epoch on the same batches.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np

from mt.batch import Batch, collate
from mt.config import CorpusConfig
from mt.errors import MtError
from mt.tokenizer import Tokenizer

CACHE_VERSION = "2"  # bump when the reading or tokenizing code changes what it produces
datasets.logging.set_verbosity_error()
datasets.disable_progress_bars()


CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 (but tab and newline), DEL, C1


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


def read_lines(path: str | Path, strip: bool = True) -> Iterator[str]:
    """Yield the lines of a UTF-8 text file (``.gz`` allowed), split on ``\\n`` only; with ``strip``,
    surrounding whitespace is removed (else only the line break)."""
    path = Path(path)
    with _open_binary(path) as f:
        lineno = 0
        try:
            for lineno, raw in enumerate(f, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise CorpusError(f"{path}:{lineno}: invalid UTF-8 at byte {e.start}") from None
                text = text.rstrip("\n").rstrip("\r")
                yield text.strip() if strip else text
        except (OSError, EOFError) as e:  # truncated or corrupt gzip
            raise CorpusError(f"{path}:{lineno + 1}: cannot read ({e})") from None


def _count_rest(lines: Iterator[str], seen: int) -> int:
    return seen + sum(1 for _ in lines)


def _read_text_pair(src: str, tgt: str) -> Iterator[dict]:
    src_lines, tgt_lines = read_lines(src), read_lines(tgt)
    n = 0
    for s in src_lines:
        t = next(tgt_lines, None)
        if t is None:
            raise CorpusError(f"line counts differ: {src} has {_count_rest(src_lines, n + 1)} lines, "
                              f"{tgt} has {n}")
        n += 1
        yield {"src": s, "tgt": t}
    rest = _count_rest(tgt_lines, n)
    if rest != n:
        raise CorpusError(f"line counts differ: {src} has {n} lines, {tgt} has {rest}")


def _read_tsv(path: str) -> Iterator[dict]:
    for lineno, line in enumerate(read_lines(path, strip=False), start=1):
        fields = line.split("\t")
        if len(fields) != 2:
            raise CorpusError(f"{path}:{lineno}: expected 2 tab-separated fields, found {len(fields)}")
        yield {"src": fields[0].strip(), "tgt": fields[1].strip()}


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


def _read_jsonl(path: str, src_lang: str, tgt_lang: str) -> Iterator[dict]:
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
        yield {"src": pair[0].strip(), "tgt": pair[1].strip()}


def _generate(kind: str, a: str, b: str, src_lang: str, tgt_lang: str, stamp: str) -> Iterator[dict]:
    """The generator behind ``Dataset.from_generator`` (``stamp`` only keys the cache)."""
    if kind == "text":
        yield from _read_text_pair(a, b)
    elif kind == "tsv":
        yield from _read_tsv(a)
    else:
        yield from _read_jsonl(a, src_lang, tgt_lang)


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


def load_corpus(corpus: CorpusConfig, src_lang: str, tgt_lang: str, cache_dir: str = "") -> datasets.Dataset:
    """Read a parallel corpus into an Arrow dataset with string columns ``src`` and ``tgt``."""
    cache = cache_dir or None
    if corpus.hub:
        return _load_hub(corpus, src_lang, tgt_lang, cache)
    if corpus.src:
        kind, paths = "text", [corpus.src, corpus.tgt]
    elif corpus.path.endswith((".tsv", ".tsv.gz")):
        kind, paths = "tsv", [corpus.path, ""]
    elif corpus.path.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
        kind, paths = "jsonl", [corpus.path, ""]
    else:
        raise CorpusError(f"{corpus.path}: unknown corpus format; use .tsv or .jsonl (optionally .gz), "
                          "or give src and tgt text files")
    stamp = _stamp([p for p in paths if p])
    features = datasets.Features({"src": datasets.Value("string"), "tgt": datasets.Value("string")})
    try:
        return datasets.Dataset.from_generator(
            _generate, features=features, cache_dir=cache,
            gen_kwargs={"kind": kind, "a": paths[0], "b": paths[1], "src_lang": src_lang,
                        "tgt_lang": tgt_lang, "stamp": stamp},
            fingerprint=_digest(CACHE_VERSION, kind, stamp, src_lang, tgt_lang))
    except datasets.exceptions.DatasetGenerationError as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, CorpusError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def _load_hub(corpus: CorpusConfig, src_lang: str, tgt_lang: str, cache: str | None) -> datasets.Dataset:
    try:
        ds = datasets.load_dataset(corpus.hub, corpus.hub_config or None, split=corpus.split, cache_dir=cache)
    except Exception as e:  # network, unknown name, unknown split: all user-facing
        raise CorpusError(f"hub:{corpus.hub}: cannot load ({type(e).__name__}: {e})") from None
    columns = set(ds.column_names)
    if "translation" in columns:
        def to_pair(batch: dict) -> dict:
            return {"src": [t[src_lang].strip() for t in batch["translation"]],
                    "tgt": [t[tgt_lang].strip() for t in batch["translation"]]}
    elif {src_lang, tgt_lang} <= columns or {"src", "tgt"} <= columns:
        s_key, t_key = ("src", "tgt") if {"src", "tgt"} <= columns else (src_lang, tgt_lang)

        def to_pair(batch: dict) -> dict:
            return {"src": [s.strip() for s in batch[s_key]], "tgt": [t.strip() for t in batch[t_key]]}
    else:
        raise CorpusError(f"hub:{corpus.hub}: no 'translation', '{src_lang}'/'{tgt_lang}' or 'src'/'tgt' "
                          f"columns (has {', '.join(sorted(columns))})")
    return ds.map(to_pair, batched=True, remove_columns=ds.column_names)


# --------------------------------------------------------------------------------------------------
# Tokenizing and cleaning


def tokenize(ds: datasets.Dataset, src_tok: Tokenizer, tgt_tok: Tokenizer, num_proc: int = 1) -> datasets.Dataset:
    """Add ``src_ids``/``tgt_ids`` (pieces + ``</s>``), their lengths and a ``control`` flag (a side
    holds control characters); cached by the dataset's and the tokenizers' digests."""

    def encode(batch: dict) -> dict:
        src_ids, tgt_ids = src_tok.encode(batch["src"]), tgt_tok.encode(batch["tgt"])
        return {"src_ids": src_ids, "tgt_ids": tgt_ids,
                "src_len": [len(x) for x in src_ids], "tgt_len": [len(x) for x in tgt_ids],
                "control": [bool(CONTROL_CHARS.search(s) or CONTROL_CHARS.search(t))
                            for s, t in zip(batch["src"], batch["tgt"])]}

    fingerprint = _digest(CACHE_VERSION, ds._fingerprint, src_tok.fingerprint, tgt_tok.fingerprint)
    return ds.map(encode, batched=True, batch_size=2000, num_proc=num_proc if len(ds) > 10_000 else None,
                  new_fingerprint=fingerprint, desc="tokenizing")


@dataclass
class CleaningReport:
    total: int
    kept: int
    dropped: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        details = ", ".join(f"{n} {why}" for why, n in self.dropped.items() if n)
        return f"{self.kept}/{self.total} pairs kept" + (f" (dropped: {details})" if details else "")


def clean(ds: datasets.Dataset, max_len: int, max_ratio: float = 0.0) -> tuple[datasets.Dataset, CleaningReport]:
    """Drop pairs (jointly) with an empty side, control characters (when ``ds`` has the ``control``
    column of ``tokenize``), a side longer than ``max_len`` tokens, or a length ratio above
    ``max_ratio`` (0: no ratio filter). Reasons are counted in that order."""
    src_len = np.asarray(ds["src_len"], dtype=np.int64)
    tgt_len = np.asarray(ds["tgt_len"], dtype=np.int64)
    control = np.asarray(ds["control"], dtype=bool) if "control" in ds.column_names else np.zeros(len(ds), bool)
    keep = np.ones(len(ds), dtype=bool)
    dropped = {}
    for why, bad in (
        ("empty", (src_len <= 1) | (tgt_len <= 1)),  # only </s>
        ("with control characters", control),
        (f"longer than {max_len} tokens", (src_len > max_len) | (tgt_len > max_len)),
        (f"length ratio above {max_ratio:g}",
         (np.maximum(src_len, tgt_len) > max_ratio * np.minimum(src_len, tgt_len)) if max_ratio
         else np.zeros(len(ds), dtype=bool)),
    ):
        dropped[why] = int((keep & bad).sum())
        keep &= ~bad
    report = CleaningReport(total=len(ds), kept=int(keep.sum()), dropped=dropped)
    if report.kept < len(ds):
        ds = ds.select(np.flatnonzero(keep))
    return ds, report


# --------------------------------------------------------------------------------------------------
# Batching


class TokenBatchSampler:
    """Batches of example indices whose padded size (sentences x longest side) fits ``max_tokens``.

    Each epoch, examples are shuffled (seed + epoch), stably sorted by length so batches hold similar
    lengths with little padding, packed greedily, and the batch order is shuffled. Without shuffling
    (validation) batches follow length order. An epoch's batches are a function of (seed, epoch)
    alone, so a position in training is just (epoch, batches done), kept by the trainer; the state
    saved here identifies the batching (seed, budget, examples) and is checked on load.
    """

    STATE_VERSION = 2

    def __init__(self, src_len: np.ndarray, tgt_len: np.ndarray, max_tokens: int, *,
                 shuffle: bool = True, seed: int = 1):
        self.lengths = np.maximum(np.asarray(src_len), np.asarray(tgt_len)).astype(np.int64)
        if len(self.lengths) and self.lengths.max() > max_tokens:
            i = int(self.lengths.argmax())
            raise ValueError(f"example {i} has {self.lengths[i]} tokens, more than max_tokens={max_tokens}")
        self.max_tokens = max_tokens
        self.shuffle = shuffle
        self.seed = seed
        self._cache: tuple[int, int, list[np.ndarray]] | None = None  # (seed, epoch, batches)

    def batches(self, epoch: int) -> list[np.ndarray]:
        """All batches of ``epoch``, deterministic given (seed, epoch); the latest epoch is cached."""
        if self._cache is not None and self._cache[:2] == (self.seed, epoch):
            return self._cache[2]
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths)) if self.shuffle else np.arange(len(self.lengths))
        order = order[np.argsort(self.lengths[order], kind="stable")]
        result, start, longest = [], 0, 0
        for i, n in enumerate(self.lengths[order]):
            longest = max(longest, n)
            if (i + 1 - start) * longest > self.max_tokens:
                result.append(order[start:i])
                start, longest = i, n
        if start < len(order):
            result.append(order[start:])
        if self.shuffle:
            result = [result[i] for i in rng.permutation(len(result))]
        self._cache = (self.seed, epoch, result)
        return result

    def state_dict(self) -> dict:
        return {"version": self.STATE_VERSION, "seed": self.seed, "max_tokens": self.max_tokens,
                "num_examples": len(self.lengths)}

    def load_state_dict(self, state: dict) -> None:
        """Adopt the saved seed (a resumed run keeps its batches); refuse other data or another budget."""
        if not isinstance(state, dict):
            raise ValueError(f"expected a dict, found {type(state).__name__}")
        if state.get("version") != self.STATE_VERSION:
            raise ValueError(f"version {state.get('version')} is not {self.STATE_VERSION}")
        for key, mine in (("num_examples", len(self.lengths)), ("max_tokens", self.max_tokens)):
            if state.get(key) != mine:
                raise ValueError(f"{key}={state.get(key)} but this run has {mine}: "
                                 "the data or train.max_tokens changed since the checkpoint")
        seed = state.get("seed")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed={seed!r} is not a seed")
        self.seed = seed


class ParallelData:
    """A tokenized, cleaned split with its lengths, giving padded batches by example index."""

    def __init__(self, ds: datasets.Dataset, report: CleaningReport | None = None):
        self.ds = ds
        self.report = report
        self.src_len = np.asarray(ds["src_len"], dtype=np.int64)
        self.tgt_len = np.asarray(ds["tgt_len"], dtype=np.int64)
        self._ids = ds.select_columns(["src_ids", "tgt_ids"])

    def __len__(self) -> int:
        return len(self.ds)

    def batch(self, indices: np.ndarray) -> Batch:
        rows = self._ids[indices.tolist()]
        return collate(rows["src_ids"], rows["tgt_ids"], indices)

    def sampler(self, max_tokens: int, *, shuffle: bool, seed: int = 1) -> TokenBatchSampler:
        return TokenBatchSampler(self.src_len, self.tgt_len, max_tokens, shuffle=shuffle, seed=seed)
