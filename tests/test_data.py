"""Reading corpora, the tokenized cache, cleaning, the token-budget sampler and collation."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from mt import cache
from mt.batch import collate
from mt.config import CorpusConfig
from mt.data import (CorpusError, ParallelData, Part, TokenBatchSampler, cache_path, clean, read_all, read_lines,
                     tokenized)
from mt.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def load_text(src: Path, tgt: Path) -> tuple[list[str], list[str]]:
    return read_all(CorpusConfig(src=str(src), tgt=str(tgt)), "de", "en")


def pairs(corpus: CorpusConfig) -> list[tuple[str, str]]:
    return list(zip(*read_all(corpus, "de", "en")))


# --------------------------------------------------------------------------------------------------
# read_lines


def test_read_lines_splits_on_newline_only(tmp_path):
    lines = ["a\u2028b", "c\x85d", "e\x0cf", "g\x1c\x1d\x1eh", "\u2029middle\u2029x", "plain"]
    data = "\n".join(lines).encode("utf-8") + b"\n"
    path = tmp_path / "odd.txt"
    path.write_bytes(data)
    got = list(read_lines(path))
    assert len(got) == data.count(b"\n") == 6
    assert got[:4] == lines[:4]
    assert got[5] == "plain"
    # str.splitlines would have given more lines: the point of the test
    assert len(data.decode("utf-8").splitlines()) > len(got)


def test_read_lines_without_final_newline_keeps_last_line(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"one\ntwo")
    assert list(read_lines(path)) == ["one", "two"]


def test_read_lines_handles_crlf_and_strips_ends(tmp_path):
    path = tmp_path / "crlf.txt"
    path.write_bytes(b"first\r\nsecond line \r\n\r\n  third\r\n")
    assert list(read_lines(path)) == ["first", "second line", "", "third"]


def test_read_lines_reads_gzip(tmp_path):
    path = tmp_path / "x.txt.gz"
    with gzip.open(path, "wb") as f:
        f.write("Ein Hund.\nZwei Katzen\u2028und mehr.\n".encode("utf-8"))
    assert list(read_lines(path)) == ["Ein Hund.", "Zwei Katzen\u2028und mehr."]


def test_invalid_utf8_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\nalso fine\nbroken \xff\xfe here\n")
    with pytest.raises(CorpusError, match=rf"{bad}:3: invalid UTF-8"):
        list(read_lines(bad))
    # and through the corpus reader
    good = write(tmp_path / "good.txt", ["a", "b", "c"])
    with pytest.raises(CorpusError, match=rf"{bad}:3"):
        load_text(bad, good)


def test_missing_file_is_a_corpus_error(tmp_path):
    good = write(tmp_path / "good.txt", ["a"])
    with pytest.raises(CorpusError, match="nope.txt"):
        load_text(tmp_path / "nope.txt", good)


# --------------------------------------------------------------------------------------------------
# Corpus formats


@pytest.mark.parametrize("n_src,n_tgt", [(5, 3), (3, 5), (1, 0), (0, 2)])
def test_line_count_mismatch_names_both_files_and_counts(tmp_path, n_src, n_tgt):
    src = write(tmp_path / "train.de", [f"satz {i}" for i in range(n_src)])
    tgt = write(tmp_path / "train.en", [f"sentence {i}" for i in range(n_tgt)])
    with pytest.raises(CorpusError) as info:
        load_text(src, tgt)
    message = str(info.value)
    assert f"{src} has {n_src} lines" in message
    assert f"{tgt} has {n_tgt}" in message


def test_text_pair_loads_in_order(tmp_path):
    src = write(tmp_path / "a.de", ["eins", "", "drei\u2028vier"])
    tgt = write(tmp_path / "a.en", ["one", "two", "three four"])
    assert load_text(src, tgt) == (["eins", "", "drei\u2028vier"], ["one", "two", "three four"])


def test_tsv_loads_and_wrong_field_count_names_file_and_line(tmp_path):
    good = tmp_path / "good.tsv"
    good.write_text("Hallo Welt\tHello world\n ein  \t a \n", encoding="utf-8")
    assert pairs(CorpusConfig(path=str(good))) == [("Hallo Welt", "Hello world"), ("ein", "a")]

    for body, line, found in (("a\tb\nno tab here\nc\td\n", 2, 1), ("a\tb\nc\td\ne\tf\tg\n", 3, 3)):
        bad = tmp_path / f"bad{line}.tsv"
        bad.write_text(body, encoding="utf-8")
        with pytest.raises(CorpusError, match=rf"{bad}:{line}: expected 2 tab-separated fields, found {found}"):
            pairs(CorpusConfig(path=str(bad)))


def test_tsv_with_an_empty_side_loads(tmp_path):
    """A TSV row with an empty source or target has two fields; cleaning (not the reader) drops it."""
    path = tmp_path / "empty_side.tsv"
    path.write_text("a\tb\n\tonly target\nonly source\t\n", encoding="utf-8")
    try:
        got = pairs(CorpusConfig(path=str(path)))
    except CorpusError as e:
        pytest.fail(f"a TSV row with an empty field was rejected: {e} (read_lines strips the tab "
                    "before _read_tsv splits on it)")
    assert got == [("a", "b"), ("", "only target"), ("only source", "")]


def test_jsonl_both_record_forms_load(tmp_path):
    path = tmp_path / "pairs.jsonl"
    records = [{"src": " Hallo ", "tgt": "Hello"},
               {"translation": {"de": "Guten Morgen", "en": "Good morning"}},
               {"de": "Danke", "en": "Thanks", "extra": 1}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n\n", encoding="utf-8")
    assert pairs(CorpusConfig(path=str(path))) == [("Hallo", "Hello"), ("Guten Morgen", "Good morning"),
                                                   ("Danke", "Thanks")]

    gz = tmp_path / "pairs.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"translation": {"de": "Ja", "en": "Yes", "fr": "Oui"}}) + "\n")
    assert pairs(CorpusConfig(path=str(gz))) == [("Ja", "Yes")]


def test_jsonl_errors_name_file_and_line(tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"src": "a", "tgt": "b"}\n{"src": \n', encoding="utf-8")
    with pytest.raises(CorpusError, match=rf"{bad_json}:2: invalid JSON"):
        pairs(CorpusConfig(path=str(bad_json)))
    wrong_keys = tmp_path / "keys.jsonl"
    wrong_keys.write_text('{"translation": {"fr": "a", "en": "b"}}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=rf"{wrong_keys}:1: expected"):
        pairs(CorpusConfig(path=str(wrong_keys)))


def test_unknown_corpus_format(tmp_path):
    path = write(tmp_path / "pairs.csv", ["a,b"])
    with pytest.raises(CorpusError, match="unknown corpus format"):
        pairs(CorpusConfig(path=str(path)))


# --------------------------------------------------------------------------------------------------
# Cleaning


def fake_cache(path: Path, src_len: list[int], tgt_len: list[int], flags: list[int] | None = None) -> cache.TokenizedCorpus:
    """A cache in mt's format holding sentences of the given lengths (ids 10, 11, ... then </s>)."""
    path.mkdir(parents=True)
    for side, lengths in (("src", src_len), ("tgt", tgt_len)):
        rows = [list(range(10, 9 + n)) + [EOS_ID] for n in lengths]
        np.concatenate([np.array(r, dtype=np.uint16) for r in rows]).tofile(path / f"{side}.ids")
        np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64).tofile(path / f"{side}.idx")
    np.array(flags or [0] * len(src_len), dtype=np.uint8).tofile(path / "flags")
    (path / "meta.json").write_text(json.dumps({"format": "mt-tokenized", "version": cache.VERSION,
                                                "pairs": len(src_len), "dtype": "uint16"}))
    return cache.TokenizedCorpus(path)


