"""Reading corpora, cleaning, the token-budget sampler, collation and the datasets cache."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from mt.config import CorpusConfig
from mt.batch import collate
from mt.data import (CorpusError, ParallelData, TokenBatchSampler, clean, load_corpus, read_lines,
                     tokenize)
from mt.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def load_text(src: Path, tgt: Path, cache_dir: str) -> datasets.Dataset:
    return load_corpus(CorpusConfig(src=str(src), tgt=str(tgt)), "de", "en", cache_dir)


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


def test_invalid_utf8_names_file_and_line(tmp_path, cache_dir):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\nalso fine\nbroken \xff\xfe here\n")
    with pytest.raises(CorpusError, match=rf"{bad}:3: invalid UTF-8"):
        list(read_lines(bad))
    # and through load_corpus, where the error is raised inside datasets' generator
    good = write(tmp_path / "good.txt", ["a", "b", "c"])
    with pytest.raises(CorpusError, match=rf"{bad}:3"):
        load_text(bad, good, cache_dir)


def test_missing_file_is_a_corpus_error(tmp_path, cache_dir):
    good = write(tmp_path / "good.txt", ["a"])
    with pytest.raises(CorpusError, match="nope.txt"):
        load_text(tmp_path / "nope.txt", good, cache_dir)


# --------------------------------------------------------------------------------------------------
# Corpus formats


@pytest.mark.parametrize("n_src,n_tgt", [(5, 3), (3, 5), (1, 0), (0, 2)])
def test_line_count_mismatch_names_both_files_and_counts(tmp_path, cache_dir, n_src, n_tgt):
    src = write(tmp_path / "train.de", [f"satz {i}" for i in range(n_src)])
    tgt = write(tmp_path / "train.en", [f"sentence {i}" for i in range(n_tgt)])
    with pytest.raises(CorpusError) as info:
        load_text(src, tgt, cache_dir)
    message = str(info.value)
    assert f"{src} has {n_src} lines" in message
    assert f"{tgt} has {n_tgt}" in message


def test_text_pair_loads_in_order(tmp_path, cache_dir):
    src = write(tmp_path / "a.de", ["eins", "", "drei\u2028vier"])
    tgt = write(tmp_path / "a.en", ["one", "two", "three four"])
    ds = load_text(src, tgt, cache_dir)
    assert ds["src"] == ["eins", "", "drei\u2028vier"]
    assert ds["tgt"] == ["one", "two", "three four"]


def test_tsv_loads_and_wrong_field_count_names_file_and_line(tmp_path, cache_dir):
    good = tmp_path / "good.tsv"
    good.write_text("Hallo Welt\tHello world\n ein  \t a \n", encoding="utf-8")
    ds = load_corpus(CorpusConfig(path=str(good)), "de", "en", cache_dir)
    assert list(zip(ds["src"], ds["tgt"])) == [("Hallo Welt", "Hello world"), ("ein", "a")]

    for body, line, found in (("a\tb\nno tab here\nc\td\n", 2, 1), ("a\tb\nc\td\ne\tf\tg\n", 3, 3)):
        bad = tmp_path / f"bad{line}.tsv"
        bad.write_text(body, encoding="utf-8")
        with pytest.raises(CorpusError, match=rf"{bad}:{line}: expected 2 tab-separated fields, found {found}"):
            load_corpus(CorpusConfig(path=str(bad)), "de", "en", cache_dir)


def test_tsv_with_an_empty_side_loads(tmp_path, cache_dir):
    """A TSV row with an empty source or target has two fields; cleaning (not the reader) drops it."""
    path = tmp_path / "empty_side.tsv"
    path.write_text("a\tb\n\tonly target\nonly source\t\n", encoding="utf-8")
    try:
        ds = load_corpus(CorpusConfig(path=str(path)), "de", "en", cache_dir)
    except CorpusError as e:
        pytest.fail(f"a TSV row with an empty field was rejected: {e} (read_lines strips the tab "
                    "before _read_tsv splits on it)")
    assert list(zip(ds["src"], ds["tgt"])) == [("a", "b"), ("", "only target"), ("only source", "")]


def test_jsonl_both_record_forms_load(tmp_path, cache_dir):
    path = tmp_path / "pairs.jsonl"
    records = [{"src": " Hallo ", "tgt": "Hello"},
               {"translation": {"de": "Guten Morgen", "en": "Good morning"}},
               {"de": "Danke", "en": "Thanks", "extra": 1}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n\n", encoding="utf-8")
    ds = load_corpus(CorpusConfig(path=str(path)), "de", "en", cache_dir)
    assert list(zip(ds["src"], ds["tgt"])) == [("Hallo", "Hello"), ("Guten Morgen", "Good morning"),
                                              ("Danke", "Thanks")]

    gz = tmp_path / "pairs.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"translation": {"de": "Ja", "en": "Yes", "fr": "Oui"}}) + "\n")
    ds = load_corpus(CorpusConfig(path=str(gz)), "de", "en", cache_dir)
    assert (ds["src"], ds["tgt"]) == (["Ja"], ["Yes"])


def test_jsonl_errors_name_file_and_line(tmp_path, cache_dir):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"src": "a", "tgt": "b"}\n{"src": \n', encoding="utf-8")
    with pytest.raises(CorpusError, match=rf"{bad_json}:2: invalid JSON"):
        load_corpus(CorpusConfig(path=str(bad_json)), "de", "en", cache_dir)
    wrong_keys = tmp_path / "keys.jsonl"
    wrong_keys.write_text('{"translation": {"fr": "a", "en": "b"}}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=rf"{wrong_keys}:1: expected"):
        load_corpus(CorpusConfig(path=str(wrong_keys)), "de", "en", cache_dir)


def test_unknown_corpus_format(tmp_path, cache_dir):
    path = write(tmp_path / "pairs.csv", ["a,b"])
    with pytest.raises(CorpusError, match="unknown corpus format"):
        load_corpus(CorpusConfig(path=str(path)), "de", "en", cache_dir)


# --------------------------------------------------------------------------------------------------
# Cleaning


def test_clean_drops_pairs_jointly_and_counts_each_reason():
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
    ds = datasets.Dataset.from_dict({"id": list(range(len(rows))), "src_len": [r[0] for r in rows],
                                     "tgt_len": [r[1] for r in rows],
                                     "src": [f"s{i}" for i in range(len(rows))],
                                     "tgt": [f"t{i}" for i in range(len(rows))]})
    kept, report = clean(ds, max_len=64, max_ratio=3.0)
    keep_ids = [i for i, r in enumerate(rows) if r[2] == "keep"]
    assert kept["id"] == keep_ids
    assert kept["src"] == [f"s{i}" for i in keep_ids] and kept["tgt"] == [f"t{i}" for i in keep_ids]
    assert report.total == 12 and report.kept == 4
    assert report.dropped == {"empty": 3, "with control characters": 0, "longer than 64 tokens": 2,
                              "length ratio above 3": 3}
    assert str(report) == "4/12 pairs kept (dropped: 3 empty, 2 longer than 64 tokens, 3 length ratio above 3)"

    # max_ratio 0 disables the ratio filter
    kept, report = clean(ds, max_len=64, max_ratio=0)
    assert report.kept == 7 and report.dropped["length ratio above 0"] == 0


def test_pairs_with_control_characters_are_dropped_jointly_and_counted(tokenizer):
    texts = [("Ein Hund läuft.", "A dog runs."), ("Ein\x07 Hund.", "A dog."), ("Zwei Katzen.", "Two\x85 cats."),
             ("Tab\tist gut.", "Tab is fine."), ("Ein Mann\x00.", "A man."), ("Rot.", "Red\x7f.")]
    ds = datasets.Dataset.from_dict({"src": [t[0] for t in texts], "tgt": [t[1] for t in texts]})
    kept, report = clean(tokenize(ds, tokenizer, tokenizer), max_len=64, max_ratio=0)
    assert kept["src"] == ["Ein Hund läuft.", "Tab\tist gut."]
    assert kept["tgt"] == ["A dog runs.", "Tab is fine."]
    assert report.dropped["with control characters"] == 4


def test_clean_keeps_everything_untouched():
    ds = datasets.Dataset.from_dict({"src_len": [3, 4], "tgt_len": [4, 3]})
    kept, report = clean(ds, max_len=10, max_ratio=2.0)
    assert len(kept) == 2 and report.kept == 2 and str(report) == "2/2 pairs kept"


# --------------------------------------------------------------------------------------------------
# Sampler


@pytest.fixture(scope="module")
def lengths():
    rng = np.random.default_rng(7)
    return rng.integers(2, 60, size=500), rng.integers(2, 60, size=500)


def test_sampler_respects_budget_and_covers_every_example_once(lengths):
    src_len, tgt_len = lengths
    longest = np.maximum(src_len, tgt_len)
    sampler = TokenBatchSampler(src_len, tgt_len, max_tokens=256, seed=3)
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
    a = TokenBatchSampler(src_len, tgt_len, max_tokens=256, seed=3)
    b = TokenBatchSampler(src_len, tgt_len, max_tokens=256, seed=3)
    c = TokenBatchSampler(src_len, tgt_len, max_tokens=256, seed=4)

    def flat(batches):
        return np.concatenate(batches).tolist()

    assert flat(a.batches(0)) == flat(b.batches(0))
    assert flat(a.batches(1)) == flat(b.batches(1))
    assert flat(a.batches(0)) != flat(a.batches(1))
    assert flat(a.batches(0)) != flat(c.batches(0))
    assert flat(b.batches(0)) == flat(TokenBatchSampler(src_len, tgt_len, 256, seed=3).batches(0))


def test_sampler_without_shuffle_follows_length_order(lengths):
    src_len, tgt_len = lengths
    sampler = TokenBatchSampler(src_len, tgt_len, max_tokens=256, shuffle=False)
    order = np.concatenate(sampler.batches(0))
    longest = np.maximum(src_len, tgt_len)[order]
    assert (np.diff(longest) >= 0).all()
    assert order.tolist() == np.argsort(np.maximum(src_len, tgt_len), kind="stable").tolist()


def test_sampler_state_seed_wins_even_after_use(lengths):
    """Loading a state must give that state's batches, whatever the sampler had computed before."""
    src_len, tgt_len = lengths
    source = TokenBatchSampler(src_len, tgt_len, max_tokens=256, seed=11)
    state = source.state_dict()
    assert state == {"version": 2, "seed": 11, "max_tokens": 256, "num_examples": 500}

    target = TokenBatchSampler(src_len, tgt_len, max_tokens=256, seed=1)
    before = target.batches(2)  # computed (and cached) under seed 1
    target.load_state_dict(state)
    resumed, expected = target.batches(2), source.batches(2)
    assert len(resumed) == len(expected) and all(np.array_equal(x, y) for x, y in zip(resumed, expected))
    assert not all(np.array_equal(x, y) for x, y in zip(before, expected))