def test_clean_drops_pairs_jointly_and_counts_each_reason(tmp_path):
    rows = [  # (src_len, tgt_len, why)
        (5, 6, "keep"),
        (1, 5, "empty"),
        (5, 1, "empty"),
        (1, 100, "empty"),  # empty and too long: counted once, as empty (the first reason)
        (10, 70, "long"),
        (70, 80, "long"),
        (64, 64, "keep"),  # exactly max_len is allowed
        (3, 12, "ratio"),  # 4.0 > 3
        (13, 4, "ratio"),
        (4, 12, "keep"),  # exactly 3.0 is allowed
        (2, 7, "ratio"),
        (9, 9, "keep"),
    ]
    store = fake_cache(tmp_path / "c", [r[0] for r in rows], [r[1] for r in rows])
    kept, lengths, skews, report = clean(store, max_len=64, max_ratio=3.0)
    keep_ids = [i for i, r in enumerate(rows) if r[2] == "keep"]
    assert kept[np.arange(len(kept))].tolist() == keep_ids and kept.dropped.tolist() == sorted(set(range(12)) - set(keep_ids))
    assert lengths.tolist() == [max(rows[i][:2]) for i in keep_ids]
    assert skews.dtype == np.uint8 and skews.tolist() == [rows[i][0] - rows[i][1] + 64 for i in keep_ids]
    assert report.total == 12 and report.kept == 4
    assert report.dropped == {"empty": 3, "with control characters": 0, "duplicates": 0, "longer than 64 tokens": 2,
                              "length ratio above 3": 3}
    assert str(report) == "4/12 pairs kept (dropped: 3 empty, 2 longer than 64 tokens, 3 length ratio above 3)"
    data = ParallelData([Part(store, kept, lengths, report)], ([f"s{i}" for i in range(12)], [f"t{i}" for i in range(12)]))
    assert data.src_text == [f"s{i}" for i in keep_ids] and data.tgt_text == [f"t{i}" for i in keep_ids]
    batch = data.batch(np.array([1, 3]))  # kept pairs 1 and 3 are rows 6 and 11
    assert batch.src[0].tolist() == list(range(10, 73)) + [EOS_ID] and batch.src[1, :9].tolist()[-1] == EOS_ID

    # max_ratio 0 disables the ratio filter
    kept, _, _, report = clean(store, max_len=64, max_ratio=0)
    assert report.kept == 7 and report.dropped["length ratio above 0"] == 0


def test_clean_counts_across_chunks_exactly(tmp_path, monkeypatch):
    """Whole columns are read a chunk at a time; the chunk size must not change the result."""
    rng = np.random.default_rng(3)
    src_len, tgt_len = rng.integers(1, 90, size=1000).tolist(), rng.integers(1, 90, size=1000).tolist()
    store = fake_cache(tmp_path / "c", src_len, tgt_len, rng.integers(0, 4, size=1000).tolist())
    whole = clean(store, max_len=64, max_ratio=2.0)
    monkeypatch.setattr(cache, "READ_CHUNK", 7)
    store = cache.TokenizedCorpus(tmp_path / "c")
    assert [len(c[1]) for c in store.chunks(7)][:2] == [7, 7]
    parts = clean(store, max_len=64, max_ratio=2.0)
    assert np.array_equal(whole[0].dropped, parts[0].dropped) and np.array_equal(whole[1], parts[1])
    assert np.array_equal(whole[2], parts[2]) and whole[3] == parts[3] and len(whole[0]) == whole[3].kept


def test_pairs_with_control_characters_are_dropped_jointly_and_counted(tmp_path, tokenizer):
    texts = [("Ein Hund läuft.", "A dog runs."), ("Ein\x07 Hund.", "A dog."), ("Zwei Katzen.", "Two\x85 cats."),
             ("Tab\tist gut.", "Tab is fine."), ("Ein Mann\x00.", "A man."), ("Rot.", "Red\x7f.")]
    corpus = CorpusConfig(src=str(write(tmp_path / "c.de", [t[0] for t in texts])),
                          tgt=str(write(tmp_path / "c.en", [t[1] for t in texts])))
    store = tokenized(corpus, "de", "en", tokenizer, tokenizer, cache_dir=str(tmp_path / "cache"))
    kept, _, _, report = clean(store, max_len=64, max_ratio=0)
    assert kept[np.arange(len(kept))].tolist() == [0, 3]
    assert report.dropped["with control characters"] == 4


def test_kept_rows_map_kept_pairs_to_rows():
    from mt.data import KeptRows

    rng = np.random.default_rng(2)
    for _ in range(50):
        total = int(rng.integers(1, 200))
        keep = rng.random(total) < rng.random()
        rows = KeptRows(np.flatnonzero(~keep), total)
        assert len(rows) == keep.sum()
        assert rows[np.arange(len(rows))].tolist() == np.flatnonzero(keep).tolist()


def test_clean_keeps_everything_untouched(tmp_path):
    kept, lengths, skews, report = clean(fake_cache(tmp_path / "c", [3, 4], [4, 3]), max_len=10, max_ratio=2.0)
    assert kept is None and lengths.tolist() == [4, 4] and report.kept == 2 and str(report) == "2/2 pairs kept"
    assert skews.tolist() == [9, 11]  # 3 - 4 + 10, 4 - 3 + 10
    assert clean(fake_cache(tmp_path / "d", [3], [4]), max_len=129)[2].dtype == np.uint16  # skews up to 256


# --------------------------------------------------------------------------------------------------
# Sampler


@pytest.fixture(scope="module")
def lengths():
    rng = np.random.default_rng(7)
    return rng.integers(2, 60, size=500), rng.integers(2, 60, size=500)


def test_sampler_respects_budget_and_covers_every_example_once(lengths):
    src_len, tgt_len = lengths
    longest = np.maximum(src_len, tgt_len)
    sampler = TokenBatchSampler(np.maximum(src_len, tgt_len), max_tokens=256, seed=3)
    for epoch in range(3):
        batches = sampler.batches(epoch)
        assert len(batches) > 1
        for b in batches:
            assert len(b) >= 1
            assert len(b) * longest[b].max() <= 256
        everything = np.concatenate(batches)
        assert sorted(everything.tolist()) == list(range(500))
        # greedy packing: batches are (nearly) full, not one sentence each
        assert len(batches) < 500 / 3