def test_sampler_load_state_dict_rejects_other_data(lengths):
    src_len, tgt_len = lengths
    state = TokenBatchSampler(src_len, tgt_len, max_tokens=256).state_dict()
    with pytest.raises(ValueError, match="^num_examples=500 but this run has 499"):
        TokenBatchSampler(src_len[:499], tgt_len[:499], max_tokens=256).load_state_dict(state)
    with pytest.raises(ValueError, match="max_tokens=256 but this run has 512"):
        TokenBatchSampler(src_len, tgt_len, max_tokens=512).load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        TokenBatchSampler(src_len, tgt_len, max_tokens=256).load_state_dict({**state, "version": 99})


def test_sampler_rejects_example_over_budget():
    with pytest.raises(ValueError, match="example 1 has 300 tokens"):
        TokenBatchSampler(np.array([5, 300]), np.array([5, 4]), max_tokens=256)


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
# Real data and the cache


def test_load_multi30k_val(multi30k, multi30k_head, cache_dir):
    corpus = CorpusConfig(src=str(multi30k / "val.de.gz"), tgt=str(multi30k / "val.en.gz"))
    ds = load_corpus(corpus, "de", "en", cache_dir)
    assert len(ds) == 1014
    assert ds.column_names == ["src", "tgt"]
    assert ds[0] == {"src": multi30k_head("val", "de", 1)[0].strip(), "tgt": multi30k_head("val", "en", 1)[0].strip()}
    assert ds[0]["tgt"] == "A group of men are loading cotton onto a truck"
    assert all(cache_dir in f["filename"] for f in ds.cache_files)

    again = load_corpus(corpus, "de", "en", cache_dir)
    assert again._fingerprint == ds._fingerprint
    assert again.cache_files == ds.cache_files and again.cache_files