def test_sampler_order_depends_on_seed_and_epoch_only(lengths):
    src_len, tgt_len = lengths
    a = TokenBatchSampler(np.maximum(src_len, tgt_len), max_tokens=256, seed=3)
    b = TokenBatchSampler(np.maximum(src_len, tgt_len), max_tokens=256, seed=3)
    c = TokenBatchSampler(np.maximum(src_len, tgt_len), max_tokens=256, seed=4)

    def flat(batches):
        return np.concatenate(batches).tolist()

    assert flat(a.batches(0)) == flat(b.batches(0))
    assert flat(a.batches(1)) == flat(b.batches(1))
    assert flat(a.batches(0)) != flat(a.batches(1))
    epoch = a.batches(0)
    assert all(np.array_equal(x, y) for x, y in zip(epoch[2:5], [epoch[2], epoch[3], epoch[4]]))
    assert np.array_equal(epoch[-1], epoch[len(epoch) - 1])
    with pytest.raises(IndexError):
        epoch[len(epoch)]
    assert flat(a.batches(0)) != flat(c.batches(0))
    assert flat(b.batches(0)) == flat(TokenBatchSampler(np.maximum(src_len, tgt_len), 256, seed=3).batches(0))


def test_sampler_without_shuffle_follows_length_order(lengths):
    src_len, tgt_len = lengths
    sampler = TokenBatchSampler(np.maximum(src_len, tgt_len), max_tokens=256, shuffle=False)
    order = np.concatenate(sampler.batches(0))
    longest = np.maximum(src_len, tgt_len)[order]
    assert (np.diff(longest) >= 0).all()
    assert order.tolist() == np.argsort(np.maximum(src_len, tgt_len), kind="stable").tolist()


def test_sampler_state_seed_wins_even_after_use(lengths):
    """Loading a state must give that state's batches, whatever the sampler had computed before."""
    src_len, tgt_len = lengths
    source = TokenBatchSampler(np.maximum(src_len, tgt_len), max_tokens=256, seed=11)
    state = source.state_dict()
    assert state == {"version": 3, "seed": 11, "max_tokens": 256, "num_examples": 500, "order": "length"}

    target = TokenBatchSampler(np.maximum(src_len, tgt_len), max_tokens=256, seed=1)
    before = target.batches(2)  # computed (and cached) under seed 1
    target.load_state_dict(state)
    resumed, expected = target.batches(2), source.batches(2)
    assert len(resumed) == len(expected) and all(np.array_equal(x, y) for x, y in zip(resumed, expected))
    assert not all(np.array_equal(x, y) for x, y in zip(before, expected))


def test_sampler_load_state_dict_rejects_other_data(lengths):
    src_len, tgt_len = lengths
    state = TokenBatchSampler(np.maximum(src_len, tgt_len), max_tokens=256).state_dict()
    with pytest.raises(ValueError, match="^num_examples=500 but this run has 499"):
        TokenBatchSampler(np.maximum(src_len, tgt_len)[:499], max_tokens=256).load_state_dict(state)
    with pytest.raises(ValueError, match="max_tokens=256 but this run has 512"):
        TokenBatchSampler(np.maximum(src_len, tgt_len), max_tokens=512).load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        TokenBatchSampler(np.maximum(src_len, tgt_len), max_tokens=256).load_state_dict({**state, "version": 99})


def _reference_batches(lengths, max_tokens, seed, epoch, shuffle=True, skews=None) -> list[np.ndarray]:
    """The sampler as it was written first: a Python loop over every example (the oracle); with
    ``skews``, examples ordered by (length, skew) with a lexicographic sort."""
    lengths = np.asarray(lengths).astype(np.int64)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    if skews is None:
        order = order[np.argsort(lengths[order], kind="stable")]
    else:
        order = order[np.lexsort((np.asarray(skews)[order], lengths[order]))]  # stable: ties keep the shuffle
    result, start, longest = [], 0, 0
    for i, n in enumerate(lengths[order]):
        longest = max(longest, n)
        if (i + 1 - start) * longest > max_tokens:
            result.append(order[start:i])
            start, longest = i, n
    if start < len(order):
        result.append(order[start:])
    if shuffle:
        result = [result[i] for i in rng.permutation(len(result))]
    return result


def test_vectorised_sampler_gives_exactly_the_reference_batches():
    rng = np.random.default_rng(0)
    for trial in range(60):
        n, longest = int(rng.integers(0, 3000)), int(rng.integers(2, 300))
        max_tokens = int(rng.integers(longest, 2000))
        lengths = rng.integers(1, longest, size=n).astype(np.uint16)
        for shuffle in (True, False):
            for epoch in (0, 3):
                skews = rng.integers(0, 2 * longest, size=n).astype(np.uint16) if trial % 2 else None
                expected = _reference_batches(lengths, max_tokens, trial, epoch, shuffle, skews)
                got = TokenBatchSampler(lengths, max_tokens, shuffle=shuffle, seed=trial, skews=skews).batches(epoch)
                assert len(got) == len(expected), (trial, shuffle, epoch)
                assert all(np.array_equal(x, y) for x, y in zip(got, expected)), (trial, shuffle, epoch)


def test_skews_pad_less_in_the_same_batches(lengths):
    """Ordered by (length, skew), the batches are as many and hold as many examples each, but both
    sides pad less; a state saved by version 2 (by length alone) resumes with length-only batches."""
    src_len, tgt_len = lengths
    longest, skews = np.maximum(src_len, tgt_len), src_len - tgt_len + 60

    def padded(batches):
        return sum(len(b) * src_len[b].max() for b in batches), sum(len(b) * tgt_len[b].max() for b in batches)

    plain = TokenBatchSampler(longest, max_tokens=256, seed=3).batches(0)
    skewed = TokenBatchSampler(longest, max_tokens=256, seed=3, skews=skews).batches(0)
    assert sorted(map(len, plain)) == sorted(map(len, skewed))
    (plain_src, plain_tgt), (skewed_src, skewed_tgt) = padded(plain), padded(skewed)
    assert skewed_src < 0.95 * plain_src and skewed_tgt < 0.95 * plain_tgt

    sampler = TokenBatchSampler(longest, max_tokens=256, seed=1, skews=skews)
    assert sampler.state_dict()["order"] == "length, skew"
    sampler.batches(0)  # cached in the skew order
    sampler.load_state_dict({"version": 2, "seed": 3, "max_tokens": 256, "num_examples": 500})
    assert sampler.state_dict() == {"version": 3, "seed": 3, "max_tokens": 256, "num_examples": 500, "order": "length"}
    assert all(np.array_equal(x, y) for x, y in zip(sampler.batches(0), plain))
    with pytest.raises(ValueError, match="order='length, skew' but this run's examples can be ordered by 'length' only"):
        TokenBatchSampler(longest, max_tokens=256).load_state_dict(TokenBatchSampler(
            longest, max_tokens=256, skews=skews).state_dict())


def test_sort_by_length_is_stable_across_chunks():
    from mt.data import _sort_by_length

    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 100, size=10_000).astype(np.uint16)
    order = rng.permutation(10_000).astype(np.int32)
    got = _sort_by_length(order, lengths, chunk=777)
    assert got.dtype == np.int32 and np.array_equal(got, order[np.argsort(lengths[order], kind="stable")])


def test_sampler_rejects_example_over_budget():
    with pytest.raises(ValueError, match="example 1 has 300 tokens"):
        TokenBatchSampler(np.array([5, 300]), max_tokens=256)


# --------------------------------------------------------------------------------------------------
# Collation


def test_collate_shifts_target_for_teacher_forcing():
    src = [[10, 11, EOS_ID], [12, EOS_ID]]
    tgt = [[20, 21, 22, EOS_ID], [23, EOS_ID]]
    batch = collate(src, tgt, np.array([4, 9]))
    assert batch.src.tolist() == [[10, 11, EOS_ID], [12, EOS_ID, PAD_ID]]
    assert batch.tgt_out.tolist() == [[20, 21, 22, EOS_ID], [23, EOS_ID, PAD_ID, PAD_ID]]
    assert batch.tgt_in.tolist() == [[BOS_ID, 20, 21, 22], [BOS_ID, 23, PAD_ID, PAD_ID]]
    for t, row_in, row_out in zip(tgt, batch.tgt_in.tolist(), batch.tgt_out.tolist()):
        assert row_in[: len(t)] == [BOS_ID] + t[:-1]
        assert row_out[: len(t)] == t and row_out[len(t) - 1] == EOS_ID
    assert batch.src.dtype == batch.tgt_in.dtype == torch.long
    assert batch.num_tgt_tokens == 6
    assert batch.indices.tolist() == [4, 9]


# --------------------------------------------------------------------------------------------------
# Real data and the tokenized cache


def test_read_multi30k_val(multi30k, multi30k_head):
    corpus = CorpusConfig(src=str(multi30k / "val.de.gz"), tgt=str(multi30k / "val.en.gz"))
    src, tgt = read_all(corpus, "de", "en")
    assert len(src) == len(tgt) == 1014
    assert (src[0], tgt[0]) == (multi30k_head("val", "de", 1)[0].strip(), multi30k_head("val", "en", 1)[0].strip())
    assert tgt[0] == "A group of men are loading cotton onto a truck"