def test_tokenize_is_cached_by_tokenizer(tmp_path, cache_dir, tokenizer, spm_model):
    src = write(tmp_path / "s.de", ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen."])
    tgt = write(tmp_path / "s.en", ["A man rides a bike.", "Two dogs play."])
    raw = load_text(src, tgt, cache_dir)
    tok = tokenize(raw, tokenizer, tokenizer)
    assert tok["src_ids"][0] == tokenizer.encode(["Ein Mann fährt Fahrrad."])[0]
    assert tok["tgt_ids"][1][-1] == EOS_ID
    assert tok["src_len"] == [len(x) for x in tok["src_ids"]]

    class Exploding(Tokenizer):
        def encode(self, texts):
            raise AssertionError("tokenize ran again instead of reading its cache")

    again = tokenize(load_text(src, tgt, cache_dir), Exploding(spm_model), Exploding(spm_model))
    assert again._fingerprint == tok._fingerprint and again.cache_files == tok.cache_files
    assert again["src_ids"] == tok["src_ids"]

    # and the ids come back out of ParallelData as a padded batch
    data = ParallelData(tok)
    batch = data.batch(np.array([1, 0]))
    assert batch.tgt_out[0, : tok["tgt_len"][1]].tolist() == tok["tgt_ids"][1]


def test_changed_file_is_read_again(tmp_path, cache_dir):
    src = write(tmp_path / "c.de", ["alt"])
    tgt = write(tmp_path / "c.en", ["old"])
    assert load_text(src, tgt, cache_dir)["src"] == ["alt"]
    write(src, ["neuer Satz"])
    assert load_text(src, tgt, cache_dir)["src"] == ["neuer Satz"]


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
    ds = load_corpus(CorpusConfig(hub="wmt16", hub_config="de-en", split="validation"), "de", "en")
    assert calls == [("wmt16", "de-en", "validation")]
    assert ds.column_names == ["src", "tgt"]
    assert ds["src"] == ["Ein Hund.", "Zwei Katzen."] and ds["tgt"] == ["A dog.", "Two cats."]


def test_hub_dataset_errors_are_user_errors(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(CorpusError, match="hub:wmt16: cannot load .*ConnectionError"):
        load_corpus(CorpusConfig(hub="wmt16"), "de", "en")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict({"text": ["x"]}))
    with pytest.raises(CorpusError, match="no 'translation', 'de'/'en' or 'src'/'tgt' columns"):
        load_corpus(CorpusConfig(hub="wmt16"), "de", "en")