def test_tokenized_cache_is_compact_exact_and_built_once(tmp_path, monkeypatch, multi30k, tokenizer, spm_model):
    corpus = CorpusConfig(src=str(multi30k / "val.de.gz"), tgt=str(multi30k / "val.en.gz"))
    src, tgt = read_all(corpus, "de", "en")
    cache_dir = str(tmp_path / "cache")
    store = tokenized(corpus, "de", "en", tokenizer, tokenizer, cache_dir=cache_dir, num_proc=2)
    assert store.path == cache_path(corpus, "de", "en", tokenizer, tokenizer, cache_dir)
    assert len(store) == 1014 and store.dtype == np.uint16  # 300 pieces fit in 16 bits
    for side, text in (("src", src), ("tgt", tgt)):
        assert [r.tolist() for r in store.rows(side, range(1014))] == tokenizer.encode(text)
    tokens = sum(store.meta["tokens"].values())
    assert sorted(p.name for p in store.path.iterdir()) == ["flags", "meta.json", "src.ids", "src.idx", "tgt.ids",
                                                             "tgt.idx"]
    size = sum(p.stat().st_size for p in store.path.iterdir() if p.name != "meta.json")
    assert size == 2 * tokens + 2 * 8 * 1015 + 1014  # ids in 2 bytes, offsets, one flag byte: no text

    build = cache.build

    def exploding(*args, **kwargs):
        raise AssertionError("the corpus was tokenized again instead of read from its cache")

    monkeypatch.setattr(cache, "build", exploding)
    again = tokenized(corpus, "de", "en", Tokenizer(spm_model), Tokenizer(spm_model), cache_dir=cache_dir)
    assert again.path == store.path and again.meta == store.meta
    monkeypatch.setattr(cache, "build", build)
    # a chunked build (several processes) writes the very same files as one chunk in this process
    chunks = CorpusConfig(src=corpus.src, tgt=corpus.tgt)
    from mt import data

    single = cache.build(data.read_pairs(chunks, "de", "en", chunk_size=10_000), tmp_path / "one", tokenizer,
                         tokenizer, num_proc=1)
    many = cache.build(data.read_pairs(chunks, "de", "en", chunk_size=100), tmp_path / "many", tokenizer,
                       tokenizer, num_proc=2)
    for name in ("src.ids", "tgt.ids", "src.idx", "tgt.idx", "flags"):
        assert (single / name).read_bytes() == (many / name).read_bytes() == (store.path / name).read_bytes(), name

    # and the ids come back out of ParallelData as a padded batch
    _, lengths, _, report = clean(store, max_len=1000)
    parallel = ParallelData([Part(store, None, lengths, report)])
    batch = parallel.batch(np.array([1, 0]))
    assert batch.tgt_out[0, : len(tokenizer.encode([tgt[1]])[0])].tolist() == tokenizer.encode([tgt[1]])[0]


def test_changed_file_gets_a_new_cache(tmp_path, tokenizer):
    src = write(tmp_path / "c.de", ["alt"])
    tgt = write(tmp_path / "c.en", ["old"])
    corpus = CorpusConfig(src=str(src), tgt=str(tgt))
    first = tokenized(corpus, "de", "en", tokenizer, tokenizer, cache_dir=str(tmp_path / "cache"))
    write(src, ["neuer Satz"])
    second = tokenized(corpus, "de", "en", tokenizer, tokenizer, cache_dir=str(tmp_path / "cache"))
    assert second.path != first.path
    assert second.rows("src", [0])[0].tolist() == tokenizer.encode(["neuer Satz"])[0]


KILLED_BUILD = """
import sys, time
from pathlib import Path
from mt import cache
from mt.tokenizer import Tokenizer

tok = Tokenizer(sys.argv[1])

def chunks():
    for i in range(1000):
        if i == 3:
            Path(sys.argv[3]).write_text("started")
            time.sleep(60)
        yield ["Ein Hund."] * 10, ["A dog."] * 10

cache.build(chunks(), sys.argv[2], tok, tok, num_proc=1)
"""


def test_a_cache_from_a_killed_build_is_never_used_and_is_rebuilt(tmp_path, spm_model, tokenizer):
    src = write(tmp_path / "c.de", ["Ein Hund.", "Zwei Katzen."])
    tgt = write(tmp_path / "c.en", ["A dog.", "Two cats."])
    corpus = CorpusConfig(src=str(src), tgt=str(tgt))
    path = cache_path(corpus, "de", "en", tokenizer, tokenizer, str(tmp_path / "cache"))
    marker = tmp_path / "started"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(spm_model), str(path), str(marker)],
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    for _ in range(600):
        if marker.exists() or proc.poll() is not None:
            break
        subprocess.run(["sleep", "0.05"])
    assert marker.exists(), "the build did not start"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not path.exists()  # only the temporary directory, with its partial files
    leftovers = list(path.parent.glob(f".{path.name}.tmp-*"))
    assert len(leftovers) == 1 and (leftovers[0] / "src.ids").exists() and not (leftovers[0] / "meta.json").exists()
    store = tokenized(corpus, "de", "en", tokenizer, tokenizer, cache_dir=str(tmp_path / "cache"))
    assert len(store) == 2 and store.rows("tgt", [1])[0].tolist() == tokenizer.encode(["Two cats."])[0]
    assert not leftovers[0].exists()  # the killed build's files are swept: their process is gone


def test_dedup_marks_later_copies_of_a_pair(tmp_path, tokenizer):
    src = write(tmp_path / "d.de", ["Ein Hund.", "Zwei Katzen.", "Ein Hund.", "Ein Hund.", "Zwei Katzen."])
    tgt = write(tmp_path / "d.en", ["A dog.", "Two cats.", "A dog.", "One dog.", "Two cats."])
    corpus = CorpusConfig(src=str(src), tgt=str(tgt))
    store = tokenized(corpus, "de", "en", tokenizer, tokenizer, cache_dir=str(tmp_path / "cache"), dedup=True)
    kept, _, _, report = clean(store, max_len=64)
    assert kept[np.arange(3)].tolist() == [0, 1, 3] and report.dropped["duplicates"] == 2 and store.meta["duplicates"] == 2
    plain = tokenized(corpus, "de", "en", tokenizer, tokenizer, cache_dir=str(tmp_path / "cache"))
    assert plain.path != store.path and clean(plain, max_len=64)[0] is None


def test_truncated_gzip_is_a_corpus_error(tmp_path):
    path = tmp_path / "cut.txt.gz"
    data = gzip.compress(("".join(f"line number {i}\n" for i in range(2000))).encode())
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorpusError, match=rf"{path}:\d+: cannot read"):
        list(read_lines(path))


# --------------------------------------------------------------------------------------------------
# Hub datasets (offline: datasets.load_dataset is replaced by an in-memory dataset of the hub's shape)


@pytest.mark.parametrize("columns", ["translation", "languages", "src_tgt"])
def test_hub_dataset_forms(monkeypatch, columns):
    pairs = [("Ein Hund.", "A dog."), (" Zwei Katzen. ", "Two cats.")]
    if columns == "translation":
        table = {"translation": [{"de": s, "en": t} for s, t in pairs], "id": ["0", "1"]}
    elif columns == "languages":
        table = {"de": [s for s, _ in pairs], "en": [t for _, t in pairs]}
    else:
        table = {"src": [s for s, _ in pairs], "tgt": [t for _, t in pairs]}
    calls = []

    def fake_load_dataset(name, config=None, split=None, cache_dir=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict(table)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    got = read_all(CorpusConfig(hub="wmt16", hub_config="de-en", split="validation"), "de", "en")
    assert calls == [("wmt16", "de-en", "validation")]
    assert got == (["Ein Hund.", "Zwei Katzen."], ["A dog.", "Two cats."])


def test_hub_dataset_errors_are_user_errors(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(CorpusError, match="hub:wmt16: cannot load .*ConnectionError"):
        read_all(CorpusConfig(hub="wmt16"), "de", "en")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict({"text": ["x"]}))
    with pytest.raises(CorpusError, match="no 'translation', 'de'/'en' or 'src'/'tgt' columns"):
        read_all(CorpusConfig(hub="wmt16"), "de", "en")


def test_block_reading_equals_line_by_line_across_block_boundaries(tmp_path, monkeypatch):
    from mt import data

    rng = np.random.default_rng(5)
    words = ["ein", "Hund", "läuft", "über", "die", "Straße", "\u2028", "x\r", "  ", "日本", "\x85"]
    lines = [" ".join(rng.choice(words, size=rng.integers(0, 6))) for _ in range(300)]
    body = "\n".join(lines)
    for final_newline in (True, False):
        path = tmp_path / f"f{final_newline}.txt"
        path.write_bytes((body + ("\n" if final_newline else "")).encode("utf-8"))
        expected = [line.rstrip("\r").strip() for line in body.split("\n")]
        for block in (1, 7, 64, 1 << 20):
            monkeypatch.setattr(data, "BLOCK", block)
            assert list(read_lines(path)) == expected, (block, final_newline)
            assert list(read_lines(path, strip=False)) == [line.rstrip("\r") for line in body.split("\n")]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(("\n".join(lines[:150]) + "\nok \xff\n" + "\n".join(lines[150:]) + "\n").encode("utf-8", "surrogateescape")
                    .replace("\xff".encode(), b"\xff"))
    for block in (5, 1 << 20):
        monkeypatch.setattr(data, "BLOCK", block)
        with pytest.raises(CorpusError, match=rf"{bad}:151: invalid UTF-8 at byte 3$"):
            list(read_lines(bad))


def test_the_same_seed_gives_the_same_sentencepiece_model_on_a_corpus_larger_than_the_sample(tmp_path, multi30k_head):
    from mt.tokenizer import sample_sentences, train_sentencepiece

    sentences = multi30k_head("train", "de", 3000) + multi30k_head("train", "en", 3000)
    models = [train_sentencepiece(iter(sentences), tmp_path / f"m{i}.model", vocab_size=300, input_sentence_size=1500,
                                  num_threads=2, seed=seed).read_bytes() for i, seed in enumerate((7, 7, 8))]
    assert models[0] == models[1]
    assert models[0] != models[2]
    sample, total = sample_sentences(iter(sentences), 1500, seed=7)
    assert total == 6000 and len(sample) == 1500 and len(set(sample)) > 1400
    assert sum(s in set(sentences[3000:]) for s in sample) in range(600, 900)  # both halves, ~uniformly
    assert sample_sentences(iter(sentences[:10]), 1500, seed=7) == (sentences[:10], 10)


def test_weighted_corpora_give_the_stated_mixture(tmp_path, tokenizer):
    from mt.config import load_config
    from mt.prepare import load_split

    web = [(f"Ein Hund Nummer {i}.", f"A dog number {i}.") for i in range(1000)]
    domain = [(f"Zwei Katzen Nummer {i}.", f"Two cats number {i}.") for i in range(100)]
    files = {}
    for name, pairs_ in (("web", web), ("domain", domain)):
        files[name] = (write(tmp_path / f"{name}.de", [s for s, _ in pairs_]), write(tmp_path / f"{name}.en", [t for _, t in pairs_]))
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  cache_dir: {tmp_path / 'cache'}\n  train:\n"
                      f"    - {{src: {files['web'][0]}, tgt: {files['web'][1]}}}\n"
                      f"    - {{src: {files['domain'][0]}, tgt: {files['domain'][1]}, weight: 4}}\n", encoding="utf-8")
    for weight, share in ((4, 400 / 1400), (2.5, 250 / 1250)):
        cfg = load_config(config, [f"data.train.1.weight={weight}"])
        messages = []
        split = load_split(cfg, "train", tokenizer, tokenizer, progress=False, log=messages.append)
        assert len(split) == 1000 + int(weight * 100)
        messages = [m for m in messages if m.startswith("train")]
        assert messages[0].endswith("1000/1000 pairs kept, weight 1")
        assert messages[1].endswith(f"100/100 pairs kept, weight {weight:g}")
        assert messages[2] == f"train: {len(split):,} examples an epoch from 2 corpora"
        sampler, seen = split.sampler(256, shuffle=True, seed=3), []
        for epoch in range(20):
            for indices in sampler.batches(epoch):
                seen.append(indices)
            if sum(map(len, seen)) >= 10_000:
                break
        picked = np.concatenate(seen)[:10_000]
        from_domain = (split.owner[picked] == 1).mean()
        assert abs(from_domain - share) < 0.02, (weight, from_domain, share)
        batch = split.batch(picked[:64])  # rows come from the right corpus, in the batch's order
        for k, row in zip(picked[:64], batch.src.tolist()):
            corpus = domain if split.owner[k] == 1 else web
            ids = tokenizer.encode([corpus[split.rows[k]][0]])[0]
            assert row[: len(ids)] == ids


def test_the_sweep_removes_only_dead_builds_of_this_host(tmp_path, monkeypatch):
    path = tmp_path / "tokenized" / "abc"
    path.parent.mkdir(parents=True)
    here = cache._here()
    dead, live = 2 ** 22 + 12345, os.getpid()  # above the default pid_max, so no such process
    keep = [f".abc.tmp-{here}-{live}-0123abcd", f".abc.tmp-{'0' * 12}-{dead}-0123abcd",  # live; another host
            f".abc.tmp-{here}-{dead}-0123abcd-x", ".abc.tmp-node-3999999-5555-deadbeef", ".abd.tmp-x"]
    gone = f".abc.tmp-{here}-{dead}-89abcdef"
    for name in keep + [gone]:
        (path.parent / name).mkdir()
    cache._sweep_killed_builds(path)
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(keep)


def test_a_fractional_weight_that_leaves_no_pairs_is_refused(tmp_path, tokenizer):
    from mt.config import load_config
    from mt.prepare import load_split

    a = (write(tmp_path / "a.de", ["Ein Hund."] * 30), write(tmp_path / "a.en", ["A dog."] * 30))
    b = (write(tmp_path / "b.de", ["Zwei Katzen."] * 10), write(tmp_path / "b.en", ["Two cats."] * 10))
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  cache_dir: {tmp_path / 'cache'}\n  train:\n    - {{src: {a[0]}, tgt: {a[1]}}}\n"
                      f"    - {{src: {b[0]}, tgt: {b[1]}, weight: 0.01}}\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"b.de \+ .*b.en: weight 0.01 of 10 kept pairs uses none"):
        load_split(load_config(config), "train", tokenizer, tokenizer, progress=False)
